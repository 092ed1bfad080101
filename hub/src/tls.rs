//! The hub's own certificate authority and server certificate, and the rustls server config.
//!
//! On first start [`ensure`] makes a CA ("edgehub CA (<device id>)", 10 years) and a server
//! certificate signed by it for every name in [`Settings::certificate_names`], and keeps them in
//! `{data_dir}/tls/`:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.pem` | the CA certificate: hand it to SDKs ([`ca_path`]) | 0644 |
//! | `ca-key.pem` | the CA key, to re-issue the server certificate | 0600 |
//! | `server.pem` | the server certificate | 0644 |
//! | `server-key.pem` | its key | 0600 |
//! | `ca.json` | the CA's name, needed to sign with it again | 0644 |
//! | `state.json` | what the server certificate was issued for: names, expiry, CA digest | 0644 |
//!
//! Guarantees:
//! - The CA is made once and never replaced by this code, so SDKs configured with `ca.pem`
//!   keep working across restarts.
//! - The server certificate is re-issued (same CA) when the set of names changes, when it
//!   expires within [`RENEW_BEFORE_SECS`], when `ca.pem` changed, or when `state.json` is
//!   missing or unreadable. `state.json` is removed before the key and certificate are
//!   replaced and written last, so a crash in between re-issues on the next start.
//! - A freshly issued server certificate is verified against `ca.pem` (webpki, as clients do)
//!   before it is used.
//! - Every file is replaced atomically (temporary file, fdatasync, rename, directory fsync).
//! - Keys are ECDSA P-256; rustls uses the ring provider; TLS 1.2 and 1.3 are offered
//!   (edgeHub's default `SslProtocols`).
//!
//! Not done: renewing the CA itself before its 10 years run out.
//!
//! ## Given certificate files (`--tls-cert`, `--tls-key`, `--tls-ca`)
//!
//! Under Kubernetes the controller makes the CA and the server certificate and mounts them
//! from a Secret. Then none of the above is made: [`GivenCert`] reads the three files, checks
//! them (the key matches the certificate; the certificate chains to the CA and is valid now
//! for the gateway host name, as a module checks it) and presents `--tls-cert`'s chain as
//! given. `ca-path` prints `--tls-ca`. The heads ask [`ServerCert`] for the certificate at
//! every handshake, so [`GivenCert::reload`] (run when the files' directories change, see
//! `crate::reload::tls`) swaps it for new connections without a restart; connections already
//! up keep theirs. Files that fail a check are refused and the previous certificate stays in
//! use (at startup they stop the hub).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomically;
use crate::settings::{GivenTls, Settings};

/// The directory under the data directory that holds certificates and keys.
pub const TLS_DIR: &str = "tls";
pub use pki::{CA_VALIDITY_DAYS, RENEW_BEFORE_SECS, SERVER_VALIDITY_DAYS};

/// Why the TLS material could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The server certificate must be re-issued but the CA key is gone.
    #[error(
        "the server certificate must be re-issued but the CA key {path} is missing: restore it, \
         or remove the whole tls directory to make a new CA (clients must then trust the new ca.pem)"
    )]
    CaKeyMissing {
        /// The CA key file.
        path: PathBuf,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] pki::PkiError),
    /// rustls refused the configuration or a freshly issued certificate.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A given private key cannot be used, or does not belong to the given certificate.
    #[error("the key {} does not fit the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        #[source]
        source: Box<rustls::Error>,
    },
    /// A given certificate does not chain to the given CA, has expired, or does not name the
    /// host modules dial.
    #[error(
        "the certificate {} is not one modules would accept: it must chain to the CA {} and be \
         valid now for {name}",
        cert.display(),
        ca.display()
    )]
    Untrusted {
        /// The certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// The host name checked (the gateway host name).
        name: String,
        /// rustls' (webpki's) reason.
        #[source]
        source: Box<rustls::Error>,
    },
}

/// The paths of the TLS files of one data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls/` itself.
    pub dir: PathBuf,
    /// The CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The CA key (PEM, 0600).
    pub ca_key: PathBuf,
    /// The server certificate (PEM).
    pub server_cert: PathBuf,
    /// The server key (PEM, 0600).
    pub server_key: PathBuf,
    /// The CA's name (written once, with the CA).
    pub ca_info: PathBuf,
    /// What the server certificate was issued for.
    pub state: PathBuf,
}

