//! The `edgehub` binary: command line, environment, signals and log setup, nothing more.
//!
//! Every flag is also an environment variable (`EDGEHUB_DATA_DIR`, `EDGEHUB_MQTT_ADDR`, …);
//! a flag wins over its variable. The library takes the resulting typed
//! [`hub::settings::Settings`].
//!
//! Subcommands:
//! - `run`: starts the hub on embedded defaults (see `hub::settings`) until Ctrl-C or SIGTERM;
//!   SIGHUP reloads the manifest and module keys (`hub::reload`).
//! - `connection-string MODULE`: prints the module's connection string (creating its key and
//!   the TLS files if needed, so it works before the first `run`).
//! - `ca-path`: prints the path of the CA certificate to give SDKs (creating it if needed).
//! - `check-manifest FILE`: validates a deployment manifest (or bare `$edgeHub` desired
//!   properties); prints every problem with its location and exits 1, or a summary and 0.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hub::identity::Identities;
use hub::settings::{self, LogFormat, ManifestSource, RawSettings, Settings};
use hub::tls;
use router::{ManifestError, ModuleId, Ttl};
use tracing_subscriber::EnvFilter;

/// edgehub: a durable, in-order IoT Edge message hub (a drop-in for Azure IoT Edge's edgeHub).
#[derive(Debug, Parser)]
#[command(name = "edgehub", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    hub: HubArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub until Ctrl-C or SIGTERM.
    Run,
    /// Print a module's connection string (HostName=…;DeviceId=…;ModuleId=…;SharedAccessKey=…;GatewayHostName=…).
    ConnectionString {
        /// The module: one of the manifest's $edgeAgent modules or a --module.
        module: String,
    },
    /// Print the path of the CA certificate that SDKs must trust.
    CaPath,
    /// Validate a deployment manifest and print every problem with its location.
    CheckManifest {
        /// The manifest file (a deployment manifest, or $edgeHub desired properties).
        file: PathBuf,
    },
}

