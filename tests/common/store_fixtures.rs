//! Builders for store test data, shared by every test that talks to a [`Store`].
#![allow(dead_code)]

use onboard::store::{
    AuditEvent, Credential, CredentialKind, DeviceFilter, EnrollmentCommit, FirmwareJob, NewDevice,
};
use serde_json::json;
use time::{Duration, OffsetDateTime};

/// Now, truncated to whole microseconds (the precision every backend keeps).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// A unique run prefix: `t<12 hex>-`, so ids never collide on a shared server.
pub fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}-", &id[..12])
}

/// An audit event with a microsecond-precision timestamp.
pub fn event(device_id: &str, name: &str) -> AuditEvent {
    let mut e = AuditEvent::new(device_id, name, "gateway", json!({ "note": name }));
    e.at = now();
    e
}

/// A certificate credential valid for a year.
pub fn credential(device_id: &str, serial: &str) -> Credential {
    credential_expiring(device_id, serial, now() + Duration::days(365))
}

/// A certificate credential with the given `not_after`.
pub fn credential_expiring(device_id: &str, serial: &str, not_after: OffsetDateTime) -> Credential {
    Credential {
        serial: serial.to_owned(),
        fingerprint: serial.bytes().chain(0u8..32).take(32).collect(),
        device_id: device_id.to_owned(),
        kind: CredentialKind::Certificate,
        password_hash: None,
        not_after: Some(not_after),
        created_at: now(),
        activated_at: None,
        revoked_at: None,
        revoke_reason: None,
    }
}

/// A password credential (only the hash is kept).
pub fn password_credential(device_id: &str, serial: &str) -> Credential {
    Credential {
        kind: CredentialKind::Password,
        password_hash: Some("sha256$c2FsdA$aGFzaA".into()),
        not_after: None,
        ..credential(device_id, serial)
    }
}

/// A pre-registered device.
pub fn new_device(id: &str, device_type: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        device_type: device_type.to_owned(),
        model: Some("T-1000".into()),
        location: Some("bldg-7/floor-2".into()),
        firmware_version: Some("1.0.0".into()),
    }
}

/// A firmware job in state `queued`.
pub fn firmware_job(job_id: &str, device_id: &str, version: &str) -> FirmwareJob {
    let t = now();
    FirmwareJob {
        job_id: job_id.to_owned(),
        device_id: device_id.to_owned(),
        version: version.to_owned(),
        url: format!("https://firmware.example/{version}.bin"),
        sha256: "ab".repeat(32),
        size: 1_048_576,
        status: "queued".into(),
        error: None,
        created_by: "alice".into(),
        created_at: t,
        updated_at: t,
    }
}

/// A filter on one device type (isolates a test's devices on a shared server).
pub fn of_type(device_type: &str) -> DeviceFilter {
    DeviceFilter {
        device_type: Some(device_type.to_owned()),
        ..DeviceFilter::default()
    }
}

/// Builder for an [`EnrollmentCommit`].
#[derive(Debug, Clone)]
pub struct EnrollmentBuilder {
    commit: EnrollmentCommit,
}

impl EnrollmentBuilder {
    /// A first enrollment (`expected_generation = None`) of `device_id` issuing `serial`.
    pub fn new(device_id: &str, request_id: &str, serial: &str) -> Self {
        let response = json!({
            "request_id": request_id,
            "status": "accepted",
            "device_id": device_id,
            "credential": { "type": "certificate", "serial": serial },
            "config_topic": format!("devices/{device_id}/config"),
        });
        EnrollmentBuilder {
            commit: EnrollmentCommit {
                device_id: device_id.to_owned(),
                request_id: request_id.to_owned(),
                expected_generation: None,
                device_type: "thermostat".into(),
                model: Some("T-1000".into()),
                location: None,
                firmware_version: Some("1.4.2".into()),
                credential: credential(device_id, serial),
                config_body: json!({ "device_id": device_id, "settings": { "mode": "heat" } }),
                activation_deadline: now() + Duration::minutes(10),
                revoke_others: None,
                response,
                events: vec![
                    event(device_id, "enroll_requested").with_request(request_id),
                    event(device_id, "credential_issued").with_request(request_id),
                ],
                factory: None,
            },
        }
    }

    pub fn expected_generation(mut self, generation: Option<i64>) -> Self {
        self.commit.expected_generation = generation;
        self
    }

    pub fn device_type(mut self, device_type: &str) -> Self {
        self.commit.device_type = device_type.to_owned();
        self
    }

    pub fn credential(mut self, credential: Credential) -> Self {
        self.commit.credential = credential;
        self
    }

    pub fn config_body(mut self, body: serde_json::Value) -> Self {
        self.commit.config_body = body;
        self
    }

    pub fn deadline(mut self, deadline: OffsetDateTime) -> Self {
        self.commit.activation_deadline = deadline;
        self
    }

    pub fn revoke_others(mut self, reason: &str) -> Self {
        self.commit.revoke_others = Some(reason.to_owned());
        self
    }

    pub fn metadata(
        mut self,
        model: Option<&str>,
        location: Option<&str>,
        firmware_version: Option<&str>,
    ) -> Self {
        self.commit.model = model.map(str::to_owned);
        self.commit.location = location.map(str::to_owned);
        self.commit.firmware_version = firmware_version.map(str::to_owned);
        self
    }

    pub fn factory(mut self, issuer: &str, serial: &str) -> Self {
        self.commit.factory = Some(onboard::store::FactoryIdentity {
            issuer: issuer.to_owned(),
            serial: serial.to_owned(),
        });
        self
    }

    pub fn build(self) -> EnrollmentCommit {
        self.commit
    }
}
