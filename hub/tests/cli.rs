//! The `edgehub` command line as a newcomer uses it, without a running hub.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

#[path = "support/sdk.rs"]
mod sdk;

/// The data directory's record of what the hub is (`hub::record::RECORD_FILE`).
const RECORD_FILE: &str = "hub.json";

/// The binary with none of the `EDGEHUB_*` variables a developer may have set.
fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgehub"));
    c.env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EDGEHUB_") {
            c.env_remove(k);
        }
    }
    c
}

/// `edgehub ARGS --data-dir DATA_DIR`.
fn edgehub(data_dir: &Path, args: &[&str]) -> Output {
    command()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run edgehub")
}

/// `edgehub ARGS`.
fn edgehub_args(args: &[&str]) -> Output {
    command().args(args).output().expect("run edgehub")
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
    // The first call recorded the hub (gw.example): the data directory alone is enough now.
    let alone = edgehub(dir.path(), &["connection-string", "sender"]);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert_eq!(
        stdout(&alone),
        first,
        "the data directory remembers the hub"
    );
    assert!(dir.path().join(RECORD_FILE).exists());
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
    let out = edgehub(dir.path(), &["run", "--plain-mqtt-addr", "0.0.0.0:1883"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("plain_mqtt_addr") && err.contains("loopback"),
        "{err}"
    );
}

/// `run` binds its listeners itself (main.rs) before the hub starts: an address that is taken
/// fails the start with an error that names the protocol and the address, and the OS's reason.
#[test]
fn a_taken_address_fails_the_start_naming_protocol_and_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = edgehub(
        dir.path(),
        &[
            "run",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            &addr,
            "--amqp-addr",
            "127.0.0.1:0",
            "--methods-addr",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen for HTTP on {addr}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
}

#[test]
fn check_manifest_accepts_a_good_manifest_with_a_summary() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/src/default-manifest.json");
    let out = edgehub_args(&["check-manifest", manifest]);
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
    let out = edgehub_args(&["check-manifest", file.to_str().expect("path")]);
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
    let out = edgehub_args(&["check-manifest", file.to_str().expect("path")]);
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
    let out = edgehub_args(&["check-manifest", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid JSON"), "{}", stderr(&out));
    let missing = dir.path().join("missing.json");
    let out = edgehub_args(&["check-manifest", missing.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.json"), "{}", stderr(&out));
}

#[test]
fn environment_variables_stand_in_for_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = command()
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
            "run",
            "--epoch",
            "1",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    assert!(!out.status.success(), "a stale owner must not run");
    // The documented status of a stale epoch (README, `run --help`).
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("epoch 1 is older than epoch 2"),
        "the refusal says why: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Running the real binary (each in a network namespace of its own, on the default ports)

/// What the hub logs once every listener is bound.
const READY_LINE: &str = "edgehub ready";
/// A failure bound for a start on a loaded machine, never what a passing test waits for.
const START_WITHIN: Duration = Duration::from_secs(60);

/// `edgehub run ARGS` inside `ns`: the running hub once it logged that it is ready, or its log
/// if it exited with an error first.
fn try_start(ns: &sdk::NetNs, args: &[&str]) -> Result<sdk::Proc, String> {
    let mut cmd = command();
    cmd.arg("run").args(args);
    let hub = ns.spawn(&mut cmd);
    // The binary prints "error: …" as its last words when it stops with an error.
    let settled = hub.wait_stderr(START_WITHIN, |log| {
        log.contains(READY_LINE) || log.lines().any(|l| l.starts_with("error: "))
    });
    if settled && hub.stderr().contains(READY_LINE) {
        return Ok(hub);
    }
    // Stopped with an error (or not ready in time): everything it wrote, up to its exit.
    Err(hub.finish(Duration::from_secs(30)).stderr)
}

fn start(ns: &sdk::NetNs, args: &[&str]) -> sdk::Proc {
    try_start(ns, args).unwrap_or_else(|log| panic!("edgehub run {args:?} did not start:\n{log}"))
}

/// SIGTERM, and a clean exit.
fn stop(mut hub: sdk::Proc) {
    let status = hub.terminate(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the hub did not stop cleanly ({status:?}):\n{}",
        hub.stderr()
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The key `identities.json` holds for `module` (base64).
fn key_on_file(data_dir: &Path, module: &str) -> String {
    let text = std::fs::read_to_string(data_dir.join("identities.json")).expect("identities.json");
    let keys: serde_json::Value = serde_json::from_str(&text).expect("json");
    keys[module]
        .as_str()
        .expect("a key for the module")
        .to_owned()
}

/// Issue 12, item 2, as reported: `run` with a host name, device id and module of the user's
/// own, then `connection-string` and `ca-path` with nothing but the data directory.
#[test]
fn after_run_connection_string_and_ca_path_need_only_the_data_dir() {
    let ns = sdk::NetNs::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("D");
    let hub = start(
        &ns,
        &[
            "--data-dir",
            path_str(&d),
            "--iothub-hostname",
            "myhub.example",
            "--device-id",
            "dev7",
            "--module",
            "p0",
        ],
    );
    stop(hub);
    let out = edgehub(&d, &["connection-string", "p0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let gateway = hub::settings::machine_hostname().unwrap_or_else(|| "localhost".to_owned());
    let want: Vec<(String, String)> = [
        ("HostName", "myhub.example".to_owned()),
        ("DeviceId", "dev7".to_owned()),
        ("ModuleId", "p0".to_owned()),
        ("SharedAccessKey", key_on_file(&d, "p0")),
        ("GatewayHostName", gateway.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(fields(&stdout(&out)), want);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(RECORD_FILE)).expect("hub.json"))
            .expect("json");
    assert_eq!(record["gatewayHostName"], gateway.as_str(), "{record}");
    let out = edgehub(&d, &["ca-path"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        PathBuf::from(stdout(&out).trim()),
        std::path::absolute(d.join("tls/ca.pem")).expect("absolute")
    );
}

/// A `run` (or `connection-string`) whose flags or variables contradict the data directory
/// refuses, naming both values and --reconfigure; `run --reconfigure` changes the record.
#[test]
fn flags_contradicting_the_data_dir_are_refused_unless_reconfiguring() {
    let ns = sdk::NetNs::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("D");
    let first = edgehub(
        &d,
        &[
            "connection-string",
            "p0",
            "--module",
            "p0",
            "--iothub-hostname",
            "myhub.example",
            "--device-id",
            "dev7",
            "--gateway-hostname",
            "gw.example",
        ],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let key = key_on_file(&d, "p0");
    for (flag, given, recorded) in [
        ("--device-id", "dev8", "dev7"),
        ("--iothub-hostname", "other.example", "myhub.example"),
        ("--gateway-hostname", "gw2.example", "gw.example"),
    ] {
        let log = match try_start(&ns, &["--data-dir", path_str(&d), flag, given]) {
            Ok(hub) => {
                let log = hub.stderr();
                stop(hub);
                panic!("run {flag} {given} started on a data dir of {recorded}:\n{log}");
            }
            Err(log) => log,
        };
        for needle in [flag, given, recorded, "--reconfigure"] {
            assert!(log.contains(needle), "{needle} missing from:\n{log}");
        }
    }
    let mut by_env = command();
    by_env
        .args(["connection-string", "p0", "--data-dir", path_str(&d)])
        .env("EDGEHUB_DEVICE_ID", "dev8");
    let out = by_env.output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("dev7") && stderr(&out).contains("EDGEHUB_DEVICE_ID"),
        "{}",
        stderr(&out)
    );
    let hub = start(
        &ns,
        &[
            "--data-dir",
            path_str(&d),
            "--device-id",
            "dev8",
            "--reconfigure",
            "--module",
            "p0",
        ],
    );
    stop(hub);
    let out = edgehub(&d, &["connection-string", "p0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let f = fields(&stdout(&out));
    assert_eq!(f[0].1, "myhub.example", "kept");
    assert_eq!(f[1].1, "dev8", "changed");
    assert_eq!(f[3].1, key, "the module keeps its key");
    assert_eq!(f[4].1, "gw.example", "kept");
}

/// A data directory from before the record (keys, no `hub.json`) is adopted with the values
/// given.
#[test]
fn a_data_dir_without_a_record_is_adopted_with_the_values_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(dir.path(), &["connection-string", "sender"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = fields(&stdout(&out))[3].1.clone();
    std::fs::remove_file(dir.path().join(RECORD_FILE)).expect("remove the record");
    let out = edgehub(
        dir.path(),
        &["connection-string", "sender", "--device-id", "older-device"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let f = fields(&stdout(&out));
    assert_eq!(
        (f[1].1.as_str(), f[3].1.as_str()),
        ("older-device", key.as_str())
    );
    let again = edgehub(dir.path(), &["connection-string", "sender"]);
    assert_eq!(fields(&stdout(&again))[1].1, "older-device", "now recorded");
}

// ---------------------------------------------------------------------------------------------
// Each subcommand takes its own flags

#[test]
fn a_flag_of_another_subcommand_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/src/default-manifest.json");
    let d = path_str(dir.path());
    for args in [
        &[
            "connection-string",
            "sender",
            "--data-dir",
            d,
            "--plain-mqtt-addr",
            "127.0.0.1:1883",
        ][..],
        &[
            "connection-string",
            "sender",
            "--data-dir",
            d,
            "--upstream-timeout",
            "5",
        ],
        &[
            "connection-string",
            "sender",
            "--data-dir",
            d,
            "--mqtt-addr",
            "127.0.0.1:8883",
        ],
        &["ca-path", "--data-dir", d, "--device-id", "dev7"],
        &["ca-path", "--data-dir", d, "--epoch", "3"],
        &["check-manifest", manifest, "--data-dir", d],
    ] {
        let out = edgehub_args(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("unexpected argument"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Nothing was created by the refused commands.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

#[test]
fn each_subcommands_help_lists_its_own_flags() {
    let help = |sub: &str| stdout(&edgehub_args(&[sub, "--help"]));
    let run = help("run");
    for flag in [
        "--mqtt-addr",
        "--device-id",
        "--reconfigure",
        "--upstream-timeout",
        "--manifest",
    ] {
        assert!(run.contains(flag), "run --help lacks {flag}:\n{run}");
    }
    let cs = help("connection-string");
    for flag in [
        "--data-dir",
        "--device-id",
        "--gateway-hostname",
        "--module",
        "--manifest",
    ] {
        assert!(
            cs.contains(flag),
            "connection-string --help lacks {flag}:\n{cs}"
        );
    }
    for flag in [
        "--mqtt-addr",
        "--plain-mqtt-addr",
        "--upstream-timeout",
        "--epoch",
    ] {
        assert!(
            !cs.contains(flag),
            "connection-string --help lists {flag}:\n{cs}"
        );
    }
    let ca = help("ca-path");
    assert!(
        ca.contains("--data-dir") && !ca.contains("--device-id"),
        "{ca}"
    );
    let check = help("check-manifest");
    assert!(!check.contains("--data-dir"), "{check}");
}

/// Variables of flags a subcommand does not take are ignored by it (here one that `run` would
/// refuse, and one out of range).
#[test]
fn variables_of_flags_a_subcommand_does_not_take_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = command()
        .args([
            "connection-string",
            "sender",
            "--data-dir",
            path_str(dir.path()),
        ])
        .env("EDGEHUB_PLAIN_MQTT_ADDR", "0.0.0.0:1883")
        .env("EDGEHUB_UPSTREAM_TIMEOUT", "0")
        .env("EDGEHUB_MQTT_ADDR", "not an address")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ModuleId=sender;"),
        "{}",
        stdout(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Colour only on a terminal

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = edgehub(
        dir.path(),
        &["connection-string", "sender", "--log", "info"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("module identities saved"), "{log}");
    assert!(!log.contains("\x1b["), "ANSI codes in a piped log: {log:?}");
}

/// On a terminal (a pty from `script`) logs are coloured, unless NO_COLOR is set.
#[test]
fn logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let on_a_tty = |no_color: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = format!(
            "{} connection-string sender --log info --data-dir {}",
            env!("CARGO_BIN_EXE_edgehub"),
            path_str(dir.path())
        );
        // `script` runs the line on a pty of its own and copies what it writes to stdout.
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"])
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.output().expect("script (util-linux)");
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("module identities saved"), "{text:?}");
        text
    };
    assert!(on_a_tty(false).contains("\x1b["), "no colour on a terminal");
    assert!(!on_a_tty(true).contains("\x1b["), "colour despite NO_COLOR");
}

// ---------------------------------------------------------------------------------------------
// check-manifest and run: one parser

/// The bare `$edgeHub` desired properties of the issue.
const BARE_DESIRED: &str = r#"{
  "schemaVersion": "1.1",
  "routes": {
    "toCloud": "FROM /messages/* INTO $upstream",
    "p0ToP1": {"route": "FROM /messages/modules/p0/outputs/* INTO BrokeredEndpoint(\"/modules/p1/inputs/in\")", "priority": 1}
  },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
}"#;

/// Hand-made documents, good and bad, with a name each.
fn hand_made() -> Vec<(&'static str, String)> {
    let default = include_str!("../src/default-manifest.json");
    vec![
        ("bare-desired", BARE_DESIRED.to_owned()),
        (
            "bare-desired-1.0",
            r#"{"schemaVersion": "1.0", "routes": {"r": "FROM /* INTO $upstream"}}"#.to_owned(),
        ),
        ("content-wrapped", format!("{{\"content\": {default}}}")),
        (
            "bare-bad-route",
            BARE_DESIRED.replace("INTO $upstream", "INTO $nowhere"),
        ),
        (
            "bare-1.1-without-store",
            r#"{"schemaVersion": "1.1", "routes": {}}"#.to_owned(),
        ),
        ("invalid-json", "{ not json".to_owned()),
        ("empty-object", "{}".to_owned()),
        ("array", "[]".to_owned()),
        ("null", "null".to_owned()),
        (
            "empty-modules-content",
            r#"{"modulesContent": {}}"#.to_owned(),
        ),
        (
            "content-without-modules-content",
            r#"{"content": {}}"#.to_owned(),
        ),
        (
            "deployment-without-edgehub",
            default.replace("$edgeHub", "$edgeHubb"),
        ),
        (
            "deployment-bad-ttl",
            default.replace("\"timeToLiveSecs\": 7200", "\"timeToLiveSecs\": -7.5e400"),
        ),
    ]
}

/// Every manifest-like document in the repository and the hand-made ones, as files.
fn corpus(dir: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![
        root.join("hub/src/default-manifest.json"),
        root.join("benches/peers/edgehub-manifest.json"),
    ];
    if let Ok(entries) = std::fs::read_dir(root.join("tests/fuzz/corpus/manifest")) {
        let mut fuzz: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        fuzz.sort();
        files.extend(fuzz);
    }
    for (name, text) in hand_made() {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).expect("write");
        files.push(path);
    }
    files
}

/// `check-manifest FILE` accepts exactly the documents `run`'s loader
/// (`ManifestSource::load`, which `hub::server::run` calls) accepts.
#[test]
fn check_manifest_accepts_exactly_what_runs_loader_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = corpus(dir.path());
    let (mut good, mut bad) = (0, 0);
    for file in &files {
        let out = edgehub_args(&["check-manifest", path_str(file)]);
        let check = out.status.success();
        let load = hub::settings::ManifestSource::File(file.clone()).load();
        assert_eq!(
            check,
            load.is_ok(),
            "{}: check-manifest {} ({}{}) but run's loader {:?}",
            file.display(),
            if check { "accepts" } else { "refuses" },
            stdout(&out),
            stderr(&out),
            load.map(|d| d.modules)
        );
        if check {
            good += 1;
        } else {
            bad += 1;
        }
    }
    assert!(
        good >= 5 && bad >= 5,
        "a corpus of both kinds: {good} good, {bad} bad"
    );
}

/// The real binary: `run --manifest FILE` starts exactly when `check-manifest FILE` says ok.
#[test]
fn run_starts_on_exactly_the_manifests_check_manifest_accepts() {
    let ns = sdk::NetNs::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let default = include_str!("../src/default-manifest.json");
    for (n, (name, text)) in [
        ("bare-desired", BARE_DESIRED.to_owned()),
        ("content-wrapped", format!("{{\"content\": {default}}}")),
        (
            "bare-bad-route",
            BARE_DESIRED.replace("INTO $upstream", "INTO $nowhere"),
        ),
        (
            "empty-modules-content",
            r#"{"modulesContent": {}}"#.to_owned(),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, text).expect("write");
        let check = edgehub_args(&["check-manifest", path_str(&file)]);
        let data = dir.path().join(format!("data{n}"));
        let run = try_start(
            &ns,
            &[
                "--data-dir",
                path_str(&data),
                "--manifest",
                path_str(&file),
                "--module",
                "p0",
            ],
        );
        let started = run.is_ok();
        let log = match run {
            Ok(hub) => {
                let log = hub.stderr();
                stop(hub);
                log
            }
            Err(log) => log,
        };
        assert_eq!(
            check.status.success(),
            started,
            "{name}: check-manifest said {}{}; run:\n{log}",
            stdout(&check),
            stderr(&check)
        );
    }
}
