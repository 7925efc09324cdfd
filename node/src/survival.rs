//! Survival curves at the node: from the true counts per stratum, time interval and event
//! (the query's grid), the intervals a site releases. In each released interval the records at
//! risk at its start are at least k, and its events and its censorings are each 0 or at least
//! k; an interval short of that is merged with the next one (the last with the one before), so
//! no small count is released and none is dropped. A stratum whose records are too few — or
//! withheld to protect another stratum's, as in a count table of the strata — releases no
//! curve. With overlap control, every released value (records at risk, events, censorings) is
//! also checked against the remembered sets and its interval merged further if too close.
//! Nothing here leaves the node but the returned intervals.

use std::collections::BTreeMap;

use fedq_proto::wire::Mechanism;
use roaring::{MultiOps, RoaringBitmap};

use crate::disclosure::{self, DisclosedTable, Outcome, Reason};
use crate::overlap::OverlapMemory;
use crate::plan::{CellSets, RawTable};

/// One released interval: from grid point `start` to the next released interval's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: usize,
    pub at_risk: u64,
    pub events: u64,
    pub censored: u64,
}

/// One stratum's released curve (no intervals: withheld).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Curve {
    /// Index into the grid of the template's strata.
    pub stratum: usize,
    pub intervals: Vec<Interval>,
}

/// What a survival answer releases.
#[derive(Debug, Clone)]
pub struct Decided {
    pub curves: Vec<Curve>,
    /// For the audit record and the answer's mechanisms: one cell per stratum, interval and
    /// outcome (event or censored), released where its interval was released unmerged.
    pub summary: DisclosedTable,
    /// The record sets of every released value, for the overlap memory.
    pub released_sets: Vec<RoaringBitmap>,
}

/// One stratum's events and censorings per interval, with their record sets.
struct Stratum {
    events: Vec<u64>,
    censored: Vec<u64>,
    event_sets: Vec<RoaringBitmap>,
    censored_sets: Vec<RoaringBitmap>,
}

fn is_small(count: u64, k: u32) -> bool {
    count > 0 && count < u64::from(k)
}

/// A group of consecutive intervals `[from, to)` summed.
fn group(stratum: &Stratum, from: usize, to: usize) -> (u64, u64) {
    (
        stratum.events[from..to].iter().sum(),
        stratum.censored[from..to].iter().sum(),
    )
}

/// The record sets of a group: at risk at its start, its events, its censorings.
fn group_sets(stratum: &Stratum, from: usize, to: usize) -> [RoaringBitmap; 3] {
    let intervals = stratum.events.len();
    let at_risk = stratum.event_sets[from..intervals]
        .iter()
        .chain(&stratum.censored_sets[from..intervals])
        .union();
    [
        at_risk,
        stratum.event_sets[from..to].iter().union(),
        stratum.censored_sets[from..to].iter().union(),
    ]
}

/// A stratum's events and its censorings over all its intervals.
fn derived_sets(stratum: &Stratum) -> [RoaringBitmap; 2] {
    [
        stratum.event_sets.iter().union(),
        stratum.censored_sets.iter().union(),
    ]
}

/// Over the `released` strata: their records, events and censorings; and every stratum's
/// records when the total is released.
fn derived_across(strata: &[Stratum], released: &[usize], total: bool) -> Vec<RoaringBitmap> {
    let records = |index: &usize| {
        let stratum = &strata[*index];
        stratum
            .event_sets
            .iter()
            .chain(&stratum.censored_sets)
            .union()
    };
    let mut sets = vec![
        released.iter().map(records).union(),
        released
            .iter()
            .map(|index| derived_sets(&strata[*index])[0].clone())
            .union(),
        released
            .iter()
            .map(|index| derived_sets(&strata[*index])[1].clone())
            .union(),
    ];
    if total {
        sets.push((0..strata.len()).map(|index| records(&index)).union());
    }
    sets
}

/// Merges groups (given by their starts) until every group holds: at least k at risk, events
/// and censorings each 0 or at least k, and (with `memory`) no released set too close to a
/// remembered one. Returns the starts, or none when even one group cannot hold.
fn merge(stratum: &Stratum, k: u32, memory: Option<&OverlapMemory>) -> (Option<Vec<usize>>, bool) {
    let intervals = stratum.events.len();
    // Intervals from which no record is left at risk say nothing: the curve ends before them.
    let occupied = (0..intervals)
        .rev()
        .find(|&interval| stratum.events[interval] + stratum.censored[interval] > 0)
        .map_or(0, |last| last + 1);
    let mut starts: Vec<usize> = (0..occupied.max(1)).collect();
    let mut overlap_acted = false;
    loop {
        let mut violation = None;
        for (position, &from) in starts.iter().enumerate() {
            let to = starts.get(position + 1).copied().unwrap_or(intervals);
            let (events, censored) = group(stratum, from, to);
            let at_risk: u64 =
                group(stratum, from, intervals).0 + group(stratum, from, intervals).1;
            let small = is_small(events, k) || is_small(censored, k) || is_small(at_risk, k);
            let close = !small
                && memory.is_some_and(|memory| {
                    group_sets(stratum, from, to)
                        .iter()
                        .any(|set| !set.is_empty() && memory.too_close(set, k))
                });
            if small || close {
                overlap_acted |= close;
                violation = Some(position);
                break;
            }
        }
        match violation {
            None => return (Some(starts), overlap_acted),
            Some(_) if starts.len() == 1 => return (None, overlap_acted),
            // The last group joins the one before; any other the one after.
            Some(position) if position + 1 == starts.len() => {
                starts.remove(position);
            }
            Some(position) => {
                starts.remove(position + 1);
            }
        }
    }
}

