//! One module twin as data: desired properties (from the manifest) and reported properties
//! (from the module), each with its `$version`. Pure: no I/O, no clock.
//!
//! Rules (IoT Hub's, as its device-twin guide states them; reference §1.7):
//! - A reported-properties PATCH is a JSON object applied as a JSON merge patch (RFC 7386):
//!   `null` deletes a member, an object merges into an object, anything else replaces. Each
//!   accepted patch adds one to the reported `$version`.
//! - Limits, checked on the document the patch would make (so a patch that deletes is always
//!   accepted): the reported properties serialized as compact JSON (without `$version`) at most
//!   [`MAX_REPORTED_BYTES`] (32 KiB, IoT Hub's limit on `properties/reported`; we count
//!   serialized bytes, which is stricter than IoT Hub's key+value count), nesting at most
//!   [`MAX_DEPTH`] levels (IoT Hub's 10; a member of the reported object is level 1), and
//!   keys without `.`, `$`, space or control characters (IoT Hub's key rule).
//! - Errors carry the status IoT Hub answers: 400 for a patch that is not JSON, not an object,
//!   too deep or with a bad key; 413 for one that makes the document too large.
//! - Desired properties come from a source: IoT Hub's document once it gave one (with cloud
//!   sync on, [`CloudState::desired`], served with IoT Hub's `$version`), else the manifest's.
//!   The manifest's `$version`, if given, is kept as written; without one, the version goes up
//!   by one whenever the desired document differs from the one last served. The patch a change
//!   makes ([`desired_patch`]) names the changed members and sets removed ones to `null`, so
//!   merging it into the old document gives the new one.
//! - IoT Hub's desired document changes by a whole document (a twin GET, which replaces it)
//!   or by a patch, which applies only on top of the version before it
//!   ([`Twin::with_cloud_desired_patch`]): an older one changes nothing, a later one means
//!   patches were missed and the twin must be read again.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest reported-properties document, serialized as compact JSON, without `$version`.
pub const MAX_REPORTED_BYTES: usize = 32 * 1024;
/// Deepest nesting of the reported properties (a member of the reported object is level 1).
pub const MAX_DEPTH: usize = 10;

/// The key of a twin section's version.
pub const VERSION_KEY: &str = "$version";

/// Why a reported-properties patch was refused; [`PatchError::status`] is the status answered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The payload is not JSON.
    #[error("the reported-properties patch is not valid JSON: {0}")]
    Malformed(String),
    /// The payload is JSON but not an object.
    #[error("the reported-properties patch must be a JSON object")]
    NotAnObject,
    /// A key IoT Hub refuses.
    #[error("key {0:?} is not allowed: keys may not be empty or contain '.', '$', ' ' or control characters")]
    BadKey(String),
    /// The document would nest too deep.
    #[error("the reported properties would nest {depth} levels deep; the limit is {MAX_DEPTH}")]
    TooDeep {
        /// How deep it would nest.
        depth: usize,
    },
    /// The document would be too large.
    #[error("the reported properties would be {size} bytes; the limit is {MAX_REPORTED_BYTES}")]
    TooLarge {
        /// Its serialized size.
        size: usize,
    },
}

impl PatchError {
    /// The status answered on `$iothub/twin/res/{status}/`: 413 for too large, else 400.
    pub fn status(&self) -> u16 {
        match self {
            PatchError::TooLarge { .. } => 413,
            _ => 400,
        }
    }
}

/// A module twin: what is kept on disk and served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Twin {
    /// Desired properties last served (without `$version`).
    pub desired: Map<String, Value>,
    /// Their `$version`.
    pub desired_version: u64,
    /// Reported properties (without `$version`).
    pub reported: Map<String, Value>,
    /// Their `$version`: one more per accepted patch.
    pub reported_version: u64,
    /// What IoT Hub has acknowledged of this twin (upstream on); absent in files written
    /// before cloud sync, which then read as "nothing synced".
    #[serde(default, skip_serializing_if = "CloudState::is_initial")]
    pub cloud: CloudState,
}

