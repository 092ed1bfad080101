//! The controller's own pod specs run for real (issue 14, "Images that run"). For an
//! EdgeDeployment with a sender and a receiver module, the objects `edgehub-controller render
//! --generate-secrets` prints (the same `k8s::render` path the binary runs, over the builders
//! reconcile applies) are taken as they are:
//!
//! - the hub StatefulSet's pod template, with its manifest ConfigMap, its Secrets and its PVC,
//!   is started with `podman kube play` as a Pod (podman 4.3 ignores StatefulSets), converted
//!   by [`pod_from_statefulset`] and nothing else (a check below compares the played pod and
//!   podman's running container with the rendered template);
//! - the receiver module's pod spec is played too, with a module image the test builds
//!   (`FROM scratch`: Debian's python3.11, the pinned SDK from scripts/install-sdks.sh's venv,
//!   the harness scripts; about 85 MB, once per change of those, see [`sdk_image`]), its
//!   trust-bundle ConfigMap mounted by podman, its Secret reference given as a value (podman
//!   4.3 cannot resolve one) and a host alias for the hub Service's name ([`module_pod`]);
//! - the sender module's pod spec is run as a host process with exactly that pod's
//!   environment (`env -i`, its Secret reference resolved) and its mounted ConfigMap files at
//!   their mount paths (a private mount namespace lays them over /etc); its command and args
//!   are the rendered ones ([`module_process`]).
//!
//! Both modules build their clients with `create_from_edge_environment()` from that
//! environment alone (the rendered createOptions run the harness with `--edge-env`).
//!
//! The pair sends N messages through the played hub; the receiver gets all of them, in order,
//! intact. That proves the rendered command and args, the mounts (store PVC, manifest
//! ConfigMap, keys and TLS Secrets with their modes and fsGroup), the ports (published by
//! podman from the pod's `containerPort`s), the probe paths and the module environment, not
//! only the YAML's schema. Not proven: kubelet behaviour (podman stands in; it ignores the
//! readiness probe and cannot run the liveness one without systemd, so the test GETs both
//! paths itself), Service DNS (a host alias or hosts entry maps the Service name to the hub
//! pod's published ports), the StatefulSet controller, any API server.
//!
//! Needs root (network namespaces, mounts, podman) and the SDKs; podman is installed with apt
//! if missing, and the test is skipped with a SKIP line only if it cannot be.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/podman.rs"]
mod podman;
#[path = "support/sdk.rs"]
mod sdk;
#[path = "support/hub.rs"]
mod testhub;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podman::{Image, Podman};
use sdk::{NetNs, SdkEnv, SeqReport};
use serde::Deserialize as _;
use serde_json::{json, Value};
use testhub::{DEVICE_ID, IOTHUB_HOSTNAME};

/// Messages the sender sends.
const N: i64 = 100;
/// The sender's run id (message ids, custom property `run`).
const RUN: &str = "kubeplay";
/// The group the hub's pod runs as (`fsGroup` in the rendered pod spec is checked against it).
const HUB_GID: u32 = 65532;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A deployment name no other test run uses (it names every object, the played ConfigMap's
/// podman volume included), short enough for every derived name.
fn unique_deployment() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("kp{:x}{:04x}", std::process::id() & 0xfffff, nanos & 0xffff)
}

