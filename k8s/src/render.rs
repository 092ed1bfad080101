//! `edgehub-controller render`: every object reconcile would apply for an EdgeDeployment, as
//! multi-document YAML, offline. It runs [`crate::desired::desired`] (the code path reconcile
//! uses) with placeholder secret material, and shows Secrets' data as `stringData` so the
//! placeholders (`<generated: ca.crt>`, `<generated: key of M>`) read as text.
//!
//! With `--generate-secrets` ([`Secrets::Generate`]) the secret material is real instead: a new
//! CA, server certificate and module keys made by the very functions reconcile calls when a
//! deployment has none yet ([`crate::tls::ensure`], [`crate::keys::resolve`]). That output holds
//! private keys: it is for trials and tests (e.g. `podman kube play`), not for a repository.
//!
//! Differences from what reconcile applies, all on purpose: generated data are placeholders
//! unless asked for; a replicated module's StatefulSet shows `.spec.replicas` at its ceiling,
//! which reconcile writes through a field manager of its own ([`crate::replicas`]), once;
//! `ownerReferences` are absent (the EdgeDeployment's uid exists only in a cluster; a made-up
//! one would make the garbage collector delete the objects).

use std::path::Path;

use serde_json::Value;

use crate::agent::{self, AgentModule};
use crate::desired::{self, ControllerOptions, Object, RenderError, SecretMaterial};
use crate::keys::{self, KeyError};
use crate::tls::{self, TlsError};
use crate::types::EdgeDeployment;

/// The secret material `render` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// `<generated: …>` placeholders (the default: output fit for review and GitOps).
    Placeholders,
    /// Real material made now (`now_secs`, Unix seconds) as reconcile makes it for a new
    /// deployment: for trials and tests only, the output holds private keys.
    Generate {
        /// The clock the certificates are issued at.
        now_secs: u64,
    },
}

