//! The store contract: one suite of behaviours every [`Store`] backend must show, instantiated
//! once per backend by [`contract_tests!`].
//!
//! - `sqlite`: always, on a fresh temporary file per test.
//! - `mssql`: only when `ONBOARD_TEST_MSSQL_URL` is set (a `mssql://` URL or an ADO.NET
//!   string). The server is shared and need not be empty: every case runs in a schema of its
//!   own, `onboard_t<random hex>`, which the store creates when it migrates and the case drops
//!   (`MssqlStore::drop_schema`) when it ends, whether it passed or panicked; with
//!   `ONBOARD_TEST_MSSQL_ISOLATION=database`, in `dbo` of a database of its own instead (see
//!   `common::mssql`). Cases still name their devices, serials and request ids with a prefix
//!   unique to the run.
//!
//! Points the trait's doc comments leave open, pinned down here for every backend:
//! - bulk-imported devices start at generation 0, so their first enrollment passes `Some(0)`;
//! - `commit_enrollment` never moves a `revoked` device back to `enrolling` (Conflict), so a
//!   gateway that read the device before an admin revoked it cannot resurrect it;
//! - metadata the enrollment request does not carry (`None`) keeps its stored value;
//! - audit events need no device row (refused connects of unknown ids are audited too);
//! - import counts a device with identical metadata as `unchanged` whatever its state;
//! - conditional operations that return `Ok(false)` write nothing, not even their event;
//! - inserting a credential, config or firmware job for an unknown device is `NotFound`.
//!
//! SQLite-specific cases (migrations, file handling, error mapping) follow the suite.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::mssql::{throwaway_name, with_schema, Scratch};
use common::store_fixtures::*;
use onboard::config::StoreConfig;
use onboard::store::mssql::MssqlStore;
use onboard::store::sqlite::SqliteStore;
use onboard::store::{
    ChangeKind, CredentialKind, DeviceFilter, DeviceState, ImportOutcome, JobStatus, NewDevice,
    Store, StoreError, TransitionTarget,
};
use serde_json::json;
use time::Duration;

/// One test's view of a backend.
struct Ctx {
    store: Arc<dyn Store>,
    prefix: String,
    /// The store holds nothing but this test's data, so global counts can be asserted exactly.
    exclusive: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Ctx {
    /// A name unique to this test run.
    fn id(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn mine(&self, id: &str) -> bool {
        id.starts_with(&self.prefix)
    }
}

async fn sqlite_ctx() -> Ctx {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("inventory.db");
    let config = StoreConfig {
        url: format!("sqlite://{}", path.display()),
        pool_size: 4,
        ..StoreConfig::default()
    };
    let store = onboard::store::open(&config).await.expect("open sqlite");
    Ctx {
        store,
        prefix: unique_prefix(),
        exclusive: true,
        _dir: Some(dir),
    }
}

/// A store on the server named by `ONBOARD_TEST_MSSQL_URL`, in a scratch schema or database of
/// its own (see `common::mssql`).
async fn mssql_ctx() -> Option<(Ctx, Arc<MssqlStore>, Scratch)> {
    let scratch = Scratch::create().await?;
    let config = scratch.config();
    let store = Arc::new(
        MssqlStore::connect(&config.url, &config)
            .await
            .expect("open mssql"),
    );
    let cx = Ctx {
        store: store.clone(),
        prefix: unique_prefix(),
        // The schema (or database) is new and this case's alone.
        exclusive: true,
        _dir: None,
    };
    Some((cx, store, scratch))
}

/// Run one case on SQL Server, then drop its scratch schema or database, also when the case
/// panicked (the panic is then passed on once the scratch place is gone).
async fn run_mssql_case<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::FutureExt;

    let Some((cx, store, scratch)) = mssql_ctx().await else {
        println!("skipped: ONBOARD_TEST_MSSQL_URL is not set");
        return;
    };
    let outcome = std::panic::AssertUnwindSafe(case(cx)).catch_unwind().await;
    // The pool closes with the last handle, before a scratch database is dropped.
    drop(store);
    let cleanup = scratch.remove().await;
    match outcome {
        Err(panic) => {
            if let Err(e) = &cleanup {
                eprintln!("could not drop test scratch {}: {e}", scratch.name());
            }
            std::panic::resume_unwind(panic);
        }
        Ok(()) => {
            if let Err(e) = cleanup {
                panic!("could not drop test scratch {}: {e}", scratch.name());
            }
        }
    }
}

#[test]
fn schema_is_appended_to_both_connection_string_forms() {
    for (url, expected) in [
        ("mssql://sa:pw@db/x", "mssql://sa:pw@db/x?schema=s1"),
        (
            "mssql://sa:pw@db/x?encrypt=true",
            "mssql://sa:pw@db/x?encrypt=true&schema=s1",
        ),
        ("SQLSERVER://db", "SQLSERVER://db?schema=s1"),
        (
            "server=tcp:db,1433;database=x;password='a;b'",
            "server=tcp:db,1433;database=x;password='a;b';schema=s1",
        ),
        ("server=db;database=x;", "server=db;database=x;schema=s1"),
        ("  server=db;database=x  ", "server=db;database=x;schema=s1"),
    ] {
        assert_eq!(with_schema(url, "s1"), expected, "{url}");
    }
    let name = throwaway_name();
    assert!(name.starts_with("onboard_t"), "{name}");
    assert_eq!(name.len(), "onboard_t".len() + 16, "{name}");
    assert!(name["onboard_t".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit()));
    assert_ne!(name, throwaway_name());
}

/// One `#[tokio::test]` per case per backend: `sqlite::<case>` and `mssql::<case>`.
macro_rules! contract_tests {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::sqlite_ctx().await).await;
                }
            )*
        }
        mod mssql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run_mssql_case(super::$case).await;
                }
            )*
        }
    };
}

contract_tests!(
    ping_and_backend,
    enrollment_commit_writes_everything,
    enrollment_with_password_credential,
    retry_finds_stored_response_and_duplicate_request_conflicts,
    failed_commit_leaves_nothing_behind,
    concurrent_commits_have_exactly_one_winner,
    activation_transitions,
    expiry_transitions,
    reenrollment_revokes_others_and_activation_supersedes,
    enrollment_of_imported_device,
    revoked_device_refuses_enrollment,
    credential_operations,
    config_versions_acks_and_history,
    published_configs_are_newest_of_enrolling_and_active,
    import_is_idempotent,
    list_devices_filters,
    count_by_state_reports_every_state,
    transitions_and_firmware_version,
    events_ordering_and_limit,
    old_events_are_deleted_in_batches,
    firmware_jobs,
    admin_replies_are_idempotent,
    identifiers_compare_exactly,
    a_revoke_is_never_overwritten_by_a_rollback,
    firmware_progress_only_moves_forward,
    changes_are_fed_with_their_writes,
    reenrollment_is_bound_to_the_first_factory_issuer,
    combined_reads_agree_with_the_single_ones,
    concurrent_writes_fail_alone,
);

// ---- helpers --------------------------------------------------------------------------------

/// Enroll `device` (first enrollment) issuing `serial`; returns the new generation.
async fn enroll(cx: &Ctx, device: &str, request: &str, serial: &str) -> i64 {
    cx.store
        .commit_enrollment(EnrollmentBuilder::new(device, request, &cx.id(serial)).build())
        .await
        .expect("first enrollment")
        .generation
}

/// Every state but `revoked`.
const NOT_REVOKED: [DeviceState; 4] = [
    DeviceState::Pending,
    DeviceState::Enrolling,
    DeviceState::Active,
    DeviceState::Failed,
];

/// Revoke a device the way an admin does (from any state but revoked).
async fn revoke(s: &Arc<dyn Store>, device: &str) {
    s.transition(
        device,
        &NOT_REVOKED,
        TransitionTarget::new(DeviceState::Revoked).with_error("stolen"),
        event(device, "revoked"),
    )
    .await
    .expect("revoke");
}

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Conflict(_)))
}

async fn event_names(cx: &Ctx, device: &str) -> Vec<String> {
    cx.store
        .events(device, 1_000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.event)
        .collect()
}

async fn ids(cx: &Ctx, filter: DeviceFilter) -> Vec<String> {
    cx.store
        .list_devices(&filter)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.id)
        .collect()
}

// ---- cases ----------------------------------------------------------------------------------

async fn ping_and_backend(cx: Ctx) {
    cx.store.ping().await.expect("ping");
    assert!(["sqlite", "mssql"].contains(&cx.store.backend()));
}

