//! A module's direct-method link pair on `/devices/{d}/modules/{m}/methods/deviceBound`
//! (reference §2; what the Node SDK's `AmqpDeviceMethodClient` opens): the client's receiver
//! link takes the requests, its sender link carries the responses. The requests and their
//! waiting are [`crate::methods`]'s, as for the MQTT head.
//!
//! Guarantees:
//! - Both links name the connection's own authenticated module (`auth_state` refuses any
//!   other).
//! - While the client's receiver link is attached (and the connection is the module's live
//!   one) the connection is the module's method target (`Methods::attach`, as an MQTT
//!   subscription to `$iothub/methods/POST/#`); a second such link takes the requests from
//!   then on. When the latest one ends, the connection no longer is the target, and every
//!   request handed to it and not answered ends at once (404, as on MQTT); an older one
//!   ending changes nothing (requests it had queued and not sent are lost: 504 when their
//!   time is up).
//! - A request goes out as a message with the method's name in the application property
//!   `IoThub-methodname`, the request id as `correlation-id` (a string) and the payload as one
//!   data section, only with the client's credit, settled when the client lets us (methods
//!   are at most once). Requests wait in the connection's bounded queue
//!   ([`crate::methods::invoke::METHOD_QUEUE`]).
//! - A response (`correlation-id` = the request id, status in the application property
//!   `IoThub-status`, payload in the body) completes only a request handed to this very
//!   connection of this module; anything else is logged and dropped.

use std::sync::Arc;

use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message as AmqpMessage, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Value};
use fe2o3_amqp::{Receiver, Sender};

use crate::amqp::connection::{stopped, ConnShared, CLOSE_TIMEOUT};
use crate::amqp::convert;
use crate::identity::Identity;
use crate::methods::{self, MethodCall, MethodResponse, Relayed};

/// The application property that names the method of a request.
pub const METHOD_NAME: &str = "IoThub-methodname";
/// The application property that carries a response's status.
pub const STATUS: &str = "IoThub-status";
/// The `max-message-size` of the response link: a payload of at most 128 KiB and its
/// properties.
pub const MAX_METHOD_MESSAGE_BYTES: u64 = 160 * 1024;

/// The request message for `call`.
pub fn request_message(call: &MethodCall) -> AmqpMessage<Data> {
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    app.insert(
        METHOD_NAME.into(),
        SimpleValue::String(call.name.as_str().to_owned()),
    );
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: Some(MessageId::String(call.rid.to_string())),
            ..Properties::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: Data(Binary::from(call.payload.to_vec())),
        footer: None,
    }
}

