//! Admin connections, relayed to the broker's internal listener.
//!
//! Admins (and back-ends holding admin certificates) are few and need the broker's wildcard
//! fan-out (`devices/#`, `admin/#`), so their sessions live in rumqttd: the CONNECT is replayed
//! there with the per-process secret and bytes are relayed both ways. Every PUBLISH and
//! SUBSCRIBE from the client is checked against [`rules::allowed`] on its way in; denied
//! filters get SUBACK 0x80, a denied publish closes the connection. A command published on
//! `devices/D/commands/...` is also delivered into device D's own session
//! ([`crate::mailbox`]), where D's subscriptions live.
//!
//! Both directions are bounded: the halves talk through a small channel, and a client that
//! stops reading is disconnected after `[limits] write_timeout_ms`. A clean session's QoS 1
//! deliveries go through the relay's own window ([`super::window`]), not rumqttd's 100.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::codec::{self, kind, Frame};
use super::identity::{Identity, Refusal, RefusalReason};
use super::rules::{self, Action, Decision};
use super::window::{AckWindow, RELAY_INFLIGHT};
use super::{read_frame, Admitted, End, Front, READ_BUFFER};
use crate::mailbox::{Message, SessionKey};
use crate::topics::{self, Route};

/// How often a keepalive-0 client's broker session is pinged on its behalf (rumqttd has no
/// "no keepalive"; it gets the longest one and this keeps it alive).
const KEEPALIVE_ZERO_PING: Duration = Duration::from_secs(30 * 60);
/// Control messages between the two halves of one relayed connection.
const CONTROL_QUEUE: usize = 16;
/// After passing on a client's DISCONNECT, how long the relay waits for the broker to close
/// the session before it closes the socket itself.
///
/// rumqttd 0.20 ends a connection twice when its socket closes while the DISCONNECT is still
/// on its way through the router: once for the DISCONNECT, and once more, by connection id,
/// for the closed socket. When a new connection was given the freed id in between, the second
/// end closes that one instead: a stranger's connection, about one in a thousand under churn.
/// Waiting for the broker to close first leaves it a single end.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

impl Front {
    /// Relay an authenticated admin connection (CONNACK not yet sent) until it ends.
    pub(super) async fn relay<R, W>(
        &self,
        admitted: &Admitted,
        client_rd: R,
        client_wr: &mut W,
        buf: BytesMut,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (identity, packet) = (&admitted.identity, &admitted.packet);
        let (broker_stream, connack, broker_pending) = match self.open_broker(packet).await {
            Ok(b) => b,
            Err((code, detail)) => {
                let _ = client_wr.write_all(&codec::connack(code)).await;
                self.refused(
                    &Refusal::new(
                        RefusalReason::BrokerRefused,
                        Some(&identity.principal.id),
                        detail,
                    ),
                    admitted.remote,
                );
                return End::BrokerClosed;
            }
        };
        if client_wr.write_all(&connack).await.is_err() {
            return End::ClientClosed;
        }
        let keepalive_zero = packet.connect.keep_alive == 0;
        let (broker_rd, broker_wr) = broker_stream.into_split();
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        // Acknowledgements the relay owes the broker for a clean session's QoS 1 deliveries.
        let (acks_tx, acks_rx) = mpsc::channel(RELAY_INFLIGHT);
        let window = packet.connect.clean_session.then(AckWindow::default);
        let writer = ClientWriter {
            client: client_wr,
            timeout: self.write_timeout,
        };
        let to_broker = ToBroker {
            writer: broker_wr,
            ctl: ctl_tx,
            acks: acks_rx,
            window: window.as_ref(),
        };
        let to_client = ToClient {
            ctl: ctl_rx,
            acks: acks_tx,
            window: window.as_ref(),
        };
        let disconnected = AtomicBool::new(false);
        let end = tokio::select! {
            _ = admitted.kill.cancelled() => End::Killed,
            end = self.client_to_broker(identity, client_rd, to_broker, buf, keepalive_zero, &disconnected) => end,
            end = broker_to_client(broker_rd, writer, to_client, broker_pending, self.max_packet.max(1 << 20)) => end,
        };
        match end {
            End::BrokerClosed if disconnected.load(Ordering::Relaxed) => End::Disconnected,
            end => end,
        }
    }

