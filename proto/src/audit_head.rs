//! The signed head of a node's audit log: how many records the hash chain holds and the hash of
//! the last one, signed with the node's own audit key. Nodes attach a fresh head to every answer
//! and serve the latest on request; the coordinator keeps them, so an edited, truncated or
//! rewritten log no longer matches what was published.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::signing::{self, ExpertSecretKey};
use crate::wire;

/// Signatures on heads cover `HEAD_KIND || 0x00 || canonical JSON`.
pub const HEAD_KIND: &str = "fedq.audit-head/1";

/// The `prev` of the first record, and the head hash of an empty log.
pub const GENESIS_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What a head states, in the field order of its canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub site_id: String,
    /// Records in the log (the last record's sequence number).
    pub count: u64,
    /// Hash of record `count`.
    pub hash: String,
    /// RFC 3339 UTC.
    pub signed_at: String,
}

impl AuditHead {
    fn canonical_bytes(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(self).expect("audit heads serialise")
    }

    /// Signs the head with the node's audit key.
    pub fn sign(&self, key: &ExpertSecretKey) -> wire::SignedAuditHead {
        wire::SignedAuditHead {
            site_id: self.site_id.clone(),
            count: self.count,
            hash: self.hash.clone(),
            signed_at: self.signed_at.clone(),
            public_key: key.public().public_key,
            signature: Some(key.sign(HEAD_KIND, &self.canonical_bytes())),
        }
    }

    /// Checks a signed head against the key it names and returns the head and that key's id.
    /// Whether the key is the right one for the site is the caller's decision (the node knows
    /// its own key; the coordinator pins the first key a site presented).
    pub fn verify(signed: &wire::SignedAuditHead) -> Result<(AuditHead, String), Error> {
        let head = AuditHead {
            site_id: signed.site_id.clone(),
            count: signed.count,
            hash: signed.hash.clone(),
            signed_at: signed.signed_at.clone(),
        };
        let signature = signed
            .signature
            .as_ref()
            .ok_or_else(|| Error::Signing("the audit head carries no signature".into()))?;
        let key_id = signing::verify_with_key(
            &signed.public_key,
            HEAD_KIND,
            &head.canonical_bytes(),
            signature,
        )?;
        Ok((head, key_id))
    }
}

/// A signed head in the JSON form the coordinator exports (`fedq audit-heads --json`) and
/// `fedq-node audit verify --heads` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedHead {
    pub site_id: String,
    pub count: u64,
    pub hash: String,
    pub signed_at: String,
    pub public_key: String,
    pub key_id: String,
    /// Hex of the ed25519 signature.
    pub signature: String,
}

impl From<&wire::SignedAuditHead> for PublishedHead {
    fn from(signed: &wire::SignedAuditHead) -> PublishedHead {
        let signature = signed.signature.clone().unwrap_or_default();
        PublishedHead {
            site_id: signed.site_id.clone(),
            count: signed.count,
            hash: signed.hash.clone(),
            signed_at: signed.signed_at.clone(),
            public_key: signed.public_key.clone(),
            key_id: signature.key_id,
            signature: hex::encode(signature.signature),
        }
    }
}

impl TryFrom<&PublishedHead> for wire::SignedAuditHead {
    type Error = Error;

    fn try_from(head: &PublishedHead) -> Result<wire::SignedAuditHead, Error> {
        let signature = hex::decode(&head.signature).map_err(|_| {
            Error::Signing(format!(
                "the head of {} records signed at {} has a signature that is not hexadecimal",
                head.count, head.signed_at
            ))
        })?;
        Ok(wire::SignedAuditHead {
            site_id: head.site_id.clone(),
            count: head.count,
            hash: head.hash.clone(),
            signed_at: head.signed_at.clone(),
            public_key: head.public_key.clone(),
            signature: Some(wire::Signature {
                key_id: head.key_id.clone(),
                algorithm: signing::ALGORITHM.into(),
                signature,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> AuditHead {
        AuditHead {
            site_id: "north".into(),
            count: 7,
            hash: GENESIS_HASH.into(),
            signed_at: "2026-11-23T10:00:00Z".into(),
        }
    }

    #[test]
    fn a_signed_head_verifies_with_its_key() {
        let key = ExpertSecretKey::generate("north");
        let (verified, key_id) = AuditHead::verify(&head().sign(&key)).unwrap();
        assert_eq!(verified, head());
        assert_eq!(key_id, key.key_id());
    }

    #[test]
    fn a_head_with_a_changed_count_or_hash_does_not_verify() {
        let key = ExpertSecretKey::generate("north");
        let mut fewer = head().sign(&key);
        fewer.count = 6;
        assert!(AuditHead::verify(&fewer).is_err());
        let mut other_hash = head().sign(&key);
        other_hash.hash = format!("sha256:{}", "1".repeat(64));
        assert!(AuditHead::verify(&other_hash).is_err());
    }

    #[test]
    fn a_head_survives_its_published_json_form() {
        let key = ExpertSecretKey::generate("north");
        let signed = head().sign(&key);
        let published = PublishedHead::from(&signed);
        let text = serde_json::to_string(&published).unwrap();
        let back: PublishedHead = serde_json::from_str(&text).unwrap();
        let again = wire::SignedAuditHead::try_from(&back).unwrap();
        assert_eq!(again, signed);
        assert!(AuditHead::verify(&again).is_ok());
    }

    #[test]
    fn a_head_signed_by_another_key_than_it_names_does_not_verify() {
        let key = ExpertSecretKey::generate("north");
        let impostor = ExpertSecretKey::generate("impostor");
        let mut signed = head().sign(&impostor);
        signed.public_key = key.public().public_key;
        assert!(AuditHead::verify(&signed).is_err());
    }
}
