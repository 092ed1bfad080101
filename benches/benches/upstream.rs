//! Upstream figures (issue 6): `cargo bench -p benches --bench upstream [-- --quick]`.
//!
//! A report, never a timed test: it prints figures and ratios and asserts nothing about speed.
//! The hub runs in this process (`hub::server::run`, built with the bench profile = release, on a
//! real data dir under `EDGEHUB_BENCH_DIR`, route `FROM /messages/* INTO $upstream`) on its own
//! two-thread tokio runtime; its upstream is an in-process `iothub_emulator::Emulator` (an
//! emulator we wrote, not IoT Hub), which runs with the module clients on a second two-thread
//! runtime. Modules publish QoS 1 over TLS MQTT to the hub with a sliding window of unacked
//! publishes (default 100), 256-byte bodies. In one run it measures
//!
//! 1. the raw 4 KiB append + `fdatasync` rate of the bench directory's disk (one sample at the
//!    start and one after each group of points);
//! 2. steady state, for 1 and 8 sending modules: after a warm-up, over a fixed window, the rate
//!    at which the emulator *records* messages (delivered upstream; the emulator records before
//!    it PUBACKs) and the rate of hub PUBACKs to the modules (acked ingest, durable);
//! 3. backlog drain: the emulator goes away, the modules publish the backlog (every message
//!    PUBACKed by the hub, so durable), the emulator comes back, and the time until it has
//!    recorded every module's last message (`Emulator::wait_until`) is split into the
//!    reconnect delay (come back → first record; the hub's link backoff) and the drain itself
//!    (first record → last);
//!
//! all rates also as ratios to the raw `fdatasync` rate, then writes the raw results to
//! `target/bench-results/upstream.json`.
//!
//! Options (after `--`): `--quick` (small counts, a few seconds), `--only raw,steady,backlog`,
//! `--modules 1,8`, `--window 100`, `--backlog 100000` (messages for the one-module drain; the
//! eight-module drain sends an eighth of it per module). Environment: `EDGEHUB_BENCH_DIR`,
//! `EDGEHUB_BENCH_SECS` (seconds per steady point).
//!
//! Run without `--bench` (as `cargo test --benches` does) it only smoke-tests itself with tiny
//! counts and writes no JSON.

use benches::args::{Args, Mode, Only};
use benches::env::{self, FsInfo, Machine};
use benches::fsync::{RawFsync, RawSamples};
use benches::mqtt::{Conn, Creds, Endpoint, Tls};
use benches::report::{self, Table};
use benches::{json, BenchResult};
use bytes::Bytes;
use hub::identity::{Identities, Identity};
use hub::settings::RawSettings;
use iothub_emulator::{Emulator, EmulatorConfig, IdentityKey};
use router::{DeviceId, ModuleId};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const IOTHUB: &str = "edgehub.bench";
const DEVICE: &str = "edge-device";
/// Bytes of the body that carry the sequence number (zero-padded decimal).
const SEQ_DIGITS: usize = 10;
/// How long a module's SAS token lives.
const TOKEN_SECS: u64 = 3 * 3600;

#[derive(Debug, Clone)]
struct Config {
    /// Full: 10 s per steady point, a 100,000-message backlog; quick: 1 s per steady point, a
    /// 2,000-message backlog.
    mode: Mode,
    warmup: Duration,
    point: Duration,
    raw: Duration,
    modules: Vec<usize>,
    window: usize,
    payload: usize,
    backlog: u64,
    /// The longest a drain (or a publish phase) may take before the point fails.
    limit: Duration,
    only: Only,
}

impl Config {
    fn from_args() -> BenchResult<Config> {
        let args = Args::from_env("upstream", &["--modules", "--window", "--backlog"]);
        let only = args.only("raw,steady,backlog")?;
        let modules = args.list("--modules", "e.g. 1,8")?;
        let window = args.number("--window", "a number")?.unwrap_or(100);
        let backlog = args.number("--backlog", "a number")?;
        let mode = args.mode();
        let ms = Duration::from_millis;
        let (warmup, mut point, raw, default_backlog) = match mode {
            Mode::Full => (ms(3000), ms(10_000), ms(3000), 100_000),
            Mode::Quick => (ms(500), ms(1000), ms(300), 2_000),
            Mode::Smoke => (ms(100), ms(300), ms(100), 200),
        };
        if let Some(p) = env::point_from_env()? {
            point = p;
        }
        if !(1..=60_000).contains(&window) {
            return Err(format!("--window {window}: 1..=60000").into());
        }
        Ok(Config {
            mode,
            warmup,
            point,
            raw,
            modules: modules.unwrap_or_else(|| vec![1, 8]),
            window,
            payload: 256,
            backlog: backlog.unwrap_or(default_backlog),
            limit: Duration::from_secs(600),
            only,
        })
    }
}

