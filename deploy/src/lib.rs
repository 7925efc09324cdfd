//! The local-alliance launcher: everything needed to run fedq on one machine without a
//! hospital — synthetic data, development certificates, real nodes and a real coordinator on
//! loopback — plus the demo and the benchmark built on them. It sits above the node and
//! coordinator crates, which never depend on each other.
//!
//! - [`synth`]: seeded synthetic trauma-registry data in each site's local format.
//! - [`alliance`]: writing configurations and starting nodes and a coordinator.
//! - [`demo`]: the main job (`cargo run --release -- demo`).
//! - [`bench`](mod@bench): node query speed end to end versus the bare polars plan.
//! - [`prepare`]: the files of a three-site alliance for containers (compose).

pub mod alliance;
pub mod bench;
pub mod demo;
pub mod prepare;
pub mod synth;

use std::path::Path;

use fedq_proto::wire::node_client::NodeClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A direct mutual-TLS client to one node, presenting `cert`/`key` and expecting the node to
/// prove `node_identity`. Used by the benchmark and by tests that bypass the coordinator.
pub async fn node_client(
    address: &str,
    ca_cert: &Path,
    client_cert: Option<(&Path, &Path)>,
    node_identity: &str,
) -> anyhow::Result<NodeClient<Channel>> {
    Ok(NodeClient::new(
        tls_channel(address, ca_cert, client_cert, node_identity).await?,
    ))
}

/// A connected TLS channel to a fedq server (a node, or the coordinator), presenting
/// `client_cert` when given and expecting the server to prove `server_identity`; for any of its
/// services (fedq, health, reflection).
pub async fn tls_channel(
    address: &str,
    ca_cert: &Path,
    client_cert: Option<(&Path, &Path)>,
    server_identity: &str,
) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca_cert)?))
        .domain_name(server_identity);
    if let Some((cert, key)) = client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    }
    Ok(Channel::from_shared(address.to_string())?
        .tls_config(tls)?
        .connect()
        .await?)
}
