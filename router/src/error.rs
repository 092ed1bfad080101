//! Errors of the route language and of manifest parsing. The route language's own errors live
//! in `route::error` (the route language depends on nothing above it) and are re-exported here.
//!
//! Every route error names the route and the 1-based column it points at; every structural
//! manifest error names the JSON path of the offending value.

use std::fmt;

use thiserror::Error;

pub use crate::route::error::{RouteParseError, RouteParseErrorKind};

use crate::message::ModuleId;
use crate::replicas::ReplicaSettingError;

/// One problem found in a manifest.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ManifestIssue {
    /// A route expression that does not parse or compile.
    #[error(transparent)]
    Route(#[from] RouteParseError),
    /// A value that is missing, of the wrong type or out of range.
    #[error("{path}: {reason}")]
    Structure {
        /// JSON path of the offending value, e.g. `routes.r1.priority`.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A module's `x-edgehub-replicas` setting (or an unknown `x-edgehub…` key on a module).
    #[error("{path}: {error}")]
    Replicas {
        /// JSON path of the offending value, naming the module and the field, e.g.
        /// `modulesContent.$edgeAgent.properties.desired.modules.filter.x-edgehub-replicas.count`.
        path: String,
        /// The module whose setting is refused.
        module: ModuleId,
        /// What is wrong with it.
        error: ReplicaSettingError,
    },
}

/// Every problem found in a manifest (never only the first).
#[derive(Clone, Debug, PartialEq, Error)]
pub struct ManifestError {
    /// All problems, in document order where it is known.
    pub issues: Vec<ManifestIssue>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the manifest", self.issues.len())?;
        for issue in &self.issues {
            write!(f, "; {issue}")?;
        }
        Ok(())
    }
}
