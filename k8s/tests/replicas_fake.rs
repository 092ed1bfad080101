//! A replicated module's StatefulSet against kube-fake-client: created at its count, scaled by
//! `kubectl scale` within the count, clamped above it, following a count change, stopped and
//! started, and recreated (pods orphaned) when a module becomes replicated or stops being so.
//!
//! The fake's server-side apply is a JSON merge: it never removes a field a field manager
//! stopped applying, which a real API server does (and then defaults `.spec.replicas` to 1).
//! So every write goes through a model of that rule for `.spec.replicas` (which managers own
//! it, by apply or by update): a manager that owned the field and applies without it would
//! leave it ownerless and removed. Each test asserts that never happens (`ssa.violations`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/fake.rs"]
mod fake;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s::desired::ControllerOptions;
use k8s::reconcile::{reconcile, Context, RECREATE_POLL};
use k8s::types::EdgeDeployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, ResourceExt};
use kube_fake_client::{interceptor, PatchType};
use serde_json::{json, Value};

const NS: &str = "factory";
const NOW: u64 = 1_780_000_000;
const STS: &str = "line4-filter";
const MAIN: &str = "edgehub-controller";
const SCALE: &str = "edgehub-controller-scale";

/// Who owns `.spec.replicas` of each StatefulSet, as a real API server would track it.
#[derive(Debug, Default)]
struct Ssa {
    replicas: BTreeMap<String, Owned>,
    /// Applies that would have made a real API server remove `.spec.replicas`.
    violations: Vec<String>,
    /// `APPLY manager Kind/name`, `MERGE manager Kind/name`, `DELETE name (orphan|cascade)`.
    writes: Vec<String>,
}

#[derive(Debug, Default)]
struct Owned {
    value: Option<i64>,
    owners: BTreeSet<String>,
}

impl Ssa {
    fn patch(&mut self, name: &str, manager: &str, kind: PatchType, patch: &Value) {
        let k = patch.get("kind").and_then(Value::as_str).unwrap_or("?");
        let verb = if kind == PatchType::ApplyPatch {
            "APPLY"
        } else {
            "MERGE"
        };
        self.writes.push(format!("{verb} {manager} {k}/{name}"));
        if k != "StatefulSet" && !(k == "?" && patch.pointer("/spec/replicas").is_some()) {
            return;
        }
        let field = self.replicas.entry(name.to_owned()).or_default();
        let given = patch.pointer("/spec/replicas").and_then(Value::as_i64);
        match (kind, given) {
            (PatchType::ApplyPatch, Some(v)) => {
                // A forced apply of another value takes the field; the same value shares it.
                if field.value != Some(v) {
                    field.owners.clear();
                }
                field.owners.insert(manager.to_owned());
                field.value = Some(v);
            }
            (PatchType::ApplyPatch, None) => {
                if field.owners.remove(manager) && field.owners.is_empty() {
                    self.violations.push(format!(
                        "{manager} stopped applying .spec.replicas of StatefulSet/{name}, which it alone owned: a real API server would remove it (default 1)"
                    ));
                    field.value = None;
                }
            }
            // An update (kubectl scale, an autoscaler) takes the field from every applier.
            (_, Some(v)) => {
                field.owners = BTreeSet::from([manager.to_owned()]);
                field.value = Some(v);
            }
            (_, None) => {}
        }
    }
}

type Model = Arc<Mutex<Ssa>>;

async fn fake(objects: Vec<Value>) -> (Client, Model) {
    let model: Model = Arc::default();
    let (m1, m2) = (model.clone(), model.clone());
    let funcs = interceptor::Funcs::new()
        .patch(move |ctx| {
            let manager = ctx.params.field_manager.clone().unwrap_or_default();
            m1.lock()
                .unwrap()
                .patch(ctx.name, &manager, ctx.patch_type, ctx.patch);
            Ok(None)
        })
        .delete(move |ctx| {
            let mut m = m2.lock().unwrap();
            let how = if ctx.cascade { "cascade" } else { "orphan" };
            m.writes.push(format!("DELETE {} ({how})", ctx.name));
            m.replicas.remove(ctx.name);
            Ok(None)
        });
    let client = fake::client(objects, funcs).await;
    (client, model)
}

fn example() -> EdgeDeployment {
    let path = format!("{}/examples/replicated.yaml", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("example")).expect("parse")
}

