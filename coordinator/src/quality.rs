//! The data-quality report (`fedq quality`): from a pooled data-quality profile, each site's
//! share of records missing a value, with a value outside the model's domain, and failing each
//! plausibility check — side by side, flagged where a site falls short of the alliance's
//! standard (`[quality]` in the coordinator configuration); as text or JSON. Shares are
//! computed only from released counts: a withheld count gives no share and no flag.

use std::fmt::Write;

use fedq_proto::model::MISSING_LEVEL;
use fedq_proto::template::{CHECK_LEVELS, OUTSIDE_DOMAIN_LEVEL};
use fedq_proto::wire;
use serde::Serialize;

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Share of records with no value in the column (completeness).
    Missing,
    /// Share of records whose value was outside the column's domain (conformance).
    OutsideDomain,
    /// Share of the records a check could evaluate that fail it (plausibility).
    Implausible,
}

impl Measure {
    fn words(self) -> &'static str {
        match self {
            Measure::Missing => "missing",
            Measure::OutsideDomain => "outside domain",
            Measure::Implausible => "implausible",
        }
    }

    fn limit(self, standard: &wire::QualityStandard) -> f64 {
        match self {
            Measure::Missing => standard.max_missing_percent,
            Measure::OutsideDomain => standard.max_outside_domain_percent,
            Measure::Implausible => standard.max_implausible_percent,
        }
    }
}

/// One site's (or the pooled) share for a row; `percent` is `None` when a count it needs was
/// withheld or the site did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    pub percent: Option<f64>,
    /// Above the alliance's limit for this measure.
    pub flagged: bool,
}

/// One measure of one profiled column or check, across the sites.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The profiled column, or the check's name.
    pub section: String,
    pub measure: Measure,
    /// In the result's site order.
    pub by_site: Vec<(String, Share)>,
    pub pooled: Share,
}

/// A count, or `None` when withheld or absent.
type Counts = Vec<Option<u64>>;

/// A released count.
fn count_of(cell: &wire::Cell) -> Option<u64> {
    match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    }
}

/// A site's section as counts (cells, then the total).
fn site_counts(section: &wire::Section) -> (Counts, Option<u64>) {
    (
        section.cells.iter().map(count_of).collect(),
        section.total.as_ref().and_then(count_of),
    )
}

/// A pooled section as counts: only complete pooled values are exact.
fn pooled_counts(section: &wire::PooledSection) -> (Counts, Option<u64>) {
    let exact = |cell: &wire::PooledCell| cell.complete.then_some(cell.count).flatten();
    (
        section.cells.iter().map(exact).collect(),
        section.total.as_ref().and_then(exact),
    )
}

/// The share of `part` in `whole`, in percent (none when either is unknown or `whole` is 0).
fn percent(part: Option<u64>, whole: Option<u64>) -> Option<f64> {
    match (part, whole) {
        (Some(part), Some(whole)) if whole > 0 => Some(part as f64 * 100.0 / whole as f64),
        _ => None,
    }
}

/// The measures a section gives, each with the share computed from its released counts.
fn measures(
    levels: &[String],
    (counts, total): &(Counts, Option<u64>),
) -> Vec<(Measure, Option<f64>)> {
    let count = |index: usize| counts.get(index).copied().flatten();
    if levels == CHECK_LEVELS {
        // Of the records the check could evaluate.
        let evaluated = count(0)
            .zip(count(1))
            .map(|(plausible, implausible)| plausible + implausible)
            .or_else(|| {
                total
                    .zip(count(2))
                    .map(|(total, unknown)| total.saturating_sub(unknown))
            });
        return vec![(Measure::Implausible, percent(count(1), evaluated))];
    }
    let n = levels.len();
    if n >= 2 && levels[n - 2] == OUTSIDE_DOMAIN_LEVEL && levels[n - 1] == MISSING_LEVEL {
        return vec![
            (Measure::Missing, percent(count(n - 1), *total)),
            (Measure::OutsideDomain, percent(count(n - 2), *total)),
        ];
    }
    Vec::new()
}

