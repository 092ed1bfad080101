//! `$edgeHub` desired properties and IoT Edge deployment manifests → a [`RouteTable`].
//!
//! Guarantees:
//! - Pure: takes JSON text or a parsed value, never reads files.
//! - Collects every problem of a manifest, not only the first. Route problems name the route and
//!   the column; structural problems name the JSON path (e.g. `routes.r1.priority`, or
//!   `modulesContent.$edgeHub.properties.desired.routes.r1.priority` in a deployment).
//! - Follows edgeHub's schema: `schemaVersion` 1.0–1.3 (`"1.1"` or `"1.1.0"`); in 1.0 a route
//!   is a string, from 1.1 also `{ "route", "priority": 0-9, "timeToLiveSecs": uint }`;
//!   `storeAndForwardConfiguration` is required from 1.1 and a negative `timeToLiveSecs` means
//!   infinite; a route's `timeToLiveSecs` of 0 (or none) means the store-wide TTL; a route
//!   without priority gets [`Priority::DEFAULT`]; route names match `^[^.$# ]+$`.
//! - Unknown members (`mqttBroker`, `integrity`, `$version`, …) are ignored, except in a route
//!   object, where a key starting with `x-` is an edgehub extension: the known ones are parsed
//!   and any other is an error naming its path (a typo must not silently change delivery).
//!
//! # edgehub extensions (route object form, schema version 1.1 and up)
//!
//! | key | value | meaning |
//! |---|---|---|
//! | `x-edgehub-setAsideAfter` | integer ≥ 1 | set a message aside (counted) after this many failed attempts instead of retrying the head of the queue until it expires |
//! | `x-edgehub-liveFirstSecs` | integer ≥ 1 | messages younger than this many seconds are served before the endpoint's backlog at the same priority |
//!
//! Both are stamped on each message at enqueue by the route that wins for the endpoint (the one
//! that decides priority and TTL), so a reload never changes what queued messages were promised.
//! See [`crate::route::DeliveryOptions`] and the endpoint worker for the ordering contract.
//!
//! # edgehub extension on a module (`$edgeAgent` `modules.<name>`, beside `settings`)
//!
//! `"x-edgehub-replicas": {"count": 1-16, "partitionKey": "$connectionDeviceId" | "$body.<path>"
//! | "<application property>"}` declares a replicated module ([`ReplicaSpec`]; the contract is
//! ARCHITECTURE.md's "Module replicas"). Both members are required and no other is allowed;
//! any other module key starting with `x-edgehub` (any case) is an error, so a typo never
//! silently leaves a module unreplicated. Each problem is a [`ManifestIssue::Replicas`] whose
//! path names the module and the field. Other module keys are edgeAgent's and are ignored.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{ManifestError, ManifestIssue};
use crate::message::ModuleId;
use crate::replicas::spec::{COUNT_FIELD, PARTITION_KEY_FIELD, REPLICAS_KEY};
use crate::replicas::{PartitionKey, ReplicaCount, ReplicaSettingError, ReplicaSpec};
use crate::route::{DeliveryOptions, Priority, Route, RouteId, RouteTable, Ttl};

/// The manifest key of [`DeliveryOptions::set_aside_after`].
pub const SET_ASIDE_AFTER_KEY: &str = "x-edgehub-setAsideAfter";
/// The manifest key of [`DeliveryOptions::live_first_secs`].
pub const LIVE_FIRST_SECS_KEY: &str = "x-edgehub-liveFirstSecs";

/// A `$edgeHub` schema version (major is always 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SchemaVersion {
    /// Always 1.
    pub major: u32,
    /// 0 to 3.
    pub minor: u32,
}

/// What the hub takes from `$edgeHub` desired properties.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeHubConfig {
    /// The declared schema version.
    pub schema_version: SchemaVersion,
    /// The compiled routes.
    pub routes: RouteTable,
    /// `storeAndForwardConfiguration.timeToLiveSecs`: the TTL of routes that set none.
    pub store_ttl: Ttl,
    /// `storeAndForwardConfiguration.storeLimits.maxSizeBytes`, if given.
    pub max_store_size_bytes: Option<u64>,
}

