//! The route language of edgehub: what a message is, which routes select it, and which
//! endpoints receive it at what priority and TTL.
//!
//! The route language (`message`, `route`, `manifest`) is pure: no I/O, no tasks, no wire
//! protocol. Protocol heads build [`Message`]s, and the manifest arrives as text.
//!
//! Delivery (`router`, `dispatcher`, `endpoint_worker`) uses the `store` crate and tokio tasks,
//! but never a socket, TLS, a protocol crate or a CLI: heads plug in through [`Sink`].
//!
//! # Data path
//!
//! ```text
//! head ──▶ Router::route ──▶ Store::append (one copy, every target queue; durable = ack)
//!                                │  one queue per (endpoint, priority[, live lane]): QueueId
//!                                ▼
//!          EndpointWorker (one per endpoint, owned by the Dispatcher)
//!            read highest priority first ──▶ Sink::send ──▶ DeliveryOutcome per message
//!            ──▶ Checkpointer (contiguous completed prefix) ──▶ Store::checkpoint
//! ```
//!
//! Modules depend one way only: `router` → `dispatcher` → `endpoint_worker` → (`checkpoint`,
//! `codec`, `events`, `expiry`, `flow`, `queue_id`, `retry`, `sink`) → `route` → `message`; `manifest` →
//! `error` → `replicas` → `route`. The route language (`route`, `message`) names no store
//! queue: the router binds each route of the table it installs to its queue.
//!
//! Pure pieces, each unit-tested on its own: [`codec`] (stored bytes), [`queue_id`] (queue
//! names), [`checkpoint`] (contiguous-prefix rule), [`retry`] (backoff), [`expiry`] (TTL),
//! [`endpoint_worker::state`] (the worker's state machine), [`flow`] (when a producer is held: flow
//! control for online endpoints), [`replicas`] (module replicas: the
//! partition of a message, rendezvous assignment, and the membership and fenced-handoff machine;
//! not driven by anything yet).
//!
//! Invariants the crate guarantees:
//! - Parsing never panics, whatever the input; every failure is a typed error. A route error
//!   names the route and the 1-based column; a manifest error lists every problem found, each
//!   naming its route and column or its JSON path.
//! - The route grammar, lexer, operators, builtins and `$`-name resolution are edgeHub's
//!   (Azure IoT Edge `Routing.Core`), including its case rules and `FROM` prefix matching, so a
//!   manifest means here what it meant there.
//! - Condition evaluation is total and three-valued; a route matches only when its condition
//!   is exactly true (Undefined counts as false).
//! - [`RouteTable::targets`] yields at most one [`Target`] per endpoint: the matching route with
//!   the numerically lowest priority decides priority and TTL. No match is reported as
//!   [`Targets::is_unrouted`], never silently.
//! - A [`RouteTable`] is immutable; configuration changes replace it whole.
//! - [`Router::route`] acknowledges a message only once it is durable in every target queue.
//! - Each endpoint's queues are offered to its sink in order, highest priority first; after a
//!   failure delivery resumes at the first incomplete message (duplicates, never gaps). Every
//!   message leaves a queue delivered, expired, rejected, set aside or (live lane) moved to the
//!   backlog lane, and each is counted. With `x-edgehub-liveFirstSecs`, order is kept within
//!   each lane and a live message may overtake the backlog (see [`endpoint_worker`]).

pub mod checkpoint;
pub mod codec;
pub mod dispatcher;
pub mod endpoint_worker;
pub mod error;
mod events;
pub mod expiry;
pub mod flow;
pub mod manifest;
pub mod message;
pub mod queue_id;
pub mod replica_worker;
pub mod replicas;
pub mod retry;
pub mod route;
pub mod router;
pub mod sink;

pub use dispatcher::{
    Dispatcher, DispatcherConfig, DispatcherError, DispatcherHandle, EndpointPolicy,
};
pub use error::{ManifestError, ManifestIssue, RouteParseError, RouteParseErrorKind};
pub use events::RouterMetrics;
pub use expiry::TokioClock;
pub use flow::{EndpointFlow, FlowBound, FlowHold, FlowStats, Lag, DEFAULT_MAX_LAG};
pub use manifest::{
    parse_deployment, parse_edge_hub_desired, Deployment, EdgeHubConfig, SchemaVersion,
};
pub use message::{DeviceId, InputName, Message, ModuleId, OutputName, Source, SystemProperty};
pub use queue_id::{Lane, QueueId, QueueIdError};
pub use retry::RetryPolicy;
pub use route::{
    Condition, DeliveryOptions, Endpoint, EndpointId, Priority, Route, RouteId, RouteTable, Target,
    Targets, Ttl,
};
pub use router::{RouteAck, RouteError, RouteOutcome, Router};
pub use sink::{Delivery, DeliveryOutcome, DynSink, FailureKind, Progress, RejectReason, Sink};
pub use store::AppendChain;
