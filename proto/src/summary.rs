//! Summaries of a numeric column's values (count, mean and sum of squared deviations) and
//! their exact pooling: the same formula combines rows at a node and sites at the coordinator.

/// The count, mean and sum of squared deviations from the mean (`m2`) of some values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Summary {
    /// The summary of two disjoint groups of values together (Chan, Golub and LeVeque's
    /// parallel update: numerically stable, no sums of squares).
    pub fn combine(self, other: Summary) -> Summary {
        if self.n == 0 {
            return other;
        }
        if other.n == 0 {
            return self;
        }
        let n = self.n + other.n;
        let (a, b, total) = (self.n as f64, other.n as f64, n as f64);
        let delta = other.mean - self.mean;
        Summary {
            n,
            mean: self.mean + delta * b / total,
            m2: self.m2 + other.m2 + delta * delta * a * b / total,
        }
    }

    /// The sample variance (n - 1 in the denominator); none below two values.
    pub fn variance(&self) -> Option<f64> {
        (self.n >= 2).then(|| self.m2 / (self.n - 1) as f64)
    }

    /// The sample standard deviation.
    pub fn standard_deviation(&self) -> Option<f64> {
        self.variance().map(f64::sqrt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values: &[f64]) -> Summary {
        let n = values.len() as u64;
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let m2 = values.iter().map(|value| (value - mean).powi(2)).sum();
        Summary { n, mean, m2 }
    }

    #[test]
    fn combining_parts_gives_the_summary_of_the_whole() {
        let values = [3.0, 7.5, 1.0, 12.0, 4.25, 9.0, 2.0];
        let whole = of(&values);
        let pooled = of(&values[..3])
            .combine(of(&values[3..5]))
            .combine(of(&values[5..]));
        assert_eq!(pooled.n, whole.n);
        assert!((pooled.mean - whole.mean).abs() < 1e-12 * whole.mean);
        assert!((pooled.m2 - whole.m2).abs() < 1e-12 * whole.m2);
        assert_eq!(Summary::default().combine(whole), whole);
        assert!(
            (pooled.variance().unwrap() - whole.m2 / 6.0).abs() < 1e-12 * whole.m2,
            "sample variance"
        );
        assert_eq!(of(&[5.0]).variance(), None);
    }
}
