//! A tiny raw MQTT 3.1.1 client for protocol tests, and a hub to point it at.
//!
//! Include it from a test file with `#[path = "support/raw.rs"] mod raw;`.
//!
//! - [`RawClient`]: MQTT over TLS (trusting the hub's CA, `{data_dir}/tls/ca.pem`) or plain TCP,
//!   speaking packets through `rumqttc::mqttbytes::v4` (`Packet::read/write`) so a test chooses
//!   every field: packet ids, QoS, clean-session, keep-alive, and raw bytes when it wants
//!   malformed input. [`RawClient::split`] gives a reader and a writer for pipelining.
//! - Every read has a deadline ([`RawReader::next`] answers [`Event::Timeout`]); nothing sleeps
//!   and hopes.
//! - [`Creds`]: what an Azure IoT SDK module sends: client id `device/module`, username
//!   `{iothub}/{device}/{module}/?api-version=2019-10-01`, password a SAS token made with
//!   `hub::auth::sas::generate`.
//! - [`TestHub`]: `hub::server::run` in-process on a temporary data dir, on listeners the test
//!   binds to port 0 and hands in (so it knows their addresses), waited for through `/readyz`;
//!   stopped through its shutdown future. It may run on a clock the test controls.
//!
//! The real binary ([`BinaryHub`]) listens on port 0 too and names the ports it bound in its
//! "edgehub ready" log line ([`wait_ready_line`]). Only servers that are not ours (mosquitto)
//! get a [`free_port`]: bound to `127.0.0.1:0` and released.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hub::auth::sas;
use hub::identity::{Identities, Identity};
use hub::settings::RawSettings;
use router::{DeviceId, ModuleId};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The IoT Hub host name the test hubs use (in usernames and SAS audiences).
pub const IOTHUB: &str = "edgehub.test";
/// The edge device id the test hubs use.
pub const DEVICE: &str = "edge-device";
/// The API version the Python SDK sends.
pub const API_VERSION: &str = "2019-10-01";
/// Largest packet the client reads.
const MAX_READ: usize = 1 << 21;

/// A manifest with three modules and one route `sender/outputs/* → receiver/inputs/input1`.
pub const MANIFEST: &str = r#"{"modulesContent": {
  "$edgeAgent": {"properties.desired": {"modules": {"sender": {}, "receiver": {}, "spy": {}}}},
  "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
    "routes": {"senderToReceiver": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")"},
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}}"#;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Turns on hub logs when `EDGEHUB_TEST_LOG` is set (an `EnvFilter`, e.g. `hub=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("EDGEHUB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------

/// What a module connects with.
#[derive(Clone, Debug)]
pub struct Creds {
    pub iothub: String,
    pub device: String,
    pub module: String,
    /// The decoded SharedAccessKey.
    pub key: Vec<u8>,
}

impl Creds {
    /// `device/module`.
    pub fn client_id(&self) -> String {
        format!("{}/{}", self.device, self.module)
    }

    /// `{iothub}/{device}/{module}/?api-version=2019-10-01`, as the Python SDK sends it.
    pub fn username(&self) -> String {
        format!(
            "{}/{}/{}/?api-version={API_VERSION}",
            self.iothub, self.device, self.module
        )
    }

    /// A token for this module valid for an hour.
    pub fn token(&self) -> String {
        self.token_for(&self.module, now_secs() + 3600)
    }

    /// A token signed with this module's key, naming `module` as audience, expiring at `expiry`.
    pub fn token_for(&self, module: &str, expiry: u64) -> String {
        let resource = sas::resource_uri(&self.iothub, &self.device, Some(module));
        sas::generate(&resource, &self.key, expiry)
    }

    /// Events topic of this module with a raw bag (may be empty).
    pub fn events_topic(&self, bag: &str) -> String {
        format!(
            "devices/{}/modules/{}/messages/events/{bag}",
            self.device, self.module
        )
    }

    /// Output `out1` of this module (what `sendOutputEvent("out1", …)` publishes on).
    pub fn output_topic(&self) -> String {
        self.events_topic("%24.on=out1")
    }

    /// The filter both SDKs subscribe for input messages.
    pub fn inputs_filter(&self) -> String {
        format!("devices/{}/modules/{}/inputs/#", self.device, self.module)
    }

    /// CONNECT with a good token.
    pub fn connect(&self, clean_session: bool, keep_alive: u16) -> Connect {
        self.connect_with(&self.client_id(), &self.token(), clean_session, keep_alive)
    }

