//! `edgehub-controller`: the EdgeDeployment controller.
//!
//! - `run`: the controller (leader election over a Lease, then reconcile every EdgeDeployment).
//! - `crd`: prints the CustomResourceDefinition.
//! - `render FILE`: prints every object reconcile would apply for the EdgeDeployment in FILE,
//!   offline (see [`k8s::render`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;

use k8s::desired::{ControllerOptions, RenderError};
use k8s::render::RenderCliError;

/// The EdgeDeployment controller.
#[derive(Debug, Parser)]
#[command(name = "edgehub-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: elect a leader over a Lease, then reconcile EdgeDeployments.
    Run(RunArgs),
    /// Print the EdgeDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print every object reconcile would apply for an EdgeDeployment, as multi-document YAML,
    /// offline; generated Secret data are shown as placeholders.
    Render(RenderArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The hub image when an EdgeDeployment's spec.hub.image is not set.
    #[arg(long, env = "EDGEHUB_HUB_IMAGE", value_name = "IMAGE", default_value_t = k8s::desired::default_hub_image())]
    hub_image: String,
    /// Watch only this namespace [default: all namespaces].
    #[arg(long, env = "EDGEHUB_NAMESPACE", value_name = "NS")]
    namespace: Option<String>,
    /// The Lease the replicas elect a leader over.
    #[arg(
        long,
        env = "EDGEHUB_LEASE_NAME",
        value_name = "NAME",
        default_value = "edgehub-controller"
    )]
    lease_name: String,
    /// The Lease's namespace [default: the controller's own, from POD_NAMESPACE (the chart sets
    /// it), else `default`]. The chart's RBAC grants Leases in the release namespace only.
    #[arg(long, env = "EDGEHUB_LEASE_NAMESPACE", value_name = "NS")]
    lease_namespace: Option<String>,
    /// How long a leader's Lease lasts without renewal, in seconds (renewed every third).
    #[arg(
        long,
        env = "EDGEHUB_LEASE_DURATION_SECS",
        value_name = "SECS",
        default_value_t = 15
    )]
    lease_duration_secs: u64,
    /// This replica's identity in the Lease [default: the pod name from POD_NAME, else the host name].
    #[arg(long, env = "EDGEHUB_IDENTITY", value_name = "ID")]
    identity: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "EDGEHUB_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:9601"
    )]
    metrics_addr: std::net::SocketAddr,
}

#[derive(Debug, clap::Args)]
struct RenderArgs {
    /// The EdgeDeployment, YAML or JSON.
    file: PathBuf,
    /// The manifest's JSON, for an EdgeDeployment whose manifest is a configMapKeyRef.
    #[arg(long, env = "EDGEHUB_MANIFEST_FILE", value_name = "FILE")]
    manifest_file: Option<PathBuf>,
    /// The namespace, when the EdgeDeployment names none.
    #[arg(
        long,
        env = "EDGEHUB_NAMESPACE",
        value_name = "NS",
        default_value = "default"
    )]
    namespace: String,
    /// The hub image when spec.hub.image is not set.
    #[arg(long, env = "EDGEHUB_HUB_IMAGE", value_name = "IMAGE", default_value_t = k8s::desired::default_hub_image())]
    hub_image: String,
    /// Show real secret material instead of placeholders: a new CA, server certificate and
    /// module keys, made as reconcile makes them. For trials and tests (e.g. `podman kube
    /// play`): the output holds private keys.
    #[arg(long, env = "EDGEHUB_GENERATE_SECRETS")]
    generate_secrets: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let crd = k8s::types::EdgeDeployment::crd();
            match serde_yaml::to_string(&crd) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("EDGEHUB_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "controller stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Render(args) => match render(&args) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(RenderCliError::Render(RenderError::Manifest(problems))) => {
                for m in &problems.messages {
                    eprintln!("error: {}: {m}", args.file.display());
                }
                eprintln!(
                    "{}: {} problem(s) found",
                    args.file.display(),
                    problems.messages.len()
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn render(args: &RenderArgs) -> Result<String, RenderCliError> {
    let ed = k8s::render::read_edge_deployment(&args.file, &args.namespace)?;
    let manifest = k8s::render::manifest_of(&ed, args.manifest_file.as_deref())?;
    let opts = ControllerOptions {
        hub_image: args.hub_image.clone(),
    };
    let secrets = if args.generate_secrets {
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        k8s::render::Secrets::Generate { now_secs }
    } else {
        k8s::render::Secrets::Placeholders
    };
    k8s::render::render_with(&ed, &manifest, &opts, secrets)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use futures::StreamExt as _;
    use k8s::reconcile::{error_policy, reconcile, Context};
    use k8s::types::EdgeDeployment;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use kube::runtime::{watcher, Controller};
    use kube::Api;
    use std::sync::Arc;

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        ControllerOptions {
            hub_image: args.hub_image.clone(),
        },
    ));

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
    tokio::spawn(k8s::http::serve(listener, ctx.metrics.clone()));

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .context("no --identity, POD_NAME or HOSTNAME")?;
    let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(false);
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_owned());
    let leases = Api::namespaced(client.clone(), &lease_namespace);
    tokio::spawn(k8s::lease::run(
        leases,
        args.lease_name.clone(),
        k8s::lease::LeaseState {
            identity: identity.clone(),
            duration: std::time::Duration::from_secs(args.lease_duration_secs.max(3)),
        },
        leader_tx,
    ));
    tracing::info!(identity = %identity, lease = %args.lease_name, namespace = %lease_namespace, "waiting to lead");
    leader_rx
        .wait_for(|lead| *lead)
        .await
        .context("the leader election stopped")?;
    ctx.metrics
        .leader
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("leading: reconciling EdgeDeployments");

    let (eds, sts): (Api<EdgeDeployment>, Api<StatefulSet>) = match &args.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        k8s::names::LABEL_MANAGED_BY,
        k8s::names::MANAGER
    ));
    // A lost node re-runs the EdgeDeployments whose node-loss policy may act on it (the
    // out-of-service taint at once; NotReady through the timer's requeue). A healthy node's
    // changes map to nothing.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let controller = Controller::new(eds, watcher::Config::default());
    let store = controller.store();
    let controller = controller
        .owns(sts, owned)
        .watches(nodes, watcher::Config::default(), move |node| {
            let known = store.state();
            k8s::failover::eds_to_recheck(&node, known.iter().map(|ed| &**ed))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(object = %object, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile"),
            }
        });
    tokio::select! {
        () = controller => Ok(()),
        lost = leader_rx.wait_for(|lead| !*lead) => {
            ctx.metrics.leader.store(false, std::sync::atomic::Ordering::Relaxed);
            // Another replica may lead now: stop at once; Kubernetes restarts us as a follower.
            let _ = lost;
            anyhow::bail!("lost the leader Lease")
        }
    }
}
