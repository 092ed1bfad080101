//! Reliability of the MQTT head against a module that bends the protocol (issue 11): a QoS 1
//! PUBLISH resent before its PUBACK, a connection whose SAS token expires while it is open, and
//! a module that writes without reading (here: the hub binary's peak RSS; also at unit level in
//! `hub/src/mqtt/connection.rs`, over an in-memory pipe with no kernel buffers in between).
//!
//! Each test starts its own in-process hub (three modules, `sender/outputs/* →
//! receiver/inputs/input1`). Every expectation is a packet or a close awaited with a deadline
//! that only bounds a failure.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::time::Duration;

use bytes::BytesMut;
use hub::auth::sas::CLOCK_SKEW_SECS;
use raw::{http_get, now_secs, RawClient, TestHub};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

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

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// The value of the first series starting with `prefix` and containing `needle`, if any.
fn metric(text: &str, prefix: &str, needle: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l.contains(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// 1. A QoS 1 PUBLISH resent with the same packet id before its PUBACK
// ---------------------------------------------------------------------------------------------

/// MQTT 3.1.1 §4.3.2: one PUBACK per packet id in flight. A client frees packet id 7 at its
/// first PUBACK and may reuse it at once; a second PUBACK for the resend would then acknowledge
/// that newer message before it is durable. The resend is dropped: one PUBACK, one stored copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_resent_with_dup_before_its_puback_is_acked_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let topic = hub.creds("sender").output_topic();
    let mut s = hub.plain().await;
    let ack = s.connect(hub.creds("sender").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    // The publish and its resend in one write: the hub reads the resend in the same pass as the
    // original, long before the original can be durable (a group commit is an fdatasync away).
    let original = raw::publish(&topic, QoS::AtLeastOnce, 7, b"once");
    let mut resend = original.clone();
    resend.dup = true;
    let mut bytes = BytesMut::new();
    for p in [original, resend] {
        Packet::Publish(p).write(&mut bytes, usize::MAX).unwrap();
    }
    s.writer.send_raw(&bytes).await.unwrap();
    // A later publish: PUBACKs leave in arrival order, so every PUBACK for 7 comes before 8's.
    s.writer
        .publish(&topic, QoS::AtLeastOnce, 8, b"marker")
        .await;
    let mut acks_for_7 = 0;
    loop {
        match s.reader.expect_packet(T).await {
            Packet::PubAck(a) if a.pkid == 7 => acks_for_7 += 1,
            Packet::PubAck(a) if a.pkid == 8 => break,
            other => panic!("unexpected packet {other:?}"),
        }
    }
    assert_eq!(
        acks_for_7, 1,
        "packet id 7 was acknowledged {acks_for_7} times"
    );
    // Delivery is in order: a second stored copy would arrive before the marker.
    assert_eq!(
        payloads(&receive(&mut r, 2).await),
        ["once", "marker"],
        "the resend was stored as a second message"
    );
    hub.stop().await;
}

/// Reusing a packet id still awaiting its PUBACK *without* DUP breaks MQTT-2.3.1-2: it cannot be
/// a resend, and acknowledging it would answer two messages with one id. The connection closes
/// with neither the reuse stored nor a second PUBACK for the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_id_reused_without_dup_before_its_puback_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let mut r = hub.subscribed_receiver("receiver").await;
    let topic = hub.creds("sender").output_topic();
    let mut s = hub.plain().await;
    let ack = s.connect(hub.creds("sender").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let mut bytes = BytesMut::new();
    for body in [&b"first"[..], b"reuse"] {
        Packet::Publish(raw::publish(&topic, QoS::AtLeastOnce, 9, body))
            .write(&mut bytes, usize::MAX)
            .unwrap();
    }
    s.writer.send_raw(&bytes).await.unwrap();
    let seen = s.reader.expect_closed(T).await;
    let acks = seen
        .iter()
        .filter(|p| matches!(p, Packet::PubAck(a) if a.pkid == 9))
        .count();
    assert!(acks <= 1, "packet id 9 acknowledged {acks} times: {seen:?}");
    // `first` may have been stored (and acknowledged before the close); `reuse` never is.
    let (mut s, _) = hub.connected("sender", true).await;
    s.writer
        .publish(&topic, QoS::AtLeastOnce, 1, b"marker")
        .await;
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("marker") {
        got.extend(payloads(&receive(&mut r, 1).await));
    }
    assert!(
        !got.iter().any(|p| p == "reuse"),
        "the publish reusing a pending id was stored: {got:?}"
    );
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. A connection whose SAS token expires
// ---------------------------------------------------------------------------------------------

/// edgeHub re-authenticates connected clients; a token is good until `se` plus the clock-skew
/// allowance, and so is the connection it opened. A connection whose token expires is closed
/// (and counted), while another module's connection with a good token stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_connection_closes_when_its_sas_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let hub = TestHub::start(dir.path()).await;
    let (mut lasting, _) = hub.connected("receiver", true).await;
    let sender = hub.creds("sender");
    // Accepted now, refused from about 3 s on (`se` + the skew allowance).
    let expiry = now_secs() + 3 - CLOCK_SKEW_SECS;
    let token = sender.token_for("sender", expiry);
    let mut s = hub.plain().await;
    // keep-alive 0: the hub's keep-alive timeout is 10 min, far past the token.
    let ack = s
        .connect(sender.connect_with(&sender.client_id(), &token, true, 0))
        .await;
    assert_eq!(
        ack.code,
        ConnectReturnCode::Success,
        "token refused at once"
    );
    let seen = s.reader.expect_closed(Duration::from_secs(30)).await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(
        now_secs() >= expiry + CLOCK_SKEW_SECS,
        "closed before the token expired"
    );
    assert_eq!(lasting.ping().await, vec![Packet::PingResp]);
    let text = http_get(hub.addrs.metrics, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &text,
            "edgehub_client_token_expired_total{",
            "protocol=\"mqtt\""
        ),
        Some(1.0),
        "{text}"
    );
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A module that writes without reading
// ---------------------------------------------------------------------------------------------

/// A field of `/proc/{pid}/status` in KiB (`VmRSS`, `VmHWM`, …).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

/// The hub binary, a module flooding 2,000,000 PINGREQs (4 MB) over TLS and never reading: the
/// hub's peak memory (`VmHWM`, the high-water mark of its RSS, so no moment is missed) grows by
/// far less than 64 MiB. Before, it queued a PINGRESP for every ping it could not send (about
/// 80 bytes each: some 150 MB here). The client's receive buffer is set to 4 KiB (kernel
/// autotuning would otherwise hold megabytes of PINGRESPs for it). The flood ends either way:
/// the hub stops reading, its keep-alive (3 s here) closes the connection and the client's
/// write fails; or the client has written everything. The test then waits for the hub's
/// "module disconnected" line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_flooding_pings_without_reading_leaves_the_hubs_memory_bounded() {
    const PINGS: usize = 2_000_000;
    const CHUNK: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), raw::MANIFEST).unwrap();
    let hub = raw::BinaryHub::start(dir.path(), 0).await;
    let pid = hub.child.id();
    let creds = raw::module_creds(&dir.path().join("data"), "sender");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(hub.addrs.mqtt).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(raw::tls_config(&hub::tls::ca_path(
        &dir.path().join("data"),
    )));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut rx, mut tx) = tokio::io::split(tls);
    let mut bytes = BytesMut::new();
    Packet::Connect(creds.connect(true, 2))
        .write(&mut bytes, usize::MAX)
        .unwrap();
    Packet::PingReq.write(&mut bytes, usize::MAX).unwrap();
    tx.write_all(&bytes).await.unwrap();
    let mut got = BytesMut::new();
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match Packet::read(&mut got, 1024) {
            Ok(p) => answers.push(p),
            Err(_) => {
                let n = tokio::time::timeout(T, rx.read_buf(&mut got))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed before CONNACK and PINGRESP");
            }
        }
    }
    assert!(
        matches!(&answers[0], Packet::ConnAck(a) if a.code == ConnectReturnCode::Success),
        "{answers:?}"
    );
    let base = proc_status_kib(pid, "VmHWM");
    let mut chunk = BytesMut::new();
    for _ in 0..CHUNK {
        Packet::PingReq.write(&mut chunk, usize::MAX).unwrap();
    }
    let mut written = 0;
    while written < PINGS {
        if tx.write_all(&chunk).await.is_err() {
            break;
        }
        written += CHUNK;
    }
    // The connection ends (keep-alive) once the hub has nothing more to read; a hub whose
    // peak memory passed the bound meanwhile has failed already.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&hub.log)
        .unwrap_or_default()
        .contains("module disconnected")
        && proc_status_kib(pid, "VmHWM").saturating_sub(base) < 64 * 1024
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flooding connection was never closed:\n{}",
            hub.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = proc_status_kib(pid, "VmHWM");
    let grown_mib = peak.saturating_sub(base) / 1024;
    eprintln!("{written} pings written; the hub's peak RSS grew by {grown_mib} MiB");
    assert!(
        grown_mib < 64,
        "the hub's peak RSS grew by {grown_mib} MiB ({base} KiB → {peak} KiB) for {written} \
         pings the client never read the answers to"
    );
    drop(rx);
}
