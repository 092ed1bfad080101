//! A module's two links on `/devices/{d}/modules/{m}/messages/events`: the events link (the
//! client sends its outputs; the hub routes them) and the inputs link (the hub delivers the
//! module's input messages).
//!
//! Guarantees, events link ([`serve_events`]):
//! - A delivery is settled `accepted` only after **every** message it carries is durable
//!   (`Router::route` resolved), and dispositions leave in the order the transfers arrived.
//! - A transfer in the batched format ([`convert::BATCH_FORMAT`]) is split into its messages,
//!   routed in order; it is accepted when all are durable.
//! - A transfer over [`convert::MAX_BATCH_BYTES`] (the link's `max-message-size`) is refused
//!   by fe2o3 while it arrives: the link is detached with `amqp:link:message-size-exceeded`.
//! - A message the hub cannot carry (unsupported body, a body over [`MAX_MESSAGE_BYTES`], or
//!   body and properties over [`convert::MAX_STORED_MESSAGE_BYTES`] as stored) is `rejected`
//!   with `amqp:not-implemented` / `amqp:resource-limit-exceeded`, in turn, before anything of
//!   its transfer is routed; the link goes on.
//! - If the store refuses a message, that delivery and every later one on the link are
//!   `rejected` with `amqp:internal-error` and the link is closed with the error: nothing after
//!   a failed message is ever accepted, so a client that resends cannot reorder. A refusal known
//!   when `Router::route` returns (`RouteAck::refusal`: a full store, a message too large) also
//!   stops routing at once: the rest of that transfer and every later transfer are rejected
//!   without being routed, so no later message is stored before the refused one is resent.
//!   A failure known only at commit (ENOSPC) is covered by the link's `AppendChain`: nothing
//!   routed after the failed message on this link is stored.
//! - The sender recorded for each message is the link's authenticated identity.
//! - On stop (shutdown, replacement, connection end) reading stops and what is durable is still
//!   accepted before the link closes.
//! - Flow control (`router::flow`): after a transfer one of whose messages went to an online
//!   module input that lags past its bound, the link takes no transfer until it is released
//!   (the receiver catches up or goes away), so the client's credit runs out; settlements go on.
//!
//! Guarantees, inputs link ([`serve_inputs`]):
//! - The link becomes the sink of every input endpoint of its module (replacing an older one);
//!   deliveries are sent unsettled (the link is accepted with `snd-settle-mode` unsettled or
//!   mixed, never settled: a module asking for pre-settled deliveries is answered `unsettled`,
//!   see `connection::link_acceptor`), only while the client gives credit, with the
//!   `x-opt-input-name`, `iothub-connection-device-id`, `iothub-connection-module-id`,
//!   `x-opt-lock-token`, `iothub-enqueuedtime`, `x-opt-sequence-number` and
//!   `iothub-deliverycount` annotations ([`convert::amqp_from_message`]). The delivery tag is
//!   fe2o3's own (its sender has no way to set one), not the lock token as in edgeHub; the SDKs
//!   settle by delivery, not by tag.
//! - Settlement (edgeHub's `ModuleEndpoint`, reference §2): `accepted` completes the message;
//!   `rejected` and `released` are Reject and Abandon, which edgeHub treats as **not
//!   retryable: the message is set aside (dropped and counted)**, and so do we; `modified` is
//!   retried (sent again, in order, after a backoff). No settlement within
//!   [`SETTLE_TIMEOUT`] (30 s) of its own send, or the link or connection ending first, means
//!   retry: each delivery's deadline counts from its send, so a window the module never
//!   settles is retried 30 s after its last send. A closing link waits at most `CLOSE_GRACE`
//!   (5 s) for settlements still coming, then gives every unsettled delivery back at once.
//! - When the link ends its sinks are taken away if this connection is still the module's live
//!   one; unsettled deliveries go back to the endpoint worker (at-least-once).
//! - A replicated module's member connection (`connection::ConnShared::join`): the link is
//!   attached to the member's replica machines instead (it gets the partitions the member owns,
//!   its dispositions settle them there; a late one changes nothing), and detached when it
//!   ends while the connection stays. A delivery it held unsettled at its end is lost to the
//!   member: the machine takes the member out and its connection is closed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::delivery::{Delivery, DeliveryFut, DeliveryInfo};
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorInfo};
use fe2o3_amqp::types::messaging::{Body, Data, Message as AmqpMessage, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Sender};
use router::{DeliveryOutcome, FailureKind, RejectReason, RouteAck};
use tokio::sync::{mpsc, oneshot, watch};

