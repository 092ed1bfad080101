//! Message bodies that imitate the store's own format (issue 11, item 9).
//!
//! Property (DESIGN.md "Recovery"): what a module puts in a body cannot steer recovery. A body
//! that holds a well-formed batch frame with a large first offset, in a batch that a power cut
//! tears, still leaves a torn tail that recovery cuts: the store opens and keeps every message
//! acknowledged before. Without this, any module could make one crash leave the hub's store
//! unopenable (`Corrupt`), which stops the whole hub until someone repairs it by hand.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use store::sim::SimFs;
use store::{Epoch, ManualClock, Offset, QueueName, Store, StoreOptions, UnixMillis};

const DIR: &str = "/hostile";
const SEEDS: u64 = 300;

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

fn open(fs: &SimFs) -> Result<Store, store::OpenError> {
    Store::open_with(
        Path::new(DIR),
        StoreOptions {
            epoch: Epoch::new(1),
            preallocate: false,
            reserve_bytes: 0,
            ..StoreOptions::default()
        },
        Arc::new(fs.clone()),
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
}

/// A batch frame as DESIGN.md describes it (format version 1): magic, payload length, first
/// offset, payload CRC32C, header CRC32C, payload. Anyone can build one from the public docs.
fn lookalike_frame(first_offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&0xEB47_C0DEu32.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&first_offset.to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// A body whose first bytes are a valid-looking frame far ahead in offsets, then padding, so
/// that most torn prefixes of its batch keep the frame whole.
fn hostile_body() -> Bytes {
    let mut b = lookalike_frame(
        1 << 40,
        b"\x03\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00",
    );
    b.resize(64 << 10, b'#');
    Bytes::from(b)
}

#[test]
fn a_torn_batch_holding_a_frame_inside_a_body_is_cut_as_a_torn_tail() {
    let fs = SimFs::new();
    let store = open(&fs).expect("open");
    let a = q("a");
    let mut acked = Vec::new();
    for i in 0..5 {
        let body = Bytes::from(format!("message {i}"));
        acked.push((
            store
                .append(std::slice::from_ref(&a), body.clone(), None)
                .wait()
                .unwrap(),
            body,
        ));
    }
    // The hostile append is written but its fdatasync has not returned: the power goes now.
    fs.hold_syncs();
    let hostile = store.append(std::slice::from_ref(&a), hostile_body(), None);
    fs.wait_for_held_sync();
    let images: Vec<SimFs> = (0..SEEDS).map(|seed| fs.crash_image(seed)).collect();
    fs.release_syncs();
    hostile.wait().expect("the hostile append itself is stored");
    store.close().expect("close");

    let mut torn = 0;
    for (seed, image) in images.iter().enumerate() {
        let reopened = open(image)
            .unwrap_or_else(|e| panic!("seed {seed}: a crash left the store unopenable: {e}"));
        if reopened.recovery().torn_tail.is_some() {
            torn += 1;
        }
        let read: Vec<(Offset, Bytes)> = reopened
            .read(&a, Offset::ZERO, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|m| (m.offset, m.body))
            .collect();
        assert_eq!(
            read.get(..acked.len()),
            Some(&acked[..]),
            "seed {seed}: acknowledged messages"
        );
        assert!(
            read.len() <= acked.len() + 1,
            "seed {seed}: invented messages"
        );
    }
    assert!(
        torn > 0,
        "no crash image tore the hostile batch; the test proves nothing"
    );
}
