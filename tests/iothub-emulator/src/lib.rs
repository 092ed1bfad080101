//! An emulator of a **subset** of Azure IoT Hub's MQTT device/module endpoint, for tests of the
//! hub's upstream link. It is not IoT Hub; README.md lists exactly what it does and does not do.
//!
//! Guarantees:
//! - MQTT 3.1.1 over TLS (1.2/1.3) with the emulator's own CA ([`Emulator::ca_pem`]); the
//!   listening address ([`Emulator::addr`]) stays the same across [`Emulator::go_away`] /
//!   [`Emulator::come_back`].
//! - A CONNECT is accepted only for a configured identity whose client id, user name and SAS
//!   token (signature, expiry, audience) are right, and while logins are not refused; every other
//!   CONNECT is answered with CONNACK 5 (not authorized) and the connection closes.
//! - A second accepted connection of an identity closes the first.
//! - A telemetry PUBLISH is recorded **before** its PUBACK is written, so a PUBACK the client sees
//!   always means the message is in [`Emulator::received`]. Records keep arrival order: `seq` is
//!   the index in [`Emulator::received_all`], strictly increasing with no gaps.
//! - A connection that is dropped, replaced, or breaks a rule records nothing after that point
//!   and acknowledges nothing it has not recorded; other connections are not affected.
//! - Waits ([`Emulator::wait_for_count`] and friends) are woken by the events themselves, never
//!   by polling.
//! - Dropping the [`Emulator`] stops listening and closes every connection.

#![warn(missing_docs)]

mod connection;
pub mod sas;
mod tls;
pub mod topic;
pub mod twin;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// An identity the emulator knows, with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKey {
    /// Device id.
    pub device: String,
    /// Module id; `None` for a device identity.
    pub module: Option<String>,
    /// The raw key bytes (the base64-decoded `SharedAccessKey`).
    pub key: Vec<u8>,
}

impl IdentityKey {
    /// A module identity `device/module`.
    pub fn module(
        device: impl Into<String>,
        module: impl Into<String>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        IdentityKey {
            device: device.into(),
            module: Some(module.into()),
            key: key.into(),
        }
    }

    /// A device identity.
    pub fn device(device: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        IdentityKey {
            device: device.into(),
            module: None,
            key: key.into(),
        }
    }

    /// `device/module` or `device`: the MQTT client id and the key of [`Emulator::received`].
    pub fn id(&self) -> String {
        match &self.module {
            Some(m) => format!("{}/{m}", self.device),
            None => self.device.clone(),
        }
    }
}

/// How to start an [`Emulator`].
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The IoT Hub host name expected in user names and token audiences, and put in the server
    /// certificate's SANs.
    pub hostname: String,
    /// Where to listen; port 0 picks a free port, kept for the emulator's lifetime.
    pub bind: SocketAddr,
    /// The identities that may connect.
    pub identities: Vec<IdentityKey>,
    /// Directory where `ca.pem` is written (created if missing).
    pub tls_dir: PathBuf,
}

/// Why the emulator could not start or listen again.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating the CA or the server certificate failed.
    #[error("certificate generation failed: {0}")]
    Certificate(String),
    /// Building the TLS server configuration failed.
    #[error("TLS configuration failed: {0}")]
    Tls(String),
}

/// A wait ran out of time before its condition held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}: wanted {wanted}, got {got}")]
pub struct WaitTimeout {
    /// What was awaited.
    pub what: String,
    /// The number waited for.
    pub wanted: u64,
    /// The number reached when time ran out.
    pub got: u64,
    /// How long the wait lasted.
    pub waited: Duration,
}

/// One recorded telemetry message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The authenticated identity, `device/module` or `device`.
    pub identity: String,
    /// The PUBLISH topic as sent, property bag included.
    pub topic: String,
    /// The message body.
    pub payload: bytes::Bytes,
    /// The decoded property bag, keys as on the wire after decoding (`$.mid`, `temp`, …).
    pub properties: BTreeMap<String, String>,
    /// The PUBLISH DUP flag.
    pub dup: bool,
    /// The PUBLISH QoS (0 or 1).
    pub qos: u8,
    /// Serial of the connection it came on (unique per emulator, from 1).
    pub connection: u64,
    /// Global arrival order: its index in [`Emulator::received_all`], from 0.
    pub seq: u64,
}

