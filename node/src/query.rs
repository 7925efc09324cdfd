//! The query engine: one node's loaded snapshots and policy, and the path every query takes
//! through them — verify, check, bind, compute, disclose, audit — in that order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use polars::prelude::{Column, PolarsError};

use fedq_proto::model::DataModel;
use fedq_proto::rational::Rational;
use fedq_proto::study::Study;
use fedq_proto::summary::Summary;
use fedq_proto::template::{Axis, Statistic, Template, TemplateRef, Value};
use fedq_proto::wire;

use crate::NodeError;
use crate::audit::record::{self, DocumentRef, Event, QueryEvent, TemplateRecord};
use crate::audit::register::{STUDY_DOCUMENT, TEMPLATE_DOCUMENT};
use crate::audit::{self, AuditLog};
use crate::config::{NodeConfig, Policy};
use crate::data::{self, Snapshot};
use crate::disclosure::{self, DisclosedTable, sections};
use crate::dp::{self, PrivacyBudget};
use crate::limits::DailyLimits;
use crate::overlap::{self, OverlapError, OverlapMemory};
use crate::plan;
use crate::records::{NodeSecret, RecordNumbers};
use crate::regression;
use crate::survival;
use crate::verify;
use fedq_proto::metrics::Metrics;

/// A loaded node: its identity, policy, data model and data snapshots.
#[derive(Debug)]
pub struct QueryEngine {
    pub site_id: String,
    pub policy: Policy,
    pub data_model: DataModel,
    /// The data: replaced whole by [`QueryEngine::reload_data`]; a query keeps the snapshots
    /// it started with.
    snapshots: RwLock<Arc<BTreeMap<String, Snapshot>>>,
    /// What a data reload needs: the configuration it was loaded with.
    config: NodeConfig,
    limits: DailyLimits,
    audit: AuditLog,
    /// Released record sets, when overlap control is on. The lock makes check-and-remember
    /// one step: of two concurrent near-identical queries, the second sees the first's sets.
    overlap: Option<Mutex<OverlapMemory>>,
    register_lock: Mutex<()>,
    /// The node's secret (keyed record hashes, noise seeds).
    secret: NodeSecret,
    /// Queries being computed, and the most allowed at once.
    running: AtomicUsize,
    most_running: usize,
    /// Epsilon spent per study and in all, when differential privacy is on.
    budget: Option<PrivacyBudget>,
    metrics: Metrics,
}

/// What a study lead's request carries into the node, already out of its wire form.
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub request_id: String,
    pub template: Option<wire::SignedDocument>,
    pub parameters: Vec<wire::ParameterValue>,
    pub requester: String,
    pub study: Option<wire::SignedDocument>,
    /// Logistic regression: the coefficients to evaluate at (empty: zero) and the iteration.
    pub coefficients: Vec<f64>,
    pub iteration: u32,
}

/// Loads every configured dataset (without touching the state directory). Returns the
/// snapshots by dataset name and warning lines for the log.
pub fn load_snapshots(
    config: &NodeConfig,
    secret: &NodeSecret,
) -> Result<(BTreeMap<String, Snapshot>, Vec<String>), NodeError> {
    let mut snapshots = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut problems = Vec::new();
    for dataset in &config.datasets {
        let Some(spec) = config.data_model.dataset(&dataset.name) else {
            problems.push(format!(
                "dataset '{}' is not in the data model",
                dataset.name
            ));
            continue;
        };
        match data::load(dataset, spec, secret) {
            Ok((snapshot, mut found)) => {
                warnings.append(&mut found);
                snapshots.insert(dataset.name.clone(), snapshot);
            }
            Err(NodeError::Data(mut found)) => problems.append(&mut found),
            Err(other) => return Err(other),
        }
    }
    if problems.is_empty() {
        Ok((snapshots, warnings))
    } else {
        Err(NodeError::Data(problems))
    }
}

/// Gives every snapshot's records their stable numbers (a column the plans read for overlap
/// control) and drops the keys.
fn number_records(
    state_dir: &std::path::Path,
    snapshots: &mut BTreeMap<String, Snapshot>,
) -> Result<(), NodeError> {
    let mut numbers = RecordNumbers::open(state_dir).map_err(|err| NodeError::Config(vec![err]))?;
    for snapshot in snapshots.values_mut() {
        let keys = std::mem::take(&mut snapshot.record_keys);
        let assigned = numbers
            .number(&keys)
            .map_err(|err| NodeError::Config(vec![err]))?;
        let column = Column::new(plan::RECORD_COLUMN.into(), assigned);
        snapshot.frame.with_column(column).map_err(|err| {
            NodeError::Data(vec![format!(
                "dataset '{}': cannot attach record numbers: {}",
                snapshot.dataset,
                data::describe_polars_error(&err)
            )])
        })?;
    }
    Ok(())
}

