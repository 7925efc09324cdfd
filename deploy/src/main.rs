//! `fedq-alliance`: runs a local alliance on this machine — the demo (the project's main job)
//! or the benchmark — or prepares one for containers. The default run target of the workspace: `cargo run --release -- demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedq-alliance",
    version,
    about = "Run a local fedq alliance: demo or benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start three hospital nodes and a coordinator on loopback, ask showcase questions, print
    /// the pooled tables, stop.
    Demo {
        /// Folder for certificates, data and configs (recreated).
        #[arg(long, default_value = "demo-output")]
        out: PathBuf,
        /// Site sizes relative to 200,000 / 50,000 / 2,000 admissions.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
    /// Start the demo alliance and keep it running (until Ctrl-C) for the `fedq` command line.
    Up {
        #[arg(long, default_value = "demo-output")]
        out: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Loopback port of the coordinator.
        #[arg(long, default_value_t = 7700)]
        port: u16,
    },
    /// Write the files of a three-site alliance for containers (deploy/container/compose.yaml):
    /// certificates, signed templates and studies, sample data, node and coordinator
    /// configurations naming the compose services. Leaves an already prepared folder as it is.
    Prepare {
        #[arg(long, default_value = "alliance")]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05)]
        scale: f64,
        /// Folder of approved templates to sign (default: the ones shipped with fedq).
        #[arg(long)]
        templates: Option<PathBuf>,
    },
    /// Time a three-strata count at one node end to end against the bare polars plan.
    Bench {
        #[arg(long, default_value = "bench-output")]
        out: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout();
    fedq_proto::process::run_main("fedq-alliance", "warn", false, async move {
        match cli.command {
            Command::Demo { out, scale } => fedq_deploy::demo::run(&out, scale, &mut stdout).await,
            Command::Up { out, scale, port } => {
                fedq_deploy::demo::up(&out, scale, port, &mut stdout).await
            }
            Command::Prepare {
                out,
                scale,
                templates,
            } => {
                let templates = templates.unwrap_or_else(fedq_deploy::alliance::bundled_templates);
                fedq_deploy::prepare::prepare(&out, scale, &templates, &mut stdout).await
            }
            Command::Bench {
                out,
                rows,
                iterations,
            } => fedq_deploy::bench::run(&out, rows, iterations, &mut stdout).await,
        }
        .map_err(|err| format!("{err:#}"))
    })
}
