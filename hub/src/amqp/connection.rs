//! One AMQP 1.0 connection of a module (after TLS): the protocol header (with or without a SASL
//! layer), its sessions, and the links attached on them.
//!
//! Guarantees:
//! - The client must send its protocol header within [`OPEN_TIMEOUT`]; `AMQP 3.1.0.0` selects
//!   the SASL layer ([`crate::amqp::sasl`]), `AMQP 0.1.0.0` plain AMQP (the Node SDK); anything
//!   else is answered with our header and closed by the library.
//! - Every link announces a `max-message-size` the library enforces frame by frame while a
//!   delivery arrives (detaching the link with `amqp:link:message-size-exceeded`): 600 KiB on
//!   an events link, [`MAX_CBS_MESSAGE_BYTES`] on `$cbs` (which needs no authentication), so no
//!   client makes the hub buffer an unbounded delivery.
//! - Every attach is decided by the connection's [`ConnectionAuth`] (I/O-free): `$cbs` links
//!   always, a module's events link (outputs or inputs), twin links ([`twin`]) and method links
//!   ([`methods`]) only if that module is authenticated on this connection; every other attach
//!   is refused by attaching and detaching it at once with
//!   the error (`amqp:unauthorized-access`, `amqp:not-implemented`), so one module can never
//!   attach another module's links.
//! - An identity authenticated on this connection joins the head's registry of live connections:
//!   a newer connection (MQTT or AMQP) of the same module replaces this one, which closes.
//!   A replicated module's connection (`x-edgehub-replicas`) replaces none and is replaced by
//!   none: it joins its inputs' replica machines as a member ([`Membership`], shared with the
//!   MQTT head) when the identity authenticates (the `$cbs` put-token, before its answer; SASL
//!   PLAIN, after Open). One past the count (every member heard within 10 s) is refused,
//!   logged (warn, naming the module) and counted as `edgehub_client_connect_failed{reason=
//!   "replicas_full"}`: its put-token is answered 503 with the reason and the identity is not
//!   authenticated on the connection (the Node SDK then fails its connect, an
//!   UnauthorizedError it does not retry, and closes); authenticated by SASL PLAIN, the
//!   connection is closed with [`REPLICAS_FULL_CONDITION`]. Not a silent close while the
//!   put-token waits: the Node SDK (1.14.4) loses its pending connect callback then and hangs.
//!   Every frame read is a member's heartbeat; the machine closes the
//!   connection (no error) when it is displaced, scaled down or lost a delivery. When the
//!   connection ends it leaves the machines if the client closed it (Close without error),
//!   else it crashes (its deliveries in flight are abandoned, delivered again, counted).
//! - A client that sends nothing for [`IDLE_TIMEOUT_MS`] (announced in our Open; rhea sends an
//!   empty frame every half of it) is disconnected.
//! - A connection with no authenticated identity [`AUTHENTICATE_TIMEOUT`] after Open is
//!   closed; before that, what a client can make the hub hold is bounded: at most
//!   [`MAX_LINKS_PER_SESSION`] links per session (announced as `handle-max`, and enforced: an
//!   attach beyond it is refused with `amqp:resource-limit-exceeded`), `$cbs` requests of at
//!   most [`MAX_CBS_MESSAGE_BYTES`], and [`CBS_REPLY_QUEUE`] replies waiting (then requests are
//!   not read, so the client's credit runs out).
//! - The connection closes when its earliest SAS token (plus the clock skew) expires without a
//!   renewal put-token (the Node SDK renews well before).
//! - On hub shutdown, replacement, or the end of the connection, every link first settles what
//!   is already durable (events: `accepted` in order), then the links, sessions and the
//!   connection close (each close waits at most [`CLOSE_TIMEOUT`] for the peer). A malformed frame ends this connection only (fe2o3's engine closes it
//!   with a framing error); no other connection shares any state with it but the router.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SessionAcceptor, SupportedSenderSettleModes,
};
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorInfo, Role, SenderSettleMode};
use fe2o3_amqp::types::performatives::Attach;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch, Mutex as AsyncMutex, Notify};
use tokio::task::JoinSet;

