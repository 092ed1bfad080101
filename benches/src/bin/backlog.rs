//! Issue 18 part 2: a long offline backlog. For each size (default 1, 4 and 10 GiB) it
//!
//! 1. fills a store with 1,000-byte messages for one queue nobody reads (a child process,
//!    through the store API, quota raised above the size), until its segments hold the size;
//! 2. kills that writer with SIGKILL once every append it made was acknowledged;
//! 3. starts a second child that opens the store (timed: open to ready), then reads and
//!    checkpoints everything, checking that every acknowledged message comes back once and in
//!    order, and reports its peak RSS (`VmHWM`, open and drain included) and the drain rate;
//! 4. deletes the data.
//!
//! It prints a table (rates also as ratios to the disk's raw 4 KiB append + `fdatasync` rate),
//! writes JSON and, unless `--no-png`, a PNG of RSS and reopen time against the backlog size
//! (with the points of an earlier run given by `--before FILE.json`, e.g. one built from main).
//!
//! ```text
//! backlog [--quick] [--sizes-mib 1024,4096,10240] [--segment-mib 64] [--label NAME]
//!         [--json PATH] [--png PATH] [--before PATH] [--no-png]
//! ```
//! `--quick`: 16 and 48 MiB over 4 MiB segments (seconds; smoke test of the harness).
//! Data goes under `$EDGEHUB_BENCH_DIR` (never tmpfs). Figures only: nothing is asserted on
//! speed; a lost, duplicated or reordered message fails the run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use benches::report::{self, Table};
use benches::{env, fsync, BenchResult};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store::{Epoch, Offset, QueueName, Store, StoreOptions};

const ROLE_ENV: &str = "EDGEHUB_BACKLOG_ROLE";
const BODY: usize = 1000;
const QUEUE: &str = "offline";
/// Appends in flight at once in the filler (they share group commits).
const WINDOW: usize = 512;
/// Messages per read (and per checkpoint) while draining.
const READ_BATCH: usize = 1000;

fn options(quota: u64, segment: u64) -> StoreOptions {
    StoreOptions {
        epoch: Epoch::new(1),
        quota_bytes: quota,
        segment_bytes: segment,
        ..StoreOptions::default()
    }
}

fn queue() -> BenchResult<QueueName> {
    Ok(QueueName::new(QUEUE)?)
}

/// What the drain child reports (one JSON line on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Drained {
    open_ms: f64,
    /// Of which recovery (the store's own report).
    #[serde(default)]
    recovery_ms: f64,
    /// Peak RSS by the time the store was open.
    hwm_after_open_kib: u64,
    /// Peak RSS over open and drain.
    hwm_kib: u64,
    messages: u64,
    drain_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Point {
    target_mib: u64,
    segment_mib: u64,
    /// Segment bytes on disk when the writer was killed.
    bytes_on_disk: u64,
    /// Sidecar bytes on disk at that moment (0 before sidecars existed).
    sidecar_bytes: u64,
    messages: u64,
    fill_secs: f64,
    open_ms: f64,
    #[serde(default)]
    recovery_ms: f64,
    hwm_after_open_mib: f64,
    hwm_mib: f64,
    drain_secs: f64,
    drain_msgs_per_s: f64,
    fill_msgs_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Results {
    label: String,
    raw_fdatasync_per_s: f64,
    points: Vec<Point>,
}

fn main() -> ExitCode {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("fill") => return child_exit(fill_child()),
        Ok("drain") => return child_exit(drain_child()),
        _ => {}
    }
    benches::exit_code("backlog", run())
}

fn child_exit(r: BenchResult<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backlog child: {e}");
            ExitCode::from(2)
        }
    }
}

struct Config {
    sizes_mib: Vec<u64>,
    segment_mib: u64,
    label: String,
    json: PathBuf,
    png: Option<PathBuf>,
    before: Option<PathBuf>,
}

