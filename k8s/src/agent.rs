//! The `$edgeAgent` part of a deployment manifest: which modules run, from which image, with
//! which Docker `createOptions`, environment, status and restart policy.
//!
//! The `$edgeHub` part is checked by the very parser the hub runs
//! ([`router::manifest::parse_deployment_value`], what `edgehub check-manifest` prints), so a
//! manifest the controller accepts is one the hub accepts, and its problems read the same.
//!
//! Guarantees:
//! - Pure: takes a parsed manifest, never reads files or the API.
//! - Collects every problem, each located by its JSON path
//!   (`modulesContent.$edgeAgent.properties.desired.modules.M.settings.image: missing`).
//! - `settings.createOptions` is a JSON *string*; IoT Edge splits long ones into
//!   `createOptions`, `createOptions01`, `createOptions02`, …, which are joined in that order.

use std::collections::BTreeMap;
use std::fmt;

use router::replicas::ReplicaCount;
use router::ModuleId;
use serde_json::{Map, Value};

/// A module's name as the manifest spells it (also its IoT Hub module id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleName(String);

impl ModuleName {
    /// Wraps a name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `status` of a module: whether it should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredStatus {
    /// `running` (the default).
    Running,
    /// `stopped`: its workload is kept with zero replicas.
    Stopped,
}

/// `restartPolicy` of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// `always` (the default): what a StatefulSet does.
    Always,
    /// `on-failure`.
    OnFailure,
    /// `on-unhealthy`.
    OnUnhealthy,
    /// `never`.
    Never,
}

impl RestartPolicy {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::OnFailure => "on-failure",
            Self::OnUnhealthy => "on-unhealthy",
            Self::Never => "never",
        }
    }
}

/// One `$edgeAgent` module.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentModule {
    /// Its name.
    pub name: ModuleName,
    /// The JSON path of its entry (for messages).
    pub path: String,
    /// `settings.image`.
    pub image: String,
    /// `settings.createOptions` (joined chunks), parsed; `None` when absent.
    pub create_options: Option<Value>,
    /// `env`: name → value, in name order.
    pub env: BTreeMap<String, String>,
    /// `status`.
    pub status: DesiredStatus,
    /// `restartPolicy`.
    pub restart_policy: RestartPolicy,
    /// `x-edgehub-replicas.count` (parsed by the hub's own parser): the most pods of a
    /// replicated module; `None` for a module that is not replicated.
    pub replicas: Option<ReplicaCount>,
}

/// One problem of a manifest, located by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `modulesContent.$edgeAgent.properties.desired.modules.M.settings.image`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Every problem of a manifest: the hub's own (router) ones first, then the `$edgeAgent` ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestProblems {
    /// The located messages, as `edgehub check-manifest` prints them.
    pub messages: Vec<String>,
}

impl fmt::Display for ManifestProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the manifest", self.messages.len())?;
        for m in &self.messages {
            write!(f, "; {m}")?;
        }
        Ok(())
    }
}

/// Checks a whole deployment manifest: `$edgeHub` with the hub's parser, `$edgeAgent` here.
/// Returns the modules, sorted by name.
pub fn parse_manifest(manifest: &Value) -> Result<Vec<AgentModule>, ManifestProblems> {
    let mut messages = Vec::new();
    let replicas = match router::manifest::parse_deployment_value(manifest) {
        Ok(deployment) => deployment.replicas,
        Err(e) => {
            messages.extend(e.issues.iter().map(ToString::to_string));
            BTreeMap::new()
        }
    };
    match parse_agent(manifest) {
        Ok(mut modules) if messages.is_empty() => {
            for m in &mut modules {
                m.replicas = replicas
                    .get(&ModuleId::new(m.name.as_str()))
                    .map(|spec| spec.count);
            }
            return Ok(modules);
        }
        Ok(_) => {}
        Err(problems) => {
            for p in problems {
                let m = p.to_string();
                // The router reports a missing $edgeAgent too; say it once.
                if !messages.contains(&m) {
                    messages.push(m);
                }
            }
        }
    }
    Err(ManifestProblems { messages })
}

/// Parses the `$edgeAgent` modules of a manifest (`modulesContent` or
/// `content.modulesContent`), collecting every problem. `replicas` is left `None`: the hub's
/// parser reads `x-edgehub-replicas` ([`parse_manifest`] fills it in).
pub fn parse_agent(manifest: &Value) -> Result<Vec<AgentModule>, Vec<Problem>> {
    let mut problems = Vec::new();
    let (content, prefix) = match manifest.pointer("/content/modulesContent") {
        Some(c) => (Some(c), "content.modulesContent"),
        None => (manifest.get("modulesContent"), "modulesContent"),
    };
    let Some(content) = content else {
        return Err(vec![problem(prefix, "missing")]);
    };
    let agent_path = format!("{prefix}.$edgeAgent.properties.desired");
    let agent = content.get("$edgeAgent");
    let desired = agent
        .and_then(|a| a.get("properties.desired"))
        .or_else(|| agent.and_then(|a| a.pointer("/properties/desired")));
    let Some(desired) = desired else {
        return Err(vec![problem(&agent_path, "missing")]);
    };
    let mut modules = Vec::new();
    match desired.get("modules") {
        None => {}
        Some(Value::Object(entries)) => {
            for (name, entry) in entries {
                let path = format!("{agent_path}.modules.{name}");
                if let Some(m) = module(name, entry, &path, &mut problems) {
                    modules.push(m);
                }
            }
        }
        Some(_) => problems.push(problem(
            &format!("{agent_path}.modules"),
            "must be an object of modules",
        )),
    }
    if problems.is_empty() {
        modules.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(modules)
    } else {
        Err(problems)
    }
}

