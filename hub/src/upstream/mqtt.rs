//! [`Upstream`] over MQTT 3.1.1 with TLS to IoT Hub (or anything that speaks its dialect), using
//! rumqttc. One connection per sending module identity, as edgeHub's MQTT upstream: client id
//! `{device}/{module}`, username `{iothub}/{device}/{module}/?api-version=…`, and a SAS token
//! signed with that module's key, so messages reach IoT Hub as the module that sent them.
//!
//! Guarantees:
//! - **No acknowledgement without a PUBACK.** A message is answered `Ok` only when the PUBACK
//!   carrying the packet id it was written with arrives on the connection it was written on
//!   ([`Inflight`]). Anything the client reports that does not fit ends the connection.
//! - **No retransmission behind the caller's back.** rumqttc would resend unacknowledged
//!   publishes after a reconnect only if the broker kept a session, and silently drop them
//!   otherwise. We never reuse an event loop across connections: when a connection ends, every
//!   waiting message is answered `Lost`, the client and its request channel are dropped whole,
//!   and the next connection starts empty. The sink resends from the store.
//! - **No gaps within a call.** Once a message of a call cannot be handed to the connection,
//!   none after it is (they are answered `Offline`), so a later message is never acknowledged
//!   ahead of an earlier one that was not sent.
//! - **Offline is explicit.** While there is no connection, publishes are answered `Offline`
//!   at once (the messages wait in the store); the connection keeps reconnecting with exponential
//!   backoff, logs every failed attempt with its reason, and when a connection is up calls the
//!   `on_online` hook (the hub re-registers the sink so the worker's own backoff ends at once).
//! - **Direct methods from the cloud** (when [`MqttUpstreamConfig::methods`] is set): every
//!   connection subscribes to `$iothub/methods/POST/#` right after CONNECT; a request is handed
//!   to the module through [`Methods::invoke`] (the same targets and pending requests as
//!   module → module calls; response timeout 30 s; a module not connected is answered 404 at
//!   once) and the answer goes back on the identity's connection as
//!   `$iothub/methods/res/{status}/?$rid={cloud rid}` at QoS 0. Methods are not durable: an
//!   answer with no connection to carry it is logged and dropped (IoT Hub times the call out).
//!   A module's connection is opened when the module becomes a method target
//!   ([`MqttUpstream::follow_method_targets`]), not only on its first message, and then kept
//!   for the hub's lifetime as every other.
//! - **Module twins** (when [`MqttUpstreamConfig::twins`] is set): every connection also
//!   subscribes to `$iothub/twin/res/#` and `$iothub/twin/PATCH/properties/desired/#` right
//!   after CONNECT. Twin requests of `upstream::twin_sync` go at QoS 0 under a fresh `$rid`
//!   and are answered by IoT Hub's `$iothub/twin/res/{status}/?$rid=`, or "lost" when the
//!   connection ends; IoT Hub's desired patches are kept (up to 64, else "missed": the twin is
//!   read again) for the module's twin sync, which does the disk work, not this connection.
//! - **Tokens are renewed** by reconnecting when three quarters of a token's lifetime has
//!   passed (MQTT 3.1.1 cannot re-authenticate a live connection): from then on the connection takes
//!   no new message (they are answered `Offline` and wait in the store), what is in flight
//!   drains, and the connection is replaced, so a renewal sends nothing twice even under
//!   steady traffic.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use store::{Clock, SystemClock};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use bytes::Bytes;

use super::cloud::{CloudMessage, PublishError, Upstream};
use super::inflight::{Anomaly, Inflight};
use super::state::{self, Action, UpstreamState};
use crate::auth::sas;
use crate::identity::{Identities, Identity};
use crate::methods::{MethodName, MethodRequest, Methods, METHODS_FILTER};
use crate::metrics::{HubMetrics, SentLabels};

/// IoT Hub's answers to twin requests.
const TWIN_RESPONSES_FILTER: &str = "$iothub/twin/res/#";
/// IoT Hub's desired-properties patches.
const DESIRED_PATCHES_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";

