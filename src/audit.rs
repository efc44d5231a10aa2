//! The audit trail. Events that must be atomic with a state change are written by the store in
//! the same transaction (and then only announced here); the rest (refused connections, denied
//! topics, ...) go through a bounded queue to one writer task, so a flood of bad clients can
//! neither block the front nor grow memory without bound. Every event is also published, QoS 0,
//! on `admin/events/D/<event>` for live monitoring. Retention deletes rows older than
//! `[store] audit_retention_days`, in batches.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, Store, StoreResult};

/// Events waiting for the writer before new ones are dropped (and counted).
const QUEUE: usize = 10_000;
/// Audit rows deleted per statement by retention: short statements, short locks.
pub const RETENTION_BATCH: u32 = 5_000;
/// How often retention runs (after a first sweep at start).
pub const RETENTION_EVERY: Duration = Duration::from_secs(3_600);

/// Delete every audit row older than `keep_days` days, in batches; returns how many went.
pub async fn sweep_retention(
    store: &dyn Store,
    metrics: &Metrics,
    keep_days: u32,
) -> StoreResult<u64> {
    let cutoff = OffsetDateTime::now_utc() - time::Duration::days(i64::from(keep_days));
    let mut deleted = 0;
    loop {
        let n = metrics
            .store_op(
                "delete_events_before",
                store.delete_events_before(cutoff, RETENTION_BATCH),
            )
            .await?;
        deleted += n;
        if n < u64::from(RETENTION_BATCH) {
            return Ok(deleted);
        }
    }
}

/// Audit retention: a sweep at start, then every [`RETENTION_EVERY`], until `shutdown`.
/// `keep_days` 0 keeps everything.
pub async fn run_retention(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    keep_days: u32,
    shutdown: CancellationToken,
) {
    if keep_days == 0 {
        return;
    }
    let mut tick = tokio::time::interval(RETENTION_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep_retention(store.as_ref(), &metrics, keep_days).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, keep_days, "audit rows past retention deleted"),
            Err(e) => tracing::warn!(error = %e, "audit retention sweep failed; retried next hour"),
        }
    }
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
    link: Bus,
    metrics: Arc<Metrics>,
}

impl Auditor {
    pub fn start(store: Arc<dyn Store>, link: Bus, metrics: Arc<Metrics>) -> Auditor {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let writer_metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let device = event.device_id.clone();
                let name = event.event.clone();
                if let Err(e) = writer_metrics
                    .store_op("append_event", store.append_event(event))
                    .await
                {
                    tracing::warn!(device, event = name, error = %e, "audit event not stored");
                }
            }
        });
        Auditor { tx, link, metrics }
    }

    /// Store (in the background) and announce an event.
    pub fn record(&self, event: AuditEvent) {
        self.announce(&event);
        if self.tx.try_send(event).is_err() {
            self.metrics
                .store_errors
                .with_label_values(&["audit_queue_full"])
                .inc();
            tracing::warn!("audit queue full; event dropped");
        }
    }

    /// Announce an event the store already holds (written inside a transaction).
    pub fn announce(&self, event: &AuditEvent) {
        let topic = format!(
            "admin/events/{}/{}",
            topic_safe(&event.device_id),
            event.event
        );
        match serde_json::to_vec(event) {
            Ok(body) => self.link.publish(&topic, body),
            Err(e) => tracing::error!(error = %e, "serialising audit event"),
        }
    }
}

/// A device id from an untrusted source (a refused certificate) may hold characters that are
/// special in topics.
fn topic_safe(id: &str) -> String {
    if id.is_empty() {
        return "-".into();
    }
    id.chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn untrusted_ids_cannot_escape_their_topic_level() {
        assert_eq!(super::topic_safe("a/+/#"), "a____");
        assert_eq!(super::topic_safe(""), "-");
        assert_eq!(super::topic_safe("dev-1"), "dev-1");
    }
}
