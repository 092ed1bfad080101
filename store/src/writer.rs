//! The group-commit writer: one `Writer` owns every write to the data files. It lives in a
//! [`WriterSlot`]; its OS thread commits whatever waits in the inbox, and a producer that finds
//! the inbox empty and the slot free commits its own append on its own thread (see
//! `Store::append`), saving the two thread wake-ups a lone message would otherwise cost.
//! Whoever holds the slot commits; requests leave the inbox only under it, so batches still
//! go to disk in submission order.
//!
//! Invariants:
//! - A batch is written with one `pwrite` at the end of the active segment, made durable with one
//!   `fdatasync`, and only then applied to the index and answered, in request order. The next
//!   batch is written only after that, so at most the last batch of a segment can ever be torn.
//! - The fence is checked before the write and again after the fdatasync, before any waiter is
//!   completed: once a newer owner has claimed the directory, nothing more is acknowledged here.
//! - Any write or fsync failure poisons the store (never retried; fsyncgate). The one exception
//!   is ENOSPC from the data write itself: the file is cut back to the batch's start and synced,
//!   the batch's appends fail with `Full`, and the store goes on.
//! - Segment rotation creates the file, writes and syncs its header and syncs the directory
//!   before any batch goes into it; every segment begins with a preamble batch that declares every
//!   queue and repeats every checkpoint, so any older segment can be deleted on its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{open_io, AppendError, CheckpointError, OpenError, StorageError};
use crate::fence::Fence;
use crate::format::{
    declare_len, encode_checkpoint, encode_declare, encode_message, encode_seal, encode_tail,
    message_len, BatchHeader, Nonce, SegmentHeader, BATCH_HEADER_LEN, CHECKPOINT_LEN,
};
use crate::index::{IndexEntry, SegKey, SegmentInfo};
use crate::io::{write_zeros, FsFile};
use crate::prealloc::{Prepared, Preparer};
use crate::recovery::{segment_name, RESERVE_FILE};
use crate::shared::{Halt, Request, Shared};
use crate::sidecar::{self, sidecar_name, Identity};
use crate::types::{Generation, Offset, QueueName, UnixMillis};

/// An answer on its way to a waiter. The writer hands a batch's answers, in request order, to the
/// completer thread, which wakes the waiters while the writer already syncs the next batch.
pub(crate) enum Reply {
    Append(
        oneshot::Sender<Result<Offset, AppendError>>,
        Result<Offset, AppendError>,
    ),
    Checkpoint(
        oneshot::Sender<Result<(), CheckpointError>>,
        Result<(), CheckpointError>,
    ),
}

