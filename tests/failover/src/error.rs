//! Why a simulation run could not be carried out (a broken run, not a failed verdict).

use std::path::PathBuf;

/// A run that could not be set up or driven to its end.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A command the simulation runs (`ip`, `kill`, the hub's CLI) failed.
    #[error("{what}: {detail}")]
    Command {
        /// The command line.
        what: String,
        /// Its stderr or the spawn error.
        detail: String,
    },
    /// Spawning or talking to a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A hub did not become ready (its log's tail is in `log`).
    #[error("hub {node} did not become ready ({why}); log {log}")]
    NotReady {
        /// "a" or "b".
        node: String,
        /// Exited (with its status) or the failure bound passed.
        why: String,
        /// Where its log is.
        log: PathBuf,
    },
    /// A step of a run did not happen within its failure bound (a module's acknowledgements,
    /// a stale hub meeting a publish).
    #[error("{what}: {detail}")]
    Stalled {
        /// The run and the step.
        what: String,
        /// What the processes said.
        detail: String,
    },
    /// The SDK harness is not installed.
    #[error("SDK harness not ready: {0}; run scripts/install-sdks.sh")]
    Sdk(String),
    /// A verdict file could not be written or read.
    #[error("verdict {path}: {detail}")]
    Verdict {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

impl SimError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> SimError {
        SimError::Io {
            what: what.into(),
            source,
        }
    }
}
