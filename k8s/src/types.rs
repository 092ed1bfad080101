//! The `EdgeDeployment` custom resource: what a user writes (`spec`) and what the controller
//! reports (`status`). The CRD in the chart (`k8s/chart/edgehub/crds/`) is generated from these
//! types (`edgehub-controller crd`); a test fails when the two differ.
//!
//! ```yaml
//! apiVersion: edgehub.io/v1alpha1
//! kind: EdgeDeployment
//! metadata: { name: line3, namespace: factory }
//! spec:
//!   manifest:
//!     inline: { modulesContent: { $edgeAgent: …, $edgeHub: … } }   # or configMapKeyRef
//!   device: { iothubHostname: contoso.azure-devices.net, deviceId: line3 }
//!   hub: { storage: { size: 1Gi } }
//! ```

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An IoT Edge deployment, run on Kubernetes: one hub and the manifest's modules.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    derive = "Default",
    group = "edgehub.io",
    version = "v1alpha1",
    kind = "EdgeDeployment",
    namespaced,
    status = "EdgeDeploymentStatus",
    shortname = "edep",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.storeEpoch"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentSpec {
    /// The IoT Edge deployment manifest, exactly as `az iot edge set-modules` takes it.
    pub manifest: ManifestSource,
    /// The IoT Hub device this deployment is.
    pub device: DeviceSpec,
    /// How the hub runs.
    #[serde(default)]
    pub hub: HubSpec,
}

/// Where the deployment manifest comes from: exactly one of `inline` and `configMapKeyRef`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSource {
    /// The manifest itself (a JSON object with `modulesContent`, or `content.modulesContent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub inline: Option<serde_json::Value>,
    /// A key of a ConfigMap in the EdgeDeployment's namespace holding the manifest's JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKey>,
}

/// One key of one ConfigMap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigMapKey {
    /// The ConfigMap's name.
    pub name: String,
    /// The key.
    pub key: String,
}

/// The IoT Hub identity of the device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// IoT Hub's host name, e.g. `contoso.azure-devices.net`.
    pub iothub_hostname: String,
    /// The device id.
    pub device_id: String,
    /// A Secret holding the module keys IoT Hub issued: one key per module, named after the
    /// module, holding its base64 key. Modules without a key here get one minted once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,
}

/// How the hub runs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HubSpec {
    /// The hub's image [default: the controller's `--hub-image`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The hub's store volume.
    #[serde(default)]
    pub storage: StorageSpec,
    /// CPU and memory for the hub container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The type of the hub's Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// What the controller does when the hub pod's node is lost (opt-in).
    #[serde(default)]
    pub node_loss: NodeLossSpec,
}

/// The node-loss policy: when the hub pod's node has been NotReady (or Unknown) for
/// `notReadyAfter`, or carries the `node.kubernetes.io/out-of-service` taint, the controller
/// bumps the store epoch and then force-deletes the hub pod, so the StatefulSet recreates it
/// on another node at the new epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLossSpec {
    /// Never (Kubernetes' own behaviour: the pod waits for its node or a human) or
    /// ForceDeletePod.
    #[serde(default)]
    pub policy: NodeLossPolicy,
    /// How long the node must be NotReady or Unknown before the controller acts: a number
    /// and a unit, `s`, `m` or `h` (e.g. `60s`, `2m`). The out-of-service taint acts at once.
    #[serde(default = "default_not_ready_after")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(s|m|h)$"))]
    pub not_ready_after: String,
}

impl Default for NodeLossSpec {
    fn default() -> Self {
        Self {
            policy: NodeLossPolicy::default(),
            not_ready_after: default_not_ready_after(),
        }
    }
}

/// What to do when the hub pod's node is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum NodeLossPolicy {
    /// Nothing: the pod stays Terminating until its node comes back, is deleted, or someone
    /// force-deletes it.
    #[default]
    Never,
    /// Bump the store epoch, then force-delete the hub pod (grace 0), once per loss.
    ForceDeletePod,
}

/// The hub's store volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// The volume's size, as a Kubernetes quantity.
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// The StorageClass [default: the cluster's default class]. Choose one that replicates
    /// (the hub's volume must survive its node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// The volume's access mode. ReadWriteOncePod lets exactly one pod mount the store.
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Keep the volume when the EdgeDeployment is deleted (the hub's queued messages).
    #[serde(default = "yes")]
    pub retain_on_delete: bool,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            access_mode: AccessMode::default(),
            retain_on_delete: true,
        }
    }
}

/// A PersistentVolumeClaim access mode the hub's store can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum AccessMode {
    /// One pod at a time (Kubernetes 1.29+).
    #[default]
    ReadWriteOncePod,
    /// One node at a time (for storage drivers without ReadWriteOncePod).
    ReadWriteOnce,
}

/// A Kubernetes Service type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on every node's port.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

/// What the controller reports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, HubReady, ModulesReady, Degraded: each with a reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Each `$edgeAgent` module's phase.
    #[serde(default)]
    pub modules: Vec<ModuleStatus>,
    /// The epoch the hub's store runs at (fences a stale hub): the ConfigMap `D-hub-epoch`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_epoch: Option<u64>,
    /// The last failover the node-loss policy made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<LastFailover>,
}

/// One failover made by the node-loss policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastFailover {
    /// When the controller bumped the epoch (RFC 3339).
    pub at: String,
    /// The node the hub pod was lost with.
    pub from_node: String,
    /// The epoch the new hub pod runs at.
    pub epoch: u64,
    /// NodeNotReady, NodeUnknown, NodeOutOfService or NodeDeleted.
    pub reason: String,
    /// How long the node had been NotReady or Unknown when the controller acted, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_for_seconds: Option<u64>,
    /// The uid of the hub pod that was force-deleted.
    pub pod_uid: String,
}

/// A status condition, as Kubernetes API conventions describe them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, HubReady, ModulesReady or Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// For people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One module's phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    /// The module's name in the manifest.
    pub name: String,
    /// Pending, Running, Stopped or Failed.
    pub phase: String,
    /// Why, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

fn default_storage_size() -> String {
    "1Gi".to_owned()
}

fn default_not_ready_after() -> String {
    "60s".to_owned()
}

fn yes() -> bool {
    true
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}