impl TlsFiles {
    /// The files under `{data_dir}/tls/`.
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join(TLS_DIR);
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            ca_info: dir.join("ca.json"),
            state: dir.join("state.json"),
            dir,
        }
    }

    /// A rustls server config presenting the server certificate (and the CA after it), with
    /// the ring provider, TLS 1.2 and 1.3, and no client certificates.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut chain = read_certs(&self.server_cert)?;
        chain.extend(read_certs(&self.ca_cert)?);
        let key = PrivateKeyDer::from_pem_file(&self.server_key)
            .map_err(|e| pem_error(&self.server_key, e))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Arc::new(config))
    }
}

/// The CA certificate to hand to SDKs: `{data_dir}/tls/ca.pem`.
pub fn ca_path(data_dir: &Path) -> PathBuf {
    TlsFiles::new(data_dir).ca_cert
}

/// The CA certificate modules must trust for the hub `settings` describe: `--tls-ca` when
/// given, else the data directory's `tls/ca.pem`.
pub fn served_ca_path(settings: &Settings) -> PathBuf {
    match settings.given_tls() {
        Some(given) => given.ca.clone(),
        None => ca_path(settings.data_dir()),
    }
}

/// The certificate the heads present, asked for at every handshake, so it can be replaced
/// while the hub runs ([`GivenCert::reload`]).
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    fn new(first: Arc<rustls::sign::CertifiedKey>) -> ServerCert {
        ServerCert {
            current: RwLock::new(first),
        }
    }

    /// The certificate new connections get now.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn replace(&self, new: Arc<rustls::sign::CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// What [`GivenCert::reload`] did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The files hold what was last read: nothing to do.
    Unchanged,
    /// New connections get the new certificate.
    Applied,
    /// The new files were refused; the previous certificate stays in use.
    Refused(TlsError),
}

/// The certificate files given on the command line, checked and served (module docs).
#[derive(Debug)]
pub struct GivenCert {
    files: GivenTls,
    /// The host name the certificate must be valid for (the gateway host name).
    name: String,
    cert: Arc<ServerCert>,
    /// The bytes of the three files as last read, applied or refused.
    last_read: Mutex<Vec<u8>>,
}

impl GivenCert {
    /// Reads and checks the files; the certificate must be valid for `name` (the host name
    /// modules dial) at `now`.
    pub fn load(files: &GivenTls, name: &str, now: SystemTime) -> Result<GivenCert, TlsError> {
        let bytes = read_given(files)?;
        let key = check_given(files, name, now)?;
        tracing::info!(
            cert = %files.cert.display(),
            ca = %files.ca.display(),
            sha256 = %fingerprint(&key),
            "TLS: serving the given certificate"
        );
        Ok(GivenCert {
            files: files.clone(),
            name: name.to_owned(),
            cert: Arc::new(ServerCert::new(Arc::new(key))),
            last_read: Mutex::new(bytes),
        })
    }

    /// The files.
    pub fn files(&self) -> &GivenTls {
        &self.files
    }

    /// What the heads ask for the certificate.
    pub fn server_cert(&self) -> Arc<ServerCert> {
        Arc::clone(&self.cert)
    }

    /// A rustls server config (ring, TLS 1.2 and 1.3, no client certificates) that presents
    /// whatever certificate is current at each handshake.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.server_cert());
        Ok(Arc::new(config))
    }

    /// Reads the files again: if they changed and pass every check, new connections get the
    /// new certificate; if they fail one, the previous certificate stays and the reason is
    /// logged. Blocking (reads files).
    pub fn reload(&self, now: SystemTime) -> ReloadOutcome {
        let mut last = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match read_given(&self.files) {
            Ok(bytes) if bytes == *last => return ReloadOutcome::Unchanged,
            Ok(bytes) => {
                *last = bytes;
                check_given(&self.files, &self.name, now)
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(key) => {
                let sha256 = fingerprint(&key);
                self.cert.replace(Arc::new(key));
                tracing::info!(
                    cert = %self.files.cert.display(),
                    %sha256,
                    "TLS certificate reloaded: new connections get the new certificate"
                );
                ReloadOutcome::Applied
            }
            Err(error) => {
                tracing::warn!(
                    cert = %self.files.cert.display(),
                    error = %error_chain(&error),
                    "TLS certificate reload refused: the previous certificate stays in use"
                );
                ReloadOutcome::Refused(error)
            }
        }
    }
}

