//! `replbench`: module replicas (issue 17) against the release `edgehub` binary.
//!
//! One hub (one data directory, one store) serves module `work`, declared
//! `x-edgehub-replicas {count: 3, partitionKey: "key"}`, and a route from module `producer`'s
//! outputs into `work`'s `input1`. The producer publishes `key:seq` messages over `--keys` keys
//! (application property `key`), QoS 1 with `--window` unacknowledged, as fast as the hub takes
//! them, each key in turn while fewer than `--backlog` of that key are stored and not yet
//! handled: every partition always has work (the replicas, not the producer or the split of the
//! keys, set the pace) and the backlog left to drain between points stays small. Each
//! replica is a raw MQTT connection of `work` whose handler (an OS thread, as an SDK's
//! callback) takes one message at a time, sleeps `--handler-ms`, then acknowledges it.
//!
//! - **Throughput**: per round, N = 1, 2, 3 replicas (alternating the order between rounds)
//!   connect; after `--warmup` seconds, messages handled over `--secs` seconds; then the
//!   producer stops, everything is drained and the replicas leave. N is how many replicas are
//!   connected; the declared count stays 3 (fewer members own every partition between them), so
//!   no reload and no fresh store is needed between points. Reported: msgs/s, ÷ N=1 of the
//!   same round, ÷ the ideal N × 1/handler.
//! - **Handoff** (`--handoffs` times each): two replicas at steady state and a third joins;
//!   three and one leaves (DISCONNECT); three and one is killed (its socket closed without
//!   DISCONNECT). Per partition that moved: from the change to the first delivery on the new
//!   owner (stall), and from the old owner's last acknowledgement of it to the new owner's first
//!   handling (gap); p50 and max.
//!
//! Every point checks its own receive log: each key's first handlings in sequence order, every
//! acknowledged message handled, duplicates (handled twice) at most the hub's
//! `edgehub_replica_duplicates_total`. A violated check fails the run (exit 1). Figures only:
//! nothing here asserts on speed.
//!
//! `replbench --help` lists the flags.

use benches::mqtt::{Conn, ConnectionString, Creds, Endpoint, Tls};
use benches::procstat::CpuMark;
use benches::report::{self, Table};
use benches::BenchResult;
use bytes::Bytes;
use router::replicas::assign::{target, Slot};
use router::replicas::partition::partition_of_key;
use router::replicas::PartitionId;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

const HELP: &str = "replbench: module replicas (issue 17): throughput with 1, 2, 3 replicas and handoff stalls

  --hub PATH          the edgehub binary (default $EDGEHUB_BIN, else <target>/release/edgehub)
  --keys K            partition keys the producer spreads over (default 100)
  --rounds R          throughput rounds, N = 1, 2, 3 in each, order alternating (default 3)
  --replicas LIST     N values per round (default 1,2,3; at most 3)
  --warmup SECS       before each measured window (default 3)
  --secs SECS         measured window (default 10)
  --handler-ms MS     each replica's time per message (default 5)
  --backlog N         per key: messages stored and not yet handled the producer keeps at most (default 10)
  --window N          producer's unacknowledged publishes (default 100)
  --handoffs N        repeats of each handoff scenario (default 3; 0: none)
  --base B            replicas before a join (1 or 2; default 2): joins go B -> B+1, leaves and
                      kills B+1 -> B
  --observe SECS      how long after a membership change deliveries are watched (default 12)
  --only LIST         throughput,handoff (default both)
  --tls               connect over TLS (the hub's own CA) instead of the plain listener
  --out FILE          also write the report (text) here
  --json FILE         also write the results (JSON) here
";

const MODULE: &str = "work";
const PRODUCER: &str = "producer";
const KEEP_ALIVE: u16 = 60;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds a failure (a drain, a connection), never a pace.
const DEADLINE: Duration = Duration::from_secs(180);

#[derive(Clone, Debug, Serialize)]
struct Params {
    hub: PathBuf,
    keys: u64,
    rounds: usize,
    replicas: Vec<usize>,
    warmup_s: f64,
    secs: f64,
    handler_ms: f64,
    backlog: u64,
    window: usize,
    handoffs: usize,
    base: usize,
    observe_s: f64,
    throughput: bool,
    handoff: bool,
    tls: bool,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse_args() -> BenchResult<Params> {
    let hub = std::env::var_os("EDGEHUB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| benches::env::target_dir().join("release").join("edgehub"));
    let mut p = Params {
        hub,
        keys: 100,
        rounds: 3,
        replicas: vec![1, 2, 3],
        warmup_s: 3.0,
        secs: 10.0,
        handler_ms: 5.0,
        backlog: 10,
        window: 100,
        handoffs: 3,
        base: 2,
        observe_s: 12.0,
        throughput: true,
        handoff: true,
        tls: false,
        out: None,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--hub" => p.hub = val()?.into(),
            "--keys" => p.keys = val()?.parse()?,
            "--rounds" => p.rounds = val()?.parse()?,
            "--replicas" => {
                p.replicas = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "--warmup" => p.warmup_s = val()?.parse()?,
            "--secs" => p.secs = val()?.parse()?,
            "--handler-ms" => p.handler_ms = val()?.parse()?,
            "--backlog" => p.backlog = val()?.parse()?,
            "--window" => p.window = val()?.parse()?,
            "--handoffs" => p.handoffs = val()?.parse()?,
            "--base" => p.base = val()?.parse()?,
            "--observe" => p.observe_s = val()?.parse()?,
            "--only" => {
                let parts = val()?;
                p.throughput = parts.split(',').any(|s| s.trim() == "throughput");
                p.handoff = parts.split(',').any(|s| s.trim() == "handoff");
            }
            "--tls" => p.tls = true,
            "--out" => p.out = Some(val()?.into()),
            "--json" => p.json = Some(val()?.into()),
            _ => return Err(format!("unknown argument {a} (see --help)").into()),
        }
    }
    if p.keys == 0 || p.keys > 10_000 {
        return Err("--keys must be 1..=10000".into());
    }
    if p.replicas.is_empty() || p.replicas.iter().any(|n| !(1..=3).contains(n)) {
        return Err("--replicas takes values 1..=3".into());
    }
    if !(1..=2).contains(&p.base) {
        return Err("--base is 1 or 2".into());
    }
    if p.window == 0 || p.window > 1000 {
        return Err("--window must be 1..=1000".into());
    }
    if p.handler_ms.is_nan() || p.handler_ms <= 0.0 {
        return Err("--handler-ms must be positive".into());
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// The hub process.

fn manifest() -> String {
    format!(
        r#"{{"modulesContent": {{
  "$edgeAgent": {{"properties.desired": {{"modules": {{"{PRODUCER}": {{}},
    "{MODULE}": {{"x-edgehub-replicas": {{"count": 3, "partitionKey": "key"}}}}}}}}}},
  "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.1",
    "routes": {{"toWork": "FROM /messages/modules/{PRODUCER}/outputs/* INTO BrokeredEndpoint(\"/modules/{MODULE}/inputs/input1\")"}},
    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}}}}}"#
    )
}

