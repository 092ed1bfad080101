//! Module twins with IoT Hub, on each module's cloud connection: reported properties go up
//! after a module's patch is durable (and answered 204 locally); IoT Hub's desired properties
//! come down (a twin GET at every connect, then its desired patches) into the local twin,
//! whence they reach the connected module like a manifest change.
//!
//! One task per module (started for every declared module, and for any other whose twin is
//! opened later). What it does next is the pure [`next_step`] of what it knows:
//!
//! ```text
//!  no cloud connection ── nothing to send and no head served the twin ──▶ Idle (wait)
//!         │ a reported patch to send, or a head served the twin (GET, desired listener)
//!         ▼
//!  Open the module's cloud connection (kept for the hub's lifetime)
//!  offline ─▶ WaitOnline (a local patch meanwhile: the lag metric follows)
//!  online as connection n, twin not read on n ─▶ ReadTwin: $iothub/twin/GET/?$rid=
//!       ─▶ 200: IoT Hub's desired document kept with the twin (durable), served from now on
//!  reported to send ─▶ SendReported (below)
//!  else ─▶ WaitForChange (a local patch, a desired patch from IoT Hub, the connection)
//!  desired patches from IoT Hub (subscribed before the GET, taken in arrival order):
//!       applied if they follow the version held; an older one changes nothing; one that
//!       does not follow (or a dropped one) ─▶ ReadTwin again
//!
//!  SendReported: what IoT Hub lacks (Twins::reported_to_sync: the merge patch from what it
//!  acknowledged to the twin's reported properties, removed keys as null; see "in doubt")
//!    ─▶ keep its document's keys "in doubt" (durable; a write error: wait 1 s doubling to
//!       60 s, again)
//!    ─▶ $iothub/twin/PATCH/properties/reported/?$rid=
//!       ─▶ 204 ─▶ keep "acknowledged up to local version v", nothing in doubt (durable)
//!       ─▶ other status ─▶ log, wait 1 s doubling to 60 s ─▶ again
//!       ─▶ connection lost / no answer in --upstream-timeout ─▶ again
//! ```
//!
//! Guarantees, reported properties:
//! - **Never loses an acknowledged local patch**: a local patch is answered only once durable;
//!   what IoT Hub acknowledged is kept with the twin (durably, after its 204), so a restart or
//!   kill -9 at any point resends from there.
//! - **Right whatever IoT Hub applied**: before a patch goes, the keys of the document it
//!   brings IoT Hub to are kept with the twin (durably) as "in doubt" until its 204. While
//!   anything is in doubt (an answer lost with the connection, a time-out, a kill -9 between
//!   sending and keeping the 204), the next patch is the twin's reported properties whole with
//!   `null` for every key IoT Hub may hold that the twin lacks, so it is right from the
//!   acknowledged document and from every one in doubt (a plain difference would leave behind
//!   keys that only the lost patch added and the module removed since).
//! - **In order**: one patch in flight per module, on one connection at a time (a lost
//!   answer is only resent after that connection ended or timed the request out); each brings
//!   IoT Hub to a later local version than the one before (several local patches made
//!   meanwhile go as one).
//! - **A sync never fails a local patch**: it takes the module's lock only to read the twin
//!   and to write what IoT Hub acknowledged or may hold; its failures are its own (logged,
//!   retried).
//! - Keys IoT Hub holds that this hub never reported are left alone.
//!
//! Guarantees, desired properties:
//! - IoT Hub's document wins over the manifest's once given, with IoT Hub's `$version`, and
//!   is kept with the twin, so a restart while IoT Hub is away serves it (see `crate::twin`).
//! - No patch is applied out of order or over a gap: it applies only on the version just
//!   before it; else the twin is read again. A GET's document replaces what is held.
//!
//! `edgehub_twin_reported_sync_lag{id}`: local reported versions IoT Hub has not
//! acknowledged, kept current while offline; logs say when a sync is refused or resumes.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use router::{DeviceId, ModuleId};
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::mqtt::{CloudConnection, MqttUpstream, TwinRequestError};
use crate::identity::Identity;
use crate::twin::{CloudPatch, ReportedSync, Twins};

/// Where reported patches go.
pub const REPORTED_PATH: &str = "$iothub/twin/PATCH/properties/reported/";
/// Where a twin is read.
pub const GET_PATH: &str = "$iothub/twin/GET/";
/// The first wait after IoT Hub refused a request.
const REFUSED_MIN: Duration = Duration::from_secs(1);
/// The longest wait after IoT Hub refused a request.
const REFUSED_MAX: Duration = Duration::from_secs(60);

