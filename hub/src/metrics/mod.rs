//! Prometheus metrics under edgeHub's names (reference §6), plus what a durable hub adds.
//!
//! [`HubMetrics`] owns a `prometheus_client` [`Registry`]. Two kinds of series live in it:
//! - **fed by the heads** as things happen: the MQTT head calls [`HubMetrics::message_received`],
//!   [`HubMetrics::message_sent`], [`HubMetrics::client_connected`], … ;
//! - **refreshed from snapshots** on every scrape by [`HubMetrics::render`]: queue lengths and
//!   oldest-message ages from [`Store::stats`], store counters, and routing counters from
//!   [`RouterMetrics`].
//!
//! Every series carries edgeHub's constant labels `iothub`, `edge_device` and
//! `instance_number` (a random id per process, as edgeHub's per-start GUID).
//!
//! | series | kind | labels | source |
//! |---|---|---|---|
//! | `edgehub_messages_received_total` | counter | `route_output`, `id` | head |
//! | `edgehub_messages_sent_total` | counter | `from`, `to`, `from_route_output`, `to_route_input`, `priority` | head |
//! | `edgehub_message_size_bytes` | histogram (edgeHub: summary) | `id` | head |
//! | `edgehub_message_send_duration_seconds` | histogram | `to` | head |
//! | `edgehub_publish_ack_duration_seconds` | histogram | | head: PUBLISH in → PUBACK out (durability) |
//! | `edgehub_connected_clients` | gauge | | head |
//! | `edgehub_client_connect_success_total` | counter | `id` | head |
//! | `edgehub_client_connect_failed_total` | counter | `reason` | head |
//! | `edgehub_client_disconnect_total` | counter | | head |
//! | `edgehub_client_token_expired_total` | counter | `protocol` = `mqtt`, `amqp` | head: connections closed because their SAS token expired |
//! | `edgehub_messages_dropped_total` | counter | `reason` = `no_route`, `ttl_expiry`, `rejected`, `set_aside` | router |
//! | `edgehub_messages_unack_total` | counter | `reason` = `storage_failure` | router |
//! | `edgehub_router_messages_routed_total`, `…_deliveries_total`, `…_retries_total`, `…_worker_failures_total` | counter | | router |
//! | `edgehub_flow_control_held_seconds_total` | counter | `endpoint` | router: time producers were held (not read) because this online module input lagged past its bound, summed over producers |
//! | `edgehub_flow_control_holds_total` | counter | `endpoint` | router: times a producer was held by it |
//! | `edgehub_flow_control_lag` | gauge | `endpoint` | router: messages stored for it by this process and not yet delivered (what the bound is checked against) |
//! | `edgehub_queue_length` | gauge | `endpoint`, `priority` | store |
//! | `edgehub_queue_oldest_age_seconds` | gauge | `endpoint`, `priority` | store (reads one message per non-empty queue) |
//! | `edgehub_store_fdatasyncs_total`, `…_commits_total`, `…_appends_total`, `…_reclaimed_segments_total` | counter | | store |
//! | `edgehub_store_caller_commits_total` | counter | | store: commits of a lone message made on its connection's own thread (`--commit-on-caller`) |
//! | `edgehub_store_bytes_on_disk`, `edgehub_store_segments`, `edgehub_store_halted` | gauge | | store |
//! | `edgehub_store_resident_index_entries` | gauge | | store: index entries in memory (the active segment's undelivered messages and the sealed chunks reads are on; the rest stay in sidecar files), so a long offline backlog's memory can be watched |
//! | `edgehub_store_epoch`, `edgehub_store_fenced` (0/1) | gauge | | store: the epoch it was opened with (`--epoch`); 1 once a newer hub opened it |
//! | `edgehub_store_fdatasync_seconds` | histogram | | store: each group commit's fdatasync (64 µs doubling to ~1 s) |
//! | `edgehub_upstream_*` | see [`UpstreamMetrics`] | `id` | cloud connection (upstream) |
//! | `edgehub_connections`, `…_refused_total`, `edgehub_accept_failures_total` | see [`crate::limits::LimitMetrics`] | `protocol` | accept loops |
//! | `edgehub_manifest_reloads_total` | counter | `result` (`success`, `failure`) | manifest reloads ([`crate::reload`]) |
//! | `edgehub_manifest_generation` | gauge | | the manifest in force: 1 at start, +1 per reload applied |
//! | `edgehub_direct_methods_total` | counter | `from`, `to` (`device/module`) | HTTPS head: every module → module invocation that reached a target lookup, answered or not |
//! | `edgehub_direct_method_duration_seconds` | histogram (edgeHub: summary) | `from`, `to` | HTTPS head: from the lookup to the answer, timeout or 404 |
//! | `edgehub_gettwin_total` | counter | `source` = `local`, `id` | twin GETs answered (served from the hub's own twin store) |
//! | `edgehub_gettwin_duration_seconds` | histogram (edgeHub: summary) | `source`, `id` | twin GET in → response queued |
//! | `edgehub_reported_properties_total` | counter | `target` = `local`, `id` | reported-properties patches answered (accepted or refused) |
//! | `edgehub_reported_properties_update_duration_seconds` | histogram (edgeHub: summary) | `target`, `id` | patch in → answer queued (durable when accepted) |
//!
//!
//! Guarantees: label values are bounded by the declared modules, endpoints and a fixed set of
//! reasons; rendering never fails a scrape because one queue cannot be read (that queue's age
//! is left out).

pub mod upstream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use router::{OutputName, QueueId, RouterMetrics};
use store::{Store, UnixMillis};

use self::upstream::UpstreamMetrics;
use crate::identity::Identity;

/// Labels of `edgehub_messages_received_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReceivedLabels {
    route_output: String,
    id: String,
}

