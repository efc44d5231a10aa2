//! `onboard admin ...`: send one admin command to a running gateway over mTLS with an admin
//! certificate, wait for its reply on `admin/responses/<request_id>`, and print it.
//!
//! The process exits non-zero when the reply has `status: error` or none arrives in 10 s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Map, Value};

/// How long to wait for the gateway's reply (connect included).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a device's retained configuration (`config --set`).
const RETAINED_WAIT: Duration = Duration::from_secs(2);
/// Top-level configuration keys an admin may replace.
const CONFIG_KEYS: &[&str] = &["settings", "automation_rules", "qos", "retain"];

/// Where the gateway is and which admin certificate to use.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminConnection {
    /// Gateway host name (must match its server certificate).
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// Port of the mTLS listener.
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// Admin certificate (PEM), issued by the admin CA (`onboard pki issue-admin`).
    #[arg(long, value_name = "PATH")]
    pub cert: PathBuf,
    /// Private key of the admin certificate (PEM).
    #[arg(long, value_name = "PATH")]
    pub key: PathBuf,
    /// CA certificate that signed the gateway's server certificate
    /// [default: <pki dir>/operational-ca.pem].
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
}

/// What a rollback undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RollbackTarget {
    /// Re-publish an earlier configuration as a new version.
    Config,
    /// Revoke the credentials, clear the retained topics, state `pending`: the device enrolls
    /// again with its factory certificate.
    Enrollment,
}

/// Admin commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Publish a new configuration version (the latest one with some keys replaced).
    Config {
        /// Device id.
        device: String,
        /// Set a value, e.g. `settings.mode=cool` or `qos.telemetry=1` (the value is JSON if it
        /// parses as JSON, else a string). Repeatable; applied to the device's current
        /// configuration.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// A JSON file with any of settings, automation_rules, qos, retain.
        #[arg(long, value_name = "JSON")]
        file: Option<PathBuf>,
    },
    /// Roll back a configuration (to the previous or a named version) or an enrollment.
    Rollback {
        /// Device id.
        device: String,
        #[arg(long, value_enum, default_value = "config")]
        target: RollbackTarget,
        /// Configuration version to restore (default: the previous one).
        #[arg(long, value_name = "N")]
        to_version: Option<i64>,
    },
    /// Start a firmware update on one or more devices, or on every device of a type.
    #[command(disable_version_flag = true)]
    Firmware {
        /// Device ids.
        #[arg(
            required_unless_present = "device_type",
            conflicts_with = "device_type"
        )]
        devices: Vec<String>,
        /// Every device of this type.
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        /// Firmware version.
        #[arg(long = "version", value_name = "VERSION")]
        version: String,
        /// Download URL (https).
        #[arg(long)]
        url: String,
        /// SHA-256 of the image (64 hex characters).
        #[arg(long)]
        sha256: String,
        /// Size of the image in bytes.
        #[arg(long)]
        size: u64,
    },
    /// Revoke a device: its credentials, its open connections, its enrollment.
    Revoke {
        /// Device id.
        device: String,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a revocation: the device becomes `pending` and may enroll again.
    Reinstate {
        /// Device id.
        device: String,
    },
}

/// Parse `a.b.c=value` into its path and JSON value.
fn parse_set(spec: &str) -> anyhow::Result<(Vec<String>, Value)> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {spec:?}: expected KEY=VALUE"))?;
    let path: Vec<String> = key.split('.').map(|s| s.trim().to_owned()).collect();
    if path.iter().any(String::is_empty) {
        bail!("--set {spec:?}: empty key");
    }
    if !CONFIG_KEYS.contains(&path[0].as_str()) {
        bail!(
            "--set {spec:?}: the key must start with one of {}",
            CONFIG_KEYS.join(", ")
        );
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    Ok((path, value))
}

