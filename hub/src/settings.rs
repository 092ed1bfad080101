//! Typed, validated runtime settings: everything `hub::server::run` needs to know, already
//! checked, so that nothing past this point parses a flag or an environment variable.
//!
//! [`RawSettings`] holds what a user typed (every field optional; `None` means the embedded
//! default). [`RawSettings::validate`] turns it into [`Settings`] or a [`SettingsError`] that
//! names the offending field.
//!
//! Guarantees:
//! - A [`Settings`] value is valid: addresses parse, host names and ids are well formed, the
//!   plain MQTT listener (if any) is on a loopback address, and no two listeners share a port.
//! - Defaults are those of the issue: data in `./edgehub-data`, MQTT over TLS on
//!   `0.0.0.0:8883`, metrics on `:9600` (all interfaces), the built-in default manifest.
//! - This module reads no environment variables and no flags: `main.rs` does, and passes the
//!   machine's host name in (see [`machine_hostname`]).
//!
//! Defaults chosen here, and why:
//! - IoT Hub host name [`DEFAULT_IOTHUB_HOSTNAME`] = `edgehub.local`: SDKs put it in the MQTT
//!   username and the SAS `sr`, but connect to `GatewayHostName`, so it is never resolved. A
//!   `.local` name (RFC 6762) never reaches public DNS, so it cannot be mistaken for a real hub.
//! - Device id [`DEFAULT_DEVICE_ID`] = `edge-device`.
//! - Gateway host name: the machine's host name, else `localhost`.
//!
//! The IoT Hub host name, device id, gateway host name and extra certificate names a user
//! leaves out are first taken from the data directory's record (`crate::record`), then these
//! defaults.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use router::manifest::Deployment;
use router::{DeviceId, ManifestError, ModuleId};
use store::Epoch;

use crate::module_key::ModuleKey;

/// The deployment manifest used when none is given: modules `sender` and `receiver`, routes
/// `sender → receiver/input1` and `sender → $upstream`.
pub const DEFAULT_MANIFEST: &str = include_str!("default-manifest.json");
/// Where the hub keeps its store, identities and certificates by default.
pub const DEFAULT_DATA_DIR: &str = "./edgehub-data";
/// The MQTT-over-TLS listener by default (edgeHub's port).
pub const DEFAULT_MQTT_ADDR: &str = "0.0.0.0:8883";
/// The AMQP-over-TLS listener by default (edgeHub's port).
pub const DEFAULT_AMQP_ADDR: &str = "0.0.0.0:5671";
/// The HTTPS listener for direct methods between modules by default. The SDKs dial port 443
/// of their `GatewayHostName`; the hub runs as a non-root user (its image: 65532), which may not
/// bind a port below 1024 without `CAP_NET_BIND_SERVICE`, so it listens on 8443 and a
/// Kubernetes Service (port 443 → 8443), a container port mapping (`-p 443:8443`), or
/// `--methods-addr 0.0.0.0:443` with the capability puts it on 443.
pub const DEFAULT_METHODS_ADDR: &str = "0.0.0.0:8443";
/// The metrics and health listener by default (edgeHub's port), on every interface.
pub const DEFAULT_METRICS_ADDR: &str = ":9600";
/// The IoT Hub host name by default; see the module docs for why.
pub const DEFAULT_IOTHUB_HOSTNAME: &str = "edgehub.local";
/// The edge device id by default.
pub const DEFAULT_DEVICE_ID: &str = "edge-device";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for Kubernetes and log shippers).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected \"text\" or \"json\", got {s:?}")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Where the deployment manifest comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestSource {
    /// [`DEFAULT_MANIFEST`], compiled into the binary.
    BuiltIn,
    /// A deployment manifest file.
    File(PathBuf),
}

impl fmt::Display for ManifestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestSource::BuiltIn => f.write_str("the built-in default manifest"),
            ManifestSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A manifest that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestLoadError {
    /// The file could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest was read but is not valid; every problem is listed.
    #[error("invalid manifest {source_name}: {error}")]
    Invalid {
        /// Where it came from ([`ManifestSource`]'s display).
        source_name: String,
        /// Every problem, each with its location.
        error: ManifestError,
    },
}

impl ManifestSource {
    /// The manifest text.
    pub fn text(&self) -> Result<Cow<'static, str>, ManifestLoadError> {
        match self {
            ManifestSource::BuiltIn => Ok(Cow::Borrowed(DEFAULT_MANIFEST)),
            ManifestSource::File(path) => {
                std::fs::read_to_string(path)
                    .map(Cow::Owned)
                    .map_err(|source| ManifestLoadError::Read {
                        path: path.clone(),
                        source,
                    })
            }
        }
    }

    /// Reads and parses the manifest.
    pub fn load(&self) -> Result<Deployment, ManifestLoadError> {
        let text = self.text()?;
        parse_manifest(&text).map_err(|error| ManifestLoadError::Invalid {
            source_name: self.to_string(),
            error,
        })
    }
}

/// Parses a manifest file's text: the one parser of `edgehub run` (through
/// [`ManifestSource::load`]) and `edgehub check-manifest`, so one accepts exactly what the other
/// does.
///
/// - A deployment manifest as IoT Edge writes it (`{"modulesContent": …}` or `{"content":
///   {"modulesContent": …}}`, `"properties.desired"` keys or the nested form; see
///   `router::manifest`).
/// - Bare `$edgeHub` desired properties (`{"schemaVersion", "routes",
///   "storeAndForwardConfiguration"}`): a JSON object with neither `modulesContent` nor
///   `content`. It declares no modules; they come from `--module`, `--module-key` and the data
///   directory's record.
///
/// Anything else (invalid JSON, an array, …) is read as a deployment manifest, whose errors say
/// what is missing.
pub fn parse_manifest(text: &str) -> Result<Deployment, ManifestError> {
    let bare = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            !map.contains_key("modulesContent") && !map.contains_key("content")
        }
        _ => false,
    };
    if bare {
        let edge_hub = router::parse_edge_hub_desired(text)?;
        Ok(Deployment {
            edge_hub,
            modules: Vec::new(),
            twins_desired: std::collections::BTreeMap::new(),
            replicas: std::collections::BTreeMap::new(),
        })
    } else {
        router::manifest::parse_deployment(text)
    }
}

