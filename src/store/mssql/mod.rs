//! Microsoft SQL Server / Azure SQL backend, through tiberius over a bb8 pool.
//!
//! - `url`: `mssql://` URLs and ADO.NET strings, and the password-free [`Target`] that names
//!   the server in every log line and error.
//! - `conn`: a pooled session that is discarded rather than reused whenever its state is
//!   uncertain (I/O error, timeout, a cancelled request, an unfinished transaction).
//! - `schema`: the configurable schema name and the versioned migrations applied at connect
//!   under `sp_getapplock`.
//! - `statements`: every statement, rendered once per store with its bracket-quoted schema.
//! - `errors`: server error numbers to [`StoreError`], and the retry back-off.
//! - `rows`: pure row-to-domain conversions.
//!
//! Every statement is parameterised (`@P1`, `@P2`, ...) and bounded by
//! `[store] query_timeout_ms`. Each trait method that writes more than one row is one
//! transaction; the whole transaction is retried on transient errors (deadlock, failover,
//! lost connection) up to `[store] max_retries` times with exponential back-off and full jitter.
//! The T-SQL sticks to what SQL Server 2017+, Azure SQL and Babelfish all run: no `MERGE`, no
//! lock hints for correctness (conditional `UPDATE`s and unique keys decide races instead),
//! columns qualified in `UPDATE ... FROM`, and no NULL parameter ever sent: an absent optional
//! value is written as a typed `CAST(NULL AS ...)` literal in the statement text (see
//! `rows::null_slots`), never as a value.

mod conn;
mod errors;
mod rows;
mod schema;
mod statements;
mod url;

use std::time::Duration;

use futures::future::BoxFuture;
use tiberius::ToSql;
use time::OffsetDateTime;

use self::conn::{Connection, LastError, Manager};
use self::rows::{int64, json_text, null_slots, to_db_time, ABSENT_TIME};
use self::statements::Statements;
use super::*;

pub use self::errors::{
    backoff_ceiling, backoff_delay, classify, classify_code, ErrorClass, BACKOFF_BASE, BACKOFF_CAP,
};
use self::errors::{Retry, Step};
pub use self::schema::SchemaName;
pub use self::url::{looks_like_mssql, Target};

type Pooled = bb8::PooledConnection<'static, Manager>;

/// How long a starting instance waits for another instance's migrations to finish.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(120);

/// The SQL Server store. Cheap to share; every method checks a connection out of the pool.
pub struct MssqlStore {
    pool: bb8::Pool<Manager>,
    /// Names the server in logs and errors (never the password), and the schema.
    target: Target,
    /// Every statement, rendered for `target.schema`.
    sql: Statements,
    /// Retries of an operation that failed with a transient error.
    max_retries: u32,
    /// Bound on a pool checkout.
    checkout_timeout: Duration,
    /// Why the pool's latest connection attempt failed, for checkout time-out messages.
    last_connect_error: LastError,
    /// Stamped on the change-feed rows this instance writes.
    origin: String,
}

impl std::fmt::Debug for MssqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MssqlStore")
            .field("target", &self.target)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

/// Logs connection failures the pool meets in the background.
#[derive(Debug, Clone, Copy)]
struct LogSink;

impl bb8::ErrorSink<StoreError> for LogSink {
    fn sink(&self, error: StoreError) {
        tracing::warn!(error = %error, "SQL Server connection failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<StoreError>> {
        Box::new(*self)
    }
}

impl MssqlStore {
    /// Parse `url`, open the pool and apply pending migrations.
    pub async fn connect(
        url: &str,
        config: &crate::config::StoreConfig,
    ) -> StoreResult<MssqlStore> {
        let parsed = self::url::parse(url)?;
        let target = parsed.target.clone();
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let query_timeout = Duration::from_millis(config.query_timeout_ms.max(1));
        let manager = Manager::new(
            parsed.config,
            target.clone(),
            connect_timeout,
            query_timeout,
        );
        let last_connect_error = manager.last_error();
        let pool = bb8::Pool::builder()
            .max_size(config.pool_size.max(1))
            .connection_timeout(connect_timeout)
            // No `SELECT 1` before every use: a dead connection fails its first statement
            // with an I/O error, is discarded, and the operation is retried on a new one.
            .test_on_check_out(false)
            .error_sink(Box::new(LogSink))
            .build_unchecked(manager);
        let store = MssqlStore {
            pool,
            sql: Statements::new(&target.schema),
            target,
            max_retries: config.max_retries,
            checkout_timeout: connect_timeout,
            last_connect_error,
            origin: new_origin(),
        };
        store.migrate(query_timeout).await?;
        tracing::info!(target = %store.target, pool_size = config.pool_size, "SQL Server store ready");
        Ok(store)
    }

