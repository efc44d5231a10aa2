//! The bootstrap protocol: a device holding a factory certificate publishes a request on
//! `enroll/D/request` and gets its operational credential and configuration on
//! `enroll/D/response`.
//!
//! [`Enroller::handle`] takes the raw request of device `D` (the topic rules guarantee that only
//! the bootstrap connection of `D` can publish there) and always answers: accepted, or rejected
//! with one of the contract's error codes. Before an acceptance is published, the device row,
//! the credential, configuration version and the answer itself are committed in one store
//! transaction, and the configuration is published retained.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::audit::Auditor;
use crate::bus::Bus;
use crate::config::{EnrollmentConfig, EnrollmentMode, ReenrollPolicy};
use crate::front::session::Sessions;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::pki::{CsrError, Pki, Role};
use crate::quota::IssueQuota;
use crate::store::{
    AuditEvent, Credential, CredentialKind, Device, DeviceState, EnrollmentCommit, FactoryIdentity,
    Store, StoreError,
};
use crate::templates::{self, Templates};
use crate::topics;

/// Longest accepted `request_id`.
pub const MAX_REQUEST_ID: usize = 64;
/// Longest accepted metadata field (model, location, firmware version, device type).
pub const MAX_FIELD: usize = 128;

/// Back-off suggested when the store is down.
const UNAVAILABLE_RETRY_MS: u64 = 5_000;

/// Rejection codes of the contract (plus `already_enrolled` for `reenroll = "deny"`, and
/// `issuer_mismatch` for a re-enrollment through another factory CA than the first one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedRequest,
    CsrInvalid,
    CsrSubjectMismatch,
    WeakKey,
    UnknownDeviceType,
    NotAllowlisted,
    DeviceRevoked,
    AlreadyEnrolled,
    /// The device was first enrolled through another factory CA.
    IssuerMismatch,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::MalformedRequest,
        ErrorCode::CsrInvalid,
        ErrorCode::CsrSubjectMismatch,
        ErrorCode::WeakKey,
        ErrorCode::UnknownDeviceType,
        ErrorCode::NotAllowlisted,
        ErrorCode::DeviceRevoked,
        ErrorCode::AlreadyEnrolled,
        ErrorCode::IssuerMismatch,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::CsrInvalid => "csr_invalid",
            ErrorCode::CsrSubjectMismatch => "csr_subject_mismatch",
            ErrorCode::WeakKey => "weak_key",
            ErrorCode::UnknownDeviceType => "unknown_device_type",
            ErrorCode::NotAllowlisted => "not_allowlisted",
            ErrorCode::DeviceRevoked => "device_revoked",
            ErrorCode::AlreadyEnrolled => "already_enrolled",
            ErrorCode::IssuerMismatch => "issuer_mismatch",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

fn issuer_mismatch() -> Rejection {
    Rejection::new(
        ErrorCode::IssuerMismatch,
        "this device was first enrolled with a certificate of another factory CA; an admin \
         must roll its enrollment back before it enrolls through this one",
    )
}

/// A rejection: code, human message, and for the retryable codes when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    fn retry(code: ErrorCode, message: impl Into<String>, after_ms: u64) -> Self {
        Rejection {
            code,
            message: message.into(),
            retry_after_ms: Some(after_ms),
        }
    }

    fn from_store(e: &StoreError) -> Self {
        Rejection::retry(
            ErrorCode::Unavailable,
            format!("the inventory is unavailable ({}); retry later", short(e)),
            UNAVAILABLE_RETRY_MS,
        )
    }

    /// The response document.
    pub fn to_json(&self, request_id: Option<&str>) -> Value {
        let mut error = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(ms) = self.retry_after_ms {
            error["retry_after_ms"] = json!(ms);
        }
        json!({ "request_id": request_id, "status": "rejected", "error": error })
    }
}

fn short(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "store unreachable",
        StoreError::Conflict(_) => "concurrent update",
        _ => "store error",
    }
}

/// The request document on `enroll/D/request`. Unknown fields are ignored (newer devices).
#[derive(Debug, Clone, Deserialize)]
pub struct EnrollRequest {
    pub request_id: String,
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub csr: Option<String>,
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub firmware_version: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
}

/// What kind of credential to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    SignCsr(String),
    GenerateKey,
    Password,
}

