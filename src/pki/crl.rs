//! The admin revocation list (`[pki] admin_crl`, a CRL signed by the admin CA): read and
//! checked at every load and reload of the PKI, extended by `onboard pki revoke-admin`.
//!
//! A missing file means that nothing is revoked. A file that is present must parse and carry
//! a valid signature of one of the admin CAs: a list that cannot be trusted is an error (the
//! gateway then keeps its previous material), never an empty list.

use std::collections::BTreeMap;
use std::path::Path;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::files::{self, bad_file};
use super::issue::serial_hex;
use super::{Issuer, PkiError, ADMIN_STEM};

/// Days until the `nextUpdate` a new list announces (the gateway itself does not expire it).
const NEXT_UPDATE_DAYS: i64 = 365;

/// Serials (lower-case hex, as [`super::PeerCert::serial`]) of the revoked admin certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokedAdmins {
    /// Serial -> when it was revoked.
    serials: BTreeMap<String, OffsetDateTime>,
    /// The list's CRL number (0 when there is no list).
    number: u64,
}

impl RevokedAdmins {
    pub fn contains(&self, serial: &str) -> bool {
        self.serials.contains_key(serial)
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.serials.keys().map(String::as_str)
    }
}

/// Read the admin CRL at `path`, checked against the admin CA certificates `admin_cas`.
pub(crate) fn load(
    dir: &Path,
    path: &Path,
    admin_cas: &[CertificateDer<'static>],
) -> Result<RevokedAdmins, PkiError> {
    if !path.exists() {
        return Ok(RevokedAdmins::default());
    }
    let text = files::read_text(dir, path, "")?;
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(text.as_bytes())
        .map_err(|e| bad_file(path, format!("no CRL (BEGIN X509 CRL) in this file: {e}")))?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
        .map_err(|e| bad_file(path, format!("not a CRL: {e}")))?;
    let signed_by_admin_ca = admin_cas.iter().any(|ca| {
        x509_parser::parse_x509_certificate(ca.as_ref()).is_ok_and(|(_, ca)| {
            ca.subject().as_raw() == crl.issuer().as_raw()
                && crl.verify_signature(ca.public_key()).is_ok()
        })
    });
    if !signed_by_admin_ca {
        return Err(bad_file(
            path,
            format!(
                "this CRL (issuer {}) is not signed by the admin CA",
                crl.issuer()
            ),
        ));
    }
    let serials = crl
        .iter_revoked_certificates()
        .map(|revoked| {
            let at = revoked.revocation_date.to_datetime();
            (serial_hex(revoked.raw_serial()), at)
        })
        .collect();
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    Ok(RevokedAdmins { serials, number })
}

/// What [`revoke_admin`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Serial of the certificate revoked.
    pub serial: String,
    /// Subject CN (the admin's name), if any.
    pub name: Option<String>,
    /// It was already on the list (the list is rewritten all the same).
    pub already: bool,
    /// Certificates on the list now.
    pub listed: usize,
}

/// Add the admin certificate in `cert_path` to the CRL at `crl_path` (created if missing),
/// signed by the admin CA of `dir` (`admin-ca.pem` + `admin-ca.key`), written atomically.
pub fn revoke_admin(dir: &Path, crl_path: &Path, cert_path: &Path) -> Result<Revocation, PkiError> {
    let ca = Issuer::load(dir, ADMIN_STEM)?;
    let cert_text = files::read_text(dir, cert_path, "")?;
    let cert = files::parse_certificates(cert_path, &cert_text)?
        .into_iter()
        .next()
        .ok_or_else(|| bad_file(cert_path, "no certificate"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| bad_file(cert_path, format!("not an X.509 certificate: {e}")))?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.certificate_der().as_ref())
        .map_err(|e| bad_file(dir, format!("admin CA: {e}")))?;
    if parsed.issuer().as_raw() != ca_cert.subject().as_raw()
        || parsed.verify_signature(Some(ca_cert.public_key())).is_err()
    {
        return Err(bad_file(
            cert_path,
            format!(
                "not an admin certificate: issued by {}, not by the admin CA {}",
                parsed.issuer(),
                ca_cert.subject()
            ),
        ));
    }
    let serial = serial_hex(parsed.raw_serial());
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let mut revoked = load(dir, crl_path, std::slice::from_ref(ca.certificate_der()))?;
    let already = revoked.serials.contains_key(&serial);
    revoked
        .serials
        .entry(serial.clone())
        .or_insert_with(OffsetDateTime::now_utc);
    let pem = sign(&ca, &revoked)?;
    files::write_atomic(crl_path, pem.as_bytes())?;
    Ok(Revocation {
        serial,
        name,
        already,
        listed: revoked.serials.len(),
    })
}

/// A new CRL (number one past the old one) listing `revoked`, signed by `ca`.
fn sign(ca: &Issuer, revoked: &RevokedAdmins) -> Result<String, PkiError> {
    let now = OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::with_capacity(revoked.serials.len());
    for (serial, at) in &revoked.serials {
        let bytes =
            hex::decode(serial).map_err(|e| PkiError::Generate(format!("serial {serial}: {e}")))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: *at,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(NEXT_UPDATE_DAYS),
        crl_number: SerialNumber::from(revoked.number.saturating_add(1)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.signer, &ca.key)
        .map_err(|e| PkiError::Generate(format!("signing the CRL: {e}")))?;
    crl.pem()
        .map_err(|e| PkiError::Generate(format!("encoding the CRL: {e}")))
}