/// What the hub takes from a full deployment manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    /// The `$edgeHub` desired properties.
    pub edge_hub: EdgeHubConfig,
    /// Module names declared under `$edgeAgent` `properties.desired.modules`, sorted.
    pub modules: Vec<ModuleId>,
    /// The desired properties of each module twin the manifest gives
    /// (`modulesContent.<module>.properties.desired`, an object; `$version` in it kept as
    /// written), by module. `$edgeAgent` and `$edgeHub` are not module twins and are not here.
    pub twins_desired: BTreeMap<ModuleId, Map<String, Value>>,
    /// The modules declared replicated (`x-edgehub-replicas` beside their `settings`), by
    /// module: their inputs are partitioned (`crate::replica_worker`), and the k8s controller
    /// runs them as one StatefulSet of up to `count` pods.
    pub replicas: BTreeMap<ModuleId, ReplicaSpec>,
}

/// Parses `$edgeHub` desired properties from JSON text.
pub fn parse_edge_hub_desired(json: &str) -> Result<EdgeHubConfig, ManifestError> {
    parse_edge_hub_desired_value(&parse_json(json)?)
}

/// Parses `$edgeHub` desired properties from a JSON value.
pub fn parse_edge_hub_desired_value(desired: &Value) -> Result<EdgeHubConfig, ManifestError> {
    let mut issues = Issues::default();
    let config = edge_hub_at(desired, "", &mut issues);
    issues.finish(config)
}

/// Parses a deployment manifest (`{"modulesContent": …}`, or `{"content": {"modulesContent":
/// …}}` as the Azure CLI writes it) from JSON text.
pub fn parse_deployment(json: &str) -> Result<Deployment, ManifestError> {
    parse_deployment_value(&parse_json(json)?)
}

/// Parses a deployment manifest from a JSON value.
pub fn parse_deployment_value(manifest: &Value) -> Result<Deployment, ManifestError> {
    let mut issues = Issues::default();
    let (content, prefix) = match manifest.pointer("/content/modulesContent") {
        Some(content) => (Some(content), "content.modulesContent"),
        None => (manifest.get("modulesContent"), "modulesContent"),
    };
    let Some(content) = content else {
        issues.add(prefix, "missing");
        return issues.finish(None);
    };
    let (modules, replicas) = modules(content, prefix, &mut issues);
    let hub_path = join(prefix, "$edgeHub.properties.desired");
    let config = match desired_of(content, "$edgeHub", &hub_path, &mut issues) {
        Some(desired) => edge_hub_at(desired, &hub_path, &mut issues),
        None => None,
    };
    let twins_desired = twins_desired(content, prefix, &mut issues);
    issues.finish(config.map(|edge_hub| Deployment {
        edge_hub,
        modules,
        twins_desired,
        replicas,
    }))
}

/// The desired properties of every module twin in `modulesContent` (other than `$edgeAgent`
/// and `$edgeHub`): a module without them has none (an empty twin); given, they must be an
/// object.
fn twins_desired(
    content: &Value,
    prefix: &str,
    issues: &mut Issues,
) -> BTreeMap<ModuleId, Map<String, Value>> {
    let mut twins = BTreeMap::new();
    let Some(content) = content.as_object() else {
        return twins;
    };
    for (name, twin) in content {
        if name == "$edgeAgent" || name == "$edgeHub" {
            continue;
        }
        let path = join(prefix, &format!("{name}.properties.desired"));
        let dotted = twin.get("properties.desired");
        let nested = twin.pointer("/properties/desired");
        let desired = match (dotted, nested) {
            (None, None) => continue,
            (Some(d), None) | (None, Some(d)) => d,
            (Some(_), Some(_)) => {
                issues.add(
                    &path,
                    "given twice: as \"properties.desired\" and as \"properties\": {\"desired\"}",
                );
                continue;
            }
        };
        match desired {
            Value::Object(map) => {
                twins.insert(ModuleId::new(name), map.clone());
            }
            _ => issues.add(&path, "must be an object"),
        }
    }
    twins
}

