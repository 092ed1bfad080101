//! Module replicas (issue 17): a module declared with `x-edgehub-replicas` runs as several
//! connections of one identity that split each input by a partition key, keeping each key's
//! order. The contract (words, guarantees, diagrams) is ARCHITECTURE.md's "Module replicas".
//!
//! Everything here is pure: no I/O, no tasks, no clock (time is an input). The driver is
//! [`crate::replica_worker`] (one per replicated input, fed by the MQTT head).
//!
//! - [`spec`]: what the manifest declares ([`ReplicaSpec`]: [`ReplicaCount`], [`PartitionKey`])
//!   and why a declaration is refused.
//! - [`partition`]: which of the [`PARTITIONS`] partitions a message belongs to (a fixed hash
//!   of its key; [`DEFAULT_PARTITION`] without one).
//! - [`assign`]: which member's [`Slot`] should own which partition (rendezvous hashing).
//! - [`state`]: membership, ownership and fenced handoffs ([`Replicas`]), the machine
//!   [`crate::replica_worker`] drives.

pub mod assign;
pub mod partition;
pub mod spec;
pub mod state;

#[cfg(test)]
mod model;

pub use assign::Slot;
pub use state::{
    AbandonReason, Counters, DeliverRefused, DisconnectReason, Holder, JoinRefused, Joined,
    MemberId, Next, Output, PartitionEpoch, ReplicaConfig, Replicas, StaleAck,
};

pub use partition::{partition_of, PartitionId, DEFAULT_PARTITION, PARTITIONS};

pub use spec::{
    BodyKey, PartitionKey, PartitionKeyError, ReplicaCount, ReplicaCountError, ReplicaSettingError,
    ReplicaSpec,
};
