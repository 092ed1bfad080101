//! What a message is: its body, application properties, system properties and source.
//!
//! Guarantees:
//! - A [`Message`] is immutable once built; the builder methods consume and return it.
//! - The sender's identity (`connectionDeviceId`, `connectionModuleId`) and the output name are
//!   never stored as free-form system properties: they are read from the message's [`Source`],
//!   so a condition on `$connectionDeviceId` always agrees with where the message entered.
//! - Application property keys are kept verbatim (case-sensitive) and iterate in key order.
//!
//! This module does no I/O and knows nothing of MQTT topics or AMQP annotations: protocol heads
//! map their wire keys (`$.mid`, `iothub-outputname`, …) onto [`SystemProperty`].

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id as received; no validation is done here.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_newtype!(
    /// An IoT Hub device id (the edge device itself, or a leaf device behind it).
    DeviceId
);
id_newtype!(
    /// A module id on the edge device.
    ModuleId
);
id_newtype!(
    /// The name of a module output (`$.on` on MQTT, `iothub-outputname` on AMQP).
    OutputName
);
id_newtype!(
    /// The name of a module input, the last part of `BrokeredEndpoint("/modules/m/inputs/i")`.
    InputName
);

/// Where a message entered the hub.
///
/// Each variant has a source path ([`Source::path`]) that `FROM` patterns are matched against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Telemetry from a leaf device (`devices/{d}/messages/events`). Path `/messages`.
    Telemetry {
        /// The sending device.
        device: DeviceId,
    },
    /// A message sent by a module. Path `/messages/modules/{m}/outputs/{o}`, or
    /// `/messages/modules/{m}` when the module gave no output name.
    ModuleOutput {
        /// The device the module runs on.
        device: DeviceId,
        /// The sending module.
        module: ModuleId,
        /// The output the module sent on, if any.
        output: Option<OutputName>,
    },
    /// A reported-properties update of a device or module twin. Path `/twinChangeNotifications`.
    TwinChange {
        /// The device whose twin changed.
        device: DeviceId,
        /// The module whose twin changed, if it is a module twin.
        module: Option<ModuleId>,
    },
}

impl Source {
    /// The source path that `FROM` patterns match against (edgeHub's message source paths).
    pub fn path(&self) -> String {
        let mut out = String::new();
        self.write_path(&mut out);
        out
    }

    /// Appends [`Source::path`] to `out` (no formatting machinery: routing builds it for every
    /// message).
    pub fn write_path(&self, out: &mut String) {
        match self {
            Source::Telemetry { .. } => out.push_str("/messages"),
            Source::ModuleOutput { module, output, .. } => {
                out.push_str("/messages/modules/");
                out.push_str(module.as_str());
                if let Some(o) = output {
                    out.push_str("/outputs/");
                    out.push_str(o.as_str());
                }
            }
            Source::TwinChange { .. } => out.push_str("/twinChangeNotifications"),
        }
    }

    /// The sending (or changed) device.
    pub fn device(&self) -> &DeviceId {
        match self {
            Source::Telemetry { device }
            | Source::ModuleOutput { device, .. }
            | Source::TwinChange { device, .. } => device,
        }
    }

    /// The sending (or changed) module, if the source is a module.
    pub fn module(&self) -> Option<&ModuleId> {
        match self {
            Source::Telemetry { .. } => None,
            Source::ModuleOutput { module, .. } => Some(module),
            Source::TwinChange { module, .. } => module.as_ref(),
        }
    }

    /// The output name, for a module output that has one.
    pub fn output(&self) -> Option<&OutputName> {
        match self {
            Source::ModuleOutput { output, .. } => output.as_ref(),
            _ => None,
        }
    }
}

