//! Checking an audit log: every line is a canonical record matching its own hash, sequence
//! numbers run without gaps, each record names its predecessor's hash, and the log agrees with
//! every signed head the node published. Stops at the first bad record and names it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use fedq_proto::audit_head::{AuditHead, GENESIS_HASH};
use fedq_proto::wire;

use super::log::{read_segment, segments};
use super::record::{self, Event, LineProblem, Record};
use super::register::{STUDY_DOCUMENT, TEMPLATE_DOCUMENT};

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    pub segments: usize,
    /// First and last record present (0 and 0 for an empty log).
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// When earlier segments were archived: the hash the first present record builds on.
    pub anchored_at: Option<String>,
    /// Published heads checked against the log.
    pub heads_checked: usize,
    /// Published heads older than the first record present (their records are archived).
    pub heads_archived: usize,
}

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot read the audit log: {0}")]
    Unreadable(String),
    #[error(
        "{segment} line {line} (where record #{expected} belongs) is not a valid record: the line was edited or damaged"
    )]
    Damaged {
        segment: String,
        line: usize,
        expected: u64,
    },
    #[error(
        "record #{seq} ({segment} line {line}) was edited: its content does not match its hash"
    )]
    Edited {
        seq: u64,
        segment: String,
        line: usize,
    },
    #[error(
        "record #{expected} is missing ({segment} line {line} holds #{found} instead): records were deleted or reordered"
    )]
    Missing {
        expected: u64,
        found: u64,
        segment: String,
        line: usize,
    },
    #[error(
        "record #{found} ({segment} line {line}) appears where #{expected} belongs: records were reordered or duplicated"
    )]
    OutOfOrder {
        expected: u64,
        found: u64,
        segment: String,
        line: usize,
    },
    #[error(
        "record #{seq} ({segment} line {line}) does not follow record #{}: its link to the previous hash is broken (a record before it was edited, replaced or inserted)", .seq - 1
    )]
    ChainBroken {
        seq: u64,
        segment: String,
        line: usize,
    },
    #[error(
        "{segment} ends with an incomplete record ({bytes} bytes) after record #{last}: the log was cut mid-record (if the node is running, verify again; a stopped node discards it at its next start)"
    )]
    TornTail {
        segment: String,
        bytes: usize,
        last: u64,
    },
    #[error(
        "the head published at {signed_at} is signed by key {key_id}, which this log never used; it is not this node's head, or the audit key was replaced"
    )]
    UnknownHeadKey { key_id: String, signed_at: String },
    #[error("a published head does not carry a valid signature: {0}")]
    BadHeadSignature(String),
    #[error(
        "the log ends at record #{last} but the node published a head of {count} records at {signed_at}: {} removed (truncated)", removed(*.last, *.count)
    )]
    Truncated {
        last: u64,
        count: u64,
        signed_at: String,
    },
    #[error(
        "record #{count} is not the one the node published at {signed_at}: the log was rewritten from that record or before{hint}"
    )]
    Rewritten {
        count: u64,
        signed_at: String,
        hint: String,
    },
    #[error(
        "a published head names site '{named}', but this log is site '{site}''s: it is another node's head"
    )]
    OtherSite { named: String, site: String },
    #[error(
        "the log holds no records, but the node's audit key exists (every node records its key's creation first): the log was deleted or emptied"
    )]
    Wiped,
    #[error(
        "record #{seq} refers to {kind} {content_hash}, whose kept copy is missing from documents/: it was deleted"
    )]
    DocumentMissing {
        seq: u64,
        kind: &'static str,
        content_hash: String,
    },
    #[error(
        "the kept copy of {kind} {content_hash} (documents/) does not match its hash: it was edited"
    )]
    DocumentAltered {
        kind: &'static str,
        content_hash: String,
    },
}

fn removed(last: u64, count: u64) -> String {
    if count == last + 1 {
        format!("record #{count} was")
    } else {
        format!("records #{} to #{count} were", last + 1)
    }
}