/// One steady-state point.
#[derive(Debug, Clone, Serialize)]
struct SteadyPoint {
    modules: usize,
    secs: f64,
    /// Hub PUBACKs to the modules in the window (each message durable).
    ingest_acked: u64,
    ingest_per_s: f64,
    /// Messages the emulator recorded in the window (repeats included).
    upstream_recorded: u64,
    upstream_per_s: f64,
    /// Acknowledged by the hub but not yet recorded upstream at the end of the window.
    backlog_at_end: u64,
    /// Records beyond the distinct messages sent, over the whole point (0 without failures).
    repeats: u64,
    /// CPU used in the window, in cores (1.0 = one core busy throughout), by the hub's runtime
    /// threads (`hub`), the store's threads, the emulator and module clients (`driver`), and
    /// other threads.
    cpu_hub: f64,
    cpu_store: f64,
    cpu_driver: f64,
    cpu_other: f64,
    raw_ref_per_s: Option<f64>,
    x_raw_ingest: Option<f64>,
    x_raw_upstream: Option<f64>,
}

/// One backlog drain.
#[derive(Debug, Clone, Serialize)]
struct DrainPoint {
    modules: usize,
    messages: u64,
    /// Publishing the backlog while the emulator was away (all PUBACKed).
    publish_secs: f64,
    /// `come_back()` → the first message recorded (the hub's reconnect backoff).
    reconnect_secs: f64,
    /// The first message recorded → every module's last message recorded.
    drain_secs: f64,
    /// `come_back()` → every module's last message recorded.
    total_secs: f64,
    /// `messages / total_secs`.
    total_per_s: f64,
    /// `messages / drain_secs`.
    drain_per_s: f64,
    repeats: u64,
    raw_ref_per_s: Option<f64>,
    x_raw_drain: Option<f64>,
    x_raw_total: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Results {
    bench: &'static str,
    schema: u32,
    mode: Mode,
    machine: Machine,
    cpu_busy_end: Option<f64>,
    bench_dir: String,
    filesystem: Option<FsInfo>,
    payload_bytes: usize,
    window: usize,
    warmup_secs: f64,
    point_secs: f64,
    raw_secs: f64,
    raw_fdatasync: Vec<RawFsync>,
    raw_fdatasync_ref_per_s: Option<f64>,
    steady: Vec<SteadyPoint>,
    drain: Vec<DrainPoint>,
    warnings: Vec<String>,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    benches::exit_code("upstream", run())
}

fn runtime(name: &str) -> BenchResult<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn run() -> BenchResult<bool> {
    let cfg = Config::from_args()?;
    let (root, fs) = env::open_bench_dir("upstream", cfg.mode, cfg.point, cfg.warmup)?;
    let machine = Machine::read();
    // The hub on its own runtime, as its binary would run it; the emulator and the modules on
    // another (see the module docs).
    let hub_rt = runtime("hub")?;
    let driver = runtime("driver")?;
    let mut errors = Vec::new();
    // The points write gigabytes: `sync` lets that writeback finish before the disk is timed.
    let mut raw =
        RawSamples::new(root.path(), cfg.warmup, cfg.raw, cfg.only.wants("raw")).sync_first();

    raw.take("start", &mut errors);
    let mut run_no = 0;
    let mut next_dir = || {
        run_no += 1;
        root.path().join(format!("run-{run_no}"))
    };
    let (mut steady, r) = group(
        &cfg,
        "steady",
        &mut next_dir,
        &mut raw,
        &mut errors,
        |dir, n| steady_point(&cfg, dir, n, &hub_rt, &driver),
    );
    for p in &mut steady {
        p.raw_ref_per_s = r;
        p.x_raw_ingest = r.map(|r| report::div(p.ingest_per_s, r));
        p.x_raw_upstream = r.map(|r| report::div(p.upstream_per_s, r));
    }
    let (mut drain, r) = group(
        &cfg,
        "backlog",
        &mut next_dir,
        &mut raw,
        &mut errors,
        |dir, n| drain_point(&cfg, dir, n, &hub_rt, &driver),
    );
    for p in &mut drain {
        p.raw_ref_per_s = r;
        p.x_raw_drain = r.map(|r| report::div(p.drain_per_s, r));
        p.x_raw_total = r.map(|r| report::div(p.total_per_s, r));
    }
    drop(driver);
    drop(hub_rt);

    let raw = raw.into_vec();
    let raw_ref = report::mean(&raw.iter().map(|r| r.rate_per_s).collect::<Vec<_>>());
    let cpu_busy_end = env::cpu_busy(Duration::from_millis(250));
    let warnings = warnings(&machine, cpu_busy_end, &raw, &steady);
    let results = Results {
        bench: "upstream",
        schema: 1,
        mode: cfg.mode,
        machine,
        cpu_busy_end,
        bench_dir: root.path().display().to_string(),
        filesystem: fs,
        payload_bytes: cfg.payload,
        window: cfg.window,
        warmup_secs: cfg.warmup.as_secs_f64(),
        point_secs: cfg.point.as_secs_f64(),
        raw_secs: cfg.raw.as_secs_f64(),
        raw_fdatasync: raw,
        raw_fdatasync_ref_per_s: raw_ref,
        steady,
        drain,
        warnings,
        errors,
    };
    print_report(&results);
    json::save("upstream", results.mode, &results)?;
    Ok(results.errors.is_empty())
}

/// One group of points (`part`: "steady" or "backlog", as `--only` names it), one per module
/// count, each in a fresh run directory removed afterwards, then the raw sample after the group.
/// Returns the points and the group's raw reference (none when `--only` leaves the part out); a
/// point that fails adds to `errors`.
fn group<P>(
    cfg: &Config,
    part: &str,
    next_dir: &mut impl FnMut() -> PathBuf,
    raw: &mut RawSamples<'_>,
    errors: &mut Vec<String>,
    point: impl Fn(&Path, usize) -> BenchResult<P>,
) -> (Vec<P>, Option<f64>) {
    let mut points = Vec::new();
    if !cfg.only.wants(part) {
        return (points, None);
    }
    for &n in &cfg.modules {
        let dir = next_dir();
        match point(&dir, n) {
            Ok(p) => points.push(p),
            Err(e) => errors.push(format!("{part}, {n} modules: {e}")),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let reference = raw.after_group(&format!("after {part}"), errors);
    (points, reference)
}

/// Says when the figures of this run should not be trusted as they stand.
fn warnings(
    machine: &Machine,
    busy_end: Option<f64>,
    raw: &[RawFsync],
    steady: &[SteadyPoint],
) -> Vec<String> {
    let mut out: Vec<String> =
        report::busy_warning(machine, "before the run started", machine.cpu_busy)
            .into_iter()
            .collect();
    // Its own wording ("may be"), as this report has always printed it.
    if let Some(busy) = busy_end.filter(|&b| b > 0.25) {
        out.push(format!(
            "the machine was busy after the run ended ({:.0}% of {} CPUs in use by other \
             work): figures may be low and noisy",
            busy * 100.0,
            machine.cpus
        ));
    }
    out.extend(report::drift_warning(raw));
    for p in steady.iter().filter(|p| p.repeats > 0) {
        out.push(format!(
            "{} modules: {} repeated records (a link broke during the point)",
            p.modules, p.repeats
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The rig: emulator + hub + module credentials

/// A hub in this process whose upstream is an emulator, with N declared modules.
struct Rig {
    emulator: Arc<Emulator>,
    mqtt: SocketAddr,
    tls: Tls,
    modules: Vec<Module>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

#[derive(Clone)]
struct Module {
    client_id: String,
    creds: Creds,
    topic: String,
}

fn manifest(modules: &[String]) -> String {
    let mods: Vec<String> = modules.iter().map(|m| format!("\"{m}\": {{}}")).collect();
    format!(
        r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{{}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{"up": "FROM /messages/* INTO $upstream"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}}}}}"#,
        mods.join(", ")
    )
}

/// A loopback port that was free a moment ago.
/// `e` and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The status line of `GET /readyz`, if anything answered.
async fn readyz(addr: SocketAddr) -> Option<String> {
    let mut tcp =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .map(str::to_owned)
}

impl Rig {
    fn start(dir: &Path, n: usize, hub_rt: &Runtime, driver: &Runtime) -> BenchResult<Rig> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let names: Vec<String> = (0..n).map(|k| format!("m{k}")).collect();
        std::fs::write(dir.join("manifest.json"), manifest(&names))?;
        // The keys the hub will load: created here first so the emulator knows them too.
        let device = DeviceId::new(DEVICE);
        let ids: Vec<ModuleId> = names.iter().map(|m| ModuleId::new(m.as_str())).collect();
        let identities = Identities::load_or_create(&data, &device, &ids)?;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + TOKEN_SECS;
        let mut keys = Vec::new();
        let mut modules = Vec::new();
        for m in &names {
            let key = identities
                .key(&Identity::new(device.clone(), ModuleId::new(m.as_str())))
                .ok_or_else(|| format!("no key for {m}"))?;
            let resource = hub::auth::sas::resource_uri(IOTHUB, DEVICE, Some(m));
            let token = hub::auth::sas::generate(&resource, &key, expiry);
            let client_id = format!("{DEVICE}/{m}");
            modules.push(Module {
                client_id: client_id.clone(),
                creds: Creds {
                    client_id,
                    login: Some((
                        format!("{IOTHUB}/{DEVICE}/{m}/?api-version=2019-10-01"),
                        token,
                    )),
                },
                topic: format!("devices/{DEVICE}/modules/{m}/messages/events/"),
            });
            keys.push(IdentityKey::module(DEVICE, m.as_str(), key));
        }
        let emulator = driver.block_on(Emulator::start(EmulatorConfig {
            hostname: IOTHUB.to_owned(),
            bind: "127.0.0.1:0".parse()?,
            identities: keys,
            tls_dir: dir.join("emulator"),
        }))?;
        let (up_addr, up_ca) = (emulator.addr().to_string(), emulator.ca_pem());
        // The hub serves listeners bound here to port 0: their addresses are known at once.
        let any_port = || Some("127.0.0.1:0".to_owned());
        let settings = RawSettings {
            data_dir: Some(data.clone()),
            manifest: Some(dir.join("manifest.json")),
            mqtt_addr: any_port(),
            metrics_addr: any_port(),
            plain_mqtt_addr: any_port(),
            amqp_addr: any_port(),
            iothub_hostname: Some(IOTHUB.into()),
            device_id: Some(DEVICE.into()),
            gateway_hostname: Some("localhost".into()),
            upstream_protocol: Some("mqtt".into()),
            upstream_addr: Some(up_addr.clone()),
            upstream_ca: Some(up_ca.clone()),
            ..RawSettings::default()
        }
        .validate(None)?;
        let listeners = hub_rt.block_on(hub::server::Listeners::bind(&settings))?;
        let bound = listeners.local_addrs()?;
        let (mqtt, metrics) = (bound.mqtt, bound.http);
        let (stop, stopped) = oneshot::channel::<()>();
        let clock: Arc<dyn store::Clock> = Arc::new(store::SystemClock);
        let task = hub_rt.spawn(async move {
            hub::server::run(settings, listeners, clock, async move {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| error_chain(&e))
        });
        let ready = driver.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !task.is_finished() {
                if readyz(metrics).await.is_some_and(|l| l.contains(" 200")) {
                    return !task.is_finished();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        });
        if ready {
            let tls = Tls::from_ca(&hub::tls::ca_path(&data), "localhost")?;
            return Ok(Rig {
                emulator: Arc::new(emulator),
                mqtt,
                tls,
                modules,
                stop: Some(stop),
                task: Some(task),
            });
        }
        let _ = stop.send(());
        let why = match driver.block_on(task) {
            Ok(Ok(())) => "the hub stopped before it was ready".into(),
            Ok(Err(e)) => e,
            Err(e) => format!("the hub task failed: {e}"),
        };
        Err(format!("the hub did not start: {why}").into())
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.mqtt.to_string(),
            tls: Some(self.tls.clone()),
            nagle: false,
        }
    }

    /// Stops the hub through its shutdown future and waits for it (errors reported).
    fn stop(mut self, driver: &Runtime) -> BenchResult<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let r = driver
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), task).await })
                .map_err(|_| "the hub did not stop within 60 s")??;
            r.map_err(|e| format!("the hub stopped with an error: {e}"))?;
        }
        Ok(())
    }
}

