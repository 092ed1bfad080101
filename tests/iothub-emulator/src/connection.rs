//! One client connection: TLS, CONNECT and its checks, telemetry, subscriptions, keep-alive.
//!
//! Guarantees:
//! - Reads are buffered; every complete packet in the buffer is handled before the next read,
//!   and everything the burst produced (CONNACK, PUBACKs, SUBACKs, PINGRESPs) goes out in one
//!   write, in the order the packets came.
//! - The messages of a burst are recorded under one lock **before** that write, so no PUBACK
//!   precedes its record; if the emulator killed the connection meanwhile, the burst is neither
//!   recorded nor acknowledged.
//! - A rule broken (first packet not CONNECT, second CONNECT, publish outside the identity's
//!   telemetry topic, QoS 2, malformed or oversized packet) closes this connection: what came
//!   before it in the burst is recorded and acknowledged, the offending packet and everything
//!   after it are not.
//! - Silence longer than 1.5 × keep-alive closes the connection (keep-alive 0: no limit); a
//!   CONNECT must arrive within [`CONNECT_TIMEOUT`] of the TCP accept.
//! - Twins and methods (`$iothub/...`, [`crate::twin`]): a twin GET is answered
//!   `$iothub/twin/res/200/?$rid=` with the document; a reported patch is merged and answered
//!   `204` with `&$version=`, or `400` with a reason if it is no JSON object (the twin is then
//!   unchanged); a method response completes the invocation of that `$rid` only if it was sent
//!   to this identity. The emulator's own publishes (desired patches, method requests) are
//!   written between bursts, at QoS 0.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use crate::twin::{self, IotHubTopic};
use crate::{sas, topic, Kill, MethodResponse, Received, RefuseReason, Shared, Subscriptions};

/// Time from TCP accept to a complete TLS handshake and CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// IoT Hub's largest device-to-cloud message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest packet: a full message plus room for the topic and property bag.
const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    Disconnect,
    Io(std::io::Error),
    Handshake(String),
    Refused(RefuseReason),
    Violation(String),
    KeepAlive,
    ConnectTimeout,
    Killed(Kill),
}

/// The authenticated identity of a connection.
struct Session {
    id: String,
    device: String,
    module: Option<String>,
}

/// A message of the current burst, not yet recorded.
struct Pending {
    topic: String,
    payload: Bytes,
    properties: BTreeMap<String, String>,
    dup: bool,
    qos: u8,
}

struct Conn {
    shared: Arc<Shared>,
    serial: u64,
    peer: SocketAddr,
    session: Option<Session>,
    keep_alive: Option<Duration>,
    pending: Vec<Pending>,
    swallowed: u64,
    /// Once a connection swallowed a message it swallows everything after it, like a path
    /// that went dead: IoT Hub never acknowledges a later message on a connection that lost an
    /// earlier one.
    black_hole: bool,
    out: BytesMut,
}

/// Serves one TCP connection until it ends, then deregisters it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    serial: u64,
    mut kill: watch::Receiver<Option<Kill>>,
    mut push: mpsc::Receiver<Packet>,
) {
    let mut conn = Conn {
        shared: Arc::clone(&shared),
        serial,
        peer,
        session: None,
        keep_alive: None,
        pending: Vec::new(),
        swallowed: 0,
        black_hole: false,
        out: BytesMut::with_capacity(4 * 1024),
    };
    let connect_deadline = Instant::now() + CONNECT_TIMEOUT;
    let handshake = tokio::select! {
        biased;
        k = killed(&mut kill) => Err(End::Killed(k)),
        _ = tokio::time::sleep_until(connect_deadline) => Err(End::ConnectTimeout),
        tls = shared.acceptor.accept(tcp) => tls.map_err(|e| End::Handshake(e.to_string())),
    };
    let (end, stream) = match handshake {
        Ok(mut stream) => (
            conn.serve(&mut stream, &mut kill, &mut push, connect_deadline)
                .await,
            Some(stream),
        ),
        Err(end) => (end, None),
    };
    // Count the end before the socket closes: whoever sees the close sees the counters.
    conn.finish(end);
    shared.leave(serial);
    drop(stream);
}

