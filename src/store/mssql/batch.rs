//! One request to the server: a batch of statements with its parameters, sent in one round
//! trip, and the counter of round trips.
//!
//! A write a device waits for (an enrollment's commit, an activation, a config ack, a firmware
//! status, a renewal) is one [`Batch`] with its transaction inside:
//!
//! ```text
//! BEGIN TRY BEGIN TRAN; <statements, guards>; COMMIT TRAN; <outcome SELECT> END TRY
//! BEGIN CATCH IF @@TRANCOUNT > 0 ROLLBACK TRAN; THROW; END CATCH
//! ```
//!
//! so the server runs the whole transaction without waiting for the client between
//! statements. A guard that fails (a row not in the expected state) raises one of the store's
//! own error numbers ([`CONFLICT`], [`NOT_FOUND`]); the `CATCH` rolls everything back and passes
//! the error on, and `errors::classify` turns it into the matching [`StoreError`].
//!
//! Statements are added from the store's fixed templates (numbered `@P1`, `@P2`, ...): each is
//! renumbered after the parameters already bound, and a parameter given as [`Arg::Absent`] is
//! written as a `NULL` literal in place of its placeholder (tiberius's NULL parameters are
//! refused by Babelfish, see `rows::null_slots`).
//!
//! [`StoreError`]: crate::store::StoreError

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tiberius::{ColumnData, IntoSql};

/// Error number a guard raises when a row changed under the operation (optimistic concurrency,
/// a state that does not allow the change): a [`crate::store::StoreError::Conflict`].
pub const CONFLICT: u32 = 51001;

/// Error number a guard raises when the row the operation needs does not exist: a
/// [`crate::store::StoreError::NotFound`].
pub const NOT_FOUND: u32 = 51002;

/// One argument of a statement template.
#[derive(Debug, Clone)]
pub enum Arg<'a> {
    /// Bound as a parameter.
    Value(ColumnData<'a>),
    /// Absent optional value: written as `NULL` in the statement text, nothing bound.
    Absent,
}

/// `value` as an argument.
pub fn arg<'a>(value: impl IntoSql<'a> + 'a) -> Arg<'a> {
    Arg::Value(value.into_sql())
}

/// `Some(value)` as an argument, `None` as [`Arg::Absent`].
pub fn opt_arg<'a, T: IntoSql<'a> + 'a>(value: Option<T>) -> Arg<'a> {
    value.map_or(Arg::Absent, arg)
}

/// A `datetime2` value as an argument (tiberius encodes times through `ToSql` only).
pub fn time_arg<'a>(at: time::PrimitiveDateTime) -> Arg<'a> {
    match tiberius::ToSql::to_sql(&at) {
        ColumnData::DateTime2(value) => Arg::Value(ColumnData::DateTime2(value)),
        // The `time` feature always encodes a PrimitiveDateTime as datetime2.
        _ => Arg::Absent,
    }
}

/// An optional `datetime2` value as an argument.
pub fn opt_time_arg<'a>(at: Option<time::PrimitiveDateTime>) -> Arg<'a> {
    at.map_or(Arg::Absent, time_arg)
}

/// A batch being built: statement text and the parameters bound so far.
#[derive(Debug, Clone, Default)]
pub struct Batch<'a> {
    body: String,
    params: Vec<ColumnData<'a>>,
}

