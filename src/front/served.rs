//! Bootstrap and device sessions, served by the front itself.
//!
//! Everything such a client may subscribe to is private to it, and the gateway holds it
//! ([`crate::mailbox`]): so the front answers every packet, delivers what is queued for the
//! session, and passes on what the client publishes:
//! - to the gateway's inbox, when the topic is one the gateway acts on (enrollment requests,
//!   config acks, firmware status, renewals);
//! - to the broker ([`crate::broker::Fanout`]), for admins and back-ends subscribed with
//!   wildcards (device role only: an enrollment request is nobody else's business);
//! - to the client's own session, when it subscribed to its own topic.
//!
//! Limits a hostile or buggy client meets here: packet size (`broker.max_payload_size`),
//! retained publishes only on `devices/D/state` up to `limits.max_retained_bytes`,
//! [`MAX_SUBSCRIPTIONS`] filters per session, a bounded session queue, a bounded amount of
//! unsent output, and `limits.write_timeout_ms` for a client that stops reading.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::LastWill;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::codec::{self, kind, Frame, PublishFlags};
use super::rules::{self, Action, Decision};
use super::{Admitted, End, Front, Inbound};
use crate::mailbox::{Attached, Message, SessionKey};
use crate::pki::Role;
use crate::topics;

/// Topic filters one session may hold.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// Output written to the client in one go; more waits for the next round.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// Read buffer of a served connection: small, since most connections sit idle (it grows for
/// a larger packet, and shrinks back when the connection falls quiet).
const READ_CHUNK: usize = 4096;

impl Front {
    /// Serve an authenticated bootstrap or device connection (CONNACK not yet sent).
    pub(super) async fn serve_session<R, W>(
        &self,
        admitted: &Admitted,
        client: R,
        out: &mut W,
        buf: BytesMut,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let identity = &admitted.identity;
        let who = &identity.principal;
        let key = match who.role {
            Role::Bootstrap => SessionKey::bootstrap(&who.id),
            _ => SessionKey::device(&who.id),
        };
        let connect = &admitted.packet.connect;
        let attached = self
            .mailboxes
            .attach(key, connect.clean_session, admitted.kill.clone());
        let mut outbox = Outbox {
            writer: out,
            pending: BytesMut::new(),
            timeout: self.write_timeout,
        };
        outbox.push(&codec::connack_accepted(attached.present));
        let mut served = Served {
            front: self,
            admitted,
            attached,
            awaiting_activation: identity.awaiting_activation,
            // MQTT 3.1.1 §3.1.2.10: no packet within 1.5 x keepalive closes the connection.
            idle: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
        };
        let end = served.run(client, &mut outbox, buf).await;
        if !matches!(end, End::Disconnected) {
            if let Some(will) = &admitted.packet.will {
                served.publish_will(will).await;
            }
        }
        end
    }
}

/// One served connection.
struct Served<'a> {
    front: &'a Front,
    admitted: &'a Admitted,
    attached: Attached,
    /// The device is enrolling and this is its new credential: its first report activates it.
    awaiting_activation: bool,
    /// Longest silence allowed from the client (none with keepalive 0).
    idle: Option<Duration>,
}

