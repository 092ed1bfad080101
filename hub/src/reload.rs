//! Live manifest reload: on SIGHUP, and when the manifest file or the module keys directory
//! changes, the hub reads the manifest and the keys again and applies them without a restart.
//!
//! Guarantees:
//! - **All or nothing.** The manifest is parsed exactly as at startup ([`load_deployment`]) and
//!   the keys directory read whole; if either has a problem, nothing changes: the hub keeps
//!   the previous manifest and keys, logs every problem with its location, counts a failure
//!   (`edgehub_manifest_reloads_total{result="failure"}`) and shows it on `GET /manifest`.
//! - **Nothing queued changes.** New routes, priorities and TTLs apply to messages accepted
//!   from then on ([`router::Router::reload`]); queued messages keep the route, priority and
//!   TTL they were stored with, and stay queued (a removed module's inputs included, until
//!   their TTL). The table is swapped whole, so on one connection every message before the
//!   swap takes the old routes and every one after it the new ones.
//! - **Identities follow the manifest.** New modules get keys (minted, or given by
//!   `--module-key` / `--module-keys-dir`); a removed module's live MQTT and AMQP connections
//!   are closed and its logins refused from then on (its key stays on file, so what it queued
//!   for `$upstream` still goes out); a module whose key changed is disconnected and must
//!   sign with the new key.
//! - **Connected receivers follow new routes**: after a reload, a module that is connected
//!   and receiving also becomes the sink of input endpoints that routes name only now.
//! - **Module twins follow the manifest**: a module whose desired properties changed gets a
//!   desired-properties patch on each connection subscribed to them (`crate::mqtt::twin`).
//! - One info line says what changed (routes added, removed, changed by name, modules added,
//!   removed, re-keyed, module twins whose desired properties changed, store TTL). A store setting that cannot change live (`maxSizeBytes`)
//!   is logged as applying at the next restart and does not fail the reload.
//!
//! - A login racing a reload cannot slip through: a connection joins the registry of live
//!   connections only if its module is still declared (MQTT: with the key it was checked
//!   with), checked under the registry's lock, which the reload's eviction also takes after
//!   changing the identities (`Registry::join_if`).
//!
//! The certificate files given with `--tls-cert`/`--tls-key`/`--tls-ca` are watched the same
//! way and reloaded on their own ([`tls`]).

pub mod tls;
mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use router::manifest::Deployment;
use router::{ModuleId, Route, Ttl};
use serde_json::{json, Value};
use store::UnixMillis;
use tokio::sync::mpsc;

use crate::head::context::HeadContext;
use crate::identity::{self, IdentityChanges, ModuleKey};
use crate::settings::{ManifestLoadError, ManifestSource, Settings};

pub use watch::watch_dir;

/// Reads and validates the manifest the hub runs on: the one parser path for startup and
/// every reload.
pub fn load_deployment(settings: &Settings) -> Result<Deployment, ManifestLoadError> {
    settings.manifest().load()
}

/// Keeps the data directory's record of the hub's modules (`hub.json`, what `edgehub
/// connection-string --data-dir` answers from) equal to the declared ones. A hub started
/// without a record (the library's callers, not `edgehub run`) has none to keep; a record that
/// cannot be written is logged and changes nothing else: the modules are served either way.
pub fn record_modules(data_dir: &std::path::Path, identities: &crate::identity::Identities) {
    match crate::record::save_modules(data_dir, &identities.modules()) {
        Ok(()) | Err(crate::record::RecordError::Missing { .. }) => {}
        Err(error) => tracing::warn!(
            %error,
            "cannot record the hub's modules in the data directory; `edgehub connection-string` \
             may not know the new ones"
        ),
    }
}

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trigger {
    /// SIGHUP (or another explicit request).
    Signal,
    /// Something changed in the manifest's directory.
    ManifestChanged,
    /// Something changed in the module keys directory.
    KeysChanged,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Signal => "SIGHUP",
            Trigger::ManifestChanged => "manifest file changed",
            Trigger::KeysChanged => "module keys directory changed",
        })
    }
}

/// How a reload ended.
// One per reload, never in a hot path or a collection: the size of `Applied` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to reload (built-in manifest and no keys directory).
    NothingToReload,
    /// A file event, but the manifest and keys read the same as those in force.
    Unchanged,
    /// Applied.
    Applied(Changes),
    /// Refused; the previous manifest and keys stay in force.
    Failed(Vec<String>),
}

