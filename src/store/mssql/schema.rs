//! Versioned schema migrations, applied at connect under an application lock so that two
//! gateway instances starting at once never race.
//!
//! Every object lives in one schema (`dbo` unless the connection string names another, see
//! [`SchemaName`]) with an `onboard_` prefix. Each migration runs in its own transaction
//! together with the row that records it in `[schema].onboard_schema_migrations`, so a
//! migration is either fully applied and recorded or not at all. Statements are sent one by
//! one (no multi-statement DDL batches) and use only T-SQL that SQL Server 2017+, Azure SQL and
//! Babelfish all accept: no `MERGE`, no `CREATE OR ALTER`.
//!
//! Statement texts here are templates: `{schema}` stands for the bracket-quoted schema name
//! and `{name}` for the bare one, filled in by [`render`]. Both are safe to splice into SQL
//! because a [`SchemaName`] only ever holds letters, digits and `_`.

use std::fmt;
use std::time::{Duration, Instant};

use super::conn::Connection;
use super::rows::int32;
use crate::store::{StoreError, StoreResult};

/// Prefix of the application lock serialising migrations of one schema across instances; the
/// lower-cased schema name follows it (see [`lock_resource`]).
pub const LOCK_RESOURCE_PREFIX: &str = "onboard_schema:";

/// The schema used when the connection string names none.
pub const DEFAULT_SCHEMA: &str = "dbo";

/// Longest accepted schema name.
pub const MAX_SCHEMA_LEN: usize = 64;

/// A validated SQL Server schema name: `^[A-Za-z_][A-Za-z0-9_]{0,63}$`. Nothing else is
/// accepted, so the name can be bracket-quoted into statement text (including dynamic SQL)
/// without any escaping.
#[derive(Clone, PartialEq, Eq)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validate `name`. The error does not quote the input.
    pub fn parse(name: &str) -> StoreResult<SchemaName> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if first_ok && rest_ok && name.len() <= MAX_SCHEMA_LEN {
            Ok(SchemaName(name.to_owned()))
        } else {
            Err(StoreError::InvalidUrl(format!(
                "schema must be 1 to {MAX_SCHEMA_LEN} ASCII letters, digits or `_`, \
                 not starting with a digit"
            )))
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as it appears in statements: `[name]`.
    pub fn quoted(&self) -> String {
        format!("[{}]", self.0)
    }

    /// Whether this is `dbo` (in any case): a schema the store never creates nor drops.
    pub fn is_default(&self) -> bool {
        self.0.eq_ignore_ascii_case(DEFAULT_SCHEMA)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaName({})", self.0)
    }
}

/// Fill a statement template in for `schema`: `{schema}` becomes `[name]`, `{name}` the bare
/// name.
pub fn render(template: &str, schema: &SchemaName) -> String {
    template
        .replace("{schema}", &schema.quoted())
        .replace("{name}", schema.as_str())
}

/// The `sp_getapplock` resource serialising migrations of `schema`. Lower-cased, because
/// schema names compare case-insensitively on a default collation but lock resources do not.
pub fn lock_resource(schema: &SchemaName) -> String {
    format!(
        "{LOCK_RESOURCE_PREFIX}{}",
        schema.as_str().to_ascii_lowercase()
    )
}

/// One schema change.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    /// A query that returns a row when the database needs none of the statements (the
    /// migration is then only recorded).
    pub skip_when: Option<&'static str>,
    /// Statements run in order inside one transaction.
    pub statements: &'static [&'static str],
}

/// The table recording applied migrations.
pub const CREATE_MIGRATIONS_TABLE: &str = "IF NOT EXISTS (SELECT 1 FROM sys.tables AS t \
        WHERE t.name = N'onboard_schema_migrations' AND t.schema_id = SCHEMA_ID(N'{name}')) \
    CREATE TABLE {schema}.onboard_schema_migrations (\
        version int NOT NULL CONSTRAINT pk_onboard_schema_migrations PRIMARY KEY, \
        name nvarchar(200) NOT NULL, \
        applied_at datetime2 NOT NULL)";

