//! The endpoint worker's state machine, as pure data: `(state, event) → (state, action)`.
//!
//! The async driver (`mod.rs`) performs each [`Action`] and reports what happened as the next
//! [`Event`]; it holds no other control state. Each action can only produce certain events:
//!
//! | action        | events it produces                                                |
//! |---------------|-------------------------------------------------------------------|
//! | `WaitForSink` | `SinkAttached`, `Shutdown`                                        |
//! | `Read`        | `BatchReady`, `NothingToSend`, `NoSink`, `StoreFailed`, `Shutdown` |
//! | `WaitForData` | `Woken`, `StoreFailed`, `Shutdown`                                |
//! | `Send`        | `BatchDone`, `BatchFailed`, `StoreFailed`, `Shutdown`             |
//! | `Sleep(d)`    | `BackoffElapsed`, `Shutdown`                                      |
//!
//! [`Action::outcomes`] is this table as data; the driver checks every event it reports against
//! it in debug builds. `Read` reports `Shutdown` when shutdown was asked for before it reads (or
//! while a read of the store fails); `WaitForData` reports `StoreFailed` if the store's commit
//! notifications end (the store is gone).
//!
//! ```text
//!                 SinkAttached                BatchReady
//!  WaitingForSink ────────────▶ Reading{f} ──────────────▶ Sending{f}
//!        ▲                      │  ▲  ▲ │                   │      │
//!        └────────── NoSink ────┘  │  │ │ NothingToSend     │      │ BatchFailed
//!                                  │  │ ▼                   │      ▼
//!                         Woken    │  Idle    BatchDone(f:=0)│   BackingOff{f+1} ── Sleep(backoff(f+1))
//!                      (f:=0) ─────┘         ◀──────────────┘      │
//!                                  └──────────── BackoffElapsed ───┘
//!  any ── Shutdown / StoreFailed ──▶ Closed (Exit)
//! ```
//!
//! `f` counts consecutive failed batches of the endpoint and sets the backoff; any batch that
//! completes without a retry resets it. Strict priority is the driver's `Read`: it always starts
//! from the highest priority queue, so after every batch (and every backoff) a newly arrived
//! urgent message goes first.
//!
//! An event that the last action cannot produce is a driver bug; the machine answers it by going
//! to `Reading` (keeping the failure count) with `Read`, which is always safe: reading only
//! re-derives what to send from the store and the checkpointers.

use std::time::Duration;

use crate::retry::RetryPolicy;

/// Where the worker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// No sink is registered for the endpoint; messages stay queued.
    WaitingForSink,
    /// Choosing the next batch, highest priority first.
    Reading {
        /// Consecutive failed batches.
        failures: u32,
    },
    /// Nothing to send; waiting for new durable messages or a change of sink or queues.
    Idle,
    /// A batch is with the sink.
    Sending {
        /// Consecutive failed batches before this one.
        failures: u32,
    },
    /// A batch failed; waiting before sending again from the first incomplete message.
    BackingOff {
        /// Consecutive failed batches, this one included.
        failures: u32,
    },
    /// Stopped: shut down, or the store failed.
    Closed,
}

/// What just happened (the outcome of the last action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A sink is registered.
    SinkAttached,
    /// `Read` found no sink registered.
    NoSink,
    /// `Read` found messages to send.
    BatchReady,
    /// `Read` found nothing to send in any queue.
    NothingToSend,
    /// New data, a new queue, or a change of sink may be waiting.
    Woken,
    /// The sink answered and nothing needs a retry (everything delivered, rejected, expired or
    /// set aside).
    BatchDone,
    /// The sink answered `Retry` for a message that must be resent.
    BatchFailed,
    /// The backoff delay passed.
    BackoffElapsed,
    /// The dispatcher is shutting down.
    Shutdown,
    /// The store refused a read or a checkpoint (poisoned, fenced, closed, corrupt).
    StoreFailed,
}

/// What the driver must do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait until a sink is registered.
    WaitForSink,
    /// Pick the next batch: the highest-priority non-empty queue, after its checkpointer.
    Read,
    /// Wait for new durable messages, new queues or a change of sink.
    WaitForData,
    /// Send the batch that `Read` picked, classify the outcomes, checkpoint.
    Send,
    /// Wait this long, then `Read` again.
    Sleep(Duration),
    /// Stop the worker.
    Exit,
}

