//! Upstream: `INTO $upstream` messages to IoT Hub, store-and-forward.
//!
//! The data path is the same as for a module input: the router stores each message once in the
//! `iothub` endpoint's queue (durably, before the sender's PUBACK), the endpoint worker reads it
//! in acceptance order and hands batches to [`sink::UpstreamSink`], which publishes each message
//! as the module that sent it through a cloud connection ([`cloud::Upstream`]; the one in use is
//! [`mqtt::MqttUpstream`]: rumqttc over TLS, one connection per identity), and the worker
//! checkpoints only what the cloud acknowledged.
//!
//! Guarantees (each held by the part named):
//! - **Nothing acknowledged is lost.** Messages wait in the store while the cloud is away, across
//!   restarts and kill -9, within their TTL and the store's quota (store, worker).
//! - **The checkpoint moves only on PUBACK** (sink, [`inflight::Inflight`]).
//! - **Order per sender.** Every message of one module reaches the cloud in acceptance order;
//!   after a failure the worker resends from the first message not acknowledged, so the cloud
//!   may see duplicates (at-least-once), never a later message in place of an earlier one that
//!   was lost. Different modules go in parallel, with no order between them.
//! - **Expired messages are dropped and counted** (`edgehub_messages_dropped_total{reason=
//!   "ttl_expiry"}`), never sent late.
//! - **An outage ends promptly.** When a cloud connection comes back it wakes the worker, whose own
//!   backoff (up to 60 s) would otherwise delay the backlog.
//!
//! Known limits: the queue is one per priority for all modules, so a module whose connection is
//! refused holds back the others' messages queued behind its own (as edgeHub's single upstream
//! queue does); leaf devices have no upstream identity here; AMQP upstream is not implemented.

pub mod cloud;
pub mod inflight;
pub mod mqtt;
pub mod sink;
pub mod state;
pub mod twin_sync;

use std::sync::{Arc, Weak};

use router::{Dispatcher, Endpoint, EndpointPolicy};
use store::Clock;

use self::mqtt::{client_tls_config, MqttUpstream, MqttUpstreamConfig, UpstreamTlsError};
use self::sink::UpstreamSink;
use crate::identity::Identities;
use crate::methods::Methods;
use crate::metrics::HubMetrics;
use crate::settings::Settings;
use crate::twin::Twins;

/// Messages in flight upstream, over every module's connection: each connection has up to 100
/// unacknowledged publishes, and a batch is split by sending module, so the window of one
/// connection (100, the module endpoints' default) would leave most of them idle when several
/// modules send.
pub const UPSTREAM_WINDOW: usize = 1000;

/// Starts the cloud connection the settings ask for and makes it the `$upstream` sink; the
/// cloud reaches the direct methods of `methods`' targets through it, and `twins`' reported
/// properties go to IoT Hub on it. `None` when upstream is
/// off (the messages then wait on disk within their TTL).
pub fn start(
    settings: &Settings,
    identities: Arc<Identities>,
    dispatcher: &Arc<Dispatcher>,
    metrics: Arc<HubMetrics>,
    clock: Arc<dyn Clock>,
    methods: Arc<Methods>,
    twins: Arc<Twins>,
) -> Result<Option<Arc<MqttUpstream>>, UpstreamTlsError> {
    let Some(up) = settings.upstream() else {
        return Ok(None);
    };
    let tls = client_tls_config(up.ca.as_deref())?;
    let mut config =
        MqttUpstreamConfig::new(settings.iothub_hostname(), &up.host, up.port, Arc::new(tls));
    config.ack_timeout = up.timeout;
    config.clock = clock;
    config.methods = Some(methods);
    config.twins = Some(Arc::clone(&twins));
    // Weak: the dispatcher owns the sink, which owns this hook.
    let weak: Weak<Dispatcher> = Arc::downgrade(dispatcher);
    let (device, declared) = (identities.device().clone(), identities.modules());
    let upstream = Arc::new(MqttUpstream::new(config, identities, metrics, move || {
        if let Some(d) = weak.upgrade() {
            d.wake(&Endpoint::Upstream);
        }
    }));
    dispatcher.set_policy(
        &Endpoint::Upstream,
        EndpointPolicy {
            window: Some(UPSTREAM_WINDOW),
            ..EndpointPolicy::default()
        },
    );
    dispatcher.register_sink(
        &Endpoint::Upstream,
        UpstreamSink::new(Arc::clone(&upstream)),
    );
    upstream.follow_method_targets();
    twin_sync::start(&upstream, twins, device, declared);
    Ok(Some(upstream))
}
