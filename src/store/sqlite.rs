//! Embedded SQLite backend.
//!
//! One file, opened in WAL mode: a single writer connection owned by its own thread (SQLite
//! allows one writer at a time anyway; see [`writer`]) and a small pool of read-only connections,
//! so reads never wait for a write to finish. rusqlite is synchronous: a lookup of one row by its
//! key runs on the calling task when a reader is idle (an index seek, tens of microseconds,
//! cheaper than handing it to another thread), every other read on Tokio's blocking pool.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, which takes the write lock up front: a
//! second process sharing the file waits (up to `busy_timeout`) instead of failing half-way.
//! Writes queued at the same time share one transaction, each under its own savepoint, and are
//! answered after its COMMIT.
//!
//! Timestamps are stored as INTEGER unix microseconds (UTC); values are truncated to whole
//! microseconds on write, so what is read back equals what was written at that precision.
//! JSON documents are stored as TEXT.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Row, TransactionBehavior};

use super::*;
use crate::config::StoreConfig;
use writer::Writer;

mod writer;

/// Prepared statements kept per connection (the writer uses a few dozen distinct statements).
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// `created_by` of the configuration version written by an enrollment.
const GATEWAY: &str = "gateway";

/// One schema migration: applied once, in order, each in its own transaction.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The schema, oldest first. Never edit a released entry: append a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial schema",
        sql: r#"
CREATE TABLE devices (
    id                  TEXT    NOT NULL PRIMARY KEY,
    device_type         TEXT    NOT NULL,
    model               TEXT,
    location            TEXT,
    firmware_version    TEXT,
    state               TEXT    NOT NULL
        CHECK (state IN ('pending', 'enrolling', 'active', 'failed', 'revoked')),
    credential_kind     TEXT,
    current_serial      TEXT,
    generation          INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    enrolled_at         INTEGER,
    activated_at        INTEGER,
    activation_deadline INTEGER,
    last_error          TEXT
);

CREATE TABLE credentials (
    serial        TEXT    NOT NULL PRIMARY KEY,
    fingerprint   BLOB    NOT NULL,
    device_id     TEXT    NOT NULL REFERENCES devices (id),
    kind          TEXT    NOT NULL,
    password_hash TEXT,
    not_after     INTEGER,
    created_at    INTEGER NOT NULL,
    activated_at  INTEGER,
    revoked_at    INTEGER,
    revoke_reason TEXT
);

CREATE TABLE device_configs (
    device_id    TEXT    NOT NULL REFERENCES devices (id),
    version      INTEGER NOT NULL,
    body         TEXT    NOT NULL,
    created_by   TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    applied_at   INTEGER,
    failed_error TEXT,
    PRIMARY KEY (device_id, version)
) WITHOUT ROWID;

CREATE TABLE enrollments (
    device_id  TEXT    NOT NULL REFERENCES devices (id),
    request_id TEXT    NOT NULL,
    serial     TEXT    NOT NULL,
    response   TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (device_id, request_id)
);

-- No foreign key on device_id: refused connects and enrollments of unknown ids are audited too.
CREATE TABLE onboarding_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id  TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    event      TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    request_id TEXT
);

CREATE TABLE firmware_jobs (
    job_id     TEXT    NOT NULL PRIMARY KEY,
    device_id  TEXT    NOT NULL REFERENCES devices (id),
    version    TEXT    NOT NULL,
    url        TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    status     TEXT    NOT NULL,
    error      TEXT,
    created_by TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE admin_replies (
    request_id TEXT    NOT NULL PRIMARY KEY,
    reply      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        name: "lookup indexes",
        sql: r#"
CREATE INDEX devices_by_state ON devices (state, id);
CREATE INDEX devices_by_type ON devices (device_type, id);
CREATE INDEX credentials_by_device ON credentials (device_id, created_at);
CREATE INDEX credentials_revoked ON credentials (serial) WHERE revoked_at IS NOT NULL;
CREATE INDEX events_by_device ON onboarding_events (device_id, id);
CREATE INDEX firmware_jobs_by_device ON firmware_jobs (device_id, created_at);
"#,
    },
    Migration {
        version: 3,
        name: "factory issuer binding",
        sql: r#"
ALTER TABLE devices ADD COLUMN factory_issuer TEXT;
ALTER TABLE devices ADD COLUMN factory_serial TEXT;
"#,
    },
    Migration {
        version: 4,
        name: "change feed",
        sql: r#"
CREATE TABLE changes (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT    NOT NULL,
    kind      TEXT    NOT NULL CHECK (kind IN ('credentials', 'state', 'config', 'firmware')),
    origin    TEXT    NOT NULL,
    at        INTEGER NOT NULL
);
CREATE INDEX changes_by_time ON changes (at);
"#,
    },
];

/// The SQLite inventory. Cheap to share behind an `Arc`; safe to call from many tasks at once.
///
/// Beyond the trait's doc comments:
/// - bulk-imported devices start at generation 0;
/// - `commit_enrollment` refuses (Conflict) to move a `revoked` device back to `enrolling`, and
///   keeps stored metadata the request does not carry;
/// - audit events need no device row;
/// - conditional operations returning `Ok(false)` write nothing, not even their event;
/// - inserting a credential, config or firmware job for an unknown device is `NotFound`.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Stamped on the change-feed rows this instance writes.
    origin: String,
    writer: Writer,
    readers: ReaderPool,
}

/// A fixed set of read-only connections handed out one caller at a time.
struct ReaderPool {
    idle: Mutex<Vec<Connection>>,
    returned: Condvar,
    wait: Duration,
}

/// A reader borrowed from the pool; goes back on drop.
struct PooledReader<'a> {
    pool: &'a ReaderPool,
    conn: Option<Connection>,
}

impl ReaderPool {
    /// A reader if one is idle now; never waits.
    fn try_get(&self) -> Option<PooledReader<'_>> {
        let conn = lock(&self.idle).pop()?;
        Some(PooledReader {
            pool: self,
            conn: Some(conn),
        })
    }

    fn get(&self) -> StoreResult<PooledReader<'_>> {
        let mut idle = lock(&self.idle);
        loop {
            if let Some(conn) = idle.pop() {
                return Ok(PooledReader {
                    pool: self,
                    conn: Some(conn),
                });
            }
            let (guard, timeout) = self
                .returned
                .wait_timeout(idle, self.wait)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            idle = guard;
            if timeout.timed_out() && idle.is_empty() {
                return Err(StoreError::Unavailable(
                    "no sqlite reader connection became free in time".into(),
                ));
            }
        }
    }
}

