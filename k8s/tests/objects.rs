//! The objects `desired` builds match k8s-design.md field by field.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s::agent::ModuleName;
use k8s::desired::{desired, ControllerOptions, Desired, SecretMaterial};
use k8s::keys::ModuleKey;
use k8s::tls::TlsMaterial;
use k8s::types::EdgeDeployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, EnvVar, Secret, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

fn example(name: &str) -> EdgeDeployment {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example");
    let mut ed: EdgeDeployment = serde_yaml::from_str(&text).expect("an EdgeDeployment");
    ed.metadata.uid = Some("0b6f-uid".to_owned());
    ed
}

fn material(modules: &[&str]) -> SecretMaterial {
    SecretMaterial {
        tls: TlsMaterial {
            ca_crt: "CA-CRT".into(),
            ca_key: "CA-KEY".into(),
            tls_crt: "TLS-CRT".into(),
            tls_key: "TLS-KEY".into(),
            names: vec!["n".into()],
            not_after: 42,
        },
        keys: modules
            .iter()
            .map(|m| {
                let key =
                    ModuleKey::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").expect("key");
                (ModuleName::new(*m), key)
            })
            .collect(),
    }
}

fn build(ed: &EdgeDeployment, modules: &[&str]) -> Desired {
    let manifest = ed.spec.manifest.inline.clone().expect("inline manifest");
    desired(
        ed,
        &manifest,
        &material(modules),
        &ControllerOptions {
            hub_image: "localhost/edgehub:test".into(),
        },
    )
    .expect("objects")
}

fn labels(d: &str, component: &str, module: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "edgehub-controller".to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), d.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
    ]);
    if let Some(m) = module {
        l.insert("edgehub.io/module".to_owned(), m.to_owned());
    }
    l
}

fn secret_text(s: &Secret, key: &str) -> String {
    let data = s.data.as_ref().expect("data");
    String::from_utf8(
        data.get(key)
            .unwrap_or_else(|| panic!("no {key}"))
            .0
            .clone(),
    )
    .expect("utf8")
}

fn container(s: &StatefulSet) -> &Container {
    &s.spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0]
}

fn volumes(s: &StatefulSet) -> &[Volume] {
    s.spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod")
        .volumes
        .as_deref()
        .expect("volumes")
}

fn env(c: &Container, name: &str) -> EnvVar {
    c.env
        .as_ref()
        .expect("env")
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no env {name}"))
        .clone()
}

#[test]
fn every_object_is_named_labelled_and_owned_as_the_design_says() {
    let ed = example("two-modules.yaml");
    let d = build(&ed, &["SimulatedTemperatureSensor", "archiver", "filter"]);
    let kinds: Vec<String> = d.objects().iter().map(|o| o.describe()).collect();
    let sts = "line2-simulatedtemperaturesensor-c0c65d";
    assert_eq!(
        kinds,
        [
            "Secret/line2-hub-tls".to_owned(),
            "ConfigMap/line2-trust-bundle".into(),
            "Secret/line2-module-keys".into(),
            "ConfigMap/line2-manifest".into(),
            "Secret/line2-module-simulatedtemperaturesensor-c0c65d".into(),
            "Secret/line2-module-archiver".into(),
            "Secret/line2-module-filter".into(),
            "Service/line2-hub".into(),
            "Service/line2-filter".into(),
            "StatefulSet/line2-hub".into(),
            format!("StatefulSet/{sts}"),
            "StatefulSet/line2-archiver".into(),
            "StatefulSet/line2-filter".into(),
        ]
    );
    for o in d.objects() {
        let v = o.to_value().expect("json");
        let meta = &v["metadata"];
        assert_eq!(meta["namespace"], "factory", "{}", o.describe());
        let owner = &meta["ownerReferences"][0];
        assert_eq!(owner["kind"], "EdgeDeployment");
        assert_eq!(owner["apiVersion"], "edgehub.io/v1alpha1");
        assert_eq!(owner["name"], "line2");
        assert_eq!(owner["uid"], "0b6f-uid");
        assert_eq!(owner["controller"], true);
        let l: BTreeMap<String, String> =
            serde_json::from_value(meta["labels"].clone()).expect("labels");
        let module = l.get("edgehub.io/module").cloned();
        let component = if module.is_some() { "module" } else { "hub" };
        assert_eq!(
            l,
            labels("line2", component, module.as_deref()),
            "{}",
            o.describe()
        );
    }
}

