//! The store epoch and the node-loss policy, reconciled against kube-fake-client (an in-memory
//! API; see reconcile_fake.rs for its limits). The clock is injected (`Context::with_clock`),
//! so "the timer passes" is a later clock reading, never a sleep. Every write is recorded, so
//! "exactly once" is counted, not assumed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/fake.rs"]
mod fake;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s::desired::ControllerOptions;
use k8s::reconcile::{reconcile, Context, Error, FINALIZER, RESYNC};
use k8s::types::{EdgeDeployment, NodeLossPolicy};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client};
use kube_fake_client::interceptor;
use serde_json::{json, Value};

const NS: &str = "factory";
/// When the node went NotReady.
const LOST_AT: u64 = 1_780_000_000;

type Writes = Arc<Mutex<Vec<String>>>;

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
            let name = ctx.object["metadata"]["name"].as_str().unwrap_or("?");
            w3.lock().unwrap().push(format!("CREATE {kind}/{name}"));
            Ok(None)
        })
        .delete(move |ctx| {
            w4.lock().unwrap().push(format!("DELETE {}", ctx.name));
            Ok(None)
        });
    let client = fake::client(objects, funcs).await;
    (client, writes)
}

fn edge_deployment(policy: NodeLossPolicy) -> Value {
    let path = format!("{}/examples/minimal.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut ed: EdgeDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ed.spec.hub.node_loss.policy = policy;
    ed.spec.hub.node_loss.not_ready_after = "60s".into();
    let mut v = serde_json::to_value(&ed).unwrap();
    v["metadata"]["namespace"] = json!(NS);
    v
}

fn hub_pod(uid: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "line1-hub-0", "namespace": NS, "uid": uid,
            "labels": {"app.kubernetes.io/part-of": "line1", "app.kubernetes.io/component": "hub"}},
        "spec": {"nodeName": node, "containers": [{"name": "hub", "image": "localhost/edgehub:test"}]}})
}

fn rfc3339(secs: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .unwrap()
        .to_string()
}

/// A node whose Ready condition is `status` since `since`, with the out-of-service taint or not.
fn node(name: &str, status: &str, since: u64, out_of_service: bool) -> Value {
    let taints = if out_of_service {
        json!([{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}])
    } else {
        json!([])
    };
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"taints": taints},
        "status": {"conditions": [{"type": "Ready", "status": status,
            "lastTransitionTime": rfc3339(since), "lastHeartbeatTime": rfc3339(since)}]}})
}

fn context(client: &Client, now: u64) -> Arc<Context> {
    Arc::new(
        Context::new(
            client.clone(),
            ControllerOptions {
                hub_image: "localhost/edgehub:test".into(),
            },
        )
        .with_clock(move || now),
    )
}

async fn get_ed(client: &Client) -> Arc<EdgeDeployment> {
    Arc::new(
        Api::<EdgeDeployment>::namespaced(client.clone(), NS)
            .get("line1")
            .await
            .unwrap(),
    )
}

async fn pass_at(client: &Client, now: u64) -> Action {
    reconcile(get_ed(client).await, context(client, now))
        .await
        .expect("reconcile")
}

fn take(writes: &Writes) -> Vec<String> {
    std::mem::take(&mut *writes.lock().unwrap())
}

fn count(writes: &[String], what: &str) -> usize {
    writes.iter().filter(|w| *w == what).count()
}

/// The ConfigMap's epoch text.
async fn epoch_in_config_map(client: &Client) -> String {
    Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("line1-hub-epoch")
        .await
        .unwrap()
        .data
        .unwrap()["epoch"]
        .clone()
}

/// The `--epoch` the hub StatefulSet's pod template passes.
async fn epoch_in_template(client: &Client) -> String {
    let sts = Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get("line1-hub")
        .await
        .unwrap();
    let args = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let i = args.iter().position(|a| a == "--epoch").expect("--epoch");
    args[i + 1].clone()
}

async fn hub_pod_exists(client: &Client) -> bool {
    Api::<Pod>::namespaced(client.clone(), NS)
        .get_opt("line1-hub-0")
        .await
        .unwrap()
        .is_some()
}

async fn failover_events(client: &Client) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("HubFailover"))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_new_deployment_starts_at_epoch_one_from_its_config_map_and_a_second_pass_writes_nothing()
{
    let (client, writes) = fake(vec![edge_deployment(NodeLossPolicy::Never)]).await;
    pass_at(&client, LOST_AT).await;
    let w = take(&writes);
    assert_eq!(count(&w, "CREATE ConfigMap/line1-hub-epoch"), 1, "{w:?}");
    assert_eq!(epoch_in_config_map(&client).await, "1");
    assert_eq!(epoch_in_template(&client).await, "1");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("line1-hub-epoch")
        .await
        .unwrap();
    assert_eq!(
        cm.metadata.owner_references, None,
        "the epoch outlives the EdgeDeployment as the retained volume does"
    );
    assert_eq!(
        get_ed(&client).await.status.as_ref().unwrap().store_epoch,
        Some(1)
    );
    pass_at(&client, LOST_AT + 1).await;
    assert_eq!(take(&writes), Vec::<String>::new());
}

