//! Two `edgehub run` started at the same moment on one empty data directory (issue 15, the
//! failover simulation's scenario 4 "double start", seed 1011).
//!
//! Each round makes a fresh data directory and starts two real binaries on it, both blocked on
//! reading one FIFO until the test opens and closes it: they are released together, so both
//! initialize the directory (hub.json, identities.json, tls/, the store's first claim) at the
//! same moment. With the same `--epoch` the later store opener wins and the earlier one is
//! fenced (exit status 3). Per round the test asserts:
//!
//! - the hub that was not the survivor exited with status 3 (fenced), never 1 (a missing
//!   `identities.json`, `EPOCHS: File exists`, …);
//! - the survivor serves with the keys on disk: a raw MQTT CONNECT over TLS (trusting the CA on
//!   disk) with a SAS token made from the key in `identities.json` is accepted.
//!
//! Every wait is on an event (a process's exit, the "edgehub ready" log line, a CONNACK); the
//! durations are failure bounds only.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "support/raw.rs"]
mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::v4::ConnectReturnCode;

/// Failure bound for anything a round waits for (a loaded 2-core CI machine).
const T: Duration = Duration::from_secs(60);
/// Rounds, each on a fresh data directory.
const ROUNDS: usize = 20;
/// The documented exit status of a fenced hub.
const EXIT_FENCED: i32 = 3;

struct Started {
    child: Child,
    log: PathBuf,
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `edgehub run` on `{root}/data`, blocked until `gate` (a FIFO) is opened and closed.
fn spawn_gated(root: &Path, gate: &Path, n: usize) -> Started {
    let log = root.join(format!("hub-{n}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new("sh")
        .arg("-c")
        // Opening a FIFO for reading blocks until a writer opens it; the read ends at EOF.
        .arg(r#"gate="$1"; shift; cat "$gate" >/dev/null; exec "$@""#)
        .arg("sh")
        .arg(gate)
        .arg(env!("CARGO_BIN_EXE_edgehub"))
        .arg("run")
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--manifest")
        .arg(root.join("manifest.json"))
        .args(["--mqtt-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args([
            "--amqp-addr",
            "127.0.0.1:0",
            "--methods-addr",
            "127.0.0.1:0",
        ])
        .args(["--iothub-hostname", raw::IOTHUB, "--device-id", raw::DEVICE])
        .args(["--gateway-hostname", "localhost", "--log", "info"])
        .args(["--upstream-protocol", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn sh for edgehub");
    Started { child, log }
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Waits until at most one of `hubs` still runs; the exit statuses of those that stopped.
async fn until_one_left(hubs: &mut [Started; 2]) -> [Option<i32>; 2] {
    let deadline = Instant::now() + T;
    loop {
        let mut codes = [None, None];
        for (i, h) in hubs.iter_mut().enumerate() {
            if let Some(status) = h.child.try_wait().expect("try_wait") {
                codes[i] = Some(status.code().unwrap_or(-1));
            }
        }
        if codes.iter().filter(|c| c.is_some()).count() >= 1 {
            return codes;
        }
        assert!(
            Instant::now() < deadline,
            "both hubs still run after {T:?} (one must be fenced):\n--- hub 0\n{}\n--- hub 1\n{}",
            hubs[0].log(),
            hubs[1].log()
        );
        // A child's exit gives no signal to an async test here; a short poll is the event wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn one_round(round: usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("manifest.json"), raw::MANIFEST).unwrap();
    let gate = root.join("gate");
    mkfifo(&gate);
    let mut hubs = [spawn_gated(root, &gate, 0), spawn_gated(root, &gate, 1)];
    // Both wait in `cat` on the FIFO; once both block there, opening and closing it for
    // writing releases them together.
    wait_for_readers(&gate, &hubs);
    drop(std::fs::OpenOptions::new().write(true).open(&gate).unwrap());

    let codes = until_one_left(&mut hubs).await;
    let (gone, left) = if codes[0].is_some() { (0, 1) } else { (1, 0) };
    let code = codes[gone].unwrap();
    assert_eq!(
        code,
        EXIT_FENCED,
        "round {round}: hub {gone} exited with {code}, not as fenced (3):\n{}\n--- the other \
         hub\n{}",
        hubs[gone].log(),
        hubs[left].log()
    );
    let survivor = &mut hubs[left];
    let log = survivor.log.clone();
    let addrs = raw::wait_ready_line(&log, T, || {
        survivor.child.try_wait().ok().flatten().is_some()
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "round {round}: the surviving hub {left} exited too:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });

    // The keys and the CA on disk are the ones the serving hub uses.
    let data = root.join("data");
    let creds = raw::module_creds(&data, "sender");
    let mut client = raw::RawClient::tls(addrs.mqtt, &hub::tls::ca_path(&data)).await;
    let ack = client.connect(creds.connect(true, 60)).await;
    assert_eq!(
        ack.code,
        ConnectReturnCode::Success,
        "round {round}: the serving hub {left} refuses the key on disk:\n{}\n--- the fenced \
         hub\n{}",
        hubs[left].log(),
        hubs[gone].log()
    );
}

/// Waits until both gated processes hold the FIFO open for reading (their `cat` is blocked in
/// `open`, or has opened it): counted through /proc, so neither misses the release.
fn wait_for_readers(gate: &Path, hubs: &[Started; 2]) {
    let deadline = Instant::now() + T;
    loop {
        let blocked = hubs
            .iter()
            .filter(|h| cat_waits_on(h.child.id(), gate))
            .count();
        if blocked == 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gated processes did not reach the FIFO"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `sh` (pid `pid`) has a child `cat` blocked opening `gate` (its command line names it
/// and it waits in the kernel for a writer, `wait_for_partner`).
fn cat_waits_on(pid: u32, gate: &Path) -> bool {
    let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
        return false;
    };
    children.split_whitespace().any(|c| {
        let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
        let names_gate = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == gate.as_os_str().as_encoded_bytes());
        let wchan = std::fs::read_to_string(format!("/proc/{c}/wchan")).unwrap_or_default();
        names_gate && wchan.trim() == "wait_for_partner"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_started_at_once_on_an_empty_data_directory_serve_the_keys_on_disk() {
    raw::init_logs();
    for round in 0..ROUNDS {
        one_round(round).await;
    }
}

/// While another process holds `init.lock`, `run` logs once that it waits, gives up after
/// `--init-lock-timeout` with exit status 5 and creates nothing; `connection-string` too. Once
/// the lock is released, the same command works.
#[test]
fn a_hub_that_waits_too_long_for_the_lock_exits_5_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lock = std::fs::File::create(data.join("init.lock")).unwrap();
    lock.lock().unwrap();

    let run = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .arg("run")
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--mqtt-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--amqp-addr",
            "127.0.0.1:0",
            "--methods-addr",
            "127.0.0.1:0",
            "--upstream-protocol",
            "none",
        ])
        .args(["--init-lock-timeout", "1"])
        .output()
        .expect("run edgehub");
    let log = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(5), "{log}");
    assert_eq!(
        log.matches("waiting for another hub to finish initializing")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("gave up"), "{log}");
    let names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("init.lock")]);

    let cs = |timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_edgehub"))
            .args(["connection-string", "sender", "--data-dir"])
            .arg(&data)
            .args(["--init-lock-timeout", timeout])
            .env("EDGEHUB_LOG", "warn")
            .output()
            .expect("run edgehub")
    };
    let refused = cs("0");
    assert_eq!(
        refused.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(lock);
    let ok = cs("0");
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("ModuleId=sender"),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
