//! The MQTT head as a raw MQTT 3.1.1 client sees it: every guarantee of
//! `hub/src/mqtt/connection.rs` tested from outside, against an in-process hub over real TLS
//! (or the loopback plain listener where TLS is beside the point).
//!
//! Each test starts its own hub on a temporary data dir with three modules (`sender`,
//! `receiver`, `spy`) and one route, `sender/outputs/* → receiver/inputs/input1`. Nothing
//! sleeps and hopes: every expectation is a packet (or a close) awaited with a deadline. Where
//! a test must show that something does *not* arrive, it sends a later marker through the same
//! ordered path and checks the marker comes first, or makes a PINGREQ round trip.
//!
//! Tests marked `#[ignore = "hub bug: …"]` would show a hub bug and pass once it is fixed; run them
//! with `cargo test -p hub --test mqtt_protocol -- --ignored`.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::time::Duration;

use raw::{bag_get, http_get, input_bag, Creds, Event, RawClient, TestHub, DEVICE};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);

fn random_key() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}

/// Publishes at QoS 1 and waits for its PUBACK (which must be the next packet).
async fn publish_acked(c: &mut RawClient, topic: &str, pkid: u16, payload: &[u8]) {
    c.writer
        .publish(topic, QoS::AtLeastOnce, pkid, payload)
        .await;
    match c.reader.expect_packet(T).await {
        Packet::PubAck(PubAck { pkid: got }) => assert_eq!(got, pkid, "PUBACK for another pkid"),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

/// Reads `n` input messages, PUBACKing each.
async fn receive(c: &mut RawClient, n: usize) -> Vec<Publish> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let p = c.reader.expect_publish(T).await;
        c.writer.puback(p.pkid).await;
        got.push(p);
    }
    got
}

