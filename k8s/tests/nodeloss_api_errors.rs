//! The node-loss failover when the pod delete fails, scripted with tower-test: a small API
//! server that keeps the epoch ConfigMap and the hub pod, answers everything else as a fresh
//! namespace would, and answers the hub pod's DELETE from a script (500, 409, then 200).
//!
//! What must hold: the epoch is raised once, before the first delete, and never again for the
//! same pod (it is durable and monotonic, so a failed delete leaves it raised: harmless); a 500
//! is a typed error and the delete is retried on later passes with the growing backoff; every
//! delete is a force delete (grace 0) of exactly the lost pod (uid precondition); a 409 (the
//! uid precondition failed: the StatefulSet already replaced the pod) ends the failover.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use k8s::desired::ControllerOptions;
use k8s::reconcile::{error_policy, reconcile, Context, Error, FINALIZER};
use k8s::types::{EdgeDeployment, NodeLossPolicy};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

const NS: &str = "factory";
const LOST_AT: u64 = 1_780_000_000;
const NOW: u64 = LOST_AT + 600;

#[derive(Default)]
struct State {
    /// The epoch ConfigMap (epoch, last-failover annotation, resourceVersion).
    epoch: u64,
    annotation: Option<String>,
    version: u64,
    /// The hub pod: uid and node.
    pod: Option<(String, String)>,
    /// Answers to the hub pod's DELETE, in order (then 200).
    deletes: VecDeque<u16>,
    /// Every request, `METHOD path`.
    seen: Vec<String>,
    /// The bodies of the hub pod's DELETEs.
    delete_bodies: Vec<Value>,
    /// The bodies of the epoch ConfigMap's PATCHes.
    epoch_patches: Vec<Value>,
}

type Shared = Arc<Mutex<State>>;

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("scripted {code}"), "reason": reason, "code": code}),
    )
}

fn config_map(s: &State) -> Value {
    let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "line1-hub-epoch", "namespace": NS,
            "resourceVersion": s.version.to_string()},
        "data": {"epoch": s.epoch.to_string()}});
    if let Some(a) = &s.annotation {
        cm["metadata"]["annotations"] = json!({"edgehub.io/last-failover": a});
    }
    cm
}

fn pod(uid: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "line1-hub-0", "namespace": NS, "uid": uid},
        "spec": {"nodeName": node, "containers": [{"name": "hub"}]}})
}

fn node(name: &str, ready: &str) -> Value {
    let at = k8s_openapi::jiff::Timestamp::from_second(LOST_AT as i64)
        .unwrap()
        .to_string();
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": at}]}})
}

fn edge_deployment() -> Arc<EdgeDeployment> {
    let path = format!("{}/examples/minimal.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut ed: EdgeDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ed.metadata.uid = Some("uid-line1".into());
    ed.metadata.resource_version = Some("7".into());
    ed.metadata.finalizers = Some(vec![FINALIZER.into()]);
    ed.spec.hub.node_loss.policy = NodeLossPolicy::ForceDeletePod;
    Arc::new(ed)
}

async fn api(mut handle: mock::Handle<Request<Body>, Response<Body>>, state: Shared) {
    let ed = serde_json::to_value(&*edge_deployment()).unwrap();
    while let Some((req, send)) = handle.next_request().await {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_owned();
        let mut s = state.lock().unwrap();
        s.seen.push(format!("{} {path}", parts.method));
        let epoch_path = format!("/api/v1/namespaces/{NS}/configmaps/line1-hub-epoch");
        let pod_path = format!("/api/v1/namespaces/{NS}/pods/line1-hub-0");
        let response = match (&parts.method, path.as_str()) {
            (&Method::GET, p) if p == epoch_path => json_response(200, &config_map(&s)),
            (&Method::PATCH, p) if p == epoch_path => {
                // A merge patch, conditional on the resourceVersion it carries.
                if body["metadata"]["resourceVersion"] != json!(s.version.to_string()) {
                    status(409, "Conflict")
                } else {
                    s.epoch = body["data"]["epoch"].as_str().unwrap().parse().unwrap();
                    s.annotation = body["metadata"]["annotations"]["edgehub.io/last-failover"]
                        .as_str()
                        .map(str::to_owned);
                    s.version += 1;
                    s.epoch_patches.push(body.clone());
                    json_response(200, &config_map(&s))
                }
            }
            (&Method::GET, p) if p == pod_path => match &s.pod {
                Some((uid, n)) => json_response(200, &pod(uid, n)),
                None => status(404, "NotFound"),
            },
            (&Method::DELETE, p) if p == pod_path => {
                s.delete_bodies.push(body.clone());
                match s.deletes.pop_front() {
                    Some(409) => {
                        // The uid precondition failed: the StatefulSet made a new pod.
                        s.pod = Some(("pod-b".into(), "n2".into()));
                        status(409, "Conflict")
                    }
                    Some(code) => status(code, "InternalError"),
                    None => {
                        let (uid, n) = s.pod.take().unwrap();
                        json_response(200, &pod(&uid, &n))
                    }
                }
            }
            (&Method::GET, "/api/v1/nodes/n1") => json_response(200, &node("n1", "False")),
            (&Method::GET, "/api/v1/nodes/n2") => json_response(200, &node("n2", "True")),
            (&Method::GET, _)
                if parts
                    .uri
                    .query()
                    .is_some_and(|q| q.contains("labelSelector")) =>
            {
                json_response(
                    200,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []}),
                )
            }
            (&Method::GET, _) => status(404, "NotFound"),
            (&Method::PATCH, p) if p.ends_with("/status") => json_response(200, &ed),
            (&Method::PATCH, _) => json_response(200, &body), // server-side apply: echo
            _ => status(403, "Forbidden"),                    // Events: only logged
        };
        drop(s);
        send.send_response(response);
    }
}