    /// Run the migrations on a session of their own: the schema lock it takes is owned by
    /// that session and released at the latest when it closes.
    async fn migrate(&self, query_timeout: Duration) -> StoreResult<()> {
        let mut retry = Retry::new("schema migration", self.max_retries);
        loop {
            let result = async {
                let mut conn = self.pool.dedicated_connection().await?;
                schema::migrate(
                    &mut conn,
                    &self.target.schema,
                    query_timeout,
                    MIGRATION_LOCK_WAIT,
                )
                .await
            }
            .await;
            let step = retry.step(result, &mut rand::thread_rng());
            match step {
                Step::Done(result) => return result,
                Step::RetryAfter(delay) => {
                    tracing::warn!(target = %self.target, ?delay, "retrying schema migration");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Drop every table this store created, including the migrations table, and then its
    /// schema unless that is `dbo` (a schema still holding other objects is left in place with
    /// an error). Meant for a throw-away test schema (the contract suite cleans up with it);
    /// never call it on a production inventory.
    pub async fn drop_schema(&self) -> StoreResult<()> {
        let schema = &self.target.schema;
        self.run("drop_schema", |mut c| {
            Box::pin(async move { schema::drop_all(&mut c, schema).await })
        })
        .await
    }

    /// The schema holding this store's tables.
    pub fn schema(&self) -> &SchemaName {
        &self.target.schema
    }

    /// The server this store talks to, password-free.
    pub fn target(&self) -> &Target {
        &self.target
    }

    async fn checkout(&self) -> StoreResult<Pooled> {
        self.pool.get_owned().await.map_err(|e| match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut => {
                let why = self
                    .last_connect_error
                    .get()
                    .map(|e| format!(" (last connection attempt: {e})"))
                    .unwrap_or_default();
                StoreError::Unavailable(format!(
                    "no connection to {} within {} ms{why}",
                    self.target,
                    self.checkout_timeout.as_millis()
                ))
            }
        })
    }

    /// Run `op` on a pooled connection, again on a fresh one after a transient error (up to
    /// `max_retries` times, exponential back-off with full jitter).
    async fn run<'f, T, F>(&self, op: &'static str, mut f: F) -> StoreResult<T>
    where
        F: FnMut(Pooled) -> BoxFuture<'f, StoreResult<T>>,
    {
        let mut retry = Retry::new(op, self.max_retries);
        loop {
            let result = match self.checkout().await {
                Ok(conn) => f(conn).await,
                Err(e) => Err(e),
            };
            let step = retry.step(result, &mut rand::thread_rng());
            match step {
                Step::Done(result) => {
                    if retry.retries() > 0 {
                        tracing::info!(
                            op,
                            retries = retry.retries(),
                            ok = result.is_ok(),
                            "store operation retried"
                        );
                    }
                    return result.map_err(|e| name_server(e, &self.target));
                }
                Step::RetryAfter(delay) => tokio::time::sleep(delay).await,
            }
        }
    }
}

/// Add the (password-free) server name to errors an operator has to act on.
fn name_server(error: StoreError, target: &Target) -> StoreError {
    match error {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{m} [{target}]")),
        StoreError::Database(m) => StoreError::Database(format!("{m} [{target}]")),
        other => other,
    }
}

// ---- transaction bodies -------------------------------------------------------------------

async fn insert_event(c: &mut Connection, sql: &Statements, event: &AuditEvent) -> StoreResult<()> {
    let at = to_db_time(event.at);
    let detail = json_text(&event.detail);
    let request_id = event.request_id.as_deref();
    let text = null_slots(&sql.insert_event, [(6, request_id.is_none())]);
    let request_id = request_id.unwrap_or_default();
    c.execute(
        "append event",
        &text,
        &[
            &event.device_id.as_str(),
            &at,
            &event.event.as_str(),
            &detail.as_str(),
            &event.actor.as_str(),
            &request_id,
        ],
    )
    .await?;
    Ok(())
}

/// Announce a change of `device_id` on the change feed (in the caller's transaction).
async fn insert_change(
    c: &mut Connection,
    sql: &Statements,
    origin: &str,
    device_id: &str,
    kind: ChangeKind,
) -> StoreResult<()> {
    let now = to_db_time(OffsetDateTime::now_utc());
    c.execute(
        "insert change",
        &sql.insert_change,
        &[&device_id, &kind.as_str(), &origin, &now],
    )
    .await?;
    Ok(())
}

async fn insert_credential_row(
    c: &mut Connection,
    sql: &Statements,
    cred: &Credential,
) -> StoreResult<()> {
    let text = null_slots(
        &sql.insert_credential,
        [
            (5, cred.password_hash.is_none()),
            (6, cred.not_after.is_none()),
            (8, cred.activated_at.is_none()),
            (9, cred.revoked_at.is_none()),
            (10, cred.revoke_reason.is_none()),
        ],
    );
    let time_or_absent = |t: Option<OffsetDateTime>| t.map(to_db_time).unwrap_or(ABSENT_TIME);
    let not_after = time_or_absent(cred.not_after);
    let created_at = to_db_time(cred.created_at);
    let activated_at = time_or_absent(cred.activated_at);
    let revoked_at = time_or_absent(cred.revoked_at);
    c.execute(
        "insert credential",
        &text,
        &[
            &cred.serial.as_str(),
            &cred.fingerprint.as_slice(),
            &cred.device_id.as_str(),
            &cred.kind.as_str(),
            &cred.password_hash.as_deref().unwrap_or_default(),
            &not_after,
            &created_at,
            &activated_at,
            &revoked_at,
            &cred.revoke_reason.as_deref().unwrap_or_default(),
        ],
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict(_) => {
            StoreError::Conflict(format!("credential {} already exists", cred.serial))
        }
        other => other,
    })?;
    Ok(())
}

async fn insert_next_config(
    c: &mut Connection,
    sql: &Statements,
    device_id: &str,
    body: &serde_json::Value,
    created_by: &str,
    now: OffsetDateTime,
) -> StoreResult<DeviceConfig> {
    let body = json_text(body);
    let now = to_db_time(now);
    let row = c
        .query_opt(
            "insert config",
            &sql.insert_next_config,
            &[&device_id, &body.as_str(), &created_by, &now],
        )
        .await?
        .ok_or_else(|| StoreError::Database("insert config returned no row".into()))?;
    rows::config(&row)
}

async fn commit_enrollment_body(
    c: &mut Connection,
    sql: &Statements,
    origin: &str,
    commit: &EnrollmentCommit,
) -> StoreResult<EnrollmentCommitted> {
    let now = OffsetDateTime::now_utc();
    let now_db = to_db_time(now);
    let deadline = to_db_time(commit.activation_deadline);
    let device_id = commit.device_id.as_str();
    let kind = commit.credential.kind.as_str();
    let serial = commit.credential.serial.as_str();
    let absent = [
        (3, commit.model.is_none()),
        (4, commit.location.is_none()),
        (5, commit.firmware_version.is_none()),
    ];
    let model = commit.model.as_deref().unwrap_or_default();
    let location = commit.location.as_deref().unwrap_or_default();
    let firmware = commit.firmware_version.as_deref().unwrap_or_default();
    let issuer = commit.factory.as_ref().map(|f| f.issuer.as_str());
    let factory_serial = commit.factory.as_ref().map(|f| f.serial.as_str());

    // 1. The device row, guarded by its generation (or by the primary key when new).
    let generation = match commit.expected_generation {
        Some(expected) => {
            let row = c
                .query_opt(
                    "commit_enrollment: update device",
                    &null_slots(
                        &sql.update_device_for_enrollment,
                        absent
                            .into_iter()
                            .chain([(11, issuer.is_none()), (12, factory_serial.is_none())]),
                    ),
                    &[
                        &device_id,
                        &commit.device_type.as_str(),
                        &model,
                        &location,
                        &firmware,
                        &kind,
                        &serial,
                        &now_db,
                        &deadline,
                        &expected,
                        &issuer.unwrap_or_default(),
                        &factory_serial.unwrap_or_default(),
                    ],
                )
                .await?;
            match row {
                Some(row) => int64(&row, "generation")?,
                None => {
                    return Err(StoreError::Conflict(format!(
                        "device {device_id} changed since generation {expected} was read \
                         (or is revoked, or bound to another factory issuer)"
                    )))
                }
            }
        }
        None => {
            c.execute(
                "commit_enrollment: insert device",
                &null_slots(
                    &sql.insert_device_for_enrollment,
                    absent
                        .into_iter()
                        .chain([(10, issuer.is_none()), (11, factory_serial.is_none())]),
                ),
                &[
                    &device_id,
                    &commit.device_type.as_str(),
                    &model,
                    &location,
                    &firmware,
                    &kind,
                    &serial,
                    &now_db,
                    &deadline,
                    &issuer.unwrap_or_default(),
                    &factory_serial.unwrap_or_default(),
                ],
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("device {device_id} was created concurrently"))
                }
                other => other,
            })?;
            1
        }
    };

    // 2. The idempotency record: a second commit of the same request fails here.
    let response = json_text(&commit.response);
    c.execute(
        "commit_enrollment: record enrollment",
        &sql.insert_enrollment,
        &[
            &device_id,
            &commit.request_id.as_str(),
            &serial,
            &response.as_str(),
            &now_db,
        ],
    )
    .await
    .map_err(|e| match e {
        StoreError::Conflict(_) => StoreError::Conflict(format!(
            "enrollment {device_id}/{} already recorded",
            commit.request_id
        )),
        other => other,
    })?;

    // 3. Other credentials, before the new one is inserted (so it is never among them).
    if let Some(reason) = &commit.revoke_others {
        let revoked = c
            .query(
                "commit_enrollment: revoke others",
                &sql.revoke_device_credentials,
                &[&device_id, &now_db, &reason.as_str()],
            )
            .await?;
        if !revoked.is_empty() {
            insert_change(c, sql, origin, device_id, ChangeKind::Credentials).await?;
        }
    }

    // 4. The credential, the configuration version, the audit events.
    insert_credential_row(c, sql, &commit.credential).await?;
    let config = insert_next_config(c, sql, device_id, &commit.config_body, "gateway", now).await?;
    insert_change(c, sql, origin, device_id, ChangeKind::Config).await?;
    for event in &commit.events {
        insert_event(c, sql, event).await?;
    }
    Ok(EnrollmentCommitted { config, generation })
}

