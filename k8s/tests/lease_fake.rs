//! Two controller replicas electing a leader over one Lease in kube-fake-client, with a clock
//! the test controls: exactly one leads at a time, the other takes over only after the leader
//! stopped renewing for a lease duration, and a stale write loses on its resourceVersion.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use k8s::lease::{step, LeaseState};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube_fake_client::ClientBuilder;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_780_000_000 + secs).unwrap()
}

fn replica(id: &str) -> LeaseState {
    LeaseState {
        identity: id.into(),
        duration: Duration::from_secs(15),
    }
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_takeover_only_after_the_lease_runs_out() {
    let client = ClientBuilder::new().build().await.expect("fake");
    let api: Api<Lease> = Api::namespaced(client, "edgehub-system");
    let (a, b) = (replica("a"), replica("b"));

    assert!(
        step(&api, "edgehub-controller", &a, at(0)).await.unwrap(),
        "a creates and holds the Lease"
    );
    assert!(
        !step(&api, "edgehub-controller", &b, at(1)).await.unwrap(),
        "b stands by"
    );
    assert!(
        step(&api, "edgehub-controller", &a, at(5)).await.unwrap(),
        "a renews"
    );
    assert!(
        !step(&api, "edgehub-controller", &b, at(19)).await.unwrap(),
        "a's renewal at 5 holds until 20"
    );

    // a stops renewing; at 20 its lease has run out.
    assert!(
        step(&api, "edgehub-controller", &b, at(20)).await.unwrap(),
        "b takes over"
    );
    let lease = api.get("edgehub-controller").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
    assert!(
        !step(&api, "edgehub-controller", &a, at(21)).await.unwrap(),
        "a, back, stands by"
    );
}

#[tokio::test]
async fn a_takeover_based_on_a_stale_read_loses_the_race_and_stays_a_follower() {
    use std::sync::{Arc, Mutex};
    // What b's next read returns, when set: a's Lease as it was before a renewed.
    let stale: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
    let s = stale.clone();
    let funcs =
        kube_fake_client::interceptor::Funcs::new().get(move |_| Ok(s.lock().unwrap().take()));
    let client = ClientBuilder::new()
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .expect("fake");
    let api: Api<Lease> = Api::namespaced(client, "edgehub-system");
    assert!(step(&api, "l", &replica("a"), at(0)).await.unwrap());
    let before_renewal = serde_json::to_value(api.get("l").await.unwrap()).unwrap();
    assert!(
        step(&api, "l", &replica("a"), at(10)).await.unwrap(),
        "a renews at 10"
    );

    // At 16, b sees the Lease renewed at 0 (expired), decides to take it, and writes with the
    // old resourceVersion: the API refuses, b stays a follower, a keeps the Lease.
    *stale.lock().unwrap() = Some(before_renewal);
    assert!(!step(&api, "l", &replica("b"), at(16)).await.unwrap());
    assert_eq!(
        api.get("l")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("a")
    );
}
