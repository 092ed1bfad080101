//! Sidecar index files (DESIGN.md "Sidecar index files"): a store opened from its sidecars
//! answers exactly as one opened by scanning every segment; a missing, stale or damaged sidecar
//! is ignored (the segment scanned, the sidecar written again); and the in-memory index does not
//! grow with the messages held in sealed segments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use store::{
    Epoch, ManualClock, Offset, OsFs, QueueName, QueueStats, Store, StoreOptions, UnixMillis,
};

fn q(name: &str) -> QueueName {
    QueueName::new(name).unwrap()
}

const NOW: u64 = 1_000_000;

fn opts(segment_bytes: u64) -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(1),
        segment_bytes,
        ..StoreOptions::default()
    }
}

fn open(dir: &Path, segment_bytes: u64, now: u64) -> Store {
    let clock = Arc::new(ManualClock::new(UnixMillis(now)));
    Store::open_with(dir, opts(segment_bytes), Arc::new(OsFs), clock).expect("open")
}

fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
    }
    to
}

/// A closed store over many 4 KiB segments: three queues with fan-out, some messages expired
/// at `NOW`, `a` checkpointed in the middle of a segment and `c` a little further.
fn build() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4096, NOW - 10_000);
    // Groups of 8 appends share a commit; a 4 KiB segment takes two or three of them.
    for round in 0..30u64 {
        let mut pending = Vec::new();
        for i in 0..8u64 {
            let n = round * 8 + i;
            let queues = match n % 3 {
                0 => vec![q("a"), q("b")],
                1 => vec![q("a")],
                _ => vec![q("b"), q("c")],
            };
            // Every seventh message expires before `NOW`.
            let expiry = (n % 7 == 0).then_some(UnixMillis(NOW - 1));
            let body = format!("message {n:05} {}", "~".repeat(150 + (n % 50) as usize));
            pending.push(store.append(&queues, Bytes::from(body), expiry));
        }
        for p in pending {
            p.wait().expect("append");
        }
    }
    store.checkpoint(&q("a"), Offset::new(77)).wait().unwrap();
    store.checkpoint(&q("c"), Offset::new(120)).wait().unwrap();
    store.close().unwrap();
    dir
}

/// What a store answers to a fixed sequence of reads, checkpoints and stats.
#[derive(Debug, PartialEq, Eq)]
struct Answers {
    reads: Vec<Vec<(u64, Bytes)>>,
    stats: Vec<Vec<QueueStats>>,
}

fn sorted_stats(store: &Store) -> Vec<QueueStats> {
    let mut s = store.stats().queues;
    s.sort_by(|x, y| x.name.cmp(&y.name));
    s
}

fn read(answers: &mut Answers, store: &Store, name: &str, after: u64, max: usize) {
    let got = store
        .read(&q(name), Offset::new(after), max)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset.get(), m.body))
        .collect();
    answers.reads.push(got);
}

fn exercise(store: &Store) -> Answers {
    let mut answers = Answers {
        reads: Vec::new(),
        stats: Vec::new(),
    };
    answers.stats.push(sorted_stats(store));
    for name in ["a", "b", "c"] {
        read(&mut answers, store, name, 0, usize::MAX);
        read(&mut answers, store, name, 50, 7);
        read(&mut answers, store, name, 130, 30);
    }
    answers.stats.push(sorted_stats(store));
    // A checkpoint that ends inside a sealed segment, then reads around it.
    store.checkpoint(&q("b"), Offset::new(101)).wait().unwrap();
    read(&mut answers, store, "b", 0, 10);
    read(&mut answers, store, "b", 150, usize::MAX);
    answers.stats.push(sorted_stats(store));
    answers
}