    /// CONNECT with a chosen client id and password.
    pub fn connect_with(
        &self,
        client_id: &str,
        password: &str,
        clean_session: bool,
        keep_alive: u16,
    ) -> Connect {
        let mut c = Connect::new(client_id);
        c.clean_session = clean_session;
        c.keep_alive = keep_alive;
        c.set_login(self.username(), password);
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Any byte stream the client runs over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What reading gave.
#[derive(Debug)]
pub enum Event {
    /// A whole packet.
    Packet(Packet),
    /// The hub closed the connection (EOF or a reset); the text says which.
    Closed(String),
    /// Nothing within the deadline.
    Timeout,
}

/// A client connection: a reader and a writer over one stream.
pub struct RawClient {
    pub reader: RawReader,
    pub writer: RawWriter,
}

/// The reading half: decodes packets, keeping leftover bytes.
pub struct RawReader {
    io: ReadHalf<Pin<Box<dyn Io>>>,
    buf: BytesMut,
}

/// The writing half.
pub struct RawWriter {
    io: WriteHalf<Pin<Box<dyn Io>>>,
}

/// A rustls client configuration trusting only the PEM certificates in `ca_pem`.
pub fn tls_config(ca_pem: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("read the hub's CA") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("trust the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl RawClient {
    fn over(io: Pin<Box<dyn Io>>) -> Self {
        let (r, w) = tokio::io::split(io);
        RawClient {
            reader: RawReader {
                io: r,
                buf: BytesMut::with_capacity(16 * 1024),
            },
            writer: RawWriter { io: w },
        }
    }

    /// Opens plain TCP to `addr` (the hub's loopback plain listener).
    pub async fn plain(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).expect("nodelay");
        Self::over(Box::pin(tcp))
    }

    /// Opens TLS to `addr`, checking the server certificate for `localhost` against `ca_pem`.
    pub async fn tls(addr: SocketAddr, ca_pem: &Path) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).expect("nodelay");
        let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem));
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake");
        Self::over(Box::pin(tls))
    }

    /// [`RawClient::tls`] that says why instead of panicking (refused, closed during the
    /// handshake, or no handshake within `within`).
    pub async fn try_tls(
        addr: SocketAddr,
        ca_pem: &Path,
        within: Duration,
    ) -> Result<Self, String> {
        let connector = tokio_rustls::TlsConnector::from(tls_config(ca_pem));
        let name = ServerName::try_from("localhost").expect("server name");
        let open = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("TCP: {e}"))?;
            let _ = tcp.set_nodelay(true);
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))
        };
        match tokio::time::timeout(within, open).await {
            Err(_) => Err(format!("no TLS handshake within {within:?}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(tls)) => Ok(Self::over(Box::pin(tls))),
        }
    }

    /// Sends CONNECT and returns the CONNACK (panics if anything else, or nothing, comes).
    pub async fn connect(&mut self, connect: Connect) -> ConnAck {
        self.writer.send(&Packet::Connect(connect)).await;
        match self.reader.expect_packet(Duration::from_secs(10)).await {
            Packet::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// SUBSCRIBE at QoS 1 and wait for its SUBACK; returns it and any packets that came first.
    pub async fn subscribe(&mut self, pkid: u16, filters: &[&str]) -> (SubAck, Vec<Packet>) {
        self.writer.subscribe(pkid, filters).await;
        let mut before = Vec::new();
        loop {
            match self.reader.expect_packet(Duration::from_secs(10)).await {
                Packet::SubAck(ack) if ack.pkid == pkid => return (ack, before),
                other => before.push(other),
            }
        }
    }

    /// PINGREQ, then the packets up to and including PINGRESP (a round trip through the hub's
    /// connection task: whatever it had queued for us before comes first).
    pub async fn ping(&mut self) -> Vec<Packet> {
        self.writer.send(&Packet::PingReq).await;
        let mut seen = Vec::new();
        loop {
            let p = self.reader.expect_packet(Duration::from_secs(10)).await;
            let done = p == Packet::PingResp;
            seen.push(p);
            if done {
                return seen;
            }
        }
    }

    pub fn split(self) -> (RawReader, RawWriter) {
        (self.reader, self.writer)
    }
}

impl RawReader {
    /// The next packet, or why there is none, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            match Packet::read(&mut self.buf, MAX_READ) {
                Ok(p) => return Event::Packet(p),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => panic!("the hub sent bytes the client cannot decode: {e:?}"),
            }
            self.buf.reserve(16 * 1024);
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                Err(_) => return Event::Timeout,
                Ok(Ok(0)) => return Event::Closed("EOF".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Event::Closed(e.to_string()),
            }
        }
    }

    /// The next packet; panics on close or timeout.
    pub async fn expect_packet(&mut self, timeout: Duration) -> Packet {
        match self.next(timeout).await {
            Event::Packet(p) => p,
            other => panic!("expected a packet within {timeout:?}, got {other:?}"),
        }
    }

    /// The next PUBLISH; panics on anything else.
    pub async fn expect_publish(&mut self, timeout: Duration) -> Publish {
        match self.expect_packet(timeout).await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Reads until the hub closes the connection; returns the packets that came first. Panics
    /// if the connection is still open after `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Event::Packet(p) => seen.push(p),
                Event::Closed(_) => return seen,
                Event::Timeout => {
                    panic!("connection still open after {timeout:?}; packets seen: {seen:?}")
                }
            }
        }
    }
}

