//! The query engine: one node's loaded snapshots and policy, and the path every query takes
//! through them — verify, check, bind, compute, disclose, audit — in that order.

use std::collections::{BTreeMap, BTreeSet};

use fedq_proto::model::DataModel;
use fedq_proto::template::{Axis, Template, TemplateRef, Value};
use fedq_proto::wire;

use crate::NodeError;
use crate::audit::{self, AuditOutcome, AuditRecord};
use crate::config::{NodeConfig, Policy};
use crate::data::{self, Snapshot};
use crate::disclosure::{self, DisclosedTable};
use crate::limits::DailyLimits;
use crate::plan;
use crate::verify;

/// A loaded node: its identity, policy, data model and data snapshots.
#[derive(Debug)]
pub struct QueryEngine {
    pub site_id: String,
    pub policy: Policy,
    pub data_model: DataModel,
    snapshots: BTreeMap<String, Snapshot>,
    limits: DailyLimits,
}

/// What a study lead's request carries into the node, already out of its wire form.
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub request_id: String,
    pub template: Option<wire::SignedDocument>,
    pub parameters: Vec<wire::ParameterValue>,
    pub requester: String,
    pub study: Option<wire::SignedDocument>,
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
    study: Option<String>,
}

/// A released answer: only disclosed values.
#[derive(Debug, Clone)]
pub struct SiteAnswer {
    pub template: TemplateRef,
    pub snapshot_version: String,
    pub axes: Vec<Axis>,
    pub table: DisclosedTable,
}

impl QueryEngine {
    /// Loads every configured dataset. Returns the engine and warning lines for the log.
    pub fn load(config: &NodeConfig) -> Result<(QueryEngine, Vec<String>), NodeError> {
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
            match data::load(dataset, spec) {
                Ok((snapshot, mut found)) => {
                    warnings.append(&mut found);
                    snapshots.insert(dataset.name.clone(), snapshot);
                }
                Err(NodeError::Data(mut found)) => problems.append(&mut found),
                Err(other) => return Err(other),
            }
        }
        if !problems.is_empty() {
            return Err(NodeError::Data(problems));
        }
        if config.policy.trust.trusted.is_empty() {
            warnings.push(fedq_proto::signing::SignatureProblem::NoTrustedKeys.to_string());
        }
        let limits = DailyLimits::open(&config.state_dir)?;
        Ok((
            QueryEngine {
                site_id: config.site_id.clone(),
                policy: config.policy.clone(),
                data_model: config.data_model.clone(),
                snapshots,
                limits,
            },
            warnings,
        ))
    }

    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snapshots.values()
    }

    /// Runs one query for a caller presenting `caller_identities`, and records it in the audit
    /// log whatever the outcome.
    pub fn run(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
    ) -> Result<SiteAnswer, NodeError> {
        let caller = caller_identities.join(",");
        let mut seen = Seen::default();
        let result = self.answer(caller_identities, request, &mut seen);
        let reference = seen.template.as_ref().map(TemplateRef::of);
        let outcome = match &result {
            Ok(answer) => AuditOutcome::Released {
                cells_released: answer.table.cells.len() - answer.table.withheld_cells(),
                cells_withheld: answer.table.withheld_cells(),
                total_withheld: answer.table.total == disclosure::Outcome::Withheld,
            },
            Err(err) => AuditOutcome::Refused(err.refusal_code()),
        };
        audit::record(&AuditRecord {
            request_id: &request.request_id,
            caller: &caller,
            requester: &request.requester,
            study: seen.study.as_deref().unwrap_or(""),
            template: reference.as_ref().map(|reference| {
                (
                    reference.id.as_str(),
                    reference.version,
                    reference.content_hash.as_str(),
                )
            }),
            outcome,
        });
        result
    }

    fn answer(
        &self,
        caller_identities: &[String],
        request: &QueryRequest,
        seen: &mut Seen,
    ) -> Result<SiteAnswer, NodeError> {
        verify::authorize_caller(caller_identities, &self.policy.accepted_coordinators)?;
        let template: &Template = seen.template.insert(verify::open_template(
            request.template.as_ref(),
            &self.policy.trust,
        )?);
        if self.policy.refused_templates.contains(&template.id) {
            return Err(NodeError::TemplateRefusedBySite(template.id.clone()));
        }
        let study = verify::open_study(request.study.as_ref(), &self.policy.trust)?;
        seen.study = Some(study.id.clone());
        let today = chrono::Utc::now().date_naive();
        verify::check_study(
            &study,
            template,
            &self.site_id,
            &self.policy.accepted_studies,
            today,
        )?;
        let snapshot = self
            .snapshots
            .get(&template.dataset)
            .ok_or_else(|| NodeError::DatasetNotHeld(template.dataset.clone()))?;
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
        self.limits.admit(
            &study.id,
            study.max_queries_per_day,
            &retry_key(request, template),
            today,
        )?;
        let raw = plan::count_grid(&query, &checked.axes, snapshot).map_err(|err| {
            // Plans run over already-typed columns, so polars errors here describe the plan,
            // not data; still, only the error's kind is logged.
            tracing::error!(
                template_id = %template.id,
                error = %data::describe_polars_error(&err),
                "query plan failed"
            );
            NodeError::Engine
        })?;
        let k = disclosure::effective_k(self.policy.min_cell_count, template.min_cell_count);
        let table = disclosure::apply(&raw, k);
        Ok(SiteAnswer {
            template: TemplateRef::of(template),
            snapshot_version: snapshot.version.clone(),
            axes: checked.axes,
            table,
        })
    }
}
