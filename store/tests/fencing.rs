//! Two owners on one directory (issue 11, item 6), on the real filesystem.
//!
//! Property (DESIGN.md "Fencing"): once a newer epoch has opened the directory, the older owner
//! changes nothing the newer one relies on: it deletes no segment (retention), and neither its
//! segment preparer nor its close touches the newer owner's prepared segment. The newer owner
//! keeps rotating segments without being poisoned, and after it reopens every acknowledged
//! message is there, in order. Without this, a partitioned node that still holds the old lease
//! deletes segments the new owner must deliver, or makes the new owner rename a file that is
//! gone (poisoned at its first rotation) or write into an unlinked one (acknowledged data lost).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use store::{
    Epoch, ManualClock, Offset, OsFs, QueueName, ReclaimError, StorageError, Store, StoreOptions,
    UnixMillis,
};

const SEGMENT: u64 = 4096;
const TTL_MS: u64 = 60_000;
const START: UnixMillis = UnixMillis(1_000_000);

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn open(dir: &Path, epoch: u64, clock: &Arc<ManualClock>) -> Store {
    Store::open_with(
        dir,
        StoreOptions {
            epoch: Epoch::new(epoch),
            segment_bytes: SEGMENT,
            reserve_bytes: 64 << 10,
            preallocate: true,
            ..StoreOptions::default()
        },
        Arc::new(OsFs),
        Arc::clone(clock) as Arc<dyn store::Clock>,
    )
    .expect("open")
}

fn body(tag: &str, i: usize) -> Bytes {
    let mut b = format!("{tag} {i:04} ").into_bytes();
    b.resize(300, b'~');
    Bytes::from(b)
}

fn segments(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

/// Name and inode of every fully preallocated segment file (name starting with `PREPARED`) now
/// in `dir`. Both, as a deleted file's inode number may be reused at once.
fn prepared_files(dir: &Path) -> BTreeSet<(String, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("PREPARED"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            (m.len() == SEGMENT).then(|| (e.file_name().to_string_lossy().into_owned(), m.ino()))
        })
        .collect()
}

/// Waits until a preallocated segment file that is not in `before` exists: the preparer thread
/// of the store opened since has done its work. The deadline is only a failure bound.
fn wait_for_new_prepared(dir: &Path, before: &BTreeSet<(String, u64)>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while prepared_files(dir).is_subset(before) {
        assert!(Instant::now() < deadline, "no segment was ever prepared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read(store: &Store, queue: &QueueName) -> Vec<(Offset, Bytes)> {
    store
        .read(queue, Offset::ZERO, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset, m.body))
        .collect()
}

#[test]
fn an_old_owner_that_keeps_running_and_closes_changes_nothing_the_new_owner_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let (ttl, kept) = (q("ttl"), q("kept"));
    // The old owner's node runs ahead (or simply later): its retention will see the `ttl`
    // messages expired while the new owner does not yet.
    let old_clock = Arc::new(ManualClock::new(START));
    let new_clock = Arc::new(ManualClock::new(START));

    let old = open(dir, 1, &old_clock);
    let expiry = Some(UnixMillis(START.0 + TTL_MS));
    let mut acked_ttl = Vec::new();
    for i in 0..30 {
        let off = old
            .append(std::slice::from_ref(&ttl), body("ttl", i), expiry)
            .wait();
        acked_ttl.push((off.expect("append ttl"), body("ttl", i)));
    }
    let mut acked_kept = Vec::new();
    for i in 0..30 {
        let off = old
            .append(std::slice::from_ref(&kept), body("kept", i), None)
            .wait();
        acked_kept.push((off.expect("append kept"), body("kept", i)));
    }
    wait_for_new_prepared(dir, &BTreeSet::new());

    let before_new = prepared_files(dir);
    let new = open(dir, 2, &new_clock);
    wait_for_new_prepared(dir, &before_new);
    let files = segments(dir);

    // The old owner's retention now finds the `ttl` segments expired: it must not delete them.
    old_clock.advance(2 * TTL_MS);
    let outcome = old.reclaim().wait();
    assert!(
        matches!(outcome, Err(ReclaimError::Storage(StorageError::Fenced))),
        "the fenced owner ran retention: {outcome:?}"
    );
    assert_eq!(segments(dir), files, "the fenced owner deleted segments");
    assert!(old.halted_reason().is_some());
    old.close().expect("the old owner closes cleanly");

    // The new owner rotates several times, adopting prepared segments, and stays healthy.
    let mut acked_new = Vec::new();
    for i in 0..60 {
        let off = new
            .append(std::slice::from_ref(&kept), body("new", i), None)
            .wait();
        acked_new.push((off.expect("the new owner appends"), body("new", i)));
    }
    assert!(
        new.stats().segments >= files.len() + 3,
        "the new owner rotated"
    );
    assert_eq!(new.halted_reason(), None);
    assert_eq!(read(&new, &ttl), acked_ttl);
    new.close().expect("close the new owner");

    let again = open(dir, 2, &new_clock);
    assert_eq!(read(&again, &ttl), acked_ttl, "nothing acknowledged lost");
    let mut expected = acked_kept;
    expected.extend(acked_new);
    assert_eq!(read(&again, &kept), expected, "nothing acknowledged lost");
    assert_eq!(again.halted_reason(), None);
}

/// `check_fence` is the cheap "am I fenced?" an idle owner asks (the hub, on its clock): false
/// while no newer owner opened the directory (and it halts nothing), true once one did, without
/// any write; from then on the store is halted as a commit would have halted it (appends refused
/// with `Fenced`, `watch_halted` true), and the newer owner is unaffected.
#[test]
fn check_fence_tells_an_idle_owner_it_was_fenced_without_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let old = open(dir.path(), 1, &clock);
    let halted = old.watch_halted();
    assert_eq!(old.epoch(), Epoch::new(1));
    assert!(!old.check_fence(), "nobody else opened the directory");
    assert!(!old.is_fenced());
    assert!(!*halted.borrow());
    old.append(&[q("a")], body("old", 0), None).wait().unwrap();

    let new = open(dir.path(), 2, &clock);
    // No write from the old owner: the query itself finds out.
    assert!(old.check_fence(), "a newer owner opened the directory");
    assert!(old.is_fenced());
    assert!(*halted.borrow(), "watchers learn it at once");
    assert!(old.halted_reason().is_some());
    let refused = old.append(&[q("a")], body("old", 1), None).wait();
    assert!(
        matches!(refused, Err(ref e) if e.to_string().contains("fenced")),
        "{refused:?}"
    );
    assert!(old.check_fence(), "stays fenced");

    assert!(!new.check_fence());
    assert_eq!(new.epoch(), Epoch::new(2));
    new.append(&[q("a")], body("new", 0), None).wait().unwrap();
    drop(old);
    let got: Vec<Bytes> = read(&new, &q("a")).into_iter().map(|(_, b)| b).collect();
    assert_eq!(got, vec![body("old", 0), body("new", 0)]);
}
