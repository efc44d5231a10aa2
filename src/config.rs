//! Configuration: one TOML file (default `config/onboard.toml`) whose every key can be overridden
//! by an environment variable `ONBOARD_<SECTION>_<KEY>` (e.g. `ONBOARD_STORE_URL`,
//! `ONBOARD_ENROLLMENT_ACTIVATION_TIMEOUT_SECS`). Every key has an embedded default, so the
//! gateway runs with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub broker: BrokerConfig,
    pub pki: PkiConfig,
    pub enrollment: EnrollmentConfig,
    pub store: StoreConfig,
    pub lifecycle: LifecycleConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

/// Listeners that devices, admins and operators reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// mTLS listener: factory (bootstrap), operational (device) and admin certificates.
    pub mtls_listen: SocketAddr,
    /// TLS listener for devices holding a username/password credential.
    pub password_listen: SocketAddr,
    /// HTTP listener for `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// A TLS handshake that takes longer than this is dropped.
    pub handshake_timeout_ms: u64,
    /// After the handshake, the MQTT CONNECT must arrive within this time.
    pub connect_timeout_ms: u64,
    /// Upper bound on concurrent client connections (both listeners together).
    pub max_connections: usize,
}

/// The embedded rumqttd broker: fan-out to admins and back-ends. It listens on loopback only
/// and accepts nothing but the front (admin connections; devices are served by the front).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Internal plaintext listener; port 0 picks free loopback ports at start (a fixed port P
    /// with several listeners means P, P+1, ...).
    pub internal_listen: SocketAddr,
    /// Internal listeners, each on its own broker thread. rumqttd pauses about a millisecond
    /// after every accept, so each admits at most ~1,000 new admin connections per second.
    pub internal_listeners: u16,
    /// Largest MQTT packet a client may send (bytes).
    pub max_payload_size: usize,
    /// QoS 1 messages in flight (sent, not yet acknowledged) per connection.
    pub max_inflight: usize,
    /// Messages the router buffers per connection before it stops reading from publishers.
    pub max_outgoing_packets: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PkiConfig {
    /// Directory holding the CA certificates, the operational CA key and the server certificate.
    pub dir: PathBuf,
    /// Factory CA certificate files (relative to `dir`), one per device maker.
    pub factory_cas: Vec<PathBuf>,
    /// Extra DNS names / IP addresses for the server certificate made by `pki init`.
    pub server_names: Vec<String>,
    /// Validity of operational certificates we issue.
    pub device_cert_days: u32,
    /// A device id (certificate CN, client id, username) must match this regular expression.
    pub device_id_pattern: String,
    /// Operational CA certificates (relative to `dir`) retired by a rotation: the certificates
    /// they issued still authenticate devices; new ones come from `operational-ca.pem`.
    pub previous_operational_cas: Vec<PathBuf>,
    /// Revoked admin certificates: a CRL signed by the admin CA (relative to `dir`; a missing
    /// file revokes nothing). Written by `onboard pki revoke-admin`, reloaded on SIGHUP.
    pub admin_crl: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollmentMode {
    /// Any device with a valid factory certificate may enroll.
    ZeroTouch,
    /// Only devices pre-registered in the inventory (bulk import) may enroll.
    Allowlist,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReenrollPolicy {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EnrollmentConfig {
    pub mode: EnrollmentMode,
    pub reenroll: ReenrollPolicy,
    /// Device type used when a request names none.
    pub default_device_type: String,
    /// Directory of `<device_type>.toml` configuration templates.
    pub templates_dir: PathBuf,
    /// Seconds an enrolled device has to reconnect with its new credential and report.
    pub activation_timeout_secs: u64,
    /// Largest enrollment request accepted (bytes).
    pub max_request_bytes: usize,
    /// Enrollment requests answered per second, gateway-wide, before `rate_limited`.
    pub max_requests_per_sec: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path/to/file.db`, `mssql://user:pass@host:1433/db?...` or an ADO.NET string.
    pub url: String,
    /// Connections kept open to the server (SQL Server) or readers (SQLite).
    pub pool_size: u32,
    pub connect_timeout_ms: u64,
    pub query_timeout_ms: u64,
    /// Attempts for an operation that failed with a transient error.
    pub max_retries: u32,
    /// Activation marks held while the store is down, before new ones are dropped.
    pub pending_queue: usize,
    /// SQL Server: accept the server's certificate without checking it (a development server
    /// with a self-signed certificate; warned about once at start). Also set by
    /// `TrustServerCertificate=true` in the connection string.
    pub trust_server_certificate: bool,
    /// SQL Server: PEM (or DER) file of the CA that issued the server's certificate, trusted
    /// besides the system's roots. Not together with `trust_server_certificate`.
    pub ca_file: Option<PathBuf>,
    /// How often the change feed is polled for what other gateways sharing the store
    /// changed (revocations, configurations, firmware jobs): the bound on how late they
    /// reach the devices connected here.
    pub change_poll_ms: u64,
    /// Change-feed rows older than this are deleted.
    pub change_retention_secs: u64,
    /// Audit rows older than this many days are deleted (at start, then hourly); 0 keeps
    /// them for ever.
    pub audit_retention_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// Roll the configuration back to the last applied version when a device acks `failed`.
    pub rollback_on_failed_ack: bool,
    /// Seconds a renewed device's previous certificate stays valid.
    pub renewal_grace_secs: u64,
    /// How often deadlines (activation, renewal grace) are checked.
    pub sweep_interval_ms: u64,
}

/// How `onboard serve` writes its log (to standard error).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, every field a key (for log shippers).
    Json,
}

/// What one client may cost the gateway: every per-session queue and buffer is bounded here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest retained message a device may publish (only on `devices/D/state`).
    pub max_retained_bytes: usize,
    /// QoS 1 messages kept for one session (persistent sessions while offline, or a client
    /// that reads slower than it is sent to); past it the oldest is dropped and counted.
    pub max_queued_per_device: usize,
    /// A client whose socket accepts nothing for this long is disconnected (it stopped reading).
    pub write_timeout_ms: u64,
    /// Credentials one device may be issued (enrollments and renewals) per rolling hour.
    pub credentials_per_device_per_hour: u32,
    /// Connections one source (an IPv4 address, or an IPv6 /64 prefix) may have in the TLS
    /// handshake or before CONNECT at once; past it a new socket is closed at once (`too_many_handshakes`).
    pub max_handshakes_per_source: usize,
    /// Refusals that name no one (scans, floods) are audited as one row per reason per this
    /// many milliseconds, with the count and a few sample sources.
    pub anonymous_refusal_window_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_retained_bytes: 16 * 1024,
            max_queued_per_device: 100,
            write_timeout_ms: 10_000,
            credentials_per_device_per_hour: 10,
            max_handshakes_per_source: 256,
            anonymous_refusal_window_ms: 60_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            mtls_listen: ([0, 0, 0, 0], 8883).into(),
            password_listen: ([0, 0, 0, 0], 8884).into(),
            metrics_listen: ([127, 0, 0, 1], 9100).into(),
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            max_connections: 50_000,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            internal_listen: ([127, 0, 0, 1], 0).into(),
            internal_listeners: 1,
            max_payload_size: 256 * 1024,
            max_inflight: 100,
            max_outgoing_packets: 200,
        }
    }
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            dir: PathBuf::from("certs"),
            factory_cas: vec![PathBuf::from("factory-ca.pem")],
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            device_cert_days: 365,
            device_id_pattern: "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$".into(),
            previous_operational_cas: Vec::new(),
            admin_crl: PathBuf::from("admin-crl.pem"),
        }
    }
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        EnrollmentConfig {
            mode: EnrollmentMode::ZeroTouch,
            reenroll: ReenrollPolicy::Allow,
            default_device_type: "thermostat".into(),
            templates_dir: PathBuf::from("config/templates"),
            activation_timeout_secs: 600,
            max_request_bytes: 16 * 1024,
            max_requests_per_sec: 5_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://data/onboard.db".into(),
            pool_size: 8,
            connect_timeout_ms: 5_000,
            query_timeout_ms: 5_000,
            max_retries: 3,
            pending_queue: 10_000,
            trust_server_certificate: false,
            ca_file: None,
            change_poll_ms: 1_000,
            change_retention_secs: 3_600,
            audit_retention_days: 90,
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            rollback_on_failed_ack: true,
            renewal_grace_secs: 86_400,
            sweep_interval_ms: 1_000,
        }
    }
}

