//! The alliance expert's tools, all local (no coordinator needed): create a key pair, sign a
//! template or study file, verify its signatures against a set of public keys and a quorum.
//! Signatures go into the detached `<file>.signatures.toml` next to the document.

use std::path::{Path, PathBuf};

use fedq_proto::model::DataModel;
use fedq_proto::signing::{
    ExpertSecretKey, PublicKeyFile, SignaturesFile, TrustPolicy, signatures_path,
};
use fedq_proto::study::{self, Study};
use fedq_proto::template::{self, Template};
use fedq_proto::wire;

use crate::CoordinatorError;
use crate::certs::write_new;

/// Files written by [`generate_key`].
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    pub key_id: String,
    pub secret: PathBuf,
    pub public: PathBuf,
}

fn read(path: &Path) -> Result<String, CoordinatorError> {
    std::fs::read_to_string(path).map_err(|source| {
        CoordinatorError::Contract(fedq_proto::Error::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

/// Creates `<file_stem>.key` (readable by its owner only) and `<file_stem>.pub` in `out_dir`.
pub fn generate_key(
    name: &str,
    file_stem: &str,
    out_dir: &Path,
) -> Result<GeneratedKey, CoordinatorError> {
    std::fs::create_dir_all(out_dir).map_err(|err| {
        CoordinatorError::Certificates(format!("cannot create {}: {err}", out_dir.display()))
    })?;
    let key = ExpertSecretKey::generate(name);
    let secret = out_dir.join(format!("{file_stem}.key"));
    let public = out_dir.join(format!("{file_stem}.pub"));
    write_new(&secret, &key.to_toml(), true)?;
    write_new(&public, &key.public().to_toml(), false)?;
    Ok(GeneratedKey {
        key_id: key.key_id(),
        secret,
        public,
    })
}

/// The kinds of document experts sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Template,
    Study,
}

impl DocumentKind {
    pub fn kind(self) -> &'static str {
        match self {
            DocumentKind::Template => template::DOCUMENT_KIND,
            DocumentKind::Study => study::DOCUMENT_KIND,
        }
    }

    /// Reads and checks a document file; returns its canonical bytes.
    fn canonical(self, path: &Path) -> Result<Vec<u8>, CoordinatorError> {
        let text = read(path)?;
        let origin = path.display().to_string();
        Ok(match self {
            DocumentKind::Template => {
                let template = Template::from_toml(&text, &origin)?;
                template.check(&DataModel::builtin(), &Default::default())?;
                template.canonical_bytes()
            }
            DocumentKind::Study => {
                let study = Study::from_toml(&text, &origin)?;
                study.check()?;
                study.canonical_bytes()
            }
        })
    }
}

/// Lints a draft template: checks it against the common data model, then against what each
/// site describes (dataset held, every column it uses recorded there). Returns one line per
/// site; the error is the first problem of the template itself.
pub fn check_template(
    path: &Path,
    sites: &[wire::SiteEntry],
) -> Result<Vec<String>, CoordinatorError> {
    let canonical = DocumentKind::Template.canonical(path)?;
    let template = Template::from_canonical(&canonical)?;
    let columns = template.columns_used();
    Ok(sites
        .iter()
        .map(|site| {
            let Some(description) = &site.description else {
                return format!("{}: not checked ({})", site.site_id, site.error);
            };
            let Some(dataset) = description
                .datasets
                .iter()
                .find(|dataset| dataset.name == template.dataset)
            else {
                return format!(
                    "{}: does not hold dataset '{}'",
                    site.site_id, template.dataset
                );
            };
            let missing: Vec<&String> = columns
                .iter()
                .filter(|column| !dataset.columns.iter().any(|held| &held.name == *column))
                .collect();
            if missing.is_empty() {
                format!(
                    "{}: ok (holds every column the template uses)",
                    site.site_id
                )
            } else {
                format!(
                    "{}: does not record {}; it would refuse this template",
                    site.site_id,
                    missing
                        .iter()
                        .map(|column| format!("'{column}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        })
        .collect())
}

fn signatures_of(path: &Path) -> Result<SignaturesFile, CoordinatorError> {
    let signatures = signatures_path(path);
    if !signatures.is_file() {
        return Ok(SignaturesFile::default());
    }
    Ok(SignaturesFile::from_toml(
        &read(&signatures)?,
        &signatures.display().to_string(),
    )?)
}

/// Signs the document at `path` with the secret key at `key_path`, adding (or replacing) this
/// key's signature in the document's signatures file. Returns that file.
pub fn sign_file(
    path: &Path,
    kind: DocumentKind,
    key_path: &Path,
) -> Result<PathBuf, CoordinatorError> {
    let canonical = kind.canonical(path)?;
    let key = ExpertSecretKey::from_toml(&read(key_path)?, &key_path.display().to_string())?;
    let signature = key.sign(kind.kind(), &canonical);
    let mut signatures = signatures_of(path)?;
    signatures.add(&key.name, &signature);
    let signatures_file = signatures_path(path);
    std::fs::write(&signatures_file, signatures.to_toml()).map_err(|err| {
        CoordinatorError::Certificates(format!("cannot write {}: {err}", signatures_file.display()))
    })?;
    Ok(signatures_file)
}

/// Verifies a document's signatures as a node trusting `public_keys` with `quorum` would.
/// Returns the key ids of the valid trusted signers.
pub fn verify_file(
    path: &Path,
    kind: DocumentKind,
    public_keys: &[PathBuf],
    quorum: usize,
) -> Result<Vec<String>, CoordinatorError> {
    let canonical = kind.canonical(path)?;
    let mut trust = TrustPolicy {
        quorum,
        ..TrustPolicy::default()
    };
    for key_path in public_keys {
        let origin = key_path.display().to_string();
        trust
            .trusted
            .push(PublicKeyFile::from_toml(&read(key_path)?, &origin)?.trusted_key(&origin)?);
    }
    let signatures = signatures_of(path)?.to_wire();
    trust
        .verify(kind.kind(), &canonical, &signatures)
        .map_err(|problem| CoordinatorError::Client(format!("{}: {problem}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"
id = "t"
version = 1
title = "T"
description = "Count."
data_model = "fedq-trauma/1"
dataset = "trauma_admissions"
[statistic]
kind = "count"
[[strata]]
column = "sex"
"#;

    #[test]
    fn signed_template_verifies_after_reformatting_and_not_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, TEMPLATE).unwrap();
        let a = generate_key("Dr A", "a", dir.path()).unwrap();
        let b = generate_key("Dr B", "b", dir.path()).unwrap();
        sign_file(&path, DocumentKind::Template, &a.secret).unwrap();
        sign_file(&path, DocumentKind::Template, &b.secret).unwrap();
        let keys = [a.public.clone(), b.public.clone()];
        assert_eq!(
            verify_file(&path, DocumentKind::Template, &keys, 2)
                .unwrap()
                .len(),
            2
        );

        std::fs::write(
            &path,
            TEMPLATE.replace("version = 1\n", "version   = 1   # same\n"),
        )
        .unwrap();
        assert_eq!(
            verify_file(&path, DocumentKind::Template, &keys, 2)
                .unwrap()
                .len(),
            2
        );

        std::fs::write(&path, TEMPLATE.replace("title = \"T\"", "title = \"U\"")).unwrap();
        let err = verify_file(&path, DocumentKind::Template, &keys, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the document"), "{err}");
    }

    #[test]
    fn study_approval_is_checked_signed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let template_path = dir.path().join("t.toml");
        std::fs::write(&template_path, TEMPLATE).unwrap();
        let template = Template::from_toml(TEMPLATE, "t").unwrap();
        let pin = fedq_proto::study::PinnedTemplate::of(&template);
        let study = format!(
            r#"id = "s"
title = "S"
purpose = "To count admissions."
lead_institution = "Hospital A"
study_lead = "Dr. Lead"
ethics_reference = "EC-1"
sites = ["site-a"]
valid_from = "2026-01-01"
valid_until = "2026-12-31"
max_queries_per_day = 5
[[templates]]
id = "{}"
version = {}
content_hash = "{}"
"#,
            pin.id, pin.version, pin.content_hash
        );
        let path = dir.path().join("s.toml");
        std::fs::write(&path, &study).unwrap();
        let a = generate_key("Dr A", "a", dir.path()).unwrap();
        sign_file(&path, DocumentKind::Study, &a.secret).unwrap();
        assert_eq!(
            verify_file(
                &path,
                DocumentKind::Study,
                std::slice::from_ref(&a.public),
                1
            )
            .unwrap()
            .len(),
            1
        );
        // A study signature is not a template signature, even over the same key.
        let err = verify_file(
            &template_path,
            DocumentKind::Template,
            std::slice::from_ref(&a.public),
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("requires 1"), "{err}");

        std::fs::write(
            &path,
            study.replace("max_queries_per_day = 5", "max_queries_per_day = 0"),
        )
        .unwrap();
        let err = sign_file(&path, DocumentKind::Study, &a.secret)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn check_reports_sites_that_lack_a_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, TEMPLATE).unwrap();
        let site = |id: &str, columns: &[&str]| wire::SiteEntry {
            site_id: id.into(),
            description: Some(wire::SiteDescription {
                datasets: vec![wire::DatasetDescription {
                    name: "trauma_admissions".into(),
                    columns: columns
                        .iter()
                        .map(|name| wire::ColumnDescription {
                            name: name.to_string(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let lines = check_template(
            &path,
            &[site("site-a", &["sex", "age"]), site("site-b", &["age"])],
        )
        .unwrap();
        assert_eq!(
            lines[0],
            "site-a: ok (holds every column the template uses)"
        );
        assert_eq!(
            lines[1],
            "site-b: does not record 'sex'; it would refuse this template"
        );
    }
}
