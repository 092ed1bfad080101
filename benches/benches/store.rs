//! Store append figures: `cargo bench -p benches --bench store [-- --quick]`.
//!
//! A report, never a timed test: it prints figures and ratios and asserts
//! nothing about speed. In one run it measures
//!
//! 1. the raw 4 KiB append + `fdatasync` rate of the disk under the bench
//!    directory (at the start and again at the end);
//! 2. 256-byte durable appends to our store from 1, 8 and 64 concurrent
//!    appenders, as OS threads (`store`) and as tokio tasks (`store-async`,
//!    how the hub's connections run): appends/s, messages per `fdatasync`,
//!    p50/p99 latency;
//! 3. the same workload against sled 0.34.7 (insert under an increasing key,
//!    then `flush()`, before the append counts as acknowledged);
//! 4. the time to reopen a ~1 GiB log after `kill -9` of the process that
//!    wrote it (skipped under `--quick`),
//!
//! and prints them as tables with ratios (÷ raw `fdatasync`, store ÷ sled)
//! next to the targets, then writes the raw results to
//! `target/bench-results/store.json`.
//!
//! Options (after `--`): `--quick` (1 s per point, no reopen), `--only
//! raw,store,async,sled,reopen`, `--appenders 1,8,64`. Environment:
//! `EDGEHUB_BENCH_DIR` (where data goes; default `target/bench-tmp`, never
//! `/tmp`), `EDGEHUB_BENCH_SECS` (seconds per point),
//! `EDGEHUB_BENCH_REOPEN_MIB` (log size for the reopen, default 1024),
//! `EDGEHUB_BENCH_DROP_CACHES=1` (drop the page cache before the reopen;
//! needs root).
//!
//! Run without `--bench` (as `cargo test --benches` does) it only smoke-tests
//! itself for a fraction of a second per point and writes no JSON.

use benches::args::{Args, Mode, Only};
use benches::env::{self, FsInfo, Machine};
use benches::fsync::{RawFsync, RawSamples};
use benches::latency::LatencySummary;
use benches::load::{self, LoadSpec};
use benches::report::{self, Table, Target};
use benches::{json, BenchResult};
use serde::Serialize;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Set in the environment of the re-executed child that fills the log.
const CHILD_ENV: &str = "EDGEHUB_BENCH_CHILD";
const REOPEN_MIB_ENV: &str = "EDGEHUB_BENCH_REOPEN_MIB";
const SLED_VERSION: &str = "0.34.7";

/// Targets from issue 2, shown next to the figures.
const TARGET_X_RAW_64: f64 = 30.0;
const TARGET_P99_US: f64 = 5_000.0;
const TARGET_REOPEN_US: f64 = 2_000_000.0;

#[derive(Debug, Clone)]
struct Config {
    /// Full: ~5 s per point, reopen included; quick: ~1 s per point, no reopen.
    mode: Mode,
    warmup: Duration,
    point: Duration,
    /// Length of each raw fdatasync sample (one before the first group of
    /// points and one after each group).
    raw: Duration,
    appenders: Vec<usize>,
    payload: usize,
    reopen_mib: u64,
    only: Only,
}

impl Config {
    fn from_args() -> BenchResult<Config> {
        let args = Args::from_env("store", &["--appenders"]);
        let only = args.only("raw,store,sled,reopen")?;
        let mut appenders = args
            .list("--appenders", "e.g. 1,8,64")?
            .unwrap_or_else(|| vec![1, 8, 64]);
        let mode = args.mode();
        let (warmup, mut point, raw) = match mode {
            Mode::Full => (
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(3),
            ),
            Mode::Quick => (
                Duration::from_millis(250),
                Duration::from_secs(1),
                Duration::from_millis(500),
            ),
            Mode::Smoke => (
                Duration::from_millis(50),
                Duration::from_millis(200),
                Duration::from_millis(100),
            ),
        };
        if let Some(p) = env::point_from_env()? {
            point = p;
        }
        if mode == Mode::Smoke && !only.is_given() {
            appenders.retain(|&n| n <= 8);
        }
        Ok(Config {
            mode,
            warmup,
            point,
            raw,
            appenders,
            payload: 256,
            reopen_mib: env::parsed(REOPEN_MIB_ENV)?.unwrap_or(1024),
            only,
        })
    }
}

