//! The cloud connection: the seam between the upstream sink and whatever carries messages to
//! IoT Hub. ("Cloud connection", not "link": a link is an AMQP link in this crate.)
//!
//! [`Upstream`] publishes messages *as* a module identity and answers, per message, whether the
//! cloud acknowledged it. The MQTT client ([`super::mqtt::MqttUpstream`]) is one implementation;
//! tests use doubles. The sink above it owns ordering and retransmission (from the store), so an
//! implementation needs to promise only this:
//! - an `Ok` answer means the cloud acknowledged that very message (a PUBACK for it);
//! - the answers of one call come back in the call's order, and once one message of a call is
//!   not acknowledged, no later message of the same call is reported acknowledged unless the
//!   cloud really acknowledged it (duplicates are allowed; false acknowledgements are not);
//! - nothing is retried behind the caller's back.

use std::future::Future;

use bytes::Bytes;

use crate::identity::Identity;

/// One message on its way to IoT Hub, as it goes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudMessage {
    /// The MQTT topic, property bag included.
    pub topic: String,
    /// The body.
    pub payload: Bytes,
}

/// Why a message was not acknowledged by the cloud.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// There is no connection right now (down, refused, or being re-established).
    #[error("not connected to IoT Hub: {0}")]
    Offline(String),
    /// The connection ended before the cloud acknowledged the message.
    #[error("the connection to IoT Hub ended before the message was acknowledged")]
    Lost,
    /// No credentials for the identity (no key on file for it).
    #[error("no key for {0} in the identities file")]
    NoCredentials(String),
    /// The message can never be sent: it is larger than IoT Hub accepts.
    #[error("the message is {size} bytes on the wire, over IoT Hub's limit of {limit}")]
    TooLarge {
        /// Topic plus body, in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl PublishError {
    /// Whether sending again may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PublishError::TooLarge { .. })
    }
}

/// Carries messages to the cloud as module identities.
pub trait Upstream: Send + Sync + 'static {
    /// Publishes `messages` as `identity`, in order, and answers per message (same order).
    fn publish(
        &self,
        identity: &Identity,
        messages: Vec<CloudMessage>,
    ) -> impl Future<Output = Vec<Result<(), PublishError>>> + Send;
}
