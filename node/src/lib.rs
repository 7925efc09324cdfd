//! fedq hospital node: answers approved aggregate queries from the site's own data and releases
//! only thresholded summaries.
//!
//! A query's path through this crate ([`query::QueryEngine::run`]):
//! caller authorisation and document verification ([`verify`]) → template check and parameter
//! binding against the site's data (`fedq_proto::template`) → a polars plan over the in-memory
//! snapshot ([`plan`]) → disclosure control on true counts ([`disclosure`]) → the audit record
//! ([`audit`]: hash-chained, durable before the reply, or the query is refused) → the reply
//! ([`service`]).
//!
//! - [`config`]: the node's TOML configuration and its validation.
//! - [`check`]: the pre-flight report of `fedq-node check`.
//! - [`cli`]: the `fedq-node` command line (`serve`, `check`, `audit`).
//! - [`dp`]: differential privacy: exact discrete Laplace noise and the privacy budget.
//! - [`overlap`]: query-set overlap control over remembered released record sets.
//! - [`survival`]: the intervals of a survival curve a site may release (merged, never dropped).
//! - [`records`]: stable keyed-hash record identities and their dense numbers.
//! - [`regression`]: one site's safe part of a logistic regression step.
//! - [`limits`]: each study's daily query limit, kept in the node's state directory.
//! - [`data`]: loading Parquet/CSV files and mapping local columns onto the common data model.
//! - [`server`]: serving the `fedq.v1.Node` gRPC service over mutual TLS.
//! - [`outbound`]: outbound-only mode: the node dials the coordinator and serves over that link.

pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod data;
pub mod disclosure;
pub mod dp;
mod error;
pub mod limits;
pub mod outbound;
pub mod overlap;
pub mod plan;
pub mod query;
pub mod records;
pub mod regression;
pub mod server;
pub mod service;
pub mod survival;
pub mod verify;

pub use error::NodeError;
