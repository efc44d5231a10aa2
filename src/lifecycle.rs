//! What happens to an enrolled device over time: activation when it first reports over its new
//! credential, automatic rollback when it does not within the activation deadline, and the
//! queue that keeps activation marks while the store is down.
//!
//! Deadlines live in memory and are restored from the store at start, so a restart loses none.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::audit::Auditor;
use crate::bus::Bus;
use crate::front::session::Sessions;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, Store, StoreError};
use crate::topics;

/// A device waiting to activate.
#[derive(Debug, Clone, PartialEq)]
struct Watch {
    serial: String,
    deadline: OffsetDateTime,
    issued_at: OffsetDateTime,
}

/// An activation that could not be written yet.
#[derive(Debug, Clone, PartialEq)]
struct QueuedActivation {
    device_id: String,
    serial: String,
    reported_at: OffsetDateTime,
}

pub struct Lifecycle {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
    pub link: Bus,
    pub sessions: Arc<Sessions>,
    /// Enrollment's activation window, to tell issue time after a restart.
    activation_timeout: Duration,
    sweep_interval: Duration,
    /// Devices in state `enrolling`, by id.
    watches: Mutex<HashMap<String, Watch>>,
    /// Activations waiting for the store to come back (bounded by `queue_limit`).
    queued: Mutex<VecDeque<QueuedActivation>>,
    queue_limit: usize,
}

