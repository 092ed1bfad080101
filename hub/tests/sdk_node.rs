//! The official Node SDK (azure-iot-device 1.18.4 over MQTT) against the hub binary, mixed with
//! the Python SDK: each SDK's messages must reach the other's module intact and in order. The
//! two differ on the wire (Node ends output topics with `/` and keeps custom properties in
//! insertion order; Node drops input messages whose topic has no bag segment), so both
//! directions are needed.
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

use sdk::{Script, Sdk, SeqReport};
use sdk_hub::{secs, SdkHub};
use testhub::TestHub;

const N: i64 = 300;

/// `tx` sends N messages as module `sender`, `rx` receives them as `receiver` (built-in route
/// to `input1`); every message must arrive once, in order, intact.
fn sender_to_receiver(tx: Sdk, rx_sdk: Sdk, run: &str) {
    let hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);

    // The Node receiver subscribes after "ready", asynchronously; the hub keeps the
    // receiver's messages until it is subscribed, so no wait for the SUBACK is needed.
    let mut rx = hub
        .module(rx_sdk, Script::Receive, "receiver")
        .args([
            "--count",
            &N.to_string(),
            "--linger",
            "1",
            "--timeout",
            "90",
        ])
        .spawn();
    rx.expect_event("ready", secs(20));

    let sent = hub
        .module(tx, Script::Send, "sender")
        .args(["--output", "out1", "--run", run, "--count", &N.to_string()])
        .args(["--timeout", "80"])
        .args(testhub::prop_args())
        .run(secs(90));
    sent.assert_exit(sdk::EXIT_OK);
    SeqReport::of(&sent.data(), 0..N).assert_no_loss_no_reorder();

    let outcome = rx.finish(secs(100));
    let got = outcome.data();
    let report = SeqReport::of(&got, 0..N);
    if !report.missing.is_empty() || !report.out_of_order.is_empty() {
        panic!(
            "{} -> {}: {report:?}\nreceiver stderr:\n{}\nhub log:\n{}",
            tx.name(),
            rx_sdk.name(),
            outcome.stderr,
            hub.log()
        );
    }
    outcome.assert_exit(sdk::EXIT_OK);
    report.assert_no_loss_no_reorder();
    assert_eq!(
        got.len(),
        N as usize,
        "duplicates without a reconnect: {report:?}"
    );
    for m in &got {
        testhub::assert_intact(m, run, "sender", "input1");
    }
}

/// Node MQTT sender (topic with a trailing `/`, properties in insertion order) to a Python
/// receiver.
#[test]
fn node_sender_to_python_receiver_in_order_with_properties() {
    sender_to_receiver(Sdk::Node, Sdk::Python, "node2py");
}

/// Python sender to a Node MQTT receiver (which ignores an input topic without its bag
/// segment, and reads message ids, content type and properties its own way).
#[test]
fn python_sender_to_node_receiver_in_order_with_properties() {
    sender_to_receiver(Sdk::Python, Sdk::Node, "py2node");
}
