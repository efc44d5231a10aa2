//! The store is down (SQLite: its write lock held by someone else; SQL Server: the network to
//! it cut, when `ONBOARD_TEST_MSSQL_URL` is set): enrollments are answered
//! `unavailable` with a retry hint and nothing half-written, active devices keep working,
//! activation marks are queued and written when the store comes back, `/readyz` says so.

mod common;

use std::time::Duration;

use common::harness::*;
use onboard::store::DeviceState;
use rumqttc::QoS;
use serde_json::json;

/// How the test takes the store down and brings it back.
enum Outage {
    /// SQLite: the file, locked while the sender lives.
    Sqlite(std::path::PathBuf, Option<std::sync::mpsc::Sender<()>>),
    /// SQL Server: reached through a relay the test cuts.
    Mssql(common::mssql::Relay),
}

impl Outage {
    fn begin(&mut self) {
        match self {
            Outage::Sqlite(path, lock) => *lock = Some(lock_store(path.clone())),
            Outage::Mssql(relay) => relay.set_cut(true),
        }
    }

    fn end(&mut self) {
        match self {
            Outage::Sqlite(_, lock) => drop(lock.take()),
            Outage::Mssql(relay) => relay.set_cut(false),
        }
    }
}

#[tokio::test]
async fn enrollment_and_activation_while_the_store_is_down() {
    let relay = match std::env::var(common::mssql::URL_VAR) {
        Ok(url) if on_mssql() => {
            Some(common::mssql::Relay::start(common::mssql::server_addr(&url)).await)
        }
        _ => None,
    };
    let t = TestGateway::start_with(|c| {
        c.store.query_timeout_ms = 200;
        if let Some(relay) = &relay {
            c.store.url = common::mssql::with_server(&c.store.url, relay.addr);
            c.store.connect_timeout_ms = 500;
            // A fresh schema's migrations (DDL) take longer than a query on a server.
            c.store.query_timeout_ms = 2_000;
        }
    })
    .await;
    let mut outage = match relay {
        Some(relay) => Outage::Mssql(relay),
        None => Outage::Sqlite(t.dir.path().join("onboard.db"), None),
    };

    // One device is active before the outage; one is enrolled and not yet active.
    let (csr, key) = csr_for("up-1");
    let up = t
        .enroll("up-1", json!({"request_id": "a", "csr": csr}))
        .await;
    let mut active = Client::connect(t.mtls_options("up-1", &issued(&up, &key)))
        .await
        .unwrap();
    active.subscribe("devices/up-1/#", QoS::AtLeastOnce).await;
    active
        .publish("devices/up-1/telemetry", QoS::AtLeastOnce, false, "1")
        .await;
    eventually("up-1 active", || async {
        t.gw.store
            .device("up-1")
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d.state == DeviceState::Active)
    })
    .await;
    let (csr2, key2) = csr_for("late-1");
    let late = t
        .enroll("late-1", json!({"request_id": "a", "csr": csr2}))
        .await;
    let late_client = Client::connect(t.mtls_options("late-1", &issued(&late, &key2)))
        .await
        .unwrap();

    outage.begin();
    let (status, body) = t.http_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");

    // Enrollment: a clear retryable answer, nothing written.
    match &outage {
        Outage::Sqlite(..) => {
            // The locked file still answers reads: the device connects and its request is
            // refused when the commit cannot be written.
            let resp = t.enroll("down-1", json!({"request_id": "r"})).await;
            assert_eq!(resp["status"], "rejected", "{resp}");
            assert_eq!(resp["error"]["code"], "unavailable");
            assert!(resp["error"]["retry_after_ms"]
                .as_u64()
                .is_some_and(|ms| ms > 0));
            assert!(
                t.metric(
                    r#"onboard_enrollment_requests_total{reason="unavailable",result="rejected"}"#
                )
                .await
                    >= 1.0
            );
            assert!(
                t.metric(r#"onboard_store_errors_total{op="commit_enrollment"}"#)
                    .await
                    >= 1.0
            );
        }
        Outage::Mssql(_) => {
            // The server answers nothing, not even the bootstrap connection's lookup: the
            // device is told at CONNECT (3, server unavailable) and retries later.
            let refused = Client::connect(t.mtls_options("down-1", &t.factory("down-1"))).await;
            assert_eq!(
                refused.err(),
                Some(ConnectFailure::Refused(
                    rumqttc::ConnectReturnCode::ServiceUnavailable
                ))
            );
            assert!(
                t.metric(r#"onboard_auth_failures_total{reason="store_unavailable"}"#)
                    .await
                    >= 1.0
            );
        }
    }

    // The broker keeps serving the active device.
    active
        .publish("devices/up-1/state", QoS::AtLeastOnce, false, "still here")
        .await;
    assert!(active.recv_on("devices/up-1/state", WAIT).await.is_some());

    // The enrolled device reports: its activation is queued, not lost, and the report is not
    // acknowledged while the mark lives only in memory (the device sends it again when it
    // reconnects, so a crash now loses nothing it was told).
    let mut late_client = late_client;
    late_client
        .publish("devices/late-1/telemetry", QoS::AtLeastOnce, false, "1")
        .await;
    eventually("activation queued", || async {
        t.gw.lifecycle.queued_activations() == 1
    })
    .await;
    assert_eq!(
        late_client.next_puback(Duration::from_millis(500)).await,
        None,
        "a report whose activation is only queued is not acknowledged"
    );

    outage.end();
    eventually("late-1 active once the store is back", || async {
        t.gw.store
            .device("late-1")
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d.state == DeviceState::Active)
    })
    .await;
    assert_eq!(t.http_get("/readyz").await.0, 200);
    assert!(t.gw.store.device("down-1").await.unwrap().is_none());
    // And the retry now succeeds.
    let resp = t.enroll("down-1", json!({"request_id": "r"})).await;
    assert_eq!(resp["status"], "accepted", "{resp}");
}
