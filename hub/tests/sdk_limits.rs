//! Connection limits with the official SDKs (issue 11, item 3): `--max-connections` counts per
//! protocol; an AMQP module past it is refused (closed at accept), and gets in once a slot is
//! free.
//!
//! Needs root and the SDKs (`scripts/install-sdks.sh`), like every SDK test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use sdk::{Script, Sdk};
use sdk_hub::{secs, SdkHub};
use testhub::TestHub;

/// `--max-connections 1`: one Node module holds the AMQP slot; a second one over AMQP is
/// refused (counted, its connection closed at accept), while a Python module still connects
/// over MQTT (a separate budget); when the first leaves, the second connects and sends.
#[test]
fn max_connections_is_per_protocol_and_refuses_the_next_amqp_module() {
    let hub = SdkHub::start(
        TestHub::new().run_args(&["--max-connections", "1"]),
        &["sender", "receiver"],
    );
    let mut holder = hub
        .module(Sdk::Node, Script::ConnectOnly, "receiver")
        .args(["--transport", "amqp", "--hold", "120", "--timeout", "150"])
        .spawn();
    holder.expect_event("connected", secs(30));

    let refused = hub
        .module(Sdk::Node, Script::Send, "sender")
        .args([
            "--transport",
            "amqp",
            "--no-retry",
            "--count",
            "1",
            "--timeout",
            "20",
        ])
        .run(secs(40));
    assert_ne!(
        refused.code,
        Some(sdk::EXIT_OK),
        "a second AMQP module got past --max-connections 1: {:?}\n{}",
        refused.lines,
        hub.log()
    );
    let refusals = hub.metric(&[
        "edgehub_connections_refused_total",
        "protocol=\"amqp\"",
        "reason=\"max_connections\"",
    ]);
    assert!(
        refusals.is_some_and(|n| n >= 1.0),
        "refusals {refusals:?}\n{}",
        hub.log()
    );

    // MQTT has its own budget.
    hub.module(Sdk::Python, Script::ConnectOnly, "sender")
        .args(["--timeout", "30"])
        .run(secs(40))
        .assert_exit(sdk::EXIT_OK);

    holder.kill();
    // The hub notices the holder's connection is gone (its socket closes): a slot is free. (The
    // refused one was closed at accept, before it had a connection to log.)
    assert!(
        hub.proc()
            .wait_stderr(secs(30), |log| log.contains("AMQP connection closed")),
        "{}",
        hub.log()
    );
    let sent = hub
        .module(Sdk::Node, Script::Send, "sender")
        .args(["--transport", "amqp", "--count", "1", "--timeout", "60"])
        .run(secs(70));
    sent.assert_exit(sdk::EXIT_OK);
}
