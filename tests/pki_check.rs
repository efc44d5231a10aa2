//! `onboard pki check` on a good PKI directory and on one broken in each way it looks for.

use std::path::Path;
use std::process::Command;

use onboard::config::Config;
use onboard::pki::{CertOptions, Issuer, Pki};
use time::{Duration, OffsetDateTime};

/// A development PKI in a fresh directory (`<tmp>/certs`).
fn pki_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.pki.dir = tmp.path().join("certs");
    Pki::init(&config.pki).expect("pki init");
    tmp
}

/// `onboard pki check --dir certs` in `tmp` (with `onboard.toml` there if it exists):
/// (success, the table).
fn check(tmp: &Path) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_onboard"));
    command
        .args(["pki", "check", "--dir", "certs"])
        .current_dir(tmp)
        .env_remove("ONBOARD_CONFIG");
    if tmp.join("onboard.toml").exists() {
        command.env("ONBOARD_CONFIG", tmp.join("onboard.toml"));
    }
    let out = command.output().expect("onboard runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The table's row for `file` and `check`.
fn row<'a>(table: &'a str, file: &str, check: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(file) && l[file.len()..].trim_start().starts_with(check))
        .unwrap_or_else(|| panic!("no row {file} / {check} in:\n{table}"))
}

/// Replace the server certificate and key with one issued by the operational CA with
/// `options` (validity, names).
fn server_certificate(tmp: &Path, options: &CertOptions) {
    let ca = Issuer::load(&tmp.join("certs"), "operational-ca").unwrap();
    let cert = ca.issue_client("onboard", options).unwrap();
    std::fs::write(tmp.join("certs/server.pem"), cert.certificate_pem).unwrap();
    std::fs::write(tmp.join("certs/server.key"), cert.private_key_pem).unwrap();
    chmod(&tmp.join("certs/server.key"), 0o600);
}

fn named(names: &[&str], not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertOptions {
    CertOptions {
        not_before,
        not_after,
        client_auth: false,
        dns_names: names.iter().map(|n| n.to_string()).collect(),
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_development_pki_passes() {
    let tmp = pki_dir();
    let (ok, table) = check(tmp.path());
    assert!(ok, "{table}");
    for (file, check) in [
        ("factory-ca.pem", "validity"),
        ("factory-ca.pem", "unique subject"),
        ("operational-ca.pem", "validity"),
        ("operational-ca.key", "key matches"),
        ("operational-ca.key", "permissions"),
        ("admin-ca.pem", "validity"),
        ("server.pem", "validity"),
        ("server.pem", "server names"),
        ("server.key", "key matches"),
        ("server.key", "permissions"),
    ] {
        assert!(
            row(&table, file, check).contains(" ok "),
            "{file} {check}:\n{table}"
        );
    }
    assert!(table.contains("0 problem(s), 0 warning(s)"), "{table}");
}

#[test]
fn an_expired_or_not_yet_valid_certificate_is_a_problem() {
    let tmp = pki_dir();
    let now = OffsetDateTime::now_utc();
    let names = ["localhost", "127.0.0.1"];
    server_certificate(
        tmp.path(),
        &named(&names, now - Duration::days(10), now - Duration::days(1)),
    );
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "server.pem", "validity").contains("PROBLEM  expired"),
        "{table}"
    );

    server_certificate(
        tmp.path(),
        &named(&names, now + Duration::days(1), now + Duration::days(90)),
    );
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "server.pem", "validity").contains("not valid before"),
        "{table}"
    );
}

#[test]
fn expiry_within_30_days_is_a_warning_only() {
    let tmp = pki_dir();
    let now = OffsetDateTime::now_utc();
    server_certificate(
        tmp.path(),
        &named(
            &["localhost", "127.0.0.1"],
            now - Duration::days(1),
            now + Duration::days(10),
        ),
    );
    let (ok, table) = check(tmp.path());
    assert!(ok, "{table}");
    assert!(
        row(&table, "server.pem", "validity").contains("WARN     expires in 9 day"),
        "{table}"
    );
    assert!(table.contains("0 problem(s), 1 warning(s)"), "{table}");
}

#[test]
fn a_key_of_another_certificate_is_a_problem() {
    let tmp = pki_dir();
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(tmp.path().join("certs/server.key"), other.serialize_pem()).unwrap();
    chmod(&tmp.path().join("certs/server.key"), 0o600);
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "server.key", "key matches").contains("does not belong to server.pem"),
        "{table}"
    );
}

#[test]
fn a_key_readable_by_others_is_a_problem() {
    let tmp = pki_dir();
    chmod(&tmp.path().join("certs/operational-ca.key"), 0o644);
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "operational-ca.key", "permissions").contains("PROBLEM  mode 0644"),
        "{table}"
    );
}

#[test]
fn server_names_missing_from_the_certificate_are_a_problem() {
    let tmp = pki_dir();
    let now = OffsetDateTime::now_utc();
    server_certificate(
        tmp.path(),
        &named(
            &["localhost"],
            now - Duration::days(1),
            now + Duration::days(90),
        ),
    );
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "server.pem", "server names").contains("lacks 127.0.0.1"),
        "{table}"
    );
}

#[test]
fn two_factory_cas_with_one_subject_are_a_problem() {
    let tmp = pki_dir();
    // A second maker's CA with the same subject DN as the first (but its own key).
    let twin = Issuer::generate_ca("onboard factory CA (development)").unwrap();
    twin.write(&tmp.path().join("certs"), "maker-2").unwrap();
    std::fs::write(
        tmp.path().join("onboard.toml"),
        "[pki]\nfactory_cas = [\"factory-ca.pem\", \"maker-2.pem\"]\n",
    )
    .unwrap();
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "factory-ca.pem", "unique subject").contains(" ok "),
        "{table}"
    );
    assert!(
        row(&table, "maker-2.pem", "unique subject").contains("is also that of factory-ca.pem"),
        "{table}"
    );
}

#[test]
fn a_missing_file_is_a_problem() {
    let tmp = pki_dir();
    std::fs::remove_file(tmp.path().join("certs/admin-ca.pem")).unwrap();
    let (ok, table) = check(tmp.path());
    assert!(!ok, "{table}");
    assert!(
        row(&table, "admin-ca.pem", "validity").contains("PROBLEM"),
        "{table}"
    );
}