impl<'a> Batch<'a> {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Append `template` (placeholders `@P1..@Pn` referring to `args` in order), renumbered
    /// after the parameters already bound.
    pub fn statement(&mut self, template: &str, args: impl IntoIterator<Item = Arg<'a>>) {
        let args: Vec<Arg<'a>> = args.into_iter().collect();
        let mut numbers = Vec::with_capacity(args.len());
        for a in args {
            match a {
                Arg::Value(v) => {
                    self.params.push(v);
                    numbers.push(Some(self.params.len()));
                }
                Arg::Absent => numbers.push(None),
            }
        }
        let mut rest = template;
        while let Some(at) = rest.find("@P") {
            self.body.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let slot = after[..digits]
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| numbers.get(i).copied());
            match slot {
                Some(Some(n)) => self.body.push_str(&format!("@P{n}")),
                Some(None) => self.body.push_str("NULL"),
                // Not one of this template's placeholders: left as written.
                None => self.body.push_str(&rest[at..at + 2 + digits]),
            }
            rest = &after[digits..];
        }
        self.body.push_str(rest);
        self.body.push_str(";\n");
    }

    /// Append fixed text (control flow, guards, the outcome `SELECT`). Never data.
    pub fn raw(&mut self, text: &str) {
        self.body.push_str(text);
        self.body.push('\n');
    }

    /// Raise `error` ([`CONFLICT`], [`NOT_FOUND`]) with `message` (fixed text) when the
    /// previous statement changed no row.
    pub fn expect_rows(&mut self, error: u32, message: &str) {
        debug_assert!(!message.contains('\''), "guard messages are fixed text");
        self.raw(&format!(
            "IF @@ROWCOUNT = 0 THROW {error}, N'{message}', 1;"
        ));
    }

    /// The parameters bound so far.
    #[cfg(test)]
    pub fn params(&self) -> &[ColumnData<'a>] {
        &self.params
    }

    /// The whole batch as sent: the statements inside one transaction, then `outcome` (a
    /// `SELECT` of what the caller reads back, run after the commit; may be empty).
    pub fn transaction(&self, outcome: &str) -> String {
        format!(
            "BEGIN TRY\nBEGIN TRAN;\n{}COMMIT TRAN;\n{outcome}\nEND TRY\n\
             BEGIN CATCH\nIF @@TRANCOUNT > 0 ROLLBACK TRAN;\nTHROW;\nEND CATCH",
            self.body
        )
    }
}

/// A batch ready to send: its text and parameters.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub text: Cow<'a, str>,
    pub params: Vec<ColumnData<'a>>,
}

impl<'a> Batch<'a> {
    /// The request for [`Batch::transaction`] with `outcome`.
    pub fn into_request(self, outcome: &str) -> Request<'a> {
        Request {
            text: Cow::Owned(self.transaction(outcome)),
            params: self.params,
        }
    }
}

/// Requests sent to the server (statements, batches, transaction control), counted by every
/// connection of one store. Logins and the session options set once per connection are
/// counted apart, in `connects`, and the creation of the store's procedures in `prepares`.
#[derive(Debug, Clone, Default)]
pub struct RoundTrips {
    requests: Arc<AtomicU64>,
    connects: Arc<AtomicU64>,
    prepares: Arc<AtomicU64>,
}

impl RoundTrips {
    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections opened so far (login and session options).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Procedures created so far (once per statement and process, see `procs`).
    pub fn prepares(&self) -> u64 {
        self.prepares.load(Ordering::Relaxed)
    }

    pub(crate) fn count_prepare(&self) {
        self.prepares.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_connect(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_renumbered_after_the_bound_parameters() {
        let mut b = Batch::new();
        b.statement("UPDATE t SET a = @P2 WHERE id = @P1", [arg("x"), arg(5i64)]);
        b.statement(
            "INSERT INTO u VALUES (@P1, CAST(@P2 AS nvarchar(9)), @P3, @P1, @P10)",
            [arg("y"), Arg::Absent, arg(7i64)],
        );
        assert_eq!(
            b.body,
            "UPDATE t SET a = @P2 WHERE id = @P1;\n\
             INSERT INTO u VALUES (@P3, CAST(NULL AS nvarchar(9)), @P4, @P3, @P10);\n"
        );
        assert_eq!(b.params().len(), 4);
        assert!(b.params().iter().all(|p| !super::super::conn::is_null(p)));
    }

    #[test]
    fn the_transaction_is_inside_the_batch_and_rolled_back_on_any_error() {
        let mut b = Batch::new();
        b.statement("DELETE FROM t WHERE id = @P1", [arg("a")]);
        b.expect_rows(NOT_FOUND, "no such row");
        let text = b.transaction("SELECT 1 AS done");
        assert!(text.starts_with("BEGIN TRY\nBEGIN TRAN;\nDELETE FROM t WHERE id = @P1;\n"));
        assert!(text.contains("IF @@ROWCOUNT = 0 THROW 51002, N'no such row', 1;\nCOMMIT TRAN;\nSELECT 1 AS done\nEND TRY"));
        assert!(text.ends_with("BEGIN CATCH\nIF @@TRANCOUNT > 0 ROLLBACK TRAN;\nTHROW;\nEND CATCH"));
    }
}
