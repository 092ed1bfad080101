//! Router figures: `cargo bench -p benches --bench router [-- --quick]`.
//!
//! A report, never a timed test: it prints figures and ratios and asserts nothing about speed.
//! In one run it measures
//!
//! 1. the raw 4 KiB append + `fdatasync` rate of the disk under the bench directory (one sample
//!    before the end-to-end points and one after each group of them);
//! 2. route evaluation: `RouteTable::targets` for a realistic 20-route manifest with `WHERE`
//!    clauses on application properties, system properties and `$body` of `application/json`
//!    messages, for messages that match no route, one route, and several routes (ns/message);
//! 3. end to end: N producer tasks (1, 8, 64), each awaiting `router.route(msg)` in a loop, into
//!    a real store (group commit), through the endpoint workers, to in-memory sinks that
//!    acknowledge at once; for one endpoint, for eight endpoints each message going to one of
//!    them, and (not under `--quick`) for eight endpoints each message going to all of them.
//!    Reported: messages routed per second (acknowledged = durable), deliveries per second,
//!    route-ack latency, end-to-end latency (the send time carried in the message → the sink),
//!    messages per `fdatasync` (from `Store::stats()`), all as ratios to the raw rate,
//!
//! then writes the raw results to `target/bench-results/router.json`.
//!
//! Options (after `--`): `--quick` (~6 s in all), `--only raw,eval,e2e`, `--producers 1,8,64`,
//! `--layouts one,spread8,fanout8`. Environment: `EDGEHUB_BENCH_DIR` (where data goes; default
//! `target/bench-tmp`, never `/tmp`), `EDGEHUB_BENCH_SECS` (seconds per end-to-end point).
//!
//! Run without `--bench` (as `cargo test --benches` does) it only smoke-tests itself for a
//! fraction of a second per point and writes no JSON.

use benches::args::{Args, Mode, Only};
use benches::env::{self, FsInfo, Machine};
use benches::fsync::{RawFsync, RawSamples};
use benches::latency::{LatencyRecorder, LatencySummary};
use benches::load::{self, LoadSpec, Window};
use benches::report::{self, Table};
use benches::{json, BenchResult};
use bytes::Bytes;
use router::{
    parse_edge_hub_desired, Delivery, DeliveryOutcome, DeviceId, Dispatcher, DispatcherConfig,
    Endpoint, InputName, Message, ModuleId, OutputName, Priority, Route, RouteId, RouteOutcome,
    RouteTable, Router, Sink, Source, SystemProperty, Ttl,
};
use serde::Serialize;
use std::hint::black_box;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use store::{Epoch, Store, StoreOptions, StoreStats, SystemClock};

/// The application property carrying the send time (ns since [`epoch`]).
const SENT_NS: &str = "bench-sent-ns";

/// How the end-to-end messages map onto endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Layout {
    /// Every message to `$upstream`.
    One,
    /// Eight module-input endpoints; each message to one of them (round-robin by sequence).
    Spread8,
    /// Eight module-input endpoints; each message to all of them (stored once).
    Fanout8,
}

impl Layout {
    fn parse(s: &str) -> Option<Layout> {
        match s {
            "one" => Some(Layout::One),
            "spread8" => Some(Layout::Spread8),
            "fanout8" => Some(Layout::Fanout8),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layout::One => "1 endpoint",
            Layout::Spread8 => "8 endpoints, each msg to 1",
            Layout::Fanout8 => "8 endpoints, each msg to 8",
        }
    }

    fn endpoints(self) -> usize {
        match self {
            Layout::One => 1,
            Layout::Spread8 | Layout::Fanout8 => 8,
        }
    }

    /// Endpoint copies per routed message.
    fn copies(self) -> u64 {
        match self {
            Layout::One | Layout::Spread8 => 1,
            Layout::Fanout8 => 8,
        }
    }

    fn endpoint_list(self) -> Vec<Endpoint> {
        match self {
            Layout::One => vec![Endpoint::Upstream],
            Layout::Spread8 | Layout::Fanout8 => (0..8).map(sink_input).collect(),
        }
    }