fn config() -> BenchResult<Config> {
    let mut args = std::env::args().skip(1);
    let mut quick = false;
    let mut sizes = None;
    let mut segment = None;
    let mut label = "this build".to_owned();
    let mut json = env::target_dir().join("bench-results").join("backlog.json");
    let mut png = Some(env::target_dir().join("bench-results").join("backlog.png"));
    let mut before = None;
    let mut json_given = false;
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => quick = true,
            "--sizes-mib" => {
                sizes = Some(
                    value()?
                        .split(',')
                        .map(|s| s.trim().parse::<u64>())
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            "--segment-mib" => segment = Some(value()?.parse::<u64>()?),
            "--label" => label = value()?,
            "--json" => {
                json = PathBuf::from(value()?);
                json_given = true;
            }
            "--png" => png = Some(PathBuf::from(value()?)),
            "--no-png" => png = None,
            "--before" => before = Some(PathBuf::from(value()?)),
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if quick && !json_given {
        json = env::target_dir()
            .join("bench-results")
            .join("backlog-quick.json");
    }
    let (default_sizes, default_segment) = if quick {
        (vec![16, 48], 4)
    } else {
        (vec![1024, 4096, 10240], 64)
    };
    Ok(Config {
        sizes_mib: sizes.unwrap_or(default_sizes),
        segment_mib: segment.unwrap_or(default_segment),
        label,
        json,
        png: if quick { None } else { png },
        before,
    })
}

fn run() -> BenchResult<bool> {
    let cfg = config()?;
    let root = env::bench_tempdir("backlog-")?;
    let raw = fsync::append_fdatasync(
        root.path(),
        "start",
        fsync::DEFAULT_BLOCK,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )?;
    let mut points = Vec::new();
    for &mib in &cfg.sizes_mib {
        let dir = root.path().join(format!("store-{mib}"));
        let point = one_size(&dir, mib, cfg.segment_mib);
        let _ = std::fs::remove_dir_all(&dir);
        points.push(point?);
    }
    let results = Results {
        label: cfg.label.clone(),
        raw_fdatasync_per_s: raw.rate_per_s,
        points,
    };
    let before: Option<Results> = match &cfg.before {
        Some(p) => Some(serde_json::from_slice(&std::fs::read(p)?)?),
        None => None,
    };
    print!("{}", table(&results));
    if let Some(b) = &before {
        print!("{}", table(b));
    }
    if let Some(dir) = cfg.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.json, serde_json::to_vec_pretty(&results)?)?;
    println!("raw results: {}", cfg.json.display());
    if let Some(png) = &cfg.png {
        chart::draw(png, &results, before.as_ref())?;
        println!("chart: {}", png.display());
    }
    Ok(true)
}

fn table(r: &Results) -> Table {
    let mut t = Table::new(
        format!(
            "Backlog of 1,000-byte messages for one offline queue, SIGKILL, reopen and drain ({})",
            r.label
        ),
        &[
            "backlog",
            "messages",
            "fill msg/s",
            "÷ fsync",
            "open (ms)",
            "RSS after open",
            "peak RSS",
            "drain msg/s",
            "÷ fsync",
        ],
    );
    for p in &r.points {
        t.row([
            report::bytes(p.bytes_on_disk),
            report::count(p.messages as f64),
            report::rate(p.fill_msgs_per_s),
            report::ratio(report::div(p.fill_msgs_per_s, r.raw_fdatasync_per_s)),
            format!("{:.0}", p.open_ms),
            format!("{:.0} MiB", p.hwm_after_open_mib),
            format!("{:.0} MiB", p.hwm_mib),
            report::rate(p.drain_msgs_per_s),
            report::ratio(report::div(p.drain_msgs_per_s, r.raw_fdatasync_per_s)),
        ]);
    }
    t.note(format!(
        "raw 4 KiB append+fdatasync: {}; RSS = VmHWM of the process that reopened and drained",
        report::rate(r.raw_fdatasync_per_s)
    ));
    t.note("targets (issue 18): peak RSS <= 128 MiB at 10 GiB, open after kill -9 <= 2 s");
    t
}

/// Fill, kill, reopen and drain one backlog of `mib` MiB.
fn one_size(dir: &Path, mib: u64, segment_mib: u64) -> BenchResult<Point> {
    std::fs::create_dir_all(dir)?;
    let target = mib << 20;
    eprintln!("backlog {mib} MiB: filling {}", dir.display());
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "fill")
        .arg(dir)
        .arg(target.to_string())
        .arg(segment_mib.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("filler without stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let fill_secs = started.elapsed().as_secs_f64();
    // SIGKILL, with every append acknowledged and the store still open.
    child.kill()?;
    let status = child.wait()?;
    let mut words = line.split_whitespace();
    if words.next() != Some("ready") {
        return Err(format!("filler did not get ready ({status}): {line:?}").into());
    }
    let messages: u64 = words.next().ok_or("filler: no count")?.parse()?;
    let bytes_on_disk: u64 = words.next().ok_or("filler: no size")?.parse()?;
    let sidecar_bytes = files_bytes(dir, "idx")?;
    eprintln!(
        "  {messages} messages, {} in {fill_secs:.1} s; killed ({status})",
        report::bytes(bytes_on_disk)
    );

    let out = Command::new(std::env::current_exe()?)
        .env(ROLE_ENV, "drain")
        .arg(dir)
        .arg(messages.to_string())
        .arg(target.to_string())
        .arg(segment_mib.to_string())
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("drain failed ({})", out.status).into());
    }
    let d: Drained = serde_json::from_slice(&out.stdout)?;
    eprintln!(
        "  reopened in {:.0} ms (recovery {:.0} ms); drained {} in {:.1} s; peak RSS {} KiB",
        d.open_ms, d.recovery_ms, d.messages, d.drain_secs, d.hwm_kib
    );
    Ok(Point {
        target_mib: mib,
        segment_mib,
        bytes_on_disk,
        sidecar_bytes,
        messages,
        fill_secs,
        open_ms: d.open_ms,
        recovery_ms: d.recovery_ms,
        hwm_after_open_mib: d.hwm_after_open_kib as f64 / 1024.0,
        hwm_mib: d.hwm_kib as f64 / 1024.0,
        drain_secs: d.drain_secs,
        drain_msgs_per_s: d.messages as f64 / d.drain_secs.max(1e-9),
        fill_msgs_per_s: messages as f64 / fill_secs.max(1e-9),
    })
}

