//! Serving the coordinator to study-lead clients over TLS, and accepting outbound nodes on the
//! tunnel port (mutual TLS). The caller binds the listeners.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedq_proto::model::DataModel;
use fedq_proto::template::Statistic;
use fedq_proto::tls::{self, TlsReloader};
use fedq_proto::wire::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;

use crate::CoordinatorError;
use crate::catalogue::Catalogue;
use crate::config::{CoordinatorConfig, QualityPolicy};
use crate::fanout::NodeClients;
use crate::service::CoordinatorService;
use crate::store::Store;
use crate::users::Users;

/// A coordinator ready to serve: catalogue loaded and checked, node channels and TLS prepared.
/// Building it surfaces every start-up problem before a port is served.
pub struct PreparedCoordinator {
    service: CoordinatorService,
    tls: Arc<TlsReloader>,
    /// Mutual TLS for the tunnel port, when outbound nodes are configured.
    tunnel_tls: Option<Arc<TlsReloader>>,
    nodes: NodeClients,
    store: Arc<Store>,
    head_interval: Duration,
    deadline: Duration,
}

impl PreparedCoordinator {
    pub fn new(config: &CoordinatorConfig) -> Result<PreparedCoordinator, CoordinatorError> {
        let catalogue = Arc::new(Catalogue::load(
            &config.templates,
            &config.studies,
            DataModel::builtin(),
        )?);
        if let Some(quality) = &config.quality {
            check_quality_standard(quality, &catalogue)?;
        }
        let nodes = NodeClients::new(config)?;
        let files = config.tls.clone();
        let tls = Arc::new(TlsReloader::new(move || {
            tls::server_only_tls_config(&files)
        })?);
        let tunnel_tls = match config.tunnel_listen {
            Some(_) => {
                let files = config.tls.clone();
                Some(Arc::new(TlsReloader::new(move || {
                    tls::mutual_tls_server_config(&files)
                })?))
            }
            None => None,
        };
        let store = Arc::new(Store::open(&config.state_dir)?);
        tracing::info!(
            templates = catalogue.entries().len(),
            nodes = config.nodes.len(),
            "coordinator ready"
        );
        Ok(PreparedCoordinator {
            service: CoordinatorService::new(
                catalogue,
                nodes.clone(),
                Users::new(config.users.clone())?,
                Arc::clone(&store),
                config.default_deadline,
                config.max_deadline,
                config.quality.clone(),
            ),
            tls,
            tunnel_tls,
            nodes,
            store,
            head_interval: config.head_interval,
            deadline: config.default_deadline,
        })
    }

    /// Serves the coordinator's Prometheus metrics (`GET /metrics`, plain HTTP) on an already
    /// bound `listener` in the background.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let metrics = self.service.metrics();
        tokio::spawn(fedq_proto::metrics::serve_metrics(listener, move || {
            metrics.render()
        }));
    }

    /// Reloads the coordinator's certificate (for clients and for the tunnel port) on every
    /// SIGHUP, so a renewed one is used without a restart.
    pub fn reload_on_hangup(&self) {
        Arc::clone(&self.tls).reload_on_hangup();
        if let Some(tunnel_tls) = &self.tunnel_tls {
            Arc::clone(tunnel_tls).reload_on_hangup();
        }
    }

    /// Serves study-lead clients on an already bound `listener` until `shutdown` completes,
    /// accepting outbound nodes on `tunnel` (required when the configuration lists any) and
    /// collecting the nodes' audit heads in the background meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        tunnel: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoordinatorError> {
        let tunnels = match (tunnel, &self.tunnel_tls) {
            (Some(tunnel), Some(tunnel_tls)) => {
                Some(self.nodes.tunnels().accept(tunnel, tunnel_tls))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(CoordinatorError::Server(
                    "a tunnel listener was given but the configuration has no tunnel_listen".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(CoordinatorError::Server(
                    "the configuration has tunnel_listen but no tunnel listener was bound".into(),
                ));
            }
        };
        let (health, reflection) =
            fedq_proto::process::standard_services::<CoordinatorServer<CoordinatorService>>()
                .await
                .map_err(CoordinatorError::Server)?;
        let collector = tokio::spawn(crate::heads::collect_every(
            self.nodes,
            self.store,
            self.head_interval,
            self.deadline,
        ));
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(
                CoordinatorServer::new(self.service).max_decoding_message_size(1024 * 1024),
            )
            .serve_with_incoming_shutdown(tls::accept_tls(listener, &self.tls), shutdown)
            .await
            .map_err(|err| CoordinatorError::Server(err.to_string()));
        collector.abort();
        if let Some(tunnels) = tunnels {
            tunnels.abort();
        }
        served
    }
}

/// The `[quality]` section must name an approved study that pins a profile template.
fn check_quality_standard(
    quality: &QualityPolicy,
    catalogue: &Catalogue,
) -> Result<(), CoordinatorError> {
    let problem = |detail: String| CoordinatorError::Config(vec![format!("quality: {detail}")]);
    let study = catalogue.study(&quality.study).map_err(|_| {
        problem(format!(
            "study '{}' is not in the studies folder",
            quality.study
        ))
    })?;
    let template = catalogue.get(&quality.template).map_err(|_| {
        problem(format!(
            "template '{}' is not in the templates folder",
            quality.template
        ))
    })?;
    if template.document.statistic != Statistic::Profile {
        return Err(problem(format!(
            "template '{}' is not a data-quality profile (statistic kind \"profile\")",
            quality.template
        )));
    }
    if !study.document.pins(&template.document) {
        return Err(problem(format!(
            "study '{}' does not approve template '{}'",
            quality.study, quality.template
        )));
    }
    Ok(())
}
