//! [`Upstream`] over MQTT 3.1.1 with TLS to IoT Hub (or anything that speaks its dialect), using
//! rumqttc. One connection per sending module identity, as edgeHub's MQTT upstream: client id
//! `{device}/{module}`, username `{iothub}/{device}/{module}/?api-version=…`, and a SAS token
//! signed with that module's key, so messages reach IoT Hub as the module that sent them.
//!
//! Guarantees:
//! - **No acknowledgement without a PUBACK.** A message is answered `Ok` only when the PUBACK
//!   carrying the packet id it was written with arrives on the connection it was written on
//!   ([`Inflight`]). Anything the client reports that does not fit ends the connection.
//! - **No retransmission behind the caller's back.** rumqttc would resend unacknowledged
//!   publishes after a reconnect only if the broker kept a session, and silently drop them
//!   otherwise. We never reuse an event loop across connections: when a connection ends, every
//!   waiting message is answered `Lost`, the client and its request channel are dropped whole,
//!   and the next connection starts empty. The sink resends from the store.
//! - **No gaps within a call.** Once a message of a call cannot be handed to the connection,
//!   none after it is (they are answered `Offline`), so a later message is never acknowledged
//!   ahead of an earlier one that was not sent.
//! - **Offline is explicit.** While there is no connection, publishes are answered `Offline`
//!   at once (the messages wait in the store); the link keeps reconnecting with exponential
//!   backoff, logs every failed attempt with its reason, and when a connection is up calls the
//!   `on_online` hook (the hub re-registers the sink so the worker's own backoff ends at once).
//! - **Tokens are renewed** by reconnecting when three quarters of a token's lifetime has
//!   passed (MQTT 3.1.1 cannot re-authenticate a live connection): from then on the link takes
//!   no new message (they are answered `Offline` and wait in the store), what is in flight
//!   drains, and the connection is replaced, so a renewal sends nothing twice even under
//!   steady traffic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::cloud::{CloudMessage, PublishError, Upstream};
use super::inflight::Inflight;
use crate::auth::sas;
use crate::identity::{Identities, Identity};
use crate::metrics::{HubMetrics, SentLabels};

/// IoT Hub's largest device-to-cloud message (256 KiB), which we apply to topic plus body.
pub const MAX_CLOUD_MESSAGE_BYTES: usize = 256 * 1024;
/// The `api-version` in the MQTT username (the one the current device SDKs send).
pub const API_VERSION: &str = "2021-04-12";
/// Publishes in flight per connection (rumqttc's packet-id ring).
const INFLIGHT: u16 = 100;
/// Requests the client's channel holds: a whole batch of the `$upstream` worker may go to one
/// module's connection, and `try_publish` must never find the channel full (the batch would
/// fail the same way on every retry).
const REQUEST_CAPACITY: usize = super::UPSTREAM_WINDOW + INFLIGHT as usize;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct MqttUpstreamConfig {
    /// The IoT Hub host name: in usernames and SAS audiences.
    pub iothub_hostname: String,
    /// The host to dial (the IoT Hub host name unless overridden); TLS checks the server
    /// certificate against this name.
    pub host: String,
    /// The port to dial (8883).
    pub port: u16,
    /// TLS client configuration (roots to trust).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Lifetime of each SAS token.
    pub token_ttl: Duration,
    /// How long a publish may wait for its PUBACK before the connection is given up (and
    /// everything in flight resent on the next): edgeHub's `CloudOperationTimeoutSecs`, 20 s.
    pub ack_timeout: Duration,
    /// Reconnect backoff: first delay.
    pub backoff_min: Duration,
    /// Reconnect backoff: longest delay.
    pub backoff_max: Duration,
}

