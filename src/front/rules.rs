//! The topic rules: a pure function of who the client is, what it wants to do and on which
//! topic. Nothing else is allowed.
//!
//! | role | may PUBLISH | may SUBSCRIBE |
//! | --- | --- | --- |
//! | bootstrap(D) | `enroll/D/request` | `enroll/D/response` |
//! | device(D) | `devices/D/telemetry`, `devices/D/events/<any>`, `devices/D/state`, `devices/D/config/ack`, `devices/D/firmware/status`, `devices/D/cert/renew` | filters inside `devices/D/#` |
//! | admin | `admin/<any>`, `devices/+/commands/<any>` | `admin/#`, `devices/#` |

use crate::pki::Role;

/// Who a connection is, as decided at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// Device id (bootstrap, device) or the admin's name.
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
        }
    }
}

/// A decision of the topic rules; a denial says why (for the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(&'static str),
}

impl Decision {
    pub fn is_allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// May `who` do `action` on `topic` (a topic name for publish, a filter for subscribe)?
pub fn allowed(who: &Principal, action: Action, topic: &str) -> Decision {
    match action {
        Action::Publish => {
            if topic.is_empty() || topic.contains(['+', '#']) || topic.contains('\0') {
                return Decision::Deny("invalid topic name");
            }
        }
        Action::Subscribe => {
            if !valid_filter(topic) {
                return Decision::Deny("invalid topic filter");
            }
        }
    }
    match (who.role, action) {
        (Role::Bootstrap, Action::Publish) => exact(
            topic,
            &["enroll/", &who.id, "/request"],
            "bootstrap may only publish its enrollment request",
        ),
        (Role::Bootstrap, Action::Subscribe) => exact(
            topic,
            &["enroll/", &who.id, "/response"],
            "bootstrap may only subscribe to its enrollment response",
        ),
        (Role::Device, Action::Publish) => device_publish(&who.id, topic),
        (Role::Device, Action::Subscribe) => match own_device_suffix(&who.id, topic) {
            Some(_) => Decision::Allow,
            None => Decision::Deny("a device may only subscribe inside devices/<its id>/#"),
        },
        (Role::Admin, Action::Publish) => {
            if let Some(rest) = topic.strip_prefix("admin/") {
                if !rest.is_empty() {
                    return Decision::Allow;
                }
            }
            let mut levels = topic.split('/');
            match (levels.next(), levels.next(), levels.next(), levels.next()) {
                (Some("devices"), Some(id), Some("commands"), Some(rest))
                    if !id.is_empty() && !rest.is_empty() =>
                {
                    Decision::Allow
                }
                _ => Decision::Deny("admins publish on admin/... and devices/+/commands/..."),
            }
        }
        (Role::Admin, Action::Subscribe) => {
            if topic.starts_with("admin/") || topic.starts_with("devices/") {
                Decision::Allow
            } else {
                Decision::Deny("admins subscribe inside admin/# and devices/#")
            }
        }
    }
}

fn exact(topic: &str, parts: &[&str], why: &'static str) -> Decision {
    let mut rest = topic;
    for part in parts {
        match rest.strip_prefix(part) {
            Some(r) => rest = r,
            None => return Decision::Deny(why),
        }
    }
    if rest.is_empty() {
        Decision::Allow
    } else {
        Decision::Deny(why)
    }
}

/// `devices/D/<suffix>` -> `<suffix>` when the topic belongs to device D.
fn own_device_suffix<'a>(id: &str, topic: &'a str) -> Option<&'a str> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(id)?
        .strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

fn device_publish(id: &str, topic: &str) -> Decision {
    const WHY: &str = "a device publishes only telemetry, events, state, config/ack, firmware/status and cert/renew of its own";
    match own_device_suffix(id, topic) {
        Some("telemetry" | "state" | "config/ack" | "firmware/status" | "cert/renew") => {
            Decision::Allow
        }
        Some(suffix) => match suffix.strip_prefix("events/") {
            Some(event) if !event.is_empty() => Decision::Allow,
            _ => Decision::Deny(WHY),
        },
        None => Decision::Deny(WHY),
    }
}

/// MQTT 3.1.1 §4.7: `#` only last and alone in its level, `+` alone in its level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| {
        if level.contains('#') {
            *level == "#" && i == last
        } else if level.contains('+') {
            *level == "+"
        } else {
            true
        }
    })
}

/// Whether a device's publish on `topic` is a report that activates it
/// (telemetry or an event).
pub fn is_activation_report(id: &str, topic: &str) -> bool {
    match own_device_suffix(id, topic) {
        Some("telemetry") => true,
        Some(suffix) => suffix.starts_with("events/"),
        None => false,
    }
}

