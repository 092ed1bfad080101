//! Segment rotation under a full disk: the new segment's preamble (which alone will declare every
//! queue once older segments are deleted) must be durable before retention deletes anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use store::sim::SimFs;
use store::{AppendError, Epoch, Offset, QueueName, Store, StoreOptions, SystemClock};

fn open(fs: &SimFs) -> Store {
    Store::open_with(
        Path::new("/r"),
        StoreOptions {
            epoch: Epoch::new(1),
            segment_bytes: 4096,
            reserve_bytes: 4096,
            // The plain way of making a segment (a prepared one already owns its space).
            preallocate: false,
            ..StoreOptions::default()
        },
        Arc::new(fs.clone()),
        Arc::new(SystemClock),
    )
    .expect("open")
}

fn newest_segment_len(fs: &SimFs) -> usize {
    let mut names: Vec<String> = fs
        .files(Path::new("/r"))
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    let newest = names.last().expect("a segment");
    fs.read_file(&Path::new("/r").join(newest))
        .expect("read")
        .len()
}

#[test]
fn a_full_disk_postpones_rotation_so_checkpoints_fit_and_every_declaration_survives() {
    let fs = SimFs::new();
    let store = open(&fs);
    let q = QueueName::new("q").expect("name");
    let mut offsets = Vec::new();
    // Fill the first segment up to the point where the next batch rotates.
    while newest_segment_len(&fs) < 4096 {
        let off = store
            .append(std::slice::from_ref(&q), Bytes::from(vec![1u8; 300]), None)
            .wait()
            .expect("append");
        offsets.push(off);
    }
    // Room for a new segment's header, not for its preamble; room for a checkpoint.
    fs.set_space_limit(Some(fs.live_bytes() + 40));
    let err = store
        .append(std::slice::from_ref(&q), Bytes::from(vec![2u8; 300]), None)
        .wait()
        .expect_err("disk full");
    assert!(matches!(err, AppendError::Full { .. }), "{err}");
    assert_eq!(
        store.halted_reason(),
        None,
        "ENOSPC must not poison the store"
    );
    let last = *offsets.last().expect("appended");
    store
        .checkpoint(&q, last)
        .wait()
        .expect("a checkpoint still fits: the rotation waits");
    assert_eq!(
        store.reclaim().wait().expect("reclaim"),
        0,
        "the only segment is the active one"
    );
    let segments = fs
        .files(Path::new("/r"))
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .count();
    assert_eq!(segments, 1, "the half-made segment was dropped");

    fs.set_space_limit(None);
    let after = store
        .append(std::slice::from_ref(&q), Bytes::from_static(b"after"), None)
        .wait()
        .expect("append once space is back");
    store.reclaim().wait().expect("reclaim");
    assert!(
        store.stats().reclaimed_segments >= 1,
        "the delivered segment is reclaimed once it is no longer active"
    );
    store.close().expect("close");

    let reopened = open(&fs);
    assert_eq!(reopened.checkpoint_of(&q), Some(last));
    let read = reopened.read(&q, Offset::ZERO, 10).expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(
        (read[0].offset, read[0].body.as_ref()),
        (after, &b"after"[..])
    );
}

#[test]
fn after_a_crash_the_unused_preallocated_end_of_the_newest_segment_is_not_a_torn_tail() {
    let fs = SimFs::new();
    let store = Store::open_with(
        Path::new("/r"),
        StoreOptions {
            epoch: Epoch::new(1),
            segment_bytes: 4096,
            reserve_bytes: 4096,
            ..StoreOptions::default()
        },
        Arc::new(fs.clone()),
        Arc::new(SystemClock),
    )
    .expect("open");
    let q = QueueName::new("q").expect("name");
    let mut acked = Vec::new();
    // Append until the newest segment is a prepared one: allocated to 4096 bytes, ending in zeros.
    let preallocated = |fs: &SimFs| {
        let mut names: Vec<String> = fs
            .files(Path::new("/r"))
            .into_iter()
            .filter(|n| n.ends_with(".seg"))
            .collect();
        names.sort();
        let newest = fs
            .read_file(&Path::new("/r").join(names.last().expect("a segment")))
            .expect("read");
        names.len() > 1 && newest.len() == 4096 && newest.ends_with(&[0u8; 64])
    };
    for i in 0..500u32 {
        if acked.len() > 20 && preallocated(&fs) {
            break;
        }
        let body = Bytes::from(i.to_le_bytes().repeat(50));
        let off = store
            .append(std::slice::from_ref(&q), body.clone(), None)
            .wait()
            .expect("append");
        acked.push((off, body));
    }
    assert!(
        preallocated(&fs),
        "the newest segment was never a preallocated one"
    );
    let image = fs.crash_image(7);
    drop(store);
    let reopened = Store::open_with(
        Path::new("/r"),
        StoreOptions {
            epoch: Epoch::new(1),
            segment_bytes: 4096,
            reserve_bytes: 4096,
            ..StoreOptions::default()
        },
        Arc::new(image),
        Arc::new(SystemClock),
    )
    .expect("reopen");
    assert_eq!(
        reopened.recovery().torn_tail,
        None,
        "zeros are not a torn write"
    );
    let read: Vec<(Offset, Bytes)> = reopened
        .read(&q, Offset::ZERO, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|m| (m.offset, m.body))
        .collect();
    assert_eq!(read, acked);
}
