//! Operators' commands around a running gateway: `pki check`, `pki revoke-admin` and
//! `store backup`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{Config, PkiConfig};
use crate::pki::check;

/// The `[pki]` section with `--dir` in place of its directory.
fn pki_config(config: &Config, dir: Option<PathBuf>) -> PkiConfig {
    let mut pki = config.pki.clone();
    if let Some(dir) = dir {
        pki.dir = dir;
    }
    pki
}

/// `onboard pki check`: print the table; fail on a problem.
pub fn check(config: &Config, dir: Option<PathBuf>) -> Result<()> {
    let pki = pki_config(config, dir);
    let report = check::check(&pki, time::OffsetDateTime::now_utc());
    let width = report
        .findings
        .iter()
        .map(|f| f.file.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<15}  {:<7}  DETAIL",
        "FILE", "CHECK", "STATUS"
    );
    for f in &report.findings {
        println!(
            "{:<width$}  {:<15}  {:<7}  {}",
            f.file,
            f.check.as_str(),
            f.status.as_str(),
            f.detail
        );
    }
    let (problems, warnings) = (report.problems(), report.warnings());
    println!(
        "{}: {problems} problem(s), {warnings} warning(s)",
        pki.dir.display()
    );
    if problems > 0 {
        bail!(
            "the PKI directory {} is not ready: {problems} problem(s)",
            pki.dir.display()
        );
    }
    Ok(())
}

/// `onboard pki revoke-admin --cert FILE`.
pub fn revoke_admin(config: &Config, dir: Option<PathBuf>, cert: &Path) -> Result<()> {
    let pki = pki_config(config, dir);
    let crl = pki.dir.join(&pki.admin_crl);
    let done = crate::pki::revoke_admin(&pki.dir, &crl, cert)
        .with_context(|| format!("revoking {}", cert.display()))?;
    let name = done.name.as_deref().unwrap_or("(no CN)");
    if done.already {
        println!(
            "{name} (serial {}) was already revoked; {} rewritten",
            done.serial,
            crl.display()
        );
    } else {
        println!(
            "revoked {name} (serial {}) in {}",
            done.serial,
            crl.display()
        );
    }
    println!(
        "{} admin certificate(s) on the list; send SIGHUP to running gateways (systemctl reload onboard) to apply it now",
        done.listed
    );
    Ok(())
}

/// `onboard store backup --out FILE`.
pub async fn backup(config: &Config, out: PathBuf) -> Result<()> {
    let url = config.store.url.clone();
    let done = tokio::task::spawn_blocking(move || crate::store::backup::backup(&url, &out))
        .await
        .context("backup task")??;
    println!(
        "backed up {} to {} ({} bytes)",
        done.source.display(),
        done.out.display(),
        done.bytes
    );
    Ok(())
}
