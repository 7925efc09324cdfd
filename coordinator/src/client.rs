//! The study lead's side: a TLS connection to the coordinator (verified against the alliance
//! CA), typed parameter values from `name=value` text, and a query run that reports each site
//! as it finishes.

use std::path::Path;

use fedq_proto::convert::parameter_to_wire;
use fedq_proto::model::parse_date;
use fedq_proto::template::Value;
use fedq_proto::wire::{self, coordinator_client::CoordinatorClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::CoordinatorError;

/// Connects to the coordinator at `address` (`https://host:port`), trusting `ca_cert`.
pub async fn connect(
    address: &str,
    ca_cert: &Path,
) -> Result<CoordinatorClient<Channel>, CoordinatorError> {
    let ca = Certificate::from_pem(fedq_proto::tls::read_pem(ca_cert)?);
    let channel = Channel::from_shared(address.to_string())
        .map_err(|err| CoordinatorError::Client(format!("coordinator address '{address}': {err}")))?
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))
        .map_err(|err| CoordinatorError::Client(format!("tls: {err}")))?
        .connect()
        .await
        .map_err(|err| {
            CoordinatorError::Client(format!(
                "cannot reach the coordinator at {address}: {}",
                error_chain(&err)
            ))
        })?;
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A gRPC error from the coordinator as a message for the study lead.
pub fn status_message(status: &tonic::Status) -> CoordinatorError {
    CoordinatorError::Client(format!("{:?}: {}", status.code(), status.message()))
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
            _ => Value::Categories(
                text.split(',')
                    .map(|part| part.trim().to_string())
                    .collect(),
            ),
        };
        values.push(parameter_to_wire(name, &value));
    }
    Ok(values)
}

/// Runs a query, calling `on_site` for each site as it finishes; returns the pooled result.
pub async fn run_query(
    client: &mut CoordinatorClient<Channel>,
    request: wire::RunQueryRequest,
    mut on_site: impl FnMut(&wire::SiteProgress),
) -> Result<wire::PooledResult, CoordinatorError> {
    let mut stream = client
        .run_query(request)
        .await
        .map_err(|status| status_message(&status))?
        .into_inner();
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
