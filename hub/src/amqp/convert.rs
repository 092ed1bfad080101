//! AMQP 1.0 message ↔ [`router::Message`] (reference §2 "Message mapping", edgeHub's
//! `AmqpMessageConverter`).
//!
//! Guarantees:
//! - Ingress ([`message_from_amqp`]): AMQP properties `message-id`, `correlation-id`, `user-id`,
//!   `to`, `content-type`, `content-encoding`, `absolute-expiry-time` become the matching
//!   [`SystemProperty`]s (ids of any AMQP type as text: a uuid in its hyphenated form, a binary
//!   as lossy UTF-8, a ulong in decimal; the expiry as RFC 3339 UTC text). Application properties
//!   `iothub-message-schema`, `iothub-creation-time-utc`, `iothub-operation`, `dt-subject`,
//!   `dt-dataschema` are system properties; **`iothub-outputname`** is the output name (in the
//!   [`Source`], never a property); `iothub-connection-device-id`/`-module-id` and every
//!   `x-opt-` key are dropped; every other application property is kept, its value as text.
//!   The sender is **only** the authenticated identity passed in; annotations never name it.
//! - The body is the concatenation of the message's data sections, an AMQP value that is binary
//!   or a string, or empty; other bodies are refused ([`ConvertError`]).
//! - Batches ([`split_batch`]): a transfer with message format [`BATCH_FORMAT`] carries one
//!   encoded AMQP message per data section; each becomes one routed message, in order.
//! - Egress ([`amqp_from_message`]): the carried system properties go back to the AMQP
//!   properties and the `iothub-*` application properties above; user properties follow (a key
//!   the hub interprets on ingress is never written from a user property, so no sender forges
//!   one); message annotations `x-opt-input-name`, `iothub-connection-device-id`,
//!   `iothub-connection-module-id` (module sources only), `x-opt-lock-token`,
//!   `iothub-enqueuedtime`, `x-opt-sequence-number` (the store offset) and
//!   `iothub-deliverycount`; the body is one data section.