/// One line about a valid manifest: schema, routes, store TTL, the modules it declares, and
/// those declared replicated (served as replicas over MQTT; over AMQP as one module).
pub fn manifest_summary(deployment: &Deployment) -> String {
    let config = &deployment.edge_hub;
    let ttl = match config.store_ttl {
        router::Ttl::Infinite => "infinite".to_owned(),
        router::Ttl::Seconds(s) => format!("{s} s"),
    };
    let names: Vec<&str> = deployment.modules.iter().map(ModuleId::as_str).collect();
    let modules = if names.is_empty() {
        "no modules (bare $edgeHub properties or none under $edgeAgent)".to_owned()
    } else {
        format!("{} module(s) ({})", names.len(), names.join(", "))
    };
    let replicated: Vec<String> = deployment
        .replicas
        .iter()
        .map(|(module, spec)| format!("{module} x{} by {}", spec.count, spec.key))
        .collect();
    let replicas = if replicated.is_empty() {
        String::new()
    } else {
        format!("; replicated: {}", replicated.join(", "))
    };
    format!(
        "schema {}.{}, {} route(s), store TTL {ttl}, {modules}{replicas}",
        config.schema_version.major,
        config.schema_version.minor,
        config.routes.routes().len()
    )
}

/// Settings as typed by a user: `None` means the default. Fields are strings where the
/// validation (and its error message) belongs here rather than to the CLI parser.
#[derive(Clone, Debug, Default)]
pub struct RawSettings {
    /// Data directory (default [`DEFAULT_DATA_DIR`]).
    pub data_dir: Option<PathBuf>,
    /// Deployment manifest file (default: the built-in manifest).
    pub manifest: Option<PathBuf>,
    /// MQTT-over-TLS listener, `ip:port` or `:port` (default [`DEFAULT_MQTT_ADDR`]).
    pub mqtt_addr: Option<String>,
    /// Metrics and health listener, `ip:port` or `:port` (default [`DEFAULT_METRICS_ADDR`]).
    pub metrics_addr: Option<String>,
    /// AMQP-over-TLS listener, `ip:port` or `:port` (default [`DEFAULT_AMQP_ADDR`]).
    pub amqp_addr: Option<String>,
    /// HTTPS listener for direct methods, `ip:port` or `:port`; `None`: no such listener (the
    /// command line always gives one, [`DEFAULT_METHODS_ADDR`] by default).
    pub methods_addr: Option<String>,
    /// IoT Hub host name (default [`DEFAULT_IOTHUB_HOSTNAME`]).
    pub iothub_hostname: Option<String>,
    /// Edge device id (default [`DEFAULT_DEVICE_ID`]).
    pub device_id: Option<String>,
    /// Host name modules connect to (default: the machine's host name, else `localhost`).
    pub gateway_hostname: Option<String>,
    /// More host names (or IP addresses) for the server certificate.
    pub hostnames: Vec<String>,
    /// Modules to give identities besides the manifest's.
    pub modules: Vec<String>,
    /// Log format (default text).
    pub log_format: Option<LogFormat>,
    /// A plain-TCP MQTT listener for benchmarks; loopback addresses only. Off by default.
    pub plain_mqtt_addr: Option<String>,
    /// Fencing epoch for the store (default 0): an orchestrator raises it on every takeover, and
    /// the store then refuses an older owner (see store/DESIGN.md "Fencing").
    pub epoch: Option<u64>,
    /// Whether a connection that waits for each PUBACK may write and sync its message on its own
    /// thread when the store's writer is idle (default true; see
    /// `store::StoreOptions::commit_on_caller`).
    pub commit_on_caller: Option<bool>,
    /// Upstream protocol: `mqtt` (default) or `none`.
    pub upstream_protocol: Option<String>,
    /// `HOST:PORT` to dial for the cloud connection instead of `{iothub_hostname}:8883`.
    pub upstream_addr: Option<String>,
    /// A CA certificate (PEM) to trust for the cloud connection, besides the system bundle.
    pub upstream_ca: Option<PathBuf>,
    /// Seconds a publish may wait for IoT Hub's PUBACK before the connection is given up
    /// (default [`DEFAULT_UPSTREAM_TIMEOUT_SECS`]).
    pub upstream_timeout_secs: Option<u64>,
    /// `MODULE=BASE64KEY`: the key IoT Hub issued for a module identity (declares the module).
    pub module_keys: Vec<String>,
    /// A directory of module keys (a mounted Kubernetes Secret): one file per module, named
    /// after it, holding its base64 key; watched and re-read like the manifest.
    pub module_keys_dir: Option<PathBuf>,
    /// Authenticated connections per protocol (default [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: Option<usize>,
    /// Connections per protocol not yet authenticated (default
    /// [`DEFAULT_MAX_UNAUTHENTICATED`]).
    pub max_unauthenticated: Option<usize>,
    /// Seconds from accept to authentication, TLS handshake included (default
    /// [`DEFAULT_AUTH_TIMEOUT_SECS`]).
    pub auth_timeout_secs: Option<u64>,
    /// The server certificate (chain, PEM) to present instead of the data directory's own
    /// (`--tls-cert`; all three `tls_*` or none).
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) the server certificate chains to: what modules trust.
    pub tls_ca: Option<PathBuf>,
    /// Flow control: the most messages an online module input may lag before the producers
    /// feeding it are held; 0 turns it off (default [`DEFAULT_FLOW_CONTROL_MAX_LAG`]).
    pub flow_control_max_lag: Option<u64>,
}

/// The default bound of flow control, in messages ([`router::DEFAULT_MAX_LAG`]).
pub const DEFAULT_FLOW_CONTROL_MAX_LAG: u64 = router::DEFAULT_MAX_LAG.0;

