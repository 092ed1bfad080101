//! The edgehub hub: protocol heads and everything around them that a user touches.
//!
//! It adapts the outside world to the core: MQTT 3.1.1 and AMQP 1.0 over TLS for modules written
//! with the official Azure IoT SDKs, SAS-token authentication, module identities and their keys,
//! the hub's own certificate authority, the command line, and the HTTP surface (`/metrics`,
//! `/healthz`, `/readyz`). The core (`router`, `store`) never imports this crate.
//!
//! Guarantees the heads keep (see ARCHITECTURE.md): a publish is acknowledged only after
//! `router::Router::route` says it is durable, acknowledgements go out in the order the publishes
//! arrived, and an identity is taken only from what was authenticated, never from a topic.

pub mod amqp;
pub mod auth;
pub mod fsutil;
pub mod head;
pub mod http;
pub mod https;
pub mod identity;
pub mod initlock;
pub mod limits;
pub mod methods;
pub mod metrics;
pub mod module_key;
pub mod mqtt;
pub mod owned_file;
pub mod property_bag;
pub mod record;
pub mod reload;
pub mod server;
pub mod settings;
pub mod tls;
pub mod twin;
pub mod upstream;
