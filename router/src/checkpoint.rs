//! The `Checkpointer` of one queue: which offsets were handed out (proposed), which are done,
//! and how far the durable checkpoint may move (committed).
//!
//! edgeHub's rule (`checkpointers/Checkpointer.cs`): the checkpoint advances only over the
//! contiguous prefix of completed messages, so a failed message and everything after it are
//! resent in order. Offsets are strictly increasing but not contiguous within a queue, so the
//! in-flight offsets are kept as an ordered list rather than inferred from arithmetic.
//!
//! Invariants:
//! - `committed ≤ every in-flight offset`, and in-flight offsets strictly increase.
//! - [`Checkpointer::committable`] is the last offset of the longest completed prefix of the
//!   in-flight list: never past an incomplete message.
//! - After [`Checkpointer::rewind`], [`Checkpointer::resume_after`] is the end of that prefix:
//!   reading resumes at the first incomplete message, so no message is skipped.
//!
//! Pure: no I/O, no time. The endpoint worker calls the store and feeds the results back.

use std::collections::VecDeque;

use store::Offset;

/// Proposed versus committed for one queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpointer {
    committed: Offset,
    /// Handed out and not yet committed, in offset order, with "done" flags.
    in_flight: VecDeque<(Offset, bool)>,
}

/// A misuse of the checkpointer (a bug in its caller), refused without changing anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointerError {
    /// Offsets must be proposed in strictly increasing order, above the committed one.
    #[error("offset {offset} proposed after {last}")]
    NotIncreasing {
        /// The offset proposed.
        offset: Offset,
        /// The last proposed (or committed) offset.
        last: Offset,
    },
    /// The offset is not in flight.
    #[error("offset {0} is not in flight")]
    NotInFlight(Offset),
    /// A commit beyond the committable prefix.
    #[error("offset {0} is not committable")]
    NotCommittable(Offset),
}

impl Checkpointer {
    /// A queue whose durable checkpoint is `committed`.
    pub fn new(committed: Offset) -> Self {
        Checkpointer {
            committed,
            in_flight: VecDeque::new(),
        }
    }

    /// The durable checkpoint.
    pub fn committed(&self) -> Offset {
        self.committed
    }

    /// The highest offset handed out (the committed offset when none is in flight).
    pub fn proposed(&self) -> Offset {
        self.in_flight.back().map_or(self.committed, |&(o, _)| o)
    }

    /// Where the next read starts (exclusive): after everything handed out.
    pub fn resume_after(&self) -> Offset {
        self.proposed()
    }

    /// How many offsets are handed out and not committed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether `offset` still needs delivering (edgeHub `Admit`): above the checkpoint and not
    /// already done.
    pub fn admits(&self, offset: Offset) -> bool {
        offset > self.committed && !self.in_flight.iter().any(|&(o, done)| o == offset && done)
    }

    /// Records that `offset` was handed to the sink.
    pub fn propose(&mut self, offset: Offset) -> Result<(), CheckpointerError> {
        let last = self.proposed();
        if offset <= last {
            return Err(CheckpointerError::NotIncreasing { offset, last });
        }
        self.in_flight.push_back((offset, false));
        Ok(())
    }

    /// Records that `offset` needs nothing more (delivered, rejected, expired or set aside).
    pub fn complete(&mut self, offset: Offset) -> Result<(), CheckpointerError> {
        let i = self.position(offset)?;
        self.in_flight[i].1 = true;
        Ok(())
    }

    /// The offset the durable checkpoint may move to: the end of the completed prefix, if that
    /// is above the committed offset.
    pub fn committable(&self) -> Option<Offset> {
        self.in_flight
            .iter()
            .take_while(|&&(_, done)| done)
            .last()
            .map(|&(o, _)| o)
    }

    /// Records that the checkpoint `offset` is durable.
    pub fn commit(&mut self, offset: Offset) -> Result<(), CheckpointerError> {
        let done_prefix = self.in_flight.iter().take_while(|&&(_, done)| done).count();
        let i = self.position(offset)?;
        if i >= done_prefix {
            return Err(CheckpointerError::NotCommittable(offset));
        }
        self.in_flight.drain(..=i);
        self.committed = offset;
        Ok(())
    }

    /// Forgets everything from the first incomplete offset on (done or not), so those messages
    /// are read and sent again, in order. Returns how many were forgotten.
    pub fn rewind(&mut self) -> usize {
        let keep = self.in_flight.iter().take_while(|&&(_, done)| done).count();
        let forgotten = self.in_flight.len() - keep;
        self.in_flight.truncate(keep);
        forgotten
    }

