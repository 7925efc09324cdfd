//! `fedq-node audit …`: verify the log (alone and against published heads), show records
//! with filters, print the audit key, and produce the transparency register. Each command
//! returns its output text and whether it succeeded; the binary only prints and exits.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use fedq_proto::audit_head::PublishedHead;
use fedq_proto::signing::ExpertSecretKey;
use fedq_proto::wire;

use super::log::{AUDIT_DIR, KEY_FILE};
use super::record::{Event, Outcome, Record};
use super::verify::{self, Problem};

/// Where a node's audit files are.
#[derive(Debug, Clone)]
pub struct Location {
    pub audit_dir: PathBuf,
    pub key_file: PathBuf,
}

impl Location {
    pub fn of_state_dir(state_dir: &Path) -> Location {
        Location {
            audit_dir: state_dir.join(AUDIT_DIR),
            key_file: state_dir.join(KEY_FILE),
        }
    }

    /// The id of the node's audit key, when its file is here and readable.
    pub fn key_id(&self) -> Option<String> {
        self.key().ok().flatten().map(|key| key.key_id())
    }

    /// The site the audit key was made for, when the key file is here.
    pub fn site_id(&self) -> Option<String> {
        self.key().ok().flatten().map(|key| key.name)
    }

    /// The node's audit key, when its file is here.
    fn key(&self) -> Result<Option<ExpertSecretKey>, String> {
        if !self.key_file.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.key_file)
            .map_err(|err| format!("{}: {err}", self.key_file.display()))?;
        ExpertSecretKey::from_toml(&text, &self.key_file.display().to_string())
            .map(Some)
            .map_err(|err| err.to_string())
    }
}

/// What a command prints and whether it succeeded.
pub struct Output {
    pub text: String,
    pub ok: bool,
}

fn failed(text: String) -> Output {
    Output { text, ok: false }
}

/// Reads a heads file exported by `fedq audit-heads --json`.
fn read_heads(path: &Path) -> Result<Vec<wire::SignedAuditHead>, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let published: Vec<PublishedHead> = serde_json::from_str(&text).map_err(|err| {
        format!(
            "{} is not a heads file from `fedq audit-heads --json` ({err})",
            path.display()
        )
    })?;
    published
        .iter()
        .map(|head| wire::SignedAuditHead::try_from(head).map_err(|err| err.to_string()))
        .collect()
}

/// `fedq-node audit verify`.
pub fn verify(location: &Location, heads: Option<&Path>, json: bool) -> Output {
    let own_key_id = match location.key() {
        Ok(key) => key.map(|key| key.key_id()),
        Err(err) => return failed(format!("FAIL cannot read the audit key: {err}\n")),
    };
    let heads = match heads.map(read_heads).transpose() {
        Ok(heads) => heads.unwrap_or_default(),
        Err(err) => return failed(format!("FAIL {err}\n")),
    };
    let site_id = location.site_id();
    let result = verify::verify(
        &location.audit_dir,
        verify::Expected {
            own_key_id: own_key_id.as_deref(),
            site_id: site_id.as_deref(),
            heads: &heads,
        },
    );
    if json {
        let value = match &result {
            Ok(verified) => serde_json::json!({ "ok": true, "verified": verified }),
            Err(problem) => serde_json::json!({ "ok": false, "problem": problem.to_string() }),
        };
        return Output {
            text: format!("{value:#}\n"),
            ok: result.is_ok(),
        };
    }
    match result {
        Ok(verified) => {
            let mut text = if verified.last_seq == 0 {
                format!(
                    "PASS audit log in {} is empty\n",
                    location.audit_dir.display()
                )
            } else {
                format!(
                    "PASS audit log verified: records #{} to #{} in {} segment(s), chain intact, last hash {}\n",
                    verified.first_seq, verified.last_seq, verified.segments, verified.last_hash
                )
            };
            if let Some(anchor) = &verified.anchored_at {
                text.push_str(&format!(
                    "NOTE records before #{} are not here (archived segments); the first present record builds on {anchor}. Verify them with the archived segments copied back beside these.\n",
                    verified.first_seq
                ));
            }
            if verified.heads_archived > 0 {
                text.push_str(&format!(
                    "NOTE {} published head(s) cover only archived records (before #{}); verify with the archived segments copied back to check them\n",
                    verified.heads_archived, verified.first_seq
                ));
            }
            if verified.heads_checked > 0 {
                text.push_str(&format!(
                    "PASS the log agrees with all {} published head(s)\n",
                    verified.heads_checked
                ));
            } else {
                text.push_str("NOTE no published heads given (--heads FILE from `fedq audit-heads --site SITE --json`): a log rewritten from its start or cut at its end can only be detected against them\n");
            }
            Output { text, ok: true }
        }
        Err(problem) => failed(format!("FAIL {problem}\n")),
    }
}

/// Which records `audit show` prints.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub study: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub outcome: Option<Outcome>,
}

/// Parses a time bound: an RFC 3339 time, or a day (`YYYY-MM-DD`, meaning its start for
/// `--since` and its end for `--until`).
pub fn parse_time(text: &str, end_of_day: bool) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("'{text}' is neither a day (YYYY-MM-DD) nor an RFC 3339 time"))?;
    let time = if end_of_day {
        day.and_hms_milli_opt(23, 59, 59, 999)
    } else {
        day.and_hms_opt(0, 0, 0)
    };
    Ok(time.expect("valid time of day").and_utc())
}