/// Why a CONNECT was answered with CONNACK 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// [`Emulator::refuse_logins`] was on.
    RefuseLogins,
    /// The client id is not `device` or `device/module`.
    BadClientId,
    /// The client id names no configured identity.
    UnknownIdentity,
    /// No user name or password.
    NoCredentials,
    /// The user name is not `{hostname}/{client id}/?api-version=…`.
    BadUserName,
    /// The password is not a SAS token.
    MalformedToken,
    /// A policy token (`skn`).
    PolicyToken,
    /// The token's `se` is past.
    Expired,
    /// The token's `sr` is not this identity on this hub.
    WrongAudience,
    /// The signature does not verify with the identity's key.
    BadSignature,
}

impl RefuseReason {
    fn of(e: &sas::SasError) -> RefuseReason {
        match e {
            sas::SasError::Malformed(_) => RefuseReason::MalformedToken,
            sas::SasError::PolicyToken => RefuseReason::PolicyToken,
            sas::SasError::Expired { .. } => RefuseReason::Expired,
            sas::SasError::Audience { .. } => RefuseReason::WrongAudience,
            sas::SasError::Signature => RefuseReason::BadSignature,
        }
    }
}

/// Counters of one identity (keyed by the client id as sent, for refusals).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentityStats {
    /// CONNECTs accepted.
    pub connects_accepted: u64,
    /// CONNECTs refused.
    pub connects_refused: u64,
    /// Publishes recorded.
    pub publishes: u64,
    /// Publishes swallowed while acks were off.
    pub publishes_swallowed: u64,
    /// Connections closed by [`Emulator::drop_connections`] or [`Emulator::go_away`].
    pub connections_dropped: u64,
    /// Connections closed because a newer one of the identity connected.
    pub connections_replaced: u64,
    /// Connections closed for breaking a rule (bad topic, QoS 2, malformed packet, …).
    pub protocol_violations: u64,
    /// SUBSCRIBEs granting `$iothub/methods/POST/#` (or a filter under it).
    pub method_subscriptions: u64,
    /// SUBSCRIBEs granting `$iothub/twin/PATCH/properties/desired/#` (or a filter under it).
    pub desired_subscriptions: u64,
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmulatorStats {
    /// TCP connections accepted.
    pub tcp_accepted: u64,
    /// CONNECTs accepted.
    pub connects_accepted: u64,
    /// CONNECTs refused (CONNACK 5).
    pub connects_refused: u64,
    /// Refusals by reason.
    pub refused_by_reason: BTreeMap<RefuseReason, u64>,
    /// Connections closed by [`Emulator::drop_connections`] or [`Emulator::go_away`].
    pub connections_dropped: u64,
    /// Connections closed because a newer one of the same identity connected.
    pub connections_replaced: u64,
    /// Connections closed for breaking a rule.
    pub protocol_violations: u64,
    /// Connections closed for silence past 1.5 × keep-alive (or no CONNECT in time).
    pub keep_alive_timeouts: u64,
    /// Publishes recorded.
    pub publishes: u64,
    /// Publishes swallowed while acks were off (not recorded, not acknowledged).
    pub publishes_swallowed: u64,
    /// Connections open now (TLS handshakes included).
    pub live_connections: u64,
    /// Twin GETs answered.
    pub twin_gets: u64,
    /// Reported-properties patches accepted.
    pub reported_patches: u64,
    /// Reported-properties patches refused (not a JSON object).
    pub reported_patches_refused: u64,
    /// Desired-properties patches sent to a connection.
    pub desired_patches_sent: u64,
    /// Direct methods sent to a connection.
    pub methods_invoked: u64,
    /// Method responses that matched an invocation of their identity.
    pub method_responses: u64,
    /// Per identity.
    pub per_identity: BTreeMap<String, IdentityStats>,
}

/// Why the emulator itself closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kill {
    Dropped,
    Replaced,
    Shutdown,
}

