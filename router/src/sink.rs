//! The delivery seam: a [`Sink`] sends a batch of messages to one endpoint and says, per message,
//! whether it was delivered, should be retried, or can never be delivered.
//!
//! Heads implement it (a connected module's session, the upstream client); tests implement fault
//! doubles. Retryable versus permanent is in the type ([`DeliveryOutcome`]), never in a log line.
//!
//! Contract for implementors:
//! - `send` returns one outcome per delivery, in the batch's order. A missing outcome counts as
//!   `Retry(FailureKind::Internal)`; extra outcomes are ignored.
//! - The whole batch may be in flight at once (it is the endpoint's window). A sink that must not
//!   let its receiver see a later message before an earlier one (a module input, as edgeHub)
//!   stops at its first failure and answers `Retry` for everything after it: the worker resends
//!   from the first message that is not `Delivered` or `Reject`, in order.
//! - `send_reporting` (provided: reports every outcome when `send` returns) may tell each
//!   outcome earlier, once, in the batch's order; the module replicas' driver settles each
//!   acknowledgement as it is told.
//! - `send` is cancelled (dropped) on shutdown; whatever it delivered is then sent again after a
//!   restart (at-least-once).

use std::future::Future;
use std::pin::Pin;

use store::Offset;

use crate::message::Message;
use crate::route::Priority;

/// One message handed to a sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Its offset in the store (unique across every queue; the same on every resend).
    pub offset: Offset,
    /// The priority queue it comes from.
    pub priority: Priority,
    /// How many times it was sent before and answered `Retry` (0 on the first send). Sends cut
    /// short by a restart are not counted.
    pub previous_attempts: u32,
    /// The message.
    pub message: Message,
}

/// What became of one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver has it.
    Delivered,
    /// Not delivered this time; send it again after a backoff.
    Retry(FailureKind),
    /// Can never be delivered (the receiver refused it for good): set aside and counted.
    Reject(RejectReason),
}

/// Why a retryable delivery failed (edgeHub `FailureKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A transient error: network, broken connection.
    Transient,
    /// Nobody is there to receive: the module is not connected or not subscribed.
    NoReceiver,
    /// The receiver asked us to slow down.
    Throttled,
    /// No answer in time.
    Timeout,
    /// A bug or an unexpected state in the sink.
    Internal,
}

/// Why a delivery can never succeed, for logs and diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectReason(String);

impl RejectReason {
    /// A reason in words.
    pub fn new(reason: impl Into<String>) -> Self {
        RejectReason(reason.into())
    }

    /// The reason as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Told each delivery's outcome as soon as the sink knows it: its index in the batch and the
/// outcome, once per delivery, in the batch's order ([`Sink::send_reporting`]).
pub type Progress = Box<dyn FnMut(usize, &DeliveryOutcome) + Send>;

/// Sends batches to one endpoint. Implementations may write `async fn send(…)`.
pub trait Sink: Send + Sync + 'static {
    /// Sends `batch` (in order) and reports one outcome per delivery.
    fn send(&self, batch: Vec<Delivery>) -> impl Future<Output = Vec<DeliveryOutcome>> + Send;

    /// [`Sink::send`], also telling `progress` each outcome as soon as it is known, so that a
    /// caller can settle what the receiver acknowledged while the rest of the batch is still in
    /// flight (a module replica leaving mid-batch: only what it did not acknowledge goes again).
    /// The default tells them all once `send` returns; a sink whose receiver settles deliveries
    /// one by one overrides it.
    fn send_reporting(
        &self,
        batch: Vec<Delivery>,
        mut progress: Progress,
    ) -> impl Future<Output = Vec<DeliveryOutcome>> + Send {
        async move {
            let outcomes = self.send(batch).await;
            for (i, outcome) in outcomes.iter().enumerate() {
                progress(i, outcome);
            }
            outcomes
        }
    }
}

/// The boxed future a [`DynSink`] returns.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Vec<DeliveryOutcome>> + Send + 'a>>;

/// The object-safe form of [`Sink`], which the dispatcher stores (`Arc<dyn DynSink>`). Every
/// `Sink` is one.
pub trait DynSink: Send + Sync + 'static {
    /// [`Sink::send`], boxed.
    fn send_boxed(&self, batch: Vec<Delivery>) -> SendFuture<'_>;

    /// [`Sink::send_reporting`], boxed.
    fn send_reporting_boxed(&self, batch: Vec<Delivery>, progress: Progress) -> SendFuture<'_>;
}

impl<S: Sink> DynSink for S {
    fn send_boxed(&self, batch: Vec<Delivery>) -> SendFuture<'_> {
        Box::pin(self.send(batch))
    }

    fn send_reporting_boxed(&self, batch: Vec<Delivery>, progress: Progress) -> SendFuture<'_> {
        Box::pin(self.send_reporting(batch, progress))
    }
}