/// Decides a survival answer from its true counts `raw` (axes: the template's strata, then the
/// time intervals with a last "missing" level, then event / censored / missing).
pub fn decide(
    raw: &RawTable,
    sets: Option<&CellSets>,
    k: u32,
    memory: Option<&OverlapMemory>,
) -> Decided {
    let dims = raw.shape.len();
    let (interval_levels, event_levels) = (raw.shape[dims - 2], raw.shape[dims - 1]);
    let intervals = interval_levels - 1;
    let strata_shape = raw.shape[..dims - 2].to_vec();
    let strata_count: usize = strata_shape.iter().product();
    let empty = RoaringBitmap::new();
    let cell = |stratum: usize, interval: usize, event: usize| {
        (stratum * interval_levels + interval) * event_levels + event
    };
    let set_of = |index: usize| sets.map_or(&empty, |sets| &sets[index]).clone();
    let strata: Vec<Stratum> = (0..strata_count)
        .map(|stratum| Stratum {
            events: (0..intervals)
                .map(|i| raw.counts[cell(stratum, i, 0)])
                .collect(),
            censored: (0..intervals)
                .map(|i| raw.counts[cell(stratum, i, 1)])
                .collect(),
            event_sets: (0..intervals)
                .map(|i| set_of(cell(stratum, i, 0)))
                .collect(),
            censored_sets: (0..intervals)
                .map(|i| set_of(cell(stratum, i, 1)))
                .collect(),
        })
        .collect();
    // Which strata release a curve: their record counts as a count table of the strata (so a
    // withheld stratum cannot be recovered from the others and the total).
    let totals = RawTable {
        shape: strata_shape.clone(),
        counts: strata
            .iter()
            .map(|stratum| group(stratum, 0, intervals).0 + group(stratum, 0, intervals).1)
            .collect(),
    };
    // A stratum whose intervals cannot be made to hold withholds its curve; it is then forced
    // in the strata table and complementary suppression runs again, until nothing changes.
    let mut forced: Vec<Option<Reason>> = vec![None; strata_count];
    let mut overlap_acted = false;
    let (gate, merged) = loop {
        let gate = disclosure::apply_with(&totals, k, &forced, false);
        let mut merged = Vec::with_capacity(strata_count);
        let mut failed = None;
        for (index, stratum) in strata.iter().enumerate() {
            let starts = match gate.cells[index] {
                Outcome::Released(_) => {
                    let (starts, close) = merge(stratum, k, memory);
                    overlap_acted |= close;
                    if starts.is_none() {
                        failed = Some(index);
                        break;
                    }
                    starts
                }
                Outcome::Withheld => None,
            };
            merged.push(starts);
        }
        if let Some(index) = failed {
            forced[index] = Some(Reason::Threshold);
            continue;
        }
        // Sums a reader can add up from the released curves — each stratum's events and
        // censorings, and over the released strata their records, events and censorings (and
        // the total when released) — are checked like released values too.
        let Some(memory) = memory else {
            break (gate, merged);
        };
        let released: Vec<usize> = (0..strata_count)
            .filter(|&index| merged[index].is_some())
            .collect();
        let close = |set: &RoaringBitmap| !set.is_empty() && memory.too_close(set, k);
        let own = released
            .iter()
            .copied()
            .find(|&index| derived_sets(&strata[index]).iter().any(&close));
        let across = derived_across(
            &strata,
            &released,
            matches!(gate.total, Outcome::Released(_)),
        );
        let smallest = released
            .iter()
            .copied()
            .min_by_key(|&index| totals.counts[index]);
        match (own, across.iter().any(close), smallest) {
            (Some(index), _, _) | (None, true, Some(index)) => {
                forced[index] = Some(Reason::Overlap);
                overlap_acted = true;
            }
            _ => break (gate, merged),
        }
    };
    let mut curves = Vec::new();
    let mut released_sets = Vec::new();
    let mut cells = vec![Outcome::Withheld; strata_count * intervals * 2];
    let mut withheld_by_reason: BTreeMap<Reason, u64> = BTreeMap::new();
    let mut mechanisms = gate.mechanisms.clone();
    if overlap_acted {
        mechanisms.insert(Mechanism::QueryOverlapControl);
    }
    for (index, (stratum, starts)) in strata.iter().zip(merged).enumerate() {
        let Some(starts) = starts else {
            curves.push(Curve {
                stratum: index,
                intervals: Vec::new(),
            });
            *withheld_by_reason.entry(Reason::Threshold).or_default() += (intervals * 2) as u64;
            mechanisms.insert(Mechanism::SmallCellSuppression);
            continue;
        };
        let mut released = Vec::new();
        for (position, &from) in starts.iter().enumerate() {
            let to = starts.get(position + 1).copied().unwrap_or(intervals);
            let (events, censored) = group(stratum, from, to);
            let (after_events, after_censored) = group(stratum, from, intervals);
            released.push(Interval {
                start: from,
                at_risk: after_events + after_censored,
                events,
                censored,
            });
            released_sets.extend(
                group_sets(stratum, from, to)
                    .into_iter()
                    .filter(|set| !set.is_empty()),
            );
            let merged = to - from > 1;
            for interval in from..to {
                for (offset, count) in [stratum.events[interval], stratum.censored[interval]]
                    .into_iter()
                    .enumerate()
                {
                    let at = (index * intervals + interval) * 2 + offset;
                    if merged {
                        *withheld_by_reason.entry(Reason::Threshold).or_default() += 1;
                    } else {
                        cells[at] = Outcome::Released(count);
                    }
                }
            }
            if merged {
                mechanisms.insert(Mechanism::SmallCellSuppression);
            }
        }
        curves.push(Curve {
            stratum: index,
            intervals: released,
        });
    }
    if memory.is_some() {
        let released: Vec<usize> = curves
            .iter()
            .filter(|curve| !curve.intervals.is_empty())
            .map(|curve| curve.stratum)
            .collect();
        for &index in &released {
            released_sets.extend(derived_sets(&strata[index]));
        }
        released_sets.extend(derived_across(
            &strata,
            &released,
            matches!(gate.total, Outcome::Released(_)),
        ));
        released_sets.retain(|set| !set.is_empty());
    }
    Decided {
        curves,
        summary: DisclosedTable {
            k,
            cells,
            total: gate.total,
            mechanisms,
            withheld_by_reason,
        },
        released_sets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stratum: events and censorings per interval, then the missing interval; events,
    /// censored, missing per interval.
    fn table(events: &[u64], censored: &[u64]) -> RawTable {
        let mut counts = Vec::new();
        for (event, censor) in events.iter().zip(censored) {
            counts.extend([*event, *censor, 0]);
        }
        counts.extend([0, 0, 0]);
        RawTable {
            shape: vec![events.len() + 1, 3],
            counts,
        }
    }

    fn holds(curve: &Curve, k: u64) {
        for interval in &curve.intervals {
            assert!(interval.at_risk >= k, "{interval:?}");
            for count in [interval.events, interval.censored] {
                assert!(count == 0 || count >= k, "{interval:?}");
            }
        }
    }

    #[test]
    fn an_interval_with_few_events_is_merged_with_the_next_not_dropped() {
        // Intervals from 0, 7, 14, 30: 3 events in the second.
        let raw = table(&[20, 3, 12, 0], &[10, 0, 15, 40]);
        let decided = decide(&raw, None, 10, None);
        let curve = &decided.curves[0];
        holds(curve, 10);
        let starts: Vec<usize> = curve.intervals.iter().map(|i| i.start).collect();
        assert_eq!(starts, [0, 1, 3], "7 and 14 merged");
        assert_eq!(curve.intervals[1].events, 15, "3 + 12: nothing dropped");
        assert_eq!(curve.intervals[0].at_risk, 100);
        let events: u64 = curve.intervals.iter().map(|i| i.events).sum();
        assert_eq!(events, 35);
        assert!(
            decided
                .summary
                .mechanisms
                .contains(&Mechanism::SmallCellSuppression)
        );
    }

    #[test]
    fn a_short_tail_joins_the_interval_before_and_at_risk_never_falls_below_k() {
        // Only 4 records remain at risk from the last interval on.
        let raw = table(&[20, 12, 0], &[30, 14, 4]);
        let curve = &decide(&raw, None, 10, None).curves[0];
        holds(curve, 10);
        assert_eq!(curve.intervals.last().unwrap().censored, 18);
    }

    #[test]
    fn a_stratum_with_too_few_events_overall_releases_no_curve() {
        let raw = table(&[3, 0], &[40, 30]);
        let decided = decide(&raw, None, 10, None);
        assert!(decided.curves[0].intervals.is_empty());
        assert_eq!(decided.summary.total, Outcome::Withheld);
    }
}