/// The EdgeDeployment: modules `sender` and `receiver` whose createOptions run the SDK harness
/// scripts from the module environment (`--edge-env`), and a route sender → receiver/input1.
/// The IoT Hub host name is the hub's placeholder default: no cloud here, upstream stays off.
fn edge_deployment(name: &str, module_image: &str) -> Value {
    let mut sender_cmd: Vec<String> = [
        "--edge-env",
        "--output",
        "out1",
        "--run",
        RUN,
        "--count",
        &N.to_string(),
        "--timeout",
        "150",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    sender_cmd.extend(testhub::prop_args());
    let module = |entrypoint: Value, cmd: Value| {
        json!({
            "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
            "settings": {
                "image": module_image,
                "createOptions": json!({"Entrypoint": entrypoint, "Cmd": cmd}).to_string(),
            }
        })
    };
    json!({
        "apiVersion": "edgehub.io/v1alpha1",
        "kind": "EdgeDeployment",
        "metadata": {"name": name, "namespace": "edge"},
        "spec": {
            "device": {"iothubHostname": IOTHUB_HOSTNAME, "deviceId": DEVICE_ID},
            "manifest": {"inline": {"modulesContent": {
                "$edgeAgent": {"properties.desired": {
                    "schemaVersion": "1.1",
                    "runtime": {"type": "docker", "settings": {}},
                    "systemModules": {},
                    "modules": {
                        "sender": module(json!(["python3", "send.py"]), json!(sender_cmd)),
                        "receiver": module(
                            json!(["python3", "receive.py"]),
                            json!(["--edge-env", "--timeout", "170"]),
                        ),
                    }
                }},
                "$edgeHub": {"properties.desired": {
                    "schemaVersion": "1.1",
                    "routes": {
                        "toReceiver": "FROM /messages/modules/sender/outputs/* INTO BrokeredEndpoint(\"/modules/receiver/inputs/input1\")"
                    },
                    "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
                }}
            }}}
        }
    })
}

/// What `edgehub-controller render --generate-secrets --hub-image IMAGE FILE` prints (the same
/// library calls as the binary's `render`), as JSON documents.
fn render(file: &Path, hub_image: &str) -> Vec<Value> {
    let ed = k8s::render::read_edge_deployment(file, "default").expect("an EdgeDeployment");
    let manifest = k8s::render::manifest_of(&ed, None).expect("its manifest");
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let yaml = k8s::render::render_with(
        &ed,
        &manifest,
        &k8s::desired::ControllerOptions {
            hub_image: hub_image.to_owned(),
        },
        k8s::render::Secrets::Generate { now_secs },
    )
    .expect("render");
    assert!(!yaml.contains("# not translated"), "{yaml}");
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect()
}

/// The rendered object `kind`/`name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("render printed no {kind}/{name}"))
}

/// A rendered Secret's data as text (`render` shows it as `stringData`).
fn secret_data(secret: &Value) -> BTreeMap<String, String> {
    secret["stringData"]
        .as_object()
        .unwrap_or_else(|| panic!("no stringData in {secret}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_owned()))
        .collect()
}

/// A rendered ConfigMap's data.
fn config_map_data(cm: &Value) -> BTreeMap<String, String> {
    cm["data"]
        .as_object()
        .unwrap_or_else(|| panic!("no data in {cm}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_owned()))
        .collect()
}

/// Writes into `dir` what the kubelet projects for a `secret` or `configMap` volume `source`
/// over `data`: its `items` only (else every key), each with its mode or `defaultMode` (else
/// 0644), owned by group `group` when the pod has an fsGroup.
fn project(source: &Value, data: &BTreeMap<String, String>, dir: &Path, group: Option<u32>) {
    std::fs::create_dir_all(dir).expect("projection directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let default_mode = source["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    let files: Vec<(String, String, u32)> = match source["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|i| {
                let mode = i["mode"].as_u64().map_or(default_mode, |m| m as u32);
                (
                    i["key"].as_str().expect("item key").to_owned(),
                    i["path"].as_str().expect("item path").to_owned(),
                    mode,
                )
            })
            .collect(),
        None => data
            .keys()
            .map(|k| (k.clone(), k.clone(), default_mode))
            .collect(),
    };
    for (key, path, mode) in files {
        let text = data
            .get(&key)
            .unwrap_or_else(|| panic!("the volume names key {key:?}, which is not in the data"));
        let file = dir.join(&path);
        std::fs::write(&file, text).expect("write a projected file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if let Some(g) = group {
            std::os::unix::fs::chown(&file, None, Some(g)).expect("chgrp (needs root)");
        }
    }
}

/// The Pod the StatefulSet `sts` stands for (its one replica), changed as podman 4.3 needs
/// and in nothing else. Each change:
/// 1. `kind: Pod` named `pod_name` with the template's labels (the StatefulSet controller
///    would name it `STS-0`; a unique name lets test runs share the host);
/// 2. each `volumeClaimTemplates` entry T becomes a volume named T with a
///    `persistentVolumeClaim` on `claims[T]` (podman makes a claim a named volume; the
///    StatefulSet controller would make a PVC `T-STS-0`);
/// 3. each `secret` volume becomes a `hostPath` on `secret_dirs[volume]`, into which the test
///    projected the Secret as the kubelet would ([`project`]): podman 4.3 reads Secret
///    volumes only from its own secret store ("secret … is not valid JSON").
fn pod_from_statefulset(
    sts: &Value,
    pod_name: &str,
    claims: &BTreeMap<String, String>,
    secret_dirs: &BTreeMap<String, PathBuf>,
) -> Value {
    let template = &sts["spec"]["template"];
    let mut spec = template["spec"].clone();
    let mut volumes: Vec<Value> = spec["volumes"].as_array().cloned().unwrap_or_default();
    for v in &mut volumes {
        if v.get("secret").is_some() {
            let name = v["name"].as_str().expect("volume name");
            let dir = secret_dirs
                .get(name)
                .unwrap_or_else(|| panic!("no projection for secret volume {name}"));
            *v = json!({"name": name, "hostPath": {"path": dir, "type": "Directory"}});
        }
    }
    for t in sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = t["metadata"]["name"].as_str().expect("claim template name");
        let claim = claims
            .get(name)
            .unwrap_or_else(|| panic!("no volume for claim template {name}"));
        volumes.push(json!({"name": name, "persistentVolumeClaim": {"claimName": claim}}));
    }
    spec["volumes"] = Value::Array(volumes);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "labels": template["metadata"]["labels"].clone()},
        "spec": spec,
    })
}

