//! Configuration changes (`admin/devices/D/config`), configuration rollback
//! (`admin/devices/D/rollback` with `target: config`), and the device's acks on
//! `devices/D/config/ack`, with the automatic rollback of a `failed` ack.
//!
//! Every change is a new version in the store (history is never rewritten) and is published
//! retained on `devices/D/config`, so a device that connects later gets the latest version.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{parse_body, truncate, Admin, CommandError, ErrorCode};
use crate::store::{AuditEvent, Device, DeviceConfig, DeviceState};
use crate::templates;
use crate::topics;

/// Keys of the configuration document an admin may replace.
pub const ADMIN_KEYS: &[&str] = &["settings", "automation_rules", "qos", "retain"];

/// Longest `error` of a device's ack kept in the store.
const MAX_ACK_ERROR: usize = 512;

/// `admin/devices/D/config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCommand {
    #[serde(default)]
    pub settings: Option<Map<String, Value>>,
    #[serde(default)]
    pub automation_rules: Option<Vec<Value>>,
    #[serde(default)]
    pub qos: Option<Map<String, Value>>,
    #[serde(default)]
    pub retain: Option<Map<String, Value>>,
}

impl ConfigCommand {
    /// The keys this command replaces, with their new values.
    fn changes(self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(v) = self.settings {
            out.push(("settings", Value::Object(v)));
        }
        if let Some(v) = self.automation_rules {
            out.push(("automation_rules", Value::Array(v)));
        }
        if let Some(v) = self.qos {
            out.push(("qos", Value::Object(v)));
        }
        if let Some(v) = self.retain {
            out.push(("retain", Value::Object(v)));
        }
        out
    }
}

/// What a rollback undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RollbackTarget {
    Config,
    Enrollment,
}

/// `admin/devices/D/rollback`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackCommand {
    pub target: RollbackTarget,
    #[serde(default)]
    pub to_version: Option<i64>,
}

/// Status of a device's ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Applied,
    Failed,
}

/// `devices/D/config/ack`. Unknown fields are ignored (newer devices).
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigAck {
    pub version: i64,
    pub status: AckStatus,
    #[serde(default)]
    pub error: Option<String>,
}

/// A configuration body without its `version`, to tell whether two versions say the same.
fn content(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("version");
    }
    body
}

