//! Module replicas over MQTT (issue 17, phase 2): raw MQTT clients as the replicas of `filter`,
//! declared `x-edgehub-replicas {count: 3, partitionKey: "key"}`, fed by `sender` through one
//! route. Every expectation waits on the messages the replicas record (a watch channel) or on a
//! packet, with a deadline that only bounds a failure.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raw::{http_get, RawClient, TestHub};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A failure bound, never a pace.
const T: Duration = Duration::from_secs(60);
const KEYS: usize = 20;

/// `KEYS` key names in as many distinct partitions (so a partition's messages are those of one
/// key, and what a replica holds of a key is exactly what it received of that partition).
fn keys() -> Vec<String> {
    let mut partitions = BTreeSet::new();
    (0..)
        .map(|i| format!("k{i}"))
        .filter(|k| partitions.insert(router::replicas::partition::partition_of_key(k.as_bytes())))
        .take(KEYS)
        .collect()
}

fn manifest(count: u8) -> String {
    format!(
        r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{"sender": {{}},
    "filter": {{"x-edgehub-replicas": {{"count": {count}, "partitionKey": "key"}}}}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{"toFilter": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}}}}}"#
    )
}

async fn start(root: &Path, count: u8) -> TestHub {
    std::fs::write(root.join("manifest.json"), manifest(count)).unwrap();
    TestHub::start(root).await
}

/// One message as a replica received it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    replica: usize,
    key: String,
    seq: u32,
}

type Log = watch::Sender<Vec<Rec>>;

/// A replica: its reader task records every input message and PUBACKs it while `acking`.
struct Replica {
    task: JoinHandle<()>,
    acking: Arc<AtomicBool>,
}

/// Connects replica `n` of `filter`, subscribes it to its inputs and starts its reader.
async fn replica(hub: &TestHub, n: usize, log: &Arc<Log>) -> Replica {
    let (mut c, _) = hub.connected("filter", true).await;
    let filter = hub.creds("filter").inputs_filter();
    let (ack, _) = c.subscribe(1, &[&filter]).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let acking = Arc::new(AtomicBool::new(true));
    let (log, ack_flag) = (Arc::clone(log), Arc::clone(&acking));
    let task = tokio::spawn(async move {
        let RawClient {
            mut reader,
            mut writer,
        } = c;
        loop {
            let Packet::Publish(p) = (match reader.next(Duration::from_secs(3600)).await {
                raw::Event::Packet(p) => p,
                _ => return,
            }) else {
                continue;
            };
            let text = String::from_utf8_lossy(&p.payload).into_owned();
            let (key, seq) = text.split_once(':').expect("key:seq");
            let rec = Rec {
                replica: n,
                key: key.to_owned(),
                seq: seq.parse().expect("seq"),
            };
            if ack_flag.load(Ordering::SeqCst) {
                writer.puback(p.pkid).await;
            }
            log.send_modify(|l| l.push(rec));
        }
    });
    Replica { task, acking }
}

