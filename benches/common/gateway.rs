//! `onboard serve` as a child process: its configuration file in a temporary directory (loopback
//! ports picked here, SQLite file, PKI directory the gateway fills at its first start), readiness
//! by `/readyz`, metrics by `/metrics`, and a stop by SIGTERM. A [`GatewayProcess`] that is
//! dropped (an error, a panic) kills its child.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use onboard::config::Config;
use onboard::pki::{CertAndKey, CertOptions, Issuer};
use onboard::simulate::{SimCredential, SimulateOptions};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::procfs;

/// How long a start may take until `/readyz` answers 200 (it republishes the fleet's retained
/// configurations first).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a stop may take after SIGTERM before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one HTTP exchange with the metrics listener.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Loopback only.
const LOOPBACK: std::net::Ipv4Addr = std::net::Ipv4Addr::LOCALHOST;

/// The gateway's files and addresses, the same for every start.
pub struct Setup {
    dir: TempDir,
    binary: PathBuf,
    pub mtls: SocketAddr,
    pub password: SocketAddr,
    pub metrics: SocketAddr,
    starts: usize,
}

/// Resident memory and open descriptors of the gateway.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

/// `n` distinct free loopback ports (bound together, then released for the gateway).
fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind((LOOPBACK, 0)))
        .collect::<Result<_, _>>()
        .context("free loopback port")?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()?;
    addrs.try_into().map_err(|_| anyhow!("free loopback ports"))
}

/// The release binary cargo built for this benchmark.
fn gateway_binary() -> Result<PathBuf> {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_onboard"));
    if !binary.is_file() {
        bail!("{} is missing (run through cargo bench)", binary.display());
    }
    Ok(binary)
}

impl Setup {
    pub fn new() -> Result<Setup> {
        let [mtls, password, metrics] = free_ports::<3>()?;
        Ok(Setup {
            dir: tempfile::tempdir().context("temporary directory")?,
            binary: gateway_binary()?,
            mtls,
            password,
            metrics,
            starts: 0,
        })
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Simulator options for devices named `<prefix>NNNNNN` enrolling with CSRs through this
    /// gateway, `timeout` for one device's flow.
    pub fn sim_options(&self, prefix: &str, timeout: Duration) -> SimulateOptions {
        SimulateOptions {
            host: super::HOST.into(),
            port: self.mtls.port(),
            password_port: self.password.port(),
            prefix: prefix.into(),
            credential: SimCredential::Csr,
            device_type: "thermostat".into(),
            pki_dir: self.pki_dir(),
            telemetry_messages: 1,
            timeout,
            ..SimulateOptions::default()
        }
    }

    /// An admin certificate (CN `name`) from the gateway's admin CA (made at its first start).
    pub fn admin(&self, name: &str) -> Result<CertAndKey> {
        Issuer::load(&self.pki_dir(), "admin-ca")
            .context("admin CA")?
            .issue_client(name, &CertOptions::valid_for_days(1))
            .context("admin certificate")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// The configuration file of a start; `max_connections` or the default.
    fn write_config(&self, max_connections: Option<usize>) -> Result<PathBuf> {
        let mut c = Config::default();
        c.server.mtls_listen = self.mtls;
        c.server.password_listen = self.password;
        c.server.metrics_listen = self.metrics;
        if let Some(max) = max_connections {
            c.server.max_connections = max;
        }
        c.pki.dir = self.pki_dir();
        c.store.url = format!("sqlite://{}", self.dir.path().join("onboard.db").display());
        c.enrollment.templates_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/templates");
        // The benchmark measures the gateway, not its rate limiter.
        c.enrollment.max_requests_per_sec = 1_000_000;
        // Every simulated device connects from loopback: one source address.
        c.limits.max_handshakes_per_source = 1_000_000;
        let path = self.dir.path().join("onboard.toml");
        let text = toml::to_string(&c).context("configuration as TOML")?;
        std::fs::write(&path, text).with_context(|| path.display().to_string())?;
        Ok(path)
    }

    /// Start `onboard serve` and wait until it is ready.
    pub async fn start(&mut self, max_connections: Option<usize>) -> Result<GatewayProcess> {
        let config = self.write_config(max_connections)?;
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("gateway log")?;
        writeln!(log, "--- start {} ---", self.starts)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("NO_COLOR", "1");
        // Only this file configures the gateway (ONBOARD_LOG, the log filter, may stay).
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("ONBOARD_") && key != "ONBOARD_LOG" {
                command.env_remove(key);
            }
        }
        let started = Instant::now();
        let child = command.spawn().context("onboard serve")?;
        let mut gateway = GatewayProcess {
            child,
            metrics: self.metrics,
            log: self.log_path(),
            ready_in: Duration::ZERO,
        };
        gateway.wait_ready(started + READY_TIMEOUT).await?;
        gateway.ready_in = started.elapsed();
        Ok(gateway)
    }

    /// Warnings and errors the gateway logged over the whole run: counts and the first few.
    pub fn log_summary(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        // `<timestamp>  LEVEL target: message` (no colours: NO_COLOR is set), or a panic.
        let level = |line: &str| line.split_whitespace().nth(1).map(str::to_owned);
        let noteworthy: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("panicked") || matches!(level(l).as_deref(), Some("WARN" | "ERROR"))
            })
            .collect();
        let warnings = noteworthy
            .iter()
            .filter(|l| level(l).as_deref() == Some("WARN"))
            .count();
        let mut out = format!(
            "gateway log: {warnings} warnings, {} errors or panics",
            noteworthy.len() - warnings
        );
        for line in noteworthy.iter().take(5) {
            out.push_str("\n  ");
            out.extend(line.chars().take(200));
        }
        out
    }
}

/// A running `onboard serve`.
pub struct GatewayProcess {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    /// From spawn to the first `/readyz` 200.
    pub ready_in: Duration,
}

impl GatewayProcess {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Poll `/readyz` until it answers 200, the process exits, or `deadline` passes.
    async fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            self.check_running()?;
            if let Ok((200, _)) = http_get(self.metrics, "/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "gateway not ready within {} s\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error (with the end of its log) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("gateway exited ({status})\n{}", self.log_tail(20)),
            Err(e) => bail!("gateway status: {e}"),
        }
    }

    pub fn usage(&self) -> Result<Usage> {
        let pid = self.pid();
        Ok(Usage {
            rss_kib: procfs::rss_kib(&pid)?,
            fds: procfs::open_fds(&pid)?,
        })
    }

    /// CPU time of this process and of the gateway.
    pub fn cpu(&self) -> Result<procfs::CpuPair> {
        procfs::CpuPair::read(&self.pid())
    }

    /// The value of one series of `/metrics`, e.g. `onboard_devices{state="active"}`.
    pub async fn metric(&self, series: &str) -> Result<Option<f64>> {
        let (status, body) = http_get(self.metrics, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body.lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        }))
    }

    /// SIGTERM, and wait for the exit; killed (and an error) if it takes too long.
    pub async fn stop(mut self) -> Result<Duration> {
        self.check_running()?;
        let started = Instant::now();
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).context("SIGTERM")?;
        while started.elapsed() < STOP_TIMEOUT {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("gateway stopped with {status}\n{}", self.log_tail(20));
                }
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "gateway still running {} s after SIGTERM: killed\n{}",
            STOP_TIMEOUT.as_secs(),
            self.log_tail(20)
        )
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n  ");
        format!(
            "gateway log ({}), last lines:\n  {tail}",
            self.log.display()
        )
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` on the metrics listener: status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("GET {path}: timed out"))?
        .with_context(|| format!("GET {path}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