impl PooledReader<'_> {
    fn conn(&self) -> StoreResult<&Connection> {
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Database("reader connection already returned".into()))
    }
}

impl Drop for PooledReader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            lock(&self.pool.idle).push(conn);
            self.pool.returned.notify_one();
        }
    }
}

/// Lock a mutex, recovering from poisoning: a panicking operation leaves no open transaction
/// behind (rusqlite rolls back on drop), so the connection is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// Open (creating parent directories and the file if needed) the database at `path`, set it
    /// up (WAL, `synchronous=NORMAL`, foreign keys, busy timeout from `query_timeout_ms`) and
    /// apply the migrations not applied yet. `pool_size` read-only connections are opened (at
    /// least one).
    pub async fn open(path: &Path, config: &StoreConfig) -> StoreResult<SqliteStore> {
        let path = path.to_path_buf();
        let busy = Duration::from_millis(config.query_timeout_ms.max(1));
        let readers = config.pool_size.max(1) as usize;
        let inner = tokio::task::spawn_blocking(move || open_blocking(path, busy, readers))
            .await
            .map_err(join_error)??;
        Ok(SqliteStore {
            inner: Arc::new(inner),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Migrations recorded in `schema_migrations`, oldest first: `(version, name)`.
    pub async fn applied_migrations(&self) -> StoreResult<Vec<(i64, String)>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT version, name FROM schema_migrations ORDER BY version")
                .map_err(map_err)?;
            let mut rows = stmt.query([]).map_err(map_err)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(map_err)? {
                out.push((get(row, 0)?, get(row, 1)?));
            }
            Ok(out)
        })
        .await
    }

    /// The newest schema version this build knows.
    pub fn latest_schema_version() -> i64 {
        MIGRATIONS.last().map_or(0, |m| m.version)
    }

    /// Run `f` on a pooled read-only connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let reader = inner.readers.get()?;
            f(reader.conn()?)
        })
        .await
        .map_err(join_error)?
    }

    /// Run `f`, a lookup of at most a few rows by key, on the calling task when a reader is idle
    /// (no hand-off to another thread); on the blocking pool otherwise.
    async fn lookup<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        if let Some(reader) = self.inner.readers.try_get() {
            return f(reader.conn()?);
        }
        self.read(f).await
    }

    /// Run `f` in a `BEGIN IMMEDIATE` transaction on the writer thread, under its own savepoint:
    /// kept when it returns `Ok`, rolled back otherwise; the result comes after the COMMIT.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.inner.writer.write(f).await
    }
}

fn open_blocking(path: PathBuf, busy: Duration, readers: usize) -> StoreResult<Inner> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
    }
    let mut writer = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(map_err)?;
    configure(&writer, busy)?;
    let mode: String = writer
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(map_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!(
            "{} cannot use WAL journal mode (got {mode})",
            path.display()
        )));
    }
    migrate(&mut writer)?;

    let mut idle = Vec::with_capacity(readers);
    for _ in 0..readers {
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(map_err)?;
        configure(&reader, busy)?;
        idle.push(reader);
    }
    Ok(Inner {
        path,
        origin: new_origin(),
        writer: Writer::spawn(writer)?,
        readers: ReaderPool {
            idle: Mutex::new(idle),
            returned: Condvar::new(),
            wait: busy,
        },
    })
}

/// Per-connection settings.
fn configure(conn: &Connection, busy: Duration) -> StoreResult<()> {
    conn.busy_timeout(busy).map_err(map_err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(map_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(map_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(())
}

/// Apply, in order, every migration not recorded in `schema_migrations`, each in its own
/// transaction (the check runs inside the transaction, so two processes opening the same file at
/// once apply nothing twice). Refuses a database written by a newer build.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let migration_err = |e: rusqlite::Error| StoreError::Migration(e.to_string());
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TEXT NOT NULL
        )",
    )
    .map_err(migration_err)?;
    let newest: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })
        .map_err(migration_err)?;
    let known = SqliteStore::latest_schema_version();
    if let Some(newest) = newest.filter(|v| *v > known) {
        return Err(StoreError::Migration(format!(
            "database schema version {newest} is newer than this build's ({known})"
        )));
    }
    for migration in MIGRATIONS {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(migration_err)?;
        let applied: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [migration.version],
                |row| row.get(0),
            )
            .map_err(migration_err)?;
        if applied {
            continue;
        }
        tx.execute_batch(migration.sql).map_err(|e| {
            StoreError::Migration(format!(
                "migration {} ({}): {e}",
                migration.version, migration.name
            ))
        })?;
        let applied_at = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![migration.version, migration.name, applied_at],
        )
        .map_err(migration_err)?;
        tx.commit().map_err(migration_err)?;
    }
    Ok(())
}

// ---- conversions ------------------------------------------------------------------------------

/// Map a rusqlite error to the store's error kinds.
fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi;
    use rusqlite::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed => StoreError::Unavailable(e.to_string()),
            ErrorCode::ConstraintViolation
                if failure.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    || failure.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE =>
            {
                StoreError::Conflict(e.to_string())
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        },
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Database(format!("store task failed: {e}"))
}

/// Unix microseconds (UTC), truncating anything finer.
fn micros(t: OffsetDateTime) -> StoreResult<i64> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000))
        .map_err(|_| StoreError::Database(format!("timestamp {t} out of range")))
}

fn micros_opt(t: Option<OffsetDateTime>) -> StoreResult<Option<i64>> {
    t.map(micros).transpose()
}

fn from_micros(v: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(v) * 1_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {v}: {e}")))
}

/// Current time, truncated to what the store keeps.
fn now() -> StoreResult<i64> {
    micros(OffsetDateTime::now_utc())
}

fn to_json(value: &serde_json::Value) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Database(format!("json: {e}")))
}

fn get<T: rusqlite::types::FromSql>(row: &Row<'_>, idx: usize) -> StoreResult<T> {
    row.get(idx).map_err(map_err)
}

fn get_ts(row: &Row<'_>, idx: usize) -> StoreResult<OffsetDateTime> {
    from_micros(get(row, idx)?)
}

fn get_ts_opt(row: &Row<'_>, idx: usize) -> StoreResult<Option<OffsetDateTime>> {
    get::<Option<i64>>(row, idx)?.map(from_micros).transpose()
}

