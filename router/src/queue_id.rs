//! `QueueId { endpoint, priority, lane }` ↔ [`store::QueueName`]: the one encoding of a queue's
//! name.
//!
//! There is one store queue per (endpoint, priority) — the backlog lane — plus, for routes with
//! `x-edgehub-liveFirstSecs`, a live lane per (endpoint, priority). Its name is built and parsed
//! here and nowhere else (unlike edgeHub's `MessageQueueIdHelper`, which falls back silently on a
//! name it cannot parse).
//!
//! # Encoding, version 1
//!
//! ```text
//! q1|up|p{priority}                       $upstream
//! q1|in|{module}|{input}|p{priority}      BrokeredEndpoint("/modules/{module}/inputs/{input}")
//! …|p{priority}|live                      the live lane of either
//! q1|in|{module}|{input}|r{partition}     one partition of a replicated module's input
//! ```
//!
//! A replicated module's input (`x-edgehub-replicas`) has one queue per partition instead of
//! its priority queues: per-key order comes before priority there (ARCHITECTURE.md "Module
//! replicas"). Those names are built by [`partition_queue_name`] and recognised by
//! [`is_partition_queue`]; [`QueueId::parse`] calls them foreign (no endpoint worker drains them).
//!
//! `{module}` and `{input}` escape `%` as `%25` and `|` as `%7C`; `{priority}` is decimal. Names
//! stay readable in store statistics.
//!
//! Invariants:
//! - [`QueueId::parse`] of [`QueueId::name`] gives the same id back, for every id whose name fits
//!   the store's 255-byte limit (property-tested); a longer one is a [`QueueIdError::TooLong`].
//! - Two ids have the same name exactly when they are equal.
//! - Parsing never panics; a name this module did not write is a [`QueueIdError::Foreign`].
//!
//! The queue carries the structured [`Endpoint`], not only its [`EndpointId`]: an `EndpointId`
//! is never parsed back into an endpoint, and a queue found on disk after a restart must be
//! turned back into the endpoint whose worker drains it.

use std::fmt;

use store::QueueName;

use crate::message::{InputName, ModuleId};
use crate::route::{Endpoint, EndpointId, Priority};

const PREFIX: &str = "q1";
const SEP: char = '|';
const LIVE: &str = "live";

/// One durable queue: the messages for one endpoint at one priority, in one lane.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId {
    /// The endpoint the queue delivers to.
    pub endpoint: Endpoint,
    /// The priority of every message in it.
    pub priority: Priority,
    /// Which lane of that (endpoint, priority) it is.
    pub lane: Lane,
}

/// The lanes of one (endpoint, priority). The order is the serving order: live first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Messages of `x-edgehub-liveFirstSecs` routes, served ahead of the backlog while they are
    /// younger than their route's limit; older ones are moved to the backlog lane.
    Live,
    /// Every other message (and aged live ones): the queue edgeHub has.
    #[default]
    Backlog,
}

/// A queue name that cannot be built or parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueIdError {
    /// The encoded name exceeds the store's limit (very long module or input names).
    #[error(
        "queue name for {endpoint} at priority {priority} is {len} bytes, over the store's limit"
    )]
    TooLong {
        /// The endpoint, as text.
        endpoint: String,
        /// The priority.
        priority: u32,
        /// Length of the encoded name.
        len: usize,
    },
    /// The name was not written by this module (or by a version it does not know).
    #[error("queue {0:?} is not a router queue")]
    Foreign(String),
}

impl QueueId {
    /// The (backlog) queue of `endpoint` at `priority`.
    pub fn new(endpoint: Endpoint, priority: Priority) -> Self {
        QueueId {
            endpoint,
            priority,
            lane: Lane::Backlog,
        }
    }

    /// The queue of `endpoint` at `priority` in `lane`.
    pub fn in_lane(endpoint: Endpoint, priority: Priority, lane: Lane) -> Self {
        QueueId {
            endpoint,
            priority,
            lane,
        }
    }

    /// The endpoint's identity.
    pub fn endpoint_id(&self) -> EndpointId {
        self.endpoint.id()
    }

