//! The query-template language: what alliance experts write, sign and review, and what a node
//! agrees to run.
//!
//! A template is a parameterised aggregate over one dataset of the common data model: typed
//! parameters with limits, a filter tree of conditions on columns, strata (category columns or
//! numeric columns cut into declared bands), and one statistic. Its life:
//!
//! 1. [`Template::from_toml`] parses the file an expert writes (errors name line and column).
//! 2. [`Template::check`] validates it against a [`DataModel`], giving a [`CheckedTemplate`].
//! 3. [`Template::canonical_bytes`] is the exact encoding signatures cover and the wire carries;
//!    [`Template::from_canonical`] refuses anything that is not in canonical form.
//! 4. [`CheckedTemplate::bind`] checks typed parameter values against their declarations and
//!    yields a [`BoundQuery`], from which a node builds its plan. Values are never turned into
//!    query text.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ColumnSpec, DataModel, DatasetSpec, Domain, MISSING_LEVEL, parse_date};
use crate::{Error, TemplateProblem};

/// The most cells one answer may have (product of the strata's level counts).
pub const MAX_GRID_CELLS: usize = 10_000;
/// The most filter entries (conditions plus `all`/`any` groups) one template may have.
pub const MAX_FILTER_NODES: usize = 64;
/// The most parameters one template may declare.
pub const MAX_PARAMETERS: usize = 32;
/// The most bands one stratum may have.
pub const MAX_BANDS: usize = 64;
/// Most covariates a logistic regression template may name.
pub const MAX_COVARIATES: usize = 20;

/// The `kind` of the signed document a template travels in.
pub const DOCUMENT_KIND: &str = "fedq.template/1";

/// A query template as written by alliance experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Stable identifier, e.g. `cohort-by-age-sex`.
    pub id: String,
    /// Incremented on every change; signatures pin id, version and content hash.
    pub version: u32,
    pub title: String,
    /// What the template answers and why, for study leads and reviewers.
    pub description: String,
    /// The common data model it is written for, as "name/version".
    pub data_model: String,
    pub dataset: String,
    /// The template's own disclosure threshold; a node applies the larger of this and its floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cell_count: Option<u32>,
    #[serde(default)]
    pub parameters: Vec<ParameterSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    #[serde(default)]
    pub strata: Vec<Stratum>,
    /// Plausibility rules of a data-quality profile (`statistic.kind = "profile"` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
    pub statistic: Statistic,
}

/// A named plausibility rule: records for which `rule` holds are plausible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    /// What the rule says, for people (e.g. "systolic pressure between 40 and 250 mmHg").
    pub title: String,
    pub rule: Filter,
}

/// A typed parameter the study lead fills in, with the limits experts approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(rename = "type")]
    pub parameter_type: ParameterType,
    /// Lower limit (inclusive) of an integer, float or date parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Literal>,
    /// Upper limit (inclusive) of an integer, float or date parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Literal>,
    /// For category parameters: the column whose categories the value is drawn from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// For category parameters: the categories allowed (default: all of the column's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<String>>,
    /// Value used when the study lead gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Literal>,
    /// Integer parameters: values go in steps of this from `min` (coarser questions are
    /// harder to chain into differences of a few records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// Date parameters: the value must start or end a month or a year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align: Option<Align>,
}

/// Where a date parameter's values must fall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Align {
    MonthStart,
    MonthEnd,
    YearStart,
    YearEnd,
}

impl Align {
    /// Whether `date` falls where this alignment requires.
    pub fn holds(self, date: NaiveDate) -> bool {
        use chrono::Datelike;
        let next_day = date.succ_opt();
        match self {
            Align::MonthStart => date.day() == 1,
            Align::MonthEnd => next_day.is_none_or(|next| next.day() == 1),
            Align::YearStart => date.ordinal() == 1,
            Align::YearEnd => next_day.is_none_or(|next| next.ordinal() == 1),
        }
    }

    /// In words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Align::MonthStart => "the first day of a month",
            Align::MonthEnd => "the last day of a month",
            Align::YearStart => "the first day of a year",
            Align::YearEnd => "the last day of a year",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParameterType {
    Integer,
    Float,
    Date,
    /// Exactly one category.
    Category,
    /// One or more categories (for `in`).
    Categories,
}

impl ParameterType {
    pub fn name(self) -> &'static str {
        match self {
            ParameterType::Integer => "integer",
            ParameterType::Float => "float",
            ParameterType::Date => "date",
            ParameterType::Category => "category",
            ParameterType::Categories => "categories",
        }
    }
}

/// A constant written in a template: a number, a text (category or date) or a list of texts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Integer(i64),
    Float(f64),
    Text(String),
    List(Vec<String>),
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Literal::Integer(value) => write!(f, "{value}"),
            Literal::Float(value) => write!(f, "{value}"),
            Literal::Text(value) => write!(f, "{value}"),
            Literal::List(values) => write!(f, "{}", values.join(", ")),
        }
    }
}

/// A filter tree: `all` (and), `any` (or), or one condition on a column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFilter", into = "RawFilter")]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Condition(Condition),
}

/// `column op operand(s)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: String,
    pub op: Operator,
    /// One operand for comparisons, two for `between`, one or more for `in`.
    pub operands: Vec<Operand>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A parameter the study lead fills in.
    Param(String),
    /// A constant fixed by the template's authors.
    Value(Literal),
    /// Another column of the same record (comparisons of numbers or dates, e.g. "outcome
    /// within the stay": `days_to_outcome <= length_of_stay`).
    Column(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    /// Column value is one of a set of categories.
    #[serde(rename = "in")]
    In,
    /// Inclusive range: `low <= column <= high`.
    #[serde(rename = "between")]
    Between,
}

impl Operator {
    fn symbol(self) -> &'static str {
        match self {
            Operator::Eq => "=",
            Operator::Ne => "!=",
            Operator::Lt => "<",
            Operator::Le => "<=",
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::In => "in",
            Operator::Between => "between",
        }
    }
}

/// How a filter appears in files: one table with optional keys, checked into a [`Filter`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<Vec<Filter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    any: Option<Vec<Filter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    op: Option<Operator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    params: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<Vec<Literal>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    other_column: Option<String>,
}

impl TryFrom<RawFilter> for Filter {
    type Error = String;

    fn try_from(raw: RawFilter) -> Result<Filter, String> {
        let shapes = [raw.all.is_some(), raw.any.is_some(), raw.column.is_some()];
        if shapes.iter().filter(|set| **set).count() != 1 {
            return Err("a filter needs exactly one of 'all', 'any' or 'column'".into());
        }
        if let Some(children) = raw.all.or(raw.any.clone()) {
            let operand_keys = raw.op.is_some()
                || raw.param.is_some()
                || raw.params.is_some()
                || raw.value.is_some()
                || raw.values.is_some()
                || raw.other_column.is_some();
            if operand_keys {
                return Err(
                    "'all'/'any' filters take no 'op', 'param(s)', 'value(s)' or 'other_column'"
                        .into(),
                );
            }
            if children.is_empty() {
                return Err("'all'/'any' needs at least one filter".into());
            }
            return Ok(if raw.any.is_some() {
                Filter::Any(children)
            } else {
                Filter::All(children)
            });
        }
        let column = raw.column.unwrap_or_default();
        let op = raw
            .op
            .ok_or_else(|| format!("condition on '{column}' needs an 'op'"))?;
        let given = [
            raw.param.is_some(),
            raw.params.is_some(),
            raw.value.is_some(),
            raw.values.is_some(),
            raw.other_column.is_some(),
        ];
        if given.iter().filter(|set| **set).count() != 1 {
            return Err(format!(
                "condition on '{column}' needs exactly one of 'param', 'params', 'value', 'values' or 'other_column'"
            ));
        }
        let operands: Vec<Operand> = if let Some(other) = raw.other_column {
            vec![Operand::Column(other)]
        } else if let Some(name) = raw.param {
            vec![Operand::Param(name)]
        } else if let Some(names) = raw.params {
            names.into_iter().map(Operand::Param).collect()
        } else if let Some(value) = raw.value {
            vec![Operand::Value(value)]
        } else {
            raw.values
                .unwrap_or_default()
                .into_iter()
                .map(Operand::Value)
                .collect()
        };
        let arity_ok = match op {
            Operator::Between => operands.len() == 2,
            Operator::In => !operands.is_empty(),
            _ => operands.len() == 1,
        };
        if !arity_ok {
            let expected = match op {
                Operator::Between => "two operands ('params' or 'values' with two entries)",
                Operator::In => "a categories 'param' or a non-empty list of 'values'",
                _ => "one operand ('param' or 'value')",
            };
            return Err(format!(
                "condition '{column} {}' needs {expected}",
                op.symbol()
            ));
        }
        Ok(Filter::Condition(Condition {
            column,
            op,
            operands,
        }))
    }
}

