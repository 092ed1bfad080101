//! What the MQTT and AMQP heads share: the context every connection serves in
//! ([`context::HeadContext`]: router, dispatcher, identities, live connections, metrics,
//! shutdown), the [`registry::Registry`] of live connections, the TLS accept loop with its
//! connection budget ([`accept`]), the sink that hands deliveries to a connected module
//! ([`sink::ModuleInputSink`]), a replicated module's connection as a member of its inputs'
//! replica machines ([`replica::Membership`]), and the message size limit.
//!
//! Both heads depend on this module and never on each other; it knows neither protocol.

pub mod accept;
pub mod context;
pub mod registry;
pub(crate) mod replica;
pub mod sink;

/// Largest message body a module may publish, on either head (edgeHub's
/// `MaxInboundMessageSize`).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
