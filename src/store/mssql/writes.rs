//! The writes a device waits for, each built as one request (see `batch`): an enrollment's
//! commit, an activation, an activation deadline, a config ack, a firmware status, a renewed
//! credential, and the admin writes beside them (a config version, a firmware job, a state).
//!
//! Every function here is pure: it renders the whole transaction for one operation, so the
//! store sends it in one round trip, and the tests below check each one without a server.
//! What a batch reads back is its last result set (the outcome `SELECT` after the commit);
//! `OUTPUT` result sets of the statements inside come before it.

use time::OffsetDateTime;

use super::batch::{arg, opt_arg, opt_time_arg, time_arg, Arg, Batch, Request, CONFLICT};
use super::rows::{json_text, to_db_time};
use super::statements::Statements;
use crate::store::{
    transition_slots, AuditEvent, ChangeKind, Credential, DeviceState, EnrollmentCommit,
    FirmwareJob, JobStatus, TransitionTarget,
};

/// Outcome `SELECT` of the conditional writes: how many rows the guarding update changed.
pub const CHANGED: &str = "SELECT @changed AS changed";

/// No outcome `SELECT`: what the caller reads back is the `OUTPUT` of the batch's last
/// statement (a new configuration row), or nothing.
pub const NO_OUTCOME: &str = "";

fn event<'a>(b: &mut Batch<'a>, sql: &Statements, event: &'a AuditEvent, detail: String) {
    b.statement(
        &sql.insert_event,
        [
            arg(event.device_id.as_str()),
            time_arg(to_db_time(event.at)),
            arg(event.event.as_str()),
            arg(detail),
            arg(event.actor.as_str()),
            opt_arg(event.request_id.as_deref()),
        ],
    );
}

fn audit<'a>(b: &mut Batch<'a>, sql: &Statements, e: &'a AuditEvent) {
    event(b, sql, e, json_text(&e.detail));
}

fn credential<'a>(b: &mut Batch<'a>, sql: &Statements, cred: &'a Credential) {
    let time = |t: Option<OffsetDateTime>| opt_time_arg(t.map(to_db_time));
    b.statement(
        &sql.insert_credential,
        [
            arg(cred.serial.as_str()),
            arg(cred.fingerprint.as_slice()),
            arg(cred.device_id.as_str()),
            arg(cred.kind.as_str()),
            opt_arg(cred.password_hash.as_deref()),
            time(cred.not_after),
            time_arg(to_db_time(cred.created_at)),
            time(cred.activated_at),
            time(cred.revoked_at),
            opt_arg(cred.revoke_reason.as_deref()),
        ],
    );
}

/// Who writes the change-feed rows of a batch, and when.
#[derive(Debug, Clone, Copy)]
pub struct Feed<'a> {
    /// The store instance's origin, stamped on every row.
    pub origin: &'a str,
    pub now: OffsetDateTime,
}

/// A change-feed row announcing a change of `device_id` (in the batch's transaction).
fn change<'a>(
    b: &mut Batch<'a>,
    sql: &Statements,
    feed: Feed<'a>,
    device_id: &'a str,
    kind: ChangeKind,
) {
    b.statement(
        &sql.insert_change,
        [
            arg(device_id),
            arg(kind.as_str()),
            arg(feed.origin),
            time_arg(to_db_time(feed.now)),
        ],
    );
}

/// Raise [`NOT_FOUND`] unless device `id` exists (parameter-bound).
fn device_exists<'a>(b: &mut Batch<'a>, sql: &Statements, id: &'a str) {
    b.statement(&sql.require_device, [arg(id)]);
}

fn next_config<'a>(
    b: &mut Batch<'a>,
    sql: &Statements,
    device_id: &'a str,
    body: String,
    created_by: &'a str,
    now: OffsetDateTime,
) {
    b.statement(
        &sql.insert_next_config,
        [
            arg(device_id),
            arg(body),
            arg(created_by),
            time_arg(to_db_time(now)),
        ],
    );
}

