//! The operations files against the real thing: the alerting rules loaded by a real Prometheus
//! that scrapes a real `onboard serve` (alerts go pending when the failures they watch happen),
//! every Grafana panel's query answered by that Prometheus, every alert's runbook link pointing
//! at a section of the runbook, and the CA expiry gauge matching the PKI files.
//!
//! The live test needs the `prometheus` binary (Debian package `prometheus`, which `.ci/run`
//! installs); without it, it says so and passes.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::harness::*;
use onboard::pki::{CertOptions, Issuer};
use serde_json::{json, Value};

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/ops/prometheus/onboard-rules.yml"
);
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/grafana/onboard.json");
const RUNBOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
/// Where every alert's `runbook_url` points, before its `#anchor`.
const RUNBOOK_URL: &str = "https://github.com/onboard-iot/onboard/blob/main/docs/operations.md";
/// How long Prometheus gets to start, scrape and evaluate.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);
/// Bootstrap connections with a certificate of an unknown CA: more than the alerts' thresholds.
const ROGUE_CONNECTIONS: usize = 30;
/// Enrollments that never activate: as many as `OnboardActivationTimeouts` needs.
const ABANDONED_ENROLLMENTS: usize = 3;

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Addresses `onboard serve` printed in its banner.
struct Served {
    _process: Running,
    mtls: SocketAddr,
    metrics: SocketAddr,
}

