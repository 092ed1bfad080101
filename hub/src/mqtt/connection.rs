//! One MQTT connection of a module: authentication, publishes routed durably, subscriptions,
//! deliveries to the module's inputs.
//!
//! Guarantees:
//! - CONNECT must come first (within [`CONNECT_TIMEOUT`]); the client id must be the identity the
//!   SAS token authenticates (`device/module`); any failure is CONNACK 5 and the end.
//! - A QoS 1 PUBLISH is acknowledged only after `Router::route` resolved it as durable, and
//!   PUBACKs leave in the order the PUBLISHes arrived (the acker task awaits them in that order).
//!   If routing one fails, the connection closes without acknowledging it or anything after it:
//!   the client sends them again. A refusal known when `Router::route` returns
//!   (`RouteAck::refusal`: a full store) closes the connection before the next publish is
//!   read, so no later publish is stored ahead of the refused one's resend.
//! - The connection ids of a message come from the authenticated identity, never from the topic;
//!   a module publishes only as itself and subscribes only to its own inputs (SUBACK 0x80
//!   otherwise).
//! - A second connection of one identity replaces the first, which closes.
//! - A malformed or oversized packet, QoS 2, or silence past 1.5 × keep-alive closes this
//!   connection with a log line; nothing already acknowledged is affected.
//! - A delivery to the module counts as delivered only when the module's PUBACK for it arrives;
//!   when the connection ends, every unacknowledged delivery goes back to the endpoint worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use router::{DeliveryOutcome, Endpoint, Message, RouteAck};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::identity::Identity;
use crate::metrics::{ConnectionMetrics, HubMetrics};
use crate::mqtt::context::{HeadContext, RegisteredSinks};
use crate::mqtt::sink::{self, Outbound, OutboundTx};
use crate::mqtt::topics::{EventsTopic, InboundTopic, SubscribeDecision};
use crate::mqtt::{bag, session_state, topics, username};

/// Status answered to twin requests until twins are served.
const TWIN_NOT_SUPPORTED: u16 = 501;

/// How long a client has to send CONNECT after the TLS handshake (edgeHub: 60 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest message body a module may publish (edgeHub's `MaxInboundMessageSize`).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest packet read: a full-size body plus room for a long topic and property bag.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 64 * 1024;
/// Deliveries to one module in flight (sent, PUBACK not yet back).
const DELIVERY_WINDOW: u16 = 100;
/// Publishes routed and not yet acknowledged, per connection; past it the connection stops
/// reading until the store catches up (backpressure instead of unbounded memory).
const MAX_PENDING_ACKS: usize = 1024;

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
    /// CONNECT was refused.
    #[error("connection refused: {0}")]
    Refused(String),
    /// Nothing arrived within 1.5 × keep-alive.
    #[error("keep-alive expired")]
    KeepAlive,
    /// Another connection of the same identity took over.
    #[error("replaced by a newer connection of the same identity")]
    Replaced,
    /// Routing a publish failed; it and everything after it stay unacknowledged.
    #[error("routing failed: {0}")]
    Route(String),
    /// The hub is shutting down.
    #[error("hub shutting down")]
    Shutdown,
}

/// The live connections, one per identity; a new one replaces the old.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<Identity, (u64, watch::Sender<bool>)>>,
}

impl Registry {
    /// Registers a connection of `identity`, telling any older one to close. Returns its id and
    /// the signal that it was replaced.
    pub(crate) fn join(&self, identity: &Identity) -> (u64, watch::Receiver<bool>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let old = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(identity.clone(), (id, tx));
        if let Some((_, old)) = old {
            let _ = old.send(true);
        }
        (id, rx)
    }

