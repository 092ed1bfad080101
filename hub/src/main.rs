//! The `edgehub` binary: command line, environment, signals and log setup, nothing more.
//!
//! Each subcommand takes its own flags only (`edgehub SUBCOMMAND --help` lists them); every
//! flag is also an environment variable (`EDGEHUB_DATA_DIR`, `EDGEHUB_MQTT_ADDR`, …), a flag
//! wins over its variable, and a subcommand ignores the variables of flags it does not take.
//! The library takes the resulting typed [`hub::settings::Settings`].
//!
//! Subcommands:
//! - `run`: starts the hub until Ctrl-C or SIGTERM, and records in the data directory what the
//!   hub is (`hub.json`, see `hub::record`); SIGHUP reloads the manifest and module keys
//!   (`hub::reload`). It exits 3 when fenced, 4 on a stale `--epoch`
//!   (`hub::server::RunError::exit_code`) and 5 when another hub initializing the data
//!   directory held its `init.lock` for the whole `--init-lock-timeout` (`hub::initlock`).
//! - `connection-string MODULE`: prints the module's connection string for the hub the data
//!   directory belongs to (creating its key, the TLS files and the record if needed, so it works
//!   before the first `run`).
//! - `ca-path`: prints the path of the CA certificate to give SDKs (creating it if needed, or
//!   `--tls-ca` when the certificate files are given).
//! - `check-manifest FILE`: validates a manifest with the parser `run` uses; prints every
//!   problem with its location and exits 1, or a summary and 0.
//!
//! Logs go to stderr, coloured only when stderr is a terminal and `NO_COLOR` is not set.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hub::identity::Identities;
use hub::initlock::{InitLock, InitLockError};
use hub::record::HubRecord;
use hub::settings::{self, LogFormat, ManifestSource, RawSettings, Settings};
use hub::tls;
use router::ModuleId;
use tracing_subscriber::EnvFilter;

/// edgehub: a durable, in-order IoT Edge message hub (a drop-in for Azure IoT Edge's edgeHub).
#[derive(Debug, Parser)]
#[command(name = "edgehub", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub until Ctrl-C or SIGTERM.
    ///
    /// Exit status 3: a newer hub (same or higher --epoch) opened the store, so this one closed
    /// every connection and stopped; 4: this hub's --epoch is below the store's (stale), so it
    /// did not open it; 5: another hub held the data directory's init.lock for the whole
    /// --init-lock-timeout; 1: any other error.
    Run(Box<RunArgs>),
    /// Print a module's connection string
    /// (HostName=…;DeviceId=…;ModuleId=…;SharedAccessKey=…;GatewayHostName=…) for the hub the
    /// data directory belongs to.
    ConnectionString(Box<ConnectionStringArgs>),
    /// Print the path of the CA certificate that SDKs must trust.
    CaPath(CaPathArgs),
    /// Validate a manifest with the parser `run` uses, and print every problem with its
    /// location.
    CheckManifest(CheckManifestArgs),
}

/// Logging, taken by every subcommand.
#[derive(Debug, Args)]
struct LogArgs {
    /// Log format: text or json.
    #[arg(long, global = true, env = "EDGEHUB_LOG_FORMAT", value_name = "FORMAT",
          default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax) [default: RUST_LOG, else "info" for run and "warn"
    /// otherwise, fe2o3_amqp off].
    #[arg(long, global = true, env = "EDGEHUB_LOG", value_name = "FILTER")]
    log: Option<String>,
}

/// The data directory.
#[derive(Debug, Args)]
struct DataDirArgs {
    /// Data directory: store, module keys, certificates, and the record of what this hub is
    /// (hub.json).
    #[arg(long, env = "EDGEHUB_DATA_DIR", value_name = "DIR",
          default_value = settings::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Seconds to wait while another hub initializes the data directory (holds its
    /// init.lock) before giving up with exit status 5.
    #[arg(long, env = "EDGEHUB_INIT_LOCK_TIMEOUT", value_name = "SECS",
          default_value_t = hub::initlock::DEFAULT_INIT_LOCK_TIMEOUT.as_secs())]
    init_lock_timeout: u64,
}

