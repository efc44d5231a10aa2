//! One simulated device's flows, over the lean client of [`super::wire`]:
//!
//! - [`Simulator::kit`]: what the device brings to its enrollment (factory certificate, and in
//!   CSR mode its own key and CSR), which can be made before its flow starts;
//! - [`Simulator::enroll_kit`]: bootstrap connect, subscribe to `enroll/D/response`, publish the
//!   request, wait for the answer, disconnect;
//! - [`Simulator::activate`]: connect with the operational credential, subscribe to
//!   `devices/D/config`, check the retained configuration, publish telemetry, disconnect. For
//!   an enrolling device the first report is its activation; for an active one, a reconnect;
//! - [`Simulator::hold`]: connect with the operational credential and stay connected, idle.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::wire::{encode::Hello, Client, Message};
use super::{
    DeviceFailure, Phase, SimCredential, Simulator, FACTORY_CERT_DAYS, MAX_PACKET, SIM_FIRMWARE,
    SIM_MODEL,
};
use crate::pki::CertOptions;

/// Keepalive of the short-lived connections of the enrollment and activation flows.
const FLOW_KEEP_ALIVE_SECS: u16 = 60;

/// The topics of one device.
struct DeviceTopics {
    request: String,
    response: String,
    config: String,
    telemetry: String,
}

impl DeviceTopics {
    fn of(device_id: &str) -> DeviceTopics {
        DeviceTopics {
            request: format!("enroll/{device_id}/request"),
            response: format!("enroll/{device_id}/response"),
            config: format!("devices/{device_id}/config"),
            telemetry: format!("devices/{device_id}/telemetry"),
        }
    }
}

/// What a device brings to its enrollment. A real device has its factory certificate from the
/// factory and makes its key and CSR on its own CPU, so a benchmark may make kits before it
/// starts the clock.
pub struct DeviceKit {
    device_id: String,
    /// Client configuration presenting the factory certificate.
    bootstrap_tls: Arc<rustls::ClientConfig>,
    /// In CSR mode: the CSR and the key it was made with (PEM both).
    own_key: Option<(String, String)>,
}

impl DeviceKit {
    pub fn device_id(&self) -> &str {
        &self.device_id
    }
}

/// The operational credential a device received.
#[derive(Debug, Clone)]
pub enum OperationalCredential {
    /// Certificate (PEM) and the private key that goes with it (the device's own, or the one
    /// the gateway generated).
    Certificate {
        certificate_pem: String,
        private_key_pem: String,
    },
    Password {
        username: String,
        password: String,
    },
}

/// A device whose enrollment was accepted.
#[derive(Debug, Clone)]
pub struct EnrolledDevice {
    pub device_id: String,
    pub credential: OperationalCredential,
    /// `config_version` of the response.
    pub config_version: u64,
    /// When the request was published (start of the device's latency).
    pub requested_at: Instant,
}

/// A device connected with its operational credential and idle: nothing is read or written
/// until [`HeldConnection::close`] (or drop, which just closes the socket).
pub struct HeldConnection {
    device_id: String,
    client: Client,
}

impl HeldConnection {
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// DISCONNECT and close, bounded by `deadline`.
    pub async fn close(self, deadline: Instant) {
        self.client.close(deadline).await;
    }
}

impl Simulator {
    /// A factory certificate for `device_id` (as a client configuration), and in CSR mode a
    /// fresh key and CSR.
    pub fn kit(&self, device_id: &str) -> Result<DeviceKit, DeviceFailure> {
        let factory = self
            .factory
            .issue_client(device_id, &CertOptions::valid_for_days(FACTORY_CERT_DAYS))
            .map_err(|e| DeviceFailure::Local(format!("factory certificate: {e}")))?;
        let bootstrap_tls =
            self.tls_config(Some((&factory.certificate_pem, &factory.private_key_pem)))?;
        let own_key = match self.opts.credential {
            SimCredential::Csr => Some(csr_for(device_id)?),
            SimCredential::Generated | SimCredential::Password => None,
        };
        Ok(DeviceKit {
            device_id: device_id.to_owned(),
            bootstrap_tls,
            own_key,
        })
    }

