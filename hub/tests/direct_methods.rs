//! Direct methods between modules on the raw wire: the HTTPS endpoint (`--methods-addr`) as a
//! caller's SDK reaches it, and the target's MQTT connection as a raw client.
//!
//! Each test starts its own in-process hub (modules `sender`, `receiver`, `spy`) with the
//! methods listener on a free port, and waits on events (responses, PUBACKs), never on time.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use raw::{now_secs, Creds, RawClient, TestHub, DEVICE};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WITHIN: Duration = Duration::from_secs(30);
const METHODS_FILTER: &str = "$iothub/methods/POST/#";

async fn hub(root: &Path) -> TestHub {
    TestHub::start_with(root, |raw| {
        raw.methods_addr = Some("127.0.0.1:0".into());
    })
    .await
}

fn methods_addr(hub: &TestHub) -> SocketAddr {
    hub.methods.expect("a methods listener")
}

/// The path the SDKs post to for `module` of this device.
fn path(module: &str) -> String {
    format!("/twins/{DEVICE}/modules/{module}/methods?api-version=2019-10-01")
}

/// The headers an SDK sends for `caller`, with a good token.
fn auth(caller: &Creds) -> Vec<(String, String)> {
    vec![
        ("Authorization".into(), caller.token()),
        ("x-ms-edge-moduleId".into(), caller.client_id()),
    ]
}

/// One HTTP/1.1 request over TLS (`Connection: close`); the status and the body as JSON.
async fn post(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    content_length: Option<usize>,
) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("TCP");
    let connector = tokio_rustls::TlsConnector::from(raw::tls_config(ca));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(WITHIN, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        content_length.unwrap_or(body.len())
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.expect("write");
    // The hub may answer (and close) before it read a body it refuses.
    let _ = tls.write_all(body).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WITHIN, tls.read_to_end(&mut out))
        .await
        .expect("the answer in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or_else(|_| json!({ "raw": body }));
    (status, json)
}

async fn invoke(hub: &TestHub, caller: &Creds, target: &str, request: Value) -> (u16, Value) {
    post(
        methods_addr(hub),
        &hub.ca(),
        &path(target),
        &auth(caller),
        request.to_string().as_bytes(),
        None,
    )
    .await
}

/// `module` connected over MQTT and subscribed to its methods (SUBACK received).
async fn method_target(hub: &TestHub, module: &str) -> RawClient {
    let (mut c, _) = hub.connected(module, true).await;
    let (suback, _) = c.subscribe(1, &[METHODS_FILTER]).await;
    assert_eq!(
        suback.return_codes,
        vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
            QoS::AtLeastOnce
        )]
    );
    c
}

/// The `$rid` of a request topic, checking its method name.
fn rid_of(publish: &Publish, method: &str) -> String {
    let prefix = format!("$iothub/methods/POST/{method}/?$rid=");
    publish
        .topic
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("not a {method} request: {}", publish.topic))
        .to_owned()
}

/// Answers a request with QoS 1 and waits for the hub's PUBACK (sent after the hub handled it).
async fn answer(c: &mut RawClient, pkid: u16, status: u16, rid: &str, payload: Value) {
    let topic = format!("$iothub/methods/res/{status}/?$rid={rid}");
    c.writer
        .publish(
            &topic,
            QoS::AtLeastOnce,
            pkid,
            payload.to_string().as_bytes(),
        )
        .await;
    match c.reader.expect_packet(WITHIN).await {
        Packet::PubAck(ack) => assert_eq!(ack.pkid, pkid),
        other => panic!("expected the PUBACK of the response, got {other:?}"),
    }
}

