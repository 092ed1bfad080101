//! Direct methods from IoT Hub to modules, through the IoT Hub emulator (tests/iothub-emulator;
//! an emulator, not IoT Hub): the hub opens a module's cloud connection when the module
//! subscribes to its methods, subscribes there to `$iothub/methods/POST/#`, hands each request
//! to the module and sends its answer back under the cloud's `$rid`. A module not connected is
//! answered 404, one that does not answer 504.
//!
//! Modules are raw MQTT clients over TLS; every wait is on an event (a SUBACK, a subscription
//! the emulator counted, a request the module read, a metric), never on time.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::path::Path;
use std::time::Duration;

use iothub_emulator::{Emulator, EmulatorConfig, IdentityKey, MethodResponse};
use raw::{module_creds, Creds, RawClient, TestHub, DEVICE, IOTHUB};
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use serde_json::json;

/// A failure bound only: every wait below ends on an event long before.
const T: Duration = Duration::from_secs(60);
const METHODS_FILTER: &str = "$iothub/methods/POST/#";

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

/// The emulator, knowing the modules' keys, and a hub in this process whose upstream it is.
async fn setup(root: &Path, modules: &[&str]) -> (Emulator, TestHub, Vec<Creds>) {
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
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    let hub = TestHub::start_with(root, move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
    })
    .await;
    (emulator, hub, creds)
}

/// `creds`' module connected to the hub and subscribed to its methods (SUBACK received), and
/// its cloud connection subscribed to them at the emulator (the `n`-th time).
async fn method_target(hub: &TestHub, emulator: &Emulator, creds: &Creds, n: u64) -> RawClient {
    let (mut c, _) = hub.connected(&creds.module, true).await;
    let (suback, _) = c.subscribe(1, &[METHODS_FILTER]).await;
    assert_eq!(
        suback.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // No telemetry was sent: the hub opened the module's cloud connection for its methods.
    emulator
        .wait_for_method_subscriptions(&creds.client_id(), n, T)
        .await
        .expect("the module's cloud connection subscribes to its methods");
    c
}

/// Invokes `method` from the emulator in a task (answered or timed out within `T`).
fn invoke(
    emulator: &std::sync::Arc<Emulator>,
    creds: &Creds,
    method: &'static str,
    payload: serde_json::Value,
) -> tokio::task::JoinHandle<Result<MethodResponse, iothub_emulator::MethodError>> {
    let (emulator, id) = (std::sync::Arc::clone(emulator), creds.client_id());
    tokio::spawn(async move { emulator.invoke_method(&id, method, &payload, T).await })
}

async fn metrics_until(hub: &TestHub, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = raw::http_get(hub.addrs.metrics, "/metrics")
            .await
            .expect("metrics answered");
        if ok(&text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A method IoT Hub invokes reaches the module with its name and payload, under a `$rid` of the
/// hub's, and the module's status and payload go back to IoT Hub as the answer to the cloud's
/// own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_from_iot_hub_reaches_the_module_and_its_answer_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, hub, creds) = setup(dir.path(), &["modA"]).await;
    let emulator = std::sync::Arc::new(emulator);
    let c = &creds[0];
    let mut module = method_target(&hub, &emulator, c, 1).await;

    let calling = invoke(&emulator, c, "reboot", json!({"delay": 5}));
    let request = module.reader.expect_publish(T).await;
    let rid = request
        .topic
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .unwrap_or_else(|| panic!("not the reboot request: {}", request.topic))
        .to_owned();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&request.payload).unwrap(),
        json!({"delay": 5})
    );
    module
        .writer
        .publish(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            QoS::AtLeastOnce,
            1,
            br#"{"rebooting": true}"#,
        )
        .await;
    match module.reader.expect_packet(T).await {
        Packet::PubAck(ack) => assert_eq!(ack.pkid, 1),
        other => panic!("expected the PUBACK of the answer, got {other:?}"),
    }
    assert_eq!(
        calling.await.unwrap(),
        Ok(MethodResponse {
            status: 201,
            payload: json!({"rebooting": true}),
        })
    );
    assert_eq!(emulator.stats().method_responses, 1);
    drop(module);
    hub.stop().await;
}

/// A module whose cloud connection is up but that is not connected to the hub any more: IoT
/// Hub's request is answered 404 by the hub, with a message, at once (not after a timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_for_a_module_not_connected_is_answered_404() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, hub, creds) = setup(dir.path(), &["modA"]).await;
    let emulator = std::sync::Arc::new(emulator);
    let c = &creds[0];
    let mut module = method_target(&hub, &emulator, c, 1).await;
    module.writer.disconnect().await;
    drop(module);
    metrics_until(&hub, |t| {
        t.lines()
            .any(|l| l.starts_with("edgehub_connected_clients") && l.ends_with(" 0"))
    })
    .await;

    let answer = invoke(&emulator, c, "reboot", json!(null))
        .await
        .unwrap()
        .expect("the hub answers for the module");
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(
        answer.payload["message"]
            .as_str()
            .is_some_and(|m| m.contains("not connected")),
        "{answer:?}"
    );
    hub.stop().await;
}

/// A module that takes the request and never answers: IoT Hub gets 504 once the hub's response
/// timeout (30 s, IoT Hub's default) has passed, and a late answer changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_the_module_does_not_answer_is_answered_504() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, hub, creds) = setup(dir.path(), &["modA"]).await;
    let emulator = std::sync::Arc::new(emulator);
    let c = &creds[0];
    let mut module = method_target(&hub, &emulator, c, 1).await;

    let calling = invoke(&emulator, c, "slow", json!({}));
    let request = module.reader.expect_publish(T).await;
    assert!(
        request
            .topic
            .starts_with("$iothub/methods/POST/slow/?$rid="),
        "{}",
        request.topic
    );
    let answer = calling
        .await
        .unwrap()
        .expect("the hub answers for the module");
    assert_eq!(answer.status, 504, "{answer:?}");
    assert_eq!(emulator.stats().method_responses, 1);
    drop(module);
    hub.stop().await;
}
