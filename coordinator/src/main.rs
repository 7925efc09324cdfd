//! `fedq`: the coordinator service (`fedq serve`) and the study lead's and expert's command
//! line (templates, sites, query, certs). Parses arguments, starts tracing, installs the TLS
//! crypto provider, runs one command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fedq_coordinator::config::CoordinatorConfig;
use fedq_coordinator::experts::DocumentKind;
use fedq_coordinator::{CoordinatorError, certs, client, experts, quality, render};
use fedq_proto::wire;

#[derive(Parser)]
#[command(
    name = "fedq",
    version,
    about = "fedq: federated aggregate queries across an alliance of hospitals"
)]
struct Cli {
    /// Coordinator address (for every command but serve and certs).
    #[arg(
        long,
        global = true,
        env = "FEDQ_COORDINATOR",
        default_value = "https://localhost:7700"
    )]
    coordinator: String,
    /// CA certificate that signed the coordinator's certificate.
    #[arg(
        long,
        global = true,
        env = "FEDQ_CA_CERT",
        default_value = "certs/ca.pem"
    )]
    ca_cert: PathBuf,
    /// Your personal API token (issued by the coordinator's administrator).
    #[arg(
        long,
        global = true,
        env = "FEDQ_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    token: String,
    /// Log line format (for `serve`): text, or JSON lines for log collectors.
    #[arg(
        long,
        global = true,
        env = "FEDQ_LOG_FORMAT",
        default_value = "text",
        value_parser = ["text", "json"]
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator service until SIGTERM or Ctrl-C.
    Serve {
        #[arg(long, env = "FEDQ_COORDINATOR_CONFIG")]
        config: PathBuf,
    },
    /// The catalogue of approved templates.
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Every configured site and what it holds.
    Sites,
    /// Coordinator users (local, for administrators).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Expert key pairs (local).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check, sign or verify a template file.
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Sign or verify a study approval file (local).
    Study {
        #[command(subcommand)]
        command: DocumentCommand,
    },
    /// The approved studies: purpose, lead, ethics reference, validity, sites, templates.
    Studies,
    /// Run an approved template at every site and show the pooled result.
    Query {
        /// Template id (see `fedq templates list`).
        template: String,
        /// The approved study the query is made under (see `fedq studies`).
        #[arg(long, env = "FEDQ_STUDY")]
        study: String,
        /// A parameter value, `name=value`; repeat for each. Categories: `a,b,c`.
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// Per-site deadline in milliseconds (default: the coordinator's).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        deadline_ms: Option<u32>,
        /// Print the documented JSON result instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The data-quality report: every site's share of missing values, values outside the
    /// model's domain and implausible records, side by side, flagged against the alliance's
    /// standard. Runs the standing profile template under the standing study (as its study
    /// lead).
    Quality {
        /// Per-site deadline in milliseconds (default: the coordinator's).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        deadline_ms: Option<u32>,
        /// Print the documented JSON form instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The contribution ledger: per study and site, queries answered and records contributed
    /// to released cells (for crediting sites in publications).
    Ledger {
        /// Only this study.
        #[arg(long)]
        study: Option<String>,
        /// Print the documented JSON form.
        #[arg(long)]
        json: bool,
    },
    /// The signed audit-log heads a site's node published (administrators and experts); save
    /// the --json output for `fedq-node audit verify --heads FILE` at the site.
    AuditHeads {
        /// The site whose heads to list.
        #[arg(long)]
        site: String,
        /// Print the heads as JSON, the form `fedq-node audit verify --heads FILE` reads.
        #[arg(long)]
        json: bool,
        /// Administrators only: forget the site's pinned audit key after a deliberate key
        /// replacement (the next head it presents is pinned).
        #[arg(long)]
        clear_pin: bool,
        /// Administrators only: lift the hold on a site whose audit log went back or was
        /// rewritten, once it has been checked (it is then queried again).
        #[arg(long)]
        acknowledge: bool,
    },
    /// The alliance-wide transparency register: which studies used each site's data, for what,
    /// and how often (no query contents, no results). JSON on stdout, or a static HTML page.
    Register {
        /// Write a static HTML page here instead of printing JSON.
        #[arg(long)]
        html: Option<PathBuf>,
    },
    /// Create a development CA and certificates (for demos and tests, not production).
    Certs {
        /// Folder to write ca.pem, ca.key and IDENTITY.pem/.key into.
        #[arg(long)]
        out: PathBuf,
        /// A certificate identity (DNS name) to issue; repeat for each.
        #[arg(long = "identity", required = true)]
        identities: Vec<String>,
        #[arg(long, default_value = "fedq development CA")]
        ca_name: String,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a personal API token; prints it once and the `[[users]]` entry for the
    /// coordinator configuration (which holds only a slow hash of it).
    Token {
        /// The user's name; for study leads, exactly as their studies name them.
        #[arg(long)]
        name: String,
        /// study_lead, expert or administrator.
        #[arg(long)]
        role: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an expert key pair: NAME.key (secret, owner-only) and NAME.pub (to share).
    Generate {
        /// The expert's name as it appears next to their signatures.
        #[arg(long)]
        name: String,
        /// File name stem of the two files.
        #[arg(long)]
        file: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Lint a draft template against the data model and what every site holds (asks the
    /// coordinator for the sites' descriptions).
    Check { file: PathBuf },
    #[command(flatten)]
    Document(DocumentCommand),
}

#[derive(Subcommand)]
enum DocumentCommand {
    /// Check the file and sign it with your secret key (adds to FILE.signatures.toml).
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check the file and verify its signatures as a node trusting these public keys would.
    Verify {
        file: PathBuf,
        /// A trusted public key file; repeat for each.
        #[arg(long = "trusted", required = true)]
        trusted: Vec<PathBuf>,
        #[arg(long, default_value_t = 2)]
        quorum: usize,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// List approved templates.
    List,
    /// Show one template: purpose, parameters and their limits, strata.
    Show { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = cli.log_format == "json";
    fedq_proto::process::run_main("fedq", "info", json_logs, run(cli))
}

async fn run(cli: Cli) -> Result<(), CoordinatorError> {
    match cli.command {
        Command::Serve { config } => {
            let config = CoordinatorConfig::load(&config)?;
            let coordinator = fedq_coordinator::server::PreparedCoordinator::new(&config)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|err| {
                    CoordinatorError::Server(format!("cannot listen on {}: {err}", config.listen))
                })?;
            tracing::info!(address = %config.listen, "coordinator serving");
            let tunnel = match config.tunnel_listen {
                Some(address) => {
                    let tunnel = tokio::net::TcpListener::bind(address)
                        .await
                        .map_err(|err| {
                            CoordinatorError::Server(format!(
                                "cannot listen on {address} for outbound nodes: {err}"
                            ))
                        })?;
                    tracing::info!(%address, "accepting outbound nodes");
                    Some(tunnel)
                }
                None => None,
            };
            // Its own renewed certificate is picked up on SIGHUP, without a restart.
            coordinator.reload_on_hangup();
            if let Some(metrics) = config.metrics_listen {
                let listener = tokio::net::TcpListener::bind(metrics)
                    .await
                    .map_err(|err| {
                        CoordinatorError::Server(format!(
                            "cannot listen on {metrics} for metrics: {err}"
                        ))
                    })?;
                tracing::info!(address = %metrics, "metrics serving");
                coordinator.serve_metrics(listener);
            }
            coordinator
                .serve(listener, tunnel, fedq_proto::process::shutdown_signal())
                .await
        }
        Command::Certs {
            out,
            identities,
            ca_name,
        } => {
            let pki = certs::create_dev_pki(&out, &ca_name, &identities)?;
            println!("CA certificate: {}", pki.ca_cert.display());
            for issued in pki.identities {
                println!(
                    "{}: {} {}",
                    issued.identity,
                    issued.cert.display(),
                    issued.key.display()
                );
            }
            Ok(())
        }
        Command::Users {
            command: UsersCommand::Token { name, role },
        } => {
            if !["study_lead", "expert", "administrator"].contains(&role.as_str()) {
                return Err(CoordinatorError::Client(format!(
                    "role '{role}' is not one of study_lead, expert, administrator"
                )));
            }
            let (token, hash) = fedq_coordinator::users::new_token()?;
            println!(
                "token for {name} (give it to them privately; it is not stored anywhere):\n  {token}\n"
            );
            println!(
                "add to the coordinator configuration:\n[[users]]\nname = {}\nrole = \"{role}\"\ntoken_hash = \"{hash}\"",
                toml::Value::String(name.clone())
            );
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Generate { name, file, out },
        } => {
            let generated = experts::generate_key(&name, &file, &out)?;
            println!("key id {}", generated.key_id);
            println!(
                "secret key (keep it private): {}",
                generated.secret.display()
            );
            println!(
                "public key (give it to the hospitals): {}",
                generated.public.display()
            );
            Ok(())
        }
        Command::Template {
            command: TemplateCommand::Document(command),
        } => document_command(command, DocumentKind::Template),
        Command::Template {
            command: TemplateCommand::Check { file },
        } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let sites = client::reply(coordinator.list_sites(wire::ListSitesRequest {}).await)?;
            let lines = experts::check_template(&file, &sites.sites)?;
            println!(
                "{}: valid against data model {}",
                file.display(),
                fedq_proto::model::DataModel::builtin().key()
            );
            for line in lines {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Study { command } => document_command(command, DocumentKind::Study),
        Command::Templates { command } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            match command {
                TemplatesCommand::List => {
                    let list = client::reply(
                        coordinator
                            .list_templates(wire::ListTemplatesRequest {})
                            .await,
                    )?;
                    let id_width = list
                        .templates
                        .iter()
                        .filter_map(|template| template.reference.as_ref())
                        .map(|reference| reference.id.len())
                        .max()
                        .unwrap_or(0);
                    let kind_width = list
                        .templates
                        .iter()
                        .map(|template| template.statistic.len())
                        .max()
                        .unwrap_or(0);
                    for template in list.templates {
                        let reference = template.reference.unwrap_or_default();
                        println!(
                            "{:<id_width$}  v{:<3} {:<kind_width$}  {}",
                            reference.id, reference.version, template.statistic, template.title
                        );
                    }
                }
                TemplatesCommand::Show { id } => {
                    let detail = client::reply(
                        coordinator
                            .get_template(wire::GetTemplateRequest { id })
                            .await,
                    )?;
                    print!("{}", describe_template(&detail));
                }
            }
            Ok(())
        }
        Command::Sites => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let sites = client::reply(coordinator.list_sites(wire::ListSitesRequest {}).await)?;
            for site in sites.sites {
                match site.description {
                    Some(description) => {
                        println!(
                            "{:<10} {} fedq {} protocol {} model {} floor k={}",
                            site.site_id,
                            site.address,
                            description.software_version,
                            description.protocol_version,
                            description.data_model,
                            description.min_cell_count
                        );
                        for dataset in description.datasets {
                            println!(
                                "           dataset {} ({} columns, snapshot {})",
                                dataset.name,
                                dataset.columns.len(),
                                dataset.snapshot_version
                            );
                        }
                    }
                    None => println!("{:<10} {} {}", site.site_id, site.address, site.error),
                }
            }
            Ok(())
        }
        Command::Studies => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let studies =
                client::reply(coordinator.list_studies(wire::ListStudiesRequest {}).await)?;
            for study in studies.studies {
                print!("{}", render::study(&study));
            }
            Ok(())
        }
        Command::Quality { deadline_ms, json } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let standard = client::reply(
                coordinator
                    .quality_standard(wire::QualityStandardRequest {})
                    .await,
            )?;
            let request = wire::RunQueryRequest {
                study_id: standard.study_id.clone(),
                template_id: standard.template_id.clone(),
                parameters: Vec::new(),
                deadline_ms: deadline_ms.unwrap_or(0),
            };
            let result = run_watched(&mut coordinator, request).await?;
            if json {
                println!("{:#}", quality::json(&result, &standard));
            } else {
                print!("{}", quality::render(&result, &standard));
            }
            Ok(())
        }
        Command::Ledger { study, json } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let ledger = client::reply(
                coordinator
                    .ledger(wire::LedgerRequest {
                        study_id: study.unwrap_or_default(),
                    })
                    .await,
            )?;
            if json {
                println!("{:#}", render::ledger_json(&ledger.entries));
            } else {
                print!("{}", render::ledger(&ledger.entries));
            }
            Ok(())
        }
        Command::AuditHeads {
            site,
            json,
            clear_pin,
            acknowledge,
        } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let heads = client::reply(
                coordinator
                    .audit_heads(wire::AuditHeadsRequest {
                        site_id: site.clone(),
                        clear_pin,
                        acknowledge,
                    })
                    .await,
            )?;
            // Problems go to stderr, so `--json > file` stays a clean heads file.
            for event in &heads.events {
                eprintln!("fedq: {site}: {event}");
            }
            let published: Vec<fedq_proto::audit_head::PublishedHead> =
                heads.heads.iter().map(Into::into).collect();
            if json {
                let text = serde_json::to_string_pretty(&published)
                    .map_err(|err| CoordinatorError::Client(err.to_string()))?;
                println!("{text}");
            } else {
                println!(
                    "audit heads of {site} (pinned key {}):",
                    if heads.pinned_key_id.is_empty() {
                        "none yet"
                    } else {
                        heads.pinned_key_id.as_str()
                    }
                );
                println!(
                    "{:>10}  {:<71}  {:<24}  key",
                    "records", "hash", "signed at"
                );
                for head in published {
                    println!(
                        "{:>10}  {:<71}  {:<24}  {}",
                        head.count, head.hash, head.signed_at, head.key_id
                    );
                }
            }
            Ok(())
        }
        Command::Register { html } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let register = client::reply(
                coordinator
                    .transparency_register(wire::AllianceRegisterRequest {})
                    .await,
            )?;
            for problem in &register.unavailable {
                eprintln!("fedq: register incomplete: {problem}");
            }
            match html {
                Some(path) => {
                    let page = fedq_proto::register::to_html(
                        "Alliance transparency register",
                        &register.generated_at,
                        &register.sites,
                    );
                    std::fs::write(&path, page).map_err(|err| {
                        CoordinatorError::Client(format!("cannot write {}: {err}", path.display()))
                    })?;
                    println!("wrote {}", path.display());
                }
                None => println!(
                    "{:#}",
                    fedq_proto::register::to_json(&register.generated_at, &register.sites)
                ),
            }
            Ok(())
        }
        Command::Query {
            template,
            study,
            params,
            deadline_ms,
            json,
        } => {
            let mut coordinator =
                client::connect(&cli.coordinator, &cli.ca_cert, &cli.token).await?;
            let detail = client::reply(
                coordinator
                    .get_template(wire::GetTemplateRequest {
                        id: template.clone(),
                    })
                    .await,
            )?;
            let parameters = client::parse_parameters(&params, &detail.parameters)?;
            let request = wire::RunQueryRequest {
                study_id: study,
                template_id: template,
                parameters,
                deadline_ms: deadline_ms.unwrap_or(0),
            };
            let result = run_watched(&mut coordinator, request).await?;
            if json {
                let text = serde_json::to_string_pretty(&render::json(&result))
                    .map_err(|err| CoordinatorError::Client(err.to_string()))?;
                println!("{text}");
            } else {
                let title = detail
                    .summary
                    .map(|summary| summary.title)
                    .unwrap_or_default();
                print!("{}", render::table(&title, &result));
            }
            Ok(())
        }
    }
}

