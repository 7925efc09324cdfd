//! Compiling a bound template into a polars plan over a snapshot, and running it into the full
//! grid of true counts. Parameter values enter the plan only as typed literals; no query text
//! is ever built.
//!
//! Records whose stratum value is null fall into the axis' last ("missing") level; null never
//! satisfies a filter condition.

use fedq_proto::model::days_since_epoch;
use fedq_proto::summary::Summary;
use fedq_proto::template::{
    Axis, BoundCheck, BoundFilter, BoundQuery, BoundStratum, CompareOp, Scalar, Statistic,
};
use polars::prelude::*;
use roaring::RoaringBitmap;

use crate::data::Snapshot;

/// True counts over the full grid of strata, before any disclosure control. Never leaves the
/// node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTable {
    /// Level counts per axis, in axis order.
    pub shape: Vec<usize>,
    /// One count per cell, row-major over `shape` (the last axis varies fastest).
    pub counts: Vec<u64>,
}

impl RawTable {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

const COUNT: &str = "__fedq_count";

/// The name of the snapshot column holding each record's number (overlap control).
pub const RECORD_COLUMN: &str = "__fedq_record";

/// The set of record numbers in each cell of a table, for overlap control.
pub type CellSets = Vec<RoaringBitmap>;

/// One computed table: its true counts, with overlap control each cell's record numbers, and
/// for a mean each cell's moments. Never leaves the node.
#[derive(Debug, Clone)]
pub struct Table {
    pub raw: RawTable,
    pub sets: Option<CellSets>,
    pub moments: Option<CellMoments>,
}

/// The moments of a numeric column's values in one cell (or the whole table).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    /// Count, mean and squared deviations of the cell's recorded values.
    pub summary: Summary,
    /// Sum of the values (for the dominance rule).
    pub sum: f64,
    /// The largest absolute value (for the dominance rule).
    pub largest: f64,
}

impl Moments {
    /// The moments of two disjoint groups together.
    pub fn combine(self, other: Moments) -> Moments {
        Moments {
            summary: self.summary.combine(other.summary),
            sum: self.sum + other.sum,
            largest: self.largest.max(other.largest),
        }
    }
}

/// Every cell's moments, and the whole table's.
#[derive(Debug, Clone, PartialEq)]
pub struct CellMoments {
    pub cells: Vec<Moments>,
    pub total: Moments,
}

/// The query's tables of true counts: a count's or histogram's one grid over all its axes
/// (a histogram's bins are its last axis), a mean's grid with every cell's moments (only
/// records with a value count), or a profile's sections (each axis a one-way table of its own:
/// a profiled column, or a check), in axis order. With `with_sets`, also every cell's record
/// numbers.
pub fn tables(
    query: &BoundQuery,
    snapshot: &Snapshot,
    with_sets: bool,
) -> PolarsResult<Vec<Table>> {
    let axes = &query.axes;
    // A profile's tables are compared with each other (their record sets) whatever the node's
    // overlap policy.
    let with_sets = with_sets || query.statistic.is_profile();
    let count = |plan: LazyFrame, keys: Vec<Expr>, shape: Vec<usize>| {
        if with_sets {
            count_keys_with_sets(plan, keys, shape).map(|(raw, sets)| (raw, Some(sets)))
        } else {
            count_keys(plan, keys, shape).map(|raw| (raw, None))
        }
    };
    let grid_keys = || query.strata.iter().map(stratum_expr).collect::<Vec<_>>();
    match &query.statistic {
        Statistic::Count
        | Statistic::Histogram { .. }
        | Statistic::TwoByTwo { .. }
        | Statistic::Survival { .. } => {
            let (raw, sets) = count(filtered(query, snapshot), grid_keys(), shape_of(axes))?;
            Ok(vec![Table {
                raw,
                sets,
                moments: None,
            }])
        }
        Statistic::Mean { column } => {
            let plan = filtered(query, snapshot).filter(col(column.as_str()).is_not_null());
            let (raw, sets) = count(plan.clone(), grid_keys(), shape_of(axes))?;
            let moments = moment_keys(plan, grid_keys(), &raw.shape, column)?;
            Ok(vec![Table {
                raw,
                sets,
                moments: Some(moments),
            }])
        }
        Statistic::Logistic { .. } => Err(PolarsError::ComputeError(
            "a logistic regression has no count tables".into(),
        )),
        Statistic::Profile => {
            let columns = query
                .strata
                .iter()
                .map(|stratum| profile_expr(stratum, snapshot));
            let checks = query.checks.iter().map(check_expr);
            columns
                .chain(checks)
                .zip(axes)
                .map(|(key, axis)| {
                    let (raw, sets) = count(
                        filtered(query, snapshot),
                        vec![key],
                        vec![axis.levels.len()],
                    )?;
                    Ok(Table {
                        raw,
                        sets,
                        moments: None,
                    })
                })
                .collect()
        }
    }
}

