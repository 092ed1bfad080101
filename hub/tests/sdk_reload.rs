//! Live manifest reload and module keys from a directory, against the hub binary with the
//! official Python SDK (azure-iot-device 2.14.0, MQTT) as the modules.
//!
//! Every wait is on an event: a log line of the hub (JSON logs), a line a module printed, or
//! the hub's HTTP state; deadlines only bound a failure. Each test runs its own hub in its own
//! network namespace (tests/sdk/README.md); they need root and the SDKs
//! (`scripts/install-sdks.sh`), and fail without them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sdk::{NetNs, Proc, Script, Sdk};
use sdk_hub::{secs, SdkHub};
use serde_json::{json, Value};
use testhub::TestHub;

/// What the hub logs when a reload applied, and when it refused one.
const RELOADED: &str = r#""message":"manifest reloaded""#;
const REFUSED: &str =
    r#""message":"manifest reload refused: the previous manifest and module keys stay in force""#;

/// A deployment manifest declaring `modules`, with `routes` (name, route) in `$edgeHub`.
fn manifest(modules: &[&str], routes: &[(&str, &str)]) -> String {
    let mut m: Value =
        serde_json::from_str(include_str!("../src/default-manifest.json")).expect("manifest");
    let desired = &mut m["modulesContent"]["$edgeAgent"]["properties.desired"];
    let template = desired["modules"]["sender"].clone();
    desired["modules"] = Value::Object(
        modules
            .iter()
            .map(|name| ((*name).to_owned(), template.clone()))
            .collect(),
    );
    m["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] = Value::Object(
        routes
            .iter()
            .map(|(name, route)| ((*name).to_owned(), Value::from(*route)))
            .collect(),
    );
    serde_json::to_string_pretty(&m).expect("json")
}

/// `FROM sender's outputs INTO module's input1`.
fn to_input(module: &str) -> String {
    format!(
        "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/{module}/inputs/input1\")"
    )
}

/// Replaces `path` atomically (a temporary file in the same directory, renamed over it), as
/// editors and configuration tools do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A directory laid out as the kubelet mounts a ConfigMap or Secret: `..data` links to a
/// timestamped directory holding the files, and each file is a link `NAME -> ..data/NAME`.
struct MountedDir {
    dir: PathBuf,
    version: u32,
}

impl MountedDir {
    fn new(dir: PathBuf, files: &[(&str, &str)]) -> MountedDir {
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut mounted = MountedDir { dir, version: 0 };
        mounted.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), mounted.dir.join(name))
                .expect("link");
        }
        mounted
    }

    /// The kubelet's atomic update: a new timestamped directory, a new `..data_tmp` link to it,
    /// renamed over `..data`.
    fn swap(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let stamp = format!("..2026_12_06_00_00_00.{:09}", self.version);
        std::fs::create_dir(self.dir.join(&stamp)).expect("mkdir");
        for (name, text) in files {
            std::fs::write(self.dir.join(&stamp).join(name), text).expect("write");
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&stamp, &tmp).expect("link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename");
    }
}

/// `GET path` on the hub's HTTP listener inside `ns`: the body, or "" on error.
fn http_get(ns: &NetNs, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{} || exit 1; \
         printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
         cat <&3",
        testhub::METRICS_PORT
    );
    let out = ns
        .command("timeout")
        .args(["5", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// `GET /manifest` as JSON.
fn manifest_status(ns: &NetNs) -> Value {
    let body = http_get(ns, "/manifest");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /manifest: {e}: {body:?}"))
}

/// The value of metric `name` on the series that has every label of `labels` (`k="v"`, the
/// hub adds its own constant labels), from `/metrics`; None if absent.
fn metric(ns: &NetNs, name: &str, labels: &[&str]) -> Option<f64> {
    http_get(ns, "/metrics").lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|want| set.split(',').any(|kv| kv == *want))
            .then(|| value.trim().parse().ok())?
    })
}

