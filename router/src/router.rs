//! The `Router`: evaluates the route table for a message, stores it durably for every target
//! queue, and acknowledges only then.
//!
//! # Data path
//!
//! ```text
//! head ──▶ Router::route(msg)
//!            │ RouteTable::targets(&msg)        (snapshot of the current table)
//!            │   no target → counted, dropped, Ok(Unrouted)
//!            │ QueueId per target (live lane for x-edgehub-liveFirstSecs routes)
//!            │   → DispatcherHandle::ensure_queue (worker exists and knows the
//!            │   queue before the message can be durable)
//!            │ codec::encode_with_options(Envelope)  (one copy, per-target expiry overrides and
//!            │                                        x-edgehub options)
//!            │ Store::append(all target queues, bytes, latest expiry)   (submitted now)
//!            ▼
//!          RouteAck (a future) ── resolves when the append is durable: the sender's ack point
//!          RouteAck::hold() ── Some while an online target endpoint lags past its bound: the
//!                              head reads nothing more from that producer until it is released
//! ```
//!
//! # Flow control
//! Every message submitted for an endpoint counts in that endpoint's lag
//! ([`crate::flow::EndpointFlow`]) from just before its append until its worker completes it, or
//! until the store refuses it (the `RouteAck` resolving, or dropped, with an error). A replicated
//! module's partition queues are not counted.
//!
//! # Guarantees
//! - A message is acknowledged (`RouteAck` resolves `Ok(Stored)`) only once it is durable in
//!   every target queue; an error means it was stored nowhere and must not be acked.
//! - The append is submitted when `route` is called, not when the returned future is first
//!   polled, and the store completes appends in submission order: a head that calls `route` in
//!   order gets completions in that order (it may await the acks in a pipeline).
//! - [`Router::route_in`] adds the append to a producer's [`AppendChain`]: once one of its
//!   messages fails to become durable (even in a later group commit than the one it was
//!   refused in), none routed after it on that chain is stored.
//! - [`Router::reload`] swaps the table whole; a message is evaluated against exactly one table.
//!   Messages already queued keep the priority (their queue) and TTL (their stored expiry) they
//!   were enqueued with; nothing queued is dropped, even for an endpoint no route names any more.
//!
//! # TTL: one stored copy, per-target expiry
//!
//! A message goes to several endpoints, each with the TTL of the route that won for it, but it
//! is stored once (store guarantee 3) and the store keeps one expiry per message. The design:
//!
//! - The store-level expiry is the **latest** of the targets' expiries (never, if any target's
//!   TTL is infinite), so the store never drops a copy some endpoint still may deliver, and
//!   reclaims the message once every target has expired (or checkpointed past it).
//! - The [`codec::Envelope`] records the enqueue time and an **expiry override** for every
//!   target whose expiry is earlier than the store-level one. In the common case (one target,
//!   or all routes using the global TTL) there is no override and no overhead.
//! - Each endpoint worker applies its own expiry (override, else store-level) before sending;
//!   a message past it is completed without delivery and counted as `expired`.
//!
//! Consequences:
//! - Expiry is fixed at enqueue: a reload that changes a route's TTL does not touch queued
//!   messages (edgeHub semantics).
//! - Bytes of a message expired for one endpoint but live for another stay on disk until the
//!   last one is done with it, as with edgeHub's reference-counted body.
//! - Messages expired at the store level are skipped by `Store::read` and counted by the store
//!   (`QueueStats::expired`), not by the workers' `expired` counter; workers count the ones
//!   they meet, including every per-target expiry.
//! - Both sides must read the same clock: pass the same [`store::Clock`] to the store and to
//!   the dispatcher.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use store::{
    AppendChain, AppendError, Clock, Offset, Pending, QueueName, StorageError, Store, UnixMillis,
};

