//! Pooling per-site answers into one result: a cell's pooled count is the sum of the counts the
//! sites released; every pooled cell says how many sites released and how many withheld it, and
//! a cell that any answering site withheld is marked incomplete — its sum is a lower bound,
//! never presented as exact. Pooling is linear in sites × cells.

use fedq_proto::summary::Summary;
use fedq_proto::template::{Axis, Statistic, TemplateRef};
use fedq_proto::wire;

/// One site's answer in domain form: `None` is a withheld value.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteCells {
    pub cells: Vec<Option<u64>>,
    pub total: Option<u64>,
    /// For a mean: each released cell's summary (and the total's).
    pub summaries: Vec<Option<Summary>>,
    pub total_summary: Option<Summary>,
    /// Noise variance of each released cell and of the total (0 without noise).
    pub cell_variance: f64,
    pub total_variance: f64,
}

/// A pooled cell.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PooledCell {
    /// Sum of released counts; `None` when no site released the cell.
    pub count: Option<u64>,
    pub sites_released: u32,
    pub sites_withheld: u32,
    /// Sum of the releasing sites' noise variances.
    pub noise_variance: f64,
    /// For a mean: the releasing sites' summaries pooled.
    pub summary: Option<Summary>,
}

impl PooledCell {
    /// True only when every answering site released the cell.
    pub fn complete(&self) -> bool {
        self.sites_withheld == 0 && self.sites_released > 0
    }

    fn add(&mut self, value: Option<u64>, variance: f64, summary: Option<Summary>) {
        match value {
            Some(count) => {
                self.count = Some(self.count.unwrap_or(0) + count);
                self.sites_released += 1;
                self.noise_variance += variance;
                if let Some(summary) = summary {
                    self.summary = Some(self.summary.unwrap_or_default().combine(summary));
                }
            }
            None => self.sites_withheld += 1,
        }
    }
}

/// The pooled grid.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledTable {
    pub cells: Vec<PooledCell>,
    pub total: PooledCell,
}

/// No site holds more records than this; a larger count is a faulty or hostile answer (and
/// sums of plausible counts cannot overflow).
const MAX_PLAUSIBLE_COUNT: u64 = 1 << 40;

/// A released mean cell's summary; `count` is its number of values.
fn summary_of(cell: &wire::Cell, count: u64) -> Result<Option<Summary>, String> {
    let Some(wire::cell::Outcome::Released(released)) = &cell.outcome else {
        return Ok(None);
    };
    match &released.summary {
        Some(summary)
            if summary.mean.is_finite() && summary.m2.is_finite() && summary.m2 >= 0.0 =>
        {
            Ok(Some(Summary {
                n: count,
                mean: summary.mean,
                m2: summary.m2,
            }))
        }
        Some(_) => Err("the site sent an invalid mean or variance".into()),
        None => Err("the site released a mean cell without its mean".into()),
    }
}

fn released(cell: &wire::Cell) -> Result<Option<u64>, String> {
    match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) if released.count > MAX_PLAUSIBLE_COUNT => {
            Err(format!(
                "the site sent an implausible count ({})",
                released.count
            ))
        }
        Some(wire::cell::Outcome::Released(released)) => Ok(Some(released.count)),
        Some(wire::cell::Outcome::Withheld(_)) => Ok(None),
        None => Err("a cell has neither a released value nor a withheld mark".into()),
    }
}

impl SiteCells {
    /// Checks that a site answered the template and tables that were asked, and converts each
    /// table: a count's one grid over `axes`, or a profile's one section per axis.
    pub fn tables_from_wire(
        result: &wire::SiteResult,
        template: &TemplateRef,
        statistic: &Statistic,
        axes: &[Axis],
    ) -> Result<Vec<SiteCells>, String> {
        let answered = result
            .template
            .as_ref()
            .map(|reference| reference.content_hash.as_str());
        if answered != Some(template.content_hash.as_str()) {
            return Err("the site answered a different template version".into());
        }
        let cell_variance = match &result.noise {
            Some(noise) if noise.cell_variance.is_finite() && noise.cell_variance >= 0.0 => {
                noise.cell_variance
            }
            Some(_) => return Err("the site sent an invalid noise variance".into()),
            None => 0.0,
        };
        match statistic {
            Statistic::Count
            | Statistic::Histogram { .. }
            | Statistic::Mean { .. }
            | Statistic::TwoByTwo { .. } => {
                if !result.sections.is_empty() {
                    return Err("the site sent profile sections for a count".into());
                }
                let table = WireTable {
                    axes: &result.axes,
                    cells: &result.cells,
                    total: result.total.as_ref(),
                };
                let mut converted = table.convert(axes, cell_variance)?;
                if matches!(statistic, Statistic::Mean { .. }) {
                    converted.add_summaries(&result.cells, result.total.as_ref())?;
                }
                Ok(vec![converted])
            }
            Statistic::Survival { grid, .. } => {
                let wire_axes: Vec<wire::Axis> = axes.iter().map(Into::into).collect();
                if result.axes != wire_axes || !result.cells.is_empty() {
                    return Err("the site answered on a different grid of strata".into());
                }
                let strata: Vec<usize> = axes[..axes.len().saturating_sub(2)]
                    .iter()
                    .map(|axis| axis.levels.len())
                    .collect();
                crate::survival::validate(&result.curves, &strata, grid.len())?;
                // Nothing is pooled cell by cell: the curves are pooled on their own.
                Ok(Vec::new())
            }
            Statistic::Logistic { .. } => {
                // The fit validates and sums each iteration's parts itself.
                Ok(Vec::new())
            }
            Statistic::Profile => {
                if result.sections.len() != axes.len() {
                    return Err(format!(
                        "the site sent {} profile sections; the template has {}",
                        result.sections.len(),
                        axes.len()
                    ));
                }
                result
                    .sections
                    .iter()
                    .zip(axes)
                    .map(|(section, axis)| {
                        let table = WireTable {
                            axes: std::slice::from_ref(
                                section
                                    .axis
                                    .as_ref()
                                    .ok_or("a profile section has no axis")?,
                            ),
                            cells: &section.cells,
                            total: section.total.as_ref(),
                        };
                        table.convert(std::slice::from_ref(axis), cell_variance)
                    })
                    .collect()
            }
        }
    }
}

