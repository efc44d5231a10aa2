//! A lean MQTT 3.1.1 client over TLS for the simulated devices.
//!
//! It is driven in the caller's task (no background task, no channel, no timer besides the
//! caller's deadline), keeps one read buffer per connection, writes each packet it sends with
//! one flush, and lets the acknowledgements of received QoS 1 messages ride along with the next
//! packet it sends. It speaks what a device needs and nothing more: CONNECT, SUBSCRIBE (one
//! filter), PUBLISH at QoS 0 or 1, PUBACK, DISCONNECT.
//!
//! Encoding and decoding are pure functions over byte slices ([`encode`], [`decode`]), tested
//! without sockets; [`Client`] adds the socket, the deadlines and the classification of what
//! went wrong into [`DeviceFailure`].

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{io_failure, DeviceFailure, Phase};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4 * 1024;
/// Publishes kept while waiting for something else (a device subscribes to one topic at a time,
/// so more than this is a misbehaving server).
const MAX_INBOX: usize = 64;
/// After DISCONNECT, how long the server has to close its side. Waiting for its close leaves
/// the TIME_WAIT state on the server's side, so the simulator's ephemeral ports are free again
/// at once (a fleet opens two connections per enrollment).
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// MQTT control packet types, already shifted into the high nibble of the first byte.
mod header {
    pub const CONNECT: u8 = 0x10;
    pub const CONNACK: u8 = 0x20;
    pub const PUBLISH: u8 = 0x30;
    pub const PUBACK: u8 = 0x40;
    pub const SUBSCRIBE: u8 = 0x82;
    pub const SUBACK: u8 = 0x90;
    pub const DISCONNECT: u8 = 0xE0;
}

/// What the server sent that does not follow MQTT 3.1.1 (or that this client does not speak).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("PUBLISH at QoS {0}: a simulated device subscribes at QoS 1 at most")]
    Qos(u8),
    #[error("{what} is too long for MQTT ({len} bytes)")]
    TooLong { what: &'static str, len: usize },
}

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A packet from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck {
        code: u8,
    },
    /// The first return code (this client subscribes to one filter at a time).
    SubAck {
        pkid: u16,
        code: u8,
    },
    /// A message; `ack` is the packet id to acknowledge (QoS 1).
    Publish {
        message: Message,
        ack: Option<u16>,
    },
    PubAck {
        pkid: u16,
    },
    /// PINGRESP, UNSUBACK, ...: nothing a simulated device acts on.
    Other {
        header: u8,
    },
}

/// Label of a CONNACK return code (MQTT 3.1.1 §3.2.2.3), as counted in failure reasons.
pub fn connack_label(code: u8) -> &'static str {
    match code {
        0 => "success",
        1 => "unacceptable_protocol_version",
        2 => "identifier_rejected",
        3 => "server_unavailable",
        4 => "bad_username_or_password",
        5 => "not_authorized",
        _ => "unknown_code",
    }
}

/// The packets a device sends.
pub mod encode {
    use super::{header, WireError};

