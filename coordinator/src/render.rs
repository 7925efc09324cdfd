//! Presenting a pooled result to a study lead: a readable table with one column per site and a
//! pooled column, suppression marks and per-site status; or the documented JSON form (see
//! README, "JSON result") for scripts.

use std::fmt::Write;

use fedq_proto::summary::Summary;
use fedq_proto::wire::{self, SiteStatus};
use serde::Serialize;

/// Mark for a value a site withheld.
pub const WITHHELD: &str = "*";
/// Suffix on a pooled value that is a lower bound because some site withheld its part.
pub const INCOMPLETE: &str = "+";

fn site_status_name(status: i32) -> &'static str {
    match SiteStatus::try_from(status).unwrap_or(SiteStatus::Unspecified) {
        SiteStatus::Ok => "ok",
        SiteStatus::Refused => "refused",
        SiteStatus::TimedOut => "timed_out",
        SiteStatus::Unreachable => "unreachable",
        SiteStatus::Failed => "failed",
        SiteStatus::Unspecified => "unknown",
    }
}

fn mechanism_name(mechanism: i32) -> &'static str {
    match wire::Mechanism::try_from(mechanism).unwrap_or(wire::Mechanism::Unspecified) {
        wire::Mechanism::SmallCellSuppression => "small_cell_suppression",
        wire::Mechanism::ComplementarySuppression => "complementary_suppression",
        wire::Mechanism::QueryOverlapControl => "query_overlap_control",
        wire::Mechanism::Rounding => "rounding",
        wire::Mechanism::DifferentialPrivacy => "differential_privacy",
        wire::Mechanism::DominanceRule => "dominance_rule",
        wire::Mechanism::Unspecified => "unspecified",
    }
}

/// A site's value for one cell: `Some(Some(n))` released, `Some(None)` withheld, `None` no
/// answer from that site.
fn site_value(site: &wire::SiteProgress, cell_index: Option<usize>) -> Option<Option<u64>> {
    let result = site.result.as_ref()?;
    let cell = match cell_index {
        Some(index) => result.cells.get(index)?,
        None => result.total.as_ref()?,
    };
    match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(Some(released.count)),
        _ => Some(None),
    }
}

/// A site's released summary (mean cells) for one cell, or the total.
fn site_summary(site: &wire::SiteProgress, cell_index: Option<usize>) -> Option<Summary> {
    let result = site.result.as_ref()?;
    let cell = match cell_index {
        Some(index) => result.cells.get(index)?,
        None => result.total.as_ref()?,
    };
    match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => {
            released.summary.as_ref().map(|summary| Summary {
                n: released.count,
                mean: summary.mean,
                m2: summary.m2,
            })
        }
        _ => None,
    }
}

/// A pooled cell's summary (mean cells).
fn pooled_summary(cell: &wire::PooledCell) -> Option<Summary> {
    let summary = cell.summary.as_ref()?;
    Some(Summary {
        n: cell.count?,
        mean: summary.mean,
        m2: summary.m2,
    })
}

/// A mean for a table: "12.34 (1,234)" for a site; the pooled value also shows the standard
/// deviation, "12.34 ±5.67 (3,456)".
fn summary_text(summary: &Summary, with_spread: bool) -> String {
    let spread = match summary.standard_deviation() {
        Some(sd) if with_spread => format!(" ±{sd:.2}"),
        _ => String::new(),
    };
    format!("{:.2}{spread} ({})", summary.mean, format_count(summary.n))
}