use crate::amqp::connection::{stopped, ConnShared, CLOSE_TIMEOUT};
use crate::amqp::convert;
use crate::amqp::events_state::{Action, Event, EventsLink};
use crate::head::context::{HeadContext, RegisteredSinks};
use crate::head::sink::{outbound_channel, Outbound, OutboundRx, OutboundTx, NOT_DELIVERED};
use crate::head::MAX_MESSAGE_BYTES;
use crate::identity::Identity;

/// Transfers routed and not yet settled, per events link; past it the link stops reading
/// (back-pressure; the client's credit runs out).
const MAX_PENDING: usize = 1024;
/// Settlement decisions the events link's acker may queue for the link task. Never reached:
/// at most `MAX_PENDING` transfers are queued, one held by the acker and one being read
/// (see `serve_events`), so the acker never waits on it.
const SETTLE_QUEUE: usize = MAX_PENDING + 2;
/// Deliveries sent on an inputs link and awaiting their settlement; past it the link sends
/// nothing more until the oldest is settled or times out.
const MAX_UNSETTLED: usize = 1024;
/// How long a delivery to a module may stay unsettled before it is retried (edgeHub: 30 s).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing inputs link waits for outstanding settlements.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A transfer waiting for its settlement, in arrival order (`D`: the delivery, `A`: a route
/// acknowledgement; generic so the ordering logic is tested without a link or a store).
struct Pending<D, A> {
    info: D,
    work: Work<A>,
}

enum Work<A> {
    /// Accept when every ack resolved; when the transfer arrived.
    Route(Vec<A>, Instant),
    /// Reject in turn (not routed).
    Refuse(AmqpError, String),
    /// Reject in turn, not routed, because an earlier message was refused by the store: fatal.
    Fail(String),
}

/// A settlement for the link task to send.
#[derive(Debug, PartialEq)]
enum Settle<D> {
    Accept(D),
    /// Reject the transfer with this error.
    Reject {
        /// The transfer.
        info: D,
        /// The AMQP error condition.
        condition: AmqpError,
        /// The error's description.
        reason: String,
        /// Whether the link closes afterwards (with this reason).
        fatal: bool,
    },
}

/// Serves a module's events link until it ends or the connection stops.
pub async fn serve_events(mut receiver: Receiver, identity: Identity, shared: Arc<ConnShared>) {
    let ctx = Arc::clone(&shared.ctx);
    let (pending_tx, pending_rx) = mpsc::channel::<Pending<DeliveryInfo, RouteAck>>(MAX_PENDING);
    // The link task reads a transfer only when no settlement waits (`biased`), so transfers
    // queued, held by the acker and settlements waiting are at most MAX_PENDING + 2 together.
    let (settle_tx, mut settle_rx) = mpsc::channel(SETTLE_QUEUE);
    let hub_metrics = Arc::clone(&ctx.metrics);
    let acker = tokio::spawn(settle_in_order(pending_rx, settle_tx, move |latency| {
        hub_metrics.publish_acked(latency)
    }));
    let mut metrics = ctx.metrics.connection_metrics(&identity);
    // Every message of this link is stored on one chain: once one fails to become durable,
    // none routed after it on this link is stored.
    let chain = router::AppendChain::new();
    let mut stop = shared.stop.subscribe();
    let mut pending_tx = Some(pending_tx);
    let mut link = EventsLink::new();
    // Transfers read and not yet settled: none means the module waits for each settlement
    // before sending more (the SDKs do), so its message may be synced on this task's thread.
    let mut unsettled: usize = 0;
    // Flow control: set while an online endpoint the last transfer went to lags past its
    // bound; no transfer is taken meanwhile, so the client's credit runs out.
    let mut held: Option<router::FlowHold> = None;
    let mut ever_held = false;
    let error = loop {
        let event = tokio::select! {
            biased;
            settle = settle_rx.recv() => match settle {
                Some(settle) => {
                    unsettled = unsettled.saturating_sub(1);
                    Some(settle_one(&mut receiver, settle, &shared, &identity).await)
                }
                None => Some(Event::SettlementsEnded),
            },
            delivery = receiver.recv::<Body<Value>>(), if link.is_reading() && held.is_none() => {
                match delivery {
                    Ok(delivery) => {
                        chain.set_producer_waits(unsettled == 0);
                        unsettled += 1;
                        let (event, hold) = take_transfer(&mut link, delivery, &shared, &chain, &identity, &mut metrics, pending_tx.as_ref()).await;
                        if let (Some(hold), false) = (&hold, ever_held) {
                            ever_held = true;
                            tracing::info!(peer = %shared.peer, %identity, endpoint = %hold.endpoint(),
                                "flow control: holding this events link while an online receiver it feeds lags");
                        }
                        held = hold;
                        event
                    }
                    Err(e) => {
                        tracing::debug!(peer = %shared.peer, %identity, error = %e, "events link ended");
                        Some(Event::ReadFailed)
                    }
                }
            }
            () = router::flow::until_released(held.as_ref()), if held.is_some() => {
                held = None;
                None
            }
            () = stopped(&mut stop), if link.is_reading() => Some(Event::Stopped),
        };
        if let Some(Action::Close { error }) = event.map(|e| link.on(e)) {
            break error;
        }
        if !link.is_reading() {
            // The acker ends once what it holds is settled, which ends the settlements.
            pending_tx = None;
        }
    };
    let _ = acker.await;
    let closing = async {
        match error {
            Some(reason) => {
                receiver
                    .close_with_error(AmqpErrorInfo::new(AmqpError::InternalError, reason, None))
                    .await
            }
            None => receiver.close().await,
        }
    };
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        tracing::debug!(peer = %shared.peer, %identity, error = %e, "events link close");
    }
}

