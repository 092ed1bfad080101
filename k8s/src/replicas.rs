//! How many pods a replicated module runs: the decision behind `.spec.replicas` of the
//! StatefulSet of a module declared with `x-edgehub-replicas` (ARCHITECTURE.md "Module
//! replicas", k8s/README.md "Replicated modules").
//!
//! The manifest's `count` is a **ceiling**: the hub admits at most `count` connections of the
//! module as members; fewer is fine (partitions spread over the live ones). How many pods run
//! below it is the cluster's business: `kubectl scale statefulset/D-M` or a
//! HorizontalPodAutoscaler. So the controller does not keep `.spec.replicas` of such a
//! StatefulSet in its own server-side apply (field manager `edgehub-controller`): a manager
//! that stops applying a field it owned *removes* it, and the API server would default it back
//! to 1. Instead a second field manager, [`SCALE_MANAGER`], applies only `.spec.replicas`, and
//! only when [`decide`] says so:
//!
//! | live StatefulSet | decision |
//! |---|---|
//! | none | create, then scale to the ceiling ([`ScaleReason::Created`]) |
//! | not marked replicated (it was a singleton) | scale to the ceiling, taking the field over ([`ScaleReason::BecameReplicated`]) |
//! | marked with another ceiling (count changed, started, stopped) | at its old ceiling or above the new one: to the new ceiling ([`ScaleReason::CeilingChanged`]); scaled below: kept |
//! | same ceiling, scaled above it | back to the ceiling ([`ScaleReason::Clamped`]: an Event says so) |
//! | same ceiling, at or below it | nothing: `kubectl scale`'s or the autoscaler's number stands |
//!
//! The ceiling a StatefulSet was rendered for is recorded in its annotation
//! [`ANNOTATION_MAX_REPLICAS`] (applied by the main field manager, read back on the next pass).
//!
//! Pure: no API, no clock. Unit-tested below; the reconcile tests
//! (`k8s/tests/reconcile_fake.rs`) drive it through the fake API.

use std::fmt;

use k8s_openapi::api::apps::v1::StatefulSet;
use router::replicas::ReplicaCount;
use serde_json::{json, Value};

use crate::agent::DesiredStatus;

/// The field manager that owns `.spec.replicas` of a replicated module's StatefulSet (and
/// nothing else): it applies that one field, at creation and when [`decide`] says so.
pub const SCALE_MANAGER: &str = "edgehub-controller-scale";
/// On a replicated module's StatefulSet: `"true"`.
pub const LABEL_REPLICATED: &str = "edgehub.io/replicated";
/// On a replicated module's StatefulSet: the ceiling it was rendered for (`count`, or `0`
/// while the module is stopped).
pub const ANNOTATION_MAX_REPLICAS: &str = "edgehub.io/max-replicas";

/// The most pods a replicated module may run: its `count`, or 0 while it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MaxReplicas(u8);

impl MaxReplicas {
    /// The ceiling of a module with `count` and `status`.
    pub fn of(count: ReplicaCount, status: DesiredStatus) -> Self {
        match status {
            DesiredStatus::Running => Self(count.get()),
            DesiredStatus::Stopped => Self(0),
        }
    }

    /// Reads [`ANNOTATION_MAX_REPLICAS`]: `None` when absent or not a ceiling we write.
    pub fn parse(text: &str) -> Option<Self> {
        text.parse::<u8>()
            .ok()
            .filter(|n| *n <= ReplicaCount::MAX)
            .map(Self)
    }

    /// As `.spec.replicas`.
    pub fn replicas(self) -> i32 {
        i32::from(self.0)
    }
}

