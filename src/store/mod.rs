//! The inventory: devices, their credentials, configuration versions, firmware jobs and the audit
//! log, behind one [`Store`] trait with two backends: [`sqlite`] (embedded, the default) and
//! [`mssql`] (Microsoft SQL Server / Azure SQL through tiberius).
//!
//! Every operation that the enrollment or lifecycle protocols rely on for atomicity is a single
//! trait method, implemented as one transaction by each backend. Conditional transitions report
//! whether they happened (`Ok(false)` when the row was not in the expected state, or
//! [`StoreError::WrongState`] naming the state found), so two gateway instances sharing one
//! database never both win. Writes that end sessions or change retained topics also append to
//! the change feed ([`Store::changes_since`]) in their transaction, which every gateway polls
//! (see [`crate::feed`]).

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub mod backup;
pub mod mssql;
pub mod sqlite;

/// Life cycle of a device in the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Pre-registered (bulk import, enrollment rolled back by an admin, reinstated).
    Pending,
    /// A credential was issued; waiting for the device to reconnect with it and report.
    Enrolling,
    /// Reported over its operational credential.
    Active,
    /// The activation deadline passed; the credential was revoked.
    Failed,
    /// Revoked by an admin: refused at every connect and enrollment.
    Revoked,
}

impl DeviceState {
    pub const ALL: [DeviceState; 5] = [
        DeviceState::Pending,
        DeviceState::Enrolling,
        DeviceState::Active,
        DeviceState::Failed,
        DeviceState::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Enrolling => "enrolling",
            DeviceState::Active => "active",
            DeviceState::Failed => "failed",
            DeviceState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown device state {s:?}")))
    }
}

/// What kind of operational credential a device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialKind {
    Certificate,
    Password,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Certificate => "certificate",
            CredentialKind::Password => "password",
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CredentialKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "certificate" => Ok(CredentialKind::Certificate),
            "password" => Ok(CredentialKind::Password),
            other => Err(StoreError::Corrupt(format!(
                "unknown credential kind {other:?}"
            ))),
        }
    }
}

/// A row of the devices table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub device_type: String,
    pub model: Option<String>,
    pub location: Option<String>,
    pub firmware_version: Option<String>,
    pub state: DeviceState,
    pub credential_kind: Option<CredentialKind>,
    /// Serial of the credential issued by the latest enrollment (the one activation waits for).
    pub current_serial: Option<String>,
    /// Incremented by every enrollment; the optimistic-concurrency guard of `commit_enrollment`.
    pub generation: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub enrolled_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub activation_deadline: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    /// Subject DN of the factory CA that issued the certificate of the first enrollment:
    /// re-enrollment needs the same issuer until an admin rolls the enrollment back.
    #[serde(default)]
    pub factory_issuer: Option<String>,
    /// Serial of that factory certificate.
    #[serde(default)]
    pub factory_serial: Option<String>,
}

/// A device pre-registered by bulk import (state `pending`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDevice {
    pub id: String,
    pub device_type: String,
    pub model: Option<String>,
    pub location: Option<String>,
    pub firmware_version: Option<String>,
}

/// A row of the credentials table. Secrets are never stored: a password credential keeps only
/// its salted hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credential {
    /// Certificate serial in lower-case hex, or a random id for password credentials.
    pub serial: String,
    /// SHA-256 of the certificate DER, or of the password hash string.
    pub fingerprint: Vec<u8>,
    pub device_id: String,
    pub kind: CredentialKind,
    /// `sha256$<salt b64>$<hash b64>` for password credentials.
    pub password_hash: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub not_after: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// First connect with this credential after it was issued (activation or renewal).
    #[serde(with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    pub revoke_reason: Option<String>,
}

impl Credential {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// One version of a device's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub device_id: String,
    pub version: i64,
    /// The JSON document pushed on `devices/D/config`.
    pub body: serde_json::Value,
    /// `gateway` (enrollment, automatic rollback) or the admin's name.
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub applied_at: Option<OffsetDateTime>,
    /// Set when the device acked this version `failed`.
    pub failed_error: Option<String>,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub device_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Short name, e.g. `enroll_requested`, `credential_issued`, `activated`, `auth_refused`.
    pub event: String,
    /// Free-form JSON detail (reason, serial, versions, ...). Never holds a secret.
    pub detail: serde_json::Value,
    /// `gateway`, `device`, or the admin's name.
    pub actor: String,
    pub request_id: Option<String>,
}

