//! One audit record and its line in the log: the record's fields, its canonical bytes, and its
//! hash. A line is `{"record":{…},"hash":"sha256:…"}` where the hash covers the record's
//! canonical JSON, which includes the previous record's hash — the chain. A line is valid only
//! if it is byte for byte the canonical encoding of what it parses to, so any edited byte shows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One record of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1 for the first record of the log, then consecutive.
    pub seq: u64,
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// Hash of record `seq - 1` ([`fedq_proto::audit_head::GENESIS_HASH`] for the first).
    pub prev: String,
    pub event: Event,
    /// 128 random bits (hex) known only to the log. The record's hash travels in every signed
    /// audit head, and a reader of an answer knows nearly every field of its record; without
    /// the salt, hashing guesses of the rest (the time, how the withheld cells split by
    /// reason) would find the one that matches. Records written before salts have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

/// A fresh salt for a record, from the operating system's secure generator (through `rand`'s
/// thread generator, a CSPRNG).
pub fn new_salt() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// What a record is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// One query request, answered or refused.
    Query(Box<QueryEvent>),
    /// The node created a new audit signing key (first start, or the old key file was lost).
    AuditKeyCreated { key_id: String },
    /// At start-up the node found an incomplete last line (the node stopped while writing it;
    /// its query was never answered) and discarded these bytes.
    TornTailDiscarded { segment: String, bytes: u64 },
}

/// The audit facts of one query request. Never a count of a withheld cell, never a data value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryEvent {
    pub request_id: String,
    /// The caller's certificate identity (or identities).
    pub caller: String,
    /// The study lead the coordinator named.
    pub requester: String,
    /// The study approval, when its signature verified.
    pub study: Option<DocumentRef>,
    /// For a request refused before its study verified: the study id it named (unverified).
    pub study_named: Option<String>,
    /// The template, when its signature verified.
    pub template: Option<TemplateRecord>,
    /// Parameter values as sent, as text (templates never touch identifier columns). Not
    /// recorded for callers the node does not accept.
    pub parameters: BTreeMap<String, String>,
    pub outcome: Outcome,
    /// For a refusal: the typed reason and the message sent to the coordinator.
    pub refusal: Option<Refusal>,
    /// The data snapshot the answer was computed from.
    pub snapshot_version: Option<String>,
    /// Differential privacy: the epsilon this query spent ("0" for a repeat of a paid query).
    pub epsilon_spent: Option<String>,
    pub cells_released: u64,
    /// Withheld cells per reason (per-cell reasons stay here, in the node's own log).
    pub cells_withheld: BTreeMap<String, u64>,
    pub total_withheld: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Released,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

/// A signed document by id and content hash (its canonical bytes are kept in the log's
/// documents folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentRef {
    pub id: String,
    pub content_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRecord {
    pub id: String,
    pub version: u32,
    pub content_hash: String,
}

/// A record as stored: the record and its hash.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    record: Record,
    hash: String,
}

/// `"sha256:<hex>"` of the record's canonical JSON.
pub fn hash_of(record: &Record) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(canonical(record))))
}

fn canonical(record: &Record) -> Vec<u8> {
    // Strings, integers, booleans and maps with string keys always serialise.
    serde_json::to_vec(record).expect("audit records serialise")
}

/// The record's line (with the trailing newline) and its hash.
pub fn encode(record: &Record) -> (Vec<u8>, String) {
    let hash = hash_of(record);
    let line = Line {
        record: record.clone(),
        hash,
    };
    let mut bytes = serde_json::to_vec(&line).expect("audit lines serialise");
    bytes.push(b'\n');
    (bytes, line.hash)
}

/// Why one line is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineProblem {
    /// Not a record at all, or not in canonical form: the line was edited.
    Damaged,
    /// A well-formed record whose content does not match its stored hash: the record was edited.
    HashMismatch { seq: u64 },
}

/// Parses one line (without its newline) and checks it against its own hash.
pub fn decode(line: &[u8]) -> Result<(Record, String), LineProblem> {
    let parsed: Line = serde_json::from_slice(line).map_err(|_| LineProblem::Damaged)?;
    let again = serde_json::to_vec(&parsed).map_err(|_| LineProblem::Damaged)?;
    // Also catches whitespace or escaping edits that parse to the same content.
    if again != line {
        return Err(LineProblem::Damaged);
    }
    if hash_of(&parsed.record) != parsed.hash {
        return Err(LineProblem::HashMismatch {
            seq: parsed.record.seq,
        });
    }
    Ok((parsed.record, parsed.hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            seq: 3,
            time: "2026-11-23T10:00:00.000Z".into(),
            prev: fedq_proto::audit_head::GENESIS_HASH.into(),
            event: Event::Query(Box::new(QueryEvent {
                request_id: "r-1".into(),
                caller: "coordinator.alliance".into(),
                requester: "Dr. Lea Study".into(),
                study: Some(DocumentRef {
                    id: "trauma-outcomes".into(),
                    content_hash: "sha256:ab".into(),
                }),
                study_named: None,
                template: None,
                parameters: BTreeMap::from([("min_age".into(), "65".into())]),
                outcome: Outcome::Released,
                refusal: None,
                snapshot_version: Some("sha256:cd".into()),
                epsilon_spent: None,
                cells_released: 10,
                cells_withheld: BTreeMap::from([("threshold".into(), 2)]),
                total_withheld: true,
            })),
            salt: Some("5a".repeat(16)),
        }
    }

    #[test]
    fn the_hash_covers_a_fresh_salt_so_a_known_content_does_not_give_it() {
        let (one, two) = (new_salt(), new_salt());
        assert_eq!(one.len(), 32);
        assert_ne!(one, two);
        let salted = |salt: &str| {
            let mut record = record();
            record.salt = Some(salt.to_string());
            hash_of(&record)
        };
        assert_ne!(salted(&one), salted(&two));
        let mut unsalted = record();
        unsalted.salt = None;
        assert_ne!(hash_of(&unsalted), salted(&one));
    }

    #[test]
    fn a_record_from_before_salts_still_decodes_and_a_null_salt_is_damage() {
        let mut unsalted = record();
        unsalted.salt = None;
        let (line, hash) = encode(&unsalted);
        let text = String::from_utf8(line).unwrap();
        assert!(!text.contains("salt"), "{text}");
        assert_eq!(
            decode(text.trim_end().as_bytes()),
            Ok((unsalted, hash.clone()))
        );
        let null = text
            .trim_end()
            .replace(r#"},"hash""#, r#","salt":null},"hash""#);
        assert!(null.contains(r#""salt":null}"#), "{null}");
        assert_eq!(decode(null.as_bytes()), Err(LineProblem::Damaged));
    }

    #[test]
    fn an_encoded_record_decodes_to_itself() {
        let (line, hash) = encode(&record());
        let (decoded, decoded_hash) = decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(decoded, record());
        assert_eq!(decoded_hash, hash);
    }

    #[test]
    fn a_changed_value_with_its_old_hash_is_a_hash_mismatch() {
        let (line, _) = encode(&record());
        let text = String::from_utf8(line).unwrap().replace("\"65\"", "\"66\"");
        assert_eq!(
            decode(text.trim_end().as_bytes()),
            Err(LineProblem::HashMismatch { seq: 3 })
        );
    }

    #[test]
    fn added_whitespace_is_damage_even_though_the_content_is_the_same() {
        let (line, _) = encode(&record());
        let text = String::from_utf8(line).unwrap().replacen(':', ": ", 1);
        assert_eq!(
            decode(text.trim_end().as_bytes()),
            Err(LineProblem::Damaged)
        );
    }
}