fn get_json(row: &Row<'_>, idx: usize) -> StoreResult<serde_json::Value> {
    let text: String = get(row, idx)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("json column: {e}")))
}

/// Run a prepared query and convert every row.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    convert: impl Fn(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
    let mut rows = stmt.query(params).map_err(map_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(map_err)? {
        out.push(convert(row)?);
    }
    Ok(out)
}

/// Run a prepared query expected to return at most one row.
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    convert: impl Fn(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
    let mut rows = stmt.query(params).map_err(map_err)?;
    match rows.next().map_err(map_err)? {
        Some(row) => convert(row).map(Some),
        None => Ok(None),
    }
}

/// Run a prepared statement; returns the number of rows changed.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> StoreResult<usize> {
    conn.prepare_cached(sql)
        .map_err(map_err)?
        .execute(params)
        .map_err(map_err)
}

/// The device `id`.
fn device_by_id(conn: &Connection, id: &str) -> StoreResult<Option<Device>> {
    query_opt(
        conn,
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
        [id],
        device_from_row,
    )
}

/// The credential `serial`.
fn credential_by_serial(conn: &Connection, serial: &str) -> StoreResult<Option<Credential>> {
    query_opt(
        conn,
        &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE serial = ?1"),
        [serial],
        credential_from_row,
    )
}

/// The answer given to the enrollment request `(device_id, request_id)`.
fn enrollment_by_request(
    conn: &Connection,
    device_id: &str,
    request_id: &str,
) -> StoreResult<Option<StoredEnrollment>> {
    query_opt(
        conn,
        "SELECT device_id, request_id, serial, response, created_at FROM enrollments
          WHERE device_id = ?1 AND request_id = ?2",
        [device_id, request_id],
        |row| {
            Ok(StoredEnrollment {
                device_id: get(row, 0)?,
                request_id: get(row, 1)?,
                serial: get(row, 2)?,
                response: get_json(row, 3)?,
                created_at: get_ts(row, 4)?,
            })
        },
    )
}

const DEVICE_COLUMNS: &str = "id, device_type, model, location, firmware_version, state, \
     credential_kind, current_serial, generation, created_at, updated_at, enrolled_at, \
     activated_at, activation_deadline, last_error, factory_issuer, factory_serial";

fn device_from_row(row: &Row<'_>) -> StoreResult<Device> {
    Ok(Device {
        id: get(row, 0)?,
        device_type: get(row, 1)?,
        model: get(row, 2)?,
        location: get(row, 3)?,
        firmware_version: get(row, 4)?,
        state: get::<String>(row, 5)?.parse()?,
        credential_kind: get::<Option<String>>(row, 6)?
            .map(|s| s.parse())
            .transpose()?,
        current_serial: get(row, 7)?,
        generation: get(row, 8)?,
        created_at: get_ts(row, 9)?,
        updated_at: get_ts(row, 10)?,
        enrolled_at: get_ts_opt(row, 11)?,
        activated_at: get_ts_opt(row, 12)?,
        activation_deadline: get_ts_opt(row, 13)?,
        last_error: get(row, 14)?,
        factory_issuer: get(row, 15)?,
        factory_serial: get(row, 16)?,
    })
}

const CREDENTIAL_COLUMNS: &str = "serial, fingerprint, device_id, kind, password_hash, not_after, \
     created_at, activated_at, revoked_at, revoke_reason";

fn credential_from_row(row: &Row<'_>) -> StoreResult<Credential> {
    Ok(Credential {
        serial: get(row, 0)?,
        fingerprint: get(row, 1)?,
        device_id: get(row, 2)?,
        kind: get::<String>(row, 3)?.parse()?,
        password_hash: get(row, 4)?,
        not_after: get_ts_opt(row, 5)?,
        created_at: get_ts(row, 6)?,
        activated_at: get_ts_opt(row, 7)?,
        revoked_at: get_ts_opt(row, 8)?,
        revoke_reason: get(row, 9)?,
    })
}

const CONFIG_COLUMNS: &str =
    "device_id, version, body, created_by, created_at, applied_at, failed_error";

fn config_from_row(row: &Row<'_>) -> StoreResult<DeviceConfig> {
    Ok(DeviceConfig {
        device_id: get(row, 0)?,
        version: get(row, 1)?,
        body: get_json(row, 2)?,
        created_by: get(row, 3)?,
        created_at: get_ts(row, 4)?,
        applied_at: get_ts_opt(row, 5)?,
        failed_error: get(row, 6)?,
    })
}

const EVENT_COLUMNS: &str = "device_id, at, event, detail, actor, request_id";

fn event_from_row(row: &Row<'_>) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        device_id: get(row, 0)?,
        at: get_ts(row, 1)?,
        event: get(row, 2)?,
        detail: get_json(row, 3)?,
        actor: get(row, 4)?,
        request_id: get(row, 5)?,
    })
}

const FIRMWARE_COLUMNS: &str = "job_id, device_id, version, url, sha256, size, status, error, \
     created_by, created_at, updated_at";

fn firmware_from_row(row: &Row<'_>) -> StoreResult<FirmwareJob> {
    Ok(FirmwareJob {
        job_id: get(row, 0)?,
        device_id: get(row, 1)?,
        version: get(row, 2)?,
        url: get(row, 3)?,
        sha256: get(row, 4)?,
        size: get(row, 5)?,
        status: get(row, 6)?,
        error: get(row, 7)?,
        created_by: get(row, 8)?,
        created_at: get_ts(row, 9)?,
        updated_at: get_ts(row, 10)?,
    })
}

// ---- statements shared by several operations ---------------------------------------------------

fn insert_event(conn: &Connection, event: &AuditEvent) -> StoreResult<()> {
    exec(
        conn,
        "INSERT INTO onboarding_events (device_id, at, event, detail, actor, request_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            event.device_id,
            micros(event.at)?,
            event.event,
            to_json(&event.detail)?,
            event.actor,
            event.request_id
        ],
    )?;
    Ok(())
}

/// Announce a change of `device_id` on the change feed (in the caller's transaction).
fn insert_change(
    conn: &Connection,
    origin: &str,
    device_id: &str,
    kind: ChangeKind,
) -> StoreResult<()> {
    exec(
        conn,
        "INSERT INTO changes (device_id, kind, origin, at) VALUES (?1, ?2, ?3, ?4)",
        params![device_id, kind.as_str(), origin, now()?],
    )?;
    Ok(())
}

