//! A replicated module as the manifest declares it: how many members at most
//! ([`ReplicaCount`]) and what orders its messages ([`PartitionKey`]).
//!
//! Guarantees:
//! - A [`ReplicaCount`] is always within `1..=`[`ReplicaCount::MAX`].
//! - A [`PartitionKey`] is one of the three documented forms, its `$body` path validated as a
//!   route's `$body` query is; every refusal is a typed error that says what was expected.

use std::fmt;

use thiserror::Error;

use crate::route::body::BodyPath;

/// The manifest key, beside a module's `settings` in `$edgeAgent`'s `modules`.
pub const REPLICAS_KEY: &str = "x-edgehub-replicas";
/// The member of [`REPLICAS_KEY`] that gives the [`ReplicaCount`].
pub const COUNT_FIELD: &str = "count";
/// The member of [`REPLICAS_KEY`] that gives the [`PartitionKey`].
pub const PARTITION_KEY_FIELD: &str = "partitionKey";

/// What the manifest declares for a replicated module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// At most this many members at once.
    pub count: ReplicaCount,
    /// What a message's partition is computed from.
    pub key: PartitionKey,
}

/// How many members a replicated module may have at once: 1 to [`ReplicaCount::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaCount(u8);

/// A count outside `1..=`[`ReplicaCount::MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("must be from 1 to {max}, not {value}", max = ReplicaCount::MAX)]
pub struct ReplicaCountError {
    /// The count refused.
    pub value: u64,
}

impl ReplicaCount {
    /// The largest count: a quarter of the 64 partitions, so every member has a share worth
    /// splitting off.
    pub const MAX: u8 = 16;

    /// A count, if it is within `1..=MAX`.
    pub fn new(value: u64) -> Result<Self, ReplicaCountError> {
        u8::try_from(value)
            .ok()
            .filter(|n| (1..=Self::MAX).contains(n))
            .map(ReplicaCount)
            .ok_or(ReplicaCountError { value })
    }

    /// The count.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for ReplicaCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a message's partition is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionKey {
    /// `$connectionDeviceId`: the device the message entered from (the edge device itself for
    /// a module's output, the leaf device for its telemetry).
    ConnectionDeviceId,
    /// An application property, by exact (case-sensitive) name.
    Property(String),
    /// `$body.<path>`: a scalar in the JSON body.
    Body(BodyKey),
}

/// A validated `$body` path of a [`PartitionKey::Body`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyKey {
    text: String,
    path: BodyPath,
}

impl BodyKey {
    /// The path as written after `$body.`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub(crate) fn path(&self) -> &BodyPath {
        &self.path
    }
}

/// Why a partition key is refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PartitionKeyError {
    /// Empty text.
    #[error(
        "is empty: expected \"$connectionDeviceId\", \"$body.<path>\" or an application \
         property name"
    )]
    Empty,
    /// A `$` name other than the supported ones.
    #[error(
        "{name:?} is not a supported key: expected \"$connectionDeviceId\", \"$body.<path>\" \
         or an application property name (not starting with '$')"
    )]
    Unsupported {
        /// The name as written.
        name: String,
    },
    /// A `$body` path that a route would refuse too.
    #[error("the $body path {path:?} is invalid: {reason}")]
    BodyPath {
        /// The path as written after `$body.` (empty for a bare `$body`).
        path: String,
        /// Why.
        reason: String,
    },
}

impl PartitionKey {
    /// Parses a key as the manifest writes it. `$` names match in any case, as in routes; an
    /// application property name is kept exactly.
    pub fn parse(text: &str) -> Result<Self, PartitionKeyError> {
        if text.is_empty() {
            return Err(PartitionKeyError::Empty);
        }
        if !text.starts_with('$') {
            return Ok(PartitionKey::Property(text.to_owned()));
        }
        if text.eq_ignore_ascii_case("$connectionDeviceId") {
            return Ok(PartitionKey::ConnectionDeviceId);
        }
        let body = text
            .get(..6)
            .filter(|p| p.eq_ignore_ascii_case("$body."))
            .map(|_| &text[6..]);
        let path = match body {
            Some(path) => path,
            None if text.eq_ignore_ascii_case("$body") => "",
            None => {
                return Err(PartitionKeyError::Unsupported {
                    name: text.to_owned(),
                })
            }
        };
        BodyPath::parse(path)
            .map(|parsed| {
                PartitionKey::Body(BodyKey {
                    text: path.to_owned(),
                    path: parsed,
                })
            })
            .map_err(|reason| PartitionKeyError::BodyPath {
                path: path.to_owned(),
                reason,
            })
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionKey::ConnectionDeviceId => f.write_str("$connectionDeviceId"),
            PartitionKey::Property(name) => f.write_str(name),
            PartitionKey::Body(key) => write!(f, "$body.{}", key.as_str()),
        }
    }
}

