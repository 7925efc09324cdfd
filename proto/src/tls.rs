//! Transport security shared by node and coordinator: the one rustls crypto provider (ring),
//! PEM loading, mutual-TLS server configuration, the accept loop that performs handshakes off
//! the critical path, and how a certificate's identity is read (its DNS subject alternative
//! names).
//!
//! Clients (coordinator → node, CLI → coordinator) use tonic's `ClientTlsConfig`, which
//! verifies the server against the alliance CA and the expected identity; a node dialling out
//! to the coordinator uses [`mutual_tls_client_config`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::Error;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections are closed until one finishes, so
/// clients without certificates cannot exhaust the server's file descriptors.
const MAX_PENDING_HANDSHAKES: usize = 128;

/// Installs ring as the process-wide rustls crypto provider. Call once at start-up (tests may
/// call it repeatedly; later calls do nothing).
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// PEM files a TLS endpoint needs: the alliance CA, its own certificate chain and key. The
/// `[tls]` section of node and coordinator configurations.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_cert: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl TlsFiles {
    /// The same files with relative paths resolved against `base`.
    pub fn resolved(&self, base: &Path) -> TlsFiles {
        TlsFiles {
            ca_cert: crate::config::resolve_path(base, &self.ca_cert),
            cert: crate::config::resolve_path(base, &self.cert),
            key: crate::config::resolve_path(base, &self.key),
        }
    }

    /// One configuration problem per file that does not exist.
    pub fn missing_files(&self) -> Vec<String> {
        [
            ("tls.ca_cert", &self.ca_cert),
            ("tls.cert", &self.cert),
            ("tls.key", &self.key),
        ]
        .into_iter()
        .filter(|(_, path)| !path.is_file())
        .map(|(key, path)| format!("{key}: file {} does not exist", path.display()))
        .collect()
    }
}

/// Reads the certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|err| {
            Error::Tls(format!(
                "cannot read certificates from {}: {err}",
                path.display()
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|err| {
            Error::Tls(format!(
                "{} holds an unreadable certificate: {err}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|err| {
        Error::Tls(format!(
            "cannot read a private key from {}: {err}",
            path.display()
        ))
    })
}

/// Reads a PEM file as text (for tonic's client configuration).
pub fn read_pem(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca_cert: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_cert)? {
        roots.add(cert).map_err(|err| {
            Error::Tls(format!(
                "{} is not a usable CA certificate: {err}",
                ca_cert.display()
            ))
        })?;
    }
    Ok(roots)
}

/// A server configuration that *requires* a client certificate issued by the CA in
/// `files.ca_cert` (mutual TLS). Which identities are then allowed is the caller's decision.
pub fn mutual_tls_server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, Error> {
    let roots = root_store(&files.ca_cert)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|err| {
            Error::Tls(format!(
                "cannot build the client-certificate verifier: {err}"
            ))
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Tls(err.to_string()))?
        .with_client_cert_verifier(verifier);
    finish_server_config(config, files)
}

/// A server configuration for clients that authenticate by other means (study-lead CLIs):
/// the server proves its identity; client certificates are not requested.
pub fn server_only_tls_config(files: &TlsFiles) -> Result<rustls::ServerConfig, Error> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Tls(err.to_string()))?
        .with_no_client_auth();
    finish_server_config(config, files)
}