    fn table(self) -> BenchResult<RouteTable> {
        let mut routes = Vec::new();
        match self {
            Layout::One => routes.push(Route::parse(
                RouteId::new("all"),
                "FROM /messages/* INTO $upstream",
                Priority(0),
                Ttl::Infinite,
            )?),
            Layout::Spread8 | Layout::Fanout8 => {
                for k in 0..8 {
                    let from = if self == Layout::Spread8 {
                        format!("/messages/modules/m{k}/*")
                    } else {
                        "/messages/*".to_owned()
                    };
                    routes.push(Route::parse(
                        RouteId::new(format!("r{k}")),
                        &format!(
                            "FROM {from} INTO BrokeredEndpoint(\"/modules/sink{k}/inputs/in\")"
                        ),
                        Priority(0),
                        Ttl::Infinite,
                    )?);
                }
            }
        }
        Ok(RouteTable::new(routes))
    }
}

fn sink_input(k: usize) -> Endpoint {
    Endpoint::ModuleInput {
        module: ModuleId::new(format!("sink{k}")),
        input: InputName::new("in"),
    }
}

#[derive(Debug, Clone)]
struct Config {
    /// Full: 5 s per end-to-end point; quick: 0.5 s per point, no fan-out layout.
    mode: Mode,
    warmup: Duration,
    point: Duration,
    raw: Duration,
    /// Measured time per route-evaluation case.
    eval: Duration,
    producers: Vec<usize>,
    layouts: Vec<Layout>,
    payload: usize,
    only: Only,
}

impl Config {
    fn from_args() -> BenchResult<Config> {
        let args = Args::from_env("router", &["--producers", "--layouts"]);
        let only = args.only("raw,eval,e2e")?;
        let producers = args.list("--producers", "e.g. 1,8,64")?;
        let layouts = args.value("--layouts", "e.g. one,spread8,fanout8", |v| {
            v.split(',')
                .map(|l| Layout::parse(l.trim()).ok_or(format!("unknown layout {l}")))
                .collect()
        })?;
        let mode = args.mode();
        let ms = Duration::from_millis;
        let (warmup, mut point, raw, eval) = match mode {
            Mode::Full => (ms(1000), ms(5000), ms(3000), ms(2000)),
            Mode::Quick => (ms(200), ms(500), ms(300), ms(200)),
            Mode::Smoke => (ms(50), ms(150), ms(100), ms(30)),
        };
        if let Some(p) = env::point_from_env()? {
            point = p;
        }
        let producers = producers.unwrap_or_else(|| match mode {
            Mode::Smoke => vec![1, 8],
            _ => vec![1, 8, 64],
        });
        let layouts = layouts.unwrap_or_else(|| match mode {
            Mode::Full => vec![Layout::One, Layout::Spread8, Layout::Fanout8],
            Mode::Quick | Mode::Smoke => vec![Layout::One, Layout::Spread8],
        });
        Ok(Config {
            mode,
            warmup,
            point,
            raw,
            eval,
            producers,
            layouts,
            payload: 256,
            only,
        })
    }
}

/// One route-evaluation case.
#[derive(Debug, Clone, Serialize)]
struct EvalPoint {
    case: &'static str,
    /// Targets the message got (checked against the case's expectation).
    targets: usize,
    /// Routes whose `FROM` selects the message (their `WHERE` is evaluated).
    from_matches: usize,
    evaluations: u64,
    secs: f64,
    ns_per_message: f64,
    evaluations_per_s: f64,
    /// `evaluations_per_s` ÷ the run's raw fdatasync rate: how many messages one core can route
    /// (evaluate) in the time the disk takes for one fdatasync.
    x_raw_fdatasync: Option<f64>,
}