/// The played pod differs from the rendered template only as [`pod_from_statefulset`] says:
/// containers (command, args, env, mounts, ports, probes, security context) identical, the
/// rest of the pod spec identical, non-secret volumes identical, secret volumes now hostPaths
/// under the same names, and one volume per claim template.
fn assert_only_the_listed_changes(sts: &Value, pod: &Value) {
    let rendered = &sts["spec"]["template"]["spec"];
    let played = &pod["spec"];
    assert_eq!(played["containers"], rendered["containers"]);
    let without_volumes = |s: &Value| {
        let mut s = s.clone();
        s.as_object_mut().expect("pod spec").remove("volumes");
        s
    };
    assert_eq!(without_volumes(played), without_volumes(rendered));
    let played_volumes: BTreeMap<&str, &Value> = played["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().expect("name"), v))
        .collect();
    let mut expected_names = BTreeSet::new();
    for v in rendered["volumes"].as_array().expect("volumes") {
        let name = v["name"].as_str().expect("name");
        expected_names.insert(name);
        let p = played_volumes
            .get(name)
            .unwrap_or_else(|| panic!("volume {name} is gone"));
        if v.get("secret").is_some() {
            assert!(p.get("hostPath").is_some(), "{p}");
        } else {
            assert_eq!(*p, v);
        }
    }
    for t in sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("claim templates")
    {
        let name = t["metadata"]["name"].as_str().expect("name");
        expected_names.insert(name);
        assert!(played_volumes[name].get("persistentVolumeClaim").is_some());
    }
    assert_eq!(
        played_volumes.keys().copied().collect::<BTreeSet<_>>(),
        expected_names
    );
}

/// The module image's repository (tagged by a digest of what goes into it).
const SDK_IMAGE_REPO: &str = "localhost/edgehub-sdk-python-test";

/// The module image: Debian's python3.11 with the shared libraries its extension modules
/// link, its standard library (no tests), the pinned SDK's site-packages (from
/// scripts/install-sdks.sh's venv) where Debian's python looks for packages, and the harness
/// scripts in the working directory /sdk. Non-root, `FROM scratch`, about 85 MB.
const SDK_CONTAINERFILE: &str =
    "FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/bin\nWORKDIR /sdk\nUSER 65532:65532\n";

/// Lays out the module image's build context: `stage.sh SITE_PACKAGES SCRIPTS DIR`.
const SDK_STAGE: &str = r#"set -euo pipefail
site=$1; scripts=$2; out=$3; root=$out/rootfs
mkdir -p "$root/usr/bin" "$root/usr/lib/python3/dist-packages" "$root/sdk"
cp /usr/bin/python3.11 "$root/usr/bin/python3.11"
ln -s python3.11 "$root/usr/bin/python3"
tar -C / --exclude=usr/lib/python3.11/test -cf - usr/lib/python3.11 | tar -C "$root" -xf -
tar -C "$site" --exclude=./pip --exclude=./setuptools -cf - . | tar -C "$root/usr/lib/python3/dist-packages" -xf -
cp "$scripts"/*.py "$root/sdk/"
{ echo /usr/bin/python3.11; find /usr/lib/python3.11/lib-dynload "$site" -name '*.so'; } |
  while read -r f; do ldd "$f"; done |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
chmod -R u+rwX,go+rX "$root"
"#;

/// The module image's tag, built unless an image of the very same inputs exists (a digest of
/// the Containerfile, the staging script, the harness scripts, the SDK venv's stamp and the
/// interpreter); older tags of it are removed.
fn sdk_image(podman: &Podman, env: &SdkEnv) -> String {
    let python = Path::new("/usr/bin/python3.11");
    let site = env.dir.join("venv/lib/python3.11/site-packages");
    assert!(
        python.is_file() && site.is_dir(),
        "the module image needs Debian's python3.11 and the SDK venv's {}",
        site.display()
    );
    let scripts = env.scripts.join("python");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(SDK_CONTAINERFILE.as_bytes());
    ctx.update(SDK_STAGE.as_bytes());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&scripts)
        .expect("harness scripts")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files.push(env.dir.join("venv/.edgehub-stamp"));
    files.push(python.to_path_buf());
    for f in files {
        ctx.update(f.display().to_string().as_bytes());
        ctx.update(&std::fs::read(&f).unwrap_or_default());
    }
    let digest: String = ctx.finish().as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tag = format!("{SDK_IMAGE_REPO}:{digest}");
    let exists = podman
        .command()
        .args(["image", "exists", &tag])
        .stdin(Stdio::null())
        .status()
        .expect("podman image exists");
    if exists.success() {
        return tag;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let staged = Command::new("bash")
        .args(["-c", SDK_STAGE, "stage"])
        .arg(&site)
        .arg(&scripts)
        .arg(dir.path())
        .output()
        .expect("bash");
    assert!(
        staged.status.success(),
        "staging the module image: {}",
        String::from_utf8_lossy(&staged.stderr)
    );
    let containerfile = dir.path().join("Containerfile");
    std::fs::write(&containerfile, SDK_CONTAINERFILE).expect("Containerfile");
    let started = Instant::now();
    podman.ok(&[
        "build",
        "--isolation",
        "chroot",
        "-q",
        "-t",
        &tag,
        "-f",
        containerfile.to_str().expect("utf-8"),
        dir.path().to_str().expect("utf-8"),
    ]);
    eprintln!("built {tag} in {:?}", started.elapsed());
    let listed = podman.ok(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        SDK_IMAGE_REPO,
    ]);
    for old in listed.lines().filter(|t| *t != tag) {
        let _ = podman
            .command()
            .args(["rmi", old])
            .stdin(Stdio::null())
            .output();
    }
    tag
}

/// Where a pod on a `slirp4netns:allow_host_loopback=true` network reaches the loopback of
/// the namespace podman runs in (slirp4netns's fixed host address).
const SLIRP_HOST: &str = "10.0.2.2";

/// The Pod a module StatefulSet `sts` stands for, changed as podman 4.3 needs and in nothing
/// else. Each change:
/// 1. `kind: Pod` named `pod_name` with the template's labels (as for the hub);
/// 2. each `env` entry with `valueFrom.secretKeyRef` gets the Secret's value as `value`
///    (podman 4.3 fails on secretKeyRef: "secret … is not valid JSON");
/// 3. `hostAliases` maps the hub Service's name to [`SLIRP_HOST`], where the hub pod's ports
///    are published: the stand-in for Service DNS.
fn module_pod(sts: &Value, pod_name: &str, docs: &[Value], service_name: &str) -> Value {
    let template = &sts["spec"]["template"];
    let mut spec = template["spec"].clone();
    for c in spec["containers"].as_array_mut().expect("containers") {
        for e in c["env"].as_array_mut().into_iter().flatten() {
            let Some(r) = e["valueFrom"].get("secretKeyRef").cloned() else {
                continue;
            };
            let secret = object(docs, "Secret", r["name"].as_str().expect("secret name"));
            let value = secret_data(secret)
                .remove(r["key"].as_str().expect("key"))
                .expect("the referenced key");
            *e = json!({"name": e["name"].clone(), "value": value});
        }
    }
    spec["hostAliases"] = json!([{"ip": SLIRP_HOST, "hostnames": [service_name]}]);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "labels": template["metadata"]["labels"].clone()},
        "spec": spec,
    })
}

/// The played module pod differs from the rendered template only as [`module_pod`] says:
/// with the hostAliases removed and each Secret reference put back where a value now stands,
/// it equals the rendered pod spec.
fn assert_only_the_module_changes(sts: &Value, pod: &Value) {
    let rendered = &sts["spec"]["template"]["spec"];
    let mut played = pod["spec"].clone();
    assert!(played
        .as_object_mut()
        .expect("spec")
        .remove("hostAliases")
        .is_some());
    assert_eq!(rendered["containers"].as_array().map(Vec::len), Some(1));
    let rendered_env = rendered["containers"][0]["env"].as_array().expect("env");
    let played_env = played["containers"][0]["env"].as_array_mut().expect("env");
    assert_eq!(played_env.len(), rendered_env.len());
    for (p, r) in played_env.iter_mut().zip(rendered_env) {
        if r["valueFrom"].get("secretKeyRef").is_some() {
            assert_eq!(p["name"], r["name"]);
            assert!(p["value"].is_string(), "{p}");
            *p = r.clone();
        }
    }
    assert_eq!(played, *rendered);
}

/// Removes podman volumes by name when dropped (kube play makes one per ConfigMap, and
/// `kube down` leaves them).
struct VolumesByName(Podman, Vec<String>);

impl Drop for VolumesByName {
    fn drop(&mut self) {
        for v in &self.1 {
            let _ = self
                .0
                .command()
                .args(["volume", "rm", "-f", v])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// `GET path` on 127.0.0.1:`port` inside `ns`: the status line.
fn http_get(ns: &NetNs, port: i64, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} || exit 1; \
         printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; \
         head -n 1 <&3"
    );
    let out = ns
        .command("timeout")
        .args(["10", "bash", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The module `module`'s rendered pod spec as a host process inside `ns`: exactly its
/// container's environment (`env -i`; its `secretKeyRef` resolved from the rendered Secret),
/// its `configMap` mounts projected at their mount paths and `hosts` mapping the hub
/// Service's name to the namespace's loopback, both laid over /etc in a private mount
/// namespace; its rendered command and args, `python3` being the SDK venv's interpreter and
/// the working directory the harness scripts' (as the module image lays them out).
fn module_process(
    ns: &NetNs,
    env: &SdkEnv,
    docs: &[Value],
    deployment: &str,
    module: &str,
    dir: &Path,
) -> sdk::Proc {
    let workload = k8s::names::module_workload(deployment, module).expect("module name");
    let sts = object(docs, "StatefulSet", &workload);
    let spec = &sts["spec"]["template"]["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{spec}");
    let c = &containers[0];

    let mut vars: Vec<String> = Vec::new();
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name");
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            let secret = object(docs, "Secret", r["name"].as_str().expect("secret name"));
            secret_data(secret)
                .remove(r["key"].as_str().expect("key"))
                .unwrap_or_else(|| panic!("{name}: no such key in the Secret"))
        } else {
            panic!("env {name}: a source this test cannot resolve: {e}")
        };
        vars.push(format!("{name}={value}"));
    }

    let upper = dir.join(module).join("upper");
    let work = dir.join(module).join("work");
    std::fs::create_dir_all(&work).expect("overlay workdir");
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().expect("name"), v))
        .collect();
    for m in c["volumeMounts"].as_array().expect("mounts") {
        let path = m["mountPath"].as_str().expect("mount path");
        let under_etc = path
            .strip_prefix("/etc/")
            .unwrap_or_else(|| panic!("mount {path}: only /etc is laid over here"));
        let v = volumes[m["name"].as_str().expect("mount name")];
        let source = v
            .get("configMap")
            .unwrap_or_else(|| panic!("mount {path}: volume {v} is no ConfigMap"));
        let cm = object(docs, "ConfigMap", source["name"].as_str().expect("name"));
        project(source, &config_map_data(cm), &upper.join(under_etc), None);
    }
    let hub_service = object(docs, "Service", &k8s::names::hub(deployment));
    let service_name = hub_service["metadata"]["name"].as_str().expect("name");
    std::fs::write(
        upper.join("hosts"),
        format!("127.0.0.1 localhost\n127.0.0.1 {service_name}\n"),
    )
    .expect("hosts");

    let mut argv: Vec<String> = c["command"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c["args"].as_array().into_iter().flatten())
        .map(|a| a.as_str().expect("arg").to_owned())
        .collect();
    assert_eq!(argv.first().map(String::as_str), Some("python3"), "{c}");
    argv[0] = env.python.display().to_string();

    let mut cmd = Command::new("/usr/bin/env");
    cmd.arg("-i")
        .args(&vars)
        .args([
            "/usr/bin/unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
        ])
        .args([
            "/bin/sh",
            "-c",
            "/bin/mount -t overlay overlay -o \"lowerdir=/etc,upperdir=$1,workdir=$2\" /etc \
             && cd \"$3\" && shift 3 && exec \"$@\"",
            "sh",
        ])
        .arg(&upper)
        .arg(&work)
        .arg(env.scripts.join("python"))
        .args(&argv);
    ns.spawn(&mut cmd)
}

/// The hub StatefulSet's pod template, played with `podman kube play` from the rendered
/// objects, serves the two modules run from their rendered pod specs (the receiver played as
/// a pod too, the sender a host process): 100 messages sender → route → receiver, in order and
/// intact; podman runs the hub's container exactly as rendered.
#[test]
fn the_rendered_hub_pod_serves_modules_run_from_their_rendered_pod_specs() {
    let started = Instant::now();
    let Some(podman) = Podman::or_skip("the rendered hub pod under podman kube play") else {
        return;
    };
    let env = SdkEnv::require();
    let image = podman.image(Image::Hub, Path::new(env!("CARGO_BIN_EXE_edgehub")));
    let built = started.elapsed();

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = unique_deployment();
    let ed_file = dir.path().join("edgedeployment.json");
    let module_image = sdk_image(&podman, &env);
    std::fs::write(&ed_file, edge_deployment(&d, &module_image).to_string()).expect("write");
    let docs = render(&ed_file, &image);

    // The hub's pod, as podman 4.3 can play it.
    let sts = object(&docs, "StatefulSet", &k8s::names::hub(&d));
    let template = &sts["spec"]["template"]["spec"];
    let fs_group = template["securityContext"]["fsGroup"].as_u64();
    assert_eq!(fs_group, Some(u64::from(HUB_GID)));
    let mut secret_dirs = BTreeMap::new();
    let mut config_maps = Vec::new();
    for v in template["volumes"].as_array().expect("volumes") {
        let name = v["name"].as_str().expect("name");
        if let Some(s) = v.get("secret") {
            let secret = object(&docs, "Secret", s["secretName"].as_str().expect("name"));
            let to = dir.path().join("secrets").join(name);
            project(s, &secret_data(secret), &to, Some(HUB_GID));
            secret_dirs.insert(name.to_owned(), to);
        } else if let Some(c) = v.get("configMap") {
            config_maps.push(c["name"].as_str().expect("name").to_owned());
        }
    }
    // The Secret's CA key never reaches the hub.
    assert!(!secret_dirs["tls"].join("ca.key").exists());
    let volumes_by_name = VolumesByName(podman.clone(), config_maps.clone());
    let store = podman.volume("store");
    let claims = BTreeMap::from([("store".to_owned(), store.name.clone())]);
    let pod_name = format!("{d}-hub-0");
    let pod = pod_from_statefulset(sts, &pod_name, &claims, &secret_dirs);
    assert_only_the_listed_changes(sts, &pod);
    let mut play = String::new();
    for cm in &config_maps {
        play.push_str("---\n");
        play.push_str(&serde_yaml::to_string(object(&docs, "ConfigMap", cm)).expect("yaml"));
    }
    play.push_str("---\n");
    play.push_str(&serde_yaml::to_string(&pod).expect("yaml"));
    let play_file = dir.path().join("hub-pod.yaml");
    std::fs::write(&play_file, &play).expect("write");

    let ns = NetNs::new();
    let netns = PathBuf::from(format!("/run/netns/{}", ns.name()));
    let played = podman.kube_play_in(&netns, &play_file, &["--network", "slirp4netns"]);
    let container = &template["containers"][0];
    let hub = podman.container(&format!(
        "{pod_name}-{}",
        container["name"].as_str().expect("name")
    ));
    hub.wait_log(testhub::READY_LINE, 1, secs(60));
    let ready_at = started.elapsed();

    // podman runs the container as rendered.
    let inspect = |format: &str| podman.ok(&["inspect", "--format", format, &hub.name]);
    let json_of = |s: String| serde_json::from_str::<Value>(&s).expect("inspect JSON");
    // podman 4.3 shows the entrypoint as one string, words joined by spaces.
    let entrypoint = match json_of(inspect("{{json .Config.Entrypoint}}")) {
        Value::String(s) => s.split(' ').map(|w| json!(w)).collect(),
        other => other,
    };
    assert_eq!(entrypoint, container["command"]);
    assert_eq!(json_of(inspect("{{json .Config.Cmd}}")), container["args"]);
    assert_eq!(inspect("{{.Config.User}}"), "65532:65532");
    assert_eq!(inspect("{{.HostConfig.ReadonlyRootfs}}"), "true");
    let mounts: BTreeSet<(String, bool)> = json_of(inspect("{{json .Mounts}}"))
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["Destination"].as_str().expect("dest").to_owned(),
                m["RW"].as_bool().expect("RW"),
            )
        })
        .collect();
    let want_mounts: BTreeSet<(String, bool)> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().expect("path").to_owned(),
                !m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(mounts, want_mounts);
    let ports: BTreeSet<String> = json_of(podman.ok(&[
        "pod",
        "inspect",
        "--format",
        "{{json .InfraConfig.PortBindings}}",
        &pod_name,
    ]))
    .as_object()
    .expect("port bindings")
    .keys()
    .cloned()
    .collect();
    let want_ports: BTreeSet<String> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["containerPort"],
                p["protocol"].as_str().expect("protocol").to_lowercase()
            )
        })
        .collect();
    assert_eq!(ports, want_ports);
    // The probes' paths answer on their ports, through the published ports.
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        let port = get["port"].as_i64().expect("numeric probe port");
        let path = get["path"].as_str().expect("path");
        let status = http_get(&ns, port, path);
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "{probe} GET {path} :{port}: {status:?}\nhub:\n{}",
            hub.logs()
        );
    }

    // The receiver: its rendered pod, played with the module image.
    let rx_sts = object(
        &docs,
        "StatefulSet",
        &k8s::names::module_workload(&d, "receiver").expect("module name"),
    );
    let rx_pod_name = format!("{}-0", rx_sts["metadata"]["name"].as_str().expect("name"));
    let rx_pod = module_pod(rx_sts, &rx_pod_name, &docs, &k8s::names::hub(&d));
    assert_only_the_module_changes(rx_sts, &rx_pod);
    let mut rx_config_maps = Vec::new();
    let mut rx_play = String::new();
    for v in rx_sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
    {
        let c = v
            .get("configMap")
            .unwrap_or_else(|| panic!("a module volume other than a ConfigMap: {v}"));
        let name = c["name"].as_str().expect("name");
        rx_config_maps.push(name.to_owned());
        rx_play.push_str("---\n");
        rx_play.push_str(&serde_yaml::to_string(object(&docs, "ConfigMap", name)).expect("yaml"));
    }
    rx_play.push_str("---\n");
    rx_play.push_str(&serde_yaml::to_string(&rx_pod).expect("yaml"));
    let rx_file = dir.path().join("receiver-pod.yaml");
    std::fs::write(&rx_file, &rx_play).expect("write");
    let rx_volumes = VolumesByName(podman.clone(), rx_config_maps);
    let rx_played = podman.kube_play_in(
        &netns,
        &rx_file,
        &["--network", "slirp4netns:allow_host_loopback=true"],
    );
    let rx_container = &rx_sts["spec"]["template"]["spec"]["containers"][0];
    let rx_ctr = podman.container(&format!(
        "{rx_pod_name}-{}",
        rx_container["name"].as_str().expect("name")
    ));
    let mut rx = ns.spawn(podman.command().args(["logs", "-f", &rx_ctr.name]));
    rx.expect_event("ready", secs(60));
    // Its environment is the rendered one; podman adds only what every container gets.
    let rendered_names: BTreeSet<String> = rx_container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect();
    let runtime_names: BTreeSet<String> = ["PATH", "HOME", "HOSTNAME", "TERM", "container"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let rx_env: BTreeSet<String> =
        json_of(podman.ok(&["inspect", "--format", "{{json .Config.Env}}", &rx_ctr.name]))
            .as_array()
            .expect("env")
            .iter()
            .map(|kv| {
                let kv = kv.as_str().expect("K=V");
                kv.split_once('=').map_or(kv, |(k, _)| k).to_owned()
            })
            .collect();
    assert!(rendered_names.is_subset(&rx_env), "{rx_env:?}");
    assert!(
        rx_env
            .difference(&rendered_names)
            .all(|n| runtime_names.contains(n)),
        "{rx_env:?}"
    );

    // The sender: its rendered pod spec as a host process.
    let tx = module_process(&ns, &env, &docs, &d, "sender", dir.path());
    let sent = tx.finish(secs(170));
    if sent.code != Some(sdk::EXIT_OK) {
        panic!(
            "the sender did not finish: exit {:?}; stderr:\n{}\nhub:\n{}",
            sent.code,
            sent.stderr,
            hub.logs()
        );
    }
    assert_eq!(sent.events("connected")[0]["module_id"], "sender");
    SeqReport::of(&sent.data(), 0..N).assert_no_loss_no_reorder();
    let (got, rx_stderr) = rx.receive_all(N, secs(120));
    let report = SeqReport::of(&got, 0..N);
    if !report.missing.is_empty()
        || !report.out_of_order.is_empty()
        || !report.unexpected.is_empty()
        || report.without_seq > 0
    {
        panic!("{report:?}\nreceiver:\n{rx_stderr}\nhub:\n{}", hub.logs());
    }
    for m in &got {
        testhub::assert_intact(m, RUN, "sender", "input1");
    }

    // The store lives on the claim's volume.
    let mountpoint = podman.ok(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &store.name,
    ]);
    let segments = std::fs::read_dir(Path::new(&mountpoint).join("store"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(segments > 0, "no store files on the claim's volume");

    drop(rx_ctr);
    drop(rx_played);
    drop(rx_volumes);
    drop(hub);
    drop(played);
    drop(store);
    drop(volumes_by_name);
    eprintln!(
        "kube play test: image {built:?}, hub ready at {ready_at:?}, total {:?}",
        started.elapsed()
    );
}
