//! The hub's CA and server certificate, kept in the Secret `D-hub-tls`.
//!
//! - The CA ("edgehub CA (NS/D)", 10 years, ECDSA P-256) is made once; modules trust it through
//!   the ConfigMap `D-trust-bundle`. It is replaced only when its key is gone from the Secret.
//! - The server certificate covers the hub Service's DNS names and is re-issued (same CA) when
//!   those names change or when it expires within [`RENEW_BEFORE_SECS`].
//! - What the certificate was issued for is recorded in the Secret's annotations
//!   ([`ANNOTATION_NAMES`], [`ANNOTATION_NOT_AFTER`]), so the decision needs no X.509 parser and
//!   a second reconcile re-issues nothing.

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// How long the CA is valid, in days.
pub const CA_VALIDITY_DAYS: u64 = 3653;
/// How long a server certificate is valid, in days.
pub const SERVER_VALIDITY_DAYS: u64 = 365;
/// A server certificate expiring within this many seconds is re-issued (30 days).
pub const RENEW_BEFORE_SECS: u64 = 30 * DAY;
/// Annotation: the server certificate's names, comma-separated.
pub const ANNOTATION_NAMES: &str = "edgehub.io/tls-names";
/// Annotation: the server certificate's notAfter, in Unix seconds.
pub const ANNOTATION_NOT_AFTER: &str = "edgehub.io/tls-not-after";

const DAY: u64 = 86_400;

/// Midnight UTC of the day `unix_secs` falls in, as rcgen wants it (a macro: that type belongs
/// to the `time` crate, which this crate does not name).
macro_rules! date {
    ($unix_secs:expr) => {{
        let (y, m, d) = civil_from_days($unix_secs / DAY);
        rcgen::date_time_ymd(y, m, d)
    }};
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused (key generation, signing, a name that is no DNS name).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system's random source failed.
    #[error("random source failed")]
    Random,
}

/// The hub's CA and server certificate (PEM), and what the latter was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The CA certificate (for modules).
    pub ca_crt: String,
    /// The CA key (stays in the Secret, never mounted).
    pub ca_key: String,
    /// The server certificate.
    pub tls_crt: String,
    /// Its key.
    pub tls_key: String,
    /// The names it was issued for.
    pub names: Vec<String>,
    /// Its notAfter (Unix seconds, midnight UTC).
    pub not_after: u64,
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsOutcome {
    /// Kept as it was.
    Unchanged,
    /// A new server certificate from the existing CA.
    Reissued,
    /// A new CA and server certificate.
    Created,
}

impl TlsMaterial {
    /// Reads the material back from a Secret's data and annotations. `None` when the CA is
    /// not there (nothing to keep).
    pub fn from_secret(
        data: &BTreeMap<String, Vec<u8>>,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Self> {
        let text = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.clone()).ok())
                .unwrap_or_default()
        };
        let ca_crt = text("ca.crt");
        let ca_key = text("ca.key");
        if ca_crt.is_empty() || ca_key.is_empty() {
            return None;
        }
        Some(Self {
            ca_crt,
            ca_key,
            tls_crt: text("tls.crt"),
            tls_key: text("tls.key"),
            names: annotations
                .get(ANNOTATION_NAMES)
                .map(|n| {
                    n.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            not_after: annotations
                .get(ANNOTATION_NOT_AFTER)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        })
    }

    /// The Secret's annotations recording what the server certificate was issued for.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ANNOTATION_NAMES.to_owned(), self.names.join(",")),
            (ANNOTATION_NOT_AFTER.to_owned(), self.not_after.to_string()),
        ])
    }

    /// Placeholders for `render` (nothing is generated offline).
    pub fn placeholders(names: &[String]) -> Self {
        let p = |k: &str| format!("<generated: {k}>");
        Self {
            ca_crt: p("ca.crt"),
            ca_key: p("ca.key"),
            tls_crt: p("tls.crt"),
            tls_key: p("tls.key"),
            names: names.to_vec(),
            not_after: 0,
        }
    }
}

/// Keeps, re-issues or creates the material for `names` (see the module docs). `ca_name` is
/// the CA's common name; `now_secs` the clock.
pub fn ensure(
    existing: Option<TlsMaterial>,
    ca_name: &str,
    names: &[String],
    now_secs: u64,
) -> Result<(TlsMaterial, TlsOutcome), TlsError> {
    if let Some(old) = existing {
        let server_ok = !old.tls_crt.is_empty()
            && !old.tls_key.is_empty()
            && old.names == names
            && old.not_after >= now_secs + RENEW_BEFORE_SECS;
        if server_ok {
            return Ok((old, TlsOutcome::Unchanged));
        }
        if let Ok(key) = KeyPair::from_pem(&old.ca_key) {
            let ca = ca_params(ca_name, 0).self_signed(&key)?;
            let (tls_crt, tls_key, not_after) = issue_server(&ca, &key, names, now_secs)?;
            return Ok((
                TlsMaterial {
                    ca_crt: old.ca_crt,
                    ca_key: old.ca_key,
                    tls_crt,
                    tls_key,
                    names: names.to_vec(),
                    not_after,
                },
                TlsOutcome::Reissued,
            ));
        }
        tracing::warn!("the CA key in the hub's TLS Secret does not parse: making a new CA");
    }
    let key = KeyPair::generate()?;
    let mut params = ca_params(ca_name, now_secs);
    params.serial_number = Some(random_serial()?);
    let ca = params.self_signed(&key)?;
    let (tls_crt, tls_key, not_after) = issue_server(&ca, &key, names, now_secs)?;
    Ok((
        TlsMaterial {
            ca_crt: ca.pem(),
            ca_key: key.serialize_pem(),
            tls_crt,
            tls_key,
            names: names.to_vec(),
            not_after,
        },
        TlsOutcome::Created,
    ))
}

