//! One pooled connection: a tiberius client plus the bookkeeping that keeps a connection in an
//! unknown state (cancelled request, open transaction) from ever going back to the pool.

use std::sync::Arc;
use std::time::Duration;

use tiberius::{Client, ColumnData, Config, Row, ToSql};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::batch::{Request, RoundTrips};
use super::errors::{breaks_connection, classify};
use super::procs::{self, Procedure, Procedures};
use super::url::Target;
use crate::store::{StoreError, StoreResult};

type TdsClient = Client<Compat<TcpStream>>;

/// Whether a parameter value is NULL. tiberius sends NULL parameters with the untyped NULL wire
/// type, which Babelfish refuses; statements write absent values as `NULL` literals instead
/// (see `rows::null_slots`), and this check keeps one from slipping through.
pub fn is_null(value: &ColumnData<'_>) -> bool {
    match value {
        ColumnData::U8(v) => v.is_none(),
        ColumnData::I16(v) => v.is_none(),
        ColumnData::I32(v) => v.is_none(),
        ColumnData::I64(v) => v.is_none(),
        ColumnData::F32(v) => v.is_none(),
        ColumnData::F64(v) => v.is_none(),
        ColumnData::Bit(v) => v.is_none(),
        ColumnData::String(v) => v.is_none(),
        ColumnData::Guid(v) => v.is_none(),
        ColumnData::Binary(v) => v.is_none(),
        ColumnData::Numeric(v) => v.is_none(),
        ColumnData::Xml(v) => v.is_none(),
        ColumnData::DateTime(v) => v.is_none(),
        ColumnData::SmallDateTime(v) => v.is_none(),
        ColumnData::Time(v) => v.is_none(),
        ColumnData::Date(v) => v.is_none(),
        ColumnData::DateTime2(v) => v.is_none(),
        ColumnData::DateTimeOffset(v) => v.is_none(),
    }
}

fn refuse_null_parameters(context: &str, params: &[&dyn ToSql]) -> StoreResult<()> {
    match params.iter().position(|p| is_null(&p.to_sql())) {
        Some(i) => Err(StoreError::Database(format!(
            "{context}: parameter @P{} is NULL (write absent values as NULL literals)",
            i + 1
        ))),
        None => Ok(()),
    }
}

/// How a request failed: the driver's error (not yet classified), or the store's own (a
/// timeout).
enum QueryFailure {
    Server(tiberius::error::Error),
    Store(StoreError),
}

/// A live session to the server.
pub struct Connection {
    client: TdsClient,
    /// Set when the session can no longer be trusted (I/O error, timeout, failed rollback).
    broken: bool,
    /// Set while a request is on the wire; still set if its future was dropped half-way.
    busy: bool,
    /// Set between `BEGIN TRAN` and a successful `COMMIT` / `ROLLBACK`. A connection dropped
    /// with this set (the caller's future was cancelled) is discarded, never reused.
    in_transaction: bool,
    /// Bound on every request, from `[store] query_timeout_ms`.
    query_timeout: Duration,
    /// Counts every request this connection sends.
    round_trips: RoundTrips,
    /// The store's statements as procedures (see `procs`).
    procedures: Arc<Procedures>,
}

/// The server's error number, if `err` is a server error.
fn server_code(err: &tiberius::error::Error) -> Option<u32> {
    match err {
        tiberius::error::Error::Server(token) => Some(token.code()),
        _ => None,
    }
}

impl Connection {
    /// Whether the pool must discard this connection instead of reusing it.
    pub fn is_unusable(&self) -> bool {
        self.broken || self.busy || self.in_transaction
    }

    fn fail(&mut self, context: &str, err: tiberius::error::Error) -> StoreError {
        if breaks_connection(&err) {
            self.broken = true;
        }
        classify(context, &err)
    }

    fn timed_out(&mut self, context: &str) -> StoreError {
        // The response is half read: the session is out of sync.
        self.broken = true;
        StoreError::Unavailable(format!(
            "{context}: no answer within {} ms",
            self.query_timeout.as_millis()
        ))
    }

