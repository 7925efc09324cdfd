//! Differencing chains: named attacks, and random release sequences against a model of what
//! a reader can subtract — the node's guarantee, checked where every derivable count can be
//! listed.
//!
//! Records come in six "atoms": one of three records (the small group an attacker is after),
//! in half the sequences a second small one, and the rest of 400 to 2,400. Every released group is a union of atoms, so what a reader knows
//! is a set of atom masks: the released ones, and every difference of two nested known ones
//! built from at most [`MOST_DEPTH`] stacked subtractions. The guarantee (PRIVACY.md, "What is
//! guaranteed, exactly") is that no two such counts ever come 1 to k-1 records apart — one more
//! subtraction would reveal that few records — and no such count is itself that small.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use roaring::RoaringBitmap;

use super::{OverlapMemory, decide};
use crate::disclosure::Outcome;
use crate::plan::RawTable;

const K: u32 = 10;
const ATOMS: u32 = 6;
/// Subtractions a derived count may stack, as in the index.
const MOST_DEPTH: u8 = 4;

/// The atoms, their records scattered among each other (as a filter's records are among a
/// dataset's): the first is the small group; in half the sequences so is the second (2 to 8
/// records, so that the two together may be fewer than k as well).
fn atoms(rng: &mut ChaCha20Rng) -> Vec<RoaringBitmap> {
    let second_small = rng.random_bool(0.5);
    let sizes: Vec<u32> = (0..ATOMS)
        .map(|atom| match atom {
            0 => 3,
            1 if second_small => rng.random_range(2..=8),
            _ => rng.random_range(400..2400),
        })
        .collect();
    let mut records: Vec<u32> = (0..sizes.iter().sum()).collect();
    records.shuffle(rng);
    let mut rest = records.as_slice();
    sizes
        .iter()
        .map(|&size| {
            let (atom, after) = rest.split_at(size as usize);
            rest = after;
            atom.iter().copied().collect()
        })
        .collect()
}

fn records_of(atoms: &[RoaringBitmap], mask: u32) -> RoaringBitmap {
    atoms
        .iter()
        .enumerate()
        .filter(|(atom, _)| mask & (1 << atom) != 0)
        .fold(RoaringBitmap::new(), |all, (_, records)| all | records)
}

/// Every count a reader can derive from `released` by nested subtraction, with the fewest
/// stacked subtractions it takes (at most [`MOST_DEPTH`]).
fn derivable(released: &[u32]) -> HashMap<u32, u8> {
    let mut known: HashMap<u32, u8> = released.iter().map(|&mask| (mask, 0)).collect();
    loop {
        let now: Vec<(u32, u8)> = known.iter().map(|(&mask, &depth)| (mask, depth)).collect();
        let mut grew = false;
        for &(inner, inner_depth) in &now {
            for &(outer, outer_depth) in &now {
                let depth = inner_depth.max(outer_depth) + 1;
                if inner != outer && inner & outer == inner && depth <= MOST_DEPTH {
                    let entry = known.entry(outer & !inner).or_insert(u8::MAX);
                    if depth < *entry {
                        *entry = depth;
                        grew = true;
                    }
                }
            }
        }
        if !grew {
            return known;
        }
    }
}

/// Two derivable counts 1 to k-1 records apart (or one that small), if any.
fn exposed(known: &HashMap<u32, u8>, sizes: &[u64]) -> Option<(u32, u32)> {
    let len = |mask: u32| -> u64 {
        (0..ATOMS)
            .filter(|atom| mask & (1 << atom) != 0)
            .map(|atom| sizes[atom as usize])
            .sum()
    };
    let small = |records: u64| (1..u64::from(K)).contains(&records);
    known.keys().find_map(|&one| {
        if small(len(one)) {
            return Some((one, 0));
        }
        known
            .keys()
            .find(|&&other| small(len(one ^ other)))
            .map(|&other| (one, other))
    })
}

/// Releases a one-cell answer over `records` if the node allows it.
fn release(memory: &mut OverlapMemory, records: &RoaringBitmap) -> bool {
    let table = RawTable {
        shape: vec![1],
        counts: vec![records.len()],
    };
    let decided = decide(&table, std::slice::from_ref(records), K, memory, &[], false);
    memory.remember(decided.released_sets).unwrap();
    matches!(decided.table.total, Outcome::Released(_))
}

