//! Statements run as stored procedures the store creates on first use.
//!
//! A parameterised statement sent as text is parsed by the server on every call. SQL Server
//! caches its plan by text, but Babelfish parses every batch anew (its T-SQL parser was half
//! of the server's CPU under an enrollment load). A procedure is parsed once: so each
//! statement text the store sends (a read's `SELECT`, a write's whole batch) becomes
//! procedure `<schema>.onboard_p_<hash of text and parameter types>`, created the first time
//! it is needed, and each call is a short `EXEC` with the same parameters, still one round
//! trip.
//!
//! The procedure's body is the statement's own text: fixed templates filled in with the
//! schema, never data (data stays in parameters). Procedures are an optimisation only:
//! - a login that may not create them (no `CREATE PROCEDURE` permission) turns them off for
//!   the store, with one warning; statements then go as text, as before;
//! - none is created inside an open transaction (the DDL would hold its locks there);
//! - one dropped behind the store's back is re-created on its next use;
//! - at most [`MAX_PROCEDURES`] per store, and none for a statement with more than
//!   [`MAX_PARAMS`] parameters (bulk statements whose shape varies with their input).
//!
//! Their creation is counted apart from requests ([`super::batch::RoundTrips::prepares`]):
//! once per statement and process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tiberius::ColumnData;

use super::schema::SchemaName;

/// Procedures one store creates at most.
pub const MAX_PROCEDURES: usize = 512;
/// Statements with more parameters are sent as text.
pub const MAX_PARAMS: usize = 128;
/// Name prefix of the store's procedures (dropped with the schema).
pub const PREFIX: &str = "onboard_p_";

/// Error numbers: the procedure exists already (another gateway made it first); no such
/// procedure (dropped since); permission denied.
pub const ALREADY_EXISTS: u32 = 2714;
pub const NOT_FOUND: u32 = 2812;
const PERMISSION_DENIED: &[u32] = &[262, 297, 300, 2760, 15247];

/// Whether `err` says that the procedure `name` (or, given [`PREFIX`], one of the store's)
/// does not exist: error 2812 on SQL Server; Babelfish raises its generic error number with
/// "procedure <schema>.<name>(...) does not exist".
pub fn is_missing(err: &tiberius::error::Error, name: &str) -> bool {
    match err {
        tiberius::error::Error::Server(token) => {
            token.code() == NOT_FOUND
                || (token.message().contains(name) && token.message().contains("does not exist"))
        }
        _ => false,
    }
}

/// Whether a creation that failed with `code` means this login may not create procedures.
pub fn is_permission_error(code: u32) -> bool {
    PERMISSION_DENIED.contains(&code)
}

/// One statement as a procedure: its name, the DDL creating it and the `EXEC` calling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Procedure {
    pub name: String,
    pub create: String,
    pub call: String,
}

/// The procedures of one store, shared by its pooled connections: each statement text is
/// hashed and rendered as DDL once, the first time it is sent, never again per call.
#[derive(Debug)]
pub struct Procedures {
    schema: String,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    enabled: bool,
    /// Statement text -> its procedures, one per list of parameter types.
    known: HashMap<String, Vec<Known>>,
    /// Entries of `known`, all texts together.
    count: usize,
}

#[derive(Debug)]
struct Known {
    types: Vec<&'static str>,
    procedure: Arc<Procedure>,
    /// It exists on the server.
    created: bool,
}

impl State {
    fn find(&mut self, name: &str) -> Option<&mut Known> {
        self.known
            .values_mut()
            .flatten()
            .find(|k| k.procedure.name == name)
    }
}

