//! Calling every node: one lazily connected mutual-TLS channel per node (verified against the
//! alliance CA and the node's expected identity; for an outbound node, over the connection it
//! dialled, see [`crate::tunnel`]), requests sent to all nodes at once, each
//! bounded by its deadline, so a dead or slow node never holds up the answer. Replies are
//! classified into the per-site statuses a study lead sees.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, Stream};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use fedq_proto::tls;
use fedq_proto::wire::{self, RefusalCode, node_client::NodeClient};

use crate::CoordinatorError;
use crate::config::{CoordinatorConfig, NodeAddress, NodeEntry};
use crate::tunnel::Tunnels;

/// How often the coordinator pings an outbound node's connection, and how long it waits for
/// the answer before treating the connection as lost.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
use crate::error::error_chain;

/// How one site's call ended.
#[derive(Debug, Clone)]
pub enum SiteCall {
    Answered(Box<wire::SiteResult>),
    Refused { code: RefusalCode, message: String },
    TimedOut,
    Unreachable(String),
    Failed(String),
}

/// One site's reply with how long it took.
#[derive(Debug, Clone)]
pub struct SiteReply {
    pub site_id: String,
    pub call: SiteCall,
    pub elapsed: Duration,
}

/// Clients for every configured node.
#[derive(Debug, Clone)]
pub struct NodeClients {
    nodes: Vec<(NodeEntry, NodeClient<Channel>)>,
    tunnels: Tunnels,
}

impl NodeClients {
    /// Prepares a channel per node; connections are made on first use and re-made after loss.
    pub fn new(config: &CoordinatorConfig) -> Result<NodeClients, CoordinatorError> {
        let ca = Certificate::from_pem(tls::read_pem(&config.tls.ca_cert)?);
        let identity = Identity::from_pem(
            tls::read_pem(&config.tls.cert)?,
            tls::read_pem(&config.tls.key)?,
        );
        let tunnels = Tunnels::new(&config.nodes);
        let mut nodes = Vec::new();
        for entry in &config.nodes {
            let problem = |what: &str, err: &dyn std::fmt::Display| {
                CoordinatorError::Config(vec![format!(
                    "nodes: site '{}': {what}: {err}",
                    entry.site_id
                )])
            };
            let channel = match &entry.address {
                NodeAddress::Listening(url) => {
                    let tls_config = ClientTlsConfig::new()
                        .ca_certificate(ca.clone())
                        .identity(identity.clone())
                        .domain_name(entry.identity.clone());
                    Channel::from_shared(url.clone())
                        .map_err(|err| problem("address", &err))?
                        .tls_config(tls_config)
                        .map_err(|err| problem("tls", &err))?
                        .connect_timeout(config.default_deadline)
                        .connect_lazy()
                }
                NodeAddress::Outbound => {
                    // TLS is already established on the connection the node dialled; the
                    // URL only names the site in HTTP/2 requests.
                    let endpoint = Endpoint::from_shared(format!("http://{}", entry.identity))
                        .map_err(|err| problem("identity", &err))?
                        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                        .keep_alive_while_idle(true);
                    tunnels.channel(&endpoint, &entry.identity)
                }
            };
            let client = NodeClient::new(channel)
                .max_decoding_message_size(16 * 1024 * 1024)
                .max_encoding_message_size(1024 * 1024);
            nodes.push((entry.clone(), client));
        }
        Ok(NodeClients { nodes, tunnels })
    }

