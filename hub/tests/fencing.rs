//! The fence at the hub level (issue 15): two real `edgehub` binaries on one data directory.
//!
//! - A fenced hub stops: hub A (epoch 1) serves raw MQTT clients and a raw AMQP connection, is
//!   frozen with SIGSTOP, hub B (epoch 2) opens the same directory, A is thawed and its sender
//!   publishes. A acknowledges nothing, closes every connection and exits with status 3
//!   (fenced), logging why; the modules reconnect to B, which delivers everything A acknowledged
//!   and what they send B, in order.
//! - An idle fenced hub (no publish, no SIGSTOP) notices too, by its periodic fence check.
//! - A stale restart (scenario 6): with B serving at epoch 2, A restarted again and again with
//!   `--epoch 1` exits with status 4 naming both epochs and writes nothing to the volume
//!   (`EPOCHS` keeps its length), while B acknowledges and delivers a publisher's stream without
//!   a gap.
//! - The same epoch again (a restart of the same pod) takes over: newest opener wins, the
//!   older one exits 3. That is why the controller must bump the epoch for a new pod.
//!
//! Every wait is on an event (a log line, a PUBACK, a socket's close, the process's state or
//! exit); the durations are failure bounds only.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raw::{log_field, module_creds, BinaryHub, Creds, Event, RawReader, RawWriter};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Failure bound for anything the test waits for (a loaded 2-core CI machine).
const T: Duration = Duration::from_secs(30);
/// The documented exit statuses (`edgehub run --help`, README).
const EXIT_FENCED: i32 = 3;
const EXIT_STALE_EPOCH: i32 = 4;

fn setup() -> tempfile::TempDir {
    raw::init_logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), raw::MANIFEST).unwrap();
    dir
}

fn epoch_args(epoch: u64) -> Vec<String> {
    vec!["--epoch".into(), epoch.to_string()]
}

fn log_of(hub: &BinaryHub) -> String {
    std::fs::read_to_string(&hub.log).unwrap_or_default()
}

/// The AMQP address from the hub's "edgehub ready" line.
fn amqp_addr(hub: &BinaryHub) -> SocketAddr {
    let log = log_of(hub);
    let line = log
        .lines()
        .find(|l| l.contains("edgehub ready"))
        .expect("ready line");
    log_field(line, "amqp")
        .and_then(|v| v.parse().ok())
        .expect("amqp address in the ready line")
}

/// Sends `sig` (e.g. "-STOP") to `child`.
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {}", child.id());
}

