//! Module replicas (issue 17) with unmodified Python SDK modules (azure-iot-device 2.14.0,
//! MQTT) against the hub binary, at the size: 30,000 messages over 100 keys.
//!
//! `filter` is declared `x-edgehub-replicas {partitionKey: "key"}`. Four Python senders stream
//! to it, each over its own 25 keys (`key` = `<run>-<seq mod 25>`), while the test scales it
//! 1 → 3 → 1 by manifest reloads and kills (SIGKILL) one of the three replicas mid-stream.
//!
//! What the replicas' SDKs received is read at the wire: `receive.py --wire` prints each PUBLISH
//! as paho reads it, before paho acknowledges it, stamped with CLOCK_MONOTONIC (one clock for
//! every process here). The handler's lines are not enough: the SDK acknowledges before its
//! handler runs, so a replica killed between the two has messages the hub rightly counts as
//! delivered that no handler printed. From the wire lines the test checks, globally across the
//! replicas: every key's first deliveries in order; nothing lost; every duplicate first went to
//! the killed replica, and no more were seen than `edgehub_replica_duplicates_total` counts
//! (the hub also counts deliveries the killed process never read from its socket); and each
//! replica held about a third of the keys while three were up.
//!
//! Every wait is on an event (a hub log line or lines the modules print), with a deadline that
//! only bounds a failure. Needs root and the SDKs (tests/sdk/README.md).

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

use sdk::{Line, Proc, Script, Sdk};
use sdk_hub::{secs, SdkHub};
use serde_json::Value;
use testhub::TestHub;

/// One sending module per run id (a module has one connection at a time).
const SENDERS: [(&str, &str); 4] = [("s0", "a"), ("s1", "b"), ("s2", "c"), ("s3", "d")];
/// Keys per sender: 4 × 25 = 100 keys.
const KEYS_PER_SENDER: i64 = 25;
/// Per sender (start seq, count): one replica, three (one killed), one again. 4 × 7,500 = 30,000.
const PHASES: [(i64, i64); 3] = [(0, 1_500), (1_500, 4_500), (6_000, 1_500)];
const PER_SENDER: i64 = 7_500;
/// The killed replica's wire deliveries before it is killed.
const KILL_AFTER: usize = 1_000;