fn ed_value(ed: &EdgeDeployment) -> Value {
    let mut v = serde_json::to_value(ed).expect("json");
    v["metadata"]["namespace"] = json!(NS);
    v
}

fn filter_entry(ed: &mut EdgeDeployment) -> &mut Value {
    &mut ed.spec.manifest.inline.as_mut().expect("inline")["modulesContent"]["$edgeAgent"]
        ["properties.desired"]["modules"]["filter"]
}

async fn pass(client: &Client) -> Action {
    let ed = Api::<EdgeDeployment>::namespaced(client.clone(), NS)
        .get("line4")
        .await
        .expect("ed");
    let ctx = Context::new(
        client.clone(),
        ControllerOptions {
            hub_image: "localhost/edgehub:test".into(),
        },
    )
    .with_clock(|| NOW);
    reconcile(Arc::new(ed), Arc::new(ctx))
        .await
        .expect("reconcile")
}

/// Changes the `filter` module's manifest entry in the EdgeDeployment.
async fn edit_filter(client: &Client, edit: impl FnOnce(&mut Value)) {
    let eds: Api<EdgeDeployment> = Api::namespaced(client.clone(), NS);
    let mut ed = eds.get("line4").await.expect("ed");
    edit(filter_entry(&mut ed));
    let manifest = ed.spec.manifest.inline.clone().expect("inline");
    // A JSON merge patch of the whole manifest (a removed key must be sent as null).
    let mut patch = manifest.clone();
    if filter_entry(&mut ed).get("x-edgehub-replicas").is_none() {
        patch["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["filter"]
            ["x-edgehub-replicas"] = Value::Null;
    }
    eds.patch(
        "line4",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"manifest": {"inline": patch}}})),
    )
    .await
    .expect("change the manifest");
}

/// `kubectl scale statefulset/line4-filter --replicas=n`: an update by another manager.
async fn kubectl_scale(client: &Client, n: i32) {
    Api::<StatefulSet>::namespaced(client.clone(), NS)
        .patch(
            STS,
            &PatchParams {
                field_manager: Some("kubectl".into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"spec": {"replicas": n}})),
        )
        .await
        .expect("scale");
}

async fn sts(client: &Client) -> StatefulSet {
    Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get(STS)
        .await
        .expect("the filter's StatefulSet")
}

async fn replicas(client: &Client) -> Option<i32> {
    sts(client).await.spec.and_then(|s| s.replicas)
}

async fn policy(client: &Client) -> Option<String> {
    sts(client).await.spec.and_then(|s| s.pod_management_policy)
}

/// The writes since the last call, and no violation of the SSA rule so far.
fn take(model: &Model) -> Vec<String> {
    let mut m = model.lock().unwrap();
    assert_eq!(m.violations, Vec::<String>::new());
    std::mem::take(&mut m.writes)
}

/// The writes of `STS` only.
fn sts_writes(w: &[String]) -> Vec<&str> {
    w.iter()
        .map(String::as_str)
        .filter(|w| w.ends_with(&format!("/{STS}")) || w.starts_with(&format!("DELETE {STS} ")))
        .collect()
}

fn owners(model: &Model) -> BTreeSet<String> {
    model
        .lock()
        .unwrap()
        .replicas
        .get(STS)
        .map(|f| f.owners.clone())
        .unwrap_or_default()
}

async fn events(client: &Client, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

async fn filter_status(client: &Client) -> (String, String) {
    let ed = Api::<EdgeDeployment>::namespaced(client.clone(), NS)
        .get("line4")
        .await
        .unwrap();
    let m = ed
        .status
        .unwrap()
        .modules
        .into_iter()
        .find(|m| m.name == "filter")
        .unwrap();
    (m.phase, m.message)
}

#[tokio::test]
async fn a_replicated_module_is_created_at_its_count_by_the_scale_manager_and_a_second_pass_writes_nothing(
) {
    let (client, model) = fake(vec![ed_value(&example())]).await;
    pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [
            format!("APPLY {MAIN} StatefulSet/{STS}"),
            format!("APPLY {SCALE} StatefulSet/{STS}"),
        ],
        "created by the main manager, then scaled: {w:?}"
    );
    assert_eq!(replicas(&client).await, Some(3));
    assert_eq!(policy(&client).await.as_deref(), Some("Parallel"));
    assert_eq!(owners(&model), BTreeSet::from([SCALE.to_owned()]));
    let live = sts(&client).await;
    assert_eq!(
        live.labels()
            .get("edgehub.io/replicated")
            .map(String::as_str),
        Some("true")
    );
    // The singleton beside it is as before: replicas in the main apply.
    let sensor = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("line4-sensor")
        .await
        .unwrap();
    assert_eq!(sensor.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert_eq!(
        filter_status(&client).await,
        (
            "Pending".into(),
            "waiting for its pod to be ready: 0 of 3 replicas ready (at most 3)".into()
        )
    );

    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());

    // Ready pods: Running, and the message counts them.
    Api::<StatefulSet>::namespaced(client.clone(), NS)
        .patch(
            STS,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 3, "readyReplicas": 2}})),
        )
        .await
        .unwrap();
    take(&model);
    pass(&client).await;
    assert_eq!(
        filter_status(&client).await,
        ("Running".into(), "2 of 3 replicas ready (at most 3)".into())
    );
}

