//! Loading the site's data: each configured file is read once at start-up (CSV or Parquet, with
//! polars), its local columns are mapped onto the common data model — renamed, recoded,
//! unit-converted, checked against the declared domain — and the result is kept in memory as
//! a snapshot. Queries never re-read or re-parse a file.
//!
//! In the snapshot every column has the model's name and a plan-friendly type: integers as
//! `Int64`, floats as `Float64`, dates as `Int32` days since 1970-01-01, and categories as
//! `UInt32` positions in the model's category list. Identifier columns are never loaded.
//!
//! Problems are reported per column with counts only: no message here ever contains a value
//! from the file.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Cursor;

use fedq_proto::model::{DatasetSpec, Domain, days_since_epoch};
use fedq_proto::template::content_hash;
use polars::prelude::*;

use crate::NodeError;
use crate::config::{ColumnMapping, DatasetConfig, DomainViolationPolicy, FileFormat, Objections};
use crate::records::{NodeSecret, RecordKey};

/// One dataset held in memory in common-model terms.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dataset: String,
    /// Keyed hash (with the node's secret) of the file and objection list it was loaded from.
    pub version: String,
    pub frame: DataFrame,
    /// Model columns this site provides.
    pub columns: BTreeSet<String>,
    /// One keyed-hash record key per row (empty when the dataset names no record key).
    pub record_keys: Vec<RecordKey>,
}

impl Snapshot {
    pub fn rows(&self) -> usize {
        self.frame.height()
    }
}

/// Per-column counts of values that could not be used.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ColumnQuality {
    /// Values that are not of the column's type (not a number, not a date, unknown code).
    pub unreadable: usize,
    /// Values of the right type outside the declared range.
    pub out_of_range: usize,
}

