//! Revocation (`admin/devices/D/revoke`), reinstatement (`admin/devices/D/reinstate`) and the
//! rollback of an enrollment (`admin/devices/D/rollback` with `target: enrollment`).
//!
//! The device's state in the store is what the front and the enrollment service check at every
//! connect and enrollment, so a revocation holds across restarts; open sessions are closed at
//! once.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_body, Admin, CommandError, ErrorCode};
use crate::store::{AuditEvent, DeviceState, StoreError, Transition, TransitionTarget};
use crate::topics;

/// Longest revocation reason kept.
const MAX_REASON: usize = 256;

/// Every state but `revoked`: where a revocation or an enrollment rollback may start.
const NOT_REVOKED: [DeviceState; 4] = [
    DeviceState::Pending,
    DeviceState::Enrolling,
    DeviceState::Active,
    DeviceState::Failed,
];

/// `admin/devices/D/revoke`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeCommand {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `admin/devices/D/reinstate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReinstateCommand {}

impl Admin {
    /// Move the device from one of `from` to `to` with its event (written in the same
    /// guarded transaction) and announce it. A device found in another state (changed by
    /// another admin or gateway since it was read) is refused with `refused`.
    async fn transition(
        &self,
        device_id: &str,
        from: &[DeviceState],
        to: TransitionTarget,
        event: AuditEvent,
        refused: ErrorCode,
    ) -> Result<Transition, CommandError> {
        let moved = self
            .metrics
            .store_op(
                "transition",
                self.store.transition(device_id, from, to, event.clone()),
            )
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => CommandError::new(
                    ErrorCode::UnknownDevice,
                    format!("no device {device_id:?} in the inventory"),
                ),
                StoreError::WrongState { actual, .. } => {
                    CommandError::new(refused, format!("device {device_id:?} is {actual}"))
                }
                e => CommandError::store(&e),
            })?;
        self.audit.announce(&event);
        Ok(moved)
    }

    /// After a transition that revoked the device's credentials: close its sessions and
    /// clear its retained topics. Returns how many sessions were closed.
    fn cut_off(&self, device_id: &str) -> usize {
        let disconnected = self.sessions.disconnect(device_id);
        self.link.clear_retained(&topics::config(device_id));
        self.link.clear_retained(&topics::firmware(device_id));
        disconnected
    }

    /// `admin/devices/D/revoke`.
    pub(crate) async fn revoke(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let command: RevokeCommand = parse_body(body)?;
        let reason = command
            .reason
            .map(|r| super::truncate(r.trim(), MAX_REASON))
            .filter(|r| !r.is_empty());
        let device = self.known_device(device_id).await?;
        if device.state == DeviceState::Revoked {
            return Err(CommandError::new(
                ErrorCode::AlreadyRevoked,
                format!("device {device_id:?} is already revoked"),
            ));
        }
        // The state first: from here on every connect and enrollment of the device is refused.
        let event = AuditEvent::new(
            device_id,
            "device_revoked",
            actor,
            json!({ "reason": reason, "previous_state": device.state.as_str() }),
        )
        .with_request(request_id);
        let last_error = format!(
            "revoked by {actor}{}",
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        // The state and the credentials in one transaction: from here on every connect and
        // enrollment of the device is refused, on every gateway.
        let target = TransitionTarget::new(DeviceState::Revoked)
            .with_error(&last_error)
            .revoking_credentials("device_revoked");
        let moved = self
            .transition(
                device_id,
                &NOT_REVOKED,
                target,
                event,
                ErrorCode::AlreadyRevoked,
            )
            .await?;
        let disconnected = self.cut_off(device_id);
        let serials = moved.revoked.clone();
        self.audit.record(
            AuditEvent::new(
                device_id,
                "credentials_revoked",
                actor,
                json!({ "serials": serials, "reason": "device_revoked", "disconnected": disconnected }),
            )
            .with_request(request_id),
        );
        Ok(json!({
            "device_id": device_id,
            "state": "revoked",
            "previous_state": moved.from.as_str(),
            "revoked_credentials": serials,
            "disconnected": disconnected,
        }))
    }

    /// `admin/devices/D/reinstate`: a revoked device becomes `pending` and may enroll again
    /// with its factory certificate.
    pub(crate) async fn reinstate(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let _: ReinstateCommand = parse_body(body)?;
        let device = self.known_device(device_id).await?;
        if device.state != DeviceState::Revoked {
            return Err(CommandError::new(
                ErrorCode::NotRevoked,
                format!("device {device_id:?} is {}, not revoked", device.state),
            ));
        }
        let event = AuditEvent::new(
            device_id,
            "device_reinstated",
            actor,
            json!({ "previous_state": "revoked" }),
        )
        .with_request(request_id);
        self.transition(
            device_id,
            &[DeviceState::Revoked],
            DeviceState::Pending.into(),
            event,
            ErrorCode::NotRevoked,
        )
        .await?;
        Ok(json!({ "device_id": device_id, "state": "pending" }))
    }

    /// `admin/devices/D/rollback` with `target: enrollment`: the device's credentials are
    /// revoked, its sessions closed, its retained topics cleared and its state `pending`; it
    /// enrolls again with its factory certificate (its configuration history is kept).
    pub(crate) async fn rollback_enrollment(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
    ) -> Result<Value, CommandError> {
        let device = self.known_device(device_id).await?;
        if device.state == DeviceState::Revoked {
            return Err(CommandError::new(
                ErrorCode::DeviceRevoked,
                format!("device {device_id:?} is revoked; reinstate it instead"),
            ));
        }
        let event = AuditEvent::new(
            device_id,
            "enrollment_rolled_back",
            actor,
            json!({ "trigger": "admin", "previous_state": device.state.as_str() }),
        )
        .with_request(request_id);
        // A revocation that won the race (another admin, another gateway) is never
        // overwritten: the transition refuses a revoked device. The factory issuer binding is
        // released, so the device may come back through another maker's CA.
        let target = TransitionTarget::new(DeviceState::Pending)
            .releasing_factory()
            .revoking_credentials("enrollment_rolled_back");
        let moved = self
            .transition(
                device_id,
                &NOT_REVOKED,
                target,
                event,
                ErrorCode::DeviceRevoked,
            )
            .await?;
        let disconnected = self.cut_off(device_id);
        let serials = moved.revoked.clone();
        self.audit.record(
            AuditEvent::new(
                device_id,
                "credentials_revoked",
                actor,
                json!({ "serials": serials, "reason": "enrollment_rolled_back", "disconnected": disconnected }),
            )
            .with_request(request_id),
        );
        self.metrics
            .rollbacks
            .with_label_values(&["enrollment", "admin"])
            .inc();
        Ok(json!({
            "device_id": device_id,
            "state": "pending",
            "previous_state": moved.from.as_str(),
            "revoked_credentials": serials,
            "disconnected": disconnected,
        }))
    }
}