/// All migrations, in version order. Never edit an applied one: append a new version.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "initial schema",
    // Identifier columns are created with migration 4's binary collation (databases created
    // before it was added get it from migration 4).
    skip_when: None,
    statements: &[
        // The inventory: one row per device.
        "CREATE TABLE {schema}.onboard_devices (\
            id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL CONSTRAINT pk_onboard_devices PRIMARY KEY, \
            device_type nvarchar(128) NOT NULL, \
            model nvarchar(400) NULL, \
            location nvarchar(400) NULL, \
            firmware_version nvarchar(128) NULL, \
            state nvarchar(16) NOT NULL CONSTRAINT ck_onboard_devices_state \
                CHECK (state IN (N'pending', N'enrolling', N'active', N'failed', N'revoked')), \
            credential_kind nvarchar(16) NULL CONSTRAINT ck_onboard_devices_kind \
                CHECK (credential_kind IN (N'certificate', N'password')), \
            current_serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL, \
            generation bigint NOT NULL, \
            created_at datetime2 NOT NULL, \
            updated_at datetime2 NOT NULL, \
            enrolled_at datetime2 NULL, \
            activated_at datetime2 NULL, \
            activation_deadline datetime2 NULL, \
            last_error nvarchar(max) NULL)",
        "CREATE INDEX ix_onboard_devices_state ON {schema}.onboard_devices (state) INCLUDE (device_type)",
        // Issued credentials; password credentials keep only a salted hash.
        "CREATE TABLE {schema}.onboard_credentials (\
            serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL CONSTRAINT pk_onboard_credentials PRIMARY KEY, \
            fingerprint varbinary(32) NOT NULL, \
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            kind nvarchar(16) NOT NULL CONSTRAINT ck_onboard_credentials_kind \
                CHECK (kind IN (N'certificate', N'password')), \
            password_hash nvarchar(400) NULL, \
            not_after datetime2 NULL, \
            created_at datetime2 NOT NULL, \
            activated_at datetime2 NULL, \
            revoked_at datetime2 NULL, \
            revoke_reason nvarchar(400) NULL)",
        "CREATE INDEX ix_onboard_credentials_device ON {schema}.onboard_credentials (device_id)",
        "CREATE INDEX ix_onboard_credentials_fingerprint ON {schema}.onboard_credentials (fingerprint)",
        // Plain (not filtered) index: filtered indexes make every write depend on the session's
        // ANSI_* / ARITHABORT settings, which differ between client libraries.
        "CREATE INDEX ix_onboard_credentials_revoked ON {schema}.onboard_credentials (revoked_at)",
        // Configuration versions per device.
        "CREATE TABLE {schema}.onboard_device_configs (\
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            version bigint NOT NULL, \
            body nvarchar(max) NOT NULL, \
            created_by nvarchar(128) NOT NULL, \
            created_at datetime2 NOT NULL, \
            applied_at datetime2 NULL, \
            failed_error nvarchar(max) NULL, \
            CONSTRAINT pk_onboard_device_configs PRIMARY KEY (device_id, version))",
        // Answered enrollments, for idempotent retries.
        "CREATE TABLE {schema}.onboard_enrollments (\
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            request_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            response nvarchar(max) NOT NULL, \
            created_at datetime2 NOT NULL, \
            CONSTRAINT pk_onboard_enrollments PRIMARY KEY (device_id, request_id))",
        // The audit log.
        "CREATE TABLE {schema}.onboard_events (\
            id bigint IDENTITY(1,1) NOT NULL CONSTRAINT pk_onboard_events PRIMARY KEY, \
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            occurred_at datetime2 NOT NULL, \
            event_name nvarchar(64) NOT NULL, \
            detail nvarchar(max) NOT NULL, \
            actor nvarchar(128) NOT NULL, \
            request_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL)",
        "CREATE INDEX ix_onboard_events_device_at ON {schema}.onboard_events (device_id, occurred_at, id)",
        // Firmware update jobs; `seq` orders jobs of one device by creation.
        "CREATE TABLE {schema}.onboard_firmware_jobs (\
            job_id nvarchar(64) COLLATE Latin1_General_100_BIN2 NOT NULL CONSTRAINT pk_onboard_firmware_jobs PRIMARY KEY, \
            seq bigint IDENTITY(1,1) NOT NULL, \
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            version nvarchar(128) NOT NULL, \
            url nvarchar(2048) NOT NULL, \
            sha256 nvarchar(128) NOT NULL, \
            size bigint NOT NULL, \
            status nvarchar(32) NOT NULL, \
            error nvarchar(max) NULL, \
            created_by nvarchar(128) NOT NULL, \
            created_at datetime2 NOT NULL, \
            updated_at datetime2 NOT NULL)",
        "CREATE INDEX ix_onboard_firmware_jobs_device ON {schema}.onboard_firmware_jobs (device_id, seq)",
        // Replies to admin commands, for idempotent retries.
        "CREATE TABLE {schema}.onboard_admin_replies (\
            request_id nvarchar(256) COLLATE Latin1_General_100_BIN2 NOT NULL CONSTRAINT pk_onboard_admin_replies PRIMARY KEY, \
            reply nvarchar(max) NOT NULL, \
            created_at datetime2 NOT NULL)",
    ],
},
Migration {
    version: 2,
    name: "factory issuer binding",
    skip_when: None,
    statements: &[
        // One column per statement: Babelfish refuses a COLLATE clause in a multi-column ADD.
        "ALTER TABLE {schema}.onboard_devices ADD factory_issuer nvarchar(400) NULL",
        "ALTER TABLE {schema}.onboard_devices ADD factory_serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL",
    ],
},
Migration {
    version: 3,
    name: "change feed",
    skip_when: None,
    statements: &[
        // What other gateways sharing the database must apply: written in the transaction of
        // the change, polled by id.
        "CREATE TABLE {schema}.onboard_changes (\
            id bigint IDENTITY(1,1) NOT NULL CONSTRAINT pk_onboard_changes PRIMARY KEY, \
            device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL, \
            kind nvarchar(16) NOT NULL CONSTRAINT ck_onboard_changes_kind \
                CHECK (kind IN (N'credentials', N'state', N'config', N'firmware')), \
            origin nvarchar(64) NOT NULL, \
            occurred_at datetime2 NOT NULL)",
        "CREATE INDEX ix_onboard_changes_at ON {schema}.onboard_changes (occurred_at)",
    ],
},
Migration {
    version: 4,
    name: "identifiers compare exactly (binary collation)",
    skip_when: Some(
        "SELECT 1 AS done FROM sys.columns AS c \
         WHERE c.object_id = OBJECT_ID(N'{schema}.onboard_devices') AND c.name = N'id' \
         AND UPPER(c.collation_name) LIKE N'%BIN2'",
    ),
    // The server's default collation compares case- and accent-insensitively: `ab` would find
    // `AB`'s row. Every identifier column gets a binary collation; keys and indexes over one
    // are dropped around the change and recreated as they were.
    statements: &[
        "ALTER TABLE {schema}.onboard_devices DROP CONSTRAINT pk_onboard_devices",
        "ALTER TABLE {schema}.onboard_devices ALTER COLUMN id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_devices ALTER COLUMN current_serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL",
        "ALTER TABLE {schema}.onboard_devices ADD CONSTRAINT pk_onboard_devices PRIMARY KEY (id)",
        "DROP INDEX ix_onboard_credentials_device ON {schema}.onboard_credentials",
        "ALTER TABLE {schema}.onboard_credentials DROP CONSTRAINT pk_onboard_credentials",
        "ALTER TABLE {schema}.onboard_credentials ALTER COLUMN serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_credentials ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_credentials ADD CONSTRAINT pk_onboard_credentials PRIMARY KEY (serial)",
        "CREATE INDEX ix_onboard_credentials_device ON {schema}.onboard_credentials (device_id)",
        "ALTER TABLE {schema}.onboard_device_configs DROP CONSTRAINT pk_onboard_device_configs",
        "ALTER TABLE {schema}.onboard_device_configs ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_device_configs ADD CONSTRAINT pk_onboard_device_configs PRIMARY KEY (device_id, version)",
        "ALTER TABLE {schema}.onboard_enrollments DROP CONSTRAINT pk_onboard_enrollments",
        "ALTER TABLE {schema}.onboard_enrollments ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_enrollments ALTER COLUMN request_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_enrollments ALTER COLUMN serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_enrollments ADD CONSTRAINT pk_onboard_enrollments PRIMARY KEY (device_id, request_id)",
        "DROP INDEX ix_onboard_events_device_at ON {schema}.onboard_events",
        "ALTER TABLE {schema}.onboard_events ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_events ALTER COLUMN request_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL",
        "CREATE INDEX ix_onboard_events_device_at ON {schema}.onboard_events (device_id, occurred_at, id)",
        "DROP INDEX ix_onboard_firmware_jobs_device ON {schema}.onboard_firmware_jobs",
        "ALTER TABLE {schema}.onboard_firmware_jobs DROP CONSTRAINT pk_onboard_firmware_jobs",
        "ALTER TABLE {schema}.onboard_firmware_jobs ALTER COLUMN job_id nvarchar(64) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_firmware_jobs ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_firmware_jobs ADD CONSTRAINT pk_onboard_firmware_jobs PRIMARY KEY (job_id)",
        "CREATE INDEX ix_onboard_firmware_jobs_device ON {schema}.onboard_firmware_jobs (device_id, seq)",
        "ALTER TABLE {schema}.onboard_admin_replies DROP CONSTRAINT pk_onboard_admin_replies",
        "ALTER TABLE {schema}.onboard_admin_replies ALTER COLUMN request_id nvarchar(256) COLLATE Latin1_General_100_BIN2 NOT NULL",
        "ALTER TABLE {schema}.onboard_admin_replies ADD CONSTRAINT pk_onboard_admin_replies PRIMARY KEY (request_id)",
        "ALTER TABLE {schema}.onboard_devices ALTER COLUMN factory_serial nvarchar(128) COLLATE Latin1_General_100_BIN2 NULL",
        "ALTER TABLE {schema}.onboard_changes ALTER COLUMN device_id nvarchar(128) COLLATE Latin1_General_100_BIN2 NOT NULL",
    ],
}];

