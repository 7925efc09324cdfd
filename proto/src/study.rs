//! Study approvals: the signed document that says who may ask which templates, why, at which
//! sites, for how long and how often. Like templates, a study travels as canonical bytes
//! (compact JSON in declaration order) and is signed by alliance experts; its purpose is
//! written for patients, who will read it in the transparency register.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::model::parse_date;
use crate::rational::Rational;
use crate::template::{Template, TemplateRef, content_hash};

/// The `kind` of the signed document a study approval travels in.
pub const DOCUMENT_KIND: &str = "fedq.study/1";

/// A study approval as written by alliance experts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    /// Stable identifier, e.g. `elderly-trauma-2026`.
    pub id: String,
    pub title: String,
    /// Why the study is done, in plain language a patient understands.
    pub purpose: String,
    pub lead_institution: String,
    pub study_lead: String,
    /// The ethics committee's approval reference.
    pub ethics_reference: String,
    /// The templates the study may use, each pinned by id, version and content hash.
    pub templates: Vec<PinnedTemplate>,
    /// The sites the study may query.
    pub sites: Vec<String>,
    /// First and last day (UTC, inclusive) the approval is in force, `YYYY-MM-DD`.
    pub valid_from: String,
    pub valid_until: String,
    /// How many queries of this study each site answers per UTC day.
    pub max_queries_per_day: u32,
    /// The study's differential-privacy budget at each site that adds noise (optional: such a
    /// site otherwise applies its own defaults; a site's cap always applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_privacy: Option<StudyPrivacy>,
}

/// A study's privacy budget: epsilon spent per (new) query, and in all, at each site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyPrivacy {
    /// Exact rational, e.g. "1" or "3/2".
    pub total_epsilon: Rational,
    pub epsilon_per_query: Rational,
}

/// A template a study may use, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedTemplate {
    pub id: String,
    pub version: u32,
    pub content_hash: String,
}

impl PinnedTemplate {
    /// The pin for a template as it is now.
    pub fn of(template: &Template) -> PinnedTemplate {
        let reference = TemplateRef::of(template);
        PinnedTemplate {
            id: reference.id,
            version: reference.version,
            content_hash: reference.content_hash,
        }
    }
}

fn invalid(study: &str, message: impl Into<String>) -> Error {
    Error::Study {
        study: study.to_string(),
        message: message.into(),
    }
}

impl Study {
    /// Parses a study file; syntax errors and unknown keys name the line and column.
    pub fn from_toml(text: &str, origin: &str) -> Result<Study, Error> {
        toml::from_str(text).map_err(|err| Error::Syntax {
            what: format!("study file {origin}"),
            message: err.to_string().trim_end().to_string(),
        })
    }

    /// Decodes canonical bytes, refusing anything not in canonical form.
    pub fn from_canonical(bytes: &[u8]) -> Result<Study, Error> {
        let study: Study = serde_json::from_slice(bytes).map_err(|err| {
            invalid(
                "(unreadable)",
                format!("the study document cannot be decoded: {err}"),
            )
        })?;
        if study.canonical_bytes() != bytes {
            return Err(invalid(
                &study.id,
                "the study document is not in canonical form",
            ));
        }
        Ok(study)
    }

