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
//! - `procs`: each statement as a stored procedure created on first use (parsed once by the
//!   server, not on every call).
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

mod batch;
mod conn;
mod errors;
mod procs;
mod rows;
mod schema;
mod statements;
mod url;
mod writes;

use std::time::Duration;

use futures::future::BoxFuture;
use tiberius::{IntoSql, ToSql};
use time::OffsetDateTime;

use self::batch::Request;
use self::conn::{Connection, LastError, Manager};
use self::rows::{int64, json_text, null_slots, to_db_time};
use self::statements::Statements;
use super::*;

pub use self::batch::RoundTrips;
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
    /// Requests every connection of the pool has sent (exposed for tests and benchmarks).
    round_trips: RoundTrips,
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
        let parsed = self::url::parse_with(url, config)?;
        let target = parsed.target.clone();
        if target.trust_server_certificate {
            // Once per store; the driver's own per-connection warning is filtered out.
            tracing::warn!(
                target = %target,
                "the SQL Server's certificate is not checked (trust_server_certificate): \
                 for a development server only; give [store] ca_file instead"
            );
        }
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        let query_timeout = Duration::from_millis(config.query_timeout_ms.max(1));
        let manager = Manager::new(
            parsed.config,
            target.clone(),
            connect_timeout,
            query_timeout,
        );
        let last_connect_error = manager.last_error();
        let round_trips = manager.round_trips();
        let procedures = manager.procedures();
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
            round_trips,
            origin: new_origin(),
        };
        store.migrate(query_timeout).await?;
        // Statements go as procedures once the tables they name exist.
        procedures.enable();
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

    /// Drop the store's procedures (`onboard_p_*` in its schema, see `procs`); returns how
    /// many. Harmless at any time: each is made again when its statement is next sent.
    pub async fn drop_procedures(&self) -> StoreResult<usize> {
        let schema = &self.target.schema;
        self.run("drop_procedures", |mut c| {
            Box::pin(async move { schema::drop_procedures(&mut c, schema).await })
        })
        .await
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

    /// Create (`create`) or drop database `name` on the server `url` names, on a connection of
    /// its own. For throw-away test databases, like [`MssqlStore::drop_schema`]: `name` follows
    /// the rules of a [`SchemaName`]. Dropping waits (up to `config.connect_timeout_ms`, at least
    /// 5 s) for the server to end the sessions of stores that used it.
    pub async fn scratch_database(
        url: &str,
        config: &crate::config::StoreConfig,
        name: &str,
        create: bool,
    ) -> StoreResult<()> {
        let name = SchemaName::parse(name)?;
        let parsed = self::url::parse(url)?;
        let timeout = Duration::from_millis(config.connect_timeout_ms.max(5_000));
        let manager = Manager::new(parsed.config, parsed.target, timeout, timeout);
        let mut conn = bb8::ManageConnection::connect(&manager).await?;
        let quoted = name.quoted();
        let bare = name.as_str();
        if create {
            let sql = format!("IF DB_ID(N'{bare}') IS NULL CREATE DATABASE {quoted}");
            return conn.batch("create database", &sql).await;
        }
        let sql = format!("IF DB_ID(N'{bare}') IS NOT NULL DROP DATABASE {quoted}");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match conn.batch("drop database", &sql).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
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

impl MssqlStore {
    /// Send `request` (one batch, its transaction inside) on a pooled connection: one round
    /// trip, repeated as a whole on a fresh connection after a transient error.
    async fn one_trip(
        &self,
        op: &'static str,
        request: &Request<'_>,
    ) -> StoreResult<Vec<Vec<tiberius::Row>>> {
        self.run(op, |mut c| {
            Box::pin(async move { c.request(op, request).await })
        })
        .await
    }

    /// One lookup and the device's row, in one request (`sql`: two `SELECT`s, the device's
    /// second): what a connecting or enrolling device waits for.
    async fn with_device<T>(
        &self,
        op: &'static str,
        sql: &str,
        params: Vec<tiberius::ColumnData<'_>>,
        map: fn(&tiberius::Row) -> StoreResult<T>,
    ) -> StoreResult<(Option<T>, Option<Device>)> {
        let request = Request {
            text: std::borrow::Cow::Borrowed(sql),
            params,
        };
        let sets = self.one_trip(op, &request).await?;
        let found = sets.len();
        let Ok([first, device]) = <[Vec<tiberius::Row>; 2]>::try_from(sets) else {
            return Err(StoreError::Corrupt(format!(
                "{op}: {found} result sets, expected 2"
            )));
        };
        Ok((
            first_row(first).map(|r| map(&r)).transpose()?,
            first_row(device).map(|r| rows::device(&r)).transpose()?,
        ))
    }

    /// This instance's stamp and the current time, for the change-feed rows of a batch.
    fn feed(&self) -> writes::Feed<'_> {
        writes::Feed {
            origin: &self.origin,
            now: OffsetDateTime::now_utc(),
        }
    }

    /// Requests sent to the server by this store's connections so far (see [`RoundTrips`]).
    pub fn round_trips(&self) -> RoundTrips {
        self.round_trips.clone()
    }
}

/// `host:port` the store dials for connection string `url`.
pub fn server_address(url: &str) -> StoreResult<String> {
    Ok(self::url::parse(url)?.target.addr)
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

/// The first row of a batch's last result set (its outcome).
fn outcome(sets: &[Vec<tiberius::Row>]) -> Option<&tiberius::Row> {
    sets.last().and_then(|rows| rows.first())
}

/// Whether a conditional write changed its row ([`writes::CHANGED`]).
fn changed(sets: &[Vec<tiberius::Row>]) -> StoreResult<bool> {
    let row =
        outcome(sets).ok_or_else(|| StoreError::Database("a write returned no outcome".into()))?;
    Ok(rows::int32(row, "changed")? > 0)
}

/// The first row of a result set (a lookup by key has at most one).
fn first_row(rows: Vec<tiberius::Row>) -> Option<tiberius::Row> {
    rows.into_iter().next()
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

    fn requests_sent(&self) -> Option<u64> {
        Some(self.round_trips.requests())
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
        let feed = self.feed();
        let request = writes::transition(&self.sql, id, from, &to, &event, feed);
        let sets = self.one_trip("transition", &request).await?;
        let row = outcome(&sets)
            .ok_or_else(|| StoreError::Database("a transition returned no outcome".into()))?;
        let state = rows::opt_text(row, "previous")?;
        let Some(state) = state else {
            return Err(StoreError::NotFound(format!("device {id}")));
        };
        let state = state.parse::<DeviceState>()?;
        if rows::int32(row, "changed")? == 0 {
            return Err(StoreError::WrongState {
                device: id.to_owned(),
                actual: state,
            });
        }
        let mut revoked: Vec<String> = rows::opt_text(row, "revoked")?
            .map(|list| list.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        revoked.sort();
        Ok(Transition {
            from: state,
            to: to.state,
            revoked,
        })
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

    async fn enrollment_context(
        &self,
        device_id: &str,
        request_id: &str,
    ) -> StoreResult<(Option<StoredEnrollment>, Option<Device>)> {
        self.with_device(
            "enrollment_context",
            &self.sql.enrollment_context,
            vec![device_id.into_sql(), request_id.into_sql()],
            rows::enrollment,
        )
        .await
    }

    async fn commit_enrollment(
        &self,
        commit: EnrollmentCommit,
    ) -> StoreResult<EnrollmentCommitted> {
        let request = writes::commit_enrollment(&self.sql, &commit, self.feed());
        let sets = self
            .one_trip("commit_enrollment", &request)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => StoreError::Conflict(format!(
                    "enrollment {}/{}: {m}",
                    commit.device_id, commit.request_id
                )),
                other => other,
            })?;
        let row = outcome(&sets)
            .ok_or_else(|| StoreError::Database("insert config returned no row".into()))?;
        Ok(EnrollmentCommitted {
            config: rows::config(row)?,
            generation: commit.expected_generation.map_or(1, |g| g + 1),
        })
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
        let request = writes::activate(&self.sql, device_id, serial, &event, self.feed());
        changed(&self.one_trip("activate", &request).await?)
    }

    async fn expire_enrollment(
        &self,
        device_id: &str,
        serial: &str,
        event: AuditEvent,
    ) -> StoreResult<bool> {
        let request = writes::expire_enrollment(&self.sql, device_id, serial, &event, self.feed());
        changed(&self.one_trip("expire_enrollment", &request).await?)
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

    async fn credential_and_device(
        &self,
        serial: &str,
        device_id: &str,
    ) -> StoreResult<(Option<Credential>, Option<Device>)> {
        self.with_device(
            "credential_and_device",
            &self.sql.credential_and_device,
            vec![serial.into_sql(), device_id.into_sql()],
            rows::credential,
        )
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
        let request = writes::insert_credential(&self.sql, credential, &event);
        self.one_trip("insert_credential", &request)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("credential {} already exists", credential.serial))
                }
                StoreError::NotFound(_) => {
                    StoreError::NotFound(format!("device {}", credential.device_id))
                }
                other => other,
            })?;
        Ok(())
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
        // Two writers computing the same next version collide on the primary key; the loser
        // simply takes the following version.
        let mut collisions = 0;
        loop {
            let request =
                writes::insert_config(&self.sql, device_id, &body, created_by, &event, self.feed());
            match self.one_trip("insert_config", &request).await {
                Ok(sets) => {
                    let row = outcome(&sets).ok_or_else(|| {
                        StoreError::Database("insert config returned no row".into())
                    })?;
                    return rows::config(row);
                }
                Err(StoreError::Conflict(_)) if collisions < 3 => collisions += 1,
                Err(StoreError::NotFound(_)) => {
                    return Err(StoreError::NotFound(format!("device {device_id}")))
                }
                Err(other) => return Err(other),
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
        let now = OffsetDateTime::now_utc();
        let request = writes::ack_config(&self.sql, device_id, version, failed_error, &event, now);
        changed(&self.one_trip("ack_config", &request).await?)
    }

    // ---- firmware -----------------------------------------------------------------------

    async fn insert_firmware_job(&self, job: &FirmwareJob, event: AuditEvent) -> StoreResult<()> {
        let request = writes::insert_firmware_job(&self.sql, job, &event, &self.origin);
        self.one_trip("insert_firmware_job", &request)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => {
                    StoreError::NotFound(format!("device {}", job.device_id))
                }
                other => other,
            })?;
        Ok(())
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
        let request = writes::advance_firmware_job(
            &self.sql,
            (job_id, device_id),
            status,
            error,
            &event,
            self.feed(),
        );
        changed(&self.one_trip("advance_firmware_job", &request).await?)
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
