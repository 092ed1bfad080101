//! A module's twin link pair on `/devices/{d}/modules/{m}/twin` (reference §2; what the Node
//! SDK's `AmqpTwinClient` opens): the client's sender link carries requests, its receiver link
//! the answers and the desired-properties notifications. The twins themselves are
//! [`crate::twin`]'s, as for the MQTT head.
//!
//! Guarantees:
//! - Both links name the connection's own authenticated module (`auth_state` refuses any
//!   other): nothing of another module's twin is ever read or written.
//! - A request is chosen by the message annotations `operation` and `resource`, and answered
//!   with the request's `correlation-id` and a `status` annotation (as the Node SDK reads it):
//!   `GET` → 200 with `{"desired": {…}, "reported": {…}}` (each with `$version`);
//!   `PATCH` on `/properties/reported` → 204 with a `version` annotation (the new reported
//!   `$version`) only once the patch is durable and this hub still owns the data directory;
//!   `PUT` / `DELETE` on `/notifications/twin/properties/desired` → 200, desired-properties
//!   notifications on (off). A request without a `correlation-id` is refused with 400 and
//!   never applied (as one without `$rid` on MQTT). A refused request gets 400, 413 or 500
//!   (as on MQTT, see [`crate::twin::document`]) with `{"status", "message"}` as the body, and
//!   changes nothing.
//! - A hub that a newer one fenced answers nothing: the connection closes, and the module asks
//!   the live hub again.
//! - With notifications on, every change of the manifest's desired properties sends the
//!   difference from what this connection last sent (the shared
//!   [`DesiredWatch`](crate::twin::desired_watch::DesiredWatch), as on MQTT) on the receiver
//!   link: a message with no `correlation-id` whose body is the patch with its `$version`.
//! - Bounded: answers wait in a queue of [`TWIN_QUEUE`] per module and connection (past it
//!   no request is read: the client's credit runs out); a request is at most
//!   [`MAX_TWIN_MESSAGE_BYTES`] (fe2o3 detaches a link that sends more, while it arrives). The
//!   answer link sends only with the client's credit, settled when the client asked for that
//!   (the SDK does: twin links are at most once). Answers made before the receiver link is
//!   attached wait for it; a receiver link attached again gets those not yet sent.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    Body, Data, Message as AmqpMessage, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Value};
use fe2o3_amqp::{Receiver, Sender};
use serde_json::json;
use tokio::sync::{mpsc, Mutex as AsyncMutex};

use crate::amqp::connection::{stopped, ConnShared, ConnectionEnd, CLOSE_TIMEOUT};
use crate::amqp::convert;
use crate::identity::Identity;
use crate::metrics::HubMetrics;
use crate::twin::desired_watch::DesiredWatch;
use crate::twin::{TwinError, Twins};

/// Answers one module's twin links of one connection may have waiting for the receiver link.
pub const TWIN_QUEUE: usize = 16;
/// The `max-message-size` of the twin request link: above the reported-properties limit
/// ([`crate::twin::document::MAX_REPORTED_BYTES`]), so a patch too large is answered 413
/// rather than cut off.
pub const MAX_TWIN_MESSAGE_BYTES: u64 = 64 * 1024;
/// The message annotation that names a request's operation.
pub const OPERATION: &str = "operation";
/// The message annotation that names what a request operates on.
pub const RESOURCE: &str = "resource";
/// The answer's status annotation.
pub const STATUS: &str = "status";
/// The answer's version annotation (a reported patch's new `$version`).
pub const VERSION: &str = "version";
/// The resource of reported-properties patches.
pub const REPORTED: &str = "/properties/reported";
/// The resource of desired-properties notifications.
pub const DESIRED_NOTIFICATIONS: &str = "/notifications/twin/properties/desired";

/// What a twin request asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TwinOp {
    /// `GET`: the twin.
    Get,
    /// `PATCH` `/properties/reported`.
    PatchReported,
    /// `PUT` `/notifications/twin/properties/desired`: notifications on.
    SubscribeDesired,
    /// `DELETE` `/notifications/twin/properties/desired`: notifications off.
    UnsubscribeDesired,
    /// Anything else (answered 400 with this reason).
    Unknown(String),
}

/// A twin request as read from its message.
#[derive(Clone, Debug)]
pub struct TwinRequest {
    /// The operation.
    pub op: TwinOp,
    /// Its `correlation-id`, echoed in the answer.
    pub correlation_id: Option<MessageId>,
    /// Its body (a patch's JSON).
    pub body: Bytes,
}

