//! edgehub on Kubernetes: the `EdgeDeployment` custom resource and the controller that turns
//! one into a hub StatefulSet and one singleton workload per module.
//!
//! The controller talks to the hub only through what a user could also use: the deployment
//! manifest (a mounted ConfigMap the hub reloads live), the hub's CLI flags, mounted files
//! (certificates, module keys) and its HTTP endpoints (`/readyz`, `/healthz`, `/metrics`).

pub mod types;
