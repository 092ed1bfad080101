//! One MQTT connection of a module: authentication, publishes routed durably, subscriptions,
//! deliveries to the module's inputs.
//!
//! Guarantees:
//! - CONNECT must come first (within [`CONNECT_TIMEOUT`]); the client id must be the identity the
//!   SAS token authenticates (`device/module`); any failure is CONNACK 5 and the end.
//! - A QoS 1 PUBLISH is acknowledged only after `Router::route` resolved it as durable, and
//!   PUBACKs leave in the order the PUBLISHes arrived (the acker task awaits them in that order;
//!   `session_state::InboundAcks` keeps the packet ids awaiting their PUBACK).
//! - One PUBACK per packet id in flight (MQTT 3.1.1 §4.3.2): a PUBLISH reusing a packet id that
//!   still awaits its PUBACK is, with DUP set, a resend and is dropped (neither routed nor
//!   acknowledged again: the original's PUBACK answers both); without DUP it breaks
//!   MQTT-2.3.1-2 and closes the connection.
//!   If routing one fails, the connection closes without acknowledging it or anything after it:
//!   the client sends them again. A refusal known when `Router::route` returns
//!   (`RouteAck::refusal`: a full store) closes the connection before the next publish is
//!   read, so no later publish is stored ahead of the refused one's resend. A failure known
//!   only at commit (ENOSPC) is covered by the connection's `AppendChain`: no publish routed
//!   after the failed one on this connection is stored.
//! - The connection ids of a message come from the authenticated identity, never from the topic;
//!   a module publishes only as itself and subscribes only to its own inputs (SUBACK 0x80
//!   otherwise).
//! - A second connection of one identity replaces the first, which closes.
//! - A malformed or oversized packet, QoS 2, or silence past 1.5 × keep-alive closes this
//!   connection with a log line; nothing already acknowledged is affected.
//! - The connection closes when its SAS token expires (`se` plus the clock-skew allowance, as
//!   the AMQP head does), counted in `edgehub_client_token_expired_total{protocol="mqtt"}`; the
//!   module connects again with a fresh token, as edgeHub's periodic re-authentication makes it.
//! - Memory per connection is bounded by constants, whatever the client does: what the
//!   connection owes the client (replies, deliveries) waits in a queue of [`OUTGOING_CAPACITY`]
//!   packets and PUBACKs in one of [`PUBACK_CAPACITY`]; while the queue is full (the client does
//!   not read), the connection does not read from it either (backpressure), so a client that
//!   writes without reading stalls, and is closed when its keep-alive runs out. Publishes
//!   (QoS 0 or 1) awaiting durability are at most [`MAX_PENDING_ACKS`]; deliveries at most
//!   [`DELIVERY_WINDOW`] in flight, as many waiting for the window, and
//!   [`sink::OUTBOUND_CAPACITY`] handed over by the sinks (which wait while it is full).
//! - A delivery to the module counts as delivered only when the module's PUBACK for it arrives;
//!   when the connection ends, every unacknowledged delivery goes back to the endpoint worker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::credentials::CredentialError;
use crate::auth::sas::CLOCK_SKEW_SECS;

use bytes::BytesMut;
use router::{DeliveryOutcome, Endpoint, Message, RouteAck, RouteError};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::head::context::{HeadContext, RegisteredSinks};
use crate::head::sink::{self, Outbound, OutboundTx};
use crate::head::MAX_MESSAGE_BYTES;
use crate::identity::Identity;
use crate::methods::{self, MethodCall, MethodTx};
use crate::metrics::{ConnectionMetrics, HubMetrics};
use crate::mqtt::sessions::Sessions;
use crate::mqtt::topics::{EventsTopic, InboundTopic, SubscribeDecision};
use crate::mqtt::{session_state, topics, twin, username};
use crate::property_bag;

