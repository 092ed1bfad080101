//! The partition of a message: a fixed hash of its partition key, modulo [`PARTITIONS`].
//!
//! The hash decides where stored messages are, so it must never change across versions or
//! platforms: it is written out here (no `std` hasher, whose algorithm is unspecified) and
//! pinned by tests against values computed from the documented algorithm.
//!
//! - **Key text**: `$connectionDeviceId` → the source's device id; an application property →
//!   its value; `$body.<path>` → a string as is, an integer in decimal, `true`/`false`. The
//!   body is read as JSON under the routes' rules (content type `application/json`, a UTF
//!   encoding). Anything else — missing property or path, a body not readable as JSON, null,
//!   a fraction, an object, an array — is **no key**.
//! - **Hash**: [`key_hash`] = [`fmix64`]\([`fnv1a64`]\(UTF-8 bytes of the key text)).
//! - **Partition**: `key_hash % 64`; no key → [`DEFAULT_PARTITION`] (0).

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use crate::message::Message;
use crate::replicas::spec::PartitionKey;
use crate::route::body::json_body;

/// How many partitions each input of a replicated module is split into. Fixed: changing it
/// would move keys between partitions and so reorder them across an upgrade.
pub const PARTITIONS: u8 = 64;

/// Where a message without the key goes.
pub const DEFAULT_PARTITION: PartitionId = PartitionId(0);

/// One of the [`PARTITIONS`] partitions of an input: `0..64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(u8);

impl PartitionId {
    /// A partition, if `raw < PARTITIONS`.
    pub const fn new(raw: u8) -> Option<Self> {
        if raw < PARTITIONS {
            Some(PartitionId(raw))
        } else {
            None
        }
    }

    /// The number, `0..64`.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The position of this partition in a table of [`PARTITIONS`] entries.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Every partition, in order.
    pub fn all() -> impl Iterator<Item = PartitionId> {
        (0..PARTITIONS).map(PartitionId)
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a, 64 bits: offset basis `0xcbf29ce484222325`, prime `0x100000001b3`; for each byte,
/// xor then multiply (wrapping).
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// MurmurHash3's 64-bit finalizer: spreads every input bit over the whole output, so the low
/// bits a modulo keeps depend on every byte of the key.
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The hash of a key's text.
pub const fn key_hash(key: &[u8]) -> u64 {
    fmix64(fnv1a64(key))
}

/// The partition of a key's text.
pub const fn partition_of_key(key: &[u8]) -> PartitionId {
    // The remainder is below 64, so it fits a u8.
    PartitionId((key_hash(key) % PARTITIONS as u64) as u8)
}

/// A message's key text under `key`, or `None` when it has none.
pub fn key_text<'m>(message: &'m Message, key: &PartitionKey) -> Option<Cow<'m, str>> {
    match key {
        PartitionKey::ConnectionDeviceId => Some(Cow::Borrowed(message.source().device().as_str())),
        PartitionKey::Property(name) => message.property(name).map(Cow::Borrowed),
        PartitionKey::Body(body) => {
            let json = json_body(message)?;
            match body.path().lookup(&json)? {
                Value::String(s) => Some(Cow::Owned(s.clone())),
                Value::Number(n) if n.is_i64() || n.is_u64() => Some(Cow::Owned(n.to_string())),
                Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
                Value::Number(_) | Value::Null | Value::Array(_) | Value::Object(_) => None,
            }
        }
    }
}

