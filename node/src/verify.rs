//! Verification before any data is touched: is the caller an accepted coordinator, and is the
//! template document signed by a quorum of expert keys this site trusts (none revoked, none
//! tampered)? Is the study approval it is asked under signed the same way, in force today,
//! listing this site and pinning exactly this template, and accepted by this site?
//! Signatures are checked on the raw canonical bytes before they are decoded.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use fedq_proto::signing::TrustPolicy;
use fedq_proto::study::Study;
use fedq_proto::template::Template;
use fedq_proto::wire;

use crate::NodeError;

/// Checks that one of the caller's certificate identities is accepted by this node's policy.
/// Returns the accepted identity.
pub fn authorize_caller(
    identities: &[String],
    accepted: &BTreeSet<String>,
) -> Result<String, NodeError> {
    identities
        .iter()
        .find(|identity| accepted.contains(*identity))
        .cloned()
        .ok_or_else(|| NodeError::CallerNotAccepted {
            presented: if identities.is_empty() {
                "(none)".to_string()
            } else {
                format!("'{}'", identities.join("', '"))
            },
        })
}

/// Opens the template document: signatures satisfying `trust`, right kind, canonical bytes,
/// decodable template.
pub fn open_template(
    document: Option<&wire::SignedDocument>,
    trust: &TrustPolicy,
) -> Result<Template, NodeError> {
    let document = document.ok_or_else(|| {
        NodeError::Contract(fedq_proto::Error::Template {
            template: "(none)".into(),
            code: fedq_proto::TemplateProblem::Malformed,
            message: "the request carries no template document".into(),
        })
    })?;
    trust.verify(
        fedq_proto::template::DOCUMENT_KIND,
        &document.canonical,
        &document.signatures,
    )?;
    Ok(fedq_proto::document::open_template(document)?)
}

/// Opens the study approval: signatures satisfying `trust`, then a valid study.
pub fn open_study(
    document: Option<&wire::SignedDocument>,
    trust: &TrustPolicy,
) -> Result<Study, NodeError> {
    let document = document.ok_or(NodeError::StudyMissing)?;
    trust.verify(
        fedq_proto::study::DOCUMENT_KIND,
        &document.canonical,
        &document.signatures,
    )?;
    Ok(fedq_proto::document::open_study(document)?)
}

/// Checks that `template` may run at `site_id` under `study` on `today` (UTC), and that this
/// site accepted the study.
pub fn check_study(
    study: &Study,
    template: &Template,
    site_id: &str,
    accepted: &BTreeSet<String>,
    today: NaiveDate,
) -> Result<(), NodeError> {
    if !study.in_force_on(today) {
        return Err(NodeError::StudyNotInForce {
            study: study.id.clone(),
            from: study.valid_from.clone(),
            until: study.valid_until.clone(),
            today: today.to_string(),
        });
    }
    if !study.sites.iter().any(|site| site == site_id) {
        return Err(NodeError::SiteNotInStudy {
            study: study.id.clone(),
            site: site_id.to_string(),
        });
    }
    if !study.pins(template) {
        return Err(NodeError::TemplateNotInStudy {
            study: study.id.clone(),
            template: template.id.clone(),
            version: template.version,
        });
    }
    let hash = study.content_hash();
    let accepted_here = accepted.iter().any(|entry| match entry.split_once('@') {
        Some((id, pinned)) => id == study.id && pinned == hash,
        None => entry == &study.id,
    });
    if !accepted_here {
        return Err(NodeError::StudyNotAccepted {
            study: study.id.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlisted_identity_is_refused_and_named() {
        let accepted = BTreeSet::from(["coordinator.alliance".to_string()]);
        let err = authorize_caller(&["intruder.example".to_string()], &accepted).unwrap_err();
        assert!(
            err.to_string()
                .contains("'intruder.example' is not an accepted coordinator")
        );
        assert_eq!(
            authorize_caller(&["x".into(), "coordinator.alliance".into()], &accepted).unwrap(),
            "coordinator.alliance"
        );
    }

    #[test]
    fn missing_template_document_is_refused() {
        let err = open_template(None, &TrustPolicy::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("carries no template document"), "{err}");
    }

    #[test]
    fn a_study_accepted_with_its_hash_is_refused_once_it_changes() {
        let study = fedq_proto::study::Study {
            id: "s".into(),
            title: "S".into(),
            purpose: "P".into(),
            lead_institution: "I".into(),
            study_lead: "L".into(),
            ethics_reference: "E".into(),
            templates: Vec::new(),
            sites: vec!["site-a".into()],
            valid_from: "2026-01-01".into(),
            valid_until: "2026-12-31".into(),
            max_queries_per_day: 1,
            differential_privacy: None,
        };
        let template: Template = serde_json::from_str(
            r#"{"id":"t","version":1,"title":"T","description":"D","data_model":"fedq-trauma/1","dataset":"trauma_admissions","parameters":[],"strata":[],"statistic":{"kind":"count"}}"#,
        )
        .unwrap();
        let mut study = study;
        study
            .templates
            .push(fedq_proto::study::PinnedTemplate::of(&template));
        let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
        let pinned = BTreeSet::from([format!("s@{}", study.content_hash())]);
        check_study(&study, &template, "site-a", &pinned, today).unwrap();
        let mut widened = study.clone();
        widened.max_queries_per_day = 1000;
        let err = check_study(&widened, &template, "site-a", &pinned, today).unwrap_err();
        assert!(matches!(err, NodeError::StudyNotAccepted { .. }), "{err}");
        let by_id = BTreeSet::from(["s".to_string()]);
        check_study(&widened, &template, "site-a", &by_id, today).unwrap();
    }
}