impl DataDirArgs {
    /// Takes the data directory's initialization lock (see `hub::initlock`).
    fn init_lock(&self) -> Result<InitLock, InitLockError> {
        InitLock::acquire(
            &self.data_dir,
            std::time::Duration::from_secs(self.init_lock_timeout),
        )
    }
}

/// What the hub is: recorded in the data directory by `run`.
#[derive(Debug, Args)]
struct IdentityArgs {
    /// IoT Hub host name, as modules put it in their MQTT username and SAS tokens [default: the
    /// data directory's record, else edgehub.local].
    #[arg(long, env = "EDGEHUB_IOTHUB_HOSTNAME", value_name = "HOST")]
    iothub_hostname: Option<String>,
    /// The edge device id [default: the data directory's record, else edge-device].
    #[arg(long, env = "EDGEHUB_DEVICE_ID", value_name = "ID")]
    device_id: Option<String>,
    /// Host name modules connect to (GatewayHostName) [default: the data directory's record,
    /// else this machine's host name].
    #[arg(long, env = "EDGEHUB_GATEWAY_HOSTNAME", value_name = "HOST")]
    gateway_hostname: Option<String>,
    /// Another host name or IP address for the server certificate (repeatable; comma-separated
    /// in the variable) [default: the data directory's record].
    #[arg(
        long = "hostname",
        env = "EDGEHUB_HOSTNAMES",
        value_name = "HOST",
        value_delimiter = ','
    )]
    hostnames: Vec<String>,
}

/// Which modules have identities.
#[derive(Debug, Args)]
struct ModuleArgs {
    /// Manifest: a deployment manifest, or bare $edgeHub desired properties [default for run:
    /// a built-in manifest with modules sender and receiver].
    #[arg(long, env = "EDGEHUB_MANIFEST", value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// A module to give an identity besides the manifest's (repeatable; comma-separated in the
    /// variable).
    #[arg(
        long = "module",
        env = "EDGEHUB_MODULES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    modules: Vec<String>,
    /// The key IoT Hub issued for a module identity, as MODULE=BASE64KEY (repeatable;
    /// comma-separated in the variable). Saved in the data directory's identities.json; the
    /// module uses it towards the hub and the hub towards IoT Hub.
    #[arg(
        long = "module-key",
        env = "EDGEHUB_MODULE_KEYS",
        value_name = "MODULE=KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    module_keys: Vec<String>,
    /// A directory of module keys, as a Kubernetes Secret is mounted: one file per module,
    /// named after the module, holding its base64 key. Declares those modules, is saved like
    /// --module-key, and is watched by `run`: a new or changed file applies without a restart.
    #[arg(long, env = "EDGEHUB_MODULE_KEYS_DIR", value_name = "DIR")]
    module_keys_dir: Option<PathBuf>,
}

/// Certificate files to serve instead of the data directory's own CA (as a Kubernetes Secret
/// mounts them): all three or none.
#[derive(Debug, Args)]
struct TlsArgs {
    /// The server certificate to present (PEM: the leaf, then any intermediates) instead of one
    /// from the data directory's own CA. Re-read when it changes (new connections get the new
    /// one); with --tls-key and --tls-ca.
    #[arg(long, env = "EDGEHUB_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "EDGEHUB_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA certificate --tls-cert chains to (PEM): what modules trust, and what `ca-path`
    /// prints.
    #[arg(long, env = "EDGEHUB_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn fill(&self, raw: &mut RawSettings) {
        raw.tls_cert = self.tls_cert.clone();
        raw.tls_key = self.tls_key.clone();
        raw.tls_ca = self.tls_ca.clone();
    }
}