fn setup(deletes: &[u16]) -> (Arc<Context>, Shared) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let state = Shared::new(Mutex::new(State {
        epoch: 1,
        version: 1,
        pod: Some(("pod-a".into(), "n1".into())),
        deletes: deletes.iter().copied().collect(),
        ..State::default()
    }));
    tokio::spawn(api(handle, state.clone()));
    let ctx = Context::new(Client::new(svc, NS), ControllerOptions::default()).with_clock(|| NOW);
    (Arc::new(ctx), state)
}

fn assert_force_deletes_of_pod_a(bodies: &[Value]) {
    for b in bodies {
        assert_eq!(b["gracePeriodSeconds"], json!(0), "{b}");
        assert_eq!(b["preconditions"]["uid"], json!("pod-a"), "{b}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_pod_delete_is_retried_with_backoff_and_the_epoch_is_raised_once() {
    let (ctx, state) = setup(&[500, 500]);
    let ed = edge_deployment();
    let mut actions = Vec::new();
    for _ in 0..2 {
        let err = reconcile(ed.clone(), ctx.clone())
            .await
            .expect_err("the delete fails");
        match &err {
            Error::Api {
                action: "force-deleting",
                object,
                source: kube::Error::Api(s),
            } => {
                assert_eq!((object.as_str(), s.code), ("Pod/line1-hub-0", 500));
            }
            other => panic!("not the delete's 500: {other:?}"),
        }
        actions.push(error_policy(ed.clone(), &err, ctx.clone()));
        let s = state.lock().unwrap();
        assert_eq!(
            s.epoch, 2,
            "raised before the first delete, kept after it failed"
        );
        assert_eq!(s.epoch_patches.len(), 1, "raised once");
    }
    assert_eq!(
        actions,
        [5, 10].map(|s| Action::requeue(Duration::from_secs(s)))
    );

    reconcile(ed.clone(), ctx.clone())
        .await
        .expect("the third delete succeeds");
    let s = state.lock().unwrap();
    assert_eq!(s.epoch, 2);
    assert_eq!(s.epoch_patches.len(), 1, "never raised twice for one loss");
    assert_eq!(s.delete_bodies.len(), 3);
    assert_force_deletes_of_pod_a(&s.delete_bodies);
    assert!(s.pod.is_none());
    // The bump came before any delete, and the hub's template was applied with the new epoch
    // before the first delete.
    let first = |what: &str| s.seen.iter().position(|x| x == what).unwrap();
    let bump = first(&format!(
        "PATCH /api/v1/namespaces/{NS}/configmaps/line1-hub-epoch"
    ));
    let apply = first(&format!(
        "PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/line1-hub"
    ));
    let delete = first(&format!("DELETE /api/v1/namespaces/{NS}/pods/line1-hub-0"));
    assert!(bump < apply && apply < delete, "{:?}", s.seen);
    let annotation: Value = serde_json::from_str(s.annotation.as_deref().unwrap()).unwrap();
    assert_eq!(annotation["podUid"], "pod-a");
    assert_eq!(annotation["fromNode"], "n1");
    assert_eq!(annotation["epoch"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_conflict_on_the_pod_delete_means_it_was_replaced_and_ends_the_failover() {
    let (ctx, state) = setup(&[409]);
    let ed = edge_deployment();
    reconcile(ed.clone(), ctx.clone())
        .await
        .expect("a 409 on the uid precondition is not an error");
    // The next pass sees the StatefulSet's new pod on a healthy node: nothing more.
    reconcile(ed.clone(), ctx.clone()).await.expect("pass");
    let s = state.lock().unwrap();
    assert_eq!(s.epoch, 2);
    assert_eq!(s.epoch_patches.len(), 1);
    assert_eq!(s.delete_bodies.len(), 1, "{:?}", s.seen);
    assert_force_deletes_of_pod_a(&s.delete_bodies);
}