/// A system property that is carried with the message (as opposed to derived from its
/// [`Source`]). Values are kept as the text the sender gave, so they round-trip unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SystemProperty {
    /// `$.mid` / AMQP `message-id`.
    MessageId,
    /// `$.cid` / AMQP `correlation-id`.
    CorrelationId,
    /// `$.uid` / AMQP `user-id`.
    UserId,
    /// `$.to` / AMQP `to`.
    To,
    /// `$.ct` / AMQP `content-type`.
    ContentType,
    /// `$.ce` / AMQP `content-encoding`.
    ContentEncoding,
    /// `$.exp`: absolute expiry time as sent (ISO 8601 text).
    ExpiryTime,
    /// `$.ctime` / `iothub-creation-time-utc`.
    CreationTime,
    /// `$.schema` / `iothub-message-schema`.
    MessageSchema,
    /// `$.ifid`: the digital-twin interface id.
    InterfaceId,
    /// `$.sub` / `dt-subject`: the component name.
    ComponentName,
    /// `iothub-operation`.
    Operation,
    /// The input name a message is being delivered to (set at delivery, not at ingress).
    InputName,
    /// `edgeHubOriginInterface`: `internal` or `downstream`.
    EdgeHubOriginInterface,
}

impl SystemProperty {
    /// Every carried system property, in a fixed order.
    pub const ALL: [SystemProperty; 14] = [
        SystemProperty::MessageId,
        SystemProperty::CorrelationId,
        SystemProperty::UserId,
        SystemProperty::To,
        SystemProperty::ContentType,
        SystemProperty::ContentEncoding,
        SystemProperty::ExpiryTime,
        SystemProperty::CreationTime,
        SystemProperty::MessageSchema,
        SystemProperty::InterfaceId,
        SystemProperty::ComponentName,
        SystemProperty::Operation,
        SystemProperty::InputName,
        SystemProperty::EdgeHubOriginInterface,
    ];

    /// The names a route condition may use for this property after `$` (matched
    /// case-insensitively). The first is the canonical name.
    pub fn condition_names(self) -> &'static [&'static str] {
        match self {
            SystemProperty::MessageId => &["messageId"],
            // edgeHub stores the correlation id under `cid`; IoT Hub documents `correlationId`.
            SystemProperty::CorrelationId => &["correlationId", "cid"],
            SystemProperty::UserId => &["userId"],
            SystemProperty::To => &["to"],
            SystemProperty::ContentType => &["contentType"],
            SystemProperty::ContentEncoding => &["contentEncoding"],
            SystemProperty::ExpiryTime => &["absoluteExpiryTime", "exp", "expiryTimeUtc"],
            SystemProperty::CreationTime => &["creationTime", "iothub-creation-time-utc"],
            SystemProperty::MessageSchema => &["messageSchema"],
            SystemProperty::InterfaceId => &["interfaceId"],
            SystemProperty::ComponentName => &["dt-subject", "componentName"],
            SystemProperty::Operation => &["iothub-operation"],
            SystemProperty::InputName => &["inputName"],
            SystemProperty::EdgeHubOriginInterface => &["edgeHubOriginInterface"],
        }
    }

    /// Finds the property a condition name (`$name` without the `$`) refers to.
    pub fn from_condition_name(name: &str) -> Option<SystemProperty> {
        Self::ALL.into_iter().find(|p| {
            p.condition_names()
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
        })
    }
}

/// Names of the system properties derived from the [`Source`] rather than carried.
const CONNECTION_DEVICE_ID: &str = "connectionDeviceId";
const CONNECTION_MODULE_ID: &str = "connectionModuleId";
const OUTPUT_NAME: &str = "outputName";

/// A routed message. Cheap to clone: the body is reference-counted.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    source: Source,
    body: Bytes,
    properties: BTreeMap<String, String>,
    system: BTreeMap<SystemProperty, String>,
}

