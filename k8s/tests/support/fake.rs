//! The fake API server the controller's tests share (no real one can run here): kube-fake-client
//! serving the EdgeDeployment resource with its status subresource, `objects` stored before the
//! first call, and `funcs` seeing (and possibly failing) every call.
//!
//! Include it from a test file with `#[path = "support/fake.rs"] mod fake;`.

#![allow(dead_code, clippy::expect_used)]

use k8s::types::EdgeDeployment;
use kube::Client;
use kube_fake_client::{interceptor, ClientBuilder};
use serde_json::Value;

/// A client of a fresh fake API server holding `objects`.
pub async fn client(objects: Vec<Value>, funcs: interceptor::Funcs) -> Client {
    ClientBuilder::new()
        .with_resource::<EdgeDeployment>()
        .with_status_subresource::<EdgeDeployment>()
        .with_runtime_objects(objects)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .expect("fake client")
}
