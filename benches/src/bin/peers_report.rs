//! `peers_report`: the machine facts, the raw fdatasync probe and the summary
//! (ratio table, JSON, PNG chart) of `benches/peers.sh`.
//!
//! - `peers_report info DIR`: machine, filesystem of DIR, package versions,
//!   CPU busy-ness over 2 s (JSON on stdout).
//! - `peers_report fsync DIR LABEL [SECS]`: 4 KiB append + fdatasync rate (JSON).
//! - `peers_report summarize OUT`: reads `OUT/raw/*.json` (loadgen reports
//!   labelled `broker/transport/workload/run`), prints the tables, writes
//!   `OUT/summary.md`, `OUT/results.json` and `OUT/chart.png`.

use benches::procstat::MachineCpu;
use benches::BenchResult;
use plotters::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BROKERS: [&str; 5] = [
    "edgehub",
    "mosquitto-mem",
    "mosquitto-persist",
    "rabbitmq",
    "nats",
];
const PEERS: [&str; 4] = ["mosquitto-mem", "mosquitto-persist", "rabbitmq", "nats"];
const WORKLOADS: [&str; 3] = ["W1", "W2", "W3"];
const TRANSPORTS: [&str; 2] = ["tls", "plain"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("info") if args.len() == 2 => info(Path::new(&args[1])),
        Some("fsync") if args.len() >= 3 => fsync(Path::new(&args[1]), &args[2], args.get(3)),
        Some("summarize") if args.len() == 2 => summarize(Path::new(&args[1])),
        _ => Err("usage: peers_report info DIR | fsync DIR LABEL [SECS] | summarize OUT".into()),
    };
    if let Err(e) = r {
        eprintln!("peers_report: {e}");
        std::process::exit(1);
    }
}

