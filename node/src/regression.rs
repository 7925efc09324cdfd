//! Logistic regression at the node: one Newton-Raphson evaluation at the coefficients the
//! coordinator sends. Over the records with an evaluable outcome and every covariate, the node
//! returns only sums — the information X'WX, the score X'(y - p), the log-likelihood and the
//! number of records — and only when they are safe: at least k records, at most a third as
//! many parameters as records, each outcome at least k, and every level of every category
//! covariate, and every level by outcome, at least k (X'WX at a chosen coefficient vector
//! could otherwise expose a small count). Iterations are capped by the site's policy and every
//! evaluation is a query of its own in the audit log.

use polars::prelude::*;
use roaring::RoaringBitmap;

use fedq_proto::template::{BoundQuery, BoundRegression, Covariate};

use crate::NodeError;
use crate::data::Snapshot;
use crate::plan::{self, RECORD_COLUMN};

/// The largest coefficient the node evaluates at (beyond it the request is refused: no fit
/// needs it, and it would only probe the data).
const MOST_COEFFICIENT: f64 = 100.0;

/// One site's part of a Newton-Raphson step (sums only), with the records it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub records: u64,
    /// Row-major, parameters x parameters.
    pub information: Vec<f64>,
    pub score: Vec<f64>,
    pub log_likelihood: f64,
    /// The records used (overlap control), when the snapshot numbers them.
    pub record_set: Option<RoaringBitmap>,
}

fn refused(reason: impl Into<String>) -> NodeError {
    NodeError::RegressionRefused(reason.into())
}

/// The records' outcome (1 when the rule holds), number covariates and category positions.
struct Rows {
    outcome: Vec<f64>,
    /// Per covariate, per record: the number, or the category position.
    values: Vec<Vec<f64>>,
    records: Option<RoaringBitmap>,
}

fn rows(
    query: &BoundQuery,
    regression: &BoundRegression,
    snapshot: &Snapshot,
) -> PolarsResult<Rows> {
    const OUTCOME: &str = "__fedq_outcome";
    let mut plan = plan::filtered(query, snapshot);
    let mut columns: Vec<&str> = regression
        .outcome
        .columns
        .iter()
        .map(String::as_str)
        .collect();
    for covariate in &regression.covariates {
        columns.push(match covariate {
            Covariate::Number(column) | Covariate::Category { column, .. } => column,
        });
    }
    for column in columns {
        plan = plan.filter(col(column).is_not_null());
    }
    let mut selected = vec![plan::check_expr(&regression.outcome).alias(OUTCOME)];
    for (index, covariate) in regression.covariates.iter().enumerate() {
        let column = match covariate {
            Covariate::Number(column) | Covariate::Category { column, .. } => column,
        };
        selected.push(
            col(column.as_str())
                .cast(DataType::Float64)
                .alias(format!("__fedq_x{index}")),
        );
    }
    let numbered = snapshot.frame.column(RECORD_COLUMN).is_ok();
    if numbered {
        selected.push(col(RECORD_COLUMN));
    }
    let frame = plan.select(selected).collect()?;
    let outcome = frame
        .column(OUTCOME)?
        .u32()?
        .iter()
        .map(|level| if level == Some(0) { 1.0 } else { 0.0 })
        .collect();
    let values = (0..regression.covariates.len())
        .map(|index| {
            Ok(frame
                .column(&format!("__fedq_x{index}"))?
                .f64()?
                .iter()
                .map(|value| value.unwrap_or(0.0))
                .collect())
        })
        .collect::<PolarsResult<Vec<Vec<f64>>>>()?;
    let records = if numbered {
        Some(
            frame
                .column(RECORD_COLUMN)?
                .u32()?
                .iter()
                .flatten()
                .collect(),
        )
    } else {
        None
    };
    Ok(Rows {
        outcome,
        values,
        records,
    })
}

/// Checks what the coordinator asked and what this site's records allow.
fn check_safe(
    regression: &BoundRegression,
    rows: &Rows,
    coefficients: &[f64],
    k: u32,
) -> Result<(), NodeError> {
    let k = k as usize;
    let n = rows.outcome.len();
    let parameters = regression.parameters();
    if coefficients.len() != parameters && !coefficients.is_empty() {
        return Err(refused(format!(
            "the model has {parameters} coefficients but {} were sent",
            coefficients.len()
        )));
    }
    if coefficients
        .iter()
        .any(|beta| !beta.is_finite() || beta.abs() > MOST_COEFFICIENT)
    {
        return Err(refused(format!(
            "a coefficient is not a finite number of at most {MOST_COEFFICIENT} in size"
        )));
    }
    if n < k {
        return Err(refused(format!(
            "fewer than {k} of this site's records have the outcome and every covariate"
        )));
    }
    if parameters * 3 > n {
        return Err(refused(format!(
            "the model has {parameters} parameters; this site's records allow at most a third of their number"
        )));
    }
    let with_outcome = rows.outcome.iter().filter(|y| **y == 1.0).count();
    if with_outcome < k || n - with_outcome < k {
        return Err(refused(format!(
            "fewer than {k} of this site's records have the outcome, or fewer than {k} do not"
        )));
    }
    for (index, covariate) in regression.covariates.iter().enumerate() {
        let Covariate::Category { column, categories } = covariate else {
            continue;
        };
        let mut counts = vec![[0usize; 2]; *categories as usize];
        for (value, y) in rows.values[index].iter().zip(&rows.outcome) {
            if let Some(level) = counts.get_mut(*value as usize) {
                level[usize::from(*y == 1.0)] += 1;
            }
        }
        if counts
            .iter()
            .any(|[without, with]| *without < k || *with < k)
        {
            return Err(refused(format!(
                "a category of covariate '{column}', with or without the outcome, has fewer than {k} of this site's records"
            )));
        }
    }
    Ok(())
}

