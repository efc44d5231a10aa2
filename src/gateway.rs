//! One running `onboard serve`: PKI, store, broker, front listeners, enrollment, lifecycle and
//! the metrics endpoint, wired together. [`Gateway::start`] returns once every listener is
//! bound, with their actual addresses (port 0 in the configuration picks a free port).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::audit::{self, Auditor};
use crate::broker::Broker;
use crate::bus::Bus;
use crate::config::Config;
use crate::enroll::Enroller;
use crate::feed::Feed;
use crate::front::identity::{Authenticator, Listener};
use crate::front::session::Sessions;
use crate::front::sources::HandshakeSlots;
use crate::front::tally::RefusalTally;
use crate::front::{Front, FrontHooks, Inbound};
use crate::lifecycle::Lifecycle;
use crate::mailbox::{self, Mailboxes};
use crate::metrics::{self, Metrics};
use crate::pki::{Pki, Role};
use crate::quota::IssueQuota;
use crate::store::{self, AuditEvent, Store};
use crate::templates::Templates;
use crate::topics::{self, ForGateway};

/// Messages for the gateway (enrollment requests, acks, renewals) handled at once; more wait
/// their turn in the inbox.
const GATEWAY_CONCURRENCY: usize = 256;
/// Messages for the gateway (enrollment requests, acks, renewals) waiting to be handled; a
/// full inbox makes the publishing connections wait.
const INBOX: usize = 4096;
/// Connection attempts the kernel queues for each listener before the front accepts them.
const LISTEN_BACKLOG: u32 = 4096;
/// File descriptors kept for everything but client connections (store, listeners, logs).
const RESERVED_FDS: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Templates(#[from] crate::templates::TemplateError),
    #[error("{what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid device id pattern: {0}")]
    Pattern(#[from] regex::Error),
}

/// Why a reload (SIGHUP) was refused; the gateway then keeps everything it had.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Templates(#[from] crate::templates::TemplateError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Admin certificates on the revocation list now in force.
    pub revoked_admins: usize,
    /// Admin sessions ended because their certificate is revoked now: (name, serial).
    pub disconnected_admins: Vec<(String, String)>,
}

/// A running gateway.
pub struct Gateway {
    pub mtls_addr: SocketAddr,
    pub password_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The broker's loopback listeners (they refuse anything but the front).
    pub internal_addrs: Vec<SocketAddr>,
    /// Cancelled if the embedded broker's router stops: the process should be restarted.
    pub broker_failed: CancellationToken,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub pki: Arc<Pki>,
    pub sessions: Arc<Sessions>,
    pub lifecycle: Arc<Lifecycle>,
    /// The admin plane (commands, config acks, firmware, renewals).
    pub admin: Arc<Admin>,
    /// Whether this start created a development PKI.
    pub created_pki: bool,
    /// The templates the enrollment service renders (shared with it; replaced on reload).
    templates: Templates,
    audit: Auditor,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Whether `dir` holds no PKI at all (then `serve` creates a development one).
fn pki_is_empty(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Err(_) => true,
        Ok(entries) => !entries.flatten().any(|e| {
            e.path()
                .extension()
                .is_some_and(|x| x == "pem" || x == "key")
        }),
    }
}

/// Bind a listener whose accept queue holds a reconnect storm ([`LISTEN_BACKLOG`]; the kernel
/// caps it at `net.core.somaxconn`): past the queue, the kernel drops connection attempts and
/// clients retry only after a second.
async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| GatewayError::Bind { what, addr, source })
}

/// Routes what the front reports to the services that act on it.
struct Hooks {
    lifecycle: Arc<Lifecycle>,
    admin: Arc<Admin>,
}

#[async_trait::async_trait]
impl FrontHooks for Hooks {
    async fn device_reported(&self, device_id: &str, serial: &str) -> bool {
        let at = time::OffsetDateTime::now_utc();
        self.lifecycle.activate(device_id, serial, at).await
    }

    fn credential_first_use(&self, device_id: &str, serial: &str) {
        let admin = self.admin.clone();
        let (device_id, serial) = (device_id.to_owned(), serial.to_owned());
        tokio::spawn(async move { admin.renewed_credential_used(&device_id, &serial).await });
    }

