//! The pure builders: an EdgeDeployment, its manifest and its secret material → every object
//! the controller applies (k8s-design.md's table), as typed k8s-openapi structs.
//!
//! `reconcile` applies exactly these; `edgehub-controller render` prints exactly these (with
//! placeholder secret material). Nothing here talks to the API or reads a clock.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use crate::agent::{self, AgentModule, DesiredStatus, ManifestProblems, ModuleName, RestartPolicy};
use crate::create_options::{self, BindSource, Translated};
use crate::failover::Epoch;
use crate::keys::ModuleKey;
use crate::names::{self, NameError};
use crate::replicas::{MaxReplicas, ANNOTATION_MAX_REPLICAS, LABEL_REPLICATED};
use crate::tls::TlsMaterial;
use crate::types::{AccessMode, EdgeDeployment, ServiceType};

/// The hub's MQTT port.
pub const MQTTS_PORT: i32 = 8883;
/// The hub's AMQP port.
pub const AMQPS_PORT: i32 = 5671;
/// The hub's HTTPS port for direct methods (its `--methods-addr`): the hub runs as a non-root
/// user, which cannot bind 443, so its Service maps [`METHODS_SERVICE_PORT`] to it.
pub const METHODS_PORT: i32 = 8443;
/// The port the SDKs dial for direct methods (`https://{GatewayHostName}:443`), on the Service.
pub const METHODS_SERVICE_PORT: i32 = 443;
/// The hub's HTTP port (`/metrics`, `/readyz`, `/healthz`).
pub const METRICS_PORT: i32 = 9600;
/// The non-root user and group the hub runs as.
pub const HUB_UID: i64 = 65532;
/// Longer than the hub takes to drain (stop accepting, let connections acknowledge what is
/// durable, close the store): IoT Edge's own `ShutdownWaitPeriod` is 60 s.
pub const HUB_TERMINATION_GRACE_SECS: i64 = 90;
/// Where the hub's store volume is mounted.
pub const HUB_DATA_DIR: &str = "/var/lib/edgehub";
/// Where the manifest ConfigMap is mounted in the hub.
pub const HUB_MANIFEST_DIR: &str = "/etc/edgehub/manifest";
/// The manifest ConfigMap's key.
pub const MANIFEST_KEY: &str = "deployment.json";
/// Where the module keys Secret is mounted in the hub.
pub const HUB_KEYS_DIR: &str = "/etc/edgehub/module-keys";
/// Where the TLS Secret is mounted in the hub.
pub const HUB_TLS_DIR: &str = "/etc/edgehub/tls";
/// Where the trust bundle is mounted in modules.
pub const MODULE_TRUST_DIR: &str = "/etc/edgehub/trust";
/// A module's connection-string Secret key.
pub const CONNECTION_STRING_KEY: &str = "connectionString";
/// The size of a volume claim made for a named Docker volume.
pub const NAMED_VOLUME_SIZE: &str = "1Gi";

/// What the controller itself was configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerOptions {
    /// The hub image when `spec.hub.image` is not set.
    pub hub_image: String,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            hub_image: default_hub_image(),
        }
    }
}

/// `localhost/edgehub:<crate version>`.
pub fn default_hub_image() -> String {
    format!("localhost/edgehub:{}", env!("CARGO_PKG_VERSION"))
}

/// The generated (or placeholder) secrets the objects carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMaterial {
    /// The hub's CA and server certificate.
    pub tls: TlsMaterial,
    /// Every module's key.
    pub keys: BTreeMap<ModuleName, ModuleKey>,
}

impl SecretMaterial {
    /// Placeholders for `render`: `<generated: ca.crt>`, `<generated: key of M>`.
    pub fn placeholders(ed: &EdgeDeployment, modules: &[AgentModule]) -> Self {
        Self {
            tls: TlsMaterial::placeholders(&hub_dns_names(ed)),
            keys: modules
                .iter()
                .map(|m| (m.name.clone(), ModuleKey::placeholder(&m.name)))
                .collect(),
        }
    }
}

