//! Collecting the nodes' signed audit heads: from every answer, and from every node on a fixed
//! interval. Each head is checked and kept in the [`Store`]; a head signed by another key than
//! the one pinned for the site, or a log shorter than before, is logged as a warning for the
//! alliance's administrators.

use std::sync::Arc;
use std::time::Duration;

use fedq_proto::wire;

use crate::fanout::NodeClients;
use crate::store::{HeadOutcome, Store};

/// Checks and keeps one head `site_id` presented (on a blocking thread: SQLite waits for
/// the disk). Returns whether the site is now held: its log went back or was rewritten, so
/// nothing from it reaches a study lead until an administrator acknowledges.
pub async fn keep(store: &Arc<Store>, site_id: &str, head: wire::SignedAuditHead) -> bool {
    let store = Arc::clone(store);
    let site = site_id.to_string();
    let outcome = tokio::task::spawn_blocking(move || store.record_head(&site, &head)).await;
    let held = matches!(
        outcome,
        Ok(Ok(HeadOutcome::WentBack { .. } | HeadOutcome::Forked { .. }))
    );
    match outcome {
        Ok(Ok(HeadOutcome::Stored | HeadOutcome::Known)) => {}
        Ok(Ok(HeadOutcome::Forked { count })) => {
            tracing::warn!(site = %site_id, count, "a node's audit log was rewritten: two different hashes for one record count; ask the site to run `fedq-node audit verify --heads`");
        }
        Ok(Ok(HeadOutcome::WentBack { before })) => {
            tracing::warn!(site = %site_id, before, "a node's audit log is shorter than a head it published earlier: it was restored from an older backup or cut short; ask the site to run `fedq-node audit verify --heads`");
        }
        Ok(Ok(HeadOutcome::Rejected(reason))) => {
            tracing::warn!(site = %site_id, %reason, "audit head not kept");
        }
        Ok(Err(err)) => tracing::error!(site = %site_id, error = %err, "cannot keep audit head"),
        Err(err) => tracing::error!(site = %site_id, error = %err, "cannot keep audit head"),
    }
    held
}

/// Asks every node for its head once and keeps what arrives.
pub async fn collect_once(nodes: &NodeClients, store: &Arc<Store>, deadline: Duration) {
    for (entry, outcome) in nodes.audit_heads_all(deadline).await {
        match outcome {
            Ok(head) => {
                keep(store, &entry.site_id, head).await;
            }
            Err(reason) => {
                tracing::info!(site = %entry.site_id, %reason, "audit head not collected");
            }
        }
    }
}

/// Collects every node's head every `interval`, for ever (the server drops it on shutdown).
pub async fn collect_every(
    nodes: NodeClients,
    store: Arc<Store>,
    interval: Duration,
    deadline: Duration,
) {
    // The first collection comes one interval after start (answers carry heads meanwhile).
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        collect_once(&nodes, &store, deadline).await;
    }
}