use crate::codec::{self, EncodeError, EndpointOptions, Envelope, ExpiryOverride};
use crate::dispatcher::{Dispatcher, DispatcherHandle};
use crate::events::{self, Counters, RouterMetrics};
use crate::expiry::{expiry_at, latest};
use crate::flow::{EndpointFlow, FlowHold};
use crate::message::{Message, ModuleId};
use crate::queue_id::{partition_queue_name, Lane, QueueId, QueueIdError};
use crate::replicas::{partition_of, PartitionId, PartitionKey, PARTITIONS};
use crate::route::{Endpoint, EndpointId, Route, RouteTable, Target};

/// What became of a routed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteOutcome {
    /// Durable in every target queue: acknowledge the sender.
    Stored {
        /// The message's offset in the store (the same in every queue).
        offset: Offset,
        /// How many endpoints it goes to.
        targets: usize,
    },
    /// No route matched; the message was dropped and counted (edgeHub acks it too).
    Unrouted,
}

/// A message that could not be stored; it was stored nowhere and must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    /// The store refused the append. [`AppendError::Full`] is back-pressure: refuse or delay
    /// the sender until receivers catch up.
    #[error("the store refused the message: {0}")]
    Store(#[from] AppendError),
    /// The message does not fit the stored format (a field over 4 GiB, too many properties).
    #[error("the message cannot be stored: {0}")]
    Encode(#[from] EncodeError),
    /// A target's queue name is too long for the store (very long module or input names).
    #[error(transparent)]
    Queue(#[from] QueueIdError),
}

/// Routes messages into the store. Share it (`Arc<Router>`) between heads.
#[derive(Debug)]
pub struct Router {
    table: RwLock<Arc<BoundTable>>,
    /// The partition key of every replicated module: a route into one of its inputs stores
    /// into the partition queue of the message's key.
    replicas: RwLock<Arc<BTreeMap<ModuleId, PartitionKey>>>,
    dispatcher: DispatcherHandle,
    store: Store,
    clock: Arc<dyn Clock>,
    counters: Arc<Counters>,
}

/// A route table with the store queue of each of its routes, worked out once when the table is
/// installed (not per message). The route language knows nothing of queues; this binding is the
/// router's.
#[derive(Debug)]
struct BoundTable {
    table: Arc<RouteTable>,
    /// One per route, in the order of [`RouteTable::routes`] (a [`Target::route_index`]).
    queues: Vec<QueueBinding>,
}

/// The store queue a route's copies go to.
#[derive(Debug)]
struct QueueBinding {
    /// The queue.
    id: QueueId,
    /// Its name in the store (or why the endpoint's name is too long for one).
    name: Result<QueueName, QueueIdError>,
    /// The endpoint's id.
    endpoint_id: EndpointId,
    /// Set once the dispatcher is known to have a worker draining this queue (a dispatcher
    /// never forgets a queue, so the router tells it only once per table): the endpoint's flow
    /// state.
    ensured: OnceLock<Arc<EndpointFlow>>,
    /// For an input of a replicated module: its partition queues, chosen per message.
    partitioned: Option<Partitioned>,
}

/// The partition queues of a replicated module's input (ARCHITECTURE.md "Module replicas").
#[derive(Debug)]
struct Partitioned {
    key: PartitionKey,
    /// One per partition, by [`PartitionId::index`].
    names: Vec<Result<QueueName, QueueIdError>>,
    /// Bit `p`: the dispatcher knows partition `p` has messages coming.
    ensured: AtomicU64,
}

impl Partitioned {
    fn name(&self, partition: PartitionId) -> Result<QueueName, QueueIdError> {
        match self.names.get(partition.index()) {
            Some(name) => name.clone(),
            // Never: there is a name for each of the PARTITIONS partitions.
            None => Err(QueueIdError::Foreign(format!("partition {partition}"))),
        }
    }
}

impl BoundTable {
    fn new(table: RouteTable, replicas: &BTreeMap<ModuleId, PartitionKey>) -> BoundTable {
        let queues = table
            .routes()
            .iter()
            .map(|r| QueueBinding::of(r, replicas))
            .collect();
        BoundTable {
            table: Arc::new(table),
            queues,
        }
    }
}

impl BoundTable {
    /// Where `msg` goes (empty: unrouted). Every target comes from this table, so each has its
    /// binding: [`BoundTable::binding`] of its route index.
    fn targets(&self, msg: &Message) -> Vec<Target> {
        self.table.targets(msg).into_vec()
    }

    /// The queue binding of a target of this table (`None` only for a target of another table).
    fn binding(&self, target: &Target) -> Option<&QueueBinding> {
        self.queues.get(target.route_index)
    }
}

impl QueueBinding {
    fn of(route: &Route, replicas: &BTreeMap<ModuleId, PartitionKey>) -> QueueBinding {
        let lane = if route.options().live_first_secs.is_some() {
            Lane::Live
        } else {
            Lane::Backlog
        };
        let id = QueueId::in_lane(route.endpoint().clone(), route.priority(), lane);
        let partitioned = match route.endpoint() {
            Endpoint::ModuleInput { module, .. } => replicas.get(module).map(|key| Partitioned {
                key: key.clone(),
                names: (0..PARTITIONS)
                    .filter_map(PartitionId::new)
                    .filter_map(|p| partition_queue_name(route.endpoint(), p))
                    .collect(),
                ensured: AtomicU64::new(0),
            }),
            Endpoint::Upstream => None,
        };
        QueueBinding {
            name: id.name(),
            endpoint_id: id.endpoint_id(),
            id,
            ensured: OnceLock::new(),
            partitioned,
        }
    }
}

impl Router {
    /// A router over `table`, storing into the dispatcher's store and feeding its workers.
    pub fn new(table: RouteTable, dispatcher: &Dispatcher) -> Router {
        let handle = dispatcher.handle();
        Router {
            table: RwLock::new(Arc::new(BoundTable::new(table, &BTreeMap::new()))),
            replicas: RwLock::new(Arc::new(BTreeMap::new())),
            store: handle.store().clone(),
            clock: Arc::clone(handle.clock()),
            counters: Arc::clone(handle.counters()),
            dispatcher: handle,
        }
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.bound().table)
    }

    fn bound(&self) -> Arc<BoundTable> {
        Arc::clone(&self.table.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the route table; it applies to messages routed from now on.
    pub fn reload(&self, table: RouteTable) {
        let replicas = Arc::clone(&self.replicas.read().unwrap_or_else(|p| p.into_inner()));
        let bound = Arc::new(BoundTable::new(table, &replicas));
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = bound;
    }

    /// Declares the replicated modules (module → partition key), from a manifest: routes into
    /// their inputs store each message in the partition queue of its key from now on (the
    /// current table is bound again at once). Messages already queued stay where they are.
    pub fn set_replicas(&self, replicas: BTreeMap<ModuleId, PartitionKey>) {
        let replicas = Arc::new(replicas);
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        *self.replicas.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&replicas);
        let current = RouteTable::clone(&table.table);
        *table = Arc::new(BoundTable::new(current, &replicas));
    }

    /// The routing counters now.
    pub fn metrics(&self) -> RouterMetrics {
        self.dispatcher.metrics()
    }

    /// Routes `msg`: evaluates the table and submits one durable append listing every target
    /// queue. The returned future resolves once the message is durable (the ack point).
    pub fn route(&self, msg: Message) -> RouteAck {
        self.route_with(None, msg)
    }

    /// [`Router::route`] for one producer (a connection, a link) that pipelines: the append joins
    /// `chain`, so once one of the producer's messages fails to become durable, none it routes
    /// later with that chain is stored (they fail with [`AppendError::ChainBroken`]). A producer
    /// that resends what was not acknowledged then cannot find a later message stored ahead of
    /// an earlier one. Use one chain per connection or link, and a new one after a failure.
    pub fn route_in(&self, chain: &AppendChain, msg: Message) -> RouteAck {
        self.route_with(Some(chain), msg)
    }

    fn route_with(&self, chain: Option<&AppendChain>, msg: Message) -> RouteAck {
        let counters = Arc::clone(&self.counters);
        let bound = self.bound();
        let targets = bound.targets(&msg);
        if targets.is_empty() {
            events::unrouted(&counters);
            return RouteAck::ready(counters, Ok(RouteOutcome::Unrouted));
        }
        let now = self.clock.now();
        let mut flows = Vec::new();
        let submitted = self.submit(chain, msg, &bound, &targets, now, &mut flows);
        let state = match submitted {
            Ok(pending) => AckState::Waiting(pending),
            Err(e) => AckState::Ready(Some(Err(e))),
        };
        RouteAck {
            counters,
            targets: targets.len(),
            state,
            flows,
        }
    }

    fn submit(
        &self,
        chain: Option<&AppendChain>,
        msg: Message,
        bound: &BoundTable,
        targets: &[Target],
        now: UnixMillis,
        flows: &mut Vec<Arc<EndpointFlow>>,
    ) -> Result<Pending<Offset, AppendError>, RouteError> {
        // Every target of `bound` has its binding; a target without one is skipped alike by
        // every pass below.
        let bound_targets = || {
            targets
                .iter()
                .filter_map(|t| Some((t, bound.binding(t)?, expiry_at(now, t.ttl))))
        };
        // A replicated input's queue is the partition of the message's key (worked out only
        // when a target is one, so other messages allocate nothing more).
        let partitions: Vec<Option<PartitionId>> =
            if bound_targets().any(|(_, q, _)| q.partitioned.is_some()) {
                bound_targets()
                    .map(|(_, q, _)| q.partitioned.as_ref().map(|p| partition_of(&msg, &p.key)))
                    .collect()
            } else {
                Vec::new()
            };
        let partition = |i: usize| partitions.get(i).copied().flatten();
        let names = bound_targets()
            .enumerate()
            .map(|(i, (_, q, _))| match (&q.partitioned, partition(i)) {
                (Some(p), Some(part)) => p.name(part),
                _ => q.name.clone(),
            })
            .collect::<Result<Vec<QueueName>, _>>()?;
        let stored_expiry = latest(bound_targets().map(|(_, _, e)| e));
        let expiry_overrides = bound_targets()
            .filter(|(_, _, e)| *e != stored_expiry)
            .map(|(_, q, e)| ExpiryOverride {
                endpoint: q.endpoint_id.clone(),
                expiry: e,
            })
            .collect();
        let delivery_options: Vec<EndpointOptions> = bound_targets()
            .filter(|(t, _, _)| !t.options.is_default())
            .map(|(t, q, _)| EndpointOptions {
                endpoint: q.endpoint_id.clone(),
                options: t.options,
            })
            .collect();
        let bytes = codec::encode_with_options(
            &Envelope {
                enqueued_at: now,
                expiry_overrides,
                message: msg,
            },
            &delivery_options,
        )?;
        for (i, (_, q, _)) in bound_targets().enumerate() {
            if let (Some(p), Some(part)) = (&q.partitioned, partition(i)) {
                let bit = 1u64 << part.get();
                if p.ensured.load(Ordering::Acquire) & bit == 0 {
                    self.dispatcher.ensure_partition(&q.id.endpoint, part);
                    p.ensured.fetch_or(bit, Ordering::Release);
                }
                continue;
            }
            let flow = match q.ensured.get() {
                Some(flow) => flow,
                None => q
                    .ensured
                    .get_or_init(|| self.dispatcher.ensure_queue(&q.id)),
            };
            flows.push(Arc::clone(flow));
        }
        // Counted before the append is submitted, so the worker cannot complete it first.
        for flow in flows.iter() {
            flow.appended();
        }
        let store = &self.store;
        Ok(match chain {
            Some(chain) => store.append_in(chain, &names, bytes, stored_expiry),
            None => store.append(&names, bytes, stored_expiry),
        })
    }
}

/// The acknowledgement of one routed message: resolves once it is durable (or refused).
#[must_use = "a message is acknowledged only when its RouteAck resolves"]
#[derive(Debug)]
pub struct RouteAck {
    counters: Arc<Counters>,
    targets: usize,
    state: AckState,
    /// The flow state of every endpoint it was submitted for (empty if it was not submitted);
    /// each counts it until the worker completes it, or is told when the store refuses it.
    flows: Vec<Arc<EndpointFlow>>,
}

#[derive(Debug)]
enum AckState {
    Ready(Option<Result<RouteOutcome, RouteError>>),
    Waiting(Pending<Offset, AppendError>),
    /// The store's answer, taken by [`RouteAck::is_refused`] before the ack was awaited.
    Answered(Option<Result<Offset, AppendError>>),
}

impl RouteAck {
    /// Whether the message is already known to be refused (stored nowhere), without waiting:
    /// a refusal the router or the store answers at once (a full store, a message too large, a
    /// queue name too long, a closed or halted store) or one already answered. `false` means it
    /// may still be stored; the ack must be awaited either way. A head that sees `true` must
    /// route nothing after this message on that connection or link, or a message accepted
    /// later could be stored before this one is resent.
    pub fn is_refused(&mut self) -> bool {
        self.refusal().is_some()
    }

    /// A hold on the producer if an endpoint this message was stored for is online and lags
    /// past its bound (checked now): the producer should read nothing more until
    /// [`FlowHold::released`] resolves. The message itself is unaffected: await this ack as
    /// usual.
    pub fn hold(&self) -> Option<FlowHold> {
        FlowHold::check(&self.flows)
    }

    /// [`RouteAck::is_refused`], with the reason (the error the ack will resolve to).
    pub fn refusal(&mut self) -> Option<RouteError> {
        if let AckState::Waiting(pending) = &mut self.state {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(answer) = Pin::new(pending).poll(&mut cx) {
                self.state = AckState::Answered(Some(answer));
            }
        }
        match &self.state {
            AckState::Ready(Some(Err(e))) => Some(e.clone()),
            AckState::Answered(Some(Err(e))) => Some(RouteError::Store(e.clone())),
            _ => None,
        }
    }

    fn ready(counters: Arc<Counters>, result: Result<RouteOutcome, RouteError>) -> Self {
        RouteAck {
            counters,
            targets: 0,
            state: AckState::Ready(Some(result)),
            flows: Vec::new(),
        }
    }
}

impl RouteAck {
    fn stored(&self, answer: Result<Offset, AppendError>) -> Result<RouteOutcome, RouteError> {
        match answer {
            Ok(offset) => {
                events::routed(&self.counters, offset, self.targets);
                Ok(RouteOutcome::Stored {
                    offset,
                    targets: self.targets,
                })
            }
            Err(e) => Err(RouteError::Store(e)),
        }
    }
}

impl Future for RouteAck {
    type Output = Result<RouteOutcome, RouteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = match &mut this.state {
            AckState::Ready(r) => r
                .take()
                .unwrap_or(Err(RouteError::Store(AppendError::Storage(
                    StorageError::Closed,
                )))),
            AckState::Waiting(pending) => match Pin::new(pending).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(answer) => this.stored(answer),
            },
            AckState::Answered(answer) => {
                let answer = answer
                    .take()
                    .unwrap_or(Err(AppendError::Storage(StorageError::Closed)));
                this.stored(answer)
            }
        };
        if let Err(e) = &result {
            events::store_refused(&this.counters, e);
            // Stored nowhere: it will never be completed.
            for flow in this.flows.drain(..) {
                flow.refused();
            }
        }
        this.flows.clear();
        this.state = AckState::Ready(None);
        Poll::Ready(result)
    }
}

