//! Reconcile against kube-fake-client (an in-memory API: get/list/create/patch/SSA; no watch,
//! so reconcile is called directly). Every write the controller makes is recorded by an
//! interceptor, so "a second pass changes nothing" is asserted as "it wrote nothing".
//!
//! Limits of the fake, and what the tests do about them: its server-side apply is a JSON merge
//! (it does not remove fields a manager stopped setting) and it bumps resourceVersion on every
//! write; it never sets a deletionTimestamp (delete removes at once), so deletion is tested by
//! seeding an EdgeDeployment that is already being deleted.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/fake.rs"]
mod fake;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use k8s::desired::{self, ControllerOptions, SecretMaterial};
use k8s::reconcile::{reconcile, Context, FINALIZER};
use k8s::types::EdgeDeployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kube_fake_client::interceptor;
use serde_json::{json, Value};

const NS: &str = "factory";
const NOW: u64 = 1_780_000_000;

fn example(name: &str) -> EdgeDeployment {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("example")).expect("parse")
}

type Writes = Arc<Mutex<Vec<String>>>;

/// A fake API holding `objects`, recording every write as `VERB Kind/name`.
async fn fake(objects: Vec<Value>) -> (Client, Writes) {
    let writes: Writes = Arc::default();
    let (w1, w2, w3, w4) = (
        writes.clone(),
        writes.clone(),
        writes.clone(),
        writes.clone(),
    );
    let funcs = interceptor::Funcs::new()
        .patch(move |ctx| {
            let kind = ctx.patch.get("kind").and_then(Value::as_str).unwrap_or("?");
            w1.lock()
                .unwrap()
                .push(format!("PATCH {kind}/{}", ctx.name));
            Ok(None)
        })
        .patch_status(move |ctx| {
            w2.lock().unwrap().push(format!("STATUS {}", ctx.name));
            Ok(None)
        })
        .create(move |ctx| {
            let kind = ctx
                .object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("?");
            w3.lock().unwrap().push(format!("CREATE {kind}"));
            Ok(None)
        })
        .delete(move |ctx| {
            w4.lock().unwrap().push(format!("DELETE {}", ctx.name));
            Ok(None)
        });
    let client = fake::client(objects, funcs).await;
    (client, writes)
}

fn ed_value(ed: &EdgeDeployment) -> Value {
    let mut v = serde_json::to_value(ed).expect("json");
    v["metadata"]["namespace"] = json!(NS);
    v
}

fn context(client: &Client) -> Arc<Context> {
    Arc::new(
        Context::new(
            client.clone(),
            ControllerOptions {
                hub_image: "localhost/edgehub:test".into(),
            },
        )
        .with_clock(|| NOW),
    )
}

async fn get_ed(client: &Client, name: &str) -> Arc<EdgeDeployment> {
    Arc::new(
        Api::<EdgeDeployment>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .expect("ed"),
    )
}

async fn pass(client: &Client, name: &str) -> kube::runtime::controller::Action {
    let ed = get_ed(client, name).await;
    reconcile(ed, context(client)).await.expect("reconcile")
}

async fn names<K>(client: &Client) -> BTreeSet<String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect()
}

fn take(writes: &Writes) -> Vec<String> {
    std::mem::take(&mut *writes.lock().unwrap())
}

fn condition(ed: &EdgeDeployment, t: &str) -> (String, String, String) {
    let c = ed
        .status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no condition {t}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8(b.0.clone()).expect("utf8"))
}

