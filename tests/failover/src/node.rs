//! A "node"'s hub: the `edgehub` binary run inside the node's namespace on the shared data
//! directory, its log kept in a file and watched for the ready line; its counters read from
//! its own metrics listener inside the namespace (which a partition does not cut).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::SimError;
use crate::net::{output, Space, GATEWAY_HOSTNAME};

/// What the hub logs once every listener is up (`hub::server`).
pub const READY_LINE: &str = "edgehub ready";
/// The metrics listener's port inside a node's namespace.
pub const METRICS_PORT: u16 = 9600;
/// The hub's MQTT port (the SDKs always dial 8883).
pub const MQTT_PORT: u16 = 8883;
/// The device id and IoT Hub host name connection strings carry (the CLI's defaults).
const DEVICE_ID: &str = "edge-device";
const IOTHUB_HOSTNAME: &str = "edgehub.local";

/// The identity arguments every `edgehub` command of the run takes.
fn identity_args(data_dir: &Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--gateway-hostname".into(),
        GATEWAY_HOSTNAME.into(),
        "--iothub-hostname".into(),
        IOTHUB_HOSTNAME.into(),
        "--device-id".into(),
        DEVICE_ID.into(),
    ]
}

fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EDGEHUB_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
}

/// `edgehub ARGS` to its end (connection strings, the CA path): its stdout.
pub fn cli(hub_bin: &Path, args: &[&str], data_dir: &Path) -> Result<String, SimError> {
    let mut cmd = Command::new(hub_bin);
    clean_env(&mut cmd);
    cmd.args(args);
    if args.first() == Some(&"ca-path") {
        cmd.args(["--data-dir", &data_dir.display().to_string()]);
    } else {
        cmd.args(identity_args(data_dir));
    }
    let out = output(&mut cmd)?;
    if !out.status.success() {
        return Err(SimError::Command {
            what: format!("edgehub {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// How a start ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// It logged that it is ready.
    Ready,
    /// It exited first, with this code (None: a signal).
    Exited(Option<i32>),
    /// Neither within the failure bound.
    TimedOut,
}

/// One hub process.
#[derive(Debug)]
pub struct Hub {
    /// "a" or "b".
    pub node: String,
    child: Child,
    log: Arc<(Mutex<String>, Condvar)>,
    /// Where its log goes.
    pub log_path: PathBuf,
    /// When it was spawned.
    pub spawned: Instant,
    ns: String,
    status: Option<ExitStatus>,
}

impl Hub {
    /// Starts `edgehub run` in `space` on `data_dir` at `epoch`, its log appended to `log_path`.
    pub fn spawn(
        hub_bin: &Path,
        node: &str,
        space: &Space,
        data_dir: &Path,
        epoch: u64,
        log_path: &Path,
    ) -> Result<Hub, SimError> {
        let mut cmd = space.command(hub_bin);
        clean_env(&mut cmd);
        cmd.arg("run")
            .args(identity_args(data_dir))
            .args([
                "--mqtt-addr",
                &format!("0.0.0.0:{MQTT_PORT}"),
                "--metrics-addr",
                &format!("0.0.0.0:{METRICS_PORT}"),
                "--epoch",
                &epoch.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| SimError::io(format!("start edgehub in {}", space.name), e))?;
        let log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| SimError::io(format!("open {}", log_path.display()), e))?;
        let _ = writeln!(file, "=== hub {node}, epoch {epoch}");
        if let Some(mut err) = child.stderr.take() {
            let sink = Arc::clone(&log);
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = file.write_all(&buf[..n]);
                    if let Ok(mut s) = sink.0.lock() {
                        // The ready line comes early; a long log is only kept in the file.
                        if s.len() < 1 << 20 {
                            s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        }
                    }
                    sink.1.notify_all();
                }
                sink.1.notify_all();
            });
        }
        Ok(Hub {
            node: node.to_owned(),
            child,
            log,
            log_path: log_path.to_owned(),
            spawned,
            ns: space.name.clone(),
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the ready line or the exit (woken by every piece of log; the slice only
    /// bounds how late an exit is noticed); `within` is a failure bound.
    pub fn wait_start(&mut self, within: Duration) -> Start {
        let deadline = Instant::now() + within;
        loop {
            if self.log_contains(READY_LINE) {
                return Start::Ready;
            }
            if let Some(s) = self.exit_status() {
                // The ready line may have come with the last piece of log.
                if self.log_contains(READY_LINE) {
                    return Start::Ready;
                }
                return Start::Exited(s.code());
            }
            if Instant::now() >= deadline {
                return Start::TimedOut;
            }
            let (text, changed) = &*self.log;
            if let Ok(g) = text.lock() {
                if !g.contains(READY_LINE) {
                    let _ = changed.wait_timeout(g, Duration::from_millis(200));
                }
            }
        }
    }

    /// Waits for the process to exit (`within` a failure bound).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether its log has `needle` so far.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .0
            .lock()
            .map(|s| s.contains(needle))
            .unwrap_or(false)
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`) with `kill(1)`.
    pub fn signal(&mut self, sig: &str) -> Result<(), SimError> {
        crate::net::run_ok(
            Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]),
        )?;
        if sig == "KILL" {
            self.status = self.child.wait().ok();
        }
        Ok(())
    }

    /// `GET path` on its metrics listener, from inside its namespace: (status code, body).
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        http_in(&self.ns, path)
    }

    /// The sum of every sample of the counter `name` (e.g. `edgehub_store_appends_total`).
    pub fn counter(&self, name: &str) -> Option<u64> {
        let (code, body) = self.http("/metrics")?;
        if code != 200 {
            return None;
        }
        Some(sum_samples(&body, name))
    }

    /// Reads `name` until it stops changing (three equal reads in a row, 150 ms apart; at most
    /// `within`): a hub that no longer receives anything. None when it cannot be read.
    pub fn settled_counter(&self, name: &str, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        let mut last = self.counter(name)?;
        let mut same = 0;
        while same < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(150));
            let now = self.counter(name)?;
            if now == last {
                same += 1;
            } else {
                same = 0;
                last = now;
            }
        }
        Some(last)
    }

    /// How the hub stands now: "exited(N)", "killed", "running, healthz 200/503", "stopped?".
    pub fn outcome(&mut self) -> String {
        match self.exit_status() {
            Some(s) => match s.code() {
                Some(c) => format!("exited({c})"),
                None => "killed by a signal".into(),
            },
            None => match self.http("/healthz") {
                Some((code, _)) => format!("running, healthz {code}"),
                None => "running, healthz unanswered".into(),
            },
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sums the samples of `name` in a Prometheus text exposition.
pub fn sum_samples(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            let value = l.rsplit(' ').next()?;
            value.parse::<f64>().ok().map(|v| v as u64)
        })
        .sum()
}

/// `GET path` on 127.0.0.1:[`METRICS_PORT`] inside namespace `ns` (bash's /dev/tcp, so it
/// works while the node's link is cut): (status code, body).
pub fn http_in(ns: &str, path: &str) -> Option<(u16, String)> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT} || exit 1; \
         printf 'GET {path} HTTP/1.0\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
         cat <&3"
    );
    let out = output(
        Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "3", "bash", "-c", &script])
            .stderr(Stdio::null()),
    )
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_sample_of_one_counter_only() {
        let text = "# TYPE edgehub_store_appends counter\n\
                    edgehub_store_appends_total 12\n\
                    edgehub_store_appends_total_x 99\n\
                    edgehub_messages_sent_total{to=\"a\"} 3\n\
                    edgehub_messages_sent_total{to=\"b\"} 4\n";
        assert_eq!(sum_samples(text, "edgehub_store_appends_total"), 12);
        assert_eq!(sum_samples(text, "edgehub_messages_sent_total"), 7);
        assert_eq!(sum_samples(text, "edgehub_nothing"), 0);
    }
}
