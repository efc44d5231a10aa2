//! Firmware jobs: `admin/devices/D/firmware` (one device) and `admin/firmware` (a list of
//! devices, or every device of a type), pushed retained on `devices/D/firmware` as
//! `{job_id, version, url, sha256, size}`; progress reported by the device on
//! `devices/D/firmware/status` as `{job_id, status, error?}`.
//!
//! A job moves forward only: `queued` -> `downloading` -> `installing` -> `succeeded` | `failed`
//! (steps may be skipped). `succeeded` records the version in the inventory. A terminal status
//! clears the retained job (unless a newer job replaced it).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{parse_body, truncate, Admin, CommandError, ErrorCode};
use crate::enroll::MAX_FIELD;
use crate::store::{AuditEvent, Device, DeviceFilter, DeviceState, FirmwareJob, JobStatus};
use crate::topics;

/// Most devices one `admin/firmware` command may name.
pub const MAX_FLEET: usize = 10_000;

/// Longest `error` of a status report kept in the store.
const MAX_STATUS_ERROR: usize = 512;

/// Order of job statuses; a report may only move a job to a higher rank.
fn rank(status: &str) -> Option<u8> {
    status.parse::<JobStatus>().ok().map(JobStatus::rank)
}

/// Whether a job is finished.
pub fn is_terminal(status: &str) -> bool {
    status
        .parse::<JobStatus>()
        .is_ok_and(JobStatus::is_terminal)
}

/// The retained document of a job on `devices/D/firmware`.
pub fn job_document(job: &FirmwareJob) -> Value {
    json!({
        "job_id": job.job_id,
        "version": job.version,
        "url": job.url,
        "sha256": job.sha256,
        "size": job.size,
    })
}

/// A validated firmware image description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareSpec {
    pub version: String,
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
    pub size: i64,
}

/// Check `version`, `url` (https only), `sha256` (64 hex) and `size` (> 0).
pub fn validate_spec(
    version: &str,
    url: &str,
    sha256: &str,
    size: &Value,
) -> Result<FirmwareSpec, CommandError> {
    let version = version.trim();
    if version.is_empty() || version.chars().count() > MAX_FIELD {
        return Err(CommandError::new(
            ErrorCode::MalformedRequest,
            format!("version must be 1 to {MAX_FIELD} characters"),
        ));
    }
    let parsed = url::Url::parse(url)
        .map_err(|e| CommandError::new(ErrorCode::InvalidUrl, format!("url {url:?}: {e}")))?;
    if parsed.scheme() != "https" || parsed.host_str().is_none_or(str::is_empty) {
        return Err(CommandError::new(
            ErrorCode::InvalidUrl,
            format!("url {url:?} must be an https:// URL with a host"),
        ));
    }
    if url.len() > 2048 {
        return Err(CommandError::new(
            ErrorCode::InvalidUrl,
            "url is longer than 2048 characters",
        ));
    }
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CommandError::new(
            ErrorCode::InvalidSha256,
            "sha256 must be 64 hexadecimal characters",
        ));
    }
    let size = size.as_i64().filter(|s| *s > 0).ok_or_else(|| {
        CommandError::new(
            ErrorCode::InvalidSize,
            format!("size must be a positive integer (bytes), not {size}"),
        )
    })?;
    Ok(FirmwareSpec {
        version: version.to_owned(),
        url: url.to_owned(),
        sha256: sha256.to_ascii_lowercase(),
        size,
    })
}

/// `admin/devices/D/firmware`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareCommand {
    pub version: String,
    pub url: String,
    pub sha256: String,
    pub size: Value,
}

/// `admin/firmware`: `devices` or `device_type`, not both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFirmwareCommand {
    pub version: String,
    pub url: String,
    pub sha256: String,
    pub size: Value,
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    #[serde(default)]
    pub device_type: Option<String>,
}

/// `devices/D/firmware/status`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct FirmwareStatus {
    pub job_id: String,
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

