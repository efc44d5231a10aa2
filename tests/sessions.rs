//! Sessions as a device and an admin see them: the retained configuration on every subscribe,
//! QoS 1 redelivery, persistent sessions and their bounded offline queue, wills, keepalive 0,
//! isolation between devices and between a device and its factory identity, the admin's view of
//! the fleet, retained publishes by devices, clients that stop reading, and the connection limit.
//!
//! Real TLS and real MQTT clients throughout: rumqttc through the harness, and a hand-driven
//! MQTT 3.1.1 client ([`Raw`]) where the test must decide what is acknowledged, whether the
//! connection ends with a DISCONNECT, or whether anything is read at all.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use common::harness::*;
use onboard::pki::CertAndKey;
use onboard::store::DeviceState;
use rumqttc::{
    ConnAck, Connect, ConnectReturnCode, LastWill, MqttOptions, Packet, PubAck, Publish, QoS,
    Subscribe, SubscribeReasonCode,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// How long a test listens to show that something does not happen.
const QUIET: Duration = Duration::from_millis(500);

const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

// ---------------------------------------------------------------------------------------------
// Devices, admins and what they see.

/// Enroll `id` with a CSR, activate it over its operational certificate and go offline again.
async fn active_device(t: &TestGateway, id: &str) -> CertAndKey {
    let (csr, key) = csr_for(id);
    let resp = t
        .enroll(id, json!({ "request_id": "r1", "csr": csr }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    let device = activate_with_cert(t, id, &resp, &key).await;
    wait_state(t, id, DeviceState::Active).await;
    device.disconnect().await;
    wait_no_connections(t, "device").await;
    issued(&resp, &key)
}

/// Options for device `id` over its operational certificate.
fn device_options(
    t: &TestGateway,
    id: &str,
    cred: &CertAndKey,
    clean_session: bool,
) -> MqttOptions {
    let mut o = t.mtls_options(id, cred);
    o.set_clean_session(clean_session);
    o
}

/// Options for a connection with `id`'s factory certificate and client id `id`.
fn factory_options(t: &TestGateway, id: &str, clean_session: bool) -> MqttOptions {
    let mut o = t.mtls_options(id, &t.factory(id));
    o.set_clean_session(clean_session);
    o
}

/// Wait until the gateway counts no open connection of `role` (a client that went away is
/// gone for the gateway too, so what is published next finds it offline).
async fn wait_no_connections(t: &TestGateway, role: &str) {
    let sample = format!(r#"onboard_connections{{role="{role}"}}"#);
    eventually(&format!("no {role} connection left"), || async {
        t.metric(&sample).await == 0.0
    })
    .await;
}

/// An admin connection that hears command replies and every device command (its own included,
/// which tells it when a command has been routed).
async fn admin(t: &TestGateway, name: &str) -> Client {
    let mut a = Client::connect(t.mtls_options(name, &t.admin(name)))
        .await
        .expect("admin connects");
    let codes = a
        .subscribe_many(&[
            ("admin/responses/#", QoS::AtLeastOnce),
            ("devices/+/commands/#", QoS::AtLeastOnce),
        ])
        .await;
    assert_eq!(
        codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 2]
    );
    a
}

/// Publish commands (QoS 1) on `topic`, one per payload, and wait until each has been routed
/// (the admin hears it back).
async fn send_commands(admin: &mut Client, topic: &str, payloads: &[&str]) {
    for payload in payloads {
        admin
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes())
            .await;
    }
    for payload in payloads {
        let echo = admin
            .recv_on(topic, WAIT)
            .await
            .unwrap_or_else(|| panic!("command {payload} on {topic} routed"));
        assert_eq!(&echo.payload[..], payload.as_bytes());
    }
}

/// An admin command that must succeed.
async fn command(admin: &mut Client, topic: &str, body: Value) -> Value {
    let reply = admin_command(admin, topic, body).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    reply
}

/// The payloads of the next `n` publishes on `topic`, as text.
async fn payloads_on(client: &mut Client, topic: &str, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        match client.recv_on(topic, WAIT).await {
            Some(p) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            None => panic!("expected {n} messages on {topic}, got {got:?}"),
        }
    }
    got
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

async fn acl_denied_events(t: &TestGateway, id: &str) -> Vec<Value> {
    t.events(id)
        .await
        .into_iter()
        .filter(|e| e.event == "acl_denied")
        .map(|e| e.detail)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A hand-driven MQTT client.

/// MQTT 3.1.1 over TLS where nothing is acknowledged, answered or even read unless the test
/// says so. Packets are encoded and decoded by rumqttc's codec.
struct Raw {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    /// Publishes read while waiting for something else.
    pending: VecDeque<Publish>,
    /// The server closed the connection (end of stream or an error).
    closed: bool,
}

/// CONNECT for `id`.
fn connect_packet(id: &str, clean_session: bool, will: Option<LastWill>) -> Connect {
    let mut c = Connect::new(id);
    c.keep_alive = 30;
    c.clean_session = clean_session;
    c.last_will = will;
    c
}

fn encode(packet: Packet) -> BytesMut {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, usize::MAX)
        .expect("encodable packet");
    out
}

impl Raw {
    /// Connect over `cert` and return the CONNACK.
    async fn connect(t: &TestGateway, cert: &CertAndKey, connect: Connect) -> (Raw, ConnAck) {
        Raw::connect_over(t.raw_tls(cert).await, connect).await
    }

    async fn connect_over(stream: TlsStream<TcpStream>, connect: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            closed: false,
        };
        raw.send(Packet::Connect(connect)).await;
        match raw.next(WAIT).await {
            Some(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        self.write(&encode(packet))
            .await
            .expect("server accepts the packet");
    }

    /// Write bytes; an error means the server closed the connection.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next packet within `within`; None if nothing came or the server closed.
    async fn next(&mut self, within: Duration) -> Option<Packet> {
        let until = Instant::now() + within;
        loop {
            match Packet::read(&mut self.buf, usize::MAX) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("undecodable packet from the server: {e}"),
            }
            if self.closed {
                return None;
            }
            match tokio::time::timeout_at(until, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return None;
                }
                Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next PUBLISH within `within` (other packets are skipped).
    async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
        if let Some(p) = self.pending.pop_front() {
            return Some(p);
        }
        let until = Instant::now() + within;
        loop {
            match self
                .next(until.saturating_duration_since(Instant::now()))
                .await?
            {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }

    /// Subscribe to one filter and return the SUBACK's codes.
    async fn subscribe(&mut self, pkid: u16, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        let mut sub = Subscribe::new(filter, qos);
        sub.pkid = pkid;
        self.send(Packet::Subscribe(sub)).await;
        let until = Instant::now() + WAIT;
        loop {
            match self
                .next(until.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Packet::SubAck(ack)) => {
                    assert_eq!(ack.pkid, pkid);
                    return ack.return_codes;
                }
                Some(Packet::Publish(p)) => self.pending.push_back(p),
                Some(_) => {}
                None => panic!("no SUBACK for {filter}"),
            }
        }
    }

    /// Whether the server closes the connection within `within` (what it sends is read and
    /// dropped).
    async fn closed_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self
            .next(until.saturating_duration_since(Instant::now()))
            .await
            .is_some()
        {}
        self.closed
    }

    async fn puback(&mut self, pkid: u16) {
        self.send(Packet::PubAck(PubAck::new(pkid))).await;
    }

    /// DISCONNECT, then close the TLS session and the socket.
    async fn disconnect(mut self) {
        self.send(Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The retained configuration.

#[tokio::test]
async fn the_retained_config_arrives_on_every_subscribe_with_the_retain_flag() {
    let t = TestGateway::start().await;
    let id = "ret-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/config");
    let mut d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");

    // Subscribe, unsubscribe and subscribe again to the same filter, then wildcards inside
    // the device's tree; each time on the same connection.
    let filters = [
        topic.clone(),
        topic.clone(),
        format!("devices/{id}/#"),
        format!("devices/{id}/+"),
    ];
    for (i, filter) in filters.iter().enumerate() {
        assert_eq!(
            d.subscribe(filter, QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter}"
        );
        let p = d
            .recv_on(&topic, WAIT)
            .await
            .unwrap_or_else(|| panic!("retained config on subscribe #{} to {filter}", i + 1));
        assert!(
            p.retain,
            "retain flag set on subscribe #{} to {filter}",
            i + 1
        );
        let config: Value = serde_json::from_slice(&p.payload).expect("JSON config");
        assert_eq!(
            (config["device_id"].as_str(), config["version"].as_i64()),
            (Some(id), Some(1))
        );
        d.unsubscribe(filter).await;
        // Whatever the old subscription still carried is not what the next one must deliver.
        let _ = d.drain(Duration::ZERO).await;
    }

    // A new connection.
    d.disconnect().await;
    let mut d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device reconnects");
    d.subscribe(&topic, QoS::AtLeastOnce).await;
    let p = d
        .recv_on(&topic, WAIT)
        .await
        .expect("retained config on a new connection");
    assert!(p.retain, "retain flag set on a new connection");
}

#[tokio::test]
async fn a_repeated_subscribe_resends_the_retained_config() {
    // MQTT 3.1.1 §3.8.4: a SUBSCRIBE whose filter equals an existing subscription replaces it,
    // and the retained messages matching it are sent again.
    let t = TestGateway::start().await;
    let id = "ret-2";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/config");
    let mut d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    d.subscribe(&topic, QoS::AtLeastOnce).await;
    assert!(d.recv_on(&topic, WAIT).await.is_some(), "first subscribe");
    d.subscribe(&topic, QoS::AtLeastOnce).await;
    let again = d
        .recv_on(&topic, WAIT)
        .await
        .expect("the retained config again on a repeated SUBSCRIBE of the same filter");
    assert!(again.retain);
}

// ---------------------------------------------------------------------------------------------
// 2-4. QoS 1 delivery and persistent sessions.

#[tokio::test]
async fn an_unacknowledged_command_is_redelivered_with_dup_after_reconnect() {
    let t = TestGateway::start().await;
    let id = "dup-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/reboot");
    let mut ops = admin(&t, "ops").await;

    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, false, None)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert_eq!(
        raw.subscribe(1, &format!("devices/{id}/commands/#"), QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    send_commands(&mut ops, &topic, &["now"]).await;
    let first = raw.next_publish(WAIT).await.expect("command delivered");
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        (topic.as_str(), &b"now"[..])
    );
    assert_eq!(first.qos, QoS::AtLeastOnce);
    assert!(!first.dup, "first delivery");

    // Gone without PUBACK or DISCONNECT.
    drop(raw);
    wait_no_connections(&t, "device").await;

    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, false, None)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(ack.session_present, "the persistent session was kept");
    let again = raw
        .next_publish(WAIT)
        .await
        .expect("the unacknowledged command is delivered again");
    assert_eq!(
        (again.topic.as_str(), &again.payload[..]),
        (topic.as_str(), &b"now"[..])
    );
    assert_eq!(again.qos, QoS::AtLeastOnce);
    assert!(again.dup, "a redelivery has DUP set (MQTT 3.1.1 §4.4)");
    raw.puback(again.pkid).await;
    raw.disconnect().await;
    wait_no_connections(&t, "device").await;

    // Acknowledged: never again.
    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, false, None)).await;
    assert!(ack.session_present);
    assert!(
        raw.next_publish(QUIET).await.is_none(),
        "an acknowledged command is not redelivered"
    );
}

/// Connect `id` with a persistent session subscribed to its commands (QoS 1), then go offline.
async fn persistent_session(t: &TestGateway, id: &str, cred: &CertAndKey) {
    let mut d = Client::connect(device_options(t, id, cred, false))
        .await
        .expect("device connects");
    assert_eq!(
        d.subscribe(&format!("devices/{id}/commands/#"), QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    d.disconnect().await;
    wait_no_connections(t, "device").await;
}

#[tokio::test]
async fn a_persistent_session_keeps_its_subscriptions_and_queued_commands() {
    let t = TestGateway::start().await;
    let id = "ps-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    persistent_session(&t, id, &cred).await;

    send_commands(&mut ops, &topic, &["c-1", "c-2", "c-3"]).await;

    // Back, without subscribing again.
    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, false, None)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(ack.session_present, "CONNACK session present = 1");
    for expected in ["c-1", "c-2", "c-3"] {
        let p = raw
            .next_publish(WAIT)
            .await
            .unwrap_or_else(|| panic!("queued command {expected} delivered"));
        assert_eq!(
            (p.topic.as_str(), text(&p).as_str()),
            (topic.as_str(), expected)
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
        raw.puback(p.pkid).await;
    }
    assert!(
        raw.next_publish(QUIET).await.is_none(),
        "each queued command once"
    );
    // Still subscribed while connected.
    send_commands(&mut ops, &topic, &["c-4"]).await;
    let live = raw.next_publish(WAIT).await.expect("live command");
    assert_eq!(text(&live), "c-4");
    raw.puback(live.pkid).await;
}

#[tokio::test]
async fn a_clean_session_discards_the_persistent_session() {
    let t = TestGateway::start().await;
    let id = "ps-2";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    persistent_session(&t, id, &cred).await;
    send_commands(&mut ops, &topic, &["c-1", "c-2", "c-3"]).await;

    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, true, None)).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present, "clean session: session present = 0");
    assert!(
        raw.next_publish(QUIET).await.is_none(),
        "a clean session gets nothing that was queued for the old one"
    );
    raw.disconnect().await;
    wait_no_connections(&t, "device").await;

    // The persistent session is gone: no session, no subscription.
    send_commands(&mut ops, &topic, &["c-4"]).await;
    let (mut raw, ack) = Raw::connect(&t, &cred, connect_packet(id, false, None)).await;
    assert!(
        !ack.session_present,
        "the clean session ended the persistent one"
    );
    assert!(
        raw.next_publish(QUIET).await.is_none(),
        "no subscription survived the clean session"
    );
}