/// Runs the completer: delivers each batch's answers in turn (see [`AnswerOrder`]), until the
/// writer is gone. Waking waiters is most of the cost of a small append (a thread or task wake-up
/// each), so it runs beside the writer instead of between its fdatasyncs.
pub(crate) fn run_completer(
    batches: mpsc::Receiver<Ticketed>,
    order: Arc<AnswerOrder>,
    in_flight: Arc<AtomicUsize>,
) {
    for (ticket, batch) in batches {
        order.deliver_in_turn(ticket, batch);
        in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// A batch's answers with their ticket (see [`AnswerOrder`]).
pub(crate) type Ticketed = (u64, Vec<Reply>);

/// Answers leave in the order their batches were committed, whichever thread delivers them:
/// each batch's answers get a ticket under the writer, and are delivered only once every lower
/// ticket's were. The thread that committed a small batch delivers it itself after releasing
/// the writer, so a waiter it wakes finds the writer free (and may commit its next append on
/// its own thread) instead of taken by the thread that woke it.
pub(crate) struct AnswerOrder {
    turn: Mutex<Turn>,
    changed: Condvar,
}

struct Turn {
    /// The ticket whose answers go next.
    serving: u64,
    /// Threads waiting for their turn: the turn is passed on with a wake-up only when one is
    /// (most answers find nobody waiting, and a wake-up is a system call).
    waiting: usize,
}

impl AnswerOrder {
    fn new() -> Self {
        Self {
            turn: Mutex::new(Turn {
                serving: 0,
                waiting: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits for `ticket`'s turn (every lower ticket delivered), delivers, passes the turn on.
    /// A lower ticket is always with a thread that no longer needs the writer (the completer,
    /// or a committer that released it), so this never waits on the caller's own lock.
    fn deliver_in_turn(&self, ticket: u64, replies: Vec<Reply>) {
        let mut turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        while turn.serving < ticket {
            turn.waiting += 1;
            turn = self.changed.wait(turn).unwrap_or_else(|p| p.into_inner());
            turn.waiting -= 1;
        }
        DELIVERING.with(|d| d.set(true));
        deliver(replies);
        DELIVERING.with(|d| d.set(false));
        turn.serving = ticket + 1;
        let wake = turn.waiting > 0;
        drop(turn);
        if wake {
            self.changed.notify_all();
        }
    }
}

thread_local! {
    /// Set while this thread delivers answers. A waker that runs synchronously inside an answer
    /// (not tokio's: it schedules a task) and appends again must not commit on this thread: its
    /// answer would wait for the turn this thread holds.
    static DELIVERING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is delivering answers now (see `DELIVERING`).
pub(crate) fn delivering() -> bool {
    DELIVERING.with(std::cell::Cell::get)
}

/// Answers a committer took under the writer, delivered (in turn) when this is dropped: after
/// the writer is released on the normal path, and in any case (a panic that drops the writer)
/// before a later ticket could wait for them forever.
pub(crate) struct Answers {
    order: Arc<AnswerOrder>,
    batches: Vec<Ticketed>,
}

impl Answers {
    fn new(order: Arc<AnswerOrder>) -> Self {
        Self {
            order,
            batches: Vec::new(),
        }
    }

    /// Delivers them now (the same as dropping them).
    pub(crate) fn deliver(self) {}
}

impl Drop for Answers {
    fn drop(&mut self) {
        for (ticket, replies) in std::mem::take(&mut self.batches) {
            self.order.deliver_in_turn(ticket, replies);
        }
    }
}

fn deliver(replies: Vec<Reply>) {
    for reply in replies {
        match reply {
            Reply::Append(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Checkpoint(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// Batches up to this many answers are delivered by the writer itself when the completer is idle:
/// a hand-off would cost a second wake-up for little overlap.
const DIRECT_REPLIES: usize = 8;

/// The segment being appended to.
#[derive(Clone)]
pub(crate) struct Active {
    pub(crate) key: SegKey,
    pub(crate) generation: Generation,
    pub(crate) seq: u64,
    /// Keys the checksums of every frame written here (from the segment header).
    pub(crate) nonce: Option<Nonce>,
    pub(crate) file: Arc<dyn FsFile>,
    /// Where the next batch goes.
    pub(crate) len: u64,
    /// Bytes preallocated (zeros) in the file; 0 if it was created plainly.
    pub(crate) allocated: u64,
}

/// State only the writer thread touches.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) fence: Fence,
    pub(crate) active: Active,
    pub(crate) next_offset: Offset,
    pub(crate) queue_ids: HashMap<QueueName, u32>,
    pub(crate) next_queue_id: u32,
    pub(crate) buf: Vec<u8>,
    pub(crate) last_reclaim: Instant,
    /// The writer's next offset when the current batch began (its frame's `first_offset`).
    pub(crate) batch_start: Offset,
    /// The active segment's preamble is not durable yet (its write failed): write it before the
    /// next batch, and delete no older segment until then (they may hold the only declarations).
    pub(crate) needs_preamble: bool,
    /// Keeps the next segment ready (see `prealloc`).
    pub(crate) preparer: Preparer,
    /// Where answers go (with their tickets) to be delivered by the completer thread.
    pub(crate) completions: mpsc::Sender<Ticketed>,
    /// The order answers leave in, shared with the completer.
    pub(crate) order: Arc<AnswerOrder>,
    /// The next batch's ticket (see [`AnswerOrder`]).
    pub(crate) next_ticket: u64,
    /// Small batches' answers, delivered by whoever committed them once the writer is released.
    pub(crate) answers: Answers,
    /// Batches handed to the completer and not yet delivered.
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// Whether the `RESERVE` file is on disk (see [`crate::StoreOptions::reserve_bytes`]).
    pub(crate) reserve_present: bool,
}

/// A failure that ends the batch (and, except `NoSpace`, poisons the store).
pub(crate) enum BatchFailure {
    NoSpace,
    Halt(Halt),
}

/// One message's place in the batch being built.
struct Planned {
    queues: Vec<u32>,
    entry: IndexEntry,
}

/// What the batch will do for each request, in request order.
enum Plan {
    Message(Planned),
    /// The checkpoint's answer once the batch is durable (decided while building it).
    Checkpoint(Result<(), CheckpointError>),
}

/// How often an idle writer looks for expired segments to reclaim.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(1);

/// Where a new writer starts: what recovery found.
pub(crate) struct Start {
    /// The offset the next message gets.
    pub(crate) next_offset: Offset,
    /// The numeric id of every queue declared so far.
    pub(crate) queue_ids: HashMap<QueueName, u32>,
    /// The id the next new queue gets.
    pub(crate) next_queue_id: u32,
}

/// The writer and completer threads of an open store (the completer ends once the writer has).
pub(crate) type Threads = (std::thread::JoinHandle<()>, std::thread::JoinHandle<()>);

/// The writer, held by whoever commits: its thread, or a producer committing its own append.
/// `None` once the store closed or the writer panicked.
pub(crate) type WriterSlot = Arc<Mutex<Option<Writer>>>;

pub(crate) fn lock_slot(slot: &WriterSlot) -> MutexGuard<'_, Option<Writer>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer, if nobody else holds it right now and it is still there.
pub(crate) fn try_lock_slot(slot: &WriterSlot) -> Option<MutexGuard<'_, Option<Writer>>> {
    let guard = match slot.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    guard.is_some().then_some(guard)
}

impl Writer {
    /// Starts writing for a store just recovered: creates this generation's first segment, makes
    /// its preamble durable, and runs the writer and completer threads.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        fence: Fence,
        generation: Generation,
        start: Start,
    ) -> Result<(Threads, WriterSlot), OpenError> {
        let (mut writer, completed) = Writer::new(shared, fence, generation, start)?;
        writer.write_preamble().map_err(|f| {
            let source = match f {
                BatchFailure::NoSpace => std::io::Error::from_raw_os_error(libc::ENOSPC),
                BatchFailure::Halt(h) => std::io::Error::other(h.to_string()),
            };
            OpenError::Io {
                op: "create segment",
                path: shared.dir.clone(),
                source,
            }
        })?;
        writer.spawn(completed)
    }

    /// A writer on a new first segment of `generation` (created and synced, its preamble not yet
    /// written), and the receiving end of its completions.
    fn new(
        shared: &Arc<Shared>,
        fence: Fence,
        generation: Generation,
        start: Start,
    ) -> Result<(Writer, mpsc::Receiver<Ticketed>), OpenError> {
        let active = create_segment(shared, generation, 0)
            .map_err(open_io("create segment", &shared.dir))?;
        let (completions, completed) = mpsc::channel();
        let preparer = if shared.opts.preallocate {
            Preparer::start(
                Arc::clone(&shared.fs),
                shared.prepared_path.clone(),
                shared.opts.segment_bytes,
                Arc::clone(&shared.disk_bytes),
                shared.opts.quota_bytes,
                fence.clone(),
            )
        } else {
            Preparer::disabled()
        };
        let order = Arc::new(AnswerOrder::new());
        let writer = Writer {
            preparer,
            completions,
            answers: Answers::new(Arc::clone(&order)),
            order,
            next_ticket: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
            shared: Arc::clone(shared),
            fence,
            active,
            next_offset: start.next_offset,
            queue_ids: start.queue_ids,
            next_queue_id: start.next_queue_id,
            buf: Vec::with_capacity(1 << 20),
            last_reclaim: Instant::now(),
            batch_start: start.next_offset,
            needs_preamble: true,
            reserve_present: false,
        };
        Ok((writer, completed))
    }

    /// Runs the completer thread on `completed`, then this writer's thread. A panic of the
    /// writer halts the store (see `Shared::writer_died`).
    fn spawn(
        self,
        completed: mpsc::Receiver<Ticketed>,
    ) -> Result<(Threads, WriterSlot), OpenError> {
        let dir = self.shared.dir.clone();
        let in_flight = Arc::clone(&self.in_flight);
        let order = Arc::clone(&self.order);
        let completer = std::thread::Builder::new()
            .name("store-completer".into())
            .spawn(move || run_completer(completed, order, in_flight))
            .map_err(open_io("spawn completer thread", &dir))?;
        let shared = Arc::clone(&self.shared);
        let slot: WriterSlot = Arc::new(Mutex::new(Some(self)));
        let thread_slot = Arc::clone(&slot);
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // A bug must not leave every producer waiting on a writer that is gone.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&thread_slot, &shared);
                }));
                if let Err(panic) = ran {
                    lock_slot(&thread_slot).take();
                    shared.writer_died(panic_message(panic.as_ref()));
                }
            })
            .map_err(open_io("spawn writer thread", &dir))?;
        Ok(((handle, completer), slot))
    }

    /// Whether the next batch starts a new segment: rotation syncs the old one, creates the
    /// next and reads the old one back for its sidecar (tens of ms for 64 MiB), which is the
    /// writer thread's work, not a producer's.
    pub(crate) fn rotation_due(&self) -> bool {
        self.active.len >= self.shared.opts.segment_bytes
    }

    /// Commits `request` on the caller's thread (the caller holds the slot and found nothing
    /// else waiting). A panic halts the store as one on the writer thread does; the caller's
    /// `Pending` then reports the store closed.
    /// The answers are returned, to be delivered once the caller has released the writer.
    pub(crate) fn commit_on_caller(slot: &mut Option<Writer>, request: Request) -> Option<Answers> {
        let Some(writer) = slot.as_mut() else {
            // Taken out since the caller looked: answered as closed when `request` drops.
            return None;
        };
        let shared = Arc::clone(&writer.shared);
        shared.stats.caller_commits.fetch_add(1, Ordering::Relaxed);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            writer.commit(vec![request]);
            writer.take_answers()
        }));
        match ran {
            Ok(answers) => Some(answers),
            Err(panic) => {
                // Dropping the writer delivers what it had answered.
                *slot = None;
                shared.writer_died(panic_message(panic.as_ref()));
                None
            }
        }
    }

    /// The answers of the batches committed under this hold of the writer, for the committer
    /// to deliver once it has released the writer.
    pub(crate) fn take_answers(&mut self) -> Answers {
        std::mem::replace(&mut self.answers, Answers::new(Arc::clone(&self.order)))
    }

    /// A clean close leaves no unused preallocated space behind: the newest segment ends on its
    /// last batch and no prepared file is left. A fenced owner leaves the segment alone (the newer
    /// owner has sealed it); the prepared file it removes carries its own generation's name.
    fn close(mut self) {
        if self.halt().is_none() && self.still_current() {
            if let Err(BatchFailure::Halt(h)) = self.cut_preallocation() {
                tracing::warn!(reason = %h, "could not give back preallocated space at close");
            }
        }
        self.preparer = Preparer::disabled();
        let _ = self.shared.fs.remove(&self.shared.prepared_path);
    }

    /// Checks the fence before a mutation of a file a newer owner may rely on (a segment, the
    /// reserve); once fenced, the store halts and mutates nothing shared again.
    fn still_current(&self) -> bool {
        if self.fence.still_current() {
            return true;
        }
        self.poison(Halt::Fenced);
        false
    }

    fn halt(&self) -> Option<Halt> {
        self.shared
            .halt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn poison(&self, halt: Halt) {
        self.shared.halt_with(halt);
    }

    /// One group commit: everything that was waiting, one write, one fdatasync.
    fn commit(&mut self, requests: Vec<Request>) {
        let requests = self.refuse_broken_chains(requests);
        if requests.is_empty() {
            return;
        }
        if let Some(halt) = self.halt() {
            return self.fail_all(requests, &BatchFailure::Halt(halt));
        }
        if !self.fence.still_current() {
            self.poison(Halt::Fenced);
            return self.fail_all(requests, &BatchFailure::Halt(Halt::Fenced));
        }
        let ready = if self.active.len >= self.shared.opts.segment_bytes {
            self.rotate()
        } else if self.needs_preamble {
            self.write_preamble()
        } else {
            Ok(())
        };
        if let Err(failure) = ready {
            if let BatchFailure::Halt(h) = &failure {
                self.poison(h.clone());
            }
            return self.fail_all(requests, &failure);
        }
        let rollback = (self.next_offset, self.next_queue_id);
        let (plans, new_queues, checkpoints) = self.build(&requests);
        match self.write_and_sync() {
            Ok(frame_pos) => {
                self.apply(frame_pos, &plans, &new_queues, &checkpoints);
                self.answer(requests, plans);
                if !checkpoints.is_empty() {
                    self.reclaim();
                }
            }
            Err(failure) => {
                self.next_offset = rollback.0;
                self.next_queue_id = rollback.1;
                for (name, _) in &new_queues {
                    self.queue_ids.remove(name);
                }
                match failure {
                    BatchFailure::Halt(h) => {
                        self.poison(h.clone());
                        self.fail_all(requests, &BatchFailure::Halt(h));
                    }
                    BatchFailure::NoSpace => self.commit_checkpoints_on_full_disk(requests),
                }
            }
        }
    }

    /// The disk is full: the appends fail with `Full`, but the checkpoints must get through, or
    /// retention can never free space. The reserve file is given up to make room for them.
    fn commit_checkpoints_on_full_disk(&mut self, requests: Vec<Request>) {
        let (checkpoints, appends): (Vec<Request>, Vec<Request>) = requests
            .into_iter()
            .partition(|r| matches!(r, Request::Checkpoint { .. }));
        self.fail_all(appends, &BatchFailure::NoSpace);
        if checkpoints.is_empty() {
            return;
        }
        if self.release_reserve() {
            self.commit(checkpoints);
        } else {
            self.fail_all(checkpoints, &BatchFailure::NoSpace);
        }
    }

    /// Deletes the reserve file to free its space; false if there was none to give.
    fn release_reserve(&mut self) -> bool {
        if !self.reserve_present || !self.still_current() {
            return false;
        }
        let path = self.shared.dir.join(RESERVE_FILE);
        let freed = self
            .shared
            .fs
            .remove(&path)
            .and_then(|()| self.shared.fs.sync_dir(&self.shared.dir));
        match freed {
            Ok(()) => {
                self.reserve_present = false;
                tracing::warn!("disk full: released the reserve so checkpoints can free space");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk full and the reserve could not be released");
                false
            }
        }
    }

    /// Puts the reserve file back when there is room for it (at start, and after retention).
    fn ensure_reserve(&mut self) {
        let bytes = self.shared.opts.reserve_bytes;
        if self.reserve_present || bytes == 0 || self.halt().is_some() || !self.still_current() {
            return;
        }
        let path = self.shared.dir.join(RESERVE_FILE);
        let fs = &self.shared.fs;
        if let Ok(file) = fs.open(&path) {
            if file.len().is_ok_and(|len| len >= bytes) {
                self.reserve_present = true;
                return;
            }
            // A reserve cut short by a crash while it was being made: make it again.
            let _ = fs.remove(&path);
        }
        let made = fs.create_new(&path).and_then(|file| {
            write_zeros(file.as_ref(), bytes)?;
            file.sync_data()?;
            fs.sync_dir(&self.shared.dir)
        });
        match made {
            Ok(()) => self.reserve_present = true,
            Err(e) => {
                let _ = fs.remove(&path);
                tracing::debug!(error = %e, "no room for the reserve file yet");
            }
        }
    }

    /// Encodes the batch payload into `self.buf` (after room for the frame header) and decides
    /// each request's outcome.
    #[allow(clippy::type_complexity)]
    fn build(
        &mut self,
        requests: &[Request],
    ) -> (Vec<Plan>, Vec<(QueueName, u32)>, Vec<(u32, Offset)>) {
        self.buf.clear();
        self.buf.resize(BATCH_HEADER_LEN, 0);
        self.batch_start = self.next_offset;
        let mut plans = Vec::with_capacity(requests.len());
        let mut new_queues = Vec::new();
        let mut checkpoints: Vec<(u32, Offset)> = Vec::new();
        // Tails including this batch's messages, so a checkpoint may cover a message appended in
        // the same batch (both become durable together).
        let mut batch_tails: HashMap<u32, Offset> = HashMap::new();
        for req in requests {
            match req {
                Request::Append {
                    queues,
                    body,
                    expiry,
                    ..
                } => {
                    let planned = self.plan_message(queues, body, *expiry, &mut new_queues);
                    for &id in &planned.queues {
                        batch_tails.insert(id, planned.entry.offset);
                    }
                    plans.push(Plan::Message(planned));
                }
                Request::Checkpoint { queue, upto, .. } => {
                    let outcome =
                        self.plan_checkpoint(queue, *upto, &batch_tails, &mut checkpoints);
                    plans.push(Plan::Checkpoint(outcome));
                }
            }
        }
        (plans, new_queues, checkpoints)
    }

    /// Assigns the message its offset (and new queues their ids) and encodes it into the batch.
    fn plan_message(
        &mut self,
        queues: &[QueueName],
        body: &[u8],
        expiry: Option<UnixMillis>,
        new_queues: &mut Vec<(QueueName, u32)>,
    ) -> Planned {
        let mut ids = Vec::with_capacity(queues.len());
        for q in queues {
            let id = match self.queue_ids.get(q) {
                Some(&id) => id,
                None => {
                    let id = self.next_queue_id;
                    self.next_queue_id += 1;
                    self.queue_ids.insert(q.clone(), id);
                    encode_declare(&mut self.buf, id, q.as_str());
                    new_queues.push((q.clone(), id));
                    id
                }
            };
            ids.push(id);
        }
        let offset = self.next_offset;
        self.next_offset = offset.next();
        let at = self.buf.len();
        encode_message(&mut self.buf, offset, expiry, &ids, body);
        Planned {
            queues: ids,
            entry: IndexEntry {
                offset,
                expiry: expiry.map_or(u64::MAX, |e| e.0),
                // Relative to the frame; `apply` adds the frame's file position.
                pos: at as u64,
                seg: self.active.key,
                len: (self.buf.len() - at) as u32,
            },
        }
    }

    /// Validates a checkpoint; if it moves the queue forward, encodes it into the batch.
    fn plan_checkpoint(
        &mut self,
        queue: &QueueName,
        upto: Offset,
        batch_tails: &HashMap<u32, Offset>,
        checkpoints: &mut Vec<(u32, Offset)>,
    ) -> Result<(), CheckpointError> {
        let Some(&id) = self.queue_ids.get(queue) else {
            return Err(CheckpointError::UnknownQueue(queue.clone()));
        };
        let (durable_tail, durable_ckpt) = {
            let index = self.shared.lock_index();
            index
                .queues
                .get(id as usize)
                .map_or((Offset::ZERO, Offset::ZERO), |q| (q.tail, q.checkpoint))
        };
        let tail = durable_tail.max(batch_tails.get(&id).copied().unwrap_or_default());
        if upto > tail {
            return Err(CheckpointError::AheadOfData {
                queue: queue.clone(),
                requested: upto,
                last: tail,
            });
        }
        let planned = checkpoints
            .iter()
            .filter(|(q, _)| *q == id)
            .map(|(_, o)| *o)
            .max()
            .unwrap_or_default();
        if upto > durable_ckpt.max(planned) {
            encode_checkpoint(&mut self.buf, id, upto);
            checkpoints.push((id, upto));
        }
        Ok(())
    }

    /// Declares every queue, repeats every checkpoint and every queue's last offset, and seals
    /// every older segment's length at the start of a new segment.
    fn preamble(&mut self) {
        let index = self.shared.lock_index();
        for (key, seg) in index.segments() {
            if *key != self.active.key {
                encode_seal(&mut self.buf, seg.generation, seg.seq, seg.valid_len);
            }
        }
        for (id, q) in index.queues.iter().enumerate() {
            if index.by_name.get(&q.name) != Some(&(id as u32)) {
                continue;
            }
            encode_declare(&mut self.buf, id as u32, q.name.as_str());
            if q.checkpoint > Offset::ZERO {
                encode_checkpoint(&mut self.buf, id as u32, q.checkpoint);
            }
            if q.tail > q.checkpoint {
                encode_tail(&mut self.buf, id as u32, q.tail);
            }
        }
    }

    /// Frames `self.buf`, writes it at the end of the active segment and syncs it.
    /// Returns the frame's position in the file.
    fn write_and_sync(&mut self) -> Result<u64, BatchFailure> {
        let nonce = self.active.nonce;
        let header =
            BatchHeader::for_payload(self.batch_start, nonce, &self.buf[BATCH_HEADER_LEN..]);
        header.encode_into(nonce, &mut self.buf[..BATCH_HEADER_LEN]);
        let pos = self.active.len;
        let file = &self.active.file;
        if let Err(e) = file.write_all_at(&self.buf, pos) {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // Nothing of this batch was acknowledged: put the file back as it was.
                if file.set_len(pos).and_then(|()| file.sync_data()).is_ok() {
                    tracing::warn!(segment = self.active.seq, "disk full: batch refused");
                    self.active.allocated = self.active.allocated.min(pos);
                    self.shared.lock_index().set_file_len(self.active.key, pos);
                    return Err(BatchFailure::NoSpace);
                }
            }
            return Err(BatchFailure::Halt(Halt::Poisoned(
                format!("write to segment {}: {e}", self.active.seq).into(),
            )));
        }
        let sync_started = std::time::Instant::now();
        if let Err(e) = file.sync_data() {
            return Err(BatchFailure::Halt(Halt::Poisoned(
                format!("fdatasync of segment {}: {e}", self.active.seq).into(),
            )));
        }
        self.shared.stats.observe_sync(sync_started.elapsed());
        self.shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
        if !self.fence.still_current() {
            return Err(BatchFailure::Halt(Halt::Fenced));
        }
        self.active.len += self.buf.len() as u64;
        Ok(pos)
    }

    /// Makes the durable batch visible to readers.
    fn apply(
        &mut self,
        frame_pos: u64,
        plans: &[Plan],
        new_queues: &[(QueueName, u32)],
        checkpoints: &[(u32, Offset)],
    ) {
        let mut index = self.shared.lock_index();
        for (name, id) in new_queues {
            index.declare(*id, name.clone());
        }
        index.set_valid_len(self.active.key, self.active.len);
        for plan in plans {
            if let Plan::Message(p) = plan {
                let mut entry = p.entry;
                entry.pos += frame_pos;
                index.add_message(&p.queues, entry);
            }
        }
        let mut unreadable = None;
        for &(id, upto) in checkpoints {
            if let Err(e) = index.set_checkpoint(self.shared.fs.as_ref(), id, upto) {
                unreadable = Some(e);
            }
        }
        index.publish_tails();
        drop(index);
        if let Some(e) = unreadable {
            // The index can no longer count the queue exactly: stop rather than guess.
            self.poison(Halt::Poisoned(format!("index: {e}").into()));
        }
        self.shared
            .durable_tx
            .send_replace(Offset::new(self.next_offset.get().saturating_sub(1)));
    }

    /// Completes every waiter of the durable batch, in request order.
    fn answer(&mut self, requests: Vec<Request>, plans: Vec<Plan>) {
        // The batch's bytes are on disk now: give back its reservations before anyone hears of
        // it, so a waiter's next append does not count them twice.
        self.shared.release(reserved_by(&requests));
        let mut appends = 0;
        let mut replies = Vec::with_capacity(requests.len());
        for (req, plan) in requests.into_iter().zip(plans) {
            replies.push(match (req, plan) {
                (Request::Append { reply, .. }, Plan::Message(p)) => {
                    appends += 1;
                    Reply::Append(reply, Ok(p.entry.offset))
                }
                (Request::Checkpoint { reply, .. }, Plan::Checkpoint(outcome)) => {
                    Reply::Checkpoint(reply, outcome)
                }
                // `build` makes exactly one plan per request, of the request's kind.
                (Request::Append { reply, .. }, Plan::Checkpoint(_)) => {
                    Reply::Append(reply, Err(StorageError::Closed.into()))
                }
                (Request::Checkpoint { reply, .. }, Plan::Message(_)) => {
                    Reply::Checkpoint(reply, Err(StorageError::Closed.into()))
                }
            });
        }
        // Counted before anyone hears of it, so a waiter that reads the stats sees its append.
        self.shared
            .stats
            .appends
            .fetch_add(appends, Ordering::Relaxed);
        self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.complete(replies);
    }

    /// Gives a batch's answers their ticket, behind every earlier batch's (see [`AnswerOrder`]):
    /// a small one when the completer has nothing pending stays with the committer (delivered
    /// once it releases the writer: [`Writer::take_answers`]), others go to the completer. If
    /// the completer is gone (it only stops after the writer), the committer delivers them.
    fn complete(&mut self, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if replies.len() <= DIRECT_REPLIES && self.in_flight.load(Ordering::Acquire) == 0 {
            return self.answers.batches.push((ticket, replies));
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(batch)) = self.completions.send((ticket, replies)) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.answers.batches.push(batch);
        }
    }

    /// Refuses, unwritten, the appends behind a failure of their chain (see `chain`); the rest
    /// go on. Runs before every batch, so a chain broken by batch k refuses its requests in
    /// batch k+1.
    fn refuse_broken_chains(&mut self, requests: Vec<Request>) -> Vec<Request> {
        let broken = |r: &Request| match r {
            Request::Append {
                chain: Some(position),
                ..
            } => position.chain().refusal_for(position.at()).is_some(),
            _ => false,
        };
        if !requests.iter().any(broken) {
            return requests;
        }
        let (refused, rest): (Vec<Request>, Vec<Request>) = requests.into_iter().partition(broken);
        self.shared.release(reserved_by(&refused));
        let replies = refused
            .into_iter()
            .filter_map(|req| match req {
                Request::Append {
                    chain: Some(position),
                    reply,
                    ..
                } => position
                    .chain()
                    .refusal_for(position.at())
                    .map(|refused| Reply::Append(reply, Err(refused))),
                _ => None,
            })
            .collect();
        self.complete(replies);
        rest
    }

    /// Fails every request of a batch that was not written (or not durable). Breaks the chain
    /// of every failed append before the next batch is taken.
    fn fail_all(&mut self, requests: Vec<Request>, failure: &BatchFailure) {
        let shared = &self.shared;
        shared.release(reserved_by(&requests));
        let replies = requests
            .into_iter()
            .map(|req| match req {
                Request::Append {
                    reserved,
                    reply,
                    chain,
                    ..
                } => {
                    let err = match failure {
                        BatchFailure::NoSpace => AppendError::Full {
                            needed: reserved,
                            used: shared.used_bytes(),
                            quota: shared.used_bytes(),
                        },
                        BatchFailure::Halt(h) => h.append_error(),
                    };
                    if let Some(position) = chain {
                        position.chain().break_at(position.at(), &err);
                    }
                    Reply::Append(reply, Err(err))
                }
                Request::Checkpoint { reply, .. } => {
                    let err = match failure {
                        BatchFailure::NoSpace => CheckpointError::NoSpace,
                        BatchFailure::Halt(h) => h.checkpoint_error(),
                    };
                    Reply::Checkpoint(reply, Err(err))
                }
            })
            .collect();
        self.complete(replies);
    }

    /// Starts the next segment of this generation. On a full disk the rotation is postponed (the
    /// segment size is a soft limit) and the batch goes into the current segment, so that small
    /// batches such as checkpoints, which let retention free space, still fit.
    fn rotate(&mut self) -> Result<(), BatchFailure> {
        self.cut_preallocation()?;
        let previous = self.active.clone();
        match self.start_segment(previous.generation, previous.seq + 1) {
            Err(BatchFailure::NoSpace) if self.active.key == previous.key => {
                tracing::warn!(
                    segment = previous.seq,
                    "disk full: segment rotation postponed"
                );
                Ok(())
            }
            Err(BatchFailure::NoSpace) => self.undo_rotation(previous),
            Ok(()) => {
                write_sidecar(&self.shared, &previous);
                Ok(())
            }
            other => other,
        }
    }

    /// Drops a new segment whose preamble did not fit and goes on in `previous`.
    fn undo_rotation(&mut self, previous: Active) -> Result<(), BatchFailure> {
        let dropped = self.active.clone();
        let path = self
            .shared
            .dir
            .join(segment_name(dropped.generation, dropped.seq));
        let removed = self
            .shared
            .fs
            .remove(&path)
            .and_then(|()| self.shared.fs.sync_dir(&self.shared.dir));
        if let Err(e) = removed {
            // Keep the new segment; its preamble is retried before the next batch.
            tracing::warn!(file = %path.display(), error = %e, "could not drop a half-made segment");
            return Err(BatchFailure::NoSpace);
        }
        self.shared
            .lock_index()
            .forget_segment(self.shared.fs.as_ref(), dropped.key);
        self.active = previous;
        self.needs_preamble = false;
        tracing::warn!(
            segment = self.active.seq,
            "disk full: segment rotation postponed"
        );
        Ok(())
    }

    /// Gives back the zeros the active segment did not use, before a newer segment exists: only
    /// the newest segment may end in unused space (recovery reads every other one to its end).
    fn cut_preallocation(&mut self) -> Result<(), BatchFailure> {
        if self.active.allocated <= self.active.len {
            return Ok(());
        }
        let file = &self.active.file;
        file.set_len(self.active.len)
            .and_then(|()| file.sync_data())
            .map_err(|e| {
                BatchFailure::Halt(Halt::Poisoned(
                    format!("truncate segment {}: {e}", self.active.seq).into(),
                ))
            })?;
        self.active.allocated = self.active.len;
        self.shared
            .lock_index()
            .set_file_len(self.active.key, self.active.len);
        Ok(())
    }

    /// Creates segment `seq` (from the prepared file when one is ready) and makes its preamble
    /// durable.
    fn start_segment(&mut self, generation: Generation, seq: u64) -> Result<(), BatchFailure> {
        let made = match self.preparer.take() {
            Some(prepared) => adopt_prepared(&self.shared, prepared, generation, seq),
            None => create_segment(&self.shared, generation, seq),
        };
        self.active = made.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                BatchFailure::NoSpace
            } else {
                BatchFailure::Halt(Halt::Poisoned(format!("create segment {seq}: {e}").into()))
            }
        })?;
        self.preparer.request();
        self.write_preamble()
    }

    /// Writes the active segment's preamble batch: from then on this segment alone declares every
    /// queue and holds every checkpoint, so every older segment may be deleted on its own terms.
    pub(crate) fn write_preamble(&mut self) -> Result<(), BatchFailure> {
        self.needs_preamble = true;
        self.buf.clear();
        self.buf.resize(BATCH_HEADER_LEN, 0);
        self.batch_start = self.next_offset;
        self.preamble();
        if self.buf.len() > BATCH_HEADER_LEN {
            self.write_and_sync()?;
            self.shared
                .lock_index()
                .set_valid_len(self.active.key, self.active.len);
        }
        self.needs_preamble = false;
        Ok(())
    }

    /// Deletes segments whose every message is delivered or expired; returns how many.
    fn reclaim(&mut self) -> u64 {
        self.last_reclaim = Instant::now();
        if self.halt().is_some() || self.needs_preamble {
            return 0;
        }
        let now = self.shared.clock.now();
        let doomed: Vec<(SegKey, std::path::PathBuf)> = {
            let index = self.shared.lock_index();
            index
                .reclaimable(self.active.key, now)
                .into_iter()
                .filter_map(|k| index.segments().get(&k).map(|s| (k, s.path.clone())))
                .collect()
        };
        if doomed.is_empty() || !self.still_current() {
            return 0;
        }
        let mut removed = 0;
        for (key, path) in &doomed {
            match self.shared.fs.remove(path) {
                Ok(()) => {
                    let forgotten = self
                        .shared
                        .lock_index()
                        .forget_segment(self.shared.fs.as_ref(), *key);
                    if let Some(seg) = forgotten {
                        remove_sidecar(&self.shared, &seg);
                    }
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "could not delete a reclaimable segment; will retry");
                }
            }
        }
        if removed > 0 {
            if let Err(e) = self.shared.fs.sync_dir(&self.shared.dir) {
                self.poison(Halt::Poisoned(
                    format!("fsync of the store directory: {e}").into(),
                ));
            }
            self.shared
                .stats
                .reclaimed_segments
                .fetch_add(removed, Ordering::Relaxed);
            self.ensure_reserve();
            tracing::debug!(segments = removed, "reclaimed segments");
        }
        removed
    }
}

