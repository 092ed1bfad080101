//! edgehub's certificate authority: one CA (ECDSA P-256, 10 years) and server certificates it
//! signs for a set of names (1 year, re-issued 30 days before expiry by the callers).
//!
//! Two callers, one way of issuing: the hub makes its own CA in its data directory
//! (`hub/src/tls.rs`) when it is not given certificate files, and the Kubernetes controller makes
//! the hub's CA and server certificate for the hub Service's names and keeps them in a Secret
//! (`k8s/src/tls.rs`). Where the PEM text goes (files, a Secret) is theirs; what is in it is
//! decided here.
//!
//! A CA is stored as its certificate and key. To sign again later, [`Ca::from_key_pem`] rebuilds
//! the issuer from the key and the CA's common name: the same name and key give the same issuer
//! name and key identifier, so new server certificates chain to the stored CA certificate.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// Seconds in a day.
pub const DAY: u64 = 86_400;
/// How long a CA is valid, in days (10 years).
pub const CA_VALIDITY_DAYS: u64 = 3653;
/// How long a server certificate is valid, in days.
pub const SERVER_VALIDITY_DAYS: u64 = 365;
/// A server certificate expiring within this many seconds should be re-issued (30 days).
pub const RENEW_BEFORE_SECS: u64 = 30 * DAY;

/// Midnight UTC of the day `unix_secs` falls in, as rcgen wants it (a macro: that type belongs
/// to the `time` crate, which this crate does not name).
macro_rules! date {
    ($unix_secs:expr) => {{
        let (y, m, d) = civil_from_days($unix_secs / DAY);
        rcgen::date_time_ymd(y, m, d)
    }};
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused: key generation, signing, or a name that is neither a DNS name nor an IP
    /// address.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored CA key does not parse.
    #[error("the CA key does not parse: {0}")]
    BadKey(#[source] rcgen::Error),
    /// The system's random source failed (serial numbers).
    #[error("the system's random source failed")]
    Random,
}

/// A certificate authority that can sign server certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A server certificate and its key, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// When it expires, in Unix seconds (midnight UTC, as the certificate holds it).
    pub not_after: u64,
}

impl Ca {
    /// A new CA named `common_name`, valid from a day before `now_secs` for
    /// [`CA_VALIDITY_DAYS`], with a fresh key and a random serial number.
    pub fn generate(common_name: &str, now_secs: u64) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(common_name, now_secs);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// The CA named `common_name` whose key is `key_pem`, to sign with: certificates it signs
    /// chain to the CA certificate stored when it was generated.
    pub fn from_key_pem(common_name: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::BadKey)?;
        let cert = ca_params(common_name, 0).self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// The CA certificate (PEM). For a CA from [`Ca::generate`], the one to store and hand to
    /// clients; for one from [`Ca::from_key_pem`], an equivalent (same name and key), not the
    /// stored file.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA's private key (PEM): keep it private (0600, or a Secret never mounted in a pod).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses; the first also names the
    /// subject), valid from a day before `now_secs` for [`SERVER_VALIDITY_DAYS`], for TLS server
    /// authentication only, with a fresh key.
    pub fn issue_server(&self, names: &[String], now_secs: u64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let common_name = names.first().map_or("localhost", String::as_str);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("edgehub ({common_name})"));
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => rcgen::Ia5String::try_from(n.as_str()).map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = date!(now_secs.saturating_sub(DAY));
        let not_after = now_secs + SERVER_VALIDITY_DAYS * DAY;
        params.not_after = date!(not_after);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            // The certificate holds midnight of that day; report the same instant.
            not_after: not_after - not_after % DAY,
        })
    }
}

/// The CA's parameters. Re-signing with the same name and key yields an issuer whose name and
/// key identifier match the stored CA certificate.
fn ca_params(common_name: &str, now_secs: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date!(now_secs.saturating_sub(DAY));
    params.not_after = date!(now_secs + CA_VALIDITY_DAYS * DAY);
    params
}

/// 16 random bytes, positive and non-zero as RFC 5280 asks.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (i32, u8, u8) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    const NOW: u64 = 1_780_000_000;

    /// Verifies `leaf` against `ca` as a TLS client (webpki) would, for `name`, at `now_secs`.
    fn verify(ca: &str, leaf: &str, name: &str, now_secs: u64) -> Result<(), String> {
        let ca = CertificateDer::from_pem_slice(ca.as_bytes()).map_err(|e| e.to_string())?;
        let leaf = CertificateDer::from_pem_slice(leaf.as_bytes()).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_secs));
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&leaf, &[], &server_name, &[], at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_server_certificate_chains_to_its_ca_for_each_name_until_it_expires() {
        let ca = Ca::generate("edgehub CA (test)", NOW).expect("ca");
        let names = vec![
            "hub".to_owned(),
            "hub.ns.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let issued = ca.issue_server(&names, NOW).expect("issue");
        for name in &names {
            assert_eq!(verify(&ca.cert_pem(), &issued.cert_pem, name, NOW), Ok(()));
        }
        assert!(verify(&ca.cert_pem(), &issued.cert_pem, "other", NOW).is_err());
        assert_eq!(
            issued.not_after,
            (NOW + SERVER_VALIDITY_DAYS * DAY) / DAY * DAY
        );
        assert!(verify(
            &ca.cert_pem(),
            &issued.cert_pem,
            "hub",
            issued.not_after + DAY
        )
        .is_err());
        let other = Ca::generate("edgehub CA (test)", NOW).expect("another ca");
        assert!(
            verify(&other.cert_pem(), &issued.cert_pem, "hub", NOW).is_err(),
            "another CA of the same name must not verify it"
        );
    }

    #[test]
    fn a_ca_rebuilt_from_its_key_signs_certificates_that_chain_to_the_stored_ca() {
        let ca = Ca::generate("edgehub CA (d)", NOW).expect("ca");
        let (stored_cert, stored_key) = (ca.cert_pem(), ca.key_pem());
        drop(ca);
        let later = NOW + 200 * DAY;
        let again = Ca::from_key_pem("edgehub CA (d)", &stored_key).expect("from key");
        let issued = again
            .issue_server(&["hub".to_owned()], later)
            .expect("issue");
        assert_eq!(verify(&stored_cert, &issued.cert_pem, "hub", later), Ok(()));
        assert!(matches!(
            Ca::from_key_pem("edgehub CA (d)", "not a key"),
            Err(PkiError::BadKey(_))
        ));
    }

    #[test]
    fn civil_dates_are_right_around_leap_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