fn problem(path: &str, reason: impl Into<String>) -> Problem {
    Problem {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn module(
    name: &str,
    entry: &Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<AgentModule> {
    let before = problems.len();
    let Some(entry) = entry.as_object() else {
        problems.push(problem(path, "must be an object"));
        return None;
    };
    let settings_path = format!("{path}.settings");
    let settings = match entry.get("settings") {
        Some(Value::Object(s)) => Some(s),
        Some(_) => {
            problems.push(problem(&settings_path, "must be an object"));
            None
        }
        None => {
            problems.push(problem(&settings_path, "missing"));
            None
        }
    };
    let image = match settings.map(|s| s.get("image")) {
        Some(Some(Value::String(i))) if !i.trim().is_empty() => i.clone(),
        Some(Some(_)) => {
            problems.push(problem(
                &format!("{settings_path}.image"),
                "must be a non-empty string",
            ));
            String::new()
        }
        Some(None) => {
            problems.push(problem(&format!("{settings_path}.image"), "missing"));
            String::new()
        }
        None => String::new(),
    };
    let create_options = settings.and_then(|s| create_options(s, &settings_path, problems));
    let env = env(entry.get("env"), &format!("{path}.env"), problems);
    let status = match entry.get("status") {
        None => DesiredStatus::Running,
        Some(Value::String(s)) if s == "running" => DesiredStatus::Running,
        Some(Value::String(s)) if s == "stopped" => DesiredStatus::Stopped,
        Some(_) => {
            problems.push(problem(
                &format!("{path}.status"),
                "must be \"running\" or \"stopped\"",
            ));
            DesiredStatus::Running
        }
    };
    let restart_policy = match entry.get("restartPolicy").map(Value::as_str) {
        None | Some(Some("always")) => RestartPolicy::Always,
        Some(Some("on-failure")) => RestartPolicy::OnFailure,
        Some(Some("on-unhealthy")) => RestartPolicy::OnUnhealthy,
        Some(Some("never")) => RestartPolicy::Never,
        Some(_) => {
            problems.push(problem(
                &format!("{path}.restartPolicy"),
                "must be one of \"always\", \"on-failure\", \"on-unhealthy\", \"never\"",
            ));
            RestartPolicy::Always
        }
    };
    (problems.len() == before).then(|| AgentModule {
        name: ModuleName::new(name),
        path: path.to_owned(),
        image,
        create_options,
        env,
        status,
        restart_policy,
        replicas: None,
    })
}

/// Joins `createOptions`, `createOptions01`, `createOptions02`, … and parses the result.
fn create_options(
    settings: &Map<String, Value>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<Value> {
    let mut chunks: Vec<(u32, &str, &Value)> = Vec::new();
    for (key, value) in settings {
        let Some(rest) = key.strip_prefix("createOptions") else {
            continue;
        };
        let index = if rest.is_empty() {
            0
        } else if rest.len() == 2 && rest.bytes().all(|b| b.is_ascii_digit()) {
            match rest.parse::<u32>() {
                Ok(n) if n > 0 => n,
                _ => {
                    problems.push(problem(
                        &format!("{path}.{key}"),
                        "chunks are numbered createOptions01, createOptions02, …",
                    ));
                    continue;
                }
            }
        } else {
            problems.push(problem(
                &format!("{path}.{key}"),
                "unknown key: chunks are named createOptions01, createOptions02, …",
            ));
            continue;
        };
        chunks.push((index, key, value));
    }
    if chunks.is_empty() {
        return None;
    }
    chunks.sort_by_key(|c| c.0);
    let mut text = String::new();
    for (expected, (index, key, value)) in chunks.iter().enumerate() {
        if *index as usize != expected {
            problems.push(problem(
                &format!("{path}.{key}"),
                "chunks must follow createOptions without gaps (createOptions01, createOptions02, …)",
            ));
            return None;
        }
        match value {
            Value::String(s) => text.push_str(s),
            // Some tools write the options as an object; accept it unsplit.
            Value::Object(_) if chunks.len() == 1 => return Some((*value).clone()),
            _ => {
                problems.push(problem(
                    &format!("{path}.{key}"),
                    "must be a string holding JSON (Docker create options)",
                ));
                return None;
            }
        }
    }
    let joined_path = format!("{path}.createOptions");
    if text.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => Some(v),
        Ok(_) => {
            problems.push(problem(&joined_path, "must hold a JSON object"));
            None
        }
        Err(e) => {
            problems.push(problem(&joined_path, format!("invalid JSON: {e}")));
            None
        }
    }
}

fn env(env: Option<&Value>, path: &str, problems: &mut Vec<Problem>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match env {
        None => {}
        Some(Value::Object(vars)) => {
            for (name, var) in vars {
                let var_path = format!("{path}.{name}");
                match var.get("value") {
                    Some(Value::String(s)) => {
                        out.insert(name.clone(), s.clone());
                    }
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                        out.insert(name.clone(), v.to_string());
                    }
                    Some(_) => problems.push(problem(
                        &format!("{var_path}.value"),
                        "must be a string, number or boolean",
                    )),
                    None => problems.push(problem(&var_path, "must be an object with \"value\"")),
                }
            }
        }
        Some(_) => problems.push(problem(
            path,
            "must be an object of {\"NAME\": {\"value\": …}}",
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(modules: Value) -> Value {
        json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": modules}},
            "$edgeHub": {"properties.desired": {
                "schemaVersion": "1.1",
                "routes": {"r": "FROM /messages/* INTO $upstream"},
                "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
            }}
        }})
    }

    #[test]
    fn modules_are_read_with_their_settings_env_status_and_policy() {
        let m = manifest(json!({
            "b": {"settings": {"image": "img/b:1"}, "status": "stopped", "restartPolicy": "never",
                  "env": {"X": {"value": "1"}, "N": {"value": 5}}},
            "a": {"settings": {"image": "img/a:1", "createOptions": "{\"Env\":[\"K=V\"]}"}}
        }));
        let modules = parse_manifest(&m).expect("valid");
        assert_eq!(modules.len(), 2);
        assert_eq!(modules[0].name.as_str(), "a");
        assert_eq!(modules[0].create_options, Some(json!({"Env": ["K=V"]})));
        assert_eq!(modules[0].status, DesiredStatus::Running);
        assert_eq!(modules[1].status, DesiredStatus::Stopped);
        assert_eq!(modules[1].restart_policy, RestartPolicy::Never);
        assert_eq!(modules[1].env.get("N").map(String::as_str), Some("5"));
        assert_eq!(modules[1].env.get("X").map(String::as_str), Some("1"));
    }

    #[test]
    fn a_replicated_modules_count_is_the_hubs_parse_of_it() {
        let m = manifest(json!({
            "filter": {"settings": {"image": "f:1"},
                       "x-edgehub-replicas": {"count": 3, "partitionKey": "$body.id"}},
            "plain": {"settings": {"image": "p:1"}}
        }));
        let modules = parse_manifest(&m).expect("valid");
        assert_eq!(modules[0].replicas.map(ReplicaCount::get), Some(3));
        assert_eq!(modules[1].replicas, None);

        let mut bad = m.clone();
        bad["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["filter"]
            ["x-edgehub-replicas"]["count"] = json!(17);
        let err = parse_manifest(&bad).expect_err("count 17");
        assert!(
            err.messages
                .iter()
                .any(|m| m.contains("modules.filter.x-edgehub-replicas.count")),
            "{:?}",
            err.messages
        );
    }

    #[test]
    fn create_options_chunks_are_joined_in_order() {
        let m = manifest(json!({"a": {"settings": {
            "image": "i",
            "createOptions02": "V\"]}",
            "createOptions": "{\"Env\":",
            "createOptions01": "[\"K="
        }}}));
        let modules = parse_manifest(&m).expect("valid");
        assert_eq!(modules[0].create_options, Some(json!({"Env": ["K=V"]})));
    }

    #[test]
    fn every_problem_is_located_by_its_path() {
        let m = manifest(json!({
            "a": {"settings": {"createOptions": "{not json"}},
            "b": {"settings": {"image": "i"}, "status": "paused", "env": {"X": "bare"}},
            "c": {"settings": {"image": "i", "createOptions02": "x"}}
        }));
        let err = parse_manifest(&m).expect_err("invalid");
        let p = "modulesContent.$edgeAgent.properties.desired.modules";
        let want = [
            format!("{p}.a.settings.image: missing"),
            format!("{p}.a.settings.createOptions: invalid JSON"),
            format!("{p}.b.env.X: must be an object"),
            format!("{p}.b.status: must be"),
            format!("{p}.c.settings.createOptions02: chunks must follow"),
        ];
        for w in want {
            assert!(
                err.messages.iter().any(|m| m.starts_with(&w)),
                "{w} not in {:?}",
                err.messages
            );
        }
        assert_eq!(err.messages.len(), 5, "{:?}", err.messages);
    }

    #[test]
    fn edge_hub_problems_are_the_routers_located_messages() {
        let mut m = manifest(json!({"a": {"settings": {"image": "i"}}}));
        m["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]["bad"] =
            json!("FROM /messages/* WHERE INTO $upstream");
        let err = parse_manifest(&m).expect_err("bad route");
        let router_err = router::manifest::parse_deployment_value(&m).expect_err("bad route");
        let expected: Vec<String> = router_err.issues.iter().map(ToString::to_string).collect();
        assert!(!expected.is_empty());
        assert_eq!(err.messages, expected);
    }
}
