//! Connection limits of one head (MQTT or AMQP): how many connections it holds, how long one
//! may take to authenticate, and how its accept loop behaves when the process runs out of file
//! descriptors or memory.
//!
//! Each head has one [`Budget`]. A connection is admitted at accept ([`Budget::admit`]) into
//! the **unauthenticated** part of the budget and moves to the **authenticated** part when its
//! head authenticates it ([`Slot::authenticated`]); the [`Admission`] the accept loop keeps
//! gives the slot back when the connection ends.
//!
//! Guarantees:
//! - At most [`Limits::max_connections`] connections of a head are authenticated at once. A
//!   connection accepted while they are all taken is closed at once; one that authenticates
//!   then is refused (MQTT: CONNACK 3, server unavailable, which the SDKs retry).
//! - At most [`Limits::max_unauthenticated`] connections are between accept and
//!   authentication. A new one beyond it closes the **oldest** of them ([`Phase::Evicted`]):
//!   a flood of connections that never authenticate cannot lock a module out, since the
//!   module's own connection is the newest while it authenticates (a few milliseconds).
//! - A connection not authenticated [`Limits::auth_timeout`] after accept is closed
//!   ([`Phase::TimedOut`]): the deadline covers the TLS handshake and the whole login.
//! - Closing an unauthenticated connection loses nothing: nothing it sent was acknowledged.
//! - Refusals, evictions, time-outs and accept failures are counted in metrics exactly and
//!   logged at most once per [`LOG_INTERVAL`] per kind, with the count since the last line.
//! - [`AcceptBackoff`]: after an accept error other than one of the connection itself (EMFILE,
//!   ENFILE, ENOBUFS, ENOMEM), the accept loop pauses 10 ms, doubling to 1 s, reset by the next
//!   accepted connection, instead of spinning.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

/// edgeHub's `MaxConnectedClients`, per protocol.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;
/// Connections per protocol that may be between accept and authentication at once: far more
/// than the modules of one edge device that (re)connect together, few enough that a flood of
/// them holds little memory and few file descriptors.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 32;
/// How long a connection may take from accept to authenticated (TLS handshake, then CONNECT or
/// AMQP header, SASL, Open and `$cbs` put-token). The SDKs do all of it at once; the AMQP head
/// already allowed 20 s after Open, and one deadline for both heads replaces MQTT's 60 s.
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 20;

/// At most one log line per kind of event (refusal, eviction, time-out, accept failure) and
/// head in this interval; the next one carries the count of those not logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// The first pause after an accept error.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause after accept errors in a row.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The limits of one head (validated by `settings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Authenticated connections at once.
    pub max_connections: usize,
    /// Connections between accept and authentication at once.
    pub max_unauthenticated: usize,
    /// From accept to authenticated, TLS handshake included.
    pub auth_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            auth_timeout: Duration::from_secs(DEFAULT_AUTH_TIMEOUT_SECS),
        }
    }
}

/// Where a connection stands in its head's budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, not yet authenticated.
    Unauthenticated,
    /// Authenticated: counted against `max_connections`, never closed by the budget.
    Authenticated,
    /// Closed for a newer unauthenticated connection.
    Evicted,
    /// Closed: not authenticated within the deadline.
    TimedOut,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Every authenticated slot of the head is taken.
    #[error("{protocol}: {max} connections already (--max-connections)")]
    Full {
        /// The head.
        protocol: &'static str,
        /// Its limit.
        max: usize,
    },
    /// The connection was already closed by the budget.
    #[error("the connection was closed before it authenticated ({0:?})")]
    Closed(Phase),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolReason {
    protocol: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolState {
    protocol: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

/// The series of the budgets and accept loops (registered by `HubMetrics`):
///
/// | series | kind | labels |
/// |---|---|---|
/// | `edgehub_connections` | gauge | `protocol`, `state` = `authenticated`, `unauthenticated` |
/// | `edgehub_connections_refused_total` | counter | `protocol`, `reason` = `max_connections`, `evicted`, `auth_timeout` |
/// | `edgehub_accept_failures_total` | counter | `protocol` |
#[derive(Clone, Debug, Default)]
pub struct LimitMetrics {
    connections: Family<ProtocolState, Gauge>,
    refused: Family<ProtocolReason, Counter>,
    accept_failures: Family<ProtocolLabel, Counter>,
}

impl LimitMetrics {
    /// Registers the series in `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgehub_connections",
            "Connections of each head, authenticated or not yet",
            self.connections.clone(),
        );
        r.register(
            "edgehub_connections_refused",
            "Connections closed by the connection limits: over --max-connections, the oldest \
             unauthenticated one evicted for a newer one, or not authenticated in time",
            self.refused.clone(),
        );
        r.register(
            "edgehub_accept_failures",
            "Accept errors of a listener (file descriptors or memory exhausted)",
            self.accept_failures.clone(),
        );
    }

    fn refused(&self, protocol: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&ProtocolReason { protocol, reason })
            .inc();
    }

    fn set(&self, protocol: &'static str, authenticated: usize, unauthenticated: usize) {
        for (state, n) in [
            ("authenticated", authenticated),
            ("unauthenticated", unauthenticated),
        ] {
            self.connections
                .get_or_create(&ProtocolState { protocol, state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// One accept error of `protocol`'s listener.
    pub fn accept_failed(&self, protocol: &'static str) {
        self.accept_failures
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }
}

/// Lets one log line through per [`LOG_INTERVAL`] and counts the others.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// An event happened at `now`: `Some(n)` if a line is due now (`n` events were not logged
    /// since the last line), `None` if this one is only counted.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// The pause schedule of an accept loop after errors: [`ACCEPT_BACKOFF_MIN`] doubling to
/// [`ACCEPT_BACKOFF_MAX`], back to the start after a connection is accepted.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            next: ACCEPT_BACKOFF_MIN,
        }
    }
}

