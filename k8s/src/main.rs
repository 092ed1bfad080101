//! `edgehub-controller`: the EdgeDeployment controller.

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let crd = k8s::types::EdgeDeployment::crd();
            print!("{}", serde_yaml::to_string(&crd)?);
        }
    }
    Ok(())
}
