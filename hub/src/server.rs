//! The composition root: builds the store, router, dispatcher, identities, TLS, the MQTT head and
//! the HTTP surface from typed settings, serves until `shutdown`, then stops in order.
//!
//! Guarantees: nothing listens before the store is recovered and the manifest is valid (a broken
//! manifest or store is an error before any client can connect); `/readyz` turns ready only once
//! every listener is bound; on shutdown the listeners stop, every connection first acknowledges
//! what is already durable and then closes, the endpoint workers stop, and the store is closed
//! last, so nothing acknowledged is left anywhere but on disk.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use router::{Dispatcher, DispatcherConfig, Router};
use store::{Store, StoreOptions, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::head::context::HeadContext;
use crate::head::registry::Registry;
use crate::http::{self, HttpState, Readiness};
use crate::identity::{self, Identities};
use crate::limits::Budget;
use crate::metrics::HubMetrics;
use crate::mqtt::listener;
use crate::mqtt::sessions::Sessions;
use crate::reload::{self, Reloader, Trigger};
use crate::settings::{ManifestSource, Settings};
use crate::tls;
use crate::upstream;

/// Directory of the message store inside the data directory.
pub const STORE_DIR: &str = "store";

/// Runs the hub until `shutdown` completes; it reloads the manifest when the manifest file or
/// the module keys directory changes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (_keep, never) = mpsc::channel(1);
    run_with_reloads(settings, shutdown, never).await
}

/// [`run`], also reloading the manifest (and module keys) on every item of `reload_requests`
/// (the binary sends one per SIGHUP).
pub async fn run_with_reloads(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    reload_requests: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let data_dir = settings.data_dir().to_owned();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let deployment = reload::load_deployment(&settings).context("cannot load the manifest")?;
    let given_keys = identity::given_keys(&settings).context("cannot load the module keys")?;
    let identities = Arc::new(
        Identities::load_with_keys(
            settings.data_dir(),
            settings.device_id(),
            &settings.all_modules(&deployment.modules),
            &given_keys,
        )
        .context("cannot load the module identities")?,
    );
    // The keys directory may declare modules `main` did not know of when it wrote the record.
    reload::record_modules(&data_dir, &identities);
    let tls_config = tls::server_config(&settings).context("cannot set up TLS")?;

    let mut store_options = StoreOptions {
        epoch: settings.epoch(),
        ..StoreOptions::default()
    };
    if let Some(max) = deployment.edge_hub.max_store_size_bytes {
        store_options.quota_bytes = max;
    }
    let store_dir = data_dir.join(STORE_DIR);
    let store = tokio::task::block_in_place(|| Store::open(&store_dir, store_options))
        .with_context(|| format!("cannot open the message store in {}", store_dir.display()))?;
    let dispatcher = Arc::new(
        Dispatcher::start(
            store.clone(),
            Arc::new(SystemClock),
            DispatcherConfig::default(),
        )
        .context("cannot start delivery")?,
    );
    let router = Router::new(deployment.edge_hub.routes.clone(), &dispatcher);
    let sessions = Arc::new(Sessions::load(&data_dir).context("cannot load the MQTT sessions")?);
    let metrics = Arc::new(HubMetrics::new(
        settings.iothub_hostname(),
        settings.device_id().as_str(),
    ));
    let upstream = upstream::start(
        &settings,
        Arc::clone(&identities),
        &dispatcher,
        Arc::clone(&metrics),
    )
    .context("cannot set up the upstream link")?;
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
    });
    let reloader = Arc::new(Reloader::new(
        settings.clone(),
        Arc::clone(&ctx),
        deployment.clone(),
        given_keys,
    ));
    // Watches the manifest's directory and the keys directory (a ConfigMap or Secret swaps a
    // `..data` symlink in them), before anything listens: no change is missed after "ready".
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
            .with_context(|| format!("cannot watch {} for changes", dir.display()))?;
        watchers.push(watcher);
    }
    drop(file_tx);
    let reload_task = tokio::spawn(reload::serve(
        Arc::clone(&reloader),
        reload_requests,
        file_rx,
        stop_rx.clone(),
    ));

    let mqtt = TcpListener::bind(settings.mqtt_addr())
        .await
        .with_context(|| format!("cannot listen for MQTT on {}", settings.mqtt_addr()))?;
    let amqp = TcpListener::bind(settings.amqp_addr())
        .await
        .with_context(|| format!("cannot listen for AMQP on {}", settings.amqp_addr()))?;
    let http_listener = TcpListener::bind(settings.metrics_addr())
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.metrics_addr()))?;
    let plain = match settings.plain_mqtt_addr() {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for plain MQTT on {addr}"))?,
        ),
        None => None,
    };

    // One budget per protocol (the loopback plain MQTT listener shares MQTT's).
    let mqtt_budget = Budget::new("mqtt", settings.limits(), metrics.limits().clone());
    let amqp_budget = Budget::new("amqp", settings.limits(), metrics.limits().clone());
    let readiness = Readiness::new();
    let router_metrics = {
        let dispatcher = Arc::clone(&dispatcher);
        Arc::new(move || dispatcher.metrics())
    };
    let http_task = tokio::spawn(http::serve(
        http_listener,
        HttpState {
            metrics,
            store: store.clone(),
            router_metrics,
            readiness: readiness.clone(),
            manifest: reloader.status(),
        },
        wait_for_stop(stop_rx.clone()),
    ));
    let amqp_task = tokio::spawn(crate::amqp::listener::serve_tls(
        amqp,
        TlsAcceptor::from(Arc::clone(&tls_config)),
        Arc::clone(&ctx),
        amqp_budget,
        stop_rx.clone(),
    ));
    let mqtt_task = tokio::spawn(listener::serve_tls(
        mqtt,
        TlsAcceptor::from(tls_config),
        Arc::clone(&ctx),
        Arc::clone(&sessions),
        Arc::clone(&mqtt_budget),
        stop_rx.clone(),
    ));
    let plain_task = plain.map(|l| {
        tokio::spawn(listener::serve_plain(
            l,
            Arc::clone(&ctx),
            Arc::clone(&sessions),
            mqtt_budget,
            stop_rx.clone(),
        ))
    });
    readiness.set_ready();
    tracing::info!(
        mqtt = %settings.mqtt_addr(),
        amqp = %settings.amqp_addr(),
        http = %settings.metrics_addr(),
        ca = %tls::ca_path(&data_dir).display(),
        routes = ctx.router.table().routes().len(),
        max_connections = settings.limits().max_connections,
        "edgehub ready"
    );

    shutdown.await;
    tracing::info!("shutting down");
    readiness.set_not_ready();
    let _ = stop_tx.send(true);
    let _ = mqtt_task.await;
    let _ = amqp_task.await;
    if let Some(t) = plain_task {
        let _ = t.await;
    }
    let _ = http_task.await;
    let _ = reload_task.await;
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
    tokio::task::block_in_place(|| store.close()).context("closing the store")?;
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
