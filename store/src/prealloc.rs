//! Segment preallocation: a background thread keeps the next segment ready, filled with zeros and
//! synced, so the writer's fdatasyncs overwrite allocated blocks instead of growing the file (on
//! ext4 a growing file makes every fdatasync also commit the journal for the new size).
//!
//! Invariants: the prepared file is named `PREPARED-{generation:016x}` (see [`prepared_name`]) and
//! never holds data, so it may be deleted at any time (the next opener's recovery deletes every
//! one left over); only the owner of that generation creates or takes it, so an older owner that
//! still runs and a newer one never touch each other's file. It is not created once a newer
//! owner has claimed the directory. The writer takes it and
//! renames it to a segment name only after writing and syncing the segment header into it; from
//! the take until the writer's next request the thread prepares nothing (preparing starts by
//! deleting the prepared name, which still names the taken file until the rename). A
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

/// The prepared file's state, shared by the writer and the preparing thread.
#[derive(Default)]
enum Slot {
    /// Nothing prepared: the thread may prepare.
    #[default]
    Empty,
    Ready(Prepared),
    /// The writer took the file and has not renamed it away yet (it says so with the next
    /// `request`): the prepared name is still its file's, and the thread must not touch it.
    Taken,
}

/// Owns the preparing thread; stops and joins it when dropped.
pub(crate) struct Preparer {
    requests: Option<mpsc::Sender<()>>,
    ready: Arc<Mutex<Slot>>,
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
        let ready: Arc<Mutex<Slot>> = Arc::default();
        let slot = Arc::clone(&ready);
        let total = Arc::clone(&disk_bytes);
        let thread = std::thread::Builder::new()
            .name("store-preparer".into())
            .spawn(move || {
                for () in rx {
                    // A request queued before the writer took the file must not replace it.
                    let empty = slot
                        .lock()
                        .map(|s| matches!(*s, Slot::Empty))
                        .unwrap_or(false);
                    if !empty || total.load(Ordering::Relaxed) + bytes > quota {
                        continue;
                    }
                    if !fence.still_current() {
                        break;
                    }
                    match prepare(fs.as_ref(), &path, bytes) {
                        Ok(file) => {
                            total.fetch_add(bytes, Ordering::Relaxed);
                            if let Ok(mut s) = slot.lock() {
                                *s = Slot::Ready((file, bytes));
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

    /// The prepared file, if one is ready. The caller must rename it away (or remove it) before
    /// `request`; until then nothing is prepared. Its bytes leave the running total: the segment
    /// made from it counts them again.
    pub(crate) fn take(&self) -> Option<Prepared> {
        let taken = self
            .ready
            .lock()
            .ok()
            .and_then(|mut s| match std::mem::take(&mut *s) {
                Slot::Ready(p) => {
                    *s = Slot::Taken;
                    Some(p)
                }
                other => {
                    *s = other;
                    None
                }
            });
        if let Some((_, bytes)) = &taken {
            self.disk_bytes.fetch_sub(*bytes, Ordering::Relaxed);
        }
        taken
    }

    /// Asks for the next segment to be prepared; also says that a taken file no longer has the
    /// prepared name.
    pub(crate) fn request(&self) {
        if let Ok(mut s) = self.ready.lock() {
            if matches!(*s, Slot::Taken) {
                *s = Slot::Empty;
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::io::{read_exact_at, OsFs};
    use std::time::{Duration, Instant};

    /// The writer takes the prepared file and writes its segment header into it before renaming
    /// it. A request that was already queued (the writer asked again while this file was being
    /// prepared, then took it) must not make the preparer delete and recreate the prepared name
    /// meanwhile: the writer's rename would then give the segment name to a fresh file of zeros
    /// while its data went into the unlinked one (lost after a crash; seen in `crash_points` as
    /// "segment header names another segment" and as a lost acknowledged message).
    #[test]
    fn a_request_queued_before_a_take_leaves_the_taken_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Fs> = Arc::new(OsFs);
        let (fence, _) = Fence::load(fs.as_ref(), dir.path()).unwrap();
        let path = dir.path().join(prepared_name(Generation(1)));
        let preparer = Preparer::start(
            Arc::clone(&fs),
            path.clone(),
            4096,
            Arc::default(),
            u64::MAX,
            fence,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let (file, _) = loop {
            if let Some(p) = preparer.take() {
                break p;
            }
            assert!(Instant::now() < deadline, "nothing was prepared");
            std::thread::sleep(Duration::from_millis(1));
        };
        file.write_all_at(b"HEADER", 0).unwrap();
        // The stale request, then stop: the thread handles what was queued before it ends.
        preparer.requests.as_ref().unwrap().send(()).unwrap();
        drop(preparer);
        let named = fs.open(&path).unwrap();
        let mut head = [0u8; 6];
        read_exact_at(named.as_ref(), &mut head, 0).unwrap();
        assert_eq!(
            &head, b"HEADER",
            "the prepared name no longer names the taken file"
        );
    }
}
