//! Which member's slot owns which partition: rendezvous (highest random weight) hashing.
//!
//! A member sits in a [`Slot`] (`0..`[`ReplicaCount::MAX`]); the target of a partition is the
//! occupied slot with the highest [`score`] for it, ties to the lowest slot. Because each
//! partition's choice depends only on its own scores, a slot joining takes exactly the
//! partitions it now scores highest on and a slot leaving gives up exactly its own: nothing
//! else moves. Assigning slots rather than connections means a replica that takes over a dead
//! one's slot takes over exactly its partitions.
//!
//! Pure and fixed like the partition hash: [`score`] = `fmix64(fnv1a64([slot, partition]))`.

use std::fmt;

use crate::replicas::partition::{fmix64, fnv1a64, PartitionId, PARTITIONS};
use crate::replicas::spec::ReplicaCount;

/// A member's place: `0..ReplicaCount::MAX`. A newcomer takes the lowest free slot below the
/// declared count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u8);

impl Slot {
    /// A slot, if `raw < ReplicaCount::MAX`.
    pub const fn new(raw: u8) -> Option<Self> {
        if raw < ReplicaCount::MAX {
            Some(Slot(raw))
        } else {
            None
        }
    }

    /// The number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The slots below `count`, lowest first.
    pub fn below(count: ReplicaCount) -> impl Iterator<Item = Slot> {
        (0..count.get()).map(Slot)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How much `slot` wants `partition`.
pub const fn score(slot: Slot, partition: PartitionId) -> u64 {
    fmix64(fnv1a64(&[slot.get(), partition.get()]))
}

/// The slot that should own `partition` among `slots` (`None` without any).
pub fn target(slots: impl IntoIterator<Item = Slot>, partition: PartitionId) -> Option<Slot> {
    slots
        .into_iter()
        .max_by_key(|&slot| (score(slot, partition), std::cmp::Reverse(slot)))
}

/// The target of every partition, by [`PartitionId::index`].
pub fn assign(slots: &[Slot]) -> Vec<Option<Slot>> {
    PartitionId::all()
        .map(|p| target(slots.iter().copied(), p))
        .collect()
}

/// How many partitions each of `slots` is the target of, in the order of `slots`.
pub fn loads(slots: &[Slot]) -> Vec<usize> {
    let assignment = assign(slots);
    slots
        .iter()
        .map(|s| assignment.iter().filter(|t| **t == Some(*s)).count())
        .collect()
}

/// The number of partitions, as a `usize` for load arithmetic.
pub const PARTITION_COUNT: usize = PARTITIONS as usize;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(n: u8) -> Slot {
        Slot::new(n).unwrap()
    }

    fn p(n: u8) -> PartitionId {
        PartitionId::new(n).unwrap()
    }

    /// Computed outside this code from the documented algorithm (with the partition pins).
    #[test]
    fn scores_are_pinned() {
        assert_eq!(score(slot(0), p(0)), 0xdb01_c310_4e99_566d);
        assert_eq!(score(slot(15), p(63)), 0xa676_3db2_0493_522e);
    }

    #[test]
    fn no_slot_no_target_and_one_slot_takes_everything() {
        assert!(assign(&[]).iter().all(Option::is_none));
        assert!(assign(&[slot(5)]).iter().all(|t| *t == Some(slot(5))));
        assert_eq!(Slot::new(16), None);
    }

    /// Every set of up to 8 occupied slots out of 16, by bit mask.
    fn layouts() -> impl Iterator<Item = Vec<Slot>> {
        (1u32..1 << 16)
            .filter(|m| m.count_ones() <= 8)
            .map(|m| (0..16).filter(|i| m & (1 << i) != 0).map(slot).collect())
    }

    /// The spread the docs promise, for every layout (computed, not sampled). Loads are
    /// compared to the fair share 64/n in hundredths: `load * n * 100` against `share% * 64`.
    #[test]
    fn partitions_spread_within_the_documented_bounds() {
        for n in 1..=8u8 {
            let slots: Vec<Slot> = (0..n).map(slot).collect();
            for load in loads(&slots) {
                let scaled = load * usize::from(n) * 100;
                assert!(
                    (60 * PARTITION_COUNT..=125 * PARTITION_COUNT).contains(&scaled),
                    "slots 0..{n}: a load of {load}"
                );
            }
        }
        let mut checked = 0;
        for slots in layouts() {
            let n = slots.len();
            for load in loads(&slots) {
                assert!(
                    load * n * 100 <= 225 * PARTITION_COUNT,
                    "{slots:?}: a load of {load}"
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 39_202);
    }

    fn slot_set(sizes: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<Slot>> {
        proptest::collection::btree_set(0u8..16, sizes)
            .prop_map(|s| s.into_iter().map(slot).collect())
    }

    proptest! {
        /// A slot joining takes only partitions it becomes the target of; everything else
        /// stays where it was.
        #[test]
        fn a_join_moves_only_partitions_to_the_newcomer(
            slots in slot_set(0..=15),
            i in any::<prop::sample::Index>(),
        ) {
            let free: Vec<Slot> = (0..16).map(slot).filter(|s| !slots.contains(s)).collect();
            let new = free[i.index(free.len())];
            let before = assign(&slots);
            let mut with = slots.clone();
            with.push(new);
            let after = assign(&with);
            for (b, a) in before.iter().zip(&after) {
                prop_assert!(b == a || *a == Some(new), "{b:?} -> {a:?}");
            }
        }

        /// A slot leaving gives up only its own partitions.
        #[test]
        fn a_leave_moves_only_the_leavers_partitions(
            slots in slot_set(1..=16),
            i in any::<prop::sample::Index>(),
        ) {
            let gone = slots[i.index(slots.len())];
            let before = assign(&slots);
            let rest: Vec<Slot> = slots.iter().copied().filter(|s| *s != gone).collect();
            let after = assign(&rest);
            for (b, a) in before.iter().zip(&after) {
                prop_assert!(b == a || *b == Some(gone), "{b:?} -> {a:?}");
            }
        }
    }
}