impl Config {
    /// Embedded defaults, then the file (if it exists), then `ONBOARD_<SECTION>_<KEY>` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let default_file = Path::new("config/onboard.toml");
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Invalid {
                        key: "--config",
                        message: format!("{} does not exist", path.display()),
                    });
                }
                figment = figment.merge(Toml::file(path));
            }
            None if default_file.exists() => figment = figment.merge(Toml::file(default_file)),
            None => {}
        }
        Self::from_figment(figment.merge(env_provider()))
    }

    /// Defaults plus the given TOML text (no environment); for tests and tools.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that cannot be expressed in types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = regex::Regex::new(&self.pki.device_id_pattern) {
            return Err(ConfigError::Invalid {
                key: "pki.device_id_pattern",
                message: e.to_string(),
            });
        }
        if self.store.change_poll_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "store.change_poll_ms",
                message: "the change feed must be polled (at least every few seconds)".into(),
            });
        }
        if self.pki.factory_cas.is_empty() {
            return Err(ConfigError::Invalid {
                key: "pki.factory_cas",
                message: "at least one factory CA is needed".into(),
            });
        }
        if self.enrollment.activation_timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "enrollment.activation_timeout_secs",
                message: "must be greater than 0".into(),
            });
        }
        if self.enrollment.max_request_bytes == 0
            || self.enrollment.max_request_bytes > self.broker.max_payload_size
        {
            return Err(ConfigError::Invalid {
                key: "enrollment.max_request_bytes",
                message: format!(
                    "must be between 1 and broker.max_payload_size ({})",
                    self.broker.max_payload_size
                ),
            });
        }
        if !(1..=64).contains(&self.broker.internal_listeners) {
            return Err(ConfigError::Invalid {
                key: "broker.internal_listeners",
                message: "must be between 1 and 64".into(),
            });
        }
        if self.limits.credentials_per_device_per_hour == 0 {
            return Err(ConfigError::Invalid {
                key: "limits.credentials_per_device_per_hour",
                message: "must be at least 1".into(),
            });
        }
        if self.store.url.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "store.url",
                message: "must not be empty".into(),
            });
        }
        Ok(())
    }
}