#[tokio::test]
async fn a_first_pass_creates_everything_and_a_second_writes_nothing() {
    let (client, writes) = fake(vec![ed_value(&example("two-modules.yaml"))]).await;
    pass(&client, "line2").await;

    let sts = "line2-simulatedtemperaturesensor-c0c65d";
    assert_eq!(
        names::<StatefulSet>(&client).await,
        set(&["line2-hub", sts, "line2-archiver", "line2-filter"])
    );
    assert_eq!(
        names::<Service>(&client).await,
        set(&["line2-hub", "line2-filter"])
    );
    assert_eq!(
        names::<ConfigMap>(&client).await,
        set(&["line2-trust-bundle", "line2-manifest", "line2-hub-epoch"])
    );
    assert_eq!(
        names::<Secret>(&client).await,
        set(&[
            "line2-hub-tls",
            "line2-module-keys",
            "line2-module-simulatedtemperaturesensor-c0c65d",
            "line2-module-archiver",
            "line2-module-filter",
        ])
    );
    let first = take(&writes);
    assert!(
        first.contains(&"PATCH StatefulSet/line2-hub".to_owned()),
        "{first:?}"
    );
    assert!(first.contains(&"STATUS line2".to_owned()), "{first:?}");

    // Real material: a CA in the trust bundle equal to the Secret's; a base64 key per module
    // that the module's connection string carries.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let tls = secrets.get("line2-hub-tls").await.expect("tls");
    let ca = secret_text(&tls, "ca.crt").expect("ca.crt");
    assert!(ca.contains("BEGIN CERTIFICATE"));
    let bundle = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("line2-trust-bundle")
        .await
        .expect("bundle");
    assert_eq!(
        bundle.data.as_ref().and_then(|d| d.get("ca.crt")),
        Some(&ca)
    );
    let keys = secrets.get("line2-module-keys").await.expect("keys");
    let filter_key = secret_text(&keys, "filter").expect("filter's key");
    let cs = secret_text(
        &secrets.get("line2-module-filter").await.expect("cs"),
        "connectionString",
    )
    .expect("connectionString");
    assert!(
        cs.contains(&format!("SharedAccessKey={filter_key};")),
        "{cs}"
    );

    // Finalizer and status.
    let ed = get_ed(&client, "line2").await;
    assert!(ed.finalizers().iter().any(|f| f == FINALIZER));
    let status = ed.status.clone().expect("status");
    assert_eq!(status.observed_generation, ed.metadata.generation);
    assert_eq!(status.store_epoch, Some(1));
    assert_eq!(
        condition(&ed, "HubReady").0,
        "False",
        "no pod is ready in a fake"
    );
    assert_eq!(
        condition(&ed, "Degraded"),
        ("False".into(), "AsExpected".into(), String::new())
    );
    let phases: Vec<(String, String)> = status
        .modules
        .iter()
        .map(|m| (m.name.clone(), m.phase.clone()))
        .collect();
    assert_eq!(
        phases,
        [
            ("SimulatedTemperatureSensor".into(), "Pending".into()),
            ("archiver".into(), "Stopped".into()),
            ("filter".into(), "Pending".into()),
        ]
    );

    // The second pass: nothing to write, the same certificate and keys.
    pass(&client, "line2").await;
    assert_eq!(take(&writes), Vec::<String>::new());
    let tls_again = secrets.get("line2-hub-tls").await.expect("tls");
    assert_eq!(tls_again.resource_version(), tls.resource_version());
    assert_eq!(
        secret_text(
            &secrets.get("line2-module-keys").await.expect("keys"),
            "filter"
        ),
        Some(filter_key)
    );
}

#[tokio::test]
async fn readiness_of_the_statefulsets_becomes_the_status() {
    let (client, _) = fake(vec![ed_value(&example("minimal.yaml"))]).await;
    pass(&client, "line1").await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    for name in ["line1-hub", "line1-sensor"] {
        sts.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 1, "readyReplicas": 1}})),
        )
        .await
        .expect("ready");
    }
    pass(&client, "line1").await;
    let ed = get_ed(&client, "line1").await;
    assert_eq!(condition(&ed, "Ready").0, "True");
    assert_eq!(condition(&ed, "HubReady").1, "HubPodReady");
    assert_eq!(condition(&ed, "ModulesReady").1, "AllModulesReady");
    assert_eq!(
        ed.status.as_ref().expect("status").modules[0].phase,
        "Running"
    );
}

#[tokio::test]
async fn a_new_hub_image_changes_only_the_hub_statefulset() {
    let (client, writes) = fake(vec![ed_value(&example("two-modules.yaml"))]).await;
    pass(&client, "line2").await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let before = sts.get("line2-hub").await.expect("hub");
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), NS);
    eds.patch(
        "line2",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"hub": {"image": "localhost/edgehub:2"}}})),
    )
    .await
    .expect("change the spec");
    take(&writes);

    pass(&client, "line2").await;
    let w = take(&writes);
    let applied: Vec<&String> = w.iter().filter(|w| w.starts_with("PATCH")).collect();
    assert_eq!(applied, ["PATCH StatefulSet/line2-hub"], "{w:?}");
    let after = sts.get("line2-hub").await.expect("hub");
    let image = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
    };
    assert_eq!(image(&before).as_deref(), Some("localhost/edgehub:test"));
    assert_eq!(image(&after).as_deref(), Some("localhost/edgehub:2"));
    let claims = |s: &StatefulSet| {
        serde_json::to_value(&s.spec.as_ref().unwrap().volume_claim_templates).unwrap()
    };
    assert_eq!(claims(&after), claims(&before), "storage untouched");
    let ed = get_ed(&client, "line2").await;
    assert_eq!(
        ed.status.as_ref().unwrap().observed_generation,
        ed.metadata.generation
    );
}

