//! Statistics beyond counts against real nodes, each checked against an independent oracle
//! computed straight from the generated rows (not the node's code path): pooled means and
//! variances per stratum (n exact, mean and variance to 1e-9 relative), histograms over the
//! template's fixed bins (exact); and each withholding a small cell at the small site, whose
//! summary is then not sent at all; a site adding differential-privacy noise refuses means.

use fedq_proto::summary::Summary;
use fedq_proto::wire;
use fedq_tests::{OracleRow, TestAlliance, integer, oracle_rows, query, small_sites};

fn relative(left: f64, right: f64) -> f64 {
    (left - right).abs() / right.abs().max(f64::MIN_POSITIVE)
}

/// The sites with the small one grown so that, at floor 3, nothing is withheld.
fn roomy_sites() -> Vec<fedq_deploy::synth::SiteProfile> {
    let mut sites = small_sites();
    sites[2].admissions = 2_000;
    sites
}

/// Sites large enough that, at floor 3, no 2x2 or survival count is small.
fn large_sites() -> Vec<fedq_deploy::synth::SiteProfile> {
    let mut sites = roomy_sites();
    sites[0].admissions = 4_000;
    sites[1].admissions = 3_000;
    sites[2].admissions = 3_000;
    sites
}

/// ISS band index as `length-of-stay-by-severity` cuts it.
fn iss_band(iss: i64) -> usize {
    match iss {
        ..9 => 0,
        9..16 => 1,
        16..25 => 2,
        _ => 3,
    }
}

/// Systolic band index as `systolic-pressure-distribution` cuts it (6: missing).
fn systolic_bin(value: Option<i64>) -> usize {
    match value {
        None => 6,
        Some(value) => ((value.max(60) - 60) / 20).min(5) as usize,
    }
}

