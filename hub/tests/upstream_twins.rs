//! Module twins with IoT Hub, through the IoT Hub emulator (tests/iothub-emulator; an emulator,
//! not IoT Hub): reported properties patched locally reach IoT Hub on the module's cloud
//! connection, in order, after an outage and across a kill -9 of the hub; IoT Hub's desired
//! properties win over the manifest's, reach the module and outlive a restart while IoT Hub is
//! away.
//!
//! Modules are raw MQTT clients over TLS. Every local patch counted here was answered 204 by
//! the hub (durable). Waits are on events (the emulator's twin versions, packets) or on a
//! condition polled with a deadline (a metric, a GET's `$version`: the hub's cloud sync acts in
//! its own time), never on time alone; the deadlines are failure bounds only.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::path::Path;
use std::time::Duration;

use iothub_emulator::{Emulator, EmulatorConfig, IdentityKey};
use raw::{module_creds, BinaryHub, Creds, RawClient, TestHub, DEVICE, IOTHUB};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};

/// A failure bound only (a cloud connection's backoff is capped at 10 s).
const T: Duration = Duration::from_secs(60);

fn manifest(modules: &[&str]) -> String {
    let mods: Vec<String> = modules.iter().map(|m| format!("\"{m}\": {{}}")).collect();
    format!(
        r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{{}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{"up": "FROM /messages/* INTO $upstream"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}}}}}"#,
        mods.join(", ")
    )
}

/// Writes the manifest, gives the modules keys and starts an emulator that knows them.
async fn emulator_for(root: &Path, modules: &[&str]) -> (Emulator, Vec<Creds>) {
    std::fs::write(root.join("manifest.json"), manifest(modules)).unwrap();
    let creds: Vec<Creds> = modules
        .iter()
        .map(|m| module_creds(&root.join("data"), m))
        .collect();
    let emulator = Emulator::start(EmulatorConfig {
        hostname: IOTHUB.to_owned(),
        bind: "127.0.0.1:0".parse().unwrap(),
        identities: creds
            .iter()
            .map(|c| IdentityKey::module(DEVICE, c.module.clone(), c.key.clone()))
            .collect(),
        tls_dir: root.join("emulator"),
    })
    .await
    .expect("start the emulator");
    (emulator, creds)
}

async fn hub_for(root: &Path, emulator: &Emulator) -> TestHub {
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    TestHub::start_with(root, move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
    })
    .await
}

fn upstream_args(emulator: &Emulator) -> Vec<String> {
    vec![
        "--upstream-addr".into(),
        emulator.addr().to_string(),
        "--upstream-ca".into(),
        emulator.ca_pem().display().to_string(),
    ]
}

async fn connected(mqtt: std::net::SocketAddr, ca: &Path, creds: &Creds) -> RawClient {
    let mut c = RawClient::tls(mqtt, ca).await;
    let ack = c.connect(creds.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c
}

/// Patches the module's reported properties (QoS 1) and asserts the hub's 204 with `version`.
async fn patch(c: &mut RawClient, pkid: u16, body: Value, version: u64) {
    let rid = format!("p{pkid}");
    c.writer
        .publish(
            &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            QoS::AtLeastOnce,
            pkid,
            body.to_string().as_bytes(),
        )
        .await;
    let answer: Publish = c.reader.expect_publish(T).await;
    assert_eq!(
        answer.topic,
        format!("$iothub/twin/res/204/?$rid={rid}&$version={version}"),
        "the local patch is durable"
    );
    match c.reader.expect_packet(T).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, pkid),
        other => panic!("expected the PUBACK of {pkid}, got {other:?}"),
    }
}