/// Revoke every unrevoked credential of a device (announced on the change feed); returns
/// their serials, sorted.
fn revoke_all_tx(
    tx: &Connection,
    origin: &str,
    device_id: &str,
    reason: &str,
) -> StoreResult<Vec<String>> {
    let serials = query_all(
        tx,
        "SELECT serial FROM credentials WHERE device_id = ?1 AND revoked_at IS NULL
          ORDER BY serial",
        [device_id],
        |row| get::<String>(row, 0),
    )?;
    if serials.is_empty() {
        return Ok(serials);
    }
    exec(
        tx,
        "UPDATE credentials SET revoked_at = ?3, revoke_reason = ?2
          WHERE device_id = ?1 AND revoked_at IS NULL",
        params![device_id, reason, now()?],
    )?;
    insert_change(tx, origin, device_id, ChangeKind::Credentials)?;
    Ok(serials)
}

/// The device a credential belongs to, if any.
fn credential_owner(conn: &Connection, serial: &str) -> StoreResult<Option<String>> {
    query_opt(
        conn,
        "SELECT device_id FROM credentials WHERE serial = ?1",
        [serial],
        |row| get::<String>(row, 0),
    )
}

fn insert_credential_row(conn: &Connection, c: &Credential) -> StoreResult<()> {
    exec(
        conn,
        "INSERT INTO credentials (serial, fingerprint, device_id, kind, password_hash, not_after,
                                  created_at, activated_at, revoked_at, revoke_reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            c.serial,
            c.fingerprint,
            c.device_id,
            c.kind.as_str(),
            c.password_hash,
            micros_opt(c.not_after)?,
            micros(c.created_at)?,
            micros_opt(c.activated_at)?,
            micros_opt(c.revoked_at)?,
            c.revoke_reason
        ],
    )?;
    Ok(())
}

fn device_exists(conn: &Connection, id: &str) -> StoreResult<bool> {
    let mut stmt = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)")
        .map_err(map_err)?;
    stmt.query_row([id], |row| row.get(0)).map_err(map_err)
}

fn require_device(conn: &Connection, id: &str) -> StoreResult<()> {
    if device_exists(conn, id)? {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!("device {id}")))
    }
}

/// Insert the next configuration version of a device and return the new row.
fn insert_config_row(
    conn: &Connection,
    device_id: &str,
    body: &serde_json::Value,
    created_by: &str,
    at: i64,
) -> StoreResult<DeviceConfig> {
    let version: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM device_configs WHERE device_id = ?1",
        )
        .map_err(map_err)?
        .query_row([device_id], |row| row.get(0))
        .map_err(map_err)?;
    exec(
        conn,
        "INSERT INTO device_configs (device_id, version, body, created_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![device_id, version, to_json(body)?, created_by, at],
    )?;
    Ok(DeviceConfig {
        device_id: device_id.to_owned(),
        version,
        body: body.clone(),
        created_by: created_by.to_owned(),
        created_at: from_micros(at)?,
        applied_at: None,
        failed_error: None,
    })
}

/// The enrollment transaction; see [`Store::commit_enrollment`].
fn commit_enrollment_tx(
    tx: &Connection,
    origin: &str,
    commit: &EnrollmentCommit,
) -> StoreResult<EnrollmentCommitted> {
    let now = now()?;
    let credential = &commit.credential;
    if credential.device_id != commit.device_id {
        return Err(StoreError::Database(format!(
            "credential {} belongs to {}, not {}",
            credential.serial, credential.device_id, commit.device_id
        )));
    }
    let already: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM enrollments WHERE device_id = ?1 AND request_id = ?2)",
        )
        .map_err(map_err)?
        .query_row([&commit.device_id, &commit.request_id], |row| row.get(0))
        .map_err(map_err)?;
    if already {
        return Err(StoreError::Conflict(format!(
            "enrollment {} of {} already recorded",
            commit.request_id, commit.device_id
        )));
    }

    let deadline = micros(commit.activation_deadline)?;
    let (issuer, factory_serial) = match &commit.factory {
        Some(f) => (Some(f.issuer.as_str()), Some(f.serial.as_str())),
        None => (None, None),
    };
    let generation = match commit.expected_generation {
        None => {
            let inserted = exec(
                tx,
                "INSERT INTO devices (id, device_type, model, location, firmware_version, state,
                                      credential_kind, current_serial, generation, created_at,
                                      updated_at, enrolled_at, activated_at, activation_deadline,
                                      last_error, factory_issuer, factory_serial)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'enrolling', ?6, ?7, 1, ?8, ?8, ?8, NULL, ?9, NULL,
                         ?10, ?11)
                 ON CONFLICT (id) DO NOTHING",
                params![
                    commit.device_id,
                    commit.device_type,
                    commit.model,
                    commit.location,
                    commit.firmware_version,
                    credential.kind.as_str(),
                    credential.serial,
                    now,
                    deadline,
                    issuer,
                    factory_serial
                ],
            )?;
            if inserted != 1 {
                return Err(StoreError::Conflict(format!(
                    "device {} was created concurrently",
                    commit.device_id
                )));
            }
            1
        }
        Some(expected) => {
            // Metadata the request does not carry keeps its stored (e.g. imported) value. A
            // revoked device is never moved back to enrolling, even by a racing enrollment,
            // and a device bound to one factory issuer is never enrolled through another.
            let updated = exec(
                tx,
                "UPDATE devices
                    SET state = 'enrolling', generation = generation + 1, device_type = ?3,
                        model = COALESCE(?4, model), location = COALESCE(?5, location),
                        firmware_version = COALESCE(?6, firmware_version),
                        credential_kind = ?7, current_serial = ?8, updated_at = ?9,
                        enrolled_at = ?9, activated_at = NULL, activation_deadline = ?10,
                        last_error = NULL,
                        factory_serial = CASE WHEN factory_issuer IS NULL THEN ?12
                                              ELSE factory_serial END,
                        factory_issuer = COALESCE(factory_issuer, ?11)
                  WHERE id = ?1 AND generation = ?2 AND state <> 'revoked'
                    AND (factory_issuer IS NULL OR factory_issuer = ?11)",
                params![
                    commit.device_id,
                    expected,
                    commit.device_type,
                    commit.model,
                    commit.location,
                    commit.firmware_version,
                    credential.kind.as_str(),
                    credential.serial,
                    now,
                    deadline,
                    issuer,
                    factory_serial
                ],
            )?;
            if updated != 1 {
                return Err(StoreError::Conflict(format!(
                    "device {} is no longer at generation {expected} (or is revoked, or bound \
                     to another factory issuer)",
                    commit.device_id
                )));
            }
            expected + 1
        }
    };

    insert_credential_row(tx, credential)?;
    let config = insert_config_row(tx, &commit.device_id, &commit.config_body, GATEWAY, now)?;
    exec(
        tx,
        "INSERT INTO enrollments (device_id, request_id, serial, response, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            commit.device_id,
            commit.request_id,
            credential.serial,
            to_json(&commit.response)?,
            now
        ],
    )?;
    if let Some(reason) = &commit.revoke_others {
        let revoked = exec(
            tx,
            "UPDATE credentials SET revoked_at = ?3, revoke_reason = ?4
              WHERE device_id = ?1 AND serial <> ?2 AND revoked_at IS NULL",
            params![commit.device_id, credential.serial, now, reason],
        )?;
        if revoked > 0 {
            insert_change(tx, origin, &commit.device_id, ChangeKind::Credentials)?;
        }
    }
    insert_change(tx, origin, &commit.device_id, ChangeKind::Config)?;
    for event in &commit.events {
        insert_event(tx, event)?;
    }
    Ok(EnrollmentCommitted { config, generation })
}