/// A caller whose token is missing, forged, expired, someone else's, or who names another
/// module in `x-ms-edge-moduleId` gets 401 with a JSON error, and the target is not called:
/// the first request it ever receives is the one valid call made after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_a_valid_token_of_its_own_is_401_and_calls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let mut target = method_target(&hub, "receiver").await;
    let sender = hub.creds("sender");
    let mut forged = sender.clone();
    forged.key = b"not the key of sender at all....".to_vec();
    let body = json!({"methodName": "ping", "payload": "forged"}).to_string();
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("no headers", vec![]),
        (
            "no x-ms-edge-moduleId",
            vec![("Authorization".into(), sender.token())],
        ),
        (
            "no Authorization",
            vec![("x-ms-edge-moduleId".into(), sender.client_id())],
        ),
        ("forged token", auth(&forged)),
        (
            "expired token",
            vec![
                (
                    "Authorization".into(),
                    sender.token_for("sender", now_secs() - 3600),
                ),
                ("x-ms-edge-moduleId".into(), sender.client_id()),
            ],
        ),
        (
            "sender's token, receiver's name",
            vec![
                ("Authorization".into(), sender.token()),
                ("x-ms-edge-moduleId".into(), format!("{DEVICE}/receiver")),
            ],
        ),
        (
            "a token naming another module",
            vec![
                (
                    "Authorization".into(),
                    sender.token_for("receiver", now_secs() + 3600),
                ),
                ("x-ms-edge-moduleId".into(), sender.client_id()),
            ],
        ),
        (
            "an undeclared module",
            vec![
                ("Authorization".into(), sender.token()),
                ("x-ms-edge-moduleId".into(), format!("{DEVICE}/nobody")),
            ],
        ),
        (
            "not device/module",
            vec![
                ("Authorization".into(), sender.token()),
                ("x-ms-edge-moduleId".into(), "sender".into()),
            ],
        ),
    ];
    for (what, headers) in cases {
        let (status, err) = post(
            methods_addr(&hub),
            &hub.ca(),
            &path("receiver"),
            &headers,
            body.as_bytes(),
            None,
        )
        .await;
        assert_eq!(status, 401, "{what}: {err}");
        assert_eq!(err["errorCode"], 401_002, "{what}: {err}");
        assert!(err["message"].as_str().is_some(), "{what}: {err}");
    }
    // The valid call is the first the target sees.
    let calling = {
        let (addr, ca) = (methods_addr(&hub), hub.ca());
        let headers = auth(&sender);
        tokio::spawn(async move {
            let body = json!({"methodName": "ping", "payload": "valid"}).to_string();
            post(
                addr,
                &ca,
                &path("receiver"),
                &headers,
                body.as_bytes(),
                None,
            )
            .await
        })
    };
    let request = target.reader.expect_publish(WITHIN).await;
    assert_eq!(&request.payload[..], b"\"valid\"");
    let rid = rid_of(&request, "ping");
    answer(&mut target, 1, 200, &rid, json!("pong")).await;
    let (status, reply) = calling.await.unwrap();
    assert_eq!(
        (status, reply),
        (200, json!({"status": 200, "payload": "pong"}))
    );
    hub.stop().await;
}

/// A payload over 128 KiB is 413 (IoT Hub's RequestEntityTooLarge), a body declared larger
/// than the limit is refused without being read, one at the limit passes, and the target gets
/// only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_413_and_one_at_the_limit_goes_through() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(hub(dir.path()).await);
    let mut target = method_target(&hub, "receiver").await;
    let sender = hub.creds("sender");
    const LIMIT: usize = 128 * 1024;
    // A JSON string of n characters is n + 2 bytes.
    let over = json!({"methodName": "big", "payload": "x".repeat(LIMIT - 1)});
    let (status, err) = invoke(&hub, &sender, "receiver", over).await;
    assert_eq!(status, 413, "{err}");
    assert_eq!(err["errorCode"], 413_001, "{err}");
    let (status, err) = post(
        methods_addr(&hub),
        &hub.ca(),
        &path("receiver"),
        &auth(&sender),
        b"",
        Some(10 * 1024 * 1024),
    )
    .await;
    assert_eq!(status, 413, "a body declared over the limit: {err}");
    let (status, err) = invoke(
        &hub,
        &sender,
        "receiver",
        json!({"methodName": "ping", "responseTimeoutInSeconds": 4}),
    )
    .await;
    assert_eq!(status, 400, "a response timeout under 5 s: {err}");
    let calling = {
        let (hub, sender) = (Arc::clone(&hub), sender.clone());
        tokio::spawn(async move {
            let at_limit = json!({"methodName": "big", "payload": "x".repeat(LIMIT - 2)});
            invoke(&hub, &sender, "receiver", at_limit).await
        })
    };
    let request = target.reader.expect_publish(WITHIN).await;
    assert_eq!(request.payload.len(), LIMIT);
    let rid = rid_of(&request, "big");
    answer(&mut target, 1, 201, &rid, json!({"size": LIMIT})).await;
    let (status, reply) = calling.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(reply, json!({"status": 201, "payload": {"size": LIMIT}}));
    match Arc::try_unwrap(hub) {
        Ok(hub) => hub.stop().await,
        Err(_) => panic!("hub still shared"),
    }
}

