//! Odds ratios from 2x2 tables: one site's (with Woolf's 95% interval), the crude odds ratio of
//! the summed table, the Mantel–Haenszel odds ratio across sites with the Robins–Breslow–
//! Greenland 95% interval, and the Breslow–Day test that the sites share one odds ratio.
//! Sites are the strata of the Mantel–Haenszel estimate; every formula uses only the four
//! counts a site released.

use fedq_proto::wire;

/// One 2x2 table: `a` exposed with the outcome, `b` exposed without, `c` not exposed with,
/// `d` not exposed without.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Table {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub d: f64,
}

impl Table {
    fn n(&self) -> f64 {
        self.a + self.b + self.c + self.d
    }

    /// The cells of two tables added.
    pub fn plus(self, other: Table) -> Table {
        Table {
            a: self.a + other.a,
            b: self.b + other.b,
            c: self.c + other.c,
            d: self.d + other.d,
        }
    }
}

/// An odds ratio with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OddsRatio {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// The normal quantile of a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

fn interval(estimate: f64, variance_of_log: f64) -> OddsRatio {
    let half = Z_95 * variance_of_log.sqrt();
    OddsRatio {
        estimate,
        low: (estimate.ln() - half).exp(),
        high: (estimate.ln() + half).exp(),
    }
}

/// A table's odds ratio ad/bc with Woolf's interval; none when a cell is zero (the ratio or
/// its interval is then not finite).
pub fn odds_ratio(table: &Table) -> Option<OddsRatio> {
    let Table { a, b, c, d } = *table;
    if a <= 0.0 || b <= 0.0 || c <= 0.0 || d <= 0.0 {
        return None;
    }
    Some(interval(
        a * d / (b * c),
        1.0 / a + 1.0 / b + 1.0 / c + 1.0 / d,
    ))
}

/// The pooled result across sites.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pooled {
    pub mantel_haenszel: OddsRatio,
    /// Breslow–Day statistic, its degrees of freedom and p-value (two or more sites).
    pub breslow_day: Option<(f64, u32, f64)>,
}

/// The Mantel–Haenszel odds ratio of `tables` with the Robins–Breslow–Greenland interval and
/// the Breslow–Day test; none when it is not defined (no table, or the sums of ad/n or bc/n
/// are zero).
pub fn mantel_haenszel(tables: &[Table]) -> Option<Pooled> {
    let tables: Vec<&Table> = tables.iter().filter(|table| table.n() > 0.0).collect();
    let (mut r, mut s) = (0.0, 0.0);
    let (mut pr, mut ps_qr, mut qs) = (0.0, 0.0, 0.0);
    for table in &tables {
        let Table { a, b, c, d } = **table;
        let n = table.n();
        let (ri, si) = (a * d / n, b * c / n);
        let (pi, qi) = ((a + d) / n, (b + c) / n);
        r += ri;
        s += si;
        pr += pi * ri;
        ps_qr += pi * si + qi * ri;
        qs += qi * si;
    }
    if r <= 0.0 || s <= 0.0 {
        return None;
    }
    let estimate = r / s;
    let variance = pr / (2.0 * r * r) + ps_qr / (2.0 * r * s) + qs / (2.0 * s * s);
    let breslow_day = (tables.len() >= 2)
        .then(|| breslow_day(&tables, estimate))
        .flatten();
    Some(Pooled {
        mantel_haenszel: interval(estimate, variance),
        breslow_day,
    })
}

