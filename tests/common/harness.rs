//! A real gateway on loopback (ephemeral ports, a temporary PKI directory and SQLite file) and
//! real MQTT clients (rumqttc over rustls) to drive it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use onboard::config::Config;
use onboard::gateway::Gateway;
use onboard::pki::{CertAndKey, CertOptions, Issuer};
use onboard::store::AuditEvent;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::mpsc;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// Take the SQLite store at `path` down for writers: hold its write lock from another
/// connection until the returned sender is dropped.
pub fn lock_store(path: std::path::PathBuf) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        locked_tx.send(()).expect("signal");
        let _ = rx.recv();
        conn.execute_batch("ROLLBACK").expect("unlock");
    });
    locked_rx.recv_timeout(WAIT).expect("store locked");
    tx
}

/// The `onboard` binary, as a command without the tests' own settings (`ONBOARD_TEST_*`):
/// they are not configuration, and the gateway refuses unknown `ONBOARD_` variables.
pub fn onboard_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_onboard"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ONBOARD_TEST_") {
            command.env_remove(name);
        }
    }
    command
}

/// A gateway on ephemeral loopback ports with its own PKI directory and SQLite file, or, when
/// `ONBOARD_TEST_MSSQL_URL` is set, its own scratch schema on that SQL Server (see
/// [`super::mssql`]).
pub struct TestGateway {
    pub gw: Gateway,
    pub config: Config,
    pub dir: Arc<TempDir>,
    /// The SQL Server scratch place, removed when the last gateway on it is gone (declared
    /// last: dropped after the gateway).
    pub scratch: Option<Arc<ScratchGuard>>,
}

/// Removes its scratch schema or database when dropped.
pub struct ScratchGuard(pub super::mssql::Scratch);

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        self.0.remove_blocking();
    }
}

/// Whether the tests run on SQL Server (`ONBOARD_TEST_MSSQL_URL` is set).
pub fn on_mssql() -> bool {
    std::env::var(super::mssql::URL_VAR).is_ok_and(|u| !u.trim().is_empty())
}

