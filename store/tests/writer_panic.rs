//! A bug that panics the writer thread, injected on the simulated filesystem.
//!
//! Property (issue 11, item 10): a writer that dies halts the store like an I/O failure does.
//! The request whose batch was being written, the requests already waiting behind it and every
//! later append, checkpoint, retention run and read fail with an error that says the writer
//! panicked; `halted_reason()` (what `/healthz` reports) says so too, and reopening recovers
//! every message acknowledged before. Without this, every producer of the hub would wait forever
//! on a store that can no longer answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use store::sim::{FaultMode, SimFs};
use store::{
    Closable, CloseError, Epoch, ManualClock, Offset, Pending, QueueName, Store, StoreOptions,
    UnixMillis,
};

const DIR: &str = "/panics";

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn open(fs: &SimFs) -> Store {
    open_as(fs, false)
}

fn open_as(fs: &SimFs, commit_on_caller: bool) -> Store {
    Store::open_with(
        Path::new(DIR),
        StoreOptions {
            epoch: Epoch::new(1),
            commit_on_caller,
            // Only the writer thread touches the simulated disk: the fault lands on its sync.
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

/// Waits for a request's answer on another thread. The bound only turns a request that is never
/// answered (the bug under test) into a failure instead of a hung test; a correct store answers
/// at once.
fn answer<T, E>(pending: Pending<T, E>) -> Result<T, E>
where
    T: Send + 'static,
    E: Closable + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(pending.wait());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the store left a request waiting after its writer thread died")
}

fn says_panicked(err: &impl std::fmt::Display) -> bool {
    err.to_string().contains("panicked")
}

#[test]
fn a_panic_in_the_writer_fails_every_waiting_and_later_request_and_reports_why() {
    let fs = SimFs::new();
    let store = open(&fs);
    let a = q("a");
    let acked = store
        .append(std::slice::from_ref(&a), body(0), None)
        .wait()
        .expect("append before the panic");

    // The writer is inside the fdatasync of `stalled`'s batch while two more requests wait.
    fs.hold_syncs();
    let stalled = store.append(std::slice::from_ref(&a), body(1), None);
    fs.wait_for_held_sync();
    let queued_append = store.append(std::slice::from_ref(&a), body(2), None);
    let queued_checkpoint = store.checkpoint(&a, acked);
    fs.fault_after(1, FaultMode::Panic);
    fs.release_syncs();

    let err = answer(stalled).expect_err("the batch being written when the writer died");
    assert!(says_panicked(&err), "{err}");
    let err = answer(queued_append).expect_err("an append waiting behind it");
    assert!(says_panicked(&err), "{err}");
    let err = answer(queued_checkpoint).expect_err("a checkpoint waiting behind it");
    assert!(says_panicked(&err), "{err}");

    let reason = store.halted_reason().expect("the store is halted");
    assert!(reason.contains("panicked"), "{reason}");
    let err =
        answer(store.append(std::slice::from_ref(&a), body(3), None)).expect_err("a later append");
    assert!(says_panicked(&err), "{err}");
    let err = answer(store.checkpoint(&a, acked)).expect_err("a later checkpoint");
    assert!(says_panicked(&err), "{err}");
    let err = answer(store.reclaim()).expect_err("a later retention run");
    assert!(says_panicked(&err), "{err}");
    let err = store
        .read(&a, Offset::ZERO, 10)
        .expect_err("a read from an index the dead writer may have left half-updated");
    assert!(says_panicked(&err), "{err}");
    assert!(matches!(store.close(), Err(CloseError::WriterPanicked)));

    // Nothing acknowledged is lost; the batch that died has an unknown outcome (never a reorder).
    let reopened = open(&fs);
    let read = reopened
        .read(&a, Offset::ZERO, 10)
        .expect("read after reopen");
    assert_eq!(
        read.first().map(|m| (m.offset, m.body.clone())),
        Some((acked, body(0)))
    );
    assert!(
        read.len() <= 2,
        "only the stalled append may have reached the disk"
    );
    assert!(read.iter().skip(1).all(|m| m.body == body(1)));
}

/// With `commit_on_caller`, the panic happens on the producer's own thread, inside its append:
/// it must not unwind into the producer, and it halts the store exactly as the writer thread's.
#[test]
fn a_panic_while_a_caller_commits_its_own_append_halts_the_store_without_unwinding_into_it() {
    let fs = SimFs::new();
    let store = open_as(&fs, true);
    let a = q("a");
    let chain = store::AppendChain::new();
    chain.set_producer_waits(true);
    let acked = store
        .append_in(&chain, std::slice::from_ref(&a), body(0), None)
        .wait()
        .expect("append before the panic");
    let before = store.stats().caller_commits;
    fs.fault_after(1, FaultMode::Panic);
    // Appended on a new chain (the first failed one breaks its chain), alone, writer idle.
    let mut attempts = 0;
    let err = loop {
        attempts += 1;
        let chain = store::AppendChain::new();
        chain.set_producer_waits(true);
        let pending = store.append_in(&chain, std::slice::from_ref(&a), body(attempts), None);
        if let Err(e) = answer(pending) {
            break e;
        }
        assert!(attempts < 20, "no append met the injected panic");
    };
    assert!(says_panicked(&err), "{err}");
    assert!(
        store.stats().caller_commits > before,
        "the panic was meant to hit a caller's commit"
    );
    let reason = store.halted_reason().expect("the store is halted");
    assert!(reason.contains("panicked"), "{reason}");
    let err =
        answer(store.append(std::slice::from_ref(&a), body(99), None)).expect_err("a later append");
    assert!(says_panicked(&err), "{err}");
    assert!(matches!(store.close(), Err(CloseError::WriterPanicked)));
    let reopened = open(&fs);
    let read = reopened
        .read(&a, Offset::ZERO, 10)
        .expect("read after reopen");
    assert_eq!(read.first().map(|m| m.offset), Some(acked));
}
