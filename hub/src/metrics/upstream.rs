//! Prometheus series of the cloud connection (upstream), one set per sending identity.
//!
//! | series | kind | labels |
//! |---|---|---|
//! | `edgehub_upstream_connected` | gauge (0/1) | `id` |
//! | `edgehub_upstream_offline` (`_total`) | counter: times the connection went offline | `id` |
//! | `edgehub_upstream_offline_seconds` (`_total`) | counter: seconds spent offline, updated at least every backoff step | `id` |
//! | `edgehub_upstream_connect_failures` (`_total`) | counter | `id`, `reason` |
//! | `edgehub_upstream_messages_acked` (`_total`) | counter: PUBACKs from the cloud | `id` |
//! | `edgehub_twin_reported_sync_lag` | gauge: local reported-properties versions IoT Hub has not acknowledged | `id` |
//!
//! The upstream queue's length and oldest-message age are the `edgehub_queue_length` and
//! `edgehub_queue_oldest_age_seconds` series of endpoint `iothub`.
//!
//! Guarantees: `id` takes only declared module identities and `reason` a fixed set of words.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::Identity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdLabel {
    id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    id: String,
    reason: &'static str,
}

/// The upstream series.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    connected: Family<IdLabel, Gauge>,
    offline: Family<IdLabel, Counter>,
    offline_seconds: Family<IdLabel, Counter<f64, AtomicU64>>,
    connect_failures: Family<FailureLabels, Counter>,
    acked: Family<IdLabel, Counter>,
    reported_sync_lag: Family<IdLabel, Gauge>,
}

fn id(who: &Identity) -> IdLabel {
    IdLabel {
        id: who.to_string(),
    }
}

impl UpstreamMetrics {
    /// Registers every series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "edgehub_upstream_connected",
            "Whether the identity's connection to IoT Hub is up",
            self.connected.clone(),
        );
        registry.register(
            "edgehub_upstream_offline",
            "Times the identity's connection to IoT Hub went down or could not be made",
            self.offline.clone(),
        );
        registry.register(
            "edgehub_upstream_offline_seconds",
            "Seconds the identity had messages for IoT Hub but no connection",
            self.offline_seconds.clone(),
        );
        registry.register(
            "edgehub_upstream_connect_failures",
            "Failed connection attempts to IoT Hub",
            self.connect_failures.clone(),
        );
        registry.register(
            "edgehub_upstream_messages_acked",
            "Messages IoT Hub acknowledged",
            self.acked.clone(),
        );
        registry.register(
            "edgehub_twin_reported_sync_lag",
            "Reported-properties versions of the module's twin that IoT Hub has not acknowledged",
            self.reported_sync_lag.clone(),
        );
    }

    /// The cloud connection of `who` is up.
    pub fn online(&self, who: &Identity) {
        self.connected.get_or_create(&id(who)).set(1);
    }

    /// The cloud connection of `who` went down (or its first connection failed).
    pub fn went_offline(&self, who: &Identity) {
        self.connected.get_or_create(&id(who)).set(0);
        self.offline.get_or_create(&id(who)).inc();
    }

    /// `who` spent another `elapsed` offline.
    pub fn offline_for(&self, who: &Identity, elapsed: Duration) {
        self.offline_seconds
            .get_or_create(&id(who))
            .inc_by(elapsed.as_secs_f64());
    }

    /// A connection attempt of `who` failed for `reason` (a fixed word).
    pub fn connect_failed(&self, who: &Identity, reason: &'static str) {
        self.connect_failures
            .get_or_create(&FailureLabels {
                id: who.to_string(),
                reason,
            })
            .inc();
    }

    /// `who`'s twin has `versions` reported-properties versions IoT Hub has not acknowledged.
    pub fn reported_sync_lag(&self, who: &Identity, versions: u64) {
        self.reported_sync_lag
            .get_or_create(&id(who))
            .set(i64::try_from(versions).unwrap_or(i64::MAX));
    }

    /// IoT Hub acknowledged a message of `who`.
    pub fn acked(&self, who: &Identity) {
        self.acked.get_or_create(&id(who)).inc();
    }
}
