//! Serving the coordinator to study-lead clients over TLS, and running it from a configuration.
//! The caller binds the listener.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedq_proto::model::DataModel;
use fedq_proto::tls::{self, TlsReloader};
use fedq_proto::wire::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;

use crate::CoordinatorError;
use crate::catalogue::Catalogue;
use crate::config::CoordinatorConfig;
use crate::fanout::NodeClients;
use crate::service::CoordinatorService;
use crate::store::Store;
use crate::users::Users;

/// A coordinator ready to serve: catalogue loaded and checked, node channels and TLS prepared.
/// Building it surfaces every start-up problem before a port is served.
pub struct PreparedCoordinator {
    service: CoordinatorService,
    tls: Arc<TlsReloader>,
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
        let nodes = NodeClients::new(config)?;
        let files = config.tls.clone();
        let tls = Arc::new(TlsReloader::new(move || {
            tls::server_only_tls_config(&files)
        })?);
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
            ),
            tls,
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

    /// The coordinator's TLS configuration, to reload renewed certificates without a restart.
    pub fn tls(&self) -> Arc<TlsReloader> {
        Arc::clone(&self.tls)
    }

    /// Serves study-lead clients on an already bound `listener` until `shutdown` completes,
    /// collecting the nodes' audit heads in the background meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoordinatorError> {
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
        served
    }
}
