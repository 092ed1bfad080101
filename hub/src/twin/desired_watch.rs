//! What one connection last told its module about the desired properties, shared by the heads
//! (the MQTT desired-patch topic, the AMQP twin link's notifications).
//!
//! Guarantees: once started, [`DesiredWatch::next_patch`] gives the difference between what
//! the connection last sent (or what the twin held when it started) and the twin's desired
//! properties now, with their `$version`, or nothing if they did not change; several changes
//! between two calls are one patch. Stopped, it gives nothing.

use serde_json::{Map, Value};

use crate::identity::Identity;
use crate::twin::document::{desired_patch, with_version};
use crate::twin::{TwinError, Twins};

/// Desired properties and their `$version` (or a patch of them, with `$version` inside).
pub type Versioned = (u64, Map<String, Value>);

/// A connection's view of its module's desired properties; `None` while it does not listen.
#[derive(Debug, Default)]
pub struct DesiredWatch {
    sent: Option<Versioned>,
}

impl DesiredWatch {
    /// The connection listens to desired patches: from now on it is given every change after
    /// the desired properties last served to its module ([`Twins::desired_since_served`]), so
    /// a module that was away is first given what it missed by the next
    /// [`DesiredWatch::next_patch`] (a second start changes nothing).
    pub fn start(&mut self, twins: &Twins, identity: &Identity) -> Result<(), TwinError> {
        if self.sent.is_none() {
            let (served, _now) = twins.desired_since_served(&identity.module)?;
            self.sent = Some(served);
        }
        Ok(())
    }

    /// The connection stopped listening.
    pub fn stop(&mut self) {
        self.sent = None;
    }

    /// Whether the connection listens.
    pub fn is_started(&self) -> bool {
        self.sent.is_some()
    }

    /// The patch to send (its `$version`, and the members that changed with `$version` in
    /// it; removed members are `null`), if the connection listens and its module's desired
    /// properties differ from what it was told. Taken as sent.
    pub fn next_patch(
        &mut self,
        twins: &Twins,
        identity: &Identity,
    ) -> Result<Option<Versioned>, TwinError> {
        let Some((sent_version, sent)) = &self.sent else {
            return Ok(None);
        };
        let (version, desired) = twins.desired(&identity.module)?;
        if version == *sent_version && desired == *sent {
            return Ok(None);
        }
        let patch = with_version(&desired_patch(sent, &desired), version);
        self.sent = Some((version, desired));
        Ok(Some((version, patch)))
    }
}