/// Everything an accepted enrollment writes. Its result sets end with the configuration row
/// (the `OUTPUT` of its insert).
pub fn commit_enrollment<'a>(
    sql: &Statements,
    commit: &'a EnrollmentCommit,
    feed: Feed<'a>,
) -> Request<'a> {
    let now = feed.now;
    let mut b = Batch::new();
    let now_db = to_db_time(now);
    let device_id = commit.device_id.as_str();
    let metadata = [
        opt_arg(commit.model.as_deref()),
        opt_arg(commit.location.as_deref()),
        opt_arg(commit.firmware_version.as_deref()),
    ];
    let [model, location, firmware] = metadata;
    let issuer = || opt_arg(commit.factory.as_ref().map(|f| f.issuer.as_str()));
    let factory_serial = || opt_arg(commit.factory.as_ref().map(|f| f.serial.as_str()));
    let common = |model, location, firmware| {
        [
            arg(device_id),
            arg(commit.device_type.as_str()),
            model,
            location,
            firmware,
            arg(commit.credential.kind.as_str()),
            arg(commit.credential.serial.as_str()),
            time_arg(now_db),
            time_arg(to_db_time(commit.activation_deadline)),
        ]
    };
    // 1. The device row, guarded by its generation (or by the primary key when new).
    match commit.expected_generation {
        Some(expected) => {
            let args: Vec<Arg<'a>> = common(model, location, firmware)
                .into_iter()
                .chain([arg(expected), issuer(), factory_serial()])
                .collect();
            b.statement(&sql.update_device_for_enrollment, args);
            b.expect_rows(
                CONFLICT,
                "the device changed since its generation was read \
                 (or is revoked, or bound to another factory issuer)",
            );
        }
        None => {
            let args: Vec<Arg<'a>> = common(model, location, firmware)
                .into_iter()
                .chain([issuer(), factory_serial()])
                .collect();
            b.statement(&sql.insert_device_for_enrollment, args);
        }
    }
    // 2. The idempotency record: a second commit of the same request fails here.
    b.statement(
        &sql.insert_enrollment,
        [
            arg(device_id),
            arg(commit.request_id.as_str()),
            arg(commit.credential.serial.as_str()),
            arg(json_text(&commit.response)),
            time_arg(now_db),
        ],
    );
    // 3. Other credentials, before the new one is inserted (so it is never among them).
    if let Some(reason) = &commit.revoke_others {
        b.statement(
            &sql.revoke_device_credentials_quietly,
            [arg(device_id), time_arg(now_db), arg(reason.as_str())],
        );
        b.raw("IF @@ROWCOUNT > 0");
        change(&mut b, sql, feed, device_id, ChangeKind::Credentials);
    }
    // 4. The credential, the audit events, the configuration version (its row comes back).
    credential(&mut b, sql, &commit.credential);
    change(&mut b, sql, feed, device_id, ChangeKind::Config);
    for e in &commit.events {
        audit(&mut b, sql, e);
    }
    next_config(
        &mut b,
        sql,
        device_id,
        json_text(&commit.config_body),
        "gateway",
        now,
    );
    b.into_request(NO_OUTCOME)
}

/// `enrolling` -> `active` (see `Store::activate`); reads back [`CHANGED`].
pub fn activate<'a>(
    sql: &Statements,
    device_id: &'a str,
    serial: &'a str,
    e: &'a AuditEvent,
    feed: Feed<'a>,
) -> Request<'a> {
    let now = to_db_time(feed.now);
    let mut b = Batch::new();
    b.raw("DECLARE @changed int;");
    b.statement(
        &sql.activate_device,
        [arg(device_id), arg(serial), time_arg(now)],
    );
    b.raw("SET @changed = @@ROWCOUNT;\nIF @changed > 0\nBEGIN");
    b.statement(&sql.activate_credential, [arg(serial), time_arg(now)]);
    b.statement(
        &sql.activate_supersede,
        [arg(device_id), arg(serial), time_arg(now)],
    );
    b.raw("IF @@ROWCOUNT > 0");
    change(&mut b, sql, feed, device_id, ChangeKind::Credentials);
    audit(&mut b, sql, e);
    b.raw("END");
    b.into_request(CHANGED)
}