    /// Bootstrap with a kit made on the spot: see [`Simulator::enroll_kit`].
    pub async fn enroll(
        &self,
        device_id: &str,
        deadline: Instant,
    ) -> Result<EnrolledDevice, DeviceFailure> {
        let kit = self.kit(device_id)?;
        self.enroll_kit(&kit, deadline).await
    }

    /// Bootstrap: connect with the factory certificate, subscribe to the response topic,
    /// publish the request, wait for the answer, disconnect.
    pub async fn enroll_kit(
        &self,
        kit: &DeviceKit,
        deadline: Instant,
    ) -> Result<EnrolledDevice, DeviceFailure> {
        let id = &kit.device_id;
        let topics = DeviceTopics::of(id);
        let hello = Hello {
            client_id: id,
            keep_alive_secs: FLOW_KEEP_ALIVE_SECS,
            login: None,
        };
        let tls = kit.bootstrap_tls.clone();
        let mut conn = Client::open(
            &self.mtls,
            tls,
            &hello,
            MAX_PACKET,
            deadline,
            Phase::BootstrapConnect,
        )
        .await?;
        conn.subscribe(&topics.response, deadline, Phase::ResponseSubscribe)
            .await?;
        let (request_id, payload) = self.request(kit)?;
        let requested_at = Instant::now();
        conn.publish(&topics.request, &payload, deadline, Phase::Response)
            .await?;
        let response = answer(&mut conn, &topics.response, &request_id, deadline).await?;
        conn.close(deadline).await;
        let own_key = kit.own_key.as_ref().map(|(_, key)| key.clone());
        let enrolled = parse_response(id, &response, own_key)?;
        Ok(EnrolledDevice {
            requested_at,
            ..enrolled
        })
    }

    /// The enrollment request of `kit`: its request id and JSON body.
    fn request(&self, kit: &DeviceKit) -> Result<(String, Vec<u8>), DeviceFailure> {
        let o = &self.opts;
        let request_id = format!("{}-{}", kit.device_id, uuid::Uuid::new_v4().simple());
        let mut request = json!({
            "request_id": request_id,
            "credential": o.credential.requested(),
            "device_type": o.device_type,
            "model": SIM_MODEL,
            "firmware_version": SIM_FIRMWARE,
        });
        if let Some((csr, _)) = &kit.own_key {
            request["csr"] = json!(csr);
        }
        let payload =
            serde_json::to_vec(&request).map_err(|e| DeviceFailure::Local(e.to_string()))?;
        Ok((request_id, payload))
    }

    /// Connect as `device` with its operational credential.
    async fn connect_operational(
        &self,
        device: &EnrolledDevice,
        keep_alive_secs: u16,
        deadline: Instant,
    ) -> Result<Client, DeviceFailure> {
        let phase = Phase::OperationalConnect;
        let (target, tls, login) = match &device.credential {
            OperationalCredential::Certificate {
                certificate_pem,
                private_key_pem,
            } => {
                let tls = self.tls_config(Some((certificate_pem, private_key_pem)))?;
                (&self.mtls, tls, None)
            }
            OperationalCredential::Password { username, password } => {
                let tls = self.tls_config(None)?;
                (
                    &self.password,
                    tls,
                    Some((username.as_str(), password.as_str())),
                )
            }
        };
        let hello = Hello {
            client_id: &device.device_id,
            keep_alive_secs,
            login,
        };
        Client::open(target, tls, &hello, MAX_PACKET, deadline, phase).await
    }

    /// Reconnect with the operational credential, check the retained configuration, publish
    /// telemetry (each message acknowledged), disconnect. Returns when the first telemetry
    /// message (the activating one) was acknowledged.
    pub async fn activate(
        &self,
        device: &EnrolledDevice,
        deadline: Instant,
    ) -> Result<Instant, DeviceFailure> {
        let id = &device.device_id;
        let topics = DeviceTopics::of(id);
        let mut conn = self
            .connect_operational(device, FLOW_KEEP_ALIVE_SECS, deadline)
            .await?;
        conn.subscribe(&topics.config, deadline, Phase::Config)
            .await?;
        let config = conn
            .recv_on(&topics.config, deadline, Phase::Config)
            .await?;
        check_config(id, &config)?;
        let mut activated_at = None;
        for seq in 0..self.opts.telemetry_messages.max(1) {
            let payload = json!({ "seq": seq, "temperature_c": 21.5 }).to_string();
            conn.publish_acked(
                &topics.telemetry,
                payload.as_bytes(),
                deadline,
                Phase::Telemetry,
            )
            .await?;
            activated_at.get_or_insert_with(Instant::now);
        }
        conn.close(deadline).await;
        Ok(activated_at.unwrap_or_else(Instant::now))
    }

