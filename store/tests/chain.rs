//! Append chains: one producer's appends are stored as a prefix of what it submitted.
//!
//! Property (lib.rs guarantee 10): a producer pipelines P1 then P2 with one chain. If P1's group
//! commit fails (ENOSPC) and P2 lands in the next, smaller one, P2 must not be stored: the
//! producer resends both, and a stored P2 would then sit ahead of P1 in the queue.
//!
//! The batch boundary is made deterministic with a gate in front of the simulated filesystem:
//! the writer's data write of P1's batch blocks until the test has submitted P2 (so P2 waits
//! for the next batch), then fails with ENOSPC, and P2's batch would fit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use store::sim::SimFs;
use store::{
    AppendChain, AppendError, Epoch, Fs, FsFile, ManualClock, Offset, QueueName, Store,
    StoreOptions, UnixMillis,
};

const DIR: &str = "/chain";

fn q(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

#[derive(Debug, Default)]
struct GateState {
    /// The next write of at least this many bytes blocks until released, then fails with
    /// ENOSPC if `fail`, else goes through.
    armed_for: Option<usize>,
    fail: bool,
    /// The writer is blocked in that write.
    reached: bool,
    released: bool,
}

/// Wraps the simulated filesystem; one armed write blocks until released, then fails with
/// ENOSPC or goes through.
#[derive(Debug, Clone, Default)]
struct Gate {
    state: Arc<(Mutex<GateState>, Condvar)>,
}

impl Gate {
    fn arm(&self, min_len: usize, fail: bool) {
        let mut s = self.state.0.lock().unwrap();
        s.armed_for = Some(min_len);
        s.fail = fail;
    }

    fn wait_reached(&self) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        while !s.reached {
            s = cv.wait(s).unwrap();
        }
    }

    fn release(&self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().released = true;
        cv.notify_all();
    }

    /// Blocks and fails if this write is the armed one.
    fn check(&self, len: usize) -> io::Result<()> {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        if s.armed_for.is_none_or(|min| len < min) {
            return Ok(());
        }
        s.armed_for = None;
        s.reached = true;
        cv.notify_all();
        while !s.released {
            s = cv.wait(s).unwrap();
        }
        if s.fail {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct GateFs {
    sim: SimFs,
    gate: Gate,
}

#[derive(Debug)]
struct GateFile {
    file: Arc<dyn FsFile>,
    gate: Gate,
}

impl FsFile for GateFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.file.read_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.gate.check(buf.len())?;
        self.file.write_all_at(buf, pos)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
}

impl GateFs {
    fn wrap(&self, file: Arc<dyn FsFile>) -> Arc<dyn FsFile> {
        Arc::new(GateFile {
            file,
            gate: self.gate.clone(),
        })
    }
}

impl Fs for GateFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.sim.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.sim.list(dir)
    }
    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        self.sim.create_new(path).map(|f| self.wrap(f))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        self.sim.open(path).map(|f| self.wrap(f))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.sim.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.sim.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sim.sync_dir(dir)
    }
}

fn open(fs: Arc<dyn Fs>) -> Store {
    open_with_quota(fs, StoreOptions::default().quota_bytes)
}

fn open_with_quota(fs: Arc<dyn Fs>, quota_bytes: u64) -> Store {
    Store::open_with(
        Path::new(DIR),
        StoreOptions {
            epoch: Epoch::new(1),
            preallocate: false,
            reserve_bytes: 0,
            quota_bytes,
            ..StoreOptions::default()
        },
        fs,
        Arc::new(ManualClock::new(UnixMillis(1_000))),
    )
    .expect("open on the simulated filesystem")
}

