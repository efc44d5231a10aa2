//! `onboard store backup`: an online copy of the SQLite inventory, taken while gateways use it.
//!
//! `VACUUM INTO` writes a consistent snapshot (one read transaction; WAL lets the gateway keep
//! writing meanwhile) into a new, compact database file, which is a valid store as it stands:
//! point `[store] url` at it to restore. SQL Server has its own way (`BACKUP DATABASE`, or the
//! automated backups of Azure SQL), and this command says so rather than copy rows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::mssql::looks_like_mssql;

/// How long the snapshot waits for a writer holding the database (WAL rarely makes it wait).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "the store is SQL Server: back it up on the server with BACKUP DATABASE (or the \
         automated backups of Azure SQL); this command copies SQLite stores only"
    )]
    SqlServer,
    #[error("[store] url {0:?} is not sqlite://PATH")]
    NotSqlite(String),
    #[error("{0} already exists; the backup goes to a new file")]
    Exists(PathBuf),
    #[error("{path}: {message}")]
    Sqlite { path: PathBuf, message: String },
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub source: PathBuf,
    pub out: PathBuf,
    /// Size of the backup file.
    pub bytes: u64,
}

/// Copy the store at `url` into the new file `out`.
pub fn backup(url: &str, out: &Path) -> Result<Backup, BackupError> {
    let url = url.trim();
    let Some(source) = url.strip_prefix("sqlite://") else {
        if looks_like_mssql(url) {
            return Err(BackupError::SqlServer);
        }
        return Err(BackupError::NotSqlite(url.to_owned()));
    };
    let source = PathBuf::from(source);
    if out.exists() {
        return Err(BackupError::Exists(out.to_path_buf()));
    }
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rusqlite::Error| BackupError::Sqlite {
            path,
            message: e.to_string(),
        }
    };
    // Never creates the source: a wrong path is an error, not an empty backup.
    let conn = Connection::open_with_flags(
        &source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed(&source))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(failed(&source))?;
    let target = out.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [&target])
        .map_err(failed(out))?;
    let bytes = std::fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| BackupError::Sqlite {
            path: out.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(Backup {
        source,
        out: out.to_path_buf(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_server_is_sent_to_its_own_backups() {
        let out = std::env::temp_dir().join("never-written.db");
        let err = backup("mssql://u:p@db:1433/onboard", &out).unwrap_err();
        assert!(matches!(err, BackupError::SqlServer), "{err}");
        assert!(err.to_string().contains("BACKUP DATABASE"));
    }

    #[test]
    fn a_missing_source_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("absent.db");
        let url = format!("sqlite://{}", source.display());
        let err = backup(&url, &dir.path().join("b.db")).unwrap_err();
        assert!(matches!(err, BackupError::Sqlite { .. }), "{err}");
        assert!(!source.exists());
    }
}