fn format_count(count: u64) -> String {
    let digits = count.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn pooled_text(cell: &wire::PooledCell) -> String {
    match cell.count {
        // Nothing released but some withheld: a lower bound of 0 says nothing, show the mark.
        None | Some(0) if cell.sites_withheld > 0 => WITHHELD.to_string(),
        None => "-".to_string(),
        Some(count) if cell.complete => format_count(count),
        Some(count) => format!("{}{INCOMPLETE}", format_count(count)),
    }
}

/// The result as a text table with a legend and per-site status lines; a data-quality
/// profile as one table per section.
pub fn table(title: &str, result: &wire::PooledResult) -> String {
    let mut out = String::new();
    let reference = result.template.clone().unwrap_or_default();
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "template {} v{} ({}), query {}",
        reference.id,
        reference.version,
        short_hash(&reference.content_hash),
        result.query_id
    );
    out.push_str(&asked(result));
    if let Some(fit) = &result.regression {
        out.push_str(&regression(fit));
        let _ = writeln!(out, "\nsites:");
        for site in &result.sites {
            let _ = writeln!(out, "  {}", site_line(site));
        }
        return out;
    }
    if !result.curves.is_empty() {
        out.push_str(&curves(result));
        let _ = writeln!(out, "\nsites:");
        for site in &result.sites {
            let _ = writeln!(out, "  {}", site_line(site));
        }
        return out;
    }
    let views: Vec<wire::PooledResult> = if result.sections.is_empty() {
        vec![result.clone()]
    } else {
        (0..result.sections.len())
            .map(|index| section_view(result, index))
            .collect()
    };
    let mut marks = Marks::default();
    for view in &views {
        if !result.sections.is_empty()
            && let Some(axis) = view.axes.first()
        {
            let _ = writeln!(out, "\n{}", axis.column);
        }
        out.push_str(&grid(view, &mut marks));
    }
    out.push_str(&odds_ratios(result));
    let legend = [
        (
            marks.withheld,
            WITHHELD,
            "withheld by the site (too few records, or to protect another withheld cell)",
        ),
        (
            marks.incomplete && !marks.incomplete_mean,
            INCOMPLETE,
            "incomplete: some site withheld its part; the pooled value is a lower bound",
        ),
        (
            marks.incomplete_mean,
            INCOMPLETE,
            "incomplete: some site withheld its part; the pooled mean covers only the sites that released it (and a count beside it is a lower bound)",
        ),
        (marks.unanswered, "-", "no site answered"),
    ];
    let _ = writeln!(out);
    for (shown, mark, meaning) in legend {
        if shown {
            let _ = writeln!(out, "{mark} {meaning}");
        }
    }
    if marks.noisiest > 0.0 {
        let _ = writeln!(
            out,
            "counts carry differential-privacy noise: standard deviation up to {:.1} per pooled value (`--json` gives each value's noise variance)",
            marks.noisiest.sqrt()
        );
    }
    let _ = writeln!(out, "\nsites:");
    for site in &result.sites {
        let _ = writeln!(out, "  {}", site_line(site));
    }
    out
}

fn ratio_text(ratio: Option<&wire::OddsRatio>) -> String {
    match ratio {
        Some(ratio) => format!("{:.2} ({:.2}-{:.2})", ratio.estimate, ratio.low, ratio.high),
        None => "not finite (a zero cell)".into(),
    }
}

