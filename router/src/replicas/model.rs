//! The replica state machine against a model: random sequences of joins, leaves, crashes,
//! silences, appends, deliveries, acknowledgements (late, repeated and foreign ones included),
//! stray deliveries, ticks and count changes, driven the way the heads and workers will drive
//! it. After every step the model checks the contract (ARCHITECTURE.md, "Module replicas"):
//!
//! - at most one member may receive from a partition, and it is the partition's target; no
//!   partition is left unowned while a live member could take it;
//! - a delivery is granted only while every other delivery in flight of its partition is held
//!   by the same member under the same epoch (fencing);
//! - first deliveries of each partition are its stored offsets in order, none skipped (so per
//!   key, in order); abandoned offsets go again first, and only those (duplicates only there,
//!   each counted); a settled offset never goes again;
//! - a late, repeated or foreign acknowledgement and a refused delivery change nothing;
//! - checkpoints only move forward and only over settled offsets; every output agrees with
//!   the state it leaves;
//! - joins and leaves move only what rendezvous hashing moves; a displaced member was the
//!   most silent and silent long enough; a refused join found every member heard recently;
//! - at the end, with one member left to drain everything, every stored offset is settled and
//!   each checkpoint is the last offset of its partition: nothing lost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use store::Offset;

use super::assign::Slot;
use super::partition::PartitionId;
use super::spec::ReplicaCount;
use super::state::{
    Holder, JoinRefused, MemberId, Next, Output, PartitionEpoch, ReplicaConfig, Replicas,
};

/// The partitions messages are appended to (the default partition among them).
const PARTS: [u8; 5] = [0, 5, 17, 40, 63];

#[derive(Clone, Debug)]
enum Op {
    Join,
    Leave(usize),
    Crash(usize),
    Heard(usize),
    Append(usize),
    Deliver(usize, usize),
    Ack(usize),
    Tick(u64),
    SetCount(u8),
    Stray(u64, usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => any::<usize>().prop_map(Op::Crash),
        2 => any::<usize>().prop_map(Op::Heard),
        5 => (0..PARTS.len()).prop_map(Op::Append),
        7 => (any::<usize>(), any::<usize>()).prop_map(|(m, p)| Op::Deliver(m, p)),
        5 => any::<usize>().prop_map(Op::Ack),
        2 => (0u64..=12).prop_map(Op::Tick),
        1 => (1u8..=4).prop_map(Op::SetCount),
        3 => (any::<u64>(), 0..PARTS.len(), any::<usize>()).prop_map(|(m, p, o)| Op::Stray(m, p, o)),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    Settled,
    Abandoned,
}

#[derive(Clone, Debug)]
struct Delivery {
    member: MemberId,
    partition: PartitionId,
    epoch: PartitionEpoch,
    offset: Offset,
    state: State,
}

fn part(raw: u8) -> PartitionId {
    PartitionId::new(raw).unwrap()
}

fn count(n: u8) -> ReplicaCount {
    ReplicaCount::new(u64::from(n)).unwrap()
}

struct Model {
    r: Replicas,
    now: Duration,
    next_member: u64,
    next_offset: u64,
    store: BTreeMap<PartitionId, Vec<Offset>>,
    deliveries: Vec<Delivery>,
    /// First deliveries of each partition, in the order they were made.
    first: BTreeMap<PartitionId, Vec<Offset>>,
    settled: BTreeSet<(PartitionId, Offset)>,
    to_redeliver: BTreeSet<(PartitionId, Offset)>,
    abandoned: u64,
    redelivered: u64,
    checkpoints: BTreeMap<PartitionId, Offset>,
    last_heard: BTreeMap<MemberId, Duration>,
}

type Check = Result<(), TestCaseError>;

impl Model {
    fn new(initial: u8) -> Self {
        Model {
            r: Replicas::new(count(initial), ReplicaConfig::DEFAULT, |_| Offset::ZERO),
            now: Duration::ZERO,
            next_member: 0,
            next_offset: 1,
            store: PARTS.iter().map(|&p| (part(p), Vec::new())).collect(),
            deliveries: Vec::new(),
            first: BTreeMap::new(),
            settled: BTreeSet::new(),
            to_redeliver: BTreeSet::new(),
            abandoned: 0,
            redelivered: 0,
            checkpoints: BTreeMap::new(),
            last_heard: BTreeMap::new(),
        }
    }

    fn live_members(&self) -> Vec<(MemberId, Slot)> {
        let count = self.r.count().get();
        self.r
            .members()
            .into_iter()
            .filter(|(_, s)| s.get() < count)
            .collect()
    }

