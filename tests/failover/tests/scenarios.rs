//! CI's pass over the failover simulation (issue 15): every scenario twice, with a fixed base
//! seed (override with EDGEHUB_FAILOVER_SEED to explore other timings), asserting the targets
//! in every run: nothing acknowledged lost, nothing reordered, no stale acknowledgement, no
//! stale reopening, exactly one node serving a double start, every run complete. Timing
//! (B's first delivery < 2 s) is in each verdict and the printed table, never asserted.
//!
//! Needs root (network namespaces) and the Python SDK (scripts/install-sdks.sh). The nodes run
//! `EDGEHUB_FAILOVER_HUB` if set, else the `edgehub` binary of this test's own profile
//! (`cargo test --workspace` builds it for the hub's tests; alone: `cargo build -p hub`).
//! Scenario 5's backlog is 64 MiB here (`EDGEHUB_FAILOVER_BACKLOG_MIB`), 1 GiB in the long run.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Mutex;

use failover::{scenario, summary, Config, Scenario};

/// One scenario at a time: they share two cores with everything else.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const RUNS: u32 = 2;

fn hub_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEHUB_FAILOVER_HUB") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/scenarios-… → target/<profile>/edgehub
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("edgehub");
    assert!(
        bin.is_file(),
        "no {} : build it first (cargo build -p hub) or set EDGEHUB_FAILOVER_HUB",
        bin.display()
    );
    bin
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runs_hold_the_targets(s: Scenario) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::env::temp_dir().join(format!(
        "edgehub-failover-ci-{}-{}",
        std::process::id(),
        s.name()
    ));
    let cfg = Config {
        hub_bin: hub_binary(),
        out_dir: out.clone(),
        messages: env_u64("EDGEHUB_FAILOVER_MESSAGES", 150),
        backlog_bytes: env_u64("EDGEHUB_FAILOVER_BACKLOG_MIB", 64) * 1024 * 1024,
        stale_epoch: None,
    };
    std::fs::create_dir_all(&out).expect("the verdicts' directory");
    let base = env_u64("EDGEHUB_FAILOVER_SEED", 15);
    let mut verdicts = Vec::new();
    for run in 0..RUNS {
        let seed = base.wrapping_add(u64::from(run));
        let v = scenario::run(&cfg, s, run, seed).unwrap_or_else(|e| {
            panic!(
                "{} run {run} (seed {seed}) could not run: {e}; logs in {}",
                s.name(),
                out.display()
            )
        });
        verdicts.push(v);
    }
    let table = summary::table(&verdicts);
    println!("{table}");
    for v in &verdicts {
        assert!(
            v.targets_met,
            "{} run {} (seed {}) missed its targets: {:?}\n{table}\nverdicts and hub logs in {}",
            v.scenario,
            v.run,
            v.seed,
            v.notes,
            out.display()
        );
        // The fields the targets are made of, so a judging bug cannot hide a failure.
        assert!(v.completed && v.acked > 0, "{v:?}");
        assert_eq!(
            (v.acked_but_lost, v.reordered, v.stale_reopenings),
            (0, 0, 0),
            "{v:?}"
        );
        assert_eq!(v.stale_acks.unwrap_or(0), 0, "{v:?}");
        if s == Scenario::DoubleStart {
            assert_eq!(v.serving_nodes, Some(1), "{v:?}");
        }
        if matches!(s, Scenario::Zombie | Scenario::Partition) {
            // A's counters are read unless A exited (a fenced hub is to exit); the module on
            // A's node always reports what A acknowledged.
            assert!(
                v.stale_acks.is_some() || v.a_outcome.starts_with("exited"),
                "A's counters must be read while A runs: {v:?}"
            );
            assert_eq!(v.stale_acks_to_local_module, Some(0), "{v:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn crash() {
    runs_hold_the_targets(Scenario::Crash);
}

#[test]
fn zombie() {
    runs_hold_the_targets(Scenario::Zombie);
}

#[test]
fn partition() {
    runs_hold_the_targets(Scenario::Partition);
}

// Found a hub bug (fixed): the receiver got nothing from the live hub although the sender's
// messages were acknowledged. A hub already fenced, before it noticed, took the receiver's
// SUBSCRIBE and wrote it where the live hub had read its sessions; the Python SDK never
// subscribes again. Pinned in the hub by
// `mqtt::connection::tests::a_hub_fenced_before_it_noticed_acknowledges_no_subscription`.
#[test]
fn double_start() {
    runs_hold_the_targets(Scenario::DoubleStart);
}

#[test]
fn backlog() {
    runs_hold_the_targets(Scenario::Backlog);
}

#[test]
fn stale_restart() {
    runs_hold_the_targets(Scenario::StaleRestart);
}

/// The suite's own check: restarted at B's epoch (what a mounted, refreshed ConfigMap would
/// give a stale pod; the epoch contract forbids it), the stale A opens the volume and fences
/// B. The verdict must say so: a stale reopening, targets missed.
#[test]
fn a_stale_restart_at_the_live_epoch_is_caught() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::env::temp_dir().join(format!(
        "edgehub-failover-ci-{}-pingpong",
        std::process::id()
    ));
    std::fs::create_dir_all(&out).expect("the verdicts' directory");
    let cfg = Config {
        hub_bin: hub_binary(),
        out_dir: out.clone(),
        messages: 150,
        backlog_bytes: 0,
        stale_epoch: Some(scenario::FIRST_EPOCH + 1),
    };
    let seed = env_u64("EDGEHUB_FAILOVER_SEED", 15);
    let v = scenario::run(&cfg, Scenario::StaleRestart, 0, seed).unwrap_or_else(|e| {
        panic!(
            "could not run (seed {seed}): {e}; logs in {}",
            out.display()
        )
    });
    assert!(
        v.stale_reopenings >= 1,
        "the same-epoch restart opened the volume: {v:?}"
    );
    assert!(!v.targets_met, "a reopening misses the targets: {v:?}");
    let _ = std::fs::remove_dir_all(&out);
}
