//! Topics IoT Hub accepts from a device or module, and the URL-encoded property bag.
//!
//! Guarantees:
//! - A telemetry topic is `devices/{d}/modules/{m}/messages/events` (module) or
//!   `devices/{d}/messages/events` (device), then either nothing, `/`, or `/` and a property bag.
//!   [`parse_events`] returns the ids as written in the topic; the caller compares them with the
//!   authenticated identity.
//! - A bag is `k=v&k2=v2…`; keys and values are percent-decoded (`+` stays `+`), a key without
//!   `=` has the empty value, empty segments are skipped, a later duplicate key wins. Bytes that
//!   do not decode to UTF-8 make the bag invalid.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;

/// The ids named by a telemetry topic, and its decoded property bag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsTopic {
    /// `{d}` of the topic.
    pub device: String,
    /// `{m}` of the topic, for a module topic.
    pub module: Option<String>,
    /// The decoded property bag (empty when there is none).
    pub properties: BTreeMap<String, String>,
}

/// Why a publish topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a telemetry topic.
    #[error("`{0}` is not a telemetry topic")]
    NotEvents(String),
    /// The property bag does not decode.
    #[error("property bag does not decode to UTF-8")]
    BadBag,
}

/// Parses a telemetry topic (see the module doc).
pub fn parse_events(topic: &str) -> Result<EventsTopic, TopicError> {
    let not_events = || TopicError::NotEvents(topic.to_owned());
    let rest = topic.strip_prefix("devices/").ok_or_else(not_events)?;
    let (device, rest) = rest.split_once('/').ok_or_else(not_events)?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(r) => {
            let (m, r) = r.split_once('/').ok_or_else(not_events)?;
            (Some(m), r)
        }
        None => (None, rest),
    };
    let rest = rest
        .strip_prefix("messages/events")
        .ok_or_else(not_events)?;
    let bag = match rest {
        "" => "",
        r => r.strip_prefix('/').ok_or_else(not_events)?,
    };
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return Err(not_events());
    }
    Ok(EventsTopic {
        device: device.to_owned(),
        module: module.map(str::to_owned),
        properties: decode_bag(bag)?,
    })
}

/// Decodes a property bag (see the module doc).
pub fn decode_bag(bag: &str) -> Result<BTreeMap<String, String>, TopicError> {
    let mut out = BTreeMap::new();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(decode(k)?, decode(v)?);
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, TopicError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TopicError::BadBag)
}

/// Whether IoT Hub would grant a subscription of `device` to `filter`: its own cloud-to-device
/// topic, or the twin and method topics.
pub fn subscription_allowed(device: &str, filter: &str) -> bool {
    filter == format!("devices/{device}/messages/devicebound/#")
        || filter.starts_with("$iothub/twin/")
        || filter.starts_with("$iothub/methods/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bag(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn module_topic_with_and_without_slash_and_bag() {
        for t in [
            "devices/d/modules/m/messages/events",
            "devices/d/modules/m/messages/events/",
        ] {
            let e = parse_events(t).expect("parses");
            assert_eq!((e.device.as_str(), e.module.as_deref()), ("d", Some("m")));
            assert!(e.properties.is_empty());
        }
        let e = parse_events(
            "devices/d/modules/m/messages/events/%24.mid=42&%24.ct=application%2Fjson&temp=21.5&flag&&a%20b=c+d",
        )
        .expect("parses");
        assert_eq!(
            e.properties,
            bag(&[
                ("$.mid", "42"),
                ("$.ct", "application/json"),
                ("temp", "21.5"),
                ("flag", ""),
                ("a b", "c+d"),
            ])
        );
    }

    #[test]
    fn device_topic_parses() {
        let e = parse_events("devices/leaf/messages/events/%24.cid=x").expect("parses");
        assert_eq!((e.device.as_str(), e.module), ("leaf", None));
        assert_eq!(e.properties, bag(&[("$.cid", "x")]));
    }

    #[test]
    fn other_topics_are_refused() {
        for t in [
            "",
            "devices/d/modules/m/messages/event",
            "devices/d/modules/m/messages/eventsX",
            "devices/d/modules/m/inputs/x",
            "devices//messages/events",
            "devices/d/modules//messages/events",
            "$iothub/twin/GET/?$rid=1",
            "devices/d",
        ] {
            assert!(
                matches!(parse_events(t), Err(TopicError::NotEvents(_))),
                "{t:?} accepted"
            );
        }
        assert_eq!(
            parse_events("devices/d/messages/events/k=%FF"),
            Err(TopicError::BadBag)
        );
    }

    #[test]
    fn subscriptions() {
        assert!(subscription_allowed(
            "d",
            "devices/d/messages/devicebound/#"
        ));
        assert!(subscription_allowed("d", "$iothub/twin/res/#"));
        assert!(subscription_allowed("d", "$iothub/methods/POST/#"));
        assert!(!subscription_allowed(
            "d",
            "devices/e/messages/devicebound/#"
        ));
        assert!(!subscription_allowed("d", "#"));
        assert!(!subscription_allowed("d", "devices/d/modules/m/inputs/#"));
    }
}
