//! The writer thread: every write of one `SqliteStore` runs on it, and writes that are waiting
//! together are committed together.
//!
//! SQLite allows one writer at a time, and most of a small write's cost is its COMMIT (the WAL
//! frames and the lock). So the thread takes the first waiting write, then whatever else is
//! already queued (at most [`MAX_BATCH`]), and runs them in order inside one `BEGIN IMMEDIATE`
//! transaction, each under its own SAVEPOINT:
//! - a write that returns `Err` (or panics) is rolled back to its savepoint and gets its error;
//!   the others in the batch are not touched by it;
//! - nobody hears a result before the COMMIT has succeeded, so a caller told "done" is never
//!   undone, and its next read sees the write;
//! - when the COMMIT fails, or SQLite rolls the whole transaction back itself (disk full, I/O
//!   error), every write of the batch gets that error and none of them is kept.
//!
//! A lone write costs what it did on the blocking pool: one transaction. The queue is bounded
//! ([`QUEUE`]): callers wait for room, asynchronously, so a burst cannot grow memory. The thread
//! ends when the store is dropped (the queue's last sender goes away).

use std::panic::{catch_unwind, AssertUnwindSafe};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::{map_err, StoreError, StoreResult};

/// Writes run in one transaction at most.
pub const MAX_BATCH: usize = 64;

/// Writes waiting for the thread at most; further callers wait for room.
pub const QUEUE: usize = 1024;

/// One write waiting for its turn.
trait Job: Send {
    /// Run inside the open transaction; whether it succeeded (and is kept).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Deliver the write's result, given how the transaction ended.
    fn finish(self: Box<Self>, outcome: &StoreResult<()>);
}

struct Pending<T, F> {
    write: Option<F>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = match self.write.take() {
            Some(write) => catch_unwind(AssertUnwindSafe(|| write(conn)))
                .unwrap_or_else(|_| Err(StoreError::Database("a write panicked".into()))),
            None => Err(StoreError::Database("a write ran twice".into())),
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, outcome: &StoreResult<()>) {
        let result = match (self.result, outcome) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(e)) => Err(same_kind(e)),
            (None, Err(e)) => Err(same_kind(e)),
            (None, Ok(())) => Err(StoreError::Database("a write never ran".into())),
        };
        // The caller may have gone away (its future dropped): the write stands all the same.
        let _ = self.reply.send(result);
    }
}

/// The batch's error, for each of its writes.
fn same_kind(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        other => StoreError::Database(other.to_string()),
    }
}

/// The handle the store keeps: where writes are queued.
pub struct Writer {
    queue: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Start the thread that owns `conn` from now on.
    pub fn spawn(conn: Connection) -> StoreResult<Writer> {
        let (queue, jobs) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || run(conn, jobs))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the sqlite writer: {e}")))?;
        Ok(Writer { queue })
    }

    /// Run `write` in a transaction (possibly shared with other writes, each under its own
    /// savepoint); its result once the transaction has committed.
    pub async fn write<T, F>(&self, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending {
            write: Some(write),
            result: None,
            reply,
        });
        self.queue.send(job).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the sqlite writer has stopped".into())
}

/// The thread's loop: one batch per turn until every sender is gone.
fn run(conn: Connection, mut jobs: mpsc::Receiver<Box<dyn Job>>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = commit_batch(&conn, &mut batch);
        for job in batch.drain(..) {
            job.finish(&outcome);
        }
    }
}

/// Run every job of `batch` in one transaction, each under a savepoint; how it ended.
fn commit_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> StoreResult<()> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
    for job in batch.iter_mut() {
        if let Err(e) = run_in_savepoint(conn, job.as_mut()) {
            if !conn.is_autocommit() {
                // Best effort: the error is what the callers hear either way.
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(map_err(e));
    }
    Ok(())
}

/// Run one job under a savepoint, rolled back to when the job fails. `Err` only when the
/// transaction itself is lost (SQLite rolled it back, or the savepoint could not be managed).
fn run_in_savepoint(conn: &Connection, job: &mut dyn Job) -> StoreResult<()> {
    conn.execute_batch("SAVEPOINT job").map_err(map_err)?;
    let ok = job.run(conn);
    if conn.is_autocommit() {
        return Err(StoreError::Unavailable(
            "sqlite rolled back the transaction after an error".into(),
        ));
    }
    let end = if ok {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end).map_err(map_err)
}
