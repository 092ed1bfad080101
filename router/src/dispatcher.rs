//! The `Dispatcher` owns one endpoint worker per endpoint, the sink registered for each, and the
//! routing counters.
//!
//! - Workers are created on demand: when the router is about to store a message for a queue
//!   (`DispatcherHandle::ensure_queue`, called *before* the append so the worker cannot miss
//!   it), when a sink is registered, and at start for every queue the store still holds
//!   undelivered messages for (so messages queued before a restart or for an endpoint that no
//!   route names any more are still delivered).
//! - Heads register a sink when a receiver connects and unregister it when it goes; with no
//!   sink the worker waits and messages stay queued (they may expire meanwhile).
//! - Shutdown (mini-redis style): [`Dispatcher::shutdown`] flips a `watch` flag that every
//!   worker selects on, then awaits every worker task. Dropping the dispatcher flips the flag
//!   too (workers stop on their own; nothing waits for them). An in-flight send is cancelled;
//!   its messages are not checkpointed and are sent again after a restart (at-least-once).
//!
//! - Each endpoint's flow state ([`EndpointFlow`]) lives in its slot: registering a sink puts
//!   it online, removing it offline (which releases the producers it held at once). Only module
//!   inputs get a bound ([`DispatcherConfig::flow`]); `$upstream`'s sink stays registered while
//!   the cloud is away, so it is never flow-controlled.
//!
//! Invariants:
//! - At most one worker per endpoint, ever, for the dispatcher's lifetime.
//! - A worker never stops while the dispatcher lives, except when the store fails under it
//!   (counted in [`RouterMetrics::worker_failures`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use store::{Clock, Offset, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::endpoint_worker::EndpointPolicy;
use crate::endpoint_worker::{EndpointWorker, QueueKey, WorkerChannels, WorkerContext};
use crate::events::{Counters, RouterMetrics};
use crate::flow::{EndpointFlow, FlowBound};
use crate::message::ModuleId;
use crate::queue_id::{is_partition_queue, QueueId};
use crate::replica_worker::ReplicatedInput;
use crate::replicas::{PartitionId, ReplicaCount};
use crate::retry::RetryPolicy;
use crate::route::{Endpoint, EndpointId};
use crate::sink::{DynSink, Sink};

/// How workers deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatcherConfig {
    /// Most messages in flight to one endpoint: the largest batch handed to its sink (default
    /// 100). At least 1.
    pub window: usize,
    /// Backoff after a failed batch.
    pub retry: RetryPolicy,
    /// Head-of-line policy for endpoints without their own (see [`EndpointPolicy`]).
    pub default_policy: EndpointPolicy,
    /// Flow control for online module inputs (default: hold producers over
    /// [`crate::flow::DEFAULT_MAX_LAG`]; see [`crate::flow`]).
    pub flow: FlowBound,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            window: 100,
            retry: RetryPolicy::default(),
            default_policy: EndpointPolicy::default(),
            flow: FlowBound::default(),
        }
    }
}

/// The dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// `start` was called outside a tokio runtime.
    #[error("the dispatcher must be started inside a tokio runtime")]
    NoRuntime,
}

/// Owns the endpoint workers. Dropping it stops them.
#[derive(Debug)]
pub struct Dispatcher {
    handle: DispatcherHandle,
}

/// A cheap handle on the dispatcher's shared state, for the router.
#[derive(Clone, Debug)]
pub struct DispatcherHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
    config: DispatcherConfig,
    runtime: tokio::runtime::Handle,
    shutdown: watch::Sender<bool>,
    /// The newest durable offset when the dispatcher started: messages at or below it were
    /// stored by an earlier process and never count in an endpoint's lag.
    flow_floor: Offset,
    workers: Mutex<Workers>,
}

#[derive(Debug, Default)]
struct Workers {
    closed: bool,
    by_endpoint: BTreeMap<EndpointId, Slot>,
    /// The declared count of every replicated module.
    replica_counts: BTreeMap<ModuleId, ReplicaCount>,
    /// The replicated inputs served, each with its worker task.
    replicated: BTreeMap<EndpointId, (Arc<ReplicatedInput>, Option<JoinHandle<()>>)>,
}