#[tokio::test]
async fn kubectl_scale_within_the_count_stands_and_above_it_is_clamped_with_a_warning() {
    let (client, model) = fake(vec![ed_value(&example())]).await;
    pass(&client).await;
    take(&model);

    for n in [2, 0, 1, 3] {
        kubectl_scale(&client, n).await;
        take(&model);
        pass(&client).await;
        let w = take(&model);
        assert_eq!(sts_writes(&w), Vec::<&str>::new(), "scaled to {n}: {w:?}");
        assert_eq!(replicas(&client).await, Some(n));
        assert_eq!(owners(&model), BTreeSet::from(["kubectl".to_owned()]));
    }
    assert_eq!(
        events(&client, "ReplicasClamped").await,
        Vec::<String>::new()
    );

    kubectl_scale(&client, 5).await;
    take(&model);
    pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [format!("APPLY {SCALE} StatefulSet/{STS}")],
        "{w:?}"
    );
    assert_eq!(replicas(&client).await, Some(3));
    assert_eq!(owners(&model), BTreeSet::from([SCALE.to_owned()]));
    let warned = events(&client, "ReplicasClamped").await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("scaled to 5 replicas")
            && warned[0].contains("count 3")
            && warned[0].contains("scaled back to 3"),
        "{}",
        warned[0]
    );

    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());
}

#[tokio::test]
async fn a_count_change_moves_a_module_at_its_ceiling_and_keeps_one_scaled_below_it() {
    let (client, model) = fake(vec![ed_value(&example())]).await;
    pass(&client).await;
    take(&model);
    let count = |n: u8| move |m: &mut Value| m["x-edgehub-replicas"]["count"] = json!(n);

    // At its ceiling 3: follows the count to 5.
    edit_filter(&client, count(5)).await;
    pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [
            format!("APPLY {SCALE} StatefulSet/{STS}"),
            format!("APPLY {MAIN} StatefulSet/{STS}"),
        ],
        "scaled, then the new ceiling recorded: {w:?}"
    );
    assert_eq!(replicas(&client).await, Some(5));
    assert_eq!(
        sts(&client)
            .await
            .annotations()
            .get("edgehub.io/max-replicas")
            .map(String::as_str),
        Some("5")
    );
    let scaled = events(&client, "ModuleScaled").await;
    assert!(
        scaled.iter().any(|n| n.contains("from 3 to 5")),
        "{scaled:?}"
    );

    // Scaled to 2 below it: a count of 4 keeps 2; a count of 1 clamps to 1.
    kubectl_scale(&client, 2).await;
    edit_filter(&client, count(4)).await;
    take(&model);
    pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [format!("APPLY {MAIN} StatefulSet/{STS}")],
        "only the ceiling recorded: {w:?}"
    );
    assert_eq!(replicas(&client).await, Some(2));
    assert_eq!(owners(&model), BTreeSet::from(["kubectl".to_owned()]));

    edit_filter(&client, count(1)).await;
    pass(&client).await;
    take(&model);
    assert_eq!(replicas(&client).await, Some(1));
    assert_eq!(owners(&model), BTreeSet::from([SCALE.to_owned()]));
    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());
}

