//! The hub image (k8s/images/hub.Containerfile) really runs: under `podman run`, started as the
//! controller starts it (k8s-design.md: certificate files from a Secret-like directory, module
//! keys from a directory, data on a named volume, read-only root filesystem, no capabilities,
//! user 65532), it serves a pair of Python SDK modules in order, survives `podman kill -s KILL`
//! and `podman start` with nothing acknowledged lost, and its data lives on the volume.
//!
//! The image is built from the binary under test (`CARGO_BIN_EXE_edgehub`), once per test run
//! (support/podman.rs). Needs root (network namespaces, podman) and the SDKs; podman is
//! installed with apt if missing, and the test is skipped with a SKIP line only if it cannot be.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/certs.rs"]
mod certs;
#[path = "support/podman.rs"]
mod podman;
#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use certs::{Ca, SecretDir};
use podman::{Image, Podman};
use sdk::{NetNs, Script, Sdk, SdkEnv, SeqReport};
use testhub::{DEVICE_ID, GATEWAY, IOTHUB_HOSTNAME};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn random_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The hub's arguments as the controller renders them (k8s-design.md, "The hub container"),
/// with this test's gateway host name (the SDKs dial 127.0.0.1 in the namespace) and the
/// default IoT Hub host name (no cloud connection here).
fn hub_args() -> Vec<&'static str> {
    vec![
        "run",
        "--data-dir",
        "/var/lib/edgehub",
        "--module-keys-dir",
        "/etc/edgehub/module-keys",
        "--iothub-hostname",
        IOTHUB_HOSTNAME,
        "--device-id",
        DEVICE_ID,
        "--gateway-hostname",
        GATEWAY,
        "--tls-cert",
        "/etc/edgehub/tls/tls.crt",
        "--tls-key",
        "/etc/edgehub/tls/tls.key",
        "--tls-ca",
        "/etc/edgehub/tls/ca.crt",
        "--mqtt-addr",
        "0.0.0.0:8883",
        "--amqp-addr",
        "0.0.0.0:5671",
        "--metrics-addr",
        "0.0.0.0:9600",
        "--epoch",
        "1",
        "--reconfigure",
    ]
}

#[test]
fn hub_image_serves_a_module_pair_and_survives_kill_9_with_its_store_on_a_volume() {
    const N: i64 = 600;
    const KILL_AFTER: i64 = 200;
    let Some(podman) = Podman::or_skip("hub image under podman") else {
        return;
    };
    let env = SdkEnv::require();
    let image = podman.image(Image::Hub, Path::new(env!("CARGO_BIN_EXE_edgehub")));
    let user = podman.ok(&["image", "inspect", "--format", "{{.Config.User}}", &image]);
    assert_eq!(
        user, "65532:65532",
        "the image must run as the non-root user"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("edgehub test CA");
    let tls = SecretDir::new(dir.path().join("tls"));
    tls.publish(&ca.issue(&[GATEWAY, "localhost"]).files(&ca));
    let (sender_key, receiver_key) = (random_key(), random_key());
    let keys = SecretDir::new(dir.path().join("module-keys"));
    keys.publish(&[
        ("sender", sender_key.clone()),
        ("receiver", receiver_key.clone()),
    ]);
    let cs = |module: &str, key: &str| {
        sdk::module_connection_string(IOTHUB_HOSTNAME, DEVICE_ID, module, key, GATEWAY)
    };

    let ns = NetNs::new();
    let volume = podman.volume("store");
    let network = format!("ns:/run/netns/{}", ns.name());
    let tls_mount = format!("{}:/etc/edgehub/tls:ro", tls.path().display());
    let keys_mount = format!("{}:/etc/edgehub/module-keys:ro", keys.path().display());
    let store_mount = volume.mount("/var/lib/edgehub");
    let hub = podman.run(
        &[
            "--network",
            &network,
            "-v",
            &store_mount,
            "-v",
            &tls_mount,
            "-v",
            &keys_mount,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
        ],
        &image,
        &hub_args(),
    );
    hub.wait_log(testhub::READY_LINE, 1, secs(60));

    let mut rx = ns
        .module(
            &env,
            Sdk::Python,
            Script::Receive,
            &cs("receiver", &receiver_key),
            &tls.ca(),
        )
        .args(["--timeout", "170"])
        .spawn();
    rx.expect_event("ready", secs(30));
    let mut tx = ns
        .module(
            &env,
            Sdk::Python,
            Script::Send,
            &cs("sender", &sender_key),
            &tls.ca(),
        )
        .args([
            "--output",
            "out1",
            "--run",
            "podman",
            "--count",
            &N.to_string(),
        ])
        .args(["--timeout", "150"])
        .args(testhub::prop_args())
        .spawn();
    let reached = tx.read_until(secs(60), |v| {
        v["seq"].as_i64().is_some_and(|s| s >= KILL_AFTER)
    });
    assert!(
        reached.is_some(),
        "the sender never got {KILL_AFTER} acknowledgements: {}\nhub:\n{}",
        tx.stderr(),
        hub.logs()
    );
    hub.kill();
    let acked_before = sdk::data_of(tx.seen()).len();
    hub.start();
    hub.wait_log(testhub::READY_LINE, 2, secs(60));

    let sent = tx.finish(secs(160));
    if sent.code != Some(sdk::EXIT_OK) {
        panic!(
            "the sender did not finish after the restart: exit {:?}; stderr:\n{}\nhub:\n{}",
            sent.code,
            sent.stderr,
            hub.logs()
        );
    }
    SeqReport::of(&sent.data(), 0..N).assert_no_loss_no_reorder();
    let (got, rx_stderr) = rx.receive_all(N, secs(120));
    let report = SeqReport::of(&got, 0..N);
    if !report.missing.is_empty()
        || !report.out_of_order.is_empty()
        || !report.unexpected.is_empty()
        || report.without_seq > 0
    {
        panic!(
            "after a kill at ~{acked_before} acknowledged: {report:?}\nreceiver:\n{rx_stderr}\n\
             hub:\n{}",
            hub.logs()
        );
    }
    for m in &got {
        testhub::assert_intact(m, "podman", "sender", "input1");
    }
    // The store is on the volume (the root filesystem is read-only): its segments are there.
    let mountpoint = podman.ok(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &volume.name,
    ]);
    let store = Path::new(&mountpoint).join("store");
    let segments = std::fs::read_dir(&store)
        .unwrap_or_else(|e| panic!("{}: {e}", store.display()))
        .count();
    assert!(segments > 0, "no store files on the volume");
}
