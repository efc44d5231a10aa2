//! The TLS front: the only way into the broker.
//!
//! For every accepted socket, in its own task (a slow or idle client delays nobody else):
//! 1. TLS handshake, bounded by `handshake_timeout_ms`; on the mTLS listener the client
//!    certificate is verified by [`crate::pki`] (chain, validity, clientAuth, key strength);
//! 2. the MQTT CONNECT must follow within `connect_timeout_ms`;
//! 3. [`identity::Authenticator`] decides role and device id, or refuses with a reason;
//! 4. a loopback connection to the broker's internal listener is opened with the per-process
//!    secret, the CONNECT is replayed with it, and the broker's CONNACK is relayed;
//! 5. then bytes are relayed both ways: every PUBLISH and SUBSCRIBE from the client is checked
//!    against [`rules::allowed`] on its way in; denied filters get SUBACK 0x80, a denied publish
//!    closes the connection. Everything else passes through untouched.

mod bootstrap;
pub mod codec;
pub mod identity;
pub mod rules;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::audit::Auditor;
use crate::metrics::Metrics;
use crate::pki::{Pki, Role};
use crate::store::AuditEvent;
use codec::{kind, CodecError, Frame};
use identity::{Authenticator, Identity, Listener, Refusal, RefusalReason};
use rules::{Action, Decision};
use session::Sessions;

/// How often a keepalive-0 client's broker session is pinged on its behalf (rumqttd has no
/// "no keepalive"; it gets the longest one and this keeps it alive).
const KEEPALIVE_ZERO_PING: Duration = Duration::from_secs(30 * 60);
/// Read buffer per direction.
const READ_BUFFER: usize = 16 * 1024;

/// What the rest of the gateway wants to hear from the front.
pub trait FrontHooks: Send + Sync + 'static {
    /// A device that is awaiting activation published its first report over its new credential.
    fn device_reported(&self, device_id: &str, serial: &str);
    /// A device connected for the first time with a credential issued by renewal.
    fn credential_first_use(&self, device_id: &str, serial: &str);
    /// An admin published a command on `admin/devices/D/...` or `admin/firmware`.
    fn admin_command(&self, admin: &str, topic: &str, payload: Bytes);
}

/// Everything a connection task needs. Shared by all of them.
pub struct Front {
    pub pki: Arc<Pki>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub audit: Auditor,
    pub sessions: Arc<Sessions>,
    pub hooks: Arc<dyn FrontHooks>,
    /// Answers the bootstrap sessions the front serves itself.
    pub enroller: Arc<crate::enroll::Enroller>,
    /// The broker's internal listeners and the secret they accept.
    pub broker_addrs: Vec<SocketAddr>,
    pub broker_secret: Arc<str>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// Largest packet a client may send.
    pub max_packet: usize,
    /// Bounds concurrent connections (both listeners).
    pub connection_slots: Arc<Semaphore>,
}

