//! API failures during apply, scripted with tower-test: the API server answers every read with
//! 404 (a fresh namespace) and the first server-side apply with a 409 conflict, a 500, or not
//! at all. Reconcile must return the typed error naming the action and object, and
//! `error_policy` must requeue with a backoff that grows per consecutive failure.
//! Time is tokio's paused clock, so the 30 s API deadline passes without waiting.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s::desired::ControllerOptions;
use k8s::reconcile::{error_policy, reconcile, Context, Error, FINALIZER};
use k8s::types::EdgeDeployment;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use tower_test::mock;

const NS: &str = "factory";

#[derive(Clone, Copy)]
enum Apply {
    Fail(u16),
    Hang,
}

type Seen = Arc<Mutex<Vec<String>>>;

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("scripted {code}"), "reason": reason, "code": code
    });
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// Answers until the client goes away; keeps hung requests open.
async fn api(mut handle: mock::Handle<Request<Body>, Response<Body>>, apply: Apply, seen: Seen) {
    let mut hung = Vec::new();
    while let Some((req, send)) = handle.next_request().await {
        let is_apply = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("apply-patch"));
        seen.lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri().path()));
        match (req.method(), is_apply, apply) {
            (&Method::GET, _, _) => send.send_response(status(404, "NotFound")),
            // The store epoch's ConfigMap, made at 1 before anything is applied.
            (&Method::POST, _, _) if req.uri().path().ends_with("/configmaps") => {
                let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "line1-hub-epoch", "namespace": NS}, "data": {"epoch": "1"}});
                send.send_response(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&cm).unwrap()))
                        .unwrap(),
                );
            }
            (&Method::PATCH, true, Apply::Fail(code)) => {
                let reason = if code == 409 {
                    "Conflict"
                } else {
                    "InternalError"
                };
                send.send_response(status(code, reason));
            }
            (&Method::PATCH, true, Apply::Hang) => hung.push(send),
            // Events: refused; reconcile only logs that.
            _ => send.send_response(status(403, "Forbidden")),
        }
    }
}

fn edge_deployment() -> Arc<EdgeDeployment> {
    let path = format!("{}/examples/minimal.yaml", env!("CARGO_MANIFEST_DIR"));
    let mut ed: EdgeDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ed.metadata.uid = Some("uid-line1".into());
    ed.metadata.resource_version = Some("7".into());
    ed.metadata.finalizers = Some(vec![FINALIZER.into()]);
    Arc::new(ed)
}

fn setup(apply: Apply) -> (Arc<Context>, Seen) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let seen = Seen::default();
    tokio::spawn(api(handle, apply, seen.clone()));
    let client = Client::new(svc, NS);
    let ctx = Context::new(client, ControllerOptions::default()).with_clock(|| 1_780_000_000);
    (Arc::new(ctx), seen)
}

/// Three failing passes: each error goes through `error_policy`; returns the errors and the
/// requeue actions.
async fn three_failures(apply: Apply) -> (Vec<Error>, Vec<Action>, Seen) {
    let (ctx, seen) = setup(apply);
    let ed = edge_deployment();
    let mut errors = Vec::new();
    let mut actions = Vec::new();
    for _ in 0..3 {
        let err = reconcile(ed.clone(), ctx.clone())
            .await
            .expect_err("the apply fails");
        actions.push(error_policy(ed.clone(), &err, ctx.clone()));
        errors.push(err);
    }
    (errors, actions, seen)
}

fn growing() -> Vec<Action> {
    [5, 10, 20]
        .into_iter()
        .map(|s| Action::requeue(Duration::from_secs(s)))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_conflict_on_apply_is_a_typed_error_and_the_requeue_backs_off() {
    let (errors, actions, seen) = three_failures(Apply::Fail(409)).await;
    for e in &errors {
        match e {
            Error::Api {
                action: "applying",
                object,
                source: kube::Error::Api(s),
            } => {
                assert_eq!(s.code, 409);
                assert_eq!(object, "Secret/line1-hub-tls", "the first object applied");
            }
            other => panic!("not the apply's 409: {other:?}"),
        }
    }
    assert_eq!(actions, growing());
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|s| s == "PATCH /api/v1/namespaces/factory/secrets/line1-hub-tls"),
        "{seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_error_on_apply_is_a_typed_error_and_the_requeue_backs_off() {
    let (errors, actions, _) = three_failures(Apply::Fail(500)).await;
    for e in &errors {
        assert!(
            matches!(e, Error::Api { action: "applying", source: kube::Error::Api(s), .. } if s.code == 500),
            "{e:?}"
        );
    }
    assert_eq!(actions, growing());
}

#[tokio::test(start_paused = true)]
async fn an_apply_that_never_answers_times_out_and_the_requeue_backs_off() {
    let (errors, actions, _) = three_failures(Apply::Hang).await;
    for e in &errors {
        match e {
            Error::Timeout {
                action: "applying",
                object,
                after,
            } => {
                assert_eq!(object, "Secret/line1-hub-tls");
                assert_eq!(*after, Duration::from_secs(30));
            }
            other => panic!("not a timeout: {other:?}"),
        }
    }
    assert_eq!(actions, growing());
}