impl RawWriter {
    /// Writes one packet and flushes. A write error (the hub closed) is returned, not a panic.
    pub async fn try_send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(packet.size() + 8);
        packet.write(&mut buf, usize::MAX).expect("encode");
        self.io.write_all(&buf).await?;
        self.io.flush().await
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.try_send(packet).await.expect("write to the hub");
    }

    /// Writes bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Writes one packet without flushing (call [`RawWriter::flush`]).
    pub async fn send_unflushed(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut buf = BytesMut::with_capacity(packet.size() + 8);
        packet.write(&mut buf, usize::MAX).expect("encode");
        self.io.write_all(&buf).await
    }

    /// A PUBLISH (not flushed: call [`RawWriter::flush`]) with the chosen packet id.
    pub async fn publish_unflushed(
        &mut self,
        topic: &str,
        qos: QoS,
        pkid: u16,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let p = publish(topic, qos, pkid, payload);
        let mut buf = BytesMut::with_capacity(p.size() + 8);
        Packet::Publish(p)
            .write(&mut buf, usize::MAX)
            .expect("encode");
        self.io.write_all(&buf).await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush().await
    }

    /// A PUBLISH with the chosen packet id, flushed.
    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        self.send(&Packet::Publish(publish(topic, qos, pkid, payload)))
            .await;
    }

    pub async fn puback(&mut self, pkid: u16) {
        self.send(&Packet::PubAck(PubAck::new(pkid))).await;
    }

    pub async fn subscribe(&mut self, pkid: u16, filters: &[&str]) {
        let sub = Subscribe {
            pkid,
            filters: filters
                .iter()
                .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
                .collect(),
        };
        self.send(&Packet::Subscribe(sub)).await;
    }

    pub async fn disconnect(&mut self) {
        let _ = self.try_send(&Packet::Disconnect).await;
        let _ = self.io.shutdown().await;
    }
}

/// A PUBLISH packet.
pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Publish {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    p
}