/// The bulk import transaction; see [`Store::import_devices`].
fn import_tx(tx: &Connection, devices: &[NewDevice]) -> StoreResult<ImportOutcome> {
    let now = now()?;
    let mut outcome = ImportOutcome::default();
    for device in devices {
        let existing = query_opt(
            tx,
            "SELECT device_type, model, location, firmware_version, state FROM devices
              WHERE id = ?1",
            [&device.id],
            |row| {
                let same = get::<String>(row, 0)? == device.device_type
                    && get::<Option<String>>(row, 1)? == device.model
                    && get::<Option<String>>(row, 2)? == device.location
                    && get::<Option<String>>(row, 3)? == device.firmware_version;
                let state: DeviceState = get::<String>(row, 4)?.parse()?;
                Ok((same, state))
            },
        )?;
        match existing {
            None => {
                exec(
                    tx,
                    "INSERT INTO devices (id, device_type, model, location, firmware_version,
                                          state, generation, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
                    params![
                        device.id,
                        device.device_type,
                        device.model,
                        device.location,
                        device.firmware_version,
                        now
                    ],
                )?;
                outcome.inserted += 1;
            }
            Some((true, _)) => outcome.unchanged += 1,
            Some((false, DeviceState::Pending)) => {
                exec(
                    tx,
                    "UPDATE devices SET device_type = ?2, model = ?3, location = ?4,
                                        firmware_version = ?5, updated_at = ?6
                      WHERE id = ?1",
                    params![
                        device.id,
                        device.device_type,
                        device.model,
                        device.location,
                        device.firmware_version,
                        now
                    ],
                )?;
                outcome.updated += 1;
            }
            Some((false, _)) => outcome.skipped += 1,
        }
    }
    Ok(outcome)
}