async fn enrollment_commit_writes_everything(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("dev");
    let serial = cx.id("s1");
    assert!(s.device(&d).await.unwrap().is_none());
    assert!(s.find_enrollment(&d, "r-1").await.unwrap().is_none());

    let commit = EnrollmentBuilder::new(&d, "r-1", &serial).build();
    let before = now();
    let done = s.commit_enrollment(commit.clone()).await.unwrap();
    assert_eq!(done.generation, 1);
    assert_eq!(done.config.device_id, d);
    assert_eq!(done.config.version, 1);
    assert_eq!(done.config.created_by, "gateway");
    assert_eq!(done.config.body, commit.config_body);
    assert_eq!(done.config.applied_at, None);
    assert_eq!(done.config.failed_error, None);

    let device = s.device(&d).await.unwrap().expect("device row");
    assert_eq!(device.id, d);
    assert_eq!(device.state, DeviceState::Enrolling);
    assert_eq!(device.generation, 1);
    assert_eq!(device.device_type, "thermostat");
    assert_eq!(device.model.as_deref(), Some("T-1000"));
    assert_eq!(device.location, None);
    assert_eq!(device.firmware_version.as_deref(), Some("1.4.2"));
    assert_eq!(device.credential_kind, Some(CredentialKind::Certificate));
    assert_eq!(device.current_serial.as_deref(), Some(serial.as_str()));
    assert_eq!(device.activation_deadline, Some(commit.activation_deadline));
    assert!(device.enrolled_at.expect("enrolled_at") >= before);
    assert!(device.created_at >= before);
    assert_eq!(device.activated_at, None);
    assert_eq!(device.last_error, None);

    assert_eq!(
        s.credential(&serial).await.unwrap(),
        Some(commit.credential.clone())
    );
    assert_eq!(
        s.credentials_of(&d).await.unwrap(),
        vec![commit.credential.clone()]
    );
    assert_eq!(
        s.latest_config(&d).await.unwrap(),
        Some(done.config.clone())
    );
    assert_eq!(
        s.config_version(&d, 1).await.unwrap(),
        Some(done.config.clone())
    );
    assert_eq!(
        s.config_history(&d).await.unwrap(),
        vec![done.config.clone()]
    );
    assert_eq!(s.events(&d, 100).await.unwrap(), commit.events);

    let stored = s
        .find_enrollment(&d, "r-1")
        .await
        .unwrap()
        .expect("stored enrollment");
    assert_eq!(stored.device_id, d);
    assert_eq!(stored.request_id, "r-1");
    assert_eq!(stored.serial, serial);
    assert_eq!(stored.response, commit.response);
    assert!(stored.created_at >= before);

    let pending = s.pending_activations().await.unwrap();
    let mine: Vec<_> = pending.iter().filter(|p| p.device_id == d).collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].serial, serial);
    assert_eq!(mine[0].deadline, commit.activation_deadline);
}

async fn enrollment_with_password_credential(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("pw");
    let serial = cx.id("pw-1");
    let credential = password_credential(&d, &serial);
    let commit = EnrollmentBuilder::new(&d, "r-1", &serial)
        .credential(credential.clone())
        .build();
    s.commit_enrollment(commit).await.unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.credential_kind, Some(CredentialKind::Password));
    assert_eq!(s.credential(&serial).await.unwrap(), Some(credential));
}

async fn retry_finds_stored_response_and_duplicate_request_conflicts(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("retry");
    let commit = EnrollmentBuilder::new(&d, "r-1", &cx.id("s1")).build();
    s.commit_enrollment(commit.clone()).await.unwrap();

    // A retry is answered from the store.
    let stored = s.find_enrollment(&d, "r-1").await.unwrap().unwrap();
    assert_eq!(stored.response, commit.response);
    assert!(s.find_enrollment(&d, "r-2").await.unwrap().is_none());
    assert!(s
        .find_enrollment(&cx.id("other"), "r-1")
        .await
        .unwrap()
        .is_none());

    // Committing the same request id again (even with the right generation) is a conflict and
    // writes nothing.
    let again = EnrollmentBuilder::new(&d, "r-1", &cx.id("s2"))
        .expected_generation(Some(1))
        .build();
    assert!(is_conflict(&s.commit_enrollment(again).await));
    assert!(s.credential(&cx.id("s2")).await.unwrap().is_none());
    assert_eq!(s.credentials_of(&d).await.unwrap().len(), 1);
    assert_eq!(s.device(&d).await.unwrap().unwrap().generation, 1);
    assert_eq!(s.config_history(&d).await.unwrap().len(), 1);
    assert_eq!(s.events(&d, 100).await.unwrap().len(), 2);
    assert_eq!(
        s.find_enrollment(&d, "r-1")
            .await
            .unwrap()
            .unwrap()
            .response,
        commit.response
    );
}

/// `enrollment_context` and `credential_and_device` (one round trip each on a server) answer
/// exactly what their single reads answer, found or not, in every combination.
async fn combined_reads_agree_with_the_single_ones(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("both");
    let serial = cx.id("both-s1");
    let nobody = cx.id("nobody");
    let (stored, device) = s.enrollment_context(&d, "r-1").await.unwrap();
    assert!(stored.is_none() && device.is_none());
    assert_eq!(
        s.credential_and_device(&serial, &d).await.unwrap(),
        (None, None)
    );

    let commit = EnrollmentBuilder::new(&d, "r-1", &serial).build();
    s.commit_enrollment(commit.clone()).await.unwrap();
    let (stored, device) = s.enrollment_context(&d, "r-1").await.unwrap();
    assert_eq!(stored.unwrap().response, commit.response);
    assert_eq!(device, s.device(&d).await.unwrap());
    assert_eq!(device.unwrap().state, DeviceState::Enrolling);
    // Another request id of the same device: no answer, the device all the same.
    let (stored, device) = s.enrollment_context(&d, "r-2").await.unwrap();
    assert!(stored.is_none());
    assert_eq!(device.unwrap().id, d);

    let (credential, device) = s.credential_and_device(&serial, &d).await.unwrap();
    assert_eq!(credential, s.credential(&serial).await.unwrap());
    assert_eq!(credential.unwrap().device_id, d);
    assert_eq!(device, s.device(&d).await.unwrap());
    // Each half is looked up by its own key.
    let (credential, device) = s.credential_and_device(&serial, &nobody).await.unwrap();
    assert!(credential.is_some() && device.is_none());
    let (credential, device) = s
        .credential_and_device(&cx.id("no-serial"), &d)
        .await
        .unwrap();
    assert!(credential.is_none() && device.is_some());
}

async fn failed_commit_leaves_nothing_behind(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("atomic");

    // Expecting a generation of a device that does not exist.
    let ghost = EnrollmentBuilder::new(&d, "r-0", &cx.id("s0"))
        .expected_generation(Some(0))
        .build();
    assert!(is_conflict(&s.commit_enrollment(ghost).await));
    assert!(s.device(&d).await.unwrap().is_none());
    assert!(s.credential(&cx.id("s0")).await.unwrap().is_none());
    assert!(s.latest_config(&d).await.unwrap().is_none());
    assert!(s.events(&d, 100).await.unwrap().is_empty());
    assert!(s.find_enrollment(&d, "r-0").await.unwrap().is_none());

    let first = EnrollmentBuilder::new(&d, "r-1", &cx.id("s1")).build();
    s.commit_enrollment(first.clone()).await.unwrap();
    let snapshot = s.device(&d).await.unwrap().unwrap();

    let rejected = [
        // stale generation
        EnrollmentBuilder::new(&d, "r-2", &cx.id("s2"))
            .expected_generation(Some(7))
            .build(),
        // "new device" that exists
        EnrollmentBuilder::new(&d, "r-3", &cx.id("s3")).build(),
        // right generation, but the serial is already taken: the device update must roll back
        EnrollmentBuilder::new(&d, "r-4", &cx.id("s4"))
            .expected_generation(Some(1))
            .credential(credential(&d, &cx.id("s1")))
            .build(),
    ];
    for commit in rejected {
        let request = commit.request_id.clone();
        let result = s.commit_enrollment(commit).await;
        assert!(is_conflict(&result), "{request}: {result:?}");
        assert_eq!(s.device(&d).await.unwrap().unwrap(), snapshot, "{request}");
        assert_eq!(
            s.credentials_of(&d).await.unwrap(),
            vec![first.credential.clone()]
        );
        assert_eq!(s.config_history(&d).await.unwrap().len(), 1, "{request}");
        assert_eq!(s.events(&d, 100).await.unwrap(), first.events, "{request}");
        assert!(s.find_enrollment(&d, &request).await.unwrap().is_none());
    }
    for serial in ["s2", "s3", "s4"] {
        assert!(s.credential(&cx.id(serial)).await.unwrap().is_none());
    }

    // The right generation still works afterwards.
    let ok = EnrollmentBuilder::new(&d, "r-5", &cx.id("s5"))
        .expected_generation(Some(1))
        .build();
    let done = s.commit_enrollment(ok).await.unwrap();
    assert_eq!(done.generation, 2);
    assert_eq!(done.config.version, 2);
}

async fn concurrent_commits_have_exactly_one_winner(cx: Ctx) {
    let s = &cx.store;
    for round in 0..5 {
        let d = cx.id(&format!("race{round}"));
        // Two first enrollments of the same new device.
        let results = race(
            s,
            EnrollmentBuilder::new(&d, "r-a", &cx.id(&format!("{round}-a"))).build(),
            EnrollmentBuilder::new(&d, "r-b", &cx.id(&format!("{round}-b"))).build(),
        )
        .await;
        assert_one_winner(&results);
        assert_eq!(s.credentials_of(&d).await.unwrap().len(), 1);
        assert_eq!(s.config_history(&d).await.unwrap().len(), 1);
        let device = s.device(&d).await.unwrap().unwrap();
        assert_eq!(device.generation, 1);

        // Two re-enrollments expecting the same generation.
        let results = race(
            s,
            EnrollmentBuilder::new(&d, "r-c", &cx.id(&format!("{round}-c")))
                .expected_generation(Some(1))
                .build(),
            EnrollmentBuilder::new(&d, "r-d", &cx.id(&format!("{round}-d")))
                .expected_generation(Some(1))
                .build(),
        )
        .await;
        assert_one_winner(&results);
        let device = s.device(&d).await.unwrap().unwrap();
        assert_eq!(device.generation, 2);
        let creds = s.credentials_of(&d).await.unwrap();
        assert_eq!(creds.len(), 2, "one credential per winning enrollment");
        assert_eq!(device.current_serial.as_ref(), Some(&creds[1].serial));
        assert_eq!(s.config_history(&d).await.unwrap().len(), 2);
    }
}

