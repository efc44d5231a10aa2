//! The admin plane end to end: a real gateway, real TLS, real MQTT clients (admins, devices),
//! a real SQLite file.

mod common;

// The command-line glue runs against a real gateway too.
use onboard::cli::{admin as cli_admin, import as cli_import};
use onboard::import;

use std::time::Duration;

use common::harness::*;
use onboard::pki::CertAndKey;
use onboard::store::{DeviceFilter, DeviceState};
use rumqttc::{QoS, SubscribeReasonCode};
use serde_json::{json, Value};

const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Enroll `id` with a CSR, reconnect with the operational certificate, read the retained
/// configuration and report: the device is active. Returns its connected client and credential.
async fn active_device(t: &TestGateway, id: &str) -> (Client, CertAndKey) {
    let (csr, key) = csr_for(id);
    let resp = t
        .enroll(id, json!({ "request_id": "r1", "csr": csr }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    let cred = issued(&resp, &key);
    let device = activate_with_cert(t, id, &resp, &key).await;
    wait_state(t, id, DeviceState::Active).await;
    (device, cred)
}

/// Wait until the device's ack of configuration `version` is recorded as applied.
async fn wait_applied(t: &TestGateway, id: &str, version: i64) {
    eventually(&format!("v{version} applied"), || async {
        t.gw.store
            .config_version(id, version)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.applied_at.is_some())
    })
    .await;
}

/// An admin connection subscribed to every response.
async fn admin(t: &TestGateway, name: &str) -> Client {
    let mut a = Client::connect(t.mtls_options(name, &t.admin(name)))
        .await
        .expect("admin connects");
    assert_eq!(
        a.subscribe("admin/responses/#", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    a
}

async fn command(admin: &mut Client, topic: &str, body: Value) -> Value {
    admin_command(admin, topic, body).await
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["status"], "error", "{reply}");
    reply["error"]["code"].as_str().unwrap_or_default()
}

async fn admin_metric(t: &TestGateway, command: &str, result: &str) -> f64 {
    t.metric(&format!(
        "onboard_admin_commands_total{{command=\"{command}\",result=\"{result}\"}}"
    ))
    .await
}

/// Nothing retained on `topic` for a fresh subscriber.
async fn nothing_retained(t: &TestGateway, topic: &str) -> bool {
    let mut watcher = Client::connect(t.mtls_options("watcher", &t.admin("watcher")))
        .await
        .unwrap();
    watcher.subscribe(topic, QoS::AtLeastOnce).await;
    let none = watcher
        .recv_on(topic, Duration::from_millis(500))
        .await
        .is_none_or(|p| p.payload.is_empty());
    watcher.disconnect().await;
    none
}

#[tokio::test]
async fn config_command_validation_idempotency_audit_and_metrics() {
    let t = TestGateway::start().await;
    let id = "cfg-1";
    let (mut device, _) = active_device(&t, id).await;
    let mut alice = admin(&t, "alice").await;
    let topic = format!("admin/devices/{id}/config");

    let reply = command(
        &mut alice,
        &topic,
        json!({ "request_id": "c1", "settings": { "mode": "cool", "target_temperature_c": 19.0 } }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["version"], 2);
    assert_eq!(reply["result"]["published"], true);

    // Pushed retained to the device: settings replaced, the rest kept.
    let pushed = device.recv_json(&format!("devices/{id}/config")).await;
    assert_eq!(pushed["version"], 2);
    assert_eq!(pushed["settings"]["mode"], "cool");
    assert_eq!(pushed["qos"]["events"], 1);
    assert_eq!(pushed["topics"]["config"], format!("devices/{id}/config"));
    let stored = t.gw.store.latest_config(id).await.unwrap().unwrap();
    assert_eq!((stored.version, stored.created_by.as_str()), (2, "alice"));
    assert_eq!(stored.body, pushed);

    // A subscriber that comes later gets the latest version (retained).
    let mut late = Client::connect(t.mtls_options("late", &t.admin("late")))
        .await
        .unwrap();
    late.subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    assert_eq!(
        late.recv_json(&format!("devices/{id}/config")).await["version"],
        2
    );

    // The same request_id again: the same reply, nothing executed again.
    let again = command(
        &mut alice,
        &topic,
        json!({ "request_id": "c1", "settings": { "mode": "off" } }),
    )
    .await;
    assert_eq!(again, reply);
    assert_eq!(
        t.gw.store.latest_config(id).await.unwrap().unwrap().version,
        2
    );

    // Audited with the admin as actor.
    let event = t.wait_event(id, "config_published").await;
    let event = t
        .events(id)
        .await
        .into_iter()
        .find(|e| e.event == "config_published" && e.actor == "alice")
        .unwrap_or(event);
    assert_eq!(event.actor, "alice");
    assert_eq!(event.request_id.as_deref(), Some("c1"));

    // The device acks: applied_at recorded.
    device
        .publish(
            &format!("devices/{id}/config/ack"),
            QoS::AtLeastOnce,
            false,
            r#"{"version":2,"status":"applied"}"#,
        )
        .await;
    wait_applied(&t, id, 2).await;

    // Validation errors.
    let bad = command(
        &mut alice,
        &topic,
        json!({ "request_id": "c2", "settings": 5 }),
    )
    .await;
    assert_eq!(error_code(&bad), "malformed_request");
    let bad = command(&mut alice, &topic, json!({ "request_id": "c3" })).await;
    assert_eq!(error_code(&bad), "malformed_request");
    let bad = command(
        &mut alice,
        &topic,
        json!({ "request_id": "c4", "colour": "red" }),
    )
    .await;
    assert_eq!(error_code(&bad), "malformed_request");
    assert!(bad["error"]["message"].as_str().unwrap().contains("colour"));
    let bad = command(
        &mut alice,
        "admin/devices/ghost/config",
        json!({ "request_id": "c5", "settings": {} }),
    )
    .await;
    assert_eq!(error_code(&bad), "unknown_device");
    let bad = command(
        &mut alice,
        &format!("admin/devices/{id}/explode"),
        json!({ "request_id": "c6" }),
    )
    .await;
    assert_eq!(error_code(&bad), "unknown_command");
    assert_eq!(
        t.gw.store.latest_config(id).await.unwrap().unwrap().version,
        2
    );
    let failed = t.wait_event(id, "admin_command_failed").await;
    assert_eq!(failed.actor, "alice");

    // Unanswerable commands: not JSON, no request_id.
    alice
        .publish(&topic, QoS::AtLeastOnce, false, "{not json")
        .await;
    alice
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            r#"{"settings":{"mode":"x"}}"#,
        )
        .await;
    eventually("two rejected commands counted", || async {
        admin_metric(&t, "config", "rejected").await == 2.0
    })
    .await;
    let rejected = t.wait_event(id, "admin_command_rejected").await;
    assert_eq!(rejected.actor, "alice");

    assert_eq!(admin_metric(&t, "config", "ok").await, 1.0);
    assert_eq!(admin_metric(&t, "config", "duplicate").await, 1.0);
    assert_eq!(admin_metric(&t, "config", "error").await, 4.0);
    assert_eq!(admin_metric(&t, "unknown", "error").await, 1.0);

    // Live event stream.
    let mut watcher = admin(&t, "bob").await;
    watcher
        .subscribe(&format!("admin/events/{id}/#"), QoS::AtMostOnce)
        .await;
    let reply = command(
        &mut watcher,
        &topic,
        json!({ "request_id": "c7", "retain": { "state": false } }),
    )
    .await;
    assert_eq!(reply["result"]["version"], 3);
    let live = watcher
        .recv_json(&format!("admin/events/{id}/config_published"))
        .await;
    assert_eq!(live["actor"], "bob");
}

#[tokio::test]
async fn config_rollbacks_automatic_and_by_admin() {
    let t = TestGateway::start().await;
    let id = "rb-1";
    let (mut device, _) = active_device(&t, id).await;
    let ack = format!("devices/{id}/config/ack");
    let config_topic = format!("devices/{id}/config");
    device
        .publish(
            &ack,
            QoS::AtLeastOnce,
            false,
            r#"{"version":1,"status":"applied"}"#,
        )
        .await;
    wait_applied(&t, id, 1).await;
    let v1 = t.gw.store.config_version(id, 1).await.unwrap().unwrap();

    let mut ops = admin(&t, "ops").await;
    let topic = format!("admin/devices/{id}/config");
    let reply = command(
        &mut ops,
        &topic,
        json!({ "request_id": "a1", "settings": { "mode": "broken" } }),
    )
    .await;
    assert_eq!(reply["result"]["version"], 2);
    assert_eq!(device.recv_json(&config_topic).await["version"], 2);

    // The device cannot apply v2: automatic rollback to v1's body as v3.
    device
        .publish(
            &ack,
            QoS::AtLeastOnce,
            false,
            r#"{"version":2,"status":"failed","error":"mode broken"}"#,
        )
        .await;
    let v3 = device.recv_json(&config_topic).await;
    assert_eq!(v3["version"], 3);
    let mut expected = v1.body.clone();
    expected["version"] = json!(3);
    assert_eq!(v3, expected);
    let row = t.gw.store.config_version(id, 3).await.unwrap().unwrap();
    assert_eq!(row.created_by, "gateway");
    assert_eq!(
        t.gw.store
            .config_version(id, 2)
            .await
            .unwrap()
            .unwrap()
            .failed_error
            .as_deref(),
        Some("mode broken")
    );
    let event = t.wait_event(id, "config_rolled_back").await;
    assert_eq!(event.detail["trigger"], "auto");
    assert_eq!(
        t.metric(r#"onboard_rollbacks_total{target="config",trigger="auto"}"#)
            .await,
        1.0
    );
    t.wait_event(id, "config_failed").await;

    // Bad acks are audited and change nothing.
    device
        .publish(&ack, QoS::AtLeastOnce, false, "not json")
        .await;
    device
        .publish(
            &ack,
            QoS::AtLeastOnce,
            false,
            r#"{"version":99,"status":"applied"}"#,
        )
        .await;
    eventually("two invalid acks audited", || async {
        t.event_names(id)
            .await
            .iter()
            .filter(|e| *e == "config_ack_invalid")
            .count()
            == 2
    })
    .await;

    // Admin rollback to a named version: a new version with v2's body.
    let rollback = format!("admin/devices/{id}/rollback");
    let reply = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a2", "target": "config", "to_version": 2 }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["version"], 4);
    assert_eq!(reply["result"]["rolled_back_to"], 2);
    let v4 = device.recv_json(&config_topic).await;
    assert_eq!(v4["version"], 4);
    assert_eq!(v4["settings"]["mode"], "broken");
    // To the previous one (v3).
    let reply = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a3", "target": "config" }),
    )
    .await;
    assert_eq!(reply["result"]["rolled_back_to"], 3);
    assert_eq!(
        device.recv_json(&config_topic).await["settings"]["mode"],
        "heat"
    );
    assert_eq!(
        t.metric(r#"onboard_rollbacks_total{target="config",trigger="admin"}"#)
            .await,
        2.0
    );
    let bad = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a4", "target": "config", "to_version": 99 }),
    )
    .await;
    assert_eq!(error_code(&bad), "unknown_version");
    let bad = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a5", "target": "config", "to_version": 5 }),
    )
    .await;
    assert_eq!(error_code(&bad), "already_current");
    let bad = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a6", "target": "firmware" }),
    )
    .await;
    assert_eq!(error_code(&bad), "malformed_request");
    // Idempotent: a2 again does not create a version.
    let again = command(
        &mut ops,
        &rollback,
        json!({ "request_id": "a2", "target": "config", "to_version": 2 }),
    )
    .await;
    assert_eq!(again["result"]["version"], 4);
    assert_eq!(
        t.gw.store.latest_config(id).await.unwrap().unwrap().version,
        5
    );
}