fn bodies(store: &Store) -> Vec<Bytes> {
    store
        .read(&q("a"), Offset::ZERO, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect()
}

/// P1 is in a batch that fails with ENOSPC, P2 (same chain) in the next batch, which would fit:
/// P2 is refused unwritten, and the chain stays broken. Another producer's append in that next
/// batch is stored: only the broken chain is refused.
#[test]
fn an_append_behind_a_failed_batch_of_its_chain_is_not_stored() {
    let gate = Gate::default();
    let fs = Arc::new(GateFs {
        sim: SimFs::new(),
        gate: gate.clone(),
    });
    let store = open(fs);
    // Declares the queue: later batches carry messages only.
    store
        .append(&[q("a")], Bytes::from_static(b"before"), None)
        .wait()
        .unwrap();
    let p1 = Bytes::from(vec![b'1'; 8192]);
    gate.arm(p1.len(), true);
    let chain = AppendChain::new();
    let first = store.append_in(&chain, &[q("a")], p1, None);
    // The writer is inside P1's batch: P2 and the other producer's append wait for the next.
    gate.wait_reached();
    let second = store.append_in(&chain, &[q("a")], Bytes::from_static(b"P2"), None);
    let other = store.append(&[q("a")], Bytes::from_static(b"other"), None);
    gate.release();

    assert!(
        matches!(first.wait(), Err(AppendError::Full { .. })),
        "P1's batch hit ENOSPC"
    );
    match second.wait() {
        Err(AppendError::ChainBroken { cause }) => {
            assert!(matches!(*cause, AppendError::Full { .. }), "{cause:?}")
        }
        r => panic!("P2 must be refused behind P1's failure, got {r:?}"),
    }
    other.wait().expect("another producer is not affected");
    assert_eq!(
        bodies(&store),
        [Bytes::from_static(b"before"), Bytes::from_static(b"other")]
    );
    // The chain stays broken: its producer must start over with a new one.
    assert!(matches!(chain.broken_by(), Some(AppendError::Full { .. })));
    assert!(matches!(
        store
            .append_in(&chain, &[q("a")], Bytes::from_static(b"P3"), None)
            .wait(),
        Err(AppendError::ChainBroken { .. })
    ));
    let fresh = AppendChain::new();
    store
        .append_in(&fresh, &[q("a")], Bytes::from_static(b"P1 again"), None)
        .wait()
        .unwrap();
    store.close().unwrap();
}

/// A refusal at submit (the quota) breaks the chain too: an append after it, small enough for
/// the quota, is not stored; without a chain it would be.
#[test]
fn a_refusal_at_submit_breaks_the_chain() {
    let store = open_with_quota(Arc::new(SimFs::new()), 64 << 10);
    let chain = AppendChain::new();
    let big = store.append_in(&chain, &[q("a")], Bytes::from(vec![0u8; 100 << 10]), None);
    let small = store.append_in(&chain, &[q("a")], Bytes::from_static(b"small"), None);
    assert!(matches!(big.wait(), Err(AppendError::Full { .. })));
    assert!(matches!(small.wait(), Err(AppendError::ChainBroken { .. })));
    store
        .append(&[q("a")], Bytes::from_static(b"unchained"), None)
        .wait()
        .unwrap();
    assert_eq!(bodies(&store), [Bytes::from_static(b"unchained")]);
    store.close().unwrap();
}

/// The chain refuses what comes after a failure, not what came before it: P1 waits in the inbox
/// while P0's batch is being written, then P2 is refused at submit (the quota). P1 was submitted
/// first, so it is still stored; P3, after the failure, is not.
#[test]
fn an_append_submitted_before_the_failure_is_still_stored() {
    let gate = Gate::default();
    let fs = Arc::new(GateFs {
        sim: SimFs::new(),
        gate: gate.clone(),
    });
    let store = open_with_quota(fs, 64 << 10);
    store
        .append(&[q("a")], Bytes::from_static(b"declares"), None)
        .wait()
        .unwrap();
    let p0 = Bytes::from(vec![b'0'; 8192]);
    gate.arm(p0.len(), false);
    let chain = AppendChain::new();
    let first = store.append_in(&chain, &[q("a")], p0.clone(), None);
    gate.wait_reached();
    let second = store.append_in(&chain, &[q("a")], Bytes::from_static(b"P1"), None);
    let third = store.append_in(&chain, &[q("a")], Bytes::from(vec![0u8; 100 << 10]), None);
    gate.release();
    first.wait().unwrap();
    second.wait().expect("submitted before the failure: stored");
    assert!(matches!(third.wait(), Err(AppendError::Full { .. })));
    assert!(matches!(
        store
            .append_in(&chain, &[q("a")], Bytes::from_static(b"P3"), None)
            .wait(),
        Err(AppendError::ChainBroken { .. })
    ));
    assert_eq!(
        bodies(&store),
        [
            Bytes::from_static(b"declares"),
            p0,
            Bytes::from_static(b"P1")
        ]
    );
    store.close().unwrap();
}
