//! Differencing chains: named attacks, and random sequences of answers against a model of what
//! a reader can subtract — the node's guarantee, checked where every derivable count can be
//! listed.
//!
//! Records come in six "atoms": one of three records (the small group an attacker is after),
//! in half the sequences a second small one, and the rest of 400 to 2,400. Every released value
//! is a union of atoms, so what a reader knows is a set of atom masks: the values released
//! (cells, totals, the released cells together, the withheld ones together), and every
//! difference of two nested known counts built from at most [`MOST_DEPTH`] stacked
//! subtractions — except two values of one answer, which the answer's own rules cover. The
//! guarantee (PRIVACY.md, "What is guaranteed, exactly") is that no two such counts ever come
//! 1 to k-1 records apart — one more subtraction would reveal that few records — and no such
//! count is itself that small.

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

fn records_of(atoms: &[RoaringBitmap], mask: u32) -> RoaringBitmap {
    atoms
        .iter()
        .enumerate()
        .filter(|(atom, _)| mask & (1 << atom) != 0)
        .fold(RoaringBitmap::new(), |all, (_, records)| all | records)
}

fn len_of(atoms: &[RoaringBitmap], mask: u32) -> u64 {
    records_of(atoms, mask).len()
}

/// A count a reader knows: the fewest stacked subtractions it takes, and the answer it is a
/// value of (`None` when derived, or a value of several answers).
type Known = HashMap<u32, (u8, Option<usize>)>;

/// An answer as a reader sees it: each cell's count if released, the total's, and the values
/// it can read off (released cells, the total, the released cells together, the withheld ones
/// together), as masks.
struct Answer {
    cells: Vec<Option<u64>>,
    total: Option<u64>,
    values: Vec<u32>,
}

/// Asks for a one-axis table whose cells are `cells` (disjoint masks) and remembers what the
/// node releases.
fn ask(memory: &mut OverlapMemory, atoms: &[RoaringBitmap], cells: &[u32]) -> Answer {
    ask_table(memory, atoms, &[cells.len()], cells)
}

/// [`ask`] for a table of the given shape (its values as read off a one-axis table).
fn ask_table(
    memory: &mut OverlapMemory,
    atoms: &[RoaringBitmap],
    shape: &[usize],
    cells: &[u32],
) -> Answer {
    let sets: Vec<RoaringBitmap> = cells.iter().map(|&mask| records_of(atoms, mask)).collect();
    let table = RawTable {
        shape: shape.to_vec(),
        counts: sets.iter().map(RoaringBitmap::len).collect(),
    };
    let decided = decide(&table, &sets, K, memory, &[], false, &[]);
    memory.remember(decided.released_sets).unwrap();
    let count = |outcome: &Outcome| match outcome {
        Outcome::Released(count) => Some(*count),
        Outcome::Withheld => None,
    };
    let released: Vec<Option<u64>> = decided.table.cells.iter().map(count).collect();
    let total = count(&decided.table.total);
    let mut values: Vec<u32> = cells
        .iter()
        .zip(&released)
        .filter(|(_, count)| count.is_some())
        .map(|(&mask, _)| mask)
        .collect();
    let readable = values.iter().fold(0, |all, mask| all | mask);
    values.push(readable);
    if total.is_some() {
        let all = cells.iter().fold(0, |all, mask| all | mask);
        values.extend([all, all & !readable]);
    }
    values.retain(|&mask| mask != 0);
    values.sort_unstable();
    values.dedup();
    Answer {
        cells: released,
        total,
        values,
    }
}

/// Every count a reader can derive from the `released` values (mask, answer) by nested
/// subtraction, with the fewest stacked subtractions it takes (at most [`MOST_DEPTH`]).
fn derivable(released: &[(u32, usize)]) -> Known {
    let mut known: Known = HashMap::new();
    for &(mask, answer) in released {
        known
            .entry(mask)
            .and_modify(|(_, of)| {
                if *of != Some(answer) {
                    *of = None;
                }
            })
            .or_insert((0, Some(answer)));
    }
    loop {
        let now: Vec<(u32, (u8, Option<usize>))> = known.iter().map(|(&m, &e)| (m, e)).collect();
        let mut grew = false;
        for &(inner, (inner_depth, inner_of)) in &now {
            for &(outer, (outer_depth, outer_of)) in &now {
                let depth = inner_depth.max(outer_depth) + 1;
                let same_answer = inner_depth == 0 && outer_depth == 0 && inner_of == outer_of;
                if inner == outer || inner & outer != inner || same_answer || depth > MOST_DEPTH {
                    continue;
                }
                let entry = known.entry(outer & !inner).or_insert((u8::MAX, None));
                if depth < entry.0 {
                    *entry = (depth, None);
                    grew = true;
                }
            }
        }
        if !grew {
            return known;
        }
    }
}

