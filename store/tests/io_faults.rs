//! Write and fdatasync failures, injected one at a time on the simulated filesystem.
//!
//! Property (lib.rs guarantee 7, DESIGN.md invariant 6): any I/O error other than ENOSPC on the
//! data write poisons the store. The failing request gets `Poisoned`, every later append and
//! checkpoint fails without touching the disk (a failed fsync is never retried: after one, the
//! kernel may have dropped the dirty pages, so a retry that succeeds would acknowledge data that
//! is not on the media), `halted_reason()` says why, and reopening recovers every message that
//! was acknowledged before. Without this, a single EIO could turn into silent loss of messages
//! the hub confirmed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use store::sim::{FaultMode, SimFs};
use store::{
    AppendError, CheckpointError, Epoch, ManualClock, Offset, QueueName, StorageError, Store,
    StoreOptions, UnixMillis,
};

const DIR: &str = "/faults";

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn open(fs: &SimFs) -> Store {
    Store::open_with(
        Path::new(DIR),
        StoreOptions {
            epoch: Epoch::new(1),
            segment_bytes: 64 << 10,
            // These tests aim faults at the writer's own operations by counting them: no
            // background preparer or reserve file adding operations in between.
            preallocate: false,
            reserve_bytes: 0,
            ..StoreOptions::default()
        },
        Arc::new(fs.clone()),
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
    .expect("open on the simulated filesystem")
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!("message {i}"))
}

fn read_all(store: &Store) -> Vec<(Offset, Bytes)> {
    store
        .read(&q("a"), Offset::ZERO, usize::MAX)
        .expect("read back")
        .into_iter()
        .map(|m| (m.offset, m.body))
        .collect()
}

/// A store holding ten acknowledged messages. Each append's mutating filesystem operations are
/// counted, so a fault planned with `fault_after(n)` lands on the operation the test means.
fn store_with_acknowledged_messages(fs: &SimFs) -> (Store, Vec<(Offset, Bytes)>) {
    let store = open(fs);
    let mut acked = Vec::new();
    for i in 0..10 {
        let before = fs.ops();
        let off = store
            .append(&[q("a")], body(i), None)
            .wait()
            .expect("append before the fault");
        acked.push((off, body(i)));
        if i > 0 {
            // The first append also declares the queue, in the same batch.
            assert_eq!(
                fs.ops() - before,
                2,
                "an append is one pwrite then one fdatasync"
            );
        }
    }
    (store, acked)
}

/// Injects a one-time EIO at the `nth` operation of the next append and checks the store is
/// poisoned for good, with `reason_mentions` in its halt reason. Returns the reopened store and
/// what was acknowledged.
fn poison_at(nth: u64, reason_mentions: &str) -> (Store, Vec<(Offset, Bytes)>, SimFs) {
    let fs = SimFs::new();
    let (store, acked) = store_with_acknowledged_messages(&fs);
    fs.fault_after(nth, FaultMode::FailOnce);
    let err = store
        .append(&[q("a")], Bytes::from_static(b"refused"), None)
        .wait()
        .expect_err("the append meets the I/O error");
    assert!(
        matches!(err, AppendError::Storage(StorageError::Poisoned(_))),
        "{err}"
    );
    let reason = store.halted_reason().expect("the store says why it halted");
    assert!(
        reason.contains(reason_mentions),
        "halt reason {reason:?} does not mention {reason_mentions:?}"
    );

    // The fault was one-shot: the filesystem works again, yet nothing is retried or written.
    let ops = fs.ops();
    let later = store
        .append(&[q("a")], Bytes::from_static(b"later"), None)
        .wait()
        .expect_err("a poisoned store refuses appends");
    assert!(
        matches!(later, AppendError::Storage(StorageError::Poisoned(_))),
        "{later}"
    );
    let (first, _) = acked[0];
    let ckpt = store
        .checkpoint(&q("a"), first)
        .wait()
        .expect_err("a poisoned store refuses checkpoints");
    assert!(
        matches!(ckpt, CheckpointError::Storage(StorageError::Poisoned(_))),
        "{ckpt}"
    );
    assert_eq!(
        fs.ops(),
        ops,
        "a poisoned store must not touch the disk again"
    );
    assert_eq!(
        read_all(&store),
        acked,
        "reads still serve what was acknowledged"
    );
    assert_eq!(store.checkpoint_of(&q("a")), Some(Offset::ZERO));
    store.close().expect("close the poisoned store");

    let reopened = open(&fs);
    assert_eq!(
        reopened.halted_reason(),
        None,
        "reopening clears the poison"
    );
    (reopened, acked, fs)
}

