//! The modules: the official Python SDK scripts of `tests/sdk/python` (send.py, receive.py),
//! run in their own namespaces, reconnecting on their own. Each runs under a supervisor that
//! restarts it when it exits before its work is done (as a kubelet restarts a container; the
//! harness exits on its own when an SDK thread dies, see its EXIT_SDK_THREAD), the sender
//! resuming after its last acknowledged number. Every line is kept with the instant it was read.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::SimError;
use crate::net::{run_ok, Space};

/// Where the SDKs and the harness scripts are.
#[derive(Clone, Debug)]
pub struct SdkEnv {
    /// `${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}`.
    pub dir: PathBuf,
    /// The venv's python.
    pub python: PathBuf,
    /// `tests/sdk/python` (or `$EDGEHUB_SDK_SCRIPTS/python`).
    pub scripts: PathBuf,
}

impl SdkEnv {
    /// The installed SDK, or why not.
    pub fn locate() -> Result<SdkEnv, SimError> {
        let dir = std::env::var_os("EDGEHUB_SDK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/edgehub-sdk"));
        let python = dir.join("venv/bin/python");
        if !python.exists() || !dir.join("venv/.edgehub-stamp").exists() {
            return Err(SimError::Sdk(format!(
                "no Python SDK venv at {}",
                dir.display()
            )));
        }
        let scripts = std::env::var_os("EDGEHUB_SDK_SCRIPTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"))
            .join("python");
        if !scripts.join("send.py").is_file() {
            return Err(SimError::Sdk(format!(
                "no send.py in {}",
                scripts.display()
            )));
        }
        Ok(SdkEnv {
            dir,
            python,
            scripts,
        })
    }
}

/// One line a module printed and when the simulation read it.
#[derive(Clone, Debug)]
pub struct Line {
    /// When it was read.
    pub at: Instant,
    /// The JSON line.
    pub value: Value,
}

impl Line {
    /// Its sequence number, for a data line (an acknowledged send, a received message).
    pub fn seq(&self) -> Option<i64> {
        if self.value.get("event").is_some() {
            return None;
        }
        self.value.get("seq").and_then(Value::as_i64)
    }
}

#[derive(Debug, Default)]
struct Shared {
    lines: Mutex<Vec<Line>>,
    changed: Condvar,
    pid: Mutex<Option<u32>>,
    stop: AtomicBool,
    done: AtomicBool,
    restarts: AtomicU32,
    exits: Mutex<Vec<Option<i32>>>,
    stderr_tail: Mutex<String>,
}

/// What a module does.
#[derive(Clone, Debug)]
pub enum Role {
    /// send.py: `count` messages numbered from 0, `interval_ms` apart, bodies padded to
    /// `payload_size` bytes.
    Sender {
        /// The first number.
        first: i64,
        /// How many.
        count: u64,
        /// Pause between sends.
        interval_ms: u64,
        /// Body size (0: the small JSON body).
        payload_size: usize,
    },
    /// receive.py: stays until stopped.
    Receiver,
}

