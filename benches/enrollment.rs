//! Enrollment throughput: a simulated fleet through the whole zero-touch flow against an
//! in-process gateway on SQLite, compared in the same run with the bare TLS + MQTT round trip
//! (admin-certificate connect, one QoS 1 publish, disconnect) at the same concurrency.
//!
//! Each credential kind runs on a fresh gateway; a second CSR fleet on the first gateway shows
//! whether the size of the inventory changes the rate.
//!
//! Sizes: `ONBOARD_BENCH_DEVICES` (default 2000), `ONBOARD_BENCH_CONCURRENCY` (default 64).
//! Store: SQLite, or the SQL Server `ONBOARD_BENCH_STORE_URL` names (each gateway in a scratch
//! schema of its own); on SQL Server each fleet also reports the store round trips it cost.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize, Bench, HOST};
use onboard::simulate::{self, SimCredential, SimReport};

fn main() {
    common::runtime().block_on(bench());
}

async fn bench() {
    let devices = env_usize("ONBOARD_BENCH_DEVICES", 2000).max(1);
    let concurrency = env_usize("ONBOARD_BENCH_CONCURRENCY", 64).max(1);
    println!(
        "enrollment: {devices} devices, concurrency {concurrency}, {}, loopback",
        common::store_name()
    );

    // Each credential kind on a fresh gateway (empty inventory), so the kinds compare fairly.
    let bench = start_warm(concurrency).await;
    let csr = run_fleet(
        &bench,
        "csr-",
        devices,
        concurrency,
        SimCredential::Csr,
        "csr",
    )
    .await;
    // The same again on the gateway that now holds the first fleet: does the inventory size
    // change the rate?
    let again = run_fleet(
        &bench,
        "csr2-",
        devices,
        concurrency,
        SimCredential::Csr,
        "csr, second fleet on the same gateway",
    )
    .await;
    bench.stop().await;

    let bench = start_warm(concurrency).await;
    let generated = run_fleet(
        &bench,
        "gen-",
        devices,
        concurrency,
        SimCredential::Generated,
        "generated",
    )
    .await;
    bench.stop().await;

    let bench = Bench::start().await;
    let (baseline, baseline_failed) = bare_round_trips(&bench, devices, concurrency).await;
    bench.stop().await;

    println!();
    println!(
        "baseline     bare mTLS connect + QoS 1 publish + disconnect: {baseline:.1} round trips/s ({baseline_failed} failed)"
    );
    for (name, report) in [
        ("csr", &csr),
        ("generated", &generated),
        ("csr, second fleet", &again),
    ] {
        println!(
            "ratio        {name}: enrolled/s / bare round trips/s = {:.3} (one enrollment costs {:.1} bare round trips)",
            report.enrolled_per_sec() / baseline,
            baseline / report.enrolled_per_sec().max(f64::MIN_POSITIVE)
        );
    }
}

/// A fresh gateway, warmed up by a small fleet (first connections, SQLite pages, allocator).
async fn start_warm(concurrency: usize) -> Bench {
    let bench = Bench::start().await;
    let warm = bench.sim_options("warm-", concurrency, concurrency, SimCredential::Csr);
    simulate::run(warm, None).await.expect("warm-up runs");
    bench
}

async fn run_fleet(
    bench: &Bench,
    prefix: &str,
    devices: usize,
    concurrency: usize,
    credential: SimCredential,
    label: &str,
) -> SimReport {
    let requests_before = bench.store_requests();
    let report = simulate::run(
        bench.sim_options(prefix, devices, concurrency, credential),
        None,
    )
    .await
    .expect("simulation runs");
    println!("\n[{label}]\n{report}");
    if let (Some(before), Some(after)) = (requests_before, bench.store_requests()) {
        let trips = after.saturating_sub(before) as f64;
        println!(
            "store        {trips:.0} round trips to SQL Server: {:.2} per enrolled device, {:.1} round trips/s",
            trips / (report.enrolled as f64).max(1.0),
            trips / report.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
    report
}

/// `n` admin-certificate round trips with `concurrency` in flight; returns round trips/s and
/// the number that failed.
async fn bare_round_trips(bench: &Bench, n: usize, concurrency: usize) -> (f64, u64) {
    let tls = bench.tls(&bench.admin("bench-admin"));
    let port = bench.gw.mtls_addr.port();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (tls, next, failed) = (tls.clone(), next.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let options = simulate::mqtt_options(&format!("base-{i}"), HOST, port, tls.clone());
                let topic = format!("devices/base-{i:06}/commands/ping");
                let outcome = simulate::publish_round_trip(
                    options,
                    &topic,
                    b"{\"seq\":0}".to_vec(),
                    Duration::from_secs(30),
                )
                .await;
                if let Err(e) = outcome {
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        println!("  first baseline failure: {e}");
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    ((n as u64 - failed) as f64 / elapsed, failed)
}