/// Creates segment `seq` of `generation`: header written and synced, directory synced, and the
/// segment added to the index.
/// The writer thread: waits for requests without holding the writer (a producer may commit on
/// its own thread meanwhile), then takes the writer, and only under it the oldest waiting
/// requests, and commits them; runs retention about once a second. Ends when the store closes.
fn run(slot: &WriterSlot, shared: &Shared) {
    // Whatever expired or was delivered while the store was closed goes first.
    let mut last_reclaim = {
        let mut guard = lock_slot(slot);
        let Some(writer) = guard.as_mut() else { return };
        writer.reclaim();
        writer.ensure_reserve();
        writer.last_reclaim
    };
    loop {
        {
            let mut inbox = shared.lock_inbox();
            while inbox.requests.is_empty() && inbox.reclaims.is_empty() && !inbox.closing {
                inbox.writer_waiting = true;
                let (guard, _) = shared
                    .inbox_cv
                    .wait_timeout(inbox, RECLAIM_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner());
                inbox = guard;
                inbox.writer_waiting = false;
                if inbox.requests.is_empty() && last_reclaim.elapsed() >= RECLAIM_INTERVAL {
                    break;
                }
            }
        }
        let mut guard = lock_slot(slot);
        let Some(writer) = guard.as_mut() else { return };
        let (requests, reclaims, close) = {
            let mut inbox = shared.lock_inbox();
            let close = inbox.requests.is_empty() && inbox.reclaims.is_empty() && inbox.closing;
            (
                take_batch(&mut inbox.requests, shared.opts.max_batch_bytes),
                std::mem::take(&mut inbox.reclaims),
                close,
            )
        };
        if close {
            if let Some(writer) = guard.take() {
                writer.close();
            }
            return;
        }
        if !requests.is_empty() {
            writer.commit(requests);
        }
        if !reclaims.is_empty() || writer.last_reclaim.elapsed() >= RECLAIM_INTERVAL {
            let removed = writer.reclaim();
            for reply in reclaims {
                let _ = reply.send(match writer.halt() {
                    Some(h) => Err(h.reclaim_error()),
                    None => Ok(removed),
                });
            }
        }
        last_reclaim = writer.last_reclaim;
        // Answered only once the writer is free: a waiter woken here may commit its next
        // append itself.
        let answers = writer.take_answers();
        drop(guard);
        answers.deliver();
    }
}