/// The collation of every identifier column (migration 4): code-point comparison.
#[cfg(test)]
pub const ID_COLLATION: &str = "Latin1_General_100_BIN2";

/// Creates the schema when it does not exist yet (never run for `dbo`). `CREATE SCHEMA` must
/// be alone in its batch, hence the dynamic SQL; `@P1` is the bare schema name.
pub const CREATE_SCHEMA: &str = "IF SCHEMA_ID(@P1) IS NULL EXEC(N'CREATE SCHEMA {schema}')";

/// Drops the (then empty) schema after its tables (never run for `dbo`); `@P1` is the bare
/// schema name. Fails, leaving it in place, if something else still lives in it.
/// The store's procedures in schema `@P1` (see `procs`).
pub const LIST_PROCEDURES: &str = "SELECT p.name FROM sys.procedures AS p \
     JOIN sys.schemas AS s ON s.schema_id = p.schema_id \
     WHERE s.name = @P1 AND LEFT(p.name, 10) = 'onboard_p_'";

pub const DROP_SCHEMA: &str = "IF SCHEMA_ID(@P1) IS NOT NULL EXEC(N'DROP SCHEMA {schema}')";

/// Tables dropped by `drop_schema`, children first.
pub const DROP_STATEMENTS: &[&str] = &[
    "DROP TABLE IF EXISTS {schema}.onboard_admin_replies",
    "DROP TABLE IF EXISTS {schema}.onboard_firmware_jobs",
    "DROP TABLE IF EXISTS {schema}.onboard_events",
    "DROP TABLE IF EXISTS {schema}.onboard_enrollments",
    "DROP TABLE IF EXISTS {schema}.onboard_device_configs",
    "DROP TABLE IF EXISTS {schema}.onboard_credentials",
    "DROP TABLE IF EXISTS {schema}.onboard_devices",
    "DROP TABLE IF EXISTS {schema}.onboard_changes",
    "DROP TABLE IF EXISTS {schema}.onboard_schema_migrations",
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

/// `@P1`: timeout in ms; `@P2`: the resource ([`lock_resource`]).
const GET_LOCK: &str = "DECLARE @result int; \
    EXEC @result = sp_getapplock @Resource = @P2, @LockMode = N'Exclusive', \
        @LockOwner = N'Session', @LockTimeout = @P1; \
    SELECT @result AS result";

/// `@P1`: the resource ([`lock_resource`]).
const RELEASE_LOCK: &str = "EXEC sp_releaseapplock @Resource = @P1, @LockOwner = N'Session'";

const READ_MIGRATIONS: &str = "SELECT m.version FROM {schema}.onboard_schema_migrations AS m";

const RECORD_MIGRATION: &str =
    "INSERT INTO {schema}.onboard_schema_migrations (version, name, applied_at) \
    VALUES (@P1, @P2, SYSUTCDATETIME())";

fn migration_error(what: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{what}: {m}")),
        other => StoreError::Migration(format!("{what}: {other}")),
    }
}