impl AcceptBackoff {
    /// An accept failed: how long to pause before the next accept.
    pub fn on_error(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(ACCEPT_BACKOFF_MAX);
        pause
    }

    /// A connection was accepted.
    pub fn on_success(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }
}

/// Whether an accept error belongs to one connection (it went away before it was accepted), so
/// the next accept can follow at once; any other error (EMFILE, ENFILE, ENOBUFS, ENOMEM, …)
/// would repeat at once.
pub fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// The connection budget of one head.
#[derive(Debug)]
pub struct Budget {
    protocol: &'static str,
    limits: Limits,
    metrics: LimitMetrics,
    state: Mutex<State>,
    /// Notified when the last closing connection is gone.
    settled: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    authenticated: usize,
    /// Unauthenticated connections, oldest first.
    waiting: VecDeque<Arc<SlotInner>>,
    /// Connections evicted or timed out whose tasks have not yet dropped them (their sockets
    /// are still open).
    closing: usize,
    log_full: LogLimiter,
    log_evicted: LogLimiter,
    log_timed_out: LogLimiter,
}

#[derive(Debug)]
struct SlotInner {
    id: u64,
    accepted: Instant,
    phase: watch::Sender<Phase>,
}

impl Budget {
    /// The budget of head `protocol` ("mqtt", "amqp": a metric label and a word in logs).
    pub fn new(protocol: &'static str, limits: Limits, metrics: LimitMetrics) -> Arc<Budget> {
        metrics.set(protocol, 0, 0);
        Arc::new(Budget {
            protocol,
            limits,
            metrics,
            state: Mutex::new(State::default()),
            settled: tokio::sync::Notify::new(),
        })
    }

    /// The limits it applies.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The head's name in metrics and logs.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Its metrics (the accept loop counts its failures there).
    pub fn metrics(&self) -> &LimitMetrics {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &State) {
        self.metrics
            .set(self.protocol, state.authenticated, state.waiting.len());
    }