    /// The store queue name: the only place a queue name is built.
    pub fn name(&self) -> Result<QueueName, QueueIdError> {
        let text = self.to_string();
        QueueName::new(&text).map_err(|_| QueueIdError::TooLong {
            endpoint: self.endpoint.to_string(),
            priority: self.priority.0,
            len: text.len(),
        })
    }

    /// The queue a store name stands for: the only place a queue name is parsed.
    pub fn parse(name: &QueueName) -> Result<QueueId, QueueIdError> {
        let text = name.as_str();
        let foreign = || QueueIdError::Foreign(text.to_owned());
        let mut parts: Vec<&str> = text.split(SEP).collect();
        let lane = if parts.last() == Some(&LIVE) {
            parts.pop();
            Lane::Live
        } else {
            Lane::Backlog
        };
        let (endpoint, priority) = match parts.as_slice() {
            [PREFIX, "up", p] => (Endpoint::Upstream, *p),
            [PREFIX, "in", module, input, p] => (
                Endpoint::ModuleInput {
                    module: ModuleId::new(unescape(module).ok_or_else(foreign)?),
                    input: InputName::new(unescape(input).ok_or_else(foreign)?),
                },
                *p,
            ),
            _ => return Err(foreign()),
        };
        let priority = parse_priority(priority).ok_or_else(foreign)?;
        Ok(QueueId {
            endpoint,
            priority,
            lane,
        })
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Upstream => write!(f, "{PREFIX}{SEP}up")?,
            Endpoint::ModuleInput { module, input } => write!(
                f,
                "{PREFIX}{SEP}in{SEP}{}{SEP}{}",
                escape(module.as_str()),
                escape(input.as_str())
            )?,
        }
        write!(f, "{SEP}p{}", self.priority.0)?;
        match self.lane {
            Lane::Backlog => Ok(()),
            Lane::Live => write!(f, "{SEP}{LIVE}"),
        }
    }
}

/// The store queue of `partition` of a replicated module's input `endpoint`; `None` for the
/// upstream endpoint, which is never replicated. Too long a name is a
/// [`QueueIdError::TooLong`] (reported at priority 0).
pub fn partition_queue_name(
    endpoint: &Endpoint,
    partition: crate::replicas::PartitionId,
) -> Option<Result<QueueName, QueueIdError>> {
    let Endpoint::ModuleInput { module, input } = endpoint else {
        return None;
    };
    let text = format!(
        "{PREFIX}{SEP}in{SEP}{}{SEP}{}{SEP}r{}",
        escape(module.as_str()),
        escape(input.as_str()),
        partition.get()
    );
    Some(QueueName::new(&text).map_err(|_| QueueIdError::TooLong {
        endpoint: endpoint.to_string(),
        priority: 0,
        len: text.len(),
    }))
}

/// Whether `name` is a partition queue ([`partition_queue_name`]).
pub fn is_partition_queue(name: &QueueName) -> bool {
    let parts: Vec<&str> = name.as_str().split(SEP).collect();
    matches!(parts.as_slice(), [PREFIX, "in", _, _, r] if r.strip_prefix('r').is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())))
}

fn parse_priority(text: &str) -> Option<Priority> {
    let digits = text.strip_prefix('p')?;
    // Only the canonical decimal form, so that one id has exactly one name.
    let canonical = digits == "0" || (!digits.starts_with('0') && !digits.is_empty());
    if !canonical || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Priority)
}

fn escape(text: &str) -> String {
    text.replace('%', "%25").replace(SEP, "%7C")
}

