//! Versioned schema migrations, applied at connect under an application lock so that two
//! gateway instances starting at once never race.
//!
//! Every object lives in `dbo` with an `onboard_` prefix. Each migration runs in its own
//! transaction together with the row that records it in `dbo.onboard_schema_migrations`, so a
//! migration is either fully applied and recorded or not at all. Statements are sent one by
//! one (no multi-statement DDL batches) and use only T-SQL that SQL Server 2017+, Azure SQL and
//! Babelfish all accept: no `MERGE`, no `CREATE OR ALTER`.

use std::time::{Duration, Instant};

use super::conn::Connection;
use super::rows::int32;
use crate::store::{StoreError, StoreResult};

/// Name of the application lock serialising migrations across instances.
pub const LOCK_RESOURCE: &str = "onboard_schema";

/// One schema change.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    /// Statements run in order inside one transaction.
    pub statements: &'static [&'static str],
}

/// The table recording applied migrations.
pub const CREATE_MIGRATIONS_TABLE: &str =
    "IF OBJECT_ID(N'dbo.onboard_schema_migrations', N'U') IS NULL \
    CREATE TABLE dbo.onboard_schema_migrations (\
        version int NOT NULL CONSTRAINT pk_onboard_schema_migrations PRIMARY KEY, \
        name nvarchar(200) NOT NULL, \
        applied_at datetime2 NOT NULL)";

/// All migrations, in version order. Never edit an applied one: append a new version.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial schema",
    statements: &[
        // The inventory: one row per device.
        "CREATE TABLE dbo.onboard_devices (\
            id nvarchar(128) NOT NULL CONSTRAINT pk_onboard_devices PRIMARY KEY, \
            device_type nvarchar(128) NOT NULL, \
            model nvarchar(400) NULL, \
            location nvarchar(400) NULL, \
            firmware_version nvarchar(128) NULL, \
            state nvarchar(16) NOT NULL CONSTRAINT ck_onboard_devices_state \
                CHECK (state IN (N'pending', N'enrolling', N'active', N'failed', N'revoked')), \
            credential_kind nvarchar(16) NULL CONSTRAINT ck_onboard_devices_kind \
                CHECK (credential_kind IN (N'certificate', N'password')), \
            current_serial nvarchar(128) NULL, \
            generation bigint NOT NULL, \
            created_at datetime2 NOT NULL, \
            updated_at datetime2 NOT NULL, \
            enrolled_at datetime2 NULL, \
            activated_at datetime2 NULL, \
            activation_deadline datetime2 NULL, \
            last_error nvarchar(max) NULL)",
        "CREATE INDEX ix_onboard_devices_state ON dbo.onboard_devices (state) INCLUDE (device_type)",
        // Issued credentials; password credentials keep only a salted hash.
        "CREATE TABLE dbo.onboard_credentials (\
            serial nvarchar(128) NOT NULL CONSTRAINT pk_onboard_credentials PRIMARY KEY, \
            fingerprint varbinary(32) NOT NULL, \
            device_id nvarchar(128) NOT NULL, \
            kind nvarchar(16) NOT NULL CONSTRAINT ck_onboard_credentials_kind \
                CHECK (kind IN (N'certificate', N'password')), \
            password_hash nvarchar(400) NULL, \
            not_after datetime2 NULL, \
            created_at datetime2 NOT NULL, \
            activated_at datetime2 NULL, \
            revoked_at datetime2 NULL, \
            revoke_reason nvarchar(400) NULL)",
        "CREATE INDEX ix_onboard_credentials_device ON dbo.onboard_credentials (device_id)",
        "CREATE INDEX ix_onboard_credentials_fingerprint ON dbo.onboard_credentials (fingerprint)",
        // Plain (not filtered) index: filtered indexes make every write depend on the session's
        // ANSI_* / ARITHABORT settings, which differ between client libraries.
        "CREATE INDEX ix_onboard_credentials_revoked ON dbo.onboard_credentials (revoked_at)",
        // Configuration versions per device.
        "CREATE TABLE dbo.onboard_device_configs (\
            device_id nvarchar(128) NOT NULL, \
            version bigint NOT NULL, \
            body nvarchar(max) NOT NULL, \
            created_by nvarchar(128) NOT NULL, \
            created_at datetime2 NOT NULL, \
            applied_at datetime2 NULL, \
            failed_error nvarchar(max) NULL, \
            CONSTRAINT pk_onboard_device_configs PRIMARY KEY (device_id, version))",
        // Answered enrollments, for idempotent retries.
        "CREATE TABLE dbo.onboard_enrollments (\
            device_id nvarchar(128) NOT NULL, \
            request_id nvarchar(128) NOT NULL, \
            serial nvarchar(128) NOT NULL, \
            response nvarchar(max) NOT NULL, \
            created_at datetime2 NOT NULL, \
            CONSTRAINT pk_onboard_enrollments PRIMARY KEY (device_id, request_id))",
        // The audit log.
        "CREATE TABLE dbo.onboard_events (\
            id bigint IDENTITY(1,1) NOT NULL CONSTRAINT pk_onboard_events PRIMARY KEY, \
            device_id nvarchar(128) NOT NULL, \
            occurred_at datetime2 NOT NULL, \
            event_name nvarchar(64) NOT NULL, \
            detail nvarchar(max) NOT NULL, \
            actor nvarchar(128) NOT NULL, \
            request_id nvarchar(128) NULL)",
        "CREATE INDEX ix_onboard_events_device_at ON dbo.onboard_events (device_id, occurred_at, id)",
        // Firmware update jobs; `seq` orders jobs of one device by creation.
        "CREATE TABLE dbo.onboard_firmware_jobs (\
            job_id nvarchar(64) NOT NULL CONSTRAINT pk_onboard_firmware_jobs PRIMARY KEY, \
            seq bigint IDENTITY(1,1) NOT NULL, \
            device_id nvarchar(128) NOT NULL, \
            version nvarchar(128) NOT NULL, \
            url nvarchar(2048) NOT NULL, \
            sha256 nvarchar(128) NOT NULL, \
            size bigint NOT NULL, \
            status nvarchar(32) NOT NULL, \
            error nvarchar(max) NULL, \
            created_by nvarchar(128) NOT NULL, \
            created_at datetime2 NOT NULL, \
            updated_at datetime2 NOT NULL)",
        "CREATE INDEX ix_onboard_firmware_jobs_device ON dbo.onboard_firmware_jobs (device_id, seq)",
        // Replies to admin commands, for idempotent retries.
        "CREATE TABLE dbo.onboard_admin_replies (\
            request_id nvarchar(256) NOT NULL CONSTRAINT pk_onboard_admin_replies PRIMARY KEY, \
            reply nvarchar(max) NOT NULL, \
            created_at datetime2 NOT NULL)",
    ],
}];

