//! `--tls-cert`, `--tls-key`, `--tls-ca`: the hub presents a certificate it is given (as the
//! Kubernetes controller mounts it from a Secret) instead of its own CA's, `ca-path` names the
//! given CA, the three go together, and a rotated certificate reaches new connections without
//! a restart while a bad one is refused and the previous one kept.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/certs.rs"]
mod certs;

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use certs::{Ca, SecretDir};
use rustls::pki_types::ServerName;

/// The binary with none of the `EDGEHUB_*` variables a developer may have set.
fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgehub"));
    c.env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EDGEHUB_") {
            c.env_remove(k);
        }
    }
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Given any one or two of the three, `run` and `ca-path` stop before doing anything, naming
/// the missing flags; by flag or by variable alike.
#[test]
fn the_three_tls_flags_go_together_and_the_error_names_the_missing_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    /// Subcommand, flags, variables, what the error must say.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 4] = [
        (
            "run",
            vec!["--tls-cert", "/x/tls.crt"],
            vec![],
            "--tls-cert is given, so --tls-key and --tls-ca must be too",
        ),
        (
            "run",
            vec!["--tls-cert", "/x/tls.crt", "--tls-ca", "/x/ca.crt"],
            vec![],
            "--tls-cert and --tls-ca is given, so --tls-key must be too",
        ),
        (
            "run",
            vec![],
            vec![("EDGEHUB_TLS_CA", "/x/ca.crt")],
            "--tls-ca is given, so --tls-cert and --tls-key must be too",
        ),
        (
            "ca-path",
            vec!["--tls-key", "/x/tls.key"],
            vec![],
            "--tls-key is given, so --tls-cert and --tls-ca must be too",
        ),
    ];
    for (sub, args, env, want) in cases {
        let listen: &[&str] = if sub == "run" {
            &[
                "--mqtt-addr",
                "127.0.0.1:0",
                "--amqp-addr",
                "127.0.0.1:0",
                "--methods-addr",
                "127.0.0.1:0",
            ]
        } else {
            &[]
        };
        let out = command()
            .arg(sub)
            .args(["--data-dir", s(&data)])
            .args(listen)
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run edgehub");
        assert!(!out.status.success(), "{sub} {args:?} {env:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{sub} {args:?} {env:?}:\n{err}");
        assert!(
            !data.join("tls").exists() && !data.join("store").exists(),
            "{sub} {args:?} made files before refusing: {err}"
        );
    }
}

/// `ca-path` with the files given prints the given CA (absolute) and makes no CA of its own.
#[test]
fn ca_path_prints_the_given_ca_and_makes_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("given CA");
    let secret = SecretDir::new(dir.path().join("tls"));
    secret.publish(&ca.issue(&["localhost"]).files(&ca));
    let data = dir.path().join("data");
    let out = command()
        .current_dir(dir.path())
        .args(["ca-path", "--data-dir", s(&data)])
        .args(["--tls-cert", "tls/tls.crt", "--tls-key", "tls/tls.key"])
        .args(["--tls-ca", "tls/ca.crt"])
        .output()
        .expect("run edgehub");
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        printed.trim(),
        s(&secret.ca()),
        "ca-path must print the given CA"
    );
    assert!(!data.join("tls").exists(), "ca-path made a CA of its own");
    // Without the flags it is the data directory's own, as before.
    let own = command()
        .args(["ca-path", "--data-dir", s(&data)])
        .output()
        .expect("run edgehub");
    assert!(own.status.success(), "{}", stderr(&own));
    assert!(String::from_utf8_lossy(&own.stdout)
        .trim()
        .ends_with("tls/ca.pem"));
}

