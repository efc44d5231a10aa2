//! `onboard pki check`: is a PKI directory fit to go live? Each certificate's validity and
//! expiry, whether each key belongs to its certificate, key file permissions, the server
//! certificate's names against `[pki] server_names`, and that factory CA subjects are unique.
//! A pure reading of the directory: nothing is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::files;
use crate::config::PkiConfig;

/// A certificate expiring within this period is a warning.
pub const EXPIRY_WARNING: Duration = Duration::days(30);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works today, needs attention soon (e.g. expires within 30 days).
    Warn,
    /// Not fit to go live.
    Problem,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Problem => "PROBLEM",
        }
    }
}

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Validity,
    KeyMatch,
    Permissions,
    ServerNames,
    UniqueSubject,
    RevocationList,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Validity => "validity",
            Check::KeyMatch => "key matches",
            Check::Permissions => "permissions",
            Check::ServerNames => "server names",
            Check::UniqueSubject => "unique subject",
            Check::RevocationList => "revocation list",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file checked, relative to the PKI directory.
    pub file: String,
    pub check: Check,
    pub status: Status,
    pub detail: String,
}

/// Every finding, in the order checked.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, file: &Path, check: Check, status: Status, detail: impl Into<String>) {
        self.findings.push(Finding {
            file: file.display().to_string(),
            check,
            status,
            detail: detail.into(),
        });
    }

    /// Findings that make the directory unfit to go live.
    pub fn problems(&self) -> usize {
        self.count(Status::Problem)
    }

    pub fn warnings(&self) -> usize {
        self.count(Status::Warn)
    }

    fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }
}

/// A certificate file of the directory and what it is for.
struct CertFile {
    /// Relative to the PKI directory.
    name: PathBuf,
    /// Its private key must be in the directory (operational CA and server).
    key_required: bool,
}

fn cert_files(config: &PkiConfig) -> Vec<CertFile> {
    let file = |name: &Path, key_required| CertFile {
        name: name.to_path_buf(),
        key_required,
    };
    let mut out: Vec<CertFile> = config
        .factory_cas
        .iter()
        .map(|name| file(name, false))
        .collect();
    out.push(file(Path::new(super::OPERATIONAL_CERT), true));
    out.extend(
        config
            .previous_operational_cas
            .iter()
            .map(|name| file(name, false)),
    );
    out.push(file(Path::new(super::ADMIN_CERT), false));
    out.push(file(Path::new(super::SERVER_CERT), true));
    out
}

/// Check the PKI directory of `config` as of `now`.
pub fn check(config: &PkiConfig, now: OffsetDateTime) -> Report {
    let dir = config.dir.as_path();
    let mut report = Report::default();
    let mut factory_subjects: HashMap<Vec<u8>, PathBuf> = HashMap::new();
    for file in cert_files(config) {
        let Some(der) = read_first_certificate(dir, &file.name, &mut report) else {
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            report.add(
                &file.name,
                Check::Validity,
                Status::Problem,
                "does not parse",
            );
            continue;
        };
        validity(&file.name, &cert, now, &mut report);
        key_match(dir, &file, &cert, &mut report);
        if file.name == Path::new(super::SERVER_CERT) {
            server_names(&file.name, &cert, &config.server_names, &mut report);
        }
        if config.factory_cas.contains(&file.name) {
            let subject = cert.subject().as_raw().to_vec();
            match factory_subjects.get(&subject) {
                Some(other) => report.add(
                    &file.name,
                    Check::UniqueSubject,
                    Status::Problem,
                    format!(
                        "subject {} is also that of {}: devices of the two makers cannot be told apart",
                        cert.subject(),
                        other.display()
                    ),
                ),
                None => {
                    report.add(
                        &file.name,
                        Check::UniqueSubject,
                        Status::Ok,
                        cert.subject().to_string(),
                    );
                    factory_subjects.insert(subject, file.name.clone());
                }
            }
        }
    }
    key_permissions(dir, &mut report);
    revocation_list(config, &mut report);
    report
}

