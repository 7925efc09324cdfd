//! Serving the node: mutual TLS (client certificates from the alliance CA are required; which
//! identities may query is the engine's policy check), message-size limits, and a graceful
//! stop when `shutdown` completes. The caller binds the listener.

use std::future::Future;
use std::sync::Arc;

use fedq_proto::tls::{self, TlsReloader};
use fedq_proto::wire::node_server::NodeServer;
use tokio::net::TcpListener;

use crate::NodeError;
use crate::config::NodeConfig;
use crate::query::QueryEngine;
use crate::service::NodeService;

/// Largest request a node accepts (a template and its parameters are a few kilobytes).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest answer a node sends (10,000 cells fit easily).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// A node ready to serve: data loaded, TLS configuration built. Building it surfaces every
/// start-up problem before a port is served.
pub struct PreparedNode {
    engine: Arc<QueryEngine>,
    tls: Arc<TlsReloader>,
}

impl PreparedNode {
    /// Builds the TLS configuration first (quick, and the commonest mistake), then loads the
    /// data and opens the state directory. Returns the node and warning lines for the log.
    pub fn load(config: &NodeConfig) -> Result<(PreparedNode, Vec<String>), NodeError> {
        let files = config.tls.clone();
        let tls = TlsReloader::new(move || tls::mutual_tls_server_config(&files))?;
        let (engine, warnings) = QueryEngine::load(config)?;
        Ok((
            PreparedNode {
                engine: Arc::new(engine),
                tls: Arc::new(tls),
            },
            warnings,
        ))
    }

    pub fn engine(&self) -> &QueryEngine {
        &self.engine
    }

    /// Serves the node's Prometheus metrics (`GET /metrics`, plain HTTP) on an already bound
    /// `listener` in the background.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let engine = Arc::clone(&self.engine);
        tokio::spawn(fedq_proto::metrics::serve_metrics(listener, move || {
            engine.render_metrics()
        }));
    }

    /// On every SIGHUP: reloads the TLS certificates, then reads the data files again and swaps
    /// the new snapshots in (each independently: a failure keeps what is in use and is logged).
    pub fn reload_on_hangup(&self) {
        let (tls, engine) = (Arc::clone(&self.tls), Arc::clone(&self.engine));
        tokio::spawn(async move {
            let Ok(mut hangups) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!(
                    "cannot listen for SIGHUP; certificates and data reload only on restart"
                );
                return;
            };
            while hangups.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!("tls certificates reloaded"),
                    Err(err) => {
                        tracing::error!(error = %err, "tls certificates not reloaded; the previous ones stay in use")
                    }
                }
                let engine = Arc::clone(&engine);
                match tokio::task::spawn_blocking(move || {
                    let reloaded = engine.reload_data();
                    (reloaded, engine)
                })
                .await
                {
                    Ok((Ok(warnings), engine)) => {
                        for warning in warnings {
                            tracing::warn!(%warning, "data quality");
                        }
                        for snapshot in engine.snapshots().values() {
                            tracing::info!(dataset = %snapshot.dataset, rows = snapshot.rows(), version = %snapshot.version, "dataset reloaded");
                        }
                    }
                    Ok((Err(err), _)) => {
                        tracing::error!(error = %err, "data not reloaded; the previous snapshots stay in use")
                    }
                    Err(err) => tracing::error!(error = %err, "data reload failed"),
                }
            }
        });
    }

    /// The node's TLS configuration, to reload renewed certificates without a restart.
    pub fn tls(&self) -> Arc<TlsReloader> {
        Arc::clone(&self.tls)
    }

    /// Serves on an already bound `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let service = NodeServer::new(NodeService::new(self.engine))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let (health, reflection) =
            fedq_proto::process::standard_services::<NodeServer<NodeService>>()
                .await
                .map_err(NodeError::Server)?;
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(tls::accept_tls(listener, &self.tls), shutdown)
            .await
            .map_err(|err| NodeError::Server(err.to_string()))
    }
}
