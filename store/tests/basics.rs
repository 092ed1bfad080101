//! The store's everyday contract, one behaviour per test, on the real filesystem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use store::{
    AppendError, CheckpointError, Epoch, Offset, OpenError, QueueName, StorageError, Store,
    StoreOptions,
};

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn opts() -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(1),
        ..StoreOptions::default()
    }
}

fn bodies(store: &Store, queue: &QueueName, after: Offset) -> Vec<Vec<u8>> {
    store
        .read(queue, after, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|m| m.body.to_vec())
        .collect()
}

#[test]
fn appends_come_back_in_order_with_increasing_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let a = q("a");
    let mut offsets = Vec::new();
    for i in 0..100u32 {
        let off = store
            .append(
                std::slice::from_ref(&a),
                Bytes::from(i.to_le_bytes().to_vec()),
                None,
            )
            .wait()
            .expect("append");
        offsets.push(off);
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets increase");
    let read = store.read(&a, Offset::ZERO, usize::MAX).expect("read");
    assert_eq!(read.iter().map(|m| m.offset).collect::<Vec<_>>(), offsets);
    for (i, m) in read.iter().enumerate() {
        assert_eq!(m.body.as_ref(), (i as u32).to_le_bytes());
    }
}

#[test]
fn a_message_for_two_queues_is_stored_once_and_read_from_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No preallocation: the prepared next segment would join the byte count in the background.
    let store = Store::open(
        dir.path(),
        StoreOptions {
            preallocate: false,
            ..opts()
        },
    )
    .expect("open");
    let (a, b) = (q("a"), q("b"));
    let body = Bytes::from(vec![7u8; 10_000]);
    let before = store.stats().bytes_on_disk;
    let off = store
        .append(&[a.clone(), b.clone()], body.clone(), None)
        .wait()
        .expect("append");
    let grew = store.stats().bytes_on_disk - before;
    assert!(grew < 2 * 10_000, "stored once: grew by {grew} bytes");
    assert_eq!(
        store.read(&a, Offset::ZERO, 10).expect("read a")[0].offset,
        off
    );
    assert_eq!(
        store.read(&b, Offset::ZERO, 10).expect("read b")[0].body,
        body
    );
}

#[test]
fn reopening_resumes_exactly_after_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = q("a");
    let offsets: Vec<Offset> = {
        let store = Store::open(dir.path(), opts()).expect("open");
        let offs: Vec<Offset> = (0..10u8)
            .map(|i| {
                store
                    .append(std::slice::from_ref(&a), Bytes::from(vec![i]), None)
                    .wait()
                    .expect("append")
            })
            .collect();
        store.checkpoint(&a, offs[3]).wait().expect("checkpoint");
        store.close().expect("close");
        offs
    };
    let store = Store::open(dir.path(), opts()).expect("reopen");
    assert_eq!(store.checkpoint_of(&a), Some(offsets[3]));
    assert_eq!(
        bodies(&store, &a, Offset::ZERO),
        (4..10u8).map(|i| vec![i]).collect::<Vec<_>>()
    );
    let next = store
        .append(std::slice::from_ref(&a), Bytes::from_static(b"x"), None)
        .wait()
        .expect("append");
    assert!(next > offsets[9], "offsets are never reused after reopen");
}

#[test]
fn a_checkpoint_past_the_last_message_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let a = q("a");
    let off = store
        .append(std::slice::from_ref(&a), Bytes::from_static(b"x"), None)
        .wait()
        .expect("append");
    let err = store
        .checkpoint(&a, Offset::new(off.get() + 1))
        .wait()
        .expect_err("ahead");
    assert!(matches!(err, CheckpointError::AheadOfData { .. }), "{err}");
    let err = store
        .checkpoint(&q("nobody"), off)
        .wait()
        .expect_err("unknown");
    assert!(matches!(err, CheckpointError::UnknownQueue(_)), "{err}");
    assert_eq!(store.checkpoint_of(&a), Some(Offset::ZERO));
}

#[test]
fn a_lower_checkpoint_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let a = q("a");
    let o1 = store
        .append(std::slice::from_ref(&a), Bytes::from_static(b"1"), None)
        .wait()
        .expect("append");
    let o2 = store
        .append(std::slice::from_ref(&a), Bytes::from_static(b"2"), None)
        .wait()
        .expect("append");
    store.checkpoint(&a, o2).wait().expect("checkpoint");
    store
        .checkpoint(&a, o1)
        .wait()
        .expect("lower checkpoint accepted");
    assert_eq!(store.checkpoint_of(&a), Some(o2));
}

