//! Module replicas (issue 17) over AMQP with unmodified Node SDK modules (azure-iot-device-amqp
//! 1.14.4 ModuleClient) against the hub binary: `filter` declared `x-edgehub-replicas
//! {partitionKey: "$body.key"}`, scaled 1 → 3 → 1 by manifest reloads while four Node senders
//! (AMQP too) stream messages over 100 keys to it, and one of the three replicas killed
//! (SIGKILL) mid-stream.
//!
//! Checked on every replica's output merged by wall-clock arrival time (receive.js's `at`,
//! stamped in the handler before it settles: the Node SDK settles a message only when told, so
//! a line precedes its `accepted`, and a killed replica printed everything the hub saw settled):
//! per key, the first deliveries are in send order across all replicas; nothing is lost;
//! every duplicate is a message the killed replica had received, and no more are seen than
//! `edgehub_replica_duplicates_total` counts; with three replicas up (before the kill) the keys
//! split among them exactly as the rendezvous assignment of three slots says, and each owns
//! about a third of the partitions (`edgehub_replica_partitions_owned`: 0.6 to 1.25 times it).
//!
//! Message count: 4 senders × 25 keys, 100 + 400 + 100 messages per sender = 2,400 messages (the
//! issue's 30,000 take minutes with SDK senders that await each acknowledgement: sdk_replicas
//! runs that size with Python over MQTT; this one stays near 40 s on a loaded machine). Every
//! wait is on an event: a hub log line or lines the modules print. Needs root and the SDKs
//! (tests/sdk/README.md); its own network namespace, as every SDK test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use router::replicas::assign::{target, Slot};
use router::replicas::partition::partition_of_key;
use router::replicas::ReplicaCount;
use sdk::{data_of, Proc, Script, Sdk};
use sdk_hub::{secs, SdkHub};
use serde_json::Value;
use testhub::TestHub;

/// One sending module per run (a module has one connection at a time).
const SENDERS: [&str; 4] = ["s0", "s1", "s2", "s3"];
/// Keys per sender: `<run>-k<seq mod KEYS>`.
const KEYS: i64 = 25;
/// Per sender: phase 1 (one replica), 2a (three), 2b (three, one killed), 3 (one again).
const PHASE_1: (i64, i64) = (0, 100);
const PHASE_2A: (i64, i64) = (100, 150);
const PHASE_2B: (i64, i64) = (250, 250);
const PHASE_3: (i64, i64) = (500, 100);
const PER_SENDER: i64 = 600;

/// Messages sent per sender once `phase` is done.
fn through((start, count): (i64, i64)) -> usize {
    usize::try_from(start + count).unwrap()
}

fn manifest(count: u8) -> String {
    let mut m: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    let desired = &mut m["modulesContent"]["$edgeAgent"]["properties.desired"];
    let template = desired["modules"]["sender"].clone();
    let mut filter = template.clone();
    filter["x-edgehub-replicas"] = serde_json::json!({"count": count, "partitionKey": "$body.key"});
    let mut modules = serde_json::json!({"filter": filter});
    for s in SENDERS {
        modules[s] = template.clone();
    }
    desired["modules"] = modules;
    m["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] = serde_json::json!({
        "toFilter": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")"
    });
    serde_json::to_string_pretty(&m).expect("json")
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn run_of(sender: &str) -> String {
    format!("r{sender}")
}

/// Every key the senders use.
fn all_keys() -> BTreeSet<String> {
    SENDERS
        .iter()
        .flat_map(|s| (0..KEYS).map(move |k| format!("{}-k{k}", run_of(s))))
        .collect()
}

/// The four senders sending `(start, count)` over AMQP, running.
fn spawn_senders(hub: &SdkHub, (start, count): (i64, i64)) -> Vec<Proc> {
    spawn_some_senders(hub, &SENDERS, (start, count))
}

fn spawn_some_senders(hub: &SdkHub, senders: &[&str], (start, count): (i64, i64)) -> Vec<Proc> {
    senders
        .iter()
        .map(|module| {
            hub.module(Sdk::Node, Script::Send, module)
                .args(["--transport", "amqp", "--output", "out1"])
                .args(["--run", &run_of(module), "--keys", &KEYS.to_string()])
                .args(["--start-seq", &start.to_string()])
                .args(["--count", &count.to_string(), "--timeout", "120"])
                .spawn()
        })
        .collect()
}

fn finish_senders(senders: Vec<Proc>) {
    for s in senders {
        s.finish(secs(130)).assert_exit(sdk::EXIT_OK);
    }
}

/// One received message: its key, seq and wall-clock arrival.
#[derive(Debug, Clone)]
struct Got {
    key: String,
    seq: i64,
    at: f64,
}

