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
//! - each append takes the next position on its chain; the chain remembers its earliest failed
//!   position. The writer thread records the failure of every append of a failed batch before
//!   it takes the next batch, and refuses unwritten every request at a later position than a
//!   failure; `append_in` refuses at once when the chain is already broken, and records any
//!   immediate refusal (an append submitted before it and not yet written is still written);
//! - a broken chain stays broken: the producer starts over (a new connection, a new link) with
//!   a new chain, after resending what was not acknowledged.
//!
//! Prior art: Kafka's idempotent producer refuses a producer's batches out of sequence.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::AppendError;

/// A producer's token: appends made with it are stored as a prefix of their submission order.
/// Cheap to clone; clones are the same chain. One producer submits on it in order (from one
/// task or thread at a time).
#[derive(Debug, Clone, Default)]
pub struct AppendChain {
    state: Arc<Mutex<ChainState>>,
}

#[derive(Debug, Default)]
struct ChainState {
    /// Position of the next append submitted on the chain.
    next: u64,
    /// The earliest failed append: its position and why it failed.
    broken: Option<(u64, AppendError)>,
    /// Appends submitted and not yet answered (their [`Position`]s still exist).
    outstanding: u64,
    /// The producer says it sends nothing more until its newest append is acknowledged
    /// ([`AppendChain::set_producer_waits`]).
    producer_waits: bool,
}

/// An append's place on its chain, carried by its request. The chain counts the append as
/// outstanding until the request is answered or dropped, so the store can tell a producer that
/// waits for each append (nothing else outstanding) from one that pipelines.
#[derive(Debug)]
pub(crate) struct Position {
    chain: AppendChain,
    at: u64,
}

impl Position {
    pub(crate) fn chain(&self) -> &AppendChain {
        &self.chain
    }

    pub(crate) fn at(&self) -> u64 {
        self.at
    }

    /// Whether this is the only append of its chain not yet answered, and its producer says it
    /// waits for it before sending more.
    pub(crate) fn is_alone(&self) -> bool {
        let state = self.chain.lock();
        state.outstanding == 1 && state.producer_waits
    }
}

impl Drop for Position {
    fn drop(&mut self) {
        let mut state = self.chain.lock();
        state.outstanding = state.outstanding.saturating_sub(1);
    }
}

impl AppendChain {
    /// A new, unbroken chain.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, ChainState> {
        // Nothing can panic while the lock is held; the state is consistent either way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failure that broke the chain (its earliest failed append's), if one did.
    pub fn broken_by(&self) -> Option<AppendError> {
        self.lock().broken.as_ref().map(|(_, cause)| cause.clone())
    }

    /// Whether an append of this chain has failed.
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    /// Tells the store, before an append, whether the producer sends nothing more until that
    /// append is acknowledged to it: everything it sent before is acknowledged already (an MQTT
    /// connection with no other PUBACK owed, an AMQP link with nothing else unsettled). Only
    /// such an append may be committed on the caller's thread
    /// ([`crate::StoreOptions::commit_on_caller`]); a pipelining producer's appends are left to
    /// the writer thread, which groups them. Default: `false`.
    pub fn set_producer_waits(&self, waits: bool) {
        self.lock().producer_waits = waits;
    }

    /// Takes the position of a new append, or refuses it if the chain is already broken.
    pub(crate) fn take_position(&self) -> Result<Position, AppendError> {
        let mut state = self.lock();
        if let Some((_, cause)) = &state.broken {
            return Err(broken(cause));
        }
        let at = state.next;
        state.next += 1;
        state.outstanding += 1;
        Ok(Position {
            chain: self.clone(),
            at,
        })
    }

    /// Records that the append at `position` failed; the earliest failure is kept.
    pub(crate) fn break_at(&self, position: u64, cause: &AppendError) {
        if let AppendError::ChainBroken { .. } = cause {
            // Refusing a broken chain's request does not break it again.
            return;
        }
        let mut state = self.lock();
        if state.broken.as_ref().is_some_and(|(at, _)| *at <= position) {
            return;
        }
        tracing::debug!(position, cause = %cause, "append chain broken: its later appends are refused");
        state.broken = Some((position, cause.clone()));
    }

    /// The error for the append at `position` if an earlier one of the chain failed.
    pub(crate) fn refusal_for(&self, position: u64) -> Option<AppendError> {
        match &self.lock().broken {
            Some((at, cause)) if *at < position => Some(broken(cause)),
            _ => None,
        }
    }
}

fn broken(cause: &AppendError) -> AppendError {
    AppendError::ChainBroken {
        cause: Box::new(cause.clone()),
    }
}