/// Waits until the kernel reports `child` stopped (`T`) or running again (anything else).
async fn wait_stopped(child: &Child, stopped: bool) {
    let path = format!("/proc/{}/stat", child.id());
    let deadline = Instant::now() + T;
    loop {
        let stat = std::fs::read_to_string(&path).expect("read /proc stat");
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        if (state == "T") == stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process state still {state}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for the hub process to exit and returns its status code (panics after [`T`]).
async fn wait_exit(hub: &mut BinaryHub) -> i32 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = hub.child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "the hub still runs after {T:?}:\n{}",
            log_of(hub)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An MQTT module connection (clean session) to `hub`, split.
async fn connect(hub: &BinaryHub, root: &Path, creds: &Creds) -> (RawReader, RawWriter) {
    let mut c = hub.client(root).await;
    let ack = c.connect(creds.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    c.split()
}

/// Publishes `seqs` with QoS 1 (pkid = seq + 1) and waits for each PUBACK, in order.
async fn publish_acked(
    reader: &mut RawReader,
    writer: &mut RawWriter,
    topic: &str,
    seqs: std::ops::Range<u16>,
) {
    for seq in seqs {
        writer
            .publish(topic, QoS::AtLeastOnce, seq + 1, seq.to_string().as_bytes())
            .await;
        match reader.next(T).await {
            Event::Packet(Packet::PubAck(a)) => assert_eq!(a.pkid, seq + 1),
            other => panic!("publish {seq}: expected its PUBACK, got {other:?}"),
        }
    }
}

/// A raw AMQP-over-TLS connection that has sent the SASL protocol header and read the hub's
/// answer (so the hub serves it).
async fn amqp_connection(
    addr: SocketAddr,
    root: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let ca = hub::tls::ca_path(&root.join("data"));
    let connector = tokio_rustls::TlsConnector::from(raw::tls_config(&ca));
    let tcp = TcpStream::connect(addr).await.expect("connect AMQP");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("AMQP TLS");
    tls.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    tls.flush().await.unwrap();
    let mut header = [0u8; 8];
    tokio::time::timeout(T, tls.read_exact(&mut header))
        .await
        .expect("the hub answers the AMQP header")
        .expect("read the AMQP header");
    assert_eq!(&header, b"AMQP\x03\x01\x00\x00");
    tls
}

/// Reads from the AMQP connection until the hub closes it (EOF or reset); panics after [`T`].
async fn amqp_closed(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => panic!("the AMQP connection is still open after {T:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// The payloads (as numbers) the receiver gets on `hub`, `n` of them, PUBACKed as they come.
async fn receive(hub: &BinaryHub, root: &Path, receiver: &Creds, n: usize) -> Vec<u64> {
    let mut c = hub.client(root).await;
    let ack = c.connect(receiver.connect(true, 60)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let filter = receiver.inputs_filter();
    let (_, early) = c.subscribe(1, &[filter.as_str()]).await;
    let (mut reader, mut writer) = c.split();
    let mut got = Vec::new();
    let mut pending: std::collections::VecDeque<Packet> = early.into();
    while got.len() < n {
        let p = match pending.pop_front() {
            Some(p) => p,
            None => reader.expect_packet(T).await,
        };
        if let Packet::Publish(p) = p {
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
            writer.puback(p.pkid).await;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thawed_fenced_hub_closes_every_connection_and_exits_3_then_modules_move_to_the_new_hub()
{
    let dir = setup();
    let root = dir.path();
    let mut a = BinaryHub::start_with(root, 1, &epoch_args(1)).await;
    let data = root.join("data");
    let sender = module_creds(&data, "sender");
    let receiver = module_creds(&data, "receiver");
    let spy = module_creds(&data, "spy");
    let topic = sender.output_topic();

    let (mut s_reader, mut s_writer) = connect(&a, root, &sender).await;
    publish_acked(&mut s_reader, &mut s_writer, &topic, 0..20).await;
    // Another module's connection that only listens, and an AMQP connection.
    let (mut spy_reader, _spy_writer) = connect(&a, root, &spy).await;
    let mut amqp = amqp_connection(amqp_addr(&a), root).await;

    signal(&a.child, "-STOP");
    wait_stopped(&a.child, true).await;
    let b = BinaryHub::start_with(root, 2, &epoch_args(2)).await;
    // Publish 20 (pkid 21) reaches A's socket while A is frozen; A reads it once thawed.
    s_writer.publish(&topic, QoS::AtLeastOnce, 21, b"20").await;
    signal(&a.child, "-CONT");
    wait_stopped(&a.child, false).await;

    // A acknowledges nothing more and closes every connection.
    let after = s_reader.expect_closed(T).await;
    assert!(
        !after.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "a fenced hub acknowledged {after:?}"
    );
    spy_reader.expect_closed(T).await;
    amqp_closed(&mut amqp).await;
    let code = wait_exit(&mut a).await;
    let log = log_of(&a);
    assert_eq!(code, EXIT_FENCED, "A's exit status; its log:\n{log}");
    assert!(
        log.contains("fenced") && log.contains("epoch"),
        "A logs why it stops:\n{log}"
    );

    // The modules reconnect to B: the sender sends the unacknowledged message again, then more.
    let (mut s_reader, mut s_writer) = connect(&b, root, &sender).await;
    publish_acked(&mut s_reader, &mut s_writer, &topic, 20..30).await;
    let got = receive(&b, root, &receiver, 30).await;
    assert_eq!(
        got,
        (0..30).collect::<Vec<u64>>(),
        "B delivers everything, in order"
    );
    let healthz = raw::http_get(b.addrs.metrics, "/healthz").await.unwrap();
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_hub_notices_it_was_fenced_without_a_publish() {
    let dir = setup();
    let root = dir.path();
    let mut a = BinaryHub::start_with(root, 1, &epoch_args(1)).await;
    let data = root.join("data");
    let spy = module_creds(&data, "spy");
    let (mut spy_reader, _spy_writer) = connect(&a, root, &spy).await;

    let _b = BinaryHub::start_with(root, 2, &epoch_args(2)).await;
    // Nobody touches A's store: its periodic fence check must notice.
    spy_reader.expect_closed(T).await;
    let code = wait_exit(&mut a).await;
    assert_eq!(
        code,
        EXIT_FENCED,
        "A's exit status; its log:\n{}",
        log_of(&a)
    );
}

/// The value of the one series of gauge `name` in a `/metrics` text.
fn metric<'a>(text: &'a str, name: &str) -> &'a str {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"));
    line.rsplit(' ').next().unwrap()
}

/// Runs `edgehub run --epoch {epoch}` on `root`'s data directory to its end; returns its status
/// and its log. A stale hub that opens the store and serves would never end: it is killed after
/// [`T`] and the test fails with its log.
fn run_to_end(root: &Path, epoch: u64) -> (i32, String) {
    let log = root.join("stale.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgehub"))
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
        .args(epoch_args(epoch))
        .env_remove("EDGEHUB_EPOCH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run edgehub");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the stale hub still runs after {T:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_hub_restarted_again_and_again_never_opens_the_volume_while_the_new_one_serves() {
    const RESTARTS: u16 = 5;
    const PER_ROUND: u16 = 10;
    let dir = setup();
    let root = dir.path();
    let mut a = BinaryHub::start_with(root, 1, &epoch_args(1)).await;
    let data = root.join("data");
    let sender = module_creds(&data, "sender");
    let receiver = module_creds(&data, "receiver");
    let topic = sender.output_topic();
    {
        let (mut r, mut w) = connect(&a, root, &sender).await;
        publish_acked(&mut r, &mut w, &topic, 0..PER_ROUND).await;
    }
    let b = BinaryHub::start_with(root, 2, &epoch_args(2)).await;
    assert_eq!(wait_exit(&mut a).await, EXIT_FENCED, "{}", log_of(&a));
    let b_log = log_of(&b);
    assert!(b_log.contains("store opened at epoch 2"), "{b_log}");

    let epochs = data.join("store").join("EPOCHS");
    let epochs_len = std::fs::metadata(&epochs).unwrap().len();
    // A publisher and a receiver on B run throughout the stale restarts.
    let (acked_tx, mut acked) = tokio::sync::watch::channel(0u64);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (mut r, mut w) = connect(&b, root, &sender).await;
    let publisher = tokio::spawn(async move {
        let mut seq = u64::from(PER_ROUND);
        while !*stop.borrow() {
            let pkid = u16::try_from(seq % 65_535).unwrap() + 1;
            w.publish(&topic, QoS::AtLeastOnce, pkid, seq.to_string().as_bytes())
                .await;
            match r.next(T).await {
                Event::Packet(Packet::PubAck(a)) => assert_eq!(a.pkid, pkid),
                other => panic!("publish {seq}: expected its PUBACK, got {other:?}"),
            }
            seq += 1;
            acked_tx.send_replace(seq);
        }
        seq
    });
    let (delivered_tx, mut delivered) = tokio::sync::watch::channel(Vec::<u64>::new());
    let mut c = b.client(root).await;
    assert_eq!(
        c.connect(receiver.connect(true, 60)).await.code,
        ConnectReturnCode::Success
    );
    let filter = receiver.inputs_filter();
    let (_, early) = c.subscribe(1, &[filter.as_str()]).await;
    let (mut rr, mut rw) = c.split();
    let receiving = tokio::spawn(async move {
        let mut pending: std::collections::VecDeque<Packet> = early.into();
        loop {
            let p = match pending.pop_front() {
                Some(p) => p,
                None => match rr.next(T).await {
                    Event::Packet(p) => p,
                    // The test ends the connection when it has checked everything.
                    Event::Closed(_) | Event::Timeout => return,
                },
            };
            if let Packet::Publish(p) = p {
                let n = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                delivered_tx.send_modify(|d| d.push(n));
                rw.puback(p.pkid).await;
            }
        }
    });

    for _ in 0..RESTARTS {
        let acked_before = *acked.borrow_and_update();
        let delivered_before = delivered.borrow_and_update().len();
        // A's kubelet restarts it with its old pod spec: epoch 1.
        let stale_root = root.to_path_buf();
        let (code, log) = tokio::task::spawn_blocking(move || run_to_end(&stale_root, 1))
            .await
            .unwrap();
        assert_eq!(
            code, EXIT_STALE_EPOCH,
            "the stale hub's status; its log:\n{log}"
        );
        assert!(
            log.contains("epoch 1") && log.contains("epoch 2"),
            "the refusal names both epochs:\n{log}"
        );
        assert!(!log.contains("edgehub ready"), "{log}");
        assert_eq!(
            std::fs::metadata(&epochs).unwrap().len(),
            epochs_len,
            "a stale open wrote to EPOCHS"
        );
        // B goes on acknowledging and delivering.
        tokio::time::timeout(T, acked.wait_for(|&n| n >= acked_before + 5))
            .await
            .expect("B keeps acknowledging")
            .unwrap();
        tokio::time::timeout(T, delivered.wait_for(|d| d.len() >= delivered_before + 5))
            .await
            .expect("B keeps delivering")
            .unwrap();
    }
    stop_tx.send_replace(true);
    let next = publisher.await.unwrap();
    tokio::time::timeout(T, delivered.wait_for(|d| d.len() as u64 >= next))
        .await
        .expect("B delivers everything acknowledged")
        .unwrap();
    let got = delivered.borrow().clone();
    assert_eq!(
        got,
        (0..next).collect::<Vec<u64>>(),
        "nothing lost or reordered"
    );
    receiving.abort();
    let b_log = log_of(&b);
    assert!(!b_log.contains("fenced"), "B was never fenced:\n{b_log}");
    let metrics = raw::http_get(b.addrs.metrics, "/metrics").await.unwrap();
    assert_eq!(metric(&metrics, "edgehub_store_epoch"), "2", "{metrics}");
    assert_eq!(metric(&metrics, "edgehub_store_fenced"), "0", "{metrics}");
}

/// Documents what the equal epoch means: a restart of the same pod (same epoch) takes over the
/// volume and fences the running instance. Newest opener wins; only a higher epoch given by the
/// controller to a NEW pod keeps a stale one out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_epoch_again_takes_over_newest_opener_wins() {
    let dir = setup();
    let root = dir.path();
    let mut first = BinaryHub::start_with(root, 1, &epoch_args(2)).await;
    let second = BinaryHub::start_with(root, 2, &epoch_args(2)).await;
    assert_eq!(
        wait_exit(&mut first).await,
        EXIT_FENCED,
        "{}",
        log_of(&first)
    );
    let healthz = raw::http_get(second.addrs.metrics, "/healthz")
        .await
        .unwrap();
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
}
