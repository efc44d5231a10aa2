//! Prometheus metrics and the operators' HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! One [`Metrics`] value owns its own registry (so several gateways can run in one test
//! process) and is shared by every module as `Arc<Metrics>`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::PkiConfig;
use crate::pki::PkiError;
use crate::store::Store;

/// Every metric the gateway exports. Names are part of the product contract.
pub struct Metrics {
    registry: Registry,
    /// `result` = accepted | rejected | duplicate; `reason` = error code or `none`.
    pub enrollment_requests: IntCounterVec,
    /// From request received to response published.
    pub enrollment_duration: Histogram,
    pub activations: IntCounter,
    /// From credential issued to first report over it.
    pub activation_duration: Histogram,
    pub activation_timeouts: IntCounter,
    /// `reason` = why a connection was refused.
    pub auth_failures: IntCounterVec,
    /// `role`, `action` = subscribe | publish.
    pub acl_denied: IntCounterVec,
    /// Devices in the inventory by `state`.
    pub devices: IntGaugeVec,
    /// Open client connections by `role`.
    pub connections: IntGaugeVec,
    /// `kind` = csr | generated.
    pub certificates_issued: IntCounterVec,
    /// `target` = config | enrollment, `trigger` = auto | admin | timeout.
    pub rollbacks: IntCounterVec,
    /// `op` = the store operation that failed.
    pub store_errors: IntCounterVec,
    pub store_latency: HistogramVec,
    /// Activation marks that could not be queued while the store was down.
    pub activation_queue_dropped: IntCounter,
    /// Operational certificates that expire within 30 days.
    pub certificates_expiring: IntGauge,
    /// Client connections this gateway admits: `[server] max_connections`, or fewer when the
    /// descriptor limit allows fewer.
    pub connections_max: IntGauge,
    /// `result` = ok | error; admin commands answered.
    pub admin_commands: IntCounterVec,
    /// QoS 1 messages dropped from a full session queue (the oldest goes).
    pub session_queue_dropped: IntCounter,
    /// Clients disconnected because they stopped reading what they were sent.
    pub slow_client_disconnects: IntCounter,
    /// Gateway publishes to the broker (live views) dropped from its full queue.
    pub broker_publish_dropped: IntCounter,
    /// `ca` = factory | operational | admin | server, `subject`: when each certificate of the
    /// PKI directory stops being valid (unix seconds). Set by [`Metrics::refresh_pki_expiry`].
    pub ca_certificate_not_after: IntGaugeVec,
    /// `result` = ok | error; reloads of certificates, CAs and templates (SIGHUP).
    pub reloads: IntCounterVec,
    /// `kind` = credentials | state | config | firmware: other gateways' changes applied here.
    pub changes_applied: IntCounterVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    metric
}