/// What a reload changed, for the log line and `GET /manifest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Routes only in the new manifest.
    pub routes_added: Vec<String>,
    /// Routes only in the old one.
    pub routes_removed: Vec<String>,
    /// Routes in both whose text, priority, TTL or options differ.
    pub routes_changed: Vec<String>,
    /// Modules with an identity now and not before, removed, and with a new key.
    pub modules: IdentityChanges,
    /// The store-wide TTL, if it changed: (old, new).
    pub store_ttl: Option<(Ttl, Ttl)>,
    /// `maxSizeBytes`, if it changed: (old, new). Applies at the next restart.
    pub max_store_size: Option<(Option<u64>, Option<u64>)>,
    /// Modules whose twin's desired properties differ (given, removed or changed), sorted.
    pub twins_changed: Vec<ModuleId>,
}

impl Changes {
    /// The differences between two manifests (modules come from the identities).
    pub fn between(old: &Deployment, new: &Deployment, modules: IdentityChanges) -> Changes {
        let index = |d: &Deployment| -> BTreeMap<String, Route> {
            d.edge_hub
                .routes
                .routes()
                .iter()
                .map(|r| (r.id().as_str().to_owned(), r.clone()))
                .collect()
        };
        let (before, after) = (index(old), index(new));
        let mut changes = Changes {
            modules,
            ..Changes::default()
        };
        for (name, route) in &after {
            match before.get(name) {
                None => changes.routes_added.push(name.clone()),
                Some(old_route) if old_route != route => {
                    changes.routes_changed.push(name.clone());
                }
                Some(_) => {}
            }
        }
        changes.routes_removed = before
            .keys()
            .filter(|name| !after.contains_key(*name))
            .cloned()
            .collect();
        if old.edge_hub.store_ttl != new.edge_hub.store_ttl {
            changes.store_ttl = Some((old.edge_hub.store_ttl, new.edge_hub.store_ttl));
        }
        let twins: std::collections::BTreeSet<&ModuleId> = old
            .twins_desired
            .keys()
            .chain(new.twins_desired.keys())
            .collect();
        changes.twins_changed = twins
            .into_iter()
            .filter(|m| old.twins_desired.get(*m) != new.twins_desired.get(*m))
            .cloned()
            .collect();
        if old.edge_hub.max_store_size_bytes != new.edge_hub.max_store_size_bytes {
            changes.max_store_size = Some((
                old.edge_hub.max_store_size_bytes,
                new.edge_hub.max_store_size_bytes,
            ));
        }
        changes
    }

