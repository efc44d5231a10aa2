//! The PKI: loading and creating the CAs, classifying client certificates (which CA issued them,
//! whether they may connect), and issuing operational credentials (signing a device's CSR, or
//! generating a key pair for it).
//!
//! Files in the PKI directory (`[pki] dir`, default `certs/`):
//!
//! | file | what |
//! | --- | --- |
//! | `factory-ca.pem` (+ `factory-ca.key`, development only) | device maker's CA: bootstrap role |
//! | `operational-ca.pem` + `operational-ca.key` (0600) | our issuing CA: device role |
//! | `admin-ca.pem` (+ `admin-ca.key`) | admin role |
//! | `server.pem` + `server.key` | the gateway's TLS server certificate |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::config::PkiConfig;

/// The role a client certificate grants, decided by the CA that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Factory certificate: may only enroll.
    Bootstrap,
    /// Operational certificate or password credential that we issued.
    Device,
    /// Administrator.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bootstrap => "bootstrap",
            Role::Device => "device",
            Role::Admin => "admin",
        }
    }
}

/// Why a client certificate was refused. `as_str` is the `reason` label of
/// `onboard_auth_failures_total` and of the audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertRefusalReason {
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    MissingClientAuth,
    WeakKey,
    Malformed,
}

impl CertRefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRefusalReason::NoCertificate => "no_certificate",
            CertRefusalReason::UnknownCa => "unknown_ca",
            CertRefusalReason::Expired => "expired",
            CertRefusalReason::NotYetValid => "not_yet_valid",
            CertRefusalReason::MissingClientAuth => "missing_client_auth",
            CertRefusalReason::WeakKey => "weak_key",
            CertRefusalReason::Malformed => "bad_certificate",
        }
    }
}

/// A refused client certificate, with what we could read of it for the audit log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("client certificate refused ({}): {detail}", reason.as_str())]
pub struct CertRefusal {
    pub reason: CertRefusalReason,
    /// Subject CN if the certificate could be parsed.
    pub subject_cn: Option<String>,
    pub detail: String,
}

