//! The endpoint worker: one task per endpoint that delivers its queues, in order, to its sink.
//!
//! # Data path
//!
//! ```text
//! store queues of the endpoint: per priority, a backlog lane, and a live lane if some route
//! into the endpoint has x-edgehub-liveFirstSecs
//!   │  Read: (p0 live, p0 backlog, p1 live, …), up to `window` messages after the queue's
//!   │        checkpointer (propose each; drop expired and undecodable ones at once, complete
//!   │        them; in a live lane, append aged ones to the backlog lane, complete them once
//!   │        their copy is durable)
//!   ▼
//! Sink::send(batch) ──▶ one DeliveryOutcome per message, in order
//!   │  Delivered / Reject → complete;  Retry → stop here: this message and all after it
//!   │  are incomplete (unless the head-of-line policy sets it aside)
//!   ▼
//! Checkpointer::committable() ──▶ store.checkpoint(queue, upto)  (awaited: durable)
//!   │  on Retry: Checkpointer::rewind() and back off; the next Read starts at the first
//!   ▼  incomplete message, so resends are in order and nothing is skipped
//! ```
//!
//! The control flow is the pure state machine of [`state`]; this driver performs its actions.
//!
//! # Guarantees
//! - **Order**: within one queue, messages are handed to the sink in offset order, and after a
//!   failure the resend starts at the first incomplete message. Duplicates happen only after a
//!   failure (or a restart); there is never a gap or a reorder in what is offered.
//! - **Strict priority**: every `Read` scans the queues from priority 0 down, so an urgent
//!   message waits at most for the batch in flight (or the backoff in progress). Lower
//!   priorities can starve, by design (edgeHub).
//! - **No silent stall**: a message is completed only when it is delivered, rejected (counted),
//!   expired (counted), undecodable (counted) or set aside by policy (counted). A failing head
//!   of line is retried with backoff until one of those happens.
//! - **At-least-once**: the checkpoint only covers completed messages and is durable before the
//!   next batch is chosen.
//! - **Head-of-line policy**: a message's set-aside limit is the one its route stamped at enqueue
//!   (`x-edgehub-setAsideAfter`), else the endpoint's [`EndpointPolicy`] (default: strict).
//!
//! # Live-first lanes (`x-edgehub-liveFirstSecs: N`)
//!
//! A route with a live-first limit stores its messages in the *live lane* of (endpoint,
//! priority), a store queue of its own with its own checkpoint; everything else goes to the
//! *backlog lane*, the queue edgeHub has. At each priority the worker reads the live lane first:
//! - a live-lane message younger than its N (now − enqueue time < N s) is sent from there;
//! - an older one (an outage left it behind, or it failed until it aged) is *moved*: appended,
//!   same bytes and same expiry, to the backlog lane, and completed in the live lane only once
//!   that copy is durable; from then on it is a backlog message. If the store refuses the copy
//!   (full), it is sent from the live lane in place instead. The copies of one read are
//!   appended on one [`store::AppendChain`] and every one is awaited: the store keeps a prefix
//!   of them, so a message is either moved or sent in place, never both.
//!
//! Ordering contract:
//! - Order is kept within each lane: live messages reach the sink in enqueue order among
//!   themselves, and backlog messages in the order they entered the backlog lane (a moved
//!   message enters when it is moved, so it follows backlog messages already there, even ones
//!   enqueued after it by a route without live-first).
//! - A live message may overtake backlog messages of the same endpoint and priority, never a
//!   message of a higher priority: strict priority still comes first.
//! - Nothing is lost and nothing is skipped: each lane is checkpointed on its own contiguous
//!   prefix, and a live-lane checkpoint never passes a moved message before its backlog copy is
//!   durable. After a restart each lane resumes after its own checkpoint, with no gap. A crash
//!   between a move and the live-lane checkpoint can deliver that message twice
//!   (at-least-once, as for any send cut short).
//! - The backlog can starve while live messages keep arriving faster than the sink takes them;
//!   a live message that waits N seconds joins the backlog, so live traffic cannot grow without
//!   bound ahead of it.
//!
//! # Flow control
//! Every message completed (delivered, rejected, expired, undecodable, set aside, moved) that
//! was stored by this process (offset above the dispatcher's `flow_floor`) lowers the
//! endpoint's lag ([`crate::flow::EndpointFlow`]), once per batch, which wakes producers held
//! by it. A live-lane message moved to the backlog lane counts as completed, and its copy is
//! counted as a new message until it is completed in turn.
//!
//! # Limits
//! Reads are synchronous `pread`s on the runtime thread (normally served by the page cache). A
//! store failure (poisoned, fenced, closed, corrupt message) stops the worker and is counted;
//! the hub is expected to restart. A checkpoint refused for lack of disk space is not a
//! failure: delivery goes on and the next checkpoint covers the same prefix.

pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use store::{
    AppendChain, CheckpointError, Clock, Offset, Pending, QueueName, Store, StoredMessage,
    UnixMillis,
};
use tokio::sync::watch;

use crate::checkpoint::Checkpointer;
use crate::codec;
use crate::events::{self, Counters};
use crate::expiry::is_expired;
use crate::flow::EndpointFlow;
use crate::queue_id::{Lane, QueueId};
use crate::retry::RetryPolicy;
use crate::route::{DeliveryOptions, Endpoint, EndpointId, Priority};
use crate::sink::{Delivery, DeliveryOutcome, DynSink, FailureKind};
use state::{Action, Event, WorkerState};

/// Per-endpoint delivery policy: what applies to a message whose route set no
/// `x-edgehub-setAsideAfter` (a route's own limit, stamped on the message at enqueue, wins).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Set a message aside (count it and go on) after this many failed attempts. `None` (the
    /// default, as edgeHub) retries the head of the queue until it is delivered or expires,
    /// holding back everything behind it.
    pub set_aside_after: Option<u32>,
    /// Most messages in flight to this endpoint (its largest batch); `None` (the default) uses
    /// the dispatcher's [`crate::DispatcherConfig::window`]. A sink that fans a batch out over several
    /// connections (the upstream link, one per sending module) needs a larger one.
    pub window: Option<usize>,
}

/// What every worker shares.
pub(crate) struct WorkerContext {
    pub(crate) store: Store,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) window: usize,
    pub(crate) retry: RetryPolicy,
    /// The endpoint's lag: lowered by every completion of a message above `flow_floor`.
    pub(crate) flow: Arc<EndpointFlow>,
    /// The newest durable offset when the dispatcher started (older messages never counted).
    pub(crate) flow_floor: Offset,
}

/// How the dispatcher talks to one worker.
pub(crate) struct WorkerChannels {
    /// The endpoint's queues, as (priority, lane).
    pub(crate) queues: watch::Receiver<BTreeSet<QueueKey>>,
    /// The registered sink, if any.
    pub(crate) sink: watch::Receiver<Option<Arc<dyn DynSink>>>,
    /// The head-of-line policy.
    pub(crate) policy: watch::Receiver<EndpointPolicy>,
    /// `true` (or a dropped sender) means stop.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// One queue of an endpoint: its priority and lane. Ordered as the worker serves them: priority
/// first, then the live lane before the backlog lane.
pub(crate) type QueueKey = (Priority, Lane);

/// One queue of the endpoint, as the worker tracks it.
struct Queue {
    id: QueueId,
    name: QueueName,
    checkpointer: Checkpointer,
}

/// The batch `Read` picked for `Send`.
struct Batch {
    key: QueueKey,
    sink: Arc<dyn DynSink>,
    deliveries: Vec<Delivery>,
    /// Per delivery: the set-aside limit stamped by its route, if any.
    set_aside: Vec<Option<u32>>,
}

/// A stored message the worker will send (or move).
struct Admitted {
    delivery: Delivery,
    set_aside: Option<u32>,
    /// For a live-lane message past its live-first limit: what to append to the backlog lane
    /// (the stored bytes and this endpoint's expiry).
    aged: Option<(Bytes, Option<UnixMillis>)>,
}

/// Delivers one endpoint's queues to its sink.
pub(crate) struct EndpointWorker {
    endpoint: Endpoint,
    endpoint_id: EndpointId,
    ctx: WorkerContext,
    rx: WorkerChannels,
    durable: watch::Receiver<Offset>,
    queues: BTreeMap<QueueKey, Queue>,
    batch: Option<Batch>,
    /// Failed attempts of messages not yet completed, by offset.
    attempts: HashMap<Offset, u32>,
    /// The last checkpoint submitted and not yet known durable: the worker goes on reading and
    /// sending while it commits (it shares the next group commit with new appends), and settles
    /// it before submitting another or rewinding.
    pending_checkpoint: Option<(QueueKey, Offset, Pending<(), CheckpointError>)>,
}

/// Why a step could not go on.
enum Stop {
    Shutdown,
    StoreFailed,
}

impl From<Stop> for Event {
    fn from(stop: Stop) -> Event {
        match stop {
            Stop::Shutdown => Event::Shutdown,
            Stop::StoreFailed => Event::StoreFailed,
        }
    }
}

impl EndpointWorker {
    pub(crate) fn new(endpoint: Endpoint, ctx: WorkerContext, rx: WorkerChannels) -> Self {
        let durable = ctx.store.watch_durable();
        EndpointWorker {
            endpoint_id: endpoint.id(),
            endpoint,
            ctx,
            rx,
            durable,
            queues: BTreeMap::new(),
            batch: None,
            attempts: HashMap::new(),
            pending_checkpoint: None,
        }
    }