/// The hub's log lines that contain every one of `needles`.
fn lines_with(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Waits until the hub logged `count` lines containing every one of `needles`.
fn await_log(hub: &Proc, needles: &[&str], count: usize, within: Duration) {
    if !hub.wait_stderr(within, |log| lines_with(log, needles) >= count) {
        panic!(
            "the hub did not log {count} line(s) with {needles:?} within {within:?}:\n{}",
            hub.stderr()
        );
    }
}

/// The hub with `manifest` at `path`, JSON logs (parsed by the assertions), and `extra` args.
fn hub_with(manifest_path: &Path, extra: &[&str]) -> TestHub {
    let mut args = vec!["--log-format", "json"];
    args.extend_from_slice(extra);
    TestHub::new()
        .run_args(&args)
        .manifest_at(manifest_path.to_path_buf())
}

/// Panics unless the module's script exited with `code`, with the hub's log and counters.
fn assert_exit(out: &sdk::Outcome, code: i32, hub: &SdkHub) {
    if out.code != Some(code) {
        panic!(
            "{}: exit {:?}, want {code}; stderr:\n{}\nhub log:\n{}\nhub counters:\n{}",
            out.label,
            out.code,
            out.stderr,
            hub.log(),
            hub.counters()
        );
    }
}

/// The seqs a module printed so far, in arrival order.
fn seqs(p: &Proc) -> Vec<i64> {
    sdk::data_of(p.seen())
        .iter()
        .filter_map(|m| m["seq"].as_i64())
        .collect()
}

/// Reads every receiver's output until together they hold every seq in `0..=last`.
fn collect_until(rxs: &mut [&mut Proc], last: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut all: Vec<i64> = rxs.iter().flat_map(|p| seqs(p)).collect();
        all.sort_unstable();
        all.dedup();
        if (0..=last).all(|s| all.binary_search(&s).is_ok()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "receivers hold {} distinct seqs of 0..={last} after {within:?}",
            all.len()
        );
        for p in rxs.iter_mut() {
            // A failure bound per read, not a pause: returns at the first message.
            p.read_until(Duration::from_millis(200), |v| v.get("seq").is_some());
        }
    }
}