fn files_bytes(dir: &Path, ext: &str) -> BenchResult<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.path().extension().is_some_and(|x| x == ext) {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

fn arg(i: usize) -> BenchResult<String> {
    std::env::args()
        .nth(i)
        .ok_or_else(|| format!("child argument {i} missing").into())
}

/// Appends until the segments hold the target size, waits for every acknowledgement, says
/// `ready <messages> <bytes>` and waits to be killed.
fn fill_child() -> BenchResult<()> {
    let dir = PathBuf::from(arg(1)?);
    let target: u64 = arg(2)?.parse()?;
    let segment: u64 = arg(3)?.parse::<u64>()? << 20;
    let store = Store::open(&dir, options(target + (2 << 30), segment))?;
    let q = [queue()?];
    let mut pending = std::collections::VecDeque::new();
    let mut n: u64 = 0;
    let mut body = vec![b'.'; BODY];
    loop {
        if n.is_multiple_of(10_000) && store.stats().bytes_on_disk >= target {
            break;
        }
        body[..8].copy_from_slice(&n.to_le_bytes());
        pending.push_back(store.append(&q, Bytes::copy_from_slice(&body), None));
        n += 1;
        if pending.len() >= WINDOW {
            if let Some(p) = pending.pop_front() {
                p.wait()?;
            }
        }
    }
    for p in pending {
        p.wait()?;
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready {n} {}", store.stats().bytes_on_disk)?;
    out.flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn status_kib(field: &str) -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| format!("{field} not in /proc/self/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed status line")?
        .parse()?)
}

/// Opens the store (timed), then reads and checkpoints everything, checking count and order.
fn drain_child() -> BenchResult<()> {
    let dir = PathBuf::from(arg(1)?);
    let expected: u64 = arg(2)?.parse()?;
    let target: u64 = arg(3)?.parse()?;
    let segment: u64 = arg(4)?.parse::<u64>()? << 20;
    let t0 = Instant::now();
    let store = Store::open(&dir, options(target + (2 << 30), segment))?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let recovery_ms = store.recovery().elapsed.as_secs_f64() * 1e3;
    let hwm_after_open_kib = status_kib("VmHWM:")?;
    let q = queue()?;
    let t1 = Instant::now();
    let mut after = Offset::ZERO;
    let mut next: u64 = 0;
    loop {
        let batch = store.read(&q, after, READ_BATCH)?;
        let Some(last) = batch.last() else {
            break;
        };
        for m in &batch {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(m.body.get(..8).ok_or("short body")?);
            let seq = u64::from_le_bytes(seq);
            if seq != next || m.offset <= after {
                return Err(format!(
                    "message {seq} at offset {} where {next} was due after offset {after}",
                    m.offset
                )
                .into());
            }
            next += 1;
        }
        after = last.offset;
        store.checkpoint(&q, after).wait()?;
    }
    let drain_secs = t1.elapsed().as_secs_f64();
    if next != expected {
        return Err(format!("drained {next} messages, {expected} were acknowledged").into());
    }
    let hwm_kib = status_kib("VmHWM:")?;
    store.close()?;
    let d = Drained {
        open_ms,
        recovery_ms,
        hwm_after_open_kib,
        hwm_kib,
        messages: next,
        drain_secs,
    };
    println!("{}", serde_json::to_string(&d)?);
    Ok(())
}

mod chart {
    use super::{BenchResult, Results};
    use plotters::prelude::*;
    use std::path::Path;

    fn load_font() -> BenchResult<()> {
        for c in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{c}: not a usable font"))?;
                return Ok(());
            }
        }
        Err("no TrueType font found (apt-get install fonts-dejavu-core)".into())
    }

    type Metric = fn(&super::Point) -> f64;

    /// Two panels against the backlog size: peak RSS, and open time after SIGKILL; one line
    /// per run, and the issue's target as a dashed line.
    pub(super) fn draw(path: &Path, after: &Results, before: Option<&Results>) -> BenchResult<()> {
        load_font()?;
        let runs: Vec<(&Results, RGBColor)> = std::iter::once((after, RGBColor(31, 119, 180)))
            .chain(before.map(|b| (b, RGBColor(214, 39, 40))))
            .collect();
        let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(600);
        let panels: [(&DrawingArea<_, _>, &str, Metric, f64); 2] = [
            (
                &left,
                "peak RSS, reopen + drain (MiB)",
                |p| p.hwm_mib,
                128.0,
            ),
            (&right, "open after SIGKILL (ms)", |p| p.open_ms, 2000.0),
        ];
        let xmax = runs
            .iter()
            .flat_map(|(r, _)| {
                r.points
                    .iter()
                    .map(|p| p.bytes_on_disk as f64 / (1u64 << 30) as f64)
            })
            .fold(1.0f64, f64::max)
            * 1.1;
        for (area, title, metric, target) in panels {
            let ymax = runs
                .iter()
                .flat_map(|(r, _)| r.points.iter().map(metric))
                .fold(target, f64::max)
                * 1.15;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
            chart
                .configure_mesh()
                .x_desc("backlog on disk (GiB)")
                .label_style(("sans-serif", 14))
                .draw()?;
            chart.draw_series(DashedLineSeries::new(
                [(0.0, target), (xmax, target)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?;
            for &(r, color) in &runs {
                let pts: Vec<(f64, f64)> = r
                    .points
                    .iter()
                    .map(|p| (p.bytes_on_disk as f64 / (1u64 << 30) as f64, metric(p)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(r.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
