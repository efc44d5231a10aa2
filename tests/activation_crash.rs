//! No activation the device was told about lives only in memory: while the store is down, the
//! report that activates a device is not acknowledged (its mark is queued in memory, which a
//! crash loses). The gateway is then killed (SIGKILL), the store comes back, the gateway
//! restarts, and the device's next report activates it.

mod common;

use std::time::Duration;

use common::harness::*;
use common::served::{config_file, onboard_in, Served};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::json;

/// A loopback port free right now, so a restarted gateway listens where the device connects.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_report_made_while_the_store_is_down_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    config_file(dir, "");
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [
        ("ONBOARD_SERVER_MTLS_LISTEN", listen.as_str()),
        ("ONBOARD_STORE_QUERY_TIMEOUT_MS", "200"),
    ];
    let gateway = Served::start(dir, &[], &env);

    // Enrolled; not yet active.
    let id = "crash-act-1";
    let mut bootstrap = Client::connect(gateway.mtls_options(id, &gateway.factory(id)))
        .await
        .expect("bootstrap connects");
    let (csr, key) = csr_for(id);
    let answer = bootstrap
        .request_enroll(id, &json!({ "request_id": "r-1", "csr": csr }))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    bootstrap.disconnect().await;
    let cred = issued(&answer, &key);

    // The device connects with its new credential (persistent session), then the store goes
    // down and it reports.
    let mut opts = gateway.mtls_options(id, &cred);
    opts.set_clean_session(false);
    let (device, mut eventloop) = AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("device does not connect: {other:?}"),
        }
    }
    let unlock = lock_store(dir.join("onboard.db"));
    device
        .publish(
            format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .expect("publish queued");
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(event) = tokio::time::timeout_at(until, eventloop.poll()).await {
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                panic!("the report was acknowledged while its activation could not be stored")
            }
            Ok(_) => {}
            Err(e) => panic!("device connection lost: {e}"),
        }
    }

    // Crash, store back, restart on the same address.
    drop(gateway);
    drop(unlock);
    let gateway = Served::start(dir, &[], &env);

    // The device reconnects by itself. The restarted gateway has no session for it
    // (session present = 0), so the client drops its unacknowledged report; its next report
    // activates it, long before the activation deadline.
    let until = tokio::time::Instant::now() + WAIT;
    let acked = loop {
        match tokio::time::timeout_at(until, eventloop.poll()).await {
            Err(_) => break false,
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                device
                    .publish(
                        format!("devices/{id}/telemetry"),
                        QoS::AtLeastOnce,
                        false,
                        "21.6",
                    )
                    .await
                    .expect("publish queued");
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(
        acked,
        "the redelivered report is acknowledged after the restart"
    );
    let (ok, shown, err) = onboard_in(dir, &["devices", "show", id]);
    assert!(ok, "{err}");
    assert!(shown.contains("active"), "{shown}");
    drop(gateway);
}
