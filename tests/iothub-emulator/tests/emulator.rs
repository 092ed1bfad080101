//! The emulator against a real TLS MQTT 3.1.1 client (tokio-rustls + the mqttbytes codec),
//! trusting only the emulator's CA.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iothub_emulator::{sas, Emulator, EmulatorConfig, IdentityKey, RefuseReason};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HOST: &str = "emulated.azure-devices.net";
const KEY_M1: &[u8] = b"key of module one, 32 bytes long";
const KEY_M2: &[u8] = b"key of module two, 32 bytes long";
const KEY_LEAF: &[u8] = b"key of the leaf device, 32 bytes";
/// Generous bound for things that happen at once; a hang fails instead of blocking forever.
const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    emu: Emulator,
    _dir: tempfile::TempDir,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(EmulatorConfig {
        hostname: HOST.into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        identities: vec![
            IdentityKey::module("dev1", "m1", KEY_M1),
            IdentityKey::module("dev1", "m2", KEY_M2),
            IdentityKey::device("leaf", KEY_LEAF),
        ],
        tls_dir: dir.path().join("tls"),
    })
    .await
    .unwrap();
    Fixture { emu, _dir: dir }
}

fn token(resource: &str, key: &[u8], ttl: i64) -> String {
    let expiry = (sas::unix_now() as i64 + ttl) as u64;
    sas::generate(resource, key, expiry)
}

fn module_token(device: &str, module: &str, key: &[u8]) -> String {
    token(&sas::resource_uri(HOST, device, Some(module)), key, 3600)
}

fn username(client_id: &str) -> String {
    format!("{HOST}/{client_id}/?api-version=2021-04-12&DeviceClientType=iothub-emulator-test")
}

struct Client {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    pkid: u16,
}

impl Client {
    async fn tls(emu: &Emulator) -> Client {
        Client::tls_to(emu.addr(), &emu.ca_pem(), emu.hostname()).await
    }

