//! Coordinator configuration: raw TOML plus `FEDQ_COORDINATOR__*` environment overrides with
//! unknown keys rejected, then [`RawCoordinatorConfig::validate`] into [`CoordinatorConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedq_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::CoordinatorError;
use crate::users::UserEntry;

/// Prefix of environment overrides, e.g. `FEDQ_COORDINATOR__QUERY__DEFAULT_DEADLINE_MS=5000`.
pub const ENV_PREFIX: &str = "FEDQ_COORDINATOR";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordinatorConfig {
    listen: String,
    tunnel_listen: Option<String>,
    metrics_listen: Option<String>,
    templates: PathBuf,
    studies: PathBuf,
    tls: TlsFiles,
    state_dir: PathBuf,
    #[serde(default)]
    query: RawQuery,
    #[serde(default)]
    audit: RawAudit,
    quality: Option<QualityPolicy>,
    nodes: Vec<RawNode>,
    #[serde(default)]
    users: Vec<UserEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    default_deadline_ms: Option<u64>,
    max_deadline_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    head_interval_secs: Option<u64>,
}

/// The alliance's data-quality standard (`[quality]`): which standing study and profile
/// template `fedq quality` runs, and the shares above which a site is flagged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityPolicy {
    pub study: String,
    pub template: String,
    /// Flag a column where more than this share of a site's records have no value.
    pub max_missing_percent: f64,
    /// Flag a column where more than this share had a value outside the model's domain.
    pub max_outside_domain_percent: f64,
    /// Flag a check that more than this share of the records it could evaluate fail.
    pub max_implausible_percent: f64,
}

/// How often the coordinator collects every node's signed audit head when the config says
/// nothing (answers carry heads too).
pub const DEFAULT_HEAD_INTERVAL: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    site_id: String,
    address: Option<String>,
    #[serde(default)]
    outbound: bool,
    identity: String,
}

/// A validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    /// Where outbound-only nodes dial in (mutual TLS); required when any node is outbound.
    pub tunnel_listen: Option<SocketAddr>,
    /// Where Prometheus metrics are served over plain HTTP (loopback or an internal network);
    /// none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Folder of approved template files (`*.toml`).
    pub templates: PathBuf,
    /// Folder of signed study approval files (`*.toml`).
    pub studies: PathBuf,
    /// The alliance CA, and the coordinator's certificate: presented to study-lead clients as a
    /// server and to nodes as a client.
    pub tls: TlsFiles,
    /// The coordinator's own records (audit heads, contribution ledger).
    pub state_dir: PathBuf,
    /// How often every node's audit head is collected.
    pub head_interval: Duration,
    /// The data-quality standard, if the alliance declared one.
    pub quality: Option<QualityPolicy>,
    pub default_deadline: Duration,
    pub max_deadline: Duration,
    pub nodes: Vec<NodeEntry>,
    /// Who may use the coordinator, with their token hashes.
    pub users: Vec<UserEntry>,
}

/// One hospital node the coordinator queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub site_id: String,
    pub address: NodeAddress,
    /// The DNS name the node's certificate must carry.
    pub identity: String,
}

/// How the coordinator reaches a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddress {
    /// The node listens: `https://host:port`.
    Listening(String),
    /// The node dials the coordinator's `tunnel_listen` and is queried over that connection.
    Outbound,
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeAddress::Listening(url) => f.write_str(url),
            NodeAddress::Outbound => f.write_str("outbound (the node dials in)"),
        }
    }
}

impl CoordinatorConfig {
    /// Reads, overrides from the environment and validates a coordinator configuration file.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, CoordinatorError> {
        let raw: RawCoordinatorConfig = fedq_proto::config::load_layered(path, ENV_PREFIX)?;
        raw.validate(path.parent().unwrap_or(Path::new(".")))
    }
}

