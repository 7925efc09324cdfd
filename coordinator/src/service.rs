//! The `fedq.v1.Coordinator` gRPC service for study-lead clients: the catalogue, site
//! descriptions, and queries — checked here first, then fanned out to every node, streamed back
//! as per-site progress, and finally pooled.

use std::sync::Arc;
use std::time::Duration;

use fedq_proto::convert::parameter_from_wire;
use fedq_proto::template::{Axis, Statistic, TemplateRef, describe_limits};
use fedq_proto::wire::{self, coordinator_server::Coordinator};
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::CoordinatorError;
use crate::catalogue::{Catalogue, CatalogueEntry};
use crate::config::QualityPolicy;
use crate::fanout::{NodeClients, SiteCall, SiteReply, describe_call, reason};
use crate::pool::{self, PooledCell, SiteCells};
use crate::store::{Contribution, LedgerQuery, Store};
use crate::users::{Role, User, Users};
use fedq_proto::metrics::Metrics;

/// Shared state of the coordinator service.
#[derive(Debug)]
pub struct CoordinatorService {
    catalogue: Arc<Catalogue>,
    nodes: NodeClients,
    users: Arc<Users>,
    store: Arc<Store>,
    default_deadline: Duration,
    max_deadline: Duration,
    metrics: Arc<Metrics>,
    quality: Option<QualityPolicy>,
}

impl CoordinatorService {
    pub fn new(
        catalogue: Arc<Catalogue>,
        nodes: NodeClients,
        users: Users,
        store: Arc<Store>,
        default_deadline: Duration,
        max_deadline: Duration,
        quality: Option<QualityPolicy>,
    ) -> Self {
        CoordinatorService {
            catalogue,
            nodes,
            users: Arc::new(users),
            store,
            metrics: Arc::new(Metrics::default()),
            default_deadline,
            max_deadline,
            quality,
        }
    }

    /// The coordinator's metrics (queries, and each site's replies and latency).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs `work` on the coordinator's store on a blocking thread (SQLite waits for the disk).
    async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Store) -> Result<T, CoordinatorError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|err| CoordinatorError::State(err.to_string()).to_status())?
            .map_err(|err| err.to_status())
    }

    /// The user whose token (`authorization: Bearer <token>`) the request carries. The slow
    /// hash runs on a blocking thread, never on the threads serving other requests.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<User, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|token| token.trim().to_string())
            .ok_or_else(|| CoordinatorError::Unauthenticated.to_status())?;
        let users = Arc::clone(&self.users);
        tokio::task::spawn_blocking(move || users.authenticate(&token))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| CoordinatorError::Unauthenticated.to_status())
    }

    fn deadline(&self, requested_ms: u32) -> Duration {
        if requested_ms == 0 {
            self.default_deadline
        } else {
            Duration::from_millis(u64::from(requested_ms)).min(self.max_deadline)
        }
    }
}

fn summary(entry: &CatalogueEntry) -> wire::TemplateSummary {
    wire::TemplateSummary {
        reference: Some((&TemplateRef::of(&entry.document)).into()),
        title: entry.document.title.clone(),
        dataset: entry.document.dataset.clone(),
        statistic: entry.document.statistic.name().to_string(),
        signer_key_ids: entry
            .signatures
            .iter()
            .map(|signature| signature.key_id.clone())
            .collect(),
    }
}

fn detail(entry: &CatalogueEntry, catalogue: &Catalogue) -> wire::TemplateDetail {
    let template = &entry.document;
    let dataset = catalogue.data_model.dataset(&template.dataset);
    let parameters = template
        .parameters
        .iter()
        .map(|parameter| wire::ParameterSpec {
            name: parameter.name.clone(),
            parameter_type: parameter.parameter_type.name().to_string(),
            limits: dataset
                .map(|dataset| describe_limits(parameter, dataset))
                .unwrap_or_default(),
            description: parameter.description.clone(),
            default_value: parameter
                .default
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        })
        .collect();
    wire::TemplateDetail {
        summary: Some(summary(entry)),
        description: template.description.clone(),
        canonical_json: String::from_utf8_lossy(&template.canonical_bytes()).into_owned(),
        parameters,
        strata: template
            .strata
            .iter()
            .map(|stratum| stratum.column.clone())
            .collect(),
        min_cell_count: template.min_cell_count.unwrap_or(0),
    }
}

