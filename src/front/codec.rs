//! Just enough MQTT 3.1.1 framing for the front: find frame boundaries, read a PUBLISH topic,
//! rewrite CONNECT for the internal listener, drop denied filters from a SUBSCRIBE and merge
//! their failures back into the broker's SUBACK. Everything else passes through untouched.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Connect, LastWill, Login, Packet, Protocol};

/// MQTT control packet types (high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
}

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
pub mod connack {
    pub const ACCEPTED: u8 = 0;
    pub const BAD_PROTOCOL_VERSION: u8 = 1;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("unsupported protocol level {0}; this server speaks MQTT 3.1.1 (level 4)")]
    ProtocolLevel(u8),
    #[error("first packet was not CONNECT")]
    NotConnect,
}

/// A complete frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// First byte: type in the high nibble, flags in the low one.
    pub header: u8,
    /// Length of the fixed header (1 + 1..=4).
    pub header_len: usize,
    /// Total length of the frame.
    pub len: usize,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
}

/// The frame at the start of `buf`: `Ok(None)` if more bytes are needed.
pub fn frame(buf: &[u8], max_len: usize) -> Result<Option<Frame>, CodecError> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    let mut shift = 0;
    for i in 1..=4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            let len = 1 + i + remaining;
            if len > max_len {
                return Err(CodecError::TooLarge {
                    size: len,
                    limit: max_len,
                });
            }
            if buf.len() < len {
                return Ok(None);
            }
            return Ok(Some(Frame {
                header,
                header_len: 1 + i,
                len,
            }));
        }
        shift += 7;
    }
    Err(CodecError::BadLength)
}

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn read_str(buf: &[u8], at: usize) -> Option<(&str, usize)> {
    let len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let bytes = buf.get(at + 2..at + 2 + len)?;
    Some((std::str::from_utf8(bytes).ok()?, at + 2 + len))
}

/// Topic of a PUBLISH frame, and where its payload starts.
pub fn publish_topic<'a>(
    frame_bytes: &'a [u8],
    frame: &Frame,
) -> Result<(&'a str, usize), CodecError> {
    let (topic, mut at) =
        read_str(frame_bytes, frame.header_len).ok_or(CodecError::Malformed("PUBLISH"))?;
    if (frame.header >> 1) & 0b11 != 0 {
        at += 2; // packet identifier
    }
    if at > frame.len {
        return Err(CodecError::Malformed("PUBLISH"));
    }
    Ok((topic, at))
}

/// A PUBLISH frame, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishView<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub retain: bool,
    /// Present for QoS 1 and 2.
    pub pkid: Option<u16>,
    pub payload: &'a [u8],
}

/// Read a PUBLISH frame (QoS 3 and a zero packet id are malformed).
pub fn parse_publish<'a>(bytes: &'a [u8], frame: &Frame) -> Result<PublishView<'a>, CodecError> {
    const ERR: CodecError = CodecError::Malformed("PUBLISH");
    let qos = (frame.header >> 1) & 0b11;
    if qos == 3 {
        return Err(ERR);
    }
    let (topic, payload_at) = publish_topic(bytes, frame)?;
    let pkid = match qos {
        0 => None,
        _ => match packet_id(bytes, payload_at - 2) {
            Some(0) | None => return Err(ERR),
            id => id,
        },
    };
    Ok(PublishView {
        topic,
        qos,
        retain: frame.header & 1 == 1,
        pkid,
        payload: bytes.get(payload_at..frame.len).ok_or(ERR)?,
    })
}

/// A parsed CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPacket {
    pub connect: Connect,
    pub will: Option<LastWill>,
    pub login: Option<Login>,
}

/// Parse the CONNECT frame `bytes`.
pub fn parse_connect(bytes: &[u8]) -> Result<ConnectPacket, CodecError> {
    // protocol name at 2 + header, level right after it
    if let Some(f) = frame(bytes, usize::MAX)? {
        if f.kind() != kind::CONNECT {
            return Err(CodecError::NotConnect);
        }
        if let Some((name, at)) = read_str(bytes, f.header_len) {
            match (name, bytes.get(at)) {
                ("MQTT", Some(4)) => {}
                (_, Some(&level)) => return Err(CodecError::ProtocolLevel(level)),
                _ => return Err(CodecError::Malformed("CONNECT")),
            }
        }
    }
    let mut buf = BytesMut::from(bytes);
    match V4.read_mut(&mut buf, bytes.len()) {
        Ok(Packet::Connect(connect, _, will, _, login)) => Ok(ConnectPacket {
            connect,
            will,
            login,
        }),
        Ok(_) => Err(CodecError::NotConnect),
        Err(rumqttd::protocol::Error::InvalidProtocolLevel(level)) => {
            Err(CodecError::ProtocolLevel(level))
        }
        Err(_) => Err(CodecError::Malformed("CONNECT")),
    }
}

