//! The TLS front: the only way in.
//!
//! For every accepted socket, in its own task (a slow or idle client delays nobody else), once
//! it holds a connection slot and one of its source address's handshake slots ([`sources`]):
//! 1. TLS handshake, bounded by `handshake_timeout_ms`; on the mTLS listener the client
//!    certificate is verified by [`crate::pki`] (chain, validity, clientAuth, key strength);
//! 2. the MQTT CONNECT must follow within `connect_timeout_ms`;
//! 3. [`identity::Authenticator`] decides role and device id, or refuses with a reason;
//! 4. the connection is served by role:
//!    - bootstrap and device clients by the front itself (`served`): their subscriptions and
//!      queued messages live in [`crate::mailbox`], what they publish for the gateway goes to
//!      its inbox, and what others may see goes to the broker through [`crate::broker::Fanout`]:
//!      one socket per device, and nothing per device in the broker's router;
//!    - admins are relayed to the broker (`relay`), which fans out to their wildcards.
//!
//! Every PUBLISH and SUBSCRIBE is checked against [`rules::allowed`]; denied filters get
//! SUBACK 0x80, a denied publish closes the connection. Refusals that name no one are audited
//! in aggregate ([`tally`]).

pub mod codec;
pub mod identity;
mod relay;
pub mod rules;
mod served;
pub mod session;
pub mod sources;
pub mod tally;
pub mod window;

pub use served::MAX_SUBSCRIPTIONS;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::audit::Auditor;
use crate::broker::Fanout;
use crate::mailbox::Mailboxes;
use crate::metrics::Metrics;
use crate::pki::{Pki, Role};
use crate::store::{AuditEvent, FactoryIdentity};
use codec::CodecError;
use identity::{Authenticator, Identity, Listener, Refusal, RefusalReason};
use rules::Action;
use session::Sessions;
use sources::HandshakeSlots;
use tally::RefusalTally;

/// Read buffer per direction of a relayed (admin) connection.
const READ_BUFFER: usize = 16 * 1024;
/// First read buffer of a connection (a CONNECT is small; it grows for a larger one).
const CONNECT_BUFFER: usize = 1024;

/// A message a device published for the gateway itself (enrollment request, config ack,
/// firmware status, renewal). The topic names the sender: the front lets only device D
/// publish under `enroll/D/` and `devices/D/`.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// The factory certificate of the bootstrap connection that published it (enrollment
    /// requests): it travels with the request, so a request is judged by the certificate it
    /// came through, whatever connects under the same id meanwhile.
    pub factory: Option<FactoryIdentity>,
}

/// What the rest of the gateway wants to hear from the front.
#[async_trait::async_trait]
pub trait FrontHooks: Send + Sync + 'static {
    /// A device that is awaiting activation published its first report over its new credential.
    /// Awaited before the report is acknowledged. `false` when the activation could not be
    /// written (the store is down; it is queued in memory): the report is then not
    /// acknowledged, so the device sends it again when it reconnects, and a crash before the
    /// store is back loses nothing the device was told.
    async fn device_reported(&self, device_id: &str, serial: &str) -> bool;
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
    /// Sessions of the bootstrap and device clients the front serves.
    pub mailboxes: Arc<Mailboxes>,
    /// Where device publishes go for admins and back-ends to see.
    pub fanout: Fanout,
    /// The gateway's own topics (bounded: a full inbox makes publishers wait).
    pub inbox: mpsc::Sender<Inbound>,
    /// The broker's internal listeners (admins only) and the secret they accept.
    pub broker_addrs: Vec<SocketAddr>,
    pub broker_secret: Arc<str>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// A client whose socket accepts nothing for this long has stopped reading.
    pub write_timeout: Duration,
    /// Largest packet a client may send.
    pub max_packet: usize,
    /// Largest retained message a device may publish (on `devices/D/state` only).
    pub max_retained: usize,
    /// Bounds concurrent connections (both listeners).
    pub connection_slots: Arc<Semaphore>,
    /// Bounds the handshakes one source address has in progress (both listeners).
    pub handshakes: Arc<HandshakeSlots>,
    /// Where refusals that name no one are counted, to be audited once per reason and window.
    pub anonymous_refusals: Arc<RefusalTally>,
}

