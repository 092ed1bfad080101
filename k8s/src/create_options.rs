//! Docker `createOptions` → the pieces of a Kubernetes workload, and the list of what could not
//! be translated.
//!
//! | Docker | Kubernetes |
//! |---|---|
//! | `Env` `["K=V"]` | container `env` |
//! | `Cmd` | container `args` |
//! | `Entrypoint` | container `command` |
//! | `HostConfig.Binds` `"/host:/ctr[:ro]"` | a `hostPath` volume and its mount |
//! | `HostConfig.Binds` `"name:/ctr[:ro]"` | a volume claim template `vol-<name>` (1Gi) and its mount |
//! | `ExposedPorts` `{"80/tcp":{}}` | a container port and a port of the module's Service |
//! | `HostConfig.PortBindings` `{"80/tcp":[{"HostPort":"8080"}]}` | Service port 8080 → container port 80 |
//! | `Labels` | pod labels (valid label keys and values only) |
//!
//! Anything else that carries a value (not `null`, `{}` or `[]`) is returned in
//! [`Translated::untranslated`] by its JSON path, so it can be reported: never silently dropped.

use std::collections::BTreeMap;

use serde_json::Value;

/// A port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Kubernetes' spelling.
    pub fn as_k8s(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// A port the module listens on, and the port its Service offers it on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    /// The container's port.
    pub container_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The Service's port (`HostPort` when bound, else the container port).
    pub service_port: u16,
}

/// Where a bind's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSource {
    /// An absolute path on the node (`hostPath`).
    HostPath(String),
    /// A named Docker volume (a volume claim template).
    Named(String),
}

/// One `HostConfig.Binds` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path or volume name.
    pub source: BindSource,
    /// Where it is mounted in the container.
    pub container_path: String,
    /// `:ro`.
    pub read_only: bool,
}

/// What `createOptions` became.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translated {
    /// `Env`, in order.
    pub env: Vec<(String, String)>,
    /// `Entrypoint`.
    pub command: Option<Vec<String>>,
    /// `Cmd`.
    pub args: Option<Vec<String>>,
    /// `HostConfig.Binds`.
    pub binds: Vec<Bind>,
    /// `ExposedPorts` and `HostConfig.PortBindings`, sorted.
    pub ports: Vec<Port>,
    /// `Labels` that are valid Kubernetes labels.
    pub labels: BTreeMap<String, String>,
    /// JSON paths (below `createOptions`) of what was not translated, with why.
    pub untranslated: Vec<String>,
}

/// Translates parsed `createOptions`. `path` is the JSON path of `createOptions` itself.
pub fn translate(options: &Value, path: &str) -> Translated {
    let mut t = Translated::default();
    let Some(map) = options.as_object() else {
        t.untranslated.push(format!("{path} (not an object)"));
        return t;
    };
    let mut exposed: BTreeMap<(u16, Protocol), Option<u16>> = BTreeMap::new();
    for (key, value) in map {
        let here = format!("{path}.{key}");
        if is_empty(value) {
            continue;
        }
        match key.as_str() {
            "Env" => env(value, &here, &mut t),
            "Cmd" => t.args = strings(value, &here, &mut t.untranslated),
            "Entrypoint" => t.command = strings(value, &here, &mut t.untranslated),
            "Labels" => labels(value, &here, &mut t),
            "ExposedPorts" => match value.as_object() {
                Some(ports) => {
                    for spec in ports.keys() {
                        match port_spec(spec) {
                            Some(p) => {
                                exposed.entry(p).or_insert(None);
                            }
                            None => t
                                .untranslated
                                .push(format!("{here}.{spec} (not PORT/PROTO)")),
                        }
                    }
                }
                None => t.untranslated.push(format!("{here} (not an object)")),
            },
            "HostConfig" => host_config(value, &here, &mut t, &mut exposed),
            _ => t.untranslated.push(here),
        }
    }
    t.ports = exposed
        .into_iter()
        .map(|((container_port, protocol), host)| Port {
            container_port,
            protocol,
            service_port: host.unwrap_or(container_port),
        })
        .collect();
    t
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn env(value: &Value, path: &str, t: &mut Translated) {
    let Some(items) = value.as_array() else {
        t.untranslated.push(format!("{path} (not an array)"));
        return;
    };
    for (i, item) in items.iter().enumerate() {
        match item.as_str().and_then(|s| s.split_once('=')) {
            Some((k, v)) if !k.is_empty() => t.env.push((k.to_owned(), v.to_owned())),
            _ => t.untranslated.push(format!("{path}[{i}] (not NAME=VALUE)")),
        }
    }
}

fn strings(value: &Value, path: &str, untranslated: &mut Vec<String>) -> Option<Vec<String>> {
    match value {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => {
            let out: Option<Vec<String>> = items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect();
            if out.is_none() {
                untranslated.push(format!("{path} (not an array of strings)"));
            }
            out
        }
        _ => {
            untranslated.push(format!("{path} (not a string or an array of strings)"));
            None
        }
    }
}

fn labels(value: &Value, path: &str, t: &mut Translated) {
    let Some(map) = value.as_object() else {
        t.untranslated.push(format!("{path} (not an object)"));
        return;
    };
    for (k, v) in map {
        match v.as_str() {
            Some(v) if valid_label_key(k) && valid_label_value(v) => {
                t.labels.insert(k.clone(), v.to_owned());
            }
            _ => t
                .untranslated
                .push(format!("{path}.{k} (not a valid Kubernetes label)")),
        }
    }
}

fn host_config(
    value: &Value,
    path: &str,
    t: &mut Translated,
    exposed: &mut BTreeMap<(u16, Protocol), Option<u16>>,
) {
    let Some(map) = value.as_object() else {
        t.untranslated.push(format!("{path} (not an object)"));
        return;
    };
    for (key, value) in map {
        let here = format!("{path}.{key}");
        if is_empty(value) {
            continue;
        }
        match key.as_str() {
            "Binds" => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        match item.as_str().and_then(bind) {
                            Some(b) => t.binds.push(b),
                            None => t
                                .untranslated
                                .push(format!("{here}[{i}] (not SOURCE:/PATH[:ro|:rw])")),
                        }
                    }
                }
                None => t.untranslated.push(format!("{here} (not an array)")),
            },
            "PortBindings" => match value.as_object() {
                Some(bindings) => {
                    for (spec, hosts) in bindings {
                        let Some(p) = port_spec(spec) else {
                            t.untranslated
                                .push(format!("{here}.{spec} (not PORT/PROTO)"));
                            continue;
                        };
                        let host = hosts
                            .as_array()
                            .and_then(|h| h.first())
                            .and_then(|h| h.get("HostPort"))
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse::<u16>().ok());
                        if hosts.as_array().is_some_and(|h| h.len() > 1) {
                            t.untranslated.push(format!(
                                "{here}.{spec}[1..] (one Service port per container port)"
                            ));
                        }
                        exposed.insert(p, host);
                    }
                }
                None => t.untranslated.push(format!("{here} (not an object)")),
            },
            _ => t.untranslated.push(here),
        }
    }
}

