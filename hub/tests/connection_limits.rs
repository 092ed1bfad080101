//! Connection limits and the accept loop under exhaustion (issue 11, item 3):
//!
//! - out of file descriptors, the accept loop backs off and logs a handful of lines, not one
//!   per failed accept, and serves a module again once descriptors come back;
//! - a flood of connections that never authenticate cannot lock a module out, even when the
//!   flood alone would take every descriptor the hub has;
//! - `--max-connections` refuses the connection after the limit, and gives the slot back when
//!   a module leaves;
//! - a connection that does not authenticate within `--auth-timeout` is closed, MQTT and AMQP,
//!   the TLS handshake counted in.
//!
//! The descriptor tests run the `edgehub` binary under `prlimit --nofile` (util-linux) and read
//! its log as it is written; every wait is on a log line, a packet or a metric, with a generous
//! deadline only as the failure bound.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/raw.rs"]
mod raw;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use raw::{Addrs, RawClient};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The hub's log as it is written, with a signal for each new piece.
type Log = Arc<(Mutex<String>, Condvar)>;

/// `edgehub run` under `prlimit --nofile=N`, its stderr followed.
struct LimitedHub {
    child: Child,
    addrs: Addrs,
    root: PathBuf,
    log: Log,
}

impl LimitedHub {
    async fn start(root: &Path, nofile: u64, extra: &[&str]) -> LimitedHub {
        std::fs::write(root.join("manifest.json"), raw::MANIFEST).expect("manifest");
        // Port 0: the hub names the ports it bound in its "edgehub ready" line.
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_edgehub"))
            .arg("run")
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--manifest")
            .arg(root.join("manifest.json"))
            .args(["--mqtt-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args([
                "--amqp-addr",
                "127.0.0.1:0",
                "--methods-addr",
                "127.0.0.1:0",
            ])
            .args(["--iothub-hostname", raw::IOTHUB, "--device-id", raw::DEVICE])
            .args(["--gateway-hostname", "localhost", "--log", "info"])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("EDGEHUB_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prlimit edgehub (util-linux prlimit installed?)");
        let log = follow(child.stderr.take().expect("stderr"));
        let deadline = std::time::Instant::now() + secs(60);
        let is_ready = |t: &str| t.contains("edgehub ready");
        // Woken by every new piece of the log; the slice only bounds how late an exit is
        // noticed.
        while !wait_in(&log, secs(1), is_ready) {
            if child.try_wait().ok().flatten().is_some() {
                let _ = child.wait();
                panic!("the hub failed to start: {}", text(&log));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hub not ready within 60 s:\n{}",
                text(&log)
            );
        }
        let all = text(&log);
        let line = all.lines().find(|l| is_ready(l)).expect("the ready line");
        let addr = |name: &str| -> SocketAddr {
            raw::log_field(line, name)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} address in {line:?}"))
        };
        let addrs = Addrs {
            mqtt: addr("mqtt"),
            metrics: addr("http"),
            plain: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        LimitedHub {
            child,
            addrs,
            root: root.to_owned(),
            log,
        }
    }

    fn log(&self) -> String {
        text(&self.log)
    }

    /// Waits until the log satisfies `ok` (checked on every new piece); false at `within`.
    fn wait_log(&self, within: Duration, ok: impl Fn(&str) -> bool) -> bool {
        wait_in(&self.log, within, ok)
    }

    fn ca(&self) -> PathBuf {
        hub::tls::ca_path(&self.root.join("data"))
    }
}

impl Drop for LimitedHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `stderr` on a thread into a shared string, without colour codes.
fn follow(mut stderr: std::process::ChildStderr) -> Log {
    let log: Log = Arc::new((Mutex::new(String::new()), Condvar::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.0
                .lock()
                .unwrap()
                .push_str(&strip_ansi(&String::from_utf8_lossy(&buf[..n])));
            sink.1.notify_all();
        }
    });
    log
}

/// Waits until `log` satisfies `ok` (checked on every new piece); false at `within`.
fn wait_in(log: &Log, within: Duration, ok: impl Fn(&str) -> bool) -> bool {
    tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + within;
        let (text, changed) = &**log;
        let mut guard = text.lock().unwrap();
        loop {
            if ok(&guard) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    })
}

fn text(log: &Log) -> String {
    log.0.lock().unwrap().clone()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn accept_failed_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains("accept failed")).count()
}

