//! The README's "Point an unmodified Azure IoT SDK module at it" steps, run as written.
//!
//! Every block of that section marked `<!-- readme-test: … -->` is taken from README.md
//! literally: `file NAME` blocks are written to NAME, the `hub` block runs in the background,
//! the `shell` block runs to its end. The only change is the `cargo run --release -p hub --`
//! prefix, replaced by this build's binary. They run with `bash -e` in a temporary directory,
//! inside a network namespace of the test's own (the SDK dials port 8883), with the SDK
//! venv's `python3` first on PATH (the README's `pip install`). A receiver module (the SDK
//! harness) checks that the message the README's module sent arrived where the README's
//! manifest routes it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[path = "support/sdk.rs"]
mod sdk;

/// What the README runs the binary with; replaced by this build's binary.
const PREFIX: &str = "cargo run --release -p hub --";
/// The README section under test.
const SECTION: &str = "### Point an unmodified Azure IoT SDK module at it";
/// What the hub logs once every listener is bound.
const READY_LINE: &str = "edgehub ready";
/// Failure bounds for a loaded machine, never what a passing test waits for.
const WITHIN: Duration = Duration::from_secs(60);

/// A fenced block after a `<!-- readme-test: MARKER -->` line.
#[derive(Debug)]
struct Block {
    marker: String,
    text: String,
}

/// The marked blocks of `section` (up to the next heading of the same or a higher level).
fn marked_blocks(readme: &str, section: &str) -> Vec<Block> {
    let start = readme
        .find(section)
        .unwrap_or_else(|| panic!("README has no section {section:?}"));
    let body = &readme[start + section.len()..];
    let end = body
        .find("\n## ")
        .into_iter()
        .chain(body.find("\n### "))
        .min();
    let body = &body[..end.unwrap_or(body.len())];
    let mut blocks = Vec::new();
    let mut lines = body.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|m| m.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "a fenced block must follow <!-- readme-test:{marker}-->, found {fence:?}"
        );
        let mut text = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            text.push_str(l);
            text.push('\n');
        }
        blocks.push(Block {
            marker: marker.trim().to_owned(),
            text,
        });
    }
    blocks
}

fn block<'a>(blocks: &'a [Block], marker: &str) -> &'a str {
    &blocks
        .iter()
        .find(|b| b.marker == marker)
        .unwrap_or_else(|| panic!("no <!-- readme-test: {marker} --> block in {blocks:?}"))
        .text
}

/// A shell block with the binary in place of `cargo run`.
fn literal(text: &str) -> String {
    assert!(
        text.contains(PREFIX),
        "the block runs no edgehub command: {text}"
    );
    text.replace(PREFIX, env!("CARGO_BIN_EXE_edgehub"))
}

/// `bash -ec SCRIPT` in `dir` with the SDK's python first on PATH, no `EDGEHUB_*` variables.
fn bash(ns: &sdk::NetNs, env: &sdk::SdkEnv, dir: &Path, script: &str) -> Command {
    let venv_bin = env.python.parent().expect("venv bin");
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = ns.command("bash");
    c.args(["-ec", script])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EDGEHUB_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn the_readme_steps_connect_an_unmodified_module_when_copied_as_written() {
    let env = sdk::SdkEnv::require();
    let ns = sdk::NetNs::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let blocks = marked_blocks(&readme, SECTION);
    for b in &blocks {
        if let Some(name) = b.marker.strip_prefix("file ") {
            std::fs::write(dir.path().join(name), &b.text).expect("write a README file");
        }
    }
    assert!(dir.path().join("my-deployment.json").exists(), "{blocks:?}");

    // The hub, as the README starts it.
    let hub_script = literal(block(&blocks, "hub"));
    let mut hub = ns.spawn(&mut bash(&ns, &env, dir.path(), &hub_script));
    let ready = hub.wait_stderr(WITHIN, |log| {
        log.contains(READY_LINE) || log.lines().any(|l| l.starts_with("error: "))
    });
    assert!(
        ready && hub.stderr().contains(READY_LINE),
        "the README's hub did not start:\n{}",
        hub.stderr()
    );

    // A receiver where the README's manifest routes the module's output (the test's own).
    let data = dir.path().join("edgehub-data");
    let out = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["connection-string", "dashboard", "--data-dir"])
        .arg(&data)
        .output()
        .expect("connection-string dashboard");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard_cs = String::from_utf8(out.stdout).expect("utf-8");
    let mut rx = ns
        .module(
            &env,
            sdk::Sdk::Python,
            sdk::Script::Receive,
            dashboard_cs.trim(),
            &data.join("tls/ca.pem"),
        )
        .args(["--count", "1", "--timeout", "120"])
        .spawn();
    rx.expect_event("ready", WITHIN);

    // The README's commands and module.
    let shell = literal(block(&blocks, "shell"));
    let out = bash(&ns, &env, dir.path(), &shell)
        .output()
        .expect("run the README's shell block");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "the README's commands failed:\n{stdout}\n{stderr}\nhub:\n{}",
        hub.stderr()
    );
    assert!(
        stdout
            .contains("HostName=my-hub.azure-devices.net;DeviceId=my-edge-device;ModuleId=sensor;")
            && stdout.contains("GatewayHostName=localhost"),
        "the printed connection string: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l == "sent"),
        "the module's send was not acknowledged: {stdout}\n{stderr}"
    );

    let got = rx.data_lines(1, WITHIN);
    let m = &got[0];
    assert_eq!(m["input_name"], "readings", "{m}");
    assert_eq!(m["connection_module_id"], "sensor", "{m}");
    assert_eq!(m["connection_device_id"], "my-edge-device", "{m}");
    assert_eq!(m["data"], "{\"temperature\": 21}", "{m}");
    hub.terminate(Duration::from_secs(30));
}

#[test]
fn the_marked_blocks_are_found() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let markers: Vec<String> = marked_blocks(&readme, SECTION)
        .into_iter()
        .map(|b| b.marker)
        .collect();
    assert_eq!(
        markers,
        ["file my-deployment.json", "hub", "shell", "file sensor.py"]
    );
}

/// The package directory of a `-p NAME` in the README's feature table.
fn package_dir(root: &Path, package: &str) -> std::path::PathBuf {
    match package {
        "failover" => root.join("tests/failover"),
        other => root.join(other),
    }
}

/// Every `cargo test -p P --test T` in "What it does, and the test that proves it" names a
/// test file of P that exists, so the table cannot point at a renamed or removed test.
#[test]
fn every_command_in_the_feature_table_names_a_test_that_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find("## What it does, and the test that proves it")
        .expect("the feature table section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut checked = 0;
    for command in section
        .split('`')
        .filter(|c| c.starts_with("cargo test -p "))
    {
        let words: Vec<&str> = command.split_whitespace().collect();
        let package = words[3];
        let dir = package_dir(&root, package);
        assert!(
            dir.join("Cargo.toml").is_file(),
            "{command}: no package {package}"
        );
        for pair in words.windows(2) {
            if pair[0] == "--test" {
                let file = dir.join("tests").join(format!("{}.rs", pair[1]));
                assert!(
                    file.is_file(),
                    "{command}: {} does not exist",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 15,
        "only {checked} test files named in the feature table"
    );
}
