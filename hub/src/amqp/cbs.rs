//! The `$cbs` node of one connection (reference §2 "CBS flow"): the client's sender link
//! carries put-token requests, its receiver link the replies.
//!
//! Guarantees: every request delivery is settled `accepted` and answered, in arrival order, with
//! `correlation-id` = the request's `message-id` and `status-code` / `status-description` as
//! [`ConnectionAuth::put_token`](crate::amqp::auth_state::ConnectionAuth::put_token) decides.
//! Replies wait (in order) until the client's reply link is attached. The reply link may be
//! detached and attached again any number of times: one that ends (detached by the client,
//! failed) frees the queue, and the next one gets every reply not yet sent, in order (first
//! the one whose send failed); one attached while another is gets the replies when that one
//! ends. At most
//! [`CBS_REPLY_QUEUE`] of them: past it no request is read (the client's credit runs out) until
//! replies go out. At most [`MAX_UNSETTLED_REPLIES`] replies wait for the client's settlement
//! (each at most [`REPLY_SETTLE_TIMEOUT`]); past it no reply is sent until one settles. A 200
//! makes the identity join the live-connection registry (a renewal changes only its expiry); a
//! replicated module refused for its count of replicas is answered 503 with the reason instead,
//! and the identity is not authenticated ([`ConnectionAuth::withdraw`](crate::amqp::auth_state::ConnectionAuth::withdraw)).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::types::messaging::Outcome;

use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message as AmqpMessage, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Value};
use fe2o3_amqp::{Receiver, Sender};
use tokio::sync::mpsc;

use crate::amqp::auth_state::{PutTokenRequest, REFUSED_STATUS};
#[cfg(doc)]
use crate::amqp::connection::CBS_REPLY_QUEUE;
use crate::amqp::connection::{stopped, ConnShared, Joined, CLOSE_TIMEOUT};
use crate::auth::credentials::CredentialError;

/// How long a reply's settlement is awaited before it is logged as lost.
const REPLY_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies sent and not yet settled by the client, at most.
const MAX_UNSETTLED_REPLIES: usize = 16;

/// A reply sent, with the deadline for its settlement.
type Unsettled = VecDeque<(
    tokio::time::Instant,
    DeliveryFut<Result<Outcome, SendError>>,
)>;

/// A reply to send on the `$cbs` receiver link.
#[derive(Debug)]
pub struct Reply {
    correlation_id: Option<MessageId>,
    to: Option<String>,
    status: i32,
    description: String,
}

fn app_text(message: &AmqpMessage<Body<Value>>, key: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The request fields of a put-token message.
fn request_of(message: &AmqpMessage<Body<Value>>) -> PutTokenRequest {
    let token = match &message.body {
        Body::Value(AmqpValue(Value::String(s))) => Some(s.clone()),
        Body::Data(d) if d.len() == 1 => d
            .iter()
            .next()
            .and_then(|x| String::from_utf8(x.0.to_vec()).ok()),
        _ => None,
    };
    PutTokenRequest {
        operation: app_text(message, "operation"),
        token_type: app_text(message, "type"),
        name: app_text(message, "name"),
        token,
    }
}

/// Serves the client's `$cbs` sender link: each request is accepted and answered.
pub async fn serve_requests(mut receiver: Receiver, shared: Arc<ConnShared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            () = stopped(&mut stop) => break,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(peer = %shared.peer, error = %e, "$cbs request link ended");
                return;
            }
        };
        if let Err(e) = receiver.accept(&delivery).await {
            tracing::debug!(peer = %shared.peer, error = %e, "cannot settle a $cbs request");
        }
        let message = delivery.message();
        let request = request_of(message);
        let hosts: Vec<&str> = shared.ctx.audiences.iter().map(String::as_str).collect();
        let ctx = &shared.ctx;
        let reply = {
            let mut auth = shared.auth.lock().unwrap_or_else(|p| p.into_inner());
            let reply = auth.put_token(&request, &hosts, |identity, token| {
                let key = ctx
                    .identities
                    .key(identity)
                    .ok_or_else(|| CredentialError::UnknownModule(identity.clone()))?;
                ctx.verify_token_expiry(token, &key, identity)
            });
            // A first token joins the registry (a replicated module: its replica machines)
            // under the connection's authentication lock, so no link of a refused identity is
            // authorized meanwhile.
            match &reply.identity {
                Some(identity) if !reply.renewed => match shared.join(identity) {
                    Joined::ReplicasFull(full) => auth.withdraw(identity, full.to_string()),
                    Joined::Yes | Joined::Refused => {
                        ctx.metrics.client_authenticated(identity);
                        reply
                    }
                },
                _ => reply,
            }
        };
        shared.auth_changed.notify_one();
        match &reply.identity {
            Some(identity) => {
                tracing::info!(peer = %shared.peer, %identity, renewed = reply.renewed, "$cbs put-token accepted");
            }
            None if reply.status == REFUSED_STATUS => {
                tracing::info!(peer = %shared.peer, status = reply.status, reason = %reply.description, "$cbs put-token refused");
            }
            None => {
                ctx.metrics.client_connect_failed("not_authorized");
                tracing::warn!(peer = %shared.peer, status = reply.status, reason = %reply.description, name = ?request.name, "$cbs put-token refused");
            }
        }
        let props = message.properties.as_ref();
        let reply = Reply {
            correlation_id: props.and_then(|p| p.message_id.clone()),
            to: props.and_then(|p| p.reply_to.clone()),
            status: reply.status,
            description: reply.description,
        };
        // Waits while the reply queue is full: no further request is read meanwhile.
        tokio::select! {
            sent = shared.cbs_replies.send(reply) => {
                if sent.is_err() {
                    break;
                }
            }
            () = stopped(&mut stop) => break,
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, receiver.close()).await;
}

