//! The hub crashing (SIGKILL) and restarting on the same data directory under live Python SDK
//! modules: what the sender saw acknowledged must reach the receiver, first deliveries in
//! order (duplicates are allowed after the crash, never a gap), and the receiver's
//! subscription must survive (the Python SDK does not subscribe again after a reconnect).
//!
//! The Python SDK reconnects on its own (connection_retry, every 10 s), so these tests take
//! tens of seconds. Each runs its own hub in its own network namespace (tests/sdk/README.md);
//! they need root and the SDKs (`scripts/install-sdks.sh`), and fail without them.
//!
//! The harness's senders behave as modules do while the hub restarts: a send that fails
//! because the hub is away is sent again until it is acknowledged, instead of ending the
//! module; the last test pins that, so what the others assert depends on the hub, not on when
//! it died.

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

/// The hub is SIGKILLed while a Python sender streams to a Python receiver, and restarted on
/// the same data directory. The sender's SDK reconnects and resends what was not
/// acknowledged; the sender finishes; the receiver gets every message, first deliveries in
/// order, with duplicates allowed only because of the crash.
#[test]
fn hub_killed_mid_stream_loses_nothing_the_sender_saw_acknowledged() {
    const N: i64 = 1000;
    const KILL_AFTER: i64 = 300;
    let mut hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);

    let mut rx = hub
        .module(Sdk::Python, Script::Receive, "receiver")
        .args(["--timeout", "150"])
        .spawn();
    rx.expect_event("ready", secs(20));
    let mut tx = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args([
            "--output",
            "out1",
            "--run",
            "crash",
            "--count",
            &N.to_string(),
        ])
        .args(["--timeout", "120"])
        .args(testhub::prop_args())
        .spawn();
    let reached = tx.read_until(secs(60), |v| {
        v["seq"].as_i64().is_some_and(|s| s >= KILL_AFTER)
    });
    assert!(
        reached.is_some(),
        "the sender never got {KILL_AFTER} acknowledgements: {}",
        tx.stderr()
    );
    hub.kill();
    let before_crash = hub.log();
    let acked_before_crash = sdk::data_of(tx.seen()).len();
    hub.restart();

    let sent = tx.finish(secs(130));
    if sent.code != Some(sdk::EXIT_OK) {
        panic!(
            "the sender did not finish after the restart: exit {:?}; stderr:\n{}\n\
             hub log after the restart:\n{}",
            sent.code,
            sent.stderr,
            hub.log()
        );
    }
    let acked = sent.data();
    SeqReport::of(&acked, 0..N).assert_no_loss_no_reorder();

    let (got, rx_stderr) = rx.receive_all(N, secs(90));
    let report = SeqReport::of(&got, 0..N);
    if !report.missing.is_empty()
        || !report.out_of_order.is_empty()
        || !report.unexpected.is_empty()
        || report.without_seq > 0
    {
        panic!(
            "after a crash at ~{acked_before_crash} acknowledged: {report:?}\n\
             receiver stderr:\n{rx_stderr}\nhub log before the crash:\n{before_crash}\n\
             hub log after the restart:\n{}",
            hub.log()
        );
    }
    for m in &got {
        testhub::assert_intact(m, "crash", "sender", "input1");
    }
}

/// A Python receiver subscribed before the hub is SIGKILLed and restarted keeps getting its
/// messages: the SDK reconnects with a persistent session and does not subscribe again, so
/// the hub must remember the subscription. Messages are sent only after the restart.
#[test]
fn receiver_subscription_survives_a_hub_crash() {
    const N: i64 = 50;
    let mut hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);

    let mut rx = hub
        .module(Sdk::Python, Script::Receive, "receiver")
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
    hub.kill();
    hub.restart();

    let sent = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args([
            "--output",
            "out1",
            "--run",
            "after",
            "--count",
            &N.to_string(),
        ])
        .args(testhub::prop_args())
        .run(secs(60));
    sent.assert_exit(sdk::EXIT_OK);

    let out = rx.finish(secs(100));
    if out.code != Some(sdk::EXIT_OK) {
        panic!(
            "the receiver got {} of {N} messages sent after the restart (exit {:?}); \
             stderr:\n{}\nhub log after the restart:\n{}",
            out.data().len(),
            out.code,
            out.stderr,
            hub.log()
        );
    }
    let got = out.data();
    SeqReport::of(&got, 0..N).assert_no_loss_no_reorder();
    for m in &got {
        testhub::assert_intact(m, "after", "sender", "input1");
    }
}

