//! The `onboard` command line, run as a user runs it.

mod common;

use common::harness::*;
use serde_json::json;

fn onboard(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = onboard_command()
        .args(args)
        .current_dir(dir)
        .env("ONBOARD_PKI_DIR", dir.join("certs"))
        .env(
            "ONBOARD_STORE_URL",
            format!("sqlite://{}", dir.join("onboard.db").display()),
        )
        .output()
        .expect("onboard runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pki_init_and_factory_certificates_with_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = onboard(dir.path(), &["pki", "init"]);
    assert!(ok, "{err}");
    assert!(out.contains("operational-ca.key"), "{out}");
    let (ok, out, _) = onboard(dir.path(), &["pki", "init"]);
    assert!(ok && out.contains("nothing created"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("certs/operational-ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (ok, out, err) = onboard(
        dir.path(),
        &[
            "pki",
            "issue-factory",
            "--count",
            "3",
            "--prefix",
            "fleet-",
            "--out",
            "out",
            "--manifest",
            "fleet.csv",
            "--type",
            "sensor",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("issued 3"), "{out}");
    for id in ["fleet-0001", "fleet-0002", "fleet-0003"] {
        assert!(dir.path().join(format!("out/{id}.pem")).exists());
        assert!(dir.path().join(format!("out/{id}.key")).exists());
    }
    let manifest = std::fs::read_to_string(dir.path().join("fleet.csv")).unwrap();
    assert_eq!(
        manifest.lines().next(),
        Some("id,type,model,location,firmware")
    );
    assert_eq!(manifest.lines().nth(1), Some("fleet-0001,sensor,,,"));
    let (ok, _, err) = onboard(
        dir.path(),
        &["pki", "issue-factory", "--id", "bad id/x", "--out", "out"],
    );
    assert!(!ok && err.contains("device_id_pattern"), "{err}");
    let (ok, _, err) = onboard(dir.path(), &["pki", "issue-admin", "alice", "--out", "out"]);
    assert!(ok, "{err}");
    assert!(dir.path().join("out/alice.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_audit_read_the_inventory() {
    let t = TestGateway::start().await;
    let resp = t
        .enroll(
            "cli-1",
            json!({"request_id": "r", "device_type": "sensor", "model": "S-9"}),
        )
        .await;
    assert_eq!(resp["status"], "accepted");
    let dir = t.dir.path().to_path_buf();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--state", "enrolling"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("cli-1") && out.contains("1 device(s)"),
        "{out}"
    );
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--format", "json"])
    })
    .await
    .unwrap();
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["model"], "S-9");
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--state", "active"])
    })
    .await
    .unwrap();
    assert!(ok && out.contains("0 device(s)"), "{out}");
    // Certificates are issued for 365 days: none expire within 30, all within 400.
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--expiring", "30d"])
    })
    .await
    .unwrap();
    assert!(ok && out.contains("0 device(s)"), "{out}");
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--expiring", "400d"])
    })
    .await
    .unwrap();
    assert!(
        ok && out.contains("cli-1") && out.contains("1 device(s)"),
        "{out}"
    );
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) =
        tokio::task::spawn_blocking(move || onboard(&dir, &["devices", "show", "cli-1"]))
            .await
            .unwrap();
    assert!(
        ok && out.contains("enrolling") && out.contains("v1 by gateway"),
        "{out}"
    );
    let dir = t.dir.path().to_path_buf();
    let (ok, out, _) = tokio::task::spawn_blocking(move || onboard(&dir, &["audit", "cli-1"]))
        .await
        .unwrap();
    assert!(
        ok && out.contains("credential_issued") && out.contains("enrollment_accepted"),
        "{out}"
    );
    let dir = t.dir.path().to_path_buf();
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || onboard(&dir, &["devices", "show", "nobody"]))
            .await
            .unwrap();
    assert!(!ok && err.contains("no device"), "{err}");
    let dir = t.dir.path().to_path_buf();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        onboard(&dir, &["devices", "list", "--state", "sleepy"])
    })
    .await
    .unwrap();
    assert!(!ok && err.contains("unknown state"), "{err}");
}