/// One end-to-end (layout, producers) measurement.
#[derive(Debug, Clone, Serialize)]
struct E2ePoint {
    layout: Layout,
    endpoints: usize,
    producers: usize,
    payload_bytes: usize,
    secs: f64,
    /// Messages whose `route` acknowledgement (durable) completed inside the window.
    routed: u64,
    routed_per_s: f64,
    /// Endpoint copies the sinks received inside the window.
    deliveries: u64,
    deliveries_per_s: f64,
    /// Store appends and fdatasyncs over the window (checkpoints share the commits).
    appends: u64,
    fdatasyncs: u64,
    msgs_per_fdatasync: f64,
    /// `route(msg).await` latency: submission to durable acknowledgement.
    ack_latency: LatencySummary,
    /// Send time carried in the message → the sink, for copies delivered in the window.
    e2e_latency: LatencySummary,
    /// Endpoint copies stored but not yet delivered when the window closed.
    backlog_at_close: u64,
    raw_ref_per_s: Option<f64>,
    x_raw_routed: Option<f64>,
    x_raw_deliveries: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    bench: &'static str,
    schema: u32,
    mode: Mode,
    machine: Machine,
    /// Fraction of all CPUs busy (other work) just after the run.
    cpu_busy_end: Option<f64>,
    bench_dir: String,
    filesystem: Option<FsInfo>,
    payload_bytes: usize,
    warmup_secs: f64,
    point_secs: f64,
    raw_secs: f64,
    raw_fdatasync: Vec<RawFsync>,
    raw_fdatasync_ref_per_s: Option<f64>,
    manifest_routes: usize,
    eval: Vec<EvalPoint>,
    e2e: Vec<E2ePoint>,
    warnings: Vec<String>,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    benches::exit_code("router", run())
}

fn run() -> BenchResult<bool> {
    let cfg = Config::from_args()?;
    let (root, fs) = env::open_bench_dir("router", cfg.mode, cfg.point, cfg.warmup)?;
    let machine = Machine::read();
    let mut errors = Vec::new();
    let mut raw = RawSamples::new(root.path(), cfg.warmup, cfg.raw, cfg.only.wants("raw"));

    raw.take("start", &mut errors);
    let table = manifest_table()?;
    let manifest_routes = table.routes().len();
    let mut eval = Vec::new();
    if cfg.only.wants("eval") {
        match eval_points(&cfg, &table) {
            Ok(points) => eval = points,
            Err(e) => errors.push(format!("route evaluation: {e}")),
        }
    }

    let mut e2e = Vec::new();
    if cfg.only.wants("e2e") {
        for &layout in &cfg.layouts {
            let first = e2e.len();
            for &n in &cfg.producers {
                match e2e_point(&cfg, root.path(), layout, n) {
                    Ok(p) => e2e.push(p),
                    Err(e) => errors.push(format!("{}, {n} producers: {e}", layout.name())),
                }
            }
            let reference = raw.after_group(&format!("after {}", layout.name()), &mut errors);
            for p in &mut e2e[first..] {
                p.raw_ref_per_s = reference;
                p.x_raw_routed = reference.map(|r| report::div(p.routed_per_s, r));
                p.x_raw_deliveries = reference.map(|r| report::div(p.deliveries_per_s, r));
            }
        }
    }
    let raw = raw.into_vec();
    let raw_ref = report::mean(&raw.iter().map(|r| r.rate_per_s).collect::<Vec<_>>());
    for p in &mut eval {
        p.x_raw_fdatasync = raw_ref.map(|r| report::div(p.evaluations_per_s, r));
    }
    let cpu_busy_end = env::cpu_busy(Duration::from_millis(250));
    let warnings = warnings(&machine, cpu_busy_end, &raw);
    let results = Results {
        bench: "router",
        schema: 1,
        mode: cfg.mode,
        machine,
        cpu_busy_end,
        bench_dir: root.path().display().to_string(),
        filesystem: fs,
        payload_bytes: cfg.payload,
        warmup_secs: cfg.warmup.as_secs_f64(),
        point_secs: cfg.point.as_secs_f64(),
        raw_secs: cfg.raw.as_secs_f64(),
        raw_fdatasync: raw,
        raw_fdatasync_ref_per_s: raw_ref,
        manifest_routes,
        eval,
        e2e,
        warnings,
        errors,
    };
    print_report(&results);
    json::save("router", results.mode, &results)?;
    Ok(results.errors.is_empty())
}