fn progress(reply: &SiteReply) -> wire::SiteProgress {
    let status = match &reply.call {
        SiteCall::Answered(_) => wire::SiteStatus::Ok,
        SiteCall::Refused { .. } => wire::SiteStatus::Refused,
        SiteCall::TimedOut => wire::SiteStatus::TimedOut,
        SiteCall::Unreachable(_) => wire::SiteStatus::Unreachable,
        SiteCall::Failed(_) => wire::SiteStatus::Failed,
    };
    let (message, refusal, result) = match &reply.call {
        SiteCall::Answered(result) => (
            String::new(),
            wire::RefusalCode::Unspecified,
            Some((**result).clone()),
        ),
        SiteCall::Refused { code, .. } => (reason(&reply.call), *code, None),
        call => (reason(call), wire::RefusalCode::Unspecified, None),
    };
    wire::SiteProgress {
        site_id: reply.site_id.clone(),
        status: status as i32,
        message,
        refusal: refusal as i32,
        result,
        elapsed_ms: reply.elapsed.as_millis() as u64,
    }
}

fn pooled_cell(coordinates: Vec<u32>, cell: &PooledCell) -> wire::PooledCell {
    wire::PooledCell {
        coordinates,
        count: cell.count,
        sites_released: cell.sites_released,
        sites_withheld: cell.sites_withheld,
        complete: cell.complete(),
        noise_variance: cell.noise_variance,
        summary: cell.summary.map(|summary| wire::Summary {
            mean: summary.mean,
            m2: summary.m2,
        }),
    }
}

