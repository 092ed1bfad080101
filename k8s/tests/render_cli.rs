//! `edgehub-controller render` as the others run it: the examples render to YAML documents of
//! the expected kinds, generated data are placeholders, and bad input fails with a clear error.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn controller(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgehub-controller"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run edgehub-controller")
}

fn docs(out: &Output) -> Vec<serde_yaml::Value> {
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).expect("utf8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
fn the_minimal_example_renders_every_object_with_placeholders() {
    let docs = docs(&controller(&["render", "examples/minimal.yaml"]));
    assert_eq!(
        kinds(&docs),
        [
            "Secret/line1-hub-tls",
            "ConfigMap/line1-trust-bundle",
            "Secret/line1-module-keys",
            "ConfigMap/line1-manifest",
            "Secret/line1-module-sensor",
            "Service/line1-hub",
            "StatefulSet/line1-hub",
            "StatefulSet/line1-sensor",
        ]
    );
    assert_eq!(
        docs[0]["stringData"]["ca.key"].as_str(),
        Some("<generated: ca.key>")
    );
    assert_eq!(
        docs[2]["stringData"]["sensor"].as_str(),
        Some("<generated: key of sensor>")
    );
    assert!(docs[4]["stringData"]["connectionString"]
        .as_str()
        .is_some_and(|s| s.contains("SharedAccessKey=<generated: key of sensor>")));
    for d in &docs {
        assert!(
            d["metadata"].get("ownerReferences").is_none(),
            "no uid offline"
        );
    }
}

#[test]
fn two_modules_render_with_their_service_and_the_image_flag() {
    let out = controller(&[
        "render",
        "examples/two-modules.yaml",
        "--hub-image",
        "localhost/edgehub:ci",
    ]);
    let docs = docs(&out);
    let k = kinds(&docs);
    assert!(k.contains(&"Service/line2-filter".to_owned()), "{k:?}");
    assert_eq!(
        k.iter().filter(|k| k.starts_with("StatefulSet/")).count(),
        4,
        "{k:?}"
    );
    let hub = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "line2-hub")
        .expect("hub");
    assert_eq!(
        hub["spec"]["template"]["spec"]["containers"][0]["image"].as_str(),
        Some("localhost/edgehub:ci")
    );
}

#[test]
fn a_config_map_manifest_needs_the_manifest_file() {
    let out = controller(&["render", "examples/configmap-ref.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--manifest-file"), "{err}");

    let docs = docs(&controller(&[
        "render",
        "examples/configmap-ref.yaml",
        "--manifest-file",
        "examples/deployment.json",
    ]));
    let k = kinds(&docs);
    assert!(k.contains(&"StatefulSet/line3-sender".to_owned()), "{k:?}");
    assert!(
        k.contains(&"StatefulSet/line3-receiver".to_owned()),
        "{k:?}"
    );
    let hub = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "line3-hub" && d["kind"] == "StatefulSet")
        .expect("hub");
    assert_eq!(
        hub["spec"]["template"]["spec"]["containers"][0]["image"].as_str(),
        Some("registry.example.com/edgehub:0.1.0")
    );
    assert_eq!(
        hub["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"][0].as_str(),
        Some("ReadWriteOnce")
    );
}

