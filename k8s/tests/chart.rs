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
