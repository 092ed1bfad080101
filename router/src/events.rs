//! Observability: every counted or logged routing event is a named function here, so core code
//! reads `events::expired(&queue, offset)` and never builds a metric or log line inline.
//!
//! The counters are plain atomics; [`Counters::snapshot`] gives a [`RouterMetrics`] for whoever
//! exports metrics (the hub, under edgeHub's metric names). No metrics crate here.

use std::sync::atomic::{AtomicU64, Ordering};

use store::Offset;

use crate::queue_id::QueueId;
use crate::sink::{FailureKind, RejectReason};

/// A snapshot of the routing counters since the dispatcher started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterMetrics {
    /// Messages stored for at least one endpoint (acknowledged to their sender).
    pub routed: u64,
    /// Messages no route matched, dropped (`edgehub_messages_dropped_total{reason="no_route"}`).
    pub unrouted: u64,
    /// Messages `route` could not store (store full, too large, …); the sender is not acked.
    pub store_refused: u64,
    /// Deliveries a sink reported `Delivered` (per endpoint copy; resends count again).
    pub delivered: u64,
    /// Endpoint copies dropped because their TTL passed before delivery (as seen by workers).
    pub expired: u64,
    /// Endpoint copies a sink rejected for good, or that could not be decoded; set aside.
    pub rejected: u64,
    /// Endpoint copies set aside by the head-of-line policy after too many failed attempts.
    pub set_aside: u64,
    /// Deliveries a sink answered `Retry` that were then resent (one per failed attempt of the
    /// first incomplete message).
    pub retries: u64,
    /// Workers that stopped because the store failed under them (poisoned, fenced, corrupt).
    pub worker_failures: u64,
    /// Live-lane messages that passed their `x-edgehub-liveFirstSecs` limit undelivered and were
    /// moved (copied, then checkpointed past) to their endpoint's backlog lane.
    pub moved_to_backlog: u64,
    /// Every replicated module input served, with its counts (filled by the dispatcher).
    pub replicas: Vec<crate::replica_worker::ReplicaStats>,
    /// Every flow-controlled endpoint (a module input) with its lag and holds (filled by the
    /// dispatcher).
    pub flow: Vec<crate::flow::FlowStats>,
}

/// The live counters, shared by the router, the dispatcher and every worker.
#[derive(Debug, Default)]
pub struct Counters {
    routed: AtomicU64,
    unrouted: AtomicU64,
    store_refused: AtomicU64,
    delivered: AtomicU64,
    expired: AtomicU64,
    rejected: AtomicU64,
    set_aside: AtomicU64,
    retries: AtomicU64,
    worker_failures: AtomicU64,
    moved_to_backlog: AtomicU64,
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> RouterMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouterMetrics {
            routed: get(&self.routed),
            unrouted: get(&self.unrouted),
            store_refused: get(&self.store_refused),
            delivered: get(&self.delivered),
            expired: get(&self.expired),
            rejected: get(&self.rejected),
            set_aside: get(&self.set_aside),
            retries: get(&self.retries),
            worker_failures: get(&self.worker_failures),
            moved_to_backlog: get(&self.moved_to_backlog),
            replicas: Vec::new(),
            flow: Vec::new(),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A message was stored durably for `targets` endpoints.
pub(crate) fn routed(c: &Counters, offset: Offset, targets: usize) {
    bump(&c.routed, 1);
    tracing::trace!(%offset, targets, "message routed");
}

/// No route matched a message.
pub(crate) fn unrouted(c: &Counters) {
    bump(&c.unrouted, 1);
    tracing::debug!("message dropped: no route");
}

/// The store refused a message.
pub(crate) fn store_refused(c: &Counters, error: &dyn std::fmt::Display) {
    bump(&c.store_refused, 1);
    tracing::warn!(%error, "message not stored");
}

/// A sink delivered `n` messages of `queue`.
pub(crate) fn delivered(c: &Counters, queue: &QueueId, n: usize) {
    bump(&c.delivered, n as u64);
    tracing::trace!(%queue, n, "delivered");
}

/// A message's TTL passed before delivery.
pub(crate) fn expired(c: &Counters, queue: &QueueId, offset: Offset) {
    bump(&c.expired, 1);
    tracing::debug!(%queue, %offset, "message expired before delivery");
}

/// A sink rejected a message for good.
pub(crate) fn rejected(c: &Counters, queue: &QueueId, offset: Offset, reason: &RejectReason) {
    bump(&c.rejected, 1);
    tracing::warn!(%queue, %offset, %reason, "message rejected by the endpoint; set aside");
}

/// A stored message could not be decoded.
pub(crate) fn undecodable(
    c: &Counters,
    queue: &QueueId,
    offset: Offset,
    error: &dyn std::fmt::Display,
) {
    bump(&c.rejected, 1);
    tracing::error!(%queue, %offset, %error, "stored message cannot be decoded; set aside");
}

/// The head-of-line policy set a message aside.
pub(crate) fn set_aside(c: &Counters, queue: &QueueId, offset: Offset, attempts: u32) {
    bump(&c.set_aside, 1);
    tracing::warn!(%queue, %offset, attempts, "message set aside after repeated failures");
}

/// A message will be resent after a failed attempt.
pub(crate) fn retrying(
    c: &Counters,
    queue: &QueueId,
    offset: Offset,
    kind: FailureKind,
    failures: u32,
) {
    bump(&c.retries, 1);
    tracing::debug!(%queue, %offset, ?kind, failures, "delivery failed; will retry");
}

/// A worker stopped because the store failed.
pub(crate) fn worker_failed(
    c: &Counters,
    endpoint: &dyn std::fmt::Display,
    error: &dyn std::fmt::Display,
) {
    bump(&c.worker_failures, 1);
    tracing::error!(%endpoint, %error, "endpoint worker stopped: store failure");
}

/// `n` aged live-lane messages of `queue` were moved to the backlog lane; `refused` when the
/// store refused some move, whose messages are then sent from the live lane in place.
pub(crate) fn moved_to_backlog(c: &Counters, queue: &QueueId, n: usize, refused: bool) {
    bump(&c.moved_to_backlog, n as u64);
    if refused {
        tracing::warn!(%queue, n, "the store refused moving aged live messages; sending them in place");
    } else {
        tracing::debug!(%queue, n, "aged live messages moved to the backlog lane");
    }
}
