//! The bytes a routed message is stored as: a small, versioned, hand-written binary format.
//!
//! A message is stored once however many endpoints it goes to (store guarantee 3), wrapped in an
//! [`Envelope`] that adds what delivery needs and the [`Message`] does not carry: when it was
//! enqueued, the expiry of every target whose TTL differs from the store-level expiry (see
//! `router.rs` for the TTL design), and the edgehub delivery extensions of every target that has
//! any (`x-edgehub-setAsideAfter`, `x-edgehub-liveFirstSecs`).
//!
//! # Format, versions 1 and 2
//!
//! All integers little-endian. `str` is a `u32` byte length followed by UTF-8; `opt str` is a
//! `u8` (0 absent, 1 present) followed by a `str` when present; an expiry is a `u64` of Unix
//! milliseconds where `0` means "never".
//!
//! ```text
//! u8        version (1)
//! u64       enqueued at (Unix ms)
//! u16       n expiry overrides, then n × { str endpoint id, u64 expiry }
//! (v2 only) u16 n delivery options, then n × { str endpoint id, u32 set aside after,
//!                                               u32 live first secs }   (0: not set)
//! u8        source tag: 0 telemetry, 1 module output, 2 twin change
//! str       device; then module output: str module, opt str output;
//!                        twin change:   opt str module
//! u16       n system properties, then n × { u8 index in SystemProperty::ALL, str value }
//! u32       n application properties, then n × { str key, str value }
//! u32       body length, then the body
//! ```
//!
//! [`encode`] writes version 1 when no target has delivery options (byte for byte what earlier
//! builds wrote and read), version 2 otherwise; [`decode`] reads both.
//!
//! Invariants:
//! - [`decode`] never panics and never allocates more than the input's length justifies: every
//!   count is checked against the bytes that remain, and any malformed input is a [`DecodeError`].
//! - `decode(encode(e)) == e` for every envelope (property-tested), and the body of a decoded
//!   message shares the stored buffer (no copy).
//! - Changing the format means bumping [`VERSION`] and keeping a decoder for every older version
//!   still on disk.

use bytes::{BufMut, Bytes, BytesMut};
use store::UnixMillis;

use crate::message::{DeviceId, Message, ModuleId, OutputName, Source, SystemProperty};
use crate::route::{DeliveryOptions, EndpointId};

/// The newest format version: [`encode`] writes it when some target has delivery options.
pub const VERSION: u8 = 2;
/// The format [`encode`] writes when no target has delivery options.
const VERSION_PLAIN: u8 = 1;

const TAG_TELEMETRY: u8 = 0;
const TAG_MODULE_OUTPUT: u8 = 1;
const TAG_TWIN_CHANGE: u8 = 2;

/// A stored message with the delivery facts that travel with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// When the router accepted the message.
    pub enqueued_at: UnixMillis,
    /// Endpoints whose expiry differs from the store-level expiry, with their own.
    pub expiry_overrides: Vec<ExpiryOverride>,
    /// The message itself.
    pub message: Message,
}

/// One endpoint's expiry, where it differs from the expiry the message was stored with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryOverride {
    /// The endpoint's id, as it was at enqueue.
    pub endpoint: EndpointId,
    /// When the message expires for that endpoint (`None`: never).
    pub expiry: Option<UnixMillis>,
}

/// One endpoint's delivery extensions, as stamped at enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointOptions {
    /// The endpoint's id, as it was at enqueue.
    pub endpoint: EndpointId,
    /// The extensions (never all unset: such an entry is not written).
    pub options: DeliveryOptions,
}

/// The delivery extensions that apply to `endpoint` among those stamped on a message (the
/// default when none were).
pub fn options_for(options: &[EndpointOptions], endpoint: &EndpointId) -> DeliveryOptions {
    options
        .iter()
        .find(|o| &o.endpoint == endpoint)
        .map_or_else(DeliveryOptions::default, |o| o.options)
}