/// What identifies a retry: the same request id for the same template and the same parameter
/// values. Reusing a request id for a different question counts as a new query.
fn retry_key(request: &QueryRequest, template: &Template) -> String {
    use prost::Message;
    let mut bytes = Vec::new();
    let mut part = |part: &[u8]| {
        bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
        bytes.extend_from_slice(part);
    };
    part(request.request_id.as_bytes());
    part(template.content_hash().as_bytes());
    for parameter in &request.parameters {
        part(&parameter.encode_to_vec());
    }
    fedq_proto::template::content_hash(&bytes)
}

/// What verification established before a request ended, for its audit record.
#[derive(Debug, Default)]
struct Seen {
    template: Option<Template>,
    study: Option<Study>,
    snapshot_version: Option<String>,
    /// Epsilon this query spent (zero for a repeat), when differential privacy is on.
    epsilon_spent: Option<Rational>,
    /// Every parameter's effective value (given, or the template's default), once bound.
    effective: Option<Vec<(String, Value, bool)>>,
}

/// A released answer: only disclosed values.
#[derive(Debug, Clone)]
pub struct SiteAnswer {
    pub template: TemplateRef,
    pub snapshot_version: String,
    /// A count: its grid's axes. A profile: one axis per section.
    pub axes: Vec<Axis>,
    /// A count: one table over all axes. A profile: one one-way table per axis.
    pub tables: Vec<DisclosedTable>,
    /// A mean's moments per table, beside its released counts (withheld cells' are never
    /// sent).
    pub moments: Vec<Option<plan::CellMoments>>,
    /// A survival answer's released curves (its table only summarises them for the audit).
    pub curves: Option<Vec<survival::Curve>>,
    /// A logistic regression's part at the coefficients asked (sums only).
    pub regression: Option<regression::Part>,
    pub statistic: Statistic,
    /// The node's signed audit head including this query's record.
    pub audit_head: wire::SignedAuditHead,
    /// Differential privacy: the epsilon of the noise and each released cell's noise variance.
    pub noise: Option<(Rational, f64)>,
}

impl QueryEngine {
    /// Loads every configured dataset and opens the audit log. Returns the engine and warning
    /// lines for the log.
    pub fn load(config: &NodeConfig) -> Result<(QueryEngine, Vec<String>), NodeError> {
        let state_problem = |detail: String| NodeError::Config(vec![detail]);
        let secret = NodeSecret::open(&config.state_dir).map_err(state_problem)?;
        let (mut snapshots, mut warnings) = load_snapshots(config, &secret)?;
        let overlap = if config.policy.privacy.overlap_control {
            let setup = config
                .datasets
                .iter()
                .map(|dataset| (dataset.name.clone(), dataset.record_key.clone()))
                .collect();
            crate::records::check_key_setup(&config.state_dir, &setup).map_err(state_problem)?;
            number_records(&config.state_dir, &mut snapshots)?;
            Some(Mutex::new(
                OverlapMemory::open(
                    &config.state_dir,
                    config.policy.privacy.overlap_memory_bytes,
                )
                .map_err(state_problem)?,
            ))
        } else {
            None
        };
        let budget = match config.policy.privacy.differential_privacy {
            Some(_) => Some(PrivacyBudget::open(&config.state_dir).map_err(state_problem)?),
            None => None,
        };
        if config.policy.trust.trusted.is_empty() {
            warnings.push(fedq_proto::signing::SignatureProblem::NoTrustedKeys.to_string());
        }
        let limits = DailyLimits::open(&config.state_dir)?;
        let audit = AuditLog::open(
            &config.state_dir,
            &config.site_id,
            config.audit_segment_bytes,
        )
        .map_err(|err| NodeError::Config(vec![err.to_string()]))?;
        Ok((
            QueryEngine {
                site_id: config.site_id.clone(),
                policy: config.policy.clone(),
                data_model: config.data_model.clone(),
                snapshots: RwLock::new(Arc::new(snapshots)),
                config: config.clone(),
                limits,
                audit,
                overlap,
                register_lock: Mutex::new(()),
                secret,
                budget,
                running: AtomicUsize::new(0),
                most_running: config.max_concurrent_queries,
                metrics: Metrics::default(),
            },
            warnings,
        ))
    }