    async fn tls_to(addr: std::net::SocketAddr, ca: &std::path::Path, hostname: &str) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The server certificate must name the IoT Hub host.
        let name = ServerName::try_from(hostname.to_owned()).unwrap();
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        Client {
            stream,
            buf: BytesMut::new(),
            pkid: 0,
        }
    }

    /// Connects with the given credentials; returns the client and the CONNACK code.
    async fn connect_with(
        emu: &Emulator,
        client_id: &str,
        user: &str,
        password: &str,
        keep_alive: u16,
    ) -> (Client, ConnectReturnCode) {
        let mut c = Client::tls(emu).await;
        let mut connect = Connect::new(client_id);
        connect.keep_alive = keep_alive;
        connect.clean_session = false;
        connect.set_login(user, password);
        c.send(&[Packet::Connect(connect)]).await;
        match c.recv().await {
            Some(Packet::ConnAck(ConnAck { code, .. })) => (c, code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A module connection with a good token; asserts it is accepted.
    async fn module(emu: &Emulator, device: &str, module: &str, key: &[u8]) -> Client {
        let id = format!("{device}/{module}");
        let (c, code) = Client::connect_with(
            emu,
            &id,
            &username(&id),
            &module_token(device, module, key),
            60,
        )
        .await;
        assert_eq!(code, ConnectReturnCode::Success);
        c
    }

    async fn send(&mut self, packets: &[Packet]) {
        let mut out = BytesMut::new();
        for p in packets {
            p.write(&mut out, usize::MAX).unwrap();
        }
        self.stream.write_all(&out).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Like `send`, but a failure (the peer closed) is not a test failure.
    async fn try_send(&mut self, packets: &[Packet]) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for p in packets {
            p.write(&mut out, usize::MAX).unwrap();
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// The next packet, or `None` once the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(CodecError::InsufficientBytes(_)) => {}
                    Err(e) => panic!("server sent garbage: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no packet and no close within the wait")
    }

    /// Asserts that the server closes the connection without sending anything more.
    async fn expect_closed(&mut self) {
        if let Some(p) = self.recv().await {
            panic!("expected the connection to close, got {p:?}");
        }
    }

    fn publish(&mut self, topic: &str, payload: &str, qos: QoS) -> Packet {
        self.pkid = self.pkid.wrapping_add(1).max(1);
        let mut p = Publish::new(topic, qos, payload.as_bytes().to_vec());
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid;
        }
        Packet::Publish(p)
    }
}

const EVENTS_M1: &str = "devices/dev1/modules/m1/messages/events/";

#[tokio::test]
async fn good_token_is_accepted_and_messages_are_recorded_in_order_with_the_bag() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    f.emu.wait_for_connects("dev1/m1", 1, WAIT).await.unwrap();

    // 200 QoS 1 publishes in one write, bags in the SDKs' encoding.
    let n = 200;
    let packets: Vec<Packet> = (0..n)
        .map(|i| {
            let topic = format!(
                "{EVENTS_M1}%24.mid=m{i}&%24.cid=c%2F{i}&%24.ct=application%2Fjson&%24.ce=utf-8&seq={i}&note=a%20b%26c"
            );
            c.publish(&topic, &format!("{{\"i\":{i}}}"), QoS::AtLeastOnce)
        })
        .collect();
    c.send(&packets).await;
    for i in 0..n {
        match c.recv().await {
            Some(Packet::PubAck(PubAck { pkid })) => assert_eq!(pkid, i as u16 + 1),
            other => panic!("expected PUBACK {i}, got {other:?}"),
        }
    }
    // PUBACK means recorded: no wait needed.
    let got = f.emu.received("dev1/m1");
    assert_eq!(got.len(), n);
    assert_eq!(f.emu.count("dev1/m1"), n);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.identity, "dev1/m1");
        assert_eq!(r.seq, i as u64);
        assert_eq!(r.qos, 1);
        assert!(!r.dup);
        assert_eq!(r.payload, Bytes::from(format!("{{\"i\":{i}}}")));
        assert_eq!(r.properties.get("$.mid").unwrap(), &format!("m{i}"));
        assert_eq!(r.properties.get("$.cid").unwrap(), &format!("c/{i}"));
        assert_eq!(r.properties.get("$.ct").unwrap(), "application/json");
        assert_eq!(r.properties.get("$.ce").unwrap(), "utf-8");
        assert_eq!(r.properties.get("seq").unwrap(), &i.to_string());
        assert_eq!(r.properties.get("note").unwrap(), "a b&c");
        assert_eq!(r.properties.len(), 6);
    }
    let connection = got[0].connection;
    assert!(got.iter().all(|r| r.connection == connection));

    // No trailing slash, no bag, QoS 0, a DUP resend; a PINGREQ after them proves the QoS 0
    // publish got no PUBACK.
    let mut dup = Publish::new(
        "devices/dev1/modules/m1/messages/events",
        QoS::AtLeastOnce,
        b"again".to_vec(),
    );
    dup.pkid = 7;
    dup.dup = true;
    let q0 = c.publish(
        "devices/dev1/modules/m1/messages/events",
        "q0",
        QoS::AtMostOnce,
    );
    c.send(&[Packet::Publish(dup), q0, Packet::PingReq]).await;
    assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(7))));
    assert_eq!(c.recv().await, Some(Packet::PingResp));
    let all = f.emu.received_all();
    assert_eq!(all.len(), n + 2);
    assert!(all[n].dup && all[n].properties.is_empty() && all[n].payload == "again");
    assert!(all[n + 1].qos == 0 && all[n + 1].payload == "q0");

    // A device identity publishes on its device topic.
    let (mut leaf, code) = Client::connect_with(
        &f.emu,
        "leaf",
        &username("leaf"),
        &token(&sas::resource_uri(HOST, "leaf", None), KEY_LEAF, 60),
        30,
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);
    let p = leaf.publish(
        "devices/leaf/messages/events/%24.mid=x&t=1",
        "hi",
        QoS::AtLeastOnce,
    );
    leaf.send(&[p]).await;
    assert!(matches!(leaf.recv().await, Some(Packet::PubAck(_))));
    let r = &f.emu.received("leaf")[0];
    assert_eq!(r.seq, n as u64 + 2);
    assert_ne!(r.connection, connection);
    assert_eq!(r.properties.get("t").unwrap(), "1");

    let stats = f.emu.stats();
    assert_eq!(stats.connects_accepted, 2);
    assert_eq!(stats.publishes, n as u64 + 3);
    assert_eq!(stats.per_identity["dev1/m1"].publishes, n as u64 + 2);
    c.send(&[Packet::Disconnect]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn every_bad_login_gets_connack_5_and_is_closed() {
    let f = start().await;
    let id = "dev1/m1";
    let good_user = username(id);
    let cases: Vec<(&str, String, String, String, RefuseReason)> = vec![
        (
            "bad signature (other module's key)",
            id.into(),
            good_user.clone(),
            module_token("dev1", "m1", KEY_M2),
            RefuseReason::BadSignature,
        ),
        (
            "expired token",
            id.into(),
            good_user.clone(),
            token(&sas::resource_uri(HOST, "dev1", Some("m1")), KEY_M1, -5),
            RefuseReason::Expired,
        ),
        (
            "audience of another module, signed with this key",
            id.into(),
            good_user.clone(),
            module_token("dev1", "m2", KEY_M1),
            RefuseReason::WrongAudience,
        ),
        (
            "audience on another hub",
            id.into(),
            good_user.clone(),
            token(
                &sas::resource_uri("other.azure-devices.net", "dev1", Some("m1")),
                KEY_M1,
                60,
            ),
            RefuseReason::WrongAudience,
        ),
        (
            "unknown identity",
            "dev1/ghost".into(),
            username("dev1/ghost"),
            module_token("dev1", "ghost", KEY_M1),
            RefuseReason::UnknownIdentity,
        ),
        (
            "user name of another identity",
            id.into(),
            username("dev1/m2"),
            module_token("dev1", "m1", KEY_M1),
            RefuseReason::BadUserName,
        ),
        (
            "user name without api-version",
            id.into(),
            format!("{HOST}/{id}/?DeviceClientType=x"),
            module_token("dev1", "m1", KEY_M1),
            RefuseReason::BadUserName,
        ),
        (
            "password not a token",
            id.into(),
            good_user.clone(),
            "hunter2".into(),
            RefuseReason::MalformedToken,
        ),
        (
            "client id with an empty module",
            "dev1/".into(),
            username("dev1/"),
            module_token("dev1", "m1", KEY_M1),
            RefuseReason::BadClientId,
        ),
    ];
    for (i, (what, client_id, user, password, reason)) in cases.iter().enumerate() {
        let (mut c, code) = Client::connect_with(&f.emu, client_id, user, password, 60).await;
        assert_eq!(code, ConnectReturnCode::NotAuthorized, "{what}");
        c.expect_closed().await;
        f.emu.wait_for_refusals(i as u64 + 1, WAIT).await.unwrap();
        assert_eq!(
            f.emu.stats().refused_by_reason.get(reason).copied(),
            Some(cases[..=i].iter().filter(|c| c.4 == *reason).count() as u64),
            "{what}"
        );
    }
    let stats = f.emu.stats();
    assert_eq!(stats.connects_refused, cases.len() as u64);
    assert_eq!(stats.connects_accepted, 0);

    // No credentials at all.
    let mut c = Client::tls(&f.emu).await;
    c.send(&[Packet::Connect(Connect::new(id))]).await;
    assert!(matches!(
        c.recv().await,
        Some(Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::NotAuthorized,
            ..
        }))
    ));
    c.expect_closed().await;

    // And the right credentials still work afterwards.
    Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
}

