//! `edgehub-controller`: the EdgeDeployment controller.
//!
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
    /// Print the EdgeDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Print every object reconcile would apply for an EdgeDeployment, as multi-document YAML,
    /// offline; generated Secret data are shown as placeholders.
    Render(RenderArgs),
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
    k8s::render::render(&ed, &manifest, &opts)
}
