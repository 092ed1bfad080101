//! `StoreOptions::commit_on_caller`: a producer that finds the writer idle commits its own append
//! on its own thread (issue 18: a lone message costs no thread wake-up on either side of its
//! fdatasync). The promise stays the store's: durable before answered, and one order for every
//! queue, whichever thread wrote which batch. The power-cut suite (`crash_points.rs`), the model
//! test (`model.rs`) and the panic test (`writer_panic.rs`) run with it on as well.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use store::sim::SimFs;
use store::{AppendChain, Epoch, ManualClock, Offset, QueueName, Store, StoreOptions, UnixMillis};

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

/// On the simulated disk, with no limit on the last sync's duration, so what the test sees
/// depends on the option alone.
fn open(fs: &SimFs, commit_on_caller: bool) -> Store {
    open_sized(fs, commit_on_caller, StoreOptions::default().segment_bytes)
}

fn open_sized(fs: &SimFs, commit_on_caller: bool, segment_bytes: u64) -> Store {
    Store::open_with(
        Path::new("/caller"),
        StoreOptions {
            epoch: Epoch::new(1),
            preallocate: false,
            commit_on_caller,
            segment_bytes,
            // A sync measured long because the machine preempted the writer must not decide
            // here (the 2 ms default is for real disks).
            caller_commit_max_sync: std::time::Duration::MAX,
            ..StoreOptions::default()
        },
        Arc::new(fs.clone()),
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
    .expect("open on the simulated filesystem")
}

/// A producer that waits for each append, as an SDK module's connection does.
fn sequential_appends(store: &Store, n: usize) -> Vec<Offset> {
    let a = q("a");
    let chain = AppendChain::new();
    chain.set_producer_waits(true);
    (0..n)
        .map(|i| {
            store
                .append_in(
                    &chain,
                    std::slice::from_ref(&a),
                    Bytes::from(format!("m{i}")),
                    None,
                )
                .wait()
                .expect("append")
        })
        .collect()
}

#[test]
fn lone_appends_are_committed_on_the_callers_thread_only_when_the_option_is_on() {
    for on in [false, true] {
        let fs = SimFs::new();
        let store = open(&fs, on);
        let offsets = sequential_appends(&store, 50);
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        let stats = store.stats();
        assert_eq!(stats.appends, 50);
        if on {
            // The writer thread holds the writer only for its once-a-second retention tick, so
            // nearly every lone append finds it free; a loaded machine may delay a few.
            assert!(
                stats.caller_commits >= 25,
                "only {} of 50 lone appends were committed by their caller",
                stats.caller_commits
            );
        } else {
            assert_eq!(stats.caller_commits, 0, "the option is off");
        }
        let read = store.read(&q("a"), Offset::ZERO, 100).expect("read");
        let bodies: Vec<_> = read.iter().map(|m| m.body.clone()).collect();
        let expected: Vec<_> = (0..50).map(|i| Bytes::from(format!("m{i}"))).collect();
        assert_eq!(bodies, expected);
        // An append on no chain, or on one whose producer did not say it waits, may have more
        // behind it: never the caller's.
        store
            .append(&[q("b")], Bytes::from("unchained"), None)
            .wait()
            .expect("append");
        let silent = AppendChain::new();
        for i in 0..5 {
            store
                .append_in(&silent, &[q("b")], Bytes::from(format!("s{i}")), None)
                .wait()
                .expect("append");
        }
        assert_eq!(store.stats().caller_commits, stats.caller_commits);
        store.close().expect("close");

        // Durable: a reopen (with either setting) reads the same.
        let reopened = open(&fs, !on);
        let again = reopened.read(&q("a"), Offset::ZERO, 100).expect("read");
        assert_eq!(again.len(), 50);
    }
}

/// Starting a segment (sync the old one, create the next, read the old one back for its sidecar)
/// is the writer thread's work: a lone append that would start one goes to the thread.
#[test]
fn a_caller_never_commits_the_batch_that_starts_a_new_segment() {
    let fs = SimFs::new();
    let store = open_sized(&fs, true, 4096);
    let a = q("a");
    let chain = AppendChain::new();
    chain.set_producer_waits(true);
    for i in 0..30 {
        let body = Bytes::from(vec![b'x'; 1000 + i]);
        store
            .append_in(&chain, std::slice::from_ref(&a), body, None)
            .wait()
            .expect("append");
    }
    let stats = store.stats();
    let rotations = stats.segments as u64 - 1;
    assert!(rotations >= 5, "only {rotations} rotations");
    assert!(stats.caller_commits > 0, "no append was its caller's");
    assert!(
        stats.caller_commits + rotations <= 30,
        "{} caller commits and {rotations} rotations in 30 lone appends: a caller rotated",
        stats.caller_commits
    );
    assert_eq!(store.read(&a, Offset::ZERO, 100).expect("read").len(), 30);
}

#[test]
fn concurrent_producers_keep_their_own_order_when_callers_and_the_thread_both_commit() {
    let fs = SimFs::new();
    let store = open(&fs, true);
    const PRODUCERS: usize = 6;
    const EACH: usize = 300;
    let threads: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let store = store.clone();
            std::thread::spawn(move || {
                let chain = AppendChain::new();
                // Says it waits, yet pipelines: only appends with nothing else outstanding
                // (the first of each burst) can be the caller's.
                chain.set_producer_waits(true);
                let queues = [q("all"), q(&format!("p{p}"))];
                // Pipelined as a connection does: several appends in flight, awaited in order.
                let mut pending = std::collections::VecDeque::new();
                let mut offsets = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let body = Bytes::from(format!("{p}:{i}"));
                    pending.push_back(store.append_in(&chain, &queues, body, None));
                    if pending.len() == 8 || i + 1 == EACH {
                        while let Some(p) = pending.pop_front() {
                            offsets.push(p.wait().expect("append"));
                        }
                    }
                }
                offsets
            })
        })
        .collect();
    let mut all_offsets = HashSet::new();
    for (p, t) in threads.into_iter().enumerate() {
        let offsets = t.join().expect("producer");
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "producer {p}'s offsets go back"
        );
        for o in offsets {
            assert!(all_offsets.insert(o), "offset {o:?} handed out twice");
        }
        let own = store
            .read(&q(&format!("p{p}")), Offset::ZERO, EACH + 1)
            .expect("read");
        let bodies: Vec<_> = own.iter().map(|m| m.body.clone()).collect();
        let expected: Vec<_> = (0..EACH).map(|i| Bytes::from(format!("{p}:{i}"))).collect();
        assert_eq!(bodies, expected, "producer {p}'s queue is out of order");
    }
    let all = store
        .read(&q("all"), Offset::ZERO, usize::MAX)
        .expect("read");
    assert_eq!(all.len(), PRODUCERS * EACH);
    assert!(all.windows(2).all(|w| w[0].offset < w[1].offset));
    assert!(
        store.stats().caller_commits > 0,
        "no producer committed its own append"
    );
}

