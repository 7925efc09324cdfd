//! Tests of the audit log on real files: concurrent appends, recovery, segments, and each kind
//! of tampering the verifier must name.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::log::{AuditLog, DEFAULT_SEGMENT_BYTES, segments};
use super::record::{self, Event, Outcome, QueryEvent, Record};
use super::verify::{Expected, Problem, verify};

fn query(request_id: &str) -> Event {
    Event::Query(Box::new(QueryEvent {
        request_id: request_id.into(),
        caller: "coordinator.alliance".into(),
        requester: "Dr. Lea Study".into(),
        study: None,
        study_named: None,
        template: None,
        parameters: BTreeMap::from([("min_age".into(), "65".into())]),
        outcome: Outcome::Released,
        refusal: None,
        snapshot_version: None,
        epsilon_spent: None,
        cells_released: 4,
        cells_withheld: BTreeMap::new(),
        total_withheld: false,
    }))
}

/// A log of `count` query records (plus the key-creation record #1).
fn log_with(state: &Path, count: usize) -> AuditLog {
    let log = AuditLog::open(state, "north", DEFAULT_SEGMENT_BYTES).unwrap();
    for index in 0..count {
        log.append(query(&format!("r{index}"))).unwrap();
    }
    log
}

fn only_segment(state: &Path) -> std::path::PathBuf {
    let found = segments(&state.join("audit")).unwrap();
    assert_eq!(found.len(), 1);
    found[0].path.clone()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn check(
    state: &Path,
    log: &AuditLog,
    heads: &[fedq_proto::wire::SignedAuditHead],
) -> Result<u64, Problem> {
    let key_id = log.key_id();
    verify(
        &state.join("audit"),
        Expected {
            own_key_id: Some(&key_id),
            site_id: Some("north"),
            heads,
        },
    )
    .map(|verified| verified.last_seq)
}

/// A log of `count` query records whose segment was then changed by `edit` (its lines).
fn tampered(count: usize, edit: impl FnOnce(&mut Vec<String>)) -> (tempfile::TempDir, AuditLog) {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), count);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    edit(&mut all);
    write_lines(&path, &all);
    (state, log)
}

#[test]
fn concurrent_appends_each_get_one_record_and_the_chain_verifies() {
    let state = tempfile::tempdir().unwrap();
    let log = Arc::new(log_with(state.path(), 0));
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for index in 0..125 {
                    log.append(query(&format!("t{thread}-{index}"))).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // Record #1 notes the new audit key; then 1,000 query records.
    assert_eq!(check(state.path(), &log, &[]), Ok(1001));
    let records = super::verify::records(&state.path().join("audit")).unwrap();
    let queries = records
        .iter()
        .filter(|record| matches!(record.event, Event::Query(_)))
        .count();
    assert_eq!(queries, 1000);
}

#[test]
fn each_answer_head_covers_its_own_record_and_verifies() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 2);
    let head = log.append(query("last")).unwrap();
    assert_eq!(head.count, 4);
    assert_eq!(check(state.path(), &log, &[head]), Ok(4));
}

#[test]
fn an_edited_byte_in_a_middle_record_is_named() {
    let (state, log) = tampered(5, |all| all[3] = all[3].replacen("\"65\"", "\"66\"", 1));
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::Edited {
            seq: 4,
            line: 4,
            ..
        })
    ));
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_link_of_the_next_record() {
    let (state, log) = tampered(5, |all| {
        let (mut edited, _) = record::decode(all[2].as_bytes()).unwrap();
        edited.time = "2020-01-01T00:00:00.000Z".into();
        let (line, _) = record::encode(&edited);
        all[2] = String::from_utf8(line).unwrap().trim_end().to_string();
    });
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::ChainBroken { seq: 4, .. })
    ));
}

#[test]
fn a_deleted_record_is_detected() {
    let (state, log) = tampered(5, |all| {
        all.remove(2);
    });
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::Missing {
            expected: 3,
            found: 4,
            ..
        })
    ));
}

#[test]
fn swapped_records_are_detected() {
    let (state, log) = tampered(5, |all| all.swap(2, 3));
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::Missing {
            expected: 3,
            found: 4,
            ..
        })
    ));
}