/// Why a module's replica setting is refused. The manifest reports it with the JSON path of
/// the offending value, which names the module and the field.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ReplicaSettingError {
    /// [`REPLICAS_KEY`] is not an object.
    #[error("must be an object {{\"count\": 1-{max}, \"partitionKey\": …}}, not {found}", max = ReplicaCount::MAX)]
    NotAnObject {
        /// The value given, as JSON.
        found: String,
    },
    /// A required member is missing.
    #[error("missing")]
    Missing,
    /// The object has a member we do not know (a typo must not pass silently).
    #[error("unknown member (known: {COUNT_FIELD}, {PARTITION_KEY_FIELD})")]
    UnknownMember,
    /// A module key starting with `x-edgehub` other than [`REPLICAS_KEY`].
    #[error("unknown edgehub extension on a module (known: {REPLICAS_KEY})")]
    UnknownExtension,
    /// `count` is not an integer.
    #[error("must be an integer from 1 to {max}, not {found}", max = ReplicaCount::MAX)]
    CountNotInteger {
        /// The value given, as JSON.
        found: String,
    },
    /// `count` is out of range.
    #[error(transparent)]
    Count(#[from] ReplicaCountError),
    /// `partitionKey` is not a string.
    #[error(
        "must be a string (\"$connectionDeviceId\", \"$body.<path>\" or an application \
         property name), not {found}"
    )]
    KeyNotString {
        /// The value given, as JSON.
        found: String,
    },
    /// `partitionKey` is refused.
    #[error(transparent)]
    PartitionKey(#[from] PartitionKeyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_one_to_sixteen() {
        assert_eq!(ReplicaCount::new(1).map(ReplicaCount::get), Ok(1));
        assert_eq!(ReplicaCount::new(16).map(ReplicaCount::get), Ok(16));
        for bad in [0, 17, 256, u64::MAX] {
            assert_eq!(
                ReplicaCount::new(bad),
                Err(ReplicaCountError { value: bad })
            );
        }
    }

    #[test]
    fn keys_parse_in_the_three_documented_forms() {
        assert_eq!(
            PartitionKey::parse("$connectionDeviceId"),
            Ok(PartitionKey::ConnectionDeviceId)
        );
        assert_eq!(
            PartitionKey::parse("$CONNECTIONDEVICEID"),
            Ok(PartitionKey::ConnectionDeviceId)
        );
        assert_eq!(
            PartitionKey::parse("sensorId"),
            Ok(PartitionKey::Property("sensorId".to_owned()))
        );
        let Ok(PartitionKey::Body(body)) = PartitionKey::parse("$Body.sensor['id'][0]") else {
            panic!("a body path");
        };
        assert_eq!(body.as_str(), "sensor['id'][0]");
        assert_eq!(
            PartitionKey::parse("$body.a.b").map(|k| k.to_string()),
            Ok("$body.a.b".to_owned())
        );
    }

    #[test]
    fn broken_keys_say_what_is_expected() {
        assert_eq!(PartitionKey::parse(""), Err(PartitionKeyError::Empty));
        for other in ["$connectionModuleId", "$messageId", "$", "$bodyx"] {
            assert_eq!(
                PartitionKey::parse(other),
                Err(PartitionKeyError::Unsupported {
                    name: other.to_owned()
                }),
                "{other}"
            );
        }
        for (text, path) in [("$body", ""), ("$body.", ""), ("$body.a..b", "a..b")] {
            let err = PartitionKey::parse(text).unwrap_err();
            assert!(
                matches!(&err, PartitionKeyError::BodyPath { path: p, .. } if p == path),
                "{text}: {err:?}"
            );
        }
        let message = PartitionKey::parse("$messageId").unwrap_err().to_string();
        assert!(message.contains("$connectionDeviceId"), "{message}");
    }
}