/// CONNECT for the internal listener: same client id, session flag and will; our credentials;
/// keepalive 0 (no keepalive, which rumqttd refuses) replaced by the longest one.
pub fn internal_connect(
    packet: &ConnectPacket,
    user: &str,
    secret: &str,
) -> Result<Bytes, CodecError> {
    let mut connect = packet.connect.clone();
    if connect.keep_alive == 0 {
        connect.keep_alive = u16::MAX;
    }
    let login = Some(Login {
        username: user.to_owned(),
        password: secret.to_owned(),
    });
    let mut out = BytesMut::with_capacity(64 + connect.client_id.len());
    V4.write(
        Packet::Connect(connect, None, packet.will.clone(), None, login),
        &mut out,
    )
    .map_err(|_| CodecError::Malformed("CONNECT"))?;
    Ok(out.freeze())
}

/// A CONNACK with `code` (session present 0).
pub fn connack(code: u8) -> [u8; 4] {
    [kind::CONNACK << 4, 2, 0, code]
}

/// A CONNACK accepting the connection, saying whether a stored session was resumed.
pub fn connack_accepted(session_present: bool) -> [u8; 4] {
    [
        kind::CONNACK << 4,
        2,
        u8::from(session_present),
        connack::ACCEPTED,
    ]
}

/// Return code of a CONNACK frame.
pub fn connack_code(bytes: &[u8]) -> Option<u8> {
    (bytes.first()? >> 4 == kind::CONNACK && bytes.len() >= 4).then(|| bytes[3])
}

pub const PINGREQ: [u8; 2] = [kind::PINGREQ << 4, 0];

/// One filter of a SUBSCRIBE, as raw bytes (length-prefixed filter + options byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter<'a> {
    pub filter: &'a str,
    pub raw: &'a [u8],
}

/// Packet id and filters of a SUBSCRIBE frame.
pub fn parse_subscribe<'a>(
    bytes: &'a [u8],
    frame: &Frame,
) -> Result<(u16, Vec<SubscribeFilter<'a>>), CodecError> {
    const ERR: CodecError = CodecError::Malformed("SUBSCRIBE");
    if frame.header != 0x82 {
        return Err(ERR);
    }
    let at = frame.header_len;
    let pkid = u16::from_be_bytes([*bytes.get(at).ok_or(ERR)?, *bytes.get(at + 1).ok_or(ERR)?]);
    let mut at = at + 2;
    let mut filters = Vec::new();
    while at < frame.len {
        let start = at;
        let (filter, next) = read_str(bytes, at).ok_or(ERR)?;
        let options = *bytes.get(next).ok_or(ERR)?;
        if options & 0b1111_1100 != 0 || options & 0b11 == 3 {
            return Err(ERR);
        }
        at = next + 1;
        filters.push(SubscribeFilter {
            filter,
            raw: &bytes[start..at],
        });
    }
    if filters.is_empty() || at != frame.len {
        return Err(ERR);
    }
    Ok((pkid, filters))
}

