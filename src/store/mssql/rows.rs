//! Pure conversions between result rows / column values and the domain types.
//!
//! Times are stored as `datetime2` in UTC, truncated to whole microseconds on write so that a
//! value reads back identically on SQL Server (100 ns precision) and Babelfish (1 µs).

use tiberius::Row;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::store::{
    AuditEvent, Change, ChangeKind, Credential, CredentialKind, Device, DeviceConfig, DeviceState,
    FirmwareJob, NewDevice, StoreError, StoreResult, StoredEnrollment,
};

/// An instant as written to a `datetime2` column: UTC, whole microseconds.
pub fn to_db_time(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    let micros = utc.microsecond();
    let utc = utc.replace_nanosecond(micros * 1_000).unwrap_or(utc);
    PrimitiveDateTime::new(utc.date(), utc.time())
}

/// A `datetime2` column value (UTC by convention) as an instant.
pub fn from_db_time(at: PrimitiveDateTime) -> OffsetDateTime {
    at.assume_utc()
}

/// Rewrite `sql` so that each placeholder `@Pn` whose value is absent reads `NULL` instead.
///
/// tiberius encodes a `None` parameter with the untyped NULL wire type, which SQL Server
/// accepts but Babelfish refuses. So an absent value is never sent as NULL: its slot still
/// carries a harmless non-NULL stand-in (the parameter stays declared, unused), and the
/// statement text says `NULL` where it would have read it, inside the same typed `CAST`.
/// Only whole placeholders are replaced (`@P1` never touches `@P10`).
pub fn null_slots<'s>(
    sql: &'s str,
    slots: impl IntoIterator<Item = (usize, bool)>,
) -> std::borrow::Cow<'s, str> {
    let absent: Vec<usize> = slots
        .into_iter()
        .filter(|(_, is_absent)| *is_absent)
        .map(|(n, _)| n)
        .collect();
    if absent.is_empty() {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find("@P") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) if absent.contains(&n) => out.push_str("NULL"),
            _ => out.push_str(&rest[at..at + 2 + digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Parse a JSON text column.
pub fn parse_json(column: &str, text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("column {column} is not valid JSON: {e}")))
}

/// A JSON value as stored in an `nvarchar(max)` column.
pub fn json_text(value: &serde_json::Value) -> String {
    value.to_string()
}

fn get_err(column: &str, e: tiberius::error::Error) -> StoreError {
    StoreError::Corrupt(format!("column {column}: {e}"))
}

/// A non-NULL text column.
pub fn text(row: &Row, column: &str) -> StoreResult<String> {
    opt_text(row, column)?.ok_or_else(|| StoreError::Corrupt(format!("column {column} is NULL")))
}

/// A nullable text column.
pub fn opt_text(row: &Row, column: &str) -> StoreResult<Option<String>> {
    row.try_get::<&str, _>(column)
        .map(|v| v.map(str::to_owned))
        .map_err(|e| get_err(column, e))
}

/// A non-NULL `bigint` column.
pub fn int64(row: &Row, column: &str) -> StoreResult<i64> {
    row.try_get::<i64, _>(column)
        .map_err(|e| get_err(column, e))?
        .ok_or_else(|| StoreError::Corrupt(format!("column {column} is NULL")))
}

/// A non-NULL `int` column.
pub fn int32(row: &Row, column: &str) -> StoreResult<i32> {
    row.try_get::<i32, _>(column)
        .map_err(|e| get_err(column, e))?
        .ok_or_else(|| StoreError::Corrupt(format!("column {column} is NULL")))
}

/// A non-NULL `varbinary` column.
pub fn bytes(row: &Row, column: &str) -> StoreResult<Vec<u8>> {
    row.try_get::<&[u8], _>(column)
        .map_err(|e| get_err(column, e))?
        .map(<[u8]>::to_vec)
        .ok_or_else(|| StoreError::Corrupt(format!("column {column} is NULL")))
}