    fn position(&self, offset: Offset) -> Result<usize, CheckpointerError> {
        self.in_flight
            .binary_search_by_key(&offset, |&(o, _)| o)
            .map_err(|_| CheckpointerError::NotInFlight(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(n: u64) -> Offset {
        Offset::new(n)
    }

    fn proposed(offsets: &[u64]) -> Checkpointer {
        let mut c = Checkpointer::new(o(0));
        for &n in offsets {
            c.propose(o(n)).unwrap();
        }
        c
    }

    #[test]
    fn nothing_is_committable_until_the_first_message_completes() {
        let mut c = proposed(&[3, 7, 9]);
        c.complete(o(7)).unwrap();
        c.complete(o(9)).unwrap();
        assert_eq!(c.committable(), None);
        c.complete(o(3)).unwrap();
        assert_eq!(c.committable(), Some(o(9)));
    }

    #[test]
    fn the_checkpoint_stops_before_the_first_incomplete_offset() {
        let mut c = proposed(&[3, 7, 9, 12]);
        for n in [3, 7, 12] {
            c.complete(o(n)).unwrap();
        }
        assert_eq!(c.committable(), Some(o(7)));
    }

    #[test]
    fn committing_drops_the_prefix_and_keeps_the_rest() {
        let mut c = proposed(&[3, 7, 9]);
        c.complete(o(3)).unwrap();
        c.complete(o(7)).unwrap();
        c.commit(o(7)).unwrap();
        assert_eq!(c.committed(), o(7));
        assert_eq!(c.in_flight(), 1);
        assert_eq!(c.proposed(), o(9));
    }

    #[test]
    fn committing_an_incomplete_offset_is_refused() {
        let mut c = proposed(&[3, 7]);
        c.complete(o(7)).unwrap();
        assert_eq!(c.commit(o(7)), Err(CheckpointerError::NotCommittable(o(7))));
        assert_eq!(c.committed(), o(0));
    }

    #[test]
    fn offsets_must_be_proposed_in_increasing_order() {
        let mut c = proposed(&[5]);
        assert_eq!(
            c.propose(o(5)),
            Err(CheckpointerError::NotIncreasing {
                offset: o(5),
                last: o(5)
            })
        );
        let mut fresh = Checkpointer::new(o(10));
        assert!(fresh.propose(o(10)).is_err());
        assert!(fresh.propose(o(11)).is_ok());
    }

    #[test]
    fn completing_an_unknown_offset_is_refused() {
        let mut c = proposed(&[5]);
        assert_eq!(c.complete(o(6)), Err(CheckpointerError::NotInFlight(o(6))));
    }

    #[test]
    fn rewinding_resends_from_the_first_incomplete_message_even_if_later_ones_succeeded() {
        let mut c = proposed(&[3, 7, 9, 12]);
        c.complete(o(3)).unwrap();
        c.complete(o(9)).unwrap();
        assert_eq!(c.rewind(), 3);
        assert_eq!(c.resume_after(), o(3));
        assert!(c.admits(o(9)));
        c.commit(o(3)).unwrap();
        assert_eq!(c.resume_after(), o(3));
    }

    #[test]
    fn a_done_or_committed_offset_is_not_admitted_again() {
        let mut c = Checkpointer::new(o(4));
        assert!(!c.admits(o(4)));
        c.propose(o(6)).unwrap();
        c.complete(o(6)).unwrap();
        assert!(!c.admits(o(6)));
        assert!(c.admits(o(8)));
    }

    proptest! {
        /// Against a model: whatever completes in whatever order, the committable offset is the
        /// last of the longest completed prefix, and commit + rewind never skip an offset.
        #[test]
        fn the_committable_offset_matches_a_model(
            gaps in proptest::collection::vec(1u64..5, 1..20),
            done in proptest::collection::vec(any::<bool>(), 20),
        ) {
            let offsets: Vec<u64> = gaps.iter().scan(0, |s, g| { *s += g; Some(*s) }).collect();
            let mut c = proposed(&offsets);
            for (n, d) in offsets.iter().zip(&done) {
                if *d { c.complete(o(*n)).unwrap(); }
            }
            let prefix = offsets.iter().zip(&done).take_while(|(_, d)| **d).count();
            let expected = prefix.checked_sub(1).map(|i| o(offsets[i]));
            prop_assert_eq!(c.committable(), expected);
            if let Some(at) = expected { c.commit(at).unwrap(); }
            c.rewind();
            let resume = expected.unwrap_or(o(0));
            prop_assert_eq!(c.resume_after(), resume);
            let first_undone = offsets.get(prefix).copied();
            if let Some(n) = first_undone { prop_assert!(c.admits(o(n))); }
        }
    }
}