#[tokio::test]
async fn publishing_on_another_identitys_topic_disconnects_and_records_nothing_of_it() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let ok = c.publish(EVENTS_M1, "mine", QoS::AtLeastOnce);
    let bad = c.publish(
        "devices/dev1/modules/m2/messages/events/",
        "theirs",
        QoS::AtLeastOnce,
    );
    let after = c.publish(EVENTS_M1, "after", QoS::AtLeastOnce);
    c.send(&[ok, bad, after]).await;
    // The one before the offence is recorded and acknowledged; then the connection closes.
    assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(1))));
    c.expect_closed().await;
    let all = f.emu.received_all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload, "mine");
    assert_eq!(f.emu.count("dev1/m2"), 0);
    assert_eq!(f.emu.stats().protocol_violations, 1);

    // A non-telemetry topic and QoS 2 close the connection too.
    for (topic, qos) in [
        ("devices/dev1/modules/m1/inputs/x", QoS::AtLeastOnce),
        ("devices/leaf/messages/events/", QoS::AtLeastOnce),
        (EVENTS_M1, QoS::ExactlyOnce),
    ] {
        let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
        let p = c.publish(topic, "x", qos);
        c.send(&[p]).await;
        c.expect_closed().await;
    }
    assert_eq!(f.emu.total(), 1);
    assert_eq!(f.emu.stats().protocol_violations, 4);
}