use bytes::Bytes;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message as AmqpMessage, MessageAnnotations, MessageId,
    Properties,
};
use fe2o3_amqp::types::primitives::{
    Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use router::{DeviceId, InputName, Message, ModuleId, OutputName, Source, SystemProperty};
use serde_amqp::read::SliceReader;

/// `AmqpBatchedMessageFormat` (Microsoft's batch: each data section is an encoded message).
pub const BATCH_FORMAT: u32 = 0x8001_3700;
/// Largest transfer accepted on an events link, batched or not (edgeHub: 600 KB): the link's
/// `max-message-size`; a larger one is refused by fe2o3 while it arrives (the link is detached
/// with `amqp:link:message-size-exceeded`), so it is never buffered whole.
pub const MAX_BATCH_BYTES: usize = 600 * 1024;
/// Largest routed message, counted as the router stores it ([`stored_size`]: body, properties
/// and ids as text): a full-size body (256 KiB, as over MQTT) and 64 KiB of properties, the MQTT
/// head's packet bound. Far below the store's 1 MiB, which a message refused here never reaches
/// (the text form of an AMQP property can be larger than its encoding: a binary id becomes lossy
/// UTF-8, up to three times its size).
pub const MAX_STORED_MESSAGE_BYTES: usize = crate::head::MAX_MESSAGE_BYTES + 64 * 1024;

/// Application property carrying the output name.
pub const OUTPUT_NAME: &str = "iothub-outputname";
/// Annotation carrying the input name on delivery.
pub const INPUT_NAME: &str = "x-opt-input-name";
/// Annotation: the sender's device id, on delivery.
pub const CONNECTION_DEVICE_ID: &str = "iothub-connection-device-id";
/// Annotation: the sender's module id, on delivery.
pub const CONNECTION_MODULE_ID: &str = "iothub-connection-module-id";
/// Annotation: the delivery's lock token.
pub const LOCK_TOKEN: &str = "x-opt-lock-token";
/// Annotation: when the hub enqueued the delivery.
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";
/// Annotation: the message's sequence number (its store offset).
pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
/// Annotation: how many times the message was delivered before without success.
pub const DELIVERY_COUNT: &str = "iothub-deliverycount";

/// Application properties that are system properties.
const SYSTEM_APP_PROPERTIES: [(&str, SystemProperty); 5] = [
    ("iothub-message-schema", SystemProperty::MessageSchema),
    ("iothub-creation-time-utc", SystemProperty::CreationTime),
    ("iothub-operation", SystemProperty::Operation),
    ("dt-subject", SystemProperty::ComponentName),
    ("dt-dataschema", SystemProperty::InterfaceId),
];

/// A message that cannot be routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    /// The body is an AMQP value or sequence the hub cannot carry as bytes.
    #[error("unsupported body: {0}")]
    Body(&'static str),
    /// A batch's section is not an AMQP message.
    #[error("malformed batch: {0}")]
    Batch(String),
}

/// Whether an application property key is one the hub interprets on ingress.
fn is_reserved_key(key: &str) -> bool {
    key == OUTPUT_NAME
        || key == CONNECTION_DEVICE_ID
        || key == CONNECTION_MODULE_ID
        || key.starts_with("x-opt-")
        || SYSTEM_APP_PROPERTIES.iter().any(|(k, _)| *k == key)
}

/// The routed message for an AMQP message sent by the authenticated module `device/module`:
/// its body, then what its application properties and its properties carry.
pub fn message_from_amqp(
    device: &DeviceId,
    module: &ModuleId,
    amqp: &AmqpMessage<Body<Value>>,
) -> Result<Message, ConvertError> {
    let body = body_bytes(&amqp.body)?;
    let app = amqp
        .application_properties
        .as_ref()
        .map(sort_app_properties)
        .unwrap_or_default();
    let mut system = app.system;
    if let Some(p) = &amqp.properties {
        system.extend(system_from_properties(p));
    }
    let source = Source::ModuleOutput {
        device: device.clone(),
        module: module.clone(),
        output: app.output.map(OutputName::new),
    };
    let mut message = Message::new(source, body);
    for (p, v) in system {
        message = message.with_system_property(p, v);
    }
    for (k, v) in app.properties {
        message = message.with_property(k, v);
    }
    Ok(message)
}

/// The text application properties of an ingress message, sorted by what they mean.
#[derive(Debug, Default, PartialEq, Eq)]
struct AppProperties {
    /// `iothub-outputname`, unless empty.
    output: Option<String>,
    /// Those that are system properties, in the message's order.
    system: Vec<(SystemProperty, String)>,
    /// The module's own (reserved keys left out), in the message's order.
    properties: Vec<(String, String)>,
}

/// Sorts the application properties; values that are not simple text are left out.
fn sort_app_properties(app: &ApplicationProperties) -> AppProperties {
    let mut sorted = AppProperties::default();
    for (key, value) in app.0.iter() {
        let Some(text) = simple_text(value) else {
            continue;
        };
        if key == OUTPUT_NAME {
            sorted.output = Some(text).filter(|t| !t.is_empty());
        } else if let Some((_, p)) = SYSTEM_APP_PROPERTIES.iter().find(|(k, _)| k == key) {
            sorted.system.push((*p, text));
        } else if !is_reserved_key(key) {
            sorted.properties.push((key.clone(), text));
        }
    }
    sorted
}

/// The system properties an AMQP message's properties section carries, in a fixed order.
fn system_from_properties(p: &Properties) -> Vec<(SystemProperty, String)> {
    let pairs = [
        (
            SystemProperty::MessageId,
            p.message_id.as_ref().map(id_text),
        ),
        (
            SystemProperty::CorrelationId,
            p.correlation_id.as_ref().map(id_text),
        ),
        (
            SystemProperty::UserId,
            p.user_id
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        ),
        (SystemProperty::To, p.to.clone()),
        (
            SystemProperty::ContentType,
            p.content_type.as_ref().map(|s| s.0.clone()),
        ),
        (
            SystemProperty::ContentEncoding,
            p.content_encoding.as_ref().map(|s| s.0.clone()),
        ),
        (
            SystemProperty::ExpiryTime,
            p.absolute_expiry_time
                .as_ref()
                .map(|t| rfc3339_utc(t.milliseconds())),
        ),
    ];
    pairs
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect()
}

/// The messages of a batched transfer (message format [`BATCH_FORMAT`]): one per data section,
/// each section an encoded AMQP message.
pub fn split_batch(
    batch: &AmqpMessage<Body<Value>>,
) -> Result<Vec<AmqpMessage<Body<Value>>>, ConvertError> {
    let Body::Data(sections) = &batch.body else {
        return Err(ConvertError::Batch("the body is not data sections".into()));
    };
    let mut out = Vec::with_capacity(sections.len());
    for Data(bytes) in sections.iter() {
        // serde_amqp allocates what a value declares: check the lengths first.
        crate::amqp::frame_guard::check_message(bytes)
            .map_err(|e| ConvertError::Batch(e.to_string()))?;
        let message =
            <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(SliceReader::new(bytes))
                .map_err(|e| ConvertError::Batch(e.to_string()))?;
        out.push(message);
    }
    Ok(out)
}

/// How one delivery of a message is stamped (annotations that are not the message's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryStamp {
    /// `x-opt-lock-token`.
    pub lock_token: [u8; 16],
    /// `iothub-enqueuedtime`, milliseconds since the epoch.
    pub enqueued_ms: i64,
    /// `x-opt-sequence-number`: the store offset.
    pub sequence: u64,
    /// `iothub-deliverycount`: earlier unsuccessful deliveries.
    pub delivery_count: u32,
}

