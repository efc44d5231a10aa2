//! The SQL Server a test runs on, when `ONBOARD_TEST_MSSQL_URL` names one (a `mssql://` URL or
//! an ADO.NET string): every test gets a scratch schema or a scratch database of its own, so
//! tests run in parallel on a shared server and leave nothing behind.
//!
//! `ONBOARD_TEST_MSSQL_ISOLATION` picks how:
//! - `schema` (the default): the store's tables in a fresh schema `onboard_t<16 hex>`, which
//!   the store creates when it migrates and [`Scratch::remove`] drops;
//! - `database`: the store's tables in `dbo` of a fresh database `onboard_t<16 hex>`, created
//!   here and dropped by [`Scratch::remove`] (the login needs `CREATE DATABASE`).

use onboard::config::StoreConfig;
use onboard::store::mssql::MssqlStore;

/// The server to test on.
pub const URL_VAR: &str = "ONBOARD_TEST_MSSQL_URL";
/// `schema` or `database`.
pub const ISOLATION_VAR: &str = "ONBOARD_TEST_MSSQL_ISOLATION";

/// How one test is kept apart from the others on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Schema,
    Database,
}

impl Isolation {
    /// From [`ISOLATION_VAR`]; anything but `database` is [`Isolation::Schema`].
    pub fn from_env() -> Isolation {
        match std::env::var(ISOLATION_VAR).as_deref().map(str::trim) {
            Ok("database") => Isolation::Database,
            _ => Isolation::Schema,
        }
    }
}

/// `CREATE DATABASE` and `DROP DATABASE` run one at a time in a test process: Babelfish
/// refuses concurrent ones ("tuple concurrently updated": they update one catalog row).
static DATABASE_DDL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test's place on the server.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// The store URL of this test: the server's, with its schema or database.
    pub url: String,
    /// The URL the variable gave (the server's own database).
    server_url: String,
    name: String,
    isolation: Isolation,
}

/// A fresh name: `onboard_t` and 16 random hex digits.
pub fn throwaway_name() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("onboard_t{}", &id[..16])
}

/// `url` with its `schema` option set to `schema`, for both connection-string forms: a query
/// parameter of an `mssql://` / `sqlserver://` URL, a key of an ADO.NET string. A `schema`
/// already in `url` is overridden (the last one wins).
pub fn with_schema(url: &str, schema: &str) -> String {
    with_option(url, "schema", schema)
}

/// `url` naming database `database` (the last `database` key wins in an ADO.NET string; the
/// path of a URL is replaced).
pub fn with_database(url: &str, database: &str) -> String {
    let url = url.trim();
    if is_url(url) {
        let (head, query) = match url.split_once('?') {
            Some((head, query)) => (head, Some(query)),
            None => (url, None),
        };
        let authority_end = head
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| head[start..].find('/').map(|i| start + i))
            .unwrap_or(head.len());
        let mut out = format!("{}/{database}", &head[..authority_end]);
        if let Some(query) = query {
            out.push('?');
            out.push_str(query);
        }
        out
    } else {
        with_option(url, "database", database)
    }
}

fn is_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("mssql://") || lower.starts_with("sqlserver://")
}

fn with_option(url: &str, key: &str, value: &str) -> String {
    let url = url.trim();
    if is_url(url) {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{key}={value}")
    } else if url.is_empty() || url.ends_with(';') {
        format!("{url}{key}={value}")
    } else {
        format!("{url};{key}={value}")
    }
}

impl Scratch {
    /// A scratch schema or database on the server named by [`URL_VAR`], or `None` when it is
    /// not set (the caller then runs on SQLite or reports itself skipped).
    pub async fn create() -> Option<Scratch> {
        let server_url = std::env::var(URL_VAR)
            .ok()
            .filter(|u| !u.trim().is_empty())?;
        let isolation = Isolation::from_env();
        let name = throwaway_name();
        let url = match isolation {
            Isolation::Schema => with_schema(&server_url, &name),
            Isolation::Database => {
                let _one_at_a_time = DATABASE_DDL.lock().await;
                MssqlStore::scratch_database(&server_url, &StoreConfig::default(), &name, true)
                    .await
                    .expect("create the scratch database");
                with_database(&server_url, &name)
            }
        };
        Some(Scratch {
            url,
            server_url,
            name,
            isolation,
        })
    }

    /// The store configuration for this scratch place.
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            url: self.url.clone(),
            ..StoreConfig::default()
        }
    }

    /// Drop what [`Scratch::create`] made (a store must not be using a scratch database any
    /// more when it is dropped).
    pub async fn remove(&self) -> Result<(), String> {
        match self.isolation {
            Isolation::Schema => {
                let config = self.config();
                let store = MssqlStore::connect(&self.url, &config)
                    .await
                    .map_err(|e| e.to_string())?;
                store.drop_schema().await.map_err(|e| e.to_string())
            }
            Isolation::Database => {
                let _one_at_a_time = DATABASE_DDL.lock().await;
                MssqlStore::scratch_database(
                    &self.server_url,
                    &StoreConfig::default(),
                    &self.name,
                    false,
                )
                .await
                .map_err(|e| e.to_string())
            }
        }
    }

    /// [`Scratch::remove`] from synchronous code (a `Drop`), on a runtime of its own.
    pub fn remove_blocking(&self) {
        let scratch = self.clone();
        let outcome = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(scratch.remove())
        })
        .join();
        if let Ok(Err(e)) = outcome {
            eprintln!("could not remove scratch {}: {e}", self.name);
        }
    }

    /// The schema or database name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[test]
fn scratch_names_reach_both_connection_string_forms() {
    assert_eq!(
        with_database("mssql://sa:pw@db:1433/master?encrypt=true", "x1"),
        "mssql://sa:pw@db:1433/x1?encrypt=true"
    );
    assert_eq!(with_database("mssql://db", "x1"), "mssql://db/x1");
    assert_eq!(
        with_database("server=tcp:db,1433;database=master;user id=u", "x1"),
        "server=tcp:db,1433;database=master;user id=u;database=x1"
    );
}

/// `url` with its server replaced by `addr` (both connection-string forms).
pub fn with_server(url: &str, addr: std::net::SocketAddr) -> String {
    let url = url.trim();
    if is_url(url) {
        let mut parsed = url::Url::parse(url).expect("a SQL Server URL");
        parsed.set_host(Some(&addr.ip().to_string())).expect("host");
        parsed.set_port(Some(addr.port())).expect("port");
        parsed.to_string()
    } else {
        with_option(url, "server", &format!("tcp:{},{}", addr.ip(), addr.port()))
    }
}

/// A loopback TCP relay to the SQL Server, which a test can cut: while it is cut, every
/// relayed connection is closed and new ones are closed at once, as in a network outage.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// A relay to the server of `url` (host and port as the store would dial them).
    pub async fn start(server: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                if *watch.borrow() {
                    continue; // dropped: closed at once
                }
                let server = server.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&server).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }

    /// Cut (`true`) or restore (`false`) the relay.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// `host:port` of the server `url` names.
pub fn server_addr(url: &str) -> String {
    onboard::store::mssql::server_address(url).expect("a SQL Server connection string")
}
