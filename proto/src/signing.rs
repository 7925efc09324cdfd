//! Expert keys and signatures (ed25519): key files, signing a document's canonical bytes, and
//! the one verification rule every node applies.
//!
//! A signature covers `kind || 0x00 || canonical bytes`, so a signature on a template can never
//! be replayed as a signature on another kind of document. Because the canonical bytes encode
//! the document's meaning, reformatting a TOML source keeps its signatures valid; changing any
//! value breaks them.
//!
//! Verification ([`TrustPolicy::verify`]): any invalid signature from a trusted key (tampering)
//! or any signature from a revoked key refuses the document; signatures from keys this site
//! does not know are ignored; the distinct trusted signers must reach the quorum.

use std::collections::BTreeSet;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::wire;

/// The only signature algorithm fedq accepts.
pub const ALGORITHM: &str = "ed25519";
const SECRET_KIND: &str = "fedq.expert-secret-key/1";
const PUBLIC_KIND: &str = "fedq.expert-public-key/1";

/// "ed25519:<first 16 hex digits of SHA-256 of the public key>".
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{ALGORITHM}:{}", &digest[..16])
}

fn message(kind: &str, canonical: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(kind.len() + 1 + canonical.len());
    message.extend_from_slice(kind.as_bytes());
    message.push(0);
    message.extend_from_slice(canonical);
    message
}

fn decode_hex<const N: usize>(text: &str, what: &str, origin: &str) -> Result<[u8; N], Error> {
    let bytes = hex::decode(text.trim())
        .map_err(|_| Error::Signing(format!("{origin}: {what} is not hexadecimal")))?;
    bytes
        .try_into()
        .map_err(|_| Error::Signing(format!("{origin}: {what} must be {N} bytes")))
}

/// Parses a key file. Errors never quote the file: a parser's snippet of a secret key file
/// would print the secret.
fn parse_key_file<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    kind: &str,
) -> Result<T, Error> {
    let table: toml::Table = toml::from_str(text)
        .map_err(|_| Error::Signing(format!("{origin} is not a readable key file (TOML)")))?;
    let found = table
        .get("kind")
        .and_then(toml::Value::as_str)
        .unwrap_or("(none)");
    if found != kind {
        let hint = if found == SECRET_KIND {
            "; it is a SECRET key: keep it private and use the matching .pub file here"
        } else {
            ""
        };
        return Err(Error::Signing(format!(
            "{origin} is a '{found}' file, expected '{kind}'{hint}"
        )));
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|_| Error::Signing(format!("{origin} is not a valid '{kind}' file")))
}

/// Most signatures one document may carry (the check is linear, but the list is untrusted).
pub const MAX_SIGNATURES: usize = 64;

/// An expert's private signing key. Its file must stay with the expert.
pub struct ExpertSecretKey {
    pub name: String,
    key: SigningKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretKeyFile {
    kind: String,
    name: String,
    secret_key: String,
}

/// An expert's public key as distributed to hospitals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub kind: String,
    pub name: String,
    pub key_id: String,
    pub public_key: String,
}

