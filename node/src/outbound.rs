//! Outbound-only mode: for hospitals whose firewall allows no inbound connections, the node
//! dials the coordinator's tunnel port, completes mutual TLS as the client (the coordinator must
//! present `outbound.coordinator_identity` from the alliance CA), and then serves the ordinary
//! `fedq.v1.Node` service over that one connection: the coordinator sends its queries down it.
//! Authorisation, verification, disclosure control and audit are the same code path as for a
//! listening node. A lost connection is dialled again, with back-off.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedq_proto::tls::{self, TlsFiles};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Where an outbound-only node dials (`[outbound]` in the node configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// `host:port` of the coordinator's `tunnel_listen`.
    pub coordinator: String,
    /// The DNS name the coordinator's certificate must carry.
    pub coordinator_identity: String,
}

/// How long one dial (TCP connect and TLS handshake) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait after a failed dial; doubles up to [`MOST_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MOST_BACKOFF: Duration = Duration::from_secs(30);

/// The certificate identities of the coordinator at the other end of a dialled connection, as
/// request extension (the listening path reads them from tonic's TLS connection info instead).
#[derive(Debug, Clone)]
pub struct DialledPeer {
    pub identities: Vec<String>,
}

/// One established connection to the coordinator. When the server drops it (the connection
/// ended), the dialler learns so and dials again.
pub struct Dialled {
    stream: TlsStream<TcpStream>,
    peer: DialledPeer,
    /// Dropped with the connection, which tells the dialler to dial again.
    _closed: oneshot::Sender<()>,
}

impl tonic::transport::server::Connected for Dialled {
    type ConnectInfo = DialledPeer;

    fn connect_info(&self) -> DialledPeer {
        self.peer.clone()
    }
}

impl AsyncRead for Dialled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dialled {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Dials the coordinator once: TCP, then TLS with this node's certificate, verifying the
/// coordinator's certificate for `outbound.coordinator_identity`.
async fn dial_once(
    outbound: &Outbound,
    files: &TlsFiles,
) -> Result<(TlsStream<TcpStream>, DialledPeer), String> {
    // Read on every dial, so renewed certificates are used without a restart.
    let config = tls::mutual_tls_client_config(files).map_err(|err| err.to_string())?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(
        outbound.coordinator_identity.clone(),
    )
    .map_err(|_| {
        format!(
            "outbound.coordinator_identity '{}' is not a DNS name",
            outbound.coordinator_identity
        )
    })?;
    let connect = async {
        let tcp = TcpStream::connect(&outbound.coordinator)
            .await
            .map_err(|err| format!("cannot connect to {}: {err}", outbound.coordinator))?;
        let _ = tcp.set_nodelay(true);
        // A connection waiting for the coordinator's first request carries no HTTP/2 pings
        // yet; TCP keepalive notices a coordinator that vanished without closing it.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        if let Err(err) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %err, "cannot enable tcp keepalive");
        }
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|err| {
                format!(
                    "tls with {} as '{}' failed: {err}",
                    outbound.coordinator, outbound.coordinator_identity
                )
            })
    };
    let stream = tokio::time::timeout(DIAL_TIMEOUT, connect)
        .await
        .map_err(|_| {
            format!(
                "no connection to {} within {} s",
                outbound.coordinator,
                DIAL_TIMEOUT.as_secs()
            )
        })??;
    let identities = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(tls::peer_identities)
        .transpose()
        .map_err(|err| err.to_string())?
        .unwrap_or_default();
    Ok((stream, DialledPeer { identities }))
}

/// Keeps one connection to the coordinator open for as long as the returned stream is served:
/// dials, hands the connection to the server, waits until it ends, dials again (failed dials
/// back off from 1 s to 30 s, and so do connections the coordinator ends at once, e.g. because
/// it does not know this node's identity). Every outcome is logged without request content.
pub fn dial(
    outbound: Outbound,
    files: TlsFiles,
) -> ReceiverStream<Result<Dialled, std::io::Error>> {
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let dialled = tokio::select! {
                dialled = dial_once(&outbound, &files) => dialled,
                () = sender.closed() => return,
            };
            match dialled {
                Ok((stream, peer)) => {
                    let (closed, ended) = oneshot::channel();
                    let connection = Dialled {
                        stream,
                        peer,
                        _closed: closed,
                    };
                    tracing::info!(coordinator = %outbound.coordinator, "connected to the coordinator (outbound mode)");
                    let opened = tokio::time::Instant::now();
                    if sender.send(Ok(connection)).await.is_err() {
                        return;
                    }
                    // Resolves (with an error) once the server dropped the connection.
                    let _ = ended.await;
                    tracing::info!(coordinator = %outbound.coordinator, "connection to the coordinator ended; dialling again");
                    if opened.elapsed() >= MOST_BACKOFF {
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                }
                Err(problem) => {
                    tracing::warn!(coordinator = %outbound.coordinator, %problem, retry_in_s = backoff.as_secs(), "cannot reach the coordinator (outbound mode)");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = sender.closed() => return,
            }
            backoff = (backoff * 2).min(MOST_BACKOFF);
        }
    });
    ReceiverStream::new(receiver)
}