#[tokio::test]
async fn a_malformed_packet_closes_only_its_connection() {
    let f = start().await;
    let mut other = Client::module(&f.emu, "dev1", "m2", KEY_M2).await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    // A SUBSCRIBE with no filters is malformed (MQTT 3.1.1 §3.8.3).
    c.stream.write_all(&[0x82, 0x02, 0x00, 0x01]).await.unwrap();
    c.stream.flush().await.unwrap();
    c.expect_closed().await;
    let p = other.publish(
        "devices/dev1/modules/m2/messages/events",
        "still here",
        QoS::AtLeastOnce,
    );
    other.send(&[p]).await;
    assert!(matches!(other.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(f.emu.count("dev1/m2"), 1);
}

#[tokio::test]
async fn subscriptions_are_granted_only_for_c2d_twin_and_methods() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let filters = [
        ("devices/dev1/messages/devicebound/#", QoS::AtLeastOnce),
        ("$iothub/twin/res/#", QoS::AtLeastOnce),
        ("$iothub/methods/POST/#", QoS::AtMostOnce),
        ("devices/dev2/messages/devicebound/#", QoS::AtLeastOnce),
        ("#", QoS::AtLeastOnce),
        ("$iothub/twin/res/#", QoS::ExactlyOnce),
    ];
    let sub = Subscribe {
        pkid: 9,
        filters: filters
            .iter()
            .map(|(p, q)| SubscribeFilter::new((*p).into(), *q))
            .collect(),
    };
    c.send(&[Packet::Subscribe(sub)]).await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 9);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Success(QoS::AtMostOnce),
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn refuse_logins_refuses_until_turned_off() {
    let f = start().await;
    f.emu.refuse_logins(true);
    let id = "dev1/m1";
    let (mut c, code) = Client::connect_with(
        &f.emu,
        id,
        &username(id),
        &module_token("dev1", "m1", KEY_M1),
        60,
    )
    .await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    c.expect_closed().await;
    f.emu.wait_for_refusals(1, WAIT).await.unwrap();
    assert_eq!(
        f.emu
            .stats()
            .refused_by_reason
            .get(&RefuseReason::RefuseLogins),
        Some(&1)
    );
    f.emu.refuse_logins(false);
    Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    assert_eq!(f.emu.stats().per_identity[id].connects_accepted, 1);
}

#[tokio::test]
async fn a_second_connection_of_an_identity_closes_the_first() {
    let f = start().await;
    let mut first = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let mut untouched = Client::module(&f.emu, "dev1", "m2", KEY_M2).await;
    let mut second = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    first.expect_closed().await;
    let p = second.publish(EVENTS_M1, "from the second", QoS::AtLeastOnce);
    second.send(&[p]).await;
    assert!(matches!(second.recv().await, Some(Packet::PubAck(_))));
    untouched.send(&[Packet::PingReq]).await;
    assert_eq!(untouched.recv().await, Some(Packet::PingResp));
    let r = &f.emu.received("dev1/m1")[0];
    assert_eq!(r.payload, "from the second");
    let stats = f.emu.stats();
    assert_eq!(stats.per_identity["dev1/m1"].connects_accepted, 2);
    assert_eq!(stats.connections_replaced, 1);
}

#[tokio::test]
async fn drop_connections_closes_every_connection_and_logins_work_again() {
    let f = start().await;
    let mut a = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let mut b = Client::module(&f.emu, "dev1", "m2", KEY_M2).await;
    f.emu.drop_connections();
    a.expect_closed().await;
    b.expect_closed().await;
    // Anything sent now is not recorded: the connection is gone.
    let p = a.publish(EVENTS_M1, "too late", QoS::AtLeastOnce);
    let _ = a.try_send(&[p]).await;
    let mut a = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let p = a.publish(EVENTS_M1, "after", QoS::AtLeastOnce);
    a.send(&[p]).await;
    assert!(matches!(a.recv().await, Some(Packet::PubAck(_))));
    let all = f.emu.received_all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload, "after");
    assert_eq!(f.emu.stats().connections_dropped, 2);
    f.emu.wait_for_connects("dev1/m1", 2, WAIT).await.unwrap();
}