/// `enrolling` -> `failed` at the activation deadline; reads back [`CHANGED`].
pub fn expire_enrollment<'a>(
    sql: &Statements,
    device_id: &'a str,
    serial: &'a str,
    e: &'a AuditEvent,
    feed: Feed<'a>,
) -> Request<'a> {
    let now = to_db_time(feed.now);
    let mut b = Batch::new();
    b.raw("DECLARE @changed int;");
    b.statement(
        &sql.expire_device,
        [arg(device_id), arg(serial), time_arg(now)],
    );
    b.raw("SET @changed = @@ROWCOUNT;\nIF @changed > 0\nBEGIN");
    b.statement(&sql.expire_credential, [arg(serial), time_arg(now)]);
    change(&mut b, sql, feed, device_id, ChangeKind::Credentials);
    change(&mut b, sql, feed, device_id, ChangeKind::State);
    audit(&mut b, sql, e);
    b.raw("END");
    b.into_request(CHANGED)
}

/// A device's config ack, applied or failed; reads back [`CHANGED`].
pub fn ack_config<'a>(
    sql: &Statements,
    device_id: &'a str,
    version: i64,
    failed_error: Option<&'a str>,
    e: &'a AuditEvent,
    now: OffsetDateTime,
) -> Request<'a> {
    let mut b = Batch::new();
    b.raw("DECLARE @changed int;");
    match failed_error {
        None => b.statement(
            &sql.ack_config_applied,
            [arg(device_id), arg(version), time_arg(to_db_time(now))],
        ),
        Some(error) => b.statement(
            &sql.ack_config_failed,
            [arg(device_id), arg(version), arg(error)],
        ),
    }
    b.raw("SET @changed = @@ROWCOUNT;\nIF @changed > 0\nBEGIN");
    audit(&mut b, sql, e);
    b.raw("END");
    b.into_request(CHANGED)
}

/// A firmware job's progress report, forward only (from one of `status`'s predecessors);
/// reads back [`CHANGED`].
pub fn advance_firmware_job<'a>(
    sql: &Statements,
    job: (&'a str, &'a str),
    status: JobStatus,
    error: Option<&'a str>,
    e: &'a AuditEvent,
    feed: Feed<'a>,
) -> Request<'a> {
    let (job_id, device_id) = job;
    let mut b = Batch::new();
    b.raw("DECLARE @changed int;");
    let from = status.predecessors().map(arg);
    b.statement(
        &sql.advance_firmware_job,
        [
            arg(job_id),
            arg(device_id),
            arg(status.as_str()),
            opt_arg(error),
            time_arg(to_db_time(feed.now)),
        ]
        .into_iter()
        .chain(from),
    );
    b.raw("SET @changed = @@ROWCOUNT;\nIF @changed > 0\nBEGIN");
    change(&mut b, sql, feed, device_id, ChangeKind::Firmware);
    audit(&mut b, sql, e);
    b.raw("END");
    b.into_request(CHANGED)
}

/// A credential issued outside enrollment (renewal), with its event; [`NOT_FOUND`] for an
/// unknown device.
pub fn insert_credential<'a>(
    sql: &Statements,
    cred: &'a Credential,
    e: &'a AuditEvent,
) -> Request<'a> {
    let mut b = Batch::new();
    device_exists(&mut b, sql, &cred.device_id);
    credential(&mut b, sql, cred);
    audit(&mut b, sql, e);
    b.into_request(NO_OUTCOME)
}

/// Configuration version latest + 1 with its event; [`NOT_FOUND`] for an unknown device. Its
/// result sets end with the new row.
pub fn insert_config<'a>(
    sql: &Statements,
    device_id: &'a str,
    body: &serde_json::Value,
    created_by: &'a str,
    e: &'a AuditEvent,
    feed: Feed<'a>,
) -> Request<'a> {
    let now = feed.now;
    let mut b = Batch::new();
    device_exists(&mut b, sql, device_id);
    change(&mut b, sql, feed, device_id, ChangeKind::Config);
    audit(&mut b, sql, e);
    next_config(&mut b, sql, device_id, json_text(body), created_by, now);
    b.into_request(NO_OUTCOME)
}