/// The AMQP message delivering `message` on `input`, stamped with `stamp`.
pub fn amqp_from_message(
    message: &Message,
    input: &InputName,
    stamp: DeliveryStamp,
) -> AmqpMessage<Data> {
    let sys = |p: SystemProperty| message.system_property(p).map(str::to_owned);
    let properties = Properties {
        message_id: sys(SystemProperty::MessageId).map(MessageId::String),
        user_id: sys(SystemProperty::UserId).map(|u| Binary::from(u.into_bytes())),
        to: sys(SystemProperty::To),
        correlation_id: sys(SystemProperty::CorrelationId).map(MessageId::String),
        content_type: sys(SystemProperty::ContentType).map(Symbol::from),
        content_encoding: sys(SystemProperty::ContentEncoding).map(Symbol::from),
        ..Properties::default()
    };
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    for (key, p) in SYSTEM_APP_PROPERTIES {
        if p == SystemProperty::InterfaceId {
            continue; // edgeHub does not forward the interface id to modules
        }
        if let Some(v) = sys(p) {
            app.insert(key.to_owned(), SimpleValue::String(v));
        }
    }
    for (k, v) in message.properties() {
        if !is_reserved_key(k) && !k.starts_with("$.") {
            app.insert(k.clone(), SimpleValue::String(v.clone()));
        }
    }
    let mut annotations = MessageAnnotations::default();
    let mut annotate = |key: &str, value: Value| {
        annotations
            .0
            .insert(OwnedKey::from(Symbol::from(key)), value);
    };
    annotate(INPUT_NAME, Value::String(input.as_str().to_owned()));
    annotate(
        CONNECTION_DEVICE_ID,
        Value::String(message.source().device().as_str().to_owned()),
    );
    if let Some(m) = message.source().module() {
        annotate(CONNECTION_MODULE_ID, Value::String(m.as_str().to_owned()));
    }
    annotate(LOCK_TOKEN, Value::Uuid(Uuid::from(stamp.lock_token)));
    annotate(
        ENQUEUED_TIME,
        Value::Timestamp(Timestamp::from_milliseconds(stamp.enqueued_ms)),
    );
    annotate(
        SEQUENCE_NUMBER,
        Value::Long(i64::try_from(stamp.sequence).unwrap_or(i64::MAX)),
    );
    annotate(DELIVERY_COUNT, Value::Uint(stamp.delivery_count));
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(properties),
        application_properties: Some(ApplicationProperties(app)),
        body: Data(Binary::from(message.body().to_vec())),
        footer: None,
    }
}