    /// An admin's publish on `devices/D/commands/...` goes into device D's session too.
    fn command_to_device(&self, topic: &str, frame: &Frame, payload: &[u8]) {
        if let Route::Device(id, topics::Private::Command) = topics::route(topic) {
            let qos = (frame.header >> 1) & 0b11;
            self.mailboxes.deliver(
                &SessionKey::device(id),
                Message::new(topic, Bytes::copy_from_slice(payload), qos),
            );
        }
    }

    /// The internal listener of a client id. rumqttd keeps a client id's session take-over and
    /// will bookkeeping per listener, so every connection of one client id goes to the same
    /// listener; different client ids spread over all of them.
    fn broker_addr_for(&self, client_id: &str) -> SocketAddr {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut hasher);
        let index = hasher.finish() % self.broker_addrs.len().max(1) as u64;
        self.broker_addrs[index as usize]
    }

    /// Connect to the internal listener, replay CONNECT with the secret, read its CONNACK.
    async fn open_broker(
        &self,
        packet: &codec::ConnectPacket,
    ) -> Result<(TcpStream, Bytes, BytesMut), (u8, String)> {
        // Returns the stream, the CONNACK, and whatever the broker sent right behind it (a
        // resumed session's queued messages), which must reach the client next.
        let unavailable = |e: String| (codec::connack::SERVER_UNAVAILABLE, e);
        let connect =
            codec::internal_connect(packet, crate::broker::INTERNAL_USER, &self.broker_secret)
                .map_err(|e| (codec::connack::NOT_AUTHORIZED, e.to_string()))?;
        let mut stream = TcpStream::connect(self.broker_addr_for(&packet.connect.client_id))
            .await
            .map_err(|e| unavailable(format!("internal broker: {e}")))?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&connect)
            .await
            .map_err(|e| unavailable(format!("internal broker: {e}")))?;
        let mut buf = BytesMut::with_capacity(64);
        let connack =
            tokio::time::timeout(self.connect_timeout, read_frame(&mut stream, &mut buf, 64))
                .await
                .map_err(|_| unavailable("internal broker did not answer CONNECT".into()))?
                .map_err(|e| unavailable(format!("internal broker: {e}")))?
                .ok_or_else(|| {
                    (
                        codec::connack::NOT_AUTHORIZED,
                        "broker closed the connection at CONNECT (client id refused?)".to_string(),
                    )
                })?;
        match codec::connack_code(&connack) {
            Some(codec::connack::ACCEPTED) => Ok((stream, connack, buf)),
            Some(code) => Err((code, format!("broker refused CONNECT with code {code}"))),
            None => Err(unavailable("internal broker sent no CONNACK".into())),
        }
    }

    /// Relay client -> broker, enforcing the topic rules.
    async fn client_to_broker<R, W>(
        &self,
        identity: &Identity,
        mut client: R,
        to_broker: ToBroker<'_, W>,
        mut buf: BytesMut,
        keepalive_zero: bool,
        disconnected: &AtomicBool,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let ToBroker {
            writer: mut broker,
            ctl,
            mut acks,
            window,
        } = to_broker;
        let mut acks_open = true;
        let who = &identity.principal;
        let mut pinger = tokio::time::interval(KEEPALIVE_ZERO_PING);
        pinger.reset();
        loop {
            // Forward every complete frame; `pass` is the length of the prefix to forward as is.
            let mut pass = 0;
            loop {
                let frame = match codec::frame(&buf[pass..], self.max_packet) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        self.protocol_violation(who, &e.to_string());
                        return End::Protocol;
                    }
                };
                let bytes = &buf[pass..pass + frame.len];
                match frame.kind() {
                    kind::PUBLISH => {
                        let Ok((topic, payload_at)) = codec::publish_topic(bytes, &frame) else {
                            self.protocol_violation(who, "malformed PUBLISH");
                            return End::Protocol;
                        };
                        if let Decision::Deny(why) = rules::allowed(who, Action::Publish, topic) {
                            self.denied(who, Action::Publish, topic, why);
                            let topic = topic.to_owned();
                            // Allowed frames before this one still go through.
                            let _ = broker.write_all(&buf[..pass]).await;
                            return End::Denied(topic, why);
                        }
                        if rules::is_admin_command(topic) {
                            let payload = Bytes::copy_from_slice(&bytes[payload_at..]);
                            self.hooks.admin_command(&who.id, topic, payload);
                        }
                        self.command_to_device(topic, &frame, &bytes[payload_at..]);
                        pass += frame.len;
                    }
                    kind::SUBSCRIBE => {
                        let Ok((pkid, filters)) = codec::parse_subscribe(bytes, &frame) else {
                            self.protocol_violation(who, "malformed SUBSCRIBE");
                            return End::Protocol;
                        };
                        let verdicts: Vec<bool> = filters
                            .iter()
                            .map(|f| match rules::allowed(who, Action::Subscribe, f.filter) {
                                Decision::Allow => true,
                                Decision::Deny(why) => {
                                    self.denied(who, Action::Subscribe, f.filter, why);
                                    false
                                }
                            })
                            .collect();
                        let retained: Vec<Message> = filters
                            .iter()
                            .zip(&verdicts)
                            .filter(|(_, ok)| **ok)
                            .flat_map(|(f, _)| self.mailboxes.retained_matching(f.filter))
                            .collect();
                        if !retained.is_empty() {
                            let _ = ctl.send(Control::AfterSuback(pkid, retained)).await;
                        }
                        if verdicts.iter().all(|ok| *ok) {
                            pass += frame.len;
                            continue;
                        }
                        // Rewrite: forward what came before, then the allowed subset (or
                        // answer ourselves when nothing is allowed).
                        let kept: Vec<_> = filters
                            .iter()
                            .zip(&verdicts)
                            .filter(|(_, ok)| **ok)
                            .map(|(f, _)| f)
                            .collect();
                        let rewritten = (!kept.is_empty()).then(|| codec::subscribe(pkid, &kept));
                        let frame_len = frame.len;
                        if broker.write_all(&buf[..pass]).await.is_err() {
                            return End::BrokerClosed;
                        }
                        match rewritten {
                            Some(sub) => {
                                let _ = ctl.send(Control::MaskSuback(pkid, verdicts)).await;
                                if broker.write_all(&sub).await.is_err() {
                                    return End::BrokerClosed;
                                }
                            }
                            None => {
                                let codes = vec![codec::SUBACK_FAILURE; verdicts.len()];
                                let _ =
                                    ctl.send(Control::Inject(codec::suback(pkid, &codes))).await;
                            }
                        }
                        let _ = buf.split_to(pass + frame_len);
                        pass = 0;
                    }
                    kind::CONNECT => {
                        self.protocol_violation(who, "second CONNECT");
                        return End::Protocol;
                    }
                    kind::DISCONNECT => {
                        let through = pass + frame.len;
                        if broker.write_all(&buf[..through]).await.is_err() {
                            return End::BrokerClosed;
                        }
                        // The broker's half ends this connection when the broker closes.
                        disconnected.store(true, Ordering::Relaxed);
                        tokio::time::sleep(DISCONNECT_GRACE).await;
                        return End::Disconnected;
                    }
                    kind::PUBACK
                        if window.is_some_and(|w| {
                            codec::packet_id(bytes, frame.header_len)
                                .is_some_and(|pkid| w.acknowledge(pkid))
                        }) =>
                    {
                        // For a delivery of the relay's own window: it ends here (the broker
                        // was acknowledged when it was passed on).
                        let frame_len = frame.len;
                        if pass > 0 && broker.write_all(&buf[..pass]).await.is_err() {
                            return End::BrokerClosed;
                        }
                        let _ = buf.split_to(pass + frame_len);
                        pass = 0;
                    }
                    _ => pass += frame.len,
                }
            }
            if pass > 0 {
                let chunk = buf.split_to(pass);
                if broker.write_all(&chunk).await.is_err() {
                    return End::BrokerClosed;
                }
            }
            if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(READ_BUFFER);
            }
            tokio::select! {
                read = client.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return End::ClientClosed,
                    Ok(_) => {}
                },
                first = acks.recv(), if acks_open => match first {
                    Some(pkid) => {
                        let mut out = BytesMut::with_capacity(64);
                        out.extend_from_slice(&codec::ack(kind::PUBACK, pkid));
                        while let Ok(pkid) = acks.try_recv() {
                            out.extend_from_slice(&codec::ack(kind::PUBACK, pkid));
                        }
                        if broker.write_all(&out).await.is_err() {
                            return End::BrokerClosed;
                        }
                    }
                    None => acks_open = false,
                },
                _ = pinger.tick(), if keepalive_zero => {
                    let _ = ctl.send(Control::SwallowPingResp).await;
                    if broker.write_all(&codec::PINGREQ).await.is_err() {
                        return End::BrokerClosed;
                    }
                }
            }
        }
    }
}