/// `edgehub_queue_length` of `endpoint` (0 when the hub shows none).
async fn queued(hub: &TestHub, endpoint: &str) -> u64 {
    let text = http_get(hub.addrs.metrics, "/metrics")
        .await
        .expect("the hub answers /metrics");
    let label = format!("endpoint=\"{endpoint}\"");
    text.lines()
        .find(|l| l.starts_with("edgehub_queue_length{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse().expect("a count"))
}

/// Waits until `n` messages wait for `endpoint` (polling the metric; a minute at most).
async fn wait_queued(hub: &TestHub, endpoint: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen = queued(hub, endpoint).await;
        if seen == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{seen} queued for {endpoint}, waiting for {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn assert_no_puback(seen: &[Packet]) {
    assert!(
        !seen
            .iter()
            .any(|p| matches!(p, Packet::PubAck(_) | Packet::PubRec(_))),
        "acknowledged before closing: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// CONNECT
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_token_gets_connack_0_and_the_connection_works() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let (mut c, ack) = hub.connected("sender", true).await;
    assert!(!ack.session_present);
    assert_eq!(c.ping().await, vec![Packet::PingResp]);
    // The loopback plain listener authenticates the same way.
    let mut p = hub.plain().await;
    let ack = p.connect(hub.creds("receiver").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_acknowledged_publishes_show_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let sender = hub.creds("sender");
    let (mut c, _) = hub.connected("sender", true).await;
    publish_acked(&mut c, &sender.output_topic(), 1, b"one").await;
    let wrong_key = Creds {
        key: random_key(),
        ..hub.creds("receiver")
    };
    let mut bad = hub.plain().await;
    let ack = bad.connect(wrong_key.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    let text = http_get(hub.addrs.metrics, "/metrics")
        .await
        .expect("metrics");
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} line in:\n{text}"))
    };
    assert_eq!(value("edgehub_client_connect_success_total{"), 1.0);
    assert_eq!(value("edgehub_client_connect_failed_total{"), 1.0);
    assert_eq!(value("edgehub_publish_ack_duration_seconds_count{"), 1.0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_connack_5_and_the_socket_closes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let sender = hub.creds("sender");
    let wrong_key = Creds {
        key: random_key(),
        ..sender.clone()
    };
    let ghost = Creds {
        module: "ghost".into(),
        key: random_key(),
        ..sender.clone()
    };
    let mut no_login = sender.connect(true, 60);
    no_login.login = None;
    let cases = [
        ("wrong key", wrong_key.connect(true, 60)),
        (
            "expired token",
            sender.connect_with(
                &sender.client_id(),
                // Past the 300 s clock skew allowance.
                &sender.token_for("sender", raw::now_secs() - 3600),
                true,
                60,
            ),
        ),
        (
            "audience of another module (signed with the right key)",
            sender.connect_with(
                &sender.client_id(),
                &sender.token_for("receiver", raw::now_secs() + 3600),
                true,
                60,
            ),
        ),
        (
            "client id of another module",
            sender.connect_with(&format!("{DEVICE}/receiver"), &sender.token(), true, 60),
        ),
        (
            "client id without the device",
            sender.connect_with("sender", &sender.token(), true, 60),
        ),
        ("unknown module", ghost.connect(true, 60)),
        (
            "username but no password",
            sender.connect_with(&sender.client_id(), "", true, 60),
        ),
        ("no username and no password", no_login),
        (
            "not a SAS token",
            sender.connect_with(&sender.client_id(), "hunter2", true, 60),
        ),
    ];
    for (case, connect) in cases {
        let mut c = hub.tls().await;
        let ack = c.connect(connect).await;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{case}");
        assert!(!ack.session_present, "{case}");
        let after = c.reader.expect_closed(T).await;
        assert!(
            after.is_empty(),
            "{case}: packets after CONNACK 5: {after:?}"
        );
    }
    // The refusals left no trace: the real module still connects.
    let (mut c, _) = hub.connected("sender", true).await;
    assert_eq!(c.ping().await, vec![Packet::PingResp]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_before_connect_closes_the_connection_without_connack() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let sender = hub.creds("sender");
    let firsts = [
        Packet::PingReq,
        Packet::Publish(raw::publish(
            &sender.output_topic(),
            QoS::AtLeastOnce,
            1,
            b"x",
        )),
        Packet::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
            sender.inputs_filter(),
            QoS::AtLeastOnce,
        )),
        Packet::Disconnect,
    ];
    for first in firsts {
        let mut c = hub.tls().await;
        c.writer.send(&first).await;
        let seen = c.reader.expect_closed(T).await;
        assert!(seen.is_empty(), "after {first:?} first: {seen:?}");
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_one_identity_replaces_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let (mut first, _) = hub.connected("sender", true).await;
    publish_acked(
        &mut first,
        &hub.creds("sender").output_topic(),
        1,
        b"from-first",
    )
    .await;
    let (mut second, ack) = hub.connected("sender", true).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let seen = first.reader.expect_closed(T).await;
    assert!(seen.is_empty(), "the replaced connection got {seen:?}");
    publish_acked(
        &mut second,
        &hub.creds("sender").output_topic(),
        1,
        b"from-second",
    )
    .await;
    assert_eq!(
        payloads(&receive(&mut r, 2).await),
        ["from-first", "from-second"]
    );
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// PUBLISH
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_qos1_publishes_are_acked_in_arrival_order_and_delivered() {
    const N: u16 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let (s, _) = hub.connected("sender", true).await;
    let topic = hub.creds("sender").output_topic();
    let (mut reader, mut writer) = s.split();
    // Written without waiting for any PUBACK, while the acks are read concurrently.
    let write = tokio::spawn(async move {
        for pkid in 1..=N {
            writer
                .publish_unflushed(
                    &topic,
                    QoS::AtLeastOnce,
                    pkid,
                    format!("m{pkid}").as_bytes(),
                )
                .await
                .expect("write");
        }
        writer.flush().await.expect("flush");
        writer
    });
    // The receiver reads as the messages come: an online receiver that read nothing would
    // hold the sender once its queue passed the flow-control bound (800 by default).
    let received = tokio::spawn(async move {
        let got = payloads(&receive(&mut r, N.into()).await);
        (r, got)
    });
    let mut acks = Vec::with_capacity(N.into());
    while acks.len() < usize::from(N) {
        match reader.expect_packet(Duration::from_secs(30)).await {
            Packet::PubAck(a) => acks.push(a.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let _writer = write.await.unwrap();
    assert_eq!(acks, (1..=N).collect::<Vec<_>>(), "PUBACKs out of order");
    let (_r, got) = received.await.unwrap();
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "deliveries out of order or missing");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_on_another_modules_topic_closes_the_connection_and_delivers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let sender = hub.creds("sender");
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        let (mut spy, _) = hub.connected("spy", true).await;
        // The route sender → receiver would deliver this, were the topic believed.
        spy.writer
            .publish(&sender.output_topic(), qos, 1, b"forged")
            .await;
        let seen = spy.reader.expect_closed(T).await;
        assert_no_puback(&seen);
    }
    // A leaf-device topic of the same device is not the spy's either.
    let (mut spy, _) = hub.connected("spy", true).await;
    spy.writer
        .publish(
            &format!("devices/{DEVICE}/messages/events/"),
            QoS::AtLeastOnce,
            1,
            b"forged-leaf",
        )
        .await;
    assert_no_puback(&spy.reader.expect_closed(T).await);
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &sender.output_topic(), 1, b"marker").await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["marker"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_closes_the_connection_and_is_not_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let topic = hub.creds("sender").output_topic();
    let (mut s, _) = hub.connected("sender", true).await;
    s.writer.publish(&topic, QoS::ExactlyOnce, 7, b"qos2").await;
    assert_no_puback(&s.reader.expect_closed(T).await);
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &topic, 1, b"marker").await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["marker"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_kib_body_is_accepted_and_one_byte_more_closes_without_puback() {
    const LIMIT: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let topic = hub.creds("sender").output_topic();
    let (mut s, _) = hub.connected("sender", true).await;
    let full = vec![b'a'; LIMIT];
    publish_acked(&mut s, &topic, 1, &full).await;
    s.writer
        .publish(&topic, QoS::AtLeastOnce, 2, &vec![b'b'; LIMIT + 1])
        .await;
    assert_no_puback(&s.reader.expect_closed(T).await);
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &topic, 1, b"marker").await;
    let got = receive(&mut r, 2).await;
    assert_eq!(got[0].payload.len(), LIMIT);
    assert!(got[0].payload.iter().all(|b| *b == b'a'));
    assert_eq!(
        &got[1].payload[..],
        b"marker",
        "the oversized body was delivered"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bytes_close_only_their_own_connection() {
    const BURSTS: u16 = 20;
    const PER_BURST: u16 = 25;
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let topic = hub.creds("sender").output_topic();
    let (s, _) = hub.connected("sender", true).await;

    // The sender streams bursts of pipelined publishes while the spy misbehaves.
    let stream = tokio::spawn(async move {
        let (mut reader, mut writer) = s.split();
        let mut acked = Vec::new();
        for burst in 0..BURSTS {
            for i in 0..PER_BURST {
                let seq = burst * PER_BURST + i + 1;
                writer
                    .publish_unflushed(&topic, QoS::AtLeastOnce, seq, format!("m{seq}").as_bytes())
                    .await
                    .expect("the sender's connection broke");
            }
            writer.flush().await.expect("flush");
            for _ in 0..PER_BURST {
                match reader.expect_packet(T).await {
                    Packet::PubAck(a) => acked.push(a.pkid),
                    other => panic!("sender got {other:?}"),
                }
            }
        }
        acked
    });

    let spy = hub.creds("spy");
    let cases: [(&str, bool, &[u8]); 5] = [
        (
            "garbage instead of CONNECT",
            false,
            b"\x00\x00garbage\xff\xff",
        ),
        ("reserved packet type 15", true, b"\xf0\x00"),
        (
            "remaining length of five bytes",
            true,
            b"\x30\xff\xff\xff\xff\x7f",
        ),
        (
            "PUBLISH whose topic length overruns the packet",
            true,
            b"\x32\x05\x00\x40ab\x00",
        ),
        ("CONNECT after CONNECT", true, &[]),
    ];
    for (case, after_connect, bytes) in cases {
        let mut c = hub.tls().await;
        if after_connect {
            let ack = c.connect(spy.connect(true, 60)).await;
            assert_eq!(ack.code, ConnectReturnCode::Success, "{case}");
        }
        if bytes.is_empty() {
            c.writer.send(&Packet::Connect(spy.connect(true, 60))).await;
        } else {
            c.writer.send_raw(bytes).await.expect("write");
        }
        let seen = c.reader.expect_closed(T).await;
        assert!(seen.is_empty(), "{case}: {seen:?}");
    }

    let acked = stream.await.expect("the sender's stream failed");
    let n = BURSTS * PER_BURST;
    assert_eq!(acked, (1..=n).collect::<Vec<_>>());
    let got = payloads(&receive(&mut r, n.into()).await);
    assert_eq!(got, (1..=n).map(|i| format!("m{i}")).collect::<Vec<_>>());
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE and deliveries
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_may_subscribe_only_to_its_own_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let (mut spy, _) = hub.connected("spy", true).await;
    let own = hub.creds("spy").inputs_filter();
    let theirs = hub.creds("receiver").inputs_filter();
    let theirs_all = format!("devices/{DEVICE}/modules/receiver/#");
    let (ack, before) = spy
        .subscribe(
            3,
            &[
                &own,
                &theirs,
                &theirs_all,
                "#",
                "devices/+/modules/+/inputs/#",
            ],
        )
        .await;
    assert!(before.is_empty());
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ]
    );
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(
        &mut s,
        &hub.creds("sender").output_topic(),
        1,
        b"for-receiver",
    )
    .await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["for-receiver"]);
    // The receiver has it; the spy, asked for a round trip, has had nothing.
    assert_eq!(spy.ping().await, vec![Packet::PingResp]);
    // Also when the receiver is away (its queue waits for it, not for the spy).
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;
    publish_acked(
        &mut s,
        &hub.creds("sender").output_topic(),
        2,
        b"while-away",
    )
    .await;
    match spy.reader.next(Duration::from_millis(300)).await {
        Event::Timeout => {}
        other => panic!("the spy got {other:?}"),
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_message_arrives_on_the_input_topic_with_connection_ids_at_qos1() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let (mut s, _) = hub.connected("sender", true).await;
    let bag = "%24.on=out1&%24.mid=mid-1&color=blue&%24.cdid=forged&%24.cmid=forged";
    publish_acked(
        &mut s,
        &hub.creds("sender").events_topic(bag),
        1,
        b"{\"t\":1}",
    )
    .await;
    let p = r.reader.expect_publish(T).await;
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_ne!(p.pkid, 0);
    assert!(!p.dup);
    assert_eq!(&p.payload[..], b"{\"t\":1}");
    let prefix = format!("devices/{DEVICE}/modules/receiver/inputs/input1/");
    assert!(p.topic.starts_with(&prefix), "{}", p.topic);
    let bag = input_bag(&p.topic);
    assert_eq!(bag_get(&bag, "$.cdid"), Some(DEVICE), "{}", p.topic);
    assert_eq!(bag_get(&bag, "$.cmid"), Some("sender"), "{}", p.topic);
    assert_eq!(bag_get(&bag, "$.mid"), Some("mid-1"));
    assert_eq!(bag_get(&bag, "color"), Some("blue"));
    assert_eq!(
        bag_get(&bag, "$.on"),
        None,
        "the output name is not forwarded"
    );
    assert!(
        !bag.iter().any(|(_, v)| v == "forged"),
        "a sender's forged connection id was delivered: {}",
        p.topic
    );
    r.writer.puback(p.pkid).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_come_again_after_reconnect_in_order_and_acked_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, _) = hub.connected("receiver", false).await;
    r.subscribe(1, &[&filter]).await;
    let (mut s, _) = hub.connected("sender", true).await;
    let sender = hub.creds("sender");
    for i in 1..=3u16 {
        let bag = format!("%24.on=out1&%24.mid=mid-{i}");
        publish_acked(
            &mut s,
            &sender.events_topic(&bag),
            i,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    // How many deliveries are in flight at once is the hub's choice (edgeHub: one per module),
    // so each step reads only as far as the acknowledgements it gave allow.
    // First connection: m1 arrives; not acknowledged.
    let m1 = r.reader.expect_publish(T).await;
    assert_eq!(&m1.payload[..], b"m1");
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    // Second: m1 again, the same message; acknowledged. Then m2, not acknowledged.
    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(ack.session_present);
    let again = r.reader.expect_publish(T).await;
    assert_eq!(
        &again.payload[..],
        b"m1",
        "the unacknowledged message comes first"
    );
    assert_eq!(again.topic, m1.topic, "a redelivery is the same message");
    r.writer.puback(again.pkid).await;
    let m2 = r.reader.expect_publish(T).await;
    assert_eq!(&m2.payload[..], b"m2");
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    // Third: m2 again (not m1, which was acknowledged), then m3; both acknowledged.
    let (mut r, _) = hub.connected("receiver", false).await;
    let got = receive(&mut r, 2).await;
    assert_eq!(payloads(&got), ["m2", "m3"]);
    assert_eq!(got[0].topic, m2.topic, "a redelivery is the same message");
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    // Fourth: nothing comes again; the next message is the first one it gets.
    let (mut r, _) = hub.connected("receiver", false).await;
    publish_acked(&mut s, &sender.output_topic(), 4, b"m4").await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["m4"]);
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Keep-alive
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_disconnected_after_one_and_a_half_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let sender = hub.creds("sender");

    // A client that pings every 500 ms stays connected past 3 keep-alive periods.
    let mut live = hub.tls().await;
    assert_eq!(
        live.connect(sender.connect(true, 1)).await.code,
        ConnectReturnCode::Success
    );
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(live.ping().await, vec![Packet::PingResp]);
    }
    drop(live);

    // One that goes silent is closed after 1.5 s.
    let mut silent = hub.tls().await;
    assert_eq!(
        silent.connect(sender.connect(true, 1)).await.code,
        ConnectReturnCode::Success
    );
    let t0 = std::time::Instant::now();
    let seen = silent.reader.expect_closed(Duration::from_secs(5)).await;
    let took = t0.elapsed();
    assert!(seen.is_empty(), "{seen:?}");
    assert!(
        took >= Duration::from_millis(1300) && took <= Duration::from_millis(2500),
        "closed after {took:?}, expected about 1.5 s"
    );
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscription_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(!ack.session_present, "no session existed yet");
    r.subscribe(1, &[&filter]).await;
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(ack.session_present, "CONNACK session-present must be 1");
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["m1"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_session_drops_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, _) = hub.connected("receiver", false).await;
    r.subscribe(1, &[&filter]).await;
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    let (mut r, ack) = hub.connected("receiver", true).await;
    assert!(
        !ack.session_present,
        "clean-session 1 answers session-present 0"
    );
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    // Not subscribed: nothing arrives (a round trip, then a short quiet period).
    assert_eq!(r.ping().await, vec![Packet::PingResp]);
    match r.reader.next(Duration::from_millis(300)).await {
        Event::Timeout => {}
        other => panic!("an unsubscribed clean session got {other:?}"),
    }
    // Once it subscribes, the queued message comes, after the SUBACK.
    let (_, before) = r.subscribe(2, &[&filter]).await;
    assert!(before.is_empty(), "delivered before SUBACK: {before:?}");
    assert_eq!(payloads(&receive(&mut r, 1).await), ["m1"]);
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;

    // The clean session left nothing behind.
    let (_r, ack) = hub.connected("receiver", false).await;
    assert!(!ack.session_present, "a clean session's state outlived it");
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// More edges: replacement with deliveries in flight, topics the hub does not serve,
// UNSUBSCRIBE, clean and persistent connections of one identity
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_flight_to_a_replaced_connection_go_to_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut a, _) = hub.connected("receiver", false).await;
    a.subscribe(1, &[&filter]).await;
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    let first = a.reader.expect_publish(T).await;
    assert_eq!(&first.payload[..], b"m1");
    // Not acknowledged by A; B (same identity, persistent session) takes over.
    let (mut b, ack) = hub.connected("receiver", false).await;
    assert!(ack.session_present);
    let _ = a.reader.expect_closed(T).await;
    let again = b.reader.expect_publish(T).await;
    assert_eq!(&again.payload[..], b"m1");
    assert_eq!(again.topic, first.topic);
    b.writer.puback(again.pkid).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 2, b"m2").await;
    assert_eq!(payloads(&receive(&mut b, 1).await), ["m2"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_a_topic_the_hub_does_not_serve_is_acked_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let (mut s, _) = hub.connected("sender", true).await;
    // edgeHub's rule (reference §1.4): dropped, but PUBACKed, and the connection stays.
    publish_acked(&mut s, "some/other/topic", 1, b"dropped").await;
    // A twin request is answered (served from the twin, not routed) and PUBACKed.
    s.writer
        .publish("$iothub/twin/GET/?$rid=42", QoS::AtLeastOnce, 2, b"")
        .await;
    let mut got = [
        s.reader.expect_packet(T).await,
        s.reader.expect_packet(T).await,
    ];
    got.sort_by_key(|p| matches!(p, Packet::PubAck(_)));
    match &got[0] {
        Packet::Publish(p) => assert!(
            p.topic.starts_with("$iothub/twin/res/") && p.topic.ends_with("/?$rid=42"),
            "{}",
            p.topic
        ),
        other => panic!("expected a twin response, got {other:?}"),
    }
    assert_eq!(got[1], Packet::PubAck(PubAck::new(2)));
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 3, b"marker").await;
    assert_eq!(payloads(&receive(&mut r, 1).await), ["marker"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_from_inputs_stops_deliveries_until_subscribing_again() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, _) = hub.connected("receiver", false).await;
    r.subscribe(1, &[&filter]).await;
    r.writer
        .send(&Packet::Unsubscribe(
            rumqttc::mqttbytes::v4::Unsubscribe::new(filter.clone()),
        ))
        .await;
    match r.reader.expect_packet(T).await {
        Packet::UnsubAck(_) => {}
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    assert_eq!(r.ping().await, vec![Packet::PingResp]);
    // The session forgot the filter too.
    r.writer.disconnect().await;
    let _ = r.reader.expect_closed(T).await;
    let (mut r, ack) = hub.connected("receiver", false).await;
    assert!(ack.session_present);
    match r.reader.next(Duration::from_millis(300)).await {
        Event::Timeout => {}
        other => panic!("delivered after UNSUBSCRIBE: {other:?}"),
    }
    let (_, before) = r.subscribe(2, &[&filter]).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(payloads(&receive(&mut r, 1).await), ["m1"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_that_replaced_a_clean_one_keeps_its_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut a, _) = hub.connected("receiver", true).await;
    a.subscribe(1, &[&filter]).await;
    // B takes over with clean-session 0, and subscribes unless told its session is present
    // (the Python SDK never subscribes again when it is).
    let (mut b, ack_b) = hub.connected("receiver", false).await;
    let _ = a.reader.expect_closed(T).await;
    if !ack_b.session_present {
        b.subscribe(2, &[&filter]).await;
    }
    b.writer.disconnect().await;
    let _ = b.reader.expect_closed(T).await;
    let (mut c, ack_c) = hub.connected("receiver", false).await;
    assert!(
        ack_c.session_present,
        "B's persistent session (present={}) is gone after B left",
        ack_b.session_present
    );
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    assert_eq!(payloads(&receive(&mut c, 1).await), ["m1"]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_that_subscribes_after_replacing_one_gets_inputs_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut a, _) = hub.connected("receiver", false).await;
    a.subscribe(1, &[&filter]).await;
    // B replaces A with a clean session and subscribes a little later.
    let (mut b, _) = hub.connected("receiver", true).await;
    let _ = a.reader.expect_closed(T).await;
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    // The message waits on disk for a receiver: B's connection took A's sinks away, and B
    // has not subscribed yet (what a module that subscribes a few seconds after connecting
    // meets). The worker now waits for a sink, with no timer: only B's subscription can end
    // that wait, so a delivery at all shows it did. (That a new sink also ends a backoff at
    // once is timed on a paused clock in router/tests/delivery.rs.)
    wait_queued(&hub, "receiver/input1", 1).await;
    b.subscribe(2, &[&filter]).await;
    let p = b.reader.expect_publish(Duration::from_secs(70)).await;
    assert_eq!(&p.payload[..], b"m1");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_one_of_two_inputs_filters_keeps_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let all = format!("devices/{DEVICE}/modules/receiver/#");
    let (mut r, _) = hub.connected("receiver", false).await;
    let (ack, _) = r.subscribe(1, &[&filter, &all]).await;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 2]
    );
    let mut unsub = rumqttc::mqttbytes::v4::Unsubscribe::new(filter.clone());
    unsub.pkid = 2;
    r.writer.send(&Packet::Unsubscribe(unsub)).await;
    match r.reader.expect_packet(T).await {
        Packet::UnsubAck(a) => assert_eq!(a.pkid, 2),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let (mut s, _) = hub.connected("sender", true).await;
    publish_acked(&mut s, &hub.creds("sender").output_topic(), 1, b"m1").await;
    // `devices/{d}/modules/receiver/#` is still granted and still in the session.
    match r.reader.next(Duration::from_secs(3)).await {
        Event::Packet(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"m1"),
        other => panic!("still subscribed to {all}, yet got {other:?}"),
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_published_after_a_refused_publish_is_stored_ahead_of_its_resend() {
    // Output `bad` routes to an input whose store queue name is too long: the router refuses
    // such a message at once, without waiting for the store. Output `out1` routes normally.
    let dir = tempfile::tempdir().unwrap();
    let long_input = "i".repeat(300);
    std::fs::write(
        dir.path().join("manifest.json"),
        format!(
            r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{"sender": {{}}, "receiver": {{}}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{
      "ok": "FROM /messages/modules/sender/outputs/out1 INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")",
      "bad": "FROM /messages/modules/sender/outputs/bad INTO BrokeredEndpoint(\"/modules/receiver/inputs/{long_input}\")"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}}}}}"#
        ),
    )
    .unwrap();
    let hub = TestHub::start(dir.path()).await;
    let filter = hub.creds("receiver").inputs_filter();
    let (mut r, _) = hub.connected("receiver", false).await;
    r.subscribe(1, &[&filter]).await;
    let sender = hub.creds("sender");
    let (mut s, _) = hub.connected("sender", true).await;
    // One burst: m1, the refused one, then m3..m5, all before any PUBACK is read.
    let good = sender.output_topic();
    let bad = sender.events_topic("%24.on=bad");
    for (pkid, topic, body) in [
        (1, &good, "m1"),
        (2, &bad, "refused"),
        (3, &good, "m3"),
        (4, &good, "m4"),
        (5, &good, "m5"),
    ] {
        s.writer
            .publish_unflushed(topic, QoS::AtLeastOnce, pkid, body.as_bytes())
            .await
            .unwrap();
    }
    s.writer.flush().await.unwrap();
    let seen = s.reader.expect_closed(T).await;
    let acked: Vec<u16> = seen
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(
        acked,
        [1],
        "only what came before the refusal is acknowledged"
    );
    // The sender resends from its first unacknowledged publish (an SDK would resend the
    // refused one too; here it gives up on it) and goes on with m6. Delivery is in order, so
    // had m3..m5 been stored after the refusal they would reach the receiver before m3's resend.
    let (mut s, _) = hub.connected("sender", true).await;
    for (pkid, body) in [(1, "m3"), (2, "m4"), (3, "m5"), (4, "m6")] {
        publish_acked(&mut s, &good, pkid, body.as_bytes()).await;
    }
    assert_eq!(
        payloads(&receive(&mut r, 5).await),
        ["m1", "m3", "m4", "m5", "m6"],
        "a publish after the refused one was stored ahead of the resend"
    );
    hub.stop().await;
}
