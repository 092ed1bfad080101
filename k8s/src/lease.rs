//! Leader election over a `coordination.k8s.io/v1` Lease, so two controller replicas never
//! reconcile at once.
//!
//! - [`LeaseState::decide`] is pure: from the Lease's fields and a clock reading it says
//!   whether this replica acquires, renews or stands by.
//! - [`step`] is one round against the API: read the Lease, decide, and write it with the
//!   read resourceVersion (a concurrent writer gets a 409 and stays a follower).
//! - [`run`] repeats [`step`] every third of the lease duration and publishes leadership on a
//!   watch channel. A leader that cannot renew within its lease duration steps down (it
//!   cannot know that nobody took over).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;

/// What this replica should do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder's lease ran out: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it until `until`.
    Standby {
        /// The holder.
        holder: String,
        /// When their lease runs out unless renewed.
        until: Timestamp,
    },
}

/// This replica's identity and lease duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// Our holder identity (the pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
}

impl LeaseState {
    /// Decides from the Lease's spec (none: no Lease yet) and `now`.
    pub fn decide(&self, lease: Option<&LeaseSpec>, now: Timestamp) -> Decision {
        let holder = lease
            .and_then(|l| l.holder_identity.clone())
            .filter(|h| !h.is_empty());
        let Some(holder) = holder else {
            return Decision::Acquire;
        };
        if holder == self.identity {
            return Decision::Renew;
        }
        let secs = lease
            .and_then(|l| l.lease_duration_seconds)
            .unwrap_or(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX));
        let renewed = lease.and_then(|l| l.renew_time.as_ref().or(l.acquire_time.as_ref()));
        match renewed {
            Some(MicroTime(t)) => {
                let until = t
                    .checked_add(SignedDuration::from_secs(i64::from(secs)))
                    .unwrap_or(Timestamp::MAX);
                if now >= until {
                    Decision::Acquire
                } else {
                    Decision::Standby { holder, until }
                }
            }
            None => Decision::Acquire,
        }
    }

    /// The spec to write for `decision` (`None` for standby).
    pub fn next(
        &self,
        decision: &Decision,
        old: Option<&LeaseSpec>,
        now: Timestamp,
    ) -> Option<LeaseSpec> {
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        match decision {
            Decision::Standby { .. } => None,
            Decision::Renew => {
                let mut spec = old.cloned().unwrap_or_default();
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(secs);
                Some(spec)
            }
            Decision::Acquire => {
                let had_holder = old
                    .and_then(|o| o.holder_identity.as_deref())
                    .is_some_and(|h| !h.is_empty());
                let transitions = old.and_then(|o| o.lease_transitions).unwrap_or(0);
                Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(if had_holder {
                        transitions + 1
                    } else {
                        transitions
                    }),
                    ..LeaseSpec::default()
                })
            }
        }
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API failed (other than losing a race).
    #[error("Lease {name}: {source}")]
    Api {
        /// The Lease.
        name: String,
        /// Why.
        source: kube::Error,
    },
}

/// One round: returns whether we lead after it.
pub async fn step(
    api: &Api<Lease>,
    name: &str,
    state: &LeaseState,
    now: Timestamp,
) -> Result<bool, LeaseError> {
    let err = |source| LeaseError::Api {
        name: name.to_owned(),
        source,
    };
    let current = api.get_opt(name).await.map_err(err)?;
    let decision = state.decide(current.as_ref().and_then(|l| l.spec.as_ref()), now);
    let Some(spec) = state.next(
        &decision,
        current.as_ref().and_then(|l| l.spec.as_ref()),
        now,
    ) else {
        return Ok(false);
    };
    let result = match current {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(name, &PostParams::default(), &lease).await
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => {
            if decision == Decision::Acquire {
                tracing::info!(lease = name, identity = %state.identity, "became the leader");
            }
            Ok(true)
        }
        // Someone wrote first (409 on replace, or the Lease was created meanwhile).
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(err(e)),
    }
}

/// Runs rounds forever, sending whether we lead on every change.
pub async fn run(
    api: Api<Lease>,
    name: String,
    state: LeaseState,
    leader: tokio::sync::watch::Sender<bool>,
) {
    let period = state.duration / 3;
    let mut last_ok: Option<tokio::time::Instant> = None;
    loop {
        match step(&api, &name, &state, Timestamp::now()).await {
            Ok(lead) => {
                last_ok = lead.then(tokio::time::Instant::now);
                leader.send_if_modified(|l| std::mem::replace(l, lead) != lead);
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                if last_ok.is_none_or(|t| t.elapsed() >= state.duration) {
                    leader.send_if_modified(|l| std::mem::replace(l, false));
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_780_000_000 + secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn me() -> LeaseState {
        LeaseState {
            identity: "a".into(),
            duration: Duration::from_secs(15),
        }
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn no_lease_or_no_holder_is_acquired() {
        assert_eq!(me().decide(None, at(0)), Decision::Acquire);
        assert_eq!(
            me().decide(Some(&LeaseSpec::default()), at(0)),
            Decision::Acquire
        );
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_late() {
        assert_eq!(
            me().decide(Some(&held_by("a", 0)), at(100)),
            Decision::Renew
        );
    }

    #[test]
    fn another_holder_is_respected_until_its_lease_runs_out() {
        let lease = held_by("b", 0);
        assert_eq!(
            me().decide(Some(&lease), at(14)),
            Decision::Standby {
                holder: "b".into(),
                until: at(15)
            }
        );
        assert_eq!(me().decide(Some(&lease), at(15)), Decision::Acquire);
    }

    #[test]
    fn a_takeover_counts_a_transition_and_a_renewal_keeps_the_acquire_time() {
        let s = me();
        let old = held_by("b", 0);
        let taken = s
            .next(&Decision::Acquire, Some(&old), at(20))
            .unwrap_or_default();
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(20))));
        let renewed = s
            .next(&Decision::Renew, Some(&taken), at(25))
            .unwrap_or_default();
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(25))));
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(
            s.next(
                &Decision::Standby {
                    holder: "b".into(),
                    until: at(1)
                },
                Some(&old),
                at(0)
            ),
            None
        );
    }
}
