//! Reconcile: one EdgeDeployment → its objects, its status, its Events.
//!
//! [`reconcile`] is a plain async function (the controller runtime calls it; tests call it
//! directly against a fake API). One pass:
//! 1. deleting? run the cleanup behind the finalizer [`FINALIZER`], remove it, done;
//! 2. add the finalizer if missing;
//! 3. read the store epoch from the ConfigMap `D-hub-epoch` (made at 1 when missing) and run
//!    the node-loss policy ([`crate::failover::decide`]): on a lost node, raise the epoch in the
//!    ConfigMap first (with the failover it is for, in one write), and force-delete the hub pod
//!    (grace 0, precondition: its uid) at the end of the pass, once the hub StatefulSet carries
//!    the new `--epoch`; a pass that waits on the timer requeues when it runs out;
//! 4. resolve the manifest (inline, or a ConfigMap key) and check it with the hub's parser; a
//!    bad or missing manifest sets `Degraded` (the located messages) and changes nothing else;
//! 5. read the secret material back (`D-hub-tls`, `D-module-keys`, `spec.device.keysSecret`),
//!    keeping what exists, making what is missing or due ([`crate::tls`], [`crate::keys`]);
//! 6. build [`crate::desired::desired_at_epoch`] and server-side apply each object (field manager
//!    `edgehub-controller`, force) *unless the live object already holds every field we set*,
//!    so a second pass writes nothing;
//! 7. delete module objects (by label) whose module left the manifest;
//! 8. write the status (only when it changed): conditions Ready, HubReady, ModulesReady,
//!    Degraded, each module's phase, the store epoch, the last failover.
//!
//! Every API call has a deadline ([`Context::api_timeout`]); a failure is a typed [`Error`]
//! naming the action and object, and [`error_policy`] requeues with an exponential backoff per
//! EdgeDeployment that a successful pass resets.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::agent::{self, DesiredStatus};
use crate::desired::{self, ControllerOptions, Object, RenderError, SecretMaterial};
use crate::failover::{self, Decision, Epoch, EpochError, NodeLoss};
use crate::keys::{self, KeyError, KeyOrigin};
use crate::names::{self, MANAGER};
use crate::replicas;
use crate::tls::{self, TlsError, TlsMaterial, TlsOutcome};
use crate::types::{
    Condition, EdgeDeployment, EdgeDeploymentStatus, LastFailover, ModuleStatus, NodeLossPolicy,
};

/// The finalizer that makes deletion remove what owner references would not (the store PVC
/// when `retainOnDelete: false`) and every labelled object explicitly.
pub const FINALIZER: &str = "edgehub.io/cleanup";
/// How often a healthy EdgeDeployment is looked at again without any change.
pub const RESYNC: Duration = Duration::from_secs(300);
/// The first retry after an error; doubled per consecutive failure up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// The longest retry interval.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What a pass needs.
pub struct Context {
    /// The API.
    pub client: Client,
    /// The controller's flags.
    pub opts: ControllerOptions,
    /// Unix seconds now (certificate expiry, condition times). Tests pass a fixed clock.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The deadline of each API call.
    pub api_timeout: Duration,
    /// Consecutive failures per `namespace/name`.
    failures: Mutex<HashMap<String, u32>>,
    /// Publishes Kubernetes Events.
    recorder: Recorder,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// The controller's counters, in Prometheus text format with `edgehub_` names.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Passes run.
    pub reconciles: std::sync::atomic::AtomicU64,
    /// Passes that failed.
    pub reconcile_errors: std::sync::atomic::AtomicU64,
    /// 1 while this replica holds the Lease.
    pub leader: std::sync::atomic::AtomicBool,
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "# HELP edgehub_controller_reconciles_total Reconcile passes run.\n\
             # TYPE edgehub_controller_reconciles_total counter\n\
             edgehub_controller_reconciles_total {}\n\
             # HELP edgehub_controller_reconcile_errors_total Reconcile passes that failed.\n\
             # TYPE edgehub_controller_reconcile_errors_total counter\n\
             edgehub_controller_reconcile_errors_total {}\n\
             # HELP edgehub_controller_leader 1 while this replica holds the leader Lease.\n\
             # TYPE edgehub_controller_leader gauge\n\
             edgehub_controller_leader {}\n",
            self.reconciles.load(Relaxed),
            self.reconcile_errors.load(Relaxed),
            u8::from(self.leader.load(Relaxed)),
        )
    }
}

impl Context {
    /// A context with the system clock and a 30 s API deadline.
    pub fn new(client: Client, opts: ControllerOptions) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.to_owned(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            opts,
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
            api_timeout: Duration::from_secs(30),
            failures: Mutex::new(HashMap::new()),
            recorder,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The same with another clock.
    pub fn with_clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The same with another API deadline.
    pub fn with_api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }
}

