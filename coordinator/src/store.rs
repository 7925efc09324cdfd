//! The coordinator's own records, in an embedded SQLite database (`<state_dir>/coordinator.sqlite`):
//! the signed audit heads each node published (with the audit key first seen for each site,
//! pinned), and the contribution ledger — which sites contributed how many records to released
//! cells of which study's results. Only values the study lead already received are recorded;
//! withheld cells contribute nothing to the ledger.

use std::path::Path;
use std::sync::Mutex;

use fedq_proto::audit_head::{AuditHead, PublishedHead};
use fedq_proto::wire;
use rusqlite::{Connection, OptionalExtension, params};

use crate::CoordinatorError;

/// File name of the database inside the state directory.
pub const DATABASE_FILE: &str = "coordinator.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_keys (
    site_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    pinned_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_heads (
    site_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    hash TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (site_id, count, hash)
);
CREATE TABLE IF NOT EXISTS superseded_heads (
    site_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    hash TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS site_holds (
    site_id TEXT PRIMARY KEY,
    since TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head_events (
    site_id TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    query_id TEXT NOT NULL,
    answered_at TEXT NOT NULL,
    study_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    template_version INTEGER NOT NULL,
    requester TEXT NOT NULL,
    site_id TEXT NOT NULL,
    cells_released INTEGER NOT NULL,
    records_contributed INTEGER NOT NULL,
    PRIMARY KEY (query_id, site_id)
);
";

/// What became of a head a node presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadOutcome {
    /// New head stored.
    Stored,
    /// Already known.
    Known,
    /// Stored, but the log is shorter than a head stored earlier: the node's log went back
    /// (restored from an older backup, or truncated).
    WentBack { before: u64 },
    /// Stored, but an earlier head gave another hash for the same record count: the log was
    /// rewritten (forked).
    Forked { count: u64 },
    /// Not stored: bad signature, another site's head, or not the pinned key.
    Rejected(String),
}

/// One site's contribution to one pooled result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    pub site_id: String,
    pub cells_released: u64,
    /// Sum of the site's released cells: the records it contributed to released cells.
    pub records_contributed: u64,
}

/// What one pooled result is, for the ledger.
#[derive(Debug, Clone)]
pub struct LedgerQuery<'a> {
    pub query_id: &'a str,
    pub study_id: &'a str,
    pub template_id: &'a str,
    pub template_version: u32,
    pub requester: &'a str,
}

/// The coordinator's database.
#[derive(Debug)]
pub struct Store {
    connection: Mutex<Connection>,
}

fn database_error(err: rusqlite::Error) -> CoordinatorError {
    CoordinatorError::State(err.to_string())
}