impl Served<'_> {
    async fn run<R, W>(
        &mut self,
        mut client: R,
        outbox: &mut Outbox<'_, W>,
        mut buf: BytesMut,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut heard = Instant::now();
        loop {
            if let Err(end) = self.handle_frames(&mut buf, outbox).await {
                return end;
            }
            let more = self.fill(outbox);
            if let Err(end) = outbox.flush().await {
                return end;
            }
            if more {
                continue;
            }
            if buf.is_empty() && buf.capacity() > 2 * READ_CHUNK {
                buf = BytesMut::new();
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let silence = async {
                match self.idle {
                    Some(limit) => tokio::time::sleep_until(heard + limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.admitted.kill.cancelled() => return End::Killed,
                _ = self.attached.wake.notified() => {}
                _ = silence => {
                    self.violation("keepalive expired");
                    return End::Protocol;
                }
                read = client.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return End::ClientClosed,
                    Ok(_) => heard = Instant::now(),
                },
            }
        }
    }

    /// Act on every complete packet in `buf`.
    async fn handle_frames<W: AsyncWrite + Unpin>(
        &mut self,
        buf: &mut BytesMut,
        outbox: &mut Outbox<'_, W>,
    ) -> Result<(), End> {
        loop {
            let frame = match codec::frame(buf, self.front.max_packet) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.violation(&e.to_string())),
            };
            let bytes = buf.split_to(frame.len).freeze();
            self.packet(&bytes, &frame, outbox).await?;
            // Answers to a flood of packets are written as they come, not piled up.
            if outbox.pending.len() >= OUTPUT_CHUNK {
                outbox.flush().await?;
            }
        }
    }

    async fn packet<W: AsyncWrite + Unpin>(
        &mut self,
        bytes: &Bytes,
        frame: &Frame,
        outbox: &mut Outbox<'_, W>,
    ) -> Result<(), End> {
        let pkid = || codec::packet_id(bytes, frame.header_len);
        match frame.kind() {
            kind::PUBLISH => return self.publish(bytes, frame, outbox).await,
            kind::SUBSCRIBE => return self.subscribe(bytes, frame, outbox),
            kind::UNSUBSCRIBE => {
                let Ok((id, filters)) = codec::parse_unsubscribe(bytes, frame) else {
                    return Err(self.violation("malformed UNSUBSCRIBE"));
                };
                filters.iter().for_each(|f| self.attached.unsubscribe(f));
                outbox.push(&codec::ack(kind::UNSUBACK, id));
            }
            kind::PUBACK => {
                if let Some(id) = pkid() {
                    self.attached.acked(id);
                }
            }
            kind::PUBREL => {
                if let Some(id) = pkid() {
                    outbox.push(&codec::ack(kind::PUBCOMP, id));
                }
            }
            // Nothing is sent at QoS 2, so these acknowledge nothing.
            kind::PUBREC | kind::PUBCOMP => {}
            kind::PINGREQ => outbox.push(&[kind::PINGRESP << 4, 0]),
            kind::DISCONNECT => return Err(End::Disconnected),
            kind::CONNECT => return Err(self.violation("second CONNECT")),
            _ => return Err(self.violation("unexpected packet type")),
        }
        Ok(())
    }

    async fn publish<W: AsyncWrite + Unpin>(
        &mut self,
        bytes: &Bytes,
        frame: &Frame,
        outbox: &mut Outbox<'_, W>,
    ) -> Result<(), End> {
        let Ok(publish) = codec::parse_publish(bytes, frame) else {
            return Err(self.violation("malformed PUBLISH"));
        };
        let topic = publish.topic;
        if let Decision::Deny(why) = self.may_publish(topic, publish.retain, publish.payload.len())
        {
            let who = &self.admitted.identity.principal;
            self.front.denied(who, Action::Publish, topic, why);
            return Err(End::Denied(topic.to_owned(), why));
        }
        let payload = bytes.slice_ref(publish.payload);
        let acknowledged = self
            .route(topic, payload, publish.qos, publish.retain)
            .await;
        match (publish.qos, publish.pkid) {
            _ if !acknowledged => {}
            (1, Some(id)) => outbox.push(&codec::ack(kind::PUBACK, id)),
            (2, Some(id)) => outbox.push(&codec::ack(kind::PUBREC, id)),
            _ => {}
        }
        Ok(())
    }

    /// The topic rules, plus the retained-message limit: a device retains only its state.
    fn may_publish(&self, topic: &str, retain: bool, len: usize) -> Decision {
        let who = &self.admitted.identity.principal;
        if let Decision::Deny(why) = rules::allowed(who, Action::Publish, topic) {
            return Decision::Deny(why);
        }
        if retain && !(who.role == Role::Device && topics::is_state(&who.id, topic)) {
            return Decision::Deny("a device may retain only devices/<its id>/state");
        }
        if retain && len > self.front.max_retained {
            return Decision::Deny("retained state larger than limits.max_retained_bytes");
        }
        Decision::Allow
    }

    /// Pass on an allowed publish: to the gateway, to observers, to the client's own session.
    /// `false` when it must not be acknowledged: the activation it reports could not be
    /// written yet (the next report tries again).
    async fn route(&mut self, topic: &str, payload: Bytes, qos: u8, retain: bool) -> bool {
        let identity = &self.admitted.identity;
        let who = &identity.principal;
        let mut acknowledged = true;
        if self.awaiting_activation && rules::is_activation_report(&who.id, topic) {
            acknowledged = self
                .front
                .hooks
                .device_reported(&who.id, &identity.serial)
                .await;
            self.awaiting_activation = !acknowledged;
        }
        if topics::is_for_gateway(topic) {
            let inbound = Inbound {
                topic: topic.to_owned(),
                payload: payload.clone(),
                factory: self.admitted.factory.clone(),
            };
            if self.front.inbox.send(inbound).await.is_err() {
                tracing::warn!(topic, "gateway inbox closed; message dropped");
            }
        }
        if who.role == Role::Device {
            self.front
                .fanout
                .publish(topic, payload.clone(), retain)
                .await;
            self.front
                .mailboxes
                .deliver(self.attached.key(), Message::new(topic, payload, qos));
        }
        acknowledged
    }

    fn subscribe<W: AsyncWrite + Unpin>(
        &mut self,
        bytes: &Bytes,
        frame: &Frame,
        outbox: &mut Outbox<'_, W>,
    ) -> Result<(), End> {
        let Ok((pkid, filters)) = codec::parse_subscribe(bytes, frame) else {
            return Err(self.violation("malformed SUBSCRIBE"));
        };
        let who = &self.admitted.identity.principal;
        let codes: Vec<u8> = filters
            .iter()
            .map(|f| {
                let decision = match rules::allowed(who, Action::Subscribe, f.filter) {
                    Decision::Allow
                        if !self.attached.holds(f.filter)
                            && self.attached.subscriptions() >= MAX_SUBSCRIPTIONS =>
                    {
                        Decision::Deny("too many subscriptions in one session")
                    }
                    decision => decision,
                };
                match decision {
                    Decision::Allow => {
                        // Requested QoS is the options byte; delivery is at most QoS 1.
                        let granted = f.raw.last().map_or(0, |o| o & 0b11).min(1);
                        let retained = match who.role {
                            Role::Device => self.front.mailboxes.retained(&who.id, f.filter),
                            _ => Vec::new(),
                        };
                        self.attached.subscribe(f.filter, granted, retained);
                        granted
                    }
                    Decision::Deny(why) => {
                        self.front.denied(who, Action::Subscribe, f.filter, why);
                        codec::SUBACK_FAILURE
                    }
                }
            })
            .collect();
        outbox.push(&codec::suback(pkid, &codes));
        Ok(())
    }

    /// Move what the session has for the client into the output, up to [`OUTPUT_CHUNK`].
    /// Returns whether more is waiting.
    fn fill<W>(&self, outbox: &mut Outbox<'_, W>) -> bool {
        while outbox.pending.len() < OUTPUT_CHUNK {
            let Some(out) = self.attached.next() else {
                return false;
            };
            let flags = PublishFlags {
                qos: out.message.qos,
                retain: out.message.retain,
                dup: out.dup,
            };
            codec::put_publish(
                &mut outbox.pending,
                &out.message.topic,
                &out.message.payload,
                flags,
                out.pkid.unwrap_or(0),
            );
        }
        true
    }

    /// The connection ended without DISCONNECT: publish the will as if the client had.
    async fn publish_will(&mut self, will: &LastWill) {
        let Ok(topic) = std::str::from_utf8(&will.topic) else {
            return;
        };
        let topic = topic.to_owned();
        let retain = will.retain
            && self
                .may_publish(&topic, true, will.message.len())
                .is_allowed();
        // A will has no one to acknowledge it to.
        let _ = self
            .route(&topic, will.message.clone(), will.qos as u8, retain)
            .await;
    }

    fn violation(&self, detail: &str) -> End {
        self.front
            .protocol_violation(&self.admitted.identity.principal, detail);
        End::Protocol
    }
}

/// Output to the client, written in batches; a client whose socket accepts nothing for
/// `timeout` has stopped reading and is cut off.
struct Outbox<'a, W> {
    writer: &'a mut W,
    pending: BytesMut,
    timeout: Duration,
}

impl<W> Outbox<'_, W> {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }
}

impl<W: AsyncWrite + Unpin> Outbox<'_, W> {
    async fn flush(&mut self) -> Result<(), End> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let write = async {
            self.writer.write_all(&self.pending).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => {
                // Keep no burst-sized buffer on an idle connection.
                if self.pending.capacity() > OUTPUT_CHUNK {
                    self.pending = BytesMut::new();
                } else {
                    self.pending.clear();
                }
                Ok(())
            }
            Ok(Err(_)) => Err(End::ClientClosed),
            Err(_) => Err(End::SlowClient),
        }
    }
}
