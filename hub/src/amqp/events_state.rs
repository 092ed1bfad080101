//! A module's events link (the transfers it sends the hub) as a state machine, pure data:
//! `(state, event) → action`, with no I/O.
//!
//! The driver (`links.rs`, `serve_events`) waits on what the machine lets it wait on (a
//! settlement always; a transfer, or the connection stopping, only while
//! [`EventsLink::is_reading`]) and reports each as an [`Event`]; it performs the [`Action`] the
//! machine answers and holds no other control state.
//!
//! ```text
//!            Transfer ─▶ Route (or Fail, after a refusal)
//!            Refused  ─▶ remember it: every later transfer fails without being routed
//!  Reading ── fatal Settled / ReadFailed / Stopped / HandOffFailed ──▶ Draining
//!  Reading, Draining ── SettlementsEnded ──▶ Closed: Close { error: the first fatal reason }
//! ```
//!
//! - **Nothing is routed after a refusal.** Once the store refused a message at once, every
//!   later transfer of the link is failed in turn without being routed, so a resend cannot be
//!   overtaken.
//! - **A fatal settlement stops the reading.** After the first fatal rejection (a message that
//!   could not be stored) no transfer is read; what is queued is still settled, in order, and
//!   the link closes with that first reason.
//! - **The link closes only when every settlement was sent** (the settlements end when the
//!   acker has answered everything queued, which it does once reading stops).

/// Where the events link is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventsLink {
    /// Transfers are read (and handed to the acker) while true.
    reading: bool,
    /// Why the store refused a message at once, if it did: nothing later is routed.
    refused: Option<String>,
    /// The first fatal rejection's reason: the link closes with it.
    failure: Option<String>,
    /// The link is closed.
    closed: bool,
}

/// What just happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A transfer arrived.
    Transfer,
    /// The store refused a message of the transfer just routed, at once, for this reason.
    Refused(String),
    /// A settlement was sent: `fatal` is the reason when it was a fatal rejection.
    Settled {
        /// The reason of a fatal rejection (the link must close after it).
        fatal: Option<String>,
    },
    /// Reading a transfer failed (the client detached the link, or it broke).
    ReadFailed,
    /// The acker no longer takes transfers.
    HandOffFailed,
    /// The connection is stopping.
    Stopped,
    /// Every settlement was sent: the acker is done.
    SettlementsEnded,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing more than the event itself did; wait for the next one.
    Wait,
    /// Convert and route the transfer, and hand it to the acker.
    Route,
    /// Hand the transfer to the acker to be rejected fatally, not routed, with this reason.
    Fail(String),
    /// Close the link: with this error, or cleanly.
    Close {
        /// The error to close with.
        error: Option<String>,
    },
}

impl EventsLink {
    /// A new link: reading.
    pub fn new() -> Self {
        EventsLink {
            reading: true,
            ..EventsLink::default()
        }
    }

    /// Whether transfers are read (and whether a stopping connection still matters).
    pub fn is_reading(&self) -> bool {
        self.reading
    }

    /// Whether the link is closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The action for `event`.
    pub fn on(&mut self, event: Event) -> Action {
        if self.closed {
            return Action::Wait;
        }
        match event {
            Event::Transfer if !self.reading => Action::Wait,
            Event::Transfer => match &self.refused {
                Some(reason) => Action::Fail(format!(
                    "not stored: an earlier message was refused ({reason})"
                )),
                None => Action::Route,
            },
            Event::Refused(reason) => {
                self.refused.get_or_insert(reason);
                Action::Wait
            }
            Event::Settled {
                fatal: Some(reason),
            } => {
                if self.failure.is_none() {
                    self.failure = Some(reason);
                    self.reading = false;
                }
                Action::Wait
            }
            Event::Settled { fatal: None } => Action::Wait,
            Event::ReadFailed | Event::HandOffFailed | Event::Stopped => {
                self.reading = false;
                Action::Wait
            }
            Event::SettlementsEnded => {
                self.reading = false;
                self.closed = true;
                Action::Close {
                    error: self.failure.clone(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_are_routed_and_the_link_closes_cleanly() {
        let mut link = EventsLink::new();
        assert!(link.is_reading());
        assert_eq!(link.on(Event::Transfer), Action::Route);
        assert_eq!(link.on(Event::Settled { fatal: None }), Action::Wait);
        assert!(link.is_reading());
        assert_eq!(link.on(Event::ReadFailed), Action::Wait);
        assert!(!link.is_reading());
        assert_eq!(
            link.on(Event::SettlementsEnded),
            Action::Close { error: None }
        );
        assert!(link.is_closed());
    }

    #[test]
    fn after_a_refusal_every_later_transfer_fails_without_routing() {
        let mut link = EventsLink::new();
        assert_eq!(link.on(Event::Transfer), Action::Route);
        assert_eq!(link.on(Event::Refused("store full".into())), Action::Wait);
        assert!(link.is_reading(), "the refusal is settled in turn first");
        let fail = Action::Fail("not stored: an earlier message was refused (store full)".into());
        assert_eq!(link.on(Event::Transfer), fail);
        // A second refusal reason does not replace the first.
        link.on(Event::Refused("other".into()));
        assert_eq!(link.on(Event::Transfer), fail);
    }

    #[test]
    fn the_first_fatal_settlement_stops_reading_and_names_the_close() {
        let mut link = EventsLink::new();
        link.on(Event::Settled {
            fatal: Some("disk full".into()),
        });
        assert!(!link.is_reading());
        assert_eq!(
            link.on(Event::Transfer),
            Action::Wait,
            "no transfer is read"
        );
        link.on(Event::Settled {
            fatal: Some("later".into()),
        });
        assert_eq!(
            link.on(Event::SettlementsEnded),
            Action::Close {
                error: Some("disk full".into())
            }
        );
    }

    #[test]
    fn a_stopping_connection_or_a_gone_acker_stop_reading_but_settle_on() {
        for event in [Event::Stopped, Event::HandOffFailed, Event::ReadFailed] {
            let mut link = EventsLink::new();
            assert_eq!(link.on(event.clone()), Action::Wait);
            assert!(!link.is_reading(), "{event:?}");
            assert!(!link.is_closed(), "{event:?}");
            assert_eq!(link.on(Event::Settled { fatal: None }), Action::Wait);
            assert_eq!(
                link.on(Event::SettlementsEnded),
                Action::Close { error: None }
            );
        }
    }

    #[test]
    fn nothing_happens_after_the_close() {
        let mut link = EventsLink::new();
        link.on(Event::SettlementsEnded);
        for event in [
            Event::Transfer,
            Event::Settled {
                fatal: Some("x".into()),
            },
            Event::SettlementsEnded,
        ] {
            assert_eq!(link.on(event), Action::Wait);
        }
        assert!(link.is_closed());
    }
}