impl MqttUpstreamConfig {
    /// Defaults for `iothub_hostname`, dialled at `host:port`, trusting `tls`.
    pub fn new(
        iothub_hostname: &str,
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        MqttUpstreamConfig {
            iothub_hostname: iothub_hostname.to_owned(),
            host: host.to_owned(),
            port,
            tls,
            keep_alive: Duration::from_secs(60),
            token_ttl: Duration::from_secs(3600),
            ack_timeout: Duration::from_secs(20),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }

    /// Delay before reconnect attempt number `failures` (≥ 1): doubling from the minimum, capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_min
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// The TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// The extra CA file cannot be read or holds no certificate.
    #[error("upstream CA {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No root to trust at all.
    #[error(
        "no CA to trust for the upstream link: no system bundle found \
         (/etc/ssl/certs/ca-certificates.crt) and no --upstream-ca given"
    )]
    NoRoots,
    /// rustls refused the configuration.
    #[error("upstream TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// System CA bundles, as Debian and Red Hat lay them out.
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// A TLS client configuration (ring) trusting the system bundle, if any, plus `extra_ca`.
pub fn client_tls_config(
    extra_ca: Option<&Path>,
) -> Result<rustls::ClientConfig, UpstreamTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(bundle) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
        if let Ok(certs) = CertificateDer::pem_file_iter(bundle) {
            // A system bundle with an odd entry still gives us the rest.
            let (added, ignored) = roots.add_parsable_certificates(certs.flatten());
            tracing::debug!(bundle = %bundle.display(), added, ignored, "system CA bundle");
        }
    }
    if let Some(path) = extra_ca {
        let ca_err = |reason: String| UpstreamTlsError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".to_owned()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(UpstreamTlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Where to answer a publish, and when it was handed to the connection.
type Waiter = (Instant, oneshot::Sender<Result<(), PublishError>>);

/// One identity's connection state, shared by its link task and the publishers.
#[derive(Debug)]
struct LinkState {
    /// The client of the connection being made or in use; `None` while offline.
    client: Option<AsyncClient>,
    /// Why there is no connection (for `Offline` answers).
    offline_reason: String,
    /// The token is due for renewal: take nothing new, so what is in flight drains and the
    /// connection can be replaced without resending anything.
    renewing: bool,
    inflight: Inflight<Waiter>,
}

#[derive(Debug)]
struct Link {
    identity: Identity,
    state: Mutex<LinkState>,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // A publisher that panicked mid-update cannot leave the state worse than "answer
        // everything not acknowledged as lost", which is what the link does on its next event.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the connection: every waiter is answered `Lost`.
    fn disconnect(&self, reason: &str) {
        let waiters = {
            let mut state = self.lock();
            state.client = None;
            state.offline_reason = reason.to_owned();
            state.renewing = false;
            state.inflight.lost()
        };
        for (_, w) in waiters {
            let _ = w.send(Err(PublishError::Lost));
        }
    }

    async fn publish(&self, messages: Vec<CloudMessage>) -> Vec<Result<(), PublishError>> {
        enum Answer {
            Now(Result<(), PublishError>),
            Later(oneshot::Receiver<Result<(), PublishError>>),
        }
        let answers: Vec<Answer> = {
            let mut state = self.lock();
            let mut stopped: Option<String> = None;
            let mut answers = Vec::with_capacity(messages.len());
            for m in messages {
                let size = m.topic.len() + m.payload.len();
                if size > MAX_CLOUD_MESSAGE_BYTES {
                    answers.push(Answer::Now(Err(PublishError::TooLarge {
                        size,
                        limit: MAX_CLOUD_MESSAGE_BYTES,
                    })));
                    continue;
                }
                if let Some(reason) = &stopped {
                    answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                    continue;
                }
                let client = state.client.clone().filter(|_| !state.renewing);
                let Some(client) = client else {
                    let reason = state.offline_reason.clone();
                    answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                    stopped = Some(reason);
                    continue;
                };
                match client.try_publish(m.topic, QoS::AtLeastOnce, false, m.payload.to_vec()) {
                    Ok(()) => {
                        let (tx, rx) = oneshot::channel();
                        state.inflight.queued((Instant::now(), tx));
                        answers.push(Answer::Later(rx));
                    }
                    Err(e) => {
                        let reason = format!("the MQTT client took no more requests: {e}");
                        answers.push(Answer::Now(Err(PublishError::Offline(reason.clone()))));
                        stopped = Some(reason);
                    }
                }
            }
            answers
        };
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            out.push(match a {
                Answer::Now(r) => r,
                Answer::Later(rx) => rx.await.unwrap_or(Err(PublishError::Lost)),
            });
        }
        out
    }
}

/// Everything the link tasks share.
struct Shared {
    config: MqttUpstreamConfig,
    identities: Arc<Identities>,
    metrics: Arc<HubMetrics>,
    on_online: Box<dyn Fn() + Send + Sync>,
}

/// A link and the task that runs it.
type LinkTask = (Arc<Link>, JoinHandle<()>);

/// The MQTT upstream: a link task per identity, started on its first message.
pub struct MqttUpstream {
    shared: Arc<Shared>,
    links: Mutex<HashMap<Identity, LinkTask>>,
}

