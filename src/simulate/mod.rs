//! Fleet simulator: many devices going through zero-touch enrollment at once, end to end, over
//! the real listeners.
//!
//! Each simulated device, with at most [`SimulateOptions::concurrency`] in flight:
//! 1. gets a factory certificate, made on the fly with the factory CA of the development PKI;
//! 2. connects over mTLS in the bootstrap role (client id = device id), subscribes to
//!    `enroll/D/response` and waits for the SUBACK;
//! 3. publishes its enrollment request (with its own key and CSR in [`SimCredential::Csr`] mode)
//!    and waits for the answer;
//! 4. disconnects, reconnects with the issued credential (certificate and key on the mTLS
//!    listener, or username/password on the password listener);
//! 5. subscribes to `devices/D/config` and checks that the retained configuration (version >= 1)
//!    arrives, publishes its telemetry (QoS 1, each message acknowledged), disconnects.
//!
//! The latency of a device runs from the publish of its enrollment request to the
//! acknowledgement of its first telemetry message (the one that activates it).
//! Failures are counted by reason (see [`DeviceFailure::reason`]).
//!
//! [`run`] is the whole fleet; [`Simulator`] exposes the single steps for benchmarks and tools.
//!
//! # Layout
//!
//! - `device`: one device's flows (kit, enrollment, activation or reconnect, an idle held
//!   connection), over `wire`, a lean MQTT 3.1.1 client driven in the caller's task;
//! - `tls`: the devices' TLS client configurations (a server chain verified once is
//!   recognised for a while; the handshake signature is verified every time);
//! - `batch`: many devices through one flow, a bounded number at once, with latencies and
//!   failures by reason ([`drive`]); [`run`] and the fleet benchmark use it;
//! - here: options, failures, the report, `onboard simulate`'s arguments, and a rumqttc
//!   [`Connection`] for baselines that must use a stock client.

mod batch;
mod device;
mod tls;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, Publish, QoS, StateError, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::time::Instant;

pub use batch::{drive, Batch, BatchOptions, Completed};
pub use device::{DeviceKit, EnrolledDevice, HeldConnection, OperationalCredential};
pub use tls::client_tls_config;

use crate::config::{Config, PkiConfig};
use crate::pki::{Issuer, Pki, PkiError};
use tls::DeviceTls;
use wire::Target;

/// Model reported in the simulated enrollment requests.
pub const SIM_MODEL: &str = "SIM-1";
/// Firmware version reported in the simulated enrollment requests.
pub const SIM_FIRMWARE: &str = "1.0.0";
/// File stem of the factory CA the simulator issues factory certificates with.
pub const FACTORY_CA_STEM: &str = "factory-ca";

/// Largest packet the simulated clients send or accept (responses carry certificates and keys).
const MAX_PACKET: usize = 1 << 20;
/// Validity of the factory certificates made for simulated devices.
const FACTORY_CERT_DAYS: i64 = 30;

/// Which operational credential the simulated devices ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SimCredential {
    /// A certificate for a key pair the device generates; the request carries its CSR.
    Csr,
    /// A certificate for a key pair the gateway generates and returns once.
    Generated,
    /// A username/password credential, used on the password listener.
    Password,
}

impl SimCredential {
    pub fn as_str(self) -> &'static str {
        match self {
            SimCredential::Csr => "csr",
            SimCredential::Generated => "generated",
            SimCredential::Password => "password",
        }
    }

    /// Value of the request's `credential` field.
    fn requested(self) -> &'static str {
        match self {
            SimCredential::Csr | SimCredential::Generated => "certificate",
            SimCredential::Password => "password",
        }
    }
}