impl Envelope {
    /// The expiry that applies to `endpoint`: its override, else `stored` (the expiry the store
    /// holds for the message).
    pub fn expiry_for(
        &self,
        endpoint: &EndpointId,
        stored: Option<UnixMillis>,
    ) -> Option<UnixMillis> {
        self.expiry_overrides
            .iter()
            .find(|o| &o.endpoint == endpoint)
            .map_or(stored, |o| o.expiry)
    }
}

/// Bytes that are not an envelope this build can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the structure does.
    #[error("truncated: needed {needed} more byte(s) at byte {at}")]
    Truncated {
        /// Where the missing bytes start.
        at: usize,
        /// How many more were needed.
        needed: usize,
    },
    /// The version byte names a format this build does not know.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// A tag byte (source kind, presence flag, system property) out of range.
    #[error("invalid {what} tag {tag} at byte {at}")]
    InvalidTag {
        /// Which tag.
        what: &'static str,
        /// The value found.
        tag: u8,
        /// Where.
        at: usize,
    },
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 at byte {at}")]
    InvalidUtf8 {
        /// Where the string starts.
        at: usize,
    },
    /// Bytes left over after the body.
    #[error("{0} trailing byte(s)")]
    Trailing(usize),
}

/// A message that the format cannot hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field longer (or a list with more entries) than its length prefix can count.
    #[error("{what} too long for the stored format")]
    TooLong {
        /// Which field.
        what: &'static str,
    },
}

/// Serializes `env`, without delivery extensions (format version 1).
pub fn encode(env: &Envelope) -> Result<Bytes, EncodeError> {
    encode_with_options(env, &[])
}

/// Serializes `env` with the delivery extensions of its targets (entries without any are left
/// out; version 1 when none is left, else version 2).
pub fn encode_with_options(
    env: &Envelope,
    delivery_options: &[EndpointOptions],
) -> Result<Bytes, EncodeError> {
    let msg = &env.message;
    let mut out = BytesMut::with_capacity(64 + msg.body().len());
    let options: Vec<&EndpointOptions> = delivery_options
        .iter()
        .filter(|o| !o.options.is_default())
        .collect();
    out.put_u8(if options.is_empty() {
        VERSION_PLAIN
    } else {
        VERSION
    });
    out.put_u64_le(env.enqueued_at.0);
    out.put_u16_le(len_u16(env.expiry_overrides.len(), "expiry overrides")?);
    for o in &env.expiry_overrides {
        put_str(&mut out, o.endpoint.as_str())?;
        out.put_u64_le(expiry_raw(o.expiry));
    }
    if !options.is_empty() {
        out.put_u16_le(len_u16(options.len(), "delivery options")?);
        for o in options {
            put_str(&mut out, o.endpoint.as_str())?;
            out.put_u32_le(o.options.set_aside_after.unwrap_or(0));
            out.put_u32_le(o.options.live_first_secs.unwrap_or(0));
        }
    }
    put_source(&mut out, msg.source())?;
    let system = msg.system_properties();
    out.put_u16_le(len_u16(system.len(), "system properties")?);
    for (key, value) in system {
        out.put_u8(system_index(*key));
        put_str(&mut out, value)?;
    }
    let props = msg.properties();
    out.put_u32_le(len_u32(props.len(), "application properties")?);
    for (key, value) in props {
        put_str(&mut out, key)?;
        put_str(&mut out, value)?;
    }
    out.put_u32_le(len_u32(msg.body().len(), "body")?);
    out.extend_from_slice(msg.body());
    Ok(out.freeze())
}

/// Reads an envelope back, ignoring delivery extensions. Never panics, whatever `bytes` holds.
pub fn decode(bytes: &Bytes) -> Result<Envelope, DecodeError> {
    decode_with_options(bytes).map(|(env, _)| env)
}

