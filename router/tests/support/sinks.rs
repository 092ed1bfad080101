//! Fault doubles for the `Sink` seam (as iotedge's FailedEndpoint, PartialFailureEndpoint,
//! StalledEndpoint, RevivableEndpoint), all writing to a shared [`Log`] of what they were offered
//! and what they answered.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use router::{Delivery, DeliveryOutcome, FailureKind, RejectReason, Sink};
use store::Offset;
use tokio::sync::watch;

/// One delivery a sink was offered and what it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub body: String,
    pub offset: Offset,
    pub priority: u32,
    pub outcome: DeliveryOutcome,
}

/// Everything sinks sharing this log were offered, in order.
#[derive(Clone, Debug)]
pub struct Log {
    seen: Arc<Mutex<Vec<Seen>>>,
    changed: watch::Sender<usize>,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            seen: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Log {
    pub fn record(&self, batch: &[Delivery], outcomes: &[DeliveryOutcome]) {
        let mut seen = self.seen.lock().unwrap();
        for (d, o) in batch.iter().zip(outcomes) {
            seen.push(Seen {
                body: body(d),
                offset: d.offset,
                priority: d.priority.0,
                outcome: o.clone(),
            });
        }
        self.changed.send_replace(seen.len());
    }

    /// Everything offered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Bodies answered `Delivered`, in order, duplicates included.
    pub fn delivered(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.outcome == DeliveryOutcome::Delivered)
            .map(|s| s.body)
            .collect()
    }

    /// Bodies as first delivered (duplicates removed, first occurrence kept).
    pub fn first_deliveries(&self) -> Vec<String> {
        let mut once = BTreeSet::new();
        self.delivered()
            .into_iter()
            .filter(|b| once.insert(b.clone()))
            .collect()
    }

    /// Waits until `pred` holds for the log (re-checked after every recorded batch).
    pub async fn wait_until(&self, pred: impl Fn(&[Seen]) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if pred(&self.seen.lock().unwrap()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    }

    /// Waits until `n` distinct messages were delivered.
    pub async fn wait_delivered(&self, n: usize) {
        self.wait_until(|seen| {
            let distinct: BTreeSet<&str> = seen
                .iter()
                .filter(|s| s.outcome == DeliveryOutcome::Delivered)
                .map(|s| s.body.as_str())
                .collect();
            distinct.len() >= n
        })
        .await;
    }

    /// Waits until `n` deliveries were offered (whatever the answer).
    pub async fn wait_offered(&self, n: usize) {
        self.wait_until(|seen| seen.len() >= n).await;
    }
}

pub fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(d.message.body()).into_owned()
}

/// Delivers everything.
#[derive(Clone, Debug, Default)]
pub struct RecordingSink {
    pub log: Log,
}

