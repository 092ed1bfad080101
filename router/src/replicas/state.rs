//! The membership, assignment and handoff state machine of one replicated module input, as
//! pure data: events in, [`Output`]s and answers out, no I/O and no clock (every event that
//! needs the time is given `now`, a monotonic [`Duration`] since an origin the driver picks).
//!
//! The driver (`crate::replica_worker`, fed by the MQTT head) reports what happens —
//! [`Replicas::join`], [`Replicas::heard`], [`Replicas::leave`], [`Replicas::crash`],
//! [`Replicas::set_count`], [`Replicas::deliver`] (the deliver request), [`Replicas::ack`],
//! [`Replicas::tick`] — and performs the outputs: start or stop reading a partition for a
//! member, persist a checkpoint, close a connection, count abandoned deliveries.
//!
//! ```text
//!               target appears: Granted(epoch+1)
//!   Unowned ───────────────────────────────────────▶ Owned{A, e}
//!      ▲ A gone, no target                             │ target becomes B, A still a member:
//!      └───────────────────────────────────────────────┤ Revoked(A); nothing of A in flight
//!                                                      │ ─▶ Owned{B, e+1} at once, else
//!                                                      ▼
//!   Owned{A, e} ◀── target back to A ── Handoff{A ⇒ target, deadline}
//!                                         ├─ A's last delivery settled ───────▶ Owned{B, e+1}
//!                                         ├─ tick ≥ deadline: A's abandoned ──▶ Owned{B, e+1}
//!                                         └─ A gone: A's abandoned ───────────▶ Owned{B, e+1}
//!   Owned{A, e} ── A gone (leave, crash, displaced): A's abandoned ──▶ Owned{target, e+1} / Unowned
//! ```
//!
//! Invariants (checked against a model by the property test below):
//! - A partition is delivered only to the member it is `Owned` by: at most one member may
//!   receive from it, and none while it is in a handoff.
//! - Every delivery in flight of a partition belongs to its holder (the owner, or the old owner
//!   of a handoff) under the partition's current epoch; a new owner gets nothing until there
//!   is none left (settled, or abandoned because its member is gone or the deadline passed).
//! - An acknowledgement changes anything only if it names a delivery in flight with its member
//!   and epoch; any other (late, repeated, foreign) changes nothing at all.
//! - First deliveries of a partition are strictly increasing offsets, whoever the owner;
//!   abandoned offsets go again first, lowest first; a settled offset is never handed out again.
//! - The checkpoint only moves forward, and only over settled offsets.
//! - Targets are [`assign::target`] over the slots of live members (below the count): joins
//!   and leaves move only what rendezvous hashing moves.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use store::Offset;
use thiserror::Error;

use crate::replicas::assign::{self, Slot};
use crate::replicas::partition::PartitionId;
use crate::replicas::spec::ReplicaCount;

/// One connection admitted to the membership, as the head numbers its connections. Never
/// reused: a reconnecting replica is a new member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(u64);

impl MemberId {
    /// Wraps the head's connection number.
    pub const fn new(raw: u64) -> Self {
        MemberId(raw)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "member {}", self.0)
    }
}

/// How many times a partition got a new owner. A delivery carries the epoch it was made
/// under, and its acknowledgement must bring it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PartitionEpoch(u64);

