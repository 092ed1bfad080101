//! `edgehub-controller render`: every object reconcile would apply for an EdgeDeployment, as
//! multi-document YAML, offline. It runs [`crate::desired::desired`] (the code path reconcile
//! uses) with placeholder secret material, and shows Secrets' data as `stringData` so the
//! placeholders (`<generated: ca.crt>`, `<generated: key of M>`) read as text.
//!
//! Differences from what reconcile applies, all on purpose: generated data are placeholders;
//! `ownerReferences` are absent (the EdgeDeployment's uid exists only in a cluster; a made-up
//! one would make the garbage collector delete the objects).

use std::path::Path;

use serde_json::Value;

use crate::agent;
use crate::desired::{self, ControllerOptions, Object, RenderError, SecretMaterial};
use crate::types::EdgeDeployment;

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

/// Renders every object as multi-document YAML (see the module docs).
pub fn render(
    ed: &EdgeDeployment,
    manifest: &Value,
    opts: &ControllerOptions,
) -> Result<String, RenderCliError> {
    let modules = agent::parse_manifest(manifest).map_err(RenderError::from)?;
    let secrets = SecretMaterial::placeholders(ed, &modules);
    let desired = desired::desired(ed, manifest, &secrets, opts)?;
    let mut out = String::new();
    for note in &desired.untranslated {
        out.push_str(&format!("# not translated: {note}\n"));
    }
    for object in desired.objects() {
        let mut value = object.to_value()?;
        if matches!(object, Object::Secret(_)) {
            secret_data_as_text(&mut value);
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
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