/// Reads an envelope back with the delivery extensions stamped on it. Never panics, whatever
/// `bytes` holds.
pub fn decode_with_options(bytes: &Bytes) -> Result<(Envelope, Vec<EndpointOptions>), DecodeError> {
    let mut r = Reader { buf: bytes, at: 0 };
    let version = r.u8()?;
    if version != VERSION && version != VERSION_PLAIN {
        return Err(DecodeError::UnknownVersion(version));
    }
    let enqueued_at = UnixMillis(r.u64()?);
    let n = usize::from(r.u16()?);
    // Each override takes at least 12 bytes, so `n` is bounded by the input before allocating.
    let mut expiry_overrides = Vec::with_capacity(n.min(r.remaining() / 12));
    for _ in 0..n {
        let endpoint = EndpointId::from_stored(r.string()?);
        let expiry = expiry_from_raw(r.u64()?);
        expiry_overrides.push(ExpiryOverride { endpoint, expiry });
    }
    let mut delivery_options = Vec::new();
    if version == VERSION {
        let n = usize::from(r.u16()?);
        // Each entry takes at least 12 bytes.
        delivery_options.reserve(n.min(r.remaining() / 12));
        for _ in 0..n {
            let endpoint = EndpointId::from_stored(r.string()?);
            let nonzero = |n: u32| (n != 0).then_some(n);
            let options = DeliveryOptions {
                set_aside_after: nonzero(r.u32()?),
                live_first_secs: nonzero(r.u32()?),
            };
            delivery_options.push(EndpointOptions { endpoint, options });
        }
    }
    let source = read_source(&mut r)?;
    let mut message = Message::new(source, Bytes::new());
    for _ in 0..r.u16()? {
        let at = r.at;
        let tag = r.u8()?;
        let key =
            SystemProperty::ALL
                .get(usize::from(tag))
                .copied()
                .ok_or(DecodeError::InvalidTag {
                    what: "system property",
                    tag,
                    at,
                })?;
        message = message.with_system_property(key, r.string()?);
    }
    for _ in 0..r.u32()? {
        let key = r.string()?;
        message = message.with_property(key, r.string()?);
    }
    let body_len = r.u32()? as usize;
    let start = r.take(body_len)?;
    let body = bytes.slice(start..start + body_len);
    if r.remaining() > 0 {
        return Err(DecodeError::Trailing(r.remaining()));
    }
    let env = Envelope {
        enqueued_at,
        expiry_overrides,
        message: rebuild_with_body(message, body),
    };
    Ok((env, delivery_options))
}

/// `Message` has no body setter: rebuild it around the shared body slice.
fn rebuild_with_body(parts: Message, body: Bytes) -> Message {
    let mut msg = Message::new(parts.source().clone(), body);
    for (key, value) in parts.system_properties() {
        msg = msg.with_system_property(*key, value.clone());
    }
    for (key, value) in parts.properties() {
        msg = msg.with_property(key.clone(), value.clone());
    }
    msg
}

fn put_source(out: &mut BytesMut, source: &Source) -> Result<(), EncodeError> {
    match source {
        Source::Telemetry { device } => {
            out.put_u8(TAG_TELEMETRY);
            put_str(out, device.as_str())
        }
        Source::ModuleOutput {
            device,
            module,
            output,
        } => {
            out.put_u8(TAG_MODULE_OUTPUT);
            put_str(out, device.as_str())?;
            put_str(out, module.as_str())?;
            put_opt_str(out, output.as_ref().map(OutputName::as_str))
        }
        Source::TwinChange { device, module } => {
            out.put_u8(TAG_TWIN_CHANGE);
            put_str(out, device.as_str())?;
            put_opt_str(out, module.as_ref().map(ModuleId::as_str))
        }
    }
}

fn read_source(r: &mut Reader<'_>) -> Result<Source, DecodeError> {
    let at = r.at;
    let tag = r.u8()?;
    let device = DeviceId::new(r.string()?);
    match tag {
        TAG_TELEMETRY => Ok(Source::Telemetry { device }),
        TAG_MODULE_OUTPUT => Ok(Source::ModuleOutput {
            device,
            module: ModuleId::new(r.string()?),
            output: r.opt_string()?.map(OutputName::new),
        }),
        TAG_TWIN_CHANGE => Ok(Source::TwinChange {
            device,
            module: r.opt_string()?.map(ModuleId::new),
        }),
        tag => Err(DecodeError::InvalidTag {
            what: "source",
            tag,
            at,
        }),
    }
}

