//! Who the hub lets in, and whose messages a module gets, with the official SDKs (and, where
//! the SDK cannot be made to send a bad credential, with paho-mqtt, the SDK's own MQTT
//! client, and a token the SDK's own signing code made).
//!
//! Each refusal is paired with the same client accepted with good credentials, so a hub (or
//! a test environment) that refuses everything fails too.
//!
//! Each test runs its own hub in its own network namespace (tests/sdk/README.md); they need
//! root and the SDKs (`scripts/install-sdks.sh`), and fail without them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use std::process::Command;

use base64::Engine as _;
use sdk::{Script, Sdk, SeqReport};
use sdk_hub::{secs, SdkHub};
use serde_json::Value;
use testhub::{TestHub, DEVICE_ID, IOTHUB_HOSTNAME};

/// connect_only with `--no-retry`, started now (finish it with [`expect_exit`]).
fn connect_only(hub: &SdkHub, which: Sdk, cs: &str) -> sdk::Proc {
    hub.module_with(which, Script::ConnectOnly, cs)
        .args(["--no-retry", "--timeout", "20"])
        .spawn()
}

fn expect_exit(p: sdk::Proc, code: i32, what: &str, hub: &SdkHub) {
    let out = p.finish(secs(30));
    if out.code != Some(code) || out.killed_at_deadline {
        panic!(
            "{what}: {} exited {:?}, want {code}; stdout {:?}; stderr:\n{}\nhub log:\n{}",
            out.label,
            out.code,
            out.lines,
            out.stderr,
            hub.log()
        );
    }
}

/// A module key that differs from `key_b64` in one bit (still 32 bytes of valid base64).
fn tampered(key_b64: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut key = b64.decode(key_b64).expect("base64 key");
    key[0] ^= 0x01;
    b64.encode(key)
}

/// paho-mqtt (the Python SDK's MQTT client) connecting with an explicit client id, username
/// and a SAS token built by the SDK's own `RenewableSasToken` (sr = the resource, signed with
/// the key, expiring `ttl` seconds from now: negative for one already expired). Prints
/// `{"rc": CONNACK return code}` or `{"closed": ...}` when the hub hung up first.
const RAW_CONNECT: &str = r#"
import json, os, sys, threading
import paho.mqtt.client as mqtt
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
e = os.environ
token = RenewableSasToken(e["RAW_SR"], SymmetricKeySigningMechanism(e["RAW_KEY"]), ttl=int(e["RAW_TTL"]))
c = mqtt.Client(client_id=e["RAW_CLIENT_ID"], clean_session=False, protocol=mqtt.MQTTv311)
c.username_pw_set(e["RAW_USERNAME"], str(token))
c.tls_set(ca_certs=e["EDGEHUB_CA"])
done, res = threading.Event(), {}
def on_connect(cl, u, flags, rc):
    res.setdefault("rc", rc); done.set()
def on_disconnect(cl, u, rc):
    res.setdefault("closed", rc); done.set()
c.on_connect, c.on_disconnect = on_connect, on_disconnect
try:
    c.connect("127.0.0.1", 8883, 60)
except Exception as ex:
    print(json.dumps({"error": repr(ex)})); sys.exit(0)
c.loop_start()
answered = done.wait(15)
c.loop_stop()
print(json.dumps({"answered": answered, "rc": res.get("rc"), "closed": res.get("closed"),
                  "token": str(token)}))
"#;

struct Raw<'a> {
    client_id: &'a str,
    username_module: &'a str,
    token_module: &'a str,
    key: &'a str,
    ttl: i64,
}

/// Runs [`RAW_CONNECT`] in the hub's namespace; returns its JSON line.
fn raw_connect(hub: &SdkHub, r: &Raw<'_>) -> Value {
    let mut cmd = Command::new(&hub.env.python);
    cmd.args(["-c", RAW_CONNECT])
        .env("EDGEHUB_CA", hub.ca())
        .env("RAW_CLIENT_ID", r.client_id)
        .env(
            "RAW_USERNAME",
            format!(
                "{IOTHUB_HOSTNAME}/{DEVICE_ID}/{}/?api-version=2019-10-01",
                r.username_module
            ),
        )
        .env(
            "RAW_SR",
            format!(
                "{IOTHUB_HOSTNAME}/devices/{DEVICE_ID}/modules/{}",
                r.token_module
            ),
        )
        .env("RAW_KEY", r.key)
        .env("RAW_TTL", r.ttl.to_string());
    let out = hub.ns.spawn(&mut cmd).finish(secs(30));
    out.lines
        .iter()
        .rev()
        .find_map(|l| match l {
            sdk::Line::Json(v) => Some(v.clone()),
            sdk::Line::Text(_) => None,
        })
        .unwrap_or_else(|| {
            panic!(
                "raw connect printed nothing: {:?}\n{}",
                out.lines, out.stderr
            )
        })
}