    /// Admits a connection just accepted from `peer`, unauthenticated; when that part of the
    /// budget is full, the oldest unauthenticated connection is closed for it. Admitted even
    /// while every authenticated slot is taken: only its login tells whether it replaces a
    /// connection of the same module ([`Slot::authenticated_replacing`]) or must be refused.
    pub fn admit(self: &Arc<Self>, _peer: &str) -> Result<Admission, LimitError> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.waiting.len() >= self.limits.max_unauthenticated {
            if let Some(oldest) = state.waiting.pop_front() {
                oldest.phase.send_replace(Phase::Evicted);
                state.closing += 1;
                self.metrics.refused(self.protocol, "evicted");
                if let Some(more) = state.log_evicted.hit(now) {
                    tracing::warn!(
                        protocol = self.protocol,
                        max_unauthenticated = self.limits.max_unauthenticated,
                        not_logged = more,
                        "closed the oldest unauthenticated connection for a newer one \
                         (--max-unauthenticated)"
                    );
                }
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let inner = Arc::new(SlotInner {
            id,
            accepted: now,
            phase: watch::Sender::new(Phase::Unauthenticated),
        });
        state.waiting.push_back(Arc::clone(&inner));
        self.publish(&state);
        Ok(Admission {
            slot: Slot {
                budget: Arc::clone(self),
                inner,
            },
        })
    }

    fn refuse_full(&self, peer: &str) -> LimitError {
        self.metrics.refused(self.protocol, "max_connections");
        let now = Instant::now();
        if let Some(more) = self.lock().log_full.hit(now) {
            tracing::warn!(
                protocol = self.protocol,
                %peer,
                max_connections = self.limits.max_connections,
                not_logged = more,
                "connection refused: the head is at --max-connections"
            );
        }
        LimitError::Full {
            protocol: self.protocol,
            max: self.limits.max_connections,
        }
    }

    /// Closes `slot` for its deadline if it is still unauthenticated; true if it did.
    fn time_out(&self, slot: &SlotInner) -> bool {
        let mut state = self.lock();
        if *slot.phase.borrow() != Phase::Unauthenticated {
            return false;
        }
        state.waiting.retain(|s| s.id != slot.id);
        slot.phase.send_replace(Phase::TimedOut);
        state.closing += 1;
        self.metrics.refused(self.protocol, "auth_timeout");
        if let Some(more) = state.log_timed_out.hit(Instant::now()) {
            tracing::info!(
                protocol = self.protocol,
                auth_timeout = ?self.limits.auth_timeout,
                not_logged = more,
                "closed a connection that did not authenticate in time (--auth-timeout)"
            );
        }
        self.publish(&state);
        true
    }

    fn release(&self, slot: &SlotInner) {
        let mut state = self.lock();
        match *slot.phase.borrow() {
            Phase::Authenticated => state.authenticated = state.authenticated.saturating_sub(1),
            Phase::Unauthenticated => state.waiting.retain(|s| s.id != slot.id),
            Phase::Evicted | Phase::TimedOut => {
                state.closing = state.closing.saturating_sub(1);
                if state.closing == 0 {
                    self.settled.notify_waiters();
                }
            }
        }
        self.publish(&state);
    }

    /// Whether every connection the budget closed is gone (its socket closed).
    pub fn is_settled(&self) -> bool {
        self.lock().closing == 0
    }

    /// Resolves once every connection the budget closed is gone. The accept loop waits for it
    /// before it accepts again, so unauthenticated connections never hold more than
    /// `max_unauthenticated` + 1 sockets, however fast a flood comes.
    pub async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_settled() {
                return;
            }
            notified.await;
        }
    }

    /// Connections now: (authenticated, unauthenticated).
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.authenticated, state.waiting.len())
    }
}

/// A connection's place in its head's budget, as the head sees it: it reports authentication
/// with [`Slot::authenticated`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    inner: Arc<SlotInner>,
}

impl Slot {
    /// The connection authenticated (again: later calls are no-ops): it moves to the
    /// authenticated part of the budget and is never closed by it. Refused when every
    /// authenticated slot is taken, or when the budget already closed the connection; the head
    /// then ends the connection.
    pub fn authenticated(&self) -> Result<(), LimitError> {
        self.take(true)
    }

    fn take(&self, within_limit: bool) -> Result<(), LimitError> {
        let budget = &self.budget;
        let mut state = budget.lock();
        match *self.inner.phase.borrow() {
            Phase::Authenticated => return Ok(()),
            p @ (Phase::Evicted | Phase::TimedOut) => return Err(LimitError::Closed(p)),
            Phase::Unauthenticated => {}
        }
        if within_limit && state.authenticated >= budget.limits.max_connections {
            drop(state);
            return Err(budget.refuse_full("(authenticated)"));
        }
        state.waiting.retain(|s| s.id != self.inner.id);
        state.authenticated += 1;
        self.inner.phase.send_replace(Phase::Authenticated);
        budget.publish(&state);
        Ok(())
    }

    /// [`Slot::authenticated`] for a module whose previous connection is still live and is
    /// about to be replaced (and then gives its slot back): taken even at the limit, so a module
    /// whose network dropped unnoticed reconnects at once, as with edgeHub. The count exceeds
    /// `max_connections` only until the replaced connection has closed, by at most one per
    /// module.
    pub fn authenticated_replacing(&self) -> Result<(), LimitError> {
        self.take(false)
    }

    /// Where the connection stands now.
    pub fn phase(&self) -> Phase {
        *self.inner.phase.borrow()
    }
}

/// What the accept loop keeps for each connection: the slot, given back when it is dropped
/// (the connection ended), and the signal to close the connection ([`Admission::closed`]).
#[derive(Debug)]
pub struct Admission {
    slot: Slot,
}

impl Admission {
    /// The slot, for the head.
    pub fn slot(&self) -> Slot {
        self.slot.clone()
    }