/// A response completes only the request handed to that very connection: another module
/// answering the target's `$rid` (its PUBACK shows the hub handled it) and an unknown `$rid`
/// complete nothing; the target's own answer then arrives intact. A module connected but not
/// subscribed to its methods, or one that unsubscribed, is 404 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_from_another_module_completes_nothing_and_an_unsubscribed_target_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(hub(dir.path()).await);
    let sender = hub.creds("sender");
    let (mut spy, _) = hub.connected("spy", true).await;
    let (status, err) = invoke(&hub, &sender, "spy", json!({"methodName": "m"})).await;
    assert_eq!(status, 404, "connected but not subscribed: {err}");
    assert_eq!(err["errorCode"], 404_103, "{err}");
    let (status, _) = invoke(&hub, &sender, "nobody", json!({"methodName": "m"})).await;
    assert_eq!(status, 404, "an undeclared target");
    let (status, _) = post(
        methods_addr(&hub),
        &hub.ca(),
        "/twins/other-device/modules/receiver/methods",
        &auth(&sender),
        json!({"methodName": "m"}).to_string().as_bytes(),
        None,
    )
    .await;
    assert_eq!(status, 403, "a module of another device");

    let mut target = method_target(&hub, "receiver").await;
    let calling = {
        let (hub, sender) = (Arc::clone(&hub), sender.clone());
        tokio::spawn(async move {
            invoke(
                &hub,
                &sender,
                "receiver",
                json!({"methodName": "ping", "payload": {"n": 1}}),
            )
            .await
        })
    };
    let request = target.reader.expect_publish(WITHIN).await;
    assert_eq!(request.qos, QoS::AtMostOnce);
    let rid = rid_of(&request, "ping");
    answer(&mut spy, 1, 500, &rid, json!("from the spy")).await;
    answer(&mut target, 1, 200, "999999", json!("unknown rid")).await;
    assert!(
        !calling.is_finished(),
        "a foreign or unknown answer completed the call"
    );
    answer(&mut target, 2, 200, &rid, json!("from the target")).await;
    let (status, reply) = calling.await.unwrap();
    assert_eq!(
        (status, reply),
        (200, json!({"status": 200, "payload": "from the target"}))
    );

    target.unsubscribe_methods().await;
    let (status, _) = invoke(&hub, &sender, "receiver", json!({"methodName": "m"})).await;
    assert_eq!(status, 404, "after UNSUBSCRIBE");
    drop((spy, target));
    match Arc::try_unwrap(hub) {
        Ok(hub) => hub.stop().await,
        Err(_) => panic!("hub still shared"),
    }
}

trait Unsubscribe {
    async fn unsubscribe_methods(&mut self);
}

impl Unsubscribe for RawClient {
    async fn unsubscribe_methods(&mut self) {
        let unsub = rumqttc::mqttbytes::v4::Unsubscribe::new(METHODS_FILTER);
        let mut unsub = unsub;
        unsub.pkid = 9;
        self.writer.send(&Packet::Unsubscribe(unsub)).await;
        match self.reader.expect_packet(WITHIN).await {
            Packet::UnsubAck(ack) => assert_eq!(ack.pkid, 9),
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }
}

/// Requests go to the target module's own connection only: another module subscribed to its
/// own methods (wider method filters are refused) gets none of them. Its first request is the
/// one made to it, after a call to the target has completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_subscribed_to_methods_gets_only_its_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(hub(dir.path()).await);
    let sender = hub.creds("sender");
    let (mut spy, _) = hub.connected("spy", true).await;
    let (suback, _) = spy
        .subscribe(
            1,
            &[
                METHODS_FILTER,
                "$iothub/methods/POST/+",
                "$iothub/methods/#",
                "$iothub/#",
            ],
        )
        .await;
    use rumqttc::mqttbytes::v4::SubscribeReasonCode::{Failure, Success};
    assert_eq!(
        suback.return_codes,
        vec![Success(QoS::AtLeastOnce), Failure, Failure, Failure]
    );
    let mut target = method_target(&hub, "receiver").await;
    let to_target = {
        let (hub, sender) = (Arc::clone(&hub), sender.clone());
        tokio::spawn(async move {
            invoke(
                &hub,
                &sender,
                "receiver",
                json!({"methodName": "forReceiver"}),
            )
            .await
        })
    };
    let request = target.reader.expect_publish(WITHIN).await;
    let rid = rid_of(&request, "forReceiver");
    answer(&mut target, 1, 200, &rid, json!(1)).await;
    assert_eq!(to_target.await.unwrap().0, 200);
    let to_spy = {
        let (hub, sender) = (Arc::clone(&hub), sender.clone());
        tokio::spawn(
            async move { invoke(&hub, &sender, "spy", json!({"methodName": "forSpy"})).await },
        )
    };
    let first = spy.reader.expect_publish(WITHIN).await;
    let rid = rid_of(&first, "forSpy");
    answer(&mut spy, 1, 200, &rid, json!(2)).await;
    assert_eq!(
        to_spy.await.unwrap(),
        (200, json!({"status": 200, "payload": 2}))
    );
    drop((spy, target));
    match Arc::try_unwrap(hub) {
        Ok(hub) => hub.stop().await,
        Err(_) => panic!("hub still shared"),
    }
}

