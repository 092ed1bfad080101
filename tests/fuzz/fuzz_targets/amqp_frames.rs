//! What a client's bytes reach in the AMQP head after the protocol header, without a socket:
//! fe2o3-amqp's frame layer exactly as its transport decodes it (a 4-byte length, then
//! `FrameDecoder` for AMQP frames or the SASL `FrameCodec`), the message decoding of a transfer
//! (`decode_message_from_reader`, as `Receiver::recv::<Body<Value>>` does), batch splitting and
//! the head's message conversion (`hub::amqp::convert`).
//!
//! Frames pass the hub's own guard first (`hub::amqp::frame_guard`), as in the head, and each
//! transfer's message passes `check_message`: the guard exists because this target found that
//! fe2o3 panics on a frame shorter than its header, and that serde_amqp allocates whatever
//! length a value in a frame or message declares.
//!
//! The first byte picks the layer: AMQP frames, SASL frames, or one transfer payload (plain or
//! batched). Checked beyond "no panic, no hang, bounded allocation":
//! - the sender of a converted message is the authenticated identity, whatever the message says;
//! - `stored_size` never undercounts what the router stores (the head refuses oversized
//!   messages by it), and the stored envelope decodes back to the same message;
//! - a message delivered to a module (egress) converts back (ingress) to the same body,
//!   properties and system properties, less those egress does not forward.

#![no_main]

use bytes::BytesMut;
use fe2o3_amqp::frames::amqp::{FrameBody, FrameDecoder};
use fe2o3_amqp::frames::sasl::FrameCodec as SaslCodec;
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{Body, Message as AmqpMessage};
use fe2o3_amqp::types::primitives::Value;
use hub::amqp::convert::{self, DeliveryStamp};
use hub::amqp::frame_guard;
use libfuzzer_sys::fuzz_target;
use router::{DeviceId, InputName, ModuleId, SystemProperty};
use serde_amqp::read::SliceReader;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

/// fe2o3's default `max-frame-size` (what the hub's Open announces).
const MAX_FRAME_BYTES: usize = 256 * 1024;
/// AMQP's minimum `max-frame-size`, in force before Open (and for SASL).
const MIN_MAX_FRAME_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    let (knob, rest) = edgehub_fuzz::knob(data);
    match knob % 3 {
        0 => amqp_frames(rest),
        1 => sasl_frames(rest),
        _ => transfer(rest, knob & 4 != 0),
    }
});

/// The length-delimited layer of fe2o3's transport, as it builds it.
fn length_codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(max)
        .length_adjustment(-4)
        .new_codec()
}

/// Each frame the length layer yields, as fe2o3's `Transport` hands it on, behind the hub's
/// frame guard (`hub::amqp::frame_guard`, which hands on whole frames that pass
/// its `FrameChecker`, and ends the connection at the first that does not).
fn frames(stream: &[u8], max: usize, mut each: impl FnMut(BytesMut)) {
    let mut codec = length_codec(max);
    let mut checker = frame_guard::FrameChecker::new();
    let mut rest = stream;
    while let Some(size) = rest.get(..4) {
        let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
        let Some(frame) = rest.get(..size.max(4)) else {
            // Never complete: the guard hands nothing on.
            return;
        };
        if checker.check(frame).is_err() {
            return;
        }
        let mut src = BytesMut::from(frame);
        match codec.decode(&mut src) {
            Ok(Some(body)) => each(body),
            _ => return,
        }
        rest = &rest[size..];
    }
}

fn amqp_frames(stream: &[u8]) {
    frames(stream, MAX_FRAME_BYTES, |mut frame| {
        let mut decoder = FrameDecoder {};
        if let Ok(Some(frame)) = decoder.decode(&mut frame) {
            if let FrameBody::Transfer { payload, .. } = frame.into_body() {
                transfer(&payload, false);
            }
        }
    });
}

fn sasl_frames(stream: &[u8]) {
    frames(stream, MIN_MAX_FRAME_BYTES, |mut frame| {
        let _ = SaslCodec {}.decode(&mut frame);
    });
}

/// One transfer's payload on an events link of module `d/m`, as `links::route` converts it.
fn transfer(payload: &[u8], batched: bool) {
    // The guard checks every message a transfer carries before the link decodes it.
    if frame_guard::check_message(payload).is_err() {
        return;
    }
    let Ok(message) =
        <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(SliceReader::new(payload))
    else {
        return;
    };
    let parts = if batched {
        match convert::split_batch(&message) {
            Ok(parts) => parts,
            Err(_) => return,
        }
    } else {
        vec![message]
    };
    let (device, module) = (DeviceId::new("d"), ModuleId::new("m"));
    for part in &parts {
        let Ok(m) = convert::message_from_amqp(&device, &module, part) else {
            continue;
        };
        assert_eq!(m.source().device(), &device);
        assert_eq!(m.source().module(), Some(&module));
        stored(&m);
        egress_round_trip(&m);
    }
}

/// The router's stored form: never larger than `stored_size` says (plus the envelope's fixed
/// header), and it decodes back to the message.
fn stored(m: &router::Message) {
    let envelope = router::codec::Envelope {
        enqueued_at: store::UnixMillis(0),
        expiry_overrides: Vec::new(),
        message: m.clone(),
    };
    let Ok(encoded) = router::codec::encode(&envelope) else {
        return;
    };
    assert!(
        encoded.len() <= convert::stored_size(m) + 64,
        "stored {} bytes, counted {}",
        encoded.len(),
        convert::stored_size(m)
    );
    let decoded = router::codec::decode(&encoded).expect("the router's own bytes decode");
    assert_eq!(
        decoded.message, *m,
        "the stored envelope decodes to the same message"
    );
}

/// Delivered to a module and sent back by it, a message keeps its body and properties.
fn egress_round_trip(m: &router::Message) {
    let stamp = DeliveryStamp {
        lock_token: [7; 16],
        enqueued_ms: 0,
        sequence: 1,
        delivery_count: 0,
    };
    let out = convert::amqp_from_message(m, &InputName::new("in"), stamp);
    let bytes = serde_amqp::to_vec(&Serializable(out)).expect("egress encodes");
    let back: AmqpMessage<Body<Value>> =
        <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(SliceReader::new(&bytes))
            .expect("egress decodes");
    let again = convert::message_from_amqp(&DeviceId::new("d"), &ModuleId::new("m"), &back)
        .expect("egress converts back");
    assert_eq!(again.body(), m.body());
    let properties: Vec<_> = m
        .properties()
        .iter()
        .filter(|(k, _)| !k.starts_with("$."))
        .collect();
    assert_eq!(again.properties().iter().collect::<Vec<_>>(), properties);
    let system: Vec<_> = m
        .system_properties()
        .iter()
        .filter(|(p, _)| !matches!(p, SystemProperty::ExpiryTime | SystemProperty::InterfaceId))
        .collect();
    assert_eq!(again.system_properties().iter().collect::<Vec<_>>(), system);
}
