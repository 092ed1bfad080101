//! Twins and direct methods as IoT Hub serves them to a device or module over MQTT: the
//! `$iothub/...` topics a client publishes to, and the twin document. Pure: no I/O.
//!
//! Guarantees:
//! - [`parse_iothub`] accepts exactly `$iothub/twin/GET/?$rid={rid}`,
//!   `$iothub/twin/PATCH/properties/reported/?$rid={rid}[&…]` and
//!   `$iothub/methods/res/{status}/?$rid={rid}`, with a non-empty `$rid`; anything else under
//!   `$iothub/` is [`IotHubTopicError`].
//! - A [`Twin`] starts with empty desired and reported properties at `$version` 1. Each
//!   accepted patch of a side merges into it as a JSON merge patch (RFC 7386: `null` deletes,
//!   objects merge, anything else replaces) and raises that side's `$version` by one. A patch
//!   that is not a JSON object is refused and changes nothing.

use serde_json::{Map, Value};

/// A publish of a client to one of IoT Hub's `$iothub/` topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IotHubTopic {
    /// `$iothub/twin/GET/?$rid=`: the client asks for its twin.
    TwinGet {
        /// The request id to answer with.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=`: a reported-properties patch.
    TwinPatchReported {
        /// The request id to answer with.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid=`: the client answers a direct method.
    MethodResponse {
        /// The status the client's method returned.
        status: u16,
        /// The request id of the invocation it answers.
        rid: String,
    },
}

/// Why an `$iothub/` publish topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a twin or method topic IoT Hub accepts")]
pub struct IotHubTopicError(pub String);

/// Parses a client's publish topic under `$iothub/` (see the module doc).
pub fn parse_iothub(topic: &str) -> Result<IotHubTopic, IotHubTopicError> {
    let bad = || IotHubTopicError(topic.to_owned());
    let (path, query) = topic.split_once("/?").ok_or_else(bad)?;
    let rid = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "$rid")
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(bad)?;
    match path {
        "$iothub/twin/GET" => Ok(IotHubTopic::TwinGet { rid }),
        "$iothub/twin/PATCH/properties/reported" => Ok(IotHubTopic::TwinPatchReported { rid }),
        other => {
            let status = other
                .strip_prefix("$iothub/methods/res/")
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(bad)?;
            Ok(IotHubTopic::MethodResponse { status, rid })
        }
    }
}

/// Why a twin patch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The body is not JSON.
    #[error("the patch is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("the patch is not a JSON object")]
    NotAnObject,
}

/// One identity's twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// Desired properties, without `$version`.
    pub desired: Map<String, Value>,
    /// The desired side's `$version`.
    pub desired_version: u64,
    /// Reported properties, without `$version`.
    pub reported: Map<String, Value>,
    /// The reported side's `$version`.
    pub reported_version: u64,
}

impl Default for Twin {
    fn default() -> Self {
        Twin {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
        }
    }
}

impl Twin {
    /// The document a twin GET answers: `{"desired": {…, "$version": n}, "reported": {…}}`.
    pub fn document(&self) -> Value {
        let side = |props: &Map<String, Value>, version: u64| {
            let mut m = props.clone();
            m.insert("$version".into(), Value::from(version));
            Value::Object(m)
        };
        serde_json::json!({
            "desired": side(&self.desired, self.desired_version),
            "reported": side(&self.reported, self.reported_version),
        })
    }

    /// Merges a reported-properties patch (the publish body); returns the new `$version`.
    pub fn patch_reported(&mut self, body: &[u8]) -> Result<u64, PatchError> {
        let patch = object(body)?;
        merge_patch(&mut self.reported, &patch);
        self.reported_version += 1;
        Ok(self.reported_version)
    }

    /// Merges a desired-properties patch (the service's update); returns the new `$version`.
    pub fn patch_desired(&mut self, patch: &Map<String, Value>) -> u64 {
        merge_patch(&mut self.desired, patch);
        self.desired_version += 1;
        self.desired_version
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, PatchError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(PatchError::NotAnObject),
        Err(e) => Err(PatchError::NotJson(e.to_string())),
    }
}

/// RFC 7386 merge of `patch` into `target`; `$version` keys in the patch are ignored.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if k == "$version" {
            continue;
        }
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let slot = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge_patch(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_topics_a_client_may_publish() {
        assert_eq!(
            parse_iothub("$iothub/twin/GET/?$rid=7"),
            Ok(IotHubTopic::TwinGet { rid: "7".into() })
        );
        assert_eq!(
            parse_iothub("$iothub/twin/PATCH/properties/reported/?$rid=a1&$version=3"),
            Ok(IotHubTopic::TwinPatchReported { rid: "a1".into() })
        );
        assert_eq!(
            parse_iothub("$iothub/methods/res/200/?$rid=9"),
            Ok(IotHubTopic::MethodResponse {
                status: 200,
                rid: "9".into()
            })
        );
        for bad in [
            "$iothub/twin/GET/",
            "$iothub/twin/GET/?$rid=",
            "$iothub/twin/GET/?rid=1",
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "$iothub/methods/res/abc/?$rid=1",
            "$iothub/methods/POST/m/?$rid=1",
            "$iothub/other/?$rid=1",
        ] {
            assert!(parse_iothub(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn reported_patches_merge_and_raise_the_version() {
        let mut t = Twin::default();
        assert_eq!(
            t.patch_reported(br#"{"a":1,"n":{"x":1,"y":2},"gone":true}"#),
            Ok(2)
        );
        assert_eq!(
            t.patch_reported(br#"{"n":{"y":null,"z":3},"gone":null,"$version":99}"#),
            Ok(3)
        );
        assert_eq!(
            t.document(),
            json!({"desired": {"$version": 1},
                   "reported": {"a": 1, "n": {"x": 1, "z": 3}, "$version": 3}})
        );
    }

    #[test]
    fn a_patch_that_is_no_object_changes_nothing() {
        let mut t = Twin::default();
        assert!(matches!(
            t.patch_reported(b"{nope"),
            Err(PatchError::NotJson(_))
        ));
        assert_eq!(t.patch_reported(b"[1]"), Err(PatchError::NotAnObject));
        assert_eq!(t, Twin::default());
    }

    #[test]
    fn desired_patches_merge_too() {
        let mut t = Twin::default();
        let p = json!({"rate": 5, "nested": {"k": "v"}});
        assert_eq!(t.patch_desired(p.as_object().unwrap()), 2);
        let p = json!({"nested": null});
        assert_eq!(t.patch_desired(p.as_object().unwrap()), 3);
        assert_eq!(t.document()["desired"], json!({"rate": 5, "$version": 3}));
    }
}