/// The report's rows, flagged against `standard`.
pub fn rows(result: &wire::PooledResult, standard: &wire::QualityStandard) -> Vec<Row> {
    let share = |measure: Measure, percent: Option<f64>| Share {
        percent,
        flagged: percent.is_some_and(|percent| percent > measure.limit(standard)),
    };
    // A pooled share needs every site's answer; with one missing it would describe only some.
    let everyone_answered = result.sites.iter().all(|site| site.result.is_some());
    let mut rows = Vec::new();
    for (index, section) in result.sections.iter().enumerate() {
        let Some(axis) = &section.axis else { continue };
        let pooled = measures(&axis.levels, &pooled_counts(section))
            .into_iter()
            .map(|(measure, percent)| (measure, percent.filter(|_| everyone_answered)))
            .collect::<Vec<_>>();
        for (position, (measure, pooled_percent)) in pooled.into_iter().enumerate() {
            let by_site = result
                .sites
                .iter()
                .map(|site| {
                    let percent = site
                        .result
                        .as_ref()
                        .and_then(|answer| answer.sections.get(index))
                        .and_then(|own| {
                            measures(&axis.levels, &site_counts(own))
                                .get(position)
                                .and_then(|(_, percent)| *percent)
                        });
                    (site.site_id.clone(), share(measure, percent))
                })
                .collect();
            rows.push(Row {
                section: axis.column.clone(),
                measure,
                by_site,
                pooled: share(measure, pooled_percent),
            });
        }
    }
    rows
}

/// A site falling short of the standard, in words.
fn finding(site_id: &str, row: &Row, percent: f64, standard: &wire::QualityStandard) -> String {
    format!(
        "{site_id}: {}: {percent:.1}% {} (alliance standard: at most {}%)",
        row.section,
        row.measure.words(),
        row.measure.limit(standard)
    )
}

/// The sites that gave no answer, so were not assessed: (site, why).
pub fn not_assessed(result: &wire::PooledResult) -> Vec<(String, String)> {
    result
        .sites
        .iter()
        .filter(|site| site.result.is_none())
        .map(|site| (site.site_id.clone(), site.message.clone()))
        .collect()
}

/// Every flagged site and row, in words.
pub fn findings(rows: &[Row], standard: &wire::QualityStandard) -> Vec<String> {
    rows.iter()
        .flat_map(|row| {
            row.by_site.iter().filter_map(move |(site_id, share)| {
                share
                    .percent
                    .filter(|_| share.flagged)
                    .map(|percent| finding(site_id, row, percent, standard))
            })
        })
        .collect()
}

fn share_text(share: &Share) -> String {
    match share.percent {
        None => crate::render::WITHHELD.to_string(),
        Some(percent) if share.flagged => format!("{percent:.1}% !"),
        Some(percent) => format!("{percent:.1}%  "),
    }
}

