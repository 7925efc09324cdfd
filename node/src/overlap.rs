//! Query-set overlap control. The node remembers the record set of every value it released —
//! cells, the total, and every margin the released cells add up to — as compressed bitmaps of
//! record numbers ([`crate::records`]), whatever study or coordinator asked. A new value whose
//! record set differs from a remembered one by 1 to k-1 records is withheld: otherwise
//! subtracting the two answers would reveal those few records ("everyone" minus "everyone but
//! one"). Only sets whose sizes differ by less than k can be that close, so only those are
//! compared.
//!
//! The memory lives in `state_dir/overlap/released-sets.bin`: append-only entries of
//! `[u32 length][SHA-256 of the bitmap][bitmap]`, each query's new sets fsynced before its
//! reply. It is bounded: when the next answer would pass `privacy.overlap_memory_mb`, the node
//! refuses queries (fail closed) until an administrator raises the bound or archives the file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use roaring::{MultiOps, RoaringBitmap};
use sha2::{Digest, Sha256};

use crate::disclosure::{self, DisclosedTable, Outcome, Reason};
use crate::plan::RawTable;
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

/// The remembered released record sets of one node.
#[derive(Debug)]
pub struct OverlapMemory {
    path: PathBuf,
    sets: Vec<RoaringBitmap>,
    /// Cardinality → positions in `sets`.
    by_size: BTreeMap<u64, Vec<usize>>,
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
            sets: Vec::new(),
            by_size: BTreeMap::new(),
            bytes: 0,
            limit,
            by_study,
        };
        let mut at = 0;
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
            let set = RoaringBitmap::deserialize_from(payload).map_err(|_| damaged())?;
            memory.insert(set, length as u64);
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

    fn insert(&mut self, set: RoaringBitmap, size: u64) {
        self.by_size
            .entry(set.len())
            .or_default()
            .push(self.sets.len());
        self.sets.push(set);
        self.bytes += size;
    }

    /// Whether exactly this set is remembered.
    fn contains(&self, set: &RoaringBitmap) -> bool {
        self.by_size.get(&set.len()).is_some_and(|positions| {
            positions
                .iter()
                .any(|&position| self.sets[position] == *set)
        })
    }

    /// Remembered sets.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Bytes the remembered sets take (serialised).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether `set` differs from a remembered set by 1 to k-1 records.
    pub fn too_close(&self, set: &RoaringBitmap, k: u32) -> bool {
        let reach = u64::from(k.saturating_sub(1));
        let size = set.len();
        self.by_size
            .range(size.saturating_sub(reach)..=size.saturating_add(reach))
            .flat_map(|(_, positions)| positions)
            .any(|&position| {
                let difference = self.sets[position].symmetric_difference_len(set);
                difference >= 1 && difference <= reach
            })
    }

    /// Whether a reader already knows `set`'s count exactly: it was released before.
    pub fn known(&self, set: &RoaringBitmap) -> bool {
        self.contains(set)
    }

    /// Remembers `sets` durably (one append and fsync), skipping empty sets and sets already
    /// remembered. Refuses, writing nothing, when they would pass the bound.
    pub fn remember(&mut self, sets: Vec<RoaringBitmap>) -> Result<(), OverlapError> {
        self.remember_for(None, sets)
    }

    /// Like [`OverlapMemory::remember`], charging the new bytes to `study`, which may take at
    /// most `share` of the memory's bound (so one study cannot fill the memory for all).
    pub fn remember_for_study(
        &mut self,
        study: &str,
        share: u64,
        sets: Vec<RoaringBitmap>,
    ) -> Result<(), OverlapError> {
        self.remember_for(Some((study, share)), sets)
    }

    fn remember_for(
        &mut self,
        study: Option<(&str, u64)>,
        sets: Vec<RoaringBitmap>,
    ) -> Result<(), OverlapError> {
        let mut entries = Vec::new();
        let mut fresh: Vec<(RoaringBitmap, u64)> = Vec::new();
        let mut added = 0u64;
        for set in sets {
            // Known sets (a repeated query) cost one comparison, no serialisation.
            if set.is_empty() || self.contains(&set) || fresh.iter().any(|(seen, _)| *seen == set) {
                continue;
            }
            let mut payload = Vec::with_capacity(set.serialized_size());
            set.serialize_into(&mut payload)
                .map_err(|err| OverlapError::Write(err.to_string()))?;
            entries.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            entries.extend_from_slice(&fingerprint(&payload));
            entries.extend_from_slice(&payload);
            added += payload.len() as u64;
            fresh.push((set, payload.len() as u64));
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
        for (set, size) in fresh {
            self.insert(set, size);
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

/// The cells each margin of a grid adds up (every way of summing over some of its axes, the
/// total excluded), or only the one-axis margins when there would be very many.
fn margins(shape: &[usize]) -> Vec<Vec<usize>> {
    const MOST_MARGINS: usize = 50_000;
    let cells: usize = shape.iter().product();
    let axes = shape.len();
    let all_subsets =
        shape.iter().map(|length| length + 1).product::<usize>() <= MOST_MARGINS && axes <= 16;
    let mut found = Vec::new();
    // `kept`: the axes a margin keeps (its coordinates); the others are summed over.
    for kept in 0u32..(1u32 << axes) {
        let summed = axes - kept.count_ones() as usize;
        if summed == 0 || kept == 0 || !(all_subsets || summed == 1) {
            continue;
        }
        let mut groups: BTreeMap<Vec<u32>, Vec<usize>> = BTreeMap::new();
        for cell in 0..cells {
            let coordinates = fedq_proto::template::cell_coordinates(shape, cell);
            let key: Vec<u32> = (0..axes)
                .filter(|axis| kept & (1 << axis) != 0)
                .map(|axis| coordinates[axis])
                .collect();
            groups.entry(key).or_default().push(cell);
        }
        found.extend(groups.into_values().filter(|group| group.len() > 1));
    }
    found
}

fn union(sets: &[RoaringBitmap], cells: &[usize]) -> RoaringBitmap {
    cells.iter().map(|&cell| &sets[cell]).union()
}

/// The smallest non-zero released cell of `cells` (or the first released one).
fn smallest_released(
    table: &RawTable,
    disclosed: &DisclosedTable,
    cells: &[usize],
) -> Option<usize> {
    cells
        .iter()
        .copied()
        .filter(|&cell| matches!(disclosed.cells[cell], Outcome::Released(_)))
        .min_by_key(|&cell| (table.counts[cell] == 0, table.counts[cell]))
}

/// An answer decided under overlap control, and the record sets it releases.
#[derive(Debug)]
pub struct Decided {
    pub table: DisclosedTable,
    pub released_sets: Vec<RoaringBitmap>,
}

/// Disclosure control with overlap control: threshold and complementary suppression as in
/// [`disclosure::apply_with`] (with the cells `already_forced` withheld for their reason),
/// then every released value — cell, total, and each margin the released cells determine — is
/// checked against `memory`; a value too close to a remembered set is withheld (a margin by
/// withholding its smallest cell) and the rules run again, until nothing released is too
/// close. All on true values.
pub fn decide(
    table: &RawTable,
    sets: &[RoaringBitmap],
    k: u32,
    memory: &OverlapMemory,
    already_forced: &[Option<Reason>],
    total_already_forced: bool,
) -> Decided {
    let cell_count = table.counts.len();
    let margin_groups = margins(&table.shape);
    let all_cells: Vec<usize> = (0..cell_count).collect();
    let total_set = union(sets, &all_cells);
    let mut forced: Vec<Option<Reason>> = (0..cell_count)
        .map(|cell| already_forced.get(cell).copied().flatten())
        .collect();
    // A cell whose exact records were released before protects nothing when withheld (its count
    // is known): complementary suppression must not count on it.
    let known: Vec<bool> = sets
        .iter()
        .map(|set| !set.is_empty() && memory.known(set))
        .collect();
    let mut total_forced = total_already_forced;
    loop {
        let disclosed = disclosure::apply_knowing(table, k, &forced, total_forced, &known);
        let released = |cell: usize| matches!(disclosed.cells[cell], Outcome::Released(_));
        let mut changed = false;
        for cell in 0..cell_count {
            if released(cell) && !sets[cell].is_empty() && memory.too_close(&sets[cell], k) {
                forced[cell] = Some(Reason::Overlap);
                changed = true;
            }
        }
        if !total_forced
            && matches!(disclosed.total, Outcome::Released(_))
            && memory.too_close(&total_set, k)
        {
            total_forced = true;
            changed = true;
        }
        let mut margin_sets = Vec::new();
        for group in &margin_groups {
            if !group.iter().all(|&cell| released(cell)) {
                continue;
            }
            let set = union(sets, group);
            if !set.is_empty() && memory.too_close(&set, k) {
                if let Some(cell) = smallest_released(table, &disclosed, group) {
                    forced[cell] = Some(Reason::Overlap);
                    changed = true;
                }
            } else {
                margin_sets.push(set);
            }
        }
        if changed {
            continue;
        }
        let mut released_sets: Vec<RoaringBitmap> = (0..cell_count)
            .filter(|&cell| released(cell))
            .map(|cell| sets[cell].clone())
            .collect();
        if matches!(disclosed.total, Outcome::Released(_)) {
            released_sets.push(total_set);
        }
        released_sets.extend(margin_sets);
        // In every line with withheld cells, the records of its released and known cells are
        // a count the reader can add up: remember it, so that a later query releasing the
        // line's whole margin is seen to differ from it by the withheld records.
        for group in &margin_groups {
            let readable: Vec<usize> = group
                .iter()
                .copied()
                .filter(|&cell| released(cell) || known[cell])
                .collect();
            if readable.len() < group.len() && !readable.is_empty() {
                released_sets.push(union(sets, &readable));
            }
        }
        let everything: Vec<usize> = (0..cell_count)
            .filter(|&cell| released(cell) || known[cell])
            .collect();
        if everything.len() < cell_count && !everything.is_empty() {
            released_sets.push(union(sets, &everything));
        }
        return Decided {
            table: disclosed,
            released_sets,
        };
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
    fn all_but_one_is_withheld_after_all_was_released() {
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        // First answer: one cell of 50 records, released.
        let everyone = RawTable {
            shape: vec![1],
            counts: vec![50],
        };
        let first = decide(&everyone, &[set(0..50)], 10, &memory, &[], false);
        assert_eq!(first.table.total, Outcome::Released(50));
        memory.remember(first.released_sets).unwrap();
        // Second answer: everyone but record 7.
        let mut all_but_one = set(0..50);
        all_but_one.remove(7);
        let second = decide(
            &RawTable {
                shape: vec![1],
                counts: vec![49],
            },
            &[all_but_one],
            10,
            &memory,
            &[],
            false,
        );
        assert_eq!(second.table.cells, [Outcome::Withheld]);
        assert_eq!(second.table.total, Outcome::Withheld);
        assert!(second.released_sets.is_empty());
    }

    #[test]
    fn a_margin_the_released_cells_add_up_to_is_protected_too() {
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        memory.remember(vec![set(0..60)]).unwrap();
        // Two cells of 30 and 29 records: each far from 60, but together 59 = 60 minus one.
        let table = RawTable {
            shape: vec![2],
            counts: vec![30, 29],
        };
        let decided = decide(&table, &[set(0..30), set(31..60)], 10, &memory, &[], false);
        assert_eq!(decided.table.total, Outcome::Withheld);
        let released: u64 = decided
            .table
            .cells
            .iter()
            .filter_map(|cell| match cell {
                Outcome::Released(count) => Some(*count),
                Outcome::Withheld => None,
            })
            .sum();
        assert_ne!(
            released, 59,
            "the cells must not add up to the too-close total"
        );
    }
}
