//! The module environment the Kubernetes controller gives a module (k8s-design.md, "A module
//! container"): `EdgeHubConnectionString`, `EdgeModuleCACertificateFile` (the trust bundle),
//! `IOTEDGE_IOTHUBHOSTNAME`, `IOTEDGE_DEVICEID`, `IOTEDGE_MODULEID`, `IOTEDGE_GATEWAYHOSTNAME`,
//! `IOTEDGE_AUTHSCHEME=sasToken`, `IOTEDGE_MODULEGENERATIONID`, and **no**
//! `IOTEDGE_WORKLOADURI`. The official SDKs, unmodified, build their clients from exactly that
//! (Python `create_from_edge_environment()`, Node `ModuleClient.fromEnvironment`) and send
//! through a hub serving the controller's certificate files (`--tls-cert`/`--tls-key`/
//! `--tls-ca`).
//!
//! Why no workload URI: Python 2.14 takes the `IOTEDGE_*` path (signing and the trust bundle
//! through the workload API) only when all seven `IOTEDGE_*` variables it reads are set, the
//! workload URI and `IOTEDGE_APIVERSION` included; with one missing it uses
//! `EdgeHubConnectionString` + `EdgeModuleCACertificateFile`. Node uses
//! `EdgeHubConnectionString` whenever it is set. The last test pins where that line is.
//!
//! Needs root (network namespaces) and the SDKs (`scripts/install-sdks.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/certs.rs"]
mod certs;
#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::path::Path;
use std::time::Duration;

use certs::{Ca, SecretDir};
use sdk::{NetNs, Script, Sdk, SdkEnv, SeqReport};
use testhub::{TestHub, DEVICE_ID, GATEWAY, IOTHUB_HOSTNAME};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Exactly the environment the controller gives module `module` (k8s-design.md), with the
/// trust bundle at `ca`.
fn module_env(connection_string: &str, ca: &Path, module: &str) -> Vec<(&'static str, String)> {
    vec![
        ("EdgeHubConnectionString", connection_string.to_owned()),
        ("EdgeModuleCACertificateFile", ca.display().to_string()),
        ("IOTEDGE_IOTHUBHOSTNAME", IOTHUB_HOSTNAME.to_owned()),
        ("IOTEDGE_DEVICEID", DEVICE_ID.to_owned()),
        ("IOTEDGE_MODULEID", module.to_owned()),
        ("IOTEDGE_GATEWAYHOSTNAME", GATEWAY.to_owned()),
        ("IOTEDGE_AUTHSCHEME", "sasToken".to_owned()),
        ("IOTEDGE_MODULEGENERATIONID", "edgehub-gen-1".to_owned()),
    ]
}

/// Every variable an SDK could read to find its credentials, besides [`module_env`]'s.
const OTHER_VARS: [&str; 5] = [
    "EDGEHUB_CS",
    "EDGEHUB_CA",
    "IOTEDGE_WORKLOADURI",
    "IOTEDGE_APIVERSION",
    "IotHubConnectionString",
];

/// A hub serving certificate files as the controller mounts them, in its own namespace.
struct Setup {
    _dir: tempfile::TempDir,
    secret: SecretDir,
    hub: TestHub,
    ns: NetNs,
    env: SdkEnv,
}

impl Setup {
    fn new() -> Setup {
        let env = SdkEnv::require();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("edgehub test CA");
        let secret = SecretDir::new(dir.path().join("tls"));
        secret.publish(&ca.issue(&[GATEWAY, "localhost"]).files(&ca));
        let (cert, key, ca_file) = (secret.cert(), secret.key(), secret.ca());
        let hub = TestHub::new().run_args(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca_file.to_str().unwrap(),
        ]);
        Setup {
            _dir: dir,
            secret,
            hub,
            ns: NetNs::new(),
            env,
        }
    }

    /// `script` of `sdk` run as module `module` with `--edge-env`, the environment
    /// [`module_env`] plus `extra`, and nothing else that names credentials.
    fn edge_module(
        &self,
        sdk: Sdk,
        script: Script,
        module: &str,
        extra: &[(&str, &str)],
    ) -> sdk::ModuleCmd {
        let cs = self.hub.connection_string(module);
        let mut cmd = self
            .ns
            .module(&self.env, sdk, script, "", Path::new(""))
            .args(["--edge-env"]);
        for var in OTHER_VARS {
            cmd = cmd.env_remove(var);
        }
        for (k, v) in module_env(&cs, &self.secret.ca(), module) {
            cmd = cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd = cmd.env(k, v);
        }
        cmd
    }
}