#[tokio::test]
async fn go_away_refuses_the_port_and_come_back_listens_on_the_same_address() {
    let f = start().await;
    let addr = f.emu.addr();
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    f.emu.go_away().await;
    assert!(!f.emu.is_listening());
    c.expect_closed().await;
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "port still accepts: {refused:?}");
    assert_eq!(f.emu.stats().live_connections, 0);

    f.emu.come_back().await.unwrap();
    assert_eq!(f.emu.addr(), addr);
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let p = c.publish(EVENTS_M1, "back", QoS::AtLeastOnce);
    c.send(&[p]).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(f.emu.count("dev1/m1"), 1);
    // Coming back while listening is a no-op.
    f.emu.come_back().await.unwrap();
}

#[tokio::test]
async fn set_ack_false_swallows_then_true_acknowledges() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    f.emu.set_ack(false);
    let p = c.publish(EVENTS_M1, "lost", QoS::AtLeastOnce);
    c.send(&[p, Packet::PingReq]).await;
    // The PINGRESP comes first and alone: no PUBACK for the swallowed publish.
    assert_eq!(c.recv().await, Some(Packet::PingResp));
    assert_eq!(f.emu.total(), 0);
    assert_eq!(f.emu.stats().publishes_swallowed, 1);
    f.emu.wait_for_swallowed(1, WAIT).await.unwrap();
    let err = f
        .emu
        .wait_for_swallowed(2, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err.got, 1);

    f.emu.set_ack(true);
    // The connection that lost a message stays a dead path: nothing after it is acknowledged.
    let p = c.publish(EVENTS_M1, "after", QoS::AtLeastOnce);
    c.send(&[p, Packet::PingReq]).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
    assert_eq!(f.emu.total(), 0);
    f.emu.wait_for_swallowed(2, WAIT).await.unwrap();
    // A new connection sees acknowledgements on again.
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let p = c.publish(EVENTS_M1, "kept", QoS::AtLeastOnce);
    c.send(&[p]).await;
    assert_eq!(c.recv().await, Some(Packet::PubAck(PubAck::new(1))));
    let all = f.emu.received_all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload, "kept");
}

#[tokio::test]
async fn silence_past_one_and_a_half_keep_alives_closes() {
    let f = start().await;
    let id = "dev1/m1";
    let (mut c, code) = Client::connect_with(
        &f.emu,
        id,
        &username(id),
        &module_token("dev1", "m1", KEY_M1),
        1,
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);
    let started = tokio::time::Instant::now();
    c.expect_closed().await;
    let silent = started.elapsed();
    assert!(
        silent >= Duration::from_millis(1400),
        "closed after {silent:?}"
    );
    assert_eq!(f.emu.stats().keep_alive_timeouts, 1);
}