    /// The snapshots in use now.
    pub fn snapshots(&self) -> Arc<BTreeMap<String, Snapshot>> {
        Arc::clone(
            &self
                .snapshots
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Reads every dataset file again and swaps the new snapshots in once all loaded; queries
    /// already running finish on the old ones. On any problem the current data stays in use.
    /// Returns warning lines for the log.
    pub fn reload_data(&self) -> Result<Vec<String>, NodeError> {
        let (mut snapshots, warnings) = load_snapshots(&self.config, &self.secret)?;
        if self.overlap.is_some() {
            number_records(&self.config.state_dir, &mut snapshots)?;
        }
        *self
            .snapshots
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(snapshots);
        Ok(warnings)
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// A computing slot, if one is free: a node computes at most `max_concurrent_queries`
    /// queries at once and refuses the rest at once (no queue grows).
    pub fn take_slot(&self) -> Option<Slot<'_>> {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < self.most_running).then_some(running + 1)
            })
            .ok()
            .map(|_| Slot { engine: self })
    }

    /// Runs one query for a caller presenting `caller_identities` in `slot` (`None`: no slot
    /// was free, so it is refused as busy) unless the caller's `deadline` has passed, and
    /// records it in the audit log whatever the outcome. Nothing is returned unless the record
    /// is on disk: if it cannot be written, the query is refused.
    pub fn run(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
        slot: Option<Slot<'_>>,
        deadline: Option<std::time::Instant>,
    ) -> Result<SiteAnswer, NodeError> {
        let started = std::time::Instant::now();
        let mut seen = Seen::default();
        let result = match slot {
            // The caller stopped waiting before a slot was free: nothing is computed.
            Some(_) if deadline.is_some_and(|deadline| std::time::Instant::now() >= deadline) => {
                Err(NodeError::DeadlinePassed)
            }
            Some(_computing) => self.answer(caller_identities, request, &mut seen),
            None => Err(NodeError::Busy {
                most: self.most_running,
            }),
        };
        self.finish(caller_identities, request, &seen, result, started)
    }

    /// Records a request refused before the engine could look at it (for example in a
    /// protocol this node does not speak) and returns the refusal.
    pub fn refuse(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
        refusal: NodeError,
    ) -> NodeError {
        let started = std::time::Instant::now();
        match self.finish(
            caller_identities,
            request,
            &Seen::default(),
            Err(refusal),
            started,
        ) {
            Err(err) => err,
            Ok(_) => NodeError::Engine,
        }
    }

    /// Audits a request's outcome (durably, before anything is returned) and builds the
    /// answer.
    fn finish(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
        seen: &Seen,
        result: Result<(Computed, Vec<DisclosedTable>), NodeError>,
        started: std::time::Instant,
    ) -> Result<SiteAnswer, NodeError> {
        let event = query_event(caller_identities, request, seen, &result);
        audit::trace(&event);
        self.measure(&event, started.elapsed());
        let head = self
            .keep_documents(seen)
            .and_then(|()| self.audit.append(Event::Query(Box::new(event))))
            .map_err(|err| {
                tracing::error!(request_id = %audit::bounded(&request.request_id), error = %err, "audit record not written; query refused");
                NodeError::AuditUnavailable
            })?;
        result.map(|(answer, tables)| SiteAnswer {
            template: answer.template,
            snapshot_version: answer.snapshot_version,
            axes: answer.axes,
            tables,
            moments: answer.moments,
            curves: answer.curves,
            regression: answer.regression,
            statistic: answer.statistic,
            audit_head: head,
            noise: answer.noise,
        })
    }

    /// Counts one request in the node's metrics (outcomes and refusal reasons only).
    fn measure(&self, event: &QueryEvent, took: std::time::Duration) {
        let (outcome, reason) = match &event.refusal {
            None => ("released", "none"),
            Some(refusal) => ("refused", refusal.code.as_str()),
        };
        self.metrics.count(
            "fedq_node_queries_total",
            "Query requests by outcome and refusal reason.",
            &[("outcome", outcome), ("reason", reason)],
            1,
        );
        self.metrics.count(
            "fedq_node_cells_released_total",
            "Cells released.",
            &[],
            event.cells_released,
        );
        // Not by reason: a scrape before and after one query would show how many of its
        // withheld cells were small, which the answer itself keeps to itself (the reasons are
        // in the audit log only).
        self.metrics.count(
            "fedq_node_cells_withheld_total",
            "Cells withheld (each cell's reason is in the audit log only).",
            &[],
            event.cells_withheld.values().sum(),
        );
        self.metrics.observe(
            "fedq_node_query_seconds",
            "Time from a request reaching the engine to its audit record, by outcome.",
            &[("outcome", outcome)],
            took,
        );
    }

