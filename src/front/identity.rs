//! The one place where a connection's identity is decided: role and device id from the client
//! certificate (or the password credential), checked against the CONNECT and the inventory.
//! Every refusal has a typed reason, which becomes the `reason` label of
//! `onboard_auth_failures_total` and the detail of the `auth_refused` audit event.

use std::sync::Arc;

use regex::Regex;

use super::codec::{connack, ConnectPacket};
use super::rules::{self, Action, Principal};
use crate::config::EnrollmentMode;
use crate::metrics::Metrics;
use crate::pki::{CertRefusal, CertRefusalReason, PeerCert, Role};
use crate::store::{CredentialKind, DeviceState, Store, StoreError};

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Client certificate required.
    Mtls,
    /// TLS without client certificate; username/password in CONNECT.
    Password,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    Certificate(CertRefusalReason),
    TlsHandshake,
    HandshakeTimeout,
    ConnectTimeout,
    ProtocolError,
    UnsupportedProtocol,
    ClientIdMismatch,
    InvalidDeviceId,
    UnknownCredential,
    CredentialRevoked,
    DeviceRevoked,
    BadPassword,
    NotAllowlisted,
    WillTopicDenied,
    StoreUnavailable,
    TooManyConnections,
    /// The source address already has `[limits] max_handshakes_per_source` in progress.
    TooManyHandshakes,
    BrokerRefused,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 24] = [
        RefusalReason::Certificate(CertRefusalReason::NoCertificate),
        RefusalReason::Certificate(CertRefusalReason::UnknownCa),
        RefusalReason::Certificate(CertRefusalReason::Expired),
        RefusalReason::Certificate(CertRefusalReason::NotYetValid),
        RefusalReason::Certificate(CertRefusalReason::MissingClientAuth),
        RefusalReason::Certificate(CertRefusalReason::WeakKey),
        RefusalReason::Certificate(CertRefusalReason::Malformed),
        RefusalReason::TlsHandshake,
        RefusalReason::HandshakeTimeout,
        RefusalReason::ConnectTimeout,
        RefusalReason::ProtocolError,
        RefusalReason::UnsupportedProtocol,
        RefusalReason::ClientIdMismatch,
        RefusalReason::InvalidDeviceId,
        RefusalReason::UnknownCredential,
        RefusalReason::CredentialRevoked,
        RefusalReason::DeviceRevoked,
        RefusalReason::BadPassword,
        RefusalReason::NotAllowlisted,
        RefusalReason::WillTopicDenied,
        RefusalReason::StoreUnavailable,
        RefusalReason::TooManyConnections,
        RefusalReason::TooManyHandshakes,
        RefusalReason::BrokerRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Certificate(reason) => reason.as_str(),
            RefusalReason::TlsHandshake => "tls_handshake",
            RefusalReason::HandshakeTimeout => "handshake_timeout",
            RefusalReason::ConnectTimeout => "connect_timeout",
            RefusalReason::ProtocolError => "protocol_error",
            RefusalReason::UnsupportedProtocol => "unsupported_protocol",
            RefusalReason::ClientIdMismatch => "client_id_mismatch",
            RefusalReason::InvalidDeviceId => "invalid_device_id",
            RefusalReason::UnknownCredential => "unknown_credential",
            RefusalReason::CredentialRevoked => "credential_revoked",
            RefusalReason::DeviceRevoked => "device_revoked",
            RefusalReason::BadPassword => "bad_password",
            RefusalReason::NotAllowlisted => "not_allowlisted",
            RefusalReason::WillTopicDenied => "will_topic_denied",
            RefusalReason::StoreUnavailable => "store_unavailable",
            RefusalReason::TooManyConnections => "too_many_connections",
            RefusalReason::TooManyHandshakes => "too_many_handshakes",
            RefusalReason::BrokerRefused => "broker_refused",
        }
    }

    /// CONNACK return code sent for this refusal (when it happens after the TLS handshake).
    pub fn connack_code(self) -> u8 {
        match self {
            RefusalReason::UnsupportedProtocol => connack::BAD_PROTOCOL_VERSION,
            RefusalReason::BadPassword => connack::BAD_USERNAME_OR_PASSWORD,
            RefusalReason::StoreUnavailable
            | RefusalReason::TooManyConnections
            | RefusalReason::TooManyHandshakes => connack::SERVER_UNAVAILABLE,
            _ => connack::NOT_AUTHORIZED,
        }
    }
}

/// A refused connection, with what is known of who it was.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// Device id (or admin name) claimed by the certificate or the client id, when known.
    pub claimed_id: Option<String>,
    pub detail: String,
}

/// Longest claimed (unproven) id kept in a refusal: a device id is at most 64 characters.
pub const MAX_CLAIMED_ID: usize = 64;
/// Longest refusal detail kept (it may quote what the client sent).
pub const MAX_DETAIL: usize = 256;

/// `text` cut to at most `max` characters, marked with `…` when it was longer: whatever a
/// client claims before it is authenticated is echoed (audit rows, event topics, logs) only
/// this long.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

