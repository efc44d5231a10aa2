//! The three parts of the fleet benchmark and the lines they print (Markdown tables, to paste
//! into a README).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use onboard::simulate::{
    self, Batch, BatchOptions, Completed, DeviceFailure, DeviceKit, EnrolledDevice, HeldConnection,
    Simulator,
};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::common::gateway::{GatewayProcess, Setup, Usage};
use crate::common::procfs::CpuPair;
use crate::Sizes;

/// Device ids are `fleet-NNNNNN`.
const PREFIX: &str = "fleet-";
/// Keepalive of the held connections: they stay idle for the whole part.
const HOLD_KEEP_ALIVE: Duration = Duration::from_secs(600);
/// Bound on one held connection's connect.
const HOLD_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection past `max_connections` must be refused within this.
const EXTRA_WAIT: Duration = Duration::from_secs(2);
/// Descriptors this process needs besides the held connections.
const SPARE_FDS: u64 = 128;
/// Pause between the last held connection and the reading of the gateway's cost.
const SETTLE: Duration = Duration::from_secs(1);
const ACTIVE: &str = "onboard_devices{state=\"active\"}";
const TOO_MANY: &str = "onboard_auth_failures_total{reason=\"too_many_connections\"}";

pub async fn run(sizes: Sizes, open_files: u64) -> Result<()> {
    let mut setup = Setup::new()?;
    println!(
        "fleet: `onboard serve` as a separate process (mTLS {}), SQLite store, CSR credentials, loopback\n{}",
        setup.mtls,
        describe(&sizes)
    );
    let mut gw = setup.start(None).await?;
    let sim = Simulator::new(setup.sim_options(PREFIX, sizes.timeout)).context("simulator")?;
    let mut fleet = Fleet {
        sim: Arc::new(sim),
        sizes,
        devices: Vec::new(),
        next_index: 0,
    };
    enrollment_steps(&mut gw, &mut fleet).await?;
    stop_or_report(gw).await;
    connections_held(&mut setup, &fleet, open_files).await?;
    reconnect_storms(&mut setup, &fleet).await?;
    println!("\n{}", setup.log_summary());
    Ok(())
}

fn describe(s: &Sizes) -> String {
    let steps: Vec<String> = s.steps.iter().map(usize::to_string).collect();
    format!(
        "steps {}; batches of {} at {} in flight (fill at {}); hold {} (+{} past the limit); storms of {} and {} at {} in flight; {} s per device",
        steps.join(","),
        s.batch,
        s.concurrency,
        s.fill_concurrency,
        s.hold,
        s.extra,
        s.storm,
        s.storm_small,
        s.storm_concurrency,
        s.timeout.as_secs()
    )
}

/// Stop the gateway; a failed stop is reported, and the next part starts a new one anyway.
async fn stop_or_report(gw: GatewayProcess) -> Option<Duration> {
    match gw.stop().await {
        Ok(took) => Some(took),
        Err(e) => {
            println!("  gateway stop failed: {e:#}");
            None
        }
    }
}

/// The simulated fleet and the devices enrolled so far.
struct Fleet {
    sim: Arc<Simulator>,
    sizes: Sizes,
    /// Enrolled and activated devices with their operational credentials.
    devices: Vec<Arc<EnrolledDevice>>,
    next_index: usize,
}

impl Fleet {
    fn batch_options(&self, concurrency: usize) -> BatchOptions {
        BatchOptions {
            concurrency,
            stop_after_failures: Some(self.sizes.max_failures),
            progress: None,
        }
    }

    fn next_ids(&mut self, n: usize) -> Vec<String> {
        let ids = (self.next_index..self.next_index + n)
            .map(|i| self.sim.device_id(i))
            .collect();
        self.next_index += n;
        ids
    }

