//! The admin plane and the device-initiated lifecycle messages that follow enrollment.
//!
//! Admins (clients whose certificate the admin CA issued) publish commands on
//! `admin/devices/D/<command>` and `admin/firmware`; the front hands each one to
//! [`Admin::command`] with the admin's certificate CN. Every command carries a `request_id`, is
//! validated, executed once (a repeated `request_id` gets the stored reply again), audited with
//! the admin as actor, counted in `onboard_admin_commands_total{command,result}` and answered on
//! `admin/responses/<request_id>`:
//!
//! ```json
//! { "request_id": "r-1", "status": "ok", "result": { ... } }
//! { "request_id": "r-1", "status": "error", "error": { "code": "unknown_device", "message": "..." } }
//! ```
//!
//! | topic | module |
//! | --- | --- |
//! | `admin/devices/D/config`, `admin/devices/D/rollback` (`target: config`) | [`config`] |
//! | `admin/devices/D/firmware`, `admin/firmware` | [`firmware`] |
//! | `admin/devices/D/revoke`, `admin/devices/D/reinstate`, `admin/devices/D/rollback` (`target: enrollment`) | [`revoke`] |
//!
//! Devices report on `devices/D/config/ack` ([`Admin::config_ack`]), `devices/D/firmware/status`
//! ([`Admin::firmware_status`]) and renew their certificate on `devices/D/cert/renew`
//! ([`Admin::renew`], module [`renew`]).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::audit::Auditor;
use crate::bus::Bus;
use crate::config::LifecycleConfig;
use crate::front::session::Sessions;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::quota::IssueQuota;
use crate::store::{AuditEvent, Device, DeviceConfig, DeviceState, Store, StoreError};
use crate::topics;

/// Configurations read per store round trip when they are retained again at start.
const RESTORE_PAGE: u32 = 1_000;

pub mod config;
pub mod firmware;
pub mod renew;
pub mod revoke;

/// Longest accepted `request_id` (the same bound as enrollment).
pub const MAX_REQUEST_ID: usize = 64;

/// Device id of audit events about a command that names no single device (`admin/firmware`,
/// or a topic we cannot read a device from). It cannot clash with a device: device ids start
/// with a letter or digit.
pub const FLEET: &str = "-";

/// Error codes of admin replies (`error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, missing or mistyped fields, unknown fields.
    MalformedRequest,
    /// A topic under `admin/devices/D/` that names no command.
    UnknownCommand,
    /// The device is not in the inventory.
    UnknownDevice,
    /// The named configuration version does not exist.
    UnknownVersion,
    /// The named configuration version is already the current one.
    AlreadyCurrent,
    /// There is no earlier configuration version to roll back to.
    NothingToRollBack,
    /// The device has no configuration yet (pre-registered, never enrolled).
    NoConfig,
    /// Firmware URL missing, unparsable or not `https`.
    InvalidUrl,
    /// Firmware hash is not 64 hexadecimal characters.
    InvalidSha256,
    /// Firmware size is not a positive integer.
    InvalidSize,
    /// The device's state does not allow the command (e.g. firmware for a pending device).
    InvalidState,
    /// The device is revoked; reinstate it first.
    DeviceRevoked,
    /// Reinstate of a device that is not revoked.
    NotRevoked,
    /// Revoke of a device that is already revoked.
    AlreadyRevoked,
    /// A fleet command matched no device.
    NoDevices,
    /// The store is unreachable; retry later (with the same `request_id`).
    Unavailable,
    /// A permanent store error.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::AlreadyCurrent => "already_current",
            ErrorCode::NothingToRollBack => "nothing_to_roll_back",
            ErrorCode::NoConfig => "no_config",
            ErrorCode::InvalidUrl => "invalid_url",
            ErrorCode::InvalidSha256 => "invalid_sha256",
            ErrorCode::InvalidSize => "invalid_size",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::DeviceRevoked => "device_revoked",
            ErrorCode::NotRevoked => "not_revoked",
            ErrorCode::AlreadyRevoked => "already_revoked",
            ErrorCode::NoDevices => "no_devices",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why a command failed: the `error` object of the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
        }
    }

    /// The `error` object of a reply.
    pub fn to_json(&self) -> Value {
        json!({ "code": self.code.as_str(), "message": self.message })
    }

    /// A store failure: `unavailable` when transient (not remembered, so a retry with the same
    /// `request_id` runs again), `internal` otherwise.
    pub fn store(e: &StoreError) -> Self {
        if e.is_transient() {
            CommandError::new(
                ErrorCode::Unavailable,
                "the inventory is unavailable; retry later with the same request_id",
            )
        } else {
            tracing::error!(error = %e, "store error in an admin command");
            CommandError::new(ErrorCode::Internal, "inventory error")
        }
    }
}