fn port_spec(spec: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Some((p, protocol)),
        _ => None,
    }
}

fn bind(spec: &str) -> Option<Bind> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, container_path, read_only) = match parts.as_slice() {
        [s, c] => (*s, *c, false),
        [s, c, "ro"] => (*s, *c, true),
        [s, c, "rw"] => (*s, *c, false),
        _ => return None,
    };
    if !container_path.starts_with('/') || source.is_empty() {
        return None;
    }
    let source = if source.starts_with('/') {
        BindSource::HostPath(source.to_owned())
    } else if crate::names::is_dns_label(source) {
        BindSource::Named(source.to_owned())
    } else {
        return None;
    };
    Some(Bind {
        source,
        container_path: container_path.to_owned(),
        read_only,
    })
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty() && p.len() <= 253 && p.split('.').all(crate::names::is_dns_label)
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// A Kubernetes label value: empty, or at most 63 alphanumerics, `-`, `_`, `.`, starting and
/// ending alphanumeric.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_translatable_options_are_translated() {
        let t = translate(
            &json!({
                "Env": ["A=1", "B=x=y"],
                "Cmd": ["--verbose"],
                "Entrypoint": "/bin/app",
                "Labels": {"com.example/tier": "edge"},
                "ExposedPorts": {"80/tcp": {}, "5000/udp": {}},
                "HostConfig": {
                    "Binds": ["/var/data:/data:ro", "cache:/cache"],
                    "PortBindings": {"80/tcp": [{"HostPort": "8080"}]}
                }
            }),
            "co",
        );
        assert_eq!(t.untranslated, Vec::<String>::new());
        assert_eq!(
            t.env,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(t.args, Some(vec!["--verbose".to_owned()]));
        assert_eq!(t.command, Some(vec!["/bin/app".to_owned()]));
        assert_eq!(
            t.labels.get("com.example/tier").map(String::as_str),
            Some("edge")
        );
        assert_eq!(
            t.ports,
            vec![
                Port {
                    container_port: 80,
                    protocol: Protocol::Tcp,
                    service_port: 8080
                },
                Port {
                    container_port: 5000,
                    protocol: Protocol::Udp,
                    service_port: 5000
                },
            ]
        );
        assert_eq!(
            t.binds,
            vec![
                Bind {
                    source: BindSource::HostPath("/var/data".into()),
                    container_path: "/data".into(),
                    read_only: true
                },
                Bind {
                    source: BindSource::Named("cache".into()),
                    container_path: "/cache".into(),
                    read_only: false
                },
            ]
        );
    }

    #[test]
    fn everything_else_is_named_not_dropped() {
        let t = translate(
            &json!({
                "User": "1000",
                "Env": ["NOEQUALS"],
                "Labels": {"bad key!": "v"},
                "HostConfig": {"Privileged": true, "Devices": [{"PathOnHost": "/dev/ttyUSB0"}],
                               "LogConfig": {}, "Binds": ["relative/path:/x"]},
                "NetworkingConfig": null
            }),
            "co",
        );
        assert_eq!(
            t.untranslated,
            vec![
                "co.Env[0] (not NAME=VALUE)",
                "co.HostConfig.Binds[0] (not SOURCE:/PATH[:ro|:rw])",
                "co.HostConfig.Devices",
                "co.HostConfig.Privileged",
                "co.Labels.bad key! (not a valid Kubernetes label)",
                "co.User",
            ]
        );
    }

    #[test]
    fn label_rules() {
        assert!(valid_label_key("app.kubernetes.io/name"));
        assert!(valid_label_key("tier"));
        assert!(!valid_label_key("-tier"));
        assert!(!valid_label_key("/tier"));
        assert!(valid_label_value(""));
        assert!(!valid_label_value(&"a".repeat(64)));
    }
}
