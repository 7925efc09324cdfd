//! The audit step: one structured record per request, answered or refused, written before the
//! reply leaves the node. Records name who asked what and how many cells were released or
//! withheld — never a count of a withheld cell, never a data value.
//!
//! Records currently go to the node's structured log under the `fedq_node::audit` target.
//! (The tamper-evident, hash-chained audit file is tracked separately.)

use fedq_proto::wire::RefusalCode;

/// What the audit step records about one request.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub request_id: &'a str,
    /// The caller's certificate identity (or what it presented, when refused).
    pub caller: &'a str,
    /// The study lead the coordinator named.
    pub requester: &'a str,
    /// The study the query was made under (empty when none was established).
    pub study: &'a str,
    pub template: Option<(&'a str, u32, &'a str)>,
    pub outcome: AuditOutcome,
}

#[derive(Debug, Clone, Copy)]
pub enum AuditOutcome {
    Released {
        cells_released: usize,
        cells_withheld: usize,
        total_withheld: bool,
    },
    Refused(RefusalCode),
}

/// Records one request.
pub fn record(record: &AuditRecord<'_>) {
    let (template_id, template_version, template_hash) = record.template.unwrap_or(("", 0, ""));
    let (outcome, refusal, cells_released, cells_withheld, total_withheld) = match record.outcome {
        AuditOutcome::Released {
            cells_released,
            cells_withheld,
            total_withheld,
        } => (
            "released",
            "",
            cells_released,
            cells_withheld,
            total_withheld,
        ),
        AuditOutcome::Refused(code) => ("refused", code.as_str_name(), 0, 0, false),
    };
    tracing::info!(
        target: "fedq_node::audit",
        request_id = record.request_id,
        caller = record.caller,
        requester = record.requester,
        study = record.study,
        template_id,
        template_version,
        template_hash,
        outcome,
        refusal,
        cells_released,
        cells_withheld,
        total_withheld,
        "query {outcome}"
    );
}
