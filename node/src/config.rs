//! Node configuration: read in two steps — a raw serde struct from TOML plus `FEDQ_NODE__*`
//! environment overrides, with unknown keys rejected — then [`RawNodeConfig::validate`] into
//! the typed [`NodeConfig`], checking everything that can be checked before data is loaded
//! (names, floor, accepted identities, file existence, column mappings against the model).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedq_proto::model::{DataModel, Domain};
use fedq_proto::rational::Rational;
use fedq_proto::signing::{PublicKeyFile, TrustPolicy, TrustedKey};
use fedq_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::NodeError;
pub use crate::outbound::Outbound;

/// Prefix of environment variables that override config keys, e.g.
/// `FEDQ_NODE__POLICY__MIN_CELL_COUNT=15`.
pub const ENV_PREFIX: &str = "FEDQ_NODE";

/// The disclosure floor when the config names none.
pub const DEFAULT_MIN_CELL_COUNT: u32 = 10;

/// How often, in seconds, certificate and data files are checked for changes by default.
pub const DEFAULT_RELOAD_POLL_SECS: u64 = 30;

/// Queries a node computes at once when the config says nothing.
pub const DEFAULT_MAX_CONCURRENT_QUERIES: usize = 8;
/// Most concurrent queries a node accepts as a setting.
const MOST_CONCURRENT_QUERIES: usize = 256;

/// Smallest audit segment size accepted (a few records).
pub const MIN_AUDIT_SEGMENT_BYTES: u64 = 4096;

/// No node may run with a floor below this.
pub const LOWEST_MIN_CELL_COUNT: u32 = 3;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeConfig {
    site_id: String,
    listen: Option<String>,
    outbound: Option<RawOutbound>,
    metrics_listen: Option<String>,
    max_concurrent_queries: Option<usize>,
    reload_poll_secs: Option<u64>,
    state_dir: PathBuf,
    tls: TlsFiles,
    policy: RawPolicy,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    privacy: RawPrivacy,
    #[serde(default)]
    datasets: Vec<RawDataset>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivacy {
    overlap_control: Option<bool>,
    overlap_memory_mb: Option<u64>,
    overlap_study_share_percent: Option<u32>,
    rounding_base: Option<u32>,
    dominance_percent: Option<u32>,
    regression_iterations: Option<u32>,
    differential_privacy: Option<bool>,
    epsilon_per_query: Option<String>,
    study_epsilon: Option<String>,
    node_epsilon: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    coordinator: String,
    coordinator_identity: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    segment_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    accepted_coordinators: Vec<String>,
    min_cell_count: Option<u32>,
    #[serde(default)]
    trusted_expert_keys: Vec<PathBuf>,
    signature_quorum: Option<usize>,
    #[serde(default)]
    revoked_keys: Vec<String>,
    #[serde(default)]
    refused_templates: Vec<String>,
    #[serde(default)]
    accepted_studies: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    path: PathBuf,
    format: Option<FileFormat>,
    #[serde(default)]
    identifiers: Vec<String>,
    record_key: Option<Vec<String>>,
    #[serde(default)]
    on_domain_violation: DomainViolationPolicy,
    objections: Option<RawObjections>,
    columns: BTreeMap<String, RawColumnMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjections {
    file: PathBuf,
    key_column: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumnMapping {
    source: String,
    #[serde(default)]
    codes: BTreeMap<String, String>,
    #[serde(default)]
    missing: Vec<String>,
    scale: Option<f64>,
    offset: Option<f64>,
    date_format: Option<String>,
}

/// File formats a dataset can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Parquet,
}

/// What the node does when local values fall outside the model's declared domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainViolationPolicy {
    /// Refuse to start and list every affected column with its count (the default).
    #[default]
    RefuseToStart,
    /// Count and report them, then treat those values as missing.
    TreatAsMissing,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub site_id: String,
    /// Where the node accepts the coordinator's connections; none in outbound-only mode.
    pub listen: Option<SocketAddr>,
    /// Outbound mode: the node dials the coordinator and serves queries over that connection.
    pub outbound: Option<Outbound>,
    /// Where Prometheus metrics are served over plain HTTP (keep it on loopback or an internal
    /// network); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Queries computed at once; more are refused at once as busy (no growing queue).
    pub max_concurrent_queries: usize,
    /// How often certificate and data files are checked for changes (None: only on SIGHUP).
    pub reload_poll: Option<std::time::Duration>,
    /// Files the node owns and keeps across restarts (audit log and key, daily query counts).
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    pub policy: Policy,
    /// Size at which the audit log starts a new segment file.
    pub audit_segment_bytes: u64,
    pub datasets: Vec<DatasetConfig>,
    pub data_model: DataModel,
}

/// The node's own disclosure and access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Certificate identities (DNS names) allowed to send queries.
    pub accepted_coordinators: BTreeSet<String>,
    /// The disclosure floor k: counts from 1 to k-1 are never released.
    pub min_cell_count: u32,
    /// The expert keys whose signatures this site accepts, revoked keys, and the quorum.
    /// Empty: the node refuses every query (deny by default).
    pub trust: TrustPolicy,
    /// Template ids this site never runs, however they are signed.
    pub refused_templates: BTreeSet<String>,
    /// Study ids this site has itself accepted; experts alone cannot enrol it.
    pub accepted_studies: BTreeSet<String>,
    /// The node's privacy mechanisms beyond the threshold.
    pub privacy: Privacy,
}