    /// What the CONNECT says: clean session, no will.
    #[derive(Debug, Clone, Copy)]
    pub struct Hello<'a> {
        pub client_id: &'a str,
        pub keep_alive_secs: u16,
        /// Username and password (the password listener).
        pub login: Option<(&'a str, &'a str)>,
    }

    fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                return;
            }
        }
    }

    fn put_str(out: &mut Vec<u8>, what: &'static str, s: &[u8]) -> Result<(), WireError> {
        let len = u16::try_from(s.len()).map_err(|_| WireError::TooLong { what, len: s.len() })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(s);
        Ok(())
    }

    /// Fixed header + `body`.
    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(first);
        put_remaining_length(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    pub fn connect(hello: &Hello<'_>) -> Result<Vec<u8>, WireError> {
        // Protocol name, level 4, flags (clean session; username and password if any).
        let mut flags = 0x02;
        if hello.login.is_some() {
            flags |= 0xC0;
        }
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
        body.extend_from_slice(&hello.keep_alive_secs.to_be_bytes());
        put_str(&mut body, "client id", hello.client_id.as_bytes())?;
        if let Some((username, password)) = hello.login {
            put_str(&mut body, "username", username.as_bytes())?;
            put_str(&mut body, "password", password.as_bytes())?;
        }
        Ok(packet(header::CONNECT, &body))
    }

    /// SUBSCRIBE to one filter at `qos`.
    pub fn subscribe(pkid: u16, filter: &str, qos: u8) -> Result<Vec<u8>, WireError> {
        let mut body = pkid.to_be_bytes().to_vec();
        put_str(&mut body, "topic filter", filter.as_bytes())?;
        body.push(qos.min(1));
        Ok(packet(header::SUBSCRIBE, &body))
    }

    /// PUBLISH, not retained; QoS 1 with `Some(pkid)`, QoS 0 with `None`.
    pub fn publish(topic: &str, pkid: Option<u16>, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
        put_str(&mut body, "topic", topic.as_bytes())?;
        let mut first = header::PUBLISH;
        if let Some(pkid) = pkid {
            first |= 0x02;
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        Ok(packet(first, &body))
    }

    pub fn puback(pkid: u16) -> [u8; 4] {
        crate::front::codec::ack(crate::front::codec::kind::PUBACK, pkid)
    }

    pub const DISCONNECT: [u8; 2] = [header::DISCONNECT, 0];
}

/// Reading what the server sends.
pub mod decode {
    use super::{header, Incoming, Message, WireError};
    use crate::front::codec::{self, CodecError};

    /// Length of the complete packet at the start of `buf` and where its body starts, or
    /// `None` when more bytes are needed (the framing the gateway itself uses).
    pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<(usize, usize)>, WireError> {
        match codec::frame(buf, max_len) {
            Ok(frame) => Ok(frame.map(|f| (f.len, f.header_len))),
            Err(CodecError::TooLarge { size, limit }) => Err(WireError::TooLarge { size, limit }),
            Err(_) => Err(WireError::BadLength),
        }
    }

    fn u16_at(body: &[u8], at: usize, what: &'static str) -> Result<u16, WireError> {
        match body.get(at..at + 2) {
            Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(WireError::Malformed(what)),
        }
    }

    fn publish(first: u8, body: &[u8]) -> Result<Incoming, WireError> {
        let qos = (first >> 1) & 0b11;
        if qos > 1 {
            return Err(WireError::Qos(qos));
        }
        let topic_len = usize::from(u16_at(body, 0, "PUBLISH")?);
        let topic = body
            .get(2..2 + topic_len)
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or(WireError::Malformed("PUBLISH"))?;
        let mut at = 2 + topic_len;
        let ack = if qos == 1 {
            at += 2;
            Some(u16_at(body, at - 2, "PUBLISH")?)
        } else {
            None
        };
        let payload = body.get(at..).ok_or(WireError::Malformed("PUBLISH"))?;
        Ok(Incoming::Publish {
            message: Message {
                topic: topic.to_owned(),
                payload: payload.to_vec(),
            },
            ack,
        })
    }

    /// The packet whose first byte is `first` and whose body (after the fixed header) is `body`.
    pub fn packet(first: u8, body: &[u8]) -> Result<Incoming, WireError> {
        match first & 0xF0 {
            header::CONNACK => match body {
                &[_, code] => Ok(Incoming::ConnAck { code }),
                _ => Err(WireError::Malformed("CONNACK")),
            },
            header::PUBLISH => publish(first, body),
            header::PUBACK => Ok(Incoming::PubAck {
                pkid: u16_at(body, 0, "PUBACK")?,
            }),
            header::SUBACK => Ok(Incoming::SubAck {
                pkid: u16_at(body, 0, "SUBACK")?,
                code: *body.get(2).ok_or(WireError::Malformed("SUBACK"))?,
            }),
            _ => Ok(Incoming::Other { header: first }),
        }
    }
}

/// Where a device connects: host (name or address, as the server certificate names it) and
/// port.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub server_name: ServerName<'static>,
}

