//! The signed-document envelope templates and study approvals travel in: the canonical bytes experts signed plus
//! their detached signatures. This module packs and unpacks it; deciding whether the
//! signatures are good enough is the receiving node's verification step.

use crate::Error;
use crate::study::{self, Study};
use crate::template::{self, Template};
use crate::wire;

/// Packs a template into its envelope with the given signatures.
pub fn template_document(
    template: &Template,
    signatures: Vec<wire::Signature>,
) -> wire::SignedDocument {
    wire::SignedDocument {
        kind: template::DOCUMENT_KIND.to_string(),
        canonical: template.canonical_bytes(),
        signatures,
    }
}

/// Unpacks a template from its envelope, refusing the wrong kind or non-canonical bytes.
pub fn open_template(document: &wire::SignedDocument) -> Result<Template, Error> {
    if document.kind != template::DOCUMENT_KIND {
        return Err(Error::Template {
            template: "(unreadable)".into(),
            code: crate::TemplateProblem::Malformed,
            message: format!(
                "expected a '{}' document, got '{}'",
                template::DOCUMENT_KIND,
                document.kind
            ),
        });
    }
    Template::from_canonical(&document.canonical)
}

/// Packs a study approval into its envelope with the given signatures.
pub fn study_document(study: &Study, signatures: Vec<wire::Signature>) -> wire::SignedDocument {
    wire::SignedDocument {
        kind: study::DOCUMENT_KIND.to_string(),
        canonical: study.canonical_bytes(),
        signatures,
    }
}

/// Unpacks and checks a study approval, refusing the wrong kind or non-canonical bytes.
pub fn open_study(document: &wire::SignedDocument) -> Result<Study, Error> {
    if document.kind != study::DOCUMENT_KIND {
        return Err(Error::Study {
            study: "(unreadable)".into(),
            message: format!(
                "expected a '{}' document, got '{}'",
                study::DOCUMENT_KIND,
                document.kind
            ),
        });
    }
    let study = Study::from_canonical(&document.canonical)?;
    study.check()?;
    Ok(study)
}