impl fmt::Display for SimCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to simulate, and where.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Host of the gateway (name or address; the server certificate must name it).
    pub host: String,
    /// Port of the mTLS listener (bootstrap, and operational certificates).
    pub port: u16,
    /// Port of the password listener.
    pub password_port: u16,
    /// Number of devices.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Device ids are `<prefix><index>` with a six-digit, zero-padded index.
    pub prefix: String,
    /// Index of the first device (to run several fleets without reusing ids).
    pub start_index: usize,
    pub credential: SimCredential,
    /// `device_type` of the requests (a template of the gateway).
    pub device_type: String,
    /// PKI directory: the factory CA (certificate and key) to make factory certificates, and
    /// the CA that signed the server certificate.
    pub pki_dir: PathBuf,
    /// Telemetry messages each device publishes once activated (at least one is sent).
    pub telemetry_messages: usize,
    /// Time one device has for its whole flow.
    pub timeout: Duration,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        SimulateOptions {
            host: "localhost".into(),
            port: 8883,
            password_port: 8884,
            devices: 1,
            concurrency: 1,
            prefix: "sim-".into(),
            start_index: 0,
            credential: SimCredential::Csr,
            device_type: "thermostat".into(),
            pki_dir: PathBuf::from("certs"),
            telemetry_messages: 1,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Why a simulation could not run at all (as opposed to devices failing, which the report
/// counts).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulation options: {0}")]
    InvalidOptions(String),
    #[error("PKI in {dir}: {source}")]
    Pki {
        dir: PathBuf,
        #[source]
        source: PkiError,
    },
    #[error("TLS client configuration: {0}")]
    Tls(String),
    #[error("a simulated device task failed: {0}")]
    Task(String),
}

/// Step of a device's flow, named in failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Connecting with the factory certificate.
    BootstrapConnect,
    /// Subscribing to `enroll/D/response`.
    ResponseSubscribe,
    /// Waiting for the enrollment response.
    Response,
    /// Connecting with the issued credential.
    OperationalConnect,
    /// Subscribing to `devices/D/config` and receiving the retained configuration.
    Config,
    /// Publishing telemetry.
    Telemetry,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::BootstrapConnect => "bootstrap_connect",
            Phase::ResponseSubscribe => "response_subscribe",
            Phase::Response => "response",
            Phase::OperationalConnect => "operational_connect",
            Phase::Config => "config",
            Phase::Telemetry => "telemetry",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one simulated device did not complete its flow.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceFailure {
    /// CONNACK with a refusal code.
    #[error("{phase}: connection refused: {code}")]
    ConnectRefused { phase: Phase, code: &'static str },
    /// The TLS layer failed (handshake, or an alert such as a refused certificate).
    #[error("{phase}: TLS: {detail}")]
    Tls { phase: Phase, detail: String },
    /// The TCP connection could not be made.
    #[error("{phase}: TCP connect: {detail}")]
    TcpConnect { phase: Phase, detail: String },
    /// The server closed the connection.
    #[error("{phase}: connection closed: {detail}")]
    Closed { phase: Phase, detail: String },
    /// Another MQTT or socket error.
    #[error("{phase}: {detail}")]
    Protocol { phase: Phase, detail: String },
    /// Nothing happened in time.
    #[error("{phase}: timed out")]
    Timeout { phase: Phase },
    /// The gateway answered the enrollment with a rejection.
    #[error("enrollment rejected: {code}: {message}")]
    Rejected { code: String, message: String },
    /// SUBACK with a failure code.
    #[error("{phase}: subscription to {filter} refused")]
    SubscribeRefused { phase: Phase, filter: String },
    /// The enrollment response is not what the contract says.
    #[error("bad enrollment response: {0}")]
    BadResponse(String),
    /// The retained configuration is missing or wrong.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// The device could not make its own key, CSR, certificate or TLS configuration.
    #[error("local: {0}")]
    Local(String),
}

impl DeviceFailure {
    /// Stable label of the failure for counting: `connect_refused:not_authorized`,
    /// `tls_error`, `tcp_connect`, `connection_closed`, `protocol_error`,
    /// `timeout:<phase>`, `rejected:<code>`, `subscribe_refused`, `bad_response`,
    /// `bad_config`, `local_error`.
    pub fn reason(&self) -> String {
        match self {
            DeviceFailure::ConnectRefused { code, .. } => format!("connect_refused:{code}"),
            DeviceFailure::Tls { .. } => "tls_error".into(),
            DeviceFailure::TcpConnect { .. } => "tcp_connect".into(),
            DeviceFailure::Closed { .. } => "connection_closed".into(),
            DeviceFailure::Protocol { .. } => "protocol_error".into(),
            DeviceFailure::Timeout { phase } => format!("timeout:{phase}"),
            DeviceFailure::Rejected { code, .. } => format!("rejected:{code}"),
            DeviceFailure::SubscribeRefused { .. } => "subscribe_refused".into(),
            DeviceFailure::BadResponse(_) => "bad_response".into(),
            DeviceFailure::BadConfig(_) => "bad_config".into(),
            DeviceFailure::Local(_) => "local_error".into(),
        }
    }
}

/// Label of a CONNACK refusal code (the same vocabulary as [`wire::connack_label`]).
fn connack_label(code: ConnectReturnCode) -> &'static str {
    wire::connack_label(match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    })
}