async fn activate_body(
    c: &mut Connection,
    sql: &Statements,
    origin: &str,
    device_id: &str,
    serial: &str,
    event: &AuditEvent,
) -> StoreResult<bool> {
    let now = to_db_time(OffsetDateTime::now_utc());
    let changed = c
        .execute(
            "activate: device",
            &sql.activate_device,
            &[&device_id, &serial, &now],
        )
        .await?;
    if changed == 0 {
        return Ok(false);
    }
    c.execute(
        "activate: credential",
        &sql.activate_credential,
        &[&serial, &now],
    )
    .await?;
    let superseded = c
        .execute(
            "activate: supersede",
            &sql.activate_supersede,
            &[&device_id, &serial, &now],
        )
        .await?;
    if superseded > 0 {
        insert_change(c, sql, origin, device_id, ChangeKind::Credentials).await?;
    }
    insert_event(c, sql, event).await?;
    Ok(true)
}

async fn expire_body(
    c: &mut Connection,
    sql: &Statements,
    origin: &str,
    device_id: &str,
    serial: &str,
    event: &AuditEvent,
) -> StoreResult<bool> {
    let now = to_db_time(OffsetDateTime::now_utc());
    let changed = c
        .execute(
            "expire_enrollment: device",
            &sql.expire_device,
            &[&device_id, &serial, &now],
        )
        .await?;
    if changed == 0 {
        return Ok(false);
    }
    c.execute(
        "expire_enrollment: credential",
        &sql.expire_credential,
        &[&serial, &now],
    )
    .await?;
    insert_change(c, sql, origin, device_id, ChangeKind::Credentials).await?;
    insert_change(c, sql, origin, device_id, ChangeKind::State).await?;
    insert_event(c, sql, event).await?;
    Ok(true)
}

