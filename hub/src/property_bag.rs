//! IoT Hub's MQTT property bag: `key=value&key2=value2` at the end of a telemetry or input topic
//! (reference §1.4, §1.5), and its mapping to and from [`router::Message`]. A wire format of
//! IoT Hub, shared by the MQTT head and the cloud connection (upstream); it depends on
//! neither.
//!
//! Guarantees:
//! - [`decode`] accepts any text and never panics: keys and values are percent-decoded (`%24`
//!   → `$`; `+` stays `+`; bytes that are not UTF-8 become U+FFFD, as edgeHub's `UrlDecode`
//!   does), empty pairs are skipped, a pair without `=` has an empty value, and for a repeated
//!   key the **last** value wins.
//! - Ingress mapping (edgeHub's `IncomingSystemPropertiesMap`): `$.mid $.cid $.uid $.to $.ct $.ce
//!   $.exp $.ctime $.schema $.ifid $.sub iothub-operation` become [`SystemProperty`]s; `$.on` is
//!   the output name (a non-empty one; it goes into the [`Source`], never into properties);
//!   every other key is an application property, kept verbatim.
//! - The sender's identity is **only** the authenticated one passed to
//!   [`message_from_publish`]: `$.cdid`/`$.cmid` in an incoming bag are dropped, and on delivery
//!   they are written from the message's [`Source`] after every other key. An application
//!   property whose key is one of the hub's wire keys is never written on delivery, so no sender
//!   can forge a system property or a connection id of a receiver's message.
//! - Delivery bag ([`encode_for_delivery`], edgeHub's `OutgoingSystemPropertiesMap`): system
//!   properties `$.mid $.cid $.uid $.to $.ct $.ce $.exp $.schema $.ctime $.sub iothub-operation`
//!   in that order, then application properties in key order, then `$.cdid` and `$.cmid`
//!   (the latter only for a module source). `$.on`, `$.ifid` and the hub-internal properties are
//!   not forwarded; the input name travels only in the topic. Keys and values are encoded like
//!   Python's `quote(s, safe="")` (everything but `A-Z a-z 0-9 - . _ ~`), which both SDKs decode.
//!   Decoding a delivery bag gives back every forwarded property unchanged.
//!
//! Choices where the reference is loose:
//! - `ack` (an ingress system key in edgeHub, meaningful only for C2D) has no
//!   [`SystemProperty`]; it is kept as an application property named `ack`, so it is delivered
//!   under the same wire key, but a route condition sees it as `ack`, not `$ack`.
//! - An empty `$.on` means "no output name".
//! - A message from a leaf device (`module` `None`) is [`Source::Telemetry`]; its `$.on`, if
//!   any, is ignored (devices have no outputs).

use bytes::Bytes;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use router::{DeviceId, Message, ModuleId, OutputName, Source, SystemProperty};

/// Python's `urllib.parse.quote(s, safe="")`: the set both SDKs decode back exactly.
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `$.on`: the output name a module sent on.
pub const OUTPUT_NAME_KEY: &str = "$.on";
/// `$.cdid`: the sender's device id, on delivery.
pub const CONNECTION_DEVICE_ID_KEY: &str = "$.cdid";
/// `$.cmid`: the sender's module id, on delivery.
pub const CONNECTION_MODULE_ID_KEY: &str = "$.cmid";

/// Wire keys of the carried system properties, in delivery order. The `bool` says whether the
/// property is forwarded to module inputs.
const SYSTEM_KEYS: [(&str, SystemProperty, bool); 12] = [
    ("$.mid", SystemProperty::MessageId, true),
    ("$.cid", SystemProperty::CorrelationId, true),
    ("$.uid", SystemProperty::UserId, true),
    ("$.to", SystemProperty::To, true),
    ("$.ct", SystemProperty::ContentType, true),
    ("$.ce", SystemProperty::ContentEncoding, true),
    ("$.exp", SystemProperty::ExpiryTime, true),
    ("$.schema", SystemProperty::MessageSchema, true),
    ("$.ctime", SystemProperty::CreationTime, true),
    ("$.sub", SystemProperty::ComponentName, true),
    ("iothub-operation", SystemProperty::Operation, true),
    ("$.ifid", SystemProperty::InterfaceId, false),
];

/// The system property an ingress wire key stands for.
pub fn system_property_for_key(key: &str) -> Option<SystemProperty> {
    SYSTEM_KEYS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, p, _)| *p)
}

/// Whether `key` is a wire key the hub interprets (so it cannot be an application property
/// on delivery).
pub fn is_reserved_key(key: &str) -> bool {
    system_property_for_key(key).is_some()
        || matches!(
            key,
            OUTPUT_NAME_KEY | CONNECTION_DEVICE_ID_KEY | CONNECTION_MODULE_ID_KEY
        )
}