    /// Run a parameterised statement; returns the rows affected (all statements summed).
    pub async fn execute(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> StoreResult<u64> {
        refuse_null_parameters(context, params)?;
        self.busy = true;
        self.round_trips.count_request();
        let result =
            tokio::time::timeout(self.query_timeout, self.client.execute(sql, params)).await;
        match result {
            Ok(Ok(done)) => {
                self.busy = false;
                Ok(done.total())
            }
            Ok(Err(e)) => {
                self.busy = false;
                Err(self.fail(context, e))
            }
            Err(_) => Err(self.timed_out(context)),
        }
    }

    /// Run a parameterised query; returns the rows of its first result set.
    pub async fn query(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> StoreResult<Vec<Row>> {
        self.query_with(context, sql, params, true).await
    }

    /// [`Connection::query`], always as text: for the store's own housekeeping of procedures.
    pub async fn query_as_text(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> StoreResult<Vec<Row>> {
        self.query_with(context, sql, params, false).await
    }

    async fn query_with(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&dyn ToSql],
        as_procedure: bool,
    ) -> StoreResult<Vec<Row>> {
        refuse_null_parameters(context, params)?;
        let procedure = if as_procedure {
            let values: Vec<ColumnData<'_>> = params.iter().map(|p| p.to_sql()).collect();
            self.procedure(sql, &values).await
        } else {
            None
        };
        let text = procedure.as_ref().map_or(sql, |p| p.call.as_str());
        let result = match self.send_query(context, text, params).await {
            Err(QueryFailure::Server(e)) if self.dropped(procedure.as_ref(), &e) => {
                self.send_query(context, sql, params).await
            }
            other => other,
        };
        result.map_err(|f| self.failure(context, f))
    }

    /// The store's error for a failed request.
    fn failure(&mut self, context: &str, failure: QueryFailure) -> StoreError {
        match failure {
            QueryFailure::Server(e)
                if self.in_transaction && procs::is_missing(&e, procs::PREFIX) =>
            {
                // See `dropped`: the transaction is gone with the error.
                self.broken = true;
                StoreError::Unavailable(format!(
                    "{context}: a procedure of the store was dropped during the transaction"
                ))
            }
            QueryFailure::Server(e) => self.fail(context, e),
            QueryFailure::Store(e) => e,
        }
    }

    async fn send_query(
        &mut self,
        context: &str,
        text: &str,
        params: &[&dyn ToSql],
    ) -> Result<Vec<Row>, QueryFailure> {
        self.busy = true;
        self.round_trips.count_request();
        let client = &mut self.client;
        let result = tokio::time::timeout(self.query_timeout, async move {
            client.query(text, params).await?.into_first_result().await
        })
        .await;
        match result {
            Ok(Ok(rows)) => {
                self.busy = false;
                Ok(rows)
            }
            Ok(Err(e)) => {
                self.busy = false;
                Err(QueryFailure::Server(e))
            }
            Err(_) => Err(QueryFailure::Store(self.timed_out(context))),
        }
    }

    /// The procedure to call for `text` with `values`, created first if need be; `None` to
    /// send the text itself (see `procs`).
    async fn procedure(&mut self, text: &str, values: &[ColumnData<'_>]) -> Option<Arc<Procedure>> {
        let (procedure, exists) = self.procedures.lookup(text, values)?;
        if exists {
            return Some(procedure);
        }
        if self.in_transaction {
            return None;
        }
        self.busy = true;
        self.round_trips.count_prepare();
        let client = &mut self.client;
        let create = procedure.create.as_str();
        let result = tokio::time::timeout(self.query_timeout, async move {
            client.simple_query(create).await?.into_results().await
        })
        .await;
        match result {
            Ok(Ok(_)) => {
                self.busy = false;
                self.procedures.created(&procedure.name);
                Some(procedure)
            }
            Ok(Err(e)) => {
                self.busy = false;
                match server_code(&e) {
                    Some(procs::ALREADY_EXISTS) => {
                        self.procedures.created(&procedure.name);
                        return Some(procedure);
                    }
                    Some(code) if procs::is_permission_error(code) => {
                        tracing::warn!(
                            code,
                            "this login may not create procedures: statements are sent as text"
                        );
                        self.procedures.disable();
                    }
                    _ => {
                        tracing::debug!(error = %e, "procedure not created; statement sent as text");
                        if breaks_connection(&e) {
                            self.broken = true;
                        }
                    }
                }
                None
            }
            Err(_) => {
                // The connection is in an unknown state: `busy` stays set, it is discarded.
                None
            }
        }
    }

    /// Whether `err` says that `procedure` (just called) no longer exists: forgotten, so that
    /// its next use creates it again, and `true` when the caller may send the text instead.
    /// Inside a transaction it may not: the error ended the transaction (`XACT_ABORT`), so the
    /// connection is discarded and the error reported as transient, and the operation is run
    /// again from its start.
    fn dropped(
        &mut self,
        procedure: Option<&Arc<Procedure>>,
        err: &tiberius::error::Error,
    ) -> bool {
        let Some(p) = procedure.filter(|p| procs::is_missing(err, &p.name)) else {
            return false;
        };
        self.procedures.forget(&p.name);
        if self.in_transaction {
            self.broken = true;
            return false;
        }
        !self.broken
    }

    /// Run a parameterised query expected to return at most one row.
    pub async fn query_opt(
        &mut self,
        context: &str,
        sql: &str,
        params: &[&dyn ToSql],
    ) -> StoreResult<Option<Row>> {
        Ok(self.query(context, sql, params).await?.into_iter().next())
    }

    /// Run a parameter-free batch (DDL, transaction control). Only ever called with text the
    /// store builds itself (constant templates filled in with the validated schema name),
    /// never with data.
    pub async fn batch(&mut self, context: &str, sql: &str) -> StoreResult<()> {
        self.busy = true;
        self.round_trips.count_request();
        let client = &mut self.client;
        let result = tokio::time::timeout(self.query_timeout, async move {
            client.simple_query(sql).await?.into_results().await
        })
        .await;
        match result {
            Ok(Ok(_)) => {
                self.busy = false;
                Ok(())
            }
            Ok(Err(e)) => {
                self.busy = false;
                Err(self.fail(context, e))
            }
            Err(_) => Err(self.timed_out(context)),
        }
    }

    /// Send `request` (a batch with its transaction inside, see `batch`) in one round trip;
    /// returns every result set it produced, in order. After an error the session is rolled
    /// back (the batch's `CATCH` normally did so already), so it never goes back to the pool
    /// with a transaction open.
    pub async fn request(
        &mut self,
        context: &str,
        request: &Request<'_>,
    ) -> StoreResult<Vec<Vec<Row>>> {
        if let Some(i) = request.params.iter().position(is_null) {
            return Err(StoreError::Database(format!(
                "{context}: parameter @P{} is NULL (write absent values as NULL literals)",
                i + 1
            )));
        }
        let procedure = self.procedure(&request.text, &request.params).await;
        let text = procedure
            .as_ref()
            .map_or(request.text.as_ref(), |p| p.call.as_str());
        let result = match self.send_request(context, text, request).await {
            Err(QueryFailure::Server(e)) if self.dropped(procedure.as_ref(), &e) => {
                self.send_request(context, &request.text, request).await
            }
            other => other,
        };
        match result {
            Ok(sets) => Ok(sets),
            Err(failure) => {
                let error = self.failure(context, failure);
                self.rollback().await;
                Err(error)
            }
        }
    }

    async fn send_request(
        &mut self,
        context: &str,
        text: &str,
        request: &Request<'_>,
    ) -> Result<Vec<Vec<Row>>, QueryFailure> {
        let mut query = tiberius::Query::new(text);
        for param in &request.params {
            query.bind(param.clone());
        }
        self.busy = true;
        self.round_trips.count_request();
        let client = &mut self.client;
        let result = tokio::time::timeout(self.query_timeout, async move {
            query.query(client).await?.into_results().await
        })
        .await;
        match result {
            Ok(Ok(sets)) => {
                self.busy = false;
                Ok(sets)
            }
            Ok(Err(e)) => {
                self.busy = false;
                Err(QueryFailure::Server(e))
            }
            Err(_) => Err(QueryFailure::Store(self.timed_out(context))),
        }
    }

    /// `BEGIN TRAN` (the session runs with `XACT_ABORT ON`: any error dooms the transaction).
    pub async fn begin(&mut self) -> StoreResult<()> {
        self.in_transaction = true;
        self.batch("begin transaction", "BEGIN TRAN").await
    }

    /// Commit on `Ok`, roll back on `Err`; returns `result` (or the commit's error).
    pub async fn finish<T>(&mut self, result: StoreResult<T>) -> StoreResult<T> {
        match result {
            Ok(value) => {
                if let Err(e) = self.batch("commit", "COMMIT TRAN").await {
                    self.rollback().await;
                    return Err(e);
                }
                self.in_transaction = false;
                Ok(value)
            }
            Err(e) => {
                self.rollback().await;
                Err(e)
            }
        }
    }

    /// Roll back whatever is open. If that cannot be confirmed, the connection is marked broken
    /// so that the pool closes it (the server then rolls back with the session).
    pub async fn rollback(&mut self) {
        if self.broken {
            return;
        }
        match self
            .batch("rollback", "IF @@TRANCOUNT > 0 ROLLBACK TRAN")
            .await
        {
            Ok(()) => self.in_transaction = false,
            Err(e) => {
                tracing::warn!(error = %e, "rollback failed; discarding the connection");
                self.broken = true;
            }
        }
    }
}

/// Opens connections for the pool.
pub struct Manager {
    config: Config,
    target: Target,
    connect_timeout: Duration,
    query_timeout: Duration,
    /// Shared with every connection this manager opens.
    round_trips: RoundTrips,
    /// Shared with every connection this manager opens; off until the schema is migrated.
    procedures: Arc<Procedures>,
    /// Why the latest connection attempt failed (cleared by a success). The pool opens
    /// connections in the background, so a checkout that times out reports this reason.
    last_error: LastError,
}

/// The reason the latest connection attempt failed, shared between the pool's manager and the
/// store (bb8 does not hand its manager out).
#[derive(Debug, Clone, Default)]
pub struct LastError(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl LastError {
    /// The reason, if the latest attempt failed.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|e| e.clone())
    }

    fn set(&self, reason: Option<String>) {
        if let Ok(mut last) = self.0.lock() {
            *last = reason;
        }
    }
}

impl Manager {
    /// A handle on the reason the latest connection attempt failed.
    pub fn last_error(&self) -> LastError {
        self.last_error.clone()
    }

    /// The round-trip counter of every connection this manager opens.
    pub fn round_trips(&self) -> RoundTrips {
        self.round_trips.clone()
    }

    /// The store's procedures (see `procs`), shared by every connection this manager opens.
    pub fn procedures(&self) -> Arc<Procedures> {
        self.procedures.clone()
    }

    fn remember(&self, result: &StoreResult<Connection>) {
        self.last_error
            .set(result.as_ref().err().map(ToString::to_string));
    }

    pub fn new(
        config: Config,
        target: Target,
        connect_timeout: Duration,
        query_timeout: Duration,
    ) -> Self {
        let mut config = config;
        config.handshake_timeout(Some(connect_timeout));
        // Our own per-request bound is `query_timeout`; keep the driver's a little longer so
        // ours is the one that fires and is reported.
        config.command_timeout(Some(query_timeout + Duration::from_secs(1)));
        Manager {
            config,
            connect_timeout,
            query_timeout,
            procedures: Arc::new(Procedures::new(&target.schema, false)),
            target,
            round_trips: RoundTrips::default(),
            last_error: LastError::default(),
        }
    }

    /// Dial, log in, and set the session options every statement relies on.
    async fn open(&self) -> StoreResult<Connection> {
        let mut config = self.config.clone();
        // Azure SQL may redirect the login to another node: follow it once.
        for _ in 0..2 {
            let addr = config.get_addr();
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|e| StoreError::Unavailable(format!("connect to {}: {e}", self.target)))?;
            tcp.set_nodelay(true)
                .map_err(|e| StoreError::Unavailable(format!("connect to {}: {e}", self.target)))?;
            match Client::connect(config.clone(), tcp.compat_write()).await {
                Ok(client) => {
                    let mut conn = Connection {
                        client,
                        broken: false,
                        busy: false,
                        in_transaction: false,
                        query_timeout: self.query_timeout,
                        round_trips: RoundTrips::default(),
                        procedures: self.procedures.clone(),
                    };
                    // XACT_ABORT: any error aborts and rolls back the whole transaction, so a
                    // failed statement can never leave half a transaction behind. Set at batch
                    // level so it holds for the whole session.
                    conn.batch("session options", "SET XACT_ABORT ON; SET NOCOUNT OFF;")
                        .await?;
                    // Counted from here on: the login and its session options count as one
                    // connect.
                    self.round_trips.count_connect();
                    conn.round_trips = self.round_trips.clone();
                    return Ok(conn);
                }
                Err(tiberius::error::Error::Routing { host, port }) => {
                    config.host(&host);
                    config.port(port);
                }
                Err(e) => {
                    let err = classify(&format!("login to {}", self.target), &e);
                    return Err(err);
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "login to {}: redirected more than once",
            self.target
        )))
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = StoreError;

    async fn connect(&self) -> Result<Connection, StoreError> {
        let result = match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "connect to {}: no answer within {} ms",
                self.target,
                self.connect_timeout.as_millis()
            ))),
        };
        self.remember(&result);
        result
    }

    async fn is_valid(&self, conn: &mut Connection) -> Result<(), StoreError> {
        conn.batch("ping", "SELECT 1").await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.is_unusable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_parameters_are_refused_before_sending() {
        let present: Option<&str> = Some("x");
        let absent: Option<&str> = None;
        let n = 5i64;
        assert!(refuse_null_parameters("t", &[&"a", &n, &present]).is_ok());
        let err = refuse_null_parameters("t", &[&"a", &absent]).expect_err("null");
        assert!(err.to_string().contains("@P2"), "{err}");
        let no_time: Option<time::PrimitiveDateTime> = None;
        assert!(refuse_null_parameters("t", &[&no_time]).is_err());
        assert!(is_null(&ColumnData::Binary(None)));
        assert!(!is_null(&ColumnData::I32(Some(0))));
    }
}