fn got(v: &Value) -> Option<Got> {
    let body: Value = serde_json::from_str(v["data"].as_str()?).ok()?;
    Some(Got {
        key: body["key"].as_str()?.to_owned(),
        seq: v["seq"].as_i64()?,
        // Node's receive.js only (Python's lines have no wall-clock time).
        at: v["at"].as_f64().unwrap_or(0.0),
    })
}

fn lines(p: &Proc) -> Vec<Got> {
    data_of(p.seen()).iter().filter_map(got).collect()
}

/// Reads every receiver's output until `done` holds for the distinct (key, seq) received.
fn drain_until(rx: &mut [&mut Proc], within: Duration, what: &str, want: usize) {
    let deadline = Instant::now() + within;
    loop {
        for p in rx.iter_mut() {
            let _ = p.read_until(Duration::from_millis(50), |_| false);
        }
        let distinct: BTreeSet<(String, i64)> = rx
            .iter()
            .flat_map(|p| lines(p))
            .map(|g| (g.key, g.seq))
            .collect();
        if distinct.len() >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {want} within {within:?}",
            distinct.len()
        );
    }
}

/// A Node replica of `filter` over AMQP, connected and listening.
fn replica(hub: &SdkHub) -> Proc {
    let mut p = hub
        .module(Sdk::Node, Script::Receive, "filter")
        .args(["--transport", "amqp", "--stay", "300", "--timeout", "320"])
        .spawn();
    p.expect_event("ready", secs(60));
    p
}

/// Waits until the hub logged `needle` at least `n` times.
fn await_log_count(hub: &SdkHub, needle: &str, n: usize, within: Duration) {
    assert!(
        hub.proc()
            .wait_stderr(within, |log| log.matches(needle).count() >= n),
        "the hub never logged {needle:?} {n} times within {within:?}:\n{}",
        hub.log()
    );
}

/// The keys of `senders`, grouped as the rendezvous assignment over `count` live slots says.
fn expected_groups(senders: &[&str], count: u64) -> BTreeSet<BTreeSet<String>> {
    let count = ReplicaCount::new(count).unwrap();
    let mut groups: BTreeMap<Slot, BTreeSet<String>> = BTreeMap::new();
    for s in senders {
        for k in 0..KEYS {
            let key = format!("{}-k{k}", run_of(s));
            let slot = target(Slot::below(count), partition_of_key(key.as_bytes())).unwrap();
            groups.entry(slot).or_default().insert(key);
        }
    }
    groups.into_values().collect()
}

/// A Python replica over MQTT and a Node replica over AMQP are members of one module side by
/// side (membership is per connection): a third connection (Node, AMQP) is refused with a
/// warning naming the module and counted as `replicas_full`, as is a fourth authenticated by
/// SASL PLAIN (raw rhea: its links refused, its connection closed), and the keys split between
/// the two as the assignment of two slots says, each key in order, once.
#[test]
fn mqtt_and_amqp_replicas_split_one_module_and_a_third_amqp_connection_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(2)).expect("write");
    let mut modules = SENDERS.to_vec();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path), &modules);
    let mut python = hub
        .module(Sdk::Python, Script::Receive, "filter")
        .args(["--stay", "120", "--timeout", "140"])
        .spawn();
    python.expect_event("ready", secs(60));
    let mut node = replica(&hub);

    let third = hub
        .module(Sdk::Node, Script::ConnectOnly, "filter")
        .args(["--transport", "amqp", "--no-retry", "--timeout", "30"])
        .run(secs(60));
    // Its put-token is answered 503 with the reason: the Node SDK fails the connect at once
    // (an UnauthorizedError, which it does not retry).
    assert!(
        third
            .error_line()
            .is_some_and(|l| l.contains("has all its replicas")),
        "a third replica got in, or not for the reason: {third:?}"
    );
    hub.await_log("replica connection refused", secs(30));
    let refusal = hub.log_lines("replica connection refused");
    assert!(
        refusal.contains("filter") && refusal.contains("WARN"),
        "the refusal names no module: {refusal}"
    );
    assert_eq!(
        hub.metric(&["edgehub_client_connect_failed_total{", "replicas_full"]),
        Some(1.0)
    );
    // Authenticated by SASL PLAIN instead (raw rhea; no put-token to answer): the identity is
    // taken back, so its events link is refused and nothing it sends is routed, and the
    // connection is closed with the reason at once.
    let plain = hub
        .amqp_probe(
            "filter",
            &["--mode", "attach", "--sasl", "plain", "--timeout", "8"],
        )
        .finish(secs(60));
    assert!(
        plain.events("own").is_empty(),
        "a refused SASL PLAIN replica sent a message: {plain:?}"
    );
    hub.await_log(
        "reason=connection refused: filter has all its replicas",
        secs(30),
    );

    let senders = ["s0", "s1"];
    finish_senders(spawn_some_senders(&hub, &senders, (0, 100)));
    drain_until(&mut [&mut python, &mut node], secs(60), "both", 200);
    let mut groups = BTreeSet::new();
    for p in [&python, &node] {
        let got = lines(p);
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for g in &got {
            if let Some(prev) = last.insert(g.key.clone(), g.seq) {
                assert!(prev < g.seq, "{}: {} after {prev}", g.key, g.seq);
            }
        }
        groups.insert(got.iter().map(|g| g.key.clone()).collect::<BTreeSet<_>>());
    }
    assert_eq!(groups, expected_groups(&senders, 2));
    let received = lines(&python).len() + lines(&node).len();
    assert_eq!(received, 200, "duplicates without a handoff");
}

