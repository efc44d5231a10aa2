//! Does the gateway's cost grow with the fleet?
//!
//! `onboard serve` runs as a separate process (so it has its own descriptor budget, and its
//! memory, descriptors and CPU are its own in `/proc`), on loopback ports picked here, with a
//! temporary SQLite file and PKI directory (made by the gateway at its first start). The
//! simulated devices (`onboard::simulate`) run in this process. Every wait is bounded.
//!
//! 1. **Enrollment at fleet steps**: a measured batch of CSR devices through the whole flow
//!    (bootstrap connect, enrollment, reconnect with the operational certificate, retained
//!    configuration, activating telemetry) when 0, 10k, 25k and 50k devices are already
//!    enrolled. Between steps the fleet is filled by the same flow, unmeasured, at a higher
//!    concurrency. The kits of a measured batch (factory certificate, key, CSR) are made before
//!    its clock starts: a real device brings them.
//! 2. **Connections held**: enrolled devices connect with their operational certificates and
//!    stay idle (keepalive 600 s) on a gateway restarted with `max_connections` = their number;
//!    then a few more try, and each must be refused at once. The gateway is then stopped
//!    (SIGTERM) with the connections open.
//! 3. **Reconnect storm**: the gateway restarts on the same store and PKI, and enrolled devices
//!    reconnect at once (bounded concurrency): subscribe to `devices/D/config`, receive the
//!    retained configuration, publish telemetry. A smaller storm on another restart gives the
//!    ratio.
//!
//! Sizes, from the environment: `FLEET_STEPS` (0,10000,25000,50000), `FLEET_BATCH` (2000),
//! `FLEET_CONCURRENCY` (64), `FLEET_FILL_CONCURRENCY` (128), `FLEET_HOLD` (18000),
//! `FLEET_EXTRA` (8), `FLEET_STORM` (20000), `FLEET_STORM_SMALL` (FLEET_STORM / 10),
//! `FLEET_STORM_CONCURRENCY` (256), `FLEET_TIMEOUT_SECS` (60, one device's flow),
//! `FLEET_MAX_FAILURES` (200: a batch stops handing out work after that many failures).

#[path = "../common/mod.rs"]
mod common;
mod parts;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::env_usize;

/// The sizes of a run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub steps: Vec<usize>,
    pub batch: usize,
    pub concurrency: usize,
    pub fill_concurrency: usize,
    pub hold: usize,
    pub extra: usize,
    pub storm: usize,
    pub storm_small: usize,
    pub storm_concurrency: usize,
    pub timeout: Duration,
    pub max_failures: u64,
}

/// `FLEET_STEPS`: comma-separated fleet sizes, in increasing order.
fn steps_from_env() -> Result<Vec<usize>> {
    let Ok(text) = std::env::var("FLEET_STEPS") else {
        return Ok(vec![0, 10_000, 25_000, 50_000]);
    };
    let mut steps: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("FLEET_STEPS={text:?}: comma-separated numbers"))?;
    if steps.is_empty() {
        bail!("FLEET_STEPS is empty");
    }
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

impl Sizes {
    fn from_env() -> Result<Sizes> {
        let storm = env_usize("FLEET_STORM", 20_000).max(1);
        Ok(Sizes {
            steps: steps_from_env()?,
            batch: env_usize("FLEET_BATCH", 2_000).max(1),
            concurrency: env_usize("FLEET_CONCURRENCY", 64).max(1),
            fill_concurrency: env_usize("FLEET_FILL_CONCURRENCY", 128).max(1),
            hold: env_usize("FLEET_HOLD", 18_000),
            extra: env_usize("FLEET_EXTRA", 8),
            storm,
            storm_small: env_usize("FLEET_STORM_SMALL", storm / 10).clamp(1, storm),
            storm_concurrency: env_usize("FLEET_STORM_CONCURRENCY", 256).max(1),
            timeout: Duration::from_secs(env_usize("FLEET_TIMEOUT_SECS", 60).max(1) as u64),
            max_failures: env_usize("FLEET_MAX_FAILURES", 200).max(1) as u64,
        })
    }
}

/// Raise this process's soft limit of open files to the hard limit (the gateway, started
/// later, inherits it). Returns the limit now in force.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let now = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => limit.current,
    };
    let shown = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    println!(
        "open files: soft limit {} -> {} (hard {})",
        shown(limit.current),
        shown(now),
        shown(limit.maximum)
    );
    now.unwrap_or(u64::MAX)
}

fn main() -> ExitCode {
    let open_files = raise_open_files_limit();
    let outcome = common::runtime().block_on(async {
        let sizes = Sizes::from_env()?;
        parts::run(sizes, open_files).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