/// The CA's parameters. Re-signing with the same name and key yields an issuer whose name and
/// key identifier match the stored `ca.crt`, so certificates it signs chain to it.
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

fn issue_server(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    names: &[String],
    now_secs: u64,
) -> Result<(String, String, u64), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let cn = names.first().map_or("edgehub", String::as_str);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("edgehub ({cn})"));
    params.subject_alt_names = names
        .iter()
        .map(|n| rcgen::Ia5String::try_from(n.as_str()).map(SanType::DnsName))
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
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), not_after - not_after % DAY))
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TlsError::Random)?;
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
    use super::*;

    const NOW: u64 = 1_780_000_000;

    fn names() -> Vec<String> {
        vec!["d-hub".into(), "d-hub.ns".into()]
    }

    /// Verifies the server certificate against the CA as a client (webpki) would, for every
    /// name, at `now_secs`.
    fn verify(m: &TlsMaterial, now_secs: u64) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let ca = CertificateDer::from_pem_slice(m.ca_crt.as_bytes()).map_err(|e| e.to_string())?;
        let leaf =
            CertificateDer::from_pem_slice(m.tls_crt.as_bytes()).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_secs));
        for name in &m.names {
            let server_name = ServerName::try_from(name.clone()).map_err(|e| e.to_string())?;
            verifier
                .verify_server_cert(&leaf, &[], &server_name, &[], at)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

    #[test]
    fn created_and_reissued_certificates_chain_to_the_one_ca_for_every_name() {
        let (first, _) = ensure(None, "edgehub CA (ns/d)", &names(), NOW).expect("create");
        assert_eq!(verify(&first, NOW), Ok(()));
        let late = first.not_after - RENEW_BEFORE_SECS + 1;
        let (renewed, o) =
            ensure(Some(first.clone()), "edgehub CA (ns/d)", &names(), late).expect("renew");
        assert_eq!(o, TlsOutcome::Reissued);
        assert_eq!(
            verify(&renewed, late),
            Ok(()),
            "a client holding the old ca.crt accepts it"
        );
        assert!(
            verify(&first, first.not_after + DAY).is_err(),
            "the check can fail: expired"
        );
    }

    #[test]
    fn made_once_kept_then_reissued_near_expiry_or_for_new_names_with_the_same_ca() {
        let (first, o) = ensure(None, "edgehub CA (ns/d)", &names(), NOW).expect("create");
        assert_eq!(o, TlsOutcome::Created);
        assert!(first.ca_crt.contains("BEGIN CERTIFICATE"));
        assert!(first.tls_key.contains("PRIVATE KEY"));
        assert_eq!(
            first.not_after,
            (NOW + SERVER_VALIDITY_DAYS * DAY) / DAY * DAY
        );

        let (same, o) = ensure(
            Some(first.clone()),
            "edgehub CA (ns/d)",
            &names(),
            NOW + DAY,
        )
        .expect("keep");
        assert_eq!(o, TlsOutcome::Unchanged);
        assert_eq!(same, first);

        let late = first.not_after - RENEW_BEFORE_SECS + 1;
        let (renewed, o) =
            ensure(Some(first.clone()), "edgehub CA (ns/d)", &names(), late).expect("renew");
        assert_eq!(o, TlsOutcome::Reissued);
        assert_eq!(renewed.ca_crt, first.ca_crt);
        assert_ne!(renewed.tls_crt, first.tls_crt);
        assert!(renewed.not_after > first.not_after);

        let mut more = names();
        more.push("d-hub.ns.svc".into());
        let (renamed, o) =
            ensure(Some(first.clone()), "edgehub CA (ns/d)", &more, NOW).expect("rename");
        assert_eq!(o, TlsOutcome::Reissued);
        assert_eq!(renamed.names, more);
        assert_eq!(renamed.ca_key, first.ca_key);
    }

    #[test]
    fn the_secret_round_trips_through_data_and_annotations() {
        let (m, _) = ensure(None, "ca", &names(), NOW).expect("create");
        let data: BTreeMap<String, Vec<u8>> = [
            ("ca.crt", &m.ca_crt),
            ("ca.key", &m.ca_key),
            ("tls.crt", &m.tls_crt),
            ("tls.key", &m.tls_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
        .collect();
        assert_eq!(TlsMaterial::from_secret(&data, &m.annotations()), Some(m));
        assert_eq!(
            TlsMaterial::from_secret(&BTreeMap::new(), &BTreeMap::new()),
            None
        );
    }
}