impl PartitionEpoch {
    /// Wraps a raw epoch.
    pub const fn new(raw: u64) -> Self {
        PartitionEpoch(raw)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    const fn next(self) -> Self {
        PartitionEpoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for PartitionEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The machine's times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// How long a live old owner may keep a partition in a handoff before its deliveries in
    /// flight are abandoned and the new owner gets them again.
    pub handoff_deadline: Duration,
    /// How long a member must have been silent (nothing heard from it) for a newcomer at the
    /// declared count to displace it.
    pub displace_after: Duration,
}

impl ReplicaConfig {
    /// The documented defaults: 10 s each.
    pub const DEFAULT: ReplicaConfig = ReplicaConfig {
        handoff_deadline: Duration::from_secs(10),
        displace_after: Duration::from_secs(10),
    };
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why deliveries in flight were abandoned (they go again, to the next owner).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbandonReason {
    /// The member's connection closed cleanly with them unacknowledged.
    Left,
    /// The member's connection failed.
    Crashed,
    /// A newcomer displaced the member.
    Displaced,
    /// The old owner did not settle them before the handoff deadline.
    HandoffTimedOut,
}

/// Why the driver must close a member's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// It was silent and a newcomer took its slot.
    Displaced,
    /// The count was lowered below its slot and it has settled everything.
    ScaledDown,
}

/// What the driver must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// `member` may now receive from `partition`, tagging each delivery with `epoch`.
    Granted {
        /// The partition.
        partition: PartitionId,
        /// Its owner.
        member: MemberId,
        /// The epoch its deliveries carry.
        epoch: PartitionEpoch,
    },
    /// `member` must send nothing more from `partition` (its acknowledgements still count
    /// until its deliveries are settled or abandoned).
    Revoked {
        /// The partition.
        partition: PartitionId,
        /// Its previous owner.
        member: MemberId,
    },
    /// Deliveries in flight that will be delivered again: possible duplicates, counted.
    Abandoned {
        /// The partition.
        partition: PartitionId,
        /// The member that held them.
        member: MemberId,
        /// Their offsets, lowest first.
        offsets: Vec<Offset>,
        /// Why.
        reason: AbandonReason,
    },
    /// Every delivery of `partition` up to `offset` is settled: persist it.
    Checkpoint {
        /// The partition.
        partition: PartitionId,
        /// The new checkpoint.
        offset: Offset,
    },
    /// Close this member's connection.
    Disconnect {
        /// The member.
        member: MemberId,
        /// Why.
        reason: DisconnectReason,
    },
}

/// A join that was admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The newcomer's slot.
    pub slot: Slot,
    /// The silent member it displaced, if any (also in `outputs` as a `Disconnect`).
    pub displaced: Option<MemberId>,
    /// What to do now.
    pub outputs: Vec<Output>,
}

/// Why a join is refused (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum JoinRefused {
    /// The member is already one (a driver bug).
    #[error("{0} is already a member")]
    AlreadyMember(MemberId),
    /// The declared count is reached and every member was heard from recently.
    #[error(
        "the module has its {count} replicas connected, each heard from within \
         {displace_after:?} (the most silent for {most_silent:?}): connection refused"
    )]
    Full {
        /// The declared count.
        count: ReplicaCount,
        /// How long a member must be silent to be displaced.
        displace_after: Duration,
        /// The longest silence among the members.
        most_silent: Duration,
    },
}

/// What the driver should deliver next from a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// This abandoned offset, again.
    Redeliver(Offset),
    /// The first stored offset of the partition after this one.
    After(Offset),
}

/// Why a delivery is refused (nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DeliverRefused {
    /// Not a member (gone, displaced, never joined).
    #[error("{0} is not a member")]
    NotMember(MemberId),
    /// Another member owns the partition, or nobody does.
    #[error("{member} does not own partition {partition}")]
    NotOwner {
        /// The member.
        member: MemberId,
        /// The partition.
        partition: PartitionId,
    },
    /// The member is the partition's target but the old owner has not settled yet.
    #[error("partition {partition} is being handed to {member}: fenced until {until:?}")]
    Fenced {
        /// The member.
        member: MemberId,
        /// The partition.
        partition: PartitionId,
        /// The handoff's deadline.
        until: Duration,
    },
    /// Not the offset the partition's order allows.
    #[error("offset {offset} of partition {partition} is out of order (next: {expected:?})")]
    OutOfOrder {
        /// The partition.
        partition: PartitionId,
        /// The offset refused.
        offset: Offset,
        /// What is allowed.
        expected: Next,
    },
}

/// An acknowledgement that names no delivery in flight with that member and epoch: late
/// (after a handoff or an abandonment), repeated, or foreign. It changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("stale acknowledgement from {member} for offset {offset} of partition {partition} at epoch {epoch}")]
pub struct StaleAck {
    /// The member.
    pub member: MemberId,
    /// The partition.
    pub partition: PartitionId,
    /// The epoch it carried.
    pub epoch: PartitionEpoch,
    /// The offset.
    pub offset: Offset,
}

/// Running totals for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Deliveries abandoned, each to be delivered again: possible duplicates.
    pub abandoned: u64,
    /// Members displaced by a newcomer.
    pub displaced: u64,
    /// Handoffs that ended with the old owner settled.
    pub handoffs_settled: u64,
    /// Handoffs that ended at their deadline.
    pub handoffs_timed_out: u64,
}