/// The request id and the response a message on the response link carries; `None` without a
/// `correlation-id`, a status or a body the hub can carry.
pub fn response_of(message: &AmqpMessage<Body<Value>>) -> Option<(String, MethodResponse)> {
    let rid = convert::id_text(message.properties.as_ref()?.correlation_id.as_ref()?);
    let status = match message.application_properties.as_ref()?.0.get(STATUS)? {
        SimpleValue::Int(n) => *n,
        SimpleValue::Long(n) => i32::try_from(*n).ok()?,
        SimpleValue::Uint(n) => i32::try_from(*n).ok()?,
        SimpleValue::Ulong(n) => i32::try_from(*n).ok()?,
        SimpleValue::Short(n) => i32::from(*n),
        SimpleValue::Ushort(n) => i32::from(*n),
        SimpleValue::Byte(n) => i32::from(*n),
        SimpleValue::Ubyte(n) => i32::from(*n),
        SimpleValue::Double(n) if n.fract() == 0.0 => format!("{n}").parse().ok()?,
        SimpleValue::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let payload = convert::body_bytes(&message.body).ok()?;
    Some((rid, MethodResponse { status, payload }))
}

/// Serves the client's method receiver link: the connection is the module's method target
/// while it lasts.
pub async fn serve_requests(mut sender: Sender, identity: Identity, shared: Arc<ConnShared>) {
    let ctx = Arc::clone(&shared.ctx);
    let (tx, mut rx) = methods::method_channel();
    // Numbered before it becomes the target, so an older link ending meanwhile leaves it be.
    let link = shared.method_link_attached(&identity);
    let conn = shared.conn_id(&identity);
    // Only the module's live connection: a replaced one never takes its successor's place.
    let attached = conn
        .filter(|_| shared.is_current(&identity))
        .is_some_and(|conn| ctx.methods.attach(&identity, conn, tx));
    if attached {
        send_requests(&mut sender, &mut rx, &identity, &shared).await;
    } else {
        tracing::warn!(peer = %shared.peer, %identity, "method link not made the module's target: the connection is not its live one");
    }
    // A newer method link of the module on this connection is its target now: only the
    // latest one to end takes the connection off.
    if let (true, Some(conn)) = (shared.method_link_ended(&identity, link), conn) {
        ctx.methods.detach(&identity, conn);
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
}

/// Sends the requests handed to this connection until the link or the connection ends.
async fn send_requests(
    sender: &mut Sender,
    rx: &mut methods::MethodRx,
    identity: &Identity,
    shared: &ConnShared,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        let call = tokio::select! {
            e = sender.on_detach() => {
                tracing::debug!(peer = %shared.peer, %identity, error = %e, "method request link detached");
                break;
            }
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = stopped(&mut stop) => break,
        };
        let sendable = Sendable::builder()
            .message(request_message(&call))
            .settled(true)
            .build();
        let sent = tokio::select! {
            s = sender.send(sendable) => s,
            () = stopped(&mut stop) => break,
        };
        match sent {
            Ok(_) => {
                tracing::debug!(peer = %shared.peer, %identity, rid = %call.rid, "method request sent")
            }
            Err(e) => {
                tracing::debug!(peer = %shared.peer, %identity, error = %e, "method request link ended");
                break;
            }
        }
    }
}

/// Serves the client's method sender link: relays each response to its request.
pub async fn serve_responses(mut receiver: Receiver, identity: Identity, shared: Arc<ConnShared>) {
    let mut stop = shared.stop.subscribe();
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d,
            () = stopped(&mut stop) => break,
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(peer = %shared.peer, %identity, error = %e, "method response link ended");
                return;
            }
        };
        if let Err(e) = receiver.accept(&delivery).await {
            tracing::debug!(peer = %shared.peer, %identity, error = %e, "cannot settle a method response");
        }
        let Some((rid, response)) = response_of(delivery.message()) else {
            tracing::warn!(peer = %shared.peer, %identity, "method response without a correlation-id, an IoThub-status or a usable body ignored");
            continue;
        };
        let status = response.status;
        let relayed = match shared.conn_id(&identity) {
            Some(conn) => shared.ctx.methods.relay(&identity, conn, &rid, response),
            None => Relayed::Unknown,
        };
        match relayed {
            Relayed::Completed => {
                tracing::debug!(peer = %shared.peer, %identity, rid, status, "method response relayed")
            }
            other => {
                tracing::warn!(peer = %shared.peer, %identity, rid, status, outcome = ?other, "method response ignored: no request with that id is pending on this connection")
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, receiver.close()).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use bytes::Bytes;
    use router::{DeviceId, ModuleId};

    fn response(
        correlation: Option<MessageId>,
        status: Option<SimpleValue>,
    ) -> AmqpMessage<Body<Value>> {
        let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
        if let Some(s) = status {
            app.insert(STATUS.into(), s);
        }
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                correlation_id: correlation,
                ..Properties::default()
            }),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(b"{\"ok\":1}".to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn responses_are_read_as_the_node_sdk_sends_them() {
        for status in [
            SimpleValue::Int(201),
            SimpleValue::Long(201),
            SimpleValue::Double(201.0.into()),
            SimpleValue::String("201".into()),
        ] {
            let (rid, r) =
                response_of(&response(Some(MessageId::String("7".into())), Some(status))).unwrap();
            assert_eq!(rid, "7");
            assert_eq!(r.status, 201);
            assert_eq!(r.payload, Bytes::from_static(b"{\"ok\":1}"));
        }
        assert!(response_of(&response(None, Some(SimpleValue::Int(200)))).is_none());
        assert!(response_of(&response(Some(MessageId::String("7".into())), None)).is_none());
    }

    /// A response on this module's link completes its own request; the id of a request handed
    /// to another module completes nothing.
    #[tokio::test]
    async fn a_response_completes_only_its_own_request() {
        let methods = crate::methods::Methods::default();
        let a = Identity::new(DeviceId::new("d"), ModuleId::new("a"));
        let b = Identity::new(DeviceId::new("d"), ModuleId::new("b"));
        let (tx, mut rx) = crate::methods::method_channel();
        assert!(methods.attach(&b, 2, tx));
        let req =
            crate::methods::MethodRequest::parse(br#"{"methodName":"go","payload":1}"#).unwrap();
        let invoking = methods.invoke(&b, &req);
        tokio::pin!(invoking);
        let call = tokio::select! {
            _ = &mut invoking => panic!("answered without a response"),
            call = rx.recv() => call.unwrap(),
        };
        let message = request_message(&call);
        let app = message.application_properties.as_ref().unwrap();
        assert_eq!(
            app.0.get(METHOD_NAME),
            Some(&SimpleValue::String("go".into()))
        );
        let rid = convert::id_text(
            message
                .properties
                .as_ref()
                .unwrap()
                .correlation_id
                .as_ref()
                .unwrap(),
        );
        assert_eq!(rid, call.rid.to_string());
        let (got, r) = response_of(&response(
            Some(MessageId::String(rid.clone())),
            Some(SimpleValue::Int(200)),
        ))
        .unwrap();
        assert_eq!(methods.relay(&a, 1, &got, r.clone()), Relayed::NotYours);
        assert_eq!(methods.relay(&b, 2, &got, r), Relayed::Completed);
        let answered = invoking.await.unwrap();
        assert_eq!(answered.status, 200);
    }
}