/// Says when the figures of this run should not be trusted as they stand.
fn warnings(machine: &Machine, busy_end: Option<f64>, raw: &[RawFsync]) -> Vec<String> {
    [
        report::busy_warning(machine, "before the run started", machine.cpu_busy),
        report::busy_warning(machine, "after it ended", busy_end),
        report::drift_warning(raw),
    ]
    .into_iter()
    .flatten()
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Route evaluation

/// A realistic `$edgeHub` manifest: an industrial gateway with an OPC publisher, a simulated
/// temperature sensor, a filter, leaf devices and a handful of analytics modules. 20 routes,
/// most with a `WHERE` on application properties, system properties or the JSON body.
const MANIFEST: &str = r#"{
  "schemaVersion": "1.1",
  "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 },
  "routes": {
    "opcToCloud": { "route": "FROM /messages/modules/opcPublisher/outputs/telemetry WHERE $body.quality = 'good' INTO $upstream", "priority": 5 },
    "opcBadQuality": "FROM /messages/modules/opcPublisher/outputs/telemetry WHERE $body.quality != 'good' INTO BrokeredEndpoint(\"/modules/diagnostics/inputs/quality\")",
    "alertsToCloud": { "route": "FROM /messages/modules/filter/outputs/alerts WHERE level = 'critical' INTO $upstream", "priority": 0, "timeToLiveSecs": 86400 },
    "warningsToCloud": { "route": "FROM /messages/modules/filter/outputs/alerts WHERE level = 'warning' INTO $upstream", "priority": 3 },
    "sensorToFilter": "FROM /messages/modules/tempSensor/outputs/temperatureOutput WHERE $body.machine.temperature > 100 INTO BrokeredEndpoint(\"/modules/filter/inputs/input1\")",
    "humidityToHvac": "FROM /messages/modules/tempSensor/outputs/* WHERE $contentType = 'application/json' AND $body.ambient.humidity >= 60 INTO BrokeredEndpoint(\"/modules/hvac/inputs/humidity\")",
    "anomalyDetect": "FROM /messages/modules/tempSensor/* WHERE $body.machine.pressure < 1 OR $body.machine.temperature > 120 INTO BrokeredEndpoint(\"/modules/anomaly/inputs/in\")",
    "vibrationSchema": "FROM /messages/modules/* WHERE $messageSchema = 'vibration-v2' INTO BrokeredEndpoint(\"/modules/vibration/inputs/raw\")",
    "leafTelemetry": { "route": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) AND STARTS_WITH($connectionDeviceId, 'leaf-') INTO $upstream", "priority": 4 },
    "leafBattery": "FROM /messages/* WHERE IS_DEFINED(battery) AND AS_NUMBER(battery) < 15 INTO BrokeredEndpoint(\"/modules/maintenance/inputs/battery\")",
    "firmwareEvents": "FROM /messages/* WHERE eventType = 'firmware' AND $body.version <> '' INTO BrokeredEndpoint(\"/modules/fleet/inputs/firmware\")",
    "siteA": "FROM /messages/modules/* WHERE site = 'A' AND (line = '1' OR line = '2') INTO BrokeredEndpoint(\"/modules/siteA/inputs/in\")",
    "energyMeter": "FROM /messages/modules/energy/outputs/* WHERE $body.kwh > 0 INTO BrokeredEndpoint(\"/modules/billing/inputs/readings\")",
    "energyPeak": { "route": "FROM /messages/modules/energy/outputs/* WHERE $body.kw * 1000 > 250000 INTO $upstream", "priority": 1 },
    "cameraEvents": "FROM /messages/modules/camera/outputs/detections WHERE $body.confidence >= 0.8 AND ($body.label = 'person' OR $body.label = 'forklift') INTO BrokeredEndpoint(\"/modules/safety/inputs/detections\")",
    "twinChanges": "FROM /twinChangeNotifications INTO BrokeredEndpoint(\"/modules/config/inputs/twin\")",
    "correlated": "FROM /messages/modules/* WHERE IS_DEFINED($correlationId) AND LENGTH($correlationId) = 36 INTO BrokeredEndpoint(\"/modules/tracing/inputs/in\")",
    "debugSampling": "FROM /messages/* WHERE debug = 'true' OR LOWER($connectionDeviceId) = 'test-device' INTO BrokeredEndpoint(\"/modules/debug/inputs/in\")",
    "archiveFilter": { "route": "FROM /messages/modules/filter/* INTO BrokeredEndpoint(\"/modules/archiver/inputs/filter\")", "priority": 8 },
    "archiveOpc": { "route": "FROM /messages/modules/opcPublisher/* WHERE $body.value != null INTO BrokeredEndpoint(\"/modules/archiver/inputs/opc\")", "priority": 9, "timeToLiveSecs": 600 }
  }
}"#;