impl Lifecycle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        audit: Auditor,
        link: Bus,
        sessions: Arc<Sessions>,
        activation_timeout: Duration,
        sweep_interval: Duration,
        queue_limit: usize,
    ) -> Lifecycle {
        Lifecycle {
            store,
            metrics,
            audit,
            link,
            sessions,
            activation_timeout,
            sweep_interval,
            watches: Mutex::new(HashMap::new()),
            queued: Mutex::new(VecDeque::new()),
            queue_limit,
        }
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watch>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<QueuedActivation>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the activation clock of a freshly issued credential.
    pub fn watch_activation(
        &self,
        device_id: &str,
        serial: &str,
        deadline: OffsetDateTime,
        issued_at: OffsetDateTime,
    ) {
        self.watches().insert(
            device_id.to_owned(),
            Watch {
                serial: serial.to_owned(),
                deadline,
                issued_at,
            },
        );
    }

    /// Reload the devices awaiting activation (at start).
    pub async fn restore(&self) -> Result<usize, StoreError> {
        let pending = self
            .metrics
            .store_op("pending_activations", self.store.pending_activations())
            .await?;
        let n = pending.len();
        let mut watches = self.watches();
        for p in pending {
            watches.insert(
                p.device_id,
                Watch {
                    serial: p.serial,
                    deadline: p.deadline,
                    issued_at: p.deadline - self.activation_timeout,
                },
            );
        }
        Ok(n)
    }

    /// Whether `device_id` is enrolling and its activation deadline is watched.
    pub fn is_awaiting(&self, device_id: &str) -> bool {
        self.watches().contains_key(device_id)
    }

    /// Number of devices whose activation deadline is being watched.
    pub fn watching(&self) -> usize {
        self.watches().len()
    }

    /// Activation marks waiting for the store.
    pub fn queued_activations(&self) -> usize {
        self.queue().len()
    }

    /// The device reported over `serial`: mark it active, or queue the mark while the store
    /// is down.
    pub async fn activate(
        &self,
        device_id: &str,
        serial: &str,
        reported_at: OffsetDateTime,
    ) -> bool {
        let Err(e) = self.record_activation(device_id, serial, reported_at).await else {
            return true;
        };
        let mut queue = self.queue();
        if queue.len() >= self.queue_limit {
            self.metrics.activation_queue_dropped.inc();
            tracing::error!(device_id, serial, error = %e, "store down and activation queue full; activation mark dropped");
        } else {
            tracing::warn!(device_id, serial, error = %e, "store down; activation queued");
            queue.push_back(QueuedActivation {
                device_id: device_id.to_owned(),
                serial: serial.to_owned(),
                reported_at,
            });
        }
        false
    }

    /// Write one activation mark. `Err` only when the store is down (the mark should wait);
    /// any other outcome is final.
    async fn record_activation(
        &self,
        device_id: &str,
        serial: &str,
        reported_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let issued_at = self
            .watches()
            .get(device_id)
            .filter(|w| w.serial == serial)
            .map(|w| w.issued_at);
        let event = AuditEvent::new(
            device_id,
            "activated",
            "device",
            json!({ "serial": serial }),
        );
        match self
            .metrics
            .store_op(
                "activate",
                self.store.activate(device_id, serial, event.clone()),
            )
            .await
        {
            Ok(true) => {
                self.watches().remove(device_id);
                self.metrics.activations.inc();
                if let Some(issued) = issued_at {
                    let secs = (reported_at - issued).as_seconds_f64().max(0.0);
                    self.metrics.activation_duration.observe(secs);
                }
                self.audit.announce(&event);
                tracing::info!(device_id, serial, "device active");
            }
            Ok(false) => {
                tracing::debug!(
                    device_id,
                    serial,
                    "report from a device that is not awaiting this credential"
                );
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => tracing::error!(device_id, serial, error = %e, "activation not recorded"),
        }
        Ok(())
    }

    /// Roll back an enrollment whose deadline passed: revoke, clear retained config, `failed`.
    async fn expire(&self, device_id: &str, serial: &str) {
        let event = AuditEvent::new(
            device_id,
            "activation_timeout",
            "gateway",
            json!({ "serial": serial, "rolled_back": ["credential", "config"] }),
        );
        match self
            .metrics
            .store_op(
                "expire_enrollment",
                self.store
                    .expire_enrollment(device_id, serial, event.clone()),
            )
            .await
        {
            Ok(true) => {
                self.watches().remove(device_id);
                self.link.clear_retained(&topics::config(device_id));
                self.sessions.disconnect_serial(device_id, serial);
                self.metrics.activation_timeouts.inc();
                self.metrics
                    .rollbacks
                    .with_label_values(&["enrollment", "timeout"])
                    .inc();
                self.audit.announce(&event);
                tracing::warn!(
                    device_id,
                    serial,
                    "activation deadline passed; enrollment rolled back"
                );
            }
            Ok(false) => {
                // Activated meanwhile, or re-enrolled with another credential.
                let mut watches = self.watches();
                if watches.get(device_id).is_some_and(|w| w.serial == serial) {
                    watches.remove(device_id);
                }
            }
            Err(e) => {
                tracing::warn!(device_id, error = %e, "store error while rolling back; will retry")
            }
        }
    }

    /// One pass: write queued activations, then roll back what is overdue.
    pub async fn sweep(&self) {
        // Queued marks stay queued until written (the queue is what still waits for the store).
        let queued: Vec<QueuedActivation> = self.queue().iter().cloned().collect();
        for q in queued {
            if self
                .record_activation(&q.device_id, &q.serial, q.reported_at)
                .await
                .is_err()
            {
                break; // still down: the rest waits for the next sweep
            }
            self.queue().retain(|other| other != &q);
        }
        let now = OffsetDateTime::now_utc();
        let due: Vec<(String, String)> = {
            let queued = self.queue();
            self.watches()
                .iter()
                .filter(|(_, w)| w.deadline <= now)
                .filter(|(id, w)| {
                    !queued
                        .iter()
                        .any(|q| &q.device_id == *id && q.serial == w.serial)
                })
                .map(|(id, w)| (id.clone(), w.serial.clone()))
                .collect()
        };
        for (device_id, serial) in due {
            self.expire(&device_id, &serial).await;
        }
    }

    /// Sweep every `sweep_interval` until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sweep().await,
            }
        }
    }
}
