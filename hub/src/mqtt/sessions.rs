//! Persistent MQTT sessions: which topic filters each client subscribed to.
//!
//! Guarantees: a session opened with clean-session 0 keeps its subscriptions across reconnects
//! and hub restarts (the Python SDK does not subscribe again after a reconnect, so losing them
//! would silently stop its input messages); clean-session 1 deletes them, and a clean session's
//! own subscriptions are never stored here (they live with its connection). Every change is on disk
//! before the SUBACK / CONNACK that reports it: the file is written whole to a temporary name,
//! fdatasynced, renamed over the old one, and the directory is fsynced. A damaged file is an error
//! naming the file, never an empty session (that would stop deliveries without a word).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File holding the sessions inside the data directory.
pub const SESSIONS_FILE: &str = "mqtt-sessions.json";

/// Reading or writing the sessions file failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// The filesystem refused an operation.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what this program writes.
    #[error(
        "{path} is damaged ({reason}); restore it or remove it (clients then subscribe again)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The subscriptions of every client with a persistent session, keyed by client id.
#[derive(Debug)]
pub struct Sessions {
    path: PathBuf,
    dir: PathBuf,
    state: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Sessions {
    /// Loads the sessions kept in `data_dir` (none if the file does not exist yet).
    pub fn load(data_dir: &Path) -> Result<Sessions, SessionsError> {
        let path = data_dir.join(SESSIONS_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SessionsError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(SessionsError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        Ok(Sessions {
            path,
            dir: data_dir.to_owned(),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The filters `client` has subscribed to, if it has a persistent session.
    pub fn get(&self, client: &str) -> Option<Vec<String>> {
        self.lock().get(client).cloned()
    }

    /// Opens a session: clean-session 1 deletes any stored one; clean-session 0 keeps it (or
    /// starts an empty one). Returns whether a stored session was present (CONNACK's flag).
    pub fn open(&self, client: &str, clean: bool) -> Result<bool, SessionsError> {
        let mut state = self.lock();
        let present = state.contains_key(client);
        if clean {
            if present {
                state.remove(client);
                self.persist(&state)?;
            }
            return Ok(false);
        }
        if !present {
            state.insert(client.to_owned(), Vec::new());
            self.persist(&state)?;
        }
        Ok(present)
    }

    /// Adds filters to a client's session (no duplicates), durably.
    pub fn subscribe(&self, client: &str, filters: &[String]) -> Result<(), SessionsError> {
        let mut state = self.lock();
        let entry = state.entry(client.to_owned()).or_default();
        let before = entry.len();
        for f in filters {
            if !entry.contains(f) {
                entry.push(f.clone());
            }
        }
        if entry.len() != before {
            self.persist(&state)?;
        }
        Ok(())
    }

    /// Removes filters from a client's session, durably.
    pub fn unsubscribe(&self, client: &str, filters: &[String]) -> Result<(), SessionsError> {
        let mut state = self.lock();
        if let Some(entry) = state.get_mut(client) {
            let before = entry.len();
            entry.retain(|f| !filters.contains(f));
            if entry.len() != before {
                self.persist(&state)?;
            }
        }
        Ok(())
    }

    /// Writes the file durably. Called from connection tasks: on the hub's multi-thread
    /// runtime the blocking write and fsyncs run under `block_in_place`, so the worker's other
    /// connections move to another thread instead of waiting for the disk.
    fn persist(&self, state: &BTreeMap<String, Vec<String>>) -> Result<(), SessionsError> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.write_file(state))
            }
            _ => self.write_file(state),
        }
    }

    fn write_file(&self, state: &BTreeMap<String, Vec<String>>) -> Result<(), SessionsError> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| SessionsError::Io { op, path, source }
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| SessionsError::Damaged {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_data().map_err(io("fdatasync", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("rename", &tmp))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", &self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_persistent_session_keeps_its_subscriptions_across_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sessions::load(dir.path()).expect("load");
        assert!(!s.open("d/m", false).expect("open"), "no session yet");
        s.subscribe("d/m", &["devices/d/modules/m/inputs/#".into()])
            .expect("subscribe");
        let again = Sessions::load(dir.path()).expect("reload");
        assert!(again.open("d/m", false).expect("open"), "session present");
        assert_eq!(
            again.get("d/m"),
            Some(vec!["devices/d/modules/m/inputs/#".to_string()])
        );
    }

    #[test]
    fn a_clean_session_discards_what_was_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Sessions::load(dir.path()).expect("load");
        s.open("d/m", false).expect("open");
        s.subscribe("d/m", &["f".into()]).expect("subscribe");
        assert!(!s.open("d/m", true).expect("clean open"));
        assert_eq!(Sessions::load(dir.path()).expect("reload").get("d/m"), None);
    }

    #[test]
    fn a_damaged_sessions_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SESSIONS_FILE), b"{not json").expect("write");
        let err = Sessions::load(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains(SESSIONS_FILE), "{err}");
    }
}
