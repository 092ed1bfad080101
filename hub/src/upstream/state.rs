//! One identity's connection to the cloud as a state machine, pure data:
//! `(state, event) → (state, action)`, with no I/O and no clock of its own.
//!
//! The driver (`mqtt.rs`, `run_connection`) performs each [`Action`] and reports what happened as the
//! next [`Event`]; it holds no other control state. Each action can only produce certain events:
//!
//! | action          | events it produces                        |
//! |-----------------|-------------------------------------------|
//! | `Connect`       | `Connected`, `ConnectFailed`              |
//! | `Renew`         | `Connected`, `ConnectFailed`              |
//! | `Serve`         | `TokenDue`, `Lost`, `AckTimedOut`         |
//! | `Backoff{..}`   | `BackoffElapsed`                          |
//!
//! [`Action::outcomes`] is this table as data; the driver checks every event it reports
//! against it in debug builds.
//!
//! ```text
//!               Connected                  TokenDue (f:=0)
//!  Connecting{f} ────────▶ Online{f} ───────────────────────▶ Connecting{0}  (Renew)
//!     ▲   │                   │ Lost / AckTimedOut
//!     │   │ ConnectFailed     │ (f:=0 if it made progress)
//!     │   ▼                   ▼
//!     └── BackingOff{f+1} ◀───┘      Backoff(backoff(f+1))
//!          BackoffElapsed
//! ```
//!
//! `f` counts consecutive failures and sets the reconnect delay. A connection that made progress
//! before it was lost resets it: one that got a PUBACK, or that lived [`HEALTHY_AFTER`]; one
//! that stopped acknowledging ([`Event::AckTimedOut`]) counts only if it got a PUBACK. A token
//! renewal is not a failure. The connection never stops: the task is dropped with the upstream.
//!
//! The reason a connection is down (`R`) passes through the machine untouched into the
//! [`Action::Backoff`] that logs it. An event the last action cannot produce is a driver bug;
//! the machine answers it by giving the connection up and backing off, which is always safe (the
//! messages in flight are answered `Lost` and resent from the store).

use std::time::Duration;

/// A connection up this long counts as healthy even if it carried nothing.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamState {
    /// A connection is being made (publishes queue on it until CONNACK).
    Connecting {
        /// Consecutive failures before this attempt.
        failures: u32,
    },
    /// Connected: publishes go out and PUBACKs come back.
    Online {
        /// Consecutive failures before this connection.
        failures: u32,
    },
    /// Down; waiting before the next attempt (publishes are answered `Offline`).
    BackingOff {
        /// Consecutive failures, the last one included.
        failures: u32,
    },
}

/// What just happened (the outcome of the last action).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<R> {
    /// The broker accepted the connection (CONNACK).
    Connected,
    /// No connection: no key, refused, unreachable, or something other than CONNACK came.
    ConnectFailed(R),
    /// Three quarters of the token's lifetime passed and nothing is in flight any more.
    TokenDue,
    /// The connection failed or the broker broke a rule.
    Lost {
        /// Why.
        reason: R,
        /// Whether it got any PUBACK.
        acked_any: bool,
        /// How long it was up.
        up_for: Duration,
    },
    /// A publish waited longer than the acknowledgement timeout: the connection is given up.
    AckTimedOut {
        /// Why (the timeout).
        reason: R,
        /// Whether it got any PUBACK before.
        acked_any: bool,
    },
    /// The backoff delay passed.
    BackoffElapsed,
}

/// The events without their data, for [`Action::outcomes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// [`Event::Connected`].
    Connected,
    /// [`Event::ConnectFailed`].
    ConnectFailed,
    /// [`Event::TokenDue`].
    TokenDue,
    /// [`Event::Lost`].
    Lost,
    /// [`Event::AckTimedOut`].
    AckTimedOut,
    /// [`Event::BackoffElapsed`].
    BackoffElapsed,
}

impl<R> Event<R> {
    /// Which event this is.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Connected => EventKind::Connected,
            Event::ConnectFailed(_) => EventKind::ConnectFailed,
            Event::TokenDue => EventKind::TokenDue,
            Event::Lost { .. } => EventKind::Lost,
            Event::AckTimedOut { .. } => EventKind::AckTimedOut,
            Event::BackoffElapsed => EventKind::BackoffElapsed,
        }
    }
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<R> {
    /// Make a connection (the client is installed at once, so publishes queue on it) and wait
    /// for its CONNACK.
    Connect,
    /// Say the connection is online (log, metrics, the `on_online` hook), then serve the connection
    /// until it ends or its token is due.
    Serve,
    /// Close the drained connection (its token is due) and connect again at once.
    Renew,
    /// Give the connection up (everything in flight is answered `Lost`, publishes are answered
    /// `Offline` with `reason`), log `reason`, and wait `delay`.
    Backoff {
        /// Why the connection is down.
        reason: R,
        /// How long to wait before the next attempt.
        delay: Duration,
    },
}

