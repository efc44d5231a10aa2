//! `onboard serve`: the gateway in the foreground until SIGTERM or Ctrl-C, reloading its
//! certificates, CAs, admin revocation list and templates on SIGHUP; and the log it writes.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::{Config, LogFormat};
use crate::gateway::Gateway;

/// Set up the log on standard error: `ONBOARD_LOG` is the filter, `format` the line shape.
/// JSON lines carry every field of an event (device_id, role, request_id, ...) as a key.
pub fn init_logging(serving: bool, format: LogFormat) {
    // rumqttd logs every ordinary disconnect at ERROR ("router-drop"); the front logs what
    // matters about connections, so the embedded broker's own log is off unless asked for
    // (e.g. ONBOARD_LOG=info,rumqttd=info).
    let default = if serving {
        "info,rumqttd=off"
    } else {
        "warn,rumqttd=off"
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("ONBOARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // The SQL Server driver warns on every connection that trusts the server's certificate
    // unchecked; the store says so once at start instead (unless its log is asked for).
    let driver_asked = std::env::var("ONBOARD_LOG").is_ok_and(|v| v.contains("tiberius"));
    if !driver_asked {
        if let Ok(directive) = "tiberius::client::tls_stream=error".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Run the gateway. `config_file` is read again on every SIGHUP.
pub async fn serve(config: Config, config_file: Option<PathBuf>) -> Result<()> {
    // Banners are for people: a JSON log stays JSON lines only (the same facts are logged).
    let banners = config.log.format == LogFormat::Text;
    let gateway = Gateway::start(config.clone()).await?;
    if gateway.created_pki && banners {
        eprintln!(
            "\n  !!! No PKI was found in {dir}: a DEVELOPMENT PKI was created there.\n  !!! Its CAs are self-signed; do not use it in production.\n  !!! Factory certificates: onboard pki issue-factory --id DEVICE --out DIR\n",
            dir = config.pki.dir.display()
        );
    }
    if banners {
        eprintln!(
            "onboard listening: mTLS {} | password {} | metrics http://{}/metrics | store {}",
            gateway.mtls_addr,
            gateway.password_addr,
            gateway.metrics_addr,
            gateway.store.backend()
        );
    }
    let broker_failed = gateway.broker_failed.clone();
    let mut hangups = Hangups::new()?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if banners {
                    eprintln!("shutting down");
                }
                gateway.stop().await;
                return Ok(());
            }
            _ = broker_failed.cancelled() => {
                gateway.stop().await;
                bail!("the embedded broker stopped routing messages; exiting so that the service manager restarts the gateway (its state is rebuilt from the store)")
            }
            _ = hangups.next() => {
                // Logged and counted by the gateway; a failure keeps the material in use.
                let _ = gateway.reload_file(config_file.as_deref());
            }
        }
    }
}

/// SIGHUP, as a stream of reload requests (none where there are no such signals).
struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    fn new() -> Result<Hangups> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Hangups {
                signal: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Hangups {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