/// Certificate files given on the command line (`--tls-cert`, `--tls-key`, `--tls-ca`), used
/// instead of the data directory's own CA; the hub re-reads them when they change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GivenTls {
    /// The server certificate, leaf first, then any intermediates (PEM).
    pub cert: PathBuf,
    /// The server certificate's private key (PEM).
    pub key: PathBuf,
    /// The CA certificate modules trust (PEM).
    pub ca: PathBuf,
}

// The connection limits' defaults belong to the limits they set.
pub use crate::limits::{
    DEFAULT_AUTH_TIMEOUT_SECS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_UNAUTHENTICATED,
};

/// edgeHub's `CloudOperationTimeoutSecs`.
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 20;

/// Where and how the hub sends `$upstream` messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Host to dial (the IoT Hub host name unless `--upstream-addr` says otherwise); TLS checks
    /// the server's certificate against it.
    pub host: String,
    /// Port to dial.
    pub port: u16,
    /// Extra CA to trust.
    pub ca: Option<PathBuf>,
    /// How long a publish may wait for its PUBACK.
    pub timeout: std::time::Duration,
}

/// IoT Hub's MQTT port.
pub const IOTHUB_MQTT_PORT: u16 = 8883;

/// Validated settings. Build with [`RawSettings::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    data_dir: PathBuf,
    manifest: ManifestSource,
    mqtt_addr: SocketAddr,
    metrics_addr: SocketAddr,
    iothub_hostname: String,
    device_id: DeviceId,
    gateway_hostname: String,
    machine_hostname: Option<String>,
    hostnames: Vec<String>,
    modules: Vec<ModuleId>,
    log_format: LogFormat,
    plain_mqtt_addr: Option<SocketAddr>,
    amqp_addr: SocketAddr,
    methods_addr: Option<SocketAddr>,
    epoch: Epoch,
    commit_on_caller: bool,
    upstream: Option<UpstreamSettings>,
    module_keys: Vec<(ModuleId, ModuleKey)>,
    module_keys_dir: Option<PathBuf>,
    limits: crate::limits::Limits,
    tls: Option<GivenTls>,
    flow: router::FlowBound,
}

/// A setting that is not valid. The message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct SettingsError {
    /// The offending field, as named in [`RawSettings`] (the flag is `--` plus the field with
    /// `-` for `_`).
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        field,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

impl RawSettings {
    /// Checks every field and fills in defaults. `machine_hostname` is the host name of this
    /// machine if known (see [`machine_hostname`]); it defaults the gateway host name and goes
    /// into the server certificate.
    pub fn validate(self, machine_hostname: Option<String>) -> Result<Settings, SettingsError> {
        // Each section is checked in turn; the first error found is the one reported.
        let (data_dir, manifest) = storage_paths(self.data_dir.clone(), self.manifest.clone())?;
        let listen = self.listen_addrs()?;
        let names = self.host_names(machine_hostname)?;
        let modules = module_ids(&self.modules)?;
        let module_keys = module_keys(&self.module_keys)?;
        if let Some(dir) = &self.module_keys_dir {
            if dir.as_os_str().is_empty() {
                return Err(invalid("module_keys_dir", "", "must not be empty"));
            }
        }
        let upstream = upstream_settings(
            self.upstream_protocol.as_deref(),
            self.upstream_addr.as_deref(),
            self.upstream_ca,
            self.upstream_timeout_secs,
            &names.iothub_hostname,
        )?;
        let limits = connection_limits(
            self.max_connections,
            self.max_unauthenticated,
            self.auth_timeout_secs,
        )?;
        let tls = given_tls(self.tls_cert, self.tls_key, self.tls_ca)?;
        let flow = match self
            .flow_control_max_lag
            .unwrap_or(DEFAULT_FLOW_CONTROL_MAX_LAG)
        {
            0 => router::FlowBound::Off,
            n => router::FlowBound::MaxLag(router::Lag(n)),
        };
        Ok(Settings {
            flow,
            data_dir,
            manifest,
            mqtt_addr: listen.mqtt,
            metrics_addr: listen.metrics,
            iothub_hostname: names.iothub_hostname,
            device_id: DeviceId::new(names.device_id),
            gateway_hostname: names.gateway_hostname,
            machine_hostname: names.machine_hostname,
            hostnames: self.hostnames,
            modules,
            log_format: self.log_format.unwrap_or_default(),
            plain_mqtt_addr: listen.plain_mqtt,
            amqp_addr: listen.amqp,
            methods_addr: listen.methods,
            epoch: Epoch::new(self.epoch.unwrap_or(0)),
            commit_on_caller: self.commit_on_caller.unwrap_or(true),
            upstream,
            module_keys,
            module_keys_dir: self.module_keys_dir,
            limits,
            tls,
        })
    }

    /// The listeners' addresses, each parsed, the plain one loopback only, no two on one port.
    fn listen_addrs(&self) -> Result<ListenAddrs, SettingsError> {
        let mqtt = parse_listen_addr(
            "mqtt_addr",
            self.mqtt_addr.as_deref().unwrap_or(DEFAULT_MQTT_ADDR),
        )?;
        let metrics = parse_listen_addr(
            "metrics_addr",
            self.metrics_addr.as_deref().unwrap_or(DEFAULT_METRICS_ADDR),
        )?;
        let plain_mqtt = self
            .plain_mqtt_addr
            .as_deref()
            .map(plain_mqtt_addr)
            .transpose()?;
        let amqp = parse_listen_addr(
            "amqp_addr",
            self.amqp_addr.as_deref().unwrap_or(DEFAULT_AMQP_ADDR),
        )?;
        let methods = self
            .methods_addr
            .as_deref()
            .map(|a| parse_listen_addr("methods_addr", a))
            .transpose()?;
        check_distinct_ports(&[
            ("amqp_addr", Some(amqp)),
            ("mqtt_addr", Some(mqtt)),
            ("metrics_addr", Some(metrics)),
            ("plain_mqtt_addr", plain_mqtt),
            ("methods_addr", methods),
        ])?;
        Ok(ListenAddrs {
            mqtt,
            metrics,
            plain_mqtt,
            amqp,
            methods,
        })
    }