/// Query-set overlap control and rounding (node policy; both decided at the node only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privacy {
    /// Withhold a cell whose record set differs from an earlier released set by 1 to k-1
    /// records.
    pub overlap_control: bool,
    /// Most memory the remembered released sets may take; beyond it the node refuses queries.
    pub overlap_memory_bytes: u64,
    /// The part (percent) of that memory one study may fill; beyond it only that study is
    /// refused.
    pub overlap_study_share_percent: u32,
    /// Released counts are rounded to a multiple of this (0: no rounding).
    pub rounding_base: u32,
    /// Dominance rule for means: withhold a cell where one record's value is more than this
    /// percent of the cell's sum (0: off).
    pub dominance_percent: u32,
    /// Most Newton-Raphson iterations of one logistic regression the site evaluates.
    pub regression_iterations: u32,
    /// Differential privacy, when on.
    pub differential_privacy: Option<DifferentialPrivacy>,
}

/// The node's differential-privacy policy (exact rationals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DifferentialPrivacy {
    /// Epsilon per new query for studies whose approval sets none.
    pub epsilon_per_query: Rational,
    /// Most a study may spend at this site, whatever its approval says.
    pub study_epsilon: Rational,
    /// Most all studies together may spend at this site.
    pub node_epsilon: Rational,
}

/// Defaults of the differential-privacy policy.
pub const DEFAULT_EPSILON_PER_QUERY: &str = "1/10";
pub const DEFAULT_STUDY_EPSILON: &str = "1";
pub const DEFAULT_NODE_EPSILON: &str = "10";

/// Default bound of the overlap memory.
pub const DEFAULT_OVERLAP_MEMORY_MB: u64 = 1024;
/// Largest rounding base accepted.
pub const MAX_ROUNDING_BASE: u32 = 100;

/// The signature quorum when the configuration names none.
pub const DEFAULT_SIGNATURE_QUORUM: usize = 2;

/// One dataset the node serves.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub name: String,
    pub path: PathBuf,
    pub format: FileFormat,
    /// Local columns that identify a person; never loaded, never mappable.
    pub identifiers: Vec<String>,
    /// Local columns whose keyed hash identifies a record for overlap control (default: the
    /// identifiers). Read only to compute that hash.
    pub record_key: Vec<String>,
    pub on_domain_violation: DomainViolationPolicy,
    /// Patients who refused research use: their records are left out before any computation.
    pub objections: Option<Objections>,
    /// Common-model column name → how to derive it from the local file.
    pub columns: BTreeMap<String, ColumnMapping>,
}

/// The patient objection list of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objections {
    /// Text file with one record key per line (`#` starts a comment).
    pub file: PathBuf,
    /// The local identifier column holding those keys.
    pub key_column: String,
}