/// A supervised module.
#[derive(Debug)]
pub struct Module {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Module {
    /// Starts `role` in `space` with the module connection string `cs` trusting `ca`.
    pub fn start(
        env: &SdkEnv,
        space: &Space,
        role: Role,
        cs: &str,
        ca: &Path,
        run_id: &str,
    ) -> Module {
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let env = env.clone();
        let ns = space.name.clone();
        let cs = cs.to_owned();
        let ca = ca.to_owned();
        let run_id = run_id.to_owned();
        let thread = thread::spawn(move || supervise(&env, &ns, &role, &cs, &ca, &run_id, &sh));
        Module {
            shared,
            thread: Some(thread),
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.shared
            .lines
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// The data lines' sequence numbers so far, in order.
    pub fn seqs(&self) -> Vec<i64> {
        self.lines().iter().filter_map(Line::seq).collect()
    }

    /// Whether the sender printed its "done" line (every message acknowledged).
    pub fn done(&self) -> bool {
        self.shared.done.load(Ordering::Relaxed)
    }

    /// How many times the supervisor restarted the script.
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// The scripts' exit codes, in order.
    pub fn exits(&self) -> Vec<Option<i32>> {
        self.shared
            .exits
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// The last script's stderr tail (for a failure's notes).
    pub fn stderr_tail(&self) -> String {
        self.shared
            .stderr_tail
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Waits until `ok(lines)` holds, re-checked at every new line; false when `within` (a
    /// failure bound) passes first.
    pub fn wait(&self, within: Duration, ok: impl Fn(&[Line]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let Ok(mut g) = self.shared.lines.lock() else {
            return false;
        };
        loop {
            if ok(&g) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = match self
                .shared
                .changed
                .wait_timeout(g, left.min(Duration::from_millis(500)))
            {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the running script.
    pub fn signal(&self, sig: &str) -> Result<(), SimError> {
        let pid = self.shared.pid.lock().ok().and_then(|p| *p);
        match pid {
            Some(pid) => run_ok(Command::new("kill").args([&format!("-{sig}"), &pid.to_string()])),
            None => Ok(()),
        }
    }

    /// Stops it for good.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.signal("CONT");
        let _ = self.signal("KILL");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        self.stop();
    }
}

fn supervise(env: &SdkEnv, ns: &str, role: &Role, cs: &str, ca: &Path, run_id: &str, sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&env.python);
        match role {
            Role::Sender {
                first,
                count,
                interval_ms,
                payload_size,
            } => {
                let next = sh
                    .lines
                    .lock()
                    .map(|l| {
                        l.iter()
                            .filter_map(Line::seq)
                            .max()
                            .map_or(*first, |m| m + 1)
                    })
                    .unwrap_or(*first);
                let left = (*first + *count as i64 - next).max(0);
                if left == 0 {
                    sh.done.store(true, Ordering::Relaxed);
                    break;
                }
                cmd.arg(env.scripts.join("send.py")).args([
                    "--output",
                    "out1",
                    "--run",
                    run_id,
                    "--start-seq",
                    &next.to_string(),
                    "--count",
                    &left.to_string(),
                    "--interval-ms",
                    &interval_ms.to_string(),
                    "--payload-size",
                    &payload_size.to_string(),
                    "--timeout",
                    "3600",
                ]);
            }
            Role::Receiver => {
                cmd.arg(env.scripts.join("receive.py"))
                    .args(["--no-data", "--timeout", "3600"]);
            }
        }
        cmd.env("EDGEHUB_CS", cs)
            .env("EDGEHUB_CA", ca)
            .env("EDGEHUB_SDK_DIR", &env.dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let Ok(mut child) = cmd.spawn() else {
            sh.stop.store(true, Ordering::Relaxed);
            break;
        };
        if let Ok(mut p) = sh.pid.lock() {
            *p = Some(child.id());
        }
        let err_thread = child.stderr.take().map(|err| {
            thread::spawn(move || {
                let mut tail = String::new();
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    tail.push_str(&line);
                    tail.push('\n');
                    if tail.len() > 4096 {
                        tail.drain(..tail.len() - 4096);
                    }
                }
                tail
            })
        });
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if value.get("event").and_then(Value::as_str) == Some("done")
                    && matches!(role, Role::Sender { .. })
                {
                    sh.done.store(true, Ordering::Relaxed);
                }
                if let Ok(mut l) = sh.lines.lock() {
                    l.push(Line {
                        at: Instant::now(),
                        value,
                    });
                }
                sh.changed.notify_all();
            }
        }
        let code = child.wait().ok().and_then(|s| s.code());
        if let Ok(mut p) = sh.pid.lock() {
            *p = None;
        }
        if let Some(t) = err_thread {
            if let (Ok(tail), Ok(mut s)) = (t.join(), sh.stderr_tail.lock()) {
                *s = tail;
            }
        }
        if let Ok(mut e) = sh.exits.lock() {
            e.push(code);
        }
        sh.changed.notify_all();
        if sh.stop.load(Ordering::Relaxed) || sh.done.load(Ordering::Relaxed) {
            break;
        }
        sh.restarts.fetch_add(1, Ordering::Relaxed);
        // A container's restart is not instant either.
        thread::sleep(Duration::from_millis(300));
    }
    sh.changed.notify_all();
}