fn read_first_certificate(dir: &Path, name: &Path, report: &mut Report) -> Option<Vec<u8>> {
    let path = dir.join(name);
    let parsed =
        files::read_text(dir, &path, "").and_then(|text| files::parse_certificates(&path, &text));
    match parsed {
        Ok(certs) => certs.into_iter().next().map(|c| c.as_ref().to_vec()),
        Err(e) => {
            report.add(name, Check::Validity, Status::Problem, e.to_string());
            None
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn validity(name: &Path, cert: &X509Certificate<'_>, now: OffsetDateTime, report: &mut Report) {
    let (not_before, not_after) = (
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    );
    let (from, until) = (rfc3339(not_before), rfc3339(not_after));
    let (status, detail) = if now < not_before {
        (Status::Problem, format!("not valid before {from}"))
    } else if now > not_after {
        (Status::Problem, format!("expired at {until}"))
    } else if not_after - now < EXPIRY_WARNING {
        let days = (not_after - now).whole_days();
        (
            Status::Warn,
            format!("expires in {days} day(s), at {until}"),
        )
    } else {
        (Status::Ok, format!("valid until {until}"))
    };
    report.add(name, Check::Validity, status, detail);
}

fn key_match(dir: &Path, file: &CertFile, cert: &X509Certificate<'_>, report: &mut Report) {
    let key_name = files::key_path_for(&file.name);
    let key_path = dir.join(&key_name);
    if !key_path.exists() {
        if file.key_required {
            report.add(&key_name, Check::KeyMatch, Status::Problem, "missing");
        }
        return;
    }
    let key = files::read_text(dir, &key_path, "").and_then(|text| {
        rcgen::KeyPair::from_pem(&text)
            .map_err(|e| files::bad_file(&key_path, format!("unusable private key: {e}")))
    });
    let (status, detail) = match key {
        Err(e) => (Status::Problem, e.to_string()),
        Ok(key) if key.public_key_der().as_slice() == cert.public_key().raw => {
            (Status::Ok, format!("belongs to {}", file.name.display()))
        }
        Ok(_) => (
            Status::Problem,
            format!("does not belong to {}", file.name.display()),
        ),
    };
    report.add(&key_name, Check::KeyMatch, status, detail);
}

fn server_names(name: &Path, cert: &X509Certificate<'_>, wanted: &[String], report: &mut Report) {
    let mut present = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general in &san.value.general_names {
            match general {
                GeneralName::DNSName(dns) => present.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_of(bytes) {
                        present.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let missing: Vec<&str> = wanted
        .iter()
        .map(String::as_str)
        .filter(|w| !present.iter().any(|p| names_equal(p, w)))
        .collect();
    if missing.is_empty() {
        report.add(
            name,
            Check::ServerNames,
            Status::Ok,
            format!("has {}", present.join(", ")),
        );
    } else {
        report.add(
            name,
            Check::ServerNames,
            Status::Problem,
            format!(
                "lacks {} of [pki] server_names (it has {})",
                missing.join(", "),
                present.join(", ")
            ),
        );
    }
}

fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

fn names_equal(present: &str, wanted: &str) -> bool {
    match (
        present.parse::<std::net::IpAddr>(),
        wanted.parse::<std::net::IpAddr>(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => present.eq_ignore_ascii_case(wanted),
    }
}

/// Private keys must be readable by their owner only.
fn key_permissions(dir: &Path, report: &mut Report) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut keys: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "key"))
        .collect();
    keys.sort();
    for path in keys {
        let name = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
        match mode_of(&path) {
            Err(e) => report.add(&name, Check::Permissions, Status::Problem, e.to_string()),
            Ok(mode) if mode & 0o077 != 0 => report.add(
                &name,
                Check::Permissions,
                Status::Problem,
                format!("mode {mode:04o}: readable by group or others; chmod 600"),
            ),
            Ok(mode) => report.add(
                &name,
                Check::Permissions,
                Status::Ok,
                format!("mode {mode:04o}"),
            ),
        }
    }
}

#[cfg(unix)]
fn mode_of(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn mode_of(_path: &Path) -> std::io::Result<u32> {
    Ok(0o600)
}

fn revocation_list(config: &PkiConfig, report: &mut Report) {
    let dir = config.dir.as_path();
    let path = dir.join(&config.admin_crl);
    if !path.exists() {
        return;
    }
    let admin = files::read_text(dir, &dir.join(super::ADMIN_CERT), super::ADMIN_CERT)
        .and_then(|text| files::parse_certificates(&dir.join(super::ADMIN_CERT), &text));
    let loaded = admin.and_then(|admin| super::crl::load(dir, &path, &admin));
    match loaded {
        Ok(revoked) => report.add(
            &config.admin_crl,
            Check::RevocationList,
            Status::Ok,
            format!("{} admin certificate(s) revoked", revoked.len()),
        ),
        Err(e) => report.add(
            &config.admin_crl,
            Check::RevocationList,
            Status::Problem,
            e.to_string(),
        ),
    }
}