/// Configuration of a test gateway rooted in `dir`.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    c.server.mtls_listen = local;
    c.server.password_listen = local;
    c.server.metrics_listen = local;
    c.pki.dir = dir.join("certs");
    c.store.url = format!("sqlite://{}", dir.join("onboard.db").display());
    c.enrollment.templates_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/templates");
    c.lifecycle.sweep_interval_ms = 100;
    c
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    /// Start with configuration changes.
    pub async fn start_with(change: impl FnOnce(&mut Config)) -> TestGateway {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = test_config(dir.path());
        let scratch = super::mssql::Scratch::create().await;
        if let Some(scratch) = &scratch {
            config.store.url = scratch.url.clone();
        }
        let scratch = scratch.map(|s| Arc::new(ScratchGuard(s)));
        change(&mut config);
        let gw = Gateway::start(config.clone())
            .await
            .expect("gateway starts");
        TestGateway {
            gw,
            config,
            dir,
            scratch,
        }
    }

    /// Stop this gateway and start a new one on the same PKI and store (new ports).
    pub async fn restart(self) -> TestGateway {
        let TestGateway {
            gw,
            config,
            dir,
            scratch,
        } = self;
        gw.stop().await;
        let gw = Gateway::start(config.clone())
            .await
            .expect("gateway restarts");
        TestGateway {
            gw,
            config,
            dir,
            scratch,
        }
    }

    fn issuer(&self, stem: &str) -> Issuer {
        Issuer::load(&self.config.pki.dir, stem).expect("issuer loads")
    }

    /// A factory (bootstrap) certificate for `device_id`.
    pub fn factory(&self, device_id: &str) -> CertAndKey {
        self.factory_with(device_id, &CertOptions::valid_for_days(365))
    }

    pub fn factory_with(&self, device_id: &str, options: &CertOptions) -> CertAndKey {
        self.issuer("factory-ca")
            .issue_client(device_id, options)
            .expect("factory cert")
    }

    /// An admin certificate for `name`.
    pub fn admin(&self, name: &str) -> CertAndKey {
        self.issuer("admin-ca")
            .issue_client(name, &CertOptions::valid_for_days(30))
            .expect("admin cert")
    }

    /// PEM of the CA clients must trust for the server certificate.
    pub fn server_ca_pem(&self) -> String {
        self.gw.pki.server_ca_pem().to_owned()
    }

    /// Options for the mTLS listener with a client certificate.
    pub fn mtls_options(&self, client_id: &str, cert: &CertAndKey) -> MqttOptions {
        let tls = client_tls(
            &self.server_ca_pem(),
            Some((&cert.certificate_pem, &cert.private_key_pem)),
        );
        options(client_id, self.gw.mtls_addr, tls)
    }

    /// Options for the mTLS listener without a client certificate.
    pub fn mtls_options_anonymous(&self, client_id: &str) -> MqttOptions {
        options(
            client_id,
            self.gw.mtls_addr,
            client_tls(&self.server_ca_pem(), None),
        )
    }

    /// Options for the password listener.
    pub fn password_options(&self, client_id: &str, username: &str, password: &str) -> MqttOptions {
        let mut o = options(
            client_id,
            self.gw.password_addr,
            client_tls(&self.server_ca_pem(), None),
        );
        o.set_credentials(username, password);
        o
    }

    /// A bare TLS stream to the mTLS listener with `cert` (for hand-written MQTT bytes).
    pub async fn raw_tls(
        &self,
        cert: &CertAndKey,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.gw.mtls_addr)
            .await
            .expect("connect");
        self.tls_over(tcp, cert).await
    }

    /// Like [`Self::raw_tls`], over a socket with small kernel buffers and a small segment size,
    /// so that what a client does not read (or what the server does not read of it) fills the
    /// buffers on both ends after kilobytes instead of megabytes.
    pub async fn raw_tls_small_buffers(
        &self,
        cert: &CertAndKey,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.set_send_buffer_size(4096).expect("SO_SNDBUF");
        // Announced in the SYN: the server's segments, and so its send buffer, stay small.
        socket.set_tcp_mss(1024).expect("TCP_MAXSEG");
        socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let tcp = socket.connect(self.gw.mtls_addr).await.expect("connect");
        self.tls_over(tcp, cert).await
    }

    async fn tls_over(
        &self,
        tcp: tokio::net::TcpStream,
        cert: &CertAndKey,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tls = client_tls(
            &self.server_ca_pem(),
            Some((&cert.certificate_pem, &cert.private_key_pem)),
        );
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    /// Value of one sample of `/metrics`, e.g. `onboard_auth_failures_total{reason="expired"}`
    /// (labels in the order the exposition prints them). 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let body = self.http_get("/metrics").await.1;
        metric_value(&body, sample)
    }

    /// Status code and body of a GET on the metrics listener.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.gw.metrics_addr, path).await
    }

    /// The device's audit trail, oldest first.
    pub async fn events(&self, device_id: &str) -> Vec<AuditEvent> {
        self.gw.store.events(device_id, 1000).await.expect("events")
    }

    /// Names of the device's audit events, oldest first.
    pub async fn event_names(&self, device_id: &str) -> Vec<String> {
        self.events(device_id)
            .await
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    /// Wait until the audit trail of `device_id` holds `event` (events are written in the
    /// background for refusals).
    pub async fn wait_event(&self, device_id: &str, event: &str) -> AuditEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(e) = self
                .events(device_id)
                .await
                .into_iter()
                .find(|e| e.event == event)
            {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {event} event for {device_id}: {:?}",
                self.event_names(device_id).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Enroll `device_id` over its factory certificate with `request` and return the response.
    pub async fn enroll(&self, device_id: &str, request: Value) -> Value {
        let factory = self.factory(device_id);
        let mut client = Client::connect(self.mtls_options(device_id, &factory))
            .await
            .expect("bootstrap connects");
        let response = client.request_enroll(device_id, &request).await;
        client.disconnect().await;
        response
    }
}

/// Wait until the inventory shows `id` in `state`.
pub async fn wait_state(t: &TestGateway, id: &str, state: onboard::store::DeviceState) {
    eventually(&format!("{id} becomes {state}"), || async {
        t.gw.store
            .device(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|d| d.state == state)
    })
    .await;
}

/// Publish an admin command on `topic` and wait for its reply, which must echo the
/// command's `request_id`.
pub async fn admin_command(admin: &mut Client, topic: &str, body: Value) -> Value {
    let id = body["request_id"].as_str().expect("request_id").to_owned();
    admin
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&body).expect("JSON"),
        )
        .await;
    let reply = admin.recv_json(&format!("admin/responses/{id}")).await;
    assert_eq!(reply["request_id"], id.as_str());
    reply
}

/// Reconnect with the operational certificate of an accepted `response` (and the device's
/// `key_pem`), check the retained configuration and report telemetry, which activates it.
pub async fn activate_with_cert(
    t: &TestGateway,
    id: &str,
    response: &Value,
    key_pem: &str,
) -> Client {
    let cred = issued(response, key_pem);
    let mut device = Client::connect(t.mtls_options(id, &cred))
        .await
        .expect("operational connect");
    device
        .subscribe(&format!("devices/{id}/#"), QoS::AtLeastOnce)
        .await;
    let config = device.recv_json(&format!("devices/{id}/config")).await;
    assert_eq!(config["device_id"], id);
    device
        .publish(
            &format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            r#"{"t":21.0}"#,
        )
        .await;
    device
}

