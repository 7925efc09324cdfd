//! Tests of the audit log on real files: concurrent appends, recovery, segments, and each kind
//! of tampering the verifier must name.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::log::{AuditLog, DEFAULT_SEGMENT_BYTES, segments};
use super::record::{self, Event, Outcome, QueryEvent, Record};
use super::verify::{Problem, verify};

fn query(request_id: &str) -> Event {
    Event::Query(Box::new(QueryEvent {
        request_id: request_id.into(),
        caller: "coordinator.alliance".into(),
        requester: "Dr. Lea Study".into(),
        study: None,
        template: None,
        parameters: BTreeMap::from([("min_age".into(), "65".into())]),
        outcome: Outcome::Released,
        refusal: None,
        snapshot_version: None,
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
    verify(&state.join("audit"), Some(&log.key_id()), heads).map(|verified| verified.last_seq)
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
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 5);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    all[3] = all[3].replacen("\"65\"", "\"66\"", 1);
    write_lines(&path, &all);
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
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 5);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    let (mut edited, _) = record::decode(all[2].as_bytes()).unwrap();
    edited.time = "2020-01-01T00:00:00.000Z".into();
    let (line, _) = record::encode(&edited);
    all[2] = String::from_utf8(line).unwrap().trim_end().to_string();
    write_lines(&path, &all);
    assert!(matches!(
        check(state.path(), &log, &[]),
        Err(Problem::ChainBroken { seq: 4, .. })
    ));
}

#[test]
fn a_deleted_record_is_detected() {
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 5);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    all.remove(2);
    write_lines(&path, &all);
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
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 5);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    all.swap(2, 3);
    write_lines(&path, &all);
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
    let state = tempfile::tempdir().unwrap();
    let log = log_with(state.path(), 3);
    let path = only_segment(state.path());
    let mut all = lines(&path);
    all.insert(2, String::new());
    write_lines(&path, &all);
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
        verify(&state.path().join("audit"), None, &[]),
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
    let verified = verify(&state.path().join("audit"), Some(&log.key_id()), &[]).unwrap();
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
