//! Reusable parts of edgehub's benchmark reports.
//!
//! The benches in `benches/benches/` print figures; they never assert on
//! speed. Every figure is shown next to the raw 4 KiB append + `fdatasync`
//! rate of the same disk, measured in the same run, because absolute numbers
//! mean little across machines and volumes (see
//! `shared/reference/peer-brokers-figures.md`).
//!
//! - [`args`]: the command line every bench takes (`--quick`, `--only`, lists) and its mode.
//! - [`env`]: where to put bench data (never tmpfs), the target directory,
//!   the filesystem under a path, machine facts.
//! - [`fsync`]: the raw append + `fdatasync` probe.
//! - [`latency`]: an hdrhistogram recorder and its JSON summary.
//! - [`load`]: a closed-loop driver for N concurrent workers with a warm-up.
//! - [`report`]: aligned text tables, rate / ratio formatting, targets.
//! - [`json`]: writing results to `target/bench-results/`.
//! - [`probe`]: markers and arguments for the strace probe binaries.
//! - [`mqtt`], [`procstat`]: the peers bench's MQTT client and /proc CPU readings.

pub mod args;
pub mod env;
pub mod fsync;
pub mod json;
pub mod latency;
pub mod load;
pub mod mqtt;
pub mod probe;
pub mod procstat;
pub mod report;

/// The error type of every fallible bench helper.
pub type BenchError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, BenchError>`.
pub type BenchResult<T> = Result<T, BenchError>;

/// The exit status of a bench's `main` from its run: success; 1 when some part failed (the
/// report has said which); 2 when the run stopped, with `<bench> bench: <error>` on stderr.
pub fn exit_code(bench: &str, run: BenchResult<bool>) -> std::process::ExitCode {
    match run {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("{bench} bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