impl<R> Action<R> {
    /// The events the driver may report after this action: the table in the module docs, as
    /// data.
    pub fn outcomes(&self) -> &'static [EventKind] {
        use EventKind as E;
        match self {
            Action::Connect | Action::Renew => &[E::Connected, E::ConnectFailed],
            Action::Serve => &[E::TokenDue, E::Lost, E::AckTimedOut],
            Action::Backoff { .. } => &[E::BackoffElapsed],
        }
    }
}

/// Why the machine gave a connection up after an event its last action cannot produce.
pub const UNEXPECTED: &str = "internal error: unexpected event in the cloud connection";

impl UpstreamState {
    /// The state a new connection starts in, and its first action.
    pub fn start<R>() -> (UpstreamState, Action<R>) {
        (UpstreamState::Connecting { failures: 0 }, Action::Connect)
    }

    /// The transition for `event`; `backoff(n)` is the delay before attempt `n` (≥ 1);
    /// `unexpected` is the reason given when the event does not fit the state.
    pub fn on<R>(
        self,
        event: Event<R>,
        backoff: impl Fn(u32) -> Duration,
        unexpected: impl FnOnce() -> R,
    ) -> (UpstreamState, Action<R>) {
        use UpstreamState as S;
        let fail = |failures: u32, reason: R| {
            let failures = failures.saturating_add(1);
            (
                S::BackingOff { failures },
                Action::Backoff {
                    reason,
                    delay: backoff(failures),
                },
            )
        };
        match (self, event) {
            (S::Connecting { failures }, Event::Connected) => {
                (S::Online { failures }, Action::Serve)
            }
            (S::Connecting { failures }, Event::ConnectFailed(reason)) => fail(failures, reason),
            (S::Online { .. }, Event::TokenDue) => (S::Connecting { failures: 0 }, Action::Renew),
            (
                S::Online { failures },
                Event::Lost {
                    reason,
                    acked_any,
                    up_for,
                },
            ) => {
                let progressed = acked_any || up_for >= HEALTHY_AFTER;
                fail(if progressed { 0 } else { failures }, reason)
            }
            (S::Online { failures }, Event::AckTimedOut { reason, acked_any }) => {
                fail(if acked_any { 0 } else { failures }, reason)
            }
            (S::BackingOff { failures }, Event::BackoffElapsed) => {
                (S::Connecting { failures }, Action::Connect)
            }
            (state, _) => fail(state.failures(), unexpected()),
        }
    }

