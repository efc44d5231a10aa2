//! Microsoft SQL Server backend.
use super::*;
pub struct MssqlStore;
pub fn looks_like_mssql(url: &str) -> bool {
    let _ = url;
    todo!()
}
impl MssqlStore {
    pub async fn connect(
        url: &str,
        config: &crate::config::StoreConfig,
    ) -> StoreResult<MssqlStore> {
        let _ = (url, config);
        todo!()
    }
}