/// The Breslow–Day statistic against the common odds ratio `psi`: the sum over tables of
/// (a - E[a])² / Var(a), where E[a] makes the table's odds ratio `psi` with its margins fixed;
/// chi-squared with (tables - 1) degrees of freedom.
fn breslow_day(tables: &[&Table], psi: f64) -> Option<(f64, u32, f64)> {
    let mut statistic = 0.0;
    for table in tables {
        let Table { a, b, c, d } = **table;
        let (exposed, unexposed, with_outcome) = (a + b, c + d, a + c);
        let low = (with_outcome - unexposed).max(0.0);
        let high = exposed.min(with_outcome);
        // (1 - psi) A² + (unexposed - with_outcome + psi (exposed + with_outcome)) A
        //   - psi exposed with_outcome = 0, with A in [low, high].
        let quadratic = 1.0 - psi;
        let linear = unexposed - with_outcome + psi * (exposed + with_outcome);
        let constant = -psi * exposed * with_outcome;
        let expected = if quadratic.abs() < 1e-12 {
            -constant / linear
        } else {
            let root = (linear * linear - 4.0 * quadratic * constant).sqrt();
            let candidates = [
                (-linear + root) / (2.0 * quadratic),
                (-linear - root) / (2.0 * quadratic),
            ];
            *candidates
                .iter()
                .find(|value| **value >= low - 1e-9 && **value <= high + 1e-9)?
        };
        let cells = [
            expected,
            exposed - expected,
            with_outcome - expected,
            unexposed - with_outcome + expected,
        ];
        if cells.iter().any(|cell| *cell <= 0.0) {
            // A table whose expected counts touch zero adds no information to the test.
            continue;
        }
        let variance = 1.0 / cells.iter().map(|cell| 1.0 / cell).sum::<f64>();
        statistic += (a - expected).powi(2) / variance;
    }
    let df = u32::try_from(tables.len() - 1).ok()?;
    Some((statistic, df, chi_squared_upper(statistic, df)))
}

/// P(X >= x) for X chi-squared with `df` degrees of freedom.
pub fn chi_squared_upper(x: f64, df: u32) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_upper_regularized(f64::from(df) / 2.0, x / 2.0)
}