pub(crate) fn create_segment(
    shared: &Shared,
    generation: Generation,
    seq: u64,
) -> std::io::Result<Active> {
    let path = shared.dir.join(segment_name(generation, seq));
    let file = shared.fs.create_new(&path)?;
    let header = SegmentHeader::new(generation, seq);
    let written = file
        .write_all_at(&header.encode(), 0)
        .and_then(|()| file.sync_data())
        .and_then(|()| shared.fs.sync_dir(&shared.dir));
    if let Err(e) = written {
        // Best effort: a half-made segment holds nothing acknowledged, and recovery removes it.
        let _ = shared.fs.remove(&path);
        return Err(e);
    }
    Ok(register_segment(shared, header, path, file, 0))
}

/// Turns the prepared file into segment `seq`: header written and synced, then renamed into
/// place and the directory synced, so the segment name never points at a file without a header.
fn adopt_prepared(
    shared: &Shared,
    (file, allocated): Prepared,
    generation: Generation,
    seq: u64,
) -> std::io::Result<Active> {
    let from = shared.prepared_path.clone();
    let path = shared.dir.join(segment_name(generation, seq));
    let header = SegmentHeader::new(generation, seq);
    let adopted = file
        .write_all_at(&header.encode(), 0)
        .and_then(|()| file.sync_data())
        .and_then(|()| shared.fs.rename(&from, &path))
        .and_then(|()| shared.fs.sync_dir(&shared.dir));
    if let Err(e) = adopted {
        let _ = shared.fs.remove(&from);
        let _ = shared.fs.remove(&path);
        return Err(e);
    }
    Ok(register_segment(shared, header, path, file, allocated))
}