fn manifest(count: u8) -> String {
    let mut m: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    let desired = &mut m["modulesContent"]["$edgeAgent"]["properties.desired"];
    let template = desired["modules"]["sender"].clone();
    let mut filter = template.clone();
    filter["x-edgehub-replicas"] = serde_json::json!({"count": count, "partitionKey": "key"});
    let mut modules = serde_json::json!({"filter": filter});
    for (module, _) in SENDERS {
        modules[module] = template.clone();
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

fn senders(hub: &SdkHub, (start, count): (i64, i64)) -> Vec<Proc> {
    SENDERS
        .iter()
        .map(|(module, run)| {
            hub.module(Sdk::Python, Script::Send, module)
                .args(["--output", "out1", "--run", run])
                .args(["--keys", &KEYS_PER_SENDER.to_string()])
                .args(["--start-seq", &start.to_string()])
                .args(["--count", &count.to_string(), "--timeout", "240"])
                .spawn()
        })
        .collect()
}

fn finish(senders: Vec<Proc>) {
    for s in senders {
        s.finish(secs(250)).assert_exit(sdk::EXIT_OK);
    }
}

/// One PUBLISH as a replica's paho read it.
#[derive(Clone, Debug)]
struct Wire {
    replica: usize,
    key: String,
    seq: i64,
    mono_ns: u64,
}

/// `key` and `seq` from the property bag of `devices/{d}/modules/filter/inputs/input1/{bag}`.
fn parse_wire(replica: usize, v: &Value) -> Option<Wire> {
    let topic = v["topic"].as_str()?;
    let bag = topic.split("/inputs/input1/").nth(1)?;
    let mut key = None;
    let mut seq = None;
    for pair in bag.split('&') {
        match pair.split_once('=') {
            Some(("key", k)) => key = Some(k.to_owned()),
            Some(("seq", s)) => seq = s.parse().ok(),
            _ => {}
        }
    }
    Some(Wire {
        replica,
        key: key?,
        seq: seq?,
        mono_ns: v["mono_ns"].as_u64()?,
    })
}

/// The replicas' processes and what their SDKs read, gathered as they print.
struct Replicas {
    procs: Vec<Proc>,
    read: Vec<usize>,
    wire: Vec<Wire>,
    distinct: BTreeSet<(String, i64)>,
}

impl Replicas {
    fn start(&mut self, hub: &SdkHub) -> usize {
        let mut p = hub
            .module(Sdk::Python, Script::Receive, "filter")
            .args(["--wire", "--no-data", "--stay", "400", "--timeout", "420"])
            .spawn();
        p.expect_event("ready", secs(60));
        self.procs.push(p);
        self.read.push(0);
        self.procs.len() - 1
    }

    /// Reads what the replicas printed for about `slice`.
    fn pump(&mut self, slice: Duration) {
        for (i, p) in self.procs.iter_mut().enumerate() {
            // A killed replica's last lines are still read: its SDK acknowledged them.
            let _ = p.read_until(slice, |_| false);
            for line in &p.seen()[self.read[i]..] {
                if let Line::Json(v) = line {
                    if v["event"] == "wire" {
                        let w = parse_wire(i, v).unwrap_or_else(|| {
                            panic!("replica {i}: a wire line without key/seq: {v}")
                        });
                        self.distinct.insert((w.key.clone(), w.seq));
                        self.wire.push(w);
                    }
                }
            }
            self.read[i] = p.seen().len();
        }
    }

    fn of(&self, replica: usize) -> usize {
        self.wire.iter().filter(|w| w.replica == replica).count()
    }

    /// Pumps until every message of the first `per_sender` seqs of each sender was read.
    fn drain(&mut self, per_sender: i64, what: &str) {
        let want = SENDERS.len() * per_sender as usize;
        let deadline = Instant::now() + secs(120);
        loop {
            self.pump(Duration::from_millis(50));
            let got = self
                .distinct
                .iter()
                .filter(|(_, s)| *s < per_sender)
                .count();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {got} of {want} messages read by the replicas within 120 s"
            );
        }
    }
}

/// Per replica, the keys it got most of the first deliveries of among `wire`.
fn keys_held(wire: &[&Wire]) -> BTreeMap<usize, usize> {
    let mut per_key: BTreeMap<&str, BTreeMap<usize, usize>> = BTreeMap::new();
    for w in wire {
        *per_key
            .entry(&w.key)
            .or_default()
            .entry(w.replica)
            .or_default() += 1;
    }
    let mut held = BTreeMap::new();
    for counts in per_key.values() {
        let (replica, _) = counts.iter().max_by_key(|(_, n)| **n).expect("a count");
        *held.entry(*replica).or_default() += 1;
    }
    held
}

#[test]
fn python_replicas_scale_1_3_1_with_one_killed_keep_each_keys_order_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(1)).expect("write");
    let mut modules: Vec<&str> = SENDERS.iter().map(|(m, _)| *m).collect();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path.clone()), &modules);
    let mut rx = Replicas {
        procs: Vec::new(),
        read: Vec::new(),
        wire: Vec::new(),
        distinct: BTreeSet::new(),
    };

    // Phase 1: one replica gets everything.
    let r0 = rx.start(&hub);
    let phase1 = senders(&hub, PHASES[0]);
    finish(phase1);
    rx.drain(PHASES[1].0, "phase 1");
    let phase1_end = rx.wire.len();

    // Phase 2: three replicas; one is killed while the senders stream.
    write_atomically(&path, &manifest(3));
    hub.await_log("replica count changed", secs(30));
    let r1 = rx.start(&hub);
    let r2 = rx.start(&hub);
    let phase2 = senders(&hub, PHASES[1]);
    let deadline = Instant::now() + secs(120);
    while rx.of(r1) < KILL_AFTER {
        rx.pump(Duration::from_millis(50));
        assert!(
            Instant::now() < deadline,
            "the second replica read {} messages, not {KILL_AFTER}",
            rx.of(r1)
        );
    }
    rx.procs[r1].kill();
    rx.pump(Duration::from_millis(10));
    let killed_at = rx.wire.len();
    finish(phase2);
    rx.drain(PHASES[2].0, "phase 2");

    // Phase 3: back to one replica; the hub closes the one above the count.
    write_atomically(&path, &manifest(1));
    hub.await_log("closing a replica's connection", secs(30));
    // Its connection's end says why (it said "replaced by a newer connection" before).
    hub.await_log(
        "scaled down: its module's replica count was lowered",
        secs(30),
    );
    assert!(
        !hub.log().contains("replaced by a newer connection"),
        "{}",
        hub.log_lines("replaced")
    );
    let phase3_start = rx.wire.len();
    let phase3 = senders(&hub, PHASES[2]);
    finish(phase3);
    rx.drain(PER_SENDER, "phase 3");

    // Nothing lost: every (key, seq) every sender had acknowledged reached a replica's SDK.
    let want: BTreeSet<(String, i64)> = SENDERS
        .iter()
        .flat_map(|(_, run)| {
            (0..PER_SENDER).map(move |seq| (format!("{run}-{}", seq % KEYS_PER_SENDER), seq))
        })
        .collect();
    assert_eq!(want.len(), 30_000);
    let got = &rx.distinct;
    let lost: Vec<_> = want.difference(got).take(10).collect();
    assert!(lost.is_empty(), "lost, e.g.: {lost:?}");
    let keys: BTreeSet<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 100, "keys");

    // Globally, across the replicas, in the one clock: per key, first deliveries in order.
    let mut by_time: Vec<&Wire> = rx.wire.iter().collect();
    by_time.sort_by_key(|w| w.mono_ns);
    let mut first: BTreeMap<(&str, i64), &Wire> = BTreeMap::new();
    let mut last_first: BTreeMap<&str, i64> = BTreeMap::new();
    let mut duplicates = 0usize;
    for w in &by_time {
        match first.get(&(w.key.as_str(), w.seq)) {
            Some(earlier) => {
                duplicates += 1;
                assert_eq!(
                    earlier.replica, r1,
                    "{} {} delivered again to replica {}, first to {} (only the killed one's \
                     deliveries may be repeated)",
                    w.key, w.seq, w.replica, earlier.replica
                );
            }
            None => {
                first.insert((w.key.as_str(), w.seq), w);
                if let Some(prev) = last_first.insert(w.key.as_str(), w.seq) {
                    assert!(
                        prev < w.seq,
                        "{}: seq {} first delivered (replica {}) after seq {prev}",
                        w.key,
                        w.seq,
                        w.replica
                    );
                }
            }
        }
    }
    let counted = hub
        .metric(&["edgehub_replica_duplicates_total{", "filter"])
        .expect("the duplicates metric");
    assert!(
        duplicates as f64 <= counted,
        "{duplicates} duplicates read, {counted} counted"
    );

    // About a third of the keys each while three were up: from the moment both newcomers read
    // their first message until the kill. One replica held every key at one.
    let both_in = [r1, r2]
        .iter()
        .map(|r| {
            rx.wire
                .iter()
                .find(|w| w.replica == *r)
                .expect("a delivery")
                .mono_ns
        })
        .max()
        .expect("two");
    let killed_ns = rx.wire[..killed_at]
        .iter()
        .filter(|w| w.replica == r1)
        .map(|w| w.mono_ns)
        .max()
        .expect("the killed replica's last read");
    let three_up: Vec<&Wire> = rx.wire[phase1_end..killed_at]
        .iter()
        .filter(|w| w.mono_ns >= both_in && w.mono_ns <= killed_ns)
        .collect();
    let held = keys_held(&three_up);
    for r in [r0, r1, r2] {
        let n = held.get(&r).copied().unwrap_or(0);
        assert!(
            (100 / 6..=100 / 2).contains(&n),
            "replica {r} held {n} of 100 keys while three were up: {held:?}"
        );
    }
    // At one, the survivors take turns at most: a refused replica's SDK keeps reconnecting and
    // displaces a member silent for 10 s (the contract), so both may have served phase 3.
    let phase3_replicas: BTreeSet<usize> = rx.wire[phase3_start..]
        .iter()
        .filter(|w| w.seq >= PHASES[2].0)
        .map(|w| w.replica)
        .collect();
    assert!(
        !phase3_replicas.is_empty() && !phase3_replicas.contains(&r1),
        "phase 3 went to {phase3_replicas:?}"
    );
    eprintln!(
        "messages {}, read {}, duplicates read {duplicates}, counted {counted}, keys held while \
         three were up {held:?}",
        want.len(),
        rx.wire.len()
    );
}