/// Loads one dataset. Returns the snapshot and warning lines (values treated as missing under
/// `on_domain_violation = "treat_as_missing"`).
pub fn load(
    config: &DatasetConfig,
    spec: &DatasetSpec,
    secret: &NodeSecret,
) -> Result<(Snapshot, Vec<String>), NodeError> {
    let at = format!("dataset '{}' ({})", config.name, config.path.display());
    let bytes = std::fs::read(&config.path)
        .map_err(|err| NodeError::Data(vec![format!("{at}: cannot read the file: {err}")]))?;
    let version = content_hash(&bytes);
    let local = read_frame(bytes, config.format).map_err(|err| {
        NodeError::Data(vec![format!(
            "{at}: cannot read the file as {}: {}",
            match config.format {
                FileFormat::Csv => "CSV with a header row",
                FileFormat::Parquet => "Parquet",
            },
            describe_polars_error(&err)
        )])
    })?;
    let present: BTreeSet<String> = local
        .get_column_names()
        .iter()
        .map(|name| name.to_string())
        .collect();
    let mut problems = Vec::new();
    for identifier in &config.identifiers {
        if !present.contains(identifier) {
            problems.push(format!(
                "{at}: declared identifier column '{identifier}' is not in the file; correct the name or remove it"
            ));
        }
    }
    for key_column in &config.record_key {
        if !present.contains(key_column) {
            problems.push(format!(
                "{at}: record_key column '{key_column}' is not in the file; correct the name"
            ));
        }
    }
    let mut columns = Vec::new();
    let mut warnings = Vec::new();
    for (model_name, mapping) in &config.columns {
        let column_at = format!("{at}: column '{model_name}' (local '{}')", mapping.source);
        if !present.contains(&mapping.source) {
            // The file's header is not quoted: in a file exported without one, the "header"
            // would be the first patient's record.
            problems.push(format!(
                "{column_at}: not in the file, which has {} columns; check the name and that the file starts with a header row",
                present.len()
            ));
            continue;
        }
        let Some(column_spec) = spec.column(model_name) else {
            problems.push(format!("{column_at}: not in the data model"));
            continue;
        };
        let text = local
            .column(&mapping.source)
            .and_then(|column| column.as_materialized_series().cast(&DataType::String))
            .map_err(|err| {
                NodeError::Data(vec![format!(
                    "{column_at}: cannot be read as text: {}",
                    describe_polars_error(&err)
                )])
            })?;
        let text = text.str().map_err(|_| NodeError::Engine)?;
        let (series, quality) = convert(model_name, text, mapping, &column_spec.domain);
        let bad = quality.unreadable + quality.out_of_range;
        if bad > 0 {
            let line = format!(
                "{column_at}: {} value(s) not of type {}{}, {} outside the declared domain{}",
                quality.unreadable,
                column_spec.domain.type_name(),
                if mapping.codes.is_empty() {
                    ""
                } else {
                    " or with no code mapping"
                },
                quality.out_of_range,
                column_spec
                    .domain
                    .range_text()
                    .map(|(min, max)| format!(" {min} to {max}"))
                    .unwrap_or_default()
            );
            let line = match &column_spec.domain {
                Domain::Category { categories }
                    if mapping.codes.is_empty() && quality.unreadable > 0 =>
                {
                    format!(
                        "{line} (local values must be the model's categories {}; otherwise map them with codes = {{ ... }})",
                        categories.join(", ")
                    )
                }
                _ => line,
            };
            match config.on_domain_violation {
                DomainViolationPolicy::RefuseToStart => problems.push(line),
                DomainViolationPolicy::TreatAsMissing => {
                    warnings.push(format!("{line}; treated as missing"));
                    // Which records had such a value, for data-quality profiles (the value
                    // itself is not kept).
                    let outside: BooleanChunked = text
                        .iter()
                        .zip(series.is_null().iter())
                        .map(|(value, null)| {
                            Some(null == Some(true) && present_value(value, mapping).is_some())
                        })
                        .collect();
                    columns.push(Column::from(
                        outside
                            .with_name(outside_domain_column(model_name).into())
                            .into_series(),
                    ));
                }
            }
        }
        columns.push(Column::from(series));
    }
    if !problems.is_empty() {
        return Err(NodeError::Data(problems));
    }
    let sources: BTreeSet<&String> = config
        .columns
        .values()
        .map(|mapping| &mapping.source)
        .collect();
    let ignored = present
        .iter()
        .filter(|name| !sources.contains(name) && !config.identifiers.contains(name))
        .count();
    if ignored > 0 {
        // Counted, not named: column names are the file's own text.
        warnings.push(format!(
            "{at}: {ignored} local column(s) are neither mapped nor declared identifiers; they are not loaded (declare identifying ones under 'identifiers')"
        ));
    }
    let frame = DataFrame::new(local.height(), columns)
        .map_err(|err| NodeError::Data(vec![format!("{at}: {}", describe_polars_error(&err))]))?;
    let record_keys = record_keys(&local, config, secret, &at, &mut warnings)?;
    let (frame, record_keys, version) = match &config.objections {
        Some(objections) => {
            let (keep, list_hash) = objection_mask(&local, objections, &at, &mut warnings)?;
            let frame = frame.filter(&keep).map_err(|err| {
                NodeError::Data(vec![format!("{at}: {}", describe_polars_error(&err))])
            })?;
            let record_keys = if record_keys.is_empty() {
                record_keys
            } else {
                record_keys
                    .into_iter()
                    .zip(keep.iter())
                    .filter(|(_, kept)| *kept == Some(true))
                    .map(|(key, _)| key)
                    .collect()
            };
            // The list is part of the snapshot: a changed list gives a new version, so the
            // difference between two answers is never silently the number of new objections.
            (
                frame,
                record_keys,
                content_hash(format!("{version}\n{list_hash}").as_bytes()),
            )
        }
        None => (frame, record_keys, version),
    };
    // Keyed with the node's secret: someone holding a candidate copy of the file cannot confirm
    // it from the published version.
    let version = secret.snapshot_version(&version);
    Ok((
        Snapshot {
            dataset: config.name.clone(),
            version,
            frame,
            columns: config.columns.keys().cloned().collect(),
            record_keys,
        },
        warnings,
    ))
}

