//! A seeded generator of realistic synthetic trauma-registry data, one file per hospital, in
//! each hospital's own local format (column names, codes, units), so the demo and tests
//! exercise the same mapping onto the common data model that a real site configures.
//!
//! Sites differ in size and case mix (a trauma centre sees more road-traffic and severe
//! injuries; a small rural hospital sees mostly falls among the elderly), so some cells are
//! small at a small hospital. The same seed always yields the same file.

use std::path::Path;

use chrono::{Days, NaiveDate};
use polars::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a site writes its data locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFormat {
    /// Parquet with common-model-like names, booleans for yes/no columns, days for stays.
    ModelLikeParquet,
    /// CSV with its own column names, one-letter sex codes, numeric mechanism codes, 0/1
    /// flags, stays in hours, and -9 for an unrecorded GCS.
    LegacyCsv,
}

/// The case mix of one hospital.
#[derive(Debug, Clone)]
pub struct SiteProfile {
    pub site_id: String,
    pub admissions: usize,
    pub seed: u64,
    /// Share of patients aged 65 and over.
    pub elderly_share: f64,
    /// Weights of road_traffic, fall, assault, self_harm, other.
    pub mechanism_weights: [f64; 5],
    /// Added to every ISS draw (trauma centres see more severe injuries).
    pub severity_shift: f64,
    /// Share of admissions without a recorded systolic blood pressure (3% is typical; a site
    /// whose emergency department does not feed the registry records far more).
    pub systolic_missing_share: f64,
    pub format: LocalFormat,
}

impl SiteProfile {
    /// The three demo hospitals: a large trauma centre, a regional hospital and a small rural
    /// hospital, sized `scale` times the nominal 200,000 / 50,000 / 2,000 admissions.
    pub fn demo_sites(scale: f64) -> Vec<SiteProfile> {
        let size = |nominal: f64| ((nominal * scale).round() as usize).max(50);
        vec![
            SiteProfile {
                site_id: "site-a".into(),
                admissions: size(200_000.0),
                seed: 11,
                elderly_share: 0.25,
                mechanism_weights: [0.35, 0.35, 0.15, 0.05, 0.10],
                severity_shift: 4.0,
                systolic_missing_share: 0.03,
                format: LocalFormat::ModelLikeParquet,
            },
            SiteProfile {
                site_id: "site-b".into(),
                admissions: size(50_000.0),
                seed: 22,
                elderly_share: 0.35,
                mechanism_weights: [0.25, 0.50, 0.10, 0.05, 0.10],
                severity_shift: 1.0,
                // The regional hospital's emergency department does not feed blood pressure
                // to the registry for a fifth of its admissions: `fedq quality` flags it.
                systolic_missing_share: 0.20,
                format: LocalFormat::LegacyCsv,
            },
            SiteProfile {
                site_id: "site-c".into(),
                admissions: size(2_000.0),
                seed: 33,
                elderly_share: 0.50,
                mechanism_weights: [0.15, 0.70, 0.05, 0.03, 0.07],
                severity_shift: 0.0,
                systolic_missing_share: 0.03,
                format: LocalFormat::LegacyCsv,
            },
        ]
    }

    /// The file name this site's data is written to.
    pub fn file_name(&self) -> String {
        match self.format {
            LocalFormat::ModelLikeParquet => format!("{}.parquet", self.site_id),
            LocalFormat::LegacyCsv => format!("{}.csv", self.site_id),
        }
    }
}

const MECHANISMS: [&str; 5] = ["road_traffic", "fall", "assault", "self_harm", "other"];
const GIVEN_NAMES: [&str; 8] = [
    "Anna", "Ben", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana",
];
const FAMILY_NAMES: [&str; 8] = [
    "Novak", "Li", "Schmidt", "Okafor", "Rossi", "Kim", "Silva", "Berg",
];

/// One synthetic admission in common-model terms (before local formatting).
struct Admission {
    name: String,
    national_id: String,
    case_number: String,
    admission_date: NaiveDate,
    age: i64,
    sex: &'static str,
    mechanism: usize,
    iss: i64,
    gcs: Option<i64>,
    systolic_bp: Option<i64>,
    icu: bool,
    length_of_stay: i64,
    died: bool,
    days_to_outcome: i64,
}