impl Message {
    /// A message from `source` with `body` and no properties.
    pub fn new(source: Source, body: impl Into<Bytes>) -> Self {
        Message {
            source,
            body: body.into(),
            properties: BTreeMap::new(),
            system: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) an application property.
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Adds (or replaces) a system property.
    #[must_use]
    pub fn with_system_property(mut self, key: SystemProperty, value: impl Into<String>) -> Self {
        self.system.insert(key, value.into());
        self
    }

    /// Where the message entered the hub.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The body bytes, uninterpreted.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Application properties, in key order.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// One application property, by exact key.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// Carried system properties, in [`SystemProperty`] order.
    pub fn system_properties(&self) -> &BTreeMap<SystemProperty, String> {
        &self.system
    }

    /// One carried system property.
    pub fn system_property(&self, key: SystemProperty) -> Option<&str> {
        self.system.get(&key).map(String::as_str)
    }

    /// Resolves a system property by the name a condition uses after `$` (case-insensitive),
    /// including the source-derived `connectionDeviceId`, `connectionModuleId` and `outputName`.
    pub fn system_property_by_name(&self, name: &str) -> Option<&str> {
        if name.eq_ignore_ascii_case(CONNECTION_DEVICE_ID) {
            return Some(self.source.device().as_str());
        }
        if name.eq_ignore_ascii_case(CONNECTION_MODULE_ID) {
            return self.source.module().map(ModuleId::as_str);
        }
        if name.eq_ignore_ascii_case(OUTPUT_NAME) {
            return self.source.output().map(OutputName::as_str);
        }
        SystemProperty::from_condition_name(name).and_then(|p| self.system_property(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(module: &str, output: Option<&str>) -> Source {
        Source::ModuleOutput {
            device: DeviceId::new("edge"),
            module: ModuleId::new(module),
            output: output.map(OutputName::new),
        }
    }

    #[test]
    fn the_route_source_key_is_the_lower_cased_path_for_ascii_and_other_names() {
        for source in [
            output("Filter", Some("Out1")),
            output("Fïlter", Some("ÖUT")),
            output("m", None),
            Source::Telemetry {
                device: DeviceId::new("edge"),
            },
        ] {
            let key = crate::route::condition::source_key(&source);
            assert_eq!(key, format!("{}/", source.path()).to_lowercase());
        }
    }

    #[test]
    fn source_paths_follow_edgehub() {
        let leaf = Source::Telemetry {
            device: DeviceId::new("d"),
        };
        assert_eq!(leaf.path(), "/messages");
        assert_eq!(
            output("m", Some("o")).path(),
            "/messages/modules/m/outputs/o"
        );
        assert_eq!(output("m", None).path(), "/messages/modules/m");
        let twin = Source::TwinChange {
            device: DeviceId::new("d"),
            module: None,
        };
        assert_eq!(twin.path(), "/twinChangeNotifications");
    }

    #[test]
    fn connection_ids_come_from_the_source() {
        let msg = Message::new(output("filter", Some("alerts")), "x");
        assert_eq!(
            msg.system_property_by_name("connectionDeviceId"),
            Some("edge")
        );
        assert_eq!(
            msg.system_property_by_name("CONNECTIONMODULEID"),
            Some("filter")
        );
        assert_eq!(msg.system_property_by_name("outputName"), Some("alerts"));
        let leaf = Message::new(
            Source::Telemetry {
                device: DeviceId::new("d"),
            },
            "x",
        );
        assert_eq!(leaf.system_property_by_name("connectionModuleId"), None);
    }

    #[test]
    fn correlation_id_answers_to_both_names() {
        let msg = Message::new(output("m", None), "")
            .with_system_property(SystemProperty::CorrelationId, "c1");
        assert_eq!(msg.system_property_by_name("correlationId"), Some("c1"));
        assert_eq!(msg.system_property_by_name("cid"), Some("c1"));
    }

    #[test]
    fn every_system_property_resolves_by_its_canonical_name() {
        for p in SystemProperty::ALL {
            let name = p.condition_names()[0];
            assert_eq!(SystemProperty::from_condition_name(name), Some(p), "{name}");
        }
    }
}
