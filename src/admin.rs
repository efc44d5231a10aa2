//! The admin plane and device-initiated lifecycle messages after enrollment.

use std::sync::Arc;

use serde_json::json;

use crate::audit::Auditor;
use crate::broker::BrokerLink;
use crate::config::LifecycleConfig;
use crate::front::session::Sessions;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::store::{Store, StoreError};

pub struct Admin {
    pub pki: Arc<Pki>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
    pub link: BrokerLink,
    pub sessions: Arc<Sessions>,
    pub config: LifecycleConfig,
}

impl Admin {
    pub fn new(
        pki: Arc<Pki>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        audit: Auditor,
        link: BrokerLink,
        sessions: Arc<Sessions>,
        config: LifecycleConfig,
    ) -> Admin {
        Admin {
            pki,
            store,
            metrics,
            audit,
            link,
            sessions,
            config,
        }
    }

    /// Publish every device's retained configuration from the store (rumqttd keeps nothing
    /// across restarts). Returns how many were published.
    pub async fn republish_retained(&self) -> Result<usize, StoreError> {
        let configs = self
            .metrics
            .store_op("published_configs", self.store.published_configs())
            .await?;
        for config in &configs {
            self.link.publish_retained(
                &format!("devices/{}/config", config.device_id),
                serde_json::to_vec(&config.body).unwrap_or_default(),
            );
        }
        Ok(configs.len())
    }

    pub async fn command(&self, actor: &str, topic: &str, payload: &[u8]) {
        let request_id = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| {
                v.get("request_id")
                    .and_then(|r| r.as_str())
                    .map(str::to_owned)
            });
        if let Some(id) = request_id {
            let reply = json!({ "request_id": id, "status": "error",
                "error": { "code": "unsupported", "message": format!("{topic}: not available") } });
            self.link.publish(
                &format!("admin/responses/{id}"),
                serde_json::to_vec(&reply).unwrap_or_default(),
            );
        }
        tracing::info!(actor, topic, "admin command");
    }

    pub async fn config_ack(&self, device_id: &str, payload: &[u8]) {
        tracing::debug!(device_id, len = payload.len(), "config ack");
    }

    pub async fn firmware_status(&self, device_id: &str, payload: &[u8]) {
        tracing::debug!(device_id, len = payload.len(), "firmware status");
    }

    pub async fn renew(&self, device_id: &str, payload: &[u8]) {
        tracing::debug!(device_id, len = payload.len(), "renewal");
    }

    pub async fn renewed_credential_used(&self, device_id: &str, serial: &str) {
        tracing::debug!(device_id, serial, "renewed credential used");
    }
}