    /// Remembered released sets, the counts derived from them, the released sets whose
    /// derived counts were cut at the bound, and the sets' bytes, when overlap control is on.
    pub fn overlap_memory(&self) -> Option<(usize, usize, usize, u64)> {
        let memory = self.overlap.as_ref()?.lock().ok()?;
        Some((memory.len(), memory.derived(), memory.cut(), memory.bytes()))
    }

    /// Outbound mode: whether a connection to the coordinator is open (a metric).
    pub fn set_outbound_connected(&self, connected: bool) {
        self.metrics.set(
            "fedq_node_outbound_connected",
            "Outbound mode: 1 while a connection to the coordinator is open.",
            &[],
            i64::from(connected),
        );
    }

    /// The node's metrics in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.metrics.set(
            "fedq_node_audit_records",
            "Records in the audit log.",
            &[],
            i64::try_from(self.audit.head().count).unwrap_or(i64::MAX),
        );
        if let Some(memory) = &self.overlap
            && let Ok(memory) = memory.lock()
        {
            self.metrics.set(
                "fedq_node_overlap_memory_bytes",
                "Bytes the remembered released record sets take.",
                &[],
                i64::try_from(memory.bytes()).unwrap_or(i64::MAX),
            );
            self.metrics.set(
                "fedq_node_overlap_memory_sets",
                "Remembered released record sets.",
                &[],
                i64::try_from(memory.len()).unwrap_or(i64::MAX),
            );
            self.metrics.set(
                "fedq_node_overlap_derived_counts",
                "Counts derived from nested released sets (differences), remembered in memory.",
                &[],
                i64::try_from(memory.derived()).unwrap_or(i64::MAX),
            );
            self.metrics.set(
                "fedq_node_overlap_cut_releases",
                "Released sets that made more counts derivable than the node follows (16); \
                 chains through the rest are not tracked (PRIVACY.md).",
                &[],
                i64::try_from(memory.cut()).unwrap_or(i64::MAX),
            );
        }
        if let Some(budget) = &self.budget {
            self.metrics.set(
                "fedq_node_epsilon_spent_milli",
                "Differential-privacy epsilon spent at this site over all studies, in thousandths.",
                &[],
                (budget.node_spent().approximate() * 1000.0) as i64,
            );
        }
        self.metrics.set(
            "fedq_node_queries_running",
            "Queries being computed now.",
            &[],
            i64::try_from(self.running.load(Ordering::Acquire)).unwrap_or(i64::MAX),
        );
        self.metrics.render()
    }

    /// The site's transparency register, from its audit log (one at a time: it reads the
    /// whole log).
    pub fn transparency_register(&self) -> Result<wire::SiteRegister, NodeError> {
        let _one_at_a_time = self.register_lock.lock().map_err(|_| NodeError::Engine)?;
        let records = audit::verify::records(self.audit.dir()).map_err(|err| {
            tracing::error!(error = %err, "cannot read the audit log for the transparency register");
            NodeError::AuditUnavailable
        })?;
        Ok(audit::register::build(
            self.audit.dir(),
            &self.site_id,
            &records,
        ))
    }

    /// Keeps the verified template and study the record refers to.
    fn keep_documents(&self, seen: &Seen) -> Result<(), audit::AuditError> {
        if let Some(template) = &seen.template {
            self.audit.keep_document(
                TEMPLATE_DOCUMENT,
                &template.content_hash(),
                &template.canonical_bytes(),
            )?;
        }
        if let Some(study) = &seen.study {
            self.audit.keep_document(
                STUDY_DOCUMENT,
                &study.content_hash(),
                &study.canonical_bytes(),
            )?;
        }
        Ok(())
    }

    fn answer(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
        seen: &mut Seen,
    ) -> Result<(Computed, Vec<DisclosedTable>), NodeError> {
        verify::authorize_caller(caller_identities, &self.policy.accepted_coordinators)?;
        let template: &Template = seen.template.insert(verify::open_template(
            request.template.as_ref(),
            &self.policy.trust,
        )?);
        if self.policy.refused_templates.contains(&template.id) {
            return Err(NodeError::TemplateRefusedBySite(template.id.clone()));
        }
        let study: &Study = seen.study.insert(verify::open_study(
            request.study.as_ref(),
            &self.policy.trust,
        )?);
        let today = chrono::Utc::now().date_naive();
        verify::check_study(
            study,
            template,
            &self.site_id,
            &self.policy.accepted_studies,
            today,
        )?;
        let snapshots = self.snapshots();
        let snapshot = snapshots
            .get(&template.dataset)
            .ok_or_else(|| NodeError::DatasetNotHeld(template.dataset.clone()))?;
        seen.snapshot_version = Some(snapshot.version.clone());
        let checked = template.check(&self.data_model, &BTreeSet::new())?;
        if let Some(column) = template
            .columns_used()
            .into_iter()
            .find(|column| !snapshot.columns.contains(column))
        {
            return Err(NodeError::ColumnNotHeld {
                template: template.id.clone(),
                dataset: template.dataset.clone(),
                column,
            });
        }
        let values: Vec<(String, Value)> = request
            .parameters
            .iter()
            .map(fedq_proto::convert::parameter_from_wire)
            .collect::<Result<_, _>>()?;
        let query = checked.bind(&values)?;
        seen.effective = checked.effective_parameters(&values).ok();
        self.limits.admit(
            &study.id,
            study.max_queries_per_day,
            &retry_key(request, template),
            today,
        )?;
        let plan_failed = |err: PolarsError| {
            // Plans run over already-typed columns, so polars errors here describe the plan,
            // not data; still, only the error's kind is logged.
            tracing::error!(
                template_id = %template.id,
                error = %data::describe_polars_error(&err),
                "query plan failed"
            );
            NodeError::Engine
        };
        let without_noise = matches!(
            template.statistic,
            Statistic::Mean { .. } | Statistic::Survival { .. } | Statistic::Logistic { .. }
        );
        if without_noise && self.policy.privacy.differential_privacy.is_some() {
            return Err(NodeError::StatisticNotUnderDp {
                statistic: template.statistic.name().to_string(),
            });
        }
        if matches!(
            template.statistic,
            Statistic::Mean { .. } | Statistic::Survival { .. } | Statistic::Logistic { .. }
        ) && self.policy.privacy.rounding_base > 0
        {
            return Err(NodeError::StatisticNotRounded {
                statistic: template.statistic.name().to_string(),
            });
        }
        // Differential privacy: charge the budget first (a repeat of a paid query is free).
        let content = checked.canonical_content(&values)?;
        let noise_epsilon = match (&self.budget, self.policy.privacy.differential_privacy) {
            (Some(budget), Some(policy)) => {
                let (epsilon, study_budget) = match &study.differential_privacy {
                    Some(own) => (
                        own.epsilon_per_query,
                        own.total_epsilon.min(policy.study_epsilon),
                    ),
                    None => (policy.epsilon_per_query, policy.study_epsilon),
                };
                let key = fedq_proto::template::content_hash(
                    &[content.as_slice(), b"\0", snapshot.version.as_bytes()].concat(),
                );
                seen.epsilon_spent = Some(budget.charge(
                    &key,
                    dp::Charge {
                        study: &study.id,
                        epsilon,
                        study_budget,
                        node_budget: policy.node_epsilon,
                    },
                )?);
                Some(epsilon)
            }
            _ => None,
        };
        let k = disclosure::effective_k(self.policy.min_cell_count, template.min_cell_count);
        if matches!(template.statistic, Statistic::Logistic { .. }) {
            return self.regression_step(
                request,
                &query,
                template,
                &query.axes,
                snapshot,
                &study.id,
                k,
            );
        }
        let computed =
            plan::tables(&query, snapshot, self.overlap.is_some()).map_err(plan_failed)?;
        let mut raws = Vec::with_capacity(computed.len());
        let mut tables = Vec::with_capacity(computed.len());
        let mut moments = Vec::with_capacity(computed.len());
        // Overlap control holds the memory's lock across every table's check and remember, so
        // concurrent near-duplicates cannot both pass; a profile's later sections are also
        // checked against its earlier ones.
        let mut memory = match &self.overlap {
            Some(memory) => Some(memory.lock().map_err(|_| NodeError::Engine)?),
            None => None,
        };
        // A profile's sections are also checked against each other: no union of one may come
        // within 1 to k-1 records of a union of an earlier one (see disclosure::sections).
        let mut partitions: Vec<Vec<sections::Part>> = Vec::new();
        let mut curves = None;
        // Cells empty by the query's own definition (a reader knows they are zero); a
        // profile's sections are one-way tables of their own, with every level possible.
        let empty = if template.statistic.is_profile() {
            Vec::new()
        } else {
            query.empty_cells()
        };
        for computed in computed {
            if matches!(template.statistic, Statistic::Survival { .. }) {
                let decided =
                    survival::decide(&computed.raw, computed.sets.as_ref(), k, memory.as_deref());
                if let Some(memory) = memory.as_deref_mut() {
                    self.remember(memory, &study.id, decided.released_sets)?;
                }
                curves = Some(decided.curves);
                raws.push(computed.raw);
                tables.push(decided.summary);
                moments.push(None);
                continue;
            }
            let cells = computed.raw.counts.len();
            let percent = self.policy.privacy.dominance_percent;
            let mut forced = dominated_cells(computed.moments.as_ref(), percent);
            forced.resize(cells, None);
            // A total one value dominates is withheld too (and so not derivable from cells).
            let total_dominated = percent > 0
                && computed
                    .moments
                    .as_ref()
                    .is_some_and(|moments| dominated(&moments.total, percent));
            let table = loop {
                let (table, released_sets) = match (memory.as_deref_mut(), &computed.sets) {
                    (Some(memory), Some(sets)) => {
                        let decided = overlap::decide(
                            &computed.raw,
                            sets,
                            k,
                            memory,
                            &forced,
                            total_dominated,
                            &empty,
                        );
                        (decided.table, Some(decided.released_sets))
                    }
                    _ => (
                        disclosure::apply_knowing(
                            &computed.raw,
                            k,
                            &forced,
                            total_dominated,
                            &empty,
                        ),
                        None,
                    ),
                };
                if let (true, Some(sets)) = (template.statistic.is_profile(), &computed.sets) {
                    let released: Vec<bool> = table
                        .cells
                        .iter()
                        .map(|cell| matches!(cell, disclosure::Outcome::Released(_)))
                        .collect();
                    let parts = sections::partition(&released, sets);
                    let close = partitions
                        .iter()
                        .find_map(|earlier| sections::too_close(earlier, &parts, k));
                    if let Some(candidates) = close {
                        // Withhold one more cell (every released one if no single one helps)
                        // and decide the section again.
                        let chosen: Vec<usize> = match candidates.first() {
                            Some(&cell) => vec![cell],
                            None => (0..cells).filter(|&cell| released[cell]).collect(),
                        };
                        if chosen.is_empty() {
                            return Err(NodeError::Engine);
                        }
                        for cell in chosen {
                            forced[cell] = Some(disclosure::Reason::Overlap);
                        }
                        continue;
                    }
                    partitions.push(parts);
                }
                if let (Some(memory), Some(released_sets)) = (memory.as_deref_mut(), released_sets)
                {
                    self.remember(memory, &study.id, released_sets)?;
                }
                break table;
            };
            raws.push(computed.raw);
            tables.push(table);
            moments.push(computed.moments);
        }
        drop(memory);
        // Every suppression decision was made on true counts; noise and rounding now act on
        // what is released. A record counts once in every table, so the query's epsilon is
        // shared between them.
        let noise = match noise_epsilon {
            Some(epsilon) => {
                let share = epsilon
                    .divided_by(tables.len() as u64)
                    .ok_or(NodeError::Engine)?;
                let mut rng = dp::noise_generator(&self.secret, &content, &snapshot.version);
                let mut variance = 0.0;
                for (table, raw) in tables.iter_mut().zip(&raws) {
                    variance = dp::add_noise(table, &raw.counts, share, &mut rng);
                }
                Some((share, variance))
            }
            None => None,
        };
        for table in &mut tables {
            disclosure::round_released(table, self.policy.privacy.rounding_base);
        }
        Ok((
            Computed {
                template: TemplateRef::of(template),
                statistic: template.statistic.clone(),
                moments,
                curves,
                regression: None,
                snapshot_version: snapshot.version.clone(),
                axes: query.axes,
                noise,
            },
            tables,
        ))
    }

    /// One Newton-Raphson evaluation of a logistic regression: within the site's iteration cap,
    /// safe (see [`regression`]), and with overlap control not too close to anything released
    /// before; its records are then remembered.
    #[allow(clippy::too_many_arguments)]
    fn regression_step(
        &self,
        request: &QueryRequest,
        query: &fedq_proto::template::BoundQuery,
        template: &Template,
        axes: &[Axis],
        snapshot: &Snapshot,
        study: &str,
        k: u32,
    ) -> Result<(Computed, Vec<DisclosedTable>), NodeError> {
        let most = self.policy.privacy.regression_iterations;
        if request.iteration >= most {
            return Err(NodeError::RegressionRefused(format!(
                "this site evaluates at most {most} iterations of a regression (privacy.regression_iterations)"
            )));
        }
        let part = regression::evaluate(query, snapshot, &request.coefficients, k)?;
        if let (Some(memory), Some(records)) = (&self.overlap, &part.record_set) {
            let mut memory = memory.lock().map_err(|_| NodeError::Engine)?;
            if memory.too_close(records, k) {
                return Err(NodeError::RegressionRefused(
                    "its records differ from a result this site released before by fewer than k (query-set overlap control)".into(),
                ));
            }
            self.remember(&mut memory, study, vec![records.clone()])?;
        }
        let summary = DisclosedTable {
            k,
            cells: vec![disclosure::Outcome::Released(part.records)],
            total: disclosure::Outcome::Released(part.records),
            mechanisms: Default::default(),
            withheld_by_reason: Default::default(),
        };
        Ok((
            Computed {
                template: TemplateRef::of(template),
                statistic: template.statistic.clone(),
                moments: Vec::new(),
                curves: None,
                regression: Some(part),
                snapshot_version: snapshot.version.clone(),
                axes: axes.to_vec(),
                noise: None,
            },
            vec![summary],
        ))
    }

    /// Remembers a table's released record sets in the overlap memory, refusing the query
    /// when the memory or the study's share of it is full, or cannot be written.
    fn remember(
        &self,
        memory: &mut OverlapMemory,
        study: &str,
        released_sets: Vec<impl Into<overlap::Release>>,
    ) -> Result<(), NodeError> {
        let share = self.policy.privacy.overlap_memory_bytes / 100
            * u64::from(self.policy.privacy.overlap_study_share_percent);
        memory
            .remember_for_study(study, share, released_sets)
            .map_err(|err| match err {
                OverlapError::Full { used_mb, limit_mb } => {
                    NodeError::OverlapMemoryFull { used_mb, limit_mb }
                }
                OverlapError::StudyShare {
                    study,
                    used_mb,
                    share_mb,
                } => NodeError::OverlapStudyShare {
                    study,
                    used_mb,
                    share_mb,
                },
                OverlapError::Write(detail) => {
                    tracing::error!(%detail, "overlap memory not written; query refused");
                    NodeError::StateUnwritable
                }
            })
    }
}

