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
        if path.is_dir() {
            continue;
        }
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

/// The chart and the controller binary agree: for every values file, the controller
/// Deployment's command and arguments are accepted by the real `edgehub-controller` (run with
/// `--help` appended: clap refuses an unknown flag with status 2 before it reads `--help`), its
/// probes ask for paths the controller serves, and it tells the controller its namespace (where
/// the chart's RBAC lets it hold its Lease).
#[test]
fn the_charts_controller_deployment_runs_the_controller_as_it_is() {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no chart test venv at {}: {INSTALL_HINT}",
        venv.display()
    );
    let dir = std::env::temp_dir().join(format!("edgehub-chart-ctl-{}", std::process::id()));
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
    let mut cases = 0;
    for entry in std::fs::read_dir(dir.join("controller")).unwrap() {
        let path = entry.unwrap().path();
        let deployment: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        let command = strings(&container["command"]);
        assert_eq!(command, ["/edgehub-controller"], "{}", path.display());
        let mut args = strings(&container["args"]);
        args.push("--help".to_owned());
        let run = Command::new(env!("CARGO_BIN_EXE_edgehub-controller"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: the controller refuses the chart's arguments {args:?}: {}",
            path.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            let wanted = container[probe]["httpGet"]["path"].as_str().unwrap();
            assert!(
                k8s::http::PATHS.contains(&wanted),
                "{}: {probe} asks for {wanted}, the controller serves {:?}",
                path.display(),
                k8s::http::PATHS
            );
        }
        let env: Vec<&str> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"POD_NAMESPACE") && env.contains(&"POD_NAME"),
            "{}: {env:?}",
            path.display()
        );
        cases += 1;
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(cases >= 5, "only {cases} controller Deployments rendered");
}

/// What the controller applies is valid Kubernetes: every example the binary renders (Secrets
/// with placeholder `stringData`), each object validated by
/// `kubernetes-validate --strict` for 1.29 and 1.33: an unknown field or a wrong type fails.
/// (Kubernetes' schemas do not list enumerated values: `podManagementPolicy: parallel` would
/// pass here; `objects.rs` pins the values the builders write.)
#[test]
fn every_rendered_example_is_valid_kubernetes() {
    let venv = venv();
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "no chart test venv at {}: {INSTALL_HINT}",
        venv.display()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = r#"
import sys, yaml, kubernetes_validate
kinds = []
for d in yaml.safe_load_all(sys.stdin):
    if not d:
        continue
    for v in ("1.29.0", "1.33.0"):
        kubernetes_validate.validate(d, v, strict=True)
    kinds.append(d["kind"] + "/" + d["metadata"]["name"])
print("\n".join(kinds))
"#;
    let mut statefulsets = Vec::new();
    for (example, extra) in [
        ("minimal.yaml", None),
        ("two-modules.yaml", None),
        ("replicated.yaml", None),
        ("configmap-ref.yaml", Some("examples/deployment.json")),
    ] {
        let mut render = Command::new(env!("CARGO_BIN_EXE_edgehub-controller"));
        render
            .current_dir(root)
            .args(["render", &format!("examples/{example}")]);
        if let Some(manifest) = extra {
            render.args(["--manifest-file", manifest]);
        }
        let rendered = render.output().expect("edgehub-controller render");
        assert!(
            rendered.status.success(),
            "render {example}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let mut child = Command::new(&python)
            .args(["-c", check])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(&rendered.stdout).expect("write");
        }
        let out = child.wait_with_output().expect("validate");
        assert!(
            out.status.success(),
            "{example} renders invalid Kubernetes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kinds = String::from_utf8(out.stdout).expect("utf8");
        statefulsets.extend(
            kinds
                .lines()
                .filter(|k| k.starts_with("StatefulSet/"))
                .map(str::to_owned),
        );
    }
    assert!(
        statefulsets.contains(&"StatefulSet/line4-filter".to_owned()),
        "{statefulsets:?}"
    );
    assert_eq!(statefulsets.len(), 12, "{statefulsets:?}");
}
