//! Flow control for online endpoints (issue 18): producers feeding an endpoint whose receiver is
//! connected but does not keep up are slowed down, so that the receiver gets fresh messages
//! instead of a growing backlog. Store-and-forward for an endpoint whose receiver is away is
//! never slowed.
//!
//! # Words
//! - **Lag** of an endpoint: messages stored for it (submitted to the store) in this process and
//!   not yet completed by its worker (delivered, rejected, expired, set aside or moved). Messages
//!   the store held when the process started do not count: they are a backlog by definition.
//! - **Online**: a sink is registered for the endpoint (a module connected and subscribed to its
//!   inputs). Only module inputs are flow-controlled; `$upstream` and a replicated module's
//!   inputs are not (their sink says nothing of whether the receiver is there).
//! - **Bound**: the most lag an online endpoint may have before the producers feeding it are
//!   held ([`FlowBound`], default [`DEFAULT_MAX_LAG`]).
//!
//! # How a producer is held
//! ```text
//! head reads a PUBLISH ─▶ Router::route_in ─▶ (lag of every target endpoint + 1) ─▶ store append
//!   ─▶ RouteAck::hold(): any target ONLINE and lag > bound? ─no─▶ read the next packet
//!                                  │ yes
//!                                  ▼
//!      FlowHold::released(): wait (Notify, no polling) until every target is offline or
//!      within its bound ─▶ read the next packet (the held time is counted per endpoint)
//! endpoint worker completes n messages ─▶ lag − n ─▶ wakes held producers
//! sink unregistered (receiver gone) ─▶ offline ─▶ wakes held producers at once
//! ```
//!
//! The decision is the pure [`first_over_bound`]; [`EndpointFlow`] keeps the shared state and
//! [`FlowHold`] is the wait. Holding never changes what is stored or its order: the message
//! that triggered a hold is stored and acknowledged as usual; only reading the producer's next
//! packet waits.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::route::EndpointId;

/// Messages of lag (a newtype, so a count of messages is never taken for anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lag(pub u64);

impl std::fmt::Display for Lag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} messages", self.0)
    }
}

/// The default bound: 800 messages. Measured with `benches/peers.sh` against mosquitto in the
/// same run (benches/results/flowcontrol-2026-12-07.md): 200–500 kept the 8→1 fan-in's p99
/// at mosquitto's but cost the 8 pairs (W1) about a quarter of their throughput (300 against
/// off, alternated: 60k vs 80k msg/s), since a pair's receiver then waits on its producer's
/// next group commit; 1,000 left the fan-in's p99 at 2–4× mosquitto's; 800 kept both (W2
/// p99 0.9–1.0× mosquitto's, W1 as fast as with flow control off). At 80,000 messages/s it is
/// about 10 ms of queueing.
pub const DEFAULT_MAX_LAG: Lag = Lag(800);

/// When the producers of an online endpoint are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowBound {
    /// Never: the store takes whatever comes, up to its quota.
    Off,
    /// While the endpoint is online and its lag is over this many messages.
    MaxLag(Lag),
}

impl Default for FlowBound {
    fn default() -> Self {
        FlowBound::MaxLag(DEFAULT_MAX_LAG)
    }
}

/// What the decision reads of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    /// A receiver is connected.
    pub online: bool,
    /// Its lag now.
    pub lag: Lag,
}

/// Whether the producers of an endpoint in state `view` must wait under `bound`: only an online
/// endpoint over its bound holds anyone.
pub fn over_bound(view: FlowView, bound: FlowBound) -> bool {
    match bound {
        FlowBound::Off => false,
        FlowBound::MaxLag(max) => view.online && view.lag > max,
    }
}

/// The index of the first endpoint (of those a message went to) that holds its producer, if any.
pub fn first_over_bound(
    views: impl IntoIterator<Item = FlowView>,
    bound: FlowBound,
) -> Option<usize> {
    views.into_iter().position(|v| over_bound(v, bound))
}

