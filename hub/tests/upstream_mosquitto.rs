//! The upstream link against a broker we did not write: `--upstream-addr` pointed at a stock
//! mosquitto (Debian's) with TLS, and a plain MQTT subscriber on `devices/#` that must see every
//! message of every module, in order, on IoT Hub's topics.
//!
//! mosquitto does not check SAS tokens (it runs with `allow_anonymous true`): this checks the
//! MQTT and TLS side of the link, not authentication, which hub/tests/upstream.rs covers through
//! the emulator. Needs `mosquitto` (scripts/test.sh installs it); fails, never skips, without it.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use raw::{module_creds, Creds, RawClient, TestHub, DEVICE};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use rumqttc::mqttbytes::QoS;

const T: Duration = Duration::from_secs(10);

struct Mosquitto {
    child: Child,
    tls: SocketAddr,
    plain: SocketAddr,
    ca: PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_binary() -> PathBuf {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mosquitto is not installed: run scripts/test.sh, or apt-get install mosquitto")
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mosquitto test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

async fn start_mosquitto(dir: &Path) -> Mosquitto {
    let (ca, cert, key) = certificates(dir);
    let (tls, plain) = (raw::free_port(), raw::free_port());
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             log_dest stderr\n\
             listener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             listener {plain} 127.0.0.1\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let mut child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mosquitto");
    let plain_addr: SocketAddr = ([127, 0, 0, 1], plain).into();
    let deadline = tokio::time::Instant::now() + T;
    // mosquitto has no readiness signal: its port answering is the event.
    while tokio::net::TcpStream::connect(plain_addr).await.is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "mosquitto exited: {}",
            std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
        );
        assert!(tokio::time::Instant::now() < deadline, "mosquitto not up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Mosquitto {
        child,
        tls: ([127, 0, 0, 1], tls).into(),
        plain: plain_addr,
        ca,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_mosquitto_with_tls_receives_every_module_message_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = start_mosquitto(root).await;

    // The subscriber is on before anything is sent (mosquitto keeps nothing for later).
    let mut sub = RawClient::plain(broker.plain).await;
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("watcher");
    connect.clean_session = true;
    connect.keep_alive = 60;
    assert_eq!(sub.connect(connect).await.code, ConnectReturnCode::Success);
    sub.subscribe(1, &["devices/#"]).await;

    std::fs::write(
        root.join("manifest.json"),
        r#"{"modulesContent": {
  "$edgeAgent": {"properties.desired": {"modules": {"modA": {}, "modB": {}}}},
  "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
    "routes": {"up": "FROM /messages/* INTO $upstream"},
    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}}}"#,
    )
    .unwrap();
    let creds: Vec<Creds> = ["modA", "modB"]
        .iter()
        .map(|m| module_creds(&root.join("data"), m))
        .collect();
    let (addr, ca) = (broker.tls.to_string(), broker.ca.clone());
    let hub = TestHub::start_with(root, move |s| {
        s.upstream_protocol = Some("mqtt".into());
        s.upstream_addr = Some(addr.clone());
        s.upstream_ca = Some(ca.clone());
    })
    .await;

    let n: u64 = 300;
    for c in &creds {
        let mut client = hub.tls().await;
        assert_eq!(
            client.connect(c.connect(true, 60)).await.code,
            ConnectReturnCode::Success
        );
        for seq in 0..n {
            let topic = c.events_topic(&format!("%24.mid=m-{seq}&seq={seq}"));
            client
                .writer
                .publish_unflushed(
                    &topic,
                    QoS::AtLeastOnce,
                    (seq + 1) as u16,
                    seq.to_string().as_bytes(),
                )
                .await
                .unwrap();
        }
        client.writer.flush().await.unwrap();
        for _ in 0..n {
            assert!(matches!(
                client.reader.expect_packet(T).await,
                Packet::PubAck(_)
            ));
        }
    }

    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 2 * n as usize {
        let p = sub.reader.expect_publish(Duration::from_secs(30)).await;
        if p.qos == QoS::AtLeastOnce {
            sub.writer.puback(p.pkid).await;
        }
        let module = p
            .topic
            .strip_prefix(&format!("devices/{DEVICE}/modules/"))
            .and_then(|rest| rest.split_once("/messages/events/"))
            .map(|(m, bag)| {
                assert!(bag.contains("seq="), "the bag travels: {}", p.topic);
                m.to_owned()
            })
            .unwrap_or_else(|| panic!("not an IoT Hub events topic: {}", p.topic));
        let seq: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        got.entry(module).or_default().push(seq);
    }
    let expected: Vec<u64> = (0..n).collect();
    assert_eq!(got.get("modA"), Some(&expected), "modA in order, once each");
    assert_eq!(got.get("modB"), Some(&expected), "modB in order, once each");
    hub.stop().await;
}
