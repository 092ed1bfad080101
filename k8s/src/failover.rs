//! The store epoch the controller gives the hub, and the node-loss policy that bumps it.
//!
//! - The epoch's source of truth is the ConfigMap `D-hub-epoch` (key `epoch`, decimal): created
//!   with 1, only ever raised, read back on every pass. The hub gets it as `--epoch N` in its
//!   pod template (a pod's spec is immutable, so a stale pod restarted by its kubelet keeps its
//!   old epoch, which the store refuses once a newer one opened).
//! - [`decide`] is the pure node-loss decision: from the policy, the hub pod, its node, the
//!   clock and the failover already recorded, it says what to do. `reconcile` drives it: it
//!   bumps the epoch (durably, in the ConfigMap) *before* it force-deletes the pod.
//!
//! The ConfigMap has no owner reference on purpose: a retained store volume remembers the
//! highest epoch that opened it, so the epoch must outlive an EdgeDeployment deleted with
//! `retainOnDelete: true` (a new one at epoch 1 would be refused by its own store). It is
//! deleted with the volume (`retainOnDelete: false`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use kube::runtime::reflector::ObjectRef;

use crate::names;
use crate::types::{EdgeDeployment, LastFailover, NodeLossPolicy, NodeLossSpec};

/// The epoch ConfigMap's key.
pub const EPOCH_KEY: &str = "epoch";
/// The annotation of the epoch ConfigMap recording the failover that last raised it (JSON of
/// [`LastFailover`]): written in the same update as the new epoch, so "bumped for this pod" is
/// as durable as the bump itself.
pub const ANNOTATION_LAST_FAILOVER: &str = "edgehub.io/last-failover";
/// The taint of non-graceful node shutdown: an operator (or automation) asserts the node is
/// off.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// A store epoch (the fencing token): at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(u64);

impl Epoch {
    /// The epoch a new deployment starts at.
    pub const FIRST: Epoch = Epoch(1);

    /// `n`, or `None` for 0 (no store opens at epoch 0).
    pub fn new(n: u64) -> Option<Self> {
        (n >= 1).then_some(Self(n))
    }

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The next epoch, or `None` at `u64::MAX`.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why the epoch ConfigMap cannot be used. Never guessed around: a guess could lower the epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    /// No `epoch` key.
    #[error("ConfigMap {name} has no key {EPOCH_KEY:?}")]
    Missing {
        /// The ConfigMap.
        name: String,
    },
    /// The value is not a decimal number ≥ 1.
    #[error(
        "ConfigMap {name} key {EPOCH_KEY:?}: {text:?} is not an epoch (a decimal number from 1)"
    )]
    Invalid {
        /// The ConfigMap.
        name: String,
        /// What it holds.
        text: String,
    },
    /// The epoch cannot be raised any more.
    #[error("ConfigMap {name}: epoch {epoch} cannot be raised")]
    Exhausted {
        /// The ConfigMap.
        name: String,
        /// Its epoch.
        epoch: u64,
    },
}

/// What the epoch ConfigMap holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRecord {
    /// The epoch.
    pub epoch: Epoch,
    /// The failover that last raised it (absent, or unreadable: none).
    pub last_failover: Option<LastFailover>,
}

/// Reads the epoch ConfigMap.
pub fn read_epoch(cm: &ConfigMap) -> Result<EpochRecord, EpochError> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(EPOCH_KEY))
        .ok_or_else(|| EpochError::Missing { name: name.clone() })?;
    let epoch = text
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(Epoch::new)
        .ok_or_else(|| EpochError::Invalid {
            name,
            text: text.clone(),
        })?;
    let last_failover = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LAST_FAILOVER))
        .and_then(|json| serde_json::from_str(json).ok());
    Ok(EpochRecord {
        epoch,
        last_failover,
    })
}

/// A new epoch ConfigMap `D-hub-epoch` at [`Epoch::FIRST`] (labelled as the deployment's hub
/// objects; no owner reference, see the module docs).
pub fn epoch_config_map(deployment: &str, namespace: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::hub_epoch(deployment)),
            namespace: Some(namespace.to_owned()),
            labels: Some(names::labels(deployment, "hub", None)),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            EPOCH_KEY.to_owned(),
            Epoch::FIRST.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// `notReadyAfter` (`60s`, `2m`, `1h`) as a duration.