    fn admin_command(&self, admin: &str, topic: &str, payload: Bytes) {
        let service = self.admin.clone();
        let (actor, topic) = (admin.to_owned(), topic.to_owned());
        tokio::spawn(async move { service.command(&actor, &topic, &payload).await });
    }
}

impl Gateway {
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let created_pki = if pki_is_empty(&config.pki.dir) {
            let report = Pki::init(&config.pki)?;
            let files: Vec<String> = report
                .created
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            tracing::warn!(dir = %config.pki.dir.display(), files = ?files, "NO PKI FOUND: created a DEVELOPMENT PKI (self-signed CAs). Do not use it in production.");
            true
        } else {
            false
        };
        let pki = Arc::new(Pki::load(&config.pki)?);
        let templates = Templates::load(&config.enrollment.templates_dir)?;
        let store = store::open(&config.store).await?;
        let metrics = Arc::new(Metrics::new());
        if let Err(e) = metrics.refresh_pki_expiry(&config.pki) {
            tracing::warn!(error = %e, "CA certificate expiry not exported");
        }
        let shutdown = CancellationToken::new();

        let broker = Broker::start(
            &config.broker,
            &config.server,
            metrics.broker_publish_dropped.clone(),
        )
        .await?;
        let sessions = Arc::new(Sessions::default());
        let mailboxes = Arc::new(Mailboxes::new(
            mailbox::Limits {
                queued: config.limits.max_queued_per_device.max(1),
                inflight: config.broker.max_inflight.max(1),
            },
            metrics.session_queue_dropped.clone(),
        ));
        let bus = Bus::new(mailboxes.clone(), broker.link.clone());
        let quota = IssueQuota {
            per_window: config.limits.credentials_per_device_per_hour,
        };
        let audit = Auditor::start(store.clone(), bus.clone(), metrics.clone());
        let lifecycle = Arc::new(Lifecycle::new(
            store.clone(),
            metrics.clone(),
            audit.clone(),
            bus.clone(),
            sessions.clone(),
            Duration::from_secs(config.enrollment.activation_timeout_secs),
            Duration::from_millis(config.lifecycle.sweep_interval_ms.max(10)),
            config.store.pending_queue,
        ));
        let admin = Arc::new(
            Admin::new(
                pki.clone(),
                store.clone(),
                metrics.clone(),
                audit.clone(),
                bus.clone(),
                sessions.clone(),
                config.lifecycle.clone(),
            )
            .with_quota(quota),
        );
        let enroller = Arc::new(
            Enroller::new(
                pki.clone(),
                store.clone(),
                metrics.clone(),
                audit.clone(),
                bus.clone(),
                sessions.clone(),
                lifecycle.clone(),
                templates.clone(),
                config.enrollment.clone(),
            )
            .with_quota(quota),
        );

        // The change feed is followed from before the restore, so nothing another gateway
        // changes meanwhile is missed (applying it twice does no harm).
        let feed_start = store.latest_change().await?;
        // rumqttd keeps nothing across restarts: republish what the store says is retained.
        let republished = admin.republish_retained().await?;
        let watching = lifecycle.restore().await?;
        tracing::info!(
            republished,
            watching,
            "retained state restored from the store"
        );
        metrics.refresh_device_gauge(store.as_ref()).await;