/// How long a client has to send CONNECT after the TLS handshake (edgeHub: 60 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest packet read: a full-size body plus room for a long topic and property bag.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 64 * 1024;
/// Deliveries to one module in flight (sent, PUBACK not yet back).
const DELIVERY_WINDOW: u16 = 100;
/// Publishes routed and not yet acknowledged, per connection; past it the connection stops
/// reading until the store catches up (backpressure instead of unbounded memory).
const MAX_PENDING_ACKS: usize = 1024;
/// Publishes read while the connection is held by flow control, waiting to be handled in
/// order once it is released (count and payload bytes); past either, reading stops.
const MAX_PARKED: usize = 128;
const MAX_PARKED_BYTES: usize = 1 << 20;
/// Packets the connection task may queue for the writer (replies and deliveries); while it is
/// full the connection stops reading until the client reads (backpressure).
const OUTGOING_CAPACITY: usize = 128;
/// PUBACKs the acker task may queue for the writer; while it is full the acker waits, the
/// publishes awaiting acknowledgement reach [`MAX_PENDING_ACKS`] and reading stops.
const PUBACK_CAPACITY: usize = 256;
/// How long a closing connection waits for its acker and writer to send what is owed; then they
/// are stopped (a client that does not read cannot hold the connection open).
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Why a connection ended (logged).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    /// The client closed the connection or sent DISCONNECT.
    #[error("client disconnected")]
    ClientClosed,
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not MQTT 3.1.1 as we accept it.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A protocol rule was broken (QoS 2, oversized message, publish as someone else, …).
    #[error("protocol violation: {0}")]
    Violation(String),
    /// No CONNECT arrived in time.
    #[error("connection refused: no CONNECT within 60 s")]
    NoConnect,
    /// The head is at its connection limit (CONNACK "server unavailable").
    #[error("connection refused: {0}")]
    OverLimit(#[source] crate::limits::LimitError),
    /// The persistent-session store failed.
    #[error("connection refused: session store: {0}")]
    Sessions(#[source] crate::mqtt::sessions::SessionsError),
    /// A twin request may not be answered (this hub is fenced).
    #[error("twin request not answered: {0}")]
    Twin(#[source] crate::twin::TwinError),
    /// CONNECT's credentials were refused.
    #[error("connection refused: {0}")]
    NotAuthorized(#[from] ConnectAuthError),
    /// Nothing arrived within 1.5 × keep-alive.
    #[error("keep-alive expired")]
    KeepAlive,
    /// Another connection of the same identity took over.
    #[error("replaced by a newer connection of the same identity")]
    Replaced,
    /// Its module's replica machine closed it (a replicated module: displaced or scaled down).
    #[error("closed: {0}")]
    ReplicaClosed(#[source] crate::head::replica::ReplicaClose),
    /// The SAS token the connection authenticated with expired (plus the clock skew).
    #[error("the SAS token expired; the module must connect again with a fresh one")]
    TokenExpired,
    /// Routing a publish failed; it and everything after it stay unacknowledged.
    #[error("routing failed: {0}")]
    Route(#[from] RouteError),
    /// The connection's acknowledgement state refused a publish (after a failed one).
    #[error("routing failed: {0}")]
    AckState(#[source] session_state::StateError),
    /// The task that sends PUBACKs in order is gone, so nothing more can be acknowledged.
    #[error("routing failed: acknowledger stopped")]
    AckerStopped,
    /// A connection was run a second time (a bug).
    #[error("routing failed: the connection ran twice")]
    RanTwice,
    /// The hub is shutting down.
    #[error("hub shutting down")]
    Shutdown,
    /// A replicated module has its count of replicas connected (CONNACK "server unavailable",
    /// which the SDKs retry).
    #[error("connection refused: {0}")]
    ReplicasFull(#[source] crate::head::replica::ReplicasFull),
}

/// Serves one connection until it ends. `peer` is for logs; `slot` is the connection's place in
/// the head's budget, told when it authenticates.
///
/// Steps: read CONNECT ([`read_connect`]), start the writer, [`admit`] the client (or refuse it
/// with a CONNACK and end), answer CONNACK, then run the [`Connection`] until it ends.
pub async fn serve<S>(
    stream: S,
    ctx: Arc<HeadContext>,
    sessions: Arc<Sessions>,
    peer: String,
    slot: crate::limits::Slot,
) -> ConnectionEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let connect = match read_connect(&mut reader, &mut buf).await {
        Ok(connect) => connect,
        Err(end) => return end,
    };
    let writer = Writer::start(writer);
    // `slot` lives as long as the connection, refused or not (until its CONNACK is written).
    let mut admitted = match admit(&ctx, &sessions, &connect, &slot, &peer) {
        Ok(admitted) => admitted,
        Err(Refusal { code, end }) => {
            writer.refuse(code).await;
            return end;
        }
    };
    // The queue is empty: the CONNACK always fits.
    let _ = writer.out.try_send(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        admitted.present,
    )));
    ctx.metrics.client_connected();
    ctx.metrics.client_authenticated(&admitted.identity);
    let client_id = admitted.client_id.clone();
    tracing::info!(%peer, %client_id, session_present = admitted.present, "module connected");
    let Writer { out, pubacks, task } = writer;
    let replica = admitted.replica.take();
    let mut conn = Connection::new(Arc::clone(&ctx), sessions, &admitted, out, pubacks);
    conn.replica = replica;
    let keep_alive = session_state::keep_alive_timeout(connect.keep_alive);
    let end = conn
        .run(reader, buf, admitted.replaced.clone(), keep_alive)
        .await;
    conn.finish(&end);
    drop(conn);
    finish_task(task).await;
    ctx.metrics.client_disconnected();
    tracing::info!(%peer, %client_id, reason = %end, "module disconnected");
    end
}

/// Reads the first packet, which must be CONNECT, within [`CONNECT_TIMEOUT`].
async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<rumqttc::mqttbytes::v4::Connect, ConnectionEnd> {
    match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(reader, buf)).await {
        Err(_) => Err(ConnectionEnd::NoConnect),
        Ok(Err(end)) => Err(end),
        Ok(Ok(Packet::Connect(c))) => Ok(c),
        Ok(Ok(other)) => Err(ConnectionEnd::Violation(format!(
            "first packet is not CONNECT: {other:?}"
        ))),
    }
}

/// The task writing to the socket and its two queues: replies and deliveries, and PUBACKs.
struct Writer {
    out: mpsc::Sender<Packet>,
    pubacks: mpsc::Sender<u16>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Writer {
    fn start<W: AsyncWrite + Send + Unpin + 'static>(writer: W) -> Self {
        let (out, out_rx) = mpsc::channel::<Packet>(OUTGOING_CAPACITY);
        let (pubacks, puback_rx) = mpsc::channel::<u16>(PUBACK_CAPACITY);
        let task = tokio::spawn(write_packets(writer, out_rx, puback_rx));
        Writer { out, pubacks, task }
    }

    /// Answers CONNECT with the refusal `code` and closes (see [`refuse`]).
    async fn refuse(self, code: ConnectReturnCode) {
        refuse(code, self.out, self.pubacks, self.task).await;
    }
}

/// A client CONNECT admitted: authenticated, within the budget, its session opened and its
/// connection registered.
struct Admitted {
    identity: Identity,
    client_id: String,
    clean: bool,
    /// The SAS token's `se` (seconds since the epoch).
    token_expiry: u64,
    /// This connection's id in the registry.
    conn_id: u64,
    /// Changes when a newer connection of the identity takes over.
    replaced: watch::Receiver<bool>,
    /// A persistent session was found (CONNACK's "session present").
    present: bool,
    /// For a replicated module: its membership in the module's replicated inputs.
    replica: Option<crate::head::replica::Membership>,
}

/// A CONNECT refused: the CONNACK code to answer and why the connection ends.
struct Refusal {
    code: ConnectReturnCode,
    end: ConnectionEnd,
}

/// Admits a CONNECT: credentials, the connection budget, the persistent session, then the
/// registry (only while the key checked is still the module's). A refusal is logged and
/// counted here; the caller answers it.
fn admit(
    ctx: &HeadContext,
    sessions: &Sessions,
    connect: &rumqttc::mqttbytes::v4::Connect,
    slot: &crate::limits::Slot,
    peer: &str,
) -> Result<Admitted, Refusal> {
    let (identity, token_expiry, key) =
        authenticate(ctx, connect).map_err(|reason| not_authorized(ctx, peer, connect, reason))?;
    // A replicated module's connections live side by side: none replaces another.
    let replicated = ctx.dispatcher.is_replicated(&identity.module);
    let taken = if !replicated && ctx.connections.has_live(&identity) {
        slot.authenticated_replacing()
    } else {
        slot.authenticated()
    };
    // Over --max-connections: "server unavailable", which the SDKs retry.
    taken.map_err(|e| Refusal {
        code: ConnectReturnCode::ServiceUnavailable,
        end: ConnectionEnd::OverLimit(e),
    })?;
    let client_id = connect.client_id.clone();
    let present = sessions
        .open(&client_id, connect.clean_session)
        .map_err(|e| {
            tracing::error!(%client_id, error = %e, "session store failed");
            Refusal {
                code: ConnectReturnCode::ServiceUnavailable,
                end: ConnectionEnd::Sessions(e),
            }
        })?;
    // The key checked above must still be the module's: a reload may have removed the module
    // or changed its key since.
    let still_valid = || ctx.identities.key(&identity).as_deref() == Some(key.as_slice());
    let (conn_id, replaced, replica) = if replicated {
        let Some((conn_id, replaced, close)) =
            ctx.connections.join_member_if(&identity, still_valid)
        else {
            let reason = ConnectAuthError::KeyChanged;
            return Err(not_authorized(ctx, peer, connect, reason));
        };
        let heartbeat = router::replica_worker::Heartbeat::new();
        match crate::head::replica::Membership::join(ctx, &identity, conn_id, close, heartbeat) {
            Ok(membership) => (conn_id, replaced, Some(membership)),
            Err(full) => {
                ctx.connections.leave(&identity, conn_id);
                tracing::warn!(%peer, client_id = %connect.client_id, %identity, error = %full,
                    "replica connection refused: the module has its declared count of replicas connected");
                ctx.metrics.client_connect_failed("replicas_full");
                return Err(Refusal {
                    code: ConnectReturnCode::ServiceUnavailable,
                    end: ConnectionEnd::ReplicasFull(full),
                });
            }
        }
    } else {
        let Some((conn_id, replaced)) = ctx.connections.join_if(&identity, still_valid) else {
            let reason = ConnectAuthError::KeyChanged;
            return Err(not_authorized(ctx, peer, connect, reason));
        };
        (conn_id, replaced, None)
    };
    Ok(Admitted {
        identity,
        client_id,
        clean: connect.clean_session,
        token_expiry,
        conn_id,
        replaced,
        present,
        replica,
    })
}

/// Logs and counts a CONNECT refused for its credentials (CONNACK 5).
fn not_authorized(
    ctx: &HeadContext,
    peer: &str,
    connect: &rumqttc::mqttbytes::v4::Connect,
    reason: ConnectAuthError,
) -> Refusal {
    tracing::warn!(%peer, client_id = %connect.client_id, %reason, "CONNECT refused");
    ctx.metrics.client_connect_failed("not_authorized");
    Refusal {
        code: ConnectReturnCode::NotAuthorized,
        end: ConnectionEnd::NotAuthorized(reason),
    }
}

/// Why a CONNECT's credentials were refused (answered CONNACK 5, "not authorized").
#[derive(Debug, thiserror::Error)]
pub enum ConnectAuthError {
    /// CONNECT carries no username and password.
    #[error("no username/password")]
    NoLogin,
    /// The username is not IoT Hub's `host/device/module/?api-version=…`.
    #[error("username: {0}")]
    Username(#[source] username::UsernameError),
    /// The client id is not the `device/module` the username names.
    #[error("client id {client_id:?} is not the identity {identity:?} of the username")]
    ClientId {
        /// The CONNECT's client id.
        client_id: String,
        /// The identity of the username.
        identity: String,
    },
    /// The username names a device, not a module.
    #[error("a device without a module is not served")]
    NoModule,
    /// The module is unknown or its token does not verify.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// A reload removed or re-keyed the module while it logged in.
    #[error("the module was removed or its key changed while it logged in")]
    KeyChanged,
}

/// Checks CONNECT: client id, username, SAS token. Returns the authenticated identity, its
/// token's expiry (`se`, seconds since the epoch) and the key the token was checked with.
fn authenticate(
    ctx: &HeadContext,
    connect: &rumqttc::mqttbytes::v4::Connect,
) -> Result<(Identity, u64, Vec<u8>), ConnectAuthError> {
    let login = connect.login.as_ref().ok_or(ConnectAuthError::NoLogin)?;
    let user = username::parse(&login.username).map_err(ConnectAuthError::Username)?;
    if connect.client_id != user.client_id() {
        return Err(ConnectAuthError::ClientId {
            client_id: connect.client_id.clone(),
            identity: user.client_id(),
        });
    }
    let module = user.module.clone().ok_or(ConnectAuthError::NoModule)?;
    let identity = Identity::new(user.device.clone(), module);
    let key = ctx
        .identities
        .key(&identity)
        .ok_or_else(|| CredentialError::UnknownModule(identity.clone()))?;
    let expiry = ctx.verify_token_expiry(&login.password, &key, &identity)?;
    Ok((identity, expiry, key))
}

/// When a token expiring at `expiry` (`se`) stops being accepted (plus the clock skew), as a
/// timer deadline; at most a day away (the timer is then set again).
fn token_deadline(expiry: u64, now_secs: u64) -> Instant {
    let left = token_secs_left(expiry, now_secs);
    Instant::now() + Duration::from_secs(left.min(24 * 3600))
}

/// Whole seconds until a token expiring at `expiry` is refused (at `now_secs`); 0 once it is.
fn token_secs_left(expiry: u64, now_secs: u64) -> u64 {
    expiry
        .saturating_add(CLOCK_SKEW_SECS)
        .saturating_sub(now_secs)
}

/// Waits up to [`CLOSE_GRACE`] for a task to finish, then stops it.
/// Answers a CONNECT with the refusal `code` and closes: the writer sends the CONNACK (the
/// queue is empty, so it always fits) and ends once both of its channels are closed.
async fn refuse<T>(
    code: ConnectReturnCode,
    out_tx: mpsc::Sender<Packet>,
    puback_tx: mpsc::Sender<u16>,
    writer_task: tokio::task::JoinHandle<T>,
) {
    let _ = out_tx.try_send(Packet::ConnAck(ConnAck::new(code, false)));
    drop((out_tx, puback_tx));
    finish_task(writer_task).await;
}

async fn finish_task<T>(mut task: tokio::task::JoinHandle<T>) {
    if tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

/// What one live connection keeps.
struct Connection {
    ctx: Arc<HeadContext>,
    /// Persistent subscriptions (MQTT's own; the AMQP head has none).
    sessions: Arc<Sessions>,
    identity: Identity,
    client_id: String,
    conn_id: u64,
    clean: bool,
    /// Replies and deliveries for the writer task (this task is its only sender, so a free
    /// slot seen stays free until used).
    out: mpsc::Sender<Packet>,
    /// PUBACKs for the writer task; handed to the acker task when the connection runs.
    pubacks: Option<mpsc::Sender<u16>>,
    /// Packet ids of QoS 1 publishes awaiting their PUBACK, in arrival order (shared with the
    /// acker task, which releases them as they become durable).
    inbound: Arc<Mutex<session_state::InboundAcks>>,
    /// The SAS token's `se` (seconds since the epoch).
    token_expiry: u64,
    /// Deliveries sent and waiting for the module's PUBACK.
    deliveries: session_state::Outbound<oneshot::Sender<DeliveryOutcome>>,
    /// Deliveries taken from the sinks, waiting for room in the window.
    waiting: VecDeque<Outbound>,
    /// Route acknowledgements, in arrival order, for the acker task.
    acks: Option<mpsc::Sender<(Option<session_state::AckToken>, PendingAck)>>,
    /// Filters granted to this connection (restored from a persistent session at connect).
    subscriptions: Vec<String>,
    /// This connection's counters, resolved once.
    metrics: ConnectionMetrics,
    /// What the module was last told of its desired properties (while subscribed to them).
    desired: twin::DesiredWatch,
    /// Set while this connection's input sinks are registered.
    outbound_tx: Option<OutboundTx>,
    /// The input sinks this connection registered (only these are removed when it goes).
    registered: RegisteredSinks,
    /// Every publish is stored on this chain: once one fails to become durable, none after it
    /// on this connection is stored (so the client's resend cannot be overtaken).
    chain: router::AppendChain,
    /// Where direct-method requests for this connection are queued (set while it runs); handed
    /// to `ctx.methods` while the connection is subscribed to its methods.
    method_tx: Option<MethodTx>,
    /// Whether this connection is the module's direct-method target.
    methods_attached: bool,
    /// For a replicated module: this connection's membership (its inputs are served by the
    /// replica machines, not by sinks registered with the dispatcher).
    replica: Option<crate::head::replica::Membership>,
}

impl Connection {
    fn new(
        ctx: Arc<HeadContext>,
        sessions: Arc<Sessions>,
        admitted: &Admitted,
        out: mpsc::Sender<Packet>,
        pubacks: mpsc::Sender<u16>,
    ) -> Self {
        let metrics = ctx.metrics.connection_metrics(&admitted.identity);
        Connection {
            ctx,
            sessions,
            identity: admitted.identity.clone(),
            client_id: admitted.client_id.clone(),
            conn_id: admitted.conn_id,
            clean: admitted.clean,
            out,
            pubacks: Some(pubacks),
            inbound: Arc::new(Mutex::new(session_state::InboundAcks::new(
                MAX_PENDING_ACKS,
            ))),
            token_expiry: admitted.token_expiry,
            deliveries: session_state::Outbound::new(DELIVERY_WINDOW),
            waiting: VecDeque::new(),
            acks: None,
            subscriptions: Vec::new(),
            metrics,
            desired: twin::DesiredWatch::default(),
            outbound_tx: None,
            registered: RegisteredSinks::new(),
            chain: router::AppendChain::new(),
            method_tx: None,
            methods_attached: false,
            replica: None,
        }
    }

    /// Runs the connection: starts the acker, attaches the module's inputs, serves packets and
    /// events until the connection ends, then lets the acker send what is durable.
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: R,
        buf: BytesMut,
        replaced: watch::Receiver<bool>,
        keep_alive: Duration,
    ) -> ConnectionEnd {
        let Some(mut acker) = self.start_acker() else {
            return ConnectionEnd::RanTwice;
        };
        let (outbound_tx, outbound_rx) = sink::outbound_channel();
        let (method_tx, methods_rx) = methods::method_channel();
        self.method_tx = Some(method_tx);
        self.attach_inputs(&outbound_tx);
        // A persistent session's desired-patch subscription counts from now.
        let watched = self.watch_desired();
        let mut input = LoopInput {
            reader,
            buf,
            keep_alive,
            replaced,
            outbound_rx,
            methods_rx,
            shutdown: self.ctx.shutdown.clone(),
            routes_changed: self.ctx.routes_changed.subscribe(),
            desired_changes: self.ctx.twins.desired_changes(),
        };
        let end = match watched {
            Ok(()) => {
                self.serve_packets(&mut input, &outbound_tx, &mut acker)
                    .await
            }
            Err(end) => end,
        };
        // Acknowledge what is durable before closing (in order), unless routing failed; a
        // client that does not read gets CLOSE_GRACE for it.
        self.acks = None;
        acker.finish().await;
        end
    }

    /// Spawns the task that sends PUBACKs in arrival order; `None` if this connection ran
    /// before (its PUBACK queue is gone).
    fn start_acker(&mut self) -> Option<Acker> {
        let (ack_tx, ack_rx) = mpsc::channel(MAX_PENDING_ACKS);
        let (route_failed_tx, route_failed) = oneshot::channel::<RouteError>();
        let pubacks = self.pubacks.take()?;
        let released = Arc::new(Notify::new());
        let task = tokio::spawn(ack_in_order(
            ack_rx,
            pubacks,
            Arc::clone(&self.inbound),
            Arc::clone(&released),
            route_failed_tx,
            Arc::clone(&self.ctx.metrics),
        ));
        // Waits for room in the acker's queue when it is full (QoS 0 publishes awaiting the
        // store count there too).
        let room = ack_tx.clone();
        self.acks = Some(ack_tx);
        Some(Acker {
            task,
            room,
            released,
            route_failed,
        })
    }

    /// Takes the module's input sinks from any older connection, restores a persistent
    /// session's subscriptions and, if they cover the inputs, registers this connection's sinks.
    fn attach_inputs(&mut self, outbound_tx: &OutboundTx) {
        // Any input sinks still registered belong to an older connection of this module, which
        // is gone or going: take them away now, so no delivery waits on a dead connection. (A
        // replica replaces nobody.)
        if self.replica.is_none() {
            self.ctx.unregister_input_sinks(&self.identity);
        }
        if !self.clean {
            self.subscriptions = self.sessions.get(&self.client_id).unwrap_or_default();
        }
        if self.subscribed_to_inputs() {
            self.register_inputs(outbound_tx);
        }
        self.update_methods_target();
    }

    /// Reads packets and serves every other event until the connection ends.
    async fn serve_packets<R: AsyncRead + Unpin>(
        &mut self,
        input: &mut LoopInput<R>,
        outbound_tx: &OutboundTx,
        acker: &mut Acker,
    ) -> ConnectionEnd {
        // Two timers for the whole connection, not two per packet: a packet only moves
        // `deadline`; the keep-alive timer, when it fires, checks it and re-arms if it moved.
        let keep_alive = input.keep_alive;
        let mut deadline = Instant::now() + keep_alive;
        let keep_alive_timer = tokio::time::sleep_until(deadline);
        tokio::pin!(keep_alive_timer);
        let token_timer =
            tokio::time::sleep_until(token_deadline(self.token_expiry, self.ctx.now_secs()));
        tokio::pin!(token_timer);
        // Waits for a free outgoing slot when the queue is full (this task's own sender).
        let room = self.out.clone();
        // Flow control: set while an online endpoint the last publish went to lags past its
        // bound. Its next publishes are parked, not routed, until it is released; every other
        // packet is still served, so a module held by its own input (or two feeding each other)
        // still acknowledges its deliveries and lets its receiver catch up.
        let mut held: Option<router::FlowHold> = None;
        let mut parked = Parked::default();
        let mut ever_held = false;
        loop {
            self.send_waiting();
            // A packet read makes at most one reply: read only with a slot free for it, and
            // only while fewer than MAX_PENDING_ACKS publishes (of either QoS) await durability.
            let out_full = self.out.capacity() == 0;
            let inbound_full = self.inbound_acks().is_full();
            let acks_full = acker.room.capacity() == 0;
            let has_room = !out_full && !inbound_full && !acks_full;
            // Released: what was parked goes first, in arrival order (it may be held again).
            if held.is_none() && has_room {
                if let Some(publish) = parked.pop() {
                    match self
                        .handle_packet(Packet::Publish(publish), outbound_tx)
                        .await
                    {
                        Ok(hold) => held = hold,
                        Err(end) => break end,
                    }
                    continue;
                }
            }
            let may_read = has_room && parked.may_read(held.is_some());
            tokio::select! {
                read = read_packet(&mut input.reader, &mut input.buf), if may_read => {
                    match read {
                        Ok(packet) => {
                            deadline = Instant::now() + keep_alive;
                            if let Some(replica) = &self.replica {
                                replica.heard();
                            }
                            let packet = match parked.park(held.is_some(), packet) {
                                Parking::Parked => continue,
                                Parking::Handle(packet) => packet,
                                Parking::Goodbye => {
                                    // Routed as the client said it, held or not, then closed.
                                    break self.handle_parked_then_disconnect(&mut parked, outbound_tx).await;
                                }
                            };
                            match self.handle_packet(packet, outbound_tx).await {
                                Ok(Some(hold)) => held = Some(hold),
                                Ok(None) => {}
                                Err(end) => break end,
                            }
                            if let (Some(hold), false) = (&held, ever_held) {
                                ever_held = true;
                                tracing::info!(client_id = %self.client_id, endpoint = %hold.endpoint(),
                                    "flow control: holding this producer while an online receiver it feeds lags");
                            }
                        }
                        Err(end) => break end,
                    }
                }
                // Released once every endpoint of its last publish is offline or within its
                // bound; the time held does not count against the client's keep-alive.
                () = router::flow::until_released(held.as_ref()), if held.is_some() => {
                    held = None;
                    deadline = Instant::now() + keep_alive;
                }
                // The client reads nothing: its replies fill the queue; wait for a free slot.
                free = room.reserve(), if out_full => {
                    if free.is_err() {
                        break writer_stopped();
                    }
                }
                () = acker.released.notified(), if inbound_full => {}
                free = acker.room.reserve(), if acks_full => {
                    if free.is_err() {
                        break ConnectionEnd::AckerStopped;
                    }
                }
                // Deliveries are taken only while few wait for the window (the sinks wait
                // meanwhile): a module that acknowledges nothing holds a bounded number.
                Some(delivery) = input.outbound_rx.recv(), if self.waiting.len() < usize::from(DELIVERY_WINDOW) => {
                    self.waiting.push_back(delivery);
                }
                // Direct-method requests, through the same bounded outgoing queue.
                Some(call) = input.methods_rx.recv(), if !out_full => self.send_method_request(call),
                Ok(reason) = &mut acker.route_failed => break ConnectionEnd::Route(reason),
                _ = input.replaced.changed() => {
                    break match self.replica.as_ref().and_then(|r| r.closed_by().get()) {
                        Some(why) => ConnectionEnd::ReplicaClosed(why),
                        None => ConnectionEnd::Replaced,
                    };
                }
                _ = input.shutdown.changed() => break ConnectionEnd::Shutdown,
                Ok(()) = input.routes_changed.changed() => self.register_new_inputs(),
                // A desired patch is one packet: only with a slot free for it. Also right after
                // the module subscribed: what it missed while away.
                () = std::future::ready(()), if self.desired.catching_up() && !out_full => {
                    if let Err(end) = self.send_desired_patch() {
                        break end;
                    }
                }
                Ok(()) = input.desired_changes.changed(), if !out_full => {
                    if let Err(end) = self.send_desired_patch() {
                        break end;
                    }
                }
                () = &mut keep_alive_timer => {
                    if held.is_some() {
                        // Not read because it is held: its PINGREQs wait in the socket.
                        deadline = deadline.max(Instant::now() + keep_alive);
                    } else if Instant::now() >= deadline {
                        break ConnectionEnd::KeepAlive;
                    }
                    keep_alive_timer.as_mut().reset(deadline);
                }
                () = &mut token_timer => {
                    if let Err(end) = self.check_token(token_timer.as_mut()) {
                        break end;
                    }
                }
            }
        }
    }

    /// A DISCONNECT read while publishes were parked: they are handled first (in order, holds
    /// ignored: the client is leaving and said so), then the connection ends as the client's.
    async fn handle_parked_then_disconnect(
        &mut self,
        parked: &mut Parked,
        outbound_tx: &OutboundTx,
    ) -> ConnectionEnd {
        while let Some(publish) = parked.pop() {
            if let Err(end) = self
                .handle_packet(Packet::Publish(publish), outbound_tx)
                .await
            {
                return end;
            }
        }
        ConnectionEnd::ClientClosed
    }

    /// Handles one packet read; a publish to acknowledge goes to the acker, in arrival order.
    /// A routed publish whose endpoints hold their producers comes back as that hold.
    async fn handle_packet(
        &mut self,
        packet: Packet,
        outbound_tx: &OutboundTx,
    ) -> Result<Option<router::FlowHold>, ConnectionEnd> {
        match self.on_packet(packet, outbound_tx)? {
            None => Ok(None),
            Some(ack) => {
                let hold = ack.1.hold();
                match &self.acks {
                    Some(acks) if acks.send(ack).await.is_ok() => Ok(hold),
                    _ => Err(ConnectionEnd::AckerStopped),
                }
            }
        }
    }

    /// The token timer fired: the end once the token is refused, else the timer set again
    /// (it fires at most a day ahead, or early if the clock moved).
    fn check_token(
        &self,
        timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Result<(), ConnectionEnd> {
        if token_secs_left(self.token_expiry, self.ctx.now_secs()) == 0 {
            self.ctx.metrics.client_token_expired("mqtt");
            return Err(ConnectionEnd::TokenExpired);
        }
        timer.reset(token_deadline(self.token_expiry, self.ctx.now_secs()));
        Ok(())
    }

    fn inbound_acks(&self) -> std::sync::MutexGuard<'_, session_state::InboundAcks> {
        lock(&self.inbound)
    }

    /// Queues a reply for the client. The read that caused it found a slot free, and only this
    /// task fills the queue, so it is never full; if the writer stopped, the socket is gone and
    /// the next read ends the connection.
    fn reply(&self, packet: Packet) -> Result<(), ConnectionEnd> {
        match self.out.try_send(packet) {
            Ok(()) | Err(TrySendError::Closed(_)) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ConnectionEnd::Violation(
                "the client does not read what the hub sends".into(),
            )),
        }
    }

    /// Handles one packet; a routed QoS 1 publish comes back as (packet id, acknowledgement) for
    /// the acker task.
    fn on_packet(
        &mut self,
        packet: Packet,
        outbound: &OutboundTx,
    ) -> Result<Option<(Option<session_state::AckToken>, PendingAck)>, ConnectionEnd> {
        match packet {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(ack) => self.on_puback(ack.pkid)?,
            Packet::Subscribe(s) => self.on_subscribe(s, outbound)?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u)?,
            Packet::PingReq => self.reply(Packet::PingResp)?,
            Packet::Disconnect => return Err(ConnectionEnd::ClientClosed),
            other => {
                return Err(ConnectionEnd::Violation(format!(
                    "unexpected packet from a client: {other:?}"
                )))
            }
        }
        Ok(None)
    }

    /// Handles a PUBLISH: checks it, claims its packet id (QoS 1), then routes an event or
    /// answers a topic that is not routed. What comes back goes to the acker, in order.
    fn on_publish(
        &mut self,
        publish: Publish,
    ) -> Result<Option<(Option<session_state::AckToken>, PendingAck)>, ConnectionEnd> {
        check_publish(publish.qos, publish.payload.len())?;
        // One PUBACK per packet id in flight: a resend of a publish still awaiting its PUBACK is
        // answered by the original's.
        let token = match publish.qos {
            QoS::AtLeastOnce => {
                let claimed = self.inbound_acks().on_publish(publish.pkid);
                match claim_packet_id(claimed, publish.dup)? {
                    PacketIdClaim::Claimed(token) => Some(token),
                    PacketIdClaim::Resend(pkid) => {
                        tracing::debug!(client_id = %self.client_id, pkid, "a resend of a publish awaiting its PUBACK dropped");
                        return Ok(None);
                    }
                }
            }
            _ => None,
        };
        let arrived = std::time::Instant::now();
        let ack = match topics::parse_publish(&publish.topic) {
            Ok(InboundTopic::Events(topic)) => self.route_event(&publish, &topic)?,
            Ok(InboundTopic::TwinRequest { op, rid }) => {
                self.answer_twin_request((op, rid, &publish.payload), arrived)?;
                return Ok(token.map(|t| (Some(t), PendingAck::Now)));
            }
            Ok(InboundTopic::MethodResponse { .. }) => {
                self.relay_method_response(&publish);
                return Ok(token.map(|t| (Some(t), PendingAck::Now)));
            }
            Err(e) => {
                // edgeHub's rule: a publish on a topic it does not serve is dropped, but acked.
                tracing::warn!(client_id = %self.client_id, topic = %publish.topic, error = %e, "publish on an unknown topic dropped");
                return Ok(token.map(|t| (Some(t), PendingAck::Now)));
            }
        };
        if let Some(token) = token {
            return Ok(Some((Some(token), PendingAck::Routed(ack, arrived))));
        }
        // QoS 0 asks for no acknowledgement; the message is routed all the same, and awaited
        // in turn so that what it holds until it is durable counts against MAX_PENDING_ACKS.
        Ok(Some((None, PendingAck::Unacknowledged(ack))))
    }

    /// Routes a publish on the events topic; a QoS 1 one the router refuses at once ends the
    /// connection before any later publish is routed.
    fn route_event(
        &mut self,
        publish: &Publish,
        topic: &EventsTopic<'_>,
    ) -> Result<RouteAck, ConnectionEnd> {
        let message = self.message_from(publish, topic)?;
        self.metrics.received(
            &self.ctx.metrics,
            message.source().output(),
            publish.payload.len(),
        );
        // The client waits for this PUBACK before it sends more (as every SDK does) when no
        // other publish is owed one: then the store may sync it on this task's thread.
        let waits = publish.qos == QoS::AtLeastOnce && self.inbound_acks().pending() == 1;
        self.chain.set_producer_waits(waits);
        let mut ack = self.ctx.router.route_in(&self.chain, message);
        if publish.qos == QoS::AtLeastOnce {
            if let Some(e) = ack.refusal() {
                // Refused at once (store full, too large): close before any later
                // publish is routed, so the client's resend cannot be overtaken.
                tracing::warn!(client_id = %self.client_id, pkid = publish.pkid, error = %e, "a publish was refused by the store; closing without PUBACK");
                return Err(ConnectionEnd::Route(e));
            }
        }
        Ok(ack)
    }

    /// Answers a twin request (`crate::mqtt::twin`), durably for a patch, before its PUBACK.
    /// The answer goes out whether or not the module subscribed to `$iothub/twin/res/#` yet:
    /// the Python SDK GETs the twin right after CONNECT, before it subscribes, and waits for
    /// that answer forever (it never GETs again while one is outstanding). A fenced hub
    /// answers nothing and closes.
    fn answer_twin_request(
        &self,
        request: (topics::TwinOp, Option<&str>, &[u8]),
        arrived: std::time::Instant,
    ) -> Result<(), ConnectionEnd> {
        let answer = twin::answer(
            &self.ctx.twins,
            &self.ctx.metrics,
            &self.identity,
            request,
            arrived,
        )
        .map_err(ConnectionEnd::Twin)?;
        self.reply(Packet::Publish(answer))
    }

    fn is_subscribed(&self, filter: &str) -> bool {
        self.subscriptions.iter().any(|f| f == filter)
    }

    /// Starts or stops desired patches as the subscriptions say.
    fn watch_desired(&mut self) -> Result<(), ConnectionEnd> {
        if self.is_subscribed(topics::TWIN_DESIRED_FILTER) {
            self.desired
                .start(&self.ctx.twins, &self.identity)
                .or_else(|e| self.twin_failure(e))?;
        } else {
            self.desired.stop();
        }
        Ok(())
    }

    /// The manifest's desired properties changed: the module's patch, if any.
    fn send_desired_patch(&mut self) -> Result<(), ConnectionEnd> {
        match self.desired.next_patch(&self.ctx.twins, &self.identity) {
            Ok(Some(patch)) => self.reply(Packet::Publish(patch)),
            Ok(None) => Ok(()),
            Err(e) => self.twin_failure(e),
        }
    }

    /// A twin that could not be read: the end if this hub is fenced, else logged (the module
    /// gets no patch; its next GET answers the error).
    fn twin_failure(&self, error: crate::twin::TwinError) -> Result<(), ConnectionEnd> {
        if error.status().is_none() {
            return Err(ConnectionEnd::Twin(error));
        }
        tracing::error!(client_id = %self.client_id, %error, "cannot read the module's twin");
        Ok(())
    }

    fn message_from(
        &self,
        publish: &Publish,
        topic: &EventsTopic<'_>,
    ) -> Result<Message, ConnectionEnd> {
        if !topic.is_from(
            self.identity.device.as_str(),
            Some(self.identity.module.as_str()),
        ) {
            return Err(ConnectionEnd::Violation(format!(
                "{} may publish only as itself, not on {:?}",
                self.identity, publish.topic
            )));
        }
        Ok(property_bag::message_from_publish(
            &self.identity.device,
            Some(&self.identity.module),
            topic.bag,
            publish.payload.clone(),
        ))
    }

    fn on_puback(&mut self, pkid: u16) -> Result<(), ConnectionEnd> {
        match self.deliveries.on_puback(pkid) {
            Ok(acked) => {
                let _ = acked.send(DeliveryOutcome::Delivered);
                self.metrics.sent();
                self.send_waiting();
                Ok(())
            }
            // A PUBACK for nothing we sent: a buggy or confused client; ignore, as brokers do.
            Err(e) => {
                tracing::debug!(client_id = %self.client_id, error = %e, "unsolicited PUBACK");
                Ok(())
            }
        }
    }

    fn on_subscribe(&mut self, sub: Subscribe, outbound: &OutboundTx) -> Result<(), ConnectionEnd> {
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut granted = Vec::new();
        for f in &sub.filters {
            let decision = topics::authorize_subscribe(
                &f.path,
                self.identity.device.as_str(),
                Some(self.identity.module.as_str()),
            );
            match decision.granted_qos(f.qos) {
                Some(qos) => {
                    codes.push(SubscribeReasonCode::Success(qos));
                    granted.push(f.path.clone());
                }
                None => {
                    tracing::warn!(client_id = %self.client_id, filter = %f.path, "subscription refused");
                    codes.push(SubscribeReasonCode::Failure);
                }
            }
        }
        // A persistent session's subscriptions are on disk before the SUBACK; a clean session's
        // live only as long as this connection.
        if !self.clean {
            if let Err(e) = self.sessions.subscribe(&self.client_id, &granted) {
                tracing::error!(client_id = %self.client_id, error = %e, "session store failed");
                return Err(ConnectionEnd::Sessions(e));
            }
        }
        for f in granted {
            if !self.subscriptions.contains(&f) {
                self.subscriptions.push(f);
            }
        }
        // The module takes method requests from before its SUBACK: an SDK that invokes as
        // soon as its handler is set (after the SUBACK) finds it.
        self.update_methods_target();
        self.watch_desired()?;
        self.reply(Packet::SubAck(SubAck::new(sub.pkid, codes)))?;
        if self.subscribed_to_inputs() && self.outbound_tx.is_none() {
            self.register_inputs(outbound);
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, unsub: Unsubscribe) -> Result<(), ConnectionEnd> {
        if !self.clean {
            if let Err(e) = self.sessions.unsubscribe(&self.client_id, &unsub.topics) {
                return Err(ConnectionEnd::Sessions(e));
            }
        }
        self.subscriptions.retain(|f| !unsub.topics.contains(f));
        self.watch_desired()?;
        // Deliveries stop only when no filter covering the inputs is left.
        if !self.subscribed_to_inputs() {
            self.unregister_inputs();
        }
        self.update_methods_target();
        self.reply(Packet::UnsubAck(UnsubAck::new(unsub.pkid)))?;
        Ok(())
    }

    fn subscribed_to_inputs(&self) -> bool {
        self.subscriptions
            .iter()
            .any(|f| self.owns_inputs_filter(f))
    }

    fn owns_inputs_filter(&self, filter: &str) -> bool {
        matches!(
            topics::authorize_subscribe(
                filter,
                self.identity.device.as_str(),
                Some(self.identity.module.as_str()),
            ),
            SubscribeDecision::ModuleInputs
        )
    }

    /// Makes this connection the sink of every input endpoint of its module.
    fn register_inputs(&mut self, outbound: &OutboundTx) {
        self.outbound_tx = Some(outbound.clone());
        if let Some(replica) = &mut self.replica {
            replica.attach(outbound);
            return;
        }
        let (connections, identity, conn_id) =
            (&self.ctx.connections, &self.identity, self.conn_id);
        // Only while this is the module's live connection: a replaced one that is still
        // reading never overwrites its successor's sinks.
        let (registered, _) = self.ctx.register_input_sinks(identity, outbound, || {
            connections.is_current(identity, conn_id)
        });
        let previous = std::mem::replace(&mut self.registered, registered);
        self.ctx.unregister_own_sinks(&previous);
    }

    /// After a reload: also the sink of the input endpoints routes now name for this module.
    fn register_new_inputs(&mut self) {
        if let Some(replica) = &mut self.replica {
            replica.join_new_inputs(&self.ctx, &self.identity);
            return;
        }
        let Some(outbound) = self.outbound_tx.clone() else {
            return;
        };
        let (connections, identity, conn_id) =
            (&self.ctx.connections, &self.identity, self.conn_id);
        self.ctx.register_new_input_sinks(
            identity,
            &outbound,
            || connections.is_current(identity, conn_id),
            &mut self.registered,
        );
    }

    fn unregister_inputs(&mut self) {
        if self.outbound_tx.take().is_some() {
            self.ctx
                .unregister_own_sinks(&std::mem::take(&mut self.registered));
        }
    }

    /// Sends waiting deliveries while the window and the outgoing queue have room.
    fn send_waiting(&mut self) {
        while self.deliveries.can_send() && self.out.capacity() > 0 {
            let Some(delivery) = self.waiting.pop_front() else {
                return;
            };
            if delivery.acked.is_closed() {
                continue;
            }
            let topic = match topics::delivery_topic_and_bag(
                &self.identity.device,
                &self.identity.module,
                &delivery.input,
                &delivery.message,
            ) {
                Ok(topic) => topic,
                Err(e) => {
                    tracing::error!(client_id = %self.client_id, error = %e, "cannot name a delivery topic");
                    let _ = delivery.acked.send(sink::NOT_DELIVERED);
                    continue;
                }
            };
            let Ok(pkid) = self.deliveries.on_send(delivery.acked) else {
                return;
            };
            let mut publish = Publish::new(topic, QoS::AtLeastOnce, Vec::new());
            publish.payload = delivery.message.body().clone();
            publish.pkid = pkid;
            // A slot is free (checked above; only this task fills the queue).
            let _ = self.out.try_send(Packet::Publish(publish));
        }
    }

    /// Makes this connection the module's direct-method target while it is subscribed to
    /// `$iothub/methods/POST/#` (and the module's live connection), and stops it otherwise.
    fn update_methods_target(&mut self) {
        let wanted = self
            .subscriptions
            .iter()
            .any(|f| f == methods::METHODS_FILTER);
        // Only the module's live connection: a replaced one still reading never takes its
        // successor's place.
        let current = self
            .ctx
            .connections
            .is_current(&self.identity, self.conn_id);
        match (&self.method_tx, wanted, self.methods_attached) {
            (Some(tx), true, false) if current => {
                self.methods_attached =
                    self.ctx
                        .methods
                        .attach(&self.identity, self.conn_id, tx.clone());
            }
            (_, false, true) => {
                self.ctx.methods.detach(&self.identity, self.conn_id);
                self.methods_attached = false;
            }
            _ => {}
        }
    }

    /// Publishes a direct-method request (QoS 0, as IoT Hub: a method is at most once). The
    /// select arm runs only with a free slot in the outgoing queue, which only this task fills.
    fn send_method_request(&mut self, call: MethodCall) {
        let topic = methods::request_topic(&call);
        let mut publish = Publish::new(topic, QoS::AtMostOnce, Vec::new());
        publish.payload = call.payload;
        let _ = self.out.try_send(Packet::Publish(publish));
    }

    /// A response on `$iothub/methods/res/{status}/?$rid=…`: it completes the request with that
    /// id only if the request was handed to this very connection; anything else is logged and
    /// dropped.
    fn relay_method_response(&self, publish: &Publish) {
        let Some((status, rid)) = methods::parse_response_topic(&publish.topic) else {
            tracing::warn!(client_id = %self.client_id, topic = %publish.topic, "method response without a status or $rid ignored");
            return;
        };
        let response = methods::MethodResponse {
            status,
            payload: publish.payload.clone(),
        };
        match self
            .ctx
            .methods
            .relay(&self.identity, self.conn_id, rid, response)
        {
            methods::Relayed::Completed => {
                tracing::debug!(client_id = %self.client_id, rid, status, "method response relayed")
            }
            other => {
                tracing::warn!(client_id = %self.client_id, rid, status, outcome = ?other, "method response ignored: no request with that $rid is pending on this connection")
            }
        }
    }

    /// Leaves the registry and gives unacknowledged deliveries back to their workers (a
    /// replica leaves its inputs first, so what it held is abandoned once, and counted).
    fn finish(&mut self, end: &ConnectionEnd) {
        if self.methods_attached {
            self.ctx.methods.detach(&self.identity, self.conn_id);
            self.methods_attached = false;
        }
        if let Some(replica) = &mut self.replica {
            replica.leave_all(matches!(end, ConnectionEnd::ClientClosed));
        }
        self.unregister_inputs();
        self.ctx.connections.leave(&self.identity, self.conn_id);
        // Dropping the senders answers "not delivered" to every waiting sink.
        self.deliveries.clear();
        self.waiting.clear();
    }
}

/// A publish the connection refuses whatever its topic: QoS 2, or a body over
/// [`MAX_MESSAGE_BYTES`].
fn check_publish(qos: QoS, payload_len: usize) -> Result<(), ConnectionEnd> {
    match session_state::inbound_qos(qos) {
        session_state::InboundQos::CloseConnection => {
            return Err(ConnectionEnd::Violation("QoS 2 is not supported".into()))
        }
        session_state::InboundQos::NoAck | session_state::InboundQos::AckWhenDurable => {}
    }
    if payload_len > MAX_MESSAGE_BYTES {
        return Err(ConnectionEnd::Violation(format!(
            "message of {payload_len} bytes exceeds the limit of {MAX_MESSAGE_BYTES}"
        )));
    }
    Ok(())
}

/// What a QoS 1 publish's packet id means for it.
#[derive(Debug, PartialEq, Eq)]
enum PacketIdClaim {
    /// A new publish: its PUBACK waits for its turn.
    Claimed(session_state::AckToken),
    /// A resend (DUP) of a publish still awaiting its PUBACK: dropped, the original's answers.
    Resend(u16),
}

/// Decides on a QoS 1 publish from the acknowledgement state's answer for its packet id: a
/// packet id in use is a resend with DUP, and breaks MQTT-2.3.1-2 without.
fn claim_packet_id(
    claimed: Result<session_state::AckToken, session_state::StateError>,
    dup: bool,
) -> Result<PacketIdClaim, ConnectionEnd> {
    match claimed {
        Ok(token) => Ok(PacketIdClaim::Claimed(token)),
        Err(session_state::StateError::PacketIdInUse(pkid)) if dup => {
            Ok(PacketIdClaim::Resend(pkid))
        }
        Err(session_state::StateError::PacketIdInUse(pkid)) => Err(ConnectionEnd::Violation(
            format!("packet id {pkid} reused without DUP before its PUBACK"),
        )),
        Err(e) => Err(ConnectionEnd::AckState(e)),
    }
}

/// The end of a connection whose writer task stopped (the socket is gone).
fn writer_stopped() -> ConnectionEnd {
    ConnectionEnd::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the connection's writer stopped",
    ))
}

/// The connection's acker task and what the connection loop waits on from it.
struct Acker {
    task: tokio::task::JoinHandle<()>,
    /// Waits for room in the acker's queue when it is full.
    room: mpsc::Sender<(Option<session_state::AckToken>, PendingAck)>,
    /// Notified when a PUBACK frees a packet id.
    released: Arc<Notify>,
    /// The first routing failure the acker met (it then stops acknowledging).
    route_failed: oneshot::Receiver<RouteError>,
}

impl Acker {
    /// Lets the acker send what is durable, for at most [`CLOSE_GRACE`]; the connection has
    /// dropped its own sender already.
    async fn finish(self) {
        let Acker {
            mut task,
            room,
            released,
            route_failed,
        } = self;
        drop(room);
        if tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err() {
            task.abort();
        }
        drop((released, route_failed));
    }
}

/// What the connection loop reads from besides the acker: the socket, and the events that
/// end or change the connection.
struct LoopInput<R> {
    reader: R,
    buf: BytesMut,
    keep_alive: Duration,
    replaced: watch::Receiver<bool>,
    /// Deliveries handed over by the module's input sinks.
    outbound_rx: sink::OutboundRx,
    /// Direct-method requests for this connection.
    methods_rx: methods::MethodRx,
    shutdown: watch::Receiver<bool>,
    routes_changed: watch::Receiver<u64>,
    /// Changes when a reload changes the manifest's desired properties.
    desired_changes: watch::Receiver<u64>,
}

/// A PUBACK waiting for its turn.
enum PendingAck {
    /// After the router says the message is durable; when the PUBLISH arrived (for the PUBACK
    /// latency metric).
    Routed(RouteAck, std::time::Instant),
    /// As soon as every earlier one went out (a publish that is not routed).
    Now,
    /// Never (QoS 0); only awaited, and its failure logged.
    Unacknowledged(RouteAck),
}

/// Publishes read while the connection is held, in arrival order (flow control).
#[derive(Default)]
struct Parked {
    publishes: VecDeque<Publish>,
    bytes: usize,
}

/// What to do with a packet just read.
#[derive(Debug)]
enum Parking {
    /// Kept until the connection is released.
    Parked,
    /// Handled now.
    Handle(Packet),
    /// A DISCONNECT behind parked publishes.
    Goodbye,
}

impl Parked {
    /// Whether a packet may be read: always when nothing holds the connection and nothing is
    /// parked; while held, until the parked publishes reach their bound.
    fn may_read(&self, held: bool) -> bool {
        if held {
            self.publishes.len() < MAX_PARKED && self.bytes < MAX_PARKED_BYTES
        } else {
            self.publishes.is_empty()
        }
    }

    /// Parks a publish read while held (or behind parked ones); everything else is handled.
    fn park(&mut self, held: bool, packet: Packet) -> Parking {
        match packet {
            Packet::Publish(p) if held || !self.publishes.is_empty() => {
                self.bytes += p.payload.len();
                self.publishes.push_back(p);
                Parking::Parked
            }
            Packet::Disconnect if !self.publishes.is_empty() => Parking::Goodbye,
            other => Parking::Handle(other),
        }
    }

    fn pop(&mut self) -> Option<Publish> {
        let p = self.publishes.pop_front()?;
        self.bytes = self.bytes.saturating_sub(p.payload.len());
        Some(p)
    }
}

impl PendingAck {
    /// A flow-control hold on the producer, if the routed message's endpoints ask for one.
    fn hold(&self) -> Option<router::FlowHold> {
        match self {
            PendingAck::Routed(ack, _) | PendingAck::Unacknowledged(ack) => ack.hold(),
            PendingAck::Now => None,
        }
    }
}

/// Awaits route acknowledgements in arrival order and sends the PUBACKs in that order, each
/// released by `inbound` (which frees its packet id) and then `released` notified. On the first
/// failure it stops: that publish and every later one stay unacknowledged.
async fn ack_in_order(
    mut acks: mpsc::Receiver<(Option<session_state::AckToken>, PendingAck)>,
    out: mpsc::Sender<u16>,
    inbound: Arc<Mutex<session_state::InboundAcks>>,
    released: Arc<Notify>,
    failed: oneshot::Sender<RouteError>,
    metrics: Arc<HubMetrics>,
) {
    while let Some((token, ack)) = acks.recv().await {
        let routed = match ack {
            PendingAck::Routed(ack, arrived) => ack.await.map(|_| {
                metrics.publish_acked(arrived.elapsed());
            }),
            PendingAck::Now => Ok(()),
            PendingAck::Unacknowledged(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(error = %e, "a QoS 0 message could not be stored");
                }
                continue;
            }
        };
        let Some(token) = token else { continue };
        match routed {
            Ok(()) => {
                // Awaited in arrival order, so this releases exactly this publish's id.
                let ready = lock(&inbound).on_durable(token).unwrap_or_default();
                released.notify_one();
                for pkid in ready {
                    if out.send(pkid).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = lock(&inbound).on_failed(token);
                tracing::warn!(reason = %e, "a publish could not be stored; closing without PUBACK");
                let _ = failed.send(e);
                return;
            }
        }
    }
}

fn lock(
    inbound: &Mutex<session_state::InboundAcks>,
) -> std::sync::MutexGuard<'_, session_state::InboundAcks> {
    inbound.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one packet, keeping leftover bytes in `buf`.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, ConnectionEnd> {
    loop {
        match Packet::read(buf, MAX_PACKET_BYTES) {
            Ok(packet) => return Ok(packet),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                return Err(ConnectionEnd::Violation(format!(
                    "packet of {n} bytes exceeds the limit of {MAX_PACKET_BYTES}"
                )))
            }
            Err(e) => return Err(ConnectionEnd::Malformed(e.to_string())),
        }
        buf.reserve(4096);
        if reader.read_buf(buf).await? == 0 {
            return Err(ConnectionEnd::ClientClosed);
        }
    }
}

