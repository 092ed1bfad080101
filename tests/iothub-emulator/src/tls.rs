//! The emulator's own throw-away CA and server certificate.
//!
//! Guarantees:
//! - Every [`TlsMaterial::generate`] makes a fresh ECDSA P-256 CA and a server certificate it
//!   signs, with SANs `localhost`, `127.0.0.1`, `::1` and the configured IoT Hub host name.
//! - `ca.pem` (the CA certificate only) is written into the TLS directory, created if missing;
//!   no private key is ever written to disk.
//! - The server offers TLS 1.2 and 1.3 (ring provider) and the chain server + CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::EmulatorError;

/// The CA written to disk and the acceptor serving with the server certificate.
pub(crate) struct TlsMaterial {
    pub(crate) ca_pem_path: PathBuf,
    pub(crate) acceptor: TlsAcceptor,
}

impl TlsMaterial {
    /// Generates the CA and server certificate for `hostname`, writes `dir/ca.pem`.
    pub(crate) fn generate(dir: &Path, hostname: &str) -> Result<TlsMaterial, EmulatorError> {
        let cert_err = |e: rcgen::Error| EmulatorError::Certificate(e.to_string());

        let ca_key = KeyPair::generate().map_err(cert_err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        ca_params.distinguished_name.push(
            DnType::CommonName,
            "iothub-emulator test CA (not Azure IoT Hub)",
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;

        let server_key = KeyPair::generate().map_err(cert_err)?;
        let mut sans = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if !sans.iter().any(|s| s.eq_ignore_ascii_case(hostname)) {
            sans.push(hostname.to_owned());
        }
        let mut server_params = CertificateParams::new(sans).map_err(cert_err)?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, hostname);
        server_params.is_ca = IsCa::NoCa;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(cert_err)?;

        std::fs::create_dir_all(dir).map_err(|e| EmulatorError::Io {
            context: format!("creating {}", dir.display()),
            source: e,
        })?;
        let ca_pem_path = dir.join("ca.pem");
        std::fs::write(&ca_pem_path, ca_cert.pem()).map_err(|e| EmulatorError::Io {
            context: format!("writing {}", ca_pem_path.display()),
            source: e,
        })?;

        let chain: Vec<CertificateDer<'static>> =
            vec![server_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| EmulatorError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| EmulatorError::Tls(e.to_string()))?;
        Ok(TlsMaterial {
            ca_pem_path,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}
