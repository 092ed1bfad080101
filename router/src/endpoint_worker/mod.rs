//! The endpoint worker: one task per endpoint that delivers its queues, in order, to its sink.
//!
//! # Data path
//!
//! ```text
//! store queues of the endpoint (one per priority)
//!   │  Read: highest priority first, up to `window` messages after the queue's checkpointer
//!   │        (propose each; drop expired and undecodable ones at once, complete them)
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

use store::{CheckpointError, Clock, Offset, QueueName, Store, StoredMessage};
use tokio::sync::watch;

use crate::checkpoint::Checkpointer;
use crate::codec;
use crate::dispatcher::EndpointPolicy;
use crate::events::{self, Counters};
use crate::expiry::is_expired;
use crate::queue_id::QueueId;
use crate::retry::RetryPolicy;
use crate::route::{Endpoint, EndpointId, Priority};
use crate::sink::{Delivery, DeliveryOutcome, DynSink, FailureKind};
use state::{Action, Event, WorkerState};

/// What every worker shares.
pub(crate) struct WorkerContext {
    pub(crate) store: Store,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) window: usize,
    pub(crate) retry: RetryPolicy,
}

/// How the dispatcher talks to one worker.
pub(crate) struct WorkerChannels {
    /// The endpoint's priorities that have a queue.
    pub(crate) queues: watch::Receiver<BTreeSet<Priority>>,
    /// The registered sink, if any.
    pub(crate) sink: watch::Receiver<Option<Arc<dyn DynSink>>>,
    /// The head-of-line policy.
    pub(crate) policy: watch::Receiver<EndpointPolicy>,
    /// `true` (or a dropped sender) means stop.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// One queue of the endpoint, as the worker tracks it.
struct Queue {
    id: QueueId,
    name: QueueName,
    checkpointer: Checkpointer,
}

/// The batch `Read` picked for `Send`.
struct Batch {
    priority: Priority,
    sink: Arc<dyn DynSink>,
    deliveries: Vec<Delivery>,
}

/// Delivers one endpoint's queues to its sink.
pub(crate) struct EndpointWorker {
    endpoint: Endpoint,
    endpoint_id: EndpointId,
    ctx: WorkerContext,
    rx: WorkerChannels,
    durable: watch::Receiver<Offset>,
    queues: BTreeMap<Priority, Queue>,
    batch: Option<Batch>,
    /// Failed attempts of messages not yet completed, by offset.
    attempts: HashMap<Offset, u32>,
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
            r = self.durable.changed() => if r.is_err() { Event::StoreFailed } else { Event::Woken },
            r = self.rx.queues.changed() => if r.is_err() { Event::Shutdown } else { Event::Woken },
            r = self.rx.sink.changed() => if r.is_err() { Event::Shutdown } else { Event::Woken },
            () = shutdown_signal(&mut self.rx.shutdown) => Event::Shutdown,
        }
    }

    async fn sleep(&mut self, delay: Duration) -> Event {
        tokio::select! {
            () = tokio::time::sleep(delay) => Event::BackoffElapsed,
            () = shutdown_signal(&mut self.rx.shutdown) => Event::Shutdown,
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
        let priorities: Vec<Priority> = self.queues.keys().copied().collect();
        for priority in priorities {
            if let Some(deliveries) = self.read_queue(priority).await? {
                self.batch = Some(Batch {
                    priority,
                    sink,
                    deliveries,
                });
                return Ok(Event::BatchReady);
            }
        }
        Ok(Event::NothingToSend)
    }

    /// Adds queues the dispatcher announced since the last read.
    fn sync_queues(&mut self) {
        let announced = self.rx.queues.borrow_and_update().clone();
        for priority in announced {
            if self.queues.contains_key(&priority) {
                continue;
            }
            let id = QueueId::new(self.endpoint.clone(), priority);
            let Ok(name) = id.name() else {
                // The router refuses to store for such a queue, so it is always empty.
                continue;
            };
            let committed = self.ctx.store.checkpoint_of(&name).unwrap_or(Offset::ZERO);
            let queue = Queue {
                id,
                name,
                checkpointer: Checkpointer::new(committed),
            };
            self.queues.insert(priority, queue);
        }
    }

    /// The deliveries of the next messages of one queue, skipping (and checkpointing past)
    /// expired and undecodable ones; `None` when the queue has nothing to send.
    async fn read_queue(&mut self, priority: Priority) -> Result<Option<Vec<Delivery>>, Stop> {
        loop {
            let Some(queue) = self.queues.get(&priority) else {
                return Ok(None);
            };
            let after = queue.checkpointer.resume_after();
            let stored = match self.ctx.store.read(&queue.name, after, self.ctx.window) {
                Ok(stored) => stored,
                Err(e) => return Err(self.store_failed(&e)),
            };
            if stored.is_empty() {
                return Ok(None);
            }
            let deliveries = self.admit(priority, stored);
            if !deliveries.is_empty() {
                return Ok(Some(deliveries));
            }
            // Everything read was skipped: record that, then look further.
            self.checkpoint(priority).await?;
        }
    }

    /// Proposes every stored message; returns those to send and completes the others.
    fn admit(&mut self, priority: Priority, stored: Vec<StoredMessage>) -> Vec<Delivery> {
        let now = self.ctx.clock.now();
        let mut deliveries = Vec::with_capacity(stored.len());
        let Some(queue) = self.queues.get_mut(&priority) else {
            return deliveries;
        };
        let counters = &self.ctx.counters;
        for sm in stored {
            if queue.checkpointer.propose(sm.offset).is_err() {
                continue;
            }
            let skip = match codec::decode(&sm.body) {
                Err(e) => {
                    events::undecodable(counters, &queue.id, sm.offset, &e);
                    true
                }
                Ok(env) if is_expired(env.expiry_for(&self.endpoint_id, sm.expiry), now) => {
                    events::expired(counters, &queue.id, sm.offset);
                    true
                }
                Ok(env) => {
                    deliveries.push(Delivery {
                        offset: sm.offset,
                        priority,
                        previous_attempts: self.attempts.get(&sm.offset).copied().unwrap_or(0),
                        message: env.message,
                    });
                    false
                }
            };
            if skip {
                self.attempts.remove(&sm.offset);
                // Just proposed, so it is in flight: completing it cannot fail.
                let _ = queue.checkpointer.complete(sm.offset);
            }
        }
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
        let failed = self.apply(batch.priority, &offsets, outcomes);
        self.checkpoint(batch.priority).await?;
        if failed {
            if let Some(queue) = self.queues.get_mut(&batch.priority) {
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
        priority: Priority,
        offsets: &[Offset],
        mut outcomes: Vec<DeliveryOutcome>,
    ) -> bool {
        let set_aside_after = self.rx.policy.borrow().set_aside_after;
        let Some(queue) = self.queues.get_mut(&priority) else {
            return false;
        };
        outcomes.resize(offsets.len(), DeliveryOutcome::Retry(FailureKind::Internal));
        let counters = &self.ctx.counters;
        let mut delivered = 0;
        let mut failed = false;
        for (&offset, outcome) in offsets.iter().zip(outcomes) {
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
                let _ = queue.checkpointer.complete(offset);
            }
        }
        events::delivered(counters, &queue.id, delivered);
        failed
    }

    /// Makes the completed prefix of a queue durable.
    async fn checkpoint(&mut self, priority: Priority) -> Result<(), Stop> {
        let Some(queue) = self.queues.get_mut(&priority) else {
            return Ok(());
        };
        let Some(upto) = queue.checkpointer.committable() else {
            return Ok(());
        };
        match self.ctx.store.checkpoint(&queue.name, upto).await {
            Ok(()) => {
                let _ = queue.checkpointer.commit(upto);
                Ok(())
            }
            // Not durable yet, but nothing is lost: the next checkpoint covers this prefix too,
            // and a restart before then only resends it.
            Err(CheckpointError::NoSpace) => {
                tracing::warn!(queue = %queue.id, %upto, "no space for a checkpoint; will retry");
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