/// One (system, appenders) measurement.
#[derive(Debug, Clone, Serialize)]
struct Point {
    system: &'static str,
    appenders: usize,
    payload_bytes: usize,
    /// Appends acknowledged inside the measured window.
    acked: u64,
    secs: f64,
    appends_per_s: f64,
    /// `fdatasync` calls the store reports for the window (None for sled).
    fdatasyncs: Option<u64>,
    msgs_per_fdatasync: Option<f64>,
    latency: LatencySummary,
    /// Mean of the raw fdatasync samples taken just before and just after
    /// this point's group (so disk drift during the run is accounted for).
    raw_ref_per_s: Option<f64>,
    /// `appends_per_s` ÷ `raw_ref_per_s`.
    x_raw_fdatasync: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum Reopen {
    Skipped { reason: String },
    Measured(ReopenFigures),
    Failed { error: String },
}

#[derive(Debug, Clone, Serialize)]
struct ReopenFigures {
    target_mib: u64,
    log_bytes: u64,
    /// Appends the killed child had seen acknowledged before it said ready.
    child_acked: u64,
    fill_secs: f64,
    /// Whether the page cache was dropped before the timed open.
    page_cache: &'static str,
    /// `Store::open` after SIGKILL of the writer.
    open_after_kill9_ms: f64,
    /// `Store::open` again after a clean close, for comparison.
    open_after_close_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    bench: &'static str,
    schema: u32,
    mode: Mode,
    machine: Machine,
    bench_dir: String,
    filesystem: Option<FsInfo>,
    sled_version: &'static str,
    payload_bytes: usize,
    warmup_secs: f64,
    point_secs: f64,
    raw_secs: f64,
    raw_fdatasync: Vec<RawFsync>,
    /// Mean of all raw samples (each point uses its neighbours: `raw_ref_per_s`).
    raw_fdatasync_ref_per_s: Option<f64>,
    /// 1-minute load average when the run ended (`machine.loadavg_1m`: started).
    /// Informational only: the bench's own 64 appender threads raise it.
    loadavg_end: Option<f64>,
    /// Reasons to distrust this run's figures (a busy machine, a drifting disk).
    warnings: Vec<String>,
    points: Vec<Point>,
    reopen: Reopen,
    targets: Vec<Target>,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        let code = match child_main() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("store bench child: {e}");
                1
            }
        };
        std::process::exit(code);
    }
    benches::exit_code("store", run())
}

/// Runs the report; `Ok(false)` when some part failed (after printing all).
fn run() -> BenchResult<bool> {
    let cfg = Config::from_args()?;
    let (root, fs) = env::open_bench_dir("store", cfg.mode, cfg.point, cfg.warmup)?;
    let machine = Machine::read();
    let mut errors = Vec::new();
    let mut raw = RawSamples::new(root.path(), cfg.warmup, cfg.raw, cfg.only.wants("raw"));
    let mut points = Vec::new();

    raw.take("start", &mut errors);
    for &n in &cfg.appenders {
        let first = points.len();
        if cfg.only.wants("store") {
            match store_point(&cfg, root.path(), n) {
                Ok(p) => points.push(p),
                Err(e) => errors.push(format!("store, {n} appenders: {e}")),
            }
        }
        if cfg.only.wants("async") {
            match store_point_async(&cfg, root.path(), n) {
                Ok(p) => points.push(p),
                Err(e) => errors.push(format!("store-async, {n} appenders: {e}")),
            }
        }
        if cfg.only.wants("sled") {
            match sled_point(&cfg, root.path(), n) {
                Ok(p) => points.push(p),
                Err(e) => errors.push(format!("sled, {n} appenders: {e}")),
            }
        }
        let reference = raw.after_group(&format!("after {n} appenders"), &mut errors);
        for p in &mut points[first..] {
            p.raw_ref_per_s = reference;
            p.x_raw_fdatasync = reference.map(|r| report::div(p.appends_per_s, r));
        }
    }
    let raw = raw.into_vec();
    let reopen = if !cfg.only.wants("reopen") {
        Reopen::Skipped {
            reason: "not selected by --only".into(),
        }
    } else if cfg.mode != Mode::Full {
        Reopen::Skipped {
            reason: format!(
                "skipped under {}: it writes {} MiB; run `cargo bench -p benches --bench store`",
                if cfg.mode == Mode::Quick {
                    "--quick"
                } else {
                    "the smoke run"
                },
                cfg.reopen_mib
            ),
        }
    } else {
        match reopen_after_kill9(&cfg, root.path()) {
            Ok(r) => Reopen::Measured(r),
            Err(e) => {
                errors.push(format!("reopen after kill -9: {e}"));
                Reopen::Failed {
                    error: e.to_string(),
                }
            }
        }
    };

    let raw_ref = report::mean(&raw.iter().map(|r| r.rate_per_s).collect::<Vec<_>>());
    let loadavg_end = env::loadavg();
    let warnings = warnings(&machine, &raw);
    let targets = targets(&cfg, &points, &reopen);
    let results = Results {
        bench: "store",
        schema: 1,
        mode: cfg.mode,
        machine,
        bench_dir: root.path().display().to_string(),
        filesystem: fs,
        sled_version: SLED_VERSION,
        payload_bytes: cfg.payload,
        warmup_secs: cfg.warmup.as_secs_f64(),
        point_secs: cfg.point.as_secs_f64(),
        raw_secs: cfg.raw.as_secs_f64(),
        loadavg_end,
        warnings,
        raw_fdatasync: raw,
        raw_fdatasync_ref_per_s: raw_ref,
        points,
        reopen,
        targets,
        errors,
    };
    print_report(&results);
    json::save("store", results.mode, &results)?;
    Ok(results.errors.is_empty())
}