/// The client-to-broker half's ends: the broker's socket, what it tells the other half, and
/// the acknowledgements the other half owes the broker.
struct ToBroker<'w, W> {
    writer: W,
    ctl: mpsc::Sender<Control>,
    acks: mpsc::Receiver<u16>,
    window: Option<&'w AckWindow>,
}

/// The broker-to-client half's ends.
struct ToClient<'w> {
    ctl: mpsc::Receiver<Control>,
    acks: mpsc::Sender<u16>,
    window: Option<&'w AckWindow>,
}

/// Messages from the client-to-broker half to the broker-to-client half of one connection.
#[derive(Debug)]
enum Control {
    /// The SUBSCRIBE with this packet id was forwarded without its denied filters: merge
    /// failures into the broker's SUBACK (`true` = forwarded).
    MaskSuback(u16, Vec<bool>),
    /// Send this frame to the client between two broker frames.
    Inject(Bytes),
    /// Send these retained messages right after the SUBACK with this packet id.
    AfterSuback(u16, Vec<Message>),
    /// A PINGREQ was sent on the client's behalf: drop one PINGRESP.
    SwallowPingResp,
}

/// What the client-to-broker half asked of this half, applied to the broker's answers.
#[derive(Default)]
struct Rewrites {
    /// Failures to merge into the SUBACK of a packet id (`true` = forwarded).
    masks: HashMap<u16, Vec<bool>>,
    /// Retained messages to send right after the SUBACK of a packet id.
    after_suback: HashMap<u16, Vec<Message>>,
    /// PINGRESPs to drop (answers to pings sent on the client's behalf).
    swallow_pings: usize,
}