/// What a module's sync task knows when it decides ([`next_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Its cloud connection was opened.
    pub has_connection: bool,
    /// A head served the module's twin since the hub started.
    pub served: bool,
    /// Reported properties IoT Hub lacks.
    pub to_send: bool,
    /// The connection's number while it is up.
    pub online: Option<u64>,
    /// The connection whose twin GET was taken (`None` after a desired patch did not follow).
    pub read_on: Option<u64>,
}

/// What a module's sync task does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing: no connection is wanted yet; wait for a local patch or a head serving the twin.
    Idle,
    /// Open the module's cloud connection.
    Open,
    /// Wait for the connection to come up (or a local patch, for the lag metric).
    WaitOnline,
    /// GET the twin (its desired document) on the connection that is up.
    ReadTwin,
    /// Send the reported properties IoT Hub lacks.
    SendReported,
    /// Wait for a local patch, a desired patch from IoT Hub, or the connection to go or come.
    WaitForChange,
}

/// The next step of a module's sync task (see the module docs). The twin is read on every
/// connection before anything is sent on it, so desired properties are current first.
pub fn next_step(v: &View) -> Step {
    if !v.has_connection {
        return if v.to_send || v.served {
            Step::Open
        } else {
            Step::Idle
        };
    }
    match v.online {
        None => Step::WaitOnline,
        Some(n) if v.read_on != Some(n) => Step::ReadTwin,
        Some(_) if v.to_send => Step::SendReported,
        Some(_) => Step::WaitForChange,
    }
}

/// Starts syncing the twins of `declared` modules of `device`, and of any module whose twin
/// is opened later, through `upstream` (tasks it keeps and aborts when dropped).
pub fn start(
    upstream: &Arc<MqttUpstream>,
    twins: Arc<Twins>,
    device: DeviceId,
    declared: Vec<ModuleId>,
) {
    let weak = Arc::downgrade(upstream);
    upstream.keep_task(tokio::spawn(follow_twins(weak, twins, device, declared)));
}

/// Starts a module's task for every declared module, then for each module whose twin is
/// opened later (a reported patch or a head serving it wakes this).
async fn follow_twins(
    upstream: Weak<MqttUpstream>,
    twins: Arc<Twins>,
    device: DeviceId,
    declared: Vec<ModuleId>,
) {
    let mut changes = twins.reported_changes();
    let mut served = twins.served_changes();
    let mut running: HashSet<ModuleId> = HashSet::new();
    let mut candidates = declared;
    loop {
        changes.borrow_and_update();
        served.borrow_and_update();
        candidates.extend(twins.opened());
        let Some(up) = upstream.upgrade() else {
            return;
        };
        for module in candidates.drain(..) {
            if running.insert(module.clone()) {
                let identity = Identity::new(device.clone(), module);
                up.keep_task(tokio::spawn(sync_module(
                    Weak::clone(&upstream),
                    Arc::clone(&twins),
                    identity,
                )));
            }
        }
        drop(up);
        let woken = tokio::select! {
            r = changes.changed() => r,
            r = served.changed() => r,
        };
        if woken.is_err() {
            return;
        }
    }
}

/// Delay after the `n`-th refusal (or failure) in a row (n ≥ 1).
fn refused_delay(n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    REFUSED_MIN.saturating_mul(factor).min(REFUSED_MAX)
}

/// A module's cloud connection as its sync task watches it.
struct Link {
    conn: Arc<CloudConnection>,
    online: watch::Receiver<Option<u64>>,
    arrivals: watch::Receiver<u64>,
}

/// What one module's task keeps between steps.
struct Module {
    identity: Identity,
    twins: Arc<Twins>,
    timeout: Duration,
    /// IoT Hub refused requests in a row.
    refused: u32,
    /// Twin writes of the sync failed in a row (a full disk, a fenced hub).
    failed: u32,
    read_on: Option<u64>,
}