impl Admin {
    /// Create a job for one device that exists, and push it.
    async fn create_job(
        &self,
        actor: &str,
        request_id: &str,
        device: &Device,
        spec: &FirmwareSpec,
    ) -> Result<Value, CommandError> {
        if !Admin::is_published(device) {
            let code = if device.state == DeviceState::Revoked {
                ErrorCode::DeviceRevoked
            } else {
                ErrorCode::InvalidState
            };
            return Err(CommandError::new(
                code,
                format!(
                    "device {:?} is {}; firmware goes to enrolling or active devices",
                    device.id, device.state
                ),
            ));
        }
        let store_err = |e| CommandError::store(&e);
        let previous = self
            .metrics
            .store_op(
                "latest_firmware_job",
                self.store.latest_firmware_job(&device.id),
            )
            .await
            .map_err(store_err)?;
        let now = OffsetDateTime::now_utc();
        let job = FirmwareJob {
            job_id: uuid::Uuid::new_v4().to_string(),
            device_id: device.id.clone(),
            version: spec.version.clone(),
            url: spec.url.clone(),
            sha256: spec.sha256.clone(),
            size: spec.size,
            status: "queued".into(),
            error: None,
            created_by: actor.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let event = AuditEvent::new(
            &device.id,
            "firmware_job_created",
            actor,
            json!({
                "job_id": job.job_id, "version": job.version, "url": job.url,
                "sha256": job.sha256, "size": job.size,
            }),
        )
        .with_request(request_id);
        self.metrics
            .store_op(
                "insert_firmware_job",
                self.store.insert_firmware_job(&job, event.clone()),
            )
            .await
            .map_err(store_err)?;
        self.audit.announce(&event);
        // The new job replaces an unfinished one: the device only sees the retained latest.
        if let Some(old) = previous.filter(|j| !is_terminal(&j.status)) {
            let event = AuditEvent::new(
                &device.id,
                "firmware_job_superseded",
                actor,
                json!({ "job_id": old.job_id, "by": job.job_id }),
            )
            .with_request(request_id);
            match self
                .store
                .advance_firmware_job(
                    &old.job_id,
                    &device.id,
                    JobStatus::Failed,
                    Some("superseded"),
                    event.clone(),
                )
                .await
            {
                Ok(true) => self.audit.announce(&event),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(device_id = %device.id, error = %e, "superseded job not closed")
                }
            }
        }
        self.link.publish_retained(
            &topics::firmware(&device.id),
            serde_json::to_vec(&job_document(&job)).unwrap_or_default(),
        );
        Ok(json!({ "job_id": job.job_id }))
    }

    /// `admin/devices/D/firmware`.
    pub(crate) async fn device_firmware(
        &self,
        actor: &str,
        request_id: &str,
        device_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let c: FirmwareCommand = parse_body(body)?;
        let spec = validate_spec(&c.version, &c.url, &c.sha256, &c.size)?;
        let device = self.known_device(device_id).await?;
        let mut result = self.create_job(actor, request_id, &device, &spec).await?;
        result["device_id"] = json!(device_id);
        Ok(result)
    }

