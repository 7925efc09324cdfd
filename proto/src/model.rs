//! The alliance's common data model: named datasets whose columns have a type and a declared
//! domain. Templates speak only these names; each node maps its local columns onto them, so
//! every site's cells line up on one grid.
//!
//! The model is versioned. Version 1 is compiled into every fedq binary
//! ([`DataModel::builtin`]) from `proto/model/fedq-trauma-v1.toml`.

use chrono::NaiveDate;
use serde::Deserialize;

use crate::Error;

const BUILTIN_MODEL: &str = include_str!("../model/fedq-trauma-v1.toml");

/// A versioned common data model.
#[derive(Debug, Clone, PartialEq)]
pub struct DataModel {
    pub name: String,
    pub version: String,
    pub datasets: Vec<DatasetSpec>,
}

/// One dataset of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    pub name: String,
    pub description: String,
    pub columns: Vec<ColumnSpec>,
}

/// One column: name, domain, and whether it identifies a person.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSpec {
    pub name: String,
    pub description: String,
    pub unit: Option<String>,
    pub domain: Domain,
    /// Identifier columns (names, ID numbers, case numbers) may never appear in a template.
    pub identifier: bool,
}

/// The declared type and domain of a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Whole numbers in `min..=max`.
    Integer { min: i64, max: i64 },
    /// Real numbers in `min..=max`.
    Float { min: f64, max: f64 },
    /// Calendar dates in `min..=max`.
    Date { min: NaiveDate, max: NaiveDate },
    /// One of a fixed, ordered set of categories.
    Category { categories: Vec<String> },
    /// Free text; only identifier columns may have it.
    Text,
}

impl Domain {
    /// The type name used in files and on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Domain::Integer { .. } => "integer",
            Domain::Float { .. } => "float",
            Domain::Date { .. } => "date",
            Domain::Category { .. } => "category",
            Domain::Text => "text",
        }
    }

    /// True for integer and float columns.
    pub fn is_numeric(&self) -> bool {
        matches!(self, Domain::Integer { .. } | Domain::Float { .. })
    }

    /// The (minimum, maximum) of a numeric or date domain, as text.
    pub fn range_text(&self) -> Option<(String, String)> {
        match self {
            Domain::Integer { min, max } => Some((min.to_string(), max.to_string())),
            Domain::Float { min, max } => Some((min.to_string(), max.to_string())),
            Domain::Date { min, max } => Some((min.to_string(), max.to_string())),
            Domain::Category { .. } | Domain::Text => None,
        }
    }
}

impl DataModel {
    /// The data model compiled into this build (`fedq-trauma/1`).
    pub fn builtin() -> DataModel {
        // The embedded file is checked by a unit test; failing here is a build defect.
        DataModel::from_toml(BUILTIN_MODEL, "built-in data model")
            .expect("the built-in data model is valid (see model tests)")
    }

    /// Parses and checks a data model document.
    pub fn from_toml(text: &str, origin: &str) -> Result<DataModel, Error> {
        let raw: RawModel = toml::from_str(text).map_err(|err| Error::Syntax {
            what: origin.to_string(),
            message: err.to_string(),
        })?;
        raw.validate()
    }

    /// "name/version", e.g. `fedq-trauma/1`; templates name the model they were written for.
    pub fn key(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// The dataset with this name, if the model defines it.
    pub fn dataset(&self, name: &str) -> Option<&DatasetSpec> {
        self.datasets.iter().find(|dataset| dataset.name == name)
    }
}

impl DatasetSpec {
    /// The column with this name, if the dataset defines it.
    pub fn column(&self, name: &str) -> Option<&ColumnSpec> {
        self.columns.iter().find(|column| column.name == name)
    }
}

/// Name of the explicit level that holds records whose stratum value is null.
pub const MISSING_LEVEL: &str = "missing";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    version: String,
    datasets: Vec<RawDataset>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: String,
    #[serde(default)]
    description: String,
    columns: Vec<RawColumn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    column_type: String,
    #[serde(default)]
    description: String,
    unit: Option<String>,
    #[serde(default)]
    identifier: bool,
    min: Option<toml::Value>,
    max: Option<toml::Value>,
    categories: Option<Vec<String>>,
}

impl RawModel {
    fn validate(self) -> Result<DataModel, Error> {
        if !is_identifier_like(&self.name) || self.version.is_empty() {
            return Err(Error::DataModel(format!(
                "name '{}' and version '{}' must be non-empty names of letters, digits, '-' or '_'",
                self.name, self.version
            )));
        }
        let mut datasets: Vec<DatasetSpec> = Vec::new();
        for raw_dataset in self.datasets {
            if datasets.iter().any(|seen| seen.name == raw_dataset.name) {
                return Err(Error::DataModel(format!(
                    "dataset '{}' is defined twice",
                    raw_dataset.name
                )));
            }
            let mut columns: Vec<ColumnSpec> = Vec::new();
            for raw_column in raw_dataset.columns {
                let column = raw_column.validate(&raw_dataset.name)?;
                if columns.iter().any(|seen| seen.name == column.name) {
                    return Err(Error::DataModel(format!(
                        "dataset '{}': column '{}' is defined twice",
                        raw_dataset.name, column.name
                    )));
                }
                columns.push(column);
            }
            datasets.push(DatasetSpec {
                name: raw_dataset.name,
                description: raw_dataset.description,
                columns,
            });
        }
        Ok(DataModel {
            name: self.name,
            version: self.version,
            datasets,
        })
    }
}