#[tokio::test]
async fn waits_time_out_with_what_they_saw() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let p = c.publish(EVENTS_M1, "one", QoS::AtLeastOnce);
    c.send(&[p]).await;
    f.emu.wait_for_count("dev1/m1", 1, WAIT).await.unwrap();
    let err = f
        .emu
        .wait_for_count("dev1/m1", 2, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!((err.wanted, err.got), (2, 1));
    let err = f
        .emu
        .wait_for_total(5, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!((err.wanted, err.got), (5, 1));
}

#[tokio::test]
async fn waiters_wake_on_arrival_from_concurrent_connections() {
    let f = start().await;
    let emu = &f.emu;
    let per = 2_000;
    let send = |device: &'static str, module: &'static str, key: &'static [u8]| async move {
        let mut c = Client::module(emu, device, module, key).await;
        let topic = format!("devices/{device}/modules/{module}/messages/events/");
        let packets: Vec<Packet> = (0..per)
            .map(|i| c.publish(&topic, &i.to_string(), QoS::AtLeastOnce))
            .collect();
        c.send(&packets).await;
        for _ in 0..per {
            assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
        }
    };
    let (r, _, _) = tokio::join!(
        emu.wait_for_total(2 * per, WAIT),
        send("dev1", "m1", KEY_M1),
        send("dev1", "m2", KEY_M2),
    );
    r.unwrap();
    // Per identity, arrival order is publish order; seq is global and gapless.
    for id in ["dev1/m1", "dev1/m2"] {
        let got: Vec<String> = emu
            .received(id)
            .iter()
            .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(got, (0..per).map(|i| i.to_string()).collect::<Vec<_>>());
    }
    emu.wait_until("both identities complete", WAIT, |all, stats| {
        all.len() == 2 * per && stats.per_identity["dev1/m2"].publishes == per as u64
    })
    .await
    .unwrap();
    let err = emu
        .wait_until("a third identity", Duration::from_millis(50), |_, stats| {
            stats.per_identity.contains_key("leaf")
        })
        .await
        .unwrap_err();
    assert_eq!((err.what.as_str(), err.got), ("a third identity", 0));
    let seqs: Vec<u64> = emu.received_all().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..2 * per as u64).collect::<Vec<_>>());
}

