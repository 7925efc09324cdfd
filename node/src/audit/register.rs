//! The site's transparency register, built from its audit log: per study, what the approval
//! says publicly (title, purpose, lead institution, ethics reference, period), how many queries
//! this site answered per month, and the titles of the templates they used. It carries no
//! parameter values and no results.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use fedq_proto::study::Study;
use fedq_proto::template::Template;
use fedq_proto::wire;

use super::log::document_path;
use super::record::{Event, Outcome, Record};

/// Document kinds kept in the documents folder.
pub const STUDY_DOCUMENT: &str = "study";
pub const TEMPLATE_DOCUMENT: &str = "template";

#[derive(Default)]
struct StudyUse {
    /// The approval version most recently used.
    content_hash: String,
    months: BTreeMap<String, u64>,
    templates: BTreeSet<String>,
}

/// Builds the register from `records` (in log order) and the documents kept beside them.
pub fn build(audit_dir: &Path, site_id: &str, records: &[Record]) -> wire::SiteRegister {
    let mut studies: BTreeMap<String, StudyUse> = BTreeMap::new();
    for record in records {
        let Event::Query(query) = &record.event else {
            continue;
        };
        let (Outcome::Released, Some(study)) = (query.outcome, &query.study) else {
            continue;
        };
        let entry = studies.entry(study.id.clone()).or_default();
        entry.content_hash.clone_from(&study.content_hash);
        let month = record.time.get(..7).unwrap_or("unknown").to_string();
        *entry.months.entry(month).or_default() += 1;
        if let Some(template) = &query.template {
            entry.templates.insert(template.content_hash.clone());
        }
    }
    let studies = studies
        .into_iter()
        .map(|(study_id, used)| register_study(audit_dir, study_id, used))
        .collect();
    wire::SiteRegister {
        site_id: site_id.to_string(),
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        studies,
    }
}

/// The kept copy of a document, only if it still matches its hash (an edited copy must not
/// reach the public register).
fn kept_document(audit_dir: &Path, kind: &str, content_hash: &str) -> Option<Vec<u8>> {
    std::fs::read(document_path(audit_dir, kind, content_hash))
        .ok()
        .filter(|bytes| fedq_proto::template::content_hash(bytes) == content_hash)
}

fn register_study(audit_dir: &Path, study_id: String, used: StudyUse) -> wire::RegisterStudy {
    let study = kept_document(audit_dir, STUDY_DOCUMENT, &used.content_hash)
        .and_then(|bytes| Study::from_canonical(&bytes).ok());
    let templates_used = used
        .templates
        .iter()
        .map(|hash| {
            kept_document(audit_dir, TEMPLATE_DOCUMENT, hash)
                .and_then(|bytes| Template::from_canonical(&bytes).ok())
                .map_or_else(
                    || format!("(template {hash}: kept copy missing or altered)"),
                    |template| template.title,
                )
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let queries_per_month = used
        .months
        .into_iter()
        .map(|(month, queries)| wire::MonthCount { month, queries })
        .collect();
    match study {
        Some(study) => wire::RegisterStudy {
            study_id,
            title: study.title,
            purpose: study.purpose,
            lead_institution: study.lead_institution,
            ethics_reference: study.ethics_reference,
            valid_from: study.valid_from,
            valid_until: study.valid_until,
            queries_per_month,
            templates_used,
        },
        None => wire::RegisterStudy {
            study_id,
            title: "(approval document missing from the audit folder or altered)".into(),
            queries_per_month,
            templates_used,
            ..Default::default()
        },
    }
}
