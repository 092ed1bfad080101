//! `edgehub-failover`: runs issue 15's failover scenarios and tabulates their verdicts
//! (tests/failover/README.md). Needs root (network namespaces) and the Python SDK
//! (scripts/install-sdks.sh).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failover::{scenario, summary, Config, Scenario};

#[derive(Parser)]
#[command(
    name = "edgehub-failover",
    about = "edgehub's failover simulation and its verdicts"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs scenarios, writing one verdict JSON per run into --out.
    Run {
        /// Scenarios to run (default: all six).
        #[arg(
            long = "scenario",
            env = "EDGEHUB_FAILOVER_SCENARIOS",
            value_delimiter = ',',
            value_enum
        )]
        scenarios: Vec<Scenario>,
        /// Runs per scenario.
        #[arg(long, env = "EDGEHUB_FAILOVER_RUNS", default_value_t = 3)]
        runs: u32,
        /// Base seed of the random timing; run i of a scenario uses seed + i.
        #[arg(long, env = "EDGEHUB_FAILOVER_SEED", default_value_t = 1)]
        seed: u64,
        /// Where verdicts and logs go.
        #[arg(long, env = "EDGEHUB_FAILOVER_OUT")]
        out: PathBuf,
        /// The edgehub binary the nodes run (e.g. target/release/edgehub).
        #[arg(long, env = "EDGEHUB_FAILOVER_HUB")]
        hub: PathBuf,
        /// Messages in the sender's stream.
        #[arg(long, env = "EDGEHUB_FAILOVER_MESSAGES", default_value_t = 300)]
        messages: u64,
        /// Scenario 5's backlog in MiB of message bodies (the figure: 1024).
        #[arg(long, env = "EDGEHUB_FAILOVER_BACKLOG_MIB", default_value_t = 64)]
        backlog_mib: u64,
        /// The epoch stale-restart restarts A with (default: A's old one). B's epoch plays a
        /// stale pod that re-read a refreshed epoch: a check that the suite catches ping-pong.
        #[arg(long, env = "EDGEHUB_FAILOVER_STALE_EPOCH")]
        stale_epoch: Option<u64>,
    },
    /// Prints the Markdown table of the verdicts in the directories.
    Summary {
        /// Directories of verdicts (e.g. of several long runs with different seeds).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Summary { dirs } => match dirs
            .iter()
            .map(|d| summary::load(d))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(vs) => {
                let vs: Vec<_> = vs.into_iter().flatten().collect();
                print!("{}", summary::table(&vs));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edgehub-failover: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            scenarios,
            runs,
            seed,
            out,
            hub,
            messages,
            backlog_mib,
            stale_epoch,
        } => {
            let scenarios = if scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                scenarios
            };
            if let Err(e) = std::fs::create_dir_all(&out) {
                eprintln!("edgehub-failover: create {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
            let cfg = Config {
                hub_bin: hub,
                out_dir: out,
                messages,
                backlog_bytes: backlog_mib * 1024 * 1024,
                stale_epoch,
            };
            let mut failed = 0;
            for i in 0..runs {
                for &s in &scenarios {
                    let run_seed = seed.wrapping_add(u64::from(i));
                    match scenario::run(&cfg, s, i, run_seed) {
                        Ok(v) => {
                            println!(
                                "{} #{i} seed {run_seed}: targets {} (acked {}, lost {}, reordered {}, stale acks {:?}, first delivery {:?} ms) {}",
                                v.scenario,
                                if v.targets_met { "met" } else { "MISSED" },
                                v.acked,
                                v.acked_but_lost,
                                v.reordered,
                                v.stale_acks,
                                v.b_start_to_first_delivery_ms,
                                v.notes.join("; ")
                            );
                            failed += usize::from(!v.targets_met);
                        }
                        Err(e) => {
                            println!("{} #{i} seed {run_seed}: could not run: {e}", s.name());
                            failed += 1;
                        }
                    }
                }
            }
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