        let (inbox_tx, inbox) = tokio::sync::mpsc::channel(INBOX);
        let anonymous_refusals = RefusalTally::new(
            Duration::from_millis(config.limits.anonymous_refusal_window_ms),
            audit.clone(),
        );
        let max_connections = connection_limit(config.server.max_connections);
        metrics
            .connections_max
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
        let front = Arc::new(Front {
            pki: pki.clone(),
            auth: Authenticator {
                store: store.clone(),
                metrics: metrics.clone(),
                device_id_pattern: regex::Regex::new(&config.pki.device_id_pattern)?,
                mode: config.enrollment.mode,
            },
            metrics: metrics.clone(),
            audit: audit.clone(),
            sessions: sessions.clone(),
            mailboxes: mailboxes.clone(),
            fanout: broker.fanout.clone(),
            inbox: inbox_tx,
            hooks: Arc::new(Hooks {
                lifecycle: lifecycle.clone(),
                admin: admin.clone(),
            }),
            broker_addrs: broker.internal_addrs.clone(),
            broker_secret: broker.secret.clone(),
            handshake_timeout: Duration::from_millis(config.server.handshake_timeout_ms),
            connect_timeout: Duration::from_millis(config.server.connect_timeout_ms),
            write_timeout: Duration::from_millis(config.limits.write_timeout_ms.max(1)),
            max_packet: config.broker.max_payload_size,
            max_retained: config.limits.max_retained_bytes,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            handshakes: HandshakeSlots::new(config.limits.max_handshakes_per_source),
            anonymous_refusals: anonymous_refusals.clone(),
        });

        let mtls = bind("mTLS listener", config.server.mtls_listen).await?;
        let password = bind("password listener", config.server.password_listen).await?;
        let http = bind("metrics listener", config.server.metrics_listen).await?;
        let local = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
        let mtls_addr = local(&mtls, config.server.mtls_listen);
        let password_addr = local(&password, config.server.password_listen);
        let metrics_addr = local(&http, config.server.metrics_listen);

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(front.clone().serve(
            mtls,
            Listener::Mtls,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(front.clone().serve(
            password,
            Listener::Password,
            shutdown.clone(),
        )));
        let http_state = metrics::HttpState {
            metrics: metrics.clone(),
            store: store.clone(),
            broker_failed: broker.failed.clone(),
        };
        let http_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(http, http_state, http_shutdown).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        }));
        tasks.push(tokio::spawn(lifecycle.clone().run(shutdown.clone())));
        let feed = Arc::new(Feed {
            store: store.clone(),
            sessions: sessions.clone(),
            link: bus.clone(),
            metrics: metrics.clone(),
            poll: Duration::from_millis(config.store.change_poll_ms.max(10)),
            retention: Duration::from_secs(config.store.change_retention_secs.max(1)),
        });
        tasks.push(tokio::spawn(feed.run(feed_start, shutdown.clone())));
        tasks.push(tokio::spawn(anonymous_refusals.run(shutdown.clone())));
        tasks.push(tokio::spawn(audit::run_retention(
            store.clone(),
            metrics.clone(),
            config.store.audit_retention_days,
            shutdown.clone(),
        )));
        // Renewal grace periods and the expiring-certificates gauge.
        tasks.push(tokio::spawn(admin.clone().run(shutdown.clone())));
        tasks.push(tokio::spawn(dispatch(
            inbox,
            enroller.clone(),
            admin.clone(),
            shutdown.clone(),
        )));
        let prune_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = prune_shutdown.cancelled() => return,
                    _ = tick.tick() => enroller.prune(),
                }
            }
        }));
        tracing::info!(%mtls_addr, %password_addr, %metrics_addr, store = store.backend(), "gateway listening");
        Ok(Gateway {
            mtls_addr,
            password_addr,
            metrics_addr,
            internal_addrs: broker.internal_addrs.clone(),
            broker_failed: broker.failed.clone(),
            store,
            metrics,
            pki,
            sessions,
            lifecycle,
            admin,
            created_pki,
            templates,
            audit,
            shutdown,
            tasks,
        })
    }

    /// Read the PKI directory (server certificate and key, factory, operational and admin CAs,
    /// the admin revocation list) and the templates again, as `config` names them, and use
    /// them from now on: new handshakes see the new material, open connections stay up, except
    /// admin sessions whose certificate the new revocation list revokes. Counted in
    /// `onboard_reloads_total{result}`; on an error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<Reloaded, ReloadError> {
        self.counted(self.swap_material(config))
    }

    /// [`Self::reload`] with the configuration read again from `file` (and the environment),
    /// as `onboard serve` does on SIGHUP: a rotation may name new CA files.
    pub fn reload_file(&self, file: Option<&Path>) -> Result<Reloaded, ReloadError> {
        let config = Config::load(file).map_err(ReloadError::from);
        self.counted(config.and_then(|config| self.swap_material(&config)))
    }

    fn counted(&self, outcome: Result<Reloaded, ReloadError>) -> Result<Reloaded, ReloadError> {
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[result]).inc();
        match &outcome {
            Ok(done) => tracing::info!(
                revoked_admins = done.revoked_admins,
                disconnected_admins = done.disconnected_admins.len(),
                "reloaded certificates, CAs and templates"
            ),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the certificates, CAs and templates in use")
            }
        }
        outcome
    }

    fn swap_material(&self, config: &Config) -> Result<Reloaded, ReloadError> {
        // Both are read before either is used, so a bad file changes nothing.
        let templates = Templates::load(&config.enrollment.templates_dir)?;
        let pki = self.pki.reload(&config.pki)?;
        self.templates.adopt(&templates);
        if let Err(e) = self.metrics.refresh_pki_expiry(&config.pki) {
            tracing::warn!(error = %e, "CA certificate expiry not exported after the reload");
        }
        let revoked = &pki.revoked_admins;
        let disconnected = self
            .sessions
            .disconnect_revoked(Role::Admin, |serial| revoked.contains(serial));
        for (name, serial) in &disconnected {
            tracing::info!(admin = %name, serial = %serial, "admin certificate revoked; session closed");
            self.audit.record(AuditEvent::new(
                name,
                "admin_revoked",
                "gateway",
                serde_json::json!({ "serial": serial, "detail": "certificate on the admin revocation list; disconnected" }),
            ));
        }
        Ok(Reloaded {
            revoked_admins: revoked.len(),
            disconnected_admins: disconnected,
        })
    }

    /// A token that stops the gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stop accepting, close every client connection, wait for the tasks to end, and write
    /// the activation marks still queued for the store (if it is back).
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let queued = self.lifecycle.queued_activations();
        if queued > 0 {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.lifecycle.sweep()).await;
            let left = self.lifecycle.queued_activations();
            if left > 0 {
                tracing::error!(
                    left,
                    "activation marks not written before stopping: the store is still down"
                );
            }
        }
    }
}