    /// Runs the state machine until shutdown or a store failure.
    pub(crate) async fn run(mut self) {
        let (mut state, mut action) = WorkerState::start();
        loop {
            let event = match action {
                Action::WaitForSink => self.wait_for_sink().await,
                Action::Read => self.read().await.unwrap_or_else(Event::from),
                Action::WaitForData => self.wait_for_data().await,
                Action::Send => self.send().await.unwrap_or_else(Event::from),
                Action::Sleep(delay) => self.sleep(delay).await,
                Action::Exit => break,
            };
            debug_assert!(
                action.outcomes().contains(&event),
                "{action:?} reported {event:?}, which the state table does not list"
            );
            (state, action) = state.on(event, &self.ctx.retry);
        }
        tracing::debug!(endpoint = %self.endpoint, "endpoint worker stopped");
    }

    async fn wait_for_sink(&mut self) -> Event {
        loop {
            if self.rx.sink.borrow_and_update().is_some() {
                return Event::SinkAttached;
            }
            tokio::select! {
                changed = self.rx.sink.changed() => {
                    if changed.is_err() {
                        return Event::Shutdown;
                    }
                }
                () = shutdown_signal(&mut self.rx.shutdown) => return Event::Shutdown,
            }
        }
    }

    async fn wait_for_data(&mut self) -> Event {
        tokio::select! {
            r = self.durable.changed() => match r {
                Ok(()) => Event::Woken,
                // Counted and logged like every other store failure.
                Err(_) => self.store_failed(&"the store stopped reporting commits").into(),
            },
            r = self.rx.queues.changed() => if r.is_err() { Event::Shutdown } else { Event::Woken },
            r = self.rx.sink.changed() => if r.is_err() { Event::Shutdown } else { Event::Woken },
            () = shutdown_signal(&mut self.rx.shutdown) => Event::Shutdown,
        }
    }

