//! What the `Store` handles and the writer thread share: the inbox of requests, the index, the
//! halt state and the counters. Both `store` and `writer` build on it; it knows neither.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{oneshot, watch};

use crate::chain::Position;
use crate::error::{AppendError, CheckpointError, ReclaimError, StorageError};
use crate::index::Index;
use crate::io::Fs;
use crate::options::StoreOptions;
use crate::prealloc::prepared_name;
use crate::types::{Clock, Generation, Offset, QueueName, UnixMillis};

/// A request waiting for the next group commit.
pub(crate) enum Request {
    Append {
        queues: Vec<QueueName>,
        body: bytes::Bytes,
        expiry: Option<UnixMillis>,
        reserved: u64,
        /// The producer's chain and this append's position on it (see `chain`): not written
        /// once an earlier position failed.
        chain: Option<Position>,
        reply: oneshot::Sender<Result<Offset, AppendError>>,
    },
    Checkpoint {
        queue: QueueName,
        upto: Offset,
        reply: oneshot::Sender<Result<(), CheckpointError>>,
    },
}

/// A waiter for an explicit retention run: answered with how many segments were deleted.
pub(crate) type ReclaimWaiter = oneshot::Sender<Result<u64, ReclaimError>>;

/// Why the store stopped accepting writes.
#[derive(Debug, Clone)]
pub(crate) enum Halt {
    Poisoned(Arc<str>),
    Fenced,
    /// The writer thread panicked (a bug): nothing can be written, and the index it was updating
    /// may be half-done, so reads are refused too.
    Panicked(Arc<str>),
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::Poisoned(why) => write!(f, "I/O failure: {why}"),
            Halt::Fenced => f.write_str("fenced by a newer owner"),
            Halt::Panicked(why) => write!(f, "the writer thread panicked: {why}"),
        }
    }
}

impl Halt {
    /// What every refused request reports. A panicked writer reads as a poisoned store.
    pub(crate) fn storage_error(&self) -> StorageError {
        match self {
            Halt::Poisoned(why) => StorageError::Poisoned(why.clone()),
            Halt::Fenced => StorageError::Fenced,
            Halt::Panicked(_) => StorageError::Poisoned(self.to_string().into()),
        }
    }

    pub(crate) fn append_error(&self) -> AppendError {
        self.storage_error().into()
    }

    pub(crate) fn checkpoint_error(&self) -> CheckpointError {
        self.storage_error().into()
    }

    pub(crate) fn reclaim_error(&self) -> ReclaimError {
        self.storage_error().into()
    }
}

pub(crate) struct Inbox {
    pub(crate) requests: Vec<Request>,
    pub(crate) reclaims: Vec<ReclaimWaiter>,
    /// Bytes promised to appends not yet written (the quota counts them).
    pub(crate) reserved: u64,
    pub(crate) closing: bool,
    /// The writer thread died: nothing submitted would ever be answered.
    pub(crate) dead: Option<Halt>,
    /// The writer is parked on the condvar: only then does a submitter need to wake it (a
    /// notification is a syscall; under load the writer finds new requests by itself).
    pub(crate) writer_waiting: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) appends: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) caller_commits: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) reclaimed_segments: AtomicU64,
    /// Group-commit fdatasyncs by duration: one counter per bound of
    /// [`SYNC_LATENCY_BOUNDS_MICROS`], then one for anything longer.
    pub(crate) sync_buckets: [AtomicU64; SYNC_LATENCY_BOUNDS_MICROS.len() + 1],
    pub(crate) sync_micros_total: AtomicU64,
    /// How long the newest group-commit fdatasync took, in µs (whether a producer may commit on
    /// its own thread: see `StoreOptions::caller_commit_max_sync`).
    pub(crate) last_sync_micros: AtomicU64,
}

/// Upper bounds (µs, inclusive) of the group-commit fdatasync latency buckets in
/// [`crate::StoreStats::commit_syncs`]: 64 µs doubling to about 1 s.
pub const SYNC_LATENCY_BOUNDS_MICROS: [u64; 15] = [
    64, 128, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 262_144,
    524_288, 1_048_576,
];

impl Counters {
    /// Records one group-commit fdatasync that took `elapsed`.
    pub(crate) fn observe_sync(&self, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = SYNC_LATENCY_BOUNDS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(SYNC_LATENCY_BOUNDS_MICROS.len());
        if let Some(counter) = self.sync_buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.sync_micros_total.fetch_add(micros, Ordering::Relaxed);
        self.last_sync_micros.store(micros, Ordering::Relaxed);
    }
}

/// State shared by the handles and the writer thread.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    /// This owner's prepared segment file (a name no other owner uses).
    pub(crate) prepared_path: PathBuf,
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) opts: StoreOptions,
    pub(crate) inbox: Mutex<Inbox>,
    pub(crate) inbox_cv: Condvar,
    pub(crate) index: Mutex<Index>,
    pub(crate) halt: Mutex<Option<Halt>>,
    pub(crate) halted: AtomicBool,
    /// Turns true (once, for good) when the store halts, for whoever must react at once.
    pub(crate) halted_tx: watch::Sender<bool>,
    pub(crate) stats: Counters,
    pub(crate) durable_tx: watch::Sender<Offset>,
    /// Bytes of segment files on disk (kept by the index).
    pub(crate) disk_bytes: Arc<AtomicU64>,
}

