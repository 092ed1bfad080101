//! Routes and the route table: which endpoints a message goes to, at what priority and TTL.
//!
//! Guarantees:
//! - A [`RouteTable`] is immutable; a configuration change builds a new one and swaps it whole.
//! - [`RouteTable::targets`] evaluates every route and returns at most one [`Target`] per
//!   endpoint, sorted by [`EndpointId`]. When several matching routes share an endpoint, the
//!   route with the numerically lowest [`Priority`] wins and its TTL applies (edgeHub
//!   `Evaluator`). On equal priority the longest TTL wins (so no matching route's promise is cut
//!   short), then the smallest [`RouteId`], so the outcome never depends on manifest key order.
//! - A message that no route matches yields [`Targets::is_unrouted`], so the caller can drop
//!   and count it (`reason="no_route"`).
//! - The route that decides priority and TTL for an endpoint also decides its edgehub delivery
//!   extensions ([`DeliveryOptions`]: head-of-line policy, live-first); they are stamped on the
//!   message at enqueue, like the TTL.

pub(crate) mod body;
mod builtins;
pub mod condition;
pub mod endpoint;
pub mod error;
mod lexer;
pub mod parse;

pub use condition::{Condition, EvalContext, Value};
pub use endpoint::{Endpoint, EndpointId};
pub use parse::{RouteSpec, SourcePattern};
use std::collections::BTreeMap;
use std::fmt;

use crate::message::Message;
use crate::route::error::RouteParseError;

/// A route's name in the manifest (the key under `routes`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteId(String);

impl RouteId {
    /// Wraps a route name.
    pub fn new(name: impl Into<String>) -> Self {
        RouteId(name.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Delivery priority: 0 is the most urgent. Manifests allow 0–9; a route without one gets
/// [`Priority::DEFAULT`], edgeHub's internal default, below every explicit priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub u32);

impl Priority {
    /// The priority of a route that names none (edgeHub `RouteFactory.DefaultPriority`).
    pub const DEFAULT: Priority = Priority(2_000_000_000);
    /// The highest priority a manifest may give.
    pub const HIGHEST: Priority = Priority(0);
    /// The lowest priority a manifest may give explicitly.
    pub const LOWEST_EXPLICIT: Priority = Priority(9);
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

/// How long a message may wait in an endpoint queue before it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ttl {
    /// Never expires (a negative `storeAndForwardConfiguration.timeToLiveSecs`).
    Infinite,
    /// Expires this many seconds after it is enqueued.
    Seconds(u64),
}

impl Ttl {
    /// Whether `self` keeps messages at least as long as `other`.
    pub fn outlasts(self, other: Ttl) -> bool {
        match (self, other) {
            (Ttl::Infinite, _) => true,
            (Ttl::Seconds(_), Ttl::Infinite) => false,
            (Ttl::Seconds(a), Ttl::Seconds(b)) => a >= b,
        }
    }
}

/// edgehub extensions to a route's delivery (manifest keys `x-edgehub-…`, schema 1.1 and up).
/// The default is edgeHub's behaviour: no extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryOptions {
    /// `x-edgehub-setAsideAfter`: set a message aside (count it and go on) after this many failed
    /// attempts. `None` leaves the endpoint's policy in force (by default strict: the head of the
    /// queue is retried until delivered or expired).
    pub set_aside_after: Option<u32>,
    /// `x-edgehub-liveFirstSecs`: messages younger than this many seconds are served ahead of the
    /// endpoint's backlog at the same priority (a separate "live" queue; see the endpoint worker).
    pub live_first_secs: Option<u32>,
}

impl DeliveryOptions {
    /// Whether no extension is set.
    pub fn is_default(&self) -> bool {
        *self == DeliveryOptions::default()
    }
}

/// One compiled route.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    id: RouteId,
    source: SourcePattern,
    condition: Option<Condition>,
    endpoint: Endpoint,
    priority: Priority,
    ttl: Ttl,
    options: DeliveryOptions,
    /// The endpoint's id, worked out once when the route is built (not per message).
    endpoint_id: EndpointId,
}

impl Route {
    /// Parses and compiles route text. `ttl` is the route's effective TTL (its own
    /// `timeToLiveSecs`, or the store-wide TTL when it has none).
    pub fn parse(
        id: RouteId,
        text: &str,
        priority: Priority,
        ttl: Ttl,
    ) -> Result<Self, RouteParseError> {
        let spec = parse::parse_route(&id, text)?;
        let condition = match &spec.condition {
            Some(expr) => Some(Condition::compile(&id, expr, &spec.source)?),
            None => None,
        };
        let options = DeliveryOptions::default();
        Ok(Route {
            id,
            source: spec.source,
            condition,
            endpoint_id: spec.endpoint.id(),
            endpoint: spec.endpoint,
            priority,
            ttl,
            options,
        })
    }

    /// The route with edgehub delivery extensions.
    #[must_use]
    pub fn with_options(mut self, options: DeliveryOptions) -> Self {
        self.options = options;
        self
    }

    /// The route's edgehub delivery extensions.
    pub fn options(&self) -> DeliveryOptions {
        self.options
    }

    /// The route's name.
    pub fn id(&self) -> &RouteId {
        &self.id
    }

    /// The `FROM` pattern.
    pub fn source(&self) -> &SourcePattern {
        &self.source
    }

