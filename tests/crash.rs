//! A gateway process killed (SIGKILL) in the middle of a wave of enrollments loses nothing:
//! after a restart every device is either fully enrolled (device, credential, configuration and
//! answer all present) or not at all, and every retry with the same request id succeeds with
//! exactly one credential per device.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::harness::*;
use onboard::pki::{CertOptions, Issuer};
use serde_json::json;

const DEVICES: usize = 60;

/// `text` as a TOML basic string (a connection string may hold quotes and backslashes).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Start `onboard serve` in `dir` and return it with its mTLS address (read from its banner).
fn serve(dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = onboard_command()
        .args(["serve", "--config", "onboard.toml"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("onboard serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("banner before exit")
            .expect("stderr line");
        if let Some(rest) = line.strip_prefix("onboard listening: mTLS ") {
            break rest
                .split_whitespace()
                .next()
                .expect("address")
                .parse()
                .expect("socket address");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_enrollment_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // SQLite in the directory, or a scratch schema on SQL Server (removed at the end).
    let scratch = common::mssql::Scratch::create()
        .await
        .map(|s| Arc::new(ScratchGuard(s)));
    let store_url = match &scratch {
        Some(s) => s.0.url.clone(),
        None => format!("sqlite://{}", dir.path().join("data/onboard.db").display()),
    };
    let store_toml = toml_string(&store_url);
    std::fs::write(
        dir.path().join("onboard.toml"),
        format!(
            "[server]\nmtls_listen = \"127.0.0.1:0\"\npassword_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             [enrollment]\ntemplates_dir = \"{}\"\n[store]\nurl = {store_toml}\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates")
        ),
    )
    .unwrap();
    let (mut child, addr) = serve(dir.path());
    let certs = dir.path().join("certs");
    let factory = Issuer::load(&certs, "factory-ca").unwrap();
    let server_ca = std::fs::read_to_string(certs.join("operational-ca.pem")).unwrap();
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("crash-{i:03}")).collect();
    let creds: Arc<Vec<_>> = Arc::new(
        ids.iter()
            .map(|id| {
                factory
                    .issue_client(id, &CertOptions::valid_for_days(1))
                    .unwrap()
            })
            .collect(),
    );

    // Everyone enrolls at once; the process is killed while answers are coming in.
    let answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (id, creds, ca, answers) = (
            id.clone(),
            creds.clone(),
            server_ca.clone(),
            answers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let tls = client_tls(
                &ca,
                Some((&creds[i].certificate_pem, &creds[i].private_key_pem)),
            );
            let mut c = Client::connect(options(&id, addr, tls)).await.ok()?;
            let topic = format!("enroll/{id}/response");
            // (no panicking helpers here: these connections die with the server)
            c.client
                .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
                .await
                .ok()?;
            let request = serde_json::to_vec(&json!({"request_id": "crash"})).ok()?;
            c.client
                .publish(
                    format!("enroll/{id}/request"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    request,
                )
                .await
                .ok()?;
            let p = c.recv_on(&topic, Duration::from_secs(5)).await?;
            answers.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            serde_json::from_slice::<serde_json::Value>(&p.payload).ok()
        }));
    }
    // Kill as soon as some answers are out: the rest are somewhere between request and answer.
    let deadline = tokio::time::Instant::now() + WAIT;
    while answers.load(std::sync::atomic::Ordering::SeqCst) < 10
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let mut answered = std::collections::HashMap::new();
    for (id, task) in ids.iter().zip(tasks) {
        if let Ok(Some(resp)) = task.await {
            answered.insert(id.clone(), resp);
        }
    }

    // Restart on the same files.
    let (mut child, addr) = serve(dir.path());
    let config = onboard::store::open(&onboard::config::StoreConfig {
        url: store_url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut enrolled = 0;
    for id in &ids {
        match config.device(id).await.unwrap() {
            Some(device) => {
                enrolled += 1;
                let creds = config.credentials_of(id).await.unwrap();
                assert_eq!(creds.len(), 1, "{id}: one credential");
                assert_eq!(
                    device.current_serial.as_deref(),
                    Some(creds[0].serial.as_str())
                );
                assert_eq!(
                    config.latest_config(id).await.unwrap().map(|c| c.version),
                    Some(1),
                    "{id}: config v1"
                );
                assert!(
                    config.find_enrollment(id, "crash").await.unwrap().is_some(),
                    "{id}: answer stored"
                );
            }
            None => {
                assert!(
                    config.credentials_of(id).await.unwrap().is_empty(),
                    "{id}: no orphan credential"
                );
                assert!(
                    config.latest_config(id).await.unwrap().is_none(),
                    "{id}: no orphan config"
                );
                assert!(
                    !answered.contains_key(id),
                    "{id} was answered but is not in the store"
                );
            }
        }
    }
    // Whatever was answered before the kill is what the store holds.
    for (id, resp) in &answered {
        if resp["status"] == "accepted" {
            let stored = config
                .find_enrollment(id, "crash")
                .await
                .unwrap()
                .expect("stored");
            assert_eq!(
                stored.response["credential"]["certificate_pem"],
                resp["credential"]["certificate_pem"]
            );
        }
    }

    // Every device retries with the same request id and ends with exactly one credential.
    for (i, id) in ids.iter().enumerate() {
        let tls = client_tls(
            &server_ca,
            Some((&creds[i].certificate_pem, &creds[i].private_key_pem)),
        );
        let mut c = Client::connect(options(id, addr, tls))
            .await
            .expect("bootstrap after restart");
        let resp = c.request_enroll(id, &json!({"request_id": "crash"})).await;
        assert_eq!(resp["status"], "accepted", "{id}: {resp}");
        c.disconnect().await;
        assert_eq!(config.credentials_of(id).await.unwrap().len(), 1, "{id}");
    }
    println!(
        "{} of {DEVICES} enrolled before the kill, {} answered",
        enrolled,
        answered.len()
    );
    assert!(
        !answered.is_empty() && enrolled < DEVICES,
        "the kill landed mid-wave ({enrolled} enrolled)"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