#[test]
fn the_hub_statefulset_service_and_its_secrets() {
    let ed = example("two-modules.yaml");
    let d = build(&ed, &["SimulatedTemperatureSensor", "archiver", "filter"]);

    // Secrets and ConfigMaps.
    for (k, v) in [
        ("ca.crt", "CA-CRT"),
        ("ca.key", "CA-KEY"),
        ("tls.crt", "TLS-CRT"),
        ("tls.key", "TLS-KEY"),
    ] {
        assert_eq!(secret_text(&d.hub_tls, k), v);
    }
    assert_eq!(
        d.trust_bundle
            .data
            .as_ref()
            .expect("data")
            .get("ca.crt")
            .map(String::as_str),
        Some("CA-CRT")
    );
    let keys = d.module_keys.data.as_ref().expect("keys");
    assert_eq!(
        keys.keys().cloned().collect::<Vec<_>>(),
        ["SimulatedTemperatureSensor", "archiver", "filter"]
    );
    let manifest: Value = serde_json::from_str(
        d.manifest
            .data
            .as_ref()
            .expect("data")
            .get("deployment.json")
            .expect("deployment.json"),
    )
    .expect("manifest JSON");
    assert_eq!(Some(&manifest), ed.spec.manifest.inline.as_ref());
    assert_eq!(
        secret_text(&d.modules[2].secret, "connectionString"),
        "HostName=contoso.azure-devices.net;DeviceId=line2;ModuleId=filter;\
         SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=;GatewayHostName=line2-hub"
    );

    // Service.
    let svc = d.hub_service.spec.as_ref().expect("spec");
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    let ports: Vec<(String, i32, Option<IntOrString>)> = svc
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port,
                p.target_port.clone(),
            )
        })
        .collect();
    // The SDKs call direct methods on https://{GatewayHostName}:443; the non-root hub listens
    // on 8443 (its --methods-addr below).
    assert_eq!(
        ports,
        [
            ("mqtts".into(), 8883, Some(IntOrString::Int(8883))),
            ("amqps".into(), 5671, Some(IntOrString::Int(5671))),
            ("https".into(), 443, Some(IntOrString::Int(8443))),
            ("metrics".into(), 9600, Some(IntOrString::Int(9600)))
        ]
    );
    assert_eq!(
        svc.selector,
        Some(BTreeMap::from([
            ("app.kubernetes.io/part-of".to_owned(), "line2".to_owned()),
            ("app.kubernetes.io/component".to_owned(), "hub".to_owned()),
        ]))
    );

    // StatefulSet.
    let spec = d.hub.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("line2-hub"));
    assert_eq!(spec.selector.match_labels, svc.selector);
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .expect("retention");
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
    let pvc = &spec.volume_claim_templates.as_ref().expect("pvc")[0];
    assert_eq!(pvc.metadata.name.as_deref(), Some("store"));
    let pvc_spec = pvc.spec.as_ref().expect("pvc spec");
    assert_eq!(
        pvc_spec.access_modes,
        Some(vec!["ReadWriteOncePod".to_owned()])
    );
    assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("replicated"));
    assert_eq!(
        pvc_spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.as_str()),
        Some("5Gi")
    );

    let pod = spec.template.spec.as_ref().expect("pod");
    assert!(pod.termination_grace_period_seconds.expect("grace") > 60);
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
        (Some(true), Some(65532), Some(65532))
    );
    let c = container(&d.hub);
    assert_eq!(c.image.as_deref(), Some("localhost/edgehub:test"));
    assert_eq!(c.command, Some(vec!["/edgehub".to_owned()]));
    let args = c.args.as_ref().expect("args").join(" ");
    assert_eq!(
        args,
        "run --data-dir /var/lib/edgehub --manifest /etc/edgehub/manifest/deployment.json \
         --module-keys-dir /etc/edgehub/module-keys --iothub-hostname contoso.azure-devices.net \
         --device-id line2 --gateway-hostname line2-hub --hostname line2-hub.factory \
         --hostname line2-hub.factory.svc --hostname line2-hub.factory.svc.cluster.local \
         --tls-cert /etc/edgehub/tls/tls.crt --tls-key /etc/edgehub/tls/tls.key \
         --tls-ca /etc/edgehub/tls/ca.crt --mqtt-addr 0.0.0.0:8883 --amqp-addr 0.0.0.0:5671 \
         --methods-addr 0.0.0.0:8443 --metrics-addr 0.0.0.0:9600 --epoch 1 --reconfigure"
    );
    let csc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(csc.read_only_root_filesystem, Some(true));
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(csc.run_as_non_root, Some(true));
    assert_eq!(
        csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9600)
        );
    }
    let mounts: Vec<(String, String, Option<String>)> = c
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.sub_path.clone()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("store".into(), "/var/lib/edgehub".into(), None),
            ("manifest".into(), "/etc/edgehub/manifest".into(), None),
            (
                "module-keys".into(),
                "/etc/edgehub/module-keys".into(),
                None
            ),
            ("tls".into(), "/etc/edgehub/tls".into(), None),
        ]
    );
    let vols = volumes(&d.hub);
    assert_eq!(
        vols[0].config_map.as_ref().map(|c| c.name.as_str()),
        Some("line2-manifest")
    );
    assert_eq!(
        vols[1]
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("line2-module-keys")
    );
    let tls = vols[2].secret.as_ref().expect("tls secret volume");
    assert_eq!(tls.secret_name.as_deref(), Some("line2-hub-tls"));
    let items: Vec<&str> = tls
        .items
        .as_ref()
        .expect("items")
        .iter()
        .map(|i| i.key.as_str())
        .collect();
    assert_eq!(
        items,
        ["ca.crt", "tls.crt", "tls.key"],
        "ca.key is never mounted"
    );
}