impl Front {
    /// Accept connections on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        shutdown: CancellationToken,
    ) {
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
            let Some(handshake) = self.handshakes.try_acquire(remote.ip()) else {
                drop(tcp);
                self.refused(
                    &Refusal::new(
                        RefusalReason::TooManyHandshakes,
                        None,
                        "too many handshakes in progress from this address",
                    ),
                    remote,
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let front = self.clone();
            // Taken at every accept: a reload (SIGHUP) applies to the next handshake.
            let acceptor = TlsAcceptor::from(match kind {
                Listener::Mtls => self.pki.mtls_server_config(),
                Listener::Password => self.pki.tls_server_config(),
            });
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                front
                    .connection(tcp, remote, acceptor, kind, handshake, shutdown)
                    .await;
                drop(permit);
            });
        }
    }

    /// Count a refusal, and audit it: on its own when it names someone, in the window's tally
    /// when it names no one.
    fn refused(&self, refusal: &Refusal, remote: SocketAddr) {
        let reason = refusal.reason.as_str();
        self.metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
        if refusal.is_anonymous() {
            tracing::debug!(%remote, reason, detail = %refusal.detail, "connection refused");
            self.anonymous_refusals.count(refusal.reason, remote);
            return;
        }
        tracing::info!(%remote, reason, device_id = refusal.claimed_id.as_deref().unwrap_or("-"), detail = %refusal.detail, "connection refused");
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
        handshake: sources::HandshakeSlot,
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
        let mut buf = BytesMut::with_capacity(CONNECT_BUFFER);

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
                drop(handshake);
                let _ = client_wr
                    .write_all(&codec::connack(refusal.reason.connack_code()))
                    .await;
                let _ = client_wr.shutdown().await;
                self.refused(&refusal, remote);
                return;
            }
        };

        drop(handshake);
        let role = identity.principal.role;
        let factory = match (role, peer.as_ref()) {
            (Role::Bootstrap, Some(peer)) => Some(FactoryIdentity {
                issuer: peer.issuer.clone(),
                serial: peer.serial.clone(),
            }),
            _ => None,
        };
        let admitted = Admitted {
            identity,
            packet,
            remote,
            factory,
            kill: shutdown.child_token(),
        };
        let identity = &admitted.identity;
        let _registered = self.sessions.register(
            &identity.principal.id,
            role,
            &identity.serial,
            admitted.kill.clone(),
        );
        let gauge = self.metrics.connections.with_label_values(&[role.as_str()]);
        gauge.inc();
        tracing::debug!(device_id = %identity.principal.id, role = role.as_str(), remote = %admitted.remote, "client connected");
        if identity.first_use {
            self.hooks
                .credential_first_use(&identity.principal.id, &identity.serial);
        }
        let end = match role {
            Role::Admin => self.relay(&admitted, client_rd, &mut client_wr, buf).await,
            Role::Bootstrap | Role::Device => {
                self.serve_session(&admitted, client_rd, &mut client_wr, buf)
                    .await
            }
        };
        gauge.dec();
        self.ended(identity, &end);
        let _ = tokio::time::timeout(Duration::from_secs(1), client_wr.shutdown()).await;
    }

    /// Log (and count) how a connection ended where that tells an operator something.
    fn ended(&self, identity: &Identity, end: &End) {
        let (id, role) = (&identity.principal.id, identity.principal.role.as_str());
        tracing::debug!(device_id = %id, role, end = ?end, "connection ended");
        match end {
            End::Denied(topic, why) => {
                tracing::info!(device_id = %id, role, topic, why, "publish denied; connection closed");
            }
            End::SlowClient => {
                self.metrics.slow_client_disconnects.inc();
                tracing::info!(device_id = %id, role, "client stopped reading; connection closed");
                self.audit.record(AuditEvent::new(
                    id,
                    "slow_client",
                    role,
                    serde_json::json!({ "detail": "stopped reading; disconnected" }),
                ));
            }
            _ => {}
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
        tracing::info!(device_id = %who.id, role = who.role.as_str(), detail, "protocol violation; connection closed");
        self.audit.record(AuditEvent::new(
            &who.id,
            "protocol_violation",
            who.role.as_str(),
            serde_json::json!({ "detail": detail }),
        ));
    }
}

/// A connection that passed authentication, about to be served.
struct Admitted {
    identity: Identity,
    packet: codec::ConnectPacket,
    remote: SocketAddr,
    /// A bootstrap connection's factory certificate.
    factory: Option<FactoryIdentity>,
    /// Cancelled to disconnect it (revocation, session take-over, shutdown).
    kill: CancellationToken,
}

#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT (no will).
    Disconnected,
    ClientClosed,
    BrokerClosed,
    /// The client stopped reading what it was sent.
    SlowClient,
    Protocol,
    Denied(String, &'static str),
    Killed,
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
        if buf.capacity() == buf.len() {
            buf.reserve(CONNECT_BUFFER);
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}
