//! The `edgehub` binary as the SDK tests run it: a temporary data directory, an optional
//! manifest, started inside a test's network namespace on 127.0.0.1:8883 and waited for until it
//! logs that it is ready; connection strings and the CA from the CLI.
//!
//! Include it after the SDK harness (it uses [`crate::sdk`]):
//!
//! ```ignore
//! #[path = "support/sdk.rs"] mod sdk;
//! #[path = "support/hub.rs"] mod testhub;
//! let env = sdk::SdkEnv::require();
//! let ns = sdk::NetNs::new();
//! let hub = testhub::TestHub::new();            // built-in manifest: sender -> receiver/input1
//! let cs = hub.connection_string("sender");
//! let mut proc = hub.start(&ns);                // panics with the hub's log if not ready in time
//! ```
//!
//! Restarting is `proc.kill()` (SIGKILL: a crash) or `proc.terminate(..)`, then `hub.start(&ns)`
//! again on the same data directory.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sdk::{NetNs, Proc};

/// Where modules dial (the certificate names it; the SDKs' port is always 8883).
pub const GATEWAY: &str = "127.0.0.1";
/// The hub's IoT Hub host name (the CLI's default), as connection strings carry it.
pub const IOTHUB_HOSTNAME: &str = "edgehub.local";
/// The hub's device id (the CLI's default).
pub const DEVICE_ID: &str = "edge-device";
/// The metrics and health listener inside the namespace.
pub const METRICS_PORT: u16 = 9600;
/// How long a start may take before the test fails (store recovery included): a failure bound
/// for a loaded CI machine, never what a passing test waits for.
pub const START_WITHIN: Duration = Duration::from_secs(60);

/// A hub configuration with its own temporary data directory.
#[derive(Debug)]
pub struct TestHub {
    dir: tempfile::TempDir,
    manifest: Option<PathBuf>,
    modules: Vec<String>,
    extra: Vec<OsString>,
}

impl Default for TestHub {
    fn default() -> Self {
        TestHub::new()
    }
}

impl TestHub {
    /// The built-in manifest (modules `sender` and `receiver`, `sender` outputs to
    /// `receiver`'s `input1`).
    pub fn new() -> TestHub {
        TestHub {
            dir: tempfile::tempdir().expect("temporary directory for the hub"),
            manifest: None,
            modules: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// A deployment manifest given as JSON text (written next to the data directory).
    pub fn with_manifest(json: &str) -> TestHub {
        let mut hub = TestHub::new();
        let path = hub.dir.path().join("manifest.json");
        std::fs::write(&path, json).expect("write the manifest");
        hub.manifest = Some(path);
        hub
    }

    /// Runs on the manifest at `path` (`--manifest PATH`), which the test may change while
    /// the hub runs.
    pub fn manifest_at(mut self, path: PathBuf) -> TestHub {
        self.manifest = Some(path);
        self
    }

    /// Declares one more module (`--module NAME`).
    pub fn module(mut self, name: &str) -> TestHub {
        self.modules.push(name.to_owned());
        self
    }

    /// More `edgehub run` arguments (e.g. `--max-connections 1`), given at every start.
    pub fn run_args(mut self, args: &[&str]) -> TestHub {
        self.extra.extend(args.iter().map(OsString::from));
        self
    }

    /// The data directory (kept across restarts, removed when the `TestHub` is dropped).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the hub is and which modules it has: `run` and `connection-string` take these.
    fn identity_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "--data-dir".into(),
            self.data_dir().into(),
            "--gateway-hostname".into(),
            GATEWAY.into(),
            "--iothub-hostname".into(),
            IOTHUB_HOSTNAME.into(),
            "--device-id".into(),
            DEVICE_ID.into(),
        ];
        if let Some(m) = &self.manifest {
            a.push("--manifest".into());
            a.push(m.into());
        }
        for m in &self.modules {
            a.push("--module".into());
            a.push(m.into());
        }
        a
    }