/// Settings shared by every subcommand.
#[derive(Debug, Args)]
struct HubArgs {
    /// Data directory: store, module keys, certificates.
    #[arg(long, global = true, env = "EDGEHUB_DATA_DIR", value_name = "DIR",
          default_value = settings::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Deployment manifest [default: a built-in manifest with modules sender and receiver].
    #[arg(long, global = true, env = "EDGEHUB_MANIFEST", value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// MQTT-over-TLS listener.
    #[arg(long, global = true, env = "EDGEHUB_MQTT_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_MQTT_ADDR)]
    mqtt_addr: String,
    /// AMQP-over-TLS listener (port 0: any free port).
    #[arg(long, global = true, env = "EDGEHUB_AMQP_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_AMQP_ADDR)]
    amqp_addr: String,
    /// Metrics and health listener (/metrics, /healthz, /readyz); ":PORT" means all interfaces.
    #[arg(long, global = true, env = "EDGEHUB_METRICS_ADDR", value_name = "ADDR",
          default_value = settings::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// IoT Hub host name, as modules put it in their MQTT username and SAS tokens.
    #[arg(long, global = true, env = "EDGEHUB_IOTHUB_HOSTNAME", value_name = "HOST",
          default_value = settings::DEFAULT_IOTHUB_HOSTNAME)]
    iothub_hostname: String,
    /// The edge device id.
    #[arg(long, global = true, env = "EDGEHUB_DEVICE_ID", value_name = "ID",
          default_value = settings::DEFAULT_DEVICE_ID)]
    device_id: String,
    /// Host name modules connect to (GatewayHostName) [default: this machine's host name].
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_GATEWAY_HOSTNAME",
        value_name = "HOST"
    )]
    gateway_hostname: Option<String>,
    /// Another host name or IP address for the server certificate (repeatable; comma-separated in the variable).
    #[arg(
        long = "hostname",
        global = true,
        env = "EDGEHUB_HOSTNAMES",
        value_name = "HOST",
        value_delimiter = ','
    )]
    hostnames: Vec<String>,
    /// A module to give an identity besides the manifest's (repeatable; comma-separated in the variable).
    #[arg(
        long = "module",
        global = true,
        env = "EDGEHUB_MODULES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    modules: Vec<String>,
    /// A plain (unencrypted) MQTT listener for benchmarks; loopback addresses only.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_PLAIN_MQTT_ADDR",
        value_name = "ADDR"
    )]
    plain_mqtt_addr: Option<String>,
    /// Fencing epoch of the message store: raise it on every takeover (e.g. from a Kubernetes
    /// lease) and the store refuses any older owner.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_EPOCH",
        value_name = "N",
        default_value_t = 0
    )]
    epoch: u64,
    /// Upstream protocol to IoT Hub: mqtt, or none to keep $upstream messages on disk only.
    /// Upstream is off while --iothub-hostname is the placeholder default and no
    /// --upstream-addr is given.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_UPSTREAM_PROTOCOL",
        value_name = "PROTOCOL",
        default_value = "mqtt"
    )]
    upstream_protocol: String,
    /// Dial HOST:PORT for the upstream link instead of IOTHUB_HOSTNAME:8883 (a proxy, an
    /// emulator); SAS audiences and usernames still name --iothub-hostname.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_UPSTREAM_ADDR",
        value_name = "HOST:PORT"
    )]
    upstream_addr: Option<String>,
    /// A CA certificate (PEM) to trust for the upstream link, besides the system bundle.
    #[arg(long, global = true, env = "EDGEHUB_UPSTREAM_CA", value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// Seconds a message may wait for IoT Hub's acknowledgement before the connection is given
    /// up and everything unacknowledged is sent again on a new one.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_UPSTREAM_TIMEOUT",
        value_name = "SECS",
        default_value_t = settings::DEFAULT_UPSTREAM_TIMEOUT_SECS
    )]
    upstream_timeout: u64,
    /// The key IoT Hub issued for a module identity, as MODULE=BASE64KEY (repeatable;
    /// comma-separated in the variable). Saved in the data directory's identities.json; the
    /// module uses it towards the hub and the hub towards IoT Hub.
    #[arg(
        long = "module-key",
        global = true,
        env = "EDGEHUB_MODULE_KEYS",
        value_name = "MODULE=KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    module_keys: Vec<String>,
    /// A directory of module keys, as a Kubernetes Secret is mounted: one file per module,
    /// named after the module, holding its base64 key. Declares those modules, is saved like
    /// --module-key, and is watched: a new or changed file applies without a restart.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_MODULE_KEYS_DIR",
        value_name = "DIR"
    )]
    module_keys_dir: Option<PathBuf>,
    /// Authenticated connections per protocol (MQTT, AMQP), as edgeHub's MaxConnectedClients;
    /// one more is refused and closed.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = settings::DEFAULT_MAX_CONNECTIONS
    )]
    max_connections: usize,
    /// Connections per protocol between accept and authentication; when they are all taken, a
    /// new connection closes the oldest of them, so a flood cannot lock modules out.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_MAX_UNAUTHENTICATED",
        value_name = "N",
        default_value_t = settings::DEFAULT_MAX_UNAUTHENTICATED
    )]
    max_unauthenticated: usize,
    /// Seconds a connection has from accept to authenticated (TLS handshake, CONNECT or AMQP
    /// open and put-token) before it is closed.
    #[arg(
        long,
        global = true,
        env = "EDGEHUB_AUTH_TIMEOUT",
        value_name = "SECS",
        default_value_t = settings::DEFAULT_AUTH_TIMEOUT_SECS
    )]
    auth_timeout: u64,
    /// Log format: text or json.
    #[arg(long, global = true, env = "EDGEHUB_LOG_FORMAT", value_name = "FORMAT",
          default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax) [default: RUST_LOG, else "info" for run and "warn" otherwise, fe2o3_amqp off].
    #[arg(long, global = true, env = "EDGEHUB_LOG", value_name = "FILTER")]
    log: Option<String>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