impl AuditEvent {
    pub fn new(device_id: &str, event: &str, actor: &str, detail: serde_json::Value) -> Self {
        AuditEvent {
            device_id: device_id.to_owned(),
            at: OffsetDateTime::now_utc(),
            event: event.to_owned(),
            detail,
            actor: actor.to_owned(),
            request_id: None,
        }
    }

    pub fn with_request(mut self, request_id: &str) -> Self {
        self.request_id = Some(request_id.to_owned());
        self
    }
}

/// A firmware update job for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirmwareJob {
    pub job_id: String,
    pub device_id: String,
    pub version: String,
    pub url: String,
    pub sha256: String,
    pub size: i64,
    /// `queued`, `downloading`, `installing`, `succeeded`, `failed`.
    pub status: String,
    pub error: Option<String>,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Everything an accepted enrollment writes, committed atomically by
/// [`Store::commit_enrollment`] before the response is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollmentCommit {
    pub device_id: String,
    pub request_id: String,
    /// The device's `generation` read before issuing (None: the device row did not exist).
    /// The commit fails with [`StoreError::Conflict`] if another enrollment changed it.
    pub expected_generation: Option<i64>,
    pub device_type: String,
    pub model: Option<String>,
    pub location: Option<String>,
    pub firmware_version: Option<String>,
    pub credential: Credential,
    /// Body of the configuration version to create (version = latest + 1, or 1).
    pub config_body: serde_json::Value,
    pub activation_deadline: OffsetDateTime,
    /// Revoke every other unrevoked credential of the device now, with this reason
    /// (re-enrollment of a device whose previous credential never activated).
    pub revoke_others: Option<String>,
    /// The response sent to the device, without secrets, kept for idempotent retries.
    pub response: serde_json::Value,
    /// Audit events written in the same transaction.
    pub events: Vec<AuditEvent>,
    /// The factory certificate the request came with. Recorded as the device's binding when
    /// it has none; the commit fails with [`StoreError::Conflict`] when the device is bound to
    /// another issuer.
    pub factory: Option<FactoryIdentity>,
}

/// Who made a device: the factory CA that issued its bootstrap certificate, and its serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactoryIdentity {
    /// Subject DN of the factory CA (the trust store decides roles by subject).
    pub issuer: String,
    /// Serial of the factory certificate, lower-case hex.
    pub serial: String,
}

/// What [`Store::commit_enrollment`] created.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollmentCommitted {
    pub config: DeviceConfig,
    pub generation: i64,
}

/// An enrollment already answered, found by `(device_id, request_id)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEnrollment {
    pub device_id: String,
    pub request_id: String,
    pub serial: String,
    pub response: serde_json::Value,
    pub created_at: OffsetDateTime,
}

/// A device waiting for activation, for the deadline sweeper (survives restarts).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingActivation {
    pub device_id: String,
    pub serial: String,
    pub deadline: OffsetDateTime,
}

/// Filter for [`Store::list_devices`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceFilter {
    pub state: Option<DeviceState>,
    pub device_type: Option<String>,
    /// Only devices whose current certificate expires before this instant.
    pub expiring_before: Option<OffsetDateTime>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

/// Result of a bulk import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    pub inserted: u64,
    /// Already present with identical metadata.
    pub unchanged: u64,
    /// Already present in state `pending` with other metadata: metadata updated.
    pub updated: u64,
    /// Already present and past `pending` (enrolled, active, ...): left alone.
    pub skipped: u64,
}

/// Where a guarded [`Store::transition`] takes a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionTarget {
    pub state: DeviceState,
    /// Written to `last_error` (cleared when `None`).
    pub last_error: Option<String>,
    /// Forget the factory issuer binding (an admin rollback of the enrollment).
    pub release_factory: bool,
    /// Revoke every unrevoked credential of the device, with this reason, in the same
    /// transaction (so no enrollment can slip in between the state and the revocation).
    pub revoke_credentials: Option<String>,
}

impl TransitionTarget {
    pub fn new(state: DeviceState) -> TransitionTarget {
        TransitionTarget {
            state,
            last_error: None,
            release_factory: false,
            revoke_credentials: None,
        }
    }

    pub fn with_error(mut self, last_error: &str) -> TransitionTarget {
        self.last_error = Some(last_error.to_owned());
        self
    }