/// Adds a new segment (its header written and synced) to the index and makes it the active one.
fn register_segment(
    shared: &Shared,
    segment: SegmentHeader,
    path: std::path::PathBuf,
    file: Arc<dyn FsFile>,
    allocated: u64,
) -> Active {
    let SegmentHeader {
        generation,
        seq,
        nonce,
    } = segment;
    let header = segment.len() as u64;
    let key = shared.lock_index().add_segment(SegmentInfo {
        generation,
        seq,
        path,
        file: Arc::clone(&file),
        len: allocated.max(header),
        valid_len: header,
        summary: Default::default(),
        nonce,
        sidecar: None,
    });
    Active {
        key,
        generation,
        seq,
        nonce,
        file,
        len: header,
        allocated,
    }
}

/// Writes the sidecar index of `segment`, which the writer just left: cut to its data, synced,
/// and sealed by the new segment's preamble, so no writer changes it again. Its entries may
/// then leave memory. Derived data (DESIGN.md "Sidecar index files"): a failure is only logged,
/// and the next open scans the segment and writes it.
fn write_sidecar(shared: &Shared, segment: &Active) {
    let Some(nonce) = segment.nonce else {
        return;
    };
    let path = shared
        .dir
        .join(segment_name(segment.generation, segment.seq));
    let id = Identity {
        generation: segment.generation,
        seq: segment.seq,
        nonce,
        valid_len: segment.len,
    };
    let made = sidecar::build_from_file(segment.file.as_ref(), &path, nonce, segment.len)
        .and_then(|built| sidecar::make(shared.fs.as_ref(), &shared.dir, id, &built));
    match made {
        Ok(sc) => shared.lock_index().attach_sidecar(segment.key, sc),
        Err(e) => {
            tracing::warn!(error = %e, "could not write a sidecar; the next open scans the segment")
        }
    }
}