/// Says when the figures of this run should not be trusted as they stand.
fn warnings(machine: &Machine, raw: &[RawFsync]) -> Vec<String> {
    let busy = report::busy_warning(machine, "before the run started", machine.cpu_busy);
    busy.into_iter().chain(report::drift_warning(raw)).collect()
}

fn spec(cfg: &Config, threads: usize) -> LoadSpec {
    LoadSpec {
        threads,
        warmup: cfg.warmup,
        measure: cfg.point,
    }
}

fn log_point(p: &Point) {
    eprintln!(
        "  {:<5} {:>2} appenders: {}  p50 {}  p99 {}{}",
        p.system,
        p.appenders,
        report::rate(p.appends_per_s),
        report::micros(p.latency.p50_us),
        report::micros(p.latency.p99_us),
        p.msgs_per_fdatasync
            .map_or(String::new(), |m| format!("  {m:.1} msgs/fdatasync")),
    );
}

/// sled 0.34.7: insert a 256-byte value under an increasing key, then
/// `flush()`; only then does the append count as acknowledged.
fn sled_point(cfg: &Config, root: &Path, threads: usize) -> BenchResult<Point> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("sled-{threads}-"))
        .tempdir_in(root)?;
    let db = sled::Config::new().path(dir.path()).open()?;
    let next_key = Arc::new(AtomicU64::new(0));
    let value = sled::IVec::from(vec![0x5au8; cfg.payload]);
    let out = load::closed_loop(
        &spec(cfg, threads),
        |_| {
            let (db, next_key, value) = (db.clone(), next_key.clone(), value.clone());
            Ok(move || -> sled::Result<()> {
                let key = next_key.fetch_add(1, Ordering::Relaxed).to_be_bytes();
                db.insert(key, value.clone())?;
                db.flush()?;
                Ok(())
            })
        },
        |_| Ok(()),
    )?;
    drop(db);
    let p = Point {
        system: "sled",
        appenders: threads,
        payload_bytes: cfg.payload,
        acked: out.ops,
        secs: out.elapsed.as_secs_f64(),
        appends_per_s: out.rate(),
        fdatasyncs: None,
        msgs_per_fdatasync: None,
        latency: out.latency.summary(),
        raw_ref_per_s: None,
        x_raw_fdatasync: None,
    };
    log_point(&p);
    Ok(p)
}

#[cfg(feature = "store")]
mod our_store {
    //! The parts that need the `store` crate.

    use super::*;
    use benches::load::Window;
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;
    use store::{Epoch, QueueName, Store, StoreOptions};

    const CHILD_DIR_ENV: &str = "EDGEHUB_BENCH_CHILD_DIR";
    const DROP_CACHES_ENV: &str = "EDGEHUB_BENCH_DROP_CACHES";

    pub(super) fn options(epoch: u64) -> StoreOptions {
        StoreOptions {
            epoch: Epoch::new(epoch),
            ..StoreOptions::default()
        }
    }

    /// N threads, each `append(..).wait()` in a loop on one shared store.
    pub(super) fn point(cfg: &Config, root: &Path, threads: usize) -> BenchResult<Point> {
        measure(cfg, root, threads, false)
    }