impl std::fmt::Debug for ExpertSecretKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertSecretKey")
            .field("name", &self.name)
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl ExpertSecretKey {
    /// A new key from the operating system's secure random source.
    pub fn generate(name: &str) -> ExpertSecretKey {
        let seed: [u8; 32] = rand::random();
        ExpertSecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn key_id(&self) -> String {
        key_id(&self.key.verifying_key())
    }

    /// The shareable public half.
    pub fn public(&self) -> PublicKeyFile {
        PublicKeyFile {
            kind: PUBLIC_KIND.into(),
            name: self.name.clone(),
            key_id: self.key_id(),
            public_key: hex::encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// The secret key file's text.
    pub fn to_toml(&self) -> String {
        let file = SecretKeyFile {
            kind: SECRET_KIND.into(),
            name: self.name.clone(),
            secret_key: hex::encode(self.key.to_bytes()),
        };
        // Plain strings always serialise.
        toml::to_string(&file).expect("key files serialise")
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<ExpertSecretKey, Error> {
        let file: SecretKeyFile = parse_key_file(text, origin, SECRET_KIND)?;
        if file.kind != SECRET_KIND {
            return Err(Error::Signing(format!(
                "{origin} is not a fedq expert secret key ({})",
                file.kind
            )));
        }
        let seed = decode_hex::<32>(&file.secret_key, "secret_key", origin)?;
        Ok(ExpertSecretKey {
            name: file.name,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Signs a document of `kind` with these canonical bytes.
    pub fn sign(&self, kind: &str, canonical: &[u8]) -> wire::Signature {
        wire::Signature {
            key_id: self.key_id(),
            algorithm: ALGORITHM.into(),
            signature: self.key.sign(&message(kind, canonical)).to_bytes().to_vec(),
        }
    }
}

impl PublicKeyFile {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("key files serialise")
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<PublicKeyFile, Error> {
        let file: PublicKeyFile = parse_key_file(text, origin, PUBLIC_KIND)?;
        if file.kind != PUBLIC_KIND {
            return Err(Error::Signing(format!(
                "{origin} is not a fedq expert public key ({})",
                file.kind
            )));
        }
        Ok(file)
    }

    /// The key, checked against its stated key id.
    pub fn trusted_key(&self, origin: &str) -> Result<TrustedKey, Error> {
        let bytes = decode_hex::<32>(&self.public_key, "public_key", origin)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| {
            Error::Signing(format!("{origin}: public_key is not a valid ed25519 key"))
        })?;
        if key_id(&key) != self.key_id {
            return Err(Error::Signing(format!(
                "{origin}: key_id {} does not match the public key (expected {})",
                self.key_id,
                key_id(&key)
            )));
        }
        Ok(TrustedKey {
            name: self.name.clone(),
            key_id: self.key_id.clone(),
            key,
        })
    }
}

/// Checks one signature against one public key given as hex (a node's audit key, which the
/// checker pins itself). Returns the key id on success.
pub fn verify_with_key(
    public_key_hex: &str,
    kind: &str,
    canonical: &[u8],
    signature: &wire::Signature,
) -> Result<String, Error> {
    let bytes = decode_hex::<32>(public_key_hex, "public_key", "signed document")?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| Error::Signing("public_key is not a valid ed25519 key".into()))?;
    let id = key_id(&key);
    let parsed = <[u8; 64]>::try_from(signature.signature.as_slice())
        .ok()
        .map(|bytes| ed25519_dalek::Signature::from_bytes(&bytes));
    let good = signature.algorithm == ALGORITHM
        && signature.key_id == id
        && parsed.is_some_and(|parsed| {
            key.verify_strict(&message(kind, canonical), &parsed)
                .is_ok()
        });
    if good {
        Ok(id)
    } else {
        Err(Error::Signing(format!(
            "the signature by key {id} does not match the signed content"
        )))
    }
}

/// A public key a site trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub name: String,
    pub key_id: String,
    pub key: VerifyingKey,
}

/// Which expert keys a site trusts, which are revoked, and how many must sign.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    pub trusted: Vec<TrustedKey>,
    pub revoked: BTreeSet<String>,
    pub quorum: usize,
}

/// Why a document's signatures are not enough. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error(
        "this site trusts no expert keys, so it runs nothing (deny by default); its administrator adds policy.trusted_expert_keys"
    )]
    NoTrustedKeys,
    #[error(
        "the signature of trusted key {key_id} does not match the document: it was changed after signing, or the signature is damaged; ask the experts to review and re-sign it"
    )]
    Invalid { key_id: String },
    #[error("the document carries {count} signatures; at most {MAX_SIGNATURES} are accepted")]
    TooMany { count: usize },
    #[error(
        "the document is signed with revoked key {key_id}; ask the experts to re-sign it with current keys"
    )]
    Revoked { key_id: String },
    #[error("signed by {valid} key(s) this site trusts, but it requires {quorum}{}", unknown_note(.unknown))]
    QuorumNotMet {
        valid: usize,
        quorum: usize,
        unknown: Vec<String>,
    },
}

fn unknown_note(unknown: &[String]) -> String {
    if unknown.is_empty() {
        String::new()
    } else {
        format!(
            " (signatures by keys this site does not trust were ignored: {})",
            unknown.join(", ")
        )
    }
}

