//! Packets out of order or out of shape, as a buggy or hostile client sends them over an
//! authenticated TLS connection: the gateway answers, counts and audits each, and closes.

mod common;

use common::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CONNECT (MQTT 3.1.1, clean session, keepalive 60 s) for `id`.
fn connect(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Everything the server sends until it closes the stream (or [`WAIT`] passes).
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("closed in time");
    out
}

async fn refusal_reason(t: &TestGateway, id: &str) -> String {
    let event = t.wait_event(id, "auth_refused").await;
    event.detail["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_publish_before_connect_is_refused_as_a_protocol_error() {
    let t = TestGateway::start().await;
    let mut s = t.raw_tls(&t.factory("order-1")).await;
    let topic = b"enroll/order-1/request";
    let mut publish = vec![0x30, (2 + topic.len() + 2) as u8, 0, topic.len() as u8];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(b"{}");
    s.write_all(&publish).await.unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        [0x20, 2, 0, 5],
        "CONNACK not authorized, then close"
    );
    assert_eq!(refusal_reason(&t, "order-1").await, "protocol_error");
    assert_eq!(
        t.metric(r#"onboard_auth_failures_total{reason="protocol_error"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_malformed_remaining_length_is_refused_as_a_protocol_error() {
    let t = TestGateway::start().await;
    let mut s = t.raw_tls(&t.factory("order-2")).await;
    // Five continuation bytes: no valid MQTT length has more than four.
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap();
    let answer = read_to_close(&mut s).await;
    assert!(answer.is_empty() || answer == [0x20, 2, 0, 5], "{answer:?}");
    assert_eq!(refusal_reason(&t, "order-2").await, "protocol_error");
    assert!(t.gw.store.device("order-2").await.unwrap().is_none());
}

#[tokio::test]
async fn a_second_connect_closes_the_session() {
    let t = TestGateway::start().await;
    let mut s = t.raw_tls(&t.factory("order-3")).await;
    s.write_all(&connect("order-3")).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "first CONNECT accepted");
    s.write_all(&connect("order-3")).await.unwrap();
    assert!(
        read_to_close(&mut s).await.is_empty(),
        "closed without an answer"
    );
    let event = t.wait_event("order-3", "protocol_violation").await;
    assert_eq!(event.detail["detail"], "second CONNECT");
}

#[tokio::test]
async fn a_subscribe_with_reserved_flags_closes_the_session() {
    let t = TestGateway::start().await;
    let mut s = t.raw_tls(&t.factory("order-4")).await;
    s.write_all(&connect("order-4")).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    // SUBSCRIBE must have flags 0b0010 (MQTT 3.1.1 §3.8.1); 0x80 is malformed.
    let filter = b"enroll/order-4/response";
    let mut sub = vec![
        0x80,
        (2 + 2 + filter.len() + 1) as u8,
        0,
        1,
        0,
        filter.len() as u8,
    ];
    sub.extend_from_slice(filter);
    sub.push(1);
    s.write_all(&sub).await.unwrap();
    assert!(
        read_to_close(&mut s).await.is_empty(),
        "closed without a SUBACK"
    );
    t.wait_event("order-4", "protocol_violation").await;
}
