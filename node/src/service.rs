//! The `fedq.v1.Node` gRPC service: reads the caller's certificate identity, hands the request
//! to the [`QueryEngine`] on a blocking thread, and converts the answer — or the error, through
//! [`status_of`], the one mapping from [`NodeError`] to a gRPC status — into wire form.

use std::sync::Arc;

use std::collections::BTreeSet;

use fedq_proto::template::{Axis, cell_coordinates};
use fedq_proto::wire::{self, node_server::Node};
use prost::Message;
use tonic::{Code, Request, Response, Status};

use crate::NodeError;
use crate::disclosure::{DisclosedTable, Outcome};
use crate::plan::{CellMoments, Moments};
use crate::query::{QueryEngine, QueryRequest, SiteAnswer};
use crate::survival::Curve;

/// The gRPC face of one node.
#[derive(Debug, Clone)]
pub struct NodeService {
    engine: Arc<QueryEngine>,
}

impl NodeService {
    pub fn new(engine: Arc<QueryEngine>) -> NodeService {
        NodeService { engine }
    }
}

/// Checks the protocol versions the caller offered (`fedq-protocol` metadata). A caller that
/// offers none predates negotiation and speaks fedq.v1.
fn check_protocol<T>(request: &Request<T>) -> Result<(), NodeError> {
    let Some(offer) = request.metadata().get(fedq_proto::PROTOCOL_HEADER) else {
        return Ok(());
    };
    let offer = offer.to_str().unwrap_or("(unreadable)");
    if fedq_proto::protocol_offered(offer) {
        Ok(())
    } else {
        Err(NodeError::ProtocolMismatch {
            speaks: fedq_proto::PROTOCOL_VERSION.into(),
            offered: crate::audit::bounded(offer),
        })
    }
}

/// A response carrying the protocol version this node answered in.
fn respond<T>(message: T) -> Response<T> {
    let mut response = Response::new(message);
    response.metadata_mut().insert(
        fedq_proto::PROTOCOL_HEADER,
        tonic::metadata::MetadataValue::from_static(fedq_proto::PROTOCOL_VERSION),
    );
    response
}