#[tokio::test]
async fn modules_added_removed_and_stopped() {
    let (client, writes) = fake(vec![ed_value(&example("two-modules.yaml"))]).await;
    pass(&client, "line2").await;
    let ed = get_ed(&client, "line2").await;
    let mut manifest = ed.spec.manifest.inline.clone().expect("inline");
    let modules = &mut manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"];
    modules["filter"] = Value::Null; // a merge patch removes a key by setting it to null
    modules["SimulatedTemperatureSensor"]["status"] = json!("stopped");
    modules["added"] = json!({"settings": {"image": "example.com/added:1"}});
    manifest["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] =
        json!({"up": "FROM /messages/* INTO $upstream"});
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), NS);
    eds.patch(
        "line2",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"manifest": {"inline": manifest}}})),
    )
    .await
    .expect("change the manifest");
    take(&writes);

    pass(&client, "line2").await;
    let w = take(&writes);
    let sensor = "line2-simulatedtemperaturesensor-c0c65d";
    assert_eq!(
        names::<StatefulSet>(&client).await,
        set(&["line2-hub", sensor, "line2-archiver", "line2-added"])
    );
    assert_eq!(
        names::<Service>(&client).await,
        set(&["line2-hub"]),
        "filter's Service is gone"
    );
    let secrets = names::<Secret>(&client).await;
    assert!(!secrets.contains("line2-module-filter"), "{secrets:?}");
    assert!(secrets.contains("line2-module-added"), "{secrets:?}");
    for gone in ["DELETE line2-filter", "DELETE line2-module-filter"] {
        assert!(w.iter().any(|x| x == gone), "{gone} not in {w:?}");
    }
    let keys = Api::<Secret>::namespaced(client.clone(), NS)
        .get("line2-module-keys")
        .await
        .expect("keys");
    let key_names: BTreeSet<String> = keys.data.unwrap().keys().cloned().collect();
    assert_eq!(
        key_names,
        set(&["SimulatedTemperatureSensor", "added", "archiver"]),
        "the hub must not keep filter's key"
    );
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    assert_eq!(
        sts.get(sensor).await.unwrap().spec.unwrap().replicas,
        Some(0)
    );
    let ed = get_ed(&client, "line2").await;
    let stopped = ed
        .status
        .clone()
        .unwrap()
        .modules
        .into_iter()
        .find(|m| m.name == "SimulatedTemperatureSensor")
        .unwrap();
    assert_eq!(stopped.phase, "Stopped");
}

#[tokio::test]
async fn untranslatable_create_options_set_degraded_naming_the_field() {
    let mut ed = example("minimal.yaml");
    ed.spec.manifest.inline.as_mut().unwrap()["modulesContent"]["$edgeAgent"]
        ["properties.desired"]["modules"]["sensor"]["settings"]["createOptions"] =
        json!(r#"{"HostConfig":{"Privileged":true,"CapAdd":["NET_ADMIN"]}}"#);
    let (client, _) = fake(vec![ed_value(&ed)]).await;
    pass(&client, "line1").await;
    let ed = get_ed(&client, "line1").await;
    let (status, reason, message) = condition(&ed, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "UntranslatedCreateOptions")
    );
    let base = "modulesContent.$edgeAgent.properties.desired.modules.sensor.settings.createOptions.HostConfig";
    assert!(message.contains(&format!("{base}.Privileged")), "{message}");
    assert!(message.contains(&format!("{base}.CapAdd")), "{message}");
    // The module still runs: the rest was applied.
    assert!(names::<StatefulSet>(&client).await.contains("line1-sensor"));
}

#[tokio::test]
async fn a_bad_route_sets_degraded_with_the_routers_located_message_and_applies_nothing() {
    let mut ed = example("minimal.yaml");
    let manifest = ed.spec.manifest.inline.as_mut().unwrap();
    manifest["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]["upstream"] =
        json!("FROM /messages/* WHERE INTO $upstream");
    let expected = router::manifest::parse_deployment_value(manifest)
        .expect_err("bad")
        .issues[0]
        .to_string();
    let (client, writes) = fake(vec![ed_value(&ed)]).await;
    pass(&client, "line1").await;

    let ed = get_ed(&client, "line1").await;
    let (status, reason, message) = condition(&ed, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "InvalidManifest")
    );
    assert_eq!(message, expected);
    assert_eq!(condition(&ed, "Ready").0, "False");
    assert!(names::<StatefulSet>(&client).await.is_empty());
    assert!(names::<Secret>(&client).await.is_empty());
    let events = Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidManifest")
                && e.type_.as_deref() == Some("Warning")),
        "{:?}",
        events.items
    );
    // Nothing changes: a second pass writes nothing (no second Event, no status write).
    take(&writes);
    pass(&client, "line1").await;
    assert_eq!(take(&writes), Vec::<String>::new());
}