#[test]
fn a_failed_write_poisons_the_store_and_reopening_recovers_every_acknowledged_message() {
    let (store, acked, _) = poison_at(1, "write");
    // The failed write left half a batch behind: recovery cuts it as a torn tail.
    assert!(
        store.recovery().torn_tail.is_some(),
        "the torn batch is cut"
    );
    assert_eq!(read_all(&store), acked);
    let off = store
        .append(&[q("a")], Bytes::from_static(b"after reopen"), None)
        .wait()
        .expect("the reopened store appends");
    assert!(off > acked.last().expect("acknowledged").0);
}

#[test]
fn a_failed_fdatasync_poisons_the_store_and_reopening_recovers_every_acknowledged_message() {
    let (store, acked, _) = poison_at(2, "fdatasync");
    let read = read_all(&store);
    assert_eq!(
        read[..acked.len()],
        acked[..],
        "every acknowledged message, in order"
    );
    // The refused message's bytes were written before the fdatasync failed, and recovery cannot
    // tell them from a batch that was synced: it may come back. Nothing else may.
    assert!(
        read[acked.len()..]
            .iter()
            .all(|(_, b)| b.as_ref() == b"refused"),
        "only the refused message may follow: {:?}",
        &read[acked.len()..]
    );
    store
        .append(&[q("a")], Bytes::from_static(b"after reopen"), None)
        .wait()
        .expect("the reopened store appends");
}

#[test]
fn an_append_refused_for_a_failed_fdatasync_may_come_back_only_after_everything_acknowledged() {
    // After a failed fdatasync nobody can know which of the batch's pages reached the disk, so
    // `StorageError::Poisoned` documents the outcome as unknown: the message may be delivered
    // after reopen (a producer that resends causes a duplicate, never a loss or a reorder).
    let (store, acked, _) = poison_at(2, "fdatasync");
    let read = read_all(&store);
    assert_eq!(read[..acked.len()], acked[..]);
    assert!(
        read.len() <= acked.len() + 1,
        "at most the refused message follows"
    );
}

#[test]
fn a_power_cut_after_a_failed_fdatasync_keeps_every_acknowledged_message() {
    // What reaches the media after a failed fdatasync is unknown; whatever subset does, the
    // acknowledged messages were synced before it and survive.
    let fs = SimFs::new();
    let (store, acked) = store_with_acknowledged_messages(&fs);
    fs.fault_after(2, FaultMode::FailOnce);
    store
        .append(&[q("a")], Bytes::from_static(b"refused"), None)
        .wait()
        .expect_err("the append meets the failed fdatasync");
    for seed in 0..50 {
        let image = fs.crash_image(seed);
        let reopened = open(&image);
        let read = read_all(&reopened);
        assert_eq!(read[..acked.len()], acked[..], "crash image {seed}");
        assert!(
            read[acked.len()..]
                .iter()
                .all(|(_, b)| b.as_ref() == b"refused"),
            "crash image {seed}: only the refused message may follow"
        );
    }
}