/// Whether one value dominates a cell: it is more than `percent` of the cell's sum, or its
/// square more than `percent` of the sum of squares (which the released mean and spread
/// would otherwise bound it by).
fn dominated(cell: &plan::Moments, percent: u32) -> bool {
    let share = f64::from(percent) / 100.0;
    let Summary { n, mean, m2 } = cell.summary;
    let squares = m2 + n as f64 * mean * mean;
    n > 0 && (cell.largest > share * cell.sum.abs() || cell.largest.powi(2) > share * squares)
}

/// The cells the dominance rule withholds: one value above `percent` of the cell's sum (off
/// at 0, and for statistics without moments).
fn dominated_cells(
    moments: Option<&plan::CellMoments>,
    percent: u32,
) -> Vec<Option<disclosure::Reason>> {
    let Some(moments) = moments.filter(|_| percent > 0) else {
        return Vec::new();
    };
    moments
        .cells
        .iter()
        .map(|cell| dominated(cell, percent).then_some(disclosure::Reason::Dominance))
        .collect()
}

/// One of the node's computing slots, given back when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    engine: &'a QueryEngine,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.engine.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a computed answer is about, before its audit record is written.
#[derive(Debug)]
struct Computed {
    template: TemplateRef,
    statistic: Statistic,
    /// A mean's moments per table (true values; only released cells' are sent).
    moments: Vec<Option<plan::CellMoments>>,
    /// A survival answer's released curves.
    curves: Option<Vec<survival::Curve>>,
    /// A logistic regression's part.
    regression: Option<regression::Part>,
    snapshot_version: String,
    axes: Vec<Axis>,
    noise: Option<(Rational, f64)>,
}

