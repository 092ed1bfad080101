//! The route language of edgehub: what a message is, which routes select it, and which
//! endpoints receive it at what priority and TTL.
//!
//! This crate is pure. It does no I/O, opens no sockets, reads no files, spawns no tasks and
//! knows no wire protocol: protocol heads build [`Message`]s, and the manifest arrives as text.
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

pub mod error;
pub mod manifest;
pub mod message;
pub mod route;

pub use error::{ManifestError, ManifestIssue, RouteParseError, RouteParseErrorKind};
pub use manifest::{
    parse_deployment, parse_edge_hub_desired, Deployment, EdgeHubConfig, SchemaVersion,
};
pub use message::{DeviceId, InputName, Message, ModuleId, OutputName, Source, SystemProperty};
pub use route::{
    Condition, Endpoint, EndpointId, Priority, Route, RouteId, RouteTable, Target, Targets, Ttl,
};