#[tokio::test]
async fn a_manifest_from_a_config_map_key() {
    let ed = example("configmap-ref.yaml");
    let manifest = std::fs::read_to_string(format!(
        "{}/examples/deployment.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let keys = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "line3-iothub-keys", "namespace": NS},
        "data": {"sender": base64_of("c2VuZGVyLWtleS1pc3N1ZWQtYnktaW90aHViIQ==")}});
    // Without the ConfigMap: Degraded, nothing applied.
    let (client, _) = fake(vec![ed_value(&ed), keys.clone()]).await;
    pass(&client, "line3").await;
    let (_, reason, message) = condition(&*get_ed(&client, "line3").await, "Degraded");
    assert_eq!(reason, "ManifestNotFound");
    assert!(message.contains("line3-deployment"), "{message}");

    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "line3-deployment", "namespace": NS},
        "data": {"deployment.json": manifest}});
    let (client, _) = fake(vec![ed_value(&ed), keys, cm]).await;
    pass(&client, "line3").await;
    assert_eq!(
        condition(&*get_ed(&client, "line3").await, "Degraded").1,
        "AsExpected"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let cs = secret_text(
        &secrets.get("line3-module-sender").await.unwrap(),
        "connectionString",
    )
    .unwrap();
    assert!(
        cs.contains("SharedAccessKey=c2VuZGVyLWtleS1pc3N1ZWQtYnktaW90aHViIQ==;"),
        "the issued key is used: {cs}"
    );
    assert!(names::<StatefulSet>(&client)
        .await
        .contains("line3-receiver"));
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The objects of `ed` as reconcile would have left them (placeholder data is enough here).
fn existing_objects(ed: &EdgeDeployment) -> Vec<Value> {
    let manifest = ed.spec.manifest.inline.clone().unwrap();
    let modules = k8s::agent::parse_manifest(&manifest).unwrap();
    let material = SecretMaterial::placeholders(ed, &modules);
    let d = desired::desired(ed, &manifest, &material, &ControllerOptions::default()).unwrap();
    d.objects().iter().map(|o| o.to_value().unwrap()).collect()
}

async fn deletion(retain: bool) -> (Client, Writes) {
    let mut ed = example("minimal.yaml");
    ed.metadata.namespace = Some(NS.into());
    ed.metadata.uid = Some("uid-line1".into());
    ed.spec.hub.storage.retain_on_delete = retain;
    ed.metadata.finalizers = Some(vec![FINALIZER.into()]);
    ed.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(NOW as i64).unwrap(),
    ));
    let mut objects = vec![ed_value(&ed)];
    objects.extend(existing_objects(&ed));
    // The StatefulSet controller's PVC: the template's labels, no owner.
    objects.push(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "store-line1-hub-0", "namespace": NS,
            "labels": {"app.kubernetes.io/part-of": "line1", "app.kubernetes.io/component": "hub",
                       "app.kubernetes.io/managed-by": "edgehub-controller"}},
        "spec": {"accessModes": ["ReadWriteOncePod"], "resources": {"requests": {"storage": "1Gi"}}}}));
    let (client, writes) = fake(objects).await;
    assert_eq!(names::<StatefulSet>(&client).await.len(), 2);
    let action = pass(&client, "line1").await;
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    (client, writes)
}

#[tokio::test]
async fn deleting_removes_everything_but_the_store_volume() {
    let (client, writes) = deletion(true).await;
    let w = take(&writes);
    for gone in [
        "DELETE line1-hub",
        "DELETE line1-sensor",
        "DELETE line1-hub-tls",
        "DELETE line1-module-keys",
        "DELETE line1-manifest",
    ] {
        assert!(w.iter().any(|x| x == gone), "{gone} not in {w:?}");
    }
    assert!(names::<StatefulSet>(&client).await.is_empty());
    assert!(names::<Secret>(&client).await.is_empty());
    assert!(names::<ConfigMap>(&client).await.is_empty());
    assert!(names::<Service>(&client).await.is_empty());
    assert_eq!(
        names::<PersistentVolumeClaim>(&client).await,
        set(&["store-line1-hub-0"])
    );
    // The finalizer was removed, so the EdgeDeployment is gone.
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), NS);
    assert!(eds.get_opt("line1").await.unwrap().is_none());
}