/// Waits until `edgehub_twin_reported_sync_lag` of the module says `versions`.
async fn lag_until(hub: &TestHub, creds: &Creds, versions: u64) {
    let id = format!("id=\"{}\"", creds.client_id());
    let value = format!(" {versions}");
    let series = format!("edgehub_twin_reported_sync_lag{{…{id}}}{value}");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = raw::http_get(hub.addrs.metrics, "/metrics")
            .await
            .expect("metrics answered");
        if text.lines().any(|l| {
            l.starts_with("edgehub_twin_reported_sync_lag{")
                && l.contains(&id)
                && l.ends_with(&value)
        }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {series}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn reported(emulator: &Emulator, creds: &Creds) -> Value {
    Value::Object(emulator.twin(&creds.client_id()).reported)
}

/// Patches go to IoT Hub as they are made; patches made while IoT Hub is away are kept and go
/// once it is back, as merge patches whose result is the twin's (nested keys removed as
/// `null`, not left behind), and IoT Hub sees the versions in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_reach_iot_hub_and_those_made_while_it_is_away_follow_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = emulator_for(dir.path(), &["modA"]).await;
    let c = &creds[0];
    let hub = hub_for(dir.path(), &emulator).await;
    let mut module = connected(hub.addrs.mqtt, &hub.ca(), c).await;

    patch(&mut module, 1, json!({"a": 1, "b": {"x": 1, "y": 2}}), 2).await;
    emulator
        .wait_for_reported_version(&c.client_id(), 2, T)
        .await
        .unwrap();
    assert_eq!(
        reported(&emulator, c),
        json!({"a": 1, "b": {"x": 1, "y": 2}})
    );
    // And the hub has IoT Hub's 204 (else that patch is in doubt and the lag below is 3).
    lag_until(&hub, c, 0).await;

    emulator.go_away().await;
    patch(&mut module, 2, json!({"a": null, "b": {"y": null}}), 3).await;
    patch(&mut module, 3, json!({"c": [1, 2], "b": {"z": true}}), 4).await;
    assert_eq!(emulator.twin(&c.client_id()).reported_version, 2);
    lag_until(&hub, c, 2).await;
    emulator.come_back().await.unwrap();
    // The first patch made while away may still have reached IoT Hub on the closing connection;
    // then the second goes alone. Either way IoT Hub sees local versions in order and ends
    // with the twin's document.
    let want = json!({"b": {"x": 1, "z": true}, "c": [1, 2]});
    emulator
        .wait_for_reported_version(&c.client_id(), 3, T)
        .await
        .unwrap();
    if reported(&emulator, c) != want {
        assert_eq!(
            reported(&emulator, c),
            json!({"b": {"x": 1}}),
            "IoT Hub holds local version 3"
        );
        emulator
            .wait_for_reported_version(&c.client_id(), 4, T)
            .await
            .unwrap();
    }
    assert_eq!(
        reported(&emulator, c),
        want,
        "IoT Hub holds the twin's reported properties"
    );
    lag_until(&hub, c, 0).await;
    let stats = emulator.stats();
    assert_eq!(stats.reported_patches_refused, 0);
    assert!(stats.reported_patches <= 3, "{stats:?}");
    drop(module);
    hub.stop().await;
}

/// Patches acknowledged by a hub that is then killed (-9) while IoT Hub is away: the next hub
/// sends them once IoT Hub is back, with no module connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_not_yet_synced_survive_a_kill_9_of_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (emulator, creds) = emulator_for(root, &["modA", "modB"]).await;
    emulator.go_away().await;
    let args = upstream_args(&emulator);
    let mut first = BinaryHub::start_with(root, 0, &args).await;
    let ca = hub::tls::ca_path(&root.join("data"));
    for (i, c) in creds.iter().enumerate() {
        let mut module = connected(first.addrs.mqtt, &ca, c).await;
        patch(&mut module, 1, json!({"who": c.module, "n": i}), 2).await;
        patch(&mut module, 2, json!({"n": null, "ok": true}), 3).await;
    }
    first.kill9();
    let second = BinaryHub::start_with(root, 1, &args).await;
    emulator.come_back().await.unwrap();
    for c in &creds {
        emulator
            .wait_for_reported_version(&c.client_id(), 2, T)
            .await
            .unwrap_or_else(|e| panic!("{e}\nhub log:\n{}", second.log_tail()));
        assert_eq!(reported(&emulator, c), json!({"who": c.module, "ok": true}));
    }
}

const RESPONSES: &str = "$iothub/twin/res/#";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";

/// [`manifest`] with `desired` as the module's `properties.desired`.
fn manifest_with_desired(module: &str, desired: Value) -> String {
    let mut m: Value = serde_json::from_str(&manifest(&[module])).unwrap();
    m["modulesContent"][module] = json!({ "properties.desired": desired });
    m.to_string()
}

fn object(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Subscribes the module to `filters` (QoS 1) and waits for the SUBACK.
async fn subscribe(c: &mut RawClient, pkid: u16, filters: &[&str]) {
    let (ack, before) = c.subscribe(pkid, filters).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(ack.return_codes.len(), filters.len());
}

/// GETs the module's twin (QoS 1) and returns it; the hub's PUBACK must come too.
async fn get(c: &mut RawClient, pkid: u16) -> Value {
    let rid = format!("g{pkid}");
    c.writer
        .publish(
            &format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtLeastOnce,
            pkid,
            b"",
        )
        .await;
    let answer = c.reader.expect_publish(T).await;
    assert_eq!(answer.topic, format!("$iothub/twin/res/200/?$rid={rid}"));
    match c.reader.expect_packet(T).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, pkid),
        other => panic!("expected the PUBACK of {pkid}, got {other:?}"),
    }
    serde_json::from_slice(&answer.payload).unwrap()
}

