//! Proves hub/tests/support/sdk.rs without the hub: Mosquitto (TLS, 127.0.0.1:8883) stands in
//! for it inside the helper's own network namespaces. Not part of `cargo test`: selftest.sh
//! copies this file and sdk.rs into a throw-away crate and runs it there, with
//! EDGEHUB_SELFTEST_WORK naming the folder that holds ca.pem, other-ca.pem, mosq-open.conf and
//! mosq-auth.conf (both with a `log_dest file` line that this test rewrites per namespace).
#[path = "support/sdk.rs"]
mod sdk;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sdk::{NetNs, Script, Sdk, SdkEnv, SeqReport};
use serde_json::{json, Value};

const KEY: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0";

fn work() -> PathBuf {
    PathBuf::from(std::env::var("EDGEHUB_SELFTEST_WORK").expect("EDGEHUB_SELFTEST_WORK"))
}

fn cs(module: &str) -> String {
    sdk::module_connection_string("acceptance-hub.local", "edgedev", module, KEY, "127.0.0.1")
}

/// Mosquitto with `conf` ("open" or "auth") on 127.0.0.1:8883 inside `ns`; its log in `log`.
fn mosquitto(ns: &NetNs, conf: &str, log: &str) -> sdk::Proc {
    let text = std::fs::read_to_string(work().join(format!("mosq-{conf}.conf"))).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("log_dest") {
                format!("log_dest file {log}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = work().join(format!("{}.conf", ns.name()));
    std::fs::write(&path, text + "\n").unwrap();
    let p = ns.spawn(Command::new("mosquitto").arg("-c").arg(&path));
    assert!(
        ns.wait_for_port(8883, Duration::from_secs(10)),
        "mosquitto did not listen: {}",
        p.stderr()
    );
    p
}

fn wait_log(log: &str, needle: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(needle)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{needle:?} not in {log} within {within:?}");
}

fn publish(ns: &NetNs, topic: &str, body: &str) {
    let out = ns
        .command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "8883",
            "-q",
            "1",
            "-i",
            "selftest-pub",
            "--cafile",
        ])
        .arg(work().join("ca.pem"))
        .args(["-t", topic, "-m", body])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_sdks_are_an_error_not_a_skip() {
    let err = SdkEnv::locate_at(PathBuf::from("/nonexistent/edgehub-sdk")).unwrap_err();
    assert!(err.contains("no Python SDK venv"), "{err}");
}

#[test]
fn namespace_is_created_isolated_and_deleted() {
    let ns = NetNs::new();
    let name = ns.name().to_string();
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(list.contains(&name), "{list}");
    let links = ns.command("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    // A process left running inside is killed by the drop.
    let mut sleeper = ns.command("sleep").arg("600").spawn().unwrap();
    assert_eq!(
        ns.pids(),
        vec![sleeper.id()],
        "ip netns exec runs the program in place"
    );
    let t0 = std::time::Instant::now();
    drop(ns);
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&name), "{list}");
    let status = sleeper.wait().unwrap();
    assert!(
        !status.success() && t0.elapsed() < Duration::from_secs(5),
        "{status:?}"
    );
}

#[test]
fn nothing_listening_fails_fast_with_exit_3() {
    let env = SdkEnv::require();
    let ns = NetNs::new();
    for s in Sdk::ALL {
        let out = ns
            .module(&env, s, Script::Send, &cs("modA"), &work().join("ca.pem"))
            .args(["--count", "2", "--timeout", "10"])
            .run(Duration::from_secs(20));
        out.assert_exit(sdk::EXIT_CONNECT);
        let line = out.error_line().unwrap();
        assert!(line.contains("error=connect exit=3"), "{line}");
        assert!(
            line.contains("ECONNREFUSED") || line.contains("Connection refused"),
            "{line}"
        );
        assert!(out.data().is_empty());
    }
}

#[test]
fn receive_through_mosquitto_in_order_with_connection_ids() {
    let env = SdkEnv::require();
    let ns = NetNs::new();
    let log = work()
        .join(format!("{}.log", ns.name()))
        .display()
        .to_string();
    let _broker = mosquitto(&ns, "open", &log);
    for (s, module) in [(Sdk::Python, "modP"), (Sdk::Node, "modN")] {
        let mut rx = ns
            .module(
                &env,
                s,
                Script::Receive,
                &cs(module),
                &work().join("ca.pem"),
            )
            .args(["--count", "5", "--timeout", "30"])
            .spawn();
        rx.expect_event("connected", Duration::from_secs(15));
        rx.expect_event("ready", Duration::from_secs(15));
        // Node announces "ready" before its SUBSCRIBE; the broker's log says when it came.
        wait_log(
            &log,
            &format!("Received SUBSCRIBE from edgedev/{module}"),
            Duration::from_secs(10),
        );
        for seq in 0..5 {
            publish(
                &ns,
                &format!("devices/edgedev/modules/{module}/inputs/in1/%24.mid=m-{seq}&%24.ct=application%2Fjson&%24.ce=utf-8&run=rs&seq={seq}&%24.cdid=edgedev&%24.cmid=modA"),
                &format!("{{\"seq\":{seq}}}"),
            );
        }
        let got = rx.data_lines(5, Duration::from_secs(20));
        SeqReport::of(&got, 0..5).assert_no_loss_no_reorder();
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m["input_name"], "in1", "{s:?} {m}");
            assert_eq!(m["message_id"], json!(format!("m-{i}")), "{s:?} {m}");
            assert_eq!(m["content_type"], "application/json");
            assert_eq!(m["connection_device_id"], "edgedev");
            assert_eq!(m["connection_module_id"], "modA");
            assert_eq!(m["custom_properties"]["run"], "rs");
            assert_eq!(m["data"], json!(format!("{{\"seq\":{i}}}")));
        }
        let out = rx.finish(Duration::from_secs(10));
        out.assert_exit(sdk::EXIT_OK);
        assert_eq!(out.events("done")[0]["received"], 5);
    }
}

