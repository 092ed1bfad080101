//! Direct methods module → module with the official Python SDK, unmodified, built from the
//! module environment IoT Edge (or the Kubernetes controller) gives (`EdgeHubConnectionString`
//! and `EdgeModuleCACertificateFile`): the caller's `invoke_method` goes over HTTPS to port 443
//! of its `GatewayHostName`, the target answers with `on_method_request_received` +
//! `send_method_response` over MQTT.
//!
//! Each test runs in its own network namespace, so the hub listens on 127.0.0.1:443 there
//! (`--methods-addr`), where the SDK dials. Needs root and the SDKs (`scripts/install-sdks.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sdk::{NetNs, Proc, Script, Sdk, SdkEnv};
use serde_json::{json, Value};
use testhub::{TestHub, DEVICE_ID, GATEWAY, IOTHUB_HOSTNAME};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A hub with the built-in modules (`sender`, `receiver`) and `absent` (declared, never
/// connected), serving direct methods on 443 in its own namespace.
struct Setup {
    env: SdkEnv,
    ns: NetNs,
    hub: TestHub,
    ca: PathBuf,
    proc: Proc,
}

impl Setup {
    fn start() -> Setup {
        let env = SdkEnv::require();
        let ns = NetNs::new();
        let hub = TestHub::new()
            .module("absent")
            .run_args(&["--methods-addr", &format!("{GATEWAY}:443")]);
        let ca = hub.ca_path();
        let proc = hub.start(&ns);
        Setup {
            env,
            ns,
            hub,
            ca,
            proc,
        }
    }

    /// method.py as module `module`, from exactly the module environment (no EDGEHUB_CS).
    fn module(&self, module: &str) -> sdk::ModuleCmd {
        self.ns
            .module(&self.env, Sdk::Python, Script::Method, "", Path::new(""))
            .edge_env(sdk::EdgeEnv {
                connection_string: self.hub.connection_string(module),
                ca: &self.ca,
                iothub_hostname: IOTHUB_HOSTNAME,
                device: DEVICE_ID,
                module,
                gateway: GATEWAY,
            })
    }

    /// `receiver` serving methods (handler set, so subscribed) with `extra` options.
    fn target(&self, extra: &[&str]) -> Proc {
        let mut target = self
            .module("receiver")
            .args(["serve", "--timeout", "120"])
            .args(extra)
            .spawn();
        target.expect_event("ready", secs(60));
        target
    }

    /// `sender` invoking `method` on `module` with `payload`; its one data line.
    fn invoke(&self, module: &str, method: &str, payload: Value, extra: &[&str]) -> Value {
        let out = self
            .module("sender")
            .args(["invoke", "--device", DEVICE_ID, "--module", module])
            .args(["--method", method, "--payload", &payload.to_string()])
            .args(["--timeout", "60"])
            .args(extra)
            .run(secs(90));
        if out.code != Some(sdk::EXIT_OK) {
            panic!(
                "invoke_method: exit {:?}\n{}\nhub log:\n{}",
                out.code,
                out.stderr,
                self.proc.stderr()
            );
        }
        out.data()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no result line: {}", out.stderr))
    }

    /// The value of the `edgehub_direct_methods_total` series from `sender` to `to`.
    fn methods_total(&self, to: &str) -> Option<String> {
        let needle = format!("from=\"{DEVICE_ID}/sender\"");
        let to = format!("to=\"{DEVICE_ID}/{to}\"");
        testhub::metrics(&self.ns)
            .lines()
            .find(|l| {
                l.starts_with("edgehub_direct_methods_total{")
                    && l.contains(&needle)
                    && l.contains(&to)
            })
            .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
    }
}

/// `invoke_method` from one module to another answers 200 with the target's status and
/// payload (the request's payload echoed by the target: it went through intact), and a
/// declared module that is not connected is 404 at once (connect timeout 0). Counted in
/// `edgehub_direct_methods_total`.
#[test]
fn python_invoke_method_reaches_another_module_and_a_module_not_connected_is_404() {
    let setup = Setup::start();
    let mut target = setup.target(&["--status", "201"]);
    let payload = json!({"n": 7, "text": "héllo", "list": [1, 2, 3]});
    let result = setup.invoke("receiver", "doThing", payload.clone(), &[]);
    assert_eq!(
        result["ok"],
        true,
        "{result}\nhub log:\n{}",
        setup.proc.stderr()
    );
    assert_eq!(
        result["response"],
        json!({
            "status": 201,
            "payload": {"echo": payload, "by": "receiver", "method": "doThing"}
        }),
        "{result}"
    );
    let request = target.data_lines(1, secs(30));
    assert_eq!(request[0]["name"], "doThing");
    assert_eq!(request[0]["payload"], payload);

    let absent = setup.invoke("absent", "doThing", json!(null), &[]);
    assert_eq!(absent["ok"], false, "{absent}");
    assert_eq!(absent["status"], 404, "{absent}");

    assert_eq!(setup.methods_total("receiver").as_deref(), Some("1"));
    assert_eq!(setup.methods_total("absent").as_deref(), Some("1"));
    drop(target);
    let mut proc = setup.proc;
    proc.terminate(secs(30));
}

/// A target that receives the request and never answers: `invoke_method` with
/// `responseTimeoutInSeconds` 5 (the protocol's minimum) gets 504; the target did get it.
#[test]
fn python_invoke_method_on_a_module_that_does_not_answer_is_504() {
    let setup = Setup::start();
    let mut target = setup.target(&["--no-answer"]);
    let result = setup.invoke(
        "receiver",
        "slow",
        json!("wait"),
        &["--response-timeout", "5"],
    );
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["status"], 504, "{result}");
    let request = target.data_lines(1, secs(30));
    assert_eq!(request[0]["name"], "slow");
    drop(target);
    let mut proc = setup.proc;
    proc.terminate(secs(30));
}
