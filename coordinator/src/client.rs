//! The study lead's side: a TLS connection to the coordinator (verified against the alliance
//! CA), typed parameter values from `name=value` text, and a query run that reports each site
//! as it finishes.

use std::path::Path;

use fedq_proto::convert::parameter_to_wire;
use fedq_proto::model::parse_date;
use fedq_proto::template::Value;
use fedq_proto::wire::{self, coordinator_client::CoordinatorClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::CoordinatorError;
use crate::error::error_chain;

/// Adds the user's API token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A signed-in connection to the coordinator.
pub type Connection = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the coordinator at `address` (`https://host:port`), trusting `ca_cert`, and
/// signs every call with `token` (the user's personal API token). Every failure says which
/// setting (`--coordinator`/`FEDQ_COORDINATOR`, `--ca-cert`/`FEDQ_CA_CERT`,
/// `--token`/`FEDQ_TOKEN`) to look at.
pub async fn connect(
    address: &str,
    ca_cert: &Path,
    token: &str,
) -> Result<Connection, CoordinatorError> {
    let token = if token.is_empty() {
        None
    } else {
        Some(format!("Bearer {token}").parse::<MetadataValue<Ascii>>().map_err(|_| {
            CoordinatorError::Client("the API token holds characters a token cannot have; check --token/FEDQ_TOKEN".into())
        })?)
    };
    if !address.starts_with("https://") {
        return Err(CoordinatorError::Client(format!(
            "coordinator address '{address}' must start with https:// (set --coordinator or FEDQ_COORDINATOR, e.g. https://localhost:7700)"
        )));
    }
    let pem = fedq_proto::tls::read_pem(ca_cert).map_err(|err| {
        CoordinatorError::Client(format!(
            "{err}; set --ca-cert or FEDQ_CA_CERT to the alliance CA certificate (PEM)"
        ))
    })?;
    let channel = Channel::from_shared(address.to_string())
        .map_err(|err| {
            CoordinatorError::Client(format!("coordinator address '{address}': {err}"))
        })?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        .map_err(|err| CoordinatorError::Client(format!("tls: {err}")))?
        .connect()
        .await
        .map_err(|err| {
            let reason = error_chain(&err);
            let hint = if reason.contains("UnknownIssuer") {
                "; the coordinator's certificate is not signed by the CA in --ca-cert/FEDQ_CA_CERT"
            } else if reason.contains("NotValidForName") {
                "; the certificate is not valid for this host name: use the name the coordinator's certificate carries"
            } else {
                ""
            };
            CoordinatorError::Client(format!(
                "cannot reach the coordinator at {address}: {reason}{hint}"
            ))
        })?;
    Ok(
        CoordinatorClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// The message of a coordinator reply, or its error as a message for the study lead.
pub fn reply<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, CoordinatorError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| status_message(&status))
}

/// A gRPC error from the coordinator as a message for the study lead.
pub fn status_message(status: &tonic::Status) -> CoordinatorError {
    CoordinatorError::Client(status.message().to_string())
}

/// Parses `name=value` assignments into typed values using the template's declared types.
pub fn parse_parameters(
    assignments: &[String],
    specs: &[wire::ParameterSpec],
) -> Result<Vec<wire::ParameterValue>, CoordinatorError> {
    let mut values = Vec::new();
    for assignment in assignments {
        let (name, text) = assignment.split_once('=').ok_or_else(|| {
            CoordinatorError::Client(format!(
                "parameter '{assignment}' must be written name=value"
            ))
        })?;
        let (name, text) = (name.trim(), text.trim());
        let spec = specs.iter().find(|spec| spec.name == name).ok_or_else(|| {
            let known: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
            CoordinatorError::Client(format!(
                "this template has no parameter '{name}'; it takes: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        let invalid = |expected: &str| {
            CoordinatorError::Client(format!(
                "parameter '{name}': '{text}' is not {expected} ({})",
                spec.limits
            ))
        };
        let value = match spec.parameter_type.as_str() {
            "integer" => Value::Integer(text.parse().map_err(|_| invalid("a whole number"))?),
            "float" => Value::Float(text.parse().map_err(|_| invalid("a number"))?),
            "date" => Value::Date(parse_date(text).map_err(|_| invalid("a date YYYY-MM-DD"))?),
            "category" => Value::Category(text.to_string()),
            _ => {
                let categories: Vec<String> = text
                    .split(',')
                    .map(str::trim)
                    .filter(|part| !part.is_empty())
                    .map(str::to_string)
                    .collect();
                if categories.is_empty() {
                    return Err(invalid("at least one category"));
                }
                Value::Categories(categories)
            }
        };
        values.push(parameter_to_wire(name, &value));
    }
    Ok(values)
}

/// Runs a query, calling `on_site` for each site as it finishes; returns the pooled result.
pub async fn run_query(
    client: &mut Connection,
    request: wire::RunQueryRequest,
    mut on_site: impl FnMut(&wire::SiteProgress),
) -> Result<wire::PooledResult, CoordinatorError> {
    let mut stream = reply(client.run_query(request).await)?;
    while let Some(event) = stream
        .message()
        .await
        .map_err(|status| status_message(&status))?
    {
        match event.event {
            Some(wire::query_event::Event::Site(site)) => on_site(&site),
            Some(wire::query_event::Event::Result(result)) => return Ok(result),
            None => {}
        }
    }
    Err(CoordinatorError::Client(
        "the coordinator ended the query without a result".into(),
    ))
}