/// Set `value` at `path` inside `doc`, creating objects on the way.
fn set_path(doc: &mut Map<String, Value>, path: &[String], value: Value) -> anyhow::Result<()> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut node = doc;
    for key in parents {
        let child = node
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !child.is_object() {
            *child = Value::Object(Map::new());
        }
        node = child
            .as_object_mut()
            .ok_or_else(|| anyhow!("{key} is not an object"))?;
    }
    node.insert(last.clone(), value);
    Ok(())
}

/// The body of a `config` command: the keys of `--file`, then the `--set` values applied to
/// `current` (the device's retained configuration).
fn config_body(
    current: Option<&Value>,
    file: Option<&Value>,
    sets: &[String],
) -> anyhow::Result<Map<String, Value>> {
    let mut body = Map::new();
    if let Some(file) = file {
        let map = file
            .as_object()
            .ok_or_else(|| anyhow!("--file must hold a JSON object"))?;
        for (k, v) in map {
            if !CONFIG_KEYS.contains(&k.as_str()) {
                bail!(
                    "--file: key {k:?} cannot be set (allowed: {})",
                    CONFIG_KEYS.join(", ")
                );
            }
            body.insert(k.clone(), v.clone());
        }
    }
    for spec in sets {
        let (path, value) = parse_set(spec)?;
        let top = &path[0];
        if !body.contains_key(top) {
            let start = current
                .and_then(|c| c.get(top))
                .cloned()
                .unwrap_or_else(|| json!({}));
            body.insert(top.clone(), start);
        }
        if path.len() == 1 {
            body.insert(top.clone(), value);
        } else {
            set_path(&mut body, &path, value)?;
        }
    }
    if body.is_empty() {
        bail!("nothing to change: give --set KEY=VALUE or --file JSON");
    }
    Ok(body)
}