/// A Python module sends steadily while its route moves from receiver `a` to `b` (the file
/// the manifest link points at is rewritten where the hub does not watch, then SIGHUP) and
/// then to `c` (the manifest replaced by an atomic rename in the watched directory). Every
/// acknowledged message arrives at exactly one receiver, in order: `a` gets a prefix of the
/// sequence, `b` the next part and `c` the rest, none missing, none twice. `b` and `c` were
/// connected before any route named them.
#[test]
fn a_route_moved_mid_stream_by_sighup_and_by_file_delivers_each_message_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conf, real) = (dir.path().join("conf"), dir.path().join("real"));
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::create_dir_all(&real).expect("mkdir");
    let modules = ["sender", "a", "b", "c"];
    std::fs::write(
        real.join("manifest.json"),
        manifest(&modules, &[("r", &to_input("a"))]),
    )
    .expect("write");
    let link = conf.join("manifest.json");
    std::os::unix::fs::symlink(real.join("manifest.json"), &link).expect("link");
    let mut hub = SdkHub::prepare(hub_with(&link, &[]), &[]);
    let cs: Vec<String> = modules
        .iter()
        .map(|m| hub.config.connection_string(m))
        .collect();
    hub.restart();

    let mut rxs: Vec<Proc> = cs[1..]
        .iter()
        .map(|cs| {
            let mut rx = hub
                .module_with(Sdk::Python, Script::Receive, cs)
                .args(["--timeout", "300"])
                .spawn();
            rx.expect_event("ready", secs(30));
            rx
        })
        .collect();
    let mut tx = hub
        .module_with(Sdk::Python, Script::Send, &cs[0])
        .args(["--output", "out1", "--run", "move", "--count", "1000000"])
        .args(["--interval-ms", "5", "--timeout", "300"])
        .spawn();
    let acked_at_least = |tx: &mut Proc, n: i64| {
        tx.read_until(secs(60), |v| v["seq"].as_i64().is_some_and(|s| s >= n))
            .unwrap_or_else(|| panic!("the sender did not get {n} acknowledged"))["seq"]
            .as_i64()
            .unwrap()
    };

    let seen = acked_at_least(&mut tx, 100);
    // Where the hub does not watch: only SIGHUP can make it read this.
    write_atomically(
        &real.join("manifest.json"),
        &manifest(&modules, &[("r", &to_input("b"))]),
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &hub.proc().id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    await_log(
        hub.proc(),
        &[RELOADED, r#""trigger":"SIGHUP""#],
        1,
        secs(30),
    );
    let seen = acked_at_least(&mut tx, seen + 100);
    write_atomically(&link, &manifest(&modules, &[("r", &to_input("c"))]));
    await_log(
        hub.proc(),
        &[RELOADED, r#""trigger":"manifest file changed""#],
        1,
        secs(30),
    );
    acked_at_least(&mut tx, seen + 100);
    tx.kill();
    let acked: Vec<i64> = seqs(&tx);
    let last = *acked.last().unwrap();
    assert_eq!(acked, (0..=last).collect::<Vec<_>>(), "the sender's acks");

    let (a, rest) = rxs.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    collect_until(&mut [&mut a[0], &mut b[0], &mut c[0]], last, secs(120));
    let got: Vec<Vec<i64>> = rxs.iter().map(seqs).collect();
    let context = || {
        format!(
            "a {:?}..{:?} ({}), b {:?}..{:?} ({}), c {:?}..{:?} ({}); acked 0..={last}\nhub log:\n{}",
            got[0].first(),
            got[0].last(),
            got[0].len(),
            got[1].first(),
            got[1].last(),
            got[1].len(),
            got[2].first(),
            got[2].last(),
            got[2].len(),
            testhub::log_lines(hub.proc(), "manifest")
        )
    };
    // Each receiver: a contiguous run, in order, no duplicate; the runs follow each other.
    let mut next = 0;
    for (name, run) in ["a", "b", "c"].iter().zip(&got) {
        assert!(!run.is_empty(), "{name} got nothing: {}", context());
        let want: Vec<i64> = (next..next + run.len() as i64).collect();
        assert_eq!(run, &want, "{name}: {}", context());
        next += run.len() as i64;
    }
    // Everything acknowledged arrived; at most the one send in flight at the kill beyond it.
    assert!(next == last + 1 || next == last + 2, "{}", context());
}

/// A broken manifest swapped in as Kubernetes updates a mounted ConfigMap (`..data` renamed):
/// the hub sees the swap, refuses it, keeps routing with the old routes, counts the failure
/// and shows every error with its location on `GET /manifest`; a fixed manifest swapped in
/// next applies.
#[test]
fn a_broken_manifest_keeps_the_old_routes_and_shows_its_errors_then_a_fixed_one_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let modules = ["sender", "a", "b"];
    let good = manifest(&modules, &[("r", &to_input("a"))]);
    let mut cm = MountedDir::new(dir.path().join("cm"), &[("manifest.json", &good)]);
    let mut hub = SdkHub::prepare(hub_with(&cm.dir.join("manifest.json"), &[]), &[]);
    let (cs_tx, cs_a, cs_b) = (
        hub.config.connection_string("sender"),
        hub.config.connection_string("a"),
        hub.config.connection_string("b"),
    );
    hub.restart();
    assert_eq!(manifest_status(&hub.ns)["generation"], 1);

    let mut broken: Value = serde_json::from_str(&good).unwrap();
    broken["modulesContent"]["$edgeHub"]["properties.desired"]["routes"] = json!({
        "r": {"route": to_input("b"), "priority": 99},
        "s": "FROM /messages/* WHERE ( INTO $upstream",
    });
    cm.swap(&[("manifest.json", &broken.to_string())]);
    await_log(hub.proc(), &[REFUSED], 1, secs(30));
    let status = manifest_status(&hub.ns);
    assert_eq!(status["lastReload"]["result"], "failure", "{status}");
    assert_eq!(status["lastReload"]["trigger"], "manifest file changed");
    assert_eq!(status["generation"], 1, "{status}");
    let errors: Vec<&str> = status["lastReload"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(errors.len(), 2, "{status}");
    assert!(errors[0].contains("routes.r.priority"), "{errors:?}");
    assert!(errors[1].contains("route 's', column 26"), "{errors:?}");
    assert_eq!(
        metric(
            &hub.ns,
            "edgehub_manifest_reloads_total",
            &["result=\"failure\""]
        ),
        Some(1.0)
    );

    // Still routed to a.
    let tx = |run: &str| {
        hub.module_with(Sdk::Python, Script::Send, &cs_tx)
            .args(["--output", "out1", "--run", run, "--count", "20"])
            .args(["--timeout", "60"])
            .run(secs(70))
            .assert_exit(sdk::EXIT_OK);
    };
    tx("old");
    let got_a = hub
        .module_with(Sdk::Python, Script::Receive, &cs_a)
        .args(["--count", "20", "--timeout", "60"])
        .run(secs(70));
    got_a.assert_exit(sdk::EXIT_OK);
    assert_eq!(
        got_a
            .data()
            .iter()
            .filter_map(|m| m["seq"].as_i64())
            .collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );

    cm.swap(&[(
        "manifest.json",
        &manifest(&modules, &[("r", &to_input("b"))]),
    )]);
    await_log(hub.proc(), &[RELOADED], 1, secs(30));
    let status = manifest_status(&hub.ns);
    assert_eq!(status["lastReload"]["result"], "success", "{status}");
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(
        metric(
            &hub.ns,
            "edgehub_manifest_reloads_total",
            &["result=\"success\""]
        ),
        Some(1.0)
    );
    tx("new");
    let got_b = hub
        .module_with(Sdk::Python, Script::Receive, &cs_b)
        .args(["--count", "20", "--timeout", "60"])
        .run(secs(70));
    got_b.assert_exit(sdk::EXIT_OK);
    for m in got_b.data() {
        assert_eq!(m["custom_properties"]["run"], "new", "{m}");
    }
}

/// A module added by a reload gets a key, connects and receives; removed, its live connection
/// is closed and its logins refused, and what was queued for it stays; added back, it
/// receives that backlog in order.
#[test]
fn a_module_added_then_removed_keeps_its_queue_until_it_is_added_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(&["sender"], &[])).expect("write");
    let mut hub = SdkHub::prepare(hub_with(&path, &[]), &[]);
    let cs_tx = hub.config.connection_string("sender");
    hub.restart();
    let send = |run: &str, start: i64| {
        hub.module_with(Sdk::Python, Script::Send, &cs_tx)
            .args(["--output", "out1", "--run", run, "--count", "10"])
            .args(["--start-seq", &start.to_string(), "--timeout", "60"])
            .run(secs(70))
            .assert_exit(sdk::EXIT_OK);
    };
    let with_late = manifest(&["sender", "late"], &[("r", &to_input("late"))]);

    // Added: a key (the CLI reads the one the hub minted), a connection, deliveries.
    write_atomically(&path, &with_late);
    await_log(hub.proc(), &[RELOADED, "modules added [late]"], 1, secs(30));
    let cs_late = hub.config.connection_string("late");
    // The data directory's record follows the reload: its path alone names the new module.
    let from_record = |module: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_edgehub"))
            .args(["connection-string", module, "--data-dir"])
            .arg(hub.data_dir())
            .env_remove("EDGEHUB_MANIFEST")
            .env_remove("EDGEHUB_MODULES")
            .output()
            .expect("connection-string")
    };
    let out = from_record("late");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), cs_late);
    send("first", 0);
    let first = hub
        .module_with(Sdk::Python, Script::Receive, &cs_late)
        .args(["--count", "10", "--timeout", "60"])
        .run(secs(70));
    assert_exit(&first, sdk::EXIT_OK, &hub);

    // Queued while it is offline; removed: logins refused, the queue kept.
    send("queued", 10);
    let only_sender = manifest(&["sender"], &[]);
    write_atomically(&path, &only_sender);
    await_log(
        hub.proc(),
        &[RELOADED, "modules removed [late]"],
        1,
        secs(30),
    );
    let refused = hub
        .module_with(Sdk::Python, Script::ConnectOnly, &cs_late)
        .args(["--timeout", "30"])
        .run(secs(40));
    assert_exit(&refused, sdk::EXIT_AUTH, &hub);
    let out = from_record("late");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown module"),
        "a removed module has no connection string: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let queue = metric(
        &hub.ns,
        "edgehub_queue_length",
        &["endpoint=\"late/input1\""],
    );
    assert_eq!(queue, Some(10.0), "kept while removed");

    // Added back: the same key, and the backlog queued before the removal, in order.
    write_atomically(&path, &with_late);
    await_log(hub.proc(), &[RELOADED, "modules added [late]"], 2, secs(30));
    assert_eq!(
        hub.config.connection_string("late"),
        cs_late,
        "the key survives"
    );
    let mut back = hub
        .module_with(Sdk::Python, Script::Receive, &cs_late)
        .args(["--timeout", "300"])
        .spawn();
    let got: Vec<i64> = back
        .data_lines(10, secs(60))
        .iter()
        .filter_map(|m| m["seq"].as_i64())
        .collect();
    assert_eq!(got, (10..20).collect::<Vec<_>>());

    // Removed while connected: the hub closes the connection, and the SDK's own reconnect is
    // refused.
    let disconnected = [r#""message":"module disconnected""#, "edge-device/late"];
    let refused = [r#""message":"CONNECT refused""#, "edge-device/late"];
    let (d, r) = (
        lines_with(&hub.log(), &disconnected),
        lines_with(&hub.log(), &refused),
    );
    write_atomically(&path, &only_sender);
    await_log(
        hub.proc(),
        &[RELOADED, "modules removed [late]"],
        2,
        secs(30),
    );
    await_log(hub.proc(), &disconnected, d + 1, secs(30));
    await_log(hub.proc(), &refused, r + 1, secs(60));
    back.kill();
    assert_eq!(
        seqs(&back),
        (10..20).collect::<Vec<_>>(),
        "nothing more, nothing twice"
    );
}

/// Module keys from a directory mounted as a Kubernetes Secret: a module whose key file appears
/// can connect with that key; when its key file changes, its live connection is closed, the
/// old key is refused and the new one works.
#[test]
fn a_key_file_added_lets_its_module_connect_and_a_changed_key_disconnects_it() {
    use base64::Engine as _;
    let b64 = |byte: u8| base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest(&["sender"], &[])).expect("write");
    let sender_key = b64(1);
    let mut secret = MountedDir::new(dir.path().join("keys"), &[("sender", &sender_key)]);
    let keys_dir = secret.dir.to_string_lossy().into_owned();
    let mut hub = SdkHub::prepare(hub_with(&path, &["--module-keys-dir", &keys_dir]), &[]);
    hub.restart();
    // The sender's key is the Secret's (the CLI was not told about the directory: build the
    // string from another module's).
    let cs_of = |module: &str, key: &str| {
        let base = hub.config.connection_string("sender");
        testhub::with_key(
            &base.replace("ModuleId=sender;", &format!("ModuleId={module};")),
            key,
        )
    };
    let connect = |cs: &str| {
        hub.module_with(Sdk::Python, Script::ConnectOnly, cs)
            .args(["--timeout", "30"])
            .run(secs(40))
    };
    connect(&cs_of("sender", &sender_key)).assert_exit(sdk::EXIT_OK);
    connect(&cs_of("extra", &b64(2))).assert_exit(sdk::EXIT_AUTH);

    // Lines fixed in the Secret at its next update: the new file is a link into `..data`.
    secret.swap(&[("sender", &sender_key), ("extra", &b64(2))]);
    std::os::unix::fs::symlink("..data/extra", secret.dir.join("extra")).expect("link");
    await_log(
        hub.proc(),
        &[RELOADED, "modules added [extra]"],
        1,
        secs(30),
    );
    connect(&cs_of("extra", &b64(2))).assert_exit(sdk::EXIT_OK);

    let mut live = hub
        .module_with(Sdk::Python, Script::ConnectOnly, &cs_of("extra", &b64(2)))
        .args(["--hold", "600", "--timeout", "650"])
        .spawn();
    live.expect_event("connected", secs(30));
    let disconnected = lines_with(
        &hub.log(),
        &[r#""message":"module disconnected""#, "edge-device/extra"],
    );
    secret.swap(&[("sender", &sender_key), ("extra", &b64(3))]);
    await_log(
        hub.proc(),
        &[RELOADED, "module keys changed [extra]"],
        1,
        secs(30),
    );
    await_log(
        hub.proc(),
        &[r#""message":"module disconnected""#, "edge-device/extra"],
        disconnected + 1,
        secs(30),
    );
    live.kill();
    connect(&cs_of("extra", &b64(2))).assert_exit(sdk::EXIT_AUTH);
    connect(&cs_of("extra", &b64(3))).assert_exit(sdk::EXIT_OK);
}

/// The AMQP head follows a reload too: a Node SDK receiver on AMQP, connected before any route
/// named its module, gets what a new route sends it; its module removed, the hub closes its
/// AMQP connection.
#[test]
fn an_amqp_receiver_gets_a_new_route_and_is_disconnected_when_its_module_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    let modules = ["sender", "a", "b"];
    std::fs::write(&path, manifest(&modules, &[("r", &to_input("a"))])).expect("write");
    let mut hub = SdkHub::prepare(hub_with(&path, &["--amqp-addr", "127.0.0.1:5671"]), &[]);
    let (cs_tx, cs_b) = (
        hub.config.connection_string("sender"),
        hub.config.connection_string("b"),
    );
    hub.restart();
    let mut rx = hub
        .module_with(Sdk::Node, Script::Receive, &cs_b)
        .args(["--transport", "amqp", "--timeout", "300"])
        .spawn();
    rx.expect_event("ready", secs(30));

    write_atomically(&path, &manifest(&modules, &[("r", &to_input("b"))]));
    await_log(hub.proc(), &[RELOADED, "routes changed [r]"], 1, secs(30));
    let sent = hub
        .module_with(Sdk::Python, Script::Send, &cs_tx)
        .args(["--output", "out1", "--run", "amqp", "--count", "10"])
        .args(["--timeout", "60"])
        .run(secs(70));
    assert_exit(&sent, sdk::EXIT_OK, &hub);
    let got: Vec<i64> = rx
        .data_lines(10, secs(60))
        .iter()
        .filter_map(|m| m["seq"].as_i64())
        .collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());

    let closed = [r#""message":"AMQP connection closed""#, "replaced"];
    let before = lines_with(&hub.log(), &closed);
    write_atomically(&path, &manifest(&["sender", "a"], &[("r", &to_input("a"))]));
    await_log(hub.proc(), &[RELOADED, "modules removed [b]"], 1, secs(30));
    await_log(hub.proc(), &closed, before + 1, secs(30));
}

/// SIGHUP to a hub on the built-in manifest (and no keys directory): it says there is nothing
/// to reload and keeps serving.
#[test]
fn sighup_without_a_manifest_file_says_there_is_nothing_to_reload() {
    let ns = NetNs::new();
    let hub = TestHub::new().run_args(&["--log-format", "json"]);
    let hub_proc = hub.start(&ns);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &hub_proc.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    await_log(
        &hub_proc,
        &[r#""message":"nothing to reload"#, r#""trigger":"SIGHUP""#],
        1,
        secs(30),
    );
    assert!(testhub::readyz(&ns), "still serving");
    assert_eq!(manifest_status(&ns)["lastReload"], Value::Null);
}

/// A bad file in the keys directory: at startup the hub refuses to start, naming the file; on
/// a reload it keeps the previous keys and counts a failure.
#[test]
fn a_bad_key_file_stops_the_start_and_is_refused_on_reload() {
    use base64::Engine as _;
    let b64 = |byte: u8| base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    std::fs::write(keys.join("sender"), "too short").expect("write");
    let keys_arg = keys.to_string_lossy().into_owned();
    let config = TestHub::new().run_args(&["--log-format", "json", "--module-keys-dir", &keys_arg]);
    // `timeout` only bounds a regression (a hub that starts anyway would serve forever).
    let out = std::process::Command::new("timeout")
        .args(["60", env!("CARGO_BIN_EXE_edgehub"), "run", "--data-dir"])
        .arg(config.data_dir())
        .args(["--module-keys-dir", &keys_arg, "--mqtt-addr", "127.0.0.1:0"])
        // What the hub is, as TestHub gives it, so the later `connection-string` agrees with
        // the data directory's record.
        .args(["--gateway-hostname", testhub::GATEWAY])
        .args(["--iothub-hostname", testhub::IOTHUB_HOSTNAME])
        .args(["--device-id", testhub::DEVICE_ID])
        .args([
            "--amqp-addr",
            "127.0.0.1:0",
            "--methods-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a bad key file: {stderr}"
    );
    assert!(
        stderr.contains(&keys.join("sender").display().to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("too short"),
        "the key is never echoed: {stderr}"
    );

    write_atomically(&keys.join("sender"), &b64(1));
    let mut hub = SdkHub::prepare(config, &[]);
    let cs = testhub::with_key(&hub.config.connection_string("sender"), &b64(1));
    hub.restart();
    let connect = || {
        hub.module_with(Sdk::Python, Script::ConnectOnly, &cs)
            .args(["--timeout", "30"])
            .run(secs(40))
    };
    assert_exit(&connect(), sdk::EXIT_OK, &hub);
    write_atomically(&keys.join("sender"), "not base64!");
    await_log(hub.proc(), &[REFUSED], 1, secs(30));
    let status = manifest_status(&hub.ns);
    assert_eq!(status["lastReload"]["result"], "failure", "{status}");
    assert!(
        status["lastReload"]["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains(&keys.join("sender").display().to_string())),
        "{status}"
    );
    assert_exit(&connect(), sdk::EXIT_OK, &hub);
}
