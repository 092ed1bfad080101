//! The `Store` handle: open (with recovery and fencing), append, checkpoint, read, stats, close.
//!
//! Invariants (the crate's guarantees, argued in DESIGN.md):
//! - `append` and `checkpoint` complete only after a group commit made them durable, in the order
//!   they were submitted; their errors mean nothing of the request is stored, except after an
//!   I/O failure or a fence (`Poisoned`, `Fenced`), where the outcome is unknown;
//! - `read` returns only durable messages, in offset order, skipping expired ones;
//! - once poisoned or fenced, the store refuses every write until it is reopened.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::chain::{AppendChain, Position};
use crate::error::{
    open_io, AppendError, CheckpointError, CloseError, OpenError, ReadError, ReclaimError,
    StorageError,
};
use crate::fence::Fence;
use crate::format::{decode_message_checked, message_len, EpochRecord, BATCH_HEADER_LEN};
use crate::index::IndexEntry;
use crate::io::{read_exact_at, Fs, FsFile, OsFs};
use crate::options::{StoreOptions, MAX_QUEUES_PER_MESSAGE};
use crate::recovery::{newest_segment_generation, recover, Recovered, RecoveryReport};
use crate::shared::{Halt, Request, Shared};
use crate::types::{Clock, Epoch, Generation, Offset, QueueName, SystemClock, UnixMillis};
#[cfg(test)]
use crate::writer::lock_slot;
use crate::writer::{try_lock_slot, Start, Threads, Writer, WriterSlot};

/// How long the group commits' fdatasyncs took since open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncLatency {
    /// Count per bucket (not cumulative): `counts[i]` took at most
    /// `SYNC_LATENCY_BOUNDS_MICROS[i]` µs (and more than the bound before); the last entry
    /// counts those longer than every bound.
    pub counts: Vec<u64>,
    /// Sum of their durations in µs.
    pub sum_micros: u64,
}

/// Errors that a pending request reports when the store went away under it.
pub trait Closable {
    /// The "store closed" value of the error type.
    fn closed() -> Self;

    /// The request will never be answered: the writer thread died (panicked) while it held it.
    /// A store that closes answers everything first, so this is the only way an answer is lost.
    fn unanswered() -> Self
    where
        Self: Sized,
    {
        Self::closed()
    }
}

/// Why a request lost its answer (see [`Closable::unanswered`]).
const UNANSWERED: &str = "the writer thread panicked before answering";

impl Closable for AppendError {
    fn closed() -> Self {
        StorageError::Closed.into()
    }

    fn unanswered() -> Self {
        StorageError::Poisoned(UNANSWERED.into()).into()
    }
}

impl Closable for CheckpointError {
    fn closed() -> Self {
        StorageError::Closed.into()
    }

    fn unanswered() -> Self {
        StorageError::Poisoned(UNANSWERED.into()).into()
    }
}

impl Closable for ReclaimError {
    fn closed() -> Self {
        StorageError::Closed.into()
    }

    fn unanswered() -> Self {
        StorageError::Poisoned(UNANSWERED.into()).into()
    }
}

/// A request on its way to durability: `.await` it, or `wait()` for it from a plain thread.
#[must_use = "a request is only durable once its Pending completes"]
#[derive(Debug)]
pub struct Pending<T, E> {
    state: PendingState<T, E>,
}

#[derive(Debug)]
enum PendingState<T, E> {
    Ready(Option<Result<T, E>>),
    Waiting(oneshot::Receiver<Result<T, E>>),
}

impl<T, E: Closable> Pending<T, E> {
    fn ready(result: Result<T, E>) -> Self {
        Pending {
            state: PendingState::Ready(Some(result)),
        }
    }

    /// Blocks the calling thread until the request is durable or failed. Must not be called from
    /// inside an async runtime (`.await` the `Pending` there).
    pub fn wait(self) -> Result<T, E> {
        match self.state {
            PendingState::Ready(r) => r.unwrap_or_else(|| Err(E::closed())),
            PendingState::Waiting(rx) => {
                rx.blocking_recv().unwrap_or_else(|_| Err(E::unanswered()))
            }
        }
    }
}