use crate::amqp::auth_state::{ClientRole, ConnectionAuth, LinkDecision, RefuseCondition};
use crate::amqp::frame_guard::Guarded;
use crate::amqp::sasl::{HubSasl, SaslResult};
use crate::amqp::{cbs, convert, links, methods, twin};
use crate::head::context::HeadContext;
use crate::head::replica::{Membership, ReplicasFull};
use crate::head::sink::OutboundTx;
use crate::identity::Identity;
use router::replica_worker::Heartbeat;

/// How long a client has to send its protocol header after the TLS handshake.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Our Open's `idle-time-out`: a connection that sends nothing (not even the empty frames a
/// client sends every half of it) for this long is closed. Azure IoT Hub's value.
pub const IDLE_TIMEOUT_MS: u32 = 240_000;
/// Our container id in Open.
const CONTAINER_ID: &str = "edgehub";
/// How long closing a link, session or the connection may wait for the peer's answer.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The events link's `max-message-size`: edgeHub's cap on a (batched) transfer.
const MAX_EVENTS_TRANSFER_BYTES: u64 = convert::MAX_BATCH_BYTES as u64;
/// The `max-message-size` of a `$cbs` link (and of a link attached only to be refused): a
/// put-token request is a SAS token and a few properties.
pub const MAX_CBS_MESSAGE_BYTES: u64 = 8 * 1024;
/// The SASL protocol header's protocol id.
const PROTO_SASL: u8 = 3;
/// How long after Open a connection may go without any authenticated identity (SASL PLAIN, or
/// a `$cbs` put-token answered 200) before it is closed. The SDKs put their token at once.
pub const AUTHENTICATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Links open at once on one session: announced in our Begin (`handle-max` one less) and
/// enforced by us (fe2o3 only announces it): an attach beyond it is refused with
/// `amqp:resource-limit-exceeded`. A module needs up to eight (`$cbs`, events, twin and
/// methods, each both ways).
pub const MAX_LINKS_PER_SESSION: usize = 64;
/// `$cbs` replies waiting for the client's reply link; past it put-token requests are no
/// longer read (the client's credit runs out).
pub const CBS_REPLY_QUEUE: usize = 16;
/// The error a connection authenticated by SASL PLAIN as a replicated module is closed with when
/// the module has its count of replicas connected (a `$cbs` put-token is answered 503 instead).
pub const REPLICAS_FULL_CONDITION: AmqpError = AmqpError::ResourceLimitExceeded;

