//! How a store is opened: [`StoreOptions`] and the limits that go with them.

use crate::error::OpenError;
use crate::format::MAX_BATCH_PAYLOAD;
use crate::types::Epoch;

/// Default of [`StoreOptions::max_batch_bytes`]: 16 MiB, 64 times below the frame limit recovery
/// enforces, and enough to amortise an fdatasync over thousands of messages.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 16 << 20;

/// Most queues one message may be stored for.
pub const MAX_QUEUES_PER_MESSAGE: usize = 1024;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// This owner's fencing token; must be at least the highest that ever opened the directory.
    pub epoch: Epoch,
    /// Most bytes the message log may hold on disk. Appends beyond it fail with
    /// [`crate::AppendError::Full`]; checkpoints and a segment's bookkeeping may exceed it slightly, so
    /// that receivers can always make room.
    pub quota_bytes: u64,
    /// A segment file is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Largest message body accepted.
    pub max_message_bytes: usize,
    /// Most bytes of entries one group commit puts in its frame (a single request larger than
    /// this still gets a frame of its own). Appends waiting beyond it go into the next batch, so
    /// no stall of the disk can build a frame anywhere near the 1 GiB that recovery accepts.
    pub max_batch_bytes: u64,
    /// Size of the `RESERVE` file kept in the directory. When something fills the disk, the
    /// store deletes it so that checkpoints (which let retention free space) still fit; it is
    /// put back once there is room. 0 disables it.
    pub reserve_bytes: u64,
    /// Prepare the next segment in the background, filled with zeros, so that commits overwrite
    /// allocated space instead of growing the file (faster fdatasync on ext4 and xfs).
    pub preallocate: bool,
    /// Let a producer that waits for each append (one [`crate::AppendChain`] with nothing
    /// else outstanding, marked with [`crate::AppendChain::set_producer_waits`]) and finds the writer idle commit its append on its own thread,
    /// instead of waking the writer thread and being woken by it (two thread wake-ups per lone
    /// message). Only while the disk's last fdatasync took at most 2 ms, so a runtime worker is
    /// never held for a slow disk. Batches still go to disk one at a time, in submission order.
    /// Off by default: [`crate::Store::append`] may then block its caller for one write and
    /// fdatasync, which a caller that itself holds up the disk (a test stalling a sync) must not
    /// meet. The hub turns it on.
    pub commit_on_caller: bool,
    /// With [`StoreOptions::commit_on_caller`]: a producer commits its own append only while
    /// the newest group-commit fdatasync took at most this long (default 2 ms), so its thread
    /// (a runtime worker) is held for one quick sync, never for a slow or stalled disk's.
    pub caller_commit_max_sync: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            epoch: Epoch::new(0),
            quota_bytes: 4 << 30,
            segment_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            reserve_bytes: 1 << 20,
            preallocate: true,
            commit_on_caller: false,
            caller_commit_max_sync: std::time::Duration::from_millis(2),
        }
    }
}
impl StoreOptions {
    /// Refuses options the store cannot work with.
    pub(crate) fn validate(&self) -> Result<(), OpenError> {
        if self.segment_bytes < 4096 {
            return Err(OpenError::InvalidOptions(
                "segment_bytes must be at least 4096",
            ));
        }
        if self.max_message_bytes as u64 > u64::from(MAX_BATCH_PAYLOAD) / 2 {
            return Err(OpenError::InvalidOptions(
                "max_message_bytes must be below 512 MiB",
            ));
        }
        if self.max_batch_bytes == 0 || self.max_batch_bytes > u64::from(MAX_BATCH_PAYLOAD) / 4 {
            return Err(OpenError::InvalidOptions(
                "max_batch_bytes must be between 1 and 256 MiB",
            ));
        }
        Ok(())
    }
}