impl From<Filter> for RawFilter {
    fn from(filter: Filter) -> RawFilter {
        match filter {
            Filter::All(children) => RawFilter {
                all: Some(children),
                ..RawFilter::default()
            },
            Filter::Any(children) => RawFilter {
                any: Some(children),
                ..RawFilter::default()
            },
            Filter::Condition(condition) => {
                let mut raw = RawFilter {
                    column: Some(condition.column),
                    op: Some(condition.op),
                    ..RawFilter::default()
                };
                let all_params = condition
                    .operands
                    .iter()
                    .all(|operand| matches!(operand, Operand::Param(_)));
                let mut names = Vec::new();
                let mut literals = Vec::new();
                for operand in condition.operands {
                    match operand {
                        Operand::Param(name) => names.push(name),
                        Operand::Value(literal) => literals.push(literal),
                        Operand::Column(other) => {
                            raw.other_column = Some(other);
                            return raw;
                        }
                    }
                }
                let multiple = matches!(condition.op, Operator::Between | Operator::In)
                    && (names.len() + literals.len() > 1 || condition.op == Operator::Between);
                match (all_params, multiple) {
                    (true, false) => raw.param = names.pop(),
                    (true, true) => raw.params = Some(names),
                    (false, false) => raw.value = literals.pop(),
                    (false, true) => raw.values = Some(literals),
                }
                raw
            }
        }
    }
}

/// One stratification axis: a category column, or a numeric column cut into declared bands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stratum {
    pub column: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bands: Option<Vec<Band>>,
}

/// A numeric band `at_least <= value < below`; an open end is omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
}

/// The statistic computed per cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Statistic {
    /// Number of records.
    Count,
    /// A data-quality profile: the number of records in each level of each stratum taken on its
    /// own (plus values outside the column's domain, and missing ones), and for each check the
    /// records that are plausible, implausible, or cannot be evaluated.
    Profile,
    /// Number of records in each bin of a numeric column, per stratum: the bins are fixed by
    /// the template (no edge depends on the data) and cover the column's whole domain.
    Histogram { column: String, bins: Vec<Band> },
    /// Number, mean and variance of a numeric column's recorded values, per stratum (records
    /// without a value are left out).
    Mean { column: String },
    /// A 2x2 table per stratum: records exposed or not (`exposure` holds or not) by outcome or
    /// not (`outcome` holds or not); records missing a column a rule reads form each axis'
    /// "missing" level. The coordinator computes odds ratios per site, pooled crude and
    /// Mantel-Haenszel, with a test of homogeneity.
    TwoByTwo { exposure: Filter, outcome: Filter },
    /// A survival curve per stratum on a time grid the template fixes: per interval from one
    /// grid time to the next (the last open-ended), records at risk at its start, events
    /// (`event` holds) and censored (it does not) at a `time` in it. Records missing the time
    /// or a column the rule reads are left out.
    Survival {
        time: String,
        event: Filter,
        grid: Vec<f64>,
    },
    /// Logistic regression of a binary outcome (`outcome` holds or not) on covariates: number
    /// columns as they are, category columns as indicators against their first category.
    /// Fitted by the coordinator by Newton-Raphson from each site's information matrix and
    /// score at the coefficients it sends; records missing any column are left out.
    Logistic {
        outcome: Filter,
        covariates: Vec<String>,
    },
}

/// The name of a logistic regression's intercept term.
pub const INTERCEPT: &str = "(intercept)";

/// The levels of a survival table's event axis, in order.
pub const EVENT_LEVELS: [&str; 3] = ["event", "censored", MISSING_LEVEL];

/// The levels of a 2x2 table's exposure axis, in order.
pub const EXPOSURE_LEVELS: [&str; 3] = ["exposed", "not exposed", MISSING_LEVEL];
/// The levels of a 2x2 table's outcome axis, in order.
pub const OUTCOME_LEVELS: [&str; 3] = ["outcome", "no outcome", MISSING_LEVEL];

impl Statistic {
    pub fn name(&self) -> &'static str {
        match self {
            Statistic::Count => "count",
            Statistic::Profile => "profile",
            Statistic::Histogram { .. } => "histogram",
            Statistic::Mean { .. } => "mean",
            Statistic::TwoByTwo { .. } => "two_by_two",
            Statistic::Survival { .. } => "survival",
            Statistic::Logistic { .. } => "logistic",
        }
    }

    /// A profile answers in sections (one table per column and check); every other
    /// statistic in one grid.
    pub fn is_profile(&self) -> bool {
        matches!(self, Statistic::Profile)
    }

    /// The column the statistic summarises, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            Statistic::Histogram { column, .. } | Statistic::Mean { column } => Some(column),
            Statistic::Survival { time, .. } => Some(time),
            Statistic::Count
            | Statistic::Profile
            | Statistic::TwoByTwo { .. }
            | Statistic::Logistic { .. } => None,
        }
    }
}

/// The level of a profiled column holding values outside its declared domain (a node that
/// treats such values as missing still counts them here).
pub const OUTSIDE_DOMAIN_LEVEL: &str = "outside domain";

/// The levels of a check's section, in order.
pub const CHECK_LEVELS: [&str; 3] = ["plausible", "implausible", "cannot be evaluated"];

/// A typed parameter value supplied by a study lead.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Integer(i64),
    Float(f64),
    Date(NaiveDate),
    Category(String),
    Categories(Vec<String>),
}

impl std::fmt::Display for Value {
    /// The value as `fedq query -p name=value` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Integer(value) => write!(f, "{value}"),
            Value::Float(value) => write!(f, "{value}"),
            Value::Date(date) => write!(f, "{date}"),
            Value::Category(name) => f.write_str(name),
            Value::Categories(names) => f.write_str(&names.join(",")),
        }
    }
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::Integer(_) => "integer",
            Value::Float(_) => "float",
            Value::Date(_) => "date",
            Value::Category(_) => "category",
            Value::Categories(_) => "categories",
        }
    }
}

/// A value resolved against a column's domain, ready for a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Integer(i64),
    Float(f64),
    Date(NaiveDate),
    /// A category, as its position in the column's category list.
    Category(u32),
}

/// A filter with every operand resolved to typed values.
#[derive(Debug, Clone, PartialEq)]
pub enum BoundFilter {
    All(Vec<BoundFilter>),
    Any(Vec<BoundFilter>),
    Compare {
        column: String,
        op: CompareOp,
        value: Scalar,
    },
    OneOf {
        column: String,
        values: Vec<Scalar>,
    },
    Between {
        column: String,
        low: Scalar,
        high: Scalar,
    },
    /// Compares two columns of the same record.
    CompareColumns {
        column: String,
        op: CompareOp,
        other: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A stratum resolved against the model.
#[derive(Debug, Clone, PartialEq)]
pub enum BoundStratum {
    /// Level `i` is the column's category `categories[i]`: every category in the model's
    /// order, or only those the query's filter admits (a category every record must be one
    /// of, so the others are empty by the query's own definition and get no row). Nulls, and
    /// categories not listed (which the filter has already excluded), go to the missing level.
    Categories {
        column: String,
        categories: Vec<u32>,
    },
    /// Level `i` is band `i`; nulls go to the missing level.
    Bands {
        column: String,
        integer: bool,
        bands: Vec<(Option<f64>, Option<f64>)>,
    },
    /// Level 0 where the rule holds, 1 where it does not, 2 (missing) where a column it reads
    /// has no value (a 2x2 table's exposure and outcome).
    Rule(BoundCheck),
}

/// One axis of a result grid; its last level is always [`MISSING_LEVEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    pub column: String,
    pub levels: Vec<String>,
}

/// A template with parameter values bound: everything a node needs to build its plan.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundQuery {
    pub dataset: String,
    /// The answer's grid: the checked template's axes, less the categories the filter
    /// excludes (see [`BoundStratum::Categories`]). Node and coordinator both use these.
    pub axes: Vec<Axis>,
    /// Per axis: whether its `missing` level is empty by the query's own definition (the
    /// filter requires a value of the column), so a reader knows those cells are zero. Not
    /// set for an axis with a single other level (see `bind`).
    pub missing_empty: Vec<bool>,
    pub filter: Option<BoundFilter>,
    pub strata: Vec<BoundStratum>,
    /// Profile templates: each check's rule and the columns it reads (a record missing any of
    /// them cannot be evaluated).
    pub checks: Vec<BoundCheck>,
    /// Logistic templates: the outcome rule and covariates.
    pub regression: Option<BoundRegression>,
    pub statistic: Statistic,
}

impl BoundQuery {
    /// Per cell of the grid: whether it is empty by the query's own definition (it lies on a
    /// `missing` level the filter rules out, see [`BoundQuery::missing_empty`]).
    pub fn empty_cells(&self) -> Vec<bool> {
        let shape: Vec<usize> = self.axes.iter().map(|axis| axis.levels.len()).collect();
        (0..shape.iter().product())
            .map(|cell| {
                cell_coordinates(&shape, cell)
                    .iter()
                    .zip(&shape)
                    .zip(&self.missing_empty)
                    .any(|((&level, &levels), &empty)| empty && level as usize == levels - 1)
            })
            .collect()
    }
}

/// A logistic regression's outcome rule and covariates, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundRegression {
    pub outcome: BoundCheck,
    pub covariates: Vec<Covariate>,
}