impl Rewrites {
    /// Take a control message; returns a frame to send at once, if any.
    fn apply(&mut self, control: Control) -> Option<Bytes> {
        match control {
            Control::Inject(frame) => return Some(frame),
            Control::MaskSuback(pkid, verdicts) => {
                self.masks.insert(pkid, verdicts);
            }
            Control::AfterSuback(pkid, messages) => {
                self.after_suback.entry(pkid).or_default().extend(messages);
            }
            Control::SwallowPingResp => self.swallow_pings += 1,
        }
        None
    }

    /// What to send instead of the broker's frame `bytes`: `None` to pass it on as it is.
    fn rewrite(&mut self, frame: &Frame, bytes: &[u8]) -> Option<Vec<Bytes>> {
        match frame.kind() {
            kind::SUBACK if !self.masks.is_empty() || !self.after_suback.is_empty() => {
                let (pkid, codes) = codec::parse_suback(bytes, frame).ok()?;
                let suback = self
                    .masks
                    .remove(&pkid)
                    .and_then(|verdicts| codec::merge_suback(&verdicts, codes))
                    .map(|merged| codec::suback(pkid, &merged))
                    .unwrap_or_else(|| Bytes::copy_from_slice(bytes));
                let retained = self.after_suback.remove(&pkid).unwrap_or_default();
                Some(
                    std::iter::once(suback)
                        .chain(retained.iter().map(retained_frame))
                        .collect(),
                )
            }
            kind::PINGRESP if self.swallow_pings > 0 => {
                self.swallow_pings -= 1;
                Some(Vec::new())
            }
            _ => None,
        }
    }
}

/// A retained message for an observer: QoS 0 (the broker owns this session's packet ids).
fn retained_frame(message: &Message) -> Bytes {
    let mut out = BytesMut::new();
    let flags = codec::PublishFlags {
        qos: 0,
        retain: true,
        dup: false,
    };
    codec::put_publish(&mut out, &message.topic, &message.payload, flags, 0);
    out.freeze()
}