impl Target {
    pub fn new(host: &str, port: u16) -> Result<Target, DeviceFailure> {
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| DeviceFailure::Local(format!("server name {host:?}: {e}")))?;
        Ok(Target {
            host: host.to_owned(),
            port,
            server_name,
        })
    }
}

/// `fut`, or a timeout failure of `phase` once `deadline` passes.
async fn within<T>(
    deadline: Instant,
    phase: Phase,
    fut: impl std::future::Future<Output = Result<T, DeviceFailure>>,
) -> Result<T, DeviceFailure> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .unwrap_or(Err(DeviceFailure::Timeout { phase }))
}

fn protocol(phase: Phase, e: WireError) -> DeviceFailure {
    DeviceFailure::Protocol {
        phase,
        detail: e.to_string(),
    }
}

/// One MQTT connection over TLS.
pub struct Client {
    stream: TlsStream<TcpStream>,
    /// Bytes read and not decoded yet.
    inbuf: BytesMut,
    /// Acknowledgements owed to the server; they go out in front of the next packet sent.
    owed: Vec<u8>,
    /// Publishes received while waiting for something else.
    inbox: Vec<Message>,
    last_pkid: u16,
    max_packet: usize,
}

impl Client {
    /// TCP connect, TLS handshake, CONNECT, and a successful CONNACK.
    pub async fn open(
        target: &Target,
        tls: Arc<rustls::ClientConfig>,
        hello: &encode::Hello<'_>,
        max_packet: usize,
        deadline: Instant,
        phase: Phase,
    ) -> Result<Client, DeviceFailure> {
        let connect = encode::connect(hello).map_err(|e| DeviceFailure::Local(e.to_string()))?;
        let stream = within(deadline, phase, handshake(target, tls, phase)).await?;
        let mut client = Client {
            stream,
            inbuf: BytesMut::new(),
            owed: Vec::new(),
            inbox: Vec::new(),
            last_pkid: 0,
            max_packet,
        };
        client.send(&connect, deadline, phase).await?;
        match client.next(deadline, phase).await? {
            Incoming::ConnAck { code: 0 } => Ok(client),
            Incoming::ConnAck { code } => Err(DeviceFailure::ConnectRefused {
                phase,
                code: connack_label(code),
            }),
            other => Err(DeviceFailure::Protocol {
                phase,
                detail: format!("expected CONNACK, got {other:?}"),
            }),
        }
    }

    fn next_pkid(&mut self) -> u16 {
        self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
        self.last_pkid
    }

    /// Write what is owed and `packet` with one flush.
    async fn send(
        &mut self,
        packet: &[u8],
        deadline: Instant,
        phase: Phase,
    ) -> Result<(), DeviceFailure> {
        let out: &[u8] = if self.owed.is_empty() {
            packet
        } else {
            self.owed.extend_from_slice(packet);
            &self.owed
        };
        let stream = &mut self.stream;
        let write = async {
            stream.write_all(out).await?;
            stream.flush().await
        };
        within(deadline, phase, io(phase, write)).await?;
        self.owed.clear();
        Ok(())
    }

    /// The next packet from the server. A QoS 1 message is acknowledged with the next packet
    /// sent.
    async fn next(&mut self, deadline: Instant, phase: Phase) -> Result<Incoming, DeviceFailure> {
        loop {
            if let Some((len, body_at)) =
                decode::frame(&self.inbuf, self.max_packet).map_err(|e| protocol(phase, e))?
            {
                let packet = decode::packet(self.inbuf[0], &self.inbuf[body_at..len])
                    .map_err(|e| protocol(phase, e))?;
                self.inbuf.advance(len);
                if let Incoming::Publish {
                    ack: Some(pkid), ..
                } = &packet
                {
                    self.owed.extend_from_slice(&encode::puback(*pkid));
                }
                return Ok(packet);
            }
            self.inbuf.reserve(READ_CHUNK);
            let (stream, inbuf) = (&mut self.stream, &mut self.inbuf);
            let read = within(deadline, phase, io(phase, stream.read_buf(inbuf))).await?;
            if read == 0 {
                return Err(DeviceFailure::Closed {
                    phase,
                    detail: "connection closed by the server".into(),
                });
            }
        }
    }

