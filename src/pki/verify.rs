//! Client certificate verification: the trust domains (factory, operational, admin), the
//! rustls `ClientCertVerifier`, and the classification of verified chains.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::issue::{check_key, fingerprint, serial_hex};
use super::verified::{self, VerifiedCerts};
use super::{CertRefusal, CertRefusalReason, PeerCert, RevokedAdmins, Role};

/// Intermediates followed at most when looking for the issuing CA of a chain.
const MAX_CHAIN_DEPTH: usize = 6;

/// The CAs of the three trust domains, parsed once.
#[derive(Debug)]
pub(crate) struct TrustStore {
    /// Subject DN (DER, with its SEQUENCE) of every CA -> the role it grants.
    by_subject: HashMap<Vec<u8>, Role>,
    /// Subject DN of every CA, as text (what a device's factory issuer binding records).
    names: HashMap<Vec<u8>, String>,
    /// Trust anchors of each domain.
    anchors: HashMap<Role, Vec<TrustAnchor<'static>>>,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Admin certificates that may no longer connect (`[pki] admin_crl`).
    revoked_admins: RevokedAdmins,
    /// Certificates that passed [`Self::verify`] with this store.
    verified: VerifiedCerts,
}

impl TrustStore {
    /// Build from the CA certificates of each domain. Errors name the offending certificate
    /// (domain, index) when two domains share a subject DN or a certificate cannot be a root.
    pub(crate) fn new(
        domains: &[(Role, &[CertificateDer<'static>])],
    ) -> Result<TrustStore, String> {
        let mut by_subject: HashMap<Vec<u8>, Role> = HashMap::new();
        let mut names: HashMap<Vec<u8>, String> = HashMap::new();
        let mut anchors: HashMap<Role, Vec<TrustAnchor<'static>>> = HashMap::new();
        let mut hints = Vec::new();
        for (role, certs) in domains {
            for (i, cert) in certs.iter().enumerate() {
                let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
                    .map_err(|e| format!("{} CA certificate #{}: {e}", role.as_str(), i + 1))?;
                let subject = parsed.subject().as_raw().to_vec();
                match by_subject.get(&subject) {
                    Some(other) if other != role => {
                        return Err(format!(
                            "{} CA certificate #{} has the subject {} of a {} CA; the role is \
                             decided by the issuer, so CA subjects must differ",
                            role.as_str(),
                            i + 1,
                            parsed.subject(),
                            other.as_str()
                        ));
                    }
                    Some(_) => {}
                    None => {
                        hints.push(DistinguishedName::from(subject.clone()));
                        names.insert(subject.clone(), parsed.subject().to_string());
                        by_subject.insert(subject, *role);
                    }
                }
                let anchor = webpki::anchor_from_trusted_cert(cert)
                    .map_err(|e| {
                        format!(
                            "{} CA certificate #{}: not a usable root: {e}",
                            role.as_str(),
                            i + 1
                        )
                    })?
                    .to_owned();
                anchors.entry(*role).or_default().push(anchor);
            }
        }
        Ok(TrustStore {
            by_subject,
            names,
            anchors,
            hints,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            revoked_admins: RevokedAdmins::default(),
            verified: VerifiedCerts::default(),
        })
    }

    /// The same store, refusing the admin certificates on `revoked`.
    pub(crate) fn with_revoked_admins(self, revoked: RevokedAdmins) -> TrustStore {
        TrustStore {
            revoked_admins: revoked,
            ..self
        }
    }

    pub(crate) fn revoked_admins(&self) -> &RevokedAdmins {
        &self.revoked_admins
    }

    /// Refuse an admin certificate on the revocation list.
    fn check_revocation(
        &self,
        role: Role,
        leaf: &X509Certificate<'_>,
        cn: &Option<String>,
    ) -> Result<(), CertRefusal> {
        let serial = serial_hex(leaf.raw_serial());
        if role == Role::Admin && self.revoked_admins.contains(&serial) {
            let detail = format!("admin certificate {serial} is on the admin revocation list");
            return Err(refusal(CertRefusalReason::Revoked, cn.clone(), detail));
        }
        Ok(())
    }

    /// Role of the CA that issued `leaf`, following `intermediates` up to a known CA, and
    /// that CA's subject DN.
    fn role_of<'c>(
        &'c self,
        leaf: &X509Certificate<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<(Role, &'c str)> {
        let mut issuer = leaf.issuer().as_raw();
        for _ in 0..MAX_CHAIN_DEPTH {
            if let Some(role) = self.by_subject.get(issuer) {
                let name = self.names.get(issuer).map_or("", String::as_str);
                return Some((*role, name));
            }
            // Walk up through a supplied intermediate whose subject is this issuer.
            let next = intermediates.iter().find_map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
                (cert.tbs_certificate.subject.as_raw() == issuer)
                    .then_some(cert.tbs_certificate.issuer.as_raw())
            })?;
            if next == issuer {
                return None;
            }
            issuer = next;
        }
        None
    }

    /// Parse the leaf and pick the trust domain of its issuer: the first step of both
    /// [`Self::verify`] (during the handshake) and [`Self::identify`] (after it).
    fn classify<'a>(
        &self,
        end_entity: &'a CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(X509Certificate<'a>, Option<String>, Role, String), CertRefusal> {
        let leaf = match x509_parser::parse_x509_certificate(end_entity.as_ref()) {
            Ok((_, leaf)) => leaf,
            Err(e) => {
                return Err(refusal(
                    CertRefusalReason::Malformed,
                    None,
                    format!("certificate does not parse: {e}"),
                ))
            }
        };
        let cn = common_name(&leaf);
        let Some((role, issuer)) = self.role_of(&leaf, intermediates) else {
            let detail = format!("issuer {} is none of our CAs", leaf.issuer());
            return Err(refusal(CertRefusalReason::UnknownCa, cn, detail));
        };
        let issuer = issuer.to_owned();
        Ok((leaf, cn, role, issuer))
    }

