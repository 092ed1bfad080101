//! Flow control for online endpoints (issue 18), end to end over TLS MQTT: two producers feed
//! one module input. While its receiver is connected and lags, the hub stops reading the
//! producers, so the endpoint's queue stays near the bound; while the receiver is away, the
//! producers are never held and the backlog passes the bound (store and forward).
//!
//! The bound is checked against the store's own count (`edgehub_queue_length` on `/metrics`),
//! never against timings. Every wait is for a condition (a packet, a metric value) with a
//! deadline that only bounds a failure.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::collections::BTreeMap;
use std::time::Duration;

use raw::{http_get, RawReader, TestHub};
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tokio::task::JoinHandle;

/// Bounds a failure only.
const T: Duration = Duration::from_secs(60);
/// The bound the hub runs with here.
const BOUND: u64 = 50;
/// Producers, each its own connection (`sender` and `spy`, both routed into the receiver).
const PRODUCERS: [&str; 2] = ["sender", "spy"];
/// The endpoint worker's batch: messages completed but whose checkpoint is not durable yet are
/// still in the store's count, so it may exceed the lag by up to one batch.
const WORKER_BATCH: u64 = 100;

const MANIFEST: &str = r#"{"modulesContent": {
  "$edgeAgent": {"properties.desired": {"modules": {"sender": {}, "receiver": {}, "spy": {}, "looper": {}}}},
  "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
    "routes": {
      "senderToReceiver": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")",
      "spyToReceiver": "FROM /messages/modules/spy/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")",
      "looperToItself": "FROM /messages/modules/looper/outputs/* INTO BrokeredEndpoint(\"/modules/looper/inputs/input1\")"},
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}}"#;

async fn start_hub(dir: &std::path::Path) -> TestHub {
    std::fs::write(dir.join("manifest.json"), MANIFEST).unwrap();
    TestHub::start_with(dir, |raw| raw.flow_control_max_lag = Some(BOUND)).await
}

async fn metrics(hub: &TestHub) -> String {
    http_get(hub.addrs.metrics, "/metrics")
        .await
        .expect("/metrics answers")
}