/// `edgehub run`.
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    data: DataDirArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    modules: ModuleArgs,
    /// Change the IoT Hub host name, device id or gateway host name recorded in the data
    /// directory to the ones given (without it, a contradicting flag stops the hub).
    #[arg(long, env = "EDGEHUB_RECONFIGURE")]
    reconfigure: bool,
    /// MQTT-over-TLS listener.
    #[arg(long, env = "EDGEHUB_MQTT_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_MQTT_ADDR)]
    mqtt_addr: String,
    /// AMQP-over-TLS listener (port 0: any free port).
    #[arg(long, env = "EDGEHUB_AMQP_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_AMQP_ADDR)]
    amqp_addr: String,
    /// Metrics and health listener (/metrics, /healthz, /readyz); ":PORT" means all interfaces.
    #[arg(long, env = "EDGEHUB_METRICS_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// HTTPS listener for direct methods between modules (`POST
    /// /twins/{device}/modules/{module}/methods`, on the hub's TLS). The SDKs dial port 443 of
    /// their GatewayHostName: map 443 to this port (Kubernetes Service, `-p 443:8443`), or give
    /// `0.0.0.0:443` to a hub allowed to bind it (root or CAP_NET_BIND_SERVICE).
    #[arg(long, env = "EDGEHUB_METHODS_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_METHODS_ADDR)]
    methods_addr: String,
    /// A plain (unencrypted) MQTT listener for benchmarks; loopback addresses only.
    #[arg(long, env = "EDGEHUB_PLAIN_MQTT_ADDR", value_name = "ADDR")]
    plain_mqtt_addr: Option<String>,
    /// The fencing contract: this hub's epoch for the message store, set by whoever places the
    /// hub (the controller bumps it for every new pod, from its `<name>-hub-epoch` ConfigMap;
    /// a pod restarted with its old spec keeps the old one). Below the highest epoch that
    /// opened the store: refused, exit status 4 (stale epoch). Equal or above: this hub opens
    /// the store and the hub that had it (equal: a restart of the same pod) is fenced: it
    /// closes every connection and exits with status 3.
    #[arg(long, env = "EDGEHUB_EPOCH", value_name = "N", default_value_t = 0)]
    epoch: u64,
    /// A connection that waits for each PUBACK (as the SDKs do) has its message written and
    /// synced on its own thread when the store's writer is idle and the disk's last sync took
    /// at most 2 ms: no thread hand-off on either side of the fdatasync. `false` leaves every
    /// write to the store's writer thread (the behaviour before issue 18; for comparison).
    #[arg(long, env = "EDGEHUB_COMMIT_ON_CALLER", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    commit_on_caller: bool,
    /// Upstream protocol to IoT Hub: mqtt, or none to keep $upstream messages on disk only.
    /// Upstream is off while the IoT Hub host name is the placeholder default and no
    /// --upstream-addr is given.
    #[arg(
        long,
        env = "EDGEHUB_UPSTREAM_PROTOCOL",
        value_name = "PROTOCOL",
        default_value = "mqtt"
    )]
    upstream_protocol: String,
    /// Dial HOST:PORT for the cloud connection instead of IOTHUB_HOSTNAME:8883 (a proxy, an
    /// emulator); SAS audiences and usernames still name the IoT Hub host name.
    #[arg(long, env = "EDGEHUB_UPSTREAM_ADDR", value_name = "HOST:PORT")]
    upstream_addr: Option<String>,
    /// A CA certificate (PEM) to trust for the cloud connection, besides the system bundle.
    #[arg(long, env = "EDGEHUB_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Seconds a message may wait for IoT Hub's acknowledgement before the connection is given
    /// up and everything unacknowledged is sent again on a new one.
    #[arg(
        long,
        env = "EDGEHUB_UPSTREAM_TIMEOUT",
        value_name = "SECS",
        default_value_t = settings::DEFAULT_UPSTREAM_TIMEOUT_SECS
    )]
    upstream_timeout: u64,
    /// Authenticated connections per protocol (MQTT, AMQP), as edgeHub's MaxConnectedClients;
    /// one more is refused and closed.
    #[arg(
        long,
        env = "EDGEHUB_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = settings::DEFAULT_MAX_CONNECTIONS
    )]
    max_connections: usize,
    /// Connections per protocol between accept and authentication; when they are all taken, a
    /// new connection closes the oldest of them, so a flood cannot lock modules out.
    #[arg(
        long,
        env = "EDGEHUB_MAX_UNAUTHENTICATED",
        value_name = "N",
        default_value_t = settings::DEFAULT_MAX_UNAUTHENTICATED
    )]
    max_unauthenticated: usize,
    /// Seconds a connection has from accept to authenticated (TLS handshake, CONNECT or AMQP
    /// open and put-token) before it is closed.
    #[arg(
        long,
        env = "EDGEHUB_AUTH_TIMEOUT",
        value_name = "SECS",
        default_value_t = settings::DEFAULT_AUTH_TIMEOUT_SECS
    )]
    auth_timeout: u64,
    /// Flow control: while a module input's receiver is connected and more than N messages
    /// stored for it are not yet delivered, the hub stops reading from the connections that
    /// feed it (their PUBACKs still go out as messages become durable) until it catches up or
    /// disconnects. Store-and-forward for a receiver that is away is never slowed. 0: off.
    #[arg(
        long,
        env = "EDGEHUB_FLOW_CONTROL_MAX_LAG",
        value_name = "N",
        default_value_t = settings::DEFAULT_FLOW_CONTROL_MAX_LAG
    )]
    flow_control_max_lag: u64,
}

