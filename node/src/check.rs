//! `fedq-node check`: everything a node needs before it goes live, checked without serving —
//! configuration, its own certificate (chain to the alliance CA, validity, identity, key),
//! expert keys and quorum, every dataset (file, mapping, types, domain violations counted per
//! column, identifiers), that the state directory can be written, and that the audit log's
//! chain is intact (read only, so it is safe while the node runs). One finding per line.

use std::path::Path;

use serde::Serialize;

use crate::NodeError;
use crate::config::NodeConfig;
use crate::query::load_snapshots;

/// Certificates closer than this to expiry are reported as a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// How a finding came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `config`, `certificate`, `expert keys`, `data`, `state dir`,
    /// `audit log`.
    pub check: &'static str,
    pub detail: String,
}

fn finding(level: Level, check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        check,
        detail: detail.into(),
    }
}

/// Lines of a node error, one per problem.
fn lines(err: &NodeError) -> Vec<String> {
    match err {
        NodeError::Config(problems) | NodeError::Data(problems) => problems.clone(),
        other => vec![other.to_string()],
    }
}

/// Runs every check on the configuration at `path`.
pub fn run(path: &Path) -> Vec<Finding> {
    let config = match NodeConfig::load(path) {
        Ok(config) => config,
        Err(err) => {
            return lines(&err)
                .into_iter()
                .map(|line| finding(Level::Fail, "config", line))
                .collect();
        }
    };
    let mut findings = vec![finding(
        Level::Pass,
        "config",
        format!("{} is valid for site '{}'", path.display(), config.site_id),
    )];
    findings.push(match fedq_proto::tls::check_certificate(&config.tls) {
        Ok(report) if report.days_left < EXPIRY_WARNING_DAYS => finding(
            Level::Warn,
            "certificate",
            format!(
                "{} expires in {} days; renew it",
                report.identities.join(", "),
                report.days_left
            ),
        ),
        Ok(report) => finding(
            Level::Pass,
            "certificate",
            format!(
                "{} chains to the alliance CA, matches its key, valid for {} more days",
                report.identities.join(", "),
                report.days_left
            ),
        ),
        Err(err) => finding(Level::Fail, "certificate", err.to_string()),
    });
    if let Some(outbound) = &config.outbound {
        findings.push(match fedq_proto::tls::check_client_certificate(&config.tls) {
            Ok(()) => finding(
                Level::Pass,
                "outbound",
                format!(
                    "dials {} as a client (certificate allows client authentication); the coordinator must present '{}' and list this site with outbound = true",
                    outbound.coordinator, outbound.coordinator_identity
                ),
            ),
            Err(err) => finding(Level::Fail, "outbound", err.to_string()),
        });
    }
    let trust = &config.policy.trust;
    findings.push(if trust.trusted.is_empty() {
        finding(
            Level::Fail,
            "expert keys",
            "no trusted expert keys: the node would refuse every query (add policy.trusted_expert_keys)",
        )
    } else {
        finding(
            Level::Pass,
            "expert keys",
            format!("{} trusted, quorum {}", trust.trusted.len(), trust.quorum),
        )
    });
    // The node's own secret when it exists, so the snapshot versions shown are the ones it
    // publishes; never created here.
    let existing = crate::records::NodeSecret::existing(&config.state_dir);
    let known_version = existing.is_some();
    let secret = existing.unwrap_or_else(crate::records::NodeSecret::ephemeral);
    match load_snapshots(&config, &secret) {
        Ok((snapshots, warnings)) => {
            for snapshot in snapshots.values() {
                findings.push(finding(
                    Level::Pass,
                    "data",
                    format!(
                        "dataset '{}': {} rows, {} model columns mapped, snapshot {}",
                        snapshot.dataset,
                        snapshot.rows(),
                        snapshot.columns.len(),
                        if known_version {
                            snapshot.version.clone()
                        } else {
                            "(its version is set at the node's first start)".to_string()
                        }
                    ),
                ));
            }
            findings.extend(
                warnings
                    .into_iter()
                    .map(|warning| finding(Level::Warn, "data", warning)),
            );
        }
        Err(err) => findings.extend(
            lines(&err)
                .into_iter()
                .map(|line| finding(Level::Fail, "data", line)),
        ),
    }
    findings.push(state_dir_writable(&config.state_dir));
    findings.push(audit_log(&config.state_dir));
    if config.policy.privacy.overlap_control {
        let setup = config
            .datasets
            .iter()
            .map(|dataset| (dataset.name.clone(), dataset.record_key.clone()))
            .collect();
        findings.push(
            match crate::records::compare_key_setup(&config.state_dir, &setup) {
                Ok(()) => finding(
                    Level::Pass,
                    "overlap",
                    "record keys match the overlap memory (or it is new)",
                ),
                Err(problem) => finding(Level::Fail, "overlap", problem),
            },
        );
    }
    findings
}

/// Verifies the audit log as it is (read only: safe while the node runs).
fn audit_log(state_dir: &Path) -> Finding {
    let location = crate::audit::commands::Location::of_state_dir(state_dir);
    if !location.audit_dir.exists() {
        return finding(
            Level::Pass,
            "audit log",
            "none yet; the node creates it and its audit key at first start",
        );
    }
    let own_key = location.key_id();
    let site_id = location.site_id();
    let expected = crate::audit::verify::Expected {
        own_key_id: own_key.as_deref(),
        site_id: site_id.as_deref(),
        heads: &[],
    };
    match crate::audit::verify::verify(&location.audit_dir, expected) {
        Ok(verified) => finding(
            Level::Pass,
            "audit log",
            format!(
                "{} records in {} segment(s), chain intact",
                verified.last_seq, verified.segments
            ),
        ),
        Err(problem) => finding(Level::Fail, "audit log", problem.to_string()),
    }
}

fn state_dir_writable(state_dir: &Path) -> Finding {
    let probe = state_dir.join(".fedq-check-probe");
    let written = std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&probe, b"probe"))
        .and_then(|()| std::fs::remove_file(&probe));
    match written {
        Ok(()) if crate::audit::log::in_use(state_dir) => finding(
            Level::Warn,
            "state dir",
            format!(
                "{} is writable and in use by a running fedq-node (its audit lock is held): expected when checking that node's own configuration; a second node on it refuses to start",
                state_dir.display()
            ),
        ),
        Ok(()) => finding(
            Level::Pass,
            "state dir",
            format!("{} is writable", state_dir.display()),
        ),
        Err(err) => finding(
            Level::Fail,
            "state dir",
            format!("cannot write {}: {err}", state_dir.display()),
        ),
    }
}

/// The report as text, one finding per line.
pub fn render(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|finding| {
            let level = match finding.level {
                Level::Pass => "PASS",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            format!("{level}  {:<12} {}\n", finding.check, finding.detail)
        })
        .collect()
}