/// Classify an I/O error: a TLS error wrapped by the TLS stream, a refused TCP connect, the
/// peer closing, or something else.
fn io_failure(phase: Phase, e: &std::io::Error) -> DeviceFailure {
    use std::io::ErrorKind;
    let detail = e.to_string();
    if e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
    {
        return DeviceFailure::Tls { phase, detail };
    }
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::AddrNotAvailable => {
            DeviceFailure::TcpConnect { phase, detail }
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => DeviceFailure::Closed { phase, detail },
        _ => DeviceFailure::Protocol { phase, detail },
    }
}

fn connection_failure(phase: Phase, e: ConnectionError) -> DeviceFailure {
    match e {
        ConnectionError::ConnectionRefused(code) => DeviceFailure::ConnectRefused {
            phase,
            code: connack_label(code),
        },
        ConnectionError::Tls(rumqttc::TlsError::Io(io)) => io_failure(phase, &io),
        ConnectionError::Tls(tls) => DeviceFailure::Tls {
            phase,
            detail: tls.to_string(),
        },
        ConnectionError::Io(io) | ConnectionError::MqttState(StateError::Io(io)) => {
            io_failure(phase, &io)
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => DeviceFailure::Closed {
            phase,
            detail: "connection closed by the server".into(),
        },
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => {
            DeviceFailure::Timeout { phase }
        }
        other => DeviceFailure::Protocol {
            phase,
            detail: other.to_string(),
        },
    }
}

/// MQTT options for `client_id` at `host:port` over TLS with `tls`.
pub fn mqtt_options(
    client_id: &str,
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o
}

/// One MQTT connection driven in the caller's task: every wait polls the event loop until the
/// expected packet arrives or the deadline passes.
pub struct Connection {
    client: AsyncClient,
    eventloop: EventLoop,
    /// Publishes received while waiting for something else.
    inbox: Vec<Publish>,
}

impl Connection {
    /// Connect and wait for a successful CONNACK.
    pub async fn open(
        options: MqttOptions,
        deadline: Instant,
        phase: Phase,
    ) -> Result<Connection, DeviceFailure> {
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let secs = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        eventloop.network_options.set_connection_timeout(secs);
        // Small request/response exchanges: no Nagle delay on the device side.
        eventloop.network_options.set_tcp_nodelay(true);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => return Err(DeviceFailure::Timeout { phase }),
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == ConnectReturnCode::Success {
                        return Ok(Connection {
                            client,
                            eventloop,
                            inbox: Vec::new(),
                        });
                    }
                    return Err(DeviceFailure::ConnectRefused {
                        phase,
                        code: connack_label(ack.code),
                    });
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(connection_failure(phase, e)),
            }
        }
    }

    /// The next incoming packet.
    async fn next_incoming(
        &mut self,
        deadline: Instant,
        phase: Phase,
    ) -> Result<Packet, DeviceFailure> {
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Err(_) => return Err(DeviceFailure::Timeout { phase }),
                Ok(Ok(Event::Incoming(packet))) => return Ok(packet),
                Ok(Ok(Event::Outgoing(_))) => continue,
                Ok(Err(e)) => return Err(connection_failure(phase, e)),
            }
        }
    }

    /// Subscribe to one filter and wait for its SUBACK; a failure code is an error.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: QoS,
        deadline: Instant,
        phase: Phase,
    ) -> Result<(), DeviceFailure> {
        self.client
            .subscribe(filter, qos)
            .await
            .map_err(|e| DeviceFailure::Local(e.to_string()))?;
        loop {
            match self.next_incoming(deadline, phase).await? {
                Packet::SubAck(ack) => {
                    return match ack.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => Ok(()),
                        _ => Err(DeviceFailure::SubscribeRefused {
                            phase,
                            filter: filter.to_owned(),
                        }),
                    };
                }
                Packet::Publish(p) => self.inbox.push(p),
                _ => {}
            }
        }
    }

    /// Publish at QoS 1 and wait for the PUBACK (one publish in flight at a time).
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        deadline: Instant,
        phase: Phase,
    ) -> Result<(), DeviceFailure> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| DeviceFailure::Local(e.to_string()))?;
        loop {
            match self.next_incoming(deadline, phase).await? {
                Packet::PubAck(_) => return Ok(()),
                Packet::Publish(p) => self.inbox.push(p),
                _ => {}
            }
        }
    }

    /// The next publish on `topic`.
    pub async fn recv_on(
        &mut self,
        topic: &str,
        deadline: Instant,
        phase: Phase,
    ) -> Result<Publish, DeviceFailure> {
        if let Some(i) = self.inbox.iter().position(|p| p.topic == topic) {
            return Ok(self.inbox.remove(i));
        }
        loop {
            if let Packet::Publish(p) = self.next_incoming(deadline, phase).await? {
                if p.topic == topic {
                    return Ok(p);
                }
                self.inbox.push(p);
            }
        }
    }

    /// Send DISCONNECT and close (best effort, bounded by `deadline`).
    pub async fn close(mut self, deadline: Instant) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                return;
            }
        }
    }
}