    pub fn releasing_factory(mut self) -> TransitionTarget {
        self.release_factory = true;
        self
    }

    pub fn revoking_credentials(mut self, reason: &str) -> TransitionTarget {
        self.revoke_credentials = Some(reason.to_owned());
        self
    }
}

impl From<DeviceState> for TransitionTarget {
    fn from(state: DeviceState) -> Self {
        TransitionTarget::new(state)
    }
}

/// A state change that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: DeviceState,
    pub to: DeviceState,
    /// Serials revoked with it ([`TransitionTarget::revoke_credentials`]), sorted.
    pub revoked: Vec<String>,
}

/// The states a guarded transition may start from, padded to a fixed number of slots so
/// each backend runs one fixed statement (`state IN (?, ?, ?, ?, ?)`); an unused slot holds
/// a value no state has.
pub fn transition_slots(from: &[DeviceState]) -> [&'static str; 5] {
    let mut slots = [""; 5];
    for (slot, state) in slots.iter_mut().zip(DeviceState::ALL) {
        if from.contains(&state) {
            *slot = state.as_str();
        }
    }
    slots
}

/// Progress of a firmware job; it only moves forward (queued -> downloading -> installing ->
/// succeeded | failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Downloading,
    Installing,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Downloading,
        JobStatus::Installing,
        JobStatus::Succeeded,
        JobStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Downloading => "downloading",
            JobStatus::Installing => "installing",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }

    /// Order of progress; both terminal statuses share the last rank.
    pub fn rank(self) -> u8 {
        match self {
            JobStatus::Queued => 0,
            JobStatus::Downloading => 1,
            JobStatus::Installing => 2,
            JobStatus::Succeeded | JobStatus::Failed => 3,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 3
    }

    /// The statuses a job may move to `self` from, padded like [`transition_slots`].
    pub fn predecessors(self) -> [&'static str; 4] {
        let mut slots = [""; 4];
        let earlier = JobStatus::ALL
            .into_iter()
            .filter(|s| s.rank() < self.rank());
        for (slot, status) in slots.iter_mut().zip(earlier) {
            *slot = status.as_str();
        }
        slots
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown firmware job status {s:?}")))
    }
}

/// What part of a device a change-feed row says was changed; a gateway applying it reads
/// that part again from the store (so applying a change twice does no harm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// One or more of its credentials were revoked.
    Credentials,
    /// Its state changed to one that ends its sessions or clears its retained topics.
    State,
    /// A configuration version was published.
    Config,
    /// A firmware job was created or moved on.
    Firmware,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 4] = [
        ChangeKind::Credentials,
        ChangeKind::State,
        ChangeKind::Config,
        ChangeKind::Firmware,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Credentials => "credentials",
            ChangeKind::State => "state",
            ChangeKind::Config => "config",
            ChangeKind::Firmware => "firmware",
        }
    }
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChangeKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChangeKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown change kind {s:?}")))
    }
}

/// One row of the change feed, written in the transaction of the change it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Increases with every change (a backend may leave gaps).
    pub id: i64,
    pub device_id: String,
    pub kind: ChangeKind,
    /// The [`Store::origin`] of the store instance that wrote it.
    pub origin: String,
    pub at: OffsetDateTime,
}

/// A fresh random origin id for a store instance.
pub fn new_origin() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out; the operation may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A concurrent writer changed the row first (optimistic concurrency, unique key).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// A guarded transition found the device in a state it may not leave that way.
    #[error("device {device} is {actual}")]
    WrongState { device: String, actual: DeviceState },
    /// Data in the store that the gateway cannot interpret.
    #[error("corrupt data in store: {0}")]
    Corrupt(String),
    #[error("schema migration failed: {0}")]
    Migration(String),
    #[error("invalid store url: {0}")]
    InvalidUrl(String),
    /// Any other database error (permanent).
    #[error("store error: {0}")]
    Database(String),
}

impl StoreError {
    /// Whether a caller should answer `unavailable` / retry later rather than fail.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The inventory interface. Implementations are cheap to share (`Arc<dyn Store>`) and safe to
/// call from many tasks at once.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for logs and metrics (`sqlite`, `mssql`).
    fn backend(&self) -> &'static str;

    /// Round trip to the database (readiness probe).
    async fn ping(&self) -> StoreResult<()>;

    /// Requests sent to the database server so far, for backends that count them (SQL Server:
    /// one per round trip); `None` for an embedded database.
    fn requests_sent(&self) -> Option<u64> {
        None
    }