/// `admin/devices/D/<command>` or `admin/firmware`: admin commands the gateway executes.
pub fn is_admin_command(topic: &str) -> bool {
    topic == "admin/firmware" || topic.starts_with("admin/devices/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, id: &str) -> Principal {
        Principal {
            role,
            id: id.into(),
        }
    }

    #[test]
    fn bootstrap_may_only_enroll_itself() {
        let b = who(Role::Bootstrap, "d1");
        assert!(allowed(&b, Action::Publish, "enroll/d1/request").is_allowed());
        assert!(allowed(&b, Action::Subscribe, "enroll/d1/response").is_allowed());
        for topic in [
            "enroll/d2/request",
            "enroll/d1/response",
            "enroll/d1/request/x",
            "devices/d1/telemetry",
            "enroll/+/request",
        ] {
            assert!(!allowed(&b, Action::Publish, topic).is_allowed(), "{topic}");
        }
        for filter in [
            "enroll/+/response",
            "enroll/#",
            "enroll/d2/response",
            "#",
            "enroll/d1/request",
        ] {
            assert!(
                !allowed(&b, Action::Subscribe, filter).is_allowed(),
                "{filter}"
            );
        }
    }

    #[test]
    fn device_publishes_its_own_reports_only() {
        let d = who(Role::Device, "d1");
        for topic in [
            "devices/d1/telemetry",
            "devices/d1/events/alarm",
            "devices/d1/events/a/b",
            "devices/d1/state",
            "devices/d1/config/ack",
            "devices/d1/firmware/status",
            "devices/d1/cert/renew",
        ] {
            assert!(allowed(&d, Action::Publish, topic).is_allowed(), "{topic}");
        }
        for topic in [
            "devices/d1/config",
            "devices/d1/firmware",
            "devices/d1/events/",
            "devices/d1/commands/x",
            "devices/d2/telemetry",
            "devices/d11/telemetry",
            "devices/d1",
            "admin/x",
            "enroll/d1/request",
            "devices/d1/telemetry/+",
        ] {
            assert!(!allowed(&d, Action::Publish, topic).is_allowed(), "{topic}");
        }
    }

    #[test]
    fn device_subscribes_inside_its_own_tree() {
        let d = who(Role::Device, "d1");
        for filter in [
            "devices/d1/#",
            "devices/d1/config",
            "devices/d1/commands/+",
            "devices/d1/+/x",
        ] {
            assert!(
                allowed(&d, Action::Subscribe, filter).is_allowed(),
                "{filter}"
            );
        }
        for filter in [
            "devices/+/config",
            "devices/#",
            "#",
            "devices/d2/config",
            "devices/d1x/#",
            "devices/d1",
            "admin/#",
            "$share/g/devices/d1/#",
            "devices/d1/#/x",
            "devices/d1/a+",
        ] {
            assert!(
                !allowed(&d, Action::Subscribe, filter).is_allowed(),
                "{filter}"
            );
        }
    }

    #[test]
    fn admin_rules() {
        let a = who(Role::Admin, "alice");
        for topic in [
            "admin/devices/d1/config",
            "admin/firmware",
            "devices/d1/commands/reboot",
            "devices/d1/commands/a/b",
        ] {
            assert!(allowed(&a, Action::Publish, topic).is_allowed(), "{topic}");
        }
        for topic in [
            "devices/d1/config",
            "devices/d1/telemetry",
            "enroll/d1/response",
            "admin/",
            "devices/d1/commands/",
            "devices//commands/x",
        ] {
            assert!(!allowed(&a, Action::Publish, topic).is_allowed(), "{topic}");
        }
        for filter in [
            "admin/#",
            "devices/#",
            "devices/+/telemetry",
            "admin/responses/r1",
        ] {
            assert!(
                allowed(&a, Action::Subscribe, filter).is_allowed(),
                "{filter}"
            );
        }
        for filter in ["#", "enroll/#", "+/#", "$SYS/#"] {
            assert!(
                !allowed(&a, Action::Subscribe, filter).is_allowed(),
                "{filter}"
            );
        }
    }

    #[test]
    fn activation_reports() {
        assert!(is_activation_report("d1", "devices/d1/telemetry"));
        assert!(is_activation_report("d1", "devices/d1/events/boot"));
        assert!(!is_activation_report("d1", "devices/d1/state"));
        assert!(!is_activation_report("d1", "devices/d2/telemetry"));
    }
}