#[tokio::test]
async fn the_config_map_is_the_source_of_truth_for_the_epoch_not_the_status() {
    // An epoch raised before (by an earlier failover), and a status that says otherwise.
    let mut ed = edge_deployment(NodeLossPolicy::Never);
    ed["status"] = json!({"storeEpoch": 2});
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "line1-hub-epoch", "namespace": NS}, "data": {"epoch": "5"}});
    let (client, _) = fake(vec![ed, cm]).await;
    pass_at(&client, LOST_AT).await;
    assert_eq!(epoch_in_template(&client).await, "5");
    assert_eq!(
        get_ed(&client).await.status.as_ref().unwrap().store_epoch,
        Some(5)
    );
    assert_eq!(epoch_in_config_map(&client).await, "5", "never lowered");
}

#[tokio::test]
async fn a_config_map_without_an_epoch_is_an_error_and_nothing_is_applied() {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "line1-hub-epoch", "namespace": NS}, "data": {"epoch": "two"}});
    let (client, _) = fake(vec![edge_deployment(NodeLossPolicy::Never), cm]).await;
    let err = reconcile(get_ed(&client).await, context(&client, LOST_AT))
        .await
        .expect_err("no epoch");
    assert!(matches!(err, Error::Epoch(_)), "{err:?}");
    assert!(err.to_string().contains("\"two\""), "{err}");
    assert!(Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get_opt("line1-hub")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_node_not_ready_past_the_timer_bumps_the_epoch_once_and_force_deletes_the_pod_once() {
    let (client, writes) = fake(vec![
        edge_deployment(NodeLossPolicy::ForceDeletePod),
        hub_pod("pod-a", "n1"),
        node("n1", "False", LOST_AT, false),
        node("n2", "True", LOST_AT - 9_000, false),
    ])
    .await;

    // 30 s in: the timer runs; look again when it runs out.
    let action = pass_at(&client, LOST_AT + 30).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let w = take(&writes);
    assert_eq!(count(&w, "DELETE line1-hub-0"), 0, "{w:?}");
    assert_eq!(epoch_in_config_map(&client).await, "1");
    assert!(hub_pod_exists(&client).await);

    // 61 s in: the epoch first, then the pod.
    let action = pass_at(&client, LOST_AT + 61).await;
    assert_eq!(action, Action::requeue(RESYNC));
    let w = take(&writes);
    let bump = w
        .iter()
        .position(|x| x == "PATCH ?/line1-hub-epoch")
        .unwrap_or_else(|| panic!("no bump: {w:?}"));
    let template = w
        .iter()
        .position(|x| x == "PATCH StatefulSet/line1-hub")
        .unwrap_or_else(|| panic!("the template keeps the old epoch: {w:?}"));
    let delete = w
        .iter()
        .position(|x| x == "DELETE line1-hub-0")
        .unwrap_or_else(|| panic!("no delete: {w:?}"));
    assert!(bump < template && template < delete, "order: {w:?}");
    assert_eq!(count(&w, "DELETE line1-hub-0"), 1, "{w:?}");
    assert_eq!(count(&w, "PATCH ?/line1-hub-epoch"), 1, "{w:?}");
    assert_eq!(epoch_in_config_map(&client).await, "2");
    assert_eq!(epoch_in_template(&client).await, "2");
    assert!(!hub_pod_exists(&client).await);
    let status = get_ed(&client).await.status.clone().unwrap();
    assert_eq!(status.store_epoch, Some(2));
    let last = status.last_failover.expect("lastFailover");
    assert_eq!(
        (
            last.from_node.as_str(),
            last.epoch,
            last.reason.as_str(),
            last.lost_for_seconds,
            last.pod_uid.as_str(),
            last.at
        ),
        (
            "n1",
            2,
            "NodeNotReady",
            Some(61),
            "pod-a",
            rfc3339(LOST_AT + 61)
        )
    );
    let events = failover_events(&client).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].contains("n1") && events[0].contains("epoch raised to 2"),
        "{events:?}"
    );

    // Later passes do nothing more: first with the pod gone, then with the StatefulSet's new
    // pod on a healthy node (the old node still NotReady).
    pass_at(&client, LOST_AT + 62).await;
    assert_eq!(take(&writes), Vec::<String>::new());
    Api::<Pod>::namespaced(client.clone(), NS)
        .create(
            &Default::default(),
            &serde_json::from_value(hub_pod("pod-b", "n2")).unwrap(),
        )
        .await
        .unwrap();
    take(&writes);
    pass_at(&client, LOST_AT + 400).await;
    assert_eq!(take(&writes), Vec::<String>::new());
    assert_eq!(epoch_in_config_map(&client).await, "2");
    assert!(hub_pod_exists(&client).await);
    assert_eq!(failover_events(&client).await.len(), 1);
}