/// Why a pass failed (it is retried by [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused or failed.
    #[error("{action} {object}: {source}")]
    Api {
        /// reading, applying, deleting, …
        action: &'static str,
        /// `Kind/name`.
        object: String,
        /// The API's error (a `Status` with its code for 409, 500, …).
        source: kube::Error,
    },
    /// The API did not answer in time.
    #[error("{action} {object}: no answer within {after:?}")]
    Timeout {
        /// reading, applying, deleting, …
        action: &'static str,
        /// `Kind/name`.
        object: String,
        /// The deadline.
        after: Duration,
    },
    /// The EdgeDeployment has no namespace (the CRD is namespaced: a bug elsewhere).
    #[error("the EdgeDeployment has no namespace")]
    NoNamespace,
    /// Certificates could not be made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Keys could not be resolved.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Objects could not be built.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The epoch ConfigMap holds no usable epoch (never guessed: a guess could lower it).
    #[error(transparent)]
    Epoch(#[from] EpochError),
    /// An object could not be serialized (a bug).
    #[error("serializing {object}: {source}")]
    Serialize {
        /// `Kind/name`.
        object: String,
        /// Why.
        source: serde_json::Error,
    },
}

impl Error {
    /// A short CamelCase reason for Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Api { .. } => "ApiError",
            Self::Timeout { .. } => "ApiTimeout",
            Self::NoNamespace => "NoNamespace",
            Self::Tls(_) => "TlsError",
            Self::Keys(_) => "KeyError",
            Self::Render(_) => "RenderError",
            Self::Epoch(_) => "EpochError",
            Self::Serialize { .. } => "SerializeError",
        }
    }
}

async fn call<T>(
    ctx: &Context,
    action: &'static str,
    object: impl Fn() -> String,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(ctx.api_timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Api {
            action,
            object: object(),
            source,
        }),
        Err(_) => Err(Error::Timeout {
            action,
            object: object(),
            after: ctx.api_timeout,
        }),
    }
}

fn key_of(ed: &EdgeDeployment) -> String {
    format!("{}/{}", ed.namespace().unwrap_or_default(), ed.name_any())
}

/// The requeue after an error: [`BACKOFF_BASE`] doubled per consecutive failure of this
/// EdgeDeployment, at most [`BACKOFF_MAX`].
pub fn error_policy(ed: Arc<EdgeDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failures = ctx
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key_of(&ed)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(edgedeployment = %key_of(&ed), error = %error, failures = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay after `n` (≥ 1) consecutive failures.
pub fn backoff(n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// One pass (see the module docs).
pub async fn reconcile(ed: Arc<EdgeDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = reconcile_inner(&ed, &ctx).await;
    match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key_of(&ed));
        }
        Err(e) => {
            ctx.metrics
                .reconcile_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            publish(&ctx, &ed, EventType::Warning, e.reason(), &e.to_string()).await
        }
    }
    result
}

async fn publish(ctx: &Context, ed: &EdgeDeployment, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1024).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ed.object_ref(&())).await {
        tracing::warn!(edgedeployment = %key_of(ed), error = %e, "could not publish an Event");
    }
}

