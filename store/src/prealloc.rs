//! Segment preallocation: a background thread keeps the next segment ready, filled with zeros and
//! synced, so the writer's fdatasyncs overwrite allocated blocks instead of growing the file (on
//! ext4 a growing file makes every fdatasync also commit the journal for the new size).
//!
//! Invariants: the prepared file is named `PREPARED` and never holds data, so it may be deleted at
//! any time (recovery ignores it; the preparer replaces a leftover one); the writer takes it and
//! renames it to a segment name only after writing and syncing the segment header into it. A
//! failure to prepare (a full disk, say) only means the next segment is created the plain way.
//! The prepared file counts as disk usage from the moment it exists, and it is not prepared when
//! it would take the store past its quota.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::io::{write_zeros, Fs, FsFile};

/// Name of the prepared segment file inside the store directory.
pub(crate) const PREPARED_FILE: &str = "PREPARED";

/// A ready file, and its allocated length.
pub(crate) type Prepared = (Arc<dyn FsFile>, u64);

/// Owns the preparing thread; stops and joins it when dropped.
pub(crate) struct Preparer {
    requests: Option<mpsc::Sender<()>>,
    ready: Arc<Mutex<Option<Prepared>>>,
    thread: Option<JoinHandle<()>>,
    disk_bytes: Arc<AtomicU64>,
}

impl Preparer {
    /// Starts preparing one segment of `bytes` in `dir`. `disk_bytes` is the store's running
    /// total of bytes on disk, which the prepared file joins; none is prepared past `quota`.
    pub(crate) fn start(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        bytes: u64,
        disk_bytes: Arc<AtomicU64>,
        quota: u64,
    ) -> Preparer {
        let (tx, rx) = mpsc::channel::<()>();
        let ready: Arc<Mutex<Option<Prepared>>> = Arc::default();
        let slot = Arc::clone(&ready);
        let total = Arc::clone(&disk_bytes);
        let thread = std::thread::Builder::new()
            .name("store-preparer".into())
            .spawn(move || {
                for () in rx {
                    let taken = slot.lock().map(|s| s.is_none()).unwrap_or(false);
                    if !taken || total.load(Ordering::Relaxed) + bytes > quota {
                        continue;
                    }
                    match prepare(fs.as_ref(), &dir, bytes) {
                        Ok(file) => {
                            total.fetch_add(bytes, Ordering::Relaxed);
                            if let Ok(mut s) = slot.lock() {
                                *s = Some((file, bytes));
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "could not prepare the next segment");
                            let _ = fs.remove(&dir.join(PREPARED_FILE));
                        }
                    }
                }
            })
            .ok();
        let preparer = Preparer {
            requests: Some(tx),
            ready,
            thread,
            disk_bytes,
        };
        preparer.request();
        preparer
    }

    /// A preparer that never prepares (preallocation off).
    pub(crate) fn disabled() -> Preparer {
        Preparer {
            requests: None,
            ready: Arc::default(),
            thread: None,
            disk_bytes: Arc::default(),
        }
    }

    /// The prepared file, if one is ready. The caller must rename it away before `request`. Its
    /// bytes leave the running total: the segment made from it counts them again.
    pub(crate) fn take(&self) -> Option<Prepared> {
        let taken = self.ready.lock().ok().and_then(|mut s| s.take());
        if let Some((_, bytes)) = &taken {
            self.disk_bytes.fetch_sub(*bytes, Ordering::Relaxed);
        }
        taken
    }

    /// Asks for the next segment to be prepared.
    pub(crate) fn request(&self) {
        if let Some(tx) = &self.requests {
            let _ = tx.send(());
        }
    }
}

impl Drop for Preparer {
    /// Stops the thread; a file still prepared leaves the running total (the caller removes it).
    fn drop(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.take());
    }
}

fn prepare(fs: &dyn Fs, dir: &Path, bytes: u64) -> std::io::Result<Arc<dyn FsFile>> {
    let path = dir.join(PREPARED_FILE);
    let _ = fs.remove(&path);
    let file = fs.create_new(&path)?;
    write_zeros(file.as_ref(), bytes)?;
    file.sync_data()?;
    Ok(file)
}
