//! Newtypes for the store's vocabulary: offsets, epochs, generations, queue names and time.
//!
//! Invariants: an [`Offset`] is assigned once by the store, strictly increasing across the whole
//! store (so also within every queue) and never reused, even after a crash; [`Offset::ZERO`] is
//! "before the first message" and is never assigned. A [`QueueName`] is 1..=255 bytes of UTF-8.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Position of a message in the store. Every queue that references a message sees it at the same
/// offset; offsets of one queue strictly increase but need not be contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(u64);

impl Offset {
    /// "Before the first message": the checkpoint of a queue nothing was delivered from.
    pub const ZERO: Offset = Offset(0);

    /// Wraps a raw offset (as read back from a checkpoint a caller kept elsewhere).
    pub const fn new(raw: u64) -> Self {
        Offset(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The offset after this one.
    pub(crate) const fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Fencing token of the process that owns the store (for example a Kubernetes lease counter).
/// Opening with an epoch lower than the highest that ever opened the directory fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(u64);

impl Epoch {
    /// Wraps a raw epoch.
    pub const fn new(raw: u64) -> Self {
        Epoch(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How many times the directory has been opened for writing (internal: names segment files and
/// tells which writer produced them; see DESIGN.md "Fencing").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Generation(pub(crate) u64);

/// Wall-clock instant in milliseconds since the Unix epoch (message expiry, creation time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// This instant plus `ms` milliseconds, saturating.
    pub fn plus_millis(self, ms: u64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(ms))
    }
}

/// Source of "now" for TTL decisions, injected so tests control time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> UnixMillis;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: UnixMillis) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(start.0))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Name of a queue, chosen by the caller (the router uses one per endpoint and priority).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueName(Arc<str>);

/// Longest queue name in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 255;

/// A queue name that is empty or longer than [`MAX_QUEUE_NAME_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue name must be 1..={MAX_QUEUE_NAME_BYTES} bytes, got {len}")]
pub struct InvalidQueueName {
    /// Length of the rejected name in bytes.
    pub len: usize,
}

impl QueueName {
    /// Validates and wraps a queue name.
    pub fn new(name: &str) -> Result<Self, InvalidQueueName> {
        if name.is_empty() || name.len() > MAX_QUEUE_NAME_BYTES {
            return Err(InvalidQueueName { len: name.len() });
        }
        Ok(QueueName(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