/// A decoded property bag, before it is attached to a sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodedBag {
    /// Mapped system properties (last value of each wins).
    pub system: Vec<(SystemProperty, String)>,
    /// `$.on`, if present and non-empty.
    pub output: Option<String>,
    /// Everything else except `$.cdid`/`$.cmid`, keys verbatim (last value of each wins).
    pub properties: Vec<(String, String)>,
}

/// Decodes a raw (percent-encoded) bag; see the module doc. Never fails.
pub fn decode(bag: &str) -> DecodedBag {
    let mut out = DecodedBag::default();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = unescape(key);
        let value = unescape(value);
        if let Some(p) = system_property_for_key(&key) {
            upsert(&mut out.system, p, value);
        } else if key == OUTPUT_NAME_KEY {
            out.output = Some(value).filter(|v| !v.is_empty());
        } else if key == CONNECTION_DEVICE_ID_KEY || key == CONNECTION_MODULE_ID_KEY {
            // Only the hub says who sent a message.
        } else {
            upsert(&mut out.properties, key, value);
        }
    }
    out
}

/// Builds the routed message for a PUBLISH on a telemetry topic from the **authenticated**
/// identity (`module` `None` for a leaf device), the topic's raw bag and the payload.
pub fn message_from_publish(
    device: &DeviceId,
    module: Option<&ModuleId>,
    bag: &str,
    payload: Bytes,
) -> Message {
    let decoded = decode(bag);
    let source = match module {
        Some(m) => Source::ModuleOutput {
            device: device.clone(),
            module: m.clone(),
            output: decoded.output.map(OutputName::new),
        },
        None => Source::Telemetry {
            device: device.clone(),
        },
    };
    let mut message = Message::new(source, payload);
    for (p, v) in decoded.system {
        message = message.with_system_property(p, v);
    }
    for (k, v) in decoded.properties {
        message = message.with_property(k, v);
    }
    message
}

/// Encodes the bag of an input message; see the module doc for keys and order. Never empty:
/// `$.cdid` is always present.
pub fn encode_for_delivery(message: &Message) -> String {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (key, p, forwarded) in SYSTEM_KEYS {
        if let (true, Some(v)) = (forwarded, message.system_property(p)) {
            pairs.push((key, v));
        }
    }
    for (k, v) in message.properties() {
        if !is_reserved_key(k) {
            pairs.push((k, v));
        }
    }
    let source = message.source();
    pairs.push((CONNECTION_DEVICE_ID_KEY, source.device().as_str()));
    if let Some(m) = source.module() {
        pairs.push((CONNECTION_MODULE_ID_KEY, m.as_str()));
    }
    join_pairs(pairs)
}

/// Encodes the bag of a message sent upstream to IoT Hub (edgeHub's
/// `DeviceClientMessageConverter`, reference §5): the system properties IoT Hub takes from a
/// device (`$.mid $.cid $.uid $.to $.ct $.ce $.ctime $.schema $.sub $.ifid`), then application
/// properties in key order. The output name, the expiry and the connection ids are not sent:
/// IoT Hub stamps the connection ids from the authenticated connection itself. May be empty.
pub fn encode_for_upstream(message: &Message) -> String {
    const UPSTREAM: [SystemProperty; 10] = [
        SystemProperty::MessageId,
        SystemProperty::CorrelationId,
        SystemProperty::UserId,
        SystemProperty::To,
        SystemProperty::ContentType,
        SystemProperty::ContentEncoding,
        SystemProperty::CreationTime,
        SystemProperty::MessageSchema,
        SystemProperty::ComponentName,
        SystemProperty::InterfaceId,
    ];
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (key, p, _) in SYSTEM_KEYS {
        if let (true, Some(v)) = (UPSTREAM.contains(&p), message.system_property(p)) {
            pairs.push((key, v));
        }
    }
    for (k, v) in message.properties() {
        if !is_reserved_key(k) {
            pairs.push((k, v));
        }
    }
    join_pairs(pairs)
}

/// `k=v&k2=v2`, every key and value encoded like `quote(s, safe="")`.
fn join_pairs(pairs: Vec<(&str, &str)>) -> String {
    let mut bag = String::new();
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            bag.push('&');
        }
        bag.extend(utf8_percent_encode(k, QUOTE_ALL));
        bag.push('=');
        bag.extend(utf8_percent_encode(v, QUOTE_ALL));
    }
    bag
}

