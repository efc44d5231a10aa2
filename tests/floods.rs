//! Unauthenticated floods as a scanner produces them, from one source address: sockets parked
//! before the TLS handshake, bare connect-and-close, TLS without a certificate; and how long
//! the audit trail keeps what they leave.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::harness::*;
use onboard::front::tally;
use onboard::pki::{CertOptions, Issuer};
use onboard::store::AuditEvent;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.0/8 is all loopback
/// on Linux, so a test has as many source addresses as it needs).
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source");
    socket.connect(addr).await.expect("connect")
}

/// Whether the server closes `stream` (end of stream or reset) within [`WAIT`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn counted(t: &TestGateway, reason: &str) -> f64 {
    t.metric(&format!(
        r#"onboard_auth_failures_total{{reason="{reason}"}}"#
    ))
    .await
}

#[tokio::test]
async fn a_source_past_its_handshake_limit_is_closed_at_once_and_others_are_not() {
    let t = TestGateway::start_with(|c| {
        c.limits.max_handshakes_per_source = 4;
        // Parked sockets would hold their slots this long: far longer than the test.
        c.server.handshake_timeout_ms = 600_000;
    })
    .await;
    let addr = t.gw.mtls_addr;
    // Four sockets that never start TLS hold the source's four slots...
    let mut parked = Vec::new();
    for _ in 0..4 {
        parked.push(connect_from([127, 0, 0, 1], addr).await);
    }
    // ...so the fifth and sixth are closed at once, long before any timeout.
    for n in 1..=2 {
        let mut extra = connect_from([127, 0, 0, 1], addr).await;
        assert!(
            closed_by_server(&mut extra).await,
            "socket {n} past the limit closed"
        );
    }
    eventually("two refusals counted as too_many_handshakes", || async {
        counted(&t, "too_many_handshakes").await == 2.0
    })
    .await;
    // Another source is not affected: a device there enrolls.
    let other = t.factory("other-src");
    let tcp = connect_from([127, 0, 0, 2], addr).await;
    let tls = client_tls(
        &t.server_ca_pem(),
        Some((&other.certificate_pem, &other.private_key_pem)),
    );
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("a TLS handshake from another source completes");
    // A parked socket that goes away gives its slot back.
    drop(parked.pop());
    eventually(
        "a client from the first source is admitted again",
        || async {
            Client::connect(t.mtls_options("back", &t.admin("back")))
                .await
                .is_ok()
        },
    )
    .await;
    // Nothing of this was audited row by row.
    assert!(t.events("-").await.is_empty());
}

/// The aggregated rows for `reason`.
fn tallies<'a>(events: &'a [AuditEvent], reason: &str) -> Vec<&'a AuditEvent> {
    events
        .iter()
        .filter(|e| e.event == tally::EVENT && e.detail["reason"] == reason)
        .collect()
}

#[tokio::test]
async fn a_flood_of_bare_connects_is_audited_as_one_row_per_reason_and_window() {
    let t = TestGateway::start_with(|c| {
        c.limits.anonymous_refusal_window_ms = 600_000;
    })
    .await;
    const BARE: usize = 150;
    for i in 0..BARE {
        let addr = if i % 3 == 0 {
            t.gw.password_addr
        } else {
            t.gw.mtls_addr
        };
        drop(connect_from([127, 0, 0, 1], addr).await);
    }
    // TLS without a client certificate, on the mTLS listener.
    for i in 0..10 {
        let r = Client::connect(t.mtls_options_anonymous(&format!("anon-{i}"))).await;
        assert!(r.is_err());
    }
    // A refusal that names someone (a certificate from a CA we do not know) stays individual.
    let rogue = Issuer::generate_ca("rogue CA").unwrap();
    let cert = rogue
        .issue_client("rogue-7", &CertOptions::valid_for_days(30))
        .unwrap();
    assert!(Client::connect(t.mtls_options("rogue-7", &cert))
        .await
        .is_err());
    eventually("every bare connect counted", || async {
        counted(&t, "tls_handshake").await == BARE as f64
            && counted(&t, "no_certificate").await == 10.0
    })
    .await;
    assert_eq!(
        t.wait_event("rogue-7", "auth_refused").await.detail["reason"],
        "unknown_ca"
    );
    // Within the window nothing anonymous is written yet: no row per connection.
    assert!(t.events(tally::NO_DEVICE).await.is_empty());

    // The window closes when the gateway stops: one row per reason, with the exact count.
    let TestGateway {
        gw,
        config: _,
        dir,
        scratch: _scratch,
    } = t;
    let store = gw.store.clone();
    gw.stop().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let events = loop {
        let events = store.events(tally::NO_DEVICE, 1000).await.expect("events");
        if tallies(&events, "tls_handshake").len() == 1
            && tallies(&events, "no_certificate").len() == 1
        {
            break events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tallies: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let bare = tallies(&events, "tls_handshake")[0];
    assert_eq!(bare.detail["count"], BARE as u64);
    assert_eq!(
        bare.detail["sample_sources"],
        serde_json::json!(["127.0.0.1"])
    );
    assert_eq!(tallies(&events, "no_certificate")[0].detail["count"], 10);
    assert!(
        events.iter().all(|e| e.event == tally::EVENT),
        "only tallies under the anonymous id: {events:?}"
    );
    drop(dir);
}

#[tokio::test]
async fn anonymous_refusals_are_announced_once_per_window() {
    let t = TestGateway::start_with(|c| c.limits.anonymous_refusal_window_ms = 200).await;
    let mut watcher = Client::connect(t.mtls_options("watch", &t.admin("watch")))
        .await
        .expect("admin connects");
    watcher
        .subscribe("admin/events/#", rumqttc::QoS::AtMostOnce)
        .await;
    for _ in 0..40 {
        drop(connect_from([127, 0, 0, 9], t.gw.password_addr).await);
    }
    let topic = format!("admin/events/{}/{}", tally::NO_DEVICE, tally::EVENT);
    let mut announced = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    while announced < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "announced {announced} of 40"
        );
        if let Some(p) = watcher.recv_on(&topic, WAIT).await {
            let event: AuditEvent = serde_json::from_slice(&p.payload).expect("an audit event");
            assert_eq!(
                event.detail["sample_sources"],
                serde_json::json!(["127.0.0.9"])
            );
            announced += event.detail["count"].as_u64().expect("a count");
        }
    }
    assert_eq!(announced, 40, "every refusal counted once");
}

#[tokio::test]
async fn audit_rows_past_retention_are_deleted_and_newer_ones_kept() {
    let t = TestGateway::start_with(|c| c.store.audit_retention_days = 30).await;
    let aged = |name: &str, days: i64| {
        let mut e = AuditEvent::new("ret-1", name, "gateway", serde_json::json!({}));
        e.at = time::OffsetDateTime::now_utc() - time::Duration::days(days);
        e
    };
    t.gw.store.append_event(aged("ancient", 400)).await.unwrap();
    t.gw.store.append_event(aged("old", 31)).await.unwrap();
    t.gw.store.append_event(aged("recent", 29)).await.unwrap();
    // Retention sweeps at start.
    let t = t.restart().await;
    eventually("rows past 30 days deleted", || async {
        t.event_names("ret-1").await == ["recent"]
    })
    .await;
}