/// Connect, publish one QoS 1 message, wait for its PUBACK and disconnect: the bare TLS + MQTT
/// round trip that enrollment is compared with.
pub async fn publish_round_trip(
    options: MqttOptions,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), DeviceFailure> {
    let deadline = Instant::now() + timeout;
    let mut conn = Connection::open(options, deadline, Phase::OperationalConnect).await?;
    conn.publish_acked(topic, payload, deadline, Phase::Telemetry)
        .await?;
    conn.close(deadline).await;
    Ok(())
}

/// Shared state of a simulation: the options, the factory CA (loaded once), the TLS settings
/// every device shares, and where the devices connect.
pub struct Simulator {
    opts: SimulateOptions,
    factory: Issuer,
    tls: DeviceTls,
    /// The mTLS listener (bootstrap and operational certificates).
    mtls: Target,
    /// The password listener.
    password: Target,
}

impl Simulator {
    /// Load the factory CA and the server CA from `opts.pki_dir`.
    pub fn new(opts: SimulateOptions) -> Result<Simulator, SimError> {
        let pki_error = |source| SimError::Pki {
            dir: opts.pki_dir.clone(),
            source,
        };
        let factory = Issuer::load(&opts.pki_dir, FACTORY_CA_STEM).map_err(pki_error)?;
        let pki_config = PkiConfig {
            dir: opts.pki_dir.clone(),
            ..PkiConfig::default()
        };
        let pki = Pki::load(&pki_config).map_err(pki_error)?;
        let roots = tls::roots_from_pem(&pki.server_ca_pem())
            .map_err(|e| SimError::Tls(format!("server CA in {}: {e}", opts.pki_dir.display())))?;
        let tls = DeviceTls::remembering(Arc::new(roots)).map_err(SimError::Tls)?;
        let target = |port| {
            Target::new(&opts.host, port).map_err(|e| SimError::InvalidOptions(e.to_string()))
        };
        Ok(Simulator {
            mtls: target(opts.port)?,
            password: target(opts.password_port)?,
            opts,
            factory,
            tls,
        })
    }

