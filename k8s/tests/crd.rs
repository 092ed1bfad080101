//! The CRD checked into the chart is exactly what the Rust types generate.

use kube::CustomResourceExt;

#[test]
fn the_charts_crd_file_equals_the_generated_crd() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/chart/edgehub/crds/edgedeployment.yaml"
    );
    let checked_in = std::fs::read_to_string(path).expect("read the chart's CRD");
    let generated = serde_yaml::to_string(&k8s::types::EdgeDeployment::crd()).expect("CRD as YAML");
    assert!(
        checked_in == generated,
        "{path} differs from the CRD the types generate; regenerate it with\n  \
         cargo run -p k8s --bin edgehub-controller -- crd > k8s/chart/edgehub/crds/edgedeployment.yaml"
    );
}