/// Checks the kept copy of a document a record refers to, once per document.
fn check_document(
    audit_dir: &Path,
    checked: &mut BTreeSet<String>,
    seq: u64,
    kind: &'static str,
    content_hash: &str,
) -> Result<(), Problem> {
    if !checked.insert(format!("{kind}:{content_hash}")) {
        return Ok(());
    }
    let path = super::log::document_path(audit_dir, kind, content_hash);
    let bytes = std::fs::read(&path).map_err(|_| Problem::DocumentMissing {
        seq,
        kind,
        content_hash: content_hash.to_string(),
    })?;
    if fedq_proto::template::content_hash(&bytes) == content_hash {
        Ok(())
    } else {
        Err(Problem::DocumentAltered {
            kind,
            content_hash: content_hash.to_string(),
        })
    }
}

/// What the log is checked against: the node's current audit key (heads signed by it, or by
/// a key the log records creating, count as this node's; a key without any record means a
/// wiped log), its site, and the heads it published.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected<'a> {
    pub own_key_id: Option<&'a str>,
    pub site_id: Option<&'a str>,
    pub heads: &'a [wire::SignedAuditHead],
}

/// Verifies the log in `audit_dir` (its segments in order, and the documents its records
/// refer to), then the log against the published heads.
pub fn verify(audit_dir: &Path, expected: Expected<'_>) -> Result<Verified, Problem> {
    let Expected {
        own_key_id,
        site_id,
        heads,
    } = expected;
    let mut verified_heads = Vec::new();
    for signed in heads {
        let (head, key_id) =
            AuditHead::verify(signed).map_err(|err| Problem::BadHeadSignature(err.to_string()))?;
        if let Some(site) = site_id
            && head.site_id != site
        {
            return Err(Problem::OtherSite {
                named: head.site_id,
                site: site.to_string(),
            });
        }
        verified_heads.push((head, key_id));
    }
    let mut documents_checked = BTreeSet::new();
    let mut torn_at: Vec<u64> = Vec::new();
    let wanted: BTreeSet<u64> = verified_heads.iter().map(|(head, _)| head.count).collect();
    let mut hashes_at: BTreeMap<u64, String> = BTreeMap::new();
    let mut key_ids: BTreeSet<String> = own_key_id.map(str::to_string).into_iter().collect();

    let list = segments(audit_dir)
        .map_err(|err| Problem::Unreadable(format!("{}: {err}", audit_dir.display())))?;
    let mut first_seq = 0;
    let mut anchored_at = None;
    let mut last: Option<(u64, String)> = None;
    for segment in &list {
        let (lines, torn) = read_segment(&segment.path)
            .map_err(|err| Problem::Unreadable(format!("{}: {err}", segment.path.display())))?;
        for (index, line) in lines.iter().enumerate() {
            let line_number = index + 1;
            let expected = last.as_ref().map_or(segment.first_seq, |(seq, _)| seq + 1);
            let (record, hash) = record::decode(line).map_err(|problem| match problem {
                LineProblem::Damaged => Problem::Damaged {
                    segment: segment.name(),
                    line: line_number,
                    expected,
                },
                LineProblem::HashMismatch { seq } => Problem::Edited {
                    seq,
                    segment: segment.name(),
                    line: line_number,
                },
            })?;
            check_position(
                &record,
                expected,
                last.as_ref(),
                &segment.name(),
                line_number,
            )?;
            if last.is_none() {
                first_seq = record.seq;
                if record.seq != 1 {
                    anchored_at = Some(record.prev.clone());
                }
            }
            match &record.event {
                Event::AuditKeyCreated { key_id } => {
                    key_ids.insert(key_id.clone());
                }
                Event::TornTailDiscarded { .. } => torn_at.push(record.seq),
                Event::Query(query) => {
                    if let Some(study) = &query.study {
                        check_document(
                            audit_dir,
                            &mut documents_checked,
                            record.seq,
                            STUDY_DOCUMENT,
                            &study.content_hash,
                        )?;
                    }
                    if let Some(template) = &query.template {
                        check_document(
                            audit_dir,
                            &mut documents_checked,
                            record.seq,
                            TEMPLATE_DOCUMENT,
                            &template.content_hash,
                        )?;
                    }
                }
            }
            if wanted.contains(&record.seq) {
                hashes_at.insert(record.seq, hash.clone());
            }
            last = Some((record.seq, hash));
        }
        if torn > 0 {
            return Err(Problem::TornTail {
                segment: segment.name(),
                bytes: torn,
                last: last.as_ref().map_or(0, |(seq, _)| *seq),
            });
        }
    }
    if last.is_none() && own_key_id.is_some() {
        return Err(Problem::Wiped);
    }
    let (last_seq, last_hash) = last.unwrap_or((0, GENESIS_HASH.to_string()));
    let mut heads_archived = 0;
    for (head, key_id) in &verified_heads {
        if !key_ids.contains(key_id) {
            return Err(Problem::UnknownHeadKey {
                key_id: key_id.clone(),
                signed_at: head.signed_at.clone(),
            });
        }
        if head.count > last_seq {
            return Err(Problem::Truncated {
                last: last_seq,
                count: head.count,
                signed_at: head.signed_at.clone(),
            });
        }
        // The hash the log holds for record `head.count`: the genesis before record 1, the
        // anchor just before the first present record, or the record's own hash.
        let held = if head.count == 0 {
            Some(GENESIS_HASH.to_string())
        } else if head.count + 1 == first_seq {
            anchored_at.clone()
        } else if head.count < first_seq {
            heads_archived += 1;
            continue;
        } else {
            hashes_at.get(&head.count).cloned()
        };
        if held.as_deref() != Some(head.hash.as_str()) {
            let hint = if torn_at.iter().any(|seq| *seq <= head.count + 1) {
                " (the node cut an incomplete record at start-up, see its torn_tail_discarded record: the log was cut inside a record that had been answered)".to_string()
            } else {
                String::new()
            };
            return Err(Problem::Rewritten {
                count: head.count,
                signed_at: head.signed_at.clone(),
                hint,
            });
        }
    }
    Ok(Verified {
        segments: list.len(),
        first_seq,
        last_seq,
        last_hash,
        anchored_at,
        heads_checked: verified_heads.len() - heads_archived,
        heads_archived,
    })
}

