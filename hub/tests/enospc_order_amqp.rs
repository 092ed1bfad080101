//! A full disk must not reorder one AMQP events link's messages (issue 11, item 5).
//!
//! As `enospc_order.rs`, over AMQP: the hub binary runs in its own network namespace with its
//! data directory on a 2 MiB tmpfs the test mounts. The sender is rhea (the AMQP library under
//! the Node SDK; tests/sdk/node/amqp_probe.js `--mode pipeline`): it sends one large message
//! then seven tiny ones, pipelined on one events link, and the test resends everything not
//! accepted, in order, on a new connection each round. The Node SDK's own `sendOutputEvent`
//! loop (send.js) waits for each settlement before the next send, so it never has two messages
//! in flight and cannot show this; a pipelining AMQP client can. After a few rounds on the full
//! disk the tmpfs grows and the sender finishes; the Python SDK receiver (MQTT) must then see
//! every message, the first occurrence of each in send order.
//!
//! Needs root and the SDKs (`scripts/install-sdks.sh`), as the other SDK tests.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;
#[path = "support/tmpfs.rs"]
mod tmpfs;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sdk::{NetNs, Proc, Script, Sdk, SdkEnv};
use serde_json::Value;
use testhub::TestHub;
use tmpfs::Tmpfs;

/// Messages the sender sends in all.
const TOTAL: u64 = 240;
/// Connections the sender makes while the disk is full before the tmpfs grows.
const FULL_ROUNDS: usize = 8;

/// Modules `sender` and `receiver`; `sender`'s outputs go to `receiver`'s `input1`. The quota is
/// far above the tmpfs (the kernel's ENOSPC comes first) and below one segment, so no segment
/// is preallocated.
const MANIFEST: &str = r#"{"modulesContent": {
  "$edgeAgent": {"properties.desired": {"modules": {"sender": {}, "receiver": {}}}},
  "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
    "routes": {"senderToReceiver": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")"},
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200,
      "storeLimits": {"maxSizeBytes": 33554432}}}}}}"#;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// tests/sdk/node/amqp_probe.js inside `ns`.
fn probe(env: &SdkEnv, ns: &NetNs, cs: &str, ca: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(&env.node);
    cmd.arg(env.scripts.join("node/amqp_probe.js"))
        .args(args)
        .env("EDGEHUB_CS", cs)
        .env("EDGEHUB_CA", ca)
        .env("EDGEHUB_SDK_DIR", &env.dir);
    ns.spawn(&mut cmd)
}

#[test]
fn a_full_disk_never_reorders_one_amqp_links_messages() {
    let env = SdkEnv::require();
    let ns = NetNs::new();
    let hub = TestHub::with_manifest(MANIFEST);
    // 2 MiB: identities, certificates, the store's 1 MiB reserve and under a megabyte of log.
    let Some(tmpfs) = Tmpfs::mount(&hub.data_dir(), "2m") else {
        return;
    };
    let (cs_tx, cs_rx, ca) = (
        hub.connection_string("sender"),
        hub.connection_string("receiver"),
        hub.ca_path(),
    );
    let hub_proc = hub.start(&ns);

    let mut next = 0u64;
    let mut full_rounds = 0;
    let mut round = 0;
    while next < TOTAL {
        let (start, count) = (next.to_string(), (TOTAL - next).to_string());
        let args = [
            "--mode",
            "pipeline",
            "--start-seq",
            &start,
            "--count",
            &count,
            "--timeout",
            "60",
        ];
        let out = probe(&env, &ns, &cs_tx, &ca, &args).finish(secs(90));
        out.assert_exit(sdk::EXIT_OK);
        let report = out
            .events("pipeline")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no pipeline report: {out:?}"));
        let accepted = report["accepted_prefix"].as_u64().unwrap();
        println!("round {round}: from seq {next}: {report}");
        next += accepted;
        round += 1;
        if next < TOTAL {
            full_rounds += 1;
            if full_rounds == FULL_ROUNDS {
                tmpfs.resize("64m");
            }
        }
        assert!(
            round < FULL_ROUNDS + 5,
            "the sender never finished\n{}",
            hub_proc.stderr()
        );
    }
    assert!(
        hub_proc.stderr().contains("disk full: batch refused"),
        "the test meant ENOSPC at commit, and it never happened\n{}",
        hub_proc.stderr()
    );

    let mut rx = ns
        .module(&env, Sdk::Python, Script::Receive, &cs_rx, &ca)
        .args(["--count", "100000", "--timeout", "120", "--no-data"])
        .spawn();
    // The last message is last in the queue: everything stored arrives before it. (Messages
    // may come before the "ready" line: the SDK's handler is set before it connects.)
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut first_order: Vec<u64> = Vec::new();
    let mut delivered: Vec<u64> = Vec::new();
    let last = rx.read_until(secs(60), |v: &Value| {
        let Some(seq) = v.get("seq").and_then(Value::as_u64) else {
            return false;
        };
        delivered.push(seq);
        if seen.insert(seq) {
            first_order.push(seq);
        }
        seen.len() as u64 == TOTAL && seq == TOTAL - 1
    });
    assert!(
        last.is_some(),
        "the receiver got {} distinct of {TOTAL}: {delivered:?}\nhub log:\n{}",
        seen.len(),
        hub_proc.stderr()
    );
    println!("delivered: {delivered:?}");
    assert_eq!(
        first_order,
        (0..TOTAL).collect::<Vec<_>>(),
        "first occurrences out of send order: the queue holds {delivered:?}"
    );
}
