//! The `edgehub` command line as a newcomer uses it, without a running hub.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn edgehub(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("RUST_LOG")
        .env_remove("EDGEHUB_MANIFEST")
        .env_remove("EDGEHUB_MODULES")
        .env_remove("EDGEHUB_DEVICE_ID")
        .env_remove("EDGEHUB_IOTHUB_HOSTNAME")
        .env_remove("EDGEHUB_GATEWAY_HOSTNAME")
        .output()
        .expect("run edgehub")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8")
}

/// `key=value` pairs of a connection string, in order.
fn fields(cs: &str) -> Vec<(String, String)> {
    cs.trim()
        .split(';')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn ca_path_prints_an_existing_pem_file_inside_the_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(dir.path(), &["ca-path"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = stdout(&out).trim().to_owned();
    assert!(path.ends_with("tls/ca.pem"), "{path}");
    let pem = std::fs::read_to_string(&path).expect("ca.pem exists");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let again = edgehub(dir.path(), &["ca-path"]);
    assert_eq!(stdout(&again).trim(), path);
    assert_eq!(
        std::fs::read_to_string(&path).expect("ca.pem"),
        pem,
        "CA kept"
    );
}

#[test]
fn connection_string_has_the_sdk_fields_and_a_stable_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "connection-string",
        "sender",
        "--gateway-hostname",
        "gw.example",
    ];
    let out = edgehub(dir.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = stdout(&out);
    let f = fields(&first);
    let keys: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "HostName",
            "DeviceId",
            "ModuleId",
            "SharedAccessKey",
            "GatewayHostName"
        ]
    );
    assert_eq!(f[0].1, "edgehub.local");
    assert_eq!(f[1].1, "edge-device");
    assert_eq!(f[2].1, "sender");
    assert_eq!(f[4].1, "gw.example");
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(&f[3].1)
        .expect("base64 key");
    assert_eq!(key.len(), 32);
    let second = stdout(&edgehub(dir.path(), &args));
    assert_eq!(first, second, "the key never changes");
    let receiver = stdout(&edgehub(dir.path(), &["connection-string", "receiver"]));
    assert_ne!(
        fields(&receiver)[3].1,
        f[3].1,
        "each module has its own key"
    );
}

#[test]
fn connection_string_works_for_a_module_given_on_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(
        dir.path(),
        &[
            "connection-string",
            "extra",
            "--module",
            "extra",
            "--device-id",
            "dev1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let f = fields(&stdout(&out));
    assert_eq!((f[1].1.as_str(), f[2].1.as_str()), ("dev1", "extra"));
}

#[test]
fn connection_string_for_an_unknown_module_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(dir.path(), &["connection-string", "nope"]);
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("unknown module \"nope\""), "{err}");
    assert!(err.contains("--module nope"), "{err}");
    assert!(err.contains("receiver, sender"), "{err}");
}

#[test]
fn a_bad_setting_names_its_field_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(
        dir.path(),
        &["ca-path", "--plain-mqtt-addr", "0.0.0.0:1883"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("plain_mqtt_addr") && err.contains("loopback"),
        "{err}"
    );
}

#[test]
fn check_manifest_accepts_a_good_manifest_with_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/src/default-manifest.json");
    let out = edgehub(dir.path(), &["check-manifest", manifest]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = stdout(&out);
    assert!(summary.contains("2 route(s)"), "{summary}");
    assert!(summary.contains("receiver, sender"), "{summary}");
    assert!(summary.contains("7200 s"), "{summary}");
}

#[test]
fn check_manifest_accepts_bare_edgehub_desired_properties() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("desired.json");
    std::fs::write(
        &file,
        r#"{"schemaVersion": "1.0", "routes": {"r": "FROM /* INTO $upstream"}}"#,
    )
    .expect("write");
    let out = edgehub(
        dir.path(),
        &["check-manifest", file.to_str().expect("path")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 route(s)"), "{}", stdout(&out));
}

#[test]
fn check_manifest_lists_every_error_with_its_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = include_str!("../src/default-manifest.json");
    let broken = good
        .replace("INTO $upstream", "INTO $nowhere")
        .replace("\"timeToLiveSecs\": 7200", "\"timeToLiveSecs\": \"long\"");
    assert_ne!(broken, good);
    let file = dir.path().join("broken.json");
    std::fs::write(&file, broken).expect("write");
    let out = edgehub(
        dir.path(),
        &["check-manifest", file.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{err}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("route 'senderToUpstream', column")),
        "{err}"
    );
    assert!(
        errors.iter().any(|l| {
            l.contains(
            "modulesContent.$edgeHub.properties.desired.storeAndForwardConfiguration.timeToLiveSecs"
        )
        }),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn check_manifest_reports_invalid_json_and_missing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.json");
    std::fs::write(&file, "{ not json").expect("write");
    let out = edgehub(
        dir.path(),
        &["check-manifest", file.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid JSON"), "{}", stderr(&out));
    let missing = dir.path().join("missing.json");
    let out = edgehub(
        dir.path(),
        &["check-manifest", missing.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.json"), "{}", stderr(&out));
}

#[test]
fn environment_variables_stand_in_for_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["connection-string", "fromenv"])
        .env("EDGEHUB_DATA_DIR", dir.path())
        .env("EDGEHUB_MODULES", "fromenv,other")
        .env("EDGEHUB_IOTHUB_HOSTNAME", "hub.example")
        .env("EDGEHUB_GATEWAY_HOSTNAME", "gw.example")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let f = fields(&stdout(&out));
    assert_eq!(f[0].1, "hub.example");
    assert_eq!(f[4].1, "gw.example");
    assert!(dir.path().join("identities.json").exists());
}

#[test]
fn a_hub_started_with_an_older_epoch_refuses_to_open_the_store_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An owner with epoch 2 opened the store (as after a takeover).
    let store_dir = dir.path().join(hub::server::STORE_DIR);
    let store = store::Store::open(
        &store_dir,
        store::StoreOptions {
            epoch: store::Epoch::new(2),
            ..store::StoreOptions::default()
        },
    )
    .expect("open the store at epoch 2");
    store.close().expect("close");
    let out = edgehub(
        dir.path(),
        &[
            "--epoch",
            "1",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "run",
        ],
    );
    assert!(!out.status.success(), "a stale owner must not run");
    let err = stderr(&out);
    assert!(
        err.contains("epoch 1 is older than epoch 2"),
        "the refusal says why: {err}"
    );
}