/// Why objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The manifest has problems (the located messages of `edgehub check-manifest`).
    #[error(transparent)]
    Manifest(#[from] ManifestProblems),
    /// A name cannot become an object name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The EdgeDeployment has no namespace.
    #[error("the EdgeDeployment has no metadata.namespace")]
    NoNamespace,
    /// No key was resolved for a module (a bug of the caller).
    #[error("no key for module {0}")]
    NoKey(String),
}

/// One module's objects.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleObjects {
    /// The module's manifest name.
    pub name: ModuleName,
    /// `D-module-M`.
    pub secret: Secret,
    /// `D-M`.
    pub workload: StatefulSet,
    /// `D-M`, when its createOptions expose ports.
    pub service: Option<Service>,
    /// A replicated module's ceiling (`x-edgehub-replicas.count`, 0 while stopped): its
    /// `workload` then has no `.spec.replicas`, which [`crate::replicas`] decides and the
    /// scale field manager writes.
    pub max_replicas: Option<MaxReplicas>,
}

/// Every object for one EdgeDeployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// `D-hub-tls`.
    pub hub_tls: Secret,
    /// `D-trust-bundle`.
    pub trust_bundle: ConfigMap,
    /// `D-module-keys`.
    pub module_keys: Secret,
    /// `D-manifest`.
    pub manifest: ConfigMap,
    /// `D-hub` Service.
    pub hub_service: Service,
    /// `D-hub` StatefulSet.
    pub hub: StatefulSet,
    /// Per module, in name order.
    pub modules: Vec<ModuleObjects>,
    /// What could not be translated (each names its JSON path): a Degraded condition.
    pub untranslated: Vec<String>,
}

/// Any object the controller applies. (A dozen per deployment: their sizes do not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A Secret.
    Secret(Secret),
    /// A ConfigMap.
    ConfigMap(ConfigMap),
    /// A Service.
    Service(Service),
    /// A StatefulSet.
    StatefulSet(StatefulSet),
}

impl Object {
    /// `Kind/name`.
    pub fn describe(&self) -> String {
        let (kind, meta) = match self {
            Self::Secret(o) => ("Secret", &o.metadata),
            Self::ConfigMap(o) => ("ConfigMap", &o.metadata),
            Self::Service(o) => ("Service", &o.metadata),
            Self::StatefulSet(o) => ("StatefulSet", &o.metadata),
        };
        format!("{kind}/{}", meta.name.as_deref().unwrap_or(""))
    }

    /// The object as JSON, with `apiVersion` and `kind`.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Self::Secret(o) => serde_json::to_value(o),
            Self::ConfigMap(o) => serde_json::to_value(o),
            Self::Service(o) => serde_json::to_value(o),
            Self::StatefulSet(o) => serde_json::to_value(o),
        }
    }
}

impl Desired {
    /// Every object, in the order they are applied: what pods mount first, workloads last.
    pub fn objects(&self) -> Vec<Object> {
        let mut out = vec![
            Object::Secret(self.hub_tls.clone()),
            Object::ConfigMap(self.trust_bundle.clone()),
            Object::Secret(self.module_keys.clone()),
            Object::ConfigMap(self.manifest.clone()),
        ];
        out.extend(
            self.modules
                .iter()
                .map(|m| Object::Secret(m.secret.clone())),
        );
        out.push(Object::Service(self.hub_service.clone()));
        out.extend(
            self.modules
                .iter()
                .filter_map(|m| m.service.clone().map(Object::Service)),
        );
        out.push(Object::StatefulSet(self.hub.clone()));
        out.extend(
            self.modules
                .iter()
                .map(|m| Object::StatefulSet(m.workload.clone())),
        );
        out
    }
}

