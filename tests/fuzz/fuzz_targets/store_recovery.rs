//! Store recovery on arbitrary segment bytes: the input is written as a segment file into an
//! empty store directory on the simulated filesystem (`store::sim::SimFs`, with the
//! `test-util` feature), and `Store::open_with` recovers it. Only public entry points are used,
//! so the target does not depend on the on-disk format (see `store/DESIGN.md`).
//!
//! The first byte is the file's sequence number in generation 1 (above 0, older segments are
//! missing, as after retention).
//!
//! Checked beyond "no panic, no hang, bounded allocation":
//! - recovery either refuses the directory with a typed error or opens it;
//! - every queue it opens reads back in strictly increasing offsets above its checkpoint;
//! - a store opened on those bytes takes one append, closes, and reopens with everything it
//!   read before plus that append: recovering damage never leaves a store that cannot reopen,
//!   and never loses what it acknowledged after recovery.

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use store::sim::SimFs;
use store::{Epoch, ManualClock, Offset, QueueName, Store, StoreOptions, UnixMillis};

fn options(epoch: u64) -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(epoch),
        quota_bytes: 16 << 20,
        segment_bytes: 4096,
        max_message_bytes: 64 << 10,
        reserve_bytes: 0,
        preallocate: false,
        ..StoreOptions::default()
    }
}

fn open(fs: &SimFs, epoch: u64) -> Result<Store, store::OpenError> {
    Store::open_with(
        Path::new("/fuzz"),
        options(epoch),
        Arc::new(fs.clone()),
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
}

/// Every queue's messages (offset → body), read in batches from the start.
fn contents(store: &Store) -> BTreeMap<QueueName, Vec<(Offset, Bytes)>> {
    let mut all = BTreeMap::new();
    for q in store.stats().queues {
        let mut messages: Vec<(Offset, Bytes)> = Vec::new();
        let mut after = Offset::new(0);
        loop {
            let batch = store
                .read(&q.name, after, 64)
                .expect("a recovered queue reads");
            let Some(last) = batch.last() else { break };
            after = last.offset;
            for m in batch {
                if let Some((prev, _)) = messages.last() {
                    assert!(m.offset > *prev, "offsets must increase in a queue");
                }
                assert!(
                    m.offset > q.checkpoint,
                    "a message at or below the checkpoint was read"
                );
                messages.push((m.offset, m.body));
            }
        }
        all.insert(q.name, messages);
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let (knob, segment) = edgehub_fuzz::knob(data);
    let name = format!("{:016x}-{:016x}.seg", 1, knob);
    let fs = SimFs::new();
    fs.write_file(&Path::new("/fuzz").join(name), segment);
    let store = match open(&fs, 1) {
        Ok(store) => store,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let mut before = contents(&store);
    let extra = QueueName::new("fuzz-extra").expect("a valid queue name");
    let body = Bytes::from_static(b"appended after recovery");
    let offset = store
        .append(&[extra.clone()], body.clone(), None)
        .wait()
        .expect("an append after recovery succeeds");
    store.close().expect("a clean close");
    before.entry(extra).or_default().push((offset, body));
    let again = open(&fs, 2).expect("a store that recovered and closed cleanly reopens");
    let after = contents(&again);
    assert_eq!(
        after, before,
        "reopening must give back what was read plus the append"
    );
    again.close().expect("a clean close");
});
