//! podman for tests that run edgehub's images (k8s/images/): make sure podman is there, build
//! an image once per test run (cached by the SHA-256 of the binary, Containerfile and
//! stage.sh), run containers, volumes and `podman kube play`, each under a unique name and
//! removed when dropped.
//!
//! Reusable from any crate of the workspace (`#[path = "../../hub/tests/support/podman.rs"]`):
//! it takes binary paths as arguments and needs only std.
//!
//! ```ignore
//! #[path = "support/podman.rs"] mod podman;
//! let Some(podman) = podman::Podman::or_skip("hub image serves SDK modules") else { return };
//! let image = podman.image(podman::Image::Hub, Path::new(env!("CARGO_BIN_EXE_edgehub")));
//! let volume = podman.volume("store");
//! let hub = podman.run(&["--network", &format!("ns:{}", ns_path), "-v", &volume.mount("/var/lib/edgehub")], &image, &["run", ...]);
//! hub.wait_log("edgehub ready", 1, Duration::from_secs(60));
//! hub.kill(); hub.start(); hub.wait_log("edgehub ready", 2, Duration::from_secs(60));
//! ```
//!
//! Policy: podman is installed with apt when missing (root, as scripts/test.sh does in CI);
//! only when that is impossible does [`Podman::or_skip`] print a clear SKIP line and return
//! `None`. Everything runs with the project's `k8s/images/containers.conf` (runc, ulimits below
//! the host's: see shared/reference/kubernetes-testing-here.md).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Which Containerfile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Image {
    /// k8s/images/hub.Containerfile (binary `edgehub`).
    Hub,
    /// k8s/images/controller.Containerfile (binary `edgehub-controller`).
    Controller,
}

impl Image {
    fn containerfile(self) -> &'static str {
        match self {
            Image::Hub => "hub.Containerfile",
            Image::Controller => "controller.Containerfile",
        }
    }

    fn repo(self) -> &'static str {
        match self {
            Image::Hub => "localhost/edgehub-test",
            Image::Controller => "localhost/edgehub-controller-test",
        }
    }
}

/// podman, with the project's containers.conf.
#[derive(Clone, Debug)]
pub struct Podman {
    images_dir: PathBuf,
}

/// Images built by this process, by (image, digests): built once per test run.
static BUILT: OnceLock<Mutex<BTreeMap<(Image, String), String>>> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test (or test run) uses: `edgehub-test-PREFIX-PID-N-NANOS`.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "edgehub-test-{prefix}-{}-{}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos & 0xffff
    )
}

impl Podman {
    /// podman, installed if it is missing, or why it cannot be.
    pub fn ensure() -> Result<Podman, String> {
        let images_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../k8s/images")
            .canonicalize()
            .map_err(|e| format!("k8s/images: {e}"))?;
        if !has("podman") || !has("runc") {
            install()?;
        }
        let podman = Podman { images_dir };
        let out = podman.output(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]);
        if !out.status.success() {
            return Err(format!("podman info failed: {}", text(&out.stderr)));
        }
        Ok(podman)
    }

    /// [`Podman::ensure`], or `None` after printing a SKIP line naming `test` and why.
    pub fn or_skip(test: &str) -> Option<Podman> {
        match Podman::ensure() {
            Ok(p) => Some(p),
            Err(why) => {
                eprintln!("SKIP {test}: podman cannot be installed or run here: {why}");
                None
            }
        }
    }

    /// `podman ARGS` with the project's containers.conf.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.images_dir.join("containers.conf"));
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("podman {args:?}: {e}"))
    }

    /// `podman ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout).trim().to_owned()
    }

    /// The image of `kind` holding `binary`, built with its Containerfile (stage.sh lays out the
    /// context) unless an image of that very binary, Containerfile and stage.sh exists: tagged
    /// by their SHA-256s, so a test run builds it once and a change to any of them gets a new
    /// image. Returns the tag.
    pub fn image(&self, kind: Image, binary: &Path) -> String {
        let containerfile = self.images_dir.join(kind.containerfile());
        // The binary, the Containerfile and stage.sh make the image: a change to any is a new tag.
        let digest = format!(
            "{}-{}{}",
            &sha256_file(binary)[..16],
            &sha256_file(&containerfile)[..8],
            &sha256_file(&self.images_dir.join("stage.sh"))[..8]
        );
        let built = BUILT.get_or_init(|| Mutex::new(BTreeMap::new()));
        let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tag) = built.get(&(kind, digest.clone())) {
            return tag.clone();
        }
        let tag = format!("{}:{digest}", kind.repo());
        if !self.output(&["image", "exists", &tag]).status.success() {
            let ctx = std::env::temp_dir().join(unique("image-context"));
            let stage = Command::new(self.images_dir.join("stage.sh"))
                .arg(binary)
                .arg(&ctx)
                .output()
                .expect("run stage.sh");
            assert!(stage.status.success(), "stage.sh: {}", text(&stage.stderr));
            let started = Instant::now();
            self.ok(&[
                "build",
                "--isolation",
                "chroot",
                "-q",
                "-t",
                &tag,
                "-f",
                containerfile.to_str().expect("utf-8 path"),
                ctx.to_str().expect("utf-8 path"),
            ]);
            eprintln!("built {tag} in {:?}", started.elapsed());
            let _ = std::fs::remove_dir_all(&ctx);
            // Images of binaries built before this one are of no further use.
            let listed = self.output(&[
                "images",
                "--format",
                "{{.Repository}}:{{.Tag}}",
                kind.repo(),
            ]);
            for old in text(&listed.stdout).lines().filter(|t| *t != tag) {
                let _ = self.output(&["rmi", old]);
            }
        }
        built.insert((kind, digest), tag.clone());
        tag
    }

    /// A new named volume (removed when dropped).
    pub fn volume(&self, prefix: &str) -> Volume {
        let name = unique(prefix);
        self.ok(&["volume", "create", &name]);
        Volume {
            podman: self.clone(),
            name,
        }
    }

    /// `podman run -d --name UNIQUE OPTIONS IMAGE ARGS`: the container (removed when dropped).
    pub fn run(&self, options: &[&str], image: &str, args: &[&str]) -> Container {
        let name = unique("ctr");
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(options);
        all.push(image);
        all.extend_from_slice(args);
        self.ok(&all);
        Container {
            podman: self.clone(),
            name,
        }
    }

    /// `podman kube play FILE` (podman 4.3 ignores StatefulSets: give it Pods); the pods are
    /// brought down (`podman kube down`) and removed when the returned value is dropped.
    pub fn kube_play(&self, file: &Path, options: &[&str]) -> Played {
        let path = file.to_str().expect("utf-8 path").to_owned();
        let mut all = vec!["kube", "play"];
        all.extend_from_slice(options);
        all.push(&path);
        self.ok(&all);
        Played {
            podman: self.clone(),
            file: file.to_path_buf(),
        }
    }

    /// [`Podman::kube_play`] with podman itself inside the network namespace `netns` (a path
    /// such as `/run/netns/NAME`), through `nsenter --net` (not `ip netns exec`, which mounts
    /// a fresh /sys and so hides the cgroups podman needs). With `--network slirp4netns` the
    /// pod's `containerPort`s are published on that namespace's addresses: podman 4.3 publishes
    /// every declared port, and refuses ports on host or `ns:` networks.
    pub fn kube_play_in(&self, netns: &Path, file: &Path, options: &[&str]) -> Played {
        let path = file.to_str().expect("utf-8 path").to_owned();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns.display()))
            .arg("podman")
            .env("CONTAINERS_CONF", self.images_dir.join("containers.conf"))
            .args(["kube", "play"])
            .args(options)
            .arg(&path)
            .stdin(Stdio::null());
        let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        Played {
            podman: self.clone(),
            file: file.to_path_buf(),
        }
    }

    /// A container someone else made (e.g. `POD-CONTAINER` of a played pod), to follow its
    /// logs; removed (`rm -f`) when dropped, like the ones [`Podman::run`] makes.
    pub fn container(&self, name: &str) -> Container {
        Container {
            podman: self.clone(),
            name: name.to_owned(),
        }
    }
}