/// The commands of the admin plane (the `command` label of `onboard_admin_commands_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Config,
    Rollback,
    Firmware,
    Revoke,
    Reinstate,
    /// `admin/firmware`: one firmware job for many devices.
    FleetFirmware,
    Unknown,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Config => "config",
            Command::Rollback => "rollback",
            Command::Firmware => "firmware",
            Command::Revoke => "revoke",
            Command::Reinstate => "reinstate",
            Command::FleetFirmware => "fleet_firmware",
            Command::Unknown => "unknown",
        }
    }
}

/// The command and device a topic names: `admin/devices/D/<command>` or `admin/firmware`.
pub fn parse_topic(topic: &str) -> (Command, Option<String>) {
    if topic == "admin/firmware" {
        return (Command::FleetFirmware, None);
    }
    let Some(rest) = topic.strip_prefix("admin/devices/") else {
        return (Command::Unknown, None);
    };
    let Some((device, name)) = rest.split_once('/') else {
        return (Command::Unknown, None);
    };
    if device.is_empty() {
        return (Command::Unknown, None);
    }
    let command = match name {
        "config" => Command::Config,
        "rollback" => Command::Rollback,
        "firmware" => Command::Firmware,
        "revoke" => Command::Revoke,
        "reinstate" => Command::Reinstate,
        _ => Command::Unknown,
    };
    (command, Some(device.to_owned()))
}

/// A `request_id` that can name a response topic: 1 to 64 characters, none of them special in
/// topics.
pub fn usable_request_id(id: &str) -> bool {
    let n = id.chars().count();
    (1..=MAX_REQUEST_ID).contains(&n)
        && !id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_control())
}

