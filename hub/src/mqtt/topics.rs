//! MQTT topic names and filters of the IoT Hub MQTT surface (reference §1.4–1.8).
//!
//! Guarantees:
//! - [`parse_publish`] recognises every telemetry topic shape edgeHub's inbound templates accept
//!   — module `devices/{d}/modules/{m}/messages/events`, leaf `devices/{d}/messages/events`,
//!   each with or without a trailing `/`, with or without a property bag, and with Node's extra
//!   `/` after the bag — and returns the identity written in the topic **unverified**: the
//!   caller must compare it with the authenticated identity ([`EventsTopic::is_from`]) before
//!   routing. It never panics and never allocates for telemetry.
//! - [`input_topic`] always puts a `/` after the input name, even for an empty bag, because the
//!   Node SDK only dispatches topics matching `^devices/.*/modules/.*/inputs/.*/.*$`. It refuses
//!   ids that would make an invalid or ambiguous topic name (empty, or containing `/`, `+`, `#`
//!   or NUL). Ids are written raw, as edgeHub and the Python SDK do (Python `unquote`s the input
//!   name; Node does not, so names with `%` are not portable — an id rule of IoT Hub, not ours).
//! - [`authorize_subscribe`] grants a client only its own namespace; see [`SubscribeDecision`].
//!
//! Choices where the reference leaves room:
//! - **Input subscriptions**: exactly `devices/{d}/modules/{m}/inputs/#` (what both SDKs send)
//!   and `devices/{d}/modules/{m}/#` (what edgeHub's doc suggests) mean "all my inputs". edgeHub
//!   treats *any* filter matching `^devices/.+/modules/.+/#$` that way (e.g. `…/inputs/in1/#`),
//!   which would deliver topics outside the filter; we refuse such filters instead.
//! - **Twin subscriptions** (`$iothub/twin/res/#`, `$iothub/twin/PATCH/properties/desired/#`)
//!   are granted exactly as the SDKs write them; they carry no identity, so what is published
//!   on them is always the connection's own module's twin (`crate::mqtt::twin`). Any other
//!   `$iothub/…` filter (`$iothub/#`, `$iothub/twin/#`, `$iothub/twin/res/+`) is refused.
//! - **Direct methods**: `$iothub/methods/POST/#` is granted (decision
//!   `Unsupported(Methods)`, a name kept for now): the connection then takes the requests made
//!   to *its own* module (`crate::methods`), and only those; a response
//!   (`$iothub/methods/res/…`) completes only a request handed to that connection.
//! - A leaf device's C2D filter `devices/{d}/messages/devicebound/#` is *accepted but
//!   unsupported*: granted, so an SDK that subscribes when a handler is set keeps working, but
//!   nothing is ever published on it yet.
//! - Anything else, including another identity's topics, is refused (SUBACK `0x80`; the SDKs
//!   never do this, and paho accepts the refusal quietly).
//! - A publish topic that matches nothing is [`TopicError::Unrecognised`]; edgeHub drops such a
//!   message and still sends PUBACK (reference §1.4): that policy is the caller's.

use router::{DeviceId, InputName, Message, ModuleId};
use rumqttc::QoS;

use crate::property_bag;

/// Why a topic could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A PUBLISH topic that matches no template the hub knows.
    #[error("topic {0:?} matches no known template")]
    Unrecognised(String),
    /// An id that cannot be written into a topic level (empty, or containing `/`, `+`, `#`, NUL).
    #[error("{0:?} cannot be a topic level")]
    BadLevel(String),
}

/// A PUBLISH topic from a client, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundTopic<'a> {
    /// Telemetry or a module output.
    Events(EventsTopic<'a>),
    /// A twin request (`$iothub/twin/GET/…`, `$iothub/twin/PATCH/properties/reported/…`).
    TwinRequest {
        /// GET or PATCH.
        op: TwinOp,
        /// The request id (`$rid`), if the topic carries one.
        rid: Option<&'a str>,
    },
    /// A direct-method response (`$iothub/methods/res/{status}/?$rid=…`), relayed by the
    /// connection to the request it answers (`crate::methods`).
    MethodResponse {
        /// The request id (`$rid`), if the topic carries one.
        rid: Option<&'a str>,
    },
}

/// What a twin request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TwinOp {
    /// `$iothub/twin/GET/?$rid=…`: the whole twin.
    Get,
    /// `$iothub/twin/PATCH/properties/reported/?$rid=…`: a reported-properties patch.
    PatchReported,
}

/// A telemetry topic: `devices/{device}[/modules/{module}]/messages/events[/{bag}]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventsTopic<'a> {
    /// The device id written in the topic (unverified).
    pub device: &'a str,
    /// The module id written in the topic (unverified), `None` for a leaf device.
    pub module: Option<&'a str>,
    /// The raw property bag (still percent-encoded), without a trailing `/`; may be empty.
    pub bag: &'a str,
}