/// One endpoint's flow state, shared by the router (lag up), its worker (lag down), the
/// dispatcher (online) and held producers (waiting on `changed`).
#[derive(Debug)]
pub struct EndpointFlow {
    endpoint: EndpointId,
    bound: FlowBound,
    online: AtomicBool,
    /// Signed: a completion may be counted a moment before a refusal's correction; read clamped.
    lag: AtomicI64,
    /// Producers held by this endpoint now (wake-ups are sent only when there are some).
    held: AtomicUsize,
    changed: Notify,
    holds: AtomicU64,
    held_micros: AtomicU64,
}

/// One endpoint's flow counters, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowStats {
    /// The endpoint.
    pub endpoint: EndpointId,
    /// Whether a receiver is connected.
    pub online: bool,
    /// Its lag now.
    pub lag: Lag,
    /// Times a producer was held by it.
    pub holds: u64,
    /// Time producers were held by it, summed over producers.
    pub held: Duration,
}

impl EndpointFlow {
    /// The flow state of `endpoint`, offline with no lag.
    pub fn new(endpoint: EndpointId, bound: FlowBound) -> Self {
        EndpointFlow {
            endpoint,
            bound,
            online: AtomicBool::new(false),
            lag: AtomicI64::new(0),
            held: AtomicUsize::new(0),
            changed: Notify::new(),
            holds: AtomicU64::new(0),
            held_micros: AtomicU64::new(0),
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &EndpointId {
        &self.endpoint
    }

    /// Whether it has a bound at all (module inputs do; `$upstream` does not).
    pub fn is_controlled(&self) -> bool {
        self.bound != FlowBound::Off
    }

    /// Online and lag now.
    pub fn view(&self) -> FlowView {
        FlowView {
            online: self.online.load(Ordering::SeqCst),
            lag: Lag(u64::try_from(self.lag.load(Ordering::SeqCst)).unwrap_or(0)),
        }
    }

    /// Whether it holds its producers now.
    pub fn is_over_bound(&self) -> bool {
        over_bound(self.view(), self.bound)
    }

    /// A message is about to be stored for the endpoint.
    pub(crate) fn appended(&self) {
        self.lag.fetch_add(1, Ordering::SeqCst);
    }

    /// A message counted by [`EndpointFlow::appended`] was stored nowhere.
    pub(crate) fn refused(&self) {
        self.less(1);
    }

    /// The worker completed `n` messages counted by [`EndpointFlow::appended`].
    pub(crate) fn completed(&self, n: u64) {
        if n > 0 {
            self.less(n);
        }
    }

    fn less(&self, n: u64) {
        self.lag
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::SeqCst);
        // After the lag moved: a producer that registered as held before this load is woken,
        // one that registers after it reads the new lag.
        if self.held.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// A receiver connected (`true`) or went away (`false`); going offline releases every
    /// producer it held at once.
    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Counters for metrics.
    pub fn stats(&self) -> FlowStats {
        let view = self.view();
        FlowStats {
            endpoint: self.endpoint.clone(),
            online: view.online,
            lag: view.lag,
            holds: self.holds.load(Ordering::Relaxed),
            held: Duration::from_micros(self.held_micros.load(Ordering::Relaxed)),
        }
    }

    /// Waits until this endpoint no longer holds its producers (offline or within its bound).
    async fn until_within_bound(&self) {
        loop {
            // Created before the check: a wake-up sent after it is not missed.
            let changed = self.changed.notified();
            if !self.is_over_bound() {
                return;
            }
            changed.await;
        }
    }
}

/// A producer held after routing a message: await [`FlowHold::released`] before reading its next
/// message. Dropping it (released or not) adds the time held to the endpoint's counters.
#[derive(Debug)]
pub struct FlowHold {
    flows: Vec<Arc<EndpointFlow>>,
    /// The endpoint that held the producer first (for logs and metrics).
    by: Arc<EndpointFlow>,
    since: Instant,
}

impl FlowHold {
    /// A hold if any of `flows` (the endpoints a message went to) holds its producers now.
    pub fn check(flows: &[Arc<EndpointFlow>]) -> Option<FlowHold> {
        let by = flows.iter().find(|f| f.is_over_bound())?;
        // Registered as held before anything is awaited, so wake-ups are sent from now on.
        for f in flows {
            f.held.fetch_add(1, Ordering::SeqCst);
        }
        by.holds.fetch_add(1, Ordering::Relaxed);
        Some(FlowHold {
            flows: flows.to_vec(),
            by: Arc::clone(by),
            since: Instant::now(),
        })
    }

    /// The endpoint that held the producer.
    pub fn endpoint(&self) -> &EndpointId {
        self.by.endpoint()
    }

    /// Resolves once every endpoint of the message is offline or within its bound. Cancel-safe
    /// (it only reads shared state), so it can be one branch of a `select!` loop.
    pub async fn released(&self) {
        loop {
            let Some(over) = self.flows.iter().find(|f| f.is_over_bound()) else {
                return;
            };
            over.until_within_bound().await;
        }
    }
}

/// Resolves when `hold` is released, and never without one: for a `select!` branch that is off
/// while nothing holds the producer.
pub async fn until_released(hold: Option<&FlowHold>) {
    match hold {
        Some(hold) => hold.released().await,
        None => std::future::pending().await,
    }
}

impl Drop for FlowHold {
    fn drop(&mut self) {
        for f in &self.flows {
            f.held.fetch_sub(1, Ordering::SeqCst);
        }
        let micros = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.by.held_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn view(online: bool, lag: u64) -> FlowView {
        FlowView {
            online,
            lag: Lag(lag),
        }
    }

    #[test]
    fn only_an_online_endpoint_over_its_bound_holds() {
        let bound = FlowBound::MaxLag(Lag(10));
        assert!(!over_bound(view(true, 10), bound), "at the bound: not over");
        assert!(over_bound(view(true, 11), bound));
        assert!(
            !over_bound(view(false, 1_000_000), bound),
            "offline: store and forward"
        );
        assert!(!over_bound(view(true, 1_000_000), FlowBound::Off));
    }

    #[test]
    fn a_producer_feeding_several_endpoints_is_held_only_by_the_one_that_lags() {
        let bound = FlowBound::MaxLag(Lag(10));
        let views = [
            view(true, 3),
            view(false, 500),
            view(true, 11),
            view(true, 50),
        ];
        assert_eq!(first_over_bound(views, bound), Some(2));
        assert_eq!(
            first_over_bound([view(true, 3), view(false, 500)], bound),
            None
        );
        assert_eq!(first_over_bound(Vec::new(), bound), None);
    }

    fn flow(max: u64) -> Arc<EndpointFlow> {
        Arc::new(EndpointFlow::new(
            EndpointId::from_stored("m/in".to_owned()),
            FlowBound::MaxLag(Lag(max)),
        ))
    }

    fn lagging(f: &EndpointFlow, n: u64) {
        for _ in 0..n {
            f.appended();
        }
    }

    #[test]
    fn lag_counts_appends_until_completed_or_refused() {
        let f = flow(2);
        f.set_online(true);
        lagging(&f, 4);
        assert_eq!(f.view().lag, Lag(4));
        assert!(f.is_over_bound());
        f.refused();
        f.completed(1);
        assert_eq!(f.view().lag, Lag(2));
        assert!(!f.is_over_bound());
        f.completed(5);
        assert_eq!(f.view().lag, Lag(0), "never read below zero");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_producer_is_released_when_the_worker_catches_up() {
        let f = flow(2);
        f.set_online(true);
        lagging(&f, 5);
        let hold = FlowHold::check(std::slice::from_ref(&f)).expect("held");
        assert_eq!(hold.endpoint(), &EndpointId::from_stored("m/in".to_owned()));
        {
            let released = hold.released();
            tokio::pin!(released);
            // Still over the bound after one completion: not released.
            f.completed(2);
            assert!(
                tokio::time::timeout(Duration::from_secs(3600), released.as_mut())
                    .await
                    .is_err(),
                "lag 3 > 2 must keep it held"
            );
            f.completed(1);
            tokio::time::timeout(Duration::from_secs(1), released)
                .await
                .expect("released at the bound");
        }
        assert_eq!(
            f.held.load(Ordering::SeqCst),
            1,
            "registered while the hold lives"
        );
        drop(hold);
        let stats = f.stats();
        assert_eq!(stats.holds, 1);
        assert_eq!(f.held.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn going_offline_releases_held_producers_at_once() {
        let f = flow(2);
        f.set_online(true);
        lagging(&f, 100);
        let holds: Vec<FlowHold> = (0..3)
            .map(|_| FlowHold::check(std::slice::from_ref(&f)).expect("held"))
            .collect();
        let waiting = tokio::spawn(async move {
            for h in &holds {
                h.released().await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        f.set_online(false);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("released without the lag moving")
            .unwrap();
        assert_eq!(
            f.view().lag,
            Lag(100),
            "the backlog stays: store and forward"
        );
        assert!(
            FlowHold::check(std::slice::from_ref(&f)).is_none(),
            "offline never holds"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_waits_for_every_lagging_endpoint_of_the_message() {
        let (a, b, c) = (flow(1), flow(1), flow(1));
        for f in [&a, &b, &c] {
            f.set_online(true);
        }
        lagging(&a, 5);
        lagging(&b, 5);
        let flows = vec![Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)];
        let hold = FlowHold::check(&flows).expect("held");
        assert_eq!(hold.endpoint(), a.endpoint());
        let released = hold.released();
        tokio::pin!(released);
        a.completed(5);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), released.as_mut())
                .await
                .is_err(),
            "b still lags"
        );
        b.set_online(false);
        tokio::time::timeout(Duration::from_secs(1), released)
            .await
            .expect("released");
        // The producer of a message to c alone was never held.
        assert!(FlowHold::check(std::slice::from_ref(&c)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn held_producers_resume_one_at_a_time_in_the_order_they_were_held() {
        let f = flow(2);
        f.set_online(true);
        lagging(&f, 3);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for name in ["a", "b", "c"] {
            let hold = FlowHold::check(std::slice::from_ref(&f)).expect("held");
            let (f, order) = (Arc::clone(&f), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                hold.released().await;
                order.lock().unwrap().push(name);
                // It reads its next publish, which is over the bound again.
                f.appended();
                drop(hold);
            }));
            // Each is in line before the next one is held.
            tokio::task::yield_now().await;
        }
        for expected in 1..=3 {
            f.completed(1);
            let resumed = async {
                while order.lock().unwrap().len() < expected {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(Duration::from_secs(1), resumed)
                .await
                .expect("one resumes per completion");
            // Only one: the lag is back over the bound after its publish.
            tokio::time::timeout(Duration::from_secs(3600), std::future::pending::<()>())
                .await
                .ok();
            assert_eq!(order.lock().unwrap().len(), expected);
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "c"]);
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_time_is_counted_for_the_endpoint_that_held() {
        let f = flow(0);
        f.set_online(true);
        lagging(&f, 1);
        let hold = FlowHold::check(std::slice::from_ref(&f)).expect("held");
        let waiter = async {
            hold.released().await;
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            f.completed(1);
        };
        tokio::join!(waiter, release);
        drop(hold);
        let stats = f.stats();
        assert_eq!(stats.holds, 1);
        // Paused time: the clock moved exactly by the sleep while the producer was held.
        assert_eq!(stats.held, Duration::from_millis(250));
    }
}
