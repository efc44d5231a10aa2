//! mTLS connections accepted per second: C concurrent tasks, each an enrolled device with its
//! operational certificate, repeatedly doing TCP connect, TLS handshake (full: no session
//! resumption), CONNECT/CONNACK and DISCONNECT, for a fixed window. Baseline in the same run:
//! the same loop over plaintext TCP against a bare rumqttd.
//!
//! The MQTT side is hand-written bytes (a CONNECT is a few dozen bytes), and each task reuses
//! one `Arc<ClientConfig>`, so the client does as little as a client can.
//!
//! Reading the figures: rumqttd 0.20's accept loop sleeps `next_connection_delay_ms` after
//! every accept, and a tokio sleep of 0 ms still waits for the next timer tick (about 1 ms),
//! so one rumqttd listener accepts at most about 1,000 connections/s. Every client connection
//! through the gateway opens one connection to the embedded broker's internal listener, so the
//! gateway meets the same ceiling; a ratio near 1 means the front keeps up with it.
//!
//! Sizes: `ONBOARD_BENCH_CONNECT_TASKS` (32), `ONBOARD_BENCH_WARMUP_SECS` (0.5),
//! `ONBOARD_BENCH_WINDOW_SECS` (5).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_secs, env_usize, Bench, HOST};
use onboard::simulate::{OperationalCredential, SimCredential, Simulator};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

/// Bound on one connection attempt.
const ATTEMPT: Duration = Duration::from_secs(5);
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

fn main() {
    common::runtime().block_on(bench());
}

/// An MQTT 3.1.1 CONNECT: clean session, keepalive 60 s, no credentials.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    assert!(body.len() < 128, "client id too long for a one-byte length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// CONNECT, expect CONNACK accepted, DISCONNECT, and wait for the server to close.
async fn mqtt_session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    connect: &[u8],
) -> Result<(), String> {
    stream.write_all(connect).await.map_err(|e| e.to_string())?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .await
        .map_err(|e| format!("CONNACK: {e}"))?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(format!("CONNACK {connack:02x?}"));
    }
    stream
        .write_all(&DISCONNECT)
        .await
        .map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    // The server closes after DISCONNECT: EOF (or a reset) ends the session.
    let mut rest = [0u8; 64];
    loop {
        match stream.read(&mut rest).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// What one task connects to.
#[derive(Clone)]
enum Target {
    Tls {
        addr: SocketAddr,
        connector: TlsConnector,
    },
    Plain {
        addr: SocketAddr,
    },
}

async fn attempt(target: &Target, connect: &[u8]) -> Result<(), String> {
    match target {
        Target::Tls { addr, connector } => {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let name = ServerName::IpAddress(addr.ip().into());
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            mqtt_session(&mut tls, connect).await
        }
        Target::Plain { addr } => {
            let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            mqtt_session(&mut tcp, connect).await
        }
    }
}

/// Connects per second over `window` after `warmup`, with one task per `(target, client id)`.
async fn measure(tasks: Vec<(Target, String)>, warmup: Duration, window: Duration) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for (target, client_id) in tasks {
        let (done, failed, stop, first_error) = (
            done.clone(),
            failed.clone(),
            stop.clone(),
            first_error.clone(),
        );
        set.spawn(async move {
            let connect = connect_packet(&client_id);
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(ATTEMPT, attempt(&target, &connect)).await {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    outcome => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let why = match outcome {
                            Ok(Err(e)) => e,
                            _ => "timed out".into(),
                        };
                        first_error.lock().await.get_or_insert(why);
                    }
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    let (done0, failed0) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let (done1, failed1) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    if let Some(e) = first_error.lock().await.take() {
        println!("  first failure: {e}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ((done1 - done0) as f64 / elapsed, failed1 - failed0)
}

async fn bench() {
    let concurrency = env_usize("ONBOARD_BENCH_CONNECT_TASKS", 32).max(1);
    let warmup = env_secs("ONBOARD_BENCH_WARMUP_SECS", 0.5);
    let window = env_secs("ONBOARD_BENCH_WINDOW_SECS", 5.0);
    println!(
        "connects: {concurrency} tasks, {:.1} s window after {:.1} s warm-up, loopback",
        window.as_secs_f64(),
        warmup.as_secs_f64()
    );
    let bench = Bench::start().await;
    let bare: SocketAddr = common::start_bare_broker().await;
    let mtls: SocketAddr = (
        HOST.parse::<std::net::IpAddr>().expect("ip"),
        bench.gw.mtls_addr.port(),
    )
        .into();

    // One enrolled, activated device per task, each with its own operational certificate.
    let sim = Simulator::new(bench.sim_options("conn-", concurrency, 1, SimCredential::Csr))
        .expect("simulator");
    let mut front_tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let device = sim
            .enroll(&sim.device_id(i), deadline)
            .await
            .expect("device enrolls");
        sim.activate(&device, deadline)
            .await
            .expect("device activates");
        let OperationalCredential::Certificate {
            certificate_pem,
            private_key_pem,
        } = &device.credential
        else {
            unreachable!("CSR enrollment returns a certificate")
        };
        let config = sim
            .tls_config(Some((certificate_pem, private_key_pem)))
            .expect("client TLS configuration");
        let target = Target::Tls {
            addr: mtls,
            connector: TlsConnector::from(config),
        };
        front_tasks.push((target, device.device_id.clone()));
    }
    let bare_tasks = (0..concurrency)
        .map(|k| (Target::Plain { addr: bare }, format!("bare-conn-{k}")))
        .collect();

    let (bare_rate, bare_failed) = measure(bare_tasks, warmup, window).await;
    println!(
        "bare rumqttd (plaintext TCP):      {bare_rate:>10.0} connects/s ({bare_failed} failed)"
    );
    let (front_rate, front_failed) = measure(front_tasks, warmup, window).await;
    println!(
        "gateway (mTLS, operational cert):  {front_rate:>10.0} connects/s ({front_failed} failed)"
    );
    println!("front/bare ratio: {:.3}", front_rate / bare_rate.max(1.0));
    bench.stop().await;
}
