//! What a module's bytes reach in the MQTT head, without a socket: the packet reader
//! (`rumqttc::mqttbytes::v4::Packet::read` with the head's packet limit, fed in chunks as a
//! socket would), then the head's pure per-connection state: CONNECT username and client id,
//! topics, the property bag, QoS 1 acknowledgements (`InboundAcks`), deliveries in flight
//! (`Outbound`), subscriptions and keep-alive.
//!
//! Checked beyond "no panic, no hang, bounded allocation":
//! - chunked reading decodes exactly what reading all bytes at once decodes;
//! - a message's sender is the authenticated identity whatever its bag says, and the delivery
//!   bag decodes back to every forwarded property;
//! - PUBACKs are released once per packet id in flight, in arrival order, only when durable;
//! - a PUBACK from the module releases exactly the delivery sent with that id.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};
use hub::mqtt::session_state::{self, AckToken, InboundAcks, InboundQos, StateError};
use hub::mqtt::topics::{self, InboundTopic, SubscribeDecision, TwinOp};
use hub::mqtt::username;
use hub::property_bag as bag;
use libfuzzer_sys::fuzz_target;
use router::{DeviceId, InputName, ModuleId, SystemProperty};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::{Error as CodecError, QoS};

/// The head's packet limit (`mqtt::connection`): a full-size body plus 64 KiB.
const MAX_PACKET_BYTES: usize = hub::head::MAX_MESSAGE_BYTES + 64 * 1024;
/// The head's delivery window.
const DELIVERY_WINDOW: u16 = 100;