fn parse_json(json: &str) -> Result<Value, ManifestError> {
    serde_json::from_str(json).map_err(|e| ManifestError {
        issues: vec![ManifestIssue::Structure {
            path: "$".to_owned(),
            reason: format!("invalid JSON: {e}"),
        }],
    })
}

/// Problems found so far.
#[derive(Default)]
struct Issues(Vec<ManifestIssue>);

impl Issues {
    fn add(&mut self, path: &str, reason: impl Into<String>) {
        let path = if path.is_empty() {
            "$".to_owned()
        } else {
            path.to_owned()
        };
        self.0.push(ManifestIssue::Structure {
            path,
            reason: reason.into(),
        });
    }

    fn finish<T>(self, value: Option<T>) -> Result<T, ManifestError> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(ManifestError { issues: self.0 }),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The desired properties of a module twin in a deployment: real manifests (Microsoft's docs,
/// `deployment.template.json`, `az iot edge`) write them under the one key `"properties.desired"`;
/// the nested form `"properties": {"desired": …}` is accepted too. Both at once is ambiguous.
fn desired_of<'a>(
    content: &'a Value,
    twin: &str,
    path: &str,
    issues: &mut Issues,
) -> Option<&'a Value> {
    let twin = content.get(twin);
    let dotted = twin.and_then(|t| t.get("properties.desired"));
    let nested = twin.and_then(|t| t.pointer("/properties/desired"));
    match (dotted, nested) {
        (Some(d), None) | (None, Some(d)) => Some(d),
        (Some(_), Some(_)) => {
            issues.add(
                path,
                "given twice: as \"properties.desired\" and as \"properties\": {\"desired\"}",
            );
            None
        }
        (None, None) => {
            issues.add(path, "missing");
            None
        }
    }
}

/// The modules `$edgeAgent` declares, sorted, and those of them declared replicated.
fn modules(
    content: &Value,
    prefix: &str,
    issues: &mut Issues,
) -> (Vec<ModuleId>, BTreeMap<ModuleId, ReplicaSpec>) {
    let mut replicas = BTreeMap::new();
    let agent_path = join(prefix, "$edgeAgent.properties.desired");
    let Some(agent) = desired_of(content, "$edgeAgent", &agent_path, issues) else {
        return (Vec::new(), replicas);
    };
    let modules_path = join(&agent_path, "modules");
    match agent.get("modules") {
        None => (Vec::new(), replicas),
        Some(Value::Object(modules)) => {
            let mut names: Vec<ModuleId> = modules.keys().map(ModuleId::new).collect();
            names.sort();
            for (name, module) in modules {
                let module_path = join(&modules_path, name);
                if let Some(spec) = module_replicas(name, module, &module_path, issues) {
                    replicas.insert(ModuleId::new(name), spec);
                }
            }
            (names, replicas)
        }
        Some(_) => {
            issues.add(&modules_path, "must be an object of modules");
            (Vec::new(), replicas)
        }
    }
}