/// The keyed-hash record key of every row, from the dataset's record-key columns (read as
/// text, hashed, and dropped: no value is kept or reported). Rows sharing a key are counted
/// in a warning, since overlap control then treats them as one record.
fn record_keys(
    local: &DataFrame,
    config: &DatasetConfig,
    secret: &NodeSecret,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<RecordKey>, NodeError> {
    if config.record_key.is_empty() {
        return Ok(Vec::new());
    }
    let unusable = |err: PolarsError| {
        NodeError::Data(vec![format!(
            "{at}: record key columns: {}",
            describe_polars_error(&err)
        )])
    };
    let texts = config
        .record_key
        .iter()
        .map(|name| {
            local
                .column(name)
                .and_then(|column| column.as_materialized_series().cast(&DataType::String))
                .map_err(unusable)
        })
        .collect::<Result<Vec<Series>, NodeError>>()?;
    let texts = texts
        .iter()
        .map(|series| series.str().map_err(unusable))
        .collect::<Result<Vec<&StringChunked>, NodeError>>()?;
    // Rows sharing a key (a patient's readmissions under a patient-level key, or empty key
    // columns) are told apart by their order among the rows with that key, so each row is
    // one record and counts and record sets always agree.
    let mut seen: std::collections::HashMap<RecordKey, u32> = std::collections::HashMap::new();
    let mut shared = 0usize;
    let keys: Vec<RecordKey> = (0..local.height())
        .map(|row| {
            let values: Vec<Option<&str>> = texts.iter().map(|text| text.get(row)).collect();
            let key = secret.record_key(&config.name, &values);
            let occurrence = seen.entry(key).or_insert(0);
            *occurrence += 1;
            if *occurrence == 1 {
                key
            } else {
                shared += 1;
                secret.occurrence_key(&key, *occurrence)
            }
        })
        .collect();
    if shared > 0 {
        warnings.push(format!(
            "{at}: {shared} row(s) share their record key ({}) with an earlier row; they are told apart by their order in the file, so keep that order stable between loads (or name columns that identify each row in record_key)",
            config.record_key.join(", ")
        ));
    }
    Ok(keys)
}

/// Which rows to keep (false: the patient is on the objection list), applied before any
/// computation, and the list's hash. How many records are left out is never reported in any
/// answer; the node's own log only warns when a non-empty list matched no record at all.
fn objection_mask(
    local: &DataFrame,
    objections: &Objections,
    at: &str,
    warnings: &mut Vec<String>,
) -> Result<(BooleanChunked, String), NodeError> {
    let text = std::fs::read_to_string(&objections.file).map_err(|err| {
        NodeError::Data(vec![format!(
            "{at}: cannot read the objection list {}: {err}",
            objections.file.display()
        )])
    })?;
    let keys: HashSet<&str> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|key| !key.is_empty())
        .collect();
    let unusable = |err: PolarsError| {
        NodeError::Data(vec![format!(
            "{at}: objection key column '{}': {}",
            objections.key_column,
            describe_polars_error(&err)
        )])
    };
    let key_column = local
        .column(&objections.key_column)
        .and_then(|column| column.as_materialized_series().cast(&DataType::String))
        .map_err(unusable)?;
    let keep: BooleanChunked = key_column
        .str()
        .map_err(unusable)?
        .iter()
        .map(|key| Some(!key.is_some_and(|key| keys.contains(key.trim()))))
        .collect();
    if !keys.is_empty() && keep.all() {
        warnings.push(format!(
            "{at}: no key of the objection list {} matches column '{}'; check the column and how keys are written there",
            objections.file.display(),
            objections.key_column
        ));
    }
    Ok((keep, content_hash(text.as_bytes())))
}

fn read_frame(bytes: Vec<u8>, format: FileFormat) -> PolarsResult<DataFrame> {
    match format {
        // Every CSV column is read as text; typing happens in `convert`, where failures are
        // counted instead of aborting the read with a message that could quote a value.
        FileFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .into_reader_with_file_handle(Cursor::new(bytes))
            .finish(),
        FileFormat::Parquet => ParquetReader::new(Cursor::new(bytes)).finish(),
    }
}

/// A polars error described without its message, which may quote data values.
pub fn describe_polars_error(err: &PolarsError) -> String {
    match err {
        PolarsError::IO { error, .. } => format!("input/output error ({})", error.kind()),
        PolarsError::ColumnNotFound(_) => "a column is missing".into(),
        PolarsError::NoData(_) => "the file holds no data".into(),
        PolarsError::SchemaMismatch(_) | PolarsError::ShapeMismatch(_) => {
            "rows do not all have the same columns; check the delimiter and quoting".into()
        }
        PolarsError::ComputeError(_) | PolarsError::InvalidOperation(_) => {
            "the file is malformed or not of this format".into()
        }
        _ => "the file could not be decoded".into(),
    }
}

/// Converts one local column (as text) into its model column, counting unusable values.
/// A local value, unless it is empty or one of the mapping's missing markers.
fn present_value<'a>(value: Option<&'a str>, mapping: &ColumnMapping) -> Option<&'a str> {
    value.map(str::trim).filter(|value| {
        !value.is_empty() && !mapping.missing.iter().any(|missing| missing == value)
    })
}