impl Drop for RouteAck {
    /// An ack dropped before it resolved: if the store already refused the message, its lag is
    /// given back; one still pending is most likely stored and counts until it is completed.
    fn drop(&mut self) {
        if !self.flows.is_empty() && self.refusal().is_some() {
            for flow in &self.flows {
                flow.refused();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::dispatcher::DispatcherConfig;
    use crate::message::{DeviceId, ModuleId, OutputName, Source};
    use crate::route::{Priority, Route, RouteId, Ttl};
    use crate::TokioClock;
    use store::{OsFs, Store, StoreOptions};

    fn message(body: Vec<u8>) -> Message {
        let source = Source::ModuleOutput {
            device: DeviceId::new("edge"),
            module: ModuleId::new("m"),
            output: Some(OutputName::new("o")),
        };
        Message::new(source, body)
    }

    /// A router sending everything of module `m` to `$upstream`, over a store that refuses
    /// bodies over 4 KiB at once.
    fn small_message_router() -> (tempfile::TempDir, Store, Dispatcher, Router) {
        small_message_router_to("$upstream")
    }

    /// Module `m`'s messages to `target`, over a store that refuses bodies over 4 KiB at once.
    fn small_message_router_to(target: &str) -> (tempfile::TempDir, Store, Dispatcher, Router) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TokioClock::new(UnixMillis(1_700_000_000_000)));
        let opts = StoreOptions {
            max_message_bytes: 4096,
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path(), opts, Arc::new(OsFs), clock.clone()).unwrap();
        let dispatcher =
            Dispatcher::start(store.clone(), clock, DispatcherConfig::default()).unwrap();
        let route = Route::parse(
            RouteId::new("r"),
            &format!("FROM /messages/modules/m/outputs/* INTO {target}"),
            Priority(0),
            Ttl::Infinite,
        )
        .unwrap();
        let router = Router::new(RouteTable::new(vec![route]), &dispatcher);
        (dir, store, dispatcher, router)
    }

    /// A sink that delivers one message per permit given to it (a receiver reading slowly).
    struct GatedSink(Arc<tokio::sync::Semaphore>);

    impl crate::sink::Sink for GatedSink {
        async fn send(
            &self,
            batch: Vec<crate::sink::Delivery>,
        ) -> Vec<crate::sink::DeliveryOutcome> {
            let mut outcomes = Vec::with_capacity(batch.len());
            for _ in &batch {
                match self.0.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break,
                }
                outcomes.push(crate::sink::DeliveryOutcome::Delivered);
            }
            outcomes
        }
    }