/// Runs a query, printing each site's progress to stderr while a person is watching a
/// terminal; the pooled summary follows on stdout either way.
async fn run_watched(
    coordinator: &mut client::Connection,
    request: wire::RunQueryRequest,
) -> Result<wire::PooledResult, CoordinatorError> {
    let watching = std::io::stderr().is_terminal();
    client::run_query(coordinator, request, |site| {
        if watching {
            eprintln!("{}", render::site_line(site));
        }
    })
    .await
}

fn document_command(command: DocumentCommand, kind: DocumentKind) -> Result<(), CoordinatorError> {
    match command {
        DocumentCommand::Sign { file, key } => {
            let signatures = experts::sign_file(&file, kind, &key)?;
            println!("signed; signatures are in {}", signatures.display());
        }
        DocumentCommand::Verify {
            file,
            trusted,
            quorum,
        } => {
            let signers = experts::verify_file(&file, kind, &trusted, quorum)?;
            println!(
                "valid: signed by {} trusted key(s): {}",
                signers.len(),
                signers.join(", ")
            );
        }
    }
    Ok(())
}

fn describe_template(detail: &wire::TemplateDetail) -> String {
    let summary = detail.summary.clone().unwrap_or_default();
    let reference = summary.reference.unwrap_or_default();
    let mut text = format!(
        "{} (v{}, {})\n{}\n\ndataset: {}\nstatistic: {}\nstrata: {}\nminimum cell count: {}\nsigned by: {}\n\nparameters:\n",
        reference.id,
        reference.version,
        reference.content_hash,
        detail.description,
        summary.dataset,
        summary.statistic,
        if detail.strata.is_empty() {
            "none".to_string()
        } else {
            detail.strata.join(", ")
        },
        if detail.min_cell_count == 0 {
            "the site's floor".to_string()
        } else {
            detail.min_cell_count.to_string()
        },
        if summary.signer_key_ids.is_empty() {
            "(no signatures)".to_string()
        } else {
            summary.signer_key_ids.join(", ")
        },
    );
    if detail.parameters.is_empty() {
        text.push_str("  none\n");
    }
    for parameter in &detail.parameters {
        let default = if parameter.default_value.is_empty() {
            "required".to_string()
        } else {
            format!("default {}", parameter.default_value)
        };
        text.push_str(&format!(
            "  {:<12} {} ({default}) — {}\n",
            parameter.name, parameter.limits, parameter.description
        ));
    }
    text
}