/// When the caller stops waiting: the `grpc-timeout` it sent (e.g. "5000m"), from now.
fn caller_deadline<T>(request: &Request<T>) -> Option<std::time::Instant> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = text.split_at(text.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(amount.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(amount.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(amount),
        "m" => std::time::Duration::from_millis(amount),
        "u" => std::time::Duration::from_micros(amount),
        "n" => std::time::Duration::from_nanos(amount),
        _ => return None,
    };
    std::time::Instant::now().checked_add(timeout)
}

/// The certificate identities of the caller (empty when it presented none): the client
/// certificate of a connection the node accepted, or the server certificate of the coordinator
/// an outbound node dialled.
fn caller_identities<T>(request: &Request<T>) -> Vec<String> {
    if let Some(dialled) = request.extensions().get::<crate::outbound::DialledPeer>() {
        return dialled.identities.clone();
    }
    request
        .peer_certs()
        .and_then(|chain| fedq_proto::tls::peer_identities(&chain).ok())
        .unwrap_or_default()
}

/// The single mapping from node errors to gRPC statuses. The status carries a message a person
/// can act on and, in its details, the encoded [`wire::Refusal`] with the typed reason.
pub fn status_of(err: &NodeError) -> Status {
    use fedq_proto::TemplateProblem;
    let code = match err {
        NodeError::CallerNotAccepted { .. } => Code::PermissionDenied,
        NodeError::Signature(fedq_proto::signing::SignatureProblem::NoTrustedKeys) => {
            Code::FailedPrecondition
        }
        NodeError::Signature(_)
        | NodeError::TemplateRefusedBySite(_)
        | NodeError::StudyNotAccepted { .. } => Code::PermissionDenied,
        NodeError::StudyNotInForce { .. }
        | NodeError::SiteNotInStudy { .. }
        | NodeError::TemplateNotInStudy { .. } => Code::FailedPrecondition,
        NodeError::DailyLimitReached { .. }
        | NodeError::OverlapMemoryFull { .. }
        | NodeError::BudgetExhausted { .. }
        | NodeError::Busy { .. }
        | NodeError::OverlapStudyShare { .. } => Code::ResourceExhausted,
        NodeError::DeadlinePassed => Code::DeadlineExceeded,
        NodeError::ProtocolMismatch { .. } => Code::FailedPrecondition,
        NodeError::StateUnwritable | NodeError::AuditUnavailable => Code::Unavailable,
        NodeError::StudyMissing | NodeError::Contract(fedq_proto::Error::Study { .. }) => {
            Code::InvalidArgument
        }
        NodeError::Contract(fedq_proto::Error::Template { code, .. }) => match code {
            TemplateProblem::IdentifierColumn => Code::PermissionDenied,
            TemplateProblem::DataModelMismatch => Code::FailedPrecondition,
            TemplateProblem::Malformed
            | TemplateProblem::UnknownColumn
            | TemplateProblem::UnknownDataset => Code::InvalidArgument,
        },
        NodeError::Contract(
            fedq_proto::Error::Parameter { .. } | fedq_proto::Error::Syntax { .. },
        ) => Code::InvalidArgument,
        NodeError::DatasetNotHeld(_)
        | NodeError::ColumnNotHeld { .. }
        | NodeError::StatisticNotUnderDp { .. }
        | NodeError::StatisticNotRounded { .. }
        | NodeError::RegressionRefused(_) => Code::FailedPrecondition,
        NodeError::Contract(_)
        | NodeError::Config(_)
        | NodeError::Data(_)
        | NodeError::Engine
        | NodeError::Server(_) => Code::Internal,
    };
    let message = err.to_string();
    let refusal = wire::Refusal {
        code: err.refusal_code() as i32,
        message: message.clone(),
    };
    Status::with_details(code, message, refusal.encode_to_vec().into())
}

/// One value on the wire; a released mean cell carries its summary (mean and m2), a withheld
/// one nothing.
fn outcome_to_cell(
    coordinates: Vec<u32>,
    outcome: Outcome,
    moments: Option<&Moments>,
) -> wire::Cell {
    let outcome = match outcome {
        Outcome::Released(count) => wire::cell::Outcome::Released(wire::Released {
            count,
            summary: moments.map(|moments| wire::Summary {
                mean: moments.summary.mean,
                m2: moments.summary.m2,
            }),
        }),
        Outcome::Withheld => wire::cell::Outcome::Withheld(wire::Withheld {}),
    };
    wire::Cell {
        coordinates,
        outcome: Some(outcome),
    }
}

/// A disclosed table's cells on the wire, with their coordinates in `axes`, and its total.
fn table_to_wire(
    axes: &[Axis],
    table: &DisclosedTable,
    moments: Option<&CellMoments>,
) -> (Vec<wire::Cell>, wire::Cell) {
    let shape: Vec<usize> = axes.iter().map(|axis| axis.levels.len()).collect();
    let cells = table
        .cells
        .iter()
        .enumerate()
        .map(|(index, outcome)| {
            outcome_to_cell(
                cell_coordinates(&shape, index),
                *outcome,
                moments.and_then(|moments| moments.cells.get(index)),
            )
        })
        .collect();
    let total = outcome_to_cell(
        Vec::new(),
        table.total,
        moments.map(|moments| &moments.total),
    );
    (cells, total)
}

fn answer_to_wire(site_id: &str, answer: SiteAnswer) -> wire::SiteResult {
    let moments = |index: usize| answer.moments.get(index).and_then(Option::as_ref);
    let (axes, cells, total, sections) = if answer.statistic.is_profile() {
        let sections: Vec<wire::Section> = answer
            .axes
            .iter()
            .zip(&answer.tables)
            .enumerate()
            .map(|(index, (axis, table))| {
                let (cells, total) =
                    table_to_wire(std::slice::from_ref(axis), table, moments(index));
                wire::Section {
                    axis: Some(axis.into()),
                    cells,
                    total: Some(total),
                }
            })
            .collect();
        let total = sections.first().and_then(|section| section.total.clone());
        (Vec::new(), Vec::new(), total, sections)
    } else if let Some(part) = &answer.regression {
        // A regression step sends its sums only; `total` is the records they cover.
        (
            answer.axes.iter().map(Into::into).collect(),
            Vec::new(),
            Some(outcome_to_cell(
                Vec::new(),
                Outcome::Released(part.records),
                None,
            )),
            Vec::new(),
        )
    } else if answer.curves.is_some() {
        // A survival answer sends only its released curves, never the raw grid.
        let total = answer
            .tables
            .first()
            .map_or(Outcome::Withheld, |table| table.total);
        (
            answer.axes.iter().map(Into::into).collect(),
            Vec::new(),
            Some(outcome_to_cell(Vec::new(), total, None)),
            Vec::new(),
        )
    } else {
        let (cells, total) = match answer.tables.first() {
            Some(table) => table_to_wire(&answer.axes, table, moments(0)),
            None => (
                Vec::new(),
                outcome_to_cell(Vec::new(), Outcome::Withheld, None),
            ),
        };
        (
            answer.axes.iter().map(Into::into).collect(),
            cells,
            Some(total),
            Vec::new(),
        )
    };
    let first = answer.tables.first();
    wire::SiteResult {
        site_id: site_id.to_string(),
        template: Some((&answer.template).into()),
        snapshot_version: answer.snapshot_version,
        applied_min_cell_count: first.map_or(0, |table| table.k),
        axes,
        cells,
        total,
        mechanisms: answer
            .tables
            .iter()
            .flat_map(|table| &table.mechanisms)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|mechanism| *mechanism as i32)
            .collect(),
        audit_head: Some(answer.audit_head),
        noise: answer.noise.map(|(epsilon, cell_variance)| wire::Noise {
            epsilon: epsilon.to_string(),
            cell_variance,
        }),
        sections,
        curves: curves_to_wire(&answer.axes, answer.curves.as_deref()),
        regression: answer.regression.map(|part| wire::RegressionPart {
            records: part.records,
            information: part.information,
            score: part.score,
            log_likelihood: part.log_likelihood,
        }),
    }
}