/// The three files' bytes, to tell whether anything changed.
fn read_given(files: &GivenTls) -> Result<Vec<u8>, TlsError> {
    let mut all = Vec::new();
    for path in [&files.cert, &files.key, &files.ca] {
        let bytes = std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.clone(),
            source,
        })?;
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend_from_slice(&bytes);
    }
    Ok(all)
}

/// Parses the given files and checks them as a module would: the key fits the certificate, and
/// the certificate (with the intermediates after it) chains to a CA in `--tls-ca` and is valid
/// at `now` for `name`.
fn check_given(
    files: &GivenTls,
    name: &str,
    now: SystemTime,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = read_certs(&files.cert)?;
    if chain.is_empty() {
        return Err(invalid(&files.cert, "no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let key =
        rustls::sign::CertifiedKey::from_der(chain, key_der, &provider()).map_err(|source| {
            TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source: Box::new(source),
            }
        })?;
    let cas = read_certs(&files.ca)?;
    if cas.is_empty() {
        return Err(invalid(&files.ca, "no certificate in the file"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| invalid(&files.ca, e))?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| invalid(&files.ca, e))?;
    let untrusted = |source| TlsError::Untrusted {
        cert: files.cert.clone(),
        ca: files.ca.clone(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|e| untrusted(rustls::Error::General(e.to_string())))?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let (leaf, intermediates) = key
        .cert
        .split_first()
        .ok_or_else(|| invalid(&files.cert, "no certificate in the file"))?;
    verifier
        .verify_server_cert(leaf, intermediates, &server_name, &[], at)
        .map_err(untrusted)?;
    Ok(key)
}

/// SHA-256 of the leaf certificate (hex), to tell certificates apart in the log.
fn fingerprint(key: &rustls::sign::CertifiedKey) -> String {
    key.cert.first().map_or_else(String::new, |leaf| {
        hex(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref())
    })
}

/// An error and its causes on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// What [`ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was reused.
    Reused,
    /// The CA existed; the server certificate was (re-)issued.
    ServerIssued,
    /// A new CA and server certificate were made.
    Created,
}

/// Makes or reuses the CA and server certificate `settings` call for (see the module docs).
pub fn ensure(settings: &Settings) -> Result<(TlsFiles, Outcome), TlsError> {
    ensure_at(
        settings.data_dir(),
        settings.device_id().as_str(),
        &settings.certificate_names(),
        SystemTime::now(),
    )
}

/// Makes or reuses the CA and server certificate, and returns the server config.
pub fn server_config(settings: &Settings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    ensure(settings)?.0.server_config()
}

/// [`ensure`] with explicit inputs and clock: `names` are host names or IP addresses.
pub fn ensure_at(
    data_dir: &Path,
    device_id: &str,
    names: &[String],
    now: SystemTime,
) -> Result<(TlsFiles, Outcome), TlsError> {
    let files = TlsFiles::new(data_dir);
    std::fs::create_dir_all(&files.dir).map_err(|source| TlsError::Io {
        path: files.dir.clone(),
        source,
    })?;
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let ca_exists = exists(&files.ca_cert)?;
    let (ca, outcome) = if ca_exists {
        (None, Outcome::ServerIssued)
    } else {
        let ca = create_ca(&files, device_id, now_secs)?;
        (Some(ca), Outcome::Created)
    };
    let ca_der = read_certs(&files.ca_cert)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&files.ca_cert, "no certificate in the file"))?;
    let ca_digest = hex(ring::digest::digest(&ring::digest::SHA256, &ca_der).as_ref());
    if ca.is_none() && !needs_server(&files, names, &ca_digest, now_secs)? {
        return Ok((files, Outcome::Reused));
    }
    let ca = match ca {
        Some(ca) => ca,
        None => load_ca(&files)?,
    };
    issue_server(&files, &ca, names, &ca_digest, now_secs)?;
    verify_server(&files, &ca_der, names, now)?;
    tracing::info!(dir = %files.dir.display(), ?names, ?outcome, "TLS server certificate issued");
    Ok((files, outcome))
}

/// What `ca.json` records about the CA.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CaInfo {
    /// The CA's common name, needed to sign with it again.
    common_name: String,
}

/// What `state.json` records about the current server certificate.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct IssuedState {
    /// SHA-256 of the CA certificate (DER, hex) the server certificate chains to.
    ca_sha256: String,
    /// The names the server certificate covers.
    server_names: Vec<String>,
    /// Its expiry, Unix seconds.
    server_not_after: u64,
}

