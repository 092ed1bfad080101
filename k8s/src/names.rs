//! Object names and labels, as k8s-design.md fixes them.
//!
//! Module names are made DNS-1123 labels: lowercase, every other character becomes `-`, no `-`
//! at either end; when that changed the name, a suffix of 6 hex digits of the SHA-256 of the
//! original name keeps two modules that differ only in case or punctuation apart.

use std::collections::BTreeMap;

/// `app.kubernetes.io/managed-by`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/part-of`: the EdgeDeployment's name.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// `app.kubernetes.io/component`: `hub` or `module`.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `edgehub.io/module`: the module's DNS name (on module objects).
pub const LABEL_MODULE: &str = "edgehub.io/module";
/// The value of [`LABEL_MANAGED_BY`], and the field manager.
pub const MANAGER: &str = "edgehub-controller";

/// StatefulSet names must leave room for the pod's `controller-revision-hash` label (63 − 11).
pub const MAX_STATEFULSET_NAME: usize = 52;

/// A name that cannot become a Kubernetes object name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Too long once prefixed by the EdgeDeployment's name.
    #[error("object name {name:?} is {len} characters, more than {max}: shorten the EdgeDeployment's or the module's name")]
    TooLong {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The module name cannot be a Secret key (the hub's module-keys directory).
    #[error("module {0:?}: a module name must be letters, digits, '-', '_' or '.' (it names a file of the module-keys Secret)")]
    BadModuleName(String),
}

/// Is `s` a DNS-1123 label (1–63 lowercase alphanumerics or `-`, alphanumeric at both ends)?
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The DNS-1123 form of a module name (see the module docs).
pub fn dns_module_name(module: &str) -> String {
    let mut out: String = module
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let trimmed = out.trim_matches('-').to_owned();
    if trimmed == module {
        return trimmed;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, module.as_bytes());
    let suffix: String = digest.as_ref()[..3]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if trimmed.is_empty() {
        format!("m-{suffix}")
    } else {
        format!("{trimmed}-{suffix}")
    }
}

/// Checks that a module name can be a Secret data key.
pub fn check_module_key_name(module: &str) -> Result<(), NameError> {
    let ok = !module.is_empty()
        && module.len() <= 253
        && module != "."
        && module != ".."
        && module
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadModuleName(module.to_owned()))
    }
}

/// `D-M`: a module's StatefulSet and Service.
pub fn module_workload(deployment: &str, module: &str) -> Result<String, NameError> {
    bounded(
        format!("{deployment}-{}", dns_module_name(module)),
        MAX_STATEFULSET_NAME,
    )
}

/// `D-module-M`: a module's connection-string Secret.
pub fn module_secret(deployment: &str, module: &str) -> Result<String, NameError> {
    bounded(
        format!("{deployment}-module-{}", dns_module_name(module)),
        253,
    )
}

/// `D-hub`: the hub's StatefulSet and Service.
pub fn hub(deployment: &str) -> String {
    format!("{deployment}-hub")
}

/// `D-hub-tls`.
pub fn hub_tls(deployment: &str) -> String {
    format!("{deployment}-hub-tls")
}

/// `D-hub-epoch`: the store epoch's ConfigMap.
pub fn hub_epoch(deployment: &str) -> String {
    format!("{deployment}-hub-epoch")
}

/// `D-hub-0`: the hub StatefulSet's one pod.
pub fn hub_pod(deployment: &str) -> String {
    format!("{deployment}-hub-0")
}

/// `D-trust-bundle`.
pub fn trust_bundle(deployment: &str) -> String {
    format!("{deployment}-trust-bundle")
}

/// `D-module-keys`.
pub fn module_keys(deployment: &str) -> String {
    format!("{deployment}-module-keys")
}

/// `D-manifest`.
pub fn manifest(deployment: &str) -> String {
    format!("{deployment}-manifest")
}

/// Checks the hub's names (the longest is the StatefulSet `D-hub`).
pub fn check_deployment(deployment: &str) -> Result<(), NameError> {
    bounded(hub(deployment), MAX_STATEFULSET_NAME).map(|_| ())
}

fn bounded(name: String, max: usize) -> Result<String, NameError> {
    if name.len() > max {
        Err(NameError::TooLong {
            len: name.len(),
            name,
            max,
        })
    } else {
        Ok(name)
    }
}

/// The labels every object of deployment `D` carries.
pub fn labels(deployment: &str, component: &str, module: Option<&str>) -> BTreeMap<String, String> {
    let mut l = selector(deployment, component, module);
    l.insert(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned());
    l
}

/// The labels that select a workload's pods.
pub fn selector(
    deployment: &str,
    component: &str,
    module: Option<&str>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(LABEL_PART_OF.to_owned(), deployment.to_owned());
    l.insert(LABEL_COMPONENT.to_owned(), component.to_owned());
    if let Some(m) = module {
        l.insert(LABEL_MODULE.to_owned(), dns_module_name(m));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_become_dns_labels_with_a_suffix_only_when_changed() {
        assert_eq!(dns_module_name("filter"), "filter");
        let a = dns_module_name("SimulatedTemperatureSensor");
        assert!(a.starts_with("simulatedtemperaturesensor-"), "{a}");
        assert_eq!(a.len(), "simulatedtemperaturesensor-".len() + 6);
        assert!(is_dns_label(&a));
        assert_ne!(dns_module_name("my_mod"), dns_module_name("my.mod"));
        assert!(is_dns_label(&dns_module_name("__")));
    }

    #[test]
    fn long_names_are_refused_not_truncated() {
        let long = "x".repeat(51);
        assert!(matches!(
            module_workload("d", &long),
            Err(NameError::TooLong { .. })
        ));
        assert!(check_deployment(&"d".repeat(49)).is_err());
        assert!(check_deployment(&"d".repeat(48)).is_ok());
    }
}