/// Route what clients publish for the gateway. The topic's device id is authenticated:
/// the front lets only device D publish under `enroll/D/` and `devices/D/`. At most
/// [`GATEWAY_CONCURRENCY`] messages are handled at once, whatever their kind: a device flooding
/// config acks or renewals waits in the bounded inbox like everyone else, and can never start
/// unbounded store work.
async fn dispatch(
    mut inbox: tokio::sync::mpsc::Receiver<Inbound>,
    enroller: Arc<Enroller>,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(GATEWAY_CONCURRENCY));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = inbox.recv() => match m { Some(m) => m, None => return },
        };
        if topics::for_gateway(&message.topic).is_none() {
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (enroller, admin) = (enroller.clone(), admin.clone());
        tokio::spawn(async move {
            handle(&message, &enroller, &admin).await;
            drop(permit);
        });
    }
}

/// Act on one message for the gateway.
async fn handle(message: &Inbound, enroller: &Enroller, admin: &Admin) {
    let payload = &message.payload;
    match topics::for_gateway(&message.topic) {
        Some(ForGateway::EnrollRequest(id)) => {
            enroller.handle(id, payload, message.factory.as_ref()).await;
        }
        Some(ForGateway::ConfigAck(id)) => admin.config_ack(id, payload).await,
        Some(ForGateway::FirmwareStatus(id)) => admin.firmware_status(id, payload).await,
        Some(ForGateway::CertRenew(id)) => admin.renew(id, payload).await,
        None => {}
    }
}

/// Client connections this process can hold: `configured`, or fewer when the descriptor
/// limit would run out first (then a client past it would hang in the accept backlog instead
/// of being refused). Raises the soft descriptor limit to the hard one first.
fn connection_limit(configured: usize) -> usize {
    let available = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit.saturating_sub(RESERVED_FDS),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the file descriptor limit");
            return configured;
        }
    };
    let available = usize::try_from(available).unwrap_or(usize::MAX);
    if available < configured {
        tracing::warn!(
            configured,
            available,
            "server.max_connections lowered to what the file descriptor limit allows (one per connection)"
        );
    }
    configured.min(available)
}