fn cmd(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn info(dir: &Path) -> BenchResult<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let fs = benches::env::filesystem_of(dir);
    let a = MachineCpu::now();
    std::thread::sleep(Duration::from_secs(2));
    let busy = MachineCpu::now().busy_since(&a);
    let version = |p: &str| cmd("dpkg-query", &["-W", "-f", "${Version}", p]);
    let v = json!({
        "date_utc": cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "cpus": benches::procstat::cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_kib as f64 / 1048576.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "os": cmd("sh", &["-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "data_fs": fs.as_ref().map(|f| json!({"mount": f.mount_point, "fstype": f.fstype, "source": f.source})),
        "busy_before_start": busy,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "git": cmd("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
        "git_dirty": !cmd("git", &["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "versions": {
            "mosquitto": version("mosquitto"),
            "rabbitmq-server": version("rabbitmq-server"),
            "erlang-base": version("erlang-base"),
            "nats-server": version("nats-server"),
        },
    });
    if busy > 0.25 {
        eprintln!(
            "peers_report: WARNING: the machine is {:.0}% busy before the run starts; figures will be noisy",
            busy * 100.0
        );
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn fsync(dir: &Path, label: &str, secs: Option<&String>) -> BenchResult<()> {
    let secs: f64 = secs.map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let r = benches::fsync::append_fdatasync(
        dir,
        label,
        benches::fsync::DEFAULT_BLOCK,
        Duration::from_millis(500),
        Duration::from_secs_f64(secs),
    )?;
    eprintln!(
        "peers_report: raw 4 KiB append + fdatasync ({label}): {:.0}/s, p50 {:.0} us, p99 {:.0} us",
        r.rate_per_s, r.latency.p50_us, r.latency.p99_us
    );
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_f64().unwrap_or(0.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Aggregate over the runs of one (broker, transport, workload).
#[derive(Default, Clone)]
struct Agg {
    runs: usize,
    ok: usize,
    rate: Vec<f64>,
    ack_rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
    broker_cores: Vec<f64>,
    client_cores: Vec<f64>,
    busy: Vec<f64>,
    others: Vec<f64>,
    irq: Vec<f64>,
    us_per_msg: Vec<f64>,
    rss_mib: f64,
    per_fsync: Vec<f64>,
    lost: u64,
    dup: u64,
    reordered: u64,
    warnings: usize,
}

impl Agg {
    fn json(&self) -> Value {
        let mm = |v: &Vec<f64>| {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            json!({"median": median(v.clone()), "min": min, "max": max})
        };
        json!({
            "runs": self.runs, "runs_ok": self.ok,
            "delivered_per_s": mm(&self.rate), "acked_per_s": mm(&self.ack_rate),
            "p50_ms": median(self.p50.clone()), "p99_ms": median(self.p99.clone()), "max_ms": median(self.max.clone()),
            "broker_cores": median(self.broker_cores.clone()), "client_cores": median(self.client_cores.clone()),
            "machine_busy": median(self.busy.clone()), "others_busy": median(self.others.clone()), "irq_steal": median(self.irq.clone()),
            "broker_us_per_msg": median(self.us_per_msg.clone()), "broker_peak_rss_mib": self.rss_mib,
            "msgs_per_fdatasync": if self.per_fsync.is_empty() { Value::Null } else { json!(median(self.per_fsync.clone())) },
            "lost": self.lost, "duplicates": self.dup, "reordered": self.reordered,
            "busy_warnings": self.warnings,
        })
    }
}

fn fmt_rate(x: f64) -> String {
    if x.is_nan() {
        return "–".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "–".into()
    } else if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn summarize(out: &Path) -> BenchResult<()> {
    let raw = out.join("raw");
    let mut reports: Vec<(String, Value)> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for p in &files {
        if p.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(p)?;
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                reports.push((name, v));
            }
        }
    }
    let get = |name: &str| {
        reports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let info = get("info").unwrap_or(Value::Null);
    let fs_start = get("fsync-start").unwrap_or(Value::Null);
    let fs_end = get("fsync-end").unwrap_or(Value::Null);

    let mut aggs: BTreeMap<(String, String, String), Agg> = BTreeMap::new();
    for (_, v) in &reports {
        let Some(label) = v["label"].as_str() else {
            continue;
        };
        let parts: Vec<&str> = label.split('/').collect();
        if parts.len() != 4 || parts[1] == "crash" {
            continue;
        }
        let a = aggs
            .entry((parts[0].into(), parts[1].into(), parts[2].into()))
            .or_default();
        a.runs += 1;
        if v["ok"].as_bool() == Some(true) {
            a.ok += 1;
        }
        a.rate.push(f(v, &["delivery_rate"]));
        a.ack_rate.push(f(v, &["ack_rate"]));
        a.p50.push(f(v, &["latency", "p50_us"]) / 1e3);
        a.p99.push(f(v, &["latency", "p99_us"]) / 1e3);
        a.max.push(f(v, &["latency", "max_us"]) / 1e3);
        let wall = f(v, &["cpu", "wall_s"]).max(1e-9);
        a.broker_cores.push(f(v, &["cpu", "broker_cpu_s"]) / wall);
        a.client_cores.push(f(v, &["cpu", "client_cpu_s"]) / wall);
        a.busy.push(f(v, &["cpu", "machine_busy"]));
        a.others.push(f(v, &["cpu", "others_busy"]));
        a.irq.push(f(v, &["cpu", "irq_steal"]));
        a.us_per_msg.push(f(v, &["broker_us_per_msg"]));
        a.rss_mib = a.rss_mib.max(f(v, &["broker_peak_rss_kib"]) / 1024.0);
        if let Some(x) = v["msgs_per_fdatasync"].as_f64() {
            a.per_fsync.push(x);
        }
        a.lost += v["lost"].as_u64().unwrap_or(0);
        a.dup += v["duplicates"].as_u64().unwrap_or(0);
        a.reordered += v["reordered"].as_u64().unwrap_or(0);
        if v["machine_busy_warning"].as_bool() == Some(true) {
            a.warnings += 1;
        }
    }
    let rate = |b: &str, t: &str, w: &str| {
        aggs.get(&(b.to_string(), t.to_string(), w.to_string()))
            .map_or(f64::NAN, |a| median(a.rate.clone()))
    };
    let p99 = |b: &str, t: &str, w: &str| {
        aggs.get(&(b.to_string(), t.to_string(), w.to_string()))
            .map_or(f64::NAN, |a| median(a.p99.clone()))
    };

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# edgehub vs peer brokers ({})\n",
        info["date_utc"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "Machine: {} CPUs ({}), {:.0} GiB, {}, kernel {}; data on {} ({}). Commit {}{}. Busy before start: {:.0}%; load average {}.\n",
        info["cpus"], info["cpu_model"].as_str().unwrap_or("?"), f(&info, &["mem_gib"]),
        info["os"].as_str().unwrap_or("?"), info["kernel"].as_str().unwrap_or("?"),
        info["data_fs"]["fstype"].as_str().unwrap_or("?"), info["data_fs"]["source"].as_str().unwrap_or("?"),
        info["git"].as_str().unwrap_or("?"), if info["git_dirty"].as_bool() == Some(true) { " (work tree had uncommitted changes)" } else { "" },
        f(&info, &["busy_before_start"]) * 100.0, info["loadavg"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Raw 4 KiB append + fdatasync on the data disk: {:.0}/s at the start, {:.0}/s at the end.\n",
        f(&fs_start, &["rate_per_s"]), f(&fs_end, &["rate_per_s"])
    );
    let _ = writeln!(md, "Versions: {}\n", info["versions"]);

    // Ratio table.
    let _ = writeln!(
        md,
        "## Ratios: edgehub ÷ peer (delivered msgs/s, median of runs)\n"
    );
    let _ = write!(md, "| transport | workload | edgehub msg/s (p99) |");
    for p in PEERS {
        let _ = write!(md, " ÷ {p} |");
    }
    let _ = writeln!(
        md,
        " edgehub msgs/fdatasync | edgehub broker µs/msg | edgehub peak RSS MiB |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|{}---|---|---|",
        "---|".repeat(PEERS.len())
    );
    for t in TRANSPORTS {
        for w in WORKLOADS {
            let e = rate("edgehub", t, w);
            if e.is_nan() {
                continue;
            }
            let a = aggs
                .get(&("edgehub".into(), t.into(), w.into()))
                .cloned()
                .unwrap_or_default();
            let _ = write!(
                md,
                "| {t} | {w} | {} ({}) |",
                fmt_rate(e),
                fmt_ms(p99("edgehub", t, w))
            );
            for p in PEERS {
                let r = rate(p, t, w);
                if r.is_nan() {
                    let _ = write!(md, " – |");
                } else {
                    let _ = write!(md, " {:.2}× |", e / r);
                }
            }
            let _ = writeln!(
                md,
                " {} | {:.1} | {:.0} |",
                if a.per_fsync.is_empty() {
                    "–".into()
                } else {
                    format!("{:.1}", median(a.per_fsync.clone()))
                },
                median(a.us_per_msg.clone()),
                a.rss_mib
            );
        }
    }

    // Per-broker detail.
    let _ = writeln!(
        md,
        "\n## Per broker (median of runs; min–max of delivered msg/s)\n"
    );
    let _ = writeln!(md, "| broker | transport | workload | runs ok | delivered msg/s | acked msg/s | p50 | p99 | max | lost / dup / reordered | broker cores | client cores | machine busy % | irq+softirq+steal % | others % | broker µs/msg | peak RSS MiB | msgs/fdatasync |");
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for b in BROKERS {
        for t in TRANSPORTS {
            for w in WORKLOADS {
                let Some(a) = aggs.get(&(b.into(), t.into(), w.into())) else {
                    continue;
                };
                let mn = a.rate.iter().copied().fold(f64::INFINITY, f64::min);
                let mx = a.rate.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let _ = writeln!(
                    md,
                    "| {b} | {t} | {w} | {}/{} | {} ({}–{}) | {} | {} | {} | {} | {} / {} / {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0}{} | {:.1} | {:.0} | {} |",
                    a.ok, a.runs, fmt_rate(median(a.rate.clone())), fmt_rate(mn), fmt_rate(mx),
                    fmt_rate(median(a.ack_rate.clone())),
                    fmt_ms(median(a.p50.clone())), fmt_ms(median(a.p99.clone())), fmt_ms(median(a.max.clone())),
                    a.lost, a.dup, a.reordered,
                    median(a.broker_cores.clone()), median(a.client_cores.clone()),
                    median(a.busy.clone()) * 100.0, median(a.irq.clone()) * 100.0, median(a.others.clone()) * 100.0,
                    if a.warnings > 0 { " ⚠" } else { "" },
                    median(a.us_per_msg.clone()), a.rss_mib,
                    if a.per_fsync.is_empty() { "–".into() } else { format!("{:.1}", median(a.per_fsync.clone())) },
                );
            }
        }
    }
    let warned: usize = aggs.values().map(|a| a.warnings).sum();
    if warned > 0 {
        let _ = writeln!(md, "\n⚠ {warned} run(s) saw other processes use over 25% of the CPUs (busy less this client, the broker, irq/softirq and steal): the machine was busy, treat those figures as noisy.");
    } else {
        let _ = writeln!(md, "\nNo run saw other processes use over 25% of the CPUs.");
    }

    // Crash checks.
    let mut crash = Vec::new();
    let _ = writeln!(md, "\n## kill -9 checks (plain TCP)\n");
    let _ = writeln!(md, "| broker | check | acked | delivered | acked but lost | duplicates | reordered | client reconnects |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for b in BROKERS {
        for c in ["C1", "C2"] {
            let Some(v) = get(&format!("{b}--crash--{c}")) else {
                continue;
            };
            let acked = if c == "C1" {
                get(&format!("{b}--crash--C1-publish"))
                    .and_then(|p| p["acked"].as_u64())
                    .unwrap_or(0)
            } else {
                v["acked"].as_u64().unwrap_or(0)
            };
            let delivered = v["delivered"].as_u64().unwrap_or(0);
            let abl = if c == "C1" {
                acked.saturating_sub(delivered)
            } else {
                v["acked_but_lost"].as_u64().unwrap_or(0)
            };
            let _ = writeln!(
                md,
                "| {b} | {c} | {} | {} | {} | {} | {} | {} |",
                fmt_rate(acked as f64),
                fmt_rate(delivered as f64),
                fmt_rate(abl as f64),
                v["duplicates"],
                v["reordered"],
                v["reconnects"]
            );
            crash.push(json!({"broker": b, "check": c, "acked": acked, "delivered": delivered, "acked_but_lost": abl, "duplicates": v["duplicates"], "reordered": v["reordered"], "reconnects": v["reconnects"], "errors": v["errors"]}));
        }
    }

    // Targets: recorded, never asserted.
    let mut targets = Vec::new();
    let mut target = |name: String, value: String, met: Option<bool>| {
        targets.push(json!({"target": name, "value": value, "met": met}));
    };
    for t in TRANSPORTS {
        let mm = |w: &str| rate("edgehub", t, w) / rate("mosquitto-mem", t, w);
        let rb = |w: &str| rate("edgehub", t, w) / rate("rabbitmq", t, w);
        let known = |x: f64| if x.is_nan() { None } else { Some(x) };
        let w3 = mm("W3");
        let p = p99("edgehub", t, "W3");
        target(
            format!("{t}: W3 ≥ 1.0× mosquitto in memory with p99 ≤ 10 ms"),
            format!("{w3:.2}×, p99 {}", fmt_ms(p)),
            known(w3).map(|x| x >= 1.0 && p <= 10.0),
        );
        for w in ["W1", "W2"] {
            let x = mm(w);
            target(
                format!("{t}: {w} ≥ 1.0× mosquitto in memory"),
                format!("{x:.2}×"),
                known(x).map(|x| x >= 1.0),
            );
        }
        for w in WORKLOADS {
            let x = rb(w);
            target(
                format!("{t}: {w} ≥ 3× RabbitMQ durable"),
                format!("{x:.2}×"),
                known(x).map(|x| x >= 3.0),
            );
        }
    }
    for c in &crash {
        if c["broker"] == "edgehub" {
            let n = c["acked_but_lost"].as_u64().unwrap_or(0);
            target(
                format!("{}: acked-but-lost = 0", c["check"].as_str().unwrap_or("?")),
                n.to_string(),
                Some(n == 0),
            );
        }
    }
    let _ = writeln!(md, "\n## Targets for edgehub (recorded, never asserted)\n");
    let _ = writeln!(md, "| target | measured | met |");
    let _ = writeln!(md, "|---|---|---|");
    for t in &targets {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {met} |",
            t["target"].as_str().unwrap_or(""),
            t["value"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(md, "\nPUBACK means: mosquitto = in memory (persistent: file written every 30 min); RabbitMQ = confirmed after a batched fsync; NATS 2.9 = written to the page cache, fsync every 60 s; edgehub = see msgs/fdatasync (its store's fdatasyncs during the run, from /metrics).");

    let chart = out.join("chart.png");
    if let Err(e) = draw_chart(&chart, &aggs, info["date_utc"].as_str().unwrap_or("")) {
        let _ = writeln!(md, "\n(chart not drawn: {e})");
    } else {
        let _ = writeln!(md, "\nChart: chart.png");
    }

    let results = json!({
        "info": info,
        "fsync": {"start": fs_start, "end": fs_end},
        "workloads": aggs.iter().map(|((b, t, w), a)| json!({"broker": b, "transport": t, "workload": w, "summary": a.json()})).collect::<Vec<_>>(),
        "crash": crash,
        "targets": targets,
        "raw": files.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string())).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("summary.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn color(b: &str) -> RGBColor {
    match b {
        "edgehub" => RGBColor(214, 39, 40),
        "mosquitto-mem" => RGBColor(31, 119, 180),
        "mosquitto-persist" => RGBColor(120, 170, 220),
        "rabbitmq" => RGBColor(255, 127, 14),
        _ => RGBColor(44, 160, 44),
    }
}

fn load_font() -> BenchResult<()> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    for c in candidates {
        if let Ok(bytes) = std::fs::read(c) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{c}: not a usable font"))?;
            return Ok(());
        }
    }
    Err("no TrueType font found (apt-get install fonts-dejavu-core)".into())
}

type Aggs = BTreeMap<(String, String, String), Agg>;

fn draw_chart(path: &Path, aggs: &Aggs, date: &str) -> BenchResult<()> {
    load_font()?;
    let present: Vec<&str> = BROKERS
        .iter()
        .copied()
        .filter(|b| aggs.keys().any(|k| k.0 == *b))
        .collect();
    let groups: Vec<(&str, &str)> = TRANSPORTS
        .iter()
        .flat_map(|t| WORKLOADS.iter().map(move |w| (*t, *w)))
        .filter(|(t, w)| aggs.keys().any(|k| k.1 == *t && k.2 == *w))
        .collect();
    if groups.is_empty() {
        return Err("no workload results".into());
    }
    let root = BitMapBackend::new(path, (1400, 940)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(470);
    #[allow(clippy::type_complexity)]
    let panels: [(&DrawingArea<_, _>, &str, fn(&Agg) -> f64); 2] = [
        (&top, "delivered msgs/s (median; higher is better)", |a| {
            median(a.rate.clone())
        }),
        (
            &bottom,
            "broker CPU µs per message (lower is better)",
            |a| median(a.us_per_msg.clone()),
        ),
    ];
    for (i, (area, title, metric)) in panels.iter().enumerate() {
        let ymax = groups
            .iter()
            .flat_map(|(t, w)| {
                present
                    .iter()
                    .filter_map(move |b| aggs.get(&(b.to_string(), t.to_string(), w.to_string())))
            })
            .map(metric)
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max)
            * 1.15;
        let caption = if i == 0 {
            format!("edgehub vs peer MQTT brokers, QoS 1, 256 B, window 100 ({date}) — {title}")
        } else {
            (*title).to_string()
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..groups.len() as f64, 0f64..ymax.max(1.0))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_label_formatter(&|v| fmt_rate(*v))
            .y_label_style(("sans-serif", 14))
            .draw()?;
        let nb = present.len().max(1) as f64;
        let width = 0.8 / nb;
        for (g, (t, w)) in groups.iter().enumerate() {
            for (j, b) in present.iter().enumerate() {
                let Some(a) = aggs.get(&(b.to_string(), t.to_string(), w.to_string())) else {
                    continue;
                };
                let v = metric(a);
                if !v.is_finite() {
                    continue;
                }
                let x0 = g as f64 + 0.1 + j as f64 * width;
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.92, v)],
                    color(b).filled(),
                )))?;
                let label = if i == 0 {
                    format!("{:.0}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                };
                chart.draw_series(std::iter::once(Text::new(
                    label,
                    (x0, v + ymax * 0.01),
                    ("sans-serif", 11).into_font().color(&BLACK),
                )))?;
            }
            let (px, py) = chart.backend_coord(&(g as f64 + 0.3, 0.0));
            // backend_coord is in whole-image pixels: draw on the root, not on the panel.
            root.draw(&Text::new(
                format!("{w} {t}"),
                (px, py + 6),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))?;
        }
        if i == 0 {
            for (j, b) in present.iter().enumerate() {
                let x = 100 + j as i32 * 200;
                area.draw(&Rectangle::new([(x, 40), (x + 14, 54)], color(b).filled()))?;
                area.draw(&Text::new(
                    b.to_string(),
                    (x + 20, 40),
                    ("sans-serif", 15).into_font().color(&BLACK),
                ))?;
            }
        }
    }
    root.present()?;
    Ok(())
}