    /// Removes the connection if it is still the current one of its identity; true if it was.
    pub(crate) fn leave(&self, identity: &Identity, id: u64) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(identity).is_some_and(|(cur, _)| *cur == id) {
            live.remove(identity);
            return true;
        }
        false
    }

    /// Whether connection `id` is the current one of `identity`.
    pub(crate) fn is_current(&self, identity: &Identity, id: u64) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .is_some_and(|(cur, _)| *cur == id)
    }

    /// Connections now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True if no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves one connection until it ends. `peer` is for logs; `slot` is the connection's place in
/// the head's budget, told when it authenticates.
pub async fn serve<S>(
    stream: S,
    ctx: Arc<HeadContext>,
    peer: String,
    slot: crate::limits::Slot,
) -> ConnectionEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let connect =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut reader, &mut buf)).await {
            Err(_) => return ConnectionEnd::Refused("no CONNECT within 60 s".into()),
            Ok(Err(end)) => return end,
            Ok(Ok(Packet::Connect(c))) => c,
            Ok(Ok(other)) => {
                return ConnectionEnd::Violation(format!("first packet is not CONNECT: {other:?}"))
            }
        };
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Packet>();
    let writer_task = tokio::spawn(write_packets(writer, out_rx));
    let identity = match authenticate(&ctx, &connect) {
        Ok(identity) => identity,
        Err(reason) => {
            tracing::warn!(%peer, client_id = %connect.client_id, %reason, "CONNECT refused");
            ctx.metrics.client_connect_failed("not_authorized");
            let _ = out_tx.send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::NotAuthorized,
                false,
            )));
            drop(out_tx);
            let _ = writer_task.await;
            return ConnectionEnd::Refused(reason);
        }
    };
    if let Err(e) = slot.authenticated() {
        // Over --max-connections: "server unavailable", which the SDKs retry.
        let ack = ConnAck::new(ConnectReturnCode::ServiceUnavailable, false);
        let _ = out_tx.send(Packet::ConnAck(ack));
        drop(out_tx);
        let _ = writer_task.await;
        return ConnectionEnd::Refused(e.to_string());
    }
    let client_id = connect.client_id.clone();
    let present = match ctx.sessions.open(&client_id, connect.clean_session) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(%client_id, error = %e, "session store failed");
            let _ = out_tx.send(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::ServiceUnavailable,
                false,
            )));
            drop(out_tx);
            let _ = writer_task.await;
            return ConnectionEnd::Refused(format!("session store: {e}"));
        }
    };
    let (conn_id, replaced) = ctx.connections.join(&identity);
    let _ = out_tx.send(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        present,
    )));
    ctx.metrics.client_connected();
    ctx.metrics.client_authenticated(&identity);
    tracing::info!(%peer, %client_id, session_present = present, "module connected");
    let mut conn = Connection {
        ctx: Arc::clone(&ctx),
        identity: identity.clone(),
        client_id: client_id.clone(),
        conn_id,
        clean: connect.clean_session,
        out: out_tx,
        deliveries: session_state::Outbound::new(DELIVERY_WINDOW),
        waiting: VecDeque::new(),
        acks: None,
        subscriptions: Vec::new(),
        metrics: ctx.metrics.connection_metrics(&identity),
        outbound_tx: None,
        registered: RegisteredSinks::new(),
    };
    let keep_alive = session_state::keep_alive_timeout(connect.keep_alive);
    let end = conn.run(reader, buf, replaced, keep_alive).await;
    conn.finish();
    drop(conn);
    let _ = writer_task.await;
    ctx.metrics.client_disconnected();
    tracing::info!(%peer, %client_id, reason = %end, "module disconnected");
    end
}