/// Why a connection ended (logged).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    /// The socket failed or closed before the protocol header.
    #[error("socket error before the protocol header: {0}")]
    Io(#[from] std::io::Error),
    /// No protocol header in time.
    #[error("no protocol header within {OPEN_TIMEOUT:?}")]
    Timeout,
    /// The header, SASL or Open negotiation failed.
    #[error("open failed: {0}")]
    Open(String),
    /// The client closed the connection, or the library ended it (a malformed frame).
    #[error("connection ended: {0}")]
    Ended(String),
    /// Another connection of one of its identities took over.
    #[error("replaced by a newer connection of the same module")]
    Replaced,
    /// Nothing authenticated on the connection within [`AUTHENTICATE_TIMEOUT`] of Open.
    #[error("nothing authenticated within {AUTHENTICATE_TIMEOUT:?} of Open")]
    NotAuthenticated,
    /// No token of the connection was renewed before it expired.
    #[error("the SAS token expired without renewal")]
    TokenExpired,
    /// Refused by the connection limits (`--max-connections`).
    #[error("refused: {0}")]
    Refused(String),
    /// A replicated module has its count of replicas connected.
    #[error("connection refused: {0}")]
    ReplicasFull(#[source] ReplicasFull),
    /// Closed by its module's replica machine: displaced by a newcomer, scaled down, or it lost
    /// a delivery.
    #[error("closed: {0}")]
    ReplicaClosed(#[source] crate::head::replica::ReplicaClose),
    /// A twin request may not be answered: a newer hub owns the data directory.
    #[error("twin request not answered: {0}")]
    Twin(String),
    /// The hub is shutting down.
    #[error("hub shutting down")]
    Shutdown,
}

/// What became of [`ConnShared::join`].
#[derive(Debug)]
pub enum Joined {
    /// Registered (a replicated module's connection: a member of its inputs' machines).
    Yes,
    /// Refused by the connection budget, or the module was removed meanwhile: the connection
    /// is stopping.
    Refused,
    /// A replicated module with its count of replicas connected: nothing joined, logged and
    /// counted; the caller refuses the identity (`$cbs`: 503, SASL PLAIN: the connection is
    /// closed with [`REPLICAS_FULL_CONDITION`]).
    ReplicasFull(ReplicasFull),
}

/// What the sessions and links of one connection share.
pub struct ConnShared {
    /// The head's context.
    pub ctx: Arc<HeadContext>,
    /// Who is authenticated on this connection.
    pub auth: Mutex<ConnectionAuth>,
    /// Notified when `auth` changed (a put-token), so the token deadline is recomputed.
    pub auth_changed: Notify,
    /// Registry ids of the identities this connection joined as.
    joined: Mutex<HashMap<Identity, u64>>,
    /// Turns true when the connection must close (shutdown, replaced).
    pub stop: watch::Sender<bool>,
    /// Why it stops (first reason wins).
    stop_reason: Mutex<Option<ConnectionEnd>>,
    /// The `$cbs` replies, for the client's `$cbs` receiver link.
    /// (bounded: [`CBS_REPLY_QUEUE`]).
    pub cbs_replies: mpsc::Sender<cbs::Reply>,
    /// Held by the `$cbs` reply link while it is attached, free again when it ends.
    pub cbs_reply_rx: AsyncMutex<cbs::ReplyQueue>,
    /// For logs.
    pub peer: String,
    /// The connection's place in the head's budget, told when an identity authenticates.
    slot: crate::limits::Slot,
    /// Each module's twin links on this connection (created by the first of the pair).
    twins: Mutex<HashMap<Identity, Arc<twin::TwinChannel>>>,
    /// Each module's latest method request link on this connection (a number per attach).
    method_links: Mutex<HashMap<Identity, u64>>,
    /// The memberships of the replicated modules authenticated on this connection.
    replicas: Mutex<HashMap<Identity, Membership>>,
    /// Beaten on every frame read once this connection is a replica member (set then).
    heard: Arc<OnceLock<Arc<Heartbeat>>>,
}

impl ConnShared {
    /// Asks every session and link of this connection to finish.
    pub fn stop(&self, reason: ConnectionEnd) {
        let mut r = self.stop_reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        // Kept even while nothing subscribes yet (a stop decided before the connection runs,
        // e.g. a SASL PLAIN identity refused): `send` would drop it then.
        self.stop.send_replace(true);
    }

    /// Joins the live-connection registry as `identity` (once per identity); a later
    /// connection of the same module then stops this one. A replicated module's connection
    /// instead joins beside the others and becomes a member of its inputs' replica machines.
    pub fn join(self: &Arc<Self>, identity: &Identity) -> Joined {
        let mut joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        if joined.contains_key(identity) {
            return Joined::Yes;
        }
        // A replicated module's connections live side by side: none replaces another.
        let replicated = self.ctx.dispatcher.is_replicated(&identity.module);
        let taken = if !replicated && self.ctx.connections.has_live(identity) {
            self.slot.authenticated_replacing()
        } else {
            self.slot.authenticated()
        };
        if let Err(e) = taken {
            drop(joined);
            self.stop(ConnectionEnd::Refused(e.to_string()));
            return Joined::Refused;
        }
        // Still declared: a reload may have removed the module since its token was checked.
        let ctx = &self.ctx;
        let still_valid = || ctx.identities.key(identity).is_some();
        let registered = if replicated {
            ctx.connections
                .join_member_if(identity, still_valid)
                .map(|(id, closed, close)| (id, closed, Some(close)))
        } else {
            ctx.connections
                .join_if(identity, still_valid)
                .map(|(id, replaced)| (id, replaced, None))
        };
        let Some((id, mut replaced, close)) = registered else {
            drop(joined);
            self.stop(ConnectionEnd::Refused(format!(
                "module {identity} was removed while it logged in"
            )));
            return Joined::Refused;
        };
        let mut closed_by = None;
        if let Some(close) = close {
            let heartbeat = Arc::clone(self.heard.get_or_init(Heartbeat::new));
            match Membership::join(ctx, identity, id, close, heartbeat) {
                Ok(membership) => {
                    closed_by = Some(membership.closed_by());
                    self.replicas
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(identity.clone(), membership);
                }
                Err(full) => {
                    ctx.connections.leave(identity, id);
                    tracing::warn!(peer = %self.peer, %identity, error = %full,
                        "replica connection refused: the module has its declared count of replicas connected");
                    ctx.metrics.client_connect_failed("replicas_full");
                    return Joined::ReplicasFull(full);
                }
            }
        }
        joined.insert(identity.clone(), id);
        let me = Arc::downgrade(self);
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                r = replaced.changed() => {
                    if r.is_ok() {
                        if let Some(me) = me.upgrade() {
                            me.stop(match closed_by.as_ref().and_then(|c| c.get()) {
                                Some(why) => ConnectionEnd::ReplicaClosed(why),
                                None => ConnectionEnd::Replaced,
                            });
                        }
                    }
                }
                () = stopped(&mut stop) => {}
            }
        });
        Joined::Yes
    }

    /// The inputs link of `identity` attached: if the identity is a replica member on this
    /// connection, the link receives what the member owns through `outbound` (true); else
    /// false (the link registers its module's input sinks itself).
    pub fn attach_replica(&self, identity: &Identity, outbound: &OutboundTx) -> bool {
        let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        match replicas.get_mut(identity) {
            Some(membership) => {
                membership.attach(outbound);
                true
            }
            None => false,
        }
    }

    /// The inputs link that attached `outbound` for `identity` ended (the connection may stay).
    pub fn detach_replica(&self, identity: &Identity, outbound: &OutboundTx) {
        if let Some(membership) = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(identity)
        {
            membership.detach(outbound);
        }
    }

    /// After a reload: `identity`'s membership joins the replicated inputs routes now name.
    pub fn replica_join_new_inputs(&self, identity: &Identity) {
        if let Some(membership) = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(identity)
        {
            membership.join_new_inputs(&self.ctx, identity);
        }
    }

    /// The connection ended: every membership leaves (`clean`: the client closed it) or
    /// crashes, before the links give back what they hold.
    fn end_replicas(&self, clean: bool) {
        let replicas =
            std::mem::take(&mut *self.replicas.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, mut membership) in replicas {
            membership.leave_all(clean);
        }
    }

    /// The twin state `identity`'s twin links on this connection share.
    pub fn twin_channel(&self, identity: &Identity) -> Arc<twin::TwinChannel> {
        let mut twins = self.twins.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(twins.entry(identity.clone()).or_default())
    }

    /// A method request link of `identity` attached: its number, newer than any before it on
    /// this connection.
    pub fn method_link_attached(&self, identity: &Identity) -> u64 {
        let mut links = self.method_links.lock().unwrap_or_else(|p| p.into_inner());
        let n = links.get(identity).map_or(1, |n| n.wrapping_add(1));
        links.insert(identity.clone(), n);
        n
    }

    /// Method request link `n` of `identity` ended: true if it was the latest (the module then
    /// has no method link on this connection any more).
    pub fn method_link_ended(&self, identity: &Identity, n: u64) -> bool {
        let mut links = self.method_links.lock().unwrap_or_else(|p| p.into_inner());
        if links.get(identity) == Some(&n) {
            links.remove(identity);
            true
        } else {
            false
        }
    }

    /// The registry id this connection joined as `identity` (its direct-method target id).
    pub fn conn_id(&self, identity: &Identity) -> Option<u64> {
        self.joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .copied()
    }

    /// Whether this connection is the live one of `identity`.
    pub fn is_current(&self, identity: &Identity) -> bool {
        let joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        joined
            .get(identity)
            .is_some_and(|id| self.ctx.connections.is_current(identity, *id))
    }

    fn leave_all(&self) {
        self.end_replicas(false);
        let joined = std::mem::take(&mut *self.joined.lock().unwrap_or_else(|p| p.into_inner()));
        for (identity, id) in joined {
            self.ctx.connections.leave(&identity, id);
        }
    }
}

