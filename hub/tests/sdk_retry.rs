//! The SDK harness's senders behave as modules do while the hub restarts (issue 11, item 11):
//! a send that fails because the hub is away is sent again until it is acknowledged, instead
//! of ending the module. What the tests around restarts assert (nothing acknowledged lost,
//! first deliveries in order) then depends on the hub, not on when the hub died.
//!
//! Needs root and the SDKs (`scripts/install-sdks.sh`), like every SDK test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::time::Duration;

use sdk::{Script, Sdk, SeqReport};
use testhub::TestHub;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The hub is SIGKILLed while a Python sender waits between two sends, and stays down until the
/// sender has tried its next send: the send fails (connection refused) and the sender retries
/// it, reporting `{"event":"retry"}`; once the hub is back the sender finishes, every message
/// acknowledged in order, and a receiver gets all of them.
#[test]
fn a_python_send_while_the_hub_is_down_is_retried_until_the_hub_is_back() {
    const N: i64 = 3;
    let env = sdk::SdkEnv::require();
    let ns = sdk::NetNs::new();
    let hub = TestHub::new();
    let (cs_tx, cs_rx, ca) = (
        hub.connection_string("sender"),
        hub.connection_string("receiver"),
        hub.ca_path(),
    );
    let mut hub_proc = hub.start(&ns);
    let mut tx = ns
        .module(&env, Sdk::Python, Script::Send, &cs_tx, &ca)
        .args(["--output", "out1", "--run", "retry"])
        .args(["--count", &N.to_string(), "--interval-ms", "3000"])
        .args(["--timeout", "120"])
        .args(testhub::prop_args())
        .spawn();
    let first = tx.read_until(secs(60), |v| v["seq"].as_i64() == Some(0));
    assert!(first.is_some(), "no first acknowledgement: {}", tx.stderr());
    // Killed in the pause after seq 0; down until the sender has tried seq 1.
    hub_proc.kill();
    let retry = tx.expect_event("retry", secs(60));
    assert_eq!(retry["what"], "send seq 1", "{retry}");
    let hub_proc = hub.start(&ns);
    let sent = tx.finish(secs(120));
    if sent.code != Some(sdk::EXIT_OK) {
        panic!(
            "the sender did not finish after the restart: exit {:?}; stderr:\n{}\nhub log:\n{}",
            sent.code,
            sent.stderr,
            hub_proc.stderr()
        );
    }
    let acked = sent.data();
    SeqReport::of(&acked, 0..N).assert_no_loss_no_reorder();
    assert_eq!(
        acked.len() as i64,
        N,
        "each send acknowledged once: {acked:?}"
    );

    let rx = ns
        .module(&env, Sdk::Python, Script::Receive, &cs_rx, &ca)
        .args(["--timeout", "60"])
        .spawn();
    let (got, rx_stderr) = rx.receive_all(N, secs(60));
    let report = SeqReport::of(&got, 0..N);
    assert!(
        report.missing.is_empty() && report.out_of_order.is_empty(),
        "{report:?}\n{rx_stderr}"
    );
    for m in &got {
        testhub::assert_intact(m, "retry", "sender", "input1");
    }
}