/// Released survival curves on the wire, each with its strata levels.
fn curves_to_wire(axes: &[Axis], curves: Option<&[Curve]>) -> Vec<wire::SurvivalCurve> {
    let strata: Vec<usize> = axes[..axes.len().saturating_sub(2)]
        .iter()
        .map(|axis| axis.levels.len())
        .collect();
    curves
        .unwrap_or_default()
        .iter()
        .map(|curve| wire::SurvivalCurve {
            stratum: cell_coordinates(&strata, curve.stratum),
            intervals: curve
                .intervals
                .iter()
                .map(|interval| wire::SurvivalInterval {
                    start: interval.start as u32,
                    at_risk: interval.at_risk,
                    events: interval.events,
                    censored: interval.censored,
                })
                .collect(),
        })
        .collect()
}

fn describe(engine: &QueryEngine) -> wire::SiteDescription {
    let model = &engine.data_model;
    let datasets = engine
        .snapshots()
        .values()
        .map(|snapshot| {
            let spec = model.dataset(&snapshot.dataset);
            let columns = spec
                .into_iter()
                .flat_map(|spec| spec.columns.iter())
                .filter(|column| snapshot.columns.contains(&column.name))
                .map(|column| {
                    let (minimum, maximum) = column.domain.range_text().unwrap_or_default();
                    wire::ColumnDescription {
                        name: column.name.clone(),
                        column_type: column.domain.type_name().to_string(),
                        categories: match &column.domain {
                            fedq_proto::model::Domain::Category { categories } => {
                                categories.clone()
                            }
                            _ => Vec::new(),
                        },
                        minimum,
                        maximum,
                    }
                })
                .collect();
            let identifier_columns = spec
                .into_iter()
                .flat_map(|spec| spec.columns.iter())
                .filter(|column| column.identifier)
                .map(|column| column.name.clone())
                .collect();
            wire::DatasetDescription {
                name: snapshot.dataset.clone(),
                snapshot_version: snapshot.version.clone(),
                columns,
                identifier_columns,
            }
        })
        .collect();
    wire::SiteDescription {
        site_id: engine.site_id.clone(),
        software_version: fedq_proto::SOFTWARE_VERSION.to_string(),
        protocol_version: fedq_proto::PROTOCOL_VERSION.to_string(),
        data_model: model.key(),
        min_cell_count: engine.policy.min_cell_count,
        datasets,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(site = %self.engine.site_id))]
    async fn describe(
        &self,
        request: Request<wire::DescribeRequest>,
    ) -> Result<Response<wire::SiteDescription>, Status> {
        let identities = caller_identities(&request);
        crate::verify::authorize_caller(&identities, &self.engine.policy.accepted_coordinators)
            .map_err(|err| status_of(&err))?;
        check_protocol(&request).map_err(|err| status_of(&err))?;
        Ok(respond(describe(&self.engine)))
    }

    #[tracing::instrument(skip_all, fields(site = %self.engine.site_id, request_id))]
    async fn run_query(
        &self,
        request: Request<wire::QueryRequest>,
    ) -> Result<Response<wire::SiteResult>, Status> {
        let identities = caller_identities(&request);
        let deadline = caller_deadline(&request);
        let protocol = check_protocol(&request);
        let message = request.into_inner();
        tracing::Span::current().record(
            "request_id",
            crate::audit::bounded(&message.request_id).as_str(),
        );
        let query = QueryRequest {
            request_id: message.request_id,
            template: message.template,
            parameters: message.parameters,
            requester: message.requester,
            study: message.study,
            coefficients: message.coefficients,
            iteration: message.iteration,
        };
        let engine = Arc::clone(&self.engine);
        let outcome = tokio::task::spawn_blocking(move || match protocol {
            Ok(()) => {
                let slot = engine.take_slot();
                engine.run(&identities, &query, slot, deadline)
            }
            Err(mismatch) => Err(engine.refuse(&identities, &query, mismatch)),
        })
        .await
        .map_err(|_| status_of(&NodeError::Engine))?;
        match outcome {
            Ok(answer) => Ok(respond(answer_to_wire(&self.engine.site_id, answer))),
            Err(err) => Err(status_of(&err)),
        }
    }

    #[tracing::instrument(skip_all, fields(site = %self.engine.site_id))]
    async fn audit_head(
        &self,
        request: Request<wire::AuditHeadRequest>,
    ) -> Result<Response<wire::SignedAuditHead>, Status> {
        let identities = caller_identities(&request);
        crate::verify::authorize_caller(&identities, &self.engine.policy.accepted_coordinators)
            .map_err(|err| status_of(&err))?;
        check_protocol(&request).map_err(|err| status_of(&err))?;
        Ok(respond(self.engine.audit().head()))
    }

    #[tracing::instrument(skip_all, fields(site = %self.engine.site_id))]
    async fn transparency_register(
        &self,
        request: Request<wire::RegisterRequest>,
    ) -> Result<Response<wire::SiteRegister>, Status> {
        let identities = caller_identities(&request);
        crate::verify::authorize_caller(&identities, &self.engine.policy.accepted_coordinators)
            .map_err(|err| status_of(&err))?;
        check_protocol(&request).map_err(|err| status_of(&err))?;
        let engine = Arc::clone(&self.engine);
        let register = tokio::task::spawn_blocking(move || engine.transparency_register())
            .await
            .map_err(|_| status_of(&NodeError::Engine))?
            .map_err(|err| status_of(&err))?;
        Ok(respond(register))
    }
}
