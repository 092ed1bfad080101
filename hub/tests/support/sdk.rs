//! Real Azure IoT SDK modules for hub integration tests (tests/sdk/README.md).
//!
//! Include it from a test file with
//! `#[path = "support/sdk.rs"] mod sdk;`
//!
//! A test makes a fresh network namespace ([`NetNs`]), starts the hub binary in it with
//! [`NetNs::spawn`] (every SDK dials port 8883 on its GatewayHostName, so each test needs its own
//! 127.0.0.1), waits for the port with [`NetNs::wait_for_port`], then starts SDK scripts in the
//! same namespace with [`NetNs::module`] and reads their JSON lines with deadlines:
//!
//! ```ignore
//! let sdk = sdk::SdkEnv::require();
//! let ns = sdk::NetNs::new();
//! let mut hub = ns.spawn(Command::new(env!("CARGO_BIN_EXE_edgehub")).args([...]));
//! assert!(ns.wait_for_port(8883, Duration::from_secs(10)), "hub: {}", hub.stderr());
//! let cs = sdk::module_connection_string("acceptance-hub.local", "edgedev", "modB", KEY, "127.0.0.1");
//! let mut rx = ns.module(&sdk, sdk::Sdk::Python, sdk::Script::Receive, &cs, &ca_path)
//!     .args(["--count", "100", "--timeout", "60"]).spawn();
//! rx.expect_event("ready", Duration::from_secs(20));
//! let out = ns.module(&sdk, sdk::Sdk::Node, sdk::Script::Send, &cs_a, &ca_path)
//!     .args(["--output", "out1", "--count", "100", "--run", "t1"]).run(Duration::from_secs(60));
//! out.assert_exit(sdk::EXIT_OK);
//! let got = rx.data_lines(100, Duration::from_secs(30));
//! sdk::SeqReport::of(&got, 0..100).assert_no_loss_no_reorder();
//! ```
//!
//! Policy: when the SDKs are not installed, [`SdkEnv::require`] panics with "run
//! scripts/install-sdks.sh"; a test that needs them never passes without them. Root (for `ip
//! netns`) is needed too; [`NetNs::new`] panics with the reason otherwise.
//!
//! Only std and serde_json, both already available to the hub's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The scripts' exit codes (tests/sdk/python/harness.py, tests/sdk/node/harness.js).
pub const EXIT_OK: i32 = 0;
/// An exception the scripts did not expect (a bug in the harness or the SDK).
pub const EXIT_OTHER: i32 = 1;
/// Bad arguments, missing env, unreadable CA, or credentials the SDK itself refused.
pub const EXIT_USAGE: i32 = 2;
/// Could not connect: refused, unreachable, closed.
pub const EXIT_CONNECT: i32 = 3;
/// The hub refused the credentials (CONNACK 5 / CBS status other than 200).
pub const EXIT_AUTH: i32 = 4;
/// The script's own deadline (--timeout) passed first.
pub const EXIT_TIMEOUT: i32 = 5;
/// The TLS handshake failed (the hub's certificate does not chain to EDGEHUB_CA, wrong name).
pub const EXIT_TLS: i32 = 6;
/// An SDK thread died of an uncaught exception (paho 1.6.1's network thread on
/// `ssl.SSLEOFError` when the hub vanishes mid-write; the SDK would never reconnect). Python only.
pub const EXIT_SDK_THREAD: i32 = 7;

const INSTALL_HINT: &str =
    "run scripts/install-sdks.sh (as root) to install the pinned Azure IoT SDKs";

/// Which official SDK runs a script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sdk {
    /// azure-iot-device 2.14.0 (Python, MQTT).
    Python,
    /// azure-iot-device 1.18.4 with azure-iot-device-mqtt 1.16.4 (Node); `--transport amqp`
    /// switches to azure-iot-device-amqp 1.14.4.
    Node,
}

impl Sdk {
    /// Both SDKs, for tests that run the same scenario with each.
    pub const ALL: [Sdk; 2] = [Sdk::Python, Sdk::Node];

