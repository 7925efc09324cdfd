//! The `fedq-node` command line: `serve` (load and validate the configuration and data, start
//! tracing, install the TLS crypto provider, bind and serve), `check` and `audit`. The binary's
//! `main` only calls [`main`], so test harnesses can run the very same program as a process.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::audit::commands::{self, Location};
use crate::audit::record::Outcome;
use crate::config::NodeConfig;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Read and check this node's audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Load this site's data and serve queries until SIGTERM or Ctrl-C.
    Serve {
        /// Node configuration file (TOML).
        #[arg(long, env = "FEDQ_NODE_CONFIG")]
        config: PathBuf,
    },
}

/// Where the audit files are: the node's configuration, or a state directory (for example a
/// copy handed to an auditor).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct AuditSource {
    /// Node configuration file (TOML); its state_dir holds the log.
    #[arg(long, env = "FEDQ_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// The node's state directory (holds audit/ and audit-key.toml).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain record by record and, with --heads, against the heads the node
    /// published to the coordinator. Exits 1 and names the first bad record on failure.
    Verify {
        #[command(flatten)]
        source: AuditSource,
        /// Heads exported from the coordinator (`fedq audit-heads --site SITE --json`).
        #[arg(long)]
        heads: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print audit records, optionally filtered.
    Show {
        #[command(flatten)]
        source: AuditSource,
        /// Only queries under this study.
        #[arg(long)]
        study: Option<String>,
        /// From this day (YYYY-MM-DD) or time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Up to this day (inclusive) or time.
        #[arg(long)]
        until: Option<String>,
        /// Only released or only refused queries.
        #[arg(long, value_enum)]
        outcome: Option<OutcomeArg>,
        /// Print the records as JSON (for export).
        #[arg(long)]
        json: bool,
    },
    /// Print the node's audit public key (the key its signed heads carry).
    Key {
        #[command(flatten)]
        source: AuditSource,
    },
    /// The public transparency register from the log: JSON on stdout, or an HTML page.
    Register {
        #[command(flatten)]
        source: AuditSource,
        /// Write a static HTML page here instead of printing JSON.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutcomeArg {
    Released,
    Refused,
}

/// The audit files and site id for an audit command.
fn audit_location(source: &AuditSource) -> Result<(Location, String), String> {
    if let Some(config) = &source.config {
        let config = NodeConfig::load(config).map_err(|err| err.to_string())?;
        return Ok((Location::of_state_dir(&config.state_dir), config.site_id));
    }
    let location = Location::of_state_dir(&source.state_dir.clone().unwrap_or_default());
    // The audit key carries the site's name.
    let site_id = location.site_id().unwrap_or_else(|| "this site".into());
    Ok((location, site_id))
}

fn audit(command: AuditCommand) -> ExitCode {
    let source = match &command {
        AuditCommand::Verify { source, .. }
        | AuditCommand::Show { source, .. }
        | AuditCommand::Key { source }
        | AuditCommand::Register { source, .. } => source,
    };
    let (location, site_id) = match audit_location(source) {
        Ok(found) => found,
        Err(err) => {
            eprintln!("fedq-node: {err}");
            return ExitCode::FAILURE;
        }
    };
    let output = match &command {
        AuditCommand::Verify { heads, json, .. } => {
            commands::verify(&location, heads.as_deref(), *json)
        }
        AuditCommand::Show {
            study,
            since,
            until,
            outcome,
            json,
            ..
        } => {
            let bounds = since
                .as_deref()
                .map(|text| commands::parse_time(text, false))
                .transpose()
                .and_then(|since| {
                    let until = until
                        .as_deref()
                        .map(|text| commands::parse_time(text, true))
                        .transpose()?;
                    Ok((since, until))
                });
            match bounds {
                Ok((since, until)) => {
                    let filter = commands::Filter {
                        study: study.clone(),
                        since,
                        until,
                        outcome: outcome.map(|outcome| match outcome {
                            OutcomeArg::Released => Outcome::Released,
                            OutcomeArg::Refused => Outcome::Refused,
                        }),
                    };
                    commands::show(&location, &filter, *json)
                }
                Err(err) => {
                    eprintln!("fedq-node: {err}");
                    return ExitCode::FAILURE;
                }
            }
        }
        AuditCommand::Key { .. } => commands::key(&location),
        AuditCommand::Register { html, .. } => {
            commands::register(&location, &site_id, html.as_deref())
        }
    };
    print!("{}", output.text);
    if output.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the command line with the process's arguments.
pub fn main() -> ExitCode {
    ignore_file_size_signal();
    let cli = Cli::parse();
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    match cli.command {
        Command::Serve { config } => {
            fedq_proto::process::run_main("fedq-node", "info", json_logs, serve(config))
        }
        Command::Check { config, json } => check(&config, json),
        Command::Audit { command } => audit(command),
    }
}

fn check(config: &std::path::Path, json: bool) -> ExitCode {
    let findings = crate::check::run(config);
    if json {
        match serde_json::to_string_pretty(&findings) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("fedq-node: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", crate::check::render(&findings));
    }
    if findings
        .iter()
        .any(|finding| finding.level == crate::check::Level::Fail)
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A file-size limit (RLIMIT_FSIZE) must make an audit write fail — and the query be refused —
/// rather than kill the node with SIGXFSZ.
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to "ignore" installs no handler code and is
    // done before any other thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

async fn serve(config_path: PathBuf) -> Result<(), String> {
    let config = NodeConfig::load(&config_path).map_err(|err| err.to_string())?;
    let (node, warnings) =
        crate::server::PreparedNode::load(&config).map_err(|err| err.to_string())?;
    for warning in warnings {
        tracing::warn!(%warning, "data quality");
    }
    for snapshot in node.engine().snapshots().values() {
        tracing::info!(dataset = %snapshot.dataset, rows = snapshot.rows(), version = %snapshot.version, "dataset loaded");
    }
    let privacy = &config.policy.privacy;
    let dp = privacy.differential_privacy.map(|dp| {
        format!(
            "epsilon {} per query, {} per study, {} for the site",
            dp.epsilon_per_query, dp.study_epsilon, dp.node_epsilon
        )
    });
    tracing::info!(
        floor = config.policy.min_cell_count,
        overlap_control = privacy.overlap_control,
        rounding_base = privacy.rounding_base,
        dominance_percent = privacy.dominance_percent,
        differential_privacy = dp.as_deref().unwrap_or("off"),
        "disclosure policy"
    );
    if let Some((sets, derived, cut, bytes)) = node.engine().overlap_memory() {
        tracing::info!(
            sets,
            derived,
            cut,
            mib = bytes.div_ceil(1024 * 1024),
            limit_mib = privacy.overlap_memory_bytes / (1024 * 1024),
            "overlap memory"
        );
    }
    let audit_key = node.engine().audit().key_id();
    // Renewed certificates and new data files are picked up on SIGHUP, or when they change,
    // without a restart.
    node.reload_on_change(config.reload_poll);
    if let Some(metrics) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(metrics)
            .await
            .map_err(|err| format!("cannot listen on {metrics} for metrics: {err}"))?;
        tracing::info!(address = %metrics, "metrics serving");
        node.serve_metrics(listener);
    }
    let listener = match config.listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
            let address = listener
                .local_addr()
                .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
            tracing::info!(site = %config.site_id, %address, floor = config.policy.min_cell_count, %audit_key, "node serving");
            Some(listener)
        }
        None => None,
    };
    if let Some(outbound) = &config.outbound {
        tracing::info!(site = %config.site_id, coordinator = %outbound.coordinator, floor = config.policy.min_cell_count, %audit_key, "node serving over outbound connections");
    }
    node.serve(listener, fedq_proto::process::shutdown_signal())
        .await
        .map_err(|err| err.to_string())?;
    tracing::info!("node stopped");
    Ok(())
}