/// Take the lock of `schema` on `conn` (a dedicated session), create the schema if needed,
/// apply what is missing, release the lock. `lock_wait` bounds the total time spent waiting
/// for another instance's migrations.
pub async fn migrate(
    conn: &mut Connection,
    schema: &SchemaName,
    query_timeout: Duration,
    lock_wait: Duration,
) -> StoreResult<()> {
    let resource = lock_resource(schema);
    acquire_lock(conn, &resource, query_timeout, lock_wait).await?;
    let result = apply_pending(conn, schema).await;
    if let Err(e) = conn
        .execute("release schema lock", RELEASE_LOCK, &[&resource.as_str()])
        .await
    {
        // The lock is owned by this session; closing the session releases it anyway.
        tracing::warn!(error = %e, "could not release the schema lock");
    }
    result
}

async fn acquire_lock(
    conn: &mut Connection,
    resource: &str,
    query_timeout: Duration,
    lock_wait: Duration,
) -> StoreResult<()> {
    // Let the server give up before our own request timeout fires.
    let per_try_ms = (query_timeout.as_millis() * 3 / 4).clamp(100, i32::MAX as u128) as i32;
    let started = Instant::now();
    loop {
        let row = conn
            .query_opt("schema lock", GET_LOCK, &[&per_try_ms, &resource])
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
                    "sp_getapplock on {resource} returned {code}"
                )))
            }
        }
    }
}