    /// IoT Hub's host name, the device id, the gateway's host name (defaulted from this
    /// machine's, kept only if valid) and the extra certificate host names.
    fn host_names(&self, machine_hostname: Option<String>) -> Result<HostNames, SettingsError> {
        let iothub_hostname = self
            .iothub_hostname
            .clone()
            .unwrap_or_else(|| DEFAULT_IOTHUB_HOSTNAME.to_owned());
        check_hostname("iothub_hostname", &iothub_hostname)?;
        let device_id = self
            .device_id
            .clone()
            .unwrap_or_else(|| DEFAULT_DEVICE_ID.to_owned());
        check_id("device_id", &device_id)?;
        let machine_hostname = machine_hostname.filter(|h| check_hostname("", h).is_ok());
        let gateway_hostname = self
            .gateway_hostname
            .clone()
            .or_else(|| machine_hostname.clone())
            .unwrap_or_else(|| "localhost".to_owned());
        check_hostname("gateway_hostname", &gateway_hostname)?;
        for h in &self.hostnames {
            check_hostname("hostname", h)?;
        }
        Ok(HostNames {
            iothub_hostname,
            device_id,
            gateway_hostname,
            machine_hostname,
        })
    }
}

/// The listen addresses of [`RawSettings`], checked.
struct ListenAddrs {
    mqtt: SocketAddr,
    metrics: SocketAddr,
    plain_mqtt: Option<SocketAddr>,
    amqp: SocketAddr,
    methods: Option<SocketAddr>,
}

/// The host names and device id of [`RawSettings`], checked and defaulted.
struct HostNames {
    iothub_hostname: String,
    device_id: String,
    gateway_hostname: String,
    machine_hostname: Option<String>,
}

/// `--data-dir` (defaulted) and `--manifest` (the built-in one if none): neither empty.
fn storage_paths(
    data_dir: Option<PathBuf>,
    manifest: Option<PathBuf>,
) -> Result<(PathBuf, ManifestSource), SettingsError> {
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if data_dir.as_os_str().is_empty() {
        return Err(invalid("data_dir", "", "must not be empty"));
    }
    let manifest = match manifest {
        None => ManifestSource::BuiltIn,
        Some(path) if path.as_os_str().is_empty() => {
            return Err(invalid("manifest", "", "must not be empty"))
        }
        Some(path) => ManifestSource::File(path),
    };
    Ok((data_dir, manifest))
}

/// `--plain-mqtt-addr`: a loopback address only.
fn plain_mqtt_addr(text: &str) -> Result<SocketAddr, SettingsError> {
    let addr = parse_listen_addr("plain_mqtt_addr", text)?;
    if !addr.ip().is_loopback() {
        return Err(invalid(
            "plain_mqtt_addr",
            text,
            "the plain (unencrypted) MQTT listener is for benchmarks and only binds \
             a loopback address such as 127.0.0.1:1883",
        ));
    }
    Ok(addr)
}

/// `--module`s: each a module id; sorted, each once.
fn module_ids(modules: &[String]) -> Result<Vec<ModuleId>, SettingsError> {
    let mut ids = Vec::with_capacity(modules.len());
    for m in modules {
        check_module_id("module", m)?;
        ids.push(ModuleId::new(m.clone()));
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// `--module-key`s: each `MODULE=BASE64KEY`, each module once. Errors never echo the entry (a
/// mistyped one may be all key); they say which one (counting from 1).
fn module_keys(entries: &[String]) -> Result<Vec<(ModuleId, ModuleKey)>, SettingsError> {
    let mut module_keys = Vec::with_capacity(entries.len());
    for (n, entry) in entries.iter().enumerate() {
        let n = n + 1;
        let hidden = "(value hidden: it holds a key)";
        let (module, key) = entry.split_once('=').ok_or_else(|| {
            invalid(
                "module_key",
                hidden,
                format!("entry {n}: expected MODULE=BASE64KEY"),
            )
        })?;
        check_module_id("module_key", module).map_err(|_| {
            invalid(
                "module_key",
                hidden,
                format!("entry {n}: MODULE is not a module id"),
            )
        })?;
        let key = ModuleKey::from_base64(key)
            .map_err(|why| invalid("module_key", hidden, format!("entry {n}: the key is {why}")))?;
        if module_keys
            .iter()
            .any(|(m, _): &(ModuleId, ModuleKey)| m.as_str() == module)
        {
            return Err(invalid("module_key", module, "given twice"));
        }
        module_keys.push((ModuleId::new(module), key));
    }
    Ok(module_keys)
}

/// `--tls-cert`, `--tls-key` and `--tls-ca`: all three or none. The error names every missing
/// one (the field is the first of them).
fn given_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> Result<Option<GivenTls>, SettingsError> {
    let fields = [("tls_cert", &cert), ("tls_key", &key), ("tls_ca", &ca)];
    for (field, path) in fields {
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(field, "", "must not be empty"));
        }
    }
    let given: Vec<&str> = fields
        .iter()
        .filter(|(_, p)| p.is_some())
        .map(|(f, _)| *f)
        .collect();
    let missing: Vec<&'static str> = fields
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(f, _)| *f)
        .collect();
    match (cert, key, ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(GivenTls { cert, key, ca })),
        (None, None, None) => Ok(None),
        _ => {
            let flag = |f: &str| format!("--{}", f.replace('_', "-"));
            let given: Vec<String> = given.iter().map(|f| flag(f)).collect();
            let missing_flags: Vec<String> = missing.iter().map(|f| flag(f)).collect();
            Err(invalid(
                missing[0],
                "",
                format!(
                    "missing: {} is given, so {} must be too (the certificate, its key and \
                     the CA it chains to go together; give none to use the data directory's \
                     own CA)",
                    given.join(" and "),
                    missing_flags.join(" and ")
                ),
            ))
        }
    }
}