/// Deletes a reclaimed segment's sidecar (after the segment: a sidecar left by a crash in
/// between is deleted by the next open).
fn remove_sidecar(shared: &Shared, segment: &SegmentInfo) {
    let path = shared
        .dir
        .join(sidecar_name(segment.generation, segment.seq));
    match shared.fs.remove(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not delete a sidecar"),
    }
}

/// Takes the oldest waiting requests whose entries fit in `cap` bytes (at least one request), so
/// that no frame comes near the limit recovery accepts however long the disk stalled; the rest
/// wait for the next batch, in order.
fn take_batch(waiting: &mut Vec<Request>, cap: u64) -> Vec<Request> {
    let mut size = 0u64;
    let fits = waiting
        .iter()
        .take_while(|r| {
            size = size.saturating_add(r.max_encoded_len());
            size <= cap
        })
        .count()
        .max(1);
    if fits >= waiting.len() {
        std::mem::take(waiting)
    } else {
        waiting.drain(..fits).collect()
    }
}

impl Request {
    /// The most bytes this request can add to a batch payload: its entry, plus a declaration for
    /// each of its queues in case they are new.
    fn max_encoded_len(&self) -> u64 {
        match self {
            Request::Append { queues, body, .. } => {
                let declares: usize = queues.iter().map(|q| declare_len(q.as_str())).sum();
                (message_len(queues.len(), body.len()) + declares) as u64
            }
            Request::Checkpoint { .. } => CHECKPOINT_LEN as u64,
        }
    }
}

/// Quota bytes the requests reserved.
fn reserved_by(requests: &[Request]) -> u64 {
    requests
        .iter()
        .map(|r| match r {
            Request::Append { reserved, .. } => *reserved,
            Request::Checkpoint { .. } => 0,
        })
        .sum()
}

/// What a panic carried, as text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