/// A validated request.
#[derive(Debug, Clone)]
struct Validated {
    request_id: String,
    wanted: Wanted,
    device_type: String,
    firmware_version: Option<String>,
    model: Option<String>,
    location: Option<String>,
}

/// Parse and validate a request: everything that needs neither the store nor the PKI.
fn validate(
    payload: &[u8],
    config: &EnrollmentConfig,
    templates: &Templates,
) -> Result<Validated, (Option<String>, Rejection)> {
    if payload.len() > config.max_request_bytes {
        return Err((
            None,
            Rejection::new(
                ErrorCode::MalformedRequest,
                format!(
                    "request is {} bytes; the limit is {}",
                    payload.len(),
                    config.max_request_bytes
                ),
            ),
        ));
    }
    let malformed =
        |id: Option<String>, m: String| (id, Rejection::new(ErrorCode::MalformedRequest, m));
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| malformed(None, format!("request is not valid JSON: {e}")))?;
    let echo_id = value
        .get("request_id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.chars().count() <= MAX_REQUEST_ID)
        .map(str::to_owned);
    let req: EnrollRequest = serde_json::from_value(value)
        .map_err(|e| malformed(echo_id.clone(), format!("invalid request: {e}")))?;
    let id_len = req.request_id.chars().count();
    if id_len == 0 || id_len > MAX_REQUEST_ID {
        return Err(malformed(
            None,
            format!("request_id must be 1 to {MAX_REQUEST_ID} characters"),
        ));
    }
    let id = Some(req.request_id.clone());
    for (name, value) in [
        ("device_type", &req.device_type),
        ("firmware_version", &req.firmware_version),
        ("model", &req.model),
        ("location", &req.location),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.chars().count() > MAX_FIELD)
        {
            return Err(malformed(
                id,
                format!("{name} is longer than {MAX_FIELD} characters"),
            ));
        }
    }
    let wanted = match (req.credential.as_deref().unwrap_or("certificate"), req.csr) {
        ("certificate", Some(csr)) => Wanted::SignCsr(csr),
        ("certificate", None) => Wanted::GenerateKey,
        ("password", None) => Wanted::Password,
        ("password", Some(_)) => {
            return Err(malformed(
                id,
                "a csr goes with credential \"certificate\", not \"password\"".into(),
            ))
        }
        (other, _) => {
            return Err(malformed(
                id,
                format!("credential must be \"certificate\" or \"password\", not {other:?}"),
            ))
        }
    };
    let device_type = req
        .device_type
        .unwrap_or_else(|| config.default_device_type.clone());
    if !templates.contains(&device_type) {
        return Err((
            id,
            Rejection::new(
                ErrorCode::UnknownDeviceType,
                format!(
                    "unknown device type {device_type:?}; known: {}",
                    templates.device_types().join(", ")
                ),
            ),
        ));
    }
    Ok(Validated {
        request_id: req.request_id,
        wanted,
        device_type,
        firmware_version: req.firmware_version,
        model: req.model,
        location: req.location,
    })
}

/// The checks an enrollment request passes before the store or the PKI is asked: size, JSON
/// shape, field lengths, credential kind and device type. The rejection is the one the device
/// would receive.
pub fn check_request(
    payload: &[u8],
    config: &EnrollmentConfig,
    templates: &Templates,
) -> Result<(), Rejection> {
    validate(payload, config, templates)
        .map(|_| ())
        .map_err(|(_, rejection)| rejection)
}