    pub fn options(&self) -> &SimulateOptions {
        &self.opts
    }

    /// Id of the device with this index: `<prefix><index:06>`.
    pub fn device_id(&self, index: usize) -> String {
        format!("{}{index:06}", self.opts.prefix)
    }

    /// A rustls client configuration trusting the server CA (its chain verified once, then
    /// recognised for a while), with an optional client certificate
    /// (`(certificate_pem, private_key_pem)`).
    pub fn tls_config(
        &self,
        client: Option<(&str, &str)>,
    ) -> Result<Arc<rustls::ClientConfig>, DeviceFailure> {
        self.tls.config(client).map_err(DeviceFailure::Local)
    }

    /// MQTT options to connect as `device` with its operational credential.
    pub fn operational_options(
        &self,
        device: &EnrolledDevice,
    ) -> Result<MqttOptions, DeviceFailure> {
        let o = &self.opts;
        Ok(match &device.credential {
            OperationalCredential::Certificate {
                certificate_pem,
                private_key_pem,
            } => {
                let tls = self.tls_config(Some((certificate_pem, private_key_pem)))?;
                mqtt_options(&device.device_id, &o.host, o.port, tls)
            }
            OperationalCredential::Password { username, password } => {
                let tls = self.tls_config(None)?;
                let mut options = mqtt_options(&device.device_id, &o.host, o.password_port, tls);
                options.set_credentials(username.clone(), password.clone());
                options
            }
        })
    }
}

/// Outcome of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Devices that completed the whole flow.
    pub enrolled: u64,
    /// Devices that did not, by [`DeviceFailure::reason`].
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Wall time of the whole fleet.
    pub elapsed: Duration,
    /// Latency percentiles of the devices that completed (request to activation).
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl SimReport {
    /// Devices that completed, per second of wall time.
    pub fn enrolled_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.enrolled as f64 / secs
        } else {
            0.0
        }
    }

    /// Devices that failed, whatever the reason.
    pub fn failed(&self) -> u64 {
        self.failed_by_reason.values().sum()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "devices      {} enrolled, {} failed in {:.3} s",
            self.enrolled,
            self.failed(),
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "enrolled/s   {:.1}", self.enrolled_per_sec())?;
        writeln!(
            f,
            "latency      p50 {}  p99 {}  max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        if self.failed_by_reason.is_empty() {
            write!(f, "failures     none")
        } else {
            write!(f, "failures by reason:")?;
            let width = self.failed_by_reason.keys().map(String::len).max();
            for (reason, count) in &self.failed_by_reason {
                write!(
                    f,
                    "\n  {reason:<width$}  {count}",
                    width = width.unwrap_or(0)
                )?;
            }
            Ok(())
        }
    }
}

/// Simulate the fleet: every device through its whole flow, at most `opts.concurrency` at once.
/// `progress` (if any) advances by one per device, and its message shows the failures so far.
pub async fn run(
    opts: SimulateOptions,
    progress: Option<&ProgressBar>,
) -> Result<SimReport, SimError> {
    if opts.concurrency == 0 {
        return Err(SimError::InvalidOptions(
            "concurrency must be at least 1".into(),
        ));
    }
    if opts.timeout.is_zero() {
        return Err(SimError::InvalidOptions(
            "timeout must be greater than 0".into(),
        ));
    }
    let options = BatchOptions {
        concurrency: opts.concurrency,
        stop_after_failures: None,
        progress: progress.cloned(),
    };
    let first = opts.start_index;
    let ids: Vec<usize> = (first..first + opts.devices).collect();
    let simulator = Arc::new(Simulator::new(opts)?);
    let batch = drive(ids, options, move |index| {
        let simulator = simulator.clone();
        async move {
            let latency = simulator.run_device(&simulator.device_id(index)).await?;
            Ok(Completed { value: (), latency })
        }
    })
    .await?;
    Ok(batch.report)
}