impl EventsTopic<'_> {
    /// Whether the topic names exactly the given (authenticated) identity.
    pub fn is_from(&self, device: &str, module: Option<&str>) -> bool {
        self.device == device && self.module == module
    }
}

/// Classifies a PUBLISH topic name; see the module doc.
pub fn parse_publish(topic: &str) -> Result<InboundTopic<'_>, TopicError> {
    if let Some(events) = parse_events(topic) {
        return Ok(InboundTopic::Events(events));
    }
    if topic.starts_with("$iothub/twin/GET/") {
        return Ok(InboundTopic::TwinRequest {
            op: TwinOp::Get,
            rid: rid(topic),
        });
    }
    if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
        return Ok(InboundTopic::TwinRequest {
            op: TwinOp::PatchReported,
            rid: rid(topic),
        });
    }
    if topic.starts_with("$iothub/methods/res/") {
        return Ok(InboundTopic::MethodResponse { rid: rid(topic) });
    }
    Err(TopicError::Unrecognised(topic.to_owned()))
}

fn parse_events(topic: &str) -> Option<EventsTopic<'_>> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(r) => {
            let (m, r) = r.split_once('/')?;
            (Some(m), r)
        }
        None => (None, rest),
    };
    let rest = rest.strip_prefix("messages/events")?;
    let bag = match rest {
        "" => "",
        r => r.strip_prefix('/')?,
    };
    // Node ends the topic with `/` after a non-empty bag.
    let bag = bag.strip_suffix('/').unwrap_or(bag);
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return None;
    }
    Some(EventsTopic {
        device,
        module,
        bag,
    })
}

/// The `$rid` of a `…/?$rid=…[&…]` topic.
fn rid(topic: &str) -> Option<&str> {
    let (_, query) = topic.rsplit_once("/?")?;
    query.split('&').find_map(|pair| pair.strip_prefix("$rid="))
}

/// The topic of an input message: `devices/{d}/modules/{m}/inputs/{input}/{bag}`. `bag` must
/// already be encoded (see [`property_bag::encode_for_delivery`]); it may be empty, the `/` stays.
pub fn input_topic(
    device: &str,
    module: &str,
    input: &str,
    bag: &str,
) -> Result<String, TopicError> {
    for level in [device, module, input] {
        check_level(level)?;
    }
    Ok(format!(
        "devices/{device}/modules/{module}/inputs/{input}/{bag}"
    ))
}

/// The full PUBLISH topic delivering `message` to `input` of module `device/module`:
/// `devices/{d}/modules/{m}/inputs/{input}/{bag}`.
pub fn delivery_topic_and_bag(
    device: &DeviceId,
    module: &ModuleId,
    input: &InputName,
    message: &Message,
) -> Result<String, TopicError> {
    input_topic(
        device.as_str(),
        module.as_str(),
        input.as_str(),
        &property_bag::encode_for_delivery(message),
    )
}

/// The topic of a twin response: `$iothub/twin/res/{status}/?$rid={rid}`.
pub fn twin_response_topic(status: u16, rid: &str) -> String {
    format!("$iothub/twin/res/{status}/?$rid={rid}")
}

/// The topic of a reported-properties patch's answer:
/// `$iothub/twin/res/{status}/?$rid={rid}&$version={version}`.
pub fn twin_response_topic_with_version(status: u16, rid: &str, version: u64) -> String {
    format!("$iothub/twin/res/{status}/?$rid={rid}&$version={version}")
}

/// The topic of a desired-properties patch: `$iothub/twin/PATCH/properties/desired/?$version={v}`.
pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// The filter a client subscribes for twin responses.
pub const TWIN_RESPONSES_FILTER: &str = "$iothub/twin/res/#";
/// The filter a client subscribes for desired-properties patches.
pub const TWIN_DESIRED_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";

fn check_level(level: &str) -> Result<(), TopicError> {
    if level.is_empty() || level.contains(['/', '+', '#', '\0']) {
        return Err(TopicError::BadLevel(level.to_owned()));
    }
    Ok(())
}

/// A feature whose topics are accepted but not served yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsupportedFeature {
    /// Direct-method requests (served: the connection becomes its module's method target).
    Methods,
    /// Cloud-to-device messages of a leaf device.
    CloudToDevice,
}

/// What to do with one SUBSCRIBE filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// The client's own inputs: deliver input messages (and persist the subscription).
    ModuleInputs,
    /// Responses to the client's own twin requests.
    TwinResponses,
    /// Desired-properties patches of the client's own twin.
    TwinDesiredPatches,
    /// The client's own twin/method/C2D topics: grant, publish nothing (yet).
    Unsupported(UnsupportedFeature),
    /// Not the client's to subscribe: SUBACK failure (`0x80`).
    Refused,
}