fn csr_rejection(e: CsrError) -> Rejection {
    match e {
        CsrError::Invalid(m) => Rejection::new(ErrorCode::CsrInvalid, m),
        e @ CsrError::SubjectMismatch { .. } => {
            Rejection::new(ErrorCode::CsrSubjectMismatch, e.to_string())
        }
        CsrError::WeakKey(m) => Rejection::new(ErrorCode::WeakKey, m),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Gateway-wide token bucket for enrollment requests.
struct RateLimit {
    per_sec: u64,
    /// Instant (µs since `start`) at which the bucket is empty again ("GCRA" theoretical time).
    tat_us: AtomicU64,
    start: Instant,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec: u64::from(per_sec.max(1)),
            tat_us: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// `Err(retry_after_ms)` when over the rate (bursts of one second's worth are allowed).
    fn check(&self) -> Result<(), u64> {
        let interval = 1_000_000 / self.per_sec;
        let burst = 1_000_000u64;
        let now = self.start.elapsed().as_micros() as u64;
        let mut tat = self.tat_us.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now);
            if base > now + burst {
                return Err((base - now - burst) / 1000 + 1);
            }
            match self.tat_us.compare_exchange_weak(
                tat,
                base + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// Whether an accepted answer holds a secret the store does not keep (a generated private
/// key or a password).
fn carries_secret(response: &Value) -> bool {
    let credential = &response["credential"];
    credential.get("private_key_pem").is_some() || credential.get("password").is_some()
}

/// A complete answer kept in memory for retries: generated secrets are in it (the store only
/// has the answer without them).
struct Answered {
    at: Instant,
    response: Value,
}

/// The enrollment service.
pub struct Enroller {
    pub pki: Arc<Pki>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
    pub link: Bus,
    pub sessions: Arc<Sessions>,
    pub lifecycle: Arc<Lifecycle>,
    pub templates: Templates,
    pub config: EnrollmentConfig,
    /// One enrollment at a time per device (across instances the store's generation guard
    /// decides).
    locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Answers that carry a generated secret (which the store never holds), by (device,
    /// request id), kept until the device activates or the activation window ends. Answers
    /// without one are replayed from the store.
    answered: DashMap<(String, String), Answered>,
    rate: RateLimit,
    /// Credentials per device per hour.
    quota: IssueQuota,
}

impl Enroller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pki: Arc<Pki>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        audit: Auditor,
        link: Bus,
        sessions: Arc<Sessions>,
        lifecycle: Arc<Lifecycle>,
        templates: Templates,
        config: EnrollmentConfig,
    ) -> Enroller {
        let rate = RateLimit::new(config.max_requests_per_sec);
        Enroller {
            pki,
            store,
            metrics,
            audit,
            link,
            sessions,
            lifecycle,
            templates,
            config,
            locks: DashMap::new(),
            answered: DashMap::new(),
            rate,
            quota: IssueQuota {
                per_window: u32::MAX,
            },
        }
    }

    /// Limit the credentials issued to one device per hour (enrollments and renewals).
    pub fn with_quota(mut self, quota: IssueQuota) -> Enroller {
        self.quota = quota;
        self
    }

    fn answer_ttl(&self) -> Duration {
        Duration::from_secs(self.config.activation_timeout_secs)
    }

    /// Drop remembered answers older than the activation window, or whose device activated
    /// (it holds its credential: a retry now gets the stored answer).
    pub fn prune(&self) {
        let ttl = self.answer_ttl();
        self.answered
            .retain(|(device, _), a| a.at.elapsed() < ttl && self.lifecycle.is_awaiting(device));
        self.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    /// Handle one request of `device_id` and publish the answer on `enroll/D/response`
    /// through the broker (bootstrap sessions the broker holds).
    pub async fn handle(
        &self,
        device_id: &str,
        payload: &[u8],
        factory: Option<&FactoryIdentity>,
    ) -> Value {
        let response = self.answer(device_id, payload, factory).await;
        self.link.publish(
            &topics::enroll_response(device_id),
            serde_json::to_vec(&response).unwrap_or_default(),
        );
        response
    }

    /// Handle one request of `device_id` and return the answer (the caller delivers it).
    /// `factory`: the certificate of the bootstrap connection the request came through.
    pub async fn answer(
        &self,
        device_id: &str,
        payload: &[u8],
        factory: Option<&FactoryIdentity>,
    ) -> Value {
        let started = Instant::now();
        let (request_id, outcome) = match validate(payload, &self.config, &self.templates) {
            Err((id, rejection)) => (id, Err(rejection)),
            Ok(v) => {
                let id = v.request_id.clone();
                (Some(id), self.enroll(device_id, v, factory.cloned()).await)
            }
        };
        let role = Role::Bootstrap.as_str();
        let request_id_field = request_id.as_deref().unwrap_or("-");
        let response = match outcome {
            Ok((response, result)) => {
                self.metrics
                    .enrollment_requests
                    .with_label_values(&[result, "none"])
                    .inc();
                tracing::info!(
                    device_id,
                    role,
                    request_id = request_id_field,
                    result,
                    "enrollment answered"
                );
                response
            }
            Err(rejection) => {
                self.metrics
                    .enrollment_requests
                    .with_label_values(&["rejected", rejection.code.as_str()])
                    .inc();
                tracing::info!(
                    device_id,
                    role,
                    request_id = request_id_field,
                    result = "rejected",
                    reason = rejection.code.as_str(),
                    "enrollment answered"
                );
                let mut event = AuditEvent::new(
                    device_id,
                    "enrollment_rejected",
                    "device",
                    json!({ "code": rejection.code.as_str(), "message": rejection.message }),
                );
                event.request_id = request_id.clone();
                self.audit.record(event);
                rejection.to_json(request_id.as_deref())
            }
        };
        self.metrics
            .enrollment_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    /// The accepted (or replayed) answer and its metric result, or a rejection.
    async fn enroll(
        &self,
        device_id: &str,
        req: Validated,
        factory: Option<FactoryIdentity>,
    ) -> Result<(Value, &'static str), Rejection> {
        let key = (device_id.to_owned(), req.request_id.clone());
        if let Some(answer) = self.remembered(&key) {
            return Ok((answer, "duplicate"));
        }
        if let Err(after) = self.rate.check() {
            return Err(Rejection::retry(
                ErrorCode::RateLimited,
                "too many enrollment requests; retry later",
                after,
            ));
        }
        let lock = self.locks.entry(device_id.to_owned()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(answer) = self.remembered(&key) {
            return Ok((answer, "duplicate"));
        }
        let (stored, device) = self
            .metrics
            .store_op(
                "enrollment_context",
                self.store.enrollment_context(device_id, &req.request_id),
            )
            .await
            .map_err(|e| Rejection::from_store(&e))?;
        if let Some(stored) = stored {
            // Answered before (a restart, or the device activated since): the same answer,
            // without secrets we no longer hold; unless what it answered was undone.
            self.still_valid(&stored.serial).await?;
            return Ok((stored.response, "duplicate"));
        }
        let mut reenrolled_from = None;
        match &device {
            Some(d) if d.state == DeviceState::Revoked => {
                return Err(Rejection::new(
                    ErrorCode::DeviceRevoked,
                    "this device is revoked",
                ))
            }
            None if self.config.mode == EnrollmentMode::Allowlist => {
                return Err(Rejection::new(
                    ErrorCode::NotAllowlisted,
                    "this gateway enrolls pre-registered devices only",
                ))
            }
            Some(d) if d.state != DeviceState::Pending && d.current_serial.is_some() => {
                // A `failed` enrollment was rolled back: its credential is revoked and the
                // device may enroll again whatever the policy.
                let holds_credential =
                    matches!(d.state, DeviceState::Enrolling | DeviceState::Active);
                if holds_credential && self.config.reenroll == ReenrollPolicy::Deny {
                    return Err(Rejection::new(
                        ErrorCode::AlreadyEnrolled,
                        format!(
                            "device is already enrolled (state {}); re-enrollment is disabled",
                            d.state
                        ),
                    ));
                }
                reenrolled_from = Some(d.state);
            }
            _ => {}
        }
        if let Some(d) = &device {
            self.check_issuer(d, factory.as_ref())?;
            self.check_quota(device_id).await?;
        }

        // Issue the credential.
        let now = OffsetDateTime::now_utc();
        let (credential, credential_json, redacted_json, kind_label) = match &req.wanted {
            Wanted::SignCsr(csr) => {
                let cert = self.pki.sign_csr(device_id, csr).map_err(csr_rejection)?;
                let body = json!({
                    "type": "certificate",
                    "certificate_pem": cert.certificate_pem,
                    "ca_chain_pem": self.pki.ca_chain_pem(),
                    "not_after": rfc3339(cert.not_after),
                });
                (
                    self.cert_row(device_id, &cert, now),
                    body.clone(),
                    body,
                    "csr",
                )
            }
            Wanted::GenerateKey => {
                let (cert, key_pem) = self.pki.generate_credential(device_id).map_err(|e| {
                    tracing::error!(device_id, error = %e, "generating a key pair");
                    Rejection::retry(
                        ErrorCode::Unavailable,
                        "could not generate a key pair",
                        UNAVAILABLE_RETRY_MS,
                    )
                })?;
                let redacted = json!({
                    "type": "certificate",
                    "certificate_pem": cert.certificate_pem,
                    "ca_chain_pem": self.pki.ca_chain_pem(),
                    "not_after": rfc3339(cert.not_after),
                });
                let mut full = redacted.clone();
                full["private_key_pem"] = json!(key_pem);
                (
                    self.cert_row(device_id, &cert, now),
                    full,
                    redacted,
                    "generated",
                )
            }
            Wanted::Password => {
                let secret = crate::password::generate();
                let hash = crate::password::hash(&secret);
                let row = Credential {
                    serial: uuid::Uuid::new_v4().simple().to_string(),
                    fingerprint: Sha256::digest(hash.as_bytes()).to_vec(),
                    device_id: device_id.to_owned(),
                    kind: CredentialKind::Password,
                    password_hash: Some(hash),
                    not_after: None,
                    created_at: now,
                    activated_at: None,
                    revoked_at: None,
                    revoke_reason: None,
                };
                let redacted = json!({ "type": "password", "username": device_id });
                let full = json!({ "type": "password", "username": device_id, "password": secret });
                (row, full, redacted, "password")
            }
        };

        // Configuration: the latest one carries over a re-enrollment; a new device gets the
        // template of its type.
        let latest = match &device {
            Some(_) => self
                .metrics
                .store_op("latest_config", self.store.latest_config(device_id))
                .await
                .map_err(|e| Rejection::from_store(&e))?,
            None => None,
        };
        let version = latest.as_ref().map_or(1, |c| c.version + 1);
        let config_body = match latest.map(|c| c.body) {
            Some(Value::Object(body)) => templates::with_identity(body, device_id, version),
            _ => self
                .templates
                .render(&req.device_type, device_id, version)
                .ok_or_else(|| {
                    Rejection::new(ErrorCode::UnknownDeviceType, "template disappeared")
                })?,
        };

        // Whole seconds: what the device is told is exactly what the store holds.
        let deadline = (now + Duration::from_secs(self.config.activation_timeout_secs))
            .replace_nanosecond(0)
            .unwrap_or(now + Duration::from_secs(self.config.activation_timeout_secs));
        let config_topic = topics::config(device_id);
        let answer = |credential: Value| {
            json!({
                "request_id": req.request_id,
                "status": "accepted",
                "device_id": device_id,
                "credential": credential,
                "config_topic": config_topic,
                "config_version": version,
                "activation_deadline": rfc3339(deadline),
            })
        };
        let response = answer(credential_json);
        let stored_response = answer(redacted_json);

        let factory_serial = factory.as_ref().map(|f| f.serial.clone());
        let mut events = Vec::new();
        if let Some(previous) = reenrolled_from {
            events.push(
                AuditEvent::new(
                    device_id,
                    "reenrolled",
                    "device",
                    json!({ "previous_state": previous.as_str() }),
                )
                .with_request(&req.request_id),
            );
        }
        events.push(
            AuditEvent::new(
                device_id,
                "credential_issued",
                "gateway",
                json!({
                    "kind": credential.kind.as_str(),
                    "issued": kind_label,
                    "serial": credential.serial,
                    "fingerprint": hex::encode(&credential.fingerprint),
                    "not_after": credential.not_after.map(rfc3339),
                    "factory_serial": factory_serial,
                    "device_type": req.device_type,
                }),
            )
            .with_request(&req.request_id),
        );
        events.push(
            AuditEvent::new(
                device_id,
                "config_published",
                "gateway",
                json!({ "version": version }),
            )
            .with_request(&req.request_id),
        );
        events.push(
            AuditEvent::new(
                device_id,
                "enrollment_accepted",
                "gateway",
                json!({ "activation_deadline": rfc3339(deadline) }),
            )
            .with_request(&req.request_id),
        );
        let serial = credential.serial.clone();
        let commit = EnrollmentCommit {
            device_id: device_id.to_owned(),
            request_id: req.request_id.clone(),
            expected_generation: device.as_ref().map(|d| d.generation),
            device_type: req.device_type.clone(),
            model: req.model.clone(),
            location: req.location.clone(),
            firmware_version: req.firmware_version.clone(),
            credential,
            config_body: config_body.clone(),
            activation_deadline: deadline,
            // The previous credential is revoked now if it never activated, else on activation.
            revoke_others: match reenrolled_from {
                Some(DeviceState::Active) => None,
                Some(_) => Some("reenrolled".into()),
                None => None,
            },
            response: stored_response,
            events: events.clone(),
            factory: factory.clone(),
        };
        let revokes_others = commit.revoke_others.is_some();
        match self
            .metrics
            .store_op("commit_enrollment", self.store.commit_enrollment(commit))
            .await
        {
            Ok(committed) if committed.config.version != version => {
                tracing::warn!(
                    device_id,
                    expected = version,
                    got = committed.config.version,
                    "config version raced"
                );
            }
            Ok(_) => {}
            Err(StoreError::Conflict(_)) if self.bound_elsewhere(device_id, &factory).await => {
                return Err(issuer_mismatch());
            }
            Err(StoreError::Conflict(_)) => {
                // Another instance (or a retry) got there first: answer what it answered.
                if let Ok(Some(stored)) =
                    self.store.find_enrollment(device_id, &req.request_id).await
                {
                    return Ok((stored.response, "duplicate"));
                }
                return Err(Rejection::retry(
                    ErrorCode::Unavailable,
                    "another enrollment of this device is in progress; retry",
                    1_000,
                ));
            }
            Err(e) => return Err(Rejection::from_store(&e)),
        }
        if revokes_others {
            // The credentials just revoked may not keep a live session.
            self.sessions.disconnect_role(device_id, Role::Device);
        }
        for event in &events {
            self.audit.announce(event);
        }
        self.metrics
            .certificates_issued
            .with_label_values(&[kind_label])
            .inc();

        // The configuration is retained before the answer is published (same ordered link).
        self.link.publish_retained(
            &config_topic,
            serde_json::to_vec(&config_body).unwrap_or_default(),
        );
        self.lifecycle
            .watch_activation(device_id, &serial, deadline, now);
        if carries_secret(&response) {
            self.answered.insert(
                key,
                Answered {
                    at: Instant::now(),
                    response: response.clone(),
                },
            );
        }
        Ok((response, "accepted"))
    }

    /// Refuse a device bound to another factory CA than the one this request came through
    /// (audited with both issuers). A device is bound at its first enrollment; an admin
    /// rollback of the enrollment releases it.
    fn check_issuer(
        &self,
        device: &Device,
        factory: Option<&FactoryIdentity>,
    ) -> Result<(), Rejection> {
        let Some(bound) = device.factory_issuer.as_deref() else {
            return Ok(());
        };
        let presented = factory.map(|f| f.issuer.as_str());
        if presented == Some(bound) {
            return Ok(());
        }
        self.audit.record(AuditEvent::new(
            &device.id,
            "factory_issuer_mismatch",
            "device",
            json!({
                "bound_issuer": bound,
                "bound_serial": device.factory_serial,
                "presented_issuer": presented,
                "presented_serial": factory.map(|f| f.serial.as_str()),
            }),
        ));
        Err(issuer_mismatch())
    }

    /// Whether a commit conflict came from a binding to another issuer recorded meanwhile
    /// (by a racing enrollment, possibly on another gateway).
    async fn bound_elsewhere(&self, device_id: &str, factory: &Option<FactoryIdentity>) -> bool {
        match self.store.device(device_id).await {
            Ok(Some(d)) => self.check_issuer(&d, factory.as_ref()).is_err(),
            _ => false,
        }
    }

    /// The full answer remembered for `key`, while the enrollment it answered still awaits
    /// activation (rolled back, it answers nothing any more).
    fn remembered(&self, key: &(String, String)) -> Option<Value> {
        let answer = self.answered.get(key)?;
        self.lifecycle
            .is_awaiting(&key.0)
            .then(|| answer.response.clone())
    }

    /// Refuse the replay of an answer whose credential was revoked since (the enrollment was
    /// rolled back, timed out or replaced): it must not come back as `accepted`.
    async fn still_valid(&self, serial: &str) -> Result<(), Rejection> {
        let credential = self
            .metrics
            .store_op("credential", self.store.credential(serial))
            .await
            .map_err(|e| Rejection::from_store(&e))?;
        match credential {
            Some(c) if c.is_revoked() => Err(Rejection::new(
                ErrorCode::MalformedRequest,
                "this request_id answered an enrollment that was rolled back or replaced; \
                 send a new request_id",
            )),
            _ => Ok(()),
        }
    }

    /// Refuse (`rate_limited`) a device that was issued its hourly share of credentials.
    async fn check_quota(&self, device_id: &str) -> Result<(), Rejection> {
        let issued = self
            .metrics
            .store_op("credentials_of", self.store.credentials_of(device_id))
            .await
            .map_err(|e| Rejection::from_store(&e))?;
        self.quota
            .check(&issued, OffsetDateTime::now_utc())
            .map_err(|after| {
                Rejection::retry(
                    ErrorCode::RateLimited,
                    "this device was issued its hourly share of credentials; retry later",
                    after,
                )
            })
    }

    fn cert_row(
        &self,
        device_id: &str,
        cert: &crate::pki::IssuedCertificate,
        now: OffsetDateTime,
    ) -> Credential {
        Credential {
            serial: cert.serial.clone(),
            fingerprint: cert.fingerprint.clone(),
            device_id: device_id.to_owned(),
            kind: CredentialKind::Certificate,
            password_hash: None,
            not_after: Some(cert.not_after),
            created_at: now,
            activated_at: None,
            revoked_at: None,
            revoke_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates() -> Templates {
        Templates::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/templates"
        )))
        .unwrap()
    }

    fn reject(payload: &[u8]) -> (Option<String>, Rejection) {
        validate(payload, &EnrollmentConfig::default(), &templates()).unwrap_err()
    }

    #[test]
    fn malformed_requests_are_named() {
        let (id, r) = reject(b"{not json");
        assert_eq!((id, r.code), (None, ErrorCode::MalformedRequest));
        assert!(r.message.contains("not valid JSON"), "{}", r.message);
        let (_, r) = reject(br#"{"credential":"certificate"}"#);
        assert!(r.message.contains("request_id"), "{}", r.message);
        let (id, r) = reject(br#"{"request_id":"r1","credential":"magic"}"#);
        assert_eq!(id.as_deref(), Some("r1"));
        assert!(r.message.contains("magic"));
        let long = format!(r#"{{"request_id":"{}"}}"#, "x".repeat(65));
        assert_eq!(reject(long.as_bytes()).1.code, ErrorCode::MalformedRequest);
        let big = vec![b' '; 16 * 1024 + 1];
        let (_, r) = reject(&big);
        assert!(r.message.contains("16385 bytes"), "{}", r.message);
        let (_, r) = reject(br#"{"request_id":"r1","credential":"password","csr":"x"}"#);
        assert_eq!(r.code, ErrorCode::MalformedRequest);
        let (id, r) = reject(br#"{"request_id":"r1","device_type":"toaster"}"#);
        assert_eq!(
            (id.as_deref(), r.code),
            (Some("r1"), ErrorCode::UnknownDeviceType)
        );
    }

    #[test]
    fn valid_requests_pick_the_credential_kind() {
        let t = templates();
        let c = EnrollmentConfig::default();
        let v = validate(br#"{"request_id":"r","csr":"PEM"}"#, &c, &t).unwrap();
        assert_eq!(v.wanted, Wanted::SignCsr("PEM".into()));
        assert_eq!(v.device_type, "thermostat");
        let v = validate(
            br#"{"request_id":"r","device_type":"sensor","extra":1}"#,
            &c,
            &t,
        )
        .unwrap();
        assert_eq!(v.wanted, Wanted::GenerateKey);
        let v = validate(br#"{"request_id":"r","credential":"password"}"#, &c, &t).unwrap();
        assert_eq!(v.wanted, Wanted::Password);
    }

    #[test]
    fn rejections_carry_retry_after_when_retryable() {
        let r = Rejection::retry(ErrorCode::Unavailable, "down", 5000);
        let doc = r.to_json(Some("r1"));
        assert_eq!(doc["status"], "rejected");
        assert_eq!(doc["error"]["code"], "unavailable");
        assert_eq!(doc["error"]["retry_after_ms"], 5000);
        let doc = Rejection::new(ErrorCode::WeakKey, "small").to_json(None);
        assert!(doc["error"].get("retry_after_ms").is_none());
        assert!(doc["request_id"].is_null());
    }

    #[test]
    fn rate_limit_allows_a_burst_then_refuses() {
        let limit = RateLimit::new(10);
        let allowed = (0..100).filter(|_| limit.check().is_ok()).count();
        assert!((10..=12).contains(&allowed), "{allowed}");
        assert!(limit.check().unwrap_err() > 0);
    }
}