impl fmt::Display for MaxReplicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the live StatefulSet says, as far as [`decide`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveScale {
    /// `.spec.replicas` (`None`: absent, which the API server defaults to 1).
    pub replicas: Option<i32>,
    /// [`ANNOTATION_MAX_REPLICAS`]: `None` when the StatefulSet was not rendered replicated.
    pub max: Option<MaxReplicas>,
}

/// Why the scale manager writes `.spec.replicas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleReason {
    /// A new StatefulSet starts at its ceiling.
    Created,
    /// The module was a singleton: its StatefulSet's replicas were the main manager's.
    BecameReplicated,
    /// The ceiling changed (`count` changed, or the module was started or stopped) while the
    /// StatefulSet ran at its old ceiling, or above the new one.
    CeilingChanged {
        /// The ceiling it was rendered for before.
        from: MaxReplicas,
    },
    /// Someone scaled it above its ceiling; the hub would refuse the extra members.
    Clamped {
        /// The replicas it was scaled to.
        was: i32,
    },
}

/// Write `.spec.replicas = replicas`, for `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleTo {
    /// The new `.spec.replicas`.
    pub replicas: i32,
    /// Why.
    pub reason: ScaleReason,
}

/// The scale manager's decision for a replicated module with ceiling `max` (see the module
/// docs): `None` means write nothing.
pub fn decide(max: MaxReplicas, live: Option<LiveScale>) -> Option<ScaleTo> {
    let want = max.replicas();
    let to = |reason| {
        Some(ScaleTo {
            replicas: want,
            reason,
        })
    };
    let Some(live) = live else {
        return to(ScaleReason::Created);
    };
    // The API server's default for an absent field; never negative.
    let current = live.replicas.unwrap_or(1).max(0);
    match live.max {
        // Even at the same value: the field must become the scale manager's before the main
        // manager stops applying it, or the API server would remove and default it.
        None => to(ScaleReason::BecameReplicated),
        Some(old) if old != max => {
            if current == old.replicas() || current > want {
                to(ScaleReason::CeilingChanged { from: old })
            } else {
                None
            }
        }
        Some(_) if current > want => to(ScaleReason::Clamped { was: current }),
        Some(_) => None,
    }
}

impl ScaleTo {
    /// For logs and Events: what was done and why, naming the StatefulSet and module.
    pub fn describe(&self, statefulset: &str, module: &str, max: MaxReplicas) -> String {
        let n = self.replicas;
        match self.reason {
            ScaleReason::Created => {
                format!("StatefulSet/{statefulset} created with {n} replicas (module {module}'s x-edgehub-replicas)")
            }
            ScaleReason::BecameReplicated => format!(
                "module {module} is replicated now: StatefulSet/{statefulset} scaled to its ceiling {n}"
            ),
            ScaleReason::CeilingChanged { from } => format!(
                "module {module}'s ceiling changed from {from} to {max} replicas: StatefulSet/{statefulset} scaled to {n}"
            ),
            ScaleReason::Clamped { was } => format!(
                "StatefulSet/{statefulset} was scaled to {was} replicas, more than module {module}'s x-edgehub-replicas count {max} (the hub admits at most {max} members): scaled back to {n}"
            ),
        }
    }
}

