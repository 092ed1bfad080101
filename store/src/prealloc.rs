//! Segment preallocation: a background thread keeps the next segment ready, filled with zeros and
//! synced, so the writer's fdatasyncs overwrite allocated blocks instead of growing the file (on
//! ext4 a growing file makes every fdatasync also commit the journal for the new size).
//!
//! Invariants: the prepared file is named `PREPARED-{generation:016x}` (see [`prepared_name`]) and
//! never holds data, so it may be deleted at any time (the next opener's recovery deletes every
//! one left over); only the owner of that generation creates or takes it, so an older owner that
//! still runs and a newer one never touch each other's file. It is not created once a newer
//! owner has claimed the directory. The writer takes it and
//! renames it to a segment name only after writing and syncing the segment header into it. A
//! failure to prepare (a full disk, say) only means the next segment is created the plain way.
//! The prepared file counts as disk usage from the moment it exists, and it is not prepared when
//! it would take the store past its quota.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use crate::io::{write_zeros, Fs, FsFile};

use crate::fence::Fence;
use crate::types::Generation;

/// Name the first format version gave every owner's prepared segment file.
const LEGACY_PREPARED_FILE: &str = "PREPARED";

/// Name of generation `generation`'s prepared segment file inside the store directory.
pub(crate) fn prepared_name(generation: Generation) -> String {
    format!("{LEGACY_PREPARED_FILE}-{:016x}", generation.0)
}

/// True for the name of any owner's prepared file (never data).
pub(crate) fn is_prepared_name(name: &str) -> bool {
    name == LEGACY_PREPARED_FILE
        || name
            .strip_prefix("PREPARED-")
            .is_some_and(|g| g.len() == 16 && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

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
    /// Starts preparing one segment of `bytes` at `path`. `disk_bytes` is the store's running
    /// total of bytes on disk, which the prepared file joins; none is prepared past `quota`, and
    /// none once `fence` tells that a newer owner has claimed the directory.
    pub(crate) fn start(
        fs: Arc<dyn Fs>,
        path: PathBuf,
        bytes: u64,
        disk_bytes: Arc<AtomicU64>,
        quota: u64,
        fence: Fence,
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
                    if !fence.still_current() {
                        break;
                    }
                    match prepare(fs.as_ref(), &path, bytes) {
                        Ok(file) => {
                            total.fetch_add(bytes, Ordering::Relaxed);
                            if let Ok(mut s) = slot.lock() {
                                *s = Some((file, bytes));
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "could not prepare the next segment");
                            let _ = fs.remove(&path);
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

fn prepare(fs: &dyn Fs, path: &Path, bytes: u64) -> std::io::Result<Arc<dyn FsFile>> {
    // A leftover of this same owner (a failed earlier attempt); never another owner's file.
    let _ = fs.remove(path);
    let file = fs.create_new(path)?;
    write_zeros(file.as_ref(), bytes)?;
    file.sync_data()?;
    Ok(file)
}
