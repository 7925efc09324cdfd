//! The signed-document envelope templates travel in: the canonical bytes experts signed plus
//! their detached signatures. This module packs and unpacks it; deciding whether the
//! signatures are good enough is the receiving node's verification step.

use crate::Error;
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
