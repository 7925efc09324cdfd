//! Disclosure across the sections of one answer. A data-quality profile releases several
//! one-way tables over the same records; each is a partition of them into its released cells
//! and one group of its withheld cells (whose sum is known from the total). A reader knows the
//! count of every union of one section's parts, and of every union of another's; if some union
//! of one comes within 1 to k-1 records of a union of the other, the difference of the two
//! counts is a small count about those records (for example a small withheld cell recovered
//! through a check whose records are exactly a withheld "missing" cell of a profiled column).
//!
//! Two partitions of the same records are safe exactly when, in the graph whose nodes are
//! their parts and whose edges weigh how many records two parts share, every connected
//! component's minimum cut is 0 (it cannot be split) or at least k: a cut of weight w is a
//! pair of unions that differ by exactly w records. Minimum cuts are found with Stoer and
//! Wagner's algorithm (parts are few: a section has at most a few dozen levels).

use roaring::{MultiOps, RoaringBitmap};

/// One part of a section's partition: a released cell (its index) or the group of withheld
/// cells (`None`), with its records.
#[derive(Debug, Clone)]
pub struct Part {
    pub cell: Option<usize>,
    pub records: RoaringBitmap,
}

/// A decided section as a partition: each released cell with records, then the union of the
/// withheld cells. `released[cell]` says which cells were released.
pub fn partition(released: &[bool], sets: &[RoaringBitmap]) -> Vec<Part> {
    let mut parts: Vec<Part> = released
        .iter()
        .zip(sets)
        .enumerate()
        .filter(|(_, (released, set))| **released && !set.is_empty())
        .map(|(cell, (_, set))| Part {
            cell: Some(cell),
            records: set.clone(),
        })
        .collect();
    let withheld: RoaringBitmap = released
        .iter()
        .zip(sets)
        .filter(|(released, _)| !**released)
        .map(|(_, set)| set)
        .union();
    if !withheld.is_empty() {
        parts.push(Part {
            cell: None,
            records: withheld,
        });
    }
    parts
}

/// If some union of `new`'s parts comes within 1 to k-1 records of a union of `earlier`'s,
/// the released cells of `new` on the lighter side of such a cut that touch a cut edge (at
/// least one, unless only the withheld group does); `None` when the two are safe together.
pub fn too_close(earlier: &[Part], new: &[Part], k: u32) -> Option<Vec<usize>> {
    let nodes = earlier.len() + new.len();
    let mut weights = vec![vec![0u64; nodes]; nodes];
    for (a, left) in earlier.iter().enumerate() {
        for (b, right) in new.iter().enumerate() {
            let shared = left.records.intersection_len(&right.records);
            weights[a][earlier.len() + b] = shared;
            weights[earlier.len() + b][a] = shared;
        }
    }
    for component in components(&weights) {
        if component.len() < 2 {
            continue;
        }
        let (cut, side) = minimum_cut(&weights, &component);
        if cut == 0 || cut >= u64::from(k) {
            continue;
        }
        // Withhold a released cell of the new section on a cut edge; prefer one on the other
        // side from the withheld group, whose merging into it removes the edge.
        let withheld_node = new
            .iter()
            .position(|part| part.cell.is_none())
            .map(|index| earlier.len() + index);
        let withheld_side = withheld_node.map(|node| side.contains(&node));
        let mut candidates: Vec<(bool, usize)> = Vec::new();
        for &node in component.iter().filter(|&&node| node >= earlier.len()) {
            let Some(cell) = new[node - earlier.len()].cell else {
                continue;
            };
            let on_side = side.contains(&node);
            let on_cut_edge = component
                .iter()
                .any(|&other| side.contains(&other) != on_side && weights[node][other] > 0);
            if on_cut_edge {
                candidates.push((withheld_side == Some(on_side), cell));
            }
        }
        candidates.sort();
        return Some(candidates.into_iter().map(|(_, cell)| cell).collect());
    }
    None
}

/// The connected components of the graph (nodes joined by a positive weight).
fn components(weights: &[Vec<u64>]) -> Vec<Vec<usize>> {
    let mut seen = vec![false; weights.len()];
    let mut found = Vec::new();
    for start in 0..weights.len() {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut component = vec![start];
        let mut next = 0;
        while next < component.len() {
            let node = component[next];
            next += 1;
            for (other, &weight) in weights[node].iter().enumerate() {
                if weight > 0 && !seen[other] {
                    seen[other] = true;
                    component.push(other);
                }
            }
        }
        found.push(component);
    }
    found
}