/// The partition of a message under `key`: [`DEFAULT_PARTITION`] when it has no key.
pub fn partition_of(message: &Message, key: &PartitionKey) -> PartitionId {
    key_text(message, key).map_or(DEFAULT_PARTITION, |text| partition_of_key(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeviceId, ModuleId, OutputName, Source, SystemProperty};

    fn p(raw: u8) -> PartitionId {
        PartitionId::new(raw).unwrap()
    }

    fn from_module(body: &str) -> Message {
        Message::new(
            Source::ModuleOutput {
                device: DeviceId::new("edge"),
                module: ModuleId::new("sensor"),
                output: Some(OutputName::new("out")),
            },
            body.to_owned(),
        )
    }

    fn json(body: &str) -> Message {
        from_module(body)
            .with_system_property(SystemProperty::ContentType, "application/json")
            .with_system_property(SystemProperty::ContentEncoding, "utf-8")
    }

    /// The published FNV-1a 64 test vectors (the algorithm's own reference values).
    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Values computed outside this code from the documented algorithm (a short Python
    /// rendering of FNV-1a 64 and fmix64): if any changes, stored messages would move.
    #[test]
    fn hashes_and_partitions_are_pinned() {
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(0x0123_4567_89ab_cdef), 0x87cb_fbfe_8902_2cea);
        for (key, hash, partition) in [
            ("", 0xefd0_1f60_ba99_2926, 38),
            ("a", 0x82a2_a958_a9be_ce5b, 27),
            ("device-1", 0xe340_ac1c_4190_ad44, 4),
            ("sensor-42", 0xcb9f_3a32_583a_2c0e, 14),
            ("leaf-7", 0xba89_98ad_ade3_1f05, 5),
            ("42", 0x810b_196a_56ee_3cec, 44),
            ("true", 0x4ae9_b248_7968_6fa1, 33),
            ("edge", 0x15cb_45cb_a673_8c35, 53),
        ] {
            assert_eq!(key_hash(key.as_bytes()), hash, "{key:?}");
            assert_eq!(partition_of_key(key.as_bytes()), p(partition), "{key:?}");
        }
    }

    /// 100 keys land in about as many partitions as 100 random throws into 64 would
    /// (about 51 on average), none piling up.
    #[test]
    fn a_hundred_keys_spread_over_the_partitions() {
        let mut counts = [0u32; PARTITIONS as usize];
        for i in 0..100 {
            let key = format!("device-{i}");
            counts[partition_of_key(key.as_bytes()).index()] += 1;
        }
        let used = counts.iter().filter(|&&c| c > 0).count();
        let most = counts.iter().copied().max().unwrap_or(0);
        assert!(used >= 40, "only {used} partitions used: {counts:?}");
        assert!(most <= 8, "{most} keys in one partition: {counts:?}");
    }

    #[test]
    fn partition_ids_stay_below_64() {
        assert_eq!(PartitionId::new(63).map(PartitionId::get), Some(63));
        assert_eq!(PartitionId::new(64), None);
        assert_eq!(PartitionId::all().count(), 64);
        assert!(PartitionId::all().enumerate().all(|(i, p)| p.index() == i));
    }

    #[test]
    fn a_property_key_is_read_by_its_exact_name() {
        let key = PartitionKey::parse("sensorId").unwrap();
        let msg = from_module("x").with_property("sensorId", "sensor-42");
        assert_eq!(partition_of(&msg, &key), partition_of_key(b"sensor-42"));
        let other_case = from_module("x").with_property("SensorId", "sensor-42");
        assert_eq!(partition_of(&other_case, &key), DEFAULT_PARTITION);
    }

    #[test]
    fn the_connection_device_id_is_the_source_device() {
        let key = PartitionKey::ConnectionDeviceId;
        let leaf = Message::new(
            Source::Telemetry {
                device: DeviceId::new("leaf-7"),
            },
            "x",
        );
        assert_eq!(partition_of(&leaf, &key), p(5));
        assert_eq!(partition_of(&from_module("x"), &key), p(53));
    }

    #[test]
    fn body_keys_take_strings_integers_and_booleans_as_their_text() {
        let key = PartitionKey::parse("$body.sensor.id").unwrap();
        for (body, text) in [
            (r#"{"sensor": {"id": "sensor-42"}}"#, "sensor-42"),
            (r#"{"sensor": {"id": 42}}"#, "42"),
            (r#"{"sensor": {"id": "42"}}"#, "42"),
            (r#"{"sensor": {"id": true}}"#, "true"),
            (r#"{"sensor": {"id": -7}}"#, "-7"),
        ] {
            let msg = json(body);
            assert_eq!(key_text(&msg, &key).as_deref(), Some(text), "{body}");
            assert_eq!(partition_of(&msg, &key), partition_of_key(text.as_bytes()));
        }
    }

    #[test]
    fn a_message_without_the_key_goes_to_the_default_partition() {
        let key = PartitionKey::parse("$body.sensor.id").unwrap();
        for body in [
            r#"{"sensor": {}}"#,
            r#"{"sensor": {"id": null}}"#,
            r#"{"sensor": {"id": 4.5}}"#,
            r#"{"sensor": {"id": {"a": 1}}}"#,
            r#"{"sensor": {"id": [1]}}"#,
            "not json",
        ] {
            assert_eq!(key_text(&json(body), &key), None, "{body}");
            assert_eq!(partition_of(&json(body), &key), DEFAULT_PARTITION, "{body}");
        }
        // A JSON body is read only with a JSON content type, as routes read it.
        let untyped = from_module(r#"{"sensor": {"id": "sensor-42"}}"#);
        assert_eq!(partition_of(&untyped, &key), DEFAULT_PARTITION);
        let property = PartitionKey::parse("sensorId").unwrap();
        assert_eq!(
            partition_of(&from_module("x"), &property),
            DEFAULT_PARTITION
        );
    }
}