/// A SUBSCRIBE with the given packet id and filters.
pub fn subscribe(pkid: u16, filters: &[&SubscribeFilter<'_>]) -> Bytes {
    let len = 2 + filters.iter().map(|f| f.raw.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(len + 5);
    out.put_u8(0x82);
    put_remaining_length(&mut out, len);
    out.put_u16(pkid);
    for f in filters {
        out.put_slice(f.raw);
    }
    out.freeze()
}

/// A SUBACK with the given return codes.
pub fn suback(pkid: u16, codes: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(codes.len() + 6);
    out.put_u8(kind::SUBACK << 4);
    put_remaining_length(&mut out, 2 + codes.len());
    out.put_u16(pkid);
    out.put_slice(codes);
    out.freeze()
}

/// Packet id and return codes of a SUBACK frame.
pub fn parse_suback<'a>(bytes: &'a [u8], frame: &Frame) -> Result<(u16, &'a [u8]), CodecError> {
    const ERR: CodecError = CodecError::Malformed("SUBACK");
    let at = frame.header_len;
    let pkid = u16::from_be_bytes([*bytes.get(at).ok_or(ERR)?, *bytes.get(at + 1).ok_or(ERR)?]);
    Ok((pkid, bytes.get(at + 2..frame.len).ok_or(ERR)?))
}

/// A PUBLISH (not retained, not a duplicate); `pkid` is used for QoS > 0.
pub fn publish(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    put_publish(
        &mut out,
        topic,
        payload,
        PublishFlags {
            qos,
            retain: false,
            dup: false,
        },
        pkid,
    );
    out.freeze()
}

/// Fixed-header flags of a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishFlags {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

/// Append a PUBLISH to `out`; `pkid` is used for QoS > 0.
pub fn put_publish(
    out: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    flags: PublishFlags,
    pkid: u16,
) {
    let qos = flags.qos.min(2);
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.reserve(len + 5);
    out.put_u8(
        (kind::PUBLISH << 4)
            | (u8::from(flags.dup && qos > 0) << 3)
            | (qos << 1)
            | u8::from(flags.retain),
    );
    put_remaining_length(out, len);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// Packet id and topic filters of an UNSUBSCRIBE frame.
pub fn parse_unsubscribe<'a>(
    bytes: &'a [u8],
    frame: &Frame,
) -> Result<(u16, Vec<&'a str>), CodecError> {
    const ERR: CodecError = CodecError::Malformed("UNSUBSCRIBE");
    if frame.header != 0xa2 {
        return Err(ERR);
    }
    let pkid = packet_id(bytes, frame.header_len).ok_or(ERR)?;
    let mut at = frame.header_len + 2;
    let mut filters = Vec::new();
    while at < frame.len {
        let (filter, next) = read_str(bytes, at).ok_or(ERR)?;
        filters.push(filter);
        at = next;
    }
    if filters.is_empty() || at != frame.len {
        return Err(ERR);
    }
    Ok((pkid, filters))
}

/// Packet identifier of a PUBLISH with QoS > 0, or of an acknowledgement / UNSUBSCRIBE.
pub fn packet_id(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// An acknowledgement packet (PUBACK, PUBREC, PUBCOMP, UNSUBACK) carrying `pkid`.
pub fn ack(kind: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [kind << 4, 2, hi, lo]
}

/// Failure return code of a SUBACK.
pub const SUBACK_FAILURE: u8 = 0x80;

/// Merge the broker's return codes for the filters it saw into the full list: `allowed[i]`
/// says whether filter `i` was forwarded; denied ones get [`SUBACK_FAILURE`].
pub fn merge_suback(allowed: &[bool], broker_codes: &[u8]) -> Option<Vec<u8>> {
    let mut codes = broker_codes.iter();
    let merged: Vec<u8> = allowed
        .iter()
        .map(|&ok| {
            if ok {
                codes.next().copied()
            } else {
                Some(SUBACK_FAILURE)
            }
        })
        .collect::<Option<_>>()?;
    codes.next().is_none().then_some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_need_all_their_bytes() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 3, 0, 1], 100), Ok(None));
        let f = frame(&[0x30, 3, 0, 1, b'a', 0xff], 100).unwrap().unwrap();
        assert_eq!((f.kind(), f.header_len, f.len), (kind::PUBLISH, 2, 5));
        // 321 = 0xC1 0x02
        let mut big = vec![0x30, 0xC1, 0x02];
        big.resize(3 + 321, 0);
        assert_eq!(frame(&big, 1000).unwrap().unwrap().len, 324);
        assert_eq!(
            frame(&big, 100),
            Err(CodecError::TooLarge {
                size: 324,
                limit: 100
            })
        );
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0], usize::MAX),
            Err(CodecError::BadLength)
        );
    }

    #[test]
    fn publish_topic_for_each_qos() {
        let qos0 = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
        let f = frame(&qos0, 100).unwrap().unwrap();
        assert_eq!(publish_topic(&qos0, &f).unwrap(), ("a/b", 7));
        let qos1 = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 1, b'h', b'i'];
        let f = frame(&qos1, 100).unwrap().unwrap();
        assert_eq!(publish_topic(&qos1, &f).unwrap(), ("a/b", 9));
        let truncated = [0x30, 3, 0, 9, b'a'];
        let f = frame(&truncated, 100).unwrap().unwrap();
        assert!(publish_topic(&truncated, &f).is_err());
    }

    fn connect_bytes(level: u8, keepalive: u16, client: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02];
        body.extend_from_slice(&keepalive.to_be_bytes());
        body.extend_from_slice(&(client.len() as u16).to_be_bytes());
        body.extend_from_slice(client.as_bytes());
        let mut out = vec![0x10, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn connect_is_rewritten_with_our_login_and_a_keepalive() {
        let packet = parse_connect(&connect_bytes(4, 0, "dev-1")).unwrap();
        assert_eq!(packet.connect.client_id, "dev-1");
        assert_eq!(packet.connect.keep_alive, 0);
        let rewritten = internal_connect(&packet, "front", "s3cret").unwrap();
        let again = parse_connect(&rewritten).unwrap();
        assert_eq!(again.connect.keep_alive, u16::MAX);
        assert_eq!(again.connect.client_id, "dev-1");
        let login = again.login.unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("front", "s3cret")
        );
    }

    #[test]
    fn publishes_we_write_parse_back() {
        for qos in [0u8, 1] {
            let bytes = publish("enroll/d/response", qos, 7, b"{}");
            let f = frame(&bytes, 1000).unwrap().unwrap();
            assert_eq!(f.len, bytes.len());
            let (topic, at) = publish_topic(&bytes, &f).unwrap();
            assert_eq!(topic, "enroll/d/response");
            assert_eq!(&bytes[at..], b"{}");
            assert_eq!((f.header >> 1) & 3, qos);
        }
        assert_eq!(ack(kind::PUBACK, 0x0102), [0x40, 2, 1, 2]);
    }

    #[test]
    fn other_protocol_levels_are_named() {
        assert_eq!(
            parse_connect(&connect_bytes(5, 30, "x")),
            Err(CodecError::ProtocolLevel(5))
        );
        assert_eq!(
            parse_connect(&connect_bytes(3, 30, "x")),
            Err(CodecError::ProtocolLevel(3))
        );
        assert_eq!(parse_connect(&[0x30, 0]), Err(CodecError::NotConnect));
        assert!(parse_connect(&[0x10, 3, 0, 4, b'M']).is_err());
    }

    #[test]
    fn subscribe_filtering_and_suback_merge() {
        let f1 = [0u8, 3, b'a', b'/', b'b', 1];
        let f2 = [0u8, 1, b'#', 0];
        let mut body = vec![0x12, 0x34];
        body.extend_from_slice(&f1);
        body.extend_from_slice(&f2);
        let mut bytes = vec![0x82, body.len() as u8];
        bytes.extend(body);
        let fr = frame(&bytes, 100).unwrap().unwrap();
        let (pkid, filters) = parse_subscribe(&bytes, &fr).unwrap();
        assert_eq!(pkid, 0x1234);
        assert_eq!(
            filters.iter().map(|f| f.filter).collect::<Vec<_>>(),
            ["a/b", "#"]
        );
        let only_first = subscribe(pkid, &[&filters[0]]);
        let fr2 = frame(&only_first, 100).unwrap().unwrap();
        let (_, kept) = parse_subscribe(&only_first, &fr2).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            merge_suback(&[true, false], &[1]),
            Some(vec![1, SUBACK_FAILURE])
        );
        assert_eq!(
            merge_suback(&[false, false], &[]),
            Some(vec![SUBACK_FAILURE, SUBACK_FAILURE])
        );
        assert_eq!(merge_suback(&[true], &[]), None);
        let ack = suback(7, &[0, 0x80]);
        let fr3 = frame(&ack, 100).unwrap().unwrap();
        assert_eq!(parse_suback(&ack, &fr3).unwrap(), (7, &[0u8, 0x80][..]));
        // QoS 3 is malformed
        let bad = [0x82, 6, 0, 1, 0, 1, b'a', 3];
        let fr4 = frame(&bad, 100).unwrap().unwrap();
        assert!(parse_subscribe(&bad, &fr4).is_err());
    }
}
