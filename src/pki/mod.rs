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
//! | `admin-crl.pem` (optional, `[pki] admin_crl`) | revoked admin certificates, signed by the admin CA |
//! | previous operational CAs (`[pki] previous_operational_cas`) | still trusted for the device role during a rotation |

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::config::PkiConfig;

pub mod check;
mod crl;
mod expiry;
mod files;
mod issue;
mod tls;
mod verified;
mod verify;

#[cfg(test)]
mod tests;

pub use crl::{revoke_admin, Revocation, RevokedAdmins};
pub use expiry::{certificate_expiry, CertificateExpiry, PkiCertificate};
pub use verify::ClientVerifier;

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
    /// An admin certificate on the admin revocation list.
    Revoked,
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
            CertRefusalReason::Revoked => "credential_revoked",
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
    /// Subject DN of our CA that the chain leads to (for a factory certificate: the maker's
    /// CA, which a device's re-enrollment must come through again).
    pub issuer: String,
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
    /// The CA certificate as rcgen needs it to sign (subject and key identifier of the CA).
    signer: rcgen::Certificate,
    key: rcgen::KeyPair,
    certificate_der: CertificateDer<'static>,
    certificate_pem: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("certificate_pem", &self.certificate_pem)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Load `<stem>.pem` and `<stem>.key` from `dir` (e.g. `factory-ca`, `admin-ca`).
    pub fn load(dir: &Path, stem: &str) -> Result<Issuer, PkiError> {
        let cert_path = files::stem_path(dir, stem, "pem");
        let key_path = files::stem_path(dir, stem, "key");
        let (cert_name, key_name) = match stem {
            FACTORY_STEM => (FACTORY_CERT, "factory-ca.key"),
            OPERATIONAL_STEM => (OPERATIONAL_CERT, OPERATIONAL_KEY),
            ADMIN_STEM => (ADMIN_CERT, "admin-ca.key"),
            _ => ("", ""),
        };
        Issuer::load_files(dir, &cert_path, &key_path, cert_name, key_name)
    }

    fn load_files(
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        cert_what: &'static str,
        key_what: &'static str,
    ) -> Result<Issuer, PkiError> {
        let cert_text = files::read_text(dir, cert_path, cert_what)?;
        let certs = files::parse_certificates(cert_path, &cert_text)?;
        let key_text = files::read_text(dir, key_path, key_what)?;
        let key = rcgen::KeyPair::from_pem(&key_text)
            .map_err(|e| files::bad_file(key_path, format!("unusable private key: {e}")))?;
        // The first certificate of the file is the one the key belongs to.
        let der = certs
            .into_iter()
            .next()
            .ok_or_else(|| files::bad_file(cert_path, "no certificate"))?;
        Issuer::from_parts(der, key).map_err(|message| files::bad_file(cert_path, message))
    }

    fn from_parts(der: CertificateDer<'static>, key: rcgen::KeyPair) -> Result<Issuer, String> {
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err("the private key does not belong to this certificate".into());
        }
        let params = rcgen::CertificateParams::from_ca_cert_der(&der)
            .map_err(|e| format!("cannot sign with this CA certificate: {e}"))?;
        let signer = params
            .self_signed(&key)
            .map_err(|e| format!("cannot sign with this CA key: {e}"))?;
        // Issued certificates name the issuer by the DN rcgen re-encodes: it must be the same
        // bytes as the CA's subject, or no verifier would chain them.
        let (_, rebuilt) = x509_parser::parse_x509_certificate(signer.der().as_ref())
            .map_err(|e| format!("cannot sign with this CA certificate: {e}"))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err("the CA subject DN uses an encoding this tool cannot reproduce".into());
        }
        let certificate_pem = files::pem_encode("CERTIFICATE", der.as_ref());
        Ok(Issuer {
            signer,
            key,
            certificate_der: der,
            certificate_pem,
        })
    }

    /// A new self-signed EC P-256 CA with CN `common_name` and O `onboard`, valid 10 years.
    pub fn generate_ca(common_name: &str) -> Result<Issuer, PkiError> {
        let key = rcgen::KeyPair::generate().map_err(|e| PkiError::Generate(e.to_string()))?;
        Issuer::self_signed_ca(common_name, key)
    }

    fn self_signed_ca(common_name: &str, key: rcgen::KeyPair) -> Result<Issuer, PkiError> {
        let cert = issue::ca_params(common_name)
            .self_signed(&key)
            .map_err(|e| PkiError::Generate(e.to_string()))?;
        let der = cert.der().clone();
        Issuer::from_parts(der, key).map_err(PkiError::Generate)
    }

    /// Write `<stem>.pem` and `<stem>.key` (mode 0600) into `dir`, replacing existing files.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), PkiError> {
        files::write_replace(
            &files::stem_path(dir, stem, "pem"),
            self.certificate_pem.as_bytes(),
            false,
        )?;
        files::write_replace(
            &files::stem_path(dir, stem, "key"),
            self.key.serialize_pem().as_bytes(),
            true,
        )
    }

    /// Issue a client certificate with CN `common_name` and a fresh EC P-256 key.
    pub fn issue_client(
        &self,
        common_name: &str,
        options: &CertOptions,
    ) -> Result<CertAndKey, PkiError> {
        let key = rcgen::KeyPair::generate().map_err(|e| PkiError::Generate(e.to_string()))?;
        let issued = self.issue_for(common_name, options, &key)?;
        Ok(CertAndKey {
            certificate_pem: issued.certificate_pem,
            private_key_pem: key.serialize_pem(),
            serial: issued.serial,
        })
    }

    /// Issue a client certificate with CN `common_name` for the public key given as DER
    /// SubjectPublicKeyInfo (any key type rcgen can encode: EC P-256/P-384, Ed25519, RSA).
    /// No key policy is applied here: this also makes the weak-key certificates tests need.
    pub fn issue_client_with_key(
        &self,
        common_name: &str,
        options: &CertOptions,
        public_key_der_spki: &[u8],
    ) -> Result<IssuedCertificate, PkiError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(public_key_der_spki)
            .map_err(|e| PkiError::Generate(format!("public key: {e}")))?;
        self.issue_for(common_name, options, &public_key)
    }

    fn issue_for(
        &self,
        common_name: &str,
        options: &CertOptions,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedCertificate, PkiError> {
        let params = issue::client_params(
            common_name,
            options.not_before,
            options.not_after,
            options.client_auth,
            &options.dns_names,
        )?;
        self.sign(params, public_key)
    }

    fn sign(
        &self,
        params: rcgen::CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedCertificate, PkiError> {
        let cert = params
            .signed_by(public_key, &self.signer, &self.key)
            .map_err(|e| PkiError::Generate(e.to_string()))?;
        issue::issued_from_der(cert.der().as_ref())
    }

    /// PEM of this CA's certificate.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// DER of this CA's certificate.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate_der
    }
}