/// `ONBOARD_STORE_URL` -> `store.url`: section names hold no underscore, so the first one
/// separates section from key. `ONBOARD_LOG` (the log filter) and `ONBOARD_CONFIG` (the file)
/// are the command line's, not keys.
fn env_provider() -> Env {
    Env::prefixed("ONBOARD_")
        .map(|key| key.as_str().replacen('_', ".", 1).into())
        .ignore(&["log", "config"])
        .lowercase(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
    }

    #[test]
    fn changes_reach_other_gateways_within_two_seconds_by_default() {
        let store = StoreConfig::default();
        assert!(store.change_poll_ms > 0 && store.change_poll_ms <= 2_000);
        assert!(store.change_retention_secs * 1_000 > 10 * store.change_poll_ms);
        let err = Config::from_toml("[store]\nchange_poll_ms = 0\n").expect_err("never polled");
        assert!(err.to_string().contains("change_poll_ms"), "{err}");
    }

    #[test]
    fn toml_overrides_defaults_and_unknown_keys_are_refused() {
        let c =
            Config::from_toml("[enrollment]\nmode = \"allowlist\"\nactivation_timeout_secs = 5\n")
                .expect("valid");
        assert_eq!(c.enrollment.mode, EnrollmentMode::Allowlist);
        assert_eq!(c.enrollment.activation_timeout_secs, 5);
        assert_eq!(c.store.url, "sqlite://data/onboard.db");
        let err = Config::from_toml("[store]\nurll = \"x\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's own test API
    fn environment_overrides_keys_with_underscores() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ONBOARD_STORE_URL", "sqlite://elsewhere.db");
            jail.set_env("ONBOARD_ENROLLMENT_ACTIVATION_TIMEOUT_SECS", "42");
            jail.set_env("ONBOARD_LOG_FORMAT", "json");
            jail.set_env("ONBOARD_LOG", "debug");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.store.url, "sqlite://elsewhere.db");
            assert_eq!(c.enrollment.activation_timeout_secs, 42);
            assert_eq!(c.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn bad_pattern_is_a_clear_error() {
        let err = Config::from_toml("[pki]\ndevice_id_pattern = \"([\"\n").expect_err("bad regex");
        assert!(err.to_string().contains("pki.device_id_pattern"), "{err}");
    }
}

#[cfg(test)]
mod shipped_file {
    /// The commented file in config/ states exactly the built-in defaults.
    #[test]
    fn config_file_matches_the_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/onboard.toml"))
                .expect("config/onboard.toml");
        let from_file = super::Config::from_toml(&text).expect("valid");
        assert_eq!(from_file, super::Config::default());
    }
}