impl TrustPolicy {
    /// Applies the verification rule; returns the key ids of the valid trusted signers.
    pub fn verify(
        &self,
        kind: &str,
        canonical: &[u8],
        signatures: &[wire::Signature],
    ) -> Result<Vec<String>, SignatureProblem> {
        if self.trusted.is_empty() || self.quorum == 0 {
            return Err(SignatureProblem::NoTrustedKeys);
        }
        if signatures.len() > MAX_SIGNATURES {
            return Err(SignatureProblem::TooMany {
                count: signatures.len(),
            });
        }
        let message = message(kind, canonical);
        let mut valid: Vec<String> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        for signature in signatures {
            if self.revoked.contains(&signature.key_id) {
                return Err(SignatureProblem::Revoked {
                    key_id: signature.key_id.clone(),
                });
            }
            let Some(trusted) = self
                .trusted
                .iter()
                .find(|key| key.key_id == signature.key_id)
            else {
                if !unknown.contains(&signature.key_id) {
                    unknown.push(signature.key_id.clone());
                }
                continue;
            };
            let parsed = <[u8; 64]>::try_from(signature.signature.as_slice())
                .ok()
                .map(|bytes| ed25519_dalek::Signature::from_bytes(&bytes));
            let good = signature.algorithm == ALGORITHM
                && parsed
                    .is_some_and(|parsed| trusted.key.verify_strict(&message, &parsed).is_ok());
            if !good {
                return Err(SignatureProblem::Invalid {
                    key_id: signature.key_id.clone(),
                });
            }
            if !valid.contains(&trusted.key_id) {
                valid.push(trusted.key_id.clone());
            }
        }
        if valid.len() < self.quorum {
            return Err(SignatureProblem::QuorumNotMet {
                valid: valid.len(),
                quorum: self.quorum,
                unknown,
            });
        }
        Ok(valid)
    }
}

/// The detached signatures file kept next to a signed document (`<name>.signatures.toml`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignaturesFile {
    #[serde(default)]
    pub signatures: Vec<SignatureEntry>,
}

/// One signature as stored in a signatures file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: String,
    /// The signer's name as given in their key (for people; not verified).
    pub signer: String,
    pub algorithm: String,
    pub signature: String,
}