/// Q(s, x) = Γ(s, x) / Γ(s), by its series below s + 1 and its continued fraction above.
fn gamma_upper_regularized(s: f64, x: f64) -> f64 {
    let log_prefix = s * x.ln() - x - ln_gamma(s);
    if x < s + 1.0 {
        let (mut term, mut sum, mut k) = (1.0 / s, 1.0 / s, s);
        for _ in 0..500 {
            k += 1.0;
            term *= x / k;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * log_prefix.exp()
    } else {
        // Lentz's method for the continued fraction.
        let tiny = 1e-300;
        let mut b = x + 1.0 - s;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -f64::from(i) * (f64::from(i) - s);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        log_prefix.exp() * h
    }
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7, nine coefficients).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (index, coefficient) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += coefficient / (x + index as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The odds ratios of a pooled 2x2 result: for each combination of the template's strata
/// (the grid's axes but the last two, exposure and outcome) where some site has records, over
/// the sites whose four cells are released (`sites`: each site's id and its cells in grid
/// order, `None` where withheld; a site without an answer is `None` as a whole).
pub fn for_grid(
    shape: &[usize],
    sites: &[(String, Option<&[Option<u64>]>)],
) -> Vec<wire::StratumOddsRatios> {
    let strata_shape = &shape[..shape.len().saturating_sub(2)];
    let strata: usize = strata_shape.iter().product();
    let per_stratum = shape.iter().rev().take(2).product::<usize>();
    let outcome_levels = shape.last().copied().unwrap_or(0);
    (0..strata)
        .filter_map(|stratum| {
            let base = stratum * per_stratum;
            let at = |exposure: usize, outcome: usize| base + exposure * outcome_levels + outcome;
            let mut included = Vec::new();
            let mut excluded = Vec::new();
            for (site_id, cells) in sites {
                let table = cells.and_then(|cells| {
                    let cell =
                        |exposure, outcome| cells.get(at(exposure, outcome)).copied().flatten();
                    Some(Table {
                        a: cell(0, 0)? as f64,
                        b: cell(0, 1)? as f64,
                        c: cell(1, 0)? as f64,
                        d: cell(1, 1)? as f64,
                    })
                });
                match table {
                    Some(table) => included.push((site_id.clone(), table)),
                    None => excluded.push(site_id.clone()),
                }
            }
            let tables: Vec<Table> = included.iter().map(|(_, table)| *table).collect();
            let summed = tables.iter().fold(
                Table {
                    a: 0.0,
                    b: 0.0,
                    c: 0.0,
                    d: 0.0,
                },
                |sum, table| sum.plus(*table),
            );
            if excluded.is_empty() && summed.n() == 0.0 {
                // No site has records in this stratum (e.g. the strata's "missing" levels).
                return None;
            }
            let pooled = mantel_haenszel(&tables);
            Some(wire::StratumOddsRatios {
                stratum: fedq_proto::template::cell_coordinates(strata_shape, stratum),
                sites: included
                    .iter()
                    .map(|(site_id, table)| wire::SiteOddsRatio {
                        site_id: site_id.clone(),
                        odds_ratio: odds_ratio(table).map(Into::into),
                    })
                    .collect(),
                excluded,
                crude: odds_ratio(&summed).map(Into::into),
                mantel_haenszel: pooled.map(|pooled| pooled.mantel_haenszel.into()),
                breslow_day: pooled
                    .and_then(|pooled| pooled.breslow_day)
                    .map(|(x, _, _)| x),
                breslow_day_df: pooled
                    .and_then(|pooled| pooled.breslow_day)
                    .map_or(0, |(_, df, _)| df),
                breslow_day_p: pooled
                    .and_then(|pooled| pooled.breslow_day)
                    .map(|(_, _, p)| p),
            })
        })
        .collect()
}

impl From<OddsRatio> for wire::OddsRatio {
    fn from(ratio: OddsRatio) -> wire::OddsRatio {
        wire::OddsRatio {
            estimate: ratio.estimate,
            low: ratio.low,
            high: ratio.high,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(a: f64, b: f64, c: f64, d: f64) -> Table {
        Table { a, b, c, d }
    }

    #[test]
    fn one_table_has_its_own_odds_ratio_and_woolf_interval() {
        let only = table(20.0, 80.0, 10.0, 90.0);
        let ratio = odds_ratio(&only).unwrap();
        assert!((ratio.estimate - 2.25).abs() < 1e-12);
        let half = Z_95 * (1.0 / 20.0 + 1.0 / 80.0 + 1.0 / 10.0 + 1.0 / 90.0_f64).sqrt();
        assert!((ratio.low - (2.25_f64.ln() - half).exp()).abs() < 1e-12);
        assert_eq!(odds_ratio(&table(0.0, 5.0, 5.0, 5.0)), None);
        let pooled = mantel_haenszel(&[only]).unwrap();
        assert!((pooled.mantel_haenszel.estimate - 2.25).abs() < 1e-12);
        assert_eq!(pooled.breslow_day, None);
    }

    #[test]
    fn sites_sharing_one_odds_ratio_are_homogeneous_and_opposite_ones_are_not() {
        // The same table twice: MH equals its odds ratio, Breslow–Day is 0.
        let same = [
            table(20.0, 80.0, 10.0, 90.0),
            table(40.0, 160.0, 20.0, 180.0),
        ];
        let pooled = mantel_haenszel(&same).unwrap();
        assert!((pooled.mantel_haenszel.estimate - 2.25).abs() < 1e-9);
        let (statistic, df, p) = pooled.breslow_day.unwrap();
        assert!(statistic.abs() < 1e-9 && df == 1 && (p - 1.0).abs() < 1e-9);
        // Opposite associations: strongly heterogeneous.
        let opposite = [table(50.0, 10.0, 10.0, 50.0), table(10.0, 50.0, 50.0, 10.0)];
        let (statistic, _, p) = mantel_haenszel(&opposite).unwrap().breslow_day.unwrap();
        assert!(statistic > 50.0 && p < 1e-10, "{statistic} {p}");
    }

    #[test]
    fn chi_squared_tail_probabilities_match_known_values() {
        // df 2: exp(-x/2) exactly; df 1 at 3.841459: 0.05; df 10 at 18.307: 0.05.
        for x in [0.5, 2.0, 7.0, 30.0] {
            assert!(
                (chi_squared_upper(x, 2) - (-x / 2.0).exp()).abs() < 1e-12,
                "{x}"
            );
        }
        assert!((chi_squared_upper(3.841_458_820_694_124, 1) - 0.05).abs() < 1e-9);
        assert!((chi_squared_upper(18.307_038_053_275_146, 10) - 0.05).abs() < 1e-9);
        assert!((ln_gamma(5.0) - 24.0_f64.ln()).abs() < 1e-12);
    }
}