/// The loop of one module (see the module docs).
async fn sync_module(upstream: Weak<MqttUpstream>, twins: Arc<Twins>, identity: Identity) {
    let mut changes = twins.reported_changes();
    let mut served = twins.served_changes();
    let mut link: Option<Link> = None;
    let mut m = Module {
        identity,
        twins,
        timeout: Duration::from_secs(20),
        refused: 0,
        failed: 0,
        read_on: None,
    };
    loop {
        changes.borrow_and_update();
        served.borrow_and_update();
        if let Some(l) = link.as_mut() {
            l.online.borrow_and_update();
            l.arrivals.borrow_and_update();
            m.take_desired_patches(&l.conn);
        }
        let sync = match m.twins.reported_to_sync(&m.identity.module) {
            Ok(sync) => sync,
            Err(e) => {
                tracing::warn!(identity = %m.identity, "cannot read the twin to sync it with IoT Hub: {e}");
                None
            }
        };
        let Some(up) = upstream.upgrade() else {
            return;
        };
        up.metrics().upstream().reported_sync_lag(
            &m.identity,
            sync.as_ref()
                .map_or(0, |s| s.version.saturating_sub(s.synced_version)),
        );
        m.timeout = up.config().ack_timeout;
        let view = View {
            has_connection: link.is_some(),
            served: m.twins.was_served(&m.identity.module),
            to_send: sync.is_some(),
            online: link.as_ref().and_then(|l| *l.online.borrow()),
            read_on: m.read_on,
        };
        let step = next_step(&view);
        if step == Step::Open {
            let conn = up.conn(&m.identity);
            link = Some(Link {
                online: conn.online(),
                arrivals: conn.desired_arrivals(),
                conn,
            });
            continue;
        }
        drop(up);
        let alive = match (step, link.as_mut(), sync) {
            (Step::ReadTwin, Some(l), _) => {
                let generation = *l.online.borrow();
                m.read_twin(&l.conn, generation).await;
                true
            }
            (Step::SendReported, Some(l), Some(sync)) => {
                m.send_reported(&l.conn, sync).await;
                true
            }
            (Step::WaitOnline | Step::WaitForChange, Some(l), _) => {
                tokio::select! {
                    r = changes.changed() => r.is_ok(),
                    r = l.online.changed() => r.is_ok(),
                    r = l.arrivals.changed() => r.is_ok(),
                }
            }
            _ => tokio::select! {
                r = changes.changed() => r.is_ok(),
                r = served.changed() => r.is_ok(),
            },
        };
        if !alive {
            return;
        }
    }
}

impl Module {
    /// Backs off after IoT Hub refused a request.
    async fn back_off_refused(&mut self, what: &str, status: u16, body: &[u8]) {
        self.refused = self.refused.saturating_add(1);
        let delay = refused_delay(self.refused);
        tracing::warn!(
            identity = %self.identity,
            status,
            body = %String::from_utf8_lossy(body),
            retry_in_ms = delay.as_millis() as u64,
            "IoT Hub refused {what}; asking again"
        );
        tokio::time::sleep(delay).await;
    }

    /// Backs off after a twin write of the sync failed.
    async fn write_failed(&mut self, what: &str, e: &crate::twin::TwinError) {
        self.failed = self.failed.saturating_add(1);
        let delay = refused_delay(self.failed);
        tracing::warn!(identity = %self.identity, retry_in_ms = delay.as_millis() as u64, "cannot keep {what}: {e}");
        tokio::time::sleep(delay).await;
    }

    /// Applies the desired patches IoT Hub sent, in order; one that does not follow the
    /// version held (or one dropped) has the twin read again.
    fn take_desired_patches(&mut self, conn: &CloudConnection) {
        let inbox = conn.take_desired();
        let mut again = inbox.missed;
        for (patch, version) in inbox.patches {
            match self
                .twins
                .cloud_desired_patch(&self.identity.module, &patch, version)
            {
                Ok(CloudPatch::Applied) => {
                    tracing::debug!(identity = %self.identity, version, "desired patch from IoT Hub");
                }
                Ok(CloudPatch::Old) => {}
                Ok(CloudPatch::Gap(gap)) => {
                    tracing::info!(identity = %self.identity, "{gap}; reading the twin again");
                    again = true;
                }
                Err(e) => {
                    tracing::warn!(identity = %self.identity, "cannot keep a desired patch from IoT Hub; reading the twin again: {e}");
                    again = true;
                }
            }
        }
        if again {
            self.read_on = None;
        }
    }

    /// GETs the twin on connection `generation` and keeps IoT Hub's desired document.
    async fn read_twin(&mut self, conn: &CloudConnection, generation: Option<u64>) {
        let identity = &self.identity;
        match conn
            .twin_request(GET_PATH, Bytes::new(), self.timeout)
            .await
        {
            Ok(answer) if answer.status == 200 => match desired_of(&answer.body) {
                Some((properties, version)) => {
                    match self
                        .twins
                        .cloud_desired_document(&identity.module, &properties, version)
                    {
                        Ok(()) => {
                            tracing::debug!(%identity, version, "desired properties from IoT Hub");
                            self.refused = 0;
                            self.failed = 0;
                            self.read_on = generation;
                        }
                        Err(e) => self.write_failed("IoT Hub's desired properties", &e).await,
                    }
                }
                None => {
                    self.back_off_refused(
                        "a twin GET (no desired $version in its answer)",
                        200,
                        &answer.body,
                    )
                    .await
                }
            },
            Ok(answer) => {
                self.back_off_refused("a twin GET", answer.status, &answer.body)
                    .await
            }
            Err(e) => self.not_answered(e).await,
        }
    }