pub fn parse_not_ready_after(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "spec.hub.nodeLoss.notReadyAfter: {text:?} is not a duration (a number and s, m or h, e.g. 60s)"
        )
    };
    let unit = text.chars().last().ok_or_else(bad)?;
    let number: u64 = text[..text.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| bad())?;
    let secs = match unit {
        's' => Some(number),
        'm' => number.checked_mul(60),
        'h' => number.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

/// The node-loss policy, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeLoss {
    /// What to do.
    pub policy: NodeLossPolicy,
    /// After how long NotReady/Unknown.
    pub not_ready_after: Duration,
}

impl NodeLoss {
    /// From the spec; an unreadable duration is the message for a Degraded condition.
    pub fn from_spec(spec: &NodeLossSpec) -> Result<Self, String> {
        Ok(Self {
            policy: spec.policy,
            not_ready_after: parse_not_ready_after(&spec.not_ready_after)?,
        })
    }
}

/// Why a node counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// Ready=False for longer than `notReadyAfter`.
    NodeNotReady,
    /// Ready=Unknown (the node controller stopped hearing from its kubelet) for longer than
    /// `notReadyAfter`.
    NodeUnknown,
    /// The `node.kubernetes.io/out-of-service` taint: acted on at once.
    NodeOutOfService,
    /// The Node object is gone: acted on at once.
    NodeDeleted,
}

impl LossReason {
    /// The CamelCase reason (status, Events).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeNotReady => "NodeNotReady",
            Self::NodeUnknown => "NodeUnknown",
            Self::NodeOutOfService => "NodeOutOfService",
            Self::NodeDeleted => "NodeDeleted",
        }
    }
}

/// What the controller does about the hub pod's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: policy Never, no hub pod, not scheduled, or its node is healthy.
    Nothing,
    /// The node is NotReady or Unknown; the timer runs out in `remaining`: look again then.
    Wait {
        /// Until `notReadyAfter` has passed.
        remaining: Duration,
    },
    /// The node is lost: bump the epoch, then force-delete this pod.
    Failover {
        /// The pod's node.
        node: String,
        /// The pod's uid (the delete's precondition).
        pod_uid: String,
        /// Why.
        reason: LossReason,
        /// How long the node had been NotReady/Unknown (none for a taint or deleted node
        /// without a known start).
        lost_for: Option<Duration>,
    },
    /// The epoch was already bumped for this very pod (the recorded failover), but the pod is
    /// still there on its lost node: delete it again, without a second bump.
    RetryDelete {
        /// The pod's uid.
        pod_uid: String,
    },
}

/// The node-loss decision. `node` is the hub pod's node as read (`None`: no such Node);
/// `now` is Unix seconds; `recorded` is the failover the epoch ConfigMap records.
///
/// Exactly once per loss: a failover is recorded with the pod's uid in the same write as the
/// bump, so a pod already failed over is only deleted again, never bumped for twice; the pod
/// the StatefulSet makes next has another uid.
pub fn decide(
    policy: &NodeLoss,
    pod: Option<&Pod>,
    node: Option<&Node>,
    now: u64,
    recorded: Option<&LastFailover>,
) -> Decision {
    if policy.policy == NodeLossPolicy::Never {
        return Decision::Nothing;
    }
    let Some(pod) = pod else {
        return Decision::Nothing;
    };
    let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Decision::Nothing; // not scheduled: no node to lose
    };
    let Some(pod_uid) = pod.metadata.uid.clone() else {
        return Decision::Nothing; // every pod read from the API has one
    };
    let lost = match node {
        None => Some((LossReason::NodeDeleted, None)),
        Some(n) if has_out_of_service_taint(n) => Some((
            LossReason::NodeOutOfService,
            unhealthy_since(n).map(|s| since(now, s)),
        )),
        Some(n) => match ready_status(n) {
            Some((status, transition)) if status != "True" => {
                let reason = if status == "Unknown" {
                    LossReason::NodeUnknown
                } else {
                    LossReason::NodeNotReady
                };
                // Without a transition time the timer cannot be measured: it starts now.
                let elapsed = transition.map_or(Duration::ZERO, |t| since(now, t));
                if elapsed < policy.not_ready_after {
                    return if recorded.is_some_and(|r| r.pod_uid == pod_uid) {
                        // Bumped for this pod already (an operator taint that was removed,
                        // say): finish the deletion.
                        Decision::RetryDelete { pod_uid }
                    } else {
                        Decision::Wait {
                            remaining: policy.not_ready_after - elapsed,
                        }
                    };
                }
                Some((reason, Some(elapsed)))
            }
            _ => None,
        },
    };
    match lost {
        None => Decision::Nothing, // healthy (or never reported Ready yet: not ours to judge)
        Some(_) if recorded.is_some_and(|r| r.pod_uid == pod_uid) => {
            Decision::RetryDelete { pod_uid }
        }
        Some((reason, lost_for)) => Decision::Failover {
            node: node_name,
            pod_uid,
            reason,
            lost_for,
        },
    }
}