/// `edgehub connection-string`.
#[derive(Debug, Args)]
struct ConnectionStringArgs {
    /// The module: one the data directory's hub has an identity for, one of the manifest's
    /// $edgeAgent modules, or a --module.
    module: String,
    #[command(flatten)]
    data: DataDirArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    #[command(flatten)]
    modules: ModuleArgs,
}

/// `edgehub ca-path`.
#[derive(Debug, Args)]
struct CaPathArgs {
    #[command(flatten)]
    data: DataDirArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// `edgehub check-manifest`.
#[derive(Debug, Args)]
struct CheckManifestArgs {
    /// The manifest file (a deployment manifest, or bare $edgeHub desired properties).
    file: PathBuf,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

impl IdentityArgs {
    fn fill(&self, raw: &mut RawSettings) {
        raw.iothub_hostname = self.iothub_hostname.clone();
        raw.device_id = self.device_id.clone();
        raw.gateway_hostname = self.gateway_hostname.clone();
        raw.hostnames = self.hostnames.clone();
    }
}

impl ModuleArgs {
    fn fill(&self, raw: &mut RawSettings) {
        raw.manifest = self.manifest.clone();
        raw.modules = self.modules.clone();
        raw.module_keys = self.module_keys.clone();
        raw.module_keys_dir = self.module_keys_dir.clone();
    }
}

/// Settings from `raw` with the data directory's record applied (see `hub::record`), and the
/// record.
fn with_record(
    mut raw: RawSettings,
    reconfigure: bool,
) -> anyhow::Result<(Settings, Option<HubRecord>)> {
    let data_dir = raw
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(settings::DEFAULT_DATA_DIR));
    let record = HubRecord::load(&data_dir)?;
    HubRecord::apply(record.as_ref(), &mut raw, reconfigure, &data_dir)?;
    Ok((raw.validate(settings::machine_hostname())?, record))
}

impl RunArgs {
    fn raw(&self) -> RawSettings {
        let mut raw = RawSettings {
            data_dir: Some(self.data.data_dir.clone()),
            mqtt_addr: Some(self.mqtt_addr.clone()),
            metrics_addr: Some(self.metrics_addr.clone()),
            amqp_addr: Some(self.amqp_addr.clone()),
            methods_addr: Some(self.methods_addr.clone()),
            plain_mqtt_addr: self.plain_mqtt_addr.clone(),
            epoch: Some(self.epoch),
            commit_on_caller: Some(self.commit_on_caller),
            upstream_protocol: Some(self.upstream_protocol.clone()),
            upstream_addr: self.upstream_addr.clone(),
            upstream_ca: self.upstream_ca.clone(),
            upstream_timeout_secs: Some(self.upstream_timeout),
            max_connections: Some(self.max_connections),
            max_unauthenticated: Some(self.max_unauthenticated),
            auth_timeout_secs: Some(self.auth_timeout),
            flow_control_max_lag: Some(self.flow_control_max_lag),
            ..RawSettings::default()
        };
        self.identity.fill(&mut raw);
        self.modules.fill(&mut raw);
        self.tls.fill(&mut raw);
        raw
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let result = match &cli.command {
        Command::Run(args) => run(args),
        Command::ConnectionString(args) => connection_string(args),
        Command::CaPath(args) => ca_path(args),
        Command::CheckManifest(args) => return check_manifest(&args.file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Fenced (3) and stale epoch (4) have their own statuses: the orchestrator and
            // the operator can tell them from a crash.
            let code = e
                .downcast_ref::<hub::server::RunError>()
                .and_then(hub::server::RunError::exit_code)
                .or_else(|| {
                    e.downcast_ref::<InitLockError>()
                        .and_then(InitLockError::exit_code)
                });
            match code {
                Some(code) => ExitCode::from(code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Colour only where a person reads: stderr (where logs go) is a terminal and `NO_COLOR` is
/// unset or empty (no-color.org).
fn use_ansi() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn init_tracing(cli: &Cli) {
    // fe2o3-amqp logs a client's ordinary Close or End at ERROR; the AMQP head logs every
    // connection's outcome itself, so the library is quiet unless asked (`--log
    // info,fe2o3_amqp=debug`).
    let default = match cli.command {
        Command::Run(_) => "info,fe2o3_amqp=off",
        _ => "warn,fe2o3_amqp=off",
    };
    let filter = match &cli.log.log {
        Some(directives) => EnvFilter::try_new(directives),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)),
    }
    .unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter ({e}); using {default:?}");
        EnvFilter::new(default)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_ansi());
    match cli.log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    // Held from before the record is read until the server has opened the store.
    let init = args.data.init_lock()?;
    let (settings, record) = with_record(args.raw(), args.reconfigure)?;
    // The manifest is loaded here too (the server loads it again) to record the modules before
    // anything listens; a bad manifest stops the hub here with the same error.
    let deployment = settings
        .manifest()
        .load()
        .context("cannot load the manifest")?;
    let new = HubRecord {
        iothub_hostname: settings.iothub_hostname().to_owned(),
        device_id: settings.device_id().clone(),
        gateway_hostname: settings.gateway_hostname().to_owned(),
        hostnames: settings.hostnames().to_vec(),
        modules: declared_modules(&settings, &deployment.modules),
    };
    if new.modules.is_empty() {
        tracing::warn!(
            manifest = %settings.manifest(),
            "no module has an identity: the manifest declares none (bare $edgeHub properties?); \
             give them with --module NAME or --module-key NAME=KEY"
        );
    }
    if record.as_ref() != Some(&new) {
        if let Some(old) = &record {
            if old.device_id != new.device_id
                || old.iothub_hostname != new.iothub_hostname
                || old.gateway_hostname != new.gateway_hostname
            {
                tracing::warn!(
                    from = ?(&old.iothub_hostname, old.device_id.as_str(), &old.gateway_hostname),
                    to = ?(&new.iothub_hostname, new.device_id.as_str(), &new.gateway_hostname),
                    "--reconfigure: the hub's IoT Hub host name, device id or gateway host name \
                     changed; modules need their new connection strings"
                );
            }
        }
        new.save(settings.data_dir())
            .context("cannot record what this hub is in the data directory")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Listen for the signals before anything else, so a SIGTERM that follows "edgehub
        // ready" at once is a graceful shutdown and a SIGHUP a reload, not the default action
        // (death by signal).
        let shutdown = shutdown_signal()?;
        let reloads = reload_requests()?;
        let listeners = hub::server::Listeners::bind(&settings).await?;
        let clock: Arc<dyn store::Clock> = Arc::new(store::SystemClock);
        hub::server::run_with_reloads(settings, listeners, clock, shutdown, reloads, init).await?;
        Ok(())
    })
}

/// One request per SIGHUP (requests arriving while one waits are merged): reload the manifest
/// and the module keys. The handler is installed when this is called.
fn reload_requests() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let _ = tx.try_send(());
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    Ok(rx)
}

/// Every module the hub gives an identity: the manifest's, `--module`s and `--module-key`s.
fn declared_modules(settings: &Settings, manifest_modules: &[ModuleId]) -> Vec<ModuleId> {
    let mut all = settings.all_modules(manifest_modules);
    all.extend(settings.module_keys().iter().map(|(m, _)| m.clone()));
    all.sort();
    all.dedup();
    all
}

/// A future that completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this
/// is called (inside the runtime), not when the future is first polled.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("Ctrl-C: shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    })
}

/// A future that completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C: shutting down");
    })
}