impl Front {
    /// Accept connections on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        shutdown: CancellationToken,
    ) {
        let acceptor = TlsAcceptor::from(match kind {
            Listener::Mtls => self.pki.mtls_server_config(),
            Listener::Password => self.pki.tls_server_config(),
        });
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(ok) => ok,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connection_slots.clone().try_acquire_owned() else {
                self.refused(
                    &Refusal::new(
                        RefusalReason::TooManyConnections,
                        None,
                        "connection limit reached",
                    ),
                    remote,
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let front = self.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                front
                    .connection(tcp, remote, acceptor, kind, shutdown)
                    .await;
                drop(permit);
            });
        }
    }

    fn refused(&self, refusal: &Refusal, remote: SocketAddr) {
        let reason = refusal.reason.as_str();
        self.metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
        tracing::info!(%remote, reason, id = refusal.claimed_id.as_deref().unwrap_or("-"), detail = %refusal.detail, "connection refused");
        self.audit.record(AuditEvent::new(
            refusal.claimed_id.as_deref().unwrap_or("-"),
            "auth_refused",
            "gateway",
            serde_json::json!({ "reason": reason, "detail": refusal.detail, "remote": remote.to_string() }),
        ));
    }

    async fn connection(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        listener: Listener,
        shutdown: CancellationToken,
    ) {
        let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Err(_) => {
                self.refused(
                    &Refusal::new(
                        RefusalReason::HandshakeTimeout,
                        None,
                        "TLS handshake did not complete in time",
                    ),
                    remote,
                );
                return;
            }
            Ok(Err(e)) => {
                let refusal = match crate::pki::refusal_from_tls_error(&e) {
                    Some(r) => Refusal::from(r),
                    None => Refusal::new(RefusalReason::TlsHandshake, None, e.to_string()),
                };
                self.refused(&refusal, remote);
                return;
            }
            Ok(Ok(tls)) => tls,
        };
        let peer = match (listener, tls.get_ref().1.peer_certificates()) {
            (Listener::Mtls, Some(chain)) => match self.pki.identify(chain) {
                Ok(peer) => Some(peer),
                Err(r) => {
                    self.refused(&Refusal::from(r), remote);
                    return;
                }
            },
            _ => None,
        };
        let (mut client_rd, mut client_wr) = tokio::io::split(tls);
        let mut buf = BytesMut::with_capacity(READ_BUFFER);

        // CONNECT, within its deadline.
        let first = tokio::time::timeout(
            self.connect_timeout,
            read_frame(&mut client_rd, &mut buf, self.max_packet),
        )
        .await;
        let connect_bytes = match first {
            Err(_) => {
                self.refused(
                    &Refusal::new(
                        RefusalReason::ConnectTimeout,
                        peer.as_ref().and_then(|p| p.common_name.as_deref()),
                        "no CONNECT in time",
                    ),
                    remote,
                );
                return;
            }
            Ok(Err(e)) => {
                self.refused(
                    &Refusal::new(
                        RefusalReason::ProtocolError,
                        peer.as_ref().and_then(|p| p.common_name.as_deref()),
                        e.to_string(),
                    ),
                    remote,
                );
                return;
            }
            Ok(Ok(None)) => return, // closed before sending anything
            Ok(Ok(Some(bytes))) => bytes,
        };
        let packet = match codec::parse_connect(&connect_bytes) {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    CodecError::ProtocolLevel(_) => RefusalReason::UnsupportedProtocol,
                    _ => RefusalReason::ProtocolError,
                };
                let refusal = Refusal::new(
                    reason,
                    peer.as_ref().and_then(|p| p.common_name.as_deref()),
                    e.to_string(),
                );
                let _ = client_wr
                    .write_all(&codec::connack(reason.connack_code()))
                    .await;
                let _ = client_wr.shutdown().await;
                self.refused(&refusal, remote);
                return;
            }
        };
        let identity = match self
            .auth
            .authenticate(listener, peer.as_ref(), &packet)
            .await
        {
            Ok(identity) => identity,
            Err(refusal) => {
                let _ = client_wr
                    .write_all(&codec::connack(refusal.reason.connack_code()))
                    .await;
                let _ = client_wr.shutdown().await;
                self.refused(&refusal, remote);
                return;
            }
        };

        if identity.principal.role == Role::Bootstrap && Self::serves_bootstrap(&packet) {
            let kill = shutdown.child_token();
            let _session = self.sessions.register(
                &identity.principal.id,
                Role::Bootstrap,
                &identity.serial,
                kill.clone(),
            );
            let gauge = self
                .metrics
                .connections
                .with_label_values(&[Role::Bootstrap.as_str()]);
            gauge.inc();
            let end = self
                .bootstrap_session(
                    &identity,
                    client_rd,
                    &mut client_wr,
                    buf,
                    packet.connect.keep_alive,
                    kill,
                )
                .await;
            gauge.dec();
            if let End::Denied(topic, why) = &end {
                tracing::info!(id = %identity.principal.id, role = "bootstrap", topic, why, "publish denied; connection closed");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), client_wr.shutdown()).await;
            return;
        }

        // Hand-off to the broker.
        let broker = match self.open_broker(&packet).await {
            Ok(b) => b,
            Err((code, detail)) => {
                let _ = client_wr.write_all(&codec::connack(code)).await;
                let _ = client_wr.shutdown().await;
                self.refused(
                    &Refusal::new(
                        RefusalReason::BrokerRefused,
                        Some(&identity.principal.id),
                        detail,
                    ),
                    remote,
                );
                return;
            }
        };
        let (broker_stream, connack, broker_pending) = broker;
        if client_wr.write_all(&connack).await.is_err() {
            return;
        }

        let role = identity.principal.role;
        let kill = shutdown.child_token();
        let _session =
            self.sessions
                .register(&identity.principal.id, role, &identity.serial, kill.clone());
        let gauge = self.metrics.connections.with_label_values(&[role.as_str()]);
        gauge.inc();
        if identity.first_use {
            self.hooks
                .credential_first_use(&identity.principal.id, &identity.serial);
        }
        let keepalive_zero = packet.connect.keep_alive == 0;
        let (broker_rd, broker_wr) = broker_stream.into_split();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let end = tokio::select! {
            _ = kill.cancelled() => End::Killed,
            end = self.client_to_broker(&identity, client_rd, broker_wr, buf, ctl_tx, keepalive_zero) => end,
            end = broker_to_client(broker_rd, &mut client_wr, ctl_rx, broker_pending, self.max_packet.max(1 << 20)) => end,
        };
        gauge.dec();
        if let End::Denied(topic, why) = &end {
            tracing::info!(id = %identity.principal.id, role = role.as_str(), topic, why, "publish denied; connection closed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), client_wr.shutdown()).await;
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
        mut broker: W,
        mut buf: BytesMut,
        ctl: mpsc::UnboundedSender<Control>,
        keepalive_zero: bool,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let who = &identity.principal;
        let mut awaiting_activation = identity.awaiting_activation;
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
                        if awaiting_activation && rules::is_activation_report(&who.id, topic) {
                            awaiting_activation = false;
                            self.hooks.device_reported(&who.id, &identity.serial);
                        }
                        if who.role == Role::Admin && rules::is_admin_command(topic) {
                            let payload = Bytes::copy_from_slice(&bytes[payload_at..]);
                            self.hooks.admin_command(&who.id, topic, payload);
                        }
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
                                let _ = ctl.send(Control::MaskSuback(pkid, verdicts));
                                if broker.write_all(&sub).await.is_err() {
                                    return End::BrokerClosed;
                                }
                            }
                            None => {
                                let codes = vec![codec::SUBACK_FAILURE; verdicts.len()];
                                let _ = ctl.send(Control::Inject(codec::suback(pkid, &codes)));
                            }
                        }
                        let _ = buf.split_to(pass + frame_len);
                        pass = 0;
                    }
                    kind::CONNECT => {
                        self.protocol_violation(who, "second CONNECT");
                        return End::Protocol;
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
                _ = pinger.tick(), if keepalive_zero => {
                    let _ = ctl.send(Control::SwallowPingResp);
                    if broker.write_all(&codec::PINGREQ).await.is_err() {
                        return End::BrokerClosed;
                    }
                }
            }
        }
    }

    fn denied(&self, who: &rules::Principal, action: Action, topic: &str, why: &str) {
        self.metrics
            .acl_denied
            .with_label_values(&[who.role.as_str(), action.as_str()])
            .inc();
        self.audit.record(AuditEvent::new(
            &who.id,
            "acl_denied",
            who.role.as_str(),
            serde_json::json!({ "action": action.as_str(), "topic": topic, "reason": why }),
        ));
    }

    fn protocol_violation(&self, who: &rules::Principal, detail: &str) {
        tracing::info!(id = %who.id, detail, "protocol violation; connection closed");
        self.audit.record(AuditEvent::new(
            &who.id,
            "protocol_violation",
            who.role.as_str(),
            serde_json::json!({ "detail": detail }),
        ));
    }
}