fn since(now: u64, then: u64) -> Duration {
    Duration::from_secs(now.saturating_sub(then))
}

/// Does the node carry `node.kubernetes.io/out-of-service` (any value or effect)?
pub fn has_out_of_service_taint(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT))
}

/// Is the node NotReady, Unknown or out of service? (The controller's watch of Nodes maps only
/// such a node's changes to reconciles of the EdgeDeployments with a node-loss policy.)
pub fn node_looks_lost(node: &Node) -> bool {
    has_out_of_service_taint(node) || ready_status(node).is_some_and(|(s, _)| s != "True")
}

/// What the controller's watch of Nodes reconciles when `node` changes: the EdgeDeployments
/// (of `known`, the controller's cache) whose node-loss policy may act, and only while the node
/// looks lost (NotReady, Unknown, out of service). A healthy node's changes, the most common
/// event by far, map to nothing; a NotReady node that has not been lost long enough yet is
/// re-checked by the reconcile's own requeue when its timer runs out.
pub fn eds_to_recheck<'a, I>(node: &Node, known: I) -> Vec<ObjectRef<EdgeDeployment>>
where
    I: IntoIterator<Item = &'a EdgeDeployment>,
{
    if !node_looks_lost(node) {
        return Vec::new();
    }
    known
        .into_iter()
        .filter(|ed| ed.spec.hub.node_loss.policy != NodeLossPolicy::Never)
        .map(ObjectRef::from_obj)
        .collect()
}

/// The Ready condition's status and last transition (Unix seconds), if reported.
fn ready_status(node: &Node) -> Option<(String, Option<u64>)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    let at = c
        .last_transition_time
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok());
    Some((c.status.clone(), at))
}