#[test]
fn a_bad_route_fails_with_the_routers_located_message() {
    let dir = std::env::temp_dir().join(format!("edgehub-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let src = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/minimal.yaml"),
    )
    .expect("example");
    let bad = src.replace(
        "FROM /messages/* INTO $upstream",
        "FROM /messages/* WHERE INTO $upstream",
    );
    assert_ne!(bad, src);
    let file = dir.join("bad.yaml");
    std::fs::write(&file, bad).expect("write");
    let out = controller(&["render", file.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The very message `edgehub check-manifest` prints (the router's parser).
    let ed: k8s::types::EdgeDeployment =
        serde_yaml::from_str(&std::fs::read_to_string(&file).expect("read")).expect("ed");
    let issues =
        router::manifest::parse_deployment_value(ed.spec.manifest.inline.as_ref().expect("inline"))
            .expect_err("bad route")
            .issues;
    assert_eq!(issues.len(), 1);
    assert!(err.contains(&format!("bad.yaml: {}", issues[0])), "{err}");
    assert!(err.contains("route 'upstream'"), "{err}");
    assert!(err.contains("1 problem(s) found"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_edge_deployment_in_json_renders_like_its_yaml() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("examples/minimal.yaml")).expect("example");
    let value: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let dir = std::env::temp_dir().join(format!("edgehub-render-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("minimal.json");
    std::fs::write(&file, serde_json::to_string_pretty(&value).expect("json")).expect("write");
    let from_json = controller(&["render", file.to_str().expect("path")]);
    let from_yaml = controller(&["render", "examples/minimal.yaml"]);
    assert_eq!(docs(&from_json), docs(&from_yaml));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replicated module renders at its count (what reconcile creates it with, through its scale
/// field manager), Parallel, marked replicated, with a comment saying who sets replicas after.
#[test]
fn a_replicated_module_renders_at_its_count_with_a_note_on_scaling() {
    let out = controller(&["render", "examples/replicated.yaml"]);
    let docs = docs(&out);
    let filter = doc(&docs, "StatefulSet", "line4-filter");
    assert_eq!(filter["spec"]["replicas"].as_i64(), Some(3));
    assert_eq!(
        filter["spec"]["podManagementPolicy"].as_str(),
        Some("Parallel")
    );
    assert_eq!(
        filter["metadata"]["labels"]["edgehub.io/replicated"].as_str(),
        Some("true")
    );
    assert_eq!(
        filter["metadata"]["annotations"]["edgehub.io/max-replicas"].as_str(),
        Some("3")
    );
    let sensor = doc(&docs, "StatefulSet", "line4-sensor");
    assert_eq!(sensor["spec"]["replicas"].as_i64(), Some(1));
    assert_eq!(
        sensor["spec"]["podManagementPolicy"].as_str(),
        Some("OrderedReady")
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let notes: Vec<&str> = text.lines().filter(|l| l.starts_with("# ")).collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("# StatefulSet/line4-filter: module filter is replicated")
            && notes[0].contains("at most 3"),
        "{}",
        notes[0]
    );
}

/// The document `Kind/name` of `docs`.
fn doc<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", kinds(docs)))
}

/// `--generate-secrets` (for trials and `podman kube play`): real material instead of
/// placeholders, made as reconcile makes it for a new deployment: the server certificate
/// chains to the rendered CA for every hub Service name, the trust bundle is that CA, each
/// module's connection string carries the same minted key the hub's key directory holds, and
/// two renders mint different keys.
#[test]
fn generate_secrets_renders_a_working_ca_server_certificate_and_module_keys() {
    use base64::Engine as _;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let out = controller(&["render", "examples/minimal.yaml", "--generate-secrets"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let docs = docs(&out);
    assert!(
        !text.contains("<generated"),
        "a placeholder is left:\n{text}"
    );

    let tls = &doc(&docs, "Secret", "line1-hub-tls")["stringData"];
    let pem = |k: &str| {
        tls[k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k}"))
            .to_owned()
    };
    assert!(pem("ca.key").contains("PRIVATE KEY"));
    assert!(pem("tls.key").contains("PRIVATE KEY"));
    let bundle = &doc(&docs, "ConfigMap", "line1-trust-bundle")["data"]["ca.crt"];
    assert_eq!(bundle.as_str(), Some(pem("ca.crt").as_str()));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pem("ca.crt").as_bytes()).expect("ca.crt PEM"))
        .expect("CA");
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let leaf = CertificateDer::from_pem_slice(pem("tls.crt").as_bytes()).expect("tls.crt PEM");
    let now = UnixTime::now();
    for name in [
        "line1-hub",
        "line1-hub.factory",
        "line1-hub.factory.svc",
        "line1-hub.factory.svc.cluster.local",
    ] {
        let server = ServerName::try_from(name.to_owned()).expect("name");
        verifier
            .verify_server_cert(&leaf, &[], &server, &[], now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let other = ServerName::try_from("line2-hub".to_owned()).expect("name");
    assert!(
        verifier
            .verify_server_cert(&leaf, &[], &other, &[], now)
            .is_err(),
        "the check can fail: another deployment's name"
    );

    let key = doc(&docs, "Secret", "line1-module-keys")["stringData"]["sensor"]
        .as_str()
        .expect("sensor's key")
        .to_owned();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&key)
        .expect("base64 key");
    assert_eq!(raw.len(), 32);
    let cs = doc(&docs, "Secret", "line1-module-sensor")["stringData"]["connectionString"]
        .as_str()
        .expect("connection string");
    assert_eq!(
        cs,
        format!(
            "HostName=contoso.azure-devices.net;DeviceId=line1;ModuleId=sensor;SharedAccessKey={key};GatewayHostName=line1-hub"
        )
    );

    let again = docs_of_generated("examples/minimal.yaml");
    let key2 = doc(&again, "Secret", "line1-module-keys")["stringData"]["sensor"].clone();
    assert_ne!(
        key2.as_str(),
        Some(key.as_str()),
        "keys are minted, not fixed"
    );
}

fn docs_of_generated(file: &str) -> Vec<serde_yaml::Value> {
    docs(&controller(&["render", file, "--generate-secrets"]))
}

/// Keys IoT Hub issued live in a Secret only the cluster holds: generating others would be
/// wrong, so `--generate-secrets` refuses, naming the Secret.
#[test]
fn generate_secrets_refuses_a_deployment_whose_keys_come_from_a_secret() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(root.join("examples/minimal.yaml")).expect("example");
    let with_secret = yaml.replace(
        "    deviceId: line1\n",
        "    deviceId: line1\n    keysSecret: iothub-keys\n",
    );
    assert_ne!(with_secret, yaml);
    let dir = std::env::temp_dir().join(format!("edgehub-render-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("keys.yaml");
    std::fs::write(&file, with_secret).expect("write");
    let path = file.to_str().expect("path");
    assert!(controller(&["render", path]).status.success());
    let out = controller(&["render", path, "--generate-secrets"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"iothub-keys\""), "{err}");
}