    // ---- devices ----------------------------------------------------------------------------
    async fn device(&self, id: &str) -> StoreResult<Option<Device>>;
    async fn list_devices(&self, filter: &DeviceFilter) -> StoreResult<Vec<Device>>;
    async fn count_by_state(&self) -> StoreResult<Vec<(DeviceState, i64)>>;
    /// Pre-register devices as `pending`, all in one transaction; idempotent on re-run.
    async fn import_devices(&self, devices: &[NewDevice]) -> StoreResult<ImportOutcome>;
    /// Move the device to `to` if its state is one of `from`, with `to`'s side effects and
    /// the event, in one conditional UPDATE (and its transaction). `WrongState` names the
    /// state found when it is none of `from`; `NotFound` when there is no such device.
    async fn transition(
        &self,
        id: &str,
        from: &[DeviceState],
        to: TransitionTarget,
        event: AuditEvent,
    ) -> StoreResult<Transition>;
    async fn set_firmware_version(&self, id: &str, version: &str) -> StoreResult<()>;

    // ---- enrollment -------------------------------------------------------------------------
    async fn find_enrollment(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<Option<StoredEnrollment>>;
    /// What an enrollment request is judged by: the answer already given to
    /// `(device_id, request_id)`, and the device. A backend with a server to call does both in
    /// one round trip.
    async fn enrollment_context(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<(Option<StoredEnrollment>, Option<Device>)> {
        let stored = self.find_enrollment(device_id, request_id).await?;
        Ok((stored, self.device(device_id).await?))
    }
    /// Atomically: upsert the device (state `enrolling`, generation + 1, metadata, deadline,
    /// current_serial), insert the credential, insert config version latest+1, record the
    /// enrollment `(device_id, request_id) -> response`, optionally revoke other credentials,
    /// and append the events. `Conflict` when `expected_generation` does not match, or the
    /// `(device_id, request_id)` pair already exists.
    async fn commit_enrollment(&self, commit: EnrollmentCommit)
        -> StoreResult<EnrollmentCommitted>;
    /// Devices in state `enrolling` with their deadline and awaited serial.
    async fn pending_activations(&self) -> StoreResult<Vec<PendingActivation>>;
    /// `enrolling` -> `active` if the device's current serial is `serial`; sets `activated_at`
    /// on device and credential, revokes the device's other unrevoked credentials (reason
    /// `superseded`), appends the event. `Ok(false)` if the device was not in that state.
    async fn activate(&self, device_id: &str, serial: &str, event: AuditEvent)
        -> StoreResult<bool>;
    /// `enrolling` -> `failed` if the current serial is `serial`: revoke that credential
    /// (reason `activation_timeout`), set last_error, append the event. `Ok(false)` otherwise.
    async fn expire_enrollment(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool>;

    // ---- credentials ------------------------------------------------------------------------
    async fn credential(&self, serial: &str) -> StoreResult<Option<Credential>>;
    /// What an operational connection is judged by: the credential `serial` and device
    /// `device_id` (the one its certificate or login names). One round trip on a server.
    async fn credential_and_device(
        &self,
        serial: &str,
        device_id: &str,
    ) -> StoreResult<(Option<Credential>, Option<Device>)> {
        let credential = self.credential(serial).await?;
        Ok((credential, self.device(device_id).await?))
    }
    async fn credentials_of(&self, device_id: &str) -> StoreResult<Vec<Credential>>;
    /// Insert one credential outside enrollment (certificate renewal), with its event.
    async fn insert_credential(
        &self,
        credential: &Credential,
        event: AuditEvent,
    ) -> StoreResult<()>;
    /// Set `activated_at` on first use (renewal: the device connected with the new certificate).
    async fn mark_credential_used(&self, serial: &str) -> StoreResult<bool>;
    /// Revoke one credential if not yet revoked. `Ok(false)` if it was already revoked.
    async fn revoke_credential(&self, serial: &str, reason: &str) -> StoreResult<bool>;
    /// Revoke every unrevoked credential of a device; returns their serials.
    async fn revoke_device_credentials(
        &self,
        device_id: &str,
        reason: &str,
    ) -> StoreResult<Vec<String>>;
    /// Serials revoked so far (the connect-time deny list, loaded at start).
    async fn revoked_serials(&self) -> StoreResult<Vec<String>>;

    // ---- configuration ----------------------------------------------------------------------
    async fn latest_config(&self, device_id: &str) -> StoreResult<Option<DeviceConfig>>;
    async fn config_version(
        &self,
        device_id: &str,
        version: i64,
    ) -> StoreResult<Option<DeviceConfig>>;
    async fn config_history(&self, device_id: &str) -> StoreResult<Vec<DeviceConfig>>;
    /// Newest config of every device whose config is published (states enrolling and active),
    /// for republishing retained messages at start: one page of at most `limit`, of the devices
    /// whose id sorts after `after` (`""` for the first page), in device id order.
    async fn published_configs(&self, after: &str, limit: u32) -> StoreResult<Vec<DeviceConfig>>;
    /// Insert version latest+1 with this body and event; returns the new row.
    async fn insert_config(
        &self,
        device_id: &str,
        body: serde_json::Value,
        created_by: &str,
        event: AuditEvent,
    ) -> StoreResult<DeviceConfig>;
    /// Record the device's ack: applied (sets applied_at) or failed (sets failed_error).
    async fn ack_config(
        &self,
        device_id: &str,
        version: i64,
        failed_error: Option<&str>,
        event: AuditEvent,
    ) -> StoreResult<bool>;

    // ---- firmware ---------------------------------------------------------------------------
    async fn insert_firmware_job(&self, job: &FirmwareJob, event: AuditEvent) -> StoreResult<()>;
    async fn firmware_job(&self, job_id: &str, device_id: &str)
        -> StoreResult<Option<FirmwareJob>>;
    async fn latest_firmware_job(&self, device_id: &str) -> StoreResult<Option<FirmwareJob>>;
    /// Move a job forward to `status` (never back, never out of a terminal status), guarded
    /// in the UPDATE; `Ok(false)` when the job is unknown or already as far.
    async fn advance_firmware_job(
        &self,
        job_id: &str,
        device_id: &str,
        status: JobStatus,
        error: Option<&str>,
        event: AuditEvent,
    ) -> StoreResult<bool>;

    // ---- audit ------------------------------------------------------------------------------
    async fn append_event(&self, event: AuditEvent) -> StoreResult<()>;
    /// Oldest first; `limit` newest rows at most.
    async fn events(&self, device_id: &str, limit: u32) -> StoreResult<Vec<AuditEvent>>;
    /// Delete at most `batch` audit rows older than `cutoff` (oldest first); returns how many
    /// went. Retention calls it until fewer than `batch` go, so no statement holds long locks.
    async fn delete_events_before(&self, cutoff: OffsetDateTime, batch: u32) -> StoreResult<u64>;

    // ---- admin idempotency ------------------------------------------------------------------
    /// Remember an admin command's reply; `Ok(false)` if `request_id` was already recorded.
    async fn record_admin_reply(
        &self,
        request_id: &str,
        reply: &serde_json::Value,
    ) -> StoreResult<bool>;
    async fn admin_reply(&self, request_id: &str) -> StoreResult<Option<serde_json::Value>>;

    // ---- change feed ------------------------------------------------------------------------
    /// Stamped on every change this store instance writes, so a gateway can skip what it
    /// applied itself.
    fn origin(&self) -> &str;
    /// Id of the newest change (0 when there is none): where a starting gateway begins.
    async fn latest_change(&self) -> StoreResult<i64>;
    /// At most `limit` changes with an id above `cursor`, oldest first.
    async fn changes_since(&self, cursor: i64, limit: u32) -> StoreResult<Vec<Change>>;
    /// Delete changes older than `before`; returns how many.
    async fn prune_changes(&self, before: OffsetDateTime) -> StoreResult<u64>;
}

/// Open the backend named by `url` and run its migrations.
pub async fn open(config: &crate::config::StoreConfig) -> StoreResult<std::sync::Arc<dyn Store>> {
    let url = config.url.trim();
    if let Some(path) = url.strip_prefix("sqlite://") {
        let store = sqlite::SqliteStore::open(std::path::Path::new(path), config).await?;
        Ok(std::sync::Arc::new(store))
    } else if mssql::looks_like_mssql(url) {
        let store = mssql::MssqlStore::connect(url, config).await?;
        Ok(std::sync::Arc::new(store))
    } else {
        Err(StoreError::InvalidUrl(
            "expected sqlite://PATH, mssql://... or an ADO.NET connection string".into(),
        ))
    }
}