#[tokio::test]
async fn a_stopped_replicated_module_runs_nothing_and_starts_again_at_its_count() {
    let (client, model) = fake(vec![ed_value(&example())]).await;
    pass(&client).await;
    take(&model);

    edit_filter(&client, |m| m["status"] = json!("stopped")).await;
    pass(&client).await;
    take(&model);
    assert_eq!(replicas(&client).await, Some(0));
    assert_eq!(filter_status(&client).await.0, "Stopped");

    kubectl_scale(&client, 1).await;
    take(&model);
    pass(&client).await;
    take(&model);
    assert_eq!(
        replicas(&client).await,
        Some(0),
        "clamped to 0 while stopped"
    );

    edit_filter(&client, |m| m["status"] = json!("running")).await;
    pass(&client).await;
    take(&model);
    assert_eq!(replicas(&client).await, Some(3));
    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());
}

#[tokio::test]
async fn a_module_that_becomes_replicated_or_stops_being_so_is_recreated_with_its_pods_orphaned() {
    let mut single = example();
    filter_entry(&mut single)
        .as_object_mut()
        .unwrap()
        .remove("x-edgehub-replicas");
    let (client, model) = fake(vec![ed_value(&single)]).await;
    pass(&client).await;
    take(&model);
    assert_eq!(policy(&client).await.as_deref(), Some("OrderedReady"));
    assert_eq!(replicas(&client).await, Some(1));
    assert_eq!(owners(&model), BTreeSet::from([MAIN.to_owned()]));

    // Replicated, count 2: podManagementPolicy is immutable, so delete (orphan) and create.
    edit_filter(&client, |m| {
        m["x-edgehub-replicas"] = json!({"count": 2, "partitionKey": "$body.sensor.id"});
    })
    .await;
    let action = pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [
            format!("DELETE {STS} (orphan)"),
            format!("APPLY {MAIN} StatefulSet/{STS}"),
            format!("APPLY {SCALE} StatefulSet/{STS}"),
        ],
        "{w:?}"
    );
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(300)),
        "gone at once in the fake: created in the same pass"
    );
    assert_eq!(policy(&client).await.as_deref(), Some("Parallel"));
    assert_eq!(replicas(&client).await, Some(2));
    let recreated = events(&client, "StatefulSetRecreated").await;
    assert!(
        recreated
            .iter()
            .any(|n| n.contains("OrderedReady") && n.contains("Parallel")),
        "{recreated:?}"
    );
    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());

    // And back: a singleton again, its replicas the main manager's.
    edit_filter(&client, |m| {
        m.as_object_mut().unwrap().remove("x-edgehub-replicas");
    })
    .await;
    pass(&client).await;
    let w = take(&model);
    assert_eq!(
        sts_writes(&w),
        [
            format!("DELETE {STS} (orphan)"),
            format!("APPLY {MAIN} StatefulSet/{STS}"),
        ],
        "{w:?}"
    );
    assert_eq!(policy(&client).await.as_deref(), Some("OrderedReady"));
    assert_eq!(replicas(&client).await, Some(1));
    assert_eq!(owners(&model), BTreeSet::from([MAIN.to_owned()]));
    pass(&client).await;
    assert_eq!(take(&model), Vec::<String>::new());
}

/// A real API server keeps an orphaning deletion's object (deletionTimestamp and the `orphan`
/// finalizer) until its pods are released: the pass leaves it alone and looks again soon.
#[tokio::test]
async fn a_statefulset_still_being_deleted_is_left_alone_and_looked_at_again_soon() {
    let terminating = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {
            "name": STS, "namespace": NS,
            "deletionTimestamp": "2026-06-01T00:00:00Z", "finalizers": ["orphan"],
            "labels": {"app.kubernetes.io/managed-by": MAIN, "app.kubernetes.io/part-of": "line4",
                       "app.kubernetes.io/component": "module", "edgehub.io/module": "filter"}
        },
        "spec": {
            "replicas": 1, "podManagementPolicy": "OrderedReady", "serviceName": STS,
            "selector": {"matchLabels": {"app.kubernetes.io/part-of": "line4"}},
            "template": {"metadata": {"labels": {"app.kubernetes.io/part-of": "line4"}},
                         "spec": {"containers": [{"name": "filter", "image": "old"}]}}
        }
    });
    let (client, model) = fake(vec![ed_value(&example()), terminating]).await;
    let action = pass(&client).await;
    let w = take(&model);
    assert_eq!(sts_writes(&w), Vec::<&str>::new(), "{w:?}");
    assert_eq!(action, Action::requeue(RECREATE_POLL));
    assert_eq!(policy(&client).await.as_deref(), Some("OrderedReady"));
}