    /// Keep a message that arrived while waiting for something else.
    fn keep(&mut self, message: Message, phase: Phase) -> Result<(), DeviceFailure> {
        if self.inbox.len() >= MAX_INBOX {
            return Err(DeviceFailure::Protocol {
                phase,
                detail: format!("more than {MAX_INBOX} unexpected messages"),
            });
        }
        self.inbox.push(message);
        Ok(())
    }

    /// Subscribe to `filter` at QoS 1 and wait for a successful SUBACK.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        deadline: Instant,
        phase: Phase,
    ) -> Result<(), DeviceFailure> {
        let pkid = self.next_pkid();
        let packet =
            encode::subscribe(pkid, filter, 1).map_err(|e| DeviceFailure::Local(e.to_string()))?;
        self.send(&packet, deadline, phase).await?;
        loop {
            match self.next(deadline, phase).await? {
                Incoming::SubAck { pkid: p, code } if p == pkid => {
                    return if code <= 2 {
                        Ok(())
                    } else {
                        Err(DeviceFailure::SubscribeRefused {
                            phase,
                            filter: filter.to_owned(),
                        })
                    };
                }
                Incoming::Publish { message, .. } => self.keep(message, phase)?,
                _ => {}
            }
        }
    }

    /// Publish at QoS 1 without waiting for the PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        deadline: Instant,
        phase: Phase,
    ) -> Result<u16, DeviceFailure> {
        let pkid = self.next_pkid();
        let packet = encode::publish(topic, Some(pkid), payload)
            .map_err(|e| DeviceFailure::Local(e.to_string()))?;
        self.send(&packet, deadline, phase).await?;
        Ok(pkid)
    }

    /// Publish at QoS 1 and wait for its PUBACK.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: &[u8],
        deadline: Instant,
        phase: Phase,
    ) -> Result<(), DeviceFailure> {
        let pkid = self.publish(topic, payload, deadline, phase).await?;
        loop {
            match self.next(deadline, phase).await? {
                Incoming::PubAck { pkid: p } if p == pkid => return Ok(()),
                Incoming::Publish { message, .. } => self.keep(message, phase)?,
                _ => {}
            }
        }
    }

    /// The next message on `topic` (one that arrived earlier first).
    pub async fn recv_on(
        &mut self,
        topic: &str,
        deadline: Instant,
        phase: Phase,
    ) -> Result<Message, DeviceFailure> {
        if let Some(i) = self.inbox.iter().position(|m| m.topic == topic) {
            return Ok(self.inbox.remove(i));
        }
        loop {
            if let Incoming::Publish { message, .. } = self.next(deadline, phase).await? {
                if message.topic == topic {
                    return Ok(message);
                }
                self.keep(message, phase)?;
            }
        }
    }

    /// Drop the buffers an idle connection does not need.
    pub fn shrink(&mut self) {
        self.inbuf = BytesMut::new();
        self.inbox = Vec::new();
        self.owed.shrink_to_fit();
    }

    /// DISCONNECT (with anything owed), then wait briefly for the server to close its side.
    /// Best effort, bounded by `deadline`.
    pub async fn close(mut self, deadline: Instant) {
        let deadline = deadline.min(Instant::now() + CLOSE_GRACE);
        let phase = Phase::Telemetry;
        if self
            .send(&encode::DISCONNECT, deadline, phase)
            .await
            .is_err()
        {
            return;
        }
        let mut sink = [0u8; 512];
        let stream = &mut self.stream;
        let _ = tokio::time::timeout_at(deadline, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
    }
}

/// TCP connect and TLS handshake.
async fn handshake(
    target: &Target,
    tls: Arc<rustls::ClientConfig>,
    phase: Phase,
) -> Result<TlsStream<TcpStream>, DeviceFailure> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| io_failure(phase, &e))?;
    // Small request/response exchanges: no Nagle delay on the device side.
    tcp.set_nodelay(true).map_err(|e| io_failure(phase, &e))?;
    TlsConnector::from(tls)
        .connect(target.server_name.clone(), tcp)
        .await
        .map_err(|e| io_failure(phase, &e))
}