    /// The canonical encoding signatures cover.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("studies always serialise")
    }

    pub fn content_hash(&self) -> String {
        content_hash(&self.canonical_bytes())
    }

    /// The first and last day the approval is in force.
    pub fn validity(&self) -> Result<(NaiveDate, NaiveDate), Error> {
        let date = |text: &str, key: &str| {
            parse_date(text)
                .map_err(|_| invalid(&self.id, format!("'{key}' must be a date YYYY-MM-DD")))
        };
        Ok((
            date(&self.valid_from, "valid_from")?,
            date(&self.valid_until, "valid_until")?,
        ))
    }

    /// Checks that the approval is complete and consistent.
    pub fn check(&self) -> Result<(), Error> {
        let is_name = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        };
        if !is_name(&self.id) {
            return Err(invalid(
                &self.id,
                "'id' must be lowercase letters, digits, '-' or '_'",
            ));
        }
        for (key, value) in [
            ("title", &self.title),
            ("purpose", &self.purpose),
            ("lead_institution", &self.lead_institution),
            ("study_lead", &self.study_lead),
            ("ethics_reference", &self.ethics_reference),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(&self.id, format!("'{key}' must not be empty")));
            }
        }
        let (from, until) = self.validity()?;
        if from > until {
            return Err(invalid(&self.id, "'valid_from' is after 'valid_until'"));
        }
        if self.max_queries_per_day == 0 {
            return Err(invalid(
                &self.id,
                "'max_queries_per_day' must be at least 1",
            ));
        }
        if self.templates.is_empty() || self.sites.is_empty() {
            return Err(invalid(
                &self.id,
                "a study names at least one template and one site",
            ));
        }
        for (index, pin) in self.templates.iter().enumerate() {
            if self.templates[..index]
                .iter()
                .any(|earlier| earlier.id == pin.id)
            {
                return Err(invalid(
                    &self.id,
                    format!("template '{}' is pinned twice", pin.id),
                ));
            }
            let hash_ok = pin
                .content_hash
                .strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()));
            if !hash_ok {
                return Err(invalid(
                    &self.id,
                    format!(
                        "template '{}': content_hash must be 'sha256:' and 64 hex digits",
                        pin.id
                    ),
                ));
            }
        }
        for (index, site) in self.sites.iter().enumerate() {
            if self.sites[..index].contains(site) {
                return Err(invalid(&self.id, format!("site '{site}' is listed twice")));
            }
        }
        if let Some(privacy) = &self.differential_privacy
            && (privacy.epsilon_per_query.is_zero()
                || privacy.epsilon_per_query > privacy.total_epsilon)
        {
            return Err(invalid(
                &self.id,
                "differential_privacy: epsilon_per_query must be above 0 and at most total_epsilon",
            ));
        }
        if Study::from_canonical(&self.canonical_bytes()).is_err() {
            return Err(invalid(&self.id, "the study cannot be encoded canonically"));
        }
        Ok(())
    }

    /// True when `template` is pinned by this study exactly (id, version and content hash).
    pub fn pins(&self, template: &Template) -> bool {
        self.templates.contains(&PinnedTemplate::of(template))
    }

    /// True on the days the approval is in force.
    pub fn in_force_on(&self, day: NaiveDate) -> bool {
        self.validity()
            .is_ok_and(|(from, until)| from <= day && day <= until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const STUDY: &str = r#"
id = "elderly-trauma-2026"
title = "Outcomes of older trauma patients"
purpose = "To learn how many older people die after a serious injury, so hospitals can improve care."
lead_institution = "University Hospital A"
study_lead = "Dr. Lea Study"
ethics_reference = "EC-2026-117"
sites = ["site-a", "site-b"]
valid_from = "2026-01-01"
valid_until = "2026-12-31"
max_queries_per_day = 20

[[templates]]
id = "cohort-by-age-sex"
version = 1
content_hash = "sha256:05f903906d604d34f71f159293979848b6d64b71af05982970bc16994f9cb708"
"#;

    #[test]
    fn valid_study_checks_and_round_trips_canonically() {
        let study = Study::from_toml(STUDY, "s.toml").unwrap();
        study.check().unwrap();
        assert_eq!(
            Study::from_canonical(&study.canonical_bytes()).unwrap(),
            study
        );
        let day = |text: &str| parse_date(text).unwrap();
        assert!(study.in_force_on(day("2026-06-01")));
        assert!(!study.in_force_on(day("2027-01-01")));
        assert!(!study.in_force_on(day("2025-12-31")));
    }

    #[test]
    fn inconsistent_studies_are_refused_with_the_reason() {
        let cases = [
            (
                STUDY.replace("valid_from = \"2026-01-01\"", "valid_from = \"2027-01-01\""),
                "is after 'valid_until'",
            ),
            (
                STUDY.replace("max_queries_per_day = 20", "max_queries_per_day = 0"),
                "at least 1",
            ),
            (
                STUDY.replace("[\"site-a\", \"site-b\"]", "[\"site-a\", \"site-a\"]"),
                "listed twice",
            ),
            (STUDY.replace("sha256:05f9", "sha256:zz"), "64 hex digits"),
            (
                STUDY.replace(
                    "ethics_reference = \"EC-2026-117\"",
                    "ethics_reference = \" \"",
                ),
                "'ethics_reference' must not be empty",
            ),
        ];
        for (text, expected) in cases {
            let err = Study::from_toml(&text, "s.toml")
                .and_then(|study| study.check())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}