    /// Consecutive failures recorded in this state.
    pub fn failures(self) -> u32 {
        match self {
            UpstreamState::Connecting { failures }
            | UpstreamState::Online { failures }
            | UpstreamState::BackingOff { failures } => failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type E = Event<&'static str>;
    type A = Action<&'static str>;

    /// Doubling from 100 ms, as the default upstream config.
    fn backoff(n: u32) -> Duration {
        Duration::from_millis(100) * 2u32.pow(n.saturating_sub(1).min(10))
    }

    fn step(state: UpstreamState, event: E) -> (UpstreamState, A) {
        state.on(event, backoff, || UNEXPECTED)
    }

    fn lost(acked_any: bool, up_for: Duration) -> E {
        Event::Lost {
            reason: "gone",
            acked_any,
            up_for,
        }
    }

    fn backing_off(failures: u32, reason: &'static str) -> (UpstreamState, A) {
        (
            UpstreamState::BackingOff { failures },
            Action::Backoff {
                reason,
                delay: backoff(failures),
            },
        )
    }

    #[test]
    fn a_link_connects_first() {
        assert_eq!(
            UpstreamState::start::<&str>(),
            (UpstreamState::Connecting { failures: 0 }, Action::Connect)
        );
    }

    #[test]
    fn a_connack_puts_the_link_online_keeping_its_failures() {
        let state = UpstreamState::Connecting { failures: 3 };
        assert_eq!(
            step(state, Event::Connected),
            (UpstreamState::Online { failures: 3 }, Action::Serve)
        );
    }

    #[test]
    fn each_failed_attempt_backs_off_longer() {
        let mut state = UpstreamState::Connecting { failures: 0 };
        for n in 1..=4 {
            let (next, action) = step(state, Event::ConnectFailed("refused"));
            assert_eq!((next, action), backing_off(n, "refused"));
            let (next, action) = step(next, Event::BackoffElapsed);
            assert_eq!(
                (next, action),
                (UpstreamState::Connecting { failures: n }, Action::Connect)
            );
            state = next;
        }
        assert!(backoff(4) > backoff(1));
    }

    #[test]
    fn a_due_token_renews_without_counting_a_failure() {
        let state = UpstreamState::Online { failures: 5 };
        assert_eq!(
            step(state, Event::TokenDue),
            (UpstreamState::Connecting { failures: 0 }, Action::Renew)
        );
    }

    #[test]
    fn a_connection_lost_without_progress_backs_off_longer() {
        let state = UpstreamState::Online { failures: 2 };
        assert_eq!(
            step(state, lost(false, Duration::from_secs(1))),
            backing_off(3, "gone")
        );
    }

    #[test]
    fn a_connection_that_got_a_puback_resets_the_backoff() {
        let state = UpstreamState::Online { failures: 2 };
        assert_eq!(
            step(state, lost(true, Duration::ZERO)),
            backing_off(1, "gone")
        );
    }

    #[test]
    fn a_connection_up_long_enough_resets_the_backoff() {
        let state = UpstreamState::Online { failures: 2 };
        assert_eq!(
            step(state, lost(false, HEALTHY_AFTER)),
            backing_off(1, "gone")
        );
        assert_eq!(
            step(state, lost(false, HEALTHY_AFTER - Duration::from_millis(1))),
            backing_off(3, "gone")
        );
    }

    #[test]
    fn an_ack_timeout_counts_only_pubacks_as_progress() {
        let state = UpstreamState::Online { failures: 2 };
        let timed_out = |acked_any| Event::AckTimedOut {
            reason: "no PUBACK",
            acked_any,
        };
        assert_eq!(step(state, timed_out(false)), backing_off(3, "no PUBACK"));
        assert_eq!(step(state, timed_out(true)), backing_off(1, "no PUBACK"));
    }

    /// Every event the last action cannot produce gives the connection up and backs off, and
    /// every event it can produce is handled by a transition of its own.
    #[test]
    fn events_outside_the_table_back_off_and_those_inside_do_not() {
        let all: [E; 6] = [
            Event::Connected,
            Event::ConnectFailed("refused"),
            Event::TokenDue,
            lost(true, Duration::ZERO),
            Event::AckTimedOut {
                reason: "no PUBACK",
                acked_any: true,
            },
            Event::BackoffElapsed,
        ];
        // Each state, with the action that led to it.
        let states: [(UpstreamState, A); 4] = [
            (UpstreamState::Connecting { failures: 1 }, Action::Connect),
            (UpstreamState::Connecting { failures: 0 }, Action::Renew),
            (UpstreamState::Online { failures: 1 }, Action::Serve),
            backing_off(1, "x"),
        ];
        for (state, action) in states {
            for event in all.iter() {
                let expected = action.outcomes().contains(&event.kind());
                let (next, next_action) = step(state, event.clone());
                let unexpected = next_action
                    == Action::Backoff {
                        reason: UNEXPECTED,
                        delay: backoff(state.failures() + 1),
                    };
                assert_eq!(
                    !unexpected, expected,
                    "{state:?} after {action:?} on {event:?} -> {next:?} {next_action:?}"
                );
            }
        }
    }

    /// The table in the module docs lists what `outcomes` says.
    #[test]
    fn the_docs_table_matches_outcomes() {
        let docs = include_str!("state.rs");
        let rows: [(&str, A); 4] = [
            ("`Connect`", Action::Connect),
            ("`Renew`", Action::Renew),
            ("`Serve`", Action::Serve),
            (
                "`Backoff{..}`",
                Action::Backoff {
                    reason: "",
                    delay: Duration::ZERO,
                },
            ),
        ];
        for (name, action) in rows {
            let row = docs
                .lines()
                .find(|l| l.starts_with(&format!("//! | {name}")))
                .unwrap_or_default();
            let listed: Vec<String> = row
                .split('|')
                .nth(2)
                .unwrap_or_default()
                .split(',')
                .map(|e| e.trim().trim_matches('`').to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            let outcomes: Vec<String> =
                action.outcomes().iter().map(|e| format!("{e:?}")).collect();
            assert_eq!(listed, outcomes, "row {name}");
        }
    }
}