    /// "python" or "node".
    pub fn name(self) -> &'static str {
        match self {
            Sdk::Python => "python",
            Sdk::Node => "node",
        }
    }
}

/// The harness scripts under tests/sdk/{python,node}/.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// send.py / send.js: COUNT messages to an output, one JSON line per PUBACK.
    Send,
    /// receive.py / receive.js: one JSON line per input message.
    Receive,
    /// connect_only.py / connect_only.js: connect, report, leave.
    ConnectOnly,
    /// method.py: serve direct methods, or invoke one (`invoke_method`); method.js: serve
    /// one method (`onMethod`, `--method NAME`), over MQTT or AMQP.
    Method,
    /// twin.py / twin.js: get / patch steps, desired patches with `--listen` (twin.js: steps
    /// as `--step`, over MQTT or AMQP).
    Twin,
}

impl Script {
    fn file(self, sdk: Sdk) -> &'static str {
        match (self, sdk) {
            (Script::Send, Sdk::Python) => "send.py",
            (Script::Receive, Sdk::Python) => "receive.py",
            (Script::ConnectOnly, Sdk::Python) => "connect_only.py",
            (Script::Twin, Sdk::Python) => "twin.py",
            (Script::Twin, Sdk::Node) => "twin.js",
            (Script::Send, Sdk::Node) => "send.js",
            (Script::Receive, Sdk::Node) => "receive.js",
            (Script::ConnectOnly, Sdk::Node) => "connect_only.js",
            (Script::Method, Sdk::Python) => "method.py",
            (Script::Method, Sdk::Node) => "method.js",
        }
    }
}

/// Where the SDKs and the scripts are.
#[derive(Clone, Debug)]
pub struct SdkEnv {
    /// `${EDGEHUB_SDK_DIR:-/var/tmp/edgehub-sdk}`.
    pub dir: PathBuf,
    /// The venv's python.
    pub python: PathBuf,
    /// The node binary (from PATH).
    pub node: PathBuf,
    /// The repository's tests/sdk.
    pub scripts: PathBuf,
}

impl SdkEnv {
    /// Finds the installed SDKs, or panics with the install hint: tests that need the SDKs must
    /// fail, not pass silently, on a machine without them.
    pub fn require() -> SdkEnv {
        Self::locate().unwrap_or_else(|why| panic!("SDK harness not ready: {why}; {INSTALL_HINT}"))
    }