#[test]
fn no_sequence_of_releases_makes_a_small_count_derivable() {
    let sequences: u64 = std::env::var("FEDQ_FUZZ_SEQUENCES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(300);
    let mut released_total = 0;
    for seed in 0..sequences {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let atoms = atoms(&mut rng);
        let sizes: Vec<u64> = atoms.iter().map(RoaringBitmap::len).collect();
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        let mut released: Vec<u32> = Vec::new();
        let mut log = Vec::new();
        for _ in 0..rng.random_range(4..12) {
            // Mostly a new group; sometimes one the reader can derive already (a re-release
            // that takes fewer subtractions than the derivation did).
            let mut known: Vec<u32> = derivable(&released)
                .into_keys()
                .filter(|&m| m > 1)
                .collect();
            known.sort_unstable();
            let mask = if !known.is_empty() && rng.random_range(0..3) == 0 {
                known[rng.random_range(0..known.len())]
            } else {
                rng.random_range(2..1 << ATOMS)
            };
            let out = release(&mut memory, &records_of(&atoms, mask));
            log.push(format!("{mask:06b}{}", if out { "" } else { " withheld" }));
            if out {
                released.push(mask);
                released_total += 1;
                if let Some((one, other)) = exposed(&derivable(&released), &sizes) {
                    panic!(
                        "seed {seed}: after {log:?} the counts of {one:06b} and {other:06b} \
                         are derivable and reveal the small atom"
                    );
                }
            }
        }
        // What was remembered from the checks' explorations is what opening the memory
        // derives again from the file.
        let knows = |memory: &OverlapMemory| -> Vec<bool> {
            (1..1 << ATOMS)
                .map(|mask| memory.known(&records_of(&atoms, mask)))
                .collect()
        };
        let before = knows(&memory);
        drop(memory);
        let reopened = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert_eq!(knows(&reopened), before, "seed {seed}: {log:?}");
    }
    // The test means something only if most groups are released.
    assert!(released_total > sequences * 3, "{released_total} released");
}

/// Groups of the given sizes, each a block of consecutive records.
fn blocks(sizes: &[u32]) -> Vec<RoaringBitmap> {
    let mut next = 0;
    sizes
        .iter()
        .map(|&size| {
            let records = (next..next + size).collect();
            next += size;
            records
        })
        .collect()
}

/// Releases the groups `masks` (over `atoms`) in turn; whether each was released.
fn releases(atoms: &[RoaringBitmap], masks: &[u32]) -> Vec<bool> {
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    masks
        .iter()
        .map(|&mask| release(&mut memory, &records_of(atoms, mask)))
        .collect()
}

#[test]
fn a_chain_that_subtracts_a_group_lying_inside_a_difference_is_caught() {
    // g (3 records) and five larger groups a-e. Released: {g, b}, {e}, {g, a, c}, {g, a, b,
    // c, d}. Then {g, a, b, c, e} minus {e} is {g, a, b, c}; minus {g, b} (inside it, not
    // holding it) is {a, c}, 3 records from {g, a, c}.
    let atoms = blocks(&[3, 1202, 1670, 2060, 725, 1955]);
    let masks = [0b000101, 0b100000, 0b001011, 0b011111, 0b101111];
    assert_eq!(releases(&atoms, &masks), [true, true, true, true, false]);
}

#[test]
fn a_group_derived_deep_then_released_is_followed_from_its_release() {
    // g (3 records) and five larger groups a-e. {b, c} is first derivable only through four
    // subtractions, so nothing is derived from it; released, it takes none, and {b, c, d}
    // minus it gives {d}. The last release, {g, c, d, e}, minus {c, e} gives {g, d}: 3 records
    // from {d}.
    let atoms = blocks(&[3, 1612, 752, 431, 1731, 800]);
    let masks = [
        0b011100, 0b010100, 0b000110, 0b001110, 0b100010, 0b101000, 0b001100, 0b111001,
    ];
    let released = releases(&atoms, &masks);
    assert!(released[..7].iter().all(|&out| out), "{released:?}");
    assert!(!released[7], "the last release completes the chain");
}