/// A nullable `datetime2` column.
pub fn opt_time(row: &Row, column: &str) -> StoreResult<Option<OffsetDateTime>> {
    row.try_get::<PrimitiveDateTime, _>(column)
        .map(|v| v.map(from_db_time))
        .map_err(|e| get_err(column, e))
}

/// A non-NULL `datetime2` column.
pub fn time(row: &Row, column: &str) -> StoreResult<OffsetDateTime> {
    opt_time(row, column)?.ok_or_else(|| StoreError::Corrupt(format!("column {column} is NULL")))
}

/// A non-NULL JSON column.
pub fn json(row: &Row, column: &str) -> StoreResult<serde_json::Value> {
    parse_json(column, &text(row, column)?)
}

/// Columns of `onboard_devices` in the order [`device`] reads them, qualified by `d`.
pub const DEVICE_COLUMNS: &str = "d.id, d.device_type, d.model, d.location, d.firmware_version, \
    d.state, d.credential_kind, d.current_serial, d.generation, d.created_at, d.updated_at, \
    d.enrolled_at, d.activated_at, d.activation_deadline, d.last_error, d.factory_issuer, \
    d.factory_serial";

/// A devices row.
pub fn device(row: &Row) -> StoreResult<Device> {
    Ok(Device {
        id: text(row, "id")?,
        device_type: text(row, "device_type")?,
        model: opt_text(row, "model")?,
        location: opt_text(row, "location")?,
        firmware_version: opt_text(row, "firmware_version")?,
        state: text(row, "state")?.parse::<DeviceState>()?,
        credential_kind: opt_text(row, "credential_kind")?
            .map(|k| k.parse::<CredentialKind>())
            .transpose()?,
        current_serial: opt_text(row, "current_serial")?,
        generation: int64(row, "generation")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
        enrolled_at: opt_time(row, "enrolled_at")?,
        activated_at: opt_time(row, "activated_at")?,
        activation_deadline: opt_time(row, "activation_deadline")?,
        last_error: opt_text(row, "last_error")?,
        factory_issuer: opt_text(row, "factory_issuer")?,
        factory_serial: opt_text(row, "factory_serial")?,
    })
}

/// A change-feed row.
pub fn change(row: &Row) -> StoreResult<Change> {
    Ok(Change {
        id: int64(row, "id")?,
        device_id: text(row, "device_id")?,
        kind: text(row, "kind")?.parse::<ChangeKind>()?,
        origin: text(row, "origin")?,
        at: time(row, "occurred_at")?,
    })
}

/// Columns of `onboard_credentials`, qualified by `c`.
pub const CREDENTIAL_COLUMNS: &str = "c.serial, c.fingerprint, c.device_id, c.kind, \
    c.password_hash, c.not_after, c.created_at, c.activated_at, c.revoked_at, c.revoke_reason";

/// A credentials row.
pub fn credential(row: &Row) -> StoreResult<Credential> {
    Ok(Credential {
        serial: text(row, "serial")?,
        fingerprint: bytes(row, "fingerprint")?,
        device_id: text(row, "device_id")?,
        kind: text(row, "kind")?.parse::<CredentialKind>()?,
        password_hash: opt_text(row, "password_hash")?,
        not_after: opt_time(row, "not_after")?,
        created_at: time(row, "created_at")?,
        activated_at: opt_time(row, "activated_at")?,
        revoked_at: opt_time(row, "revoked_at")?,
        revoke_reason: opt_text(row, "revoke_reason")?,
    })
}

/// Columns of `onboard_device_configs`, qualified by `c`.
pub const CONFIG_COLUMNS: &str =
    "c.device_id, c.version, c.body, c.created_by, c.created_at, c.applied_at, c.failed_error";

