//! Reported properties to IoT Hub: after a module's patch is durable (and answered 204
//! locally), its cloud connection brings IoT Hub's copy up to the twin's.
//!
//! One task per module (started for every declared module, and for any other whose twin is
//! opened later), each a loop:
//!
//! ```text
//!  what IoT Hub lacks (Twins::reported_to_sync: the merge patch from what it acknowledged
//!  to the twin's reported properties, removed keys as null; see "in doubt" below)
//!    nothing ─▶ wait for the next local patch
//!    a patch ─▶ wait for the connection to be up ─▶ keep its document's keys "in doubt"
//!               (durable; a write error: wait 1 s doubling to 60 s, again)
//!               ─▶ $iothub/twin/PATCH/properties/reported/?$rid=
//!                  ─▶ 204 ─▶ keep "acknowledged up to local version v", nothing in doubt
//!                            (durable) ─▶ again
//!                  ─▶ other status ─▶ log, wait 1 s doubling to 60 s ─▶ again
//!                  ─▶ connection lost / no answer in --upstream-timeout ─▶ again
//! ```
//!
//! Guarantees:
//! - **Never loses an acknowledged local patch**: what IoT Hub acknowledged is kept with the
//!   twin, so a restart or kill -9 resends from there.
//! - **Right whatever IoT Hub applied**: before a patch goes, the keys of the document it
//!   brings IoT Hub to are kept with the twin (durably) as "in doubt" until its 204. While
//!   anything is in doubt (an answer lost with the connection, a time-out, a kill -9 between
//!   sending and keeping the 204), the next patch is the twin's reported properties whole with
//!   `null` for every key IoT Hub may hold that the twin lacks, so it is right from the
//!   acknowledged document and from every one in doubt (a plain difference would leave behind
//!   keys that only the lost patch added and the module removed since).
//! - **In order**: one patch in flight per module; each brings IoT Hub to a later local
//!   version than the one before (several local patches made meanwhile go as one).
//! - **A sync never fails a local patch**: it only reads the twin and writes the acknowledged
//!   part.
//! - Keys IoT Hub holds that this hub never reported are left alone (the first patch is the
//!   difference from an empty document).
//! - `edgehub_twin_reported_sync_lag{id}`: local reported versions IoT Hub has not
//!   acknowledged; logs say when a sync is refused or resumes.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use router::{DeviceId, ModuleId};
use serde_json::Value;
use tokio::sync::watch;

use super::mqtt::{MqttUpstream, TwinRequestError};
use crate::identity::Identity;
use crate::twin::Twins;

/// Where reported patches go.
pub const REPORTED_PATH: &str = "$iothub/twin/PATCH/properties/reported/";
/// The first wait after IoT Hub refused a patch.
const REFUSED_MIN: Duration = Duration::from_secs(1);
/// The longest wait after IoT Hub refused a patch.
const REFUSED_MAX: Duration = Duration::from_secs(60);

/// Starts syncing the reported properties of `declared` modules of `device`, and of any module
/// whose twin is opened later, through `upstream` (tasks it keeps and aborts when dropped).
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
/// opened later (a reported patch wakes it).
async fn follow_twins(
    upstream: Weak<MqttUpstream>,
    twins: Arc<Twins>,
    device: DeviceId,
    declared: Vec<ModuleId>,
) {
    let mut changes = twins.reported_changes();
    let mut running: HashSet<ModuleId> = HashSet::new();
    let mut candidates = declared;
    loop {
        changes.borrow_and_update();
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
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Delay after the `n`-th refusal in a row (n ≥ 1).
fn refused_delay(n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    REFUSED_MIN.saturating_mul(factor).min(REFUSED_MAX)
}

/// Waits for the next reported patch of any module; false once the twins are gone.
async fn next_change(changes: &mut watch::Receiver<u64>) -> bool {
    changes.changed().await.is_ok()
}

/// The loop of one module (see the module docs).
async fn sync_module(upstream: Weak<MqttUpstream>, twins: Arc<Twins>, identity: Identity) {
    let mut changes = twins.reported_changes();
    let mut refused: u32 = 0;
    // Twin file writes that failed in a row (a full disk, a fenced hub): back off as for refusals.
    let mut failed: u32 = 0;
    loop {
        changes.borrow_and_update();
        let sync = match twins.reported_to_sync(&identity.module) {
            Ok(Some(sync)) => sync,
            Ok(None) => {
                if let Some(up) = upstream.upgrade() {
                    up.metrics().upstream().reported_sync_lag(&identity, 0);
                }
                if !next_change(&mut changes).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(%identity, "cannot read the twin to sync it to IoT Hub: {e}");
                if !next_change(&mut changes).await {
                    return;
                }
                continue;
            }
        };
        let Some(up) = upstream.upgrade() else {
            return;
        };
        up.metrics()
            .upstream()
            .reported_sync_lag(&identity, sync.version.saturating_sub(sync.synced_version));
        let conn = up.conn(&identity);
        let timeout = up.config().ack_timeout;
        drop(up);
        conn.wait_online().await;
        // Kept among the documents IoT Hub may hold before it goes: if the answer is lost (or
        // the hub killed), the next patch is right whether or not IoT Hub applied this one.
        if let Err(e) = twins.reported_sending(&identity.module, &sync) {
            failed = failed.saturating_add(1);
            let delay = refused_delay(failed);
            tracing::warn!(%identity, retry_in_ms = delay.as_millis() as u64, "cannot keep the reported properties about to go to IoT Hub; not sent: {e}");
            tokio::time::sleep(delay).await;
            continue;
        }
        let body = Bytes::from(Value::Object(sync.patch.clone()).to_string());
        match conn.twin_request(REPORTED_PATH, body, timeout).await {
            Ok(answer) if answer.status == 204 => {
                if refused > 0 {
                    tracing::info!(%identity, "IoT Hub takes reported properties again");
                }
                refused = 0;
                match twins.reported_synced(&identity.module, &sync) {
                    Ok(()) => {
                        failed = 0;
                        tracing::debug!(
                            %identity,
                            version = sync.version,
                            cloud_version = answer.version,
                            "reported properties synced to IoT Hub"
                        );
                    }
                    // Still in doubt, so sent again later, as a patch right from either document.
                    Err(e) => {
                        failed = failed.saturating_add(1);
                        let delay = refused_delay(failed);
                        tracing::warn!(%identity, retry_in_ms = delay.as_millis() as u64, "cannot keep what IoT Hub acknowledged: {e}");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            Ok(answer) => {
                refused = refused.saturating_add(1);
                let delay = refused_delay(refused);
                tracing::warn!(
                    %identity,
                    status = answer.status,
                    body = %String::from_utf8_lossy(&answer.body),
                    retry_in_ms = delay.as_millis() as u64,
                    "IoT Hub refused a reported-properties patch; kept, and sent again"
                );
                tokio::time::sleep(delay).await;
            }
            // The connection went or did not answer: wait for it again and resend.
            Err(e @ (TwinRequestError::Lost | TwinRequestError::Timeout(_))) => {
                tracing::debug!(%identity, "reported-properties sync: {e}; sending again");
            }
            Err(e @ TwinRequestError::Offline(_)) => {
                tracing::debug!(%identity, "reported-properties sync: {e}");
                // Offline is set before the client goes, so this is brief; a client that
                // takes no more requests is not: either way, do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_back_off_from_1_s_doubling_to_60_s() {
        let delays: Vec<u64> = (1..=8).map(|n| refused_delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(refused_delay(u32::MAX), REFUSED_MAX);
    }
}