/// The audit key pinned for a site, read through a connection the caller already holds.
fn pinned_in(connection: &Connection, site_id: &str) -> Result<Option<String>, CoordinatorError> {
    connection
        .query_row(
            "SELECT key_id FROM audit_keys WHERE site_id = ?1",
            params![site_id],
            |row| row.get(0),
        )
        .optional()
        .map_err(database_error)
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Store {
    /// Opens (or creates) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, CoordinatorError> {
        std::fs::create_dir_all(state_dir).map_err(|err| {
            CoordinatorError::State(format!("cannot create {}: {err}", state_dir.display()))
        })?;
        let path = state_dir.join(DATABASE_FILE);
        let connection = Connection::open(&path).map_err(|err| {
            CoordinatorError::State(format!("cannot open {}: {err}", path.display()))
        })?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .and_then(|()| connection.execute_batch(SCHEMA))
            .map_err(|err| {
                CoordinatorError::State(format!("cannot prepare {}: {err}", path.display()))
            })?;
        Ok(Store {
            connection: Mutex::new(connection),
        })
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a head `site_id`'s node presented, after checking its signature, its site and
    /// its key against the key pinned for the site (the first one it presented).
    pub fn record_head(
        &self,
        site_id: &str,
        signed: &wire::SignedAuditHead,
    ) -> Result<HeadOutcome, CoordinatorError> {
        let outcome = self.judge_head(site_id, signed)?;
        if matches!(
            outcome,
            HeadOutcome::WentBack { .. } | HeadOutcome::Forked { .. }
        ) {
            self.connection()
                .execute(
                    "INSERT OR IGNORE INTO site_holds (site_id, since, reason) VALUES (?1, ?2, ?3)",
                    params![
                        site_id,
                        now_text(),
                        "its audit log went back or was rewritten (a restore from an older backup rolls back privacy budgets and overlap memory too)"
                    ],
                )
                .map_err(database_error)?;
        }
        let detail = match &outcome {
            HeadOutcome::Stored | HeadOutcome::Known => return Ok(outcome),
            HeadOutcome::WentBack { before } => format!(
                "the log went back: a head of {} records after one of {before} (restored from an older backup, or cut short)",
                signed.count
            ),
            HeadOutcome::Forked { count } => {
                format!("the log was rewritten: two different hashes for record #{count}")
            }
            HeadOutcome::Rejected(reason) => format!("head not kept: {reason}"),
        };
        self.connection()
            .execute(
                "INSERT INTO head_events (site_id, at, detail) VALUES (?1, ?2, ?3)",
                params![site_id, now_text(), detail],
            )
            .map_err(database_error)?;
        Ok(outcome)
    }

    fn judge_head(
        &self,
        site_id: &str,
        signed: &wire::SignedAuditHead,
    ) -> Result<HeadOutcome, CoordinatorError> {
        let (head, key_id) = match AuditHead::verify(signed) {
            Ok(verified) => verified,
            Err(err) => return Ok(HeadOutcome::Rejected(format!("bad signature: {err}"))),
        };
        if head.site_id != site_id {
            return Ok(HeadOutcome::Rejected(format!(
                "the head names site '{}'",
                head.site_id
            )));
        }
        let connection = self.connection();
        let pinned = pinned_in(&connection, site_id)?;
        match pinned {
            Some(pinned) if pinned != key_id => {
                return Ok(HeadOutcome::Rejected(format!(
                    "signed by audit key {key_id}, but the key pinned for this site is {pinned} (if the site's key was replaced on purpose, an administrator clears the pin: fedq audit-heads --site SITE --clear-pin)"
                )));
            }
            Some(_) => {}
            None => {
                connection
                    .execute(
                        "INSERT INTO audit_keys (site_id, key_id, public_key, pinned_at) VALUES (?1, ?2, ?3, ?4)",
                        params![site_id, key_id, signed.public_key, now_text()],
                    )
                    .map_err(database_error)?;
            }
        }
        let before: Option<i64> = connection
            .query_row(
                "SELECT MAX(count) FROM audit_heads WHERE site_id = ?1",
                params![site_id],
                |row| row.get(0),
            )
            .map_err(database_error)?;
        let other_hash: Option<String> = connection
            .query_row(
                "SELECT hash FROM audit_heads WHERE site_id = ?1 AND count = ?2 AND hash != ?3 LIMIT 1",
                params![site_id, head.count as i64, head.hash],
                |row| row.get(0),
            )
            .optional()
            .map_err(database_error)?;
        let published = PublishedHead::from(signed);
        let inserted = connection
            .execute(
                "INSERT OR IGNORE INTO audit_heads (site_id, count, hash, signed_at, public_key, key_id, signature, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    site_id,
                    head.count as i64,
                    head.hash,
                    head.signed_at,
                    published.public_key,
                    published.key_id,
                    published.signature,
                    now_text()
                ],
            )
            .map_err(database_error)?;
        Ok(match before {
            _ if inserted > 0 && other_hash.is_some() => HeadOutcome::Forked { count: head.count },
            Some(before) if (before as u64) > head.count && inserted > 0 => HeadOutcome::WentBack {
                before: before as u64,
            },
            _ if inserted == 0 => HeadOutcome::Known,
            _ => HeadOutcome::Stored,
        })
    }

    /// What went wrong with a site's heads, oldest first ("time: detail").
    pub fn head_events(&self, site_id: &str) -> Result<Vec<String>, CoordinatorError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare("SELECT at, detail FROM head_events WHERE site_id = ?1 ORDER BY rowid")
            .map_err(database_error)?;
        let rows = statement
            .query_map(params![site_id], |row| {
                Ok(format!(
                    "{}: {}",
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?
                ))
            })
            .map_err(database_error)?;
        rows.collect::<Result<_, _>>().map_err(database_error)
    }

    /// Why a site is held (not queried) until an administrator acknowledges, if it is.
    pub fn hold(&self, site_id: &str) -> Result<Option<String>, CoordinatorError> {
        self.connection()
            .query_row(
                "SELECT since, reason FROM site_holds WHERE site_id = ?1",
                params![site_id],
                |row| {
                    Ok(format!(
                        "since {}: {}",
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?
                    ))
                },
            )
            .optional()
            .map_err(database_error)
    }

    /// Lifts a site's hold, recording who did. The heads kept so far describe the history the
    /// site went back from: they are moved aside (kept as evidence, no longer exported) and the
    /// site's log is followed afresh from its next head.
    pub fn acknowledge(&self, site_id: &str, by: &str) -> Result<(), CoordinatorError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(database_error)?;
        let lifted = transaction
            .execute(
                "DELETE FROM site_holds WHERE site_id = ?1",
                params![site_id],
            )
            .map_err(database_error)?;
        if lifted > 0 {
            transaction
                .execute(
                    "INSERT INTO superseded_heads SELECT * FROM audit_heads WHERE site_id = ?1",
                    params![site_id],
                )
                .and_then(|_| {
                    transaction.execute(
                        "DELETE FROM audit_heads WHERE site_id = ?1",
                        params![site_id],
                    )
                })
                .map_err(database_error)?;
        }
        transaction.commit().map_err(database_error)?;
        if lifted > 0 {
            connection
                .execute(
                    "INSERT INTO head_events (site_id, at, detail) VALUES (?1, ?2, ?3)",
                    params![
                        site_id,
                        now_text(),
                        format!("hold lifted by {by}: the site is queried again")
                    ],
                )
                .map_err(database_error)?;
        }
        Ok(())
    }

    /// The audit key pinned for a site.
    pub fn pinned_key(&self, site_id: &str) -> Result<Option<String>, CoordinatorError> {
        pinned_in(&self.connection(), site_id)
    }

    /// Forgets the key pinned for a site (its next head pins a new one), recording who did.
    pub fn clear_pin(&self, site_id: &str, by: &str) -> Result<(), CoordinatorError> {
        let connection = self.connection();
        let pinned = pinned_in(&connection, site_id)?;
        connection
            .execute(
                "DELETE FROM audit_keys WHERE site_id = ?1",
                params![site_id],
            )
            .map_err(database_error)?;
        connection
            .execute(
                "INSERT INTO head_events (site_id, at, detail) VALUES (?1, ?2, ?3)",
                params![
                    site_id,
                    now_text(),
                    format!(
                        "pinned audit key {} cleared by {by}; the next head the site presents is pinned",
                        pinned.unwrap_or_else(|| "(none)".into())
                    )
                ],
            )
            .map_err(database_error)?;
        Ok(())
    }

    /// Every head kept for `site_id`, oldest count first.
    pub fn heads(&self, site_id: &str) -> Result<Vec<PublishedHead>, CoordinatorError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare(
                "SELECT count, hash, signed_at, public_key, key_id, signature FROM audit_heads
                 WHERE site_id = ?1 ORDER BY count, signed_at",
            )
            .map_err(database_error)?;
        let rows = statement
            .query_map(params![site_id], |row| {
                Ok(PublishedHead {
                    site_id: site_id.to_string(),
                    count: row.get::<_, i64>(0)? as u64,
                    hash: row.get(1)?,
                    signed_at: row.get(2)?,
                    public_key: row.get(3)?,
                    key_id: row.get(4)?,
                    signature: row.get(5)?,
                })
            })
            .map_err(database_error)?;
        rows.collect::<Result<_, _>>().map_err(database_error)
    }

    /// Records which sites contributed to one pooled result (sites with nothing released are
    /// left out).
    pub fn record_contributions(
        &self,
        query: &LedgerQuery<'_>,
        contributions: &[Contribution],
    ) -> Result<(), CoordinatorError> {
        let mut connection = self.connection();
        let transaction = connection.transaction().map_err(database_error)?;
        let answered_at = now_text();
        for contribution in contributions {
            transaction
                .execute(
                    "INSERT OR IGNORE INTO ledger (query_id, answered_at, study_id, template_id, template_version, requester, site_id, cells_released, records_contributed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        query.query_id,
                        answered_at,
                        query.study_id,
                        query.template_id,
                        query.template_version,
                        query.requester,
                        contribution.site_id,
                        contribution.cells_released as i64,
                        contribution.records_contributed as i64
                    ],
                )
                .map_err(database_error)?;
        }
        transaction.commit().map_err(database_error)
    }

    /// Per study and site: queries answered, cells released, records contributed, first and
    /// last query. `studies` limits the summary (None: every study).
    pub fn ledger(
        &self,
        studies: Option<&[String]>,
    ) -> Result<Vec<wire::LedgerEntry>, CoordinatorError> {
        let connection = self.connection();
        let mut statement = connection
            .prepare(
                "SELECT study_id, site_id, COUNT(DISTINCT query_id), SUM(cells_released), SUM(records_contributed),
                        MIN(answered_at), MAX(answered_at)
                 FROM ledger GROUP BY study_id, site_id ORDER BY study_id, site_id",
            )
            .map_err(database_error)?;
        let rows = statement
            .query_map([], |row| {
                Ok(wire::LedgerEntry {
                    study_id: row.get(0)?,
                    site_id: row.get(1)?,
                    queries_answered: row.get::<_, i64>(2)? as u64,
                    cells_released: row.get::<_, i64>(3)? as u64,
                    records_contributed: row.get::<_, i64>(4)? as u64,
                    first_query: row.get(5)?,
                    last_query: row.get(6)?,
                })
            })
            .map_err(database_error)?;
        let entries: Vec<wire::LedgerEntry> =
            rows.collect::<Result<_, _>>().map_err(database_error)?;
        Ok(entries
            .into_iter()
            .filter(|entry| studies.is_none_or(|studies| studies.contains(&entry.study_id)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_proto::signing::ExpertSecretKey;

    fn head(key: &ExpertSecretKey, site: &str, count: u64) -> wire::SignedAuditHead {
        AuditHead {
            site_id: site.into(),
            count,
            hash: format!("sha256:{count:064}"),
            signed_at: "2026-11-23T10:00:00.000Z".into(),
        }
        .sign(key)
    }

    #[test]
    fn the_first_key_is_pinned_and_another_key_is_rejected() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let key = ExpertSecretKey::generate("north");
        let other = ExpertSecretKey::generate("north");
        assert_eq!(
            store.record_head("north", &head(&key, "north", 3)).unwrap(),
            HeadOutcome::Stored
        );
        assert_eq!(
            store.record_head("north", &head(&key, "north", 3)).unwrap(),
            HeadOutcome::Known
        );
        assert!(matches!(
            store
                .record_head("north", &head(&other, "north", 4))
                .unwrap(),
            HeadOutcome::Rejected(_)
        ));
        assert!(matches!(
            store.record_head("south", &head(&key, "north", 5)).unwrap(),
            HeadOutcome::Rejected(_)
        ));
        assert_eq!(store.heads("north").unwrap().len(), 1);
    }

    #[test]
    fn two_hashes_for_one_count_are_a_fork_and_clearing_the_pin_accepts_a_new_key() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let key = ExpertSecretKey::generate("north");
        store.record_head("north", &head(&key, "north", 5)).unwrap();
        let mut rewritten = AuditHead {
            site_id: "north".into(),
            count: 5,
            hash: format!("sha256:{}", "f".repeat(64)),
            signed_at: "2026-11-23T11:00:00.000Z".into(),
        }
        .sign(&key);
        assert_eq!(
            store.record_head("north", &rewritten).unwrap(),
            HeadOutcome::Forked { count: 5 }
        );
        let new_key = ExpertSecretKey::generate("north");
        rewritten = head(&new_key, "north", 6);
        assert!(matches!(
            store.record_head("north", &rewritten).unwrap(),
            HeadOutcome::Rejected(_)
        ));
        store.clear_pin("north", "Admin").unwrap();
        assert_eq!(
            store.record_head("north", &rewritten).unwrap(),
            HeadOutcome::Stored
        );
        assert_eq!(store.pinned_key("north").unwrap(), Some(new_key.key_id()));
        let events = store.head_events("north").unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[0].contains("rewritten"));
        assert!(events[2].contains("cleared by Admin"));
    }

    #[test]
    fn a_log_that_went_back_holds_the_site_until_acknowledged_and_then_starts_afresh() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let key = ExpertSecretKey::generate("north");
        store.record_head("north", &head(&key, "north", 9)).unwrap();
        assert_eq!(store.hold("north").unwrap(), None);
        store.record_head("north", &head(&key, "north", 4)).unwrap();
        assert!(store.hold("north").unwrap().unwrap().contains("went back"));
        store.acknowledge("north", "Admin").unwrap();
        assert_eq!(store.hold("north").unwrap(), None);
        assert!(
            store.heads("north").unwrap().is_empty(),
            "old heads moved aside"
        );
        assert_eq!(
            store.record_head("north", &head(&key, "north", 5)).unwrap(),
            HeadOutcome::Stored
        );
        assert!(
            store
                .head_events("north")
                .unwrap()
                .iter()
                .any(|event| event.contains("hold lifted by Admin"))
        );
    }

    #[test]
    fn a_shorter_log_than_before_is_reported_as_going_back() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let key = ExpertSecretKey::generate("north");
        store.record_head("north", &head(&key, "north", 9)).unwrap();
        assert_eq!(
            store.record_head("north", &head(&key, "north", 4)).unwrap(),
            HeadOutcome::WentBack { before: 9 }
        );
    }

    #[test]
    fn the_ledger_sums_per_study_and_site_and_survives_reopening() {
        let state = tempfile::tempdir().unwrap();
        {
            let store = Store::open(state.path()).unwrap();
            for (query_id, records) in [("q1", 100), ("q2", 50)] {
                let query = LedgerQuery {
                    query_id,
                    study_id: "s1",
                    template_id: "t",
                    template_version: 1,
                    requester: "Dr. Lea Study",
                };
                store
                    .record_contributions(
                        &query,
                        &[Contribution {
                            site_id: "north".into(),
                            cells_released: 4,
                            records_contributed: records,
                        }],
                    )
                    .unwrap();
            }
        }
        let store = Store::open(state.path()).unwrap();
        let entries = store.ledger(None).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].queries_answered, 2);
        assert_eq!(entries[0].records_contributed, 150);
        assert_eq!(entries[0].cells_released, 8);
        assert!(store.ledger(Some(&["other".into()])).unwrap().is_empty());
    }
}