/// Throughput of the emulator itself (run with `--release -- --ignored --nocapture`): one
/// identity pushes 100,000 QoS 1 messages with up to 1,000 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure, not a check; run in release"]
async fn throughput_100k_qos1_one_identity() {
    let f = start().await;
    let c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let total: usize = 100_000;
    let window: usize = 1_000;
    let (mut rd, mut wr) = tokio::io::split(c.stream);
    let (credit_tx, mut credit_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let mut in_flight = 0usize;
        let payload = vec![b'x'; 256];
        while sent < total {
            while in_flight >= window {
                in_flight -= credit_rx.recv().await.unwrap();
            }
            while let Ok(n) = credit_rx.try_recv() {
                in_flight -= n;
            }
            let batch = (window - in_flight).min(total - sent).min(100);
            let mut out = BytesMut::new();
            for i in 0..batch {
                let mut p = Publish::new(
                    format!("{EVENTS_M1}%24.mid={}", sent + i),
                    QoS::AtLeastOnce,
                    payload.clone(),
                );
                p.pkid = ((sent + i) % 65_535 + 1) as u16;
                Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
            }
            wr.write_all(&out).await.unwrap();
            sent += batch;
            in_flight += batch;
        }
        wr.flush().await.unwrap();
        wr
    });
    let mut buf = BytesMut::new();
    let mut acked = 0usize;
    while acked < total {
        let mut n = 0;
        loop {
            match Packet::read(&mut buf, usize::MAX) {
                Ok(Packet::PubAck(_)) => n += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        if n > 0 {
            acked += n;
            let _ = credit_tx.send(n);
            continue;
        }
        assert!(rd.read_buf(&mut buf).await.unwrap() > 0, "closed");
    }
    let elapsed = started.elapsed();
    let _wr = writer.await.unwrap();
    assert_eq!(f.emu.count("dev1/m1"), total);
    println!(
        "{total} QoS 1 messages of 256 B in {elapsed:?}: {:.0} msgs/s",
        total as f64 / elapsed.as_secs_f64()
    );
}

/// The binary: JSON line at start, one per message, answers to stdin commands.
#[tokio::test]
async fn the_binary_reports_messages_and_obeys_commands() {
    use base64::Engine as _;
    use tokio::io::AsyncBufReadExt;

    let dir = tempfile::tempdir().unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(KEY_M1);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub-emulator"))
        .args(["--bind", "127.0.0.1:0", "--hostname", HOST, "--tls-dir"])
        .arg(dir.path())
        .args(["--identity", &format!("dev1/m1={key}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let started = next_json(&mut lines).await;
    assert_eq!(started["event"], "started");
    let addr: std::net::SocketAddr = started["addr"].as_str().unwrap().parse().unwrap();
    let ca = std::path::PathBuf::from(started["ca"].as_str().unwrap());

    let mut c = Client::tls_to(addr, &ca, HOST).await;
    let mut connect = Connect::new("dev1/m1");
    connect.set_login(username("dev1/m1"), module_token("dev1", "m1", KEY_M1));
    let p = c.publish(
        &format!("{EVENTS_M1}%24.mid=1&k=v"),
        "hello",
        QoS::AtLeastOnce,
    );
    c.send(&[Packet::Connect(connect), p]).await;
    assert!(matches!(
        c.recv().await,
        Some(Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        }))
    ));
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    let m = next_json(&mut lines).await;
    assert_eq!(m["event"], "message");
    assert_eq!(m["identity"], "dev1/m1");
    assert_eq!(m["payload"], "hello");
    assert_eq!(m["properties"]["$.mid"], "1");
    assert_eq!(m["properties"]["k"], "v");
    assert_eq!(m["seq"], 0);

    stdin.write_all(b"drop\nstats\naway\n").await.unwrap();
    assert_eq!(next_json(&mut lines).await["command"], "drop");
    c.expect_closed().await;
    let stats = next_json(&mut lines).await;
    assert_eq!(stats["event"], "stats");
    assert_eq!(stats["stats"]["publishes"], 1);
    assert_eq!(next_json(&mut lines).await["command"], "away");
    assert!(TcpStream::connect(addr).await.is_err());
    stdin.write_all(b"back\nfly\n").await.unwrap();
    assert_eq!(next_json(&mut lines).await["event"], "ok");
    assert_eq!(next_json(&mut lines).await["event"], "error");
    Client::tls_to(addr, &ca, HOST).await;
    child.kill().await.unwrap();
}

async fn next_json(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> serde_json::Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("stdout open");
    serde_json::from_str(&line).unwrap()
}

/// Sends SUBSCRIBE for `filters` (QoS 1) and waits for its SUBACK.
async fn subscribe(c: &mut Client, filters: &[&str]) {
    let sub = Subscribe {
        pkid: 77,
        filters: filters
            .iter()
            .map(|p| SubscribeFilter::new((*p).into(), QoS::AtLeastOnce))
            .collect(),
    };
    c.send(&[Packet::Subscribe(sub)]).await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.pkid, 77),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// The next PUBLISH the client gets (PUBACKs of its own publishes skipped): topic and body.
async fn next_publish(c: &mut Client) -> (String, serde_json::Value) {
    loop {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                let body = if p.payload.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_slice(&p.payload).unwrap()
                };
                return (p.topic, body);
            }
            Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn twin_get_and_reported_patches_merge_with_versions_and_bad_patches_change_nothing() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    subscribe(&mut c, &["$iothub/twin/res/#"]).await;
    let get = c.publish("$iothub/twin/GET/?$rid=1", "", QoS::AtMostOnce);
    c.send(&[get]).await;
    let (topic, doc) = next_publish(&mut c).await;
    assert_eq!(topic, "$iothub/twin/res/200/?$rid=1");
    assert_eq!(
        doc,
        serde_json::json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );
    let patch = c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        r#"{"fw":"1.2","cfg":{"a":1,"b":2}}"#,
        QoS::AtLeastOnce,
    );
    c.send(&[patch]).await;
    assert_eq!(
        next_publish(&mut c).await.0,
        "$iothub/twin/res/204/?$rid=2&$version=2"
    );
    let bad = c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        "[1,2]",
        QoS::AtMostOnce,
    );
    c.send(&[bad]).await;
    let (topic, why) = next_publish(&mut c).await;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=3");
    assert!(why["message"].as_str().unwrap().contains("object"), "{why}");
    let patch = c.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=4",
        r#"{"cfg":{"a":null}}"#,
        QoS::AtMostOnce,
    );
    c.send(&[patch]).await;
    assert_eq!(
        next_publish(&mut c).await.0,
        "$iothub/twin/res/204/?$rid=4&$version=3"
    );
    f.emu
        .wait_for_reported_version("dev1/m1", 3, WAIT)
        .await
        .unwrap();
    let twin = f.emu.twin("dev1/m1");
    assert_eq!(
        serde_json::Value::Object(twin.reported),
        serde_json::json!({"fw": "1.2", "cfg": {"b": 2}})
    );
    // Another identity's twin is its own.
    assert!(f.emu.twin("dev1/m2").reported.is_empty());
    let stats = f.emu.stats();
    assert_eq!(
        (
            stats.twin_gets,
            stats.reported_patches,
            stats.reported_patches_refused
        ),
        (1, 2, 1)
    );
}