/// Takes one transfer: routes it, or fails it after a refusal (as `link` decides), and hands it
/// to the acker. The event for the machine, if any beyond the transfer itself, and a
/// flow-control hold if one of its messages went to an online endpoint that lags.
async fn take_transfer(
    link: &mut EventsLink,
    delivery: Delivery<Body<Value>>,
    shared: &ConnShared,
    chain: &router::AppendChain,
    identity: &Identity,
    metrics: &mut crate::metrics::ConnectionMetrics,
    pending: Option<&mpsc::Sender<Pending<DeliveryInfo, RouteAck>>>,
) -> (Option<Event>, Option<router::FlowHold>) {
    let batched = *delivery.message_format() == Some(convert::BATCH_FORMAT);
    let (info, message) = delivery.into_parts();
    let work = match link.on(Event::Transfer) {
        Action::Fail(reason) => Work::Fail(reason),
        Action::Route => {
            let (work, refusal) = route(shared, chain, identity, metrics, message, batched);
            if let Some(reason) = refusal {
                tracing::warn!(peer = %shared.peer, %identity, %reason, "the store refused a message; nothing later on this link is routed");
                link.on(Event::Refused(reason));
            }
            work
        }
        Action::Wait | Action::Close { .. } => return (None, None),
    };
    let hold = match &work {
        Work::Route(acks, _) => acks.iter().find_map(RouteAck::hold),
        Work::Refuse(..) | Work::Fail(_) => None,
    };
    let Some(tx) = pending else {
        return (None, hold);
    };
    match tx.send(Pending { info, work }).await {
        Ok(()) => (None, hold),
        Err(_) => (Some(Event::HandOffFailed), hold),
    }
}

/// Sends one settlement the acker decided; the event it is for the link's machine.
async fn settle_one(
    receiver: &mut Receiver,
    settle: Settle<DeliveryInfo>,
    shared: &ConnShared,
    identity: &Identity,
) -> Event {
    let (result, fatal) = match settle {
        Settle::Accept(info) => (receiver.accept(info).await, None),
        Settle::Reject {
            info,
            condition,
            reason,
            fatal,
        } => {
            let fatal = fatal.then(|| reason.clone());
            let result = receiver
                .reject(info, AmqpErrorInfo::new(condition, reason, None))
                .await;
            (result, fatal)
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %shared.peer, %identity, error = %e, "cannot settle");
    }
    Event::Settled { fatal }
}

/// Converts and routes one transfer; with the reason if the store refused one of its messages
/// at once (the rest of the transfer is then not routed).
fn route(
    shared: &ConnShared,
    chain: &router::AppendChain,
    identity: &Identity,
    metrics: &mut crate::metrics::ConnectionMetrics,
    message: fe2o3_amqp::types::messaging::Message<Body<Value>>,
    batched: bool,
) -> (Work<RouteAck>, Option<String>) {
    let parts = if batched {
        // Several messages, each answered before the next is routed: none is alone.
        chain.set_producer_waits(false);
        match convert::split_batch(&message) {
            Ok(parts) => parts,
            Err(e) => return (Work::Refuse(AmqpError::DecodeError, e.to_string()), None),
        }
    } else {
        vec![message]
    };
    let messages = match convert_all(identity, &parts) {
        Ok(messages) => messages,
        Err(refuse) => return (refuse, None),
    };
    let arrived = Instant::now();
    let (acks, refusal) = route_until_refused(
        messages,
        |m| {
            metrics.received(&shared.ctx.metrics, m.source().output(), m.body().len());
            shared.ctx.router.route_in(chain, m)
        },
        |ack| ack.refusal().map(|e| e.to_string()),
    );
    (Work::Route(acks, arrived), refusal)
}

