//! The direct-method requests in flight, by request id (`$rid`); pure (no I/O, no clock).
//!
//! Each entry remembers the target connection it was handed to (identity and connection id),
//! so only that connection's response completes it: a response from another module, another
//! connection of the same module or for an unknown id completes nothing. Bounded: at most
//! [`MethodLimits::per_target`] requests in flight per target module and
//! [`MethodLimits::total`] in all; past either, [`PendingTable::begin`] refuses with [`Busy`]
//! (answered 429, IoT Hub's 429001 ThrottlingException).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::identity::Identity;

/// A request id as the target sees it in `$rid`: unique in this process, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rid(u64);

impl Rid {
    /// The id's number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Rid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Rid {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Rid)
    }
}

/// How many requests may be in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodLimits {
    /// Per target module.
    pub per_target: usize,
    /// In the whole hub.
    pub total: usize,
}

/// The limits by default: 32 per target, 256 in all (with payloads of at most 128 KiB, at most
/// 32 MiB of requests wait in the hub).
pub const DEFAULT_LIMITS: MethodLimits = MethodLimits {
    per_target: 32,
    total: 256,
};

/// A request refused because too many are in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// The target module has this many requests in flight already.
    #[error("the target module already has {0} method requests in flight")]
    Target(usize),
    /// The hub has this many requests in flight already.
    #[error("the hub already has {0} method requests in flight")]
    Hub(usize),
}

/// What a response did.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion<R> {
    /// It answered this pending request: here is its reply handle.
    Completed(R),
    /// No request with that id is pending (answered already, timed out, or never made).
    Unknown,
    /// The request is pending, but on another connection: it stays pending.
    NotYours,
}

#[derive(Debug)]
struct Entry<R> {
    target: Identity,
    conn: u64,
    reply: R,
}

/// The pending requests, each with its reply handle `R`.
#[derive(Debug)]
pub struct PendingTable<R> {
    limits: MethodLimits,
    next: u64,
    entries: HashMap<Rid, Entry<R>>,
    per_target: HashMap<Identity, usize>,
}

impl<R> PendingTable<R> {
    /// An empty table with `limits`.
    pub fn new(limits: MethodLimits) -> Self {
        PendingTable {
            limits,
            next: 1,
            entries: HashMap::new(),
            per_target: HashMap::new(),
        }
    }

    /// A new request to connection `conn` of `target`, under a fresh id; [`Busy`] when the
    /// target or the hub is at its limit.
    pub fn begin(&mut self, target: &Identity, conn: u64, reply: R) -> Result<Rid, Busy> {
        if self.entries.len() >= self.limits.total {
            return Err(Busy::Hub(self.entries.len()));
        }
        let n = self.per_target.get(target).copied().unwrap_or(0);
        if n >= self.limits.per_target {
            return Err(Busy::Target(n));
        }
        let rid = Rid(self.next);
        self.next += 1;
        *self.per_target.entry(target.clone()).or_insert(0) += 1;
        self.entries.insert(
            rid,
            Entry {
                target: target.clone(),
                conn,
                reply,
            },
        );
        Ok(rid)
    }

    /// A response for `rid` arrived from connection `conn` of `from`.
    pub fn complete(&mut self, rid: Rid, from: &Identity, conn: u64) -> Completion<R> {
        match self.entries.get(&rid) {
            None => Completion::Unknown,
            Some(e) if e.target != *from || e.conn != conn => Completion::NotYours,
            Some(_) => match self.remove(rid) {
                Some(reply) => Completion::Completed(reply),
                None => Completion::Unknown,
            },
        }
    }

    /// Forgets `rid` (timed out, or its caller went away); its reply handle if it was pending.
    pub fn cancel(&mut self, rid: Rid) -> Option<R> {
        self.remove(rid)
    }

    /// Forgets every request handed to connection `conn` of `target` (it closed): their reply
    /// handles.
    pub fn drop_connection(&mut self, target: &Identity, conn: u64) -> Vec<R> {
        let rids: Vec<Rid> = self
            .entries
            .iter()
            .filter(|(_, e)| e.target == *target && e.conn == conn)
            .map(|(rid, _)| *rid)
            .collect();
        rids.into_iter()
            .filter_map(|rid| self.remove(rid))
            .collect()
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if none is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, rid: Rid) -> Option<R> {
        let entry = self.entries.remove(&rid)?;
        if let Some(n) = self.per_target.get_mut(&entry.target) {
            *n -= 1;
            if *n == 0 {
                self.per_target.remove(&entry.target);
            }
        }
        Some(entry.reply)
    }
}

#[cfg(test)]
mod tests {
    use router::{DeviceId, ModuleId};

    use super::*;

    fn who(m: &str) -> Identity {
        Identity::new(DeviceId::new("d"), ModuleId::new(m))
    }

    #[test]
    fn only_the_target_connection_completes_its_request_and_only_once() {
        let mut t = PendingTable::new(DEFAULT_LIMITS);
        let rid = t.begin(&who("b"), 7, "reply").unwrap();
        assert_eq!(t.complete(rid, &who("a"), 7), Completion::NotYours);
        assert_eq!(t.complete(rid, &who("b"), 8), Completion::NotYours);
        assert_eq!(t.len(), 1, "a wrong answer leaves it pending");
        assert_eq!(
            t.complete(rid, &who("b"), 7),
            Completion::Completed("reply")
        );
        assert_eq!(t.complete(rid, &who("b"), 7), Completion::Unknown);
        assert_eq!(t.complete(Rid(999), &who("b"), 7), Completion::Unknown);
        assert!(t.is_empty());
    }

    #[test]
    fn ids_are_never_reused() {
        let mut t = PendingTable::new(DEFAULT_LIMITS);
        let a = t.begin(&who("b"), 1, ()).unwrap();
        assert!(t.cancel(a).is_some());
        let b = t.begin(&who("b"), 1, ()).unwrap();
        assert_ne!(a, b);
        assert_eq!(b.to_string().parse::<Rid>().unwrap(), b);
    }

    #[test]
    fn limits_per_target_and_in_all_refuse_and_free_up() {
        let mut t = PendingTable::new(MethodLimits {
            per_target: 2,
            total: 3,
        });
        let b1 = t.begin(&who("b"), 1, ()).unwrap();
        t.begin(&who("b"), 1, ()).unwrap();
        assert_eq!(t.begin(&who("b"), 1, ()), Err(Busy::Target(2)));
        t.begin(&who("c"), 2, ()).unwrap();
        assert_eq!(t.begin(&who("c"), 2, ()), Err(Busy::Hub(3)));
        assert!(t.cancel(b1).is_some());
        t.begin(&who("c"), 2, ()).unwrap();
        assert_eq!(t.begin(&who("b"), 1, ()), Err(Busy::Hub(3)));
    }

    #[test]
    fn a_closed_connection_takes_only_its_own_requests() {
        let mut t = PendingTable::new(DEFAULT_LIMITS);
        t.begin(&who("b"), 1, "old").unwrap();
        let newer = t.begin(&who("b"), 2, "new").unwrap();
        let other = t.begin(&who("c"), 1, "c").unwrap();
        assert_eq!(t.drop_connection(&who("b"), 1), vec!["old"]);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.complete(newer, &who("b"), 2),
            Completion::Completed("new")
        );
        assert_eq!(t.complete(other, &who("c"), 1), Completion::Completed("c"));
    }
}