/// The size of `m` as the router stores it, without the per-target envelope entries: its body,
/// every property and system property key and value, and the source's names, each with a length
/// prefix of up to 4 bytes.
pub fn stored_size(m: &Message) -> usize {
    const PREFIX: usize = 4;
    let source = m.source();
    let names = source.device().as_str().len()
        + source.module().map_or(0, |n| n.as_str().len())
        + source.output().map_or(0, |n| n.as_str().len())
        + 3 * PREFIX;
    let properties: usize = m
        .properties()
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2 * PREFIX)
        .sum();
    let system: usize = m
        .system_properties()
        .values()
        .map(|v| 1 + v.len() + PREFIX)
        .sum();
    m.body().len() + PREFIX + names + properties + system
}

pub(crate) fn body_bytes(body: &Body<Value>) -> Result<Bytes, ConvertError> {
    match body {
        Body::Data(sections) => {
            if sections.len() == 1 {
                return Ok(sections
                    .iter()
                    .next()
                    .map(|Data(b)| Bytes::copy_from_slice(b))
                    .unwrap_or_default());
            }
            let mut all = Vec::new();
            for Data(b) in sections.iter() {
                all.extend_from_slice(b);
            }
            Ok(Bytes::from(all))
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => Ok(Bytes::copy_from_slice(b)),
            Value::String(s) => Ok(Bytes::from(s.clone().into_bytes())),
            Value::Null => Ok(Bytes::new()),
            _ => Err(ConvertError::Body(
                "an AMQP value that is not binary or a string",
            )),
        },
        Body::Sequence(_) => Err(ConvertError::Body("an AMQP sequence")),
        Body::Empty => Ok(Bytes::new()),
    }
}