impl<T: Unpin, E: Closable + Unpin> Future for Pending<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            PendingState::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| Err(E::closed()))),
            PendingState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or_else(|_| Err(E::unanswered()))),
        }
    }
}

/// A durable message read back from a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message's offset (the same in every queue that holds it).
    pub offset: Offset,
    /// When the message expires, if ever.
    pub expiry: Option<UnixMillis>,
    /// The bytes that were appended.
    pub body: Bytes,
}

/// Counters and sizes, for metrics.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    /// Appends acknowledged since open.
    pub appends: u64,
    /// Group commits since open.
    pub commits: u64,
    /// Of those, commits of a lone append made on its producer's thread
    /// ([`StoreOptions::commit_on_caller`]).
    pub caller_commits: u64,
    /// fdatasync calls on segment files since open (data and segment headers).
    pub syncs: u64,
    /// Segments deleted by retention since open.
    pub reclaimed_segments: u64,
    /// Durations of the group commits' fdatasyncs since open.
    pub commit_syncs: SyncLatency,
    /// Bytes of segment files on disk.
    pub bytes_on_disk: u64,
    /// Segment files on disk.
    pub segments: usize,
    /// Index entries held in memory (one per undelivered message per queue in segments without
    /// a sidecar, and in the few sealed chunks reads are on); the rest stay in sidecar files.
    pub resident_index_entries: usize,
    /// Per queue.
    pub queues: Vec<QueueStats>,
}

/// One queue's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// The queue.
    pub name: QueueName,
    /// Durable checkpoint.
    pub checkpoint: Offset,
    /// Offset of its last durable message.
    pub tail: Offset,
    /// Messages after the checkpoint not yet known to be expired.
    pub undelivered: usize,
    /// Messages found expired (skipped on read or reclaimed) since open.
    pub expired: u64,
}

struct Inner {
    shared: Arc<Shared>,
    /// The writer thread, then the completer thread (which ends once the writer has).
    writer: Mutex<Option<Threads>>,
    /// The writer itself, for a producer that commits its own append (see [`Store::append`]).
    slot: WriterSlot,
    report: RecoveryReport,
    generation: Generation,
    /// The writer's fence, for [`Store::check_fence`] (one `fstat` of `EPOCHS`).
    fence: Fence,
}

