//! Certificate renewal. An active device publishes `{request_id, csr}` on
//! `devices/D/cert/renew` over its current certificate and gets
//! `{request_id, status: "accepted", certificate_pem, ca_chain_pem, not_after, grace_until}` (or
//! `{request_id, status: "rejected", error: {code, message}}` with the enrollment codes) on
//! `devices/D/cert/response`.
//!
//! The previous certificate stays valid until the device connects with the new one (then it is
//! revoked as `superseded`) or the grace period `[lifecycle] renewal_grace_secs` ends (then the
//! periodic sweep revokes it as `renewal_grace_expired`). Grace deadlines are derived from the
//! store, so a restart loses none. Requests are idempotent on `request_id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{usable_request_id, Admin};
use crate::pki::CsrError;
use crate::store::{AuditEvent, Credential, CredentialKind, DeviceFilter, DeviceState, StoreError};

/// How long an answer stays in memory for retries (the store keeps it as well).
const ANSWER_TTL: Duration = Duration::from_secs(3600);
/// Certificates expiring within this many days count in `onboard_certificates_expiring`.
pub const EXPIRING_DAYS: i64 = 30;
/// The expiring-certificates gauge is refreshed every this many sweeps.
const EXPIRING_EVERY: u64 = 30;
/// Devices read per page when reloading grace periods at start.
const RESTORE_PAGE: u32 = 1000;

/// `devices/D/cert/renew`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct RenewRequest {
    pub request_id: String,
    pub csr: String,
}

/// A renewed certificate whose predecessors are valid until `until`.
#[derive(Debug, Clone, PartialEq)]
struct Grace {
    serial: String,
    until: OffsetDateTime,
}

/// In-memory state of renewals.
#[derive(Default)]
pub struct Renewals {
    /// Answers by (device, request id).
    answered: DashMap<(String, String), (Instant, Value)>,
    /// Pending grace periods by device.
    graces: Mutex<HashMap<String, Grace>>,
    /// One renewal at a time.
    lock: tokio::sync::Mutex<()>,
    sweeps: AtomicU64,
}

