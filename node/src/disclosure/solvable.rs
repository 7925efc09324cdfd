//! Which withheld cells an attacker can solve for exactly. Every line sum of a table (each
//! margin, and the total) can be asked for by another query, and the released cells are known,
//! so each line gives one linear equation over its withheld cells. A withheld cell is exactly
//! determined when its unit vector lies in the row space of those equations — for example a
//! "bridge" cell joining two otherwise separate groups of withheld cells. The per-line rule of
//! complementary suppression cannot see that; this rank test can.
//!
//! Arithmetic is modulo the prime 2^61 - 1. A cell determined over the rationals is determined
//! modulo the prime too (the equations have 0/1 coefficients and small tables, so no
//! denominator is a multiple of the prime); the reverse error would only withhold more.
//! Unknowns are split into connected groups (cells sharing lines) and each is solved alone.

/// The prime modulus.
const PRIME: u64 = (1 << 61) - 1;

/// Most unknowns in one connected group that are solved exactly; larger groups are reported as
/// wholly determined (the caller then withholds more), which only errs on the safe side.
const MOST_UNKNOWNS: usize = 400;

fn multiply(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % PRIME as u128) as u64
}

fn subtract(a: u64, b: u64) -> u64 {
    (a + PRIME - b) % PRIME
}

fn inverse(a: u64) -> u64 {
    // Fermat: a^(p-2).
    let (mut base, mut exponent, mut result) = (a, PRIME - 2, 1u64);
    while exponent > 0 {
        if exponent & 1 == 1 {
            result = multiply(result, base);
        }
        base = multiply(base, base);
        exponent >>= 1;
    }
    result
}

/// The withheld cells (indices into the grid) that `lines` — each a set of cells whose sum is
/// known — determine exactly, given that all other cells are released.
pub fn determined(lines: &[Vec<usize>], withheld: &[bool]) -> Vec<usize> {
    let unknowns: Vec<usize> = (0..withheld.len()).filter(|&cell| withheld[cell]).collect();
    if unknowns.is_empty() {
        return Vec::new();
    }
    // Equations restricted to withheld cells.
    let equations: Vec<Vec<usize>> = lines
        .iter()
        .map(|line| {
            line.iter()
                .copied()
                .filter(|&cell| withheld[cell])
                .collect::<Vec<_>>()
        })
        .filter(|equation| !equation.is_empty())
        .collect();
    let mut found = Vec::new();
    for group in groups(&unknowns, &equations) {
        if group.len() > MOST_UNKNOWNS {
            found.extend(group);
            continue;
        }
        let column: std::collections::HashMap<usize, usize> = group
            .iter()
            .enumerate()
            .map(|(index, &cell)| (cell, index))
            .collect();
        let rows: Vec<Vec<u64>> = equations
            .iter()
            .filter(|equation| column.contains_key(&equation[0]))
            .map(|equation| {
                let mut row = vec![0u64; group.len()];
                for cell in equation {
                    row[column[cell]] = 1;
                }
                row
            })
            .collect();
        let basis = reduce(rows, group.len());
        for (index, &cell) in group.iter().enumerate() {
            let mut unit = vec![0u64; group.len()];
            unit[index] = 1;
            if in_span(&basis, unit) {
                found.push(cell);
            }
        }
    }
    found.sort_unstable();
    found
}

/// Groups of unknowns connected through shared equations.
fn groups(unknowns: &[usize], equations: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let position: std::collections::HashMap<usize, usize> = unknowns
        .iter()
        .enumerate()
        .map(|(index, &cell)| (cell, index))
        .collect();
    let mut parent: Vec<usize> = (0..unknowns.len()).collect();
    fn root(parent: &mut [usize], mut node: usize) -> usize {
        while parent[node] != node {
            parent[node] = parent[parent[node]];
            node = parent[node];
        }
        node
    }
    for equation in equations {
        let first = position[&equation[0]];
        for cell in &equation[1..] {
            let (a, b) = (root(&mut parent, first), root(&mut parent, position[cell]));
            if a != b {
                parent[a] = b;
            }
        }
    }
    let mut by_root: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (index, &cell) in unknowns.iter().enumerate() {
        by_root
            .entry(root(&mut parent, index))
            .or_default()
            .push(cell);
    }
    by_root.into_values().collect()
}

/// A basis in row-echelon form: (pivot column, row) pairs with the pivot normalised to 1.
fn reduce(rows: Vec<Vec<u64>>, columns: usize) -> Vec<(usize, Vec<u64>)> {
    let mut basis: Vec<(usize, Vec<u64>)> = Vec::new();
    for mut row in rows {
        for (pivot, base) in &basis {
            let factor = row[*pivot];
            if factor != 0 {
                for column in 0..columns {
                    row[column] = subtract(row[column], multiply(factor, base[column]));
                }
            }
        }
        if let Some(pivot) = row.iter().position(|&value| value != 0) {
            let scale = inverse(row[pivot]);
            for value in &mut row {
                *value = multiply(*value, scale);
            }
            // Keep the basis reduced: clear this pivot from earlier rows.
            for (_, base) in &mut basis {
                let factor = base[pivot];
                if factor != 0 {
                    for column in 0..columns {
                        base[column] = subtract(base[column], multiply(factor, row[column]));
                    }
                }
            }
            basis.push((pivot, row));
        }
    }
    basis
}

fn in_span(basis: &[(usize, Vec<u64>)], mut vector: Vec<u64>) -> bool {
    for (pivot, base) in basis {
        let factor = vector[*pivot];
        if factor != 0 {
            for (value, base_value) in vector.iter_mut().zip(base) {
                *value = subtract(*value, multiply(factor, *base_value));
            }
        }
    }
    vector.iter().all(|&value| value == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines (rows, columns, total) of an r x c grid.
    fn grid_lines(rows: usize, columns: usize) -> Vec<Vec<usize>> {
        let mut lines: Vec<Vec<usize>> = (0..rows)
            .map(|row| (0..columns).map(|column| row * columns + column).collect())
            .collect();
        lines.extend(
            (0..columns).map(|column| (0..rows).map(|row| row * columns + column).collect()),
        );
        lines.push((0..rows * columns).collect());
        lines
    }

    #[test]
    fn a_two_by_two_rectangle_of_withheld_cells_is_not_determined() {
        let mut withheld = vec![false; 9];
        for cell in [0, 1, 3, 4] {
            withheld[cell] = true;
        }
        assert!(determined(&grid_lines(3, 3), &withheld).is_empty());
    }

    #[test]
    fn a_bridge_cell_between_two_rectangles_is_determined() {
        // The auditor's 5 x 4 example: withheld cells (0,0) (0,3) (1,0) (1,3) form one
        // rectangle, (2,1) (2,2) (3,1) (3,2) another, and (2,3) joins them.
        let mut withheld = vec![false; 20];
        for (row, column) in [
            (0, 0),
            (0, 3),
            (1, 0),
            (1, 3),
            (2, 1),
            (2, 2),
            (2, 3),
            (3, 1),
            (3, 2),
        ] {
            withheld[row * 4 + column] = true;
        }
        assert_eq!(determined(&grid_lines(5, 4), &withheld), [2 * 4 + 3]);
    }

    #[test]
    fn a_single_withheld_cell_in_a_line_is_determined() {
        let mut withheld = vec![false; 4];
        withheld[2] = true;
        assert_eq!(determined(&grid_lines(2, 2), &withheld), [2]);
    }
}