/// Labels of `edgehub_messages_sent_total`, as edgeHub names them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SentLabels {
    /// The sender's id (`device/module`), empty if unknown.
    pub from: String,
    /// The receiver: `device/module`, or `upstream`.
    pub to: String,
    /// The output the sender used, empty if none.
    pub from_route_output: String,
    /// The input it was delivered on, empty for upstream.
    pub to_route_input: String,
    /// The route priority (0 highest), empty if unknown.
    pub priority: String,
}

/// Counters of one connection, resolved once (see [`HubMetrics::connection_metrics`]).
#[derive(Debug)]
pub struct ConnectionMetrics {
    id: String,
    sent: Counter,
    size: Histogram,
    /// By output name: a module uses few, so a short list beats a map.
    received: Vec<(Option<OutputName>, Counter)>,
}

impl ConnectionMetrics {
    /// The module published a message on `output` with a body of `size_bytes`.
    pub fn received(
        &mut self,
        metrics: &HubMetrics,
        output: Option<&OutputName>,
        size_bytes: usize,
    ) {
        self.size.observe(size_bytes as f64);
        if let Some((_, c)) = self.received.iter().find(|(o, _)| o.as_ref() == output) {
            c.inc();
            return;
        }
        let counter = metrics
            .messages_received
            .get_or_create(&ReceivedLabels {
                route_output: output.map(|o| o.to_string()).unwrap_or_default(),
                id: self.id.clone(),
            })
            .clone();
        counter.inc();
        self.received.push((output.cloned(), counter));
    }

    /// A message was delivered to the module (its PUBACK arrived).
    pub fn sent(&self) {
        self.sent.inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdLabel {
    id: String,
}

/// Labels of the twin GET series (edgeHub's `source`, `id`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TwinSourceLabels {
    source: &'static str,
    id: String,
}

/// Labels of the reported-properties series (edgeHub's `target`, `id`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TwinTargetLabels {
    target: &'static str,
    id: String,
}

/// Where twins are served from and reported properties kept: the hub's own store.
const TWIN_LOCAL: &str = "local";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabel {
    to: String,
}

/// Labels of a flow-controlled endpoint's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    endpoint: String,
}

/// Labels of a replicated module input's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    module: String,
    input: String,
}

/// Labels of the partitions-owned gauge: one series per member slot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaSlotLabels {
    module: String,
    input: String,
    slot: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of the direct-method series, as edgeHub names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    endpoint: String,
    priority: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn size_histogram() -> Histogram {
    // 64 B to 256 KiB (edgeHub's message size limit).
    Histogram::new(exponential_buckets(64.0, 2.0, 13))
}

/// The hub's metrics. Shared (`Arc`) by the heads, which feed it, and the HTTP server, which
/// renders it.
pub struct HubMetrics {
    registry: Registry,
    /// Serialises snapshot refreshes with encoding, so a scrape never sees half a refresh.
    render_lock: Mutex<()>,

    messages_received: Family<ReceivedLabels, Counter>,
    messages_sent: Family<SentLabels, Counter>,
    message_size: HistogramFamily<IdLabel>,
    message_send_duration: HistogramFamily<ToLabel>,
    publish_ack_duration: Histogram,
    connected_clients: Gauge,
    client_connect_success: Family<IdLabel, Counter>,
    client_connect_failed: Family<ReasonLabel, Counter>,
    client_disconnect: Counter,
    client_token_expired: Family<ProtocolLabel, Counter>,

    messages_dropped: Family<ReasonLabel, Counter>,
    messages_unack: Family<ReasonLabel, Counter>,
    router_routed: Counter,
    router_deliveries: Counter,
    router_retries: Counter,
    router_worker_failures: Counter,
    replica_duplicates: Family<ReplicaLabels, Counter>,
    replica_refused: Family<ReplicaLabels, Counter>,
    replica_partitions: Family<ReplicaSlotLabels, Gauge>,
    flow_held_seconds: Family<FlowLabels, Counter<f64, AtomicU64>>,
    flow_holds: Family<FlowLabels, Counter>,
    flow_lag: Family<FlowLabels, Gauge>,

    queue_length: Family<QueueLabels, Gauge>,
    queue_oldest_age: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    store_fdatasyncs: Counter,
    store_commits: Counter,
    store_caller_commits: Counter,
    store_appends: Counter,
    store_reclaimed_segments: Counter,
    store_bytes_on_disk: Gauge,
    store_segments: Gauge,
    store_resident_index_entries: Gauge,
    store_halted: Gauge,
    store_epoch: Gauge,
    store_fenced: Gauge,
    store_fdatasync_seconds: SnapshotHistogram,

    manifest_reloads: Family<ResultLabel, Counter>,
    manifest_generation: Gauge,

    direct_methods: Family<MethodLabels, Counter>,
    direct_method_duration: HistogramFamily<MethodLabels>,
    twin_gets: Family<TwinSourceLabels, Counter>,
    twin_get_duration: HistogramFamily<TwinSourceLabels>,
    reported_properties: Family<TwinTargetLabels, Counter>,
    reported_properties_duration: HistogramFamily<TwinTargetLabels>,

    upstream: UpstreamMetrics,
    limits: crate::limits::LimitMetrics,
}

impl std::fmt::Debug for HubMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubMetrics").finish_non_exhaustive()
    }
}

