//! The audit trail. Events that must be atomic with a state change are written by the store in
//! the same transaction (and then only announced here); the rest (refused connections, denied
//! topics, ...) go through a bounded queue to one writer task, so a flood of bad clients can
//! neither block the front nor grow memory without bound. Every event is also published, QoS 0,
//! on `admin/events/D/<event>` for live monitoring.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, Store};

/// Events waiting for the writer before new ones are dropped (and counted).
const QUEUE: usize = 10_000;

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
