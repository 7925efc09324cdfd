//! The coordinator's side of outbound-only nodes: nodes behind firewalls dial `tunnel_listen`,
//! both sides authenticate with mutual TLS (the node's client certificate must carry the
//! identity configured for an outbound site), and the connection waits in that site's slot
//! until the site's gRPC channel takes it and speaks HTTP/2 over it as the client — so every
//! query reaches an outbound node exactly as it reaches a listening one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedq_proto::tls::{self, TlsReloader};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::config::{NodeAddress, NodeEntry};

/// How long a call waits for an outbound node to dial in before it counts as unreachable (the
/// fan-out then tries once more).
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// The connection an outbound site dialled, until its channel takes it.
#[derive(Debug)]
struct Slot {
    site_id: String,
    waiting: Mutex<Option<TlsStream<TcpStream>>>,
    arrived: Notify,
}

impl Slot {
    fn put(&self, stream: TlsStream<TcpStream>) {
        // A newer connection replaces one nobody took (the node dialled again after losing it).
        *self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(stream);
        self.arrived.notify_one();
    }

    fn take_now(&self) -> Option<TlsStream<TcpStream>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    async fn take(&self) -> std::io::Result<TokioIo<Waited>> {
        let waited = tokio::time::timeout(CONNECT_WAIT, async {
            loop {
                if let Some(stream) = self.take_now().and_then(Waited::alive) {
                    return stream;
                }
                self.arrived.notified().await;
            }
        })
        .await;
        waited.map(TokioIo::new).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!(
                    "site {} connects outbound and has no connection open to this coordinator; check that its node runs and can reach tunnel_listen",
                    self.site_id
                ),
            )
        })
    }
}

/// A connection that waited in a slot, with what the node already sent on it (its HTTP/2
/// settings) read ahead, to tell whether the node is still there; reads replay it first.
pub struct Waited {
    early: Vec<u8>,
    stream: TlsStream<TcpStream>,
}

impl Waited {
    /// Reads what is available without waiting: a connection the node closed meanwhile (it
    /// stopped, or dialled again) ends or fails and is dropped.
    fn alive(mut stream: TlsStream<TcpStream>) -> Option<Waited> {
        use tokio::io::AsyncRead;
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut early = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let mut buffer = tokio::io::ReadBuf::new(&mut chunk);
            match std::pin::Pin::new(&mut stream).poll_read(&mut context, &mut buffer) {
                std::task::Poll::Pending => return Some(Waited { early, stream }),
                std::task::Poll::Ready(Ok(())) if buffer.filled().is_empty() => return None,
                std::task::Poll::Ready(Ok(())) => early.extend_from_slice(buffer.filled()),
                std::task::Poll::Ready(Err(_)) => return None,
            }
        }
    }
}

impl tokio::io::AsyncRead for Waited {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let taken = self.early.len().min(buffer.remaining());
            buffer.put_slice(&self.early[..taken]);
            self.early.drain(..taken);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl tokio::io::AsyncWrite for Waited {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(context, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

/// One slot per outbound site, found by the identity its certificate must carry.
#[derive(Debug, Clone, Default)]
pub struct Tunnels {
    by_identity: Arc<BTreeMap<String, Arc<Slot>>>,
}

impl Tunnels {
    /// Slots for the configured nodes whose address is [`NodeAddress::Outbound`].
    pub fn new(nodes: &[NodeEntry]) -> Tunnels {
        let by_identity = nodes
            .iter()
            .filter(|node| node.address == NodeAddress::Outbound)
            .map(|node| {
                let slot = Slot {
                    site_id: node.site_id.clone(),
                    waiting: Mutex::new(None),
                    arrived: Notify::new(),
                };
                (node.identity.clone(), Arc::new(slot))
            })
            .collect();
        Tunnels {
            by_identity: Arc::new(by_identity),
        }
    }

    /// A channel to outbound site `identity` over `endpoint`'s settings: each time it needs a
    /// connection it takes the next one that site dialled (waiting up to 3 s).
    pub fn channel(&self, endpoint: &Endpoint, identity: &str) -> Channel {
        let slot = self.by_identity.get(identity).cloned();
        let identity = identity.to_string();
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let slot = slot.clone();
            let identity = identity.clone();
            async move {
                match slot {
                    Some(slot) => slot.take().await,
                    None => Err(std::io::Error::other(format!(
                        "no outbound site has identity {identity}"
                    ))),
                }
            }
        }))
    }

    /// Accepts outbound nodes on `listener` (mutual TLS with `tls`) until the returned task is
    /// aborted. A connection whose certificate names no outbound site is closed and logged.
    pub fn accept(&self, listener: TcpListener, tls: &TlsReloader) -> tokio::task::JoinHandle<()> {
        let mut incoming = tls::accept_tls(listener, tls);
        let tunnels = self.clone();
        tokio::spawn(async move {
            while let Some(accepted) = incoming.next().await {
                let Ok(stream) = accepted else { continue };
                let identities = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| tls::peer_identities(chain).ok())
                    .unwrap_or_default();
                match identities
                    .iter()
                    .find_map(|identity| tunnels.by_identity.get(identity))
                {
                    Some(slot) => {
                        tracing::info!(site = %slot.site_id, "outbound node connected");
                        slot.put(stream);
                    }
                    None => tracing::warn!(
                        identities = %identities.join(", "),
                        "a node dialled the tunnel port with a certificate of no outbound site; connection closed (list it in [[nodes]] with outbound = true)"
                    ),
                }
            }
        })
    }
}
