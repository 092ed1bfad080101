//! A full disk must not reorder one connection's messages (issue 11, item 5).
//!
//! The real `edgehub` binary runs with its data directory on a small tmpfs the test mounts
//! (tests run as root), so ENOSPC comes from the kernel. A raw MQTT client pipelines QoS 1
//! publishes, one large then seven tiny, as a module would, and resends everything
//! not acknowledged, in order, each time the hub closes its connection. While the disk is full a
//! large message's group commit fails and a tiny one behind it would still fit in the next
//! commit: if the hub stored it, the resend would put the large one behind it. After a few
//! rounds on the full disk the tmpfs grows and the sender finishes. The receiver must then see
//! every message, the first occurrence of each in send order.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;
#[path = "support/tmpfs.rs"]
mod tmpfs;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use raw::{module_creds, BinaryHub, Creds, Event};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tmpfs::Tmpfs;

/// Messages the sender sends in all.
const TOTAL: u64 = 240;
/// Connections the sender makes while the disk is full before the tmpfs grows.
const FULL_ROUNDS: usize = 8;
/// A large message's body; a tiny one's is its sequence number only. Every eighth message is
/// large, so a run of tiny ones follows each large one.
const LARGE: usize = 48 * 1024;

/// `{seq}:`, padded to [`LARGE`] for every eighth.
fn payload(seq: u64) -> Vec<u8> {
    let mut body = format!("{seq}:").into_bytes();
    if seq.is_multiple_of(8) {
        body.resize(LARGE, b'#');
    }
    body
}

fn seq_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a payload that was never sent: {:?}", &payload[..16]))
}

/// One connection: publishes `seqs` pipelined (pkid i+1 for the i-th; resends marked DUP),
/// reading PUBACKs meanwhile, until all are acknowledged or the hub closes the connection.
/// Returns how many were acknowledged (a prefix: PUBACKs come in order).
async fn stream(hub: &BinaryHub, root: &Path, sender: &Creds, seqs: &[u64], dup: bool) -> usize {
    let mut c = hub.client(root).await;
    let ack = c.connect(sender.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (mut reader, mut writer) = c.split();
    let topic = sender.output_topic();
    let to_send = seqs.to_vec();
    let write = tokio::spawn(async move {
        for (i, seq) in to_send.into_iter().enumerate() {
            let pkid = u16::try_from(i + 1).expect("pkid");
            let mut p = raw::publish(&topic, QoS::AtLeastOnce, pkid, &payload(seq));
            p.dup = dup;
            if writer.send_unflushed(&Packet::Publish(p)).await.is_err() {
                return;
            }
            if i % 8 == 7 && writer.flush().await.is_err() {
                return;
            }
        }
        let _ = writer.flush().await;
        // Kept open until the reader is done.
        std::future::pending::<()>().await;
    });
    let mut acked = 0;
    while acked < seqs.len() {
        match reader.next(Duration::from_secs(30)).await {
            Event::Packet(Packet::PubAck(a)) => {
                assert_eq!(usize::from(a.pkid), acked + 1, "PUBACK out of order");
                acked += 1;
            }
            Event::Packet(other) => panic!("sender got {other:?}"),
            Event::Closed(_) => break,
            Event::Timeout => panic!("no PUBACK within 30 s after {acked}\n{}", hub.log_tail()),
        }
    }
    write.abort();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_reorders_one_connections_messages() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // 2 MiB: identities, certificates, the store's 1 MiB reserve and under a megabyte of log.
    let Some(tmpfs) = Tmpfs::mount(&root.join("data"), "2m") else {
        return;
    };
    // The quota is far above the tmpfs (the kernel's ENOSPC comes first) and below one
    // segment, so no segment is preallocated.
    let manifest = raw::MANIFEST.replace(
        r#""storeAndForwardConfiguration": {"timeToLiveSecs": 7200}"#,
        r#""storeAndForwardConfiguration": {"timeToLiveSecs": 7200,
            "storeLimits": {"maxSizeBytes": 33554432}}"#,
    );
    assert_ne!(manifest, raw::MANIFEST);
    std::fs::write(root.join("manifest.json"), manifest).unwrap();
    let hub = BinaryHub::start(root, 0).await;
    let sender = module_creds(&root.join("data"), "sender");
    let receiver = module_creds(&root.join("data"), "receiver");

    let all: Vec<u64> = (0..TOTAL).collect();
    let mut next = 0;
    let mut full_rounds = 0;
    let mut round = 0;
    while next < all.len() {
        let acked = stream(&hub, root, &sender, &all[next..], round > 0).await;
        println!(
            "round {round}: sent {} from seq {next}, {acked} acknowledged",
            all.len() - next
        );
        next += acked;
        round += 1;
        if next < all.len() {
            full_rounds += 1;
            if full_rounds == FULL_ROUNDS {
                tmpfs.resize("64m");
            }
        }
        assert!(
            round < FULL_ROUNDS + 5,
            "the sender never finished\n{}",
            hub.log_tail()
        );
    }
    let log = std::fs::read_to_string(&hub.log).unwrap();
    assert!(
        log.contains("disk full: batch refused"),
        "the test meant ENOSPC at commit, and it never happened\n{}",
        hub.log_tail()
    );

    let mut r = hub.client(root).await;
    let ack = r.connect(receiver.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let (sub, _) = r.subscribe(1, &[&receiver.inputs_filter()]).await;
    assert_eq!(
        sub.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // The last message is last in the queue: everything stored arrives before it.
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut first_order: Vec<u64> = Vec::new();
    let mut delivered = Vec::new();
    while seen.len() < all.len() || !delivered.ends_with(&[TOTAL - 1]) {
        let p = match r.reader.next(Duration::from_secs(30)).await {
            Event::Packet(Packet::Publish(p)) => p,
            other => panic!("after {delivered:?}: {other:?}\n{}", hub.log_tail()),
        };
        r.writer.puback(p.pkid).await;
        let seq = seq_of(&p.payload);
        delivered.push(seq);
        if seen.insert(seq) {
            first_order.push(seq);
        }
    }
    println!("delivered: {delivered:?}");
    assert_eq!(
        first_order, all,
        "first occurrences out of send order: the queue holds {delivered:?}"
    );
}