impl Renewals {
    fn graces(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grace>> {
        self.graces.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Store key of a renewal's answer (shares the admin replies table).
fn reply_key(device_id: &str, request_id: &str) -> String {
    format!("renew:{device_id}:{request_id}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn rejected(request_id: Option<&str>, code: &str, message: impl Into<String>) -> Value {
    json!({
        "request_id": request_id,
        "status": "rejected",
        "error": { "code": code, "message": message.into() },
    })
}

fn csr_rejection(request_id: &str, e: CsrError) -> Value {
    match e {
        CsrError::Invalid(m) => rejected(Some(request_id), "csr_invalid", m),
        e @ CsrError::SubjectMismatch { .. } => {
            rejected(Some(request_id), "csr_subject_mismatch", e.to_string())
        }
        CsrError::WeakKey(m) => rejected(Some(request_id), "weak_key", m),
    }
}

fn unavailable(request_id: &str, e: &StoreError) -> Value {
    tracing::warn!(error = %e, "store error during renewal");
    let mut v = rejected(
        Some(request_id),
        "unavailable",
        "the inventory is unavailable; retry later with the same request_id",
    );
    v["error"]["retry_after_ms"] = json!(5_000);
    v
}

impl Admin {
    /// `Err` with the `rate_limited` answer when `device_id` was issued its hourly share of
    /// credentials.
    async fn within_quota(&self, device_id: &str, request_id: &str) -> Result<(), Value> {
        let issued = self
            .metrics
            .store_op("credentials_of", self.store.credentials_of(device_id))
            .await
            .map_err(|e| unavailable(request_id, &e))?;
        self.quota
            .check(&issued, OffsetDateTime::now_utc())
            .map_err(|after| {
                let mut v = rejected(
                    Some(request_id),
                    "rate_limited",
                    "this device was issued its hourly share of credentials; retry later",
                );
                v["error"]["retry_after_ms"] = json!(after);
                v
            })
    }

    /// A renewal request of `device_id`; always answered on `devices/D/cert/response`.
    pub async fn renew(&self, device_id: &str, payload: &[u8]) {
        let response = self.renewal_answer(device_id, payload).await;
        if response["status"] != "accepted" {
            let mut event = AuditEvent::new(
                device_id,
                "renewal_rejected",
                "device",
                response["error"].clone(),
            );
            event.request_id = response["request_id"].as_str().map(str::to_owned);
            self.audit.record(event);
        }
        self.link.publish(
            &format!("devices/{device_id}/cert/response"),
            serde_json::to_vec(&response).unwrap_or_default(),
        );
    }

    async fn renewal_answer(&self, device_id: &str, payload: &[u8]) -> Value {
        let value: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                return rejected(
                    None,
                    "malformed_request",
                    format!("request is not valid JSON: {e}"),
                )
            }
        };
        let echo = value
            .get("request_id")
            .and_then(Value::as_str)
            .filter(|id| usable_request_id(id))
            .map(str::to_owned);
        let request: RenewRequest = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                return rejected(
                    echo.as_deref(),
                    "malformed_request",
                    format!("invalid request: {e}"),
                )
            }
        };
        let Some(request_id) = echo else {
            return rejected(
                None,
                "malformed_request",
                "request_id must be 1 to 64 characters, none of / + # $",
            );
        };
        let key = (device_id.to_owned(), request_id.clone());
        if let Some(answer) = self.renewals.answered.get(&key) {
            return answer.1.clone();
        }
        let _one_at_a_time = self.renewals.lock.lock().await;
        if let Some(answer) = self.renewals.answered.get(&key) {
            return answer.1.clone();
        }
        let store_key = reply_key(device_id, &request_id);
        match self
            .metrics
            .store_op("admin_reply", self.store.admin_reply(&store_key))
            .await
        {
            Ok(Some(stored)) => return stored,
            Ok(None) => {}
            Err(e) => return unavailable(&request_id, &e),
        }
        let device = match self
            .metrics
            .store_op("device", self.store.device(device_id))
            .await
        {
            Ok(Some(d)) => d,
            Ok(None) => {
                return rejected(
                    Some(&request_id),
                    "invalid_state",
                    "the device is not in the inventory",
                )
            }
            Err(e) => return unavailable(&request_id, &e),
        };
        match device.state {
            DeviceState::Active => {}
            DeviceState::Revoked => {
                return rejected(
                    Some(&request_id),
                    "device_revoked",
                    "this device is revoked",
                )
            }
            other => {
                return rejected(
                    Some(&request_id),
                    "invalid_state",
                    format!("only an active device renews its certificate (this one is {other})"),
                )
            }
        }
        if let Err(answer) = self.within_quota(device_id, &request_id).await {
            return answer;
        }
        let cert = match self.pki.sign_csr(device_id, &request.csr) {
            Ok(c) => c,
            Err(e) => return csr_rejection(&request_id, e),
        };
        let now = OffsetDateTime::now_utc();
        let grace_until = now + Duration::from_secs(self.config.renewal_grace_secs);
        let credential = Credential {
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
        };
        let event = AuditEvent::new(
            device_id,
            "certificate_renewed",
            "device",
            json!({
                "serial": cert.serial,
                "fingerprint": hex::encode(&cert.fingerprint),
                "not_after": rfc3339(cert.not_after),
                "grace_until": rfc3339(grace_until),
            }),
        )
        .with_request(&request_id);
        if let Err(e) = self
            .metrics
            .store_op(
                "insert_credential",
                self.store.insert_credential(&credential, event.clone()),
            )
            .await
        {
            return unavailable(&request_id, &e);
        }
        self.audit.announce(&event);
        self.metrics
            .certificates_issued
            .with_label_values(&["renewal"])
            .inc();
        let response = json!({
            "request_id": request_id,
            "status": "accepted",
            "certificate_pem": cert.certificate_pem,
            "ca_chain_pem": self.pki.ca_chain_pem(),
            "not_after": rfc3339(cert.not_after),
            "grace_until": rfc3339(grace_until),
        });
        if let Err(e) = self
            .metrics
            .store_op(
                "record_admin_reply",
                self.store.record_admin_reply(&store_key, &response),
            )
            .await
        {
            tracing::warn!(device_id, error = %e, "renewal answer not remembered in the store");
        }
        self.renewals
            .answered
            .insert(key, (Instant::now(), response.clone()));
        self.renewals.graces().insert(
            device_id.to_owned(),
            Grace {
                serial: cert.serial,
                until: grace_until,
            },
        );
        response
    }