/// A module's `x-edgehub-replicas`: `None` when it has none or it is refused (issues recorded,
/// each at the path of its field).
fn module_replicas(
    name: &str,
    module: &Value,
    path: &str,
    issues: &mut Issues,
) -> Option<ReplicaSpec> {
    let module = module.as_object()?;
    let mut refuse = |key: &str, error: ReplicaSettingError| {
        issues.0.push(ManifestIssue::Replicas {
            path: join(path, key),
            module: ModuleId::new(name),
            error,
        });
    };
    for key in module.keys() {
        let ours = key
            .get(..9)
            .is_some_and(|p| p.eq_ignore_ascii_case("x-edgehub"));
        if ours && key != REPLICAS_KEY {
            refuse(key, ReplicaSettingError::UnknownExtension);
        }
    }
    let setting = match module.get(REPLICAS_KEY)? {
        Value::Object(setting) => setting,
        other => {
            let found = other.to_string();
            refuse(REPLICAS_KEY, ReplicaSettingError::NotAnObject { found });
            return None;
        }
    };
    let field = |f: &str| format!("{REPLICAS_KEY}.{f}");
    for key in setting.keys() {
        if key != COUNT_FIELD && key != PARTITION_KEY_FIELD {
            refuse(&field(key), ReplicaSettingError::UnknownMember);
        }
    }
    let count = match setting.get(COUNT_FIELD) {
        None => Err(ReplicaSettingError::Missing),
        Some(v) => match v.as_u64() {
            Some(n) => ReplicaCount::new(n).map_err(ReplicaSettingError::from),
            None => Err(ReplicaSettingError::CountNotInteger {
                found: v.to_string(),
            }),
        },
    };
    let key = match setting.get(PARTITION_KEY_FIELD) {
        None => Err(ReplicaSettingError::Missing),
        Some(Value::String(text)) => PartitionKey::parse(text).map_err(ReplicaSettingError::from),
        Some(v) => Err(ReplicaSettingError::KeyNotString {
            found: v.to_string(),
        }),
    };
    let count = count.map_err(|e| refuse(&field(COUNT_FIELD), e)).ok();
    let key = key.map_err(|e| refuse(&field(PARTITION_KEY_FIELD), e)).ok();
    Some(ReplicaSpec {
        count: count?,
        key: key?,
    })
}

fn edge_hub_at(desired: &Value, prefix: &str, issues: &mut Issues) -> Option<EdgeHubConfig> {
    let Some(desired) = desired.as_object() else {
        issues.add(prefix, "must be an object");
        return None;
    };
    let version = schema_version(desired, prefix, issues);
    let (store_ttl, max_store_size_bytes) = store_and_forward(desired, version, prefix, issues);
    let routes = routes(desired, version, store_ttl, prefix, issues);
    Some(EdgeHubConfig {
        schema_version: version?,
        routes: RouteTable::new(routes),
        store_ttl,
        max_store_size_bytes,
    })
}

fn schema_version(
    desired: &Map<String, Value>,
    prefix: &str,
    issues: &mut Issues,
) -> Option<SchemaVersion> {
    let path = join(prefix, "schemaVersion");
    let Some(text) = desired.get("schemaVersion") else {
        issues.add(&path, "missing");
        return None;
    };
    let parsed = text.as_str().and_then(parse_version);
    if parsed.is_none() {
        issues.add(
            &path,
            format!("unsupported schema version {text}: expected \"1.0\" to \"1.3\""),
        );
    }
    parsed
}

/// A .NET `Version` string (2 to 4 numeric parts) with major 1 and minor 0–3.
fn parse_version(text: &str) -> Option<SchemaVersion> {
    let parts: Vec<u32> = text
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [1, minor, ..] if parts.len() <= 4 && *minor <= 3 => Some(SchemaVersion {
            major: 1,
            minor: *minor,
        }),
        _ => None,
    }
}

fn store_and_forward(
    desired: &Map<String, Value>,
    version: Option<SchemaVersion>,
    prefix: &str,
    issues: &mut Issues,
) -> (Ttl, Option<u64>) {
    let path = join(prefix, "storeAndForwardConfiguration");
    let Some(config) = desired.get("storeAndForwardConfiguration") else {
        if version.is_some_and(|v| v.minor >= 1) {
            issues.add(&path, "missing (required from schema version 1.1)");
        }
        return (Ttl::Infinite, None);
    };
    let Some(config) = config.as_object() else {
        issues.add(&path, "must be an object");
        return (Ttl::Infinite, None);
    };
    let ttl = match config.get("timeToLiveSecs") {
        None => Ttl::Infinite,
        Some(v) => match v.as_i64() {
            Some(secs) => u64::try_from(secs).map_or(Ttl::Infinite, Ttl::Seconds),
            None => {
                issues.add(
                    &join(&path, "timeToLiveSecs"),
                    format!("must be an integer, not {v}"),
                );
                Ttl::Infinite
            }
        },
    };
    (ttl, max_size_bytes(config, &path, issues))
}