/// What the dispatcher keeps per endpoint: the worker's inputs and its task.
struct Slot {
    queues: watch::Sender<BTreeSet<QueueKey>>,
    sink: watch::Sender<Option<Arc<dyn DynSink>>>,
    policy: watch::Sender<EndpointPolicy>,
    flow: Arc<EndpointFlow>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("queues", &*self.queues.borrow())
            .field("has_sink", &self.sink.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// Starts a dispatcher on `store`, with a worker for every endpoint that has undelivered
    /// messages. Must be called inside a tokio runtime; workers run on it.
    pub fn start(
        store: Store,
        clock: Arc<dyn Clock>,
        mut config: DispatcherConfig,
    ) -> Result<Dispatcher, DispatcherError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DispatcherError::NoRuntime)?;
        config.window = config.window.max(1);
        let (shutdown, _) = watch::channel(false);
        let flow_floor = *store.watch_durable().borrow();
        let shared = Arc::new(Shared {
            flow_floor,
            store,
            clock,
            counters: Arc::new(Counters::default()),
            config,
            runtime,
            shutdown,
            workers: Mutex::new(Workers::default()),
        });
        let handle = DispatcherHandle { shared };
        handle.recover_queues();
        Ok(Dispatcher { handle })
    }

    /// A handle for the router.
    pub fn handle(&self) -> DispatcherHandle {
        self.handle.clone()
    }

    /// Registers (or replaces) the sink of `endpoint`; its worker starts sending.
    pub fn register_sink<S: Sink>(&self, endpoint: &Endpoint, sink: S) {
        self.register_dyn_sink(endpoint, Arc::new(sink));
    }

    /// [`Dispatcher::register_sink`] for a sink already shared.
    pub fn register_dyn_sink(&self, endpoint: &Endpoint, sink: Arc<dyn DynSink>) {
        self.handle.with_slot(endpoint, |slot| {
            slot.sink.send_replace(Some(sink));
            slot.flow.set_online(true);
        });
    }

    /// Removes the sink of `endpoint`: its worker finishes the batch in flight, then waits.
    pub fn unregister_sink(&self, endpoint: &Endpoint) {
        self.handle.with_slot(endpoint, |slot| {
            slot.sink.send_replace(None);
            slot.flow.set_online(false);
        });
    }

    /// [`Dispatcher::register_dyn_sink`] only if `allowed()` holds, evaluated under the
    /// dispatcher's lock (so no other registration or removal comes between the check and the
    /// registration). Returns whether `sink` was registered.
    pub fn register_dyn_sink_if(
        &self,
        endpoint: &Endpoint,
        sink: Arc<dyn DynSink>,
        allowed: impl FnOnce() -> bool,
    ) -> bool {
        let mut registered = false;
        self.handle.with_slot(endpoint, |slot| {
            if allowed() {
                slot.sink.send_replace(Some(sink));
                slot.flow.set_online(true);
                registered = true;
            }
        });
        registered
    }

    /// Removes the sink of `endpoint` only if it is the one `owned` recognises (say, the `Arc`
    /// a head registered, by [`Arc::ptr_eq`]): a head that goes away never removes the sink a
    /// newer receiver registered since. Returns whether a sink was removed.
    pub fn unregister_sink_if(
        &self,
        endpoint: &Endpoint,
        owned: impl FnOnce(&Arc<dyn DynSink>) -> bool,
    ) -> bool {
        let mut removed = false;
        self.handle.with_slot(endpoint, |slot| {
            removed = slot.sink.send_if_modified(|current| {
                if current.as_ref().is_some_and(owned) {
                    *current = None;
                    true
                } else {
                    false
                }
            });
            if removed {
                slot.flow.set_online(false);
            }
        });
        removed
    }

    /// Ends the backoff of `endpoint`'s worker now, keeping its sink: for a sink whose receiver
    /// became reachable again (the upstream link reconnected), so the backlog does not wait out
    /// a delay meant for the outage. Does nothing to a worker that is not backing off.
    pub fn wake(&self, endpoint: &Endpoint) {
        self.handle.with_slot(endpoint, |slot| {
            slot.sink.send_modify(|_| {});
        });
    }

    /// Sets the delivery policy of `endpoint` (applies from its next batch).
    pub fn set_policy(&self, endpoint: &Endpoint, policy: EndpointPolicy) {
        self.handle.with_slot(endpoint, |slot| {
            slot.policy.send_replace(policy);
        });
    }

    /// Endpoints that have a worker.
    pub fn endpoints(&self) -> Vec<EndpointId> {
        self.handle.lock().by_endpoint.keys().cloned().collect()
    }

    /// The routing counters now.
    pub fn metrics(&self) -> RouterMetrics {
        self.handle.metrics()
    }

    /// Declares the replicated modules and their counts (from a manifest). A replicated input
    /// already served takes its module's new count (`Replicas::set_count`); a module no longer
    /// declared keeps its last count for the inputs already served.
    pub fn set_replica_counts(&self, counts: BTreeMap<ModuleId, ReplicaCount>) {
        let mut workers = self.handle.lock();
        for (input, _) in workers.replicated.values() {
            if let Some(count) = counts.get(input.module()) {
                input.set_count(*count);
            }
        }
        workers.replica_counts = counts;
    }

    /// Whether `module` is declared replicated.
    pub fn is_replicated(&self, module: &ModuleId) -> bool {
        self.handle.lock().replica_counts.contains_key(module)
    }

    /// The replicated input `endpoint` (started on first use), or `None` if its module is not
    /// declared replicated or its partition queues cannot be named.
    pub fn replicated_input(&self, endpoint: &Endpoint) -> Option<Arc<ReplicatedInput>> {
        self.handle.replicated_input(endpoint)
    }

    /// Stops every worker and waits for them to exit. Messages not yet checkpointed stay queued.
    pub async fn shutdown(self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut workers = self.handle.lock();
            workers.closed = true;
            let workers = &mut *workers;
            workers
                .by_endpoint
                .values_mut()
                .filter_map(|s| s.task.take())
                .chain(
                    workers
                        .replicated
                        .values_mut()
                        .filter_map(|(_, t)| t.take()),
                )
                .collect()
        };
        self.handle.shared.shutdown.send_replace(true);
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "endpoint worker panicked");
            }
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.handle.lock().closed = true;
        self.handle.shared.shutdown.send_replace(true);
    }
}

