//! Typed errors, one enum per operation, each variant named for what the caller can do about it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::types::{Epoch, Offset, QueueName};

/// Opening (and recovering) a store failed. Nothing was acknowledged by this open, and nothing
/// previously acknowledged was modified, except a torn tail that was never acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The filesystem refused an operation.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A file holds bytes that cannot be a crash's leftovers: acknowledged data may be damaged,
    /// so the store refuses to guess. Restore the file or move it aside, then open again.
    #[error("corrupt store file {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte position of the first damaged structure.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A newer owner has opened this directory; this process must not write to it.
    #[error("epoch {requested} is older than epoch {current}, which already opened this store")]
    EpochFenced {
        /// The epoch this open asked for.
        requested: Epoch,
        /// The highest epoch that has opened the store.
        current: Epoch,
    },
    /// The options cannot work.
    #[error("invalid store options: {0}")]
    InvalidOptions(&'static str),
}

/// Maps an I/O error of `op` on `path` to [`OpenError::Io`].
pub(crate) fn open_io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(io::Error) -> OpenError {
    let path = path.to_owned();
    move |source| OpenError::Io { op, path, source }
}

/// Why the store as a whole refuses a write, whatever the request: the one cause that
/// [`AppendError`], [`CheckpointError`] and [`ReclaimError`] share (as redb's `StorageError`).
/// `Poisoned` and `Fenced` are final until the store is reopened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// An earlier write or fsync failed (or the writer thread panicked); the store refuses all
    /// writes until it is reopened.
    #[error("store poisoned by an earlier failure ({0}); reopen it")]
    Poisoned(Arc<str>),
    /// A newer epoch opened this store; this process must stop writing.
    #[error("store fenced: a newer owner opened it")]
    Fenced,
    /// The store was closed.
    #[error("store closed")]
    Closed,
}

/// An append was refused. Nothing already stored was touched. For every variant but
/// [`StorageError::Poisoned`] and [`StorageError::Fenced`], nothing of the append was stored
/// either. For those two the outcome is unknown:
/// the batch may have reached the disk before its fdatasync failed (or before a newer owner was
/// noticed), so it may be delivered later; a producer that resends causes a duplicate, never a
/// loss or a reorder.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The byte quota (or the disk itself) has no room for this message. Retry after the
    /// receivers have caught up and space was reclaimed.
    #[error("store full: {needed} more bytes would exceed the quota ({used} of {quota} used)")]
    Full {
        /// Bytes this append needs.
        needed: u64,
        /// Bytes on disk or reserved now.
        used: u64,
        /// The configured quota (or the bytes that fit on the disk, on ENOSPC).
        quota: u64,
    },
    /// The message is larger than the configured maximum.
    #[error("message of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A message must name between 1 and `MAX_QUEUES_PER_MESSAGE` queues, each once.
    #[error("a message must name 1..={max} distinct queues, got {count}")]
    BadQueueList {
        /// Queues named.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The store as a whole refuses writes: poisoned, fenced or closed (see [`StorageError`]).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An earlier append of the same [`crate::AppendChain`] failed, so this one was not stored
    /// (storing it could put it ahead of the earlier one's resend).
    #[error("not stored: an earlier append of this producer failed ({cause})")]
    ChainBroken {
        /// Why the earlier append failed.
        #[source]
        cause: Box<AppendError>,
    },
}

/// A checkpoint was refused. Except for a poisoned or fenced store (outcome unknown, as for
/// [`AppendError`]), the queue's durable checkpoint is unchanged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckpointError {
    /// No message was ever appended to this queue.
    #[error("unknown queue {0}")]
    UnknownQueue(QueueName),
    /// The checkpoint would pass the queue's last durable message.
    #[error("checkpoint {requested} of queue {queue} is past its last message {last}")]
    AheadOfData {
        /// The queue.
        queue: QueueName,
        /// The checkpoint asked for.
        requested: Offset,
        /// The queue's last durable offset.
        last: Offset,
    },
    /// The disk has no room even for the checkpoint record.
    #[error("no space on the store's disk for a checkpoint")]
    NoSpace,
    /// The store as a whole refuses writes: poisoned, fenced or closed (see [`StorageError`]).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Retention could not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReclaimError {
    /// The store as a whole refuses writes: poisoned, fenced or closed (see [`StorageError`]).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Reading a queue failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The filesystem refused a read.
    #[error("read {path}: {source}")]
    Io {
        /// The segment file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The writer thread panicked; the index may be inconsistent, so nothing is read until the
    /// store is reopened.
    #[error("store poisoned by an earlier failure ({0}); reopen it")]
    Poisoned(Arc<str>),
    /// A stored message failed its checksum.
    #[error("corrupt message in {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte position of the message entry.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Closing the store failed to stop its writer cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// The writer thread panicked (a bug); nothing unacknowledged was acknowledged.
    #[error("the store's writer thread panicked")]
    WriterPanicked,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages are the ones each error enum printed when it had its own copy of these
    /// variants: operators and logs see no change.
    #[test]
    fn the_shared_cause_prints_as_the_copies_did() {
        let poisoned = StorageError::Poisoned("fdatasync: EIO".into());
        let expected = [
            (
                poisoned,
                "store poisoned by an earlier failure (fdatasync: EIO); reopen it",
            ),
            (
                StorageError::Fenced,
                "store fenced: a newer owner opened it",
            ),
            (StorageError::Closed, "store closed"),
        ];
        for (cause, text) in expected {
            assert_eq!(AppendError::from(cause.clone()).to_string(), text);
            assert_eq!(CheckpointError::from(cause.clone()).to_string(), text);
            assert_eq!(ReclaimError::from(cause.clone()).to_string(), text);
            let chained = AppendError::ChainBroken {
                cause: Box::new(cause.into()),
            };
            assert_eq!(
                chained.to_string(),
                format!("not stored: an earlier append of this producer failed ({text})")
            );
        }
    }
}
