//! Enrollment end to end: a real gateway, real TLS, real MQTT clients, a real SQLite file.

mod common;

use std::time::Duration;

use common::harness::*;
use onboard::config::EnrollmentMode;
use onboard::store::{CredentialKind, DeviceState};
use rumqttc::QoS;
use serde_json::{json, Value};

#[tokio::test]
async fn csr_enrollment_end_to_end() {
    let t = TestGateway::start().await;
    let id = "therm-0001";
    let (csr, key) = csr_for(id);
    let resp = t
        .enroll(
            id,
            json!({ "request_id": "r-1", "csr": csr, "device_type": "thermostat",
            "firmware_version": "1.4.2", "model": "T-1000", "location": "bldg-7/floor-2" }),
        )
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    assert_eq!(resp["request_id"], "r-1");
    assert_eq!(resp["device_id"], id);
    assert_eq!(resp["credential"]["type"], "certificate");
    assert!(resp["credential"]["certificate_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert_eq!(resp["credential"]["ca_chain_pem"], t.gw.pki.ca_chain_pem());
    assert!(
        resp["credential"].get("private_key_pem").is_none(),
        "CSR flow returns no key"
    );
    assert!(resp["credential"]["not_after"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(resp["config_topic"], format!("devices/{id}/config"));
    assert_eq!(resp["config_version"], 1);
    let deadline = resp["activation_deadline"].as_str().unwrap();
    assert!(
        deadline.ends_with('Z') && !deadline.contains('.'),
        "whole seconds, UTC: {deadline}"
    );

    // Store: device enrolling with metadata, one credential, config v1.
    let device = t.gw.store.device(id).await.unwrap().expect("device row");
    assert_eq!(device.state, DeviceState::Enrolling);
    assert_eq!(device.model.as_deref(), Some("T-1000"));
    assert_eq!(device.location.as_deref(), Some("bldg-7/floor-2"));
    assert_eq!(device.firmware_version.as_deref(), Some("1.4.2"));
    assert_eq!(device.credential_kind, Some(CredentialKind::Certificate));
    let creds = t.gw.store.credentials_of(id).await.unwrap();
    assert_eq!(creds.len(), 1);
    assert_eq!(
        device.current_serial.as_deref(),
        Some(creds[0].serial.as_str())
    );
    let config = t.gw.store.latest_config(id).await.unwrap().expect("config");
    assert_eq!(config.version, 1);

    // A fresh subscriber (admin) receives the retained configuration.
    let mut admin = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .unwrap();
    admin
        .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    let retained = admin.recv_json(&format!("devices/{id}/config")).await;
    assert_eq!(retained, config.body);
    assert_eq!(retained["version"], 1);
    assert_eq!(
        retained["topics"]["telemetry"],
        format!("devices/{id}/telemetry")
    );
    assert_eq!(retained["settings"]["mode"], "heat");

    // Reconnect with the operational credential and report: active.
    let _device = activate_with_cert(&t, id, &resp, &key).await;
    wait_state(&t, id, DeviceState::Active).await;
    let device = t.gw.store.device(id).await.unwrap().unwrap();
    assert!(device.activated_at.is_some());
    let names = t.event_names(id).await;
    for expected in [
        "credential_issued",
        "config_published",
        "enrollment_accepted",
        "activated",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    let issued_event = t
        .events(id)
        .await
        .into_iter()
        .find(|e| e.event == "credential_issued")
        .unwrap();
    assert_eq!(issued_event.request_id.as_deref(), Some("r-1"));
    assert!(
        issued_event.detail["factory_serial"].is_string(),
        "{}",
        issued_event.detail
    );
    assert_eq!(
        t.metric(r#"onboard_enrollment_requests_total{reason="none",result="accepted"}"#)
            .await,
        1.0
    );
    assert_eq!(
        t.metric(r#"onboard_certificates_issued_total{kind="csr"}"#)
            .await,
        1.0
    );
    assert_eq!(t.metric("onboard_activations_total").await, 1.0);
    assert_eq!(
        t.metric("onboard_enrollment_duration_seconds_count").await,
        1.0
    );
    assert_eq!(
        t.metric("onboard_activation_duration_seconds_count").await,
        1.0
    );
    assert_eq!(t.metric(r#"onboard_devices{state="active"}"#).await, 1.0);
}

#[tokio::test]
async fn server_generated_key_enrollment() {
    let t = TestGateway::start().await;
    let id = "sensor-0001";
    let resp = t
        .enroll(
            id,
            json!({ "request_id": "gen-1", "device_type": "sensor" }),
        )
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    let key = resp["credential"]["private_key_pem"]
        .as_str()
        .expect("generated key returned");
    assert!(key.contains("PRIVATE KEY"));
    // The key is never stored nor logged in the audit trail.
    let stored =
        t.gw.store
            .find_enrollment(id, "gen-1")
            .await
            .unwrap()
            .unwrap();
    assert!(!stored.response.to_string().contains("PRIVATE KEY"));
    for e in t.events(id).await {
        assert!(!e.detail.to_string().contains("PRIVATE KEY"), "{e:?}");
    }
    let retained = {
        let mut admin = Client::connect(t.mtls_options("ops", &t.admin("ops")))
            .await
            .unwrap();
        admin
            .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
            .await;
        admin.recv_json(&format!("devices/{id}/config")).await
    };
    assert_eq!(retained["settings"]["units"], "metric", "sensor template");
    let _device = activate_with_cert(&t, id, &resp, key).await;
    wait_state(&t, id, DeviceState::Active).await;
    assert_eq!(
        t.metric(r#"onboard_certificates_issued_total{kind="generated"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn password_enrollment_and_login() {
    let t = TestGateway::start().await;
    let id = "pw-0001";
    let resp = t
        .enroll(id, json!({ "request_id": "p-1", "credential": "password" }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    assert_eq!(resp["credential"]["type"], "password");
    assert_eq!(resp["credential"]["username"], id);
    let password = resp["credential"]["password"].as_str().unwrap().to_owned();
    assert!(password.len() >= 43, "256 bits of randomness");
    let creds = t.gw.store.credentials_of(id).await.unwrap();
    assert_eq!(creds.len(), 1);
    let hash = creds[0].password_hash.as_deref().unwrap();
    assert!(!hash.contains(&password), "only a hash is stored");

    let wrong = Client::connect(t.password_options(id, id, "not-the-password")).await;
    assert!(
        matches!(wrong, Err(ConnectFailure::Refused(_))),
        "{:?}",
        wrong.err()
    );
    let mut device = Client::connect(t.password_options(id, id, &password))
        .await
        .expect("password login");
    device
        .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    assert_eq!(
        device.recv_json(&format!("devices/{id}/config")).await["version"],
        1
    );
    device
        .publish(
            &format!("devices/{id}/events/boot"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await;
    wait_state(&t, id, DeviceState::Active).await;
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="bad_password"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn retry_with_the_same_request_id_issues_one_credential() {
    let t = TestGateway::start().await;
    let id = "retry-01";
    let factory = t.factory(id);
    let mut c = Client::connect(t.mtls_options(id, &factory)).await.unwrap();
    let req = json!({ "request_id": "same", "device_type": "thermostat" });
    let first = c.request_enroll(id, &req).await;
    c.publish(
        &format!("enroll/{id}/request"),
        QoS::AtLeastOnce,
        false,
        serde_json::to_vec(&req).unwrap(),
    )
    .await;
    let second = c.recv_json(&format!("enroll/{id}/response")).await;
    assert_eq!(first["status"], "accepted");
    assert_eq!(first, second, "the same answer, generated key included");
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 1);
    assert_eq!(t.gw.store.config_history(id).await.unwrap().len(), 1);
    assert_eq!(
        t.metric(r#"onboard_enrollment_requests_total{reason="none",result="duplicate"}"#)
            .await,
        1.0
    );

    // After a restart the stored answer (without the secret) is replayed, still one credential.
    c.disconnect().await;
    let t = t.restart().await;
    let again = t.enroll(id, req.clone()).await;
    assert_eq!(
        again["credential"]["certificate_pem"],
        first["credential"]["certificate_pem"]
    );
    assert!(again["credential"].get("private_key_pem").is_none());
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 1);
}

async fn rejected(t: &TestGateway, id: &str, payload: Vec<u8>) -> Value {
    let factory = t.factory(id);
    let mut c = Client::connect(t.mtls_options(id, &factory))
        .await
        .expect("bootstrap connect");
    c.subscribe(&format!("enroll/{id}/response"), QoS::AtLeastOnce)
        .await;
    c.publish(
        &format!("enroll/{id}/request"),
        QoS::AtLeastOnce,
        false,
        payload,
    )
    .await;
    let resp = c.recv_json(&format!("enroll/{id}/response")).await;
    assert_eq!(resp["status"], "rejected", "{resp}");
    // The device stays connected and may retry.
    assert!(
        !c.closed_within(Duration::from_millis(100)).await,
        "still connected after a rejection"
    );
    c.disconnect().await;
    resp
}

async fn assert_nothing_stored(t: &TestGateway, id: &str) {
    assert!(
        t.gw.store.device(id).await.unwrap().is_none(),
        "no device row for {id}"
    );
    assert!(
        t.gw.store.credentials_of(id).await.unwrap().is_empty(),
        "no credential for {id}"
    );
    assert!(
        t.gw.store.latest_config(id).await.unwrap().is_none(),
        "no config for {id}"
    );
}

#[tokio::test]
async fn every_rejection_has_its_code_and_stores_nothing() {
    let t = TestGateway::start().await;
    let (other_csr, _) = csr_for("someone-else");
    let (good_csr, _) = csr_for("rej-csrsig");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("rej-json", b"{ not json".to_vec(), "malformed_request"),
        ("rej-noid", br#"{"csr": "x"}"#.to_vec(), "malformed_request"),
        ("rej-big", serde_json::to_vec(&json!({"request_id": "r", "model": "x".repeat(17 * 1024)})).unwrap(), "malformed_request"),
        ("rej-kind", br#"{"request_id":"r","credential":"token"}"#.to_vec(), "malformed_request"),
        ("rej-csrsig", serde_json::to_vec(&json!({"request_id": "r", "csr": tampered_csr(&good_csr)})).unwrap(), "csr_invalid"),
        ("rej-csrgarbage", br#"{"request_id":"r","csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#.to_vec(), "csr_invalid"),
        ("rej-csrcn", serde_json::to_vec(&json!({"request_id": "r", "csr": other_csr})).unwrap(), "csr_subject_mismatch"),
        ("rej-weak", serde_json::to_vec(&json!({"request_id": "r", "csr": weak_rsa_csr("rej-weak")})).unwrap(), "weak_key"),
        ("rej-type", br#"{"request_id":"r","device_type":"toaster"}"#.to_vec(), "unknown_device_type"),
    ];
    for (id, payload, code) in cases {
        let resp = rejected(&t, id, payload).await;
        assert_eq!(resp["error"]["code"], code, "{id}: {resp}");
        assert!(resp["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_nothing_stored(&t, id).await;
        let event = t.wait_event(id, "enrollment_rejected").await;
        assert_eq!(event.detail["code"], code);
        let sample =
            format!(r#"onboard_enrollment_requests_total{{reason="{code}",result="rejected"}}"#);
        assert!(t.metric(&sample).await >= 1.0, "{sample}");
    }
    let resp = rejected(&t, "rej-big2", vec![b' '; 16 * 1024 + 1]).await;
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("16385 bytes"),
        "{resp}"
    );
}

#[tokio::test]
async fn allowlist_mode_refuses_unregistered_devices() {
    let t = TestGateway::start_with(|c| c.enrollment.mode = EnrollmentMode::Allowlist).await;
    let refused = Client::connect(t.mtls_options("stranger", &t.factory("stranger"))).await;
    assert_eq!(
        refused.err(),
        Some(ConnectFailure::Refused(
            rumqttc::ConnectReturnCode::NotAuthorized
        ))
    );
    t.wait_event("stranger", "auth_refused").await;
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="not_allowlisted"}"#)
            .await,
        1.0
    );

    // Pre-registered devices enroll.
    let outcome =
        t.gw.store
            .import_devices(&[onboard::store::NewDevice {
                id: "known-1".into(),
                device_type: "sensor".into(),
                model: Some("S-1".into()),
                location: None,
                firmware_version: None,
            }])
            .await
            .unwrap();
    assert_eq!(outcome.inserted, 1);
    let resp = t.enroll("known-1", json!({"request_id": "a"})).await;
    assert_eq!(resp["status"], "accepted", "{resp}");
}

#[tokio::test]
async fn activation_timeout_rolls_the_enrollment_back() {
    let t = TestGateway::start_with(|c| c.enrollment.activation_timeout_secs = 1).await;
    let id = "late-01";
    let (csr, key) = csr_for(id);
    let resp = t.enroll(id, json!({"request_id": "r", "csr": csr})).await;
    assert_eq!(resp["status"], "accepted");
    wait_state(&t, id, DeviceState::Failed).await;
    let creds = t.gw.store.credentials_of(id).await.unwrap();
    assert!(creds[0].revoked_at.is_some(), "credential revoked");
    t.wait_event(id, "activation_timeout").await;
    assert_eq!(t.metric("onboard_activation_timeouts_total").await, 1.0);
    assert_eq!(
        t.metric(r#"onboard_rollbacks_total{target="enrollment",trigger="timeout"}"#)
            .await,
        1.0
    );

    // The revoked operational certificate is refused at connect.
    let refused = Client::connect(t.mtls_options(id, &issued(&resp, &key))).await;
    assert!(
        matches!(refused, Err(ConnectFailure::Refused(_))),
        "{:?}",
        refused.err()
    );
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="credential_revoked"}"#)
            .await,
        1.0
    );

    // Retained config cleared: a subscriber gets nothing.
    let mut admin = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .unwrap();
    admin
        .subscribe(&format!("devices/{id}/config"), QoS::AtLeastOnce)
        .await;
    let got = admin
        .recv_on(&format!("devices/{id}/config"), Duration::from_millis(500))
        .await;
    assert!(
        got.is_none_or(|p| p.payload.is_empty()),
        "retained config cleared"
    );

    // The device may enroll again with its factory certificate.
    let again = t.enroll(id, json!({"request_id": "r2"})).await;
    assert_eq!(again["status"], "accepted", "{again}");
    assert_eq!(again["config_version"], 2, "config history is kept");
}

#[tokio::test]
async fn deadlines_and_retained_configs_survive_a_restart() {
    let t = TestGateway::start_with(|c| c.enrollment.activation_timeout_secs = 3).await;
    let (csr, key) = csr_for("keep-1");
    let active = t
        .enroll("keep-1", json!({"request_id": "r", "csr": csr}))
        .await;
    let _d = activate_with_cert(&t, "keep-1", &active, &key).await;
    wait_state(&t, "keep-1", DeviceState::Active).await;
    let pending = t.enroll("keep-2", json!({"request_id": "r"})).await;
    assert_eq!(pending["status"], "accepted");
    drop(_d);

    let t = t.restart().await;
    let mut admin = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .unwrap();
    admin.subscribe("devices/+/config", QoS::AtLeastOnce).await;
    assert_eq!(
        admin.recv_json("devices/keep-1/config").await["device_id"],
        "keep-1"
    );
    assert_eq!(
        admin.recv_json("devices/keep-2/config").await["device_id"],
        "keep-2"
    );
    // keep-2 never activates: the restored deadline rolls it back.
    wait_state(&t, "keep-2", DeviceState::Failed).await;
    assert_eq!(
        t.gw.store.device("keep-1").await.unwrap().unwrap().state,
        DeviceState::Active
    );
}

#[tokio::test]
async fn reenrollment_replaces_the_credential_and_keeps_history() {
    let t = TestGateway::start().await;
    let id = "reset-01";
    let (csr, key) = csr_for(id);
    let first = t.enroll(id, json!({"request_id": "a", "csr": csr})).await;
    let device = activate_with_cert(&t, id, &first, &key).await;
    wait_state(&t, id, DeviceState::Active).await;
    device.disconnect().await;

    // Factory reset: the device comes back with its factory certificate.
    let (csr2, key2) = csr_for(id);
    let second = t.enroll(id, json!({"request_id": "b", "csr": csr2})).await;
    assert_eq!(second["status"], "accepted", "{second}");
    assert_eq!(second["config_version"], 2);
    t.wait_event(id, "reenrolled").await;
    // The old credential stays valid until the new one activates...
    let old = Client::connect(t.mtls_options(id, &issued(&first, &key)))
        .await
        .expect("old still valid");
    old.disconnect().await;
    let _new = activate_with_cert(&t, id, &second, &key2).await;
    wait_state(&t, id, DeviceState::Active).await;
    // ...then it is revoked.
    eventually("old credential revoked", || async {
        t.gw.store
            .credentials_of(id)
            .await
            .unwrap()
            .iter()
            .filter(|c| c.revoked_at.is_some())
            .count()
            == 1
    })
    .await;
    let refused = Client::connect(t.mtls_options(id, &issued(&first, &key))).await;
    assert!(matches!(refused, Err(ConnectFailure::Refused(_))));
}

#[tokio::test]
async fn reenrollment_can_be_denied() {
    let t =
        TestGateway::start_with(|c| c.enrollment.reenroll = onboard::config::ReenrollPolicy::Deny)
            .await;
    let first = t.enroll("deny-1", json!({"request_id": "a"})).await;
    assert_eq!(first["status"], "accepted");
    let again = t.enroll("deny-1", json!({"request_id": "b"})).await;
    assert_eq!(again["error"]["code"], "already_enrolled", "{again}");
    assert_eq!(t.gw.store.credentials_of("deny-1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_timed_out_enrollment_may_enroll_again_when_reenrollment_is_denied() {
    let t = TestGateway::start_with(|c| {
        c.enrollment.reenroll = onboard::config::ReenrollPolicy::Deny;
        c.enrollment.activation_timeout_secs = 1;
    })
    .await;
    let first = t.enroll("lapse-1", json!({"request_id": "a"})).await;
    assert_eq!(first["status"], "accepted", "{first}");
    // The device never reports: the enrollment is rolled back...
    wait_state(&t, "lapse-1", DeviceState::Failed).await;
    // ...and the contract lets a failed device enroll again.
    let again = t.enroll("lapse-1", json!({"request_id": "b"})).await;
    assert_eq!(again["status"], "accepted", "{again}");
    assert_ne!(
        again["credential"]["certificate_pem"], first["credential"]["certificate_pem"],
        "a new credential"
    );
    // (Not waiting for `enrolling`: with a 1 s window the new enrollment may lapse too.)
    assert_eq!(t.gw.store.credentials_of("lapse-1").await.unwrap().len(), 2);
}

#[tokio::test]
async fn several_factory_cas_and_device_ids_in_a_san() {
    // A second device maker's CA, added to [pki] factory_cas.
    let mut t = TestGateway::start().await;
    let maker_b = onboard::pki::Issuer::generate_ca("maker B factory CA").unwrap();
    maker_b.write(&t.config.pki.dir, "maker-b-ca").unwrap();
    t.config.pki.factory_cas.push("maker-b-ca.pem".into());
    let t = t.restart().await;
    let cert = maker_b
        .issue_client("b-0001", &onboard::pki::CertOptions::valid_for_days(30))
        .unwrap();
    let mut c = Client::connect(t.mtls_options("b-0001", &cert))
        .await
        .expect("maker B device connects");
    let resp = c
        .request_enroll("b-0001", &json!({"request_id": "r"}))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    c.disconnect().await;
    // The first maker's devices still enroll.
    assert_eq!(
        t.enroll("a-0001", json!({"request_id": "r"})).await["status"],
        "accepted"
    );

    // The device id may be a SAN of the factory certificate rather than its CN.
    let options = onboard::pki::CertOptions {
        dns_names: vec!["san-0001".into()],
        ..onboard::pki::CertOptions::valid_for_days(30)
    };
    let san_cert = t.factory_with("serial-number-123", &options);
    let mut c = Client::connect(t.mtls_options("san-0001", &san_cert))
        .await
        .expect("SAN id accepted");
    let resp = c
        .request_enroll("san-0001", &json!({"request_id": "r"}))
        .await;
    assert_eq!(resp["device_id"], "san-0001", "{resp}");
    c.disconnect().await;
    // Any other client id is refused.
    let refused = Client::connect(t.mtls_options("san-0002", &san_cert)).await;
    assert_eq!(
        refused.err(),
        Some(ConnectFailure::Refused(
            rumqttc::ConnectReturnCode::NotAuthorized
        ))
    );
}

#[tokio::test]
async fn over_the_rate_limit_requests_are_told_when_to_retry() {
    let t = TestGateway::start_with(|c| c.enrollment.max_requests_per_sec = 1).await;
    let id = "rate-01";
    let factory = t.factory(id);
    let mut c = Client::connect(t.mtls_options(id, &factory)).await.unwrap();
    // A second's worth of burst, then the limit: the requests go out back to back, so however
    // long the store takes to answer one, the others arrive within the same second.
    let response_topic = format!("enroll/{id}/response");
    c.subscribe(&response_topic, QoS::AtLeastOnce).await;
    for i in 0..4 {
        c.publish(
            &format!("enroll/{id}/request"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&json!({"request_id": format!("r{i}")})).unwrap(),
        )
        .await;
    }
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(c.recv_json(&response_topic).await);
    }
    let limited = codes
        .iter()
        .find(|r| r["error"]["code"] == "rate_limited")
        .unwrap_or_else(|| panic!("no rate_limited answer in {codes:?}"));
    assert!(
        limited["error"]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0),
        "{limited}"
    );
    assert!(
        t.metric(r#"onboard_enrollment_requests_total{reason="rate_limited",result="rejected"}"#)
            .await
            >= 1.0
    );
    // Only admitted requests issued anything; the limited ones issued nothing.
    let accepted = codes.iter().filter(|r| r["status"] == "accepted").count();
    assert!(accepted >= 1, "{codes:?}");
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), accepted);
}

#[tokio::test]
async fn one_factory_certificate_cannot_mint_unlimited_credentials() {
    let t = TestGateway::start_with(|c| c.limits.credentials_per_device_per_hour = 3).await;
    let id = "mint-1";
    let mut c = Client::connect(t.mtls_options(id, &t.factory(id)))
        .await
        .expect("factory connection");
    for n in 0..3 {
        let r = c
            .request_enroll(id, &json!({ "request_id": format!("r-{n}") }))
            .await;
        assert_eq!(r["status"], "accepted", "{r}");
    }
    // Fresh request ids beyond the hourly share: refused, with a time to come back.
    for n in 3..6 {
        let r = c
            .request_enroll(id, &json!({ "request_id": format!("r-{n}") }))
            .await;
        assert_eq!(r["error"]["code"], "rate_limited", "{r}");
        let after = r["error"]["retry_after_ms"]
            .as_u64()
            .expect("retry_after_ms");
        assert!(after > 0 && after <= 3_600_000, "{after}");
    }
    // A retry of an answered request is still answered.
    let again = c.request_enroll(id, &json!({ "request_id": "r-0" })).await;
    assert_eq!(again["status"], "accepted", "{again}");
    // Nothing was issued past the limit, every refusal is audited and counted...
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 3);
    eventually("refusals audited", || async {
        t.events(id)
            .await
            .iter()
            .filter(|e| e.event == "enrollment_rejected" && e.detail["code"] == "rate_limited")
            .count()
            == 3
    })
    .await;
    assert_eq!(
        t.metric(r#"onboard_enrollment_requests_total{reason="rate_limited",result="rejected"}"#)
            .await,
        3.0
    );
    // ...and the other devices are not affected.
    let other = t.enroll("mint-2", json!({ "request_id": "r" })).await;
    assert_eq!(other["status"], "accepted", "{other}");
}

#[tokio::test]
async fn a_credential_revoked_by_reenrollment_loses_its_live_session() {
    let t = TestGateway::start().await;
    let id = "sup-1";
    let (csr, key) = csr_for(id);
    let first = t.enroll(id, json!({"request_id": "a", "csr": csr})).await;
    // Connected with its first credential, but never reported: still enrolling.
    let mut first_session = Client::connect(t.mtls_options(id, &issued(&first, &key)))
        .await
        .expect("first credential connects");
    // The device is reset and enrolls again: the unused first credential is revoked at once,
    // and the session that used it is closed.
    let second = t.enroll(id, json!({"request_id": "b"})).await;
    assert_eq!(second["status"], "accepted", "{second}");
    assert!(
        first_session.closed_within(WAIT).await,
        "the session of the revoked credential was closed"
    );
    let refused = Client::connect(t.mtls_options(id, &issued(&first, &key))).await;
    assert!(refused.is_err(), "the revoked credential is refused");
}

#[tokio::test]
async fn a_replayed_request_id_never_returns_a_rolled_back_credential() {
    let t = TestGateway::start_with(|c| c.enrollment.activation_timeout_secs = 1).await;
    let id = "replay-1";
    let (csr, _) = csr_for(id);
    let first = t.enroll(id, json!({"request_id": "r", "csr": csr})).await;
    assert_eq!(first["status"], "accepted", "{first}");
    wait_state(&t, id, DeviceState::Failed).await;
    // The same request again, after the rollback revoked what it was answered with.
    let replay = t.enroll(id, json!({"request_id": "r", "csr": csr})).await;
    assert_ne!(replay["status"], "accepted", "{replay}");
    assert_eq!(replay["error"]["code"], "malformed_request", "{replay}");
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 1);
    // A new request id enrolls the device again.
    let fresh = t.enroll(id, json!({"request_id": "r2"})).await;
    assert_eq!(fresh["status"], "accepted", "{fresh}");
}

#[tokio::test]
async fn reenrollment_needs_the_factory_ca_of_the_first_enrollment() {
    // Two device makers, each with its own factory CA in [pki] factory_cas.
    let mut t = TestGateway::start().await;
    let maker_b = onboard::pki::Issuer::generate_ca("maker B factory CA").unwrap();
    maker_b.write(&t.config.pki.dir, "maker-b-ca").unwrap();
    t.config.pki.factory_cas.push("maker-b-ca.pem".into());
    let t = t.restart().await;
    let id = "bound-0001";
    let first = t.enroll(id, json!({"request_id": "a1"})).await;
    assert_eq!(first["status"], "accepted", "{first}");

    // Maker B's CA signs a certificate for maker A's device: it connects (the CA is
    // trusted) but may not take the device over.
    let stolen = maker_b
        .issue_client(id, &onboard::pki::CertOptions::valid_for_days(30))
        .unwrap();
    let mut c = Client::connect(t.mtls_options(id, &stolen))
        .await
        .expect("maker B certificate connects");
    let resp = c.request_enroll(id, &json!({"request_id": "b1"})).await;
    c.disconnect().await;
    assert_eq!(resp["status"], "rejected", "{resp}");
    assert_eq!(resp["error"]["code"], "issuer_mismatch", "{resp}");
    assert_eq!(
        t.metric(
            r#"onboard_enrollment_requests_total{reason="issuer_mismatch",result="rejected"}"#
        )
        .await,
        1.0
    );
    let audited = t.wait_event(id, "factory_issuer_mismatch").await;
    assert!(
        audited.detail["presented_issuer"]
            .as_str()
            .is_some_and(|i| i.contains("maker B")),
        "{}",
        audited.detail
    );
    assert!(audited.detail["bound_issuer"]
        .as_str()
        .is_some_and(|i| !i.contains("maker B")));
    assert_eq!(t.gw.store.credentials_of(id).await.unwrap().len(), 1);

    // The first maker's certificate still re-enrolls it (a factory reset).
    let again = t.enroll(id, json!({"request_id": "a2"})).await;
    assert_eq!(again["status"], "accepted", "{again}");

    // An admin rollback of the enrollment releases the binding: maker B may enroll it now.
    let mut ops = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .expect("admin connects");
    ops.subscribe("admin/responses/#", QoS::AtLeastOnce).await;
    let reply = admin_command(
        &mut ops,
        &format!("admin/devices/{id}/rollback"),
        json!({ "request_id": "rb-1", "target": "enrollment" }),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut c = Client::connect(t.mtls_options(id, &stolen))
        .await
        .expect("maker B certificate connects");
    let resp = c.request_enroll(id, &json!({"request_id": "b2"})).await;
    c.disconnect().await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    let device = t.gw.store.device(id).await.unwrap().unwrap();
    assert!(device
        .factory_issuer
        .as_deref()
        .is_some_and(|i| i.contains("maker B")));
    assert_eq!(
        device.factory_serial.as_deref(),
        Some(stolen.serial.as_str())
    );
    // And now maker A's certificate is the stranger.
    let back = t.enroll(id, json!({"request_id": "a3"})).await;
    assert_eq!(back["error"]["code"], "issuer_mismatch", "{back}");
}