/// The hidden snapshot column marking the records whose value of `model_column` was outside
/// its domain and is treated as missing (present only when there are such records). No
/// template can name it: it is not a model column.
pub fn outside_domain_column(model_column: &str) -> String {
    format!("__fedq_outside_domain__{model_column}")
}

fn convert(
    model_name: &str,
    text: &StringChunked,
    mapping: &ColumnMapping,
    domain: &Domain,
) -> (Series, ColumnQuality) {
    let mut quality = ColumnQuality::default();
    let name = PlSmallStr::from(model_name);
    let values = text.iter().map(|value| present_value(value, mapping));
    let series = match domain {
        Domain::Integer { min, max } => {
            let converted: Vec<Option<i64>> = values
                .map(|value| {
                    let number = value.map(|value| to_number(value, mapping))?;
                    let Some(number) = number.filter(|number| {
                        number.fract() == 0.0 || mapping.scale != 1.0 || mapping.offset != 0.0
                    }) else {
                        quality.unreadable += 1;
                        return None;
                    };
                    let whole = number.round();
                    if whole < *min as f64 || whole > *max as f64 {
                        quality.out_of_range += 1;
                        return None;
                    }
                    Some(whole as i64)
                })
                .collect();
            Series::new(name, converted)
        }
        Domain::Float { min, max } => {
            let converted: Vec<Option<f64>> = values
                .map(|value| {
                    let Some(number) = value.map(|value| to_number(value, mapping))? else {
                        quality.unreadable += 1;
                        return None;
                    };
                    if number < *min || number > *max {
                        quality.out_of_range += 1;
                        return None;
                    }
                    Some(number)
                })
                .collect();
            Series::new(name, converted)
        }
        Domain::Date { min, max } => {
            let converted: Vec<Option<i32>> = values
                .map(|value| {
                    let value = value?;
                    let Ok(date) = chrono::NaiveDate::parse_from_str(value, &mapping.date_format)
                    else {
                        quality.unreadable += 1;
                        return None;
                    };
                    if date < *min || date > *max {
                        quality.out_of_range += 1;
                        return None;
                    }
                    Some(days_since_epoch(date))
                })
                .collect();
            Series::new(name, converted)
        }
        Domain::Category { categories } => {
            let positions: BTreeMap<&str, u32> = categories
                .iter()
                .enumerate()
                .map(|(index, category)| (category.as_str(), index as u32))
                .collect();
            let converted: Vec<Option<u32>> = values
                .map(|value| {
                    let value = value?;
                    let category = if mapping.codes.is_empty() {
                        Some(value)
                    } else {
                        mapping.codes.get(value).map(String::as_str)
                    };
                    let position = category.and_then(|category| positions.get(category).copied());
                    if position.is_none() {
                        quality.unreadable += 1;
                    }
                    position
                })
                .collect();
            Series::new(name, converted)
        }
        Domain::Text => {
            // Text columns are identifiers, which configuration validation refuses to map.
            quality.unreadable = text.len();
            Series::new_null(name, text.len())
        }
    };
    (series, quality)
}

