//! Reading and writing the PEM files of the PKI directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::PkiError;

/// Largest PEM file we read (a CA bundle of a few hundred certificates fits easily).
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn bad_file(path: &Path, message: impl Into<String>) -> PkiError {
    PkiError::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Read a text file of the PKI directory. A missing well-known file (`path` is `dir/name`) is
/// `PkiError::Missing(dir, name)`; any other missing file is an I/O error naming its path.
pub(crate) fn read_text(dir: &Path, path: &Path, name: &'static str) -> Result<String, PkiError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !name.is_empty() && path == dir.join(name) {
                return Err(PkiError::Missing(dir.to_path_buf(), name));
            }
            return Err(io_error(path, e));
        }
        Err(e) => return Err(io_error(path, e)),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad_file(
            path,
            format!("file of {} bytes is too large for a PEM file", meta.len()),
        ));
    }
    fs::read_to_string(path).map_err(|e| io_error(path, e))
}

/// Every certificate of a PEM text (at least one).
pub(crate) fn parse_certificates(
    path: &Path,
    text: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_file(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad_file(
            path,
            "no certificate (BEGIN CERTIFICATE) in this file",
        ));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| bad_file(path, format!("not an X.509 certificate: {e}")))?;
    }
    Ok(certs)
}

/// The private key of a PEM text.
pub(crate) fn parse_private_key(
    path: &Path,
    text: &str,
) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| bad_file(path, format!("no usable private key: {e}")))
}

/// PEM encoding of one DER object.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// PEM of a list of certificates.
pub(crate) fn certificates_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c.as_ref()))
        .collect()
}

fn create_parent(path: &Path) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
    }
    Ok(())
}

fn open_options(secret: bool, replace: bool) -> fs::OpenOptions {
    let mut options = fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    options
}

/// Write a new file; fails if it exists. Secret files are created with mode 0600.
pub(crate) fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    create_parent(path)?;
    let mut file = open_options(secret, false)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.write_all(contents).map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))
}

/// Write a file, replacing any previous one. A secret file is removed first so that the new one
/// is created with mode 0600 whatever the mode of the old one was.
pub(crate) fn write_replace(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    create_parent(path)?;
    if secret {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(path, e)),
        }
    }
    let mut file = open_options(secret, !secret)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.write_all(contents).map_err(|e| io_error(path, e))
}

/// Replace a public file atomically: write a temporary file beside it, flush it to disk, and
/// rename it over the old one, so that a reader sees the old file or the new one, never a part.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    create_parent(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = open_options(false, true).open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_error(path, e));
    }
    Ok(())
}

/// `<dir>/<stem>.<ext>`.
pub(crate) fn stem_path(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    dir.join(format!("{stem}.{ext}"))
}

/// The key file next to a certificate file: same name with `.key`.
pub(crate) fn key_path_for(cert_path: &Path) -> PathBuf {
    cert_path.with_extension("key")
}
