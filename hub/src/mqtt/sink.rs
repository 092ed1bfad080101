//! The router's sink for a connected module's input: hands each delivery to the module's MQTT
//! connection and reports it delivered only when the module's PUBACK for it came back.
//!
//! Guarantees: a delivery is `Delivered` only after the module acknowledged it; if the connection
//! is gone, closes before the PUBACK, or never had room, the delivery is `Retry(NoReceiver)` and
//! the endpoint worker resends it, in order, to the next connection. The sink never drops a
//! message on its own.

use router::{Delivery, DeliveryOutcome, FailureKind, InputName, Message, Sink};
use tokio::sync::{mpsc, oneshot};

/// A message on its way to a module, and where to say whether the module acknowledged it.
#[derive(Debug)]
pub struct Outbound {
    /// The input it is delivered on.
    pub input: InputName,
    /// The message.
    pub message: Message,
    /// Answered `true` when the module's PUBACK arrives; dropped if the connection ends first.
    pub acked: oneshot::Sender<bool>,
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
                    acked,
                })
                .is_ok();
            waiting.push(handed.then_some(rx));
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for rx in waiting {
            let acked = match rx {
                Some(rx) => rx.await.unwrap_or(false),
                None => false,
            };
            outcomes.push(if acked {
                DeliveryOutcome::Delivered
            } else {
                DeliveryOutcome::Retry(FailureKind::NoReceiver)
            });
        }
        outcomes
    }
}