#[test]
fn appends_made_while_a_caller_commits_wait_for_the_writer_thread_and_come_after_it() {
    let fs = SimFs::new();
    let store = open(&fs, true);
    let a = q("a");
    // A producer commits its lone append on its own thread and is held inside the fdatasync.
    // (Should the writer thread hold the writer at that moment, for its retention tick, the
    // append goes to the thread instead: then try again.)
    let mut acked = Vec::new();
    let first = loop {
        let before = store.stats().caller_commits;
        fs.hold_syncs();
        let first = {
            let store = store.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                let chain = AppendChain::new();
                chain.set_producer_waits(true);
                let body = Bytes::from("first");
                let pending = store.append_in(&chain, std::slice::from_ref(&a), body, None);
                pending.wait().expect("first append")
            })
        };
        fs.wait_for_held_sync();
        if store.stats().caller_commits == before + 1 {
            break first;
        }
        fs.release_syncs();
        acked.push(first.join().expect("first producer"));
        assert!(acked.len() < 20, "the writer thread was never idle");
    };
    let (caller_commits, commits) = (store.stats().caller_commits, store.stats().commits);
    // Meanwhile others append: the writer is taken, so they wait in the inbox for the thread.
    let later: Vec<_> = (0..5)
        .map(|i| {
            store.append(
                std::slice::from_ref(&a),
                Bytes::from(format!("later {i}")),
                None,
            )
        })
        .collect();
    fs.release_syncs();
    let first = first.join().expect("first producer");
    let later: Vec<Offset> = later
        .into_iter()
        .map(|p| p.wait().expect("later"))
        .collect();
    assert!(later.iter().all(|&o| o > first), "{first:?} then {later:?}");
    assert!(later.windows(2).all(|w| w[0] < w[1]), "{later:?}");
    let stats = store.stats();
    assert_eq!(
        stats.caller_commits, caller_commits,
        "the waiting appends went to the writer thread"
    );
    assert_eq!(
        stats.commits,
        commits + 2,
        "one commit by the caller, one batch by the thread"
    );
    let bodies: Vec<_> = store
        .read(&a, Offset::ZERO, 100)
        .expect("read")
        .into_iter()
        .map(|m| m.body)
        .collect();
    let mut expected = vec![Bytes::from("first"); acked.len() + 1];
    expected.extend((0..5).map(|i| Bytes::from(format!("later {i}"))));
    assert_eq!(bodies, expected);
}