    /// Resolves when the connection must close: evicted for a newer unauthenticated one, or not
    /// authenticated by its deadline. Never resolves once it is authenticated.
    pub async fn closed(&self) -> Phase {
        let inner = &self.slot.inner;
        let deadline = inner.accepted + self.slot.budget.limits.auth_timeout;
        let mut phase = inner.phase.subscribe();
        loop {
            let now = *phase.borrow_and_update();
            match now {
                Phase::Evicted | Phase::TimedOut => return now,
                Phase::Authenticated => std::future::pending::<()>().await,
                Phase::Unauthenticated => {}
            }
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if self.slot.budget.time_out(inner) {
                        return Phase::TimedOut;
                    }
                }
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.slot.budget.release(&self.slot.inner);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    fn budget(max: usize, unauth: usize, secs: u64) -> Arc<Budget> {
        Budget::new(
            "test",
            Limits {
                max_connections: max,
                max_unauthenticated: unauth,
                auth_timeout: Duration::from_secs(secs),
            },
            LimitMetrics::default(),
        )
    }

    fn rendered(m: &LimitMetrics) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r).unwrap();
        s
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_plus_one_authenticated_connection_is_refused_and_a_slot_comes_back() {
        let b = budget(2, 8, 60);
        let a1 = b.admit("p").unwrap();
        let a2 = b.admit("p").unwrap();
        let a3 = b.admit("p").unwrap();
        a1.slot().authenticated().unwrap();
        a2.slot().authenticated().unwrap();
        a2.slot().authenticated().unwrap(); // again: a no-op
        assert!(matches!(
            a3.slot().authenticated(),
            Err(LimitError::Full { max: 2, .. })
        ));
        // Accepted while full: admitted unauthenticated (its login decides).
        let a4 = b.admit("p").unwrap();
        assert_eq!(b.counts(), (2, 2));
        drop(a1);
        assert_eq!(b.counts(), (1, 2));
        a3.slot().authenticated().unwrap();
        assert_eq!(b.counts(), (2, 1));
        // A module replacing its own live connection is taken over the limit; the count comes
        // back once the replaced one is gone.
        a4.slot().authenticated_replacing().unwrap();
        assert_eq!(b.counts(), (3, 0));
        drop(a2);
        assert_eq!(b.counts(), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_over_the_unauthenticated_budget_evicts_the_oldest() {
        let m = LimitMetrics::default();
        let b = Budget::new(
            "test",
            Limits {
                max_connections: 10,
                max_unauthenticated: 2,
                auth_timeout: Duration::from_secs(60),
            },
            m.clone(),
        );
        let old = b.admit("p").unwrap();
        let mid = b.admit("p").unwrap();
        let new = b.admit("p").unwrap();
        assert_eq!(old.closed().await, Phase::Evicted);
        assert_eq!(old.slot().phase(), Phase::Evicted);
        assert!(matches!(
            old.slot().authenticated(),
            Err(LimitError::Closed(Phase::Evicted))
        ));
        // An authenticated connection is never evicted.
        mid.slot().authenticated().unwrap();
        let _a = b.admit("p").unwrap();
        let _b = b.admit("p").unwrap();
        assert_eq!(new.slot().phase(), Phase::Evicted);
        assert_eq!(mid.slot().phase(), Phase::Authenticated);
        assert_eq!(b.counts(), (1, 2));
        assert!(!b.is_settled(), "two evicted connections are still open");
        drop(new);
        assert!(!b.is_settled());
        drop(old);
        assert!(b.is_settled());
        tokio::time::timeout(Duration::from_secs(1), b.settled())
            .await
            .expect("settled");
        assert_eq!(b.counts(), (1, 2));
        let text = rendered(&m);
        assert!(
            text.contains(
                "edgehub_connections_refused_total{protocol=\"test\",reason=\"evicted\"} 2"
            ),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unauthenticated_connection_is_closed_at_its_deadline_an_authenticated_never() {
        let b = budget(10, 10, 20);
        let start = Instant::now();
        let silent = b.admit("p").unwrap();
        assert_eq!(silent.closed().await, Phase::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(20));
        assert_eq!(b.counts(), (0, 0));
        let module = b.admit("p").unwrap();
        module.slot().authenticated().unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(3600), module.closed()).await;
        assert!(closed.is_err(), "an authenticated connection was closed");
        // Authenticating after the deadline is refused.
        assert!(silent.slot().authenticated().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn log_lines_are_one_per_interval_with_the_count_of_the_others() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.hit(t0), Some(0));
        for i in 1..100 {
            assert_eq!(l.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.hit(t0 + LOG_INTERVAL), Some(99));
        assert_eq!(l.hit(t0 + LOG_INTERVAL), None);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets_on_success() {
        let mut b = AcceptBackoff::default();
        let pauses: Vec<u128> = (0..9).map(|_| b.on_error().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.on_success();
        assert_eq!(b.on_error(), ACCEPT_BACKOFF_MIN);
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(!is_connection_error(&emfile));
        let aborted = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert!(is_connection_error(&aborted));
    }
}
