//! The router's sink for `$upstream`: sends each batch to IoT Hub *as the module that sent each
//! message*, one [`Upstream`] call per sending identity, all identities at once.
//!
//! Guarantees:
//! - A delivery is `Delivered` only when the cloud acknowledged that very message; the queue's
//!   checkpoint (owned by the endpoint worker) therefore moves only on PUBACKs.
//! - Nothing is retried here. A message not acknowledged is `Retry`, and the worker resends the
//!   batch from the first such message, in order, so per identity the cloud sees every message
//!   in acceptance order, with duplicates only after a failure.
//! - A message that can never go (too large for IoT Hub, or from a source that has no cloud
//!   identity here) is `Reject`ed with the reason: set aside and counted, never silently dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use router::{Delivery, DeliveryOutcome, FailureKind, Message, RejectReason, Sink, Source};

use super::cloud::{CloudMessage, PublishError, Upstream};
use crate::identity::Identity;
use crate::property_bag;

/// The `$upstream` sink over an [`Upstream`].
#[derive(Debug)]
pub struct UpstreamSink<U> {
    upstream: Arc<U>,
}

impl<U> Clone for UpstreamSink<U> {
    fn clone(&self) -> Self {
        UpstreamSink {
            upstream: Arc::clone(&self.upstream),
        }
    }
}

impl<U: Upstream> UpstreamSink<U> {
    /// A sink sending through `upstream`.
    pub fn new(upstream: Arc<U>) -> Self {
        UpstreamSink { upstream }
    }
}

/// The cloud identity and wire form of a message, or why it has none.
pub fn to_cloud(message: &Message) -> Result<(Identity, CloudMessage), RejectReason> {
    let Source::ModuleOutput { device, module, .. } = message.source() else {
        return Err(RejectReason::new(format!(
            "{} has no upstream identity here: only module messages go upstream",
            message.source().path()
        )));
    };
    let bag = property_bag::encode_for_upstream(message);
    let topic = format!("devices/{device}/modules/{module}/messages/events/{bag}");
    Ok((
        Identity::new(device.clone(), module.clone()),
        CloudMessage {
            topic,
            payload: message.body().clone(),
        },
    ))
}

impl<U: Upstream> Sink for UpstreamSink<U> {
    async fn send(&self, batch: Vec<Delivery>) -> Vec<DeliveryOutcome> {
        let mut outcomes: Vec<Option<DeliveryOutcome>> = vec![None; batch.len()];
        let mut groups: BTreeMap<Identity, (Vec<usize>, Vec<CloudMessage>)> = BTreeMap::new();
        for (i, delivery) in batch.iter().enumerate() {
            match to_cloud(&delivery.message) {
                Ok((identity, message)) => {
                    let group = groups.entry(identity).or_default();
                    group.0.push(i);
                    group.1.push(message);
                }
                Err(reason) => outcomes[i] = Some(DeliveryOutcome::Reject(reason)),
            }
        }
        let mut tasks = Vec::with_capacity(groups.len());
        for (identity, (indexes, messages)) in groups {
            let upstream = Arc::clone(&self.upstream);
            let task = tokio::spawn(async move { upstream.publish(&identity, messages).await });
            tasks.push((indexes, task));
        }
        for (indexes, task) in tasks {
            // A panicked task answers nothing: every message of it is retried.
            let results = task.await.unwrap_or_default();
            let mut results = results.into_iter();
            for i in indexes {
                outcomes[i] = Some(match results.next() {
                    Some(Ok(())) => DeliveryOutcome::Delivered,
                    Some(Err(e)) if !e.is_retryable() => {
                        DeliveryOutcome::Reject(RejectReason::new(e.to_string()))
                    }
                    Some(Err(PublishError::Offline(_) | PublishError::Lost)) => {
                        DeliveryOutcome::Retry(FailureKind::Transient)
                    }
                    Some(Err(_)) | None => DeliveryOutcome::Retry(FailureKind::Internal),
                });
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(DeliveryOutcome::Retry(FailureKind::Internal)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use router::{DeviceId, ModuleId, OutputName, Priority};
    use store::Offset;

    use super::*;

    /// Acknowledges everything except the messages whose body is in `fail`; records calls.
    #[derive(Default)]
    struct Double {
        fail: Vec<&'static str>,
        calls: Mutex<Vec<(String, Vec<String>)>>,
    }

    impl Upstream for Double {
        async fn publish(
            &self,
            identity: &Identity,
            messages: Vec<CloudMessage>,
        ) -> Vec<Result<(), PublishError>> {
            let bodies: Vec<String> = messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect();
            self.calls
                .lock()
                .unwrap()
                .push((identity.to_string(), bodies.clone()));
            bodies
                .iter()
                .map(|b| {
                    if self.fail.contains(&b.as_str()) {
                        Err(PublishError::Lost)
                    } else if b == "huge" {
                        Err(PublishError::TooLarge { size: 1, limit: 0 })
                    } else {
                        Ok(())
                    }
                })
                .collect()
        }
    }

    fn delivery(offset: u64, module: &str, body: &'static str) -> Delivery {
        Delivery {
            offset: Offset::new(offset),
            priority: Priority::default(),
            previous_attempts: 0,
            message: Message::new(
                Source::ModuleOutput {
                    device: DeviceId::new("dev"),
                    module: ModuleId::new(module),
                    output: Some(OutputName::new("o")),
                },
                body,
            )
            .with_property("k", "v w"),
        }
    }

    #[tokio::test]
    async fn each_identity_gets_its_own_messages_in_order_and_outcomes_keep_batch_order() {
        let double = Arc::new(Double {
            fail: vec!["b2"],
            ..Double::default()
        });
        let sink = UpstreamSink::new(Arc::clone(&double));
        let leaf = Delivery {
            message: Message::new(
                Source::Telemetry {
                    device: DeviceId::new("leaf"),
                },
                "l",
            ),
            ..delivery(9, "x", "l")
        };
        let batch = vec![
            delivery(1, "a", "a1"),
            delivery(2, "b", "b1"),
            delivery(3, "a", "a2"),
            leaf,
            delivery(5, "b", "b2"),
            delivery(6, "a", "huge"),
        ];
        let out = sink.send(batch).await;
        assert_eq!(out[0], DeliveryOutcome::Delivered);
        assert_eq!(out[1], DeliveryOutcome::Delivered);
        assert_eq!(out[2], DeliveryOutcome::Delivered);
        assert!(matches!(out[3], DeliveryOutcome::Reject(_)), "{:?}", out[3]);
        assert_eq!(out[4], DeliveryOutcome::Retry(FailureKind::Transient));
        assert!(matches!(out[5], DeliveryOutcome::Reject(_)), "{:?}", out[5]);
        let mut calls = double.calls.lock().unwrap().clone();
        calls.sort();
        assert_eq!(
            calls,
            vec![
                (
                    "dev/a".to_owned(),
                    vec!["a1".into(), "a2".into(), "huge".into()]
                ),
                ("dev/b".to_owned(), vec!["b1".into(), "b2".into()]),
            ]
        );
    }

    #[test]
    fn the_cloud_topic_carries_the_sender_and_the_bag() {
        let (identity, m) = to_cloud(&delivery(1, "modA", "x").message).unwrap();
        assert_eq!(identity.to_string(), "dev/modA");
        assert_eq!(m.topic, "devices/dev/modules/modA/messages/events/k=v%20w");
    }
}
