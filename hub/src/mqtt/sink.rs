//! The router's sink for a connected module's input: hands each delivery to the module's
//! connection (MQTT or AMQP) and reports the outcome the connection settled it with.
//!
//! Guarantees: a delivery is `Delivered` only after the module acknowledged it (MQTT PUBACK,
//! AMQP `accepted`); if the connection is gone, closes before settling, or never had room, the
//! delivery is `Retry(NoReceiver)` and the endpoint worker resends it, in order, to the next
//! connection. The sink never drops a message on its own: only a connection answering
//! `Reject` (an AMQP `rejected`/`released`, see `amqp::links`) sets one aside.

use router::{Delivery, DeliveryOutcome, FailureKind, InputName, Message, Sink};

/// What a connection answers when it loses a delivery without a settlement.
pub const NOT_DELIVERED: DeliveryOutcome = DeliveryOutcome::Retry(FailureKind::NoReceiver);
use tokio::sync::{mpsc, oneshot};

/// A message on its way to a module, and where to say whether the module acknowledged it.
#[derive(Debug)]
pub struct Outbound {
    /// The input it is delivered on.
    pub input: InputName,
    /// The message.
    pub message: Message,
    /// Its offset in the store (AMQP `x-opt-sequence-number`).
    pub offset: u64,
    /// How many times it was sent before without success (AMQP `iothub-deliverycount`).
    pub previous_attempts: u32,
    /// Answered with the module's settlement (`Delivered` on PUBACK / `accepted`); dropped if
    /// the connection ends first.
    pub acked: oneshot::Sender<DeliveryOutcome>,
}

/// Where a connection takes deliveries from.
pub type OutboundTx = mpsc::UnboundedSender<Outbound>;

/// The sink of one module input, bound to one connection of that module.
#[derive(Debug, Clone)]
pub struct ModuleInputSink {
    input: InputName,
    connection: OutboundTx,
}

impl ModuleInputSink {
    /// A sink delivering on `input` through `connection`.
    pub fn new(input: InputName, connection: OutboundTx) -> Self {
        ModuleInputSink { input, connection }
    }
}

impl Sink for ModuleInputSink {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let mut waiting = Vec::with_capacity(batch.len());
        for delivery in batch {
            let (acked, rx) = oneshot::channel();
            let handed = self
                .connection
                .send(Outbound {
                    input: self.input.clone(),
                    message: delivery.message,
                    offset: delivery.offset.get(),
                    previous_attempts: delivery.previous_attempts,
                    acked,
                })
                .is_ok();
            waiting.push(handed.then_some(rx));
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for rx in waiting {
            outcomes.push(match rx {
                Some(rx) => rx.await.unwrap_or(NOT_DELIVERED),
                None => NOT_DELIVERED,
            });
        }
        outcomes
    }
}