impl Action {
    /// The events the driver may report after this action: the table in the module docs, as
    /// data. The driver checks every event it reports against it (in debug builds), and a test
    /// checks the docs against it.
    pub fn outcomes(self) -> &'static [Event] {
        use Event as E;
        match self {
            Action::WaitForSink => &[E::SinkAttached, E::Shutdown],
            Action::Read => &[
                E::BatchReady,
                E::NothingToSend,
                E::NoSink,
                E::StoreFailed,
                E::Shutdown,
            ],
            Action::WaitForData => &[E::Woken, E::StoreFailed, E::Shutdown],
            Action::Send => &[E::BatchDone, E::BatchFailed, E::StoreFailed, E::Shutdown],
            Action::Sleep(_) => &[E::BackoffElapsed, E::Shutdown],
            Action::Exit => &[],
        }
    }
}

impl WorkerState {
    /// The state a new worker starts in, and its first action.
    pub fn start() -> (WorkerState, Action) {
        (WorkerState::Reading { failures: 0 }, Action::Read)
    }

    /// The transition for `event`.
    pub fn on(self, event: Event, retry: &RetryPolicy) -> (WorkerState, Action) {
        use Event as E;
        use WorkerState as S;
        match (self, event) {
            (_, E::Shutdown | E::StoreFailed) | (S::Closed, _) => (S::Closed, Action::Exit),
            (S::WaitingForSink, E::SinkAttached) => (S::Reading { failures: 0 }, Action::Read),
            (S::Reading { .. }, E::NoSink) => (S::WaitingForSink, Action::WaitForSink),
            (S::Reading { failures }, E::BatchReady) => (S::Sending { failures }, Action::Send),
            (S::Reading { .. }, E::NothingToSend) => (S::Idle, Action::WaitForData),
            (S::Idle, E::Woken) => (S::Reading { failures: 0 }, Action::Read),
            (S::Sending { .. }, E::BatchDone) => (S::Reading { failures: 0 }, Action::Read),
            (S::Sending { failures }, E::BatchFailed) => {
                let failures = failures.saturating_add(1);
                (
                    S::BackingOff { failures },
                    Action::Sleep(retry.delay(failures)),
                )
            }
            (S::BackingOff { failures }, E::BackoffElapsed) => {
                (S::Reading { failures }, Action::Read)
            }
            (state, _) => (
                S::Reading {
                    failures: state.failures(),
                },
                Action::Read,
            ),
        }
    }