/// Resolves when the emulator tells this connection to close.
async fn killed(kill: &mut watch::Receiver<Option<Kill>>) -> Kill {
    match kill.wait_for(Option::is_some).await {
        Ok(k) => k.unwrap_or(Kill::Shutdown),
        Err(_) => Kill::Shutdown,
    }
}

impl Conn {
    async fn serve(
        &mut self,
        stream: &mut TlsStream<TcpStream>,
        kill: &mut watch::Receiver<Option<Kill>>,
        push: &mut mpsc::Receiver<Packet>,
        connect_deadline: Instant,
    ) -> End {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut last_read = Instant::now();
        loop {
            let deadline = match (&self.session, self.keep_alive) {
                (None, _) => Some(connect_deadline),
                (Some(_), Some(ka)) => Some(last_read + ka),
                (Some(_), None) => None,
            };
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                k = killed(kill) => return End::Killed(k),
                _ = sleep_until(deadline) => {
                    return if self.session.is_none() { End::ConnectTimeout } else { End::KeepAlive };
                }
                r = stream.read_buf(&mut buf) => Some(r),
                Some(p) = push.recv(), if self.session.is_some() => {
                    self.write(&p);
                    None
                }
            };
            match read {
                Some(Ok(0)) => return End::ClientClosed,
                Some(Ok(_)) => last_read = Instant::now(),
                Some(Err(e)) => return End::Io(e),
                None => {}
            }
            let verdict = self.burst(&mut buf);
            // Record before acknowledging; a killed connection does neither.
            if let Some(k) = *kill.borrow() {
                return End::Killed(k);
            }
            self.commit();
            if !self.out.is_empty() {
                let write = async {
                    stream.write_all(&self.out).await?;
                    stream.flush().await
                };
                let written = tokio::select! {
                    biased;
                    k = killed(kill) => return End::Killed(k),
                    w = write => w,
                };
                if let Err(e) = written {
                    return End::Io(e);
                }
                self.out.clear();
            }
            if let Some(end) = verdict {
                let _ = stream.shutdown().await;
                return end;
            }
        }
    }

    /// Handles every complete packet in `buf`; `Some` when the connection must close after
    /// this burst's output is written.
    fn burst(&mut self, buf: &mut BytesMut) -> Option<End> {
        loop {
            let packet = match Packet::read(buf, MAX_PACKET_BYTES) {
                Ok(p) => p,
                Err(CodecError::InsufficientBytes(_)) => return None,
                Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                    return Some(End::Violation(format!(
                        "packet of {n} bytes over the {MAX_PACKET_BYTES}-byte limit"
                    )))
                }
                Err(e) => return Some(End::Violation(format!("malformed packet: {e}"))),
            };
            if let Some(end) = self.packet(packet) {
                return Some(end);
            }
        }
    }

    fn packet(&mut self, packet: Packet) -> Option<End> {
        let Some(session) = &self.session else {
            return match packet {
                Packet::Connect(c) => self.connect(&c),
                other => Some(End::Violation(format!(
                    "first packet is {} instead of CONNECT",
                    kind(&other)
                ))),
            };
        };
        match packet {
            Packet::Publish(p) if p.topic.starts_with("$iothub/") => {
                let id = session.id.clone();
                self.iothub(p, &id)
            }
            Packet::Publish(p) => {
                let (device, module) = (session.device.clone(), session.module.clone());
                self.publish(p, &device, module.as_deref())
            }
            Packet::Subscribe(s) => {
                let device = session.device.clone();
                self.subscribe(&s, &device);
                None
            }
            Packet::Unsubscribe(u) => {
                self.write(&Packet::UnsubAck(UnsubAck { pkid: u.pkid }));
                None
            }
            Packet::PingReq => {
                self.write(&Packet::PingResp);
                None
            }
            // The emulator never publishes, so a PUBACK answers nothing; ignore it.
            Packet::PubAck(_) => None,
            Packet::Disconnect => Some(End::Disconnect),
            other => Some(End::Violation(format!("unexpected {}", kind(&other)))),
        }
    }

    fn connect(&mut self, connect: &Connect) -> Option<End> {
        match self.authenticate(connect) {
            Ok(session) => {
                self.shared.claim(self.serial, &session.id);
                self.keep_alive = match connect.keep_alive {
                    0 => None,
                    s => Some(Duration::from_millis(u64::from(s) * 1500)),
                };
                self.shared.update(|s| {
                    s.stats.connects_accepted += 1;
                    s.identity(&session.id).connects_accepted += 1;
                });
                tracing::info!(peer = %self.peer, connection = self.serial, identity = %session.id, "CONNECT accepted");
                self.session = Some(session);
                self.write(&Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::Success,
                    false,
                )));
                None
            }
            Err(reason) => {
                self.shared.update(|s| {
                    s.stats.connects_refused += 1;
                    *s.stats.refused_by_reason.entry(reason).or_default() += 1;
                    s.identity(&connect.client_id).connects_refused += 1;
                });
                tracing::warn!(peer = %self.peer, connection = self.serial, client_id = %connect.client_id, ?reason, "CONNECT refused");
                self.write(&Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::NotAuthorized,
                    false,
                )));
                Some(End::Refused(reason))
            }
        }
    }

    fn authenticate(&self, connect: &Connect) -> Result<Session, RefuseReason> {
        if self.shared.refuse.load(Ordering::SeqCst) {
            return Err(RefuseReason::RefuseLogins);
        }
        let client_id = connect.client_id.as_str();
        let (device, module) = match client_id.split_once('/') {
            Some((d, m)) => (d, Some(m)),
            None => (client_id, None),
        };
        if device.is_empty() || module.is_some_and(|m| m.is_empty() || m.contains('/')) {
            return Err(RefuseReason::BadClientId);
        }
        let identity = self
            .shared
            .identities
            .get(client_id)
            .ok_or(RefuseReason::UnknownIdentity)?;
        let login = connect.login.as_ref().ok_or(RefuseReason::NoCredentials)?;
        if !username_ok(&login.username, &self.shared.hostname, client_id) {
            return Err(RefuseReason::BadUserName);
        }
        let token = sas::SasToken::parse(&login.password).map_err(|e| RefuseReason::of(&e))?;
        token
            .verify(
                &self.shared.hostname,
                device,
                module,
                &identity.key,
                sas::unix_now(),
            )
            .map_err(|e| RefuseReason::of(&e))?;
        Ok(Session {
            id: client_id.to_owned(),
            device: device.to_owned(),
            module: module.map(str::to_owned),
        })
    }

    fn publish(&mut self, p: Publish, device: &str, module: Option<&str>) -> Option<End> {
        let qos = match p.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => return Some(End::Violation("QoS 2 publish".into())),
        };
        let events = match topic::parse_events(&p.topic) {
            Ok(e) => e,
            Err(e) => return Some(End::Violation(e.to_string())),
        };
        if events.device != device || events.module.as_deref() != module {
            return Some(End::Violation(format!(
                "publish to `{}`, which is not this identity's",
                p.topic
            )));
        }
        if p.payload.len() > MAX_MESSAGE_BYTES {
            return Some(End::Violation(format!(
                "message of {} bytes over IoT Hub's {MAX_MESSAGE_BYTES}",
                p.payload.len()
            )));
        }
        if self.black_hole || !self.shared.ack.load(Ordering::SeqCst) {
            self.black_hole = true;
            self.swallowed += 1;
            return None;
        }
        if qos == 1 {
            self.write(&Packet::PubAck(PubAck::new(p.pkid)));
        }
        self.pending.push(Pending {
            topic: p.topic,
            payload: p.payload,
            properties: events.properties,
            dup: p.dup,
            qos,
        });
        None
    }

    /// A publish to a twin or method topic: answered at once (the twin changes under the
    /// emulator's lock before the answer is written).
    fn iothub(&mut self, p: Publish, id: &str) -> Option<End> {
        let topic = match twin::parse_iothub(&p.topic) {
            Ok(t) => t,
            Err(e) => return Some(End::Violation(e.to_string())),
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write(&Packet::PubAck(PubAck::new(p.pkid))),
            QoS::ExactlyOnce => return Some(End::Violation("QoS 2 publish".into())),
        }
        match topic {
            IotHubTopic::TwinGet { rid } => {
                let doc = self.shared.update(|s| {
                    s.stats.twin_gets += 1;
                    s.twins.entry(id.to_owned()).or_default().document()
                });
                self.respond(
                    &format!("$iothub/twin/res/200/?$rid={rid}"),
                    doc.to_string(),
                );
            }
            IotHubTopic::TwinPatchReported { rid } => {
                let patched = self.shared.update(|s| {
                    let r = s
                        .twins
                        .entry(id.to_owned())
                        .or_default()
                        .patch_reported(&p.payload);
                    match r {
                        Ok(_) => s.stats.reported_patches += 1,
                        Err(_) => s.stats.reported_patches_refused += 1,
                    }
                    r
                });
                let answer = self.shared.answer_reported.load(Ordering::SeqCst);
                match patched {
                    Ok(_) if !answer => {}
                    Ok(v) => self.respond(
                        &format!("$iothub/twin/res/204/?$rid={rid}&$version={v}"),
                        String::new(),
                    ),
                    Err(e) => self.respond(
                        &format!("$iothub/twin/res/400/?$rid={rid}"),
                        serde_json::json!({ "message": e.to_string() }).to_string(),
                    ),
                }
            }
            IotHubTopic::MethodResponse { status, rid } => {
                let payload = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                });
                if !self
                    .shared
                    .method_answered(id, &rid, MethodResponse { status, payload })
                {
                    tracing::warn!(
                        connection = self.serial,
                        identity = id,
                        rid,
                        "a method response that answers no invocation of this identity"
                    );
                }
            }
        }
        None
    }

    fn respond(&mut self, topic: &str, body: String) {
        self.write(&Packet::Publish(Publish::new(topic, QoS::AtMostOnce, body)));
    }

    fn subscribe(&mut self, s: &Subscribe, device: &str) {
        let mut subs = Subscriptions::default();
        for f in &s.filters {
            if topic::subscription_allowed(device, &f.path) {
                subs.desired |= f.path.starts_with("$iothub/twin/PATCH/properties/desired/");
                subs.methods |= f.path.starts_with("$iothub/methods/POST/");
            }
        }
        self.shared.subscribed(self.serial, subs);
        let return_codes = s
            .filters
            .iter()
            .map(|f| {
                if topic::subscription_allowed(device, &f.path) {
                    // Granted QoS never exceeds the request (MQTT 3.1.1 §3.9.3); IoT Hub's max is 1.
                    SubscribeReasonCode::Success(match f.qos {
                        QoS::AtMostOnce => QoS::AtMostOnce,
                        _ => QoS::AtLeastOnce,
                    })
                } else {
                    SubscribeReasonCode::Failure
                }
            })
            .collect();
        self.write(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes,
        }));
    }

    /// Records this burst's messages (one lock) and wakes the waiters.
    fn commit(&mut self) {
        if self.pending.is_empty() && self.swallowed == 0 {
            return;
        }
        let Some(session) = &self.session else { return };
        let pending = std::mem::take(&mut self.pending);
        let swallowed = std::mem::take(&mut self.swallowed);
        let serial = self.serial;
        self.shared.update(|s| {
            let n = pending.len();
            for p in pending {
                let seq = s.all.len() as u64;
                s.all.push(Received {
                    identity: session.id.clone(),
                    topic: p.topic,
                    payload: p.payload,
                    properties: p.properties,
                    dup: p.dup,
                    qos: p.qos,
                    connection: serial,
                    seq,
                });
            }
            *s.counts.entry(session.id.clone()).or_default() += n;
            s.stats.publishes += n as u64;
            s.stats.publishes_swallowed += swallowed;
            let i = s.identity(&session.id);
            i.publishes += n as u64;
            i.publishes_swallowed += swallowed;
        });
    }

    fn write(&mut self, packet: &Packet) {
        if let Err(e) = packet.write(&mut self.out, usize::MAX) {
            tracing::error!(error = %e, "could not encode an outgoing packet");
        }
    }

    /// Logs the end and counts it.
    fn finish(&self, end: End) {
        let id = self.session.as_ref().map(|s| s.id.clone());
        let counted = |s: &mut crate::State| match &end {
            End::Killed(Kill::Dropped) => {
                s.stats.connections_dropped += 1;
                if let Some(id) = &id {
                    s.identity(id).connections_dropped += 1;
                }
            }
            End::Killed(Kill::Replaced) => {
                s.stats.connections_replaced += 1;
                if let Some(id) = &id {
                    s.identity(id).connections_replaced += 1;
                }
            }
            End::Violation(_) => {
                s.stats.protocol_violations += 1;
                if let Some(id) = &id {
                    s.identity(id).protocol_violations += 1;
                }
            }
            End::KeepAlive | End::ConnectTimeout => s.stats.keep_alive_timeouts += 1,
            _ => {}
        };
        self.shared.update(counted);
        let identity = id.as_deref().unwrap_or("-");
        match &end {
            End::Violation(why) => {
                tracing::warn!(peer = %self.peer, connection = self.serial, identity, reason = %why, "closing: rule broken")
            }
            End::Io(e) => {
                tracing::info!(peer = %self.peer, connection = self.serial, identity, error = %e, "connection failed")
            }
            End::Refused(reason) => {
                tracing::info!(peer = %self.peer, connection = self.serial, ?reason, "closed after CONNACK 5")
            }
            End::Handshake(e) => {
                tracing::info!(peer = %self.peer, connection = self.serial, error = %e, "TLS handshake failed")
            }
            other => {
                tracing::info!(peer = %self.peer, connection = self.serial, identity, end = ?other, "connection closed")
            }
        }
    }
}