/// Publishes `seqs` of every key from `sender` (the message `key:seq` with property `key`),
/// each durable (PUBACKed) before this returns, in windows of 50.
async fn send(hub: &TestHub, seqs: std::ops::Range<u32>) {
    let mut s = hub.plain().await;
    let ack = s.connect(hub.creds("sender").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let creds = hub.creds("sender");
    let mut all = Vec::new();
    let keys = keys();
    for seq in seqs {
        for key in &keys {
            all.push((key.clone(), seq));
        }
    }
    for window in all.chunks(50) {
        for (i, (key, seq)) in window.iter().enumerate() {
            let topic = creds.events_topic(&format!("%24.on=out1&key={key}"));
            let pkid = u16::try_from(i + 1).unwrap();
            s.writer
                .publish(
                    &topic,
                    QoS::AtLeastOnce,
                    pkid,
                    format!("{key}:{seq}").as_bytes(),
                )
                .await;
        }
        let mut acked = 0;
        while acked < window.len() {
            if let Packet::PubAck(_) = s.reader.expect_packet(T).await {
                acked += 1;
            }
        }
    }
    s.writer.disconnect().await;
}

/// Waits until `cond` holds for the log.
async fn wait_for(log: &Log, what: &str, cond: impl Fn(&[Rec]) -> bool) {
    let mut rx = log.subscribe();
    let waited = tokio::time::timeout(T, rx.wait_for(|l| cond(l))).await;
    assert!(
        waited.is_ok(),
        "{what}: not within {T:?}; log: {:?}",
        *log.borrow()
    );
}

/// Every (key, seq) received at least once.
fn distinct(l: &[Rec]) -> BTreeSet<(String, u32)> {
    l.iter().map(|r| (r.key.clone(), r.seq)).collect()
}

/// Keys each replica received.
fn keys_by_replica(l: &[Rec]) -> BTreeMap<usize, BTreeSet<String>> {
    let mut out: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for r in l {
        out.entry(r.replica).or_default().insert(r.key.clone());
    }
    out
}

/// Per key, the sequence numbers in the order they were first received: must be 0, 1, 2, …
fn assert_first_deliveries_in_order(l: &[Rec], per_key: u32) {
    let mut firsts: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in l {
        if seen.insert((r.key.as_str(), r.seq)) {
            firsts.entry(&r.key).or_default().push(r.seq);
        }
    }
    assert_eq!(firsts.len(), KEYS, "every key received");
    for (key, seqs) in firsts {
        assert_eq!(
            seqs,
            (0..per_key).collect::<Vec<_>>(),
            "first deliveries of {key} out of order or incomplete"
        );
    }
}

/// The value of a series of `filter`'s input1, from /metrics.
async fn replica_metric(hub: &TestHub, name: &str, extra: &str) -> Option<f64> {
    let text = http_get(hub.addrs.metrics, "/metrics")
        .await
        .expect("metrics");
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains("module=\"filter\"")
                && l.contains("input=\"input1\"")
                && l.contains(extra)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Three replicas split the keys: disjoint key sets that cover every key, each key's messages
/// in order, nothing twice (no failure); a fourth connection is refused (CONNACK 3) while the
/// three are heard from; the partitions owned add up to 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_the_keys_in_order_and_a_fourth_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), 3).await;
    let log = Arc::new(watch::channel(Vec::new()).0);
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(replica(&hub, n, &log).await);
    }
    // The three were heard from just now (their SUBSCRIBE): a fourth is refused, not let in
    // by displacing one of them.
    let mut fourth = hub.tls().await;
    let ack = fourth.connect(hub.creds("filter").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    fourth.reader.expect_closed(T).await;

    send(&hub, 0..30).await;
    let total = KEYS * 30;
    wait_for(&log, "every message received", |l| {
        distinct(l).len() == total
    })
    .await;
    let l = log.borrow().clone();
    assert_eq!(l.len(), total, "nothing delivered twice without a failure");
    assert_first_deliveries_in_order(&l, 30);
    let by_replica = keys_by_replica(&l);
    assert_eq!(
        by_replica.len(),
        3,
        "every replica got keys: {by_replica:?}"
    );
    let mut union = BTreeSet::new();
    for keys in by_replica.values() {
        for k in keys {
            assert!(union.insert(k.clone()), "{k} went to two replicas");
        }
    }
    assert_eq!(union.len(), KEYS);

    let mut owned = 0.0;
    for slot in 0..3 {
        owned += replica_metric(
            &hub,
            "edgehub_replica_partitions_owned",
            &format!("slot=\"{slot}\""),
        )
        .await
        .expect("owned gauge per slot");
    }
    assert_eq!(owned, 64.0);
    assert_eq!(
        replica_metric(&hub, "edgehub_replica_duplicates_total", "").await,
        Some(0.0)
    );
    assert_eq!(
        replica_metric(&hub, "edgehub_replica_connections_refused_total", "").await,
        Some(1.0)
    );
    for r in replicas {
        r.task.abort();
    }
    hub.stop().await;
}

/// A replica that goes away holding unacknowledged deliveries: its partitions move to the
/// others, which get those deliveries again first, then everything after them; per key, first
/// deliveries stay in order, nothing is lost, and the duplicates seen equal
/// `edgehub_replica_duplicates_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_goes_away_hands_its_partitions_over_and_duplicates_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), 3).await;
    let log = Arc::new(watch::channel(Vec::new()).0);
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(replica(&hub, n, &log).await);
    }
    // Phase 1: everything acknowledged, so nothing is in flight afterwards.
    send(&hub, 0..10).await;
    wait_for(&log, "phase 1", |l| distinct(l).len() == KEYS * 10).await;
    let a_keys = keys_by_replica(&log.borrow())
        .remove(&0)
        .expect("replica 0 has keys");

    // Phase 2: replica 0 stops acknowledging; one message per key, each key alone in its
    // partition, so it receives all of its share and holds it unacknowledged.
    replicas[0].acking.store(false, Ordering::SeqCst);
    send(&hub, 10..11).await;
    let held = a_keys.len();
    wait_for(&log, "phase 2", |l| {
        distinct(l).len() == KEYS * 11
            && l.iter().filter(|r| r.replica == 0 && r.seq >= 10).count() == held
    })
    .await;

    // Replica 0 goes away without a word: what it held goes to the others.
    replicas.remove(0).task.abort();
    wait_for(&log, "redelivered", |l| {
        l.iter()
            .filter(|r| r.replica != 0 && a_keys.contains(&r.key) && r.seq >= 10)
            .count()
            == held
    })
    .await;
    // Phase 3: the moved keys go on, in order, at the others.
    send(&hub, 11..20).await;
    wait_for(&log, "phase 3", |l| distinct(l).len() == KEYS * 20).await;

    let l = log.borrow().clone();
    assert_first_deliveries_in_order(&l, 20);
    let duplicates = l.len() - KEYS * 20;
    assert_eq!(duplicates, held, "exactly the held deliveries came twice");
    for r in l.iter().filter(|r| a_keys.contains(&r.key) && r.seq >= 11) {
        assert_ne!(r.replica, 0);
    }
    assert_eq!(
        replica_metric(&hub, "edgehub_replica_duplicates_total", "").await,
        Some(duplicates as f64)
    );
    for r in replicas {
        r.task.abort();
    }
    hub.stop().await;
}