/// A device_configs row.
pub fn config(row: &Row) -> StoreResult<DeviceConfig> {
    Ok(DeviceConfig {
        device_id: text(row, "device_id")?,
        version: int64(row, "version")?,
        body: json(row, "body")?,
        created_by: text(row, "created_by")?,
        created_at: time(row, "created_at")?,
        applied_at: opt_time(row, "applied_at")?,
        failed_error: opt_text(row, "failed_error")?,
    })
}

/// Columns of `onboard_events`, qualified by `e`.
pub const EVENT_COLUMNS: &str =
    "e.id, e.device_id, e.occurred_at, e.event_name, e.detail, e.actor, e.request_id";

/// An events row.
pub fn event(row: &Row) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        device_id: text(row, "device_id")?,
        at: time(row, "occurred_at")?,
        event: text(row, "event_name")?,
        detail: json(row, "detail")?,
        actor: text(row, "actor")?,
        request_id: opt_text(row, "request_id")?,
    })
}

/// Columns of `onboard_firmware_jobs`, qualified by `f`.
pub const FIRMWARE_COLUMNS: &str = "f.job_id, f.device_id, f.version, f.url, f.sha256, f.size, \
    f.status, f.error, f.created_by, f.created_at, f.updated_at";

/// A firmware_jobs row.
pub fn firmware_job(row: &Row) -> StoreResult<FirmwareJob> {
    Ok(FirmwareJob {
        job_id: text(row, "job_id")?,
        device_id: text(row, "device_id")?,
        version: text(row, "version")?,
        url: text(row, "url")?,
        sha256: text(row, "sha256")?,
        size: int64(row, "size")?,
        status: text(row, "status")?,
        error: opt_text(row, "error")?,
        created_by: text(row, "created_by")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

/// An enrollments row.
pub fn enrollment(row: &Row) -> StoreResult<StoredEnrollment> {
    Ok(StoredEnrollment {
        device_id: text(row, "device_id")?,
        request_id: text(row, "request_id")?,
        serial: text(row, "serial")?,
        response: json(row, "response")?,
        created_at: time(row, "created_at")?,
    })
}

/// The metadata of an existing device that a bulk import compares against.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingDevice {
    pub device_type: String,
    pub model: Option<String>,
    pub location: Option<String>,
    pub firmware_version: Option<String>,
    pub state: DeviceState,
}

/// What a bulk import does with one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportAction {
    Insert,
    Unchanged,
    Update,
    Skip,
}

/// Decide a bulk import row: new devices are inserted; identical metadata is left as is;
/// a `pending` device gets the new metadata; a device past `pending` is never touched.
pub fn import_action(existing: Option<&ExistingDevice>, new: &NewDevice) -> ImportAction {
    let Some(existing) = existing else {
        return ImportAction::Insert;
    };
    let same = existing.device_type == new.device_type
        && existing.model == new.model
        && existing.location == new.location
        && existing.firmware_version == new.firmware_version;
    if same {
        ImportAction::Unchanged
    } else if existing.state == DeviceState::Pending {
        ImportAction::Update
    } else {
        ImportAction::Skip
    }
}

/// The comparison columns of an import lookup.
pub fn existing_device(row: &Row) -> StoreResult<ExistingDevice> {
    Ok(ExistingDevice {
        device_type: text(row, "device_type")?,
        model: opt_text(row, "model")?,
        location: opt_text(row, "location")?,
        firmware_version: opt_text(row, "firmware_version")?,
        state: text(row, "state")?.parse::<DeviceState>()?,
    })
}

/// `count_by_state` rows folded into one entry per state (zero where absent), in
/// [`DeviceState::ALL`] order.
pub fn fold_counts(rows: &[(DeviceState, i64)]) -> Vec<(DeviceState, i64)> {
    DeviceState::ALL
        .into_iter()
        .map(|state| {
            let n = rows
                .iter()
                .filter(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .sum();
            (state, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use tiberius::{ColumnData, ColumnType};
    use time::macros::datetime;

    fn s(v: &str) -> ColumnData<'static> {
        ColumnData::String(Some(Cow::Owned(v.to_owned())))
    }
    fn null_s() -> ColumnData<'static> {
        ColumnData::String(None)
    }
    fn dt(v: OffsetDateTime) -> ColumnData<'static> {
        use tiberius::ToSql;
        let at = to_db_time(v);
        match at.to_sql() {
            ColumnData::DateTime2(d) => ColumnData::DateTime2(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    fn null_dt() -> ColumnData<'static> {
        ColumnData::DateTime2(None)
    }

    #[test]
    fn time_round_trip_is_utc_and_microsecond_precise() {
        let at = datetime!(2026-11-28 09:10:11.123456789 +02:00);
        let db = to_db_time(at);
        assert_eq!(db, time::macros::datetime!(2026-11-28 07:10:11.123456));
        let back = from_db_time(db);
        assert_eq!(back.offset(), UtcOffset::UTC);
        assert_eq!(back, datetime!(2026-11-28 07:10:11.123456 UTC));
        // and through the wire representation tiberius uses
        let row = Row::builder()
            .column("t", ColumnType::Datetime2, dt(at))
            .build();
        assert_eq!(time(&row, "t").expect("time"), back);
    }

    #[test]
    fn absent_values_become_null_literals() {
        let sql = "VALUES (@P1, CAST(@P3 AS nvarchar(10)), CAST(@P10 AS datetime2(7)), @P1)";
        assert!(matches!(
            null_slots(sql, [(3, false)]),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            null_slots(sql, [(1, true), (3, false), (10, true)]),
            "VALUES (NULL, CAST(@P3 AS nvarchar(10)), CAST(NULL AS datetime2(7)), NULL)"
        );
        assert_eq!(
            null_slots(sql, [(3, true)]),
            "VALUES (@P1, CAST(NULL AS nvarchar(10)), CAST(@P10 AS datetime2(7)), @P1)"
        );
        assert_eq!(null_slots("a @P", [(1, true)]), "a @P");
    }

    #[test]
    fn json_columns() {
        assert_eq!(
            parse_json("body", r#"{"a":[1,2]}"#).expect("json"),
            serde_json::json!({"a":[1,2]})
        );
        let err = parse_json("body", "{not json").expect_err("corrupt");
        assert!(matches!(err, StoreError::Corrupt(_)));
        assert!(err.to_string().contains("body"));
        let v = serde_json::json!({"k": "é\u{1F600}", "n": null});
        assert_eq!(parse_json("x", &json_text(&v)).expect("round trip"), v);
    }

    fn device_row(state: &str, kind: Option<&str>) -> Row {
        let at = datetime!(2026-01-02 03:04:05.000006 UTC);
        Row::builder()
            .column("id", ColumnType::NVarchar, s("dev-1"))
            .column("device_type", ColumnType::NVarchar, s("thermostat"))
            .column("model", ColumnType::NVarchar, s("T-1000"))
            .column("location", ColumnType::NVarchar, null_s())
            .column("firmware_version", ColumnType::NVarchar, s("1.4.2"))
            .column("state", ColumnType::NVarchar, s(state))
            .column(
                "credential_kind",
                ColumnType::NVarchar,
                kind.map(s).unwrap_or_else(null_s),
            )
            .column("current_serial", ColumnType::NVarchar, s("0a1b"))
            .column("generation", ColumnType::Int8, ColumnData::I64(Some(3)))
            .column("created_at", ColumnType::Datetime2, dt(at))
            .column("updated_at", ColumnType::Datetime2, dt(at))
            .column("enrolled_at", ColumnType::Datetime2, dt(at))
            .column("activated_at", ColumnType::Datetime2, null_dt())
            .column("activation_deadline", ColumnType::Datetime2, dt(at))
            .column("last_error", ColumnType::NVarchar, null_s())
            .column("factory_issuer", ColumnType::NVarchar, s("CN=maker"))
            .column("factory_serial", ColumnType::NVarchar, null_s())
            .build()
    }

    #[test]
    fn device_row_mapping() {
        let d = device(&device_row("enrolling", Some("certificate"))).expect("maps");
        assert_eq!(d.id, "dev-1");
        assert_eq!(d.state, DeviceState::Enrolling);
        assert_eq!(d.credential_kind, Some(CredentialKind::Certificate));
        assert_eq!(d.location, None);
        assert_eq!(d.generation, 3);
        assert_eq!(d.activated_at, None);
        assert_eq!(d.factory_issuer.as_deref(), Some("CN=maker"));
        assert_eq!(d.factory_serial, None);
        assert_eq!(
            d.activation_deadline,
            Some(datetime!(2026-01-02 03:04:05.000006 UTC))
        );
        let d = device(&device_row("active", None)).expect("maps");
        assert_eq!(d.credential_kind, None);
        for state in DeviceState::ALL {
            assert_eq!(
                device(&device_row(state.as_str(), None))
                    .expect("maps")
                    .state,
                state
            );
        }
    }

    #[test]
    fn unknown_state_or_kind_is_corrupt() {
        assert!(matches!(
            device(&device_row("zombie", None)),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            device(&device_row("active", Some("token"))),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn null_in_required_column_or_wrong_type_is_corrupt() {
        let row = Row::builder()
            .column("id", ColumnType::NVarchar, null_s())
            .build();
        assert!(matches!(text(&row, "id"), Err(StoreError::Corrupt(_))));
        let row = Row::builder()
            .column("id", ColumnType::Int4, ColumnData::I32(Some(1)))
            .build();
        assert!(matches!(text(&row, "id"), Err(StoreError::Corrupt(_))));
        assert_eq!(int32(&row, "id").expect("int"), 1);
        assert!(matches!(text(&row, "missing"), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn credential_row_mapping() {
        let at = datetime!(2026-01-02 03:04:05 UTC);
        let row = Row::builder()
            .column("serial", ColumnType::NVarchar, s("ab12"))
            .column(
                "fingerprint",
                ColumnType::BigVarBin,
                ColumnData::Binary(Some(Cow::Owned(vec![7; 32]))),
            )
            .column("device_id", ColumnType::NVarchar, s("dev-1"))
            .column("kind", ColumnType::NVarchar, s("password"))
            .column(
                "password_hash",
                ColumnType::NVarchar,
                s("sha256$c2FsdA==$aGFzaA=="),
            )
            .column("not_after", ColumnType::Datetime2, null_dt())
            .column("created_at", ColumnType::Datetime2, dt(at))
            .column("activated_at", ColumnType::Datetime2, null_dt())
            .column("revoked_at", ColumnType::Datetime2, dt(at))
            .column("revoke_reason", ColumnType::NVarchar, s("superseded"))
            .build();
        let c = credential(&row).expect("maps");
        assert_eq!(c.kind, CredentialKind::Password);
        assert_eq!(c.fingerprint, vec![7; 32]);
        assert!(c.is_revoked());
        assert_eq!(c.revoke_reason.as_deref(), Some("superseded"));
        assert_eq!(c.not_after, None);
    }

    #[test]
    fn config_event_enrollment_and_firmware_rows() {
        let at = datetime!(2026-05-06 07:08:09 UTC);
        let row = Row::builder()
            .column("device_id", ColumnType::NVarchar, s("dev-1"))
            .column("version", ColumnType::Int8, ColumnData::I64(Some(2)))
            .column("body", ColumnType::NVarchar, s(r#"{"version":2}"#))
            .column("created_by", ColumnType::NVarchar, s("gateway"))
            .column("created_at", ColumnType::Datetime2, dt(at))
            .column("applied_at", ColumnType::Datetime2, null_dt())
            .column("failed_error", ColumnType::NVarchar, s("bad mode"))
            .build();
        let c = config(&row).expect("config");
        assert_eq!(c.version, 2);
        assert_eq!(c.body, serde_json::json!({"version": 2}));
        assert_eq!(c.failed_error.as_deref(), Some("bad mode"));

        let row = Row::builder()
            .column("id", ColumnType::Int8, ColumnData::I64(Some(9)))
            .column("device_id", ColumnType::NVarchar, s("dev-1"))
            .column("occurred_at", ColumnType::Datetime2, dt(at))
            .column("event_name", ColumnType::NVarchar, s("activated"))
            .column("detail", ColumnType::NVarchar, s(r#"{"serial":"ab"}"#))
            .column("actor", ColumnType::NVarchar, s("device"))
            .column("request_id", ColumnType::NVarchar, null_s())
            .build();
        let e = event(&row).expect("event");
        assert_eq!(e.event, "activated");
        assert_eq!(e.at, at);
        assert_eq!(e.detail["serial"], "ab");
        assert_eq!(e.request_id, None);

        let row = Row::builder()
            .column("device_id", ColumnType::NVarchar, s("dev-1"))
            .column("request_id", ColumnType::NVarchar, s("r-1"))
            .column("serial", ColumnType::NVarchar, s("ab"))
            .column(
                "response",
                ColumnType::NVarchar,
                s(r#"{"status":"accepted"}"#),
            )
            .column("created_at", ColumnType::Datetime2, dt(at))
            .build();
        let en = enrollment(&row).expect("enrollment");
        assert_eq!(en.response["status"], "accepted");

        let row = Row::builder()
            .column("job_id", ColumnType::NVarchar, s("3f2c"))
            .column("device_id", ColumnType::NVarchar, s("dev-1"))
            .column("version", ColumnType::NVarchar, s("2.0.0"))
            .column("url", ColumnType::NVarchar, s("https://fw/x.bin"))
            .column("sha256", ColumnType::NVarchar, s("00ff"))
            .column("size", ColumnType::Int8, ColumnData::I64(Some(1024)))
            .column("status", ColumnType::NVarchar, s("queued"))
            .column("error", ColumnType::NVarchar, null_s())
            .column("created_by", ColumnType::NVarchar, s("alice"))
            .column("created_at", ColumnType::Datetime2, dt(at))
            .column("updated_at", ColumnType::Datetime2, dt(at))
            .build();
        let f = firmware_job(&row).expect("job");
        assert_eq!(f.size, 1024);
        assert_eq!(f.error, None);
    }

    fn new_device() -> NewDevice {
        NewDevice {
            id: "d".into(),
            device_type: "thermostat".into(),
            model: Some("T".into()),
            location: None,
            firmware_version: None,
        }
    }

    #[test]
    fn import_decisions() {
        let n = new_device();
        assert_eq!(import_action(None, &n), ImportAction::Insert);
        let mut existing = ExistingDevice {
            device_type: "thermostat".into(),
            model: Some("T".into()),
            location: None,
            firmware_version: None,
            state: DeviceState::Active,
        };
        assert_eq!(import_action(Some(&existing), &n), ImportAction::Unchanged);
        existing.location = Some("here".into());
        assert_eq!(import_action(Some(&existing), &n), ImportAction::Skip);
        existing.state = DeviceState::Pending;
        assert_eq!(import_action(Some(&existing), &n), ImportAction::Update);
    }

    #[test]
    fn counts_cover_every_state() {
        let folded = fold_counts(&[(DeviceState::Active, 4), (DeviceState::Pending, 1)]);
        assert_eq!(folded.len(), DeviceState::ALL.len());
        assert_eq!(folded[0], (DeviceState::Pending, 1));
        assert!(folded.contains(&(DeviceState::Active, 4)));
        assert!(folded.contains(&(DeviceState::Revoked, 0)));
    }
}