impl RawColumn {
    fn validate(self, dataset: &str) -> Result<ColumnSpec, Error> {
        let at = format!("dataset '{}', column '{}'", dataset, self.name);
        if !is_identifier_like(&self.name) {
            return Err(Error::DataModel(format!(
                "{at}: names use lowercase letters, digits and '_'"
            )));
        }
        let bound = |value: &Option<toml::Value>, which: &str| {
            value.clone().ok_or_else(|| {
                Error::DataModel(format!("{at}: '{which}' is required for this type"))
            })
        };
        let domain = match self.column_type.as_str() {
            "integer" => {
                let min = bound(&self.min, "min")?.as_integer();
                let max = bound(&self.max, "max")?.as_integer();
                match (min, max) {
                    (Some(min), Some(max)) if min <= max => Domain::Integer { min, max },
                    _ => {
                        return Err(Error::DataModel(format!(
                            "{at}: integer 'min' and 'max' must be whole numbers with min <= max"
                        )));
                    }
                }
            }
            "float" => {
                let as_float =
                    |value: toml::Value| value.as_float().or(value.as_integer().map(|v| v as f64));
                let min = as_float(bound(&self.min, "min")?);
                let max = as_float(bound(&self.max, "max")?);
                match (min, max) {
                    (Some(min), Some(max)) if min.is_finite() && max.is_finite() && min <= max => {
                        Domain::Float { min, max }
                    }
                    _ => {
                        return Err(Error::DataModel(format!(
                            "{at}: float 'min' and 'max' must be finite numbers with min <= max"
                        )));
                    }
                }
            }
            "date" => {
                let as_date =
                    |value: toml::Value| value.as_str().and_then(|text| parse_date(text).ok());
                let min = as_date(bound(&self.min, "min")?);
                let max = as_date(bound(&self.max, "max")?);
                match (min, max) {
                    (Some(min), Some(max)) if min <= max => Domain::Date { min, max },
                    _ => {
                        return Err(Error::DataModel(format!(
                            "{at}: date 'min' and 'max' must be \"YYYY-MM-DD\" strings with min <= max"
                        )));
                    }
                }
            }
            "category" => {
                let categories = self.categories.clone().unwrap_or_default();
                if categories.is_empty() {
                    return Err(Error::DataModel(format!(
                        "{at}: a category column needs 'categories'"
                    )));
                }
                for (index, category) in categories.iter().enumerate() {
                    if category == MISSING_LEVEL || !is_identifier_like(category) {
                        return Err(Error::DataModel(format!(
                            "{at}: category '{category}' must be a lowercase name and not '{MISSING_LEVEL}'"
                        )));
                    }
                    if categories[..index].contains(category) {
                        return Err(Error::DataModel(format!(
                            "{at}: category '{category}' is listed twice"
                        )));
                    }
                }
                Domain::Category { categories }
            }
            "text" => Domain::Text,
            other => {
                return Err(Error::DataModel(format!(
                    "{at}: unknown type '{other}' (use integer, float, date, category or text)"
                )));
            }
        };
        if matches!(domain, Domain::Text) && !self.identifier {
            return Err(Error::DataModel(format!(
                "{at}: only identifier columns may have type 'text'"
            )));
        }
        let has_range = self.min.is_some() || self.max.is_some();
        if has_range
            && !matches!(
                domain,
                Domain::Integer { .. } | Domain::Float { .. } | Domain::Date { .. }
            )
        {
            return Err(Error::DataModel(format!(
                "{at}: 'min'/'max' apply only to integer, float and date columns"
            )));
        }
        if self.categories.is_some() && !matches!(domain, Domain::Category { .. }) {
            return Err(Error::DataModel(format!(
                "{at}: 'categories' applies only to category columns"
            )));
        }
        Ok(ColumnSpec {
            name: self.name,
            description: self.description,
            unit: self.unit,
            domain,
            identifier: self.identifier,
        })
    }
}

/// Parses an ISO 8601 calendar date (`YYYY-MM-DD`).
pub fn parse_date(text: &str) -> Result<NaiveDate, chrono::ParseError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
}

/// Days since 1970-01-01, the representation dates have inside query plans.
pub fn days_since_epoch(date: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("1970-01-01 is a valid date");
    // Every date chrono represents is within i32 days of 1970.
    (date - epoch).num_days() as i32
}

fn is_identifier_like(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_model_parses_and_marks_identifiers() {
        let model = DataModel::builtin();
        assert_eq!(model.key(), "fedq-trauma/1");
        let dataset = model.dataset("trauma_admissions").unwrap();
        assert!(dataset.column("national_id").unwrap().identifier);
        assert!(!dataset.column("age").unwrap().identifier);
        assert_eq!(
            dataset.column("age").unwrap().domain,
            Domain::Integer { min: 0, max: 120 }
        );
    }

    #[test]
    fn text_column_that_is_not_an_identifier_is_rejected() {
        let text = r#"
            name = "m"
            version = "1"
            [[datasets]]
            name = "d"
            [[datasets.columns]]
            name = "notes"
            type = "text"
        "#;
        let err = DataModel::from_toml(text, "test").unwrap_err().to_string();
        assert!(
            err.contains("only identifier columns may have type 'text'"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_in_model_is_rejected_with_its_name() {
        let text = "name = \"m\"\nversion = \"1\"\ncolour = 3\ndatasets = []\n";
        let err = DataModel::from_toml(text, "test").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn days_since_epoch_counts_from_1970() {
        assert_eq!(days_since_epoch(parse_date("1970-01-02").unwrap()), 1);
        assert_eq!(days_since_epoch(parse_date("1969-12-31").unwrap()), -1);
    }
}