impl Filter {
    fn accepts(&self, record: &Record) -> bool {
        let time = DateTime::parse_from_rfc3339(&record.time)
            .ok()
            .map(|time| time.with_timezone(&Utc));
        if self
            .since
            .is_some_and(|since| time.is_none_or(|time| time < since))
            || self
                .until
                .is_some_and(|until| time.is_none_or(|time| time > until))
        {
            return false;
        }
        let Event::Query(query) = &record.event else {
            // Log events (key creation, recovery) belong to no study or outcome.
            return self.study.is_none() && self.outcome.is_none();
        };
        let study_matches = self.study.as_ref().is_none_or(|wanted| {
            query
                .study
                .as_ref()
                .is_some_and(|study| &study.id == wanted)
                || query.study_named.as_ref() == Some(wanted)
        });
        let outcome_matches = self.outcome.is_none_or(|wanted| query.outcome == wanted);
        study_matches && outcome_matches
    }
}

fn describe(record: &Record) -> String {
    match &record.event {
        Event::Query(query) => {
            let outcome = match query.outcome {
                Outcome::Released => {
                    let withheld: u64 = query.cells_withheld.values().sum();
                    format!(
                        "released {} cells, withheld {withheld}{}",
                        query.cells_released,
                        if query.total_withheld {
                            " and the total"
                        } else {
                            ""
                        }
                    )
                }
                Outcome::Refused => format!(
                    "refused: {}",
                    query
                        .refusal
                        .as_ref()
                        .map_or("", |refusal| refusal.message.as_str())
                ),
            };
            let template = query.template.as_ref().map_or("-".to_string(), |template| {
                format!("{}@{}", template.id, template.version)
            });
            let parameters = query
                .parameters
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join(" ");
            let study = match (&query.study, &query.study_named) {
                (Some(study), _) => study.id.clone(),
                (None, Some(named)) => format!("{named}(unverified)"),
                (None, None) => "-".into(),
            };
            format!(
                "study={study} template={template} requester=\"{}\" caller={} request={} [{parameters}] {outcome}",
                query.requester, query.caller, query.request_id,
            )
        }
        Event::AuditKeyCreated { key_id } => format!("audit key created {key_id}"),
        Event::TornTailDiscarded { segment, bytes } => format!(
            "discarded {bytes} bytes of an incomplete record in {segment} after an unclean stop"
        ),
    }
}

/// `fedq-node audit show`.
pub fn show(location: &Location, filter: &Filter, json: bool) -> Output {
    let records = match verify::records(&location.audit_dir) {
        Ok(records) => records,
        Err(problem) => return problem_output(&problem),
    };
    let chosen: Vec<&Record> = records
        .iter()
        .filter(|record| filter.accepts(record))
        .collect();
    let text = if json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&chosen).expect("records serialise")
        )
    } else if chosen.is_empty() {
        format!(
            "no records match (the log holds {} records; `audit show` without filters lists them all)\n",
            records.len()
        )
    } else {
        chosen
            .iter()
            .map(|record| format!("#{} {} {}\n", record.seq, record.time, describe(record)))
            .collect()
    };
    Output { text, ok: true }
}

fn problem_output(problem: &Problem) -> Output {
    failed(format!(
        "FAIL {problem}\n(run `fedq-node audit verify` for the whole check)\n"
    ))
}

/// `fedq-node audit key`: the node's audit public key, for the alliance to pin.
pub fn key(location: &Location) -> Output {
    match location.key() {
        Ok(Some(key)) => {
            let public = key.public();
            Output {
                text: format!(
                    "audit key of site '{}'\nkey id:     {}\npublic key: {} (ed25519, hex)\nEvery head this node signs carries this key; the coordinator pins the first key it sees for the site.\n",
                    public.name, public.key_id, public.public_key
                ),
                ok: true,
            }
        }
        Ok(None) => failed(format!(
            "FAIL no audit key at {} (a node creates one at its first start; if this is a node's state directory whose key was lost, restore it from the backup — a new key will not be accepted by the coordinator for this site)\n",
            location.key_file.display()
        )),
        Err(err) => failed(format!("FAIL {err}\n")),
    }
}

/// `fedq-node audit register`: JSON on stdout, or an HTML page written to `html`.
pub fn register(location: &Location, site_id: &str, html: Option<&Path>) -> Output {
    let records = match verify::records(&location.audit_dir) {
        Ok(records) => records,
        Err(problem) => return problem_output(&problem),
    };
    let register = super::register::build(&location.audit_dir, site_id, &records);
    let generated_at = register.generated_at.clone();
    let sites = [register];
    match html {
        Some(path) => {
            let page = fedq_proto::register::to_html(
                &format!("Transparency register of {site_id}"),
                &generated_at,
                &sites,
            );
            match std::fs::write(path, page) {
                Ok(()) => Output {
                    text: format!("wrote {}\n", path.display()),
                    ok: true,
                },
                Err(err) => failed(format!("FAIL cannot write {}: {err}\n", path.display())),
            }
        }
        None => Output {
            text: format!(
                "{:#}\n",
                fedq_proto::register::to_json(&generated_at, &sites)
            ),
            ok: true,
        },
    }
}
