//! fedq's shared contract: everything a hospital node and the alliance coordinator must agree on.
//!
//! - [`wire`]: the gRPC services and messages generated from `proto/fedq/v1/*.proto`, and the
//!   one place ([`convert`]) where wire messages become domain values and back.
//! - [`metrics`]: Prometheus counters and histograms and the `/metrics` endpoint.
//! - [`model`]: the alliance's common data model (datasets, columns, types, domains).
//! - [`template`]: the query-template language: parsing, validation against the data model,
//!   canonical bytes and content hash, typed parameter binding.
//! - [`study`]: study approvals (purpose, sites, pinned templates, validity, daily limit).
//! - [`document`]: the signed-document envelope templates travel in.
//! - [`signing`]: expert keys, signatures and the verification rule (trusted keys, quorum,
//!   revocation).
//! - [`audit_head`]: the signed head of a node's hash-chained audit log.
//! - [`rational`]: exact rationals for privacy budgets.
//! - [`summary`]: count, mean and squared deviations of values, and their exact pooling.
//! - [`register`]: the transparency register's JSON and HTML forms.
//! - [`tls`]: certificate loading, mutual-TLS configuration and certificate identities.
//! - [`config`]: layered configuration (TOML file, then environment overrides).
//! - [`process`]: graceful-shutdown signals shared by the service binaries.
//!
//! Neither side trusts the other's parsing: the node re-parses and re-validates the canonical
//! template bytes it receives against its own copy of the data model.

pub mod audit_head;
pub mod config;
pub mod convert;
pub mod document;
mod error;
pub mod metrics;
pub mod model;
pub mod process;
pub mod rational;
pub mod register;
pub mod signing;
pub mod study;
pub mod summary;
pub mod template;
pub mod tls;

pub use error::{Error, TemplateProblem};

/// Generated gRPC code for package `fedq.v1`.
#[allow(clippy::all, missing_docs)]
pub mod wire {
    tonic::include_proto!("fedq.v1");
}

/// The encoded protobuf descriptor set of `fedq.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fedq_descriptor.bin"));

/// The wire protocol version both sides announce.
pub const PROTOCOL_VERSION: &str = "fedq.v1";

/// Request and response metadata in which the coordinator offers the protocol versions it
/// speaks (comma-separated) and a node answers with the one it chose.
pub const PROTOCOL_HEADER: &str = "fedq-protocol";

/// Whether an offer (`"fedq.v1"`, `"fedq.v2, fedq.v1"`) includes this build's protocol.
pub fn protocol_offered(offer: &str) -> bool {
    offer
        .split(',')
        .any(|version| version.trim() == PROTOCOL_VERSION)
}

/// The fedq software version of this build.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