/// The moments of `column` per cell of the grid `shape` whose coordinates are the `keys`.
fn moment_keys(
    plan: LazyFrame,
    keys: Vec<Expr>,
    shape: &[usize],
    column: &str,
) -> PolarsResult<CellMoments> {
    const N: &str = "__fedq_n";
    const MEAN: &str = "__fedq_mean";
    const VARIANCE: &str = "__fedq_variance";
    const SUM: &str = "__fedq_sum";
    const MAX: &str = "__fedq_max";
    const MIN: &str = "__fedq_min";
    let value = || col(column).cast(DataType::Float64);
    let aggregates = [
        len().cast(DataType::UInt64).alias(N),
        value().mean().alias(MEAN),
        // Population variance: m2 = variance * n.
        value().var(0).alias(VARIANCE),
        value().sum().alias(SUM),
        value().max().alias(MAX),
        value().min().alias(MIN),
    ];
    let axes = keys.len();
    let frame = if keys.is_empty() {
        plan.select(aggregates).collect()?
    } else {
        let keys: Vec<Expr> = keys
            .into_iter()
            .enumerate()
            .map(|(index, key)| key.alias(stratum_key(index)))
            .collect();
        plan.group_by(keys).agg(aggregates).collect()?
    };
    let key_columns = (0..axes)
        .map(|index| {
            frame
                .column(&stratum_key(index))
                .and_then(|column| column.u32().cloned())
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    let floats = |name: &str| frame.column(name).and_then(|column| column.f64().cloned());
    let (n, mean, variance, sum, max, min) = (
        frame.column(N)?.u64()?.clone(),
        floats(MEAN)?,
        floats(VARIANCE)?,
        floats(SUM)?,
        floats(MAX)?,
        floats(MIN)?,
    );
    let mut cells = vec![Moments::default(); shape.iter().product()];
    for row in 0..frame.height() {
        let mut cell = 0usize;
        for (axis, keys) in key_columns.iter().enumerate() {
            let missing_level = shape[axis] - 1;
            let level = keys.get(row).map_or(missing_level, |level| level as usize);
            cell = cell * shape[axis] + level.min(missing_level);
        }
        let count = n.get(row).unwrap_or(0);
        let row_moments = Moments {
            summary: Summary {
                n: count,
                mean: mean.get(row).unwrap_or(0.0),
                m2: variance.get(row).unwrap_or(0.0) * count as f64,
            },
            sum: sum.get(row).unwrap_or(0.0),
            largest: max
                .get(row)
                .unwrap_or(0.0)
                .abs()
                .max(min.get(row).unwrap_or(0.0).abs()),
        };
        cells[cell] = cells[cell].combine(row_moments);
    }
    let total = cells
        .iter()
        .fold(Moments::default(), |total, cell| total.combine(*cell));
    Ok(CellMoments { cells, total })
}

/// Runs a count query's plan and lays the counts out on its grid (empty cells are zeros).
pub fn count_grid(query: &BoundQuery, snapshot: &Snapshot) -> PolarsResult<RawTable> {
    let keys = query.strata.iter().map(stratum_expr).collect();
    count_keys(filtered(query, snapshot), keys, shape_of(&query.axes))
}

/// Like [`count_grid`], and also the set of record numbers in each cell, for overlap control.
pub fn count_grid_with_sets(
    query: &BoundQuery,
    snapshot: &Snapshot,
) -> PolarsResult<(RawTable, CellSets)> {
    let keys = query.strata.iter().map(stratum_expr).collect();
    count_keys_with_sets(filtered(query, snapshot), keys, shape_of(&query.axes))
}

fn shape_of(axes: &[Axis]) -> Vec<usize> {
    axes.iter().map(|axis| axis.levels.len()).collect()
}

/// The snapshot with the query's filter applied.
pub(crate) fn filtered(query: &BoundQuery, snapshot: &Snapshot) -> LazyFrame {
    let plan = snapshot.frame.clone().lazy();
    match &query.filter {
        Some(filter) => plan.filter(filter_expr(filter)),
        None => plan,
    }
}

/// Counts rows per combination of `keys` (each a level number, null for its axis' last level).
fn grouped(plan: LazyFrame, keys: Vec<Expr>) -> LazyFrame {
    let count = len().cast(DataType::UInt64).alias(COUNT);
    if keys.is_empty() {
        return plan.select([count]);
    }
    let keys: Vec<Expr> = keys
        .into_iter()
        .enumerate()
        .map(|(index, key)| key.alias(stratum_key(index)))
        .collect();
    plan.group_by(keys).agg([count])
}

/// Counts per cell of the grid `shape` whose coordinates are the `keys` (null or beyond the
/// last level: the last level, "missing").
fn count_keys(plan: LazyFrame, keys: Vec<Expr>, shape: Vec<usize>) -> PolarsResult<RawTable> {
    let axes = keys.len();
    let cells: usize = shape.iter().product();
    let mut counts = vec![0u64; cells];
    let frame = grouped(plan, keys).collect()?;
    let count_column = frame.column(COUNT)?.u64()?;
    let key_columns = (0..axes)
        .map(|index| {
            frame
                .column(&stratum_key(index))
                .and_then(|column| column.u32().cloned())
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    for row in 0..frame.height() {
        let mut cell = 0usize;
        for (axis, keys) in key_columns.iter().enumerate() {
            let missing_level = shape[axis] - 1;
            let level = keys.get(row).map_or(missing_level, |level| level as usize);
            cell = cell * shape[axis] + level.min(missing_level);
        }
        counts[cell] += count_column.get(row).unwrap_or(0);
    }
    Ok(RawTable { shape, counts })
}

/// Like [`count_keys`], and also the set of record numbers in each cell.
fn count_keys_with_sets(
    plan: LazyFrame,
    keys: Vec<Expr>,
    shape: Vec<usize>,
) -> PolarsResult<(RawTable, CellSets)> {
    let cells: usize = shape.iter().product();
    let mut counts = vec![0u64; cells];
    let mut sets = vec![RoaringBitmap::new(); cells];
    let mut selected: Vec<Expr> = keys
        .into_iter()
        .enumerate()
        .map(|(index, key)| key.alias(stratum_key(index)))
        .collect();
    // Stable record numbers when the node keeps them (overlap control); otherwise row numbers,
    // which identify records within this snapshot (enough to compare one answer's tables).
    let plan = if plan
        .clone()
        .collect_schema()
        .is_ok_and(|schema| schema.contains(RECORD_COLUMN))
    {
        plan
    } else {
        plan.with_row_index(RECORD_COLUMN, None)
    };
    selected.push(col(RECORD_COLUMN).cast(DataType::UInt32));
    let frame = plan.select(selected).collect()?;
    // Each row's cell, one stratum column at a time (column-wise iteration is fast; looking
    // rows up one by one is not).
    let mut row_cells = vec![0usize; frame.height()];
    for (axis, &levels) in shape.iter().enumerate() {
        let missing_level = levels - 1;
        let keys = frame.column(&stratum_key(axis))?.u32()?;
        for (cell, level) in row_cells.iter_mut().zip(keys.iter()) {
            let level = level.map_or(missing_level, |level| (level as usize).min(missing_level));
            *cell = *cell * levels + level;
        }
    }
    let records = frame.column(RECORD_COLUMN)?.u32()?;
    for (&cell, record) in row_cells.iter().zip(records.iter()) {
        counts[cell] += 1;
        // Appending is the fast path (numbers ascend in file order); numbers out of order
        // (records first seen in an earlier load) take a plain insert.
        if let Some(record) = record
            && !sets[cell].push(record)
        {
            sets[cell].insert(record);
        }
    }
    Ok((RawTable { shape, counts }, sets))
}

/// A profiled column's level: its band or category; then "outside domain" (the records whose
/// value was outside the domain and is treated as missing); null (missing) otherwise.
fn profile_expr(stratum: &BoundStratum, snapshot: &Snapshot) -> Expr {
    let (column, levels) = match stratum {
        BoundStratum::Categories { column, categories } => (column, categories.len()),
        BoundStratum::Bands { column, bands, .. } => (column, bands.len()),
        BoundStratum::Rule(_) => return stratum_expr(stratum),
    };
    let outside = crate::data::outside_domain_column(column);
    if snapshot.frame.column(&outside).is_err() {
        return stratum_expr(stratum);
    }
    when(col(outside.as_str()))
        .then(lit(levels as u32))
        .otherwise(stratum_expr(stratum))
        .cast(DataType::UInt32)
}

/// A check's level: "cannot be evaluated" (2) when a column it reads is missing, else
/// "plausible" (0) when its rule holds, else "implausible" (1).
pub(crate) fn check_expr(check: &BoundCheck) -> Expr {
    let missing = check
        .columns
        .iter()
        .map(|column| col(column.as_str()).is_null())
        .reduce(Expr::or)
        .unwrap_or_else(|| lit(false));
    when(missing)
        .then(lit(2u32))
        .when(filter_expr(&check.rule))
        .then(lit(0u32))
        .otherwise(lit(1u32))
        .cast(DataType::UInt32)
}

fn stratum_key(index: usize) -> String {
    format!("__fedq_stratum_{index}")
}

fn stratum_expr(stratum: &BoundStratum) -> Expr {
    match stratum {
        BoundStratum::Categories { column, categories } => {
            if categories.iter().copied().eq(0..categories.len() as u32) {
                // Every category: its position is its level.
                return col(column.as_str());
            }
            // Only the categories the filter admits have levels.
            first_level_that_holds(
                categories
                    .iter()
                    .map(|&category| col(column.as_str()).eq(lit(category)))
                    .collect(),
            )
        }
        BoundStratum::Rule(rule) => check_expr(rule),
        BoundStratum::Bands {
            column,
            integer,
            bands,
        } => {
            let bound = |value: f64| {
                if *integer {
                    lit(value as i64)
                } else {
                    lit(value)
                }
            };
            first_level_that_holds(
                bands
                    .iter()
                    .map(|(at_least, below)| {
                        let value = col(column.as_str());
                        let lower = at_least.map(|edge| value.clone().gt_eq(bound(edge)));
                        let upper = below.map(|edge| value.clone().lt(bound(edge)));
                        match (lower, upper) {
                            (Some(lower), Some(upper)) => lower.and(upper),
                            (Some(only), None) | (None, Some(only)) => only,
                            (None, None) => value.is_not_null(),
                        }
                    })
                    .collect(),
            )
        }
    }
}

/// Level `i` where `conditions[i]` is the first that holds; null (the missing level) where
/// none does.
fn first_level_that_holds(conditions: Vec<Expr>) -> Expr {
    let null_level = lit(Null {}).cast(DataType::UInt32);
    let level = |index: usize| lit(index as u32);
    match conditions.as_slice() {
        [] => null_level,
        [only] => when(only.clone()).then(level(0)).otherwise(null_level),
        [first, second, rest @ ..] => {
            let mut chain = when(first.clone())
                .then(level(0))
                .when(second.clone())
                .then(level(1));
            for (offset, condition) in rest.iter().enumerate() {
                chain = chain.when(condition.clone()).then(level(offset + 2));
            }
            chain.otherwise(null_level)
        }
    }
}

fn filter_expr(filter: &BoundFilter) -> Expr {
    match filter {
        BoundFilter::All(children) => children
            .iter()
            .map(filter_expr)
            .reduce(Expr::and)
            .unwrap_or_else(|| lit(true)),
        BoundFilter::Any(children) => children
            .iter()
            .map(filter_expr)
            .reduce(Expr::or)
            .unwrap_or_else(|| lit(false)),
        BoundFilter::Compare { column, op, value } => {
            compare(col(column.as_str()), *op, scalar(value))
        }
        BoundFilter::CompareColumns { column, op, other } => {
            compare(col(column.as_str()), *op, col(other.as_str()))
        }
        BoundFilter::OneOf { column, values } => values
            .iter()
            .map(|value| col(column.as_str()).eq(scalar(value)))
            .reduce(Expr::or)
            .unwrap_or_else(|| lit(false)),
        BoundFilter::Between { column, low, high } => col(column.as_str())
            .gt_eq(scalar(low))
            .and(col(column.as_str()).lt_eq(scalar(high))),
    }
}

fn compare(left: Expr, op: CompareOp, right: Expr) -> Expr {
    match op {
        CompareOp::Eq => left.eq(right),
        CompareOp::Ne => left.neq(right),
        CompareOp::Lt => left.lt(right),
        CompareOp::Le => left.lt_eq(right),
        CompareOp::Gt => left.gt(right),
        CompareOp::Ge => left.gt_eq(right),
    }
}

/// A typed literal matching the snapshot's column representation.
fn scalar(value: &Scalar) -> Expr {
    match value {
        Scalar::Integer(value) => lit(*value),
        Scalar::Float(value) => lit(*value),
        Scalar::Date(date) => lit(days_since_epoch(*date)),
        Scalar::Category(position) => lit(*position),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn snapshot() -> Snapshot {
        let age = Series::new(
            "age".into(),
            [Some(5i64), Some(30), Some(70), None, Some(30)],
        );
        let sex = Series::new("sex".into(), [Some(0u32), Some(1), Some(0), Some(1), None]);
        let records = Series::new(RECORD_COLUMN.into(), [10u32, 11, 12, 13, 14]);
        Snapshot {
            dataset: "trauma_admissions".into(),
            version: "sha256:test".into(),
            frame: DataFrame::new(5, vec![age.into(), sex.into(), records.into()]).unwrap(),
            columns: BTreeSet::from(["age".to_string(), "sex".to_string()]),
            record_keys: Vec::new(),
        }
    }

    fn axes() -> Vec<Axis> {
        vec![
            Axis {
                column: "age".into(),
                levels: vec!["<18".into(), "18+".into(), "missing".into()],
            },
            Axis {
                column: "sex".into(),
                levels: vec![
                    "female".into(),
                    "male".into(),
                    "other".into(),
                    "missing".into(),
                ],
            },
        ]
    }

    fn strata() -> Vec<BoundStratum> {
        vec![
            BoundStratum::Bands {
                column: "age".into(),
                integer: true,
                bands: vec![(None, Some(18.0)), (Some(18.0), None)],
            },
            BoundStratum::Categories {
                column: "sex".into(),
                categories: vec![0, 1, 2],
            },
        ]
    }

    fn count_query(
        filter: Option<BoundFilter>,
        strata: Vec<BoundStratum>,
        axes: Vec<Axis>,
    ) -> BoundQuery {
        BoundQuery {
            dataset: "trauma_admissions".into(),
            missing_empty: vec![false; axes.len()],
            axes,
            filter,
            strata,
            checks: Vec::new(),
            regression: None,
            statistic: Statistic::Count,
        }
    }

    #[test]
    fn a_profile_counts_each_column_alone_with_values_outside_the_domain_and_each_check() {
        let mut snapshot = snapshot();
        // Record 13's age was outside the domain (its age is null in the snapshot).
        let outside = Series::new(
            crate::data::outside_domain_column("age").into(),
            [false, false, false, true, false],
        );
        snapshot.frame.with_column(Column::from(outside)).unwrap();
        let level = |column: &str, levels: &[&str]| Axis {
            column: column.into(),
            levels: levels.iter().map(|level| level.to_string()).collect(),
        };
        let query = BoundQuery {
            dataset: "trauma_admissions".into(),
            axes: vec![
                level("age", &["<18", "18+", "outside domain", "missing"]),
                level(
                    "sex",
                    &["female", "male", "other", "outside domain", "missing"],
                ),
                level(
                    "age-range",
                    &["plausible", "implausible", "cannot be evaluated"],
                ),
            ],
            missing_empty: vec![false; 3],
            filter: None,
            strata: strata(),
            checks: vec![BoundCheck {
                rule: BoundFilter::Between {
                    column: "age".into(),
                    low: Scalar::Integer(0),
                    high: Scalar::Integer(50),
                },
                columns: vec!["age".into()],
            }],
            regression: None,
            statistic: Statistic::Profile,
        };
        for with_sets in [false, true] {
            let tables = tables(&query, &snapshot, with_sets).unwrap();
            let counts: Vec<&[u64]> = tables.iter().map(|table| &table.raw.counts[..]).collect();
            assert_eq!(counts, [&[1, 3, 1, 0][..], &[2, 2, 0, 0, 1], &[3, 1, 1]]);
            if with_sets {
                let sets = tables[0].sets.as_ref().unwrap();
                assert_eq!(sets[2].iter().collect::<Vec<_>>(), [13]);
            }
        }
    }

    #[test]
    fn counts_fill_the_full_grid_with_missing_levels_and_zeros() {
        let query = count_query(None, strata(), axes());
        let table = count_grid(&query, &snapshot()).unwrap();
        assert_eq!(table.shape, [3, 4]);
        // rows: <18, 18+, missing; columns: female, male, other, missing
        assert_eq!(table.counts, [1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0]);
        assert_eq!(table.total(), 5);
        assert_eq!(
            fedq_proto::template::cell_coordinates(&table.shape, 7),
            [1, 3]
        );
    }

    #[test]
    fn record_sets_match_the_counts_cell_by_cell() {
        let query = count_query(None, strata(), axes());
        let counted = count_grid(&query, &snapshot()).unwrap();
        let (table, sets) = count_grid_with_sets(&query, &snapshot()).unwrap();
        assert_eq!(table, counted);
        for (count, set) in table.counts.iter().zip(&sets) {
            assert_eq!(*count, set.len());
        }
        // The row aged 5 (record 10) is female: cell (<18, female).
        assert_eq!(sets[0].iter().collect::<Vec<_>>(), [10]);
    }

    #[test]
    fn null_matches_no_filter_condition() {
        let filter = BoundFilter::Compare {
            column: "age".into(),
            op: CompareOp::Ne,
            value: Scalar::Integer(30),
        };
        let query = count_query(Some(filter), Vec::new(), Vec::new());
        let table = count_grid(&query, &snapshot()).unwrap();
        assert_eq!(table.counts, [2]);
    }

    #[test]
    fn between_and_one_of_are_inclusive_sets() {
        let filter = BoundFilter::All(vec![
            BoundFilter::Between {
                column: "age".into(),
                low: Scalar::Integer(5),
                high: Scalar::Integer(30),
            },
            BoundFilter::OneOf {
                column: "sex".into(),
                values: vec![Scalar::Category(0), Scalar::Category(1)],
            },
        ]);
        let query = count_query(Some(filter), Vec::new(), Vec::new());
        let table = count_grid(&query, &snapshot()).unwrap();
        assert_eq!(table.counts, [2]);
    }

    #[test]
    fn a_category_stratum_limited_to_the_admitted_categories_has_their_levels_only() {
        // sex in (male, other): female (category 0) gets no row; male is the first level.
        let admitted = vec![Scalar::Category(1), Scalar::Category(2)];
        let filter = BoundFilter::OneOf {
            column: "sex".into(),
            values: admitted,
        };
        let limited = vec![BoundStratum::Categories {
            column: "sex".into(),
            categories: vec![1, 2],
        }];
        let levels = vec![Axis {
            column: "sex".into(),
            levels: vec!["male".into(), "other".into(), "missing".into()],
        }];
        let limited = count_query(Some(filter), limited, levels);
        let (table, sets) = count_grid_with_sets(&limited, &snapshot()).unwrap();
        assert_eq!(table.shape, [3]);
        assert_eq!(table.counts, [2, 0, 0]);
        let full = count_query(None, strata(), axes());
        let (_, every) = count_grid_with_sets(&full, &snapshot()).unwrap();
        // The male records are those of the full grid's male column (rows <18, 18+, missing).
        let male = &every[1] | &every[5] | &every[9];
        assert_eq!(sets[0], male);
    }
}
