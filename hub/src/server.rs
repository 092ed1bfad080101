//! The composition root: from typed settings, ready listeners and a clock it builds the store,
//! router, dispatcher, identities, TLS, the heads and the HTTP surface, serves until `shutdown`,
//! then stops in order.
//!
//! Like mini-redis's `server::run(listener, shutdown)`, it binds nothing itself: the caller
//! (`main.rs`, or a test on port 0) binds the [`Listeners`] and gives the [`Clock`] (the
//! [`store::SystemClock`] in production) that every wall-clock reading of the hub goes through.
//! [`run`] reads as its phases: [`prepare`] (data directory, manifest, identities, TLS),
//! [`open_store`], [`build_core`] (delivery, upstream, the heads' shared context, reloads),
//! [`start_heads`], serve, [`drain`]. Each failure is a [`RunError`] naming its phase and
//! keeping its cause.
//!
//! Guarantees: nothing is accepted before the store is recovered and the manifest is valid (a
//! broken manifest or store is an error before any client is served; a client that connects
//! early waits in the listen backlog); `/readyz` turns ready only once every head serves; on
//! shutdown the listeners stop, every connection first acknowledges what is already durable and
//! then closes, the endpoint workers stop, and the store is closed last, so nothing acknowledged
//! is left anywhere but on disk.
//!
//! Once a newer hub opens the store (a write finds the fence, or the check every
//! [`FENCE_CHECK_INTERVAL`] does), the hub stops the same way, acknowledging nothing new, and
//! [`run`] returns [`RunError::Fenced`] (the binary exits [`EXIT_FENCED`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecommendedWatcher;
use router::manifest::Deployment;
use router::{Dispatcher, DispatcherConfig, DispatcherError, Router};
use store::{Clock, Epoch, OpenError, OsFs, Store, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::head::context::HeadContext;
use crate::head::registry::Registry;
use crate::http::{self, HttpState, Readiness};
use crate::identity::{self, Identities, IdentityError};
use crate::initlock::{InitLock, InitLockError, DEFAULT_INIT_LOCK_TIMEOUT};
use crate::limits::Budget;
use crate::metrics::HubMetrics;
use crate::mqtt::listener;
use crate::mqtt::sessions::{Sessions, SessionsError};
use crate::reload::{self, Reloader, Trigger};
use crate::settings::{ManifestLoadError, ManifestSource, Settings};
use crate::tls::{self, GivenCert, TlsError};
use crate::upstream;
use crate::upstream::mqtt::{MqttUpstream, UpstreamTlsError};

/// Directory of the message store inside the data directory.
pub const STORE_DIR: &str = "store";

/// How often a serving hub asks its store whether a newer owner opened it (one `fstat` of
/// `EPOCHS`), besides the check every write makes: an idle fenced hub holds its connections at
/// most this long (plus the moment a frozen process needs to run again: the overdue check runs
/// first thing after a SIGCONT). A second is far below what a module's reconnect takes and
/// costs nothing measurable.
pub const FENCE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Exit status of a hub whose store a newer owner (a higher or equal `--epoch`) opened.
pub const EXIT_FENCED: u8 = 3;
/// Exit status of a hub refused at open because its `--epoch` is below the store's highest.
pub const EXIT_STALE_EPOCH: u8 = 4;

/// The sockets the hub serves, bound by its caller.
#[derive(Debug)]
pub struct Listeners {
    /// MQTT over TLS (8883).
    pub mqtt: TcpListener,
    /// AMQP over TLS (5671).
    pub amqp: TcpListener,
    /// HTTP: metrics, health, readiness, the manifest.
    pub http: TcpListener,
    /// MQTT without TLS, if asked for (loopback only).
    pub plain_mqtt: Option<TcpListener>,
    /// HTTPS for direct methods between modules, if the settings name an address.
    pub methods: Option<TcpListener>,
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {protocol} on {addr}")]
pub struct BindError {
    /// What would have listened there ("MQTT", "AMQP", "HTTP", "plain MQTT").
    pub protocol: &'static str,
    /// The address as the settings give it.
    pub addr: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The local addresses of a hub's [`Listeners`] (with the real ports when the settings said 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundAddrs {
    /// MQTT over TLS.
    pub mqtt: SocketAddr,
    /// AMQP over TLS.
    pub amqp: SocketAddr,
    /// HTTP.
    pub http: SocketAddr,
    /// Plain MQTT, if any.
    pub plain_mqtt: Option<SocketAddr>,
    /// HTTPS for direct methods, if any.
    pub methods: Option<SocketAddr>,
}

impl Listeners {
    /// Binds the addresses `settings` name.
    pub async fn bind(settings: &Settings) -> Result<Listeners, BindError> {
        async fn one(protocol: &'static str, addr: &str) -> Result<TcpListener, BindError> {
            TcpListener::bind(addr).await.map_err(|source| BindError {
                protocol,
                addr: addr.to_owned(),
                source,
            })
        }
        let mqtt = one("MQTT", &settings.mqtt_addr().to_string()).await?;
        let amqp = one("AMQP", &settings.amqp_addr().to_string()).await?;
        let http = one("HTTP", &settings.metrics_addr().to_string()).await?;
        let plain_mqtt = match settings.plain_mqtt_addr() {
            Some(addr) => Some(one("plain MQTT", &addr.to_string()).await?),
            None => None,
        };
        let methods = match settings.methods_addr() {
            Some(addr) => Some(one("HTTPS (direct methods)", &addr.to_string()).await?),
            None => None,
        };
        Ok(Listeners {
            mqtt,
            amqp,
            http,
            plain_mqtt,
            methods,
        })
    }

    /// Where each listener listens.
    pub fn local_addrs(&self) -> io::Result<BoundAddrs> {
        Ok(BoundAddrs {
            mqtt: self.mqtt.local_addr()?,
            amqp: self.amqp.local_addr()?,
            http: self.http.local_addr()?,
            plain_mqtt: self
                .plain_mqtt
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
            methods: self
                .methods
                .as_ref()
                .map(TcpListener::local_addr)
                .transpose()?,
        })
    }
}

/// Why [`run`] failed, by phase; each keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Before preparing: the data directory's initialization lock cannot be taken.
    #[error("cannot take the data directory's initialization lock")]
    InitLock(#[source] InitLockError),
    /// Preparing: the data directory cannot be created.
    #[error("cannot create the data directory {}", path.display())]
    DataDir {
        /// The data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Preparing: the manifest cannot be loaded or is invalid.
    #[error("cannot load the manifest")]
    Manifest(#[source] ManifestLoadError),
    /// Preparing: the module keys given (`--module-key`, keys directory) cannot be read.
    #[error("cannot load the module keys")]
    ModuleKeys(#[source] IdentityError),
    /// Preparing: the identities file cannot be read or written.
    #[error("cannot load the module identities")]
    Identities(#[source] IdentityError),
    /// Preparing: the hub's CA or server certificate cannot be made or read.
    #[error("cannot set up TLS")]
    Tls(#[source] TlsError),
    /// Opening the store: it cannot be opened or recovered.
    #[error("cannot open the message store in {}", path.display())]
    Store {
        /// The store's directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: store::OpenError,
    },
    /// Building the core: delivery cannot start.
    #[error("cannot start delivery")]
    Delivery(#[source] DispatcherError),
    /// Building the core: the persistent MQTT sessions cannot be read.
    #[error("cannot load the MQTT sessions")]
    Sessions(#[source] SessionsError),
    /// Building the core: the module twins' directory cannot be made.
    #[error("cannot open the module twins' directory")]
    Twins(#[source] crate::twin::TwinError),
    /// Building the core: the cloud connection's TLS cannot be set up.
    #[error("cannot set up the cloud connection")]
    Upstream(#[source] UpstreamTlsError),
    /// Building the core: a manifest or keys directory cannot be watched.
    #[error("cannot watch {} for changes", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: notify::Error,
    },
    /// Starting the heads: a listener's address cannot be read.
    #[error("cannot read a listener's address")]
    LocalAddr(#[source] io::Error),
    /// Draining: the store did not close cleanly.
    #[error("closing the store")]
    Close(#[source] store::CloseError),
    /// Serving: a newer owner opened the store (a higher or equal epoch); the hub closed every
    /// connection and stopped.
    #[error(
        "the message store was fenced: a newer hub opened it (this hub's epoch is {epoch}); \
         stopped serving"
    )]
    Fenced {
        /// This hub's epoch.
        epoch: Epoch,
    },
}

impl RunError {
    /// The process exit status this error documents, if it has its own: [`EXIT_FENCED`] or
    /// [`EXIT_STALE_EPOCH`] (everything else is a plain failure).
    pub fn exit_code(&self) -> Option<u8> {
        match self {
            RunError::Fenced { .. } => Some(EXIT_FENCED),
            RunError::Store {
                source: OpenError::EpochFenced { .. },
                ..
            } => Some(EXIT_STALE_EPOCH),
            RunError::InitLock(e) => e.exit_code(),
            _ => None,
        }
    }
}

/// Runs the hub on `listeners` by `clock` until `shutdown` completes; it reloads the manifest
/// when the manifest file or the module keys directory changes. It first takes the data
/// directory's initialization lock (waiting, on this thread, up to
/// [`DEFAULT_INIT_LOCK_TIMEOUT`] while another hub initializes it).
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let init = InitLock::acquire(settings.data_dir(), DEFAULT_INIT_LOCK_TIMEOUT)
        .map_err(RunError::InitLock)?;
    let (_keep, never) = mpsc::channel(1);
    run_with_reloads(settings, listeners, clock, shutdown, never, init).await
}

/// [`run`], also reloading the manifest (and module keys) on every item of `reload_requests`
/// (the binary sends one per SIGHUP), given the data directory's initialization lock (held
/// since before the caller read the data directory's record). The lock is released once the
/// store is open: a later hub then initializes from what this one left on disk.
pub async fn run_with_reloads(
    settings: Settings,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send,
    reload_requests: mpsc::Receiver<()>,
    init: InitLock,
) -> Result<(), RunError> {
    let prepared = prepare(&settings, clock.as_ref())?;
    let tls_config = Arc::clone(&prepared.tls_config);
    let store = open_store(&settings, &prepared.deployment, Arc::clone(&clock))?;
    // Initialized and claimed: what a later hub reads is on disk, the epoch fences the rest.
    drop(init);
    let core = build_core(&settings, prepared, &store, clock, reload_requests)?;
    let heads = start_heads(&settings, listeners, &core, &store, tls_config)?;
    let fenced = tokio::select! {
        () = shutdown => false,
        () = fenced(&store, FENCE_CHECK_INTERVAL) => true,
    };
    if !fenced {
        return drain(core, heads, store).await;
    }
    let epoch = store.epoch();
    tracing::error!(
        epoch = epoch.get(),
        "store fenced: a newer hub opened the data directory (same or higher epoch); closing \
         every connection and exiting with status {EXIT_FENCED}"
    );
    drain(core, heads, store).await?;
    Err(RunError::Fenced { epoch })
}

/// Completes once `store` is fenced: at once when a write finds it (the store halts and says
/// so), else at the next check of the fence, every `every`.
async fn fenced(store: &Store, every: Duration) {
    let mut halted = store.watch_halted();
    // A halt before this subscription is no change to it: look at the flag once, now (a
    // halted store answers the check from its state, reading nothing).
    if *halted.borrow_and_update() && store.check_fence() {
        return;
    }
    // The store was just opened and checked: the first check is one interval away.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = halted.changed() => {
                if changed.is_err() {
                    // The store is gone: only the timer is left to wake us.
                    halted = watch::channel(false).1;
                }
            }
            _ = tick.tick() => {}
        }
        if store.check_fence() {
            return;
        }
    }
}

/// What is read and checked before the store opens.
struct Prepared {
    deployment: Deployment,
    given_keys: Vec<(router::ModuleId, identity::ModuleKey)>,
    identities: Arc<Identities>,
    tls_config: Arc<rustls::ServerConfig>,
    /// The certificate files given on the command line, if any (reloaded when they change).
    given_cert: Option<Arc<GivenCert>>,
}

/// Phase 1: the data directory, the manifest, the module keys and identities, TLS (the given
/// certificate files, checked at `clock`'s time, else the data directory's own CA).
fn prepare(settings: &Settings, clock: &dyn Clock) -> Result<Prepared, RunError> {
    let data_dir = settings.data_dir();
    std::fs::create_dir_all(data_dir).map_err(|source| RunError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let deployment = reload::load_deployment(settings).map_err(RunError::Manifest)?;
    let given_keys = identity::given_keys(settings).map_err(RunError::ModuleKeys)?;
    let identities = Arc::new(
        Identities::load_with_keys(
            data_dir,
            settings.device_id(),
            &settings.all_modules(&deployment.modules),
            &given_keys,
        )
        .map_err(RunError::Identities)?,
    );
    // The keys directory may declare modules `main` did not know of when it wrote the record.
    reload::record_modules(data_dir, &identities);
    let (tls_config, given_cert) = match settings.given_tls() {
        Some(files) => {
            let now = reload::tls::system_time(clock);
            let cert =
                GivenCert::load(files, settings.gateway_hostname(), now).map_err(RunError::Tls)?;
            (
                cert.server_config().map_err(RunError::Tls)?,
                Some(Arc::new(cert)),
            )
        }
        None => (tls::server_config(settings).map_err(RunError::Tls)?, None),
    };
    Ok(Prepared {
        deployment,
        given_keys,
        identities,
        tls_config,
        given_cert,
    })
}

/// Phase 2: opens (and recovers) the message store, timed by `clock`.
fn open_store(
    settings: &Settings,
    deployment: &Deployment,
    clock: Arc<dyn Clock>,
) -> Result<Store, RunError> {
    let mut store_options = StoreOptions {
        epoch: settings.epoch(),
        // A module that waits for each PUBACK (every SDK does) gets its append written and
        // synced on the connection's own thread when the writer is idle: no wake-up of the
        // writer thread, none back (issue 18: what the hub adds to a lone message).
        commit_on_caller: settings.commit_on_caller(),
        ..StoreOptions::default()
    };
    if let Some(max) = deployment.edge_hub.max_store_size_bytes {
        store_options.quota_bytes = max;
    }
    let store_dir = settings.data_dir().join(STORE_DIR);
    let epoch = store_options.epoch;
    let opened = tokio::task::block_in_place(|| {
        Store::open_with(&store_dir, store_options, Arc::new(OsFs), clock)
    });
    match opened {
        Ok(store) => {
            tracing::info!(
                epoch = epoch.get(),
                dir = %store_dir.display(),
                "store opened at epoch {epoch}"
            );
            Ok(store)
        }
        Err(source) => {
            if let OpenError::EpochFenced { requested, current } = &source {
                tracing::error!(
                    epoch = requested.get(),
                    store_epoch = current.get(),
                    "stale epoch: this hub's epoch {requested} is below epoch {current}, which \
                     already opened the store; a newer hub owns it, so this one does not open it \
                     (exit status {EXIT_STALE_EPOCH})"
                );
            }
            Err(RunError::Store {
                path: store_dir,
                source,
            })
        }
    }
}

/// Everything the heads share, and what stops with it.
struct Core {
    dispatcher: Arc<Dispatcher>,
    ctx: Arc<HeadContext>,
    /// The MQTT head's persistent sessions (the AMQP head has none).
    sessions: Arc<Sessions>,
    metrics: Arc<HubMetrics>,
    upstream: Option<Arc<MqttUpstream>>,
    reloader: Arc<Reloader>,
    watchers: Vec<RecommendedWatcher>,
    reload_task: JoinHandle<()>,
    /// Reloads the given certificate files (only with `--tls-cert`).
    tls_reload_task: Option<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    clock: Arc<dyn Clock>,
}

/// Phase 3: delivery, the router, sessions, metrics, the cloud connection, the heads' shared
/// context, and the reloader with its directory watches (set before anything is served: no
/// change is missed after "ready").
fn build_core(
    settings: &Settings,
    prepared: Prepared,
    store: &Store,
    clock: Arc<dyn Clock>,
    reload_requests: mpsc::Receiver<()>,
) -> Result<Core, RunError> {
    let Prepared {
        deployment,
        given_keys,
        identities,
        tls_config: _,
        given_cert,
    } = prepared;
    let Delivery {
        dispatcher,
        router,
        sessions,
        metrics,
        upstream,
        methods,
        twins,
    } = start_delivery(settings, &deployment, &identities, store, &clock)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(HeadContext {
        router,
        dispatcher: Arc::clone(&dispatcher),
        identities,
        connections: Registry::default(),
        metrics: Arc::clone(&metrics),
        shutdown: stop_rx.clone(),
        audiences: vec![
            settings.iothub_hostname().to_owned(),
            settings.gateway_hostname().to_owned(),
        ],
        routes_changed: watch::channel(0).0,
        clock: Arc::clone(&clock),
        methods,
        twins,
    });
    let reloader = Arc::new(Reloader::new(
        settings.clone(),
        Arc::clone(&ctx),
        deployment,
        given_keys,
    ));
    let (mut watchers, reload_task) = start_reloads(
        settings,
        Arc::clone(&reloader),
        reload_requests,
        stop_rx.clone(),
    )?;
    let tls_reload_task = match given_cert {
        Some(cert) => Some(start_tls_reloads(cert, &clock, stop_rx, &mut watchers)?),
        None => None,
    };
    Ok(Core {
        dispatcher,
        ctx,
        sessions,
        metrics,
        upstream,
        reloader,
        watchers,
        reload_task,
        tls_reload_task,
        stop_tx,
        clock,
    })
}

/// Delivery and what feeds it.
struct Delivery {
    dispatcher: Arc<Dispatcher>,
    router: Router,
    /// The MQTT head's persistent sessions.
    sessions: Arc<Sessions>,
    metrics: Arc<HubMetrics>,
    /// The cloud connection, if an IoT Hub is named.
    upstream: Option<Arc<MqttUpstream>>,
    /// Direct-method targets, shared by the heads and the cloud connection.
    methods: Arc<crate::methods::Methods>,
    /// Module twins, shared by the heads and the cloud connection.
    twins: Arc<crate::twin::Twins>,
}

/// Phase 3, first step: the dispatcher and its endpoint workers, the router over the
/// manifest's routes, the MQTT sessions, the metrics and the cloud connection.
fn start_delivery(
    settings: &Settings,
    deployment: &Deployment,
    identities: &Arc<Identities>,
    store: &Store,
    clock: &Arc<dyn Clock>,
) -> Result<Delivery, RunError> {
    let dispatcher = Arc::new(
        Dispatcher::start(
            store.clone(),
            Arc::clone(clock),
            DispatcherConfig {
                flow: settings.flow(),
                ..DispatcherConfig::default()
            },
        )
        .map_err(RunError::Delivery)?,
    );
    let router = Router::new(deployment.edge_hub.routes.clone(), &dispatcher);
    crate::head::context::declare_replicas(&router, &dispatcher, &deployment.replicas);
    let owner: Arc<dyn crate::owned_file::Ownership> = Arc::new(store.clone());
    let sessions = Arc::new(
        Sessions::load(settings.data_dir(), Arc::clone(&owner)).map_err(RunError::Sessions)?,
    );
    let metrics = Arc::new(HubMetrics::new(
        settings.iothub_hostname(),
        settings.device_id().as_str(),
    ));
    let methods = Arc::new(crate::methods::Methods::default());
    let twins = crate::twin::Twins::new(
        settings.data_dir(),
        Arc::clone(&owner),
        deployment.twins_desired.clone(),
    )
    .map_err(RunError::Twins)?;
    // Upstream on: IoT Hub is the source of desired properties once it gave them.
    let twins = Arc::new(match settings.upstream() {
        Some(_) => twins.with_cloud(),
        None => twins,
    });
    let upstream = upstream::start(
        settings,
        Arc::clone(identities),
        &dispatcher,
        Arc::clone(&metrics),
        Arc::clone(clock),
        Arc::clone(&methods),
        Arc::clone(&twins),
    )
    .map_err(RunError::Upstream)?;
    log_upstream(settings, deployment);
    Ok(Delivery {
        dispatcher,
        router,
        sessions,
        metrics,
        upstream,
        methods,
        twins,
    })
}

/// Watches the given certificate files (adding to `watchers`) and serves their reloads until
/// `stop` turns true.
fn start_tls_reloads(
    cert: Arc<GivenCert>,
    clock: &Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
    watchers: &mut Vec<RecommendedWatcher>,
) -> Result<JoinHandle<()>, RunError> {
    let (tx, rx) = mpsc::channel(16);
    watchers.extend(
        reload::tls::watch(&cert, &tx).map_err(|(dir, source)| RunError::Watch { dir, source })?,
    );
    // One look once the watches are set: a change between the first read and the
    // watch would otherwise wait for the next one (the same files: "unchanged").
    let _ = tx.try_send(());
    Ok(tokio::spawn(reload::tls::serve(
        cert,
        Arc::clone(clock),
        rx,
        stop,
    )))
}

/// Watches the manifest's directory and the keys directory (a ConfigMap or Secret swaps a
/// `..data` symlink in them) and serves reloads from those and from `reload_requests`, until
/// `stop` turns true.
fn start_reloads(
    settings: &Settings,
    reloader: Arc<Reloader>,
    reload_requests: mpsc::Receiver<()>,
    stop: watch::Receiver<bool>,
) -> Result<(Vec<RecommendedWatcher>, JoinHandle<()>), RunError> {
    let (file_tx, file_rx) = mpsc::channel(16);
    let mut watchers = Vec::new();
    let manifest_dir = match settings.manifest() {
        ManifestSource::File(path) => Some(watched_dir(path)),
        ManifestSource::BuiltIn => None,
    };
    for (dir, trigger) in [
        (manifest_dir, Trigger::ManifestChanged),
        (
            settings.module_keys_dir().map(Path::to_path_buf),
            Trigger::KeysChanged,
        ),
    ] {
        let Some(dir) = dir else { continue };
        let watcher = reload::watch_dir(&dir, trigger, file_tx.clone())
            .map_err(|source| RunError::Watch { dir, source })?;
        watchers.push(watcher);
    }
    drop(file_tx);
    let task = tokio::spawn(reload::serve(reloader, reload_requests, file_rx, stop));
    Ok((watchers, task))
}

/// Says where `$upstream` goes, or warns when routes send into it while it is off.
fn log_upstream(settings: &Settings, deployment: &Deployment) {
    match settings.upstream() {
        Some(up) => tracing::info!(
            iothub = settings.iothub_hostname(),
            host = %up.host,
            port = up.port,
            "upstream to IoT Hub over MQTT"
        ),
        None => {
            let upstream_routes: Vec<&str> = deployment
                .edge_hub
                .routes
                .routes()
                .iter()
                .filter(|r| *r.endpoint() == router::Endpoint::Upstream)
                .map(|r| r.id().as_str())
                .collect();
            if upstream_routes.is_empty() {
                tracing::info!("upstream off: no IoT Hub named (--iothub-hostname)");
            } else {
                tracing::warn!(
                    routes = ?upstream_routes,
                    "routes send INTO $upstream but upstream is off (no --iothub-hostname, or \
                     --upstream-protocol none): their messages wait on disk until their TTL"
                );
            }
        }
    }
}

/// The serving tasks, in the order they stop.
struct Heads {
    readiness: Readiness,
    /// HTTPS for direct methods (if any), MQTT, AMQP, plain MQTT (if any), then HTTP.
    tasks: Vec<JoinHandle<()>>,
}

/// Phase 4: serves the heads and HTTP on `listeners`, then turns ready and logs the bound
/// addresses ("edgehub ready").
fn start_heads(
    settings: &Settings,
    listeners: Listeners,
    core: &Core,
    store: &Store,
    tls_config: Arc<rustls::ServerConfig>,
) -> Result<Heads, RunError> {
    let bound = listeners.local_addrs().map_err(RunError::LocalAddr)?;
    let Listeners {
        mqtt,
        amqp,
        http: http_listener,
        plain_mqtt,
        methods,
    } = listeners;
    // One budget per protocol (the loopback plain MQTT listener shares MQTT's).
    let heads = ProtocolHeads {
        mqtt,
        amqp,
        plain_mqtt,
        methods,
        mqtt_budget: Budget::new("mqtt", settings.limits(), core.metrics.limits().clone()),
        amqp_budget: Budget::new("amqp", settings.limits(), core.metrics.limits().clone()),
        https_budget: Budget::new("https", settings.limits(), core.metrics.limits().clone()),
    };
    let readiness = Readiness::new();
    let http_task = spawn_http(http_listener, core, store, &readiness);
    let mut tasks = spawn_protocol_heads(heads, core, tls_config);
    tasks.push(http_task);
    readiness.set_ready();
    tracing::info!(
        mqtt = %bound.mqtt,
        amqp = %bound.amqp,
        http = %bound.http,
        plain_mqtt = ?bound.plain_mqtt,
        methods = ?bound.methods,
        ca = %tls::served_ca_path(settings).display(),
        routes = core.ctx.router.table().routes().len(),
        max_connections = settings.limits().max_connections,
        "edgehub ready"
    );
    Ok(Heads { readiness, tasks })
}

/// The listeners of the MQTT and AMQP heads and each protocol's connection budget.
struct ProtocolHeads {
    mqtt: TcpListener,
    amqp: TcpListener,
    plain_mqtt: Option<TcpListener>,
    /// HTTPS for direct methods, if any.
    methods: Option<TcpListener>,
    /// Shared by both MQTT listeners.
    mqtt_budget: Arc<Budget>,
    amqp_budget: Arc<Budget>,
    https_budget: Arc<Budget>,
}

/// Serves HTTP (metrics, health, readiness, the manifest) on `listener` until the hub stops.
fn spawn_http(
    listener: TcpListener,
    core: &Core,
    store: &Store,
    readiness: &Readiness,
) -> JoinHandle<()> {
    let router_metrics = {
        let dispatcher = Arc::clone(&core.dispatcher);
        Arc::new(move || dispatcher.metrics())
    };
    tokio::spawn(http::serve(
        listener,
        HttpState {
            metrics: Arc::clone(&core.metrics),
            store: store.clone(),
            router_metrics,
            readiness: readiness.clone(),
            manifest: core.reloader.status(),
            clock: Arc::clone(&core.clock),
        },
        wait_for_stop(core.ctx.shutdown.clone()),
    ))
}

/// Serves HTTPS for direct methods if asked for, MQTT and AMQP over TLS, and plain MQTT if
/// asked for, until the hub stops; the tasks in that order.
fn spawn_protocol_heads(
    heads: ProtocolHeads,
    core: &Core,
    tls_config: Arc<rustls::ServerConfig>,
) -> Vec<JoinHandle<()>> {
    let stop_rx = core.ctx.shutdown.clone();
    let mut tasks = Vec::with_capacity(5);
    if let Some(methods) = heads.methods {
        tasks.push(tokio::spawn(crate::https::serve_tls(
            methods,
            TlsAcceptor::from(Arc::clone(&tls_config)),
            Arc::clone(&core.ctx),
            heads.https_budget,
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(listener::serve_tls(
        heads.mqtt,
        TlsAcceptor::from(Arc::clone(&tls_config)),
        Arc::clone(&core.ctx),
        Arc::clone(&core.sessions),
        Arc::clone(&heads.mqtt_budget),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::amqp::listener::serve_tls(
        heads.amqp,
        TlsAcceptor::from(tls_config),
        Arc::clone(&core.ctx),
        heads.amqp_budget,
        stop_rx.clone(),
    )));
    if let Some(plain) = heads.plain_mqtt {
        tasks.push(tokio::spawn(listener::serve_plain(
            plain,
            Arc::clone(&core.ctx),
            Arc::clone(&core.sessions),
            heads.mqtt_budget,
            stop_rx,
        )));
    }
    tasks
}

/// Phase 5: stops serving, lets every connection acknowledge what is durable and close, stops
/// reloads and delivery, and closes the store last.
async fn drain(core: Core, heads: Heads, store: Store) -> Result<(), RunError> {
    tracing::info!("shutting down");
    heads.readiness.set_not_ready();
    let _ = core.stop_tx.send(true);
    for task in heads.tasks {
        let _ = task.await;
    }
    let Core {
        dispatcher,
        ctx,
        upstream,
        reloader,
        watchers,
        reload_task,
        tls_reload_task,
        ..
    } = core;
    let _ = reload_task.await;
    if let Some(task) = tls_reload_task {
        let _ = task.await;
    }
    drop(watchers);
    drop(reloader);
    drop(ctx);
    match Arc::try_unwrap(dispatcher) {
        Ok(dispatcher) => dispatcher.shutdown().await,
        Err(_) => tracing::warn!(
            "delivery still referenced at shutdown; its workers stop with the process"
        ),
    }
    // Its links end here; what they had in flight is resent from the store after a restart.
    drop(upstream);
    tokio::task::block_in_place(|| store.close()).map_err(RunError::Close)?;
    tracing::info!("stopped");
    Ok(())
}

/// The directory to watch for a manifest at `path` (its parent; `.` for a bare file name).
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, epoch: u64) -> Store {
        let opts = StoreOptions {
            epoch: Epoch::new(epoch),
            preallocate: false,
            reserve_bytes: 0,
            ..StoreOptions::default()
        };
        Store::open(dir, opts).expect("store")
    }

    fn queue() -> store::QueueName {
        store::QueueName::new("q").expect("queue name")
    }

    /// The write path: with a check far in the future, a write that finds the fence (the store
    /// halts) ends the wait at once. Only a failure bound is timed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_finds_the_fence_stops_the_hub_without_waiting_for_the_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open(dir.path(), 1);
        let watching = old.clone();
        let stopped =
            tokio::spawn(async move { fenced(&watching, Duration::from_secs(3600)).await });
        let _new = open(dir.path(), 2);
        let refused = old
            .append(&[queue()], bytes::Bytes::from_static(b"x"), None)
            .await;
        assert!(refused.is_err(), "a fenced store refuses the write");
        tokio::time::timeout(Duration::from_secs(30), stopped)
            .await
            .expect("the halt ends the wait, not the hour-long check")
            .expect("join");
        assert!(old.is_fenced());
    }

    /// A store that halted before the wait began (a write found the fence before the task
    /// that waits ran, as on a loaded machine): the wait ends at once, not at the next check.
    #[tokio::test(start_paused = true)]
    async fn a_store_fenced_before_the_wait_began_stops_the_hub_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open(dir.path(), 1);
        let _new = open(dir.path(), 2);
        let refused = old
            .append(&[queue()], bytes::Bytes::from_static(b"x"), None)
            .await;
        assert!(refused.is_err(), "a fenced store refuses the write");
        // Paused time: the hour-long check would only come after this bound.
        tokio::time::timeout(
            Duration::from_secs(30),
            fenced(&old, Duration::from_secs(3600)),
        )
        .await
        .expect("the halt that came first ends the wait, not the hour-long check");
        assert!(old.is_fenced());
    }

    /// The idle path: nobody writes; the periodic check finds the fence at the next tick.
    #[tokio::test(start_paused = true)]
    async fn an_idle_store_is_found_fenced_at_the_next_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open(dir.path(), 1);
        let start = tokio::time::Instant::now();
        let watching = old.clone();
        let stopped = tokio::spawn(async move { fenced(&watching, Duration::from_secs(5)).await });
        let _new = open(dir.path(), 2);
        // A failure bound in paused time (it passes at once if nothing else is pending).
        tokio::time::timeout(Duration::from_secs(3600), stopped)
            .await
            .expect("found by the periodic check")
            .expect("join");
        assert!(old.is_fenced());
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(5),
            "found by the check after one interval, not before: {waited:?}"
        );
    }
}
