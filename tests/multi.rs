//! Several gateways on one store: two `onboard serve` processes share one SQLite file. What an
//! admin does through gateway A reaches the device connected to gateway B through the store's
//! change feed, within the poll interval.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::harness::*;
use common::served::{config_file, Served};
use onboard::pki::{CertAndKey, CertOptions, Issuer};
use rumqttc::{ConnectReturnCode, QoS};
use serde_json::{json, Value};

/// The change feed's poll interval in this test.
const POLL_MS: u64 = 200;
/// How late a change may reach the other gateway: the default bound (2 s) for the product
/// contract, ten times the poll interval used here.
const BOUND: Duration = Duration::from_secs(2);

/// A client of `gateway` with `cert`, trusting the shared PKI's server certificate.
async fn connect(dir: &Path, gateway: &Served, client_id: &str, cert: &CertAndKey) -> Client {
    Client::connect(client_options(dir, gateway, client_id, cert))
        .await
        .unwrap_or_else(|e| panic!("{client_id} connects: {e:?}"))
}

fn client_options(
    dir: &Path,
    gateway: &Served,
    client_id: &str,
    cert: &CertAndKey,
) -> rumqttc::MqttOptions {
    let ca = std::fs::read_to_string(dir.join("certs/operational-ca.pem")).expect("server CA");
    let tls = client_tls(&ca, Some((&cert.certificate_pem, &cert.private_key_pem)));
    options(client_id, gateway.mtls_addr, tls)
}

fn issue(dir: &Path, ca: &str, name: &str) -> CertAndKey {
    Issuer::load(&dir.join("certs"), ca)
        .expect("CA loads")
        .issue_client(name, &CertOptions::valid_for_days(30))
        .expect("certificate")
}

/// Wait for the next configuration on `topic` with `version`, and say how long it took.
async fn config_version(device: &mut Client, topic: &str, version: i64) -> Value {
    loop {
        let config = device.recv_json(topic).await;
        if config["version"] == version {
            return config;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_through_one_gateway_disconnects_the_device_on_the_other() {
    two_gateways_on_one_store(None, "multi-0001").await;
}

/// The same on SQL Server, when `ONBOARD_TEST_MSSQL_URL` names one (its default schema; the
/// device id, and the admin request ids made from it, are unique to the run, so the database
/// need not be empty: request ids are the fleet's, and a reused one is answered as a replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_through_one_gateway_disconnects_the_device_on_the_other_on_sql_server() {
    let Ok(url) = std::env::var("ONBOARD_TEST_MSSQL_URL") else {
        println!("skipped: ONBOARD_TEST_MSSQL_URL is not set");
        return;
    };
    let id = format!("multi-{}", uuid::Uuid::new_v4().simple());
    two_gateways_on_one_store(Some(&url), &id).await;
}

async fn two_gateways_on_one_store(store_url: Option<&str>, id: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    config_file(dir, "");
    let poll = POLL_MS.to_string();
    let mut env = vec![("ONBOARD_STORE_CHANGE_POLL_MS", poll.as_str())];
    env.extend(store_url.map(|url| ("ONBOARD_STORE_URL", url)));
    // A creates the development PKI and the database; B starts on the same files.
    let a = Served::start(dir, &[], &env);
    let b = Served::start(dir, &[], &env);

    // Enrolled through A.
    let mut bootstrap = connect(dir, &a, id, &issue(dir, "factory-ca", id)).await;
    let (csr, key) = csr_for(id);
    let answer = bootstrap
        .request_enroll(id, &json!({ "request_id": "r-1", "csr": csr }))
        .await;
    bootstrap.disconnect().await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    let cred = issued(&answer, &key);

    // Connected to B: the configuration A published reaches it there, and it activates.
    let mut device = connect(dir, &b, id, &cred).await;
    let config_topic = format!("devices/{id}/config");
    device.subscribe(&config_topic, QoS::AtLeastOnce).await;
    let first = config_version(&mut device, &config_topic, 1).await;
    assert_eq!(first["device_id"], id);
    device
        .publish(
            &format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            r#"{"t":20.5}"#,
        )
        .await;

    // An admin on A publishes a new configuration: the device on B gets it.
    let mut ops = connect(dir, &a, "ops", &issue(dir, "admin-ca", "ops")).await;
    ops.subscribe("admin/responses/#", QoS::AtLeastOnce).await;
    let sent = Instant::now();
    let reply = admin_command(
        &mut ops,
        &format!("admin/devices/{id}/config"),
        json!({ "request_id": format!("c-1-{id}"), "settings": { "target_temperature_c": 19.0 } }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let version = reply["result"]["version"].as_i64().expect("version");
    let pushed = config_version(&mut device, &config_topic, version).await;
    let config_delay = sent.elapsed();
    assert_eq!(pushed["settings"]["target_temperature_c"], 19.0, "{pushed}");
    assert!(
        config_delay < BOUND,
        "config reached B after {config_delay:?}"
    );

    // A firmware job created on A is retained for the device on B; its progress, reported
    // to B, is what A reads back.
    let firmware_topic = format!("devices/{id}/firmware");
    device.subscribe(&firmware_topic, QoS::AtLeastOnce).await;
    let reply = admin_command(
        &mut ops,
        &format!("admin/devices/{id}/firmware"),
        json!({
            "request_id": format!("f-1-{id}"), "version": "2.0.0", "url": "https://fw.example/t-2.0.0.bin",
            "sha256": "ab".repeat(32), "size": 1024,
        }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let job_id = reply["result"]["job_id"]
        .as_str()
        .expect("job id")
        .to_owned();
    let job = device.recv_json(&firmware_topic).await;
    assert_eq!(job["job_id"], job_id.as_str(), "{job}");
    assert_eq!(job["version"], "2.0.0");

    // The admin on A revokes it: B disconnects it within the bound...
    let sent = Instant::now();
    let reply = admin_command(
        &mut ops,
        &format!("admin/devices/{id}/revoke"),
        json!({ "request_id": format!("v-1-{id}"), "reason": "stolen" }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert!(
        device.closed_within(BOUND).await,
        "B kept the revoked device's session"
    );
    let revoke_delay = sent.elapsed();
    println!("change feed ({POLL_MS} ms poll): config after {config_delay:?}, revoke after {revoke_delay:?}");

    // B counts what it applied from A; A applied nothing of its own.
    let applied = |body: &str, kind: &str| {
        metric_value(
            body,
            &format!(r#"onboard_changes_applied_total{{kind="{kind}"}}"#),
        )
    };
    // (The revoke's two changes are applied one after the other: the first one closes the
    // session, the second may still be reading the store.)
    for kind in ["config", "firmware", "credentials", "state"] {
        eventually(&format!("{kind} applied on B"), || async {
            applied(&http_get(b.metrics_addr, "/metrics").await.1, kind) >= 1.0
        })
        .await;
    }
    let on_a = http_get(a.metrics_addr, "/metrics").await.1;
    assert_eq!(applied(&on_a, "config"), 0.0);

    // ...and refuses it the next time, as A does.
    for gateway in [&b, &a] {
        let refused = Client::connect(client_options(dir, gateway, id, &cred)).await;
        assert_eq!(
            refused.err(),
            Some(ConnectFailure::Refused(ConnectReturnCode::NotAuthorized))
        );
    }
}