/// Routes `messages` in order until the first one refused at once: the acks routed (the
/// refused one last) and its reason. Nothing after a refused message is routed.
fn route_until_refused<M, A>(
    messages: Vec<M>,
    mut route_one: impl FnMut(M) -> A,
    mut refusal: impl FnMut(&mut A) -> Option<String>,
) -> (Vec<A>, Option<String>) {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let mut ack = route_one(m);
        let refused = refusal(&mut ack);
        acks.push(ack);
        if refused.is_some() {
            return (acks, refused);
        }
    }
    (acks, None)
}

/// Converts every message of a transfer, or says how to refuse the transfer.
fn convert_all(
    identity: &Identity,
    parts: &[fe2o3_amqp::types::messaging::Message<Body<Value>>],
) -> Result<Vec<router::Message>, Work<RouteAck>> {
    let mut messages = Vec::with_capacity(parts.len());
    for part in parts {
        match convert::message_from_amqp(&identity.device, &identity.module, part) {
            Ok(m) if m.body().len() > MAX_MESSAGE_BYTES => {
                return Err(Work::Refuse(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "message body of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                        m.body().len()
                    ),
                ))
            }
            Ok(m) if convert::stored_size(&m) > convert::MAX_STORED_MESSAGE_BYTES => {
                return Err(Work::Refuse(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "message of {} bytes with its properties exceeds the limit of {}",
                        convert::stored_size(&m),
                        convert::MAX_STORED_MESSAGE_BYTES
                    ),
                ))
            }
            Ok(m) => messages.push(m),
            Err(e) => return Err(Work::Refuse(AmqpError::NotImplemented, e.to_string())),
        }
    }
    Ok(messages)
}

/// Awaits each transfer's route acknowledgements in arrival order and says how to settle it.
/// After the first store failure every later transfer is rejected.
async fn settle_in_order<D, A, O, E>(
    mut pending: mpsc::Receiver<Pending<D, A>>,
    settle: mpsc::Sender<Settle<D>>,
    acked: impl Fn(Duration),
) where
    A: std::future::Future<Output = Result<O, E>>,
    E: std::fmt::Display,
{
    let mut failed: Option<String> = None;
    while let Some(Pending { info, work }) = pending.recv().await {
        let decision = match work {
            Work::Refuse(condition, reason) => Settle::Reject {
                info,
                condition,
                reason,
                fatal: false,
            },
            Work::Fail(reason) => {
                if failed.is_none() {
                    failed = Some(reason.clone());
                }
                Settle::Reject {
                    info,
                    condition: AmqpError::InternalError,
                    reason,
                    fatal: true,
                }
            }
            Work::Route(_, _) if failed.is_some() => Settle::Reject {
                info,
                condition: AmqpError::InternalError,
                reason: format!(
                    "not stored: an earlier message failed ({})",
                    failed.as_deref().unwrap_or_default()
                ),
                fatal: true,
            },
            Work::Route(acks, arrived) => {
                let mut error = None;
                for ack in acks {
                    if let Err(e) = ack.await {
                        error = Some(e.to_string());
                        break;
                    }
                }
                match error {
                    None => {
                        acked(arrived.elapsed());
                        Settle::Accept(info)
                    }
                    Some(reason) => {
                        tracing::warn!(%reason, "a message could not be stored; rejecting it and every later one");
                        failed = Some(reason.clone());
                        Settle::Reject {
                            info,
                            condition: AmqpError::InternalError,
                            reason,
                            fatal: true,
                        }
                    }
                }
            }
        };
        if settle.send(decision).await.is_err() {
            return;
        }
    }
}