#[test]
fn node_amqp_replicas_scale_1_3_1_with_one_killed_keep_each_keys_order_globally() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(1)).expect("write");
    let mut modules = SENDERS.to_vec();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path.clone()), &modules);
    let n = SENDERS.len();

    // Phase 1: one replica gets everything.
    let mut r0 = replica(&hub);
    await_log_count(&hub, "inputs link attached", 1, secs(30));
    finish_senders(spawn_senders(&hub, PHASE_1));
    drain_until(&mut [&mut r0], secs(60), "phase 1", n * through(PHASE_1));

    // Phase 2a: three replicas, all joined before anything is sent (r0 holds nothing then, so
    // every partition goes straight to its rendezvous target).
    write_atomically(&path, &manifest(3));
    hub.await_log("replica count changed", secs(30));
    let mut r1 = replica(&hub);
    let mut r2 = replica(&hub);
    await_log_count(&hub, "inputs link attached", 3, secs(30));
    let before_2a: Vec<usize> = [&r0, &r1, &r2].iter().map(|p| lines(p).len()).collect();
    finish_senders(spawn_senders(&hub, PHASE_2A));
    drain_until(
        &mut [&mut r0, &mut r1, &mut r2],
        secs(60),
        "phase 2a",
        n * through(PHASE_2A),
    );
    // Which keys each replica got in phase 2a: exactly the rendezvous groups of three slots.
    let groups: BTreeSet<BTreeSet<String>> = [&r0, &r1, &r2]
        .iter()
        .zip(&before_2a)
        .map(|(p, from)| {
            lines(p)[*from..]
                .iter()
                .map(|g| g.key.clone())
                .collect::<BTreeSet<_>>()
        })
        .collect();
    let expected = expected_groups(&SENDERS, 3);
    let shares: Vec<usize> = groups.iter().map(BTreeSet::len).collect();
    assert_eq!(
        groups, expected,
        "the keys did not split as the assignment of three slots says"
    );
    // The keys' shares follow their hashes; the partitions' are the assignment's spread: each
    // of the three slots owns between 0.6 and 1.25 times a third of the 64.
    let owned: Vec<f64> = hub
        .metrics()
        .lines()
        .filter(|l| l.starts_with("edgehub_replica_partitions_owned{") && l.contains("filter"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(owned.len(), 3, "partitions owned per slot: {owned:?}");
    for p in &owned {
        assert!(
            (0.6 * 64.0 / 3.0..=1.25 * 64.0 / 3.0).contains(p),
            "a slot owns {p} of 64 partitions: {owned:?}"
        );
    }
    eprintln!(
        "phase 2a: {} keys split {shares:?}, 64 partitions {owned:?} among three replicas",
        all_keys().len()
    );

    // Phase 2b: the second replica is killed while the senders stream.
    let senders = spawn_senders(&hub, PHASE_2B);
    let r1_before = lines(&r1).len();
    let deadline = Instant::now() + secs(60);
    while lines(&r1).len() < r1_before + 20 {
        let _ = r1.read_until(Duration::from_millis(100), |_| false);
        assert!(
            Instant::now() < deadline,
            "the second replica got nothing in phase 2b"
        );
    }
    r1.kill();
    finish_senders(senders);
    drain_until(
        &mut [&mut r0, &mut r1, &mut r2],
        secs(60),
        "phase 2b",
        n * through(PHASE_2B),
    );

    // Phase 3: back to one replica; the one above the count is closed by the hub.
    write_atomically(&path, &manifest(1));
    hub.await_log("closing a replica's connection", secs(30));
    finish_senders(spawn_senders(&hub, PHASE_3));
    drain_until(
        &mut [&mut r0, &mut r1, &mut r2],
        secs(60),
        "phase 3",
        n * PER_SENDER as usize,
    );

    // Every replica's lines merged by arrival: per key, first deliveries in send order.
    let mut merged: Vec<(usize, Got)> = [&r0, &r1, &r2]
        .iter()
        .enumerate()
        .flat_map(|(i, p)| lines(p).into_iter().map(move |g| (i, g)))
        .collect();
    merged.sort_by(|a, b| a.1.at.total_cmp(&b.1.at));
    let mut first: BTreeMap<(String, i64), usize> = BTreeMap::new();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut duplicates = 0usize;
    for (replica, g) in &merged {
        match first.get(&(g.key.clone(), g.seq)) {
            Some(first_at) => {
                duplicates += 1;
                assert_eq!(
                    *first_at, 1,
                    "{} {} delivered again, first to r{first_at}, which was not killed",
                    g.key, g.seq
                );
            }
            None => {
                first.insert((g.key.clone(), g.seq), *replica);
                if let Some(prev) = last.insert(g.key.clone(), g.seq) {
                    assert!(
                        prev < g.seq,
                        "{}: first delivery of {} (r{replica}) after {prev}",
                        g.key,
                        g.seq
                    );
                }
            }
        }
    }
    // Nothing lost: every key with every seq of its sender.
    for s in SENDERS {
        let run = run_of(s);
        for seq in 0..PER_SENDER {
            let key = format!("{run}-k{}", seq % KEYS);
            assert!(first.contains_key(&(key.clone(), seq)), "{key} {seq} lost");
        }
    }
    let counted = hub
        .metric(&["edgehub_replica_duplicates_total{", "filter"])
        .expect("the duplicates metric");
    assert!(
        duplicates as f64 <= counted,
        "{duplicates} duplicates seen, {counted} counted"
    );
    let refused = hub
        .metric(&["edgehub_client_connect_failed_total{", "replicas_full"])
        .unwrap_or(0.0);
    eprintln!(
        "messages {}, received {}, duplicates seen {duplicates}, counted {counted}, \
         replica connections refused {refused}",
        n * PER_SENDER as usize,
        merged.len()
    );
}
/// An AMQP member that falls silent (raw rhea writing nothing, not even empty frames) is
/// displaced by a newcomer once it has been silent for 10 s: Node replicas (AMQP) are started
/// one after the other, as an orchestrator restarts a module that exits, each refused (503,
/// exit) while the member was heard within 10 s, until one takes its place; the hub closes the
/// silent connection, and the message the silent member's partition held reaches the newcomer.
#[test]
fn a_silent_amqp_replica_is_displaced_and_its_connection_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(1)).expect("write");
    let mut modules = SENDERS.to_vec();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path), &modules);
    // The member: authenticates as filter, sends one message (routed to filter's own input:
    // no key, partition 0, which it owns), attaches no inputs link, then writes nothing.
    let mut silent = hub.amqp_probe(
        "filter",
        &[
            "--mode",
            "attach",
            "--silent",
            "--hold",
            "90",
            "--timeout",
            "100",
        ],
    );
    let own = silent.expect_event("own", secs(30));
    assert_eq!(own["outcome"], "accepted");
    let deadline = Instant::now() + secs(120);
    let mut refused = 0;
    let mut newcomer = loop {
        let mut p = hub
            .module(Sdk::Node, Script::Receive, "filter")
            .args(["--transport", "amqp", "--count", "1", "--timeout", "60"])
            // One connection per attempt: listening first, the SDK's input link goes on a
            // connection of its own, which may be refused a moment before open()'s gets in,
            // and the SDK then never enables input messages (receive.js says more).
            .args(["--listen-after-connect"])
            .spawn();
        // "ready" once connected; no line (the script exits) when refused.
        if p.read_until(secs(60), |v| v["event"] == "ready").is_some() {
            break p;
        }
        assert!(
            p.wait_stderr(secs(10), |e| e.contains("has all its replicas")),
            "a newcomer failed otherwise: {}",
            p.stderr()
        );
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "never admitted ({refused} refused)"
        );
    };
    hub.await_log("a silent replica was displaced", secs(30));
    let held = silent.expect_event("held", secs(30));
    let closed_ms = held["closed_by_hub_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("the silent connection was not closed: {held}"));
    assert!(
        closed_ms >= 10_000.0,
        "displaced after {closed_ms} ms of silence, under 10 s"
    );
    let got = newcomer
        .read_until(secs(60), |v| v.get("event").is_none())
        .unwrap_or_else(|| {
            panic!(
                "the newcomer got nothing: {}\nhub log:\n{}",
                newcomer.stderr(),
                hub.log()
            )
        });
    assert_eq!(got["message_id"], "probe-1");
    eprintln!("newcomers refused before one displaced the silent member: {refused}");
}