    /// Revoke the device's unrevoked certificates issued before `current` (except `current`),
    /// close their sessions, and return their serials.
    async fn retire_predecessors(
        &self,
        device_id: &str,
        current: &Credential,
        reason: &str,
    ) -> Result<Vec<String>, StoreError> {
        let credentials = self
            .metrics
            .store_op("credentials_of", self.store.credentials_of(device_id))
            .await?;
        let mut revoked = Vec::new();
        for c in credentials.iter().filter(|c| {
            c.kind == CredentialKind::Certificate
                && c.serial != current.serial
                && !c.is_revoked()
                && c.created_at <= current.created_at
        }) {
            if self
                .metrics
                .store_op(
                    "revoke_credential",
                    self.store.revoke_credential(&c.serial, reason),
                )
                .await?
            {
                self.sessions.disconnect_serial(device_id, &c.serial);
                revoked.push(c.serial.clone());
            }
        }
        Ok(revoked)
    }

    /// The device connected for the first time with a certificate issued by renewal: mark it
    /// used and revoke the certificates it replaces (reason `superseded`).
    pub async fn renewed_credential_used(&self, device_id: &str, serial: &str) {
        let credential = match self.store.credential(serial).await {
            Ok(Some(c))
                if c.device_id == device_id
                    && c.kind == CredentialKind::Certificate
                    && !c.is_revoked() =>
            {
                c
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(device_id, serial, error = %e, "renewed credential use not recorded");
                return;
            }
        };
        if let Err(e) = self
            .metrics
            .store_op(
                "mark_credential_used",
                self.store.mark_credential_used(serial),
            )
            .await
        {
            tracing::warn!(device_id, serial, error = %e, "renewed credential use not recorded");
            return;
        }
        match self
            .retire_predecessors(device_id, &credential, "superseded")
            .await
        {
            Ok(revoked) => {
                {
                    let mut graces = self.renewals.graces();
                    if graces.get(device_id).is_some_and(|g| g.serial == serial) {
                        graces.remove(device_id);
                    }
                }
                self.audit.record(AuditEvent::new(
                    device_id,
                    "renewed_certificate_in_use",
                    "device",
                    json!({ "serial": serial, "superseded": revoked }),
                ));
            }
            Err(e) => {
                tracing::warn!(device_id, serial, error = %e, "superseded certificates not revoked; the grace sweep will")
            }
        }
    }