#[test]
fn a_module_statefulset_carries_iot_edge_env_its_own_secret_and_translated_options() {
    let ed = example("two-modules.yaml");
    let d = build(&ed, &["SimulatedTemperatureSensor", "archiver", "filter"]);
    assert!(d.untranslated.is_empty(), "{:?}", d.untranslated);
    let filter = &d.modules[2];
    assert_eq!(filter.name.as_str(), "filter");
    let spec = filter.workload.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("line2-filter"));
    let c = container(&filter.workload);
    assert_eq!(c.image.as_deref(), Some("example.com/filter:2.1"));
    assert_eq!(c.command, Some(vec!["/app/filter".to_owned()]));
    assert_eq!(
        c.args,
        Some(vec!["--threshold".to_owned(), "25".to_owned()])
    );
    let cs = env(c, "EdgeHubConnectionString");
    let sel = cs
        .value_from
        .and_then(|v| v.secret_key_ref)
        .expect("secretKeyRef");
    assert_eq!(
        (sel.name.as_str(), sel.key.as_str()),
        ("line2-module-filter", "connectionString")
    );
    for (name, value) in [
        ("EdgeModuleCACertificateFile", "/etc/edgehub/trust/ca.crt"),
        ("IOTEDGE_IOTHUBHOSTNAME", "contoso.azure-devices.net"),
        ("IOTEDGE_DEVICEID", "line2"),
        ("IOTEDGE_MODULEID", "filter"),
        ("IOTEDGE_GATEWAYHOSTNAME", "line2-hub"),
        ("IOTEDGE_AUTHSCHEME", "sasToken"),
    ] {
        assert_eq!(env(c, name).value.as_deref(), Some(value), "{name}");
    }
    let gen = env(c, "IOTEDGE_MODULEGENERATIONID")
        .value
        .expect("generation id");
    assert!(!gen.is_empty());
    assert!(
        c.env
            .as_ref()
            .expect("env")
            .iter()
            .all(|e| e.name != "IOTEDGE_WORKLOADURI"),
        "IOTEDGE_WORKLOADURI must stay unset so the SDKs use EdgeHubConnectionString"
    );
    // The trust bundle, and the binds: a hostPath and a claim template for the named volume.
    let mounts: Vec<(String, String, Option<bool>)> = c
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            (
                "trust-bundle".into(),
                "/etc/edgehub/trust".into(),
                Some(true)
            ),
            ("bind-0".into(), "/data".into(), Some(false)),
            ("vol-cache".into(), "/cache".into(), Some(true)),
        ]
    );
    let vols = volumes(&filter.workload);
    assert_eq!(
        vols[0].config_map.as_ref().map(|c| c.name.as_str()),
        Some("line2-trust-bundle")
    );
    assert_eq!(
        vols[1].host_path.as_ref().map(|h| h.path.as_str()),
        Some("/var/lib/filter")
    );
    let claims = spec.volume_claim_templates.as_ref().expect("claims");
    assert_eq!(claims[0].metadata.name.as_deref(), Some("vol-cache"));
    // Ports: container 8080, Service 80 → 8080.
    let svc = filter
        .service
        .as_ref()
        .expect("service")
        .spec
        .as_ref()
        .expect("spec");
    let p = &svc.ports.as_ref().expect("ports")[0];
    assert_eq!(
        (p.port, p.target_port.clone()),
        (
            80,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
        )
    );
    assert_eq!(c.ports.as_ref().expect("ports")[0].container_port, 8080);

    // The sensor: manifest env over createOptions' Env; createOptions labels on the pod.
    let sensor = &d.modules[0];
    let c = container(&sensor.workload);
    assert_eq!(env(c, "SendInterval").value.as_deref(), Some("5"));
    assert_eq!(env(c, "MessageCount").value.as_deref(), Some("-1"));
    let pod_labels = sensor
        .workload
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.as_ref())
        .expect("labels");
    assert_eq!(
        pod_labels.get("example.com/tier").map(String::as_str),
        Some("edge")
    );
    assert!(sensor.service.is_none(), "no ports, no Service");

    // Stopped: replicas 0.
    assert_eq!(
        d.modules[1].workload.spec.as_ref().and_then(|s| s.replicas),
        Some(0)
    );
}

