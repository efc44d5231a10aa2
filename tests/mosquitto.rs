//! The gateway driven by MQTT clients we did not write: the mosquitto command-line clients
//! enroll a device by hand, exactly as the README's walk-through does.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::harness::*;
use onboard::store::DeviceState;
use serde_json::Value;

fn have(binary: &str) -> bool {
    Command::new(binary)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// TLS arguments for the mosquitto clients.
fn tls_args(dir: &Path, port: u16, id: &str, cert: &str, key: &str) -> Vec<String> {
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string(),
        "--cafile".into(),
        dir.join("server-ca.pem").display().to_string(),
        "--cert".into(),
        dir.join(cert).display().to_string(),
        "--key".into(),
        dir.join(key).display().to_string(),
        "-i".into(),
        id.into(),
        "-q".into(),
        "1".into(),
    ]
}

fn run(binary: &str, args: &[String]) -> std::process::Output {
    let out = Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{binary}: {e}"));
    assert!(
        out.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The bootstrap exchange with one client id (the certificate's CN) and two programs:
/// subscribe in a persistent session and exit once subscribed, publish the request in the
/// same session, then reconnect to collect the answer queued for it.
fn request_reply(boot: &[String], request: &str) -> String {
    let with = |extra: &[&str]| -> Vec<String> {
        let mut args = boot.to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    run(
        "mosquitto_sub",
        &with(&["-c", "-E", "-t", "enroll/therm-7/response"]),
    );
    run(
        "mosquitto_pub",
        &with(&["-c", "-t", "enroll/therm-7/request", "-m", request]),
    );
    let out = run(
        "mosquitto_sub",
        &with(&["-c", "-C", "1", "-W", "10", "-t", "enroll/therm-7/response"]),
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_enroll_a_device_by_hand() {
    if !have("mosquitto_pub") || !have("mosquitto_sub") {
        println!("skipped: mosquitto_pub/mosquitto_sub not installed (apt-get install mosquitto-clients)");
        return;
    }
    let t = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The manufacturing step, as `onboard pki issue-factory --id therm-7 --out DIR` does it.
    onboard::pki::issue_factory_batch(
        &t.config.pki.dir,
        &["therm-7".to_string()],
        dir.path(),
        &onboard::pki::CertOptions::valid_for_days(30),
    )
    .unwrap();
    let port = t.gw.mtls_addr.port();
    let boot = tls_args(dir.path(), port, "therm-7", "therm-7.pem", "therm-7.key");
    let request = r#"{"request_id":"m-1","device_type":"thermostat"}"#;
    let out = tokio::task::spawn_blocking(move || request_reply(&boot, request))
        .await
        .unwrap();
    let resp: Value = serde_json::from_str(out.trim()).expect("JSON response");
    assert_eq!(resp["status"], "accepted", "{resp}");
    std::fs::write(
        dir.path().join("op.pem"),
        resp["credential"]["certificate_pem"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("op.key"),
        resp["credential"]["private_key_pem"].as_str().unwrap(),
    )
    .unwrap();

    // Operational credential: the retained configuration, then telemetry.
    let op = tls_args(dir.path(), port, "therm-7", "op.pem", "op.key");
    let mut sub = op.clone();
    sub.extend([
        "-t".into(),
        "devices/therm-7/config".into(),
        "-C".into(),
        "1".into(),
        "-W".into(),
        "10".into(),
    ]);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_sub")
            .args(&sub)
            .output()
            .expect("mosquitto_sub")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).expect("config JSON");
    assert_eq!(config["version"], 1);
    assert_eq!(config["device_id"], "therm-7");
    let mut publish = op.clone();
    publish.extend([
        "-t".into(),
        "devices/therm-7/telemetry".into(),
        "-m".into(),
        r#"{"temperature_c":20.5}"#.into(),
    ]);
    let status = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_pub")
            .args(&publish)
            .status()
            .expect("mosquitto_pub")
    })
    .await
    .unwrap();
    assert!(status.success());
    eventually("therm-7 active", || async {
        t.gw.store
            .device("therm-7")
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d.state == DeviceState::Active)
    })
    .await;

    // And the topic rules hold for it too: its own config topic is refused (connection closed,
    // which mosquitto_pub reports as an error for a QoS 1 publish).
    let mut denied = op;
    denied.extend([
        "-t".into(),
        "devices/therm-7/config".into(),
        "-m".into(),
        "{}".into(),
    ]);
    tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_pub")
            .args(&denied)
            .output()
            .expect("mosquitto_pub")
    })
    .await
    .unwrap();
    eventually("denied publish counted", || async {
        t.metric(r#"onboard_acl_denied_total{action="publish",role="device"}"#)
            .await
            == 1.0
    })
    .await;
}