/// A firmware job with its event; [`NOT_FOUND`] for an unknown device.
pub fn insert_firmware_job<'a>(
    sql: &Statements,
    job: &'a FirmwareJob,
    e: &'a AuditEvent,
    origin: &'a str,
) -> Request<'a> {
    let feed = Feed {
        origin,
        now: job.updated_at,
    };
    let mut b = Batch::new();
    device_exists(&mut b, sql, &job.device_id);
    b.statement(
        &sql.insert_firmware_job,
        [
            arg(job.job_id.as_str()),
            arg(job.device_id.as_str()),
            arg(job.version.as_str()),
            arg(job.url.as_str()),
            arg(job.sha256.as_str()),
            arg(job.size),
            arg(job.status.as_str()),
            opt_arg(job.error.as_deref()),
            arg(job.created_by.as_str()),
            time_arg(to_db_time(job.created_at)),
            time_arg(to_db_time(job.updated_at)),
        ],
    );
    change(&mut b, sql, feed, &job.device_id, ChangeKind::Firmware);
    audit(&mut b, sql, e);
    b.into_request(NO_OUTCOME)
}

/// Outcome `SELECT` of [`transition`]: whether the guarded update changed the row, the state
/// read before it (the actual state when it did not: NULL for an unknown device), and the
/// serials it revoked (comma-separated, NULL for none).
pub const TRANSITIONED: &str = "SELECT @changed AS changed, @previous_state AS previous, \
     (SELECT STRING_AGG(CAST(r.serial AS nvarchar(max)), N',') FROM @revoked AS r) AS revoked";

