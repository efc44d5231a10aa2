//! Shared set-up of the benchmarks: an in-process gateway on loopback (temporary PKI directory
//! and SQLite file, or a scratch schema on the SQL Server `ONBOARD_BENCH_STORE_URL` names), the
//! shipped binary as a child process ([`gateway`]), a bare rumqttd on loopback for same-run
//! baselines, and sizes read from environment variables.
#![allow(dead_code)]

pub mod gateway;
pub mod procfs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use onboard::config::Config;
use onboard::gateway::Gateway;
use onboard::pki::{CertAndKey, CertOptions, Issuer};
use onboard::simulate::{self, SimCredential, SimulateOptions};
use tempfile::TempDir;

/// Loopback only.
pub const HOST: &str = "127.0.0.1";

/// `name` from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Seconds from the environment (`name`, fractional allowed), or `default`.
pub fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs.min(120.0))
}

/// A multi-threaded tokio runtime for a benchmark's `main`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The store a benchmark gateway uses: `sqlite` (a file in its directory), or a SQL Server
/// connection string (each gateway then gets a scratch schema of its own there, dropped when
/// it stops).
pub const STORE_URL_VAR: &str = "ONBOARD_BENCH_STORE_URL";

/// A gateway on ephemeral loopback ports with its own PKI directory and SQLite file (or SQL
/// Server scratch schema, see [`STORE_URL_VAR`]).
pub struct Bench {
    pub gw: Gateway,
    pub config: Config,
    /// Kept for the lifetime of the gateway (PKI, database).
    pub dir: TempDir,
}

/// The SQL Server connection string of [`STORE_URL_VAR`], if it names one.
pub fn mssql_url() -> Option<String> {
    std::env::var(STORE_URL_VAR)
        .ok()
        .filter(|url| onboard::store::mssql::looks_like_mssql(url))
}

/// `url` with a fresh scratch schema.
fn with_scratch_schema(url: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let schema = format!("onboard_b{}", &id[..16]);
    let url = url.trim();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("mssql://") || lower.starts_with("sqlserver://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}schema={schema}")
    } else {
        format!("{};schema={schema}", url.trim_end_matches(';'))
    }
}

/// Which store the benchmarks run on, for their headers.
pub fn store_name() -> &'static str {
    if mssql_url().is_some() {
        "SQL Server store"
    } else {
        "SQLite store"
    }
}

impl Bench {
    pub async fn start() -> Bench {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        let local: SocketAddr = ([127, 0, 0, 1], 0).into();
        config.server.mtls_listen = local;
        config.server.password_listen = local;
        config.server.metrics_listen = local;
        config.pki.dir = dir.path().join("certs");
        config.store.url = match mssql_url() {
            Some(url) => with_scratch_schema(&url),
            None => format!("sqlite://{}", dir.path().join("onboard.db").display()),
        };
        config.enrollment.templates_dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/templates");
        // Benchmarks measure the gateway, not its rate limiter.
        config.enrollment.max_requests_per_sec = 1_000_000;
        // Every simulated device connects from loopback: one source address.
        config.limits.max_handshakes_per_source = 1_000_000;
        let gw = Gateway::start(config.clone())
            .await
            .expect("gateway starts");
        Bench { gw, config, dir }
    }

    /// Simulator options for `devices` devices named `<prefix>NNNNNN`.
    pub fn sim_options(
        &self,
        prefix: &str,
        devices: usize,
        concurrency: usize,
        credential: SimCredential,
    ) -> SimulateOptions {
        SimulateOptions {
            host: HOST.into(),
            port: self.gw.mtls_addr.port(),
            password_port: self.gw.password_addr.port(),
            devices,
            concurrency,
            prefix: prefix.into(),
            credential,
            device_type: "thermostat".into(),
            pki_dir: self.config.pki.dir.clone(),
            telemetry_messages: 1,
            timeout: Duration::from_secs(30),
            ..SimulateOptions::default()
        }
    }

    /// An admin certificate (CN `name`).
    pub fn admin(&self, name: &str) -> CertAndKey {
        Issuer::load(&self.config.pki.dir, "admin-ca")
            .expect("admin CA")
            .issue_client(name, &CertOptions::valid_for_days(1))
            .expect("admin certificate")
    }

    /// A TLS client configuration trusting the gateway, with a client certificate.
    pub fn tls(&self, cert: &CertAndKey) -> Arc<rustls::ClientConfig> {
        simulate::client_tls_config(
            &self.gw.pki.server_ca_pem(),
            Some((&cert.certificate_pem, &cert.private_key_pem)),
        )
        .expect("client TLS configuration")
    }

    /// Requests the gateway's store has sent to its server so far (SQL Server only).
    pub fn store_requests(&self) -> Option<u64> {
        self.gw.store.requests_sent()
    }

    pub async fn stop(self) {
        self.gw.stop().await;
        if onboard::store::mssql::looks_like_mssql(&self.config.store.url) {
            let url = &self.config.store.url;
            match onboard::store::mssql::MssqlStore::connect(url, &self.config.store).await {
                Ok(store) => {
                    if let Err(e) = store.drop_schema().await {
                        println!("  could not drop the scratch schema: {e}");
                    }
                }
                Err(e) => println!("  could not drop the scratch schema: {e}"),
            }
        }
    }
}

/// A plain rumqttd 0.20 on a free loopback port: v4 listener, no TLS, no authentication, no
/// accept delay, router settings as the embedded broker's. It runs until the process ends.
pub async fn start_bare_broker() -> SocketAddr {
    let probe = std::net::TcpListener::bind((HOST, 0)).expect("free port");
    let addr = probe.local_addr().expect("address");
    drop(probe);
    let defaults = onboard::config::BrokerConfig::default();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: defaults.max_payload_size,
        max_inflight_count: defaults.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let listener = rumqttd::ServerSettings {
        name: "bare".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: defaults.max_outgoing_packets,
            max_segment_size: 10 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some([("bare".to_string(), listener)].into_iter().collect()),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("bare-rumqttd".into())
        .spawn(move || {
            let _ = broker.start();
        })
        .expect("broker thread");
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("bare broker did not listen on {addr}");
}