/// Checks CONNECT: client id, username, SAS token. Returns the authenticated identity.
fn authenticate(
    ctx: &HeadContext,
    connect: &rumqttc::mqttbytes::v4::Connect,
) -> Result<Identity, String> {
    let login = connect
        .login
        .as_ref()
        .ok_or_else(|| "no username/password".to_string())?;
    let user = username::parse(&login.username).map_err(|e| format!("username: {e}"))?;
    if connect.client_id != user.client_id() {
        return Err(format!(
            "client id {:?} is not the identity {:?} of the username",
            connect.client_id,
            user.client_id()
        ));
    }
    let module = user
        .module
        .clone()
        .ok_or_else(|| "a device without a module is not served".to_string())?;
    let identity = Identity::new(user.device.clone(), module);
    let key = ctx
        .identities
        .key(&identity)
        .ok_or_else(|| format!("unknown module {identity}"))?;
    ctx.verify_token(&login.password, key, &identity)?;
    Ok(identity)
}

/// What one live connection keeps.
struct Connection {
    ctx: Arc<HeadContext>,
    identity: Identity,
    client_id: String,
    conn_id: u64,
    clean: bool,
    /// Packets for the writer task.
    out: mpsc::UnboundedSender<Packet>,
    /// Deliveries sent and waiting for the module's PUBACK.
    deliveries: session_state::Outbound<oneshot::Sender<DeliveryOutcome>>,
    /// Deliveries taken from the sinks, waiting for room in the window.
    waiting: VecDeque<Outbound>,
    /// Route acknowledgements, in arrival order, for the acker task.
    acks: Option<mpsc::Sender<(u16, PendingAck)>>,
    /// Filters granted to this connection (restored from a persistent session at connect).
    subscriptions: Vec<String>,
    /// This connection's counters, resolved once.
    metrics: ConnectionMetrics,
    /// Set while this connection's input sinks are registered.
    outbound_tx: Option<OutboundTx>,
    /// The input sinks this connection registered (only these are removed when it goes).
    registered: RegisteredSinks,
}