impl Inner {
    fn stop_writer(&self) -> Result<(), CloseError> {
        {
            let mut inbox = self.shared.lock_inbox();
            inbox.closing = true;
        }
        self.shared.inbox_cv.notify_all();
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        match handle {
            Some((writer, completer)) => {
                let wrote = writer.join();
                let completed = completer.join();
                let died = matches!(self.shared.halted(), Some(Halt::Panicked(_)));
                match wrote.and(completed) {
                    Ok(()) if !died => Ok(()),
                    _ => Err(CloseError::WriterPanicked),
                }
            }
            None => Ok(()),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.stop_writer().is_err() {
            tracing::error!("the store's writer thread panicked");
        }
    }
}

/// Claims `dir` for `epoch` and recovers it: refuses an epoch older than the newest that opened
/// the directory, records this open's generation in the fence before recovery (so a fenced
/// owner's later files are recognised) and its start after. Returns the fence, the generation
/// and what recovery found.
fn claim_and_recover(
    fs: &dyn Fs,
    dir: &Path,
    epoch: Epoch,
) -> Result<(Fence, Generation, Recovered), OpenError> {
    let (mut fence, mut history) = Fence::load(fs, dir)?;
    if let Some(current) = history.max_epoch() {
        if epoch < current {
            return Err(OpenError::EpochFenced {
                requested: epoch,
                current,
            });
        }
    }
    let newest = history
        .last_generation()
        .max(newest_segment_generation(fs, dir)?);
    let generation = Generation(newest.0 + 1);
    let claim = EpochRecord::Claim {
        generation,
        epoch: epoch.get(),
    };
    fence.append(claim)?;
    history.records.push(claim);
    let recovered = recover(fs, dir, &history)?;
    fence.append(EpochRecord::Start {
        generation,
        start: recovered.next_offset,
        tail: recovered.newest,
    })?;
    Ok((fence, generation, recovered))
}

/// A durable, ordered, multi-queue message store in one directory. Cheap to clone; every clone
/// is the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` on the real filesystem and clock.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, OpenError> {
        Store::open_with(dir, opts, Arc::new(OsFs), Arc::new(SystemClock))
    }

    /// Opens the store on the given filesystem and clock (tests inject faults and time here).
    ///
    /// The phases: check the options; claim the directory for this epoch and recover it
    /// (`claim_and_recover`); share the recovered index with the handles; start the writer on a
    /// new segment of this open's generation (`Writer::start`).
    pub fn open_with(
        dir: impl AsRef<Path>,
        opts: StoreOptions,
        fs: Arc<dyn Fs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Store, OpenError> {
        let dir = dir.as_ref().to_owned();
        opts.validate()?;
        fs.create_dir_all(&dir)
            .map_err(open_io("create directory", &dir))?;
        let (fence, generation, recovered) = claim_and_recover(fs.as_ref(), &dir, opts.epoch)?;
        let start = Start {
            next_offset: recovered.next_offset,
            queue_ids: recovered
                .index
                .by_name
                .iter()
                .map(|(name, &id)| (name.clone(), id))
                .collect(),
            next_queue_id: recovered.next_queue_id,
        };
        let shared = Arc::new(Shared::new(
            dir,
            generation,
            fs,
            clock,
            opts,
            recovered.index,
            recovered.next_offset,
        ));
        let (threads, slot) = Writer::start(&shared, fence.clone(), generation, start)?;
        let report = recovered.report;
        tracing::info!(
            dir = %shared.dir.display(),
            epoch = shared.opts.epoch.get(),
            segments = report.segments,
            undelivered = report.undelivered,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "store opened"
        );
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                writer: Mutex::new(Some(threads)),
                slot,
                report,
                generation,
                fence,
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// What recovery found when this store was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Stores `body` once for every queue in `queues` (at most [`MAX_QUEUES_PER_MESSAGE`],
    /// distinct). Completes with the message's offset once it is durable.
    pub fn append(
        &self,
        queues: &[QueueName],
        body: Bytes,
        expiry: Option<UnixMillis>,
    ) -> Pending<Offset, AppendError> {
        self.submit_append(None, queues, body, expiry)
    }

    /// [`Store::append`] as part of `chain`, one producer's ordered appends: it is stored only
    /// if every earlier append of the chain was. Once one fails (at once or in its group
    /// commit), this one and every later one of the chain fail with
    /// [`AppendError::ChainBroken`] without being written, so a producer that resends what was
    /// not acknowledged can never find a later message stored ahead of an earlier one.
    ///
    /// With [`StoreOptions::commit_on_caller`], an append that is the only one of its chain
    /// not yet answered, whose producer waits for it ([`AppendChain::set_producer_waits`]),
    /// and that finds the writer idle and nothing else waiting, is written and synced on the caller's thread before this returns (the
    /// `Pending` is then complete). A producer that pipelines leaves its appends to the writer
    /// thread, which groups them.
    pub fn append_in(
        &self,
        chain: &AppendChain,
        queues: &[QueueName],
        body: Bytes,
        expiry: Option<UnixMillis>,
    ) -> Pending<Offset, AppendError> {
        let position = match chain.take_position() {
            Ok(position) => position,
            Err(refused) => return Pending::ready(Err(refused)),
        };
        let at = position.at();
        let pending = self.submit_append(Some(position), queues, body, expiry);
        if let PendingState::Ready(Some(Err(e))) = &pending.state {
            chain.break_at(at, e);
        }
        pending
    }

    fn submit_append(
        &self,
        chain: Option<Position>,
        queues: &[QueueName],
        body: Bytes,
        expiry: Option<UnixMillis>,
    ) -> Pending<Offset, AppendError> {
        let shared = self.shared();
        if let Some(h) = shared.halted() {
            return Pending::ready(Err(h.append_error()));
        }
        if body.len() > shared.opts.max_message_bytes {
            return Pending::ready(Err(AppendError::TooLarge {
                size: body.len(),
                max: shared.opts.max_message_bytes,
            }));
        }
        if queues.is_empty() || queues.len() > MAX_QUEUES_PER_MESSAGE || has_duplicates(queues) {
            return Pending::ready(Err(AppendError::BadQueueList {
                count: queues.len(),
                max: MAX_QUEUES_PER_MESSAGE,
            }));
        }
        // The frame header is counted once per message: a conservative bound for the quota.
        let needed = (message_len(queues.len(), body.len()) + BATCH_HEADER_LEN) as u64;
        let on_disk = shared.used_bytes();
        let (tx, rx) = oneshot::channel();
        let quota = shared.opts.quota_bytes;
        // A producer with nothing else outstanding, holding the writer (taken before the
        // inbox, the writer thread's lock order), commits this append right here if nothing
        // else waits for the writer either.
        let alone = chain.as_ref().is_some_and(Position::is_alone);
        let mut writer = if alone {
            self.writer_for_caller()
        } else {
            None
        };
        let submitted = shared.submit_or_take(
            |inbox| {
                let used = on_disk + inbox.reserved;
                if used + needed > quota {
                    return Err(AppendError::Full {
                        needed,
                        used,
                        quota,
                    });
                }
                inbox.reserved += needed;
                inbox.requests.push(Request::Append {
                    queues: queues.to_vec(),
                    body,
                    expiry,
                    reserved: needed,
                    chain,
                    reply: tx,
                });
                Ok(())
            },
            writer.is_some(),
        );
        let answers = match (submitted, writer.as_mut()) {
            (Err(e), _) => return Pending::ready(Err(e)),
            (Ok(Some(request)), Some(writer)) => Writer::commit_on_caller(writer, request),
            (Ok(_), _) => None,
        };
        drop(writer);
        // After the writer is free (see `writer::AnswerOrder`); this waiter's own answer among
        // them, so it is ready when this returns.
        drop(answers);
        Pending {
            state: PendingState::Waiting(rx),
        }
    }

    /// The writer, for this caller to commit its own append on its own thread: only when the
    /// options allow it, the last fdatasync was quick, nobody holds the writer now (its thread
    /// is idle) and the next batch does not start a new segment (the thread's work). A lone
    /// append then costs no thread wake-up on either side of the sync.
    fn writer_for_caller(&self) -> Option<MutexGuard<'_, Option<Writer>>> {
        let shared = self.shared();
        if !shared.opts.commit_on_caller || crate::writer::delivering() {
            return None;
        }
        let last_sync = shared.stats.last_sync_micros.load(Ordering::Relaxed);
        if u128::from(last_sync) > shared.opts.caller_commit_max_sync.as_micros() {
            return None;
        }
        try_lock_slot(&self.inner.slot)
            .filter(|writer| writer.as_ref().is_some_and(|w| !w.rotation_due()))
    }

    /// Records durably that every message of `queue` up to and including `upto` is delivered.
    /// Checkpoints only move forward (a lower one is accepted and changes nothing) and never past
    /// the queue's last durable message.
    pub fn checkpoint(&self, queue: &QueueName, upto: Offset) -> Pending<(), CheckpointError> {
        let shared = self.shared();
        if let Some(h) = shared.halted() {
            return Pending::ready(Err(h.checkpoint_error()));
        }
        let (tx, rx) = oneshot::channel();
        let submitted = shared.submit(|inbox| {
            inbox.requests.push(Request::Checkpoint {
                queue: queue.clone(),
                upto,
                reply: tx,
            });
            Ok(())
        });
        if let Err(e) = submitted {
            return Pending::ready(Err(e));
        }
        Pending {
            state: PendingState::Waiting(rx),
        }
    }

    /// Up to `max` durable, unexpired messages of `queue` with offsets above `after`, in order.
    /// Reading from below the checkpoint returns the messages after the checkpoint.
    pub fn read(
        &self,
        queue: &QueueName,
        after: Offset,
        max: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let shared = self.shared();
        if let Some(h @ Halt::Panicked(_)) = shared.halted() {
            return Err(ReadError::Poisoned(h.to_string().into()));
        }
        let now = shared.clock.now().0;
        let picked: Vec<(IndexEntry, Arc<dyn FsFile>, PathBuf)> = {
            let mut index = shared.lock_index();
            let Some(&id) = index.by_name.get(queue) else {
                return Ok(Vec::new());
            };
            let entries = index
                .pick(shared.fs.as_ref(), id, after, max, now)
                .map_err(|e| ReadError::Corrupt {
                    file: shared.dir.clone(),
                    offset: 0,
                    reason: format!("index: {e}"),
                })?;
            entries
                .into_iter()
                .filter_map(|e| {
                    index
                        .segments()
                        .get(&e.seg)
                        .map(|s| (e, Arc::clone(&s.file), s.path.clone()))
                })
                .collect()
        };
        read_entries(&picked)
    }

    /// Runs retention now (it also runs after every checkpoint and about once a second):
    /// deletes every segment whose messages are all delivered or expired. Completes with how
    /// many segments were deleted.
    pub fn reclaim(&self) -> Pending<u64, ReclaimError> {
        let shared = self.shared();
        let (tx, rx) = oneshot::channel();
        let submitted = shared.submit(|inbox| {
            inbox.reclaims.push(tx);
            Ok(())
        });
        if let Err(e) = submitted {
            return Pending::ready(Err(e));
        }
        Pending {
            state: PendingState::Waiting(rx),
        }
    }

    /// The queue's durable checkpoint, or `None` for a queue never appended to.
    pub fn checkpoint_of(&self, queue: &QueueName) -> Option<Offset> {
        self.shared()
            .lock_index()
            .queue(queue)
            .map(|q| q.checkpoint)
    }

    /// Watches the offset of the newest durable message of the whole store: it changes after
    /// every group commit that stored messages (readers wait on it instead of polling).
    pub fn watch_durable(&self) -> watch::Receiver<Offset> {
        self.shared().durable_tx.subscribe()
    }

    /// Counters and per-queue state.
    pub fn stats(&self) -> StoreStats {
        let shared = self.shared();
        let index = shared.lock_index();
        StoreStats {
            appends: shared.stats.appends.load(Ordering::Relaxed),
            commits: shared.stats.commits.load(Ordering::Relaxed),
            caller_commits: shared.stats.caller_commits.load(Ordering::Relaxed),
            syncs: shared.stats.syncs.load(Ordering::Relaxed),
            reclaimed_segments: shared.stats.reclaimed_segments.load(Ordering::Relaxed),
            commit_syncs: SyncLatency {
                counts: shared
                    .stats
                    .sync_buckets
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                sum_micros: shared.stats.sync_micros_total.load(Ordering::Relaxed),
            },
            bytes_on_disk: index.bytes_on_disk(),
            segments: index.segments().len(),
            resident_index_entries: index.resident_entries(),
            queues: index
                .by_name
                .values()
                .filter_map(|&id| index.queues.get(id as usize))
                .map(|q| QueueStats {
                    name: q.name.clone(),
                    checkpoint: q.checkpoint,
                    tail: q.tail,
                    undelivered: usize::try_from(q.undelivered()).unwrap_or(usize::MAX),
                    expired: q.expired,
                })
                .collect(),
        }
    }

    /// Why the store refuses writes, if it does (for health endpoints).
    pub fn halted_reason(&self) -> Option<String> {
        self.shared().halted().map(|h| h.to_string())
    }

    /// The epoch this store was opened with (its fencing token).
    pub fn epoch(&self) -> Epoch {
        self.shared().opts.epoch
    }

    /// Whether a newer owner has claimed the directory, checked now: one `fstat` of `EPOCHS`
    /// (the check every group commit makes), so an idle owner can learn it without a write.
    /// Once it is true the store halts as a commit would have: every later write is refused
    /// with `Fenced` and it stays true. A store already halted for another reason (poisoned)
    /// answers from that state and reads nothing.
    pub fn check_fence(&self) -> bool {
        if self.shared().halted().is_none() && !self.inner.fence.still_current() {
            self.shared().halt_with(Halt::Fenced);
        }
        self.is_fenced()
    }

    /// Whether the store halted because a newer owner opened it (no I/O; see
    /// [`Store::check_fence`]).
    pub fn is_fenced(&self) -> bool {
        matches!(self.shared().halted(), Some(Halt::Fenced))
    }

    /// Turns true once the store halts (poisoned, fenced, or its writer died), and never back:
    /// a server waits on it to stop serving at once instead of polling.
    pub fn watch_halted(&self) -> watch::Receiver<bool> {
        self.shared().halted_tx.subscribe()
    }

    /// Internal generation number of this open (diagnostics).
    pub fn generation(&self) -> u64 {
        self.inner.generation.0
    }

    /// Stops the writer after the requests already submitted; later requests fail with `Closed`.
    pub fn close(self) -> Result<(), CloseError> {
        self.inner.stop_writer()
    }
}