fn assert_accepted(v: &Value, what: &str, hub: &SdkHub) {
    assert_eq!(
        v["rc"],
        0,
        "{what}: want CONNACK 0, got {v}\nhub log:\n{}",
        hub.log()
    );
}

/// Refused by a CONNACK "bad username or password" (4) or "not authorized" (5), or by the
/// hub closing the connection before any CONNACK: never accepted.
fn assert_refused(v: &Value, what: &str, hub: &SdkHub) {
    let refused = matches!(v["rc"].as_i64(), Some(4 | 5))
        || (v["answered"] == true && v["rc"].is_null() && !v["closed"].is_null());
    assert!(
        refused,
        "{what}: want a refusal, got {v}\nhub log:\n{}",
        hub.log()
    );
}

/// A module whose SharedAccessKey was tampered with (one bit) is refused (exit 4) by both
/// SDKs; the same module with its real key gets in.
#[test]
fn wrong_key_is_refused() {
    let hub = SdkHub::start(TestHub::new(), &["sender"]);
    let cs = hub.cs("sender").to_owned();
    let bad = testhub::with_key(&cs, &tampered(testhub::cs_field(&cs, "SharedAccessKey")));

    let runs = [
        (
            Sdk::Python,
            bad.clone(),
            sdk::EXIT_AUTH,
            "python, tampered key",
        ),
        (Sdk::Node, bad, sdk::EXIT_AUTH, "node, tampered key"),
        (Sdk::Python, cs.clone(), sdk::EXIT_OK, "python, real key"),
        (Sdk::Node, cs, sdk::EXIT_OK, "node, real key"),
    ]
    .map(|(which, cs, code, what)| (connect_only(&hub, which, &cs), code, what));
    for (p, code, what) in runs {
        expect_exit(p, code, what, &hub);
    }
}

/// A connection string for a module the hub does not know (`ghost`, random key) is refused
/// by both SDKs.
#[test]
fn unknown_module_is_refused() {
    let hub = SdkHub::start(TestHub::new(), &["receiver"]);
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let ghost =
        sdk::module_connection_string(IOTHUB_HOSTNAME, DEVICE_ID, "ghost", &key, testhub::GATEWAY);
    let known = hub.cs("receiver").to_owned();

    let runs = [
        (
            Sdk::Python,
            ghost.clone(),
            sdk::EXIT_AUTH,
            "python, unknown module",
        ),
        (Sdk::Node, ghost, sdk::EXIT_AUTH, "node, unknown module"),
        (Sdk::Python, known, sdk::EXIT_OK, "python, known module"),
    ]
    .map(|(which, cs, code, what)| (connect_only(&hub, which, &cs), code, what));
    for (p, code, what) in runs {
        expect_exit(p, code, what, &hub);
    }
}

/// Module A's credentials used for module B are refused:
/// - through the SDK: B's connection string carrying A's key (the SDK signs B's resource with
///   A's key);
/// - through paho: B's client id and username with A's valid token (`sr` = A), and B's client
///   id with A's username and token.
///
/// A's own client id, username and token get in.
#[test]
fn identity_mismatch_is_refused() {
    let hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);
    let key_a = testhub::cs_field(hub.cs("sender"), "SharedAccessKey").to_owned();
    let b_with_a_key = testhub::with_key(hub.cs("receiver"), &key_a);

    let sdk_run = connect_only(&hub, Sdk::Python, &b_with_a_key);
    let node_run = connect_only(&hub, Sdk::Node, &b_with_a_key);

    let client_a = format!("{DEVICE_ID}/sender");
    let client_b = format!("{DEVICE_ID}/receiver");
    let ok = raw_connect(
        &hub,
        &Raw {
            client_id: &client_a,
            username_module: "sender",
            token_module: "sender",
            key: &key_a,
            ttl: 3600,
        },
    );
    assert_accepted(&ok, "A's client id, username and token", &hub);
    let b_with_a_token = raw_connect(
        &hub,
        &Raw {
            client_id: &client_b,
            username_module: "receiver",
            token_module: "sender",
            key: &key_a,
            ttl: 3600,
        },
    );
    assert_refused(
        &b_with_a_token,
        "B's client id and username with A's token",
        &hub,
    );
    let b_client_a_user = raw_connect(
        &hub,
        &Raw {
            client_id: &client_b,
            username_module: "sender",
            token_module: "sender",
            key: &key_a,
            ttl: 3600,
        },
    );
    assert_refused(
        &b_client_a_user,
        "B's client id with A's username and token",
        &hub,
    );
    expect_exit(
        sdk_run,
        sdk::EXIT_AUTH,
        "python: B's connection string with A's key",
        &hub,
    );
    expect_exit(
        node_run,
        sdk::EXIT_AUTH,
        "node: B's connection string with A's key",
        &hub,
    );
}