/// Who holds a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// No member.
    Unowned,
    /// This member receives from it.
    Owned(MemberId),
    /// Moving away from `from`, which may only settle; the target receives once it ends.
    Handoff {
        /// The old owner.
        from: MemberId,
        /// When its deliveries in flight are abandoned.
        deadline: Duration,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Partition {
    epoch: PartitionEpoch,
    holder: Holder,
    /// Delivered and not settled: by whom, under which epoch.
    in_flight: BTreeMap<Offset, (MemberId, PartitionEpoch)>,
    /// Abandoned, to be delivered again (lowest first, before anything new).
    redeliver: BTreeSet<Offset>,
    /// Settled offsets above the checkpoint.
    settled: BTreeSet<Offset>,
    /// The highest offset delivered at least once (the checkpoint at start).
    high: Offset,
    checkpoint: Offset,
}

impl Partition {
    fn new(checkpoint: Offset) -> Self {
        Partition {
            epoch: PartitionEpoch::default(),
            holder: Holder::Unowned,
            in_flight: BTreeMap::new(),
            redeliver: BTreeSet::new(),
            settled: BTreeSet::new(),
            high: checkpoint,
            checkpoint,
        }
    }

    fn next(&self) -> Next {
        self.redeliver
            .first()
            .map_or(Next::After(self.high), |&o| Next::Redeliver(o))
    }

    fn holds(&self, member: MemberId) -> bool {
        match self.holder {
            Holder::Owned(m) | Holder::Handoff { from: m, .. } => m == member,
            Holder::Unowned => false,
        }
    }

    /// Moves the member's deliveries in flight to the redelivery set; their offsets.
    fn abandon(&mut self, member: MemberId) -> Vec<Offset> {
        let offsets: Vec<Offset> = self
            .in_flight
            .iter()
            .filter(|(_, (m, _))| *m == member)
            .map(|(o, _)| *o)
            .collect();
        for o in &offsets {
            self.in_flight.remove(o);
            self.redeliver.insert(*o);
        }
        offsets
    }

    /// Moves the checkpoint over the settled offsets below everything unsettled.
    fn advance(&mut self) -> Option<Offset> {
        let floor = match (self.in_flight.keys().next(), self.redeliver.first()) {
            (Some(&a), Some(&b)) => Some(a.min(b)),
            (a, b) => a.or(b).copied(),
        };
        let before = self.checkpoint;
        while let Some(&s) = self.settled.first() {
            if floor.is_some_and(|f| s > f) {
                break;
            }
            self.settled.pop_first();
            self.checkpoint = s;
        }
        (self.checkpoint != before).then_some(self.checkpoint)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    slot: Slot,
    last_heard: Duration,
}

/// The state of one replicated module input: members, and every partition's holder, epoch,
/// deliveries in flight and checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replicas {
    config: ReplicaConfig,
    count: ReplicaCount,
    members: BTreeMap<MemberId, Member>,
    partitions: Vec<Partition>,
    counters: Counters,
}

impl Replicas {
    /// No members; every partition starts after its durable `checkpoint`.
    pub fn new(
        count: ReplicaCount,
        config: ReplicaConfig,
        checkpoint: impl Fn(PartitionId) -> Offset,
    ) -> Self {
        Replicas {
            config,
            count,
            members: BTreeMap::new(),
            partitions: PartitionId::all()
                .map(|p| Partition::new(checkpoint(p)))
                .collect(),
            counters: Counters::default(),
        }
    }

    /// A connection of the module asks to be a member. Admitted into the lowest free slot
    /// below the count; at the count, it displaces the member silent the longest if that one
    /// was silent for at least `displace_after`; otherwise refused.
    pub fn join(&mut self, member: MemberId, now: Duration) -> Result<Joined, JoinRefused> {
        if self.members.contains_key(&member) {
            return Err(JoinRefused::AlreadyMember(member));
        }
        let mut outputs = Vec::new();
        let mut displaced = None;
        let free = Slot::below(self.count).find(|s| self.members.values().all(|m| m.slot != *s));
        let slot = match free {
            Some(slot) => slot,
            None => {
                let (victim, silence, slot) = self
                    .live()
                    .map(|(id, m)| (id, now.saturating_sub(m.last_heard), m.slot))
                    .max_by_key(|&(_, silence, slot)| (silence, std::cmp::Reverse(slot)))
                    .ok_or(JoinRefused::Full {
                        count: self.count,
                        displace_after: self.config.displace_after,
                        most_silent: Duration::ZERO,
                    })?;
                if silence < self.config.displace_after {
                    return Err(JoinRefused::Full {
                        count: self.count,
                        displace_after: self.config.displace_after,
                        most_silent: silence,
                    });
                }
                self.drop_member(victim, AbandonReason::Displaced, &mut outputs);
                outputs.push(Output::Disconnect {
                    member: victim,
                    reason: DisconnectReason::Displaced,
                });
                self.counters.displaced += 1;
                displaced = Some(victim);
                slot
            }
        };
        self.members.insert(
            member,
            Member {
                slot,
                last_heard: now,
            },
        );
        self.rebalance(now, &mut outputs);
        Ok(Joined {
            slot,
            displaced,
            outputs,
        })
    }

    /// Something (any packet or frame) came from the member.
    pub fn heard(&mut self, member: MemberId, now: Duration) {
        if let Some(m) = self.members.get_mut(&member) {
            m.last_heard = m.last_heard.max(now);
        }
    }

    /// The member's connection closed cleanly. Unknown members change nothing.
    pub fn leave(&mut self, member: MemberId, now: Duration) -> Vec<Output> {
        self.remove(member, AbandonReason::Left, now)
    }

    /// The member's connection failed. Unknown members change nothing.
    pub fn crash(&mut self, member: MemberId, now: Duration) -> Vec<Output> {
        self.remove(member, AbandonReason::Crashed, now)
    }

    /// The declared count changed (a reload). Members at or above the new count drain: they
    /// own nothing, settle, and are disconnected.
    pub fn set_count(&mut self, count: ReplicaCount, now: Duration) -> Vec<Output> {
        self.count = count;
        let mut outputs = Vec::new();
        self.rebalance(now, &mut outputs);
        self.finish_draining(&mut outputs);
        outputs
    }

    /// Time passed: handoffs past their deadline end, abandoning what the old owner holds.
    pub fn tick(&mut self, now: Duration) -> Vec<Output> {
        let mut outputs = Vec::new();
        for p in PartitionId::all() {
            let Holder::Handoff { from, deadline } = self.partitions[p.index()].holder else {
                continue;
            };
            if now < deadline {
                continue;
            }
            self.abandon(p, from, AbandonReason::HandoffTimedOut, &mut outputs);
            self.counters.handoffs_timed_out += 1;
            self.complete_handoff(p, &mut outputs);
        }
        self.finish_draining(&mut outputs);
        outputs
    }

    /// What `member` should deliver next from `partition`, if it may receive from it.
    pub fn next(&self, member: MemberId, partition: PartitionId) -> Result<Next, DeliverRefused> {
        self.check_owner(member, partition)?;
        Ok(self.partitions[partition.index()].next())
    }

    /// The deliver request: `member` is about to be sent `offset` of `partition`. Allowed
    /// only to the owner, and only the lowest abandoned offset or (none abandoned) an offset
    /// above every one delivered so far; answered with the epoch the delivery carries.
    pub fn deliver(
        &mut self,
        member: MemberId,
        partition: PartitionId,
        offset: Offset,
    ) -> Result<PartitionEpoch, DeliverRefused> {
        self.check_owner(member, partition)?;
        let part = &mut self.partitions[partition.index()];
        let next = part.next();
        let allowed = match next {
            Next::Redeliver(o) => offset == o,
            Next::After(high) => offset > high,
        };
        if !allowed {
            return Err(DeliverRefused::OutOfOrder {
                partition,
                offset,
                expected: next,
            });
        }
        if !part.redeliver.remove(&offset) {
            part.high = offset;
        }
        part.in_flight.insert(offset, (member, part.epoch));
        Ok(part.epoch)
    }

    /// `member` acknowledged `offset` of `partition`, delivered under `epoch`. Counts only if
    /// that delivery is in flight with that member and epoch; otherwise nothing changes.
    pub fn ack(
        &mut self,
        member: MemberId,
        partition: PartitionId,
        epoch: PartitionEpoch,
        offset: Offset,
    ) -> Result<Vec<Output>, StaleAck> {
        let part = &mut self.partitions[partition.index()];
        if part.in_flight.get(&offset) != Some(&(member, epoch)) {
            return Err(StaleAck {
                member,
                partition,
                epoch,
                offset,
            });
        }
        part.in_flight.remove(&offset);
        part.settled.insert(offset);
        let mut outputs = Vec::new();
        if let Some(offset) = part.advance() {
            outputs.push(Output::Checkpoint { partition, offset });
        }
        let settled_handoff = matches!(part.holder, Holder::Handoff { from, .. } if from == member)
            && part.in_flight.is_empty();
        if settled_handoff {
            self.counters.handoffs_settled += 1;
            self.complete_handoff(partition, &mut outputs);
            self.finish_draining(&mut outputs);
        }
        Ok(outputs)
    }

    /// The member that may receive from `partition` now, with the epoch it delivers under.
    pub fn owner(&self, partition: PartitionId) -> Option<(MemberId, PartitionEpoch)> {
        let part = &self.partitions[partition.index()];
        match part.holder {
            Holder::Owned(m) => Some((m, part.epoch)),
            _ => None,
        }
    }

    /// Whether `member` may receive from `partition` now.
    pub fn may_receive(&self, member: MemberId, partition: PartitionId) -> bool {
        self.owner(partition).is_some_and(|(m, _)| m == member)
    }

    /// Every partition `member` may receive from now, with its epoch.
    pub fn receivable(&self, member: MemberId) -> Vec<(PartitionId, PartitionEpoch)> {
        PartitionId::all()
            .filter_map(|p| {
                self.owner(p)
                    .filter(|(m, _)| *m == member)
                    .map(|(_, e)| (p, e))
            })
            .collect()
    }

    /// Who holds `partition`.
    pub fn holder(&self, partition: PartitionId) -> Holder {
        self.partitions[partition.index()].holder
    }

    /// The partition's current epoch.
    pub fn epoch(&self, partition: PartitionId) -> PartitionEpoch {
        self.partitions[partition.index()].epoch
    }

    /// The partition's checkpoint: every delivery up to it is settled.
    pub fn checkpoint(&self, partition: PartitionId) -> Offset {
        self.partitions[partition.index()].checkpoint
    }

    /// How many deliveries of the partition are in flight.
    pub fn in_flight(&self, partition: PartitionId) -> usize {
        self.partitions[partition.index()].in_flight.len()
    }

    /// The slot that should own `partition`: rendezvous over the live members' slots.
    pub fn target_slot(&self, partition: PartitionId) -> Option<Slot> {
        assign::target(self.live().map(|(_, m)| m.slot), partition)
    }

    /// The member that should own `partition`.
    pub fn target(&self, partition: PartitionId) -> Option<MemberId> {
        let slot = self.target_slot(partition)?;
        self.live().find(|(_, m)| m.slot == slot).map(|(id, _)| id)
    }

    /// Every member (draining ones included) with its slot.
    pub fn members(&self) -> Vec<(MemberId, Slot)> {
        self.members.iter().map(|(id, m)| (*id, m.slot)).collect()
    }

    /// The member's slot, if it is a member.
    pub fn slot_of(&self, member: MemberId) -> Option<Slot> {
        self.members.get(&member).map(|m| m.slot)
    }

    /// The declared count.
    pub fn count(&self) -> ReplicaCount {
        self.count
    }

    /// Running totals.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Members below the count (not draining).
    fn live(&self) -> impl Iterator<Item = (MemberId, &Member)> {
        let count = self.count.get();
        self.members
            .iter()
            .filter(move |(_, m)| m.slot.get() < count)
            .map(|(id, m)| (*id, m))
    }

    fn check_owner(&self, member: MemberId, partition: PartitionId) -> Result<(), DeliverRefused> {
        if !self.members.contains_key(&member) {
            return Err(DeliverRefused::NotMember(member));
        }
        match self.partitions[partition.index()].holder {
            Holder::Owned(m) if m == member => Ok(()),
            Holder::Handoff { deadline, .. } if self.target(partition) == Some(member) => {
                Err(DeliverRefused::Fenced {
                    member,
                    partition,
                    until: deadline,
                })
            }
            _ => Err(DeliverRefused::NotOwner { member, partition }),
        }
    }

    fn remove(&mut self, member: MemberId, reason: AbandonReason, now: Duration) -> Vec<Output> {
        let mut outputs = Vec::new();
        if self.members.contains_key(&member) {
            self.drop_member(member, reason, &mut outputs);
            self.rebalance(now, &mut outputs);
            self.finish_draining(&mut outputs);
        }
        outputs
    }

    /// Takes a member out: its deliveries abandoned, what it held unowned (the caller then
    /// rebalances once).
    fn drop_member(&mut self, member: MemberId, reason: AbandonReason, outputs: &mut Vec<Output>) {
        self.members.remove(&member);
        for p in PartitionId::all() {
            self.abandon(p, member, reason, outputs);
            let part = &mut self.partitions[p.index()];
            if part.holds(member) {
                part.holder = Holder::Unowned;
            }
        }
    }

    fn abandon(
        &mut self,
        partition: PartitionId,
        member: MemberId,
        reason: AbandonReason,
        outputs: &mut Vec<Output>,
    ) {
        let offsets = self.partitions[partition.index()].abandon(member);
        if !offsets.is_empty() {
            self.counters.abandoned += offsets.len() as u64;
            outputs.push(Output::Abandoned {
                partition,
                member,
                offsets,
                reason,
            });
        }
    }

    /// Brings every partition's holder in line with its target.
    fn rebalance(&mut self, now: Duration, outputs: &mut Vec<Output>) {
        for p in PartitionId::all() {
            let target = self.target(p);
            let part = &self.partitions[p.index()];
            let (holder, idle) = (part.holder, part.in_flight.is_empty());
            match holder {
                Holder::Unowned => {
                    if let Some(t) = target {
                        self.grant(p, t, outputs);
                    }
                }
                Holder::Owned(a) if target == Some(a) => {}
                Holder::Owned(a) => {
                    outputs.push(Output::Revoked {
                        partition: p,
                        member: a,
                    });
                    if idle {
                        self.complete_handoff(p, outputs);
                    } else {
                        self.partitions[p.index()].holder = Holder::Handoff {
                            from: a,
                            deadline: now.saturating_add(self.config.handoff_deadline),
                        };
                    }
                }
                Holder::Handoff { from, .. } if target == Some(from) => {
                    let part = &mut self.partitions[p.index()];
                    part.holder = Holder::Owned(from);
                    outputs.push(Output::Granted {
                        partition: p,
                        member: from,
                        epoch: part.epoch,
                    });
                }
                Holder::Handoff { .. } => {}
            }
        }
    }

    /// The old owner holds nothing valid any more: the target (if any) becomes the owner.
    fn complete_handoff(&mut self, partition: PartitionId, outputs: &mut Vec<Output>) {
        match self.target(partition) {
            Some(t) => self.grant(partition, t, outputs),
            None => self.partitions[partition.index()].holder = Holder::Unowned,
        }
    }

    fn grant(&mut self, partition: PartitionId, member: MemberId, outputs: &mut Vec<Output>) {
        let part = &mut self.partitions[partition.index()];
        part.epoch = part.epoch.next();
        part.holder = Holder::Owned(member);
        outputs.push(Output::Granted {
            partition,
            member,
            epoch: part.epoch,
        });
    }

    /// Draining members that hold nothing any more are disconnected.
    fn finish_draining(&mut self, outputs: &mut Vec<Output>) {
        let count = self.count.get();
        let done: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(id, m)| {
                m.slot.get() >= count && self.partitions.iter().all(|p| !p.holds(**id))
            })
            .map(|(id, _)| *id)
            .collect();
        for member in done {
            self.members.remove(&member);
            outputs.push(Output::Disconnect {
                member,
                reason: DisconnectReason::ScaledDown,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn m(n: u64) -> MemberId {
        MemberId::new(n)
    }

    fn o(n: u64) -> Offset {
        Offset::new(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn machine(count: u8) -> Replicas {
        let count = ReplicaCount::new(u64::from(count)).unwrap();
        Replicas::new(count, ReplicaConfig::DEFAULT, |_| Offset::ZERO)
    }

    /// A partition that `b` (joining second, slot 1) takes from `a` (slot 0).
    fn moved_to_second() -> PartitionId {
        moved_to_slot_1().next().unwrap()
    }

    fn moved_to_slot_1() -> impl Iterator<Item = PartitionId> {
        let slots = [Slot::new(0).unwrap(), Slot::new(1).unwrap()];
        PartitionId::all().filter(move |&p| assign::target(slots, p) == Slot::new(1))
    }

    fn granted(outputs: &[Output], member: MemberId) -> Vec<(PartitionId, PartitionEpoch)> {
        outputs
            .iter()
            .filter_map(|out| match out {
                Output::Granted {
                    partition,
                    member: m,
                    epoch,
                } if *m == member => Some((*partition, *epoch)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_member_gets_every_partition_at_epoch_one() {
        let mut r = machine(3);
        let joined = r.join(m(1), Duration::ZERO).unwrap();
        assert_eq!(joined.slot, Slot::new(0).unwrap());
        let grants = granted(&joined.outputs, m(1));
        assert_eq!(grants.len(), 64);
        assert!(grants.iter().all(|(_, e)| *e == PartitionEpoch::new(1)));
        assert_eq!(r.receivable(m(1)).len(), 64);
    }

    #[test]
    fn an_idle_partition_moves_at_once_and_a_busy_one_waits_for_the_old_owner() {
        let mut r = machine(3);
        r.join(m(1), Duration::ZERO).unwrap();
        let busy = moved_to_second();
        let idle = moved_to_slot_1().nth(1).unwrap();
        let e1 = r.deliver(m(1), busy, o(5)).unwrap();
        let joined = r.join(m(2), SECOND).unwrap();
        assert!(joined.outputs.contains(&Output::Revoked {
            partition: busy,
            member: m(1)
        }));
        // The idle one is the newcomer's now, at a new epoch.
        assert_eq!(r.owner(idle), Some((m(2), PartitionEpoch::new(2))));
        // The busy one is fenced: the old owner may only settle, the new one waits.
        assert_eq!(
            r.holder(busy),
            Holder::Handoff {
                from: m(1),
                deadline: secs(11)
            }
        );
        assert!(matches!(
            r.deliver(m(2), busy, o(6)),
            Err(DeliverRefused::Fenced { .. })
        ));
        assert!(matches!(
            r.deliver(m(1), busy, o(6)),
            Err(DeliverRefused::NotOwner { .. })
        ));
        let outputs = r.ack(m(1), busy, e1, o(5)).unwrap();
        assert!(outputs.contains(&Output::Checkpoint {
            partition: busy,
            offset: o(5)
        }));
        assert_eq!(granted(&outputs, m(2)), [(busy, PartitionEpoch::new(2))]);
        assert_eq!(r.next(m(2), busy), Ok(Next::After(o(5))));
        assert_eq!(r.counters().handoffs_settled, 1);
        assert_eq!(r.counters().abandoned, 0);
    }

    #[test]
    fn at_the_deadline_the_old_owners_deliveries_are_abandoned_and_its_late_ack_changes_nothing() {
        let mut r = machine(2);
        r.join(m(1), Duration::ZERO).unwrap();
        let p = moved_to_second();
        let e1 = r.deliver(m(1), p, o(3)).unwrap();
        r.deliver(m(1), p, o(4)).unwrap();
        r.join(m(2), Duration::ZERO).unwrap();
        assert!(r.tick(secs(10) - Duration::from_millis(1)).is_empty());
        let outputs = r.tick(secs(10));
        assert_eq!(
            outputs,
            [
                Output::Abandoned {
                    partition: p,
                    member: m(1),
                    offsets: vec![o(3), o(4)],
                    reason: AbandonReason::HandoffTimedOut
                },
                Output::Granted {
                    partition: p,
                    member: m(2),
                    epoch: PartitionEpoch::new(2)
                }
            ]
        );
        let before = r.clone();
        assert!(r.ack(m(1), p, e1, o(3)).is_err());
        assert_eq!(r, before, "a late acknowledgement changed the machine");
        // The new owner gets both again, lowest first, before anything new.
        assert_eq!(r.next(m(2), p), Ok(Next::Redeliver(o(3))));
        assert!(r.deliver(m(2), p, o(7)).is_err());
        let e2 = r.deliver(m(2), p, o(3)).unwrap();
        assert_eq!(r.next(m(2), p), Ok(Next::Redeliver(o(4))));
        r.deliver(m(2), p, o(4)).unwrap();
        assert_eq!(r.next(m(2), p), Ok(Next::After(o(4))));
        assert_eq!(r.ack(m(2), p, e2, o(4)).unwrap(), []);
        assert_eq!(
            r.ack(m(2), p, e2, o(3)).unwrap(),
            [Output::Checkpoint {
                partition: p,
                offset: o(4)
            }]
        );
        assert_eq!(r.counters().abandoned, 2);
        assert_eq!(r.counters().handoffs_timed_out, 1);
    }

    #[test]
    fn the_checkpoint_moves_only_over_settled_offsets() {
        let mut r = machine(1);
        r.join(m(1), Duration::ZERO).unwrap();
        let p = PartitionId::new(9).unwrap();
        let e = r.deliver(m(1), p, o(2)).unwrap();
        r.deliver(m(1), p, o(5)).unwrap();
        r.deliver(m(1), p, o(8)).unwrap();
        assert_eq!(r.ack(m(1), p, e, o(5)).unwrap(), []);
        assert_eq!(r.ack(m(1), p, e, o(8)).unwrap(), []);
        assert_eq!(r.checkpoint(p), Offset::ZERO);
        assert!(r.ack(m(1), p, e, o(8)).is_err(), "a repeated ack");
        assert!(
            r.ack(m(1), p, PartitionEpoch::new(7), o(2)).is_err(),
            "a wrong epoch"
        );
        assert_eq!(
            r.ack(m(1), p, e, o(2)).unwrap(),
            [Output::Checkpoint {
                partition: p,
                offset: o(8)
            }]
        );
        assert!(
            r.deliver(m(1), p, o(8)).is_err(),
            "settled offsets never go again"
        );
    }

    #[test]
    fn a_crash_abandons_and_the_partitions_go_to_the_others_at_once() {
        let mut r = machine(2);
        r.join(m(1), Duration::ZERO).unwrap();
        r.join(m(2), Duration::ZERO).unwrap();
        let p = r.receivable(m(2))[0].0;
        let e = r.deliver(m(2), p, o(1)).unwrap();
        let outputs = r.crash(m(2), SECOND);
        assert!(outputs.contains(&Output::Abandoned {
            partition: p,
            member: m(2),
            offsets: vec![o(1)],
            reason: AbandonReason::Crashed
        }));
        assert_eq!(r.owner(p), Some((m(1), e.next())));
        assert_eq!(r.receivable(m(1)).len(), 64);
        assert!(r.ack(m(2), p, e, o(1)).is_err());
        assert!(
            r.crash(m(2), SECOND).is_empty(),
            "an unknown member changes nothing"
        );
    }

    #[test]
    fn a_newcomer_is_refused_while_every_member_is_heard_and_displaces_a_silent_one() {
        let mut r = machine(2);
        r.join(m(1), Duration::ZERO).unwrap();
        r.join(m(2), Duration::ZERO).unwrap();
        let first = r.receivable(m(1));
        let p = first[0].0;
        r.deliver(m(1), p, o(1)).unwrap();
        r.heard(m(2), secs(8));
        assert_eq!(
            r.join(m(3), secs(9)),
            Err(JoinRefused::Full {
                count: ReplicaCount::new(2).unwrap(),
                displace_after: secs(10),
                most_silent: secs(9)
            })
        );
        let line = r.join(m(3), secs(9)).unwrap_err().to_string();
        assert!(
            line.contains("its 2 replicas connected") && line.contains("connection refused"),
            "{line}"
        );
        assert_eq!(r.join(m(2), secs(9)), Err(JoinRefused::AlreadyMember(m(2))));
        let joined = r.join(m(3), secs(10)).unwrap();
        assert_eq!(joined.displaced, Some(m(1)));
        assert_eq!(joined.slot, Slot::new(0).unwrap());
        assert!(joined.outputs.contains(&Output::Disconnect {
            member: m(1),
            reason: DisconnectReason::Displaced
        }));
        // Same slot, same partitions; the abandoned delivery goes again first.
        let taken: Vec<PartitionId> = r.receivable(m(3)).iter().map(|(p, _)| *p).collect();
        let had: Vec<PartitionId> = first.iter().map(|(p, _)| *p).collect();
        assert_eq!(taken, had);
        assert_eq!(r.next(m(3), p), Ok(Next::Redeliver(o(1))));
        assert_eq!(r.counters().displaced, 1);
        assert_eq!(r.counters().abandoned, 1);
        assert!(matches!(
            r.deliver(m(1), p, o(1)),
            Err(DeliverRefused::NotMember(_))
        ));
    }

    #[test]
    fn lowering_the_count_drains_the_highest_slots_then_disconnects_them() {
        let mut r = machine(2);
        r.join(m(1), Duration::ZERO).unwrap();
        r.join(m(2), Duration::ZERO).unwrap();
        let p = r.receivable(m(2))[0].0;
        let e = r.deliver(m(2), p, o(1)).unwrap();
        let outputs = r.set_count(ReplicaCount::new(1).unwrap(), SECOND);
        assert!(!outputs
            .iter()
            .any(|out| matches!(out, Output::Disconnect { .. })));
        assert!(r.receivable(m(2)).is_empty());
        assert_eq!(r.slot_of(m(2)), Slot::new(1));
        let outputs = r.ack(m(2), p, e, o(1)).unwrap();
        assert!(outputs.contains(&Output::Disconnect {
            member: m(2),
            reason: DisconnectReason::ScaledDown
        }));
        assert_eq!(r.slot_of(m(2)), None);
        assert_eq!(r.receivable(m(1)).len(), 64);
        assert_eq!(r.counters().abandoned, 0);
    }

    #[test]
    fn a_handoff_whose_target_goes_back_to_the_old_owner_resumes_at_the_same_epoch() {
        let mut r = machine(2);
        r.join(m(1), Duration::ZERO).unwrap();
        let p = moved_to_second();
        let e = r.deliver(m(1), p, o(1)).unwrap();
        r.join(m(2), Duration::ZERO).unwrap();
        assert!(!r.may_receive(m(1), p));
        let outputs = r.leave(m(2), SECOND);
        assert!(outputs.contains(&Output::Granted {
            partition: p,
            member: m(1),
            epoch: e
        }));
        assert!(r.ack(m(1), p, e, o(1)).is_ok());
        assert_eq!(r.next(m(1), p), Ok(Next::After(o(1))));
    }

    #[test]
    fn without_members_partitions_wait_unowned() {
        let mut r = machine(1);
        r.join(m(1), Duration::ZERO).unwrap();
        r.leave(m(1), SECOND);
        assert!(PartitionId::all().all(|p| r.holder(p) == Holder::Unowned));
        let joined = r.join(m(2), secs(2)).unwrap();
        assert_eq!(granted(&joined.outputs, m(2)).len(), 64);
        assert!(PartitionId::all().all(|p| r.epoch(p) == PartitionEpoch::new(2)));
    }
}