/// Writes replies, deliveries and PUBACKs until every sender is gone, flushing when both
/// queues run dry. Replies go first when both wait (the CONNACK is queued before any PUBACK can
/// be), then the two queues are drained in turn, at most about 64 KiB per write.
async fn write_packets<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut packets: mpsc::Receiver<Packet>,
    mut pubacks: mpsc::Receiver<u16>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        tokio::select! {
            biased;
            Some(packet) = packets.recv() => encode(&packet, &mut buf),
            Some(pkid) = pubacks.recv() => encode(&Packet::PubAck(PubAck::new(pkid)), &mut buf),
            else => break,
        }
        while buf.len() <= 64 * 1024 {
            let packet = packets.try_recv().ok();
            let puback = pubacks.try_recv().ok();
            if packet.is_none() && puback.is_none() {
                break;
            }
            if let Some(packet) = packet {
                encode(&packet, &mut buf);
            }
            if let Some(pkid) = puback {
                encode(&Packet::PubAck(PubAck::new(pkid)), &mut buf);
            }
        }
        writer.write_all(&buf).await?;
        writer.flush().await?;
        buf.clear();
    }
    writer.shutdown().await
}

fn encode(packet: &Packet, buf: &mut BytesMut) {
    if let Err(e) = packet.write(buf, usize::MAX) {
        tracing::error!(error = %e, "could not encode an outgoing packet");
    }
}