/// `onboard simulate`: a fleet of simulated devices against a running gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of devices to simulate.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Devices in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Device id prefix (ids are `<prefix><000000>`).
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Index of the first device.
    #[arg(long, default_value_t = 0)]
    pub start_index: usize,
    /// Credential the devices ask for.
    #[arg(long, value_enum, default_value_t = SimCredential::Csr)]
    pub credential: SimCredential,
    /// Gateway host (must be named by the server certificate).
    #[arg(long, default_value = "localhost")]
    pub host: String,
    /// mTLS port [default: the port of `server.mtls_listen`].
    #[arg(long)]
    pub port: Option<u16>,
    /// Password listener port [default: the port of `server.password_listen`].
    #[arg(long)]
    pub password_port: Option<u16>,
    /// Device type (a configuration template) [default: `enrollment.default_device_type`].
    #[arg(long = "type")]
    pub device_type: Option<String>,
    /// PKI directory holding the factory CA and its key [default: `pki.dir`].
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Telemetry messages each device publishes once activated.
    #[arg(long, default_value_t = 1)]
    pub telemetry: usize,
    /// Seconds one device has for its whole flow.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

impl SimulateArgs {
    /// Options for [`run`]: the arguments, with the gaps filled from the configuration.
    pub fn to_options(&self, config: &Config) -> SimulateOptions {
        SimulateOptions {
            host: self.host.clone(),
            port: self.port.unwrap_or(config.server.mtls_listen.port()),
            password_port: self
                .password_port
                .unwrap_or(config.server.password_listen.port()),
            devices: self.devices,
            concurrency: self.concurrency,
            prefix: self.prefix.clone(),
            start_index: self.start_index,
            credential: self.credential,
            device_type: self
                .device_type
                .clone()
                .unwrap_or_else(|| config.enrollment.default_device_type.clone()),
            pki_dir: self
                .pki_dir
                .clone()
                .unwrap_or_else(|| config.pki.dir.clone()),
            telemetry_messages: self.telemetry,
            timeout: Duration::from_secs(self.timeout_secs.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_rate_percentiles_and_failures() {
        let mut failed_by_reason = BTreeMap::new();
        failed_by_reason.insert("connect_refused:not_authorized".to_owned(), 3);
        let report = SimReport {
            enrolled: 10,
            failed_by_reason,
            elapsed: Duration::from_secs(2),
            p50: Duration::from_millis(12),
            p99: Duration::from_millis(40),
            max: Duration::from_millis(45),
        };
        assert!((report.enrolled_per_sec() - 5.0).abs() < 1e-9);
        let text = report.to_string();
        for needle in [
            "enrolled/s",
            "5.0",
            "p50 12.0 ms",
            "p99 40.0 ms",
            "connect_refused:not_authorized  3",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
    }

    #[test]
    fn failure_reasons_are_stable_labels() {
        let refused = connection_failure(
            Phase::BootstrapConnect,
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
        );
        assert_eq!(refused.reason(), "connect_refused:not_authorized");
        let timeout = DeviceFailure::Timeout {
            phase: Phase::Response,
        };
        assert_eq!(timeout.reason(), "timeout:response");
        let closed = connection_failure(
            Phase::Telemetry,
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        );
        assert_eq!(closed.reason(), "connection_closed");
    }

    #[test]
    fn cli_arguments_fill_gaps_from_the_configuration() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SimulateArgs,
        }
        let cli = Cli::parse_from([
            "x",
            "--devices",
            "5",
            "--credential",
            "password",
            "--type",
            "sensor",
        ]);
        let opts = cli.args.to_options(&Config::default());
        assert_eq!(opts.devices, 5);
        assert_eq!(opts.credential, SimCredential::Password);
        assert_eq!(opts.device_type, "sensor");
        assert_eq!(opts.port, 8883);
        assert_eq!(opts.password_port, 8884);
        assert_eq!(opts.pki_dir, PathBuf::from("certs"));
    }
}