/// Records and counters, under one lock taken once per read burst.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) all: Vec<Received>,
    pub(crate) counts: HashMap<String, usize>,
    pub(crate) stats: EmulatorStats,
    /// Twins by identity (`device/module` or `device`), made on first use.
    pub(crate) twins: HashMap<String, twin::Twin>,
}

impl State {
    pub(crate) fn identity(&mut self, id: &str) -> &mut IdentityStats {
        self.stats.per_identity.entry(id.to_owned()).or_default()
    }
}

struct ConnEntry {
    identity: Option<String>,
    kill: watch::Sender<Option<Kill>>,
    /// Packets the emulator sends on its own (desired patches, method requests).
    push: mpsc::Sender<rumqttc::mqttbytes::v4::Packet>,
    /// What the connection subscribed to of the emulator's own publishes.
    subs: Subscriptions,
}

/// The emulator-initiated topics a connection subscribed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Subscriptions {
    /// `$iothub/twin/PATCH/properties/desired/#`.
    pub(crate) desired: bool,
    /// `$iothub/methods/POST/#`.
    pub(crate) methods: bool,
}

/// How many pushed packets a connection may have waiting to be written.
const PUSH_CAPACITY: usize = 256;

/// The answer of a direct method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    /// The status the method returned.
    pub status: u16,
    /// Its payload: JSON if it parses, else the bytes as a JSON string (lossy UTF-8).
    pub payload: serde_json::Value,
}

/// Why a direct method got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// The identity has no connection subscribed to methods (IoT Hub answers 404).
    #[error("{0} is not connected or not subscribed to methods")]
    NotConnected(String),
    /// The connection's outgoing queue is full.
    #[error("{0}'s connection is not reading")]
    Busy(String),
    /// No response within the timeout (IoT Hub answers 504).
    #[error("{identity} did not answer `{method}` within {waited:?}")]
    Timeout {
        /// The identity.
        identity: String,
        /// The method.
        method: String,
        /// How long the emulator waited.
        waited: Duration,
    },
}

/// Invocations waiting for their response, by request id.
type PendingMethods = HashMap<String, (String, oneshot::Sender<MethodResponse>)>;

struct ListenerTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// What the connections and the handle share.
pub(crate) struct Shared {
    pub(crate) hostname: String,
    pub(crate) identities: HashMap<String, IdentityKey>,
    addr: SocketAddr,
    ca_pem: PathBuf,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) refuse: AtomicBool,
    pub(crate) ack: AtomicBool,
    /// While `false`, reported patches are applied but not answered.
    pub(crate) answer_reported: AtomicBool,
    next_conn: AtomicU64,
    state: Mutex<State>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    /// Bumped after every change of `state`; waiters watch it.
    changed: watch::Sender<u64>,
    /// Connections open now.
    live: watch::Sender<u64>,
    listener: Mutex<Option<ListenerTask>>,
    methods: Mutex<PendingMethods>,
    next_rid: AtomicU64,
}