fn connection_string(args: &ConnectionStringArgs) -> anyhow::Result<()> {
    let mut raw = RawSettings {
        data_dir: Some(args.data.data_dir.clone()),
        ..RawSettings::default()
    };
    args.identity.fill(&mut raw);
    args.modules.fill(&mut raw);
    let _init = args.data.init_lock()?;
    let (settings, record) = with_record(raw, false)?;
    // With a record, the modules are the recorded ones (plus a --manifest's, if given); on a
    // fresh data directory, the manifest's (the built-in one unless --manifest), as before
    // the record existed.
    let mut modules = match &record {
        Some(r) => r.modules.clone(),
        None => Vec::new(),
    };
    if record.is_none() || args.modules.manifest.is_some() {
        modules.extend(settings.manifest().load()?.modules);
    }
    let modules = declared_modules(&settings, &modules);
    let identities = Identities::for_settings(&settings, &modules)?;
    tls::ensure(&settings).context("TLS certificates")?;
    let line = identities.connection_string(&ModuleId::new(args.module.as_str()), &settings)?;
    let new = HubRecord {
        iothub_hostname: settings.iothub_hostname().to_owned(),
        device_id: settings.device_id().clone(),
        gateway_hostname: settings.gateway_hostname().to_owned(),
        hostnames: match &record {
            Some(r) => r.hostnames.clone(),
            None => settings.hostnames().to_vec(),
        },
        modules,
    };
    if record.as_ref().map(|r| &r.modules) != Some(&new.modules) {
        new.save(settings.data_dir())
            .context("cannot record what this hub is in the data directory")?;
    }
    println!("{line}");
    Ok(())
}