/// GETs the twin until its desired `$version` is `version` (the hub takes IoT Hub's document
/// on its own connection, in its own time); returns the twin. Each GET is a round trip.
async fn get_until_desired_version(c: &mut RawClient, first_pkid: u16, version: u64) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    let mut pkid = first_pkid;
    loop {
        let twin = get(c, pkid).await;
        if twin["desired"]["$version"] == version {
            return twin;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "desired $version never became {version}: {twin}"
        );
        pkid += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// IoT Hub is the source of desired properties: its document wins over the manifest's, with
/// its `$version`; its desired patch reaches the connected module with that version; a module
/// that reconnects GETs the newer document; and a hub restarted while IoT Hub is away still
/// serves IoT Hub's document, not the manifest's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_properties_from_iot_hub_reach_the_module_and_outlive_a_restart_while_it_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (emulator, creds) = emulator_for(root, &["modA"]).await;
    std::fs::write(
        root.join("manifest.json"),
        manifest_with_desired("modA", json!({"rate": 1})),
    )
    .unwrap();
    let c = &creds[0];
    let id = c.client_id();
    // What IoT Hub holds before the hub starts: $version 3.
    emulator.update_desired(&id, &object(json!({"rate": 2, "mode": {"a": 1, "b": 2}})));
    let (v3, _) = emulator.update_desired(&id, &object(json!({"extra": true})));
    assert_eq!(v3, 3);

    let hub = hub_for(root, &emulator).await;
    let mut module = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    subscribe(&mut module, 1, &[RESPONSES]).await;
    // Serving the twin opens the module's cloud connection, which reads IoT Hub's twin.
    let twin = get_until_desired_version(&mut module, 10, 3).await;
    assert_eq!(
        twin["desired"],
        json!({"rate": 2, "mode": {"a": 1, "b": 2}, "extra": true, "$version": 3}),
        "IoT Hub's document, not the manifest's"
    );

    // Listening from $version 3 on: IoT Hub's next patch comes through with its version.
    subscribe(&mut module, 2, &[DESIRED]).await;
    emulator
        .wait_for_desired_subscriptions(&id, 1, T)
        .await
        .unwrap();
    let (v4, sent) = emulator.update_desired(&id, &object(json!({"rate": 4, "mode": {"b": null}})));
    assert_eq!((v4, sent), (4, true), "the hub's cloud connection listens");
    let patch = module.reader.expect_publish(T).await;
    assert_eq!(
        patch.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=4"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&patch.payload).unwrap(),
        json!({"rate": 4, "mode": {"b": null}, "$version": 4})
    );

    // Away meanwhile, the module GETs IoT Hub's newer document when it is back.
    drop(module);
    let (v5, sent) = emulator.update_desired(&id, &object(json!({"extra": null})));
    assert_eq!((v5, sent), (5, true));
    let mut module = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    subscribe(&mut module, 1, &[RESPONSES]).await;
    let want = json!({"rate": 4, "mode": {"a": 1}, "$version": 5});
    let twin = get_until_desired_version(&mut module, 10, 5).await;
    assert_eq!(twin["desired"], want);
    drop(module);

    // IoT Hub away, the hub restarted: IoT Hub's last document is still served.
    emulator.go_away().await;
    hub.stop().await;
    let hub = hub_for(root, &emulator).await;
    let mut module = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    subscribe(&mut module, 1, &[RESPONSES]).await;
    assert_eq!(get(&mut module, 10).await["desired"], want);
    drop(module);
    hub.stop().await;
}

/// IoT Hub applied a reported patch but its 204 never reached the hub (time-out), and the
/// module removed a key meanwhile: the next patch must remove it from IoT Hub too, though the
/// hub cannot know whether IoT Hub applied the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_patch_whose_answer_was_lost_leaves_nothing_behind_in_iot_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = emulator_for(dir.path(), &["modA"]).await;
    let c = &creds[0];
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    let hub = TestHub::start_with(dir.path(), move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
        s.upstream_timeout_secs = Some(1);
    })
    .await;
    let mut module = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    patch(&mut module, 1, json!({"keep": 1}), 2).await;
    emulator
        .wait_for_reported_version(&c.client_id(), 2, T)
        .await
        .unwrap();
    lag_until(&hub, c, 0).await;

    emulator.answer_reported(false);
    patch(&mut module, 2, json!({"gone": 1, "obj": {"p": 1}}), 3).await;
    // IoT Hub applied it; the hub waits for a 204 that will not come.
    emulator
        .wait_for_reported_version(&c.client_id(), 3, T)
        .await
        .unwrap();
    patch(&mut module, 3, json!({"gone": null, "obj": 5}), 4).await;
    patch(&mut module, 4, json!({"obj": {"q": 2}}), 5).await;
    emulator.answer_reported(true);
    // The hub has IoT Hub's 204 for its latest version: IoT Hub must hold the twin's document.
    lag_until(&hub, c, 0).await;
    assert_eq!(
        reported(&emulator, c),
        json!({"keep": 1, "obj": {"q": 2}}),
        "nothing left behind of the patch whose answer was lost"
    );
    drop(module);
    hub.stop().await;
}