#[tokio::test]
async fn firmware_jobs_per_device_and_for_a_fleet() {
    let t = TestGateway::start().await;
    let (mut d1, _) = active_device(&t, "fw-1").await;
    let (mut d2, _) = active_device(&t, "fw-2").await;
    let mut ops = admin(&t, "ops").await;
    let job = |rid: &str| {
        json!({ "request_id": rid, "version": "2.0.0", "url": "https://fw.example/t-2.0.0.bin",
                "sha256": HASH, "size": 1_048_576 })
    };

    // Validation.
    let single = "admin/devices/fw-1/firmware";
    let mut bad = job("v1");
    bad["url"] = json!("http://fw.example/x.bin");
    assert_eq!(
        error_code(&command(&mut ops, single, bad).await),
        "invalid_url"
    );
    let mut bad = job("v2");
    bad["sha256"] = json!("abc123");
    assert_eq!(
        error_code(&command(&mut ops, single, bad).await),
        "invalid_sha256"
    );
    let mut bad = job("v3");
    bad["size"] = json!(0);
    assert_eq!(
        error_code(&command(&mut ops, single, bad).await),
        "invalid_size"
    );
    assert_eq!(
        error_code(&command(&mut ops, "admin/devices/ghost/firmware", job("v4")).await),
        "unknown_device"
    );
    assert_eq!(t.gw.store.latest_firmware_job("fw-1").await.unwrap(), None);

    // Two devices and an unknown one.
    let mut fleet = job("f1");
    fleet["devices"] = json!(["fw-1", "fw-2", "ghost"]);
    let reply = command(&mut ops, "admin/firmware", fleet).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let results = &reply["result"]["results"];
    let job1 = results["fw-1"]["job_id"]
        .as_str()
        .expect("job for fw-1")
        .to_owned();
    let job2 = results["fw-2"]["job_id"]
        .as_str()
        .expect("job for fw-2")
        .to_owned();
    assert_eq!(results["ghost"]["error"]["code"], "unknown_device");
    assert_eq!(reply["result"]["created"], 2);

    // Pushed retained.
    let doc = d1.recv_json("devices/fw-1/firmware").await;
    assert_eq!(
        doc,
        json!({ "job_id": job1, "version": "2.0.0", "url": "https://fw.example/t-2.0.0.bin",
                "sha256": HASH, "size": 1_048_576 })
    );
    assert_eq!(
        d2.recv_json("devices/fw-2/firmware").await["job_id"],
        job2.as_str()
    );

    // fw-1 succeeds, fw-2 fails.
    let status = |job: &str, s: &str| json!({ "job_id": job, "status": s }).to_string();
    for s in ["downloading", "installing", "succeeded"] {
        d1.publish(
            "devices/fw-1/firmware/status",
            QoS::AtLeastOnce,
            false,
            status(&job1, s),
        )
        .await;
        eventually(&format!("fw-1 job {s}"), || async {
            t.gw.store
                .firmware_job(&job1, "fw-1")
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.status == s)
        })
        .await;
    }
    d2.publish(
        "devices/fw-2/firmware/status",
        QoS::AtLeastOnce,
        false,
        status(&job2, "downloading"),
    )
    .await;
    d2.publish(
        "devices/fw-2/firmware/status",
        QoS::AtLeastOnce,
        false,
        json!({ "job_id": job2, "status": "failed", "error": "checksum mismatch" }).to_string(),
    )
    .await;
    eventually("fw-2 job failed", || async {
        t.gw.store
            .firmware_job(&job2, "fw-2")
            .await
            .ok()
            .flatten()
            .is_some_and(|j| {
                j.status == "failed" && j.error.as_deref() == Some("checksum mismatch")
            })
    })
    .await;
    let fw1 = t.gw.store.device("fw-1").await.unwrap().unwrap();
    let fw2 = t.gw.store.device("fw-2").await.unwrap().unwrap();
    assert_eq!(fw1.firmware_version.as_deref(), Some("2.0.0"));
    assert_ne!(fw2.firmware_version.as_deref(), Some("2.0.0"));
    assert!(nothing_retained(&t, "devices/fw-1/firmware").await);

    // Backwards, unknown jobs and garbage are audited and ignored.
    d1.publish(
        "devices/fw-1/firmware/status",
        QoS::AtLeastOnce,
        false,
        status(&job1, "downloading"),
    )
    .await;
    d1.publish(
        "devices/fw-1/firmware/status",
        QoS::AtLeastOnce,
        false,
        status("nope", "installing"),
    )
    .await;
    d1.publish(
        "devices/fw-1/firmware/status",
        QoS::AtLeastOnce,
        false,
        "garbage",
    )
    .await;
    eventually("three rejected reports", || async {
        t.event_names("fw-1")
            .await
            .iter()
            .filter(|e| *e == "firmware_status_rejected")
            .count()
            == 3
    })
    .await;
    assert_eq!(
        t.gw.store
            .firmware_job(&job1, "fw-1")
            .await
            .unwrap()
            .unwrap()
            .status,
        "succeeded"
    );
    let created = t.wait_event("fw-1", "firmware_job_created").await;
    assert_eq!(created.actor, "ops");
    t.wait_event("fw-1", "firmware_succeeded").await;

    // By device type.
    let mut by_type = job("f2");
    by_type["device_type"] = json!("thermostat");
    let reply = command(&mut ops, "admin/firmware", by_type).await;
    assert_eq!(reply["result"]["created"], 2, "{reply}");
    let mut none = job("f3");
    none["device_type"] = json!("toaster");
    assert_eq!(
        error_code(&command(&mut ops, "admin/firmware", none).await),
        "no_devices"
    );
    assert_eq!(admin_metric(&t, "fleet_firmware", "ok").await, 2.0);
}