#[test]
fn a_module_sees_only_its_own_key() {
    let ed = example("two-modules.yaml");
    let d = build(&ed, &["SimulatedTemperatureSensor", "archiver", "filter"]);
    for m in &d.modules {
        let pod = m
            .workload
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let secrets: Vec<String> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
            .chain(
                pod.containers
                    .iter()
                    .flat_map(|c| c.env.iter().flatten())
                    .filter_map(|e| {
                        e.value_from
                            .as_ref()
                            .and_then(|v| v.secret_key_ref.as_ref())
                            .map(|s| s.name.clone())
                    }),
            )
            .collect();
        assert_eq!(secrets, [m.secret.metadata.name.clone().expect("name")]);
        assert_eq!(pod.automount_service_account_token, Some(false));
    }
}

#[test]
fn untranslated_create_options_and_restart_policies_are_named() {
    let mut ed = example("minimal.yaml");
    let manifest = ed.spec.manifest.inline.as_mut().expect("inline");
    let sensor =
        &mut manifest["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["sensor"];
    sensor["settings"]["createOptions"] =
        Value::String(r#"{"HostConfig":{"Privileged":true}}"#.into());
    sensor["restartPolicy"] = Value::String("never".into());
    let d = build(&ed, &["sensor"]);
    let base = "modulesContent.$edgeAgent.properties.desired.modules.sensor";
    assert_eq!(
        d.untranslated,
        [
            format!("{base}.settings.createOptions.HostConfig.Privileged"),
            format!("{base}.restartPolicy (never: a StatefulSet always restarts its pod)"),
        ]
    );
}

#[test]
fn storage_defaults_to_one_gibibyte_rwop_in_the_default_class() {
    let ed = example("minimal.yaml");
    let d = build(&ed, &["sensor"]);
    let pvc = d
        .hub
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .expect("pvc")[0]
        .spec
        .clone()
        .expect("spec");
    assert_eq!(pvc.access_modes, Some(vec!["ReadWriteOncePod".to_owned()]));
    assert_eq!(pvc.storage_class_name, None);
    assert_eq!(
        pvc.resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned())
            .map(|q| q.0),
        Some("1Gi".to_owned())
    );
    assert_eq!(
        d.hub_service.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("ClusterIP")
    );
}

/// A replicated module (examples/replicated.yaml: `filter`, count 3) and a singleton (`sensor`)
/// side by side: the same pod with the module's identity unmodified, marked replicated,
/// Parallel, and no `.spec.replicas` in the main apply (the scale field manager's).
#[test]
fn a_replicated_module_is_a_parallel_statefulset_marked_with_its_ceiling_and_no_replicas() {
    let ed = example("replicated.yaml");
    let d = build(&ed, &["filter", "sensor"]);
    let (filter, sensor) = (&d.modules[0], &d.modules[1]);
    assert_eq!(
        (filter.name.as_str(), sensor.name.as_str()),
        ("filter", "sensor")
    );

    let spec = filter.workload.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, None, "the scale field manager's field");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(filter.max_replicas.map(|m| m.replicas()), Some(3));
    let meta = &filter.workload.metadata;
    let mut want_labels = labels("line4", "module", Some("filter"));
    want_labels.insert("edgehub.io/replicated".into(), "true".into());
    assert_eq!(meta.labels.as_ref(), Some(&want_labels));
    assert_eq!(
        meta.annotations.as_ref(),
        Some(&BTreeMap::from([(
            "edgehub.io/max-replicas".to_owned(),
            "3".to_owned()
        )]))
    );
    // The selector and pod labels are a singleton's: a module can become replicated without a
    // new selector (immutable) and its pods are adopted.
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        Some(&{
            let mut l = labels("line4", "module", Some("filter"));
            l.remove("app.kubernetes.io/managed-by");
            l
        })
    );
    let c = container(&filter.workload);
    assert_eq!(env(c, "IOTEDGE_MODULEID").value.as_deref(), Some("filter"));
    let cs = env(c, "EdgeHubConnectionString")
        .value_from
        .and_then(|v| v.secret_key_ref)
        .expect("secretKeyRef");
    assert_eq!(cs.name, "line4-module-filter");
    assert!(secret_text(&filter.secret, "connectionString").contains(";ModuleId=filter;"));

    // The singleton beside it: as before, with the default policy given explicitly.
    let spec = sensor.workload.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    assert_eq!(sensor.max_replicas, None);
    assert_eq!(
        sensor.workload.metadata.labels.as_ref(),
        Some(&labels("line4", "module", Some("sensor")))
    );
    assert_eq!(sensor.workload.metadata.annotations, None);
}