#[tokio::test]
async fn a_node_back_before_the_timer_changes_nothing() {
    let (client, writes) = fake(vec![
        edge_deployment(NodeLossPolicy::ForceDeletePod),
        hub_pod("pod-a", "n1"),
        node("n1", "Unknown", LOST_AT, false),
    ])
    .await;
    let action = pass_at(&client, LOST_AT + 45).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    Api::<Node>::all(client.clone())
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                "lastTransitionTime": rfc3339(LOST_AT + 50), "lastHeartbeatTime": rfc3339(LOST_AT + 50)}]}})),
        )
        .await
        .unwrap();
    take(&writes);
    let action = pass_at(&client, LOST_AT + 61).await;
    assert_eq!(action, Action::requeue(RESYNC));
    let w = take(&writes);
    assert_eq!(count(&w, "DELETE line1-hub-0"), 0, "{w:?}");
    assert_eq!(count(&w, "PATCH ?/line1-hub-epoch"), 0, "{w:?}");
    assert!(hub_pod_exists(&client).await);
    assert_eq!(epoch_in_config_map(&client).await, "1");
    assert_eq!(
        get_ed(&client).await.status.as_ref().unwrap().last_failover,
        None
    );
}

#[tokio::test]
async fn policy_never_leaves_a_lost_node_to_kubernetes() {
    for out_of_service in [false, true] {
        let (client, writes) = fake(vec![
            edge_deployment(NodeLossPolicy::Never),
            hub_pod("pod-a", "n1"),
            node("n1", "False", LOST_AT, out_of_service),
        ])
        .await;
        let action = pass_at(&client, LOST_AT + 3_600).await;
        assert_eq!(action, Action::requeue(RESYNC));
        let w = take(&writes);
        assert_eq!(count(&w, "DELETE line1-hub-0"), 0, "{w:?}");
        assert!(hub_pod_exists(&client).await);
        assert_eq!(epoch_in_config_map(&client).await, "1");
        assert!(failover_events(&client).await.is_empty());
    }
}

#[tokio::test]
async fn the_out_of_service_taint_fails_over_at_once() {
    let (client, writes) = fake(vec![
        edge_deployment(NodeLossPolicy::ForceDeletePod),
        hub_pod("pod-a", "n1"),
        node("n1", "False", LOST_AT, true),
    ])
    .await;
    pass_at(&client, LOST_AT + 5).await;
    let w = take(&writes);
    assert_eq!(count(&w, "DELETE line1-hub-0"), 1, "{w:?}");
    assert_eq!(count(&w, "PATCH ?/line1-hub-epoch"), 1, "{w:?}");
    assert_eq!(epoch_in_config_map(&client).await, "2");
    assert_eq!(epoch_in_template(&client).await, "2");
    let last = get_ed(&client)
        .await
        .status
        .clone()
        .unwrap()
        .last_failover
        .unwrap();
    assert_eq!(
        (last.reason.as_str(), last.lost_for_seconds),
        ("NodeOutOfService", Some(5))
    );
    pass_at(&client, LOST_AT + 6).await;
    assert_eq!(take(&writes), Vec::<String>::new());
}

async fn delete_edge_deployment(retain: bool) -> Client {
    let mut ed = edge_deployment(NodeLossPolicy::Never);
    ed["metadata"]["finalizers"] = json!([FINALIZER]);
    ed["metadata"]["deletionTimestamp"] = json!(rfc3339(LOST_AT));
    ed["spec"]["hub"]["storage"]["retainOnDelete"] = json!(retain);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "line1-hub-epoch", "namespace": NS,
            "labels": {"app.kubernetes.io/part-of": "line1", "app.kubernetes.io/component": "hub",
                       "app.kubernetes.io/managed-by": "edgehub-controller"}},
        "data": {"epoch": "3"}});
    let (client, _) = fake(vec![ed, cm]).await;
    pass_at(&client, LOST_AT).await;
    client
}

#[tokio::test]
async fn deleting_with_the_volume_retained_keeps_the_epoch_and_without_it_deletes_it() {
    let client = delete_edge_deployment(true).await;
    assert_eq!(
        epoch_in_config_map(&client).await,
        "3",
        "a recreated EdgeDeployment's hub must open its retained store at its epoch"
    );
    let client = delete_edge_deployment(false).await;
    assert!(Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get_opt("line1-hub-epoch")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn an_unreadable_not_ready_after_sets_degraded_and_decides_nothing() {
    // The CRD's pattern refuses it at admission; a controller must not guess either.
    let mut ed = edge_deployment(NodeLossPolicy::ForceDeletePod);
    ed["spec"]["hub"]["nodeLoss"]["notReadyAfter"] = json!("soon");
    let (client, writes) = fake(vec![
        ed,
        hub_pod("pod-a", "n1"),
        node("n1", "False", LOST_AT, true),
    ])
    .await;
    pass_at(&client, LOST_AT + 3_600).await;
    let w = take(&writes);
    assert_eq!(count(&w, "DELETE line1-hub-0"), 0, "{w:?}");
    let status = get_ed(&client).await.status.clone().unwrap();
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded.message.contains("\"soon\""),
        "{}",
        degraded.message
    );
    assert_eq!(status.store_epoch, Some(1));
    assert!(Api::<StatefulSet>::namespaced(client.clone(), NS)
        .get_opt("line1-hub")
        .await
        .unwrap()
        .is_none());
}