/// A logistic regression's fit: one row per term.
fn regression(fit: &wire::Regression) -> String {
    let mut out = String::new();
    if !fit.coefficients.is_empty() {
        let width = fit
            .coefficients
            .iter()
            .map(|coefficient| coefficient.term.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let _ = writeln!(
            out,
            "\n{:<width$}  {:>10}  {:>10}  {:>26}  {:>8}",
            "term", "estimate", "std. error", "odds ratio (95% CI)", "p"
        );
        for coefficient in &fit.coefficients {
            let p = if coefficient.p_value < 0.001 {
                "<0.001".to_string()
            } else {
                format!("{:.3}", coefficient.p_value)
            };
            let ratio = format!(
                "{:.3} ({:.3}-{:.3})",
                coefficient.odds_ratio, coefficient.low, coefficient.high
            );
            let _ = writeln!(
                out,
                "{:<width$}  {:>10.4}  {:>10.4}  {ratio:>26}  {p:>8}",
                coefficient.term, coefficient.estimate, coefficient.standard_error
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{} records at {}; {} after {} iteration{}; log-likelihood {:.3}",
        format_count(fit.records),
        if fit.sites.is_empty() {
            "no site".to_string()
        } else {
            fit.sites.join(", ")
        },
        if fit.converged {
            "converged"
        } else {
            "not converged"
        },
        fit.iterations,
        if fit.iterations == 1 { "" } else { "s" },
        fit.log_likelihood
    );
    if fit.separation_suspected {
        let _ = writeln!(
            out,
            "separation suspected: some covariates predict the outcome (nearly) perfectly in the pooled data, so the estimates grow without bound and are not usable; drop or merge the covariates involved"
        );
    }
    if !fit.message.is_empty() {
        let _ = writeln!(out, "stopped: {}", fit.message);
    }
    out
}

/// A survival result: per stratum the pooled curve on the interval starts every pooled site
/// released.
fn curves(result: &wire::PooledResult) -> String {
    let mut out = String::new();
    let dims = result.axes.len();
    let (strata, time) = (
        &result.axes[..dims.saturating_sub(2)],
        result.axes.get(dims.wrapping_sub(2)),
    );
    let label = |start: u32| {
        time.and_then(|axis| axis.levels.get(start as usize).cloned())
            .unwrap_or_default()
    };
    let column = time.map(|axis| axis.column.clone()).unwrap_or_default();
    for curve in &result.curves {
        let empty =
            curve.excluded.is_empty() && curve.points.iter().all(|point| point.at_risk == 0);
        if empty {
            // No site has records in this stratum (e.g. the strata's "missing" level).
            continue;
        }
        let stratum = stratum_text(&curve.stratum, strata);
        let _ = writeln!(out);
        if !stratum.is_empty() {
            let _ = writeln!(out, "{stratum}:");
        }
        if curve.points.is_empty() {
            let _ = writeln!(out, "  no site released this curve");
        } else {
            let _ = writeln!(
                out,
                "  {:<14} {:>9} {:>7} {:>9} {:>9}  95% band",
                format!("{column} from"),
                "at risk",
                "events",
                "censored",
                "survival"
            );
            for point in &curve.points {
                let _ = writeln!(
                    out,
                    "  {:<14} {:>9} {:>7} {:>9} {:>9.4}  {:.4}-{:.4}",
                    label(point.start),
                    format_count(point.at_risk),
                    format_count(point.events),
                    format_count(point.censored),
                    point.survival,
                    point.low,
                    point.high
                );
            }
        }
        // Each site's own curve on the intervals it released.
        for site in &result.sites {
            let Some(own) = own_curve(site, &curve.stratum) else {
                continue;
            };
            let steps: Vec<String> = own
                .iter()
                .map(|(interval, survival)| format!("{} {survival:.4}", label(interval.start)))
                .collect();
            let _ = writeln!(
                out,
                "  {:<10} survival from: {}",
                site.site_id,
                steps.join(", ")
            );
        }
        let _ = writeln!(out, "  pooled sites: {}", curve.sites.join(", "));
        if !curve.excluded.is_empty() {
            let _ = writeln!(
                out,
                "  not pooled (withheld this curve, or no answer): {}",
                curve.excluded.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "\nSurvival is the grouped product-limit estimate on the template's time grid (equal to\nKaplan-Meier when every event time is a grid point), with Greenwood's 95% pointwise band.\nSites merge intervals with fewer than k events or censorings into the next; the pooled\ncurve keeps only the interval starts every pooled site released."
    );
    out
}

/// A 2x2 result's odds ratios, one block per stratum.
fn odds_ratios(result: &wire::PooledResult) -> String {
    let mut out = String::new();
    if result.odds_ratios.is_empty() {
        return out;
    }
    let strata = &result.axes[..result.axes.len().saturating_sub(2)];
    let _ = writeln!(
        out,
        "\nOdds ratios of the outcome, exposed vs not exposed, with 95% confidence intervals:"
    );
    for ratios in &result.odds_ratios {
        let label = stratum_text(&ratios.stratum, strata);
        if !label.is_empty() {
            let _ = writeln!(out, "  {label}:");
        }
        for site in &ratios.sites {
            let _ = writeln!(
                out,
                "    {:<16} {}",
                site.site_id,
                ratio_text(site.odds_ratio.as_ref())
            );
        }
        match &ratios.mantel_haenszel {
            Some(pooled) => {
                let _ = writeln!(
                    out,
                    "    {:<16} {}",
                    "crude (summed)",
                    ratio_text(ratios.crude.as_ref())
                );
                let _ = writeln!(
                    out,
                    "    {:<16} {}",
                    "Mantel-Haenszel",
                    ratio_text(Some(pooled))
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "    no pooled odds ratio: no included site has both a ratio's numerator and denominator"
                );
            }
        }
        if let (Some(statistic), Some(p)) = (ratios.breslow_day, ratios.breslow_day_p) {
            let _ = writeln!(
                out,
                "    Breslow-Day test of one common odds ratio: chi-squared {statistic:.2}, df {}, p = {p:.3}",
                ratios.breslow_day_df
            );
        }
        if !ratios.excluded.is_empty() {
            let _ = writeln!(
                out,
                "    not included (withheld a cell of this table, or no answer): {}",
                ratios.excluded.join(", ")
            );
        }
    }
    out
}

/// The study and every parameter's value, marking the template's defaults.
pub fn asked(result: &wire::PooledResult) -> String {
    if result.study_id.is_empty() && result.parameters.is_empty() {
        return String::new();
    }
    let parameters: Vec<String> = result
        .parameters
        .iter()
        .map(|parameter| {
            format!(
                "{}={}{}",
                parameter.name,
                parameter.value,
                if parameter.given { "" } else { " (default)" }
            )
        })
        .collect();
    format!(
        "study {}; parameters: {}\n",
        result.study_id,
        if parameters.is_empty() {
            "none".to_string()
        } else {
            parameters.join(", ")
        }
    )
}

/// Which marks a rendered table used, for the legend, and its largest noise variance.
#[derive(Debug, Default)]
struct Marks {
    withheld: bool,
    incomplete: bool,
    /// A pooled mean left out a site that withheld its part.
    incomplete_mean: bool,
    unanswered: bool,
    noisiest: f64,
}

/// Section `index` of a profile as a one-table result of its own, each site's answer reduced
/// to that section, so it renders (and converts to JSON) like a count table.
pub fn section_view(result: &wire::PooledResult, index: usize) -> wire::PooledResult {
    let section = result.sections.get(index).cloned().unwrap_or_default();
    let sites = result
        .sites
        .iter()
        .map(|site| {
            let mut site = site.clone();
            if let Some(answer) = site.result.as_mut() {
                let own = answer.sections.get(index).cloned().unwrap_or_default();
                answer.axes = own.axis.into_iter().collect();
                answer.cells = own.cells;
                answer.total = own.total;
                answer.sections.clear();
            }
            site
        })
        .collect();
    wire::PooledResult {
        query_id: result.query_id.clone(),
        template: result.template.clone(),
        axes: section.axis.into_iter().collect(),
        cells: section.cells,
        total: section.total,
        sites,
        sections: Vec::new(),
        odds_ratios: Vec::new(),
        curves: Vec::new(),
        regression: None,
        ..Default::default()
    }
}

/// One table's header, rows (one per cell with records somewhere, then the total) and the
/// note on hidden all-zero rows.
fn grid(result: &wire::PooledResult, marks: &mut Marks) -> String {
    let mut out = String::new();
    let mut header: Vec<String> = result.axes.iter().map(|axis| axis.column.clone()).collect();
    header.extend(result.sites.iter().map(|site| site.site_id.clone()));
    header.push("pooled".into());
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut hidden = 0usize;
    for (index, cell) in result.cells.iter().enumerate() {
        let all_zero = cell.complete && cell.count == Some(0);
        if all_zero {
            hidden += 1;
            continue;
        }
        let mut row: Vec<String> = levels_of(&cell.coordinates, &result.axes)
            .into_iter()
            .map(|(_, level)| level)
            .collect();
        row.extend(
            result
                .sites
                .iter()
                .map(|site| match site_summary(site, Some(index)) {
                    Some(summary) => summary_text(&summary, false),
                    None => site_cell_text(site_value(site, Some(index))),
                }),
        );
        row.push(match pooled_summary(cell) {
            Some(summary) if cell.complete => summary_text(&summary, true),
            Some(summary) => {
                marks.incomplete_mean = true;
                format!("{}{INCOMPLETE}", summary_text(&summary, true))
            }
            None => pooled_text(cell),
        });
        rows.push(row);
    }
    if let Some(total) = &result.total {
        let mut row = vec![String::new(); result.axes.len()];
        if let Some(first) = row.first_mut() {
            *first = "total".into();
        } else {
            row.push("total".into());
            header.insert(0, String::new());
        }
        row.extend(
            result
                .sites
                .iter()
                .map(|site| match site_summary(site, None) {
                    Some(summary) => summary_text(&summary, false),
                    None => site_cell_text(site_value(site, None)),
                }),
        );
        row.push(match pooled_summary(total) {
            Some(summary) if total.complete => summary_text(&summary, true),
            Some(summary) => {
                marks.incomplete_mean = true;
                format!("{}{INCOMPLETE}", summary_text(&summary, true))
            }
            None => pooled_text(total),
        });
        rows.push(row);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            rows.iter()
                .map(|row| row.get(column).map_or(0, String::len))
                .chain([header[column].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let label_columns = result.axes.len().max(1);
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(column, text)| {
                if column < label_columns {
                    format!("{text:<width$}", width = widths[column])
                } else {
                    format!("{text:>width$}", width = widths[column])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(out);
    let _ = writeln!(out, "{}", line(&header));
    let _ = writeln!(
        out,
        "{}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1))
    );
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    if hidden > 0 {
        let _ = writeln!(
            out,
            "({hidden} combination{} with zero records at every site not shown)",
            if hidden == 1 { "" } else { "s" }
        );
    }
    let shown = |mark: &str| {
        rows.iter().any(|row| {
            row[label_columns.min(row.len())..]
                .iter()
                .any(|text| text.ends_with(mark) || text == mark)
        })
    };
    marks.withheld |= shown(WITHHELD);
    marks.incomplete |= shown(INCOMPLETE);
    marks.unanswered |= shown("-");
    marks.noisiest = result
        .cells
        .iter()
        .chain(result.total.iter())
        .map(|cell| cell.noise_variance)
        .fold(marks.noisiest, f64::max);
    out
}

/// Each axis's column with the level `coordinates` pick on it (an unknown level: empty).
fn levels_of(coordinates: &[u32], axes: &[wire::Axis]) -> Vec<(String, String)> {
    coordinates
        .iter()
        .zip(axes)
        .map(|(level, axis)| {
            let name = axis
                .levels
                .get(*level as usize)
                .cloned()
                .unwrap_or_default();
            (axis.column.clone(), name)
        })
        .collect()
}

/// A stratum for people: "column level, column level".
fn stratum_text(coordinates: &[u32], axes: &[wire::Axis]) -> String {
    levels_of(coordinates, axes)
        .into_iter()
        .map(|(column, level)| format!("{column} {level}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A site's own curve for `stratum`: each released interval with the survival after it.
fn own_curve<'a>(
    site: &'a wire::SiteProgress,
    stratum: &[u32],
) -> Option<Vec<(&'a wire::SurvivalInterval, f64)>> {
    let own = site
        .result
        .as_ref()?
        .curves
        .iter()
        .find(|own| own.stratum == stratum)
        .filter(|own| !own.intervals.is_empty())?;
    let mut survival = 1.0;
    Some(
        own.intervals
            .iter()
            .map(|interval| {
                if interval.at_risk > 0 {
                    survival *= 1.0 - interval.events as f64 / interval.at_risk as f64;
                }
                (interval, survival)
            })
            .collect(),
    )
}

fn site_cell_text(value: Option<Option<u64>>) -> String {
    match value {
        Some(Some(count)) => format_count(count),
        Some(None) => WITHHELD.to_string(),
        None => "-".to_string(),
    }
}

fn short_hash(hash: &str) -> String {
    hash.chars().take(19).collect()
}

/// One line describing a site's outcome.
pub fn site_line(site: &wire::SiteProgress) -> String {
    let status = site_status_name(site.status);
    match &site.result {
        Some(result) => {
            let mechanisms: Vec<&str> = result
                .mechanisms
                .iter()
                .map(|m| mechanism_name(*m))
                .collect();
            format!(
                "{:<10} {status:<11} k={} snapshot {} {} ms{}",
                site.site_id,
                result.applied_min_cell_count,
                short_hash(&result.snapshot_version),
                site.elapsed_ms,
                if mechanisms.is_empty() {
                    String::new()
                } else {
                    format!(", {}", mechanisms.join(", "))
                }
            )
        }
        None => format!("{:<10} {status:<11} {}", site.site_id, site.message),
    }
}

/// A study approval for a person.
pub fn study(study: &wire::StudySummary) -> String {
    let templates: Vec<String> = study
        .templates
        .iter()
        .map(|pin| {
            format!(
                "{} v{} ({})",
                pin.id,
                pin.version,
                short_hash(&pin.content_hash)
            )
        })
        .collect();
    format!(
        "{} — {}\n  version: {}@{}\n  purpose: {}\n  lead: {}, {}\n  ethics approval: {}\n  in force: {} to {}, at most {} queries per day at each site\n  sites: {}\n  templates: {}\n  signed by: {}\n\n",
        study.id,
        study.title,
        study.id,
        study.content_hash,
        study.purpose,
        study.study_lead,
        study.lead_institution,
        study.ethics_reference,
        study.valid_from,
        study.valid_until,
        study.max_queries_per_day,
        study.sites.join(", "),
        templates.join(", "),
        if study.signer_key_ids.is_empty() {
            "(no signatures)".to_string()
        } else {
            study.signer_key_ids.join(", ")
        }
    )
}

/// The documented JSON form of a result (README, "JSON result").
#[derive(Debug, Serialize)]
pub struct JsonResult {
    pub query_id: String,
    pub template: JsonTemplate,
    /// The study the query was made under.
    pub study_id: String,
    /// Every parameter's effective value, `given: false` where the default was used.
    pub parameters: Vec<JsonParameter>,
    pub axes: Vec<JsonAxis>,
    pub cells: Vec<JsonCell>,
    /// Absent for survival curves and regressions (see `curves` and `regression`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<JsonCell>,
    pub sites: Vec<JsonSite>,
    /// A data-quality profile's sections, each a one-way table (absent for counts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sections: Vec<JsonSection>,
    /// A 2x2 table's odds ratios per stratum (absent otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub odds_ratios: Vec<JsonOddsRatios>,
    /// A survival template's pooled curves per stratum (absent otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curves: Vec<JsonCurve>,
    /// A logistic regression's fit (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression: Option<JsonRegression>,
}

/// A logistic regression's fit.
#[derive(Debug, Serialize)]
pub struct JsonRegression {
    pub coefficients: Vec<JsonCoefficient>,
    pub iterations: u32,
    pub converged: bool,
    pub separation_suspected: bool,
    pub records: u64,
    pub log_likelihood: f64,
    pub sites: Vec<String>,
    pub message: String,
}

/// One term of a fit.
#[derive(Debug, Serialize)]
pub struct JsonCoefficient {
    pub term: String,
    pub estimate: f64,
    pub standard_error: f64,
    pub z: f64,
    pub p_value: f64,
    pub odds_ratio: f64,
    pub low: f64,
    pub high: f64,
}

/// One stratum's pooled survival curve.
#[derive(Debug, Serialize)]
pub struct JsonCurve {
    pub stratum: std::collections::BTreeMap<String, String>,
    pub sites: Vec<String>,
    pub excluded: Vec<String>,
    pub points: Vec<JsonSurvivalPoint>,
    /// Each site's own released intervals with its survival after each (sites that withheld
    /// the curve are absent).
    pub by_site: std::collections::BTreeMap<String, Vec<JsonSiteInterval>>,
}

/// One interval of a site's own curve.
#[derive(Debug, Serialize)]
pub struct JsonSiteInterval {
    pub from: String,
    pub at_risk: u64,
    pub events: u64,
    pub censored: u64,
    pub survival: f64,
}

/// One interval of a pooled survival curve; `from` is its start on the template's grid.
#[derive(Debug, Serialize)]
pub struct JsonSurvivalPoint {
    pub from: String,
    pub at_risk: u64,
    pub events: u64,
    pub censored: u64,
    pub survival: f64,
    pub standard_error: f64,
    pub low: f64,
    pub high: f64,
}

/// An odds ratio with its 95% interval.
#[derive(Debug, Serialize)]
pub struct JsonOddsRatio {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// One stratum's odds ratios.
#[derive(Debug, Serialize)]
pub struct JsonOddsRatios {
    /// Axis column → level of the template's strata (empty when it has none).
    pub stratum: std::collections::BTreeMap<String, String>,
    /// Site id → its own odds ratio (null when a cell is zero); sites included only.
    pub by_site: std::collections::BTreeMap<String, Option<JsonOddsRatio>>,
    pub excluded: Vec<String>,
    pub crude: Option<JsonOddsRatio>,
    pub mantel_haenszel: Option<JsonOddsRatio>,
    pub breslow_day: Option<f64>,
    pub breslow_day_df: u32,
    pub breslow_day_p: Option<f64>,
}

impl From<&wire::OddsRatio> for JsonOddsRatio {
    fn from(ratio: &wire::OddsRatio) -> JsonOddsRatio {
        JsonOddsRatio {
            estimate: ratio.estimate,
            low: ratio.low,
            high: ratio.high,
        }
    }
}

/// One section of a data-quality profile: a profiled column or a check.
#[derive(Debug, Serialize)]
pub struct JsonSection {
    pub axis: JsonAxis,
    pub cells: Vec<JsonCell>,
    pub total: JsonCell,
}

#[derive(Debug, Serialize)]
pub struct JsonParameter {
    pub name: String,
    pub value: String,
    pub given: bool,
}

#[derive(Debug, Serialize)]
pub struct JsonTemplate {
    pub id: String,
    pub version: u32,
    pub content_hash: String,
}

#[derive(Debug, Serialize)]
pub struct JsonAxis {
    pub column: String,
    pub levels: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct JsonCell {
    /// Axis column → level; empty for the total.
    pub levels: std::collections::BTreeMap<String, String>,
    /// Sum of released counts; null when no site released the cell.
    pub pooled: Option<u64>,
    /// True only when every answering site released this cell.
    pub complete: bool,
    pub sites_released: u32,
    pub sites_withheld: u32,
    /// Variance of the differential-privacy noise in `pooled` (0 without noise).
    pub noise_variance: f64,
    /// Site id → released count, or null when that site withheld it. Sites that did not answer
    /// are absent.
    pub by_site: std::collections::BTreeMap<String, Option<u64>>,
    /// For a mean: the pooled summary of the releasing sites' values (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<JsonSummary>,
    /// For a mean: site id → that site's summary, or null when it withheld the cell.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub by_site_summary: std::collections::BTreeMap<String, Option<JsonSummary>>,
}

/// Count, mean, sample variance and standard deviation of a cell's values (variance and
/// standard deviation are null below two values).
#[derive(Debug, Serialize)]
pub struct JsonSummary {
    pub n: u64,
    pub mean: f64,
    pub variance: Option<f64>,
    pub standard_deviation: Option<f64>,
}

impl From<Summary> for JsonSummary {
    fn from(summary: Summary) -> JsonSummary {
        JsonSummary {
            n: summary.n,
            mean: summary.mean,
            variance: summary.variance(),
            standard_deviation: summary.standard_deviation(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JsonSite {
    pub site_id: String,
    /// ok, refused, timed_out, unreachable or failed.
    pub status: String,
    pub message: String,
    pub snapshot_version: Option<String>,
    pub min_cell_count: Option<u32>,
    pub mechanisms: Vec<String>,
    pub elapsed_ms: u64,
}

/// Builds the JSON form.
pub fn json(result: &wire::PooledResult) -> JsonResult {
    let reference = result.template.clone().unwrap_or_default();
    let is_mean = result
        .cells
        .iter()
        .chain(result.total.iter())
        .any(|cell| cell.summary.is_some());
    let cell = |index: Option<usize>, pooled: &wire::PooledCell| JsonCell {
        levels: levels_of(&pooled.coordinates, &result.axes)
            .into_iter()
            .collect(),
        pooled: pooled.count,
        complete: pooled.complete,
        sites_released: pooled.sites_released,
        sites_withheld: pooled.sites_withheld,
        noise_variance: pooled.noise_variance,
        by_site: result
            .sites
            .iter()
            .filter_map(|site| site_value(site, index).map(|value| (site.site_id.clone(), value)))
            .collect(),
        summary: pooled_summary(pooled).map(Into::into),
        by_site_summary: if is_mean {
            result
                .sites
                .iter()
                .filter(|site| site_value(site, index).is_some())
                .map(|site| {
                    (
                        site.site_id.clone(),
                        site_summary(site, index).map(Into::into),
                    )
                })
                .collect()
        } else {
            Default::default()
        },
    };
    JsonResult {
        query_id: result.query_id.clone(),
        study_id: result.study_id.clone(),
        parameters: result
            .parameters
            .iter()
            .map(|parameter| JsonParameter {
                name: parameter.name.clone(),
                value: parameter.value.clone(),
                given: parameter.given,
            })
            .collect(),
        template: JsonTemplate {
            id: reference.id,
            version: reference.version,
            content_hash: reference.content_hash,
        },
        axes: result
            .axes
            .iter()
            .map(|axis| JsonAxis {
                column: axis.column.clone(),
                levels: axis.levels.clone(),
            })
            .collect(),
        cells: result
            .cells
            .iter()
            .enumerate()
            .map(|(index, pooled)| cell(Some(index), pooled))
            .collect(),
        total: result.total.as_ref().map(|total| cell(None, total)),
        sites: result
            .sites
            .iter()
            .map(|site| JsonSite {
                site_id: site.site_id.clone(),
                status: site_status_name(site.status).to_string(),
                message: site.message.clone(),
                snapshot_version: site
                    .result
                    .as_ref()
                    .map(|result| result.snapshot_version.clone()),
                min_cell_count: site
                    .result
                    .as_ref()
                    .map(|result| result.applied_min_cell_count),
                mechanisms: site
                    .result
                    .iter()
                    .flat_map(|result| {
                        result
                            .mechanisms
                            .iter()
                            .map(|m| mechanism_name(*m).to_string())
                    })
                    .collect(),
                elapsed_ms: site.elapsed_ms,
            })
            .collect(),
        regression: result.regression.as_ref().map(|fit| JsonRegression {
            coefficients: fit
                .coefficients
                .iter()
                .map(|coefficient| JsonCoefficient {
                    term: coefficient.term.clone(),
                    estimate: coefficient.estimate,
                    standard_error: coefficient.standard_error,
                    z: coefficient.z,
                    p_value: coefficient.p_value,
                    odds_ratio: coefficient.odds_ratio,
                    low: coefficient.low,
                    high: coefficient.high,
                })
                .collect(),
            iterations: fit.iterations,
            converged: fit.converged,
            separation_suspected: fit.separation_suspected,
            records: fit.records,
            log_likelihood: fit.log_likelihood,
            sites: fit.sites.clone(),
            message: fit.message.clone(),
        }),
        curves: result
            .curves
            .iter()
            .map(|curve| {
                let dims = result.axes.len();
                let time = result.axes.get(dims.wrapping_sub(2));
                JsonCurve {
                    stratum: levels_of(&curve.stratum, &result.axes)
                        .into_iter()
                        .collect(),
                    sites: curve.sites.clone(),
                    excluded: curve.excluded.clone(),
                    by_site: result
                        .sites
                        .iter()
                        .filter_map(|site| {
                            let intervals = own_curve(site, &curve.stratum)?
                                .into_iter()
                                .map(|(interval, survival)| JsonSiteInterval {
                                    from: time
                                        .and_then(|axis| {
                                            axis.levels.get(interval.start as usize).cloned()
                                        })
                                        .unwrap_or_default(),
                                    at_risk: interval.at_risk,
                                    events: interval.events,
                                    censored: interval.censored,
                                    survival,
                                })
                                .collect();
                            Some((site.site_id.clone(), intervals))
                        })
                        .collect(),
                    points: curve
                        .points
                        .iter()
                        .map(|point| JsonSurvivalPoint {
                            from: time
                                .and_then(|axis| axis.levels.get(point.start as usize).cloned())
                                .unwrap_or_default(),
                            at_risk: point.at_risk,
                            events: point.events,
                            censored: point.censored,
                            survival: point.survival,
                            standard_error: point.standard_error,
                            low: point.low,
                            high: point.high,
                        })
                        .collect(),
                }
            })
            .collect(),
        odds_ratios: result
            .odds_ratios
            .iter()
            .map(|ratios| JsonOddsRatios {
                stratum: levels_of(&ratios.stratum, &result.axes)
                    .into_iter()
                    .collect(),
                by_site: ratios
                    .sites
                    .iter()
                    .map(|site| {
                        (
                            site.site_id.clone(),
                            site.odds_ratio.as_ref().map(Into::into),
                        )
                    })
                    .collect(),
                excluded: ratios.excluded.clone(),
                crude: ratios.crude.as_ref().map(Into::into),
                mantel_haenszel: ratios.mantel_haenszel.as_ref().map(Into::into),
                breslow_day: ratios.breslow_day,
                breslow_day_df: ratios.breslow_day_df,
                breslow_day_p: ratios.breslow_day_p,
            })
            .collect(),
        sections: (0..result.sections.len())
            .map(|index| {
                let JsonResult {
                    mut axes,
                    cells,
                    total,
                    ..
                } = json(&section_view(result, index));
                JsonSection {
                    axis: axes.pop().unwrap_or(JsonAxis {
                        column: String::new(),
                        levels: Vec::new(),
                    }),
                    cells,
                    total: total.unwrap_or_else(|| cell(None, &wire::PooledCell::default())),
                }
            })
            .collect(),
    }
}

/// The contribution ledger as a table: one line per study and site.
pub fn ledger(entries: &[wire::LedgerEntry]) -> String {
    if entries.is_empty() {
        return "no answered queries recorded yet\n".into();
    }
    let mut text = format!(
        "{:<24} {:<12} {:>8} {:>10} {:>14}  {}\n",
        "study", "site", "queries", "cells", "records", "period"
    );
    for entry in entries {
        text.push_str(&format!(
            "{:<24} {:<12} {:>8} {:>10} {:>14}  {} to {}\n",
            entry.study_id,
            entry.site_id,
            entry.queries_answered,
            entry.cells_released,
            entry.records_contributed,
            entry.first_query.get(..10).unwrap_or(&entry.first_query),
            entry.last_query.get(..10).unwrap_or(&entry.last_query),
        ));
    }
    text.push_str("records: the site's records in released cells, summed over answered queries (a patient counted in several results counts in each; withheld cells count nothing)\n");
    text
}

/// The contribution ledger as JSON: `{"entries": [{study_id, site_id, queries_answered,
/// cells_released, records_contributed, first_query, last_query}]}`.
pub fn ledger_json(entries: &[wire::LedgerEntry]) -> serde_json::Value {
    serde_json::json!({
        "entries": entries.iter().map(|entry| serde_json::json!({
            "study_id": entry.study_id,
            "site_id": entry.site_id,
            "queries_answered": entry.queries_answered,
            "cells_released": entry.cells_released,
            "records_contributed": entry.records_contributed,
            "first_query": entry.first_query,
            "last_query": entry.last_query,
        })).collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(format_count(1234567), "1,234,567");
        assert_eq!(format_count(999), "999");
    }

    #[test]
    fn pooled_cell_with_a_withheld_part_is_marked_incomplete() {
        let cell = wire::PooledCell {
            coordinates: vec![],
            count: Some(40),
            sites_released: 1,
            sites_withheld: 1,
            complete: false,
            noise_variance: 0.0,
            summary: None,
        };
        assert_eq!(pooled_text(&cell), "40+");
        let none = wire::PooledCell {
            coordinates: vec![],
            count: None,
            sites_released: 0,
            sites_withheld: 2,
            complete: false,
            noise_variance: 0.0,
            summary: None,
        };
        assert_eq!(pooled_text(&none), "*");
    }
}