/// One table as a site sent it.
struct WireTable<'a> {
    axes: &'a [wire::Axis],
    cells: &'a [wire::Cell],
    total: Option<&'a wire::Cell>,
}

impl WireTable<'_> {
    /// Checks the table against the asked `axes` (grid, order) and converts it.
    fn convert(&self, axes: &[Axis], cell_variance: f64) -> Result<SiteCells, String> {
        let wire_axes: Vec<wire::Axis> = axes.iter().map(Into::into).collect();
        if self.axes != wire_axes {
            return Err("the site answered on a different grid of strata".into());
        }
        let shape: Vec<usize> = axes.iter().map(|axis| axis.levels.len()).collect();
        let expected: usize = shape.iter().product();
        if self.cells.len() != expected {
            return Err(format!(
                "the site sent {} cells; the grid has {expected}",
                self.cells.len()
            ));
        }
        let mut cells = Vec::with_capacity(expected);
        for (index, cell) in self.cells.iter().enumerate() {
            if cell.coordinates != fedq_proto::template::cell_coordinates(&shape, index) {
                return Err("the site's cells are not in grid order".into());
            }
            cells.push(released(cell)?);
        }
        let total = released(self.total.ok_or("the site sent no total")?)?;
        Ok(SiteCells {
            total_variance: cell_variance * expected as f64,
            cells,
            total,
            cell_variance,
            summaries: Vec::new(),
            total_summary: None,
        })
    }
}

impl SiteCells {
    /// Reads a mean's summaries beside the released counts already converted.
    fn add_summaries(
        &mut self,
        cells: &[wire::Cell],
        total: Option<&wire::Cell>,
    ) -> Result<(), String> {
        self.summaries = cells
            .iter()
            .zip(&self.cells)
            .map(|(cell, count)| match count {
                Some(count) => summary_of(cell, *count),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        self.total_summary = match (total, self.total) {
            (Some(cell), Some(count)) => summary_of(cell, count)?,
            _ => None,
        };
        Ok(())
    }
}

/// Pools the answers of the sites that answered.
pub fn pool(cell_count: usize, answers: &[&SiteCells]) -> PooledTable {
    let mut cells = vec![PooledCell::default(); cell_count];
    let mut total = PooledCell::default();
    for answer in answers {
        for (index, (pooled, value)) in cells.iter_mut().zip(&answer.cells).enumerate() {
            let summary = answer.summaries.get(index).copied().flatten();
            pooled.add(*value, answer.cell_variance, summary);
        }
        total.add(answer.total, answer.total_variance, answer.total_summary);
    }
    PooledTable { cells, total }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_cells_are_summed_and_withheld_ones_mark_the_cell_incomplete() {
        let a = SiteCells {
            cells: vec![Some(100), Some(20), None],
            total: None,
            cell_variance: 0.0,
            total_variance: 0.0,
            summaries: Vec::new(),
            total_summary: None,
        };
        let b = SiteCells {
            cells: vec![Some(50), None, None],
            total: None,
            cell_variance: 0.0,
            total_variance: 0.0,
            summaries: Vec::new(),
            total_summary: None,
        };
        let pooled = pool(3, &[&a, &b]);
        assert_eq!(
            pooled.cells[0],
            PooledCell {
                count: Some(150),
                sites_released: 2,
                sites_withheld: 0,
                noise_variance: 0.0,
                summary: None,
            }
        );
        assert!(pooled.cells[0].complete());
        assert_eq!(
            pooled.cells[1],
            PooledCell {
                count: Some(20),
                sites_released: 1,
                sites_withheld: 1,
                noise_variance: 0.0,
                summary: None,
            }
        );
        assert!(!pooled.cells[1].complete());
        assert_eq!(
            pooled.cells[2],
            PooledCell {
                count: None,
                sites_released: 0,
                sites_withheld: 2,
                noise_variance: 0.0,
                summary: None,
            }
        );
        assert_eq!(pooled.total.count, None);
    }

    #[test]
    fn noise_variances_add_up_over_the_sites_that_released_a_cell() {
        let noisy = SiteCells {
            cells: vec![Some(100), None],
            total: Some(130),
            cell_variance: 2.5,
            total_variance: 5.0,
            summaries: Vec::new(),
            total_summary: None,
        };
        let plain = SiteCells {
            cells: vec![Some(40), Some(12)],
            total: Some(52),
            cell_variance: 0.0,
            total_variance: 0.0,
            summaries: Vec::new(),
            total_summary: None,
        };
        let pooled = pool(2, &[&noisy, &noisy, &plain]);
        assert_eq!(pooled.cells[0].noise_variance, 5.0);
        assert_eq!(
            pooled.cells[1].noise_variance, 0.0,
            "only released parts count"
        );
        assert_eq!(pooled.total.noise_variance, 10.0);
    }

    #[test]
    fn no_answering_site_means_no_value_and_not_complete() {
        let pooled = pool(2, &[]);
        assert_eq!(pooled.cells[0].count, None);
        assert!(!pooled.cells[0].complete());
    }
}