    /// Full verification of a client chain; returns the role it grants.
    pub(crate) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Role, CertRefusal> {
        let (leaf, cn, role, _) = self.classify(end_entity, intermediates)?;
        self.check_revocation(role, &leaf, &cn)?;
        let remembered = intermediates
            .is_empty()
            .then(|| verified::key(end_entity.as_ref()));
        if remembered.is_some_and(|key| self.verified.holds(&key, role, now)) {
            return Ok(role);
        }
        let anchors = self.anchors.get(&role).map(Vec::as_slice).unwrap_or(&[]);
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            refusal(
                CertRefusalReason::Malformed,
                cn.clone(),
                format!("certificate is not acceptable: {e}"),
            )
        })?;
        ee.verify_for_usage(
            self.algorithms.all,
            anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            refusal(
                webpki_reason(&e),
                cn.clone(),
                format!("{} certificate: {e}", role.as_str()),
            )
        })?;
        let client_auth = match leaf.extended_key_usage() {
            Ok(Some(eku)) => eku.value.client_auth,
            Ok(None) => false,
            Err(e) => {
                return Err(refusal(
                    CertRefusalReason::Malformed,
                    cn,
                    format!("bad extended key usage extension: {e}"),
                ))
            }
        };
        if !client_auth {
            return Err(refusal(
                CertRefusalReason::MissingClientAuth,
                cn,
                "certificate has no clientAuth extended key usage".into(),
            ));
        }
        check_key(leaf.public_key())
            .map_err(|detail| refusal(CertRefusalReason::WeakKey, cn, detail))?;
        if let Some(key) = remembered {
            let validity = leaf.validity();
            self.verified.remember(
                key,
                role,
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            );
        }
        Ok(role)
    }

    /// Classify a chain the handshake already verified.
    pub(crate) fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<PeerCert, CertRefusal> {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err(refusal(
                CertRefusalReason::NoCertificate,
                None,
                "no client certificate".into(),
            ));
        };
        let (leaf, common_name, role, issuer) = self.classify(end_entity, intermediates)?;
        self.check_revocation(role, &leaf, &common_name)?;
        // A resumed TLS session carries the certificate of the handshake that created it,
        // unverified since: its validity must hold now, on every connection.
        let validity = leaf.validity();
        let now = time::OffsetDateTime::now_utc();
        if now > validity.not_after.to_datetime() {
            let detail = format!("certificate expired at {}", validity.not_after);
            return Err(refusal(CertRefusalReason::Expired, common_name, detail));
        }
        if now < validity.not_before.to_datetime() {
            let detail = format!("certificate not valid before {}", validity.not_before);
            return Err(refusal(CertRefusalReason::NotYetValid, common_name, detail));
        }
        let mut alt_names = Vec::new();
        if let Ok(Some(san)) = leaf.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) | GeneralName::URI(n) => alt_names.push(n.to_string()),
                    _ => {}
                }
            }
        }
        Ok(PeerCert {
            role,
            common_name,
            alt_names,
            serial: serial_hex(leaf.raw_serial()),
            fingerprint: fingerprint(end_entity.as_ref()),
            not_after: leaf.validity().not_after.to_datetime(),
            issuer,
        })
    }
}

