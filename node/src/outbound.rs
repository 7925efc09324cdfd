//! Outbound-only mode: for hospitals whose firewall allows no inbound connections, the node
//! dials the coordinator's tunnel port, completes mutual TLS as the client (the coordinator must
//! present `outbound.coordinator_identity` from the alliance CA), and then serves the ordinary
//! `fedq.v1.Node` service over that one connection: the coordinator sends its queries down it.
//! Authorisation, verification, disclosure control and audit are the same code path as for a
//! listening node. A lost connection is dialled again, with back-off. When the node's
//! certificates are renewed (SIGHUP or a file change), it dials a new connection with them and
//! retires the old one after a grace period, so queries in flight on it finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedq_proto::tls::{self, TlsFiles};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
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

/// How long a connection replaced after a certificate renewal keeps serving queries already
/// sent on it (longer than any deadline the coordinator allows by default) before it ends.
const RETIRE_GRACE: Duration = Duration::from_secs(120);

/// A connection the coordinator ends this soon after it opened, before any use, was most
/// likely refused (certificate usage or validity, or a site not configured as outbound).
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// One established connection to the coordinator. When the server drops it (the connection
/// ended), the dialler learns so and dials again.
pub struct Dialled {
    stream: TlsStream<TcpStream>,
    peer: DialledPeer,
    /// Dropped with the connection, which tells the dialler to dial again.
    _closed: oneshot::Sender<()>,
    /// Completes when the connection is retired: reads then end, and the server closes it.
    retired: Pin<Box<dyn Future<Output = ()> + Send>>,
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
        if self.retired.as_mut().poll(cx).is_ready() {
            // End of stream: the server finishes and closes the connection.
            return Poll::Ready(Ok(()));
        }
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

/// What the dialler reports: whether a connection to the coordinator is open.
pub type ConnectedHook = Arc<dyn Fn(bool) + Send + Sync>;

/// Keeps one connection to the coordinator open for as long as the returned stream is served:
/// dials, hands the connection to the server, waits until it ends, dials again (failed dials
/// back off from 1 s to 30 s, and so do connections the coordinator ends at once, e.g. because
/// it does not accept this node's certificate). Each change of `renewals` (the certificates
/// were reloaded) dials a new connection with the renewed files and retires the current one
/// after `RETIRE_GRACE`. `connected` hears whether a connection is open. Every outcome is
/// logged without request content.
pub fn dial(
    outbound: Outbound,
    files: TlsFiles,
    mut renewals: watch::Receiver<u64>,
    connected: ConnectedHook,
) -> ReceiverStream<Result<Dialled, std::io::Error>> {
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        let mut renewable = true;
        // The open connection: when it ends, and how to retire it.
        let mut open: Option<(oneshot::Receiver<()>, watch::Sender<bool>, Instant)> = None;
        loop {
            if let Some((ended, retire, opened)) = open.take() {
                let mut ended = ended;
                tokio::select! {
                    _ = &mut ended => {
                        connected(false);
                        let lasted = opened.elapsed();
                        if lasted < REFUSED_WITHIN {
                            tracing::warn!(coordinator = %outbound.coordinator, lasted_ms = lasted.as_millis() as u64, "the coordinator closed the connection right after it opened; if this repeats, it does not accept this node: check that the node's certificate is valid and allows client authentication (fedq-node check) and that the coordinator lists this site with outbound = true (the coordinator's log names the reason)");
                        } else {
                            tracing::info!(coordinator = %outbound.coordinator, "connection to the coordinator ended; dialling again");
                        }
                        if lasted >= MOST_BACKOFF {
                            backoff = FIRST_BACKOFF;
                        } else if !pause(&sender, &mut backoff).await {
                            return;
                        }
                    }
                    changed = renewals.changed(), if renewable => {
                        if changed.is_err() {
                            // Nothing reloads certificates any more: keep the connection.
                            renewable = false;
                            open = Some((ended, retire, opened));
                            continue;
                        }
                        tracing::info!(coordinator = %outbound.coordinator, grace_s = RETIRE_GRACE.as_secs(), "certificates renewed: dialling a new connection; the current one ends after the grace period");
                        tokio::spawn(async move {
                            tokio::time::sleep(RETIRE_GRACE).await;
                            let _ = retire.send(true);
                        });
                        // The retired connection's end is expected: its `ended` is dropped.
                    }
                    () = sender.closed() => return,
                }
            }
            // Marked seen before the files are read: a renewal that lands during the dial (or
            // while the connection is handed over) is then noticed, and the node dials again
            // with the renewed files.
            renewals.borrow_and_update();
            let dialled = tokio::select! {
                dialled = dial_once(&outbound, &files) => dialled,
                () = sender.closed() => return,
            };
            match dialled {
                Ok((stream, peer)) => {
                    let (closed, ended) = oneshot::channel();
                    let (retire, retiring) = watch::channel(false);
                    let connection = Dialled {
                        stream,
                        peer,
                        _closed: closed,
                        retired: Box::pin(async move {
                            let mut retiring = retiring;
                            let _ = retiring.wait_for(|retired| *retired).await;
                        }),
                    };
                    tracing::info!(coordinator = %outbound.coordinator, "connected to the coordinator (outbound mode)");
                    if sender.send(Ok(connection)).await.is_err() {
                        return;
                    }
                    connected(true);
                    open = Some((ended, retire, Instant::now()));
                }
                Err(problem) => {
                    tracing::warn!(coordinator = %outbound.coordinator, %problem, retry_in_s = backoff.as_secs(), "cannot reach the coordinator (outbound mode)");
                    if !pause(&sender, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// Waits `backoff` (doubling it for next time, up to 30 s); false when the server stopped.
async fn pause(
    sender: &mpsc::Sender<Result<Dialled, std::io::Error>>,
    backoff: &mut Duration,
) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MOST_BACKOFF);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = sender.closed() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// Waits for `future`, as long as the longest redial back-off and some: under load a dial
    /// can fail and back off before it succeeds.
    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(MOST_BACKOFF + Duration::from_secs(10), future)
            .await
            .expect("in time")
    }

    /// A CA and certificates for `coordinator.test` and `node.test` in `dir`; the node's files.
    fn certificates(dir: &std::path::Path) -> (TlsFiles, TlsFiles) {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut files = Vec::new();
        for name in ["coordinator.test", "node.test"] {
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
            files.push(TlsFiles {
                ca_cert: dir.join("ca.pem"),
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            });
        }
        (files.remove(0), files.remove(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewed_certificates_dial_a_new_connection_and_a_lost_one_is_dialled_again() {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (coordinator, node) = certificates(dir.path());
        // The coordinator's side: the test sees each TCP connection before its TLS handshake.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, mut accepted_tcp) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let _ = accepted.send(tcp);
            }
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            tls::mutual_tls_server_config(&coordinator).unwrap(),
        ));
        let handshake = |tcp| tokio::spawn(acceptor.clone().accept(tcp));
        // What the hook hears, in order; it is called after a connection is handed over, so
        // the test waits for each report rather than reading a shared list.
        let (reports, mut heard) = mpsc::unbounded_channel();
        let hook: ConnectedHook = Arc::new(move |up| {
            let _ = reports.send(up);
        });
        let (renew, renewals) = watch::channel(0u64);
        let outbound = Outbound {
            coordinator: format!("localhost:{}", address.port()),
            coordinator_identity: "coordinator.test".into(),
        };
        let mut connections = dial(outbound, node, renewals, hook);

        // Certificates renewed while the first dial is under way (its files are already read):
        // once it is up, a second connection is dialled with the renewed files.
        let first_tcp = within(accepted_tcp.recv()).await.unwrap();
        renew.send(1).unwrap();
        let first_tls = handshake(first_tcp);
        let first = within(connections.next()).await.unwrap().unwrap();
        assert_eq!(first.peer.identities, ["coordinator.test"]);
        within(first_tls).await.unwrap().unwrap();
        let second_tls = handshake(within(accepted_tcp.recv()).await.unwrap());
        let second = within(connections.next()).await.unwrap().unwrap();
        within(second_tls).await.unwrap().unwrap();

        // Renewed while a connection is open: a third connection, while the earlier stay open.
        renew.send(2).unwrap();
        let third_tls = handshake(within(accepted_tcp.recv()).await.unwrap());
        let third = within(connections.next()).await.unwrap().unwrap();
        within(third_tls).await.unwrap().unwrap();
        let waker = std::task::Waker::noop();
        for mut earlier in [first, second] {
            assert!(
                earlier
                    .retired
                    .as_mut()
                    .poll(&mut Context::from_waker(waker))
                    .is_pending(),
                "a replaced connection is retired only after the grace period"
            );
        }

        // The server drops the third connection: the node dials again by itself.
        drop(third);
        let fourth_tls = handshake(within(accepted_tcp.recv()).await.unwrap());
        let fourth = within(connections.next()).await.unwrap().unwrap();
        within(fourth_tls).await.unwrap().unwrap();
        let mut states = Vec::new();
        for _ in 0..5 {
            states.push(within(heard.recv()).await.unwrap());
        }
        assert_eq!(states, [true, true, true, false, true]);
        drop(fourth);
    }
}
