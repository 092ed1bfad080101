//! Module replicas (issue 17) with unmodified Python SDK modules (azure-iot-device 2.14.0,
//! MQTT) against the hub binary: `filter` declared `x-edgehub-replicas {partitionKey: "run"}`,
//! scaled 1 → 3 → 1 by manifest reloads while six Python senders (one key each: their `run`
//! property) stream to it, and one of the three replicas killed (SIGKILL) mid-stream.
//!
//! Message count: 6 keys × 250 = 1,500 messages (the 30,000 would take minutes with
//! Python senders that await each PUBACK; the property is the same). Every wait is on an event:
//! a hub log line or lines the modules print. Needs root and the SDKs (tests/sdk/README.md).

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

/// Per key: phase 1 (one replica), phase 2 (three, one killed), phase 3 (one again).
const PHASES: [(i64, i64); 3] = [(0, 50), (50, 150), (200, 50)];
const PER_KEY: i64 = 250;
/// One sending module per key (a module has one connection at a time).
const SENDERS: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];

fn manifest(count: u8) -> String {
    let mut m: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    let desired = &mut m["modulesContent"]["$edgeAgent"]["properties.desired"];
    let template = desired["modules"]["sender"].clone();
    let mut filter = template.clone();
    filter["x-edgehub-replicas"] = serde_json::json!({"count": count, "partitionKey": "run"});
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

/// Six run ids, two owned by each slot when three replicas are connected (so every replica
/// has keys to lose when it is killed).
fn runs() -> Vec<String> {
    let three = ReplicaCount::new(3).unwrap();
    let mut per_slot: BTreeMap<Slot, usize> = BTreeMap::new();
    (0..)
        .map(|i| format!("run{i}"))
        .filter(|run| {
            let slot = target(Slot::below(three), partition_of_key(run.as_bytes())).unwrap();
            let n = per_slot.entry(slot).or_default();
            *n += 1;
            *n <= 2
        })
        .take(6)
        .collect()
}

/// Six senders, one per run, sending `count` messages from `start`; waits for all to finish.
fn send(hub: &SdkHub, runs: &[String], start: i64, count: i64, interval_ms: u32) {
    let senders: Vec<Proc> = runs
        .iter()
        .zip(SENDERS)
        .map(|(run, module)| {
            hub.module(Sdk::Python, Script::Send, module)
                .args(["--output", "out1", "--run", run])
                .args([
                    "--start-seq",
                    &start.to_string(),
                    "--count",
                    &count.to_string(),
                ])
                .args([
                    "--interval-ms",
                    &interval_ms.to_string(),
                    "--timeout",
                    "120",
                ])
                .spawn()
        })
        .collect();
    for s in senders {
        s.finish(secs(130)).assert_exit(sdk::EXIT_OK);
    }
}

/// (run, seq) of a received line.
fn key_seq(v: &Value) -> Option<(String, i64)> {
    let run = v["custom_properties"]["run"].as_str()?.to_owned();
    Some((run, v["seq"].as_i64()?))
}

/// Drains every receiver's output until `done` holds for all lines together.
fn drain_until(
    rx: &mut [&mut Proc],
    within: Duration,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        for p in rx.iter_mut() {
            let _ = p.read_until(Duration::from_millis(50), |_| false);
        }
        let all: Vec<Value> = rx.iter().flat_map(|p| data_of(p.seen())).collect();
        if done(&all) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
    }
}

fn distinct(lines: &[Value]) -> BTreeSet<(String, i64)> {
    lines.iter().filter_map(key_seq).collect()
}

#[test]
fn python_replicas_scale_1_3_1_with_one_killed_keep_each_keys_order_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(1)).expect("write");
    let mut modules = SENDERS.to_vec();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path.clone()), &modules);
    let runs = runs();
    let receiver = |hub: &SdkHub| {
        let mut p = hub
            .module(Sdk::Python, Script::Receive, "filter")
            .args(["--stay", "300", "--timeout", "320"])
            .spawn();
        p.expect_event("ready", secs(30));
        p
    };

    // Phase 1: one replica gets everything.
    let mut r0 = receiver(&hub);
    let (start, count) = PHASES[0];
    send(&hub, &runs, start, count, 0);
    drain_until(&mut [&mut r0], secs(60), "phase 1", |l| {
        distinct(l).len() == 6 * 50
    });

    // Phase 2: three replicas; the second is killed while the senders stream.
    write_atomically(&path, &manifest(3));
    hub.await_log("replica count changed", secs(30));
    let mut r1 = receiver(&hub);
    let mut r2 = receiver(&hub);
    let (start, count) = PHASES[1];
    let senders: Vec<Proc> = runs
        .iter()
        .zip(SENDERS)
        .map(|(run, module)| {
            hub.module(Sdk::Python, Script::Send, module)
                .args(["--output", "out1", "--run", run])
                .args([
                    "--start-seq",
                    &start.to_string(),
                    "--count",
                    &count.to_string(),
                ])
                .args(["--interval-ms", "20", "--timeout", "120"])
                .spawn()
        })
        .collect();
    let r1_got = |p: &Proc| data_of(p.seen()).len();
    let deadline = Instant::now() + secs(60);
    while r1_got(&r1) < 20 {
        let _ = r1.read_until(Duration::from_millis(100), |_| false);
        assert!(Instant::now() < deadline, "the second replica got no keys");
    }
    r1.kill();
    for s in senders {
        s.finish(secs(130)).assert_exit(sdk::EXIT_OK);
    }
    drain_until(&mut [&mut r0, &mut r1, &mut r2], secs(60), "phase 2", |l| {
        distinct(l).len() == 6 * 200
    });

    // Phase 3: back to one replica; the one above the count is closed by the hub.
    write_atomically(&path, &manifest(1));
    hub.await_log("closing a replica's connection", secs(30));
    let (start, count) = PHASES[2];
    send(&hub, &runs, start, count, 0);
    drain_until(&mut [&mut r0, &mut r1, &mut r2], secs(60), "phase 3", |l| {
        distinct(l).len() == 6 * PER_KEY as usize
    });

    // Per replica and key, first deliveries in order; every key with every seq.
    let mut received = 0usize;
    for (name, p) in [("r0", &r0), ("r1", &r1), ("r2", &r2)] {
        let lines = data_of(p.seen());
        received += lines.len();
        let mut seen = BTreeSet::new();
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for (run, seq) in lines.iter().filter_map(key_seq) {
            if seen.insert((run.clone(), seq)) {
                if let Some(prev) = last.insert(run.clone(), seq) {
                    assert!(prev < seq, "{name}: {run} {seq} after {prev}");
                }
            }
        }
    }
    let all: Vec<Value> = [&r0, &r1, &r2]
        .iter()
        .flat_map(|p| data_of(p.seen()))
        .collect();
    for run in &runs {
        let seqs: BTreeSet<i64> = all
            .iter()
            .filter_map(key_seq)
            .filter(|(r, _)| r == run)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(seqs, (0..PER_KEY).collect(), "{run}: lost messages");
    }
    let duplicates = received - 6 * PER_KEY as usize;
    let metrics = testhub::metrics(&hub.ns);
    let counted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("edgehub_replica_duplicates_total{") && l.contains("filter"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the duplicates metric");
    assert!(
        duplicates as f64 <= counted,
        "{duplicates} duplicates seen, {counted} counted"
    );
    eprintln!(
        "messages {}, received {received}, duplicates seen {duplicates}, counted {counted}",
        6 * PER_KEY
    );
}