/// The straightforward two-pass mean and sample variance of some values.
fn oracle_summary(values: &[f64]) -> (u64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values
        .iter()
        .map(|value| (value - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    (values.len() as u64, mean, variance)
}

/// The first of `groups` groups (by `group_of`) with 1 to 9 of `rows`: a small cell at k = 10.
fn small_group(
    rows: &[OracleRow],
    groups: usize,
    group_of: impl Fn(&OracleRow) -> usize,
) -> Option<usize> {
    (0..groups).find(|group| {
        let n = rows.iter().filter(|row| group_of(row) == *group).count();
        (1..10).contains(&n)
    })
}

fn withheld(cell: &wire::Cell) -> bool {
    matches!(cell.outcome, Some(wire::cell::Outcome::Withheld(_)))
}

fn pooled_summary(cell: &wire::PooledCell) -> Summary {
    let summary = cell.summary.as_ref().expect("a pooled mean");
    Summary {
        n: cell.count.expect("a pooled count"),
        mean: summary.mean,
        m2: summary.m2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_means_and_variances_equal_the_computation_on_all_rows_together()
-> anyhow::Result<()> {
    let test = TestAlliance::start_custom(roomy_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(
        &mut coordinator,
        "length-of-stay-by-severity",
        vec![],
        20_000,
    )
    .await?;
    let rows: Vec<OracleRow> = oracle_rows(&test.sites)?.into_iter().flatten().collect();
    for band in 0..4 {
        let values: Vec<f64> = rows
            .iter()
            .filter(|row| iss_band(row.iss) == band)
            .map(|row| row.length_of_stay as f64)
            .collect();
        let (n, mean, variance) = oracle_summary(&values);
        let cell = &result.cells[band];
        assert!(cell.complete, "band {band} must not be withheld anywhere");
        let pooled = pooled_summary(cell);
        assert_eq!(pooled.n, n, "band {band}");
        assert!(
            relative(pooled.mean, mean) < 1e-9,
            "band {band}: {} vs {mean}",
            pooled.mean
        );
        let pooled_variance = pooled.variance().unwrap();
        assert!(
            relative(pooled_variance, variance) < 1e-9,
            "band {band}: {pooled_variance} vs {variance}"
        );
    }
    // The total over every band, and the empty missing band.
    let all: Vec<f64> = rows.iter().map(|row| row.length_of_stay as f64).collect();
    let (n, mean, variance) = oracle_summary(&all);
    let total = pooled_summary(result.total.as_ref().unwrap());
    assert_eq!(total.n, n);
    assert!(relative(total.mean, mean) < 1e-9);
    assert!(relative(total.variance().unwrap(), variance) < 1e-9);
    assert_eq!(result.cells[4].count, Some(0));
    // The table shows means with their spread.
    let table = fedq_coordinator::render::table("stay", &result);
    assert!(table.contains(&format!("{:.2} ±", mean)), "{table}");
    let json = fedq_coordinator::render::json(&result);
    assert_eq!(json.total.as_ref().unwrap().summary.as_ref().unwrap().n, n);
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_histograms_equal_the_counts_on_all_rows_together() -> anyhow::Result<()> {
    let test = TestAlliance::start_custom(roomy_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let min_iss = 9;
    let result = query(
        &mut coordinator,
        "systolic-pressure-distribution",
        vec![integer("min_iss", min_iss)],
        20_000,
    )
    .await?;
    let rows: Vec<OracleRow> = oracle_rows(&test.sites)?.into_iter().flatten().collect();
    assert_eq!(result.axes.last().unwrap().column, "systolic_bp");
    for bin in 0..7 {
        let expected = rows
            .iter()
            .filter(|row| row.iss >= min_iss && systolic_bin(row.systolic_bp) == bin)
            .count() as u64;
        let cell = &result.cells[bin];
        assert!(cell.complete, "bin {bin}");
        assert_eq!(cell.count, Some(expected), "bin {bin}");
    }
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_cell_of_a_mean_or_histogram_is_withheld_and_sends_no_summary() -> anyhow::Result<()>
{
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let site_c_rows = &oracle_rows(&test.sites)?[2];
    let site_c = |result: &wire::PooledResult| -> wire::SiteResult {
        result.sites[2].result.clone().expect("site-c answered")
    };

    let means = query(
        &mut coordinator,
        "length-of-stay-by-severity",
        vec![],
        20_000,
    )
    .await?;
    let answer = site_c(&means);
    let small_band = small_group(site_c_rows, 4, |row| iss_band(row.iss))
        .expect("site-c (150 admissions) has a band with 1 to 9 admissions");
    assert!(withheld(&answer.cells[small_band]));
    for cell in &answer.cells {
        match &cell.outcome {
            Some(wire::cell::Outcome::Released(released)) if released.count > 0 => {
                assert!(released.count >= 10);
                assert!(released.summary.is_some());
            }
            _ => {}
        }
    }
    assert!(!means.cells[small_band].complete);

    let histogram = query(
        &mut coordinator,
        "systolic-pressure-distribution",
        vec![],
        20_000,
    )
    .await?;
    let answer = site_c(&histogram);
    let small_bin = small_group(site_c_rows, 7, |row| systolic_bin(row.systolic_bp))
        .expect("site-c has a small systolic band");
    assert!(withheld(&answer.cells[small_bin]));
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_adding_noise_refuses_means_and_says_why() -> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let noisy = fedq_tests::node_variant(&test, |config| {
        config.replace(
            "[[datasets]]",
            "[privacy]\ndifferential_privacy = true\n\n[[datasets]]",
        )
    })
    .await?;
    let mut node = fedq_tests::client_for(&test, &noisy).await?;
    let request = fedq_tests::node_request(&test.alliance, "length-of-stay-by-severity", vec![])?;
    let status = node.run_query(request).await.unwrap_err();
    fedq_tests::assert_refused(
        &status,
        tonic::Code::FailedPrecondition,
        wire::RefusalCode::UnsupportedStatistic,
        "does not answer 'mean' templates",
    );
    // Counts still work there.
    let request =
        fedq_tests::node_request(&test.alliance, "systolic-pressure-distribution", vec![])?;
    assert!(node.run_query(request).await.is_ok());
    noisy.stop().await?;
    test.alliance.stop().await?;
    Ok(())
}

/// One site's 2x2 table in one ISS stratum, counted straight from its rows: (a, b, c, d) =
/// ICU and died, ICU and survived, no ICU and died, no ICU and survived.
fn oracle_table(rows: &[OracleRow], major: bool) -> [f64; 4] {
    let mut table = [0.0; 4];
    for row in rows.iter().filter(|row| (row.iss >= 16) == major) {
        let index = match (row.icu, row.died) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        table[index] += 1.0;
    }
    table
}

/// Mantel-Haenszel, its Robins-Breslow-Greenland log variance and the Breslow-Day statistic,
/// written out plainly (expected counts found by bisection, not by the quadratic formula).
fn oracle_mantel_haenszel(tables: &[[f64; 4]]) -> (f64, f64, f64) {
    let (mut r, mut s, mut pr, mut cross, mut qs) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for [a, b, c, d] in tables.iter().copied() {
        let n = a + b + c + d;
        let (ri, si, pi, qi) = (a * d / n, b * c / n, (a + d) / n, (b + c) / n);
        r += ri;
        s += si;
        pr += pi * ri;
        cross += pi * si + qi * ri;
        qs += qi * si;
    }
    let psi = r / s;
    let variance = pr / (2.0 * r * r) + cross / (2.0 * r * s) + qs / (2.0 * s * s);
    let mut breslow_day = 0.0;
    for [a, b, c, d] in tables.iter().copied() {
        let (n1, n0, m1) = (a + b, c + d, a + c);
        let odds = |x: f64| x * (n0 - m1 + x) / ((n1 - x) * (m1 - x));
        let (mut low, mut high) = ((m1 - n0).max(0.0), n1.min(m1));
        for _ in 0..200 {
            let middle = (low + high) / 2.0;
            if odds(middle) < psi {
                low = middle;
            } else {
                high = middle;
            }
        }
        let e = (low + high) / 2.0;
        let v = 1.0 / (1.0 / e + 1.0 / (n1 - e) + 1.0 / (m1 - e) + 1.0 / (n0 - m1 + e));
        breslow_day += (a - e).powi(2) / v;
    }
    (psi, variance, breslow_day)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_odds_ratios_equal_the_computation_on_all_sites_tables() -> anyhow::Result<()> {
    let test = TestAlliance::start_custom(large_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "icu-death-odds", vec![], 20_000).await?;
    let per_site = oracle_rows(&test.sites)?;
    assert_eq!(result.odds_ratios.len(), 2, "one per ISS stratum");
    for (stratum, major) in [(0usize, false), (1, true)] {
        let ratios = &result.odds_ratios[stratum];
        assert_eq!(ratios.stratum, [stratum as u32]);
        assert!(ratios.excluded.is_empty(), "{:?}", ratios.excluded);
        let tables: Vec<[f64; 4]> = per_site
            .iter()
            .map(|rows| oracle_table(rows, major))
            .collect();
        // Each site's own odds ratio.
        for (site, [a, b, c, d]) in ratios.sites.iter().zip(&tables) {
            let own = site.odds_ratio.as_ref().expect("no zero cell");
            assert!(relative(own.estimate, a * d / (b * c)) < 1e-9);
        }
        // Crude: the table of all rows together.
        let all = oracle_table(&per_site.concat(), major);
        let crude = ratios.crude.as_ref().unwrap();
        assert!(relative(crude.estimate, all[0] * all[3] / (all[1] * all[2])) < 1e-9);
        // Mantel-Haenszel with its interval, and Breslow-Day.
        let (psi, variance, breslow_day) = oracle_mantel_haenszel(&tables);
        let pooled = ratios.mantel_haenszel.as_ref().unwrap();
        assert!(
            relative(pooled.estimate, psi) < 1e-9,
            "{} vs {psi}",
            pooled.estimate
        );
        let low = (psi.ln() - 1.959963984540054 * variance.sqrt()).exp();
        assert!(relative(pooled.low, low) < 1e-9);
        assert!(relative(ratios.breslow_day.unwrap(), breslow_day) < 1e-6);
        assert_eq!(ratios.breslow_day_df, 2);
        let p = ratios.breslow_day_p.unwrap();
        assert!((0.0..=1.0).contains(&p));
    }
    let table = fedq_coordinator::render::table("odds", &result);
    assert!(table.contains("Mantel-Haenszel"), "{table}");
    assert!(table.contains("Breslow-Day"), "{table}");
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_withholds_a_cell_of_its_2x2_table_is_left_out_of_the_pooled_ratio()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "icu-death-odds", vec![], 20_000).await?;
    let site_c_rows = &oracle_rows(&test.sites)?[2];
    // site-c (150 admissions) has a small cell in the minor-injury table.
    let small = oracle_table(site_c_rows, false)
        .iter()
        .any(|count| (1.0..10.0).contains(count));
    assert!(small, "the test needs a small cell at site-c");
    let ratios = &result.odds_ratios[0];
    assert!(
        ratios.excluded.contains(&"site-c".to_string()),
        "{ratios:?}"
    );
    assert!(ratios.sites.iter().all(|site| site.site_id != "site-c"));
    let answer = result.sites[2].result.as_ref().unwrap();
    assert!(answer.cells.iter().any(withheld));
    let table = fedq_coordinator::render::table("odds", &result);
    assert!(table.contains("not included"), "{table}");
    test.alliance.stop().await?;
    Ok(())
}

/// The survival template's grid (days).
const GRID: [i64; 6] = [0, 7, 14, 30, 60, 90];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_survival_equals_the_product_limit_on_all_rows_on_the_shared_starts()
-> anyhow::Result<()> {
    let test = TestAlliance::start_custom(large_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let min_iss = 9;
    let result = query(
        &mut coordinator,
        "survival-after-admission",
        vec![integer("min_iss", min_iss)],
        20_000,
    )
    .await?;
    let rows: Vec<OracleRow> = oracle_rows(&test.sites)?.into_iter().flatten().collect();
    // icu_admission: no, yes (the missing stratum has no records and no sites).
    for (index, icu) in [(0usize, false), (1, true)] {
        let curve = &result.curves[index];
        assert_eq!(curve.sites.len(), 3, "{curve:?}");
        let chosen: Vec<&OracleRow> = rows
            .iter()
            .filter(|row| row.iss >= min_iss && row.icu == icu)
            .collect();
        let starts: Vec<usize> = curve
            .points
            .iter()
            .map(|point| point.start as usize)
            .collect();
        assert_eq!(starts[0], 0);
        let (mut survival, mut greenwood) = (1.0_f64, 0.0_f64);
        for (position, point) in curve.points.iter().enumerate() {
            let from = GRID[starts[position]];
            let until = starts
                .get(position + 1)
                .map_or(i64::MAX, |next| GRID[*next]);
            let at_risk = chosen
                .iter()
                .filter(|row| row.days_to_outcome >= from)
                .count();
            let in_interval = |died: bool| {
                chosen
                    .iter()
                    .filter(|row| (from..until).contains(&row.days_to_outcome) && row.died == died)
                    .count()
            };
            let (events, censored) = (in_interval(true), in_interval(false));
            assert_eq!(point.at_risk, at_risk as u64, "from day {from}");
            assert_eq!(
                (point.events, point.censored),
                (events as u64, censored as u64)
            );
            let (n, d) = (at_risk as f64, events as f64);
            survival *= 1.0 - d / n;
            greenwood += d / (n * (n - d));
            assert!(relative(point.survival, survival) < 1e-9, "day {from}");
            let error = survival * greenwood.sqrt();
            assert!(
                error == 0.0 && point.standard_error == 0.0
                    || relative(point.standard_error, error) < 1e-9
            );
        }
    }
    let table = fedq_coordinator::render::table("survival", &result);
    assert!(table.contains("equal to\nKaplan-Meier"), "{table}");
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survival_interval_with_few_events_is_merged_not_leaked_and_nothing_is_dropped()
-> anyhow::Result<()> {
    let test = TestAlliance::start().await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(
        &mut coordinator,
        "survival-after-admission",
        vec![integer("min_iss", 1)],
        20_000,
    )
    .await?;
    let per_site = oracle_rows(&test.sites)?;
    let mut merged_somewhere = false;
    for (site, rows) in result.sites.iter().zip(&per_site) {
        let answer = site.result.as_ref().expect("answered");
        assert!(answer.cells.is_empty(), "no raw grid leaves a node");
        for (curve, icu) in answer.curves.iter().zip([false, true]) {
            let chosen: Vec<&OracleRow> = rows.iter().filter(|row| row.icu == icu).collect();
            if curve.intervals.is_empty() {
                continue;
            }
            for interval in &curve.intervals {
                assert!(interval.at_risk >= 10, "{}: {interval:?}", site.site_id);
                for count in [interval.events, interval.censored] {
                    assert!(count == 0 || count >= 10, "{}: {interval:?}", site.site_id);
                }
            }
            // Nothing dropped: every death and discharge is in some released interval.
            let events: u64 = curve.intervals.iter().map(|interval| interval.events).sum();
            assert_eq!(events, chosen.iter().filter(|row| row.died).count() as u64);
            // Where the oracle has an interval with 1 to 9 deaths, its start is merged away.
            for (index, window) in GRID.windows(2).enumerate() {
                let deaths = chosen
                    .iter()
                    .filter(|row| row.died && (window[0]..window[1]).contains(&row.days_to_outcome))
                    .count();
                if (1..10).contains(&deaths) {
                    merged_somewhere = true;
                    let starts: Vec<u32> = curve.intervals.iter().map(|i| i.start).collect();
                    let next = index as u32 + 1;
                    assert!(
                        !(starts.contains(&(index as u32)) && starts.contains(&next)),
                        "{}: interval from day {} with {deaths} deaths released alone",
                        site.site_id,
                        window[0]
                    );
                }
            }
        }
    }
    assert!(
        merged_somewhere,
        "the test data must have an interval with few deaths"
    );
    test.alliance.stop().await?;
    Ok(())
}

/// Logistic regression of death on (1, age, iss, icu) over `rows`, plainly: Newton-Raphson
/// with Gaussian elimination, to a tight tolerance; returns coefficients and standard errors.
fn oracle_logistic(rows: &[OracleRow]) -> (Vec<f64>, Vec<f64>) {
    let design = |row: &OracleRow| {
        [
            1.0,
            row.age as f64,
            row.iss as f64,
            f64::from(u8::from(row.icu)),
        ]
    };
    let mut beta = [0.0f64; 4];
    let mut information = [[0.0f64; 4]; 4];
    for _ in 0..100 {
        let mut score = [0.0f64; 4];
        information = [[0.0f64; 4]; 4];
        for row in rows {
            let x = design(row);
            let eta: f64 = x.iter().zip(&beta).map(|(x, b)| x * b).sum();
            let p = 1.0 / (1.0 + (-eta).exp());
            let y = if row.died { 1.0 } else { 0.0 };
            for i in 0..4 {
                score[i] += (y - p) * x[i];
                for j in 0..4 {
                    information[i][j] += p * (1.0 - p) * x[i] * x[j];
                }
            }
        }
        let step = solve(information, score);
        for (b, s) in beta.iter_mut().zip(step) {
            *b += s;
        }
        if step.iter().all(|s| s.abs() < 1e-13) {
            break;
        }
    }
    // Standard errors: the diagonal of the inverse information, column by column.
    let errors = (0..4)
        .map(|column| {
            let mut unit = [0.0; 4];
            unit[column] = 1.0;
            solve(information, unit)[column].sqrt()
        })
        .collect();
    (beta.to_vec(), errors)
}

/// Solves a 4x4 system by Gaussian elimination with partial pivoting.
fn solve(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> [f64; 4] {
    for column in 0..4 {
        let pivot = (column..4)
            .max_by(|x, y| a[*x][column].abs().total_cmp(&a[*y][column].abs()))
            .unwrap();
        a.swap(column, pivot);
        b.swap(column, pivot);
        let (pivot_row, pivot_value) = (a[column], b[column]);
        for (row, value) in a.iter_mut().zip(b.iter_mut()).skip(column + 1) {
            let factor = row[column] / pivot_row[column];
            for (target, source) in row.iter_mut().zip(pivot_row).skip(column) {
                *target -= factor * source;
            }
            *value -= factor * pivot_value;
        }
    }
    let mut x = [0.0; 4];
    for row in (0..4).rev() {
        let rest: f64 = (row + 1..4).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_logistic_regression_equals_the_fit_on_all_rows_together() -> anyhow::Result<()>
{
    let test = TestAlliance::start_custom(roomy_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "death-risk-regression", vec![], 30_000).await?;
    let fit = result.regression.as_ref().expect("a fit");
    assert_eq!(fit.sites.len(), 3, "{fit:?} {:?}", result.sites);
    assert!(fit.converged && !fit.separation_suspected, "{fit:?}");
    let rows: Vec<OracleRow> = oracle_rows(&test.sites)?.into_iter().flatten().collect();
    assert_eq!(fit.records, rows.len() as u64);
    let (beta, errors) = oracle_logistic(&rows);
    let terms: Vec<&str> = fit.coefficients.iter().map(|c| c.term.as_str()).collect();
    assert_eq!(terms, ["(intercept)", "age", "iss", "icu_admission: yes"]);
    for ((coefficient, estimate), error) in fit.coefficients.iter().zip(&beta).zip(&errors) {
        assert!(
            relative(coefficient.estimate, *estimate) < 1e-6,
            "{}: {} vs {estimate}",
            coefficient.term,
            coefficient.estimate
        );
        assert!(
            relative(coefficient.standard_error, *error) < 1e-6,
            "{}: {} vs {error}",
            coefficient.term,
            coefficient.standard_error
        );
    }
    let table = fedq_coordinator::render::table("fit", &result);
    assert!(
        table.contains("odds ratio (95% CI)") && table.contains("converged"),
        "{table}"
    );
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_too_small_for_the_model_refuses_and_the_fit_goes_on_without_it()
-> anyhow::Result<()> {
    let mut sites = roomy_sites();
    // 10 admissions: the model's 4 parameters need 12 records by the one-third rule.
    sites[2].admissions = 10;
    let test = TestAlliance::start_custom(sites, &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "death-risk-regression", vec![], 30_000).await?;
    let site_c = &result.sites[2];
    assert_eq!(
        site_c.status,
        wire::SiteStatus::Refused as i32,
        "{site_c:?}"
    );
    assert_eq!(site_c.refusal, wire::RefusalCode::RegressionRefused as i32);
    assert!(
        site_c
            .message
            .contains("does not take part in the regression"),
        "{}",
        site_c.message
    );
    let fit = result.regression.as_ref().unwrap();
    assert_eq!(fit.sites, ["site-a", "site-b"]);
    assert!(fit.converged);
    let table = fedq_coordinator::render::table("fit", &result);
    assert!(
        table.contains("site-c") && table.contains("refused"),
        "{table}"
    );
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separated_regression_is_detected_and_reported_without_estimates() -> anyhow::Result<()> {
    let test = TestAlliance::start_custom(roomy_sites(), &[], 3).await?;
    let mut coordinator = test.coordinator().await?;
    let result = query(&mut coordinator, "critical-by-severity", vec![], 30_000).await?;
    let fit = result.regression.as_ref().expect("a fit");
    assert!(fit.separation_suspected, "{fit:?}");
    assert!(!fit.converged || fit.coefficients.iter().any(|c| c.estimate.abs() > 15.0));
    let table = fedq_coordinator::render::table("fit", &result);
    assert!(table.contains("separation suspected"), "{table}");
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complement_whose_records_were_released_before_does_not_protect_a_mean()
-> anyhow::Result<()> {
    // The audited attack: a second, slightly longer window adds one admission to the 25+
    // band (withheld by overlap control); if its complement is a band with no new admissions
    // (so its summary is the first answer's), the total minus the released bands minus that
    // earlier summary is one patient's length of stay.
    let test = TestAlliance::start().await?;
    let mut node = test.node_as_coordinator(0).await?;
    let window = |to: &str| {
        vec![
            fedq_proto::convert::parameter_to_wire(
                "from",
                &fedq_proto::template::Value::Date(
                    fedq_proto::model::parse_date("2020-04-06").unwrap(),
                ),
            ),
            fedq_proto::convert::parameter_to_wire(
                "to",
                &fedq_proto::template::Value::Date(fedq_proto::model::parse_date(to).unwrap()),
            ),
        ]
    };
    let ask = |to: &'static str, id: &'static str| {
        let mut request =
            fedq_tests::node_request(&test.alliance, "length-of-stay-by-day", window(to)).unwrap();
        request.request_id = id.into();
        request
    };
    let first = node
        .run_query(ask("2021-01-31", "first"))
        .await?
        .into_inner();
    let second = node
        .run_query(ask("2021-02-22", "second"))
        .await?
        .into_inner();
    let n = |cell: &wire::Cell| match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    };
    let withheld: Vec<usize> = (0..second.cells.len())
        .filter(|&index| n(&second.cells[index]).is_none())
        .collect();
    assert!(
        !withheld.is_empty(),
        "overlap control must act on the second window"
    );
    // What the reader can compute: the second total less its released bands is the withheld
    // group; taking every withheld band but one as the first answer gave it leaves that one
    // band, whose growth over the first answer must not be a small group of admissions.
    if let Some(total) = second.total.as_ref().and_then(n) {
        let group = total - second.cells.iter().filter_map(n).sum::<u64>();
        for &band in &withheld {
            let others: Option<u64> = withheld
                .iter()
                .filter(|&&other| other != band)
                .map(|&other| n(&first.cells[other]))
                .sum();
            if let (Some(others), Some(before)) = (others, n(&first.cells[band])) {
                let derived = group.saturating_sub(others);
                let growth = derived.saturating_sub(before);
                assert!(
                    !(1..10).contains(&growth),
                    "band {band}: {growth} new admission(s) with a derivable summary"
                );
            }
        }
    }
    test.alliance.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sums_a_survival_answer_implies_are_remembered_like_released_counts()
-> anyhow::Result<()> {
    // The audited attack: survival from ISS 9 releases its curves, whose events add up to the
    // deaths at ISS 9 or more; deaths-by-mechanism from ISS 10 then releases its total, and
    // the difference is the deaths at ISS exactly 9.
    let test = TestAlliance::start().await?;
    let site_a = &oracle_rows(&test.sites)?[0];
    let deaths_at_9 = site_a.iter().filter(|row| row.died && row.iss == 9).count();
    assert!(
        (1..10).contains(&deaths_at_9),
        "the attack needs a small group: {deaths_at_9}"
    );
    let mut node = test.node_as_coordinator(0).await?;
    let mut survival = fedq_tests::node_request(
        &test.alliance,
        "survival-after-admission",
        vec![integer("min_iss", 9)],
    )?;
    survival.request_id = "survival-9".into();
    let curves = node.run_query(survival).await?.into_inner().curves;
    let events: u64 = curves
        .iter()
        .flat_map(|curve| &curve.intervals)
        .map(|interval| interval.events)
        .sum();
    assert!(events > 0, "the survival answer released curves");
    let mut deaths = fedq_tests::node_request(
        &test.alliance,
        "deaths-by-mechanism",
        vec![integer("min_iss", 10)],
    )?;
    deaths.request_id = "deaths-10".into();
    let answer = node.run_query(deaths).await?.into_inner();
    if let Some(wire::cell::Outcome::Released(total)) =
        answer.total.as_ref().and_then(|cell| cell.outcome)
    {
        assert!(
            !(1..10).contains(&events.saturating_sub(total.count)),
            "{events} deaths in the curves less {} released: the deaths at ISS 9",
            total.count
        );
    }
    test.alliance.stop().await?;
    Ok(())
}