/// Serves one connection until it ends. `peer` is for logs; `slot` is the connection's place in
/// the head's budget, told when an identity authenticates.
pub async fn serve<S>(
    mut stream: S,
    ctx: Arc<HeadContext>,
    peer: String,
    slot: crate::limits::Slot,
) -> ConnectionEnd
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout(OPEN_TIMEOUT, stream.read_exact(&mut header)).await {
        Err(_) => return ConnectionEnd::Timeout,
        Ok(Err(e)) => return ConnectionEnd::Io(e),
        Ok(Ok(_)) => {}
    }
    let heard = Arc::new(OnceLock::new());
    let stream = Heard::new(guarded_stream(header, stream), Arc::clone(&heard));
    let mut auth = ConnectionAuth::new();
    let opened = if header[4] == PROTO_SASL {
        let sasl = HubSasl::new(Arc::clone(&ctx));
        let acceptor = ConnectionAcceptor::builder()
            .container_id(CONTAINER_ID)
            .idle_time_out(IDLE_TIMEOUT_MS)
            .sasl_acceptor(sasl.clone())
            .build();
        let opened = tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(stream)).await;
        if let SaslResult::Plain(identity, expiry) = sasl.outcome() {
            auth.authenticated_by_sasl(identity, expiry);
        }
        opened
    } else {
        let acceptor = ConnectionAcceptor::builder()
            .container_id(CONTAINER_ID)
            .idle_time_out(IDLE_TIMEOUT_MS)
            .build();
        tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(stream)).await
    };
    let mut connection = match opened {
        Err(_) => return ConnectionEnd::Timeout,
        Ok(Err(e)) => return ConnectionEnd::Open(e.to_string()),
        Ok(Ok(c)) => c,
    };
    let (cbs_tx, cbs_rx) = mpsc::channel(CBS_REPLY_QUEUE);
    let (stop, _) = watch::channel(false);
    let sasl_identities: Vec<Identity> = auth.identities().cloned().collect();
    let shared = Arc::new(ConnShared {
        ctx: Arc::clone(&ctx),
        auth: Mutex::new(auth),
        auth_changed: Notify::new(),
        joined: Mutex::new(HashMap::new()),
        stop,
        stop_reason: Mutex::new(None),
        cbs_replies: cbs_tx,
        cbs_reply_rx: AsyncMutex::new(cbs::ReplyQueue::new(cbs_rx)),
        peer: peer.clone(),
        slot,
        twins: Mutex::new(HashMap::new()),
        method_links: Mutex::new(HashMap::new()),
        replicas: Mutex::new(HashMap::new()),
        heard,
    });
    // Also uncounted when the accept loop drops this connection at its auth deadline.
    let connected = crate::metrics::ConnectedGauge::new(Arc::clone(&ctx.metrics));
    for identity in &sasl_identities {
        match shared.join(identity) {
            // Authenticated before Open: nothing to answer; the identity is taken back (its
            // links are refused) and the connection is closed.
            Joined::ReplicasFull(full) => {
                let _ = shared
                    .auth
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .withdraw(identity, full.to_string());
                shared.stop(ConnectionEnd::ReplicasFull(full));
            }
            Joined::Yes | Joined::Refused => ctx.metrics.client_authenticated(identity),
        }
    }
    tracing::info!(%peer, "AMQP connection open");
    let (end, closed) = run(&mut connection, &shared).await;
    if !closed {
        let closing = async {
            match &end {
                ConnectionEnd::ReplicasFull(full) => {
                    let error = AmqpErrorInfo::new(REPLICAS_FULL_CONDITION, full.to_string(), None);
                    connection.close_with_error(error).await
                }
                _ => connection.close().await,
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    }
    shared.leave_all();
    drop(connected);
    tracing::info!(%peer, reason = %end, "AMQP connection closed");
    end
}

/// Accepts sessions until the connection ends or must stop, then lets every session finish.
/// Also says whether the connection is closed already (the client or the engine ended it).
async fn run(
    connection: &mut ListenerConnectionHandle,
    shared: &Arc<ConnShared>,
) -> (ConnectionEnd, bool) {
    let mut sessions = JoinSet::new();
    // The client closed the connection with a Close without error (for replica members: leave,
    // not crash).
    let mut clean = false;
    let mut closed = false;
    let mut shutdown = shared.ctx.shutdown.clone();
    let mut stop = shared.stop.subscribe();
    let authenticate_by = tokio::time::Instant::now() + AUTHENTICATE_TIMEOUT;
    let handle_max = u32::try_from(MAX_LINKS_PER_SESSION - 1).unwrap_or(u32::MAX);
    let end = loop {
        let expiry = token_deadline(shared);
        let authenticated = is_authenticated(shared);
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else {
                    // The engine stopped: its outcome says whether the client sent Close.
                    if let Ok(outcome) = tokio::time::timeout(CLOSE_TIMEOUT, connection.on_close()).await {
                        closed = true;
                        clean = matches!(outcome, Err(fe2o3_amqp::connection::Error::RemoteClosed));
                    }
                    break ConnectionEnd::Ended("closed by the client or the protocol engine".into());
                };
                let acceptor = SessionAcceptor::builder().handle_max(handle_max).build();
                match acceptor.accept_incoming_session(incoming, connection).await {
                    Ok(session) => {
                        sessions.spawn(serve_session(session, Arc::clone(shared)));
                    }
                    Err(e) => break ConnectionEnd::Ended(format!("session refused: {e}")),
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            () = shared.auth_changed.notified() => {}
            () = tokio::time::sleep_until(authenticate_by), if !authenticated => {
                // A put-token since the loop began is seen here.
                if !is_authenticated(shared) {
                    break ConnectionEnd::NotAuthenticated;
                }
            }
            () = tokio::time::sleep_until(expiry) => {
                // Woken at the earliest expiry known then; a renewal since moved it on.
                if token_deadline(shared) <= tokio::time::Instant::now() {
                    shared.ctx.metrics.client_token_expired("amqp");
                    break ConnectionEnd::TokenExpired;
                }
            }
            () = stopped(&mut shutdown) => break ConnectionEnd::Shutdown,
            () = stopped(&mut stop) => {
                break shared
                    .stop_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .unwrap_or(ConnectionEnd::Shutdown);
            }
        }
    };
    // Members leave (or crash) before their links give back the deliveries they hold.
    shared.end_replicas(clean);
    let _ = shared.stop.send(true);
    while sessions.join_next().await.is_some() {}
    (end, closed)
}

/// Whether any identity is authenticated on the connection.
fn is_authenticated(shared: &ConnShared) -> bool {
    shared
        .auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .identities()
        .next()
        .is_some()
}

/// When the connection's earliest token (plus the SAS clock skew) expires; far away if none.
fn token_deadline(shared: &ConnShared) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let far = now + Duration::from_secs(24 * 3600);
    let Some(expiry) = shared
        .auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .earliest_expiry()
    else {
        return far;
    };
    let left = expiry.saturating_sub(shared.ctx.now_secs());
    now + Duration::from_secs(left.min(24 * 3600))
}

