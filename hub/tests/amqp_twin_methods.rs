//! The AMQP twin and method links (issue 16) against raw AMQP (rhea, under the Node SDK:
//! tests/sdk/node/amqp_probe.js `--mode twin`), for what the SDK itself never does: attach
//! another module's twin or method links, send a reported patch that is not JSON or too large.
//!
//! Each test runs its own hub in its own network namespace (tests/sdk/README.md); they need
//! root and the SDKs (`scripts/install-sdks.sh`), and fail without them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/sdk_hub.rs"]
mod sdk_hub;
#[path = "support/hub.rs"]
mod testhub;

use sdk::{Script, Sdk};
use sdk_hub::{secs, SdkHub};
use serde_json::{json, Value};
use testhub::{TestHub, DEVICE_ID, GATEWAY};

/// amqp_probe.js as `module` with `args`, run to its end; it must exit 0.
fn probe(hub: &SdkHub, module: &str, args: &[&str]) -> sdk::Outcome {
    let out = hub.amqp_probe(module, args).finish(secs(90));
    assert_eq!(
        out.code,
        Some(sdk::EXIT_OK),
        "probe {args:?}: {:?}\nstderr:\n{}\nhub log:\n{}",
        out.lines,
        out.stderr,
        hub.log()
    );
    out
}

fn event(out: &sdk::Outcome, name: &str) -> Value {
    out.events(name)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {name:?} event: {out:?}"))
}

fn reply(out: &sdk::Outcome, what: &str) -> Value {
    out.events("twin-reply")
        .into_iter()
        .find(|e| e["what"] == what)
        .unwrap_or_else(|| panic!("no twin reply to {what:?}: {out:?}"))
}

/// `sender` tries `receiver`'s twin and method links (each side): all refused with
/// `amqp:unauthorized-access`, nothing arrives on them, `receiver` never becomes reachable for
/// methods through them, and `receiver`'s twin is untouched; `sender`'s own twin links work on
/// the same connection.
#[test]
fn another_modules_twin_and_method_links_are_refused_and_nothing_leaks() {
    let hub = SdkHub::start(TestHub::new(), &["sender", "receiver"]);
    for sasl in ["none", "plain"] {
        let out = probe(
            &hub,
            "sender",
            &[
                "--mode",
                "twin",
                "--sasl",
                sasl,
                "--other",
                "receiver",
                "--timeout",
                "60",
            ],
        );
        for side in [
            "other-twin-sender",
            "other-twin-receiver",
            "other-methods-sender",
            "other-methods-receiver",
        ] {
            let e = event(&out, side);
            assert_eq!(e["result"], "refused", "sasl {sasl}, {side}: {e}");
            assert_eq!(
                e["condition"], "amqp:unauthorized-access",
                "sasl {sasl}, {side}: {e}"
            );
        }
        assert_eq!(event(&out, "leaked")["messages"], 0, "sasl {sasl}");
        assert_eq!(reply(&out, "get")["status"], 200, "sasl {sasl}");
    }
    assert!(
        hub.log_lines("method request link attached").is_empty(),
        "{}",
        hub.log()
    );
    // receiver's twin: never opened, so never written.
    let twin_files: Vec<String> = std::fs::read_dir(hub.data_dir().join("twins"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let receiver_stem: String = "receiver".bytes().map(|b| format!("{b:02x}")).collect();
    assert!(
        twin_files.iter().all(|f| !f.starts_with(&receiver_stem)),
        "{twin_files:?}"
    );
}

/// A reported patch that is not JSON is answered 400, one over 32 KiB 413, each with a
/// `{"status", "message"}` body saying why, and neither changes the twin: the good patch after
/// them is version 2, and the GET shows only it.
#[test]
fn a_malformed_or_oversized_reported_patch_gets_an_error_status_and_changes_nothing() {
    let hub = SdkHub::start(TestHub::new(), &["sender"]);
    let out = probe(
        &hub,
        "sender",
        &["--mode", "twin", "--sasl", "none", "--timeout", "60"],
    );
    for (what, status) in [("malformed", 400), ("oversized", 413)] {
        let r = reply(&out, what);
        assert_eq!(r["status"], status, "{r}");
        assert_eq!(r["body"]["status"], status, "{r}");
        assert!(
            r["body"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{r}"
        );
        assert_eq!(r["version"], Value::Null, "{r}");
    }
    let good = reply(&out, "good");
    assert_eq!(
        (&good["status"], &good["version"]),
        (&json!(204), &json!(2))
    );
    let get = reply(&out, "get");
    assert_eq!(get["status"], 200);
    assert_eq!(get["body"]["reported"], json!({"ok": true, "$version": 2}));
}

/// A method request link closed while another one of the same module and connection is
/// attached leaves the module reachable through the other: an `invoke_method` (connect timeout
/// 0: no waiting for a target) reaches it and gets its answer.
#[test]
fn closing_one_of_two_method_links_keeps_the_module_reachable_through_the_other() {
    let hub = SdkHub::start(
        TestHub::new().run_args(&["--methods-addr", &format!("{GATEWAY}:443")]),
        &["receiver"],
    );
    let mut target = hub.amqp_probe(
        "receiver",
        &[
            "--mode",
            "methods-reattach",
            "--sasl",
            "none",
            "--count",
            "1",
            "--timeout",
            "60",
        ],
    );
    target.expect_event("ready", secs(60));
    let out = hub
        .edge_module(Sdk::Python, Script::Method, "sender")
        .args(["invoke", "--device", DEVICE_ID, "--module", "receiver"])
        .args(["--method", "ping", "--payload", "1", "--timeout", "60"])
        .run(secs(90));
    assert_eq!(
        out.code,
        Some(sdk::EXIT_OK),
        "invoke_method: {}\nhub log:\n{}",
        out.stderr,
        hub.log()
    );
    let result = out.data().into_iter().next().expect("a result line");
    assert_eq!(
        result,
        json!({"ok": true, "response": {"status": 200, "payload": {"via": "second"}}, "ms": result["ms"]}),
        "{result}\nhub log:\n{}",
        hub.log()
    );
    let done = target.finish(secs(30));
    assert_eq!(done.code, Some(sdk::EXIT_OK), "{}", done.stderr);
    assert!(done.events("request-on-first").is_empty());
}