/// The part of a twin IoT Hub has acknowledged: kept with the twin, so what is still to send
/// is known after a restart or kill -9.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudState {
    /// The reported properties IoT Hub last answered 204 for (without `$version`).
    pub reported: Map<String, Value>,
    /// The local reported `$version` they are.
    pub reported_version: u64,
    /// The keys (a [`key_tree`]) of every reported document a patch was sent for since that
    /// 204: IoT Hub may have applied any of them without its answer reaching us (connection
    /// lost, time-out, the hub killed). Written before each patch goes; `None` when nothing
    /// was sent since the last 204.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_in_doubt: Option<Map<String, Value>>,
    /// IoT Hub's desired properties, once it gave them (a twin GET or patches on top of one);
    /// with cloud sync on, they are served instead of the manifest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<CloudDesired>,
}

/// IoT Hub's desired properties and their `$version` (IoT Hub's, one up per change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudDesired {
    /// The properties (without `$version`).
    pub properties: Map<String, Value>,
    /// Their `$version` in IoT Hub.
    pub version: u64,
}

/// A desired-properties patch from IoT Hub that does not follow the version the twin holds
/// (or the twin holds no document of IoT Hub's yet): patches were missed, read the twin again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("IoT Hub's desired patch $version {got} does not follow the $version held ({held:?})")]
pub struct DesiredGap {
    /// The version held, if any.
    pub held: Option<u64>,
    /// The patch's version.
    pub got: u64,
}

impl Default for CloudState {
    /// Nothing synced: the empty reported properties of a new twin (version 1).
    fn default() -> Self {
        CloudState {
            reported: Map::new(),
            reported_version: 1,
            reported_in_doubt: None,
            desired: None,
        }
    }
}

impl CloudState {
    /// Whether nothing was ever synced (not written to the file then).
    pub fn is_initial(&self) -> bool {
        *self == CloudState::default()
    }
}

/// Reported properties to send to IoT Hub: the merge patch from what it acknowledged to the
/// twin's, and the document and local version that patch brings it to.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportedSync {
    /// The merge patch (changed members, nested; removed ones as `null`).
    pub patch: Map<String, Value>,
    /// The reported properties once IoT Hub applied it.
    pub reported: Map<String, Value>,
    /// Their local `$version`.
    pub version: u64,
    /// The local `$version` IoT Hub acknowledged last.
    pub synced_version: u64,
}

impl Default for Twin {
    /// An empty twin: both sections empty at version 1, as IoT Hub creates one.
    fn default() -> Self {
        Twin {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            cloud: CloudState::default(),
        }
    }
}

/// A change of the desired properties: the twin after it, and the patch to send.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredChange {
    /// The twin with the new desired properties and version.
    pub twin: Twin,
    /// The changed members (removed ones as `null`).
    pub patch: Map<String, Value>,
}

impl Twin {
    /// The twin with the manifest's desired properties `from_manifest` (which may carry a
    /// `$version`), or `None` if they are the ones (and the version) already served.
    pub fn with_desired(&self, from_manifest: &Map<String, Value>) -> Option<DesiredChange> {
        let mut desired = from_manifest.clone();
        let given = desired.remove(VERSION_KEY).and_then(|v| v.as_u64());
        if desired == self.desired && given.is_none_or(|v| v == self.desired_version) {
            return None;
        }
        let patch = desired_patch(&self.desired, &desired);
        let version = given.unwrap_or_else(|| self.desired_version.saturating_add(1));
        Some(DesiredChange {
            twin: Twin {
                desired,
                desired_version: version,
                ..self.clone()
            },
            patch,
        })
    }

    /// The twin after the reported-properties patch `payload` (JSON), with its version one up.
    pub fn with_reported_patch(&self, payload: &[u8]) -> Result<Twin, PatchError> {
        let patch: Value =
            serde_json::from_slice(payload).map_err(|e| PatchError::Malformed(e.to_string()))?;
        let Value::Object(patch) = patch else {
            return Err(PatchError::NotAnObject);
        };
        check_keys(&patch)?;
        let mut reported = self.reported.clone();
        merge(&mut reported, &patch);
        let depth = depth_of(&reported);
        if depth > MAX_DEPTH {
            return Err(PatchError::TooDeep { depth });
        }
        let size = serde_json::to_vec(&reported).map_or(usize::MAX, |b| b.len());
        if size > MAX_REPORTED_BYTES {
            return Err(PatchError::TooLarge { size });
        }
        Ok(Twin {
            reported,
            reported_version: self.reported_version.saturating_add(1),
            ..self.clone()
        })
    }