fn list_devices_blocking(conn: &Connection, filter: &DeviceFilter) -> StoreResult<Vec<Device>> {
    let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices d WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(state) = filter.state {
        args.push(state.as_str().to_owned().into());
        sql.push_str(&format!(" AND d.state = ?{}", args.len()));
    }
    if let Some(device_type) = &filter.device_type {
        args.push(device_type.clone().into());
        sql.push_str(&format!(" AND d.device_type = ?{}", args.len()));
    }
    if let Some(before) = filter.expiring_before {
        args.push(micros(before)?.into());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM credentials c WHERE c.serial = d.current_serial \
               AND c.not_after IS NOT NULL AND c.not_after < ?{})",
            args.len()
        ));
    }
    sql.push_str(" ORDER BY d.id");
    if filter.limit.is_some() || filter.offset.is_some() {
        args.push(filter.limit.map_or(-1, i64::from).into());
        sql.push_str(&format!(" LIMIT ?{}", args.len()));
        args.push(i64::from(filter.offset.unwrap_or(0)).into());
        sql.push_str(&format!(" OFFSET ?{}", args.len()));
    }
    query_all(
        conn,
        &sql,
        rusqlite::params_from_iter(args),
        device_from_row,
    )
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Readable and writable: the write lock can be taken within `busy_timeout` (an empty
    /// IMMEDIATE transaction), so a file that is locked or read-only reports unreachable.
    async fn ping(&self) -> StoreResult<()> {
        self.read(|conn| {
            conn.prepare_cached("SELECT 1")
                .map_err(map_err)?
                .query_row([], |row| row.get::<_, i64>(0))
                .map_err(map_err)?;
            Ok(())
        })
        .await?;
        self.write(|_| Ok(())).await
    }

    // ---- devices ------------------------------------------------------------------------------

    async fn device(&self, id: &str) -> StoreResult<Option<Device>> {
        let id = id.to_owned();
        self.lookup(move |conn| device_by_id(conn, &id)).await
    }

    async fn list_devices(&self, filter: &DeviceFilter) -> StoreResult<Vec<Device>> {
        let filter = filter.clone();
        self.read(move |conn| list_devices_blocking(conn, &filter))
            .await
    }

    async fn count_by_state(&self) -> StoreResult<Vec<(DeviceState, i64)>> {
        self.read(|conn| {
            let counted = query_all(
                conn,
                "SELECT state, COUNT(*) FROM devices GROUP BY state",
                [],
                |row| {
                    Ok((
                        get::<String>(row, 0)?.parse::<DeviceState>()?,
                        get::<i64>(row, 1)?,
                    ))
                },
            )?;
            Ok(DeviceState::ALL
                .into_iter()
                .map(|state| {
                    let n = counted
                        .iter()
                        .find(|(s, _)| *s == state)
                        .map_or(0, |(_, n)| *n);
                    (state, n)
                })
                .collect())
        })
        .await
    }

    async fn import_devices(&self, devices: &[NewDevice]) -> StoreResult<ImportOutcome> {
        let devices = devices.to_vec();
        self.write(move |tx| import_tx(tx, &devices)).await
    }

    async fn transition(
        &self,
        id: &str,
        from: &[DeviceState],
        to: TransitionTarget,
        event: AuditEvent,
    ) -> StoreResult<Transition> {
        let id = id.to_owned();
        let from = transition_slots(from);
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            // Under BEGIN IMMEDIATE nobody writes between this read and the guarded UPDATE;
            // the read only names the state left (or found, on a conflict).
            let previous = query_opt(
                tx,
                "SELECT state FROM devices WHERE id = ?1",
                [&id],
                |row| get::<String>(row, 0)?.parse::<DeviceState>(),
            )?
            .ok_or_else(|| StoreError::NotFound(format!("device {id}")))?;
            let moved = exec(
                tx,
                "UPDATE devices
                    SET state = ?2, last_error = ?3, updated_at = ?4,
                        factory_issuer = CASE WHEN ?5 THEN NULL ELSE factory_issuer END,
                        factory_serial = CASE WHEN ?5 THEN NULL ELSE factory_serial END
                  WHERE id = ?1 AND state IN (?6, ?7, ?8, ?9, ?10)",
                params![
                    id,
                    to.state.as_str(),
                    to.last_error,
                    now()?,
                    to.release_factory,
                    from[0],
                    from[1],
                    from[2],
                    from[3],
                    from[4]
                ],
            )?;
            if moved == 0 {
                return Err(StoreError::WrongState {
                    device: id,
                    actual: previous,
                });
            }
            insert_change(tx, &origin, &id, ChangeKind::State)?;
            let revoked = match &to.revoke_credentials {
                Some(reason) => revoke_all_tx(tx, &origin, &id, reason)?,
                None => Vec::new(),
            };
            insert_event(tx, &event)?;
            Ok(Transition {
                from: previous,
                to: to.state,
                revoked,
            })
        })
        .await
    }

    async fn set_firmware_version(&self, id: &str, version: &str) -> StoreResult<()> {
        let id = id.to_owned();
        let version = version.to_owned();
        self.write(move |tx| {
            let n = exec(
                tx,
                "UPDATE devices SET firmware_version = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, version, now()?],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("device {id}")));
            }
            Ok(())
        })
        .await
    }

    // ---- enrollment ---------------------------------------------------------------------------

    async fn find_enrollment(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<Option<StoredEnrollment>> {
        let device_id = device_id.to_owned();
        let request_id = request_id.to_owned();
        self.lookup(move |conn| enrollment_by_request(conn, &device_id, &request_id))
            .await
    }

    async fn enrollment_context(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<(Option<StoredEnrollment>, Option<Device>)> {
        let device_id = device_id.to_owned();
        let request_id = request_id.to_owned();
        self.lookup(move |conn| {
            Ok((
                enrollment_by_request(conn, &device_id, &request_id)?,
                device_by_id(conn, &device_id)?,
            ))
        })
        .await
    }

    async fn commit_enrollment(
        &self,
        commit: EnrollmentCommit,
    ) -> StoreResult<EnrollmentCommitted> {
        let origin = self.inner.origin.clone();
        self.write(move |tx| commit_enrollment_tx(tx, &origin, &commit))
            .await
    }

    async fn pending_activations(&self) -> StoreResult<Vec<PendingActivation>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, current_serial, activation_deadline FROM devices
                  WHERE state = 'enrolling' AND current_serial IS NOT NULL
                    AND activation_deadline IS NOT NULL
                  ORDER BY activation_deadline, id",
                [],
                |row| {
                    Ok(PendingActivation {
                        device_id: get(row, 0)?,
                        serial: get(row, 1)?,
                        deadline: get_ts(row, 2)?,
                    })
                },
            )
        })
        .await
    }

    async fn activate(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let device_id = device_id.to_owned();
        let serial = serial.to_owned();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            let now = now()?;
            let moved = exec(
                tx,
                "UPDATE devices SET state = 'active', activated_at = ?3, updated_at = ?3
                  WHERE id = ?1 AND state = 'enrolling' AND current_serial = ?2",
                params![device_id, serial, now],
            )?;
            if moved == 0 {
                return Ok(false);
            }
            exec(
                tx,
                "UPDATE credentials SET activated_at = COALESCE(activated_at, ?2)
                  WHERE serial = ?1",
                params![serial, now],
            )?;
            let superseded = exec(
                tx,
                "UPDATE credentials SET revoked_at = ?3, revoke_reason = 'superseded'
                  WHERE device_id = ?1 AND serial <> ?2 AND revoked_at IS NULL",
                params![device_id, serial, now],
            )?;
            if superseded > 0 {
                insert_change(tx, &origin, &device_id, ChangeKind::Credentials)?;
            }
            insert_event(tx, &event)?;
            Ok(true)
        })
        .await
    }

    async fn expire_enrollment(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let device_id = device_id.to_owned();
        let serial = serial.to_owned();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            let now = now()?;
            let moved = exec(
                tx,
                "UPDATE devices SET state = 'failed', last_error = 'activation_timeout',
                                    updated_at = ?3
                  WHERE id = ?1 AND state = 'enrolling' AND current_serial = ?2",
                params![device_id, serial, now],
            )?;
            if moved == 0 {
                return Ok(false);
            }
            exec(
                tx,
                "UPDATE credentials SET revoked_at = ?2, revoke_reason = 'activation_timeout'
                  WHERE serial = ?1 AND revoked_at IS NULL",
                params![serial, now],
            )?;
            insert_change(tx, &origin, &device_id, ChangeKind::Credentials)?;
            insert_change(tx, &origin, &device_id, ChangeKind::State)?;
            insert_event(tx, &event)?;
            Ok(true)
        })
        .await
    }

    // ---- credentials --------------------------------------------------------------------------

    async fn credential(&self, serial: &str) -> StoreResult<Option<Credential>> {
        let serial = serial.to_owned();
        self.lookup(move |conn| credential_by_serial(conn, &serial))
            .await
    }

    async fn credential_and_device(
        &self,
        serial: &str,
        device_id: &str,
    ) -> StoreResult<(Option<Credential>, Option<Device>)> {
        let serial = serial.to_owned();
        let device_id = device_id.to_owned();
        self.lookup(move |conn| {
            Ok((
                credential_by_serial(conn, &serial)?,
                device_by_id(conn, &device_id)?,
            ))
        })
        .await
    }

    async fn credentials_of(&self, device_id: &str) -> StoreResult<Vec<Credential>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE device_id = ?1
                      ORDER BY created_at, rowid"
                ),
                [&device_id],
                credential_from_row,
            )
        })
        .await
    }

    async fn insert_credential(
        &self,
        credential: &Credential,
        event: AuditEvent,
    ) -> StoreResult<()> {
        let credential = credential.clone();
        self.write(move |tx| {
            require_device(tx, &credential.device_id)?;
            insert_credential_row(tx, &credential)?;
            insert_event(tx, &event)
        })
        .await
    }

    async fn mark_credential_used(&self, serial: &str) -> StoreResult<bool> {
        let serial = serial.to_owned();
        self.write(move |tx| {
            let n = exec(
                tx,
                "UPDATE credentials SET activated_at = ?2
                  WHERE serial = ?1 AND activated_at IS NULL",
                params![serial, now()?],
            )?;
            Ok(n > 0)
        })
        .await
    }

    async fn revoke_credential(&self, serial: &str, reason: &str) -> StoreResult<bool> {
        let serial = serial.to_owned();
        let reason = reason.to_owned();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            let n = exec(
                tx,
                "UPDATE credentials SET revoked_at = ?3, revoke_reason = ?2
                  WHERE serial = ?1 AND revoked_at IS NULL",
                params![serial, reason, now()?],
            )?;
            if n > 0 {
                if let Some(device_id) = credential_owner(tx, &serial)? {
                    insert_change(tx, &origin, &device_id, ChangeKind::Credentials)?;
                }
            }
            Ok(n > 0)
        })
        .await
    }

    async fn revoke_device_credentials(
        &self,
        device_id: &str,
        reason: &str,
    ) -> StoreResult<Vec<String>> {
        let device_id = device_id.to_owned();
        let reason = reason.to_owned();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            let serials = query_all(
                tx,
                "SELECT serial FROM credentials WHERE device_id = ?1 AND revoked_at IS NULL
                  ORDER BY created_at, rowid",
                [&device_id],
                |row| get::<String>(row, 0),
            )?;
            exec(
                tx,
                "UPDATE credentials SET revoked_at = ?3, revoke_reason = ?2
                  WHERE device_id = ?1 AND revoked_at IS NULL",
                params![device_id, reason, now()?],
            )?;
            if !serials.is_empty() {
                insert_change(tx, &origin, &device_id, ChangeKind::Credentials)?;
            }
            Ok(serials)
        })
        .await
    }

    async fn revoked_serials(&self) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT serial FROM credentials WHERE revoked_at IS NOT NULL ORDER BY serial",
                [],
                |row| get::<String>(row, 0),
            )
        })
        .await
    }

    // ---- configuration ------------------------------------------------------------------------

    async fn latest_config(&self, device_id: &str) -> StoreResult<Option<DeviceConfig>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                &format!(
                    "SELECT {CONFIG_COLUMNS} FROM device_configs WHERE device_id = ?1
                      ORDER BY version DESC LIMIT 1"
                ),
                [&device_id],
                config_from_row,
            )
        })
        .await
    }

    async fn config_version(
        &self,
        device_id: &str,
        version: i64,
    ) -> StoreResult<Option<DeviceConfig>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                &format!(
                    "SELECT {CONFIG_COLUMNS} FROM device_configs
                      WHERE device_id = ?1 AND version = ?2"
                ),
                params![device_id, version],
                config_from_row,
            )
        })
        .await
    }

    async fn config_history(&self, device_id: &str) -> StoreResult<Vec<DeviceConfig>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {CONFIG_COLUMNS} FROM device_configs WHERE device_id = ?1
                      ORDER BY version"
                ),
                [&device_id],
                config_from_row,
            )
        })
        .await
    }

    async fn published_configs(&self, after: &str, limit: u32) -> StoreResult<Vec<DeviceConfig>> {
        let after = after.to_owned();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT c.device_id, c.version, c.body, c.created_by, c.created_at, c.applied_at,
                        c.failed_error
                   FROM devices d
                   JOIN device_configs c ON c.device_id = d.id
                  WHERE d.state IN ('enrolling', 'active')
                    AND d.id > ?1
                    AND c.version = (SELECT MAX(version) FROM device_configs m
                                      WHERE m.device_id = d.id)
                  ORDER BY d.id
                  LIMIT ?2",
                rusqlite::params![after, limit],
                config_from_row,
            )
        })
        .await
    }

    async fn insert_config(
        &self,
        device_id: &str,
        body: serde_json::Value,
        created_by: &str,
        event: AuditEvent,
    ) -> StoreResult<DeviceConfig> {
        let device_id = device_id.to_owned();
        let created_by = created_by.to_owned();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            require_device(tx, &device_id)?;
            let config = insert_config_row(tx, &device_id, &body, &created_by, now()?)?;
            insert_change(tx, &origin, &device_id, ChangeKind::Config)?;
            insert_event(tx, &event)?;
            Ok(config)
        })
        .await
    }

    async fn ack_config(
        &self,
        device_id: &str,
        version: i64,
        failed_error: Option<&str>,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let device_id = device_id.to_owned();
        let failed_error = failed_error.map(str::to_owned);
        self.write(move |tx| {
            let n = match &failed_error {
                None => exec(
                    tx,
                    "UPDATE device_configs
                        SET applied_at = COALESCE(applied_at, ?3), failed_error = NULL
                      WHERE device_id = ?1 AND version = ?2",
                    params![device_id, version, now()?],
                )?,
                Some(error) => exec(
                    tx,
                    "UPDATE device_configs SET failed_error = ?3
                      WHERE device_id = ?1 AND version = ?2",
                    params![device_id, version, error],
                )?,
            };
            if n == 0 {
                return Ok(false);
            }
            insert_event(tx, &event)?;
            Ok(true)
        })
        .await
    }

    // ---- firmware -----------------------------------------------------------------------------

    async fn insert_firmware_job(&self, job: &FirmwareJob, event: AuditEvent) -> StoreResult<()> {
        let job = job.clone();
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            require_device(tx, &job.device_id)?;
            exec(
                tx,
                "INSERT INTO firmware_jobs (job_id, device_id, version, url, sha256, size, status,
                                            error, created_by, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    job.job_id,
                    job.device_id,
                    job.version,
                    job.url,
                    job.sha256,
                    job.size,
                    job.status,
                    job.error,
                    job.created_by,
                    micros(job.created_at)?,
                    micros(job.updated_at)?
                ],
            )?;
            insert_change(tx, &origin, &job.device_id, ChangeKind::Firmware)?;
            insert_event(tx, &event)
        })
        .await
    }

    async fn firmware_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> StoreResult<Option<FirmwareJob>> {
        let job_id = job_id.to_owned();
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                &format!(
                    "SELECT {FIRMWARE_COLUMNS} FROM firmware_jobs
                      WHERE job_id = ?1 AND device_id = ?2"
                ),
                [&job_id, &device_id],
                firmware_from_row,
            )
        })
        .await
    }

    async fn latest_firmware_job(&self, device_id: &str) -> StoreResult<Option<FirmwareJob>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                &format!(
                    "SELECT {FIRMWARE_COLUMNS} FROM firmware_jobs WHERE device_id = ?1
                      ORDER BY created_at DESC, rowid DESC LIMIT 1"
                ),
                [&device_id],
                firmware_from_row,
            )
        })
        .await
    }

    async fn advance_firmware_job(
        &self,
        job_id: &str,
        device_id: &str,
        status: JobStatus,
        error: Option<&str>,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let job_id = job_id.to_owned();
        let device_id = device_id.to_owned();
        let error = error.map(str::to_owned);
        let origin = self.inner.origin.clone();
        self.write(move |tx| {
            let from = status.predecessors();
            let n = exec(
                tx,
                "UPDATE firmware_jobs SET status = ?3, error = ?4, updated_at = ?5
                  WHERE job_id = ?1 AND device_id = ?2 AND status IN (?6, ?7, ?8, ?9)",
                params![
                    job_id,
                    device_id,
                    status.as_str(),
                    error,
                    now()?,
                    from[0],
                    from[1],
                    from[2],
                    from[3]
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            insert_change(tx, &origin, &device_id, ChangeKind::Firmware)?;
            insert_event(tx, &event)?;
            Ok(true)
        })
        .await
    }

    // ---- audit --------------------------------------------------------------------------------

    async fn append_event(&self, event: AuditEvent) -> StoreResult<()> {
        self.write(move |tx| insert_event(tx, &event)).await
    }

    async fn events(&self, device_id: &str, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        let device_id = device_id.to_owned();
        self.read(move |conn| {
            let mut events = query_all(
                conn,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM onboarding_events WHERE device_id = ?1
                      ORDER BY id DESC LIMIT ?2"
                ),
                params![device_id, i64::from(limit)],
                event_from_row,
            )?;
            events.reverse();
            Ok(events)
        })
        .await
    }

    async fn delete_events_before(&self, cutoff: OffsetDateTime, batch: u32) -> StoreResult<u64> {
        self.write(move |tx| {
            let deleted = exec(
                tx,
                "DELETE FROM onboarding_events WHERE id IN (
                   SELECT id FROM onboarding_events WHERE at < ?1 ORDER BY id LIMIT ?2)",
                params![micros(cutoff)?, i64::from(batch)],
            )?;
            Ok(deleted as u64)
        })
        .await
    }

    // ---- admin idempotency --------------------------------------------------------------------

    async fn record_admin_reply(
        &self,
        request_id: &str,
        reply: &serde_json::Value,
    ) -> StoreResult<bool> {
        let request_id = request_id.to_owned();
        let reply = to_json(reply)?;
        self.write(move |tx| {
            let n = exec(
                tx,
                "INSERT INTO admin_replies (request_id, reply, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (request_id) DO NOTHING",
                params![request_id, reply, now()?],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn admin_reply(&self, request_id: &str) -> StoreResult<Option<serde_json::Value>> {
        let request_id = request_id.to_owned();
        self.read(move |conn| {
            query_opt(
                conn,
                "SELECT reply FROM admin_replies WHERE request_id = ?1",
                [&request_id],
                |row| get_json(row, 0),
            )
        })
        .await
    }

    // ---- change feed --------------------------------------------------------------------------

    fn origin(&self) -> &str {
        &self.inner.origin
    }

    async fn latest_change(&self) -> StoreResult<i64> {
        self.read(|conn| {
            conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM changes")
                .map_err(map_err)?
                .query_row([], |row| row.get(0))
                .map_err(map_err)
        })
        .await
    }

    async fn changes_since(&self, cursor: i64, limit: u32) -> StoreResult<Vec<Change>> {
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id, device_id, kind, origin, at FROM changes WHERE id > ?1
                  ORDER BY id LIMIT ?2",
                params![cursor, i64::from(limit)],
                |row| {
                    Ok(Change {
                        id: get(row, 0)?,
                        device_id: get(row, 1)?,
                        kind: get::<String>(row, 2)?.parse()?,
                        origin: get(row, 3)?,
                        at: get_ts(row, 4)?,
                    })
                },
            )
        })
        .await
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> StoreResult<u64> {
        let before = micros(before)?;
        self.write(move |tx| {
            let n = exec(tx, "DELETE FROM changes WHERE at < ?1", [before])?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_strictly_ordered() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(versions.first(), Some(&1));
    }

    #[test]
    fn timestamps_round_trip_at_microsecond_precision() {
        let t = time::macros::datetime!(2026-11-28 07:10:00.123_456_789 UTC);
        let stored = micros(t).unwrap();
        assert_eq!(stored % 1_000_000, 123_456);
        let back = from_micros(stored).unwrap();
        assert_eq!(
            back,
            time::macros::datetime!(2026-11-28 07:10:00.123_456 UTC)
        );
        let before_epoch = time::macros::datetime!(1969-12-31 23:59:59.999_999_5 UTC);
        assert_eq!(
            from_micros(micros(before_epoch).unwrap()).unwrap(),
            time::macros::datetime!(1969-12-31 23:59:59.999_999 UTC)
        );
    }

    #[test]
    fn errors_map_to_store_kinds() {
        let failure = |code: i32| {
            rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some("x".into()))
        };
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_BUSY)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_LOCKED)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_IOERR)),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)),
            StoreError::Conflict(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)),
            StoreError::Conflict(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)),
            StoreError::Database(_)
        ));
        assert!(matches!(
            map_err(failure(rusqlite::ffi::SQLITE_ERROR)),
            StoreError::Database(_)
        ));
    }

    #[test]
    fn unknown_state_is_corrupt_not_a_panic() {
        assert!(matches!(
            "enrolled".parse::<DeviceState>(),
            Err(StoreError::Corrupt(_))
        ));
    }
}
