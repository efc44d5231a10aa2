//! What the gateway publishes (enrollment answers, configurations, firmware jobs, renewed
//! certificates, admin replies, audit events) and where it goes.
//!
//! [`crate::topics::route`] decides: a device's private topics go into its own session
//! ([`crate::mailbox`]); the broker gets a copy of them for observers (admins subscribed to
//! `devices/#`), never retained there, so its router holds no per-device retained message or
//! filter; everything else (`admin/...`) goes to the broker only. Enrollment answers are never
//! fanned out: they can carry a private key.

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::BrokerLink;
use crate::mailbox::{Mailboxes, Message, SessionKey};
use crate::topics::{self, Private, Route};

/// Handle to publish from inside the gateway. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Bus {
    mailboxes: Arc<Mailboxes>,
    broker: BrokerLink,
}

impl Bus {
    pub fn new(mailboxes: Arc<Mailboxes>, broker: BrokerLink) -> Bus {
        Bus { mailboxes, broker }
    }

    /// QoS 1 to a device's session, QoS 0 to the broker; not retained.
    pub fn publish(&self, topic: &str, payload: impl Into<Bytes>) {
        self.send(topic, payload.into(), false);
    }

    /// Retained: every later subscriber gets it (configuration, firmware jobs).
    pub fn publish_retained(&self, topic: &str, payload: impl Into<Bytes>) {
        self.send(topic, payload.into(), true);
    }

    /// Forget the retained message of `topic` (subscribers see an empty message, as MQTT
    /// has it).
    pub fn clear_retained(&self, topic: &str) {
        self.send(topic, Bytes::new(), true);
    }

    /// Retain `payload` on a device's private topic again (at start, from the store): nobody
    /// is connected yet and observers need no replay, so it is only kept.
    pub fn restore_retained(&self, topic: &str, payload: impl Into<Bytes>) {
        match topics::route(topic) {
            Route::Device(id, kind) => {
                self.mailboxes.set_retained(id, kind, Some(payload.into()));
            }
            _ => self.publish_retained(topic, payload),
        }
    }

    fn send(&self, topic: &str, payload: Bytes, retain: bool) {
        match topics::route(topic) {
            Route::Bootstrap(id) => self
                .mailboxes
                .deliver(&SessionKey::bootstrap(id), Message::new(topic, payload, 1)),
            Route::Device(id, kind) => {
                if retain && Private::RETAINED.contains(&kind) {
                    let kept = (!payload.is_empty()).then(|| payload.clone());
                    self.mailboxes.set_retained(id, kind, kept);
                }
                self.mailboxes.deliver(
                    &SessionKey::device(id),
                    Message::new(topic, payload.clone(), 1),
                );
                self.broker.publish(topic, payload, false);
            }
            Route::Broker => self.broker.publish(topic, payload, retain),
        }
    }
}