    /// A router sending module `m`'s messages to module `r`'s input `in` (and to `$upstream`
    /// when `also_upstream`), holding producers over `max_lag`; batches of one message.
    fn flow_router(
        max_lag: u64,
        also_upstream: bool,
    ) -> (tempfile::TempDir, Store, Dispatcher, Router, Endpoint) {
        flow_router_in(tempfile::tempdir().unwrap(), max_lag, also_upstream)
    }

    /// [`flow_router`] on the store in `dir` (a restart).
    fn flow_router_in(
        dir: tempfile::TempDir,
        max_lag: u64,
        also_upstream: bool,
    ) -> (tempfile::TempDir, Store, Dispatcher, Router, Endpoint) {
        let clock = Arc::new(TokioClock::new(UnixMillis(1_700_000_000_000)));
        let store = Store::open_with(
            dir.path(),
            StoreOptions::default(),
            Arc::new(OsFs),
            clock.clone(),
        )
        .unwrap();
        let config = DispatcherConfig {
            window: 1,
            flow: crate::flow::FlowBound::MaxLag(crate::flow::Lag(max_lag)),
            ..DispatcherConfig::default()
        };
        let dispatcher = Dispatcher::start(store.clone(), clock, config).unwrap();
        let mut routes = vec![Route::parse(
            RouteId::new("r"),
            r#"FROM /messages/modules/m/outputs/* INTO BrokeredEndpoint("/modules/r/inputs/in")"#,
            Priority(0),
            Ttl::Infinite,
        )
        .unwrap()];
        if also_upstream {
            routes.push(
                Route::parse(
                    RouteId::new("u"),
                    "FROM /messages/modules/m/outputs/* INTO $upstream",
                    Priority(0),
                    Ttl::Infinite,
                )
                .unwrap(),
            );
        }
        let router = Router::new(RouteTable::new(routes), &dispatcher);
        let endpoint = Endpoint::ModuleInput {
            module: ModuleId::new("r"),
            input: crate::message::InputName::new("in"),
        };
        (dir, store, dispatcher, router, endpoint)
    }