#[test]
fn an_oversized_message_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        dir.path(),
        StoreOptions {
            max_message_bytes: 1000,
            ..opts()
        },
    )
    .expect("open");
    let a = q("a");
    let err = store
        .append(std::slice::from_ref(&a), Bytes::from(vec![0u8; 1001]), None)
        .wait()
        .expect_err("too large");
    assert!(matches!(
        err,
        AppendError::TooLarge {
            size: 1001,
            max: 1000
        }
    ));
    assert!(store.read(&a, Offset::ZERO, 10).expect("read").is_empty());
}

#[test]
fn a_lower_epoch_cannot_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(5),
            ..opts()
        },
    )
    .expect("open");
    s.close().expect("close");
    let err = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(4),
            ..opts()
        },
    )
    .expect_err("lower epoch");
    assert!(
        matches!(err, OpenError::EpochFenced { requested, current } if requested == Epoch::new(4) && current == Epoch::new(5)),
        "{err}"
    );
    Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(5),
            ..opts()
        },
    )
    .expect("same epoch reopens");
}

#[test]
fn a_newer_epoch_makes_the_older_owners_next_commit_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = q("a");
    let old = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(1),
            ..opts()
        },
    )
    .expect("open");
    let acked = old
        .append(
            std::slice::from_ref(&a),
            Bytes::from_static(b"before"),
            None,
        )
        .wait()
        .expect("append");
    let new = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(2),
            ..opts()
        },
    )
    .expect("open newer");
    let err = old
        .append(
            std::slice::from_ref(&a),
            Bytes::from_static(b"zombie"),
            None,
        )
        .wait()
        .expect_err("fenced");
    assert!(
        matches!(err, AppendError::Storage(StorageError::Fenced)),
        "{err}"
    );
    assert!(matches!(
        old.checkpoint(&a, acked).wait(),
        Err(CheckpointError::Storage(StorageError::Fenced))
    ));
    // The new owner sees what the old one acknowledged, and nothing the old one was refused.
    assert_eq!(bodies(&new, &a, Offset::ZERO), vec![b"before".to_vec()]);
    drop(old);
    drop(new);
    let again = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(2),
            ..opts()
        },
    )
    .expect("reopen");
    assert_eq!(bodies(&again, &a, Offset::ZERO), vec![b"before".to_vec()]);
}

#[test]
fn stats_count_an_append_as_soon_as_it_is_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    for n in 1..=50u64 {
        store
            .append(&[q("a")], Bytes::from_static(b"x"), None)
            .wait()
            .expect("append");
        assert_eq!(store.stats().appends, n);
    }
}

#[test]
fn every_group_commit_fdatasync_is_timed_into_one_latency_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let empty = store.stats().commit_syncs;
    assert_eq!(
        empty.counts.len(),
        store::SYNC_LATENCY_BOUNDS_MICROS.len() + 1
    );
    for _ in 0..20 {
        store
            .append(&[q("a")], Bytes::from_static(b"x"), None)
            .wait()
            .expect("append");
    }
    let stats = store.stats();
    let timed: u64 =
        stats.commit_syncs.counts.iter().sum::<u64>() - empty.counts.iter().sum::<u64>();
    // One timing per group commit (each sequential append is one); the syncs of segment
    // headers are not group commits and are not timed here.
    assert_eq!(timed, stats.commits);
    assert!(timed >= 20, "{stats:?}");
    assert!(
        stats.commit_syncs.sum_micros > 0,
        "a real fdatasync takes time: {stats:?}"
    );
}

#[tokio::test]
async fn appends_can_be_awaited_and_complete_in_submission_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let a = q("a");
    let pending: Vec<_> = (0..50u8)
        .map(|i| store.append(std::slice::from_ref(&a), Bytes::from(vec![i]), None))
        .collect();
    let mut last = Offset::ZERO;
    for p in pending {
        let off = p.await.expect("append");
        assert!(off > last);
        last = off;
    }
    let stats = store.stats();
    assert!(
        stats.syncs < 50 + 5,
        "group commit shares fdatasyncs: {} syncs",
        stats.syncs
    );
}
