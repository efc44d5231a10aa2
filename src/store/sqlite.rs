//! Embedded SQLite backend.
use super::*;
pub struct SqliteStore;
impl SqliteStore {
    pub async fn open(
        path: &std::path::Path,
        config: &crate::config::StoreConfig,
    ) -> StoreResult<SqliteStore> {
        let _ = (path, config);
        todo!()
    }
}