/// Tables dropped by `drop_schema`, children first.
pub const DROP_STATEMENTS: &[&str] = &[
    "DROP TABLE IF EXISTS dbo.onboard_admin_replies",
    "DROP TABLE IF EXISTS dbo.onboard_firmware_jobs",
    "DROP TABLE IF EXISTS dbo.onboard_events",
    "DROP TABLE IF EXISTS dbo.onboard_enrollments",
    "DROP TABLE IF EXISTS dbo.onboard_device_configs",
    "DROP TABLE IF EXISTS dbo.onboard_credentials",
    "DROP TABLE IF EXISTS dbo.onboard_devices",
    "DROP TABLE IF EXISTS dbo.onboard_schema_migrations",
];

/// The migrations not yet in `applied`, in version order.
pub fn pending<'m>(migrations: &'m [Migration], applied: &[i32]) -> Vec<&'m Migration> {
    let mut todo: Vec<&Migration> = migrations
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect();
    todo.sort_by_key(|m| m.version);
    todo
}

/// What an `sp_getapplock` return code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// 0 (granted at once) or 1 (granted after waiting).
    Granted,
    /// -1 (timed out) or -3 (chosen as deadlock victim): try again.
    Retry,
    /// -2 (cancelled), -999 (parameter or call error), anything else negative.
    Failed,
}

/// Interpret an `sp_getapplock` return code.
pub fn lock_outcome(code: i32) -> LockOutcome {
    match code {
        c if c >= 0 => LockOutcome::Granted,
        -1 | -3 => LockOutcome::Retry,
        _ => LockOutcome::Failed,
    }
}

const GET_LOCK: &str = "DECLARE @result int; \
    EXEC @result = sp_getapplock @Resource = N'onboard_schema', @LockMode = N'Exclusive', \
        @LockOwner = N'Session', @LockTimeout = @P1; \
    SELECT @result AS result";

const RELEASE_LOCK: &str =
    "EXEC sp_releaseapplock @Resource = N'onboard_schema', @LockOwner = N'Session'";

const RECORD_MIGRATION: &str =
    "INSERT INTO dbo.onboard_schema_migrations (version, name, applied_at) \
    VALUES (@P1, @P2, SYSUTCDATETIME())";

fn migration_error(what: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{what}: {m}")),
        other => StoreError::Migration(format!("{what}: {other}")),
    }
}

/// Take the schema lock on `conn` (a dedicated session), apply what is missing, release it.
/// `lock_wait` bounds the total time spent waiting for another instance's migrations.
pub async fn migrate(
    conn: &mut Connection,
    query_timeout: Duration,
    lock_wait: Duration,
) -> StoreResult<()> {
    acquire_lock(conn, query_timeout, lock_wait).await?;
    let result = apply_pending(conn).await;
    if let Err(e) = conn.execute("release schema lock", RELEASE_LOCK, &[]).await {
        // The lock is owned by this session; closing the session releases it anyway.
        tracing::warn!(error = %e, "could not release the schema lock");
    }
    result
}