    /// Like [`SdkEnv::require`], but says why instead of panicking.
    pub fn locate() -> Result<SdkEnv, String> {
        let dir = std::env::var_os("EDGEHUB_SDK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/edgehub-sdk"));
        Self::locate_at(dir)
    }

    /// The SDKs installed under `dir` (what scripts/install-sdks.sh made there). The scripts
    /// are the repository's tests/sdk, or `EDGEHUB_SDK_SCRIPTS` when set.
    pub fn locate_at(dir: PathBuf) -> Result<SdkEnv, String> {
        let python = dir.join("venv/bin/python");
        if !python.exists() || !dir.join("venv/.edgehub-stamp").exists() {
            return Err(format!(
                "no Python SDK venv at {}",
                dir.join("venv").display()
            ));
        }
        let mqtt = dir.join("node/node_modules/azure-iot-device-mqtt");
        if !mqtt.exists() || !dir.join("node/.edgehub-stamp").exists() {
            return Err(format!(
                "no Node SDK at {}",
                dir.join("node/node_modules").display()
            ));
        }
        let node = which("node").ok_or_else(|| "no `node` on PATH".to_string())?;
        let scripts = std::env::var_os("EDGEHUB_SDK_SCRIPTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk"));
        let scripts = scripts
            .canonicalize()
            .map_err(|e| format!("{}: {e}", scripts.display()))?;
        if !scripts.join("python/send.py").is_file() {
            return Err(format!("no harness scripts in {}", scripts.display()));
        }
        Ok(SdkEnv {
            dir,
            python,
            node,
            scripts,
        })
    }

    /// The interpreter and script path for `sdk`'s `script`.
    pub fn script(&self, sdk: Sdk, script: Script) -> (PathBuf, PathBuf) {
        match sdk {
            Sdk::Python => (
                self.python.clone(),
                self.scripts.join("python").join(script.file(sdk)),
            ),
            Sdk::Node => (
                self.node.clone(),
                self.scripts.join("node").join(script.file(sdk)),
            ),
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A module connection string as IoT Edge gives a module (`EdgeHubConnectionString`): the SDK
/// dials `gateway` (port 8883) and signs for `hostname`.
pub fn module_connection_string(
    hostname: &str,
    device: &str,
    module: &str,
    key_b64: &str,
    gateway: &str,
) -> String {
    format!(
        "HostName={hostname};DeviceId={device};ModuleId={module};SharedAccessKey={key_b64};GatewayHostName={gateway}"
    )
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

static NS_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A named network namespace of this test's own (`ip netns add edgehub-test-…`) with `lo` up:
/// its own 127.0.0.1, so tests run their hubs on port 8883 in parallel. Everything started with
/// [`NetNs::command`] / [`NetNs::spawn`] / [`NetNs::module`] shares it. Dropping it kills the
/// processes still inside it (all started by this test) and deletes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace, or panics saying why (not root, no `ip`).
    pub fn new() -> NetNs {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "edgehub-test-{}-{}-{:x}",
            std::process::id(),
            NS_COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos & 0xffff
        );
        ip(&["netns", "add", &name]).unwrap_or_else(|e| {
            panic!("cannot create network namespace {name} (needs root and iproute2): {e}")
        });
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])
            .unwrap_or_else(|e| panic!("cannot bring lo up in {}: {e}", ns.name));
        ns
    }

    /// The namespace's name (for `ip netns exec NAME …` by hand).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: add args and env, then spawn or run it.
    /// (`ip netns exec` execs the program in place, so the child's pid is the program's.)
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Spawns `cmd` (built by hand, e.g. the hub binary) inside the namespace, stdout and stderr
    /// captured. The program and args of `cmd` are moved under `ip netns exec`; its env and
    /// working directory are kept.
    pub fn spawn(&self, cmd: &mut Command) -> Proc {
        let label = cmd.get_program().to_string_lossy().into_owned();
        let mut c = self.command(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        Proc::spawn(c, label)
    }

    /// An SDK script inside the namespace, with `EDGEHUB_CS`, `EDGEHUB_CA` and
    /// `EDGEHUB_SDK_DIR` set. Add options with [`ModuleCmd::args`], then `spawn()` or `run()`.
    pub fn module(
        &self,
        env: &SdkEnv,
        sdk: Sdk,
        script: Script,
        connection_string: &str,
        ca_pem_path: &Path,
    ) -> ModuleCmd {
        let (interp, file) = env.script(sdk, script);
        let mut c = self.command(interp);
        c.arg(&file)
            .env("EDGEHUB_CS", connection_string)
            .env("EDGEHUB_CA", ca_pem_path)
            .env("EDGEHUB_SDK_DIR", &env.dir)
            .env_remove("EDGEHUB_SAS")
            .env("PYTHONUNBUFFERED", "1");
        ModuleCmd {
            cmd: c,
            label: format!("{}/{}", sdk.name(), script.file(sdk)),
        }
    }

    /// Polls until something accepts TCP on 127.0.0.1:`port` inside the namespace, up to
    /// `within`. True when it did. (Used after starting the hub; the poll ends at the deadline.)
    pub fn wait_for_port(&self, port: u16, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let probe = self
                .command("bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if matches!(probe, Ok(s) if s.success()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Only processes this test started can be in a namespace it made.
        for pid in self.pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and their JSON lines

/// The module environment IoT Edge gives a module ([`ModuleCmd::edge_env`]).
#[derive(Debug)]
pub struct EdgeEnv<'a> {
    /// `EdgeHubConnectionString`: the module's connection string.
    pub connection_string: String,
    /// `EdgeModuleCACertificateFile`: the CA the module trusts.
    pub ca: &'a Path,
    /// `IOTEDGE_IOTHUBHOSTNAME`.
    pub iothub_hostname: &'a str,
    /// `IOTEDGE_DEVICEID`.
    pub device: &'a str,
    /// `IOTEDGE_MODULEID`.
    pub module: &'a str,
    /// `IOTEDGE_GATEWAYHOSTNAME`: where the module finds the hub (and its HTTPS methods).
    pub gateway: &'a str,
}

/// An SDK script ready to start (from [`NetNs::module`]).
#[derive(Debug)]
pub struct ModuleCmd {
    cmd: Command,
    label: String,
}

impl ModuleCmd {
    /// Adds command-line options (see tests/sdk/README.md).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Sets or overrides an environment variable (e.g. `EDGEHUB_SAS` for connect_only.py).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Removes an environment variable (e.g. `EDGEHUB_CS` for a script run with
    /// `--edge-env`, which must find everything in the module environment).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.cmd.env_remove(key);
        self
    }

    /// Runs the script from exactly the module environment IoT Edge (or the Kubernetes
    /// controller) gives a module, with `--edge-env`: none of the test's own `EDGEHUB_*`
    /// variables, only `EdgeHubConnectionString`, the CA file and the `IOTEDGE_*` names.
    pub fn edge_env(self, edge: EdgeEnv<'_>) -> Self {
        let mut cmd = self
            .env_remove("EDGEHUB_CS")
            .env_remove("EDGEHUB_CA")
            .env_remove("IOTEDGE_WORKLOADURI")
            .env_remove("IOTEDGE_APIVERSION")
            .args(["--edge-env"]);
        for (k, v) in [
            ("EdgeHubConnectionString", edge.connection_string),
            ("EdgeModuleCACertificateFile", edge.ca.display().to_string()),
            ("IOTEDGE_IOTHUBHOSTNAME", edge.iothub_hostname.to_owned()),
            ("IOTEDGE_DEVICEID", edge.device.to_owned()),
            ("IOTEDGE_MODULEID", edge.module.to_owned()),
            ("IOTEDGE_GATEWAYHOSTNAME", edge.gateway.to_owned()),
        ] {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// Starts it; read its lines with [`Proc::expect_event`], [`Proc::data_lines`], ….
    pub fn spawn(self) -> Proc {
        Proc::spawn(self.cmd, self.label)
    }

    /// Starts it and waits for its exit (killing it at `within`).
    pub fn run(self, within: Duration) -> Outcome {
        self.spawn().finish(within)
    }
}

/// One stdout line of a running process.
#[derive(Clone, Debug)]
pub enum Line {
    /// A JSON object line (the scripts print only these).
    Json(Value),
    /// Anything else (the hub's logs, or a harness bug).
    Text(String),
}

/// A process started in a namespace: stdout is read line by line on a thread and handed over
/// through a channel, so reads take a deadline; stderr is collected. Dropping it kills it.
#[derive(Debug)]
pub struct Proc {
    label: String,
    child: Child,
    lines: Receiver<Line>,
    seen: Vec<Line>,
    /// Everything read from stderr so far, and a signal for each new piece.
    stderr: Arc<(Mutex<String>, Condvar)>,
    stderr_thread: Option<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(mut cmd: Command, label: String) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let parsed = match serde_json::from_str::<Value>(&line) {
                        Ok(v @ Value::Object(_)) => Line::Json(v),
                        _ => Line::Text(line),
                    };
                    if tx.send(parsed).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let stderr_thread = child.stderr.take().map(|mut err| {
            let sink = Arc::clone(&stderr);
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.0.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                    sink.1.notify_all();
                }
            })
        });
        Proc {
            label,
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
            stderr_thread,
            status: None,
        }
    }

    /// What it printed on stderr so far (the scripts' last line tells why they failed).
    pub fn stderr(&self) -> String {
        self.stderr.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until what it printed on stderr satisfies `ok` (re-checked on every new piece);
    /// false if `within` passes first.
    pub fn wait_stderr(&self, within: Duration, ok: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        let (text, changed) = &*self.stderr;
        let Ok(mut guard) = text.lock() else {
            return false;
        };
        loop {
            if ok(&guard) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = match changed.wait_timeout(guard, left) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
    }

    /// Every stdout line read so far.
    pub fn seen(&self) -> &[Line] {
        &self.seen
    }

    /// The process id (its own, `ip netns exec` execs in place).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (asked of the process itself: `ip netns pids` does not
    /// list it until `ip netns exec` has joined the namespace, a moment after spawning).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Reads lines until one satisfies `pred` or the deadline passes; None at the deadline or
    /// at end of output.
    pub fn read_until(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Line::Json(v) = line {
                        if pred(&v) {
                            return Some(v);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    /// Waits for the status line `{"event": event}` ("connected", "ready", "done", "held"), or
    /// panics with the process's stderr.
    pub fn expect_event(&mut self, event: &str, within: Duration) -> Value {
        match self.read_until(within, |v| {
            v.get("event").and_then(Value::as_str) == Some(event)
        }) {
            Some(v) => v,
            None => {
                let status = self.try_status();
                panic!(
                    "{}: no {event:?} line within {within:?}; exit {status:?}; stdout so far {:?}; stderr:\n{}",
                    self.label,
                    self.seen,
                    self.stderr()
                )
            }
        }
    }

    /// Reads until `n` data lines (lines without "event": sends acknowledged, messages
    /// received) have come in total since the start, or panics at the deadline saying how
    /// many came. Returns all data lines so far.
    pub fn data_lines(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let mut have = data_of(&self.seen).len();
        if have < n {
            let _ = self.read_until(within, |v| {
                if v.get("event").is_none() {
                    have += 1;
                }
                have >= n
            });
        }
        let got = data_of(&self.seen);
        if got.len() < n {
            let status = self.try_status();
            panic!(
                "{}: {} of {n} data lines within {within:?}; exit {status:?}; stderr:\n{}",
                self.label,
                got.len(),
                self.stderr()
            );
        }
        got
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the exit (killing it at `within`) and returns everything it printed.
    pub fn finish(mut self, within: Duration) -> Outcome {
        let deadline = Instant::now() + within;
        let mut killed = false;
        let status = loop {
            if let Some(s) = self.try_status() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                killed = true;
                break self.child.wait().ok();
            }
            // Drain stdout meanwhile so a chatty process never blocks on a full pipe.
            let _ = self.read_until(Duration::from_millis(20), |_| false);
        };
        self.status = status;
        // The reader threads end at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        Outcome {
            label: self.label.clone(),
            code: status.and_then(|s| s.code()),
            killed_at_deadline: killed,
            lines: std::mem::take(&mut self.seen),
            stderr: self.stderr(),
        }
    }

    /// Stops it now (SIGKILL): a module or hub that dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    /// Reads a receiver until every seq in `0..n` arrived at least once (duplicates count
    /// once), or `within`; then stops it and returns all its data lines and its stderr.
    pub fn receive_all(self, n: i64, within: Duration) -> (Vec<Value>, String) {
        self.receive_rest(&std::collections::BTreeSet::new(), n, within)
    }

    /// [`Proc::receive_all`] for a receiver taking over from one that already got `had`: waits
    /// until the two together have every seq in `0..n` (or `within`, or its exit).
    pub fn receive_rest(
        mut self,
        had: &std::collections::BTreeSet<i64>,
        n: i64,
        within: Duration,
    ) -> (Vec<Value>, String) {
        let mut have: std::collections::BTreeSet<i64> = data_of(self.seen())
            .iter()
            .filter_map(|m| m["seq"].as_i64())
            .chain(had.iter().copied())
            .collect();
        if (have.len() as i64) < n {
            let _ = self.read_until(within, |v| {
                if v.get("event").is_none() {
                    if let Some(s) = v["seq"].as_i64() {
                        if (0..n).contains(&s) {
                            have.insert(s);
                        }
                    }
                }
                have.len() as i64 >= n
            });
        }
        let stderr = self.stderr();
        self.kill();
        let out = self.finish(Duration::from_secs(5));
        (data_of(&out.lines), stderr)
    }

    /// Stops it with SIGTERM and waits up to `within` for it to exit; SIGKILL after that.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The data lines (no "event" key) among `lines`: acknowledged sends or received messages.
pub fn data_of(lines: &[Line]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| match l {
            Line::Json(v) if v.get("event").is_none() => Some(v.clone()),
            _ => None,
        })
        .collect()
}

/// How a script ended and all it printed.
#[derive(Debug)]
pub struct Outcome {
    /// "python/send.py" etc.
    pub label: String,
    /// The exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// True when [`Proc::finish`] had to kill it: the script overran its own --timeout.
    pub killed_at_deadline: bool,
    /// Every stdout line.
    pub lines: Vec<Line>,
    /// All of stderr.
    pub stderr: String,
}

impl Outcome {
    /// Data lines (no "event" key): acknowledged sends or received messages, in order.
    pub fn data(&self) -> Vec<Value> {
        data_of(&self.lines)
    }

    /// Status lines with this "event".
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Json(v) if v.get("event").and_then(Value::as_str) == Some(event) => {
                    Some(v.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// The script's one error line (`edgehub-sdk <script>: error=<kind> exit=<code>: …`).
    pub fn error_line(&self) -> Option<&str> {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("edgehub-sdk "))
    }

    /// Panics, showing stderr, unless the script exited with `code`.
    pub fn assert_exit(&self, code: i32) -> &Self {
        if self.code != Some(code) || self.killed_at_deadline {
            panic!(
                "{}: exit {:?} (killed at deadline: {}), want {code}; stdout {:?}; stderr:\n{}",
                self.label, self.code, self.killed_at_deadline, self.lines, self.stderr
            );
        }
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence checks

/// What a run of sequence numbers looks like against the expected range. Duplicates are normal
/// (a redelivery after a reconnect: paho re-sends with DUP=1, the hub redelivers what was not
/// acknowledged); loss and reordering are failures.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeqReport {
    /// Expected numbers never seen.
    pub missing: Vec<i64>,
    /// Numbers seen more than once, with their counts.
    pub duplicates: BTreeMap<i64, usize>,
    /// Numbers that arrived after a higher one had already arrived for the first time.
    pub out_of_order: Vec<i64>,
    /// Numbers outside the range.
    pub unexpected: Vec<i64>,
    /// Lines with no integer "seq".
    pub without_seq: usize,
}

impl SeqReport {
    /// Checks the "seq" of data lines (received messages or acknowledged sends).
    pub fn of(lines: &[Value], expected: Range<i64>) -> SeqReport {
        let seqs: Vec<Option<i64>> = lines
            .iter()
            .map(|v| v.get("seq").and_then(Value::as_i64))
            .collect();
        let mut r = SeqReport {
            without_seq: seqs.iter().filter(|s| s.is_none()).count(),
            ..Default::default()
        };
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        let mut highest: Option<i64> = None;
        for s in seqs.into_iter().flatten() {
            if !expected.contains(&s) {
                r.unexpected.push(s);
                continue;
            }
            let c = counts.entry(s).or_insert(0);
            *c += 1;
            if *c == 1 {
                if matches!(highest, Some(h) if s < h) {
                    r.out_of_order.push(s);
                }
                highest = Some(highest.map_or(s, |h| h.max(s)));
            }
        }
        r.missing = expected.filter(|s| !counts.contains_key(s)).collect();
        r.duplicates = counts.into_iter().filter(|(_, c)| *c > 1).collect();
        r
    }

    /// Panics on loss, reordering, numbers out of range or lines without seq; duplicates pass.
    pub fn assert_no_loss_no_reorder(&self) {
        if !self.missing.is_empty()
            || !self.out_of_order.is_empty()
            || !self.unexpected.is_empty()
            || self.without_seq > 0
        {
            panic!("sequence broken: {self:?}");
        }
    }
}