fn annotation(message: &AmqpMessage<Body<Value>>, key: &str) -> Option<String> {
    let value = message
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::from(Symbol::from(key)))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The request a message on the twin link carries.
pub fn request_of(message: &AmqpMessage<Body<Value>>) -> TwinRequest {
    let operation = annotation(message, OPERATION);
    let resource = annotation(message, RESOURCE);
    let op = match (operation.as_deref(), resource.as_deref()) {
        (Some("GET"), _) => TwinOp::Get,
        (Some("PATCH"), Some(REPORTED)) => TwinOp::PatchReported,
        (Some("PUT"), Some(DESIRED_NOTIFICATIONS)) => TwinOp::SubscribeDesired,
        (Some("DELETE"), Some(DESIRED_NOTIFICATIONS)) => TwinOp::UnsubscribeDesired,
        (None, _) => TwinOp::Unknown("no operation annotation".into()),
        (Some(op), resource) => {
            TwinOp::Unknown(format!("operation {op:?} on {resource:?} is not served"))
        }
    };
    let correlation_id = message
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.clone());
    let (op, body) = match (convert::body_bytes(&message.body), &correlation_id) {
        (_, None) => (
            TwinOp::Unknown("a twin request needs a correlation-id".into()),
            Bytes::new(),
        ),
        (Ok(body), Some(_)) => (op, body),
        (Err(e), Some(_)) => (TwinOp::Unknown(e.to_string()), Bytes::new()),
    };
    TwinRequest {
        op,
        correlation_id,
        body,
    }
}

/// What to answer a twin request with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The `status` annotation.
    pub status: u16,
    /// The `version` annotation (a reported patch's new `$version`).
    pub version: Option<u64>,
    /// The body (JSON, or empty).
    pub body: Vec<u8>,
}

/// Answers `identity`'s request `op` (with `body`), which arrived at `arrived`; `watch` is the
/// connection's desired-notification state for the module. The error is one that forbids any
/// answer (this hub is fenced).
pub fn answer(
    twins: &Twins,
    metrics: &HubMetrics,
    identity: &Identity,
    watch: &mut DesiredWatch,
    request: (&TwinOp, &[u8]),
    arrived: Instant,
) -> Result<Answer, TwinError> {
    let (op, body) = request;
    let module = &identity.module;
    let ok = |status, body| Answer {
        status,
        version: None,
        body,
    };
    let reply = match op {
        TwinOp::Get => {
            let r = twins
                .get(module)
                .map(|t| ok(200, t.document().to_string().into_bytes()));
            metrics.twin_get(identity, arrived.elapsed());
            r
        }
        TwinOp::PatchReported => {
            let r = twins.patch_reported(module, body).map(|version| Answer {
                status: 204,
                version: Some(version),
                body: Vec::new(),
            });
            metrics.reported_properties_updated(identity, arrived.elapsed());
            r
        }
        TwinOp::SubscribeDesired => watch.start(twins, identity).map(|()| ok(200, Vec::new())),
        TwinOp::UnsubscribeDesired => {
            watch.stop();
            Ok(ok(200, Vec::new()))
        }
        TwinOp::Unknown(reason) => Ok(refusal(400, reason)),
    };
    match reply {
        Ok(answer) => Ok(answer),
        Err(error) => {
            let Some(status) = error.status() else {
                return Err(error);
            };
            if status >= 500 {
                tracing::error!(%identity, %error, "twin request failed");
            } else {
                tracing::warn!(%identity, %error, status, "twin request refused");
            }
            Ok(refusal(status, &error.to_string()))
        }
    }
}

fn refusal(status: u16, message: &str) -> Answer {
    Answer {
        status,
        version: None,
        body: json!({ "status": status, "message": message })
            .to_string()
            .into_bytes(),
    }
}

/// The answer message: the request's `correlation-id`, `status` (and `version`) annotations,
/// the body as one data section.
pub fn answer_message(correlation_id: Option<MessageId>, answer: &Answer) -> AmqpMessage<Data> {
    let mut annotations = MessageAnnotations::default();
    annotations.0.insert(
        OwnedKey::from(Symbol::from(STATUS)),
        Value::Int(i32::from(answer.status)),
    );
    if let Some(version) = answer.version {
        annotations.0.insert(
            OwnedKey::from(Symbol::from(VERSION)),
            Value::Long(i64::try_from(version).unwrap_or(i64::MAX)),
        );
    }
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(Properties {
            correlation_id,
            ..Properties::default()
        }),
        application_properties: None,
        body: Data(Binary::from(answer.body.clone())),
        footer: None,
    }
}

