//! The AMQP 1.0 head (AMQPS on 5671): what the Node, C# and Java SDKs speak by default
//! (reference §2). It adapts fe2o3-amqp's listener (the acceptor) to the same core as the MQTT
//! head: [`HeadContext`](crate::head::context::HeadContext) (router, dispatcher, identities,
//! registry of live connections, metrics, shutdown) and the SAS tokens of [`crate::auth::sas`].
//!
//! Layout: [`listener`] (TLS, one task per connection) → [`connection`] (protocol header, SASL,
//! sessions, attach decisions) → [`cbs`] (the `$cbs` node) and [`links`] (events and inputs).
//! The protocol decisions are I/O-free in [`auth_state`]; message mapping is in [`convert`].
//!
//! Guarantees the head keeps (as the MQTT head): an events transfer is `accepted` only after it
//! is durable, in arrival order; the sender of a message is the authenticated identity of its
//! link, never a property; a link of a module is attached only on a connection where that module
//! authenticated; a bad connection affects only itself.

pub mod auth_state;
pub mod cbs;
pub mod connection;
pub mod convert;
pub mod frame_guard;
pub mod links;
pub mod listener;
pub mod sasl;