/// Many enrollments at once, every third refused (its serial is taken): each caller hears its
/// own outcome, the refused ones leave nothing behind, and none of the others is lost with them
/// (a backend may commit concurrent writes together).
async fn concurrent_writes_fail_alone(cx: Ctx) {
    const WRITES: usize = 96;
    let s = &cx.store;
    let taken = cx.id("taken");
    enroll(&cx, &cx.id("owner"), "r-1", "taken").await;
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITES));
    let mut tasks = Vec::new();
    for i in 0..WRITES {
        let d = cx.id(&format!("crowd{i}"));
        let mut commit = EnrollmentBuilder::new(&d, "r-1", &cx.id(&format!("crowd{i}-s")));
        if i % 3 == 0 {
            commit = commit.credential(credential(&d, &taken));
        }
        let (store, barrier) = (Arc::clone(s), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            (i, d, store.commit_enrollment(commit.build()).await)
        }));
    }
    for task in tasks {
        let (i, d, result) = task.await.unwrap();
        let device = s.device(&d).await.unwrap();
        if i % 3 == 0 {
            assert!(is_conflict(&result), "{d}: {result:?}");
            assert!(device.is_none(), "{d} refused but stored");
            assert!(s.events(&d, 10).await.unwrap().is_empty(), "{d}");
            assert!(s.find_enrollment(&d, "r-1").await.unwrap().is_none(), "{d}");
        } else {
            let committed = result.unwrap_or_else(|e| panic!("{d}: {e:?}"));
            assert_eq!(committed.generation, 1, "{d}");
            let device = device.unwrap_or_else(|| panic!("{d} told done but not stored"));
            let serial = cx.id(&format!("crowd{i}-s"));
            assert_eq!(device.current_serial.as_ref(), Some(&serial));
            assert!(s.credential(&serial).await.unwrap().is_some(), "{d}");
            assert_eq!(s.config_history(&d).await.unwrap().len(), 1, "{d}");
        }
    }
    let owner = s.credential(&taken).await.unwrap().unwrap();
    assert_eq!(owner.device_id, cx.id("owner"));
}

async fn race(
    store: &Arc<dyn Store>,
    a: onboard::store::EnrollmentCommit,
    b: onboard::store::EnrollmentCommit,
) -> Vec<Result<onboard::store::EnrollmentCommitted, StoreError>> {
    let (sa, sb) = (Arc::clone(store), Arc::clone(store));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let (ba, bb) = (Arc::clone(&barrier), Arc::clone(&barrier));
    let ta = tokio::spawn(async move {
        ba.wait().await;
        sa.commit_enrollment(a).await
    });
    let tb = tokio::spawn(async move {
        bb.wait().await;
        sb.commit_enrollment(b).await
    });
    vec![ta.await.unwrap(), tb.await.unwrap()]
}

fn assert_one_winner(results: &[Result<onboard::store::EnrollmentCommitted, StoreError>]) {
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results.iter().filter(|r| is_conflict(r)).count();
    assert_eq!((wins, conflicts), (1, 1), "{results:?}");
}

async fn activation_transitions(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("act");
    let serial = cx.id("s1");
    enroll(&cx, &d, "r-1", "s1").await;
    let events_before = s.events(&d, 100).await.unwrap().len();

    // Wrong serial: refused, nothing written.
    assert!(!s
        .activate(&d, &cx.id("nope"), event(&d, "activated"))
        .await
        .unwrap());
    assert_eq!(
        s.device(&d).await.unwrap().unwrap().state,
        DeviceState::Enrolling
    );
    assert_eq!(s.events(&d, 100).await.unwrap().len(), events_before);

    let before = now();
    assert!(s
        .activate(&d, &serial, event(&d, "activated"))
        .await
        .unwrap());
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Active);
    assert!(device.activated_at.expect("device activated_at") >= before);
    let cred = s.credential(&serial).await.unwrap().unwrap();
    assert!(cred.activated_at.expect("credential activated_at") >= before);
    assert!(!cred.is_revoked());
    assert!(!s
        .pending_activations()
        .await
        .unwrap()
        .iter()
        .any(|p| p.device_id == d));
    assert_eq!(
        event_names(&cx, &d).await.last().map(String::as_str),
        Some("activated")
    );

    // Not enrolling any more: both transitions refuse.
    assert!(!s
        .activate(&d, &serial, event(&d, "activated"))
        .await
        .unwrap());
    assert!(!s
        .expire_enrollment(&d, &serial, event(&d, "activation_expired"))
        .await
        .unwrap());
    let after = s.device(&d).await.unwrap().unwrap();
    assert_eq!(after.state, DeviceState::Active);
    assert_eq!(after.activated_at, device.activated_at);
    assert!(!s.credential(&serial).await.unwrap().unwrap().is_revoked());
    assert_eq!(s.events(&d, 100).await.unwrap().len(), events_before + 1);

    // Unknown device.
    assert!(!s
        .activate(&cx.id("ghost"), &serial, event(&d, "activated"))
        .await
        .unwrap());
}

async fn expiry_transitions(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("exp");
    let serial = cx.id("s1");
    let deadline = now() - Duration::seconds(1);
    s.commit_enrollment(
        EnrollmentBuilder::new(&d, "r-1", &serial)
            .deadline(deadline)
            .build(),
    )
    .await
    .unwrap();
    let pending = s.pending_activations().await.unwrap();
    assert!(pending
        .iter()
        .any(|p| p.device_id == d && p.serial == serial && p.deadline == deadline));

    assert!(!s
        .expire_enrollment(&d, &cx.id("other"), event(&d, "activation_expired"))
        .await
        .unwrap());
    assert_eq!(
        s.device(&d).await.unwrap().unwrap().state,
        DeviceState::Enrolling
    );

    assert!(s
        .expire_enrollment(&d, &serial, event(&d, "activation_expired"))
        .await
        .unwrap());
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Failed);
    assert!(device.last_error.is_some());
    let cred = s.credential(&serial).await.unwrap().unwrap();
    assert!(cred.is_revoked());
    assert_eq!(cred.revoke_reason.as_deref(), Some("activation_timeout"));
    assert!(s.revoked_serials().await.unwrap().contains(&serial));
    assert!(!s
        .pending_activations()
        .await
        .unwrap()
        .iter()
        .any(|p| p.device_id == d));
    assert_eq!(
        event_names(&cx, &d).await.last().map(String::as_str),
        Some("activation_expired")
    );

    // Once failed, neither transition applies.
    assert!(!s
        .expire_enrollment(&d, &serial, event(&d, "activation_expired"))
        .await
        .unwrap());
    assert!(!s
        .activate(&d, &serial, event(&d, "activated"))
        .await
        .unwrap());
    assert_eq!(
        s.device(&d).await.unwrap().unwrap().state,
        DeviceState::Failed
    );

    // The device may enroll again; the new enrollment clears the error.
    let again = EnrollmentBuilder::new(&d, "r-2", &cx.id("s2"))
        .expected_generation(Some(device.generation))
        .build();
    let done = s.commit_enrollment(again).await.unwrap();
    assert_eq!(done.generation, device.generation + 1);
    assert_eq!(done.config.version, 2);
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Enrolling);
    assert_eq!(device.last_error, None);
    assert_eq!(device.activated_at, None);
}

