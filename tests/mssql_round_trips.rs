//! Round trips to SQL Server per store operation, counted by the store's own counter around
//! the driver's calls: every write a device waits for is one request (one batch with its
//! transaction inside). Runs when `ONBOARD_TEST_MSSQL_URL` is set (a scratch schema or database
//! of its own, see `common::mssql`); the batches themselves are checked without a server by
//! the unit tests of `store::mssql::writes`.

mod common;

use std::sync::Arc;

use common::mssql::Scratch;
use common::store_fixtures::*;
use onboard::store::mssql::MssqlStore;
use onboard::store::{DeviceState, JobStatus, Store, StoreError, TransitionTarget};
use serde_json::json;

/// Run `op` and return how many requests it sent.
async fn trips<T, F>(store: &MssqlStore, op: F) -> (u64, T)
where
    F: std::future::Future<Output = T>,
{
    let before = store.round_trips().requests();
    let out = op.await;
    (store.round_trips().requests() - before, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_a_device_waits_for_is_one_round_trip() {
    let Some(scratch) = Scratch::create().await else {
        println!("skipped: ONBOARD_TEST_MSSQL_URL is not set");
        return;
    };
    let config = onboard::config::StoreConfig {
        pool_size: 1,
        ..scratch.config()
    };
    let store = Arc::new(
        MssqlStore::connect(&config.url, &config)
            .await
            .expect("open"),
    );
    let p = unique_prefix();
    let id = format!("{p}dev");
    let serial = format!("{p}s1");
    let mut counted = Vec::new();

    let (n, committed) = trips(
        &store,
        store.commit_enrollment(EnrollmentBuilder::new(&id, "r1", &serial).build()),
    )
    .await;
    let committed = committed.expect("enrollment");
    counted.push(("commit_enrollment (first)", n));

    let (n, activated) = trips(
        &store,
        store.activate(&id, &serial, event(&id, "activated")),
    )
    .await;
    assert!(activated.expect("activate"));
    counted.push(("activate", n));

    let (n, acked) = trips(
        &store,
        store.ack_config(
            &id,
            committed.config.version,
            None,
            event(&id, "config_applied"),
        ),
    )
    .await;
    assert!(acked.expect("ack"));
    counted.push(("ack_config", n));

    let renewed = credential(&id, &format!("{p}s2"));
    let (n, inserted) = trips(
        &store,
        store.insert_credential(&renewed, event(&id, "renewed")),
    )
    .await;
    inserted.expect("renewal credential");
    counted.push(("insert_credential (renewal)", n));

    let (n, used) = trips(&store, store.mark_credential_used(&renewed.serial)).await;
    assert!(used.expect("mark used"));
    counted.push(("mark_credential_used (renewal)", n));

    let job = firmware_job(&format!("{p}job"), &id, "2.0.0");
    let (n, created) = trips(
        &store,
        store.insert_firmware_job(&job, event(&id, "firmware_job")),
    )
    .await;
    created.expect("firmware job");
    counted.push(("insert_firmware_job", n));

    let (n, progressed) = trips(
        &store,
        store.advance_firmware_job(
            &job.job_id,
            &id,
            JobStatus::Downloading,
            None,
            event(&id, "firmware_status"),
        ),
    )
    .await;
    assert!(progressed.expect("firmware status"));
    counted.push(("advance_firmware_job", n));

    let (n, config) = trips(
        &store,
        store.insert_config(&id, json!({"v": 2}), "alice", event(&id, "config_pushed")),
    )
    .await;
    assert_eq!(config.expect("config").version, 2);
    counted.push(("insert_config", n));

    let again = EnrollmentBuilder::new(&id, "r2", &format!("{p}s3"))
        .expected_generation(Some(committed.generation))
        .revoke_others("reenrolled")
        .build();
    let (n, recommitted) = trips(&store, store.commit_enrollment(again)).await;
    assert_eq!(recommitted.expect("re-enrollment").generation, 2);
    counted.push(("commit_enrollment (again)", n));

    let (n, expired) = trips(
        &store,
        store.expire_enrollment(&id, &format!("{p}s3"), event(&id, "expired")),
    )
    .await;
    assert!(expired.expect("expire"));
    counted.push(("expire_enrollment", n));

    let (n, refused) = trips(
        &store,
        store.transition(
            &id,
            &[DeviceState::Active],
            TransitionTarget::new(DeviceState::Revoked),
            event(&id, "revoked"),
        ),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::WrongState {
                actual: DeviceState::Failed,
                ..
            })
        ),
        "{refused:?}"
    );
    counted.push(("transition (wrong state)", n));

    let spare = credential(&id, &format!("{p}s5"));
    store
        .insert_credential(&spare, event(&id, "issued"))
        .await
        .expect("spare credential");
    let mut revoke = TransitionTarget::new(DeviceState::Revoked);
    revoke.revoke_credentials = Some("admin".into());
    let (n, transition) = trips(
        &store,
        store.transition(&id, &[DeviceState::Failed], revoke, event(&id, "revoked")),
    )
    .await;
    let transition = transition.expect("revoke");
    assert_eq!(transition.from, DeviceState::Failed);
    assert_eq!(transition.revoked, vec![spare.serial.clone()]);
    counted.push(("transition (with revocation)", n));

    // Refusals: a stale generation and an unknown device cost the batch and one rollback check.
    let stale = EnrollmentBuilder::new(&id, "r3", &format!("{p}s4"))
        .expected_generation(Some(1))
        .build();
    let (n, refused) = trips(&store, store.commit_enrollment(stale)).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    counted.push(("commit_enrollment (conflict)", n));
    let (n, missing) = trips(
        &store,
        store.insert_config(&format!("{p}nobody"), json!({}), "a", event("x", "y")),
    )
    .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    counted.push(("insert_config (unknown device)", n));

    // The reads a connecting or enrolling device waits for.
    let (n, context) = trips(&store, store.enrollment_context(&id, "r1")).await;
    let (stored, device) = context.expect("enrollment context");
    assert_eq!(stored.expect("answer kept").serial, serial);
    assert_eq!(device.expect("device").id, id);
    counted.push(("enrollment_context", n));
    let (n, found) = trips(&store, store.credential_and_device(&serial, &id)).await;
    let (credential, device) = found.expect("credential and device");
    assert_eq!(credential.expect("credential").device_id, id);
    assert!(device.is_some());
    counted.push(("credential_and_device", n));
    let (n, found) = trips(
        &store,
        store.credential_and_device(&format!("{p}nope"), &format!("{p}nobody")),
    )
    .await;
    assert_eq!(found.expect("lookup"), (None, None));
    counted.push(("credential_and_device (unknown)", n));

    // Each statement became a procedure once (see `store::mssql::procs`): creating them is
    // not a request, and a second run of the same statements creates none.
    let prepared = store.round_trips().prepares();
    let (n, _) = trips(&store, store.credential_and_device(&serial, &id)).await;
    assert_eq!(n, 1);
    assert_eq!(store.round_trips().prepares(), prepared);
    println!("procedures   {prepared} created");

    // Procedures dropped behind the store's back (a DBA, a restore): the next use finds its
    // procedure gone, sends the text instead and makes it again.
    let dropped = store.drop_procedures().await.expect("drop procedures");
    assert!(dropped >= 1, "{dropped}");
    let (n, found) = trips(&store, store.credential_and_device(&serial, &id)).await;
    assert!(found.expect("answered after the drop").0.is_some());
    assert!(n <= 2, "{n}");
    assert_eq!(store.round_trips().prepares(), prepared);
    let (n, found) = trips(&store, store.credential_and_device(&serial, &id)).await;
    assert!(found.expect("answered").1.is_some());
    assert_eq!(n, 1);
    assert_eq!(
        store.round_trips().prepares(),
        prepared + 1,
        "made again once"
    );

    for (op, n) in &counted {
        println!("round trips  {op:<34} {n}");
    }
    for (op, n) in &counted {
        let expected = if op.contains('(')
            && (op.contains("conflict") || op.contains("unknown"))
            && !op.starts_with("credential_and_device")
        {
            2
        } else {
            1
        };
        assert_eq!(*n, expected, "{op}");
    }
    drop(store);
    scratch.remove().await.expect("remove scratch");
}
