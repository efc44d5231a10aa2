//! The topic vocabulary: where each kind of message lives, built and parsed here only.
//!
//! Device `D`'s own topics split in two:
//! - private ones, whose only other end is the gateway or an admin: `enroll/D/response`,
//!   `devices/D/config`, `devices/D/firmware`, `devices/D/cert/response`,
//!   `devices/D/commands/...`. The gateway delivers them into D's session itself
//!   ([`crate::mailbox`]), so the broker never holds a per-device filter for them;
//! - everything else (telemetry, events, state, acks, `admin/...`) goes through the broker,
//!   whose wildcard fan-out serves admins and back-ends.

/// Where a message published by the gateway or an admin must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `enroll/D/response`: only the bootstrap session of D (it may carry a private key, so it
    /// is never fanned out).
    Bootstrap(&'a str),
    /// `devices/D/<private>`: the device session of D, and observers through the broker.
    Device(&'a str, Private),
    /// Anything else: the broker only.
    Broker,
}

/// The private device topics (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Private {
    /// `devices/D/config`: retained.
    Config,
    /// `devices/D/firmware`: retained.
    Firmware,
    /// `devices/D/cert/response`.
    CertResponse,
    /// `devices/D/commands/<any>`.
    Command,
}

impl Private {
    /// Private topics whose last message is kept for every later subscriber.
    pub const RETAINED: [Private; 2] = [Private::Config, Private::Firmware];

    fn from_suffix(suffix: &str) -> Option<Private> {
        match suffix {
            "config" => Some(Private::Config),
            "firmware" => Some(Private::Firmware),
            "cert/response" => Some(Private::CertResponse),
            s => s
                .strip_prefix("commands/")
                .filter(|rest| !rest.is_empty())
                .map(|_| Private::Command),
        }
    }

    /// The topic of a retained private kind for device `id`.
    pub fn topic(self, id: &str) -> String {
        match self {
            Private::Config => config(id),
            Private::Firmware => firmware(id),
            Private::CertResponse => format!("devices/{id}/cert/response"),
            Private::Command => format!("devices/{id}/commands"),
        }
    }
}

/// Classify a topic the gateway or an admin publishes on.
pub fn route(topic: &str) -> Route<'_> {
    let mut levels = topic.splitn(3, '/');
    match (levels.next(), levels.next(), levels.next()) {
        (Some("enroll"), Some(id), Some("response")) if !id.is_empty() => Route::Bootstrap(id),
        (Some("devices"), Some(id), Some(suffix)) if !id.is_empty() => {
            match Private::from_suffix(suffix) {
                Some(kind) => Route::Device(id, kind),
                None => Route::Broker,
            }
        }
        _ => Route::Broker,
    }
}

pub fn enroll_response(id: &str) -> String {
    format!("enroll/{id}/response")
}

pub fn config(id: &str) -> String {
    format!("devices/{id}/config")
}

pub fn firmware(id: &str) -> String {
    format!("devices/{id}/firmware")
}

/// Topics a client publishes for the gateway itself to act on (the front lets only D publish
/// under `enroll/D/` and `devices/D/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForGateway<'a> {
    EnrollRequest(&'a str),
    ConfigAck(&'a str),
    FirmwareStatus(&'a str),
    CertRenew(&'a str),
}

/// What the gateway must do with a client's publish on `topic`, if anything.
pub fn for_gateway(topic: &str) -> Option<ForGateway<'_>> {
    let mut levels = topic.splitn(3, '/');
    match (levels.next()?, levels.next()?, levels.next()?) {
        (_, "", _) => None,
        ("enroll", id, "request") => Some(ForGateway::EnrollRequest(id)),
        ("devices", id, "config/ack") => Some(ForGateway::ConfigAck(id)),
        ("devices", id, "firmware/status") => Some(ForGateway::FirmwareStatus(id)),
        ("devices", id, "cert/renew") => Some(ForGateway::CertRenew(id)),
        _ => None,
    }
}

/// Whether the gateway acts on a client's publish on `topic`.
pub fn is_for_gateway(topic: &str) -> bool {
    for_gateway(topic).is_some()
}

/// Whether `topic` is device `id`'s state topic, the only one a device may retain.
pub fn is_state(id: &str, topic: &str) -> bool {
    topic
        .strip_prefix("devices/")
        .and_then(|t| t.strip_prefix(id))
        .is_some_and(|t| t == "/state")
}

/// The one device a topic filter names (`devices/D/...`), if its device level is no wildcard.
pub fn filter_device(filter: &str) -> Option<&str> {
    let mut levels = filter.splitn(3, '/');
    match (levels.next()?, levels.next()?) {
        ("devices", id) if !id.is_empty() && id != "+" && id != "#" => Some(id),
        _ => None,
    }
}

/// Does the (valid) topic filter `filter` match the topic name `topic`? MQTT 3.1.1 §4.7.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("enroll/d1/response"), Route::Bootstrap("d1"));
        assert_eq!(route("enroll/d1/request"), Route::Broker);
        assert_eq!(
            route("devices/d1/config"),
            Route::Device("d1", Private::Config)
        );
        assert_eq!(
            route("devices/d1/firmware"),
            Route::Device("d1", Private::Firmware)
        );
        assert_eq!(
            route("devices/d1/cert/response"),
            Route::Device("d1", Private::CertResponse)
        );
        assert_eq!(
            route("devices/d1/commands/reboot/now"),
            Route::Device("d1", Private::Command)
        );
        for topic in [
            "devices/d1/commands/",
            "devices/d1/telemetry",
            "devices/d1/config/ack",
            "devices//config",
            "admin/events/d1/activated",
            "devices",
        ] {
            assert_eq!(route(topic), Route::Broker, "{topic}");
        }
    }

    #[test]
    fn filter_matching() {
        for (filter, topic) in [
            ("devices/d1/config", "devices/d1/config"),
            ("devices/d1/#", "devices/d1/config"),
            ("devices/d1/#", "devices/d1/commands/a/b"),
            ("devices/+/config", "devices/d1/config"),
            ("devices/d1/+", "devices/d1/config"),
            ("#", "devices/d1/config"),
            ("devices/d1/commands/+", "devices/d1/commands/x"),
        ] {
            assert!(matches(filter, topic), "{filter} ~ {topic}");
        }
        for (filter, topic) in [
            ("devices/d1/config", "devices/d1/config/ack"),
            ("devices/d1/+", "devices/d1/commands/x"),
            ("devices/d2/#", "devices/d1/config"),
            ("devices/d1/config/+", "devices/d1/config"),
            ("devices/d1", "devices/d1/config"),
        ] {
            assert!(!matches(filter, topic), "{filter} !~ {topic}");
        }
    }

    #[test]
    fn filter_naming_one_device() {
        assert_eq!(filter_device("devices/d1/config"), Some("d1"));
        assert_eq!(filter_device("devices/d1/#"), Some("d1"));
        assert_eq!(filter_device("devices/d1"), Some("d1"));
        assert_eq!(filter_device("devices/+/config"), None);
        assert_eq!(filter_device("devices/#"), None);
        assert_eq!(filter_device("admin/#"), None);
    }

    #[test]
    fn state_topic() {
        assert!(is_state("d1", "devices/d1/state"));
        assert!(!is_state("d1", "devices/d1/state/x"));
        assert!(!is_state("d1", "devices/d11/state"));
        assert!(!is_state("d1", "devices/d1/telemetry"));
    }
}