#[test]
fn an_inserted_blank_line_is_damage() {
    let (state, log) = tampered(3, |all| all.insert(2, String::new()));
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::Damaged {
            line: 3,
            expected: 3,
            ..
        })
    ));
}

#[test]
fn a_truncated_tail_is_detected_against_a_published_head() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 5);
    let head = log.head();
    let path = only_segment(state.path());
    let mut all = lines(&path);
    all.truncate(4);
    write_lines(&path, &all);
    // Alone, a shorter chain is still a valid chain…
    assert_eq!(check(state.path(), &log, &[]), Ok(4));
    // …but not against what the node published.
    assert!(matches!(
        check(state.path(), &log, &[head]),
        Err(Problem::Truncated {
            last: 4,
            count: 6,
            ..
        })
    ));
}

#[test]
fn a_log_rewritten_from_its_start_is_detected_against_a_published_head() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 3);
    let head = log.head();
    let path = only_segment(state.path());
    // Rebuild a consistent chain with one parameter value changed.
    let mut previous = fedq_proto::audit_head::GENESIS_HASH.to_string();
    let mut rebuilt = Vec::new();
    for line in lines(&path) {
        let (mut record, _): (Record, String) = record::decode(line.as_bytes()).unwrap();
        record.prev = previous.clone();
        if let Event::Query(query) = &mut record.event {
            query.parameters.insert("min_age".into(), "18".into());
        }
        let (bytes, hash) = record::encode(&record);
        previous = hash;
        rebuilt.push(String::from_utf8(bytes).unwrap().trim_end().to_string());
    }
    write_lines(&path, &rebuilt);
    assert_eq!(check(state.path(), &log, &[]), Ok(4));
    assert!(matches!(
        check(state.path(), &log, &[head]),
        Err(Problem::Rewritten { count: 4, .. })
    ));
}

#[test]
fn a_head_signed_by_another_node_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 2);
    let stranger = log_with(other.path(), 2);
    assert!(matches!(
        check(state.path(), &log, &[stranger.head()]),
        Err(Problem::UnknownHeadKey { .. })
    ));
}

#[test]
fn an_incomplete_last_line_is_reported_then_discarded_and_recorded_at_restart() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 2);
    let path = only_segment(state.path());
    drop(log);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"record\":{\"seq\":4,");
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        verify(&state.path().join("audit"), Expected::default()),
        Err(Problem::TornTail {
            bytes: 19,
            last: 3,
            ..
        })
    ));
    let reopened = AuditLog::open(state.path(), "north", DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(check(state.path(), &reopened, &[]), Ok(4));
    let records = super::verify::records(&state.path().join("audit")).unwrap();
    assert!(matches!(
        &records[3].event,
        Event::TornTailDiscarded { bytes: 19, .. }
    ));
    // The chain continues after the recovery record.
    assert_eq!(reopened.append(query("after")).unwrap().count, 5);
}

#[test]
fn segments_chain_across_files_and_archiving_old_ones_keeps_the_rest_verifiable() {
    let state = tempfile::tempdir().unwrap();
    let log = AuditLog::open(state.path(), "north", 4096).unwrap();
    for index in 0..60 {
        log.append(query(&format!("r{index}"))).unwrap();
    }
    let found = segments(&state.path().join("audit")).unwrap();
    assert!(found.len() >= 4, "{} segments", found.len());
    assert_eq!(check(state.path(), &log, &[]), Ok(61));
    std::fs::remove_file(&found[0].path).unwrap();
    let verified = verify(&state.path().join("audit"), Expected::default()).unwrap();
    assert_eq!(verified.first_seq, found[1].first_seq);
    assert!(verified.anchored_at.is_some());
    // Removing a middle segment is a gap, not an archive.
    std::fs::remove_file(&found[2].path).unwrap();
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::Missing { .. })
    ));
}

#[test]
fn a_restarted_log_continues_the_same_chain_with_the_same_key() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 2);
    let key_id = log.key_id();
    let head = log.head();
    drop(log);
    let reopened = AuditLog::open(state.path(), "north", DEFAULT_SEGMENT_BYTES).unwrap();
    assert_eq!(reopened.key_id(), key_id);
    assert_eq!(reopened.append(query("again")).unwrap().count, 4);
    assert_eq!(check(state.path(), &reopened, &[head]), Ok(4));
}

