//! Append chains: one producer's appends, stored as a prefix of what it submitted.
//!
//! A producer (for a head: one connection or one link) submits appends in order and may have
//! several in flight, so they can land in different group commits. If batch k fails (ENOSPC)
//! and batch k+1 succeeds, the producer's second message is stored and its first is not; when
//! the producer resends both, the queue holds them out of order. A chain forbids that:
//!
//! - appends submitted with [`crate::Store::append_in`] and the same chain are stored as a
//!   prefix of the chain's submissions: once one of them fails (refused at submit, a batch that
//!   hit ENOSPC, a poisoned or fenced store), the chain is *broken* and every later append of it
//!   fails with [`AppendError::ChainBroken`] without being written;
//! - the writer thread breaks the chain of every append of a failed batch before it takes the
//!   next batch, and refuses the broken chain's requests of every later batch; `append_in`
//!   refuses at once when the chain is already broken, and breaks it on any immediate refusal;
//! - a broken chain stays broken: the producer starts over (a new connection, a new link) with
//!   a new chain, after resending what was not acknowledged.
//!
//! Prior art: Kafka's idempotent producer refuses a producer's batches out of sequence.

use std::sync::{Arc, OnceLock};

use crate::error::AppendError;

/// A producer's token: appends made with it are stored as a prefix of their submission order.
/// Cheap to clone; clones are the same chain.
#[derive(Debug, Clone, Default)]
pub struct AppendChain {
    broken: Arc<OnceLock<AppendError>>,
}

impl AppendChain {
    /// A new, unbroken chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// The failure that broke the chain, if one did.
    pub fn broken_by(&self) -> Option<&AppendError> {
        self.broken.get()
    }

    /// Whether an append of this chain has failed.
    pub fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }

    /// Records the chain's first failure; later ones change nothing.
    pub(crate) fn break_with(&self, cause: &AppendError) {
        if let AppendError::ChainBroken { .. } = cause {
            // Refusing a broken chain's request does not break it again.
            return;
        }
        if self.broken.set(cause.clone()).is_ok() {
            tracing::debug!(cause = %cause, "append chain broken: its later appends are refused");
        }
    }

    /// The error for a request of this chain once it is broken.
    pub(crate) fn refusal(&self) -> Option<AppendError> {
        self.broken.get().map(|cause| AppendError::ChainBroken {
            cause: Box::new(cause.clone()),
        })
    }
}