impl SignaturesFile {
    pub fn from_toml(text: &str, origin: &str) -> Result<SignaturesFile, Error> {
        toml::from_str(text).map_err(|err| Error::Syntax {
            what: format!("signatures file {origin}"),
            message: err.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("signature files serialise")
    }

    /// Adds a signature, replacing an earlier one by the same key.
    pub fn add(&mut self, signer: &str, signature: &wire::Signature) {
        self.signatures
            .retain(|entry| entry.key_id != signature.key_id);
        self.signatures.push(SignatureEntry {
            key_id: signature.key_id.clone(),
            signer: signer.to_string(),
            algorithm: signature.algorithm.clone(),
            signature: hex::encode(&signature.signature),
        });
    }

    /// The signatures in wire form (an undecodable one becomes an empty, invalid signature).
    pub fn to_wire(&self) -> Vec<wire::Signature> {
        self.signatures
            .iter()
            .map(|entry| wire::Signature {
                key_id: entry.key_id.clone(),
                algorithm: entry.algorithm.clone(),
                signature: hex::decode(&entry.signature).unwrap_or_default(),
            })
            .collect()
    }
}

/// The signatures file that belongs to a document file: `x.toml` → `x.signatures.toml`.
pub fn signatures_path(document: &std::path::Path) -> std::path::PathBuf {
    let stem = document
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("document");
    document.with_file_name(format!("{stem}.signatures.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: &str = "fedq.template/1";

    fn policy(keys: &[&ExpertSecretKey], quorum: usize) -> TrustPolicy {
        TrustPolicy {
            trusted: keys
                .iter()
                .map(|key| key.public().trusted_key("test").unwrap())
                .collect(),
            revoked: BTreeSet::new(),
            quorum,
        }
    }

    #[test]
    fn quorum_of_valid_trusted_signatures_is_accepted() {
        let (a, b) = (
            ExpertSecretKey::generate("A"),
            ExpertSecretKey::generate("B"),
        );
        let signatures = [a.sign(KIND, b"doc"), b.sign(KIND, b"doc")];
        let signers = policy(&[&a, &b], 2)
            .verify(KIND, b"doc", &signatures)
            .unwrap();
        assert_eq!(signers.len(), 2);
    }

    #[test]
    fn one_changed_byte_is_refused_as_invalid() {
        let a = ExpertSecretKey::generate("A");
        let signatures = [a.sign(KIND, b"doc")];
        let err = policy(&[&a], 1)
            .verify(KIND, b"dog", &signatures)
            .unwrap_err();
        assert!(matches!(err, SignatureProblem::Invalid { .. }), "{err}");
    }

    #[test]
    fn signature_for_another_kind_does_not_verify() {
        let a = ExpertSecretKey::generate("A");
        let signatures = [a.sign("fedq.study/1", b"doc")];
        let err = policy(&[&a], 1)
            .verify(KIND, b"doc", &signatures)
            .unwrap_err();
        assert!(matches!(err, SignatureProblem::Invalid { .. }), "{err}");
    }

    #[test]
    fn same_key_twice_counts_once_and_unknown_keys_do_not_count() {
        let (a, stranger) = (
            ExpertSecretKey::generate("A"),
            ExpertSecretKey::generate("X"),
        );
        let signatures = [
            a.sign(KIND, b"doc"),
            a.sign(KIND, b"doc"),
            stranger.sign(KIND, b"doc"),
        ];
        let err = policy(&[&a], 2)
            .verify(KIND, b"doc", &signatures)
            .unwrap_err();
        assert_eq!(
            err,
            SignatureProblem::QuorumNotMet {
                valid: 1,
                quorum: 2,
                unknown: vec![stranger.key_id()]
            }
        );
    }

    #[test]
    fn revoked_key_refuses_even_when_quorum_is_met() {
        let (a, b) = (
            ExpertSecretKey::generate("A"),
            ExpertSecretKey::generate("B"),
        );
        let mut trust = policy(&[&a, &b], 1);
        trust.revoked.insert(b.key_id());
        let err = trust
            .verify(KIND, b"doc", &[a.sign(KIND, b"doc"), b.sign(KIND, b"doc")])
            .unwrap_err();
        assert_eq!(err, SignatureProblem::Revoked { key_id: b.key_id() });
    }

    #[test]
    fn no_trusted_keys_refuses_everything() {
        let a = ExpertSecretKey::generate("A");
        let err = TrustPolicy::default()
            .verify(KIND, b"doc", &[a.sign(KIND, b"doc")])
            .unwrap_err();
        assert_eq!(err, SignatureProblem::NoTrustedKeys);
    }

    #[test]
    fn secret_key_given_as_public_key_is_refused_without_printing_it() {
        let a = ExpertSecretKey::generate("A");
        let text = a.to_toml();
        let err = PublicKeyFile::from_toml(&text, "ada.key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("it is a SECRET key"), "{err}");
        let secret = text
            .lines()
            .find(|line| line.starts_with("secret_key"))
            .unwrap();
        let secret_hex = secret.split('"').nth(1).unwrap();
        assert!(!err.contains(secret_hex), "{err}");
        let broken = text.replace("secret_key = ", "secret_key = = ");
        let err = ExpertSecretKey::from_toml(&broken, "ada.key")
            .unwrap_err()
            .to_string();
        assert!(!err.contains(secret_hex), "{err}");
    }

    #[test]
    fn too_many_signatures_are_refused_before_any_is_checked() {
        let a = ExpertSecretKey::generate("A");
        let signatures = vec![a.sign(KIND, b"doc"); MAX_SIGNATURES + 1];
        let err = policy(&[&a], 1)
            .verify(KIND, b"doc", &signatures)
            .unwrap_err();
        assert_eq!(
            err,
            SignatureProblem::TooMany {
                count: MAX_SIGNATURES + 1
            }
        );
    }

    #[test]
    fn key_files_round_trip_and_a_wrong_key_id_is_caught() {
        let a = ExpertSecretKey::generate("Dr A");
        let again = ExpertSecretKey::from_toml(&a.to_toml(), "a.key").unwrap();
        assert_eq!(again.key_id(), a.key_id());
        let mut public = PublicKeyFile::from_toml(&a.public().to_toml(), "a.pub").unwrap();
        assert!(public.trusted_key("a.pub").is_ok());
        public.key_id = "ed25519:0000000000000000".into();
        let err = public.trusted_key("a.pub").unwrap_err().to_string();
        assert!(err.contains("does not match the public key"), "{err}");
    }
}
