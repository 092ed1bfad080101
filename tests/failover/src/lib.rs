//! edgehub's failover simulation (issue 15): "nodes" are network namespaces each running the
//! `edgehub` binary, the "replicated volume" is one data directory both use, the "Service" is a
//! TCP forwarder that follows the pod the simulation designates (closing connections to the old
//! one, as endpoints move), and the modules are the official Python SDK scripts of `tests/sdk`,
//! reconnecting on their own. Each run writes a [`verdict::Verdict`]; [`summary`] tabulates them.
//!
//! The simulation plays the controller: the first hub starts at epoch 1 and every takeover
//! starts the new hub at the old one's epoch + 1 (`--epoch`, the contract of issue 15).

pub mod error;
pub mod forward;
pub mod module;
pub mod net;
pub mod node;
pub mod scenario;
pub mod summary;
pub mod verdict;

pub use error::SimError;
pub use scenario::{run, Config, Scenario};
pub use verdict::Verdict;