/// A backlog stored for an offline receiver survives a crash, and a crash while the receiver
/// drains it loses nothing: 500 messages sent while the receiver is offline, hub SIGKILLed and
/// restarted, the receiver connects, and after its first 100 the hub is SIGKILLed and
/// restarted again; the receiver (reconnecting on its own, without a new SUBSCRIBE) gets all
/// 500, first deliveries in order.
///
/// Ignored: when the SIGKILL lands while the receiver's paho (1.6.1) writes, its network
/// thread dies with an uncaught `ssl.SSLEOFError` ("Exception in thread ... _thread_main ...
/// loop_write ... SSLEOFError: EOF occurred in violation of protocol") and the SDK never
/// connects again: the restarted hub logs no connection at all. The hub is not involved;
/// run it with `--ignored` to exercise the crash-while-draining path.
#[test]
#[ignore = "SDK bug: paho 1.6.1's network thread dies on ssl.SSLEOFError when the hub vanishes while it writes PUBACKs, and the SDK never reconnects (~1 run in 10)"]
fn stored_backlog_survives_crashes_before_and_during_delivery() {
    stored_backlog(true);
}

/// A backlog stored for a receiver that never connected survives a crash: 500 messages sent
/// while the receiver is offline, the hub SIGKILLed and restarted, and the receiver that
/// connects then gets all 500, in order.
#[test]
fn stored_backlog_survives_a_crash_before_delivery() {
    stored_backlog(false);
}

/// The stored-backlog scenario; `crash_during` adds the second crash while it drains.
fn stored_backlog(crash_during: bool) {
    const N: i64 = 500;
    let mut hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);

    let sent = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args([
            "--output",
            "out1",
            "--run",
            "stored",
            "--count",
            &N.to_string(),
        ])
        .args(testhub::prop_args())
        .run(secs(60));
    sent.assert_exit(sdk::EXIT_OK);
    SeqReport::of(&sent.data(), 0..N).assert_no_loss_no_reorder();
    hub.kill();
    hub.restart();

    let mut rx = hub
        .module(Sdk::Python, Script::Receive, "receiver")
        .args(["--timeout", "120"])
        .spawn();
    if crash_during {
        rx.data_lines(100, secs(30));
        hub.kill();
        hub.restart();
    }

    let (got, rx_stderr) = rx.receive_all(N, secs(90));
    let report = SeqReport::of(&got, 0..N);
    if !report.missing.is_empty()
        || !report.out_of_order.is_empty()
        || !report.unexpected.is_empty()
        || report.without_seq > 0
    {
        panic!(
            "stored backlog after two crashes: {report:?}\nreceiver stderr:\n{rx_stderr}\n\
             hub log after the last restart:\n{}",
            hub.log()
        );
    }
    for m in &got {
        testhub::assert_intact(m, "stored", "sender", "input1");
    }
}

/// The hub is SIGKILLed while a Python sender waits between two sends, and stays down until the
/// sender has tried its next send: the send fails (connection refused) and the sender retries
/// it, reporting `{"event":"retry"}`; once the hub is back the sender finishes, every message
/// acknowledged in order, and a receiver gets all of them.
#[test]
fn a_python_send_while_the_hub_is_down_is_retried_until_the_hub_is_back() {
    const N: i64 = 3;
    let mut hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);
    let mut tx = hub
        .module(Sdk::Python, Script::Send, "sender")
        .args(["--output", "out1", "--run", "retry"])
        .args(["--count", &N.to_string(), "--interval-ms", "3000"])
        .args(["--timeout", "120"])
        .args(testhub::prop_args())
        .spawn();
    let first = tx.read_until(secs(60), |v| v["seq"].as_i64() == Some(0));
    assert!(first.is_some(), "no first acknowledgement: {}", tx.stderr());
    // Killed in the pause after seq 0; down until the sender has tried seq 1.
    hub.kill();
    let retry = tx.expect_event("retry", secs(60));
    assert_eq!(retry["what"], "send seq 1", "{retry}");
    hub.restart();
    let sent = tx.finish(secs(120));
    if sent.code != Some(sdk::EXIT_OK) {
        panic!(
            "the sender did not finish after the restart: exit {:?}; stderr:\n{}\nhub log:\n{}",
            sent.code,
            sent.stderr,
            hub.log()
        );
    }
    let acked = sent.data();
    SeqReport::of(&acked, 0..N).assert_no_loss_no_reorder();
    assert_eq!(
        acked.len() as i64,
        N,
        "each send acknowledged once: {acked:?}"
    );

    let rx = hub
        .module(Sdk::Python, Script::Receive, "receiver")
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