/// A token that expired longer ago than the hub's clock-skew allowance (300 s, as edgeHub) is
/// refused; the same token with an expiry in the future is accepted. (The Python SDK refuses
/// an expired token itself before connecting and the allowance is longer than a test may
/// wait, so paho presents it: `connect_only.py --delay` cannot get past the allowance.)
#[test]
fn expired_token_is_refused() {
    let hub = SdkHub::start(TestHub::new(), &["sender"]);
    let key = testhub::cs_field(hub.cs("sender"), "SharedAccessKey").to_owned();
    let client = format!("{DEVICE_ID}/sender");
    let raw = |ttl| Raw {
        client_id: &client,
        username_module: "sender",
        token_module: "sender",
        key: &key,
        ttl,
    };
    assert_accepted(&raw_connect(&hub, &raw(3600)), "a valid token", &hub);
    assert_refused(
        &raw_connect(&hub, &raw(-900)),
        "a token expired 15 minutes ago",
        &hub,
    );
}

/// The receiver's messages never reach another module that is connected at the same time:
/// `other` (declared with `--module other`) is subscribed to its own inputs the whole time,
/// the receiver gets all N, and then `other` gets exactly the one message routed to it (an
/// in-order marker after everything else; it also shows `other` could receive at all).
#[test]
fn receiver_messages_never_reach_another_module() {
    const N: i64 = 200;
    let mut manifest: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    manifest["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] = serde_json::json!({
        "toReceiver": "FROM /messages/modules/sender/outputs/out1 INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")",
        "toOther": "FROM /messages/modules/sender/outputs/marker INTO BrokeredEndpoint(\"/modules/other/inputs/input1\")"
    });
    let hub = SdkHub::start(
        TestHub::with_manifest(&manifest.to_string()).module("other"),
        &["sender", "receiver", "other"],
    );

    let mut other = hub
        .module(Sdk::Python, Script::Receive, "other")
        .args(["--count", "1", "--linger", "1", "--timeout", "60"])
        .spawn();
    other.expect_event("ready", secs(20));
    let mut rx = hub
        .module(Sdk::Python, Script::Receive, "receiver")
        .args([
            "--count",
            &N.to_string(),
            "--linger",
            "1",
            "--timeout",
            "60",
        ])
        .spawn();
    rx.expect_event("ready", secs(20));

    let sent = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args([
            "--output",
            "out1",
            "--run",
            "private",
            "--count",
            &N.to_string(),
        ])
        .args(testhub::prop_args())
        .run(secs(60));
    sent.assert_exit(sdk::EXIT_OK);
    rx.data_lines(N as usize, secs(30));

    let marker = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args(["--output", "marker", "--run", "marker", "--count", "1"])
        .args(testhub::prop_args())
        .run(secs(30));
    marker.assert_exit(sdk::EXIT_OK);

    let other_out = other.finish(secs(40));
    let other_got: Vec<String> = other_out
        .data()
        .iter()
        .map(|m| format!("{}#{}", m["custom_properties"]["run"], m["seq"]))
        .collect();
    assert_eq!(
        other_got,
        ["\"marker\"#0"],
        "what `other` received (only the marker is its own)\nhub log:\n{}",
        hub.log()
    );
    other_out.assert_exit(sdk::EXIT_OK);
    testhub::assert_intact(&other_out.data()[0], "marker", "sender", "input1");

    let rx_out = rx.finish(secs(20));
    rx_out.assert_exit(sdk::EXIT_OK);
    let got = rx_out.data();
    SeqReport::of(&got, 0..N).assert_no_loss_no_reorder();
    assert_eq!(got.len(), N as usize, "{:?}", SeqReport::of(&got, 0..N));
    for m in &got {
        testhub::assert_intact(m, "private", "sender", "input1");
    }
}