/// Messages from the client-to-broker half to the broker-to-client half of one connection.
#[derive(Debug)]
enum Control {
    /// The SUBSCRIBE with this packet id was forwarded without its denied filters: merge
    /// failures into the broker's SUBACK (`true` = forwarded).
    MaskSuback(u16, Vec<bool>),
    /// Send this frame to the client between two broker frames.
    Inject(Bytes),
    /// A PINGREQ was sent on the client's behalf: drop one PINGRESP.
    SwallowPingResp,
}

#[derive(Debug)]
enum End {
    ClientClosed,
    BrokerClosed,
    Protocol,
    Denied(String, &'static str),
    Killed,
}

/// Relay broker -> client, whole frames only (so frames can be injected between them).
async fn broker_to_client<R, W>(
    mut broker: R,
    client: &mut W,
    mut ctl: mpsc::UnboundedReceiver<Control>,
    pending: BytesMut,
    max_packet: usize,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = pending;
    buf.reserve(READ_BUFFER * 4);
    // Bytes that came with the CONNACK are relayed before anything else is read.
    let mut first = !buf.is_empty();
    let mut masks: HashMap<u16, Vec<bool>> = HashMap::new();
    let mut swallow_pings = 0usize;
    let mut ctl_open = true;
    loop {
        tokio::select! {
            _ = std::future::ready(()), if first => first = false,
            read = broker.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return End::BrokerClosed,
                Ok(_) => {}
            },
            msg = ctl.recv(), if ctl_open => {
                match msg {
                    Some(Control::Inject(frame)) => {
                        if client.write_all(&frame).await.is_err() {
                            return End::ClientClosed;
                        }
                    }
                    Some(Control::MaskSuback(pkid, verdicts)) => { masks.insert(pkid, verdicts); }
                    Some(Control::SwallowPingResp) => swallow_pings += 1,
                    None => ctl_open = false,
                }
                continue;
            }
        }
        // Control messages sent before the broker's answer must be seen before it.
        while let Ok(msg) = ctl.try_recv() {
            match msg {
                Control::Inject(frame) => {
                    if client.write_all(&frame).await.is_err() {
                        return End::ClientClosed;
                    }
                }
                Control::MaskSuback(pkid, verdicts) => {
                    masks.insert(pkid, verdicts);
                }
                Control::SwallowPingResp => swallow_pings += 1,
            }
        }
        let mut pass = 0;
        loop {
            let frame: Frame = match codec::frame(&buf[pass..], max_packet) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return End::Protocol,
            };
            let rewrite = match frame.kind() {
                kind::SUBACK if !masks.is_empty() => {
                    let bytes = &buf[pass..pass + frame.len];
                    match codec::parse_suback(bytes, &frame) {
                        Ok((pkid, codes)) => masks
                            .remove(&pkid)
                            .and_then(|verdicts| codec::merge_suback(&verdicts, codes))
                            .map(|merged| Some(codec::suback(pkid, &merged))),
                        Err(_) => None,
                    }
                }
                kind::PINGRESP if swallow_pings > 0 => {
                    swallow_pings -= 1;
                    Some(None)
                }
                _ => None,
            };
            match rewrite {
                None => pass += frame.len,
                Some(replacement) => {
                    if client.write_all(&buf[..pass]).await.is_err() {
                        return End::ClientClosed;
                    }
                    if let Some(bytes) = replacement {
                        if client.write_all(&bytes).await.is_err() {
                            return End::ClientClosed;
                        }
                    }
                    let _ = buf.split_to(pass + frame.len);
                    pass = 0;
                }
            }
        }
        if pass > 0 {
            let chunk = buf.split_to(pass);
            if client.write_all(&chunk).await.is_err() {
                return End::ClientClosed;
            }
        }
        if buf.capacity() - buf.len() < READ_BUFFER {
            buf.reserve(READ_BUFFER * 4);
        }
    }
}

/// Read one whole frame: `Ok(None)` if the peer closed before sending one.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Bytes>, CodecError> {
    loop {
        if let Some(frame) = codec::frame(buf, max)? {
            return Ok(Some(buf.split_to(frame.len).freeze()));
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}