    /// A request that got no answer: the connection went, or did not answer in time (the
    /// loop waits for it again), or there was none to send on.
    async fn not_answered(&self, e: TwinRequestError) {
        tracing::debug!(identity = %self.identity, "twin request to IoT Hub: {e}");
        if let TwinRequestError::Offline(_) = e {
            // Offline is set before the client goes, so this is brief; a client that takes no
            // more requests is not: either way, do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends what IoT Hub lacks of the reported properties (see the module docs).
    async fn send_reported(&mut self, conn: &CloudConnection, sync: ReportedSync) {
        let identity = &self.identity;
        // Kept among the documents IoT Hub may hold before it goes: if the answer is lost (or
        // the hub killed), the next patch is right whether or not IoT Hub applied this one.
        if let Err(e) = self.twins.reported_sending(&identity.module, &sync) {
            self.write_failed(
                "the reported properties about to go to IoT Hub; not sent",
                &e,
            )
            .await;
            return;
        }
        let body = Bytes::from(Value::Object(sync.patch.clone()).to_string());
        match conn.twin_request(REPORTED_PATH, body, self.timeout).await {
            Ok(answer) if answer.status == 204 => {
                if self.refused > 0 {
                    tracing::info!(%identity, "IoT Hub takes reported properties again");
                }
                self.refused = 0;
                match self.twins.reported_synced(&identity.module, &sync) {
                    Ok(()) => {
                        self.failed = 0;
                        tracing::debug!(
                            %identity,
                            version = sync.version,
                            cloud_version = answer.version,
                            "reported properties synced to IoT Hub"
                        );
                    }
                    // Still in doubt, so sent again later, as a patch right from either document.
                    Err(e) => self.write_failed("what IoT Hub acknowledged", &e).await,
                }
            }
            Ok(answer) => {
                self.back_off_refused(
                    "a reported-properties patch (kept, sent again)",
                    answer.status,
                    &answer.body,
                )
                .await
            }
            Err(e) => self.not_answered(e).await,
        }
    }
}

/// The desired properties (without `$`-members) and `$version` of a twin GET's answer,
/// `{"desired": {…, "$version": n}, "reported": {…}}`; `None` if it has none.
fn desired_of(body: &[u8]) -> Option<(Map<String, Value>, u64)> {
    let Ok(Value::Object(mut doc)) = serde_json::from_slice(body) else {
        return None;
    };
    let Some(Value::Object(mut desired)) = doc.remove("desired") else {
        return None;
    };
    let version = desired
        .get(crate::twin::document::VERSION_KEY)
        .and_then(Value::as_u64)?;
    // `$version`, and `$metadata` should IoT Hub add it: no property key starts with `$`.
    desired.retain(|k, _| !k.starts_with('$'));
    Some((desired, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_back_off_from_1_s_doubling_to_60_s() {
        let delays: Vec<u64> = (1..=8).map(|n| refused_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(refused_delay(u32::MAX), REFUSED_MAX);
    }

    fn view(has_connection: bool, served: bool, to_send: bool) -> View {
        View {
            has_connection,
            served,
            to_send,
            online: None,
            read_on: None,
        }
    }

    #[test]
    fn a_connection_opens_only_for_something_to_send_or_a_served_twin() {
        assert_eq!(next_step(&view(false, false, false)), Step::Idle);
        assert_eq!(next_step(&view(false, true, false)), Step::Open);
        assert_eq!(next_step(&view(false, false, true)), Step::Open);
        // Once open, it stays: offline means waiting for it, whatever else is known.
        assert_eq!(next_step(&view(true, false, false)), Step::WaitOnline);
        assert_eq!(next_step(&view(true, true, true)), Step::WaitOnline);
    }

    #[test]
    fn the_twin_is_read_on_every_connection_before_anything_is_sent_on_it() {
        let up = |online, read_on, to_send| View {
            online: Some(online),
            read_on,
            ..view(true, true, to_send)
        };
        assert_eq!(next_step(&up(1, None, true)), Step::ReadTwin);
        assert_eq!(next_step(&up(1, Some(1), true)), Step::SendReported);
        assert_eq!(next_step(&up(1, Some(1), false)), Step::WaitForChange);
        // A new connection (n = 2), or a desired patch that did not follow (read_on None).
        assert_eq!(next_step(&up(2, Some(1), false)), Step::ReadTwin);
        assert_eq!(next_step(&up(2, None, false)), Step::ReadTwin);
    }

    #[test]
    fn a_get_answer_gives_the_desired_members_and_version() {
        let body = json!({"desired": {"rate": 2, "$version": 4, "$metadata": {}},
                          "reported": {"$version": 9}})
        .to_string();
        let (desired, version) = desired_of(body.as_bytes()).unwrap();
        assert_eq!((Value::Object(desired), version), (json!({"rate": 2}), 4));
        for bad in [
            json!({"reported": {}}),
            json!({"desired": {"rate": 2}}),
            json!({"desired": [1]}),
            json!([1]),
        ] {
            assert_eq!(desired_of(bad.to_string().as_bytes()), None, "{bad}");
        }
    }
}