    /// N async tasks on a two-thread tokio runtime (as the hub's connections run), each
    /// `append(..).await` in a loop on one shared store.
    pub(super) fn point_async(cfg: &Config, root: &Path, tasks: usize) -> BenchResult<Point> {
        measure(cfg, root, tasks, true)
    }

    fn measure(cfg: &Config, root: &Path, n: usize, tasks: bool) -> BenchResult<Point> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("store-{n}-"))
            .tempdir_in(root)?;
        let store = Store::open(dir.path(), options(1))?;
        let queue = QueueName::new("bench")?;
        let body = bytes::Bytes::from(vec![0x5au8; cfg.payload]);
        let mut before = None;
        let mut after = None;
        let hook = |w| {
            let s = store.stats();
            match w {
                Window::Open => before = Some(s),
                Window::Close => after = Some(s),
            }
            Ok(())
        };
        let out = if tasks {
            load::closed_loop_async(
                &spec(cfg, n),
                |_| {
                    let (store, queues, body) = (store.clone(), [queue.clone()], body.clone());
                    Ok(move || {
                        let pending = store.append(&queues, body.clone(), None);
                        async move { pending.await.map(drop) }
                    })
                },
                hook,
            )?
        } else {
            load::closed_loop(
                &spec(cfg, n),
                |_| {
                    let (store, queues, body) = (store.clone(), [queue.clone()], body.clone());
                    Ok(move || store.append(&queues, body.clone(), None).wait().map(drop))
                },
                hook,
            )?
        };
        let threads = n;
        store.close()?;
        let fdatasyncs = match (before, after) {
            (Some(b), Some(a)) => Some(a.syncs.saturating_sub(b.syncs)),
            _ => None,
        };
        let p = Point {
            system: if tasks { "store-async" } else { "store" },
            appenders: threads,
            payload_bytes: cfg.payload,
            acked: out.ops,
            secs: out.elapsed.as_secs_f64(),
            appends_per_s: out.rate(),
            fdatasyncs,
            msgs_per_fdatasync: fdatasyncs.map(|s| report::div(out.ops as f64, s as f64)),
            latency: out.latency.summary(),
            raw_ref_per_s: None,
            x_raw_fdatasync: None,
        };
        log_point(&p);
        Ok(p)
    }

    /// Kills (SIGKILL) and reaps the child when dropped.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Re-executes this binary as a child that fills a log to the target
    /// size and waits; SIGKILLs it; times `Store::open` on what it left.
    pub(super) fn reopen_after_kill9(cfg: &Config, root: &Path) -> BenchResult<ReopenFigures> {
        let dir = root.join("reopen");
        std::fs::create_dir_all(&dir)?;
        let started = Instant::now();
        let child = Command::new(std::env::current_exe()?)
            .env(CHILD_ENV, "reopen-fill")
            .env(CHILD_DIR_ENV, &dir)
            .env(REOPEN_MIB_ENV, cfg.reopen_mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().ok_or("child has no stdout")?;
        let mut ready = None;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("progress"), Some(bytes), _) => {
                    let bytes: u64 = bytes.parse().unwrap_or(0);
                    eprint!(
                        "\r  filling a {} MiB log: {}   ",
                        cfg.reopen_mib,
                        report::bytes(bytes)
                    );
                }
                (Some("ready"), Some(bytes), Some(acked)) => {
                    ready = Some((bytes.parse::<u64>()?, acked.parse::<u64>()?));
                    break;
                }
                _ => eprintln!("  child: {line}"),
            }
        }
        eprintln!();
        let Some((log_bytes, child_acked)) = ready else {
            let status = child.0.wait()?;
            return Err(format!("the fill child exited before it was ready: {status}").into());
        };
        let fill_secs = started.elapsed().as_secs_f64();
        // SIGKILL while the store is open, its writer thread alive.
        child.0.kill()?;
        let status = child.0.wait()?;
        eprintln!("  killed the writer ({status}) after {fill_secs:.1} s");

        let page_cache = if std::env::var_os(DROP_CACHES_ENV).is_some_and(|v| v == "1") {
            drop_page_cache()?;
            "dropped"
        } else {
            "warm"
        };
        let t0 = Instant::now();
        let store = Store::open(&dir, options(2))?;
        let open_after_kill9 = t0.elapsed();
        // The recovered store must take appends again.
        store
            .append(
                &[QueueName::new("bench")?],
                bytes::Bytes::from_static(b"after"),
                None,
            )
            .wait()?;
        store.close()?;
        let t1 = Instant::now();
        let store = Store::open(&dir, options(3))?;
        let open_after_close = t1.elapsed();
        store.close()?;
        let r = ReopenFigures {
            target_mib: cfg.reopen_mib,
            log_bytes,
            child_acked,
            fill_secs,
            page_cache,
            open_after_kill9_ms: open_after_kill9.as_secs_f64() * 1e3,
            open_after_close_ms: open_after_close.as_secs_f64() * 1e3,
        };
        eprintln!(
            "  reopen of {} after kill -9: {:.0} ms (after a clean close: {:.0} ms)",
            report::bytes(log_bytes),
            r.open_after_kill9_ms,
            r.open_after_close_ms
        );
        Ok(r)
    }

    fn drop_page_cache() -> BenchResult<()> {
        // `sync` first so that dirty pages can be dropped too.
        let status = Command::new("sync").status()?;
        if !status.success() {
            return Err(format!("sync: {status}").into());
        }
        std::fs::write("/proc/sys/vm/drop_caches", b"3\n")
            .map_err(|e| format!("dropping the page cache (needs root): {e}"))?;
        Ok(())
    }

    /// The child: append from 8 threads, each keeping up to 64 appends in
    /// flight, until the log directory holds the target size; then report
    /// `ready <bytes> <acked>` and wait, store open, to be killed.
    pub(super) fn child_main() -> BenchResult<()> {
        const THREADS: usize = 8;
        const IN_FLIGHT: usize = 64;
        let dir = std::env::var_os(CHILD_DIR_ENV).ok_or("no child dir")?;
        let dir = Path::new(&dir);
        let target = env::parsed::<u64>(REOPEN_MIB_ENV)?.unwrap_or(1024) << 20;
        let store = Store::open(dir, options(1))?;
        let queue = QueueName::new("bench")?;
        let body = bytes::Bytes::from(vec![0x5au8; 256]);
        let stop = AtomicBool::new(false);
        let acked = AtomicU64::new(0);
        let mut stdout = std::io::stdout().lock();
        std::thread::scope(|scope| -> BenchResult<()> {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (store, queues, body) = (store.clone(), [queue.clone()], body.clone());
                    let (stop, acked) = (&stop, &acked);
                    scope.spawn(move || -> Result<(), String> {
                        let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
                        while !stop.load(Ordering::Relaxed) {
                            in_flight.push_back(store.append(&queues, body.clone(), None));
                            if in_flight.len() >= IN_FLIGHT {
                                if let Some(p) = in_flight.pop_front() {
                                    p.wait().map_err(|e| e.to_string())?;
                                    acked.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        for p in in_flight {
                            p.wait().map_err(|e| e.to_string())?;
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if workers.iter().any(|w| w.is_finished()) {
                    stop.store(true, Ordering::Relaxed);
                }
                // A segment may vanish mid-walk; skip that sample.
                if let Ok(size) = env::dir_size(dir) {
                    writeln!(stdout, "progress {size}")?;
                    stdout.flush()?;
                    if size >= target {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            for w in workers {
                w.join().map_err(|_| "a fill worker panicked")??;
            }
            Ok(())
        })?;
        writeln!(
            stdout,
            "ready {} {}",
            env::dir_size(dir)?,
            acked.load(Ordering::Relaxed)
        )?;
        stdout.flush()?;
        // Hold the store open until the parent kills us.
        loop {
            std::thread::park();
        }
    }
}

#[cfg(feature = "store")]
use our_store::{
    child_main, point as store_point, point_async as store_point_async, reopen_after_kill9,
};

#[cfg(not(feature = "store"))]
const NO_STORE: &str = "built without the `store` feature";

#[cfg(not(feature = "store"))]
fn store_point(_: &Config, _: &Path, _: usize) -> BenchResult<Point> {
    Err(NO_STORE.into())
}

#[cfg(not(feature = "store"))]
fn store_point_async(_: &Config, _: &Path, _: usize) -> BenchResult<Point> {
    Err(NO_STORE.into())
}

#[cfg(not(feature = "store"))]
fn reopen_after_kill9(_: &Config, _: &Path) -> BenchResult<ReopenFigures> {
    Err(NO_STORE.into())
}

#[cfg(not(feature = "store"))]
fn child_main() -> BenchResult<()> {
    Err(NO_STORE.into())
}

fn find<'a>(points: &'a [Point], system: &str, appenders: usize) -> Option<&'a Point> {
    points
        .iter()
        .find(|p| p.system == system && p.appenders == appenders)
}

fn targets(cfg: &Config, points: &[Point], reopen: &Reopen) -> Vec<Target> {
    let mut out = Vec::new();
    for system in ["store-async", "store"] {
        out.push(Target::at_least(
            &format!("{system}, 64 appenders ÷ raw fdatasync"),
            TARGET_X_RAW_64,
            find(points, system, 64).and_then(|p| p.x_raw_fdatasync),
            report::ratio,
        ));
    }
    for system in ["store-async", "store"] {
        for &n in &cfg.appenders {
            out.push(Target::at_most(
                &format!("{system} p99 append latency, {n} appenders"),
                TARGET_P99_US,
                find(points, system, n).map(|p| p.latency.p99_us),
                report::micros,
            ));
        }
    }
    let reopen_us = match reopen {
        Reopen::Measured(r) => Some(r.open_after_kill9_ms * 1e3),
        _ => None,
    };
    out.push(Target::at_most(
        &format!("reopen of a {} MiB log after kill -9", cfg.reopen_mib),
        TARGET_REOPEN_US,
        reopen_us,
        report::micros,
    ));
    out
}

fn print_report(r: &Results) {
    println!();
    println!(
        "edgehub store bench ({:?} mode, {} s per point, {}-byte appends, {} CPUs)",
        r.mode, r.point_secs, r.payload_bytes, r.machine.cpus
    );
    report::print_opening(
        &r.bench_dir,
        r.filesystem.as_ref(),
        &r.raw_fdatasync,
        r.raw_fdatasync_ref_per_s,
    );

    let mut t = Table::new(
        format!(
            "Durable {}-byte appends, N concurrent appenders",
            r.payload_bytes
        ),
        &[
            "appenders",
            "system",
            "appends/s",
            "÷ raw fdatasync",
            "msgs/fdatasync",
            "p50",
            "p99",
            "store ÷ sled",
        ],
    );
    let mut ns: Vec<usize> = r.points.iter().map(|p| p.appenders).collect();
    ns.dedup();
    for n in ns {
        for p in r.points.iter().filter(|p| p.appenders == n) {
            let vs_sled = match (p.system, find(&r.points, "sled", n)) {
                ("store", Some(s)) => report::ratio(report::div(p.appends_per_s, s.appends_per_s)),
                _ => String::new(),
            };
            t.row([
                n.to_string(),
                p.system.to_string(),
                report::rate(p.appends_per_s),
                p.x_raw_fdatasync.map_or("-".into(), report::ratio),
                p.msgs_per_fdatasync
                    .map_or("n/a".into(), |m| format!("{m:.1}")),
                report::micros(p.latency.p50_us),
                report::micros(p.latency.p99_us),
                vs_sled,
            ]);
        }
    }
    t.note("÷ raw fdatasync: each point ÷ the mean of the raw samples just before and after its group.");
    t.note("store: N OS threads, each acknowledged after .wait() (group-committed fdatasync); msgs/fdatasync from store.stats().");
    t.note("store-async: N tasks on a 2-thread tokio runtime (as the hub's connections run), each awaiting append.");
    t.note(format!(
        "sled {}: acknowledged after flush(), which syncs with sync_file_range, not fdatasync",
        r.sled_version
    ));
    t.note("  (benches/results/sled-strace.txt): safe against kill -9, not against power or node loss.");
    if !t.is_empty() {
        println!("{t}");
    }

    let mut ro = Table::new(
        "Reopen after kill -9",
        &[
            "log",
            "fill",
            "open after kill -9",
            "open after clean close",
            "page cache",
        ],
    );
    match &r.reopen {
        Reopen::Measured(m) => {
            ro.row([
                report::bytes(m.log_bytes),
                format!("{:.1} s", m.fill_secs),
                report::micros(m.open_after_kill9_ms * 1e3),
                report::micros(m.open_after_close_ms * 1e3),
                m.page_cache.to_string(),
            ]);
        }
        Reopen::Skipped { reason } => {
            ro.note(format!("skipped: {reason}"));
        }
        Reopen::Failed { error } => {
            ro.note(format!("FAILED: {error}"));
        }
    }
    println!("{ro}");
    println!(
        "{}",
        report::targets_table("Targets (issue 2; shown, never asserted)", &r.targets)
    );
    report::print_problems(&r.warnings, &r.errors);
}