impl RawCoordinatorConfig {
    /// Checks every value; relative paths are resolved against `base`.
    pub fn validate(self, base: &Path) -> Result<CoordinatorConfig, CoordinatorError> {
        let mut problems = Vec::new();
        let listen = self.listen.parse::<SocketAddr>();
        if listen.is_err() {
            problems.push(format!(
                "listen '{}' is not an address with port (e.g. '0.0.0.0:7700')",
                self.listen
            ));
        }
        let metrics_listen = match self.metrics_listen.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(address)) => Some(address),
            Some(Err(_)) => {
                problems.push(format!(
                    "metrics_listen '{}' is not an address with port (e.g. '127.0.0.1:9465')",
                    self.metrics_listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let tunnel_listen = match self.tunnel_listen.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(address)) => Some(address),
            Some(Err(_)) => {
                problems.push(format!(
                    "tunnel_listen '{}' is not an address with port (e.g. '0.0.0.0:7701')",
                    self.tunnel_listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let templates = fedq_proto::config::resolve_path(base, &self.templates);
        let studies = fedq_proto::config::resolve_path(base, &self.studies);
        if !studies.is_dir() {
            problems.push(format!(
                "studies: folder {} does not exist",
                studies.display()
            ));
        }
        if !templates.is_dir() {
            problems.push(format!(
                "templates: folder {} does not exist",
                templates.display()
            ));
        }
        let tls = self.tls.resolved(base);
        problems.extend(tls.missing_files());
        let state_dir = fedq_proto::config::resolve_path(base, &self.state_dir);
        if state_dir.exists() && !state_dir.is_dir() {
            problems.push(format!(
                "state_dir: {} is not a folder",
                state_dir.display()
            ));
        }
        let head_interval = self
            .audit
            .head_interval_secs
            .map_or(DEFAULT_HEAD_INTERVAL, Duration::from_secs);
        if head_interval.is_zero() {
            problems.push("audit.head_interval_secs must be above 0".into());
        }
        if let Some(quality) = &self.quality {
            for (key, value) in [
                ("max_missing_percent", quality.max_missing_percent),
                (
                    "max_outside_domain_percent",
                    quality.max_outside_domain_percent,
                ),
                ("max_implausible_percent", quality.max_implausible_percent),
            ] {
                if !(0.0..=100.0).contains(&value) {
                    problems.push(format!(
                        "quality.{key} is {value}; it must be from 0 to 100"
                    ));
                }
            }
        }
        let default_deadline = self.query.default_deadline_ms.unwrap_or(10_000);
        let max_deadline = self.query.max_deadline_ms.unwrap_or(60_000);
        if default_deadline == 0 || default_deadline > max_deadline {
            problems.push(format!(
                "query.default_deadline_ms ({default_deadline}) must be above 0 and at most query.max_deadline_ms ({max_deadline})"
            ));
        }
        if self.users.is_empty() {
            problems.push("no [[users]] configured: nobody could use the coordinator; add one with `fedq users token`".into());
        }
        if self.nodes.is_empty() {
            problems.push("no [[nodes]] configured".into());
        }
        let mut nodes: Vec<NodeEntry> = Vec::new();
        for node in self.nodes {
            if nodes.iter().any(|seen| seen.site_id == node.site_id) {
                problems.push(format!("nodes: site '{}' is listed twice", node.site_id));
            }
            let address = match (node.address, node.outbound) {
                (Some(address), false) => {
                    if !address.starts_with("https://") {
                        problems.push(format!(
                            "nodes: site '{}': address '{address}' must start with https:// (nodes are reached over mutual TLS only)",
                            node.site_id
                        ));
                    }
                    NodeAddress::Listening(address)
                }
                (None, true) => {
                    if self.tunnel_listen.is_none() {
                        problems.push(format!(
                            "nodes: site '{}' is outbound, so the coordinator needs tunnel_listen (the address outbound nodes dial, e.g. '0.0.0.0:7701')",
                            node.site_id
                        ));
                    }
                    if nodes.iter().any(|seen| {
                        seen.address == NodeAddress::Outbound && seen.identity == node.identity
                    }) {
                        problems.push(format!(
                            "nodes: site '{}': identity '{}' is used by another outbound site; each outbound node is recognised by its own certificate identity",
                            node.site_id, node.identity
                        ));
                    }
                    NodeAddress::Outbound
                }
                (Some(_), true) => {
                    problems.push(format!(
                        "nodes: site '{}' is outbound and also has an address; an outbound node dials in, so remove address (or outbound)",
                        node.site_id
                    ));
                    NodeAddress::Outbound
                }
                (None, false) => {
                    problems.push(format!(
                        "nodes: site '{}': address (https://host:port) is required, or outbound = true if the node dials the coordinator",
                        node.site_id
                    ));
                    NodeAddress::Outbound
                }
            };
            if node.identity.is_empty() {
                problems.push(format!(
                    "nodes: site '{}': identity (the node certificate's DNS name) is required",
                    node.site_id
                ));
            }
            nodes.push(NodeEntry {
                site_id: node.site_id,
                address,
                identity: node.identity,
            });
        }
        match listen {
            Ok(listen) if problems.is_empty() => Ok(CoordinatorConfig {
                listen,
                tunnel_listen,
                metrics_listen,
                templates,
                studies,
                tls,
                state_dir,
                head_interval,
                quality: self.quality,
                default_deadline: Duration::from_millis(default_deadline),
                max_deadline: Duration::from_millis(max_deadline),
                nodes,
                users: self.users,
            }),
            _ => Err(CoordinatorError::Config(problems)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<CoordinatorConfig, CoordinatorError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("templates")).unwrap();
        for file in ["ca.pem", "c.pem", "c.key"] {
            std::fs::write(dir.path().join(file), "x").unwrap();
        }
        let raw: RawCoordinatorConfig = fedq_proto::config::parse_layered(text, "c.toml", &[])?;
        raw.validate(dir.path())
    }

    const BASE: &str = r#"
listen = "127.0.0.1:0"
templates = "templates"
studies = "templates"
state_dir = "state"
users = [{ name = "Dr. Lead", role = "study_lead", token_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA" }]
[tls]
ca_cert = "ca.pem"
cert = "c.pem"
key = "c.key"
"#;

    #[test]
    fn plaintext_node_address_is_refused() {
        let text = format!(
            "{BASE}[[nodes]]\nsite_id = \"a\"\naddress = \"http://127.0.0.1:1\"\nidentity = \"a.test\"\n"
        );
        let err = validate(&text).unwrap_err().to_string();
        assert!(err.contains("must start with https://"), "{err}");
    }

    #[test]
    fn outbound_node_needs_tunnel_listen_and_no_address() {
        let outbound = "[[nodes]]\nsite_id = \"a\"\noutbound = true\nidentity = \"a.test\"\n";
        let err = validate(&format!("{BASE}{outbound}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs tunnel_listen"), "{err}");
        let both = "[[nodes]]\nsite_id = \"a\"\noutbound = true\naddress = \"https://a:1\"\nidentity = \"a.test\"\n";
        let err = validate(&format!("tunnel_listen = \"127.0.0.1:0\"\n{BASE}{both}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is outbound and also has an address"), "{err}");
        let neither = "[[nodes]]\nsite_id = \"a\"\nidentity = \"a.test\"\n";
        let err = validate(&format!("{BASE}{neither}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("address (https://host:port) is required"),
            "{err}"
        );
        let config = validate(&format!(
            "tunnel_listen = \"127.0.0.1:0\"\n{BASE}{outbound}"
        ))
        .unwrap();
        assert_eq!(config.nodes[0].address, NodeAddress::Outbound);
        assert!(config.tunnel_listen.is_some());
    }

    #[test]
    fn valid_config_has_default_deadlines() {
        let text = format!(
            "{BASE}[[nodes]]\nsite_id = \"a\"\naddress = \"https://127.0.0.1:1\"\nidentity = \"a.test\"\n"
        );
        let config = validate(&text).unwrap();
        assert_eq!(config.default_deadline, Duration::from_secs(10));
        assert_eq!(config.nodes[0].identity, "a.test");
    }

    #[test]
    fn shipped_example_config_parses_and_only_its_files_are_missing_here() {
        let text = include_str!("../../deploy/config/coordinator.example.toml");
        let raw: RawCoordinatorConfig =
            fedq_proto::config::parse_layered(text, "coordinator.example.toml", &[]).unwrap();
        let CoordinatorError::Config(problems) =
            raw.validate(Path::new("/nonexistent")).unwrap_err()
        else {
            panic!("expected configuration problems");
        };
        assert!(!problems.is_empty());
        for problem in problems {
            assert!(problem.contains("does not exist"), "{problem}");
        }
    }
}
