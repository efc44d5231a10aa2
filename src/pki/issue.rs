//! Certificate profiles (CA, server, client), serial numbers, key policy and CSR checks.

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{CsrError, IssuedCertificate, PkiError};

/// Organization of every CA and certificate the development PKI makes.
pub(crate) const ORGANIZATION: &str = "onboard";
/// Validity of the development CAs and server certificate.
pub(crate) const CA_VALIDITY_DAYS: i64 = 3650;
/// Largest CSR (PEM text) accepted.
pub(crate) const MAX_CSR_PEM_BYTES: usize = 64 * 1024;

/// A random, positive, 16-byte serial number whose DER encoding needs no padding byte.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Positive (top bit clear) and exactly 16 significant bytes (second bit set).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Lower-case hex of a DER INTEGER's content, without the sign-padding leading zero byte.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    match raw {
        [0, rest @ ..] if !rest.is_empty() => hex::encode(rest),
        _ => hex::encode(raw),
    }
}

pub(crate) fn fingerprint(der: &[u8]) -> Vec<u8> {
    Sha256::digest(der).to_vec()
}

fn generate_error(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// Parameters of a self-signed CA: EC P-256 (key chosen by the caller), CN + O, CA basic
/// constraints, keyCertSign, 10 years.
pub(crate) fn ca_params(common_name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(random_serial());
    params
}

/// Parameters of the gateway's TLS server certificate.
pub(crate) fn server_params(names: &[String]) -> Result<CertificateParams, PkiError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(names.to_vec()).map_err(generate_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names
            .first()
            .map(String::as_str)
            .unwrap_or("onboard server"),
    );
    dn.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// Parameters of a client certificate: CN only, digitalSignature, clientAuth EKU when asked.
pub(crate) fn client_params(
    common_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    client_auth: bool,
    dns_names: &[String],
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if client_auth {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.subject_alt_names = dns_names
        .iter()
        .map(|name| {
            rcgen::Ia5String::try_from(name.as_str())
                .map(SanType::DnsName)
                .map_err(generate_error)
        })
        .collect::<Result<_, _>>()?;
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// Parameters of an operational (device) certificate.
pub(crate) fn device_params(device_id: &str, days: u32) -> Result<CertificateParams, PkiError> {
    let now = OffsetDateTime::now_utc();
    client_params(
        device_id,
        now - Duration::minutes(5),
        now + Duration::days(i64::from(days)),
        true,
        &[],
    )
}

/// Serial, fingerprint and not_after of a certificate we just made.
pub(crate) fn issued_from_der(der: &[u8]) -> Result<IssuedCertificate, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Generate(format!("issued certificate does not parse: {e}")))?;
    Ok(IssuedCertificate {
        certificate_pem: super::files::pem_encode("CERTIFICATE", der),
        serial: serial_hex(cert.raw_serial()),
        fingerprint: fingerprint(der),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// Number of significant bits of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> usize {
    let trimmed: &[u8] = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    match trimmed.first() {
        Some(first) => (trimmed.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

/// The key policy: EC P-256/P-384, Ed25519, RSA >= 2048 bits. The error says why not.
pub(crate) fn check_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => {
                let bits = match spki.parsed() {
                    Ok(x509_parser::public_key::PublicKey::EC(point)) => point.key_size(),
                    _ => 0,
                };
                let expected = if c == OID_EC_P256 { 256 } else { 384 };
                if bits == expected {
                    Ok(())
                } else {
                    Err("EC public key point is malformed".to_string())
                }
            }
            Some(c) => Err(format!("EC curve {c} is not accepted; use P-256 or P-384")),
            None => Err("EC key without a named curve is not accepted; use P-256 or P-384".into()),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return if spki.subject_public_key.data.len() == 32 {
            Ok(())
        } else {
            Err("Ed25519 public key is malformed".to_string())
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => bit_length(rsa.modulus),
            _ => return Err("RSA public key is malformed".to_string()),
        };
        return if bits >= 2048 {
            Ok(())
        } else {
            Err(format!(
                "RSA key of {bits} bits; at least 2048 are required"
            ))
        };
    }
    Err(format!(
        "key type {alg} is not accepted; use EC P-256/P-384, Ed25519 or RSA >= 2048"
    ))
}

/// Check a device's CSR (PEM): parse, key policy, proof of possession, subject. Returns the
/// public key to certify.
pub(crate) fn check_csr(
    device_id: &str,
    csr_pem: &str,
) -> Result<rcgen::SubjectPublicKeyInfo, CsrError> {
    if csr_pem.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::Invalid(format!(
            "CSR of {} bytes is larger than {MAX_CSR_PEM_BYTES}",
            csr_pem.len()
        )));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CsrError::Invalid(format!("not a PEM certificate request: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Invalid(format!("not a PKCS#10 certificate request: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Invalid(
            "trailing data after the certificate request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    // The key first: a weak key is refused as such, whether or not we could verify with it.
    check_key(&info.subject_pki).map_err(CsrError::WeakKey)?;
    csr.verify_signature()
        .map_err(|e| CsrError::Invalid(format!("CSR signature does not verify: {e}")))?;
    let mut names = info.subject.iter_common_name();
    if let Some(cn) = names.next() {
        let found = cn
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|_| "<unreadable>".to_string());
        if found != device_id {
            return Err(CsrError::SubjectMismatch {
                expected: device_id.to_string(),
                found,
            });
        }
        if names.next().is_some() {
            return Err(CsrError::SubjectMismatch {
                expected: device_id.to_string(),
                found: "several common names".to_string(),
            });
        }
    }
    rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
        .map_err(|e| CsrError::Invalid(format!("unsupported public key encoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_only_the_padding_byte() {
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x7f, 0x01]), "7f01");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn bit_length_counts_significant_bits() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01, 0x00]), 9);
        assert_eq!(bit_length(&[0x00]), 0);
    }

    #[test]
    fn random_serials_are_positive_and_sixteen_bytes() {
        for _ in 0..64 {
            let serial = random_serial().to_bytes();
            assert_eq!(serial.len(), 16);
            assert_eq!(serial[0] & 0xc0, 0x40);
        }
    }
}
