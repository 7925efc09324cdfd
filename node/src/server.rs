//! Serving the node: mutual TLS (client certificates from the alliance CA are required; which
//! identities may query is the engine's policy check), on a listener the caller bound and/or
//! over the connection the node dials to the coordinator ([`crate::outbound`]); message-size
//! limits; a graceful stop of both when `shutdown` completes.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use fedq_proto::tls::{self, TlsFiles, TlsReloader};
use fedq_proto::wire::node_server::NodeServer;
use futures::FutureExt;
use tokio::net::TcpListener;

use crate::NodeError;
use crate::config::NodeConfig;
use crate::outbound::{self, Outbound};
use crate::query::QueryEngine;
use crate::service::NodeService;

/// Each watched file's modification time and length (missing files count as a state too).
fn fingerprint(files: &[PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|meta| Some((meta.modified().ok()?, meta.len())))
        })
        .collect()
}

/// Reloads the certificates (counting a success in `renewals`), then the data, logging each
/// outcome.
async fn reload_all(
    tls: &TlsReloader,
    renewals: &tokio::sync::watch::Sender<u64>,
    engine: &Arc<QueryEngine>,
) {
    if tls.reload_logged() {
        renewals.send_modify(|count| *count += 1);
    }
    let engine = Arc::clone(engine);
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

/// How often the node pings a connected coordinator, and how long it waits for the answer
/// before closing the connection (an outbound node then dials again).
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest request a node accepts (a template and its parameters are a few kilobytes).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest answer a node sends (10,000 cells fit easily).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// A node ready to serve: data loaded, TLS configuration built. Building it surfaces every
/// start-up problem before a port is served.
pub struct PreparedNode {
    engine: Arc<QueryEngine>,
    tls: Arc<TlsReloader>,
    /// The certificate and data files whose change triggers a reload.
    watched: Vec<PathBuf>,
    /// Outbound mode: where to dial, with the files to dial with.
    outbound: Option<(Outbound, TlsFiles)>,
    /// Counts successful certificate reloads (outbound mode then dials with the new files).
    renewals: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The files a node reloads from: its TLS files, each dataset and objection list.
fn watched_files(config: &NodeConfig) -> Vec<PathBuf> {
    let mut files = vec![
        config.tls.ca_cert.clone(),
        config.tls.cert.clone(),
        config.tls.key.clone(),
    ];
    for dataset in &config.datasets {
        files.push(dataset.path.clone());
        if let Some(objections) = &dataset.objections {
            files.push(objections.file.clone());
        }
    }
    files
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
                watched: watched_files(config),
                outbound: config
                    .outbound
                    .clone()
                    .map(|outbound| (outbound, config.tls.clone())),
                renewals: Arc::new(tokio::sync::watch::channel(0).0),
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

    /// On every SIGHUP, and when a watched file changes (checked every `poll`, if any):
    /// reloads the TLS certificates, then reads the data files again and swaps the new
    /// snapshots in (each independently: a failure keeps what is in use and is logged).
    pub fn reload_on_change(&self, poll: Option<std::time::Duration>) {
        let (tls, engine) = (Arc::clone(&self.tls), Arc::clone(&self.engine));
        let renewals = Arc::clone(&self.renewals);
        let watched = self.watched.clone();
        tokio::spawn(async move {
            let mut hangups =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(hangups) => Some(hangups),
                    Err(_) => {
                        tracing::warn!(
                            "cannot listen for SIGHUP; reloads follow file changes only"
                        );
                        None
                    }
                };
            let mut ticks = poll.map(|every| {
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            let mut seen = fingerprint(&watched);
            loop {
                let hangup = async {
                    match hangups.as_mut() {
                        Some(hangups) => hangups.recv().await.is_some(),
                        None => std::future::pending().await,
                    }
                };
                let tick = async {
                    match ticks.as_mut() {
                        Some(ticks) => {
                            ticks.tick().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let reload = tokio::select! {
                    signalled = hangup => {
                        if !signalled {
                            return;
                        }
                        true
                    }
                    () = tick => {
                        let now = fingerprint(&watched);
                        let changed = now != seen;
                        seen = now;
                        if changed {
                            tracing::info!("certificate or data files changed");
                        }
                        changed
                    }
                };
                if reload {
                    reload_all(&tls, &renewals, &engine).await;
                    seen = fingerprint(&watched);
                }
            }
        });
    }

    /// The node's TLS configuration, to reload renewed certificates without a restart.
    pub fn tls(&self) -> Arc<TlsReloader> {
        Arc::clone(&self.tls)
    }

    /// Serves until `shutdown` completes: on `listener` if given (the caller bound it), and over
    /// a connection dialled to the coordinator if the configuration has `[outbound]`. Queries in
    /// flight on either finish before this returns.
    pub async fn serve(
        self,
        listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let service = NodeServer::new(NodeService::new(Arc::clone(&self.engine)))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let shutdown = shutdown.shared();
        let listening = async {
            let Some(listener) = listener else {
                return Ok(());
            };
            router(service.clone())
                .await?
                .serve_with_incoming_shutdown(
                    tls::accept_tls(listener, &self.tls),
                    shutdown.clone(),
                )
                .await
                .map_err(|err| NodeError::Server(err.to_string()))
        };
        let renewals = self.renewals.subscribe();
        let engine = Arc::clone(&self.engine);
        let connected: outbound::ConnectedHook =
            Arc::new(move |up| engine.set_outbound_connected(up));
        let dialling = async {
            let Some((outbound, files)) = self.outbound.clone() else {
                return Ok(());
            };
            router(service.clone())
                .await?
                .serve_with_incoming_shutdown(
                    outbound::dial(outbound, files, renewals, connected),
                    shutdown.clone(),
                )
                .await
                .map_err(|err| NodeError::Server(err.to_string()))
        };
        tokio::try_join!(listening, dialling).map(|_| ())
    }
}

/// The node's gRPC services: health, reflection and `fedq.v1.Node`.
async fn router(
    service: NodeServer<NodeService>,
) -> Result<tonic::transport::server::Router, NodeError> {
    let (health, reflection) = fedq_proto::process::standard_services::<NodeServer<NodeService>>()
        .await
        .map_err(NodeError::Server)?;
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(reflection)
        .add_service(service))
}