/// One covariate: a number column, or a category column with its number of categories (the
/// first is the reference).
#[derive(Debug, Clone, PartialEq)]
pub enum Covariate {
    Number(String),
    Category { column: String, categories: u32 },
}

impl BoundRegression {
    /// The number of coefficients (the intercept, one per number column, one per non-reference
    /// category).
    pub fn parameters(&self) -> usize {
        1 + self
            .covariates
            .iter()
            .map(|covariate| match covariate {
                Covariate::Number(_) => 1,
                Covariate::Category { categories, .. } => *categories as usize - 1,
            })
            .sum::<usize>()
    }
}

/// A plausibility rule with its operands resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundCheck {
    pub rule: BoundFilter,
    pub columns: Vec<String>,
}

/// Identifies exactly which template a result came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    pub id: String,
    pub version: u32,
    /// `"sha256:<hex>"` of the canonical bytes.
    pub content_hash: String,
}

impl TemplateRef {
    pub fn of(template: &Template) -> TemplateRef {
        TemplateRef {
            id: template.id.clone(),
            version: template.version,
            content_hash: template.content_hash(),
        }
    }
}

/// A template that passed [`Template::check`] against a data model.
#[derive(Debug, Clone)]
pub struct CheckedTemplate<'a> {
    pub template: &'a Template,
    pub dataset: &'a DatasetSpec,
    /// A count: the axes of its grid. A profile: one axis per section, each a table of its own
    /// (every stratum, then every check).
    pub axes: Vec<Axis>,
}

impl Template {
    /// Parses a template file. Syntax errors and unknown keys name the line and column.
    pub fn from_toml(text: &str, origin: &str) -> Result<Template, Error> {
        toml::from_str(text).map_err(|err| Error::Syntax {
            what: format!("template file {origin}"),
            message: err.to_string().trim_end().to_string(),
        })
    }

    /// Decodes the canonical bytes a template travels as; refuses non-canonical encodings, so
    /// two different byte strings never carry the same template.
    pub fn from_canonical(bytes: &[u8]) -> Result<Template, Error> {
        let malformed = |message: String| Error::Template {
            template: "(unreadable)".into(),
            code: TemplateProblem::Malformed,
            message,
        };
        let template: Template = serde_json::from_slice(bytes)
            .map_err(|err| malformed(format!("the template document cannot be decoded: {err}")))?;
        if template.canonical_bytes() != bytes {
            return Err(malformed(
                "the template document is not in canonical form".to_string(),
            ));
        }
        Ok(template)
    }

    /// The canonical encoding: compact JSON with fields in declaration order. Reformatting or
    /// reordering the TOML source does not change it; changing any value does.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain data structs to a Vec cannot fail.
        serde_json::to_vec(self).expect("templates always serialise")
    }

    /// `"sha256:<hex>"` of the canonical bytes.
    pub fn content_hash(&self) -> String {
        content_hash(&self.canonical_bytes())
    }

    /// Every column the template uses, in any role (filters, parameters, strata, checks).
    pub fn columns_used(&self) -> BTreeSet<String> {
        let mut columns = BTreeSet::new();
        if let Some(filter) = &self.filter {
            filter_columns(filter, &mut columns);
        }
        for check in &self.checks {
            filter_columns(&check.rule, &mut columns);
        }
        columns.extend(
            self.parameters
                .iter()
                .filter_map(|parameter| parameter.column.clone()),
        );
        columns.extend(self.strata.iter().map(|stratum| stratum.column.clone()));
        columns.extend(self.statistic.column().map(str::to_string));
        match &self.statistic {
            Statistic::TwoByTwo { exposure, outcome } => {
                filter_columns(exposure, &mut columns);
                filter_columns(outcome, &mut columns);
            }
            Statistic::Survival { event, .. } => filter_columns(event, &mut columns),
            Statistic::Logistic {
                outcome,
                covariates,
            } => {
                filter_columns(outcome, &mut columns);
                columns.extend(covariates.iter().cloned());
            }
            _ => {}
        }
        columns
    }

    fn problem(&self, code: TemplateProblem, message: impl Into<String>) -> Error {
        Error::Template {
            template: self.id.clone(),
            code,
            message: message.into(),
        }
    }

    /// Validates the template against a data model. `forbidden_columns` are extra columns the
    /// checking party treats as identifiers (a node adds the columns it maps from its own
    /// identifier columns); the model's identifier columns are always forbidden.
    pub fn check<'a>(
        &'a self,
        model: &'a DataModel,
        forbidden_columns: &BTreeSet<String>,
    ) -> Result<CheckedTemplate<'a>, Error> {
        use TemplateProblem::*;
        if !is_name(&self.id) {
            return Err(self.problem(
                Malformed,
                "'id' must be lowercase letters, digits, '-' or '_'",
            ));
        }
        if self.version == 0 {
            return Err(self.problem(Malformed, "'version' starts at 1"));
        }
        if self.title.trim().is_empty() || self.description.trim().is_empty() {
            return Err(self.problem(Malformed, "'title' and 'description' must not be empty"));
        }
        if self.data_model != model.key() {
            return Err(self.problem(
                DataModelMismatch,
                format!(
                    "written for data model '{}' but this side uses '{}'",
                    self.data_model,
                    model.key()
                ),
            ));
        }
        if self.min_cell_count == Some(0) {
            return Err(self.problem(Malformed, "'min_cell_count' must be at least 1"));
        }
        let dataset = model.dataset(&self.dataset).ok_or_else(|| {
            self.problem(
                UnknownDataset,
                format!(
                    "dataset '{}' is not in data model '{}'",
                    self.dataset,
                    model.key()
                ),
            )
        })?;
        let checker = Checker {
            template: self,
            dataset,
            forbidden: forbidden_columns,
        };
        if self.parameters.len() > MAX_PARAMETERS {
            return Err(self.problem(
                Malformed,
                format!(
                    "{} parameters declared; at most {MAX_PARAMETERS} are allowed",
                    self.parameters.len()
                ),
            ));
        }
        checker.check_parameters()?;
        let mut used = BTreeSet::new();
        if let Some(filter) = &self.filter {
            let size = filter_size(filter);
            if size > MAX_FILTER_NODES {
                return Err(self.problem(
                    Malformed,
                    format!(
                        "the filter has {size} entries; at most {MAX_FILTER_NODES} are allowed"
                    ),
                ));
            }
            checker.check_filter(filter, "filter", &mut used)?;
        }
        if !self.statistic.is_profile() && !self.checks.is_empty() {
            return Err(self.problem(
                Malformed,
                "'checks' belong to data-quality profiles (statistic kind \"profile\")",
            ));
        }
        for (index, check) in self.checks.iter().enumerate() {
            let at = format!("checks[{index}] '{}'", check.name);
            if !is_name(&check.name) {
                return Err(self.problem(
                    Malformed,
                    format!("{at}: names use lowercase letters, digits, '-' or '_'"),
                ));
            }
            if self.checks[..index]
                .iter()
                .any(|earlier| earlier.name == check.name)
            {
                return Err(self.problem(Malformed, format!("{at}: declared twice")));
            }
            if check.title.trim().is_empty() {
                return Err(self.problem(Malformed, format!("{at}: 'title' must not be empty")));
            }
            let size = filter_size(&check.rule);
            if size > MAX_FILTER_NODES {
                return Err(self.problem(
                    Malformed,
                    format!(
                        "{at}: the rule has {size} entries; at most {MAX_FILTER_NODES} are allowed"
                    ),
                ));
            }
            checker.check_filter(&check.rule, &format!("{at}.rule"), &mut used)?;
        }
        let rules: Vec<(&str, &Filter)> = match &self.statistic {
            Statistic::TwoByTwo { exposure, outcome } => {
                vec![("exposure", exposure), ("outcome", outcome)]
            }
            Statistic::Survival { event, .. } => vec![("event", event)],
            Statistic::Logistic { outcome, .. } => vec![("outcome", outcome)],
            _ => Vec::new(),
        };
        {
            for (name, rule) in rules {
                let size = filter_size(rule);
                if size > MAX_FILTER_NODES {
                    return Err(self.problem(
                        Malformed,
                        format!("statistic.{name}: the rule has {size} entries; at most {MAX_FILTER_NODES} are allowed"),
                    ));
                }
                checker.check_filter(rule, &format!("statistic.{name}"), &mut used)?;
            }
        }
        if self.statistic.is_profile() && self.strata.is_empty() && self.checks.is_empty() {
            return Err(self.problem(
                Malformed,
                "a profile needs at least one stratum (a column to profile) or one check",
            ));
        }
        for parameter in &self.parameters {
            if !used.contains(&parameter.name) {
                return Err(self.problem(
                    Malformed,
                    format!(
                        "parameter '{}' is declared but no filter uses it",
                        parameter.name
                    ),
                ));
            }
        }
        let mut axes = Vec::new();
        let mut cells: usize = 1;
        for (index, stratum) in self.strata.iter().enumerate() {
            if self.strata[..index]
                .iter()
                .any(|earlier| earlier.column == stratum.column)
            {
                return Err(self.problem(
                    Malformed,
                    format!(
                        "strata[{index}]: column '{}' is stratified twice",
                        stratum.column
                    ),
                ));
            }
            let mut axis = checker.check_stratum(stratum, &format!("strata[{index}]"))?;
            if self.statistic.is_profile() {
                // Each column is profiled on its own: its sections add up, not multiply.
                axis.levels
                    .insert(axis.levels.len() - 1, OUTSIDE_DOMAIN_LEVEL.to_string());
                cells = cells.saturating_add(axis.levels.len());
            } else {
                cells = cells.saturating_mul(axis.levels.len());
            }
            axes.push(axis);
        }
        match &self.statistic {
            Statistic::Histogram { column, bins } => {
                if self.strata.iter().any(|stratum| &stratum.column == column) {
                    return Err(self.problem(
                        Malformed,
                        format!(
                            "statistic: '{column}' is both a stratum and the histogram's column"
                        ),
                    ));
                }
                let stratum = Stratum {
                    column: column.clone(),
                    bands: Some(bins.clone()),
                };
                let axis = checker.check_stratum(&stratum, "statistic (histogram bins)")?;
                cells = cells.saturating_mul(axis.levels.len());
                axes.push(axis);
            }
            Statistic::Mean { column } => {
                let spec = checker.column(column, "statistic")?;
                if !matches!(spec.domain, Domain::Integer { .. } | Domain::Float { .. }) {
                    return Err(self.problem(
                        Malformed,
                        format!(
                            "statistic: the mean of {} column '{column}' is not defined; choose a number column",
                            spec.domain.type_name()
                        ),
                    ));
                }
            }
            Statistic::TwoByTwo { .. } => {
                for (column, levels) in [("exposure", EXPOSURE_LEVELS), ("outcome", OUTCOME_LEVELS)]
                {
                    if self.strata.iter().any(|stratum| stratum.column == column) {
                        return Err(self.problem(
                            Malformed,
                            format!("strata: '{column}' names a 2x2 table's own axis"),
                        ));
                    }
                    cells = cells.saturating_mul(levels.len());
                    axes.push(Axis {
                        column: column.to_string(),
                        levels: levels.iter().map(|level| level.to_string()).collect(),
                    });
                }
            }
            Statistic::Survival { time, grid, .. } => {
                if self.strata.iter().any(|stratum| &stratum.column == time) {
                    return Err(self.problem(
                        Malformed,
                        format!("statistic: '{time}' is both a stratum and the survival time"),
                    ));
                }
                let bins = survival_bands(grid);
                let spec = checker.column(time, "statistic (survival time)")?;
                let (min, max, integer) = match spec.domain {
                    Domain::Integer { min, max } => (min as f64, max as f64, true),
                    Domain::Float { min, max } => (min, max, false),
                    _ => {
                        return Err(self.problem(
                            Malformed,
                            format!(
                                "statistic: the survival time '{time}' must be a number column"
                            ),
                        ));
                    }
                };
                if grid.first() != Some(&min) || grid.iter().any(|point| *point > max) {
                    return Err(self.problem(
                        Malformed,
                        format!(
                            "statistic: the grid must start at {min}, the smallest '{time}' (the time origin), and stay within {min} to {max}"
                        ),
                    ));
                }
                check_bands(&bins, min, max, integer).map_err(|message| {
                    self.problem(Malformed, format!("statistic: grid: {message}"))
                })?;
                let mut levels: Vec<String> = bins.iter().map(|bin| bin.label.clone()).collect();
                levels.push(MISSING_LEVEL.to_string());
                cells = cells.saturating_mul(levels.len() * EVENT_LEVELS.len());
                axes.push(Axis {
                    column: time.clone(),
                    levels,
                });
                axes.push(Axis {
                    column: "event".to_string(),
                    levels: EVENT_LEVELS.iter().map(|level| level.to_string()).collect(),
                });
            }
            Statistic::Logistic { covariates, .. } => {
                if !self.strata.is_empty() {
                    return Err(self.problem(
                        Malformed,
                        "a logistic regression takes no strata: add the stratifying column to its covariates",
                    ));
                }
                if covariates.is_empty() || covariates.len() > MAX_COVARIATES {
                    return Err(self.problem(
                        Malformed,
                        format!("statistic: give from 1 to {MAX_COVARIATES} covariates"),
                    ));
                }
                let mut terms = vec![INTERCEPT.to_string()];
                for (index, covariate) in covariates.iter().enumerate() {
                    if covariates[..index].contains(covariate) {
                        return Err(self.problem(
                            Malformed,
                            format!("statistic: covariate '{covariate}' is listed twice"),
                        ));
                    }
                    let spec = checker.column(covariate, "statistic (covariates)")?;
                    match &spec.domain {
                        Domain::Integer { .. } | Domain::Float { .. } => {
                            terms.push(covariate.clone())
                        }
                        Domain::Category { categories } => terms.extend(
                            categories[1..]
                                .iter()
                                .map(|category| format!("{covariate}: {category}")),
                        ),
                        other => {
                            return Err(self.problem(
                                Malformed,
                                format!(
                                    "statistic: covariate '{covariate}' is a {} column; covariates are number or category columns",
                                    other.type_name()
                                ),
                            ));
                        }
                    }
                }
                cells = terms.len();
                axes.push(Axis {
                    column: "term".to_string(),
                    levels: terms,
                });
            }
            Statistic::Count | Statistic::Profile => {}
        }
        for check in &self.checks {
            cells = cells.saturating_add(CHECK_LEVELS.len());
            axes.push(Axis {
                column: check.name.clone(),
                levels: CHECK_LEVELS.iter().map(|level| level.to_string()).collect(),
            });
        }
        if cells > MAX_GRID_CELLS {
            return Err(self.problem(
                Malformed,
                format!("the strata make {cells} cells; at most {MAX_GRID_CELLS} are allowed"),
            ));
        }
        if Template::from_canonical(&self.canonical_bytes()).is_err() {
            return Err(self.problem(
                Malformed,
                "a number in the template cannot be encoded exactly; write it with fewer digits",
            ));
        }
        Ok(CheckedTemplate {
            template: self,
            dataset,
            axes,
        })
    }
}