/// The command's topic and body (without `request_id`), given the device's current
/// configuration for `config --set`.
fn command_message(
    cmd: &AdminCommand,
    current: Option<&Value>,
) -> anyhow::Result<(String, Map<String, Value>)> {
    let object = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Ok(match cmd {
        AdminCommand::Config { device, set, file } => {
            let file = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Some(
                        serde_json::from_str::<Value>(&text)
                            .with_context(|| format!("{} is not JSON", path.display()))?,
                    )
                }
                None => None,
            };
            (
                format!("admin/devices/{device}/config"),
                config_body(current, file.as_ref(), set)?,
            )
        }
        AdminCommand::Rollback {
            device,
            target,
            to_version,
        } => {
            let mut body = Map::new();
            let target = match target {
                RollbackTarget::Config => "config",
                RollbackTarget::Enrollment => "enrollment",
            };
            body.insert("target".into(), json!(target));
            if let Some(v) = to_version {
                body.insert("to_version".into(), json!(v));
            }
            (format!("admin/devices/{device}/rollback"), body)
        }
        AdminCommand::Firmware {
            devices,
            device_type,
            version,
            url,
            sha256,
            size,
        } => {
            let mut body = object(json!({
                "version": version, "url": url, "sha256": sha256, "size": size,
            }));
            match (devices.as_slice(), device_type) {
                ([one], None) => (format!("admin/devices/{one}/firmware"), body),
                (_, Some(t)) => {
                    body.insert("device_type".into(), json!(t));
                    ("admin/firmware".to_owned(), body)
                }
                (many, None) => {
                    body.insert("devices".into(), json!(many));
                    ("admin/firmware".to_owned(), body)
                }
            }
        }
        AdminCommand::Revoke { device, reason } => {
            let mut body = Map::new();
            if let Some(r) = reason {
                body.insert("reason".into(), json!(r));
            }
            (format!("admin/devices/{device}/revoke"), body)
        }
        AdminCommand::Reinstate { device } => {
            (format!("admin/devices/{device}/reinstate"), Map::new())
        }
    })
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// rustls client configuration: trust `ca`, present the admin certificate.
fn tls_config(conn: &AdminConnection, ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
        let cert = cert.with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate", ca.display());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&conn.cert)?)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate", conn.cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate", conn.cert.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&conn.key)?)
        .with_context(|| format!("{}: not a PEM private key", conn.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("admin certificate and key do not match")?;
    Ok(Arc::new(config))
}

/// A connected admin client whose event loop is polled by [`Session::next`].
struct Session {
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
    deadline: tokio::time::Instant,
}

impl Session {
    async fn connect(
        conn: &AdminConnection,
        config: &crate::config::Config,
    ) -> anyhow::Result<Session> {
        let ca = conn
            .ca
            .clone()
            .unwrap_or_else(|| config.pki.dir.join("operational-ca.pem"));
        let tls = tls_config(conn, &ca)?;
        let client_id = format!("admin-cli-{}", uuid::Uuid::new_v4().simple());
        let mut options = MqttOptions::new(client_id, conn.host.clone(), conn.port);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(options, 16);
        Ok(Session {
            client,
            eventloop,
            deadline: tokio::time::Instant::now() + REPLY_TIMEOUT,
        })
    }

    /// The next incoming packet, or an error on disconnect or when `until` passes (`None`).
    async fn next(&mut self, until: tokio::time::Instant) -> anyhow::Result<Option<Packet>> {
        let until = until.min(self.deadline);
        loop {
            match tokio::time::timeout_at(until, self.eventloop.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack))))
                    if ack.code != rumqttc::ConnectReturnCode::Success =>
                {
                    bail!("the gateway refused the connection: {:?}", ack.code)
                }
                Ok(Ok(Event::Incoming(p))) => return Ok(Some(p)),
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => bail!("connection to the gateway failed: {e}"),
            }
        }
    }

    /// Subscribe to `filters` and wait for the SUBACK.
    async fn subscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
        let subs = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        self.client.subscribe_many(subs).await?;
        loop {
            match self.next(self.deadline).await? {
                Some(Packet::SubAck(ack)) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!(
                            "the gateway refused the subscription (is this an admin certificate?)"
                        );
                    }
                    return Ok(());
                }
                Some(_) => {}
                None => bail!("timed out waiting for the gateway ({REPLY_TIMEOUT:?})"),
            }
        }
    }

    /// The first publish on `topic` before `until`.
    async fn publish_on(
        &mut self,
        topic: &str,
        until: tokio::time::Instant,
    ) -> anyhow::Result<Option<rumqttc::Publish>> {
        loop {
            match self.next(until).await? {
                Some(Packet::Publish(p)) if p.topic == topic => return Ok(Some(p)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

/// Send `cmd` and wait for its reply; print it; fail on `status: error` or timeout.
pub async fn run(
    cmd: AdminCommand,
    config: &crate::config::Config,
    conn: &AdminConnection,
) -> anyhow::Result<()> {
    let reply = send(&cmd, config, conn).await?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    if reply["status"] != "ok" {
        bail!(
            "{}: {}",
            reply["error"]["code"].as_str().unwrap_or("error"),
            reply["error"]["message"]
                .as_str()
                .unwrap_or("command failed")
        );
    }
    Ok(())
}

/// Send `cmd` and return the gateway's reply document.
pub async fn send(
    cmd: &AdminCommand,
    config: &crate::config::Config,
    conn: &AdminConnection,
) -> anyhow::Result<Value> {
    // Validate what we can before connecting.
    if !matches!(cmd, AdminCommand::Config { .. }) {
        command_message(cmd, None)?;
    }
    let mut session = Session::connect(conn, config).await?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let response_topic = format!("admin/responses/{request_id}");
    let current = match cmd {
        AdminCommand::Config { device, set, .. } if !set.is_empty() => {
            let config_topic = format!("devices/{device}/config");
            session
                .subscribe(&[response_topic.clone(), config_topic.clone()])
                .await?;
            let until = tokio::time::Instant::now() + RETAINED_WAIT;
            session
                .publish_on(&config_topic, until)
                .await?
                .and_then(|p| serde_json::from_slice::<Value>(&p.payload).ok())
        }
        _ => {
            session
                .subscribe(std::slice::from_ref(&response_topic))
                .await?;
            None
        }
    };
    let (topic, mut body) = command_message(cmd, current.as_ref())?;
    body.insert("request_id".into(), json!(request_id));
    session
        .client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&Value::Object(body))?,
        )
        .await?;
    let reply = session
        .publish_on(&response_topic, session.deadline)
        .await?
        .ok_or_else(|| anyhow!("no reply from the gateway within {REPLY_TIMEOUT:?}"))?;
    let _ = session.client.disconnect().await;
    serde_json::from_slice(&reply.payload).context("the reply is not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_apply_to_the_current_configuration() {
        let current = json!({ "settings": { "mode": "heat", "target_temperature_c": 21.5 } });
        let body = config_body(
            Some(&current),
            None,
            &["settings.mode=cool".into(), "qos.telemetry=1".into()],
        )
        .unwrap();
        assert_eq!(body["settings"]["mode"], "cool");
        assert_eq!(body["settings"]["target_temperature_c"], 21.5);
        assert_eq!(body["qos"]["telemetry"], 1);
        assert!(config_body(None, None, &["colour=red".into()]).is_err());
        assert!(config_body(None, None, &[]).is_err());
    }

    #[derive(clap::Parser)]
    #[command(name = "onboard", version, propagate_version = true)]
    struct Wrapper {
        #[command(flatten)]
        conn: AdminConnection,
        #[command(subcommand)]
        cmd: AdminCommand,
    }

    #[test]
    fn arguments_parse_as_documented() {
        use clap::{CommandFactory, Parser};
        Wrapper::command().debug_assert();
        let hash = "0".repeat(64);
        let w = Wrapper::try_parse_from([
            "onboard",
            "--cert",
            "a.pem",
            "--key",
            "a.key",
            "firmware",
            "d1",
            "d2",
            "--version",
            "2.0",
            "--url",
            "https://x/y",
            "--sha256",
            &hash,
            "--size",
            "5",
        ])
        .unwrap();
        assert_eq!((w.conn.host.as_str(), w.conn.port), ("localhost", 8883));
        assert!(
            matches!(w.cmd, AdminCommand::Firmware { ref devices, ref version, .. } if devices.len() == 2 && version == "2.0")
        );
        let w = Wrapper::try_parse_from([
            "onboard",
            "--cert",
            "a",
            "--key",
            "b",
            "rollback",
            "d1",
            "--target",
            "enrollment",
        ])
        .unwrap();
        assert!(matches!(
            w.cmd,
            AdminCommand::Rollback {
                target: RollbackTarget::Enrollment,
                ..
            }
        ));
        let w = Wrapper::try_parse_from([
            "onboard",
            "--cert",
            "a",
            "--key",
            "b",
            "config",
            "d1",
            "--set",
            "settings.mode=cool",
            "--set",
            "qos.telemetry=1",
        ])
        .unwrap();
        assert!(matches!(w.cmd, AdminCommand::Config { ref set, .. } if set.len() == 2));
        assert!(
            Wrapper::try_parse_from([
                "onboard",
                "--cert",
                "a",
                "--key",
                "b",
                "firmware",
                "--version",
                "1",
                "--url",
                "u",
                "--sha256",
                "h",
                "--size",
                "1",
            ])
            .is_err(),
            "devices or --type required"
        );
    }

    #[test]
    fn firmware_targets_pick_the_topic() {
        let fw = |devices: Vec<&str>, t: Option<&str>| AdminCommand::Firmware {
            devices: devices.into_iter().map(String::from).collect(),
            device_type: t.map(String::from),
            version: "2".into(),
            url: "https://x/y".into(),
            sha256: "0".repeat(64),
            size: 1,
        };
        let (topic, _) = command_message(&fw(vec!["d1"], None), None).unwrap();
        assert_eq!(topic, "admin/devices/d1/firmware");
        let (topic, body) = command_message(&fw(vec!["d1", "d2"], None), None).unwrap();
        assert_eq!(topic, "admin/firmware");
        assert_eq!(body["devices"], json!(["d1", "d2"]));
        let (_, body) = command_message(&fw(vec![], Some("sensor")), None).unwrap();
        assert_eq!(body["device_type"], "sensor");
    }
}