    /// Revoke the predecessors of renewals whose grace period ended.
    pub(crate) async fn sweep_renewals(&self) {
        let now = OffsetDateTime::now_utc();
        let due: Vec<(String, Grace)> = self
            .renewals
            .graces()
            .iter()
            .filter(|(_, g)| g.until <= now)
            .map(|(d, g)| (d.clone(), g.clone()))
            .collect();
        for (device_id, grace) in due {
            let current = match self.store.credential(&grace.serial).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    self.renewals.graces().remove(&device_id);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(device_id, error = %e, "grace sweep: will retry");
                    continue;
                }
            };
            match self
                .retire_predecessors(&device_id, &current, "renewal_grace_expired")
                .await
            {
                Ok(revoked) => {
                    {
                        let mut graces = self.renewals.graces();
                        if graces.get(&device_id) == Some(&grace) {
                            graces.remove(&device_id);
                        }
                    }
                    if !revoked.is_empty() {
                        self.audit.record(AuditEvent::new(
                            &device_id,
                            "renewal_grace_expired",
                            "gateway",
                            json!({ "serial": grace.serial, "revoked": revoked }),
                        ));
                    }
                }
                Err(e) => tracing::warn!(device_id, error = %e, "grace sweep: will retry"),
            }
        }
        self.renewals
            .answered
            .retain(|_, (at, _)| at.elapsed() < ANSWER_TTL);
    }

    /// Reload, from the store, active devices whose newest certificate was issued by a renewal
    /// and not used yet while older ones are still valid.
    pub(crate) async fn restore_renewals(&self) {
        let grace = Duration::from_secs(self.config.renewal_grace_secs);
        let mut offset = 0u32;
        let mut restored = 0usize;
        loop {
            let filter = DeviceFilter {
                state: Some(DeviceState::Active),
                limit: Some(RESTORE_PAGE),
                offset: Some(offset),
                ..DeviceFilter::default()
            };
            let devices = match self.store.list_devices(&filter).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "renewal grace periods not restored");
                    return;
                }
            };
            let page = devices.len();
            for device in devices {
                let Ok(credentials) = self.store.credentials_of(&device.id).await else {
                    continue;
                };
                let mut certs: Vec<&Credential> = credentials
                    .iter()
                    .filter(|c| c.kind == CredentialKind::Certificate && !c.is_revoked())
                    .collect();
                certs.sort_by_key(|c| c.created_at);
                if let [older @ .., newest] = certs.as_slice() {
                    if !older.is_empty() && newest.activated_at.is_none() {
                        self.renewals.graces().insert(
                            device.id.clone(),
                            Grace {
                                serial: newest.serial.clone(),
                                until: newest.created_at + grace,
                            },
                        );
                        restored += 1;
                    }
                }
            }
            if page < RESTORE_PAGE as usize {
                break;
            }
            offset += RESTORE_PAGE;
        }
        if restored > 0 {
            tracing::info!(restored, "renewal grace periods restored");
        }
    }

    /// Refresh `onboard_certificates_expiring`: devices (enrolling or active) whose newest
    /// unrevoked certificate expires within [`EXPIRING_DAYS`] days. Runs every
    /// [`EXPIRING_EVERY`] sweeps.
    pub(crate) async fn refresh_expiring(&self) {
        if self.renewals.sweeps.fetch_add(1, Ordering::Relaxed) % EXPIRING_EVERY != 0 {
            return;
        }
        let horizon = OffsetDateTime::now_utc() + time::Duration::days(EXPIRING_DAYS);
        let filter = DeviceFilter {
            expiring_before: Some(horizon),
            ..DeviceFilter::default()
        };
        let devices = match self
            .metrics
            .store_op("list_devices", self.store.list_devices(&filter))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "expiring certificates not counted");
                return;
            }
        };
        let mut expiring = 0i64;
        for device in devices.iter().filter(|d| Admin::is_published(d)) {
            // A renewed device's current certificate may be newer than the one the device row
            // names.
            let newest = match self.store.credentials_of(&device.id).await {
                Ok(credentials) => credentials
                    .into_iter()
                    .filter(|c| c.kind == CredentialKind::Certificate && !c.is_revoked())
                    .filter_map(|c| c.not_after)
                    .max(),
                Err(_) => continue,
            };
            if newest.is_some_and(|t| t < horizon) {
                expiring += 1;
            }
        }
        self.metrics.certificates_expiring.set(expiring);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_echo_the_request_id() {
        let r = rejected(Some("r1"), "csr_invalid", "bad");
        assert_eq!(r["status"], "rejected");
        assert_eq!(r["request_id"], "r1");
        assert_eq!(r["error"]["code"], "csr_invalid");
        let r = csr_rejection(
            "r2",
            CsrError::SubjectMismatch {
                expected: "a".into(),
                found: "b".into(),
            },
        );
        assert_eq!(r["error"]["code"], "csr_subject_mismatch");
        assert_eq!(reply_key("d1", "r1"), "renew:d1:r1");
    }
}
