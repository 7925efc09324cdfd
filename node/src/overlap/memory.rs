//! The overlap memory's durable part: the released record sets of one node, appended to
//! `state_dir/overlap/released-sets.bin` as entries of `[u32 length][SHA-256 of the
//! bitmap][bitmap]`, each answer's new sets (after a zero-length entry marking where the
//! answer starts) fsynced before its reply, with each study's share of the bound in
//! `study-shares.json`. Opening replays the file into a [`SetIndex`], which derives again the
//! differences of nested pairs, so they need no room in the file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;
use sha2::{Digest, Sha256};

use super::index::{Exploration, SetIndex};
use crate::records::OVERLAP_DIR;

const SETS_FILE: &str = "released-sets.bin";
const SHARES_FILE: &str = "study-shares.json";
/// Entry header: payload length and its SHA-256.
const HEADER_BYTES: usize = 4 + 32;

/// Why the overlap memory cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlapError {
    #[error("the overlap memory is full ({used_mb} MiB of {limit_mb} MiB)")]
    Full { used_mb: u64, limit_mb: u64 },
    #[error("cannot write the overlap memory: {0}")]
    Write(String),
    #[error(
        "study '{study}' has used its share of the overlap memory ({used_mb} of {share_mb} MiB)"
    )]
    StudyShare {
        study: String,
        used_mb: u64,
        share_mb: u64,
    },
}

/// What the memory says about releasing a set.
#[derive(Debug)]
pub struct Assessment {
    /// It would reveal 1 to k-1 records by subtraction.
    pub too_close: bool,
    /// What it would make derivable, to remember without searching again.
    exploration: Option<Exploration>,
}

/// A set to remember, with what its check found it makes derivable (when it was checked).
#[derive(Debug)]
pub struct Release {
    pub records: RoaringBitmap,
    exploration: Option<Exploration>,
}

impl From<RoaringBitmap> for Release {
    fn from(records: RoaringBitmap) -> Release {
        Release {
            records,
            exploration: None,
        }
    }
}

impl Assessment {
    /// `records` (the set assessed) to remember, with what the assessment found they make
    /// derivable (only once: a second release of the same set is explored again).
    pub fn release(&mut self, records: RoaringBitmap) -> Release {
        Release {
            records,
            exploration: self.exploration.take(),
        }
    }

    /// About an empty set: nothing to reveal.
    pub fn nothing() -> Assessment {
        Assessment {
            too_close: false,
            exploration: None,
        }
    }

    /// The counts the release would make derivable and that were followed.
    pub fn derived(&self) -> impl Iterator<Item = &RoaringBitmap> {
        self.exploration.iter().flat_map(Exploration::derived)
    }

    /// The sizes of the counts the release would make derivable but that were not followed,
    /// numbered (their records from [`OverlapMemory::unfollowed`]).
    pub fn unfollowed_sizes(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.exploration
            .iter()
            .flat_map(Exploration::unfollowed_sizes)
    }
}

/// The remembered released record sets of one node, and the counts derived from them.
#[derive(Debug)]
pub struct OverlapMemory {
    path: PathBuf,
    index: SetIndex,
    /// Released sets remembered (the index also holds derived counts).
    released: usize,
    /// Released sets that made more counts derivable than are followed.
    cut: usize,
    bytes: u64,
    limit: u64,
    /// Bytes added per study (kept in `study-shares.json`).
    by_study: BTreeMap<String, u64>,
}