/// One metric sample's value (the first series whose line contains every part), or `None`.
async fn metric(addr: SocketAddr, name: &str, parts: &[&str]) -> Option<f64> {
    let text = raw::http_get(addr, "/metrics").await?;
    text.lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until `metric` reaches `at_least` (polling the hub's /metrics); panics at `within`.
async fn wait_metric(
    addr: SocketAddr,
    name: &str,
    parts: &[&str],
    at_least: f64,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = metric(addr, name, parts).await;
        if now.is_some_and(|v| v >= at_least) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{parts:?} is {now:?}, not >= {at_least}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A module connects over TLS, publishes one QoS 1 message and gets its PUBACK.
async fn module_publishes(addr: SocketAddr, ca: &Path, root: &Path, within: Duration) {
    let mut c = RawClient::try_tls(addr, ca, within)
        .await
        .unwrap_or_else(|e| panic!("the module could not connect: {e}"));
    let creds = raw::module_creds(&root.join("data"), "sender");
    let ack = c.connect(creds.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c.writer
        .publish(&creds.output_topic(), QoS::AtLeastOnce, 7, b"after")
        .await;
    match c.reader.expect_packet(within).await {
        Packet::PubAck(a) => assert_eq!(a.pkid, 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Out of file descriptors, with connections waiting in the listen queue: the accept loop
/// pauses (10 ms doubling to 1 s) and logs once per interval with a count, so a few lines
/// come out over many seconds, not millions; once the idle connections go, a module is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_logs_little_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Big budgets and a long deadline: descriptors, not the limits, are what runs out here.
    let hub = LimitedHub::start(
        dir.path(),
        64,
        &[
            "--max-connections",
            "1000",
            "--max-unauthenticated",
            "1000",
            "--auth-timeout",
            "600",
        ],
    )
    .await;
    let idle: Vec<std::net::TcpStream> = (0..120)
        .map(|_| std::net::TcpStream::connect(hub.addrs.mqtt).expect("queued by the kernel"))
        .collect();
    assert!(
        hub.wait_log(secs(60), |l| accept_failed_lines(l) > 0),
        "the hub never ran out of descriptors:\n{}",
        hub.log()
    );
    // A second summary line comes an interval after the first, with the count of the failures
    // in between; a loop that logs each failure reaches 50 lines long before.
    let summarised = |l: &str| {
        l.lines()
            .filter(|l| l.contains("accept failed"))
            .any(|l| l.contains("failures_not_logged=") && !l.contains("failures_not_logged=0"))
    };
    hub.wait_log(secs(60), |l| accept_failed_lines(l) >= 50 || summarised(l));
    let log = hub.log();
    let lines = accept_failed_lines(&log);
    assert!(
        lines < 50 && summarised(&log),
        "{lines} accept-failure lines:\n{}",
        log.lines()
            .filter(|l| l.contains("accept failed"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(idle);
    module_publishes(hub.addrs.mqtt, &hub.ca(), dir.path(), secs(30)).await;
    wait_metric(
        hub.addrs.metrics,
        "edgehub_accept_failures_total",
        &["protocol=\"mqtt\""],
        1.0,
        secs(10),
    )
    .await;
    let lines = accept_failed_lines(&hub.log());
    assert!(lines < 50, "{lines} accept-failure lines by the end");
}

/// Many more connections than the hub has descriptors for, each completing its TLS handshake
/// and then sending nothing: they hold only `--max-unauthenticated` (32) slots, each newer one
/// closing the oldest, so the hub never runs out and a module connects and publishes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_cannot_lock_a_module_out() {
    let dir = tempfile::tempdir().unwrap();
    let hub = LimitedHub::start(dir.path(), 80, &[]).await;
    let (addr, ca) = (hub.addrs.mqtt, hub.ca());
    let flood: Vec<_> = (0..150)
        .map(|_| {
            let ca = ca.clone();
            tokio::spawn(async move { RawClient::try_tls(addr, &ca, secs(5)).await.ok() })
        })
        .collect();
    let mut held = Vec::new();
    for f in flood {
        if let Some(c) = f.await.unwrap() {
            held.push(c);
        }
    }
    module_publishes(addr, &ca, dir.path(), secs(20)).await;
    drop(held);
    wait_metric(
        hub.addrs.metrics,
        "edgehub_connections_refused_total",
        &["protocol=\"mqtt\"", "reason=\"evicted\""],
        1.0,
        secs(10),
    )
    .await;
    assert_eq!(
        accept_failed_lines(&hub.log()),
        0,
        "the flood ran the hub out of descriptors:\n{}",
        hub.log()
    );
}

/// `--max-connections 2`: a third module authenticating is answered CONNACK 3 (server
/// unavailable, which the SDKs retry), also when it connected while two were authenticated,
/// and the slot of a module that leaves is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_over_max_connections_is_refused_until_a_slot_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let hub = raw::TestHub::start_with(dir.path(), |s| s.max_connections = Some(2)).await;
    let ca = hub.ca();
    let mut third = RawClient::try_tls(hub.addrs.mqtt, &ca, secs(10))
        .await
        .expect("an unauthenticated connection is admitted");
    let (mut sender, _) = hub.connected("sender", true).await;
    let (_receiver, _) = hub.connected("receiver", true).await;
    let ack = third.connect(hub.creds("spy").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    third.reader.expect_closed(secs(10)).await;
    // A connection accepted at the limit is admitted (its login might replace a live
    // connection of the same module); a login that does not is refused in turn.
    let mut fourth = RawClient::try_tls(hub.addrs.mqtt, &ca, secs(10))
        .await
        .expect("a connection at the limit is admitted until it logs in");
    let ack = fourth.connect(hub.creds("spy").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    fourth.reader.expect_closed(secs(10)).await;
    wait_metric(
        hub.addrs.metrics,
        "edgehub_connections_refused_total",
        &["protocol=\"mqtt\"", "reason=\"max_connections\""],
        2.0,
        secs(10),
    )
    .await;
    sender.writer.disconnect().await;
    sender.reader.expect_closed(secs(10)).await;
    // The gauge drops when the hub has given the slot back.
    let deadline = tokio::time::Instant::now() + secs(10);
    while metric(
        hub.addrs.metrics,
        "edgehub_connections",
        &["protocol=\"mqtt\"", "state=\"authenticated\""],
    )
    .await
        != Some(1.0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_spy, ack) = hub.connected("spy", true).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    hub.stop().await;
}

/// `--auth-timeout 1`: a connection that finishes its TLS handshake and then says nothing is
/// closed by the deadline, on MQTT (no CONNECT) and on AMQP (no protocol header), well before
/// the heads' own 60 s waits; each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_auth_deadline_on_both_heads() {
    let dir = tempfile::tempdir().unwrap();
    let hub = raw::TestHub::start_with(dir.path(), |s| {
        s.auth_timeout_secs = Some(1);
    })
    .await;
    let amqp = hub.amqp;
    let ca = hub.ca();
    let mut mqtt = RawClient::try_tls(hub.addrs.mqtt, &ca, secs(10))
        .await
        .expect("TLS");
    let mut amqp = RawClient::try_tls(amqp, &ca, secs(10)).await.expect("TLS");
    // Both well before 60 s; the deadline is 1 s.
    assert!(mqtt.reader.expect_closed(secs(30)).await.is_empty());
    assert!(amqp.reader.expect_closed(secs(30)).await.is_empty());
    for protocol in ["protocol=\"mqtt\"", "protocol=\"amqp\""] {
        wait_metric(
            hub.addrs.metrics,
            "edgehub_connections_refused_total",
            &[protocol, "reason=\"auth_timeout\""],
            1.0,
            secs(10),
        )
        .await;
    }
    // A module that authenticates in time is not affected.
    let (mut module, _) = hub.connected("sender", true).await;
    let pings = module.ping().await;
    assert_eq!(pings.last(), Some(&Packet::PingResp));
    hub.stop().await;
}

/// A connection that never authenticates does not hold up a shutdown: the hub closes it and
/// stops at once instead of waiting for its deadline (here 600 s; the MQTT head's own wait for
/// CONNECT is 60 s), while the authenticated module is closed in order as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_up_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let hub = raw::TestHub::start_with(dir.path(), |s| s.auth_timeout_secs = Some(600)).await;
    let mut silent = RawClient::try_tls(hub.addrs.mqtt, &hub.ca(), secs(10))
        .await
        .expect("TLS");
    let (mut module, _) = hub.connected("sender", true).await;
    // Panics unless `run` returns within 30 s.
    hub.stop().await;
    silent.reader.expect_closed(secs(5)).await;
    module.reader.expect_closed(secs(5)).await;
}

/// `--max-connections 2`, both taken: a module whose previous connection is still open (its
/// network went away and the hub has not noticed yet) reconnects at once and replaces it, as
/// edgeHub does, instead of being refused until the old one's keep-alive runs out; once the
/// old connection has closed, the count is back at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_a_module_reconnecting_replaces_its_old_connection() {
    let dir = tempfile::tempdir().unwrap();
    let hub = raw::TestHub::start_with(dir.path(), |s| s.max_connections = Some(2)).await;
    let (mut old, _) = hub.connected("sender", true).await;
    let (_receiver, _) = hub.connected("receiver", true).await;
    let mut new = hub.tls().await;
    let ack = new.connect(hub.creds("sender").connect(true, 60)).await;
    assert_eq!(
        ack.code,
        ConnectReturnCode::Success,
        "a module replacing its own connection is refused at the limit"
    );
    old.reader.expect_closed(secs(10)).await;
    wait_metric(
        hub.addrs.metrics,
        "edgehub_connections",
        &["protocol=\"mqtt\"", "state=\"authenticated\""],
        2.0,
        secs(10),
    )
    .await;
    // Still at the limit: another module is refused.
    let mut spy = hub.tls().await;
    let ack = spy.connect(hub.creds("spy").connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable);
    hub.stop().await;
}