impl HubMetrics {
    /// Metrics for the edge device `edge_device` of IoT Hub `iothub`.
    pub fn new(iothub: &str, edge_device: &str) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        let labels = [
            ("iothub", iothub.to_owned()),
            ("edge_device", edge_device.to_owned()),
            ("instance_number", instance),
        ];
        let registry = Registry::with_labels(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        let mut m = HubMetrics {
            registry,
            render_lock: Mutex::new(()),
            messages_received: Family::default(),
            messages_sent: Family::default(),
            message_size: Family::new_with_constructor(size_histogram),
            message_send_duration: Family::new_with_constructor(latency_histogram),
            publish_ack_duration: latency_histogram(),
            connected_clients: Gauge::default(),
            client_connect_success: Family::default(),
            client_connect_failed: Family::default(),
            client_disconnect: Counter::default(),
            client_token_expired: Family::default(),
            messages_dropped: Family::default(),
            messages_unack: Family::default(),
            router_routed: Counter::default(),
            router_deliveries: Counter::default(),
            router_retries: Counter::default(),
            router_worker_failures: Counter::default(),
            replica_duplicates: Family::default(),
            replica_refused: Family::default(),
            replica_partitions: Family::default(),
            flow_held_seconds: Family::default(),
            flow_holds: Family::default(),
            flow_lag: Family::default(),
            queue_length: Family::default(),
            queue_oldest_age: Family::default(),
            store_fdatasyncs: Counter::default(),
            store_commits: Counter::default(),
            store_caller_commits: Counter::default(),
            store_appends: Counter::default(),
            store_reclaimed_segments: Counter::default(),
            store_bytes_on_disk: Gauge::default(),
            store_segments: Gauge::default(),
            store_resident_index_entries: Gauge::default(),
            store_halted: Gauge::default(),
            store_epoch: Gauge::default(),
            store_fenced: Gauge::default(),
            store_fdatasync_seconds: SnapshotHistogram::default(),
            manifest_reloads: Family::default(),
            manifest_generation: Gauge::default(),
            direct_methods: Family::default(),
            direct_method_duration: Family::new_with_constructor(latency_histogram),
            twin_gets: Family::default(),
            twin_get_duration: Family::new_with_constructor(latency_histogram),
            reported_properties: Family::default(),
            reported_properties_duration: Family::new_with_constructor(latency_histogram),
            upstream: UpstreamMetrics::default(),
            limits: crate::limits::LimitMetrics::default(),
        };
        // Both results show from the start (0), so a rate or an alert needs no absent series.
        for result in ["success", "failure"] {
            drop(m.manifest_reloads.get_or_create(&ResultLabel { result }));
        }
        m.manifest_generation.set(1);
        m.register();
        m
    }

    /// Registers every family, subsystem by subsystem; a scrape lists them in this order.
    fn register(&mut self) {
        // The steps read the families from `&self`, so the registry is taken out meanwhile.
        let mut r = std::mem::take(&mut self.registry);
        self.upstream.register(&mut r);
        self.limits.register(&mut r);
        self.register_manifest(&mut r);
        self.register_module_traffic(&mut r);
        self.register_clients(&mut r);
        self.register_router(&mut r);
        self.register_queues(&mut r);
        self.register_store(&mut r);
        self.register_methods(&mut r);
        self.register_twins(&mut r);
        self.registry = r;
    }

    /// Direct methods, module to module.
    fn register_methods(&self, r: &mut Registry) {
        r.register(
            "edgehub_direct_methods",
            "Direct-method invocations between modules, answered or not",
            self.direct_methods.clone(),
        );
        r.register(
            "edgehub_direct_method_duration_seconds",
            "Time from a direct method's target lookup to its answer (or 404, or timeout)",
            self.direct_method_duration.clone(),
        );
    }

    /// Manifest reloads and the generation in force.
    fn register_manifest(&self, r: &mut Registry) {
        r.register(
            "edgehub_manifest_reloads",
            "Manifest reloads (SIGHUP, manifest or module keys changed), by result",
            self.manifest_reloads.clone(),
        );
        r.register(
            "edgehub_manifest_generation",
            "The manifest in force: 1 at start, plus one per reload applied",
            self.manifest_generation.clone(),
        );
    }

    /// Messages from and to modules: counts, sizes, durations.
    fn register_module_traffic(&self, r: &mut Registry) {
        r.register(
            "edgehub_messages_received",
            "Messages received from modules",
            self.messages_received.clone(),
        );
        r.register(
            "edgehub_messages_sent",
            "Messages delivered to modules or upstream",
            self.messages_sent.clone(),
        );
        r.register(
            "edgehub_message_size_bytes",
            "Size of received message bodies",
            self.message_size.clone(),
        );
        r.register(
            "edgehub_message_send_duration_seconds",
            "Time to deliver a message to its receiver",
            self.message_send_duration.clone(),
        );
        r.register(
            "edgehub_publish_ack_duration_seconds",
            "Time from a PUBLISH arriving to its PUBACK (the message is durable)",
            self.publish_ack_duration.clone(),
        );
    }

    /// Module connections.
    fn register_clients(&self, r: &mut Registry) {
        r.register(
            "edgehub_connected_clients",
            "Modules connected now",
            self.connected_clients.clone(),
        );
        r.register(
            "edgehub_client_connect_success",
            "Successful module connections",
            self.client_connect_success.clone(),
        );
        r.register(
            "edgehub_client_connect_failed",
            "Refused module connections",
            self.client_connect_failed.clone(),
        );
        r.register(
            "edgehub_client_disconnect",
            "Module disconnections",
            self.client_disconnect.clone(),
        );
        r.register(
            "edgehub_client_token_expired",
            "Module connections closed because their SAS token expired",
            self.client_token_expired.clone(),
        );
    }

