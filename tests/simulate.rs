//! The fleet simulator against an in-process gateway: every credential kind enrolls and
//! activates a whole fleet, and allowlist mode refuses an unregistered fleet by reason.

mod common;

use std::time::Duration;

use common::harness::{eventually, TestGateway};
use onboard::config::EnrollmentMode;
use onboard::simulate::{self, SimCredential, SimReport, SimulateOptions};
use onboard::store::DeviceState;

const DEVICES: usize = 20;

fn options(tg: &TestGateway, credential: SimCredential, prefix: &str) -> SimulateOptions {
    SimulateOptions {
        host: "127.0.0.1".into(),
        port: tg.gw.mtls_addr.port(),
        password_port: tg.gw.password_addr.port(),
        devices: DEVICES,
        concurrency: 5,
        prefix: prefix.into(),
        credential,
        device_type: "thermostat".into(),
        pki_dir: tg.config.pki.dir.clone(),
        telemetry_messages: 2,
        timeout: Duration::from_secs(20),
        ..SimulateOptions::default()
    }
}

async fn fleet_enrolls_and_activates(credential: SimCredential) {
    let tg = TestGateway::start().await;
    let prefix = format!("sim-{credential}-");
    let report: SimReport = simulate::run(options(&tg, credential, &prefix), None)
        .await
        .expect("simulation runs");
    assert_eq!(report.enrolled, DEVICES as u64, "{report}");
    assert!(report.failed_by_reason.is_empty(), "{report}");
    assert!(
        report.p50 > Duration::ZERO && report.p50 <= report.p99,
        "{report}"
    );
    assert!(report.p99 <= report.max, "{report}");
    assert!(report.enrolled_per_sec() > 0.0);
    let text = report.to_string();
    assert!(
        text.contains("enrolled/s") && text.contains("p99"),
        "{text}"
    );

    for i in 0..DEVICES {
        let id = format!("{prefix}{i:06}");
        let store = tg.gw.store.clone();
        eventually(&format!("{id} active"), || {
            let store = store.clone();
            let id = id.clone();
            async move {
                matches!(store.device(&id).await, Ok(Some(d)) if d.state == DeviceState::Active)
            }
        })
        .await;
    }
    tg.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_fleet_enrolls_and_activates() {
    fleet_enrolls_and_activates(SimCredential::Csr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_key_fleet_enrolls_and_activates() {
    fleet_enrolls_and_activates(SimCredential::Generated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_fleet_enrolls_and_activates() {
    fleet_enrolls_and_activates(SimCredential::Password).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_mode_refuses_an_unregistered_fleet_by_reason() {
    let tg = TestGateway::start_with(|c| c.enrollment.mode = EnrollmentMode::Allowlist).await;
    let report = simulate::run(options(&tg, SimCredential::Csr, "stranger-"), None)
        .await
        .expect("simulation runs");
    eprintln!("{report}");
    assert_eq!(report.enrolled, 0, "{report}");
    assert_eq!(report.failed(), DEVICES as u64, "{report}");
    let refused = report
        .failed_by_reason
        .get("connect_refused:not_authorized")
        .copied()
        .unwrap_or(0);
    let rejected = report
        .failed_by_reason
        .get("rejected:not_allowlisted")
        .copied()
        .unwrap_or(0);
    assert_eq!(refused + rejected, DEVICES as u64, "{report}");
    assert!(
        report.to_string().contains("not_"),
        "reason printed: {report}"
    );
    for i in 0..DEVICES {
        let id = format!("stranger-{i:06}");
        assert!(
            tg.gw.store.device(&id).await.expect("store").is_none(),
            "{id} must not be in the inventory"
        );
    }
    tg.gw.stop().await;
}

#[tokio::test]
async fn zero_concurrency_is_a_typed_error() {
    let opts = SimulateOptions {
        concurrency: 0,
        ..SimulateOptions::default()
    };
    let err = simulate::run(opts, None).await.expect_err("refused");
    assert!(
        matches!(err, simulate::SimError::InvalidOptions(_)),
        "{err}"
    );
}