impl std::fmt::Debug for MqttUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttUpstream")
            .field("host", &self.shared.config.host)
            .field("port", &self.shared.config.port)
            .finish_non_exhaustive()
    }
}

impl Drop for MqttUpstream {
    fn drop(&mut self) {
        let links = self.links.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, (_, task)) in links.drain() {
            task.abort();
        }
    }
}

impl MqttUpstream {
    /// An upstream with `config`, signing tokens with the keys in `identities`; `on_online` is
    /// called every time a connection comes up.
    pub fn new(
        config: MqttUpstreamConfig,
        identities: Arc<Identities>,
        metrics: Arc<HubMetrics>,
        on_online: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        MqttUpstream {
            shared: Arc::new(Shared {
                config,
                identities,
                metrics,
                on_online: Box::new(on_online),
            }),
            links: Mutex::new(HashMap::new()),
        }
    }

    fn link(&self, identity: &Identity) -> Arc<Link> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((link, _)) = links.get(identity) {
            return Arc::clone(link);
        }
        let link = Arc::new(Link {
            identity: identity.clone(),
            state: Mutex::new(LinkState {
                client: None,
                offline_reason: "connecting".to_owned(),
                renewing: false,
                inflight: Inflight::default(),
            }),
        });
        // The first connection attempt starts before this returns, so the caller's messages
        // wait for it instead of failing at once.
        let first = start_connection(&self.shared, &link);
        let task = tokio::spawn(run_link(Arc::clone(&self.shared), Arc::clone(&link), first));
        links.insert(identity.clone(), (Arc::clone(&link), task));
        link
    }
}

impl Upstream for MqttUpstream {
    async fn publish(
        &self,
        identity: &Identity,
        messages: Vec<CloudMessage>,
    ) -> Vec<Result<(), PublishError>> {
        let link = self.link(identity);
        link.publish(messages).await
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Makes a fresh client for `link` and installs it, so publishes queue while it connects.
/// `Err` when the identity has no key.
fn start_connection(shared: &Shared, link: &Link) -> Result<(EventLoop, Instant), String> {
    let identity = &link.identity;
    let Some(key) = shared.identities.stored_key(identity) else {
        let reason = PublishError::NoCredentials(identity.to_string()).to_string();
        link.lock().offline_reason = reason.clone();
        return Err(reason);
    };
    let config = &shared.config;
    let resource = sas::resource_uri(
        &config.iothub_hostname,
        identity.device.as_str(),
        Some(identity.module.as_str()),
    );
    let issued = Instant::now();
    let token = sas::generate(&resource, &key, unix_now() + config.token_ttl.as_secs());
    let username = format!(
        "{}/{}/{}/?api-version={API_VERSION}",
        config.iothub_hostname, identity.device, identity.module
    );
    let mut options = MqttOptions::new(identity.to_string(), config.host.clone(), config.port);
    options
        .set_credentials(username, token)
        .set_keep_alive(config.keep_alive)
        .set_clean_session(true)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(
            MAX_CLOUD_MESSAGE_BYTES + 4096,
            MAX_CLOUD_MESSAGE_BYTES + 4096,
        )
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&config.tls),
        )));
    let (client, eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    link.lock().client = Some(client);
    Ok((eventloop, issued))
}

/// A fixed word for why a connection attempt or connection failed (a metrics label).
fn failure_reason(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
        | ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "not_authorized"
        }
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::Tls(_) => "tls",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        ConnectionError::Io(_) => "network",
        _ => "protocol",
    }
}

/// How a connection ended.
enum Ended {
    /// Its token is due for renewal: reconnect now, it is not an outage.
    Renew,
    /// It failed; `progressed` says whether it got anything through first (or lived long
    /// enough to count as healthy), which resets the backoff.
    Failed { reason: String, progressed: bool },
}