#[tokio::test]
async fn revoke_disconnects_survives_restart_and_reinstate_allows_enrollment() {
    let t = TestGateway::start().await;
    let id = "rv-1";
    let (mut device, cred) = active_device(&t, id).await;
    let mut ops = admin(&t, "sec-team").await;

    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/reinstate"),
        json!({ "request_id": "x0" }),
    )
    .await;
    assert_eq!(error_code(&reply), "not_revoked");

    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/revoke"),
        json!({ "request_id": "x1", "reason": "stolen" }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["state"], "revoked");
    assert!(
        device.closed_within(Duration::from_secs(5)).await,
        "device disconnected at once"
    );
    let d = t.gw.store.device(id).await.unwrap().unwrap();
    assert_eq!(d.state, DeviceState::Revoked);
    assert!(t
        .gw
        .store
        .credentials_of(id)
        .await
        .unwrap()
        .iter()
        .all(|c| c.is_revoked()));
    let event = t.wait_event(id, "device_revoked").await;
    assert_eq!(event.actor, "sec-team");
    assert_eq!(event.detail["reason"], "stolen");
    assert!(nothing_retained(&t, &format!("devices/{id}/config")).await);
    let again = command(
        &mut ops,
        &format!("admin/devices/{id}/revoke"),
        json!({ "request_id": "x2" }),
    )
    .await;
    assert_eq!(error_code(&again), "already_revoked");
    assert_eq!(admin_metric(&t, "revoke", "ok").await, 1.0);
    assert_eq!(admin_metric(&t, "revoke", "error").await, 1.0);
    ops.disconnect().await;

    // Refused after a restart, over the operational and the factory certificate.
    let t = t.restart().await;
    let refused = Client::connect(t.mtls_options(id, &cred)).await.err();
    assert!(
        matches!(refused, Some(ConnectFailure::Refused(_))),
        "{refused:?}"
    );
    let factory = t.factory(id);
    let refused = Client::connect(t.mtls_options(id, &factory)).await.err();
    assert!(
        matches!(refused, Some(ConnectFailure::Refused(_))),
        "{refused:?}"
    );
    // The operational certificate is refused as revoked, the factory one because the device is.
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="credential_revoked"}"#)
            .await,
        1.0
    );
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="device_revoked"}"#)
            .await,
        1.0
    );

    // Reinstated: pending, and enrollment works again.
    let mut ops = admin(&t, "sec-team").await;
    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/reinstate"),
        json!({ "request_id": "x3" }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    wait_state(&t, id, DeviceState::Pending).await;
    assert_eq!(
        t.wait_event(id, "device_reinstated").await.actor,
        "sec-team"
    );
    let (csr, _) = csr_for(id);
    let resp = t
        .enroll(id, json!({ "request_id": "r2", "csr": csr }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    assert_eq!(admin_metric(&t, "reinstate", "ok").await, 1.0);
}

#[tokio::test]
async fn enrollment_rollback_revokes_and_the_device_enrolls_again() {
    let t = TestGateway::start().await;
    let id = "er-1";
    let (mut device, cred) = active_device(&t, id).await;
    let mut ops = admin(&t, "ops").await;
    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/rollback"),
        json!({ "request_id": "e1", "target": "enrollment" }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["previous_state"], "active");
    assert!(device.closed_within(Duration::from_secs(5)).await);
    wait_state(&t, id, DeviceState::Pending).await;
    assert!(t
        .gw
        .store
        .credentials_of(id)
        .await
        .unwrap()
        .iter()
        .all(|c| c.is_revoked()));
    assert!(nothing_retained(&t, &format!("devices/{id}/config")).await);
    assert!(Client::connect(t.mtls_options(id, &cred)).await.is_err());
    assert_eq!(
        t.metric(r#"onboard_rollbacks_total{target="enrollment",trigger="admin"}"#)
            .await,
        1.0
    );
    assert_eq!(
        t.wait_event(id, "enrollment_rolled_back").await.actor,
        "ops"
    );

    // Re-enrollment with the factory certificate; the configuration history is kept.
    let (csr, key) = csr_for(id);
    let resp = t
        .enroll(id, json!({ "request_id": "r2", "csr": csr }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    assert_eq!(resp["config_version"], 2);
    let mut device = Client::connect(t.mtls_options(id, &issued(&resp, &key)))
        .await
        .unwrap();
    device
        .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    assert_eq!(
        device.recv_json(&format!("devices/{id}/config")).await["version"],
        2
    );
}

/// Renew over the device's connection; returns the response.
async fn renew(device: &mut Client, id: &str, request_id: &str, csr: &str) -> Value {
    device
        .publish(
            &format!("devices/{id}/cert/renew"),
            QoS::AtLeastOnce,
            false,
            json!({ "request_id": request_id, "csr": csr }).to_string(),
        )
        .await;
    device
        .recv_json(&format!("devices/{id}/cert/response"))
        .await
}

#[tokio::test]
async fn renewal_keeps_the_old_certificate_until_the_new_one_connects() {
    let t = TestGateway::start_with(|c| c.lifecycle.renewal_grace_secs = 3600).await;
    let id = "rn-1";
    let (mut device, old) = active_device(&t, id).await;
    let (csr, key) = csr_for(id);
    let resp = renew(&mut device, id, "n1", &csr).await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    assert!(resp["certificate_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert_eq!(resp["ca_chain_pem"], t.gw.pki.ca_chain_pem());
    assert!(resp["not_after"].is_string() && resp["grace_until"].is_string());
    // Idempotent.
    assert_eq!(renew(&mut device, id, "n1", &csr).await, resp);
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 2);
    t.wait_event(id, "certificate_renewed").await;
    // A bad CSR is rejected like at enrollment.
    let bad = renew(&mut device, id, "n2", "not a csr").await;
    assert_eq!(bad["status"], "rejected");
    assert_eq!(bad["error"]["code"], "csr_invalid");
    let (other_csr, _) = csr_for("someone-else");
    let bad = renew(&mut device, id, "n3", &other_csr).await;
    assert_eq!(bad["error"]["code"], "csr_subject_mismatch");
    device.disconnect().await;

    // The old certificate still works during the grace period.
    let again = Client::connect(t.mtls_options(id, &old))
        .await
        .expect("old cert still valid");
    again.disconnect().await;

    // The new one connects: the old one is superseded.
    let new = CertAndKey {
        certificate_pem: resp["certificate_pem"].as_str().unwrap().to_owned(),
        private_key_pem: key,
        serial: String::new(),
    };
    let mut device = Client::connect(t.mtls_options(id, &new))
        .await
        .expect("new cert connects");
    device
        .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    eventually("old certificate superseded", || async {
        t.gw.store
            .credentials_of(id)
            .await
            .unwrap()
            .iter()
            .any(|c| c.revoke_reason.as_deref() == Some("superseded"))
    })
    .await;
    let creds = t.gw.store.credentials_of(id).await.unwrap();
    assert_eq!(creds.iter().filter(|c| !c.is_revoked()).count(), 1);
    t.wait_event(id, "renewed_certificate_in_use").await;
    let refused = Client::connect(t.mtls_options(id, &old)).await.err();
    assert!(
        matches!(refused, Some(ConnectFailure::Refused(_))),
        "{refused:?}"
    );
    assert!(!device.closed_within(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn grace_period_ends_in_the_sweep_and_expiring_certificates_are_counted() {
    let t = TestGateway::start_with(|c| {
        c.lifecycle.renewal_grace_secs = 1;
        c.pki.device_cert_days = 10;
    })
    .await;
    let id = "rn-2";
    let (mut device, old) = active_device(&t, id).await;
    eventually("expiring certificate counted", || async {
        t.metric("onboard_certificates_expiring").await >= 1.0
    })
    .await;
    let (csr, _) = csr_for(id);
    let resp = renew(&mut device, id, "n1", &csr).await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    // The new certificate is never used: the sweep revokes the old one after 1 s and closes
    // the session that uses it.
    assert!(
        device.closed_within(Duration::from_secs(8)).await,
        "old session closed"
    );
    let creds = t.gw.store.credentials_of(id).await.unwrap();
    assert!(creds
        .iter()
        .any(|c| c.revoke_reason.as_deref() == Some("renewal_grace_expired")));
    t.wait_event(id, "renewal_grace_expired").await;
    assert!(Client::connect(t.mtls_options(id, &old)).await.is_err());
}

#[tokio::test]
async fn devices_and_bootstrap_clients_cannot_use_the_admin_plane() {
    let t = TestGateway::start().await;
    let id = "acl-1";
    let (_device, cred) = active_device(&t, id).await;
    let factory = t.factory("acl-2");
    let topics = [
        format!("admin/devices/{id}/config"),
        format!("admin/devices/{id}/rollback"),
        format!("admin/devices/{id}/firmware"),
        format!("admin/devices/{id}/revoke"),
        format!("admin/devices/{id}/reinstate"),
        "admin/firmware".to_owned(),
    ];
    for (client_id, who) in [(id, &cred), ("acl-2", &factory)] {
        for topic in &topics {
            let mut c = Client::connect(t.mtls_options(client_id, who))
                .await
                .unwrap();
            c.publish(
                topic,
                QoS::AtLeastOnce,
                false,
                r#"{"request_id":"evil","target":"enrollment"}"#,
            )
            .await;
            assert!(
                c.closed_within(Duration::from_secs(5)).await,
                "{client_id} on {topic}"
            );
        }
        let mut c = Client::connect(t.mtls_options(client_id, who))
            .await
            .unwrap();
        assert_eq!(
            c.subscribe("admin/#", QoS::AtLeastOnce).await,
            SubscribeReasonCode::Failure
        );
        c.disconnect().await;
    }
    // Nothing was executed.
    let d = t.gw.store.device(id).await.unwrap().unwrap();
    assert_eq!(d.state, DeviceState::Active);
    assert_eq!(t.gw.store.admin_reply("evil").await.unwrap(), None);
}

#[tokio::test]
async fn csv_import_validates_everything_first_and_is_idempotent() {
    let t = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "id,type,model,location,firmware\n\
         imp-1,thermostat,T-1000,bldg-1,1.0\n\
         bad id,thermostat,,,\n\
         imp-2,toaster,,,\n\
         imp-3,sensor,S-1,\"bldg-2, floor 1\",\n",
    )
    .unwrap();
    let err = cli_import::run_import(&bad, false, &t.config)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("2 invalid row"), "{err}");
    assert_eq!(
        t.gw.store.device("imp-1").await.unwrap(),
        None,
        "nothing imported"
    );

    cli_import::run_import(&bad, true, &t.config).await.unwrap();
    let d =
        t.gw.store
            .device("imp-3")
            .await
            .unwrap()
            .expect("valid rows imported");
    assert_eq!(d.state, DeviceState::Pending);
    assert_eq!(d.location.as_deref(), Some("bldg-2, floor 1"));
    assert!(t.gw.store.device("imp-1").await.unwrap().is_some());

    // Many rows, in chunks, with progress; then the same again: unchanged.
    let mut text = String::from("id,type,model,location,firmware\n");
    for i in 0..12_000 {
        text.push_str(&format!("bulk-{i:05},sensor,S-1,,1.0\n"));
    }
    let pattern = regex::Regex::new(&t.config.pki.device_id_pattern).unwrap();
    let rules = import::RowRules {
        device_id_pattern: &pattern,
        device_types: None,
    };
    let devices = import::parse_csv(&text, &rules).unwrap();
    let bar = indicatif::ProgressBar::hidden();
    bar.set_length(devices.len() as u64);
    let first = import::import(t.gw.store.as_ref(), &devices, Some(&bar))
        .await
        .unwrap();
    assert_eq!(first.inserted, 12_000);
    assert_eq!(bar.position(), 12_000);
    let second = import::import(t.gw.store.as_ref(), &devices, None)
        .await
        .unwrap();
    assert_eq!((second.inserted, second.unchanged), (0, 12_000));
    let pending =
        t.gw.store
            .list_devices(&DeviceFilter {
                state: Some(DeviceState::Pending),
                ..DeviceFilter::default()
            })
            .await
            .unwrap();
    assert_eq!(pending.len(), 12_002);
}

#[tokio::test]
async fn command_line_admin_sends_commands_and_fails_on_errors() {
    let t = TestGateway::start().await;
    let id = "cli-1";
    let (mut device, _) = active_device(&t, id).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = t.admin("carol");
    std::fs::write(dir.path().join("admin.pem"), &cert.certificate_pem).unwrap();
    std::fs::write(dir.path().join("admin.key"), &cert.private_key_pem).unwrap();
    std::fs::write(dir.path().join("ca.pem"), t.server_ca_pem()).unwrap();
    let conn = cli_admin::AdminConnection {
        host: "localhost".into(),
        port: t.gw.mtls_addr.port(),
        cert: dir.path().join("admin.pem"),
        key: dir.path().join("admin.key"),
        ca: Some(dir.path().join("ca.pem")),
    };
    let cmd = cli_admin::AdminCommand::Config {
        device: id.into(),
        set: vec!["settings.mode=cool".into(), "qos.telemetry=1".into()],
        file: None,
    };
    cli_admin::run(cmd, &t.config, &conn)
        .await
        .expect("config command succeeds");
    let pushed = device.recv_json(&format!("devices/{id}/config")).await;
    assert_eq!(pushed["version"], 2);
    assert_eq!(pushed["settings"]["mode"], "cool");
    assert_eq!(
        pushed["settings"]["target_temperature_c"], 21.5,
        "other settings kept"
    );
    assert_eq!(pushed["qos"]["telemetry"], 1);
    eventually("config change audited with the admin as actor", || async {
        t.events(id)
            .await
            .iter()
            .any(|e| e.event == "config_published" && e.actor == "carol")
    })
    .await;

    let err = cli_admin::run(
        cli_admin::AdminCommand::Revoke {
            device: "ghost".into(),
            reason: None,
        },
        &t.config,
        &conn,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("unknown_device"), "{err}");

    let reply = cli_admin::send(
        &cli_admin::AdminCommand::Rollback {
            device: id.into(),
            target: cli_admin::RollbackTarget::Config,
            to_version: None,
        },
        &t.config,
        &conn,
    )
    .await
    .unwrap();
    assert_eq!(reply["result"]["rolled_back_to"], 1);
}

#[tokio::test]
async fn renewals_and_their_grace_periods_survive_a_restart() {
    let t = TestGateway::start_with(|c| c.lifecycle.renewal_grace_secs = 4).await;
    let id = "rn-3";
    let (mut device, old) = active_device(&t, id).await;
    let (csr, _) = csr_for(id);
    let first = renew(&mut device, id, "n1", &csr).await;
    assert_eq!(first["status"], "accepted", "{first}");
    assert_eq!(
        t.metric(r#"onboard_certificates_issued_total{kind="renewal"}"#)
            .await,
        1.0
    );
    device.disconnect().await;

    let t = t.restart().await;
    // The old certificate is still valid; the same request_id gets the same certificate.
    let mut device = Client::connect(t.mtls_options(id, &old))
        .await
        .expect("old cert in grace");
    device
        .subscribe(&format!("devices/{id}/#"), QoS::AtLeastOnce)
        .await;
    let again = renew(&mut device, id, "n1", &csr).await;
    assert_eq!(again, first);
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 2);
    // The grace period was reloaded from the store: the sweep ends it.
    assert!(
        device.closed_within(Duration::from_secs(10)).await,
        "old session closed"
    );
    t.wait_event(id, "renewal_grace_expired").await;
}

#[tokio::test]
async fn failed_acks_do_not_roll_back_when_disabled() {
    let t = TestGateway::start_with(|c| c.lifecycle.rollback_on_failed_ack = false).await;
    let id = "nr-1";
    let (device, _) = active_device(&t, id).await;
    device
        .publish(
            &format!("devices/{id}/config/ack"),
            QoS::AtLeastOnce,
            false,
            r#"{"version":1,"status":"applied"}"#,
        )
        .await;
    let mut ops = admin(&t, "ops").await;
    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/config"),
        json!({ "request_id": "k1", "automation_rules": [] }),
    )
    .await;
    assert_eq!(reply["result"]["version"], 2);
    device
        .publish(
            &format!("devices/{id}/config/ack"),
            QoS::AtLeastOnce,
            false,
            r#"{"version":2,"status":"failed"}"#,
        )
        .await;
    t.wait_event(id, "config_failed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        t.gw.store.latest_config(id).await.unwrap().unwrap().version,
        2
    );
    assert_eq!(
        t.metric(r#"onboard_rollbacks_total{target="config",trigger="auto"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn renewals_count_against_the_hourly_share_of_credentials() {
    let t = TestGateway::start_with(|c| c.limits.credentials_per_device_per_hour = 2).await;
    let id = "rn-quota";
    // The enrollment was one credential; one renewal makes two.
    let (mut device, _) = active_device(&t, id).await;
    let (csr, _) = csr_for(id);
    let first = renew(&mut device, id, "n1", &csr).await;
    assert_eq!(first["status"], "accepted", "{first}");
    let limited = renew(&mut device, id, "n2", &csr).await;
    assert_eq!(limited["error"]["code"], "rate_limited", "{limited}");
    assert!(limited["error"]["retry_after_ms"]
        .as_u64()
        .is_some_and(|ms| ms > 0));
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 2);
    let event = t.wait_event(id, "renewal_rejected").await;
    assert_eq!(event.detail["code"], "rate_limited");
}