/// Writes the manifest with `count` replicas and waits until the hub has applied it (its
/// generation metric reaches `generation`).
async fn reload_count(hub: &TestHub, count: u8, generation: u32) {
    let path = hub.root.join("manifest.json");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, manifest(count)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = http_get(hub.addrs.metrics, "/metrics")
            .await
            .expect("metrics");
        let applied = text
            .lines()
            .find(|l| l.starts_with("edgehub_manifest_generation"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|g| g >= f64::from(generation));
        if applied {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reload not applied:\n{text}"
        );
        // The reload is noticed through inotify; the generation is the event to wait for.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reload that lowers the count closes the replicas above it once they hold nothing, and the
/// one left gets every key; raising it again lets new replicas in, which take keys over; per
/// key, first deliveries stay in order throughout and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_scales_the_replicas_down_and_up() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), 3).await;
    let log = Arc::new(watch::channel(Vec::new()).0);
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(replica(&hub, n, &log).await);
    }
    send(&hub, 0..5).await;
    wait_for(&log, "at three", |l| distinct(l).len() == KEYS * 5).await;

    reload_count(&hub, 1, 2).await;
    // Slots 1 and 2 (the second and third to join) drain and are closed: their readers end.
    for r in replicas.drain(1..) {
        tokio::time::timeout(T, r.task)
            .await
            .expect("a replica above the new count is closed")
            .unwrap();
    }
    send(&hub, 5..10).await;
    wait_for(&log, "at one", |l| distinct(l).len() == KEYS * 10).await;
    assert!(
        log.borrow()
            .iter()
            .filter(|r| r.seq >= 5)
            .all(|r| r.replica == 0),
        "only the replica left receives"
    );

    reload_count(&hub, 3, 3).await;
    for n in 3..5 {
        replicas.push(replica(&hub, n, &log).await);
    }
    send(&hub, 10..15).await;
    wait_for(&log, "at three again", |l| distinct(l).len() == KEYS * 15).await;
    let l = log.borrow().clone();
    assert_eq!(
        l.len(),
        KEYS * 15,
        "nothing twice: every member settled before it moved"
    );
    assert_first_deliveries_in_order(&l, 15);
    let late: BTreeSet<usize> = l
        .iter()
        .filter(|r| r.seq >= 10)
        .map(|r| r.replica)
        .collect();
    assert_eq!(
        late,
        BTreeSet::from([0, 3, 4]),
        "the newcomers took keys over"
    );
    for r in replicas {
        r.task.abort();
    }
    hub.stop().await;
}
