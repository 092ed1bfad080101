//! `loadgen`: the ordered MQTT 3.1.1 QoS 1 load generator of the peers bench.
//!
//! P publishers each send N numbered messages (payload: magic, run id,
//! publisher, sequence number, send time in ns since the Unix epoch, padded to
//! B bytes), at most `--window` unacknowledged each. Receivers subscribe first
//! (persistent sessions, every SUBACK awaited), then all publishers start
//! together. Per publisher it counts delivered, lost, duplicated and reordered
//! messages (reordered = a first arrival whose sequence number is lower than
//! the highest already seen), end-to-end latency (HdrHistogram), the PUBACK
//! and delivery rates, and CPU from /proc (its own, the broker's process tree
//! via `--broker-pid`, the machine's). JSON goes to `--json FILE` (and stdout),
//! a summary line to stderr. Exit 1 on any loss, reordering or error.
//!
//! Targets: `--target mqtt` (topics `bench/{i}`; W2's receiver on `bench/#`)
//! or `--target edgehub --keys FILE` (module logins with SAS tokens from the
//! connection strings in FILE; publisher `p{i}` output `out1` routed to
//! receiver `r{i}`, fan-in publishers `f{i}` routed to receiver `fan`).
//!
//! Kill -9 checks: `--crash-tolerant` reconnects after a lost connection and
//! resends every unacknowledged message in order (duplicates allowed);
//! `--phase publish` subscribes the receivers, takes them offline and
//! publishes everything (exit 0 once all is acknowledged); `--phase receive`
//! (same `--run-id`) brings the receivers back and counts what arrives.
//!
//! `loadgen --help` lists the flags.

use benches::latency::{LatencyRecorder, LatencySummary};
use benches::mqtt::{Conn, ConnectionString, Creds, Endpoint, Tls};
use benches::procstat::{self, CpuMark, CpuWindow};
use benches::BenchResult;
use bytes::Bytes;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const MAGIC: &[u8; 4] = b"EHB1";
const HEADER: usize = 32;
const KEEP_ALIVE: u16 = 600;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const HELP: &str = "loadgen: ordered MQTT 3.1.1 QoS 1 load generator (benches/peers.sh)

  --addr HOST:PORT        broker (default 127.0.0.1:1883)
  --tls-ca FILE           use TLS, trusting this CA (PEM)
  --tls-name NAME         server name to check (default localhost)
  --target mqtt|edgehub   topics and logins (default mqtt)
  --keys FILE             edgehub module connection strings, one a line
  -p N                    publishers (default 1)
  -n N                    messages per publisher (default 1000)
  --mode pairs|fanin      receiver i <- publisher i, or one receiver for all
  -b BYTES                payload size, >= 32 (default 256)
  --window N              unacknowledged messages per publisher (default 100)
  --rate R                messages/s per publisher, 0 = as fast as possible
  --grace SECS            wait this long without traffic before calling a message lost (10)
  --timeout SECS          give up after this long (600)
  --crash-tolerant        reconnect and resend unacknowledged messages in order
  --phase all|publish|receive   (default all)
  --run-id N              shared by the publish and receive phases
  --broker-pid PID        measure this process tree's CPU and peak RSS
  --label TEXT            name of this run in the JSON
  --json FILE             also write the JSON result here
  --no-reset              keep existing sessions (default: discard them first)
  --nagle                 leave Nagle's algorithm on
  --metrics-addr HOST:PORT  edgehub's /metrics: count its fdatasyncs over the run
";

#[derive(Clone, Copy, PartialEq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Pairs,
    Fanin,
}

#[derive(Clone, Copy, PartialEq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    All,
    Publish,
    Receive,
}

#[derive(Clone, Debug, Serialize)]
struct Params {
    addr: String,
    tls: bool,
    target: String,
    publishers: u32,
    messages: u64,
    mode: Mode,
    bytes: usize,
    window: usize,
    rate: f64,
    grace_s: f64,
    timeout_s: f64,
    crash_tolerant: bool,
    phase: Phase,
    run_id: u64,
    nagle: bool,
}