fn max_size_bytes(config: &Map<String, Value>, path: &str, issues: &mut Issues) -> Option<u64> {
    let value = config.get("storeLimits")?.get("maxSizeBytes")?;
    let bytes = value.as_u64();
    if bytes.is_none() {
        issues.add(
            &join(path, "storeLimits.maxSizeBytes"),
            format!("must be a non-negative integer, not {value}"),
        );
    }
    bytes
}

fn routes(
    desired: &Map<String, Value>,
    version: Option<SchemaVersion>,
    store_ttl: Ttl,
    prefix: &str,
    issues: &mut Issues,
) -> Vec<Route> {
    let path = join(prefix, "routes");
    let routes = match desired.get("routes") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Object(routes)) => routes,
        Some(_) => {
            issues.add(&path, "must be an object of named routes");
            return Vec::new();
        }
    };
    let objects_allowed = version.is_none_or(|v| v.minor >= 1);
    routes
        .iter()
        .filter_map(|(name, value)| {
            let route_path = join(&path, name);
            route(name, value, objects_allowed, store_ttl, &route_path, issues)
        })
        .collect()
}

fn valid_route_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['.', '$', '#', ' '])
}

/// One route entry; `None` (with issues recorded) when it is invalid.
fn route(
    name: &str,
    value: &Value,
    objects_allowed: bool,
    store_ttl: Ttl,
    path: &str,
    issues: &mut Issues,
) -> Option<Route> {
    if !valid_route_name(name) {
        issues.add(
            path,
            "route names may not be empty or contain '.', '$', '#' or ' '",
        );
    }
    let (text, priority, ttl, options) = match value {
        Value::String(text) => (
            text.as_str(),
            Priority::DEFAULT,
            store_ttl,
            DeliveryOptions::default(),
        ),
        Value::Object(spec) if objects_allowed => route_object(spec, store_ttl, path, issues)?,
        Value::Object(_) => {
            issues.add(path, "schema version 1.0 allows only route strings");
            return None;
        }
        _ => {
            issues.add(path, "must be a route string or an object with \"route\"");
            return None;
        }
    };
    Route::parse(RouteId::new(name), text, priority, ttl)
        .map(|r| r.with_options(options))
        .map_err(|e| issues.0.push(ManifestIssue::Route(e)))
        .ok()
        .filter(|_| valid_route_name(name))
}

fn route_object<'v>(
    spec: &'v Map<String, Value>,
    store_ttl: Ttl,
    path: &str,
    issues: &mut Issues,
) -> Option<(&'v str, Priority, Ttl, DeliveryOptions)> {
    let options = extensions(spec, path, issues);
    let priority = match spec.get("priority") {
        None | Some(Value::Null) => Some(Priority::DEFAULT),
        Some(v) => match v
            .as_u64()
            .filter(|p| *p <= u64::from(Priority::LOWEST_EXPLICIT.0))
        {
            Some(p) => u32::try_from(p).ok().map(Priority),
            None => {
                issues.add(
                    &join(path, "priority"),
                    format!("must be an integer from 0 to 9, not {v}"),
                );
                None
            }
        },
    };
    let ttl = match spec.get("timeToLiveSecs") {
        None | Some(Value::Null) => Some(store_ttl),
        Some(v) => match v.as_u64().filter(|s| *s <= u64::from(u32::MAX)) {
            Some(0) => Some(store_ttl),
            Some(secs) => Some(Ttl::Seconds(secs)),
            None => {
                issues.add(
                    &join(path, "timeToLiveSecs"),
                    format!("must be a non-negative integer, not {v}"),
                );
                None
            }
        },
    };
    let text = match spec.get("route") {
        Some(Value::String(text)) => Some(text.as_str()),
        Some(v) => {
            issues.add(&join(path, "route"), format!("must be a string, not {v}"));
            None
        }
        None => {
            issues.add(&join(path, "route"), "missing");
            None
        }
    };
    Some((text?, priority?, ttl?, options?))
}

