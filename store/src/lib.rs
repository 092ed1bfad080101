//! Durable, ordered message queues on disk for edgehub.
//!
//! The store is a segmented, append-only log in one directory, with many named queues over it.
//! It knows nothing of routes, endpoints or protocols: callers name queues and hand it bytes.
//!
//! # Guarantees
//! 1. An append completes only after its bytes are durable: fdatasync of the data file, and an
//!    fsync of the directory whenever a file was created or removed. Concurrent appends share one
//!    fdatasync (group commit), and complete in the order they were submitted.
//! 2. A queue yields its messages in append order, with strictly increasing offsets, from any
//!    offset after its checkpoint.
//! 3. A message appended for several queues is stored once.
//! 4. Checkpoints are durable, never ahead of durable data, and only move forward; reopening
//!    resumes exactly after each queue's checkpoint.
//! 5. Space held only by messages every referencing queue has checkpointed past, or that have
//!    expired, is reclaimed by deleting whole segment files; expired messages are skipped on read
//!    and counted.
//! 6. An append that would exceed the byte quota fails with [`AppendError::Full`] and touches
//!    nothing stored; so does one that meets ENOSPC. Appends succeed again once space is freed.
//! 7. Any other write or fsync error poisons the store: every later write fails until reopen.
//!    Nothing is ever kept only in memory. A panic of the writer thread poisons it too: every
//!    waiting and later request fails with the reason instead of waiting forever.
//! 8. `open` takes an [`Epoch`]; a lower epoch than the highest that opened the directory cannot
//!    open it, and a process whose epoch has been superseded fails its next commit and changes no
//!    file the newer owner uses (no retention, no prepared or reserve file of another owner).
//! 9. Recovery cuts a torn tail, verifies the CRC32C of everything it keeps, never panics on any
//!    file content, and reports corruption with file and byte. Frame checksums are keyed by a
//!    per-segment secret, so no message body can make a torn tail look like corruption.
//! 10. Appends made with one [`AppendChain`] are stored as a prefix of their submission order:
//!     once one fails, none submitted after it with that chain is stored.
//!
//! `DESIGN.md` beside this crate gives the on-disk format byte by byte and the crash argument.
//!
//! # Layout
//! - [`types`]: offsets, epochs, queue names, time;
//! - `format`: the bytes on disk (pure);
//! - `io`: the filesystem seam ([`Fs`], [`OsFs`]; `sim::SimFs` with the `test-util` feature);
//! - [`AppendChain`]: one producer's appends, stored as a prefix of what it submitted;
//! - `fence`: the `EPOCHS` file; `recovery`: open-time scan; [`StoreOptions`];
//! - `index`: what is durable, in memory (per queue one chunk per segment; a sealed segment's
//!   chunks can stay on disk in its `sidecar` index file and are loaded when a read reaches them);
//! - `sidecar`: the index file of a sealed segment (format, build, checks), derived data;
//! - `shared`: what the handles and the writer thread share (inbox, index, halt, counters);
//! - `writer`: group commit (it also starts itself on a new segment at open);
//! - `store`: the [`Store`] handle, which opens the store in phases and submits to `shared`.
//!
//! Dependencies run one way: `store` → `writer` → `shared` → `recovery`, `prealloc`, `fence`,
//! `index`, `options`, `chain` → `sidecar` → `format`, `io`, `error`, `types`; no module imports
//! one above it.

mod chain;
pub mod error;
mod fence;
mod format;
mod index;
pub mod io;
mod options;
mod prealloc;
mod recovery;
mod shared;
mod sidecar;
#[cfg(feature = "test-util")]
pub mod sim;
mod store;
pub mod types;
mod writer;

pub use chain::AppendChain;
pub use error::{
    AppendError, CheckpointError, CloseError, OpenError, ReadError, ReclaimError, StorageError,
};
pub use format::FormatError;
pub use io::{Fs, FsFile, OsFs};
pub use options::{StoreOptions, DEFAULT_MAX_BATCH_BYTES, MAX_QUEUES_PER_MESSAGE};
pub use recovery::RecoveryReport;
pub use shared::SYNC_LATENCY_BOUNDS_MICROS;
pub use store::{Closable, Pending, QueueStats, Store, StoreStats, StoredMessage, SyncLatency};
pub use types::{
    Clock, Epoch, InvalidQueueName, ManualClock, Offset, QueueName, SystemClock, UnixMillis,
};