#[test]
fn a_store_opened_from_sidecars_answers_as_one_that_scanned_every_segment() {
    let base = build();
    let sidecars = files_with(base.path(), "idx");
    let segments = files_with(base.path(), "seg");
    assert!(segments.len() > 10, "{} segments", segments.len());
    assert!(
        sidecars.len() + 2 >= segments.len(),
        "{} sidecars for {} segments",
        sidecars.len(),
        segments.len()
    );

    let with = copy_dir(base.path());
    let store = open(with.path(), 4096, NOW);
    let report = store.recovery().clone();
    assert_eq!(report.from_sidecar, sidecars.len());
    assert_eq!(report.sidecars_rejected, 0);
    let from_sidecars = exercise(&store);
    store.close().unwrap();

    let without = copy_dir(base.path());
    for s in files_with(without.path(), "idx") {
        std::fs::remove_file(s).unwrap();
    }
    let store = open(without.path(), 4096, NOW);
    assert_eq!(store.recovery().from_sidecar, 0);
    assert!(store.recovery().sidecars_written >= sidecars.len());
    let scanned = exercise(&store);
    store.close().unwrap();

    assert_eq!(from_sidecars, scanned);
    // The answers are not trivial: every queue had messages, some expired, some delivered.
    assert!(from_sidecars.reads.iter().all(|r| !r.is_empty()));
    let first = &from_sidecars.stats[1];
    assert!(first.iter().all(|s| s.undelivered > 0 && s.expired > 0));

    // The scan wrote the sidecars again: the next open takes every segment from them but the
    // last two opens' last segments, which were the tails of a writer when scanned.
    assert_all_sidecars_used(without.path());
}

/// Opens the store and checks that every sidecar was used, and that only the last two opens'
/// last segments were scanned (each was a writer's tail when scanned, and a tail gets no
/// sidecar). Retention may have deleted some segments (and their sidecars) in between.
fn assert_all_sidecars_used(dir: &Path) {
    let segments = files_with(dir, "seg").len();
    let sidecars = files_with(dir, "idx").len();
    let store = open(dir, 4096, NOW);
    let report = store.recovery().clone();
    assert_eq!(report.sidecars_rejected, 0, "{report:?}");
    assert_eq!(report.from_sidecar, sidecars, "{report:?}");
    assert!(report.from_sidecar + 2 >= segments, "{report:?}");
    store.close().unwrap();
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at % b.len();
    b[at] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn damaged_stale_or_missing_sidecars_are_ignored_and_the_segments_scanned() {
    let base = build();
    let reference = {
        let copy = copy_dir(base.path());
        let store = open(copy.path(), 4096, NOW);
        let a = exercise(&store);
        store.close().unwrap();
        a
    };
    let sidecars = files_with(base.path(), "idx");
    let n = sidecars.len();
    assert!(n >= 6);

    let damaged = copy_dir(base.path());
    let sc = files_with(damaged.path(), "idx");
    // A flipped byte in the header, in the table, in the records; a cut file; a sidecar of
    // another segment under this one's name; one missing.
    flip(&sc[0], 13);
    flip(&sc[1], 80);
    let len = std::fs::metadata(&sc[2]).unwrap().len() as usize;
    flip(&sc[2], len - 3);
    let bytes = std::fs::read(&sc[3]).unwrap();
    std::fs::write(&sc[3], &bytes[..bytes.len() - 28]).unwrap();
    std::fs::copy(&sc[5], &sc[4]).unwrap();
    std::fs::remove_file(&sc[5]).unwrap();

    let store = open(damaged.path(), 4096, NOW);
    let report = store.recovery().clone();
    // Sidecars 0..=4 were found and refused (the records flip of sidecar 2 is caught only when
    // its records are read, see below); 5 was missing.
    assert_eq!(report.sidecars_rejected, 4, "{report:?}");
    assert_eq!(report.from_sidecar, n - 5, "{report:?}");
    assert_eq!(report.sidecars_written, 5);
    assert_eq!(exercise(&store), reference);
    store.close().unwrap();

    // Every sidecar is sound again.
    assert_all_sidecars_used(damaged.path());
}

/// A reader that loads a chunk whose sidecar records were damaged after open falls back to the
/// segment itself and gets the same messages.
#[test]
fn a_sidecar_damaged_after_open_is_read_around() {
    let base = build();
    let reference = {
        let copy = copy_dir(base.path());
        let store = open(copy.path(), 4096, NOW);
        let a = exercise(&store);
        store.close().unwrap();
        a
    };
    let copy = copy_dir(base.path());
    let store = open(copy.path(), 4096, NOW);
    for s in files_with(copy.path(), "idx") {
        let len = std::fs::metadata(&s).unwrap().len() as usize;
        flip(&s, len - 1);
    }
    assert_eq!(exercise(&store), reference);
    store.close().unwrap();
}

#[test]
fn the_index_does_not_grow_with_messages_in_sealed_segments() {
    const SEGMENT: u64 = 64 << 10;
    const BODY: usize = 1000;
    // Commits of ten 1 KB appends; about 70 messages fill a segment. Allow the active segment,
    // the previous open's last one (scanned, not sealed by a sidecar yet), the queue's first
    // chunk and the one the last read ended in.
    const BOUND: usize = 4 * 80;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), SEGMENT, NOW);
    let offline = q("offline");
    let mut resident = Vec::new();
    let mut appended = 0u64;
    for _ in 0..4 {
        for _ in 0..50 {
            let pending: Vec<_> = (0..10)
                .map(|i| {
                    let mut body = format!("{:08}", appended + i).into_bytes();
                    body.resize(BODY, b'.');
                    store.append(std::slice::from_ref(&offline), Bytes::from(body), None)
                })
                .collect();
            for p in pending {
                p.wait().expect("append");
            }
            appended += 10;
        }
        let stats = store.stats();
        assert_eq!(stats.queues[0].undelivered as u64, appended);
        resident.push(stats.resident_index_entries);
    }
    // 2,000 messages over about 30 segments; the index holds at most a few segments' worth.
    assert!(store.stats().segments > 25);
    assert!(
        resident.iter().all(|&r| r <= BOUND),
        "resident entries {resident:?} (bound {BOUND})"
    );
    store.close().unwrap();

    // Reopened: the same.
    let store = open(dir.path(), SEGMENT, NOW);
    let stats = store.stats();
    assert_eq!(stats.queues[0].undelivered as u64, appended);
    assert!(stats.resident_index_entries <= BOUND, "{stats:?}");

    // Drain: everything once, in order, with the index bounded all along.
    let mut next = 1u64;
    let mut after = Offset::ZERO;
    loop {
        let batch = store.read(&offline, after, 100).unwrap();
        if batch.is_empty() {
            break;
        }
        for m in &batch {
            let n: u64 = std::str::from_utf8(&m.body[..8]).unwrap().parse().unwrap();
            assert_eq!(n + 1, next, "message out of order at offset {}", m.offset);
            next += 1;
        }
        after = batch.last().unwrap().offset;
        store.checkpoint(&offline, after).wait().unwrap();
        let stats = store.stats();
        assert!(stats.resident_index_entries <= BOUND, "{stats:?}");
        assert_eq!(stats.queues[0].undelivered as u64, appended + 1 - next);
    }
    assert_eq!(next - 1, appended);
    store.close().unwrap();
}