/// The record must carry the expected sequence number and link to the previous record.
fn check_position(
    record: &Record,
    expected: u64,
    previous: Option<&(u64, String)>,
    segment: &str,
    line: usize,
) -> Result<(), Problem> {
    if record.seq > expected {
        return Err(Problem::Missing {
            expected,
            found: record.seq,
            segment: segment.to_string(),
            line,
        });
    }
    if record.seq < expected {
        return Err(Problem::OutOfOrder {
            expected,
            found: record.seq,
            segment: segment.to_string(),
            line,
        });
    }
    let linked = match previous {
        Some((_, hash)) => record.prev == *hash,
        // The first record present: the genesis for record 1; otherwise an archived
        // segment's last hash, which is reported as the anchor.
        None => record.seq != 1 || record.prev == GENESIS_HASH,
    };
    if linked {
        Ok(())
    } else {
        Err(Problem::ChainBroken {
            seq: record.seq,
            segment: segment.to_string(),
            line,
        })
    }
}

/// Every record in the log, in order (for reports; use [`verify`] to check the chain).
pub fn records(audit_dir: &Path) -> Result<Vec<Record>, Problem> {
    let list = segments(audit_dir)
        .map_err(|err| Problem::Unreadable(format!("{}: {err}", audit_dir.display())))?;
    let mut all = Vec::new();
    for segment in &list {
        let (lines, _) = read_segment(&segment.path)
            .map_err(|err| Problem::Unreadable(format!("{}: {err}", segment.path.display())))?;
        for (index, line) in lines.iter().enumerate() {
            let (record, _) = record::decode(line).map_err(|_| Problem::Damaged {
                segment: segment.name(),
                line: index + 1,
                expected: all
                    .last()
                    .map_or(segment.first_seq, |last: &Record| last.seq + 1),
            })?;
            all.push(record);
        }
    }
    Ok(all)
}
