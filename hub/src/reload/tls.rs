//! Live reload of the certificate files given with `--tls-cert`, `--tls-key` and `--tls-ca`:
//! their directories are watched like the manifest's (a Kubernetes Secret volume swaps a
//! `..data` symlink, so the files' own inodes never change), and after a burst of changes the
//! files are read again ([`crate::tls::GivenCert::reload`]): new connections get a good new
//! certificate, a bad one is refused and logged, the previous one stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::RecommendedWatcher;
use store::Clock;
use tokio::sync::{mpsc, watch};

use crate::tls::GivenCert;

/// The directories holding the three files, each once.
pub fn watched_dirs(cert: &GivenCert) -> Vec<PathBuf> {
    let files = cert.files();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for path in [&files.cert, &files.key, &files.ca] {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Watches the directories of `cert`'s files; each change sends `()` on `tx`.
pub fn watch(
    cert: &GivenCert,
    tx: &mpsc::Sender<()>,
) -> Result<Vec<RecommendedWatcher>, (PathBuf, notify::Error)> {
    watched_dirs(cert)
        .into_iter()
        .map(|dir| super::watch_dir(&dir, (), tx.clone()).map_err(|e| (dir, e)))
        .collect()
}

/// `clock`'s time as rustls checks validity against it.
pub fn system_time(clock: &dyn Clock) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(clock.now().0)
}

/// Reloads `cert` after every quiet burst of `changes` (validity checked at `clock`'s time),
/// until `stop` turns true.
pub async fn serve(
    cert: Arc<GivenCert>,
    clock: Arc<dyn Clock>,
    mut changes: mpsc::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            c = changes.recv() => match c {
                Some(()) => super::gather((), &mut changes).await,
                None => return,
            },
            () = super::stopped(&mut stop) => return,
        }
        let (cert, now) = (Arc::clone(&cert), system_time(clock.as_ref()));
        tokio::task::block_in_place(move || {
            cert.reload(now);
        });
    }
}