    /// What to send IoT Hub for its reported properties to catch up with this twin's, or
    /// `None` when it has acknowledged them (or a later version, which cannot be newer: only
    /// this twin's versions are ever sent).
    ///
    /// With nothing in doubt, the patch is the difference from what IoT Hub acknowledged.
    /// Otherwise IoT Hub holds the acknowledged document or one of those in doubt, and the
    /// patch is right from each: the twin's reported properties whole (objects as nested
    /// patches), with `null` for every key any of them may hold that the twin lacks.
    pub fn reported_to_sync(&self) -> Option<ReportedSync> {
        if self.cloud.reported_version >= self.reported_version {
            return None;
        }
        let patch = match &self.cloud.reported_in_doubt {
            None => desired_patch(&self.cloud.reported, &self.reported),
            Some(doubt) => {
                let mut held = key_tree(&self.cloud.reported);
                union_keys(&mut held, doubt);
                covering_patch(&held, &self.reported)
            }
        };
        Some(ReportedSync {
            patch,
            reported: self.reported.clone(),
            version: self.reported_version,
            synced_version: self.cloud.reported_version,
        })
    }

    /// The twin once `sync`'s patch is about to go to IoT Hub: its document joins those in
    /// doubt until a 204. `None` if they already cover its keys (nothing to write).
    pub fn with_reported_sending(&self, sync: &ReportedSync) -> Option<Twin> {
        let before = self.cloud.reported_in_doubt.as_ref();
        let mut doubt = before.cloned().unwrap_or_default();
        union_keys(&mut doubt, &key_tree(&sync.reported));
        if before == Some(&doubt) {
            return None;
        }
        let mut next = self.clone();
        next.cloud.reported_in_doubt = Some(doubt);
        Some(next)
    }

    /// The twin once IoT Hub acknowledged the reported properties `reported` at local
    /// `$version` `version` (its 204 to the last patch sent: nothing is in doubt any more);
    /// `None` if it had acknowledged that version or a later one already.
    pub fn with_reported_synced(
        &self,
        reported: &Map<String, Value>,
        version: u64,
    ) -> Option<Twin> {
        if version <= self.cloud.reported_version {
            return None;
        }
        let mut next = self.clone();
        next.cloud.reported = reported.clone();
        next.cloud.reported_version = version;
        next.cloud.reported_in_doubt = None;
        Some(next)
    }

    /// The twin with IoT Hub's whole desired document `properties` at `$version` `version`
    /// (read by a twin GET), or `None` if it holds exactly that already. The newest read
    /// wins even at a lower version (the twin was recreated in IoT Hub).
    pub fn with_cloud_desired_document(
        &self,
        properties: &Map<String, Value>,
        version: u64,
    ) -> Option<Twin> {
        let doc = CloudDesired {
            properties: properties.clone(),
            version,
        };
        if self.cloud.desired.as_ref() == Some(&doc) {
            return None;
        }
        let mut next = self.clone();
        next.cloud.desired = Some(doc);
        Some(next)
    }

    /// The twin with IoT Hub's desired patch `patch` (a merge patch, `$version` left out)
    /// applied: `Ok(None)` for a version held already or an older one, `Err` when it does not
    /// follow the version held.
    pub fn with_cloud_desired_patch(
        &self,
        patch: &Map<String, Value>,
        version: u64,
    ) -> Result<Option<Twin>, DesiredGap> {
        let held = self.cloud.desired.as_ref().map(|d| d.version);
        match held {
            Some(h) if version <= h => Ok(None),
            Some(h) if version == h.saturating_add(1) => {
                let mut next = self.clone();
                if let Some(doc) = next.cloud.desired.as_mut() {
                    merge(&mut doc.properties, patch);
                    doc.version = version;
                }
                Ok(Some(next))
            }
            _ => Err(DesiredGap { held, got: version }),
        }
    }