/// The same module replicated and not: the pod templates are equal, so only the StatefulSet's
/// own fields differ; stopped, the ceiling is 0.
#[test]
fn replication_changes_only_the_statefulsets_own_fields_and_stopped_means_a_ceiling_of_zero() {
    let replicated = example("replicated.yaml");
    let mut single = replicated.clone();
    let mut stopped = replicated.clone();
    module_entry(&mut single, "filter")
        .as_object_mut()
        .expect("module")
        .remove("x-edgehub-replicas");
    module_entry(&mut stopped, "filter")["status"] = "stopped".into();
    let keys = ["filter", "sensor"];
    let (r, s, x) = (
        build(&replicated, &keys),
        build(&single, &keys),
        build(&stopped, &keys),
    );
    let template = |d: &Desired| {
        serde_json::to_value(&d.modules[0].workload.spec.as_ref().expect("spec").template)
            .expect("json")
    };
    assert_eq!(template(&r), template(&s));
    assert_eq!(s.modules[0].max_replicas, None);
    assert_eq!(
        s.modules[0].workload.spec.as_ref().and_then(|s| s.replicas),
        Some(1)
    );
    assert_eq!(x.modules[0].max_replicas.map(|m| m.replicas()), Some(0));
    assert_eq!(
        x.modules[0]
            .workload
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("edgehub.io/max-replicas"))
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(
        x.modules[0].workload.spec.as_ref().and_then(|s| s.replicas),
        None
    );
}

fn module_entry<'a>(ed: &'a mut EdgeDeployment, module: &str) -> &'a mut Value {
    &mut ed.spec.manifest.inline.as_mut().expect("inline")["modulesContent"]["$edgeAgent"]
        ["properties.desired"]["modules"][module]
}
