//! Module twins over MQTT as a raw MQTT 3.1.1 client sees them (issue 16; reference §1.7),
//! against an in-process hub over real TLS: GET served from the manifest, reported patches
//! merged durably, clear error statuses, refused requests, desired patches after a reload, and
//! no module ever seeing another module's twin.
//!
//! Nothing sleeps and hopes: every expectation is a packet awaited with a deadline; where a test
//! must show something does not arrive, a PINGREQ round trip through the same connection shows
//! that nothing was queued before it.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::path::Path;
use std::time::Duration;

use raw::{RawClient, TestHub};
use rumqttc::mqttbytes::v4::{Packet, Publish, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);
const RESPONSES: &str = "$iothub/twin/res/#";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";

/// [`raw::MANIFEST`]'s modules and route, with desired properties for `receiver` and `spy`.
fn manifest(receiver: Value, spy: Value) -> String {
    json!({"modulesContent": {
        "$edgeAgent": {"properties.desired": {"modules": {"sender": {}, "receiver": {}, "spy": {}}}},
        "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
            "routes": {"senderToReceiver": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}},
        "receiver": {"properties.desired": receiver},
        "spy": {"properties.desired": spy}
    }})
    .to_string()
}

/// Replaces the manifest file atomically (the hub's directory watch reloads it).
fn replace_manifest(root: &Path, text: &str) {
    let tmp = root.join("manifest.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, root.join("manifest.json")).unwrap();
}

async fn start(root: &Path, receiver: Value, spy: Value) -> TestHub {
    std::fs::write(root.join("manifest.json"), manifest(receiver, spy)).unwrap();
    TestHub::start(root).await
}

/// `module` connected (clean session) and subscribed to `filters`, all granted.
async fn subscribed(hub: &TestHub, module: &str, filters: &[&str]) -> RawClient {
    let (mut c, _) = hub.connected(module, true).await;
    let (ack, before) = c.subscribe(1, filters).await;
    assert!(before.is_empty(), "{before:?}");
    assert!(
        ack.return_codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
        "{ack:?}"
    );
    c
}

/// Publishes a twin request at QoS 1 and returns its answer; the PUBACK must follow it.
async fn request(c: &mut RawClient, topic: &str, pkid: u16, payload: &[u8]) -> Publish {
    c.writer
        .publish(topic, QoS::AtLeastOnce, pkid, payload)
        .await;
    let answer = c.reader.expect_publish(T).await;
    match c.reader.expect_packet(T).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, pkid),
        other => panic!("expected the PUBACK of {pkid}, got {other:?}"),
    }
    answer
}

async fn get(c: &mut RawClient, rid: &str, pkid: u16) -> Value {
    let answer = request(c, &format!("$iothub/twin/GET/?$rid={rid}"), pkid, b"").await;
    assert_eq!(answer.topic, format!("$iothub/twin/res/200/?$rid={rid}"));
    serde_json::from_slice(&answer.payload).unwrap()
}

async fn patch(c: &mut RawClient, rid: &str, pkid: u16, body: &[u8]) -> Publish {
    request(
        c,
        &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
        pkid,
        body,
    )
    .await
}

fn body(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| panic!("{e}: {:?}", p.payload))
}