#[tokio::test]
async fn deleting_with_retain_on_delete_false_removes_the_store_volume_too() {
    let (client, writes) = deletion(false).await;
    assert!(take(&writes)
        .iter()
        .any(|x| x == "DELETE store-line1-hub-0"));
    assert!(names::<PersistentVolumeClaim>(&client).await.is_empty());
}

#[tokio::test]
async fn a_successful_pass_resets_the_backoff() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let funcs = interceptor::Funcs::new().patch(move |ctx| {
        // Server-side apply bodies carry their kind; the finalizer's merge patch does not.
        if f.load(Ordering::SeqCst) && ctx.patch.get("kind").is_some() {
            return Err(kube_fake_client::Error::Internal("scripted failure".into()));
        }
        Ok(None)
    });
    let client = fake::client(vec![ed_value(&example("minimal.yaml"))], funcs).await;
    let ctx = context(&client);
    let secs = |a: kube::runtime::controller::Action| {
        a == kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
    };
    let mut first = Vec::new();
    for _ in 0..2 {
        let ed = get_ed(&client, "line1").await;
        let err = reconcile(ed.clone(), ctx.clone())
            .await
            .expect_err("apply fails");
        first.push(k8s::reconcile::error_policy(ed, &err, ctx.clone()));
    }
    assert!(secs(first[0].clone()));
    assert_eq!(
        first[1],
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
    );

    failing.store(false, Ordering::SeqCst);
    reconcile(get_ed(&client, "line1").await, ctx.clone())
        .await
        .expect("succeeds");
    failing.store(true, Ordering::SeqCst);
    let mut ed = (*get_ed(&client, "line1").await).clone();
    // Something to apply again.
    ed.spec.hub.image = Some("localhost/edgehub:other".into());
    let ed = Arc::new(ed);
    let err = reconcile(ed.clone(), ctx.clone())
        .await
        .expect_err("apply fails again");
    assert!(
        secs(k8s::reconcile::error_policy(ed, &err, ctx.clone())),
        "back to the first delay"
    );
}

#[tokio::test]
async fn the_server_certificate_is_reissued_near_expiry_with_the_same_ca() {
    let (client, writes) = fake(vec![ed_value(&example("minimal.yaml"))]).await;
    pass(&client, "line1").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let before = secrets.get("line1-hub-tls").await.unwrap();
    take(&writes);

    // 340 days on: the 365-day certificate expires within 30 days.
    let later = NOW + 340 * 86_400;
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            ControllerOptions {
                hub_image: "localhost/edgehub:test".into(),
            },
        )
        .with_clock(move || later),
    );
    reconcile(get_ed(&client, "line1").await, ctx)
        .await
        .expect("reconcile");
    let after = secrets.get("line1-hub-tls").await.unwrap();
    assert_eq!(
        secret_text(&after, "ca.crt"),
        secret_text(&before, "ca.crt"),
        "the CA stays"
    );
    assert_eq!(
        secret_text(&after, "ca.key"),
        secret_text(&before, "ca.key")
    );
    assert_ne!(
        secret_text(&after, "tls.crt"),
        secret_text(&before, "tls.crt"),
        "a new server certificate"
    );
    let not_after = |s: &Secret| {
        s.metadata.annotations.as_ref().unwrap()[k8s::tls::ANNOTATION_NOT_AFTER]
            .parse::<u64>()
            .unwrap()
    };
    assert!(not_after(&after) > later + 300 * 86_400);
    let w = take(&writes);
    let applied: Vec<&String> = w.iter().filter(|w| w.starts_with("PATCH")).collect();
    assert_eq!(
        applied,
        ["PATCH Secret/line1-hub-tls"],
        "the trust bundle and the hub are untouched: {w:?}"
    );
}

#[tokio::test]
async fn a_missing_keys_secret_sets_degraded_and_applies_nothing() {
    let mut ed = example("minimal.yaml");
    ed.spec.device.keys_secret = Some("line1-iothub-keys".into());
    let (client, _) = fake(vec![ed_value(&ed)]).await;
    pass(&client, "line1").await;
    let (status, reason, message) = condition(&*get_ed(&client, "line1").await, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "KeysSecretNotFound")
    );
    assert!(message.contains("line1-iothub-keys"), "{message}");
    assert!(
        names::<Secret>(&client).await.is_empty(),
        "no key minted in its place"
    );
}