async fn reconcile_inner(ed: &EdgeDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = ed.namespace().ok_or(Error::NoNamespace)?;
    let name = ed.name_any();
    let eds: Api<EdgeDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let ed_object = || format!("EdgeDeployment/{name}");

    if ed.meta().deletion_timestamp.is_some() {
        if ed.finalizers().iter().any(|f| f == FINALIZER) {
            cleanup(ed, ctx, &ns).await?;
            let rest: Vec<&String> = ed.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            let patch =
                json!({"metadata": {"finalizers": rest, "resourceVersion": ed.resource_version()}});
            call(
                ctx,
                "removing the finalizer of",
                ed_object,
                eds.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        }
        return Ok(Action::await_change());
    }
    let patched;
    let ed = if ed.finalizers().iter().any(|f| f == FINALIZER) {
        ed
    } else {
        let mut all: Vec<String> = ed.finalizers().to_vec();
        all.push(FINALIZER.to_owned());
        let patch =
            json!({"metadata": {"finalizers": all, "resourceVersion": ed.resource_version()}});
        // The rest of the pass works on what the API returned (its resourceVersion).
        patched = call(
            ctx,
            "adding the finalizer to",
            ed_object,
            eds.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        &patched
    };

    let now = (ctx.clock)();
    let node_loss = match NodeLoss::from_spec(&ed.spec.hub.node_loss) {
        Ok(p) => p,
        Err(message) => {
            // The epoch still shows; nothing is decided on a policy we cannot read.
            let hub = read_epoch(ed, ctx, &ns).await?;
            return degraded(ed, ctx, &eds, &hub, "InvalidSpec", message, now).await;
        }
    };
    let hub = hub_epoch_and_node_loss(ed, ctx, &ns, &node_loss, now).await?;
    let action = reconcile_objects(ed, ctx, &ns, &eds, &hub, now).await?;
    if let Some(uid) = &hub.delete {
        force_delete_hub_pod(ed, ctx, &ns, &hub, uid).await?;
    }
    // Every pass requeues within RESYNC; a running node-loss timer sooner.
    Ok(match hub.wait {
        Some(remaining) => Action::requeue(remaining.clamp(Duration::from_secs(1), RESYNC)),
        None => action,
    })
}

/// The store epoch and what the node-loss policy decided in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEpoch {
    /// The epoch the hub runs at (after a bump in this pass).
    pub epoch: Epoch,
    /// The failover recorded with it.
    pub last_failover: Option<LastFailover>,
    /// The uid of the hub pod to force-delete at the end of the pass.
    pub delete: Option<String>,
    /// The node-loss timer runs out in this long.
    pub wait: Option<Duration>,
}

/// Reads the epoch ConfigMap, making it at epoch 1 when missing.
async fn read_epoch(ed: &EdgeDeployment, ctx: &Context, ns: &str) -> Result<HubEpoch, Error> {
    let (record, _) = read_epoch_config_map(ed, ctx, ns).await?;
    Ok(HubEpoch {
        epoch: record.epoch,
        last_failover: record.last_failover,
        delete: None,
        wait: None,
    })
}

async fn read_epoch_config_map(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
) -> Result<(failover::EpochRecord, Option<String>), Error> {
    let d = ed.name_any();
    let name = names::hub_epoch(&d);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let object = || format!("ConfigMap/{name}");
    let cm = match call(ctx, "reading", object, cms.get_opt(&name)).await? {
        Some(cm) => cm,
        // A create, never an apply: an existing epoch is never overwritten (two writers
        // racing here: one gets a 409 and retries on a fresh read).
        None => {
            call(
                ctx,
                "creating",
                object,
                cms.create(&PostParams::default(), &failover::epoch_config_map(&d, ns)),
            )
            .await?
        }
    };
    Ok((failover::read_epoch(&cm)?, cm.metadata.resource_version))
}

/// Step 3 of the pass (see the module docs): the epoch, and the node-loss decision; a
/// failover raises the epoch here, durably, before anything else changes.
async fn hub_epoch_and_node_loss(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
    policy: &NodeLoss,
    now: u64,
) -> Result<HubEpoch, Error> {
    let (record, version) = read_epoch_config_map(ed, ctx, ns).await?;
    let mut hub = HubEpoch {
        epoch: record.epoch,
        last_failover: record.last_failover.clone(),
        delete: None,
        wait: None,
    };
    if policy.policy == NodeLossPolicy::Never {
        return Ok(hub);
    }
    let d = ed.name_any();
    let pod_name = names::hub_pod(&d);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod = call(
        ctx,
        "reading",
        || format!("Pod/{pod_name}"),
        pods.get_opt(&pod_name),
    )
    .await?;
    let node_name = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone());
    let node = match &node_name {
        Some(n) => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            call(ctx, "reading", || format!("Node/{n}"), nodes.get_opt(n)).await?
        }
        None => None,
    };
    match failover::decide(
        policy,
        pod.as_ref(),
        node.as_ref(),
        now,
        record.last_failover.as_ref(),
    ) {
        Decision::Nothing => {}
        Decision::Wait { remaining } => {
            tracing::info!(edgedeployment = %key_of(ed), node = node_name.as_deref().unwrap_or(""), remaining = ?remaining, "the hub's node is not ready: waiting for nodeLoss.notReadyAfter");
            hub.wait = Some(remaining);
        }
        Decision::RetryDelete { pod_uid } => hub.delete = Some(pod_uid),
        Decision::Failover {
            node,
            pod_uid,
            reason,
            lost_for,
        } => {
            let name = names::hub_epoch(&d);
            let epoch = record.epoch.next().ok_or_else(|| EpochError::Exhausted {
                name: name.clone(),
                epoch: record.epoch.get(),
            })?;
            let last = LastFailover {
                at: rfc3339(now),
                from_node: node,
                epoch: epoch.get(),
                reason: reason.as_str().to_owned(),
                lost_for_seconds: lost_for.map(|d| d.as_secs()),
                pod_uid: pod_uid.clone(),
            };
            let annotation = serde_json::to_string(&last).map_err(|source| Error::Serialize {
                object: format!("ConfigMap/{name}"),
                source,
            })?;
            // One write, conditional on the version read: the new epoch and the loss it is for.
            let patch = json!({
                "metadata": {
                    "resourceVersion": version,
                    "annotations": { failover::ANNOTATION_LAST_FAILOVER: annotation },
                },
                "data": { failover::EPOCH_KEY: epoch.to_string() },
            });
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
            call(
                ctx,
                "raising the epoch in",
                || format!("ConfigMap/{name}"),
                cms.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
            tracing::warn!(edgedeployment = %key_of(ed), node = %last.from_node, reason = %last.reason, lost_for = ?lost_for, from = record.epoch.get(), to = epoch.get(), "the hub's node is lost: epoch raised, the hub pod will be force-deleted");
            hub.epoch = epoch;
            hub.last_failover = Some(last);
            hub.delete = Some(pod_uid);
        }
    }
    Ok(hub)
}