/// Pools the sites' final progress records (checking each answer against the asked tables; a
/// site whose answer does not fit is marked failed and left out): a count's grid, or each
/// section of a profile.
fn pool_result(
    query_id: String,
    template: &TemplateRef,
    statistic: &Statistic,
    axes: &[Axis],
    sites: &mut [wire::SiteProgress],
) -> wire::PooledResult {
    let mut answers: Vec<Vec<SiteCells>> = Vec::new();
    let mut answered: Vec<(String, Option<usize>)> = Vec::new();
    for site in sites.iter_mut() {
        let Some(result) = &site.result else {
            answered.push((site.site_id.clone(), None));
            continue;
        };
        match SiteCells::tables_from_wire(result, template, statistic, axes) {
            Ok(tables) => {
                answered.push((site.site_id.clone(), Some(answers.len())));
                answers.push(tables);
            }
            Err(problem) => {
                tracing::warn!(site = %site.site_id, %problem, "site answer does not fit the query");
                site.status = wire::SiteStatus::Failed as i32;
                site.message = problem;
                site.result = None;
                answered.push((site.site_id.clone(), None));
            }
        }
    }
    let odds_ratios = match statistic {
        Statistic::TwoByTwo { .. } => {
            let shape: Vec<usize> = axes.iter().map(|axis| axis.levels.len()).collect();
            let cells: Vec<(String, Option<&[Option<u64>]>)> = answered
                .iter()
                .map(|(site_id, index)| {
                    let cells = index.map(|index| answers[index][0].cells.as_slice());
                    (site_id.clone(), cells)
                })
                .collect();
            crate::odds::for_grid(&shape, &cells)
        }
        _ => Vec::new(),
    };
    let curves = match statistic {
        Statistic::Survival { .. } => {
            let strata: Vec<usize> = axes[..axes.len().saturating_sub(2)]
                .iter()
                .map(|axis| axis.levels.len())
                .collect();
            let count: usize = strata.iter().product();
            (0..count)
                .map(|stratum| {
                    let per_site: Vec<(String, Option<&wire::SurvivalCurve>)> = sites
                        .iter()
                        .map(|site| {
                            let curve = site
                                .result
                                .as_ref()
                                .and_then(|result| result.curves.get(stratum));
                            (site.site_id.clone(), curve)
                        })
                        .collect();
                    crate::survival::pool(
                        fedq_proto::template::cell_coordinates(&strata, stratum),
                        &per_site,
                    )
                })
                .collect()
        }
        _ => Vec::new(),
    };
    if !curves.is_empty() {
        return wire::PooledResult {
            query_id,
            template: Some(template.into()),
            axes: axes.iter().map(Into::into).collect(),
            cells: Vec::new(),
            total: None,
            sites: sites.to_vec(),
            sections: Vec::new(),
            odds_ratios: Vec::new(),
            curves,
            regression: None,
            ..Default::default()
        };
    }
    // Each table pooled on its own: (its axes, pooled cells with coordinates, pooled total).
    let table_axes: Vec<&[Axis]> = if statistic.is_profile() {
        axes.iter().map(std::slice::from_ref).collect()
    } else {
        vec![axes]
    };
    let mut pooled: Vec<(Vec<wire::PooledCell>, wire::PooledCell)> = table_axes
        .iter()
        .enumerate()
        .map(|(index, axes)| {
            let shape: Vec<usize> = axes.iter().map(|axis| axis.levels.len()).collect();
            let sites: Vec<&SiteCells> = answers.iter().map(|tables| &tables[index]).collect();
            let table = pool::pool(shape.iter().product(), &sites);
            let cells = table
                .cells
                .iter()
                .enumerate()
                .map(|(index, cell)| {
                    pooled_cell(fedq_proto::template::cell_coordinates(&shape, index), cell)
                })
                .collect();
            (cells, pooled_cell(Vec::new(), &table.total))
        })
        .collect();
    let total = pooled.first().map(|(_, total)| total.clone());
    let (axes, cells, sections) = if statistic.is_profile() {
        (
            Vec::new(),
            Vec::new(),
            axes.iter()
                .zip(pooled)
                .map(|(axis, (cells, total))| wire::PooledSection {
                    axis: Some(axis.into()),
                    cells,
                    total: Some(total),
                })
                .collect(),
        )
    } else {
        (
            axes.iter().map(Into::into).collect(),
            pooled.pop().map(|(cells, _)| cells).unwrap_or_default(),
            Vec::new(),
        )
    };
    wire::PooledResult {
        query_id,
        template: Some(template.into()),
        axes,
        cells,
        total,
        sites: sites.to_vec(),
        sections,
        odds_ratios,
        curves: Vec::new(),
        regression: None,
        ..Default::default()
    }
}

/// Records one site's reply: metrics, its audit head (an answer from a log that went back is
/// discarded and the site held), and the progress record a study lead sees.
async fn settle(
    reply: SiteReply,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
) -> wire::SiteProgress {
    tracing::info!(site = %reply.site_id, outcome = %describe_call(&reply.call), elapsed_ms = reply.elapsed.as_millis() as u64, "site finished");
    let status = site_status_label(&reply.call);
    metrics.count(
        "fedq_coordinator_site_replies_total",
        "Site replies to queries, by site and status.",
        &[("site", &reply.site_id), ("status", status)],
        1,
    );
    metrics.observe(
        "fedq_coordinator_site_seconds",
        "Time each site took to reply (or to fail), by site.",
        &[("site", &reply.site_id)],
        reply.elapsed,
    );
    let mut reply = reply;
    if let SiteCall::Answered(result) = &reply.call
        && let Some(head) = &result.audit_head
        && crate::heads::keep(store, &reply.site_id, head.clone()).await
    {
        // The answer came from a log that went back: nothing of it is released.
        reply.call = SiteCall::Failed(crate::fanout::held_message(
            &reply.site_id,
            "from now: its audit log went back or was rewritten",
        ));
    }
    progress(&reply)
}

/// What a regression fit asks the nodes with.
struct Fitting<'a> {
    nodes: &'a NodeClients,
    request: &'a wire::QueryRequest,
    deadline: Duration,
    held: &'a std::collections::BTreeMap<String, String>,
}