/// The audit facts of one request.
fn query_event(
    caller_identities: &[String],
    request: &QueryRequest,
    seen: &Seen,
    result: &Result<(Computed, Vec<DisclosedTable>), NodeError>,
) -> QueryEvent {
    let caller_refused = matches!(result, Err(NodeError::CallerNotAccepted { .. }));
    let (outcome, refusal, cells_released, cells_withheld, total_withheld) = match result {
        Ok((_, tables)) => {
            let cells: usize = tables.iter().map(|table| table.cells.len()).sum();
            let withheld: usize = tables.iter().map(DisclosedTable::withheld_cells).sum();
            let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
            for (reason, count) in tables.iter().flat_map(|table| &table.withheld_by_reason) {
                *by_reason.entry(reason.name().to_string()).or_default() += count;
            }
            (
                record::Outcome::Released,
                None,
                (cells - withheld) as u64,
                by_reason,
                tables
                    .iter()
                    .any(|table| table.total == disclosure::Outcome::Withheld),
            )
        }
        Err(err) => (
            record::Outcome::Refused,
            Some(record::Refusal {
                code: err.refusal_code().as_str_name().to_string(),
                message: audit::bounded_message(&err.to_string()),
            }),
            0,
            BTreeMap::new(),
            false,
        ),
    };
    QueryEvent {
        request_id: audit::bounded(&request.request_id),
        caller: audit::bounded(&caller_identities.join(",")),
        requester: audit::bounded(&request.requester),
        study: seen.study.as_ref().map(|study| DocumentRef {
            id: study.id.clone(),
            content_hash: study.content_hash(),
        }),
        study_named: if seen.study.is_some() || caller_refused {
            None
        } else {
            request
                .study
                .as_ref()
                .and_then(|document| fedq_proto::document::open_study(document).ok())
                .map(|study| audit::bounded(&study.id))
        },
        template: seen.template.as_ref().map(|template| TemplateRecord {
            id: template.id.clone(),
            version: template.version,
            content_hash: template.content_hash(),
        }),
        // A caller this node does not accept gets a short record: what it sent is not kept.
        parameters: match (&seen.effective, caller_refused) {
            (_, true) => BTreeMap::new(),
            // Once bound: every effective value, the template's defaults marked.
            (Some(effective), false) => effective
                .iter()
                .map(|(name, value, given)| {
                    let value = audit::bounded(&value.to_string());
                    let text = if *given {
                        value
                    } else {
                        format!("{value} (default)")
                    };
                    (name.clone(), text)
                })
                .collect(),
            (None, false) => audit::parameters_of(&request.parameters),
        },
        outcome,
        refusal,
        snapshot_version: seen.snapshot_version.clone(),
        epsilon_spent: seen.epsilon_spent.map(|epsilon| epsilon.to_string()),
        cells_released,
        cells_withheld,
        total_withheld,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_proto::summary::Summary;

    fn cell(n: u64, sum: f64, largest: f64) -> plan::Moments {
        plan::Moments {
            summary: Summary {
                n,
                mean: sum / n as f64,
                m2: 0.0,
            },
            sum,
            largest,
        }
    }

    #[test]
    fn the_dominance_rule_withholds_cells_one_value_dominates_and_is_off_at_zero() {
        let moments = plan::CellMoments {
            // One stay of 90 days among ten with 100 in all; ten ordinary stays.
            cells: vec![
                cell(10, 100.0, 90.0),
                cell(10, 100.0, 15.0),
                cell(0, 0.0, 0.0),
            ],
            total: cell(20, 200.0, 90.0),
        };
        assert_eq!(
            dominated_cells(Some(&moments), 80),
            [Some(disclosure::Reason::Dominance), None, None]
        );
        assert!(dominated_cells(Some(&moments), 0).is_empty(), "off");
        // One stay of 50 among nine of 50/9: half the sum, but most of the sum of squares
        // (which the mean and spread would otherwise pin it down by).
        let values: Vec<f64> = std::iter::once(50.0).chain([50.0 / 9.0; 9]).collect();
        let mean = 10.0;
        let m2: f64 = values.iter().map(|value| (value - mean).powi(2)).sum();
        let squared = plan::Moments {
            summary: Summary { n: 10, mean, m2 },
            sum: 100.0,
            largest: 50.0,
        };
        assert!(dominated(&squared, 80), "by its square");
        assert!(!dominated(&squared, 95));
        assert!(
            dominated_cells(None, 80).is_empty(),
            "counts have no moments"
        );
    }
}