#[test]
fn a_failed_fdatasync_of_a_checkpoint_poisons_the_store_and_the_checkpoint_never_goes_back() {
    let fs = SimFs::new();
    let (store, acked) = store_with_acknowledged_messages(&fs);
    let (third, _) = acked[2];
    let (sixth, _) = acked[5];
    store
        .checkpoint(&q("a"), third)
        .wait()
        .expect("checkpoint before the fault");
    // A checkpoint-only batch is also one write and one fdatasync; fail the fdatasync.
    fs.fault_after(2, FaultMode::FailOnce);
    let err = store
        .checkpoint(&q("a"), sixth)
        .wait()
        .expect_err("the checkpoint meets the failed fdatasync");
    assert!(
        matches!(err, CheckpointError::Storage(StorageError::Poisoned(_))),
        "{err}"
    );
    assert!(store
        .halted_reason()
        .is_some_and(|r| r.contains("fdatasync")));
    assert_eq!(
        store.checkpoint_of(&q("a")),
        Some(third),
        "a checkpoint that failed is not applied"
    );
    let later = store
        .append(&[q("a")], Bytes::from_static(b"later"), None)
        .wait()
        .expect_err("poisoned");
    assert!(
        matches!(later, AppendError::Storage(StorageError::Poisoned(_))),
        "{later}"
    );
    store.close().expect("close");
    let reopened = open(&fs);
    let ckpt = reopened.checkpoint_of(&q("a")).expect("queue known");
    assert!(
        ckpt == third || ckpt == sixth,
        "checkpoint {ckpt} is neither the acknowledged one nor the refused one"
    );
    let expected: Vec<_> = acked.iter().filter(|(o, _)| *o > ckpt).cloned().collect();
    assert_eq!(read_all(&reopened), expected);
}

#[test]
fn a_failed_segment_creation_during_rotation_poisons_the_store_and_loses_nothing() {
    let fs = SimFs::new();
    let small = |fs: &SimFs| {
        Store::open_with(
            Path::new(DIR),
            StoreOptions {
                epoch: Epoch::new(1),
                segment_bytes: 4096,
                // The plain way of making a segment, whose first operation is the file creation.
                preallocate: false,
                ..StoreOptions::default()
            },
            Arc::new(fs.clone()),
            Arc::new(ManualClock::new(UnixMillis(1_000))),
        )
        .expect("open")
    };
    let newest_len = |fs: &SimFs| {
        let mut segs = fs.files(Path::new(DIR));
        segs.retain(|n| n.ends_with(".seg"));
        segs.sort();
        let newest = segs.pop().expect("a segment");
        fs.read_file(&Path::new(DIR).join(newest))
            .expect("read segment")
            .len()
    };
    let big = |i: usize| {
        let mut b = format!("message {i} ").into_bytes();
        b.resize(1000, b'.');
        Bytes::from(b)
    };
    let store = small(&fs);
    let mut acked = Vec::new();
    // Two rotations done, and the active segment is past its size: the next append rotates, and
    // rotation's first operation is creating the new file.
    while store.stats().segments < 3 || newest_len(&fs) < 4096 {
        let b = big(acked.len());
        let off = store
            .append(&[q("a")], b.clone(), None)
            .wait()
            .expect("append");
        acked.push((off, b));
    }
    fs.fault_after(1, FaultMode::FailOnce);
    let err = store
        .append(&[q("a")], big(acked.len()), None)
        .wait()
        .expect_err("rotation fails");
    assert!(
        matches!(err, AppendError::Storage(StorageError::Poisoned(_))),
        "{err}"
    );
    let reason = store.halted_reason().expect("halted");
    assert!(reason.contains("create segment"), "{reason}");
    let ops = fs.ops();
    let later = store
        .append(&[q("a")], big(0), None)
        .wait()
        .expect_err("poisoned");
    assert!(
        matches!(later, AppendError::Storage(StorageError::Poisoned(_))),
        "{later}"
    );
    assert_eq!(fs.ops(), ops, "rotation is not retried");
    store.close().expect("close");
    let reopened = small(&fs);
    assert_eq!(read_all(&reopened), acked);
}