/// Files a module could not accept stop `run` at once, naming the files and why: a key of
/// another certificate; a certificate of another CA; one that does not name the gateway host
/// modules dial; a key file with no key.
#[test]
fn run_refuses_files_a_module_could_not_accept_and_says_which_and_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("given CA");
    let other_ca = Ca::new("another CA");
    let good = ca.issue(&["localhost"]);
    /// What is wrong, the files, what the error must say.
    type Case<'a> = (&'a str, Vec<(&'static str, String)>, &'a [&'a str]);
    let cases: [Case; 4] = [
        (
            "key of another certificate",
            vec![
                ("tls.crt", good.cert_pem.clone()),
                ("tls.key", ca.issue(&["localhost"]).key_pem),
                ("ca.crt", ca.pem()),
            ],
            &["does not fit the certificate", "tls.key", "tls.crt"],
        ),
        (
            "another CA",
            other_ca.issue(&["localhost"]).files(&ca),
            &["is not one modules would accept", "ca.crt", "UnknownIssuer"],
        ),
        (
            "not for the gateway host name",
            ca.issue(&["elsewhere.example"]).files(&ca),
            &["valid now for localhost", "not valid for name"],
        ),
        (
            "no key",
            vec![
                ("tls.crt", good.cert_pem.clone()),
                ("tls.key", "not a key\n".to_owned()),
                ("ca.crt", ca.pem()),
            ],
            &["tls.key"],
        ),
    ];
    for (n, (what, files, wants)) in cases.into_iter().enumerate() {
        let secret = SecretDir::new(dir.path().join(format!("tls{n}")));
        secret.publish(&files);
        let out = command()
            .arg("run")
            .args(["--data-dir", s(&dir.path().join(format!("data{n}")))])
            .args([
                "--mqtt-addr",
                "127.0.0.1:0",
                "--amqp-addr",
                "127.0.0.1:0",
                "--methods-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--gateway-hostname",
                "localhost",
            ])
            .args([
                "--tls-cert",
                s(&secret.cert()),
                "--tls-key",
                s(&secret.key()),
            ])
            .args(["--tls-ca", s(&secret.ca())])
            .stdin(Stdio::null())
            .output()
            .expect("run edgehub");
        let err = stderr(&out);
        assert!(!out.status.success(), "{what}: the hub started:\n{err}");
        assert!(err.contains("cannot set up TLS"), "{what}:\n{err}");
        for want in wants {
            assert!(err.contains(want), "{what}: no {want:?} in:\n{err}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A running hub

type Log = Arc<(Mutex<String>, Condvar)>;

/// `edgehub run` on 127.0.0.1, ports chosen by the OS, read from its ready line.
struct Hub {
    child: Child,
    log: Log,
    mqtt: SocketAddr,
    amqp: SocketAddr,
}

impl Hub {
    fn start(data: &Path, secret: &SecretDir) -> Hub {
        let mut child = command()
            .arg("run")
            .args(["--data-dir", s(data)])
            .args([
                "--mqtt-addr",
                "127.0.0.1:0",
                "--amqp-addr",
                "127.0.0.1:0",
                "--methods-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--gateway-hostname",
                "localhost",
            ])
            .args([
                "--tls-cert",
                s(&secret.cert()),
                "--tls-key",
                s(&secret.key()),
            ])
            .args(["--tls-ca", s(&secret.ca()), "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgehub");
        let log: Log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let sink = Arc::clone(&log);
        let mut err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let (text, cv) = &*sink;
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                cv.notify_all();
            }
        });
        let mut hub = Hub {
            child,
            log,
            mqtt: SocketAddr::from(([127, 0, 0, 1], 0)),
            amqp: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let ready = hub.wait_log(Duration::from_secs(60), |l| {
            l.contains("edgehub ready") || l.contains("error: ")
        });
        let line = ready
            .lines()
            .find(|l| l.contains("edgehub ready"))
            .unwrap_or_else(|| panic!("the hub did not start:\n{ready}"))
            .to_owned();
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} address in {line:?}"))
        };
        hub.mqtt = field("mqtt");
        hub.amqp = field("amqp");
        assert!(
            line.contains(&format!("ca={}", secret.ca().display())),
            "the ready line must name the given CA: {line}"
        );
        hub
    }

    /// Waits (woken by every new piece of the log) until `ok` holds for the log, and returns
    /// it; `within` only bounds a failure.
    fn wait_log(&self, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let (text, cv) = &*self.log;
        let deadline = Instant::now() + within;
        let mut guard = text.lock().unwrap();
        while !ok(&guard) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("not seen within {within:?} in the hub's log:\n{guard}");
            }
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
        guard.clone()
    }

    fn log(&self) -> String {
        self.log.0.lock().unwrap().clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS handshake with `addr` trusting only `ca_pem`, for `localhost`: the certificate the
/// server presented (DER), or the client's error.
fn presented_cert(addr: SocketAddr, ca_pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate presented")?;
    Ok(leaf.to_vec())
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hub presents the given certificate on MQTT and AMQP; the kubelet's atomic `..data` swap
/// to a new certificate reaches new connections without a restart; a swap to files that fail
/// a check (a key of another certificate) is refused with a reason in the log, and new
/// connections keep getting the previous certificate; a later good swap applies again.
#[test]
fn a_rotated_certificate_reaches_new_connections_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("given CA");
    let secret = SecretDir::new(dir.path().join("tls"));
    let first = ca.issue(&["localhost"]);
    secret.publish(&first.files(&ca));
    let hub = Hub::start(&dir.path().join("data"), &secret);
    for addr in [hub.mqtt, hub.amqp] {
        let seen = presented_cert(addr, &ca.pem()).unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(seen == first.der, "{addr} presented another certificate");
    }
    assert!(
        !dir.path().join("data/tls").exists(),
        "the hub made a CA of its own though certificate files were given"
    );

    // Rotation: a new key and certificate from the same CA.
    let second = ca.issue(&["localhost"]);
    secret.publish(&second.files(&ca));
    let applied = format!("sha256={}", sha256_hex(&second.der));
    hub.wait_log(Duration::from_secs(60), |l| {
        l.contains("TLS certificate reloaded") && l.contains(&applied)
    });
    for addr in [hub.mqtt, hub.amqp] {
        let seen = presented_cert(addr, &ca.pem()).unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(seen == second.der, "{addr}: not the rotated certificate");
    }

    // A bad rotation: the key belongs to another certificate.
    let third = ca.issue(&["localhost"]);
    secret.publish(&[
        ("tls.crt", third.cert_pem.clone()),
        ("tls.key", ca.issue(&["localhost"]).key_pem),
        ("ca.crt", ca.pem()),
    ]);
    let log = hub.wait_log(Duration::from_secs(60), |l| {
        l.contains("TLS certificate reload refused")
    });
    let refused = log
        .lines()
        .find(|l| l.contains("TLS certificate reload refused"))
        .expect("line");
    assert!(
        refused.contains("does not fit the certificate"),
        "{refused}"
    );
    let seen = presented_cert(hub.mqtt, &ca.pem()).expect("handshake after a refused reload");
    assert!(
        seen == second.der,
        "a refused certificate must not be served"
    );

    // Fixed: the next good swap applies.
    let fourth = ca.issue(&["localhost"]);
    secret.publish(&fourth.files(&ca));
    let applied = format!("sha256={}", sha256_hex(&fourth.der));
    hub.wait_log(Duration::from_secs(60), |l| l.contains(&applied));
    let seen = presented_cert(hub.mqtt, &ca.pem()).expect("handshake");
    assert!(
        seen == fourth.der,
        "not the fixed certificate:\n{}",
        hub.log()
    );
}