/// Deserialize a command body (without its `request_id`) into `T`; unknown fields are refused
/// by the command types, so that a typo does not silently do nothing.
pub(crate) fn parse_body<T: DeserializeOwned>(mut value: Value) -> Result<T, CommandError> {
    match value.as_object_mut() {
        Some(map) => {
            map.remove("request_id");
        }
        None => {
            return Err(CommandError::new(
                ErrorCode::MalformedRequest,
                "the command must be a JSON object",
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| {
        CommandError::new(ErrorCode::MalformedRequest, format!("invalid command: {e}"))
    })
}

/// The checks an admin command passes before anything is read or written: its topic, JSON
/// shape, `request_id` and body (firmware specs included). Returns the command it names.
pub fn check_command(topic: &str, payload: &[u8]) -> Result<Command, CommandError> {
    let (command, _device) = parse_topic(topic);
    let malformed = |m: &str| CommandError::new(ErrorCode::MalformedRequest, m);
    let value: Value = serde_json::from_slice(payload).map_err(|_| malformed("not JSON"))?;
    value
        .get("request_id")
        .and_then(Value::as_str)
        .filter(|id| usable_request_id(id))
        .ok_or_else(|| malformed("no usable request_id"))?;
    match command {
        Command::Config => parse_body::<config::ConfigCommand>(value).map(drop)?,
        Command::Rollback => parse_body::<config::RollbackCommand>(value).map(drop)?,
        Command::Firmware => {
            let c: firmware::FirmwareCommand = parse_body(value)?;
            firmware::validate_spec(&c.version, &c.url, &c.sha256, &c.size).map(drop)?
        }
        Command::FleetFirmware => {
            let c: firmware::FleetFirmwareCommand = parse_body(value)?;
            firmware::validate_spec(&c.version, &c.url, &c.sha256, &c.size).map(drop)?
        }
        Command::Revoke => parse_body::<revoke::RevokeCommand>(value).map(drop)?,
        Command::Reinstate => parse_body::<revoke::ReinstateCommand>(value).map(drop)?,
        Command::Unknown => return Err(malformed("unknown command")),
    }
    Ok(command)
}

/// Cut a device-supplied string to `max` characters for logs and the audit trail.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The admin plane service.
pub struct Admin {
    pub pki: Arc<Pki>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
    pub link: Bus,
    pub sessions: Arc<Sessions>,
    pub config: LifecycleConfig,
    /// Admin commands run one at a time: a replayed `request_id` then always finds the reply
    /// of its first run.
    commands: tokio::sync::Mutex<()>,
    /// Configuration versions are written one at a time (admin commands and automatic
    /// rollbacks), so the version we render into the body is the one the store assigns.
    config_writes: tokio::sync::Mutex<()>,
    renewals: renew::Renewals,
    /// Credentials per device per hour (renewals count with enrollments).
    quota: IssueQuota,
}

impl Admin {
    pub fn new(
        pki: Arc<Pki>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        audit: Auditor,
        link: Bus,
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
            commands: tokio::sync::Mutex::new(()),
            config_writes: tokio::sync::Mutex::new(()),
            renewals: renew::Renewals::default(),
            quota: IssueQuota {
                per_window: u32::MAX,
            },
        }
    }

    /// Limit the credentials issued to one device per hour (renewals and enrollments).
    pub fn with_quota(mut self, quota: IssueQuota) -> Admin {
        self.quota = quota;
        self
    }

    /// Retain every device's configuration, and its unfinished firmware job, again from the
    /// store (nothing retained survives a restart). Returns how many configurations were
    /// restored.
    pub async fn republish_retained(&self) -> Result<usize, StoreError> {
        let mut restored = 0;
        let mut after = String::new();
        loop {
            let page = self
                .metrics
                .store_op(
                    "published_configs",
                    self.store.published_configs(&after, RESTORE_PAGE),
                )
                .await?;
            let Some(last) = page.last() else {
                return Ok(restored);
            };
            after = last.device_id.clone();
            restored += page.len();
            for config in &page {
                self.restore_device(config).await;
            }
        }
    }

    /// Retain one device's configuration and unfinished firmware job again.
    async fn restore_device(&self, config: &DeviceConfig) {
        self.link.restore_retained(
            &topics::config(&config.device_id),
            serde_json::to_vec(&config.body).unwrap_or_default(),
        );
        match self
            .metrics
            .store_op(
                "latest_firmware_job",
                self.store.latest_firmware_job(&config.device_id),
            )
            .await
        {
            Ok(Some(job)) if !firmware::is_terminal(&job.status) => {
                self.link.restore_retained(
                    &topics::firmware(&job.device_id),
                    serde_json::to_vec(&firmware::job_document(&job)).unwrap_or_default(),
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(device_id = %config.device_id, error = %e, "firmware job not republished")
            }
        }
    }

    /// Execute one admin command published by `actor` on `topic` and answer it on
    /// `admin/responses/<request_id>`.
    pub async fn command(&self, actor: &str, topic: &str, payload: &[u8]) {
        let (command, device) = parse_topic(topic);
        let audit_device = device.clone().unwrap_or_else(|| FLEET.to_owned());
        let value = serde_json::from_slice::<Value>(payload).ok();
        let request_id = value
            .as_ref()
            .and_then(|v| v.get("request_id"))
            .and_then(Value::as_str)
            .filter(|id| usable_request_id(id) && !id.starts_with("renew:"))
            .map(str::to_owned);
        let (Some(value), Some(request_id)) = (value, request_id) else {
            let reason = if serde_json::from_slice::<Value>(payload).is_err() {
                "payload is not JSON"
            } else {
                "no usable request_id (1 to 64 characters, none of / + # $, not starting with renew:)"
            };
            self.metrics
                .admin_commands
                .with_label_values(&[command.as_str(), "rejected"])
                .inc();
            self.audit.record(AuditEvent::new(
                &audit_device,
                "admin_command_rejected",
                actor,
                json!({ "topic": topic, "command": command.as_str(), "reason": reason }),
            ));
            tracing::info!(actor, topic, reason, "admin command cannot be answered");
            return;
        };

        let _one_at_a_time = self.commands.lock().await;
        let response_topic = format!("admin/responses/{request_id}");
        match self
            .metrics
            .store_op("admin_reply", self.store.admin_reply(&request_id))
            .await
        {
            Ok(Some(reply)) => {
                self.link.publish(
                    &response_topic,
                    serde_json::to_vec(&reply).unwrap_or_default(),
                );
                self.metrics
                    .admin_commands
                    .with_label_values(&[command.as_str(), "duplicate"])
                    .inc();
                tracing::info!(actor, topic, request_id, "admin command replayed");
                return;
            }
            Ok(None) => {}
            Err(e) => {
                let error = CommandError::store(&e);
                self.answer(
                    actor,
                    topic,
                    command,
                    &audit_device,
                    &request_id,
                    Err(error),
                )
                .await;
                return;
            }
        }

        let outcome = match (command, device.as_deref()) {
            (Command::Config, Some(d)) => self.set_config(actor, &request_id, d, value).await,
            (Command::Rollback, Some(d)) => self.rollback(actor, &request_id, d, value).await,
            (Command::Firmware, Some(d)) => {
                self.device_firmware(actor, &request_id, d, value).await
            }
            (Command::Revoke, Some(d)) => self.revoke(actor, &request_id, d, value).await,
            (Command::Reinstate, Some(d)) => self.reinstate(actor, &request_id, d, value).await,
            (Command::FleetFirmware, _) => self.fleet_firmware(actor, &request_id, value).await,
            _ => Err(CommandError::new(
                ErrorCode::UnknownCommand,
                format!(
                    "{topic}: no such command (admin/devices/D/{{config,rollback,firmware,revoke,reinstate}}, admin/firmware)"
                ),
            )),
        };
        self.answer(actor, topic, command, &audit_device, &request_id, outcome)
            .await;
    }

    /// Remember (unless the failure is transient), publish, count and audit a reply.
    async fn answer(
        &self,
        actor: &str,
        topic: &str,
        command: Command,
        audit_device: &str,
        request_id: &str,
        outcome: Result<Value, CommandError>,
    ) {
        let (mut reply, result) = match &outcome {
            Ok(result) => (
                json!({ "request_id": request_id, "status": "ok", "result": result }),
                "ok",
            ),
            Err(e) => (
                json!({ "request_id": request_id, "status": "error", "error": e.to_json() }),
                "error",
            ),
        };
        let transient = matches!(&outcome, Err(e) if e.code == ErrorCode::Unavailable);
        if !transient {
            match self
                .metrics
                .store_op(
                    "record_admin_reply",
                    self.store.record_admin_reply(request_id, &reply),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Another gateway instance answered this request_id first.
                    if let Ok(Some(first)) = self.store.admin_reply(request_id).await {
                        reply = first;
                    }
                }
                Err(e) => tracing::warn!(request_id, error = %e, "admin reply not remembered"),
            }
        }
        self.link.publish(
            &format!("admin/responses/{request_id}"),
            serde_json::to_vec(&reply).unwrap_or_default(),
        );
        self.metrics
            .admin_commands
            .with_label_values(&[command.as_str(), result])
            .inc();
        if let Err(e) = &outcome {
            self.audit.record(
                AuditEvent::new(
                    audit_device,
                    "admin_command_failed",
                    actor,
                    json!({
                        "command": command.as_str(),
                        "topic": topic,
                        "code": e.code.as_str(),
                        "message": e.message,
                    }),
                )
                .with_request(request_id),
            );
        }
        tracing::info!(actor, topic, request_id, result, "admin command answered");
    }

    /// The device named by a command, or `unknown_device`.
    pub(crate) async fn known_device(&self, device_id: &str) -> Result<Device, CommandError> {
        self.metrics
            .store_op("device", self.store.device(device_id))
            .await
            .map_err(|e| CommandError::store(&e))?
            .ok_or_else(|| {
                CommandError::new(
                    ErrorCode::UnknownDevice,
                    format!("no device {device_id:?} in the inventory"),
                )
            })
    }

    /// Whether a device's retained topics are live (it holds or awaits a credential).
    pub(crate) fn is_published(device: &Device) -> bool {
        matches!(device.state, DeviceState::Enrolling | DeviceState::Active)
    }

    /// One pass of the periodic work: revoke the previous certificates of renewals whose grace
    /// period ended, and refresh `onboard_certificates_expiring`.
    pub async fn sweep(&self) {
        self.sweep_renewals().await;
        self.refresh_expiring().await;
    }

    /// Run [`Admin::sweep`] every `sweep_interval_ms` until `shutdown`, after reloading the
    /// renewals still in their grace period from the store.
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.restore_renewals() => {}
        }
        let every = std::time::Duration::from_millis(self.config.sweep_interval_ms.max(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sweep().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_command_and_device() {
        assert_eq!(
            parse_topic("admin/devices/d1/config"),
            (Command::Config, Some("d1".into()))
        );
        assert_eq!(
            parse_topic("admin/devices/d1/reinstate"),
            (Command::Reinstate, Some("d1".into()))
        );
        assert_eq!(
            parse_topic("admin/firmware"),
            (Command::FleetFirmware, None)
        );
        assert_eq!(
            parse_topic("admin/devices/d1/explode"),
            (Command::Unknown, Some("d1".into()))
        );
        assert_eq!(
            parse_topic("admin/devices/d1/config/extra").0,
            Command::Unknown
        );
        assert_eq!(parse_topic("admin/devices/d1").0, Command::Unknown);
        assert_eq!(parse_topic("admin/devices//config").0, Command::Unknown);
    }

    #[test]
    fn request_ids_must_fit_a_topic_level() {
        assert!(usable_request_id("r-1"));
        assert!(usable_request_id(&"x".repeat(64)));
        assert!(!usable_request_id(&"x".repeat(65)));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("a/b"));
        assert!(!usable_request_id("a+"));
        assert!(!usable_request_id("#"));
    }

    #[test]
    fn bodies_refuse_non_objects_and_unknown_fields() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            #[allow(dead_code)]
            reason: Option<String>,
        }
        assert!(parse_body::<Body>(json!({"request_id": "r", "reason": "x"})).is_ok());
        let e = parse_body::<Body>(json!({"request_id": "r", "reasn": "x"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedRequest);
        assert!(e.message.contains("reasn"), "{}", e.message);
        let e = parse_body::<Body>(json!([1])).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedRequest);
    }
}