/// The body of a new version: `base` with `changes` applied and the gateway-owned keys set.
pub fn new_body(
    base: &Value,
    changes: Vec<(&'static str, Value)>,
    device_id: &str,
    version: i64,
) -> Value {
    let mut map = base.as_object().cloned().unwrap_or_default();
    for (key, value) in changes {
        map.insert(key.to_owned(), value);
    }
    templates::with_identity(map, device_id, version)
}

impl Admin {
    /// Store `body` (rendered for `latest + 1`) as the device's next version, announce its
    /// event and publish it retained if the device's topics are live. The caller holds
    /// `config_writes`.
    async fn write_config(
        &self,
        device: &Device,
        base: &Value,
        changes: Vec<(&'static str, Value)>,
        latest_version: i64,
        created_by: &str,
        event: AuditEvent,
    ) -> Result<(DeviceConfig, bool), CommandError> {
        let version = latest_version + 1;
        let body = new_body(base, changes, &device.id, version);
        let mut event = event;
        if let Some(detail) = event.detail.as_object_mut() {
            detail.insert("version".into(), json!(version));
        }
        let row = self
            .metrics
            .store_op(
                "insert_config",
                self.store
                    .insert_config(&device.id, body, created_by, event.clone()),
            )
            .await
            .map_err(|e| CommandError::store(&e))?;
        if row.version != version {
            tracing::warn!(device_id = %device.id, expected = version, got = row.version, "configuration version raced");
        }
        self.audit.announce(&event);
        let published = Admin::is_published(device);
        if published {
            self.link.publish_retained(
                &topics::config(&device.id),
                serde_json::to_vec(&row.body).unwrap_or_default(),
            );
        }
        Ok((row, published))
    }

    /// The device, refusing revoked ones, with its latest configuration.
    async fn configurable(&self, device_id: &str) -> Result<(Device, DeviceConfig), CommandError> {
        let device = self.known_device(device_id).await?;
        if device.state == DeviceState::Revoked {
            return Err(CommandError::new(
                ErrorCode::DeviceRevoked,
                format!("device {device_id:?} is revoked; reinstate it first"),
            ));
        }
        let latest = self
            .metrics
            .store_op("latest_config", self.store.latest_config(device_id))
            .await
            .map_err(|e| CommandError::store(&e))?
            .ok_or_else(|| {
                CommandError::new(
                    ErrorCode::NoConfig,
                    format!("device {device_id:?} has no configuration yet (never enrolled)"),
                )
            })?;
        Ok((device, latest))
    }

    /// `admin/devices/D/config`: a new version with some keys replaced.
    pub(crate) async fn set_config(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let command: ConfigCommand = parse_body(body)?;
        let changes = command.changes();
        if changes.is_empty() {
            return Err(CommandError::new(
                ErrorCode::MalformedRequest,
                format!(
                    "nothing to change: give at least one of {}",
                    ADMIN_KEYS.join(", ")
                ),
            ));
        }
        let keys: Vec<&str> = changes.iter().map(|(k, _)| *k).collect();
        let _one_writer = self.config_writes.lock().await;
        let (device, latest) = self.configurable(device_id).await?;
        let event = AuditEvent::new(
            device_id,
            "config_published",
            actor,
            json!({ "previous_version": latest.version, "changed": keys }),
        )
        .with_request(request_id);
        let (row, published) = self
            .write_config(&device, &latest.body, changes, latest.version, actor, event)
            .await?;
        Ok(json!({ "device_id": device_id, "version": row.version, "published": published }))
    }

    /// `admin/devices/D/rollback`: configuration or enrollment.
    pub(crate) async fn rollback(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let command: RollbackCommand = parse_body(body)?;
        match command.target {
            RollbackTarget::Config => {
                self.rollback_config(actor, request_id, device_id, command.to_version)
                    .await
            }
            RollbackTarget::Enrollment if command.to_version.is_some() => Err(CommandError::new(
                ErrorCode::MalformedRequest,
                "to_version goes with target \"config\", not \"enrollment\"",
            )),
            RollbackTarget::Enrollment => {
                self.rollback_enrollment(actor, request_id, device_id).await
            }
        }
    }

    /// Re-publish an earlier version (the previous one, or `to_version`) as a new version.
    async fn rollback_config(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        to_version: Option<i64>,
    ) -> Result<Value, CommandError> {
        let _one_writer = self.config_writes.lock().await;
        let (device, latest) = self.configurable(device_id).await?;
        let target = match to_version {
            Some(v) if v == latest.version => {
                return Err(CommandError::new(
                    ErrorCode::AlreadyCurrent,
                    format!("version {v} is the current configuration"),
                ))
            }
            Some(v) => self
                .metrics
                .store_op("config_version", self.store.config_version(device_id, v))
                .await
                .map_err(|e| CommandError::store(&e))?
                .ok_or_else(|| {
                    CommandError::new(
                        ErrorCode::UnknownVersion,
                        format!(
                            "device {device_id:?} has no configuration version {v} (latest is {})",
                            latest.version
                        ),
                    )
                })?,
            None => {
                let history = self
                    .metrics
                    .store_op("config_history", self.store.config_history(device_id))
                    .await
                    .map_err(|e| CommandError::store(&e))?;
                history
                    .into_iter()
                    .filter(|c| c.version < latest.version)
                    .max_by_key(|c| c.version)
                    .ok_or_else(|| {
                        CommandError::new(
                            ErrorCode::NothingToRollBack,
                            format!(
                                "device {device_id:?} has no configuration before version {}",
                                latest.version
                            ),
                        )
                    })?
            }
        };
        let event = AuditEvent::new(
            device_id,
            "config_rolled_back",
            actor,
            json!({ "trigger": "admin", "from_version": latest.version, "to_version": target.version }),
        )
        .with_request(request_id);
        let (row, published) = self
            .write_config(
                &device,
                &target.body,
                Vec::new(),
                latest.version,
                actor,
                event,
            )
            .await?;
        self.metrics
            .rollbacks
            .with_label_values(&["config", "admin"])
            .inc();
        Ok(json!({
            "device_id": device_id,
            "version": row.version,
            "rolled_back_to": target.version,
            "published": published,
        }))
    }

    /// A device's ack on `devices/D/config/ack`. Acks that cannot be used are audited
    /// (`config_ack_invalid`) and otherwise ignored.
    pub async fn config_ack(&self, device_id: &str, payload: &[u8]) {
        let invalid = |reason: String| {
            self.audit.record(AuditEvent::new(
                device_id,
                "config_ack_invalid",
                "device",
                json!({ "reason": reason }),
            ));
        };
        let ack: ConfigAck = match serde_json::from_slice(payload) {
            Ok(ack) => ack,
            Err(e) => return invalid(format!("not a config ack: {e}")),
        };
        let stored = match self
            .metrics
            .store_op(
                "config_version",
                self.store.config_version(device_id, ack.version),
            )
            .await
        {
            Ok(Some(c)) => c,
            Ok(None) => return invalid(format!("unknown configuration version {}", ack.version)),
            Err(e) => {
                tracing::warn!(device_id, error = %e, "config ack not recorded");
                return;
            }
        };
        let error = ack.error.as_deref().map(|e| truncate(e, MAX_ACK_ERROR));
        let (name, failed_error) = match ack.status {
            AckStatus::Applied => ("config_applied", None),
            AckStatus::Failed => (
                "config_failed",
                Some(error.clone().unwrap_or_else(|| "no error given".into())),
            ),
        };
        let event = AuditEvent::new(
            device_id,
            name,
            "device",
            json!({ "version": ack.version, "error": error }),
        );
        match self
            .metrics
            .store_op(
                "ack_config",
                self.store.ack_config(
                    device_id,
                    ack.version,
                    failed_error.as_deref(),
                    event.clone(),
                ),
            )
            .await
        {
            Ok(true) => self.audit.announce(&event),
            Ok(false) => {
                tracing::debug!(
                    device_id,
                    version = ack.version,
                    "config ack not recorded (repeated?)"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(device_id, error = %e, "config ack not recorded");
                return;
            }
        }
        if ack.status == AckStatus::Failed && self.config.rollback_on_failed_ack {
            self.auto_rollback(device_id, &stored).await;
        }
    }

    /// Roll back to the last applied version after `failed` was acked `failed`, unless a newer
    /// version exists already or the failed one says the same as the last applied one.
    async fn auto_rollback(&self, device_id: &str, failed: &DeviceConfig) {
        let _one_writer = self.config_writes.lock().await;
        let skipped = |reason: &str| {
            self.audit.record(AuditEvent::new(
                device_id,
                "config_rollback_skipped",
                "gateway",
                json!({ "failed_version": failed.version, "reason": reason }),
            ));
        };
        let (device, history) = match (
            self.store.device(device_id).await,
            self.metrics
                .store_op("config_history", self.store.config_history(device_id))
                .await,
        ) {
            (Ok(Some(d)), Ok(h)) => (d, h),
            (Ok(None), _) => return,
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(device_id, error = %e, "automatic rollback not possible now");
                return;
            }
        };
        if device.state == DeviceState::Revoked {
            return;
        }
        let Some(latest) = history.iter().max_by_key(|c| c.version) else {
            return;
        };
        if latest.version != failed.version {
            return skipped("a newer version exists");
        }
        let Some(applied) = history
            .iter()
            .filter(|c| {
                c.version != failed.version && c.applied_at.is_some() && c.failed_error.is_none()
            })
            .max_by_key(|c| c.version)
        else {
            return skipped("no version was ever applied");
        };
        if content(&applied.body) == content(&failed.body) {
            return skipped("the failed version is the last applied configuration");
        }
        let event = AuditEvent::new(
            device_id,
            "config_rolled_back",
            "gateway",
            json!({ "trigger": "auto", "from_version": failed.version, "to_version": applied.version }),
        );
        match self
            .write_config(
                &device,
                &applied.body,
                Vec::new(),
                latest.version,
                "gateway",
                event,
            )
            .await
        {
            Ok((row, _)) => {
                self.metrics
                    .rollbacks
                    .with_label_values(&["config", "auto"])
                    .inc();
                tracing::info!(
                    device_id,
                    failed = failed.version,
                    to = applied.version,
                    version = row.version,
                    "configuration rolled back after a failed ack"
                );
            }
            Err(e) => tracing::warn!(device_id, error = %e, "automatic rollback failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_body_replaces_keys_and_sets_identity() {
        let base = json!({
            "device_id": "d1", "version": 3, "topics": {},
            "settings": { "a": 1 }, "qos": { "telemetry": 0 }
        });
        let body = new_body(&base, vec![("settings", json!({ "b": 2 }))], "d1", 4);
        assert_eq!(body["version"], 4);
        assert_eq!(body["settings"], json!({ "b": 2 }));
        assert_eq!(body["qos"]["telemetry"], 0);
        assert_eq!(body["topics"]["config"], "devices/d1/config");
    }

    #[test]
    fn content_ignores_the_version() {
        assert_eq!(
            content(&json!({"version": 1, "a": 1})),
            content(&json!({"version": 2, "a": 1}))
        );
    }

    #[test]
    fn commands_parse_strictly() {
        let c: ConfigCommand =
            parse_body(json!({"request_id": "r", "settings": {"x": 1}})).unwrap();
        assert_eq!(c.changes().len(), 1);
        let e = parse_body::<ConfigCommand>(json!({"request_id": "r", "settings": 3})).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedRequest);
        let r: RollbackCommand = parse_body(json!({"target": "config", "to_version": 2})).unwrap();
        assert_eq!((r.target, r.to_version), (RollbackTarget::Config, Some(2)));
        assert!(parse_body::<RollbackCommand>(json!({"target": "firmware"})).is_err());
    }
}