#[test]
fn send_through_mosquitto_and_parallel_namespaces_on_8883() {
    let env = SdkEnv::require();
    // Two namespaces, each with its own broker on 127.0.0.1:8883 at the same time.
    let open = NetNs::new();
    let auth = NetNs::new();
    let log = work()
        .join(format!("{}.log", open.name()))
        .display()
        .to_string();
    let _b1 = mosquitto(&open, "open", &log);
    let log2 = work()
        .join(format!("{}.log", auth.name()))
        .display()
        .to_string();
    let _b2 = mosquitto(&auth, "auth", &log2);

    let sub = open.spawn(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "8883",
                "-q",
                "1",
                "-v",
                "-C",
                "6",
                "-W",
                "30",
                "--cafile",
            ])
            .arg(work().join("ca.pem"))
            .args(["-t", "devices/+/modules/+/messages/events/#"]),
    );
    wait_log(&log, "Received SUBSCRIBE from", Duration::from_secs(10));
    for s in Sdk::ALL {
        let out = open
            .module(&env, s, Script::Send, &cs("modA"), &work().join("ca.pem"))
            .args([
                "--output",
                "out1",
                "--count",
                "3",
                "--run",
                s.name(),
                "--prop",
                "k=v w",
            ])
            .run(Duration::from_secs(30));
        out.assert_exit(sdk::EXIT_OK);
        SeqReport::of(&out.data(), 0..3).assert_no_loss_no_reorder();
        assert_eq!(out.data()[2]["mid"], json!(format!("{}-2", s.name())));
        // The same namespace name in the other one refuses the same credentials.
        let refused = auth
            .module(
                &env,
                s,
                Script::ConnectOnly,
                &cs("modA"),
                &work().join("ca.pem"),
            )
            .args(["--timeout", "10"])
            .run(Duration::from_secs(20));
        refused.assert_exit(sdk::EXIT_AUTH);
    }
    let topics = sub.finish(Duration::from_secs(10));
    let text: Vec<String> = topics
        .lines
        .iter()
        .filter_map(|l| {
            if let sdk::Line::Text(t) = l {
                Some(t.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(text.len(), 6, "{text:?}");
    assert!(
        text[0].starts_with(
            "devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=python-0&"
        ),
        "{text:?}"
    );
    assert!(
        text[3].starts_with(
            "devices/edgedev/modules/modA/messages/events/%24.on=out1&%24.mid=node-0&"
        ),
        "{text:?}"
    );
    // Node ends the property bag with '/', Python does not.
    assert!(
        text[3].split(' ').next().unwrap().ends_with('/'),
        "{text:?}"
    );
    assert!(
        !text[0].split(' ').next().unwrap().ends_with('/'),
        "{text:?}"
    );
    assert!(text[0].contains("k=v%20w"), "{text:?}");
}

#[test]
fn wrong_ca_is_exit_6() {
    let env = SdkEnv::require();
    let ns = NetNs::new();
    let log = work()
        .join(format!("{}.log", ns.name()))
        .display()
        .to_string();
    let _broker = mosquitto(&ns, "open", &log);
    for s in Sdk::ALL {
        let out = ns
            .module(
                &env,
                s,
                Script::ConnectOnly,
                &cs("modA"),
                &work().join("other-ca.pem"),
            )
            .args(["--timeout", "10"])
            .run(Duration::from_secs(20));
        out.assert_exit(sdk::EXIT_TLS);
    }
}

#[test]
fn seq_report_passes_duplicates_and_catches_loss_and_reorder() {
    let v = |xs: &[i64]| {
        xs.iter()
            .map(|s| json!({ "seq": s }))
            .collect::<Vec<Value>>()
    };
    let dup = SeqReport::of(&v(&[0, 1, 1, 2, 3]), 0..4);
    dup.assert_no_loss_no_reorder();
    assert_eq!(dup.duplicates.get(&1), Some(&2));
    let redelivered = SeqReport::of(&v(&[0, 1, 2, 1, 2, 3]), 0..4);
    redelivered.assert_no_loss_no_reorder();
    let lost = SeqReport::of(&v(&[0, 2, 3]), 0..4);
    assert_eq!(lost.missing, vec![1]);
    let swapped = SeqReport::of(&v(&[0, 2, 1, 3]), 0..4);
    assert_eq!(swapped.out_of_order, vec![1]);
    assert!(std::panic::catch_unwind(|| swapped.assert_no_loss_no_reorder()).is_err());
}
