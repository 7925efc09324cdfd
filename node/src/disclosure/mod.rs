//! Disclosure control: turns a table of true counts into what may leave the node.
//!
//! Every decision is made on true values, in this order:
//! 1. small-cell suppression (primary): a cell whose count is from 1 to k-1 is withheld;
//! 2. complementary suppression (secondary): in every line of the table — each row, column and
//!    higher-dimensional line, whose sum another query could ask for as a margin — and in the
//!    table as a whole, either no cell is withheld, or at least two are and their combined
//!    count is at least k. Where a line falls short, more of its released cells are withheld,
//!    smallest non-zero counts first (they lose the least information), until it holds; a line
//!    that cannot be made to hold is withheld entirely. So no withheld value is the difference
//!    of released ones within one answer or against the same filter's total asked another way.
//! 3. the total is released when the whole table satisfies the rule and is not small itself.
//!
//! Which mechanisms an answer reports depends only on whether anything was withheld, never on
//! the withheld values (a "complementary" flag present or absent would tell whether the small
//! cells alone reach k). Per-cell reasons go only to the node's audit log.
//!
//! k is the larger of the node's floor and the template's own minimum; nothing the
//! coordinator sends can lower it. A withheld value is represented by [`Outcome::Withheld`],
//! which carries no number.

use std::collections::{BTreeMap, BTreeSet};

use fedq_proto::wire::Mechanism;

use crate::plan::RawTable;

pub mod sections;
mod solvable;

/// What happens to one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Released(u64),
    Withheld,
}

/// Why a cell was withheld (kept in the node's audit log only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Its own count is from 1 to k-1.
    Threshold,
    /// Its record set differs from a record set this node released before by 1 to k-1
    /// records (query-set overlap control).
    Overlap,
    /// Withheld so that a small cell in one of its lines cannot be recovered.
    Complementary,
    /// One record's value is more than the site's set share of the cell's sum.
    Dominance,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Threshold => "threshold",
            Reason::Overlap => "overlap",
            Reason::Complementary => "complementary",
            Reason::Dominance => "dominance",
        }
    }
}

/// The releasable form of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisclosedTable {
    /// The threshold applied.
    pub k: u32,
    /// One outcome per cell, in the raw table's order.
    pub cells: Vec<Outcome>,
    pub total: Outcome,
    /// Mechanisms reported with the answer.
    pub mechanisms: BTreeSet<Mechanism>,
    /// Withheld cells per reason, for the audit log (never sent).
    pub withheld_by_reason: BTreeMap<Reason, u64>,
}

impl DisclosedTable {
    pub fn withheld_cells(&self) -> usize {
        self.cells
            .iter()
            .filter(|cell| matches!(cell, Outcome::Withheld))
            .count()
    }
}

/// The threshold for one query: the larger of the node's floor and the template's minimum.
pub fn effective_k(node_floor: u32, template_minimum: Option<u32>) -> u32 {
    node_floor.max(template_minimum.unwrap_or(0))
}

fn is_small(count: u64, k: u32) -> bool {
    count >= 1 && count < u64::from(k)
}

