//! The alliance's catalogue: approved templates and study approvals, every `*.toml` file in
//! their configured folders (with the experts' signatures from `<name>.signatures.toml`),
//! parsed and checked at start-up — templates against the common data model. Nodes verify the
//! signatures; the coordinator only carries them. A broken file stops the coordinator with the
//! file name and the line of the problem.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fedq_proto::model::DataModel;
use fedq_proto::signing::{SignaturesFile, signatures_path};
use fedq_proto::study::Study;
use fedq_proto::template::Template;
use fedq_proto::wire;

use crate::CoordinatorError;

/// A document from the catalogue and the signatures that travel with it.
#[derive(Debug, Clone)]
pub struct Signed<T> {
    pub document: T,
    pub source: PathBuf,
    pub signatures: Vec<wire::Signature>,
}

/// An approved template.
pub type CatalogueEntry = Signed<Template>;

/// All approved templates and studies, each sorted by id.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub data_model: DataModel,
    entries: Vec<CatalogueEntry>,
    studies: Vec<Signed<Study>>,
}

impl Catalogue {
    /// Loads and checks every template file in `templates` and study file in `studies`.
    pub fn load(
        templates: &Path,
        studies: &Path,
        data_model: DataModel,
    ) -> Result<Catalogue, CoordinatorError> {
        let mut problems = Vec::new();
        let entries = load_folder(
            templates,
            "template",
            |text, origin| {
                let template = Template::from_toml(text, origin)?;
                template.check(&data_model, &BTreeSet::new())?;
                Ok(template)
            },
            |template| &template.id,
            &mut problems,
        );
        let studies = load_folder(
            studies,
            "study",
            |text, origin| {
                let study = Study::from_toml(text, origin)?;
                study.check()?;
                Ok(study)
            },
            |study| &study.id,
            &mut problems,
        );
        if !problems.is_empty() {
            return Err(CoordinatorError::Catalogue(problems));
        }
        Ok(Catalogue {
            data_model,
            entries,
            studies,
        })
    }

    pub fn entries(&self) -> &[CatalogueEntry] {
        &self.entries
    }

    pub fn studies(&self) -> &[Signed<Study>] {
        &self.studies
    }

    pub fn get(&self, id: &str) -> Result<&CatalogueEntry, CoordinatorError> {
        self.entries
            .iter()
            .find(|entry| entry.document.id == id)
            .ok_or_else(|| CoordinatorError::UnknownTemplate(id.to_string()))
    }

    pub fn study(&self, id: &str) -> Result<&Signed<Study>, CoordinatorError> {
        self.studies
            .iter()
            .find(|entry| entry.document.id == id)
            .ok_or_else(|| CoordinatorError::UnknownStudy(id.to_string()))
    }
}

/// Every document file in `folder` (not its signatures files), sorted by id; problems are
/// collected, one line per file.
fn load_folder<T>(
    folder: &Path,
    what: &str,
    parse: impl Fn(&str, &str) -> Result<T, fedq_proto::Error>,
    id: impl Fn(&T) -> &String,
    problems: &mut Vec<String>,
) -> Vec<Signed<T>> {
    let listing = match std::fs::read_dir(folder) {
        Ok(listing) => listing,
        Err(err) => {
            problems.push(format!("cannot list {}: {err}", folder.display()));
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = listing
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "toml")
        })
        .filter(|path| !path.to_string_lossy().ends_with(".signatures.toml"))
        .collect();
    paths.sort();
    let mut loaded: Vec<Signed<T>> = Vec::new();
    for path in paths {
        let origin = path.display().to_string();
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| fedq_proto::Error::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let document = read(&path).and_then(|text| parse(&text, &origin));
        let signatures_file = signatures_path(&path);
        let signatures = if signatures_file.is_file() {
            read(&signatures_file)
                .and_then(|text| {
                    SignaturesFile::from_toml(&text, &signatures_file.display().to_string())
                })
                .map(|file| file.to_wire())
        } else {
            Ok(Vec::new())
        };
        match (document, signatures) {
            (Ok(document), Ok(signatures)) => {
                if let Some(earlier) = loaded
                    .iter()
                    .find(|entry| id(&entry.document) == id(&document))
                {
                    problems.push(format!(
                        "{origin}: {what} id '{}' is already used by {}",
                        id(&document),
                        earlier.source.display()
                    ));
                    continue;
                }
                loaded.push(Signed {
                    document,
                    source: path,
                    signatures,
                });
            }
            (Err(err), _) | (_, Err(err)) => problems.push(format!("{origin}: {err}")),
        }
    }
    loaded.sort_by(|left, right| id(&left.document).cmp(id(&right.document)));
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_template_file_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.toml"), "id = \"x\"\nversion = \n").unwrap();
        let err = Catalogue::load(dir.path(), dir.path(), DataModel::builtin())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    }
}