/// Both SDKs build their clients from exactly the controller's module environment (no
/// workload URI), connect to the hub over its given certificate, and send; a receiver gets
/// every message of each, in order, intact.
#[test]
fn both_sdks_send_from_exactly_the_controllers_module_environment() {
    const N: i64 = 20;
    let setup = Setup::new();
    let mut hub = setup.hub.start(&setup.ns);
    let mut rx = setup
        .ns
        .module(
            &setup.env,
            Sdk::Python,
            Script::Receive,
            &setup.hub.connection_string("receiver"),
            &setup.secret.ca(),
        )
        .args(["--timeout", "120"])
        .spawn();
    rx.expect_event("ready", secs(30));
    for (i, sdk) in Sdk::ALL.into_iter().enumerate() {
        let run = format!("{}-env", sdk.name());
        let sent = setup
            .edge_module(sdk, Script::Send, "sender", &[])
            .args(["--output", "out1", "--run", &run, "--count", &N.to_string()])
            .args(["--timeout", "60"])
            .args(testhub::prop_args())
            .run(secs(90));
        if sent.code != Some(sdk::EXIT_OK) {
            panic!(
                "{} from the module environment: exit {:?}\n{}\nhub log:\n{}",
                sdk.name(),
                sent.code,
                sent.stderr,
                hub.stderr()
            );
        }
        let connected = sent.events("connected");
        assert_eq!(
            connected[0]["module_id"],
            "sender",
            "{}: {connected:?}",
            sdk.name()
        );
        SeqReport::of(&sent.data(), 0..N).assert_no_loss_no_reorder();
        let all = rx.data_lines((i + 1) * N as usize, secs(60));
        let got = &all[i * N as usize..];
        SeqReport::of(got, 0..N).assert_no_loss_no_reorder();
        for m in got {
            testhub::assert_intact(m, &run, "sender", "input1");
        }
    }
    hub.terminate(secs(30));
}

/// Where the line is: Python signs through the workload API once `IOTEDGE_WORKLOADURI` and
/// `IOTEDGE_APIVERSION` are set too (here a socket that does not exist: it fails before
/// dialling the hub); with the workload URI alone it still uses the
/// connection string; Node uses the connection string even with both.
#[test]
fn python_turns_to_the_workload_api_only_with_all_seven_iotedge_variables() {
    let setup = Setup::new();
    let mut hub = setup.hub.start(&setup.ns);
    let uri = "unix:///var/run/iotedge/workload.sock";
    let connect = |sdk: Sdk, extra: &[(&str, &str)]| {
        setup
            .edge_module(sdk, Script::ConnectOnly, "sender", extra)
            .args(["--timeout", "30", "--no-retry"])
            .run(secs(60))
    };
    let all_seven = [
        ("IOTEDGE_WORKLOADURI", uri),
        ("IOTEDGE_APIVERSION", "2019-11-05"),
    ];
    let python = connect(Sdk::Python, &all_seven);
    assert_eq!(python.code, Some(sdk::EXIT_USAGE), "{}", python.stderr);
    // It dialled the workload socket (which does not exist here) instead of the hub.
    assert!(
        python
            .stderr
            .contains("create_from_edge_environment() failed")
            && python.stderr.contains("No such file or directory"),
        "Python with all seven IOTEDGE_* variables: {}",
        python.stderr
    );
    connect(Sdk::Python, &all_seven[..1]).assert_exit(sdk::EXIT_OK);
    connect(Sdk::Node, &all_seven).assert_exit(sdk::EXIT_OK);
    hub.terminate(secs(30));
}
