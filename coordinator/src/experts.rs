//! The alliance expert's tools, all local (no coordinator needed): create a key pair, sign a
//! template file, verify a template's signatures against a set of public keys and a quorum.
//! Signatures go into the detached `<template>.signatures.toml` next to the template.

use std::path::{Path, PathBuf};

use fedq_proto::model::DataModel;
use fedq_proto::signing::{
    ExpertSecretKey, PublicKeyFile, SignaturesFile, TrustPolicy, signatures_path,
};
use fedq_proto::template::{self, Template};

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

/// Reads and checks a template file against the built-in data model.
fn checked_template(path: &Path) -> Result<Template, CoordinatorError> {
    let template = Template::from_toml(&read(path)?, &path.display().to_string())?;
    template.check(&DataModel::builtin(), &Default::default())?;
    Ok(template)
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

/// Signs the template at `template_path` with the secret key at `key_path`, adding (or
/// replacing) this key's signature in the template's signatures file. Returns that file.
pub fn sign_template(template_path: &Path, key_path: &Path) -> Result<PathBuf, CoordinatorError> {
    let template = checked_template(template_path)?;
    let key = ExpertSecretKey::from_toml(&read(key_path)?, &key_path.display().to_string())?;
    let signature = key.sign(template::DOCUMENT_KIND, &template.canonical_bytes());
    let mut signatures = signatures_of(template_path)?;
    signatures.add(&key.name, &signature);
    let path = signatures_path(template_path);
    std::fs::write(&path, signatures.to_toml()).map_err(|err| {
        CoordinatorError::Certificates(format!("cannot write {}: {err}", path.display()))
    })?;
    Ok(path)
}

/// Verifies a template's signatures as a node trusting `public_keys` with `quorum` would.
/// Returns the key ids of the valid trusted signers.
pub fn verify_template(
    template_path: &Path,
    public_keys: &[PathBuf],
    quorum: usize,
) -> Result<Vec<String>, CoordinatorError> {
    let template = checked_template(template_path)?;
    let mut trust = TrustPolicy {
        quorum,
        ..TrustPolicy::default()
    };
    for path in public_keys {
        let origin = path.display().to_string();
        trust
            .trusted
            .push(PublicKeyFile::from_toml(&read(path)?, &origin)?.trusted_key(&origin)?);
    }
    let signatures = signatures_of(template_path)?.to_wire();
    trust
        .verify(
            template::DOCUMENT_KIND,
            &template.canonical_bytes(),
            &signatures,
        )
        .map_err(|problem| {
            CoordinatorError::Client(format!("{}: {problem}", template_path.display()))
        })
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
        sign_template(&path, &a.secret).unwrap();
        sign_template(&path, &b.secret).unwrap();
        let keys = [a.public.clone(), b.public.clone()];
        assert_eq!(verify_template(&path, &keys, 2).unwrap().len(), 2);

        std::fs::write(
            &path,
            TEMPLATE.replace("version = 1\n", "version   = 1   # same\n"),
        )
        .unwrap();
        assert_eq!(verify_template(&path, &keys, 2).unwrap().len(), 2);

        std::fs::write(&path, TEMPLATE.replace("title = \"T\"", "title = \"U\"")).unwrap();
        let err = verify_template(&path, &keys, 2).unwrap_err().to_string();
        assert!(err.contains("does not match the document"), "{err}");
    }
}