impl DispatcherHandle {
    /// The routing counters now, with every replicated input's counts.
    pub fn metrics(&self) -> RouterMetrics {
        let mut metrics = self.shared.counters.snapshot();
        let inputs: Vec<Arc<ReplicatedInput>> = self
            .lock()
            .replicated
            .values()
            .map(|(i, _)| Arc::clone(i))
            .collect();
        metrics.replicas = inputs.iter().map(|i| i.stats()).collect();
        metrics.flow = self
            .lock()
            .by_endpoint
            .values()
            .filter(|s| s.flow.is_controlled())
            .map(|s| s.flow.stats())
            .collect();
        metrics
    }

    /// The store the workers read (and the router appends to).
    pub(crate) fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The clock the workers expire messages by (the router stamps expiries by it too).
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// The routing counters the workers and the router share.
    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.shared.counters
    }

    /// Makes sure the worker of `queue.endpoint` exists and drains `queue`. Called before the
    /// first append to a queue, so the worker's next read sees it. Returns the endpoint's flow
    /// state, which the router counts every message stored for it in.
    pub(crate) fn ensure_queue(&self, queue: &QueueId) -> Arc<EndpointFlow> {
        let mut flow = None;
        self.with_slot(&queue.endpoint, |slot| {
            slot.queues
                .send_if_modified(|q| q.insert((queue.priority, queue.lane)));
            flow = Some(Arc::clone(&slot.flow));
        });
        // `with_slot` always runs its closure; a fresh uncontrolled state is never reached.
        flow.unwrap_or_else(|| Arc::new(EndpointFlow::new(queue.endpoint.id(), FlowBound::Off)))
    }

    /// Makes sure a replicated input's worker runs before a message is stored in one of its
    /// partition queues (it reads every partition; the partition is for the log).
    pub(crate) fn ensure_partition(&self, endpoint: &Endpoint, partition: PartitionId) {
        if self.replicated_input(endpoint).is_none() {
            tracing::warn!(%endpoint, %partition,
                "a partition queue of a module not declared replicated: it waits until it is");
        }
    }

    fn replicated_input(&self, endpoint: &Endpoint) -> Option<Arc<ReplicatedInput>> {
        let Endpoint::ModuleInput { module, .. } = endpoint else {
            return None;
        };
        let mut workers = self.lock();
        if let Some((input, _)) = workers.replicated.get(&endpoint.id()) {
            return Some(Arc::clone(input));
        }
        let count = *workers.replica_counts.get(module)?;
        let shared = &self.shared;
        let input = match ReplicatedInput::new(
            endpoint,
            count,
            shared.store.clone(),
            Arc::clone(&shared.clock),
        ) {
            Ok(input) => Arc::new(input),
            Err(e) => {
                tracing::error!(%endpoint, error = %e, "a replicated input cannot be served");
                return None;
            }
        };
        let task = (!workers.closed).then(|| {
            shared
                .runtime
                .spawn(Arc::clone(&input).run(shared.shutdown.subscribe()))
        });
        workers
            .replicated
            .insert(endpoint.id(), (Arc::clone(&input), task));
        Some(input)
    }

    fn lock(&self) -> MutexGuard<'_, Workers> {
        self.shared
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the slot of `endpoint`, creating it (and spawning its worker) if needed.
    fn with_slot(&self, endpoint: &Endpoint, f: impl FnOnce(&mut Slot)) {
        let mut workers = self.lock();
        let closed = workers.closed;
        let slot = workers
            .by_endpoint
            .entry(endpoint.id())
            .or_insert_with(|| self.new_slot(endpoint, closed));
        f(slot);
    }

    fn new_slot(&self, endpoint: &Endpoint, closed: bool) -> Slot {
        let shared = &self.shared;
        let (queues, queues_rx) = watch::channel(BTreeSet::new());
        let (sink, sink_rx) = watch::channel(None);
        let (policy, policy_rx) = watch::channel(shared.config.default_policy);
        let bound = match endpoint {
            Endpoint::ModuleInput { .. } => shared.config.flow,
            Endpoint::Upstream => FlowBound::Off,
        };
        let flow = Arc::new(EndpointFlow::new(endpoint.id(), bound));
        let task = (!closed).then(|| {
            let worker = EndpointWorker::new(
                endpoint.clone(),
                WorkerContext {
                    store: shared.store.clone(),
                    clock: Arc::clone(&shared.clock),
                    counters: Arc::clone(&shared.counters),
                    window: shared.config.window,
                    retry: shared.config.retry,
                    flow: Arc::clone(&flow),
                    flow_floor: shared.flow_floor,
                },
                WorkerChannels {
                    queues: queues_rx,
                    sink: sink_rx,
                    policy: policy_rx,
                    shutdown: shared.shutdown.subscribe(),
                },
            );
            shared.runtime.spawn(worker.run())
        });
        Slot {
            queues,
            sink,
            policy,
            flow,
            task,
        }
    }

    /// Registers every router queue the store holds undelivered messages for.
    fn recover_queues(&self) {
        for q in self.shared.store.stats().queues {
            if q.tail <= q.checkpoint || is_partition_queue(&q.name) {
                // A partition queue is served once its module's replicas are declared.
                continue;
            }
            match QueueId::parse(&q.name) {
                Ok(id) => {
                    self.ensure_queue(&id);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a queue the router did not create"),
            }
        }
    }
}