    fn args(&self) -> Vec<OsString> {
        let mut a = self.identity_args();
        a.extend([
            "--mqtt-addr".into(),
            format!("{GATEWAY}:8883").into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{METRICS_PORT}").into(),
        ]);
        // A log filter for diagnosing a failing test (e.g. `debug`), else the hub's default.
        if let Some(filter) = std::env::var_os("EDGEHUB_TEST_HUB_LOG") {
            a.push("--log".into());
            a.push(filter);
        }
        a
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_edgehub"));
        for var in [
            "RUST_LOG",
            "EDGEHUB_DATA_DIR",
            "EDGEHUB_MANIFEST",
            "EDGEHUB_MODULES",
            "EDGEHUB_DEVICE_ID",
            "EDGEHUB_IOTHUB_HOSTNAME",
            "EDGEHUB_GATEWAY_HOSTNAME",
            "EDGEHUB_HOSTNAMES",
            "EDGEHUB_MQTT_ADDR",
            "EDGEHUB_METRICS_ADDR",
            "EDGEHUB_PLAIN_MQTT_ADDR",
            "EDGEHUB_MAX_CONNECTIONS",
            "EDGEHUB_MAX_UNAUTHENTICATED",
            "EDGEHUB_AUTH_TIMEOUT",
            "EDGEHUB_LOG",
            "EDGEHUB_LOG_FORMAT",
        ] {
            c.env_remove(var);
        }
        c
    }

    fn cli(&self, args: &[&str], more: Vec<OsString>) -> String {
        let out = self
            .command()
            .args(args)
            .args(more)
            .stdin(Stdio::null())
            .output()
            .expect("run edgehub");
        assert!(
            out.status.success(),
            "edgehub {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// `edgehub connection-string MODULE` (GatewayHostName=127.0.0.1).
    pub fn connection_string(&self, module: &str) -> String {
        let cs = self.cli(&["connection-string", module], self.identity_args());
        assert!(cs.contains(&format!("ModuleId={module};")), "{cs}");
        cs
    }

    /// `edgehub ca-path`: the PEM the SDKs must trust.
    pub fn ca_path(&self) -> PathBuf {
        PathBuf::from(self.cli(
            &["ca-path"],
            vec!["--data-dir".into(), self.data_dir().into()],
        ))
    }

    /// Starts `edgehub run` inside `ns` and waits until it is ready: its "edgehub ready" log
    /// line, written once every listener is bound and `/readyz` answers 200 (or, when
    /// `EDGEHUB_TEST_HUB_LOG` may hide that line, `/readyz` itself). Panics with the hub's log
    /// if it exits first or is not ready within [`START_WITHIN`] (a failure bound only).
    pub fn start(&self, ns: &NetNs) -> Proc {
        let mut cmd = self.command();
        cmd.arg("run").args(self.args()).args(&self.extra);
        let mut hub = ns.spawn(&mut cmd);
        let deadline = Instant::now() + START_WITHIN;
        let custom_log = std::env::var_os("EDGEHUB_TEST_HUB_LOG").is_some();
        loop {
            // Woken by every new piece of the log; the slice only bounds how late an exit is
            // noticed.
            if hub.wait_stderr(Duration::from_secs(1), |log| log.contains(READY_LINE)) {
                return hub;
            }
            if hub.has_exited() {
                let outcome = hub.finish(Duration::from_secs(2));
                panic!(
                    "the hub exited before it was ready ({:?}):\n{}",
                    outcome.code, outcome.stderr
                );
            }
            if custom_log && readyz(ns) {
                return hub;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the hub was not ready within {START_WITHIN:?}:\n{}",
                    hub.stderr()
                );
            }
        }
    }
}

/// What the hub logs once it is ready (`hub::server::run`).
pub const READY_LINE: &str = "edgehub ready";

/// One `GET /readyz` inside `ns`: true on a 200.
pub fn readyz(ns: &NetNs) -> bool {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT} || exit 1; \
         printf 'GET /readyz HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
         head -c 12 <&3"
    );
    ns.command("timeout")
        .args(["2", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).starts_with("HTTP/1.1 200"))
        .unwrap_or(false)
}