/// The property bag of an input topic `devices/{d}/modules/{m}/inputs/{input}/{bag}`, decoded.
pub fn input_bag(topic: &str) -> Vec<(String, String)> {
    let bag = topic.splitn(7, '/').nth(6).unwrap_or("");
    bag.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// The value of `key` in a decoded bag.
pub fn bag_get<'a>(bag: &'a [(String, String)], key: &str) -> Option<&'a str> {
    bag.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Credentials of `module`, with its key read from `{data_dir}/identities.json` (which a hub
/// that declares the module has written; reading adds nothing for a module that has a key).
pub fn module_creds(data_dir: &Path, module: &str) -> Creds {
    let module_id = ModuleId::new(module);
    let ids = Identities::load_or_create(
        data_dir,
        &DeviceId::new(DEVICE),
        std::slice::from_ref(&module_id),
    )
    .expect("read identities");
    let key = ids
        .key(&Identity::new(DeviceId::new(DEVICE), module_id))
        .expect("declared")
        .to_vec();
    Creds {
        iothub: IOTHUB.into(),
        device: DEVICE.into(),
        module: module.into(),
        key,
    }
}

// ---------------------------------------------------------------------------------------------
// Ports and readiness
// ---------------------------------------------------------------------------------------------

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback port that was free a moment ago and was never handed out before in this process
/// (for servers that cannot be given a bound listener or report their port).
pub fn free_port() -> u16 {
    loop {
        let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        drop(l);
        if handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The whole response (status line, headers, body) to `GET path` on `addr`, or `None` if
/// nothing answered.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The status line of `GET /readyz` on `metrics`, or `None` if nothing answered.
pub async fn readyz(metrics: SocketAddr) -> Option<String> {
    http_get(metrics, "/readyz")
        .await
        .and_then(|text| text.lines().next().map(str::to_owned))
}

/// Addresses of one hub instance.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub mqtt: SocketAddr,
    pub metrics: SocketAddr,
    pub plain: SocketAddr,
}

/// What waiting for a starting hub found.
pub enum Start {
    Ready,
    /// The hub stopped before it was ready.
    Exited,
}

/// Polls `/readyz` until it answers 200 while `exited` says the hub still runs, for at most
/// `timeout`.
pub async fn wait_ready(
    addrs: Addrs,
    timeout: Duration,
    mut exited: impl FnMut() -> bool,
) -> Start {
    let deadline = Instant::now() + timeout;
    loop {
        if exited() {
            return Start::Exited;
        }
        if readyz(addrs.metrics)
            .await
            .is_some_and(|l| l.contains(" 200"))
        {
            // Our own hub answered only if it is still running (a port taken by someone else
            // makes ours exit at once).
            if exited() {
                return Start::Exited;
            }
            return Start::Ready;
        }
        assert!(
            Instant::now() < deadline,
            "hub not ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of field `name` in a log line, in the text (`name=value`) or JSON
/// (`"name":"value"`) format.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let text = format!(" {name}=");
    let json = format!("\"{name}\":\"");
    if let Some(at) = line.find(&text) {
        let rest = &line[at + text.len()..];
        return Some(rest.split_whitespace().next()?.to_owned());
    }
    let at = line.find(&json)?;
    let rest = &line[at + json.len()..];
    Some(rest.split('"').next()?.to_owned())
}

/// Waits until the log file `log` holds the hub's "edgehub ready" line and returns the
/// addresses it names (the ports it really bound); `None` if `exited` says the hub stopped
/// first. Panics after `timeout` (a failure bound).
pub async fn wait_ready_line(
    log: &Path,
    timeout: Duration,
    mut exited: impl FnMut() -> bool,
) -> Option<Addrs> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("edgehub ready")) {
            let addr = |name: &str| -> SocketAddr {
                log_field(line, name)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} address in {line:?}"))
            };
            let plain = log_field(line, "plain_mqtt")
                .and_then(|v| v.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok())
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            return Some(Addrs {
                mqtt: addr("mqtt"),
                metrics: addr("http"),
                plain,
            });
        }
        if exited() {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "hub not ready within {timeout:?}:\n{text}"
        );
        // The log file gives no signal when written; a short poll is the event wait here.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// In-process hub
// ---------------------------------------------------------------------------------------------

/// `hub::server::run` in this process, on `{root}/data` with `{root}/manifest.json`, on
/// listeners this test bound to port 0 (their addresses in `addrs` and `amqp`).
pub struct TestHub {
    pub root: PathBuf,
    pub addrs: Addrs,
    /// The AMQP listener.
    pub amqp: SocketAddr,
    /// The HTTPS listener for direct methods, if the settings asked for one.
    pub methods: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), hub::server::RunError>>>,
    identities: Arc<Identities>,
}

impl TestHub {
    /// Starts a hub with [`MANIFEST`] (written if absent) on `root`, and waits until it is ready.
    /// Upstream is off (`--upstream-protocol none`).
    pub async fn start(root: &Path) -> TestHub {
        Self::start_with(root, |_| {}).await
    }

    /// [`TestHub::start`] with settings changed by `adjust` (upstream off unless it says).
    pub async fn start_with(root: &Path, adjust: impl Fn(&mut RawSettings)) -> TestHub {
        Self::start_with_clock(root, adjust, Arc::new(store::SystemClock)).await
    }

    /// [`TestHub::start_with`] on `clock` (e.g. a [`store::ManualClock`] the test moves).
    pub async fn start_with_clock(
        root: &Path,
        adjust: impl Fn(&mut RawSettings),
        clock: Arc<dyn store::Clock>,
    ) -> TestHub {
        init_logs();
        let manifest = root.join("manifest.json");
        if !manifest.exists() {
            std::fs::write(&manifest, MANIFEST).expect("write manifest");
        }
        let any_port = || Some("127.0.0.1:0".to_owned());
        let mut raw = RawSettings {
            data_dir: Some(root.join("data")),
            manifest: Some(manifest),
            mqtt_addr: any_port(),
            metrics_addr: any_port(),
            plain_mqtt_addr: any_port(),
            amqp_addr: any_port(),
            iothub_hostname: Some(IOTHUB.into()),
            device_id: Some(DEVICE.into()),
            gateway_hostname: Some("localhost".into()),
            upstream_protocol: Some("none".into()),
            ..RawSettings::default()
        };
        adjust(&mut raw);
        let settings = raw.validate(None).expect("valid settings");
        let listeners = hub::server::Listeners::bind(&settings)
            .await
            .expect("bind the hub's listeners");
        let bound = listeners.local_addrs().expect("bound addresses");
        let addrs = Addrs {
            mqtt: bound.mqtt,
            metrics: bound.http,
            plain: bound.plain_mqtt.expect("a plain MQTT listener"),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hub::server::run(
            settings.clone(),
            listeners,
            clock,
            async move {
                let _ = stopped.await;
            },
        ));
        if let Start::Exited =
            wait_ready(addrs, Duration::from_secs(20), || task.is_finished()).await
        {
            match task.await {
                Ok(Ok(())) => panic!("run returned Ok before it was ready"),
                Ok(Err(e)) => panic!("the hub failed to start: {:#}", anyhow::Error::from(e)),
                Err(e) => panic!("run panicked: {e}"),
            }
        }
        let deployment = settings.manifest().load().expect("manifest");
        let identities = Identities::for_settings(&settings, &deployment.modules).expect("ids");
        TestHub {
            root: root.to_owned(),
            addrs,
            amqp: bound.amqp,
            methods: bound.methods,
            stop: Some(stop),
            task: Some(task),
            identities: Arc::new(identities),
        }
    }

    /// The CA a client must trust.
    pub fn ca(&self) -> PathBuf {
        hub::tls::ca_path(&self.root.join("data"))
    }

    /// Credentials of a declared module (key from the identities file).
    pub fn creds(&self, module: &str) -> Creds {
        let identity = Identity::new(DeviceId::new(DEVICE), ModuleId::new(module));
        let key = self
            .identities
            .key(&identity)
            .unwrap_or_else(|| panic!("{module} is not declared"))
            .to_vec();
        Creds {
            iothub: IOTHUB.into(),
            device: DEVICE.into(),
            module: module.into(),
            key,
        }
    }

    /// A TLS connection to the MQTT listener (no CONNECT sent yet).
    pub async fn tls(&self) -> RawClient {
        RawClient::tls(self.addrs.mqtt, &self.ca()).await
    }

    /// A plain TCP connection to the loopback listener (no CONNECT sent yet).
    pub async fn plain(&self) -> RawClient {
        RawClient::plain(self.addrs.plain).await
    }

    /// A TLS connection of `module` with a good token; asserts CONNACK 0 and returns it.
    pub async fn connected(&self, module: &str, clean: bool) -> (RawClient, ConnAck) {
        let mut c = self.tls().await;
        let ack = c.connect(self.creds(module).connect(clean, 60)).await;
        assert_eq!(
            ack.code,
            rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
            "{module} refused"
        );
        (c, ack)
    }

    /// `module` connected (clean session) and subscribed, QoS 1, to its inputs.
    pub async fn subscribed_receiver(&self, module: &str) -> RawClient {
        let (mut r, _) = self.connected(module, true).await;
        let filter = self.creds(module).inputs_filter();
        let (ack, _) = r.subscribe(1, &[&filter]).await;
        assert_eq!(
            ack.return_codes,
            vec![rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(
                rumqttc::mqttbytes::QoS::AtLeastOnce
            )]
        );
        r
    }

    /// Stops the hub through its shutdown future and waits for `run` to return Ok.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("hub did not stop within 30 s")
                .expect("hub task panicked");
            if let Err(e) = r {
                panic!("hub run returned an error: {:#}", anyhow::Error::from(e));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

/// `edgehub run` as a child process.
pub struct BinaryHub {
    pub child: Child,
    pub addrs: Addrs,
    pub log: PathBuf,
}

impl BinaryHub {
    /// Starts the binary on `{root}/data` with `{root}/manifest.json` and waits for `/readyz`.
    pub async fn start(root: &Path, n: usize) -> BinaryHub {
        Self::start_with(root, n, &[]).await
    }

    /// [`BinaryHub::start`] with more command-line arguments. The binary listens on port 0;
    /// its addresses are read from its "edgehub ready" log line.
    pub async fn start_with(root: &Path, n: usize, extra: &[String]) -> BinaryHub {
        let log = root.join(format!("hub-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
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
            .args(["--iothub-hostname", IOTHUB, "--device-id", DEVICE])
            .args(["--gateway-hostname", "localhost", "--log", "info"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn edgehub");
        let addrs = match wait_ready_line(&log, Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        })
        .await
        {
            Some(addrs) => addrs,
            None => panic!(
                "the hub exited before it was ready:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        };
        BinaryHub { child, addrs, log }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    pub async fn client(&self, root: &Path) -> RawClient {
        RawClient::tls(self.addrs.mqtt, &hub::tls::ca_path(&root.join("data"))).await
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for BinaryHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