/// Relay broker -> client, whole frames only (so frames can be injected between them).
async fn broker_to_client<R, W>(
    mut broker: R,
    mut client: ClientWriter<'_, W>,
    to_client: ToClient<'_>,
    pending: BytesMut,
    max_packet: usize,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ToClient {
        mut ctl,
        acks,
        window,
    } = to_client;
    let own_window = window.map(|w| (w, &acks));
    let mut buf = pending;
    buf.reserve(READ_BUFFER * 4);
    // Bytes that came with the CONNACK are relayed before anything else is read.
    let mut first = !buf.is_empty();
    let mut rewrites = Rewrites::default();
    let mut ctl_open = true;
    loop {
        tokio::select! {
            _ = std::future::ready(()), if first => first = false,
            read = broker.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return End::BrokerClosed,
                Ok(_) => {}
            },
            msg = ctl.recv(), if ctl_open => {
                match msg.map(|m| rewrites.apply(m)) {
                    Some(Some(frame)) => {
                        if let Err(end) = client.write(&frame).await {
                            return end;
                        }
                    }
                    Some(None) => {}
                    None => ctl_open = false,
                }
                continue;
            }
        }
        // Control messages sent before the broker's answer must be seen before it.
        while let Ok(msg) = ctl.try_recv() {
            if let Some(frame) = rewrites.apply(msg) {
                if let Err(end) = client.write(&frame).await {
                    return end;
                }
            }
        }
        if let Err(end) =
            relay_frames(&mut buf, &mut client, &mut rewrites, own_window, max_packet).await
        {
            return end;
        }
        if buf.capacity() - buf.len() < READ_BUFFER {
            buf.reserve(READ_BUFFER * 4);
        }
    }
}

/// Write every complete broker frame in `buf` to the client, rewritten where asked; with
/// `own_window`, QoS 1 deliveries are renumbered into the relay's window and acknowledged to
/// the broker.
async fn relay_frames<W: AsyncWrite + Unpin>(
    buf: &mut BytesMut,
    client: &mut ClientWriter<'_, W>,
    rewrites: &mut Rewrites,
    own_window: Option<(&AckWindow, &mpsc::Sender<u16>)>,
    max_packet: usize,
) -> Result<(), End> {
    // `pass` is the length of the prefix to pass on as it is.
    let mut pass = 0;
    loop {
        let frame: Frame = match codec::frame(&buf[pass..], max_packet) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return Err(End::Protocol),
        };
        if let Some((window, acks)) = own_window {
            if frame.kind() == kind::PUBLISH && (frame.header >> 1) & 0b11 == 1 {
                let bytes = &buf[pass..pass + frame.len];
                let Ok((_, payload_at)) = codec::publish_topic(bytes, &frame) else {
                    return Err(End::Protocol);
                };
                let at = pass + payload_at - 2;
                let Some(broker_pkid) = codec::packet_id(buf, at) else {
                    return Err(End::Protocol);
                };
                if window.is_full() && pass > 0 {
                    // Full: what was gathered goes out before waiting for the client's acks.
                    client.write(&buf[..pass]).await?;
                    let _ = buf.split_to(pass);
                    pass = 0;
                }
                let ours = window.take().await;
                let at = pass + payload_at - 2;
                buf[at..at + 2].copy_from_slice(&ours.to_be_bytes());
                if acks.send(broker_pkid).await.is_err() {
                    return Err(End::BrokerClosed);
                }
            }
        }
        let Some(replacement) = rewrites.rewrite(&frame, &buf[pass..pass + frame.len]) else {
            pass += frame.len;
            continue;
        };
        client.write(&buf[..pass]).await?;
        for bytes in replacement {
            client.write(&bytes).await?;
        }
        let _ = buf.split_to(pass + frame.len);
        pass = 0;
    }
    if pass > 0 {
        let chunk = buf.split_to(pass);
        client.write(&chunk).await?;
    }
    Ok(())
}

/// The client half of a relayed connection: a client that accepts nothing for `timeout` has
/// stopped reading and is cut off.
struct ClientWriter<'a, W> {
    client: &'a mut W,
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> ClientWriter<'_, W> {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), End> {
        // Flushed: TLS records left in the session would wait for the next write, and under
        // QoS 1 that write waits for the client's acknowledgement of these very records.
        let write = async {
            self.client.write_all(bytes).await?;
            self.client.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientClosed),
            Err(_) => Err(End::SlowClient),
        }
    }
}