async fn reenrollment_revokes_others_and_activation_supersedes(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("reenroll");
    let (s1, s2, s3) = (cx.id("s1"), cx.id("s2"), cx.id("s3"));
    enroll(&cx, &d, "r-1", "s1").await;

    // s1 never activated: the re-enrollment revokes it at once.
    let second = EnrollmentBuilder::new(&d, "r-2", &s2)
        .expected_generation(Some(1))
        .revoke_others("reenrolled")
        .config_body(json!({ "device_id": d, "settings": { "mode": "cool" } }))
        .build();
    let done = s.commit_enrollment(second).await.unwrap();
    assert_eq!(done.generation, 2);
    assert_eq!(done.config.version, 2);
    let c1 = s.credential(&s1).await.unwrap().unwrap();
    assert!(c1.is_revoked());
    assert_eq!(c1.revoke_reason.as_deref(), Some("reenrolled"));
    assert!(!s.credential(&s2).await.unwrap().unwrap().is_revoked());
    let history = s.config_history(&d).await.unwrap();
    assert_eq!(
        history.iter().map(|c| c.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(history[1].body["settings"]["mode"], "cool");

    // Without revoke_others the previous credential stays valid until the new one activates.
    let third = EnrollmentBuilder::new(&d, "r-3", &s3)
        .expected_generation(Some(2))
        .build();
    s.commit_enrollment(third).await.unwrap();
    assert!(!s.credential(&s2).await.unwrap().unwrap().is_revoked());
    assert_eq!(
        s.device(&d).await.unwrap().unwrap().current_serial,
        Some(s3.clone())
    );

    // Only the current serial activates; that revokes the others as superseded.
    assert!(!s.activate(&d, &s2, event(&d, "activated")).await.unwrap());
    assert!(s.activate(&d, &s3, event(&d, "activated")).await.unwrap());
    let c2 = s.credential(&s2).await.unwrap().unwrap();
    assert!(c2.is_revoked());
    assert_eq!(c2.revoke_reason.as_deref(), Some("superseded"));
    assert_eq!(
        s.credential(&s1)
            .await
            .unwrap()
            .unwrap()
            .revoke_reason
            .as_deref(),
        Some("reenrolled"),
        "an earlier revocation is kept"
    );
    assert!(!s.credential(&s3).await.unwrap().unwrap().is_revoked());
    let revoked = s.revoked_serials().await.unwrap();
    assert!(revoked.contains(&s1) && revoked.contains(&s2) && !revoked.contains(&s3));

    // An active device re-enrolls (factory reset): the active credential survives until the new
    // one activates.
    let fourth = EnrollmentBuilder::new(&d, "r-4", &cx.id("s4"))
        .expected_generation(Some(3))
        .build();
    s.commit_enrollment(fourth).await.unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Enrolling);
    assert_eq!(device.activated_at, None);
    assert!(!s.credential(&s3).await.unwrap().unwrap().is_revoked());
    assert_eq!(s.config_history(&d).await.unwrap().len(), 4);
}

async fn enrollment_of_imported_device(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("imported");
    let outcome = s
        .import_devices(&[new_device(&d, "thermostat")])
        .await
        .unwrap();
    assert_eq!(outcome.inserted, 1);
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Pending);
    assert_eq!(device.generation, 0);
    assert_eq!(device.current_serial, None);

    // The row exists: a "new device" commit conflicts.
    let wrong = EnrollmentBuilder::new(&d, "r-1", &cx.id("s1")).build();
    assert!(is_conflict(&s.commit_enrollment(wrong).await));
    assert_eq!(s.device(&d).await.unwrap().unwrap(), device);

    // Metadata the request carries replaces the imported values; absent values are kept.
    let commit = EnrollmentBuilder::new(&d, "r-2", &cx.id("s2"))
        .expected_generation(Some(0))
        .metadata(Some("T-2000"), None, None)
        .build();
    let done = s.commit_enrollment(commit).await.unwrap();
    assert_eq!(done.generation, 1);
    assert_eq!(done.config.version, 1);
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Enrolling);
    assert_eq!(device.model.as_deref(), Some("T-2000"));
    assert_eq!(device.location.as_deref(), Some("bldg-7/floor-2"));
    assert_eq!(device.firmware_version.as_deref(), Some("1.0.0"));
}

async fn revoked_device_refuses_enrollment(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("revoked");
    s.import_devices(&[new_device(&d, "thermostat")])
        .await
        .unwrap();
    revoke(s, &d).await;
    // A gateway that read the device before the revocation must not resurrect it.
    let commit = EnrollmentBuilder::new(&d, "r-1", &cx.id("s1"))
        .expected_generation(Some(0))
        .build();
    assert!(is_conflict(&s.commit_enrollment(commit).await));
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Revoked);
    assert!(s.credentials_of(&d).await.unwrap().is_empty());
}