/// GET answers the manifest's desired properties; patches merge (null deletes) with a version
/// each; malformed, non-object and oversized patches get 400/400/413 with a reason and change
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_serves_the_manifest_and_patches_merge_while_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), json!({"rate": 5, "mode": "fast"}), json!({})).await;
    let mut c = subscribed(&hub, "receiver", &[RESPONSES]).await;

    let twin = get(&mut c, "g1", 10).await;
    assert_eq!(
        twin["desired"],
        json!({"rate": 5, "mode": "fast", "$version": 2})
    );
    assert_eq!(twin["reported"], json!({"$version": 1}));

    let ok = patch(&mut c, "p1", 11, br#"{"a": 1, "b": {"c": 2}}"#).await;
    assert_eq!(ok.topic, "$iothub/twin/res/204/?$rid=p1&$version=2");
    let ok = patch(&mut c, "p2", 12, br#"{"a": null, "b": {"d": 3}}"#).await;
    assert_eq!(ok.topic, "$iothub/twin/res/204/?$rid=p2&$version=3");

    for (rid, pkid, payload, status, why) in [
        ("m1", 13, b"{oops".to_vec(), 400, "not valid JSON"),
        ("m2", 14, b"[1, 2]".to_vec(), 400, "must be a JSON object"),
        ("m3", 15, b"{\"a.b\": 1}".to_vec(), 400, "not allowed"),
        (
            "m4",
            16,
            json!({"big": "x".repeat(33 * 1024)})
                .to_string()
                .into_bytes(),
            413,
            "limit is 32768",
        ),
    ] {
        let refused = patch(&mut c, rid, pkid, &payload).await;
        assert_eq!(
            refused.topic,
            format!("$iothub/twin/res/{status}/?$rid={rid}")
        );
        let reason = body(&refused);
        assert_eq!(reason["status"], status);
        let message = reason["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
    }

    let twin = get(&mut c, "g2", 17).await;
    assert_eq!(
        twin["reported"],
        json!({"b": {"c": 2, "d": 3}, "$version": 3})
    );
    assert_eq!(twin["desired"]["$version"], 2);
    hub.stop().await;
}

/// A twin request without `$rid` is refused (400, on `…/?$rid=`) and a patch without one is not
/// applied; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_request_without_a_rid_is_refused_and_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), json!({"rate": 5}), json!({})).await;
    let mut c = subscribed(&hub, "receiver", &[RESPONSES]).await;
    for (topic, pkid) in [
        ("$iothub/twin/GET/", 20),
        ("$iothub/twin/GET/?$version=1", 21),
        ("$iothub/twin/PATCH/properties/reported/", 22),
    ] {
        let refused = request(&mut c, topic, pkid, br#"{"sneaked": true}"#).await;
        assert_eq!(refused.topic, "$iothub/twin/res/400/?$rid=", "{topic}");
        assert!(
            body(&refused)["message"].as_str().unwrap().contains("$rid"),
            "{topic}"
        );
    }
    let twin = get(&mut c, "after", 23).await;
    assert_eq!(twin["reported"], json!({"$version": 1}), "nothing applied");
    hub.stop().await;
}

/// A reload that changes desired properties sends each subscribed module a patch of its own
/// twin only (changed members, removed ones as null, `$version` in topic and body). A module
/// cannot subscribe to broader twin filters, and never sees another module's twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_patches_each_module_with_its_own_desired_properties_only() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        json!({"rate": 5, "mode": "fast", "secretOfReceiver": "r"}),
        json!({"level": 1}),
    )
    .await;
    let mut receiver = subscribed(&hub, "receiver", &[RESPONSES, DESIRED]).await;
    let (mut spy, _) = hub.connected("spy", true).await;
    let (ack, _) = spy
        .subscribe(
            1,
            &[
                "$iothub/#",
                "$iothub/twin/#",
                "$iothub/twin/res/+",
                "$iothub/twin/PATCH/properties/desired/+",
                RESPONSES,
                DESIRED,
            ],
        )
        .await;
    assert_eq!(
        ack.return_codes[..4],
        [SubscribeReasonCode::Failure; 4],
        "broader twin filters are refused"
    );
    assert!(matches!(
        ack.return_codes[4],
        SubscribeReasonCode::Success(_)
    ));
    assert!(matches!(
        ack.return_codes[5],
        SubscribeReasonCode::Success(_)
    ));

    // The receiver reads and reports; the spy hears none of it.
    let twin = get(&mut receiver, "r1", 10).await;
    assert_eq!(twin["desired"]["secretOfReceiver"], "r");
    let ok = patch(&mut receiver, "r2", 11, br#"{"receiverState": "up"}"#).await;
    assert!(
        ok.topic.starts_with("$iothub/twin/res/204/"),
        "{}",
        ok.topic
    );
    assert_eq!(
        spy.ping().await,
        vec![Packet::PingResp],
        "the spy saw the receiver's twin"
    );

    replace_manifest(
        dir.path(),
        &manifest(
            json!({"rate": 6, "secretOfReceiver": "r", "extra": {"x": 1}}),
            json!({"level": 2}),
        ),
    );
    let p = receiver.reader.expect_publish(T).await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    assert_eq!(
        body(&p),
        json!({"rate": 6, "mode": null, "extra": {"x": 1}, "$version": 3})
    );
    let p = spy.reader.expect_publish(T).await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    assert_eq!(body(&p), json!({"level": 2, "$version": 3}));
    // The spy's own GET shows its own twin, nothing of the receiver's.
    let twin = get(&mut spy, "s1", 12).await;
    assert_eq!(
        twin,
        json!({"desired": {"level": 2, "$version": 3}, "reported": {"$version": 1}})
    );
    assert_eq!(receiver.ping().await, vec![Packet::PingResp]);
    hub.stop().await;
}

/// The Python SDK GETs the twin right after CONNECT when a desired-patch handler is set,
/// before it subscribes to `$iothub/twin/res/#`, and never GETs again while that GET is
/// unanswered: the answer must go out all the same (found by the SDK test of a reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_before_subscribing_to_responses_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(dir.path(), json!({"rate": 5}), json!({})).await;
    let (mut c, _) = hub.connected("receiver", true).await;
    let twin = get(&mut c, "early", 30).await;
    assert_eq!(twin["desired"], json!({"rate": 5, "$version": 2}));
    hub.stop().await;
}