/// A factory certificate written by [`issue_factory_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryCredential {
    /// Device id, the certificate's CN.
    pub device_id: String,
    /// `<out>/<id>.pem`.
    pub cert_path: PathBuf,
    /// `<out>/<id>.key` (PKCS#8, mode 0600).
    pub key_path: PathBuf,
    /// Serial number, lower-case hex as [`PeerCert::serial`].
    pub serial: String,
}

/// Issue one factory (bootstrap) certificate per id with the factory CA of `dir`, writing
/// `<out>/<id>.pem`, `<out>/<id>.key` (0600), `<out>/factory-ca.pem` and `<out>/server-ca.pem`
/// (the CA that signed the gateway's server certificate, which devices must trust).
pub fn issue_factory_batch(
    dir: &Path,
    ids: &[String],
    out: &Path,
    options: &CertOptions,
) -> Result<Vec<FactoryCredential>, PkiError> {
    let factory = Issuer::load(dir, FACTORY_STEM)?;
    let server_ca = server_ca_pem_of_dir(dir)?;
    std::fs::create_dir_all(out).map_err(|e| files::io_error(out, e))?;
    for id in ids {
        check_file_stem(id)?;
    }
    files::write_replace(
        &out.join("factory-ca.pem"),
        factory.certificate_pem().as_bytes(),
        false,
    )?;
    files::write_replace(&out.join("server-ca.pem"), server_ca.as_bytes(), false)?;
    let mut written = Vec::with_capacity(ids.len());
    for id in ids {
        let cred = factory.issue_client(id, options)?;
        let cert_path = files::stem_path(out, id, "pem");
        let key_path = files::stem_path(out, id, "key");
        files::write_replace(&cert_path, cred.certificate_pem.as_bytes(), false)?;
        files::write_replace(&key_path, cred.private_key_pem.as_bytes(), true)?;
        written.push(FactoryCredential {
            device_id: id.clone(),
            cert_path,
            key_path,
            serial: cred.serial,
        });
    }
    Ok(written)
}

