//! edgehub on Kubernetes: the `EdgeDeployment` custom resource and the controller that turns
//! one into a hub StatefulSet and one workload per module (a singleton, or up to the
//! module's `x-edgehub-replicas` count).
//!
//! The controller talks to the hub only through what a user could also use: the deployment
//! manifest (a mounted ConfigMap the hub reloads live), the hub's CLI flags, mounted files
//! (certificates, module keys) and its HTTP endpoints (`/readyz`, `/healthz`, `/metrics`).
//!
//! One job per module:
//! - [`agent`]: the manifest's `$edgeAgent` modules (and `$edgeHub`, through the hub's parser);
//! - [`create_options`]: Docker createOptions → pod pieces, naming what is not translated;
//! - [`names`]: object names and labels;
//! - [`tls`], [`keys`]: the generated secret material;
//! - [`desired`]: the pure builders of every object;
//! - [`failover`]: the store epoch and the node-loss policy's pure decision;
//! - [`replicas`]: a replicated module's StatefulSet scale, the pure decision;
//! - [`render`]: `edgehub-controller render` (the builders, offline, with placeholders).

pub mod agent;
pub mod create_options;
pub mod desired;
pub mod failover;
pub mod http;
pub mod keys;
pub mod lease;
pub mod names;
pub mod reconcile;
pub mod render;
pub mod replicas;
pub mod tls;
pub mod types;