/// A verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub role: Role,
    /// Subject common name.
    pub common_name: Option<String>,
    /// DNS / URI subject alternative names.
    pub alt_names: Vec<String>,
    /// Lower-case hex, no leading zeros stripped beyond DER's own encoding.
    pub serial: String,
    /// SHA-256 of the DER.
    pub fingerprint: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// A certificate we issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub serial: String,
    pub fingerprint: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// Why a CSR was refused; maps to the enrollment error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not PEM/DER PKCS#10, or its signature does not verify (no proof of possession).
    #[error("{0}")]
    Invalid(String),
    /// Subject CN is neither the device id nor empty.
    #[error("CSR subject CN {found:?} is not the device id {expected:?}")]
    SubjectMismatch { expected: String, found: String },
    /// Key type or size not accepted (EC P-256/P-384, Ed25519, RSA >= 2048 are).
    #[error("{0}")]
    WeakKey(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("PKI directory {0} has no {1}; run `onboard pki init`")]
    Missing(PathBuf, &'static str),
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Options of a certificate made by the issuing tools (factory and admin certificates, and the
/// unusual certificates tests need).
#[derive(Debug, Clone)]
pub struct CertOptions {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Add the clientAuth extended key usage (always true for real devices).
    pub client_auth: bool,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
}

impl CertOptions {
    /// Valid from an hour ago for `days` days, with clientAuth.
    pub fn valid_for_days(days: i64) -> CertOptions {
        let now = OffsetDateTime::now_utc();
        CertOptions {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(days),
            client_auth: true,
            dns_names: Vec::new(),
        }
    }
}

/// A certificate with its freshly generated private key (PEM both).
#[derive(Debug, Clone)]
pub struct CertAndKey {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub serial: String,
}

/// What `Pki::init` created (empty: everything already existed).
#[derive(Debug, Default, Clone)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
}

/// A CA able to issue certificates (its certificate and private key loaded).
pub struct Issuer {
    _private: (),
}

impl Issuer {
    /// Load `<stem>.pem` and `<stem>.key` from `dir` (e.g. `factory-ca`, `admin-ca`).
    pub fn load(dir: &Path, stem: &str) -> Result<Issuer, PkiError> {
        let _ = (dir, stem);
        todo!()
    }

    /// Issue a client certificate with CN `common_name` and a fresh EC P-256 key.
    pub fn issue_client(
        &self,
        common_name: &str,
        options: &CertOptions,
    ) -> Result<CertAndKey, PkiError> {
        let _ = (common_name, options);
        todo!()
    }

    pub fn certificate_pem(&self) -> &str {
        todo!()
    }
}

/// The loaded PKI of a running gateway.
pub struct Pki {
    _private: (),
}

impl Pki {
    /// Create every missing file of a development PKI in `config.dir` (factory CA with key,
    /// operational CA with key 0600, admin CA with key, server certificate with SANs from
    /// `config.server_names`). Existing files are left alone.
    pub fn init(config: &PkiConfig) -> Result<InitReport, PkiError> {
        let _ = config;
        todo!()
    }

    /// Load the CAs, the operational CA key and the server certificate.
    pub fn load(config: &PkiConfig) -> Result<Pki, PkiError> {
        let _ = config;
        todo!()
    }

    /// rustls configuration of the mTLS listener: client certificate required, verified against
    /// the factory, operational and admin CAs (chain, validity, clientAuth EKU, key strength).
    /// A refusal surfaces from the handshake as
    /// `rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc<CertRefusal>)))`
    /// or `rustls::Error::NoCertificatesPresented`; see [`refusal_from_tls_error`].
    pub fn mtls_server_config(&self) -> Arc<rustls::ServerConfig> {
        todo!()
    }

    /// rustls configuration of the password listener (no client certificate).
    pub fn tls_server_config(&self) -> Arc<rustls::ServerConfig> {
        todo!()
    }

    /// Classify a chain that the handshake already verified: role from the issuing CA,
    /// CN, SANs, serial, fingerprint.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<PeerCert, CertRefusal> {
        let _ = chain;
        todo!()
    }

    /// Sign a device's PKCS#10 CSR (PEM) as an operational certificate with CN = `device_id`,
    /// clientAuth EKU, validity `device_cert_days`. Verifies the CSR's signature, its subject
    /// (CN must be `device_id` or absent) and its key (EC P-256/P-384, Ed25519, RSA >= 2048).
    pub fn sign_csr(&self, device_id: &str, csr_pem: &str) -> Result<IssuedCertificate, CsrError> {
        let _ = (device_id, csr_pem);
        todo!()
    }

    /// Generate an EC P-256 key pair and an operational certificate for it; returns the private
    /// key PEM (PKCS#8), which the caller hands to the device once and never stores.
    pub fn generate_credential(
        &self,
        device_id: &str,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        let _ = device_id;
        todo!()
    }

    /// PEM of the operational CA (what a device needs to trust our certificates' chain).
    pub fn ca_chain_pem(&self) -> &str {
        todo!()
    }

    /// PEM of the CA that signed the server certificate (what clients put in their trust store).
    pub fn server_ca_pem(&self) -> &str {
        todo!()
    }
}

/// Extract our typed refusal from a failed handshake's error, if the failure was about the
/// client certificate.
pub fn refusal_from_tls_error(error: &std::io::Error) -> Option<CertRefusal> {
    let _ = error;
    todo!()
}

/// A factory certificate written by [`issue_factory_batch`].
#[derive(Debug, Clone)]
pub struct FactoryCredential {
    pub device_id: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub serial: String,
}

/// Issue factory certificates for `ids` into `out`.
pub fn issue_factory_batch(dir: &Path, ids: &[String], out: &Path, options: &CertOptions) -> Result<Vec<FactoryCredential>, PkiError> {
    let _ = (dir, ids, out, options);
    todo!()
}

/// Issue an admin certificate into `out`.
pub fn issue_admin(dir: &Path, name: &str, out: &Path) -> Result<CertAndKey, PkiError> {
    let _ = (dir, name, out);
    todo!()
}