impl Shared {
    /// Locks the state (a poisoned lock still holds consistent counters: every critical
    /// section only pushes and increments).
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state, then wakes the waiters.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.state());
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
        r
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes connection `serial` the current one of `identity`, closing any older one.
    pub(crate) fn claim(&self, serial: u64, identity: &str) {
        let mut conns = self.conns();
        for (s, entry) in conns.iter() {
            if *s != serial && entry.identity.as_deref() == Some(identity) {
                let _ = entry.kill.send(Some(Kill::Replaced));
            }
        }
        if let Some(entry) = conns.get_mut(&serial) {
            entry.identity = Some(identity.to_owned());
        }
    }

    /// Records what connection `serial` subscribed to of the emulator's own publishes.
    pub(crate) fn subscribed(&self, serial: u64, subs: Subscriptions) {
        let identity = {
            let mut conns = self.conns();
            let Some(entry) = conns.get_mut(&serial) else {
                return;
            };
            entry.subs.desired |= subs.desired;
            entry.subs.methods |= subs.methods;
            entry.identity.clone()
        };
        // Counted once the subscription is in place, so a waiter can push at once.
        if let Some(identity) = identity.filter(|_| subs.desired || subs.methods) {
            self.update(|s| {
                let stats = s.identity(&identity);
                stats.method_subscriptions += u64::from(subs.methods);
                stats.desired_subscriptions += u64::from(subs.desired);
            });
        }
    }

    /// Queues `packet` on the connection of `identity` that subscribed to what `wants` asks
    /// for. `Err(false)`: no such connection; `Err(true)`: its queue is full.
    fn push(
        &self,
        identity: &str,
        wants: impl Fn(&Subscriptions) -> bool,
        packet: rumqttc::mqttbytes::v4::Packet,
    ) -> Result<(), bool> {
        let conns = self.conns();
        let entry = conns
            .values()
            .find(|e| e.identity.as_deref() == Some(identity) && wants(&e.subs))
            .ok_or(false)?;
        entry.push.try_send(packet).map_err(|_| true)
    }

    /// Completes the invocation `rid` if `identity` is the one it was sent to; returns whether
    /// it did.
    pub(crate) fn method_answered(
        &self,
        identity: &str,
        rid: &str,
        response: MethodResponse,
    ) -> bool {
        let mut pending = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get(rid) {
            Some((to, _)) if to == identity => {}
            _ => return false,
        }
        let Some((_, tx)) = pending.remove(rid) else {
            return false;
        };
        drop(pending);
        let _ = tx.send(response);
        self.update(|s| s.stats.method_responses += 1);
        true
    }

    /// Forgets connection `serial` (called once, when its task ends).
    pub(crate) fn leave(&self, serial: u64) {
        self.conns().remove(&serial);
        self.update(|s| s.stats.live_connections = s.stats.live_connections.saturating_sub(1));
        self.live.send_modify(|n| *n = n.saturating_sub(1));
    }

    fn kill_all(&self, why: Kill) {
        for entry in self.conns().values() {
            let _ = entry.kill.send(Some(why));
        }
    }

    fn spawn_connection(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let serial = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (kill_tx, kill_rx) = watch::channel(None);
        let (push, push_rx) = mpsc::channel(PUSH_CAPACITY);
        self.conns().insert(
            serial,
            ConnEntry {
                identity: None,
                kill: kill_tx,
                push,
                subs: Subscriptions::default(),
            },
        );
        self.live.send_modify(|n| *n += 1);
        self.update(|s| {
            s.stats.tcp_accepted += 1;
            s.stats.live_connections += 1;
        });
        tokio::spawn(connection::run(
            Arc::clone(self),
            tcp,
            peer,
            serial,
            kill_rx,
            push_rx,
        ));
    }

    fn listener(&self) -> MutexGuard<'_, Option<ListenerTask>> {
        self.listener.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn listen(self: &Arc<Self>) -> Result<(), EmulatorError> {
        if self.listener().is_some() {
            return Ok(());
        }
        let listener =
            TcpListener::bind(self.addr)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: self.addr,
                    source,
                })?;
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(accept_loop(Arc::clone(self), listener, stop_rx));
        let previous = self.listener().replace(ListenerTask { stop, handle });
        if let Some(previous) = previous {
            // A concurrent come_back won the race; keep one listener.
            let _ = previous.stop.send(true);
            previous.handle.abort();
        }
        Ok(())
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    shared.spawn_connection(tcp, peer);
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    tracing::info!(addr = %shared.addr, "stopped listening");
}