async fn credential_operations(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("creds");
    let (s1, s2, s3) = (cx.id("s1"), cx.id("s2"), cx.id("s3"));
    enroll(&cx, &d, "r-1", "s1").await;

    // Renewal inserts a credential outside enrollment.
    let renewed = credential(&d, &s2);
    s.insert_credential(&renewed, event(&d, "certificate_renewed"))
        .await
        .unwrap();
    assert_eq!(s.credential(&s2).await.unwrap(), Some(renewed.clone()));
    let serials: Vec<String> = s
        .credentials_of(&d)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert_eq!(serials, vec![s1.clone(), s2.clone()]);
    assert!(event_names(&cx, &d)
        .await
        .contains(&"certificate_renewed".to_owned()));
    assert!(is_conflict(
        &s.insert_credential(&renewed, event(&d, "certificate_renewed"))
            .await
    ));
    let ghost = cx.id("ghost");
    assert!(matches!(
        s.insert_credential(&credential(&ghost, &cx.id("g1")), event(&ghost, "x"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.events(&ghost, 10).await.unwrap().is_empty());
    assert!(s.credential(&cx.id("g1")).await.unwrap().is_none());

    let password = password_credential(&d, &s3);
    s.insert_credential(&password, event(&d, "credential_issued"))
        .await
        .unwrap();
    assert_eq!(s.credential(&s3).await.unwrap(), Some(password));

    // First use.
    assert!(s.mark_credential_used(&s2).await.unwrap());
    let used_at = s.credential(&s2).await.unwrap().unwrap().activated_at;
    assert!(used_at.is_some());
    assert!(!s.mark_credential_used(&s2).await.unwrap());
    assert_eq!(
        s.credential(&s2).await.unwrap().unwrap().activated_at,
        used_at
    );
    assert!(!s.mark_credential_used(&cx.id("unknown")).await.unwrap());

    // Revoke one.
    assert!(s.revoke_credential(&s2, "compromised").await.unwrap());
    assert!(!s.revoke_credential(&s2, "again").await.unwrap());
    assert!(!s.revoke_credential(&cx.id("unknown"), "x").await.unwrap());
    let c2 = s.credential(&s2).await.unwrap().unwrap();
    assert!(c2.is_revoked());
    assert_eq!(c2.revoke_reason.as_deref(), Some("compromised"));
    let revoked = s.revoked_serials().await.unwrap();
    assert!(revoked.contains(&s2) && !revoked.contains(&s1));

    // Revoke the rest of the device.
    let mut all = s
        .revoke_device_credentials(&d, "admin_revoke")
        .await
        .unwrap();
    all.sort();
    let mut expected = vec![s1.clone(), s3.clone()];
    expected.sort();
    assert_eq!(all, expected);
    assert!(s
        .revoke_device_credentials(&d, "admin_revoke")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.credential(&s2)
            .await
            .unwrap()
            .unwrap()
            .revoke_reason
            .as_deref(),
        Some("compromised")
    );
    let revoked = s.revoked_serials().await.unwrap();
    for serial in [&s1, &s2, &s3] {
        assert!(revoked.contains(serial), "{serial}");
    }
    if cx.exclusive {
        assert_eq!(revoked.len(), 3);
    }
    assert!(s
        .revoke_device_credentials(&ghost, "x")
        .await
        .unwrap()
        .is_empty());
}

async fn config_versions_acks_and_history(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("cfg");
    let first = EnrollmentBuilder::new(&d, "r-1", &cx.id("s1")).build();
    s.commit_enrollment(first.clone()).await.unwrap();

    let body2 = json!({ "device_id": d, "version": 2, "settings": { "mode": "cool" } });
    let v2 = s
        .insert_config(&d, body2.clone(), "alice", event(&d, "config_created"))
        .await
        .unwrap();
    assert_eq!((v2.version, v2.created_by.as_str()), (2, "alice"));
    assert_eq!(v2.body, body2);
    assert_eq!(s.latest_config(&d).await.unwrap(), Some(v2.clone()));
    assert_eq!(
        s.config_version(&d, 1).await.unwrap().unwrap().body,
        first.config_body
    );
    assert_eq!(s.config_version(&d, 2).await.unwrap(), Some(v2.clone()));
    assert!(s.config_version(&d, 99).await.unwrap().is_none());

    // Applied.
    assert!(s
        .ack_config(&d, 2, None, event(&d, "config_applied"))
        .await
        .unwrap());
    let applied = s.config_version(&d, 2).await.unwrap().unwrap();
    assert!(applied.applied_at.is_some());
    assert_eq!(applied.failed_error, None);

    // Failed.
    let v3 = s
        .insert_config(
            &d,
            json!({ "version": 3 }),
            "bob",
            event(&d, "config_created"),
        )
        .await
        .unwrap();
    assert_eq!(v3.version, 3);
    assert!(s
        .ack_config(&d, 3, Some("bad setting"), event(&d, "config_failed"))
        .await
        .unwrap());
    let failed = s.config_version(&d, 3).await.unwrap().unwrap();
    assert_eq!(failed.failed_error.as_deref(), Some("bad setting"));
    assert_eq!(failed.applied_at, None);

    // Unknown version or device.
    assert!(!s
        .ack_config(&d, 42, None, event(&d, "config_applied"))
        .await
        .unwrap());
    let ghost = cx.id("ghost");
    assert!(!s
        .ack_config(&ghost, 1, None, event(&ghost, "config_applied"))
        .await
        .unwrap());
    assert!(matches!(
        s.insert_config(&ghost, json!({}), "alice", event(&ghost, "config_created"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.latest_config(&ghost).await.unwrap().is_none());
    assert!(s.config_history(&ghost).await.unwrap().is_empty());

    let history = s.config_history(&d).await.unwrap();
    assert_eq!(
        history.iter().map(|c| c.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(history[1], applied);
    assert_eq!(history[2], failed);
    let names = event_names(&cx, &d).await;
    for name in ["config_created", "config_applied", "config_failed"] {
        assert!(names.contains(&name.to_owned()), "{name} in {names:?}");
    }
}

async fn published_configs_are_newest_of_enrolling_and_active(cx: Ctx) {
    let s = &cx.store;
    let (enrolling, active, failed, pending, revoked) = (
        cx.id("p-enrolling"),
        cx.id("p-active"),
        cx.id("p-failed"),
        cx.id("p-pending"),
        cx.id("p-revoked"),
    );
    enroll(&cx, &enrolling, "r-1", "e1").await;
    enroll(&cx, &active, "r-1", "a1").await;
    assert!(s
        .activate(&active, &cx.id("a1"), event(&active, "activated"))
        .await
        .unwrap());
    s.insert_config(
        &active,
        json!({ "v": 2 }),
        "alice",
        event(&active, "config_created"),
    )
    .await
    .unwrap();
    enroll(&cx, &failed, "r-1", "f1").await;
    assert!(s
        .expire_enrollment(&failed, &cx.id("f1"), event(&failed, "activation_expired"))
        .await
        .unwrap());
    s.import_devices(&[new_device(&pending, "thermostat")])
        .await
        .unwrap();
    enroll(&cx, &revoked, "r-1", "x1").await;
    revoke(s, &revoked).await;

    let all = s.published_configs("", u32::MAX).await.unwrap();
    // Paged: each page continues after the last device id of the one before.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let page = s.published_configs(&after, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.device_id.clone();
        paged.extend(page);
    }
    assert_eq!(paged, all);
    let mut mine: Vec<_> = all
        .iter()
        .filter(|c| cx.mine(&c.device_id))
        .cloned()
        .collect();
    mine.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let got: Vec<(String, i64)> = mine
        .iter()
        .map(|c| (c.device_id.clone(), c.version))
        .collect();
    assert_eq!(got, vec![(active.clone(), 2), (enrolling.clone(), 1)]);
    assert_eq!(
        Some(mine[0].clone()),
        s.latest_config(&active).await.unwrap()
    );
    if cx.exclusive {
        assert_eq!(all.len(), 2);
    }
}

async fn import_is_idempotent(cx: Ctx) {
    let s = &cx.store;
    let kind = cx.id("meter");
    let (a, b, c) = (cx.id("imp-a"), cx.id("imp-b"), cx.id("imp-c"));
    let batch = vec![
        new_device(&a, &kind),
        new_device(&b, &kind),
        new_device(&c, &kind),
    ];

    let first = s.import_devices(&batch).await.unwrap();
    assert_eq!(
        first,
        ImportOutcome {
            inserted: 3,
            ..Default::default()
        }
    );
    let device = s.device(&a).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Pending);
    assert_eq!(device.device_type, kind);
    assert_eq!(device.model.as_deref(), Some("T-1000"));
    assert_eq!(device.location.as_deref(), Some("bldg-7/floor-2"));
    assert_eq!(device.firmware_version.as_deref(), Some("1.0.0"));
    assert_eq!(device.credential_kind, None);

    let again = s.import_devices(&batch).await.unwrap();
    assert_eq!(
        again,
        ImportOutcome {
            unchanged: 3,
            ..Default::default()
        }
    );
    assert_eq!(s.device(&a).await.unwrap().unwrap(), device);

    // Changed metadata of a pending device: updated.
    let moved = NewDevice {
        location: Some("bldg-9".into()),
        ..new_device(&a, &kind)
    };
    let outcome = s
        .import_devices(&[moved, new_device(&b, &kind), new_device(&c, &kind)])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ImportOutcome {
            unchanged: 2,
            updated: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        s.device(&a).await.unwrap().unwrap().location.as_deref(),
        Some("bldg-9")
    );

    // A device past pending is left alone.
    let enrolled = EnrollmentBuilder::new(&b, "r-1", &cx.id("s1"))
        .expected_generation(Some(0))
        .device_type(&kind)
        .build();
    s.commit_enrollment(enrolled).await.unwrap();
    let before = s.device(&b).await.unwrap().unwrap();
    let outcome = s
        .import_devices(&[
            new_device(&b, &kind),
            NewDevice {
                model: Some("X-9".into()),
                ..new_device(&b, &kind)
            },
            new_device(&cx.id("imp-d"), &kind),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        ImportOutcome {
            inserted: 1,
            skipped: 2,
            ..Default::default()
        }
    );
    assert_eq!(s.device(&b).await.unwrap().unwrap(), before);

    assert_eq!(
        s.import_devices(&[]).await.unwrap(),
        ImportOutcome::default()
    );
    assert_eq!(ids(&cx, of_type(&kind)).await.len(), 4);
}

async fn list_devices_filters(cx: Ctx) {
    let s = &cx.store;
    let kind = cx.id("lister");
    let other_kind = cx.id("other");
    let names = ["a", "b", "c", "d", "e"];
    let devices: Vec<String> = names.iter().map(|n| cx.id(&format!("l-{n}"))).collect();
    // Imported out of order: listing is ordered by id.
    let mut batch: Vec<NewDevice> = devices.iter().rev().map(|d| new_device(d, &kind)).collect();
    batch.push(new_device(&cx.id("l-z"), &other_kind));
    s.import_devices(&batch).await.unwrap();

    assert_eq!(ids(&cx, of_type(&kind)).await, devices);
    let page = |limit: Option<u32>, offset: Option<u32>| DeviceFilter {
        limit,
        offset,
        ..of_type(&kind)
    };
    assert_eq!(ids(&cx, page(Some(2), None)).await, devices[..2].to_vec());
    assert_eq!(
        ids(&cx, page(Some(2), Some(2))).await,
        devices[2..4].to_vec()
    );
    assert_eq!(ids(&cx, page(None, Some(4))).await, devices[4..].to_vec());
    assert_eq!(
        ids(&cx, page(Some(10), Some(10))).await,
        Vec::<String>::new()
    );
    assert_eq!(ids(&cx, of_type(&other_kind)).await, vec![cx.id("l-z")]);

    // c: enrolling, certificate expiring in 10 days; d: active, expiring in 100 days.
    let (c, d) = (&devices[2], &devices[3]);
    let soon = now() + Duration::days(10);
    let later = now() + Duration::days(100);
    let commit_c = EnrollmentBuilder::new(c, "r-1", &cx.id("c1"))
        .expected_generation(Some(0))
        .device_type(&kind)
        .credential(credential_expiring(c, &cx.id("c1"), soon))
        .build();
    s.commit_enrollment(commit_c).await.unwrap();
    let commit_d = EnrollmentBuilder::new(d, "r-1", &cx.id("d1"))
        .expected_generation(Some(0))
        .device_type(&kind)
        .credential(credential_expiring(d, &cx.id("d1"), later))
        .build();
    s.commit_enrollment(commit_d).await.unwrap();
    assert!(s
        .activate(d, &cx.id("d1"), event(d, "activated"))
        .await
        .unwrap());

    let by_state = |state: DeviceState| DeviceFilter {
        state: Some(state),
        ..of_type(&kind)
    };
    assert_eq!(
        ids(&cx, by_state(DeviceState::Enrolling)).await,
        vec![c.clone()]
    );
    assert_eq!(
        ids(&cx, by_state(DeviceState::Active)).await,
        vec![d.clone()]
    );
    assert_eq!(
        ids(&cx, by_state(DeviceState::Pending)).await,
        vec![devices[0].clone(), devices[1].clone(), devices[4].clone()]
    );
    assert!(ids(&cx, by_state(DeviceState::Failed)).await.is_empty());

    let expiring = |before: time::OffsetDateTime| DeviceFilter {
        expiring_before: Some(before),
        ..of_type(&kind)
    };
    assert_eq!(
        ids(&cx, expiring(now() + Duration::days(30))).await,
        vec![c.clone()]
    );
    assert_eq!(
        ids(&cx, expiring(now() + Duration::days(365))).await,
        vec![c.clone(), d.clone()]
    );
    assert!(ids(&cx, expiring(now())).await.is_empty());
    let active_expiring = DeviceFilter {
        state: Some(DeviceState::Active),
        expiring_before: Some(now() + Duration::days(365)),
        ..of_type(&kind)
    };
    assert_eq!(ids(&cx, active_expiring).await, vec![d.clone()]);

    // Only the current credential counts: after re-enrollment with a long-lived certificate, c is
    // no longer expiring, though its old certificate still is.
    let again = EnrollmentBuilder::new(c, "r-2", &cx.id("c2"))
        .expected_generation(Some(1))
        .device_type(&kind)
        .credential(credential_expiring(
            c,
            &cx.id("c2"),
            now() + Duration::days(365),
        ))
        .build();
    s.commit_enrollment(again).await.unwrap();
    assert!(ids(&cx, expiring(now() + Duration::days(30)))
        .await
        .is_empty());

    let everything = ids(&cx, DeviceFilter::default()).await;
    for id in devices.iter().chain([&cx.id("l-z")]) {
        assert!(everything.contains(id), "{id}");
    }
    let mut sorted = everything.clone();
    sorted.sort();
    assert_eq!(everything, sorted);
}

async fn count_by_state_reports_every_state(cx: Ctx) {
    let s = &cx.store;
    let counts = s.count_by_state().await.unwrap();
    let states: Vec<DeviceState> = counts.iter().map(|(state, _)| *state).collect();
    assert_eq!(states.len(), 5);
    for state in DeviceState::ALL {
        assert!(states.contains(&state), "{state}");
    }
    if cx.exclusive {
        assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
    }

    let (p1, p2, e, a, f, r) = (
        cx.id("n-p1"),
        cx.id("n-p2"),
        cx.id("n-e"),
        cx.id("n-a"),
        cx.id("n-f"),
        cx.id("n-r"),
    );
    s.import_devices(&[new_device(&p1, "thermostat"), new_device(&p2, "thermostat")])
        .await
        .unwrap();
    enroll(&cx, &e, "r-1", "e1").await;
    enroll(&cx, &a, "r-1", "a1").await;
    s.activate(&a, &cx.id("a1"), event(&a, "activated"))
        .await
        .unwrap();
    enroll(&cx, &f, "r-1", "f1").await;
    s.expire_enrollment(&f, &cx.id("f1"), event(&f, "activation_expired"))
        .await
        .unwrap();
    s.import_devices(&[new_device(&r, "thermostat")])
        .await
        .unwrap();
    revoke(s, &r).await;

    let counts = s.count_by_state().await.unwrap();
    let count = |state: DeviceState| {
        counts
            .iter()
            .find(|(s, _)| *s == state)
            .map(|(_, n)| *n)
            .unwrap_or(-1)
    };
    let expected = [
        (DeviceState::Pending, 2),
        (DeviceState::Enrolling, 1),
        (DeviceState::Active, 1),
        (DeviceState::Failed, 1),
        (DeviceState::Revoked, 1),
    ];
    for (state, n) in expected {
        if cx.exclusive {
            assert_eq!(count(state), n, "{state}");
        } else {
            assert!(count(state) >= n, "{state}");
        }
    }
}

async fn transitions_and_firmware_version(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("state");
    s.import_devices(&[new_device(&d, "thermostat")])
        .await
        .unwrap();

    let moved = s
        .transition(
            &d,
            &NOT_REVOKED,
            TransitionTarget::new(DeviceState::Revoked).with_error("stolen"),
            event(&d, "revoked"),
        )
        .await
        .unwrap();
    assert_eq!(moved.from, DeviceState::Pending);
    assert_eq!(moved.to, DeviceState::Revoked);
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Revoked);
    assert_eq!(device.last_error.as_deref(), Some("stolen"));
    assert_eq!(event_names(&cx, &d).await, vec!["revoked".to_owned()]);

    let moved = s
        .transition(
            &d,
            &[DeviceState::Revoked],
            DeviceState::Pending.into(),
            event(&d, "reinstated"),
        )
        .await
        .unwrap();
    assert_eq!(moved.from, DeviceState::Revoked);
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Pending);
    assert_eq!(device.last_error, None);

    let ghost = cx.id("ghost");
    assert!(matches!(
        s.transition(
            &ghost,
            &NOT_REVOKED,
            DeviceState::Revoked.into(),
            event(&ghost, "revoked")
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        s.events(&ghost, 10).await.unwrap().is_empty(),
        "no event without the change"
    );

    s.set_firmware_version(&d, "2.0.0").await.unwrap();
    assert_eq!(
        s.device(&d)
            .await
            .unwrap()
            .unwrap()
            .firmware_version
            .as_deref(),
        Some("2.0.0")
    );
    assert!(matches!(
        s.set_firmware_version(&ghost, "2.0.0").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn events_ordering_and_limit(cx: Ctx) {
    let s = &cx.store;
    // Audit events need no device row (refused connects of unknown ids are audited too).
    let d = cx.id("audit");
    let other = cx.id("audit-other");
    let mut written = Vec::new();
    for i in 0..5 {
        let mut e = event(&d, &format!("e{i}"));
        e.detail = json!({ "i": i, "nested": { "list": [1, 2, 3] } });
        if i % 2 == 0 {
            e = e.with_request(&format!("r-{i}"));
        }
        s.append_event(e.clone()).await.unwrap();
        written.push(e);
        s.append_event(event(&other, &format!("x{i}")))
            .await
            .unwrap();
    }
    assert_eq!(s.events(&d, 3).await.unwrap(), written[2..].to_vec());
    assert_eq!(s.events(&d, 5).await.unwrap(), written);
    assert_eq!(s.events(&d, 100).await.unwrap(), written);
    assert_eq!(s.events(&d, 1).await.unwrap(), written[4..].to_vec());
    assert!(s.events(&d, 0).await.unwrap().is_empty());
    assert_eq!(s.events(&other, 100).await.unwrap().len(), 5);
    assert!(s.events(&cx.id("silent"), 100).await.unwrap().is_empty());
}

async fn old_events_are_deleted_in_batches(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("retention");
    let cutoff = now() - Duration::days(90);
    for i in 0..5 {
        let mut e = event(&d, &format!("old{i}"));
        e.at = cutoff - Duration::days(1 + i);
        s.append_event(e).await.unwrap();
    }
    let mut fresh = event(&d, "fresh");
    fresh.at = cutoff + Duration::minutes(1);
    s.append_event(fresh).await.unwrap();
    // At most one batch per call, until nothing older than the cutoff is left.
    for expected in [2, 2, 1, 0] {
        assert_eq!(s.delete_events_before(cutoff, 2).await.unwrap(), expected);
    }
    assert_eq!(event_names(&cx, &d).await, vec!["fresh"]);
}

async fn firmware_jobs(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("fw");
    s.import_devices(&[new_device(&d, "thermostat")])
        .await
        .unwrap();
    let j1 = firmware_job(&cx.id("job-1"), &d, "1.5.0");
    s.insert_firmware_job(&j1, event(&d, "firmware_queued"))
        .await
        .unwrap();
    assert_eq!(
        s.firmware_job(&j1.job_id, &d).await.unwrap(),
        Some(j1.clone())
    );
    assert!(s
        .firmware_job(&j1.job_id, &cx.id("else"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.latest_firmware_job(&d).await.unwrap(), Some(j1.clone()));
    assert!(is_conflict(
        &s.insert_firmware_job(&j1, event(&d, "firmware_queued"))
            .await
    ));

    let mut j2 = firmware_job(&cx.id("job-2"), &d, "1.6.0");
    j2.created_at = j1.created_at + Duration::seconds(1);
    j2.updated_at = j2.created_at;
    s.insert_firmware_job(&j2, event(&d, "firmware_queued"))
        .await
        .unwrap();
    assert_eq!(s.latest_firmware_job(&d).await.unwrap(), Some(j2.clone()));

    assert!(s
        .advance_firmware_job(
            &j1.job_id,
            &d,
            JobStatus::Downloading,
            None,
            event(&d, "firmware_status")
        )
        .await
        .unwrap());
    let job = s.firmware_job(&j1.job_id, &d).await.unwrap().unwrap();
    assert_eq!(job.status, "downloading");
    assert_eq!(job.error, None);
    assert!(job.updated_at >= j1.updated_at);
    assert_eq!(job.created_at, j1.created_at);

    assert!(s
        .advance_firmware_job(
            &j1.job_id,
            &d,
            JobStatus::Failed,
            Some("checksum mismatch"),
            event(&d, "firmware_status")
        )
        .await
        .unwrap());
    let job = s.firmware_job(&j1.job_id, &d).await.unwrap().unwrap();
    assert_eq!(job.status, "failed");
    assert_eq!(job.error.as_deref(), Some("checksum mismatch"));

    assert!(!s
        .advance_firmware_job(
            &cx.id("job-x"),
            &d,
            JobStatus::Failed,
            None,
            event(&d, "firmware_status")
        )
        .await
        .unwrap());
    assert!(!s
        .advance_firmware_job(
            &j1.job_id,
            &cx.id("else"),
            JobStatus::Failed,
            None,
            event(&d, "x")
        )
        .await
        .unwrap());
    let ghost = cx.id("ghost");
    assert!(matches!(
        s.insert_firmware_job(
            &firmware_job(&cx.id("job-g"), &ghost, "1.0"),
            event(&ghost, "x")
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.latest_firmware_job(&ghost).await.unwrap().is_none());
    let names = event_names(&cx, &d).await;
    assert_eq!(names.iter().filter(|n| *n == "firmware_queued").count(), 2);
    assert_eq!(names.iter().filter(|n| *n == "firmware_status").count(), 2);
}

/// `ab` and `AB` are two devices: nothing of one is found, changed or revoked through the other
/// (a case-insensitive collation would merge them).
async fn identifiers_compare_exactly(cx: Ctx) {
    let (lower, upper) = (cx.id("ab"), cx.id("AB"));
    enroll(&cx, &lower, "r1", "ser-ab").await;
    assert!(cx.store.device(&upper).await.unwrap().is_none());
    assert!(cx.store.latest_config(&upper).await.unwrap().is_none());
    assert!(cx.store.credentials_of(&upper).await.unwrap().is_empty());
    assert!(cx
        .store
        .find_enrollment(&upper, "r1")
        .await
        .unwrap()
        .is_none());
    assert!(cx
        .store
        .credential(&cx.id("SER-AB"))
        .await
        .unwrap()
        .is_none());

    // The other one enrolls as a new device, with the same request id.
    let generation = enroll(&cx, &upper, "r1", "SER-AB").await;
    assert_eq!(
        generation, 1,
        "a first enrollment, not a re-enrollment of {lower}"
    );
    for (id, serial) in [(&lower, "ser-ab"), (&upper, "SER-AB")] {
        let device = cx.store.device(id).await.unwrap().expect("device");
        assert_eq!(&device.id, id);
        assert_eq!(device.current_serial, Some(cx.id(serial)));
        let creds = cx.store.credentials_of(id).await.unwrap();
        assert_eq!(creds.len(), 1, "{id}");
        assert_eq!(cx.store.config_history(id).await.unwrap().len(), 1, "{id}");
    }
    assert!(cx
        .store
        .find_enrollment(&upper, "R1")
        .await
        .unwrap()
        .is_none());

    // Revoking one's credentials and activating the other leave each other alone.
    let revoked = cx
        .store
        .revoke_device_credentials(&upper, "admin")
        .await
        .unwrap();
    assert_eq!(revoked, vec![cx.id("SER-AB")]);
    assert!(!cx
        .store
        .credential(&cx.id("ser-ab"))
        .await
        .unwrap()
        .unwrap()
        .is_revoked());
    assert!(!cx
        .store
        .activate(&upper, &cx.id("ser-ab"), event(&upper, "activated"))
        .await
        .unwrap());
    assert!(cx
        .store
        .activate(&lower, &cx.id("ser-ab"), event(&lower, "activated"))
        .await
        .unwrap());
    assert_eq!(
        cx.store.device(&upper).await.unwrap().unwrap().state,
        DeviceState::Enrolling
    );
    assert_eq!(
        event_names(&cx, &upper).await,
        ["enroll_requested", "credential_issued"]
    );
    assert!(cx
        .store
        .record_admin_reply(&cx.id("req-x"), &json!(1))
        .await
        .unwrap());
    assert!(cx
        .store
        .record_admin_reply(&cx.id("REQ-X"), &json!(2))
        .await
        .unwrap());
    assert_eq!(
        cx.store.admin_reply(&cx.id("REQ-X")).await.unwrap(),
        Some(json!(2))
    );
}

async fn admin_replies_are_idempotent(cx: Ctx) {
    let s = &cx.store;
    let request = cx.id("admin-1");
    let reply = json!({ "request_id": request, "status": "ok", "result": { "version": 3 } });
    assert!(s.admin_reply(&request).await.unwrap().is_none());
    assert!(s.record_admin_reply(&request, &reply).await.unwrap());
    let other = json!({ "request_id": request, "status": "error" });
    assert!(!s.record_admin_reply(&request, &other).await.unwrap());
    assert_eq!(s.admin_reply(&request).await.unwrap(), Some(reply));
    assert!(s.admin_reply(&cx.id("admin-2")).await.unwrap().is_none());
}

// ---- SQLite only ------------------------------------------------------------------------------

fn sqlite_config(pool_size: u32) -> StoreConfig {
    StoreConfig {
        pool_size,
        ..StoreConfig::default()
    }
}

#[tokio::test]
async fn sqlite_migrations_apply_once_and_keep_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.db");
    let store = SqliteStore::open(&path, &sqlite_config(2)).await.unwrap();
    let migrations = store.applied_migrations().await.unwrap();
    assert_eq!(
        migrations.last().map(|(v, _)| *v),
        Some(SqliteStore::latest_schema_version())
    );
    let commit = EnrollmentBuilder::new("keep", "r-1", "s1").build();
    store.commit_enrollment(commit.clone()).await.unwrap();
    drop(store);

    let stamps = |path: &std::path::Path| {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    };
    let first = stamps(&path);
    assert_eq!(first.len(), migrations.len());

    for _ in 0..2 {
        let store = SqliteStore::open(&path, &sqlite_config(2)).await.unwrap();
        assert_eq!(store.applied_migrations().await.unwrap(), migrations);
        let device = store.device("keep").await.unwrap().unwrap();
        assert_eq!(device.current_serial.as_deref(), Some("s1"));
        assert_eq!(
            store.credential("s1").await.unwrap(),
            Some(commit.credential.clone())
        );
        assert_eq!(
            store
                .find_enrollment("keep", "r-1")
                .await
                .unwrap()
                .unwrap()
                .response,
            commit.response
        );
    }
    assert_eq!(stamps(&path), first, "nothing re-applied");
}

#[tokio::test]
async fn sqlite_open_creates_directories_and_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/inventory.db");
    let store = SqliteStore::open(&path, &sqlite_config(0)).await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.path(), path.as_path());
    assert!(path.exists());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.db");
    drop(SqliteStore::open(&path, &sqlite_config(1)).await.unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (9999, 'future', 'x')",
        [],
    )
    .unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(&path, &sqlite_config(1)).await,
        Err(StoreError::Migration(_))
    ));
}

#[tokio::test]
async fn sqlite_bad_data_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.db");
    let store = SqliteStore::open(&path, &sqlite_config(1)).await.unwrap();
    store
        .commit_enrollment(EnrollmentBuilder::new("bad", "r-1", "s1").build())
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "UPDATE device_configs SET body = '{not json';
         UPDATE enrollments SET response = 'nope';
         UPDATE credentials SET kind = 'smartcard';
         PRAGMA ignore_check_constraints = ON;
         UPDATE devices SET state = 'zombie';",
    )
    .unwrap();
    drop(conn);
    let corrupt = |e: StoreError| matches!(e, StoreError::Corrupt(_));
    assert!(corrupt(store.latest_config("bad").await.unwrap_err()));
    assert!(corrupt(
        store.find_enrollment("bad", "r-1").await.unwrap_err()
    ));
    assert!(corrupt(store.credential("s1").await.unwrap_err()));
    assert!(corrupt(store.device("bad").await.unwrap_err()));
    assert!(corrupt(store.count_by_state().await.unwrap_err()));
}

#[tokio::test]
async fn sqlite_busy_database_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.db");
    let config = StoreConfig {
        query_timeout_ms: 50,
        ..sqlite_config(1)
    };
    let store = SqliteStore::open(&path, &config).await.unwrap();
    // Another process holds the write lock.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = store
        .commit_enrollment(EnrollmentBuilder::new("busy", "r-1", "s1").build())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // Readers are not blocked by a writer.
    assert!(store.device("busy").await.unwrap().is_none());
    other.execute_batch("ROLLBACK").unwrap();
    store
        .commit_enrollment(EnrollmentBuilder::new("busy", "r-1", "s1").build())
        .await
        .unwrap();
}

/// The enrollment hot path (retry lookup, device read, commit) from many tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sqlite_sustains_concurrent_enrollments() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("inventory.db"), &sqlite_config(8))
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let d = format!("load-{t}-{i}");
                assert!(store.find_enrollment(&d, "r-1").await.unwrap().is_none());
                let generation = store.device(&d).await.unwrap().map(|d| d.generation);
                let commit = EnrollmentBuilder::new(&d, "r-1", &format!("{d}-s1"))
                    .expected_generation(generation)
                    .build();
                store.commit_enrollment(commit).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let total = TASKS * PER_TASK;
    println!(
        "{total} enrollments in {elapsed:?}: {:.0}/s",
        total as f64 / elapsed.as_secs_f64()
    );
    let counts = store.count_by_state().await.unwrap();
    assert!(counts.contains(&(DeviceState::Enrolling, total as i64)));
}

async fn a_revoke_is_never_overwritten_by_a_rollback(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("race");
    enroll(&cx, &d, "r-1", "s1").await;
    // Gateway A revokes; gateway B, which read the device as `enrolling`, then rolls the
    // enrollment back: the guard refuses and names the state it found.
    revoke(s, &d).await;
    let rollback = s
        .transition(
            &d,
            &NOT_REVOKED,
            TransitionTarget::new(DeviceState::Pending)
                .releasing_factory()
                .revoking_credentials("enrollment_rolled_back"),
            event(&d, "enrollment_rolled_back"),
        )
        .await;
    match rollback {
        Err(StoreError::WrongState { device, actual }) => {
            assert_eq!(device, d);
            assert_eq!(actual, DeviceState::Revoked);
        }
        other => panic!("rollback of a revoked device: {other:?}"),
    }
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.state, DeviceState::Revoked);
    assert_eq!(device.last_error.as_deref(), Some("stolen"));
    assert!(
        !event_names(&cx, &d)
            .await
            .contains(&"enrollment_rolled_back".to_owned()),
        "no event without the change"
    );
    let credential = s.credential(&cx.id("s1")).await.unwrap().unwrap();
    assert!(
        !credential.is_revoked(),
        "a refused transition revokes nothing"
    );

    // A transition revoking the credentials does both in one transaction.
    let c = cx.id("cut");
    enroll(&cx, &c, "r-1", "c1").await;
    let before = s.latest_change().await.unwrap();
    let moved = s
        .transition(
            &c,
            &NOT_REVOKED,
            TransitionTarget::new(DeviceState::Revoked).revoking_credentials("device_revoked"),
            event(&c, "device_revoked"),
        )
        .await
        .unwrap();
    assert_eq!(moved.revoked, [cx.id("c1")]);
    let credential = s.credential(&cx.id("c1")).await.unwrap().unwrap();
    assert_eq!(credential.revoke_reason.as_deref(), Some("device_revoked"));
    let kinds: Vec<ChangeKind> = s
        .changes_since(before, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|change| change.kind)
        .collect();
    assert_eq!(kinds, [ChangeKind::State, ChangeKind::Credentials]);

    // Two racing revocations: exactly one wins, the other finds the device revoked.
    let e = cx.id("twice");
    enroll(&cx, &e, "r-1", "e1").await;
    let attempts = (0..4).map(|_| {
        let s = s.clone();
        let e = e.clone();
        tokio::spawn(async move {
            s.transition(
                &e,
                &NOT_REVOKED,
                DeviceState::Revoked.into(),
                event(&e, "revoked"),
            )
            .await
        })
    });
    let mut won = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(moved) => {
                assert_eq!(moved.from, DeviceState::Enrolling);
                won += 1;
            }
            Err(StoreError::WrongState { actual, .. }) => {
                assert_eq!(actual, DeviceState::Revoked)
            }
            Err(other) => panic!("revoke: {other}"),
        }
    }
    assert_eq!(won, 1);
    let revoked = event_names(&cx, &e).await;
    assert_eq!(revoked.iter().filter(|n| *n == "revoked").count(), 1);
}

async fn firmware_progress_only_moves_forward(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("fw-forward");
    enroll(&cx, &d, "r-1", "s1").await;
    let job = firmware_job(&cx.id("job-f"), &d, "2.0.0");
    s.insert_firmware_job(&job, event(&d, "firmware_queued"))
        .await
        .unwrap();
    let advance = |status: JobStatus| {
        let s = s.clone();
        let (job_id, d) = (job.job_id.clone(), d.clone());
        async move {
            s.advance_firmware_job(&job_id, &d, status, None, event(&d, status.as_str()))
                .await
                .unwrap()
        }
    };
    assert!(advance(JobStatus::Installing).await, "steps may be skipped");
    assert!(!advance(JobStatus::Downloading).await, "never backwards");
    assert!(!advance(JobStatus::Installing).await, "never twice");
    assert!(!advance(JobStatus::Queued).await);
    assert!(advance(JobStatus::Succeeded).await);
    assert!(
        !advance(JobStatus::Failed).await,
        "a finished job stays finished"
    );
    let stored = s.firmware_job(&job.job_id, &d).await.unwrap().unwrap();
    assert_eq!(stored.status, "succeeded");
    let names = event_names(&cx, &d).await;
    assert!(names.contains(&"installing".to_owned()));
    assert!(!names.contains(&"downloading".to_owned()));
    assert!(!names.contains(&"failed".to_owned()));

    // Reports racing on several gateways: each status is recorded at most once.
    let racing = firmware_job(&cx.id("job-r"), &d, "2.1.0");
    s.insert_firmware_job(&racing, event(&d, "firmware_queued"))
        .await
        .unwrap();
    let tasks: Vec<_> = [JobStatus::Downloading, JobStatus::Succeeded]
        .into_iter()
        .cycle()
        .take(8)
        .map(|status| {
            let s = s.clone();
            let (job_id, d) = (racing.job_id.clone(), d.clone());
            tokio::spawn(async move {
                s.advance_firmware_job(&job_id, &d, status, None, event(&d, "racing"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut moved = 0;
    for task in tasks {
        moved += usize::from(task.await.unwrap());
    }
    assert!((1..=2).contains(&moved), "{moved} updates");
    let stored = s.firmware_job(&racing.job_id, &d).await.unwrap().unwrap();
    assert_eq!(stored.status, "succeeded");
}

async fn changes_are_fed_with_their_writes(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("fed");
    let start = s.latest_change().await.unwrap();
    let kinds_since = |cursor: i64| {
        let s = s.clone();
        async move {
            s.changes_since(cursor, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.device_id, c.kind))
                .collect::<Vec<_>>()
        }
    };

    enroll(&cx, &d, "r-1", "s1").await;
    assert_eq!(kinds_since(start).await, [(d.clone(), ChangeKind::Config)]);
    let after_enroll = s.latest_change().await.unwrap();
    assert!(after_enroll > start);

    s.insert_config(
        &d,
        json!({ "v": 2 }),
        "alice",
        event(&d, "config_published"),
    )
    .await
    .unwrap();
    s.insert_firmware_job(
        &firmware_job(&cx.id("job-c"), &d, "3.0"),
        event(&d, "firmware_queued"),
    )
    .await
    .unwrap();
    s.advance_firmware_job(
        &cx.id("job-c"),
        &d,
        JobStatus::Downloading,
        None,
        event(&d, "firmware_downloading"),
    )
    .await
    .unwrap();
    assert!(s.revoke_credential(&cx.id("s1"), "admin").await.unwrap());
    revoke(s, &d).await;
    assert_eq!(
        kinds_since(after_enroll).await,
        [
            (d.clone(), ChangeKind::Config),
            (d.clone(), ChangeKind::Firmware),
            (d.clone(), ChangeKind::Firmware),
            (d.clone(), ChangeKind::Credentials),
            (d.clone(), ChangeKind::State),
        ]
    );

    // What changed nothing announces nothing.
    let head = s.latest_change().await.unwrap();
    assert!(!s.revoke_credential(&cx.id("s1"), "again").await.unwrap());
    assert!(s
        .revoke_device_credentials(&d, "again")
        .await
        .unwrap()
        .is_empty());
    let refused = s
        .transition(
            &d,
            &NOT_REVOKED,
            DeviceState::Revoked.into(),
            event(&d, "x"),
        )
        .await;
    assert!(matches!(refused, Err(StoreError::WrongState { .. })));
    assert!(!s
        .advance_firmware_job(&cx.id("job-c"), &d, JobStatus::Queued, None, event(&d, "x"))
        .await
        .unwrap());
    assert_eq!(s.latest_change().await.unwrap(), head);

    // Activation timeout: the credential is revoked and the device leaves `enrolling`.
    let t = cx.id("timeout");
    enroll(&cx, &t, "r-1", "t1").await;
    let before = s.latest_change().await.unwrap();
    assert!(s
        .expire_enrollment(&t, &cx.id("t1"), event(&t, "activation_timeout"))
        .await
        .unwrap());
    assert_eq!(
        kinds_since(before).await,
        [
            (t.clone(), ChangeKind::Credentials),
            (t.clone(), ChangeKind::State)
        ]
    );

    // Ids increase, rows carry the writer's origin, and a page is bounded.
    let all = s.changes_since(start, 100).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert!(all.iter().all(|c| c.origin == s.origin()));
    assert_eq!(s.changes_since(start, 2).await.unwrap().len(), 2);

    // Retention: rows older than the cut are deleted, newer ones kept.
    let oldest = all[0].at;
    assert_eq!(s.prune_changes(oldest).await.unwrap(), 0);
    let pruned = s
        .prune_changes(time::OffsetDateTime::now_utc() + Duration::seconds(1))
        .await
        .unwrap();
    assert!(pruned >= all.len() as u64, "{pruned} of {}", all.len());
    assert!(s.changes_since(start, 100).await.unwrap().is_empty());
    // Ids are never reused after a prune.
    s.insert_config(
        &t,
        json!({ "v": 3 }),
        "alice",
        event(&t, "config_published"),
    )
    .await
    .unwrap();
    let newest = s.latest_change().await.unwrap();
    assert!(newest > all.last().unwrap().id);
}

async fn reenrollment_is_bound_to_the_first_factory_issuer(cx: Ctx) {
    let s = &cx.store;
    let d = cx.id("bound");
    let (maker_a, maker_b) = ("CN=Maker A Factory CA", "CN=Maker B Factory CA");
    let first = s
        .commit_enrollment(
            EnrollmentBuilder::new(&d, "r-1", &cx.id("s1"))
                .factory(maker_a, "fa01")
                .build(),
        )
        .await
        .unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.factory_issuer.as_deref(), Some(maker_a));
    assert_eq!(device.factory_serial.as_deref(), Some("fa01"));

    // Another maker's CA cannot re-enroll it, even with a current generation.
    let other = EnrollmentBuilder::new(&d, "r-2", &cx.id("s2"))
        .expected_generation(Some(first.generation))
        .factory(maker_b, "fb01")
        .build();
    assert!(is_conflict(&s.commit_enrollment(other).await));
    assert!(s.credential(&cx.id("s2")).await.unwrap().is_none());

    // The same maker can (with a new factory certificate: the serial of the first is kept).
    let again = s
        .commit_enrollment(
            EnrollmentBuilder::new(&d, "r-3", &cx.id("s3"))
                .expected_generation(Some(first.generation))
                .factory(maker_a, "fa02")
                .build(),
        )
        .await
        .unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.factory_issuer.as_deref(), Some(maker_a));
    assert_eq!(device.factory_serial.as_deref(), Some("fa01"));

    // A reinstatement keeps the binding; an admin rollback of the enrollment releases it.
    revoke(s, &d).await;
    s.transition(
        &d,
        &[DeviceState::Revoked],
        DeviceState::Pending.into(),
        event(&d, "reinstated"),
    )
    .await
    .unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.factory_issuer.as_deref(), Some(maker_a));
    s.transition(
        &d,
        &NOT_REVOKED,
        TransitionTarget::new(DeviceState::Pending).releasing_factory(),
        event(&d, "enrollment_rolled_back"),
    )
    .await
    .unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.factory_issuer, None);
    assert_eq!(device.factory_serial, None);
    let generation = device.generation;
    assert_eq!(generation, again.generation);

    s.commit_enrollment(
        EnrollmentBuilder::new(&d, "r-4", &cx.id("s4"))
            .expected_generation(Some(generation))
            .factory(maker_b, "fb01")
            .build(),
    )
    .await
    .unwrap();
    let device = s.device(&d).await.unwrap().unwrap();
    assert_eq!(device.factory_issuer.as_deref(), Some(maker_b));
    assert_eq!(device.factory_serial.as_deref(), Some("fb01"));
}
