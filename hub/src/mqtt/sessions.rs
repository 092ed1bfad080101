//! Persistent MQTT sessions: which topic filters each client subscribed to.
//!
//! Guarantees: a session opened with clean-session 0 keeps its subscriptions across reconnects
//! and hub restarts (the Python SDK does not subscribe again after a reconnect, so losing them
//! would silently stop its input messages); clean-session 1 deletes them, and a clean session's
//! own subscriptions are never stored here (they live with its connection). Every change is on disk
//! before the SUBACK / CONNACK that reports it, and every answer about a session is given only
//! while this hub still owns the data directory: the file is this owner's copy
//! ([`crate::owned_file`]), so a hub that a newer one has fenced, before it noticed, can neither
//! acknowledge a subscription the live hub will not know nor overwrite the live hub's. A damaged
//! file is an error naming the file, never an empty session (that would stop deliveries without
//! a word).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::owned_file::{OwnedFile, OwnedFileError, Ownership};

/// Name of the sessions file inside the data directory, before the owner's generation:
/// `mqtt-sessions.{generation}.json` (`mqtt-sessions.json` before copies were numbered).
pub const SESSIONS_STEM: &str = "mqtt-sessions";

/// Reading or writing the sessions file failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionsError {
    /// The file could not be read or written, or this hub no longer owns the data directory.
    #[error(transparent)]
    File(#[from] OwnedFileError),
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
    file: OwnedFile,
    state: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Sessions {
    /// Loads the sessions kept in `data_dir` by the newest earlier owner (none if there are
    /// none yet); this hub, `owner`, keeps them in its own copy from now on.
    pub fn load(data_dir: &Path, owner: Arc<dyn Ownership>) -> Result<Sessions, SessionsError> {
        let (file, content) = OwnedFile::open(data_dir, SESSIONS_STEM, owner)?;
        let state = match content {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| SessionsError::Damaged {
                path: file.path().to_owned(),
                reason: e.to_string(),
            })?,
            None => BTreeMap::new(),
        };
        Ok(Sessions {
            file,
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
        let changed = if clean {
            state.remove(client).is_some()
        } else {
            !present && state.insert(client.to_owned(), Vec::new()).is_none()
        };
        self.persist_if(changed, &state)?;
        Ok(present && !clean)
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
        let changed = entry.len() != before;
        self.persist_if(changed, &state)
    }

    /// Removes filters from a client's session, durably.
    pub fn unsubscribe(&self, client: &str, filters: &[String]) -> Result<(), SessionsError> {
        let mut state = self.lock();
        let mut changed = false;
        if let Some(entry) = state.get_mut(client) {
            let before = entry.len();
            entry.retain(|f| !filters.contains(f));
            changed = entry.len() != before;
        }
        self.persist_if(changed, &state)
    }

    /// Writes the file durably if `changed`, and in any case checks that this hub still owns
    /// the data directory: the caller's answer (SUBACK, CONNACK, UNSUBACK) goes out only then.
    /// Called from connection tasks: on the hub's multi-thread runtime the blocking write and
    /// fsyncs run under `block_in_place`, so the worker's other connections move to another
    /// thread instead of waiting for the disk.
    fn persist_if(
        &self,
        changed: bool,
        state: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), SessionsError> {
        let work = || -> Result<(), SessionsError> {
            if !changed {
                return Ok(self.file.check_owner()?);
            }
            let bytes = serde_json::to_vec_pretty(state).map_err(|e| SessionsError::Damaged {
                path: self.file.path().to_owned(),
                reason: e.to_string(),
            })?;
            Ok(self.file.write(&bytes)?)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(work)
            }
            _ => work(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store of `dir` as a hub does at start (each open is a newer owner) and loads
    /// the sessions as that owner.
    fn load(dir: &Path) -> (store::Store, Sessions) {
        let store =
            store::Store::open(dir.join("store"), store::StoreOptions::default()).expect("store");
        let sessions = Sessions::load(dir, Arc::new(store.clone())).expect("load");
        (store, sessions)
    }

    #[test]
    fn a_persistent_session_keeps_its_subscriptions_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, s) = load(dir.path());
        assert!(!s.open("d/m", false).expect("open"), "no session yet");
        s.subscribe("d/m", &["devices/d/modules/m/inputs/#".into()])
            .expect("subscribe");
        drop(s);
        let (_store, again) = load(dir.path());
        assert!(again.open("d/m", false).expect("open"), "session present");
        assert_eq!(
            again.get("d/m"),
            Some(vec!["devices/d/modules/m/inputs/#".to_string()])
        );
    }

    #[test]
    fn a_clean_session_discards_what_was_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, s) = load(dir.path());
        s.open("d/m", false).expect("open");
        s.subscribe("d/m", &["f".into()]).expect("subscribe");
        assert!(!s.open("d/m", true).expect("clean open"));
        drop(s);
        assert_eq!(load(dir.path()).1.get("d/m"), None);
    }

    #[test]
    fn sessions_written_before_copies_were_numbered_are_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("mqtt-sessions.json"),
            br#"{"d/m": ["devices/d/modules/m/inputs/#"]}"#,
        )
        .expect("write");
        let (_store, s) = load(dir.path());
        assert!(s.open("d/m", false).expect("open"), "session present");
        assert!(!dir.path().join("mqtt-sessions.json").exists());
    }

    #[test]
    fn a_fenced_hub_answers_nothing_about_sessions_and_the_live_hub_keeps_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_old_store, old) = load(dir.path());
        old.open("d/m", false).expect("open");
        old.subscribe("d/m", &["a".into()]).expect("subscribe");
        let (_store, live) = load(dir.path());
        live.subscribe("d/x", &["x".into()])
            .expect("subscribe on the live hub");
        for refused in [
            old.subscribe("d/m", &["b".into()]),
            // Already stored: nothing to write, still not to be acknowledged.
            old.subscribe("d/m", &["a".into()]),
            old.unsubscribe("d/m", &["a".into()]),
            old.open("d/m", false).map(|_| ()),
        ] {
            let err = refused.expect_err("a fenced hub answered");
            assert!(err.to_string().contains("fenced"), "{err}");
        }
        // The live hub's subscriptions were not overwritten by the fenced one.
        drop(live);
        let (_store, next) = load(dir.path());
        assert_eq!(next.get("d/m"), Some(vec!["a".to_string()]));
        assert_eq!(next.get("d/x"), Some(vec!["x".to_string()]));
    }

    #[test]
    fn a_damaged_sessions_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mqtt-sessions.json"), b"{not json").expect("write");
        let store = store::Store::open(dir.path().join("store"), store::StoreOptions::default())
            .expect("store");
        let err = Sessions::load(dir.path(), Arc::new(store)).expect_err("damaged");
        assert!(err.to_string().contains("mqtt-sessions"), "{err}");
    }
}