    /// Whether routes changed (the table must be swapped).
    pub fn routes_differ(&self) -> bool {
        !(self.routes_added.is_empty()
            && self.routes_removed.is_empty()
            && self.routes_changed.is_empty()
            && self.store_ttl.is_none())
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn ttl_text(ttl: Ttl) -> String {
    match ttl {
        Ttl::Infinite => "infinite".to_owned(),
        Ttl::Seconds(s) => format!("{s} s"),
    }
}

fn size_text(size: Option<u64>) -> String {
    size.map_or_else(|| "unset".to_owned(), |s| format!("{s} bytes"))
}

impl fmt::Display for Changes {
    /// `routes added [a], removed [b], changed [c]; modules added [m], …; store TTL 7200 s -> 60 s`,
    /// or `no change`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        for (what, names) in [
            ("routes added", &self.routes_added),
            ("routes removed", &self.routes_removed),
            ("routes changed", &self.routes_changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} [{}]", list(names)));
            }
        }
        for (what, names) in [
            ("modules added", &self.modules.added),
            ("modules removed", &self.modules.removed),
            ("module keys changed", &self.modules.rekeyed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} [{}]", list(names)));
            }
        }
        if !self.twins_changed.is_empty() {
            parts.push(format!(
                "module twins' desired properties changed [{}]",
                list(&self.twins_changed)
            ));
        }
        if let Some((old, new)) = self.store_ttl {
            parts.push(format!("store TTL {} -> {}", ttl_text(old), ttl_text(new)));
        }
        if let Some((old, new)) = self.max_store_size {
            parts.push(format!(
                "maxSizeBytes {} -> {} (at the next restart)",
                size_text(old),
                size_text(new)
            ));
        }
        if parts.is_empty() {
            f.write_str("no change")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Every problem of a manifest that could not be loaded, one line each, with its location.
fn manifest_problems(source: &ManifestSource, e: &ManifestLoadError) -> Vec<String> {
    match e {
        ManifestLoadError::Invalid { error, .. } => error
            .issues
            .iter()
            .map(|issue| format!("{source}: {issue}"))
            .collect(),
        ManifestLoadError::Read { .. } => vec![e.to_string()],
    }
}

/// What is in force, and what the last reload did: the state `GET /manifest` shows.
#[derive(Debug, Default)]
pub struct ManifestStatus {
    doc: Mutex<Value>,
}

impl ManifestStatus {
    /// The JSON document of `GET /manifest`.
    pub fn to_json(&self) -> String {
        let doc = self.doc.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = serde_json::to_string_pretty(&*doc).unwrap_or_else(|_| "{}".to_owned());
        text.push('\n');
        text
    }

    fn set_active(&self, source: &ManifestSource, active: &Active, modules: &[ModuleId]) {
        let routes: Vec<Value> = active
            .deployment
            .edge_hub
            .routes
            .routes()
            .iter()
            .map(|r| {
                json!({
                    "name": r.id().as_str(),
                    "endpoint": r.endpoint().to_string(),
                    "priority": r.priority().0,
                    "ttl": ttl_text(r.ttl()),
                })
            })
            .collect();
        let mut doc = self.doc.lock().unwrap_or_else(|p| p.into_inner());
        let last = doc.get("lastReload").cloned().unwrap_or(Value::Null);
        *doc = json!({
            "source": source.to_string(),
            "generation": active.generation,
            "routes": routes,
            "modules": modules.iter().map(ModuleId::as_str).collect::<Vec<_>>(),
            "storeTtl": ttl_text(active.deployment.edge_hub.store_ttl),
            "lastReload": last,
        });
    }

    /// Records the last reload's outcome, which happened at `at` (the hub's clock).
    fn set_last(
        &self,
        at: UnixMillis,
        trigger: Trigger,
        result: &str,
        changes: Option<String>,
        errors: &[String],
    ) {
        let mut doc = self.doc.lock().unwrap_or_else(|p| p.into_inner());
        if let Value::Object(map) = &mut *doc {
            map.insert(
                "lastReload".to_owned(),
                json!({
                    "atUnixMs": at.0,
                    "trigger": trigger.to_string(),
                    "result": result,
                    "changes": changes,
                    "errors": errors,
                }),
            );
        }
    }
}

/// The manifest and given keys in force.
struct Active {
    deployment: Deployment,
    keys: Vec<(ModuleId, ModuleKey)>,
    generation: u64,
}

/// The manifest and the given keys as read for a reload.
struct Sources {
    deployment: Deployment,
    keys: Vec<(ModuleId, ModuleKey)>,
}

/// Applies reloads to a running hub.
pub struct Reloader {
    settings: Settings,
    ctx: Arc<HeadContext>,
    active: Mutex<Active>,
    status: Arc<ManifestStatus>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("manifest", self.settings.manifest())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for the hub `ctx` serves, which started on `deployment` with `keys` (the
    /// given keys, [`identity::given_keys`]).
    pub fn new(
        settings: Settings,
        ctx: Arc<HeadContext>,
        deployment: Deployment,
        keys: Vec<(ModuleId, ModuleKey)>,
    ) -> Reloader {
        let status = Arc::new(ManifestStatus::default());
        let active = Active {
            deployment,
            keys,
            generation: 1,
        };
        status.set_active(settings.manifest(), &active, &ctx.identities.modules());
        Reloader {
            settings,
            ctx,
            active: Mutex::new(active),
            status,
        }
    }

    /// What `GET /manifest` shows.
    pub fn status(&self) -> Arc<ManifestStatus> {
        Arc::clone(&self.status)
    }

    /// Reads the manifest and keys again and applies them, or keeps the previous ones and
    /// reports why. Blocking (reads files, may save the identities file).
    ///
    /// Steps: [`Self::read_sources`], [`unchanged`], the identities, [`Self::apply`] to the
    /// running hub, then [`Self::commit`] the new generation.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if *self.settings.manifest() == ManifestSource::BuiltIn
            && self.settings.module_keys_dir().is_none()
        {
            tracing::info!(
                %trigger,
                "nothing to reload: the hub runs on the built-in manifest (no --manifest) and \
                 has no --module-keys-dir"
            );
            return Outcome::NothingToReload;
        }
        let read = match self.read_sources() {
            Ok(read) => read,
            Err(errors) => return self.fail(&mut active, trigger, errors),
        };
        if unchanged(trigger, &active, &read.deployment, &read.keys) {
            tracing::debug!(%trigger, "manifest and module keys unchanged; nothing to apply");
            return Outcome::Unchanged;
        }
        let modules = self.settings.all_modules(&read.deployment.modules);
        let identity_changes = match self.ctx.identities.apply(&modules, &read.keys) {
            Ok(c) => c,
            Err(e) => return self.fail(&mut active, trigger, vec![e.to_string()]),
        };
        let changes = Changes::between(&active.deployment, &read.deployment, identity_changes);
        self.apply(&active, &read.deployment, &changes);
        self.commit(&mut active, trigger, read, changes)
    }

    /// The manifest and the given keys, read again; every problem found in either.
    fn read_sources(&self) -> Result<Sources, Vec<String>> {
        let mut errors = Vec::new();
        let deployment = match load_deployment(&self.settings) {
            Ok(d) => Some(d),
            Err(e) => {
                errors.extend(manifest_problems(self.settings.manifest(), &e));
                None
            }
        };
        let keys = match identity::given_keys(&self.settings) {
            Ok(k) => Some(k),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        };
        match (deployment, keys) {
            (Some(deployment), Some(keys)) => Ok(Sources { deployment, keys }),
            _ => Err(errors),
        }
    }

    /// Applies `changes` (the identities already are) to the running hub: the modules file,
    /// the routes, the connections of removed or re-keyed modules, the input sinks.
    fn apply(&self, active: &Active, deployment: &Deployment, changes: &Changes) {
        record_modules(self.settings.data_dir(), &self.ctx.identities);
        if deployment.replicas != active.deployment.replicas {
            crate::head::context::declare_replicas(
                &self.ctx.router,
                &self.ctx.dispatcher,
                &deployment.replicas,
            );
        }
        if deployment.edge_hub.routes != active.deployment.edge_hub.routes {
            self.ctx.router.reload(deployment.edge_hub.routes.clone());
        }
        // Connected modules hear of changed desired properties (a patch each).
        self.ctx
            .twins
            .set_manifest(deployment.twins_desired.clone());
        // Identities first, then the connections: a reconnect is checked against the new ones.
        let device = self.ctx.identities.device().clone();
        for module in changes
            .modules
            .removed
            .iter()
            .chain(&changes.modules.rekeyed)
        {
            let identity = identity::Identity::new(device.clone(), module.clone());
            if self.ctx.connections.evict(&identity) {
                tracing::info!(%identity, "closing the module's connection: removed from the deployment or its key changed");
            }
        }
        self.ctx.routes_changed.send_modify(|g| *g += 1);
        if let Some((old, new)) = changes.max_store_size {
            tracing::warn!(
                old = %size_text(old),
                new = %size_text(new),
                "storeAndForwardConfiguration.storeLimits.maxSizeBytes changed: it applies at the \
                 next restart"
            );
        }
    }

    /// Makes the applied manifest and keys the active ones, one generation on; logs, counts
    /// and reports it.
    fn commit(
        &self,
        active: &mut Active,
        trigger: Trigger,
        read: Sources,
        changes: Changes,
    ) -> Outcome {
        let source = self.settings.manifest();
        active.deployment = read.deployment;
        active.keys = read.keys;
        active.generation += 1;
        tracing::info!(%trigger, %source, generation = active.generation, changes = %changes, "manifest reloaded");
        self.ctx.metrics.manifest_reloaded(true, active.generation);
        self.status
            .set_active(source, active, &self.ctx.identities.modules());
        self.status.set_last(
            self.ctx.now_millis(),
            trigger,
            "success",
            Some(changes.to_string()),
            &[],
        );
        Outcome::Applied(changes)
    }

    fn fail(&self, active: &mut Active, trigger: Trigger, errors: Vec<String>) -> Outcome {
        let source = self.settings.manifest();
        for error in &errors {
            tracing::error!(%trigger, %error, "manifest reload refused");
        }
        tracing::warn!(
            %trigger,
            %source,
            generation = active.generation,
            problems = errors.len(),
            "manifest reload refused: the previous manifest and module keys stay in force"
        );
        self.ctx.metrics.manifest_reloaded(false, active.generation);
        self.status
            .set_last(self.ctx.now_millis(), trigger, "failure", None, &errors);
        Outcome::Failed(errors)
    }
}

/// Whether a reload has nothing to apply: the manifest and keys read are those in force. A
/// signal applies them all the same (it is asked for).
fn unchanged(
    trigger: Trigger,
    active: &Active,
    deployment: &Deployment,
    keys: &[(ModuleId, ModuleKey)],
) -> bool {
    trigger != Trigger::Signal && *deployment == active.deployment && keys == active.keys
}

/// How long the directories must be quiet before a reload (a ConfigMap swap or an editor's
/// save is several events), and the longest a burst can put one off.
const QUIET: std::time::Duration = std::time::Duration::from_millis(250);
const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves reload requests until `stop` turns true: each `signals` item reloads at once; file
/// events (`files`) are gathered until the directories are quiet, then reload once.
pub async fn serve(
    reloader: Arc<Reloader>,
    mut signals: mpsc::Receiver<()>,
    mut files: mpsc::Receiver<Trigger>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (mut signals_open, mut files_open) = (true, true);
    loop {
        let trigger = tokio::select! {
            s = signals.recv(), if signals_open => match s {
                Some(()) => Trigger::Signal,
                None => { signals_open = false; continue; }
            },
            t = files.recv(), if files_open => match t {
                Some(t) => gather(t, &mut files).await,
                None => { files_open = false; continue; }
            },
            () = stopped(&mut stop) => return,
        };
        let r = Arc::clone(&reloader);
        tokio::task::block_in_place(move || {
            r.reload(trigger);
        });
    }
}

async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Takes file events until none came for [`QUIET`] (at most [`MAX_DELAY`]); the manifest's
/// trigger wins over the keys directory's for the log.
async fn gather<T: Ord + Copy>(first: T, files: &mut mpsc::Receiver<T>) -> T {
    let mut trigger = first;
    let give_up = tokio::time::Instant::now() + MAX_DELAY;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(give_up);
        tokio::select! {
            t = files.recv() => match t {
                Some(t) => trigger = trigger.min(t),
                None => return trigger,
            },
            () = tokio::time::sleep_until(quiet) => return trigger,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(routes: &str, ttl: i64, max: Option<u64>) -> Deployment {
        let limits = max.map_or(String::new(), |m| {
            format!(r#", "storeLimits": {{"maxSizeBytes": {m}}}"#)
        });
        let text = format!(
            r#"{{"modulesContent": {{
                "$edgeAgent": {{"properties.desired": {{"modules": {{}}}}}},
                "$edgeHub": {{"properties.desired": {{
                    "schemaVersion": "1.1",
                    "routes": {routes},
                    "storeAndForwardConfiguration": {{"timeToLiveSecs": {ttl}{limits}}}
                }}}}
            }}}}"#
        );
        crate::settings::parse_manifest(&text).expect("valid manifest")
    }

    #[test]
    fn a_reload_is_unchanged_only_for_the_same_manifest_and_keys_and_never_on_a_signal() {
        use base64::Engine as _;
        let key = |b: u8| {
            let text = base64::engine::general_purpose::STANDARD.encode([b; 32]);
            ModuleKey::from_base64(&text).expect("key")
        };
        let routes = r#"{"r": "FROM /messages/* INTO $upstream"}"#;
        let active = Active {
            deployment: deployment(routes, 7200, None),
            keys: vec![(ModuleId::new("a"), key(1))],
            generation: 3,
        };
        let same = deployment(routes, 7200, None);
        let same_keys = vec![(ModuleId::new("a"), key(1))];
        assert!(unchanged(
            Trigger::ManifestChanged,
            &active,
            &same,
            &same_keys
        ));
        assert!(unchanged(Trigger::KeysChanged, &active, &same, &same_keys));
        assert!(!unchanged(Trigger::Signal, &active, &same, &same_keys));
        let rekeyed = vec![(ModuleId::new("a"), key(2))];
        assert!(!unchanged(Trigger::KeysChanged, &active, &same, &rekeyed));
        let longer_ttl = deployment(routes, 7201, None);
        assert!(!unchanged(
            Trigger::ManifestChanged,
            &active,
            &longer_ttl,
            &same_keys
        ));
    }

    #[test]
    fn the_summary_names_routes_added_removed_and_changed() {
        let old = deployment(
            r#"{"keep": "FROM /messages/* INTO $upstream",
                "gone": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/a/inputs/i\")",
                "edit": {"route": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/b/inputs/i\")", "priority": 1}}"#,
            7200,
            None,
        );
        let new = deployment(
            r#"{"keep": "FROM /messages/* INTO $upstream",
                "edit": {"route": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/b/inputs/i\")", "priority": 2},
                "new": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/c/inputs/i\")"}"#,
            7200,
            None,
        );
        let changes = Changes::between(&old, &new, IdentityChanges::default());
        assert_eq!(changes.routes_added, ["new"]);
        assert_eq!(changes.routes_removed, ["gone"]);
        assert_eq!(changes.routes_changed, ["edit"]);
        assert!(changes.routes_differ());
        assert_eq!(
            changes.to_string(),
            "routes added [new]; routes removed [gone]; routes changed [edit]"
        );
    }

    #[test]
    fn the_summary_says_no_change_for_the_same_manifest_and_names_modules_and_ttl() {
        let routes = r#"{"r": "FROM /messages/* INTO $upstream"}"#;
        let same = Changes::between(
            &deployment(routes, 60, None),
            &deployment(routes, 60, None),
            IdentityChanges::default(),
        );
        assert_eq!(same.to_string(), "no change");
        assert!(!same.routes_differ());

        let modules = IdentityChanges {
            added: vec![ModuleId::new("m1")],
            removed: vec![ModuleId::new("m2"), ModuleId::new("m3")],
            rekeyed: vec![ModuleId::new("m4")],
        };
        let changes = Changes::between(
            &deployment(routes, 60, Some(1 << 30)),
            &deployment(routes, -1, Some(1 << 20)),
            modules,
        );
        // The route's effective TTL is the store-wide one: it changed too.
        assert_eq!(changes.routes_changed, ["r"]);
        assert_eq!(changes.store_ttl, Some((Ttl::Seconds(60), Ttl::Infinite)));
        assert_eq!(
            changes.to_string(),
            "routes changed [r]; modules added [m1]; modules removed [m2, m3]; module keys \
             changed [m4]; store TTL 60 s -> infinite; maxSizeBytes 1073741824 bytes -> \
             1048576 bytes (at the next restart)"
        );
    }

    #[test]
    fn a_change_of_module_twins_desired_properties_is_named_in_the_summary() {
        let routes = r#"{"r": "FROM /messages/* INTO $upstream"}"#;
        let old = deployment(routes, 60, None);
        let mut new = old.clone();
        let desired = |v: serde_json::Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        new.twins_desired
            .insert(ModuleId::new("m1"), desired(json!({"rate": 5})));
        let changes = Changes::between(&old, &new, IdentityChanges::default());
        assert_eq!(
            changes.to_string(),
            "module twins' desired properties changed [m1]"
        );
        assert!(!changes.routes_differ());
        let mut newer = new.clone();
        newer
            .twins_desired
            .insert(ModuleId::new("m1"), desired(json!({"rate": 6})));
        newer
            .twins_desired
            .insert(ModuleId::new("m0"), desired(json!({})));
        let changes = Changes::between(&new, &newer, IdentityChanges::default());
        assert_eq!(
            changes.twins_changed,
            [ModuleId::new("m0"), ModuleId::new("m1")]
        );
        let back = Changes::between(&newer, &old, IdentityChanges::default());
        assert_eq!(
            back.twins_changed,
            [ModuleId::new("m0"), ModuleId::new("m1")]
        );
    }

    #[test]
    fn every_problem_of_a_bad_manifest_is_listed_with_its_location() {
        let source = ManifestSource::File("/etc/edgehub/manifest.json".into());
        let error = crate::settings::parse_manifest(
            r#"{"modulesContent": {"$edgeAgent": {"properties.desired": {"modules": {}}},
                "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
                    "routes": {"r1": {"route": "FROM /messages/* INTO $upstream", "priority": 99},
                               "r2": "FROM /messages/* WHERE ( INTO $upstream"},
                    "storeAndForwardConfiguration": {"timeToLiveSecs": 10}}}}}"#,
        )
        .expect_err("invalid");
        let e = ManifestLoadError::Invalid {
            source_name: source.to_string(),
            error,
        };
        let problems = manifest_problems(&source, &e);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("/etc/edgehub/manifest.json: ")
                && problems[0].contains("routes.r1.priority"),
            "{problems:?}"
        );
        assert!(problems[1].contains("r2"), "{problems:?}");
    }
}