/// IoT Hub's largest device-to-cloud message (256 KiB), which we apply to topic plus body.
pub const MAX_CLOUD_MESSAGE_BYTES: usize = 256 * 1024;
/// The `api-version` in the MQTT username (the one the current device SDKs send).
pub const API_VERSION: &str = "2021-04-12";
/// Publishes in flight per connection (rumqttc's packet-id ring).
const INFLIGHT: u16 = 100;
/// Requests the client's channel holds: a whole batch of the `$upstream` worker may go to one
/// module's connection, and `try_publish` must never find the channel full (the batch would
/// fail the same way on every retry).
const REQUEST_CAPACITY: usize = super::UPSTREAM_WINDOW + INFLIGHT as usize;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct MqttUpstreamConfig {
    /// The IoT Hub host name: in usernames and SAS audiences.
    pub iothub_hostname: String,
    /// The host to dial (the IoT Hub host name unless overridden); TLS checks the server
    /// certificate against this name.
    pub host: String,
    /// The port to dial (8883).
    pub port: u16,
    /// TLS client configuration (roots to trust).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Lifetime of each SAS token.
    pub token_ttl: Duration,
    /// How long a publish may wait for its PUBACK before the connection is given up (and
    /// everything in flight resent on the next): edgeHub's `CloudOperationTimeoutSecs`, 20 s.
    pub ack_timeout: Duration,
    /// Reconnect backoff: first delay.
    pub backoff_min: Duration,
    /// Reconnect backoff: longest delay.
    pub backoff_max: Duration,
    /// The wall clock SAS tokens are issued by.
    pub clock: Arc<dyn Clock>,
    /// The hub's direct-method targets: when set, each connection subscribes to its module's
    /// direct methods and relays the cloud's requests to the module through them.
    pub methods: Option<Arc<Methods>>,
    /// The module twins: when set, each connection subscribes to `$iothub/twin/res/#` and
    /// `$iothub/twin/PATCH/properties/desired/#`, so `upstream::twin_sync` can send their
    /// reported properties, read the twin and take IoT Hub's desired patches on it.
    pub twins: Option<Arc<crate::twin::Twins>>,
    /// How long a module has to answer a direct method from the cloud (IoT Hub's MQTT request
    /// does not carry the caller's timeout; 30 s, the default of IoT Hub and edgeHub).
    pub method_timeout: Duration,
}

impl MqttUpstreamConfig {
    /// Defaults for `iothub_hostname`, dialled at `host:port`, trusting `tls`.
    pub fn new(
        iothub_hostname: &str,
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        MqttUpstreamConfig {
            iothub_hostname: iothub_hostname.to_owned(),
            host: host.to_owned(),
            port,
            tls,
            keep_alive: Duration::from_secs(60),
            token_ttl: Duration::from_secs(3600),
            ack_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            methods: None,
            twins: None,
            method_timeout: Duration::from_secs(
                crate::methods::request::DEFAULT_RESPONSE_TIMEOUT_SECS,
            ),
        }
    }

    /// Delay before reconnect attempt number `failures` (≥ 1): doubling from the minimum, capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_min
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// The TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// The extra CA file cannot be read or holds no certificate.
    #[error("upstream CA {path}: {source}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        source: CaError,
    },
    /// No root to trust at all.
    #[error(
        "no CA to trust for the upstream conn: no system bundle found \
         (/etc/ssl/certs/ca-certificates.crt) and no --upstream-ca given"
    )]
    NoRoots,
    /// rustls refused the configuration.
    #[error("upstream TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What is wrong with the extra CA file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// It cannot be read, or is not PEM.
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// It holds no certificate.
    #[error("no PEM certificate in it")]
    Empty,
    /// A certificate in it cannot be a trust anchor.
    #[error("not a usable CA certificate: {0}")]
    Unusable(#[source] rustls::Error),
}

