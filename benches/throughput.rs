//! Message throughput of activated devices through the gateway (TLS via the front) against a
//! bare rumqttd in the same run, QoS 0 and QoS 1, 100-byte payloads.
//!
//! Through the gateway: `onboard serve` as its own process, the binary as it ships (its
//! allocator, its own runtime), on a temporary SQLite file and PKI. P enrolled devices publish on
//! `devices/Dk/telemetry` with their operational certificates; S admin-certificate clients
//! subscribe to `devices/+/telemetry`. Bare: a plain rumqttd 0.20 (v4 listener, plaintext, no
//! authentication) on its own threads in this process, the same pattern over plaintext. The
//! clients run in this process for both. Deliveries (publishes received by the subscribers) are
//! counted over a fixed window after a warm-up.
//!
//! Sizes: `ONBOARD_BENCH_PUBLISHERS` (10), `ONBOARD_BENCH_SUBSCRIBERS` (10),
//! `ONBOARD_BENCH_WARMUP_SECS` (1), `ONBOARD_BENCH_WINDOW_SECS` (5).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::{self, GatewayProcess};
use common::{env_secs, env_usize, HOST};
use onboard::simulate::{self, EnrolledDevice, Simulator};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

const PAYLOAD: usize = 100;
const FILTER: &str = "devices/+/telemetry";

fn main() {
    common::runtime().block_on(bench());
}

struct Setup {
    publishers: Vec<(MqttOptions, String)>,
    subscribers: Vec<MqttOptions>,
}

async fn bench() {
    let publishers = env_usize("ONBOARD_BENCH_PUBLISHERS", 10).max(1);
    let subscribers = env_usize("ONBOARD_BENCH_SUBSCRIBERS", 10).max(1);
    let warmup = env_secs("ONBOARD_BENCH_WARMUP_SECS", 1.0);
    let window = env_secs("ONBOARD_BENCH_WINDOW_SECS", 5.0);
    println!(
        "throughput: {publishers} publishers -> {subscribers} subscribers on {FILTER}, {PAYLOAD}-byte payloads, {:.1} s window after {:.1} s warm-up",
        window.as_secs_f64(),
        warmup.as_secs_f64()
    );

    let mut lines = Vec::new();
    for (name, qos) in [("QoS 0", QoS::AtMostOnce), ("QoS 1", QoS::AtLeastOnce)] {
        // Fresh brokers for every case: what one case leaves behind cannot slow the next.
        let bare = common::start_bare_broker().await;
        let bare_rate = measure(
            bare_setup(bare, publishers, subscribers),
            qos,
            warmup,
            window,
        )
        .await;
        println!("{name} bare rumqttd (plaintext):  {bare_rate:>12.0} deliveries/s");
        let (gw, setup) = front_setup(publishers, subscribers).await;
        let front_rate = measure(setup, qos, warmup, window).await;
        println!("{name} gateway (TLS via front):   {front_rate:>12.0} deliveries/s");
        gw.stop().await;
        lines.push(format!(
            "{name} front/bare ratio: {:.3}",
            front_rate / bare_rate.max(1.0)
        ));
    }
    for line in lines {
        println!("{line}");
    }
}

/// A running gateway and its files (removed when this is dropped).
struct Gateway {
    files: gateway::Setup,
    process: GatewayProcess,
}

impl Gateway {
    /// SIGTERM and wait; then its files go.
    async fn stop(self) {
        if let Err(e) = self.process.stop().await {
            println!("  gateway stop failed: {e:#}");
        }
        drop(self.files);
    }
}

