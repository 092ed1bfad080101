//! Flow control over AMQP (issue 18): an events link whose messages go to an online receiver
//! that lags takes no more transfers (the sender's credit runs out) until the receiver
//! catches up or goes away. The sender is raw rhea (tests/sdk/node/amqp_probe.js `--mode
//! pipeline`: sends without waiting for settlements), the receiver the same probe's inputs
//! link settling nothing (online, never catching up). Checked against the hub's own
//! `/metrics`, never timings.
//!
//! Runs its hub in its own network namespace (tests/sdk/README.md); needs root and the SDKs
//! (`scripts/install-sdks.sh`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use std::time::{Duration, Instant};

use sdk_hub::{secs, SdkHub};
use testhub::TestHub;

const BOUND: u64 = 50;

/// Polls the hub's metric `parts` until `done` holds for its value (0 if absent); panics
/// after `within` (a failure bound only).
fn wait_metric(hub: &SdkHub, parts: &[&str], within: Duration, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = hub.metric(parts).unwrap_or(0.0);
        if done(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{parts:?} = {v}, not as expected within {within:?}\n{}",
            hub.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_events_link_is_held_while_its_online_receiver_lags_and_released_when_it_leaves() {
    let bound = BOUND.to_string();
    let hub = SdkHub::start(
        TestHub::new().run_args(&["--flow-control-max-lag", &bound]),
        &["sender", "receiver"],
    );
    // Online, settling nothing: its input never catches up.
    let mut rx = hub.amqp_probe(
        "receiver",
        &[
            "--mode",
            "inputs",
            "--settle",
            "none",
            "--count",
            "100000",
            "--timeout",
            "120",
        ],
    );
    rx.read_until(secs(30), |v| v["event"] == "attached")
        .unwrap_or_else(|| panic!("no inputs link: {}", rx.stderr()));
    const N: u64 = 600;
    let tx = hub.amqp_probe(
        "sender",
        &[
            "--mode",
            "pipeline",
            "--count",
            &N.to_string(),
            "--timeout",
            "120",
        ],
    );
    wait_metric(
        &hub,
        &["edgehub_flow_control_holds_total{", "receiver/input1"],
        secs(60),
        |v| v >= 1.0,
    );
    // Held after the transfer that passed the bound: nothing more is routed.
    let queued = hub
        .metric(&["edgehub_queue_length{", "receiver/input1"])
        .unwrap_or(0.0);
    assert!(
        queued <= (BOUND + 1) as f64,
        "queue {queued} passed the bound {BOUND} + 1 while the receiver was online\n{}",
        hub.metrics()
    );
    // The receiver goes away: the sender is released at once and everything is stored.
    rx.kill();
    let sent = tx.finish(secs(120));
    sent.assert_exit(sdk::EXIT_OK);
    let pipeline = sent
        .events("pipeline")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no pipeline line: {sent:?}"));
    assert_eq!(pipeline["ended"], "settled", "{pipeline}");
    assert_eq!(pipeline["accepted_prefix"], N, "{pipeline}");
    wait_metric(
        &hub,
        &["edgehub_queue_length{", "receiver/input1"],
        secs(30),
        |v| v >= N as f64,
    );
}