/// `GET /metrics` inside `ns` (the Prometheus text), for failure messages; empty on error.
pub fn metrics(ns: &NetNs) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT} || exit 1; \
         printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
         cat <&3"
    );
    ns.command("timeout")
        .args(["2", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The message counters of [`metrics`] (received, routed, sent, dropped by reason, queue
/// lengths): what a failure message needs to tell where messages went.
pub fn message_counters(ns: &NetNs) -> String {
    metrics(ns)
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("messages") || l.contains("queue")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `key=value` fields of a connection string.
pub fn cs_field<'a>(cs: &'a str, key: &str) -> &'a str {
    cs.split(';')
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {cs}"))
}

/// `cs` with its SharedAccessKey replaced.
pub fn with_key(cs: &str, key_b64: &str) -> String {
    cs.split(';')
        .map(|kv| {
            if kv.starts_with("SharedAccessKey=") {
                format!("SharedAccessKey={key_b64}")
            } else {
                kv.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The hub's stderr lines that mention `needle` (for failure messages).
pub fn log_lines(hub: &Proc, needle: &str) -> String {
    hub.stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Is `path` a PEM file (sanity check for the CA).
pub fn is_pem(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|s| s.contains("BEGIN CERTIFICATE"))
        .unwrap_or(false)
}

/// Custom properties every SDK test message carries (`--prop`), chosen to need
/// percent-encoding on the wire (space, `/`, `&`, `=`, non-ASCII).
pub const PROPS: [(&str, &str); 2] = [("note", "a b/c&d=e"), ("city", "Zürich")];

/// `--prop k=v` arguments for [`PROPS`].
pub fn prop_args() -> Vec<String> {
    PROPS
        .iter()
        .flat_map(|(k, v)| ["--prop".to_owned(), format!("{k}={v}")])
        .collect()
}

/// Asserts that a received message line (receive.py / receive.js) is the send.py / send.js
/// message `seq` of run `run` from module `sender`, sent with [`prop_args`] and the default
/// content type and encoding, routed to input `input`: message id, content type and
/// encoding, custom properties, connection device and module ids, and the body.
pub fn assert_intact(m: &serde_json::Value, run: &str, sender: &str, input: &str) {
    let seq = m["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer seq in {m}"));
    let want_body = format!("{{\"seq\":{seq},\"run\":\"{run}\"}}");
    let checks: [(&str, serde_json::Value, serde_json::Value); 9] = [
        ("input_name", m["input_name"].clone(), input.into()),
        (
            "message_id",
            m["message_id"].clone(),
            format!("{run}-{seq}").into(),
        ),
        (
            "content_type",
            m["content_type"].clone(),
            "application/json".into(),
        ),
        (
            "content_encoding",
            m["content_encoding"].clone(),
            "utf-8".into(),
        ),
        (
            "connection_device_id",
            m["connection_device_id"].clone(),
            DEVICE_ID.into(),
        ),
        (
            "connection_module_id",
            m["connection_module_id"].clone(),
            sender.into(),
        ),
        (
            "custom run",
            m["custom_properties"]["run"].clone(),
            run.into(),
        ),
        (
            "custom seq",
            m["custom_properties"]["seq"].clone(),
            seq.to_string().into(),
        ),
        ("data", m["data"].clone(), want_body.into()),
    ];
    for (what, got, want) in checks {
        assert_eq!(got, want, "{what} of a received message: {m}");
    }
    for (k, v) in PROPS {
        assert_eq!(m["custom_properties"][k], *v, "custom property {k}: {m}");
    }
    let props = m["custom_properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no custom_properties in {m}"));
    for k in props.keys() {
        let known = k == "run" || k == "seq" || PROPS.iter().any(|(p, _)| p == k);
        assert!(
            known || k.starts_with("$."),
            "custom property {k:?} that the sender never set: {m}"
        );
    }
}