/// Accepts the links of one session until it ends or the connection stops; then waits for
/// every link to settle what is durable and close.
async fn serve_session(mut session: ListenerSessionHandle, shared: Arc<ConnShared>) {
    let mut links = JoinSet::new();
    let mut stop = shared.stop.subscribe();
    loop {
        tokio::select! {
            attach = session.next_incoming_attach() => {
                let Some(attach) = attach else { break };
                let full = links.len() >= MAX_LINKS_PER_SESSION;
                on_attach(attach, &mut session, &shared, &mut links, full).await;
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            () = stopped(&mut stop) => break,
        }
    }
    while links.join_next().await.is_some() {}
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.end()).await;
}

/// The address an attach names: the target of a client sender, the source of a client receiver.
fn attach_address(attach: &Attach) -> (ClientRole, Option<String>) {
    match attach.role {
        Role::Sender => (
            ClientRole::Sender,
            attach.target.as_ref().and_then(|t| match t.as_ref() {
                fe2o3_amqp::types::messaging::TargetArchetype::Target(t) => t.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            }),
        ),
        Role::Receiver => (
            ClientRole::Receiver,
            attach.source.as_ref().and_then(|s| s.address.clone()),
        ),
    }
}

async fn on_attach(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    shared: &Arc<ConnShared>,
    links: &mut JoinSet<()>,
    full: bool,
) {
    let (role, address) = attach_address(&attach);
    let name = attach.name.clone();
    let decision = if full {
        LinkDecision::Refuse(
            RefuseCondition::ResourceLimitExceeded,
            format!("at most {MAX_LINKS_PER_SESSION} links on a session"),
        )
    } else {
        shared
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .authorize_attach(address.as_deref(), role, shared.ctx.now_secs())
    };
    let endpoint = match link_acceptor(&decision)
        .accept_incoming_attach(attach, session)
        .await
    {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::warn!(peer = %shared.peer, link = %name, error = %e, "attach failed");
            return;
        }
    };
    let shared = Arc::clone(shared);
    match (decision, endpoint) {
        (LinkDecision::Cbs(_), LinkEndpoint::Receiver(r)) => {
            links.spawn(cbs::serve_requests(r, shared));
        }
        (LinkDecision::Cbs(_), LinkEndpoint::Sender(s)) => {
            links.spawn(cbs::serve_replies(s, shared));
        }
        (LinkDecision::Events(identity), LinkEndpoint::Receiver(r)) => {
            tracing::info!(peer = %shared.peer, %identity, "events link attached");
            links.spawn(links::serve_events(r, identity, shared));
        }
        (LinkDecision::Inputs(identity), LinkEndpoint::Sender(s)) => {
            tracing::info!(peer = %shared.peer, %identity, "inputs link attached");
            links.spawn(links::serve_inputs(s, identity, shared));
        }
        (LinkDecision::Twin(identity, ClientRole::Sender), LinkEndpoint::Receiver(r)) => {
            tracing::info!(peer = %shared.peer, %identity, "twin request link attached");
            links.spawn(twin::serve_requests(r, identity, shared));
        }
        (LinkDecision::Twin(identity, ClientRole::Receiver), LinkEndpoint::Sender(s)) => {
            tracing::info!(peer = %shared.peer, %identity, "twin answer link attached");
            links.spawn(twin::serve_answers(s, identity, shared));
        }
        (LinkDecision::Methods(identity, ClientRole::Sender), LinkEndpoint::Receiver(r)) => {
            tracing::info!(peer = %shared.peer, %identity, "method response link attached");
            links.spawn(methods::serve_responses(r, identity, shared));
        }
        (LinkDecision::Methods(identity, ClientRole::Receiver), LinkEndpoint::Sender(s)) => {
            tracing::info!(peer = %shared.peer, %identity, "method request link attached");
            links.spawn(methods::serve_requests(s, identity, shared));
        }
        (LinkDecision::Refuse(condition, reason), endpoint) => {
            tracing::warn!(peer = %shared.peer, link = %name, address = ?address, %reason, "link refused");
            refuse(endpoint, condition, reason).await;
        }
        (decision, endpoint) => {
            // The role and the endpoint disagree: cannot happen with fe2o3's acceptor.
            tracing::error!(peer = %shared.peer, ?decision, "link role mismatch");
            refuse(
                endpoint,
                RefuseCondition::InvalidField,
                "role mismatch".into(),
            )
            .await;
        }
    }
}

