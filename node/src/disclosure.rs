//! Disclosure control: turns a table of true counts into what may leave the node.
//!
//! Every decision is made on true values, in this order:
//! 1. small-cell suppression: a cell whose count is from 1 to k-1 is withheld;
//! 2. complementary suppression: whenever any cell is withheld, the total is withheld too, so
//!    no withheld cell can be recovered by subtracting the released cells from the total.
//!
//! Which mechanisms an answer reports depends only on whether anything was withheld, so the
//! report itself says nothing about the withheld values.
//!
//! k is the larger of the node's floor and the template's own minimum; nothing the
//! coordinator sends can lower it. A withheld value is represented by [`Outcome::Withheld`],
//! which carries no number.

use std::collections::BTreeSet;

use fedq_proto::wire::Mechanism;

use crate::plan::RawTable;

/// What happens to one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Released(u64),
    Withheld,
}

/// The releasable form of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisclosedTable {
    /// The threshold applied.
    pub k: u32,
    /// One outcome per cell, in the raw table's order.
    pub cells: Vec<Outcome>,
    pub total: Outcome,
    /// Mechanisms that withheld or altered something in this answer.
    pub mechanisms: BTreeSet<Mechanism>,
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

/// Applies disclosure control with threshold `k`.
pub fn apply(table: &RawTable, k: u32) -> DisclosedTable {
    let mut mechanisms = BTreeSet::new();
    let cells: Vec<Outcome> = table
        .counts
        .iter()
        .map(|&count| {
            if is_small(count, k) {
                mechanisms.insert(Mechanism::SmallCellSuppression);
                Outcome::Withheld
            } else {
                Outcome::Released(count)
            }
        })
        .collect();
    // The total is withheld whenever any cell is (its value would give the withheld cells'
    // sum away) or when it is small itself. The mechanisms reported depend only on whether
    // anything was withheld, never on the withheld values.
    let total_count = table.total();
    let total = if cells.contains(&Outcome::Withheld) || is_small(total_count, k) {
        mechanisms.insert(Mechanism::SmallCellSuppression);
        mechanisms.insert(Mechanism::ComplementarySuppression);
        Outcome::Withheld
    } else {
        Outcome::Released(total_count)
    };
    DisclosedTable {
        k,
        cells,
        total,
        mechanisms,
    }
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
    }

    #[test]
    fn total_is_withheld_when_any_cell_is() {
        let disclosed = apply(&table(&[3, 40, 50]), 10);
        assert_eq!(disclosed.total, Outcome::Withheld);
        assert!(
            disclosed
                .mechanisms
                .contains(&Mechanism::ComplementarySuppression)
        );
    }

    #[test]
    fn mechanisms_do_not_reveal_whether_withheld_cells_sum_to_k() {
        let below = apply(&table(&[3, 4, 0, 50]), 10);
        let above = apply(&table(&[6, 7, 0, 50]), 10);
        assert_eq!(below.cells, above.cells);
        assert_eq!(below.total, above.total);
        assert_eq!(below.mechanisms, above.mechanisms);
    }

    #[test]
    fn total_is_released_when_nothing_is_withheld() {
        let disclosed = apply(&table(&[0, 40, 50]), 10);
        assert_eq!(disclosed.total, Outcome::Released(90));
        assert!(disclosed.mechanisms.is_empty());
    }

    #[test]
    fn small_total_is_withheld_even_without_strata() {
        let disclosed = apply(&table(&[4]), 5);
        assert_eq!(disclosed.cells, [Outcome::Withheld]);
        assert_eq!(disclosed.total, Outcome::Withheld);
    }

    #[test]
    fn template_minimum_raises_but_never_lowers_the_floor() {
        assert_eq!(effective_k(10, Some(3)), 10);
        assert_eq!(effective_k(10, Some(20)), 20);
        assert_eq!(effective_k(10, None), 10);
    }
}