impl Connection {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        mut buf: BytesMut,
        mut replaced: watch::Receiver<bool>,
        keep_alive: Duration,
    ) -> ConnectionEnd {
        let (ack_tx, ack_rx) = mpsc::channel(MAX_PENDING_ACKS);
        let (route_failed_tx, mut route_failed) = oneshot::channel::<String>();
        let acker = tokio::spawn(ack_in_order(
            ack_rx,
            self.out.clone(),
            route_failed_tx,
            Arc::clone(&self.ctx.metrics),
        ));
        self.acks = Some(ack_tx);
        let (outbound_tx, mut outbound_rx) = mpsc::unbounded_channel::<Outbound>();
        // Any input sinks still registered belong to an older connection of this module, which
        // is gone or going: take them away now, so no delivery waits on a dead connection.
        self.ctx.unregister_input_sinks(&self.identity);
        if !self.clean {
            self.subscriptions = self.ctx.sessions.get(&self.client_id).unwrap_or_default();
        }
        if self.subscribed_to_inputs() {
            self.register_inputs(&outbound_tx);
        }
        let mut shutdown = self.ctx.shutdown.clone();
        let mut deadline = Instant::now() + keep_alive;
        let end = loop {
            tokio::select! {
                read = read_packet(&mut reader, &mut buf) => {
                    match read {
                        Ok(packet) => {
                            deadline = Instant::now() + keep_alive;
                            match self.on_packet(packet, &outbound_tx) {
                                Ok(None) => {}
                                // Waits here when too many publishes are pending: backpressure.
                                Ok(Some(ack)) => match &self.acks {
                                    Some(acks) if acks.send(ack).await.is_ok() => {}
                                    _ => break ConnectionEnd::Route("acknowledger stopped".into()),
                                },
                                Err(end) => break end,
                            }
                        }
                        Err(end) => break end,
                    }
                }
                Some(delivery) = outbound_rx.recv() => {
                    self.waiting.push_back(delivery);
                    self.send_waiting();
                }
                Ok(reason) = &mut route_failed => break ConnectionEnd::Route(reason),
                _ = replaced.changed() => break ConnectionEnd::Replaced,
                _ = shutdown.changed() => break ConnectionEnd::Shutdown,
                () = tokio::time::sleep_until(deadline) => break ConnectionEnd::KeepAlive,
            }
        };
        // Acknowledge what is durable before closing (in order), unless routing failed.
        self.acks = None;
        let _ = acker.await;
        end
    }

    /// Handles one packet; a routed QoS 1 publish comes back as (packet id, acknowledgement) for
    /// the acker task.
    fn on_packet(
        &mut self,
        packet: Packet,
        outbound: &OutboundTx,
    ) -> Result<Option<(u16, PendingAck)>, ConnectionEnd> {
        match packet {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(ack) => self.on_puback(ack.pkid)?,
            Packet::Subscribe(s) => self.on_subscribe(s, outbound)?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u)?,
            Packet::PingReq => {
                let _ = self.out.send(Packet::PingResp);
            }
            Packet::Disconnect => return Err(ConnectionEnd::ClientClosed),
            other => {
                return Err(ConnectionEnd::Violation(format!(
                    "unexpected packet from a client: {other:?}"
                )))
            }
        }
        Ok(None)
    }

    fn on_publish(&mut self, publish: Publish) -> Result<Option<(u16, PendingAck)>, ConnectionEnd> {
        match session_state::inbound_qos(publish.qos) {
            session_state::InboundQos::CloseConnection => {
                return Err(ConnectionEnd::Violation("QoS 2 is not supported".into()))
            }
            session_state::InboundQos::NoAck | session_state::InboundQos::AckWhenDurable => {}
        }
        if publish.payload.len() > MAX_MESSAGE_BYTES {
            return Err(ConnectionEnd::Violation(format!(
                "message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                publish.payload.len()
            )));
        }
        let arrived = std::time::Instant::now();
        let ack = match topics::parse_publish(&publish.topic) {
            Ok(InboundTopic::Events(topic)) => {
                let message = self.message_from(&publish, &topic)?;
                self.metrics.received(
                    &self.ctx.metrics,
                    message.source().output(),
                    publish.payload.len(),
                );
                let mut ack = self.ctx.router.route(message);
                if publish.qos == QoS::AtLeastOnce {
                    if let Some(e) = ack.refusal() {
                        // Refused at once (store full, too large): close before any later
                        // publish is routed, so the client's resend cannot be overtaken.
                        tracing::warn!(client_id = %self.client_id, pkid = publish.pkid, error = %e, "a publish was refused by the store; closing without PUBACK");
                        return Err(ConnectionEnd::Route(e.to_string()));
                    }
                }
                ack
            }
            Ok(InboundTopic::TwinRequest { rid }) => {
                // Twins are not served yet: answer at once so the SDK fails fast, not after a
                // timeout.
                if let Some(rid) = rid {
                    let topic = topics::twin_response_topic(TWIN_NOT_SUPPORTED, rid);
                    let _ = self.out.send(Packet::Publish(Publish::new(
                        topic,
                        QoS::AtMostOnce,
                        Vec::new(),
                    )));
                }
                return Ok(self.ack_now(&publish));
            }
            Ok(InboundTopic::MethodResponse { .. }) => return Ok(self.ack_now(&publish)),
            Err(e) => {
                // edgeHub's rule: a publish on a topic it does not serve is dropped, but acked.
                tracing::warn!(client_id = %self.client_id, topic = %publish.topic, error = %e, "publish on an unknown topic dropped");
                return Ok(self.ack_now(&publish));
            }
        };
        if publish.qos == QoS::AtLeastOnce {
            return Ok(Some((publish.pkid, PendingAck::Routed(ack, arrived))));
        }
        // QoS 0 asks for no acknowledgement; the message is routed all the same.
        tokio::spawn(async move {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "a QoS 0 message could not be stored");
            }
        });
        Ok(None)
    }

    /// A QoS 1 publish that is not routed is acknowledged in turn, behind earlier ones.
    fn ack_now(&self, publish: &Publish) -> Option<(u16, PendingAck)> {
        (publish.qos == QoS::AtLeastOnce).then_some((publish.pkid, PendingAck::Now))
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
        Ok(bag::message_from_publish(
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
            if let Err(e) = self.ctx.sessions.subscribe(&self.client_id, &granted) {
                tracing::error!(client_id = %self.client_id, error = %e, "session store failed");
                return Err(ConnectionEnd::Refused(format!("session store: {e}")));
            }
        }
        for f in granted {
            if !self.subscriptions.contains(&f) {
                self.subscriptions.push(f);
            }
        }
        let _ = self.out.send(Packet::SubAck(SubAck::new(sub.pkid, codes)));
        if self.subscribed_to_inputs() && self.outbound_tx.is_none() {
            self.register_inputs(outbound);
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, unsub: Unsubscribe) -> Result<(), ConnectionEnd> {
        if !self.clean {
            if let Err(e) = self
                .ctx
                .sessions
                .unsubscribe(&self.client_id, &unsub.topics)
            {
                return Err(ConnectionEnd::Refused(format!("session store: {e}")));
            }
        }
        self.subscriptions.retain(|f| !unsub.topics.contains(f));
        // Deliveries stop only when no filter covering the inputs is left.
        if !self.subscribed_to_inputs() {
            self.unregister_inputs();
        }
        let _ = self.out.send(Packet::UnsubAck(UnsubAck::new(unsub.pkid)));
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

    fn unregister_inputs(&mut self) {
        if self.outbound_tx.take().is_some() {
            self.ctx
                .unregister_own_sinks(&std::mem::take(&mut self.registered));
        }
    }

    /// Sends waiting deliveries while the window has room.
    fn send_waiting(&mut self) {
        while self.deliveries.can_send() {
            let Some(delivery) = self.waiting.pop_front() else {
                return;
            };
            if delivery.acked.is_closed() {
                continue;
            }
            let topic = match bag::delivery_topic_and_bag(
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
            let _ = self.out.send(Packet::Publish(publish));
        }
    }

    /// Leaves the registry and gives unacknowledged deliveries back to their workers.
    fn finish(&mut self) {
        self.unregister_inputs();
        self.ctx.connections.leave(&self.identity, self.conn_id);
        // Dropping the senders answers "not delivered" to every waiting sink.
        self.deliveries.clear();
        self.waiting.clear();
    }
}

/// A PUBACK waiting for its turn.
enum PendingAck {
    /// After the router says the message is durable; when the PUBLISH arrived (for the PUBACK
    /// latency metric).
    Routed(RouteAck, std::time::Instant),
    /// As soon as every earlier one went out (a publish that is not routed).
    Now,
}

/// Awaits route acknowledgements in arrival order and sends the PUBACKs in that order. On the
/// first failure it stops: that publish and every later one stay unacknowledged.
async fn ack_in_order(
    mut acks: mpsc::Receiver<(u16, PendingAck)>,
    out: mpsc::UnboundedSender<Packet>,
    failed: oneshot::Sender<String>,
    metrics: Arc<HubMetrics>,
) {
    while let Some((pkid, ack)) = acks.recv().await {
        let routed = match ack {
            PendingAck::Routed(ack, arrived) => ack.await.map(|_| {
                metrics.publish_acked(arrived.elapsed());
            }),
            PendingAck::Now => Ok(()),
        };
        match routed {
            Ok(()) => {
                let _ = out.send(Packet::PubAck(PubAck::new(pkid)));
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(pkid, %reason, "a publish could not be stored; closing without PUBACK");
                let _ = failed.send(reason);
                return;
            }
        }
    }
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

/// Writes packets until every sender is gone, flushing when the queue runs dry.
async fn write_packets<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut packets: mpsc::UnboundedReceiver<Packet>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    while let Some(packet) = packets.recv().await {
        encode(&packet, &mut buf);
        while let Ok(more) = packets.try_recv() {
            encode(&more, &mut buf);
            if buf.len() > 64 * 1024 {
                break;
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