/// A guarded state change (from one of `from`) with its change-feed rows, its event and, when
/// asked, the revocation of the device's credentials; reads back [`TRANSITIONED`].
pub fn transition<'a>(
    sql: &Statements,
    id: &'a str,
    from: &[DeviceState],
    to: &'a TransitionTarget,
    e: &'a AuditEvent,
    feed: Feed<'a>,
) -> Request<'a> {
    let now = to_db_time(feed.now);
    let mut b = Batch::new();
    b.raw("DECLARE @changed int, @previous_state nvarchar(16);");
    b.raw("DECLARE @revoked TABLE (serial nvarchar(128) NOT NULL);");
    b.statement(&sql.read_device_state, [arg(id)]);
    let from = transition_slots(from).map(arg);
    b.statement(
        &sql.transition_device,
        [
            arg(id),
            arg(to.state.as_str()),
            opt_arg(to.last_error.as_deref()),
            time_arg(now),
            arg(to.release_factory),
        ]
        .into_iter()
        .chain(from),
    );
    b.raw("SET @changed = @@ROWCOUNT;\nIF @changed = 0\nBEGIN");
    // Refused: the state as it is now, for the caller's error.
    b.statement(&sql.read_device_state, [arg(id)]);
    b.raw("END\nELSE\nBEGIN");
    change(&mut b, sql, feed, id, ChangeKind::State);
    if let Some(reason) = to.revoke_credentials.as_deref() {
        b.statement(&sql.unrevoked_serials_into, [arg(id)]);
        b.statement(
            &sql.revoke_device_credentials_quietly,
            [arg(id), time_arg(now), arg(reason)],
        );
        b.raw("IF @@ROWCOUNT > 0");
        change(&mut b, sql, feed, id, ChangeKind::Credentials);
    }
    audit(&mut b, sql, e);
    b.raw("END");
    b.into_request(TRANSITIONED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CredentialKind, EnrollmentCommit, FactoryIdentity};
    use serde_json::json;

    fn sql() -> Statements {
        Statements::new(&super::super::schema::SchemaName::default())
    }

    fn event(name: &str) -> AuditEvent {
        AuditEvent::new("d-1", name, "gateway", json!({"n": 1})).with_request("r-1")
    }

    fn cred() -> Credential {
        Credential {
            serial: "s-1".into(),
            fingerprint: vec![7; 32],
            device_id: "d-1".into(),
            kind: CredentialKind::Certificate,
            password_hash: None,
            not_after: Some(OffsetDateTime::now_utc()),
            created_at: OffsetDateTime::now_utc(),
            activated_at: None,
            revoked_at: None,
            revoke_reason: None,
        }
    }

    fn commit(generation: Option<i64>, revoke: bool) -> EnrollmentCommit {
        EnrollmentCommit {
            device_id: "d-1".into(),
            request_id: "r-1".into(),
            expected_generation: generation,
            device_type: "thermostat".into(),
            model: Some("m".into()),
            location: None,
            firmware_version: None,
            credential: cred(),
            config_body: json!({"a": 1}),
            activation_deadline: OffsetDateTime::now_utc(),
            revoke_others: revoke.then(|| "reenrolled".to_owned()),
            response: json!({"status": "accepted"}),
            events: vec![event("enroll_requested"), event("credential_issued")],
            factory: generation.is_some().then(|| FactoryIdentity {
                issuer: "CN=factory".into(),
                serial: "0a".into(),
            }),
        }
    }

    /// Every placeholder of the text is bound, every bound parameter is used, none is NULL,
    /// and the transaction is opened and committed once, inside the batch.
    fn assert_one_trip(name: &str, request: &Request<'_>) {
        let text: &str = &request.text;
        let mut used = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("@P") {
            let after = &rest[at + 2..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if let Ok(n) = after[..digits].parse::<usize>() {
                used.insert(n);
            }
            rest = &after[digits..];
        }
        let bound: std::collections::BTreeSet<usize> = (1..=request.params.len()).collect();
        assert_eq!(used, bound, "{name}: placeholders vs parameters\n{text}");
        assert!(
            request
                .params
                .iter()
                .all(|p| !super::super::conn::is_null(p)),
            "{name}: a NULL parameter"
        );
        assert_eq!(text.matches("BEGIN TRAN;").count(), 1, "{name}\n{text}");
        assert_eq!(text.matches("COMMIT TRAN;").count(), 1, "{name}\n{text}");
        assert!(text.starts_with("BEGIN TRY\nBEGIN TRAN;"), "{name}\n{text}");
        assert!(
            text.contains("BEGIN CATCH\nIF @@TRANCOUNT > 0 ROLLBACK TRAN;\nTHROW;"),
            "{name}\n{text}"
        );
        for banned in ["MERGE", "WAITFOR", "UPDLOCK", "HOLDLOCK", "OUTPUT DELETED"] {
            assert!(!text.contains(banned), "{name}: {banned}");
        }
        assert!(
            !text.contains("dbo."),
            "{name}: unqualified or hard-coded schema"
        );
        // Every table reference is schema-qualified.
        let bare = text.matches("onboard_").count();
        let qualified = text.matches("[dbo].onboard_").count();
        assert_eq!(bare, qualified, "{name}: unqualified table\n{text}");
    }

    #[test]
    fn each_write_a_device_waits_for_is_one_request() {
        let sql = sql();
        let now = OffsetDateTime::now_utc();
        let feed = Feed {
            origin: "gw-1",
            now,
        };
        let e = event("x");
        let c = cred();
        let first = commit(None, false);
        let again = commit(Some(3), true);
        let job = FirmwareJob {
            job_id: "j-1".into(),
            device_id: "d-1".into(),
            version: "2.0".into(),
            url: "https://fw/x".into(),
            sha256: "ab".repeat(32),
            size: 10,
            status: "queued".into(),
            error: None,
            created_by: "alice".into(),
            created_at: now,
            updated_at: now,
        };
        let body = json!({"b": 2});
        let mut target = TransitionTarget::new(DeviceState::Revoked);
        target.revoke_credentials = Some("admin".into());
        let requests = [
            (
                "commit_enrollment (new)",
                commit_enrollment(&sql, &first, feed),
            ),
            (
                "commit_enrollment (again)",
                commit_enrollment(&sql, &again, feed),
            ),
            ("activate", activate(&sql, "d-1", "s-1", &e, feed)),
            (
                "expire_enrollment",
                expire_enrollment(&sql, "d-1", "s-1", &e, feed),
            ),
            (
                "ack_config applied",
                ack_config(&sql, "d-1", 2, None, &e, now),
            ),
            (
                "ack_config failed",
                ack_config(&sql, "d-1", 2, Some("bad"), &e, now),
            ),
            (
                "advance_firmware_job",
                advance_firmware_job(&sql, ("j-1", "d-1"), JobStatus::Installing, None, &e, feed),
            ),
            ("insert_credential", insert_credential(&sql, &c, &e)),
            (
                "insert_config",
                insert_config(&sql, "d-1", &body, "alice", &e, feed),
            ),
            (
                "insert_firmware_job",
                insert_firmware_job(&sql, &job, &e, "gw-1"),
            ),
            (
                "transition",
                transition(&sql, "d-1", &DeviceState::ALL, &target, &e, feed),
            ),
        ];
        for (name, request) in &requests {
            assert_one_trip(name, request);
        }
    }

    #[test]
    fn an_enrollment_guards_its_generation_and_writes_every_row() {
        let sql = sql();
        let now = OffsetDateTime::now_utc();
        let feed = Feed {
            origin: "gw-1",
            now,
        };
        let again = commit(Some(3), true);
        let text = commit_enrollment(&sql, &again, feed).text;
        let order = [
            "UPDATE d SET d.device_type",
            "THROW 51001",
            "INSERT INTO [dbo].onboard_enrollments",
            "UPDATE c SET c.revoked_at",
            "IF @@ROWCOUNT > 0\nINSERT INTO [dbo].onboard_changes",
            "INSERT INTO [dbo].onboard_credentials",
            "INSERT INTO [dbo].onboard_changes",
            "INSERT INTO [dbo].onboard_events",
            "INSERT INTO [dbo].onboard_device_configs",
            "COMMIT TRAN",
        ];
        let mut from = 0;
        for part in order {
            let at = text[from..]
                .find(part)
                .unwrap_or_else(|| panic!("{part} missing or out of order\n{text}"));
            from += at;
        }
        assert_eq!(text.matches("INSERT INTO [dbo].onboard_events").count(), 2);
        // Absent metadata is a NULL literal, never a NULL parameter.
        assert!(text.contains("COALESCE(CAST(NULL AS nvarchar(400)), d.location)"));
        // The factory issuer binding is guarded in the update itself.
        assert!(!text.contains("d.factory_issuer = CAST(NULL"), "{text}");
        let first = commit(None, false);
        let text = commit_enrollment(&sql, &first, feed).text;
        assert!(text.contains("INSERT INTO [dbo].onboard_devices"));
        // A device enrolling without a factory certificate has no binding.
        assert!(text.contains("CAST(NULL AS nvarchar(400)), CAST(NULL AS nvarchar(128)))"));
        assert_eq!(text.matches("INSERT INTO [dbo].onboard_changes").count(), 1);
        assert!(!text.contains("THROW 51001"));
        assert!(!text.contains("c.revoked_at"));
    }

    #[test]
    fn inserts_for_a_device_check_that_it_exists_first() {
        let sql = sql();
        let now = OffsetDateTime::now_utc();
        let feed = Feed {
            origin: "gw-1",
            now,
        };
        let e = event("x");
        let c = cred();
        for text in [
            insert_credential(&sql, &c, &e).text,
            insert_config(&sql, "d-1", &json!({}), "a", &e, feed).text,
        ] {
            let guard = text.find("THROW 51002").expect("guard");
            let insert = text.find("INSERT INTO").expect("insert");
            assert!(guard < insert, "{text}");
        }
    }
}