struct Opts {
    p: Params,
    tls_ca: Option<PathBuf>,
    tls_name: String,
    keys: Option<PathBuf>,
    broker_pid: Option<u32>,
    label: String,
    json: Option<PathBuf>,
    reset: bool,
    metrics_addr: Option<String>,
}

fn parse_args() -> BenchResult<Opts> {
    let mut o = Opts {
        p: Params {
            addr: "127.0.0.1:1883".into(),
            tls: false,
            target: "mqtt".into(),
            publishers: 1,
            messages: 1000,
            mode: Mode::Pairs,
            bytes: 256,
            window: 100,
            rate: 0.0,
            grace_s: 10.0,
            timeout_s: 600.0,
            crash_tolerant: false,
            phase: Phase::All,
            run_id: now_ns() ^ u64::from(std::process::id()),
            nagle: false,
        },
        tls_ca: None,
        tls_name: "localhost".into(),
        keys: None,
        broker_pid: None,
        label: String::new(),
        json: None,
        reset: true,
        metrics_addr: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--addr" => o.p.addr = val()?,
            "--tls-ca" => o.tls_ca = Some(val()?.into()),
            "--tls-name" => o.tls_name = val()?,
            "--target" => o.p.target = val()?,
            "--keys" => o.keys = Some(val()?.into()),
            "-p" => o.p.publishers = val()?.parse()?,
            "-n" => o.p.messages = val()?.parse()?,
            "--mode" => {
                o.p.mode = match val()?.as_str() {
                    "pairs" => Mode::Pairs,
                    "fanin" => Mode::Fanin,
                    m => return Err(format!("unknown mode {m}").into()),
                }
            }
            "-b" => o.p.bytes = val()?.parse()?,
            "--window" => o.p.window = val()?.parse()?,
            "--rate" => o.p.rate = val()?.parse()?,
            "--grace" => o.p.grace_s = val()?.parse()?,
            "--timeout" => o.p.timeout_s = val()?.parse()?,
            "--crash-tolerant" => o.p.crash_tolerant = true,
            "--phase" => {
                o.p.phase = match val()?.as_str() {
                    "all" => Phase::All,
                    "publish" => Phase::Publish,
                    "receive" => Phase::Receive,
                    m => return Err(format!("unknown phase {m}").into()),
                }
            }
            "--run-id" => o.p.run_id = val()?.parse()?,
            "--broker-pid" => o.broker_pid = Some(val()?.parse()?),
            "--label" => o.label = val()?,
            "--json" => o.json = Some(val()?.into()),
            "--no-reset" => o.reset = false,
            "--nagle" => o.p.nagle = true,
            "--metrics-addr" => o.metrics_addr = Some(val()?),
            _ => return Err(format!("unknown argument {a} (see --help)").into()),
        }
    }
    if o.p.bytes < HEADER {
        return Err(format!("-b must be at least {HEADER}").into());
    }
    if o.p.window == 0 || o.p.window > 1000 {
        return Err("--window must be 1..=1000".into());
    }
    if !matches!(o.p.target.as_str(), "mqtt" | "edgehub") {
        return Err("--target is mqtt or edgehub".into());
    }
    o.p.tls = o.tls_ca.is_some();
    Ok(o)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Who connects where: credentials and topics of every client.
#[derive(Clone)]
struct Client {
    creds: Creds,
    /// Publish topic (publishers) or subscription filter (receivers).
    topic: String,
}

