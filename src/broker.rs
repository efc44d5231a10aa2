//! The embedded rumqttd broker: the fan-out engine.
//!
//! Devices never talk to it directly: the [front](crate::front) serves their sessions and
//! hands it what they publish (telemetry, events, state, acks) through one in-process link,
//! [`Fanout`], so that admins and back-ends subscribed with wildcards get it. Admin connections
//! are relayed to its internal listener, on loopback only, whose authentication hook accepts
//! nothing but the per-process secret that the front presents after it has authenticated the
//! admin itself. A client that reaches the internal port directly cannot know the secret.
//!
//! Its router compares every new topic with every filter, and every new filter with every
//! topic seen: so only admins' and back-ends' filters are ever registered with it, and it
//! keeps no per-device retained message but a device's own `devices/D/state`.
//!
//! The gateway publishes through [`BrokerLink`] (admin replies, audit events, copies of device
//! configurations for observers), another local link.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use rand::RngCore;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, ServerConfig};

/// Username the front presents to the internal listener.
pub const INTERNAL_USER: &str = "onboard-front";

/// Client ids of the gateway's own links into the router; no client may use them.
pub const RESERVED_CLIENT_IDS: &[&str] = &["onboard-gateway", "onboard-fanout"];

/// Connections the router holds: admins and back-ends only (devices never reach it). Its
/// tables are allocated up front for this many.
const ROUTER_CONNECTIONS: usize = 1024;

/// Publishes handed to the router in one go.
const PUBLISH_BATCH: usize = 256;
/// A link's messages the router may have still to take before more are handed over.
const ROUTER_BACKLOG: usize = 4096;
/// Gateway publishes waiting for the router.
const GATEWAY_QUEUE: usize = 65_536;
/// Device publishes waiting for the router; a full queue makes the publishing connections wait.
const FANOUT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("internal listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker link: {0}")]
    Link(String),
    #[error("broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

/// Handle to publish through the broker. Cheap to clone; never blocks the caller: publishes are
/// queued to a thread that owns the link (the router's channel is bounded and may block). The
/// queue is bounded too: what the gateway publishes there is a live view (admin replies, which
/// the store also keeps for a retry; audit events; copies for observers), so past
/// [`GATEWAY_QUEUE`] a publish is dropped and counted rather than held.
#[derive(Clone)]
pub struct BrokerLink {
    tx: mpsc::Sender<Publish>,
    dropped: IntCounter,
}

impl BrokerLink {
    /// Local links publish at QoS 0; rumqttd delivers at the subscription's QoS.
    pub fn publish(&self, topic: &str, payload: Bytes, retain: bool) {
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, retain);
        if let Err(e) = self.tx.try_send(publish) {
            self.dropped.inc();
            tracing::warn!(topic, error = %e, "broker link queue full or closed; publish dropped");
        }
    }
}

/// What devices publish, on its way to the router's subscribers. Bounded: a publisher that
/// outruns the router waits (and so stops reading from its socket).
#[derive(Clone)]
pub struct Fanout {
    tx: mpsc::Sender<Publish>,
}

impl Fanout {
    pub async fn publish(&self, topic: &str, payload: Bytes, retain: bool) {
        let publish = Publish::new(Bytes::copy_from_slice(topic.as_bytes()), payload, retain);
        if self.tx.send(publish).await.is_err() {
            tracing::error!(topic, "fan-out link is closed; publish dropped");
        }
    }
}

/// A running embedded broker.
pub struct Broker {
    /// Loopback addresses of the internal listeners (only the front connects here).
    pub internal_addrs: Vec<SocketAddr>,
    /// Password the front presents; random per process.
    pub secret: Arc<str>,
    pub link: BrokerLink,
    pub fanout: Fanout,
    /// Cancelled when the broker's router is gone (it panicked): nothing can be routed any more
    /// and the process should be restarted.
    pub failed: CancellationToken,
}