/// A survival grid as bands: from each grid time to the next, the last open-ended; each
/// labelled by its start (the first also takes anything below, which the domain excludes).
pub fn survival_bands(grid: &[f64]) -> Vec<Band> {
    grid.iter()
        .enumerate()
        .map(|(index, start)| Band {
            label: format!("{start}"),
            at_least: (index > 0).then_some(*start),
            below: grid.get(index + 1).copied(),
        })
        .collect()
}

/// Adds every column a filter tree reads to `columns`.
fn filter_columns(filter: &Filter, columns: &mut BTreeSet<String>) {
    match filter {
        Filter::All(children) | Filter::Any(children) => children
            .iter()
            .for_each(|child| filter_columns(child, columns)),
        Filter::Condition(condition) => {
            columns.insert(condition.column.clone());
            for operand in &condition.operands {
                if let Operand::Column(other) = operand {
                    columns.insert(other.clone());
                }
            }
        }
    }
}

/// Conditions plus `all`/`any` groups in a filter tree, counting each operand of a condition.
fn filter_size(filter: &Filter) -> usize {
    match filter {
        Filter::All(children) | Filter::Any(children) => {
            1 + children.iter().map(filter_size).sum::<usize>()
        }
        Filter::Condition(condition) => condition.operands.len().max(1),
    }
}

/// The coordinates of cell `index` in a row-major grid of the given shape (level counts per
/// axis; the last axis varies fastest).
pub fn cell_coordinates(shape: &[usize], index: usize) -> Vec<u32> {
    let mut remainder = index;
    let mut coordinates = vec![0u32; shape.len()];
    for (axis, levels) in shape.iter().enumerate().rev() {
        coordinates[axis] = (remainder % levels.max(&1)) as u32;
        remainder /= levels.max(&1);
    }
    coordinates
}

/// `"sha256:<hex>"` of some bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Checker<'a> {
    template: &'a Template,
    dataset: &'a DatasetSpec,
    forbidden: &'a BTreeSet<String>,
}

impl<'a> Checker<'a> {
    fn problem(&self, code: TemplateProblem, message: impl Into<String>) -> Error {
        self.template.problem(code, message)
    }