/// A desired-properties notification: no `correlation-id`, the patch (with `$version`) as body.
pub fn desired_message(patch: &serde_json::Map<String, serde_json::Value>) -> AmqpMessage<Data> {
    let body = serde_json::Value::Object(patch.clone()).to_string();
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: None,
        body: Data(Binary::from(body.into_bytes())),
        footer: None,
    }
}

/// One module's twin state on one connection, shared by its two links.
#[derive(Debug)]
pub struct TwinChannel {
    answers: mpsc::Sender<AmqpMessage<Data>>,
    /// Held by the receiver link while it is attached.
    queue: AsyncMutex<mpsc::Receiver<AmqpMessage<Data>>>,
    desired: Mutex<DesiredWatch>,
}

impl Default for TwinChannel {
    fn default() -> Self {
        let (answers, queue) = mpsc::channel(TWIN_QUEUE);
        TwinChannel {
            answers,
            queue: AsyncMutex::new(queue),
            desired: Mutex::new(DesiredWatch::default()),
        }
    }
}

impl TwinChannel {
    fn watch(&self) -> std::sync::MutexGuard<'_, DesiredWatch> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves the client's twin sender link: answers each request, in order.
pub async fn serve_requests(mut receiver: Receiver, identity: Identity, shared: Arc<ConnShared>) {
    let channel = shared.twin_channel(&identity);
    let mut stop = shared.stop.subscribe();
    let ctx = Arc::clone(&shared.ctx);
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            () = stopped(&mut stop) => break,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(peer = %shared.peer, %identity, error = %e, "twin request link ended");
                return;
            }
        };
        let arrived = Instant::now();
        // The SDK sends pre-settled; an unsettled request is accepted.
        if let Err(e) = receiver.accept(&delivery).await {
            tracing::debug!(peer = %shared.peer, %identity, error = %e, "cannot settle a twin request");
        }
        let request = request_of(delivery.message());
        let answered = answer(
            &ctx.twins,
            &ctx.metrics,
            &identity,
            &mut channel.watch(),
            (&request.op, &request.body),
            arrived,
        );
        let answer = match answered {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(peer = %shared.peer, %identity, %error, "twin request not answered: closing the connection");
                shared.stop(ConnectionEnd::Twin(error.to_string()));
                break;
            }
        };
        tracing::debug!(peer = %shared.peer, %identity, op = ?request.op, status = answer.status, "twin request answered");
        let message = answer_message(request.correlation_id, &answer);
        // Waits while the queue is full: no further request is read meanwhile.
        tokio::select! {
            sent = channel.answers.send(message) => if sent.is_err() { break },
            () = stopped(&mut stop) => break,
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, receiver.close()).await;
}