/// Fits a logistic regression by Newton-Raphson over the sites whose first part (at zero
/// coefficients, in `first`) was usable; each further iteration asks only them, as a query of
/// its own (request id `<query id>-<iteration>`). A pooled site that stops answering ends the
/// fit with a message rather than a fit over fewer sites.
async fn fit<F, Fut>(
    fitting: Fitting<'_>,
    query_id: String,
    template: &TemplateRef,
    axes: &[Axis],
    mut sites: Vec<wire::SiteProgress>,
    settle: F,
) -> wire::PooledResult
where
    F: Fn(SiteReply) -> Fut,
    Fut: std::future::Future<Output = wire::SiteProgress>,
{
    use crate::regression::{self, Sum};
    let terms: Vec<String> = axes
        .first()
        .map(|axis| axis.levels.clone())
        .unwrap_or_default();
    let parameters = terms.len();
    // The pooled sites: those whose first part is valid.
    let mut sum = Sum::new(parameters);
    let mut pooled: Vec<String> = Vec::new();
    for site in &mut sites {
        let Some(part) = site
            .result
            .as_ref()
            .and_then(|result| result.regression.clone())
        else {
            continue;
        };
        if let Err(problem) = sum.add(&part) {
            site.status = wire::SiteStatus::Failed as i32;
            site.message = problem;
            site.result = None;
            continue;
        }
        pooled.push(site.site_id.clone());
    }
    let mut outcome = wire::Regression {
        sites: pooled.clone(),
        ..Default::default()
    };
    if pooled.is_empty() {
        outcome.message = "no site took part (see each site's status)".into();
    } else {
        // Sites not pooled are not asked again.
        let mut skipped = fitting.held.clone();
        for entry in fitting.nodes.entries() {
            if !pooled.contains(&entry.site_id) {
                skipped.insert(entry.site_id.clone(), "out of this fit".into());
            }
        }
        let mut beta = vec![0.0; parameters];
        let mut previous: Option<f64> = None;
        let mut iteration = 0u32;
        loop {
            outcome.iterations = iteration + 1;
            if previous.is_some_and(|previous| regression::converged(previous, sum.log_likelihood))
            {
                outcome.converged = true;
                break;
            }
            if iteration + 1 >= regression::MOST_ITERATIONS {
                outcome.message = format!(
                    "no convergence within {} iterations",
                    regression::MOST_ITERATIONS
                );
                break;
            }
            let Some(delta) = regression::step(&sum) else {
                outcome.message = "the pooled information matrix is singular: a covariate is constant or a combination of others in the pooled data".into();
                break;
            };
            previous = Some(sum.log_likelihood);
            let next: Vec<f64> = beta.iter().zip(&delta).map(|(b, d)| b + d).collect();
            iteration += 1;
            let mut request = fitting.request.clone();
            request.request_id = format!("{query_id}-{iteration}");
            request.coefficients = next.clone();
            request.iteration = iteration;
            let mut replies = fitting.nodes.run_query(request, fitting.deadline, &skipped);
            let mut next_sum = Sum::new(parameters);
            let mut failure = None;
            while let Some(reply) = replies.next().await {
                if !pooled.contains(&reply.site_id) {
                    continue;
                }
                let site = settle(reply).await;
                let part = site
                    .result
                    .as_ref()
                    .and_then(|result| result.regression.as_ref())
                    .ok_or_else(|| site.message.clone())
                    .and_then(|part| next_sum.add(part));
                if let Err(problem) = part {
                    failure.get_or_insert((site.site_id.clone(), problem));
                }
            }
            if let Some((site_id, problem)) = failure {
                outcome.message = format!(
                    "site {site_id} stopped answering at iteration {iteration} ({problem}); no estimate over fewer sites is given"
                );
                if problem.contains("at most") && problem.contains("coefficient") {
                    outcome.separation_suspected = true;
                }
                break;
            }
            beta = next;
            sum = next_sum;
        }
        let (table, separation) = regression::coefficients(&terms, &beta, &sum);
        outcome.separation_suspected |=
            separation || (!outcome.converged && outcome.message.starts_with("no convergence"));
        outcome.records = sum.records;
        outcome.log_likelihood = sum.log_likelihood;
        if outcome.message.is_empty() || outcome.converged {
            outcome.coefficients = table;
        }
    }
    wire::PooledResult {
        query_id,
        template: Some(template.into()),
        axes: axes.iter().map(Into::into).collect(),
        cells: Vec::new(),
        total: None,
        sites,
        sections: Vec::new(),
        odds_ratios: Vec::new(),
        curves: Vec::new(),
        regression: Some(outcome),
        ..Default::default()
    }
}

