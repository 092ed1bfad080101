//! The router's sink for a connected module's input: hands each delivery to the module's
//! connection (MQTT or AMQP) and reports the outcome the connection settled it with.
//!
//! Guarantees: a delivery is `Delivered` only after the module acknowledged it (MQTT PUBACK,
//! AMQP `accepted`); if the connection is gone, closes before settling, or never had room, the
//! delivery is `Retry(NoReceiver)` and the endpoint worker resends it, in order, to the next
//! connection. The sink never drops a message on its own: only a connection answering
//! `Reject` (an AMQP `rejected`/`released`, see `amqp::links`) sets one aside.
//!
//! Memory: a connection takes deliveries from a queue of [`OUTBOUND_CAPACITY`] (made by
//! [`outbound_channel`]); while it is full, [`ModuleInputSink::send`] waits for the connection
//! to take more (the endpoint worker is waiting for the outcomes anyway), so what waits for a
//! module that does not acknowledge is bounded whatever the workers' windows.

use router::{Delivery, DeliveryOutcome, FailureKind, InputName, Message, Progress, Sink};
use store::Offset;

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
    pub offset: Offset,
    /// How many times it was sent before without success (AMQP `iothub-deliverycount`).
    pub previous_attempts: u32,
    /// Answered with the module's settlement (`Delivered` on PUBACK / `accepted`); dropped if
    /// the connection ends first.
    pub acked: oneshot::Sender<DeliveryOutcome>,
}

/// Where a connection takes deliveries from.
pub type OutboundTx = mpsc::Sender<Outbound>;
/// The connection's end of an [`OutboundTx`].
pub type OutboundRx = mpsc::Receiver<Outbound>;

/// Deliveries handed to one connection and not yet taken by it.
pub const OUTBOUND_CAPACITY: usize = 128;

/// The queue between a connection and its input sinks, bounded by [`OUTBOUND_CAPACITY`].
pub fn outbound_channel() -> (OutboundTx, OutboundRx) {
    mpsc::channel(OUTBOUND_CAPACITY)
}

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
        self.send_reporting(batch, Box::new(|_, _| {})).await
    }

    /// Each outcome is told as the module settles that delivery (the connection settles them
    /// in order), not once the whole batch is settled.
    async fn send_reporting(
        &self,
        batch: Vec<Delivery>,
        mut progress: Progress,
    ) -> Vec<DeliveryOutcome> {
        let mut waiting = Vec::with_capacity(batch.len());
        for delivery in batch {
            let (acked, rx) = oneshot::channel();
            // Waits while the connection's queue is full; fails once the connection is gone.
            let handed = self
                .connection
                .send(Outbound {
                    input: self.input.clone(),
                    message: delivery.message,
                    offset: delivery.offset,
                    previous_attempts: delivery.previous_attempts,
                    acked,
                })
                .await
                .is_ok();
            waiting.push(handed.then_some(rx));
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for (i, rx) in waiting.into_iter().enumerate() {
            let outcome = match rx {
                Some(rx) => rx.await.unwrap_or(NOT_DELIVERED),
                None => NOT_DELIVERED,
            };
            progress(i, &outcome);
            outcomes.push(outcome);
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use router::{DeviceId, ModuleId, Priority, Source};

    use super::*;

    fn delivery(i: u64) -> Delivery {
        let source = Source::ModuleOutput {
            device: DeviceId::new("d"),
            module: ModuleId::new("m"),
            output: None,
        };
        Delivery {
            message: Message::new(source, i.to_string().into_bytes()),
            offset: Offset::new(i),
            priority: Priority(0),
            previous_attempts: 0,
        }
    }

    /// A connection that takes nothing never holds more than OUTBOUND_CAPACITY deliveries,
    /// however large the worker's batch; once it takes and settles them, every delivery is
    /// answered, in order.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_takes_nothing_holds_a_bounded_queue() {
        let (tx, mut rx) = outbound_channel();
        let sink = ModuleInputSink::new(InputName::new("input1"), tx);
        let batch: Vec<Delivery> = (0..1000).map(delivery).collect();
        let sending = tokio::spawn(async move { sink.send(batch).await });
        // Let the sink run until it blocks.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(rx.len(), OUTBOUND_CAPACITY, "the queue grew past its bound");
        assert!(!sending.is_finished());
        let mut offsets = Vec::new();
        while offsets.len() < 1000 {
            let o = rx.recv().await.unwrap();
            offsets.push(o.offset.get());
            let _ = o.acked.send(DeliveryOutcome::Delivered);
            assert!(rx.len() <= OUTBOUND_CAPACITY);
        }
        assert_eq!(offsets, (0..1000).collect::<Vec<u64>>());
        let outcomes = sending.await.unwrap();
        assert!(outcomes.iter().all(|o| *o == DeliveryOutcome::Delivered));
    }
}