/// Issue an admin certificate (CN `name`, one year) with the admin CA of `dir`, writing
/// `<out>/<name>.pem` and `<out>/<name>.key` (0600).
pub fn issue_admin(dir: &Path, name: &str, out: &Path) -> Result<CertAndKey, PkiError> {
    check_file_stem(name)?;
    let admin = Issuer::load(dir, ADMIN_STEM)?;
    let cred = admin.issue_client(name, &CertOptions::valid_for_days(365))?;
    files::write_replace(
        &files::stem_path(out, name, "pem"),
        cred.certificate_pem.as_bytes(),
        false,
    )?;
    files::write_replace(
        &files::stem_path(out, name, "key"),
        cred.private_key_pem.as_bytes(),
        true,
    )?;
    Ok(cred)
}

/// A name used as a file name in an output directory must not leave it.
fn check_file_stem(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name != "factory-ca"
        && name != "server-ca";
    if ok {
        Ok(())
    } else {
        Err(PkiError::Generate(format!(
            "{name:?} cannot be used as a certificate file name"
        )))
    }
}

/// PEM of the CA that signed `<dir>/server.pem`, found among the CAs of `dir`.
fn server_ca_pem_of_dir(dir: &Path) -> Result<String, PkiError> {
    let server_path = dir.join(SERVER_CERT);
    let server = files::parse_certificates(
        &server_path,
        &files::read_text(dir, &server_path, SERVER_CERT)?,
    )?;
    let mut candidates = Vec::new();
    for name in [OPERATIONAL_CERT, ADMIN_CERT, FACTORY_CERT] {
        let path = dir.join(name);
        if path.exists() {
            candidates.extend(files::parse_certificates(
                &path,
                &files::read_text(dir, &path, name)?,
            )?);
        }
    }
    Ok(pick_server_ca(&server, &candidates).unwrap_or_default())
}