impl SubscribeDecision {
    /// The QoS to grant in SUBACK (at most 1: QoS 2 is not supported), or `None` for the
    /// failure code `0x80`.
    pub fn granted_qos(self, requested: QoS) -> Option<QoS> {
        match self {
            SubscribeDecision::Refused => None,
            _ => Some(match requested {
                QoS::AtMostOnce => QoS::AtMostOnce,
                QoS::AtLeastOnce | QoS::ExactlyOnce => QoS::AtLeastOnce,
            }),
        }
    }
}

/// Decides a SUBSCRIBE filter for an authenticated client (`module` is `None` for a device).
pub fn authorize_subscribe(filter: &str, device: &str, module: Option<&str>) -> SubscribeDecision {
    match filter {
        TWIN_RESPONSES_FILTER => return SubscribeDecision::TwinResponses,
        TWIN_DESIRED_FILTER => return SubscribeDecision::TwinDesiredPatches,
        "$iothub/methods/POST/#" => {
            return SubscribeDecision::Unsupported(UnsupportedFeature::Methods)
        }
        _ => {}
    }
    let Some(rest) = filter
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(device))
        .and_then(|r| r.strip_prefix('/'))
    else {
        return SubscribeDecision::Refused;
    };
    match module {
        Some(m) => match rest
            .strip_prefix("modules/")
            .and_then(|r| r.strip_prefix(m))
        {
            Some("/inputs/#" | "/#") => SubscribeDecision::ModuleInputs,
            _ => SubscribeDecision::Refused,
        },
        None if rest == "messages/devicebound/#" => {
            SubscribeDecision::Unsupported(UnsupportedFeature::CloudToDevice)
        }
        None => SubscribeDecision::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use router::{OutputName, Source};

    fn events(topic: &str) -> EventsTopic<'_> {
        match parse_publish(topic) {
            Ok(InboundTopic::Events(e)) => e,
            other => panic!("{topic}: {other:?}"),
        }
    }

    #[test]
    fn module_events_with_and_without_slash_and_bag() {
        for (topic, bag) in [
            ("devices/d/modules/m/messages/events", ""),
            ("devices/d/modules/m/messages/events/", ""),
            ("devices/d/modules/m/messages/events/a=1", "a=1"),
            ("devices/d/modules/m/messages/events/a=1/", "a=1"),
        ] {
            let e = events(topic);
            assert!(e.is_from("d", Some("m")), "{topic}");
            assert_eq!(e.bag, bag, "{topic}");
        }
    }

    #[test]
    fn leaf_events_carry_no_module() {
        let e = events("devices/leaf/messages/events/%24.mid=1");
        assert!(e.is_from("leaf", None));
        assert!(!e.is_from("leaf", Some("m")));
        assert_eq!(e.bag, "%24.mid=1");
    }

    #[test]
    fn near_misses_are_unrecognised() {
        for t in [
            "devices/d/modules/m/messages/eventsX",
            "devices/d/modules/m/messages",
            "devices//messages/events",
            "devices/d/modules//messages/events",
            "devices/d/modules/m/inputs/x/",
            "device/d/messages/events",
            "devices/d",
            "",
            "$iothub/twin/PATCH/properties/desired/",
        ] {
            assert!(
                matches!(parse_publish(t), Err(TopicError::Unrecognised(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn a_module_named_modules_is_still_a_module() {
        let e = events("devices/d/modules/modules/messages/events");
        assert!(e.is_from("d", Some("modules")));
    }

    #[test]
    fn twin_and_method_publishes_carry_their_rid() {
        assert_eq!(
            parse_publish("$iothub/twin/GET/?$rid=42"),
            Ok(InboundTopic::TwinRequest {
                op: TwinOp::Get,
                rid: Some("42")
            })
        );
        assert_eq!(
            parse_publish("$iothub/twin/PATCH/properties/reported/?$rid=7&$version=3"),
            Ok(InboundTopic::TwinRequest {
                op: TwinOp::PatchReported,
                rid: Some("7")
            })
        );
        assert_eq!(
            parse_publish("$iothub/twin/GET/"),
            Ok(InboundTopic::TwinRequest {
                op: TwinOp::Get,
                rid: None
            })
        );
        assert_eq!(
            twin_response_topic_with_version(204, "7", 3),
            "$iothub/twin/res/204/?$rid=7&$version=3"
        );
        assert_eq!(
            desired_patch_topic(9),
            "$iothub/twin/PATCH/properties/desired/?$version=9"
        );
        assert_eq!(
            parse_publish("$iothub/methods/res/200/?$rid=ab"),
            Ok(InboundTopic::MethodResponse { rid: Some("ab") })
        );
        assert_eq!(
            twin_response_topic(501, "42"),
            "$iothub/twin/res/501/?$rid=42"
        );
    }

    #[test]
    fn input_topic_always_has_a_segment_after_the_input() {
        assert_eq!(
            input_topic("d", "m", "in1", "").unwrap(),
            "devices/d/modules/m/inputs/in1/"
        );
        assert_eq!(
            input_topic("d", "m", "in1", "%24.cdid=d").unwrap(),
            "devices/d/modules/m/inputs/in1/%24.cdid=d"
        );
    }

    #[test]
    fn input_topic_refuses_levels_that_break_the_topic() {
        for bad in ["", "a/b", "a+", "#", "a\0"] {
            assert_eq!(
                input_topic("d", "m", bad, ""),
                Err(TopicError::BadLevel(bad.to_owned()))
            );
            assert!(input_topic(bad, "m", "i", "").is_err());
            assert!(input_topic("d", bad, "i", "").is_err());
        }
    }

    #[test]
    fn a_module_may_subscribe_to_its_own_inputs_only() {
        let own = |f| authorize_subscribe(f, "d", Some("m"));
        assert_eq!(
            own("devices/d/modules/m/inputs/#"),
            SubscribeDecision::ModuleInputs
        );
        assert_eq!(
            own("devices/d/modules/m/#"),
            SubscribeDecision::ModuleInputs
        );
        for f in [
            "devices/d/modules/other/inputs/#",
            "devices/other/modules/m/inputs/#",
            "devices/d/modules/m/inputs/in1/#",
            "devices/d/modules/m/inputs/+",
            "devices/d/modules/mm/inputs/#",
            "devices/dd/modules/m/inputs/#",
            "devices/d/modules/m/messages/events/#",
            "devices/d/messages/devicebound/#",
            "devices/+/modules/+/inputs/#",
            "#",
            "+/#",
            "$iothub/#",
            "$iothub/twin/res/+",
        ] {
            assert_eq!(own(f), SubscribeDecision::Refused, "{f}");
        }
    }

    #[test]
    fn twin_filters_are_served_and_method_filters_accepted_but_unsupported() {
        let own = |f| authorize_subscribe(f, "d", Some("m"));
        assert_eq!(own("$iothub/twin/res/#"), SubscribeDecision::TwinResponses);
        assert_eq!(
            own("$iothub/twin/PATCH/properties/desired/#"),
            SubscribeDecision::TwinDesiredPatches
        );
        for other in [
            "$iothub/twin/#",
            "$iothub/twin/PATCH/#",
            "$iothub/+/res/#",
            "$iothub/twin/PATCH/properties/desired/+",
            "devices/d/modules/other/twin/#",
        ] {
            assert_eq!(own(other), SubscribeDecision::Refused, "{other}");
        }
        assert_eq!(
            own("$iothub/methods/POST/#"),
            SubscribeDecision::Unsupported(UnsupportedFeature::Methods)
        );
    }

    #[test]
    fn a_leaf_device_may_subscribe_to_its_c2d_only() {
        assert_eq!(
            authorize_subscribe("devices/leaf/messages/devicebound/#", "leaf", None),
            SubscribeDecision::Unsupported(UnsupportedFeature::CloudToDevice)
        );
        assert_eq!(
            authorize_subscribe("devices/other/messages/devicebound/#", "leaf", None),
            SubscribeDecision::Refused
        );
        assert_eq!(
            authorize_subscribe("devices/leaf/modules/m/inputs/#", "leaf", None),
            SubscribeDecision::Refused
        );
    }

    #[test]
    fn granted_qos_is_capped_at_one() {
        let d = SubscribeDecision::ModuleInputs;
        assert_eq!(d.granted_qos(QoS::ExactlyOnce), Some(QoS::AtLeastOnce));
        assert_eq!(d.granted_qos(QoS::AtLeastOnce), Some(QoS::AtLeastOnce));
        assert_eq!(d.granted_qos(QoS::AtMostOnce), Some(QoS::AtMostOnce));
        assert_eq!(
            SubscribeDecision::Refused.granted_qos(QoS::AtLeastOnce),
            None
        );
    }

    #[test]
    fn delivery_topic_has_the_input_and_the_bag() {
        let t = delivery_topic_and_bag(
            &DeviceId::new("edgedev"),
            &ModuleId::new("modB"),
            &InputName::new("in1"),
            &Message::new(
                Source::ModuleOutput {
                    device: DeviceId::new("edgedev"),
                    module: ModuleId::new("modA"),
                    output: Some(OutputName::new("out1")),
                },
                "x",
            ),
        )
        .unwrap();
        assert_eq!(
            t,
            "devices/edgedev/modules/modB/inputs/in1/%24.cdid=edgedev&%24.cmid=modA"
        );
    }
}