fn to_number(value: &str, mapping: &ColumnMapping) -> Option<f64> {
    let number: f64 = value.parse().ok()?;
    let converted = number * mapping.scale + mapping.offset;
    converted.is_finite().then_some(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_proto::model::DataModel;
    use std::path::Path;

    fn mapping(source: &str) -> ColumnMapping {
        ColumnMapping {
            source: source.into(),
            codes: BTreeMap::new(),
            missing: Vec::new(),
            scale: 1.0,
            offset: 0.0,
            date_format: "%Y-%m-%d".into(),
        }
    }

    fn dataset(
        path: &Path,
        columns: BTreeMap<String, ColumnMapping>,
        policy: DomainViolationPolicy,
    ) -> DatasetConfig {
        DatasetConfig {
            name: "trauma_admissions".into(),
            path: path.to_path_buf(),
            format: FileFormat::Csv,
            identifiers: vec!["NAME".into()],
            record_key: vec!["NAME".into()],
            on_domain_violation: policy,
            objections: None,
            columns,
        }
    }

    const CSV: &str = "NAME,AGE,SEX,ADM,LOS_H\nAnna,34,F,2021-02-03,48\nBert,,M,2021-02-04,12\nCarl,130,U,2021-13-01,x\n";

    fn columns() -> BTreeMap<String, ColumnMapping> {
        let mut sex = mapping("SEX");
        sex.codes = BTreeMap::from([("F".into(), "female".into()), ("M".into(), "male".into())]);
        sex.missing = vec!["U".into()];
        let mut los = mapping("LOS_H");
        los.scale = 1.0 / 24.0;
        BTreeMap::from([
            ("age".to_string(), mapping("AGE")),
            ("sex".to_string(), sex),
            ("admission_date".to_string(), mapping("ADM")),
            ("length_of_stay".to_string(), los),
        ])
    }

    #[test]
    fn violations_are_counted_per_column_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, CSV).unwrap();
        let model = DataModel::builtin();
        let spec = model.dataset("trauma_admissions").unwrap();
        let err = load(
            &dataset(&path, columns(), DomainViolationPolicy::RefuseToStart),
            spec,
            &NodeSecret::ephemeral(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("column 'age' (local 'AGE'): 0 value(s) not of type integer, 1 outside the declared domain 0 to 120"), "{err}");
        assert!(
            err.contains("column 'admission_date' (local 'ADM'): 1 value(s) not of type date"),
            "{err}"
        );
        assert!(
            err.contains("column 'length_of_stay' (local 'LOS_H'): 1 value(s) not of type integer"),
            "{err}"
        );
        assert!(
            !err.contains("130") && !err.contains("Carl") && !err.contains("2021-13-01"),
            "{err}"
        );
    }

    #[test]
    fn mapped_snapshot_has_model_names_codes_units_and_no_identifiers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, CSV).unwrap();
        let model = DataModel::builtin();
        let spec = model.dataset("trauma_admissions").unwrap();
        let secret = NodeSecret::ephemeral();
        let config = dataset(&path, columns(), DomainViolationPolicy::TreatAsMissing);
        let (snapshot, warnings) = load(&config, spec, &secret).unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        // The version is keyed: stable at this node, not the file's plain hash.
        assert!(snapshot.version.starts_with("hmac-sha256:"));
        assert_eq!(
            load(&config, spec, &secret).unwrap().0.version,
            snapshot.version
        );
        let plain = content_hash(&std::fs::read(&path).unwrap());
        assert!(
            !snapshot
                .version
                .contains(plain.trim_start_matches("sha256:"))
        );
        assert_ne!(
            load(&config, spec, &NodeSecret::ephemeral())
                .unwrap()
                .0
                .version,
            snapshot.version
        );
        let frame = &snapshot.frame;
        assert!(frame.column("NAME").is_err());
        let age: Vec<Option<i64>> = frame.column("age").unwrap().i64().unwrap().iter().collect();
        assert_eq!(age, [Some(34), None, None]);
        let sex: Vec<Option<u32>> = frame.column("sex").unwrap().u32().unwrap().iter().collect();
        assert_eq!(sex, [Some(0), Some(1), None]);
        let los: Vec<Option<i64>> = frame
            .column("length_of_stay")
            .unwrap()
            .i64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(los, [Some(2), Some(1), None]);
    }

    #[test]
    fn missing_local_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, "NAME,AGE\nAnna,3\n").unwrap();
        let model = DataModel::builtin();
        let spec = model.dataset("trauma_admissions").unwrap();
        let err = load(
            &dataset(&path, columns(), DomainViolationPolicy::RefuseToStart),
            spec,
            &NodeSecret::ephemeral(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("column 'sex' (local 'SEX'): not in the file, which has 2 columns")
                && !err.contains("AGE, NAME"),
            "{err}"
        );
    }

    #[test]
    fn records_on_the_objection_list_are_left_out_before_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, "NAME,AGE\nAnna,34\nBert,40\nCarl,50\n").unwrap();
        let objections = dir.path().join("objections.txt");
        std::fs::write(
            &objections,
            "# refused research use\nBert\n  Dora  # not in the file\n",
        )
        .unwrap();
        let model = DataModel::builtin();
        let spec = model.dataset("trauma_admissions").unwrap();
        let mut config = dataset(
            &path,
            BTreeMap::from([("age".to_string(), mapping("AGE"))]),
            DomainViolationPolicy::RefuseToStart,
        );
        config.objections = Some(Objections {
            file: objections,
            key_column: "NAME".into(),
        });
        let (snapshot, _) = load(&config, spec, &NodeSecret::ephemeral()).unwrap();
        let age: Vec<Option<i64>> = snapshot
            .frame
            .column("age")
            .unwrap()
            .i64()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(age, [Some(34), Some(50)]);
    }
}