fn ca_path(args: &CaPathArgs) -> anyhow::Result<()> {
    let mut raw = RawSettings {
        data_dir: Some(args.data.data_dir.clone()),
        ..RawSettings::default()
    };
    args.tls.fill(&mut raw);
    // Given certificate files: nothing is created, so nothing to serialize (and the data
    // directory may be read-only).
    let _init = match &args.tls.tls_ca {
        None => Some(args.data.init_lock()?),
        Some(_) => None,
    };
    // The record's names keep the server certificate as `run` issued it.
    let (settings, _) = with_record(raw, false)?;
    let ca = match settings.given_tls() {
        // Given files are the controller's to make: nothing is created.
        Some(given) => given.ca.clone(),
        None => {
            tls::ensure(&settings)
                .context("TLS certificates")?
                .0
                .ca_cert
        }
    };
    let path = std::path::absolute(&ca).unwrap_or(ca);
    println!("{}", path.display());
    Ok(())
}

fn check_manifest(file: &Path) -> ExitCode {
    // The very loader `run` uses (`hub::server::run` calls `ManifestSource::load`).
    match ManifestSource::File(file.to_path_buf()).load() {
        Ok(deployment) => {
            println!(
                "{}: ok: {}",
                file.display(),
                settings::manifest_summary(&deployment)
            );
            ExitCode::SUCCESS
        }
        Err(settings::ManifestLoadError::Invalid { error, .. }) => {
            for issue in &error.issues {
                eprintln!("error: {}: {issue}", file.display());
            }
            eprintln!(
                "{}: {} problem(s) found",
                file.display(),
                error.issues.len()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
