//! Writes the seed corpora of the fuzz targets (`tests/fuzz/corpus/<target>/`) with the real
//! encoders: MQTT packets as rumqttc writes them, AMQP frames and messages as serde_amqp
//! encodes fe2o3's types, and store segments written by the store itself. Route and manifest
//! seeds are text from the repository and are copied by `scripts/fuzz.sh --seeds`.
//!
//! Usage: `edgehub-fuzz-seedgen <corpus dir>`.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    Accepted, ApplicationProperties, Body, Data, DeliveryState, Message, MessageId, Properties,
    Source, Target,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use fe2o3_amqp_types::sasl::SaslInit;
use rumqttc::mqttbytes::v4::{
    Connect, Packet, PubAck, Publish, Subscribe, SubscribeFilter, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use store::{Epoch, QueueName, Store, StoreOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: seedgen <corpus dir>")?,
    );
    mqtt(&root.join("mqtt_packets"))?;
    amqp(&root.join("amqp_frames"))?;
    segments(&root.join("store_recovery"))?;
    Ok(())
}

fn write(dir: &Path, name: &str, knob: u8, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut out = vec![knob];
    out.extend_from_slice(bytes);
    fs::write(dir.join(name), out)?;
    Ok(())
}

// ---- MQTT ----------------------------------------------------------------------------------

fn packets(list: &[Packet]) -> Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    for p in list {
        p.write(&mut buf, usize::MAX)?;
    }
    Ok(buf.to_vec())
}

fn connect(username: &str, client_id: &str, clean: bool) -> Packet {
    let mut c = Connect::new(client_id);
    c.keep_alive = 240;
    c.clean_session = clean;
    c.set_login(
        username,
        "SharedAccessSignature sr=hub.example%2Fdevices%2Fdev1%2Fmodules%2Fmod1&sig=c2ln&se=4102444800",
    );
    Packet::Connect(c)
}

fn publish(topic: &str, qos: QoS, pkid: u16, dup: bool, payload: &[u8]) -> Packet {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    Packet::Publish(p)
}

fn mqtt(dir: &Path) -> Result<()> {
    let user =
        "hub.example/dev1/mod1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F2.13";
    let events = "devices/dev1/modules/mod1/messages/events/";
    let session = packets(&[
        connect(user, "dev1/mod1", false),
        Packet::Subscribe(Subscribe::new_many([
            SubscribeFilter::new(
                "devices/dev1/modules/mod1/inputs/#".into(),
                QoS::AtLeastOnce,
            ),
            SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
            SubscribeFilter::new("devices/other/modules/x/inputs/#".into(), QoS::ExactlyOnce),
        ])),
        publish(
            &format!(
                "{events}%24.ct=application%2Fjson&%24.ce=utf-8&%24.on=out1&%24.mid=m-1&temp=30"
            ),
            QoS::AtLeastOnce,
            1,
            false,
            br#"{"temperature":30.5}"#,
        ),
        publish(
            &format!("{events}%24.on=out1"),
            QoS::AtLeastOnce,
            2,
            false,
            b"second",
        ),
        Packet::PubAck(PubAck::new(1)),
        Packet::PingReq,
        publish(
            "devices/dev1/modules/mod1/messages/events",
            QoS::AtMostOnce,
            0,
            false,
            b"qos0",
        ),
        Packet::Unsubscribe(Unsubscribe::new("devices/dev1/modules/mod1/inputs/#")),
        Packet::Disconnect,
    ])?;
    write(dir, "session", 0x07, &session)?;
    write(dir, "session-bytewise", 0x00, &session)?;
    // A QoS 1 publish resent with DUP before its PUBACK, then its id reused (issue 11 item 1).
    let dup = packets(&[
        connect(user, "dev1/mod1", true),
        publish(
            &format!("{events}%24.on=out1"),
            QoS::AtLeastOnce,
            7,
            false,
            b"first",
        ),
        publish(
            &format!("{events}%24.on=out1"),
            QoS::AtLeastOnce,
            7,
            true,
            b"first",
        ),
        publish(
            &format!("{events}%24.on=out1"),
            QoS::AtLeastOnce,
            8,
            false,
            b"next",
        ),
        publish(
            &format!("{events}%24.on=out1"),
            QoS::AtLeastOnce,
            7,
            false,
            b"reuse",
        ),
    ])?;
    write(dir, "dup-resend", 0x13, &dup)?;
    let twin = packets(&[
        connect(user, "dev1/mod1", true),
        Packet::Subscribe(Subscribe::new("$iothub/twin/res/#", QoS::AtMostOnce)),
        publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, 0, false, b""),
        publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            QoS::AtLeastOnce,
            3,
            false,
            b"{}",
        ),
        publish(
            "$iothub/methods/res/200/?$rid=5",
            QoS::AtLeastOnce,
            4,
            false,
            b"{}",
        ),
        publish("unknown/topic", QoS::AtLeastOnce, 5, false, b"x"),
    ])?;
    write(dir, "twin-methods", 0x05, &twin)?;
    // Node ends the bag with '/', forged connection ids are dropped, every system key.
    let node = packets(&[
        connect("hub.example/dev1/mod1/api-version=2020-09-30&DeviceClientType=node", "dev1/mod1", true),
        publish(
            &format!("{events}%24.mid=1&%24.cid=2&%24.uid=u&%24.to=t&%24.exp=x&%24.ctime=c&%24.schema=s&%24.sub=b&%24.ifid=i&iothub-operation=o&%24.cdid=forged&%24.cmid=forged&k%20ey=v%2Fal&ack=full/"),
            QoS::AtLeastOnce,
            9,
            false,
            b"node",
        ),
        publish("devices/dev1/modules/OTHER/messages/events/", QoS::AtLeastOnce, 10, false, b"as someone else"),
    ])?;
    write(dir, "node-bag", 0x21, &node)?;
    let legacy = packets(&[connect(
        "hub.example/dev1/mod1/api-version=2017-06-30/DeviceClientType=Microsoft.Azure.Devices.Client/1.5.1-preview-003",
        "dev1/mod1",
        true,
    )])?;
    write(dir, "legacy-username", 0x3f, &legacy)?;
    let qos2 = packets(&[
        connect(user, "dev1/mod1", true),
        publish(events, QoS::ExactlyOnce, 11, false, b"qos2"),
    ])?;
    write(dir, "qos2", 0x01, &qos2)?;
    Ok(())
}