/// The body of message `seq`: the number, zero-padded, then filler to `len` bytes.
fn body(seq: u64, len: usize) -> Bytes {
    let mut b = format!("{seq:0SEQ_DIGITS$}").into_bytes();
    b.resize(len.max(SEQ_DIGITS), b'.');
    Bytes::from(b)
}

fn seq_prefix(seq: u64) -> Vec<u8> {
    format!("{seq:0SEQ_DIGITS$}").into_bytes()
}

/// What a publisher stops at.
#[derive(Clone)]
enum Until {
    /// Until the flag is set (then it waits for its outstanding PUBACKs and returns).
    Stopped(Arc<AtomicBool>),
    /// After this many messages, all PUBACKed.
    Count(u64),
}

/// Publishes QoS 1 messages `0..` as `module` with up to `window` unacknowledged, counting each
/// PUBACK in `acked`; returns how many were sent (all acknowledged).
async fn publisher(
    ep: Endpoint,
    module: Module,
    window: usize,
    payload: usize,
    until: Until,
    acked: Arc<AtomicU64>,
) -> BenchResult<u64> {
    let (mut conn, _) =
        Conn::connect(&ep, &module.creds, true, 60, Duration::from_secs(20)).await?;
    let topic = module.topic.clone();
    let mut next: u64 = 0;
    let mut outstanding: usize = 0;
    let want_more = |next: u64| match &until {
        Until::Stopped(flag) => !flag.load(Ordering::Relaxed),
        Until::Count(n) => next < *n,
    };
    let queue = |conn: &mut Conn, next: &mut u64, k: usize| -> BenchResult<usize> {
        let mut sent = 0;
        while sent < k && want_more(*next) {
            let mut p = Publish::from_bytes(&topic, QoS::AtLeastOnce, body(*next, payload));
            p.pkid = (*next % 60_000) as u16 + 1;
            conn.queue(&Packet::Publish(p))?;
            *next += 1;
            sent += 1;
        }
        Ok(sent)
    };
    outstanding += queue(&mut conn, &mut next, window)?;
    conn.flush().await?;
    while outstanding > 0 {
        let mut acks = 0;
        // At least one packet, then whatever else is already buffered.
        let mut packet = Some(conn.read_packet().await?);
        while let Some(p) = packet {
            match p {
                Packet::PubAck(_) => acks += 1,
                Packet::PingResp => {}
                other => return Err(format!("expected PUBACK, got {other:?}").into()),
            }
            packet = conn.try_packet()?;
        }
        outstanding -= acks.min(outstanding);
        acked.fetch_add(acks as u64, Ordering::Relaxed);
        outstanding += queue(&mut conn, &mut next, acks)?;
        conn.flush().await?;
    }
    conn.disconnect().await;
    Ok(next)
}