fn finish_server_config(
    builder: rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    files: &TlsFiles,
) -> Result<rustls::ServerConfig, Error> {
    let certs = load_certs(&files.cert)?;
    let identities = certificate_identities(&certs[0])?;
    if identities.is_empty() {
        return Err(Error::Tls(format!(
            "certificate {} names no DNS identity (subjectAltName); peers could not verify it. Re-issue it with the identity as a DNS subjectAltName (see deploy/CERTIFICATES.md)",
            files.cert.display()
        )));
    }
    let key = load_key(&files.key)?;
    let mut config = builder.with_single_cert(certs, key).map_err(|err| {
        Error::Tls(format!(
            "certificate {} and key {} do not form a usable pair: {err}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client configuration for dialling out with this endpoint's own certificate (mutual TLS):
/// the server is verified against the alliance CA; its expected identity is given per
/// connection. Used by nodes that connect outbound to the coordinator.
pub fn mutual_tls_client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, Error> {
    let roots = root_store(&files.ca_cert)?;
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|err| {
            Error::Tls(format!(
                "certificate {} and key {} do not form a usable pair: {err}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What [`check_certificate`] found about an endpoint's own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateReport {
    pub identities: Vec<String>,
    /// Whole days until the certificate expires.
    pub days_left: i64,
}

/// Checks an endpoint's certificate the way its peers will: it chains to the CA, is valid now
/// for its own DNS identity, and its key matches. Each failure says what is wrong.
pub fn check_certificate(files: &TlsFiles) -> Result<CertificateReport, Error> {
    let certs = load_certs(&files.cert)?;
    let identities = certificate_identities(&certs[0])?;
    let Some(identity) = identities.first() else {
        return Err(Error::Tls(format!(
            "certificate {} names no DNS identity (subjectAltName)",
            files.cert.display()
        )));
    };
    let roots = root_store(&files.ca_cert)?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|err| Error::Tls(format!("cannot build a certificate verifier: {err}")))?;
    let name = rustls::pki_types::ServerName::try_from(identity.clone())
        .map_err(|_| Error::Tls(format!("'{identity}' is not a valid DNS name")))?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &certs[0],
        &certs[1..],
        &name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .map_err(|err| {
        Error::Tls(format!(
            "certificate {} does not verify against CA {} as '{identity}': {err}",
            files.cert.display(),
            files.ca_cert.display()
        ))
    })?;
    mutual_tls_server_config(files)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|err| Error::Tls(format!("unreadable certificate: {err}")))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let days_left = (parsed.validity().not_after.timestamp() - now) / 86_400;
    Ok(CertificateReport {
        identities,
        days_left,
    })
}

/// Checks that an endpoint's certificate also works as a *client* certificate at a peer that
/// requires mutual TLS (a node dialling the coordinator presents it so): it chains to the CA
/// and allows client authentication (extended key usage clientAuth).
pub fn check_client_certificate(files: &TlsFiles) -> Result<(), Error> {
    let certs = load_certs(&files.cert)?;
    let roots = root_store(&files.ca_cert)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|err| Error::Tls(format!("cannot build a certificate verifier: {err}")))?;
    verifier
        .verify_client_cert(&certs[0], &certs[1..], rustls::pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|err| {
            Error::Tls(format!(
                "certificate {} cannot be used as a client certificate: {err}; outbound mode presents it to the coordinator, so it needs extended key usage clientAuth (see deploy/CERTIFICATES.md)",
                files.cert.display()
            ))
        })
}

/// The identities a certificate asserts: its DNS subject alternative names.
pub fn certificate_identities(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|err| Error::Tls(format!("unreadable certificate: {err}")))?;
    let mut names = Vec::new();
    if let Ok(Some(extension)) = parsed.subject_alternative_name() {
        for name in &extension.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    Ok(names)
}

/// The identities of a peer: the DNS names of the first certificate of its chain.
pub fn peer_identities(chain: &[CertificateDer<'_>]) -> Result<Vec<String>, Error> {
    let leaf = chain
        .first()
        .ok_or_else(|| Error::Tls("the peer presented no certificate".into()))?;
    certificate_identities(leaf)
}

/// A server's TLS configuration that can be replaced while it serves: new connections use the
/// newest configuration, established ones keep theirs. Built from the configured files by
/// `build`; [`TlsReloader::reload`] reads them again (after certificates were renewed).
pub struct TlsReloader {
    build: Box<dyn Fn() -> Result<rustls::ServerConfig, Error> + Send + Sync>,
    current: tokio::sync::watch::Sender<TlsAcceptor>,
}

impl TlsReloader {
    /// Builds the first configuration; fails as start-up would.
    pub fn new(
        build: impl Fn() -> Result<rustls::ServerConfig, Error> + Send + Sync + 'static,
    ) -> Result<TlsReloader, Error> {
        let first = TlsAcceptor::from(Arc::new(build()?));
        Ok(TlsReloader {
            build: Box::new(build),
            current: tokio::sync::watch::channel(first).0,
        })
    }

    /// Reads the certificate files again and uses them for new connections. A configuration
    /// that does not load (a half-copied key, a certificate not matching its key) is refused
    /// and the current one kept.
    pub fn reload(&self) -> Result<(), Error> {
        let next = TlsAcceptor::from(Arc::new((self.build)()?));
        self.current.send_replace(next);
        Ok(())
    }

    /// [`TlsReloader::reload`], with its outcome in the log; true when it succeeded.
    pub fn reload_logged(&self) -> bool {
        match self.reload() {
            Ok(()) => {
                tracing::info!("tls certificates reloaded");
                true
            }
            Err(err) => {
                tracing::error!(error = %err, "tls certificates not reloaded; the previous ones stay in use");
                false
            }
        }
    }

    fn acceptors(&self) -> tokio::sync::watch::Receiver<TlsAcceptor> {
        self.current.subscribe()
    }

    /// Reloads on every SIGHUP until the process ends (logging the outcome).
    pub fn reload_on_hangup(self: Arc<Self>) {
        tokio::spawn(async move {
            let Ok(mut hangups) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                tracing::warn!("cannot listen for SIGHUP; certificates reload only on restart");
                return;
            };
            while hangups.recv().await.is_some() {
                self.reload_logged();
            }
        });
    }
}

/// Accepts TCP connections on `listener` and completes TLS handshakes in their own tasks, so a
/// slow or hostile client never holds up others. Yields established streams for
/// `tonic::transport::Server::serve_with_incoming*`. Failed handshakes are logged (they are
/// how wrong or missing client certificates show up) and dropped. Each handshake uses the
/// reloader's newest configuration.
pub fn accept_tls(
    listener: TcpListener,
    reloader: &TlsReloader,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let acceptors = reloader.acceptors();
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = sender.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small request/response exchanges must not wait for Nagle's algorithm.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %err, "cannot disable Nagle's algorithm");
            }
            let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
                tracing::warn!(%peer, "too many tls handshakes in progress; connection dropped");
                continue;
            };
            let acceptor = acceptors.borrow().clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%peer, error = %err, "tls handshake failed; connection dropped");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "tls handshake timed out; connection dropped");
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