/// What each answering site contributed to a pooled result: its released cells and the
/// records in them (for a profile, whose sections each count every record, the records
/// profiled). Withheld cells add nothing.
fn contributions(sites: &[wire::SiteProgress]) -> Vec<Contribution> {
    let released = |cell: &wire::Cell| match &cell.outcome {
        Some(wire::cell::Outcome::Released(released)) => Some(released.count),
        _ => None,
    };
    sites
        .iter()
        .filter_map(|site| {
            let result = site.result.as_ref()?;
            let (cells_released, records_contributed) = if let Some(part) = &result.regression {
                // A regression: its part, over the records it covers.
                (1, part.records)
            } else if !result.curves.is_empty() {
                // A survival answer: its released intervals, and the records in its curves.
                let intervals = result
                    .curves
                    .iter()
                    .map(|curve| curve.intervals.len())
                    .sum::<usize>();
                let records = result
                    .curves
                    .iter()
                    .filter_map(|curve| curve.intervals.first())
                    .map(|interval| interval.at_risk)
                    .sum();
                (intervals as u64, records)
            } else if result.sections.is_empty() {
                let counts: Vec<u64> = result.cells.iter().filter_map(released).collect();
                (counts.len() as u64, counts.iter().sum())
            } else {
                let cells = result
                    .sections
                    .iter()
                    .flat_map(|section| &section.cells)
                    .filter_map(released)
                    .count();
                let records = result
                    .sections
                    .first()
                    .and_then(|section| section.cells.iter().map(released).sum::<Option<u64>>())
                    .unwrap_or(0);
                (cells as u64, records)
            };
            Some(Contribution {
                site_id: site.site_id.clone(),
                cells_released,
                records_contributed,
            })
        })
        .collect()
}

/// Which studies' ledger entries `user` may read (None: all).
fn ledger_scope(user: &User, catalogue: &Catalogue) -> Option<Vec<String>> {
    match user.role {
        Role::Expert | Role::Administrator => None,
        Role::StudyLead => Some(
            catalogue
                .studies()
                .iter()
                .filter(|entry| entry.document.study_lead == user.name)
                .map(|entry| entry.document.id.clone())
                .collect(),
        ),
    }
}

/// A site reply's status as a metric label.
fn site_status_label(call: &SiteCall) -> &'static str {
    match call {
        SiteCall::Answered(_) => "ok",
        SiteCall::Refused { .. } => "refused",
        SiteCall::TimedOut => "timed_out",
        SiteCall::Unreachable(_) => "unreachable",
        SiteCall::Failed(_) => "failed",
    }
}