fn plan(o: &Opts) -> BenchResult<(Vec<Client>, Vec<Client>)> {
    let np = o.p.publishers;
    let nr = match o.p.mode {
        Mode::Pairs => np,
        Mode::Fanin => 1,
    };
    if o.p.target == "mqtt" {
        let pubs = (0..np)
            .map(|i| Client {
                creds: Creds {
                    client_id: format!("ob-pub-{i}"),
                    login: None,
                },
                topic: format!("bench/{i}"),
            })
            .collect();
        let recs = (0..nr)
            .map(|i| Client {
                creds: Creds {
                    client_id: format!("ob-sub-{i}"),
                    login: None,
                },
                topic: match o.p.mode {
                    Mode::Pairs => format!("bench/{i}"),
                    Mode::Fanin => "bench/#".into(),
                },
            })
            .collect();
        return Ok((pubs, recs));
    }
    let path = o
        .keys
        .as_ref()
        .ok_or("--target edgehub needs --keys FILE")?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cs = ConnectionString::parse(line)?;
        keys.insert(cs.module_id.clone(), cs);
    }
    let module = |m: &str| -> BenchResult<&ConnectionString> {
        keys.get(m).ok_or_else(|| {
            format!("no connection string for module {m} in {}", path.display()).into()
        })
    };
    let ttl = 24 * 3600;
    let mut pubs = Vec::new();
    for i in 0..np {
        let name = match o.p.mode {
            Mode::Pairs => format!("p{i}"),
            Mode::Fanin => format!("f{i}"),
        };
        let cs = module(&name)?;
        pubs.push(Client {
            creds: cs.creds(ttl)?,
            topic: format!(
                "devices/{}/modules/{}/messages/events/$.on=out1",
                cs.device_id, cs.module_id
            ),
        });
    }
    let mut recs = Vec::new();
    for i in 0..nr {
        let name = match o.p.mode {
            Mode::Pairs => format!("r{i}"),
            Mode::Fanin => "fan".to_string(),
        };
        let cs = module(&name)?;
        recs.push(Client {
            creds: cs.creds(ttl)?,
            topic: format!("devices/{}/modules/{}/inputs/#", cs.device_id, cs.module_id),
        });
    }
    Ok((pubs, recs))
}

/// State shared by all tasks.
struct Shared {
    /// First arrivals so far, all receivers.
    delivered: AtomicU64,
    /// Wall-clock ns of the last first arrival.
    last_delivery_ns: AtomicU64,
    /// Set when the run is over (receivers stop reconnecting).
    stopping: AtomicBool,
    deadline: Instant,
}

#[derive(Default)]
struct PubOutcome {
    acked: Vec<bool>,
    n_acked: u64,
    resends: u64,
    reconnects: u64,
    last_ack: Option<Instant>,
    error: Option<String>,
}

async fn reconnect(
    ep: &Endpoint,
    client: &Client,
    shared: &Shared,
    subscribe: bool,
) -> BenchResult<(Conn, Vec<Packet>)> {
    let mut last_err = String::new();
    while Instant::now() < shared.deadline && !shared.stopping.load(Ordering::Relaxed) {
        match Conn::connect(ep, &client.creds, false, KEEP_ALIVE, CONNECT_TIMEOUT).await {
            Ok((mut conn, _)) => {
                if !subscribe {
                    return Ok((conn, Vec::new()));
                }
                match conn.subscribe(std::slice::from_ref(&client.topic), 1).await {
                    Ok(early) => return Ok((conn, early)),
                    Err(e) => last_err = e.to_string(),
                }
            }
            Err(e) => last_err = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{}: could not reconnect: {last_err}",
        client.creds.client_id
    )
    .into())
}

fn payload(run_id: u64, publisher: u32, seq: u64, bytes: usize) -> Bytes {
    let mut v = Vec::with_capacity(bytes);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&run_id.to_le_bytes());
    v.extend_from_slice(&publisher.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&now_ns().to_le_bytes());
    v.resize(bytes, 0x5a);
    Bytes::from(v)
}

fn publish_packet(topic: &str, pkid: u16, body: Bytes, dup: bool) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, Vec::<u8>::new());
    p.payload = body;
    p.pkid = pkid;
    p.dup = dup;
    Packet::Publish(p)
}