/// The connection limits of each head, checked.
fn connection_limits(
    max_connections: Option<usize>,
    max_unauthenticated: Option<usize>,
    auth_timeout_secs: Option<u64>,
) -> Result<crate::limits::Limits, SettingsError> {
    let max_connections = max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if !(1..=1_000_000).contains(&max_connections) {
        return Err(invalid(
            "max_connections",
            &max_connections.to_string(),
            "must be 1 to 1000000",
        ));
    }
    let max_unauthenticated = max_unauthenticated.unwrap_or(DEFAULT_MAX_UNAUTHENTICATED);
    if !(1..=100_000).contains(&max_unauthenticated) {
        return Err(invalid(
            "max_unauthenticated",
            &max_unauthenticated.to_string(),
            "must be 1 to 100000",
        ));
    }
    let auth_timeout_secs = auth_timeout_secs.unwrap_or(DEFAULT_AUTH_TIMEOUT_SECS);
    if !(1..=600).contains(&auth_timeout_secs) {
        return Err(invalid(
            "auth_timeout_secs",
            &auth_timeout_secs.to_string(),
            "must be 1 to 600 seconds",
        ));
    }
    Ok(crate::limits::Limits {
        max_connections,
        max_unauthenticated,
        auth_timeout: std::time::Duration::from_secs(auth_timeout_secs),
    })
}

impl Settings {
    /// Settings with every default, for the given machine host name.
    pub fn defaults(machine_hostname: Option<String>) -> Result<Settings, SettingsError> {
        RawSettings::default().validate(machine_hostname)
    }

    /// The data directory: store, identities, certificates.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the deployment manifest comes from.
    pub fn manifest(&self) -> &ManifestSource {
        &self.manifest
    }

    /// The MQTT-over-TLS listener address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The metrics and health listener address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The IoT Hub host name (in connection strings, MQTT usernames and SAS audiences).
    pub fn iothub_hostname(&self) -> &str {
        &self.iothub_hostname
    }

    /// The edge device id.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The host name modules connect to (`GatewayHostName` in connection strings).
    pub fn gateway_hostname(&self) -> &str {
        &self.gateway_hostname
    }

    /// This machine's host name, if known.
    pub fn machine_hostname(&self) -> Option<&str> {
        self.machine_hostname.as_deref()
    }

    /// Extra host names for the server certificate (`--hostname`).
    pub fn hostnames(&self) -> &[String] {
        &self.hostnames
    }

    /// Modules given identities besides the manifest's (`--module`), sorted, no duplicates.
    pub fn modules(&self) -> &[ModuleId] {
        &self.modules
    }

    /// How logs are written.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The AMQP-over-TLS listener.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
    }

    /// The HTTPS listener for direct methods, if any.
    pub fn methods_addr(&self) -> Option<SocketAddr> {
        self.methods_addr
    }

    /// The loopback-only plain MQTT listener, if enabled.
    pub fn plain_mqtt_addr(&self) -> Option<SocketAddr> {
        self.plain_mqtt_addr
    }

    /// The store's fencing epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether the store may commit a lone append on its producer's thread.
    pub fn commit_on_caller(&self) -> bool {
        self.commit_on_caller
    }

    /// Module keys given with `--module-key` (keys IoT Hub issued).
    pub fn module_keys(&self) -> &[(ModuleId, ModuleKey)] {
        &self.module_keys
    }

    /// The directory of module keys (`--module-keys-dir`), if any.
    pub fn module_keys_dir(&self) -> Option<&Path> {
        self.module_keys_dir.as_deref()
    }

    /// The connection limits each head (MQTT, AMQP) applies on its own.
    pub fn limits(&self) -> crate::limits::Limits {
        self.limits
    }

    /// Flow control for online module inputs (`--flow-control-max-lag`).
    pub fn flow(&self) -> router::FlowBound {
        self.flow
    }

    /// The certificate files to serve instead of the data directory's own CA, if given.
    pub fn given_tls(&self) -> Option<&GivenTls> {
        self.tls.as_ref()
    }

    /// The cloud connection, or `None` when `$upstream` messages only wait on disk: with
    /// `--upstream-protocol none`, or when no IoT Hub is configured (the default host name and
    /// no `--upstream-addr`).
    pub fn upstream(&self) -> Option<&UpstreamSettings> {
        self.upstream.as_ref()
    }

    /// The names the server certificate must cover, in a stable order without duplicates:
    /// `localhost`, `127.0.0.1`, `::1`, the machine host name, the gateway host name, then
    /// every `--hostname`.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let candidates = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .chain(self.machine_hostname.as_deref())
            .chain([self.gateway_hostname.as_str()])
            .chain(self.hostnames.iter().map(String::as_str));
        for name in candidates {
            let name = name.to_ascii_lowercase();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// Returns these settings with `modules` (e.g. from the manifest) added to the
    /// `--module`s, still sorted and without duplicates.
    pub fn all_modules(&self, manifest_modules: &[ModuleId]) -> Vec<ModuleId> {
        let mut all: Vec<ModuleId> = self
            .modules
            .iter()
            .chain(manifest_modules)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// This machine's host name: `/proc/sys/kernel/hostname`, else `/etc/hostname`, else the
/// `HOSTNAME` environment variable. `None` if none holds a valid host name.
pub fn machine_hostname() -> Option<String> {
    let from_file = |p: &str| std::fs::read_to_string(p).ok();
    [
        from_file("/proc/sys/kernel/hostname"),
        from_file("/etc/hostname"),
        std::env::var("HOSTNAME").ok(),
    ]
    .into_iter()
    .flatten()
    .map(|h| h.trim().to_owned())
    .find(|h| check_hostname("", h).is_ok())
}

/// `ip:port`, `[ipv6]:port`, or `:port` (all IPv4 interfaces).
fn upstream_settings(
    protocol: Option<&str>,
    addr: Option<&str>,
    ca: Option<PathBuf>,
    timeout_secs: Option<u64>,
    iothub_hostname: &str,
) -> Result<Option<UpstreamSettings>, SettingsError> {
    match protocol.unwrap_or("mqtt") {
        "mqtt" | "Mqtt" | "MQTT" => {}
        "none" => return Ok(None),
        other => {
            return Err(invalid(
                "upstream_protocol",
                other,
                "expected mqtt or none (AMQP and WebSocket upstream are not implemented)",
            ))
        }
    }
    if let Some(path) = &ca {
        if path.as_os_str().is_empty() {
            return Err(invalid("upstream_ca", "", "must not be empty"));
        }
    }
    let timeout_secs = timeout_secs.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS);
    if !(1..=3600).contains(&timeout_secs) {
        return Err(invalid(
            "upstream_timeout_secs",
            &timeout_secs.to_string(),
            "must be 1 to 3600 seconds",
        ));
    }
    let timeout = std::time::Duration::from_secs(timeout_secs);
    let (host, port) = match addr {
        Some(text) => parse_host_port("upstream_addr", text)?,
        None if iothub_hostname == DEFAULT_IOTHUB_HOSTNAME => return Ok(None),
        None => (iothub_hostname.to_owned(), IOTHUB_MQTT_PORT),
    };
    Ok(Some(UpstreamSettings {
        host,
        port,
        ca,
        timeout,
    }))
}

/// `host:port`, `ip:port` or `[ipv6]:port`, port not 0; the host is not resolved here.
fn parse_host_port(field: &'static str, text: &str) -> Result<(String, u16), SettingsError> {
    let bad = |why: &str| invalid(field, text, why);
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("expected a port number from 1 to 65535 after the last ':'"))?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between [ and ]"))?
            .to_string(),
        None if host.parse::<IpAddr>().is_ok() => host.to_owned(),
        None => {
            check_hostname(field, host)?;
            host.to_owned()
        }
    };
    Ok((host, port))
}