/// Force-deletes the hub pod (grace 0) if it is still the one with `uid`; a pod already gone
/// (404) or replaced by the StatefulSet (409: the uid precondition failed) is done too.
async fn force_delete_hub_pod(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
    hub: &HubEpoch,
    uid: &str,
) -> Result<(), Error> {
    let pod_name = names::hub_pod(&ed.name_any());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match call(
        ctx,
        "force-deleting",
        || format!("Pod/{pod_name}"),
        pods.delete(&pod_name, &params),
    )
    .await
    {
        Ok(_) => {}
        Err(Error::Api {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 || s.code == 409 => {
            tracing::info!(edgedeployment = %key_of(ed), pod = %pod_name, code = s.code, "the lost hub pod is already gone or replaced");
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    let note = match &hub.last_failover {
        Some(l) => format!(
            "{}: node {} lost ({}{}); epoch raised to {}; hub pod {pod_name} force-deleted",
            l.at,
            l.from_node,
            l.reason,
            l.lost_for_seconds
                .map(|s| format!(" for {s} s"))
                .unwrap_or_default(),
            l.epoch
        ),
        None => format!("hub pod {pod_name} force-deleted"),
    };
    tracing::warn!(edgedeployment = %key_of(ed), pod = %pod_name, epoch = hub.epoch.get(), "hub pod force-deleted");
    publish(ctx, ed, EventType::Warning, "HubFailover", &note).await;
    Ok(())
}

fn rfc3339(now: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(now).unwrap_or(i64::MAX))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Steps 4 to 8 of the pass (see the module docs).
async fn reconcile_objects(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
    eds: &Api<EdgeDeployment>,
    hub: &HubEpoch,
    now: u64,
) -> Result<Action, Error> {
    let ns = ns.to_owned();
    let name = ed.name_any();
    let manifest = match resolve_manifest(ed, ctx, &ns).await? {
        Ok(m) => m,
        Err((reason, message)) => return degraded(ed, ctx, eds, hub, reason, message, now).await,
    };
    let modules = match agent::parse_manifest(&manifest) {
        Ok(m) => m,
        Err(problems) => {
            return degraded(
                ed,
                ctx,
                eds,
                hub,
                "InvalidManifest",
                problems.messages.join("; "),
                now,
            )
            .await
        }
    };

    // Secret material: read back, keep, make what is missing.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let tls_name = names::hub_tls(&name);
    let old_tls = call(
        ctx,
        "reading",
        || format!("Secret/{tls_name}"),
        secrets.get_opt(&tls_name),
    )
    .await?;
    let old_tls = old_tls.and_then(|s| {
        TlsMaterial::from_secret(
            &secret_data(&s),
            s.metadata.annotations.as_ref().unwrap_or(&BTreeMap::new()),
        )
    });
    let (tls, tls_outcome) = tls::ensure(
        old_tls,
        &desired::ca_common_name(ed),
        &desired::hub_dns_names(ed),
        now,
    )?;
    let keys_name = names::module_keys(&name);
    let kept = call(
        ctx,
        "reading",
        || format!("Secret/{keys_name}"),
        secrets.get_opt(&keys_name),
    )
    .await?;
    let issued = match &ed.spec.device.keys_secret {
        Some(s) => {
            match call(ctx, "reading", || format!("Secret/{s}"), secrets.get_opt(s)).await? {
                Some(secret) => secret_data(&secret),
                None => {
                    return degraded(
                        ed,
                        ctx,
                        eds,
                        hub,
                        "KeysSecretNotFound",
                        format!("spec.device.keysSecret: Secret {s:?} not found"),
                        now,
                    )
                    .await
                }
            }
        }
        None => BTreeMap::new(),
    };
    let names_only: Vec<_> = modules.iter().map(|m| m.name.clone()).collect();
    let resolved = keys::resolve(
        &names_only,
        ed.spec.device.keys_secret.as_deref().unwrap_or(""),
        &issued,
        &kept.as_ref().map(secret_data).unwrap_or_default(),
    )?;
    let minted: Vec<String> = resolved
        .iter()
        .filter(|(_, (_, o))| *o == KeyOrigin::Minted)
        .map(|(m, _)| m.to_string())
        .collect();
    let material = SecretMaterial {
        tls,
        keys: resolved.into_iter().map(|(m, (k, _))| (m, k)).collect(),
    };

    let want = desired::desired_at_epoch(ed, &manifest, &material, &ctx.opts, hub.epoch)?;
    let mut applied = Vec::new();
    let mut recreating = false;
    for object in want.objects() {
        let module = match &object {
            Object::StatefulSet(o) => want
                .modules
                .iter()
                .find(|m| m.workload.name_any() == o.name_any()),
            _ => None,
        };
        let changed = match (&object, module) {
            (Object::StatefulSet(_), Some(m)) => {
                match apply_module_workload(ed, ctx, &ns, m, &object).await? {
                    WorkloadApplied::Applied(changed) => changed,
                    WorkloadApplied::Recreating => {
                        recreating = true;
                        true
                    }
                }
            }
            (Object::Secret(o), _) => apply(ctx, &ns, o, &object).await?,
            (Object::ConfigMap(o), _) => apply(ctx, &ns, o, &object).await?,
            (Object::Service(o), _) => apply(ctx, &ns, o, &object).await?,
            (Object::StatefulSet(o), None) => apply(ctx, &ns, o, &object).await?,
        };
        if changed {
            applied.push(object.describe());
        }
    }
    if !applied.is_empty() {
        tracing::info!(edgedeployment = %key_of(ed), objects = ?applied, "applied");
    }
    if tls_outcome != TlsOutcome::Unchanged {
        tracing::info!(edgedeployment = %key_of(ed), outcome = ?tls_outcome, "hub certificate made");
    }
    if !minted.is_empty() {
        tracing::info!(edgedeployment = %key_of(ed), modules = ?minted, "module keys minted");
    }

    // Module objects whose module left the manifest.
    let keep: Vec<String> = want.objects().iter().map(Object::describe).collect();
    let selector = format!(
        "{}={name},{}=module,{}={MANAGER}",
        names::LABEL_PART_OF,
        names::LABEL_COMPONENT,
        names::LABEL_MANAGED_BY
    );
    prune::<StatefulSet>(ctx, &ns, "StatefulSet", &selector, &keep).await?;
    prune::<Service>(ctx, &ns, "Service", &selector, &keep).await?;
    prune::<Secret>(ctx, &ns, "Secret", &selector, &keep).await?;

    // Status.
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let hub_name = names::hub(&name);
    let hub_sts = call(
        ctx,
        "reading",
        || format!("StatefulSet/{hub_name}"),
        sts.get_opt(&hub_name),
    )
    .await?;
    let hub_ready = ready_replicas(hub_sts.as_ref()) >= 1;
    let mut module_status = Vec::new();
    for (m, objects) in modules.iter().zip(&want.modules) {
        let wname = objects.workload.name_any();
        let live = call(
            ctx,
            "reading",
            || format!("StatefulSet/{wname}"),
            sts.get_opt(&wname),
        )
        .await?;
        let ready = ready_replicas(live.as_ref());
        let (phase, mut message) = match m.status {
            DesiredStatus::Stopped => ("Stopped", String::new()),
            DesiredStatus::Running if ready >= 1 => ("Running", String::new()),
            DesiredStatus::Running => ("Pending", "waiting for its pod to be ready".to_owned()),
        };
        if let (Some(max), DesiredStatus::Running) = (objects.max_replicas, m.status) {
            let scaled = live
                .as_ref()
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            let replicas = format!("{ready} of {scaled} replicas ready (at most {max})");
            message = if message.is_empty() {
                replicas
            } else {
                format!("{message}: {replicas}")
            };
        }
        module_status.push(ModuleStatus {
            name: m.name.to_string(),
            phase: phase.to_owned(),
            message,
        });
    }
    let not_ready: Vec<&str> = module_status
        .iter()
        .filter(|m| m.phase == "Pending")
        .map(|m| m.name.as_str())
        .collect();
    let generation = ed.meta().generation;
    let mut conditions = vec![
        cond(
            "HubReady",
            hub_ready,
            if hub_ready {
                "HubPodReady"
            } else {
                "HubPodNotReady"
            },
            String::new(),
            generation,
        ),
        cond(
            "ModulesReady",
            not_ready.is_empty(),
            if not_ready.is_empty() {
                "AllModulesReady"
            } else {
                "ModulesNotReady"
            },
            if not_ready.is_empty() {
                String::new()
            } else {
                format!("not ready: {}", not_ready.join(", "))
            },
            generation,
        ),
    ];
    if want.untranslated.is_empty() {
        conditions.push(cond(
            "Degraded",
            false,
            "AsExpected",
            String::new(),
            generation,
        ));
    } else {
        conditions.push(cond(
            "Degraded",
            true,
            "UntranslatedCreateOptions",
            format!("not translated: {}", want.untranslated.join("; ")),
            generation,
        ));
    }
    let ready = hub_ready && not_ready.is_empty();
    conditions.insert(
        0,
        cond(
            "Ready",
            ready,
            if ready { "AllReady" } else { "NotReady" },
            String::new(),
            generation,
        ),
    );
    let status = EdgeDeploymentStatus {
        observed_generation: generation,
        conditions,
        modules: module_status,
        store_epoch: Some(hub.epoch.get()),
        last_failover: hub.last_failover.clone(),
    };
    write_status(ed, ctx, eds, status, now).await?;
    Ok(Action::requeue(if recreating {
        RECREATE_POLL
    } else {
        RESYNC
    }))
}

/// How soon a pass that deleted a StatefulSet to recreate it looks again (the deletion of the
/// StatefulSet itself, its pods orphaned, also triggers a pass through the watch).
pub const RECREATE_POLL: Duration = Duration::from_secs(2);

/// What [`apply_module_workload`] did.
enum WorkloadApplied {
    /// Applied (`true`) or already as wanted (`false`), scale included.
    Applied(bool),
    /// The live StatefulSet has another (immutable) `podManagementPolicy`: it was deleted with
    /// its pods orphaned, or is still being deleted; a later pass creates it anew.
    Recreating,
}

/// A module's StatefulSet: the main apply (without `.spec.replicas` for a replicated module)
/// and, for a replicated one, the scale field manager's decision ([`replicas::decide`]).
/// `podManagementPolicy` is immutable: a StatefulSet that has another one is deleted with
/// `propagationPolicy: Orphan` (its pods keep running) and created anew once it is gone, and the
/// new one adopts the pods (same selector).
async fn apply_module_workload(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
    m: &desired::ModuleObjects,
    object: &Object,
) -> Result<WorkloadApplied, Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let name = m.workload.name_any();
    let describe = || object.describe();
    let mut live = call(ctx, "reading", describe, api.get_opt(&name)).await?;
    if let Some(l) = &live {
        if l.metadata.deletion_timestamp.is_some() {
            tracing::info!(edgedeployment = %key_of(ed), object = %describe(), "waiting for the StatefulSet to be deleted before it is created anew");
            return Ok(WorkloadApplied::Recreating);
        }
        let policy = |s: &StatefulSet| {
            s.spec
                .as_ref()
                .and_then(|s| s.pod_management_policy.clone())
                .unwrap_or_else(|| desired::pod_management_policy(false).to_owned())
        };
        if policy(l) != policy(&m.workload) {
            let note = format!(
                "module {}: StatefulSet/{name} has podManagementPolicy {}, which cannot change: deleting it with its pods orphaned to create it with {}",
                m.name,
                policy(l),
                policy(&m.workload)
            );
            tracing::info!(edgedeployment = %key_of(ed), object = %describe(), "{note}");
            let params = DeleteParams {
                propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
                ..DeleteParams::default()
            };
            match call(ctx, "deleting", describe, api.delete(&name, &params)).await {
                Ok(_) => {}
                Err(Error::Api {
                    source: kube::Error::Api(s),
                    ..
                }) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
            publish(ctx, ed, EventType::Normal, "StatefulSetRecreated", &note).await;
            // An API server removes it once its pods are orphaned; until then, wait.
            live = call(ctx, "reading", describe, api.get_opt(&name)).await?;
            if live.is_some() {
                return Ok(WorkloadApplied::Recreating);
            }
        }
    }
    let scale = m.max_replicas.and_then(|max| {
        let seen = live.as_ref().map(|l| replicas::LiveScale {
            replicas: l.spec.as_ref().and_then(|s| s.replicas),
            max: l
                .annotations()
                .get(replicas::ANNOTATION_MAX_REPLICAS)
                .and_then(|a| replicas::MaxReplicas::parse(a)),
        });
        replicas::decide(max, seen).map(|to| (max, to))
    });
    let existed = live.is_some();
    // The scale manager takes `.spec.replicas` over before the main manager stops applying it
    // (a former singleton); a new StatefulSet must exist before a partial apply can touch it.
    if existed {
        if let Some((max, to)) = scale {
            apply_scale(ed, ctx, &api, m, max, to, object).await?;
        }
    }
    let mut changed = apply_read(ctx, &api, &m.workload, object, live).await?;
    if !existed {
        if let Some((max, to)) = scale {
            apply_scale(ed, ctx, &api, m, max, to, object).await?;
        }
    }
    changed |= scale.is_some();
    Ok(WorkloadApplied::Applied(changed))
}

/// The scale field manager's apply: `.spec.replicas` and nothing else.
async fn apply_scale(
    ed: &EdgeDeployment,
    ctx: &Context,
    api: &Api<StatefulSet>,
    m: &desired::ModuleObjects,
    max: replicas::MaxReplicas,
    to: replicas::ScaleTo,
    object: &Object,
) -> Result<(), Error> {
    let name = m.workload.name_any();
    let patch = replicas::scale_patch(&m.workload, to.replicas);
    let params = PatchParams::apply(replicas::SCALE_MANAGER).force();
    call(
        ctx,
        "scaling",
        || object.describe(),
        api.patch(&name, &params, &Patch::Apply(&patch)),
    )
    .await?;
    let note = to.describe(&name, m.name.as_str(), max);
    match to.reason {
        replicas::ScaleReason::Created => {
            tracing::info!(edgedeployment = %key_of(ed), replicas = to.replicas, "{note}");
        }
        replicas::ScaleReason::Clamped { .. } => {
            tracing::warn!(edgedeployment = %key_of(ed), replicas = to.replicas, "{note}");
            publish(ctx, ed, EventType::Warning, "ReplicasClamped", &note).await;
        }
        replicas::ScaleReason::BecameReplicated | replicas::ScaleReason::CeilingChanged { .. } => {
            tracing::info!(edgedeployment = %key_of(ed), replicas = to.replicas, "{note}");
            publish(ctx, ed, EventType::Normal, "ModuleScaled", &note).await;
        }
    }
    Ok(())
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: None,
        observed_generation: generation,
    }
}

fn ready_replicas(s: Option<&StatefulSet>) -> i32 {
    s.and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// The manifest, or why there is none (`(reason, message)` for a Degraded condition).
async fn resolve_manifest(
    ed: &EdgeDeployment,
    ctx: &Context,
    ns: &str,
) -> Result<Result<Value, (&'static str, String)>, Error> {
    let source = &ed.spec.manifest;
    match (&source.inline, &source.config_map_key_ref) {
        (Some(m), None) => Ok(Ok(m.clone())),
        (None, Some(r)) => {
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
            let cm = call(
                ctx,
                "reading",
                || format!("ConfigMap/{}", r.name),
                cms.get_opt(&r.name),
            )
            .await?;
            let text = cm
                .as_ref()
                .and_then(|c| c.data.as_ref())
                .and_then(|d| d.get(&r.key));
            Ok(match (cm.is_some(), text) {
                (false, _) => Err((
                    "ManifestNotFound",
                    format!("ConfigMap {:?} not found", r.name),
                )),
                (true, None) => Err((
                    "ManifestNotFound",
                    format!("ConfigMap {:?} has no key {:?}", r.name, r.key),
                )),
                (true, Some(t)) => serde_json::from_str(t).map_err(|e| {
                    (
                        "InvalidManifest",
                        format!("ConfigMap {:?} key {:?}: invalid JSON: {e}", r.name, r.key),
                    )
                }),
            })
        }
        _ => Ok(Err((
            "InvalidSpec",
            "spec.manifest must have exactly one of inline and configMapKeyRef".to_owned(),
        ))),
    }
}

/// Sets Degraded (keeping the other conditions) and an Event; changes no object.
async fn degraded(
    ed: &EdgeDeployment,
    ctx: &Context,
    eds: &Api<EdgeDeployment>,
    hub: &HubEpoch,
    reason: &'static str,
    message: String,
    now: u64,
) -> Result<Action, Error> {
    tracing::warn!(edgedeployment = %key_of(ed), reason, message = %message, "degraded");
    let mut status = ed.status.clone().unwrap_or_default();
    let generation = ed.meta().generation;
    status
        .conditions
        .retain(|c| c.type_ != "Degraded" && c.type_ != "Ready");
    status
        .conditions
        .insert(0, cond("Ready", false, reason, message.clone(), generation));
    status
        .conditions
        .push(cond("Degraded", true, reason, message.clone(), generation));
    status.observed_generation = generation;
    status.store_epoch = Some(hub.epoch.get());
    status.last_failover = hub.last_failover.clone();
    let changed = write_status(ed, ctx, eds, status, now).await?;
    if changed {
        publish(ctx, ed, EventType::Warning, reason, &message).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Writes the status when it differs from the live one; a condition keeps its
/// lastTransitionTime while its status stays. Returns whether it wrote.
async fn write_status(
    ed: &EdgeDeployment,
    ctx: &Context,
    eds: &Api<EdgeDeployment>,
    mut status: EdgeDeploymentStatus,
    now: u64,
) -> Result<bool, Error> {
    let old = ed.status.clone().unwrap_or_default();
    let stamp = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(now).unwrap_or(i64::MAX))
        .map(|t| t.to_string())
        .unwrap_or_default();
    for c in &mut status.conditions {
        c.last_transition_time = match old.conditions.iter().find(|o| o.type_ == c.type_) {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => Some(stamp.clone()),
        };
    }
    if status == old {
        return Ok(false);
    }
    let name = ed.name_any();
    let patch = json!({ "status": status });
    call(
        ctx,
        "writing the status of",
        || format!("EdgeDeployment/{name}"),
        eds.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await?;
    Ok(true)
}

/// Server-side applies `obj` unless the live object already holds every field it sets.
/// Returns whether it wrote.
async fn apply<K>(ctx: &Context, ns: &str, obj: &K, object: &Object) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let live = call(ctx, "reading", || object.describe(), api.get_opt(&name)).await?;
    apply_read(ctx, &api, obj, object, live).await
}

/// [`apply`], the live object already read.
async fn apply_read<K>(
    ctx: &Context,
    api: &Api<K>,
    obj: &K,
    object: &Object,
    live: Option<K>,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let describe = || object.describe();
    let want = serde_json::to_value(obj).map_err(|source| Error::Serialize {
        object: describe(),
        source,
    })?;
    if let Some(live) = live {
        let live = serde_json::to_value(&live).map_err(|source| Error::Serialize {
            object: describe(),
            source,
        })?;
        // A key of a Secret or ConfigMap we no longer set (a removed module's key) must go:
        // the hub declares a module for every file of its keys directory.
        let stale: serde_json::Map<String, Value> = match (want.get("data"), live.get("data")) {
            (Some(Value::Object(w)), Some(Value::Object(l))) => l
                .keys()
                .filter(|k| !w.contains_key(*k))
                .map(|k| (k.clone(), Value::Null))
                .collect(),
            _ => serde_json::Map::new(),
        };
        if !stale.is_empty() {
            let patch = json!({ "data": stale });
            call(
                ctx,
                "removing stale keys of",
                describe,
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        } else if is_subset(&want, &live) {
            return Ok(false);
        }
    }
    let params = PatchParams::apply(MANAGER).force();
    call(
        ctx,
        "applying",
        describe,
        api.patch(&name, &params, &Patch::Apply(obj)),
    )
    .await?;
    Ok(true)
}

/// Does `live` hold every field of `want` with the same value? Objects may have more fields
/// (defaults the API server adds); arrays must have the same length, element by element.
pub fn is_subset(want: &Value, live: &Value) -> bool {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => w
            .iter()
            .all(|(k, v)| l.get(k).is_some_and(|lv| is_subset(v, lv))),
        (Value::Array(w), Value::Array(l)) => {
            w.len() == l.len() && w.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        _ => want == live,
    }
}

/// Deletes objects of kind `K` matching `selector` that are not in `keep` (`Kind/name`).
async fn prune<K>(
    ctx: &Context,
    ns: &str,
    kind: &'static str,
    selector: &str,
    keep: &[String],
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let list = call(
        ctx,
        "listing",
        || format!("{kind} ({selector})"),
        api.list(&ListParams::default().labels(selector)),
    )
    .await?;
    for item in list.items {
        let name = item.name_any();
        let described = format!("{kind}/{name}");
        if keep.contains(&described) {
            continue;
        }
        tracing::info!(object = %described, "deleting: its module left the manifest");
        delete(ctx, &api, &described, &name).await?;
    }
    Ok(())
}

async fn delete<K>(ctx: &Context, api: &Api<K>, described: &str, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match call(
        ctx,
        "deleting",
        || described.to_owned(),
        api.delete(name, &DeleteParams::background()),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(Error::Api {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes every object labelled as this deployment's, and its PVCs unless
/// `spec.hub.storage.retainOnDelete`.
async fn cleanup(ed: &EdgeDeployment, ctx: &Context, ns: &str) -> Result<(), Error> {
    let name = ed.name_any();
    let selector = format!(
        "{}={name},{}={MANAGER}",
        names::LABEL_PART_OF,
        names::LABEL_MANAGED_BY
    );
    prune::<StatefulSet>(ctx, ns, "StatefulSet", &selector, &[]).await?;
    prune::<Service>(ctx, ns, "Service", &selector, &[]).await?;
    prune::<Secret>(ctx, ns, "Secret", &selector, &[]).await?;
    // The epoch lives as long as the store volume: a retained store remembers the highest
    // epoch that opened it, and refuses a hub below it.
    let keep_epoch = if ed.spec.hub.storage.retain_on_delete {
        vec![format!("ConfigMap/{}", names::hub_epoch(&name))]
    } else {
        Vec::new()
    };
    prune::<ConfigMap>(ctx, ns, "ConfigMap", &selector, &keep_epoch).await?;
    if !ed.spec.hub.storage.retain_on_delete {
        let pvc_selector = format!("{}={name}", names::LABEL_PART_OF);
        prune::<PersistentVolumeClaim>(ctx, ns, "PersistentVolumeClaim", &pvc_selector, &[])
            .await?;
    }
    tracing::info!(edgedeployment = %key_of(ed), retained_store = ed.spec.hub.storage.retain_on_delete, "cleaned up");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        let got: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(1000), BACKOFF_MAX);
    }

    #[test]
    fn subset_ignores_added_fields_but_not_changed_or_missing_ones() {
        let want = json!({"a": 1, "b": [{"x": 1}], "c": {"d": "e"}});
        assert!(is_subset(
            &want,
            &json!({"a": 1, "b": [{"x": 1, "y": 2}], "c": {"d": "e", "f": 0}, "z": 1})
        ));
        assert!(!is_subset(
            &want,
            &json!({"a": 2, "b": [{"x": 1}], "c": {"d": "e"}})
        ));
        assert!(!is_subset(
            &want,
            &json!({"a": 1, "b": [{"x": 1}, {"x": 2}], "c": {"d": "e"}})
        ));
        assert!(!is_subset(&want, &json!({"a": 1, "b": [{"x": 1}]})));
    }
}
