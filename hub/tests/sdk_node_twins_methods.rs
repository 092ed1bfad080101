//! Module twins and direct methods (issue 16) with the official Node SDK (azure-iot-device
//! 1.18.4) as the module, over MQTT and over AMQP (azure-iot-device-amqp 1.14.4: the twin
//! links on `/devices/{d}/modules/{m}/twin`, the method links on `…/methods/deviceBound`):
//! `getTwin` answers the manifest's desired properties, `twin.properties.reported.update`
//! then `twin.get()` shows the patch merged, `twin.on('properties.desired')` fires after a
//! manifest reload, and `onMethod` answers a Python `invoke_method` caller (200 with the
//! payload).
//!
//! Every wait is on an event: a line a module printed; deadlines only bound a failure. Each
//! test runs its own hub in its own network namespace (tests/sdk/README.md); they need root and
//! the SDKs (`scripts/install-sdks.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use std::path::Path;

use sdk::{Proc, Script, Sdk};
use sdk_hub::{secs, SdkHub};
use serde_json::{json, Value};
use testhub::{TestHub, DEVICE_ID, GATEWAY};

/// The built-in manifest (modules `sender`, `receiver`) with `desired` as `receiver`'s desired
/// properties.
fn manifest(desired: Value) -> String {
    let mut m: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    m["modulesContent"]["receiver"] = json!({ "properties.desired": desired });
    serde_json::to_string_pretty(&m).expect("json")
}

/// Replaces `path` atomically, as configuration tools do (the hub's watch reloads it).
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The next line of `proc` with `event`, or a panic with what it and the hub said.
fn event(proc: &mut Proc, hub: &SdkHub, wanted: impl Fn(&Value) -> bool, what: &str) -> Value {
    proc.read_until(secs(60), wanted).unwrap_or_else(|| {
        panic!(
            "no {what}: {:?}\nstderr: {}\nhub log:\n{}",
            proc.seen(),
            proc.stderr(),
            hub.log()
        )
    })
}

/// twin.js as `receiver` over `transport`: the manifest's desired properties from getTwin,
/// two reported patches merged (null deletes) as a later get shows, counted under edgeHub's
/// names; then, listening, the desired patch a manifest reload sends.
fn twin_round(transport: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(json!({"rate": 5, "mode": "fast"}))).expect("write");
    let hub = SdkHub::start(TestHub::new().manifest_at(path.clone()), &["receiver"]);
    let mut module = hub
        .module(Sdk::Node, Script::Twin, "receiver")
        .args(["--transport", transport, "--listen", "--timeout", "150"])
        .args(["--step", r#"patch:{"a": 1, "b": {"c": 2}}"#])
        .args(["--step", r#"patch:{"a": null, "b": {"d": 3}}"#])
        .args(["--step", "get"])
        .spawn();
    let first = event(&mut module, &hub, |v| v["event"] == "twin", "twin");
    assert_eq!(
        first["twin"],
        json!({"desired": {"rate": 5, "mode": "fast", "$version": 2}, "reported": {"$version": 1}})
    );
    let again = event(&mut module, &hub, |v| v["event"] == "twin", "second twin");
    assert_eq!(
        again["twin"]["reported"],
        json!({"b": {"c": 2, "d": 3}, "$version": 3}),
        "{again}"
    );
    event(&mut module, &hub, |v| v["event"] == "ready", "ready");

    write_atomically(&path, &manifest(json!({"rate": 6, "extra": {"x": 1}})));
    let patch = event(
        &mut module,
        &hub,
        |v| v["event"] == "desired_patch" && v["patch"]["$version"] == 3,
        "desired patch with $version 3",
    );
    assert_eq!(
        patch["patch"],
        json!({"rate": 6, "mode": null, "extra": {"x": 1}, "$version": 3})
    );
    if transport == "amqp" {
        // The SDK went through the AMQP twin links, not some fallback.
        assert!(
            !hub.log_lines("twin answer link attached").is_empty(),
            "{}",
            hub.log()
        );
    }
    let id = "id=\"edge-device/receiver\"";
    assert_eq!(hub.metric(&["edgehub_gettwin_total{", id]), Some(2.0));
    assert_eq!(
        hub.metric(&["edgehub_reported_properties_total{", id]),
        Some(2.0)
    );
}

#[test]
fn node_twin_over_mqtt_get_reported_update_and_desired_after_reload() {
    twin_round("mqtt");
}

#[test]
fn node_twin_over_amqp_get_reported_update_and_desired_after_reload() {
    twin_round("amqp");
}

/// method.js as `receiver` over `transport` serves `doThing`; `sender` (Python) calls it with
/// `invoke_method`, giving it a connect timeout so the call waits for the target's method
/// subscription or links instead of racing them: 200 with the target's status and payload,
/// the request's payload intact.
fn method_round(transport: &str) {
    let hub = SdkHub::start(
        TestHub::new().run_args(&["--methods-addr", &format!("{GATEWAY}:443")]),
        &["receiver"],
    );
    let mut target = hub
        .module(Sdk::Node, Script::Method, "receiver")
        .args([
            "--transport",
            transport,
            "--method",
            "doThing",
            "--status",
            "201",
        ])
        .args(["--count", "1", "--timeout", "120"])
        .spawn();
    target.expect_event("ready", secs(60));
    let payload = json!({"n": 7, "text": "héllo", "list": [1, 2, 3]});
    let out = hub
        .edge_module(Sdk::Python, Script::Method, "sender")
        .args(["invoke", "--device", DEVICE_ID, "--module", "receiver"])
        .args(["--method", "doThing", "--payload", &payload.to_string()])
        .args(["--connect-timeout-s", "30", "--timeout", "90"])
        .run(secs(120));
    assert_eq!(
        out.code,
        Some(sdk::EXIT_OK),
        "invoke_method: {}\nhub log:\n{}",
        out.stderr,
        hub.log()
    );
    let result = out.data().into_iter().next().expect("a result line");
    assert_eq!(
        result["ok"],
        true,
        "{result}\ntarget: {:?} {}\nhub log:\n{}",
        target.seen(),
        target.stderr(),
        hub.log()
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
    if transport == "amqp" {
        assert!(
            !hub.log_lines("method request link attached").is_empty(),
            "{}",
            hub.log()
        );
    }
}

#[test]
fn node_on_method_over_mqtt_answers_a_python_invoke_method() {
    method_round("mqtt");
}

#[test]
fn node_on_method_over_amqp_answers_a_python_invoke_method() {
    method_round("amqp");
}
