//! The MQTT face of module twins (reference §1.7): answers to `$iothub/twin/GET` and
//! `$iothub/twin/PATCH/properties/reported`, and desired-properties patches after a reload.
//! The twins themselves are [`crate::twin`]'s; a connection calls in here.
//!
//! Guarantees:
//! - Everything published is the connection's own module's twin: the twin topics carry no
//!   identity, and the module is always the authenticated one.
//! - GET → `$iothub/twin/res/200/?$rid={rid}` with `{"desired": {…, "$version": n},
//!   "reported": {…, "$version": m}}`. PATCH → `$iothub/twin/res/204/?$rid={rid}&$version={m}`,
//!   published only once the patch is durable and this hub still owns the data directory.
//!   A refused request → `$iothub/twin/res/{status}/?$rid={rid}` with `{"status", "message"}`
//!   saying why (400, 413, 500: see [`crate::twin::document`]). A request without `$rid`
//!   is refused with 400 on `…/?$rid=` and never applied.
//! - A hub that a newer one fenced answers nothing ([`TwinError::status`] is `None`): the
//!   caller closes the connection, so the module asks the live hub again.
//! - Desired patches go to a connection subscribed to them: after each change of the
//!   manifest's desired properties, the difference between what the connection last sent (or
//!   what the twin held when it subscribed) and the twin's desired properties now, on
//!   `$iothub/twin/PATCH/properties/desired/?$version={n}` with `$version` in the body, as IoT
//!   Hub sends it. Several reloads while the connection could not send are one patch. A module
//!   that was away and subscribes again is sent, right after the SUBACK, one patch of what it
//!   missed: the difference from the desired properties last served to it (a GET answer or a
//!   patch, kept with the twin), as edgeHub does; the Python SDK also GETs on every reconnect.
//! - Answers and patches are QoS 0 and go through the connection's bounded outgoing queue. An
//!   answer goes to the module that asked even before it subscribed to `$iothub/twin/res/#`
//!   (the Python SDK GETs right after CONNECT when a desired-patch handler is set, before it
//!   subscribes, and waits for that answer for good).

use std::time::Instant;

use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};

use crate::identity::Identity;
use crate::metrics::HubMetrics;
use crate::mqtt::topics::{self, TwinOp};
use crate::twin::{TwinError, Twins};

/// Answers one twin request of `identity`'s module, which arrived at `arrived`: the publish to
/// send back, or the error that forbids any answer (this hub is fenced).
pub fn answer(
    twins: &Twins,
    metrics: &HubMetrics,
    identity: &Identity,
    request: (TwinOp, Option<&str>, &[u8]),
    arrived: Instant,
) -> Result<Publish, TwinError> {
    let (op, rid, payload) = request;
    let module = &identity.module;
    let reply = match rid {
        None => refusal(400, "", "a twin request needs a $rid"),
        Some(rid) => match op {
            TwinOp::Get => match twins.get(module) {
                Ok(twin) => publish(
                    topics::twin_response_topic(200, rid),
                    twin.document().to_string().into_bytes(),
                ),
                Err(e) => error_reply(identity, rid, e)?,
            },
            TwinOp::PatchReported => match twins.patch_reported(module, payload) {
                Ok(version) => publish(
                    topics::twin_response_topic_with_version(204, rid, version),
                    Vec::new(),
                ),
                Err(e) => error_reply(identity, rid, e)?,
            },
        },
    };
    match op {
        TwinOp::Get => metrics.twin_get(identity, arrived.elapsed()),
        TwinOp::PatchReported => metrics.reported_properties_updated(identity, arrived.elapsed()),
    }
    Ok(reply)
}

/// The refusal of a request, or the error itself if nothing may be answered.
fn error_reply(identity: &Identity, rid: &str, error: TwinError) -> Result<Publish, TwinError> {
    let Some(status) = error.status() else {
        return Err(error);
    };
    if status >= 500 {
        tracing::error!(%identity, %error, "twin request failed");
    } else {
        tracing::warn!(%identity, %error, status, "twin request refused");
    }
    Ok(refusal(status, rid, &error.to_string()))
}

fn refusal(status: u16, rid: &str, message: &str) -> Publish {
    let body = json!({ "status": status, "message": message });
    publish(
        topics::twin_response_topic(status, rid),
        body.to_string().into_bytes(),
    )
}

fn publish(topic: String, payload: Vec<u8>) -> Publish {
    Publish::new(topic, QoS::AtMostOnce, payload)
}

/// What one connection last told its module about the desired properties (the shared
/// [`crate::twin::desired_watch::DesiredWatch`]), as MQTT publishes.
#[derive(Debug, Default)]
pub struct DesiredWatch {
    inner: crate::twin::desired_watch::DesiredWatch,
    /// Just started: the patch of what the module missed while away is due (sent when the
    /// outgoing queue has room, after the SUBACK).
    catch_up: bool,
}

impl DesiredWatch {
    /// The connection subscribed to desired patches: from now on it is sent every change after
    /// the desired properties last served to its module, the first one at once
    /// ([`DesiredWatch::catching_up`]) if the module missed some while away.
    pub fn start(&mut self, twins: &Twins, identity: &Identity) -> Result<(), TwinError> {
        if !self.inner.is_started() {
            self.inner.start(twins, identity)?;
            self.catch_up = true;
        }
        Ok(())
    }

    /// The connection unsubscribed.
    pub fn stop(&mut self) {
        self.inner.stop();
        self.catch_up = false;
    }

    /// Whether [`DesiredWatch::next_patch`] is due without a change of the desired properties
    /// (the connection just subscribed).
    pub fn catching_up(&self) -> bool {
        self.catch_up
    }

    /// After the manifest's desired properties changed: the patch to send, if the connection
    /// is subscribed and its module's desired properties differ from what it was told.
    pub fn next_patch(
        &mut self,
        twins: &Twins,
        identity: &Identity,
    ) -> Result<Option<Publish>, TwinError> {
        self.catch_up = false;
        Ok(self
            .inner
            .next_patch(twins, identity)?
            .map(|(version, patch)| {
                publish(
                    topics::desired_patch_topic(version),
                    Value::Object(patch).to_string().into_bytes(),
                )
            }))
    }
}
