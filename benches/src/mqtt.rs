//! A minimal MQTT 3.1.1 client for the peers bench (`benches/peers.sh`).
//!
//! Only what an ordered QoS 1 load generator needs: CONNECT (clean or
//! persistent session, optional username/password), SUBSCRIBE, PUBLISH,
//! PUBACK, DISCONNECT, over plain TCP or TLS, with `TCP_NODELAY`. Packets are
//! encoded and decoded by rumqttc's `mqttbytes` codec; everything else (the
//! window, resends, acknowledgements) is the caller's, so nothing is hidden
//! in an event loop. Also: IoT Hub SAS tokens for edgehub's module logins.

use crate::BenchResult;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet, Subscribe};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet accepted or sent.
pub const MAX_PACKET: usize = 1 << 20;

/// A byte stream: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TLS settings of a client: the CA to trust and the name to check.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl Tls {
    /// Trusts only the certificates in the PEM file `ca`; checks the server
    /// certificate against `server_name` (a DNS name or an IP address).
    pub fn from_ca(ca: &Path, server_name: &str) -> BenchResult<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("reading CA {}: {e}", ca.display()))?
        {
            roots.add(cert.map_err(|e| format!("CA {}: {e}", ca.display()))?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            server_name: ServerName::try_from(server_name.to_string())?,
        })
    }
}

/// Where to connect.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// TLS, or plain TCP if `None`.
    pub tls: Option<Tls>,
    /// Leave Nagle's algorithm on (the default is `TCP_NODELAY`).
    pub nagle: bool,
}

/// Who connects.
#[derive(Clone, Debug)]
pub struct Creds {
    /// MQTT client id.
    pub client_id: String,
    /// Username and password, if any.
    pub login: Option<(String, String)>,
}

/// One MQTT connection with its read and write buffers.
pub struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Maps a codec error to a bench error.
fn codec(e: CodecError) -> crate::BenchError {
    format!("MQTT codec: {e:?}").into()
}

impl Conn {
    /// Connects and waits for the CONNACK; returns the connection and the
    /// CONNACK's session-present flag. Fails on a refused CONNECT.
    pub async fn connect(
        ep: &Endpoint,
        creds: &Creds,
        clean_session: bool,
        keep_alive: u16,
        timeout: Duration,
    ) -> BenchResult<(Conn, bool)> {
        tokio::time::timeout(
            timeout,
            Self::connect_inner(ep, creds, clean_session, keep_alive),
        )
        .await
        .map_err(|_| {
            format!(
                "connecting to {} as {}: timed out",
                ep.addr, creds.client_id
            )
        })?
    }

    async fn connect_inner(
        ep: &Endpoint,
        creds: &Creds,
        clean_session: bool,
        keep_alive: u16,
    ) -> BenchResult<(Conn, bool)> {
        let tcp = TcpStream::connect(&ep.addr).await?;
        tcp.set_nodelay(!ep.nagle)?;
        let io: Box<dyn Io> = match &ep.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
                Box::new(connector.connect(tls.server_name.clone(), tcp).await?)
            }
        };
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
        };
        let mut connect = Connect::new(creds.client_id.clone());
        connect.keep_alive = keep_alive;
        connect.clean_session = clean_session;
        connect.login = creds
            .login
            .as_ref()
            .map(|(u, p)| Login::new(u.clone(), p.clone()));
        conn.queue(&Packet::Connect(connect))?;
        conn.flush().await?;
        match conn.read_packet().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                session_present,
            }) => Ok((conn, session_present)),
            Packet::ConnAck(ack) => Err(format!(
                "{} refused CONNECT of {}: {:?}",
                ep.addr, creds.client_id, ack.code
            )
            .into()),
            other => Err(format!("expected CONNACK, got {other:?}").into()),
        }
    }

    /// Encodes a packet into the write buffer (sent by [`Self::flush`]).
    pub fn queue(&mut self, packet: &Packet) -> BenchResult<()> {
        packet.write(&mut self.wbuf, MAX_PACKET).map_err(codec)?;
        Ok(())
    }

    /// Bytes waiting in the write buffer.
    pub fn pending_bytes(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes out the write buffer.
    pub async fn flush(&mut self) -> BenchResult<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next complete packet already in the read buffer, if any.
    pub fn try_packet(&mut self) -> BenchResult<Option<Packet>> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.rbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(codec(e)),
        }
    }

    /// Reads more bytes into the read buffer; fails at end of stream.
    /// Cancel-safe (usable in `select!`).
    pub async fn fill(&mut self) -> BenchResult<()> {
        self.rbuf.reserve(16 * 1024);
        let n = self.io.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err("connection closed by the broker".into());
        }
        Ok(())
    }

    /// Reads until one complete packet is available and returns it.
    pub async fn read_packet(&mut self) -> BenchResult<Packet> {
        loop {
            if let Some(p) = self.try_packet()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    /// Subscribes to `filters` at QoS 1 and waits for the SUBACK (acknowledging
    /// any PUBLISH that arrives first is left to the caller: such packets are
    /// returned).
    pub async fn subscribe(&mut self, filters: &[String], pkid: u16) -> BenchResult<Vec<Packet>> {
        let mut sub =
            Subscribe::new_many(filters.iter().map(|f| {
                rumqttc::mqttbytes::v4::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)
            }));
        sub.pkid = pkid;
        self.queue(&Packet::Subscribe(sub))?;
        self.flush().await?;
        let mut early = Vec::new();
        loop {
            match self.read_packet().await? {
                Packet::SubAck(ack) if ack.pkid == pkid => {
                    let failed = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure));
                    if failed {
                        return Err(format!("SUBSCRIBE {filters:?} refused").into());
                    }
                    return Ok(early);
                }
                other => early.push(other),
            }
        }
    }

    /// Sends DISCONNECT and closes the stream (errors ignored).
    pub async fn disconnect(mut self) {
        if self.queue(&Packet::Disconnect).is_ok() {
            let _ = self.flush().await;
        }
        let _ = self.io.shutdown().await;
    }
}

