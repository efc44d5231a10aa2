//! `onboard simulate`: run a simulated fleet against a gateway, with a progress bar, and print
//! the report.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::simulate;
/// The arguments of `onboard simulate` (re-exported for the command definition).
pub use crate::simulate::SimulateArgs;

/// Run the simulation described by `args` (gaps filled from `config`) and print its report.
/// Fails when the simulation cannot run, or when any device failed (after printing the report).
pub async fn run_cli(args: SimulateArgs, config: &Config) -> anyhow::Result<()> {
    let options = args.to_options(config);
    let devices = options.devices;
    println!(
        "simulating {devices} devices ({} credential, {} at once) against {}:{}",
        options.credential, options.concurrency, options.host, options.port
    );
    let progress = ProgressBar::new(devices as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} devices, {per_sec} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let outcome = simulate::run(options, Some(&progress)).await;
    progress.finish_and_clear();
    let report = outcome.context("fleet simulation")?;
    println!("{report}");
    let failed = report.failed();
    if failed > 0 {
        anyhow::bail!("{failed} of {devices} simulated devices failed");
    }
    Ok(())
}