fn parse_listen_addr(field: &'static str, text: &str) -> Result<SocketAddr, SettingsError> {
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| invalid(field, text, "expected a port number after ':'"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    text.parse().map_err(|_| {
        invalid(
            field,
            text,
            "expected ip:port, [ipv6]:port or :port (host names are not resolved)",
        )
    })
}

fn check_distinct_ports(addrs: &[(&'static str, Option<SocketAddr>)]) -> Result<(), SettingsError> {
    let present: Vec<(&'static str, SocketAddr)> = addrs
        .iter()
        .filter_map(|(f, a)| a.map(|a| (*f, a)))
        .collect();
    for (i, (field, addr)) in present.iter().enumerate() {
        for (other, other_addr) in &present[..i] {
            let overlap = addr.ip().is_unspecified()
                || other_addr.ip().is_unspecified()
                || addr.ip() == other_addr.ip();
            if addr.port() != 0 && addr.port() == other_addr.port() && overlap {
                return Err(invalid(
                    field,
                    &addr.to_string(),
                    format!("same port as {other} ({other_addr})"),
                ));
            }
        }
    }
    Ok(())
}

/// A DNS host name (labels of letters, digits, `-` and `_`) or an IP address.
pub(crate) fn check_hostname(field: &'static str, name: &str) -> Result<(), SettingsError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if name.is_empty() || name.len() > 253 {
        return Err(invalid(field, name, "must be 1 to 253 characters"));
    }
    for label in name.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(invalid(
                field,
                name,
                format!("label {label:?} is not a valid host name label"),
            ));
        }
    }
    Ok(())
}

/// IoT Hub's device and module id rule: 1 to 128 ASCII letters, digits and `-.%_*?!(),:=@$'+#`.
/// `/` and `;` are excluded by that rule, which keeps client ids and connection strings
/// unambiguous.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<(), SettingsError> {
    const EXTRA: &[u8] = b"-.%_*?!(),:=@$'+#";
    if id.is_empty() || id.len() > 128 {
        return Err(invalid(field, id, "must be 1 to 128 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || (c.is_ascii() && EXTRA.contains(&(*c as u8)))))
    {
        return Err(invalid(
            field,
            id,
            format!("character {c:?} is not allowed (letters, digits and -.%_*?!(),:=@$'+# are)"),
        ));
    }
    Ok(())
}

/// A module id: an id ([`check_id`]) that does not start with `$` (reserved for `$edgeAgent`
/// and `$edgeHub`).
pub(crate) fn check_module_id(field: &'static str, id: &str) -> Result<(), SettingsError> {
    check_id(field, id)?;
    if id.starts_with('$') {
        return Err(invalid(
            field,
            id,
            "names starting with '$' are reserved for system modules",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawSettings {
        RawSettings::default()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::defaults(Some("box1".into())).expect("valid");
        assert_eq!(s.data_dir(), Path::new("./edgehub-data"));
        assert_eq!(s.manifest(), &ManifestSource::BuiltIn);
        assert_eq!(s.mqtt_addr(), "0.0.0.0:8883".parse().expect("addr"));
        assert_eq!(s.metrics_addr(), "0.0.0.0:9600".parse().expect("addr"));
        assert_eq!(s.iothub_hostname(), "edgehub.local");
        assert_eq!(s.device_id().as_str(), "edge-device");
        assert_eq!(s.gateway_hostname(), "box1");
        assert_eq!(s.plain_mqtt_addr(), None);
        assert_eq!(s.log_format(), LogFormat::Text);
    }

    #[test]
    fn upstream_is_off_until_an_iot_hub_is_named() {
        assert_eq!(Settings::defaults(None).expect("valid").upstream(), None);
        let s = RawSettings {
            iothub_hostname: Some("myhub.azure-devices.net".into()),
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(
            s.upstream(),
            Some(&UpstreamSettings {
                host: "myhub.azure-devices.net".into(),
                port: 8883,
                ca: None,
                timeout: std::time::Duration::from_secs(20),
            })
        );
        let off = RawSettings {
            iothub_hostname: Some("myhub.azure-devices.net".into()),
            upstream_protocol: Some("none".into()),
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(off.upstream(), None);
    }

    #[test]
    fn upstream_addr_overrides_where_to_dial_and_bad_ones_name_the_field() {
        let s = RawSettings {
            upstream_addr: Some("[::1]:18883".into()),
            upstream_ca: Some("ca.pem".into()),
            ..raw()
        }
        .validate(None)
        .expect("valid");
        let up = s.upstream().expect("on");
        assert_eq!((up.host.as_str(), up.port), ("::1", 18883));
        assert_eq!(up.ca.as_deref(), Some(Path::new("ca.pem")));
        for bad in [
            "localhost",
            "localhost:0",
            "host:99999",
            "bad host:1",
            "[nope]:1",
        ] {
            let err = RawSettings {
                upstream_addr: Some(bad.into()),
                ..raw()
            }
            .validate(None)
            .expect_err(bad);
            assert_eq!(err.field, "upstream_addr", "{bad}: {err}");
        }
        let err = RawSettings {
            upstream_protocol: Some("amqp".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("amqp upstream");
        assert_eq!(err.field, "upstream_protocol");
    }

    #[test]
    fn sections_are_checked_in_order_and_the_first_error_is_reported() {
        let err = RawSettings {
            data_dir: Some(PathBuf::new()),
            mqtt_addr: Some("nonsense".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("two errors");
        assert_eq!(err.field, "data_dir");
        let err = RawSettings {
            mqtt_addr: Some("nonsense".into()),
            device_id: Some("bad id".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("two errors");
        assert_eq!(err.field, "mqtt_addr");
        let err = RawSettings {
            device_id: Some("bad id".into()),
            modules: vec!["bad id".into()],
            ..raw()
        }
        .validate(None)
        .expect_err("two errors");
        assert_eq!(err.field, "device_id");
        let err = RawSettings {
            modules: vec!["bad id".into()],
            module_keys: vec!["no equals sign".into()],
            ..raw()
        }
        .validate(None)
        .expect_err("two errors");
        assert_eq!(err.field, "module");
    }

    #[test]
    fn storage_paths_default_and_refuse_empty_ones() {
        let (dir, manifest) = storage_paths(None, None).expect("defaults");
        assert_eq!(dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(manifest, ManifestSource::BuiltIn);
        let (_, manifest) = storage_paths(None, Some("m.json".into())).expect("file");
        assert_eq!(manifest, ManifestSource::File("m.json".into()));
        let err = storage_paths(None, Some(PathBuf::new())).expect_err("empty manifest");
        assert_eq!(err.field, "manifest");
    }

    #[test]
    fn the_plain_mqtt_listener_binds_only_loopback() {
        let addr = plain_mqtt_addr("127.0.0.1:1883").expect("loopback");
        assert_eq!(addr, "127.0.0.1:1883".parse().expect("addr"));
        let err = plain_mqtt_addr("0.0.0.0:1883").expect_err("not loopback");
        assert_eq!(
            (err.field, err.value.as_str()),
            ("plain_mqtt_addr", "0.0.0.0:1883")
        );
    }

    #[test]
    fn module_ids_are_sorted_and_each_kept_once() {
        let ids = module_ids(&["b".into(), "a".into(), "b".into()]).expect("valid");
        let ids: Vec<&str> = ids.iter().map(ModuleId::as_str).collect();
        assert_eq!(ids, ["a", "b"]);
        let err = module_ids(&["a".into(), "bad id".into()]).expect_err("bad id");
        assert_eq!((err.field, err.value.as_str()), ("module", "bad id"));
    }

    #[test]
    fn module_keys_are_checked_and_never_echoed() {
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
        let s = RawSettings {
            module_keys: vec![format!("modA={key}")],
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(s.module_keys()[0].0.as_str(), "modA");
        assert_eq!(s.module_keys()[0].1.as_bytes(), &[5u8; 32]);
        let short = base64::engine::general_purpose::STANDARD.encode([5u8; 8]);
        for bad in [
            format!("modA{key}"),
            format!("bad id={key}"),
            format!("modA={short}"),
            format!("modA={key},modA={key}"),
        ] {
            let err = RawSettings {
                module_keys: bad.split(',').map(str::to_owned).collect(),
                ..raw()
            }
            .validate(None)
            .expect_err(&bad);
            assert_eq!(err.field, "module_key", "{bad}: {err}");
            assert!(
                !err.to_string().contains(&short) && !err.to_string().contains(&key),
                "{err}"
            );
        }
    }

    #[test]
    fn connection_limits_default_to_edgehubs_and_are_checked() {
        let l = Settings::defaults(None).expect("valid").limits();
        assert_eq!(l.max_connections, 100);
        assert_eq!(l.max_unauthenticated, 32);
        assert_eq!(l.auth_timeout, std::time::Duration::from_secs(20));
        for (raw, field) in [
            (
                RawSettings {
                    max_connections: Some(0),
                    ..raw()
                },
                "max_connections",
            ),
            (
                RawSettings {
                    max_unauthenticated: Some(0),
                    ..raw()
                },
                "max_unauthenticated",
            ),
            (
                RawSettings {
                    auth_timeout_secs: Some(0),
                    ..raw()
                },
                "auth_timeout_secs",
            ),
        ] {
            assert_eq!(raw.validate(None).expect_err("rejected").field, field);
        }
    }

    #[test]
    fn gateway_hostname_falls_back_to_localhost_without_a_machine_name() {
        let s = Settings::defaults(None).expect("valid");
        assert_eq!(s.gateway_hostname(), "localhost");
    }

    #[test]
    fn a_bad_address_names_its_field() {
        let err = RawSettings {
            metrics_addr: Some("example.com:80".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("rejected");
        assert_eq!(err.field, "metrics_addr");
        assert!(err.to_string().contains("metrics_addr"), "{err}");
    }

    #[test]
    fn the_plain_listener_refuses_non_loopback_addresses() {
        let err = RawSettings {
            plain_mqtt_addr: Some("0.0.0.0:1883".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("rejected");
        assert_eq!(err.field, "plain_mqtt_addr");
        assert!(err.reason.contains("loopback"), "{err}");
        let ok = RawSettings {
            plain_mqtt_addr: Some("127.0.0.1:1883".into()),
            ..raw()
        }
        .validate(None)
        .expect("loopback is fine");
        assert_eq!(
            ok.plain_mqtt_addr(),
            Some("127.0.0.1:1883".parse().expect("addr"))
        );
        RawSettings {
            plain_mqtt_addr: Some("[::1]:1883".into()),
            ..raw()
        }
        .validate(None)
        .expect("ipv6 loopback is fine");
    }

    #[test]
    fn two_listeners_on_one_port_are_refused() {
        let err = RawSettings {
            mqtt_addr: Some("127.0.0.1:9600".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("rejected");
        assert_eq!(err.field, "metrics_addr");
        RawSettings {
            mqtt_addr: Some("127.0.0.1:0".into()),
            metrics_addr: Some("127.0.0.1:0".into()),
            ..raw()
        }
        .validate(None)
        .expect("port 0 may repeat");
    }

    #[test]
    fn the_methods_listener_is_off_unless_named_and_takes_its_own_port() {
        assert_eq!(
            Settings::defaults(None).expect("valid").methods_addr(),
            None
        );
        let s = RawSettings {
            methods_addr: Some(DEFAULT_METHODS_ADDR.into()),
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(
            s.methods_addr(),
            Some("0.0.0.0:8443".parse().expect("addr"))
        );
        let s = RawSettings {
            methods_addr: Some(":443".into()),
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(s.methods_addr(), Some("0.0.0.0:443".parse().expect("addr")));
        let err = RawSettings {
            methods_addr: Some("127.0.0.1:8883".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("rejected");
        assert_eq!(err.field, "methods_addr", "{err}");
        let err = RawSettings {
            methods_addr: Some("not an address".into()),
            ..raw()
        }
        .validate(None)
        .expect_err("rejected");
        assert_eq!(err.field, "methods_addr", "{err}");
    }

    #[test]
    fn ids_and_host_names_are_checked() {
        for (raw, field) in [
            (
                RawSettings {
                    device_id: Some("a/b".into()),
                    ..raw()
                },
                "device_id",
            ),
            (
                RawSettings {
                    modules: vec!["$edgeHub".into()],
                    ..raw()
                },
                "module",
            ),
            (
                RawSettings {
                    modules: vec!["x;y".into()],
                    ..raw()
                },
                "module",
            ),
            (
                RawSettings {
                    gateway_hostname: Some("bad host".into()),
                    ..raw()
                },
                "gateway_hostname",
            ),
            (
                RawSettings {
                    hostnames: vec!["-x.example".into()],
                    ..raw()
                },
                "hostname",
            ),
            (
                RawSettings {
                    iothub_hostname: Some(String::new()),
                    ..raw()
                },
                "iothub_hostname",
            ),
        ] {
            assert_eq!(raw.validate(None).expect_err("rejected").field, field);
        }
    }

    #[test]
    fn certificate_names_cover_loopback_machine_gateway_and_extras() {
        let s = RawSettings {
            gateway_hostname: Some("gw.example".into()),
            hostnames: vec!["10.0.0.5".into(), "LOCALHOST".into()],
            ..raw()
        }
        .validate(Some("box1".into()))
        .expect("valid");
        assert_eq!(
            s.certificate_names(),
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "box1",
                "gw.example",
                "10.0.0.5"
            ]
        );
    }

    #[test]
    fn modules_are_sorted_and_deduplicated() {
        let s = RawSettings {
            modules: vec!["b".into(), "a".into(), "b".into()],
            ..raw()
        }
        .validate(None)
        .expect("valid");
        assert_eq!(s.modules(), [ModuleId::new("a"), ModuleId::new("b")]);
        assert_eq!(
            s.all_modules(&[ModuleId::new("c"), ModuleId::new("a")]),
            [ModuleId::new("a"), ModuleId::new("b"), ModuleId::new("c")]
        );
    }

    #[test]
    fn the_default_manifest_parses_with_two_modules_and_two_routes() {
        let d = ManifestSource::BuiltIn.load().expect("valid");
        assert_eq!(
            d.modules,
            [ModuleId::new("receiver"), ModuleId::new("sender")]
        );
        assert_eq!(d.edge_hub.routes.routes().len(), 2);
        assert_eq!(d.edge_hub.store_ttl, router::Ttl::Seconds(7200));
    }

    #[test]
    fn the_summary_names_replicated_modules_and_that_only_mqtt_serves_them() {
        let plain = parse_manifest(DEFAULT_MANIFEST).expect("valid");
        assert!(!manifest_summary(&plain).contains("replicated"));
        let replicated = DEFAULT_MANIFEST.replacen(
            r#""receiver": {"#,
            r#""receiver": {"x-edgehub-replicas": {"count": 3, "partitionKey": "$body.id"},"#,
            1,
        );
        assert_ne!(replicated, DEFAULT_MANIFEST);
        let summary = manifest_summary(&parse_manifest(&replicated).expect("valid"));
        assert!(
            summary.ends_with("replicated: receiver x3 by $body.id"),
            "{summary}"
        );
    }

    #[test]
    fn the_default_manifest_parses_when_wrapped_as_az_iot_edge_writes_it() {
        let wrapped = format!("{{\"content\": {DEFAULT_MANIFEST}}}");
        assert_eq!(parse_manifest(&wrapped).map(|d| d.modules.len()), Ok(2));
    }

    #[test]
    fn bare_edgehub_desired_properties_are_a_deployment_without_modules() {
        let bare = r#"{"schemaVersion": "1.1", "routes": {"r": "FROM /* INTO $upstream"},
                       "storeAndForwardConfiguration": {"timeToLiveSecs": 60}}"#;
        let d = parse_manifest(bare).expect("valid");
        assert!(d.modules.is_empty());
        assert_eq!(d.edge_hub.store_ttl, router::Ttl::Seconds(60));
        assert!(manifest_summary(&d).contains("1 route(s)"));
        // Errors of bare properties name their own paths; a deployment's, the deployment's.
        let err = parse_manifest(r#"{"schemaVersion": "1.1", "routes": {}}"#).expect_err("no S&F");
        assert!(
            err.to_string().contains("storeAndForwardConfiguration"),
            "{err}"
        );
        let err = parse_manifest(r#"{"modulesContent": {}}"#).expect_err("empty");
        assert!(err.to_string().contains("modulesContent"), "{err}");
    }

    #[test]
    fn a_missing_manifest_file_is_a_read_error_naming_the_file() {
        let err = ManifestSource::File("/nonexistent/m.json".into())
            .load()
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/m.json"), "{err}");
    }
}