/// A backlog whose oldest segments hold only expired messages: a read forgets them (counting
/// each once) and returns the live ones, the same with sidecars as with a scan.
#[test]
fn expired_sealed_segments_are_counted_once_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let t = q("t");
    {
        let store = open(dir.path(), 4096, NOW - 10_000);
        for round in 0..40u64 {
            let expiry = (round < 30).then_some(UnixMillis(NOW - 1));
            let pending: Vec<_> = (0..10u64)
                .map(|i| {
                    let body = format!("{round}:{i}:{}", ".".repeat(200));
                    store.append(std::slice::from_ref(&t), Bytes::from(body), expiry)
                })
                .collect();
            for p in pending {
                p.wait().unwrap();
            }
        }
        store.close().unwrap();
    }
    let answers = |dir: &Path| {
        let store = open(dir, 4096, NOW);
        // (No stats before the read: the writer's first retention, which may delete the expired
        // segments and count them, races with them.)
        let read: Vec<u64> = store
            .read(&t, Offset::ZERO, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.offset.get())
            .collect();
        let again = store.read(&t, Offset::ZERO, usize::MAX).unwrap().len();
        let after = sorted_stats(&store);
        let from_sidecar = store.recovery().from_sidecar;
        store.close().unwrap();
        (read, again, after, from_sidecar)
    };
    let with = copy_dir(dir.path());
    let without = copy_dir(dir.path());
    for s in files_with(without.path(), "idx") {
        std::fs::remove_file(s).unwrap();
    }
    let (r1, a1, s1, used) = answers(with.path());
    let (r2, a2, s2, unused) = answers(without.path());
    assert!(used > 5 && unused == 0);
    assert_eq!((&r1, a1, &s1), (&r2, a2, &s2));
    assert_eq!(r1.len(), 100);
    assert_eq!(a1, 100);
    assert_eq!(s1[0].expired, 300, "{s1:?}");
    assert_eq!(s1[0].undelivered, 100, "{s1:?}");
}