    /// The slots outbound nodes' connections arrive in.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    pub fn entries(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.iter().map(|(entry, _)| entry)
    }

    /// Sends `request` to every node at once; yields each reply as it arrives. Every node
    /// yields exactly one reply, at the latest when `deadline` has passed. A node that could not
    /// be reached is tried once more within the deadline: the retry is the same request (same
    /// request id and content), so the node counts it once against the daily limit and charges
    /// no privacy budget twice.
    pub fn run_query(
        &self,
        request: wire::QueryRequest,
        deadline: Duration,
        held: &std::collections::BTreeMap<String, String>,
    ) -> impl Stream<Item = SiteReply> + use<> {
        self.nodes
            .iter()
            .map(|(entry, client)| {
                let mut client = client.clone();
                let site_id = entry.site_id.clone();
                let request = request.clone();
                let hold = held.get(&site_id).cloned();
                async move {
                    let started = Instant::now();
                    if let Some(reason) = hold {
                        return SiteReply {
                            call: SiteCall::Failed(held_message(&site_id, &reason)),
                            site_id,
                            elapsed: started.elapsed(),
                        };
                    }
                    let mut retried = false;
                    let call = loop {
                        let remaining = deadline.saturating_sub(started.elapsed());
                        let call = with_timeout(request.clone(), remaining);
                        let outcome =
                            match tokio::time::timeout(remaining, client.run_query(call)).await {
                                Ok(Ok(response)) => match check_protocol(&response) {
                                    Ok(()) => SiteCall::Answered(Box::new(response.into_inner())),
                                    Err(problem) => SiteCall::Failed(problem),
                                },
                                Ok(Err(status)) => classify(status),
                                Err(_) => SiteCall::TimedOut,
                            };
                        if matches!(outcome, SiteCall::Unreachable(_))
                            && !retried
                            && started.elapsed() < deadline
                        {
                            retried = true;
                            tracing::info!(site = %site_id, "node unreachable; trying once more");
                            continue;
                        }
                        break outcome;
                    };
                    SiteReply {
                        site_id,
                        call,
                        elapsed: started.elapsed(),
                    }
                }
            })
            .collect::<FuturesUnordered<_>>()
    }

    /// Makes one unary call to every node, concurrently, each within `deadline`.
    async fn call_all<T, F, Fut>(
        &self,
        deadline: Duration,
        call: F,
    ) -> Vec<(NodeEntry, Result<T, String>)>
    where
        F: Fn(NodeClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let calls = self.nodes.iter().map(|(entry, client)| {
            let pending = call(client.clone(), deadline);
            async move {
                let outcome = match tokio::time::timeout(deadline, pending).await {
                    Ok(Ok(response)) => Ok(response.into_inner()),
                    Ok(Err(status)) => Err(describe_call(&classify(status))),
                    Err(_) => Err(describe_call(&SiteCall::TimedOut)),
                };
                (entry.clone(), outcome)
            }
        });
        futures::future::join_all(calls).await
    }

    /// Asks every node to describe itself.
    pub async fn describe_all(
        &self,
        deadline: Duration,
    ) -> Vec<(NodeEntry, Result<wire::SiteDescription, String>)> {
        self.call_all(deadline, |mut client, deadline| async move {
            client
                .describe(with_timeout(wire::DescribeRequest {}, deadline))
                .await
        })
        .await
    }

    /// Asks every node for its latest signed audit head.
    pub async fn audit_heads_all(
        &self,
        deadline: Duration,
    ) -> Vec<(NodeEntry, Result<wire::SignedAuditHead, String>)> {
        self.call_all(deadline, |mut client, deadline| async move {
            client
                .audit_head(with_timeout(wire::AuditHeadRequest {}, deadline))
                .await
        })
        .await
    }

    /// Asks every node for its transparency register.
    pub async fn registers_all(
        &self,
        deadline: Duration,
    ) -> Vec<(NodeEntry, Result<wire::SiteRegister, String>)> {
        self.call_all(deadline, |mut client, deadline| async move {
            client
                .transparency_register(with_timeout(wire::RegisterRequest {}, deadline))
                .await
        })
        .await
    }
}

/// A node request with its deadline and the protocol versions this coordinator speaks.
fn with_timeout<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request.metadata_mut().insert(
        fedq_proto::PROTOCOL_HEADER,
        tonic::metadata::MetadataValue::from_static(fedq_proto::PROTOCOL_VERSION),
    );
    request
}

/// A node's answer is usable only in a protocol this coordinator speaks.
fn check_protocol<T>(response: &tonic::Response<T>) -> Result<(), String> {
    let chosen = response
        .metadata()
        .get(fedq_proto::PROTOCOL_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("(none)");
    if chosen == fedq_proto::PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "the node answered in protocol {chosen}; this coordinator speaks {} — upgrade one of them",
            fedq_proto::PROTOCOL_VERSION
        ))
    }
}

/// Why a held site was not asked, for the study lead.
pub fn held_message(site_id: &str, reason: &str) -> String {
    format!(
        "not asked: site {site_id} is held {reason}; an administrator lifts the hold with `fedq audit-heads --site {site_id} --acknowledge` once the site is checked"
    )
}

/// Sorts a failed call into refused (the node's own typed reason), timed out, unreachable or
/// failed.
pub fn classify(status: Status) -> SiteCall {
    if !status.details().is_empty()
        && let Ok(refusal) = wire::Refusal::decode(status.details())
    {
        return SiteCall::Refused {
            code: RefusalCode::try_from(refusal.code).unwrap_or(RefusalCode::Unspecified),
            message: refusal.message,
        };
    }
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => SiteCall::TimedOut,
        Code::Unavailable => SiteCall::Unreachable(error_chain(&status)),
        // The connection broke after the request was sent: not retried (the node may have
        // computed it), and said plainly.
        Code::Unknown if status.message() == "transport error" => SiteCall::Failed(format!(
            "the connection to the site broke before it answered ({}); its node may have stopped or restarted — the site's administrator can check it",
            innermost_cause(&status)
        )),
        _ => SiteCall::Failed(error_chain(&status)),
    }
}

/// The deepest cause of an error (e.g. "connection reset").
fn innermost_cause(err: &dyn std::error::Error) -> String {
    let mut deepest = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() {
            deepest = text;
        }
        source = cause.source();
    }
    deepest
}

/// Why a call did not produce an answer, for a person (empty for an answer).
pub fn reason(call: &SiteCall) -> String {
    match call {
        SiteCall::Answered(_) => String::new(),
        SiteCall::Refused { message, .. } => message.clone(),
        SiteCall::TimedOut => "no answer within the deadline".into(),
        SiteCall::Unreachable(reason) | SiteCall::Failed(reason) => reason.clone(),
    }
}

/// A one-line description of a call's outcome: its status word and reason.
pub fn describe_call(call: &SiteCall) -> String {
    let status = match call {
        SiteCall::Answered(_) => return "answered".into(),
        SiteCall::Refused { .. } => "refused",
        SiteCall::TimedOut => "timed out",
        SiteCall::Unreachable(_) => "unreachable",
        SiteCall::Failed(_) => "failed",
    };
    format!("{status}: {}", reason(call))
}