/// Serves a module's inputs link until the client detaches it, it fails, or the connection
/// stops.
///
/// Steps: register the module's input sinks and start the settler, [`InputsLink::deliver`]
/// while this connection is current, then [`InputsLink::close`].
pub async fn serve_inputs(sender: Sender, identity: Identity, shared: Arc<ConnShared>) {
    let ctx = Arc::clone(&shared.ctx);
    let (out_tx, out_rx) = outbound_channel();
    // A replica member receives what it owns from its module's replica machines; any other
    // connection registers its module's input sinks.
    let replica = shared.attach_replica(&identity, &out_tx);
    let (registered, current) = if replica {
        (RegisteredSinks::new(), shared.is_current(&identity))
    } else if ctx.dispatcher.is_replicated(&identity.module) {
        // A connection admitted before its module became replicated (a reload) is no member:
        // its module's inputs go to members only.
        tracing::warn!(peer = %shared.peer, %identity,
            "an inputs link of a replicated module on a connection that is not one of its replicas (it connected before the module was replicated): nothing is delivered on it");
        (RegisteredSinks::new(), true)
    } else {
        ctx.register_input_sinks(&identity, &out_tx, || shared.is_current(&identity))
    };
    let routes_changed = ctx.routes_changed.subscribe();
    let (settling_tx, settling_rx) = mpsc::channel::<Settling<InputSettlement>>(MAX_UNSETTLED);
    let metrics = ctx.metrics.connection_metrics(&identity);
    let settler = tokio::spawn(settle_inputs(settling_rx, move || metrics.sent()));
    let stop = shared.stop.subscribe();
    let mut link = InputsLink {
        sender,
        identity,
        shared,
        ctx,
        out_tx,
        out_rx,
        replica,
        registered,
        routes_changed,
        settling_tx,
        stop,
    };
    let ended = if current {
        link.deliver().await
    } else {
        "connection already replaced; nothing registered"
    };
    link.close(settler, ended).await;
}

/// Why an inputs link ended when the connection stops or the sinks hang up (logged).
const INPUTS_CLOSING: &str = "connection closing";

/// A module's inputs link while it is served.
struct InputsLink {
    sender: Sender,
    identity: Identity,
    shared: Arc<ConnShared>,
    ctx: Arc<HeadContext>,
    /// Given to the input sinks this link registers.
    out_tx: OutboundTx,
    /// Deliveries from the input sinks.
    out_rx: OutboundRx,
    /// The link serves a replica member (its sinks are the membership's, not registered).
    replica: bool,
    /// The input sinks this link registered (only these are removed when it ends).
    registered: RegisteredSinks,
    routes_changed: watch::Receiver<u64>,
    /// Deliveries sent, for the settler to map their settlements.
    settling_tx: mpsc::Sender<Settling<InputSettlement>>,
    stop: watch::Receiver<bool>,
}

impl InputsLink {
    /// Sends deliveries to the client as its credit allows, until the link ends; returns why.
    async fn deliver(&mut self) -> &'static str {
        loop {
            let delivery = tokio::select! {
                d = self.out_rx.recv() => d,
                e = self.sender.on_detach() => {
                    tracing::debug!(peer = %self.shared.peer, identity = %self.identity, error = %e, "inputs link detached");
                    return "detached by the client";
                }
                () = stopped(&mut self.stop) => None,
                Ok(()) = self.routes_changed.changed() => {
                    self.register_new_inputs();
                    continue;
                }
            };
            let Some(delivery) = delivery else {
                return INPUTS_CLOSING;
            };
            if delivery.acked.is_closed() {
                continue;
            }
            let message = self.to_amqp(&delivery);
            // Waits for the client's credit (a detach while waiting ends it with an error).
            let sent = tokio::select! {
                s = self.sender.send_batchable(message) => s,
                () = stopped(&mut self.stop) => return INPUTS_CLOSING,
            };
            match sent {
                Ok(settled) => {
                    let settling = Settling {
                        settled,
                        deadline: tokio::time::Instant::now() + SETTLE_TIMEOUT,
                        acked: delivery.acked,
                    };
                    // Waits while MAX_UNSETTLED deliveries await their settlement.
                    tokio::select! {
                        _ = self.settling_tx.send(settling) => {}
                        () = stopped(&mut self.stop) => return INPUTS_CLOSING,
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %self.shared.peer, identity = %self.identity, error = %e, "inputs link send failed");
                    return "send failed";
                }
            }
        }
    }

    /// A reload routed more inputs of this module: take them too.
    fn register_new_inputs(&mut self) {
        let (shared, identity) = (&self.shared, &self.identity);
        if self.replica {
            shared.replica_join_new_inputs(identity);
            return;
        }
        self.ctx.register_new_input_sinks(
            identity,
            &self.out_tx,
            || shared.is_current(identity),
            &mut self.registered,
        );
    }

    /// A delivery as the AMQP message the SDK reads (lock token, enqueue time, sequence number,
    /// delivery count).
    fn to_amqp(&self, delivery: &Outbound) -> AmqpMessage<Data> {
        convert::amqp_from_message(
            &delivery.message,
            &delivery.input,
            convert::DeliveryStamp {
                lock_token: rand::random::<[u8; 16]>(),
                enqueued_ms: i64::try_from(self.ctx.now_millis().0).unwrap_or(i64::MAX),
                sequence: delivery.offset.get(),
                delivery_count: delivery.previous_attempts,
            },
        )
    }

    /// Ends the link: unregisters its own sinks, logs why it ended, hands back what was not
    /// sent, closes the link and gives the settler [`CLOSE_GRACE`].
    async fn close(self, settler: tokio::task::JoinHandle<()>, ended: &'static str) {
        let InputsLink {
            sender,
            identity,
            shared,
            ctx,
            out_tx,
            out_rx,
            replica,
            registered,
            routes_changed,
            settling_tx,
            stop,
        } = self;
        // Only the sinks this link registered, and only while they are still registered: a newer
        // link (of this connection or another) keeps its own. A replica member's link detaches
        // from the machines only if it is still the one attached.
        if replica {
            shared.detach_replica(&identity, &out_tx);
        }
        ctx.unregister_own_sinks(&registered);
        drop(registered);
        tracing::info!(peer = %shared.peer, %identity, reason = ended, "inputs link ended");
        // Deliveries not sent yet go back to their workers (their `acked` is dropped).
        drop(out_rx);
        drop(settling_tx);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
        if !finish_settler(settler).await {
            tracing::debug!(peer = %shared.peer, %identity, "settlements still outstanding at close; they are retried");
        }
        drop((out_tx, routes_changed, stop));
    }
}

