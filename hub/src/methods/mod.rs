//! Direct methods, module → module, served locally (issue 16): a module calls a method of
//! another module of this device over HTTPS, as the SDKs do with `GatewayHostName`, and the
//! target receives it on its MQTT connection.
//!
//! ```text
//!  caller ──HTTPS POST /twins/{d}/modules/{m}/methods──▶ https (SAS token of a module of this
//!     device, x-ms-edge-moduleId the same module; else 401) ─▶ request (parse, limits; 400/413)
//!     ─▶ Methods::invoke
//!           target attached? ─no─▶ wait ≤ connectTimeoutInSeconds for it ─still no─▶ 404
//!             │ yes: PendingTable::begin (≤ 32 per target, ≤ 256 in all; else 429)
//!             ▼
//!           Pending(rid) ── handed to the target connection's queue ─▶ MQTT PUBLISH
//!             │               $iothub/methods/POST/{name}/?$rid={rid} (QoS 0)
//!             ├─ $iothub/methods/res/{status}/?$rid={rid} from that very connection ─▶ 200
//!             │     {"status": status, "payload": the module's JSON}
//!             ├─ responseTimeoutInSeconds (5–300, default 30) passes ─▶ 504
//!             ├─ the target's connection closes or unsubscribes ─▶ 404
//!             └─ the caller goes away ─▶ forgotten
//!  every end removes the entry: a late or foreign response completes nothing (logged)
//! ```
//!
//! - [`request`]: the HTTPS body, checked (pure).
//! - [`pending`]: requests in flight by `$rid`, bounded, matched to the target connection
//!   (pure).
//! - [`invoke`]: [`Methods`], the targets and the waiting, shared by the heads and the HTTPS
//!   endpoint.
//! - [`crate::https`]: the HTTPS endpoint on `--methods-addr` (a head: it uses this module,
//!   never the other way).
//!
//! Guarantees: a response is taken only from the connection the request was handed to (never
//! across modules or connections); memory is bounded (requests in flight, each connection's
//! queue, the request body); methods are not durable (as in IoT Hub, a request is at most once
//! and lost with the hub).

pub mod invoke;
pub mod pending;
pub mod request;

pub use invoke::{
    method_channel, InvokeError, MethodCall, MethodResponse, MethodRx, MethodTx, Methods, Relayed,
};
pub use request::{MethodName, MethodRequest, RequestError};

/// The filter a module subscribes to for its direct methods.
pub const METHODS_FILTER: &str = "$iothub/methods/POST/#";

/// The topic a request is published on: `$iothub/methods/POST/{name}/?$rid={rid}`.
pub fn request_topic(call: &MethodCall) -> String {
    format!("$iothub/methods/POST/{}/?$rid={}", call.name, call.rid)
}

/// The status and `$rid` of a response topic, `$iothub/methods/res/{status}/?$rid={rid}[&…]`;
/// `None` if it is not one.
pub fn parse_response_topic(topic: &str) -> Option<(i32, &str)> {
    let rest = topic.strip_prefix("$iothub/methods/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let rid = query.split('&').find_map(|p| p.strip_prefix("$rid="))?;
    Some((status, rid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics_give_status_and_rid() {
        assert_eq!(
            parse_response_topic("$iothub/methods/res/200/?$rid=17"),
            Some((200, "17"))
        );
        assert_eq!(
            parse_response_topic("$iothub/methods/res/-3/?a=b&$rid=x"),
            Some((-3, "x"))
        );
        for t in [
            "$iothub/methods/res/200/",
            "$iothub/methods/res/ok/?$rid=1",
            "$iothub/methods/res/200/?rid=1",
            "$iothub/twin/res/200/?$rid=1",
        ] {
            assert_eq!(parse_response_topic(t), None, "{t}");
        }
    }

    #[test]
    fn request_topics_carry_name_and_rid() {
        let (tx, mut rx) = method_channel();
        let methods = Methods::default();
        let who =
            crate::identity::Identity::new(router::DeviceId::new("d"), router::ModuleId::new("m"));
        assert!(methods.attach(&who, 1, tx));
        let req = MethodRequest::parse(br#"{"methodName":"reboot"}"#).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let invoking = methods.invoke(&who, &req);
            tokio::pin!(invoking);
            tokio::select! {
                _ = &mut invoking => panic!("answered without a response"),
                call = rx.recv() => {
                    let call = call.unwrap();
                    assert_eq!(request_topic(&call), format!("$iothub/methods/POST/reboot/?$rid={}", call.rid));
                }
            }
        });
    }
}
