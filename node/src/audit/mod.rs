//! The node's audit trail: one hash-chained record per request, answered or refused, made
//! durable before the reply leaves the node ([`log`]); its record format ([`record`]);
//! checking it against itself and against the heads the node published ([`verify`]); and the
//! public transparency register built from it ([`register`]); the `fedq-node audit` commands
//! ([`commands`]).
//!
//! Records name who asked what, under which study, with which parameter values, and how many
//! cells were released or withheld per reason — never a count of a withheld cell, never a data
//! value. Each query also leaves one structured log line (`fedq_node::audit` target) without
//! parameter values.

pub mod commands;
pub mod log;
pub mod record;
pub mod register;
pub mod verify;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use fedq_proto::wire;

pub use log::{AuditError, AuditLog};
use record::{Outcome, QueryEvent};

/// Longest text kept from a request field (request id, requester, a parameter value): the
/// request is untrusted and the log must not grow by what a caller sends.
const MAX_TEXT: usize = 200;
/// Most parameters recorded from one request (templates declare at most 32).
const MAX_RECORDED_PARAMETERS: usize = 32;

/// Longest refusal message kept (messages may quote a caller's text).
const MAX_MESSAGE: usize = 1000;

/// `text` with control characters escaped (so no caller's text can forge a line in a report or
/// log), cut at `limit` characters with a marker.
fn cut(text: &str, limit: usize) -> String {
    let mut kept = String::new();
    for (count, character) in text.chars().enumerate() {
        if count == limit {
            kept.push_str("…(cut)");
            break;
        }
        if character.is_control() {
            kept.extend(character.escape_default());
        } else {
            kept.push(character);
        }
    }
    kept
}

/// A request field as audit text: control characters escaped, at most `MAX_TEXT`
/// characters.
pub fn bounded(text: &str) -> String {
    cut(text, MAX_TEXT)
}

/// A refusal message as audit text: control characters escaped, at most `MAX_MESSAGE`
/// characters.
pub fn bounded_message(text: &str) -> String {
    cut(text, MAX_MESSAGE)
}

/// A wire parameter value as audit text.
fn parameter_text(parameter: &wire::ParameterValue) -> String {
    use wire::parameter_value::Value;
    match &parameter.value {
        Some(Value::Integer(value)) => value.to_string(),
        Some(Value::Float(value)) => value.to_string(),
        Some(Value::Date(text)) | Some(Value::Category(text)) => bounded(text),
        Some(Value::Categories(list)) => bounded(&list.values.join(",")),
        None => "(no value)".into(),
    }
}

/// The request's parameter values as audit text, bounded in number and length.
pub fn parameters_of(parameters: &[wire::ParameterValue]) -> BTreeMap<String, String> {
    let mut recorded: BTreeMap<String, String> = parameters
        .iter()
        .take(MAX_RECORDED_PARAMETERS)
        .map(|parameter| (bounded(&parameter.name), parameter_text(parameter)))
        .collect();
    if parameters.len() > MAX_RECORDED_PARAMETERS {
        recorded.insert(
            "(more)".into(),
            format!(
                "{} further parameters not recorded",
                parameters.len() - MAX_RECORDED_PARAMETERS
            ),
        );
    }
    recorded
}

/// The structured log line for one query (no parameter values, no counts of cells' contents).
pub fn trace(event: &QueryEvent) {
    let outcome = match event.outcome {
        Outcome::Released => "released",
        Outcome::Refused => "refused",
    };
    let refusal = event.refusal.as_ref().map_or("", |refusal| &refusal.code);
    let withheld: u64 = event.cells_withheld.values().sum();
    tracing::info!(
        target: "fedq_node::audit",
        request_id = %event.request_id,
        caller = %event.caller,
        requester = %event.requester,
        study = event.study.as_ref().map_or("", |study| study.id.as_str()),
        template_id = event.template.as_ref().map_or("", |template| template.id.as_str()),
        template_version = event.template.as_ref().map_or(0, |template| template.version),
        outcome,
        refusal,
        cells_released = event.cells_released,
        cells_withheld = withheld,
        total_withheld = event.total_withheld,
        "query {outcome}"
    );
}