/// A free loopback port (bound, then released for the hub to take).
fn free_port() -> BenchResult<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

struct Hub {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    endpoint: Endpoint,
    metrics_addr: String,
    producer: ConnectionString,
    work: ConnectionString,
}

impl Hub {
    async fn start(p: &Params) -> BenchResult<Hub> {
        if !p.hub.is_file() {
            return Err(format!(
                "no edgehub binary at {} (cargo build --release -p hub, or --hub / EDGEHUB_BIN)",
                p.hub.display()
            )
            .into());
        }
        let dir = benches::env::bench_tempdir("replbench-")?;
        let data = dir.path().join("hub");
        let manifest_path = dir.path().join("manifest.json");
        std::fs::write(&manifest_path, manifest())?;
        let common = |cmd: &mut Command| {
            cmd.arg("--data-dir")
                .arg(&data)
                .arg("--manifest")
                .arg(&manifest_path)
                .arg("--log")
                .arg("warn");
        };
        let mut cs = HashMap::new();
        for m in [PRODUCER, MODULE] {
            let mut cmd = Command::new(&p.hub);
            cmd.arg("connection-string").arg(m);
            common(&mut cmd);
            let out = cmd.output()?;
            if !out.status.success() {
                return Err(format!(
                    "edgehub connection-string {m}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            cs.insert(
                m,
                ConnectionString::parse(String::from_utf8_lossy(&out.stdout).trim())?,
            );
        }
        let plain = free_port()?;
        let tls = free_port()?;
        let metrics = free_port()?;
        let log = std::fs::File::create(dir.path().join("hub.log"))?;
        let mut cmd = Command::new(&p.hub);
        cmd.arg("run");
        common(&mut cmd);
        cmd.arg("--mqtt-addr")
            .arg(format!("127.0.0.1:{tls}"))
            .arg("--plain-mqtt-addr")
            .arg(format!("127.0.0.1:{plain}"))
            .arg("--amqp-addr")
            .arg("127.0.0.1:0")
            .arg("--methods-addr")
            .arg("127.0.0.1:0")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--upstream-protocol")
            .arg("none")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let pid = child.id();
        let port = if p.tls { tls } else { plain };
        // Killed when dropped: nothing is left running if the start fails from here on.
        let mut hub = Hub {
            child,
            pid,
            dir,
            endpoint: Endpoint {
                addr: format!("127.0.0.1:{port}"),
                tls: None,
                nagle: false,
            },
            metrics_addr: format!("127.0.0.1:{metrics}"),
            producer: cs.remove(PRODUCER).ok_or("no producer")?,
            work: cs.remove(MODULE).ok_or("no work")?,
        };
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(&hub.endpoint.addr)
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = hub.child.try_wait() {
                return Err(format!("edgehub exited ({status}): {}", hub.log_tail()).into());
            }
            if started.elapsed() > Duration::from_secs(90) {
                return Err(format!("edgehub did not listen: {}", hub.log_tail()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if p.tls {
            let out = Command::new(&p.hub)
                .arg("ca-path")
                .arg("--data-dir")
                .arg(&data)
                .output()?;
            let ca = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            hub.endpoint.tls = Some(Tls::from_ca(&ca, "localhost")?);
        }
        Ok(hub)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A series of `work`'s input1 from /metrics (0 when absent).
    async fn metric(&self, name: &str) -> BenchResult<f64> {
        let body = http_get(&self.metrics_addr, "/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains(&format!("module=\"{MODULE}\""))
                    && l.contains("input=\"input1\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .sum())
    }

    /// Stops the hub (SIGTERM, then SIGKILL after 20 s).
    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn http_get(addr: &str, path: &str) -> BenchResult<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    Ok(tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .map_err(|_| format!("GET {path}: timed out"))??)
}

// ---------------------------------------------------------------------------------------------
// What the replicas handled.

/// One message handled (and acknowledged) by a replica.
#[derive(Clone, Copy, Debug)]
struct Rec {
    replica: u32,
    key: u32,
    seq: u64,
    /// The PUBLISH arrived at the replica.
    arrived: Instant,
    /// The handler took it.
    started: Instant,
    /// The handler finished and acknowledged it.
    done: Instant,
}

#[derive(Default)]
struct LogState {
    recs: Vec<Rec>,
    seen: HashSet<u64>,
}

/// Shared by every replica of the run.
struct Log {
    keys: u64,
    state: Mutex<LogState>,
    /// Handlings, duplicates included.
    handled: AtomicU64,
    /// Distinct messages handled.
    distinct: AtomicU64,
    /// Distinct messages handled, per key.
    distinct_per_key: Vec<AtomicU64>,
    /// Woken on every handling (the producer's backlog check).
    progress: Notify,
}

impl Log {
    fn new(keys: u64) -> Arc<Log> {
        Arc::new(Log {
            keys,
            state: Mutex::new(LogState::default()),
            handled: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            distinct_per_key: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            progress: Notify::new(),
        })
    }

    fn record(&self, rec: Rec) {
        let index = rec.seq * self.keys + u64::from(rec.key);
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.recs.push(rec);
            if st.seen.insert(index) {
                self.distinct.fetch_add(1, Ordering::SeqCst);
                if let Some(k) = self.distinct_per_key.get(rec.key as usize) {
                    k.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        self.progress.notify_one();
    }

    /// The records from position `from` on.
    fn since(&self, from: usize) -> Vec<Rec> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.recs.get(from..).map(<[Rec]>::to_vec).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recs
            .len()
    }

    /// Checks the messages published (`produced[k]`: seqs `0..` of key `k`) against everything
    /// handled: each key's first handlings in sequence order and none missing. Returns the
    /// number handled more than once.
    fn check(&self, produced: &[u64]) -> Result<u64, String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next_seq: Vec<u64> = vec![0; usize::try_from(self.keys).unwrap_or(0)];
        let mut seen = HashSet::new();
        let mut dups = 0u64;
        for r in &st.recs {
            let index = r.seq * self.keys + u64::from(r.key);
            if !seen.insert(index) {
                dups += 1;
                continue;
            }
            let Some(expected) = next_seq.get_mut(r.key as usize) else {
                return Err(format!("key k{} was never published", r.key));
            };
            if r.seq != *expected {
                return Err(format!(
                    "key k{}: first handling of seq {} after seq {} (out of order or a gap)",
                    r.key,
                    r.seq,
                    i128::from(*expected) - 1
                ));
            }
            *expected += 1;
        }
        for (k, (handled, published)) in next_seq.iter().zip(produced).enumerate() {
            if handled < published {
                return Err(format!(
                    "key k{k}: {} of {published} acknowledged messages never handled",
                    published - handled
                ));
            }
            if handled > published {
                return Err(format!(
                    "key k{k}: seq {} handled, only {published} published",
                    handled - 1
                ));
            }
        }
        Ok(dups)
    }
}

// ---------------------------------------------------------------------------------------------
// A replica: a network task and a handler thread.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    /// DISCONNECT, then close.
    Leave,
    /// Close the socket without DISCONNECT.
    Kill,
}

struct Replica {
    id: u32,
    stop: watch::Sender<Stop>,
    net: tokio::task::JoinHandle<Result<(), String>>,
    handler: std::thread::JoinHandle<()>,
    /// When the hub answered CONNECT (the membership change of a join).
    connacked: Instant,
}

struct Job {
    pkid: u16,
    key: u32,
    seq: u64,
    arrived: Instant,
}

fn parse_body(body: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let (k, s) = text.split_once(':')?;
    Some((k.strip_prefix('k')?.parse().ok()?, s.parse().ok()?))
}

async fn connect_replica(hub: &Hub, creds: &Creds) -> BenchResult<(Conn, Instant)> {
    // Refused while the previous members are still leaving (the count is full): retry, as an
    // SDK does.
    let started = Instant::now();
    loop {
        match Conn::connect(&hub.endpoint, creds, true, KEEP_ALIVE, CONNECT_TIMEOUT).await {
            Ok((conn, _)) => return Ok((conn, Instant::now())),
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Replica {
    async fn start(hub: &Hub, id: u32, handler: Duration, log: &Arc<Log>) -> BenchResult<Replica> {
        let creds = hub.work.creds(24 * 3600)?;
        let filter = format!(
            "devices/{}/modules/{}/inputs/#",
            hub.work.device_id, hub.work.module_id
        );
        let (mut conn, connacked) = connect_replica(hub, &creds).await?;
        let early = conn.subscribe(std::slice::from_ref(&filter), 1).await?;
        let (stop_tx, stop_rx) = watch::channel(Stop::Run);
        let (job_tx, job_rx) = std_mpsc::channel::<Job>();
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<u16>();
        let killed = Arc::new(AtomicBool::new(false));
        let handler_thread = {
            let log = Arc::clone(log);
            let killed = Arc::clone(&killed);
            std::thread::Builder::new()
                .name(format!("replica-{id}"))
                .spawn(move || handle(id, handler, &job_rx, &ack_tx, &killed, &log))?
        };
        let net = tokio::spawn(network(conn, early, job_tx, ack_rx, stop_rx, killed));
        Ok(Replica {
            id,
            stop: stop_tx,
            net,
            handler: handler_thread,
            connacked,
        })
    }

    /// Ends the replica (`Leave` or `Kill`) and waits for its tasks; returns when it closed.
    async fn end(self, how: Stop) -> BenchResult<Instant> {
        let _ = self.stop.send(how);
        let closed = match self.net.await {
            Ok(Ok(())) => Instant::now(),
            Ok(Err(e)) => return Err(format!("replica {}: {e}", self.id).into()),
            Err(e) => return Err(format!("replica {}: {e}", self.id).into()),
        };
        let handler = self.handler;
        tokio::task::spawn_blocking(move || handler.join())
            .await?
            .map_err(|_| "a handler thread panicked")?;
        Ok(closed)
    }
}

/// The replica's handler: one message at a time, `handler` each, acknowledged after.
fn handle(
    id: u32,
    handler: Duration,
    jobs: &std_mpsc::Receiver<Job>,
    acks: &mpsc::UnboundedSender<u16>,
    killed: &AtomicBool,
    log: &Log,
) {
    while let Ok(job) = jobs.recv() {
        if killed.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        std::thread::sleep(handler);
        if killed.load(Ordering::SeqCst) {
            return;
        }
        if acks.send(job.pkid).is_err() {
            return;
        }
        log.record(Rec {
            replica: id,
            key: job.key,
            seq: job.seq,
            arrived: job.arrived,
            started,
            done: Instant::now(),
        });
    }
}

async fn network(
    mut conn: Conn,
    early: Vec<Packet>,
    jobs: std_mpsc::Sender<Job>,
    mut acks: mpsc::UnboundedReceiver<u16>,
    mut stop: watch::Receiver<Stop>,
    killed: Arc<AtomicBool>,
) -> Result<(), String> {
    let take = |p: Packet, jobs: &std_mpsc::Sender<Job>| -> Result<(), String> {
        if let Packet::Publish(p) = p {
            let (key, seq) = parse_body(&p.payload)
                .ok_or_else(|| "a message that is not key:seq".to_string())?;
            let _ = jobs.send(Job {
                pkid: p.pkid,
                key,
                seq,
                arrived: Instant::now(),
            });
        }
        Ok(())
    };
    for p in early {
        take(p, &jobs)?;
    }
    loop {
        loop {
            match conn.try_packet() {
                Ok(Some(p)) => take(p, &jobs)?,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        tokio::select! {
            r = conn.fill() => r.map_err(|e| e.to_string())?,
            Some(pkid) = acks.recv() => {
                conn.queue(&Packet::PubAck(PubAck::new(pkid))).map_err(|e| e.to_string())?;
                while let Ok(pkid) = acks.try_recv() {
                    conn.queue(&Packet::PubAck(PubAck::new(pkid))).map_err(|e| e.to_string())?;
                }
                conn.flush().await.map_err(|e| e.to_string())?;
            }
            _ = stop.changed() => {
                let how = *stop.borrow();
                match how {
                    Stop::Run => {}
                    Stop::Leave => {
                        killed.store(true, Ordering::SeqCst);
                        conn.disconnect().await;
                        return Ok(());
                    }
                    Stop::Kill => {
                        killed.store(true, Ordering::SeqCst);
                        drop(conn);
                        return Ok(());
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The producer.

struct Producer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Vec<u64>, String>>,
}

impl Producer {
    /// Publishes each key's messages from seq `from[key]` on.
    async fn start(hub: &Hub, p: &Params, from: Vec<u64>, log: &Arc<Log>) -> BenchResult<Producer> {
        let creds = hub.producer.creds(24 * 3600)?;
        let (conn, _) =
            Conn::connect(&hub.endpoint, &creds, true, KEEP_ALIVE, CONNECT_TIMEOUT).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(produce(
            conn,
            format!(
                "devices/{}/modules/{}/messages/events/%24.on=out1&key=",
                hub.producer.device_id, hub.producer.module_id
            ),
            p.window,
            p.backlog,
            from,
            Arc::clone(log),
            stop_rx,
        ));
        Ok(Producer {
            stop: stop_tx,
            task,
        })
    }

    /// Stops publishing, waits for every PUBACK; returns the next seq of each key (all below
    /// it stored).
    async fn stop(self) -> BenchResult<Vec<u64>> {
        let _ = self.stop.send(true);
        Ok(self.task.await??)
    }
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    mut conn: Conn,
    topic_prefix: String,
    window: usize,
    backlog: u64,
    mut next: Vec<u64>,
    log: Arc<Log>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<u64>, String> {
    let keys = next.len();
    let mut cursor = 0usize;
    let mut inflight: VecDeque<u16> = VecDeque::with_capacity(window);
    let mut pkid: u16 = 0;
    loop {
        let stopping = *stop.borrow();
        if stopping && inflight.is_empty() {
            conn.disconnect().await;
            return Ok(next);
        }
        while !stopping && inflight.len() < window {
            // The next key, in turn, with fewer than `backlog` stored and not yet handled
            // (published, acknowledged or not, less handled).
            let Some(key) = (0..keys).map(|i| (cursor + i) % keys).find(|k| {
                let handled = log
                    .distinct_per_key
                    .get(*k)
                    .map_or(0, |h| h.load(Ordering::SeqCst));
                next.get(*k).map_or(0, |n| n.saturating_sub(handled)) < backlog
            }) else {
                break;
            };
            cursor = key + 1;
            let Some(seq) = next.get_mut(key) else {
                break;
            };
            let this = *seq;
            *seq += 1;
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            let mut publish = Publish::new(
                format!("{topic_prefix}k{key}"),
                QoS::AtLeastOnce,
                Vec::<u8>::new(),
            );
            publish.payload = Bytes::from(format!("k{key}:{this}"));
            publish.pkid = pkid;
            conn.queue(&Packet::Publish(publish))
                .map_err(|e| e.to_string())?;
            inflight.push_back(pkid);
        }
        conn.flush().await.map_err(|e| e.to_string())?;
        loop {
            match conn.try_packet() {
                Ok(Some(Packet::PubAck(a))) => match inflight.front() {
                    Some(id) if *id == a.pkid => {
                        inflight.pop_front();
                    }
                    _ => return Err(format!("PUBACK {} out of order", a.pkid)),
                },
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if stopping && inflight.is_empty() {
            continue;
        }
        tokio::select! {
            r = conn.fill() => r.map_err(|e| e.to_string())?,
            () = log.progress.notified(), if !stopping => {}
            _ = stop.changed(), if !stopping => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Points.

/// Waits until every message published was handled (`produced`: messages in all).
async fn drain(log: &Log, produced: u64) -> BenchResult<()> {
    let deadline = Instant::now() + DEADLINE;
    while log.distinct.load(Ordering::SeqCst) < produced {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {produced} messages handled after {DEADLINE:?}",
                log.distinct.load(Ordering::SeqCst)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
struct ThroughputPoint {
    round: usize,
    replicas: usize,
    handled: u64,
    secs: f64,
    msgs_per_s: f64,
    /// Mean handler time measured (sleep overshoot included), ms.
    handler_ms_mean: f64,
    /// The hub's CPU over the window, in cores.
    hub_cpu_cores: f64,
    /// Share of all CPUs used by other processes over the window.
    others_busy: f64,
    per_replica: Vec<u64>,
}

struct Run {
    p: Params,
    hub: Hub,
    log: Arc<Log>,
    /// Per key, seqs `0..produced[key]` published and acknowledged so far.
    produced: Vec<u64>,
    next_replica: u32,
    /// Duplicates handled so far (checked at each point).
    dups_seen: u64,
    errors: Vec<String>,
}

impl Run {
    fn handler(&self) -> Duration {
        Duration::from_secs_f64(self.p.handler_ms / 1000.0)
    }

    async fn replicas(&mut self, n: usize) -> BenchResult<Vec<Replica>> {
        let mut out = Vec::new();
        for _ in 0..n {
            self.next_replica += 1;
            out.push(
                Replica::start(&self.hub, self.next_replica, self.handler(), &self.log).await?,
            );
        }
        Ok(out)
    }

    /// Stops the producer, drains, checks the log and the duplicates metric; the replicas leave.
    async fn finish(
        &mut self,
        what: &str,
        producer: Producer,
        replicas: Vec<Replica>,
    ) -> BenchResult<u64> {
        self.produced = producer.stop().await?;
        drain(&self.log, self.produced.iter().sum()).await?;
        for r in replicas {
            r.end(Stop::Leave).await?;
        }
        let dups = match self.log.check(&self.produced) {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                return Ok(0);
            }
        };
        let metric = self.hub.metric("edgehub_replica_duplicates_total").await?;
        if (dups as f64) > metric {
            self.errors.push(format!(
                "{what}: {dups} messages handled twice, the hub counted {metric} possible duplicates"
            ));
        }
        let new = dups - self.dups_seen;
        self.dups_seen = dups;
        Ok(new)
    }

    async fn throughput_point(&mut self, round: usize, n: usize) -> BenchResult<ThroughputPoint> {
        let replicas = self.replicas(n).await?;
        let producer =
            Producer::start(&self.hub, &self.p, self.produced.clone(), &self.log).await?;
        tokio::time::sleep(Duration::from_secs_f64(self.p.warmup_s)).await;
        let from = self.log.len();
        let c0 = self.log.handled.load(Ordering::SeqCst);
        let mark0 = CpuMark::now(Some(self.hub.pid));
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(self.p.secs)).await;
        let c1 = self.log.handled.load(Ordering::SeqCst);
        let secs = t0.elapsed().as_secs_f64();
        let cpu = mark0.window(&CpuMark::now(Some(self.hub.pid)));
        let recs = self.log.since(from);
        let ids: Vec<u32> = replicas.iter().map(|r| r.id).collect();
        let per_replica = ids
            .iter()
            .map(|id| {
                recs.iter()
                    .filter(|r| r.replica == *id && r.done <= t0 + Duration::from_secs_f64(secs))
                    .count() as u64
            })
            .collect();
        let handler_ms_mean = report::mean(
            &recs
                .iter()
                .map(|r| r.done.duration_since(r.started).as_secs_f64() * 1e3)
                .collect::<Vec<_>>(),
        )
        .unwrap_or(0.0);
        self.finish(
            &format!("throughput round {round} N={n}"),
            producer,
            replicas,
        )
        .await?;
        let handled = c1 - c0;
        Ok(ThroughputPoint {
            round,
            replicas: n,
            handled,
            secs,
            msgs_per_s: handled as f64 / secs,
            handler_ms_mean,
            hub_cpu_cores: cpu.broker_cpu_s / cpu.wall_s.max(1e-9),
            others_busy: cpu.others_busy,
            per_replica,
        })
    }

    /// One membership change at steady state; the moved partitions' stalls and gaps.
    async fn handoff_point(&mut self, kind: HandoffKind, rep: usize) -> BenchResult<HandoffPoint> {
        let base = self.p.base;
        let before = match kind {
            HandoffKind::Join => base,
            HandoffKind::Leave | HandoffKind::Kill => base + 1,
        };
        let mut replicas = self.replicas(before).await?;
        // The log from here holds each partition's handlings before the change.
        let from = self.log.len();
        let producer =
            Producer::start(&self.hub, &self.p, self.produced.clone(), &self.log).await?;
        tokio::time::sleep(Duration::from_secs_f64(self.p.warmup_s)).await;
        let dup_metric0 = self.hub.metric("edgehub_replica_duplicates_total").await?;
        let change = match kind {
            HandoffKind::Join => {
                let r = Replica::start(&self.hub, self.next_replica + 1, self.handler(), &self.log)
                    .await?;
                self.next_replica += 1;
                let at = r.connacked;
                replicas.push(r);
                at
            }
            HandoffKind::Leave | HandoffKind::Kill => {
                let r = replicas.pop().ok_or("no replica")?;
                let at = Instant::now();
                r.end(if kind == HandoffKind::Leave {
                    Stop::Leave
                } else {
                    Stop::Kill
                })
                .await?;
                at
            }
        };
        tokio::time::sleep(Duration::from_secs_f64(self.p.observe_s)).await;
        let dup_metric1 = self.hub.metric("edgehub_replica_duplicates_total").await?;
        let what = format!("handoff {} #{rep}", kind.name(base));
        // Everything handled from a while before the change (the log since `from` starts at
        // steady state, before it).
        let recs = self.log.since(from);
        let dups = self.finish(&what, producer, replicas).await?;
        let moved = moved_partitions(&recs, change);
        let expected = expected_moves(self.p.keys, base);
        if moved.len() != expected {
            self.errors.push(format!(
                "{what}: {} partitions with keys moved within {} s, rendezvous assignment moves {expected}",
                moved.len(),
                self.p.observe_s
            ));
        }
        Ok(HandoffPoint {
            kind: kind.name(base),
            rep,
            moved: moved.len(),
            expected,
            stalls_ms: moved.iter().map(|m| m.stall_ms).collect(),
            gaps_ms: moved.iter().map(|m| m.gap_ms).collect(),
            acked_to_sent_ms: moved.iter().map(|m| m.acked_to_sent_ms).collect(),
            duplicates_handled: dups,
            duplicates_metric: dup_metric1 - dup_metric0,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandoffKind {
    Join,
    Leave,
    Kill,
}

impl HandoffKind {
    fn name(self, base: usize) -> String {
        let more = base + 1;
        match self {
            HandoffKind::Join => format!("join ({base} -> {more})"),
            HandoffKind::Leave => format!("leave ({more} -> {base}, DISCONNECT)"),
            HandoffKind::Kill => format!("kill ({more} -> {base}, socket closed)"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
struct HandoffPoint {
    kind: String,
    rep: usize,
    moved: usize,
    /// Partitions holding keys whose owner the change moves (slot `base` joins or goes).
    expected: usize,
    stalls_ms: Vec<f64>,
    gaps_ms: Vec<f64>,
    acked_to_sent_ms: Vec<f64>,
    duplicates_handled: u64,
    duplicates_metric: f64,
}

/// How many of the partitions the keys fall in move between slots `0..base` and `0..=base`:
/// those whose rendezvous target among `0..=base` is slot `base` (the replica that connects
/// after `base` others takes slot `base`, the lowest free one).
fn expected_moves(keys: u64, base: usize) -> usize {
    let base = u8::try_from(base).unwrap_or(u8::MAX);
    let slots: Vec<Slot> = (0..=base).filter_map(Slot::new).collect();
    let partitions: BTreeSet<PartitionId> = (0..keys)
        .map(|k| partition_of_key(format!("k{k}").as_bytes()))
        .collect();
    partitions
        .into_iter()
        .filter(|p| target(slots.iter().copied(), *p) == Slot::new(base))
        .count()
}

struct Moved {
    stall_ms: f64,
    gap_ms: f64,
    acked_to_sent_ms: f64,
}

/// Partitions whose deliveries after `change` went to another replica than their last handling
/// before it: from the change to the first arrival at the new owner (stall), from the old
/// owner's last acknowledgement to the new owner's first handling (gap: the partition's work
/// stood still) and to its first arrival (what of the gap the hub and the new owner's queue
/// at the hub account for; the rest is the new owner handling what it already had).
fn moved_partitions(recs: &[Rec], change: Instant) -> Vec<Moved> {
    let partition = |key: u32| partition_of_key(format!("k{key}").as_bytes()).get();
    // Per partition: the last handling before the change (by arrival).
    let mut last_before: BTreeMap<u8, Rec> = BTreeMap::new();
    for r in recs.iter().filter(|r| r.arrived < change) {
        let e = last_before.entry(partition(r.key)).or_insert(*r);
        if r.done >= e.done {
            *e = *r;
        }
    }
    // Per partition: the first arrival after the change at a replica other than the old owner.
    let mut first_after: BTreeMap<u8, Rec> = BTreeMap::new();
    for r in recs.iter().filter(|r| r.arrived >= change) {
        let p = partition(r.key);
        let Some(old) = last_before.get(&p) else {
            continue;
        };
        if r.replica == old.replica {
            continue;
        }
        let e = first_after.entry(p).or_insert(*r);
        if r.arrived < e.arrived {
            *e = *r;
        }
    }
    // The old owner's last handling of a moved partition may come after the change (a handoff
    // waits for it): the latest handling by the old owner before the new owner's first.
    let mut out = Vec::new();
    for (p, new) in &first_after {
        let Some(old) = last_before.get(p) else {
            continue;
        };
        let old_last = recs
            .iter()
            .filter(|r| {
                partition(r.key) == *p && r.replica == old.replica && r.arrived < new.arrived
            })
            .map(|r| r.done)
            .max()
            .unwrap_or(old.done);
        out.push(Moved {
            stall_ms: new.arrived.saturating_duration_since(change).as_secs_f64() * 1e3,
            gap_ms: new
                .started
                .saturating_duration_since(old_last)
                .as_secs_f64()
                * 1e3,
            acked_to_sent_ms: new
                .arrived
                .saturating_duration_since(old_last)
                .as_secs_f64()
                * 1e3,
        });
    }
    out
}

fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

#[derive(Serialize)]
struct Results {
    params: Params,
    machine: benches::env::Machine,
    throughput: Vec<ThroughputPoint>,
    handoffs: Vec<HandoffPoint>,
    errors: Vec<String>,
    warnings: Vec<String>,
}

async fn run(p: Params) -> BenchResult<(Results, String)> {
    let machine = benches::env::Machine::read();
    let hub = Hub::start(&p).await?;
    let mut run = Run {
        log: Log::new(p.keys),
        p: p.clone(),
        hub,
        produced: vec![0; usize::try_from(p.keys)?],
        next_replica: 0,
        dups_seen: 0,
        errors: Vec::new(),
    };
    let mut text = String::new();
    let say = |s: String, text: &mut String| {
        eprintln!("{s}");
        text.push_str(&s);
        text.push('\n');
    };
    say(
        format!(
            "replbench: hub {}, {} keys, handler {} ms, backlog {} per key, producer window {}, {} CPUs, load {:.2}, busy {:.0}%",
            p.hub.display(),
            p.keys,
            p.handler_ms,
            p.backlog,
            p.window,
            machine.cpus,
            machine.loadavg_1m.unwrap_or(0.0),
            machine.cpu_busy.unwrap_or(0.0) * 100.0
        ),
        &mut text,
    );
    let mut throughput = Vec::new();
    let mut handoffs = Vec::new();
    let outcome: BenchResult<()> = async {
        if p.throughput {
            for round in 0..p.rounds {
                let mut order = p.replicas.clone();
                if round % 2 == 1 {
                    order.reverse();
                }
                for n in order {
                    let pt = run.throughput_point(round, n).await?;
                    say(
                        format!(
                            "  round {round} N={n}: {:.1} msg/s ({} in {:.1} s; per replica {:?}; handler {:.2} ms; hub {:.2} cores; others {:.0}%)",
                            pt.msgs_per_s, pt.handled, pt.secs, pt.per_replica, pt.handler_ms_mean, pt.hub_cpu_cores, pt.others_busy * 100.0
                        ),
                        &mut text,
                    );
                    throughput.push(pt);
                }
            }
        }
        if p.handoff {
            for rep in 0..p.handoffs {
                for kind in [HandoffKind::Join, HandoffKind::Leave, HandoffKind::Kill] {
                    let pt = run.handoff_point(kind, rep).await?;
                    say(
                        format!(
                            "  {} #{rep}: {} partitions moved (expected {}), stall p50 {:.0} ms max {:.0} ms, gap p50 {:.0} ms max {:.0} ms, handled twice {} (hub counted {})",
                            pt.kind,
                            pt.moved,
                            pt.expected,
                            percentile(&pt.stalls_ms, 0.5),
                            percentile(&pt.stalls_ms, 1.0),
                            percentile(&pt.gaps_ms, 0.5),
                            percentile(&pt.gaps_ms, 1.0),
                            pt.duplicates_handled,
                            pt.duplicates_metric
                        ),
                        &mut text,
                    );
                    handoffs.push(pt);
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        run.errors.push(format!(
            "the run stopped: {e}; hub log: {}",
            run.hub.log_tail()
        ));
    }
    if !run.hub.alive() {
        run.errors
            .push(format!("the hub exited: {}", run.hub.log_tail()));
    }
    let errors = std::mem::take(&mut run.errors);
    run.hub.stop();

    let mut warnings = Vec::new();
    if let Some(w) = report::busy_warning(&machine, "at the start", machine.cpu_busy) {
        warnings.push(w);
    }
    for pt in &throughput {
        if pt.others_busy > 0.25 {
            warnings.push(format!(
                "round {} N={}: other processes used {:.0}% of the CPUs",
                pt.round,
                pt.replicas,
                pt.others_busy * 100.0
            ));
        }
    }
    text.push('\n');
    text.push_str(&tables(&p, &throughput, &handoffs));
    for w in &warnings {
        text.push_str(&format!("WARNING: {w}\n"));
    }
    for e in &errors {
        text.push_str(&format!("ERROR: {e}\n"));
    }
    Ok((
        Results {
            params: p,
            machine,
            throughput,
            handoffs,
            errors,
            warnings,
        },
        text,
    ))
}

fn tables(p: &Params, throughput: &[ThroughputPoint], handoffs: &[HandoffPoint]) -> String {
    let mut out = String::new();
    let ideal1 = 1000.0 / p.handler_ms;
    if !throughput.is_empty() {
        let mut t = Table::new(
            format!(
                "Throughput: replicas handling {} ms per message, one at a time ({} keys)",
                p.handler_ms, p.keys
            ),
            &[
                "N",
                "msg/s (mean of rounds)",
                "per round",
                "÷ N=1 (same round)",
                "ideal ÷ N=1",
                "÷ ideal",
                "replicas busy",
            ],
        );
        let mut ns: Vec<usize> = throughput.iter().map(|t| t.replicas).collect();
        ns.sort_unstable();
        ns.dedup();
        let rounds: Vec<usize> = {
            let mut r: Vec<usize> = throughput.iter().map(|t| t.round).collect();
            r.dedup();
            r
        };
        for n in ns {
            let pts: Vec<&ThroughputPoint> =
                throughput.iter().filter(|t| t.replicas == n).collect();
            let rates: Vec<f64> = pts.iter().map(|t| t.msgs_per_s).collect();
            let ratios: Vec<f64> = rounds
                .iter()
                .filter_map(|r| {
                    let one = throughput
                        .iter()
                        .find(|t| t.round == *r && t.replicas == 1)?;
                    let this = throughput
                        .iter()
                        .find(|t| t.round == *r && t.replicas == n)?;
                    Some(this.msgs_per_s / one.msgs_per_s)
                })
                .collect();
            let mean_rate = report::mean(&rates).unwrap_or(0.0);
            let mean_ratio = report::mean(&ratios);
            t.row([
                n.to_string(),
                format!("{mean_rate:.1}"),
                rates
                    .iter()
                    .map(|r| format!("{r:.1}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                match mean_ratio {
                    Some(r) => format!(
                        "{r:.2}× ({})",
                        ratios
                            .iter()
                            .map(|r| format!("{r:.2}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => "-".into(),
                },
                format!("{n}×"),
                format!("{:.2}", mean_rate / (ideal1 * n as f64)),
                format!(
                    "{:.0}%",
                    100.0
                        * report::mean(
                            &pts.iter()
                                .map(|t| t.msgs_per_s * t.handler_ms_mean / 1e3 / n as f64)
                                .collect::<Vec<_>>()
                        )
                        .unwrap_or(0.0)
                ),
            ]);
        }
        t.note(format!(
            "ideal: N × 1/{} ms = {:.0} × N msg/s. Handler time measured (sleep overshoot included): {:.3} ms mean; replicas busy = msg/s × that ÷ N.",
            p.handler_ms,
            ideal1,
            report::mean(&throughput.iter().map(|t| t.handler_ms_mean).collect::<Vec<_>>()).unwrap_or(0.0)
        ));
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !handoffs.is_empty() {
        let mut t = Table::new(
            "Handoff: per moved partition, membership change -> first delivery on the new owner (stall); old owner's last ack -> new owner's first handling (gap) and first delivery (ack->sent)",
            &["change", "moved (expected)", "stall p50", "stall max", "gap p50", "gap max", "ack->sent p50", "ack->sent max", "handled twice", "hub counted"],
        );
        for kind in [HandoffKind::Join, HandoffKind::Leave, HandoffKind::Kill] {
            let pts: Vec<&HandoffPoint> = handoffs
                .iter()
                .filter(|h| h.kind == kind.name(p.base))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let stalls: Vec<f64> = pts
                .iter()
                .flat_map(|h| h.stalls_ms.iter().copied())
                .collect();
            let gaps: Vec<f64> = pts.iter().flat_map(|h| h.gaps_ms.iter().copied()).collect();
            let sent: Vec<f64> = pts
                .iter()
                .flat_map(|h| h.acked_to_sent_ms.iter().copied())
                .collect();
            t.row([
                kind.name(p.base),
                format!(
                    "{} ({})",
                    stalls.len(),
                    pts.iter().map(|h| h.expected).sum::<usize>()
                ),
                format!("{:.0} ms", percentile(&stalls, 0.5)),
                format!("{:.0} ms", percentile(&stalls, 1.0)),
                format!("{:.0} ms", percentile(&gaps, 0.5)),
                format!("{:.0} ms", percentile(&gaps, 1.0)),
                format!("{:.0} ms", percentile(&sent, 0.5)),
                format!("{:.0} ms", percentile(&sent, 1.0)),
                pts.iter()
                    .map(|h| h.duplicates_handled)
                    .sum::<u64>()
                    .to_string(),
                format!(
                    "{:.0}",
                    pts.iter().map(|h| h.duplicates_metric).sum::<f64>()
                ),
            ]);
        }
        t.note("contract: a live old owner holds a handoff at most 10 s (handoff_deadline)");
        out.push_str(&t.to_string());
    }
    out
}

fn main() -> std::process::ExitCode {
    let p = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("replbench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("replbench: runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let (out, json) = (p.out.clone(), p.json.clone());
    let outcome = rt.block_on(run(p)).map(|(results, text)| {
        print!("{text}");
        let ok = results.errors.is_empty();
        let write = |path: &Option<PathBuf>, body: &str| {
            if let Some(path) = path {
                if let Err(e) = std::fs::write(path, body) {
                    eprintln!("replbench: writing {}: {e}", path.display());
                }
            }
        };
        write(&out, &text);
        match serde_json::to_string_pretty(&results) {
            Ok(j) => {
                write(&json, &j);
                let _ = benches::json::write_results("replicas", &results);
            }
            Err(e) => eprintln!("replbench: JSON: {e}"),
        }
        ok
    });
    benches::exit_code("replbench", outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn rec(replica: u32, key: u32, seq: u64, arrived: Instant) -> Rec {
        Rec {
            replica,
            key,
            seq,
            arrived,
            started: arrived + Duration::from_millis(1),
            done: arrived + Duration::from_millis(6),
        }
    }

    fn log_of(keys: u64, handled: &[(u32, u64)]) -> Arc<Log> {
        let log = Log::new(keys);
        let t = Instant::now();
        for (key, seq) in handled {
            log.record(rec(1, *key, *seq, t));
        }
        log
    }

    #[test]
    fn a_key_whose_first_handlings_skip_or_go_back_fails_the_check() {
        let gap = log_of(2, &[(0, 0), (1, 0), (0, 2), (0, 1)]);
        let err = gap.check(&[3, 1]).unwrap_err();
        assert!(err.contains("k0") && err.contains("seq 2"), "{err}");
        let back = log_of(1, &[(0, 1), (0, 0)]);
        assert!(back.check(&[2]).is_err());
    }

    #[test]
    fn an_acknowledged_message_never_handled_fails_the_check() {
        let log = log_of(2, &[(0, 0), (0, 1), (1, 0)]);
        let err = log.check(&[2, 2]).unwrap_err();
        assert!(err.contains("k1") && err.contains("1 of 2"), "{err}");
        // More handled than published is a broken run too.
        assert!(log.check(&[1, 1]).is_err());
    }

    #[test]
    fn redeliveries_count_as_handled_twice_and_keep_first_handlings_in_order() {
        // A replica went away after handling 0..=2; the next owner gets 1 and 2 again first.
        let log = log_of(1, &[(0, 0), (0, 1), (0, 2), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(log.check(&[4]), Ok(2));
        assert_eq!(log.distinct.load(Ordering::SeqCst), 4);
        assert_eq!(log.handled.load(Ordering::SeqCst), 6);
    }

    /// Two keys in different partitions.
    fn two_keys_in_two_partitions() -> (u32, u32) {
        let p = |k: u32| partition_of_key(format!("k{k}").as_bytes());
        let other = (1..).find(|k| p(*k) != p(0)).unwrap();
        (0, other)
    }

    #[test]
    fn only_partitions_handled_by_another_replica_after_the_change_count_as_moved() {
        let (moving, staying) = two_keys_in_two_partitions();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let change = ms(100);
        let recs = vec![
            rec(1, moving, 0, ms(10)),
            rec(1, staying, 0, ms(20)),
            // The old owner still finishes what it held of the moving key after the change.
            rec(1, moving, 1, ms(120)),
            rec(1, staying, 1, ms(130)),
            rec(2, moving, 2, ms(400)),
            rec(2, moving, 3, ms(410)),
        ];
        let moved = moved_partitions(&recs, change);
        assert_eq!(moved.len(), 1);
        let m = &moved[0];
        // Change (100) to the new owner's first arrival (400).
        assert!((m.stall_ms - 300.0).abs() < 1e-6, "{}", m.stall_ms);
        // The old owner's last done (120 + 6) to the new owner's first start (400 + 1).
        assert!((m.gap_ms - 275.0).abs() < 1e-6, "{}", m.gap_ms);
        assert!(
            (m.acked_to_sent_ms - 274.0).abs() < 1e-6,
            "{}",
            m.acked_to_sent_ms
        );
    }

    #[test]
    fn the_moves_expected_are_the_partitions_whose_target_is_the_new_slot() {
        let one = expected_moves(1, 1);
        assert!(one <= 1);
        let all: BTreeSet<PartitionId> = (0..100)
            .map(|k| partition_of_key(format!("k{k}").as_bytes()))
            .collect();
        let to_slot_2 = expected_moves(100, 2);
        let to_slot_1 = expected_moves(100, 1);
        assert!(to_slot_2 > 0 && to_slot_2 < all.len());
        assert!(to_slot_1 > 0 && to_slot_1 < all.len());
    }
}