/// A running emulator. Share it by reference or in an `Arc`; every method takes `&self`.
/// Dropping it stops listening and closes every connection.
pub struct Emulator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.shared.addr)
            .field("hostname", &self.shared.hostname)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Generates the CA and server certificate, writes `ca.pem`, and starts listening. Must be
    /// called inside a Tokio runtime.
    pub async fn start(config: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        if config.hostname.is_empty() || config.hostname.contains('/') {
            return Err(EmulatorError::Config(format!(
                "host name `{}` is not a host name",
                config.hostname
            )));
        }
        let mut identities = HashMap::new();
        for identity in config.identities {
            if identity.device.is_empty()
                || identity.device.contains('/')
                || identity
                    .module
                    .as_deref()
                    .is_some_and(|m| m.is_empty() || m.contains('/'))
            {
                return Err(EmulatorError::Config(format!(
                    "identity `{}` is not device or device/module",
                    identity.id()
                )));
            }
            if let Some(dup) = identities.insert(identity.id(), identity) {
                return Err(EmulatorError::Config(format!(
                    "identity `{}` given twice",
                    dup.id()
                )));
            }
        }
        let tls = tls::TlsMaterial::generate(&config.tls_dir, &config.hostname)?;
        let listener =
            TcpListener::bind(config.bind)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.bind,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.bind,
                source,
            })?;
        let shared = Arc::new(Shared {
            hostname: config.hostname,
            identities,
            addr,
            ca_pem: tls.ca_pem_path,
            acceptor: tls.acceptor,
            refuse: AtomicBool::new(false),
            ack: AtomicBool::new(true),
            answer_reported: AtomicBool::new(true),
            next_conn: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            conns: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            live: watch::channel(0).0,
            listener: Mutex::new(None),
            methods: Mutex::new(HashMap::new()),
            next_rid: AtomicU64::new(1),
        });
        let (stop, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(accept_loop(Arc::clone(&shared), listener, stop_rx));
        *shared.listener() = Some(ListenerTask { stop, handle });
        tracing::info!(%addr, hostname = %shared.hostname, "IoT Hub emulator listening");
        Ok(Emulator { shared })
    }

    /// The listening address (the bound port when configured with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The PEM file of the emulator's CA, for the client's trust store.
    pub fn ca_pem(&self) -> PathBuf {
        self.shared.ca_pem.clone()
    }

    /// The IoT Hub host name the emulator expects.
    pub fn hostname(&self) -> &str {
        &self.shared.hostname
    }

    /// A SAS token for a configured identity (`device/module` or `device`) expiring at
    /// `expiry` (Unix seconds), built like the SDKs do; `None` for an unknown identity.
    pub fn sas_token(&self, identity: &str, expiry: u64) -> Option<String> {
        let id = self.shared.identities.get(identity)?;
        let resource = sas::resource_uri(&self.shared.hostname, &id.device, id.module.as_deref());
        Some(sas::generate(&resource, &id.key, expiry))
    }

    /// Messages recorded for `identity`, in arrival order.
    pub fn received(&self, identity: &str) -> Vec<Received> {
        self.shared
            .state()
            .all
            .iter()
            .filter(|r| r.identity == identity)
            .cloned()
            .collect()
    }

    /// Every message recorded, in arrival order.
    pub fn received_all(&self) -> Vec<Received> {
        self.shared.state().all.clone()
    }

    /// Messages recorded from arrival index `from` on (`seq >= from`), in arrival order.
    pub fn received_from(&self, from: usize) -> Vec<Received> {
        self.shared
            .state()
            .all
            .get(from..)
            .map(<[Received]>::to_vec)
            .unwrap_or_default()
    }

    /// How many messages are recorded for `identity`.
    pub fn count(&self, identity: &str) -> usize {
        self.shared
            .state()
            .counts
            .get(identity)
            .copied()
            .unwrap_or(0)
    }

    /// How many messages are recorded in all.
    pub fn total(&self) -> usize {
        self.shared.state().all.len()
    }

    /// Waits until `identity` has at least `n` messages recorded.
    pub async fn wait_for_count(
        &self,
        identity: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait(
            format!("{n} messages of {identity}"),
            n as u64,
            timeout,
            |s| s.counts.get(identity).copied().unwrap_or(0) as u64,
        )
        .await
    }

    /// Waits until at least `n` messages are recorded in all.
    pub async fn wait_for_total(&self, n: usize, timeout: Duration) -> Result<(), WaitTimeout> {
        self.wait(format!("{n} messages in all"), n as u64, timeout, |s| {
            s.all.len() as u64
        })
        .await
    }

    /// Waits until `identity` has had at least `n` CONNECTs accepted.
    pub async fn wait_for_connects(
        &self,
        identity: &str,
        n: u64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait(
            format!("{n} accepted CONNECTs of {identity}"),
            n,
            timeout,
            |s| {
                s.stats
                    .per_identity
                    .get(identity)
                    .map_or(0, |i| i.connects_accepted)
            },
        )
        .await
    }

    /// Waits until connections of `identity` subscribed to its direct methods `n` times in all
    /// (after that many, [`Emulator::invoke_method`] finds one subscribed unless it closed).
    pub async fn wait_for_method_subscriptions(
        &self,
        identity: &str,
        n: u64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait_identity(identity, "method subscriptions", n, timeout, |i| {
            i.method_subscriptions
        })
        .await
    }

    /// Waits until connections of `identity` subscribed to desired-property patches `n` times
    /// in all.
    pub async fn wait_for_desired_subscriptions(
        &self,
        identity: &str,
        n: u64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait_identity(identity, "desired-patch subscriptions", n, timeout, |i| {
            i.desired_subscriptions
        })
        .await
    }

    /// Waits until at least `n` CONNECTs in all have been refused.
    pub async fn wait_for_refusals(&self, n: u64, timeout: Duration) -> Result<(), WaitTimeout> {
        self.wait(format!("{n} refused CONNECTs"), n, timeout, |s| {
            s.stats.connects_refused
        })
        .await
    }

    /// Waits until at least `n` publishes have been swallowed while acks were off.
    pub async fn wait_for_swallowed(&self, n: u64, timeout: Duration) -> Result<(), WaitTimeout> {
        self.wait(format!("{n} swallowed publishes"), n, timeout, |s| {
            s.stats.publishes_swallowed
        })
        .await
    }

    /// Waits until `pred` holds over every record (arrival order) and the counters. `pred` runs
    /// under the emulator's lock after each change: keep it cheap, and do not call the emulator
    /// from it (that would deadlock). `what` names the condition in the [`WaitTimeout`].
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received], &EmulatorStats) -> bool,
    ) -> Result<(), WaitTimeout> {
        self.wait(what.to_owned(), 1, timeout, |s| {
            u64::from(pred(&s.all, &s.stats))
        })
        .await
    }

    /// [`Emulator::wait`] for `n` of one count of `identity`'s statistics, named `what`.
    async fn wait_identity(
        &self,
        identity: &str,
        what: &str,
        n: u64,
        timeout: Duration,
        count: fn(&IdentityStats) -> u64,
    ) -> Result<(), WaitTimeout> {
        let id = identity.to_owned();
        self.wait(format!("{n} {what} of {identity}"), n, timeout, move |s| {
            s.stats.per_identity.get(&id).map_or(0, count)
        })
        .await
    }

    async fn wait(
        &self,
        what: String,
        wanted: u64,
        timeout: Duration,
        got: impl Fn(&State) -> u64,
    ) -> Result<(), WaitTimeout> {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        // Subscribe before looking: a change after the look is then never missed.
        let mut changes = self.shared.changed.subscribe();
        loop {
            let now = got(&self.shared.state());
            if now >= wanted {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(WaitTimeout {
                        what,
                        wanted,
                        got: got(&self.shared.state()),
                        waited: start.elapsed(),
                    })
                }
            }
        }
    }

    /// Closes every live connection now. Nothing they have not yet acknowledged is recorded
    /// or acknowledged after this call. The listener keeps accepting.
    pub fn drop_connections(&self) {
        self.shared.kill_all(Kill::Dropped);
    }

    /// While `true`, every CONNECT is answered with CONNACK 5.
    pub fn refuse_logins(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// While `false`, telemetry is swallowed: not recorded and not acknowledged (the connection
    /// stays up), as if IoT Hub lost it. A connection that swallowed a message swallows every
    /// later one too, whatever this flag says afterwards (a dead path, not a hole in the
    /// middle of a stream); only new connections see the flag turned back on.
    pub fn set_ack(&self, ack: bool) {
        self.shared.ack.store(ack, Ordering::SeqCst);
    }

    /// While `false`, a reported-properties patch is applied (and counted) but not answered, as
    /// if IoT Hub's 204 were lost on the way; the connection stays up.
    pub fn answer_reported(&self, answer: bool) {
        self.shared.answer_reported.store(answer, Ordering::SeqCst);
    }

    /// Stops listening (the port refuses connections) and closes every connection; returns once
    /// all of them have ended.
    pub async fn go_away(&self) {
        let task = self.shared.listener().take();
        if let Some(task) = task {
            let _ = task.stop.send(true);
            let _ = task.handle.await;
        }
        self.shared.kill_all(Kill::Dropped);
        let mut live = self.shared.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Listens again on the same address. A no-op while listening.
    pub async fn come_back(&self) -> Result<(), EmulatorError> {
        self.shared.listen().await
    }

    /// Whether the emulator is listening now.
    pub fn is_listening(&self) -> bool {
        self.shared.listener().is_some()
    }

    /// The counters now.
    pub fn stats(&self) -> EmulatorStats {
        self.shared.state().stats.clone()
    }

    /// The twin of `identity` now (an empty one at `$version` 1 if it was never used).
    pub fn twin(&self, identity: &str) -> twin::Twin {
        self.shared
            .state()
            .twins
            .get(identity)
            .cloned()
            .unwrap_or_default()
    }

    /// Updates the desired properties of `identity` as the service would (a JSON merge patch)
    /// and sends the patch, with its new `$version`, to the identity's connection if one
    /// subscribed to desired patches. Returns the new `$version` and whether it was sent.
    pub fn update_desired(
        &self,
        identity: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> (u64, bool) {
        let version = self.shared.update(|s| {
            s.twins
                .entry(identity.to_owned())
                .or_default()
                .patch_desired(patch)
        });
        let mut body = patch.clone();
        body.insert("$version".into(), version.into());
        let packet = rumqttc::mqttbytes::v4::Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
            format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
            rumqttc::mqttbytes::QoS::AtMostOnce,
            serde_json::Value::Object(body).to_string(),
        ));
        let sent = self.shared.push(identity, |s| s.desired, packet).is_ok();
        if sent {
            self.shared.update(|s| s.stats.desired_patches_sent += 1);
        }
        (version, sent)
    }

    /// Waits until the reported properties of `identity` reach `$version` `version`.
    pub async fn wait_for_reported_version(
        &self,
        identity: &str,
        version: u64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        let id = identity.to_owned();
        self.wait(
            format!("reported $version of {identity}"),
            version,
            timeout,
            move |s| s.twins.get(&id).map_or(1, |t| t.reported_version),
        )
        .await
    }

    /// Invokes direct method `method` on `identity` as the service would: sends
    /// `$iothub/methods/POST/{method}/?$rid={rid}` with `payload` to its connection subscribed
    /// to methods and waits up to `timeout` for `$iothub/methods/res/{status}/?$rid={rid}`.
    pub async fn invoke_method(
        &self,
        identity: &str,
        method: &str,
        payload: &serde_json::Value,
        timeout: Duration,
    ) -> Result<MethodResponse, MethodError> {
        let rid = format!("{:x}", self.shared.next_rid.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.shared
            .methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rid.clone(), (identity.to_owned(), tx));
        let forget = || {
            self.shared
                .methods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&rid);
        };
        let packet = rumqttc::mqttbytes::v4::Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
            format!("$iothub/methods/POST/{method}/?$rid={rid}"),
            rumqttc::mqttbytes::QoS::AtMostOnce,
            payload.to_string(),
        ));
        match self.shared.push(identity, |s| s.methods, packet) {
            Ok(()) => self.shared.update(|s| s.stats.methods_invoked += 1),
            Err(full) => {
                forget();
                return Err(if full {
                    MethodError::Busy(identity.to_owned())
                } else {
                    MethodError::NotConnected(identity.to_owned())
                });
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            _ => {
                forget();
                Err(MethodError::Timeout {
                    identity: identity.to_owned(),
                    method: method.to_owned(),
                    waited: timeout,
                })
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(task) = self.shared.listener().take() {
            let _ = task.stop.send(true);
            task.handle.abort();
        }
        self.shared.kill_all(Kill::Shutdown);
    }
}