    /// Enrollment and activation of a device with its kit; returns the enrolled device and its
    /// latency (request to the acknowledgement of the activating telemetry message).
    pub async fn enroll_and_activate(
        &self,
        kit: &DeviceKit,
        deadline: Instant,
    ) -> Result<(EnrolledDevice, Duration), DeviceFailure> {
        let device = self.enroll_kit(kit, deadline).await?;
        let activated_at = self.activate(&device, deadline).await?;
        let latency = activated_at.saturating_duration_since(device.requested_at);
        Ok((device, latency))
    }

    /// The whole flow of one device, its kit made on the spot; returns its latency.
    pub async fn run_device(&self, device_id: &str) -> Result<Duration, DeviceFailure> {
        let deadline = Instant::now() + self.opts.timeout;
        let kit = self.kit(device_id)?;
        let (_, latency) = self.enroll_and_activate(&kit, deadline).await?;
        Ok(latency)
    }

    /// Connect as `device` with its operational credential and a keepalive of `keep_alive`,
    /// and leave the connection open and idle.
    pub async fn hold(
        &self,
        device: &EnrolledDevice,
        keep_alive: Duration,
        deadline: Instant,
    ) -> Result<HeldConnection, DeviceFailure> {
        let secs = u16::try_from(keep_alive.as_secs()).unwrap_or(u16::MAX);
        let mut client = self.connect_operational(device, secs, deadline).await?;
        client.shrink();
        Ok(HeldConnection {
            device_id: device.device_id.clone(),
            client,
        })
    }
}

/// The answer to `request_id` on the response topic. An answer to another request id (an
/// earlier attempt) is not ours.
async fn answer(
    conn: &mut Client,
    response_topic: &str,
    request_id: &str,
    deadline: Instant,
) -> Result<Value, DeviceFailure> {
    loop {
        let message = conn
            .recv_on(response_topic, deadline, Phase::Response)
            .await?;
        let v: Value = serde_json::from_slice(&message.payload)
            .map_err(|e| DeviceFailure::BadResponse(format!("not JSON: {e}")))?;
        if v["request_id"].as_str() == Some(request_id) {
            return Ok(v);
        }
    }
}

/// The retained configuration must be JSON, version >= 1, for this device.
fn check_config(device_id: &str, config: &Message) -> Result<(), DeviceFailure> {
    let body: Value = serde_json::from_slice(&config.payload)
        .map_err(|e| DeviceFailure::BadConfig(format!("not JSON: {e}")))?;
    let version = body["version"].as_u64().unwrap_or(0);
    if version < 1 {
        return Err(DeviceFailure::BadConfig(format!(
            "version {:?} on {}",
            body["version"], config.topic
        )));
    }
    if body["device_id"].as_str().is_some_and(|d| d != device_id) {
        return Err(DeviceFailure::BadConfig(format!(
            "device_id {:?} on {}",
            body["device_id"], config.topic
        )));
    }
    Ok(())
}

/// A fresh EC P-256 key and a CSR with CN `device_id` (PEM both).
fn csr_for(device_id: &str) -> Result<(String, String), DeviceFailure> {
    let local = |e: rcgen::Error| DeviceFailure::Local(format!("key or CSR: {e}"));
    let key = rcgen::KeyPair::generate().map_err(local)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(local)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device_id);
    let csr = params.serialize_request(&key).map_err(local)?;
    Ok((csr.pem().map_err(local)?, key.serialize_pem()))
}

