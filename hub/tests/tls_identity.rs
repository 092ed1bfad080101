//! The hub's CA and server certificate as a client sees them, and module identities across
//! restarts.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hub::identity::{Identities, Identity};
use hub::settings::RawSettings;
use hub::tls::{self, Outcome, TlsFiles};
use router::{DeviceId, ModuleId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn names(extra: &[&str]) -> Vec<String> {
    ["localhost", "127.0.0.1", "::1"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn trusting(ca_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("ca.pem") {
        roots.add(cert.expect("cert")).expect("root");
    }
    client_config(roots)
}

/// Runs a TLS handshake between `server` and a client for `name` over an in-memory pipe, then
/// echoes one message. Returns the client's error, if any.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(), String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let mut tls = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let result = async {
        let mut tls = connector
            .connect(server_name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"hello");
        Ok(())
    }
    .await;
    if result.is_err() {
        server_task.abort();
    } else {
        server_task
            .await
            .expect("server task")
            .expect("server side");
    }
    result
}

#[tokio::test]
async fn a_client_trusting_only_ca_pem_completes_a_handshake_for_localhost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = RawSettings {
        data_dir: Some(dir.path().to_path_buf()),
        ..RawSettings::default()
    }
    .validate(Some("box1".into()))
    .expect("settings");
    let server = tls::server_config(&settings).expect("server config");
    let client = trusting(&tls::ca_path(dir.path()));
    for name in ["localhost", "127.0.0.1", "box1"] {
        handshake(Arc::clone(&server), Arc::clone(&client), name)
            .await
            .unwrap_or_else(|e| panic!("handshake for {name}: {e}"));
    }
}

#[tokio::test]
async fn a_client_without_the_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, _) =
        tls::ensure_at(dir.path(), "dev", &names(&[]), SystemTime::now()).expect("made");
    let other = tempfile::tempdir().expect("tempdir");
    let (other_files, _) =
        tls::ensure_at(other.path(), "dev", &names(&[]), SystemTime::now()).expect("made");
    let server = files.server_config().expect("config");
    let err = handshake(
        Arc::clone(&server),
        trusting(&other_files.ca_cert),
        "localhost",
    )
    .await
    .expect_err("another CA must not be trusted");
    assert!(err.contains("certificate"), "{err}");
    let empty = client_config(rustls::RootCertStore::empty());
    handshake(server, empty, "localhost")
        .await
        .expect_err("no roots, no trust");
}

#[tokio::test]
async fn a_name_not_in_the_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, _) =
        tls::ensure_at(dir.path(), "dev", &names(&[]), SystemTime::now()).expect("made");
    handshake(
        files.server_config().expect("config"),
        trusting(&files.ca_cert),
        "elsewhere.example",
    )
    .await
    .expect_err("wrong name");
}

#[test]
fn a_restart_reuses_everything_when_nothing_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let (files, first) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("made");
    assert_eq!(first, Outcome::Created);
    let ca = std::fs::read(&files.ca_cert).expect("ca");
    let server = std::fs::read(&files.server_cert).expect("server");
    let (_, second) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("reused");
    assert_eq!(second, Outcome::Reused);
    assert_eq!(std::fs::read(&files.ca_cert).expect("ca"), ca);
    assert_eq!(std::fs::read(&files.server_cert).expect("server"), server);
}

#[tokio::test]
async fn a_new_name_reissues_the_server_certificate_under_the_same_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let (files, _) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("made");
    let ca = std::fs::read(&files.ca_cert).expect("ca");
    let client = trusting(&files.ca_cert);
    let server = std::fs::read(&files.server_cert).expect("server");
    let (_, outcome) = tls::ensure_at(dir.path(), "other-device-id", &names(&["gw.example"]), now)
        .expect("reissued");
    assert_eq!(outcome, Outcome::ServerIssued);
    assert_eq!(std::fs::read(&files.ca_cert).expect("ca"), ca, "CA kept");
    assert_ne!(std::fs::read(&files.server_cert).expect("server"), server);
    handshake(files.server_config().expect("config"), client, "gw.example")
        .await
        .expect("the old ca.pem trusts the new server certificate");
}

#[test]
fn a_server_certificate_near_expiry_is_reissued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("made");
    let (_, in_300_days) = tls::ensure_at(
        dir.path(),
        "dev",
        &names(&[]),
        now + Duration::from_secs(300 * 86_400),
    )
    .expect("checked");
    assert_eq!(in_300_days, Outcome::Reused);
    let (_, in_340_days) = tls::ensure_at(
        dir.path(),
        "dev",
        &names(&[]),
        now + Duration::from_secs(340 * 86_400),
    )
    .expect("checked");
    assert_eq!(in_340_days, Outcome::ServerIssued);
}

#[test]
fn a_lost_state_file_reissues_the_server_certificate_under_the_same_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let (files, _) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("made");
    let ca = std::fs::read(&files.ca_cert).expect("ca");
    std::fs::remove_file(&files.state).expect("rm state");
    let (_, outcome) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("reissued");
    assert_eq!(outcome, Outcome::ServerIssued);
    assert_eq!(std::fs::read(&files.ca_cert).expect("ca"), ca);
}

#[test]
fn a_lost_ca_key_matters_only_when_the_server_certificate_must_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let (files, _) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("made");
    std::fs::remove_file(&files.ca_key).expect("rm key");
    let (_, outcome) = tls::ensure_at(dir.path(), "dev", &names(&[]), now).expect("reuse");
    assert_eq!(
        outcome,
        Outcome::Reused,
        "no key needed while nothing changes"
    );
    let err =
        tls::ensure_at(dir.path(), "dev", &names(&["new.example"]), now).expect_err("cannot sign");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    assert_eq!(TlsFiles::new(dir.path()).ca_key, files.ca_key);
}

#[test]
fn module_keys_survive_a_restart_and_new_modules_get_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = DeviceId::new("edge-device");
    let sender = Identity::new(device.clone(), ModuleId::new("sender"));
    let first = Identities::load_or_create(dir.path(), &device, &[ModuleId::new("sender")])
        .expect("created");
    let key = first.key(&sender).expect("key").to_vec();
    drop(first);
    let second = Identities::load_or_create(
        dir.path(),
        &device,
        &[ModuleId::new("receiver"), ModuleId::new("sender")],
    )
    .expect("reloaded");
    assert_eq!(second.key(&sender), Some(key.clone()));
    let receiver = Identity::new(device, ModuleId::new("receiver"));
    assert_ne!(second.key(&receiver), Some(key));
}