/// Evaluates this site's part at `coefficients` (empty: all zero), if it is safe to.
pub fn evaluate(
    query: &BoundQuery,
    snapshot: &Snapshot,
    coefficients: &[f64],
    k: u32,
) -> Result<Part, NodeError> {
    let regression = query
        .regression
        .as_ref()
        .ok_or_else(|| refused("the template is not a logistic regression"))?;
    let rows = rows(query, regression, snapshot).map_err(|err| {
        tracing::error!(error = %crate::data::describe_polars_error(&err), "regression plan failed");
        NodeError::Engine
    })?;
    check_safe(regression, &rows, coefficients, k)?;
    let parameters = regression.parameters();
    let beta: Vec<f64> = if coefficients.is_empty() {
        vec![0.0; parameters]
    } else {
        coefficients.to_vec()
    };
    let mut information = vec![0.0; parameters * parameters];
    let mut score = vec![0.0; parameters];
    let mut log_likelihood = 0.0;
    let mut x = vec![0.0; parameters];
    for (record, y) in rows.outcome.iter().enumerate() {
        // The design row: intercept, numbers, category indicators (reference: first).
        x.iter_mut().for_each(|value| *value = 0.0);
        x[0] = 1.0;
        let mut term = 1;
        for (index, covariate) in regression.covariates.iter().enumerate() {
            let value = rows.values[index][record];
            match covariate {
                Covariate::Number(_) => {
                    x[term] = value;
                    term += 1;
                }
                Covariate::Category { categories, .. } => {
                    let level = value as usize;
                    if (1..*categories as usize).contains(&level) {
                        x[term + level - 1] = 1.0;
                    }
                    term += *categories as usize - 1;
                }
            }
        }
        let eta: f64 = x.iter().zip(&beta).map(|(value, b)| value * b).sum();
        let p = 1.0 / (1.0 + (-eta).exp());
        let w = p * (1.0 - p);
        // log(1 + e^eta), stable for large |eta|.
        let softplus = eta.max(0.0) + (-eta.abs()).exp().ln_1p();
        log_likelihood += y * eta - softplus;
        for row in 0..parameters {
            score[row] += (y - p) * x[row];
            for column in 0..parameters {
                information[row * parameters + column] += w * x[row] * x[column];
            }
        }
    }
    Ok(Part {
        records: rows.outcome.len() as u64,
        information,
        score,
        log_likelihood,
        record_set: rows.records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_proto::template::{BoundCheck, BoundFilter};

    fn model(categories: u32) -> BoundRegression {
        BoundRegression {
            outcome: BoundCheck {
                rule: BoundFilter::All(Vec::new()),
                columns: Vec::new(),
            },
            covariates: vec![
                Covariate::Number("age".into()),
                Covariate::Category {
                    column: "icu".into(),
                    categories,
                },
            ],
        }
    }

    /// `n` records: outcome in every other one, age 20 + index, icu level `index % levels`.
    fn rows(n: usize, levels: usize) -> Rows {
        Rows {
            outcome: (0..n).map(|index| (index % 2) as f64).collect(),
            values: vec![
                (0..n).map(|index| 20.0 + index as f64).collect(),
                (0..n).map(|index| ((index / 2) % levels) as f64).collect(),
            ],
            records: None,
        }
    }

    fn refusal(result: Result<(), NodeError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn each_safeguard_refuses_with_its_reason() {
        let two = model(2);
        assert!(check_safe(&two, &rows(40, 2), &[], 10).is_ok());
        assert!(refusal(check_safe(&two, &rows(8, 2), &[], 10)).contains("fewer than 10"));
        // 3 parameters need 9 records: 8 are too few at k = 3.
        assert!(refusal(check_safe(&two, &rows(8, 2), &[], 3)).contains("3 parameters"));
        // A third category with too few records, with and without the outcome.
        let three = model(3);
        let err = refusal(check_safe(&three, &rows(40, 3), &[], 10));
        assert!(err.contains("a category of covariate 'icu'"), "{err}");
        // The outcome itself must be in both states k times.
        let mut rare = rows(40, 2);
        rare.outcome.iter_mut().skip(5).for_each(|y| *y = 0.0);
        assert!(refusal(check_safe(&two, &rare, &[], 10)).contains("have the outcome"));
        // Coefficients: the model's number, finite and bounded.
        assert!(refusal(check_safe(&two, &rows(40, 2), &[0.0; 2], 10)).contains("3 coefficients"));
        assert!(
            refusal(check_safe(&two, &rows(40, 2), &[0.0, 500.0, 0.0], 10)).contains("at most")
        );
        assert!(check_safe(&two, &rows(40, 2), &[0.1, -0.2, 0.3], 10).is_ok());
    }
}
