//! One fixture for the SDK suites: a hub binary in a network namespace of the test's own, with
//! the SDKs, the modules' connection strings and the CA its modules trust.
//!
//! Include it after the SDK harness and the hub configuration:
//!
//! ```ignore
//! #[path = "support/sdk.rs"] mod sdk;
//! #[path = "support/hub.rs"] mod testhub;
//! #[path = "support/sdk_hub.rs"] mod sdk_hub;
//! let hub = sdk_hub::SdkHub::start(testhub::TestHub::new(), &["sender", "receiver"]);
//! let rx = hub.module(Sdk::Python, Script::Receive, "receiver").args([..]).spawn();
//! ```
//!
//! Connection strings are made (with `edgehub connection-string`) before the hub starts, for
//! the modules named at start; [`SdkHub::cs`] returns them. Restarting is [`SdkHub::kill`] or
//! [`SdkHub::terminate`], then [`SdkHub::restart`] on the same data directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::sdk::{EdgeEnv, ModuleCmd, NetNs, Proc, Script, Sdk, SdkEnv};
use crate::testhub::{self, TestHub};

/// `s` seconds.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A running (or stopped) hub in its own namespace, and what its modules need.
#[derive(Debug)]
pub struct SdkHub {
    // Dropped in this order: the hub process, its data directory, then the namespace.
    proc: Option<Proc>,
    connection_strings: BTreeMap<String, String>,
    /// The CA the modules trust (`edgehub ca-path`).
    pub ca: PathBuf,
    /// The hub's configuration and data directory.
    pub config: TestHub,
    /// The namespace the hub and every module run in.
    pub ns: NetNs,
    /// The installed SDKs.
    pub env: SdkEnv,
}

impl SdkHub {
    /// Requires the SDKs, makes a namespace and the connection strings of `modules`, starts
    /// the hub of `config` in the namespace and waits until it is ready.
    pub fn start(config: TestHub, modules: &[&str]) -> SdkHub {
        let mut hub = SdkHub::prepare(config, modules);
        hub.restart();
        hub
    }

    /// [`SdkHub::start`] without starting the hub (for a test that starts it itself, e.g. to
    /// see it refuse to start).
    pub fn prepare(config: TestHub, modules: &[&str]) -> SdkHub {
        let env = SdkEnv::require();
        let ns = NetNs::new();
        let connection_strings = modules
            .iter()
            .map(|m| ((*m).to_owned(), config.connection_string(m)))
            .collect();
        let ca = config.ca_path();
        SdkHub {
            proc: None,
            connection_strings,
            ca,
            config,
            ns,
            env,
        }
    }

    /// Starts the hub again (after [`SdkHub::kill`] or [`SdkHub::terminate`], or the first
    /// time after [`SdkHub::prepare`]) and waits until it is ready.
    pub fn restart(&mut self) {
        self.proc = Some(self.config.start(&self.ns));
    }

    /// The connection string of `module`, made before the hub started.
    pub fn cs(&self, module: &str) -> &str {
        self.connection_strings
            .get(module)
            .unwrap_or_else(|| panic!("no connection string made for {module}"))
    }

    /// An SDK script as `module` (its connection string, the CA), inside the namespace.
    pub fn module(&self, sdk: Sdk, script: Script, module: &str) -> ModuleCmd {
        self.module_with(sdk, script, self.cs(module))
    }

    /// `script` of `sdk` as `module` from exactly the module environment IoT Edge gives
    /// ([`ModuleCmd::edge_env`]; it calls methods over HTTPS to port 443 of its gateway host).
    pub fn edge_module(&self, sdk: Sdk, script: Script, module: &str) -> ModuleCmd {
        self.ns
            .module(&self.env, sdk, script, "", Path::new(""))
            .edge_env(EdgeEnv {
                connection_string: self.config.connection_string(module),
                ca: &self.ca,
                iothub_hostname: testhub::IOTHUB_HOSTNAME,
                device: testhub::DEVICE_ID,
                module,
                gateway: testhub::GATEWAY,
            })
    }

    /// An SDK script with connection string `cs` (e.g. one with a wrong key).
    pub fn module_with(&self, sdk: Sdk, script: Script, cs: &str) -> ModuleCmd {
        self.ns.module(&self.env, sdk, script, cs, &self.ca)
    }

    /// The hub process.
    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("the hub was started")
    }

    /// The hub process, mutably.
    pub fn proc_mut(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("the hub was started")
    }

    /// The hub's log so far.
    pub fn log(&self) -> String {
        self.proc().stderr()
    }

    /// Waits (woken by every new piece of the log) until the hub's log contains `needle`;
    /// panics with the log after `within` (a failure bound).
    pub fn await_log(&self, needle: &str, within: Duration) {
        assert!(
            self.proc().wait_stderr(within, |log| log.contains(needle)),
            "the hub never logged {needle:?} within {within:?}:\n{}",
            self.log()
        );
    }

    /// The hub's log lines that mention `needle`.
    pub fn log_lines(&self, needle: &str) -> String {
        testhub::log_lines(self.proc(), needle)
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> String {
        testhub::metrics(&self.ns)
    }

    /// The value of the first metric line with all `parts`.
    pub fn metric(&self, parts: &[&str]) -> Option<f64> {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// The message counters, for failure messages.
    pub fn counters(&self) -> String {
        testhub::message_counters(&self.ns)
    }

    /// SIGKILL (a crash); [`SdkHub::restart`] starts it again.
    pub fn kill(&mut self) {
        self.proc_mut().kill();
    }

    /// SIGTERM, waiting up to `within` for it to exit (SIGKILL after that).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.proc_mut().terminate(within)
    }

    /// The hub's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir()
    }

    /// The CA path.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// tests/sdk/node/amqp_probe.js (raw rhea) as `module` with `args`, in the hub's namespace.
    pub fn amqp_probe(&self, module: &str, args: &[&str]) -> Proc {
        let env = &self.env;
        let mut cmd = std::process::Command::new(&env.node);
        cmd.arg(env.scripts.join("node/amqp_probe.js"))
            .args(args)
            .env("EDGEHUB_CS", self.cs(module))
            .env("EDGEHUB_CA", self.ca())
            .env("EDGEHUB_SDK_DIR", &env.dir);
        self.ns.spawn(&mut cmd)
    }
}