    fn targets(&self) -> Vec<Option<Slot>> {
        PartitionId::all().map(|p| self.r.target_slot(p)).collect()
    }

    fn silence(&self, member: MemberId) -> Duration {
        self.now
            .saturating_sub(self.last_heard.get(&member).copied().unwrap_or_default())
    }

    /// The offset the driver would deliver next for `next`.
    fn offset_for(&self, partition: PartitionId, next: Next) -> Option<Offset> {
        match next {
            Next::Redeliver(o) => Some(o),
            Next::After(h) => self.store.get(&partition)?.iter().copied().find(|o| *o > h),
        }
    }

    fn apply(&mut self, op: &Op) -> Check {
        match *op {
            Op::Join => self.join()?,
            Op::Leave(i) | Op::Crash(i) => {
                let members = self.r.members();
                if members.is_empty() {
                    return Ok(());
                }
                let (member, slot) = members[i % members.len()];
                let live = slot.get() < self.r.count().get();
                let before = self.targets();
                let outputs = if matches!(op, Op::Leave(_)) {
                    self.r.leave(member, self.now)
                } else {
                    self.r.crash(member, self.now)
                };
                let after = self.targets();
                for (b, a) in before.iter().zip(&after) {
                    // Only the leaver's partitions move (none if it was draining).
                    prop_assert!(b == a || (live && *b == Some(slot)), "{b:?} -> {a:?}");
                }
                prop_assert_eq!(self.r.slot_of(member), None);
                self.outputs(&outputs)?;
            }
            Op::Heard(i) => {
                let members = self.r.members();
                if let Some(&(member, _)) = members.get(i % members.len().max(1)) {
                    self.r.heard(member, self.now);
                    self.last_heard.insert(member, self.now);
                }
            }
            Op::Append(k) => {
                let offset = Offset::new(self.next_offset);
                self.next_offset += 1;
                self.store.entry(part(PARTS[k])).or_default().push(offset);
            }
            Op::Deliver(i, j) => {
                let members = self.r.members();
                if members.is_empty() {
                    return Ok(());
                }
                let member = members[i % members.len()].0;
                let mut candidates = Vec::new();
                for (p, _) in self.r.receivable(member) {
                    let next = self.r.next(member, p);
                    prop_assert!(next.is_ok(), "receivable but {next:?}");
                    if let Some(offset) = next.ok().and_then(|n| self.offset_for(p, n)) {
                        candidates.push((p, offset));
                    }
                }
                if let Some(&(p, offset)) = candidates.get(j % candidates.len().max(1)) {
                    self.deliver(member, p, offset)?;
                }
            }
            Op::Ack(j) => {
                if self.deliveries.is_empty() {
                    return Ok(());
                }
                let j = j % self.deliveries.len();
                self.ack(j)?;
            }
            Op::Tick(secs) => {
                self.now += Duration::from_secs(secs);
                let outputs = self.r.tick(self.now);
                self.outputs(&outputs)?;
            }
            Op::SetCount(n) => {
                let outputs = self.r.set_count(count(n), self.now);
                self.outputs(&outputs)?;
            }
            Op::Stray(m, k, pick) => {
                // Any member ever seen (or the next one), and an offset that matters: before
                // the first, delivered already, stored, or abandoned.
                let member = MemberId::new(m % (self.next_member + 1));
                let p = part(PARTS[k]);
                let mut offsets = vec![Offset::ZERO];
                offsets.extend(self.first.get(&p).into_iter().flatten());
                offsets.extend(&self.store[&p]);
                offsets.extend(
                    self.to_redeliver
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, o)| *o),
                );
                self.stray(member, p, offsets[pick % offsets.len()])?;
            }
        }
        self.check()
    }

    fn join(&mut self) -> Check {
        let member = MemberId::new(self.next_member);
        self.next_member += 1;
        let before = self.targets();
        let live = self.live_members();
        match self.r.join(member, self.now) {
            Ok(joined) => {
                self.last_heard.insert(member, self.now);
                let after = self.targets();
                match joined.displaced {
                    Some(victim) => {
                        let silence = self.silence(victim);
                        prop_assert!(silence >= ReplicaConfig::DEFAULT.displace_after);
                        for (other, _) in &live {
                            prop_assert!(self.silence(*other) <= silence);
                        }
                        // The newcomer took the victim's slot: no partition changes slot.
                        prop_assert_eq!(&before, &after);
                    }
                    None => {
                        for (b, a) in before.iter().zip(&after) {
                            prop_assert!(b == a || *a == Some(joined.slot), "{b:?} -> {a:?}");
                        }
                    }
                }
                self.outputs(&joined.outputs)?;
            }
            Err(JoinRefused::Full { .. }) => {
                prop_assert_eq!(live.len(), usize::from(self.r.count().get()));
                for (other, _) in &live {
                    prop_assert!(self.silence(*other) < ReplicaConfig::DEFAULT.displace_after);
                }
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
        Ok(())
    }

    fn deliver(&mut self, member: MemberId, p: PartitionId, offset: Offset) -> Check {
        let others: Vec<Delivery> = self
            .deliveries
            .iter()
            .filter(|d| d.partition == p && d.state == State::Live)
            .cloned()
            .collect();
        let epoch = self.r.deliver(member, p, offset);
        prop_assert!(epoch.is_ok(), "{epoch:?}");
        let epoch = epoch.map_err(|e| TestCaseError::fail(e.to_string()))?;
        for d in &others {
            // Fencing: nothing of another member, or of an older epoch, is still in flight.
            prop_assert_eq!(d.member, member);
            prop_assert_eq!(d.epoch, epoch);
        }
        prop_assert!(
            !self.settled.contains(&(p, offset)),
            "settled {offset} again"
        );
        let lowest_abandoned = self.to_redeliver.range((p, Offset::ZERO)..).next().copied();
        if self.to_redeliver.remove(&(p, offset)) {
            prop_assert_eq!(
                lowest_abandoned,
                Some((p, offset)),
                "not the lowest abandoned"
            );
            self.redelivered += 1;
        } else {
            prop_assert!(
                lowest_abandoned.is_none_or(|(q, _)| q != p),
                "a first delivery before the abandoned ones"
            );
            let first = self.first.entry(p).or_default();
            let last = first.last().copied().unwrap_or(Offset::ZERO);
            let expected = self.store[&p].iter().copied().find(|o| *o > last);
            prop_assert_eq!(Some(offset), expected, "first deliveries out of order");
            first.push(offset);
        }
        self.deliveries.push(Delivery {
            member,
            partition: p,
            epoch,
            offset,
            state: State::Live,
        });
        Ok(())
    }

    fn ack(&mut self, j: usize) -> Check {
        let d = self.deliveries[j].clone();
        let snapshot = self.r.clone();
        let result = self.r.ack(d.member, d.partition, d.epoch, d.offset);
        if d.state == State::Live {
            let outputs = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
            self.deliveries[j].state = State::Settled;
            self.settled.insert((d.partition, d.offset));
            self.outputs(&outputs)?;
        } else {
            prop_assert!(result.is_err(), "a {:?} delivery's ack counted", d.state);
            prop_assert!(self.r == snapshot, "a stale ack changed the machine");
        }
        Ok(())
    }

    /// A delivery the machine must refuse: by a member that may not receive from `p`, or by
    /// its owner out of order. Either way nothing changes.
    fn stray(&mut self, member: MemberId, p: PartitionId, offset: Offset) -> Check {
        if self.r.may_receive(member, p) {
            let lowest = self.to_redeliver.range((p, Offset::ZERO)..).next().copied();
            let allowed = match lowest {
                Some((q, o)) if q == p => offset == o,
                _ => {
                    let last = self.first.get(&p).and_then(|f| f.last().copied());
                    offset > last.unwrap_or(Offset::ZERO)
                }
            };
            if allowed {
                return Ok(());
            }
        }
        let snapshot = self.r.clone();
        let result = self.r.deliver(member, p, offset);
        prop_assert!(result.is_err(), "{member} got {offset} of {p}: {result:?}");
        prop_assert!(self.r == snapshot, "a refused delivery changed the machine");
        Ok(())
    }

    fn outputs(&mut self, outputs: &[Output]) -> Check {
        for out in outputs {
            match out {
                Output::Abandoned {
                    partition,
                    member,
                    offsets,
                    ..
                } => {
                    for &o in offsets {
                        let d = self.deliveries.iter_mut().find(|d| {
                            d.partition == *partition
                                && d.offset == o
                                && d.member == *member
                                && d.state == State::Live
                        });
                        prop_assert!(d.is_some(), "abandoned {o} of {partition}: not in flight");
                        if let Some(d) = d {
                            d.state = State::Abandoned;
                        }
                        self.abandoned += 1;
                        prop_assert!(self.to_redeliver.insert((*partition, o)));
                    }
                }
                Output::Checkpoint { partition, offset } => {
                    let last = self.checkpoints.get(partition).copied();
                    prop_assert!(*offset > last.unwrap_or(Offset::ZERO), "checkpoint back");
                    for o in self.store[partition].iter().filter(|o| *o <= offset) {
                        prop_assert!(self.settled.contains(&(*partition, *o)), "{o} unsettled");
                    }
                    self.checkpoints.insert(*partition, *offset);
                }
                Output::Disconnect { member, .. } => {
                    prop_assert_eq!(self.r.slot_of(*member), None);
                }
                Output::Granted {
                    partition,
                    member,
                    epoch,
                } => prop_assert_eq!(self.r.owner(*partition), Some((*member, *epoch))),
                Output::Revoked { partition, member } => {
                    prop_assert!(!self.r.may_receive(*member, *partition));
                }
            }
        }
        Ok(())
    }

    fn check(&self) -> Check {
        let members = self.r.members();
        let live = self.live_members();
        prop_assert!(live.len() <= usize::from(self.r.count().get()));
        for p in PartitionId::all() {
            let receivers = members
                .iter()
                .filter(|(m, _)| self.r.may_receive(*m, p))
                .count();
            prop_assert!(receivers <= 1, "{receivers} members may receive from {p}");
            if let Some((owner, _)) = self.r.owner(p) {
                prop_assert_eq!(Some(owner), self.r.target(p));
            }
            // Never left without an owner while there is a live member to take it.
            prop_assert!(
                live.is_empty() || self.r.holder(p) != Holder::Unowned,
                "{p} unowned"
            );
            let in_flight: Vec<&Delivery> = self
                .deliveries
                .iter()
                .filter(|d| d.partition == p && d.state == State::Live)
                .collect();
            prop_assert_eq!(self.r.in_flight(p), in_flight.len());
            for d in in_flight {
                let held = match self.r.holder(p) {
                    Holder::Owned(m) | Holder::Handoff { from: m, .. } => m == d.member,
                    Holder::Unowned => false,
                };
                prop_assert!(
                    held,
                    "{} holds {} of {p} without holding {p}",
                    d.member,
                    d.offset
                );
                prop_assert_eq!(d.epoch, self.r.epoch(p));
            }
            if let Holder::Handoff { deadline, .. } = self.r.holder(p) {
                prop_assert!(deadline > self.now, "a handoff past its deadline");
            }
            let checkpoint = self.checkpoints.get(&p).copied().unwrap_or(Offset::ZERO);
            prop_assert_eq!(self.r.checkpoint(p), checkpoint);
        }
        prop_assert_eq!(self.r.counters().abandoned, self.abandoned);
        prop_assert!(self.redelivered <= self.abandoned);
        Ok(())
    }

    /// Everyone goes, one fresh member drains every partition: nothing may be missing.
    fn drain(&mut self) -> Check {
        for (member, _) in self.r.members() {
            let outputs = self.r.crash(member, self.now);
            self.outputs(&outputs)?;
        }
        let outputs = self.r.set_count(count(1), self.now);
        self.outputs(&outputs)?;
        let last = MemberId::new(self.next_member);
        let joined = self.r.join(last, self.now);
        prop_assert!(joined.is_ok(), "{joined:?}");
        let joined = joined.map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.outputs(&joined.outputs)?;
        self.check()?;
        for raw in PARTS {
            let p = part(raw);
            while let Some(offset) = self
                .r
                .next(last, p)
                .ok()
                .and_then(|n| self.offset_for(p, n))
            {
                self.deliver(last, p, offset)?;
                let j = self.deliveries.len() - 1;
                self.ack(j)?;
                self.check()?;
            }
            let stored = &self.store[&p];
            for o in stored {
                prop_assert!(self.settled.contains(&(p, *o)), "{o} of {p} lost");
            }
            let end = stored.last().copied().unwrap_or(Offset::ZERO);
            prop_assert_eq!(self.r.checkpoint(p), end);
            prop_assert_eq!(self.first.get(&p).map_or(0, Vec::len), stored.len());
        }
        prop_assert!(self.to_redeliver.is_empty());
        prop_assert_eq!(self.redelivered, self.abandoned);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_machine_keeps_its_contract_against_the_model(
        initial in 1u8..=4,
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let mut model = Model::new(initial);
        for op in &ops {
            model.apply(op)?;
        }
        model.drain()?;
    }
}