async fn acquire_lock(
    conn: &mut Connection,
    query_timeout: Duration,
    lock_wait: Duration,
) -> StoreResult<()> {
    // Let the server give up before our own request timeout fires.
    let per_try_ms = (query_timeout.as_millis() * 3 / 4).clamp(100, i32::MAX as u128) as i32;
    let started = Instant::now();
    loop {
        let row = conn
            .query_opt("schema lock", GET_LOCK, &[&per_try_ms])
            .await
            .map_err(|e| migration_error("schema lock", e))?
            .ok_or_else(|| StoreError::Migration("sp_getapplock returned no result".into()))?;
        let code = int32(&row, "result").map_err(|e| migration_error("schema lock", e))?;
        match lock_outcome(code) {
            LockOutcome::Granted => return Ok(()),
            LockOutcome::Retry if started.elapsed() < lock_wait => {
                tracing::info!(
                    code,
                    "waiting for another instance to finish schema migrations"
                );
            }
            _ => {
                return Err(StoreError::Migration(format!(
                    "sp_getapplock on {LOCK_RESOURCE} returned {code}"
                )))
            }
        }
    }
}

async fn apply_pending(conn: &mut Connection) -> StoreResult<()> {
    conn.batch("create migrations table", CREATE_MIGRATIONS_TABLE)
        .await
        .map_err(|e| migration_error("create migrations table", e))?;
    let rows = conn
        .query(
            "read migrations",
            "SELECT m.version FROM dbo.onboard_schema_migrations m",
            &[],
        )
        .await
        .map_err(|e| migration_error("read migrations", e))?;
    let applied = rows
        .iter()
        .map(|r| int32(r, "version"))
        .collect::<StoreResult<Vec<i32>>>()?;
    let newest_known = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(newest) = applied.iter().copied().max().filter(|v| *v > newest_known) {
        tracing::warn!(
            schema_version = newest,
            known = newest_known,
            "the database schema is newer than this build"
        );
    }
    for migration in pending(MIGRATIONS, &applied) {
        let what = format!("migration {} ({})", migration.version, migration.name);
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applying schema migration"
        );
        conn.begin().await.map_err(|e| migration_error(&what, e))?;
        let result = run_statements(conn, migration).await;
        conn.finish(result)
            .await
            .map_err(|e| migration_error(&what, e))?;
    }
    Ok(())
}

async fn run_statements(conn: &mut Connection, migration: &Migration) -> StoreResult<()> {
    for statement in migration.statements {
        conn.batch("migration statement", statement).await?;
    }
    conn.execute(
        "record migration",
        RECORD_MIGRATION,
        &[&migration.version, &migration.name],
    )
    .await?;
    Ok(())
}

/// Drop every onboard table and the migrations table (test clean-up on a dedicated database).
pub async fn drop_all(conn: &mut Connection) -> StoreResult<()> {
    for statement in DROP_STATEMENTS {
        conn.batch("drop schema", statement).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_unique_and_increasing() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(versions, sorted);
        assert_eq!(versions.first(), Some(&1));
    }

    #[test]
    fn pending_skips_applied_versions() {
        assert_eq!(pending(MIGRATIONS, &[]).len(), MIGRATIONS.len());
        assert!(pending(MIGRATIONS, &[1]).is_empty());
        assert_eq!(pending(MIGRATIONS, &[99]).len(), MIGRATIONS.len());
    }

    #[test]
    fn lock_codes() {
        assert_eq!(lock_outcome(0), LockOutcome::Granted);
        assert_eq!(lock_outcome(1), LockOutcome::Granted);
        assert_eq!(lock_outcome(-1), LockOutcome::Retry);
        assert_eq!(lock_outcome(-3), LockOutcome::Retry);
        assert_eq!(lock_outcome(-2), LockOutcome::Failed);
        assert_eq!(lock_outcome(-999), LockOutcome::Failed);
    }

    #[test]
    fn ddl_avoids_non_portable_syntax() {
        let all: Vec<&str> = MIGRATIONS
            .iter()
            .flat_map(|m| m.statements.iter().copied())
            .chain([
                CREATE_MIGRATIONS_TABLE,
                GET_LOCK,
                RELEASE_LOCK,
                RECORD_MIGRATION,
            ])
            .chain(DROP_STATEMENTS.iter().copied())
            .collect();
        for sql in all {
            let upper = sql.to_ascii_uppercase();
            for banned in [
                "MERGE",
                "CREATE OR ALTER",
                "WAITFOR",
                "UPDLOCK",
                "HOLDLOCK",
                "ROWVERSION",
                "SERIALIZABLE",
            ] {
                assert!(!upper.contains(banned), "{banned} in {sql}");
            }
            assert!(
                upper.contains("DBO.") || upper.contains("SP_"),
                "unqualified object in {sql}"
            );
        }
    }

    #[test]
    fn every_table_is_dropped() {
        for m in MIGRATIONS {
            for sql in m.statements {
                if let Some(rest) = sql.strip_prefix("CREATE TABLE ") {
                    let name = rest.split([' ', '(']).next().unwrap_or_default();
                    assert!(
                        DROP_STATEMENTS.iter().any(|d| d.ends_with(name)),
                        "{name} is not dropped"
                    );
                }
            }
        }
    }
}