/// How one common-model column is derived from a local column.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMapping {
    pub source: String,
    /// Local code → model category (category columns). Empty: local values are model names.
    pub codes: BTreeMap<String, String>,
    /// Local values that mean "not recorded".
    pub missing: Vec<String>,
    /// Unit conversion for numeric columns: model = local * scale + offset.
    pub scale: f64,
    pub offset: f64,
    /// `strftime` format of local dates written as text.
    pub date_format: String,
}

impl NodeConfig {
    /// Reads, overrides from the environment and validates a node configuration file.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let raw: RawNodeConfig = fedq_proto::config::load_layered(path, ENV_PREFIX)?;
        let base = path.parent().unwrap_or(Path::new("."));
        raw.validate(base, DataModel::builtin())
    }
}

impl RawNodeConfig {
    /// Checks every value and resolves relative paths against `base` (the config file's folder).
    pub fn validate(self, base: &Path, data_model: DataModel) -> Result<NodeConfig, NodeError> {
        let mut problems = Vec::new();
        if !is_site_id(&self.site_id) {
            problems.push(format!(
                "site_id '{}' must be lowercase letters, digits and '-' (e.g. 'site-a')",
                self.site_id
            ));
        }
        let listen = match self.listen.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(address)) => Some(address),
            Some(Err(_)) => {
                problems.push(format!(
                    "listen '{}' is not an address with port (e.g. '0.0.0.0:7443')",
                    self.listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let outbound = self.outbound.map(|outbound| Outbound {
            coordinator: outbound.coordinator,
            coordinator_identity: outbound.coordinator_identity,
        });
        if let Some(outbound) = &outbound {
            if !has_port(&outbound.coordinator) {
                problems.push(format!(
                    "outbound.coordinator '{}' must be host:port of the coordinator's tunnel_listen (e.g. 'coordinator.alliance.example:7701'), without https://",
                    outbound.coordinator
                ));
            }
            if !self
                .policy
                .accepted_coordinators
                .contains(&outbound.coordinator_identity)
            {
                problems.push(format!(
                    "outbound.coordinator_identity '{}' is not in policy.accepted_coordinators: the node would dial a coordinator whose queries it then refuses",
                    outbound.coordinator_identity
                ));
            }
        } else if self.listen.is_none() {
            problems.push(
                "neither listen nor [outbound] is set: set listen (the coordinator connects to the node) or [outbound] (the node dials the coordinator), or both".into(),
            );
        }
        let metrics_listen = match self.metrics_listen.as_deref().map(str::parse::<SocketAddr>) {
            None => None,
            Some(Ok(address)) => Some(address),
            Some(Err(_)) => {
                problems.push(format!(
                    "metrics_listen '{}' is not an address with port (e.g. '127.0.0.1:9464')",
                    self.metrics_listen.as_deref().unwrap_or_default()
                ));
                None
            }
        };
        let max_concurrent_queries = self
            .max_concurrent_queries
            .unwrap_or(DEFAULT_MAX_CONCURRENT_QUERIES);
        if !(1..=MOST_CONCURRENT_QUERIES).contains(&max_concurrent_queries) {
            problems.push(format!(
                "max_concurrent_queries is {max_concurrent_queries}; it must be from 1 to {MOST_CONCURRENT_QUERIES}"
            ));
        }
        let state_dir = fedq_proto::config::resolve_path(base, &self.state_dir);
        if state_dir.exists() && !state_dir.is_dir() {
            problems.push(format!(
                "state_dir: {} is not a folder",
                state_dir.display()
            ));
        }
        let tls = self.tls.resolved(base);
        problems.extend(tls.missing_files());
        let audit_segment_bytes = self
            .audit
            .segment_bytes
            .unwrap_or(crate::audit::log::DEFAULT_SEGMENT_BYTES);
        if audit_segment_bytes < MIN_AUDIT_SEGMENT_BYTES {
            problems.push(format!(
                "audit.segment_bytes is {audit_segment_bytes}; it must be at least {MIN_AUDIT_SEGMENT_BYTES}"
            ));
        }
        let min_cell_count = self.policy.min_cell_count.unwrap_or(DEFAULT_MIN_CELL_COUNT);
        if min_cell_count < LOWEST_MIN_CELL_COUNT {
            problems.push(format!(
                "policy.min_cell_count is {min_cell_count}; it must be at least {LOWEST_MIN_CELL_COUNT}"
            ));
        }
        for identity in &self.policy.accepted_coordinators {
            if identity == "localhost" || identity.parse::<std::net::IpAddr>().is_ok() {
                problems.push(format!(
                    "policy.accepted_coordinators: '{identity}' is not an alliance identity; list the coordinator certificate's DNS name (development certificates all carry localhost and 127.0.0.1)"
                ));
            }
        }
        if self.policy.accepted_coordinators.is_empty() {
            problems.push(
                "policy.accepted_coordinators is empty: list the certificate names of the coordinators allowed to query this node".into(),
            );
        }
        let trust = trust_policy(&self.policy, base, &mut problems);
        let privacy = Privacy {
            overlap_control: self.privacy.overlap_control.unwrap_or(true),
            overlap_memory_bytes: self
                .privacy
                .overlap_memory_mb
                .unwrap_or(DEFAULT_OVERLAP_MEMORY_MB)
                .saturating_mul(1024 * 1024),
            overlap_study_share_percent: self.privacy.overlap_study_share_percent.unwrap_or(25),
            rounding_base: self.privacy.rounding_base.unwrap_or(0),
            dominance_percent: self.privacy.dominance_percent.unwrap_or(0),
            regression_iterations: self.privacy.regression_iterations.unwrap_or(30),
            differential_privacy: None,
        };
        if !(1..=100).contains(&privacy.regression_iterations) {
            problems.push(format!(
                "privacy.regression_iterations is {}; it must be from 1 to 100",
                privacy.regression_iterations
            ));
        }
        if privacy.dominance_percent > 100 {
            problems.push(format!(
                "privacy.dominance_percent is {}; use 0 (off) or a share from 1 to 100",
                privacy.dominance_percent
            ));
        }
        if !(1..=100).contains(&privacy.overlap_study_share_percent) {
            problems.push(format!(
                "privacy.overlap_study_share_percent is {}; it must be from 1 to 100",
                privacy.overlap_study_share_percent
            ));
        }
        let mut privacy = privacy;
        if self.privacy.differential_privacy.unwrap_or(false) {
            let mut rational = |key: &str, value: &Option<String>, default: &str| {
                let text = value.as_deref().unwrap_or(default);
                match Rational::parse(text) {
                    Ok(value) if !value.is_zero() => value,
                    _ => {
                        problems.push(format!(
                            "privacy.{key} is '{text}'; write a positive exact number like 1/10 or 0.5"
                        ));
                        Rational::ZERO
                    }
                }
            };
            let policy = DifferentialPrivacy {
                epsilon_per_query: rational(
                    "epsilon_per_query",
                    &self.privacy.epsilon_per_query,
                    DEFAULT_EPSILON_PER_QUERY,
                ),
                study_epsilon: rational(
                    "study_epsilon",
                    &self.privacy.study_epsilon,
                    DEFAULT_STUDY_EPSILON,
                ),
                node_epsilon: rational(
                    "node_epsilon",
                    &self.privacy.node_epsilon,
                    DEFAULT_NODE_EPSILON,
                ),
            };
            if policy.epsilon_per_query > policy.study_epsilon
                || policy.study_epsilon > policy.node_epsilon
            {
                problems.push(format!(
                    "privacy: epsilon_per_query ({}) <= study_epsilon ({}) <= node_epsilon ({}) must hold",
                    policy.epsilon_per_query, policy.study_epsilon, policy.node_epsilon
                ));
            }
            privacy.differential_privacy = Some(policy);
        } else if self.privacy.epsilon_per_query.is_some()
            || self.privacy.study_epsilon.is_some()
            || self.privacy.node_epsilon.is_some()
        {
            problems.push(
                "privacy: epsilon settings are given but differential_privacy is not true".into(),
            );
        }
        if privacy.rounding_base == 1 || privacy.rounding_base > MAX_ROUNDING_BASE {
            problems.push(format!(
                "privacy.rounding_base is {}; use 0 (no rounding) or 2 to {MAX_ROUNDING_BASE}",
                privacy.rounding_base
            ));
        } else if privacy.rounding_base > 2 * min_cell_count {
            problems.push(format!(
                "privacy.rounding_base is {}; at most twice policy.min_cell_count ({}), or released counts of k or more would be shown as 0",
                privacy.rounding_base,
                2 * min_cell_count
            ));
        }
        if privacy.overlap_control && privacy.overlap_memory_bytes == 0 {
            problems.push("privacy.overlap_memory_mb must be above 0".into());
        }
        let mut datasets: Vec<DatasetConfig> = Vec::new();
        if self.datasets.is_empty() {
            problems.push(
                "no [[datasets]] configured: this node would have nothing to answer from".into(),
            );
        }
        for raw in self.datasets {
            if datasets.iter().any(|seen| seen.name == raw.name) {
                problems.push(format!("dataset '{}' is configured twice", raw.name));
                continue;
            }
            match raw.validate(base, &data_model) {
                Ok(dataset) => {
                    if privacy.overlap_control && dataset.record_key.is_empty() {
                        problems.push(format!(
                            "dataset '{}': query-set overlap control needs a stable record identity: declare the identifying local columns under 'identifiers' (or name them in 'record_key'); only a keyed hash of them is kept. To run without overlap control, set privacy.overlap_control = false",
                            dataset.name
                        ));
                    }
                    datasets.push(dataset);
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        if !problems.is_empty() {
            return Err(NodeError::Config(problems));
        }
        Ok(NodeConfig {
            site_id: self.site_id,
            listen,
            outbound,
            metrics_listen,
            max_concurrent_queries,
            reload_poll: match self.reload_poll_secs.unwrap_or(DEFAULT_RELOAD_POLL_SECS) {
                0 => None,
                seconds => Some(std::time::Duration::from_secs(seconds)),
            },
            state_dir,
            tls,
            audit_segment_bytes,
            policy: Policy {
                accepted_coordinators: self.policy.accepted_coordinators.into_iter().collect(),
                min_cell_count,
                trust,
                refused_templates: self.policy.refused_templates.into_iter().collect(),
                accepted_studies: self.policy.accepted_studies.into_iter().collect(),
                privacy,
            },
            datasets,
            data_model,
        })
    }
}

/// Whether `address` looks like `host:port` (a name or address, then a port number; no
/// scheme or path).
fn has_port(address: &str) -> bool {
    !address.contains('/')
        && address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

impl RawDataset {
    fn validate(self, base: &Path, model: &DataModel) -> Result<DatasetConfig, Vec<String>> {
        let at = format!("dataset '{}'", self.name);
        let mut problems = Vec::new();
        let Some(spec) = model.dataset(&self.name) else {
            return Err(vec![format!(
                "{at}: data model '{}' has no such dataset (it has: {})",
                model.key(),
                model
                    .datasets
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )]);
        };
        let path = fedq_proto::config::resolve_path(base, &self.path);
        if !path.is_file() {
            problems.push(format!("{at}: data file {} does not exist", path.display()));
        }
        let format = match self.format.or_else(|| format_from_extension(&path)) {
            Some(format) => format,
            None => {
                problems.push(format!(
                    "{at}: cannot tell the format of {}; set format = \"csv\" or \"parquet\"",
                    path.display()
                ));
                FileFormat::Csv
            }
        };
        let objections = self.objections.map(|raw| Objections {
            file: fedq_proto::config::resolve_path(base, &raw.file),
            key_column: raw.key_column,
        });
        if let Some(objections) = &objections {
            if !objections.file.is_file() {
                problems.push(format!(
                    "{at}: objections.file: file {} does not exist",
                    objections.file.display()
                ));
            }
            if !self.identifiers.contains(&objections.key_column) {
                problems.push(format!(
                    "{at}: objections.key_column '{}' must be one of the declared identifiers ({})",
                    objections.key_column,
                    self.identifiers.join(", ")
                ));
            }
        }
        let mut columns = BTreeMap::new();
        for (model_name, raw) in self.columns {
            let Some(column) = spec.column(&model_name) else {
                problems.push(format!(
                    "{at}: columns.{model_name}: the data model has no column '{model_name}' in this dataset"
                ));
                continue;
            };
            if column.identifier {
                problems.push(format!(
                    "{at}: columns.{model_name}: '{model_name}' is an identifier in the data model; identifiers are never loaded, so do not map it"
                ));
                continue;
            }
            if self.identifiers.contains(&raw.source) {
                problems.push(format!(
                    "{at}: columns.{model_name}: local column '{}' is declared an identifier and cannot be mapped",
                    raw.source
                ));
                continue;
            }
            let is_category = matches!(column.domain, Domain::Category { .. });
            if !raw.codes.is_empty() && !is_category {
                problems.push(format!(
                    "{at}: columns.{model_name}: 'codes' applies only to category columns"
                ));
            }
            if let Domain::Category { categories } = &column.domain {
                for (local, target) in &raw.codes {
                    if !categories.contains(target) {
                        problems.push(format!(
                            "{at}: columns.{model_name}: code '{local}' maps to '{target}', which is not a category of '{model_name}' ({})",
                            categories.join(", ")
                        ));
                    }
                }
            }
            if (raw.scale.is_some() || raw.offset.is_some()) && !column.domain.is_numeric() {
                problems.push(format!(
                    "{at}: columns.{model_name}: 'scale'/'offset' apply only to numeric columns"
                ));
            }
            let scale = raw.scale.unwrap_or(1.0);
            let offset = raw.offset.unwrap_or(0.0);
            if !scale.is_finite() || scale == 0.0 || !offset.is_finite() {
                problems.push(format!("{at}: columns.{model_name}: 'scale' must be a non-zero number and 'offset' a number"));
            }
            if raw.date_format.is_some() && !matches!(column.domain, Domain::Date { .. }) {
                problems.push(format!(
                    "{at}: columns.{model_name}: 'date_format' applies only to date columns"
                ));
            }
            columns.insert(
                model_name,
                ColumnMapping {
                    source: raw.source,
                    codes: raw.codes,
                    missing: raw.missing,
                    scale,
                    offset,
                    date_format: raw.date_format.unwrap_or_else(|| "%Y-%m-%d".to_string()),
                },
            );
        }
        if columns.is_empty() {
            problems.push(format!(
                "{at}: map at least one column under [datasets.columns]"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(DatasetConfig {
            name: self.name,
            path,
            format,
            record_key: self.record_key.unwrap_or_else(|| self.identifiers.clone()),
            identifiers: self.identifiers,
            on_domain_violation: self.on_domain_violation,
            objections,
            columns,
        })
    }
}

/// Loads the trusted expert keys and checks the quorum against them.
fn trust_policy(raw: &RawPolicy, base: &Path, problems: &mut Vec<String>) -> TrustPolicy {
    let mut trusted: Vec<TrustedKey> = Vec::new();
    for path in &raw.trusted_expert_keys {
        let path = fedq_proto::config::resolve_path(base, path);
        let origin = path.display().to_string();
        if !path.is_file() {
            problems.push(format!(
                "policy.trusted_expert_keys: file {origin} does not exist"
            ));
            continue;
        }
        let loaded = std::fs::read_to_string(&path)
            .map_err(|err| fedq_proto::Error::Signing(format!("cannot read {origin}: {err}")))
            .and_then(|text| PublicKeyFile::from_toml(&text, &origin))
            .and_then(|file| file.trusted_key(&origin));
        match loaded {
            Ok(key) if trusted.iter().any(|seen| seen.key_id == key.key_id) => {
                problems.push(format!(
                    "policy.trusted_expert_keys: key {} is listed twice",
                    key.key_id
                ))
            }
            Ok(key) => trusted.push(key),
            Err(err) => problems.push(format!("policy.trusted_expert_keys: {err}")),
        }
    }
    let revoked: BTreeSet<String> = raw.revoked_keys.iter().cloned().collect();
    for key_id in &revoked {
        let well_formed = key_id.strip_prefix("ed25519:").is_some_and(|digits| {
            digits.len() == 16
                && digits
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        });
        if !well_formed {
            problems.push(format!(
                "policy.revoked_keys: '{key_id}' is not a key id; write it as `fedq keys generate` prints it (ed25519: and 16 lowercase hex digits)"
            ));
        }
    }
    let usable = trusted
        .iter()
        .filter(|key| !revoked.contains(&key.key_id))
        .count();
    let quorum = match raw.signature_quorum {
        Some(quorum) => quorum,
        None if usable == 1 => {
            problems.push(
                "policy.signature_quorum is not set and only one trusted key is usable; set signature_quorum = 1 explicitly if one expert's signature should be enough".into(),
            );
            DEFAULT_SIGNATURE_QUORUM
        }
        None => DEFAULT_SIGNATURE_QUORUM,
    };
    if !trusted.is_empty() && (quorum == 0 || quorum > usable) {
        problems.push(format!(
            "policy.signature_quorum is {quorum}; it must be from 1 to the number of trusted expert keys that are not revoked ({usable})"
        ));
    }
    TrustPolicy {
        trusted,
        revoked,
        quorum,
    }
}

fn format_from_extension(path: &Path) -> Option<FileFormat> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "csv" => Some(FileFormat::Csv),
        "parquet" | "pq" => Some(FileFormat::Parquet),
        _ => None,
    }
}

fn is_site_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn config_text(extra_policy: &str, columns: &str) -> String {
        format!(
            r#"
site_id = "site-a"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"
[policy]
accepted_coordinators = ["coordinator.test"]
{extra_policy}
[[datasets]]
name = "trauma_admissions"
path = "a.csv"
identifiers = ["NAME"]
[datasets.columns]
{columns}
"#
        )
    }

    fn validate(text: &str) -> Result<NodeConfig, NodeError> {
        let dir = tempfile::tempdir().unwrap();
        for file in ["ca.pem", "node.pem", "node.key", "a.csv"] {
            write(dir.path(), file, "x");
        }
        let raw: RawNodeConfig = fedq_proto::config::parse_layered(text, "node.toml", &[])?;
        raw.validate(dir.path(), DataModel::builtin())
    }

    #[test]
    fn valid_config_gets_default_floor_of_ten() {
        let config = validate(&config_text("", "age = { source = \"AGE\" }")).unwrap();
        assert_eq!(config.policy.min_cell_count, 10);
        assert_eq!(config.datasets[0].format, FileFormat::Csv);
        assert_eq!(config.datasets[0].columns["age"].scale, 1.0);
    }

    #[test]
    fn floor_below_three_is_rejected() {
        let err = validate(&config_text(
            "min_cell_count = 2",
            "age = { source = \"AGE\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("policy.min_cell_count is 2; it must be at least 3"),
            "{err}"
        );
    }

    #[test]
    fn mapping_an_identifier_is_rejected_either_way() {
        let err = validate(&config_text(
            "",
            "national_id = { source = \"ID\" }\nage = { source = \"NAME\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("'national_id' is an identifier"), "{err}");
        assert!(
            err.contains("local column 'NAME' is declared an identifier"),
            "{err}"
        );
    }

    #[test]
    fn code_to_unknown_category_is_rejected() {
        let err = validate(&config_text(
            "",
            "sex = { source = \"SEX\", codes = { F = \"woman\" } }",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("code 'F' maps to 'woman'"), "{err}");
    }

    #[test]
    fn loopback_names_are_not_accepted_coordinator_identities() {
        let text = config_text("", "age = { source = \"AGE\" }")
            .replace("[\"coordinator.test\"]", "[\"localhost\", \"127.0.0.1\"]");
        let err = validate(&text).unwrap_err().to_string();
        assert!(
            err.contains("'localhost' is not an alliance identity"),
            "{err}"
        );
        assert!(
            err.contains("'127.0.0.1' is not an alliance identity"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text = config_text("min_cel_count = 5", "age = { source = \"AGE\" }");
        let err = validate(&text).unwrap_err().to_string();
        assert!(err.contains("min_cel_count"), "{err}");
    }

    #[test]
    fn shipped_example_config_parses_and_only_its_files_are_missing_here() {
        let text = include_str!("../../deploy/config/node.example.toml");
        // The commented-out [outbound] block too, as an administrator would enable it (with
        // and without listen).
        let outbound = text
            .replace("# [outbound]", "[outbound]")
            .replace("# coordinator = ", "coordinator = ")
            .replace("# coordinator_identity = ", "coordinator_identity = ");
        assert_ne!(outbound, text);
        let outbound_only = outbound.replace("listen = \"0.0.0.0:7443\"", "");
        for (name, text) in [
            ("as shipped", text),
            ("outbound", outbound.as_str()),
            ("outbound only", outbound_only.as_str()),
        ] {
            let raw: RawNodeConfig =
                fedq_proto::config::parse_layered(text, "node.example.toml", &[]).unwrap();
            let NodeError::Config(problems) = raw
                .validate(Path::new("/nonexistent"), DataModel::builtin())
                .unwrap_err()
            else {
                panic!("{name}: expected configuration problems");
            };
            assert!(!problems.is_empty());
            for problem in problems {
                assert!(problem.contains("does not exist"), "{name}: {problem}");
            }
        }
    }

    #[test]
    fn outbound_mode_needs_a_host_and_port_and_an_accepted_coordinator() {
        let base = config_text("", "age = { source = \"AGE\" }");
        let outbound_only =
            |section: &str| base.replace("listen = \"127.0.0.1:0\"\n", "") + section;
        let err = validate(&outbound_only("")).unwrap_err().to_string();
        assert!(
            err.contains("neither listen nor [outbound] is set"),
            "{err}"
        );
        let err = validate(&outbound_only(
            "[outbound]\ncoordinator = \"https://c.test:7701\"\ncoordinator_identity = \"coordinator.test\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be host:port"), "{err}");
        let err = validate(&outbound_only(
            "[outbound]\ncoordinator = \"c.test:7701\"\ncoordinator_identity = \"other.test\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("is not in policy.accepted_coordinators"),
            "{err}"
        );
        let config = validate(&outbound_only(
            "[outbound]\ncoordinator = \"c.test:7701\"\ncoordinator_identity = \"coordinator.test\"\n",
        ))
        .unwrap();
        assert_eq!(config.listen, None);
        assert_eq!(config.outbound.unwrap().coordinator, "c.test:7701");
    }

    #[test]
    fn trust_policy_mistakes_are_caught_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["ca.pem", "node.pem", "node.key", "a.csv"] {
            write(dir.path(), file, "x");
        }
        let (ada, ben) = (
            fedq_proto::signing::ExpertSecretKey::generate("Ada"),
            fedq_proto::signing::ExpertSecretKey::generate("Ben"),
        );
        write(dir.path(), "ada.pub", &ada.public().to_toml());
        write(dir.path(), "ben.pub", &ben.public().to_toml());
        let check = |policy: &str| {
            let text = config_text(policy, "age = { source = \"AGE\" }");
            let raw: RawNodeConfig =
                fedq_proto::config::parse_layered(&text, "node.toml", &[]).unwrap();
            raw.validate(dir.path(), DataModel::builtin())
                .map(|config| config.policy.trust.quorum)
        };
        assert_eq!(
            check("trusted_expert_keys = [\"ada.pub\", \"ben.pub\"]").unwrap(),
            2
        );
        let single = check("trusted_expert_keys = [\"ada.pub\"]")
            .unwrap_err()
            .to_string();
        assert!(
            single.contains("set signature_quorum = 1 explicitly"),
            "{single}"
        );
        assert_eq!(
            check("trusted_expert_keys = [\"ada.pub\"]\nsignature_quorum = 1").unwrap(),
            1
        );
        let typo = check(
            "trusted_expert_keys = [\"ada.pub\", \"ben.pub\"]\nrevoked_keys = [\"ED25519:ABC\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(typo.contains("'ED25519:ABC' is not a key id"), "{typo}");
        let unreachable = check(&format!(
            "trusted_expert_keys = [\"ada.pub\", \"ben.pub\"]\nrevoked_keys = [\"{}\"]",
            ben.key_id()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            unreachable.contains("that are not revoked (1)"),
            "{unreachable}"
        );
        let secret = check("trusted_expert_keys = [\"node.key\"]")
            .unwrap_err()
            .to_string();
        assert!(secret.contains("trusted_expert_keys"), "{secret}");
    }
}