impl Broker {
    /// Start rumqttd's router and its internal listener, and the gateway's link.
    /// Returns once the internal listener accepts connections.
    pub async fn start(
        broker: &BrokerConfig,
        server: &ServerConfig,
        dropped: IntCounter,
    ) -> Result<Broker, BrokerError> {
        let internal_addrs = (0..broker.internal_listeners)
            .map(|i| match broker.internal_listen.port() {
                0 => free_loopback_port(broker.internal_listen),
                port => port
                    .checked_add(i)
                    .map(|p| SocketAddr::new(broker.internal_listen.ip(), p))
                    .ok_or(BrokerError::Bind {
                        addr: broker.internal_listen,
                        source: std::io::Error::other("internal ports past 65535"),
                    }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut secret_bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret_bytes);
        let secret: Arc<str> = Arc::from(hex::encode(secret_bytes));

        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: broker.max_payload_size,
            max_inflight_count: broker.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let expected = secret.clone();
        connections.set_auth_handler(move |_client_id: String, user: String, pass: String| {
            let ok = user == INTERNAL_USER
                && bool::from(subtle::ConstantTimeEq::ct_eq(
                    pass.as_bytes(),
                    expected.as_bytes(),
                ));
            async move { ok }
        });
        let listeners: std::collections::HashMap<String, ServerSettings> = internal_addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let name = format!("internal-{i}");
                let settings = ServerSettings {
                    name: name.clone(),
                    listen: *addr,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: connections.clone(),
                };
                (name, settings)
            })
            .collect();
        let config = rumqttd::Config {
            id: 0,
            router: RouterConfig {
                max_connections: ROUTER_CONNECTIONS.min(server.max_connections + 16),
                max_outgoing_packet_count: broker.max_outgoing_packets,
                max_segment_size: 10 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(listeners),
            ..Default::default()
        };

        let mut rumqttd = rumqttd::Broker::new(config);
        let (link_tx, link_rx) = rumqttd
            .link(RESERVED_CLIENT_IDS[0])
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let (fanout_tx, fanout_rx) = rumqttd
            .link(RESERVED_CLIENT_IDS[1])
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = rumqttd.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        let (out_tx, out_rx) = mpsc::channel(GATEWAY_QUEUE);
        std::thread::Builder::new()
            .name("broker-link-tx".into())
            .spawn(move || run_publisher(link_tx, out_rx))
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let (device_tx, device_rx) = mpsc::channel(FANOUT_QUEUE);
        std::thread::Builder::new()
            .name("broker-fanout".into())
            .spawn(move || run_publisher(fanout_tx, device_rx))
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        let failed = CancellationToken::new();
        tokio::spawn(run_receiver(link_rx, failed.clone()));
        tokio::spawn(run_receiver(fanout_rx, failed.clone()));

        for addr in &internal_addrs {
            wait_listening(*addr).await?;
        }
        tracing::info!(internal = ?internal_addrs, "embedded broker listening (loopback, front only)");
        Ok(Broker {
            internal_addrs,
            secret,
            link: BrokerLink {
                tx: out_tx,
                dropped,
            },
            fanout: Fanout { tx: device_tx },
            failed,
        })
    }
}

/// Ports handed out by this process, never handed out twice (several gateways may start at
/// once in one process, e.g. in tests).
static PICKED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A free port below the kernel's ephemeral range (32768+ on Linux), so that neither another
/// `bind(0)` nor an outgoing connection takes it between this check and rumqttd's own bind.
fn free_loopback_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    use rand::Rng;
    const RANGE: std::ops::Range<u16> = 20_000..32_000;
    let mut picked = PICKED.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let candidate = SocketAddr::new(addr.ip(), rng.gen_range(RANGE));
        if picked.contains(&candidate.port()) {
            continue;
        }
        if StdListener::bind(candidate).is_ok() {
            picked.push(candidate.port());
            return Ok(candidate);
        }
    }
    Err(BrokerError::Bind {
        addr,
        source: std::io::Error::other("no free loopback port in 20000-31999"),
    })
}

/// Wait until the internal listener accepts TCP connections. (No MQTT exchange: a session
/// opened and closed while the broker starts can leave rumqttd's per-listener session
/// bookkeeping in a state that later panics.)
async fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(BrokerError::NotListening(addr))
}

/// Owns one link: hands the router every publish queued on `rx`, in order, until the queue
/// closes. What is queued together goes in one batch, so the router is woken once per batch,
/// not per message; and while the router has [`ROUTER_BACKLOG`] of this link's messages still
/// to take, no more are handed over, so the bounded queue fills and its publishers wait: the
/// router's pace is theirs.
fn run_publisher(mut link_tx: LinkTx, mut rx: mpsc::Receiver<Publish>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "broker link thread");
            return;
        }
    };
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(publish) => batch.push(publish),
                Err(_) => break,
            }
        }
        while link_tx.buffer().len() >= ROUTER_BACKLOG {
            std::thread::sleep(Duration::from_micros(100));
        }
        let Some(last) = batch.pop() else { continue };
        link_tx
            .buffer()
            .extend(batch.drain(..).map(|p| Packet::Publish(p, None)));
        // The last one goes with the wake-up for the whole batch.
        if let Err(e) = runtime.block_on(link_tx.send(Packet::Publish(last, None))) {
            tracing::error!(error = %e, "broker link closed");
            return;
        }
    }
}

async fn run_receiver(mut link_rx: LinkRx, failed: CancellationToken) {
    // The gateway's links subscribe to nothing: they end only when the router is gone.
    loop {
        match link_rx.next().await {
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    tracing::error!("embedded broker's router stopped; the gateway cannot route messages");
    failed.cancel();
}
