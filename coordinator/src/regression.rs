//! Federated logistic regression at the coordinator: Newton-Raphson on the sum of the sites'
//! parts. Each iteration sends the current coefficients to every pooled site; each returns its
//! information matrix X'WX, score X'(y - p) and log-likelihood at them, and nothing else; the
//! step is (sum of X'WX)^-1 (sum of scores). The result equals fitting the pooled records
//! together. Standard errors come from the inverse information at the estimate.

use fedq_proto::wire;

/// Most iterations the coordinator runs (sites cap theirs too).
pub const MOST_ITERATIONS: u32 = 25;

/// Relative change of the log-likelihood below which the fit has converged.
const TOLERANCE: f64 = 1e-10;

/// The normal quantile of a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// Sum of the pooled sites' parts at one coefficient vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sum {
    pub records: u64,
    pub information: Vec<f64>,
    pub score: Vec<f64>,
    pub log_likelihood: f64,
}

impl Sum {
    pub fn new(parameters: usize) -> Sum {
        Sum {
            records: 0,
            information: vec![0.0; parameters * parameters],
            score: vec![0.0; parameters],
            log_likelihood: 0.0,
        }
    }

    /// Adds a site's part after checking its shape and values.
    pub fn add(&mut self, part: &wire::RegressionPart) -> Result<(), String> {
        if part.information.len() != self.information.len() || part.score.len() != self.score.len()
        {
            return Err("the site's regression part has the wrong number of terms".into());
        }
        let finite = part
            .information
            .iter()
            .chain(&part.score)
            .chain([&part.log_likelihood])
            .all(|value| value.is_finite());
        if !finite || part.log_likelihood > 0.0 {
            return Err("the site's regression part holds values that are not finite".into());
        }
        self.records += part.records;
        for (total, value) in self.information.iter_mut().zip(&part.information) {
            *total += value;
        }
        for (total, value) in self.score.iter_mut().zip(&part.score) {
            *total += value;
        }
        self.log_likelihood += part.log_likelihood;
        Ok(())
    }
}

/// The inverse of a symmetric positive definite matrix (Gauss-Jordan with partial pivoting);
/// none when it is (numerically) singular.
pub fn invert(matrix: &[f64], size: usize) -> Option<Vec<f64>> {
    let mut left = matrix.to_vec();
    let mut right = vec![0.0; size * size];
    for index in 0..size {
        right[index * size + index] = 1.0;
    }
    let scale = matrix
        .iter()
        .fold(0.0_f64, |most, value| most.max(value.abs()));
    for column in 0..size {
        let pivot = (column..size).max_by(|a, b| {
            left[a * size + column]
                .abs()
                .total_cmp(&left[b * size + column].abs())
        })?;
        if left[pivot * size + column].abs() <= scale * 1e-14 {
            return None;
        }
        for index in 0..size {
            left.swap(column * size + index, pivot * size + index);
            right.swap(column * size + index, pivot * size + index);
        }
        let divisor = left[column * size + column];
        for index in 0..size {
            left[column * size + index] /= divisor;
            right[column * size + index] /= divisor;
        }
        for row in 0..size {
            if row == column {
                continue;
            }
            let factor = left[row * size + column];
            if factor == 0.0 {
                continue;
            }
            for index in 0..size {
                left[row * size + index] -= factor * left[column * size + index];
                right[row * size + index] -= factor * right[column * size + index];
            }
        }
    }
    Some(right)
}

/// The Newton step (sum of X'WX)^-1 (sum of scores).
pub fn step(sum: &Sum) -> Option<Vec<f64>> {
    let size = sum.score.len();
    let inverse = invert(&sum.information, size)?;
    Some(
        (0..size)
            .map(|row| {
                (0..size)
                    .map(|column| inverse[row * size + column] * sum.score[column])
                    .sum()
            })
            .collect(),
    )
}

/// Whether two successive log-likelihoods agree to the tolerance.
pub fn converged(previous: f64, current: f64) -> bool {
    (current - previous).abs() <= TOLERANCE * (current.abs() + TOLERANCE)
}

/// The fit's table: estimates, standard errors from the inverse information, Wald z and
/// p-values, odds ratios with 95% intervals; and the separation verdict.
pub fn coefficients(terms: &[String], beta: &[f64], sum: &Sum) -> (Vec<wire::Coefficient>, bool) {
    let size = beta.len();
    let inverse = invert(&sum.information, size);
    let mut separation = inverse.is_none();
    let table = terms
        .iter()
        .zip(beta)
        .enumerate()
        .map(|(index, (term, estimate))| {
            let standard_error = inverse.as_ref().map_or(f64::INFINITY, |inverse| {
                inverse[index * size + index].max(0.0).sqrt()
            });
            // Quasi-complete separation: a huge estimate with a huge standard error.
            separation |= estimate.abs() > 15.0 && standard_error > 100.0;
            let z = estimate / standard_error;
            wire::Coefficient {
                term: term.clone(),
                estimate: *estimate,
                standard_error,
                z,
                p_value: crate::odds::chi_squared_upper(z * z, 1),
                odds_ratio: estimate.exp(),
                low: (estimate - Z_95 * standard_error).exp(),
                high: (estimate + Z_95 * standard_error).exp(),
            }
        })
        .collect();
    (table, separation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_of_a_known_matrix_and_a_singular_one() {
        let matrix = [4.0, 2.0, 2.0, 3.0];
        let inverse = invert(&matrix, 2).unwrap();
        let expected = [0.375, -0.25, -0.25, 0.5];
        for (value, expected) in inverse.iter().zip(expected) {
            assert!((value - expected).abs() < 1e-12);
        }
        assert_eq!(invert(&[1.0, 2.0, 2.0, 4.0], 2), None);
    }

    #[test]
    fn one_newton_step_solves_a_quadratic_exactly() {
        // Information 2I and score (2, -4): the step is (1, -2).
        let sum = Sum {
            records: 10,
            information: vec![2.0, 0.0, 0.0, 2.0],
            score: vec![2.0, -4.0],
            log_likelihood: -5.0,
        };
        assert_eq!(step(&sum).unwrap(), [1.0, -2.0]);
        let (table, separation) = coefficients(&["a".into(), "b".into()], &[1.0, -2.0], &sum);
        assert!(!separation);
        assert!((table[0].standard_error - 0.5_f64.sqrt()).abs() < 1e-12);
        assert!((table[1].odds_ratio - (-2.0_f64).exp()).abs() < 1e-12);
        assert!(converged(-100.0, -100.0 - 1e-9));
        assert!(!converged(-100.0, -99.0));
    }

    #[test]
    fn a_part_of_the_wrong_shape_or_with_bad_values_is_refused() {
        let mut sum = Sum::new(2);
        let part = wire::RegressionPart {
            records: 5,
            information: vec![1.0; 4],
            score: vec![0.0; 3],
            log_likelihood: -1.0,
        };
        assert!(sum.add(&part).is_err());
        let part = wire::RegressionPart {
            records: 5,
            information: vec![f64::NAN; 4],
            score: vec![0.0; 2],
            log_likelihood: -1.0,
        };
        assert!(sum.add(&part).is_err());
    }
}