    /// Routing outcomes: drops, unacknowledged messages, deliveries.
    fn register_router(&self, r: &mut Registry) {
        r.register(
            "edgehub_messages_dropped",
            "Messages dropped: no route, TTL expired, rejected by the receiver, or set aside",
            self.messages_dropped.clone(),
        );
        r.register(
            "edgehub_messages_unack",
            "Messages not acknowledged to their sender because they could not be stored",
            self.messages_unack.clone(),
        );
        r.register(
            "edgehub_router_messages_routed",
            "Messages stored for at least one endpoint",
            self.router_routed.clone(),
        );
        r.register(
            "edgehub_router_deliveries",
            "Endpoint copies delivered (resends count again)",
            self.router_deliveries.clone(),
        );
        r.register(
            "edgehub_router_retries",
            "Deliveries retried after a failure",
            self.router_retries.clone(),
        );
        r.register(
            "edgehub_router_worker_failures",
            "Endpoint workers stopped by a store failure",
            self.router_worker_failures.clone(),
        );
        r.register(
            "edgehub_replica_duplicates",
            "Deliveries to a replicated module abandoned (their replica left, crashed, was displaced or missed the handoff deadline) and delivered again: possible duplicates",
            self.replica_duplicates.clone(),
        );
        r.register(
            "edgehub_replica_connections_refused",
            "Connections of a replicated module refused because it had its count of replicas, each heard from recently",
            self.replica_refused.clone(),
        );
        r.register(
            "edgehub_replica_partitions_owned",
            "Partitions of a replicated module's input each member slot owns now",
            self.replica_partitions.clone(),
        );
        r.register(
            "edgehub_flow_control_held_seconds",
            "Seconds producers were held (not read) because this online module input lagged past its bound, summed over producers",
            self.flow_held_seconds.clone(),
        );
        r.register(
            "edgehub_flow_control_holds",
            "Times a producer was held because this online module input lagged past its bound",
            self.flow_holds.clone(),
        );
        r.register(
            "edgehub_flow_control_lag",
            "Messages stored for this module input by this process and not yet delivered",
            self.flow_lag.clone(),
        );
    }

    /// Endpoint queues (refreshed from the store on each scrape).
    fn register_queues(&self, r: &mut Registry) {
        r.register(
            "edgehub_queue_length",
            "Messages waiting in an endpoint queue",
            self.queue_length.clone(),
        );
        r.register(
            "edgehub_queue_oldest_age_seconds",
            "Age of the oldest message waiting in an endpoint queue",
            self.queue_oldest_age.clone(),
        );
    }

    /// The store (refreshed from its snapshot on each scrape).
    fn register_store(&self, r: &mut Registry) {
        r.register(
            "edgehub_store_fdatasyncs",
            "fdatasync calls on store segment files",
            self.store_fdatasyncs.clone(),
        );
        r.register(
            "edgehub_store_commits",
            "Store group commits",
            self.store_commits.clone(),
        );
        r.register(
            "edgehub_store_caller_commits",
            "Store commits of a lone message made on its producer's thread (--commit-on-caller)",
            self.store_caller_commits.clone(),
        );
        r.register(
            "edgehub_store_appends",
            "Messages appended to the store",
            self.store_appends.clone(),
        );
        r.register(
            "edgehub_store_reclaimed_segments",
            "Store segments deleted by retention",
            self.store_reclaimed_segments.clone(),
        );
        r.register(
            "edgehub_store_bytes_on_disk",
            "Bytes of store segment files on disk",
            self.store_bytes_on_disk.clone(),
        );
        r.register(
            "edgehub_store_segments",
            "Store segment files on disk",
            self.store_segments.clone(),
        );
        r.register(
            "edgehub_store_resident_index_entries",
            "Store index entries held in memory (the rest are in sidecar files)",
            self.store_resident_index_entries.clone(),
        );
        r.register(
            "edgehub_store_halted",
            "1 when the store refuses writes (poisoned or fenced), else 0",
            self.store_halted.clone(),
        );
        r.register(
            "edgehub_store_epoch",
            "The epoch the store was opened with (--epoch, the fencing token the controller sets)",
            self.store_epoch.clone(),
        );
        r.register(
            "edgehub_store_fenced",
            "1 once a newer hub (same or higher epoch) opened the store, else 0",
            self.store_fenced.clone(),
        );
        r.register(
            "edgehub_store_fdatasync_seconds",
            "Duration of each group commit's fdatasync (the disk's part of a publish's latency)",
            self.store_fdatasync_seconds.clone(),
        );
    }

    /// Module twins: GETs and reported-properties patches, under edgeHub's names.
    fn register_twins(&self, r: &mut Registry) {
        r.register(
            "edgehub_gettwin",
            "Twin GETs answered, by source (local: the hub's own twin store) and module",
            self.twin_gets.clone(),
        );
        r.register(
            "edgehub_gettwin_duration_seconds",
            "Time from a twin GET to its answer",
            self.twin_get_duration.clone(),
        );
        r.register(
            "edgehub_reported_properties",
            "Reported-properties patches answered, by target (local: the hub's own twin store) and module",
            self.reported_properties.clone(),
        );
        r.register(
            "edgehub_reported_properties_update_duration_seconds",
            "Time from a reported-properties patch to its answer (durable when accepted)",
            self.reported_properties_duration.clone(),
        );
    }