async fn import_body(
    c: &mut Connection,
    sql: &Statements,
    devices: &[NewDevice],
) -> StoreResult<ImportOutcome> {
    let now = to_db_time(OffsetDateTime::now_utc());
    let mut outcome = ImportOutcome::default();
    for device in devices {
        let existing = c
            .query_opt("import: lookup", &sql.import_lookup, &[&device.id.as_str()])
            .await?
            .map(|row| rows::existing_device(&row))
            .transpose()?;
        let params: [&dyn ToSql; 6] = [
            &device.id.as_str(),
            &device.device_type.as_str(),
            &device.model.as_deref().unwrap_or_default(),
            &device.location.as_deref().unwrap_or_default(),
            &device.firmware_version.as_deref().unwrap_or_default(),
            &now,
        ];
        let absent = [
            (3, device.model.is_none()),
            (4, device.location.is_none()),
            (5, device.firmware_version.is_none()),
        ];
        match rows::import_action(existing.as_ref(), device) {
            rows::ImportAction::Insert => {
                c.execute(
                    "import: insert",
                    &null_slots(&sql.insert_pending_device, absent),
                    &params,
                )
                .await?;
                outcome.inserted += 1;
            }
            rows::ImportAction::Update => {
                if c.execute(
                    "import: update",
                    &null_slots(&sql.update_pending_device, absent),
                    &params,
                )
                .await?
                    > 0
                {
                    outcome.updated += 1;
                } else {
                    // Left `pending` between the lookup and the update.
                    outcome.skipped += 1;
                }
            }
            rows::ImportAction::Unchanged => outcome.unchanged += 1,
            rows::ImportAction::Skip => outcome.skipped += 1,
        }
    }
    Ok(outcome)
}

fn collect<T>(
    rows: Vec<tiberius::Row>,
    map: impl Fn(&tiberius::Row) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    rows.iter().map(map).collect()
}

