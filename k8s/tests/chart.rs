//! The Helm chart's tests: `k8s/chart/tests/test_chart.py`, run with the pinned Python venv that
//! `scripts/install-chart-tools.sh` makes (helm-python-sdk: Helm v4's template engine;
//! kubernetes-validate: Kubernetes' own schemas; jsonschema for the CRD). What the script checks
//! is listed in k8s/README.md, "Chart tests".
//!
//! Policy, as for the SDK tests: without the venv this test fails with the install hint; it
//! never passes without having run the chart's tests.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str =
    "run scripts/install-chart-tools.sh to install the pinned chart test tools";

fn venv() -> PathBuf {
    std::env::var_os("EDGEHUB_CHART_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/edgehub-chart-venv"))
}

#[test]
fn helm_chart_renders_validates_lints_and_refuses_bad_input() {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        python.is_file() && venv.join(".edgehub-stamp").is_file(),
        "no chart test venv at {}: {INSTALL_HINT}",
        venv.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/tests/test_chart.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("-v")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // unittest reports on stderr; shown by `cargo test -- --nocapture` or on failure.
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{stderr}",
        script.display(),
        out.status
    );
    assert!(
        stderr.contains("\nOK"),
        "no unittest OK line in the output:\n{stderr}"
    );
}

/// The EdgeDeployments the chart makes, read with the controller's own types: each parses, and
/// writing it back gives the same spec, so no field the chart sets is one the controller
/// ignores (serde skips unknown fields silently; the API server would prune them).
#[test]
fn chart_edgedeployments_read_back_unchanged_through_the_controllers_types() {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no chart test venv at {}: {INSTALL_HINT}",
        venv.display()
    );
    let dir = std::env::temp_dir().join(format!("edgehub-chart-dump-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/tests/test_chart.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("--dump")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(
        out.status.success(),
        "rendering failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let rendered: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ed: k8s::types::EdgeDeployment = serde_json::from_value(rendered.clone())
            .unwrap_or_else(|e| panic!("{}: the controller cannot read it: {e}", path.display()));
        let back = serde_json::to_value(&ed.spec).unwrap();
        assert_eq!(
            back,
            rendered["spec"],
            "{}: the spec changes through the controller's types",
            path.display()
        );
        seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    seen.sort();
    assert_eq!(
        seen,
        [
            "keys-secret",
            "one-command",
            "stopped-module",
            "storage-class",
            "two-modules-create-options",
            "watch-namespace"
        ]
    );
}