fn new_query_id() -> String {
    format!("q-{:016x}", rand::random::<u64>())
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn list_templates(
        &self,
        request: Request<wire::ListTemplatesRequest>,
    ) -> Result<Response<wire::ListTemplatesResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(wire::ListTemplatesResponse {
            templates: self.catalogue.entries().iter().map(summary).collect(),
        }))
    }

    async fn get_template(
        &self,
        request: Request<wire::GetTemplateRequest>,
    ) -> Result<Response<wire::TemplateDetail>, Status> {
        self.authenticate(&request).await?;
        let entry = self
            .catalogue
            .get(&request.get_ref().id)
            .map_err(|err| err.to_status())?;
        Ok(Response::new(detail(entry, &self.catalogue)))
    }

    async fn list_studies(
        &self,
        request: Request<wire::ListStudiesRequest>,
    ) -> Result<Response<wire::ListStudiesResponse>, Status> {
        self.authenticate(&request).await?;
        let studies = self
            .catalogue
            .studies()
            .iter()
            .map(|entry| {
                let study = &entry.document;
                wire::StudySummary {
                    id: study.id.clone(),
                    title: study.title.clone(),
                    purpose: study.purpose.clone(),
                    lead_institution: study.lead_institution.clone(),
                    study_lead: study.study_lead.clone(),
                    ethics_reference: study.ethics_reference.clone(),
                    valid_from: study.valid_from.clone(),
                    valid_until: study.valid_until.clone(),
                    max_queries_per_day: study.max_queries_per_day,
                    sites: study.sites.clone(),
                    templates: study
                        .templates
                        .iter()
                        .map(|pin| wire::TemplateRef {
                            id: pin.id.clone(),
                            version: pin.version,
                            content_hash: pin.content_hash.clone(),
                        })
                        .collect(),
                    content_hash: study.content_hash(),
                    signer_key_ids: entry
                        .signatures
                        .iter()
                        .map(|signature| signature.key_id.clone())
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(wire::ListStudiesResponse { studies }))
    }

    async fn list_sites(
        &self,
        request: Request<wire::ListSitesRequest>,
    ) -> Result<Response<wire::ListSitesResponse>, Status> {
        self.authenticate(&request).await?;
        let described = self.nodes.describe_all(self.default_deadline).await;
        let sites = described
            .into_iter()
            .map(|(entry, outcome)| {
                let (description, error) = match outcome {
                    Ok(description) => (Some(description), String::new()),
                    Err(error) => (None, error),
                };
                wire::SiteEntry {
                    site_id: entry.site_id,
                    address: entry.address.to_string(),
                    description,
                    error,
                }
            })
            .collect();
        Ok(Response::new(wire::ListSitesResponse { sites }))
    }

    type RunQueryStream = ReceiverStream<Result<wire::QueryEvent, Status>>;

    #[tracing::instrument(skip_all, fields(template = %request.get_ref().template_id, query_id))]
    async fn run_query(
        &self,
        request: Request<wire::RunQueryRequest>,
    ) -> Result<Response<Self::RunQueryStream>, Status> {
        let user = self.authenticate(&request).await?;
        let request = request.into_inner();
        let entry = self
            .catalogue
            .get(&request.template_id)
            .map_err(|err| err.to_status())?;
        let template = &entry.document;
        let study = self
            .catalogue
            .study(&request.study_id)
            .map_err(|err| err.to_status())?;
        if user.role != Role::StudyLead || user.name != study.document.study_lead {
            return Err(CoordinatorError::NotStudyLead {
                user: user.name,
                study: study.document.id.clone(),
                lead: study.document.study_lead.clone(),
            }
            .to_status());
        }
        if !study.document.pins(template) {
            return Err(CoordinatorError::TemplateNotInStudy {
                template: template.id.clone(),
                study: study.document.id.clone(),
            }
            .to_status());
        }
        let checked = template
            .check(&self.catalogue.data_model, &Default::default())
            .map_err(|err| CoordinatorError::from(err).to_status())?;
        let values = request
            .parameters
            .iter()
            .map(parameter_from_wire)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| CoordinatorError::from(err).to_status())?;
        // The grid the sites answer on (the categories the filter admits, see `bind`).
        let axes = checked
            .bind(&values)
            .map_err(|err| CoordinatorError::from(err).to_status())?
            .axes;
        let asked: Vec<wire::EffectiveParameter> = checked
            .effective_parameters(&values)
            .map_err(|err| CoordinatorError::from(err).to_status())?
            .into_iter()
            .map(|(name, value, given)| wire::EffectiveParameter {
                name,
                value: value.to_string(),
                given,
            })
            .collect();
        let statistic = template.statistic.clone();
        let reference = TemplateRef::of(template);
        let query_id = new_query_id();
        tracing::Span::current().record("query_id", query_id.as_str());
        let node_request = wire::QueryRequest {
            request_id: query_id.clone(),
            template: Some(fedq_proto::document::template_document(
                template,
                entry.signatures.clone(),
            )),
            parameters: request.parameters,
            requester: user.name.clone(),
            study: Some(fedq_proto::document::study_document(
                &study.document,
                study.signatures.clone(),
            )),
            coefficients: Vec::new(),
            iteration: 0,
        };
        let deadline = self.deadline(request.deadline_ms);
        let site_ids: Vec<String> = self
            .nodes
            .entries()
            .map(|entry| entry.site_id.clone())
            .collect();
        let held = self
            .with_store(move |store| {
                site_ids
                    .into_iter()
                    .filter_map(|site| match store.hold(&site) {
                        Ok(Some(reason)) => Some(Ok((site, reason))),
                        Ok(None) => None,
                        Err(err) => Some(Err(err)),
                    })
                    .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
            })
            .await?;
        let mut replies = self.nodes.run_query(node_request.clone(), deadline, &held);
        let order: Vec<String> = self
            .nodes
            .entries()
            .map(|entry| entry.site_id.clone())
            .collect();
        let (sender, receiver) = tokio::sync::mpsc::channel(order.len() + 1);
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        metrics.count(
            "fedq_coordinator_queries_total",
            "Queries fanned out, by template.",
            &[("template", &reference.id)],
            1,
        );
        let study_id = study.document.id.clone();
        let requester = user.name.clone();
        let nodes = self.nodes.clone();
        tokio::spawn(async move {
            let settle = |reply: SiteReply| settle(reply, &store, &metrics);
            let mut finished: Vec<wire::SiteProgress> = Vec::new();
            while let Some(reply) = replies.next().await {
                let site = settle(reply).await;
                let event = wire::QueryEvent {
                    event: Some(wire::query_event::Event::Site(site.clone())),
                };
                // A client that went away stops receiving; the pooled result is still computed
                // so the log shows the query's end.
                let _ = sender.send(Ok(event)).await;
                finished.push(site);
            }
            finished.sort_by_key(|site| order.iter().position(|id| id == &site.site_id));
            let result = match &statistic {
                Statistic::Logistic { .. } => {
                    let fitting = Fitting {
                        nodes: &nodes,
                        request: &node_request,
                        deadline,
                        held: &held,
                    };
                    fit(
                        fitting,
                        query_id.clone(),
                        &reference,
                        &axes,
                        finished,
                        settle,
                    )
                    .await
                }
                _ => pool_result(
                    query_id.clone(),
                    &reference,
                    &statistic,
                    &axes,
                    &mut finished,
                ),
            };
            let mut result = result;
            result.study_id = study_id.clone();
            result.parameters = asked;
            let contributed = contributions(&result.sites);
            let recorded = tokio::task::spawn_blocking(move || {
                store.record_contributions(
                    &LedgerQuery {
                        query_id: &query_id,
                        study_id: &study_id,
                        template_id: &reference.id,
                        template_version: reference.version,
                        requester: &requester,
                    },
                    &contributed,
                )
            })
            .await;
            if !matches!(recorded, Ok(Ok(()))) {
                tracing::error!("cannot record the query's contributions in the ledger");
            }
            let event = wire::QueryEvent {
                event: Some(wire::query_event::Event::Result(result)),
            };
            let _ = sender.send(Ok(event)).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn audit_heads(
        &self,
        request: Request<wire::AuditHeadsRequest>,
    ) -> Result<Response<wire::AuditHeadsResponse>, Status> {
        let user = self.authenticate(&request).await?;
        if user.role == Role::StudyLead {
            return Err(CoordinatorError::NotAllowed {
                user: user.name,
                role: "study lead".into(),
                action: "read nodes' audit heads (administrators and experts may)".into(),
            }
            .to_status());
        }
        let request = request.into_inner();
        let site_id = request.site_id;
        if !self.nodes.entries().any(|entry| entry.site_id == site_id) {
            return Err(CoordinatorError::UnknownSite(site_id).to_status());
        }
        // Administrators' acts on a site: lifting a hold, clearing a pinned key.
        let acts: [(
            bool,
            &str,
            fn(&Store, &str, &str) -> Result<(), CoordinatorError>,
        ); 2] = [
            (
                request.acknowledge,
                "lift a site's hold",
                Store::acknowledge,
            ),
            (
                request.clear_pin,
                "clear a site's pinned audit key",
                Store::clear_pin,
            ),
        ];
        for (asked, action, act) in acts {
            if !asked {
                continue;
            }
            if user.role != Role::Administrator {
                return Err(CoordinatorError::NotAllowed {
                    user: user.name,
                    role: "expert".into(),
                    action: format!("{action} (administrators may)"),
                }
                .to_status());
            }
            let (site, by) = (site_id.clone(), user.name.clone());
            self.with_store(move |store| act(store, &site, &by)).await?;
            tracing::warn!(site = %site_id, by = %user.name, "administrator: {action}");
        }
        // Ask the node for its newest head first, so the export is as fresh as possible.
        crate::heads::collect_once(&self.nodes, &self.store, self.default_deadline).await;
        let (heads, pinned_key_id, events) = self
            .with_store(move |store| {
                Ok((
                    store.heads(&site_id)?,
                    store.pinned_key(&site_id)?.unwrap_or_default(),
                    store.head_events(&site_id)?,
                ))
            })
            .await?;
        let heads = heads
            .iter()
            .map(wire::SignedAuditHead::try_from)
            .collect::<Result<_, _>>()
            .map_err(|err| CoordinatorError::from(err).to_status())?;
        Ok(Response::new(wire::AuditHeadsResponse {
            heads,
            pinned_key_id,
            events,
        }))
    }

    async fn ledger(
        &self,
        request: Request<wire::LedgerRequest>,
    ) -> Result<Response<wire::LedgerResponse>, Status> {
        let user = self.authenticate(&request).await?;
        let wanted = request.into_inner().study_id;
        let mut scope = ledger_scope(&user, &self.catalogue);
        if !wanted.is_empty() {
            if scope
                .as_ref()
                .is_some_and(|studies| !studies.contains(&wanted))
            {
                return Err(CoordinatorError::NotAllowed {
                    user: user.name,
                    role: "study lead".into(),
                    action: format!(
                        "read the ledger of study '{wanted}' (only of studies they lead)"
                    ),
                }
                .to_status());
            }
            scope = Some(vec![wanted]);
        }
        let entries = self
            .with_store(move |store| store.ledger(scope.as_deref()))
            .await?;
        Ok(Response::new(wire::LedgerResponse { entries }))
    }

    async fn transparency_register(
        &self,
        request: Request<wire::AllianceRegisterRequest>,
    ) -> Result<Response<wire::AllianceRegister>, Status> {
        self.authenticate(&request).await?;
        let mut sites = Vec::new();
        let mut unavailable = Vec::new();
        for (entry, outcome) in self.nodes.registers_all(self.default_deadline).await {
            match outcome {
                Ok(register) if register.site_id == entry.site_id => sites.push(register),
                Ok(register) => unavailable.push(format!(
                    "{}: answered with the register of '{}'",
                    entry.site_id, register.site_id
                )),
                Err(reason) => unavailable.push(format!("{}: {reason}", entry.site_id)),
            }
        }
        Ok(Response::new(wire::AllianceRegister {
            generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            sites,
            unavailable,
        }))
    }

    async fn quality_standard(
        &self,
        request: Request<wire::QualityStandardRequest>,
    ) -> Result<Response<wire::QualityStandard>, Status> {
        self.authenticate(&request).await?;
        let quality = self
            .quality
            .as_ref()
            .ok_or_else(|| CoordinatorError::NoQualityStandard.to_status())?;
        Ok(Response::new(wire::QualityStandard {
            study_id: quality.study.clone(),
            template_id: quality.template.clone(),
            max_missing_percent: quality.max_missing_percent,
            max_outside_domain_percent: quality.max_outside_domain_percent,
            max_implausible_percent: quality.max_implausible_percent,
        }))
    }
}
