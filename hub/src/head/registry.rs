//! The live connections of both heads, one per identity: a new connection of an identity
//! replaces the old one (which closes after acknowledging what is durable), and a reload that
//! removes or re-keys a module closes its connection ([`Registry::evict`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::identity::Identity;

/// The close signals of a replicated module's connections, by connection id.
type Replicas = BTreeMap<u64, Arc<watch::Sender<bool>>>;

/// The live connections, one per identity; a new one replaces the old.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<Identity, (u64, watch::Sender<bool>)>>,
    /// Connections of replicated modules: several per identity, none replacing another (the
    /// replica machine decides who is a member and whom to close).
    members: Mutex<HashMap<Identity, Replicas>>,
}

impl Registry {
    /// Registers a connection of `identity`, telling any older one to close, if `still_valid()`
    /// holds, checked under the registry's lock (so in order with [`Registry::evict`]): a
    /// reload that removes or re-keys the module after this login checked its key either finds
    /// this connection and closes it, or is seen by `still_valid`. Returns its id and the
    /// signal that it was replaced; None, and nothing joined, if `still_valid()` fails.
    pub(crate) fn join_if(
        &self,
        identity: &Identity,
        still_valid: impl FnOnce() -> bool,
    ) -> Option<(u64, watch::Receiver<bool>)> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if !still_valid() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        if let Some((_, old)) = live.insert(identity.clone(), (id, tx)) {
            let _ = old.send(true);
        }
        Some((id, rx))
    }

    /// Registers a connection of a replicated module beside the others of its identity, if
    /// `still_valid()` holds under the registry's lock (as [`Registry::join_if`]). Returns its
    /// id, the signal that it must close, and the sender of that signal (for the replica
    /// machine's `Disconnect`).
    pub(crate) fn join_member_if(
        &self,
        identity: &Identity,
        still_valid: impl FnOnce() -> bool,
    ) -> Option<(u64, watch::Receiver<bool>, Arc<watch::Sender<bool>>)> {
        let _live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if !still_valid() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(identity.clone())
            .or_default()
            .insert(id, Arc::clone(&tx));
        Some((id, rx, tx))
    }

    /// Removes the connection if it is still the current one of its identity (or one of its
    /// replicas); true if it was.
    pub(crate) fn leave(&self, identity: &Identity, id: u64) -> bool {
        {
            let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(of) = members.get_mut(identity) {
                if of.remove(&id).is_some() {
                    if of.is_empty() {
                        members.remove(identity);
                    }
                    return true;
                }
            }
        }
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(identity).is_some_and(|(cur, _)| *cur == id) {
            live.remove(identity);
            return true;
        }
        false
    }

    /// Closes the live connection of `identity`, if any, as a newer connection would (its
    /// module was removed, or its key changed): it acknowledges what is durable and closes.
    /// True if there was one.
    pub fn evict(&self, identity: &Identity) -> bool {
        let old = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(identity);
        let replicas = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(identity)
            .unwrap_or_default();
        let any = old.is_some() || !replicas.is_empty();
        if let Some((_, tx)) = old {
            let _ = tx.send(true);
        }
        for tx in replicas.into_values() {
            let _ = tx.send(true);
        }
        any
    }

    /// Whether `identity` has a live connection (which a new one would replace).
    pub(crate) fn has_live(&self, identity: &Identity) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(identity)
    }

    /// Whether connection `id` is the current one of `identity` (for a replicated module: one
    /// of its live replicas).
    pub(crate) fn is_current(&self, identity: &Identity, id: u64) -> bool {
        let member = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .is_some_and(|m| m.contains_key(&id));
        member
            || self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(identity)
                .is_some_and(|(cur, _)| *cur == id)
    }

    /// Connections now.
    pub fn len(&self) -> usize {
        let replicas: usize = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(BTreeMap::len)
            .sum();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len() + replicas
    }

    /// True if no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_login_joins_only_if_still_valid_under_the_registry_lock_and_evict_closes_it() {
        let registry = Registry::default();
        let who = Identity::new(
            router::DeviceId::new("edge-device"),
            router::ModuleId::new("m"),
        );
        assert!(registry.join_if(&who, || false).is_none());
        assert!(!registry.has_live(&who), "nothing joined");
        let (id, mut closed) = registry.join_if(&who, || true).expect("joined");
        assert!(registry.is_current(&who, id));
        assert!(registry.evict(&who));
        assert!(*closed.borrow_and_update(), "told to close");
        assert!(!registry.has_live(&who));
        assert!(!registry.evict(&who), "nothing left to close");
    }

    #[test]
    fn replicas_of_one_identity_live_side_by_side_and_evict_closes_them_all() {
        let registry = Registry::default();
        let who = Identity::new(
            router::DeviceId::new("edge-device"),
            router::ModuleId::new("m"),
        );
        let (a, mut a_closed, _) = registry.join_member_if(&who, || true).expect("joined");
        let (b, mut b_closed, _) = registry.join_member_if(&who, || true).expect("joined");
        assert!(
            !*a_closed.borrow_and_update(),
            "a second replica replaces nobody"
        );
        assert!(registry.is_current(&who, a) && registry.is_current(&who, b));
        assert_eq!(registry.len(), 2);
        assert!(registry.leave(&who, a));
        assert!(!registry.is_current(&who, a));
        assert!(registry.evict(&who));
        assert!(*b_closed.borrow_and_update(), "told to close");
        assert!(registry.is_empty());
    }
}