/// Reverses [`escape`]; `None` for a `%` that does not start `%25` or `%7C`.
fn unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("%25") {
            out.push('%');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("%7C") {
            out.push(SEP);
            rest = tail;
        } else {
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(module: &str, input: &str) -> Endpoint {
        Endpoint::ModuleInput {
            module: ModuleId::new(module),
            input: InputName::new(input),
        }
    }

    #[test]
    fn partition_queues_have_their_own_names_that_parse_as_foreign() {
        let p = crate::replicas::PartitionId::new(7).unwrap();
        let name = partition_queue_name(&input("f|x", "in1"), p)
            .unwrap()
            .unwrap();
        assert_eq!(name.as_str(), "q1|in|f%7Cx|in1|r7");
        assert!(is_partition_queue(&name));
        assert!(matches!(
            QueueId::parse(&name),
            Err(QueueIdError::Foreign(_))
        ));
        let plain = QueueId::new(input("f", "in1"), Priority(0)).name().unwrap();
        assert!(!is_partition_queue(&plain));
        assert!(partition_queue_name(&Endpoint::Upstream, p).is_none());
    }

    #[test]
    fn names_are_readable() {
        let up = QueueId::new(Endpoint::Upstream, Priority(0));
        assert_eq!(up.name().unwrap().as_str(), "q1|up|p0");
        let module = QueueId::new(input("filter", "in1"), Priority::DEFAULT);
        assert_eq!(
            module.name().unwrap().as_str(),
            "q1|in|filter|in1|p2000000000"
        );
    }

    #[test]
    fn live_lanes_have_their_own_readable_names() {
        let live = QueueId::in_lane(Endpoint::Upstream, Priority(2), Lane::Live);
        let name = live.name().unwrap();
        assert_eq!(name.as_str(), "q1|up|p2|live");
        assert_eq!(QueueId::parse(&name).unwrap(), live);
        let module = QueueId::in_lane(input("m", "live"), Priority(0), Lane::Live);
        assert_eq!(QueueId::parse(&module.name().unwrap()).unwrap(), module);
        assert_ne!(
            live.name(),
            QueueId::new(Endpoint::Upstream, Priority(2)).name()
        );
    }

    #[test]
    fn separators_and_escapes_inside_names_round_trip() {
        let id = QueueId::new(input("a|b%7C", "%|"), Priority(3));
        let name = id.name().unwrap();
        assert_eq!(QueueId::parse(&name).unwrap(), id);
    }

    #[test]
    fn foreign_names_are_refused() {
        for text in [
            "iothub_Pri0",
            "q1|up",
            "q1|up|p",
            "q1|up|p01",
            "q1|up|px",
            "q1|up|p99999999999",
            "q2|up|p0",
            "q1|in|m|p0",
            "q1|in|m%|i|p0",
            "q1|xx|p0",
            "q1|up|live",
            "q1|up|p0|live|live",
            "q1|up|p0|Live",
        ] {
            let name = QueueName::new(text).unwrap();
            assert!(QueueId::parse(&name).is_err(), "{text}");
        }
    }

    #[test]
    fn a_name_over_the_store_limit_is_an_error() {
        let id = QueueId::new(input(&"m".repeat(200), &"i".repeat(60)), Priority(0));
        assert!(matches!(id.name(), Err(QueueIdError::TooLong { .. })));
    }

    fn endpoint() -> impl Strategy<Value = Endpoint> {
        prop_oneof![
            Just(Endpoint::Upstream),
            ("[a-z|%7C0-9]{0,20}", "[a-z|%7C0-9]{0,20}").prop_map(|(m, i)| input(&m, &i)),
        ]
    }

    proptest! {
        #[test]
        fn every_id_round_trips(endpoint in endpoint(), priority in any::<u32>(), live: bool) {
            let lane = if live { Lane::Live } else { Lane::Backlog };
            let id = QueueId::in_lane(endpoint, Priority(priority), lane);
            let name = id.name().unwrap();
            prop_assert_eq!(QueueId::parse(&name).unwrap(), id);
        }

        #[test]
        fn distinct_ids_have_distinct_names(
            a in endpoint(), pa in 0u32..12, la: bool, b in endpoint(), pb in 0u32..12, lb: bool,
        ) {
            let lane = |live| if live { Lane::Live } else { Lane::Backlog };
            let a = QueueId::in_lane(a, Priority(pa), lane(la));
            let b = QueueId::in_lane(b, Priority(pb), lane(lb));
            prop_assert_eq!(a == b, a.name().unwrap() == b.name().unwrap());
        }

        #[test]
        fn parsing_any_name_never_panics(text in ".{1,60}") {
            if let Ok(name) = QueueName::new(&text) {
                let _ = QueueId::parse(&name);
            }
        }
    }
}