fn refusal(reason: CertRefusalReason, subject_cn: Option<String>, detail: String) -> CertRefusal {
    CertRefusal {
        reason,
        subject_cn,
        detail,
    }
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// What a webpki path-building error means for the client.
fn webpki_reason(error: &webpki::Error) -> CertRefusalReason {
    use webpki::Error as E;
    match error {
        E::CertExpired { .. } => CertRefusalReason::Expired,
        E::CertNotValidYet { .. } => CertRefusalReason::NotYetValid,
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            CertRefusalReason::MissingClientAuth
        }
        E::BadDer
        | E::BadDerTime
        | E::TrailingData(_)
        | E::MalformedExtensions
        | E::ExtensionValueInvalid
        | E::InvalidCertValidity
        | E::InvalidSerialNumber
        | E::UnsupportedCertVersion
        | E::UnsupportedCriticalExtension
        | E::CaUsedAsEndEntity => CertRefusalReason::Malformed,
        _ => CertRefusalReason::UnknownCa,
    }
}

/// The refusal as the rustls error that a failed handshake carries.
pub(crate) fn to_rustls_error(refusal: CertRefusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
}

/// The mTLS listener's client certificate verifier: requires a certificate and accepts those of
/// the factory, operational and admin CAs (each verified against its own CA only).
#[derive(Debug)]
pub struct ClientVerifier {
    store: Arc<TrustStore>,
}

impl ClientVerifier {
    pub(crate) fn new(store: Arc<TrustStore>) -> ClientVerifier {
        ClientVerifier { store }
    }

    /// Verify a client chain and return the role it grants, or why it is refused.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Role, CertRefusal> {
        self.store.verify(end_entity, intermediates, now)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.store.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.store
            .verify(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.store.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.store.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store.algorithms.supported_schemes()
    }
}

/// Our typed refusal from a failed handshake's error.
pub(crate) fn refusal_from_tls_error(error: &std::io::Error) -> Option<CertRefusal> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    let simple =
        |reason: CertRefusalReason, detail: &str| Some(refusal(reason, None, detail.to_string()));
    match tls {
        rustls::Error::NoCertificatesPresented => simple(
            CertRefusalReason::NoCertificate,
            "no client certificate presented",
        ),
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            CertificateError::Other(OtherError(inner)) => {
                match inner.downcast_ref::<CertRefusal>() {
                    Some(r) => Some(r.clone()),
                    None => simple(CertRefusalReason::Malformed, &inner.to_string()),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                simple(CertRefusalReason::Expired, "certificate expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                simple(CertRefusalReason::NotYetValid, "certificate not valid yet")
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                simple(CertRefusalReason::UnknownCa, "certificate issuer unknown")
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                simple(
                    CertRefusalReason::MissingClientAuth,
                    "certificate not for client authentication",
                )
            }
            CertificateError::BadEncoding => {
                simple(CertRefusalReason::Malformed, "certificate encoding is bad")
            }
            other => Some(refusal(
                CertRefusalReason::Malformed,
                None,
                format!("certificate refused: {other:?}"),
            )),
        },
        _ => None,
    }
}