/// The scale field manager's whole apply for `statefulset`: its identity and
/// `.spec.replicas`, nothing else (so that manager owns that one field).
pub fn scale_patch(statefulset: &StatefulSet, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": statefulset.metadata.name,
            "namespace": statefulset.metadata.namespace,
        },
        "spec": { "replicas": replicas },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn max(n: u8) -> MaxReplicas {
        MaxReplicas::parse(&n.to_string()).unwrap()
    }

    fn live(replicas: Option<i32>, m: Option<u8>) -> Option<LiveScale> {
        Some(LiveScale {
            replicas,
            max: m.map(max),
        })
    }

    fn to(replicas: i32, reason: ScaleReason) -> Option<ScaleTo> {
        Some(ScaleTo { replicas, reason })
    }

    #[test]
    fn the_ceiling_is_the_count_or_zero_while_stopped() {
        let three = ReplicaCount::new(3).unwrap();
        assert_eq!(MaxReplicas::of(three, DesiredStatus::Running).replicas(), 3);
        assert_eq!(MaxReplicas::of(three, DesiredStatus::Stopped).replicas(), 0);
    }

    #[test]
    fn only_ceilings_the_controller_writes_are_read_back() {
        assert_eq!(MaxReplicas::parse("0"), Some(max(0)));
        assert_eq!(
            MaxReplicas::parse("16").map(MaxReplicas::replicas),
            Some(16)
        );
        for bad in ["17", "-1", "", "3 ", "three", "256"] {
            assert_eq!(MaxReplicas::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_new_statefulset_starts_at_its_ceiling() {
        assert_eq!(decide(max(3), None), to(3, ScaleReason::Created));
        assert_eq!(decide(max(0), None), to(0, ScaleReason::Created));
    }

    #[test]
    fn a_former_singleton_is_taken_over_even_at_the_same_value() {
        for (replicas, m) in [(Some(1), 3), (Some(1), 1), (Some(0), 0), (None, 2)] {
            assert_eq!(
                decide(max(m), live(replicas, None)),
                to(i32::from(m), ScaleReason::BecameReplicated),
                "{replicas:?} → {m}"
            );
        }
    }

    #[test]
    fn a_scale_within_the_ceiling_stands() {
        for replicas in [0, 1, 2, 3] {
            assert_eq!(decide(max(3), live(Some(replicas), Some(3))), None);
        }
    }

    #[test]
    fn a_scale_above_the_ceiling_is_clamped() {
        assert_eq!(
            decide(max(3), live(Some(5), Some(3))),
            to(3, ScaleReason::Clamped { was: 5 })
        );
        // Stopped: nothing may run.
        assert_eq!(
            decide(max(0), live(Some(1), Some(0))),
            to(0, ScaleReason::Clamped { was: 1 })
        );
    }

    #[test]
    fn an_absent_replicas_field_counts_as_the_api_servers_default_of_one() {
        assert_eq!(decide(max(1), live(None, Some(1))), None);
        assert_eq!(
            decide(max(0), live(None, Some(0))),
            to(0, ScaleReason::Clamped { was: 1 })
        );
    }

    #[test]
    fn a_statefulset_at_its_old_ceiling_follows_a_new_one() {
        let changed = |from| ScaleReason::CeilingChanged { from: max(from) };
        assert_eq!(decide(max(5), live(Some(3), Some(3))), to(5, changed(3)));
        assert_eq!(decide(max(2), live(Some(3), Some(3))), to(2, changed(3)));
        // Started and stopped are ceiling changes too.
        assert_eq!(decide(max(3), live(Some(0), Some(0))), to(3, changed(0)));
        assert_eq!(decide(max(0), live(Some(3), Some(3))), to(0, changed(3)));
    }

    #[test]
    fn a_statefulset_scaled_below_its_old_ceiling_keeps_its_scale_within_the_new_one() {
        let changed = |from| ScaleReason::CeilingChanged { from: max(from) };
        // An autoscaler at 2 of 3: raising the count to 5 leaves it at 2 (its maxReplicas decides).
        assert_eq!(decide(max(5), live(Some(2), Some(3))), None);
        // Lowering the count to 2 keeps 1, and clamps 3 of 4.
        assert_eq!(decide(max(2), live(Some(1), Some(4))), None);
        assert_eq!(decide(max(2), live(Some(3), Some(4))), to(2, changed(4)));
        // Scaled to 0 by hand, then stopped: stays 0, nothing written.
        assert_eq!(decide(max(0), live(Some(0), Some(3))), None);
    }

    #[test]
    fn no_decision_ever_exceeds_the_ceiling_and_a_second_look_changes_nothing() {
        for m in 0..=4u8 {
            for old in [None, Some(0u8), Some(1), Some(3), Some(4)] {
                for replicas in [None, Some(0), Some(1), Some(2), Some(3), Some(6)] {
                    let before = live(replicas, old);
                    let after = match decide(max(m), before) {
                        Some(s) => {
                            assert!(s.replicas <= i32::from(m), "{m} {before:?} → {s:?}");
                            s.replicas
                        }
                        None => {
                            let current = replicas.unwrap_or(1);
                            assert!(current <= i32::from(m), "{m} {before:?} left above");
                            current
                        }
                    };
                    // The next pass sees the new ceiling recorded and the value written.
                    assert_eq!(
                        decide(max(m), live(Some(after), Some(m))),
                        None,
                        "{m} {before:?}: the next pass would write again"
                    );
                }
            }
        }
    }
}