fn unescape(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn upsert<K: PartialEq>(pairs: &mut Vec<(K, String)>, key: K, value: String) {
    match pairs.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => pairs.push((key, value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module_message() -> Message {
        Message::new(
            Source::ModuleOutput {
                device: DeviceId::new("edgedev"),
                module: ModuleId::new("modA"),
                output: Some(OutputName::new("out1")),
            },
            "x",
        )
    }

    #[test]
    fn dollar_keys_decode_whether_encoded_or_not() {
        let b = decode("%24.mid=1&$.cid=2");
        assert_eq!(
            b.system,
            vec![
                (SystemProperty::MessageId, "1".to_owned()),
                (SystemProperty::CorrelationId, "2".to_owned())
            ]
        );
    }

    #[test]
    fn last_value_of_a_repeated_key_wins() {
        let b = decode("a=1&%24.mid=x&a=2&$.mid=y&$.on=o1&$.on=o2");
        assert_eq!(b.properties, vec![("a".to_owned(), "2".to_owned())]);
        assert_eq!(b.system, vec![(SystemProperty::MessageId, "y".to_owned())]);
        assert_eq!(b.output.as_deref(), Some("o2"));
    }

    #[test]
    fn empty_pairs_are_skipped_and_bare_keys_have_empty_values() {
        let b = decode("&&flag&&a=&=v");
        assert_eq!(
            b.properties,
            vec![
                ("flag".to_owned(), String::new()),
                ("a".to_owned(), String::new()),
                (String::new(), "v".to_owned())
            ]
        );
    }

    #[test]
    fn plus_is_kept_and_bad_utf8_is_replaced() {
        let b = decode("a=x+y&b=%FF");
        assert_eq!(b.properties[0].1, "x+y");
        assert_eq!(b.properties[1].1, "\u{FFFD}");
    }

    #[test]
    fn connection_ids_in_an_incoming_bag_are_dropped() {
        let m = message_from_publish(
            &DeviceId::new("edgedev"),
            Some(&ModuleId::new("modA")),
            "%24.cdid=evil&%24.cmid=evil&a=1",
            Bytes::new(),
        );
        assert_eq!(m.properties().len(), 1);
        assert_eq!(
            m.system_property_by_name("connectionModuleId"),
            Some("modA")
        );
    }

    #[test]
    fn empty_output_name_means_none() {
        assert_eq!(decode("$.on=").output, None);
    }

    #[test]
    fn leaf_device_messages_ignore_output_names() {
        let m = message_from_publish(&DeviceId::new("leaf"), None, "$.on=o", Bytes::new());
        assert_eq!(
            m.source(),
            &Source::Telemetry {
                device: DeviceId::new("leaf")
            }
        );
    }

    #[test]
    fn delivery_puts_system_then_application_then_connection_ids() {
        let m = module_message()
            .with_property("seq", "0")
            .with_property("run", "capture-py")
            .with_system_property(SystemProperty::ContentEncoding, "utf-8")
            .with_system_property(SystemProperty::MessageId, "capture-py-0")
            .with_system_property(SystemProperty::ContentType, "application/json");
        assert_eq!(
            encode_for_delivery(&m),
            "%24.mid=capture-py-0&%24.ct=application%2Fjson&%24.ce=utf-8&run=capture-py&seq=0&%24.cdid=edgedev&%24.cmid=modA"
        );
    }

    #[test]
    fn delivery_does_not_forward_interface_id_or_internal_properties() {
        let m = module_message()
            .with_system_property(SystemProperty::InterfaceId, "i")
            .with_system_property(SystemProperty::InputName, "in")
            .with_system_property(SystemProperty::EdgeHubOriginInterface, "internal");
        assert_eq!(encode_for_delivery(&m), "%24.cdid=edgedev&%24.cmid=modA");
    }

    #[test]
    fn application_properties_cannot_forge_wire_keys() {
        let m = module_message()
            .with_property("$.cdid", "evil")
            .with_property("$.cmid", "evil")
            .with_property("$.mid", "evil")
            .with_property("$.on", "evil");
        assert_eq!(encode_for_delivery(&m), "%24.cdid=edgedev&%24.cmid=modA");
    }

    #[test]
    fn leaf_device_source_delivers_only_cdid() {
        let m = Message::new(
            Source::Telemetry {
                device: DeviceId::new("leaf"),
            },
            "x",
        );
        assert_eq!(encode_for_delivery(&m), "%24.cdid=leaf");
    }

    #[test]
    fn upstream_bag_keeps_what_iot_hub_takes_and_drops_the_rest() {
        let m = module_message()
            .with_system_property(SystemProperty::MessageId, "m 1")
            .with_system_property(SystemProperty::ContentType, "application/json")
            .with_system_property(SystemProperty::ExpiryTime, "2030-01-01")
            .with_system_property(SystemProperty::InterfaceId, "urn:x")
            .with_system_property(SystemProperty::Operation, "op")
            .with_property("temp", "21")
            .with_property("$.cdid", "forged");
        let bag = encode_for_upstream(&m);
        assert_eq!(
            bag,
            "%24.mid=m%201&%24.ct=application%2Fjson&%24.ifid=urn%3Ax&temp=21"
        );
        let back = decode(&bag);
        assert_eq!(back.output, None, "the output name is not sent upstream");
        assert_eq!(back.properties, vec![("temp".to_owned(), "21".to_owned())]);
    }

    #[test]
    fn upstream_bag_of_a_bare_message_is_empty() {
        assert_eq!(encode_for_upstream(&module_message()), "");
    }
}