/// Why `render` failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderCliError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is no EdgeDeployment (YAML or JSON).
    #[error("{path}: not an EdgeDeployment: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_yaml::Error,
    },
    /// The manifest file is not JSON.
    #[error("{path}: not a JSON manifest: {source}")]
    ManifestJson {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The EdgeDeployment takes its manifest from a ConfigMap: pass the file.
    #[error("the manifest comes from ConfigMap {name:?} key {key:?}: pass its content with --manifest-file FILE")]
    NeedManifestFile {
        /// The ConfigMap.
        name: String,
        /// The key.
        key: String,
    },
    /// `spec.manifest` has neither `inline` nor `configMapKeyRef`, or both.
    #[error("spec.manifest must have exactly one of inline and configMapKeyRef")]
    ManifestSource,
    /// The objects could not be built.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Certificates could not be made.
    #[error("generating the hub's certificates: {0}")]
    Tls(#[from] TlsError),
    /// Module keys could not be made.
    #[error("generating module keys: {0}")]
    Keys(#[from] KeyError),
    /// `spec.device.keysSecret` names keys only the cluster holds: generating others would
    /// give modules keys IoT Hub never issued.
    #[error("spec.device.keysSecret names Secret {0:?}, which only a cluster holds: --generate-secrets cannot mint the keys IoT Hub issued")]
    IssuedKeysOffline(String),
    /// An object could not be written as YAML.
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// An object could not be turned into JSON.
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Reads an EdgeDeployment (YAML or JSON) from `file`; a missing namespace becomes `namespace`.
pub fn read_edge_deployment(
    file: &Path,
    namespace: &str,
) -> Result<EdgeDeployment, RenderCliError> {
    let path = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| RenderCliError::Read {
        path: path.clone(),
        source,
    })?;
    let mut ed: EdgeDeployment =
        serde_yaml::from_str(&text).map_err(|source| RenderCliError::Parse { path, source })?;
    if ed.metadata.namespace.is_none() {
        ed.metadata.namespace = Some(namespace.to_owned());
    }
    Ok(ed)
}

/// The manifest of `ed`: the JSON in `manifest_file` when given (required for a
/// configMapKeyRef, which only a cluster can resolve), else the inline one.
pub fn manifest_of(
    ed: &EdgeDeployment,
    manifest_file: Option<&Path>,
) -> Result<Value, RenderCliError> {
    let source = &ed.spec.manifest;
    if source.inline.is_some() == source.config_map_key_ref.is_some() {
        return Err(RenderCliError::ManifestSource);
    }
    if let Some(file) = manifest_file {
        let path = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|source| RenderCliError::Read {
            path: path.clone(),
            source,
        })?;
        return serde_json::from_str(&text)
            .map_err(|source| RenderCliError::ManifestJson { path, source });
    }
    match (&source.inline, &source.config_map_key_ref) {
        (Some(inline), _) => Ok(inline.clone()),
        (None, Some(r)) => Err(RenderCliError::NeedManifestFile {
            name: r.name.clone(),
            key: r.key.clone(),
        }),
        (None, None) => Err(RenderCliError::ManifestSource),
    }
}

/// Renders every object as multi-document YAML, with placeholder secrets (see the module docs).
pub fn render(
    ed: &EdgeDeployment,
    manifest: &Value,
    opts: &ControllerOptions,
) -> Result<String, RenderCliError> {
    render_with(ed, manifest, opts, Secrets::Placeholders)
}

/// Renders every object as multi-document YAML, with the secret material `secrets` says.
pub fn render_with(
    ed: &EdgeDeployment,
    manifest: &Value,
    opts: &ControllerOptions,
    secrets: Secrets,
) -> Result<String, RenderCliError> {
    let modules = agent::parse_manifest(manifest).map_err(RenderError::from)?;
    let secrets = match secrets {
        Secrets::Placeholders => SecretMaterial::placeholders(ed, &modules),
        Secrets::Generate { now_secs } => generate(ed, &modules, now_secs)?,
    };
    let desired = desired::desired(ed, manifest, &secrets, opts)?;
    let mut out = String::new();
    for note in &desired.untranslated {
        out.push_str(&format!("# not translated: {note}\n"));
    }
    for m in &desired.modules {
        if let Some(max) = m.max_replicas {
            out.push_str(&format!(
                "# StatefulSet/{}: module {} is replicated: created with {max} replicas (its x-edgehub-replicas count, 0 while stopped); then `kubectl scale` or an autoscaler sets them, at most {max}\n",
                m.workload.metadata.name.as_deref().unwrap_or(""),
                m.name,
            ));
        }
    }
    for object in desired.objects() {
        let mut value = object.to_value()?;
        if matches!(object, Object::Secret(_)) {
            secret_data_as_text(&mut value);
        }
        // What a replicated module's StatefulSet is created with: reconcile writes it through
        // its scale field manager (`crate::replicas`), not in this object's apply.
        if let Object::StatefulSet(sts) = &object {
            if let Some(max) = desired
                .modules
                .iter()
                .find(|m| m.workload.metadata.name == sts.metadata.name)
                .and_then(|m| m.max_replicas)
            {
                value["spec"]["replicas"] = Value::from(max.replicas());
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
}

/// New secret material for `ed`, as reconcile makes it for a deployment that has none yet: a
/// CA and server certificate for the hub Service's names, and a minted key per module.
pub fn generate(
    ed: &EdgeDeployment,
    modules: &[AgentModule],
    now_secs: u64,
) -> Result<SecretMaterial, RenderCliError> {
    if let Some(secret) = &ed.spec.device.keys_secret {
        return Err(RenderCliError::IssuedKeysOffline(secret.clone()));
    }
    let (tls, _) = tls::ensure(
        None,
        &desired::ca_common_name(ed),
        &desired::hub_dns_names(ed),
        now_secs,
    )?;
    let names: Vec<_> = modules.iter().map(|m| m.name.clone()).collect();
    let none = std::collections::BTreeMap::new();
    let keys = keys::resolve(&names, "", &none, &none)?
        .into_iter()
        .map(|(m, (k, _))| (m, k))
        .collect();
    Ok(SecretMaterial { tls, keys })
}

/// Moves a Secret's base64 `data` to `stringData` (text), for people to read.
fn secret_data_as_text(secret: &mut Value) {
    use base64::Engine as _;
    let Some(obj) = secret.as_object_mut() else {
        return;
    };
    let Some(Value::Object(data)) = obj.remove("data") else {
        return;
    };
    let text: serde_json::Map<String, Value> = data
        .into_iter()
        .map(|(k, v)| {
            let decoded = v
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .map_or(v, Value::String);
            (k, decoded)
        })
        .collect();
    obj.insert("stringData".to_owned(), Value::Object(text));
}
