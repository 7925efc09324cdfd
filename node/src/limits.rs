//! Each study's daily query limit, counted per UTC day at this node and kept in the node's
//! state directory, so a restart does not reset it. A request retried with the same request id
//! is not counted twice. The count is written durably (temporary file, fsync, rename) before
//! the query runs; if it cannot be written, the query is refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::NodeError;

const FILE_NAME: &str = "daily-queries.json";

/// Today's counted requests per study.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DayCounts {
    day: Option<NaiveDate>,
    /// Study id → request ids counted today.
    studies: BTreeMap<String, Vec<String>>,
}

/// The persistent daily counters of one node.
#[derive(Debug)]
pub struct DailyLimits {
    path: PathBuf,
    counts: Mutex<DayCounts>,
}

impl DailyLimits {
    /// Opens (or starts) the counters kept in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<DailyLimits, NodeError> {
        crate::records::create_private_dir(state_dir).map_err(|err| {
            NodeError::Config(vec![format!(
                "state_dir: cannot create {}: {err}",
                state_dir.display()
            )])
        })?;
        let path = state_dir.join(FILE_NAME);
        let counts = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|err| {
                NodeError::Config(vec![format!("cannot read {}: {err}", path.display())])
            })?;
            serde_json::from_str(&text).map_err(|err| {
                NodeError::Config(vec![format!(
                    "{} is damaged ({err}); restore it from a backup — deleting it would reset every study's daily count",
                    path.display()
                )])
            })?
        } else {
            DayCounts::default()
        };
        Ok(DailyLimits {
            path,
            counts: Mutex::new(counts),
        })
    }

    /// Counts `request_id` against `study`'s limit for `today`, durably. A request id already
    /// counted today passes again without counting; beyond the limit the query is refused.
    pub fn admit(
        &self,
        study: &str,
        limit: u32,
        request_id: &str,
        today: NaiveDate,
    ) -> Result<(), NodeError> {
        let mut counts = self.counts.lock().map_err(|_| NodeError::Engine)?;
        // The day never moves backwards (a clock stepped back, or a request that read the date
        // just before midnight): such a request counts against the latest day seen.
        let today = counts.day.map_or(today, |day| day.max(today));
        if counts.day != Some(today) {
            *counts = DayCounts {
                day: Some(today),
                studies: BTreeMap::new(),
            };
        }
        let seen = counts
            .studies
            .get(study)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if seen.iter().any(|id| id == request_id) {
            return Ok(());
        }
        if seen.len() >= limit as usize {
            return Err(NodeError::DailyLimitReached {
                study: study.to_string(),
                limit,
            });
        }
        let mut updated = counts.clone();
        updated
            .studies
            .entry(study.to_string())
            .or_default()
            .push(request_id.to_string());
        self.persist(&updated)?;
        *counts = updated;
        Ok(())
    }

    fn persist(&self, counts: &DayCounts) -> Result<(), NodeError> {
        let failed = |err: std::io::Error| {
            tracing::error!(path = %self.path.display(), error = %err, "cannot record the daily query count");
            NodeError::StateUnwritable
        };
        let temporary = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec(counts).map_err(|_| NodeError::Engine)?;
        let mut file = std::fs::File::create(&temporary).map_err(failed)?;
        file.write_all(&text).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        std::fs::rename(&temporary, &self.path).map_err(failed)?;
        if let Some(folder) = self.path.parent() {
            std::fs::File::open(folder)
                .and_then(|folder| folder.sync_all())
                .map_err(failed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn limit_is_enforced_retries_are_free_and_the_count_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DailyLimits::open(dir.path()).unwrap();
        let today = day("2026-11-23");
        limits.admit("s", 2, "q1", today).unwrap();
        limits.admit("s", 2, "q1", today).unwrap();
        limits.admit("s", 2, "q2", today).unwrap();
        let err = limits.admit("s", 2, "q3", today).unwrap_err().to_string();
        assert!(err.contains("daily limit of 2 queries"), "{err}");
        limits.admit("other", 1, "q3", today).unwrap();

        let reopened = DailyLimits::open(dir.path()).unwrap();
        assert!(reopened.admit("s", 2, "q4", today).is_err());
        reopened.admit("s", 2, "q2", today).unwrap();
        reopened.admit("s", 2, "q4", day("2026-11-24")).unwrap();
        // Going back to the previous day neither resets nor reopens it.
        reopened.admit("s", 2, "q5", day("2026-11-23")).unwrap();
        let err = reopened
            .admit("s", 2, "q6", day("2026-11-23"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("daily limit of 2"), "{err}");
    }

    #[test]
    fn damaged_state_file_stops_the_node_instead_of_resetting_counts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{ not json").unwrap();
        let err = DailyLimits::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is damaged") && err.contains("restore it from a backup"),
            "{err}"
        );
    }
}