/// Gives the settler [`CLOSE_GRACE`] to map the settlements still coming, then aborts it: every
/// delivery still unsettled is answered not delivered at once (its `acked` is dropped) and
/// retried, rather than waiting out its [`SETTLE_TIMEOUT`]. False if it had to be aborted.
async fn finish_settler(mut settler: tokio::task::JoinHandle<()>) -> bool {
    if tokio::time::timeout(CLOSE_GRACE, &mut settler)
        .await
        .is_ok()
    {
        return true;
    }
    settler.abort();
    let _ = settler.await;
    false
}

/// What fe2o3 answers for one delivery on the inputs link: its settlement.
type InputSettlement = DeliveryFut<Result<Outcome, SendError>>;

/// A delivery sent and waiting for the module's disposition (`F`: its settlement; generic so
/// the timing is tested without a link).
struct Settling<F> {
    settled: F,
    /// When it was sent plus [`SETTLE_TIMEOUT`]: each delivery's own deadline.
    deadline: tokio::time::Instant,
    acked: oneshot::Sender<DeliveryOutcome>,
}

/// Maps each disposition to the router's outcome, in send order. Each delivery is given until
/// its own deadline (counted from its send, not from when the one before it settled), so a
/// module that settles nothing has its whole window retried [`SETTLE_TIMEOUT`] after the last
/// send, not a window's worth of timeouts later.
async fn settle_inputs<F>(mut settling: mpsc::Receiver<Settling<F>>, delivered: impl Fn())
where
    F: std::future::Future<Output = Result<Outcome, SendError>>,
{
    while let Some(Settling {
        settled,
        deadline,
        acked,
    }) = settling.recv().await
    {
        let outcome = match tokio::time::timeout_at(deadline, settled).await {
            Ok(Ok(outcome)) => settlement_outcome(&outcome),
            Ok(Err(_)) => NOT_DELIVERED,
            Err(_) => DeliveryOutcome::Retry(FailureKind::Timeout),
        };
        if outcome == DeliveryOutcome::Delivered {
            delivered();
        }
        let _ = acked.send(outcome);
    }
}

