//! The size cap on one group commit (issue 11, item 4).
//!
//! Property: however many appends pile up while an fdatasync stalls, the writer never encodes
//! them into one frame larger than `StoreOptions::max_batch_bytes`; it commits them as several
//! batches, still acknowledged in submission order, and all of them survive a reopen. Without the
//! cap, a long enough stall under the default 4 GiB quota produces a frame above the 1 GiB that
//! recovery accepts: the store acknowledges messages that it then drops as a "torn tail", or it
//! cannot open at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use store::sim::SimFs;
use store::{Epoch, ManualClock, Offset, QueueName, Store, StoreOptions, UnixMillis};

const DIR: &str = "/cap";
const CAP: u64 = 64 << 10;
const BODY: usize = 4000;
const WAITING: usize = 200;

/// Batch frame header length (DESIGN.md "Batch frame"); the payload length is at bytes 4..8.
const BATCH_HEADER_LEN: usize = 24;

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn open(fs: &SimFs) -> Store {
    Store::open_with(
        Path::new(DIR),
        StoreOptions {
            epoch: Epoch::new(1),
            segment_bytes: 64 << 20,
            max_batch_bytes: CAP,
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
    let mut b = format!("message {i:05} ").into_bytes();
    b.resize(BODY, b'.');
    Bytes::from(b)
}

/// Payload lengths of every batch frame in a segment file (header length read from its version
/// field, DESIGN.md "Segment file").
fn frame_payloads(bytes: &[u8]) -> Vec<usize> {
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let mut pos = match version {
        1 => 32,
        _ => 40,
    };
    let mut out = Vec::new();
    while pos + BATCH_HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        out.push(len);
        pos += BATCH_HEADER_LEN + len;
    }
    out
}

#[test]
fn appends_piled_up_behind_a_stalled_sync_are_committed_in_frames_within_the_cap() {
    let fs = SimFs::new();
    let store = open(&fs);
    let a = q("a");

    fs.hold_syncs();
    let first = store.append(std::slice::from_ref(&a), body(0), None);
    fs.wait_for_held_sync();
    // About 800 KB wait in the inbox while the writer is stuck in that fdatasync.
    let waiting: Vec<_> = (1..=WAITING)
        .map(|i| store.append(std::slice::from_ref(&a), body(i), None))
        .collect();
    fs.release_syncs();

    let mut acked = vec![(first.wait().expect("first append"), body(0))];
    for (i, p) in waiting.into_iter().enumerate() {
        acked.push((p.wait().expect("append"), body(i + 1)));
    }
    assert!(
        acked.windows(2).all(|w| w[0].0 < w[1].0),
        "acknowledged in submission order"
    );

    let mut payloads = Vec::new();
    for name in fs.files(Path::new(DIR)) {
        if name.ends_with(".seg") {
            let bytes = fs.read_file(&Path::new(DIR).join(&name)).unwrap();
            payloads.extend(frame_payloads(&bytes));
        }
    }
    let largest = payloads.iter().copied().max().unwrap_or(0);
    assert!(
        largest as u64 <= CAP,
        "a frame of {largest} bytes passed the cap of {CAP} (frames: {payloads:?})"
    );
    assert!(store.stats().commits as usize >= (WAITING * BODY) / CAP as usize);

    store.close().expect("close");
    let reopened = open(&fs);
    let read: Vec<(Offset, Bytes)> = reopened
        .read(&a, Offset::ZERO, usize::MAX)
        .expect("read back")
        .into_iter()
        .map(|m| (m.offset, m.body))
        .collect();
    assert_eq!(
        read, acked,
        "every acknowledged message, in order, after reopen"
    );
}

#[test]
fn the_default_cap_is_far_below_the_frame_limit_and_a_cap_near_it_is_refused() {
    // DESIGN.md "Batch frame": recovery accepts payloads of at most 1 GiB.
    const FRAME_LIMIT: u64 = 1 << 30;
    assert_eq!(
        StoreOptions::default().max_batch_bytes,
        store::DEFAULT_MAX_BATCH_BYTES
    );
    const { assert!(store::DEFAULT_MAX_BATCH_BYTES * 16 <= FRAME_LIMIT) };
    // One request may exceed the cap (it gets a frame of its own): cap plus the largest message
    // must stay below the limit, which the options check enforces.
    let err = Store::open_with(
        Path::new("/refused"),
        StoreOptions {
            max_batch_bytes: FRAME_LIMIT,
            ..StoreOptions::default()
        },
        Arc::new(SimFs::new()),
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
    .expect_err("a cap at the frame limit");
    assert!(matches!(err, store::OpenError::InvalidOptions(_)), "{err}");
}

#[test]
fn a_single_append_larger_than_the_cap_is_committed_in_a_frame_of_its_own() {
    let fs = SimFs::new();
    let store = open(&fs);
    let a = q("a");
    let big = Bytes::from(vec![b'B'; 3 * CAP as usize]);

    fs.hold_syncs();
    let first = store.append(std::slice::from_ref(&a), body(0), None);
    fs.wait_for_held_sync();
    let before = store.append(std::slice::from_ref(&a), body(1), None);
    let large = store.append(std::slice::from_ref(&a), big.clone(), None);
    let after = store.append(std::slice::from_ref(&a), body(2), None);
    fs.release_syncs();

    let acked = [
        (first.wait().expect("first"), body(0)),
        (before.wait().expect("before the large one"), body(1)),
        (large.wait().expect("the large one"), big),
        (after.wait().expect("after the large one"), body(2)),
    ];
    assert!(acked.windows(2).all(|w| w[0].0 < w[1].0));
    let mut payloads = Vec::new();
    for name in fs.files(Path::new(DIR)) {
        if name.ends_with(".seg") {
            let bytes = fs.read_file(&Path::new(DIR).join(&name)).unwrap();
            payloads.extend(frame_payloads(&bytes));
        }
    }
    let over: Vec<usize> = payloads
        .iter()
        .copied()
        .filter(|&p| p as u64 > CAP)
        .collect();
    assert_eq!(
        over.len(),
        1,
        "only the large message's frame passes the cap: {payloads:?}"
    );
    assert!(
        over[0] < 3 * CAP as usize + 1024,
        "and it holds nothing else: {payloads:?}"
    );

    store.close().expect("close");
    let read: Vec<(Offset, Bytes)> = open(&fs)
        .read(&a, Offset::ZERO, usize::MAX)
        .expect("read back")
        .into_iter()
        .map(|m| (m.offset, m.body))
        .collect();
    assert_eq!(read, acked.to_vec());
}