// ---- AMQP ----------------------------------------------------------------------------------

fn frame(out: &mut Vec<u8>, ftype: u8, channel: u16, body: &[u8], payload: &[u8]) {
    let size = 8 + body.len() + payload.len();
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.push(2);
    out.push(ftype);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(payload);
}

fn amqp_message(output: &str, body: &[u8], id: MessageId) -> Message<Body<Value>> {
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    app.insert(
        "iothub-outputname".into(),
        SimpleValue::String(output.into()),
    );
    app.insert(
        "iothub-message-schema".into(),
        SimpleValue::String("schema".into()),
    );
    app.insert("temp".into(), SimpleValue::Double(30.5.into()));
    app.insert("x-opt-forged".into(), SimpleValue::String("dropped".into()));
    app.insert(
        "iothub-connection-device-id".into(),
        SimpleValue::String("forged".into()),
    );
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(id),
            correlation_id: Some(MessageId::Ulong(42)),
            content_type: Some(Symbol::from("application/json")),
            content_encoding: Some(Symbol::from("utf-8")),
            user_id: Some(Binary::from(b"user".to_vec())),
            ..Properties::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: Body::Data(vec![Data(Binary::from(body.to_vec()))].into()),
        footer: None,
    }
}

fn encode_message(m: Message<Body<Value>>) -> Result<Vec<u8>> {
    Ok(serde_amqp::to_vec(&Serializable(m))?)
}

fn batch(parts: Vec<Vec<u8>>) -> Message<Body<Value>> {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: None,
        body: Body::Data(
            parts
                .into_iter()
                .map(|p| Data(Binary::from(p)))
                .collect::<Vec<_>>()
                .into(),
        ),
        footer: None,
    }
}

fn transfer(delivery: u32, format: u32) -> Transfer {
    Transfer {
        handle: Handle(0),
        delivery_id: Some(delivery),
        delivery_tag: Some(Binary::from(delivery.to_be_bytes().to_vec()).into()),
        message_format: Some(format),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    }
}