    /// Kits for the next `n` devices, made off the async workers.
    async fn kits(&mut self, n: usize) -> Result<Vec<DeviceKit>> {
        let ids = self.next_ids(n);
        let sim = self.sim.clone();
        let kits = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| sim.kit(id))
                .collect::<Result<Vec<_>, _>>()
        });
        Ok(kits.await.context("kit task")??)
    }

    /// Enroll and activate every item's device (`kit` gives its kit); keep the enrolled ones.
    async fn enroll<I: Send + 'static>(
        &mut self,
        items: Vec<I>,
        concurrency: usize,
        kit: fn(&Simulator, I) -> Result<DeviceKit, DeviceFailure>,
    ) -> Result<Batch<()>> {
        let (sim, timeout) = (self.sim.clone(), self.sizes.timeout);
        let batch = simulate::drive(items, self.batch_options(concurrency), move |item| {
            let sim = sim.clone();
            async move {
                let deadline = Instant::now() + timeout;
                let kit = kit(&sim, item)?;
                let (device, latency) = sim.enroll_and_activate(&kit, deadline).await?;
                Ok(Completed {
                    value: Arc::new(device),
                    latency,
                })
            }
        })
        .await
        .context("enrollment batch")?;
        self.devices.extend(batch.values);
        Ok(Batch {
            report: batch.report,
            values: Vec::new(),
            untried: batch.untried,
        })
    }

    /// Enroll devices, unmeasured, until `target` are enrolled (kits made on the way).
    async fn fill_to(&mut self, target: usize) -> Result<Option<Batch<()>>> {
        let missing = target.saturating_sub(self.devices.len());
        if missing == 0 {
            return Ok(None);
        }
        let ids = self.next_ids(missing);
        let concurrency = self.sizes.fill_concurrency;
        let batch = self
            .enroll(ids, concurrency, |sim, id| sim.kit(&id))
            .await?;
        Ok(Some(batch))
    }
}

/// One measured enrollment batch.
struct StepRow {
    enrolled_before: usize,
    batch: Batch<()>,
    rss_after_kib: u64,
    cpu: CpuPair,
}

/// Part 1: a measured batch at every fleet step.
async fn enrollment_steps(gw: &mut GatewayProcess, fleet: &mut Fleet) -> Result<()> {
    let start = gw.usage()?;
    println!(
        "\ngateway ready in {:.2} s: RSS {}, {} fds",
        gw.ready_in.as_secs_f64(),
        mib(start.rss_kib),
        start.fds
    );
    let mut rows = Vec::new();
    for step in fleet.sizes.steps.clone() {
        if let Some(fill) = fleet.fill_to(step).await? {
            println!("  fill to {step}: {}", one_line(&fill));
        }
        gw.check_running()?;
        let enrolled_before = fleet.devices.len();
        let kits = fleet.kits(fleet.sizes.batch).await?;
        let cpu0 = gw.cpu()?;
        let batch = fleet
            .enroll(kits, fleet.sizes.concurrency, |_, kit| Ok(kit))
            .await?;
        let cpu = gw.cpu()?.since(&cpu0);
        gw.check_running()?;
        println!("  measured at {enrolled_before}: {}", one_line(&batch));
        rows.push(StepRow {
            enrolled_before,
            batch,
            rss_after_kib: gw.usage()?.rss_kib,
            cpu,
        });
    }
    let active = gw.metric(ACTIVE).await.ok().flatten();
    print_steps(&rows, start.rss_kib, fleet, active);
    Ok(())
}