impl Procedures {
    pub fn new(schema: &SchemaName, enabled: bool) -> Procedures {
        Procedures {
            schema: schema.quoted(),
            state: Mutex::new(State {
                enabled,
                known: HashMap::new(),
                count: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The procedure for `text` with `params`, if statements go as procedures and this one
    /// can; `true` when it exists already.
    pub fn lookup(&self, text: &str, params: &[ColumnData<'_>]) -> Option<(Arc<Procedure>, bool)> {
        if params.len() > MAX_PARAMS {
            return None;
        }
        let types = params
            .iter()
            .map(declared_type)
            .collect::<Option<Vec<_>>>()?;
        {
            let state = self.state();
            if !state.enabled {
                return None;
            }
            let known = state.known.get(text).into_iter().flatten();
            if let Some(k) = known.into_iter().find(|k| k.types == types) {
                return Some((k.procedure.clone(), k.created));
            }
            if state.count >= MAX_PROCEDURES {
                return None;
            }
        }
        // First use of this statement: hashed and rendered outside the lock.
        let procedure = Arc::new(procedure(&self.schema, text, &types));
        let mut state = self.state();
        let entries = state.known.entry(text.to_owned()).or_default();
        if let Some(k) = entries.iter().find(|k| k.types == types) {
            return Some((k.procedure.clone(), k.created));
        }
        entries.push(Known {
            types,
            procedure: procedure.clone(),
            created: false,
        });
        state.count += 1;
        Some((procedure, false))
    }

    /// `name` exists on the server.
    pub fn created(&self, name: &str) {
        if let Some(k) = self.state().find(name) {
            k.created = true;
        }
    }

    /// `name` is gone from the server (dropped): create it again on its next use.
    pub fn forget(&self, name: &str) {
        if let Some(k) = self.state().find(name) {
            k.created = false;
        }
    }

    /// Statements go as procedures from now on (the schema is migrated).
    pub fn enable(&self) {
        self.state().enabled = true;
    }

    /// This login may not create procedures: statements go as text from now on.
    pub fn disable(&self) {
        self.state().enabled = false;
    }
}

/// The SQL type a procedure declares for a parameter bound as `value`; `None` for a type the
/// store never binds (the statement then goes as text).
fn declared_type(value: &ColumnData<'_>) -> Option<&'static str> {
    Some(match value {
        ColumnData::U8(_) => "TINYINT",
        ColumnData::I16(_) => "SMALLINT",
        ColumnData::I32(_) => "INT",
        ColumnData::I64(_) => "BIGINT",
        ColumnData::F32(_) => "REAL",
        ColumnData::F64(_) => "FLOAT",
        ColumnData::Bit(_) => "BIT",
        ColumnData::String(_) => "NVARCHAR(MAX)",
        ColumnData::Binary(_) => "VARBINARY(MAX)",
        ColumnData::Guid(_) => "UNIQUEIDENTIFIER",
        ColumnData::DateTime2(_) => "DATETIME2(7)",
        ColumnData::DateTimeOffset(_) => "DATETIMEOFFSET(7)",
        ColumnData::Date(_) => "DATE",
        _ => return None,
    })
}

/// `text` with parameters of `types` as a procedure of `schema` (bracket-quoted).
fn procedure(schema: &str, text: &str, types: &[&'static str]) -> Procedure {
    let mut hash = Sha256::new();
    hash.update(types.join(",").as_bytes());
    hash.update(b"\n");
    hash.update(text.as_bytes());
    let digest = hash.finalize();
    let name = format!("{PREFIX}{}", hex::encode(&digest[..10]));
    let qualified = format!("{schema}.[{name}]");
    let declarations = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("@P{} {t}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let arguments = (1..=types.len())
        .map(|i| format!("@P{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    Procedure {
        create: format!("CREATE PROCEDURE {qualified} {declarations}\nAS\nBEGIN\n{text}\nEND"),
        call: format!("EXEC {qualified} {arguments}")
            .trim_end()
            .to_owned(),
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn schema() -> SchemaName {
        SchemaName::parse("fleet").expect("schema")
    }

    fn params() -> Vec<ColumnData<'static>> {
        vec![
            ColumnData::String(Some(Cow::Borrowed("dev-1"))),
            ColumnData::I64(Some(3)),
        ]
    }

    #[test]
    fn a_statement_becomes_a_procedure_declaring_its_parameters() {
        let p = Procedures::new(&schema(), true);
        let text = "SELECT state FROM [fleet].onboard_devices WHERE id = @P1 AND generation = @P2";
        let (procedure, exists) = p.lookup(text, &params()).expect("procedure");
        assert!(!exists);
        assert!(procedure.name.starts_with(PREFIX));
        assert_eq!(
            procedure.create,
            format!(
                "CREATE PROCEDURE [fleet].[{}] @P1 NVARCHAR(MAX), @P2 BIGINT\nAS\nBEGIN\n{text}\nEND",
                procedure.name
            )
        );
        assert_eq!(
            procedure.call,
            format!("EXEC [fleet].[{}] @P1, @P2", procedure.name)
        );
        p.created(&procedure.name);
        assert_eq!(p.lookup(text, &params()), Some((procedure.clone(), true)));
        p.forget(&procedure.name);
        let (again, exists) = p.lookup(text, &params()).expect("known");
        assert!(!exists);
        assert!(
            Arc::ptr_eq(&again, &procedure),
            "rendered once, not per call"
        );
    }

    #[test]
    fn names_differ_by_text_and_by_parameter_types() {
        let p = Procedures::new(&schema(), true);
        let a = p.lookup("SELECT @P1", &params()[..1]).expect("a").0;
        let b = p.lookup("SELECT @P1", &params()[1..]).expect("b").0;
        let c = p.lookup("SELECT @P1 + 0", &params()[1..]).expect("c").0;
        assert_ne!(a.name, b.name);
        assert_ne!(b.name, c.name);
        let none = p.lookup("SELECT 1", &[]).expect("no parameters").0;
        assert!(none.call.ends_with(']'), "{}", none.call);
    }

    #[test]
    fn disabled_too_many_parameters_or_too_many_procedures_go_as_text() {
        let p = Procedures::new(&schema(), true);
        let many = vec![ColumnData::I64(Some(1)); MAX_PARAMS + 1];
        assert!(p.lookup("SELECT 1", &many).is_none());
        for i in 0..MAX_PROCEDURES {
            let (procedure, _) = p.lookup(&format!("SELECT {i}"), &[]).expect("room");
            p.created(&procedure.name);
        }
        assert!(p.lookup("SELECT 'one more'", &[]).is_none());
        assert!(
            p.lookup("SELECT 0", &[]).is_some(),
            "existing ones still called"
        );
        p.disable();
        assert!(p.lookup("SELECT 0", &[]).is_none());
        let off = Procedures::new(&schema(), false);
        assert!(off.lookup("SELECT 0", &[]).is_none());
    }
}