/// The value of the series `name{…endpoint="receiver/input1"…}` (0 if absent).
fn receiver_series(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("endpoint=\"receiver/input1\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `/metrics` until `done` holds for it (or panics after [`T`]); returns that scrape.
async fn wait_metrics(hub: &TestHub, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = metrics(hub).await;
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {T:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A producer: writes `n` QoS 1 publishes (packet ids 1..=n) as fast as the hub reads them,
/// while another task counts PUBACKs. Returns the PUBACK count once all `n` came back.
struct Producer {
    writer: JoinHandle<()>,
    acks: JoinHandle<u16>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

async fn produce(hub: &TestHub, module: &str, n: u16) -> Producer {
    let (client, _) = hub.connected(module, true).await;
    let topic = hub.creds(module).output_topic();
    let (mut reader, mut writer) = client.split();
    let tag = module.to_owned();
    let writer = tokio::spawn(async move {
        for i in 1..=n {
            writer
                .publish(&topic, QoS::AtLeastOnce, i, format!("{tag}:{i}").as_bytes())
                .await;
        }
    });
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = std::sync::Arc::clone(&acked);
    let acks = tokio::spawn(async move {
        let mut got = 0u16;
        while got < n {
            match reader.expect_packet(T).await {
                Packet::PubAck(_) => {
                    got += 1;
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                other => panic!("a producer got {other:?}"),
            }
        }
        got
    });
    Producer {
        writer,
        acks,
        acked,
    }
}

/// Reads and acknowledges `n` messages; checks each producer's messages arrive in order.
async fn receive_in_order(reader: &mut RawReader, writer: &mut raw::RawWriter, n: usize) {
    let mut next: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..n {
        let p = reader.expect_publish(T).await;
        writer.puback(p.pkid).await;
        let text = String::from_utf8_lossy(&p.payload).into_owned();
        let (who, seq) = text.split_once(':').expect("producer:seq");
        let seq: u32 = seq.parse().expect("seq");
        let expected = next.entry(who.to_owned()).or_insert(1);
        assert_eq!(seq, *expected, "{who}'s messages out of order or missing");
        *expected += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_are_held_while_an_online_receiver_lags_so_its_queue_stays_near_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path()).await;
    let receiver = hub.subscribed_receiver("receiver").await;
    let (mut r_reader, mut r_writer) = receiver.split();
    const N: u16 = 600;
    let mut producers = Vec::new();
    for module in PRODUCERS {
        producers.push(produce(&hub, module, N).await);
    }
    // The receiver reads nothing yet: both producers end up held.
    let held = wait_metrics(&hub, "both producers held", |m| {
        receiver_series(m, "edgehub_flow_control_holds_total") >= 2.0
            && receiver_series(m, "edgehub_flow_control_lag") > BOUND as f64
    })
    .await;
    let producers_n = PRODUCERS.len() as u64;
    // Nothing is completed while the receiver reads nothing, so the store's count is the lag:
    // at most one message per producer past the bound (each is held after the publish that
    // crossed it).
    let queued = receiver_series(&held, "edgehub_queue_length");
    assert!(
        queued <= (BOUND + producers_n) as f64,
        "queue {queued} passed the bound {BOUND} + {producers_n}\n{held}"
    );
    let acked: u64 = producers
        .iter()
        .map(|p| p.acked.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert!(
        acked <= BOUND + producers_n,
        "{acked} PUBACKs: only what was stored is acknowledged"
    );
    // The receiver now reads (one message at a time, acknowledging each). While it drains, every
    // scrape's queue length stays within the bound, the producers and one batch in commit.
    let drain = tokio::spawn(async move {
        receive_in_order(
            &mut r_reader,
            &mut r_writer,
            usize::from(N) * PRODUCERS.len(),
        )
        .await;
        (r_reader, r_writer)
    });
    let limit = (BOUND + producers_n + WORKER_BATCH) as f64;
    let mut scrapes = 0;
    let mut highest = 0.0f64;
    while !drain.is_finished() {
        let m = metrics(&hub).await;
        let queued = receiver_series(&m, "edgehub_queue_length");
        highest = highest.max(queued);
        assert!(
            queued <= limit,
            "while the receiver is online its queue reached {queued} (> {limit})\n{m}"
        );
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_r_reader, _r_writer) = tokio::time::timeout(T, drain)
        .await
        .expect("the receiver got everything")
        .unwrap();
    for p in producers {
        p.writer.await.unwrap();
        assert_eq!(p.acks.await.unwrap(), N, "every publish acknowledged");
    }
    let m = metrics(&hub).await;
    assert!(
        receiver_series(&m, "edgehub_flow_control_held_seconds_total") > 0.0,
        "held time counted\n{m}"
    );
    eprintln!("{scrapes} scrapes while draining, highest queue length {highest}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_are_never_held_while_the_receiver_is_away_and_the_backlog_passes_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path()).await;
    // The receiver was there and went away: its endpoint is offline.
    let mut receiver = hub.subscribed_receiver("receiver").await;
    receiver.writer.disconnect().await;
    receiver.reader.expect_closed(T).await;
    const N: u16 = 300;
    let mut producers = Vec::new();
    for module in PRODUCERS {
        producers.push(produce(&hub, module, N).await);
    }
    for p in producers {
        p.writer.await.unwrap();
        assert_eq!(
            tokio::time::timeout(T, p.acks)
                .await
                .expect("every publish acknowledged while the receiver is away")
                .unwrap(),
            N
        );
    }
    let m = metrics(&hub).await;
    let total = u64::from(N) * PRODUCERS.len() as u64;
    assert_eq!(
        receiver_series(&m, "edgehub_queue_length"),
        total as f64,
        "the whole backlog is stored\n{m}"
    );
    assert!(total > BOUND);
    assert_eq!(
        receiver_series(&m, "edgehub_flow_control_holds_total"),
        0.0,
        "nobody held\n{m}"
    );
    // It comes back and gets everything, in order.
    let receiver = hub.subscribed_receiver("receiver").await;
    let (mut r_reader, mut r_writer) = receiver.split();
    receive_in_order(
        &mut r_reader,
        &mut r_writer,
        usize::try_from(total).unwrap(),
    )
    .await;
    hub.stop().await;
}

/// A module whose output is routed to its own input: held by its own input, it must still be
/// read, or the PUBACKs of the deliveries to it (which are what lets that input catch up) would
/// wait behind the held publish forever. It sends with up to 100 publishes unacknowledged, as
/// clients do, and acknowledges every delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_feeds_its_own_input_is_not_held_forever_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path()).await;
    let (mut looper, _) = hub.connected("looper", true).await;
    let filter = hub.creds("looper").inputs_filter();
    let (ack, _) = looper.subscribe(1, &[&filter]).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let topic = hub.creds("looper").output_topic();
    let (mut reader, mut writer) = looper.split();
    const N: u16 = 600;
    const WINDOW: usize = 100;
    // One writer for publishes and PUBACKs, in the order they are queued.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Packet>();
    let write = tokio::spawn(async move {
        while let Some(p) = out_rx.recv().await {
            if writer.try_send(&p).await.is_err() {
                return;
            }
        }
    });
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let publishes = {
        let (out_tx, window) = (out_tx.clone(), std::sync::Arc::clone(&window));
        tokio::spawn(async move {
            for i in 1..=N {
                window.acquire().await.unwrap().forget();
                let p = raw::publish(
                    &topic,
                    QoS::AtLeastOnce,
                    i,
                    format!("looper:{i}").as_bytes(),
                );
                out_tx.send(Packet::Publish(p)).unwrap();
            }
        })
    };
    let (mut acked, mut received) = (0u16, 0u16);
    while acked < N || received < N {
        match reader.expect_packet(T).await {
            Packet::PubAck(_) => {
                acked += 1;
                window.add_permits(1);
            }
            Packet::Publish(p) => {
                received += 1;
                assert_eq!(
                    String::from_utf8_lossy(&p.payload),
                    format!("looper:{received}"),
                    "in order, nothing missing"
                );
                out_tx
                    .send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)))
                    .unwrap();
            }
            other => panic!("looper got {other:?}"),
        }
    }
    publishes.await.unwrap();
    let m = metrics(&hub).await;
    let holds = m
        .lines()
        .find(|l| l.starts_with("edgehub_flow_control_holds_total{") && l.contains("looper/input1"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        holds > 0.0,
        "it was held by its own input at least once\n{m}"
    );
    drop(out_tx);
    let _ = write.await;
    hub.stop().await;
}