// ---------------------------------------------------------------------------------------------
// Steady state

/// `USER_HZ` of `/proc/*/stat` times.
const TICKS_PER_S: f64 = 100.0;

/// CPU ticks (utime + stime) used so far by this process's threads, by thread name: `hub`
/// (the hub's runtime, blocking pool included), `store` (the store's writer, completer and
/// preparer threads), `driver` (emulator and modules), `other`.
fn thread_ticks() -> HashMap<&'static str, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in dir.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // After the parenthesised name: field 3 (state) on; utime = 14, stime = 15.
        let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
            .sum();
        let group = match comm.trim() {
            "hub" => "hub",
            "driver" => "driver",
            c if c.starts_with("store-") => "store",
            _ => "other",
        };
        *out.entry(group).or_insert(0) += ticks;
    }
    out
}

fn steady_point(
    cfg: &Config,
    dir: &Path,
    n: usize,
    hub_rt: &Runtime,
    driver: &Runtime,
) -> BenchResult<SteadyPoint> {
    let rig = Rig::start(dir, n, hub_rt, driver)?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = rig
        .modules
        .iter()
        .map(|m| {
            driver.spawn(publisher(
                rig.endpoint(),
                m.clone(),
                cfg.window,
                cfg.payload,
                Until::Stopped(Arc::clone(&stop)),
                Arc::clone(&acked),
            ))
        })
        .collect();
    std::thread::sleep(cfg.warmup);
    let (a0, r0, t0, c0) = (
        acked.load(Ordering::Relaxed),
        rig.emulator.total() as u64,
        Instant::now(),
        thread_ticks(),
    );
    std::thread::sleep(cfg.point);
    let (a1, r1, secs, c1) = (
        acked.load(Ordering::Relaxed),
        rig.emulator.total() as u64,
        t0.elapsed().as_secs_f64(),
        thread_ticks(),
    );
    let cores = |group: &str| {
        let used =
            c1.get(group).copied().unwrap_or(0) as f64 - c0.get(group).copied().unwrap_or(0) as f64;
        used.max(0.0) / TICKS_PER_S / secs
    };
    stop.store(true, Ordering::Relaxed);
    let mut sent_total = 0;
    for t in tasks {
        sent_total += driver.block_on(t)??;
    }
    // Let the backlog drain so the repeat count covers every message sent.
    let em = Arc::clone(&rig.emulator);
    let ids: Vec<String> = rig.modules.iter().map(|m| m.client_id.clone()).collect();
    driver.block_on(em.wait_for_total(sent_total as usize, cfg.limit))?;
    let recorded: u64 = ids.iter().map(|id| em.count(id) as u64).sum();
    rig.stop(driver)?;
    let p = SteadyPoint {
        modules: n,
        secs,
        ingest_acked: a1 - a0,
        ingest_per_s: (a1 - a0) as f64 / secs,
        upstream_recorded: r1 - r0,
        upstream_per_s: (r1 - r0) as f64 / secs,
        backlog_at_end: a1.saturating_sub(r1),
        repeats: recorded.saturating_sub(sent_total),
        cpu_hub: cores("hub"),
        cpu_store: cores("store"),
        cpu_driver: cores("driver"),
        cpu_other: cores("other"),
        raw_ref_per_s: None,
        x_raw_ingest: None,
        x_raw_upstream: None,
    };
    eprintln!(
        "  steady, {n} modules: ingest {}  upstream {}  backlog at end {}",
        report::rate(p.ingest_per_s),
        report::rate(p.upstream_per_s),
        report::count(p.backlog_at_end as f64)
    );
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Backlog drain

fn drain_point(
    cfg: &Config,
    dir: &Path,
    n: usize,
    hub_rt: &Runtime,
    driver: &Runtime,
) -> BenchResult<DrainPoint> {
    let rig = Rig::start(dir, n, hub_rt, driver)?;
    let per_module = (cfg.backlog / n as u64).max(1);
    let messages = per_module * n as u64;
    let em = Arc::clone(&rig.emulator);
    driver.block_on(em.go_away());
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = rig
        .modules
        .iter()
        .map(|m| {
            driver.spawn(publisher(
                rig.endpoint(),
                m.clone(),
                cfg.window,
                cfg.payload,
                Until::Count(per_module),
                Arc::clone(&acked),
            ))
        })
        .collect();
    for t in tasks {
        driver.block_on(t)??;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    if acked.load(Ordering::Relaxed) != messages || em.total() != 0 {
        return Err(format!(
            "before come_back: {} acknowledged of {messages}, {} recorded",
            acked.load(Ordering::Relaxed),
            em.total()
        )
        .into());
    }
    let lasts: Vec<(String, Vec<u8>)> = rig
        .modules
        .iter()
        .map(|m| (m.client_id.clone(), seq_prefix(per_module - 1)))
        .collect();
    let (reconnect, done) = driver.block_on(async {
        let t0 = Instant::now();
        em.come_back().await?;
        em.wait_for_total(1, cfg.limit).await?;
        let first = t0.elapsed();
        em.wait_until(
            &format!("every module's message {}", per_module - 1),
            cfg.limit,
            |all, _| {
                all.len() as u64 >= messages
                    && lasts.iter().all(|(id, prefix)| {
                        all.iter().rev().any(|r| {
                            r.identity == *id && r.payload.get(..SEQ_DIGITS) == Some(&prefix[..])
                        })
                    })
            },
        )
        .await?;
        BenchResult::Ok((first, t0.elapsed()))
    })?;
    let repeats = (em.total() as u64).saturating_sub(messages);
    rig.stop(driver)?;
    let (total_secs, reconnect_secs) = (done.as_secs_f64(), reconnect.as_secs_f64());
    let drain_secs = (done - reconnect).as_secs_f64();
    let p = DrainPoint {
        modules: n,
        messages,
        publish_secs,
        reconnect_secs,
        drain_secs,
        total_secs,
        total_per_s: messages as f64 / total_secs,
        drain_per_s: messages as f64 / drain_secs,
        repeats,
        raw_ref_per_s: None,
        x_raw_drain: None,
        x_raw_total: None,
    };
    eprintln!(
        "  backlog, {n} × {per_module}: reconnect {:.2} s  drain {:.2} s ({})",
        p.reconnect_secs,
        p.drain_secs,
        report::rate(p.drain_per_s)
    );
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_report(r: &Results) {
    println!();
    println!(
        "edgehub upstream bench ({:?} mode, {} s per steady point after {} s warm-up, {}-byte bodies, window {}, {} CPUs)",
        r.mode, r.point_secs, r.warmup_secs, r.payload_bytes, r.window, r.machine.cpus
    );
    report::print_opening(
        &r.bench_dir,
        r.filesystem.as_ref(),
        &r.raw_fdatasync,
        r.raw_fdatasync_ref_per_s,
    );

    let mut t = Table::new(
        "Steady state: N modules → hub (QoS 1, TLS) → $upstream → IoT Hub emulator (MQTT, TLS)",
        &[
            "modules",
            "ingest acked/s",
            "÷ raw",
            "upstream recorded/s",
            "÷ raw",
            "backlog at end",
            "repeats",
            "CPU hub",
            "CPU store",
            "CPU emu+modules",
            "CPU other",
        ],
    );
    for p in &r.steady {
        t.row([
            p.modules.to_string(),
            report::rate(p.ingest_per_s),
            p.x_raw_ingest.map_or("-".into(), report::ratio),
            report::rate(p.upstream_per_s),
            p.x_raw_upstream.map_or("-".into(), report::ratio),
            report::count(p.backlog_at_end as f64),
            p.repeats.to_string(),
            format!("{:.2}", p.cpu_hub),
            format!("{:.2}", p.cpu_store),
            format!("{:.2}", p.cpu_driver),
            format!("{:.2}", p.cpu_other),
        ]);
    }
    t.note("ingest acked/s: hub PUBACKs to the modules in the window (each message durable in the store).");
    t.note("upstream recorded/s: messages the emulator recorded in the window (it records before its PUBACK).");
    t.note("backlog at end: acknowledged by the hub, not yet recorded upstream, at the end of the window.");
    t.note(
        "÷ raw: ÷ the mean of the raw fdatasync samples just before and after the steady points.",
    );
    t.note("CPU: cores used in the window by the hub's runtime threads, the store's threads, the emulator and module clients' runtime, other threads (2 cores in all).");
    if !t.is_empty() {
        println!("{t}");
    }

    let mut d = Table::new(
        "Backlog drain: emulator away, backlog published and PUBACKed, emulator back",
        &[
            "modules",
            "messages",
            "publish",
            "reconnect",
            "drain",
            "drain msgs/s",
            "÷ raw",
            "back → last",
            "msgs/s",
            "÷ raw",
            "repeats",
        ],
    );
    for p in &r.drain {
        d.row([
            p.modules.to_string(),
            report::count(p.messages as f64),
            format!("{:.2} s", p.publish_secs),
            format!("{:.2} s", p.reconnect_secs),
            format!("{:.2} s", p.drain_secs),
            report::rate(p.drain_per_s),
            p.x_raw_drain.map_or("-".into(), report::ratio),
            format!("{:.2} s", p.total_secs),
            report::rate(p.total_per_s),
            p.x_raw_total.map_or("-".into(), report::ratio),
            p.repeats.to_string(),
        ]);
    }
    d.note("reconnect: come_back() → first message recorded (the hub's upstream link backoff, capped at 10 s).");
    d.note("drain: first message recorded → every module's last message recorded (Emulator::wait_until).");
    d.note(
        "back → last: come_back() → every module's last message recorded; msgs/s over that time.",
    );
    if !d.is_empty() {
        println!("{d}");
    }
    println!("Hub (hub::server::run, bench profile) on its own 2-thread runtime; emulator and module clients on another, same process.");
    report::print_problems(&r.warnings, &r.errors);
}