/// The router's outcome for a module's disposition (see the module doc).
pub fn settlement_outcome(outcome: &Outcome) -> DeliveryOutcome {
    match outcome {
        Outcome::Accepted(_) => DeliveryOutcome::Delivered,
        Outcome::Rejected(r) => DeliveryOutcome::Reject(RejectReason::new(format!(
            "rejected by the module{}",
            r.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))),
        Outcome::Released(_) => {
            DeliveryOutcome::Reject(RejectReason::new("released (abandoned) by the module"))
        }
        Outcome::Modified(_) => DeliveryOutcome::Retry(FailureKind::Transient),
        #[allow(unreachable_patterns)]
        _ => DeliveryOutcome::Retry(FailureKind::Internal),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use fe2o3_amqp::types::messaging::{Accepted, Modified, Rejected, Released};

    type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

    /// An acknowledgement that resolves when `rx` is answered.
    fn ack_on(rx: oneshot::Receiver<Result<(), String>>) -> Ack {
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err("dropped".into())) })
    }

    /// Feeds `acks` (one transfer each) through `settle_in_order` and returns its decisions.
    async fn decisions(works: Vec<Work<Ack>>) -> Vec<Settle<u32>> {
        let (tx, rx) = mpsc::channel(16);
        let (settle_tx, mut settle_rx) = mpsc::channel(SETTLE_QUEUE);
        let task = tokio::spawn(settle_in_order(rx, settle_tx, |_| {}));
        for (i, work) in works.into_iter().enumerate() {
            let info = u32::try_from(i).unwrap();
            tx.send(Pending { info, work }).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let mut out = Vec::new();
        while let Ok(s) = settle_rx.try_recv() {
            out.push(s);
        }
        out
    }

    fn ack(result: Result<(), String>) -> Ack {
        Box::pin(async move { result })
    }

    fn route(acks: Vec<Ack>) -> Work<Ack> {
        Work::Route(acks, Instant::now())
    }

    #[tokio::test]
    async fn transfers_are_accepted_in_arrival_order_even_when_durable_out_of_order() {
        let (late_tx, late_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(16);
        let (settle_tx, mut settle_rx) = mpsc::channel(SETTLE_QUEUE);
        let task = tokio::spawn(settle_in_order(rx, settle_tx, |_| {}));
        tx.send(Pending {
            info: 0u32,
            work: route(vec![ack_on(late_rx)]),
        })
        .await
        .unwrap();
        tx.send(Pending {
            info: 1,
            work: route(vec![ack(Ok(()))]),
        })
        .await
        .unwrap();
        tokio::task::yield_now().await;
        assert!(
            settle_rx.try_recv().is_err(),
            "nothing settles before the first is durable"
        );
        late_tx.send(Ok(())).unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(settle_rx.recv().await, Some(Settle::Accept(0)));
        assert_eq!(settle_rx.recv().await, Some(Settle::Accept(1)));
    }

    #[tokio::test]
    async fn a_batch_is_accepted_only_when_all_its_messages_are_durable() {
        let got = decisions(vec![
            route(vec![ack(Ok(())), ack(Ok(())), ack(Ok(()))]),
            route(vec![ack(Ok(())), ack(Err("disk full".into()))]),
        ])
        .await;
        assert_eq!(got[0], Settle::Accept(0));
        assert!(
            matches!(&got[1], Settle::Reject { info: 1, condition: AmqpError::InternalError, reason: r, fatal: true } if r == "disk full")
        );
    }

    #[tokio::test]
    async fn after_a_store_failure_every_later_transfer_is_rejected() {
        let got = decisions(vec![
            route(vec![ack(Ok(()))]),
            route(vec![ack(Err("poisoned".into()))]),
            route(vec![ack(Ok(()))]),
            Work::Refuse(AmqpError::NotImplemented, "odd body".into()),
            route(vec![ack(Ok(()))]),
        ])
        .await;
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Settle::Accept(0));
        assert!(matches!(
            &got[1],
            Settle::Reject {
                info: 1,
                condition: AmqpError::InternalError,
                fatal: true,
                ..
            }
        ));
        // Durable or not, nothing after a failure is accepted: a resend could not reorder.
        assert!(matches!(
            &got[2],
            Settle::Reject {
                info: 2,
                condition: AmqpError::InternalError,
                fatal: true,
                ..
            }
        ));
        assert!(matches!(
            &got[3],
            Settle::Reject {
                info: 3,
                condition: AmqpError::NotImplemented,
                fatal: false,
                ..
            }
        ));
        assert!(matches!(
            &got[4],
            Settle::Reject {
                info: 4,
                condition: AmqpError::InternalError,
                fatal: true,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_refused_transfer_is_rejected_in_turn_and_the_link_goes_on() {
        let got = decisions(vec![
            Work::Refuse(AmqpError::ResourceLimitExceeded, "too big".into()),
            route(vec![ack(Ok(()))]),
        ])
        .await;
        assert!(matches!(
            &got[0],
            Settle::Reject {
                info: 0,
                condition: AmqpError::ResourceLimitExceeded,
                fatal: false,
                ..
            }
        ));
        assert_eq!(got[1], Settle::Accept(1));
    }

    #[test]
    fn nothing_after_a_message_refused_at_once_is_routed() {
        let mut routed = Vec::new();
        let (acks, refusal) = route_until_refused(
            vec![10usize, 2000, 20, 30],
            |m| {
                routed.push(m);
                m
            },
            |m| (*m > 1000).then(|| "too large".to_string()),
        );
        assert_eq!(
            routed,
            [10, 2000],
            "the smaller message after it was routed"
        );
        assert_eq!(acks, [10, 2000]);
        assert_eq!(refusal.as_deref(), Some("too large"));
        let (acks, refusal) = route_until_refused(vec![1usize, 2], |m| m, |_| None);
        assert_eq!((acks, refusal), (vec![1, 2], None));
    }

    #[tokio::test]
    async fn a_transfer_after_a_refusal_is_rejected_fatally_without_routing() {
        let got = decisions(vec![
            route(vec![ack(Ok(()))]),
            route(vec![ack(Ok(())), ack(Err("store full".into()))]),
            Work::Fail("not stored: an earlier message was refused".into()),
        ])
        .await;
        assert_eq!(got[0], Settle::Accept(0));
        assert!(matches!(
            &got[1],
            Settle::Reject { info: 1, condition: AmqpError::InternalError, reason: r, fatal: true } if r == "store full"
        ));
        assert!(matches!(
            &got[2],
            Settle::Reject {
                info: 2,
                condition: AmqpError::InternalError,
                fatal: true,
                ..
            }
        ));
    }

    type NeverSettled = std::future::Pending<Result<Outcome, SendError>>;

    /// Three deliveries sent at once to a module that settles none: each is retried at its
    /// own deadline, so all three by SETTLE_TIMEOUT after the send, not one after the other.
    #[tokio::test(start_paused = true)]
    async fn unsettled_deliveries_time_out_from_their_own_send() {
        let (tx, rx) = mpsc::channel::<Settling<NeverSettled>>(MAX_UNSETTLED);
        let settler = tokio::spawn(settle_inputs(rx, || {}));
        let start = tokio::time::Instant::now();
        let mut acks = Vec::new();
        for _ in 0..3 {
            let (acked, ack) = oneshot::channel();
            tx.try_send(Settling {
                settled: std::future::pending(),
                deadline: tokio::time::Instant::now() + SETTLE_TIMEOUT,
                acked,
            })
            .unwrap();
            acks.push(ack);
        }
        for ack in acks {
            assert_eq!(
                ack.await.unwrap(),
                DeliveryOutcome::Retry(FailureKind::Timeout)
            );
        }
        assert_eq!(
            start.elapsed(),
            SETTLE_TIMEOUT,
            "the last was retried only after its predecessors' timeouts"
        );
        drop(tx);
        settler.await.unwrap();
    }

    /// A closing link gives unsettled deliveries back after CLOSE_GRACE: their acks are
    /// dropped (not delivered, retried) then, not at SETTLE_TIMEOUT.
    #[tokio::test(start_paused = true)]
    async fn closing_gives_unsettled_deliveries_back_after_the_grace() {
        let (tx, rx) = mpsc::channel::<Settling<NeverSettled>>(MAX_UNSETTLED);
        let settler = tokio::spawn(settle_inputs(rx, || {}));
        let start = tokio::time::Instant::now();
        let mut acks = Vec::new();
        for _ in 0..2 {
            let (acked, ack) = oneshot::channel();
            tx.try_send(Settling {
                settled: std::future::pending(),
                deadline: tokio::time::Instant::now() + SETTLE_TIMEOUT,
                acked,
            })
            .unwrap();
            acks.push(ack);
        }
        drop(tx);
        assert!(!finish_settler(settler).await, "nothing settled");
        assert_eq!(start.elapsed(), CLOSE_GRACE);
        for mut ack in acks {
            assert_eq!(
                ack.try_recv(),
                Err(oneshot::error::TryRecvError::Closed),
                "still waiting for its settlement after the close"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_settler_that_finishes_in_the_grace_is_not_aborted() {
        let (tx, rx) = mpsc::channel::<Settling<NeverSettled>>(MAX_UNSETTLED);
        let settler = tokio::spawn(settle_inputs(rx, || {}));
        drop(tx);
        assert!(finish_settler(settler).await);
    }

    #[test]
    fn dispositions_map_as_edgehub_does() {
        assert_eq!(
            settlement_outcome(&Outcome::Accepted(Accepted {})),
            DeliveryOutcome::Delivered
        );
        assert!(matches!(
            settlement_outcome(&Outcome::Rejected(Rejected { error: None })),
            DeliveryOutcome::Reject(_)
        ));
        assert!(matches!(
            settlement_outcome(&Outcome::Released(Released {})),
            DeliveryOutcome::Reject(_)
        ));
        assert_eq!(
            settlement_outcome(&Outcome::Modified(Modified {
                delivery_failed: None,
                undeliverable_here: None,
                message_annotations: None
            })),
            DeliveryOutcome::Retry(FailureKind::Transient)
        );
    }
}