/// fe2o3's link acceptor without source or target rewriting.
type DefaultLinkAcceptor = LinkAcceptor<
    fn(fe2o3_amqp::types::messaging::Source) -> Option<fe2o3_amqp::types::messaging::Source>,
    fn(fe2o3_amqp::types::messaging::Target) -> Option<fe2o3_amqp::types::messaging::Target>,
>;

/// How a link is accepted, by what it is for. The inputs link (the hub sends) never agrees to
/// send pre-settled: a module asking for `snd-settle-mode = settled` gets `unsettled`, so every
/// delivery waits for the module's own disposition before it counts as delivered.
fn link_acceptor(decision: &LinkDecision) -> DefaultLinkAcceptor {
    let builder = LinkAcceptor::builder();
    match decision {
        LinkDecision::Inputs(_) => builder
            .supported_sender_settle_modes(SupportedSenderSettleModes::UnsettledAndMixed)
            .fallback_sender_settle_mode(SenderSettleMode::Unsettled),
        LinkDecision::Events(_) => builder.max_message_size(MAX_EVENTS_TRANSFER_BYTES),
        LinkDecision::Twin(..) => builder.max_message_size(twin::MAX_TWIN_MESSAGE_BYTES),
        LinkDecision::Methods(..) => builder.max_message_size(methods::MAX_METHOD_MESSAGE_BYTES),
        LinkDecision::Cbs(_) | LinkDecision::Refuse(..) => {
            builder.max_message_size(MAX_CBS_MESSAGE_BYTES)
        }
    }
    .build()
}