/// Decodes `stream` as the head reads a socket: `chunk` bytes arrive at a time.
fn read_packets(stream: &[u8], chunk: usize) -> (Vec<Packet>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut packets = Vec::new();
    loop {
        match Packet::read(&mut buf, MAX_PACKET_BYTES) {
            Ok(p) => packets.push(p),
            Err(CodecError::InsufficientBytes(_)) => {
                if rest.is_empty() {
                    return (packets, None);
                }
                let n = chunk.min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) => return (packets, Some(format!("{e:?}"))),
        }
        assert!(packets.len() <= stream.len(), "more packets than bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    let (knob, stream) = edgehub_fuzz::knob(data);
    let chunk = usize::from(knob % 64) + 1;
    let whole = read_packets(stream, stream.len().max(1));
    let chunked = read_packets(stream, chunk);
    assert_eq!(
        whole, chunked,
        "chunked reading must decode what whole reading decodes"
    );
    let (packets, _end) = whole;
    serve(packets, knob);
});

/// What the head does with the packets of one connection, minus the router and the socket.
fn serve(packets: Vec<Packet>, knob: u8) {
    let mut packets = packets.into_iter();
    // CONNECT first, authenticated by username and client id (the SAS token needs a key).
    let Some(Packet::Connect(connect)) = packets.next() else {
        return;
    };
    let timeout = session_state::keep_alive_timeout(connect.keep_alive);
    assert!(!timeout.is_zero() && timeout <= session_state::MAX_KEEP_ALIVE_TIMEOUT);
    let Some(login) = &connect.login else { return };
    let Ok(user) = username::parse(&login.username) else {
        return;
    };
    assert!(!user.device.as_str().trim().is_empty());
    assert!(!user.api_version.trim().is_empty());
    if connect.client_id != user.client_id() {
        return;
    }
    let Some(module) = user.module.clone() else {
        return;
    };
    let device = user.device.clone();

    let mut acks = InboundAcks::new(session_state::DEFAULT_MAX_PENDING_ACKS);
    // The model: packet ids awaiting a PUBACK, in arrival order, and whether each is durable.
    let mut awaiting: VecDeque<Awaiting> = VecDeque::new();
    let mut unresolved: VecDeque<AckToken> = VecDeque::new();
    let mut deliveries = session_state::Outbound::<u64>::new(DELIVERY_WINDOW);
    let mut sent: BTreeMap<u16, u64> = BTreeMap::new();
    let mut next_delivery = 0u64;
    let mut subscriptions: BTreeSet<String> = BTreeSet::new();

    for packet in packets {
        // One delivery to the module per packet read, while the window has room.
        if deliveries.can_send() {
            let pkid = deliveries.on_send(next_delivery).expect("window has room");
            assert_ne!(pkid, 0, "packet id 0 is not MQTT");
            assert!(
                sent.insert(pkid, next_delivery).is_none(),
                "packet id {pkid} reused in flight"
            );
            next_delivery += 1;
        }
        assert!(deliveries.len() <= usize::from(DELIVERY_WINDOW));
        match packet {
            Packet::Publish(publish) => {
                match session_state::inbound_qos(publish.qos) {
                    InboundQos::CloseConnection => return,
                    InboundQos::NoAck | InboundQos::AckWhenDurable => {}
                }
                if publish.payload.len() > hub::head::MAX_MESSAGE_BYTES {
                    return;
                }
                match topics::parse_publish(&publish.topic) {
                    Ok(InboundTopic::Events(topic)) => {
                        if !topic.is_from(device.as_str(), Some(module.as_str())) {
                            return;
                        }
                        check_message(&device, &module, topic.bag, publish.payload.clone());
                    }
                    Ok(InboundTopic::TwinRequest { op, rid }) => {
                        // The twin core takes any payload without panicking; a refusal has a
                        // status, and an accepted patch stays within IoT Hub's limits.
                        if op == TwinOp::PatchReported {
                            match hub::twin::Twin::default().with_reported_patch(&publish.payload) {
                                Ok(twin) => assert!(
                                    serde_json::to_vec(&twin.reported).map_or(0, |b| b.len())
                                        <= hub::twin::document::MAX_REPORTED_BYTES
                                ),
                                Err(e) => assert!(matches!(e.status(), 400 | 413)),
                            }
                        }
                        if let Some(rid) = rid {
                            let _ = topics::twin_response_topic(200, rid);
                        }
                    }
                    Ok(_) | Err(_) => {}
                }
                if publish.qos == QoS::AtLeastOnce
                    && !on_qos1(
                        &mut acks,
                        &mut awaiting,
                        &mut unresolved,
                        publish.pkid,
                        publish.dup,
                        knob,
                    )
                {
                    return;
                }
            }
            Packet::PubAck(ack) => match deliveries.on_puback(ack.pkid) {
                Ok(item) => {
                    assert_eq!(
                        sent.remove(&ack.pkid),
                        Some(item),
                        "PUBACK released another delivery"
                    );
                }
                Err(StateError::Unsolicited(p)) => {
                    assert_eq!(p, ack.pkid);
                    assert!(
                        !sent.contains_key(&ack.pkid),
                        "PUBACK of an id in flight refused"
                    );
                }
                Err(e) => panic!("unexpected {e}"),
            },
            Packet::Subscribe(sub) => {
                for f in &sub.filters {
                    let decision = topics::authorize_subscribe(
                        &f.path,
                        device.as_str(),
                        Some(module.as_str()),
                    );
                    if let Some(q) = decision.granted_qos(f.qos) {
                        assert_ne!(q, QoS::ExactlyOnce, "QoS 2 granted");
                        subscriptions.insert(f.path.clone());
                    }
                    if decision == SubscribeDecision::ModuleInputs {
                        let own = format!("devices/{device}/modules/{module}/");
                        assert!(
                            f.path.starts_with(&own),
                            "{} subscribed to {:?}",
                            own,
                            f.path
                        );
                    }
                }
            }
            Packet::Unsubscribe(unsub) => {
                for t in &unsub.topics {
                    subscriptions.remove(t);
                }
            }
            Packet::PingReq => {}
            _ => return,
        }
    }
    // The connection ends: every delivery in flight goes back, in send order.
    let back = deliveries.clear();
    let mut expected: Vec<u64> = sent.values().copied().collect();
    expected.sort_unstable();
    assert_eq!(back, expected, "deliveries in flight go back in send order");
}

/// One QoS 1 publish awaiting its PUBACK, in the model.
struct Awaiting {
    token: AckToken,
    pkid: u16,
    durable: bool,
}

/// A QoS 1 PUBLISH: the head's acknowledgement state against a model. Returns false if the
/// connection must close.
fn on_qos1(
    acks: &mut InboundAcks,
    awaiting: &mut VecDeque<Awaiting>,
    unresolved: &mut VecDeque<AckToken>,
    pkid: u16,
    dup: bool,
    knob: u8,
) -> bool {
    // While full, the head stops reading until the store answers: the oldest becomes durable.
    while acks.is_full() {
        let token = unresolved
            .pop_front()
            .expect("full with nothing unresolved");
        durable(acks, awaiting, token);
    }
    match acks.on_publish(pkid) {
        Ok(token) => {
            assert!(
                !awaiting.iter().any(|a| a.pkid == pkid),
                "id {pkid} accepted twice"
            );
            awaiting.push_back(Awaiting {
                token,
                pkid,
                durable: false,
            });
            unresolved.push_back(token);
        }
        Err(StateError::PacketIdInUse(p)) => {
            assert_eq!(p, pkid);
            assert!(
                awaiting.iter().any(|a| a.pkid == pkid),
                "id {pkid} refused but not pending"
            );
            // A retransmission (DUP) is dropped; a reuse without DUP closes the connection.
            return dup;
        }
        Err(e) => panic!("unexpected {e}"),
    }
    // The store answers in an order the input chooses: newest first or oldest first.
    if pkid & 3 == u16::from(knob & 3) {
        loop {
            let next = if pkid & 4 == 0 {
                unresolved.pop_back()
            } else {
                unresolved.pop_front()
            };
            let Some(token) = next else { break };
            durable(acks, awaiting, token);
        }
    }
    true
}

/// The store made `token`'s message durable: the PUBACKs released must be exactly the durable
/// prefix of the arrival order, each id once.
fn durable(acks: &mut InboundAcks, awaiting: &mut VecDeque<Awaiting>, token: AckToken) {
    let released = acks.on_durable(token).expect("pending token");
    let entry = awaiting
        .iter_mut()
        .find(|a| a.token == token)
        .expect("token awaiting in the model");
    entry.durable = true;
    let mut expected = Vec::new();
    while awaiting.front().is_some_and(|a| a.durable) {
        if let Some(a) = awaiting.pop_front() {
            expected.push(a.pkid);
        }
    }
    assert_eq!(
        released, expected,
        "PUBACKs must be the durable prefix in arrival order"
    );
    assert_eq!(acks.pending(), awaiting.len());
}

/// The message built from a telemetry bag carries the authenticated sender only, and its
/// delivery bag decodes back to every forwarded property.
fn check_message(device: &DeviceId, module: &ModuleId, raw_bag: &str, payload: Bytes) {
    let message = bag::message_from_publish(device, Some(module), raw_bag, payload);
    assert_eq!(message.source().device(), device);
    assert_eq!(message.source().module(), Some(module));
    for key in message.properties().keys() {
        assert!(
            !bag::is_reserved_key(key),
            "reserved key {key:?} kept as a property"
        );
    }
    let input = InputName::new("fuzz");
    let Ok(topic) = topics::delivery_topic_and_bag(device, module, &input, &message) else {
        return;
    };
    let prefix = format!("devices/{device}/modules/{module}/inputs/fuzz/");
    let delivered = topic
        .strip_prefix(&prefix)
        .expect("delivery topic names the receiver");
    let decoded = bag::decode(delivered);
    let properties: BTreeMap<String, String> = decoded.properties.into_iter().collect();
    assert_eq!(
        &properties,
        message.properties(),
        "application properties survive delivery"
    );
    let system: BTreeMap<SystemProperty, String> = decoded.system.into_iter().collect();
    let forwarded: BTreeMap<SystemProperty, String> = message
        .system_properties()
        .iter()
        .filter(|(p, _)| **p != SystemProperty::InterfaceId)
        .map(|(p, v)| (*p, v.clone()))
        .collect();
    assert_eq!(system, forwarded, "system properties survive delivery");
}