/// A connection up this long counts as healthy even if it carried nothing.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Serves one established connection until it ends.
async fn serve(shared: &Shared, link: &Link, eventloop: &mut EventLoop, issued: Instant) -> Ended {
    let renew_after = shared.config.token_ttl.mul_f64(0.75);
    let up_since = Instant::now();
    let mut acked_any = false;
    loop {
        let oldest = link.lock().inflight.oldest().map(|(at, _)| *at);
        let event = match oldest {
            // Dropping the poll on a timeout is safe: the whole event loop is dropped with it.
            Some(at) => match tokio::time::timeout_at(
                (at + shared.config.ack_timeout).into(),
                eventloop.poll(),
            )
            .await
            {
                Ok(event) => event,
                Err(_) => {
                    return Ended::Failed {
                        reason: format!(
                            "no PUBACK within {:?}: giving up the connection",
                            shared.config.ack_timeout
                        ),
                        progressed: acked_any,
                    }
                }
            },
            None => eventloop.poll().await,
        };
        let anomaly = {
            let mut state = link.lock();
            match event {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    state.inflight.sent(pkid).err().map(|a| a.to_string())
                }
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => Some(format!(
                    "the broker acknowledged out of order (packet id {pkid} still awaited)"
                )),
                Ok(Event::Incoming(Packet::PubAck(ack))) => match state.inflight.acked(ack.pkid) {
                    Ok((handed_at, waiter)) => {
                        drop(state);
                        acked_any = true;
                        let _ = waiter.send(Ok(()));
                        shared.metrics.upstream().acked(&link.identity);
                        shared
                            .metrics
                            .message_send_duration("upstream", handed_at.elapsed());
                        shared.metrics.message_sent_with(&SentLabels {
                            from: link.identity.to_string(),
                            to: "upstream".to_owned(),
                            ..SentLabels::default()
                        });
                        None
                    }
                    Err(a) => Some(a.to_string()),
                },
                Ok(Event::Incoming(Packet::Disconnect)) => {
                    Some("the broker sent DISCONNECT".to_owned())
                }
                Ok(_) => None,
                // A lost connection is counted by `edgehub_upstream_offline`, not as a failed
                // connection attempt.
                Err(e) => Some(format!("connection lost: {e}")),
            }
        };
        if let Some(reason) = anomaly {
            return Ended::Failed {
                reason,
                progressed: acked_any || up_since.elapsed() >= HEALTHY_AFTER,
            };
        }
        if issued.elapsed() >= renew_after {
            let mut state = link.lock();
            // Stop taking messages, so the connection drains even under steady traffic.
            state.renewing = true;
            state.offline_reason = "renewing the SAS token".to_owned();
            if state.inflight.is_empty() {
                return Ended::Renew;
            }
        }
    }
}

/// The life of one identity's link: connect, serve, and after a failure reconnect with backoff,
/// for as long as the hub runs.
async fn run_link(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut next: Result<(EventLoop, Instant), String>,
) {
    let identity = link.identity.clone();
    let mut failures: u32 = 0;
    let mut offline_since: Option<Instant> = None;
    loop {
        let outcome = match next {
            Err(reason) => Err(reason),
            Ok((mut eventloop, issued)) => match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(%identity, "upstream connected");
                    shared.metrics.upstream().online(&identity);
                    if let Some(since) = offline_since.take() {
                        shared
                            .metrics
                            .upstream()
                            .offline_for(&identity, since.elapsed());
                    }
                    (shared.on_online)();
                    match serve(&shared, &link, &mut eventloop, issued).await {
                        Ended::Renew => {
                            link.disconnect("renewing the SAS token");
                            tracing::info!(%identity, "upstream reconnecting to renew its token");
                            Ok(())
                        }
                        Ended::Failed { reason, progressed } => {
                            if progressed {
                                failures = 0;
                            }
                            Err(reason)
                        }
                    }
                }
                Ok(other) => Err(format!("expected CONNACK, got {other:?}")),
                Err(e) => {
                    shared
                        .metrics
                        .upstream()
                        .connect_failed(&identity, failure_reason(&e));
                    Err(format!("cannot connect: {e}"))
                }
            },
        };
        match outcome {
            Ok(()) => {
                failures = 0;
            }
            Err(reason) => {
                link.disconnect(&reason);
                failures = failures.saturating_add(1);
                if offline_since.is_none() {
                    offline_since = Some(Instant::now());
                    shared.metrics.upstream().went_offline(&identity);
                }
                let delay = shared.config.backoff(failures);
                tracing::warn!(
                    %identity,
                    host = %shared.config.host,
                    port = shared.config.port,
                    retry_in_ms = delay.as_millis() as u64,
                    "upstream offline: {reason}"
                );
                let step = Instant::now();
                tokio::time::sleep(delay).await;
                shared
                    .metrics
                    .upstream()
                    .offline_for(&identity, step.elapsed());
                if let Some(since) = offline_since.as_mut() {
                    *since = Instant::now();
                }
            }
        }
        next = start_connection(&shared, &link);
    }
}