/// Disconnects `c` and waits until the hub closed its side (the connection's loop is over: it
/// sends nothing more).
async fn away(mut c: RawClient) {
    c.writer.disconnect().await;
    c.reader.expect_closed(T).await;
}

/// A module that was away while the desired properties changed gets, when it subscribes again
/// (clean session, no GET, as the Node SDK does), one patch of what it missed since what it was
/// last served (changed members, removed ones as null, the current `$version`); a module that
/// stayed connected and got the reload's patch, or that reconnects after being served the
/// current version, gets no second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_was_away_gets_the_desired_changes_it_missed_when_it_subscribes() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start(
        dir.path(),
        json!({"rate": 5, "mode": "fast"}),
        json!({"level": 1}),
    )
    .await;
    let mut receiver = subscribed(&hub, "receiver", &[RESPONSES, DESIRED]).await;
    let twin = get(&mut receiver, "r1", 10).await;
    assert_eq!(twin["desired"]["$version"], 2);
    let mut spy = subscribed(&hub, "spy", &[RESPONSES, DESIRED]).await;
    assert_eq!(get(&mut spy, "s1", 10).await["desired"]["$version"], 2);
    away(receiver).await;

    replace_manifest(
        dir.path(),
        &manifest(json!({"rate": 6, "extra": {"x": 1}}), json!({"level": 2})),
    );
    // The spy, connected all along, gets the reload's patch: the hub has taken the manifest.
    let p = spy.reader.expect_publish(T).await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    assert_eq!(body(&p), json!({"level": 2, "$version": 3}));

    let mut receiver = subscribed(&hub, "receiver", &[RESPONSES, DESIRED]).await;
    let p = receiver.reader.expect_publish(T).await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    assert_eq!(
        body(&p),
        json!({"rate": 6, "mode": null, "extra": {"x": 1}, "$version": 3})
    );
    assert_eq!(receiver.ping().await, vec![Packet::PingResp], "one patch");
    assert_eq!(spy.ping().await, vec![Packet::PingResp], "no second patch");

    // Both were served version 3 (a patch each): back again, nothing to catch up on.
    away(receiver).await;
    away(spy).await;
    for module in ["receiver", "spy"] {
        let mut c = subscribed(&hub, module, &[RESPONSES, DESIRED]).await;
        assert_eq!(c.ping().await, vec![Packet::PingResp], "{module}: no patch");
        assert_eq!(get(&mut c, "again", 11).await["desired"]["$version"], 3);
    }
    hub.stop().await;
}
