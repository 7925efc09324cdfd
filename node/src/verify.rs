//! Verification before any data is touched: is the caller an accepted coordinator, and is the
//! template document signed by a quorum of expert keys this site trusts (none revoked, none
//! tampered)? Signatures are checked on the raw canonical bytes before they are decoded.

use std::collections::BTreeSet;

use fedq_proto::signing::TrustPolicy;
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
}
