//! Epoch fencing through the append-only `EPOCHS` file (DESIGN.md "Fencing").
//!
//! Invariants:
//! - `EPOCHS` only grows, except that a torn last record (never synced) is cut off at open.
//! - An opener appends and syncs its `Claim` before it reads any segment, so from that moment
//!   the previous owner's fence check fails and it can acknowledge nothing more.
//! - A writer is current iff the file's length equals the length right after its own `Start`
//!   record: one `fstat` per check, cheap enough for every group commit (before the write and
//!   after the fdatasync, before any waiter is completed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{open_io, OpenError};
use crate::format::{EpochRecord, SegmentTail, EPOCH_RECORD_LEN};
use crate::io::{read_all, Fs, FsFile};
use crate::types::{Epoch, Generation, Offset};

/// Name of the fencing file inside the store directory.
pub(crate) const EPOCHS_FILE: &str = "EPOCHS";

/// What `EPOCHS` says about the store's history.
#[derive(Debug, Default)]
pub(crate) struct History {
    pub(crate) records: Vec<EpochRecord>,
}

impl History {
    pub(crate) fn max_epoch(&self) -> Option<Epoch> {
        self.records
            .iter()
            .filter_map(|r| match r {
                EpochRecord::Claim { epoch, .. } => Some(Epoch::new(*epoch)),
                EpochRecord::Start { .. } => None,
            })
            .max()
    }

    pub(crate) fn last_generation(&self) -> Generation {
        self.records
            .iter()
            .map(|r| match r {
                EpochRecord::Claim { generation, .. } | EpochRecord::Start { generation, .. } => {
                    *generation
                }
            })
            .max()
            .unwrap_or_default()
    }

    /// The `Start` of the first generation after `g` that finished recovery: it tells how much of
    /// `g`'s segments counts. `None` if `g` was the last writer to start.
    pub(crate) fn successor_start(&self, g: Generation) -> Option<(Offset, Option<SegmentTail>)> {
        self.records.iter().find_map(|r| match *r {
            EpochRecord::Start {
                generation,
                start,
                tail,
            } if generation > g => Some((start, tail)),
            _ => None,
        })
    }
}

/// The open `EPOCHS` file of the current owner (a clone checks the same fence).
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    len: u64,
}

impl Fence {
    /// Opens (or creates) `EPOCHS`, cuts a torn last record, and reads the history.
    pub(crate) fn load(fs: &dyn Fs, dir: &Path) -> Result<(Fence, History), OpenError> {
        let path = dir.join(EPOCHS_FILE);
        let file = match fs.open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = fs.create_new(&path).map_err(open_io("create", &path))?;
                fs.sync_dir(dir).map_err(open_io("fsync directory", dir))?;
                f
            }
            Err(e) => return Err(open_io("open", &path)(e)),
        };
        let bytes = read_all(file.as_ref()).map_err(open_io("read", &path))?;
        let mut history = History::default();
        let mut pos = 0usize;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            match EpochRecord::decode(rest) {
                Ok(r) => history.records.push(r),
                // Only the last record can be torn: each is synced before the next is written.
                Err(_) if rest.len() < 2 * EPOCH_RECORD_LEN => {
                    tracing::warn!(file = %path.display(), at = pos, "cutting a torn epoch record");
                    file.set_len(pos as u64)
                        .map_err(open_io("truncate", &path))?;
                    file.sync_data().map_err(open_io("fdatasync", &path))?;
                    break;
                }
                Err(e) => {
                    return Err(OpenError::Corrupt {
                        file: path,
                        offset: pos as u64,
                        reason: e.to_string(),
                    })
                }
            }
            pos += EPOCH_RECORD_LEN;
        }
        let len = file.len().map_err(open_io("stat", &path))?;
        Ok((Fence { file, path, len }, history))
    }

    /// Appends one record and makes it durable.
    pub(crate) fn append(&mut self, record: EpochRecord) -> Result<(), OpenError> {
        let bytes = record.encode();
        self.file
            .write_all_at(&bytes, self.len)
            .map_err(open_io("write", &self.path))?;
        self.file
            .sync_data()
            .map_err(open_io("fdatasync", &self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// True while no newer opener has appended to `EPOCHS` since our own last record.
    /// An error reading the length counts as fenced (the caller poisons the store).
    pub(crate) fn still_current(&self) -> bool {
        matches!(self.file.len(), Ok(len) if len == self.len)
    }
}
