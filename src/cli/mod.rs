//! The `onboard` command line. Errors are reported with `anyhow` here and nowhere else.

pub mod admin;
pub mod import;
mod ops;
mod serve;
pub mod simulate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{Config, LogFormat};
use crate::pki::{CertOptions, Pki};
use crate::store::{self, Device, DeviceFilter, DeviceState};

/// `onboard --version`: the crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("BUILT_GIT_REVISION"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "onboard",
    version = VERSION,
    about = "MQTT broker with a built-in zero-touch enrollment gateway"
)]
pub struct Cli {
    /// Configuration file (default: config/onboard.toml if it exists; every key has a default
    /// and can be overridden by ONBOARD_<SECTION>_<KEY>).
    #[arg(long, short, global = true, env = "ONBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway: broker, TLS front, enrollment, metrics. SIGHUP reloads the
    /// certificates, CAs, admin revocation list and templates.
    Serve {
        /// Log lines as text or JSON [default: `[log] format`, ONBOARD_LOG_FORMAT].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Certificates: development PKI, factory and admin certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The device inventory.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Send an admin command to a running gateway (admin certificate) and print the reply.
    Admin {
        #[command(flatten)]
        conn: admin::AdminConnection,
        #[command(subcommand)]
        cmd: admin::AdminCommand,
    },
    /// Simulate a fleet enrolling end to end against a running gateway.
    Simulate(simulate::SimulateArgs),
    /// The inventory store itself.
    #[command(subcommand)]
    Store(StoreCommand),
    /// A device's audit trail, oldest first.
    Audit {
        device: String,
        /// Newest N events.
        #[arg(long, default_value_t = 200)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create the development PKI (only the files that are missing).
    Init,
    /// Issue factory (bootstrap) certificates: the manufacturing step.
    IssueFactory {
        /// One device id.
        #[arg(long, conflicts_with_all = ["count", "prefix"])]
        id: Option<String>,
        /// Issue N certificates named <prefix><number>.
        #[arg(long, requires = "prefix")]
        count: Option<u32>,
        #[arg(long)]
        prefix: Option<String>,
        /// First number of a --count series.
        #[arg(long, default_value_t = 1)]
        start: u32,
        /// Directory for <id>.pem / <id>.key (and the CA certificates clients need).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Also write a CSV manifest for `onboard devices import` (id,type,model,location,firmware).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Device type written in the manifest.
        #[arg(long = "type", default_value = "thermostat")]
        device_type: String,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value = "")]
        location: String,
        #[arg(long, default_value = "")]
        firmware: String,
    },
    /// Issue an admin certificate.
    IssueAdmin {
        name: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke an admin certificate: add it to the admin revocation list (`[pki] admin_crl`,
    /// signed by the admin CA). A running gateway applies it on SIGHUP.
    RevokeAdmin {
        /// The admin's certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// PKI directory [default: `[pki] dir`].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Check a PKI directory before going live: validity and expiry, keys, permissions,
    /// server names, factory CA subjects. Exits non-zero on a problem.
    Check {
        /// PKI directory [default: `[pki] dir`].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy the SQLite store into a new file while gateways keep running (SQL Server: use
    /// the server's BACKUP DATABASE).
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Pre-register devices from a CSV file (id,type,model,location,firmware) as `pending`.
    /// Every row is validated first; nothing is imported if one is bad, unless --skip-invalid.
    Import {
        file: PathBuf,
        #[arg(long)]
        skip_invalid: bool,
    },
    /// List devices.
    List {
        #[arg(long, value_parser = parse_state)]
        state: Option<DeviceState>,
        #[arg(long = "type")]
        device_type: Option<String>,
        /// Only devices whose certificate expires within this period (e.g. 30d, 12h).
        #[arg(long, value_parser = parse_period)]
        expiring: Option<Duration>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// One device with its credentials and configuration history.
    Show {
        device: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

fn parse_state(s: &str) -> Result<DeviceState, String> {
    s.parse().map_err(|_| {
        format!("unknown state {s:?}; one of pending, enrolling, active, failed, revoked")
    })
}

/// `30d`, `12h`, `45m`, `90s`.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad period {s:?}; e.g. 30d, 12h"))?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        "s" | "" => n,
        _ => return Err(format!("bad period unit in {s:?}; use d, h, m or s")),
    };
    Ok(Duration::from_secs(secs))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Serve {
        log_format: Some(format),
    } = cli.command
    {
        config.log.format = format;
    }
    serve::init_logging(
        matches!(cli.command, Command::Serve { .. }),
        config.log.format,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: Config) -> Result<()> {
    match cli.command {
        Command::Serve { .. } => serve::serve(config, cli.config).await,
        Command::Store(StoreCommand::Backup { out }) => ops::backup(&config, out).await,
        Command::Pki(cmd) => pki(cmd, &config),
        Command::Devices(cmd) => devices(cmd, &config).await,
        Command::Admin { conn, cmd } => admin::run(cmd, &config, &conn).await,
        Command::Simulate(args) => simulate::run_cli(args, &config).await,
        Command::Audit {
            device,
            limit,
            format,
        } => audit(&device, limit, format, &config).await,
    }
}

fn pki(cmd: PkiCommand, config: &Config) -> Result<()> {
    match cmd {
        PkiCommand::Init => {
            let report = Pki::init(&config.pki)?;
            if report.created.is_empty() {
                println!(
                    "PKI in {} is complete; nothing created",
                    config.pki.dir.display()
                );
            }
            for path in report.created {
                println!("created {}", path.display());
            }
            Ok(())
        }
        PkiCommand::IssueFactory {
            id,
            count,
            prefix,
            start,
            out,
            days,
            manifest,
            device_type,
            model,
            location,
            firmware,
        } => {
            let ids: Vec<String> = match (id, count, prefix) {
                (Some(id), None, None) => vec![id],
                (None, Some(n), Some(p)) => {
                    let width = (u64::from(start) + u64::from(n)).to_string().len().max(4);
                    (start..start.saturating_add(n))
                        .map(|i| format!("{p}{i:0width$}"))
                        .collect()
                }
                _ => bail!("give --id DEVICE, or --count N --prefix P"),
            };
            let pattern = regex::Regex::new(&config.pki.device_id_pattern)?;
            if let Some(bad) = ids.iter().find(|id| !pattern.is_match(id)) {
                bail!(
                    "device id {bad:?} does not match [pki] device_id_pattern {}",
                    pattern.as_str()
                );
            }
            let options = CertOptions::valid_for_days(days);
            let bar = progress(ids.len() as u64, "issuing");
            let mut issued = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(1000) {
                issued.extend(crate::pki::issue_factory_batch(
                    &config.pki.dir,
                    chunk,
                    &out,
                    &options,
                )?);
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            if let Some(path) = manifest {
                write_manifest(&path, &ids, &device_type, &model, &location, &firmware)?;
                println!("manifest {}", path.display());
            }
            println!(
                "issued {} factory certificate(s) in {}",
                issued.len(),
                out.display()
            );
            Ok(())
        }
        PkiCommand::RevokeAdmin { cert, dir } => ops::revoke_admin(config, dir, &cert),
        PkiCommand::Check { dir } => ops::check(config, dir),
        PkiCommand::IssueAdmin { name, out } => {
            crate::pki::issue_admin(&config.pki.dir, &name, &out)?;
            println!(
                "issued {}/{name}.pem and {}/{name}.key",
                out.display(),
                out.display()
            );
            Ok(())
        }
    }
}

fn write_manifest(
    path: &Path,
    ids: &[String],
    device_type: &str,
    model: &str,
    location: &str,
    firmware: &str,
) -> Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "id,type,model,location,firmware")?;
    for id in ids {
        writeln!(
            w,
            "{},{},{},{},{}",
            csv_field(id),
            csv_field(device_type),
            csv_field(model),
            csv_field(location),
            csv_field(firmware)
        )?;
    }
    w.flush()?;
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

fn ts(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&Rfc3339).ok()).unwrap_or_default()
}

async fn devices(cmd: DevicesCommand, config: &Config) -> Result<()> {
    if let DevicesCommand::Import { file, skip_invalid } = &cmd {
        return import::run_import(file, *skip_invalid, config).await;
    }
    let store = store::open(&config.store).await?;
    match cmd {
        DevicesCommand::Import { .. } => {}
        DevicesCommand::List {
            state,
            device_type,
            expiring,
            limit,
            format,
        } => {
            let filter = DeviceFilter {
                state,
                device_type,
                expiring_before: expiring.map(|d| OffsetDateTime::now_utc() + d),
                limit: Some(limit),
                offset: None,
            };
            let devices = store.list_devices(&filter).await?;
            print_devices(&devices, format)?;
        }
        DevicesCommand::Show { device, format } => {
            let Some(d) = store.device(&device).await? else {
                bail!("no device {device:?} in the inventory");
            };
            let credentials = store.credentials_of(&device).await?;
            let configs = store.config_history(&device).await?;
            if format == Format::Json {
                let doc = serde_json::json!({ "device": d, "credentials": credentials, "configs": configs });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            println!("id:               {}", d.id);
            println!("type:             {}", d.device_type);
            println!("state:            {}", d.state);
            println!("model:            {}", d.model.as_deref().unwrap_or(""));
            println!("location:         {}", d.location.as_deref().unwrap_or(""));
            println!(
                "firmware:         {}",
                d.firmware_version.as_deref().unwrap_or("")
            );
            println!(
                "credential kind:  {}",
                d.credential_kind.map(|k| k.as_str()).unwrap_or("")
            );
            println!("created:          {}", ts(Some(d.created_at)));
            println!("enrolled:         {}", ts(d.enrolled_at));
            println!("activated:        {}", ts(d.activated_at));
            println!("deadline:         {}", ts(d.activation_deadline));
            println!(
                "last error:       {}",
                d.last_error.as_deref().unwrap_or("")
            );
            println!(
                "factory issuer:   {} (serial {})",
                d.factory_issuer.as_deref().unwrap_or(""),
                d.factory_serial.as_deref().unwrap_or("")
            );
            println!("credentials:");
            for c in credentials {
                println!(
                    "  {} {:<11} not_after={} used={} revoked={} {}",
                    c.serial,
                    c.kind.as_str(),
                    ts(c.not_after),
                    ts(c.activated_at),
                    ts(c.revoked_at),
                    c.revoke_reason.unwrap_or_default()
                );
            }
            println!("configs:");
            for c in configs {
                println!(
                    "  v{} by {} at {} applied={} {}",
                    c.version,
                    c.created_by,
                    ts(Some(c.created_at)),
                    ts(c.applied_at),
                    c.failed_error.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn print_devices(devices: &[Device], format: Format) -> Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(devices)?),
        Format::Csv => {
            println!("id,type,state,model,location,firmware,enrolled_at,activated_at");
            for d in devices {
                println!(
                    "{},{},{},{},{},{},{},{}",
                    csv_field(&d.id),
                    csv_field(&d.device_type),
                    d.state,
                    csv_field(d.model.as_deref().unwrap_or("")),
                    csv_field(d.location.as_deref().unwrap_or("")),
                    csv_field(d.firmware_version.as_deref().unwrap_or("")),
                    ts(d.enrolled_at),
                    ts(d.activated_at)
                );
            }
        }
        Format::Table => {
            println!(
                "{:<32} {:<12} {:<10} {:<10} {:<25}",
                "ID", "TYPE", "STATE", "FIRMWARE", "ACTIVATED"
            );
            for d in devices {
                println!(
                    "{:<32} {:<12} {:<10} {:<10} {:<25}",
                    d.id,
                    d.device_type,
                    d.state.as_str(),
                    d.firmware_version.as_deref().unwrap_or("-"),
                    ts(d.activated_at)
                );
            }
            println!("{} device(s)", devices.len());
        }
    }
    Ok(())
}

async fn audit(device: &str, limit: u32, format: Format, config: &Config) -> Result<()> {
    let store = store::open(&config.store).await?;
    let events = store.events(device, limit).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&events)?),
        Format::Csv => {
            println!("at,event,actor,request_id,detail");
            for e in &events {
                println!(
                    "{},{},{},{},{}",
                    ts(Some(e.at)),
                    csv_field(&e.event),
                    csv_field(&e.actor),
                    csv_field(e.request_id.as_deref().unwrap_or("")),
                    csv_field(&e.detail.to_string())
                );
            }
        }
        Format::Table => {
            for e in &events {
                println!(
                    "{}  {:<22} {:<10} {:<16} {}",
                    ts(Some(e.at)),
                    e.event,
                    e.actor,
                    e.request_id.as_deref().unwrap_or("-"),
                    e.detail
                );
            }
            if events.is_empty() {
                println!("no events for {device:?}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        assert_eq!(parse_period("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_period("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_period("90"), Ok(Duration::from_secs(90)));
        assert!(parse_period("3w").is_err());
        assert!(parse_period("d").is_err());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn command_line_parses() {
        Cli::command_for_test();
    }

    impl Cli {
        fn command_for_test() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