/// System CA bundles, as Debian and Red Hat lay them out.
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// A TLS client configuration (ring) trusting the system bundle, if any, plus `extra_ca`.
pub fn client_tls_config(
    extra_ca: Option<&Path>,
) -> Result<rustls::ClientConfig, UpstreamTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(bundle) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
        if let Ok(certs) = CertificateDer::pem_file_iter(bundle) {
            // A system bundle with an odd entry still gives us the rest.
            let (added, ignored) = roots.add_parsable_certificates(certs.flatten());
            tracing::debug!(bundle = %bundle.display(), added, ignored, "system CA bundle");
        }
    }
    if let Some(path) = extra_ca {
        let ca_err = |source: CaError| UpstreamTlsError::Ca {
            path: path.display().to_string(),
            source,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.into()))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(e.into()))?;
        if certs.is_empty() {
            return Err(ca_err(CaError::Empty));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_err(CaError::Unusable(e)))?;
        }
    }
    if roots.is_empty() {
        return Err(UpstreamTlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Where to answer a publish, and when it was handed to the connection.
type Waiter = (Instant, oneshot::Sender<Result<(), PublishError>>);

/// One identity's connection state, shared by its connection task and the publishers.
#[derive(Debug)]
struct LinkState {
    /// The client of the connection being made or in use; `None` while offline.
    client: Option<AsyncClient>,
    /// Why there is no connection (for `Offline` answers).
    offline_reason: String,
    /// The token is due for renewal: take nothing new, so what is in flight drains and the
    /// connection can be replaced without resending anything.
    renewing: bool,
    inflight: Inflight<Waiter>,
    /// Twin requests waiting for IoT Hub's answer, by `$rid`; dropped (answered "lost") with
    /// the connection.
    twin_waiters: HashMap<String, oneshot::Sender<TwinResponse>>,
    /// The last twin `$rid` used (never reused while the hub runs).
    last_rid: u64,
    /// Connections that came up so far (the current one's number while online).
    generation: u64,
}

/// Desired patches IoT Hub sent that the twin sync has not taken yet (in arrival order).
#[derive(Debug, Default)]
pub(crate) struct DesiredInbox {
    /// Each patch (without `$version`) and its `$version`.
    pub patches: VecDeque<(serde_json::Map<String, serde_json::Value>, u64)>,
    /// A patch was dropped (inbox full, or not readable): read the whole twin again.
    pub missed: bool,
}

/// Desired patches kept for the twin sync at most; more and the twin is read again instead.
const DESIRED_INBOX: usize = 64;

/// IoT Hub's answer to a twin request: `$iothub/twin/res/{status}/?$rid={rid}[&$version=n]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwinResponse {
    /// The status.
    pub status: u16,
    /// The `$version` it names, if any.
    pub version: Option<u64>,
    /// The body.
    pub body: Bytes,
}

/// Why a twin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TwinRequestError {
    /// There is no connection to send it on.
    #[error(transparent)]
    Offline(#[from] PublishError),
    /// The connection ended before IoT Hub answered.
    #[error("the connection to IoT Hub ended before it answered")]
    Lost,
    /// No answer in time.
    #[error("IoT Hub did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug)]
pub(crate) struct CloudConnection {
    identity: Identity,
    state: Mutex<LinkState>,
    /// The connection's number while it is up (CONNACK received and not lost since), else
    /// `None`.
    online: watch::Sender<Option<u64>>,
    /// IoT Hub's desired patches for the twin sync, and a count bumped at each arrival.
    desired_in: Mutex<DesiredInbox>,
    desired_arrived: watch::Sender<u64>,
}

impl CloudConnection {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // A publisher that panicked mid-update cannot leave the state worse than "answer
        // everything not acknowledged as lost", which is what the connection does on its next event.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection: every waiter is answered `Lost`.
    fn disconnect(&self, reason: &str) {
        // Offline before the client goes: whoever waits for "online" never finds it with no
        // client to send on.
        self.online.send_replace(None);
        let waiters = {
            let mut state = self.lock();
            state.twin_waiters.clear();
            state.client = None;
            state.offline_reason = reason.to_owned();
            state.renewing = false;
            state.inflight.lost()
        };
        for (_, w) in waiters {
            let _ = w.send(Err(PublishError::Lost));
        }
    }

    /// The connection's number while it is up, else `None`; the receiver changes when it
    /// goes up or down.
    pub(crate) fn online(&self) -> watch::Receiver<Option<u64>> {
        self.online.subscribe()
    }

    /// Takes the desired patches IoT Hub sent since the last call, and whether one was missed.
    pub(crate) fn take_desired(&self) -> DesiredInbox {
        std::mem::take(&mut *self.desired_in.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes when a desired patch from IoT Hub arrives.
    pub(crate) fn desired_arrivals(&self) -> watch::Receiver<u64> {
        self.desired_arrived.subscribe()
    }

    /// Keeps a desired patch from IoT Hub for the twin sync (`None`: one that could not be
    /// read, so the twin must be read again).
    fn desired_arrived(&self, patch: Option<(serde_json::Map<String, serde_json::Value>, u64)>) {
        {
            let mut inbox = self.desired_in.lock().unwrap_or_else(|p| p.into_inner());
            match patch {
                Some(p) if inbox.patches.len() < DESIRED_INBOX => inbox.patches.push_back(p),
                _ => inbox.missed = true,
            }
        }
        self.desired_arrived.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sends a twin request (`path` is the topic up to `?`, e.g.
    /// `$iothub/twin/PATCH/properties/reported/`) under a fresh `$rid` and waits up to
    /// `timeout` for IoT Hub's answer.
    pub(crate) async fn twin_request(
        &self,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<TwinResponse, TwinRequestError> {
        // The waiter is in place before the request goes: the answer cannot come first.
        let (rid, answer) = {
            let mut state = self.lock();
            state.last_rid += 1;
            let rid = format!("{:x}", state.last_rid);
            let (tx, rx) = oneshot::channel();
            state.twin_waiters.insert(rid.clone(), tx);
            (rid, rx)
        };
        if let Err(e) = self.send_unacknowledged(format!("{path}?$rid={rid}"), body) {
            self.lock().twin_waiters.remove(&rid);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(TwinRequestError::Lost),
            Err(_) => {
                self.lock().twin_waiters.remove(&rid);
                Err(TwinRequestError::Timeout(timeout))
            }
        }
    }

    /// Writes `payload` on `topic` at QoS 0 on the connection in use (a direct-method answer
    /// or a twin request: the cloud answers those with a publish of its own, not a PUBACK).
    fn send_unacknowledged(&self, topic: String, payload: Bytes) -> Result<(), PublishError> {
        let mut state = self.lock();
        let Some(client) = state.client.clone() else {
            return Err(PublishError::Offline(state.offline_reason.clone()));
        };
        match client.try_publish(topic, QoS::AtMostOnce, false, payload.to_vec()) {
            Ok(()) => {
                state.inflight.queued_unacknowledged();
                Ok(())
            }
            Err(e) => Err(PublishError::Offline(format!(
                "the MQTT client took no more requests: {e}"
            ))),
        }
    }

    async fn publish(&self, messages: Vec<CloudMessage>) -> Vec<Result<(), PublishError>> {
        enum Answer {
            Now(Result<(), PublishError>),
            Later(oneshot::Receiver<Result<(), PublishError>>),
        }
        let answers: Vec<Answer> = {
            let mut state = self.lock();
            let mut stopped: Option<String> = None;
            let mut answers = Vec::with_capacity(messages.len());
            for m in messages {
                let size = m.topic.len() + m.payload.len();
                if size > MAX_CLOUD_MESSAGE_BYTES {
                    answers.push(Answer::Now(Err(PublishError::TooLarge {
                        size,
                        limit: MAX_CLOUD_MESSAGE_BYTES,
                    })));
                    continue;
                }
                if let Some(reason) = &stopped {
                    answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                    continue;
                }
                let client = state.client.clone().filter(|_| !state.renewing);
                let Some(client) = client else {
                    let reason = state.offline_reason.clone();
                    answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                    stopped = Some(reason);
                    continue;
                };
                match client.try_publish(m.topic, QoS::AtLeastOnce, false, m.payload.to_vec()) {
                    Ok(()) => {
                        let (tx, rx) = oneshot::channel();
                        state.inflight.queued((Instant::now(), tx));
                        answers.push(Answer::Later(rx));
                    }
                    Err(e) => {
                        let reason = format!("the MQTT client took no more requests: {e}");
                        answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                        stopped = Some(reason);
                    }
                }
            }
            answers
        };
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            out.push(match a {
                Answer::Now(r) => r,
                Answer::Later(rx) => rx.await.unwrap_or(Err(PublishError::Lost)),
            });
        }
        out
    }
}

/// Everything the connection tasks share.
struct Shared {
    config: MqttUpstreamConfig,
    identities: Arc<Identities>,
    metrics: Arc<HubMetrics>,
    on_online: Box<dyn Fn() + Send + Sync>,
}

/// A connection and the task that runs it.
type ConnectionTask = (Arc<CloudConnection>, JoinHandle<()>);

/// The MQTT upstream: a connection task per identity, started on its first message.
pub struct MqttUpstream {
    shared: Arc<Shared>,
    connections: Mutex<HashMap<Identity, ConnectionTask>>,
    /// Tasks that live as long as this upstream: the one opening the connection of each module
    /// that becomes a direct-method target, and the twin sync's.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for MqttUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUpstream")
            .field("host", &self.shared.config.host)
            .field("port", &self.shared.config.port)
            .finish_non_exhaustive()
    }
}

impl Drop for MqttUpstream {
    fn drop(&mut self) {
        let connections = self
            .connections
            .get_mut()
            .unwrap_or_else(|p| p.into_inner());
        for (_, (_, task)) in connections.drain() {
            task.abort();
        }
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl MqttUpstream {
    /// An upstream with `config`, signing tokens with the keys in `identities`; `on_online` is
    /// called every time a connection comes up.
    pub fn new(
        config: MqttUpstreamConfig,
        identities: Arc<Identities>,
        metrics: Arc<HubMetrics>,
        on_online: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        MqttUpstream {
            shared: Arc::new(Shared {
                config,
                identities,
                metrics,
                on_online: Box::new(on_online),
            }),
            connections: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Opens the connection of every module that is a direct-method target now or becomes one
    /// later (the cloud can reach a module's methods only over its connection), for as long as
    /// this upstream lives. Does nothing without [`MqttUpstreamConfig::methods`].
    pub fn follow_method_targets(self: &Arc<Self>) {
        let Some(methods) = self.shared.config.methods.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let mut attached = methods.watch_attached();
        let task = tokio::spawn(async move {
            loop {
                // Marked seen before looking: an attach after the look is never missed.
                attached.borrow_and_update();
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                for identity in methods.targets() {
                    upstream.conn(&identity);
                }
                drop(upstream);
                if attached.changed().await.is_err() {
                    return;
                }
            }
        });
        self.keep_task(task);
    }

    /// Keeps `task` until this upstream is dropped, which aborts it.
    pub(crate) fn keep_task(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &MqttUpstreamConfig {
        &self.shared.config
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &HubMetrics {
        &self.shared.metrics
    }

    pub(crate) fn conn(&self, identity: &Identity) -> Arc<CloudConnection> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((conn, _)) = connections.get(identity) {
            return Arc::clone(conn);
        }
        let conn = Arc::new(CloudConnection {
            identity: identity.clone(),
            state: Mutex::new(LinkState {
                client: None,
                offline_reason: "connecting".to_owned(),
                renewing: false,
                inflight: Inflight::default(),
                twin_waiters: HashMap::new(),
                last_rid: 0,
                generation: 0,
            }),
            online: watch::channel(None).0,
            desired_in: Mutex::new(DesiredInbox::default()),
            desired_arrived: watch::channel(0).0,
        });
        // The first connection attempt starts before this returns, so the caller's messages
        // wait for it instead of failing at once.
        let first = start_connection(&self.shared, &conn);
        let task = tokio::spawn(run_connection(
            Arc::clone(&self.shared),
            Arc::clone(&conn),
            first,
        ));
        connections.insert(identity.clone(), (Arc::clone(&conn), task));
        conn
    }
}

impl Upstream for MqttUpstream {
    async fn publish(
        &self,
        identity: &Identity,
        messages: Vec<CloudMessage>,
    ) -> Vec<Result<(), PublishError>> {
        let conn = self.conn(identity);
        conn.publish(messages).await
    }
}

/// Why an identity's connection to IoT Hub is down: logged, and the reason publishes are
/// answered `Offline` with.
#[derive(Debug, thiserror::Error)]
enum DownReason {
    /// The identity has no key to sign a token with.
    #[error(transparent)]
    NoCredentials(PublishError),
    /// The connection attempt failed (unreachable, TLS, refused).
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<ConnectionError>),
    /// The first packet was not the CONNACK.
    #[error("expected CONNACK, got {0}")]
    NotConnAck(String),
    /// A publish waited longer than the acknowledgement timeout.
    #[error("no PUBACK within {0:?}: giving up the connection")]
    AckTimeout(Duration),
    /// The broker acknowledged a later publish before an earlier one.
    #[error("the broker acknowledged out of order (packet id {0} still awaited)")]
    OutOfOrder(u16),
    /// What the client reported does not fit what was sent.
    #[error(transparent)]
    Anomaly(#[from] Anomaly),
    /// The broker ended the connection.
    #[error("the broker sent DISCONNECT")]
    Disconnect,
    /// The connection failed once up.
    #[error("connection lost: {0}")]
    Lost(#[source] Box<ConnectionError>),
    /// The connection's state machine met an event it did not expect (a bug).
    #[error("{}", state::UNEXPECTED)]
    Unexpected,
}

/// Makes a fresh client for `connection` and installs it, so publishes queue while it connects.
/// `Err` when the identity has no key.
fn start_connection(
    shared: &Shared,
    conn: &CloudConnection,
) -> Result<(EventLoop, Instant), DownReason> {
    let identity = &conn.identity;
    let Some(key) = shared.identities.stored_key(identity) else {
        let reason = PublishError::NoCredentials(identity.to_string());
        conn.lock().offline_reason = reason.to_string();
        return Err(DownReason::NoCredentials(reason));
    };
    let config = &shared.config;
    let resource = sas::resource_uri(
        &config.iothub_hostname,
        identity.device.as_str(),
        Some(identity.module.as_str()),
    );
    let issued = Instant::now();
    let token = sas::generate(
        &resource,
        &key,
        config.clock.now().0 / 1000 + config.token_ttl.as_secs(),
    );
    let username = format!(
        "{}/{}/{}/?api-version={API_VERSION}",
        config.iothub_hostname, identity.device, identity.module
    );
    let mut options = MqttOptions::new(identity.to_string(), config.host.clone(), config.port);
    options
        .set_credentials(username, token)
        .set_keep_alive(config.keep_alive)
        .set_clean_session(true)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(
            MAX_CLOUD_MESSAGE_BYTES + 4096,
            MAX_CLOUD_MESSAGE_BYTES + 4096,
        )
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&config.tls),
        )));
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    if config.methods.is_some() {
        // Queued behind the CONNECT: a fresh client's channel has room, so this cannot fail
        // but by a bug, which the log shows (the module's methods are then unreachable from
        // the cloud until the next connection).
        if let Err(e) = client.try_subscribe(METHODS_FILTER, QoS::AtMostOnce) {
            tracing::warn!(%identity, "cannot subscribe to direct methods: {e}");
        }
    }
    if config.twins.is_some() {
        // Before the twin sync's GET (requests go in order), so no desired patch made after
        // the document it reads is missed.
        for filter in [TWIN_RESPONSES_FILTER, DESIRED_PATCHES_FILTER] {
            if let Err(e) = client.try_subscribe(filter, QoS::AtMostOnce) {
                tracing::warn!(%identity, filter, "cannot subscribe to twin topics: {e}");
            }
        }
    }
    conn.lock().client = Some(client);
    Ok((eventloop, issued))
}

/// A fixed word for why a connection attempt or connection failed (a metrics label).
fn failure_reason(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        | ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "not_authorized"
        }
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::Tls(_) => "tls",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        ConnectionError::Io(_) => "network",
        _ => "protocol",
    }
}

/// One event of the connection's state machine, with the reason a connection is down.
type LinkEvent = state::Event<DownReason>;

/// Logs and counts that the connection of `identity` is up, and calls the `on_online` hook.
fn went_online(shared: &Shared, identity: &Identity, offline_since: &mut Option<Instant>) {
    tracing::info!(%identity, "upstream connected");
    shared.metrics.upstream().online(identity);
    if let Some(since) = offline_since.take() {
        shared
            .metrics
            .upstream()
            .offline_for(identity, since.elapsed());
    }
    (shared.on_online)();
}

/// Handles one thing the client reported on a live connection: a PUBACK answers its waiter.
/// Returns why the connection must end, if it must.
fn on_event(
    shared: &Shared,
    conn: &Arc<CloudConnection>,
    event: Result<Event, ConnectionError>,
    acked_any: &mut bool,
) -> Option<DownReason> {
    let identity = &conn.identity;
    let mut state = conn.lock();
    match event {
        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
            state.inflight.sent(pkid).err().map(DownReason::from)
        }
        Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => Some(DownReason::OutOfOrder(pkid)),
        Ok(Event::Incoming(Packet::PubAck(ack))) => match state.inflight.acked(ack.pkid) {
            Ok((handed_at, waiter)) => {
                drop(state);
                *acked_any = true;
                let _ = waiter.send(Ok(()));
                shared.metrics.upstream().acked(identity);
                shared
                    .metrics
                    .message_send_duration("upstream", handed_at.elapsed());
                shared.metrics.message_sent_with(&SentLabels {
                    from: identity.to_string(),
                    to: "upstream".to_owned(),
                    ..SentLabels::default()
                });
                None
            }
            Err(a) => Some(DownReason::from(a)),
        },
        Ok(Event::Incoming(Packet::Disconnect)) => Some(DownReason::Disconnect),
        Ok(Event::Incoming(Packet::Publish(publish))) => {
            drop(state);
            on_cloud_publish(shared, conn, &publish.topic, publish.payload);
            None
        }
        Ok(Event::Incoming(Packet::SubAck(ack))) => {
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
            {
                tracing::warn!(%identity, "IoT Hub refused a subscription: {:?}", ack.return_codes);
            }
            None
        }
        Ok(_) => None,
        // A lost connection is counted by `edgehub_upstream_offline`, not as a failed
        // connection attempt.
        Err(e) => Some(DownReason::Lost(Box::new(e))),
    }
}

/// The method name and `$rid` of a direct-method request topic,
/// `$iothub/methods/POST/{name}/?$rid={rid}[&…]`; `None` if it is not one.
fn parse_method_request(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("$iothub/methods/POST/")?;
    let (name, query) = rest.split_once("/?")?;
    let rid = query.split('&').find_map(|p| p.strip_prefix("$rid="))?;
    Some((name, rid)).filter(|(_, rid)| !rid.is_empty())
}

/// The status, `$rid` and `$version` of a twin answer,
/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`; `None` if it is not one.
fn parse_twin_response(topic: &str) -> Option<(u16, &str, Option<u64>)> {
    let rest = topic.strip_prefix("$iothub/twin/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let mut rid = None;
    let mut version = None;
    for pair in query.split('&') {
        if let Some(r) = pair.strip_prefix("$rid=") {
            rid = Some(r);
        } else if let Some(v) = pair.strip_prefix("$version=") {
            version = v.parse().ok();
        }
    }
    Some((status, rid?, version))
}

/// A desired patch from IoT Hub, `$iothub/twin/PATCH/properties/desired/?$version={n}` with a
/// JSON object (its own `$version` too): the members without `$version`, and the version (the
/// topic's, else the body's). `None` if the topic is not one; `Some(None)` if it is one that
/// cannot be read.
#[allow(clippy::type_complexity)]
fn parse_desired_patch(
    topic: &str,
    payload: &[u8],
) -> Option<Option<(serde_json::Map<String, serde_json::Value>, u64)>> {
    let query = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/")?;
    let from_topic = query
        .strip_prefix('?')
        .unwrap_or(query)
        .split('&')
        .find_map(|p| p.strip_prefix("$version="))
        .and_then(|v| v.parse::<u64>().ok());
    let Ok(serde_json::Value::Object(mut patch)) = serde_json::from_slice(payload) else {
        return Some(None);
    };
    let from_body = patch
        .remove(crate::twin::document::VERSION_KEY)
        .and_then(|v| v.as_u64());
    Some(from_topic.or(from_body).map(|version| (patch, version)))
}

/// A publish from the cloud: a twin answer completes its request; a desired patch is kept
/// for the twin sync; a direct-method request is relayed to the module (in a task of its
/// own, so the connection keeps serving) and its answer sent back; anything else is logged
/// and ignored.
fn on_cloud_publish(shared: &Shared, conn: &Arc<CloudConnection>, topic: &str, payload: Bytes) {
    let identity = &conn.identity;
    if shared.config.twins.is_some() {
        if let Some(patch) = parse_desired_patch(topic, &payload) {
            if patch.is_none() {
                tracing::warn!(%identity, topic, "a desired patch from IoT Hub that cannot be read; reading the twin again");
            }
            conn.desired_arrived(patch);
            return;
        }
    }
    if let Some((status, rid, version)) = parse_twin_response(topic) {
        let waiter = conn.lock().twin_waiters.remove(rid);
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(TwinResponse {
                    status,
                    version,
                    body: payload,
                });
            }
            None => tracing::debug!(%identity, rid, "a twin answer nobody waits for (late)"),
        }
        return;
    }
    let (Some(methods), Some((name, rid))) =
        (shared.config.methods.clone(), parse_method_request(topic))
    else {
        tracing::warn!(%identity, topic, "ignored a publish from IoT Hub");
        return;
    };
    let rid = rid.to_owned();
    let request = match MethodName::new(name) {
        Ok(name) => MethodRequest {
            name,
            payload,
            response_timeout: shared.config.method_timeout,
            connect_timeout: Duration::ZERO,
        },
        Err(e) => {
            let body = serde_json::json!({ "message": e.to_string() }).to_string();
            answer_cloud(conn, i32::from(e.status()), &rid, body.into());
            return;
        }
    };
    tracing::debug!(%identity, method = name, rid, "direct method from IoT Hub");
    let conn = Arc::clone(conn);
    // Not awaited: it ends with its answer (at most the method timeout).
    drop(tokio::spawn(async move {
        let (status, body) = match methods.invoke(&conn.identity, &request).await {
            Ok(response) => (response.status, response.payload),
            Err(e) => {
                tracing::info!(
                    identity = %conn.identity,
                    method = %request.name,
                    "direct method from IoT Hub: {e}"
                );
                let body = serde_json::json!({ "message": e.to_string() }).to_string();
                (i32::from(e.status()), Bytes::from(body))
            }
        };
        answer_cloud(&conn, status, &rid, body);
    }));
}

/// Sends a direct-method answer to the cloud, or logs why it cannot go.
fn answer_cloud(conn: &CloudConnection, status: i32, rid: &str, body: Bytes) {
    let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
    if let Err(e) = conn.send_unacknowledged(topic, body) {
        tracing::warn!(identity = %conn.identity, "a direct-method answer to IoT Hub was dropped: {e}");
    }
}

/// The `Serve` action: says the connection is online, then serves the established connection until it
/// ends ([`state::Event::Lost`], [`state::Event::AckTimedOut`]) or its token is due and what was
/// in flight has drained ([`state::Event::TokenDue`]).
async fn serve(
    shared: &Shared,
    conn: &Arc<CloudConnection>,
    eventloop: &mut EventLoop,
    issued: Instant,
    offline_since: &mut Option<Instant>,
) -> LinkEvent {
    let identity = &conn.identity;
    went_online(shared, identity, offline_since);
    let generation = {
        let mut state = conn.lock();
        state.generation = state.generation.wrapping_add(1);
        state.generation
    };
    conn.online.send_replace(Some(generation));
    let renew_after = shared.config.token_ttl.mul_f64(0.75);
    let up_since = Instant::now();
    let mut acked_any = false;
    loop {
        let oldest = conn.lock().inflight.oldest().map(|(at, _)| *at);
        let event = match oldest {
            // Dropping the poll on a timeout is safe: the whole event loop is dropped with it.
            Some(at) => match tokio::time::timeout_at(
                (at + shared.config.ack_timeout).into(),
                eventloop.poll(),
            )
            .await
            {
                Ok(event) => event,
                Err(_) => {
                    return LinkEvent::AckTimedOut {
                        reason: DownReason::AckTimeout(shared.config.ack_timeout),
                        acked_any,
                    }
                }
            },
            None => eventloop.poll().await,
        };
        let anomaly = on_event(shared, conn, event, &mut acked_any);
        if let Some(reason) = anomaly {
            return LinkEvent::Lost {
                reason,
                acked_any,
                up_for: up_since.elapsed(),
            };
        }
        if issued.elapsed() >= renew_after {
            let mut state = conn.lock();
            // Stop taking messages, so the connection drains even under steady traffic.
            state.renewing = true;
            state.offline_reason = "renewing the SAS token".to_owned();
            if state.inflight.is_empty() {
                return LinkEvent::TokenDue;
            }
        }
    }
}

/// The `Connect` action (after `start_connection`): waits for the CONNACK.
async fn connect(
    shared: &Shared,
    identity: &Identity,
    started: Result<(EventLoop, Instant), DownReason>,
    connection: &mut Option<(EventLoop, Instant)>,
) -> LinkEvent {
    let (mut eventloop, issued) = match started {
        Ok(started) => started,
        Err(reason) => return LinkEvent::ConnectFailed(reason),
    };
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {
            *connection = Some((eventloop, issued));
            LinkEvent::Connected
        }
        Ok(other) => LinkEvent::ConnectFailed(DownReason::NotConnAck(format!("{other:?}"))),
        Err(e) => {
            shared
                .metrics
                .upstream()
                .connect_failed(identity, failure_reason(&e));
            LinkEvent::ConnectFailed(DownReason::Connect(Box::new(e)))
        }
    }
}

/// The `Backoff` action: gives the connection up (every waiter is answered `Lost`), logs why,
/// and waits `delay`, counting the time offline.
async fn back_off(
    shared: &Shared,
    conn: &CloudConnection,
    reason: &DownReason,
    delay: Duration,
    offline_since: &mut Option<Instant>,
) -> LinkEvent {
    let identity = &conn.identity;
    conn.disconnect(&reason.to_string());
    if offline_since.is_none() {
        *offline_since = Some(Instant::now());
        shared.metrics.upstream().went_offline(identity);
    }
    tracing::warn!(
        %identity,
        host = %shared.config.host,
        port = shared.config.port,
        retry_in_ms = delay.as_millis() as u64,
        "upstream offline: {reason}"
    );
    let step = Instant::now();
    tokio::time::sleep(delay).await;
    shared
        .metrics
        .upstream()
        .offline_for(identity, step.elapsed());
    if let Some(since) = offline_since.as_mut() {
        *since = Instant::now();
    }
    LinkEvent::BackoffElapsed
}

/// The driver of one identity's connection ([`UpstreamState`]): performs each action and reports what
/// happened, for as long as the hub runs. `first` is the connection [`MqttUpstream::connection`]
/// already started.
async fn run_connection(
    shared: Arc<Shared>,
    conn: Arc<CloudConnection>,
    first: Result<(EventLoop, Instant), DownReason>,
) {
    let identity = conn.identity.clone();
    let mut first = Some(first);
    // The connection between `Connect` and the end of `Serve`.
    let mut connection: Option<(EventLoop, Instant)> = None;
    // Since when the connection is offline, for `edgehub_upstream_offline_seconds` (a measurement,
    // not control state).
    let mut offline_since: Option<Instant> = None;
    let (mut state, mut action) = UpstreamState::start::<DownReason>();
    loop {
        let event = match &action {
            Action::Connect => {
                let started = first
                    .take()
                    .unwrap_or_else(|| start_connection(&shared, &conn));
                connect(&shared, &identity, started, &mut connection).await
            }
            Action::Renew => {
                connection = None;
                conn.disconnect("renewing the SAS token");
                tracing::info!(%identity, "upstream reconnecting to renew its token");
                let started = start_connection(&shared, &conn);
                connect(&shared, &identity, started, &mut connection).await
            }
            Action::Serve => match connection.as_mut() {
                Some((eventloop, issued)) => {
                    let issued = *issued;
                    serve(&shared, &conn, eventloop, issued, &mut offline_since).await
                }
                None => LinkEvent::Lost {
                    reason: DownReason::Unexpected,
                    acked_any: false,
                    up_for: Duration::ZERO,
                },
            },
            Action::Backoff { reason, delay } => {
                connection = None;
                back_off(&shared, &conn, reason, *delay, &mut offline_since).await
            }
        };
        debug_assert!(
            action.outcomes().contains(&event.kind()),
            "{action:?} cannot produce {event:?}"
        );
        (state, action) = state.on(
            event,
            |failures| shared.config.backoff(failures),
            || DownReason::Unexpected,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn method_request_topics_give_name_and_rid() {
        assert_eq!(
            parse_method_request("$iothub/methods/POST/reboot/?$rid=1f"),
            Some(("reboot", "1f"))
        );
        assert_eq!(
            parse_method_request("$iothub/methods/POST/m/?x=1&$rid=a"),
            Some(("m", "a"))
        );
        for t in [
            "$iothub/methods/POST/m/",
            "$iothub/methods/POST/m/?$rid=",
            "$iothub/methods/res/200/?$rid=1",
            "$iothub/twin/PATCH/properties/desired/?$version=2",
        ] {
            assert_eq!(parse_method_request(t), None, "{t}");
        }
    }

    #[test]
    fn desired_patches_give_members_and_version_from_the_topic_else_the_body() {
        let body = br#"{"rate": 2, "mode": null, "$version": 7}"#;
        let (patch, version) =
            parse_desired_patch("$iothub/twin/PATCH/properties/desired/?$version=7", body)
                .unwrap()
                .unwrap();
        assert_eq!(
            (serde_json::Value::Object(patch), version),
            (serde_json::json!({"rate": 2, "mode": null}), 7)
        );
        let (_, version) = parse_desired_patch("$iothub/twin/PATCH/properties/desired/", body)
            .unwrap()
            .unwrap();
        assert_eq!(version, 7);
        for bad in [&b"[1]"[..], b"{oops", br#"{"a": 1}"#] {
            assert_eq!(
                parse_desired_patch("$iothub/twin/PATCH/properties/desired/", bad),
                Some(None),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_desired_patch("$iothub/twin/res/200/?$rid=1", body),
            None
        );
    }

    #[test]
    fn twin_answers_give_status_rid_and_version() {
        assert_eq!(
            parse_twin_response("$iothub/twin/res/204/?$rid=a&$version=7"),
            Some((204, "a", Some(7)))
        );
        assert_eq!(
            parse_twin_response("$iothub/twin/res/200/?$rid=3"),
            Some((200, "3", None))
        );
        for t in [
            "$iothub/twin/res/204/",
            "$iothub/twin/res/ok/?$rid=1",
            "$iothub/twin/res/204/?$version=2",
            "$iothub/methods/res/200/?$rid=1",
        ] {
            assert_eq!(parse_twin_response(t), None, "{t}");
        }
    }

    /// A CA file with no certificate is refused by name, with the words it had as a string.
    #[test]
    fn a_ca_file_without_a_certificate_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("edgehub-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "no certificate here\n").unwrap();
        let err = client_tls_config(Some(&path)).err();
        std::fs::remove_dir_all(&dir).unwrap();
        let Some(err) = err else {
            panic!("an empty CA file was accepted");
        };
        assert!(matches!(
            &err,
            UpstreamTlsError::Ca {
                source: CaError::Empty,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            format!("upstream CA {}: no PEM certificate in it", path.display())
        );
    }
}