/// A named volume; removed (with its data) when dropped.
#[derive(Debug)]
pub struct Volume {
    podman: Podman,
    /// Its name.
    pub name: String,
}

impl Volume {
    /// `NAME:PATH`, for `-v`.
    pub fn mount(&self, path: &str) -> String {
        format!("{}:{path}", self.name)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = self.podman.output(&["volume", "rm", "-f", &self.name]);
    }
}

/// A container; removed (`rm -f`) when dropped.
#[derive(Debug)]
pub struct Container {
    podman: Podman,
    /// Its name.
    pub name: String,
}

impl Container {
    /// `podman kill -s KILL`: the node dies under it.
    pub fn kill(&self) {
        self.podman.ok(&["kill", "-s", "KILL", &self.name]);
        // Wait until podman has seen it stop (an event, not a guess).
        self.podman.ok(&["wait", &self.name]);
    }

    /// `podman start`: the same container, its volumes and all, again.
    pub fn start(&self) {
        self.podman.ok(&["start", &self.name]);
    }

    /// Everything it wrote to stdout and stderr, every run so far.
    pub fn logs(&self) -> String {
        let out = self.podman.output(&["logs", &self.name]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    /// Its state (`running`, `exited`, …).
    pub fn state(&self) -> String {
        self.podman
            .ok(&["inspect", "--format", "{{.State.Status}}", &self.name])
    }

    /// Follows the logs (`podman logs -f`) until `needle` has appeared `nth` times over every
    /// run of the container; panics with the logs if the container stops first or `within`
    /// (a failure bound only) passes.
    pub fn wait_log(&self, needle: &str, nth: usize, within: Duration) {
        let mut child = self
            .podman
            .command()
            .args(["logs", "-f", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman logs -f");
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + within;
        let mut seen = 0;
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    seen += 1;
                    if seen >= nth {
                        break Ok(());
                    }
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break Err("not within the deadline"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err("the container stopped first")
                }
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        if let Err(why) = outcome {
            panic!(
                "{needle:?} x{nth} in {}'s logs: {why} ({within:?}); state {}; logs:\n{}",
                self.name,
                self.state(),
                self.logs()
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.podman.output(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// What `podman kube play` started; `podman kube down` when dropped.
#[derive(Debug)]
pub struct Played {
    podman: Podman,
    file: PathBuf,
}

impl Drop for Played {
    fn drop(&mut self) {
        if let Some(f) = self.file.to_str() {
            let _ = self.podman.output(&["kube", "down", f]);
        }
    }
}

fn has(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// `apt-get install podman runc`, as root; why not, otherwise.
fn install() -> Result<(), String> {
    static ONCE: Mutex<()> = Mutex::new(());
    let _guard = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if has("podman") && has("runc") {
        return Ok(());
    }
    let apt = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("apt-get: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {args:?}: {}", text(&out.stderr).trim()))
        }
    };
    if apt(&["install", "-y", "-qq", "podman", "runc"]).is_err() {
        apt(&["update", "-qq"])?;
        apt(&["install", "-y", "-qq", "podman", "runc"])?;
    }
    if has("podman") && has("runc") {
        Ok(())
    } else {
        Err("apt-get installed podman and runc but they are not on PATH".into())
    }
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("sha256sum {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