fn manifest_table() -> BenchResult<RouteTable> {
    Ok(parse_edge_hub_desired(MANIFEST)?.routes)
}

/// A `tempSensor` reading: seven routes' `FROM` select it, and their `WHERE` clauses read the
/// JSON body, system properties and application properties.
fn sensor_message(temperature: f64, humidity: u32, pressure: f64) -> Message {
    let source = Source::ModuleOutput {
        device: DeviceId::new("gateway-01"),
        module: ModuleId::new("tempSensor"),
        output: Some(OutputName::new("temperatureOutput")),
    };
    let body = format!(
        r#"{{"machine":{{"temperature":{temperature},"pressure":{pressure}}},"ambient":{{"temperature":21.4,"humidity":{humidity}}},"timeCreated":"2026-11-24T10:15:00.1234567Z"}}"#
    );
    Message::new(source, body)
        .with_property("site", "B")
        .with_property("line", "3")
        .with_system_property(SystemProperty::ContentType, "application/json")
        .with_system_property(SystemProperty::ContentEncoding, "utf-8")
        .with_system_property(
            SystemProperty::MessageId,
            "7b0a3c1e-0c1d-4d4e-9d43-8f2f4b5e6a71",
        )
}

fn eval_points(cfg: &Config, table: &RouteTable) -> BenchResult<Vec<EvalPoint>> {
    // (case, message, expected targets)
    let several = sensor_message(125.0, 70, 0.5)
        .with_property("site", "A")
        .with_property("line", "2")
        .with_system_property(
            SystemProperty::CorrelationId,
            "0f8fad5b-d9cb-469f-a165-70867728950e",
        );
    let cases: [(&'static str, Message, usize); 3] = [
        ("matches 0 routes", sensor_message(21.5, 40, 2.1), 0),
        ("matches 1 route", sensor_message(105.0, 40, 2.1), 1),
        ("matches 5 routes", several, 5),
    ];
    let mut out = Vec::new();
    for (case, msg, expected) in cases {
        let targets = table.targets(&msg).into_vec().len();
        if targets != expected {
            return Err(
                format!("{case}: the message got {targets} targets, expected {expected}").into(),
            );
        }
        let from_matches = table
            .routes()
            .iter()
            .filter(|r| r.source().matches(msg.source()))
            .count();
        let mut evaluations = 0u64;
        let started = Instant::now();
        let until = started + cfg.eval;
        while Instant::now() < until {
            for _ in 0..256 {
                let _ = black_box(table.targets(black_box(&msg)));
            }
            evaluations += 256;
        }
        let elapsed = started.elapsed();
        let p = EvalPoint {
            case,
            targets,
            from_matches,
            evaluations,
            secs: elapsed.as_secs_f64(),
            ns_per_message: elapsed.as_nanos() as f64 / evaluations.max(1) as f64,
            evaluations_per_s: load::per_second(evaluations, elapsed),
            x_raw_fdatasync: None,
        };
        eprintln!(
            "  route eval, {case}: {:.0} ns/message ({} targets, {} FROM matches)",
            p.ns_per_message, p.targets, p.from_matches
        );
        out.push(p);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// End to end

/// The instant send times are measured from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What the sinks of one point share.
#[derive(Debug, Default)]
struct SinkShared {
    measuring: AtomicBool,
    deliveries: AtomicU64,
    latency: Mutex<LatencyRecorder>,
}

/// Acknowledges every delivery at once; inside the window, counts it and records its
/// end-to-end latency from the send time the message carries.
#[derive(Debug, Clone)]
struct BenchSink(Arc<SinkShared>);

impl Sink for BenchSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        if self.0.measuring.load(Ordering::Relaxed) {
            let now = now_ns();
            if let Ok(mut rec) = self.0.latency.lock() {
                for d in &batch {
                    if let Some(sent) = d.message.property(SENT_NS).and_then(|s| s.parse().ok()) {
                        rec.record(Duration::from_nanos(now.saturating_sub(sent)));
                    }
                }
            }
            self.0
                .deliveries
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        vec![DeliveryOutcome::Delivered; batch.len()]
    }
}

/// Counters at one edge of the window.
struct Snapshot {
    store: StoreStats,
    routed: u64,
    delivered: u64,
}

fn e2e_point(cfg: &Config, root: &Path, layout: Layout, producers: usize) -> BenchResult<E2ePoint> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("router-{layout:?}-{producers}-"))
        .tempdir_in(root)?;
    let store = Store::open(
        dir.path(),
        StoreOptions {
            epoch: Epoch::new(1),
            ..StoreOptions::default()
        },
    )?;
    // The workers run on their own two-thread runtime; the producers on the one
    // `closed_loop_async` builds (two threads too).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("router-bench-workers")
        .enable_time()
        .build()?;
    let dispatcher = {
        let _entered = runtime.enter();
        Dispatcher::start(
            store.clone(),
            Arc::new(SystemClock),
            DispatcherConfig::default(),
        )?
    };
    let shared = Arc::new(SinkShared::default());
    for endpoint in layout.endpoint_list() {
        dispatcher.register_sink(&endpoint, BenchSink(Arc::clone(&shared)));
    }
    let router = Arc::new(Router::new(layout.table()?, &dispatcher));
    let body = Bytes::from(vec![b'x'; cfg.payload]);

    let mut before = None;
    let mut after = None;
    let snapshot = |router: &Router| {
        let m = router.metrics();
        Snapshot {
            store: store.stats(),
            routed: m.routed,
            delivered: m.delivered,
        }
    };
    let hook = |w| {
        match w {
            Window::Open => {
                before = Some(snapshot(&router));
                shared.measuring.store(true, Ordering::Relaxed);
            }
            Window::Close => {
                shared.measuring.store(false, Ordering::Relaxed);
                after = Some(snapshot(&router));
            }
        }
        Ok(())
    };
    let out = load::closed_loop_async(
        &LoadSpec {
            threads: producers,
            warmup: cfg.warmup,
            measure: cfg.point,
        },
        |i| {
            let (router, body) = (Arc::clone(&router), body.clone());
            let mut seq = 0u64;
            Ok(move || {
                let module = match layout {
                    Layout::Spread8 => format!("m{}", seq % 8),
                    Layout::One | Layout::Fanout8 => format!("m{}", i % 8),
                };
                seq += 1;
                let msg = Message::new(
                    Source::ModuleOutput {
                        device: DeviceId::new("gateway-01"),
                        module: ModuleId::new(module),
                        output: Some(OutputName::new("out")),
                    },
                    body.clone(),
                )
                .with_system_property(SystemProperty::ContentType, "application/octet-stream")
                .with_property(SENT_NS, now_ns().to_string());
                let ack = router.route(msg);
                async move {
                    match ack.await {
                        Ok(RouteOutcome::Stored { .. }) => Ok(()),
                        Ok(RouteOutcome::Unrouted) => Err("a bench message was unrouted".into()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
        },
        hook,
    );
    runtime.block_on(dispatcher.shutdown());
    drop(router);
    store.close()?;
    drop(runtime);
    let out = out?;
    let (Some(before), Some(after)) = (before, after) else {
        return Err("the window hooks did not run".into());
    };
    let appends = after.store.appends.saturating_sub(before.store.appends);
    let fdatasyncs = after.store.syncs.saturating_sub(before.store.syncs);
    let deliveries = shared.deliveries.load(Ordering::Relaxed);
    let e2e_latency = shared
        .latency
        .lock()
        .map(|r| r.summary())
        .unwrap_or_default();
    let p = E2ePoint {
        layout,
        endpoints: layout.endpoints(),
        producers,
        payload_bytes: cfg.payload,
        secs: out.elapsed.as_secs_f64(),
        routed: out.ops,
        routed_per_s: out.rate(),
        deliveries,
        deliveries_per_s: load::per_second(deliveries, out.elapsed),
        appends,
        fdatasyncs,
        msgs_per_fdatasync: report::div(appends as f64, fdatasyncs as f64),
        ack_latency: out.latency.summary(),
        e2e_latency,
        backlog_at_close: (after.routed * layout.copies()).saturating_sub(after.delivered),
        raw_ref_per_s: None,
        x_raw_routed: None,
        x_raw_deliveries: None,
    };
    eprintln!(
        "  {:<27} {:>2} producers: routed {}  delivered {}  {:.1} msgs/fdatasync  e2e p50 {} p99 {}",
        layout.name(),
        producers,
        report::rate(p.routed_per_s),
        report::rate(p.deliveries_per_s),
        p.msgs_per_fdatasync,
        report::micros(p.e2e_latency.p50_us),
        report::micros(p.e2e_latency.p99_us),
    );
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// Report

fn print_report(r: &Results) {
    println!();
    println!(
        "edgehub router bench ({:?} mode, {} s per end-to-end point, {}-byte bodies, {} CPUs)",
        r.mode, r.point_secs, r.payload_bytes, r.machine.cpus
    );
    report::print_opening(
        &r.bench_dir,
        r.filesystem.as_ref(),
        &r.raw_fdatasync,
        r.raw_fdatasync_ref_per_s,
    );

    let mut ev = Table::new(
        format!(
            "Route evaluation: RouteTable::targets, {}-route manifest, one core",
            r.manifest_routes
        ),
        &[
            "message",
            "targets",
            "FROM matches",
            "ns/message",
            "messages/s",
            "÷ raw fdatasync",
        ],
    );
    for p in &r.eval {
        ev.row([
            p.case.to_string(),
            p.targets.to_string(),
            p.from_matches.to_string(),
            format!("{:.0}", p.ns_per_message),
            report::rate(p.evaluations_per_s),
            p.x_raw_fdatasync.map_or("-".into(), report::ratio),
        ]);
    }
    ev.note("A tempSensor reading with a JSON body and content type; FROM matches: routes whose WHERE is evaluated.");
    ev.note(
        "The body is parsed as JSON once per message, whatever the number of $body conditions.",
    );
    if !ev.is_empty() {
        println!("{ev}");
    }

    let mut t = Table::new(
        format!(
            "End to end: route → store (group commit) → endpoint worker → sink, {}-byte bodies",
            r.payload_bytes
        ),
        &[
            "layout",
            "producers",
            "routed/s",
            "÷ raw",
            "deliveries/s",
            "÷ raw",
            "msgs/fdatasync",
            "ack p50",
            "ack p99",
            "e2e p50",
            "e2e p99",
            "backlog",
        ],
    );
    for p in &r.e2e {
        t.row([
            p.layout.name().to_string(),
            p.producers.to_string(),
            report::rate(p.routed_per_s),
            p.x_raw_routed.map_or("-".into(), report::ratio),
            report::rate(p.deliveries_per_s),
            p.x_raw_deliveries.map_or("-".into(), report::ratio),
            format!("{:.1}", p.msgs_per_fdatasync),
            report::micros(p.ack_latency.p50_us),
            report::micros(p.ack_latency.p99_us),
            report::micros(p.e2e_latency.p50_us),
            report::micros(p.e2e_latency.p99_us),
            report::count(p.backlog_at_close as f64),
        ]);
    }
    t.note(
        "routed/s: route(msg).await completed (durable in every target queue) inside the window.",
    );
    t.note("deliveries/s: endpoint copies the sinks acknowledged inside the window (fan-out: 8 per message).");
    t.note(
        "÷ raw: ÷ the mean of the raw fdatasync samples just before and after the layout's group.",
    );
    t.note("msgs/fdatasync: store appends ÷ fdatasyncs in the window (checkpoints ride the same commits).");
    t.note("ack: route → durable ack; e2e: send time in the message → sink. backlog: copies undelivered at close.");
    t.note("Producers: N tokio tasks on a 2-thread runtime; workers and sinks on another 2-thread runtime.");
    if !t.is_empty() {
        println!("{t}");
    }
    report::print_problems(&r.warnings, &r.errors);
}
