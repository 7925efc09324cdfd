//! Pooling survival curves: each site released intervals on the template's time grid (having
//! merged intervals whose counts were small); the coordinator pools only on the interval
//! starts every pooled site shares, then computes the grouped product-limit estimate with
//! Greenwood's standard error and a 95% pointwise band.

use std::collections::BTreeSet;

use fedq_proto::wire;

/// The normal quantile of a two-sided 95% interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// Checks a site's curves against the asked grid (strata in order, starts increasing from the
/// first grid point, at-risk counts consistent with the events and censorings).
pub fn validate(
    curves: &[wire::SurvivalCurve],
    strata_shape: &[usize],
    intervals: usize,
) -> Result<(), String> {
    let strata: usize = strata_shape.iter().product();
    if curves.len() != strata {
        return Err(format!(
            "the site sent {} survival curves; the template has {strata} strata",
            curves.len()
        ));
    }
    for (index, curve) in curves.iter().enumerate() {
        if curve.stratum != fedq_proto::template::cell_coordinates(strata_shape, index) {
            return Err("the site's survival curves are not in strata order".into());
        }
        let Some(first) = curve.intervals.first() else {
            continue;
        };
        if first.start != 0 {
            return Err("a survival curve does not start at the grid's first point".into());
        }
        for (position, interval) in curve.intervals.iter().enumerate() {
            if interval.start as usize >= intervals {
                return Err("a survival interval starts beyond the grid".into());
            }
            let leaving = interval.events.checked_add(interval.censored);
            let expected_next = leaving.and_then(|leaving| interval.at_risk.checked_sub(leaving));
            match (curve.intervals.get(position + 1), expected_next) {
                (Some(next), Some(remaining))
                    if next.start > interval.start && next.at_risk == remaining => {}
                (None, Some(0)) => {}
                _ => {
                    return Err(
                        "a survival curve's records at risk do not match its events and censorings"
                            .into(),
                    );
                }
            }
        }
    }
    Ok(())
}

/// The pooled curve of one stratum over `sites` (site id, its curve, or none when it withheld
/// the curve or did not answer).
pub fn pool(
    stratum: Vec<u32>,
    sites: &[(String, Option<&wire::SurvivalCurve>)],
) -> wire::PooledCurve {
    let included: Vec<(&String, &wire::SurvivalCurve)> = sites
        .iter()
        .filter_map(|(site, curve)| {
            curve
                .filter(|curve| !curve.intervals.is_empty())
                .map(|curve| (site, curve))
        })
        .collect();
    let excluded: Vec<String> = sites
        .iter()
        .filter(|(site, _)| !included.iter().any(|(included, _)| *included == site))
        .map(|(site, _)| site.clone())
        .collect();
    // The starts every included site released.
    let mut common: Option<BTreeSet<u32>> = None;
    for (_, curve) in &included {
        let starts: BTreeSet<u32> = curve
            .intervals
            .iter()
            .map(|interval| interval.start)
            .collect();
        common = Some(match common {
            None => starts,
            Some(common) => common.intersection(&starts).copied().collect(),
        });
    }
    let common: Vec<u32> = common.unwrap_or_default().into_iter().collect();
    let mut points = Vec::new();
    let (mut survival, mut greenwood) = (1.0_f64, 0.0_f64);
    for (position, &start) in common.iter().enumerate() {
        let end = common.get(position + 1).copied().unwrap_or(u32::MAX);
        let (mut at_risk, mut events, mut censored) = (0u64, 0u64, 0u64);
        for (_, curve) in &included {
            for interval in &curve.intervals {
                if interval.start == start {
                    at_risk += interval.at_risk;
                }
                if (start..end).contains(&interval.start) {
                    events += interval.events;
                    censored += interval.censored;
                }
            }
        }
        if at_risk > 0 {
            let (n, d) = (at_risk as f64, events as f64);
            survival *= 1.0 - d / n;
            if n > d {
                greenwood += d / (n * (n - d));
            }
        }
        let standard_error = survival * greenwood.sqrt();
        points.push(wire::SurvivalPoint {
            start,
            at_risk,
            events,
            censored,
            survival,
            standard_error,
            low: (survival - Z_95 * standard_error).clamp(0.0, 1.0),
            high: (survival + Z_95 * standard_error).clamp(0.0, 1.0),
        });
    }
    wire::PooledCurve {
        stratum,
        sites: included.iter().map(|(site, _)| (*site).clone()).collect(),
        excluded,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(start: u32, at_risk: u64, events: u64, censored: u64) -> wire::SurvivalInterval {
        wire::SurvivalInterval {
            start,
            at_risk,
            events,
            censored,
        }
    }

    fn curve(intervals: Vec<wire::SurvivalInterval>) -> wire::SurvivalCurve {
        wire::SurvivalCurve {
            stratum: Vec::new(),
            intervals,
        }
    }

    #[test]
    fn sites_pool_on_the_starts_they_share_and_survival_is_the_product_limit() {
        // site-a released starts 0, 1, 2; site-b merged 1 into 0.
        let a = curve(vec![
            interval(0, 100, 10, 10),
            interval(1, 80, 20, 0),
            interval(2, 60, 0, 60),
        ]);
        let b = curve(vec![interval(0, 50, 20, 10), interval(2, 20, 0, 20)]);
        validate(std::slice::from_ref(&a), &[], 3).unwrap();
        validate(std::slice::from_ref(&b), &[], 3).unwrap();
        let pooled = pool(
            Vec::new(),
            &[
                ("a".into(), Some(&a)),
                ("b".into(), Some(&b)),
                ("c".into(), None),
            ],
        );
        assert_eq!(pooled.excluded, ["c"]);
        let starts: Vec<u32> = pooled.points.iter().map(|point| point.start).collect();
        assert_eq!(starts, [0, 2]);
        // [0, 2): 150 at risk, 50 events; [2, ...): 80 at risk, none.
        assert_eq!(
            (pooled.points[0].at_risk, pooled.points[0].events),
            (150, 50)
        );
        assert!((pooled.points[0].survival - 100.0 / 150.0).abs() < 1e-12);
        let greenwood = 50.0 / (150.0 * 100.0);
        assert!(
            (pooled.points[0].standard_error - (100.0 / 150.0) * f64::sqrt(greenwood)).abs()
                < 1e-12
        );
        assert_eq!(pooled.points[1].at_risk, 80);
        assert!((pooled.points[1].survival - 100.0 / 150.0).abs() < 1e-12);
    }

    #[test]
    fn inconsistent_curves_are_refused() {
        let wrong = curve(vec![interval(0, 100, 10, 10), interval(1, 70, 70, 0)]);
        assert!(validate(&[wrong], &[], 3).is_err());
        let late = curve(vec![interval(1, 10, 10, 0)]);
        assert!(validate(&[late], &[], 3).is_err());
    }
}