    fn flow_of(router: &Router, endpoint: &Endpoint) -> crate::flow::FlowStats {
        router
            .metrics()
            .flow
            .into_iter()
            .find(|f| f.endpoint == endpoint.id())
            .expect("the endpoint is flow-controlled")
    }

    const GENEROUS: std::time::Duration = std::time::Duration::from_secs(30);

    #[tokio::test]
    async fn an_online_receiver_that_lags_holds_its_producer_until_it_catches_up() {
        let (_dir, store, dispatcher, router, endpoint) = flow_router(3, true);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        dispatcher.register_sink(&endpoint, GatedSink(Arc::clone(&gate)));
        // $upstream has no sink and no bound: it never holds anyone.
        let mut acks = Vec::new();
        let mut holds = Vec::new();
        for i in 0..5u8 {
            let ack = router.route(message(vec![i]));
            holds.push(ack.hold().is_some());
            acks.push(ack);
        }
        assert_eq!(
            holds,
            [false, false, false, true, true],
            "held once the lag passes 3"
        );
        for ack in acks.drain(..) {
            assert!(matches!(
                ack.await,
                Ok(RouteOutcome::Stored { targets: 2, .. })
            ));
        }
        let last = router.route(message(vec![5]));
        let hold = last.hold().expect("lag 6 > 3: held");
        assert_eq!(flow_of(&router, &endpoint).lag, crate::flow::Lag(6));
        // The receiver takes two: lag 4, still held.
        gate.add_permits(2);
        let within = async {
            while flow_of(&router, &endpoint).lag > crate::flow::Lag(4) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(GENEROUS, within)
            .await
            .expect("two delivered");
        assert!(hold.endpoint() == &endpoint.id());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), hold.released())
                .await
                .is_err(),
            "lag 4 > 3 keeps it held"
        );
        // One more: lag 3, released (awaited, not polled).
        gate.add_permits(1);
        tokio::time::timeout(GENEROUS, hold.released())
            .await
            .expect("released once the lag is back at the bound");
        drop(hold);
        assert!(last.await.is_ok());
        let stats = flow_of(&router, &endpoint);
        assert!(stats.online);
        assert_eq!(stats.holds, 3, "messages 4 and 5, then the last");
        gate.add_permits(100);
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn an_offline_receiver_never_holds_producers_and_going_offline_releases_them() {
        let (_dir, store, dispatcher, router, endpoint) = flow_router(3, false);
        // Offline: store and forward, however long the backlog.
        for i in 0..20u8 {
            let ack = router.route(message(vec![i]));
            assert!(
                ack.hold().is_none(),
                "message {i}: an offline endpoint holds nobody"
            );
            assert!(ack.await.is_ok());
        }
        let stats = flow_of(&router, &endpoint);
        assert!(!stats.online);
        assert_eq!(
            stats.lag,
            crate::flow::Lag(20),
            "the backlog passes the bound"
        );
        // The receiver connects but reads nothing: now it holds.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        dispatcher.register_sink(&endpoint, GatedSink(Arc::clone(&gate)));
        let ack = router.route(message(vec![20]));
        let hold = ack.hold().expect("online and lagging: held");
        // It goes away: released at once, without the lag moving.
        dispatcher.unregister_sink(&endpoint);
        tokio::time::timeout(GENEROUS, hold.released())
            .await
            .expect("going offline releases the producer");
        assert!(ack.await.is_ok());
        assert_eq!(flow_of(&router, &endpoint).lag, crate::flow::Lag(21));
        gate.close();
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn messages_stored_before_a_restart_never_count_in_the_lag() {
        let (dir, store, dispatcher, router, _) = flow_router(3, false);
        for i in 0..10u8 {
            assert!(router.route(message(vec![i])).await.is_ok());
        }
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
        // Restarted on the same directory: the ten wait in the queue.
        let (_dir, store, dispatcher, router, endpoint) = flow_router_in(dir, 3, false);
        let gate = Arc::new(tokio::sync::Semaphore::new(10));
        dispatcher.register_sink(&endpoint, GatedSink(Arc::clone(&gate)));
        // The old ten are delivered; they were never counted, so they take nothing off.
        let drained = async {
            while router.metrics().delivered < 10 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(GENEROUS, drained)
            .await
            .expect("the backlog delivered");
        assert_eq!(flow_of(&router, &endpoint).lag, crate::flow::Lag(0));
        // Five new ones lag by five (not by five less ten) and hold their producer.
        let mut last = None;
        for i in 0..5u8 {
            let ack = router.route(message(vec![i]));
            last = Some(ack.hold().is_some());
            assert!(ack.await.is_ok());
        }
        assert_eq!(flow_of(&router, &endpoint).lag, crate::flow::Lag(5));
        assert_eq!(last, Some(true), "lag 5 > 3: held");
        gate.add_permits(100);
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_message_the_store_refuses_does_not_count_in_the_lag() {
        let (_dir, store, dispatcher, router) = small_message_router_into_input();
        let endpoint = Endpoint::ModuleInput {
            module: ModuleId::new("r"),
            input: crate::message::InputName::new("in"),
        };
        let stored = router.route(message(vec![b'a'; 10]));
        let refused = router.route(message(vec![b'b'; 8192]));
        let dropped = router.route(message(vec![b'c'; 8192]));
        assert!(stored.await.is_ok());
        assert!(refused.await.is_err());
        drop(dropped);
        assert_eq!(flow_of(&router, &endpoint).lag, crate::flow::Lag(1));
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }

    /// [`small_message_router`] into module `r`'s input `in` (no sink registered).
    fn small_message_router_into_input() -> (tempfile::TempDir, Store, Dispatcher, Router) {
        small_message_router_to(r#"BrokeredEndpoint("/modules/r/inputs/in")"#)
    }

    #[tokio::test]
    async fn a_refusal_known_at_once_is_seen_before_the_ack_is_awaited() {
        let (_dir, store, dispatcher, router) = small_message_router();

        let mut small = router.route(message(vec![b'a'; 10]));
        assert!(!small.is_refused());
        let mut big = router.route(message(vec![b'b'; 8192]));
        assert!(big.is_refused(), "too large is known at once");
        assert!(matches!(small.await, Ok(RouteOutcome::Stored { .. })));
        assert!(matches!(
            big.await,
            Err(RouteError::Store(AppendError::TooLarge { .. }))
        ));
        // Peeking at an ack the store already answered keeps its outcome (and its counting).
        let mut durable = router.route(message(vec![b'c'; 10]));
        while !durable.is_refused() && !matches!(durable.state, AckState::Answered(_)) {
            tokio::task::yield_now().await;
        }
        assert!(!durable.is_refused());
        assert!(matches!(durable.await, Ok(RouteOutcome::Stored { .. })));
        assert_eq!(router.metrics().routed, 2, "{:?}", router.metrics());
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }

    #[tokio::test]
    async fn route_in_stores_nothing_of_a_producer_after_its_refused_message() {
        let (_dir, store, dispatcher, router) = small_message_router();

        let chain = AppendChain::new();
        let first = router.route_in(&chain, message(vec![b'a'; 10]));
        let big = router.route_in(&chain, message(vec![b'b'; 8192]));
        let after = router.route_in(&chain, message(vec![b'c'; 10]));
        // Another producer (no chain, or its own) is not affected.
        let other = router.route(message(vec![b'd'; 10]));
        let fresh = router.route_in(&AppendChain::new(), message(vec![b'e'; 10]));
        assert!(matches!(first.await, Ok(RouteOutcome::Stored { .. })));
        assert!(matches!(
            big.await,
            Err(RouteError::Store(AppendError::TooLarge { .. }))
        ));
        assert!(matches!(
            after.await,
            Err(RouteError::Store(AppendError::ChainBroken { .. }))
        ));
        assert!(matches!(other.await, Ok(RouteOutcome::Stored { .. })));
        assert!(matches!(fresh.await, Ok(RouteOutcome::Stored { .. })));
        assert_eq!(router.metrics().routed, 3, "{:?}", router.metrics());
        dispatcher.shutdown().await;
        drop(router);
        store.close().unwrap();
    }
}
