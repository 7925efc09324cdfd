//! fedq coordinator: holds the alliance's catalogue of approved templates, fans a study lead's
//! query out to every hospital node over mutual TLS with a per-site deadline, pools the
//! released cells, and reports each site's status. Also the study lead's client side (the
//! `fedq` CLI) and development certificates.
//!
//! - [`config`]: the coordinator's TOML configuration.
//! - [`catalogue`]: approved templates loaded from a folder and checked against the data model.
//! - [`fanout`]: calling every node concurrently, each bounded by its deadline.
//! - [`heads`]: collecting the nodes' signed audit heads.
//! - [`pool`]: summing released cells across sites; incomplete cells stay marked.
//! - [`odds`]: odds ratios from 2x2 tables: per site, crude, Mantel-Haenszel, Breslow-Day.
//! - [`regression`]: federated logistic regression by Newton-Raphson on the sites' parts.
//! - [`quality`]: the data-quality report: per-site shares flagged against the standard.
//! - [`survival`]: pooling survival curves on shared interval starts, with Greenwood bands.
//! - [`service`] / [`server`]: the `fedq.v1.Coordinator` gRPC service over TLS.
//! - [`client`] / [`render`]: the CLI's connection to the coordinator and its tables and JSON.
//! - [`store`]: the coordinator's SQLite records: nodes' signed audit heads and the
//!   contribution ledger.
//! - [`tunnel`]: connections outbound-only nodes dial in, handed to their channels.
//! - [`users`]: study leads, experts and administrators, authenticated by API tokens.
//! - [`certs`]: a development certificate authority (`fedq certs`).
//! - [`experts`]: expert keys, signing and verifying templates (`fedq keys`, `fedq template`).

pub mod catalogue;
pub mod certs;
pub mod client;
pub mod config;
mod error;
pub mod experts;
pub mod fanout;
pub mod heads;
pub mod odds;
pub mod pool;
pub mod quality;
pub mod regression;
pub mod render;
pub mod server;
pub mod service;
pub mod store;
pub mod survival;
pub mod tunnel;
pub mod users;

pub use error::CoordinatorError;