async fn apply_pending(conn: &mut Connection, schema: &SchemaName) -> StoreResult<()> {
    if !schema.is_default() {
        conn.execute(
            "create schema",
            &render(CREATE_SCHEMA, schema),
            &[&schema.as_str()],
        )
        .await
        .map_err(|e| migration_error(&format!("create schema {schema}"), e))?;
    }
    conn.batch(
        "create migrations table",
        &render(CREATE_MIGRATIONS_TABLE, schema),
    )
    .await
    .map_err(|e| migration_error("create migrations table", e))?;
    let rows = conn
        .query("read migrations", &render(READ_MIGRATIONS, schema), &[])
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
        let result = run_statements(conn, schema, migration).await;
        conn.finish(result)
            .await
            .map_err(|e| migration_error(&what, e))?;
    }
    Ok(())
}

async fn run_statements(
    conn: &mut Connection,
    schema: &SchemaName,
    migration: &Migration,
) -> StoreResult<()> {
    let skip = match migration.skip_when {
        Some(query) => !conn
            .query("migration check", &render(query, schema), &[])
            .await?
            .is_empty(),
        None => false,
    };
    let statements = if skip { &[][..] } else { migration.statements };
    for statement in statements {
        conn.batch("migration statement", &render(statement, schema))
            .await?;
    }
    conn.execute(
        "record migration",
        &render(RECORD_MIGRATION, schema),
        &[&migration.version, &migration.name],
    )
    .await?;
    Ok(())
}