/// The outcome of an I/O future, its error classified as a failure of `phase`.
async fn io<T>(
    phase: Phase,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, DeviceFailure> {
    fut.await.map_err(|e| io_failure(phase, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packets_carry_id_keepalive_and_login() {
        let hello = encode::Hello {
            client_id: "d1",
            keep_alive_secs: 600,
            login: None,
        };
        let p = encode::connect(&hello).expect("encodes");
        assert_eq!(
            p,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58, 0, 2, b'd', b'1']
        );
        let login = encode::Hello {
            login: Some(("u", "pw")),
            ..hello
        };
        let p = encode::connect(&login).expect("encodes");
        assert_eq!(p[9], 0xC2, "clean session + username + password");
        assert!(p.ends_with(&[0, 1, b'u', 0, 2, b'p', b'w']));
        let long = "x".repeat(70_000);
        let too_long = encode::Hello {
            client_id: &long,
            ..hello
        };
        assert!(matches!(
            encode::connect(&too_long),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn publish_and_subscribe_packets() {
        let p = encode::publish("a/b", Some(7), b"hi").expect("encodes");
        assert_eq!(p, [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
        let p = encode::publish("a", None, b"").expect("encodes");
        assert_eq!(p, [0x30, 3, 0, 1, b'a']);
        let s = encode::subscribe(1, "t", 1).expect("encodes");
        assert_eq!(s, [0x82, 6, 0, 1, 0, 1, b't', 1]);
    }

    #[test]
    fn long_payloads_use_multi_byte_lengths() {
        let payload = vec![0u8; 300];
        let p = encode::publish("t", None, &payload).expect("encodes");
        // 3 + 300 = 303 = 0b10_0101111 -> 0xAF 0x02
        assert_eq!(&p[..3], &[0x30, 0xAF, 0x02]);
        assert_eq!(decode::frame(&p, 1 << 20), Ok(Some((p.len(), 3))));
        assert_eq!(decode::frame(&p[..100], 1 << 20), Ok(None));
        assert!(matches!(
            decode::frame(&p, 100),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(
            decode::frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], 1 << 30),
            Err(WireError::BadLength)
        );
    }

    #[test]
    fn server_packets_are_decoded() {
        assert_eq!(
            decode::packet(0x20, &[0, 5]),
            Ok(Incoming::ConnAck { code: 5 })
        );
        assert_eq!(
            decode::packet(0x90, &[0, 3, 0x80]),
            Ok(Incoming::SubAck {
                pkid: 3,
                code: 0x80
            })
        );
        assert_eq!(
            decode::packet(0x40, &[1, 2]),
            Ok(Incoming::PubAck { pkid: 0x0102 })
        );
        let retained_qos1 = [0, 1, b't', 0, 9, b'{', b'}'];
        assert_eq!(
            decode::packet(0x33, &retained_qos1),
            Ok(Incoming::Publish {
                message: Message {
                    topic: "t".into(),
                    payload: b"{}".to_vec()
                },
                ack: Some(9)
            })
        );
        assert_eq!(
            decode::packet(0xD0, &[]),
            Ok(Incoming::Other { header: 0xD0 })
        );
    }

    #[test]
    fn malformed_server_packets_are_errors_not_panics() {
        assert!(decode::packet(0x20, &[0]).is_err());
        assert!(decode::packet(0x90, &[0, 1]).is_err());
        assert!(decode::packet(0x40, &[]).is_err());
        assert!(decode::packet(0x30, &[0, 9, b'a']).is_err());
        assert!(decode::packet(0x32, &[0, 1, b'a', 0]).is_err());
        assert!(decode::packet(0x30, &[0, 1, 0xFF]).is_err(), "not UTF-8");
        assert_eq!(
            decode::packet(0x34, &[0, 1, b'a', 0, 1]),
            Err(WireError::Qos(2))
        );
    }

    #[test]
    fn connack_codes_have_stable_labels() {
        assert_eq!(connack_label(5), "not_authorized");
        assert_eq!(connack_label(3), "server_unavailable");
        assert_eq!(connack_label(42), "unknown_code");
    }
}