    /// `admin/firmware`: one job per device, with a result per device.
    pub(crate) async fn fleet_firmware(
        &self,
        actor: &str,
        request_id: &str,
        body: Value,
    ) -> Result<Value, CommandError> {
        let c: FleetFirmwareCommand = parse_body(body)?;
        let spec = validate_spec(&c.version, &c.url, &c.sha256, &c.size)?;
        let targets: Vec<Result<Device, (String, CommandError)>> = match (c.devices, c.device_type)
        {
            (Some(ids), None) => {
                if ids.is_empty() || ids.len() > MAX_FLEET {
                    return Err(CommandError::new(
                        ErrorCode::MalformedRequest,
                        format!("devices must list 1 to {MAX_FLEET} device ids"),
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                for id in ids {
                    if !seen.insert(id.clone()) {
                        continue;
                    }
                    match self.known_device(&id).await {
                        Ok(d) => out.push(Ok(d)),
                        Err(e) if e.code == ErrorCode::Unavailable => return Err(e),
                        Err(e) => out.push(Err((id, e))),
                    }
                }
                out
            }
            (None, Some(device_type)) => {
                let filter = DeviceFilter {
                    device_type: Some(device_type.clone()),
                    ..DeviceFilter::default()
                };
                let devices = self
                    .metrics
                    .store_op("list_devices", self.store.list_devices(&filter))
                    .await
                    .map_err(|e| CommandError::store(&e))?;
                if devices.is_empty() {
                    return Err(CommandError::new(
                        ErrorCode::NoDevices,
                        format!("no device of type {device_type:?} in the inventory"),
                    ));
                }
                devices.into_iter().map(Ok).collect()
            }
            _ => {
                return Err(CommandError::new(
                    ErrorCode::MalformedRequest,
                    "give either devices (a list of ids) or device_type",
                ))
            }
        };
        let mut results = BTreeMap::new();
        let (mut created, mut failed) = (0u64, 0u64);
        for target in targets {
            let (id, outcome) = match target {
                Ok(device) => {
                    let outcome = self.create_job(actor, request_id, &device, &spec).await;
                    (device.id, outcome)
                }
                Err((id, e)) => (id, Err(e)),
            };
            match outcome {
                Ok(job) => {
                    created += 1;
                    results.insert(id, job);
                }
                Err(e) => {
                    failed += 1;
                    results.insert(id, json!({ "error": e.to_json() }));
                }
            }
        }
        Ok(json!({
            "version": spec.version,
            "created": created,
            "failed": failed,
            "results": results,
        }))
    }

    /// A device's progress report on `devices/D/firmware/status`.
    pub async fn firmware_status(&self, device_id: &str, payload: &[u8]) {
        let rejected = |job_id: Option<&str>, reason: String| {
            self.audit.record(AuditEvent::new(
                device_id,
                "firmware_status_rejected",
                "device",
                json!({ "job_id": job_id, "reason": reason }),
            ));
        };
        let report: FirmwareStatus = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return rejected(None, format!("not a firmware status: {e}")),
        };
        let job_id = truncate(&report.job_id, 64);
        let Some(new_status) = report
            .status
            .parse::<JobStatus>()
            .ok()
            .filter(|s| s.rank() > 0)
        else {
            return rejected(
                Some(&job_id),
                format!(
                    "status {:?} is not downloading, installing, succeeded or failed",
                    truncate(&report.status, 32)
                ),
            );
        };
        let job = match self
            .metrics
            .store_op("firmware_job", self.store.firmware_job(&job_id, device_id))
            .await
        {
            Ok(Some(job)) => job,
            Ok(None) => return rejected(Some(&job_id), "unknown job".into()),
            Err(e) => {
                tracing::warn!(device_id, error = %e, "firmware status not recorded");
                return;
            }
        };
        if job.status == report.status {
            return; // a repeated report
        }
        // A quick answer for a report that is plainly late; the store's guarded update decides
        // when two reports (on two gateways) race.
        if rank(&job.status).is_none_or(|current| current >= new_status.rank()) {
            return rejected(
                Some(&job_id),
                format!("job is {}; it cannot become {}", job.status, report.status),
            );
        }
        let error = report
            .error
            .as_deref()
            .map(|e| truncate(e, MAX_STATUS_ERROR));
        let event = AuditEvent::new(
            device_id,
            &format!("firmware_{}", report.status),
            "device",
            json!({ "job_id": job.job_id, "version": job.version, "error": error }),
        );
        match self
            .metrics
            .store_op(
                "advance_firmware_job",
                self.store.advance_firmware_job(
                    &job.job_id,
                    device_id,
                    new_status,
                    error.as_deref(),
                    event.clone(),
                ),
            )
            .await
        {
            Ok(true) => self.audit.announce(&event),
            Ok(false) => {
                return rejected(
                    Some(&job_id),
                    format!("job moved on before it could become {new_status}"),
                )
            }
            Err(e) => {
                tracing::warn!(device_id, error = %e, "firmware status not recorded");
                return;
            }
        }
        if new_status == JobStatus::Succeeded {
            if let Err(e) = self
                .metrics
                .store_op(
                    "set_firmware_version",
                    self.store.set_firmware_version(device_id, &job.version),
                )
                .await
            {
                tracing::warn!(device_id, error = %e, "firmware version not recorded");
            }
        }
        if new_status.is_terminal() {
            let latest = self.store.latest_firmware_job(device_id).await;
            if matches!(&latest, Ok(Some(l)) if l.job_id == job.job_id) {
                self.link.clear_retained(&topics::firmware(device_id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn specs_are_validated() {
        let ok = validate_spec("1.2", "https://fw.example/x.bin", HASH, &json!(10)).unwrap();
        assert_eq!(ok.size, 10);
        let upper = HASH.to_ascii_uppercase();
        let ok = validate_spec("1.2", "https://fw.example/x.bin", &upper, &json!(10)).unwrap();
        assert_eq!(ok.sha256, HASH);
        let code =
            |v: &str, u: &str, h: &str, s: Value| validate_spec(v, u, h, &s).unwrap_err().code;
        assert_eq!(
            code("1", "http://fw.example/x", HASH, json!(1)),
            ErrorCode::InvalidUrl
        );
        assert_eq!(
            code("1", "not a url", HASH, json!(1)),
            ErrorCode::InvalidUrl
        );
        assert_eq!(
            code("1", "https://fw.example/x", "abc", json!(1)),
            ErrorCode::InvalidSha256
        );
        let bad_hex = format!("{}g", &HASH[..63]);
        assert_eq!(
            code("1", "https://fw.example/x", &bad_hex, json!(1)),
            ErrorCode::InvalidSha256
        );
        assert_eq!(
            code("1", "https://fw.example/x", HASH, json!(0)),
            ErrorCode::InvalidSize
        );
        assert_eq!(
            code("1", "https://fw.example/x", HASH, json!("5")),
            ErrorCode::InvalidSize
        );
        assert_eq!(
            code("", "https://fw.example/x", HASH, json!(1)),
            ErrorCode::MalformedRequest
        );
    }

    #[test]
    fn statuses_only_move_forward() {
        assert!(rank("queued") < rank("downloading"));
        assert!(rank("installing") < rank("failed"));
        assert_eq!(rank("succeeded"), rank("failed"));
        assert_eq!(rank("exploded"), None);
        assert!(is_terminal("failed") && !is_terminal("installing"));
    }
}