#[tokio::test]
async fn the_offline_queue_keeps_the_newest_commands_and_counts_the_dropped() {
    let t = TestGateway::start_with(|c| c.limits.max_queued_per_device = 5).await;
    let id = "q-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    persistent_session(&t, id, &cred).await;

    let sent: Vec<String> = (1..=8).map(|i| i.to_string()).collect();
    let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
    send_commands(&mut ops, &topic, &sent).await;

    let mut d = Client::connect(device_options(&t, id, &cred, false))
        .await
        .expect("device reconnects");
    assert_eq!(
        payloads_on(&mut d, &topic, 5).await,
        ["4", "5", "6", "7", "8"],
        "the newest 5 are kept, in order"
    );
    assert!(
        d.recv_on(&topic, QUIET).await.is_none(),
        "the 3 oldest were dropped"
    );
    eventually("3 queued commands counted as dropped", || async {
        t.metric("onboard_session_queue_dropped_total").await == 3.0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Wills.

#[tokio::test]
async fn a_will_is_sent_when_the_device_drops_and_not_after_disconnect() {
    let t = TestGateway::start().await;
    let id = "will-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/events/offline");
    let mut ops = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .expect("admin connects");
    ops.subscribe("devices/+/events/#", QoS::AtLeastOnce).await;
    let will = |payload: &str| Some(LastWill::new(&topic, payload, QoS::AtLeastOnce, false));

    let (raw, ack) = Raw::connect(&t, &cred, connect_packet(id, true, will("clean"))).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    raw.disconnect().await;
    wait_no_connections(&t, "device").await;
    assert!(
        ops.recv_on(&topic, QUIET).await.is_none(),
        "no will after a DISCONNECT"
    );

    let (raw, ack) = Raw::connect(&t, &cred, connect_packet(id, true, will("dropped"))).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    drop(raw); // the TCP connection ends without DISCONNECT
    let p = ops
        .recv_on(&topic, WAIT)
        .await
        .expect("the will is published when the connection drops");
    assert_eq!(text(&p), "dropped");
}

#[tokio::test]
async fn a_device_will_on_a_denied_topic_is_refused_at_connect() {
    // A bootstrap will on another device's topic: front.rs `will_messages_obey_the_topic_rules`.
    let t = TestGateway::start().await;
    let id = "will-2";
    let cred = active_device(&t, id).await;
    for (n, topic) in [
        format!("devices/{id}/config"),
        "devices/other/events/offline".into(),
    ]
    .iter()
    .enumerate()
    {
        let mut o = device_options(&t, id, &cred, true);
        o.set_last_will(LastWill::new(topic, "x", QoS::AtLeastOnce, false));
        let r = Client::connect(o).await;
        assert_eq!(
            r.err(),
            Some(ConnectFailure::Refused(ConnectReturnCode::NotAuthorized)),
            "will on {topic}"
        );
        assert_eq!(
            t.metric(r#"onboard_auth_failures_total{reason="will_topic_denied"}"#)
                .await,
            (n + 1) as f64
        );
    }
    assert_eq!(
        t.wait_event(id, "auth_refused").await.detail["reason"],
        "will_topic_denied"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Keepalive 0.

#[tokio::test]
async fn a_device_with_keepalive_zero_stays_connected_and_receives() {
    // The CONNECT alone (an admin's): front.rs `keepalive_zero_is_accepted`.
    let t = TestGateway::start().await;
    let id = "ka0-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    let mut o = device_options(&t, id, &cred, true);
    o.set_keep_alive(Duration::ZERO);
    let mut d = Client::connect(o).await.expect("keepalive 0 accepted");
    d.subscribe(&format!("devices/{id}/commands/#"), QoS::AtLeastOnce)
        .await;
    send_commands(&mut ops, &topic, &["first"]).await;
    assert_eq!(payloads_on(&mut d, &topic, 1).await, ["first"]);
    // Silence (rumqttc sends no PINGREQ with keepalive 0) does not end the session.
    assert!(
        !d.closed_within(Duration::from_secs(2)).await,
        "a keepalive-0 session is never timed out"
    );
    send_commands(&mut ops, &topic, &["second"]).await;
    assert_eq!(payloads_on(&mut d, &topic, 1).await, ["second"]);
}

// ---------------------------------------------------------------------------------------------
// 7-8. Isolation and the admin's view.

#[tokio::test]
async fn a_device_receives_nothing_of_another_device() {
    // SUBACK 0x80 for `devices/B/#` and wildcards outside its own tree: front.rs
    // `device_topic_rules`.
    let t = TestGateway::start().await;
    let cred_a = active_device(&t, "iso-a").await;
    let cred_b = active_device(&t, "iso-b").await;
    let mut a = Client::connect(device_options(&t, "iso-a", &cred_a, true))
        .await
        .expect("A connects");
    a.subscribe("devices/iso-a/#", QoS::AtLeastOnce).await;
    a.recv_json("devices/iso-a/config").await;
    let b = Client::connect(device_options(&t, "iso-b", &cred_b, true))
        .await
        .expect("B connects");
    let mut ops = admin(&t, "ops").await;
    ops.subscribe("devices/#", QoS::AtLeastOnce).await;
    assert_eq!(ops.recv_json("devices/iso-b/config").await["version"], 1);

    // B's telemetry, a command to B and a new configuration of B: the admin sees all three.
    b.publish(
        "devices/iso-b/telemetry",
        QoS::AtLeastOnce,
        false,
        "b-telemetry",
    )
    .await;
    assert!(ops.recv_on("devices/iso-b/telemetry", WAIT).await.is_some());
    send_commands(&mut ops, "devices/iso-b/commands/reboot", &["b-command"]).await;
    command(
        &mut ops,
        "admin/devices/iso-b/config",
        json!({ "request_id": "b-cfg", "settings": { "mode": "cool" } }),
    )
    .await;
    assert_eq!(ops.recv_json("devices/iso-b/config").await["version"], 2);

    // A hears its own command, and nothing of B.
    send_commands(&mut ops, "devices/iso-a/commands/ping", &["a-command"]).await;
    assert_eq!(
        payloads_on(&mut a, "devices/iso-a/commands/ping", 1).await,
        ["a-command"]
    );
    let foreign: Vec<String> = a
        .drain(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .filter(|topic| !topic.starts_with("devices/iso-a/"))
        .collect();
    assert!(foreign.is_empty(), "A received {foreign:?}");
}

#[tokio::test]
async fn an_admin_sees_telemetry_config_and_firmware_of_a_device() {
    let t = TestGateway::start().await;
    let id = "obs-1";
    let cred = active_device(&t, id).await;
    let d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    let mut ops = admin(&t, "ops").await;
    assert_eq!(
        ops.subscribe("devices/#", QoS::AtLeastOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let config_topic = format!("devices/{id}/config");
    let retained = ops
        .recv_on(&config_topic, WAIT)
        .await
        .expect("the retained config");
    assert!(retained.retain);

    d.publish(
        &format!("devices/{id}/telemetry"),
        QoS::AtLeastOnce,
        false,
        r#"{"t":22.5}"#,
    )
    .await;
    assert_eq!(
        ops.recv_json(&format!("devices/{id}/telemetry")).await,
        json!({ "t": 22.5 })
    );

    command(
        &mut ops,
        &format!("admin/devices/{id}/config"),
        json!({ "request_id": "cfg-2", "settings": { "mode": "cool" } }),
    )
    .await;
    let config = ops.recv_json(&config_topic).await;
    assert_eq!(
        (
            config["version"].as_i64(),
            config["settings"]["mode"].as_str()
        ),
        (Some(2), Some("cool"))
    );

    let reply = command(
        &mut ops,
        &format!("admin/devices/{id}/firmware"),
        json!({ "request_id": "fw-1", "version": "2.0.0", "url": "https://fw.example/t-2.0.0.bin",
                "sha256": HASH, "size": 1_048_576 }),
    )
    .await;
    let job = ops.recv_json(&format!("devices/{id}/firmware")).await;
    assert_eq!(job["version"], "2.0.0");
    assert_eq!(job["job_id"], reply["result"]["job_id"], "{reply}");
}

// ---------------------------------------------------------------------------------------------
// 9. A factory certificate and the device session of the same id.

#[tokio::test]
async fn a_factory_certificate_never_sees_or_ends_the_device_session() {
    let t = TestGateway::start().await;
    let id = "fac-1";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    persistent_session(&t, id, &cred).await;
    send_commands(&mut ops, &topic, &["queued-1"]).await;

    // The factory identity, same client id, asking for a persistent session.
    match Client::connect(factory_options(&t, id, false)).await {
        Ok(mut boot) => {
            let seen: Vec<String> = boot
                .drain(QUIET)
                .await
                .into_iter()
                .map(|p| format!("{} {}", p.topic, text(&p)))
                .collect();
            assert!(
                seen.is_empty(),
                "the factory certificate received the device's messages: {seen:?}"
            );
            boot.disconnect().await;
            wait_no_connections(&t, "bootstrap").await;
        }
        // Refusing it shares nothing either.
        Err(ConnectFailure::Refused(_)) => {}
        Err(e) => panic!("factory connection neither accepted nor refused: {e:?}"),
    }
    send_commands(&mut ops, &topic, &["queued-2"]).await;

    // The device's own session still holds everything queued for it.
    let mut d = Client::connect(device_options(&t, id, &cred, false))
        .await
        .expect("device reconnects");
    assert_eq!(
        payloads_on(&mut d, &topic, 2).await,
        ["queued-1", "queued-2"],
        "the device session survived the factory connection"
    );
}

#[tokio::test]
async fn a_factory_certificate_connection_does_not_disconnect_the_device() {
    let t = TestGateway::start().await;
    let id = "fac-2";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/commands/x");
    let mut ops = admin(&t, "ops").await;
    let mut d = Client::connect(device_options(&t, id, &cred, false))
        .await
        .expect("device connects");
    d.subscribe(&format!("devices/{id}/commands/#"), QoS::AtLeastOnce)
        .await;

    let mut factory_clients = Vec::new();
    for clean_session in [true, false] {
        factory_clients.push(Client::connect(factory_options(&t, id, clean_session)).await);
        assert!(
            !d.closed_within(QUIET).await,
            "a factory connection (clean_session = {clean_session}) with the device's id ended the device's connection"
        );
    }
    send_commands(&mut ops, &topic, &["still-here"]).await;
    assert_eq!(payloads_on(&mut d, &topic, 1).await, ["still-here"]);
}

// ---------------------------------------------------------------------------------------------
// 10. Retained publishes by devices.

#[tokio::test]
async fn retained_publishes_outside_state_or_over_the_limit_are_refused() {
    let t = TestGateway::start_with(|c| c.limits.max_retained_bytes = 1024).await;
    let id = "rp-1";
    let cred = active_device(&t, id).await;
    let cases = [
        (format!("devices/{id}/telemetry"), 16),
        (format!("devices/{id}/events/x"), 16),
        (format!("devices/{id}/state"), 4096),
    ];
    for (n, (topic, size)) in cases.iter().enumerate() {
        let mut d = Client::connect(device_options(&t, id, &cred, true))
            .await
            .expect("device connects");
        d.publish(topic, QoS::AtLeastOnce, true, vec![b'x'; *size])
            .await;
        assert!(
            d.closed_within(WAIT).await,
            "a retained publish of {size} bytes on {topic} closes the connection"
        );
        assert_eq!(
            t.metric(r#"onboard_acl_denied_total{action="publish",role="device"}"#)
                .await,
            (n + 1) as f64,
            "counted: {topic}"
        );
        eventually(&format!("acl_denied audited for {topic}"), || async {
            acl_denied_events(&t, id)
                .await
                .iter()
                .filter(|e| e["topic"] == topic.as_str())
                .count()
                == 1
        })
        .await;
    }

    // Nothing of it was kept.
    let mut ops = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .expect("admin connects");
    for (topic, _) in &cases {
        ops.subscribe(topic, QoS::AtLeastOnce).await;
    }
    let kept: Vec<String> = ops
        .drain(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert!(kept.is_empty(), "retained despite the refusal: {kept:?}");
}

#[tokio::test]
async fn a_small_retained_state_is_kept_for_later_subscribers() {
    let t = TestGateway::start_with(|c| c.limits.max_retained_bytes = 1024).await;
    let id = "rp-2";
    let cred = active_device(&t, id).await;
    let topic = format!("devices/{id}/state");
    let mut d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    d.subscribe(&topic, QoS::AtLeastOnce).await;
    d.publish(&topic, QoS::AtLeastOnce, true, r#"{"power":"on"}"#)
        .await;
    assert!(d.recv_on(&topic, WAIT).await.is_some(), "state routed");
    assert!(
        !d.closed_within(QUIET).await,
        "a small retained state is allowed"
    );
    assert_eq!(
        t.metric(r#"onboard_acl_denied_total{action="publish",role="device"}"#)
            .await,
        0.0
    );

    let mut ops = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .expect("admin connects");
    ops.subscribe(&topic, QoS::AtLeastOnce).await;
    let p = ops
        .recv_on(&topic, WAIT)
        .await
        .expect("the retained state for a later subscriber");
    assert!(p.retain);
    assert_eq!(text(&p), r#"{"power":"on"}"#);
}

// ---------------------------------------------------------------------------------------------
// 11. Clients that stop reading.

/// Whether the gateway ends the only device connection before `until`. A client that does not
/// read cannot see that itself: the gateway's FIN waits behind the data it was never able to
/// send.
async fn device_disconnected_by(t: &TestGateway, until: Instant) -> bool {
    while t.metric(r#"onboard_connections{role="device"}"#).await > 0.0 {
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The gateway hung up on its own (counted as a slow client), and the connection is closed
/// for the client too once it reads again.
async fn assert_disconnected_as_slow(t: &TestGateway, raw: &mut Raw) {
    eventually("the slow client counted", || async {
        t.metric("onboard_slow_client_disconnects_total").await == 1.0
    })
    .await;
    assert!(
        raw.closed_within(WAIT).await,
        "the connection is closed once the client reads again"
    );
}

#[tokio::test]
async fn a_client_that_sends_subscribes_but_never_reads_is_disconnected() {
    let t = TestGateway::start_with(|c| c.limits.write_timeout_ms = 500).await;
    let id = "slow-1";
    let cred = active_device(&t, id).await;
    let (mut raw, ack) = Raw::connect_over(
        t.raw_tls_small_buffers(&cred).await,
        connect_packet(id, true, None),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);

    // Denied SUBSCRIBEs, each answered by a SUBACK that is never read: at most 200,000 of them
    // (a megabyte of SUBACKs, far more than the socket buffers hold). The gateway may stop
    // reading them, but must hang up.
    let mut batch = BytesMut::new();
    for pkid in 1..=1000 {
        let mut sub = Subscribe::new("#", QoS::AtMostOnce);
        sub.pkid = pkid;
        batch.extend_from_slice(&encode(Packet::Subscribe(sub)));
    }
    let until = Instant::now() + Duration::from_secs(5);
    let flood = async {
        for _ in 0..200 {
            if raw.write(&batch).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let disconnected = tokio::select! {
        _ = flood => unreachable!("the flood never ends by itself"),
        disconnected = device_disconnected_by(&t, until) => disconnected,
    };
    assert!(
        disconnected,
        "a client that never reads is disconnected within about write_timeout_ms"
    );
    assert_disconnected_as_slow(&t, &mut raw).await;
}

#[tokio::test]
async fn a_device_that_stops_reading_its_commands_is_disconnected() {
    let t = TestGateway::start_with(|c| c.limits.write_timeout_ms = 500).await;
    let id = "slow-2";
    let cred = active_device(&t, id).await;
    let (mut raw, ack) = Raw::connect_over(
        t.raw_tls_small_buffers(&cred).await,
        connect_packet(id, true, None),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    raw.subscribe(1, &format!("devices/{id}/commands/#"), QoS::AtMostOnce)
        .await;
    // From here on the device reads nothing: 200 commands of 64 KiB, 12.5 MiB.
    let ops = Client::connect(t.mtls_options("ops", &t.admin("ops")))
        .await
        .expect("admin connects");
    let until = Instant::now() + Duration::from_secs(5);
    let topic = format!("devices/{id}/commands/bulk");
    for _ in 0..200 {
        ops.publish(&topic, QoS::AtMostOnce, false, vec![b'x'; 64 * 1024])
            .await;
    }
    assert!(
        device_disconnected_by(&t, until).await,
        "a device that stops reading is disconnected within about write_timeout_ms"
    );
    assert_disconnected_as_slow(&t, &mut raw).await;
}

// ---------------------------------------------------------------------------------------------
// 12. The connection limit.

#[tokio::test]
async fn past_max_connections_a_client_is_refused_at_once() {
    let t = TestGateway::start_with(|c| c.server.max_connections = 3).await;
    let mut held = Vec::new();
    for i in 0..3 {
        let name = format!("held-{i}");
        held.push(
            Client::connect(t.mtls_options(&name, &t.admin(&name)))
                .await
                .expect("within the limit"),
        );
    }
    let extra = t.admin("extra");
    let started = std::time::Instant::now();
    let r = Client::connect(t.mtls_options("extra", &extra)).await;
    let elapsed = started.elapsed();
    match r {
        Ok(_) => panic!("a fourth connection was accepted with max_connections = 3"),
        Err(ConnectFailure::Timeout) => panic!("the fourth connection was left hanging"),
        Err(ConnectFailure::Refused(code)) => {
            assert_eq!(code, ConnectReturnCode::ServiceUnavailable)
        }
        Err(ConnectFailure::Failed(_)) => {} // closed before CONNACK
    }
    assert!(
        elapsed < Duration::from_secs(2),
        "refused at once, not after {elapsed:?}"
    );
    eventually("the refusal counted", || async {
        t.metric(r#"onboard_auth_failures_total{reason="too_many_connections"}"#)
            .await
            == 1.0
    })
    .await;

    // A slot that frees up admits the next client.
    held.pop().expect("a held connection").disconnect().await;
    eventually("a freed slot admits a client", || async {
        Client::connect(t.mtls_options("extra", &extra))
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_first_report_is_acknowledged_only_once_the_store_holds_the_activation() {
    let t = TestGateway::start().await;
    let id = "ack-1";
    let (csr, key) = csr_for(id);
    let resp = t
        .enroll(id, json!({ "request_id": "r1", "csr": csr }))
        .await;
    assert_eq!(resp["status"], "accepted", "{resp}");
    let (mut raw, _) = Raw::connect(&t, &issued(&resp, &key), connect_packet(id, true, None)).await;
    let mut report = Publish::new(format!("devices/{id}/telemetry"), QoS::AtLeastOnce, "{}");
    report.pkid = 7;
    raw.send(Packet::Publish(report)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match raw.next(left).await {
            Some(Packet::PubAck(ack)) if ack.pkid == 7 => break,
            Some(_) => {}
            None => panic!("no PUBACK for the first report"),
        }
    }
    // Told that its report arrived, the device is active: at once, not eventually.
    let device = t.gw.store.device(id).await.expect("store").expect("device");
    assert_eq!(device.state, DeviceState::Active);
}

#[tokio::test]
async fn a_session_holds_at_most_64_filters() {
    let t = TestGateway::start().await;
    let id = "subs-1";
    let cred = active_device(&t, id).await;
    let mut d = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    let filters: Vec<String> = (0..=onboard::front::MAX_SUBSCRIPTIONS)
        .map(|n| format!("devices/{id}/commands/c{n}"))
        .collect();
    let wanted: Vec<(&str, QoS)> = filters
        .iter()
        .map(|f| (f.as_str(), QoS::AtLeastOnce))
        .collect();
    let denied = r#"onboard_acl_denied_total{action="subscribe",role="device"}"#;
    let before = t.metric(denied).await;
    let codes = d.subscribe_many(&wanted).await;
    let (kept, last) = codes.split_at(onboard::front::MAX_SUBSCRIPTIONS);
    assert!(
        kept.iter()
            .all(|c| *c == SubscribeReasonCode::Success(QoS::AtLeastOnce)),
        "{kept:?}"
    );
    assert_eq!(
        last,
        [SubscribeReasonCode::Failure],
        "one filter past the limit"
    );
    assert_eq!(t.metric(denied).await - before, 1.0);
    // Re-subscribing to a filter it holds is no new filter, and still allowed.
    assert_eq!(
        d.subscribe(&filters[0], QoS::AtMostOnce).await,
        SubscribeReasonCode::Success(QoS::AtMostOnce)
    );
}

// ---------------------------------------------------------------------------------------------
// 10. QoS 1 to admins: the relay's window.

/// An admin that acknowledges nothing yet: `n` telemetry publishes of device `id` on their way
/// to it. Returns what it received within the wait.
async fn unacknowledged_deliveries(
    ops: &mut Raw,
    device: &Client,
    id: &str,
    n: usize,
) -> Vec<Publish> {
    let topic = format!("devices/{id}/telemetry");
    for i in 0..n {
        device
            .publish(&topic, QoS::AtLeastOnce, false, format!("{i}"))
            .await;
    }
    let mut got = Vec::new();
    while got.len() < n {
        match ops.next_publish(WAIT).await {
            Some(p) => got.push(p),
            None => break,
        }
    }
    got
}

#[tokio::test]
async fn a_clean_session_admin_gets_more_than_the_brokers_window_unacknowledged() {
    let t = TestGateway::start().await;
    let id = "win-1";
    let cred = active_device(&t, id).await;
    let device = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    let (mut ops, ack) = Raw::connect(
        &t,
        &t.admin("watcher"),
        connect_packet("watcher", true, None),
    )
    .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    ops.subscribe(1, &format!("devices/{id}/telemetry"), QoS::AtLeastOnce)
        .await;

    // rumqttd alone stops at 100 unacknowledged; the relay's window is larger.
    const N: usize = 300;
    let got = unacknowledged_deliveries(&mut ops, &device, id, N).await;
    assert_eq!(got.len(), N, "deliveries without an acknowledgement");
    let payloads: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "in order, each once");
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
    let ids: std::collections::HashSet<u16> = got.iter().map(|p| p.pkid).collect();
    assert_eq!(
        ids.len(),
        N,
        "a packet id of its own for each unacknowledged delivery"
    );

    // Acknowledged: nothing comes again, and what follows still flows.
    for p in &got {
        ops.puback(p.pkid).await;
    }
    assert!(
        ops.next_publish(QUIET).await.is_none(),
        "nothing redelivered"
    );
    let more = unacknowledged_deliveries(&mut ops, &device, id, 5).await;
    assert_eq!(more.len(), 5);
}

#[tokio::test]
async fn a_persistent_admin_session_gets_its_unacknowledged_deliveries_again() {
    let t = TestGateway::start().await;
    let id = "win-2";
    let cred = active_device(&t, id).await;
    let device = Client::connect(device_options(&t, id, &cred, true))
        .await
        .expect("device connects");
    let admin_cert = t.admin("keeper");
    let (mut ops, _) = Raw::connect(&t, &admin_cert, connect_packet("keeper", false, None)).await;
    ops.subscribe(1, &format!("devices/{id}/telemetry"), QoS::AtLeastOnce)
        .await;
    let got = unacknowledged_deliveries(&mut ops, &device, id, 3).await;
    assert_eq!(got.len(), 3);
    drop(ops);
    wait_no_connections(&t, "admin").await;

    // Resumed: the three it never acknowledged come again.
    let (mut ops, ack) = Raw::connect(&t, &admin_cert, connect_packet("keeper", false, None)).await;
    assert!(ack.session_present);
    let mut again = Vec::new();
    while let Some(p) = ops.next_publish(WAIT).await {
        again.push(String::from_utf8_lossy(&p.payload).into_owned());
        ops.puback(p.pkid).await;
        if again.len() == 3 {
            break;
        }
    }
    assert_eq!(again, ["0", "1", "2"]);
}