/// The replies of a connection, for its reply link: the queue, and a reply taken from it that
/// a reply link could not send (it is sent first on the next one).
#[derive(Debug)]
pub struct ReplyQueue {
    rx: mpsc::Receiver<Reply>,
    unsent: Option<Reply>,
}

impl ReplyQueue {
    /// The queue `rx` receives.
    pub fn new(rx: mpsc::Receiver<Reply>) -> Self {
        ReplyQueue { rx, unsent: None }
    }
}

/// Serves the client's `$cbs` receiver link: sends the replies in order. The link holds the
/// queue while it is attached; when it ends (the client detached it, it failed) the queue is
/// free for the next reply link. A reply link attached while another one holds the queue
/// waits for it (or for its own detach).
pub async fn serve_replies(mut sender: Sender, shared: Arc<ConnShared>) {
    let mut stop = shared.stop.subscribe();
    let queue = tokio::select! {
        q = shared.cbs_reply_rx.lock() => Some(q),
        e = sender.on_detach() => {
            tracing::debug!(peer = %shared.peer, error = %e, "$cbs reply link detached before it got the replies");
            None
        }
        () = stopped(&mut stop) => None,
    };
    if let Some(mut queue) = queue {
        send_replies(&mut sender, &mut queue, &shared).await;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
}

/// Sends `queue`'s replies on `sender` until the link ends or the connection stops.
async fn send_replies(sender: &mut Sender, queue: &mut ReplyQueue, shared: &ConnShared) {
    let mut stop = shared.stop.subscribe();
    let mut unsettled = Unsettled::new();
    loop {
        let reply = match queue.unsent.take() {
            Some(reply) => reply,
            None => {
                let reply = tokio::select! {
                    biased;
                    () = settle_first(&mut unsettled, &shared.peer), if !unsettled.is_empty() => continue,
                    e = sender.on_detach() => {
                        tracing::debug!(peer = %shared.peer, error = %e, "$cbs reply link detached");
                        return;
                    }
                    r = queue.rx.recv(), if unsettled.len() < MAX_UNSETTLED_REPLIES => r,
                    () = stopped(&mut stop) => None,
                };
                let Some(reply) = reply else { return };
                reply
            }
        };
        let message = reply_message(&reply);
        let sent = tokio::select! {
            s = sender.send_batchable(message) => s,
            () = stopped(&mut stop) => return,
        };
        match sent {
            Ok(settled) => {
                unsettled.push_back((tokio::time::Instant::now() + REPLY_SETTLE_TIMEOUT, settled));
            }
            Err(e) => {
                tracing::debug!(peer = %shared.peer, error = %e, "$cbs reply link ended");
                queue.unsent = Some(reply);
                return;
            }
        }
    }
}

/// The reply message (`correlation-id`, `to`, `status-code`, `status-description`).
fn reply_message(reply: &Reply) -> AmqpMessage<AmqpValue<Value>> {
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    app.insert("status-code".into(), SimpleValue::Int(reply.status));
    app.insert(
        "status-description".into(),
        SimpleValue::String(reply.description.clone()),
    );
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: reply.correlation_id.clone(),
            to: reply.to.clone(),
            ..Properties::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: AmqpValue(Value::Null),
        footer: None,
    }
}

/// Awaits the settlement of the oldest reply sent (or its deadline), then forgets it.
async fn settle_first(unsettled: &mut Unsettled, peer: &str) {
    let Some((deadline, settled)) = unsettled.front_mut() else {
        return;
    };
    if tokio::time::timeout_at(*deadline, settled).await.is_err() {
        tracing::debug!(%peer, "a $cbs reply was not settled");
    }
    unsettled.pop_front();
}
