//! What survives the hub's death: every PUBACKed message after `kill -9` of the real binary in
//! the middle of a pipelined QoS 1 stream, and a persistent subscription across a restart.
//!
//! The kill test runs `edgehub run` (env!("CARGO_BIN_EXE_edgehub")) as a child process on one
//! data dir, kills it with SIGKILL at seeded random moments of a raw client's stream, and starts
//! it again on the same dir. The sender behaves like an SDK: after a reconnect it sends again
//! (DUP) every message that got no PUBACK, then goes on. At the end a receiver whose persistent
//! session subscribed before the first kill, and never again, must get every message, with
//! first deliveries in send order and duplicates only of messages that were at some point sent
//! without being acknowledged. Set `EDGEHUB_TEST_SEED` to replay other kill moments.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use raw::{module_creds, BinaryHub, Creds, Event, TestHub};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);

/// One connection's stream: publishes `seqs` (pkid i+1 for the i-th; `dup` marks the resends)
/// pipelined, reading PUBACKs meanwhile. With `kill_after = Some(k)` the hub is killed the
/// moment the k-th PUBACK arrives; the PUBACKs already on their way are still read. Returns the
/// acknowledged seqs (a prefix of `seqs`: PUBACKs must come in order).
async fn stream(
    hub: &mut BinaryHub,
    root: &Path,
    sender: &Creds,
    seqs: &[(u64, bool)],
    kill_after: Option<usize>,
) -> Vec<u64> {
    let mut c = hub.client(root).await;
    let ack = c.connect(sender.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (mut reader, mut writer) = c.split();
    let topic = sender.output_topic();
    let to_send = seqs.to_vec();
    let write = tokio::spawn(async move {
        for (i, (seq, dup)) in to_send.into_iter().enumerate() {
            let mut p = raw::publish(
                &topic,
                QoS::AtLeastOnce,
                u16::try_from(i + 1).expect("pkid"),
                seq.to_string().as_bytes(),
            );
            p.dup = dup;
            if writer.send_unflushed(&Packet::Publish(p)).await.is_err() {
                return;
            }
            if i % 64 == 63 && writer.flush().await.is_err() {
                return;
            }
        }
        let _ = writer.flush().await;
        // Kept open until the reader is done.
        std::future::pending::<()>().await;
    });
    let mut acked = Vec::new();
    loop {
        if kill_after.is_none() && acked.len() == seqs.len() {
            break;
        }
        match reader.next(Duration::from_secs(30)).await {
            Event::Packet(Packet::PubAck(a)) => {
                let expected = acked.len() + 1;
                assert_eq!(
                    usize::from(a.pkid),
                    expected,
                    "PUBACK out of order (want pkid {expected})"
                );
                acked.push(seqs[acked.len()].0);
                if kill_after == Some(acked.len()) {
                    hub.kill9();
                }
            }
            Event::Packet(other) => panic!("sender got {other:?}"),
            Event::Closed(why) => {
                assert!(
                    kill_after.is_some_and(|k| acked.len() >= k),
                    "the hub closed the sender after {} PUBACKs: {why}\n{}",
                    acked.len(),
                    hub.log_tail()
                );
                break;
            }
            Event::Timeout => panic!(
                "no PUBACK within 30 s after {}\n{}",
                acked.len(),
                hub.log_tail()
            ),
        }
    }
    write.abort();
    acked
}

fn seed() -> u64 {
    std::env::var("EDGEHUB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ed9e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_kill_9_in_the_middle_of_a_pipelined_stream() {
    const KILLS: usize = 5;
    const NEW_PER_ROUND: u64 = 2000;
    let seed = seed();
    println!("seed {seed} (EDGEHUB_TEST_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("manifest.json"), raw::MANIFEST).unwrap();

    let mut hub = BinaryHub::start(root, 0).await;
    let sender = module_creds(&root.join("data"), "sender");
    let receiver = module_creds(&root.join("data"), "receiver");

    // The receiver subscribes once, with a persistent session, and goes away.
    {
        let mut r = hub.client(root).await;
        let ack = r.connect(receiver.connect(false, 60)).await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        let (sub, _) = r.subscribe(1, &[&receiver.inputs_filter()]).await;
        assert_eq!(
            sub.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        r.writer.disconnect().await;
    }

    let mut sent: BTreeSet<u64> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    // Seqs sent at least once without a PUBACK for that send: only these may be duplicated.
    let mut ever_unacked: BTreeSet<u64> = BTreeSet::new();
    let mut pending: Vec<u64> = Vec::new();
    let mut next_seq = 1u64;
    for round in 0..=KILLS {
        let new = if round == KILLS { 200 } else { NEW_PER_ROUND };
        let mut seqs: Vec<(u64, bool)> = pending.iter().map(|s| (*s, true)).collect();
        seqs.extend((next_seq..next_seq + new).map(|s| (s, false)));
        next_seq += new;
        let kill_after = (round < KILLS).then(|| rng.gen_range(1..seqs.len()));
        let got = stream(&mut hub, root, &sender, &seqs, kill_after).await;
        sent.extend(seqs.iter().map(|(s, _)| *s));
        acked.extend(&got);
        pending = seqs[got.len()..].iter().map(|(s, _)| *s).collect();
        ever_unacked.extend(&pending);
        println!(
            "round {round}: sent {} (resent {}), kill after {kill_after:?} PUBACKs, acked {}",
            seqs.len(),
            seqs.iter().filter(|(_, d)| *d).count(),
            got.len()
        );
        if round < KILLS {
            hub = BinaryHub::start(root, round + 1).await;
        }
    }
    assert!(pending.is_empty(), "the last round acknowledged everything");
    assert_eq!(acked, sent);

    // The receiver comes back without subscribing: its session does it.
    let mut r = hub.client(root).await;
    let ack = r.connect(receiver.connect(false, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(ack.session_present, "the persistent session was lost");
    let mut order: Vec<u64> = Vec::new();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    while seen.len() < acked.len() {
        let p: Publish = match r.reader.next(Duration::from_secs(20)).await {
            Event::Packet(Packet::Publish(p)) => p,
            other => panic!(
                "after {} of {} messages: {other:?}\nmissing (first 20): {:?}\n{}",
                seen.len(),
                acked.len(),
                acked
                    .iter()
                    .filter(|s| !seen.contains_key(s))
                    .take(20)
                    .collect::<Vec<_>>(),
                hub.log_tail()
            ),
        };
        r.writer.puback(p.pkid).await;
        let seq: u64 = std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a payload that was never sent: {:?}", p.payload));
        assert!(sent.contains(&seq), "seq {seq} was never sent");
        let n = seen.entry(seq).or_insert(0);
        *n += 1;
        if *n == 1 {
            if let Some(last) = order.last() {
                assert!(
                    seq > *last,
                    "first delivery of {seq} after first delivery of {last}: out of order"
                );
            }
            order.push(seq);
        } else {
            assert!(
                ever_unacked.contains(&seq),
                "seq {seq} was acknowledged on its only send yet delivered twice"
            );
        }
    }
    let dups = seen.values().filter(|n| **n > 1).count();
    println!(
        "delivered {} distinct messages, {dups} duplicated (of {} ever unacknowledged)",
        seen.len(),
        ever_unacked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscription_survives_a_hub_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(!ack.session_present);
    let (sub, _) = r.subscribe(1, &[&filter]).await;
    assert_eq!(
        sub.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // The hub stops while the receiver is still connected.
    hub.stop().await;
    let _ = r.reader.expect_closed(T).await;

    let hub = TestHub::start(dir.path()).await;
    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(
        ack.session_present,
        "the session did not survive the restart"
    );
    let (mut s, _) = hub.connected("sender", true).await;
    s.writer
        .publish(
            &hub.creds("sender").output_topic(),
            QoS::AtLeastOnce,
            1,
            b"after-restart",
        )
        .await;
    match s.reader.expect_packet(T).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let p = r.reader.expect_publish(T).await;
    assert_eq!(&p.payload[..], b"after-restart");
    r.writer.puback(p.pkid).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_durable_when_its_suback_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("manifest.json"), raw::MANIFEST).unwrap();
    let mut hub = BinaryHub::start(root, 0).await;
    let sender = module_creds(&root.join("data"), "sender");
    let receiver = module_creds(&root.join("data"), "receiver");
    let mut r = hub.client(root).await;
    let ack = r.connect(receiver.connect(false, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (sub, _) = r.subscribe(1, &[&receiver.inputs_filter()]).await;
    assert_eq!(
        sub.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    hub.kill9();

    let hub = BinaryHub::start(root, 1).await;
    let mut r = hub.client(root).await;
    let ack = r.connect(receiver.connect(false, 60)).await;
    assert!(
        ack.session_present,
        "a SUBACKed subscription was lost to kill -9"
    );
    let mut s = hub.client(root).await;
    assert_eq!(
        s.connect(sender.connect(true, 60)).await.code,
        ConnectReturnCode::Success
    );
    s.writer
        .publish(&sender.output_topic(), QoS::AtLeastOnce, 1, b"m1")
        .await;
    assert_eq!(
        s.reader.expect_packet(T).await,
        Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(1))
    );
    let p = r.reader.expect_publish(T).await;
    assert_eq!(&p.payload[..], b"m1");
}
