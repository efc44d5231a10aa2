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
//!
//! The gateway spawns rumqttd's router and its internal listeners itself (rather than through
//! `rumqttd::Broker`, which keeps the router's sender to itself), so that it can open links at
//! any time: the router keeps, per connection, a meter entry for every topic the connection
//! ever published, so the two links that carry every device's topics are closed and opened
//! again every `LINK_PUBLISHES` publishes, and what the router holds for them stays bounded
//! whatever the size of the fleet. A third link, which does nothing, tells when the router is
//! gone.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use rand::RngCore;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet, Publish};
use rumqttd::{ConnectionSettings, LinkType, Notification, RouterConfig, Server, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, ServerConfig};

/// Username the front presents to the internal listener.
pub const INTERNAL_USER: &str = "onboard-front";

/// Client ids of the gateway's own links into the router; no client may use them.
pub const RESERVED_CLIENT_IDS: [&str; 3] = ["onboard-gateway", "onboard-fanout", "onboard-watch"];

/// Connections the router holds: admins and back-ends only (devices never reach it). Its
/// tables are allocated up front for this many.
const ROUTER_CONNECTIONS: usize = 1024;

/// Publishes handed to the router in one go.
const PUBLISH_BATCH: usize = 256;
/// A link's messages the router may have still to take before more are handed over.
const ROUTER_BACKLOG: usize = 4096;
/// Publishes one link carries before it is closed and opened again (what bounds the router's
/// per-connection meter of the topics the link published).
const LINK_PUBLISHES: usize = 16_384;
/// How long the router may take to let go of a link being reopened.
const LINK_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Cancelled when the broker's router is gone (it panicked) or a link to it is lost:
    /// nothing can be routed any more and the process should be restarted.
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
        let listeners: Vec<ServerSettings> = internal_addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| ServerSettings {
                name: format!("internal-{i}"),
                listen: *addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections.clone(),
            })
            .collect();
        let router = rumqttd::Router::new(
            0,
            RouterConfig {
                max_connections: ROUTER_CONNECTIONS.min(server.max_connections + 16),
                max_outgoing_packet_count: broker.max_outgoing_packets,
                max_segment_size: 10 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        for settings in listeners {
            let server = Server::new(settings, router_tx.clone(), V4);
            spawn_listener(server).map_err(|e| BrokerError::Link(e.to_string()))?;
        }
        let links = Links(Arc::new(move |client_id: &str| {
            LinkBuilder::new(client_id, router_tx.clone())
                .build()
                .map(|(tx, rx, _connack)| (tx, rx))
                .map_err(|e| e.to_string())
        }));
        let [gateway_id, fanout_id, watch_id] = RESERVED_CLIENT_IDS;
        let gateway_link = links.open(gateway_id)?;
        let fanout_link = links.open(fanout_id)?;
        let (_, watch_rx) = links.open(watch_id)?;

        let failed = CancellationToken::new();
        let (out_tx, out_rx) = mpsc::channel(GATEWAY_QUEUE);
        let publisher = Publisher {
            links: links.clone(),
            client_id: gateway_id,
            failed: failed.clone(),
        };
        std::thread::Builder::new()
            .name("broker-link-tx".into())
            .spawn(move || publisher.run(gateway_link, out_rx))
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let (device_tx, device_rx) = mpsc::channel(FANOUT_QUEUE);
        let publisher = Publisher {
            links,
            client_id: fanout_id,
            failed: failed.clone(),
        };
        std::thread::Builder::new()
            .name("broker-fanout".into())
            .spawn(move || publisher.run(fanout_link, device_rx))
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        tokio::spawn(watch(watch_rx, failed.clone()));

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

/// Runs one internal listener (admins' relayed connections) on a thread of its own.
fn spawn_listener(mut server: Server<V4>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("broker-internal".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "broker internal listener");
                    return;
                }
            };
            runtime.block_on(async {
                if let Err(e) = server.start(LinkType::Remote).await {
                    tracing::error!(error = %e, "broker internal listener stopped");
                }
            });
        })
        .map(drop)
}

type OpenLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

/// Opens in-process links to the router (whose sender's type rumqttd does not name).
#[derive(Clone)]
struct Links(Arc<OpenLink>);

impl Links {
    fn open(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        (self.0)(client_id).map_err(|e| BrokerError::Link(format!("{client_id}: {e}")))
    }
}