    /// `who`'s twin GET was answered `elapsed` after it arrived.
    pub fn twin_get(&self, who: &Identity, elapsed: Duration) {
        let labels = TwinSourceLabels {
            source: TWIN_LOCAL,
            id: who.to_string(),
        };
        self.twin_gets.get_or_create(&labels).inc();
        self.twin_get_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// `who`'s reported-properties patch was answered `elapsed` after it arrived.
    pub fn reported_properties_updated(&self, who: &Identity, elapsed: Duration) {
        let labels = TwinTargetLabels {
            target: TWIN_LOCAL,
            id: who.to_string(),
        };
        self.reported_properties.get_or_create(&labels).inc();
        self.reported_properties_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A module published a message (no output name or size known).
    pub fn message_received(&self, from: &Identity) {
        self.message_received_on(from, None, None);
    }

    /// A module published a message on `output` with a body of `size_bytes`.
    pub fn message_received_on(
        &self,
        from: &Identity,
        output: Option<&OutputName>,
        size_bytes: Option<usize>,
    ) {
        let id = from.to_string();
        if let Some(size) = size_bytes {
            self.message_size
                .get_or_create(&IdLabel { id: id.clone() })
                .observe(size as f64);
        }
        self.messages_received
            .get_or_create(&ReceivedLabels {
                route_output: output.map(|o| o.to_string()).unwrap_or_default(),
                id,
            })
            .inc();
    }

    /// The counters one connection of `who` feeds, looked up once: a label lookup per message
    /// compares label strings under a lock (7% of the hub's CPU in the peers benchmark).
    pub fn connection_metrics(&self, who: &Identity) -> ConnectionMetrics {
        let id = who.to_string();
        ConnectionMetrics {
            sent: self
                .messages_sent
                .get_or_create(&SentLabels {
                    to: id.clone(),
                    ..SentLabels::default()
                })
                .clone(),
            size: self
                .message_size
                .get_or_create(&IdLabel { id: id.clone() })
                .clone(),
            received: Default::default(),
            id,
        }
    }

    /// A message was delivered to module `to` (nothing else known).
    pub fn message_sent(&self, to: &Identity) {
        self.message_sent_with(&SentLabels {
            to: to.to_string(),
            ..SentLabels::default()
        });
    }

    /// A message was delivered, with every label edgeHub uses.
    pub fn message_sent_with(&self, labels: &SentLabels) {
        self.messages_sent.get_or_create(labels).inc();
    }

    /// Delivering a message to `to` (`device/module` or `upstream`) took `elapsed`.
    pub fn message_send_duration(&self, to: &str, elapsed: Duration) {
        self.message_send_duration
            .get_or_create(&ToLabel { to: to.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// A PUBLISH was acknowledged `elapsed` after it arrived.
    pub fn publish_acked(&self, elapsed: Duration) {
        self.publish_ack_duration.observe(elapsed.as_secs_f64());
    }

    /// The cloud connection's series (`edgehub_upstream_*`).
    pub fn upstream(&self) -> &UpstreamMetrics {
        &self.upstream
    }

    /// The connection limits' series (`edgehub_connections*`, `edgehub_accept_failures_total`).
    pub fn limits(&self) -> &crate::limits::LimitMetrics {
        &self.limits
    }

    /// A module connection was accepted (before authentication).
    pub fn client_connected(&self) {
        self.connected_clients.inc();
    }

    /// A module connection ended.
    pub fn client_disconnected(&self) {
        self.connected_clients.dec();
        self.client_disconnect.inc();
    }

    /// A module authenticated.
    pub fn client_authenticated(&self, who: &Identity) {
        self.client_connect_success
            .get_or_create(&IdLabel {
                id: who.to_string(),
            })
            .inc();
    }

    /// A direct method `from` one module `to` another ended (answered or not) after `elapsed`.
    pub fn direct_method(&self, from: &Identity, to: &Identity, elapsed: Duration) {
        let labels = MethodLabels {
            from: from.to_string(),
            to: to.to_string(),
        };
        self.direct_methods.get_or_create(&labels).inc();
        self.direct_method_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A connection was closed because its SAS token expired; `protocol` is `"mqtt"` or
    /// `"amqp"`.
    pub fn client_token_expired(&self, protocol: &'static str) {
        self.client_token_expired
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }

    /// A manifest reload ended: applied (`generation` is now in force) or refused.
    pub fn manifest_reloaded(&self, success: bool, generation: u64) {
        let result = if success { "success" } else { "failure" };
        self.manifest_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
        self.manifest_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// A connection was refused; `reason` must be one of a few fixed words (e.g.
    /// `"bad_credentials"`, `"bad_client_id"`, `"protocol"`), never free text.
    pub fn client_connect_failed(&self, reason: &'static str) {
        self.client_connect_failed
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Refreshes the snapshot-fed series from `store` and `router` and encodes everything as
    /// OpenMetrics text.
    pub fn render(&self, store: &Store, router: &RouterMetrics) -> String {
        self.render_at(store, router, now_millis())
    }

    /// [`render`](Self::render) with an explicit clock, for oldest-message ages.
    pub fn render_at(&self, store: &Store, router: &RouterMetrics, now: UnixMillis) -> String {
        let _guard = self
            .render_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The store skips messages whose every target expired without the router seeing them;
        // both kinds are TTL drops.
        let stats = store.stats();
        let store_expired: u64 = stats.queues.iter().map(|q| q.expired).sum();
        self.refresh_router(router, store_expired);
        self.refresh_flow(router);
        self.refresh_store(store, &stats, now);
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        text
    }

    fn refresh_router(&self, r: &RouterMetrics, store_expired: u64) {
        let dropped = [
            ("no_route", r.unrouted),
            ("ttl_expiry", r.expired.saturating_add(store_expired)),
            ("rejected", r.rejected),
            ("set_aside", r.set_aside),
        ];
        for (reason, value) in dropped {
            set_counter(
                &self.messages_dropped.get_or_create(&ReasonLabel { reason }),
                value,
            );
        }
        set_counter(
            &self.messages_unack.get_or_create(&ReasonLabel {
                reason: "storage_failure",
            }),
            r.store_refused,
        );
        set_counter(&self.router_routed, r.routed);
        set_counter(&self.router_deliveries, r.delivered);
        set_counter(&self.router_retries, r.retries);
        set_counter(&self.router_worker_failures, r.worker_failures);
        self.replica_partitions.clear();
        for stats in &r.replicas {
            let labels = ReplicaLabels {
                module: stats.module.as_str().to_owned(),
                input: stats.input.as_str().to_owned(),
            };
            set_counter(
                &self.replica_duplicates.get_or_create(&labels),
                stats.duplicates,
            );
            set_counter(&self.replica_refused.get_or_create(&labels), stats.refused);
            for (slot, owned) in &stats.owned {
                self.replica_partitions
                    .get_or_create(&ReplicaSlotLabels {
                        module: labels.module.clone(),
                        input: labels.input.clone(),
                        slot: slot.get(),
                    })
                    .set(i64::try_from(*owned).unwrap_or(i64::MAX));
            }
        }
    }

    fn refresh_flow(&self, r: &RouterMetrics) {
        for stats in &r.flow {
            let labels = FlowLabels {
                endpoint: stats.endpoint.as_str().to_owned(),
            };
            self.flow_held_seconds
                .get_or_create(&labels)
                .inner()
                .store(stats.held.as_secs_f64().to_bits(), Ordering::Relaxed);
            set_counter(&self.flow_holds.get_or_create(&labels), stats.holds);
            self.flow_lag
                .get_or_create(&labels)
                .set(clamp_i64(stats.lag.0));
        }
    }

    fn refresh_store(&self, store: &Store, stats: &store::StoreStats, now: UnixMillis) {
        self.store_fdatasync_seconds.set_from(&stats.commit_syncs);
        set_counter(&self.store_fdatasyncs, stats.syncs);
        set_counter(&self.store_commits, stats.commits);
        set_counter(&self.store_caller_commits, stats.caller_commits);
        set_counter(&self.store_appends, stats.appends);
        set_counter(&self.store_reclaimed_segments, stats.reclaimed_segments);
        self.store_bytes_on_disk.set(clamp_i64(stats.bytes_on_disk));
        self.store_segments.set(clamp_i64(stats.segments as u64));
        self.store_resident_index_entries
            .set(clamp_i64(stats.resident_index_entries as u64));
        self.store_halted
            .set(i64::from(store.halted_reason().is_some()));
        self.store_epoch
            .set(i64::try_from(store.epoch().get()).unwrap_or(i64::MAX));
        self.store_fenced.set(i64::from(store.is_fenced()));
        // One series per (endpoint, priority), as edgeHub: a router that keeps several store
        // queues for one pair (lanes) is summed, and the oldest message of any of them counts.
        let mut per_pair: BTreeMap<(String, String), (u64, Option<f64>)> = BTreeMap::new();
        for queue in &stats.queues {
            let key = match QueueId::parse(&queue.name) {
                Ok(id) => (id.endpoint_id().to_string(), id.priority.0.to_string()),
                Err(_) => (queue.name.as_str().to_owned(), String::new()),
            };
            let age = if queue.undelivered == 0 {
                Some(0.0)
            } else {
                oldest_age_secs(store, queue, now)
            };
            let entry = per_pair.entry(key).or_insert((0, Some(0.0)));
            entry.0 += queue.undelivered as u64;
            entry.1 = match (entry.1, age) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        self.queue_length.clear();
        self.queue_oldest_age.clear();
        for ((endpoint, priority), (length, age)) in per_pair {
            let labels = QueueLabels { endpoint, priority };
            self.queue_length
                .get_or_create(&labels)
                .set(clamp_i64(length));
            if let Some(age) = age {
                self.queue_oldest_age.get_or_create(&labels).set(age);
            }
        }
    }
}

/// Seconds since the first undelivered message of `queue` was enqueued, or `None` if it
/// cannot be read or decoded (or expired meanwhile).
fn oldest_age_secs(store: &Store, queue: &store::QueueStats, now: UnixMillis) -> Option<f64> {
    let first = match store.read(&queue.name, queue.checkpoint, 1) {
        Ok(mut msgs) if !msgs.is_empty() => msgs.swap_remove(0),
        Ok(_) => return Some(0.0),
        Err(e) => {
            tracing::debug!(queue = %queue.name.as_str(), error = %e, "oldest message unreadable");
            return None;
        }
    };
    let envelope = router::codec::decode(&first.body).ok()?;
    Some(now.0.saturating_sub(envelope.enqueued_at.0) as f64 / 1000.0)
}

fn set_counter(counter: &Counter, value: u64) {
    counter.inner().store(value, Ordering::Relaxed);
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn now_millis() -> UnixMillis {
    UnixMillis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// A histogram whose buckets are a snapshot taken from elsewhere (the store counts its own
/// fdatasync durations; each scrape copies them here), encoded as a Prometheus histogram.
#[derive(Clone, Debug, Default)]
struct SnapshotHistogram(Arc<Mutex<HistogramSnapshot>>);

#[derive(Debug, Default)]
struct HistogramSnapshot {
    sum_seconds: f64,
    count: u64,
    /// (upper bound in seconds, count in that bucket alone); the last bound is `f64::MAX`.
    buckets: Vec<(f64, u64)>,
}

impl SnapshotHistogram {
    fn set_from(&self, latency: &store::SyncLatency) {
        let bounds = store::SYNC_LATENCY_BOUNDS_MICROS
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds.zip(latency.counts.iter().copied()).collect();
        let mut snap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        snap.count = buckets.iter().map(|(_, n)| n).sum();
        snap.sum_seconds = latency.sum_micros as f64 / 1e6;
        snap.buckets = buckets;
    }
}

impl prometheus_client::encoding::EncodeMetric for SnapshotHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let snap = self.0.lock().unwrap_or_else(|p| p.into_inner());
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            snap.sum_seconds,
            snap.count,
            &snap.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// Counts a connection in `edgehub_connected_clients` until dropped, also when the connection's
/// future is dropped by its [`Admission`](crate::limits::Admission) before it ends on its own.
#[derive(Debug)]
pub struct ConnectedGauge(Arc<HubMetrics>);

impl ConnectedGauge {
    /// Counts one connection now.
    pub fn new(metrics: Arc<HubMetrics>) -> Self {
        metrics.client_connected();
        ConnectedGauge(metrics)
    }
}

impl Drop for ConnectedGauge {
    fn drop(&mut self) {
        self.0.client_disconnected();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router::codec::{encode, Envelope};
    use router::{DeviceId, Endpoint, InputName, Message, ModuleId, Priority, Source};
    use store::StoreOptions;

    fn open_store(dir: &std::path::Path) -> Store {
        let opts = StoreOptions {
            segment_bytes: 1 << 20,
            reserve_bytes: 0,
            preallocate: false,
            ..StoreOptions::default()
        };
        Store::open(dir, opts).expect("store")
    }

    fn receiver_queue() -> QueueId {
        QueueId::new(
            Endpoint::ModuleInput {
                module: ModuleId::new("receiver"),
                input: InputName::new("input1"),
            },
            Priority(0),
        )
    }

    fn append(store: &Store, queue: &QueueId, enqueued_at: UnixMillis) {
        let message = Message::new(
            Source::ModuleOutput {
                device: DeviceId::new("edge-device"),
                module: ModuleId::new("sender"),
                output: None,
            },
            &b"hi"[..],
        );
        let body = encode(&Envelope {
            enqueued_at,
            expiry_overrides: Vec::new(),
            message,
        })
        .expect("encode");
        store
            .append(&[queue.name().expect("name")], body, None)
            .wait()
            .expect("append");
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn the_fdatasync_histogram_counts_every_group_commit_of_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let queue = store::QueueName::new("q").expect("name");
        for _ in 0..5 {
            store
                .append(
                    std::slice::from_ref(&queue),
                    bytes::Bytes::from_static(b"x"),
                    None,
                )
                .wait()
                .expect("append");
        }
        let commits = store.stats().commits;
        let m = HubMetrics::new("edgehub.local", "edge-device");
        let text = m.render(&store, &RouterMetrics::default());
        let value = |prefix: &str| -> u64 {
            line(&text, prefix)
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{prefix}\n{text}"))
        };
        assert!(commits >= 5);
        assert_eq!(value("edgehub_store_fdatasync_seconds_count{"), commits);
        let inf = text
            .lines()
            .find(|l| {
                l.starts_with("edgehub_store_fdatasync_seconds_bucket{")
                    && l.contains("le=\"+Inf\"")
            })
            .unwrap_or_else(|| panic!("+Inf bucket\n{text}"));
        assert!(inf.ends_with(&format!(" {commits}")), "{inf}");
    }

    #[test]
    fn every_series_carries_edgehubs_names_and_constant_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let m = HubMetrics::new("edgehub.local", "edge-device");
        let text = m.render(&store, &RouterMetrics::default());
        for name in [
            "edgehub_messages_received_total",
            "edgehub_messages_sent_total",
            "edgehub_messages_dropped_total",
            "edgehub_messages_unack_total",
            "edgehub_connected_clients",
            "edgehub_queue_length",
            "edgehub_queue_oldest_age_seconds",
            "edgehub_store_fdatasync_seconds",
            "edgehub_store_fdatasyncs_total",
            "edgehub_client_disconnect_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
                "{name}\n{text}"
            );
        }
        let connected = line(&text, "edgehub_connected_clients{").expect("series");
        assert!(
            connected.contains("iothub=\"edgehub.local\""),
            "{connected}"
        );
        assert!(
            connected.contains("edge_device=\"edge-device\""),
            "{connected}"
        );
        assert!(connected.contains("instance_number=\""), "{connected}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The families and their order in a scrape (registration order): splitting `register`
    /// into steps per subsystem must leave this unchanged.
    #[test]
    fn a_scrape_lists_every_family_in_registration_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let m = HubMetrics::new("edgehub.local", "edge-device");
        let text = m.render(&store, &RouterMetrics::default());
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let expected = [
            "edgehub_upstream_connected gauge",
            "edgehub_upstream_offline counter",
            "edgehub_upstream_offline_seconds counter",
            "edgehub_upstream_connect_failures counter",
            "edgehub_upstream_messages_acked counter",
            "edgehub_twin_reported_sync_lag gauge",
            "edgehub_connections gauge",
            "edgehub_connections_refused counter",
            "edgehub_accept_failures counter",
            "edgehub_manifest_reloads counter",
            "edgehub_manifest_generation gauge",
            "edgehub_messages_received counter",
            "edgehub_messages_sent counter",
            "edgehub_message_size_bytes histogram",
            "edgehub_message_send_duration_seconds histogram",
            "edgehub_publish_ack_duration_seconds histogram",
            "edgehub_connected_clients gauge",
            "edgehub_client_connect_success counter",
            "edgehub_client_connect_failed counter",
            "edgehub_client_disconnect counter",
            "edgehub_client_token_expired counter",
            "edgehub_messages_dropped counter",
            "edgehub_messages_unack counter",
            "edgehub_router_messages_routed counter",
            "edgehub_router_deliveries counter",
            "edgehub_router_retries counter",
            "edgehub_router_worker_failures counter",
            "edgehub_replica_duplicates counter",
            "edgehub_replica_connections_refused counter",
            "edgehub_replica_partitions_owned gauge",
            "edgehub_flow_control_held_seconds counter",
            "edgehub_flow_control_holds counter",
            "edgehub_flow_control_lag gauge",
            "edgehub_queue_length gauge",
            "edgehub_queue_oldest_age_seconds gauge",
            "edgehub_store_fdatasyncs counter",
            "edgehub_store_commits counter",
            "edgehub_store_caller_commits counter",
            "edgehub_store_appends counter",
            "edgehub_store_reclaimed_segments counter",
            "edgehub_store_bytes_on_disk gauge",
            "edgehub_store_segments gauge",
            "edgehub_store_resident_index_entries gauge",
            "edgehub_store_halted gauge",
            "edgehub_store_epoch gauge",
            "edgehub_store_fenced gauge",
            "edgehub_store_fdatasync_seconds histogram",
            "edgehub_direct_methods counter",
            "edgehub_direct_method_duration_seconds histogram",
            "edgehub_gettwin counter",
            "edgehub_gettwin_duration_seconds histogram",
            "edgehub_reported_properties counter",
            "edgehub_reported_properties_update_duration_seconds histogram",
        ];
        assert_eq!(families, expected);
    }

    #[test]
    fn twin_calls_are_counted_with_edgehubs_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let m = HubMetrics::new("h", "d");
        let who = Identity::new(DeviceId::new("d"), ModuleId::new("m"));
        m.twin_get(&who, Duration::from_millis(1));
        m.twin_get(&who, Duration::from_millis(1));
        m.reported_properties_updated(&who, Duration::from_millis(2));
        let text = m.render(&store, &RouterMetrics::default());
        let gets = line(&text, "edgehub_gettwin_total{").expect("gettwin");
        assert!(
            gets.contains("source=\"local\"")
                && gets.contains("id=\"d/m\"")
                && gets.ends_with(" 2"),
            "{gets}"
        );
        let reported = line(&text, "edgehub_reported_properties_total{").expect("reported");
        assert!(
            reported.contains("target=\"local\"") && reported.ends_with(" 1"),
            "{reported}"
        );
        assert!(
            text.contains("edgehub_gettwin_duration_seconds_count{"),
            "{text}"
        );
        assert!(
            text.contains("edgehub_reported_properties_update_duration_seconds_count{"),
            "{text}"
        );
    }

    #[test]
    fn head_events_show_up_with_identity_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let m = HubMetrics::new("h", "d");
        let sender = Identity::new(DeviceId::new("d"), ModuleId::new("sender"));
        let receiver = Identity::new(DeviceId::new("d"), ModuleId::new("receiver"));
        m.client_connected();
        m.client_connected();
        m.client_disconnected();
        m.message_received(&sender);
        m.message_received_on(&sender, Some(&OutputName::new("out1")), Some(100));
        m.message_sent(&receiver);
        m.publish_acked(Duration::from_millis(3));
        m.client_token_expired("mqtt");
        m.client_token_expired("amqp");
        m.client_token_expired("mqtt");
        let text = m.render(&store, &RouterMetrics::default());
        let expired = |protocol: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("edgehub_client_token_expired_total{")
                        && l.contains(&format!("protocol=\"{protocol}\""))
                })
                .unwrap_or_else(|| panic!("{protocol}\n{text}"))
                .to_owned()
        };
        assert!(expired("mqtt").ends_with(" 2"), "{}", expired("mqtt"));
        assert!(expired("amqp").ends_with(" 1"), "{}", expired("amqp"));
        let connected = line(&text, "edgehub_connected_clients{").expect("gauge");
        assert!(connected.ends_with(" 1"), "{connected}");
        let out1 = text
            .lines()
            .find(|l| {
                l.starts_with("edgehub_messages_received_total{")
                    && l.contains("route_output=\"out1\"")
            })
            .expect("out1 series");
        assert!(
            out1.contains("id=\"d/sender\"") && out1.ends_with(" 1"),
            "{out1}"
        );
        let sent = line(&text, "edgehub_messages_sent_total{").expect("sent");
        assert!(
            sent.contains("to=\"d/receiver\"") && sent.ends_with(" 1"),
            "{sent}"
        );
        let acks = line(&text, "edgehub_publish_ack_duration_seconds_count{").expect("acks");
        assert!(acks.ends_with(" 1"), "{acks}");
    }

    #[test]
    fn router_counters_become_dropped_and_unack_reasons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let m = HubMetrics::new("h", "d");
        let r = RouterMetrics {
            unrouted: 3,
            expired: 2,
            store_refused: 4,
            routed: 10,
            ..RouterMetrics::default()
        };
        let text = m.render(&store, &r);
        let find = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle}\n{text}"))
                .to_owned()
        };
        assert!(find("reason=\"no_route\"").ends_with(" 3"));
        assert!(find("reason=\"ttl_expiry\"").ends_with(" 2"));
        assert!(find("reason=\"storage_failure\"").ends_with(" 4"));
        assert!(find("edgehub_router_messages_routed_total{").ends_with(" 10"));
        // A later snapshot replaces the values (they are totals, not increments).
        let text = m.render(&store, &RouterMetrics { unrouted: 5, ..r });
        let no_route = text
            .lines()
            .find(|l| l.contains("reason=\"no_route\""))
            .expect("series");
        assert!(no_route.ends_with(" 5"), "{no_route}");
    }

    #[test]
    fn queue_length_and_oldest_age_come_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let queue = receiver_queue();
        let now = now_millis();
        append(&store, &queue, UnixMillis(now.0 - 5_000));
        append(&store, &queue, UnixMillis(now.0 - 1_000));
        let m = HubMetrics::new("h", "d");
        let text = m.render_at(&store, &RouterMetrics::default(), now);
        let length = line(&text, "edgehub_queue_length{").expect("length");
        assert!(length.contains("endpoint=\"receiver/input1\""), "{length}");
        assert!(length.contains("priority=\"0\""), "{length}");
        assert!(length.ends_with(" 2"), "{length}");
        let age = line(&text, "edgehub_queue_oldest_age_seconds{").expect("age");
        assert!(age.ends_with(" 5.0"), "{age}");
        assert!(line(&text, "edgehub_store_appends_total{").is_some());
        let halted = line(&text, "edgehub_store_halted{").expect("halted");
        assert!(halted.ends_with(" 0"), "{halted}");
    }

    #[test]
    fn store_epoch_and_fenced_gauges_follow_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = |epoch| StoreOptions {
            epoch: store::Epoch::new(epoch),
            preallocate: false,
            reserve_bytes: 0,
            ..StoreOptions::default()
        };
        let old = Store::open(dir.path(), opts(7)).expect("store");
        let m = HubMetrics::new("h", "d");
        let render = |store: &Store| m.render_at(store, &RouterMetrics::default(), now_millis());
        let text = render(&old);
        let epoch = line(&text, "edgehub_store_epoch{").expect("epoch");
        assert!(epoch.ends_with(" 7"), "{epoch}");
        let fenced = line(&text, "edgehub_store_fenced{").expect("fenced");
        assert!(fenced.ends_with(" 0"), "{fenced}");

        let _new = Store::open(dir.path(), opts(8)).expect("newer owner");
        assert!(old.check_fence());
        let text = render(&old);
        let fenced = line(&text, "edgehub_store_fenced{").expect("fenced");
        assert!(fenced.ends_with(" 1"), "{fenced}");
        let epoch = line(&text, "edgehub_store_epoch{").expect("epoch");
        assert!(epoch.ends_with(" 7"), "{epoch}");
    }
}