/// Drop every onboard table and the migrations table of `schema`, then the schema itself
/// unless it is `dbo` (test clean-up).
pub async fn drop_all(conn: &mut Connection, schema: &SchemaName) -> StoreResult<()> {
    drop_procedures(conn, schema).await?;
    for statement in DROP_STATEMENTS {
        conn.batch("drop schema", &render(statement, schema))
            .await?;
    }
    if !schema.is_default() {
        conn.execute(
            "drop schema",
            &render(DROP_SCHEMA, schema),
            &[&schema.as_str()],
        )
        .await?;
    }
    Ok(())
}

/// Drop the store's procedures in `schema` (see `procs`); returns how many. The store makes
/// them again as its statements are next used.
pub async fn drop_procedures(conn: &mut Connection, schema: &SchemaName) -> StoreResult<usize> {
    let procedures = conn
        .query_as_text("list procedures", LIST_PROCEDURES, &[&schema.as_str()])
        .await?;
    let mut dropped = 0;
    for row in procedures {
        let name: Option<&str> = row.get(0);
        // Names the store made itself (`procs::PREFIX` and hex digits), checked again before
        // they go into DDL.
        if let Some(name) = name.filter(|n| {
            n.starts_with(super::procs::PREFIX)
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }) {
            conn.batch(
                "drop procedure",
                &format!("DROP PROCEDURE {}.[{name}]", schema.quoted()),
            )
            .await?;
            dropped += 1;
        }
    }
    Ok(dropped)
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
        let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(pending(MIGRATIONS, &all).is_empty());
        let after_first: Vec<i32> = pending(MIGRATIONS, &[1])
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(after_first, all[1..]);
        assert_eq!(pending(MIGRATIONS, &[99]).len(), MIGRATIONS.len());
    }

    /// The conversion of older databases to the binary collation.
    const COLLATION_MIGRATION: &Migration = &MIGRATIONS[3];

    #[test]
    fn every_identifier_column_gets_the_binary_collation() {
        let collated: Vec<&str> = COLLATION_MIGRATION
            .statements
            .iter()
            .filter(|s| s.contains("ALTER COLUMN"))
            .copied()
            .collect();
        for (table, column) in [
            ("onboard_devices", "id"),
            ("onboard_devices", "current_serial"),
            ("onboard_credentials", "serial"),
            ("onboard_credentials", "device_id"),
            ("onboard_device_configs", "device_id"),
            ("onboard_enrollments", "device_id"),
            ("onboard_enrollments", "request_id"),
            ("onboard_enrollments", "serial"),
            ("onboard_events", "device_id"),
            ("onboard_events", "request_id"),
            ("onboard_firmware_jobs", "job_id"),
            ("onboard_firmware_jobs", "device_id"),
            ("onboard_admin_replies", "request_id"),
            ("onboard_devices", "factory_serial"),
            ("onboard_changes", "device_id"),
        ] {
            let needle = format!("{{schema}}.{table} ALTER COLUMN {column} ");
            let statement = collated
                .iter()
                .find(|s| s.contains(&needle))
                .unwrap_or_else(|| panic!("{table}.{column} keeps the default collation"));
            assert!(
                statement.contains(&format!("COLLATE {ID_COLLATION} ")),
                "{statement}"
            );
        }
        // Every key or index dropped is created again.
        for statement in COLLATION_MIGRATION.statements {
            if let Some(rest) = statement.split("DROP CONSTRAINT ").nth(1) {
                assert!(
                    COLLATION_MIGRATION
                        .statements
                        .iter()
                        .any(|s| s.contains(&format!("ADD CONSTRAINT {rest} PRIMARY KEY"))),
                    "{rest}"
                );
            }
            if let Some(rest) = statement.strip_prefix("DROP INDEX ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(
                    COLLATION_MIGRATION
                        .statements
                        .iter()
                        .any(|s| s.starts_with(&format!("CREATE INDEX {name} "))),
                    "{name}"
                );
            }
        }
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

    /// Every template of this module.
    fn templates() -> Vec<&'static str> {
        MIGRATIONS
            .iter()
            .flat_map(|m| m.statements.iter().copied().chain(m.skip_when))
            .chain([
                CREATE_MIGRATIONS_TABLE,
                CREATE_SCHEMA,
                DROP_SCHEMA,
                GET_LOCK,
                RELEASE_LOCK,
                READ_MIGRATIONS,
                RECORD_MIGRATION,
            ])
            .chain(DROP_STATEMENTS.iter().copied())
            .collect()
    }

    #[test]
    fn ddl_avoids_non_portable_syntax() {
        for sql in templates() {
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
                sql.contains("{schema}") || upper.contains("SP_"),
                "unqualified object in {sql}"
            );
            assert!(!upper.contains("DBO."), "hard-coded schema in {sql}");
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

    #[test]
    fn schema_names_are_validated_strictly() {
        for good in [
            "dbo",
            "onboard",
            "_x",
            "A1_b2",
            "onboard_t0123abcd",
            &"s".repeat(64),
        ] {
            let name = SchemaName::parse(good).expect(good);
            assert_eq!(name.as_str(), good);
            assert_eq!(name.quoted(), format!("[{good}]"));
        }
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a.b",
            "a]b",
            "[dbo]",
            "x'; DROP TABLE t; --",
            "sch\u{e9}ma",
            "a\u{0}",
            &"s".repeat(65),
        ] {
            let err = SchemaName::parse(bad).expect_err(bad);
            assert!(matches!(err, StoreError::InvalidUrl(_)), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn default_schema_is_dbo() {
        let dbo = SchemaName::default();
        assert_eq!(dbo.as_str(), "dbo");
        assert!(dbo.is_default());
        assert!(SchemaName::parse("DBO").expect("valid").is_default());
        assert!(!SchemaName::parse("dbo2").expect("valid").is_default());
        assert_eq!(
            render(DROP_STATEMENTS[0], &dbo),
            "DROP TABLE IF EXISTS [dbo].onboard_admin_replies"
        );
    }

    #[test]
    fn rendered_ddl_uses_the_configured_schema() {
        let schema = SchemaName::parse("myschema").expect("valid");
        for template in templates() {
            let sql = render(template, &schema);
            assert!(!sql.contains('{'), "unfilled template: {sql}");
            assert!(!sql.to_ascii_lowercase().contains("dbo."), "{sql}");
        }
        let create = render(MIGRATIONS[0].statements[0], &schema);
        assert!(
            create.starts_with("CREATE TABLE [myschema].onboard_devices ("),
            "{create}"
        );
        assert_eq!(
            render(CREATE_SCHEMA, &schema),
            "IF SCHEMA_ID(@P1) IS NULL EXEC(N'CREATE SCHEMA [myschema]')"
        );
        assert_eq!(
            render(DROP_SCHEMA, &schema),
            "IF SCHEMA_ID(@P1) IS NOT NULL EXEC(N'DROP SCHEMA [myschema]')"
        );
        let table = render(CREATE_MIGRATIONS_TABLE, &schema);
        assert!(table.contains("SCHEMA_ID(N'myschema')"), "{table}");
        assert!(
            table.contains("CREATE TABLE [myschema].onboard_schema_migrations"),
            "{table}"
        );
    }

    #[test]
    fn each_schema_has_its_own_migration_lock() {
        let a = lock_resource(&SchemaName::default());
        let b = lock_resource(&SchemaName::parse("tenant_b").expect("valid"));
        assert_eq!(a, "onboard_schema:dbo");
        assert_eq!(b, "onboard_schema:tenant_b");
        // Same schema in another case: same lock.
        assert_eq!(
            lock_resource(&SchemaName::parse("Tenant_B").expect("valid")),
            b
        );
    }
}