/// Serves the client's twin receiver link: the answers, in order, and desired-properties
/// notifications while they are on.
pub async fn serve_answers(mut sender: Sender, identity: Identity, shared: Arc<ConnShared>) {
    let channel = shared.twin_channel(&identity);
    let mut stop = shared.stop.subscribe();
    let queue = tokio::select! {
        q = channel.queue.lock() => Some(q),
        e = sender.on_detach() => {
            tracing::debug!(peer = %shared.peer, %identity, error = %e, "twin answer link detached before it got the answers");
            None
        }
        () = stopped(&mut stop) => None,
    };
    if let Some(mut queue) = queue {
        let mut changes = shared.ctx.twins.desired_changes();
        // A change between the subscription and this link's attach is sent at once.
        let mut check_desired = true;
        loop {
            let message = if std::mem::take(&mut check_desired) {
                match desired_notification(&channel, &identity, &shared) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(()) => break,
                }
            } else {
                tokio::select! {
                    e = sender.on_detach() => {
                        tracing::debug!(peer = %shared.peer, %identity, error = %e, "twin answer link detached");
                        break;
                    }
                    m = queue.recv() => match m {
                        // After an answer (a PUT of the desired notifications among them: a
                        // module that was away is sent what it missed), check for a patch due.
                        Some(m) => {
                            check_desired = true;
                            m
                        }
                        None => break,
                    },
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        check_desired = true;
                        continue;
                    }
                    () = stopped(&mut stop) => break,
                }
            };
            let sendable = Sendable::builder().message(message).settled(true).build();
            let sent = tokio::select! {
                s = sender.send(sendable) => s,
                () = stopped(&mut stop) => break,
            };
            if let Err(e) = sent {
                tracing::debug!(peer = %shared.peer, %identity, error = %e, "twin answer link ended");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
}

/// The desired-properties notification due now, if notifications are on and the module's
/// desired properties changed; `Err` when the connection must end (this hub is fenced).
fn desired_notification(
    channel: &TwinChannel,
    identity: &Identity,
    shared: &ConnShared,
) -> Result<Option<AmqpMessage<Data>>, ()> {
    let next = channel.watch().next_patch(&shared.ctx.twins, identity);
    match next {
        Ok(Some((version, patch))) => {
            tracing::debug!(peer = %shared.peer, %identity, version, "desired properties patch sent");
            Ok(Some(desired_message(&patch)))
        }
        Ok(None) => Ok(None),
        Err(error) if error.status().is_none() => {
            shared.stop(ConnectionEnd::Twin(error.to_string()));
            Err(())
        }
        Err(error) => {
            tracing::error!(peer = %shared.peer, %identity, %error, "cannot read the module's twin");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use fe2o3_amqp::types::messaging::AmqpValue;
    use router::{DeviceId, ModuleId};
    use serde_json::Value as Json;
    use std::collections::BTreeMap;

    fn request(op: Option<&str>, resource: Option<&str>, body: &[u8]) -> AmqpMessage<Body<Value>> {
        let mut annotations = MessageAnnotations::default();
        for (k, v) in [(OPERATION, op), (RESOURCE, resource)] {
            if let Some(v) = v {
                annotations
                    .0
                    .insert(OwnedKey::from(Symbol::from(k)), Value::String(v.into()));
            }
        }
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: Some(annotations),
            properties: Some(Properties {
                correlation_id: Some(MessageId::String("c-1".into())),
                ..Properties::default()
            }),
            application_properties: None,
            body: Body::Data(vec![Data(Binary::from(body.to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn requests_are_read_as_the_node_sdk_sends_them() {
        let ops = [
            (request(Some("GET"), None, b" "), TwinOp::Get),
            (
                request(Some("PATCH"), Some(REPORTED), b"{}"),
                TwinOp::PatchReported,
            ),
            (
                request(Some("PUT"), Some(DESIRED_NOTIFICATIONS), b" "),
                TwinOp::SubscribeDesired,
            ),
            (
                request(Some("DELETE"), Some(DESIRED_NOTIFICATIONS), b" "),
                TwinOp::UnsubscribeDesired,
            ),
        ];
        for (message, op) in ops {
            let r = request_of(&message);
            assert_eq!(r.op, op);
            assert_eq!(r.correlation_id, Some(MessageId::String("c-1".into())));
        }
        for message in [
            request(None, None, b""),
            request(Some("PATCH"), Some("/properties/desired"), b"{}"),
            request(Some("PUT"), Some(REPORTED), b"{}"),
        ] {
            assert!(matches!(request_of(&message).op, TwinOp::Unknown(_)));
        }
        // Without a correlation-id nothing is applied (as a twin request without $rid on
        // MQTT): the answer could not be matched anyway.
        let mut anonymous = request(Some("PATCH"), Some(REPORTED), b"{}");
        anonymous.properties = None;
        assert!(matches!(request_of(&anonymous).op, TwinOp::Unknown(_)));
        let mut seq = request(Some("GET"), None, b"");
        seq.body = Body::Sequence(vec![].into());
        assert!(matches!(request_of(&seq).op, TwinOp::Unknown(_)));
        let mut value = request(Some("PATCH"), Some(REPORTED), b"");
        value.body = Body::Value(AmqpValue(Value::String("{\"a\":1}".into())));
        assert_eq!(&request_of(&value).body[..], b"{\"a\":1}");
    }

    fn setup(dir: &std::path::Path) -> (store::Store, Twins, HubMetrics, Identity) {
        let store = store::Store::open(dir.join("store"), store::StoreOptions::default()).unwrap();
        let m = ModuleId::new("m");
        let desired = serde_json::from_value(json!({"rate": 5})).unwrap();
        let twins = Twins::new(
            dir,
            Arc::new(store.clone()),
            BTreeMap::from([(m.clone(), desired)]),
        )
        .unwrap();
        let who = Identity::new(DeviceId::new("d"), m);
        (store, twins, HubMetrics::new("hub", "d"), who)
    }

    fn ask(
        twins: &Twins,
        metrics: &HubMetrics,
        who: &Identity,
        watch: &mut DesiredWatch,
        op: TwinOp,
        body: &[u8],
    ) -> Answer {
        answer(twins, metrics, who, watch, (&op, body), Instant::now()).unwrap()
    }

    /// GET, PATCH (durable, 204 with the version), and refusals that change nothing: a
    /// malformed or oversized patch, an unknown operation.
    #[test]
    fn answers_carry_the_statuses_the_sdk_reads_and_refusals_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, twins, metrics, who) = setup(dir.path());
        let mut watch = DesiredWatch::default();
        let got = ask(&twins, &metrics, &who, &mut watch, TwinOp::Get, b" ");
        assert_eq!(got.status, 200);
        let doc: Json = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(doc["desired"], json!({"rate": 5, "$version": 2}));
        let patched = ask(
            &twins,
            &metrics,
            &who,
            &mut watch,
            TwinOp::PatchReported,
            br#"{"a": 1}"#,
        );
        assert_eq!((patched.status, patched.version), (204, Some(2)));
        assert!(patched.body.is_empty());
        for (body, status) in [
            (b"{not json".to_vec(), 400),
            (b"[1, 2]".to_vec(), 400),
            (
                format!("{{\"big\": \"{}\"}}", "x".repeat(40 * 1024)).into_bytes(),
                413,
            ),
        ] {
            let refused = ask(
                &twins,
                &metrics,
                &who,
                &mut watch,
                TwinOp::PatchReported,
                &body,
            );
            assert_eq!(refused.status, status);
            let why: Json = serde_json::from_slice(&refused.body).unwrap();
            assert_eq!(why["status"], status);
            assert!(why["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let unknown = ask(
            &twins,
            &metrics,
            &who,
            &mut watch,
            TwinOp::Unknown("x".into()),
            b"",
        );
        assert_eq!(unknown.status, 400);
        let twin = twins.get(&who.module).unwrap();
        assert_eq!(Json::Object(twin.reported), json!({"a": 1}));
        assert_eq!(twin.reported_version, 2);
    }

    /// A hub that a newer one fenced answers neither a PATCH nor a GET: the error comes back
    /// (the link then closes the connection) and the live hub's twin keeps its patch.
    #[test]
    fn a_fenced_hub_answers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_old_store, old, metrics, who) = setup(dir.path());
        let mut watch = DesiredWatch::default();
        let first = ask(
            &old,
            &metrics,
            &who,
            &mut watch,
            TwinOp::PatchReported,
            br#"{"a": 1}"#,
        );
        assert_eq!(first.status, 204);
        let (_store, live, _, _) = setup(dir.path());
        assert_eq!(live.patch_reported(&who.module, br#"{"b": 2}"#).unwrap(), 3);
        for (op, body) in [
            (TwinOp::PatchReported, &br#"{"c": 3}"#[..]),
            (TwinOp::Get, &b" "[..]),
        ] {
            let err = answer(
                &old,
                &metrics,
                &who,
                &mut watch,
                (&op, body),
                Instant::now(),
            )
            .unwrap_err();
            assert_eq!(err.status(), None, "{op:?}: {err}");
        }
        let twin = live.get(&who.module).unwrap();
        assert_eq!(Json::Object(twin.reported), json!({"a": 1, "b": 2}));
    }

    /// PUT on the desired notifications starts the watch: a manifest change then gives a patch;
    /// DELETE stops it.
    #[test]
    fn subscribing_to_desired_notifications_gives_the_changes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, twins, metrics, who) = setup(dir.path());
        let mut watch = DesiredWatch::default();
        let on = ask(
            &twins,
            &metrics,
            &who,
            &mut watch,
            TwinOp::SubscribeDesired,
            b" ",
        );
        assert_eq!(on.status, 200);
        assert_eq!(watch.next_patch(&twins, &who).unwrap(), None);
        twins.set_manifest(BTreeMap::from([(
            who.module.clone(),
            serde_json::from_value(json!({"rate": 6})).unwrap(),
        )]));
        let (version, patch) = watch.next_patch(&twins, &who).unwrap().unwrap();
        assert_eq!(version, 3);
        assert_eq!(Json::Object(patch), json!({"rate": 6, "$version": 3}));
        ask(
            &twins,
            &metrics,
            &who,
            &mut watch,
            TwinOp::UnsubscribeDesired,
            b" ",
        );
        twins.set_manifest(BTreeMap::new());
        assert_eq!(watch.next_patch(&twins, &who).unwrap(), None);
    }
}
