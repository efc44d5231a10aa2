//! `onboard serve` as its own process (the real binary, its signals and its log), on ephemeral
//! loopback ports, with a configuration file in a temporary directory.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use onboard::config::Config;
use onboard::pki::{CertAndKey, CertOptions, Issuer, Pki};
use rumqttc::MqttOptions;

use super::harness::{
    client_tls, http_get, metric_value, onboard_command, options, test_config, WAIT,
};

/// A running `onboard serve` child process.
pub struct Served {
    pub dir: PathBuf,
    pub config: Config,
    pub mtls_addr: SocketAddr,
    pub password_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    child: Child,
    /// Every line the process wrote on standard error so far.
    lines: Arc<Mutex<Vec<String>>>,
}

/// The configuration file of a test gateway in `dir`, plus `extra` TOML lines appended under
/// their own section headers.
pub fn config_file(dir: &Path, extra: &str) -> PathBuf {
    config_file_with_templates(dir, extra, &test_config(dir).enrollment.templates_dir)
}

/// [`config_file`] with its own templates directory.
pub fn config_file_with_templates(dir: &Path, extra: &str, templates: &Path) -> PathBuf {
    let c = test_config(dir);
    let path = dir.join("onboard.toml");
    let text = format!(
        "[server]\nmtls_listen = \"127.0.0.1:0\"\npassword_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n\n[store]\nurl = \"{}\"\n\n\
         [enrollment]\ntemplates_dir = \"{}\"\n\n[lifecycle]\nsweep_interval_ms = 100\n\n\
         [pki]\ndir = \"{}\"\n{extra}",
        c.store.url,
        templates.display(),
        c.pki.dir.display(),
    );
    std::fs::write(&path, text).expect("config file");
    path
}

/// The development PKI of `dir` (created if missing).
pub fn init_pki(dir: &Path) -> Config {
    let config = test_config(dir);
    Pki::init(&config.pki).expect("pki init");
    config
}

/// Run `onboard ARGS` in `dir` with its configuration file; (success, stdout, stderr).
pub fn onboard_in(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = onboard_command()
        .args(args)
        .current_dir(dir)
        .env("ONBOARD_CONFIG", dir.join("onboard.toml"))
        .env_remove("ONBOARD_LOG")
        .output()
        .expect("onboard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Served {
    /// Start `onboard serve ARGS` in `dir` (whose `onboard.toml` must exist) and wait until it
    /// says where it listens.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let mut command = onboard_command();
        command
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("ONBOARD_CONFIG", dir.join("onboard.toml"))
            .env_remove("ONBOARD_LOG")
            .env_remove("ONBOARD_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("onboard serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().expect("log lines").push(line);
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        let addrs = loop {
            if let Some(addrs) = lines
                .lock()
                .expect("log lines")
                .iter()
                .find_map(|l| listening(l))
            {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "onboard serve exited ({status}): {:?}",
                    lines.lock().expect("log lines")
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "onboard serve did not start: {:?}",
                lines.lock().expect("log lines")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Served {
            dir: dir.to_path_buf(),
            config: test_config(dir),
            mtls_addr: addrs[0],
            password_addr: addrs[1],
            metrics_addr: addrs[2],
            child,
            lines,
        }
    }

    /// Send SIGHUP and wait until the reload it asks for is counted (`ok` or `error`).
    pub async fn reload(&self) -> ReloadResult {
        let before = self.reloads().await;
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.reloads().await;
            if now.0 > before.0 {
                return ReloadResult::Ok;
            }
            if now.1 > before.1 {
                return ReloadResult::Error;
            }
            assert!(tokio::time::Instant::now() < deadline, "SIGHUP not handled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn reloads(&self) -> (f64, f64) {
        let (_, text) = http_get(self.metrics_addr, "/metrics").await;
        (
            metric_value(&text, "onboard_reloads_total{result=\"ok\"}"),
            metric_value(&text, "onboard_reloads_total{result=\"error\"}"),
        )
    }

    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = http_get(self.metrics_addr, "/metrics").await;
        metric_value(&text, sample)
    }

    /// The log so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    fn issuer(&self, stem: &str) -> Issuer {
        Issuer::load(&self.config.pki.dir, stem).expect("issuer loads")
    }

    pub fn factory(&self, device_id: &str) -> CertAndKey {
        self.issuer("factory-ca")
            .issue_client(device_id, &CertOptions::valid_for_days(365))
            .expect("factory cert")
    }

    pub fn admin(&self, name: &str) -> CertAndKey {
        self.issuer("admin-ca")
            .issue_client(name, &CertOptions::valid_for_days(30))
            .expect("admin cert")
    }

    /// The CA clients trust for the server certificate: the operational CA that signed it.
    pub fn server_ca_pem(&self) -> String {
        std::fs::read_to_string(self.config.pki.dir.join("operational-ca.pem")).expect("CA")
    }

    pub fn mtls_options(&self, client_id: &str, cert: &CertAndKey) -> MqttOptions {
        self.mtls_options_trusting(client_id, cert, &self.server_ca_pem())
    }

    pub fn mtls_options_trusting(
        &self,
        client_id: &str,
        cert: &CertAndKey,
        server_ca_pem: &str,
    ) -> MqttOptions {
        let tls = client_tls(
            server_ca_pem,
            Some((&cert.certificate_pem, &cert.private_key_pem)),
        );
        options(client_id, self.mtls_addr, tls)
    }

    /// DER of the certificate the password listener presents to a new handshake.
    pub async fn server_certificate(&self, server_ca_pem: &str) -> Vec<u8> {
        let tcp = tokio::net::TcpStream::connect(self.password_addr)
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(client_tls(server_ca_pem, None))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        tls.get_ref().1.peer_certificates().expect("server chain")[0]
            .as_ref()
            .to_vec()
    }
}

/// How a reload ended, as counted in `onboard_reloads_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Error,
}

/// The three addresses of the `onboard listening: mTLS A | password B | metrics http://C/...`
/// line, or of the JSON `gateway listening` event.
fn listening(line: &str) -> Option<[SocketAddr; 3]> {
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        if event["message"] == "gateway listening" {
            let addr = |key: &str| event[key].as_str()?.parse().ok();
            return Some([
                addr("mtls_addr")?,
                addr("password_addr")?,
                addr("metrics_addr")?,
            ]);
        }
        return None;
    }
    let rest = line.strip_prefix("onboard listening: mTLS ")?;
    let (mtls, rest) = rest.split_once(" | password ")?;
    let (password, rest) = rest.split_once(" | metrics http://")?;
    let (metrics, _) = rest.split_once("/metrics")?;
    Some([
        mtls.parse().ok()?,
        password.parse().ok()?,
        metrics.parse().ok()?,
    ])
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
