//! `onboard serve` run as a service runs it: reloading its PKI and templates on SIGHUP while
//! clients stay connected, revoking admins, rotating the operational CA, its JSON log, its
//! version, and an online backup of its store.

mod common;

use common::harness::*;
use common::served::*;
use onboard::pki::Pki;
use rumqttc::QoS;
use serde_json::{json, Value};
use x509_parser::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_certificate_and_keeps_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = init_pki(dir.path());
    let templates = dir.path().join("templates");
    std::fs::create_dir(&templates).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/templates");
    std::fs::copy(
        shipped.join("thermostat.toml"),
        templates.join("thermostat.toml"),
    )
    .unwrap();
    config_file_with_templates(dir.path(), "", &templates);
    let served = Served::start(dir.path(), &[], &[]);
    let ca = served.server_ca_pem();
    let first = served.server_certificate(&ca).await;

    // Devices connected before the rotation, on both listeners.
    let factory = served.factory("rot-1");
    let mut before = Client::connect(served.mtls_options("rot-1", &factory))
        .await
        .expect("connects");
    let factory = served.factory("pw-1");
    let mut boot = Client::connect(served.mtls_options("pw-1", &factory))
        .await
        .expect("connects");
    let resp = boot
        .request_enroll(
            "pw-1",
            &json!({"request_id": "p", "credential": "password"}),
        )
        .await;
    boot.disconnect().await;
    let password = resp["credential"]["password"].as_str().expect("password");
    let mut pw = options("pw-1", served.password_addr, client_tls(&ca, None));
    pw.set_credentials("pw-1", password);
    let mut password_device = Client::connect(pw).await.expect("password device connects");

    let pki = &config.pki.dir;
    std::fs::remove_file(pki.join("server.pem")).unwrap();
    std::fs::remove_file(pki.join("server.key")).unwrap();
    Pki::init(&config.pki).expect("new server certificate");
    let rotated = std::fs::read_to_string(pki.join("server.pem")).unwrap();
    assert_eq!(served.reload().await, ReloadResult::Ok);

    let now = served.server_certificate(&ca).await;
    assert_ne!(now, first, "a new handshake sees the new certificate");
    assert_eq!(now, pem_der(&rotated));
    // The connection made before the reload still works end to end.
    let resp = before
        .request_enroll("rot-1", &json!({"request_id": "r-1"}))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");

    let code = password_device
        .subscribe("devices/pw-1/config", QoS::AtLeastOnce)
        .await;
    assert_eq!(
        code,
        rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert!(password_device.recv_json("devices/pw-1/config").await["version"] == 1);

    // Templates: a new device type is known after the next reload, not before.
    std::fs::write(templates.join("valve.toml"), "[settings]\nopen = false\n").unwrap();
    let valve = json!({"request_id": "r-2", "device_type": "valve"});
    let resp = before.request_enroll("rot-1", &valve).await;
    assert_eq!(resp["error"]["code"], "unknown_device_type", "{resp}");
    assert_eq!(served.reload().await, ReloadResult::Ok);
    let valve = json!({"request_id": "r-3", "device_type": "valve"});
    let resp = before.request_enroll("rot-1", &valve).await;
    assert_eq!(resp["status"], "accepted", "{resp}");

    // A bad file: the reload is refused, counted and logged, and the old material stays.
    std::fs::write(pki.join("server.pem"), "not a certificate").unwrap();
    assert_eq!(served.reload().await, ReloadResult::Error);
    assert_eq!(served.server_certificate(&ca).await, now);
    let log = served.log().join("\n");
    assert!(log.contains("reload failed"), "{log}");
    // So is a configuration file that no longer parses.
    std::fs::write(pki.join("server.pem"), &rotated).unwrap();
    let good = std::fs::read_to_string(dir.path().join("onboard.toml")).unwrap();
    std::fs::write(dir.path().join("onboard.toml"), "[pki]\nno_such_key = 1\n").unwrap();
    assert_eq!(served.reload().await, ReloadResult::Error);
    std::fs::write(dir.path().join("onboard.toml"), good).unwrap();
    assert_eq!(served.reload().await, ReloadResult::Ok);
    assert!(!before.closed_within(std::time::Duration::ZERO).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_is_disconnected_on_sighup_and_refused_after() {
    let dir = tempfile::tempdir().unwrap();
    init_pki(dir.path());
    config_file(dir.path(), "");
    let served = Served::start(dir.path(), &[], &[]);
    let (alice, bob) = (served.admin("alice"), served.admin("bob"));
    std::fs::write(dir.path().join("alice.pem"), &alice.certificate_pem).unwrap();
    let mut alice_session = Client::connect(served.mtls_options("alice", &alice))
        .await
        .expect("alice connects");
    let mut bob_session = Client::connect(served.mtls_options("bob", &bob))
        .await
        .expect("bob connects");

    let (ok, out, err) = onboard_in(dir.path(), &["pki", "revoke-admin", "--cert", "alice.pem"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked alice"), "{out}");
    // Not applied before the reload.
    assert!(!alice_session.closed_within(std::time::Duration::ZERO).await);
    assert_eq!(served.reload().await, ReloadResult::Ok);

    assert!(
        alice_session.closed_within(WAIT).await,
        "alice disconnected"
    );
    assert_eq!(
        bob_session
            .subscribe("admin/events/#", QoS::AtLeastOnce)
            .await,
        rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "bob is still served"
    );
    let refused = served
        .metric("onboard_auth_failures_total{reason=\"credential_revoked\"}")
        .await;
    match Client::connect(served.mtls_options("alice", &alice)).await {
        Err(ConnectFailure::Failed(_)) => {}
        other => panic!(
            "a revoked admin must fail the handshake: {:?}",
            other.map(|_| ())
        ),
    }
    eventually("the refusal is counted", || async {
        served
            .metric("onboard_auth_failures_total{reason=\"credential_revoked\"}")
            .await
            > refused
    })
    .await;
    // Both the disconnection and the refusal are in alice's audit trail.
    let dir_path = dir.path().to_path_buf();
    eventually("alice's audit trail", || {
        let dir_path = dir_path.clone();
        async move {
            let (_, out, _) =
                tokio::task::spawn_blocking(move || onboard_in(&dir_path, &["audit", "alice"]))
                    .await
                    .unwrap();
            out.contains("admin_revoked") && out.contains("credential_revoked")
        }
    })
    .await;
    // Revoking again keeps one entry; a non-admin certificate is refused.
    let (ok, out, _) = onboard_in(dir.path(), &["pki", "revoke-admin", "--cert", "alice.pem"]);
    assert!(
        ok && out.contains("already revoked") && out.contains("1 admin"),
        "{out}"
    );
    std::fs::write(
        dir.path().join("dev.pem"),
        served.factory("d-1").certificate_pem,
    )
    .unwrap();
    let (ok, _, err) = onboard_in(dir.path(), &["pki", "revoke-admin", "--cert", "dev.pem"]);
    assert!(!ok && err.contains("not an admin certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_a_retired_operational_ca_still_connect_and_renew_from_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = init_pki(dir.path());
    config_file(dir.path(), "");
    let served = Served::start(dir.path(), &[], &[]);
    let ca1_pem = served.server_ca_pem();

    // Enrolled under CA1.
    let factory = served.factory("fleet-1");
    let mut boot = Client::connect(served.mtls_options("fleet-1", &factory))
        .await
        .expect("bootstrap");
    let resp = boot
        .request_enroll("fleet-1", &json!({"request_id": "r-1"}))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    boot.disconnect().await;
    let key = resp["credential"]["private_key_pem"].as_str().unwrap();
    let op = issued(&resp, key);

    // Rotation: CA1 moves aside, a new CA2 is created.
    let pki = &config.pki.dir;
    std::fs::rename(
        pki.join("operational-ca.pem"),
        pki.join("operational-ca-1.pem"),
    )
    .unwrap();
    std::fs::rename(
        pki.join("operational-ca.key"),
        pki.join("operational-ca-1.key"),
    )
    .unwrap();
    Pki::init(&config.pki).expect("new operational CA");
    let ca2_pem = std::fs::read_to_string(pki.join("operational-ca.pem")).unwrap();
    assert_ne!(ca1_pem, ca2_pem);

    // Without CA1 among the previous CAs, its devices are refused...
    assert_eq!(served.reload().await, ReloadResult::Ok);
    let refused = Client::connect(served.mtls_options_trusting("fleet-1", &op, &ca1_pem)).await;
    assert!(
        matches!(refused, Err(ConnectFailure::Failed(_))),
        "{:?}",
        refused.map(|_| ())
    );
    // ...with it, they connect again.
    config_file(
        dir.path(),
        "previous_operational_cas = [\"operational-ca-1.pem\"]\n",
    );
    assert_eq!(served.reload().await, ReloadResult::Ok);
    let mut device = Client::connect(served.mtls_options_trusting("fleet-1", &op, &ca1_pem))
        .await
        .expect("a CA1 device connects after the rotation");
    device
        .publish(
            "devices/fleet-1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"t":1}"#,
        )
        .await;

    // A renewal is signed by CA2.
    let (csr, _key) = csr_for("fleet-1");
    device
        .subscribe("devices/fleet-1/cert/response", QoS::AtLeastOnce)
        .await;
    device
        .publish(
            "devices/fleet-1/cert/renew",
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&json!({"request_id": "renew-1", "csr": csr})).unwrap(),
        )
        .await;
    let renewed: Value = device.recv_json("devices/fleet-1/cert/response").await;
    assert_eq!(renewed["status"], "accepted", "{renewed}");
    let cert = pem_der(renewed["certificate_pem"].as_str().unwrap());
    assert!(
        signed_by(&cert, &ca2_pem),
        "the renewed certificate comes from CA2"
    );
    assert!(!signed_by(&cert, &ca1_pem));
    assert_eq!(renewed["ca_chain_pem"], ca2_pem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_device_role_and_request_id() {
    let dir = tempfile::tempdir().unwrap();
    init_pki(dir.path());
    config_file(dir.path(), "");
    let served = Served::start(dir.path(), &["--log-format", "json"], &[]);
    let factory = served.factory("log-1");
    let mut boot = Client::connect(served.mtls_options("log-1", &factory))
        .await
        .expect("bootstrap");
    let resp = boot
        .request_enroll("log-1", &json!({"request_id": "r-json"}))
        .await;
    assert_eq!(resp["status"], "accepted");
    // A refusal: the client id is not the certificate's CN.
    let _ = Client::connect(served.mtls_options("someone-else", &factory)).await;

    let events = || -> Vec<Value> {
        served
            .log()
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    };
    eventually("the enrollment and the refusal are logged", || async {
        let events = events();
        let has = |message: &str| events.iter().any(|e| e["message"] == message);
        has("enrollment answered") && has("connection refused")
    })
    .await;
    let events = events();
    let answered = events
        .iter()
        .find(|e| e["message"] == "enrollment answered")
        .unwrap();
    assert_eq!(answered["device_id"], "log-1", "{answered}");
    assert_eq!(answered["role"], "bootstrap");
    assert_eq!(answered["request_id"], "r-json");
    assert_eq!(answered["result"], "accepted");
    assert_eq!(answered["level"], "INFO");
    let refused = events
        .iter()
        .find(|e| e["message"] == "connection refused")
        .unwrap();
    assert_eq!(refused["reason"], "client_id_mismatch", "{refused}");

    // The same from the configuration: ONBOARD_LOG_FORMAT (or [log] format).
    drop(served);
    let served = Served::start(dir.path(), &[], &[("ONBOARD_LOG_FORMAT", "json")]);
    let first = served.log().first().cloned().unwrap_or_default();
    assert!(serde_json::from_str::<Value>(&first).is_ok(), "{first}");
}

#[test]
fn version_names_the_git_revision() {
    let (ok, out, err) = onboard_in(std::path::Path::new("."), &["--version"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("onboard {} (git ", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert!(
        out.contains(&format!("(git {revision})")),
        "{out} vs {revision}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_is_a_valid_store_with_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    init_pki(dir.path());
    config_file(dir.path(), "");
    let served = Served::start(dir.path(), &[], &[]);
    for id in ["bk-1", "bk-2"] {
        let factory = served.factory(id);
        let mut boot = Client::connect(served.mtls_options(id, &factory))
            .await
            .expect("bootstrap");
        let resp = boot.request_enroll(id, &json!({"request_id": "r"})).await;
        assert_eq!(resp["status"], "accepted");
    }
    let d = dir.path().to_path_buf();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        onboard_in(&d, &["store", "backup", "--out", "backup.db"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("backup.db"), "{out}");
    // The gateway still runs and enrolls.
    let factory = served.factory("bk-3");
    let mut boot = Client::connect(served.mtls_options("bk-3", &factory))
        .await
        .expect("bootstrap");
    assert_eq!(
        boot.request_enroll("bk-3", &json!({"request_id": "r"}))
            .await["status"],
        "accepted"
    );

    // The backup opens as a store with the devices enrolled before it.
    let backup_url = format!("sqlite://{}", dir.path().join("backup.db").display());
    let out = onboard_command()
        .args(["devices", "list", "--format", "json"])
        .current_dir(dir.path())
        .env("ONBOARD_CONFIG", dir.path().join("onboard.toml"))
        .env("ONBOARD_STORE_URL", &backup_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let devices: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<&str> = devices.iter().filter_map(|d| d["id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["bk-1", "bk-2"]);

    // Never over an existing file; SQL Server is pointed at its own backups.
    let (ok, _, err) = onboard_in(dir.path(), &["store", "backup", "--out", "backup.db"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let out = onboard_command()
        .args(["store", "backup", "--out", "x.db"])
        .current_dir(dir.path())
        .env("ONBOARD_CONFIG", dir.path().join("onboard.toml"))
        .env("ONBOARD_STORE_URL", "mssql://u:p@db.invalid:1433/onboard")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BACKUP DATABASE"));
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("certificate PEM")
        .as_ref()
        .to_vec()
}

/// Whether `cert` (DER) carries a signature of the CA in `ca_pem`.
fn signed_by(cert: &[u8], ca_pem: &str) -> bool {
    let ca_der = pem_der(ca_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).expect("CA");
    let (_, cert) = X509Certificate::from_der(cert).expect("certificate");
    cert.verify_signature(Some(ca.public_key())).is_ok()
}
