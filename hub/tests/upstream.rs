//! `INTO $upstream` through the IoT Hub emulator (tests/iothub-emulator; an emulator, not IoT
//! Hub): order per module, properties, store-and-forward while the emulator is away or refuses
//! logins, republishing what was never acknowledged, TTL, and kill -9 while offline.
//!
//! Modules publish with a raw MQTT client over TLS; every message counted as sent here got its
//! PUBACK from the hub (it is durable). The emulator records what each identity published, in
//! arrival order. "In order" means: dropping repeats (first occurrence wins) gives exactly the
//! sequence sent; repeats are allowed only in tests that break the link.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use iothub_emulator::{Emulator, EmulatorConfig, IdentityKey, Received};
use raw::{module_creds, BinaryHub, Creds, RawClient, TestHub, DEVICE, IOTHUB};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use store::Clock;

const T: Duration = Duration::from_secs(10);
/// Long enough for a link to come back (its backoff is capped at 10 s) and drain.
const BACK: Duration = Duration::from_secs(60);

fn manifest(modules: &[&str], ttl_secs: u64) -> String {
    let mods: Vec<String> = modules.iter().map(|m| format!("\"{m}\": {{}}")).collect();
    format!(
        r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{{}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{"up": "FROM /messages/* INTO $upstream"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": {ttl_secs}}}}}}}}}}}"#,
        mods.join(", ")
    )
}

/// Writes the manifest, gives the modules keys (as the hub will load them) and starts an
/// emulator that knows those keys.
async fn setup(root: &Path, modules: &[&str], ttl_secs: u64) -> (Emulator, Vec<Creds>) {
    std::fs::write(root.join("manifest.json"), manifest(modules, ttl_secs)).unwrap();
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

/// A hub in this process whose upstream is the emulator.
async fn hub_for(root: &Path, emulator: &Emulator) -> TestHub {
    hub_for_on(root, emulator, Arc::new(store::SystemClock)).await
}

/// [`hub_for`] on `clock`.
async fn hub_for_on(root: &Path, emulator: &Emulator, clock: Arc<dyn store::Clock>) -> TestHub {
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    TestHub::start_with_clock(
        root,
        move |s| {
            s.upstream_protocol = Some("mqtt".into());
            s.upstream_addr = Some(addr.clone());
            s.upstream_ca = Some(ca.clone());
        },
        clock,
    )
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

/// The bag a module sends with message `seq`: an output name, a message id, a content type and
/// an application property.
fn bag(seq: u64) -> String {
    format!("%24.on=out1&%24.mid=m-{seq}&%24.ct=application%2Fjson&seq={seq}")
}

/// Publishes `seqs` as `creds` (body = the number), 50 at a time, and waits for every PUBACK.
async fn publish_acked(client: &mut RawClient, creds: &Creds, seqs: Range<u64>) {
    let all: Vec<u64> = seqs.collect();
    let mut pkid: u16 = 0;
    for chunk in all.chunks(50) {
        for seq in chunk {
            pkid = pkid % 60_000 + 1;
            client
                .writer
                .publish_unflushed(
                    &creds.events_topic(&bag(*seq)),
                    QoS::AtLeastOnce,
                    pkid,
                    seq.to_string().as_bytes(),
                )
                .await
                .expect("write");
        }
        client.writer.flush().await.expect("flush");
        for _ in chunk {
            match client.reader.expect_packet(T).await {
                Packet::PubAck(_) => {}
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
}

async fn connected(hub_mqtt: std::net::SocketAddr, ca: &Path, creds: &Creds) -> RawClient {
    let mut c = RawClient::tls(hub_mqtt, ca).await;
    let ack = c.connect(creds.connect(true, 60)).await;
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    c
}

/// Waits until message `last` of `creds` arrived (counts include repeats, so a count is not
/// enough after a failure; the order assertion that follows catches anything missing).
async fn wait_for_seq(emulator: &Emulator, creds: &Creds, last: u64) {
    let (id, body) = (creds.client_id(), last.to_string());
    emulator
        .wait_until(&format!("message {last} of {id}"), BACK, |all, _| {
            all.iter()
                .rev()
                .any(|r| r.identity == id && r.payload.as_ref() == body.as_bytes())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

fn seqs_of(received: &[Received]) -> Vec<u64> {
    received
        .iter()
        .map(|r| {
            std::str::from_utf8(&r.payload)
                .unwrap()
                .parse()
                .expect("a number")
        })
        .collect()
}

/// Asserts that `received` holds every number of `sent`, first occurrences in order, and
/// returns how many repeats there were.
fn assert_in_order(received: &[Received], sent: Range<u64>) -> usize {
    let seqs = seqs_of(received);
    let mut seen = std::collections::BTreeSet::new();
    let firsts: Vec<u64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
    let expected: Vec<u64> = sent.collect();
    assert_eq!(
        firsts.len(),
        expected.len(),
        "lost or extra messages: got {} distinct, sent {}",
        firsts.len(),
        expected.len()
    );
    assert_eq!(firsts, expected, "first occurrences out of order");
    seqs.len() - firsts.len()
}

/// The value of `name{…id="edge-device/{module}"…}` in a metrics text, 0 if absent.
fn metric(text: &str, name: &str, module: &str) -> f64 {
    let id = format!("id=\"{DEVICE}/{module}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&id))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `edgehub_messages_dropped_total{reason=…}` (0 if absent).
fn dropped(text: &str, reason: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("edgehub_messages_dropped_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes until `ok` holds (metrics have no change events), for at most [`T`].
async fn metrics_until(hub: &TestHub, ok: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = metrics_text(hub).await;
        if ok(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never got there:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics_text(hub: &TestHub) -> String {
    raw::http_get(hub.addrs.metrics, "/metrics")
        .await
        .expect("metrics answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_module_reaches_iot_hub_as_itself_in_order_with_its_properties() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA", "modB"], 7200).await;
    let hub = hub_for(dir.path(), &emulator).await;
    let n = 400;
    let mut tasks = Vec::new();
    for c in creds.clone() {
        let (addr, ca) = (hub.addrs.mqtt, hub.ca());
        tasks.push(tokio::spawn(async move {
            let mut client = connected(addr, &ca, &c).await;
            publish_acked(&mut client, &c, 0..n).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for c in &creds {
        let id = c.client_id();
        emulator
            .wait_for_count(&id, n as usize, BACK)
            .await
            .expect("every message upstream");
        let got = emulator.received(&id);
        assert_eq!(
            assert_in_order(&got, 0..n),
            0,
            "repeats without any failure"
        );
        let first = &got[0];
        assert_eq!(first.identity, id, "sent as the module itself");
        assert!(
            first.topic.starts_with(&format!(
                "devices/{DEVICE}/{}/messages/events/",
                "modules/".to_owned() + &c.module
            )),
            "{}",
            first.topic
        );
        assert_eq!(
            first.properties.get("$.mid").map(String::as_str),
            Some("m-0")
        );
        assert_eq!(
            first.properties.get("$.ct").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(first.properties.get("seq").map(String::as_str), Some("0"));
        assert!(
            !first.properties.contains_key("$.on"),
            "the output name is not sent upstream: {:?}",
            first.properties
        );
        assert_eq!(first.qos, 1);
    }
    // The emulator records a message before its PUBACK leaves: the hub's count may trail.
    let text = metrics_until(&hub, |t| {
        ["modA", "modB"]
            .iter()
            .all(|m| metric(t, "edgehub_upstream_messages_acked_total", m) == n as f64)
    })
    .await;
    assert_eq!(metric(&text, "edgehub_upstream_connected", "modB"), 1.0);
    let timed = text
        .lines()
        .find(|l| {
            l.starts_with("edgehub_message_send_duration_seconds_count{")
                && l.contains("to=\"upstream\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(
        timed,
        Some(2.0 * n as f64),
        "every upstream PUBACK is timed:\n{text}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_iot_hub_is_away_messages_wait_on_disk_and_go_out_in_order_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 7200).await;
    let c = &creds[0];
    let hub = hub_for(dir.path(), &emulator).await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    // Online first, so the outage below starts on a live link.
    publish_acked(&mut client, c, 0..100).await;
    emulator
        .wait_for_count(&c.client_id(), 100, BACK)
        .await
        .unwrap();
    emulator.go_away().await;
    // Every one of these is acknowledged to the module while the cloud is away.
    publish_acked(&mut client, c, 100..1100).await;
    let text = metrics_text(&hub).await;
    assert!(
        metric(&text, "edgehub_upstream_offline_total", "modA") >= 1.0,
        "the outage is counted:\n{text}"
    );
    assert_eq!(metric(&text, "edgehub_upstream_connected", "modA"), 0.0);
    assert!(
        text.lines().any(|l| l.starts_with("edgehub_queue_length{")
            && l.contains("endpoint=\"iothub\"")
            && !l.ends_with(" 0")),
        "the upstream queue holds the backlog:\n{text}"
    );
    emulator.come_back().await.unwrap();
    wait_for_seq(&emulator, c, 1099).await;
    assert_in_order(&emulator.received(&c.client_id()), 0..1100);
    let text = metrics_text(&hub).await;
    assert!(metric(&text, "edgehub_upstream_offline_seconds_total", "modA") > 0.0);
    assert_eq!(metric(&text, "edgehub_upstream_connected", "modA"), 1.0);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_iot_hub_never_acknowledged_is_published_again_after_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 7200).await;
    let c = &creds[0];
    let hub = hub_for(dir.path(), &emulator).await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    publish_acked(&mut client, c, 0..10).await;
    emulator
        .wait_for_count(&c.client_id(), 10, BACK)
        .await
        .unwrap();
    // The emulator now takes publishes without answering them: the hub has them in flight.
    emulator.set_ack(false);
    publish_acked(&mut client, c, 10..60).await;
    emulator
        .wait_for_swallowed(1, BACK)
        .await
        .expect("the hub sent some");
    assert_eq!(emulator.count(&c.client_id()), 10);
    // The connection drops with publishes unacknowledged; rumqttc would forget them (clean
    // session), the hub must not: every swallowed message must still arrive.
    emulator.set_ack(true);
    emulator.drop_connections();
    wait_for_seq(&emulator, c, 59).await;
    assert_in_order(&emulator.received(&c.client_id()), 0..60);
    // Drops in the middle of a long stream: nothing lost, order kept.
    let mut sender = tokio::spawn({
        let (addr, ca, c) = (hub.addrs.mqtt, hub.ca(), c.clone());
        async move {
            let mut client = connected(addr, &ca, &c).await;
            publish_acked(&mut client, &c, 60..3000).await;
        }
    });
    for k in 1..=3 {
        emulator
            .wait_for_count(&c.client_id(), 60 + 700 * k, BACK)
            .await
            .unwrap();
        emulator.drop_connections();
    }
    (&mut sender).await.unwrap();
    wait_for_seq(&emulator, c, 2999).await;
    assert_in_order(&emulator.received(&c.client_id()), 0..3000);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_are_retried_with_backoff_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 7200).await;
    let c = &creds[0];
    emulator.refuse_logins(true);
    let hub = hub_for(dir.path(), &emulator).await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    publish_acked(&mut client, c, 0..200).await;
    emulator
        .wait_for_refusals(3, BACK)
        .await
        .expect("the hub keeps trying");
    let text = metrics_text(&hub).await;
    assert!(
        text.lines().any(
            |l| l.starts_with("edgehub_upstream_connect_failures_total{")
                && l.contains("reason=\"not_authorized\"")
        ),
        "{text}"
    );
    assert_eq!(emulator.count(&c.client_id()), 0);
    emulator.refuse_logins(false);
    emulator
        .wait_for_count(&c.client_id(), 200, BACK)
        .await
        .expect("sent once logins are accepted");
    assert_eq!(
        assert_in_order(&emulator.received(&c.client_id()), 0..200),
        0
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_their_ttl_are_dropped_and_counted_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 2).await;
    let c = &creds[0];
    emulator.go_away().await;
    // The TTL is measured by the hub's clock: this test moves it.
    let clock = Arc::new(store::ManualClock::new(store::SystemClock.now()));
    let hub = hub_for_on(
        dir.path(),
        &emulator,
        Arc::clone(&clock) as Arc<dyn store::Clock>,
    )
    .await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    publish_acked(&mut client, c, 0..100).await;
    // Past the 2 s TTL of the first 100, without waiting for it.
    clock.advance(2_500);
    emulator.come_back().await.unwrap();
    publish_acked(&mut client, c, 100..150).await;
    emulator
        .wait_for_count(&c.client_id(), 50, BACK)
        .await
        .expect("the fresh messages");
    let got = emulator.received(&c.client_id());
    assert_in_order(&got, 100..150);
    let text = metrics_text(&hub).await;
    assert_eq!(dropped(&text, "ttl_expiry"), 100.0, "{text}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_while_offline_sends_everything_it_acknowledged_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (emulator, creds) = setup(root, &["modA", "modB"], 7200).await;
    emulator.go_away().await;
    let args = upstream_args(&emulator);
    let mut first = BinaryHub::start_with(root, 0, &args).await;
    let ca = hub::tls::ca_path(&root.join("data"));
    for c in &creds {
        let mut client = connected(first.addrs.mqtt, &ca, c).await;
        publish_acked(&mut client, c, 0..500).await;
    }
    first.kill9();
    let second = BinaryHub::start_with(root, 1, &args).await;
    emulator.come_back().await.unwrap();
    for c in &creds {
        emulator
            .wait_until(&format!("499 from {}", c.module), BACK, |all, _| {
                all.iter()
                    .any(|r| r.identity == c.client_id() && r.payload.as_ref() == b"499")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\nhub log:\n{}", second.log_tail()));
        assert_in_order(&emulator.received(&c.client_id()), 0..500);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_iot_hub_stops_acknowledging_on_is_given_up_and_its_messages_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 7200).await;
    let c = &creds[0];
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    let hub = TestHub::start_with(dir.path(), move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
        s.upstream_timeout_secs = Some(1);
    })
    .await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    publish_acked(&mut client, c, 0..5).await;
    emulator
        .wait_for_connects(&c.client_id(), 1, BACK)
        .await
        .unwrap();
    // A half-dead link: the connection stays up (pings are answered) but nothing is acked.
    emulator.set_ack(false);
    publish_acked(&mut client, c, 5..30).await;
    emulator.wait_for_swallowed(1, BACK).await.unwrap();
    emulator.set_ack(true);
    // Nobody drops the connection: the hub must notice the missing PUBACKs itself.
    emulator
        .wait_for_connects(&c.client_id(), 2, BACK)
        .await
        .expect("the hub reconnected on its own");
    wait_for_seq(&emulator, c, 29).await;
    assert_in_order(&emulator.received(&c.client_id()), 0..30);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_iot_hub_issued_given_with_module_key_works_towards_both_hubs() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("manifest.json"), manifest(&["modK"], 7200)).unwrap();
    // A 64-byte key, as IoT Hub may issue; the hub never generated it.
    let issued: Vec<u8> = (0u8..64).collect();
    let emulator = Emulator::start(EmulatorConfig {
        hostname: IOTHUB.to_owned(),
        bind: "127.0.0.1:0".parse().unwrap(),
        identities: vec![IdentityKey::module(DEVICE, "modK", issued.clone())],
        tls_dir: root.join("emulator"),
    })
    .await
    .unwrap();
    let (addr, ca) = (emulator.addr().to_string(), emulator.ca_pem());
    let given = format!(
        "modK={}",
        base64::engine::general_purpose::STANDARD.encode(&issued)
    );
    let hub = TestHub::start_with(root, move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
        s.module_keys = vec![given.clone()];
    })
    .await;
    let c = Creds {
        key: issued,
        ..hub.creds("modK")
    };
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), &c).await;
    publish_acked(&mut client, &c, 0..20).await;
    wait_for_seq(&emulator, &c, 19).await;
    assert_eq!(
        assert_in_order(&emulator.received(&c.client_id()), 0..20),
        0
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_a_module_removed_from_the_deployment_still_go_upstream_as_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (emulator, creds) = setup(root, &["modA", "gone"], 7200).await;
    emulator.go_away().await;
    let hub = hub_for(root, &emulator).await;
    for c in &creds {
        let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
        publish_acked(&mut client, c, 0..50).await;
    }
    hub.stop().await;
    // The next deployment no longer has module `gone`; its 50 messages wait on disk.
    std::fs::write(root.join("manifest.json"), manifest(&["modA"], 7200)).unwrap();
    let hub = hub_for(root, &emulator).await;
    emulator.come_back().await.unwrap();
    for c in &creds {
        wait_for_seq(&emulator, c, 49).await;
        assert_in_order(&emulator.received(&c.client_id()), 0..50);
    }
    // `gone` can no longer connect to the hub itself.
    let mut refused = RawClient::tls(hub.addrs.mqtt, &hub.ca()).await;
    let ack = refused.connect(creds[1].connect(true, 60)).await;
    assert_ne!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_into_upstream_while_it_is_off_are_named_in_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("manifest.json"), manifest(&["modA"], 7200)).unwrap();
    let hub = BinaryHub::start_with(root, 0, &["--upstream-protocol".into(), "none".into()]).await;
    // The warning is logged before the listeners bind, so before /readyz said ready.
    let log = std::fs::read_to_string(&hub.log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("upstream is off"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(line.contains("WARN") && line.contains("\"up\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_renewed_by_a_new_connection_without_sending_anything_twice() {
    use hub::identity::{Identities, Identity};
    use hub::metrics::HubMetrics;
    use hub::upstream::cloud::{CloudMessage, Upstream};
    use hub::upstream::mqtt::{client_tls_config, MqttUpstream, MqttUpstreamConfig};
    use router::{DeviceId, ModuleId};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA"], 7200).await;
    let c = &creds[0];
    let identities = Identities::load_or_create(
        &dir.path().join("data"),
        &DeviceId::new(DEVICE),
        &[ModuleId::new("modA")],
    )
    .unwrap();
    let tls = client_tls_config(Some(&emulator.ca_pem())).unwrap();
    let addr = emulator.addr();
    let mut config =
        MqttUpstreamConfig::new(IOTHUB, &addr.ip().to_string(), addr.port(), Arc::new(tls));
    // Renewal at three quarters of the lifetime: every 1.5 s here.
    config.token_ttl = Duration::from_secs(2);
    let upstream = MqttUpstream::new(
        config,
        Arc::new(identities),
        Arc::new(HubMetrics::new(IOTHUB, DEVICE)),
        || {},
    );
    let identity = Identity::new(DeviceId::new(DEVICE), ModuleId::new("modA"));
    // Steady traffic for 4 s, sent as the endpoint worker sends: a batch at a time, again from
    // the first message not acknowledged.
    let mut next = 0u64;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let batch = (next..next + 50)
            .map(|i| CloudMessage {
                topic: c.events_topic(""),
                payload: i.to_string().into(),
            })
            .collect();
        let answers = upstream.publish(&identity, batch).await;
        let acked = answers.iter().take_while(|a| a.is_ok()).count();
        next += acked as u64;
        if acked < answers.len() {
            // Not taken now (renewing or reconnecting): back off a little, as the worker does.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connects = emulator.stats().per_identity[&c.client_id()].connects_accepted;
    assert!(
        connects >= 2,
        "the token was never renewed: {connects} connection(s)"
    );
    assert!(next > 100, "traffic kept flowing: {next} messages");
    wait_for_seq(&emulator, c, next - 1).await;
    assert_eq!(
        assert_in_order(&emulator.received(&c.client_id()), 0..next),
        0,
        "a renewal sent something twice"
    );
}

/// A module removed from the deployment by a live reload: its logins are refused from then on,
/// but what it queued for `$upstream` while it was declared still goes to IoT Hub as that
/// module, in order (its key stays on file: `Identities::stored_key`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_removed_module_queued_for_iot_hub_still_goes_out_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (emulator, creds) = setup(dir.path(), &["modA", "modB"], 7200).await;
    let c = &creds[0];
    let hub = hub_for(dir.path(), &emulator).await;
    emulator.go_away().await;
    let mut client = connected(hub.addrs.mqtt, &hub.ca(), c).await;
    publish_acked(&mut client, c, 0..50).await;
    drop(client);

    // The manifest file replaced: the hub's directory watch reloads it.
    let path = dir.path().join("manifest.json");
    std::fs::write(dir.path().join("manifest.tmp"), manifest(&["modB"], 7200)).unwrap();
    std::fs::rename(dir.path().join("manifest.tmp"), &path).unwrap();
    metrics_until(&hub, |t| {
        t.lines()
            .any(|l| l.starts_with("edgehub_manifest_generation{") && l.ends_with(" 2"))
    })
    .await;
    let mut refused = RawClient::tls(hub.addrs.mqtt, &hub.ca()).await;
    let ack = refused.connect(c.connect(true, 60)).await;
    assert_eq!(
        ack.code,
        rumqttc::mqttbytes::v4::ConnectReturnCode::NotAuthorized,
        "a removed module cannot log in"
    );

    emulator.come_back().await.unwrap();
    wait_for_seq(&emulator, c, 49).await;
    assert_in_order(&emulator.received(&c.client_id()), 0..50);
    hub.stop().await;
}