    /// Resolves a column a template uses in some role, refusing unknown and identifier columns.
    fn column(&self, name: &str, at: &str) -> Result<&'a ColumnSpec, Error> {
        let column = self.dataset.column(name).ok_or_else(|| {
            self.problem(
                TemplateProblem::UnknownColumn,
                format!(
                    "{at}: column '{name}' is not in dataset '{}'",
                    self.dataset.name
                ),
            )
        })?;
        if column.identifier || self.forbidden.contains(name) {
            return Err(self.problem(
                TemplateProblem::IdentifierColumn,
                format!(
                    "{at}: column '{name}' is an identifier and may not be used in any template"
                ),
            ));
        }
        Ok(column)
    }

    fn check_parameters(&self) -> Result<(), Error> {
        for (index, parameter) in self.template.parameters.iter().enumerate() {
            let at = format!("parameters[{index}] '{}'", parameter.name);
            let malformed = |message: String| self.problem(TemplateProblem::Malformed, message);
            if !is_name(&parameter.name) {
                return Err(malformed(format!(
                    "{at}: names use lowercase letters, digits, '-' or '_'"
                )));
            }
            if self.template.parameters[..index]
                .iter()
                .any(|earlier| earlier.name == parameter.name)
            {
                return Err(malformed(format!("{at}: declared twice")));
            }
            match parameter.parameter_type {
                ParameterType::Integer | ParameterType::Float | ParameterType::Date => {
                    if parameter.column.is_some() || parameter.allowed.is_some() {
                        return Err(malformed(format!(
                            "{at}: 'column' and 'allowed' apply only to category parameters"
                        )));
                    }
                    if parameter.step.is_some()
                        && (parameter.parameter_type != ParameterType::Integer
                            || parameter.step.is_some_and(|step| step < 1))
                    {
                        return Err(malformed(format!(
                            "{at}: 'step' applies to integer parameters and is at least 1"
                        )));
                    }
                    if parameter.align.is_some() && parameter.parameter_type != ParameterType::Date
                    {
                        return Err(malformed(format!(
                            "{at}: 'align' applies only to date parameters"
                        )));
                    }
                    let (Some(min), Some(max)) = (&parameter.min, &parameter.max) else {
                        return Err(malformed(format!(
                            "{at}: {} parameters need both 'min' and 'max' limits",
                            parameter.parameter_type.name()
                        )));
                    };
                    let min = literal_scalar(parameter.parameter_type, min).ok_or_else(|| {
                        malformed(format!(
                            "{at}: 'min' is not a {}",
                            parameter.parameter_type.name()
                        ))
                    })?;
                    let max = literal_scalar(parameter.parameter_type, max).ok_or_else(|| {
                        malformed(format!(
                            "{at}: 'max' is not a {}",
                            parameter.parameter_type.name()
                        ))
                    })?;
                    if scalar_gt(&min, &max) {
                        return Err(malformed(format!("{at}: 'min' is greater than 'max'")));
                    }
                }
                ParameterType::Category | ParameterType::Categories => {
                    if parameter.step.is_some() || parameter.align.is_some() {
                        return Err(malformed(format!(
                            "{at}: 'step' and 'align' do not apply to category parameters"
                        )));
                    }
                    if parameter.min.is_some() || parameter.max.is_some() {
                        return Err(malformed(format!(
                            "{at}: category parameters take 'allowed', not 'min'/'max'"
                        )));
                    }
                    let Some(column_name) = &parameter.column else {
                        return Err(malformed(format!(
                            "{at}: category parameters name the 'column' whose categories they use"
                        )));
                    };
                    let column = self.column(column_name, &at)?;
                    let Domain::Category { categories } = &column.domain else {
                        return Err(malformed(format!(
                            "{at}: column '{column_name}' is not a category column"
                        )));
                    };
                    if let Some(allowed) = &parameter.allowed {
                        if allowed.is_empty() {
                            return Err(malformed(format!("{at}: 'allowed' must not be empty")));
                        }
                        if let Some(unknown) =
                            allowed.iter().find(|value| !categories.contains(value))
                        {
                            return Err(malformed(format!(
                                "{at}: allowed category '{unknown}' is not a category of '{column_name}' ({})",
                                categories.join(", ")
                            )));
                        }
                    }
                }
            }
            if let Some(default) = &parameter.default {
                let value = literal_value(parameter.parameter_type, default).ok_or_else(|| {
                    malformed(format!(
                        "{at}: 'default' is not a {}",
                        parameter.parameter_type.name()
                    ))
                })?;
                self.resolve_parameter(parameter, &value)
                    .map_err(|err| malformed(format!("{at}: 'default' is not allowed: {err}")))?;
            }
        }
        Ok(())
    }

    fn parameter(&self, name: &str, at: &str) -> Result<&'a ParameterSpec, Error> {
        self.template
            .parameters
            .iter()
            .find(|parameter| parameter.name == name)
            .ok_or_else(|| {
                self.problem(
                    TemplateProblem::Malformed,
                    format!("{at}: parameter '{name}' is not declared in 'parameters'"),
                )
            })
    }

    fn check_filter(
        &self,
        filter: &Filter,
        at: &str,
        used: &mut BTreeSet<String>,
    ) -> Result<(), Error> {
        let condition = match filter {
            Filter::All(children) | Filter::Any(children) => {
                let key = if matches!(filter, Filter::All(_)) {
                    "all"
                } else {
                    "any"
                };
                for (index, child) in children.iter().enumerate() {
                    self.check_filter(child, &format!("{at}.{key}[{index}]"), used)?;
                }
                return Ok(());
            }
            Filter::Condition(condition) => condition,
        };
        let column = self.column(&condition.column, at)?;
        let malformed = |message: String| self.problem(TemplateProblem::Malformed, message);
        let is_category = matches!(column.domain, Domain::Category { .. });
        let op_fits = match condition.op {
            Operator::Eq | Operator::Ne => true,
            Operator::In => is_category,
            Operator::Lt | Operator::Le | Operator::Gt | Operator::Ge | Operator::Between => {
                !is_category
            }
        };
        if !op_fits {
            return Err(malformed(format!(
                "{at}: operator '{}' does not apply to {} column '{}'",
                condition.op.symbol(),
                column.domain.type_name(),
                column.name
            )));
        }
        for operand in &condition.operands {
            match operand {
                Operand::Param(name) => {
                    let parameter = self.parameter(name, at)?;
                    used.insert(name.clone());
                    if !parameter_fits(parameter, column, condition.op) {
                        return Err(malformed(format!(
                            "{at}: {} parameter '{name}' cannot be used with '{} {}'",
                            parameter.parameter_type.name(),
                            column.name,
                            condition.op.symbol()
                        )));
                    }
                }
                Operand::Value(literal) => {
                    resolve_literal(column, literal).map_err(|message| {
                        malformed(format!("{at}: value '{literal}': {message}"))
                    })?;
                }
                Operand::Column(other) => {
                    let other = self.column(other, at)?;
                    let comparable = matches!(
                        (&column.domain, &other.domain),
                        (
                            Domain::Integer { .. } | Domain::Float { .. },
                            Domain::Integer { .. } | Domain::Float { .. }
                        ) | (Domain::Date { .. }, Domain::Date { .. })
                    );
                    let is_comparison = !matches!(condition.op, Operator::In | Operator::Between);
                    if !comparable || !is_comparison || other.name == column.name {
                        return Err(malformed(format!(
                            "{at}: 'other_column' compares two different number or date columns with =, !=, <, <=, > or >=; '{} {} {}' does not",
                            column.name,
                            condition.op.symbol(),
                            other.name
                        )));
                    }
                }
            }
        }
        for (index, operand) in condition.operands.iter().enumerate() {
            if condition.operands[..index].contains(operand) {
                return Err(malformed(format!(
                    "{at}: operand {} is listed twice",
                    match operand {
                        Operand::Param(name) => format!("parameter '{name}'"),
                        Operand::Value(literal) => format!("'{literal}'"),
                        Operand::Column(other) => format!("column '{other}'"),
                    }
                )));
            }
        }
        if let [Operand::Value(low), Operand::Value(high)] = condition.operands.as_slice()
            && condition.op == Operator::Between
        {
            let (low, high) = (resolve_literal(column, low), resolve_literal(column, high));
            if let (Ok(low), Ok(high)) = (low, high)
                && scalar_gt(&low, &high)
            {
                return Err(malformed(format!(
                    "{at}: 'between' bounds are in the wrong order"
                )));
            }
        }
        Ok(())
    }

    fn check_stratum(&self, stratum: &Stratum, at: &str) -> Result<Axis, Error> {
        let column = self.column(&stratum.column, at)?;
        let malformed = |message: String| self.problem(TemplateProblem::Malformed, message);
        let mut levels = match (&column.domain, &stratum.bands) {
            (Domain::Category { categories }, None) => categories.clone(),
            (Domain::Category { .. }, Some(_)) => {
                return Err(malformed(format!(
                    "{at}: category column '{}' is stratified by its categories; remove 'bands'",
                    column.name
                )));
            }
            (Domain::Integer { min, max }, Some(bands)) => {
                check_bands(bands, *min as f64, *max as f64, true).map_err(|message| {
                    malformed(format!("{at}: bands on '{}': {message}", column.name))
                })?;
                bands.iter().map(|band| band.label.clone()).collect()
            }
            (Domain::Float { min, max }, Some(bands)) => {
                check_bands(bands, *min, *max, false).map_err(|message| {
                    malformed(format!("{at}: bands on '{}': {message}", column.name))
                })?;
                bands.iter().map(|band| band.label.clone()).collect()
            }
            (Domain::Integer { .. } | Domain::Float { .. }, None) => {
                return Err(malformed(format!(
                    "{at}: numeric column '{}' needs 'bands' to be used as a stratum",
                    column.name
                )));
            }
            (Domain::Date { .. } | Domain::Text, _) => {
                return Err(malformed(format!(
                    "{at}: {} column '{}' cannot be a stratum",
                    column.domain.type_name(),
                    column.name
                )));
            }
        };
        levels.push(MISSING_LEVEL.to_string());
        Ok(Axis {
            column: column.name.clone(),
            levels,
        })
    }

    /// Checks a value against a parameter's declaration.
    fn resolve_parameter(&self, parameter: &ParameterSpec, value: &Value) -> Result<(), String> {
        let out_of_limits = |shown: String| {
            let min = parameter
                .min
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let max = parameter
                .max
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            format!("{shown} is outside its limits {min} to {max}")
        };
        match (parameter.parameter_type, value) {
            (ParameterType::Integer, Value::Integer(given)) => {
                let (min, max) = (
                    parameter.min.as_ref().and_then(literal_i64),
                    parameter.max.as_ref().and_then(literal_i64),
                );
                if min.is_some_and(|min| *given < min) || max.is_some_and(|max| *given > max) {
                    return Err(out_of_limits(given.to_string()));
                }
                if let Some(step) = parameter.step
                    && (given - min.unwrap_or(0)).rem_euclid(step) != 0
                {
                    return Err(format!(
                        "{given} is not allowed: this template takes values in steps of {step} from {}",
                        min.unwrap_or(0)
                    ));
                }
                Ok(())
            }
            (ParameterType::Float, Value::Float(_) | Value::Integer(_)) => {
                let given = match value {
                    Value::Float(given) => *given,
                    Value::Integer(given) => *given as f64,
                    _ => unreachable!("matched above"),
                };
                if !given.is_finite() {
                    return Err("must be a finite number".into());
                }
                let (min, max) = (
                    parameter.min.as_ref().and_then(literal_f64),
                    parameter.max.as_ref().and_then(literal_f64),
                );
                if min.is_some_and(|min| given < min) || max.is_some_and(|max| given > max) {
                    return Err(out_of_limits(given.to_string()));
                }
                Ok(())
            }
            (ParameterType::Date, Value::Date(given)) => {
                let limit = |literal: &Option<Literal>| match literal {
                    Some(Literal::Text(text)) => parse_date(text).ok(),
                    _ => None,
                };
                let (min, max) = (limit(&parameter.min), limit(&parameter.max));
                if min.is_some_and(|min| *given < min) || max.is_some_and(|max| *given > max) {
                    return Err(out_of_limits(given.to_string()));
                }
                if let Some(align) = parameter.align
                    && !align.holds(*given)
                {
                    return Err(format!(
                        "{given} is not allowed: this template compares whole periods, so the date must be {}",
                        align.describe()
                    ));
                }
                Ok(())
            }
            (ParameterType::Category, Value::Category(given)) => {
                self.check_categories(parameter, std::slice::from_ref(given))
            }
            (ParameterType::Categories, Value::Categories(given)) => {
                if given.is_empty() {
                    return Err("give at least one category".into());
                }
                self.check_categories(parameter, given)
            }
            (ParameterType::Categories, Value::Category(given)) => {
                self.check_categories(parameter, std::slice::from_ref(given))
            }
            (expected, given) => Err(format!(
                "expects a {} value, got a {} value",
                expected.name(),
                given.type_name()
            )),
        }
    }

    fn check_categories(&self, parameter: &ParameterSpec, given: &[String]) -> Result<(), String> {
        let allowed = allowed_categories(parameter, self.dataset);
        for (index, category) in given.iter().enumerate() {
            if !allowed.contains(category) {
                return Err(format!(
                    "'{category}' is not allowed; choose from: {}",
                    allowed.join(", ")
                ));
            }
            if given[..index].contains(category) {
                return Err(format!("'{category}' is given twice"));
            }
        }
        Ok(())
    }
}