/// Two derivable counts 1 to k-1 records apart (not two values of one answer), or one that
/// small (paired with 0).
fn exposed(known: &Known, atoms: &[RoaringBitmap]) -> Option<(u32, u32)> {
    let small = |records: u64| (1..u64::from(K)).contains(&records);
    known.iter().find_map(|(&one, &(depth, of))| {
        if small(len_of(atoms, one)) {
            return Some((one, 0));
        }
        known
            .iter()
            .find(|&(&other, &(other_depth, other_of))| {
                let same_answer = depth == 0 && other_depth == 0 && of.is_some() && of == other_of;
                !same_answer && small(len_of(atoms, one ^ other))
            })
            .map(|(&other, _)| (one, other))
    })
}

#[test]
fn no_sequence_of_answers_makes_a_small_count_derivable() {
    let sequences: u64 = std::env::var("FEDQ_FUZZ_SEQUENCES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(300);
    let mut released_total = 0;
    for seed in 0..sequences {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let atoms = atoms(&mut rng);
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        let mut released: Vec<(u32, usize)> = Vec::new();
        let mut log = Vec::new();
        for answer in 0..rng.random_range(4..12) {
            // A group split at random into 1 to 4 cells: mostly a new group; sometimes one the
            // reader can derive already (a release that takes fewer subtractions than the
            // derivation did).
            let mut known: Vec<u32> = derivable(&released)
                .into_keys()
                .filter(|&mask| mask > 1)
                .collect();
            known.sort_unstable();
            let group = if !known.is_empty() && rng.random_range(0..3) == 0 {
                known[rng.random_range(0..known.len())]
            } else {
                rng.random_range(2..1 << ATOMS)
            };
            let mut cells = vec![0u32; rng.random_range(1..=4)];
            for atom in (0..ATOMS).filter(|atom| group & (1 << atom) != 0) {
                let cell = rng.random_range(0..cells.len());
                cells[cell] |= 1 << atom;
            }
            cells.retain(|&mask| mask != 0);
            let out = ask(&mut memory, &atoms, &cells);
            let shown: Vec<String> = cells.iter().map(|mask| format!("{mask:06b}")).collect();
            log.push(format!(
                "{shown:?} -> {:?} total {:?}",
                out.cells, out.total
            ));
            released_total += out.values.len() as u64;
            released.extend(out.values.iter().map(|&mask| (mask, answer)));
            if let Some((one, other)) = exposed(&derivable(&released), &atoms) {
                panic!(
                    "seed {seed}: after {log:#?} the counts of {one:06b} and {other:06b} are \
                     derivable and reveal a small group"
                );
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
        assert_eq!(knows(&reopened), before, "seed {seed}: {log:#?}");
    }
    // The test means something only if most values are released.
    assert!(released_total > sequences * 4, "{released_total} released");
}

/// Asks for one-cell answers over `masks` in turn; whether each was released.
fn releases(atoms: &[RoaringBitmap], masks: &[u32]) -> Vec<bool> {
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    masks
        .iter()
        .map(|&mask| ask(&mut memory, atoms, &[mask]).total.is_some())
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

// The next four were found by an audit (multi-cell answers).

#[test]
fn a_second_subtraction_is_compared_with_the_other_values_of_the_answer() {
    // g (3 records), a, c, d, e. Released {c, d}, {a, d, e}; then cells {g, a, e} and {c}:
    // {c, d} - {c} = {d}, {a, d, e} - {d} = {a, e}, 3 records from the cell {g, a, e}.
    let atoms = blocks(&[3, 1200, 900, 1500, 700]);
    let (g, a, c, d, e) = (1, 2, 4, 8, 16);
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    assert!(ask(&mut memory, &atoms, &[c | d]).total.is_some());
    assert!(ask(&mut memory, &atoms, &[a | d | e]).total.is_some());
    let answer = ask(&mut memory, &atoms, &[g | a | e, c]);
    assert!(answer.cells.contains(&None), "{:?}", answer.cells);
}

#[test]
fn two_cells_each_differenced_with_an_earlier_answer_are_compared_with_each_other() {
    // g (3 records), a, b, c, d. Released {g, a, b} and {a, c, d}, {d} (so {a, c} is derived);
    // then cells {b} and {c}: {g, a, b} - {b} = {g, a} and ({a, c, d} - {d}) - {c} = {a}.
    let atoms = blocks(&[3, 1200, 1500, 900, 700]);
    let (g, a, b, c, d) = (1, 2, 4, 8, 16);
    for earlier in [vec![g | a | b, a | c], vec![g | a | b, a | c | d, d]] {
        let state = tempfile::tempdir().unwrap();
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        for mask in earlier {
            assert!(ask(&mut memory, &atoms, &[mask]).total.is_some());
        }
        let answer = ask(&mut memory, &atoms, &[b, c]);
        assert!(answer.cells.contains(&None), "{:?}", answer.cells);
    }
}

#[test]
fn a_count_derived_across_two_values_of_one_answer_is_remembered() {
    // g (3 records), q, r1, r2, t1, t2. Released {r1, t1}; then cells {q}, {r1, r2}, {t1, t2}
    // (total T), so (T - {r1, t1}) - {q} = {r2, t2}; after a restart, {g, r2, t2} is 3 records
    // from it.
    let atoms = blocks(&[3, 800, 1100, 900, 1300, 700]);
    let (g, q, r1, r2, t1, t2) = (1, 2, 4, 8, 16, 32);
    let state = tempfile::tempdir().unwrap();
    {
        let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
        assert!(ask(&mut memory, &atoms, &[r1 | t1]).total.is_some());
        let answer = ask(&mut memory, &atoms, &[q, r1 | r2, t1 | t2]);
        assert!(answer.total.is_some() && answer.cells.iter().all(Option::is_some));
    }
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    assert!(memory.known(&records_of(&atoms, r2 | t2)));
    assert!(ask(&mut memory, &atoms, &[g | r2 | t2]).total.is_none());
}

#[test]
fn a_count_checked_but_not_followed_is_compared_with_the_other_values() {
    // Fifteen groups of 60 records and r, S, D, g (3 records). c1 = the fifteen and r. Released
    // each of the fifteen, P1 = c1 + S, P2 = S + D; then cells c1 and c2 = D + g. c1 makes more
    // than sixteen counts derivable, among them P2 - (P1 - c1) = D, which is not followed — and
    // c2 - D = 3 records.
    let mut sizes = vec![60u32; 15];
    sizes.extend([400, 300, 1000, 3]);
    let atoms = blocks(&sizes);
    let (r, s, d, g) = (1 << 15, 1 << 16, 1 << 17, 1 << 18);
    let c1 = ((1 << 15) - 1) | r;
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    for mask in (0..15).map(|group| 1 << group).chain([c1 | s, s | d]) {
        assert!(ask(&mut memory, &atoms, &[mask]).total.is_some());
    }
    let answer = ask(&mut memory, &atoms, &[c1, d | g]);
    assert!(answer.cells.contains(&None), "{:?}", answer.cells);
}

#[test]
fn released_partners_are_not_crowded_out_by_derived_counts() {
    // Found by an audit: five nested groups y1, y1+y2, ..., y1..y5 (60 records each step), r,
    // S, D, g (3 records); c1 = y1..y5 + r. Released the five, P1 = c1 + S, P2 = S + D; then
    // cells c1 and c2 = D + g. The differences among the five and with c1 are many counts of
    // about c1's size; P1 must still be among c1's partners, for P2 - (P1 - c1) = D and
    // c2 - D = 3 records.
    let atoms = blocks(&[60, 60, 60, 60, 60, 400, 300, 1000, 3]);
    let (r, s, d, g) = (1 << 5, 1 << 6, 1 << 7, 1 << 8);
    let c1 = 0b11111 | r;
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    for mask in (1..=5)
        .map(|groups| (1 << groups) - 1)
        .chain([c1 | s, s | d])
    {
        assert!(ask(&mut memory, &atoms, &[mask]).total.is_some());
    }
    let answer = ask(&mut memory, &atoms, &[c1, d | g]);
    assert!(answer.cells.contains(&None), "{:?}", answer.cells);
}

#[test]
fn every_cell_of_a_twenty_cell_table_inside_a_release_is_differenced_with_it() {
    // Found by an audit: atoms g (3 records), b, and twenty cells c0..c19 (c19 the smallest).
    // Released the twenty-cell table (total T), then X = b + T, which holds the twenty cells
    // and T. Then Y = X - c19 + g would give Y - (X - c19) = g: X - c19 must be remembered
    // though it is X's farthest partner.
    let mut sizes = vec![3, 2000];
    sizes.extend((0..19).map(|cell| 700 + 10 * cell));
    sizes.push(400);
    let atoms = blocks(&sizes);
    let (g, b) = (1, 2);
    let cells: Vec<u32> = (2..22).map(|atom| 1 << atom).collect();
    let table = cells.iter().fold(0, |all, cell| all | cell);
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    let answer = ask(&mut memory, &atoms, &cells);
    assert!(
        answer.cells.iter().all(Option::is_some),
        "{:?}",
        answer.cells
    );
    assert!(ask(&mut memory, &atoms, &[b | table]).total.is_some());
    let y = (b | table | g) & !(1 << 21);
    assert!(ask(&mut memory, &atoms, &[y]).total.is_none());
}

#[test]
fn a_release_s_own_difference_known_deeper_is_lowered_though_not_followed() {
    // Found by an audit. Atoms R1..R4, D, P, Q, g (3 records), E1..E16. Released D + R1..R4,
    // then each Ri: D is known at depth 4 only. Then D + P + Ei for each i, P, and X = D + P:
    // X's sixteen closest released partners are the D + P + Ei, so X - P = D is its
    // seventeenth difference, not followed; it must still be lowered to one subtraction, or
    // Y = D + Q is never differenced with it and Z = Q + g gives Z - (Y - (X - P)) = g.
    let mut sizes = vec![500, 600, 700, 800, 2000, 1000, 1500, 3];
    sizes.extend((0..16).map(|step| 100 + 20 * step));
    let atoms = blocks(&sizes);
    let (d, p, q, g) = (1 << 4, 1 << 5, 1 << 6, 1 << 7);
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    let releases = [d | 0b1111, 1, 2, 4, 8]
        .into_iter()
        .chain((0..16).map(|step| d | p | (1 << (8 + step))))
        .chain([p, d | p, d | q]);
    for mask in releases {
        assert!(ask(&mut memory, &atoms, &[mask]).total.is_some());
    }
    assert!(ask(&mut memory, &atoms, &[q | g]).total.is_none());
}

#[test]
fn a_value_is_explored_again_when_an_earlier_value_of_its_answer_lowered_a_depth() {
    // The third answer's total was derivable already: remembering it only lowers depths, after
    // which the withheld cells together make more derivable than their check saw. What the node
    // remembers must be what reopening the memory derives.
    let atoms = blocks(&[3, 2372, 1054, 2221, 2161, 2052, 1253]);
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    let answers: [(&[usize], &[u32]); 3] = [
        (&[4], &[0b1000100, 0b0011000, 0b0000010, 0b0100001]),
        (&[4], &[0b1001000, 0b0010001, 0, 0b0100110]),
        (
            &[2, 2, 2],
            &[0, 0b0010000, 0, 0, 0, 0b0101000, 0b0000100, 0b0000010],
        ),
    ];
    for (shape, cells) in answers {
        ask_table(&mut memory, &atoms, shape, cells);
    }
    let knows = |memory: &OverlapMemory| -> Vec<bool> {
        (1..1 << 7)
            .map(|mask| memory.known(&records_of(&atoms, mask)))
            .collect()
    };
    let live = knows(&memory);
    drop(memory);
    assert_eq!(
        live,
        knows(&OverlapMemory::open(state.path(), 1 << 30).unwrap())
    );
}

#[test]
fn the_difference_of_counts_derived_from_two_values_of_one_answer_is_checked() {
    // Found by the random test (seed 438): g (3 records), a, b, c, d, e. Released: {g, a};
    // then cells {a} and {b, e} (both withheld, total {a, b, e}); {g, b, c}; {g, d, e}. Then
    // cells {g, c} and {e}: {a, b, e} - {e} = {a, b} and {g, b, c} - {g, c} = {b} are counts
    // of the two values, one inside the other; their difference {a} is 3 records from {g, a}.
    let atoms = atoms(&mut ChaCha20Rng::seed_from_u64(438));
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    for cells in [
        &[0b000011][..],
        &[0b000010, 0b100100],
        &[0b001101],
        &[0b110001],
    ] {
        assert!(ask(&mut memory, &atoms, cells).total.is_some());
    }
    let answer = ask(&mut memory, &atoms, &[0b001001, 0b100000]);
    assert!(
        answer.cells.contains(&None) || answer.total.is_none(),
        "{:?} {:?}",
        answer.cells,
        answer.total
    );
}

#[test]
fn a_count_derived_from_one_value_less_another_value_of_the_answer_is_checked() {
    // Found by an audit: g (3 records), m1, m2, a, b, c. Released M = {m1, m2} and K = {b, c,
    // g}; then cells {a}, {b, m1}, {c, m2} and their total T. T - M = {a, b, c} is a count of
    // the total; the cell {a} lies inside it, and (T - M) - {a} = {b, c} is 3 records from K.
    let atoms = blocks(&[3, 900, 700, 1200, 800, 1000]);
    let (g, m1, m2, a, b, c) = (1, 2, 4, 8, 16, 32);
    let state = tempfile::tempdir().unwrap();
    let mut memory = OverlapMemory::open(state.path(), 1 << 30).unwrap();
    assert!(ask(&mut memory, &atoms, &[m1 | m2]).total.is_some());
    assert!(ask(&mut memory, &atoms, &[b | c | g]).total.is_some());
    let answer = ask(&mut memory, &atoms, &[a, b | m1, c | m2]);
    assert!(
        answer.cells.contains(&None) || answer.total.is_none(),
        "{:?} {:?}",
        answer.cells,
        answer.total
    );
}