#[test]
fn a_second_writer_on_the_same_state_directory_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let _log = log_with(state.path(), 1);
    let second = AuditLog::open(state.path(), "north", DEFAULT_SEGMENT_BYTES).unwrap_err();
    assert!(
        second.to_string().contains("another fedq-node process"),
        "{second}"
    );
}

#[test]
fn an_emptied_log_with_its_key_still_present_is_detected() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 3);
    let path = only_segment(state.path());
    std::fs::write(&path, "").unwrap();
    assert_eq!(check(state.path(), &log, &[]), Err(Problem::Wiped));
}

/// A log with one query record that refers to a kept study document.
fn log_with_document(state: &Path) -> (AuditLog, std::path::PathBuf) {
    let log = log_with(state, 0);
    let canonical = b"{\"id\":\"s1\"}";
    let content_hash = fedq_proto::template::content_hash(canonical);
    log.keep_document("study", &content_hash, canonical)
        .unwrap();
    let Event::Query(mut event) = query("with-study") else {
        unreachable!("query() makes a query event")
    };
    event.study = Some(super::record::DocumentRef {
        id: "s1".into(),
        content_hash: content_hash.clone(),
    });
    log.append(Event::Query(event)).unwrap();
    let path = super::log::document_path(&state.join("audit"), "study", &content_hash);
    (log, path)
}

#[test]
fn an_edited_or_deleted_kept_document_is_detected() {
    let state = tempfile::tempdir().unwrap();
    let (log, document) = log_with_document(state.path());
    assert_eq!(check(state.path(), &log, &[]), Ok(2));
    std::fs::write(&document, b"{\"id\":\"forged\"}").unwrap();
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::DocumentAltered { .. })
    ));
    std::fs::remove_file(&document).unwrap();
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::DocumentMissing { seq: 2, .. })
    ));
}

#[test]
fn a_head_naming_another_site_or_a_false_empty_log_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 2);
    let key = fedq_proto::signing::ExpertSecretKey::from_toml(
        &std::fs::read_to_string(state.path().join(super::log::KEY_FILE)).unwrap(),
        "key",
    )
    .unwrap();
    let head = |site: &str, count: u64, hash: &str| {
        fedq_proto::audit_head::AuditHead {
            site_id: site.into(),
            count,
            hash: hash.into(),
            signed_at: "2026-11-23T10:00:00.000Z".into(),
        }
        .sign(&key)
    };
    assert!(matches!(
        check(state.path(), &log, &[head("south", 3, "sha256:x")]),
        Err(Problem::OtherSite { .. })
    ));
    assert!(matches!(
        check(state.path(), &log, &[head("north", 0, "sha256:forged")]),
        Err(Problem::Rewritten { count: 0, .. })
    ));
    let genesis = fedq_proto::audit_head::GENESIS_HASH;
    assert_eq!(
        check(state.path(), &log, &[head("north", 0, genesis)]),
        Ok(3)
    );
}

#[test]
fn the_cut_bytes_of_an_incomplete_record_are_kept_as_evidence() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 1);
    let path = only_segment(state.path());
    drop(log);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"record\":");
    std::fs::write(&path, &bytes).unwrap();
    let _reopened = AuditLog::open(state.path(), "north", DEFAULT_SEGMENT_BYTES).unwrap();
    let evidence: Vec<_> = std::fs::read_dir(state.path().join("audit"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().contains(".discarded-"))
        .collect();
    assert_eq!(evidence.len(), 1);
    assert_eq!(std::fs::read(&evidence[0]).unwrap(), b"{\"record\":");
}

#[test]
fn only_segment_names_the_writer_makes_are_read() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 1);
    for stray in [
        "audit-000000000000.jsonl",
        "audit-+1.jsonl",
        "audit-1.jsonl",
    ] {
        std::fs::write(state.path().join("audit").join(stray), "junk\n").unwrap();
    }
    assert_eq!(segments(&state.path().join("audit")).unwrap().len(), 1);
    assert_eq!(check(state.path(), &log, &[]), Ok(2));
}