/// A replica killed with SIGKILL and started again at once gets back in: the kill closes its
/// socket, the hub sees the member gone at once (no keep-alive wait, no 10 s displacement), so
/// the restarted process is a member as soon as it connects and takes over a share of the keys,
/// with nothing refused, lost or out of order.
#[test]
fn a_replica_killed_and_restarted_at_once_gets_back_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(2)).expect("write");
    let mut modules: Vec<&str> = SENDERS.iter().map(|(m, _)| *m).collect();
    modules.push("filter");
    let hub = SdkHub::start(TestHub::new().manifest_at(path), &modules);
    let mut rx = Replicas {
        procs: Vec::new(),
        read: Vec::new(),
        wire: Vec::new(),
        distinct: BTreeSet::new(),
    };
    let r0 = rx.start(&hub);
    let r1 = rx.start(&hub);
    finish(senders(&hub, (0, 100)));
    rx.drain(100, "before the kill");
    assert!(rx.of(r1) > 0, "the second replica got no keys");

    let disconnected = |hub: &SdkHub| hub.log_lines("module disconnected").lines().count();
    let before = disconnected(&hub);
    rx.procs[r1].kill();
    // The hub notices the killed process's socket close (an event in its log), not a timeout.
    let deadline = Instant::now() + secs(30);
    while disconnected(&hub) == before {
        assert!(Instant::now() < deadline, "the hub did not see the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarted = rx.start(&hub);
    finish(senders(&hub, (100, 100)));
    rx.drain(200, "after the restart");
    assert!(
        rx.wire
            .iter()
            .any(|w| w.replica == restarted && w.seq >= 100),
        "the restarted replica took no keys over"
    );
    assert!(
        rx.wire.iter().any(|w| w.replica == r0 && w.seq >= 100),
        "the other replica lost its keys"
    );
    assert!(
        !hub.log().contains("replicas_full") && !hub.log().contains("has all its replicas"),
        "a connection was refused: {}",
        hub.log_lines("replica")
    );
    let mut by_time: Vec<&Wire> = rx.wire.iter().collect();
    by_time.sort_by_key(|w| w.mono_ns);
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for w in by_time {
        if seen.insert((w.key.as_str(), w.seq)) {
            if let Some(prev) = last.insert(w.key.as_str(), w.seq) {
                assert!(prev < w.seq, "{}: {} after {prev}", w.key, w.seq);
            }
        }
    }
}