fn print_steps(rows: &[StepRow], rss_start_kib: u64, fleet: &Fleet, active: Option<f64>) {
    let s = &fleet.sizes;
    println!(
        "\nEnrollment at fleet steps: {} CSR devices per batch, {} in flight (latency: request to activating telemetry acknowledged)\n",
        s.batch, s.concurrency
    );
    println!("| enrolled before | enrolled/s | p50 ms | p99 ms | failures | gateway RSS after | CPU ms/device (simulator + gateway) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let r = &row.batch.report;
        println!(
            "| {} | {:.1} | {} | {} | {} | {} | {} |",
            row.enrolled_before,
            r.enrolled_per_sec(),
            ms(r.p50),
            ms(r.p99),
            failures(&row.batch),
            mib(row.rss_after_kib),
            cpu_per_device(row.cpu, r.enrolled)
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let (a, b) = (&first.batch.report, &last.batch.report);
        println!(
            "\nratio last/first: enrolled/s {:.2}, p99 {:.2}",
            b.enrolled_per_sec() / a.enrolled_per_sec().max(f64::MIN_POSITIVE),
            b.p99.as_secs_f64() / a.p99.as_secs_f64().max(f64::MIN_POSITIVE)
        );
        let n = fleet.devices.len().max(1);
        let grown = last.rss_after_kib.saturating_sub(rss_start_kib);
        println!(
            "memory per enrolled (offline) device: {:.2} KiB (RSS {} at start, {} after {} devices; store: {} active)",
            grown as f64 / n as f64,
            mib(rss_start_kib),
            mib(last.rss_after_kib),
            fleet.devices.len(),
            active.map_or("?".into(), |a| format!("{a:.0}"))
        );
    }
    print_failure_reasons(rows.iter().map(|r| (r.enrolled_before, &r.batch)));
}

/// Part 2: hold connections on a gateway limited to them, then try a few more.
async fn connections_held(setup: &mut Setup, fleet: &Fleet, open_files: u64) -> Result<()> {
    let (hold, extra) = hold_sizes(fleet, open_files);
    if hold == 0 {
        println!("\nConnections held: skipped (no enrolled devices)");
        return Ok(());
    }
    let mut gw = setup.start(Some(hold)).await?;
    let before = gw.usage()?;
    let held = hold_connections(fleet, &fleet.devices[..hold]).await?;
    tokio::time::sleep(SETTLE).await;
    gw.check_running()?;
    let after = gw.usage()?;
    print_held(hold, &held, before, after, fleet.sizes.concurrency);
    let extras = try_extras(fleet, &fleet.devices[hold..hold + extra]).await;
    let counted = gw.metric(TOO_MANY).await.ok().flatten();
    print_extras(hold, held.values.len(), &extras, counted);
    let open = held.values.len();
    if let Some(took) = stop_or_report(gw).await {
        println!(
            "gateway stopped (SIGTERM) with {open} connections open in {:.2} s",
            took.as_secs_f64()
        );
    }
    drop(held);
    drop(extras);
    Ok(())
}

/// How many to hold and how many extras to try: bounded by the enrolled devices (each
/// connection is a distinct device) and by this process's descriptors.
fn hold_sizes(fleet: &Fleet, open_files: u64) -> (usize, usize) {
    let s = &fleet.sizes;
    let enrolled = fleet.devices.len();
    let extra = s.extra.min(enrolled / 2);
    let budget = usize::try_from(open_files.saturating_sub(SPARE_FDS)).unwrap_or(usize::MAX);
    let hold = s
        .hold
        .min(enrolled - extra)
        .min(budget.saturating_sub(extra));
    if hold < s.hold {
        println!(
            "\nnote: holding {hold} connections, not {}: {enrolled} devices enrolled, {open_files} open files allowed here",
            s.hold
        );
    }
    (hold, extra)
}

async fn hold_connections(
    fleet: &Fleet,
    devices: &[Arc<EnrolledDevice>],
) -> Result<Batch<HeldConnection>> {
    let sim = fleet.sim.clone();
    let options = fleet.batch_options(fleet.sizes.concurrency);
    simulate::drive(devices.to_vec(), options, move |device| {
        let sim = sim.clone();
        async move {
            let started = Instant::now();
            let deadline = started + HOLD_CONNECT_TIMEOUT;
            let held = sim.hold(&device, HOLD_KEEP_ALIVE, deadline).await?;
            Ok(Completed {
                value: held,
                latency: started.elapsed(),
            })
        }
    })
    .await
    .context("holding connections")
}

fn print_held(target: usize, held: &Batch<HeldConnection>, before: Usage, after: Usage, c: usize) {
    let n = held.values.len();
    let per = |grown: f64| if n > 0 { grown / n as f64 } else { 0.0 };
    let r = &held.report;
    println!(
        "\nConnections held: operational certificates, keepalive {} s, {c} connecting at a time, max_connections {target}\n",
        HOLD_KEEP_ALIVE.as_secs()
    );
    println!("| held | connects/s | p50 ms | p99 ms | failures | gateway RSS before -> after | fds before -> after | KiB RSS per connection | fds per connection |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {n} of {target} | {:.1} | {} | {} | {} | {} -> {} | {} -> {} | {:.1} | {:.2} |",
        r.enrolled_per_sec(),
        ms(r.p50),
        ms(r.p99),
        failures(held),
        mib(before.rss_kib),
        mib(after.rss_kib),
        before.fds,
        after.fds,
        per(after.rss_kib.saturating_sub(before.rss_kib) as f64),
        per(after.fds.saturating_sub(before.fds) as f64),
    );
    print_failure_reasons(std::iter::once((target, held)));
}

/// What happened to a connection attempt past `max_connections`.
enum Extra {
    Refused {
        after: Duration,
        reason: String,
    },
    /// Accepted although the limit was reached (kept open until the part ends).
    Accepted {
        _open: Box<HeldConnection>,
    },
    Hung,
}

/// Try every device at once; each attempt is bounded by [`EXTRA_WAIT`].
async fn try_extras(fleet: &Fleet, devices: &[Arc<EnrolledDevice>]) -> Vec<Extra> {
    let mut attempts = JoinSet::new();
    for device in devices {
        let (sim, device) = (fleet.sim.clone(), device.clone());
        attempts.spawn(async move {
            let started = Instant::now();
            match sim
                .hold(&device, HOLD_KEEP_ALIVE, started + EXTRA_WAIT)
                .await
            {
                Ok(conn) => Extra::Accepted {
                    _open: Box::new(conn),
                },
                Err(DeviceFailure::Timeout { .. }) => Extra::Hung,
                Err(e) => Extra::Refused {
                    after: started.elapsed(),
                    reason: e.reason(),
                },
            }
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        outcomes.extend(joined.ok());
    }
    outcomes
}

fn print_extras(limit: usize, held: usize, extras: &[Extra], counted: Option<f64>) {
    let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
    let mut slowest = Duration::ZERO;
    let (mut accepted, mut hung) = (0, 0);
    for extra in extras {
        match extra {
            Extra::Refused { after, reason } => {
                *reasons.entry(reason).or_default() += 1;
                slowest = slowest.max(*after);
            }
            Extra::Accepted { .. } => accepted += 1,
            Extra::Hung => hung += 1,
        }
    }
    let refused: usize = reasons.values().sum();
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!(
        "past max_connections {limit}: {refused} of {} refused within {} s (slowest {}; {}), {accepted} accepted, {hung} no answer; gateway counted {} too_many_connections",
        extras.len(),
        EXTRA_WAIT.as_secs(),
        ms(slowest) + " ms",
        if reasons.is_empty() { "-".into() } else { reasons.join(", ") },
        counted.map_or("?".into(), |c| format!("{c:.0}"))
    );
    if held < limit {
        println!(
            "  note: only {held} of {limit} were held, so the limit was not reached for these"
        );
    }
}

/// One reconnect storm.
struct StormRow {
    devices: usize,
    ready_in: Duration,
    batch: Batch<()>,
    cpu: CpuPair,
}

/// Part 3: restart, storm; restart, smaller storm.
async fn reconnect_storms(setup: &mut Setup, fleet: &Fleet) -> Result<()> {
    let big = fleet.sizes.storm.min(fleet.devices.len());
    if big == 0 {
        println!("\nReconnect storm: skipped (no enrolled devices)");
        return Ok(());
    }
    let small = fleet.sizes.storm_small.min(big);
    let mut rows = Vec::new();
    for n in [big, small] {
        let row = storm(setup, fleet, n).await?;
        println!("  storm of {n}: {}", one_line(&row.batch));
        rows.push(row);
    }
    print_storms(&rows, fleet);
    Ok(())
}

/// Start the gateway, reconnect `n` devices at once, stop it.
async fn storm(setup: &mut Setup, fleet: &Fleet, n: usize) -> Result<StormRow> {
    let mut gw = setup.start(None).await?;
    let cpu0 = gw.cpu()?;
    let (sim, timeout) = (fleet.sim.clone(), fleet.sizes.timeout);
    let options = fleet.batch_options(fleet.sizes.storm_concurrency);
    let batch = simulate::drive(fleet.devices[..n].to_vec(), options, move |device| {
        let sim = sim.clone();
        async move {
            let started = Instant::now();
            let reported = sim.activate(&device, started + timeout).await?;
            Ok(Completed {
                value: (),
                latency: reported.saturating_duration_since(started),
            })
        }
    })
    .await
    .context("reconnect storm")?;
    let cpu = gw.cpu()?.since(&cpu0);
    gw.check_running()?;
    let ready_in = gw.ready_in;
    stop_or_report(gw).await;
    Ok(StormRow {
        devices: n,
        ready_in,
        batch,
        cpu,
    })
}

fn print_storms(rows: &[StormRow], fleet: &Fleet) {
    println!(
        "\nReconnect storm after a restart: {} devices in the store, {} in flight; connect, subscribe to devices/D/config, retained configuration, one telemetry message acknowledged\n",
        fleet.devices.len(),
        fleet.sizes.storm_concurrency
    );
    println!("| devices reconnecting | gateway ready after start | reconnects/s | p50 ms | p99 ms | failures | CPU ms/device (simulator + gateway) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        let r = &row.batch.report;
        println!(
            "| {} | {:.2} s | {:.1} | {} | {} | {} | {} |",
            row.devices,
            row.ready_in.as_secs_f64(),
            r.enrolled_per_sec(),
            ms(r.p50),
            ms(r.p99),
            failures(&row.batch),
            cpu_per_device(row.cpu, r.enrolled)
        );
    }
    if let [big, small] = rows {
        let (b, s) = (&big.batch.report, &small.batch.report);
        println!(
            "\nratio {}/{} devices: reconnects/s {:.2}, p99 {:.2}",
            big.devices,
            small.devices,
            b.enrolled_per_sec() / s.enrolled_per_sec().max(f64::MIN_POSITIVE),
            b.p99.as_secs_f64() / s.p99.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
    print_failure_reasons(rows.iter().map(|r| (r.devices, &r.batch)));
}

/// `n ok, f failed in t s: r/s, p50, p99`.
fn one_line<O>(batch: &Batch<O>) -> String {
    let r = &batch.report;
    format!(
        "{} ok, {} failed in {:.2} s: {:.1}/s, p50 {} ms, p99 {} ms",
        r.enrolled,
        failures(batch),
        r.elapsed.as_secs_f64(),
        r.enrolled_per_sec(),
        ms(r.p50),
        ms(r.p99)
    )
}

/// Failures, and the items not tried after too many of them.
fn failures<O>(batch: &Batch<O>) -> String {
    let failed = batch.report.failed();
    if batch.untried > 0 {
        format!("{failed} ({} not tried)", batch.untried)
    } else {
        failed.to_string()
    }
}

fn print_failure_reasons<'a, O: 'a>(batches: impl Iterator<Item = (usize, &'a Batch<O>)>) {
    for (label, batch) in batches {
        let reasons = &batch.report.failed_by_reason;
        if !reasons.is_empty() {
            let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            println!("  failures at {label}: {}", list.join(", "));
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn cpu_per_device(cpu: CpuPair, devices: u64) -> String {
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / devices.max(1) as f64;
    format!("{:.2} + {:.2}", per(cpu.this), per(cpu.other))
}
