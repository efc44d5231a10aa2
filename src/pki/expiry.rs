//! The expiry of the CA and server certificates in the PKI directory, as the
//! `onboard_ca_certificate_not_after_seconds` gauge exports it.

use std::path::Path;

use super::{files, PkiError};
use super::{ADMIN_CERT, FACTORY_CERT, OPERATIONAL_CERT, SERVER_CERT};
use crate::config::PkiConfig;

/// Which certificate of the PKI directory an expiry is about: the `ca` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PkiCertificate {
    /// A factory CA (`[pki] factory_cas`).
    Factory,
    /// The operational CA, which issues device credentials.
    Operational,
    /// The admin CA.
    Admin,
    /// The gateway's own TLS server certificate (the leaf of `server.pem`).
    Server,
}

impl PkiCertificate {
    pub const ALL: [PkiCertificate; 4] = [
        PkiCertificate::Factory,
        PkiCertificate::Operational,
        PkiCertificate::Admin,
        PkiCertificate::Server,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PkiCertificate::Factory => "factory",
            PkiCertificate::Operational => "operational",
            PkiCertificate::Admin => "admin",
            PkiCertificate::Server => "server",
        }
    }
}

/// One certificate's subject and end of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    pub certificate: PkiCertificate,
    /// The subject distinguished name, e.g. `CN=onboard factory CA (development)`.
    pub subject: String,
    /// Unix time, in seconds, of the certificate's `notAfter`.
    pub not_after: i64,
}

/// Read the expiry of every factory CA, the operational and admin CAs, and the server
/// certificate from the PKI directory `config` names.
pub fn certificate_expiry(config: &PkiConfig) -> Result<Vec<CertificateExpiry>, PkiError> {
    let dir = config.dir.as_path();
    let mut out = Vec::new();
    for name in &config.factory_cas {
        out.extend(read(dir, name, FACTORY_CERT, PkiCertificate::Factory)?);
    }
    for (name, certificate) in [
        (OPERATIONAL_CERT, PkiCertificate::Operational),
        (ADMIN_CERT, PkiCertificate::Admin),
    ] {
        out.extend(read(dir, Path::new(name), name, certificate)?);
    }
    // The server file may carry its chain: only its first certificate is the gateway's own.
    let server = read(
        dir,
        Path::new(SERVER_CERT),
        SERVER_CERT,
        PkiCertificate::Server,
    )?;
    out.extend(server.into_iter().take(1));
    Ok(out)
}

/// Every certificate of one PEM file of the directory.
fn read(
    dir: &Path,
    name: &Path,
    well_known: &'static str,
    certificate: PkiCertificate,
) -> Result<Vec<CertificateExpiry>, PkiError> {
    let path = dir.join(name);
    let text = files::read_text(dir, &path, well_known)?;
    files::parse_certificates(&path, &text)?
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| files::bad_file(&path, format!("not an X.509 certificate: {e}")))?;
            Ok(CertificateExpiry {
                certificate,
                subject: cert.subject().to_string(),
                not_after: cert.validity().not_after.timestamp(),
            })
        })
        .collect()
}