fn create_ca(files: &TlsFiles, device_id: &str, now_secs: u64) -> Result<pki::Ca, TlsError> {
    let common_name = format!("edgehub CA ({device_id})");
    let ca = pki::Ca::generate(&common_name, now_secs)?;
    remove_if_exists(&files.state)?;
    let info = serde_json::to_vec_pretty(&CaInfo {
        common_name: common_name.clone(),
    })
    .map_err(|e| invalid(&files.ca_info, e))?;
    write(&files.ca_key, ca.key_pem().as_bytes(), 0o600)?;
    write(&files.ca_info, &info, 0o644)?;
    write(&files.ca_cert, ca.cert_pem().as_bytes(), 0o644)?;
    tracing::info!(path = %files.ca_cert.display(), "new CA created");
    Ok(ca)
}

/// Loads the CA key and rebuilds the issuer from the recorded common name: server
/// certificates name their issuer by that name and its key identifier, both of which match
/// `ca.pem` (the self-check in [`verify_server`] proves it).
fn load_ca(files: &TlsFiles) -> Result<pki::Ca, TlsError> {
    if !exists(&files.ca_key)? {
        return Err(TlsError::CaKeyMissing {
            path: files.ca_key.clone(),
        });
    }
    let key_pem = read_text(&files.ca_key)?;
    let info: CaInfo = serde_json::from_str(&read_text(&files.ca_info)?).map_err(|e| {
        invalid(
            &files.ca_info,
            format!(
                "{e}; it holds the CA's name, needed to re-issue the server certificate: \
                 restore it, or remove the tls directory to make a new CA"
            ),
        )
    })?;
    pki::Ca::from_key_pem(&info.common_name, &key_pem).map_err(|e| invalid(&files.ca_key, e))
}

fn needs_server(
    files: &TlsFiles,
    names: &[String],
    ca_digest: &str,
    now_secs: u64,
) -> Result<bool, TlsError> {
    if !exists(&files.server_cert)? || !exists(&files.server_key)? {
        return Ok(true);
    }
    let Some(state) = read_state(files)? else {
        return Ok(true);
    };
    Ok(state.ca_sha256 != ca_digest
        || state.server_names != names
        || state.server_not_after < now_secs + RENEW_BEFORE_SECS)
}

fn issue_server(
    files: &TlsFiles,
    ca: &pki::Ca,
    names: &[String],
    ca_digest: &str,
    now_secs: u64,
) -> Result<(), TlsError> {
    let issued = ca.issue_server(names, now_secs)?;
    remove_if_exists(&files.state)?;
    write(&files.server_key, issued.key_pem.as_bytes(), 0o600)?;
    write(&files.server_cert, issued.cert_pem.as_bytes(), 0o644)?;
    let state = IssuedState {
        ca_sha256: ca_digest.to_owned(),
        server_names: names.to_vec(),
        server_not_after: issued.not_after,
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| invalid(&files.state, e))?;
    write(&files.state, &json, 0o644)
}

/// Checks the new server certificate as a client would: it chains to `ca.pem` and is valid
/// for every name.
fn verify_server(
    files: &TlsFiles,
    ca_der: &CertificateDer<'static>,
    names: &[String],
    now: SystemTime,
) -> Result<(), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| invalid(&files.ca_cert, e))?;
    let leaf = read_certs(&files.server_cert)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&files.server_cert, "no certificate in the file"))?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    for name in names {
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| invalid(&files.server_cert, e))?;
        verifier
            .verify_server_cert(&leaf, &[], &server_name, &[], at)
            .map_err(|e| invalid(&files.server_cert, format!("not valid for {name}: {e}")))?;
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_state(files: &TlsFiles) -> Result<Option<IssuedState>, TlsError> {
    if !exists(&files.state)? {
        return Ok(None);
    }
    let text = read_text(&files.state)?;
    Ok(serde_json::from_str(&text).ok())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => invalid(path, format!("not valid PEM: {other:?}")),
    }
}

fn invalid(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    write_atomically(path, bytes, mode).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn remove_if_exists(path: &Path) -> Result<(), TlsError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TlsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_key_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (files, outcome) =
            ensure_at(dir.path(), "dev", &["localhost".into()], SystemTime::now()).expect("made");
        assert_eq!(outcome, Outcome::Created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&files.ca_key, &files.server_key] {
                let mode = std::fs::metadata(key).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
    }
}