fn system_index(key: SystemProperty) -> u8 {
    let index = SystemProperty::ALL
        .iter()
        .position(|p| *p == key)
        .unwrap_or_default();
    u8::try_from(index).unwrap_or_default()
}

fn expiry_raw(expiry: Option<UnixMillis>) -> u64 {
    expiry.map_or(0, |e| e.0.max(1))
}

fn expiry_from_raw(raw: u64) -> Option<UnixMillis> {
    (raw != 0).then_some(UnixMillis(raw))
}

fn len_u16(len: usize, what: &'static str) -> Result<u16, EncodeError> {
    u16::try_from(len).map_err(|_| EncodeError::TooLong { what })
}

fn len_u32(len: usize, what: &'static str) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong { what })
}

fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    out.put_u32_le(len_u32(s.len(), "string")?);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_str(out: &mut BytesMut, s: Option<&str>) -> Result<(), EncodeError> {
    match s {
        None => {
            out.put_u8(0);
            Ok(())
        }
        Some(s) => {
            out.put_u8(1);
            put_str(out, s)
        }
    }
}

/// A cursor that checks every read against the input's end.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// Consumes `n` bytes and returns where they start.
    fn take(&mut self, n: usize) -> Result<usize, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                at: self.at,
                needed: n - self.remaining(),
            });
        }
        let start = self.at;
        self.at += n;
        Ok(start)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let start = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[start..start + N]);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        let start = self.take(len)?;
        std::str::from_utf8(&self.buf[start..start + len])
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { at: start })
    }

    fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        let at = self.at;
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            tag => Err(DecodeError::InvalidTag {
                what: "presence",
                tag,
                at,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        let source = Source::ModuleOutput {
            device: DeviceId::new("edge"),
            module: ModuleId::new("filter"),
            output: Some(OutputName::new("alerts")),
        };
        let message = Message::new(source, "{\"t\":21}")
            .with_property("level", "high")
            .with_system_property(SystemProperty::ContentType, "application/json");
        Envelope {
            enqueued_at: UnixMillis(1_700_000_000_000),
            expiry_overrides: vec![ExpiryOverride {
                endpoint: EndpointId::from_stored("iothub".into()),
                expiry: Some(UnixMillis(1_700_000_010_000)),
            }],
            message,
        }
    }

    fn sample_options() -> Vec<EndpointOptions> {
        vec![EndpointOptions {
            endpoint: EndpointId::from_stored("iothub".into()),
            options: DeliveryOptions {
                set_aside_after: Some(3),
                live_first_secs: Some(60),
            },
        }]
    }

    #[test]
    fn delivery_options_are_written_in_version_2_and_only_then() {
        let env = sample();
        let plain = encode(&env).unwrap();
        assert_eq!(plain[0], 1);
        assert_eq!(decode_with_options(&plain).unwrap(), (env.clone(), vec![]));
        let unset = [EndpointOptions {
            endpoint: EndpointId::from_stored("x".into()),
            options: DeliveryOptions::default(),
        }];
        assert_eq!(encode_with_options(&env, &unset).unwrap(), plain);
        let with = encode_with_options(&env, &sample_options()).unwrap();
        assert_eq!(with[0], 2);
        assert_eq!(
            decode_with_options(&with).unwrap(),
            (env.clone(), sample_options())
        );
        assert_eq!(decode(&with).unwrap(), env);
    }

    #[test]
    fn delivery_options_apply_only_to_their_endpoint() {
        let options = sample_options();
        let up = options_for(&options, &crate::route::Endpoint::Upstream.id());
        assert_eq!(up.live_first_secs, Some(60));
        let other = crate::route::Endpoint::ModuleInput {
            module: ModuleId::new("m"),
            input: crate::message::InputName::new("i"),
        };
        assert!(options_for(&options, &other.id()).is_default());
    }

    #[test]
    fn an_envelope_survives_encode_and_decode() {
        let env = sample();
        assert_eq!(decode(&encode(&env).unwrap()).unwrap(), env);
    }

    #[test]
    fn the_decoded_body_shares_the_stored_buffer() {
        let bytes = encode(&sample()).unwrap();
        let env = decode(&bytes).unwrap();
        let body = env.message.body();
        let inside = bytes.as_ptr_range();
        assert!(inside.contains(&body.as_ptr()));
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let mut bytes = encode(&sample()).unwrap().to_vec();
        bytes[0] = 9;
        assert_eq!(
            decode(&Bytes::from(bytes)),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample()).unwrap();
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes.slice(..len)).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&sample()).unwrap().to_vec();
        bytes.push(0);
        assert_eq!(decode(&Bytes::from(bytes)), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn an_override_applies_only_to_its_endpoint() {
        let env = sample();
        let stored = Some(UnixMillis(5));
        let upstream = crate::route::Endpoint::Upstream.id();
        assert_eq!(
            env.expiry_for(&upstream, stored),
            Some(UnixMillis(1_700_000_010_000))
        );
        let other = crate::route::Endpoint::ModuleInput {
            module: ModuleId::new("m"),
            input: crate::message::InputName::new("i"),
        }
        .id();
        assert_eq!(env.expiry_for(&other, stored), stored);
    }

    fn source() -> impl Strategy<Value = Source> {
        let s = || ".{0,12}";
        prop_oneof![
            s().prop_map(|d| Source::Telemetry {
                device: DeviceId::new(d)
            }),
            (s(), s(), proptest::option::of(s())).prop_map(|(d, m, o)| Source::ModuleOutput {
                device: DeviceId::new(d),
                module: ModuleId::new(m),
                output: o.map(OutputName::new),
            }),
            (s(), proptest::option::of(s())).prop_map(|(d, m)| Source::TwinChange {
                device: DeviceId::new(d),
                module: m.map(ModuleId::new),
            }),
        ]
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            any::<u64>(),
            proptest::collection::vec((".{0,8}", proptest::option::of(1u64..)), 0..4),
            source(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
            proptest::collection::btree_map(0..SystemProperty::ALL.len(), ".{0,8}", 0..4),
        )
            .prop_map(|(at, overrides, source, body, props, system)| {
                let mut message = Message::new(source, body);
                for (k, v) in props {
                    message = message.with_property(k, v);
                }
                for (i, v) in system {
                    message = message.with_system_property(SystemProperty::ALL[i], v);
                }
                Envelope {
                    enqueued_at: UnixMillis(at),
                    expiry_overrides: overrides
                        .into_iter()
                        .map(|(endpoint, e)| ExpiryOverride {
                            endpoint: EndpointId::from_stored(endpoint),
                            expiry: e.map(UnixMillis),
                        })
                        .collect(),
                    message,
                }
            })
    }

    fn options() -> impl Strategy<Value = Vec<EndpointOptions>> {
        proptest::collection::vec(
            (
                ".{0,8}",
                proptest::option::of(1u32..),
                proptest::option::of(1u32..),
            ),
            0..3,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(endpoint, s, l)| EndpointOptions {
                    endpoint: EndpointId::from_stored(endpoint),
                    options: DeliveryOptions {
                        set_aside_after: s,
                        live_first_secs: l,
                    },
                })
                .filter(|o| !o.options.is_default())
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_envelope_round_trips(env in envelope()) {
            let bytes = encode(&env).unwrap();
            prop_assert_eq!(decode(&bytes).unwrap(), env);
        }

        #[test]
        fn any_envelope_with_options_round_trips(env in envelope(), opts in options()) {
            let bytes = encode_with_options(&env, &opts).unwrap();
            prop_assert_eq!(decode_with_options(&bytes).unwrap(), (env, opts));
        }

        #[test]
        fn decoding_a_corrupted_envelope_with_options_never_panics(
            env in envelope(),
            opts in options(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode_with_options(&env, &opts).unwrap().to_vec();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            let _ = decode_with_options(&Bytes::from(bytes));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn decoding_a_corrupted_envelope_never_panics(
            env in envelope(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode(&env).unwrap().to_vec();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= b;
            }
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