fn pkid_of(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

async fn publisher(
    idx: u32,
    ep: Endpoint,
    client: Client,
    mut conn: Conn,
    p: Params,
    shared: Arc<Shared>,
) -> PubOutcome {
    let n = p.messages;
    let mut out = PubOutcome {
        acked: vec![false; usize::try_from(n).unwrap_or(0)],
        ..PubOutcome::default()
    };
    // In flight, in send order: (pkid, seq, payload).
    let mut inflight: VecDeque<(u16, u64, Bytes)> = VecDeque::with_capacity(p.window);
    let mut next = 0u64;
    let start = Instant::now();
    loop {
        if out.n_acked == n {
            break;
        }
        if Instant::now() >= shared.deadline {
            out.error = Some(format!(
                "publisher {idx}: timed out with {} acknowledged",
                out.n_acked
            ));
            break;
        }
        let allowed = if p.rate > 0.0 {
            n.min((start.elapsed().as_secs_f64() * p.rate) as u64 + 1)
        } else {
            n
        };
        let mut step: BenchResult<()> = Ok(());
        while inflight.len() < p.window && next < allowed {
            let body = payload(p.run_id, idx, next, p.bytes);
            let pkid = pkid_of(next);
            if let Err(e) = conn.queue(&publish_packet(&client.topic, pkid, body.clone(), false)) {
                step = Err(e);
                break;
            }
            inflight.push_back((pkid, next, body));
            next += 1;
        }
        if step.is_ok() {
            step = conn.flush().await;
        }
        if step.is_ok() {
            let rate_wait = if p.rate > 0.0 && next < n && inflight.len() < p.window {
                Duration::from_secs_f64(
                    ((next as f64) / p.rate - start.elapsed().as_secs_f64()).max(0.0),
                )
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                r = conn.fill() => step = r,
                () = tokio::time::sleep(rate_wait) => {}
                () = tokio::time::sleep_until(shared.deadline.into()) => {}
            }
        }
        if step.is_ok() {
            loop {
                match conn.try_packet() {
                    Ok(Some(Packet::PubAck(a))) => {
                        if let Some(pos) = inflight.iter().position(|(k, _, _)| *k == a.pkid) {
                            if let Some((_, seq, _)) = inflight.remove(pos) {
                                if let Some(slot) = out.acked.get_mut(seq as usize) {
                                    if !*slot {
                                        *slot = true;
                                        out.n_acked += 1;
                                    }
                                }
                                out.last_ack = Some(Instant::now());
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        step = Err(e);
                        break;
                    }
                }
            }
        }
        if let Err(e) = step {
            if !p.crash_tolerant {
                out.error = Some(format!("publisher {idx}: {e}"));
                break;
            }
            match reconnect(&ep, &client, &shared, false).await {
                Ok((c, _)) => {
                    conn = c;
                    out.reconnects += 1;
                    for (pkid, _, body) in &inflight {
                        let _ =
                            conn.queue(&publish_packet(&client.topic, *pkid, body.clone(), true));
                        out.resends += 1;
                    }
                }
                Err(e) => {
                    out.error = Some(format!("publisher {idx}: {e}"));
                    break;
                }
            }
        }
    }
    conn.disconnect().await;
    out
}

#[derive(Clone, Default)]
struct Track {
    seen: Vec<bool>,
    highest: Option<u64>,
    delivered: u64,
    duplicates: u64,
    reordered: u64,
}

#[derive(Default)]
struct RecOutcome {
    tracks: HashMap<u32, Track>,
    latency: LatencyRecorder,
    stale: u64,
    reconnects: u64,
    error: Option<String>,
}

fn on_publish(pb: &Publish, p: &Params, out: &mut RecOutcome, shared: &Shared) {
    let b = &pb.payload;
    if b.len() < HEADER || &b[0..4] != MAGIC {
        out.stale += 1;
        return;
    }
    let word = |r: std::ops::Range<usize>| -> u64 {
        let mut a = [0u8; 8];
        a[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    let run = word(4..12);
    let publisher = word(12..16) as u32;
    let seq = word(16..24);
    let sent = word(24..32);
    if run != p.run_id || publisher >= p.publishers || seq >= p.messages {
        out.stale += 1;
        return;
    }
    let n = p.messages as usize;
    let t = out.tracks.entry(publisher).or_insert_with(|| Track {
        seen: vec![false; n],
        ..Track::default()
    });
    let s = seq as usize;
    if t.seen[s] {
        t.duplicates += 1;
        return;
    }
    t.seen[s] = true;
    t.delivered += 1;
    if t.highest.is_some_and(|h| seq < h) {
        t.reordered += 1;
    }
    t.highest = Some(t.highest.map_or(seq, |h| h.max(seq)));
    let now = now_ns();
    out.latency
        .record(Duration::from_nanos(now.saturating_sub(sent)));
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    shared.last_delivery_ns.store(now, Ordering::Relaxed);
}

async fn receiver(
    ep: Endpoint,
    client: Client,
    mut conn: Conn,
    early: Vec<Packet>,
    p: Params,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> RecOutcome {
    let mut out = RecOutcome::default();
    let mut pending = early;
    loop {
        let mut step: BenchResult<()> = Ok(());
        let handle = |pkt: Packet, conn: &mut Conn, out: &mut RecOutcome| -> BenchResult<()> {
            if let Packet::Publish(pb) = pkt {
                if pb.qos != QoS::AtMostOnce {
                    conn.queue(&Packet::PubAck(PubAck::new(pb.pkid)))?;
                }
                on_publish(&pb, &p, out, &shared);
            }
            Ok(())
        };
        for pkt in pending.drain(..) {
            if let Err(e) = handle(pkt, &mut conn, &mut out) {
                step = Err(e);
            }
        }
        while step.is_ok() {
            match conn.try_packet() {
                Ok(Some(pkt)) => step = handle(pkt, &mut conn, &mut out),
                Ok(None) => break,
                Err(e) => step = Err(e),
            }
        }
        if step.is_ok() {
            step = conn.flush().await;
        }
        if step.is_ok() {
            tokio::select! {
                r = conn.fill() => step = r,
                _ = stop.changed() => break,
            }
        }
        if let Err(e) = step {
            if !p.crash_tolerant || shared.stopping.load(Ordering::Relaxed) {
                out.error = Some(format!("receiver {}: {e}", client.creds.client_id));
                break;
            }
            match reconnect(&ep, &client, &shared, true).await {
                Ok((c, e)) => {
                    conn = c;
                    pending = e;
                    out.reconnects += 1;
                }
                Err(e) => {
                    out.error = Some(format!("receiver: {e}"));
                    break;
                }
            }
        }
    }
    conn.disconnect().await;
    out
}

#[derive(Serialize)]
struct PerPublisher {
    publisher: u32,
    acked: u64,
    delivered: u64,
    lost: u64,
    acked_but_lost: u64,
    duplicates: u64,
    reordered: u64,
}

#[derive(Serialize)]
struct Report {
    label: String,
    params: Params,
    started_unix_s: u64,
    expected: u64,
    acked: u64,
    delivered: u64,
    lost: u64,
    acked_but_lost: u64,
    duplicates: u64,
    reordered: u64,
    stale: u64,
    resends: u64,
    reconnects: u64,
    /// First send to last PUBACK.
    ack_secs: f64,
    ack_rate: f64,
    /// First send to last first arrival.
    delivery_secs: f64,
    delivery_rate: f64,
    latency: LatencySummary,
    cpu: CpuWindow,
    broker_pid: Option<u32>,
    broker_peak_rss_kib: u64,
    broker_us_per_msg: f64,
    client_us_per_msg: f64,
    machine_busy_warning: bool,
    /// edgehub only (`--metrics-addr`): store fdatasyncs and appends over the window.
    fdatasyncs: Option<u64>,
    store_appends: Option<u64>,
    msgs_per_fdatasync: Option<f64>,
    errors: Vec<String>,
    ok: bool,
    per_publisher: Vec<PerPublisher>,
}

async fn run(o: Opts) -> BenchResult<Report> {
    let p = o.p.clone();
    let tls = match &o.tls_ca {
        Some(ca) => Some(Tls::from_ca(ca, &o.tls_name)?),
        None => None,
    };
    let ep = Endpoint {
        addr: p.addr.clone(),
        tls,
        nagle: p.nagle,
    };
    let (pubs, recs) = plan(&o)?;
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        deadline: Instant::now() + Duration::from_secs_f64(p.timeout_s),
    });

    // Discard sessions left by earlier runs.
    if o.reset && p.phase != Phase::Receive {
        for c in pubs.iter().chain(recs.iter()) {
            let (conn, _) = Conn::connect(&ep, &c.creds, true, KEEP_ALIVE, CONNECT_TIMEOUT).await?;
            conn.disconnect().await;
        }
        // Let brokers finish the clean-session teardown.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Receivers: persistent sessions, subscribed before anything is sent.
    let mut rec_conns = Vec::new();
    for c in &recs {
        let (mut conn, _) =
            Conn::connect(&ep, &c.creds, false, KEEP_ALIVE, CONNECT_TIMEOUT).await?;
        let early = conn.subscribe(std::slice::from_ref(&c.topic), 1).await?;
        rec_conns.push((conn, early));
    }
    if p.phase == Phase::Publish {
        // Offline receivers: their sessions keep the subscriptions.
        for (conn, _) in rec_conns.drain(..) {
            conn.disconnect().await;
        }
    }
    let mut pub_conns = Vec::new();
    if p.phase != Phase::Receive {
        for c in &pubs {
            let (conn, _) =
                Conn::connect(&ep, &c.creds, false, KEEP_ALIVE, CONNECT_TIMEOUT).await?;
            pub_conns.push(conn);
        }
    }

    let started_unix_s = now_ns() / 1_000_000_000;
    let metrics0 = match &o.metrics_addr {
        Some(a) => store_counters(a).await,
        None => None,
    };
    let mark0 = CpuMark::now(o.broker_pid);
    let t0 = Instant::now();
    let t0_ns = now_ns();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut rec_tasks = Vec::new();
    for (c, (conn, early)) in recs.iter().zip(rec_conns) {
        rec_tasks.push(tokio::spawn(receiver(
            ep.clone(),
            c.clone(),
            conn,
            early,
            p.clone(),
            Arc::clone(&shared),
            stop_rx.clone(),
        )));
    }
    let mut pub_tasks = Vec::new();
    for (i, (c, conn)) in pubs.iter().zip(pub_conns).enumerate() {
        pub_tasks.push(tokio::spawn(publisher(
            i as u32,
            ep.clone(),
            c.clone(),
            conn,
            p.clone(),
            Arc::clone(&shared),
        )));
    }

    // Wait: publishers done, then every message delivered or `grace` without traffic.
    let expected = u64::from(p.publishers) * p.messages;
    let grace = Duration::from_secs_f64(p.grace_s);
    let mut last_count = 0u64;
    let mut last_progress = Instant::now();
    let mut pubs_done_at: Option<Instant> = None;
    let mut mark1 = None;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let d = shared.delivered.load(Ordering::Relaxed);
        if d != last_count {
            last_count = d;
            last_progress = Instant::now();
        }
        let pubs_done = pub_tasks.iter().all(|t| t.is_finished());
        if pubs_done && pubs_done_at.is_none() {
            pubs_done_at = Some(Instant::now());
            if p.phase == Phase::Publish {
                mark1 = Some(CpuMark::now(o.broker_pid));
                break;
            }
        }
        if d >= expected && pubs_done {
            mark1 = Some(CpuMark::now(o.broker_pid));
            break;
        }
        let quiet_since = pubs_done_at.map_or(last_progress, |t| t.max(last_progress));
        if pubs_done && quiet_since.elapsed() >= grace {
            break;
        }
        if Instant::now() >= shared.deadline {
            break;
        }
    }
    let mark1 = mark1.unwrap_or_else(|| CpuMark::now(o.broker_pid));
    let metrics1 = match &o.metrics_addr {
        Some(a) => store_counters(a).await,
        None => None,
    };
    let (fdatasyncs, store_appends) = match (metrics0, metrics1) {
        (Some(a), Some(b)) => (Some(b.0.saturating_sub(a.0)), Some(b.1.saturating_sub(a.1))),
        _ => (None, None),
    };
    shared.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);

    let mut errors = Vec::new();
    let mut pub_outs = Vec::new();
    for t in pub_tasks {
        match t.await {
            Ok(po) => {
                if let Some(e) = &po.error {
                    errors.push(e.clone());
                }
                pub_outs.push(po);
            }
            Err(e) => errors.push(format!("publisher task: {e}")),
        }
    }
    let mut latency = LatencyRecorder::new();
    let mut tracks: HashMap<u32, Track> = HashMap::new();
    let (mut stale, mut reconnects) = (0u64, 0u64);
    for t in rec_tasks {
        match t.await {
            Ok(ro) => {
                if let Some(e) = &ro.error {
                    errors.push(e.clone());
                }
                latency.merge(&ro.latency);
                stale += ro.stale;
                reconnects += ro.reconnects;
                for (k, v) in ro.tracks {
                    let t = tracks.entry(k).or_default();
                    t.delivered += v.delivered;
                    t.duplicates += v.duplicates;
                    t.reordered += v.reordered;
                    if t.seen.is_empty() {
                        t.seen = v.seen;
                    }
                }
            }
            Err(e) => errors.push(format!("receiver task: {e}")),
        }
    }

    let mut per_publisher = Vec::new();
    let mut last_ack: Option<Instant> = None;
    let mut resends = 0;
    for i in 0..p.publishers {
        let po = pub_outs.get(i as usize);
        let t = tracks.get(&i);
        let acked_vec: Option<&Vec<bool>> = po.map(|po| &po.acked);
        // In the receive phase the publish phase has checked that all was acknowledged.
        let is_acked = |s: usize| match p.phase {
            Phase::Receive => true,
            _ => acked_vec.is_some_and(|a| a.get(s).copied().unwrap_or(false)),
        };
        let is_seen = |s: usize| t.is_some_and(|t| t.seen.get(s).copied().unwrap_or(false));
        let n = p.messages as usize;
        let acked = (0..n).filter(|s| is_acked(*s)).count() as u64;
        let delivered = t.map_or(0, |t| t.delivered);
        let acked_but_lost = (0..n).filter(|s| is_acked(*s) && !is_seen(*s)).count() as u64;
        if let Some(po) = po {
            resends += po.resends;
            reconnects += po.reconnects;
            if let Some(a) = po.last_ack {
                last_ack = Some(last_ack.map_or(a, |l: Instant| l.max(a)));
            }
        }
        per_publisher.push(PerPublisher {
            publisher: i,
            acked,
            delivered,
            lost: if p.phase == Phase::Publish {
                0
            } else {
                p.messages - delivered
            },
            acked_but_lost: if p.phase == Phase::Publish {
                0
            } else {
                acked_but_lost
            },
            duplicates: t.map_or(0, |t| t.duplicates),
            reordered: t.map_or(0, |t| t.reordered),
        });
    }
    let sum = |f: fn(&PerPublisher) -> u64| per_publisher.iter().map(f).sum::<u64>();
    let acked = sum(|x| x.acked);
    let delivered = sum(|x| x.delivered);
    let lost = sum(|x| x.lost);
    let reordered = sum(|x| x.reordered);
    let ack_secs = last_ack.map_or(0.0, |a| a.duration_since(t0).as_secs_f64());
    let last_d = shared.last_delivery_ns.load(Ordering::Relaxed);
    let delivery_secs = if last_d > t0_ns {
        (last_d - t0_ns) as f64 / 1e9
    } else {
        0.0
    };
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let cpu = mark0.window(&mark1);
    let per_msg = |cpu_s: f64| {
        let n = if p.phase == Phase::Publish {
            acked
        } else {
            delivered
        };
        if n > 0 {
            cpu_s * 1e6 / n as f64
        } else {
            0.0
        }
    };
    let busy_warning = cpu.others_busy > 0.25;
    if p.phase == Phase::Publish && acked < expected {
        errors.push(format!("only {acked} of {expected} acknowledged"));
    }
    let ok = errors.is_empty() && reordered == 0 && (p.phase == Phase::Publish || lost == 0);
    Ok(Report {
        label: o.label.clone(),
        params: p.clone(),
        started_unix_s,
        expected,
        acked,
        delivered,
        lost,
        acked_but_lost: sum(|x| x.acked_but_lost),
        duplicates: sum(|x| x.duplicates),
        reordered,
        stale,
        resends,
        reconnects,
        ack_secs,
        ack_rate: rate(acked, ack_secs),
        delivery_secs,
        delivery_rate: rate(delivered, delivery_secs),
        latency: latency.summary(),
        cpu,
        broker_pid: o.broker_pid,
        broker_peak_rss_kib: o.broker_pid.map_or(0, procstat::tree_peak_rss_kib),
        broker_us_per_msg: per_msg(cpu.broker_cpu_s),
        client_us_per_msg: per_msg(cpu.client_cpu_s),
        machine_busy_warning: busy_warning,
        fdatasyncs,
        store_appends,
        msgs_per_fdatasync: fdatasyncs.filter(|f| *f > 0).map(|f| {
            (if p.phase == Phase::Receive {
                delivered
            } else {
                acked
            }) as f64
                / f as f64
        }),
        errors,
        ok,
        per_publisher,
    })
}

/// `(edgehub_store_fdatasyncs_total, edgehub_store_appends_total)` from edgehub's /metrics.
async fn store_counters(addr: &str) -> Option<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .ok()??;
    let value = |name: &str| -> Option<u64> {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some((
        value("edgehub_store_fdatasyncs_total")?,
        value("edgehub_store_appends_total")?,
    ))
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let json_path = o.json.clone();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            std::process::exit(2);
        }
    };
    let report = match rt.block_on(run(o)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    let l = &report.latency;
    eprintln!(
        "loadgen {:<28} acked {:>7} delivered {:>7} ({:>8.0} msg/s, acks {:>8.0}/s) p50 {:>7.2} ms p99 {:>7.2} ms max {:>7.2} ms lost {} acked-but-lost {} dup {} reordered {} stale {} | cpu broker {:.2} client {:.2} cores, broker {:.1} us/msg, machine {:.0}% busy{}{}",
        report.label,
        report.acked,
        report.delivered,
        report.delivery_rate,
        report.ack_rate,
        l.p50_us / 1e3,
        l.p99_us / 1e3,
        l.max_us / 1e3,
        report.lost,
        report.acked_but_lost,
        report.duplicates,
        report.reordered,
        report.stale,
        if report.cpu.wall_s > 0.0 { report.cpu.broker_cpu_s / report.cpu.wall_s } else { 0.0 },
        if report.cpu.wall_s > 0.0 { report.cpu.client_cpu_s / report.cpu.wall_s } else { 0.0 },
        report.broker_us_per_msg,
        report.cpu.machine_busy * 100.0,
        if report.machine_busy_warning {
            format!(" WARNING: other processes used {:.0}% of the CPUs", report.cpu.others_busy * 100.0)
        } else {
            String::new()
        },
        if report.errors.is_empty() { String::new() } else { format!(" ERRORS: {:?}", report.errors) },
    );
    let json =
        serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    println!("{json}");
    if let Some(path) = json_path {
        if let Err(e) = std::fs::write(&path, &json) {
            eprintln!("loadgen: writing {}: {e}", path.display());
        }
    }
    std::process::exit(if report.ok { 0 } else { 1 });
}