fn unhealthy_since(node: &Node) -> Option<u64> {
    match ready_status(node) {
        Some((status, at)) if status != "True" => at,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, PodSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const T: u64 = 1_780_000_000;

    fn policy(p: NodeLossPolicy) -> NodeLoss {
        NodeLoss {
            policy: p,
            not_ready_after: Duration::from_secs(60),
        }
    }

    fn pod(uid: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("line1-hub-0".into()),
                uid: Some(uid.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn node(ready: Option<(&str, Option<u64>)>, taint: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: taint.map(|k| {
                    vec![Taint {
                        key: k.into(),
                        value: Some("nodeshutdown".into()),
                        effect: "NoExecute".into(),
                        ..Taint::default()
                    }]
                }),
                ..NodeSpec::default()
            }),
            status: ready.map(|(status, at)| NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: status.into(),
                    last_transition_time: at.map(|s| {
                        Time(k8s_openapi::jiff::Timestamp::from_second(s as i64).unwrap())
                    }),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    fn recorded(uid: &str) -> LastFailover {
        LastFailover {
            at: "2026-05-28T20:26:40Z".into(),
            from_node: "n1".into(),
            epoch: 2,
            reason: "NodeNotReady".into(),
            lost_for_seconds: Some(61),
            pod_uid: uid.into(),
        }
    }

    fn failover(reason: LossReason, lost_for: Option<u64>) -> Decision {
        Decision::Failover {
            node: "n1".into(),
            pod_uid: "u1".into(),
            reason,
            lost_for: lost_for.map(Duration::from_secs),
        }
    }

    /// (what, policy, hub pod, its node, recorded failover, decision)
    type Case = (
        &'static str,
        NodeLossPolicy,
        Option<Pod>,
        Option<Node>,
        Option<LastFailover>,
        Decision,
    );

    #[test]
    fn the_decision_table() {
        use NodeLossPolicy::{ForceDeletePod as On, Never};
        let secs = Duration::from_secs;
        let since = |d: u64| Some(("False", Some(T - d)));
        let p1 = pod("u1", Some("n1"));
        let oos = Some(OUT_OF_SERVICE_TAINT);
        let cases: Vec<Case> = vec![
            (
                "healthy node",
                On,
                Some(p1.clone()),
                Some(node(Some(("True", Some(T - 999))), None)),
                None,
                Decision::Nothing,
            ),
            (
                "no hub pod",
                On,
                None,
                Some(node(since(999), None)),
                None,
                Decision::Nothing,
            ),
            (
                "pod not scheduled",
                On,
                Some(pod("u1", None)),
                None,
                None,
                Decision::Nothing,
            ),
            (
                "node never reported Ready",
                On,
                Some(p1.clone()),
                Some(node(None, None)),
                None,
                Decision::Nothing,
            ),
            (
                "NotReady 10 s: wait 50 s",
                On,
                Some(p1.clone()),
                Some(node(since(10), None)),
                None,
                Decision::Wait {
                    remaining: secs(50),
                },
            ),
            (
                "NotReady 59 s: wait 1 s",
                On,
                Some(p1.clone()),
                Some(node(since(59), None)),
                None,
                Decision::Wait { remaining: secs(1) },
            ),
            (
                "NotReady exactly 60 s: act",
                On,
                Some(p1.clone()),
                Some(node(since(60), None)),
                None,
                failover(LossReason::NodeNotReady, Some(60)),
            ),
            (
                "Unknown 300 s: act",
                On,
                Some(p1.clone()),
                Some(node(Some(("Unknown", Some(T - 300))), None)),
                None,
                failover(LossReason::NodeUnknown, Some(300)),
            ),
            (
                "NotReady, no transition time: the timer starts now",
                On,
                Some(p1.clone()),
                Some(node(Some(("False", None)), None)),
                None,
                Decision::Wait {
                    remaining: secs(60),
                },
            ),
            (
                "policy Never, NotReady for an hour",
                Never,
                Some(p1.clone()),
                Some(node(since(3600), None)),
                None,
                Decision::Nothing,
            ),
            (
                "policy Never, out-of-service",
                Never,
                Some(p1.clone()),
                Some(node(since(1), oos)),
                None,
                Decision::Nothing,
            ),
            (
                "out-of-service at once",
                On,
                Some(p1.clone()),
                Some(node(since(1), oos)),
                None,
                failover(LossReason::NodeOutOfService, Some(1)),
            ),
            (
                "out-of-service on a node still Ready",
                On,
                Some(p1.clone()),
                Some(node(Some(("True", Some(T - 5))), oos)),
                None,
                failover(LossReason::NodeOutOfService, None),
            ),
            (
                "another taint is not a loss",
                On,
                Some(p1.clone()),
                Some(node(
                    Some(("True", Some(T - 5))),
                    Some("node.kubernetes.io/unreachable"),
                )),
                None,
                Decision::Nothing,
            ),
            (
                "node deleted",
                On,
                Some(p1.clone()),
                None,
                None,
                failover(LossReason::NodeDeleted, None),
            ),
            (
                "already bumped for this pod: delete again",
                On,
                Some(p1.clone()),
                Some(node(since(999), None)),
                Some(recorded("u1")),
                Decision::RetryDelete {
                    pod_uid: "u1".into(),
                },
            ),
            (
                "already bumped for this pod, taint gone, timer not due",
                On,
                Some(p1.clone()),
                Some(node(since(5), None)),
                Some(recorded("u1")),
                Decision::RetryDelete {
                    pod_uid: "u1".into(),
                },
            ),
            (
                "bumped for this pod, node back: the rollout replaces it gracefully",
                On,
                Some(p1.clone()),
                Some(node(Some(("True", Some(T - 1))), None)),
                Some(recorded("u1")),
                Decision::Nothing,
            ),
            (
                "an earlier loss of another pod: a new loss",
                On,
                Some(p1.clone()),
                Some(node(since(61), None)),
                Some(recorded("u0")),
                failover(LossReason::NodeNotReady, Some(61)),
            ),
        ];
        for (label, p, pod, node, rec, want) in cases {
            let got = decide(&policy(p), pod.as_ref(), node.as_ref(), T, rec.as_ref());
            assert_eq!(got, want, "{label}");
        }
    }

    #[test]
    fn not_ready_after_reads_seconds_minutes_hours_and_refuses_the_rest() {
        assert_eq!(parse_not_ready_after("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_not_ready_after("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_not_ready_after("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_not_ready_after("0s"), Ok(Duration::ZERO));
        for bad in ["", "60", "s", "1.5m", "-1s", "60 s", "1d", "ä"] {
            let e = parse_not_ready_after(bad).expect_err(bad);
            assert!(e.contains("notReadyAfter"), "{e}");
        }
    }

    #[test]
    fn the_epoch_config_map_reads_back_and_refuses_what_is_no_epoch() {
        let cm = epoch_config_map("line1", "factory");
        assert_eq!(cm.metadata.name.as_deref(), Some("line1-hub-epoch"));
        assert!(cm.metadata.owner_references.is_none());
        let r = read_epoch(&cm).unwrap();
        assert_eq!(r.epoch, Epoch::FIRST);
        assert_eq!(r.last_failover, None);

        let mut with = cm.clone();
        with.data = Some(BTreeMap::from([(EPOCH_KEY.into(), "7".into())]));
        with.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_LAST_FAILOVER.into(),
            serde_json::to_string(&recorded("u1")).unwrap(),
        )]));
        let r = read_epoch(&with).unwrap();
        assert_eq!(r.epoch.get(), 7);
        assert_eq!(r.last_failover, Some(recorded("u1")));

        for bad in ["0", "-1", "seven", "", "18446744073709551616"] {
            let mut b = cm.clone();
            b.data = Some(BTreeMap::from([(EPOCH_KEY.into(), bad.into())]));
            assert!(
                matches!(read_epoch(&b), Err(EpochError::Invalid { .. })),
                "{bad}"
            );
        }
        let mut none = cm;
        none.data = None;
        assert!(matches!(read_epoch(&none), Err(EpochError::Missing { .. })));
        assert_eq!(Epoch::new(u64::MAX).unwrap().next(), None);
    }

    /// The Node watch's mapping (`main.rs` hands it to kube-runtime's `watches`): only a lost
    /// node re-runs EdgeDeployments, and only those whose policy may act.
    #[test]
    fn a_lost_node_rechecks_only_the_edge_deployments_whose_policy_acts() {
        let path = format!("{}/examples/minimal.yaml", env!("CARGO_MANIFEST_DIR"));
        let base: EdgeDeployment =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let with = |name: &str, policy| {
            let mut ed = base.clone();
            ed.metadata.name = Some(name.into());
            ed.metadata.namespace = Some("edge".into());
            ed.spec.hub.node_loss.policy = policy;
            ed
        };
        let eds = [
            with("acts", NodeLossPolicy::ForceDeletePod),
            with("waits-for-a-human", NodeLossPolicy::Never),
        ];
        let names = |node: &Node| -> Vec<String> {
            eds_to_recheck(node, &eds)
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
                .collect()
        };
        let acts = vec!["edge/acts".to_string()];
        assert_eq!(names(&node(Some(("False", Some(T))), None)), acts);
        assert_eq!(names(&node(Some(("Unknown", Some(T))), None)), acts);
        assert_eq!(
            names(&node(Some(("True", Some(T))), Some(OUT_OF_SERVICE_TAINT))),
            acts
        );
        assert!(names(&node(Some(("True", Some(T))), None)).is_empty());
        assert!(names(&node(Some(("True", Some(T))), Some("other-taint"))).is_empty());
        // No Ready condition reported yet (a node registering): not lost.
        assert!(names(&node(None, None)).is_empty());
    }
}