impl Sink for RecordingSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let outcomes = vec![DeliveryOutcome::Delivered; batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Fails everything, retryably.
#[derive(Clone, Debug, Default)]
pub struct FailingSink {
    pub log: Log,
}

impl Sink for FailingSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let outcomes = vec![DeliveryOutcome::Retry(FailureKind::Transient); batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Fails the named bodies the first `times` times each is offered. By default it delivers
/// everything else, including messages behind a failed one in the same batch (which the worker
/// must resend anyway, to keep the order); [`PartialFailureSink::stopping`] makes it answer
/// `Retry` for everything after a failure instead, as edgeHub's module endpoint does.
#[derive(Clone, Debug)]
pub struct PartialFailureSink {
    pub log: Log,
    failing: BTreeSet<String>,
    times: usize,
    stop_at_failure: bool,
    failed: Arc<Mutex<Vec<String>>>,
}

impl PartialFailureSink {
    pub fn new(failing: &[&str], times: usize) -> Self {
        PartialFailureSink {
            log: Log::default(),
            failing: failing.iter().map(|s| s.to_string()).collect(),
            times,
            stop_at_failure: false,
            failed: Arc::default(),
        }
    }

    pub fn stopping(mut self) -> Self {
        self.stop_at_failure = true;
        self
    }
}

impl Sink for PartialFailureSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let mut failed = self.failed.lock().unwrap();
        let mut stopped = false;
        let outcomes: Vec<DeliveryOutcome> = batch
            .iter()
            .map(|d| {
                let b = body(d);
                let so_far = failed.iter().filter(|f| **f == b).count();
                if stopped {
                    DeliveryOutcome::Retry(FailureKind::Transient)
                } else if self.failing.contains(&b) && so_far < self.times {
                    failed.push(b);
                    stopped = self.stop_at_failure;
                    DeliveryOutcome::Retry(FailureKind::Timeout)
                } else {
                    DeliveryOutcome::Delivered
                }
            })
            .collect();
        drop(failed);
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Rejects the named bodies for good; delivers the rest.
#[derive(Clone, Debug)]
pub struct RejectingSink {
    pub log: Log,
    rejected: BTreeSet<String>,
}

impl RejectingSink {
    pub fn new(rejected: &[&str]) -> Self {
        RejectingSink {
            log: Log::default(),
            rejected: rejected.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Sink for RejectingSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let outcomes: Vec<DeliveryOutcome> = batch
            .iter()
            .map(|d| {
                if self.rejected.contains(&body(d)) {
                    DeliveryOutcome::Reject(RejectReason::new("malformed"))
                } else {
                    DeliveryOutcome::Delivered
                }
            })
            .collect();
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Delivers the first `deliver_first` messages, then holds every later send until
/// [`StalledSink::release`] (forever if never released).
#[derive(Clone, Debug)]
pub struct StalledSink {
    pub log: Log,
    deliver_first: usize,
    released: watch::Sender<bool>,
    /// Batches that reached the stall.
    pub stalled: watch::Sender<usize>,
}

impl StalledSink {
    pub fn after(deliver_first: usize) -> Self {
        StalledSink {
            log: Log::default(),
            deliver_first,
            released: watch::channel(false).0,
            stalled: watch::channel(0).0,
        }
    }

    pub fn release(&self) {
        self.released.send_replace(true);
    }

    pub async fn wait_stalled(&self) {
        let mut rx = self.stalled.subscribe();
        rx.wait_for(|n| *n > 0).await.unwrap();
    }
}

impl Sink for StalledSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let delivered = self.log.delivered().len();
        let take = self
            .deliver_first
            .saturating_sub(delivered)
            .min(batch.len());
        if take == batch.len() || *self.released.borrow() {
            let outcomes = vec![DeliveryOutcome::Delivered; batch.len()];
            self.log.record(&batch, &outcomes);
            return outcomes;
        }
        if take > 0 {
            // Deliver what is allowed now; the rest comes back as the next batch.
            let mut outcomes = vec![DeliveryOutcome::Delivered; take];
            self.log.record(&batch[..take], &outcomes);
            outcomes.resize(batch.len(), DeliveryOutcome::Retry(FailureKind::Throttled));
            return outcomes;
        }
        self.stalled.send_modify(|n| *n += 1);
        let mut rx = self.released.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        let outcomes = vec![DeliveryOutcome::Delivered; batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Fails (no receiver) while dead; delivers once revived.
#[derive(Clone, Debug)]
pub struct RevivableSink {
    pub log: Log,
    alive: Arc<Mutex<bool>>,
}

impl RevivableSink {
    pub fn dead() -> Self {
        RevivableSink {
            log: Log::default(),
            alive: Arc::default(),
        }
    }

    pub fn revive(&self) {
        *self.alive.lock().unwrap() = true;
    }
}

impl Sink for RevivableSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let outcome = if *self.alive.lock().unwrap() {
            DeliveryOutcome::Delivered
        } else {
            DeliveryOutcome::Retry(FailureKind::NoReceiver)
        };
        let outcomes = vec![outcome; batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}

/// Takes `delay` (tokio time) per batch, then delivers it.
#[derive(Clone, Debug)]
pub struct SlowSink {
    pub log: Log,
    delay: Duration,
}

impl SlowSink {
    pub fn new(delay: Duration) -> Self {
        SlowSink {
            log: Log::default(),
            delay,
        }
    }
}

impl Sink for SlowSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        tokio::time::sleep(self.delay).await;
        let outcomes = vec![DeliveryOutcome::Delivered; batch.len()];
        self.log.record(&batch, &outcomes);
        outcomes
    }
}