#[tokio::test]
async fn desired_updates_reach_only_a_connection_subscribed_to_them() {
    let f = start().await;
    let mut c = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let patch = serde_json::json!({"rate": 5});
    let (v, sent) = f.emu.update_desired("dev1/m1", patch.as_object().unwrap());
    assert_eq!((v, sent), (2, false), "not subscribed yet");
    subscribe(&mut c, &["$iothub/twin/PATCH/properties/desired/#"]).await;
    let patch = serde_json::json!({"rate": null, "mode": "fast"});
    let (v, sent) = f.emu.update_desired("dev1/m1", patch.as_object().unwrap());
    assert_eq!((v, sent), (3, true));
    let (topic, body) = next_publish(&mut c).await;
    assert_eq!(topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    assert_eq!(
        body,
        serde_json::json!({"rate": null, "mode": "fast", "$version": 3})
    );
    assert_eq!(
        f.emu.twin("dev1/m1").document()["desired"],
        serde_json::json!({"mode": "fast", "$version": 3})
    );
}

#[tokio::test]
async fn a_method_is_answered_only_by_the_identity_it_was_sent_to() {
    let f = start().await;
    let not_yet = f
        .emu
        .invoke_method("dev1/m1", "reboot", &serde_json::json!({}), WAIT)
        .await;
    assert_eq!(
        not_yet,
        Err(iothub_emulator::MethodError::NotConnected("dev1/m1".into()))
    );
    let mut m1 = Client::module(&f.emu, "dev1", "m1", KEY_M1).await;
    let mut m2 = Client::module(&f.emu, "dev1", "m2", KEY_M2).await;
    subscribe(&mut m1, &["$iothub/methods/POST/#"]).await;
    let emu = &f.emu;
    let args = serde_json::json!({"delay": 3});
    let call = emu.invoke_method("dev1/m1", "reboot", &args, WAIT);
    let answer = async {
        let (topic, body) = next_publish(&mut m1).await;
        assert_eq!(body, serde_json::json!({"delay": 3}));
        let rid = topic
            .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
            .unwrap_or_else(|| panic!("{topic}"))
            .to_owned();
        // m2 answers m1's request first: that must not complete it.
        let forged = m2.publish(
            &format!("$iothub/methods/res/500/?$rid={rid}"),
            r#"{"forged":true}"#,
            QoS::AtMostOnce,
        );
        m2.send(&[forged]).await;
        let real = m1.publish(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            r#"{"ok":true}"#,
            QoS::AtLeastOnce,
        );
        m1.send(&[real]).await;
    };
    let (response, ()) = tokio::join!(call, answer);
    assert_eq!(
        response,
        Ok(iothub_emulator::MethodResponse {
            status: 200,
            payload: serde_json::json!({"ok": true})
        })
    );
    // A method nobody answers times out (the only wait that must run out; 1 s of real time).
    let silent = f
        .emu
        .invoke_method(
            "dev1/m1",
            "sleep",
            &serde_json::json!(null),
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(silent, Err(iothub_emulator::MethodError::Timeout { .. })),
        "{silent:?}"
    );
    let stats = f.emu.stats();
    assert_eq!((stats.methods_invoked, stats.method_responses), (2, 1));
}