/// Endpoint of a module input, for sink registration.
pub fn input_endpoint(identity: &Identity, input: &router::InputName) -> Endpoint {
    Endpoint::ModuleInput {
        module: identity.module.clone(),
        input: input.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use router::{DeviceId, ModuleId, RouteTable};
    use rumqttc::mqttbytes::v4::Connect;
    use store::{Fs, FsFile, OsFs, Store, StoreOptions, SystemClock};

    use super::*;
    use crate::auth::sas;
    use crate::head::registry::Registry;
    use crate::identity::Identities;
    use crate::limits::{Budget, LimitMetrics, Limits, Slot};

    const IOTHUB: &str = "edgehub.test";
    const DEVICE: &str = "edge-device";

    #[test]
    fn publishes_of_qos_2_or_over_the_size_limit_are_violations() {
        assert!(check_publish(QoS::AtMostOnce, 0).is_ok());
        assert!(check_publish(QoS::AtLeastOnce, MAX_MESSAGE_BYTES).is_ok());
        let qos2 = check_publish(QoS::ExactlyOnce, 0).unwrap_err();
        assert_eq!(
            qos2.to_string(),
            "protocol violation: QoS 2 is not supported"
        );
        let big = check_publish(QoS::AtLeastOnce, MAX_MESSAGE_BYTES + 1).unwrap_err();
        assert!(
            matches!(&big, ConnectionEnd::Violation(m) if m.contains("exceeds the limit")),
            "{big}"
        );
    }

    #[test]
    fn a_packet_id_in_use_is_a_resend_with_dup_and_a_violation_without() {
        let mut acks = session_state::InboundAcks::new(4);
        let first = acks.on_publish(7);
        let token = *first.as_ref().unwrap();
        assert_eq!(
            claim_packet_id(first, false).unwrap(),
            PacketIdClaim::Claimed(token)
        );
        assert_eq!(
            claim_packet_id(acks.on_publish(7), true).unwrap(),
            PacketIdClaim::Resend(7)
        );
        let reused = claim_packet_id(acks.on_publish(7), false).unwrap_err();
        assert_eq!(
            reused.to_string(),
            "protocol violation: packet id 7 reused without DUP before its PUBACK"
        );
    }

    /// A head context on `dir` (no routes), the CONNECT of module `m` with a good token, and
    /// the MQTT sessions kept in `dir`, owned by the context's store.
    fn context(
        dir: &Path,
    ) -> (
        Arc<HeadContext>,
        watch::Sender<bool>,
        Connect,
        Arc<Sessions>,
    ) {
        context_with(dir, Arc::new(OsFs), Vec::new())
    }

    /// [`context`] with the store on `fs` and `routes`.
    /// A slot in a default-sized MQTT budget, as the accept loop hands one to a connection.
    fn test_slot() -> Slot {
        Budget::new("mqtt", Limits::default(), LimitMetrics::default())
            .admit("test")
            .unwrap()
            .slot()
    }

    fn context_with(
        dir: &Path,
        fs: Arc<dyn Fs>,
        routes: Vec<router::Route>,
    ) -> (
        Arc<HeadContext>,
        watch::Sender<bool>,
        Connect,
        Arc<Sessions>,
    ) {
        let store = Store::open_with(
            dir.join("store"),
            StoreOptions::default(),
            fs,
            Arc::new(SystemClock),
        )
        .unwrap();
        let sessions = Arc::new(Sessions::load(dir, Arc::new(store.clone())).unwrap());
        let twins = Arc::new(
            crate::twin::Twins::new(dir, Arc::new(store.clone()), Default::default()).unwrap(),
        );
        let dispatcher = Arc::new(
            router::Dispatcher::start(
                store,
                Arc::new(SystemClock),
                router::DispatcherConfig::default(),
            )
            .unwrap(),
        );
        let router = router::Router::new(RouteTable::new(routes), &dispatcher);
        let device = DeviceId::new(DEVICE);
        let module = ModuleId::new("m");
        let identities =
            Identities::load_or_create(dir, &device, std::slice::from_ref(&module)).unwrap();
        let key = identities
            .key(&Identity::new(device, module))
            .unwrap()
            .to_vec();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let ctx = HeadContext {
            router,
            dispatcher,
            identities: Arc::new(identities),
            connections: Registry::default(),
            metrics: Arc::new(HubMetrics::new(IOTHUB, DEVICE)),
            shutdown,
            audiences: vec![IOTHUB.to_owned()],
            routes_changed: watch::channel(0).0,
            clock: Arc::new(SystemClock),
            methods: Arc::default(),
            twins,
        };
        let resource = sas::resource_uri(IOTHUB, DEVICE, Some("m"));
        let token = sas::generate(&resource, &key, ctx.now_secs() + 3600);
        let mut connect = Connect::new(format!("{DEVICE}/m"));
        connect.clean_session = true;
        // 0: the hub's longest keep-alive timeout (10 min).
        connect.keep_alive = 0;
        connect.set_login(
            format!("{IOTHUB}/{DEVICE}/m/?api-version=2019-10-01"),
            token,
        );
        (Arc::new(ctx), shutdown_tx, connect, sessions)
    }

    /// The OS filesystem, with every `sync_data` held while the gate is closed: a disk whose
    /// fdatasync stalls.
    #[derive(Debug, Default)]
    struct GatedFs {
        closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl GatedFs {
        fn set_closed(&self, closed: bool) {
            let (lock, cv) = &*self.closed;
            *lock.lock().unwrap() = closed;
            cv.notify_all();
        }
    }

    #[derive(Debug)]
    struct GatedFile {
        file: Arc<dyn FsFile>,
        closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl FsFile for GatedFile {
        fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
            self.file.read_at(buf, pos)
        }
        fn write_all_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
            self.file.write_all_at(buf, pos)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            let (lock, cv) = &*self.closed;
            let mut closed = lock.lock().unwrap();
            while *closed {
                closed = cv.wait(closed).unwrap();
            }
            drop(closed);
            self.file.sync_data()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
    }

    impl Fs for GatedFs {
        fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
            OsFs.create_dir_all(dir)
        }
        fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
            OsFs.list(dir)
        }
        fn create_new(&self, path: &Path) -> std::io::Result<Arc<dyn FsFile>> {
            let file = OsFs.create_new(path)?;
            Ok(Arc::new(GatedFile {
                file,
                closed: Arc::clone(&self.closed),
            }))
        }
        fn open(&self, path: &Path) -> std::io::Result<Arc<dyn FsFile>> {
            let file = OsFs.open(path)?;
            Ok(Arc::new(GatedFile {
                file,
                closed: Arc::clone(&self.closed),
            }))
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            OsFs.remove(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            OsFs.rename(from, to)
        }
        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            OsFs.sync_dir(dir)
        }
    }

    /// Writes `chunk` until a write stalls for 5 s of paused time (every task blocked) or
    /// `total` chunks went out; returns how many went out.
    async fn write_until_stalled<W: AsyncWrite + Unpin>(
        w: &mut W,
        chunk: &[u8],
        total: usize,
    ) -> usize {
        let mut written = 0;
        while written < total {
            match tokio::time::timeout(Duration::from_secs(5), w.write_all(chunk)).await {
                Ok(Ok(())) => written += 1,
                Ok(Err(e)) => panic!("the hub closed after {written} chunks: {e}"),
                Err(_) => break,
            }
        }
        written
    }

    /// Sends CONNECT on `tx` and reads the CONNACK on `rx`.
    async fn connect<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        rx: &mut R,
        tx: &mut W,
        connect: Connect,
    ) {
        tx.write_all(&bytes_of(&Packet::Connect(connect)))
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let connack = loop {
            match Packet::read(&mut buf, 1024) {
                Ok(p) => break p,
                Err(CodecError::InsufficientBytes(_)) => {
                    assert!(rx.read_buf(&mut buf).await.unwrap() > 0, "closed");
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        assert!(
            matches!(&connack, Packet::ConnAck(a) if a.code == ConnectReturnCode::Success),
            "{connack:?}"
        );
    }

    /// Issue 11, item 2, for QoS 0: a QoS 0 publish needs no PUBACK, but until it is durable it
    /// holds memory in the hub. With the disk's fdatasync stalled, a module flooding QoS 0
    /// publishes must stop being read after a bounded number (MAX_PENDING_ACKS awaiting the
    /// store), not have every one of them held.
    #[tokio::test(start_paused = true)]
    async fn qos0_publishes_awaiting_a_stalled_disk_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(GatedFs::default());
        let route = router::Route::parse(
            router::RouteId::new("r"),
            "FROM /messages/modules/m/outputs/* INTO $upstream",
            router::Priority(0),
            router::Ttl::Infinite,
        )
        .unwrap();
        let (ctx, _shutdown, connect_packet, sessions) =
            context_with(dir.path(), Arc::clone(&fs) as Arc<dyn Fs>, vec![route]);
        let (client, server) = tokio::io::duplex(16 * 1024);
        let conn = tokio::spawn(serve(
            server,
            Arc::clone(&ctx),
            sessions,
            "test".into(),
            test_slot(),
        ));
        let (mut rx, mut tx) = tokio::io::split(client);
        connect(&mut rx, &mut tx, connect_packet).await;
        fs.set_closed(true);
        let topic = format!("devices/{DEVICE}/modules/m/messages/events/%24.on=out1");
        const CHUNK: usize = 100;
        let mut chunk = BytesMut::new();
        for _ in 0..CHUNK {
            Packet::Publish(Publish::new(&topic, QoS::AtMostOnce, b"q0".to_vec()))
                .write(&mut chunk, usize::MAX)
                .unwrap();
        }
        let per_publish = chunk.len() / CHUNK;
        // 20,000 publishes (about 1.2 MB); the pipe holds 16 KiB of them, the hub's read buffer
        // less than as much again.
        let total = 200;
        let chunks = write_until_stalled(&mut tx, &chunk, total).await;
        let taken = chunks * CHUNK;
        let bound = MAX_PENDING_ACKS + 2 * (16 * 1024) / per_publish + 2 * CHUNK;
        fs.set_closed(false);
        assert!(
            chunks < total,
            "the hub read all {} QoS 0 publishes while none could become durable",
            total * CHUNK
        );
        assert!(taken <= bound, "{taken} publishes taken, more than {bound}");
        // The store's writer thread works outside tokio's clock: from here on, real time.
        tokio::time::resume();
        drop((rx, tx));
        let end = tokio::time::timeout(Duration::from_secs(60), conn).await;
        assert!(
            end.is_ok(),
            "the connection did not end after the client left"
        );
    }

    fn bytes_of(packet: &Packet) -> BytesMut {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).unwrap();
        buf
    }

    /// Issue 11, item 2: a module that writes without reading (5,000,000 PINGREQs took the hub
    /// from 9 MiB to 405 MiB). Over an in-memory pipe of 16 KiB each way (no kernel buffers),
    /// the client floods PINGREQs and reads nothing. The hub must stop reading once what it owes
    /// the client fills its bounded outgoing queue and the pipe: the client's writes stall
    /// after a bounded number of pings (tokio's paused clock fires the stall timeout only when
    /// every task is blocked), and the connection later ends on its own.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_not_read_either_and_memory_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _shutdown, connect_packet, sessions) = context(dir.path());
        let (client, server) = tokio::io::duplex(16 * 1024);
        let conn = tokio::spawn(serve(
            server,
            Arc::clone(&ctx),
            sessions,
            "test".into(),
            test_slot(),
        ));
        let (mut rx, mut tx) = tokio::io::split(client);
        connect(&mut rx, &mut tx, connect_packet).await;
        // 100,000 PINGREQs (200 KB) in chunks of 1,000, and never a byte read from here on.
        const TOTAL: usize = 100_000;
        const CHUNK: usize = 1_000;
        let chunk = bytes_of(&Packet::PingReq).repeat(CHUNK);
        let mut written = 0;
        while written < TOTAL {
            match tokio::time::timeout(Duration::from_secs(5), tx.write_all(&chunk)).await {
                Ok(Ok(())) => written += CHUNK,
                Ok(Err(e)) => panic!("the hub closed after {written} pings: {e}"),
                Err(_) => break,
            }
        }
        // What the hub can have taken (2 bytes a ping, 2 a reply): the pipe to it, its read
        // buffer (under 16 KiB), its outgoing queue and the writer's batch (each at most
        // OUTGOING_CAPACITY), the pipe back, and a chunk in flight.
        let bound = 16 * 1024 / 2 + 16 * 1024 / 2 + 2 * OUTGOING_CAPACITY + 16 * 1024 / 2 + CHUNK;
        assert!(
            written < TOTAL,
            "the hub read all {TOTAL} PINGREQs (queueing a PINGRESP for each) while the client \
             read nothing"
        );
        assert!(written <= bound, "{written} pings taken, more than {bound}");
        // Stalled, the connection gets no packet: it ends when its keep-alive runs out, even
        // though the client still reads nothing.
        let end = tokio::time::timeout(MAX_KEEP_ALIVE_PLUS, conn)
            .await
            .expect("the stalled connection never ended")
            .unwrap();
        assert!(matches!(end, ConnectionEnd::KeepAlive), "{end}");
        drop(rx);
    }

    const MAX_KEEP_ALIVE_PLUS: Duration = Duration::from_secs(3600);

    /// Reads packets from `rx` until the hub sends a SUBACK or closes the connection (within
    /// 30 s).
    async fn packets_until_suback_or_closed<R: AsyncRead + Unpin>(rx: &mut R) -> Vec<Packet> {
        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        let read_all = async {
            loop {
                match Packet::read(&mut buf, 1024 * 1024) {
                    Ok(p) => {
                        let suback = matches!(p, Packet::SubAck(_));
                        packets.push(p);
                        if suback {
                            break;
                        }
                    }
                    Err(CodecError::InsufficientBytes(_)) => match rx.read_buf(&mut buf).await {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    },
                    Err(e) => panic!("{e:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read_all)
            .await
            .expect("the hub neither answered nor closed in 30 s");
        packets
    }

    /// Issue 15, double start (found by the failover simulation, 1 run in 6-8): two hubs start
    /// on one volume; a module connects to the one the other has already fenced, before it
    /// noticed. That hub took the module's SUBSCRIBE, wrote it to the sessions file after the
    /// live hub had read it, and answered SUBACK. The module (the Python SDK never subscribes
    /// again after a reconnect: it relies on its persistent session) moved to the live hub,
    /// which answered "no session", and got none of its messages. A hub whose data directory
    /// a newer hub claimed must acknowledge no subscription: the module's subscribe then fails
    /// and is made again, on the live hub.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hub_fenced_before_it_noticed_acknowledges_no_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _shutdown, mut connect_packet, sessions) = context(dir.path());
        connect_packet.clean_session = false;
        let (client, server) = tokio::io::duplex(16 * 1024);
        let conn = tokio::spawn(serve(
            server,
            Arc::clone(&ctx),
            sessions,
            "test".into(),
            test_slot(),
        ));
        let (mut rx, mut tx) = tokio::io::split(client);
        connect(&mut rx, &mut tx, connect_packet).await;
        let subscribe = |pkid: u16, filter: &str| {
            let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
            s.pkid = pkid;
            bytes_of(&Packet::Subscribe(s))
        };
        // While it owns the directory, the hub acknowledges a subscription.
        tx.write_all(&subscribe(
            1,
            &format!("devices/{DEVICE}/modules/m/inputs/first"),
        ))
        .await
        .unwrap();
        let mut buf = BytesMut::new();
        let suback = loop {
            match Packet::read(&mut buf, 1024) {
                Ok(p) => break p,
                Err(CodecError::InsufficientBytes(_)) => {
                    assert!(rx.read_buf(&mut buf).await.unwrap() > 0, "closed");
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        assert!(matches!(suback, Packet::SubAck(_)), "{suback:?}");
        // Another hub opens the same data directory. This one has written nothing to its store
        // since, so it has not noticed.
        let _newer = Store::open(dir.path().join("store"), StoreOptions::default()).unwrap();
        tx.write_all(&subscribe(
            2,
            &format!("devices/{DEVICE}/modules/m/inputs/#"),
        ))
        .await
        .unwrap();
        let packets = packets_until_suback_or_closed(&mut rx).await;
        assert!(
            !packets.iter().any(|p| matches!(p, Packet::SubAck(_))),
            "a fenced hub acknowledged a subscription the live hub will not know: {packets:?}"
        );
        let end = tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .expect("the connection did not end")
            .unwrap();
        assert!(end.to_string().contains("fenced"), "{end}");
    }

    /// Reads packets from `rx` until the hub closes the connection (within 30 s).
    async fn packets_until_closed<R: AsyncRead + Unpin>(rx: &mut R) -> Vec<Packet> {
        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        let read_all = async {
            loop {
                match Packet::read(&mut buf, 1024 * 1024) {
                    Ok(p) => packets.push(p),
                    Err(CodecError::InsufficientBytes(_)) => match rx.read_buf(&mut buf).await {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    },
                    Err(e) => panic!("{e:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read_all)
            .await
            .expect("the hub did not close in 30 s");
        packets
    }

    /// Issue 16 (twins, failover): a reported-properties patch is answered 204 only while this
    /// hub owns the data directory. A hub that a newer one fenced, before it noticed, must
    /// answer no patch (neither 204 nor PUBACK): the module's patch then times out and is sent
    /// again, to the live hub, which would never know a patch the fenced one acknowledged.
    /// (Before twins were served, every patch was answered 501 at once, fenced or not.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hub_fenced_before_it_noticed_answers_no_reported_properties_patch() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, _shutdown, connect_packet, sessions) = context(dir.path());
        let (client, server) = tokio::io::duplex(16 * 1024);
        let conn = tokio::spawn(serve(
            server,
            Arc::clone(&ctx),
            sessions,
            "test".into(),
            test_slot(),
        ));
        let (mut rx, mut tx) = tokio::io::split(client);
        connect(&mut rx, &mut tx, connect_packet).await;
        let mut s = Subscribe::new("$iothub/twin/res/#", QoS::AtLeastOnce);
        s.pkid = 1;
        tx.write_all(&bytes_of(&Packet::Subscribe(s)))
            .await
            .unwrap();
        let packets = packets_until_suback_or_closed(&mut rx).await;
        assert!(
            matches!(packets.last(), Some(Packet::SubAck(_))),
            "{packets:?}"
        );
        let patch = |pkid: u16, rid: &str, body: &str| {
            let mut p = Publish::new(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                QoS::AtLeastOnce,
                body.as_bytes().to_vec(),
            );
            p.pkid = pkid;
            bytes_of(&Packet::Publish(p))
        };
        // While it owns the directory, the hub answers 204 with the new version, then PUBACK.
        tx.write_all(&patch(2, "a", r#"{"state": 1}"#))
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let mut answers = Vec::new();
        while answers.len() < 2 {
            match Packet::read(&mut buf, 1024 * 1024) {
                Ok(p) => answers.push(p),
                Err(CodecError::InsufficientBytes(_)) => {
                    assert!(rx.read_buf(&mut buf).await.unwrap() > 0, "closed");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(
            answers.iter().any(|p| matches!(p, Packet::Publish(p) if p.topic == "$iothub/twin/res/204/?$rid=a&$version=2")),
            "{answers:?}"
        );
        assert!(
            answers
                .iter()
                .any(|p| matches!(p, Packet::PubAck(a) if a.pkid == 2)),
            "{answers:?}"
        );
        // Another hub opens the same data directory; this one has not noticed.
        let _newer = Store::open(dir.path().join("store"), StoreOptions::default()).unwrap();
        tx.write_all(&patch(3, "b", r#"{"state": 2}"#))
            .await
            .unwrap();
        let packets = packets_until_closed(&mut rx).await;
        assert!(
            !packets
                .iter()
                .any(|p| matches!(p, Packet::Publish(_) | Packet::PubAck(_))),
            "a fenced hub answered a patch the live hub will not know: {packets:?}"
        );
        let end = tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .expect("the connection did not end")
            .unwrap();
        assert!(end.to_string().contains("fenced"), "{end}");
    }
}

/// The typed ends say what the strings said: logs and tests read these words.
#[cfg(test)]
mod error_messages {
    use super::*;
    use crate::auth::sas::SasError;
    use router::{DeviceId, ModuleId};

    #[test]
    fn typed_ends_read_as_the_strings_did() {
        let who = Identity::new(DeviceId::new("dev"), ModuleId::new("m"));
        let cases: Vec<(ConnectionEnd, &str)> = vec![
            (
                ConnectionEnd::NoConnect,
                "connection refused: no CONNECT within 60 s",
            ),
            (
                ConnectAuthError::NoLogin.into(),
                "connection refused: no username/password",
            ),
            (
                ConnectAuthError::ClientId {
                    client_id: "x".into(),
                    identity: "dev/m".into(),
                }
                .into(),
                "connection refused: client id \"x\" is not the identity \"dev/m\" of the username",
            ),
            (
                ConnectAuthError::NoModule.into(),
                "connection refused: a device without a module is not served",
            ),
            (
                ConnectAuthError::from(CredentialError::UnknownModule(who)).into(),
                "connection refused: unknown module dev/m",
            ),
            (
                ConnectAuthError::from(CredentialError::Token(SasError::BadSignature)).into(),
                "connection refused: SAS token: SAS token signature does not match the key",
            ),
            (
                ConnectAuthError::KeyChanged.into(),
                "connection refused: the module was removed or its key changed while it logged in",
            ),
            (
                ConnectionEnd::AckerStopped,
                "routing failed: acknowledger stopped",
            ),
            (
                ConnectionEnd::RanTwice,
                "routing failed: the connection ran twice",
            ),
            (
                ConnectionEnd::AckState(session_state::StateError::Failed),
                "routing failed: a publish failed; the connection must close",
            ),
        ];
        for (end, text) in cases {
            assert_eq!(end.to_string(), text, "{end:?}");
        }
    }

    #[test]
    fn a_route_end_keeps_its_cause() {
        let end = ConnectionEnd::from(RouteError::Store(store::AppendError::Storage(
            store::StorageError::Closed,
        )));
        let source = std::error::Error::source(&end).map(ToString::to_string);
        assert!(end.to_string().starts_with("routing failed: "), "{end}");
        assert_eq!(
            source,
            Some(
                RouteError::Store(store::AppendError::Storage(store::StorageError::Closed))
                    .to_string()
            )
        );
    }
}