/// The CA among `candidates` whose subject is the issuer of the server certificate, else the
/// rest of the server chain.
fn pick_server_ca(
    server_chain: &[CertificateDer<'static>],
    candidates: &[CertificateDer<'static>],
) -> Option<String> {
    let (leaf, rest) = server_chain.split_first()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let issuer = leaf.issuer().as_raw();
    for ca in candidates {
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(ca.as_ref()) {
            if parsed.subject().as_raw() == issuer {
                return Some(files::pem_encode("CERTIFICATE", ca.as_ref()));
            }
        }
    }
    (!rest.is_empty()).then(|| files::certificates_pem(rest))
}

const FACTORY_STEM: &str = "factory-ca";
const FACTORY_CERT: &str = "factory-ca.pem";
const OPERATIONAL_STEM: &str = "operational-ca";
const OPERATIONAL_CERT: &str = "operational-ca.pem";
const OPERATIONAL_KEY: &str = "operational-ca.key";
const ADMIN_STEM: &str = "admin-ca";
const ADMIN_CERT: &str = "admin-ca.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

/// Everything the PKI directory holds for a running gateway, loaded at once: a reload builds
/// a new one and swaps it in whole, so no connection ever sees half of the old material and
/// half of the new.
struct Material {
    trust: Arc<verify::TrustStore>,
    verifier: Arc<ClientVerifier>,
    operational: Issuer,
    device_cert_days: u32,
    ca_chain_pem: String,
    server_ca_pem: String,
    mtls: Arc<rustls::ServerConfig>,
    tls: Arc<rustls::ServerConfig>,
}

/// The loaded PKI of a running gateway. [`Pki::reload`] replaces its material (server
/// certificate, CAs, admin revocation list) while connections run: handshakes that start
/// afterwards use the new material, established connections keep theirs.
pub struct Pki {
    current: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("device_cert_days", &self.material().device_cert_days)
            .finish_non_exhaustive()
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The admin revocation list now in force.
    pub revoked_admins: RevokedAdmins,
}

fn read_certs(
    dir: &Path,
    name: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let path = dir.join(name);
    let text = files::read_text(dir, &path, what)?;
    files::parse_certificates(&path, &text)
}

impl Material {
    fn load(config: &PkiConfig) -> Result<Material, PkiError> {
        let dir = config.dir.as_path();
        let mut factory = Vec::new();
        for name in &config.factory_cas {
            factory.extend(read_certs(dir, name, FACTORY_CERT)?);
        }
        let current_operational = read_certs(dir, Path::new(OPERATIONAL_CERT), OPERATIONAL_CERT)?;
        // Certificates of the CAs a rotation retired are still those of devices.
        let mut operational_certs = current_operational.clone();
        for name in &config.previous_operational_cas {
            operational_certs.extend(read_certs(dir, name, "")?);
        }
        let admin = read_certs(dir, Path::new(ADMIN_CERT), ADMIN_CERT)?;
        let operational = Issuer::load_files(
            dir,
            &dir.join(OPERATIONAL_CERT),
            &dir.join(OPERATIONAL_KEY),
            OPERATIONAL_CERT,
            OPERATIONAL_KEY,
        )?;
        let server_chain = read_certs(dir, Path::new(SERVER_CERT), SERVER_CERT)?;
        let server_key_path = dir.join(SERVER_KEY);
        let server_key = files::parse_private_key(
            &server_key_path,
            &files::read_text(dir, &server_key_path, SERVER_KEY)?,
        )?;
        let revoked_admins = crl::load(dir, &dir.join(&config.admin_crl), &admin)?;

        let trust = verify::TrustStore::new(&[
            (Role::Bootstrap, &factory),
            (Role::Device, &operational_certs),
            (Role::Admin, &admin),
        ])
        .map_err(|message| files::bad_file(dir, message))?
        .with_revoked_admins(revoked_admins);
        let trust = Arc::new(trust);
        let verifier = Arc::new(ClientVerifier::new(trust.clone()));

        let mut all_cas = operational_certs.clone();
        all_cas.extend(admin.iter().cloned());
        all_cas.extend(factory.iter().cloned());
        let ca_chain_pem = files::certificates_pem(&current_operational);
        let server_ca_pem =
            pick_server_ca(&server_chain, &all_cas).unwrap_or_else(|| ca_chain_pem.clone());

        let mtls = tls::mtls_config(verifier.clone(), &server_chain, &server_key)
            .map_err(|e| files::bad_file(&dir.join(SERVER_CERT), e))?;
        let tls = tls::plain_config(&server_chain, &server_key)
            .map_err(|e| files::bad_file(&dir.join(SERVER_CERT), e))?;

        Ok(Material {
            trust,
            verifier,
            operational,
            device_cert_days: config.device_cert_days,
            ca_chain_pem,
            server_ca_pem,
            mtls: Arc::new(mtls),
            tls: Arc::new(tls),
        })
    }
}

impl Pki {
    /// Create every missing file of a development PKI in `config.dir` (factory CA with key,
    /// operational CA with key 0600, admin CA with key, server certificate with SANs from
    /// `config.server_names`). Existing files are left alone.
    pub fn init(config: &PkiConfig) -> Result<InitReport, PkiError> {
        let dir = config.dir.as_path();
        std::fs::create_dir_all(dir).map_err(|e| files::io_error(dir, e))?;
        let mut report = InitReport::default();
        let factory_cert = dir.join(
            config
                .factory_cas
                .first()
                .map(PathBuf::as_path)
                .unwrap_or(Path::new(FACTORY_CERT)),
        );
        let factory_key = files::key_path_for(&factory_cert);
        init_ca(
            &factory_cert,
            &factory_key,
            "onboard factory CA (development)",
            &mut report,
        )?;
        let operational_cert = dir.join(OPERATIONAL_CERT);
        let operational_key = dir.join(OPERATIONAL_KEY);
        init_ca(
            &operational_cert,
            &operational_key,
            "onboard operational CA (development)",
            &mut report,
        )?;
        init_ca(
            &dir.join(ADMIN_CERT),
            &dir.join("admin-ca.key"),
            "onboard admin CA (development)",
            &mut report,
        )?;

        let server_cert = dir.join(SERVER_CERT);
        let server_key = dir.join(SERVER_KEY);
        if !server_cert.exists() {
            let key = if server_key.exists() {
                let text = files::read_text(dir, &server_key, SERVER_KEY)?;
                rcgen::KeyPair::from_pem(&text)
                    .map_err(|e| files::bad_file(&server_key, format!("unusable key: {e}")))?
            } else {
                let key =
                    rcgen::KeyPair::generate().map_err(|e| PkiError::Generate(e.to_string()))?;
                files::write_new(&server_key, key.serialize_pem().as_bytes(), true)?;
                report.created.push(server_key.clone());
                key
            };
            let ca = Issuer::load_files(
                dir,
                &operational_cert,
                &operational_key,
                OPERATIONAL_CERT,
                OPERATIONAL_KEY,
            )?;
            let mut names = config.server_names.clone();
            if names.is_empty() {
                names.push("localhost".into());
            }
            let issued = ca.sign(issue::server_params(&names)?, &key)?;
            files::write_new(&server_cert, issued.certificate_pem.as_bytes(), false)?;
            report.created.push(server_cert);
        }
        Ok(report)
    }

    /// Load the CAs (factory, operational with the previous ones of a rotation, admin), the
    /// operational CA key, the server certificate and the admin revocation list.
    pub fn load(config: &PkiConfig) -> Result<Pki, PkiError> {
        Ok(Pki {
            current: RwLock::new(Arc::new(Material::load(config)?)),
        })
    }

    /// Load the PKI directory again and use it from now on. On an error (a missing or bad
    /// file) nothing changes: the gateway keeps the material it had.
    pub fn reload(&self, config: &PkiConfig) -> Result<Reloaded, PkiError> {
        let material = Arc::new(Material::load(config)?);
        let revoked_admins = material.trust.revoked_admins().clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = material;
        Ok(Reloaded { revoked_admins })
    }

    fn material(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// rustls configuration of the mTLS listener: client certificate required, verified against
    /// the factory, operational and admin CAs (chain, validity, clientAuth EKU, key strength,
    /// the admin revocation list).
    /// A refusal surfaces from the handshake as
    /// `rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc<CertRefusal>)))`
    /// or `rustls::Error::NoCertificatesPresented`; see [`refusal_from_tls_error`].
    pub fn mtls_server_config(&self) -> Arc<rustls::ServerConfig> {
        self.material().mtls.clone()
    }

    /// rustls configuration of the password listener (no client certificate).
    pub fn tls_server_config(&self) -> Arc<rustls::ServerConfig> {
        self.material().tls.clone()
    }

    /// The client certificate verifier the mTLS configuration uses.
    pub fn client_verifier(&self) -> Arc<ClientVerifier> {
        self.material().verifier.clone()
    }

    /// Classify a chain that the handshake already verified: role from the issuing CA,
    /// CN, SANs, serial, fingerprint. Validity and the admin revocation list are checked
    /// again here, since a resumed TLS session skips the handshake's verification.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Result<PeerCert, CertRefusal> {
        self.material().trust.identify(chain)
    }

    /// Check a device's PKCS#10 CSR (PEM) as [`Pki::sign_csr`] does, without signing it: the
    /// parse, key policy, proof of possession and subject checks every CSR a device sends meets.
    pub fn check_csr(device_id: &str, csr_pem: &str) -> Result<(), CsrError> {
        issue::check_csr(device_id, csr_pem).map(|_| ())
    }

    /// Sign a device's PKCS#10 CSR (PEM) as an operational certificate with CN = `device_id`,
    /// clientAuth EKU, validity `device_cert_days`. Verifies the CSR's signature, its subject
    /// (CN must be `device_id` or absent) and its key (EC P-256/P-384, Ed25519, RSA >= 2048).
    pub fn sign_csr(&self, device_id: &str, csr_pem: &str) -> Result<IssuedCertificate, CsrError> {
        let public_key = issue::check_csr(device_id, csr_pem)?;
        let material = self.material();
        let params = issue::device_params(device_id, material.device_cert_days)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        material
            .operational
            .sign(params, &public_key)
            .map_err(|e| CsrError::Invalid(e.to_string()))
    }

    /// Generate an EC P-256 key pair and an operational certificate for it; returns the private
    /// key PEM (PKCS#8), which the caller hands to the device once and never stores.
    pub fn generate_credential(
        &self,
        device_id: &str,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        let key = rcgen::KeyPair::generate().map_err(|e| PkiError::Generate(e.to_string()))?;
        let material = self.material();
        let params = issue::device_params(device_id, material.device_cert_days)?;
        let issued = material.operational.sign(params, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    /// PEM of the operational CA (what a device needs to trust our certificates' chain).
    pub fn ca_chain_pem(&self) -> String {
        self.material().ca_chain_pem.clone()
    }

    /// PEM of the CA that signed the server certificate (what clients put in their trust store).
    pub fn server_ca_pem(&self) -> String {
        self.material().server_ca_pem.clone()
    }
}

/// Create a missing CA: both files when neither exists, or the certificate alone for an
/// existing key. A certificate without its key is left alone.
fn init_ca(
    cert_path: &Path,
    key_path: &Path,
    common_name: &str,
    report: &mut InitReport,
) -> Result<(), PkiError> {
    if cert_path.exists() {
        return Ok(());
    }
    let key = if key_path.exists() {
        let text = std::fs::read_to_string(key_path).map_err(|e| files::io_error(key_path, e))?;
        rcgen::KeyPair::from_pem(&text)
            .map_err(|e| files::bad_file(key_path, format!("unusable key: {e}")))?
    } else {
        let key = rcgen::KeyPair::generate().map_err(|e| PkiError::Generate(e.to_string()))?;
        files::write_new(key_path, key.serialize_pem().as_bytes(), true)?;
        report.created.push(key_path.to_path_buf());
        key
    };
    let ca = Issuer::self_signed_ca(common_name, key)?;
    files::write_new(cert_path, ca.certificate_pem().as_bytes(), false)?;
    report.created.push(cert_path.to_path_buf());
    Ok(())
}

/// Extract our typed refusal from a failed handshake's error, if the failure was about the
/// client certificate.
pub fn refusal_from_tls_error(error: &std::io::Error) -> Option<CertRefusal> {
    verify::refusal_from_tls_error(error)
}