impl Refusal {
    pub fn new(reason: RefusalReason, claimed_id: Option<&str>, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            claimed_id: claimed_id.map(|id| clip(id, MAX_CLAIMED_ID)),
            detail: clip(&detail.into(), MAX_DETAIL),
        }
    }
}

impl Refusal {
    /// Whether the refusal names no one (no certificate subject, no client id): what a scanner
    /// or a flood produces. Such refusals are audited in aggregate.
    pub fn is_anonymous(&self) -> bool {
        self.claimed_id.is_none()
    }
}

impl From<CertRefusal> for Refusal {
    fn from(r: CertRefusal) -> Self {
        let reason = match r.reason {
            // A revoked admin certificate is a revoked credential like any other.
            CertRefusalReason::Revoked => RefusalReason::CredentialRevoked,
            other => RefusalReason::Certificate(other),
        };
        Refusal::new(reason, r.subject_cn.as_deref(), r.detail)
    }
}

/// An authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: Principal,
    /// Serial of the credential used: factory certificate (bootstrap), operational certificate
    /// or password credential (device), admin certificate (admin).
    pub serial: String,
    /// The device is `enrolling` and this is the credential its activation waits for.
    pub awaiting_activation: bool,
    /// First connect with this credential (a renewed certificate taking over).
    pub first_use: bool,
}

/// Decides identities. Shared by every connection.
pub struct Authenticator {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub device_id_pattern: Regex,
    pub mode: EnrollmentMode,
}

fn unavailable(id: &str, e: StoreError) -> Refusal {
    Refusal::new(RefusalReason::StoreUnavailable, Some(id), e.to_string())
}

impl Authenticator {
    /// Who is this CONNECT, given what the TLS layer established?
    pub async fn authenticate(
        &self,
        listener: Listener,
        peer: Option<&PeerCert>,
        packet: &ConnectPacket,
    ) -> Result<Identity, Refusal> {
        let client_id = packet.connect.client_id.as_str();
        let identity = match (listener, peer) {
            (Listener::Mtls, Some(peer)) => self.certificate(peer, client_id).await?,
            (Listener::Mtls, None) => {
                return Err(Refusal::new(
                    RefusalReason::Certificate(CertRefusalReason::NoCertificate),
                    Some(client_id),
                    "no client certificate",
                ))
            }
            (Listener::Password, _) => self.password(packet).await?,
        };
        if let Some(will) = &packet.will {
            let topic = String::from_utf8_lossy(&will.topic);
            if let rules::Decision::Deny(why) =
                rules::allowed(&identity.principal, Action::Publish, &topic)
            {
                self.metrics
                    .acl_denied
                    .with_label_values(&[identity.principal.role.as_str(), "publish"])
                    .inc();
                return Err(Refusal::new(
                    RefusalReason::WillTopicDenied,
                    Some(&identity.principal.id),
                    format!("will topic {topic:?}: {why}"),
                ));
            }
        }
        Ok(identity)
    }

    fn check_device_id(&self, id: &str) -> Result<(), Refusal> {
        if self.device_id_pattern.is_match(id) {
            Ok(())
        } else {
            Err(Refusal::new(
                RefusalReason::InvalidDeviceId,
                Some(id),
                format!(
                    "device id {id:?} does not match {}",
                    self.device_id_pattern.as_str()
                ),
            ))
        }
    }

    async fn certificate(&self, peer: &PeerCert, client_id: &str) -> Result<Identity, Refusal> {
        match peer.role {
            Role::Admin => {
                let name = peer.common_name.clone().unwrap_or_default();
                if name.is_empty() {
                    return Err(Refusal::new(
                        RefusalReason::Certificate(CertRefusalReason::Malformed),
                        None,
                        "admin certificate without a common name",
                    ));
                }
                // Admin sessions live in the broker, next to the gateway's own links.
                if crate::broker::RESERVED_CLIENT_IDS.contains(&client_id) {
                    return Err(Refusal::new(
                        RefusalReason::ClientIdMismatch,
                        Some(client_id),
                        "client id reserved for the gateway's own links",
                    ));
                }
                Ok(Identity {
                    principal: Principal {
                        role: Role::Admin,
                        id: name,
                    },
                    serial: peer.serial.clone(),
                    awaiting_activation: false,
                    first_use: false,
                })
            }
            Role::Bootstrap => {
                // The device id is the CN, or a SAN, and must be the client id.
                let named = peer.common_name.as_deref() == Some(client_id)
                    || peer.alt_names.iter().any(|n| n == client_id);
                if !named {
                    let cn = peer.common_name.as_deref();
                    return Err(Refusal::new(
                        RefusalReason::ClientIdMismatch,
                        cn.or(Some(client_id)),
                        format!("client id {client_id:?} is not the certificate's CN or a SAN"),
                    ));
                }
                self.check_device_id(client_id)?;
                let device = self
                    .metrics
                    .store_op("device", self.store.device(client_id))
                    .await
                    .map_err(|e| unavailable(client_id, e))?;
                match device {
                    Some(d) if d.state == DeviceState::Revoked => {
                        return Err(Refusal::new(
                            RefusalReason::DeviceRevoked,
                            Some(client_id),
                            "device is revoked",
                        ))
                    }
                    None if self.mode == EnrollmentMode::Allowlist => {
                        return Err(Refusal::new(
                            RefusalReason::NotAllowlisted,
                            Some(client_id),
                            "allowlist mode and the device is not registered",
                        ))
                    }
                    _ => {}
                }
                Ok(Identity {
                    principal: Principal {
                        role: Role::Bootstrap,
                        id: client_id.to_owned(),
                    },
                    serial: peer.serial.clone(),
                    awaiting_activation: false,
                    first_use: false,
                })
            }
            Role::Device => {
                let cn = peer.common_name.as_deref().unwrap_or_default();
                if cn != client_id {
                    return Err(Refusal::new(
                        RefusalReason::ClientIdMismatch,
                        Some(cn),
                        format!("client id {client_id:?} is not the certificate's CN {cn:?}"),
                    ));
                }
                self.check_device_id(cn)?;
                self.operational(cn, &peer.serial, CredentialKind::Certificate)
                    .await
            }
        }
    }