/// The categories a category parameter may take.
pub fn allowed_categories(parameter: &ParameterSpec, dataset: &DatasetSpec) -> Vec<String> {
    if let Some(allowed) = &parameter.allowed {
        return allowed.clone();
    }
    let column = parameter
        .column
        .as_deref()
        .and_then(|name| dataset.column(name));
    match column.map(|column| &column.domain) {
        Some(Domain::Category { categories }) => categories.clone(),
        _ => Vec::new(),
    }
}

impl CheckedTemplate<'_> {
    /// The effective parameter values: given ones, then defaults. Unknown, duplicate, missing,
    /// mistyped and out-of-limits values are refused with a message naming the parameter.
    pub fn bind(&self, given: &[(String, Value)]) -> Result<BoundQuery, Error> {
        let values = self.effective_values(given)?;
        let filter = match &self.template.filter {
            Some(filter) => Some(bind_filter(filter, self.dataset, &values)?),
            None => None,
        };
        // A profile counts every category, including those the filter excludes; any other
        // grid leaves out the categories no record of the query can have.
        let (admitted, required) = match &filter {
            Some(filter) if !self.template.statistic.is_profile() => {
                (admitted_categories(filter), required_columns(filter))
            }
            _ => (BTreeMap::new(), BTreeSet::new()),
        };
        let mut axes = self.axes.clone();
        let mut missing_empty = vec![false; axes.len()];
        let mut strata = Vec::with_capacity(self.template.strata.len() + 2);
        for ((stratum, axis), empty) in self
            .template
            .strata
            .iter()
            .zip(&mut axes)
            .zip(&mut missing_empty)
        {
            let limit = admitted.get(&stratum.column);
            let bound = bind_stratum(stratum, self.dataset, limit);
            if let (Some(_), BoundStratum::Categories { categories, .. }) = (limit, &bound) {
                let missing = axis.levels.pop();
                axis.levels = categories
                    .iter()
                    .map(|&category| axis.levels[category as usize].clone())
                    .chain(missing)
                    .collect();
            }
            // An axis left with one level beside `missing` is not marked: each line across it
            // would be that one cell and an empty one, which disclosure control could only
            // satisfy by withholding the table whole, while that line's sum is the cell
            // itself, which any other query asking for it protects in turn.
            *empty = required.contains(stratum.column.as_str()) && axis.levels.len() > 2;
            strata.push(bound);
        }
        if let Statistic::Survival { time, event, grid } = &self.template.statistic {
            // The time intervals, then the event: the grid's last two axes.
            let stratum = Stratum {
                column: time.clone(),
                bands: Some(survival_bands(grid)),
            };
            strata.push(bind_stratum(&stratum, self.dataset, None));
            let mut columns = BTreeSet::from([time.clone()]);
            filter_columns(event, &mut columns);
            strata.push(BoundStratum::Rule(BoundCheck {
                rule: bind_filter(event, self.dataset, &values)?,
                columns: columns.into_iter().collect(),
            }));
        }
        if let Statistic::TwoByTwo { exposure, outcome } = &self.template.statistic {
            // Exposure, then outcome: the grid's last two axes.
            for rule in [exposure, outcome] {
                let mut columns = BTreeSet::new();
                filter_columns(rule, &mut columns);
                strata.push(BoundStratum::Rule(BoundCheck {
                    rule: bind_filter(rule, self.dataset, &values)?,
                    columns: columns.into_iter().collect(),
                }));
            }
        }
        if let Statistic::Histogram { column, bins } = &self.template.statistic {
            // The bins are the grid's last axis.
            let stratum = Stratum {
                column: column.clone(),
                bands: Some(bins.clone()),
            };
            strata.push(bind_stratum(&stratum, self.dataset, None));
        }
        let checks = self
            .template
            .checks
            .iter()
            .map(|check| {
                let mut columns = BTreeSet::new();
                filter_columns(&check.rule, &mut columns);
                Ok(BoundCheck {
                    rule: bind_filter(&check.rule, self.dataset, &values)?,
                    columns: columns.into_iter().collect(),
                })
            })
            .collect::<Result<_, Error>>()?;
        let regression = match &self.template.statistic {
            Statistic::Logistic {
                outcome,
                covariates,
            } => {
                let mut columns = BTreeSet::new();
                filter_columns(outcome, &mut columns);
                Some(BoundRegression {
                    outcome: BoundCheck {
                        rule: bind_filter(outcome, self.dataset, &values)?,
                        columns: columns.into_iter().collect(),
                    },
                    covariates: covariates
                        .iter()
                        .map(
                            |column| match self.dataset.column(column).map(|spec| &spec.domain) {
                                Some(Domain::Category { categories }) => Covariate::Category {
                                    column: column.clone(),
                                    categories: categories.len() as u32,
                                },
                                _ => Covariate::Number(column.clone()),
                            },
                        )
                        .collect(),
                })
            }
            _ => None,
        };
        Ok(BoundQuery {
            dataset: self.template.dataset.clone(),
            axes,
            missing_empty,
            filter,
            strata,
            checks,
            regression,
            statistic: self.template.statistic.clone(),
        })
    }

    /// The query's canonical content: the template's content hash and every parameter's
    /// effective value in the template's order, each in one exact form. The same question
    /// gives the same bytes however it was asked (an omitted default equals the default given
    /// explicitly; a category list in any order).
    pub fn canonical_content(&self, given: &[(String, Value)]) -> Result<Vec<u8>, Error> {
        let mut content = self.template.content_hash().into_bytes();
        for (name, value) in self.effective_values(given)? {
            let text = match value {
                Value::Integer(value) => format!("integer:{value}"),
                Value::Float(value) => format!("float:{:016x}", value.to_bits()),
                Value::Date(date) => format!("date:{date}"),
                Value::Category(name) => format!("category:{name}"),
                Value::Categories(mut names) => {
                    names.sort();
                    names.dedup();
                    format!("categories:{}", names.join("\u{1f}"))
                }
            };
            for part in [name.as_bytes(), text.as_bytes()] {
                content.extend_from_slice(&(part.len() as u64).to_be_bytes());
                content.extend_from_slice(part);
            }
        }
        Ok(content)
    }

    /// Every parameter's effective value (given, or its default) in the template's order,
    /// each with whether it was given.
    pub fn effective_parameters(
        &self,
        given: &[(String, Value)],
    ) -> Result<Vec<(String, Value, bool)>, Error> {
        Ok(self
            .effective_values(given)?
            .into_iter()
            .map(|(name, value)| {
                let was_given = given.iter().any(|(given, _)| given == name);
                (name.to_string(), value, was_given)
            })
            .collect())
    }

    fn effective_values(&self, given: &[(String, Value)]) -> Result<Vec<(&str, Value)>, Error> {
        let checker = Checker {
            template: self.template,
            dataset: self.dataset,
            forbidden: &BTreeSet::new(),
        };
        for (index, (name, _)) in given.iter().enumerate() {
            if !self
                .template
                .parameters
                .iter()
                .any(|spec| &spec.name == name)
            {
                let known: Vec<&str> = self
                    .template
                    .parameters
                    .iter()
                    .map(|spec| spec.name.as_str())
                    .collect();
                return Err(Error::Parameter {
                    parameter: name.clone(),
                    message: format!(
                        "template '{}' has no such parameter; it takes: {}",
                        self.template.id,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
            if given[..index].iter().any(|(earlier, _)| earlier == name) {
                return Err(Error::Parameter {
                    parameter: name.clone(),
                    message: "given more than once".into(),
                });
            }
        }
        let mut values: Vec<(&str, Value)> = Vec::new();
        for spec in &self.template.parameters {
            let value = match given.iter().find(|(name, _)| name == &spec.name) {
                Some((_, value)) => value.clone(),
                None => spec
                    .default
                    .as_ref()
                    .and_then(|default| literal_value(spec.parameter_type, default))
                    .ok_or_else(|| Error::Parameter {
                        parameter: spec.name.clone(),
                        message: format!("is required ({})", describe_limits(spec, self.dataset)),
                    })?,
            };
            checker
                .resolve_parameter(spec, &value)
                .map_err(|message| Error::Parameter {
                    parameter: spec.name.clone(),
                    message,
                })?;
            values.push((spec.name.as_str(), value));
        }
        Ok(values)
    }
}

/// Human-readable limits of a parameter, e.g. "integer from 0 to 75".
pub fn describe_limits(parameter: &ParameterSpec, dataset: &DatasetSpec) -> String {
    match parameter.parameter_type {
        ParameterType::Category => format!(
            "one of: {}",
            allowed_categories(parameter, dataset).join(", ")
        ),
        ParameterType::Categories => format!(
            "one or more of: {}",
            allowed_categories(parameter, dataset).join(", ")
        ),
        kind => {
            let grain = match (parameter.step, parameter.align) {
                (Some(step), _) if step > 1 => format!(", in steps of {step}"),
                (_, Some(align)) => format!(", {}", align.describe()),
                _ => String::new(),
            };
            format!(
                "{} from {} to {}{grain}",
                kind.name(),
                parameter
                    .min
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                parameter
                    .max
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )
        }
    }
}

fn bind_filter(
    filter: &Filter,
    dataset: &DatasetSpec,
    values: &[(&str, Value)],
) -> Result<BoundFilter, Error> {
    let condition = match filter {
        Filter::All(children) => {
            return Ok(BoundFilter::All(
                children
                    .iter()
                    .map(|child| bind_filter(child, dataset, values))
                    .collect::<Result<_, _>>()?,
            ));
        }
        Filter::Any(children) => {
            return Ok(BoundFilter::Any(
                children
                    .iter()
                    .map(|child| bind_filter(child, dataset, values))
                    .collect::<Result<_, _>>()?,
            ));
        }
        Filter::Condition(condition) => condition,
    };
    let internal = |message: String| Error::Parameter {
        parameter: condition.column.clone(),
        message,
    };
    let column = dataset
        .column(&condition.column)
        .ok_or_else(|| internal("column vanished after checking".into()))?;
    if let [Operand::Column(other)] = condition.operands.as_slice() {
        return Ok(BoundFilter::CompareColumns {
            column: condition.column.clone(),
            op: compare_op(condition.op)
                .ok_or_else(|| internal("a column comparison lost its operator".into()))?,
            other: other.clone(),
        });
    }
    let mut scalars = Vec::new();
    for operand in &condition.operands {
        match operand {
            Operand::Value(literal) => {
                scalars.push(resolve_literal(column, literal).map_err(internal)?)
            }
            Operand::Param(name) => {
                let (_, value) = values
                    .iter()
                    .find(|(candidate, _)| candidate == name)
                    .ok_or_else(|| internal(format!("parameter '{name}' has no value")))?;
                scalars.extend(resolve_value(column, value).map_err(internal)?);
            }
            Operand::Column(_) => {
                return Err(internal("a column operand in a list of operands".into()));
            }
        }
    }
    let column_name = condition.column.clone();
    let single = |mut scalars: Vec<Scalar>| {
        scalars
            .pop()
            .ok_or_else(|| internal("a condition lost its operand".into()))
    };
    Ok(match condition.op {
        Operator::In => BoundFilter::OneOf {
            column: column_name,
            values: scalars,
        },
        Operator::Between => {
            let high = single(scalars.clone())?;
            let low = scalars
                .first()
                .cloned()
                .ok_or_else(|| internal("between lost its lower bound".into()))?;
            if scalar_gt(&low, &high) {
                let name = |operand: Option<&Operand>| match operand {
                    Some(Operand::Param(name)) => format!("'{name}'"),
                    _ => "the template's bound".to_string(),
                };
                return Err(Error::Parameter {
                    parameter: condition.column.clone(),
                    message: format!(
                        "the range is empty: {} ({}) is after {} ({})",
                        name(condition.operands.first()),
                        scalar_text(&low),
                        name(condition.operands.get(1)),
                        scalar_text(&high)
                    ),
                });
            }
            BoundFilter::Between {
                column: column_name,
                low,
                high,
            }
        }
        op => BoundFilter::Compare {
            column: column_name,
            op: compare_op(op).ok_or_else(|| internal("an unknown comparison".into()))?,
            value: single(scalars)?,
        },
    })
}

/// The comparison an operator makes (none for `in` and `between`).
fn compare_op(op: Operator) -> Option<CompareOp> {
    Some(match op {
        Operator::Eq => CompareOp::Eq,
        Operator::Ne => CompareOp::Ne,
        Operator::Lt => CompareOp::Lt,
        Operator::Le => CompareOp::Le,
        Operator::Gt => CompareOp::Gt,
        Operator::Ge => CompareOp::Ge,
        Operator::In | Operator::Between => return None,
    })
}

/// Binds a stratum; `admitted` limits a category column's levels to the categories the filter
/// admits (see [`admitted_categories`]).
fn bind_stratum(
    stratum: &Stratum,
    dataset: &DatasetSpec,
    admitted: Option<&BTreeSet<u32>>,
) -> BoundStratum {
    let domain = dataset.column(&stratum.column).map(|column| &column.domain);
    match (domain, &stratum.bands) {
        (Some(Domain::Category { categories }), _) => BoundStratum::Categories {
            column: stratum.column.clone(),
            categories: (0..categories.len() as u32)
                .filter(|category| admitted.is_none_or(|admitted| admitted.contains(category)))
                .collect(),
        },
        (domain, bands) => BoundStratum::Bands {
            column: stratum.column.clone(),
            integer: matches!(domain, Some(Domain::Integer { .. })),
            bands: bands
                .iter()
                .flatten()
                .map(|band| (band.at_least, band.below))
                .collect(),
        },
    }
}

/// The conditions every record of the query meets: the filter itself, or any part of an `all`
/// at any depth (never a part of an `any`).
fn required_conditions(filter: &BoundFilter) -> Vec<&BoundFilter> {
    match filter {
        BoundFilter::All(children) => children.iter().flat_map(required_conditions).collect(),
        BoundFilter::Any(_) => Vec::new(),
        condition => vec![condition],
    }
}

/// The columns every record of the query has a value in: a null matches no condition, so a
/// column a required condition reads is never null among the query's records.
fn required_columns(filter: &BoundFilter) -> BTreeSet<&str> {
    required_conditions(filter)
        .into_iter()
        .flat_map(|condition| match condition {
            BoundFilter::Compare { column, .. }
            | BoundFilter::OneOf { column, .. }
            | BoundFilter::Between { column, .. } => vec![column.as_str()],
            BoundFilter::CompareColumns { column, other, .. } => {
                vec![column.as_str(), other.as_str()]
            }
            BoundFilter::All(_) | BoundFilter::Any(_) => Vec::new(),
        })
        .collect()
}

/// For each category column the filter restricts, the categories a record can still have:
/// required conditions (see [`required_conditions`]) of the form `column in [...]` or
/// `column = category`. Other columns are not listed.
fn admitted_categories(filter: &BoundFilter) -> BTreeMap<String, BTreeSet<u32>> {
    let category_of = |value: &Scalar| match value {
        Scalar::Category(category) => Some(*category),
        _ => None,
    };
    let mut admitted: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for condition in required_conditions(filter) {
        let (column, values): (&String, BTreeSet<u32>) = match condition {
            BoundFilter::OneOf { column, values } => {
                (column, values.iter().filter_map(category_of).collect())
            }
            BoundFilter::Compare {
                column,
                op: CompareOp::Eq,
                value,
            } => (column, category_of(value).into_iter().collect()),
            _ => continue,
        };
        if values.is_empty() {
            continue; // not a condition on categories
        }
        admitted
            .entry(column.clone())
            .and_modify(|earlier| earlier.retain(|category| values.contains(category)))
            .or_insert(values);
    }
    // Conditions that admit no category together: no record qualifies, and the answer keeps
    // the full grid of zeros rather than a grid of nothing.
    admitted.retain(|_, categories| !categories.is_empty());
    admitted
}

fn parameter_fits(parameter: &ParameterSpec, column: &ColumnSpec, op: Operator) -> bool {
    match (parameter.parameter_type, &column.domain) {
        (ParameterType::Integer, Domain::Integer { .. } | Domain::Float { .. }) => true,
        (ParameterType::Float, Domain::Float { .. }) => true,
        (ParameterType::Date, Domain::Date { .. }) => true,
        (ParameterType::Category, Domain::Category { .. }) => {
            parameter.column.as_deref() == Some(column.name.as_str())
        }
        (ParameterType::Categories, Domain::Category { .. }) => {
            op == Operator::In && parameter.column.as_deref() == Some(column.name.as_str())
        }
        _ => false,
    }
}

fn resolve_literal(column: &ColumnSpec, literal: &Literal) -> Result<Scalar, String> {
    let value = match (&column.domain, literal) {
        (Domain::Integer { .. }, Literal::Integer(v)) => Value::Integer(*v),
        (Domain::Float { .. }, Literal::Integer(v)) => Value::Float(*v as f64),
        (Domain::Float { .. }, Literal::Float(v)) if v.is_finite() => Value::Float(*v),
        (Domain::Date { .. }, Literal::Text(text)) => {
            Value::Date(parse_date(text).map_err(|_| "dates are written YYYY-MM-DD".to_string())?)
        }
        (Domain::Category { .. }, Literal::Text(text)) => Value::Category(text.clone()),
        (domain, _) => {
            return Err(format!(
                "is not a valid {} for column '{}'",
                domain.type_name(),
                column.name
            ));
        }
    };
    resolve_value(column, &value)?
        .pop()
        .ok_or_else(|| "is empty".to_string())
}

/// Resolves a typed value against a column's domain (categories become their positions).
fn resolve_value(column: &ColumnSpec, value: &Value) -> Result<Vec<Scalar>, String> {
    let category = |name: &String| match &column.domain {
        Domain::Category { categories } => categories
            .iter()
            .position(|known| known == name)
            .map(|index| Scalar::Category(index as u32))
            .ok_or_else(|| {
                format!(
                    "'{name}' is not a category of '{}' ({})",
                    column.name,
                    categories.join(", ")
                )
            }),
        _ => Err(format!("column '{}' has no categories", column.name)),
    };
    Ok(match value {
        Value::Integer(v) if matches!(column.domain, Domain::Float { .. }) => {
            vec![Scalar::Float(*v as f64)]
        }
        Value::Integer(v) => vec![Scalar::Integer(*v)],
        Value::Float(v) => vec![Scalar::Float(*v)],
        Value::Date(v) => vec![Scalar::Date(*v)],
        Value::Category(name) => vec![category(name)?],
        Value::Categories(names) => names.iter().map(category).collect::<Result<_, _>>()?,
    })
}

fn literal_i64(literal: &Literal) -> Option<i64> {
    match literal {
        Literal::Integer(value) => Some(*value),
        _ => None,
    }
}

fn literal_f64(literal: &Literal) -> Option<f64> {
    match literal {
        Literal::Integer(value) => Some(*value as f64),
        Literal::Float(value) if value.is_finite() => Some(*value),
        _ => None,
    }
}

fn literal_scalar(parameter_type: ParameterType, literal: &Literal) -> Option<Scalar> {
    match parameter_type {
        ParameterType::Integer => literal_i64(literal).map(Scalar::Integer),
        ParameterType::Float => literal_f64(literal).map(Scalar::Float),
        ParameterType::Date => match literal {
            Literal::Text(text) => parse_date(text).ok().map(Scalar::Date),
            _ => None,
        },
        ParameterType::Category | ParameterType::Categories => None,
    }
}

fn literal_value(parameter_type: ParameterType, literal: &Literal) -> Option<Value> {
    match (parameter_type, literal) {
        (ParameterType::Integer, Literal::Integer(value)) => Some(Value::Integer(*value)),
        (ParameterType::Float, _) => literal_f64(literal).map(Value::Float),
        (ParameterType::Date, Literal::Text(text)) => parse_date(text).ok().map(Value::Date),
        (ParameterType::Category, Literal::Text(text)) => Some(Value::Category(text.clone())),
        (ParameterType::Categories, Literal::List(values)) => {
            Some(Value::Categories(values.clone()))
        }
        (ParameterType::Categories, Literal::Text(text)) => {
            Some(Value::Categories(vec![text.clone()]))
        }
        _ => None,
    }
}

fn scalar_text(scalar: &Scalar) -> String {
    match scalar {
        Scalar::Integer(value) => value.to_string(),
        Scalar::Float(value) => value.to_string(),
        Scalar::Date(date) => date.to_string(),
        Scalar::Category(position) => format!("category {position}"),
    }
}

fn scalar_gt(left: &Scalar, right: &Scalar) -> bool {
    match (left, right) {
        (Scalar::Integer(l), Scalar::Integer(r)) => l > r,
        (Scalar::Float(l), Scalar::Float(r)) => l > r,
        (Scalar::Date(l), Scalar::Date(r)) => l > r,
        (Scalar::Category(l), Scalar::Category(r)) => l > r,
        _ => false,
    }
}

/// Bands must be labelled, ascending, contiguous, and cover the column's whole domain, so
/// every non-null value falls in exactly one band.
fn check_bands(bands: &[Band], min: f64, max: f64, integer: bool) -> Result<(), String> {
    if bands.len() < 2 || bands.len() > MAX_BANDS {
        return Err(format!("give from 2 to {MAX_BANDS} bands"));
    }
    for (index, band) in bands.iter().enumerate() {
        if band.label.trim().is_empty() || band.label == MISSING_LEVEL {
            return Err(format!(
                "band {index} needs a label other than '{MISSING_LEVEL}'"
            ));
        }
        if bands[..index]
            .iter()
            .any(|earlier| earlier.label == band.label)
        {
            return Err(format!("label '{}' is used twice", band.label));
        }
        for edge in [band.at_least, band.below].into_iter().flatten() {
            if !edge.is_finite() || (integer && edge.fract() != 0.0) {
                return Err(format!(
                    "band '{}' has edge {edge}; edges of an integer column are whole numbers",
                    band.label
                ));
            }
        }
        if let (Some(low), Some(high)) = (band.at_least, band.below)
            && low >= high
        {
            return Err(format!(
                "band '{}' is empty ({low} to below {high})",
                band.label
            ));
        }
        let first = index == 0;
        let last = index == bands.len() - 1;
        if !first && band.at_least != bands[index - 1].below {
            return Err(format!(
                "band '{}' must start where band '{}' ends, so no value falls between bands",
                band.label,
                bands[index - 1].label
            ));
        }
        if !first && band.at_least.is_none() || !last && band.below.is_none() {
            return Err(format!(
                "only the first band may be open below and only the last open above (band '{}')",
                band.label
            ));
        }
        if first && band.at_least.is_some_and(|low| low > min) {
            return Err(format!(
                "the first band starts at {} but the column's values start at {min}",
                band.at_least.unwrap_or(min)
            ));
        }
        if last && band.below.is_some_and(|high| high <= max) {
            return Err(format!(
                "the last band ends below {} but the column's values go up to {max}",
                band.below.unwrap_or(max)
            ));
        }
    }
    Ok(())
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests;
