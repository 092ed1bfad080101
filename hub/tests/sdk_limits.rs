//! Connection limits with the official SDKs (issue 11, item 3): `--max-connections` counts per
//! protocol; an AMQP module past it is refused (closed at accept), and gets in once a slot is
//! free.
//!
//! Needs root and the SDKs (`scripts/install-sdks.sh`), like every SDK test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::time::Duration;

use sdk::{Script, Sdk};
use testhub::TestHub;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The value of the first metric line with all `parts`, from the hub in `ns`.
fn metric(ns: &sdk::NetNs, parts: &[&str]) -> Option<f64> {
    testhub::metrics(ns)
        .lines()
        .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `--max-connections 1`: one Node module holds the AMQP slot; a second one over AMQP is
/// refused (counted, its connection closed at accept), while a Python module still connects
/// over MQTT (a separate budget); when the first leaves, the second connects and sends.
#[test]
fn max_connections_is_per_protocol_and_refuses_the_next_amqp_module() {
    let env = sdk::SdkEnv::require();
    let ns = sdk::NetNs::new();
    let hub = TestHub::new().run_args(&["--max-connections", "1"]);
    let (cs_tx, cs_rx, ca) = (
        hub.connection_string("sender"),
        hub.connection_string("receiver"),
        hub.ca_path(),
    );
    let hub_proc = hub.start(&ns);
    let mut holder = ns
        .module(&env, Sdk::Node, Script::ConnectOnly, &cs_rx, &ca)
        .args(["--transport", "amqp", "--hold", "120", "--timeout", "150"])
        .spawn();
    holder.expect_event("connected", secs(30));

    let refused = ns
        .module(&env, Sdk::Node, Script::Send, &cs_tx, &ca)
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
        hub_proc.stderr()
    );
    let refusals = metric(
        &ns,
        &[
            "edgehub_connections_refused_total",
            "protocol=\"amqp\"",
            "reason=\"max_connections\"",
        ],
    );
    assert!(
        refusals.is_some_and(|n| n >= 1.0),
        "refusals {refusals:?}\n{}",
        hub_proc.stderr()
    );

    // MQTT has its own budget.
    ns.module(&env, Sdk::Python, Script::ConnectOnly, &cs_tx, &ca)
        .args(["--timeout", "30"])
        .run(secs(40))
        .assert_exit(sdk::EXIT_OK);

    holder.kill();
    // The hub notices the holder's connection is gone (its socket closes): a slot is free. (The
    // refused one was closed at accept, before it had a connection to log.)
    assert!(
        hub_proc.wait_stderr(secs(30), |log| log.contains("AMQP connection closed")),
        "{}",
        hub_proc.stderr()
    );
    let sent = ns
        .module(&env, Sdk::Node, Script::Send, &cs_tx, &ca)
        .args(["--transport", "amqp", "--count", "1", "--timeout", "60"])
        .run(secs(70));
    sent.assert_exit(sdk::EXIT_OK);
}
