//! `fedq-node`: the hospital node's command line. Parses arguments, loads and validates the
//! configuration and data, starts tracing, installs the TLS crypto provider, binds and serves.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use fedq_node::config::NodeConfig;
use fedq_node::query::QueryEngine;

#[derive(Parser)]
#[command(
    name = "fedq-node",
    version,
    about = "fedq hospital node: answers approved aggregate queries from this site's data"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "FEDQ_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load this site's data and serve queries until SIGTERM or Ctrl-C.
    Serve {
        /// Node configuration file (TOML).
        #[arg(long, env = "FEDQ_NODE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve { config } = cli.command;
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    fedq_proto::process::run_main("fedq-node", "info", json_logs, serve(config))
}

async fn serve(config_path: PathBuf) -> Result<(), String> {
    let config = NodeConfig::load(&config_path).map_err(|err| err.to_string())?;
    let (engine, warnings) = QueryEngine::load(&config).map_err(|err| err.to_string())?;
    for warning in warnings {
        tracing::warn!(%warning, "data quality");
    }
    for snapshot in engine.snapshots() {
        tracing::info!(dataset = %snapshot.dataset, rows = snapshot.rows(), version = %snapshot.version, "dataset loaded");
    }
    let node = fedq_node::server::PreparedNode::new(Arc::new(engine), &config.tls)
        .map_err(|err| err.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.listen))?;
    tracing::info!(site = %config.site_id, address = %config.listen, floor = config.policy.min_cell_count, "node serving");
    node.serve(listener, fedq_proto::process::shutdown_signal())
        .await
        .map_err(|err| err.to_string())?;
    tracing::info!("node stopped");
    Ok(())
}