fn amqp(dir: &Path) -> Result<()> {
    let one = encode_message(amqp_message(
        "out1",
        br#"{"temperature":30.5}"#,
        MessageId::Uuid([0xab; 16].into()),
    ))?;
    write(dir, "message", 0x02, &one)?;
    let two = encode_message(amqp_message(
        "out2",
        b"second",
        MessageId::String("m-2".into()),
    ))?;
    let batched = encode_message(batch(vec![one.clone(), two.clone()]))?;
    write(dir, "batch", 0x06, &batched)?;
    let value_body = encode_message(Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(MessageId::Binary(Binary::from(vec![0xff, 0xfe]))),
            ..Properties::default()
        }),
        application_properties: None,
        body: Body::Value(fe2o3_amqp_types::messaging::AmqpValue(Value::String(
            "text".into(),
        ))),
        footer: None,
    })?;
    write(dir, "value-body", 0x02, &value_body)?;

    // A module's connection after the AMQP header: open, begin, attach, flow, transfers,
    // disposition, detach, end, close.
    let mut s = Vec::new();
    let open = Open {
        container_id: "dev1/mod1".into(),
        hostname: Some("hub.example".into()),
        max_frame_size: MaxFrameSize(65536),
        channel_max: ChannelMax(255),
        idle_time_out: Some(120_000),
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&open)?, &[]);
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 1,
        incoming_window: 5000,
        outgoing_window: 5000,
        handle_max: Handle(63),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&begin)?, &[]);
    let attach = Attach {
        name: "events".into(),
        handle: Handle(0),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::builder().address("dev1/mod1").build())),
        target: Some(Box::new(
            Target::builder()
                .address("/devices/dev1/modules/mod1/messages/events")
                .build()
                .into(),
        )),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: Some(600 * 1024),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&attach)?, &[]);
    let flow = Flow {
        next_incoming_id: Some(1),
        incoming_window: 5000,
        next_outgoing_id: 1,
        outgoing_window: 5000,
        handle: Some(Handle(0)),
        delivery_count: Some(0),
        link_credit: Some(100),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&flow)?, &[]);
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&transfer(0, 0))?, &one);
    frame(
        &mut s,
        0,
        0,
        &serde_amqp::to_vec(&transfer(1, 0x8001_3700))?,
        &batched,
    );
    let disposition = Disposition {
        role: Role::Receiver,
        first: 0,
        last: Some(1),
        settled: true,
        state: Some(DeliveryState::Accepted(Accepted {})),
        batchable: false,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&disposition)?, &[]);
    // An empty frame (heartbeat).
    frame(&mut s, 0, 0, &[], &[]);
    let detach = Detach {
        handle: Handle(0),
        closed: true,
        error: None,
    };
    frame(&mut s, 0, 0, &serde_amqp::to_vec(&detach)?, &[]);
    frame(
        &mut s,
        0,
        0,
        &serde_amqp::to_vec(&End { error: None })?,
        &[],
    );
    frame(
        &mut s,
        0,
        0,
        &serde_amqp::to_vec(&Close { error: None })?,
        &[],
    );
    write(dir, "connection", 0x00, &s)?;

    let mut sasl = Vec::new();
    let init = SaslInit {
        mechanism: Symbol::from("PLAIN"),
        initial_response: Some(Binary::from(
            b"\0dev1/mod1@sas.hub\0SharedAccessSignature sr=hub.example&sig=c2ln&se=1".to_vec(),
        )),
        hostname: Some("hub.example".into()),
    };
    frame(&mut sasl, 1, 0, &serde_amqp::to_vec(&init)?, &[]);
    let anonymous = SaslInit {
        mechanism: Symbol::from("ANONYMOUS"),
        initial_response: None,
        hostname: None,
    };
    frame(&mut sasl, 1, 0, &serde_amqp::to_vec(&anonymous)?, &[]);
    write(dir, "sasl-init", 0x01, &sasl)?;
    Ok(())
}

// ---- store ---------------------------------------------------------------------------------

fn segments(dir: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let opts = StoreOptions {
        epoch: Epoch::new(1),
        quota_bytes: 16 << 20,
        segment_bytes: 4096,
        max_message_bytes: 64 << 10,
        reserve_bytes: 0,
        preallocate: false,
        ..StoreOptions::default()
    };
    let store = Store::open(tmp.path(), opts)?;
    let a = QueueName::new("ep-a/p0")?;
    let b = QueueName::new("ep-b/p1")?;
    let mut last;
    for i in 0..24u32 {
        let body = Bytes::from(format!("message {i:03} {}", "~".repeat(200)));
        let queues = if i % 3 == 0 {
            vec![a.clone(), b.clone()]
        } else {
            vec![a.clone()]
        };
        let expiry = (i % 5 == 0).then_some(store::UnixMillis(4_102_444_800_000));
        last = Some(store.append(&queues, body, expiry).wait()?);
        if i == 10 {
            if let Some(upto) = last {
                store.checkpoint(&a, upto).wait()?;
            }
        }
    }
    store.close()?;
    let mut names: Vec<String> = fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    // The target names its file generation 1, sequence number = the seed's first byte.
    let picks = [
        (names.first(), "segment-first"),
        (names.get(1), "segment-second"),
        (names.last(), "segment-newest"),
    ];
    for (name, seed) in picks {
        let Some(name) = name else { continue };
        let seq = name
            .strip_suffix(".seg")
            .and_then(|n| n.split_once('-'))
            .and_then(|(_, seq)| u8::from_str_radix(seq, 16).ok())
            .ok_or("a segment name the store wrote")?;
        write(dir, seed, seq, &fs::read(tmp.path().join(name))?)?;
    }
    write(dir, "empty", 0, &[])?;
    Ok(())
}