    /// The desired properties to serve (with `$version` inside when they are IoT Hub's): IoT
    /// Hub's if `cloud_on` and it gave a document, else `from_manifest`.
    pub fn desired_source(
        &self,
        from_manifest: &Map<String, Value>,
        cloud_on: bool,
    ) -> Map<String, Value> {
        match (&self.cloud.desired, cloud_on) {
            (Some(doc), true) => with_version(&doc.properties, doc.version),
            _ => from_manifest.clone(),
        }
    }

    /// The document a GET answers: `{"desired": {…, "$version": n}, "reported": {…, "$version": m}}`.
    pub fn document(&self) -> Value {
        let mut doc = Map::new();
        doc.insert(
            "desired".to_owned(),
            Value::Object(with_version(&self.desired, self.desired_version)),
        );
        doc.insert(
            "reported".to_owned(),
            Value::Object(with_version(&self.reported, self.reported_version)),
        );
        Value::Object(doc)
    }
}

/// `section` with its `$version` member.
pub fn with_version(section: &Map<String, Value>, version: u64) -> Map<String, Value> {
    let mut out = section.clone();
    out.insert(VERSION_KEY.to_owned(), Value::from(version));
    out
}

/// Applies the JSON merge patch `patch` to `target` (RFC 7386).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge(t, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The merge patch that turns `old` into `new`: members that differ (objects on both sides as
/// a nested patch), and members only in `old` as `null`.
pub fn desired_patch(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (key, value) in new {
        match (old.get(key), value) {
            (Some(before), after) if before == after => {}
            (Some(Value::Object(before)), Value::Object(after)) => {
                patch.insert(key.clone(), Value::Object(desired_patch(before, after)));
            }
            _ => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    patch
}

/// The keys of `doc`, nested: an object member as the tree of its keys, any other as `null`.
pub fn key_tree(doc: &Map<String, Value>) -> Map<String, Value> {
    doc.iter()
        .map(|(k, v)| {
            let keys = match v {
                Value::Object(inner) => Value::Object(key_tree(inner)),
                _ => Value::Null,
            };
            (k.clone(), keys)
        })
        .collect()
}

/// Adds the key tree `more` to the key tree `into`; a member that is an object in either
/// stays an object (with the keys of both).
pub fn union_keys(into: &mut Map<String, Value>, more: &Map<String, Value>) {
    for (k, v) in more {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => union_keys(a, b),
            (Some(Value::Object(_)), _) => {}
            (_, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The merge patch that turns every document whose keys are within the key tree `held` into
/// `new`: every member of `new` (an object as a nested such patch, since merging it into a
/// member that is not an object starts from an empty one) and `null` for the keys of `held`
/// that `new` lacks.
pub fn covering_patch(held: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let empty = Map::new();
    let mut patch = Map::new();
    for (key, value) in new {
        let member = match value {
            Value::Object(inner) => {
                let below = match held.get(key) {
                    Some(Value::Object(h)) => h,
                    _ => &empty,
                };
                Value::Object(covering_patch(below, inner))
            }
            other => other.clone(),
        };
        patch.insert(key.clone(), member);
    }
    for key in held.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    patch
}

/// Levels of nesting of an object's members: `{}` and `{"a": 1}` are 0 and 1,
/// `{"a": {"b": 1}}` is 2 (arrays count as a level too).
fn depth_of(map: &Map<String, Value>) -> usize {
    map.values()
        .map(|v| 1 + depth_of_value(v))
        .max()
        .unwrap_or(0)
}

fn depth_of_value(value: &Value) -> usize {
    match value {
        Value::Object(map) => depth_of(map),
        Value::Array(items) => items
            .iter()
            .map(|v| 1 + depth_of_value(v))
            .max()
            .unwrap_or(0),
        _ => 0,
    }
}

fn check_keys(map: &Map<String, Value>) -> Result<(), PatchError> {
    for (key, value) in map {
        if key.is_empty()
            || key
                .chars()
                .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
        {
            return Err(PatchError::BadKey(key.clone()));
        }
        if let Value::Object(inner) = value {
            check_keys(inner)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_patch_merges_replaces_and_null_deletes_and_counts_a_version() {
        let twin = Twin::default()
            .with_reported_patch(br#"{"a": 1, "b": {"x": 1, "y": 2}, "c": "keep"}"#)
            .unwrap();
        assert_eq!(twin.reported_version, 2);
        let twin = twin
            .with_reported_patch(br#"{"a": null, "b": {"x": null, "z": 3}, "d": [1]}"#)
            .unwrap();
        assert_eq!(twin.reported_version, 3);
        assert_eq!(
            Value::Object(twin.reported.clone()),
            json!({"b": {"y": 2, "z": 3}, "c": "keep", "d": [1]})
        );
        // A value replaced by an object, and a null for a member that is not there.
        let twin = twin
            .with_reported_patch(br#"{"c": {"n": 1}, "q": null}"#)
            .unwrap();
        assert_eq!(twin.reported["c"], json!({"n": 1}));
        assert!(!twin.reported.contains_key("q"));
        assert_eq!(twin.desired_version, 1, "desired untouched");
    }

    #[test]
    fn malformed_or_non_object_patches_are_400_and_change_nothing() {
        let twin = Twin::default();
        for (payload, want) in [
            (&b"{not json"[..], "not valid JSON"),
            (b"", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b"42", "must be a JSON object"),
            (br#"{"a.b": 1}"#, "not allowed"),
            (br#"{"x": {"$bad": 1}}"#, "not allowed"),
            (br#"{"with space": 1}"#, "not allowed"),
        ] {
            let err = twin.with_reported_patch(payload).unwrap_err();
            assert_eq!(err.status(), 400, "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn limits_are_checked_on_the_merged_document() {
        let big = "x".repeat(MAX_REPORTED_BYTES / 2);
        let twin = Twin::default()
            .with_reported_patch(json!({ "a": big }).to_string().as_bytes())
            .unwrap();
        // Another half pushes the document over 32 KiB: 413, and nothing changed.
        let err = twin
            .with_reported_patch(json!({ "b": big }).to_string().as_bytes())
            .unwrap_err();
        assert!(matches!(err, PatchError::TooLarge { .. }), "{err}");
        assert_eq!(err.status(), 413);
        // Replacing the big value keeps it under the limit.
        let twin = twin
            .with_reported_patch(json!({ "a": null, "b": big }).to_string().as_bytes())
            .unwrap();
        assert_eq!(twin.reported_version, 3);
        // Ten levels are allowed, eleven are not.
        let nest = |levels: usize| {
            let mut v = json!(1);
            for _ in 0..levels {
                v = json!({ "n": v });
            }
            v.to_string()
        };
        assert!(Twin::default()
            .with_reported_patch(nest(10).as_bytes())
            .is_ok());
        let err = Twin::default()
            .with_reported_patch(nest(11).as_bytes())
            .unwrap_err();
        assert_eq!(err, PatchError::TooDeep { depth: 11 });
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn desired_from_the_manifest_keeps_its_version_or_counts_one_up_per_change() {
        let twin = Twin::default();
        let with_version = obj(json!({"rate": 5, "$version": 7}));
        let change = twin.with_desired(&with_version).unwrap();
        assert_eq!(change.twin.desired_version, 7);
        assert_eq!(
            Value::Object(change.twin.desired.clone()),
            json!({"rate": 5})
        );
        assert_eq!(change.twin.with_desired(&with_version), None, "same again");
        // Without a version: one up whenever the document changes.
        let plain = obj(json!({"rate": 6, "mode": "x"}));
        let next = change.twin.with_desired(&plain).unwrap();
        assert_eq!(next.twin.desired_version, 8);
        assert_eq!(Value::Object(next.patch), json!({"rate": 6, "mode": "x"}));
        assert_eq!(next.twin.with_desired(&plain), None);
        let removed = next.twin.with_desired(&obj(json!({"mode": "x"}))).unwrap();
        assert_eq!(removed.twin.desired_version, 9);
        assert_eq!(Value::Object(removed.patch), json!({"rate": null}));
    }

    #[test]
    fn a_desired_patch_merged_into_the_old_document_gives_the_new_one() {
        let old = obj(json!({"a": 1, "b": {"x": 1, "y": 2}, "c": [1], "d": "gone"}));
        let new = obj(json!({"a": 1, "b": {"x": 5, "w": 0}, "c": [2], "e": {"f": true}}));
        let patch = desired_patch(&old, &new);
        assert_eq!(
            Value::Object(patch.clone()),
            json!({"b": {"x": 5, "w": 0, "y": null}, "c": [2], "d": null, "e": {"f": true}})
        );
        let mut merged = old.clone();
        merge(&mut merged, &patch);
        assert_eq!(merged, new);
    }

    #[test]
    fn the_document_carries_both_versions_and_round_trips_on_disk() {
        let twin = Twin::default()
            .with_desired(&obj(json!({"rate": 5})))
            .unwrap()
            .twin
            .with_reported_patch(br#"{"ok": true}"#)
            .unwrap();
        assert_eq!(
            twin.document(),
            json!({"desired": {"rate": 5, "$version": 2}, "reported": {"ok": true, "$version": 2}})
        );
        let bytes = serde_json::to_vec(&twin).unwrap();
        assert_eq!(serde_json::from_slice::<Twin>(&bytes).unwrap(), twin);
    }

    #[test]
    fn what_iot_hub_lacks_is_the_nested_difference_with_removed_keys_as_null() {
        let twin = Twin::default();
        assert_eq!(
            twin.reported_to_sync(),
            None,
            "a new twin has nothing to send"
        );
        let twin = twin
            .with_reported_patch(br#"{"a": {"x": 1, "y": 2}, "b": 1}"#)
            .unwrap();
        let first = twin.reported_to_sync().unwrap();
        assert_eq!(
            (
                Value::Object(first.patch.clone()),
                first.version,
                first.synced_version
            ),
            (json!({"a": {"x": 1, "y": 2}, "b": 1}), 2, 1)
        );
        // Two more local patches before IoT Hub answered the first.
        let twin = twin
            .with_reported_patch(br#"{"a": {"y": null}, "b": null, "c": 3}"#)
            .unwrap()
            .with_reported_patch(br#"{"c": 4}"#)
            .unwrap();
        let twin = twin
            .with_reported_synced(&first.reported, first.version)
            .unwrap();
        let next = twin.reported_to_sync().unwrap();
        assert_eq!(
            (
                Value::Object(next.patch.clone()),
                next.version,
                next.synced_version
            ),
            (json!({"a": {"y": null}, "b": null, "c": 4}), 4, 2)
        );
        // Applied to what IoT Hub holds, the patch gives the twin's reported properties.
        let mut cloud = first.reported.clone();
        merge(&mut cloud, &next.patch);
        assert_eq!(cloud, twin.reported);
        // An old acknowledgement changes nothing; the last one leaves nothing to send.
        assert_eq!(twin.with_reported_synced(&first.reported, 2), None);
        let twin = twin.with_reported_synced(&next.reported, 4).unwrap();
        assert_eq!(twin.reported_to_sync(), None);
        // And the state goes to the file and back; a file without it reads as nothing synced.
        let bytes = serde_json::to_vec(&twin).unwrap();
        assert_eq!(serde_json::from_slice::<Twin>(&bytes).unwrap(), twin);
        let old = br#"{"desired":{},"desiredVersion":1,"reported":{"a":1},"reportedVersion":2}"#;
        let old: Twin = serde_json::from_slice(old).unwrap();
        assert_eq!(old.cloud, CloudState::default());
        assert_eq!(old.reported_to_sync().unwrap().version, 2);
    }

    #[test]
    fn iot_hub_desired_properties_win_once_given_and_patches_apply_only_in_version_order() {
        let manifest: Map<String, Value> = serde_json::from_value(json!({"rate": 1})).unwrap();
        let twin = Twin::default();
        assert_eq!(
            twin.desired_source(&manifest, true),
            manifest,
            "no cloud document yet"
        );
        // A patch before any document cannot apply.
        let gap = twin.with_cloud_desired_patch(&Map::new(), 2).unwrap_err();
        assert_eq!(gap.held, None);
        let doc: Map<String, Value> =
            serde_json::from_value(json!({"rate": 2, "mode": {"a": 1, "b": 2}})).unwrap();
        let twin = twin.with_cloud_desired_document(&doc, 3).unwrap();
        assert_eq!(
            twin.with_cloud_desired_document(&doc, 3),
            None,
            "held already"
        );
        assert_eq!(
            Value::Object(twin.desired_source(&manifest, true)),
            json!({"rate": 2, "mode": {"a": 1, "b": 2}, "$version": 3})
        );
        assert_eq!(
            twin.desired_source(&manifest, false),
            manifest,
            "cloud sync off"
        );
        // Served: IoT Hub's $version, even below the manifest's.
        let served = twin
            .with_desired(&twin.desired_source(&manifest, true))
            .unwrap()
            .twin;
        assert_eq!((served.desired_version, served.desired.len()), (3, 2));
        let patch: Map<String, Value> =
            serde_json::from_value(json!({"mode": {"b": null}})).unwrap();
        assert_eq!(twin.with_cloud_desired_patch(&patch, 3), Ok(None), "old");
        assert_eq!(
            twin.with_cloud_desired_patch(&patch, 5).unwrap_err(),
            DesiredGap {
                held: Some(3),
                got: 5
            }
        );
        let twin = twin.with_cloud_desired_patch(&patch, 4).unwrap().unwrap();
        assert_eq!(
            Value::Object(twin.desired_source(&manifest, true)),
            json!({"rate": 2, "mode": {"a": 1}, "$version": 4})
        );
        // A later read replaces the document, even at a lower version (recreated in IoT Hub).
        let twin = twin.with_cloud_desired_document(&Map::new(), 1).unwrap();
        assert_eq!(
            Value::Object(twin.desired_source(&manifest, true)),
            json!({"$version": 1})
        );
        let bytes = serde_json::to_vec(&twin).unwrap();
        assert_eq!(serde_json::from_slice::<Twin>(&bytes).unwrap(), twin);
    }

    /// IoT Hub applied a patch whose 204 never came back (connection lost, or the hub was
    /// killed before it kept the 204); the module patched on. Whatever IoT Hub holds, the acknowledged
    /// document or the one that patch made, the next patch must bring it to the twin's.
    #[test]
    fn a_resend_after_an_unanswered_patch_is_right_whatever_iot_hub_applied() {
        let acked = Twin::default()
            .with_reported_patch(br#"{"keep": 1, "obj": {"p": 1}}"#)
            .unwrap();
        let first = acked.reported_to_sync().unwrap();
        let acked = acked
            .with_reported_synced(&first.reported, first.version)
            .unwrap();
        // Sent; IoT Hub may have applied it, no answer came.
        let twin = acked
            .with_reported_patch(br#"{"gone": 1, "obj": {"q": 2}, "flip": {"x": 1}}"#)
            .unwrap();
        let lost = twin.reported_to_sync().unwrap();
        let twin = twin.with_reported_sending(&lost).unwrap();
        assert_eq!(twin.with_reported_sending(&lost), None, "already in doubt");
        // Then: "gone" removed, "obj.q" removed, "flip" a scalar and an object again.
        let twin = twin
            .with_reported_patch(br#"{"gone": null, "obj": {"q": null}, "flip": 5}"#)
            .unwrap()
            .with_reported_patch(br#"{"flip": {"y": 2}}"#)
            .unwrap();
        let next = twin.reported_to_sync().unwrap();
        let mut applied_lost = first.reported.clone();
        merge(&mut applied_lost, &lost.patch);
        for holds in [first.reported.clone(), applied_lost] {
            let mut cloud = holds.clone();
            merge(&mut cloud, &next.patch);
            assert_eq!(
                Value::Object(cloud),
                Value::Object(twin.reported.clone()),
                "IoT Hub held {holds:?}; patch {:?}",
                next.patch
            );
        }
        // The doubt goes to the file and back, and the 204 of that patch ends it.
        let bytes = serde_json::to_vec(&twin).unwrap();
        assert_eq!(serde_json::from_slice::<Twin>(&bytes).unwrap(), twin);
        let twin = twin
            .with_reported_synced(&next.reported, next.version)
            .unwrap();
        assert_eq!(twin.cloud.reported_in_doubt, None);
    }
}