/// A message or correlation id as text.
pub(crate) fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid_text(u.as_inner()),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// `8-4-4-4-12` lower-case hex.
pub fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// An application property's value as text (`None` for null, binary and described values).
fn simple_text(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => rfc3339_utc(t.milliseconds()),
        SimpleValue::Uuid(u) => uuid_text(u.as_inner()),
        _ => return None,
    })
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the Unix epoch (proleptic Gregorian).
pub fn rfc3339_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use fe2o3_amqp::types::messaging::message::__private::Serializable;
    use fe2o3_amqp::types::messaging::AmqpValue;

    #[test]
    fn application_properties_sort_into_output_system_and_the_modules_own() {
        let mut map = OrderedMap::new();
        let text = |t: &str| SimpleValue::String(t.into());
        map.insert("k1".to_owned(), text("v1"));
        map.insert("iothub-operation".to_owned(), text("op"));
        map.insert(CONNECTION_DEVICE_ID.to_owned(), text("forged"));
        map.insert("x-opt-anything".to_owned(), text("dropped"));
        map.insert(
            "bin".to_owned(),
            SimpleValue::Binary(Binary::from(vec![1u8])),
        );
        map.insert("dt-subject".to_owned(), SimpleValue::Int(3));
        map.insert("k2".to_owned(), SimpleValue::Bool(true));
        map.insert(OUTPUT_NAME.to_owned(), text(""));
        let sorted = sort_app_properties(&ApplicationProperties(map));
        assert_eq!(
            sorted,
            AppProperties {
                output: None,
                system: vec![
                    (SystemProperty::Operation, "op".to_owned()),
                    (SystemProperty::ComponentName, "3".to_owned()),
                ],
                properties: vec![
                    ("k1".to_owned(), "v1".to_owned()),
                    ("k2".to_owned(), "true".to_owned()),
                ],
            }
        );
        let mut map = OrderedMap::new();
        map.insert(OUTPUT_NAME.to_owned(), text("out1"));
        let sorted = sort_app_properties(&ApplicationProperties(map));
        assert_eq!(sorted.output.as_deref(), Some("out1"));
    }

    #[test]
    fn properties_give_only_the_system_properties_they_set() {
        let p = Properties {
            correlation_id: Some(MessageId::String("c1".into())),
            content_type: Some(Symbol::from("application/json")),
            ..Properties::default()
        };
        assert_eq!(
            system_from_properties(&p),
            vec![
                (SystemProperty::CorrelationId, "c1".to_owned()),
                (SystemProperty::ContentType, "application/json".to_owned()),
            ]
        );
        assert!(system_from_properties(&Properties::default()).is_empty());
    }

    fn sender_message() -> AmqpMessage<Body<Value>> {
        let mut app = OrderedMap::new();
        app.insert(OUTPUT_NAME.to_owned(), SimpleValue::String("out1".into()));
        app.insert("seq".to_owned(), SimpleValue::String("7".into()));
        app.insert("n".to_owned(), SimpleValue::Int(-3));
        app.insert(
            CONNECTION_MODULE_ID.to_owned(),
            SimpleValue::String("forged".into()),
        );
        app.insert(
            "iothub-message-schema".to_owned(),
            SimpleValue::String("s1".into()),
        );
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::Uuid(Uuid::from([0xab; 16]))),
                correlation_id: Some(MessageId::Ulong(42)),
                to: Some("/devices/d/modules/a/messages/events".into()),
                content_type: Some(Symbol::from("application/json")),
                content_encoding: Some(Symbol::from("utf-8")),
                absolute_expiry_time: Some(Timestamp::from_milliseconds(1_700_000_000_123)),
                ..Properties::default()
            }),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(b"{\"a\":1}".to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn the_stored_size_counts_properties_as_the_text_they_become() {
        let mut message = sender_message();
        // 120 KiB of 0xff as a binary message id: 360 KiB of U+FFFD once it is text.
        message.properties = Some(Properties {
            message_id: Some(MessageId::Binary(Binary::from(vec![0xff; 120 * 1024]))),
            ..Properties::default()
        });
        let m = message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &message).unwrap();
        assert!(m.body().len() < 100);
        assert!(stored_size(&m) >= 360 * 1024, "{}", stored_size(&m));
        assert!(stored_size(&m) > MAX_STORED_MESSAGE_BYTES);
        let small =
            message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &sender_message()).unwrap();
        let encoded = router::codec::encode(&router::codec::Envelope {
            enqueued_at: store::UnixMillis(0),
            expiry_overrides: Vec::new(),
            message: small.clone(),
        })
        .unwrap();
        // The envelope adds a fixed header (version, enqueue time, counts) to what is counted.
        assert!(
            encoded.len() <= stored_size(&small) + 64,
            "{} vs {}",
            stored_size(&small),
            encoded.len()
        );
    }

    #[test]
    fn ingress_maps_properties_output_and_the_authenticated_sender() {
        let m =
            message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &sender_message()).unwrap();
        assert_eq!(m.source().output().map(|o| o.as_str()), Some("out1"));
        assert_eq!(m.source().module().map(|o| o.as_str()), Some("a"));
        assert_eq!(
            m.system_property(SystemProperty::MessageId),
            Some("abababab-abab-abab-abab-abababababab")
        );
        assert_eq!(m.system_property(SystemProperty::CorrelationId), Some("42"));
        assert_eq!(
            m.system_property(SystemProperty::ContentType),
            Some("application/json")
        );
        assert_eq!(
            m.system_property(SystemProperty::ExpiryTime),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(m.system_property(SystemProperty::MessageSchema), Some("s1"));
        assert_eq!(m.property("seq"), Some("7"));
        assert_eq!(m.property("n"), Some("-3"));
        assert_eq!(m.property(CONNECTION_MODULE_ID), None);
        assert_eq!(m.property(OUTPUT_NAME), None);
        assert_eq!(&m.body()[..], b"{\"a\":1}");
    }

    #[test]
    fn bodies_other_than_bytes_or_text_are_refused() {
        let mut msg = sender_message();
        msg.body = Body::Value(AmqpValue(Value::String("text".into())));
        let m = message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &msg).unwrap();
        assert_eq!(&m.body()[..], b"text");
        msg.body = Body::Value(AmqpValue(Value::Int(1)));
        assert!(message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &msg).is_err());
        msg.body = Body::Empty;
        let m = message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &msg).unwrap();
        assert!(m.body().is_empty());
    }

    #[test]
    fn egress_carries_annotations_properties_and_body() {
        let m = message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), &sender_message())
            .unwrap()
            .with_property("$.cdid", "forged");
        let stamp = DeliveryStamp {
            lock_token: [1; 16],
            enqueued_ms: 5,
            sequence: 42,
            delivery_count: 2,
        };
        let out = amqp_from_message(&m, &InputName::new("input1"), stamp);
        let ann = out.message_annotations.as_ref().unwrap();
        let get = |k: &str| ann.0.get(&OwnedKey::from(Symbol::from(k))).cloned();
        assert_eq!(get(INPUT_NAME), Some(Value::String("input1".into())));
        assert_eq!(get(CONNECTION_DEVICE_ID), Some(Value::String("d".into())));
        assert_eq!(get(CONNECTION_MODULE_ID), Some(Value::String("a".into())));
        assert_eq!(get(LOCK_TOKEN), Some(Value::Uuid(Uuid::from([1; 16]))));
        assert_eq!(get(SEQUENCE_NUMBER), Some(Value::Long(42)));
        assert_eq!(get(DELIVERY_COUNT), Some(Value::Uint(2)));
        let props = out.properties.as_ref().unwrap();
        assert_eq!(
            props.message_id,
            Some(MessageId::String(
                "abababab-abab-abab-abab-abababababab".into()
            ))
        );
        assert_eq!(props.content_encoding, Some(Symbol::from("utf-8")));
        let app = &out.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("seq"), Some(&SimpleValue::String("7".into())));
        assert_eq!(
            app.get("iothub-message-schema"),
            Some(&SimpleValue::String("s1".into()))
        );
        assert_eq!(app.get("$.cdid"), None);
        assert_eq!(app.get(OUTPUT_NAME), None);
        assert_eq!(&out.body.0[..], b"{\"a\":1}");
    }

    #[test]
    fn a_batch_splits_into_its_messages_in_order() {
        let mut sections = Vec::new();
        for i in 0..3 {
            let mut m = sender_message();
            m.body = Body::Data(vec![Data(Binary::from(vec![i]))].into());
            let bytes = serde_amqp::to_vec(&Serializable(m)).unwrap();
            sections.push(Data(Binary::from(bytes)));
        }
        let mut batch = sender_message();
        batch.body = Body::Data(sections.into());
        let parts = split_batch(&batch).unwrap();
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            let m = message_from_amqp(&DeviceId::new("d"), &ModuleId::new("a"), p).unwrap();
            assert_eq!(&m.body()[..], &[i as u8]);
            assert_eq!(m.source().output().map(|o| o.as_str()), Some("out1"));
        }
        batch.body = Body::Data(vec![Data(Binary::from(vec![1, 2, 3]))].into());
        assert!(split_batch(&batch).is_err());
    }

    #[test]
    fn a_batched_message_declaring_more_than_it_holds_is_refused_before_decoding() {
        // Application properties whose one key (a str32) declares 4 GiB but holds 4 bytes:
        // decoding it allocated the declared 4 GiB (found by the amqp_frames fuzz target).
        let mut section = vec![0x00, 0x53, 0x74, 0xc1, 0, 2, 0xb1, 0xff, 0xff, 0xff, 0xf0];
        section.extend_from_slice(b"key!");
        section.push(0x40);
        section[4] = (section.len() - 5) as u8;
        let mut batch = sender_message();
        batch.body = Body::Data(vec![Data(Binary::from(section))].into());
        let err = split_batch(&batch).unwrap_err().to_string();
        assert!(err.contains("runs past the end"), "{err}");
    }

    #[test]
    fn timestamps_print_as_rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59.999Z");
    }
}
