//! Reading a store written by format version 1 (DESIGN.md "Segment file").
//!
//! Property: an upgrade opens the previous format's directory with every message and checkpoint,
//! cuts a torn tail in it as before, removes the old prepared file, and writes every new segment
//! in the current format. Without this, upgrading the hub would make every existing store
//! unopenable (or lose what it held).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use store::{Epoch, Offset, QueueName, Store, StoreOptions};

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn opts() -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(3),
        segment_bytes: 4096,
        reserve_bytes: 0,
        ..StoreOptions::default()
    }
}

fn fixture_copy() -> tempfile::TempDir {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&from).expect("fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name != "README.md" {
            std::fs::copy(entry.path(), dir.path().join(name)).expect("copy");
        }
    }
    dir
}

fn body(i: u64) -> Bytes {
    let mut b = format!("v1 message {i:03} ").into_bytes();
    b.resize(200, b'=');
    Bytes::from(b)
}

/// What the fixture holds, per queue, after the checkpoint of `a` at 10 (see its README).
fn expected(upto: u64) -> (BTreeMap<u64, Bytes>, BTreeMap<u64, Bytes>) {
    let a = (10..upto).map(|i| (i + 1, body(i))).collect();
    let b = (0..upto)
        .filter(|i| i % 3 == 0)
        .map(|i| (i + 1, body(i)))
        .collect();
    (a, b)
}

fn read(store: &Store, queue: &str) -> BTreeMap<u64, Bytes> {
    store
        .read(&q(queue), Offset::ZERO, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset.get(), m.body))
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

fn version(segment: &Path) -> u32 {
    let bytes = std::fs::read(segment).unwrap();
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn a_format_1_store_opens_with_everything_and_goes_on_in_the_current_format() {
    let dir = fixture_copy();
    let old_segments = segments(dir.path());
    assert!(old_segments.iter().all(|s| version(s) == 1));
    let store = Store::open(dir.path(), opts()).expect("open a format 1 store");
    assert!(
        store.recovery().foreign.is_empty(),
        "{:?}",
        store.recovery().foreign
    );
    assert!(
        !dir.path().join("PREPARED").exists(),
        "the old prepared file is removed"
    );
    let (a, b) = expected(40);
    assert_eq!(read(&store, "a"), a);
    assert_eq!(read(&store, "b"), b);
    assert_eq!(store.checkpoint_of(&q("a")), Some(Offset::new(10)));

    let added = store
        .append(&[q("a")], Bytes::from_static(b"after the upgrade"), None)
        .wait()
        .expect("append");
    assert_eq!(added, Offset::new(41));
    store.close().expect("close");
    let new_segments: Vec<PathBuf> = segments(dir.path())
        .into_iter()
        .filter(|s| !old_segments.contains(s))
        .collect();
    assert!(!new_segments.is_empty());
    assert!(new_segments.iter().all(|s| version(s) == 2));

    let again = Store::open(dir.path(), opts()).expect("reopen");
    let mut a = a;
    a.insert(41, Bytes::from_static(b"after the upgrade"));
    assert_eq!(read(&again, "a"), a);
    assert_eq!(read(&again, "b"), b);
}

#[test]
fn a_torn_tail_in_a_format_1_store_is_cut_as_before() {
    let dir = fixture_copy();
    let newest = segments(dir.path()).pop().expect("a segment");
    let len = std::fs::metadata(&newest).unwrap().len();
    // Inside the last batch (message 40, about 250 bytes with its frame).
    let cut = len - 100;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let store = Store::open(dir.path(), opts()).expect("a torn tail is cut");
    let (at, gone) = match &store.recovery().torn_tail {
        Some((file, at, gone)) if *file == newest => (*at, *gone),
        other => panic!(
            "expected a torn tail in {}, got {other:?}",
            newest.display()
        ),
    };
    assert_eq!(at + gone, cut);
    let (a, b) = expected(39);
    assert_eq!(read(&store, "a"), a);
    assert_eq!(read(&store, "b"), b);
}