/// A target whose connection closes after it received a request ends the call at once with 404
/// (IoT Hub's 404104), not at the response timeout; a hub stopping while a call waits answers
/// it 503 and stops without waiting for the call's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_disconnects_is_404_and_a_stopping_hub_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let sender = hub.creds("sender");
    let (addr, ca) = (methods_addr(&hub), hub.ca());
    let call = |method: &'static str| {
        let (ca, headers) = (ca.clone(), auth(&sender));
        tokio::spawn(async move {
            let body = json!({"methodName": method, "responseTimeoutInSeconds": 300}).to_string();
            post(
                addr,
                &ca,
                &path("receiver"),
                &headers,
                body.as_bytes(),
                None,
            )
            .await
        })
    };
    let mut target = method_target(&hub, "receiver").await;
    let calling = call("goesAway");
    let request = target.reader.expect_publish(WITHIN).await;
    rid_of(&request, "goesAway");
    drop(target);
    let (status, err) = calling.await.unwrap();
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["errorCode"], 404_104, "{err}");

    let mut target = method_target(&hub, "receiver").await;
    let calling = call("atShutdown");
    let request = target.reader.expect_publish(WITHIN).await;
    rid_of(&request, "atShutdown");
    // Well under the call's 300 s: the stop does not wait for it.
    tokio::time::timeout(Duration::from_secs(60), hub.stop())
        .await
        .expect("the hub stops while a call waits");
    let (status, err) = calling.await.unwrap();
    assert_eq!(status, 503, "{err}");
    drop(target);
}

/// A target's response over 128 KiB (IoT Hub's limit, as for a request) is not relayed: the
/// caller gets 413 with IoT Hub's 413001, as for an oversized request; the target's
/// connection stays up (its PUBACK) and a response at the limit then goes through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_is_413_to_the_caller_and_not_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(hub(dir.path()).await);
    let mut target = method_target(&hub, "receiver").await;
    let sender = hub.creds("sender");
    const LIMIT: usize = 128 * 1024;
    let call = |name: &'static str| {
        let (hub, sender) = (Arc::clone(&hub), sender.clone());
        tokio::spawn(
            async move { invoke(&hub, &sender, "receiver", json!({"methodName": name})).await },
        )
    };
    let calling = call("big");
    let request = target.reader.expect_publish(WITHIN).await;
    let rid = rid_of(&request, "big");
    // A JSON string of n characters is n + 2 bytes: one byte over the limit.
    answer(&mut target, 1, 200, &rid, json!("x".repeat(LIMIT - 1))).await;
    let (status, err) = calling.await.unwrap();
    let text = err.to_string();
    let shown = &text[..text.len().min(200)];
    assert_eq!(status, 413, "{} bytes: {shown}", text.len());
    assert_eq!(err["errorCode"], 413_001, "{shown}");
    assert!(
        text.len() < 1024,
        "nothing of the oversized response is relayed: {} bytes",
        text.len()
    );
    let calling = call("fits");
    let request = target.reader.expect_publish(WITHIN).await;
    let rid = rid_of(&request, "fits");
    answer(&mut target, 2, 200, &rid, json!("y".repeat(LIMIT - 2))).await;
    let (status, reply) = calling.await.unwrap();
    assert_eq!(status, 200, "{}", &reply.to_string()[..200]);
    assert!(
        reply["payload"] == json!("y".repeat(LIMIT - 2)),
        "the response at the limit, whole"
    );
    match Arc::try_unwrap(hub) {
        Ok(hub) => hub.stop().await,
        Err(_) => panic!("hub still shared"),
    }
}