/// The report as text: the standard, one row per measure with a column per site and the
/// pooled share, the findings, and each site's status.
pub fn render(result: &wire::PooledResult, standard: &wire::QualityStandard) -> String {
    let rows = rows(result, standard);
    let mut out = String::new();
    let reference = result.template.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "Data-quality report: template {} v{}, study {}, query {}",
        reference.id, reference.version, standard.study_id, result.query_id
    );
    out.push_str(&crate::render::asked(result));
    let _ = writeln!(
        out,
        "alliance standard: at most {}% missing, {}% outside the domain, {}% implausible; ! marks a site above it\n",
        standard.max_missing_percent,
        standard.max_outside_domain_percent,
        standard.max_implausible_percent
    );
    let label = rows
        .iter()
        .map(|row| row.section.len())
        .chain(["column or check".len()])
        .max()
        .unwrap_or(0);
    let sites: Vec<&str> = result
        .sites
        .iter()
        .map(|site| site.site_id.as_str())
        .collect();
    let width = sites
        .iter()
        .map(|site| site.len())
        .chain([9])
        .max()
        .unwrap_or(9);
    let mut header = format!("{:<label$}  {:<14}", "column or check", "measure");
    for site in sites.iter().copied().chain(["pooled"]) {
        let _ = write!(header, "  {site:>width$}");
    }
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "-".repeat(header.len()));
    for row in &rows {
        let mut line = format!("{:<label$}  {:<14}", row.section, row.measure.words());
        for (_, share) in &row.by_site {
            let _ = write!(line, "  {:>width$}", share_text(share));
        }
        let _ = write!(line, "  {:>width$}", share_text(&row.pooled));
        let _ = writeln!(out, "{line}");
    }
    let findings = findings(&rows, standard);
    let missing = not_assessed(result);
    let _ = writeln!(out);
    if findings.is_empty() && missing.is_empty() {
        let _ = writeln!(out, "no site falls short of the alliance's standard");
    } else if findings.is_empty() {
        let _ = writeln!(
            out,
            "no assessed site falls short of the alliance's standard"
        );
    } else {
        let _ = writeln!(out, "sites falling short of the alliance's standard:");
        for finding in findings {
            let _ = writeln!(out, "  {finding}");
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(
            out,
            "not assessed (no answer; pooled shares need every site):"
        );
        for (site, why) in &missing {
            let _ = writeln!(out, "  {site}: {why}");
        }
    }
    if rows
        .iter()
        .flat_map(|row| {
            row.by_site
                .iter()
                .map(|(_, share)| share)
                .chain([&row.pooled])
        })
        .any(|share| share.percent.is_none())
    {
        let _ = writeln!(
            out,
            "{} a count the share needs was withheld by the site (or the site did not answer)",
            crate::render::WITHHELD
        );
    }
    let _ = writeln!(
        out,
        "`fedq query {} --study {}` shows every count by band and category",
        reference.id, standard.study_id
    );
    let _ = writeln!(out, "\nsites:");
    for site in &result.sites {
        let _ = writeln!(out, "  {}", crate::render::site_line(site));
    }
    out
}

