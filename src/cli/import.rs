//! `onboard devices import FILE [--skip-invalid]`: pre-register devices from a CSV file
//! (`id,type,model,location,firmware`).

use std::path::Path;

use crate::import::{self, OutcomeSummary, RowRules};
use anyhow::{bail, Context};

/// Validate every row of `path`, print the bad ones as `line N: message`, and import the
/// devices (none if a row is bad, unless `skip_invalid`), with a progress bar. Running it again
/// on the same file changes nothing.
pub async fn run_import(
    path: &Path,
    skip_invalid: bool,
    config: &crate::config::Config,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pattern =
        regex::Regex::new(&config.pki.device_id_pattern).context("[pki] device_id_pattern")?;
    let templates = crate::templates::Templates::load(&config.enrollment.templates_dir)
        .context("loading the device-type templates")?;
    let types: Vec<String> = templates.device_types();
    let rules = RowRules {
        device_id_pattern: &pattern,
        device_types: Some(&types),
    };
    let (devices, errors) = import::parse_rows(&text, &rules);
    for e in &errors {
        println!("{e}");
    }
    if !errors.is_empty() && !skip_invalid {
        bail!(
            "{} invalid row(s) in {}; nothing imported (fix them, or pass --skip-invalid)",
            errors.len(),
            path.display()
        );
    }
    let store = crate::store::open(&config.store)
        .await
        .context("opening the store")?;
    let bar = indicatif::ProgressBar::new(devices.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let outcome = import::import(store.as_ref(), &devices, Some(&bar))
        .await
        .context("importing")?;
    bar.finish_and_clear();
    println!("{}", OutcomeSummary(&outcome));
    if !errors.is_empty() {
        println!("{} invalid row(s) skipped", errors.len());
    }
    Ok(())
}