    /// Consecutive failed batches recorded in this state.
    pub fn failures(self) -> u32 {
        match self {
            WorkerState::Reading { failures }
            | WorkerState::Sending { failures }
            | WorkerState::BackingOff { failures } => failures,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::default()
    }

    fn run(events: &[Event]) -> Vec<(WorkerState, Action)> {
        let (mut state, _) = WorkerState::start();
        events
            .iter()
            .map(|&e| {
                let step = state.on(e, &policy());
                state = step.0;
                step
            })
            .collect()
    }

    #[test]
    fn a_new_worker_starts_by_reading() {
        assert_eq!(
            WorkerState::start(),
            (WorkerState::Reading { failures: 0 }, Action::Read)
        );
    }

    #[test]
    fn without_a_sink_the_worker_waits_and_reads_again_once_one_attaches() {
        let steps = run(&[Event::NoSink, Event::SinkAttached]);
        assert_eq!(
            steps,
            [
                (WorkerState::WaitingForSink, Action::WaitForSink),
                (WorkerState::Reading { failures: 0 }, Action::Read),
            ]
        );
    }

    #[test]
    fn a_ready_batch_is_sent_and_success_goes_back_to_reading() {
        let steps = run(&[Event::BatchReady, Event::BatchDone]);
        assert_eq!(
            steps[0],
            (WorkerState::Sending { failures: 0 }, Action::Send)
        );
        assert_eq!(
            steps[1],
            (WorkerState::Reading { failures: 0 }, Action::Read)
        );
    }

    #[test]
    fn an_empty_read_idles_until_woken() {
        let steps = run(&[Event::NothingToSend, Event::Woken]);
        assert_eq!(steps[0], (WorkerState::Idle, Action::WaitForData));
        assert_eq!(
            steps[1],
            (WorkerState::Reading { failures: 0 }, Action::Read)
        );
    }

    #[test]
    fn consecutive_failures_back_off_longer_and_a_success_resets_the_count() {
        let fail = [Event::BatchReady, Event::BatchFailed, Event::BackoffElapsed];
        let mut events = Vec::new();
        for _ in 0..3 {
            events.extend(fail);
        }
        events.extend([Event::BatchReady, Event::BatchDone]);
        events.extend([Event::BatchReady, Event::BatchFailed]);
        let sleeps: Vec<Duration> = run(&events)
            .into_iter()
            .filter_map(|(_, a)| match a {
                Action::Sleep(d) => Some(d),
                _ => None,
            })
            .collect();
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(sleeps, [secs(1), secs(2), secs(4), secs(1)]);
    }

    #[test]
    fn the_failure_count_survives_the_read_after_a_backoff() {
        let steps = run(&[Event::BatchReady, Event::BatchFailed, Event::BackoffElapsed]);
        assert_eq!(
            steps[2],
            (WorkerState::Reading { failures: 1 }, Action::Read)
        );
    }

    #[test]
    fn shutdown_closes_from_every_state() {
        let states = [
            WorkerState::WaitingForSink,
            WorkerState::Reading { failures: 2 },
            WorkerState::Idle,
            WorkerState::Sending { failures: 0 },
            WorkerState::BackingOff { failures: 3 },
            WorkerState::Closed,
        ];
        for s in states {
            for e in [Event::Shutdown, Event::StoreFailed] {
                assert_eq!(
                    s.on(e, &policy()),
                    (WorkerState::Closed, Action::Exit),
                    "{s:?}"
                );
            }
        }
    }

    /// The event table in the module docs lists, for every action, exactly the events the driver
    /// can report after it (`Action::outcomes`, which the driver checks in debug builds).
    #[test]
    fn the_documented_event_table_is_the_one_the_driver_keeps() {
        let doc: Vec<(String, Vec<String>)> = include_str!("state.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! | `"))
            .filter_map(|row| {
                let mut cells = row.split('|');
                let action = cells.next()?.trim().trim_end_matches('`');
                let action = action.split('(').next()?.to_owned();
                let events = cells
                    .next()?
                    .split(',')
                    .map(|e| e.trim().trim_matches('`').to_owned())
                    .filter(|e| !e.is_empty())
                    .collect();
                Some((action, events))
            })
            .collect();
        let actions = [
            ("WaitForSink", Action::WaitForSink),
            ("Read", Action::Read),
            ("WaitForData", Action::WaitForData),
            ("Send", Action::Send),
            ("Sleep", Action::Sleep(Duration::ZERO)),
        ];
        assert_eq!(doc.len(), actions.len(), "{doc:?}");
        for (name, action) in actions {
            let Some((_, documented)) = doc.iter().find(|(a, _)| a == name) else {
                panic!("no row for {name} in {doc:?}");
            };
            let mut documented = documented.clone();
            documented.sort();
            let mut kept: Vec<String> =
                action.outcomes().iter().map(|e| format!("{e:?}")).collect();
            kept.sort();
            assert_eq!(documented, kept, "the row of {name}");
        }
    }

    /// A read that finds shutdown asked for, and a wait whose store stopped notifying commits,
    /// end the worker (these two were missing from the table, not from the machine).
    #[test]
    fn read_and_wait_for_data_end_the_worker_on_shutdown_or_a_store_failure() {
        for event in [Event::Shutdown, Event::StoreFailed] {
            for (state, action) in [
                WorkerState::start(),
                WorkerState::start().0.on(Event::NothingToSend, &policy()),
            ] {
                assert!(action.outcomes().contains(&event), "{action:?} {event:?}");
                assert_eq!(
                    state.on(event, &policy()),
                    (WorkerState::Closed, Action::Exit),
                    "{state:?} {event:?}"
                );
            }
        }
    }

    #[test]
    fn a_closed_worker_stays_closed() {
        assert_eq!(
            WorkerState::Closed.on(Event::SinkAttached, &policy()),
            (WorkerState::Closed, Action::Exit)
        );
    }

    #[test]
    fn an_unexpected_event_goes_back_to_reading() {
        assert_eq!(
            WorkerState::Idle.on(Event::BatchDone, &policy()),
            (WorkerState::Reading { failures: 0 }, Action::Read)
        );
        assert_eq!(
            WorkerState::BackingOff { failures: 2 }.on(Event::BatchReady, &policy()),
            (WorkerState::Reading { failures: 2 }, Action::Read)
        );
    }
}