#[async_trait]
impl Store for MssqlStore {
    fn backend(&self) -> &'static str {
        "mssql"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.run("ping", |mut c| {
            Box::pin(async move { c.query("ping", "SELECT 1 AS one", &[]).await.map(|_| ()) })
        })
        .await
    }

    // ---- devices ------------------------------------------------------------------------

    async fn device(&self, id: &str) -> StoreResult<Option<Device>> {
        let sql = &self.sql.device;
        self.run("device", |mut c| {
            Box::pin(async move {
                c.query_opt("device", sql, &[&id])
                    .await?
                    .map(|row| rows::device(&row))
                    .transpose()
            })
        })
        .await
    }

    async fn list_devices(&self, filter: &DeviceFilter) -> StoreResult<Vec<Device>> {
        let state = filter.state.map(DeviceState::as_str);
        let device_type = filter.device_type.as_deref();
        let expiring = filter.expiring_before.map(to_db_time);
        let offset = i64::from(filter.offset.unwrap_or(0));
        let limit = filter.limit.map(i64::from);
        if limit == Some(0) {
            // `FETCH NEXT 0 ROWS` is an error in T-SQL.
            return Ok(Vec::new());
        }
        let sql = self.sql.device_list(
            state.is_some(),
            device_type.is_some(),
            expiring.is_some(),
            filter.offset.is_some(),
            limit.is_some(),
        );
        let (sql, state, device_type, expiring, limit) =
            (&sql, &state, &device_type, &expiring, &limit);
        let offset = &offset;
        let paged = filter.offset.is_some() || limit.is_some();
        self.run("list_devices", move |mut c| {
            Box::pin(async move {
                let mut params: Vec<&dyn ToSql> = Vec::new();
                if let Some(s) = state {
                    params.push(s);
                }
                if let Some(t) = device_type {
                    params.push(t);
                }
                if let Some(e) = expiring {
                    params.push(e);
                }
                if paged {
                    params.push(offset);
                }
                if let Some(l) = limit {
                    params.push(l);
                }
                let rows = c.query("list_devices", sql, &params).await?;
                collect(rows, rows::device)
            })
        })
        .await
    }

    async fn count_by_state(&self) -> StoreResult<Vec<(DeviceState, i64)>> {
        self.run("count_by_state", |mut c| {
            Box::pin(async move {
                let rows = c
                    .query("count_by_state", &self.sql.count_by_state, &[])
                    .await?;
                let counted = collect(rows, |row| {
                    Ok((
                        rows::text(row, "state")?.parse::<DeviceState>()?,
                        int64(row, "n")?,
                    ))
                })?;
                Ok(rows::fold_counts(&counted))
            })
        })
        .await
    }

    async fn import_devices(&self, devices: &[NewDevice]) -> StoreResult<ImportOutcome> {
        self.run("import_devices", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = import_body(&mut c, &self.sql, devices).await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn transition(
        &self,
        id: &str,
        from: &[DeviceState],
        to: TransitionTarget,
        event: AuditEvent,
    ) -> StoreResult<Transition> {
        let (to, event) = (&to, &event);
        let from = transition_slots(from);
        self.run("transition", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let now = to_db_time(OffsetDateTime::now_utc());
                    let last_error = to.last_error.as_deref();
                    let sql = null_slots(&self.sql.transition_device, [(3, last_error.is_none())]);
                    let row = c
                        .query_opt(
                            "transition",
                            &sql,
                            &[
                                &id,
                                &to.state.as_str(),
                                &last_error.unwrap_or_default(),
                                &now,
                                &to.release_factory,
                                &from[0],
                                &from[1],
                                &from[2],
                                &from[3],
                                &from[4],
                            ],
                        )
                        .await?;
                    let Some(row) = row else {
                        let found = c
                            .query_opt("transition: state", &self.sql.device_state, &[&id])
                            .await?;
                        return Err(match found {
                            None => StoreError::NotFound(format!("device {id}")),
                            Some(row) => StoreError::WrongState {
                                device: id.to_owned(),
                                actual: rows::text(&row, "state")?.parse()?,
                            },
                        });
                    };
                    let previous = rows::text(&row, "previous")?.parse::<DeviceState>()?;
                    insert_change(&mut c, &self.sql, &self.origin, id, ChangeKind::State).await?;
                    let mut revoked = Vec::new();
                    if let Some(reason) = to.revoke_credentials.as_deref() {
                        let rows = c
                            .query(
                                "transition: revoke credentials",
                                &self.sql.revoke_device_credentials,
                                &[&id, &now, &reason],
                            )
                            .await?;
                        revoked = collect(rows, |row| rows::text(row, "serial"))?;
                        revoked.sort();
                        if !revoked.is_empty() {
                            let kind = ChangeKind::Credentials;
                            insert_change(&mut c, &self.sql, &self.origin, id, kind).await?;
                        }
                    }
                    insert_event(&mut c, &self.sql, event).await?;
                    Ok(Transition {
                        from: previous,
                        to: to.state,
                        revoked,
                    })
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn set_firmware_version(&self, id: &str, version: &str) -> StoreResult<()> {
        self.run("set_firmware_version", |mut c| {
            Box::pin(async move {
                let now = to_db_time(OffsetDateTime::now_utc());
                let n = c
                    .execute(
                        "set_firmware_version",
                        &self.sql.set_firmware_version,
                        &[&id, &version, &now],
                    )
                    .await?;
                if n == 0 {
                    return Err(StoreError::NotFound(format!("device {id}")));
                }
                Ok(())
            })
        })
        .await
    }

    // ---- enrollment ---------------------------------------------------------------------

    async fn find_enrollment(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<Option<StoredEnrollment>> {
        self.run("find_enrollment", |mut c| {
            Box::pin(async move {
                c.query_opt(
                    "find_enrollment",
                    &self.sql.find_enrollment,
                    &[&device_id, &request_id],
                )
                .await?
                .map(|row| rows::enrollment(&row))
                .transpose()
            })
        })
        .await
    }

    async fn commit_enrollment(
        &self,
        commit: EnrollmentCommit,
    ) -> StoreResult<EnrollmentCommitted> {
        let commit = &commit;
        self.run("commit_enrollment", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = commit_enrollment_body(&mut c, &self.sql, &self.origin, commit).await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn pending_activations(&self) -> StoreResult<Vec<PendingActivation>> {
        self.run("pending_activations", |mut c| {
            Box::pin(async move {
                let rows = c
                    .query("pending_activations", &self.sql.pending_activations, &[])
                    .await?;
                let mut pending = Vec::with_capacity(rows.len());
                for row in &rows {
                    let device_id = rows::text(row, "id")?;
                    match (
                        rows::opt_text(row, "current_serial")?,
                        rows::opt_time(row, "activation_deadline")?,
                    ) {
                        (Some(serial), Some(deadline)) => pending.push(PendingActivation {
                            device_id,
                            serial,
                            deadline,
                        }),
                        _ => tracing::warn!(
                            device_id,
                            "enrolling device without serial or deadline; not swept"
                        ),
                    }
                }
                Ok(pending)
            })
        })
        .await
    }

    async fn activate(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let event = &event;
        self.run("activate", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result =
                    activate_body(&mut c, &self.sql, &self.origin, device_id, serial, event).await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn expire_enrollment(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let event = &event;
        self.run("expire_enrollment", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result =
                    expire_body(&mut c, &self.sql, &self.origin, device_id, serial, event).await;
                c.finish(result).await
            })
        })
        .await
    }

    // ---- credentials --------------------------------------------------------------------

    async fn credential(&self, serial: &str) -> StoreResult<Option<Credential>> {
        let sql = &self.sql.credential;
        self.run("credential", |mut c| {
            Box::pin(async move {
                c.query_opt("credential", sql, &[&serial])
                    .await?
                    .map(|row| rows::credential(&row))
                    .transpose()
            })
        })
        .await
    }

    async fn credentials_of(&self, device_id: &str) -> StoreResult<Vec<Credential>> {
        let sql = &self.sql.credentials_of;
        self.run("credentials_of", |mut c| {
            Box::pin(async move {
                let rows = c.query("credentials_of", sql, &[&device_id]).await?;
                collect(rows, rows::credential)
            })
        })
        .await
    }

    async fn insert_credential(
        &self,
        credential: &Credential,
        event: AuditEvent,
    ) -> StoreResult<()> {
        let event = &event;
        self.run("insert_credential", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    insert_credential_row(&mut c, &self.sql, credential).await?;
                    insert_event(&mut c, &self.sql, event).await
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn mark_credential_used(&self, serial: &str) -> StoreResult<bool> {
        self.run("mark_credential_used", |mut c| {
            Box::pin(async move {
                let now = to_db_time(OffsetDateTime::now_utc());
                let n = c
                    .execute(
                        "mark_credential_used",
                        &self.sql.mark_credential_used,
                        &[&serial, &now],
                    )
                    .await?;
                Ok(n > 0)
            })
        })
        .await
    }

    async fn revoke_credential(&self, serial: &str, reason: &str) -> StoreResult<bool> {
        self.run("revoke_credential", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let now = to_db_time(OffsetDateTime::now_utc());
                    let n = c
                        .execute(
                            "revoke_credential",
                            &self.sql.revoke_credential,
                            &[&serial, &now, &reason],
                        )
                        .await?;
                    if n > 0 {
                        c.execute(
                            "revoke_credential: change",
                            &self.sql.insert_credential_change,
                            &[&serial, &self.origin.as_str(), &now],
                        )
                        .await?;
                    }
                    Ok(n > 0)
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn revoke_device_credentials(
        &self,
        device_id: &str,
        reason: &str,
    ) -> StoreResult<Vec<String>> {
        self.run("revoke_device_credentials", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let now = to_db_time(OffsetDateTime::now_utc());
                    let rows = c
                        .query(
                            "revoke_device_credentials",
                            &self.sql.revoke_device_credentials,
                            &[&device_id, &now, &reason],
                        )
                        .await?;
                    let mut serials = collect(rows, |row| rows::text(row, "serial"))?;
                    serials.sort();
                    if !serials.is_empty() {
                        let kind = ChangeKind::Credentials;
                        insert_change(&mut c, &self.sql, &self.origin, device_id, kind).await?;
                    }
                    Ok(serials)
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn revoked_serials(&self) -> StoreResult<Vec<String>> {
        self.run("revoked_serials", |mut c| {
            Box::pin(async move {
                let rows = c
                    .query("revoked_serials", &self.sql.revoked_serials, &[])
                    .await?;
                collect(rows, |row| rows::text(row, "serial"))
            })
        })
        .await
    }

    // ---- configuration ------------------------------------------------------------------

    async fn latest_config(&self, device_id: &str) -> StoreResult<Option<DeviceConfig>> {
        let sql = &self.sql.latest_config;
        self.run("latest_config", |mut c| {
            Box::pin(async move {
                c.query_opt("latest_config", sql, &[&device_id])
                    .await?
                    .map(|row| rows::config(&row))
                    .transpose()
            })
        })
        .await
    }

    async fn config_version(
        &self,
        device_id: &str,
        version: i64,
    ) -> StoreResult<Option<DeviceConfig>> {
        let sql = &self.sql.config_version;
        self.run("config_version", |mut c| {
            Box::pin(async move {
                c.query_opt("config_version", sql, &[&device_id, &version])
                    .await?
                    .map(|row| rows::config(&row))
                    .transpose()
            })
        })
        .await
    }

    async fn config_history(&self, device_id: &str) -> StoreResult<Vec<DeviceConfig>> {
        let sql = &self.sql.config_history;
        self.run("config_history", |mut c| {
            Box::pin(async move {
                let rows = c.query("config_history", sql, &[&device_id]).await?;
                collect(rows, rows::config)
            })
        })
        .await
    }

    async fn published_configs(&self, after: &str, limit: u32) -> StoreResult<Vec<DeviceConfig>> {
        let sql = &self.sql.published_configs;
        let limit = i64::from(limit);
        self.run("published_configs", |mut c| {
            Box::pin(async move {
                let rows = c.query("published_configs", sql, &[&after, &limit]).await?;
                collect(rows, rows::config)
            })
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
        let (body, event) = (&body, &event);
        // Two writers computing the same next version collide on the primary key; the loser
        // simply takes the following version.
        let mut collisions = 0;
        loop {
            let result = self
                .run("insert_config", |mut c| {
                    Box::pin(async move {
                        c.begin().await?;
                        let result = async {
                            let now = OffsetDateTime::now_utc();
                            let config = insert_next_config(
                                &mut c, &self.sql, device_id, body, created_by, now,
                            )
                            .await?;
                            let kind = ChangeKind::Config;
                            insert_change(&mut c, &self.sql, &self.origin, device_id, kind).await?;
                            insert_event(&mut c, &self.sql, event).await?;
                            Ok(config)
                        }
                        .await;
                        c.finish(result).await
                    })
                })
                .await;
            match result {
                Err(StoreError::Conflict(_)) if collisions < 3 => collisions += 1,
                other => return other,
            }
        }
    }

    async fn ack_config(
        &self,
        device_id: &str,
        version: i64,
        failed_error: Option<&str>,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let event = &event;
        self.run("ack_config", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let now = to_db_time(OffsetDateTime::now_utc());
                    let n = match failed_error {
                        None => {
                            c.execute(
                                "ack_config: applied",
                                &self.sql.ack_config_applied,
                                &[&device_id, &version, &now],
                            )
                            .await?
                        }
                        Some(error) => {
                            c.execute(
                                "ack_config: failed",
                                &self.sql.ack_config_failed,
                                &[&device_id, &version, &error],
                            )
                            .await?
                        }
                    };
                    if n == 0 {
                        return Ok(false);
                    }
                    insert_event(&mut c, &self.sql, event).await?;
                    Ok(true)
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    // ---- firmware -----------------------------------------------------------------------

    async fn insert_firmware_job(&self, job: &FirmwareJob, event: AuditEvent) -> StoreResult<()> {
        let event = &event;
        self.run("insert_firmware_job", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let created_at = to_db_time(job.created_at);
                    let updated_at = to_db_time(job.updated_at);
                    c.execute(
                        "insert_firmware_job",
                        &null_slots(&self.sql.insert_firmware_job, [(8, job.error.is_none())]),
                        &[
                            &job.job_id.as_str(),
                            &job.device_id.as_str(),
                            &job.version.as_str(),
                            &job.url.as_str(),
                            &job.sha256.as_str(),
                            &job.size,
                            &job.status.as_str(),
                            &job.error.as_deref().unwrap_or_default(),
                            &job.created_by.as_str(),
                            &created_at,
                            &updated_at,
                        ],
                    )
                    .await?;
                    let (device_id, kind) = (job.device_id.as_str(), ChangeKind::Firmware);
                    insert_change(&mut c, &self.sql, &self.origin, device_id, kind).await?;
                    insert_event(&mut c, &self.sql, event).await
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    async fn firmware_job(
        &self,
        job_id: &str,
        device_id: &str,
    ) -> StoreResult<Option<FirmwareJob>> {
        let sql = &self.sql.firmware_job;
        self.run("firmware_job", |mut c| {
            Box::pin(async move {
                c.query_opt("firmware_job", sql, &[&job_id, &device_id])
                    .await?
                    .map(|row| rows::firmware_job(&row))
                    .transpose()
            })
        })
        .await
    }

    async fn latest_firmware_job(&self, device_id: &str) -> StoreResult<Option<FirmwareJob>> {
        let sql = &self.sql.latest_firmware_job;
        self.run("latest_firmware_job", |mut c| {
            Box::pin(async move {
                c.query_opt("latest_firmware_job", sql, &[&device_id])
                    .await?
                    .map(|row| rows::firmware_job(&row))
                    .transpose()
            })
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
        let event = &event;
        let from = status.predecessors();
        self.run("advance_firmware_job", |mut c| {
            Box::pin(async move {
                c.begin().await?;
                let result = async {
                    let now = to_db_time(OffsetDateTime::now_utc());
                    let n = c
                        .execute(
                            "advance_firmware_job",
                            &null_slots(&self.sql.advance_firmware_job, [(4, error.is_none())]),
                            &[
                                &job_id,
                                &device_id,
                                &status.as_str(),
                                &error.unwrap_or_default(),
                                &now,
                                &from[0],
                                &from[1],
                                &from[2],
                                &from[3],
                            ],
                        )
                        .await?;
                    if n == 0 {
                        return Ok(false);
                    }
                    let kind = ChangeKind::Firmware;
                    insert_change(&mut c, &self.sql, &self.origin, device_id, kind).await?;
                    insert_event(&mut c, &self.sql, event).await?;
                    Ok(true)
                }
                .await;
                c.finish(result).await
            })
        })
        .await
    }

    // ---- audit --------------------------------------------------------------------------

    async fn append_event(&self, event: AuditEvent) -> StoreResult<()> {
        let event = &event;
        self.run("append_event", |mut c| {
            Box::pin(async move { insert_event(&mut c, &self.sql, event).await })
        })
        .await
    }

    async fn events(&self, device_id: &str, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        let sql = &self.sql.events;
        let limit = i64::from(limit);
        self.run("events", |mut c| {
            Box::pin(async move {
                let rows = c.query("events", sql, &[&device_id, &limit]).await?;
                collect(rows, rows::event)
            })
        })
        .await
    }

    async fn delete_events_before(&self, cutoff: OffsetDateTime, batch: u32) -> StoreResult<u64> {
        let sql = &self.sql.delete_events_before;
        let cutoff = to_db_time(cutoff);
        let batch = i64::from(batch);
        self.run("delete_events_before", |mut c| {
            Box::pin(async move {
                c.execute("delete_events_before", sql, &[&cutoff, &batch])
                    .await
            })
        })
        .await
    }

    // ---- admin idempotency --------------------------------------------------------------

    async fn record_admin_reply(
        &self,
        request_id: &str,
        reply: &serde_json::Value,
    ) -> StoreResult<bool> {
        let reply = json_text(reply);
        let reply = &reply;
        self.run("record_admin_reply", |mut c| {
            Box::pin(async move {
                let now = to_db_time(OffsetDateTime::now_utc());
                let result = c
                    .execute(
                        "record_admin_reply",
                        &self.sql.insert_admin_reply,
                        &[&request_id, &reply.as_str(), &now],
                    )
                    .await;
                match result {
                    Ok(_) => Ok(true),
                    Err(StoreError::Conflict(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
        })
        .await
    }

    async fn admin_reply(&self, request_id: &str) -> StoreResult<Option<serde_json::Value>> {
        self.run("admin_reply", |mut c| {
            Box::pin(async move {
                c.query_opt("admin_reply", &self.sql.admin_reply, &[&request_id])
                    .await?
                    .map(|row| rows::json(&row, "reply"))
                    .transpose()
            })
        })
        .await
    }

    // ---- change feed --------------------------------------------------------------------

    fn origin(&self) -> &str {
        &self.origin
    }

    async fn latest_change(&self) -> StoreResult<i64> {
        self.run("latest_change", |mut c| {
            Box::pin(async move {
                let row = c
                    .query_opt("latest_change", &self.sql.latest_change, &[])
                    .await?;
                row.map_or(Ok(0), |row| int64(&row, "id"))
            })
        })
        .await
    }

    async fn changes_since(&self, cursor: i64, limit: u32) -> StoreResult<Vec<Change>> {
        let limit = i64::from(limit);
        self.run("changes_since", |mut c| {
            Box::pin(async move {
                let rows = c
                    .query("changes_since", &self.sql.changes_since, &[&cursor, &limit])
                    .await?;
                collect(rows, rows::change)
            })
        })
        .await
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> StoreResult<u64> {
        let before = to_db_time(before);
        self.run("prune_changes", |mut c| {
            Box::pin(async move {
                c.execute("prune_changes", &self.sql.prune_changes, &[&before])
                    .await
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_errors_name_the_server_without_its_password() {
        let parsed = self::url::parse("mssql://gw:s3cret@db:1433/inv").expect("parses");
        let e = name_server(StoreError::Unavailable("deadlock".into()), &parsed.target);
        assert_eq!(
            e.to_string(),
            "store unavailable: deadlock [mssql://gw:***@db:1433/inv?schema=dbo]"
        );
        let e = name_server(StoreError::Database("syntax".into()), &parsed.target);
        assert!(e
            .to_string()
            .ends_with("[mssql://gw:***@db:1433/inv?schema=dbo]"));
        let e = name_server(StoreError::Conflict("dup".into()), &parsed.target);
        assert_eq!(e.to_string(), "conflict: dup");
    }

    #[test]
    fn a_store_renders_its_statements_for_the_configured_schema() {
        let parsed = self::url::parse("server=db;database=inv;schema=myschema").expect("parses");
        let sql = Statements::new(&parsed.target.schema);
        assert!(
            sql.device.contains("FROM [myschema].onboard_devices AS d"),
            "{}",
            sql.device
        );
        for (name, text) in sql.all() {
            assert!(!text.contains("dbo."), "{name}: {text}");
        }

        let parsed = self::url::parse("mssql://db/inv").expect("parses");
        assert_eq!(parsed.target.schema, SchemaName::default());
        let sql = Statements::new(&parsed.target.schema);
        assert!(sql.device.contains("FROM [dbo].onboard_devices AS d"));
    }
}