/// The report as JSON (documented in README, "Data-quality report").
pub fn json(result: &wire::PooledResult, standard: &wire::QualityStandard) -> serde_json::Value {
    let rows = rows(result, standard);
    serde_json::json!({
        "query_id": result.query_id,
        "study_id": standard.study_id,
        "template_id": standard.template_id,
        "standard": {
            "max_missing_percent": standard.max_missing_percent,
            "max_outside_domain_percent": standard.max_outside_domain_percent,
            "max_implausible_percent": standard.max_implausible_percent,
        },
        "rows": rows.iter().map(|row| serde_json::json!({
            "section": row.section,
            "measure": row.measure,
            "by_site": row.by_site.iter().map(|(site, share)| (site.clone(), share)).collect::<std::collections::BTreeMap<_, _>>(),
            "pooled": row.pooled,
        })).collect::<Vec<_>>(),
        "findings": findings(&rows, standard),
        "not_assessed": not_assessed(result)
            .into_iter()
            .map(|(site, why)| serde_json::json!({"site_id": site, "message": why}))
            .collect::<Vec<_>>(),
        "sites": crate::render::json(result).sites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(count: u64) -> wire::Cell {
        wire::Cell {
            coordinates: Vec::new(),
            outcome: Some(wire::cell::Outcome::Released(wire::Released {
                count,
                summary: None,
            })),
        }
    }

    fn withheld() -> wire::Cell {
        wire::Cell {
            coordinates: Vec::new(),
            outcome: Some(wire::cell::Outcome::Withheld(wire::Withheld {})),
        }
    }

    fn axis(column: &str, levels: &[&str]) -> wire::Axis {
        wire::Axis {
            column: column.into(),
            levels: levels.iter().map(|level| level.to_string()).collect(),
        }
    }

    fn site(site_id: &str, sections: Vec<(Vec<wire::Cell>, u64)>) -> wire::SiteProgress {
        wire::SiteProgress {
            site_id: site_id.into(),
            status: wire::SiteStatus::Ok as i32,
            result: Some(wire::SiteResult {
                sections: sections
                    .into_iter()
                    .map(|(cells, total)| wire::Section {
                        cells,
                        total: Some(released(total)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn standard() -> wire::QualityStandard {
        wire::QualityStandard {
            study_id: "dq".into(),
            template_id: "data-quality".into(),
            max_missing_percent: 5.0,
            max_outside_domain_percent: 1.0,
            max_implausible_percent: 2.0,
        }
    }

    #[test]
    fn shares_come_from_released_counts_and_only_the_site_above_the_limit_is_flagged() {
        let sbp = axis(
            "systolic_bp",
            &["<90", "90+", OUTSIDE_DOMAIN_LEVEL, MISSING_LEVEL],
        );
        let check = axis("bp-plausible", &CHECK_LEVELS);
        let result = wire::PooledResult {
            sections: vec![
                wire::PooledSection {
                    axis: Some(sbp),
                    ..Default::default()
                },
                wire::PooledSection {
                    axis: Some(check),
                    ..Default::default()
                },
            ],
            sites: vec![
                site(
                    "site-a",
                    vec![
                        // A withheld band does not hide the share: the total is released.
                        (
                            vec![withheld(), withheld(), released(0), released(30)],
                            1000,
                        ),
                        (vec![released(960), released(10), released(30)], 1000),
                    ],
                ),
                site(
                    "site-b",
                    vec![
                        (
                            vec![released(50), released(350), released(0), released(100)],
                            500,
                        ),
                        (vec![withheld(), released(40), withheld()], 500),
                    ],
                ),
            ],
            ..Default::default()
        };
        let rows = rows(&result, &standard());
        assert_eq!(rows.len(), 3);
        let missing = &rows[0];
        assert_eq!(missing.measure, Measure::Missing);
        assert_eq!(missing.by_site[0].1.percent, Some(3.0));
        assert!(!missing.by_site[0].1.flagged);
        assert_eq!(missing.by_site[1].1.percent, Some(20.0));
        assert!(missing.by_site[1].1.flagged);
        // Withheld counts give no share and no flag.
        let implausible = &rows[2];
        assert_eq!(implausible.by_site[0].1.percent, Some(10.0 * 100.0 / 970.0));
        assert_eq!(
            implausible.by_site[1].1,
            Share {
                percent: None,
                flagged: false
            }
        );
        assert_eq!(
            findings(&rows, &standard()),
            ["site-b: systolic_bp: 20.0% missing (alliance standard: at most 5%)"]
        );
    }

    #[test]
    fn a_site_that_did_not_answer_is_listed_as_not_assessed_and_nothing_is_pooled() {
        let levels = ["low", "high", OUTSIDE_DOMAIN_LEVEL, MISSING_LEVEL];
        let pooled_cell = |count: u64| wire::PooledCell {
            count: Some(count),
            sites_released: 1,
            complete: true,
            ..Default::default()
        };
        let result = wire::PooledResult {
            sections: vec![wire::PooledSection {
                axis: Some(axis("gcs", &levels)),
                cells: vec![
                    pooled_cell(40),
                    pooled_cell(50),
                    pooled_cell(0),
                    pooled_cell(10),
                ],
                total: Some(pooled_cell(100)),
            }],
            sites: vec![
                site(
                    "site-a",
                    vec![(
                        vec![released(40), released(50), released(0), released(10)],
                        100,
                    )],
                ),
                wire::SiteProgress {
                    site_id: "site-b".into(),
                    status: wire::SiteStatus::Unreachable as i32,
                    message: "connection refused".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let rows = rows(&result, &standard());
        assert_eq!(rows[0].by_site[0].1.percent, Some(10.0));
        assert_eq!(rows[0].pooled.percent, None, "site-b did not answer");
        assert_eq!(
            not_assessed(&result),
            [("site-b".to_string(), "connection refused".to_string())]
        );
        let text = render(&result, &standard());
        assert!(text.contains("not assessed"), "{text}");
        assert!(!text.contains("no site falls short"), "{text}");
    }
}