    /// Checks shared by operational certificates and passwords: the credential is ours, of
    /// this device, unrevoked, and the device is not revoked.
    async fn operational(
        &self,
        device_id: &str,
        serial: &str,
        kind: CredentialKind,
    ) -> Result<Identity, Refusal> {
        let (credential, device) = self
            .metrics
            .store_op(
                "credential_and_device",
                self.store.credential_and_device(serial, device_id),
            )
            .await
            .map_err(|e| unavailable(device_id, e))?;
        let Some(credential) = credential.filter(|c| c.device_id == device_id && c.kind == kind)
        else {
            return Err(Refusal::new(
                RefusalReason::UnknownCredential,
                Some(device_id),
                format!("credential {serial} is not in the inventory for this device"),
            ));
        };
        if credential.is_revoked() {
            return Err(Refusal::new(
                RefusalReason::CredentialRevoked,
                Some(device_id),
                format!(
                    "credential {serial} revoked: {}",
                    credential
                        .revoke_reason
                        .as_deref()
                        .unwrap_or("no reason recorded")
                ),
            ));
        }
        let device = device.ok_or_else(|| {
            Refusal::new(
                RefusalReason::UnknownCredential,
                Some(device_id),
                "unknown device",
            )
        })?;
        if device.state == DeviceState::Revoked {
            return Err(Refusal::new(
                RefusalReason::DeviceRevoked,
                Some(device_id),
                "device is revoked",
            ));
        }
        let awaiting_activation = device.state == DeviceState::Enrolling
            && device.current_serial.as_deref() == Some(serial);
        Ok(Identity {
            principal: Principal {
                role: Role::Device,
                id: device_id.to_owned(),
            },
            serial: serial.to_owned(),
            awaiting_activation,
            first_use: credential.activated_at.is_none() && !awaiting_activation,
        })
    }

    async fn password(&self, packet: &ConnectPacket) -> Result<Identity, Refusal> {
        let client_id = packet.connect.client_id.as_str();
        let Some(login) = &packet.login else {
            return Err(Refusal::new(
                RefusalReason::BadPassword,
                Some(client_id),
                "no username/password in CONNECT",
            ));
        };
        if login.username != client_id {
            return Err(Refusal::new(
                RefusalReason::ClientIdMismatch,
                Some(&login.username),
                format!(
                    "username {:?} is not the client id {client_id:?}",
                    login.username
                ),
            ));
        }
        self.check_device_id(client_id)?;
        let credentials = self
            .metrics
            .store_op("credentials_of", self.store.credentials_of(client_id))
            .await
            .map_err(|e| unavailable(client_id, e))?;
        let mut has_password = false;
        let mut matching = None;
        for c in credentials
            .iter()
            .filter(|c| c.kind == CredentialKind::Password)
        {
            has_password = true;
            let ok = c
                .password_hash
                .as_deref()
                .is_some_and(|h| crate::password::verify(&login.password, h));
            // Prefer an unrevoked match; a revoked one still tells us why we refuse.
            if ok && (matching.is_none() || !c.is_revoked()) {
                matching = Some(c.serial.clone());
            }
        }
        if !has_password {
            return Err(Refusal::new(
                RefusalReason::BadPassword,
                Some(client_id),
                "the device holds no password credential",
            ));
        }
        match matching {
            None => Err(Refusal::new(
                RefusalReason::BadPassword,
                Some(client_id),
                "password does not match",
            )),
            Some(serial) => {
                self.operational(client_id, &serial, CredentialKind::Password)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
        assert_eq!(clip("ééééé", 2), "éé…");
        let long_id = "x".repeat(70_000);
        let r = Refusal::new(
            RefusalReason::BadPassword,
            Some(&long_id),
            "y".repeat(70_000),
        );
        let kept = r.claimed_id.as_deref().map(|c| c.chars().count());
        assert_eq!(kept, Some(MAX_CLAIMED_ID + 1));
        assert_eq!(r.detail.chars().count(), MAX_DETAIL + 1);
    }
}