impl Shared {
    /// The state of a store in `dir` opened as `generation`, over the recovered `index` whose
    /// newest durable message is the one before `next_offset`.
    pub(crate) fn new(
        dir: PathBuf,
        generation: Generation,
        fs: Arc<dyn Fs>,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
        index: Index,
        next_offset: Offset,
    ) -> Shared {
        let (durable_tx, _) = watch::channel(Offset::new(next_offset.get() - 1));
        Shared {
            prepared_path: dir.join(prepared_name(generation)),
            dir,
            fs,
            clock,
            opts,
            inbox: Mutex::new(Inbox {
                requests: Vec::new(),
                reclaims: Vec::new(),
                reserved: 0,
                closing: false,
                dead: None,
                writer_waiting: false,
            }),
            inbox_cv: Condvar::new(),
            disk_bytes: index.disk_bytes(),
            index: Mutex::new(index),
            halt: Mutex::new(None),
            halted: AtomicBool::new(false),
            halted_tx: watch::channel(false).0,
            stats: Counters::default(),
            durable_tx,
        }
    }

    pub(crate) fn lock_inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of segment files on disk.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Puts a request in the inbox and wakes the writer if it is parked. Fails if the writer died
    /// or the store is closing, or with whatever `push` refuses the request for.
    pub(crate) fn submit<E: From<StorageError>>(
        &self,
        push: impl FnOnce(&mut Inbox) -> Result<(), E>,
    ) -> Result<(), E> {
        self.submit_or_take(push, false).map(|_| ())
    }

    /// [`Shared::submit`], except that with `take_if_alone` a request that found the inbox empty
    /// is taken back out (its reservation stays) and returned, for a caller that holds the writer
    /// to commit it at once; the writer thread is then not woken.
    pub(crate) fn submit_or_take<E: From<StorageError>>(
        &self,
        push: impl FnOnce(&mut Inbox) -> Result<(), E>,
        take_if_alone: bool,
    ) -> Result<Option<Request>, E> {
        let wake = {
            let mut inbox = self.lock_inbox();
            if let Some(halt) = &inbox.dead {
                return Err(halt.storage_error().into());
            }
            if inbox.closing {
                return Err(StorageError::Closed.into());
            }
            push(&mut inbox)?;
            if take_if_alone && inbox.requests.len() == 1 {
                return Ok(inbox.requests.pop());
            }
            inbox.writer_waiting
        };
        if wake {
            self.inbox_cv.notify_one();
        }
        Ok(None)
    }

    pub(crate) fn release(&self, bytes: u64) {
        let mut inbox = self.lock_inbox();
        inbox.reserved = inbox.reserved.saturating_sub(bytes);
    }

    pub(crate) fn halted(&self) -> Option<Halt> {
        if !self.halted.load(Ordering::SeqCst) {
            return None;
        }
        self.halt.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Halts the store with `halt` unless it already halted (the first reason stays), and tells
    /// the watchers. Every later request is refused with the reason that stayed.
    pub(crate) fn halt_with(&self, halt: Halt) {
        tracing::error!(reason = %halt, "store stops accepting writes");
        let mut h = self.halt.lock().unwrap_or_else(|p| p.into_inner());
        if h.is_none() {
            *h = Some(halt);
        }
        self.halted.store(true, Ordering::SeqCst);
        drop(h);
        self.halted_tx.send_replace(true);
    }

    /// The writer thread panicked: halt the store for good, and answer everything waiting in the
    /// inbox now (nothing else ever would). Requests of the batch it was working on lost their
    /// answer channel when it unwound; their `Pending` reports that (see [`Closable`]).
    pub(crate) fn writer_died(&self, why: String) {
        let halt = Halt::Panicked(why.into());
        tracing::error!(reason = %halt, "store stops: reopen it");
        *self.halt.lock().unwrap_or_else(|p| p.into_inner()) = Some(halt.clone());
        self.halted.store(true, Ordering::SeqCst);
        self.halted_tx.send_replace(true);
        let (requests, reclaims) = {
            let mut inbox = self.lock_inbox();
            inbox.dead = Some(halt.clone());
            inbox.reserved = 0;
            (
                std::mem::take(&mut inbox.requests),
                std::mem::take(&mut inbox.reclaims),
            )
        };
        for request in requests {
            match request {
                Request::Append { reply, .. } => {
                    let _ = reply.send(Err(halt.append_error()));
                }
                Request::Checkpoint { reply, .. } => {
                    let _ = reply.send(Err(halt.checkpoint_error()));
                }
            }
        }
        for reply in reclaims {
            let _ = reply.send(Err(halt.reclaim_error()));
        }
    }
}