/// Every line of a row-major grid of `shape`: for each axis, the cells that differ only in
/// that axis's coordinate; plus the whole table. Lines of one cell are left out (a margin
/// equal to its only cell adds no constraint the cell itself does not).
fn lines(shape: &[usize]) -> Vec<Vec<usize>> {
    let cells: usize = shape.iter().product();
    let mut strides = vec![1usize; shape.len()];
    for axis in (0..shape.len().saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    let mut found = Vec::new();
    for (axis, &length) in shape.iter().enumerate() {
        if length < 2 {
            continue;
        }
        let stride = strides[axis];
        for start in 0..cells {
            if (start / stride).is_multiple_of(length) {
                found.push((0..length).map(|step| start + step * stride).collect());
            }
        }
    }
    if cells > 1 {
        found.push((0..cells).collect());
    }
    found
}

/// Whether a line's withheld cells are safe: none (unless `must_hide`, for a sum that must
/// not be derivable); or at least two summing to at least k; or all of them when the line's
/// own sum is below k (then its margin is a small count that any other query withholds in
/// turn, so nothing released pins them down).
/// Cells a reader may already know (`known`) protect nothing: they are not counted among the
/// withheld ones.
fn line_holds(
    line: &[usize],
    counts: &[u64],
    withheld: &[bool],
    known: &[bool],
    k: u32,
    must_hide: bool,
) -> bool {
    let is_known = |cell: usize| known.get(cell).copied().unwrap_or(false);
    let (number, sum) = line
        .iter()
        .filter(|&&cell| withheld[cell] && !is_known(cell))
        .fold((0usize, 0u64), |(number, sum), &cell| {
            (number + 1, sum + counts[cell])
        });
    let line_sum: u64 = line.iter().map(|&cell| counts[cell]).sum();
    let whole_line_small = line.iter().all(|&cell| withheld[cell]) && line_sum < u64::from(k);
    (number == 0 && !must_hide) || (number >= 2 && sum >= u64::from(k)) || whole_line_small
}

/// Withholds more cells of `line` (smallest non-zero counts first, then zeros) until it holds,
/// or all of it when it cannot. Returns whether anything changed.
fn complete_line(
    line: &[usize],
    counts: &[u64],
    withheld: &mut [bool],
    known: &[bool],
    k: u32,
    must_hide: bool,
) -> bool {
    let is_known = |cell: usize| known.get(cell).copied().unwrap_or(false);
    // Known cells are tried last: withholding one protects nothing, but a line that cannot
    // hold otherwise is withheld entirely.
    let mut candidates: Vec<usize> = line
        .iter()
        .copied()
        .filter(|&cell| !withheld[cell])
        .collect();
    // Non-zero counts first, smallest first; zeros last (they add nothing to the sum, but one
    // may be needed to reach two withheld cells). Ties keep grid order, so results repeat.
    candidates.sort_by_key(|&cell| (is_known(cell), counts[cell] == 0, counts[cell]));
    let mut changed = false;
    for cell in candidates {
        if line_holds(line, counts, withheld, known, k, must_hide) {
            break;
        }
        withheld[cell] = true;
        changed = true;
    }
    changed
}

/// The released cell to withhold next to unpin `cell`: the smallest non-zero released cell
/// (then a zero) in any line through `cell`.
fn smallest_released_in_lines_of(
    cell: usize,
    lines: &[Vec<usize>],
    counts: &[u64],
    withheld: &[bool],
    known: &[bool],
) -> Option<usize> {
    let is_known = |cell: usize| known.get(cell).copied().unwrap_or(false);
    lines
        .iter()
        .filter(|line| line.contains(&cell))
        .flatten()
        .copied()
        .filter(|&other| !withheld[other])
        .min_by_key(|&other| (is_known(other), counts[other] == 0, counts[other], other))
}

/// Applies disclosure control with threshold `k`.
pub fn apply(table: &RawTable, k: u32) -> DisclosedTable {
    apply_with(table, k, &[], false)
}

/// Applies disclosure control with threshold `k`, where `forced` cells (and the total, when
/// `total_forced`) must be withheld as well, for the reason given — query-set overlap
/// control's or the dominance rule's decisions, which complementary suppression then protects
/// like small cells.
pub fn apply_with(
    table: &RawTable,
    k: u32,
    forced: &[Option<Reason>],
    total_forced: bool,
) -> DisclosedTable {
    apply_knowing(table, k, forced, total_forced, &[])
}

/// Like [`apply_with`], where the `known` cells' values a reader may already know (their
/// records were released before, see overlap control, or they are empty by the query's own
/// definition): withholding them protects nothing, so complementary suppression does not
/// count on them.
pub fn apply_knowing(
    table: &RawTable,
    k: u32,
    forced: &[Option<Reason>],
    total_forced: bool,
    known: &[bool],
) -> DisclosedTable {
    let counts = &table.counts;
    let primary: Vec<bool> = counts.iter().map(|&count| is_small(count, k)).collect();
    let forced_for: Vec<Option<Reason>> = (0..counts.len())
        .map(|cell| {
            forced
                .get(cell)
                .copied()
                .flatten()
                .filter(|_| !primary[cell])
        })
        .collect();
    let mut withheld: Vec<bool> = primary
        .iter()
        .zip(&forced_for)
        .map(|(small, forced)| *small || forced.is_some())
        .collect();
    let all_lines = lines(&table.shape);
    let whole_table = all_lines.len().saturating_sub(1);
    // The whole table is the last line; a withheld total must not be derivable from it.
    let must_hide = |index: usize| total_forced && index == whole_table && counts.len() > 1;
    if total_forced && counts.len() == 1 {
        // A one-cell table's cell is its total.
        withheld[0] = true;
    }
    if withheld.contains(&true) || total_forced {
        // Each pass only adds withheld cells, so this ends after at most one pass per cell.
        loop {
            let mut changed = false;
            for (index, line) in all_lines.iter().enumerate() {
                if !line_holds(line, counts, &withheld, known, k, must_hide(index)) {
                    changed |=
                        complete_line(line, counts, &mut withheld, known, k, must_hide(index));
                }
            }
            if changed {
                continue;
            }
            // Every line holds on its own; now no withheld cell may be solvable from all the
            // lines together (a bridge between groups of withheld cells).
            let determined = solvable::determined(&all_lines, &withheld);
            for &cell in &determined {
                if let Some(extra) =
                    smallest_released_in_lines_of(cell, &all_lines, counts, &withheld, known)
                {
                    withheld[extra] = true;
                    changed = true;
                }
            }
            if !changed {
                if !determined.is_empty() {
                    // Nothing is left to withhold beside a solvable cell: withhold the whole
                    // table rather than release a solvable one.
                    withheld.iter_mut().for_each(|cell| *cell = true);
                }
                break;
            }
        }
    }
    let total_count = table.total();
    let whole_table_holds = line_holds(
        &(0..counts.len()).collect::<Vec<_>>(),
        counts,
        &withheld,
        known,
        k,
        false,
    );
    let total = if is_small(total_count, k) || !whole_table_holds {
        // Nothing can protect a small total: everything is withheld.
        withheld.iter_mut().for_each(|cell| *cell = true);
        Outcome::Withheld
    } else if total_forced {
        Outcome::Withheld
    } else {
        Outcome::Released(total_count)
    };
    let cells: Vec<Outcome> = counts
        .iter()
        .zip(&withheld)
        .map(|(&count, &hidden)| {
            if hidden {
                Outcome::Withheld
            } else {
                Outcome::Released(count)
            }
        })
        .collect();
    let mut withheld_by_reason = BTreeMap::new();
    for cell in 0..counts.len() {
        if withheld[cell] {
            let reason = if primary[cell] {
                Reason::Threshold
            } else {
                forced_for[cell].unwrap_or(Reason::Complementary)
            };
            *withheld_by_reason.entry(reason).or_insert(0) += 1;
        }
    }
    let mut mechanisms = BTreeSet::new();
    if withheld.contains(&true) || total == Outcome::Withheld {
        mechanisms.insert(Mechanism::SmallCellSuppression);
        if counts.len() > 1 {
            mechanisms.insert(Mechanism::ComplementarySuppression);
        }
    }
    // Withholding a large cell already shows that something acted; naming the rule tells the
    // study lead why, and adds nothing about any value.
    if forced_for.contains(&Some(Reason::Overlap)) || total_forced {
        mechanisms.insert(Mechanism::QueryOverlapControl);
    }
    if forced_for.contains(&Some(Reason::Dominance)) {
        mechanisms.insert(Mechanism::DominanceRule);
    }
    DisclosedTable {
        k,
        cells,
        total,
        mechanisms,
        withheld_by_reason,
    }
}

/// Rounds every released value to the nearest multiple of `base` (halves up), after every
/// suppression decision was made on true values; withheld values stay withheld. Each value is
/// rounded on its own, so a rounded total need not equal the sum of rounded cells.
pub fn round_released(table: &mut DisclosedTable, base: u32) {
    if base < 2 {
        return;
    }
    let base = u64::from(base);
    let round = |outcome: &mut Outcome| {
        if let Outcome::Released(count) = outcome {
            *count = (*count + base / 2) / base * base;
        }
    };
    table.cells.iter_mut().for_each(round);
    round(&mut table.total);
    table.mechanisms.insert(Mechanism::Rounding);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(counts: &[u64]) -> RawTable {
        RawTable {
            shape: vec![counts.len()],
            counts: counts.to_vec(),
        }
    }

    fn grid(shape: &[usize], counts: &[u64]) -> RawTable {
        RawTable {
            shape: shape.to_vec(),
            counts: counts.to_vec(),
        }
    }

    fn hidden(disclosed: &DisclosedTable) -> Vec<bool> {
        disclosed
            .cells
            .iter()
            .map(|cell| *cell == Outcome::Withheld)
            .collect()
    }

    /// Checks the rule on every row, column and pillar of the answer, written independently
    /// of the implementation: in each, no cell withheld; or two or more withheld summing to at
    /// least k; or every cell withheld and the line's sum below k.
    fn assert_every_line_holds(raw: &RawTable, disclosed: &DisclosedTable) {
        let withheld = hidden(disclosed);
        let shape = &raw.shape;
        let at = |coordinates: &[usize]| {
            coordinates
                .iter()
                .zip(shape)
                .fold(0, |index, (coordinate, length)| index * length + coordinate)
        };
        let k = u64::from(disclosed.k);
        let cells: usize = shape.iter().product();
        for axis in 0..shape.len() {
            for start in 0..cells {
                let mut coordinates = fedq_proto::template::cell_coordinates(shape, start)
                    .into_iter()
                    .map(|coordinate| coordinate as usize)
                    .collect::<Vec<_>>();
                if coordinates[axis] != 0 {
                    continue;
                }
                let mut hidden_sum = 0;
                let mut hidden_number = 0;
                let mut line_sum = 0;
                for level in 0..shape[axis] {
                    coordinates[axis] = level;
                    let index = at(&coordinates);
                    line_sum += raw.counts[index];
                    if withheld[index] {
                        hidden_number += 1;
                        hidden_sum += raw.counts[index];
                    }
                }
                let holds = hidden_number == 0
                    || (hidden_number >= 2 && hidden_sum >= k)
                    || (hidden_number == shape[axis] && line_sum < k);
                assert!(
                    holds,
                    "axis {axis} line from cell {start} of {:?}: withheld {withheld:?}",
                    raw.counts
                );
            }
        }
    }

    #[test]
    fn counts_from_one_to_k_minus_one_are_withheld_zero_and_k_released() {
        let disclosed = apply(&table(&[0, 1, 9, 10, 250]), 10);
        assert_eq!(
            disclosed.cells,
            [
                Outcome::Released(0),
                Outcome::Withheld,
                Outcome::Withheld,
                Outcome::Released(10),
                Outcome::Released(250)
            ]
        );
        assert_eq!(disclosed.withheld_cells(), 2);
        // 1 + 9 reach k: no complementary cell is needed and the total is safe to release.
        assert_eq!(disclosed.total, Outcome::Released(270));
    }

    #[test]
    fn a_single_small_cell_gets_the_smallest_complement_and_the_total_is_released() {
        let disclosed = apply(&table(&[3, 40, 25, 0]), 10);
        assert_eq!(
            disclosed.cells,
            [
                Outcome::Withheld,
                Outcome::Released(40),
                Outcome::Withheld,
                Outcome::Released(0)
            ]
        );
        assert_eq!(disclosed.total, Outcome::Released(68));
        assert_eq!(
            disclosed.withheld_by_reason,
            BTreeMap::from([(Reason::Threshold, 1), (Reason::Complementary, 1)])
        );
    }

    #[test]
    fn small_cells_that_together_stay_below_k_get_a_complement() {
        let disclosed = apply(&table(&[2, 3, 40, 50]), 10);
        assert_eq!(
            hidden(&disclosed),
            [true, true, true, false],
            "2 + 3 < 10, so the 40 joins them"
        );
        assert_eq!(disclosed.total, Outcome::Released(95));
    }

    #[test]
    fn rows_and_columns_of_a_two_way_table_each_hold() {
        // 3 x 3: one small cell in the middle.
        let raw = grid(&[3, 3], &[50, 60, 70, 80, 4, 90, 100, 110, 120]);
        let disclosed = apply(&raw, 10);
        assert_every_line_holds(&raw, &disclosed);
        // The small cell cannot be the only withheld cell of its row or column.
        let withheld = hidden(&disclosed);
        assert!(withheld[4]);
        assert!(withheld.iter().filter(|cell| **cell).count() >= 4);
        assert!(matches!(disclosed.total, Outcome::Released(_)));
    }

    #[test]
    fn no_withheld_cell_is_solvable_from_margins_in_the_auditors_bridge_table() {
        // A 5 x 4 table where the per-line rule alone left a bridge cell solvable from the
        // row and column margins: (43-20) + (30-10-0) - (95-75) - (80-60) = 3.
        let raw = grid(
            &[5, 4],
            &[
                10, 60, 20, 2, 2, 15, 40, 60, 20, 8, 12, 3, 10, 12, 8, 0, 0, 0, 0, 0,
            ],
        );
        let disclosed = apply(&raw, 10);
        assert_every_line_holds(&raw, &disclosed);
        let withheld = hidden(&disclosed);
        assert!(
            solvable::determined(&lines(&raw.shape), &withheld).is_empty(),
            "withheld {withheld:?}"
        );
    }

    #[test]
    fn no_withheld_cell_is_solvable_on_many_tables() {
        for seed in 0..300u64 {
            let shape = [3 + (seed % 3) as usize, 2 + (seed % 4) as usize];
            let cells: usize = shape.iter().product();
            let counts: Vec<u64> = (0..cells as u64)
                .map(|index| {
                    let value = (index * 7919 + seed * 104_729 + seed * seed) % 71;
                    if value % 4 == 0 { value % 9 } else { value }
                })
                .collect();
            let raw = grid(&shape, &counts);
            let disclosed = apply(&raw, 10);
            let withheld = hidden(&disclosed);
            if withheld.iter().all(|cell| *cell) {
                continue;
            }
            assert!(
                solvable::determined(&lines(&raw.shape), &withheld).is_empty(),
                "{counts:?} shape {shape:?} withheld {withheld:?}"
            );
        }
    }

    #[test]
    fn every_line_holds_on_many_three_way_tables() {
        // A deterministic spread of tables with small cells in varied places.
        for seed in 0..200u64 {
            let shape = [2 + (seed % 3) as usize, 3, 2 + (seed % 2) as usize];
            let cells: usize = shape.iter().product();
            let counts: Vec<u64> = (0..cells as u64)
                .map(|index| {
                    let value = (index * 7919 + seed * 104_729) % 97;
                    if value % 5 == 0 { value % 9 } else { value }
                })
                .collect();
            let raw = grid(&shape, &counts);
            let disclosed = apply(&raw, 10);
            if disclosed.total != Outcome::Withheld {
                assert_every_line_holds(&raw, &disclosed);
            }
        }
    }

    #[test]
    fn a_line_that_cannot_reach_k_is_withheld_entirely() {
        // The only other cell of the column is 2: 3 + 2 < 10 even with both withheld, so the
        // row constraint and the table total decide; the small total withholds everything.
        let disclosed = apply(&table(&[3, 2]), 10);
        assert_eq!(hidden(&disclosed), [true, true]);
        assert_eq!(disclosed.total, Outcome::Withheld);
    }

    #[test]
    fn mechanisms_do_not_reveal_whether_withheld_cells_sum_to_k() {
        let below = apply(&table(&[3, 4, 50, 60]), 10);
        let above = apply(&table(&[6, 7, 50, 60]), 10);
        // Below k, a complement joins; the reported mechanisms are the same either way.
        assert_eq!(below.mechanisms, above.mechanisms);
    }

    #[test]
    fn nothing_small_means_nothing_withheld_and_no_mechanism() {
        let disclosed = apply(&table(&[0, 40, 50]), 10);
        assert_eq!(disclosed.total, Outcome::Released(90));
        assert!(disclosed.mechanisms.is_empty());
        assert!(disclosed.withheld_by_reason.is_empty());
    }

    #[test]
    fn small_total_is_withheld_even_without_strata() {
        let disclosed = apply(&table(&[4]), 5);
        assert_eq!(disclosed.cells, [Outcome::Withheld]);
        assert_eq!(disclosed.total, Outcome::Withheld);
    }

    #[test]
    fn rounding_acts_on_released_values_after_suppression_decided_on_true_ones() {
        // 12 rounds to 10 and 3 to 5, but 3 is small: it is withheld before any rounding,
        // and its complement is chosen on the true counts.
        let mut disclosed = apply(&table(&[3, 12, 40, 0]), 10);
        round_released(&mut disclosed, 5);
        assert_eq!(
            disclosed.cells,
            [
                Outcome::Withheld,
                Outcome::Withheld,
                Outcome::Released(40),
                Outcome::Released(0)
            ]
        );
        assert_eq!(disclosed.total, Outcome::Released(55));
        assert!(disclosed.mechanisms.contains(&Mechanism::Rounding));
        let mut plain = apply(&table(&[12, 17, 22]), 10);
        round_released(&mut plain, 5);
        assert_eq!(
            plain.cells,
            [
                Outcome::Released(10),
                Outcome::Released(15),
                Outcome::Released(20)
            ]
        );
        assert_eq!(plain.total, Outcome::Released(50));
    }

    #[test]
    fn template_minimum_raises_but_never_lowers_the_floor() {
        assert_eq!(effective_k(10, Some(3)), 10);
        assert_eq!(effective_k(10, Some(20)), 20);
        assert_eq!(effective_k(10, None), 10);
    }

    #[test]
    fn a_row_empty_by_definition_protects_no_small_cell() {
        // Rows: two categories the filter admits, then their `missing` row, which the filter
        // empties. Taken as unknowns, its zeros left the small 3 (row 2, column 1) looking
        // protected; a reader who knows the row is empty solves it from the margins: column 3
        // gives the 12, row 1 then the 0 beside it, and column 1 the 3.
        let raw = grid(&[3, 3], &[0, 0, 12, 3, 12, 0, 0, 0, 0]);
        let empty = [false, false, false, false, false, false, true, true, true];
        let lines = lines(&raw.shape);
        let solvable = |disclosed: &DisclosedTable| {
            let withheld = hidden(disclosed);
            let unknown: Vec<bool> = (0..withheld.len())
                .map(|cell| withheld[cell] && !empty[cell])
                .collect();
            solvable::determined(&lines, &unknown)
        };
        assert!(solvable(&apply(&raw, 10)).contains(&3));
        let disclosed = apply_knowing(&raw, 10, &[], false, &empty);
        assert!(solvable(&disclosed).is_empty(), "{:?}", hidden(&disclosed));
    }
}
