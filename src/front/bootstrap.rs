//! Bootstrap sessions served by the front itself.
//!
//! A factory-certificate connection may only subscribe to `enroll/D/response` and publish
//! `enroll/D/request`: everything it can do is answered by the gateway. So a clean bootstrap
//! session without a will never reaches the broker: the front acknowledges its packets, hands
//! the request to the enrollment service and writes the answer straight back. That saves a
//! broker connection per enrollment (rumqttd accepts about a thousand per second) and the answer
//! cannot race the subscription. Persistent sessions (`clean_session = 0`) and sessions with a
//! will go through the broker like any other.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::codec::{self, kind};
use super::identity::Identity;
use super::rules::{self, Action, Decision};
use super::{End, Front, READ_BUFFER};

impl Front {
    /// Whether the front serves this bootstrap session itself.
    pub(super) fn serves_bootstrap(packet: &codec::ConnectPacket) -> bool {
        packet.connect.clean_session && packet.will.is_none()
    }

    /// Serve a bootstrap session after its CONNECT was accepted (CONNACK not yet sent).
    pub(super) async fn bootstrap_session<R, W>(
        &self,
        identity: &Identity,
        mut client: R,
        mut out: W,
        mut buf: BytesMut,
        keep_alive: u16,
        kill: CancellationToken,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let who = &identity.principal;
        let response_topic = format!("enroll/{}/response", who.id);
        // QoS of the subscription to the response topic, if any.
        let mut subscribed: Option<u8> = None;
        let mut next_pkid: u16 = 0;
        // MQTT 3.1.1 §3.1.2.10: no packet within 1.5 x keepalive closes the connection.
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        if out
            .write_all(&codec::connack(codec::connack::ACCEPTED))
            .await
            .is_err()
        {
            return End::ClientClosed;
        }
        loop {
            while let Some(frame) = match codec::frame(&buf, self.max_packet) {
                Ok(f) => f,
                Err(e) => {
                    self.protocol_violation(who, &e.to_string());
                    return End::Protocol;
                }
            } {
                let bytes = buf.split_to(frame.len).freeze();
                let reply: Option<bytes::Bytes> = match frame.kind() {
                    kind::PUBLISH => {
                        let Ok((topic, payload_at)) = codec::publish_topic(&bytes, &frame) else {
                            self.protocol_violation(who, "malformed PUBLISH");
                            return End::Protocol;
                        };
                        if let Decision::Deny(why) = rules::allowed(who, Action::Publish, topic) {
                            self.denied(who, Action::Publish, topic, why);
                            return End::Denied(topic.to_owned(), why);
                        }
                        let qos = (frame.header >> 1) & 0b11;
                        if qos > 0 {
                            let Some(pkid) =
                                codec::packet_id(&bytes, frame.header_len + 2 + topic.len())
                            else {
                                self.protocol_violation(who, "malformed PUBLISH");
                                return End::Protocol;
                            };
                            let ack = if qos == 1 { kind::PUBACK } else { kind::PUBREC };
                            if out.write_all(&codec::ack(ack, pkid)).await.is_err() {
                                return End::ClientClosed;
                            }
                        }
                        let answer = self.enroller.answer(&who.id, &bytes[payload_at..]).await;
                        match subscribed {
                            Some(qos) => {
                                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                                let body = serde_json::to_vec(&answer).unwrap_or_default();
                                Some(codec::publish(&response_topic, qos, next_pkid, &body))
                            }
                            None => None,
                        }
                    }
                    kind::SUBSCRIBE => {
                        let Ok((pkid, filters)) = codec::parse_subscribe(&bytes, &frame) else {
                            self.protocol_violation(who, "malformed SUBSCRIBE");
                            return End::Protocol;
                        };
                        let codes: Vec<u8> = filters
                            .iter()
                            .map(|f| match rules::allowed(who, Action::Subscribe, f.filter) {
                                Decision::Allow => {
                                    // Requested QoS is the last byte of the filter; we deliver
                                    // at most QoS 1.
                                    let granted = f.raw.last().copied().unwrap_or(0).min(1);
                                    subscribed = Some(granted);
                                    granted
                                }
                                Decision::Deny(why) => {
                                    self.denied(who, Action::Subscribe, f.filter, why);
                                    codec::SUBACK_FAILURE
                                }
                            })
                            .collect();
                        Some(codec::suback(pkid, &codes))
                    }
                    kind::UNSUBSCRIBE => {
                        subscribed = None;
                        codec::packet_id(&bytes, frame.header_len).map(|pkid| {
                            bytes::Bytes::copy_from_slice(&codec::ack(kind::UNSUBACK, pkid))
                        })
                    }
                    kind::PUBREL => codec::packet_id(&bytes, frame.header_len).map(|pkid| {
                        bytes::Bytes::copy_from_slice(&codec::ack(kind::PUBCOMP, pkid))
                    }),
                    kind::PINGREQ => Some(bytes::Bytes::from_static(&[kind::PINGRESP << 4, 0])),
                    kind::DISCONNECT => return End::ClientClosed,
                    kind::CONNECT => {
                        self.protocol_violation(who, "second CONNECT");
                        return End::Protocol;
                    }
                    // Acknowledgements of our answers.
                    kind::PUBACK | kind::PUBREC | kind::PUBCOMP => None,
                    _ => {
                        self.protocol_violation(who, "unexpected packet type");
                        return End::Protocol;
                    }
                };
                if let Some(reply) = reply {
                    if out.write_all(&reply).await.is_err() {
                        return End::ClientClosed;
                    }
                }
            }
            if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(READ_BUFFER);
            }
            let read = async {
                match idle {
                    Some(limit) => tokio::time::timeout(limit, client.read_buf(&mut buf))
                        .await
                        .ok(),
                    None => Some(client.read_buf(&mut buf).await),
                }
            };
            tokio::select! {
                _ = kill.cancelled() => return End::Killed,
                read = read => match read {
                    None => {
                        self.protocol_violation(who, "keepalive expired");
                        return End::Protocol;
                    }
                    Some(Ok(0)) | Some(Err(_)) => return End::ClientClosed,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}