/// Through the gateway: a fresh `onboard serve`; enrolled, activated devices publish; admin
/// clients subscribe.
async fn front_setup(publishers: usize, subscribers: usize) -> (Gateway, Setup) {
    let mut gateway = gateway::Setup::new().expect("gateway files");
    let process = gateway.start(None).await.expect("gateway starts");
    let sim =
        Simulator::new(gateway.sim_options("pub-", Duration::from_secs(30))).expect("simulator");
    let mut devices: Vec<EnrolledDevice> = Vec::with_capacity(publishers);
    for i in 0..publishers {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let device = sim
            .enroll(&sim.device_id(i), deadline)
            .await
            .expect("publisher enrolls");
        sim.activate(&device, deadline)
            .await
            .expect("publisher activates");
        devices.push(device);
    }
    let admin = gateway.admin("bench-admin").expect("admin certificate");
    let admin_tls = sim
        .tls_config(Some((&admin.certificate_pem, &admin.private_key_pem)))
        .expect("admin TLS configuration");
    let port = gateway.mtls.port();
    let setup = Setup {
        publishers: devices
            .iter()
            .map(|d| {
                let o = sim.operational_options(d).expect("operational options");
                (o, format!("devices/{}/telemetry", d.device_id))
            })
            .collect(),
        subscribers: (0..subscribers)
            .map(|k| {
                simulate::mqtt_options(&format!("bench-sub-{k}"), HOST, port, admin_tls.clone())
            })
            .collect(),
    };
    let gw = Gateway {
        files: gateway,
        process,
    };
    (gw, setup)
}

fn plain(id: &str, bare: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, HOST, bare.port());
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Bare rumqttd: the same pattern over plaintext.
fn bare_setup(bare: SocketAddr, publishers: usize, subscribers: usize) -> Setup {
    Setup {
        publishers: (0..publishers)
            .map(|k| {
                let id = format!("bare-pub-{k}");
                let topic = format!("devices/{id}/telemetry");
                (plain(&id, bare), topic)
            })
            .collect(),
        subscribers: (0..subscribers)
            .map(|k| plain(&format!("bare-sub-{k}"), bare))
            .collect(),
    }
}

/// Connect and wait for the CONNACK.
async fn connect(options: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(until, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, eventloop),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => panic!("connect: timed out"),
        }
    }
}

/// Deliveries per second over `window`, after `warmup` (also prints the publish rate the
/// publishers' clients accepted, and which share of the fan-out was delivered).
async fn measure(setup: Setup, qos: QoS, warmup: Duration, window: Duration) -> f64 {
    let delivered = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let fan_out = setup.subscribers.len() as f64;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let mut clients = Vec::new();

    for options in setup.subscribers {
        let (client, mut eventloop) = connect(options, 64).await;
        client.subscribe(FILTER, qos).await.expect("subscribe");
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(until, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscribe: {e}"),
                Err(_) => panic!("subscribe: timed out"),
            }
        }
        let delivered = delivered.clone();
        tasks.spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(_)) = event {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        clients.push(client);
    }

    for (options, topic) in setup.publishers {
        let (client, mut eventloop) = connect(options, 1024).await;
        tasks.spawn(async move { while eventloop.poll().await.is_ok() {} });
        let stop = stop.clone();
        let published = published.clone();
        let publisher = client.clone();
        tasks.spawn(async move {
            let payload = vec![b'x'; PAYLOAD];
            while !stop.load(Ordering::Relaxed) {
                if publisher
                    .publish(topic.as_str(), qos, false, payload.clone())
                    .await
                    .is_err()
                {
                    return;
                }
                published.fetch_add(1, Ordering::Relaxed);
            }
        });
        clients.push(client);
    }

    tokio::time::sleep(warmup).await;
    let before = delivered.load(Ordering::Relaxed);
    let published_before = published.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = delivered.load(Ordering::Relaxed);
    let published_after = published.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let offered = (published_after - published_before) as f64 / elapsed;
    let rate = (after - before) as f64 / elapsed;
    println!(
        "  published {offered:>10.0}/s; delivered {:.1}% of publishes x {fan_out} subscribers",
        100.0 * rate / (offered * fan_out).max(1.0)
    );

    // Stop publishing, let the subscribers drain what is queued, then disconnect cleanly:
    // connections dropped under load can upset rumqttd's router.
    stop.store(true, Ordering::Relaxed);
    let drain_until = Instant::now() + Duration::from_secs(5);
    let mut last = delivered.load(Ordering::Relaxed);
    while Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    for client in &clients {
        let _ = client.try_disconnect();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(clients);
    rate
}