/// Owns one publishing link: hands the router every publish queued on its channel, in order,
/// until the channel closes. What is queued together goes in one batch, so the router is woken
/// once per batch, not per message; and while the router has [`ROUTER_BACKLOG`] of this link's
/// messages still to take, no more are handed over, so the bounded channel fills and its
/// publishers wait: the router's pace is theirs.
///
/// rumqttd keeps, per connection, a meter entry for every topic that connection ever
/// published and never forgets one: on a link that carries every device's topics, that would
/// grow with the fleet. So after [`LINK_PUBLISHES`] publishes the link is closed (once the
/// router has taken all of it, so that order is kept) and opened again, empty.
struct Publisher {
    links: Links,
    client_id: &'static str,
    /// Cancelled when the link is lost: nothing more reaches the router.
    failed: CancellationToken,
}

impl Publisher {
    fn run(self, link: (LinkTx, LinkRx), mut rx: mpsc::Receiver<Publish>) {
        let runtime = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "broker link thread");
                return;
            }
        };
        let (mut link_tx, mut link_rx) = link;
        let mut published = 0usize;
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
            published += batch.len();
            let Some(last) = batch.pop() else { continue };
            link_tx
                .buffer()
                .extend(batch.drain(..).map(|p| Packet::Publish(p, None)));
            // The last one goes with the wake-up for the whole batch.
            if let Err(e) = runtime.block_on(link_tx.send(Packet::Publish(last, None))) {
                tracing::error!(error = %e, link = self.client_id, "broker link closed");
                self.failed.cancel();
                return;
            }
            if published >= LINK_PUBLISHES {
                match self.reopen(&runtime, link_tx, link_rx) {
                    Ok(link) => (link_tx, link_rx) = link,
                    Err(e) => {
                        tracing::error!(error = %e, "broker link could not be opened again");
                        self.failed.cancel();
                        return;
                    }
                }
                published = 0;
            }
        }
    }

    /// Close the link after what it was given, wait until the router has let go of it, and
    /// open it again under the same client id.
    fn reopen(
        &self,
        runtime: &tokio::runtime::Runtime,
        mut tx: LinkTx,
        mut rx: LinkRx,
    ) -> Result<(LinkTx, LinkRx), BrokerError> {
        let disconnect = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        runtime
            .block_on(tx.send(Packet::Disconnect(disconnect, None)))
            .map_err(|e| BrokerError::Link(format!("{}: {e}", self.client_id)))?;
        // The router drops the link's end once it has handled everything before the
        // DISCONNECT; only then may the same client id connect again without taking over
        // (and so losing) what it had not taken yet.
        let deadline = Instant::now() + LINK_CLOSE_TIMEOUT;
        while rx.recv_deadline(deadline).is_ok() {}
        if Instant::now() >= deadline {
            return Err(BrokerError::Link(format!(
                "{}: the router did not close the link within {LINK_CLOSE_TIMEOUT:?}",
                self.client_id
            )));
        }
        self.links.open(self.client_id)
    }
}

/// Watches a link that does nothing: it ends only when the router is gone (it panicked).
async fn watch(mut link_rx: LinkRx, failed: CancellationToken) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet as ClientPacket, QoS};

    /// An observer subscribed with a wildcard gets every device publish, in order, while the
    /// fan-out link is closed and opened again underneath (twice here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_loses_nothing_and_keeps_order_when_its_link_is_reopened() {
        let broker = Broker::start(
            &BrokerConfig::default(),
            &ServerConfig::default(),
            IntCounter::new("dropped", "dropped").expect("counter"),
        )
        .await
        .expect("broker starts");
        let addr = broker.internal_addrs[0];
        let mut options = MqttOptions::new("observer", addr.ip().to_string(), addr.port());
        options.set_credentials(INTERNAL_USER, broker.secret.to_string());
        let (client, mut events) = AsyncClient::new(options, 1024);
        client
            .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        let subscribed = async {
            loop {
                if let Event::Incoming(ClientPacket::SubAck(_)) =
                    events.poll().await.expect("observer connection")
                {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("SUBACK");

        let total = 2 * LINK_PUBLISHES + 100;
        let fanout = broker.fanout.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let topic = format!("devices/d{i}/telemetry");
                fanout
                    .publish(&topic, Bytes::from(i.to_string()), false)
                    .await;
            }
        });
        let mut next = 0usize;
        let received = async {
            while next < total {
                if let Event::Incoming(ClientPacket::Publish(p)) =
                    events.poll().await.expect("observer connection")
                {
                    assert_eq!(p.topic, format!("devices/d{next}/telemetry"));
                    assert_eq!(p.payload, Bytes::from(next.to_string()));
                    next += 1;
                }
            }
        };
        let finished = tokio::time::timeout(Duration::from_secs(120), received).await;
        assert!(finished.is_ok(), "{next} of {total} publishes arrived");
        assert!(!broker.failed.is_cancelled());
    }
}