/// Seconds, from 0.5 ms to 10 s.
fn fast_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    // The registrations below use fixed, valid names: a failure is a programming error.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let store_latency = HistogramVec::new(
            HistogramOpts::new(
                "onboard_store_latency_seconds",
                "Latency of inventory store operations",
            )
            .buckets(fast_buckets()),
            &["op"],
        )
        .unwrap_or_else(|e| panic!("metric onboard_store_latency_seconds: {e}"));
        registry
            .register(Box::new(store_latency.clone()))
            .unwrap_or_else(|e| panic!("metric onboard_store_latency_seconds: {e}"));
        let certificates_expiring = IntGauge::new(
            "onboard_certificates_expiring",
            "Unrevoked operational certificates that expire within 30 days",
        )
        .unwrap_or_else(|e| panic!("metric onboard_certificates_expiring: {e}"));
        registry
            .register(Box::new(certificates_expiring.clone()))
            .unwrap_or_else(|e| panic!("metric onboard_certificates_expiring: {e}"));
        let connections_max = IntGauge::new(
            "onboard_connections_max",
            "Client connections this gateway admits (max_connections, or the descriptor limit)",
        )
        .unwrap_or_else(|e| panic!("metric onboard_connections_max: {e}"));
        registry
            .register(Box::new(connections_max.clone()))
            .unwrap_or_else(|e| panic!("metric onboard_connections_max: {e}"));
        let metrics = Metrics {
            enrollment_requests: counter_vec(
                r,
                "onboard_enrollment_requests_total",
                "Enrollment requests by result and rejection reason",
                &["result", "reason"],
            ),
            enrollment_duration: histogram(
                r,
                "onboard_enrollment_duration_seconds",
                "Time from an enrollment request to its response",
                fast_buckets(),
            ),
            activations: counter(
                r,
                "onboard_activations_total",
                "Devices that reported over their new credential",
            ),
            activation_duration: histogram(
                r,
                "onboard_activation_duration_seconds",
                "Time from credential issued to the device's first report",
                vec![
                    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                ],
            ),
            activation_timeouts: counter(
                r,
                "onboard_activation_timeouts_total",
                "Enrollments rolled back because the device did not activate in time",
            ),
            auth_failures: counter_vec(
                r,
                "onboard_auth_failures_total",
                "Connections refused, by reason",
                &["reason"],
            ),
            acl_denied: counter_vec(
                r,
                "onboard_acl_denied_total",
                "Publishes and subscriptions refused by the topic rules",
                &["role", "action"],
            ),
            devices: gauge_vec(
                r,
                "onboard_devices",
                "Devices in the inventory by state",
                &["state"],
            ),
            connections: gauge_vec(
                r,
                "onboard_connections",
                "Open client connections by role",
                &["role"],
            ),
            certificates_issued: counter_vec(
                r,
                "onboard_certificates_issued_total",
                "Operational certificates issued",
                &["kind"],
            ),
            rollbacks: counter_vec(
                r,
                "onboard_rollbacks_total",
                "Rollbacks of configurations and enrollments",
                &["target", "trigger"],
            ),
            store_errors: counter_vec(
                r,
                "onboard_store_errors_total",
                "Inventory store operations that failed",
                &["op"],
            ),
            store_latency,
            activation_queue_dropped: counter(
                r,
                "onboard_activation_queue_dropped_total",
                "Activation marks dropped because the queue for a down store was full",
            ),
            certificates_expiring,
            connections_max,
            admin_commands: counter_vec(
                r,
                "onboard_admin_commands_total",
                "Admin commands answered, by command and result",
                &["command", "result"],
            ),
            session_queue_dropped: counter(
                r,
                "onboard_session_queue_dropped_total",
                "QoS 1 messages dropped because a session's queue was full (oldest first)",
            ),
            slow_client_disconnects: counter(
                r,
                "onboard_slow_client_disconnects_total",
                "Clients disconnected because they stopped reading",
            ),
            broker_publish_dropped: counter(
                r,
                "onboard_broker_publish_dropped_total",
                "Gateway publishes to the embedded broker dropped because its queue was full",
            ),
            ca_certificate_not_after: gauge_vec(
                r,
                "onboard_ca_certificate_not_after_seconds",
                "End of validity (unix time) of the CA and server certificates in use",
                &["ca", "subject"],
            ),
            reloads: counter_vec(
                r,
                "onboard_reloads_total",
                "Reloads of the PKI directory and templates (SIGHUP), by result",
                &["result"],
            ),
            changes_applied: counter_vec(
                r,
                "onboard_changes_applied_total",
                "Changes made through other gateways on the same store, applied here",
                &["kind"],
            ),
            registry,
        };
        metrics.initialise_series();
        metrics
    }

    /// Create every labelled series at zero, so that dashboards and alerts see each reason
    /// before it first happens.
    fn initialise_series(&self) {
        use crate::pki::Role;
        for result in ["accepted", "duplicate"] {
            self.enrollment_requests
                .with_label_values(&[result, "none"]);
        }
        for code in crate::enroll::ErrorCode::ALL {
            self.enrollment_requests
                .with_label_values(&["rejected", code.as_str()]);
        }
        for reason in crate::front::identity::RefusalReason::ALL {
            self.auth_failures.with_label_values(&[reason.as_str()]);
        }
        for role in [Role::Bootstrap, Role::Device, Role::Admin] {
            self.connections.with_label_values(&[role.as_str()]);
            for action in ["publish", "subscribe"] {
                self.acl_denied.with_label_values(&[role.as_str(), action]);
            }
        }
        for state in crate::store::DeviceState::ALL {
            self.devices.with_label_values(&[state.as_str()]);
        }
        for kind in ["csr", "generated", "password"] {
            self.certificates_issued.with_label_values(&[kind]);
        }
        for (target, trigger) in [
            ("config", "auto"),
            ("config", "admin"),
            ("enrollment", "timeout"),
            ("enrollment", "admin"),
        ] {
            self.rollbacks.with_label_values(&[target, trigger]);
        }
        for kind in crate::store::ChangeKind::ALL {
            self.changes_applied.with_label_values(&[kind.as_str()]);
        }
        for result in ["ok", "error"] {
            self.reloads.with_label_values(&[result]);
        }
        // Besides the enrollment path: the audit writer, its full queue, and the store reads
        // of `/readyz` and of every scrape, which alerts watch from the first scrape on.
        for op in [
            "commit_enrollment",
            "activate",
            "device",
            "credential",
            "append_event",
            "audit_queue_full",
            "ping",
            "count_by_state",
        ] {
            self.store_errors.with_label_values(&[op]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Time a store operation, counting its failure.
    pub async fn store_op<T, F>(&self, op: &str, fut: F) -> Result<T, crate::store::StoreError>
    where
        F: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        let timer = self.store_latency.with_label_values(&[op]).start_timer();
        let result = fut.await;
        timer.observe_duration();
        if result.is_err() {
            self.store_errors.with_label_values(&[op]).inc();
        }
        result
    }

    /// Export the expiry of the PKI directory's CA and server certificates, replacing what
    /// was exported before (a reload may have removed a CA). Called at start and after every
    /// reload of the PKI; on an error the previous values stay.
    pub fn refresh_pki_expiry(&self, config: &PkiConfig) -> Result<usize, PkiError> {
        let certificates = crate::pki::certificate_expiry(config)?;
        self.ca_certificate_not_after.reset();
        for c in &certificates {
            self.ca_certificate_not_after
                .with_label_values(&[c.certificate.as_str(), &c.subject])
                .set(c.not_after);
        }
        Ok(certificates.len())
    }

    /// Refresh the `onboard_devices{state}` gauge from the store.
    pub async fn refresh_device_gauge(&self, store: &dyn Store) {
        if let Ok(counts) = self
            .store_op("count_by_state", store.count_by_state())
            .await
        {
            for (state, n) in counts {
                self.devices.with_label_values(&[state.as_str()]).set(n);
            }
        }
    }
}

/// Shared state of the HTTP endpoint.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    /// Cancelled when the embedded broker stopped routing.
    pub broker_failed: tokio_util::sync::CancellationToken,
}

/// Serve `/metrics`, `/healthz`, `/readyz` on an already-bound listener until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .route("/readyz", get(ready_handler))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    state
        .metrics
        .refresh_device_gauge(state.store.as_ref())
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn health_handler(State(state): State<HttpState>) -> impl IntoResponse {
    if state.broker_failed.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker stopped\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn ready_handler(State(state): State<HttpState>) -> impl IntoResponse {
    if state.broker_failed.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker stopped\n".to_string(),
        );
    }
    match state.metrics.store_op("ping", state.store.ping()).await {
        Ok(()) => (
            StatusCode::OK,
            format!("ready: store {} reachable\n", state.store.backend()),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: store {} unreachable: {e}\n",
                state.store.backend()
            ),
        ),
    }
}