    /// The `INTO` endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The route's priority.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The route's effective TTL.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// Whether the context's message is selected by `FROM` and satisfies `WHERE`.
    pub fn matches(&self, ctx: &EvalContext<'_>) -> bool {
        self.source.matches_key(ctx.source_key())
            && self
                .condition
                .as_ref()
                .is_none_or(|c| c.evaluate(ctx).is_true())
    }
}

/// Where one copy of a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The endpoint that receives the copy.
    pub endpoint: Endpoint,
    /// The priority queue it is stored in.
    pub priority: Priority,
    /// Its TTL, stamped at enqueue.
    pub ttl: Ttl,
    /// The route that decided priority and TTL.
    pub route: RouteId,
    /// That route's edgehub delivery extensions.
    pub options: DeliveryOptions,
    /// Where that route stands in the table's [`RouteTable::routes`], for a caller that keeps
    /// something per route of a table (the router keeps each route's store queue).
    pub route_index: usize,
}

/// The targets of one message: at most one per endpoint, sorted by endpoint id.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[must_use = "an unrouted message must be dropped and counted"]
pub struct Targets(Vec<Target>);

impl Targets {
    /// True when no route matched: the message is dropped (`reason="no_route"`).
    pub fn is_unrouted(&self) -> bool {
        self.0.is_empty()
    }

    /// The targets, sorted by endpoint id.
    pub fn as_slice(&self) -> &[Target] {
        &self.0
    }

    /// The targets as a vector.
    pub fn into_vec(self) -> Vec<Target> {
        self.0
    }
}

impl IntoIterator for Targets {
    type Item = Target;
    type IntoIter = std::vec::IntoIter<Target>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// An immutable set of routes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// A table of `routes`, kept sorted by route id.
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by(|a, b| a.id.cmp(&b.id));
        RouteTable { routes }
    }

    /// The routes, sorted by id.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Every endpoint some route delivers to, without duplicates, sorted by id.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let by_id: BTreeMap<EndpointId, &Endpoint> = self
            .routes
            .iter()
            .map(|r| (r.endpoint.id(), &r.endpoint))
            .collect();
        by_id.into_values().cloned().collect()
    }

    /// Where `msg` goes: one target per endpoint, or unrouted.
    pub fn targets(&self, msg: &Message) -> Targets {
        let ctx = EvalContext::new(msg);
        let mut best: BTreeMap<&EndpointId, (usize, &Route)> = BTreeMap::new();
        for (index, route) in self
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(&ctx))
        {
            best.entry(&route.endpoint_id)
                .and_modify(|current| {
                    if wins_over(route, current.1) {
                        *current = (index, route);
                    }
                })
                .or_insert((index, route));
        }
        Targets(
            best.into_values()
                .map(|(index, route)| target(index, route))
                .collect(),
        )
    }
}

/// Whether `candidate` should decide priority and TTL instead of `current` (routes are visited
/// in id order, so an exact tie keeps the smaller id).
fn wins_over(candidate: &Route, current: &Route) -> bool {
    match candidate.priority.cmp(&current.priority) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => {
            candidate.ttl != current.ttl && candidate.ttl.outlasts(current.ttl)
        }
    }
}

fn target(route_index: usize, route: &Route) -> Target {
    Target {
        endpoint: route.endpoint.clone(),
        priority: route.priority,
        ttl: route.ttl,
        route: route.id.clone(),
        options: route.options,
        route_index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeviceId, ModuleId, OutputName, Source};

    fn route(id: &str, text: &str, priority: u32, ttl: Ttl) -> Route {
        Route::parse(RouteId::new(id), text, Priority(priority), ttl).expect("route compiles")
    }

    fn output(module: &str, output: &str) -> Message {
        let source = Source::ModuleOutput {
            device: DeviceId::new("edge"),
            module: ModuleId::new(module),
            output: Some(OutputName::new(output)),
        };
        Message::new(source, "{}")
    }

    #[test]
    fn several_routes_to_one_endpoint_give_one_copy_at_the_lowest_priority() {
        let table = RouteTable::new(vec![
            route("a", "FROM /messages/* INTO $upstream", 5, Ttl::Seconds(10)),
            route(
                "b",
                "FROM /messages/modules/m/* INTO $upstream",
                1,
                Ttl::Seconds(20),
            ),
        ]);
        let targets = table.targets(&output("m", "o")).into_vec();
        assert_eq!(targets.len(), 1);
        assert_eq!(
            (targets[0].priority, targets[0].ttl),
            (Priority(1), Ttl::Seconds(20))
        );
        assert_eq!(targets[0].route, RouteId::new("b"));
    }

    #[test]
    fn equal_priority_keeps_the_longest_ttl() {
        let table = RouteTable::new(vec![
            route("a", "FROM /* INTO $upstream", 2, Ttl::Seconds(10)),
            route("b", "FROM /* INTO $upstream", 2, Ttl::Infinite),
            route("c", "FROM /* INTO $upstream", 2, Ttl::Seconds(99)),
        ]);
        let targets = table.targets(&output("m", "o")).into_vec();
        assert_eq!(targets[0].ttl, Ttl::Infinite);
    }

    #[test]
    fn different_endpoints_each_get_a_copy_and_nothing_matched_is_unrouted() {
        let table = RouteTable::new(vec![
            route("up", "FROM /messages/* INTO $upstream", 0, Ttl::Infinite),
            route(
                "m",
                "FROM /messages/modules/a/* INTO BrokeredEndpoint('/modules/b/inputs/in')",
                0,
                Ttl::Infinite,
            ),
        ]);
        assert_eq!(table.targets(&output("a", "o")).as_slice().len(), 2);
        let twin = Message::new(
            Source::TwinChange {
                device: DeviceId::new("d"),
                module: None,
            },
            "{}",
        );
        assert!(table.targets(&twin).is_unrouted());
        assert_eq!(table.endpoints().len(), 2);
    }
}