fn fingerprint(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

impl OverlapMemory {
    /// Opens the memory in `state_dir`, bounded by `limit` bytes. An incomplete last entry
    /// (a node that stopped while writing it, before replying) is cut off; a damaged entry
    /// elsewhere stops the node, since forgetting released sets would weaken protection.
    pub fn open(state_dir: &Path, limit: u64) -> Result<OverlapMemory, String> {
        let dir = state_dir.join(OVERLAP_DIR);
        std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        let path = dir.join(SETS_FILE);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)
                .and_then(|mut file| file.read_to_end(&mut bytes))
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
        let shares_path = dir.join(SHARES_FILE);
        let by_study = if shares_path.exists() {
            let text = std::fs::read_to_string(&shares_path)
                .map_err(|err| format!("{}: {err}", shares_path.display()))?;
            serde_json::from_str(&text).map_err(|err| {
                format!(
                    "{} is damaged ({err}); restore it from the node's backup",
                    shares_path.display()
                )
            })?
        } else {
            BTreeMap::new()
        };
        let mut memory = OverlapMemory {
            path: path.clone(),
            index: SetIndex::default(),
            released: 0,
            cut: 0,
            bytes: 0,
            limit,
            by_study,
        };
        let mut at = 0;
        // Where the current answer's sets start; entries written before answers were marked
        // count as answers of one set each.
        let mut answer_start = None;
        while at + HEADER_BYTES <= bytes.len() {
            let length =
                u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let end = at + HEADER_BYTES + length;
            if end > bytes.len() {
                break;
            }
            let payload = &bytes[at + HEADER_BYTES..end];
            let damaged = || {
                format!(
                    "{} is damaged at byte {at}; restore the node's state directory from a backup (deleting the file would forget every released set and weaken overlap control)",
                    path.display()
                )
            };
            if fingerprint(payload) != bytes[at + 4..at + HEADER_BYTES] {
                return Err(damaged());
            }
            if payload.is_empty() {
                answer_start = Some(memory.index.len());
            } else {
                let set = RoaringBitmap::deserialize_from(payload).map_err(|_| damaged())?;
                let start = answer_start.unwrap_or(memory.index.len());
                memory.insert(set.into(), length as u64, start);
            }
            at = end;
        }
        if at < bytes.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|file| {
                    file.set_len(at as u64)?;
                    file.sync_all()
                })
                .map_err(|err| format!("{}: {err}", path.display()))?;
        }
        Ok(memory)
    }

    fn insert(&mut self, release: Release, size: u64, answer_start: usize) {
        let cut = self
            .index
            .insert(release.records, answer_start, release.exploration);
        self.released += 1;
        self.cut += usize::from(cut);
        self.bytes += size;
    }

    /// Released sets remembered.
    pub fn len(&self) -> usize {
        self.released
    }

    pub fn is_empty(&self) -> bool {
        self.released == 0
    }

    /// Counts derived from nested released sets (kept in memory, derived again on opening).
    pub fn derived(&self) -> usize {
        self.index.len() - self.released
    }

    /// Bytes the remembered sets take (serialised).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Released sets that made more counts derivable than the node follows (16): chains
    /// through the others are not tracked (PRIVACY.md, "What is guaranteed, exactly").
    pub fn cut(&self) -> usize {
        self.cut
    }

    /// Whether releasing `set` would reveal 1 to k-1 records by subtraction: it differs by
    /// that many from a remembered count (released or derived), or subtracting it from a
    /// nested remembered set would give a count that does.
    pub fn too_close(&self, set: &RoaringBitmap, k: u32) -> bool {
        self.assess(set, k).too_close
    }

    /// [`OverlapMemory::too_close`], keeping what the release would make derivable (to
    /// compare with the answer's other values, and to remember without searching again).
    pub fn assess(&self, set: &RoaringBitmap, k: u32) -> Assessment {
        self.assess_knowing_keys(set, k, None)
    }

    /// [`OverlapMemory::assess`], given the keys among `set`'s records when they are known
    /// ([`OverlapMemory::keys_in`]; a union of disjoint sets has their keys together).
    pub fn assess_knowing_keys(
        &self,
        set: &RoaringBitmap,
        k: u32,
        keys: Option<&[u32]>,
    ) -> Assessment {
        let reach = u64::from(k.saturating_sub(1));
        let exploration = self.index.explore(set, self.index.len(), Some(reach), keys);
        Assessment {
            too_close: exploration.hazard,
            exploration: Some(exploration),
        }
    }

    /// The records of `set` that are keys of remembered counts (the index searches the
    /// counts inside a set through them).
    pub fn keys_in(&self, set: &RoaringBitmap) -> Vec<u32> {
        self.index.keys_in(set)
    }

    /// The records of unfollowed count number `number` of `assessment`.
    pub fn unfollowed(&self, assessment: &Assessment, number: usize) -> RoaringBitmap {
        assessment
            .exploration
            .as_ref()
            .map(|exploration| self.index.unfollowed(exploration, number))
            .unwrap_or_default()
    }

    /// Whether `outer` minus `inner` differs from a known (released or derived) count by 1
    /// to k-1 records, supposing `inner` lies inside `outer` (the difference is not made).
    pub fn near_difference(&self, outer: &RoaringBitmap, inner: &RoaringBitmap, k: u32) -> bool {
        self.index
            .close_to_difference(outer, inner, u64::from(k.saturating_sub(1)))
    }

    /// Whether some known count has `size` records give or take k-1.
    pub fn has_count_near(&self, size: u64, k: u32) -> bool {
        self.index
            .has_size_near(size, u64::from(k.saturating_sub(1)))
    }

    /// Whether a reader already knows `set`'s count exactly: it was released or derived.
    pub fn known(&self, set: &RoaringBitmap) -> bool {
        self.index.holds(set)
    }

    /// Remembers `sets` durably (one append and fsync), skipping empty sets and sets already
    /// remembered. Refuses, writing nothing, when they would pass the bound.
    pub fn remember(&mut self, sets: Vec<impl Into<Release>>) -> Result<(), OverlapError> {
        self.remember_for(None, sets)
    }

    /// Like [`OverlapMemory::remember`], charging the new bytes to `study`, which may take at
    /// most `share` of the memory's bound (so one study cannot fill the memory for all).
    pub fn remember_for_study(
        &mut self,
        study: &str,
        share: u64,
        sets: Vec<impl Into<Release>>,
    ) -> Result<(), OverlapError> {
        self.remember_for(Some((study, share)), sets)
    }

    fn remember_for(
        &mut self,
        study: Option<(&str, u64)>,
        sets: Vec<impl Into<Release>>,
    ) -> Result<(), OverlapError> {
        // The answer's sets follow a zero-length entry marking where it starts.
        let mut entries = Vec::from(&(0u32).to_le_bytes()[..]);
        entries.extend_from_slice(&fingerprint(&[]));
        let mut fresh: Vec<(Release, u64)> = Vec::new();
        let mut added = 0u64;
        for release in sets {
            let release: Release = release.into();
            let set = &release.records;
            // Known sets (a repeated query) cost one comparison, no serialisation.
            if set.is_empty()
                || self.index.released(set)
                || fresh.iter().any(|(seen, _)| seen.records == *set)
            {
                continue;
            }
            let mut payload = Vec::with_capacity(set.serialized_size());
            set.serialize_into(&mut payload)
                .map_err(|err| OverlapError::Write(err.to_string()))?;
            entries.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            entries.extend_from_slice(&fingerprint(&payload));
            entries.extend_from_slice(&payload);
            added += payload.len() as u64;
            fresh.push((release, payload.len() as u64));
        }
        if fresh.is_empty() {
            return Ok(());
        }
        if self.bytes + added > self.limit {
            return Err(OverlapError::Full {
                used_mb: self.bytes.div_ceil(1024 * 1024),
                limit_mb: self.limit / (1024 * 1024),
            });
        }
        if let Some((study, share)) = study {
            let used = self.by_study.get(study).copied().unwrap_or(0);
            if used + added > share {
                return Err(OverlapError::StudyShare {
                    study: study.to_string(),
                    used_mb: used.div_ceil(1024 * 1024),
                    share_mb: share / (1024 * 1024),
                });
            }
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut file| {
                file.write_all(&entries)?;
                file.sync_data()
            })
            .map_err(|err| OverlapError::Write(format!("{}: {err}", self.path.display())))?;
        let answer_start = self.index.len();
        for (release, size) in fresh {
            self.insert(release, size, answer_start);
        }
        if let Some((study, _)) = study {
            *self.by_study.entry(study.to_string()).or_insert(0) += added;
            self.write_shares()?;
        }
        Ok(())
    }

    /// Keeps each study's share durably (temporary file, fsync, rename).
    fn write_shares(&self) -> Result<(), OverlapError> {
        let path = self.path.with_file_name(SHARES_FILE);
        let temporary = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&self.by_study)
            .map_err(|err| OverlapError::Write(err.to_string()))?;
        File::create(&temporary)
            .and_then(|mut file| {
                file.write_all(&text)?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|err| OverlapError::Write(format!("{}: {err}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(range: std::ops::Range<u32>) -> RoaringBitmap {
        range.collect()
    }

    #[test]
    fn a_set_one_to_k_minus_one_records_away_is_too_close_and_others_are_not() {
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        memory.remember(vec![set(0..100)]).unwrap();
        assert!(memory.too_close(&set(0..99), 10));
        assert!(memory.too_close(&set(1..101), 10), "two records differ");
        assert!(memory.too_close(&set(0..109), 10));
        assert!(
            !memory.too_close(&set(0..100), 10),
            "the same set again is fine"
        );
        assert!(
            !memory.too_close(&set(0..110), 10),
            "k records apart is fine"
        );
        assert!(!memory.too_close(&set(50..150), 10));
    }

    #[test]
    fn remembered_sets_survive_reopening_and_a_cut_entry_is_dropped() {
        let state = tempfile::tempdir().unwrap();
        {
            let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
            memory
                .remember(vec![set(0..100), set(0..100), set(5..500)])
                .unwrap();
            assert_eq!(memory.len(), 2, "identical sets are kept once");
        }
        let path = state.path().join(OVERLAP_DIR).join(SETS_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[7, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert_eq!(memory.len(), 2);
        assert!(memory.too_close(&set(0..101), 10));
    }

    #[test]
    fn a_damaged_entry_stops_the_node_instead_of_forgetting() {
        let state = tempfile::tempdir().unwrap();
        {
            let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
            memory.remember(vec![set(0..100)]).unwrap();
        }
        let path = state.path().join(OVERLAP_DIR).join(SETS_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = OverlapMemory::open(state.path(), 1 << 30).unwrap_err();
        assert!(err.contains("is damaged"), "{err}");
    }

    #[test]
    fn beyond_its_bound_the_memory_refuses_and_writes_nothing() {
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 64).unwrap();
        let err = memory.remember(vec![set(0..100_000)]).unwrap_err();
        assert!(matches!(err, OverlapError::Full { .. }));
        assert!(memory.is_empty());
    }

    #[test]
    fn one_study_cannot_take_more_than_its_share_and_shares_survive_reopening() {
        let state = tempfile::tempdir().unwrap();
        let share = 4096;
        {
            let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
            memory
                .remember_for_study("greedy", share, vec![set(0..1000)])
                .unwrap();
        }
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        let err = memory
            .remember_for_study("greedy", share, vec![set(5000..7000)])
            .unwrap_err();
        assert!(matches!(err, OverlapError::StudyShare { .. }), "{err}");
        // Another study still has its own share.
        memory
            .remember_for_study("other", share, vec![set(5000..7000)])
            .unwrap();
    }

    #[test]
    fn derived_counts_come_back_on_reopening_from_the_answers_marked_in_the_file() {
        let state = tempfile::tempdir().unwrap();
        let derived = {
            let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
            memory.remember(vec![set(0..1000)]).unwrap();
            // One answer with two sets inside the first answer's, one inside the other.
            memory.remember(vec![set(0..600), set(0..300)]).unwrap();
            assert!(memory.known(&set(600..1000)), "A minus the first");
            assert!(memory.known(&set(300..1000)), "A minus the second");
            assert!(
                memory.known(&set(300..600)),
                "what the two sets derived from the first answer is differenced too"
            );
            memory.derived()
        };
        let memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert_eq!(memory.len(), 3);
        assert_eq!(memory.derived(), derived);
        assert!(memory.known(&set(600..1000)));
        assert!(memory.known(&set(300..600)));
    }

    #[test]
    fn a_release_making_more_counts_derivable_than_are_followed_is_counted_and_survives_reopening()
    {
        let state = tempfile::tempdir().unwrap();
        {
            let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
            // Twenty groups of 100 records, each its own answer, then one holding them all: it
            // makes more differences derivable than are followed.
            for group in 0..20 {
                memory
                    .remember(vec![set(group * 100..group * 100 + 100)])
                    .unwrap();
            }
            assert_eq!(memory.cut(), 0, "disjoint groups derive nothing");
            memory.remember(vec![set(0..2000)]).unwrap();
            assert_eq!(memory.cut(), 1);
            // A group inside one other elsewhere makes one difference derivable.
            memory.remember(vec![set(5000..5100)]).unwrap();
            memory.remember(vec![set(5000..5050)]).unwrap();
            assert_eq!(memory.cut(), 1);
        }
        let memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert_eq!(memory.cut(), 1, "replaying the file cuts the same release");
    }

    #[test]
    fn sets_written_before_answers_were_marked_count_as_answers_of_their_own() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join(OVERLAP_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let mut file = Vec::new();
        for records in [set(0..1000), set(0..600), set(0..300)] {
            let mut payload = Vec::new();
            records.serialize_into(&mut payload).unwrap();
            file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            file.extend_from_slice(&fingerprint(&payload));
            file.extend_from_slice(&payload);
        }
        std::fs::write(dir.join(SETS_FILE), file).unwrap();
        let memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert_eq!(memory.len(), 3);
        assert!(
            memory.known(&set(300..600)),
            "each old set is an answer of its own"
        );
    }
}