/// Wait for `cond` to become true (polling), or panic with `what`.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn metric_value(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics listener");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A rustls client configuration trusting `ca_pem`, optionally with a client certificate.
pub fn client_tls(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
    };
    Arc::new(config)
}

pub fn options(
    client_id: &str,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "localhost", addr.port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectFailure {
    /// CONNACK with this code.
    Refused(ConnectReturnCode),
    /// TLS or socket error before CONNACK (e.g. the client certificate was refused).
    Failed(String),
    Timeout,
}

/// What the background event loop saw.
#[derive(Debug)]
enum Seen {
    Packet(Packet),
    Closed(String),
}

/// A connected MQTT client whose event loop runs in the background.
pub struct Client {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    /// Publishes received while waiting for something else.
    inbox: Vec<Publish>,
    closed: Option<String>,
}

impl Client {
    pub async fn connect(opts: MqttOptions) -> Result<Client, ConnectFailure> {
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Err(_) => return Err(ConnectFailure::Timeout),
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == ConnectReturnCode::Success {
                        break;
                    }
                    return Err(ConnectFailure::Refused(ack.code));
                }
                Ok(Ok(_)) => continue,
                Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                    return Err(ConnectFailure::Refused(code))
                }
                Ok(Err(e)) => return Err(ConnectFailure::Failed(e.to_string())),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Seen::Packet(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Client {
            client,
            rx,
            inbox: Vec::new(),
            closed: None,
        })
    }

    async fn next_seen(&mut self, until: tokio::time::Instant) -> Option<Packet> {
        if self.closed.is_some() {
            return None;
        }
        match tokio::time::timeout_at(until, self.rx.recv()).await {
            Ok(Some(Seen::Packet(p))) => Some(p),
            Ok(Some(Seen::Closed(why))) => {
                self.closed = Some(why);
                None
            }
            Ok(None) => {
                self.closed = Some("event loop ended".into());
                None
            }
            Err(_) => None,
        }
    }

    /// Subscribe and return the SUBACK's codes.
    pub async fn subscribe_many(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let subs = filters
            .iter()
            .map(|(f, q)| rumqttc::SubscribeFilter::new((*f).to_owned(), *q));
        self.client
            .subscribe_many(subs)
            .await
            .expect("subscribe queued");
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            match self.next_seen(until).await {
                Some(Packet::SubAck(ack)) => return ack.return_codes,
                Some(Packet::Publish(p)) => self.inbox.push(p),
                Some(_) => {}
                None => panic!("no SUBACK (closed: {:?})", self.closed),
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        self.subscribe_many(&[(filter, qos)]).await[0]
    }

    /// Unsubscribe and wait for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("unsubscribe queued");
        let until = tokio::time::Instant::now() + WAIT;
        loop {
            match self.next_seen(until).await {
                Some(Packet::UnsubAck(_)) => return,
                Some(Packet::Publish(p)) => self.inbox.push(p),
                Some(_) => {}
                None => panic!("no UNSUBACK (closed: {:?})", self.closed),
            }
        }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, retain, payload.into())
            .await
            .expect("publish queued");
    }

    /// The packet id of the next PUBACK the server sends within `within`, if any.
    pub async fn next_puback(&mut self, within: Duration) -> Option<u16> {
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.next_seen(until).await {
                Some(Packet::PubAck(ack)) => return Some(ack.pkid),
                Some(Packet::Publish(p)) => self.inbox.push(p),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// The next publish on `topic`, or None within `within`.
    pub async fn recv_on(&mut self, topic: &str, within: Duration) -> Option<Publish> {
        if let Some(i) = self.inbox.iter().position(|p| p.topic == topic) {
            return Some(self.inbox.remove(i));
        }
        let until = tokio::time::Instant::now() + within;
        loop {
            match self.next_seen(until).await {
                Some(Packet::Publish(p)) if p.topic == topic => return Some(p),
                Some(Packet::Publish(p)) => self.inbox.push(p),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// Every publish received so far or within `within` from now, oldest first.
    pub async fn drain(&mut self, within: Duration) -> Vec<Publish> {
        let until = tokio::time::Instant::now() + within;
        while let Some(packet) = self.next_seen(until).await {
            if let Packet::Publish(p) = packet {
                self.inbox.push(p);
            }
        }
        std::mem::take(&mut self.inbox)
    }

    /// The next publish on `topic` parsed as JSON; panics if none arrives.
    pub async fn recv_json(&mut self, topic: &str) -> Value {
        let p = self
            .recv_on(topic, WAIT)
            .await
            .unwrap_or_else(|| panic!("nothing on {topic} (closed: {:?})", self.closed));
        serde_json::from_slice(&p.payload).expect("JSON payload")
    }

    /// Whether the server closed the connection within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while self.closed.is_none() {
            match self.next_seen(until).await {
                Some(Packet::Publish(p)) => self.inbox.push(p),
                Some(_) => {}
                None if self.closed.is_some() => break,
                None => return false,
            }
        }
        true
    }

    /// Subscribe to the response topic, publish the request and wait for the answer.
    pub async fn request_enroll(&mut self, device_id: &str, request: &Value) -> Value {
        let response_topic = format!("enroll/{device_id}/response");
        let code = self.subscribe(&response_topic, QoS::AtLeastOnce).await;
        assert_eq!(
            code,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "subscribe to {response_topic}"
        );
        self.publish(
            &format!("enroll/{device_id}/request"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(request).expect("json"),
        )
        .await;
        self.recv_json(&response_topic).await
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Operational credential from an accepted certificate enrollment response.
pub fn issued(response: &Value, private_key_pem: &str) -> CertAndKey {
    CertAndKey {
        certificate_pem: response["credential"]["certificate_pem"]
            .as_str()
            .expect("certificate_pem")
            .to_owned(),
        private_key_pem: private_key_pem.to_owned(),
        serial: String::new(),
    }
}

/// A fresh EC P-256 key and a CSR for `cn` (PEM both).
pub fn csr_for(cn: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let csr = params.serialize_request(&key).expect("csr");
    (csr.pem().expect("csr pem"), key.serialize_pem())
}

/// A CSR for `cn` carrying an RSA-1024 key (properly self-signed with it).
pub fn weak_rsa_csr(cn: &str) -> String {
    let key = rsa_1024();
    let remote =
        rcgen::KeyPair::from_remote(Box::new(RsaSigner { key: key.clone() })).expect("remote key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params
        .serialize_request(&remote)
        .expect("csr")
        .pem()
        .expect("pem")
}

/// The same CSR with its signature corrupted (no proof of possession).
pub fn tampered_csr(csr_pem: &str) -> String {
    use base64::Engine;
    let body: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64");
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

pub fn rsa_1024() -> rsa::RsaPrivateKey {
    static KEY: std::sync::OnceLock<rsa::RsaPrivateKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("RSA key"))
        .clone()
}

/// Signs with an RSA key that ring refuses to load (< 2048 bits), for weak-key tests.
#[derive(Debug, Clone)]
pub struct RsaSigner {
    pub key: rsa::RsaPrivateKey,
}

impl RsaSigner {
    fn sign_sha256(&self, msg: &[u8]) -> Vec<u8> {
        use rsa::signature::{SignatureEncoding, Signer};
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(self.key.clone());
        signer.sign(msg).to_vec()
    }

    pub fn public_key_der(&self) -> Vec<u8> {
        use rsa::pkcs8::EncodePublicKey;
        self.key
            .to_public_key()
            .to_public_key_der()
            .expect("spki")
            .as_bytes()
            .to_vec()
    }
}

impl rcgen::RemoteKeyPair for RsaSigner {
    fn public_key(&self) -> &[u8] {
        // rcgen wants the PKCS#1 RSAPublicKey for RSA keys.
        static PK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        PK.get_or_init(|| {
            use rsa::pkcs1::EncodeRsaPublicKey;
            self.key
                .to_public_key()
                .to_pkcs1_der()
                .expect("pkcs1")
                .as_bytes()
                .to_vec()
        })
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.sign_sha256(msg))
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl rustls::sign::SigningKey for RsaSigner {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::RSA_PKCS1_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn rustls::sign::Signer>)
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::RSA
    }
}

impl rustls::sign::Signer for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.sign_sha256(message))
    }
    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::RSA_PKCS1_SHA256
    }
}

#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS 1.2 client presenting `cert_pem` with an RSA-1024 key (which rustls/ring cannot load).
pub fn weak_key_client_tls(ca_pem: &str, cert_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert PEM");
    let key = Arc::new(RsaSigner { key: rsa_1024() });
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.3 signs CertificateVerify with RSA-PSS only; 1.2 lets this key use PKCS#1.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("protocols")
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(FixedCert(certified)));
    Arc::new(config)
}