    /// Backs off; a newly registered sink (a module that came back) ends the backoff at once, so
    /// its backlog does not wait out a delay meant for the old, failing one.
    async fn sleep(&mut self, delay: Duration) -> Event {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return Event::BackoffElapsed,
                () = shutdown_signal(&mut self.rx.shutdown) => return Event::Shutdown,
                changed = self.rx.sink.changed() => {
                    if changed.is_err() {
                        return Event::Shutdown;
                    }
                    if self.rx.sink.borrow().is_some() {
                        return Event::BackoffElapsed;
                    }
                }
            }
        }
    }

    /// Picks the next batch: the first queue, by priority, with anything to send.
    async fn read(&mut self) -> Result<Event, Stop> {
        if *self.rx.shutdown.borrow() {
            return Err(Stop::Shutdown);
        }
        let Some(sink) = self.rx.sink.borrow_and_update().clone() else {
            return Ok(Event::NoSink);
        };
        self.sync_queues();
        // Marked seen before reading: a commit after this point wakes `wait_for_data`.
        self.durable.borrow_and_update();
        let keys: Vec<QueueKey> = self.queues.keys().copied().collect();
        for key in keys {
            if let Some(admitted) = self.read_queue(key).await? {
                let (deliveries, set_aside) = admitted
                    .into_iter()
                    .map(|a| (a.delivery, a.set_aside))
                    .unzip();
                self.batch = Some(Batch {
                    key,
                    sink,
                    deliveries,
                    set_aside,
                });
                return Ok(Event::BatchReady);
            }
        }
        Ok(Event::NothingToSend)
    }

    /// Adds queues the dispatcher announced since the last read.
    fn sync_queues(&mut self) {
        let announced = self.rx.queues.borrow_and_update().clone();
        for (priority, lane) in announced {
            self.track((priority, lane));
            if lane == Lane::Live {
                // Where its aged messages go: read in the same pass as the live lane.
                self.track((priority, Lane::Backlog));
            }
        }
    }

    /// Starts tracking a queue of the endpoint, from its durable checkpoint.
    fn track(&mut self, key: QueueKey) {
        if self.queues.contains_key(&key) {
            return;
        }
        let id = QueueId::in_lane(self.endpoint.clone(), key.0, key.1);
        let Ok(name) = id.name() else {
            // The router refuses to store for such a queue, so it is always empty.
            return;
        };
        let committed = self.ctx.store.checkpoint_of(&name).unwrap_or(Offset::ZERO);
        let queue = Queue {
            id,
            name,
            checkpointer: Checkpointer::new(committed),
        };
        self.queues.insert(key, queue);
    }

    /// The deliveries of the next messages of one queue, skipping (and checkpointing past)
    /// expired and undecodable ones, and moving aged live-lane ones to the backlog lane; `None`
    /// when the queue has nothing to send.
    async fn read_queue(&mut self, key: QueueKey) -> Result<Option<Vec<Admitted>>, Stop> {
        loop {
            let Some(queue) = self.queues.get(&key) else {
                return Ok(None);
            };
            let after = queue.checkpointer.resume_after();
            let window = self
                .rx
                .policy
                .borrow()
                .window
                .unwrap_or(self.ctx.window)
                .max(1);
            let stored = match self.ctx.store.read(&queue.name, after, window) {
                Ok(stored) => stored,
                Err(e) => return Err(self.store_failed(&e)),
            };
            if stored.is_empty() {
                return Ok(None);
            }
            let mut admitted = self.admit(key, stored);
            if admitted.iter().any(|a| a.aged.is_some()) {
                admitted = self.move_aged(key, admitted).await;
            }
            if !admitted.is_empty() {
                return Ok(Some(admitted));
            }
            // Everything read was skipped or moved: record that, then look further.
            self.checkpoint(key).await?;
        }
    }

    /// Appends the aged messages of a live-lane read to the backlog lane, in order, and completes
    /// each in the live lane once its copy is durable. Returns what is left to send: the young
    /// messages, plus (in place, in order) any aged one whose move the store refused.
    async fn move_aged(&mut self, key: QueueKey, admitted: Vec<Admitted>) -> Vec<Admitted> {
        let backlog = QueueId::in_lane(self.endpoint.clone(), key.0, Lane::Backlog);
        let Ok(name) = backlog.name() else {
            return admitted;
        };
        let store = &self.ctx.store;
        // Submitted together (usually one group commit, completed in submission order) on one
        // chain: once the store refuses a copy, it stores none submitted after it, so the
        // copies stored are a prefix and the rest stay in place, in order.
        let chain = AppendChain::new();
        let flow = &self.ctx.flow;
        let pending: Vec<_> = admitted
            .iter()
            .map(|a| {
                a.aged.as_ref().map(|(body, expiry)| {
                    // The copy is a message of its own for the lag, until it is completed.
                    flow.appended();
                    store.append_in(&chain, std::slice::from_ref(&name), body.clone(), *expiry)
                })
            })
            .collect();
        let mut completed = 0;
        let mut left = Vec::with_capacity(admitted.len());
        let mut moved = 0;
        let mut refused = false;
        for (a, pending) in admitted.into_iter().zip(pending) {
            let Some(pending) = pending else {
                left.push(a);
                continue;
            };
            // Every copy is awaited: a message is sent in place only if its copy is known not
            // to be stored (one whose copy is stored is moved, never also sent from here).
            let ok = pending.await.is_ok();
            if !ok {
                self.ctx.flow.refused();
                refused = true;
                left.push(Admitted { aged: None, ..a });
                continue;
            }
            let offset = a.delivery.offset;
            self.attempts.remove(&offset);
            if let Some(queue) = self.queues.get_mut(&key) {
                if queue.checkpointer.complete(offset).is_ok() && offset > self.ctx.flow_floor {
                    completed += 1;
                }
            }
            moved += 1;
        }
        self.ctx.flow.completed(completed);
        if let Some(queue) = self.queues.get(&key) {
            events::moved_to_backlog(&self.ctx.counters, &queue.id, moved, refused);
        }
        left
    }

    /// Proposes every stored message; returns those to send (or move) and completes the others.
    fn admit(&mut self, key: QueueKey, stored: Vec<StoredMessage>) -> Vec<Admitted> {
        let (priority, lane) = key;
        let now = self.ctx.clock.now();
        let mut deliveries = Vec::with_capacity(stored.len());
        let Some(queue) = self.queues.get_mut(&key) else {
            return deliveries;
        };
        let counters = &self.ctx.counters;
        let mut completed = 0;
        for sm in stored {
            if queue.checkpointer.propose(sm.offset).is_err() {
                continue;
            }
            let skip = match codec::decode_with_options(&sm.body) {
                Err(e) => {
                    events::undecodable(counters, &queue.id, sm.offset, &e);
                    true
                }
                Ok((env, _)) if is_expired(env.expiry_for(&self.endpoint_id, sm.expiry), now) => {
                    events::expired(counters, &queue.id, sm.offset);
                    true
                }
                Ok((env, stamped)) => {
                    let options = codec::options_for(&stamped, &self.endpoint_id);
                    let aged = (lane == Lane::Live && !is_live(&env, options, now)).then(|| {
                        let expiry = env.expiry_for(&self.endpoint_id, sm.expiry);
                        (sm.body.clone(), expiry)
                    });
                    deliveries.push(Admitted {
                        delivery: Delivery {
                            offset: sm.offset,
                            priority,
                            previous_attempts: self.attempts.get(&sm.offset).copied().unwrap_or(0),
                            message: env.message,
                        },
                        set_aside: options.set_aside_after,
                        aged,
                    });
                    false
                }
            };
            if skip {
                self.attempts.remove(&sm.offset);
                // Just proposed, so it is in flight: completing it cannot fail.
                if queue.checkpointer.complete(sm.offset).is_ok() && sm.offset > self.ctx.flow_floor
                {
                    completed += 1;
                }
            }
        }
        self.ctx.flow.completed(completed);
        deliveries
    }

    /// Sends the picked batch and applies the outcomes.
    async fn send(&mut self) -> Result<Event, Stop> {
        let Some(batch) = self.batch.take() else {
            return Ok(Event::BatchDone);
        };
        let offsets: Vec<Offset> = batch.deliveries.iter().map(|d| d.offset).collect();
        let outcomes = tokio::select! {
            outcomes = batch.sink.send_boxed(batch.deliveries) => outcomes,
            () = shutdown_signal(&mut self.rx.shutdown) => return Err(Stop::Shutdown),
        };
        let failed = self.apply(batch.key, &offsets, &batch.set_aside, outcomes);
        self.checkpoint(batch.key).await?;
        if failed {
            // Rewind only from a durable checkpoint, so a resend starts exactly after it.
            self.settle_checkpoint().await?;
            if let Some(queue) = self.queues.get_mut(&batch.key) {
                queue.checkpointer.rewind();
            }
            return Ok(Event::BatchFailed);
        }
        Ok(Event::BatchDone)
    }

    /// Completes what the sink finished, up to the first message that must be resent. Returns
    /// whether there is such a message.
    fn apply(
        &mut self,
        key: QueueKey,
        offsets: &[Offset],
        set_aside: &[Option<u32>],
        mut outcomes: Vec<DeliveryOutcome>,
    ) -> bool {
        let endpoint_policy = self.rx.policy.borrow().set_aside_after;
        let Some(queue) = self.queues.get_mut(&key) else {
            return false;
        };
        outcomes.resize(offsets.len(), DeliveryOutcome::Retry(FailureKind::Internal));
        let counters = &self.ctx.counters;
        let mut delivered = 0;
        let mut completed = 0;
        let mut failed = false;
        for (i, (&offset, outcome)) in offsets.iter().zip(outcomes).enumerate() {
            // The route's limit, stamped at enqueue, wins over the endpoint's policy.
            let set_aside_after = set_aside.get(i).copied().flatten().or(endpoint_policy);
            if failed {
                // Behind the first incomplete message: resent anyway, to keep the order.
                delivered += usize::from(outcome == DeliveryOutcome::Delivered);
                continue;
            }
            let complete = match outcome {
                DeliveryOutcome::Delivered => {
                    delivered += 1;
                    true
                }
                DeliveryOutcome::Reject(reason) => {
                    events::rejected(counters, &queue.id, offset, &reason);
                    true
                }
                DeliveryOutcome::Retry(kind) => {
                    let attempts = self.attempts.entry(offset).or_insert(0);
                    *attempts = attempts.saturating_add(1);
                    if set_aside_after.is_some_and(|max| *attempts >= max) {
                        events::set_aside(counters, &queue.id, offset, *attempts);
                        true
                    } else {
                        events::retrying(counters, &queue.id, offset, kind, *attempts);
                        failed = true;
                        false
                    }
                }
            };
            if complete {
                self.attempts.remove(&offset);
                if queue.checkpointer.complete(offset).is_ok() && offset > self.ctx.flow_floor {
                    completed += 1;
                }
            }
        }
        self.ctx.flow.completed(completed);
        events::delivered(counters, &queue.id, delivered);
        failed
    }

    /// Makes the completed prefix of a queue durable.
    /// Submits the queue's committable prefix as a checkpoint before anything else can happen,
    /// then settles the one submitted before it (the store answers in submission order) and
    /// leaves the new one pending.
    async fn checkpoint(&mut self, key: QueueKey) -> Result<(), Stop> {
        let Some(queue) = self.queues.get(&key) else {
            return Ok(());
        };
        let Some(upto) = queue.checkpointer.committable() else {
            return Ok(());
        };
        let pending = self.ctx.store.checkpoint(&queue.name, upto);
        self.settle_checkpoint().await?;
        self.pending_checkpoint = Some((key, upto, pending));
        Ok(())
    }

    /// Waits for the submitted checkpoint and records it as committed.
    async fn settle_checkpoint(&mut self) -> Result<(), Stop> {
        let Some((key, upto, pending)) = self.pending_checkpoint.take() else {
            return Ok(());
        };
        let outcome = tokio::select! {
            outcome = pending => outcome,
            () = shutdown_signal(&mut self.rx.shutdown) => return Err(Stop::Shutdown),
        };
        match outcome {
            Ok(()) => {
                if let Some(queue) = self.queues.get_mut(&key) {
                    let _ = queue.checkpointer.commit(upto);
                }
                Ok(())
            }
            // Not durable yet, but nothing is lost: the next checkpoint covers this prefix too,
            // and a restart before then only resends it.
            Err(CheckpointError::NoSpace) => {
                tracing::warn!(endpoint = %self.endpoint, %upto, "no space for a checkpoint; will retry");
                Ok(())
            }
            Err(e) => Err(self.store_failed(&e)),
        }
    }

    fn store_failed(&self, error: &dyn std::fmt::Display) -> Stop {
        if *self.rx.shutdown.borrow() {
            return Stop::Shutdown;
        }
        events::worker_failed(&self.ctx.counters, &self.endpoint, error);
        Stop::StoreFailed
    }
}

/// Whether a live-lane message is still within its route's live-first limit at `now`. A message
/// without a limit (never written so by the router) counts as aged: it goes to the backlog.
fn is_live(env: &codec::Envelope, options: DeliveryOptions, now: UnixMillis) -> bool {
    options.live_first_secs.is_some_and(|secs| {
        now.0.saturating_sub(env.enqueued_at.0) < u64::from(secs).saturating_mul(1000)
    })
}

/// Resolves once shutdown is asked for (the flag is true or its sender is gone).
async fn shutdown_signal(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