/// The `x-` keys of a route object; `None` (with issues recorded) when one is invalid.
fn extensions(
    spec: &Map<String, Value>,
    path: &str,
    issues: &mut Issues,
) -> Option<DeliveryOptions> {
    let mut options = DeliveryOptions::default();
    let mut valid = true;
    for (key, value) in spec {
        if !key.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")) {
            continue;
        }
        let slot = match key.as_str() {
            SET_ASIDE_AFTER_KEY => &mut options.set_aside_after,
            LIVE_FIRST_SECS_KEY => &mut options.live_first_secs,
            _ => {
                issues.add(
                    &join(path, key),
                    format!(
                        "unknown edgehub extension (known: {SET_ASIDE_AFTER_KEY}, \
                         {LIVE_FIRST_SECS_KEY})"
                    ),
                );
                valid = false;
                continue;
            }
        };
        match value
            .as_u64()
            .filter(|n| *n >= 1)
            .and_then(|n| u32::try_from(n).ok())
        {
            Some(n) => *slot = Some(n),
            None => {
                issues.add(
                    &join(path, key),
                    format!("must be an integer from 1 to {}, not {value}", u32::MAX),
                );
                valid = false;
            }
        }
    }
    valid.then_some(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicas::ReplicaCountError;

    #[test]
    fn versions_accept_two_to_four_parts_with_minor_up_to_three() {
        assert_eq!(
            parse_version("1.1"),
            Some(SchemaVersion { major: 1, minor: 1 })
        );
        assert_eq!(
            parse_version("1.3.0"),
            Some(SchemaVersion { major: 1, minor: 3 })
        );
        for bad in ["1", "1.4", "2.0", "1.x", "", "1.0.0.0.0"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    fn desired(route: &str) -> String {
        format!(
            r#"{{"schemaVersion": "1.1", "storeAndForwardConfiguration": {{}},
                "routes": {{ "r1": {route} }} }}"#
        )
    }

    #[test]
    fn edgehub_extensions_are_parsed_into_the_routes_options() {
        let config = parse_edge_hub_desired(&desired(
            r#"{ "route": "FROM /* INTO $upstream", "priority": 0, "timeToLiveSecs": 60,
                 "x-edgehub-setAsideAfter": 5, "x-edgehub-liveFirstSecs": 30 }"#,
        ))
        .unwrap();
        let options = config.routes.routes()[0].options();
        assert_eq!(
            options,
            DeliveryOptions {
                set_aside_after: Some(5),
                live_first_secs: Some(30),
            }
        );
        let plain = parse_edge_hub_desired(&desired(r#""FROM /* INTO $upstream""#)).unwrap();
        assert!(plain.routes.routes()[0].options().is_default());
    }

    #[test]
    fn unknown_or_invalid_extensions_are_errors_at_their_path() {
        let err = parse_edge_hub_desired(&desired(
            r#"{ "route": "FROM /* INTO $upstream", "x-edgehub-setAsideAftr": 5,
                 "X-Other": true, "x-edgehub-liveFirstSecs": 0, "comment": "ignored" }"#,
        ))
        .unwrap_err();
        let paths: Vec<String> =
            err.issues
                .iter()
                .map(|i| match i {
                    ManifestIssue::Structure { path, .. }
                    | ManifestIssue::Replicas { path, .. } => path.clone(),
                    ManifestIssue::Route(e) => e.to_string(),
                })
                .collect();
        assert_eq!(
            paths,
            [
                "routes.r1.X-Other",
                "routes.r1.x-edgehub-liveFirstSecs",
                "routes.r1.x-edgehub-setAsideAftr",
            ]
        );
        for bad in [r#""five""#, "-1", "1.5", "4294967296", "null"] {
            let route = format!(
                r#"{{ "route": "FROM /* INTO $upstream", "x-edgehub-setAsideAfter": {bad} }}"#
            );
            assert!(parse_edge_hub_desired(&desired(&route)).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_names_reject_dots_dollars_hashes_and_spaces() {
        assert!(valid_route_name("toCloud_1-x"));
        for bad in ["a.b", "$a", "a#", "a b", ""] {
            assert!(!valid_route_name(bad), "{bad}");
        }
    }

    #[test]
    fn module_twins_desired_properties_are_taken_from_the_deployment() {
        let text = r#"{"modulesContent": {
            "$edgeAgent": {"properties.desired": {"modules": {"a": {}, "b": {}, "c": {}}}},
            "$edgeHub": {"properties.desired": {"schemaVersion": "1.0", "routes": {}}},
            "a": {"properties.desired": {"rate": 5, "$version": 3}},
            "b": {"properties": {"desired": {"on": true}}}
        }}"#;
        let d = parse_deployment(text).unwrap();
        let a = &d.twins_desired[&ModuleId::new("a")];
        assert_eq!(a["rate"], 5);
        assert_eq!(a["$version"], 3);
        assert_eq!(d.twins_desired[&ModuleId::new("b")]["on"], true);
        assert!(!d.twins_desired.contains_key(&ModuleId::new("c")));
        assert!(!d.twins_desired.contains_key(&ModuleId::new("$edgeHub")));
        let bad = text.replace(r#"{"rate": 5, "$version": 3}"#, "[1]");
        let err = parse_deployment(&bad).unwrap_err().to_string();
        assert!(err.contains("modulesContent.a.properties.desired"), "{err}");
    }

    fn with_filter_module(filter: &str) -> String {
        format!(
            r#"{{"modulesContent": {{
                "$edgeAgent": {{"properties.desired": {{"modules": {{
                    "filter": {filter},
                    "plain": {{"settings": {{"image": "p:1"}}}}
                }}}}}},
                "$edgeHub": {{"properties.desired": {{"schemaVersion": "1.0", "routes": {{}}}}}}
            }}}}"#
        )
    }

    fn replicas_of(setting: &str) -> Result<Deployment, ManifestError> {
        parse_deployment(&with_filter_module(&format!(
            r#"{{"settings": {{"image": "f:1"}}, "x-edgehub-replicas": {setting}}}"#
        )))
    }

    /// Every refused replica setting as (path, module, error).
    fn replica_issues(err: &ManifestError) -> Vec<(String, String, ReplicaSettingError)> {
        err.issues
            .iter()
            .filter_map(|i| match i {
                ManifestIssue::Replicas {
                    path,
                    module,
                    error,
                } => Some((path.clone(), module.to_string(), error.clone())),
                _ => None,
            })
            .collect()
    }

    const AT: &str = "modulesContent.$edgeAgent.properties.desired.modules.filter";

    #[test]
    fn a_replicated_module_is_parsed_beside_its_settings() {
        let d = replicas_of(r#"{"count": 3, "partitionKey": "$body.sensor.id"}"#).unwrap();
        assert_eq!(d.modules, [ModuleId::new("filter"), ModuleId::new("plain")]);
        let spec = &d.replicas[&ModuleId::new("filter")];
        assert_eq!(spec.count.get(), 3);
        assert_eq!(spec.key.to_string(), "$body.sensor.id");
        assert!(!d.replicas.contains_key(&ModuleId::new("plain")));

        for (key, expected) in [
            ("$connectionDeviceId", PartitionKey::ConnectionDeviceId),
            ("sensorId", PartitionKey::Property("sensorId".to_owned())),
        ] {
            let setting = format!(r#"{{"count": 16, "partitionKey": "{key}"}}"#);
            let d = replicas_of(&setting).unwrap();
            assert_eq!(d.replicas[&ModuleId::new("filter")].key, expected);
        }
        let none = parse_deployment(&with_filter_module(r#"{"settings": {}}"#)).unwrap();
        assert!(none.replicas.is_empty());
    }

    #[test]
    fn a_broken_count_is_refused_at_its_path_naming_the_module() {
        for (count, expected) in [
            (
                "0",
                ReplicaSettingError::Count(ReplicaCountError { value: 0 }),
            ),
            (
                "17",
                ReplicaSettingError::Count(ReplicaCountError { value: 17 }),
            ),
            (
                "-1",
                ReplicaSettingError::CountNotInteger { found: "-1".into() },
            ),
            (
                "2.5",
                ReplicaSettingError::CountNotInteger {
                    found: "2.5".into(),
                },
            ),
            (
                r#""3""#,
                ReplicaSettingError::CountNotInteger {
                    found: r#""3""#.into(),
                },
            ),
            (
                "null",
                ReplicaSettingError::CountNotInteger {
                    found: "null".into(),
                },
            ),
        ] {
            let setting = format!(r#"{{"count": {count}, "partitionKey": "k"}}"#);
            let err = replicas_of(&setting).unwrap_err();
            assert_eq!(
                replica_issues(&err),
                [(
                    format!("{AT}.x-edgehub-replicas.count"),
                    "filter".to_owned(),
                    expected
                )],
                "{count}"
            );
            let text = err.to_string();
            assert!(
                text.contains("modules.filter.x-edgehub-replicas.count"),
                "{text}"
            );
            assert!(text.contains("from 1 to 16"), "{text}");
        }
    }

    #[test]
    fn a_broken_partition_key_is_refused_at_its_path() {
        for key in ["5", r#""""#, r#""$messageId""#, r#""$body.a..b""#, "[]"] {
            let setting = format!(r#"{{"count": 2, "partitionKey": {key}}}"#);
            let err = replicas_of(&setting).unwrap_err();
            let issues = replica_issues(&err);
            assert_eq!(issues.len(), 1, "{key}: {issues:?}");
            assert_eq!(
                issues[0].0,
                format!("{AT}.x-edgehub-replicas.partitionKey"),
                "{key}"
            );
            assert!(
                matches!(
                    issues[0].2,
                    ReplicaSettingError::PartitionKey(_) | ReplicaSettingError::KeyNotString { .. }
                ),
                "{key}: {issues:?}"
            );
        }
    }

    #[test]
    fn missing_fields_unknown_members_and_typos_are_each_reported() {
        let err = replicas_of(r#"{"cuont": 2}"#).unwrap_err();
        let paths: Vec<String> = replica_issues(&err).into_iter().map(|i| i.0).collect();
        assert_eq!(
            paths,
            [
                format!("{AT}.x-edgehub-replicas.cuont"),
                format!("{AT}.x-edgehub-replicas.count"),
                format!("{AT}.x-edgehub-replicas.partitionKey"),
            ]
        );
        let err = replicas_of("3").unwrap_err();
        assert!(matches!(
            replica_issues(&err)[..],
            [(_, _, ReplicaSettingError::NotAnObject { .. })]
        ));
        for typo in [
            "x-edgehub-replica",
            "X-EdgeHub-Replicas",
            "x-edgehubReplicas",
        ] {
            let module = format!(r#"{{"settings": {{}}, "{typo}": {{"count": 2}}}}"#);
            let err = parse_deployment(&with_filter_module(&module)).unwrap_err();
            assert_eq!(
                replica_issues(&err),
                [(
                    format!("{AT}.{typo}"),
                    "filter".to_owned(),
                    ReplicaSettingError::UnknownExtension
                )],
                "{typo}"
            );
        }
        let vendor = r#"{"settings": {}, "x-vendor-thing": 1}"#;
        assert!(parse_deployment(&with_filter_module(vendor)).is_ok());
    }
}
