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
    /// Check everything this node needs before going live; prints one line per finding and
    /// exits 1 if anything fails.
    Check {
        /// Node configuration file (TOML).
        #[arg(long, env = "FEDQ_NODE_CONFIG")]
        config: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load this site's data and serve queries until SIGTERM or Ctrl-C.
    Serve {
        /// Node configuration file (TOML).
        #[arg(long, env = "FEDQ_NODE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    match cli.command {
        Command::Serve { config } => {
            fedq_proto::process::run_main("fedq-node", "info", json_logs, serve(config))
        }
        Command::Check { config, json } => check(&config, json),
    }
}

fn check(config: &std::path::Path, json: bool) -> ExitCode {
    let findings = fedq_node::check::run(config);
    if json {
        match serde_json::to_string_pretty(&findings) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("fedq-node: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", fedq_node::check::render(&findings));
    }
    if findings
        .iter()
        .any(|finding| finding.level == fedq_node::check::Level::Fail)
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
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