/// The gateway under test. Its activation window is short, so that the abandoned enrollments
/// time out during the test, but long enough for a device that does come back (a debug build on
/// a loaded machine takes most of a second to reconnect and report).
fn serve(dir: &Path) -> Served {
    std::fs::write(
        dir.join("onboard.toml"),
        format!(
            "[server]\nmtls_listen = \"127.0.0.1:0\"\npassword_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             [enrollment]\ntemplates_dir = \"{}\"\nactivation_timeout_secs = 5\n\
             [lifecycle]\nsweep_interval_ms = 100\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates")
        ),
    )
    .expect("config");
    let mut child = onboard_command()
        .args(["serve", "--config", "onboard.toml"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onboard serve");
    let stderr = child.stderr.take().expect("stderr");
    let process = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let banner = loop {
        let line = lines
            .next()
            .expect("banner before exit")
            .expect("stderr line");
        if line.starts_with("onboard listening: ") {
            break line;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let after = |marker: &str| -> SocketAddr {
        banner
            .split_once(marker)
            .and_then(|(_, rest)| rest.split([' ', '/']).next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {marker:?} address in {banner:?}"))
    };
    Served {
        mtls: after("mTLS "),
        metrics: after("metrics http://"),
        _process: process,
    }
}

/// A real Prometheus scraping `target` every second and evaluating the shipped rules every
/// second, with its HTTP API on `api`.
struct Prometheus {
    _process: Running,
    api: SocketAddr,
    log: std::path::PathBuf,
}

fn prometheus_installed() -> bool {
    Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: onboard\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("prometheus.yml");
    let api = free_port();
    let log = dir.join("prometheus.log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={api}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("prometheus starts");
    Prometheus {
        _process: Running(child),
        api,
        log,
    }
}

impl Prometheus {
    /// The last lines of Prometheus's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// GET an API path; `None` while Prometheus does not answer.
    async fn get(&self, path_and_query: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.api).await.ok()?;
        // HTTP/1.0: the whole body, unchunked, then the connection closes.
        let request = format!("GET {path_and_query} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    }

    /// Run an instant query; the `data.result` array, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let (_, body) = self
            .get(&format!("/api/v1/query?{query}"))
            .await
            .ok_or("no answer")?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Active alerts (pending or firing).
    async fn alerts(&self) -> Vec<Value> {
        let Some((200, body)) = self.get("/api/v1/alerts").await else {
            return Vec::new();
        };
        serde_json::from_str::<Value>(&body).expect("alerts JSON")["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until `promql` returns at least one series.
    async fn wait_for_series(&self, promql: &str) {
        let deadline = tokio::time::Instant::now() + PROMETHEUS_WAIT;
        loop {
            if self.query(promql).await.is_ok_and(|r| !r.is_empty()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus never answered {promql}; its log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until an alert named `name` with `label` = `value` is pending or firing.
    async fn wait_for_alert(&self, name: &str, label: &str, value: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PROMETHEUS_WAIT;
        loop {
            let alerts = self.alerts().await;
            if let Some(alert) = alerts.iter().find(|a| {
                a["labels"]["alertname"] == name
                    && (label.is_empty() || a["labels"][label] == value)
            }) {
                return alert.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "alert {name} ({label}={value}) never became active; active: {:?}",
                alerts
                    .iter()
                    .map(|a| a["labels"].to_string())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Refused bootstrap connections: client certificates from a CA the gateway does not know.
async fn connect_with_unknown_ca(served: &Served, server_ca: &str) {
    let rogue = Issuer::generate_ca("rogue factory CA").expect("rogue CA");
    for i in 0..ROGUE_CONNECTIONS {
        let id = format!("rogue-{i}");
        let cert = rogue
            .issue_client(&id, &CertOptions::valid_for_days(30))
            .expect("rogue cert");
        let tls = client_tls(
            server_ca,
            Some((&cert.certificate_pem, &cert.private_key_pem)),
        );
        let refused = Client::connect(options(&id, served.mtls, tls)).await;
        assert!(refused.is_err(), "{id}: an unknown CA must be refused");
    }
}

/// Enroll `id` over its factory certificate and return the accepted response.
async fn enroll(served: &Served, factory: &Issuer, server_ca: &str, id: &str) -> Value {
    let cert = factory
        .issue_client(id, &CertOptions::valid_for_days(30))
        .expect("factory cert");
    let tls = client_tls(
        server_ca,
        Some((&cert.certificate_pem, &cert.private_key_pem)),
    );
    let mut client = Client::connect(options(id, served.mtls, tls))
        .await
        .expect("bootstrap connects");
    let response = client
        .request_enroll(id, &json!({"request_id": format!("{id}-r1")}))
        .await;
    client.disconnect().await;
    assert_eq!(response["status"], "accepted", "{id}: {response}");
    response
}

/// Enroll and activate one device (reconnect with its credential, report once).
async fn enroll_and_activate(served: &Served, factory: &Issuer, server_ca: &str, id: &str) {
    let response = enroll(served, factory, server_ca, id).await;
    let key = response["credential"]["private_key_pem"]
        .as_str()
        .expect("generated key");
    let credential = issued(&response, key);
    let tls = client_tls(
        server_ca,
        Some((&credential.certificate_pem, &credential.private_key_pem)),
    );
    let mut device = Client::connect(options(id, served.mtls, tls))
        .await
        .expect("operational connect");
    device
        .subscribe(&format!("devices/{id}/#"), rumqttc::QoS::AtLeastOnce)
        .await;
    device.recv_json(&format!("devices/{id}/config")).await;
    device
        .publish(
            &format!("devices/{id}/telemetry"),
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"t":20.5}"#,
        )
        .await;
    eventually(&format!("{id} activates"), || async {
        let body = http_get(served.metrics, "/metrics").await.1;
        metric_value(&body, "onboard_activations_total") >= 1.0
    })
    .await;
    device.disconnect().await;
}

/// A rejected enrollment: a request that is not JSON.
async fn enroll_malformed(served: &Served, factory: &Issuer, server_ca: &str, id: &str) {
    let cert = factory
        .issue_client(id, &CertOptions::valid_for_days(30))
        .expect("factory cert");
    let tls = client_tls(
        server_ca,
        Some((&cert.certificate_pem, &cert.private_key_pem)),
    );
    let mut client = Client::connect(options(id, served.mtls, tls))
        .await
        .expect("bootstrap connects");
    client
        .subscribe(&format!("enroll/{id}/response"), rumqttc::QoS::AtLeastOnce)
        .await;
    client
        .publish(
            &format!("enroll/{id}/request"),
            rumqttc::QoS::AtLeastOnce,
            false,
            "not json",
        )
        .await;
    let response = client.recv_json(&format!("enroll/{id}/response")).await;
    assert_eq!(response["error"]["code"], "malformed_request");
    client.disconnect().await;
}

/// Every `targets[].expr` of the dashboard's panels, with its panel's title.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let panels = dashboard["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| {
                    let expr = t["expr"].as_str().expect("target expr").to_owned();
                    (title.clone(), expr)
                })
        })
        .collect()
}

/// A panel query as Grafana sends it: its variables replaced by what "All" and a 1-minute
/// rate interval give.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_go_pending_and_dashboard_queries_answer_against_a_real_prometheus() {
    if !prometheus_installed() {
        eprintln!(
            "SKIPPED: the `prometheus` binary is not installed (apt-get install prometheus); \
             the live check of the alerting rules and the dashboard did not run"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let served = serve(dir.path());
    let prometheus = start_prometheus(dir.path(), served.metrics);
    // The counters' zero must be scraped before the failures, or no increase is seen.
    prometheus
        .wait_for_series("onboard_auth_failures_total{job=\"onboard\", reason=\"unknown_ca\"} == 0")
        .await;

    let certs = dir.path().join("certs");
    let server_ca = std::fs::read_to_string(certs.join("operational-ca.pem")).expect("server CA");
    let factory = Issuer::load(&certs, "factory-ca").expect("factory CA");
    connect_with_unknown_ca(&served, &server_ca).await;
    for i in 0..ABANDONED_ENROLLMENTS {
        enroll(&served, &factory, &server_ca, &format!("abandoned-{i}")).await;
    }
    enroll_and_activate(&served, &factory, &server_ca, "therm-1").await;
    enroll_malformed(&served, &factory, &server_ca, "therm-2").await;

    for (name, label, value) in [
        ("OnboardAuthFailuresSpike", "reason", "unknown_ca"),
        ("OnboardCertificateRefusalWave", "reason", "unknown_ca"),
        ("OnboardActivationTimeouts", "", ""),
    ] {
        let alert = prometheus.wait_for_alert(name, label, value).await;
        assert!(
            alert["state"] == "pending" || alert["state"] == "firing",
            "{alert}"
        );
        assert!(
            alert["annotations"]["runbook_url"]
                .as_str()
                .is_some_and(|u| u.starts_with(RUNBOOK_URL)),
            "{alert}"
        );
    }
    // What did not happen raises nothing.
    let active: BTreeSet<String> = prometheus
        .alerts()
        .await
        .iter()
        .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
        .collect();
    for quiet in [
        "OnboardDown",
        "OnboardEnrollmentUnavailable",
        "OnboardStoreErrors",
        "OnboardCACertificateExpiring",
        "OnboardConnectionsAtLimit",
    ] {
        assert!(!active.contains(quiet), "{quiet} is active: {active:?}");
    }

    // Every panel's query parses and returns a series.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("dashboard JSON");
    for (title, expr) in dashboard_queries(&dashboard) {
        let sent = as_grafana_sends(&expr);
        let result = prometheus
            .query(&sent)
            .await
            .unwrap_or_else(|e| panic!("panel {title:?}: {sent} fails: {e}"));
        assert!(
            !result.is_empty(),
            "panel {title:?}: {sent} returns no series"
        );
    }
    // The recording rules of the funnel have evaluated.
    for record in [
        "onboard:enrollment_requests:per_minute",
        "onboard:enrollment_accepted:per_minute",
        "onboard:activations:per_minute",
        "onboard:enrollment_duration_seconds:p99_5m",
    ] {
        prometheus.wait_for_series(record).await;
    }
}

/// The GitHub anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `(alert, runbook_url)` of every alert of the rules file.
fn alert_runbooks(rules: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = None;
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alert = Some(name.to_owned());
        } else if let Some(url) = line.strip_prefix("runbook_url: ") {
            let name = alert.take().expect("runbook_url inside an alert");
            out.push((name, url.to_owned()));
        }
    }
    out
}

#[test]
fn every_alert_has_a_severity_and_a_runbook_section() {
    let rules = std::fs::read_to_string(RULES).expect("rules");
    let runbook = std::fs::read_to_string(RUNBOOK).expect("runbook");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let alerts = rules.matches("- alert: ").count();
    let severities =
        rules.matches("severity: warning").count() + rules.matches("severity: critical").count();
    assert_eq!(severities, alerts, "one severity per alert");
    let runbooks = alert_runbooks(&rules);
    assert_eq!(runbooks.len(), alerts, "one runbook_url per alert");
    for (alert, url) in runbooks {
        let expected = format!("{RUNBOOK_URL}#{}", alert.to_lowercase());
        assert_eq!(url, expected, "{alert}");
        assert!(
            anchors.contains(&alert.to_lowercase()),
            "{alert}: docs/operations.md has no section {alert}"
        );
    }
}

#[test]
fn dashboard_is_importable_with_the_datasource_as_a_variable() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard"))
            .expect("dashboard JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{panel}"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{}", panel["title"]);
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets.iter().chain([panel]) {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{}: the datasource is the variable",
                panel["title"]
            );
        }
    }
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap_or("").to_lowercase())
        .collect();
    for wanted in [
        "funnel",
        "enrollment latency",
        "rejections by reason",
        "refusals by reason",
        "activations and timeouts",
        "connections by role",
        "store latency",
        "store errors",
        "certificates issued",
        "expiring",
        "rollbacks by target and trigger",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel for {wanted}: {titles:?}"
        );
    }
}

#[tokio::test]
async fn ca_expiry_gauge_matches_the_certificates_in_use() {
    let t = TestGateway::start().await;
    let body = t.http_get("/metrics").await.1;
    let certs = &t.config.pki.dir;
    for (ca, file) in [
        ("factory", "factory-ca.pem"),
        ("operational", "operational-ca.pem"),
        ("admin", "admin-ca.pem"),
        ("server", "server.pem"),
    ] {
        let pem = std::fs::read(certs.join(file)).expect("certificate file");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
        let cert = pem.parse_x509().expect("certificate");
        let subject = cert.subject().to_string();
        let sample = format!(
            "onboard_ca_certificate_not_after_seconds{{ca=\"{ca}\",subject=\"{subject}\"}}"
        );
        assert_eq!(
            metric_value(&body, &sample),
            cert.validity().not_after.timestamp() as f64,
            "{sample} in:\n{}",
            body.lines()
                .filter(|l| l.contains("not_after"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