/// The hub Service's DNS names: the certificate covers these.
pub fn hub_dns_names(ed: &EdgeDeployment) -> Vec<String> {
    let hub = names::hub(&ed.name_any());
    let ns = ed.namespace().unwrap_or_else(|| "default".to_owned());
    vec![
        hub.clone(),
        format!("{hub}.{ns}"),
        format!("{hub}.{ns}.svc"),
        format!("{hub}.{ns}.svc.cluster.local"),
    ]
}

/// The CA's common name for an EdgeDeployment.
pub fn ca_common_name(ed: &EdgeDeployment) -> String {
    format!(
        "edgehub CA ({}/{})",
        ed.namespace().unwrap_or_default(),
        ed.name_any()
    )
}

/// The store epoch offline (`render`): `status.storeEpoch` (the mirror of the ConfigMap
/// `D-hub-epoch`), or 1. Reconcile reads the ConfigMap instead ([`desired_at_epoch`]).
pub fn store_epoch(ed: &EdgeDeployment) -> Epoch {
    ed.status
        .as_ref()
        .and_then(|s| s.store_epoch)
        .and_then(Epoch::new)
        .unwrap_or(Epoch::FIRST)
}

/// Builds every object (see the module docs), the hub at [`store_epoch`].
pub fn desired(
    ed: &EdgeDeployment,
    manifest: &Value,
    secrets: &SecretMaterial,
    opts: &ControllerOptions,
) -> Result<Desired, RenderError> {
    desired_at_epoch(ed, manifest, secrets, opts, store_epoch(ed))
}

/// Builds every object, the hub started with `--epoch epoch`.
pub fn desired_at_epoch(
    ed: &EdgeDeployment,
    manifest: &Value,
    secrets: &SecretMaterial,
    opts: &ControllerOptions,
    epoch: Epoch,
) -> Result<Desired, RenderError> {
    let modules = agent::parse_manifest(manifest)?;
    let d = ed.name_any();
    let ns = ed.namespace().ok_or(RenderError::NoNamespace)?;
    names::check_deployment(&d)?;
    for m in &modules {
        names::check_module_key_name(m.name.as_str())?;
    }
    let b = Builder {
        ed,
        d: &d,
        ns: &ns,
        owner: ed.controller_owner_ref(&()),
        epoch,
    };
    let mut untranslated = Vec::new();
    let mut module_objects = Vec::new();
    for m in &modules {
        let key = secrets
            .keys
            .get(&m.name)
            .ok_or_else(|| RenderError::NoKey(m.name.to_string()))?;
        module_objects.push(b.module(m, key, &mut untranslated)?);
    }
    let manifest_text =
        serde_json::to_string_pretty(manifest).unwrap_or_else(|_| manifest.to_string());
    Ok(Desired {
        hub_tls: b.hub_tls(&secrets.tls),
        trust_bundle: b.config_map(
            names::trust_bundle(&d),
            "hub",
            None,
            [("ca.crt", secrets.tls.ca_crt.clone())],
        ),
        module_keys: b.secret(
            names::module_keys(&d),
            "hub",
            None,
            secrets
                .keys
                .iter()
                .filter(|(m, _)| modules.iter().any(|x| &x.name == *m))
                .map(|(m, k)| (m.to_string(), k.as_str().to_owned())),
            BTreeMap::new(),
        ),
        manifest: b.config_map(
            names::manifest(&d),
            "hub",
            None,
            [(MANIFEST_KEY, manifest_text)],
        ),
        hub_service: b.hub_service(),
        hub: b.hub(opts),
        modules: module_objects,
        untranslated,
    })
}

struct Builder<'a> {
    ed: &'a EdgeDeployment,
    d: &'a str,
    ns: &'a str,
    owner: Option<OwnerReference>,
    epoch: Epoch,
}