/// Detaches (closes) a just-attached link with an error.
async fn refuse(endpoint: LinkEndpoint, condition: RefuseCondition, reason: String) {
    let condition = match condition {
        RefuseCondition::Unauthorized => AmqpError::UnauthorizedAccess,
        RefuseCondition::NotImplemented => AmqpError::NotImplemented,
        RefuseCondition::InvalidField => AmqpError::InvalidField,
        RefuseCondition::ResourceLimitExceeded => AmqpError::ResourceLimitExceeded,
    };
    let error = AmqpErrorInfo::new(condition, reason, None);
    let _ = match endpoint {
        LinkEndpoint::Sender(s) => {
            tokio::time::timeout(CLOSE_TIMEOUT, s.close_with_error(error)).await
        }
        LinkEndpoint::Receiver(r) => {
            tokio::time::timeout(CLOSE_TIMEOUT, r.close_with_error(error)).await
        }
    };
}

/// What the library reads: the protocol header already read, then the rest of `stream`, each
/// frame checked whole before fe2o3 decodes it ([`crate::amqp::frame_guard`]).
pub fn guarded_stream<S>(header: [u8; 8], stream: S) -> Guarded<Prefixed<S>> {
    Guarded::new(Prefixed::new(header.to_vec(), stream))
}

/// The connection's stream, beating the replica heartbeat (once there is one) on every frame
/// read: the frame guard below hands on one checked frame per read. Without a membership it
/// costs one atomic load per read.
#[derive(Debug)]
pub struct Heard<S> {
    inner: S,
    heard: Arc<OnceLock<Arc<Heartbeat>>>,
}

impl<S> Heard<S> {
    /// `inner`, beating what `heard` holds once it is set.
    pub fn new(inner: S, heard: Arc<OnceLock<Arc<Heartbeat>>>) -> Self {
        Heard { inner, heard }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(heartbeat) = this.heard.get() {
                heartbeat.beat();
            }
        }
        read
    }
}

write_through_inner!(Heard);

/// A stream that first yields bytes already read from it (the protocol header).
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix`, then the rest of `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let rest = &this.prefix[this.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

write_through_inner!(Prefixed);

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