/// `{hostname}/{client id}/` then optional `?`, then `k=v&…` with a non-empty `api-version`.
fn username_ok(username: &str, hostname: &str, client_id: &str) -> bool {
    let Some((host, rest)) = username.split_once('/') else {
        return false;
    };
    if !host.eq_ignore_ascii_case(hostname) {
        return false;
    }
    let Some(rest) = rest
        .strip_prefix(client_id)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    let query = rest.strip_prefix('?').unwrap_or(rest);
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| k == "api-version" && !v.is_empty())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::username_ok;

    #[test]
    fn user_names() {
        let h = "hub.azure-devices.net";
        assert!(username_ok(
            "hub.azure-devices.net/d/m/?api-version=2021-04-12&DeviceClientType=x",
            h,
            "d/m"
        ));
        assert!(username_ok(
            "HUB.azure-devices.net/d/?api-version=1",
            h,
            "d"
        ));
        assert!(username_ok(
            "hub.azure-devices.net/d/m/api-version=1",
            h,
            "d/m"
        ));
        assert!(!username_ok(
            "hub.azure-devices.net/d/m/?api-version=",
            h,
            "d/m"
        ));
        assert!(!username_ok("hub.azure-devices.net/d/m/?x=1", h, "d/m"));
        assert!(!username_ok("other.net/d/m/?api-version=1", h, "d/m"));
        assert!(!username_ok(
            "hub.azure-devices.net/d/n/?api-version=1",
            h,
            "d/m"
        ));
        assert!(!username_ok(
            "hub.azure-devices.net/d/m?api-version=1",
            h,
            "d/m"
        ));
        assert!(!username_ok("", h, "d/m"));
    }
}
