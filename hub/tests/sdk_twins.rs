//! Module twins (issue 16) against the hub binary with the official Python SDK
//! (azure-iot-device 2.14.0, MQTT) as the module: `get_twin` answers the manifest's desired
//! properties, `patch_twin_reported_properties` merges (null deletes) and survives kill -9 of
//! the hub, and `on_twin_desired_properties_patch_received` fires after a manifest reload, and
//! for a module that was away, at its reconnect.
//!
//! Every wait is on an event: a line a module printed or a line of the hub's log; deadlines
//! only bound a failure. Each test runs its own hub in its own network namespace
//! (tests/sdk/README.md); they need root and the SDKs (`scripts/install-sdks.sh`).

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
use testhub::TestHub;

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

/// Runs twin.py as `receiver` with `steps` to the end; its event lines.
fn twin_steps(hub: &SdkHub, steps: &[&str]) -> Vec<Value> {
    let out = hub
        .module(Sdk::Python, Script::Twin, "receiver")
        .args(steps)
        .run(secs(60));
    assert_eq!(
        out.code,
        Some(0),
        "twin.py {steps:?}: {}\nhub log:\n{}",
        out.stderr,
        hub.log()
    );
    out.events("twin")
        .into_iter()
        .chain(out.events("patched"))
        .collect()
}

/// The twins twin.py printed, in order.
fn twins(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == "twin")
        .map(|e| e["twin"].clone())
        .collect()
}

/// The listener's desired patch with `$version` `version`: already printed, or waited for.
fn desired_patch(listener: &mut Proc, version: u64, hub: &SdkHub) -> Value {
    let wanted = |v: &Value| v["event"] == "desired_patch" && v["patch"]["$version"] == version;
    let seen = listener.seen().iter().find_map(|l| match l {
        sdk::Line::Json(v) if wanted(v) => Some(v.clone()),
        _ => None,
    });
    seen.or_else(|| listener.read_until(secs(60), wanted))
        .map(|v| v["patch"].clone())
        .unwrap_or_else(|| {
            panic!(
                "no desired patch with $version {version}: {:?}\nstderr: {}\nhub log:\n{}",
                listener.seen(),
                listener.stderr(),
                hub.log()
            )
        })
}

/// get_twin answers the manifest's desired properties (its `$version` kept); reported patches
/// merge, null deleting, one version each; the twin calls are counted under edgeHub's names.
#[test]
fn get_twin_serves_the_manifest_and_reported_patches_merge() {
    let desired = json!({"rate": 5, "mode": "fast", "$version": 4});
    let hub = SdkHub::start(TestHub::with_manifest(&manifest(desired)), &["receiver"]);
    let events = twin_steps(
        &hub,
        &[
            "get",
            r#"patch:{"a": 1, "b": {"c": 2}}"#,
            r#"patch:{"a": null, "b": {"d": 3}}"#,
            "get",
        ],
    );
    let twins = twins(&events);
    assert_eq!(twins.len(), 2, "{events:?}");
    assert_eq!(
        twins[0],
        json!({"desired": {"rate": 5, "mode": "fast", "$version": 4}, "reported": {"$version": 1}})
    );
    assert_eq!(
        twins[1]["reported"],
        json!({"b": {"c": 2, "d": 3}, "$version": 3})
    );
    let id = "id=\"edge-device/receiver\"";
    assert_eq!(hub.metric(&["edgehub_gettwin_total{", id]), Some(2.0));
    assert_eq!(
        hub.metric(&["edgehub_reported_properties_total{", id]),
        Some(2.0)
    );
}

/// What a patch's 204 acknowledged is on disk: after SIGKILL of the hub and a restart on the
/// same data directory, get_twin shows it.
#[test]
fn reported_properties_survive_kill_9_of_the_hub() {
    let mut hub = SdkHub::start(
        TestHub::with_manifest(&manifest(json!({"rate": 5}))),
        &["receiver"],
    );
    twin_steps(
        &hub,
        &[
            r#"patch:{"state": "running", "n": 1}"#,
            r#"patch:{"n": 2, "gone": null}"#,
        ],
    );
    hub.kill();
    hub.restart();
    let twins = twins(&twin_steps(&hub, &["get"]));
    assert_eq!(
        twins,
        vec![json!({
            "desired": {"rate": 5, "$version": 2},
            "reported": {"state": "running", "n": 2, "$version": 3}
        })]
    );
}

/// on_twin_desired_properties_patch_received fires after a manifest reload with the changed
/// members (removed ones as null) and the new `$version`. A module that was away while the
/// desired properties changed (here: the hub killed, the manifest changed, the hub restarted)
/// gets them when it reconnects: the hub sends the difference when its subscription comes
/// back, and the SDK GETs the twin on every reconnect and hands newer desired properties to the
/// same handler.
#[test]
fn the_desired_patch_handler_fires_after_a_reload_and_after_a_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(json!({"rate": 5, "mode": "fast"}))).expect("write");
    let mut hub = SdkHub::start(TestHub::new().manifest_at(path.clone()), &["receiver"]);

    // A module reads its twin at start, then listens (the SDK GETs by itself only on a
    // reconnect).
    let mut listener = hub
        .module(Sdk::Python, Script::Twin, "receiver")
        .args(["--listen", "--timeout", "150", "get"])
        .spawn();
    let twin = listener.expect_event("twin", secs(60));
    assert_eq!(
        twin["twin"]["desired"],
        json!({"rate": 5, "mode": "fast", "$version": 2})
    );
    listener.expect_event("ready", secs(60));

    write_atomically(&path, &manifest(json!({"rate": 6, "extra": {"x": 1}})));
    let patch = desired_patch(&mut listener, 3, &hub);
    assert_eq!(
        patch,
        json!({"rate": 6, "mode": null, "extra": {"x": 1}, "$version": 3})
    );

    // Away while the desired properties change: back, the module has them.
    hub.kill();
    write_atomically(&path, &manifest(json!({"rate": 7, "extra": {"x": 1}})));
    hub.restart();
    // The hub sends the difference when the module's subscription comes back, and the SDK
    // also GETs (whichever comes first reaches the handler): either way, applied to what the
    // module had, it gives the new desired properties.
    let missed = desired_patch(&mut listener, 4, &hub);
    let mut had = json!({"rate": 6, "extra": {"x": 1}, "$version": 3});
    merge_patch(&mut had, &missed);
    assert_eq!(had, json!({"rate": 7, "extra": {"x": 1}, "$version": 4}));
}

/// Applies `patch` to `doc` as a JSON merge patch (RFC 7396: `null` removes).
fn merge_patch(doc: &mut Value, patch: &Value) {
    let (Some(doc), Some(patch)) = (doc.as_object_mut(), patch.as_object()) else {
        *doc = patch.clone();
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            doc.remove(k);
        } else if v.is_object() && doc.get(k).is_some_and(Value::is_object) {
            merge_patch(doc.get_mut(k).expect("checked"), v);
        } else {
            doc.insert(k.clone(), v.clone());
        }
    }
}