impl HubArgs {
    fn settings(&self) -> anyhow::Result<Settings> {
        let raw = RawSettings {
            data_dir: Some(self.data_dir.clone()),
            manifest: self.manifest.clone(),
            mqtt_addr: Some(self.mqtt_addr.clone()),
            metrics_addr: Some(self.metrics_addr.clone()),
            amqp_addr: Some(self.amqp_addr.clone()),
            iothub_hostname: Some(self.iothub_hostname.clone()),
            device_id: Some(self.device_id.clone()),
            gateway_hostname: self.gateway_hostname.clone(),
            hostnames: self.hostnames.clone(),
            modules: self.modules.clone(),
            log_format: Some(self.log_format),
            plain_mqtt_addr: self.plain_mqtt_addr.clone(),
            epoch: Some(self.epoch),
            upstream_protocol: Some(self.upstream_protocol.clone()),
            upstream_addr: self.upstream_addr.clone(),
            upstream_ca: self.upstream_ca.clone(),
            upstream_timeout_secs: Some(self.upstream_timeout),
            module_keys: self.module_keys.clone(),
            module_keys_dir: self.module_keys_dir.clone(),
            max_connections: Some(self.max_connections),
            max_unauthenticated: Some(self.max_unauthenticated),
            auth_timeout_secs: Some(self.auth_timeout),
        };
        Ok(raw.validate(settings::machine_hostname())?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let result = match &cli.command {
        Command::Run => run(&cli.hub),
        Command::ConnectionString { module } => connection_string(&cli.hub, module),
        Command::CaPath => ca_path(&cli.hub),
        Command::CheckManifest { file } => return check_manifest(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cli: &Cli) {
    // fe2o3-amqp logs a client's ordinary Close or End at ERROR; the AMQP head logs every
    // connection's outcome itself, so the library is quiet unless asked (`--log
    // info,fe2o3_amqp=debug`).
    let default = match cli.command {
        Command::Run => "info,fe2o3_amqp=off",
        _ => "warn,fe2o3_amqp=off",
    };
    let filter = match &cli.hub.log {
        Some(directives) => EnvFilter::try_new(directives),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)),
    }
    .unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter ({e}); using {default:?}");
        EnvFilter::new(default)
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.hub.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(args: &HubArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let reloads = reload_requests();
        hub::server::run_with_reloads(settings, shutdown_signal(), reloads).await
    })
}

/// One request per SIGHUP (requests arriving while one waits are merged): reload the manifest.
fn reload_requests() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP; reload by file only"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

fn connection_string(args: &HubArgs, module: &str) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let deployment = settings.manifest().load()?;
    let identities = Identities::for_settings(&settings, &deployment.modules)?;
    tls::ensure(&settings).context("TLS certificates")?;
    let line = identities.connection_string(&ModuleId::new(module), &settings)?;
    println!("{line}");
    Ok(())
}

fn ca_path(args: &HubArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let (files, _) = tls::ensure(&settings).context("TLS certificates")?;
    let path = std::path::absolute(&files.ca_cert).unwrap_or(files.ca_cert);
    println!("{}", path.display());
    Ok(())
}

fn check_manifest(file: &std::path::Path) -> ExitCode {
    let source = ManifestSource::File(file.to_path_buf());
    let text = match source.text() {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match check_text(&text) {
        Ok(summary) => {
            println!("{}: ok: {summary}", file.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
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
    }
}

/// Validates a deployment manifest, or bare `$edgeHub` desired properties (a document with
/// neither `modulesContent` nor `content`), and summarises it.
fn check_text(text: &str) -> Result<String, ManifestError> {
    let is_deployment = serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v.get("modulesContent").is_some() || v.get("content").is_some())
        .unwrap_or(true);
    let (config, modules) = if is_deployment {
        let d = settings::parse_manifest(text)?;
        (d.edge_hub, Some(d.modules))
    } else {
        (router::parse_edge_hub_desired(text)?, None)
    };
    let ttl = match config.store_ttl {
        Ttl::Infinite => "infinite".to_owned(),
        Ttl::Seconds(s) => format!("{s} s"),
    };
    let mut summary = format!(
        "schema {}.{}, {} route(s), store TTL {ttl}",
        config.schema_version.major,
        config.schema_version.minor,
        config.routes.routes().len()
    );
    if let Some(modules) = modules {
        let names: Vec<&str> = modules.iter().map(ModuleId::as_str).collect();
        summary.push_str(&format!(
            ", {} module(s) ({})",
            names.len(),
            names.join(", ")
        ));
    }
    Ok(summary)
}