fn has_duplicates(queues: &[QueueName]) -> bool {
    queues.len() > 1 && (1..queues.len()).any(|i| queues[..i].contains(&queues[i]))
}

/// Reads the picked entries, one `pread` per run of neighbouring entries in one segment.
fn read_entries(
    picked: &[(IndexEntry, Arc<dyn FsFile>, PathBuf)],
) -> Result<Vec<StoredMessage>, ReadError> {
    let mut out = Vec::with_capacity(picked.len());
    let mut i = 0;
    while i < picked.len() {
        let (first, file, path) = &picked[i];
        let mut j = i + 1;
        let mut end = first.pos + u64::from(first.len);
        while j < picked.len() && picked[j].0.seg == first.seg && picked[j].0.pos == end {
            end += u64::from(picked[j].0.len);
            j += 1;
        }
        let mut buf = vec![0u8; (end - first.pos) as usize];
        read_exact_at(file.as_ref(), &mut buf, first.pos).map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?;
        let buf = Bytes::from(buf);
        for (e, _, _) in &picked[i..j] {
            let at = (e.pos - first.pos) as usize;
            let slice = &buf[at..at + e.len as usize];
            let corrupt = |reason: String| ReadError::Corrupt {
                file: path.clone(),
                offset: e.pos,
                reason,
            };
            let (offset, expiry, body) =
                decode_message_checked(slice).map_err(|err| corrupt(err.to_string()))?;
            if offset != e.offset {
                return Err(corrupt(format!(
                    "expected offset {}, found {offset}",
                    e.offset
                )));
            }
            let body_at = at + (slice.len() - body.len());
            out.push(StoredMessage {
                offset,
                expiry,
                body: buf.slice(body_at..body_at + body.len()),
            });
        }
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::future::Future;
    use std::path::Path;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Wake, Waker};

    use bytes::Bytes;

    use super::*;
    use crate::sim::SimFs;
    use crate::types::ManualClock;

    /// A store on the simulated disk that commits lone appends on their caller, whatever the
    /// last sync took.
    fn open_with_caller_commits(dir: &str) -> Store {
        Store::open_with(
            Path::new(dir),
            StoreOptions {
                epoch: Epoch::new(1),
                preallocate: false,
                commit_on_caller: true,
                caller_commit_max_sync: std::time::Duration::MAX,
                ..StoreOptions::default()
            },
            Arc::new(SimFs::new()),
            Arc::new(ManualClock::new(UnixMillis(1_000))),
        )
        .expect("open")
    }

    /// Wakes by checking, on the thread that answers, whether the writer is free by then.
    struct SlotProbe {
        slot: WriterSlot,
        seen: Mutex<Option<mpsc::Sender<bool>>>,
    }

    impl Wake for SlotProbe {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let free = try_lock_slot(&self.slot).is_some();
            if let Some(tx) = self.seen.lock().unwrap().take() {
                let _ = tx.send(free);
            }
        }
    }

    /// A waiter answered while the answering thread still holds the writer cannot commit its
    /// next append itself: woken, it finds the writer taken, so its append goes to the writer
    /// thread, whose answer again comes under the writer: on a busy machine (the woken task
    /// preempting the thread that woke it) a stop-and-wait producer never got back to committing
    /// its own appends. So every answer leaves after the writer is released.
    #[test]
    fn a_waiter_is_answered_after_the_writer_is_released() {
        let store = open_with_caller_commits("/answers");
        let queue = QueueName::new("a").expect("name");
        for i in 0..20 {
            // Unchained: committed and answered by the writer thread, which waits for the
            // writer until the waker is in place.
            let held = lock_slot(&store.inner.slot);
            let mut pending = store.append(
                std::slice::from_ref(&queue),
                Bytes::from(format!("m{i}")),
                None,
            );
            let (tx, rx) = mpsc::channel();
            let probe = Arc::new(SlotProbe {
                slot: Arc::clone(&store.inner.slot),
                seen: Mutex::new(Some(tx)),
            });
            let waker = Waker::from(Arc::clone(&probe));
            let mut cx = Context::from_waker(&waker);
            if let Poll::Ready(r) = std::pin::Pin::new(&mut pending).poll(&mut cx) {
                panic!("answered while the writer was held here: {r:?}");
            }
            drop(held);
            let free = rx.recv().expect("woken");
            assert!(
                free,
                "append {i} was answered while the writer was still held"
            );
            assert!(pending.wait().is_ok());
        }
        store.close().expect("close");
    }

    /// Appends again from inside its answer, as a waker that runs synchronously may.
    struct Reentrant {
        store: Store,
        chain: AppendChain,
        inner: Mutex<Option<Pending<Offset, AppendError>>>,
    }

    impl Wake for Reentrant {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let queue = QueueName::new("b").expect("name");
            let next = self
                .store
                .append_in(&self.chain, &[queue], Bytes::from("inner"), None);
            *self.inner.lock().unwrap() = Some(next);
        }
    }

    /// An append made while this thread delivers answers goes to the writer thread: committed
    /// here, its answer would wait for the turn this thread holds (it hung before the guard).
    #[test]
    fn an_append_from_inside_an_answer_does_not_wait_on_itself() {
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let store = open_with_caller_commits("/reentrant");
            let wake = Arc::new(Reentrant {
                store: store.clone(),
                chain: AppendChain::new(),
                inner: Mutex::new(None),
            });
            wake.chain.set_producer_waits(true);
            let held = lock_slot(&store.inner.slot);
            let queue = QueueName::new("a").expect("name");
            let mut outer = store.append(&[queue], Bytes::from("outer"), None);
            let waker = Waker::from(Arc::clone(&wake));
            let mut cx = Context::from_waker(&waker);
            assert!(std::pin::Pin::new(&mut outer).poll(&mut cx).is_pending());
            drop(held);
            // Waiting on `outer` would replace the waker: first the inner append, made from
            // inside the answer.
            let inner = loop {
                if let Some(p) = wake.inner.lock().unwrap().take() {
                    break p;
                }
                std::thread::yield_now();
            };
            let first = outer.wait().expect("outer");
            let second = inner.wait().expect("inner");
            let _ = done_tx.send(first < second);
            store.close().expect("close");
        });
        let ordered = done_rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("an append from inside an answer hung");
        assert!(ordered);
    }
}