/// Stoer–Wagner: the weight of a minimum cut of the connected `nodes`, and one side of it.
fn minimum_cut(weights: &[Vec<u64>], nodes: &[usize]) -> (u64, Vec<usize>) {
    // Each active vertex stands for the original nodes merged into it.
    let mut groups: Vec<Vec<usize>> = nodes.iter().map(|&node| vec![node]).collect();
    let mut graph: Vec<Vec<u64>> = nodes
        .iter()
        .map(|&a| nodes.iter().map(|&b| weights[a][b]).collect())
        .collect();
    let mut active: Vec<usize> = (0..nodes.len()).collect();
    let mut best = (u64::MAX, Vec::new());
    while active.len() > 1 {
        // Maximum-adjacency order: repeatedly add the vertex most tightly connected to the
        // ones added so far.
        let mut added = vec![false; nodes.len()];
        let mut connection = vec![0u64; nodes.len()];
        let (mut previous, mut last) = (active[0], active[0]);
        for _ in 0..active.len() {
            let next = active
                .iter()
                .copied()
                .filter(|&vertex| !added[vertex])
                .max_by_key(|&vertex| connection[vertex])
                .expect("a vertex is left");
            added[next] = true;
            previous = last;
            last = next;
            for &vertex in &active {
                if !added[vertex] {
                    connection[vertex] += graph[next][vertex];
                }
            }
        }
        // The cut of the phase separates the last vertex added from the rest.
        if connection[last] < best.0 {
            best = (connection[last], groups[last].clone());
        }
        // Merge the last vertex into the one added before it.
        let merged = std::mem::take(&mut groups[last]);
        groups[previous].extend(merged);
        for &vertex in &active {
            graph[previous][vertex] += graph[last][vertex];
            graph[vertex][previous] = graph[previous][vertex];
        }
        graph[previous][previous] = 0;
        active.retain(|&vertex| vertex != last);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: impl IntoIterator<Item = u32>) -> RoaringBitmap {
        values.into_iter().collect()
    }

    fn released(cell: usize, records: RoaringBitmap) -> Part {
        Part {
            cell: Some(cell),
            records,
        }
    }

    #[test]
    fn a_check_equal_to_a_withheld_missing_cell_is_too_close() {
        // A profiled column: two bands released (0..700, 700..1900), the withheld group holds
        // a small band (1900..1902) and "missing" (1902..2000).
        let column = vec![
            released(0, set(0..700)),
            released(1, set(700..1900)),
            Part {
                cell: None,
                records: set(1900..2000),
            },
        ];
        // A check whose "cannot be evaluated" cell is exactly the missing records.
        let check = vec![released(0, set(0..1902)), released(2, set(1902..2000))];
        let cells = too_close(&column, &check, 10).expect("a cut of 2 records");
        assert!(!cells.is_empty());
        // Once the check withholds it, the two are safe together.
        let check = vec![Part {
            cell: None,
            records: set(0..2000),
        }];
        assert_eq!(too_close(&column, &check, 10), None);
    }

    #[test]
    fn partitions_that_agree_or_differ_by_k_or_more_are_safe() {
        let bands = vec![released(0, set(0..500)), released(1, set(500..1000))];
        assert_eq!(too_close(&bands, &bands.clone(), 10), None, "identical");
        let shifted = vec![released(0, set(0..510)), released(1, set(510..1000))];
        assert_eq!(too_close(&bands, &shifted, 10), None, "ten records apart");
        let nearly = vec![released(0, set(0..503)), released(1, set(503..1000))];
        assert_eq!(too_close(&bands, &nearly, 10), Some(vec![0]));
    }

    #[test]
    fn a_union_of_bands_close_to_a_check_is_found_across_several_parts() {
        // Age bands 0..37, 37..74, 74..150; a check "under 65 and not self-harm" covers the
        // first two bands but 6 self-harm records spread over both.
        let age = vec![
            released(0, set(0..37)),
            released(1, set(37..74)),
            released(2, set(74..150)),
        ];
        let plausible: RoaringBitmap = (0..74).filter(|record| record % 12 != 0).collect();
        let rest: RoaringBitmap = (0..150)
            .filter(|record| !plausible.contains(*record))
            .collect();
        assert_eq!(74 - plausible.len(), 7);
        let check = vec![released(0, plausible), released(1, rest)];
        assert!(too_close(&age, &check, 10).is_some());
    }

    #[test]
    fn the_minimum_cut_is_found_on_a_known_graph() {
        // Two triangles joined by an edge of weight 1.
        let mut weights = vec![vec![0u64; 6]; 6];
        for (a, b, w) in [
            (0, 1, 5),
            (1, 2, 5),
            (0, 2, 5),
            (3, 4, 5),
            (4, 5, 5),
            (3, 5, 5),
            (2, 3, 1),
        ] {
            weights[a][b] = w;
            weights[b][a] = w;
        }
        let (cut, mut side) = minimum_cut(&weights, &[0, 1, 2, 3, 4, 5]);
        side.sort();
        assert_eq!(cut, 1);
        assert!(side == [0, 1, 2] || side == [3, 4, 5], "{side:?}");
    }
}