impl Builder<'_> {
    fn meta(&self, name: String, component: &str, module: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.ns.to_owned()),
            labels: Some(names::labels(self.d, component, module)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    fn secret(
        &self,
        name: String,
        component: &str,
        module: Option<&str>,
        data: impl IntoIterator<Item = (String, String)>,
        annotations: BTreeMap<String, String>,
    ) -> Secret {
        let mut metadata = self.meta(name, component, module);
        if !annotations.is_empty() {
            metadata.annotations = Some(annotations);
        }
        Secret {
            metadata,
            type_: Some("Opaque".to_owned()),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn config_map<K: Into<String>>(
        &self,
        name: String,
        component: &str,
        module: Option<&str>,
        data: impl IntoIterator<Item = (K, String)>,
    ) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(name, component, module),
            data: Some(data.into_iter().map(|(k, v)| (k.into(), v)).collect()),
            ..ConfigMap::default()
        }
    }

    fn hub_tls(&self, tls: &TlsMaterial) -> Secret {
        self.secret(
            names::hub_tls(self.d),
            "hub",
            None,
            [
                ("ca.crt".to_owned(), tls.ca_crt.clone()),
                ("ca.key".to_owned(), tls.ca_key.clone()),
                ("tls.crt".to_owned(), tls.tls_crt.clone()),
                ("tls.key".to_owned(), tls.tls_key.clone()),
            ],
            tls.annotations(),
        )
    }

    fn hub_service(&self) -> Service {
        let mapped = |name: &str, port: i32, target: i32| ServicePort {
            name: Some(name.to_owned()),
            port,
            target_port: Some(IntOrString::Int(target)),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        };
        let port = |name: &str, port: i32| mapped(name, port, port);
        let type_ = match self.ed.spec.hub.service_type {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        Service {
            metadata: self.meta(names::hub(self.d), "hub", None),
            spec: Some(ServiceSpec {
                type_: Some(type_.to_owned()),
                selector: Some(names::selector(self.d, "hub", None)),
                ports: Some(vec![
                    port("mqtts", MQTTS_PORT),
                    port("amqps", AMQPS_PORT),
                    mapped("https", METHODS_SERVICE_PORT, METHODS_PORT),
                    port("metrics", METRICS_PORT),
                ]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn hub_args(&self) -> Vec<String> {
        let device = &self.ed.spec.device;
        let hub = names::hub(self.d);
        let mut args: Vec<String> = [
            "run",
            "--data-dir",
            HUB_DATA_DIR,
            "--manifest",
            &format!("{HUB_MANIFEST_DIR}/{MANIFEST_KEY}"),
            "--module-keys-dir",
            HUB_KEYS_DIR,
            "--iothub-hostname",
            &device.iothub_hostname,
            "--device-id",
            &device.device_id,
            "--gateway-hostname",
            &hub,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        for name in [
            format!("{hub}.{}", self.ns),
            format!("{hub}.{}.svc", self.ns),
            format!("{hub}.{}.svc.cluster.local", self.ns),
        ] {
            args.push("--hostname".to_owned());
            args.push(name);
        }
        args.extend([
            "--tls-cert".to_owned(),
            format!("{HUB_TLS_DIR}/tls.crt"),
            "--tls-key".to_owned(),
            format!("{HUB_TLS_DIR}/tls.key"),
            "--tls-ca".to_owned(),
            format!("{HUB_TLS_DIR}/ca.crt"),
            "--mqtt-addr".to_owned(),
            format!("0.0.0.0:{MQTTS_PORT}"),
            "--amqp-addr".to_owned(),
            format!("0.0.0.0:{AMQPS_PORT}"),
            "--methods-addr".to_owned(),
            format!("0.0.0.0:{METHODS_PORT}"),
            "--metrics-addr".to_owned(),
            format!("0.0.0.0:{METRICS_PORT}"),
            "--epoch".to_owned(),
            self.epoch.to_string(),
            "--reconfigure".to_owned(),
        ]);
        args
    }

    fn hub(&self, opts: &ControllerOptions) -> StatefulSet {
        let hub = names::hub(self.d);
        let storage = &self.ed.spec.hub.storage;
        let access_mode = match storage.access_mode {
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
        };
        let probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::Int(METRICS_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Probe::default()
        };
        let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
            name: name.to_owned(),
            mount_path: path.to_owned(),
            read_only: Some(read_only),
            ..VolumeMount::default()
        };
        let container = Container {
            name: "hub".to_owned(),
            image: Some(
                self.ed
                    .spec
                    .hub
                    .image
                    .clone()
                    .unwrap_or_else(|| opts.hub_image.clone()),
            ),
            command: Some(vec!["/edgehub".to_owned()]),
            args: Some(self.hub_args()),
            ports: Some(vec![
                container_port("mqtts", MQTTS_PORT, "TCP"),
                container_port("amqps", AMQPS_PORT, "TCP"),
                container_port("https", METHODS_PORT, "TCP"),
                container_port("metrics", METRICS_PORT, "TCP"),
            ]),
            readiness_probe: Some(probe("/readyz")),
            liveness_probe: Some(probe("/healthz")),
            resources: self.ed.spec.hub.resources.clone(),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(HUB_UID),
                run_as_group: Some(HUB_UID),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![
                mount("store", HUB_DATA_DIR, false),
                mount("manifest", HUB_MANIFEST_DIR, true),
                mount("module-keys", HUB_KEYS_DIR, true),
                mount("tls", HUB_TLS_DIR, true),
            ]),
            ..Container::default()
        };
        let tls_items = ["ca.crt", "tls.crt", "tls.key"]
            .into_iter()
            .map(|k| KeyToPath {
                key: k.to_owned(),
                path: k.to_owned(),
                ..KeyToPath::default()
            })
            .collect();
        let volumes = vec![
            Volume {
                name: "manifest".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names::manifest(self.d),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "module-keys".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(names::module_keys(self.d)),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tls".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(names::hub_tls(self.d)),
                    default_mode: Some(0o440),
                    items: Some(tls_items),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        ];
        let selector = names::selector(self.d, "hub", None);
        let pvc = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("store".to_owned()),
                labels: Some(names::labels(self.d, "hub", None)),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![access_mode.to_owned()]),
                storage_class_name: storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(storage.size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        };
        StatefulSet {
            metadata: self.meta(hub.clone(), "hub", None),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(hub),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    ..LabelSelector::default()
                },
                persistent_volume_claim_retention_policy: Some(
                    StatefulSetPersistentVolumeClaimRetentionPolicy {
                        when_deleted: Some("Retain".to_owned()),
                        when_scaled: Some("Retain".to_owned()),
                    },
                ),
                volume_claim_templates: Some(vec![pvc]),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(names::labels(self.d, "hub", None)),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        volumes: Some(volumes),
                        termination_grace_period_seconds: Some(HUB_TERMINATION_GRACE_SECS),
                        automount_service_account_token: Some(false),
                        enable_service_links: Some(false),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(HUB_UID),
                            run_as_group: Some(HUB_UID),
                            fs_group: Some(HUB_UID),
                            ..PodSecurityContext::default()
                        }),
                        ..PodSpec::default()
                    }),
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn module(
        &self,
        m: &AgentModule,
        key: &ModuleKey,
        untranslated: &mut Vec<String>,
    ) -> Result<ModuleObjects, RenderError> {
        let name = m.name.as_str();
        let workload = names::module_workload(self.d, name)?;
        let secret_name = names::module_secret(self.d, name)?;
        let dns = names::dns_module_name(name);
        let device = &self.ed.spec.device;
        let hub = names::hub(self.d);
        let connection_string = format!(
            "HostName={};DeviceId={};ModuleId={name};SharedAccessKey={};GatewayHostName={hub}",
            device.iothub_hostname,
            device.device_id,
            key.as_str()
        );
        let secret = self.secret(
            secret_name.clone(),
            "module",
            Some(name),
            [(CONNECTION_STRING_KEY.to_owned(), connection_string)],
            BTreeMap::new(),
        );

        let t = match &m.create_options {
            Some(o) => create_options::translate(o, &format!("{}.settings.createOptions", m.path)),
            None => Translated::default(),
        };
        untranslated.extend(t.untranslated.iter().cloned());
        if m.restart_policy != RestartPolicy::Always {
            untranslated.push(format!(
                "{}.restartPolicy ({}: a StatefulSet always restarts its pod)",
                m.path,
                m.restart_policy.as_str()
            ));
        }

        // IoT Edge's order: createOptions' Env, then the manifest's env over it; the
        // variables the runtime injects last (a module cannot override its identity).
        let mut env: BTreeMap<String, EnvVar> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut set = |var: EnvVar| {
            if !env.contains_key(&var.name) {
                order.push(var.name.clone());
            }
            env.insert(var.name.clone(), var);
        };
        for (k, v) in t
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(m.env.iter().map(|(k, v)| (k.clone(), v.clone())))
        {
            set(plain_env(&k, &v));
        }
        set(EnvVar {
            name: "EdgeHubConnectionString".to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret_name,
                    key: CONNECTION_STRING_KEY.to_owned(),
                    ..SecretKeySelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
        set(plain_env(
            "EdgeModuleCACertificateFile",
            &format!("{MODULE_TRUST_DIR}/ca.crt"),
        ));
        set(plain_env("IOTEDGE_IOTHUBHOSTNAME", &device.iothub_hostname));
        set(plain_env("IOTEDGE_DEVICEID", &device.device_id));
        set(plain_env("IOTEDGE_MODULEID", name));
        set(plain_env("IOTEDGE_GATEWAYHOSTNAME", &hub));
        set(plain_env("IOTEDGE_AUTHSCHEME", "sasToken"));
        set(plain_env(
            "IOTEDGE_MODULEGENERATIONID",
            &generation_id(self.d, name),
        ));
        let env: Vec<EnvVar> = order.iter().filter_map(|n| env.remove(n)).collect();

        let mut volumes = vec![Volume {
            name: "trust-bundle".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::trust_bundle(self.d),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }];
        let mut mounts = vec![VolumeMount {
            name: "trust-bundle".to_owned(),
            mount_path: MODULE_TRUST_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }];
        let mut claims = Vec::new();
        for (i, bind) in t.binds.iter().enumerate() {
            let volume_name = match &bind.source {
                BindSource::HostPath(path) => {
                    let n = format!("bind-{i}");
                    volumes.push(Volume {
                        name: n.clone(),
                        host_path: Some(HostPathVolumeSource {
                            path: path.clone(),
                            type_: Some("DirectoryOrCreate".to_owned()),
                        }),
                        ..Volume::default()
                    });
                    n
                }
                BindSource::Named(volume) => {
                    let n = format!("vol-{volume}");
                    claims.push(PersistentVolumeClaim {
                        metadata: ObjectMeta {
                            name: Some(n.clone()),
                            labels: Some(names::labels(self.d, "module", Some(name))),
                            ..ObjectMeta::default()
                        },
                        spec: Some(PersistentVolumeClaimSpec {
                            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                            resources: Some(VolumeResourceRequirements {
                                requests: Some(BTreeMap::from([(
                                    "storage".to_owned(),
                                    Quantity(NAMED_VOLUME_SIZE.to_owned()),
                                )])),
                                ..VolumeResourceRequirements::default()
                            }),
                            ..PersistentVolumeClaimSpec::default()
                        }),
                        ..PersistentVolumeClaim::default()
                    });
                    n
                }
            };
            mounts.push(VolumeMount {
                name: volume_name,
                mount_path: bind.container_path.clone(),
                read_only: Some(bind.read_only),
                ..VolumeMount::default()
            });
        }

        let mut pod_labels = t.labels.clone();
        pod_labels.extend(names::labels(self.d, "module", Some(name)));
        let container = Container {
            name: dns.clone(),
            image: Some(m.image.clone()),
            command: t.command.clone(),
            args: t.args.clone(),
            env: Some(env),
            ports: (!t.ports.is_empty()).then(|| {
                t.ports
                    .iter()
                    .map(|p| ContainerPort {
                        container_port: i32::from(p.container_port),
                        protocol: Some(p.protocol.as_k8s().to_owned()),
                        ..ContainerPort::default()
                    })
                    .collect()
            }),
            volume_mounts: Some(mounts),
            ..Container::default()
        };
        // A replicated module: every pod runs with the module's identity unmodified (the hub
        // makes each connection a member, up to the count); its replicas are not applied here
        // (see `crate::replicas`), and a killed pod comes back without waiting for the others.
        let max_replicas = m.replicas.map(|count| MaxReplicas::of(count, m.status));
        let mut metadata = self.meta(workload.clone(), "module", Some(name));
        if let Some(max) = max_replicas {
            metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(LABEL_REPLICATED.to_owned(), "true".to_owned());
            metadata.annotations = Some(BTreeMap::from([(
                ANNOTATION_MAX_REPLICAS.to_owned(),
                max.to_string(),
            )]));
        }
        let statefulset = StatefulSet {
            metadata,
            spec: Some(StatefulSetSpec {
                replicas: match (max_replicas, m.status) {
                    (Some(_), _) => None,
                    (None, DesiredStatus::Running) => Some(1),
                    (None, DesiredStatus::Stopped) => Some(0),
                },
                // Immutable once created, so always given (a field the main manager stopped
                // applying would be removed, defaulted, and refused): reconcile recreates the
                // StatefulSet (pods orphaned and adopted) when a module becomes replicated or
                // stops being so.
                pod_management_policy: Some(
                    pod_management_policy(max_replicas.is_some()).to_owned(),
                ),
                service_name: Some(workload.clone()),
                selector: LabelSelector {
                    match_labels: Some(names::selector(self.d, "module", Some(name))),
                    ..LabelSelector::default()
                },
                volume_claim_templates: (!claims.is_empty()).then_some(claims),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        volumes: Some(volumes),
                        automount_service_account_token: Some(false),
                        enable_service_links: Some(false),
                        ..PodSpec::default()
                    }),
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        };
        let service = (!t.ports.is_empty()).then(|| Service {
            metadata: self.meta(workload.clone(), "module", Some(name)),
            spec: Some(ServiceSpec {
                selector: Some(names::selector(self.d, "module", Some(name))),
                ports: Some(
                    t.ports
                        .iter()
                        .map(|p| ServicePort {
                            name: Some(format!(
                                "{}-{}",
                                p.protocol.as_k8s().to_ascii_lowercase(),
                                p.container_port
                            )),
                            port: i32::from(p.service_port),
                            target_port: Some(IntOrString::Int(i32::from(p.container_port))),
                            protocol: Some(p.protocol.as_k8s().to_owned()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        });
        Ok(ModuleObjects {
            name: m.name.clone(),
            secret,
            workload: statefulset,
            service,
            max_replicas,
        })
    }
}

/// A module StatefulSet's `podManagementPolicy`: `Parallel` for a replicated module (a replica
/// killed or scaled up starts without waiting for the ones before it), else Kubernetes' default.
pub fn pod_management_policy(replicated: bool) -> &'static str {
    if replicated {
        "Parallel"
    } else {
        "OrderedReady"
    }
}

fn container_port(name: &str, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some(protocol.to_owned()),
        ..ContainerPort::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

/// A stable `IOTEDGE_MODULEGENERATIONID`: derived from the deployment and module names, so it
/// changes only when the module is a different one.
fn generation_id(deployment: &str, module: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{deployment}/{module}").as_bytes(),
    );
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