fn pick(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (index, weight) in weights.iter().enumerate() {
        if draw < *weight {
            return index;
        }
        draw -= weight;
    }
    weights.len() - 1
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; adequate for synthetic data.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn admission(rng: &mut ChaCha8Rng, profile: &SiteProfile, index: usize) -> Admission {
    let start = NaiveDate::from_ymd_opt(2019, 1, 1).expect("valid date");
    let admission_date = start + Days::new(rng.random_range(0..6 * 365));
    let mechanism = pick(rng, &profile.mechanism_weights);
    let elderly = rng.random::<f64>() < profile.elderly_share;
    let age = if elderly {
        rng.random_range(65..=100)
    } else if rng.random::<f64>() < 0.12 {
        rng.random_range(0..=17)
    } else {
        rng.random_range(18..=64)
    };
    let sex = match rng.random::<f64>() {
        draw if draw < 0.002 => "other",
        draw if draw
            < (if mechanism == 1 && elderly {
                0.62
            } else {
                0.40
            }) =>
        {
            "female"
        }
        _ => "male",
    };
    let base_severity = match mechanism {
        0 => 8.0,
        2 => 6.0,
        3 => 9.0,
        _ => 4.0,
    };
    let iss = (base_severity + profile.severity_shift + normal(rng).abs() * 9.0)
        .round()
        .clamp(1.0, 75.0) as i64;
    let gcs = (rng.random::<f64>() > 0.05).then(|| {
        (15.0 - iss as f64 / 6.0 + normal(rng))
            .round()
            .clamp(3.0, 15.0) as i64
    });
    let systolic_bp = (rng.random::<f64>() >= profile.systolic_missing_share).then(|| {
        (132.0 - iss as f64 * 0.6 + normal(rng) * 18.0)
            .round()
            .clamp(40.0, 250.0) as i64
    });
    let icu = rng.random::<f64>() < (iss as f64 / 40.0).min(0.9);
    let risk = -7.5
        + 0.045 * age as f64
        + 0.09 * iss as f64
        + if gcs.is_some_and(|gcs| gcs <= 8) {
            1.5
        } else {
            0.0
        };
    let died = rng.random::<f64>() < 1.0 / (1.0 + (-risk).exp());
    let length_of_stay = (1.0 + iss as f64 * 0.5 + normal(rng).abs() * 4.0)
        .round()
        .clamp(0.0, 120.0) as i64;
    let days_to_outcome = if died {
        rng.random_range(0..=length_of_stay)
    } else {
        length_of_stay
    };
    Admission {
        name: format!(
            "{} {}",
            GIVEN_NAMES[rng.random_range(0..8)],
            FAMILY_NAMES[rng.random_range(0..8)]
        ),
        national_id: format!("{:09}", rng.random_range(0..1_000_000_000u64)),
        case_number: format!("{}-{:07}", profile.site_id.to_uppercase(), index),
        admission_date,
        age,
        sex,
        mechanism,
        iss,
        gcs,
        systolic_bp,
        icu,
        length_of_stay,
        died,
        days_to_outcome,
    }
}

/// Generates a site's admissions as a frame in its local format.
pub fn generate(profile: &SiteProfile) -> PolarsResult<DataFrame> {
    let mut rng = ChaCha8Rng::seed_from_u64(profile.seed);
    let rows: Vec<Admission> = (0..profile.admissions)
        .map(|index| admission(&mut rng, profile, index))
        .collect();
    let height = rows.len();
    let text = |name: &str, values: Vec<String>| Column::from(Series::new(name.into(), values));
    let date_text = |row: &Admission| row.admission_date.format("%Y-%m-%d").to_string();
    let columns = match profile.format {
        LocalFormat::ModelLikeParquet => vec![
            text(
                "patient_name",
                rows.iter().map(|row| row.name.clone()).collect(),
            ),
            text(
                "national_id",
                rows.iter().map(|row| row.national_id.clone()).collect(),
            ),
            text(
                "case_number",
                rows.iter().map(|row| row.case_number.clone()).collect(),
            ),
            text("admission_date", rows.iter().map(date_text).collect()),
            Series::new(
                "age".into(),
                rows.iter().map(|row| row.age).collect::<Vec<_>>(),
            )
            .into(),
            text("sex", rows.iter().map(|row| row.sex.to_string()).collect()),
            text(
                "injury_mechanism",
                rows.iter()
                    .map(|row| MECHANISMS[row.mechanism].to_string())
                    .collect(),
            ),
            Series::new(
                "iss".into(),
                rows.iter().map(|row| row.iss).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "gcs".into(),
                rows.iter().map(|row| row.gcs).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "systolic_bp".into(),
                rows.iter().map(|row| row.systolic_bp).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "icu_admission".into(),
                rows.iter().map(|row| row.icu).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "length_of_stay".into(),
                rows.iter()
                    .map(|row| row.length_of_stay)
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "in_hospital_death".into(),
                rows.iter().map(|row| row.died).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "days_to_outcome".into(),
                rows.iter()
                    .map(|row| row.days_to_outcome)
                    .collect::<Vec<_>>(),
            )
            .into(),
        ],
        LocalFormat::LegacyCsv => vec![
            text("NAME", rows.iter().map(|row| row.name.clone()).collect()),
            text(
                "ID_CARD",
                rows.iter().map(|row| row.national_id.clone()).collect(),
            ),
            text(
                "CASE_NO",
                rows.iter().map(|row| row.case_number.clone()).collect(),
            ),
            text(
                "ADM_DATE",
                rows.iter()
                    .map(|row| row.admission_date.format("%d.%m.%Y").to_string())
                    .collect(),
            ),
            Series::new(
                "AGE_Y".into(),
                rows.iter().map(|row| row.age).collect::<Vec<_>>(),
            )
            .into(),
            text(
                "SEX",
                rows.iter()
                    .map(|row| {
                        match row.sex {
                            "female" => "F",
                            "male" => "M",
                            _ => "X",
                        }
                        .to_string()
                    })
                    .collect(),
            ),
            Series::new(
                "MECH".into(),
                rows.iter()
                    .map(|row| row.mechanism as i64 + 1)
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "ISS".into(),
                rows.iter().map(|row| row.iss).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "GCS".into(),
                rows.iter()
                    .map(|row| row.gcs.unwrap_or(-9))
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "SBP".into(),
                rows.iter().map(|row| row.systolic_bp).collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "ICU".into(),
                rows.iter()
                    .map(|row| i64::from(row.icu))
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "LOS_HOURS".into(),
                rows.iter()
                    .map(|row| row.length_of_stay * 24)
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "DIED".into(),
                rows.iter()
                    .map(|row| i64::from(row.died))
                    .collect::<Vec<_>>(),
            )
            .into(),
            Series::new(
                "OUTCOME_DAYS".into(),
                rows.iter()
                    .map(|row| row.days_to_outcome)
                    .collect::<Vec<_>>(),
            )
            .into(),
        ],
    };
    DataFrame::new(height, columns)
}

/// Generates a site's data and writes it into `folder`; returns the file's path.
pub fn write_site(profile: &SiteProfile, folder: &Path) -> anyhow::Result<std::path::PathBuf> {
    let mut frame = generate(profile)?;
    let path = folder.join(profile.file_name());
    let file = std::fs::File::create(&path)?;
    match profile.format {
        LocalFormat::ModelLikeParquet => {
            ParquetWriter::new(file).finish(&mut frame)?;
        }
        LocalFormat::LegacyCsv => {
            CsvWriter::new(file)
                .include_header(true)
                .finish(&mut frame)?;
        }
    }
    Ok(path)
}

/// The `[datasets.columns]` mapping that reads a site's local format into the common model.
pub fn column_mapping(format: LocalFormat) -> &'static str {
    match format {
        LocalFormat::ModelLikeParquet => {
            r#"admission_date = { source = "admission_date" }
age = { source = "age" }
sex = { source = "sex" }
injury_mechanism = { source = "injury_mechanism" }
iss = { source = "iss" }
gcs = { source = "gcs" }
systolic_bp = { source = "systolic_bp" }
icu_admission = { source = "icu_admission", codes = { "true" = "yes", "false" = "no" } }
length_of_stay = { source = "length_of_stay" }
in_hospital_death = { source = "in_hospital_death", codes = { "true" = "yes", "false" = "no" } }
days_to_outcome = { source = "days_to_outcome" }
"#
        }
        LocalFormat::LegacyCsv => {
            r#"admission_date = { source = "ADM_DATE", date_format = "%d.%m.%Y" }
age = { source = "AGE_Y" }
sex = { source = "SEX", codes = { F = "female", M = "male", X = "other" } }
injury_mechanism = { source = "MECH", codes = { "1" = "road_traffic", "2" = "fall", "3" = "assault", "4" = "self_harm", "5" = "other" } }
iss = { source = "ISS" }
gcs = { source = "GCS", missing = ["-9"] }
systolic_bp = { source = "SBP" }
icu_admission = { source = "ICU", codes = { "0" = "no", "1" = "yes" } }
length_of_stay = { source = "LOS_HOURS", scale = 0.041666666666666664 }
in_hospital_death = { source = "DIED", codes = { "0" = "no", "1" = "yes" } }
days_to_outcome = { source = "OUTCOME_DAYS" }
"#
        }
    }
}

/// The local identifier columns of a format.
pub fn identifier_columns(format: LocalFormat) -> &'static [&'static str] {
    match format {
        LocalFormat::ModelLikeParquet => &["patient_name", "national_id", "case_number"],
        LocalFormat::LegacyCsv => &["NAME", "ID_CARD", "CASE_NO"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_the_same_data_and_sizes_follow_the_profile() {
        let mut profile = SiteProfile::demo_sites(0.001).remove(2);
        profile.admissions = 300;
        let first = generate(&profile).unwrap();
        let second = generate(&profile).unwrap();
        assert_eq!(first.height(), 300);
        assert!(first.equals_missing(&second));
    }
}
