//! The alliance's catalogue of approved templates: every `*.toml` file in the configured
//! folder (with its experts' signatures from `<name>.signatures.toml`), parsed and checked
//! against the common data model at start-up. Nodes verify the signatures; the coordinator
//! only carries them. A broken file stops
//! the coordinator with the file name and the line of the problem.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fedq_proto::model::DataModel;
use fedq_proto::signing::{SignaturesFile, signatures_path};
use fedq_proto::template::Template;
use fedq_proto::wire;

use crate::CoordinatorError;

/// One approved template and the signatures that travel with it.
#[derive(Debug, Clone)]
pub struct CatalogueEntry {
    pub template: Template,
    pub source: PathBuf,
    pub signatures: Vec<wire::Signature>,
}

/// All approved templates, sorted by id.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub data_model: DataModel,
    entries: Vec<CatalogueEntry>,
}

impl Catalogue {
    /// Loads and checks every template file in `folder`.
    pub fn load(folder: &Path, data_model: DataModel) -> Result<Catalogue, CoordinatorError> {
        let listing = std::fs::read_dir(folder).map_err(|err| {
            CoordinatorError::Catalogue(vec![format!("cannot list {}: {err}", folder.display())])
        })?;
        let mut paths: Vec<PathBuf> = listing
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "toml")
            })
            .filter(|path| !path.to_string_lossy().ends_with(".signatures.toml"))
            .collect();
        paths.sort();
        let mut problems = Vec::new();
        let mut entries: Vec<CatalogueEntry> = Vec::new();
        for path in paths {
            match load_one(&path, &data_model) {
                Ok((template, signatures)) => {
                    if let Some(earlier) = entries
                        .iter()
                        .find(|entry| entry.template.id == template.id)
                    {
                        problems.push(format!(
                            "{}: template id '{}' is already used by {}",
                            path.display(),
                            template.id,
                            earlier.source.display()
                        ));
                        continue;
                    }
                    entries.push(CatalogueEntry {
                        template,
                        source: path,
                        signatures,
                    });
                }
                Err(err) => problems.push(format!("{}: {err}", path.display())),
            }
        }
        if !problems.is_empty() {
            return Err(CoordinatorError::Catalogue(problems));
        }
        entries.sort_by(|left, right| left.template.id.cmp(&right.template.id));
        Ok(Catalogue {
            data_model,
            entries,
        })
    }

    pub fn entries(&self) -> &[CatalogueEntry] {
        &self.entries
    }

    pub fn get(&self, id: &str) -> Result<&CatalogueEntry, CoordinatorError> {
        self.entries
            .iter()
            .find(|entry| entry.template.id == id)
            .ok_or_else(|| CoordinatorError::UnknownTemplate(id.to_string()))
    }
}

/// A template file and its signatures file (`<name>.signatures.toml`, if present).
fn load_one(
    path: &Path,
    model: &DataModel,
) -> Result<(Template, Vec<wire::Signature>), fedq_proto::Error> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| fedq_proto::Error::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let template = Template::from_toml(&read(path)?, &path.display().to_string())?;
    template.check(model, &BTreeSet::new())?;
    let signatures_path = signatures_path(path);
    let signatures = if signatures_path.is_file() {
        SignaturesFile::from_toml(
            &read(&signatures_path)?,
            &signatures_path.display().to_string(),
        )?
        .to_wire()
    } else {
        Vec::new()
    };
    Ok((template, signatures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_template_file_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.toml"), "id = \"x\"\nversion = \n").unwrap();
        let err = Catalogue::load(dir.path(), DataModel::builtin())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    }
}