/// `quote(s, safe="")` as Python's urllib does it.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An IoT Hub SAS token for `resource` (e.g. `host/devices/d/modules/m`), signed
/// with the base64 SharedAccessKey `key_b64`, expiring at `expiry` (Unix seconds),
/// as the Azure IoT SDKs make it.
pub fn sas_token(resource: &str, key_b64: &str, expiry: u64) -> BenchResult<String> {
    let key = STANDARD.decode(key_b64.trim())?;
    let sr = quote(resource);
    let to_sign = format!("{sr}\n{expiry}");
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        to_sign.as_bytes(),
    );
    let sig = quote(&STANDARD.encode(tag.as_ref()));
    Ok(format!(
        "SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"
    ))
}

/// The fields of a module connection string
/// (`HostName=…;DeviceId=…;ModuleId=…;SharedAccessKey=…`).
#[derive(Debug, Clone, Default)]
pub struct ConnectionString {
    /// IoT Hub host name.
    pub host_name: String,
    /// Device id.
    pub device_id: String,
    /// Module id.
    pub module_id: String,
    /// Base64 key.
    pub shared_access_key: String,
}

impl ConnectionString {
    /// Parses a connection string; unknown fields are ignored.
    pub fn parse(s: &str) -> BenchResult<ConnectionString> {
        let mut cs = ConnectionString::default();
        for part in s.trim().split(';') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k {
                "HostName" => cs.host_name = v.to_string(),
                "DeviceId" => cs.device_id = v.to_string(),
                "ModuleId" => cs.module_id = v.to_string(),
                "SharedAccessKey" => cs.shared_access_key = v.to_string(),
                _ => {}
            }
        }
        if cs.host_name.is_empty() || cs.device_id.is_empty() || cs.module_id.is_empty() {
            return Err(format!("incomplete module connection string: {s}").into());
        }
        Ok(cs)
    }

    /// MQTT client id, username and SAS password valid for `ttl_secs`.
    pub fn creds(&self, ttl_secs: u64) -> BenchResult<Creds> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let resource = format!(
            "{}/devices/{}/modules/{}",
            self.host_name, self.device_id, self.module_id
        );
        Ok(Creds {
            client_id: format!("{}/{}", self.device_id, self.module_id),
            login: Some((
                format!(
                    "{}/{}/{}/?api-version=2019-10-01",
                    self.host_name, self.device_id, self.module_id
                ),
                sas_token(&resource, &self.shared_access_key, now + ttl_secs)?,
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_python() {
        assert_eq!(quote("h/devices/d"), "h%2Fdevices%2Fd");
        assert_eq!(quote("a+b=="), "a%2Bb%3D%3D");
    }

    #[test]
    fn token_has_the_sdk_shape() {
        let t = sas_token("h/devices/d/modules/m", "a2V5", 100).map_err(|e| e.to_string());
        assert!(
            matches!(&t, Ok(t) if t.starts_with("SharedAccessSignature sr=h%2Fdevices%2Fd%2Fmodules%2Fm&sig=") && t.ends_with("&se=100")),
            "{t:?}"
        );
    }
}