/// Read an enrollment response; `own_key` is the device's key in CSR mode.
pub(super) fn parse_response(
    device_id: &str,
    response: &Value,
    own_key: Option<String>,
) -> Result<EnrolledDevice, DeviceFailure> {
    match response["status"].as_str() {
        Some("accepted") => {}
        Some("rejected") => {
            let error = &response["error"];
            return Err(DeviceFailure::Rejected {
                code: error["code"].as_str().unwrap_or("unknown").to_owned(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        other => {
            return Err(DeviceFailure::BadResponse(format!("status {other:?}")));
        }
    }
    if response["device_id"]
        .as_str()
        .is_some_and(|d| d != device_id)
    {
        return Err(DeviceFailure::BadResponse(format!(
            "device_id {:?}",
            response["device_id"]
        )));
    }
    Ok(EnrolledDevice {
        device_id: device_id.to_owned(),
        credential: parse_credential(&response["credential"], own_key)?,
        config_version: response["config_version"].as_u64().unwrap_or(0),
        requested_at: Instant::now(),
    })
}

/// The `credential` object of an accepted response.
fn parse_credential(
    credential: &Value,
    own_key: Option<String>,
) -> Result<OperationalCredential, DeviceFailure> {
    let text = |v: &Value, what: &str| -> Result<String, DeviceFailure> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| DeviceFailure::BadResponse(format!("no {what}")))
    };
    match credential["type"].as_str() {
        Some("certificate") => {
            let certificate_pem = text(&credential["certificate_pem"], "certificate_pem")?;
            let private_key_pem = match (own_key, credential["private_key_pem"].as_str()) {
                (Some(key), _) => key,
                (None, Some(key)) => key.to_owned(),
                (None, None) => {
                    return Err(DeviceFailure::BadResponse(
                        "generated credential without private_key_pem".into(),
                    ))
                }
            };
            Ok(OperationalCredential::Certificate {
                certificate_pem,
                private_key_pem,
            })
        }
        Some("password") => Ok(OperationalCredential::Password {
            username: text(&credential["username"], "username")?,
            password: text(&credential["password"], "password")?,
        }),
        other => Err(DeviceFailure::BadResponse(format!(
            "credential type {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_read_by_the_contract() {
        let accepted = json!({
            "request_id": "r", "status": "accepted", "device_id": "d1",
            "credential": { "type": "certificate", "certificate_pem": "CERT",
                            "private_key_pem": "KEY" },
            "config_topic": "devices/d1/config", "config_version": 1
        });
        let d = parse_response("d1", &accepted, None).expect("accepted");
        assert_eq!(d.config_version, 1);
        match d.credential {
            OperationalCredential::Certificate {
                certificate_pem,
                private_key_pem,
            } => {
                assert_eq!(certificate_pem, "CERT");
                assert_eq!(private_key_pem, "KEY");
            }
            other => panic!("{other:?}"),
        }
        // In CSR mode the device's own key wins.
        let d = parse_response("d1", &accepted, Some("MINE".into())).expect("accepted");
        assert!(matches!(
            d.credential,
            OperationalCredential::Certificate { private_key_pem, .. } if private_key_pem == "MINE"
        ));

        let rejected = json!({ "request_id": "r", "status": "rejected",
                               "error": { "code": "not_allowlisted", "message": "no" } });
        let e = parse_response("d1", &rejected, None).expect_err("rejected");
        assert_eq!(e.reason(), "rejected:not_allowlisted");

        let password = json!({ "status": "accepted", "device_id": "d1",
            "credential": { "type": "password", "username": "d1", "password": "p" } });
        assert!(matches!(
            parse_response("d1", &password, None)
                .expect("accepted")
                .credential,
            OperationalCredential::Password { .. }
        ));
        let other = json!({ "status": "accepted", "device_id": "d2",
            "credential": { "type": "password", "username": "d2", "password": "p" } });
        assert_eq!(
            parse_response("d1", &other, None)
                .expect_err("wrong id")
                .reason(),
            "bad_response"
        );
    }

    #[test]
    fn retained_configurations_are_checked() {
        let message = |body: &str| Message {
            topic: "devices/d1/config".into(),
            payload: body.as_bytes().to_vec(),
        };
        assert!(check_config("d1", &message(r#"{"version":2,"device_id":"d1"}"#)).is_ok());
        assert!(check_config("d1", &message(r#"{"version":1}"#)).is_ok());
        for bad in [
            r#"{"version":0}"#,
            r#"{"version":3,"device_id":"d2"}"#,
            "not json",
        ] {
            let e = check_config("d1", &message(bad)).expect_err(bad);
            assert_eq!(e.reason(), "bad_config", "{bad}");
        }
    }
}
