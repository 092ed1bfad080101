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

pub use pki::{CA_VALIDITY_DAYS, RENEW_BEFORE_SECS, SERVER_VALIDITY_DAYS};
/// Annotation: the server certificate's names, comma-separated.
pub const ANNOTATION_NAMES: &str = "edgehub.io/tls-names";
/// Annotation: the server certificate's notAfter, in Unix seconds.
pub const ANNOTATION_NOT_AFTER: &str = "edgehub.io/tls-not-after";

/// Why certificates could not be made.
pub type TlsError = pki::PkiError;

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
        if let Ok(ca) = pki::Ca::from_key_pem(ca_name, &old.ca_key) {
            let issued = ca.issue_server(names, now_secs)?;
            return Ok((
                TlsMaterial {
                    ca_crt: old.ca_crt,
                    ca_key: old.ca_key,
                    tls_crt: issued.cert_pem,
                    tls_key: issued.key_pem,
                    names: names.to_vec(),
                    not_after: issued.not_after,
                },
                TlsOutcome::Reissued,
            ));
        }
        tracing::warn!("the CA key in the hub's TLS Secret does not parse: making a new CA");
    }
    let ca = pki::Ca::generate(ca_name, now_secs)?;
    let issued = ca.issue_server(names, now_secs)?;
    Ok((
        TlsMaterial {
            ca_crt: ca.cert_pem(),
            ca_key: ca.key_pem(),
            tls_crt: issued.cert_pem,
            tls_key: issued.key_pem,
            names: names.to_vec(),
            not_after: issued.not_after,
        },
        TlsOutcome::Created,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pki::DAY;

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
