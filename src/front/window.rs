//! The relay's own QoS 1 window towards a clean-session admin.
//!
//! rumqttd 0.20 lets at most 100 QoS 1 publishes be unacknowledged on one connection (its
//! `MAX_INFLIGHT`, packet ids 1 to 100). Through the relay an acknowledgement travels client →
//! TLS → relay → broker, so 100 in flight capped what one admin could receive at a fraction of
//! what it gets from a bare broker. For a clean session the relay acknowledges the broker
//! itself, as soon as it has passed the publish on, and keeps a window of its own towards the
//! client: each such publish gets a packet id above rumqttd's range (101 to 65535), the
//! client's PUBACK for it ends here, and past [`RELAY_INFLIGHT`] unacknowledged publishes the
//! relay stops reading from the broker until the client acknowledges (a client that stops
//! reading altogether is cut off by the write timeout).
//!
//! Nothing a client was promised is lost by this: MQTT 3.1.1 discards a clean session's
//! unacknowledged QoS 1 messages when it disconnects, and while it is connected TCP delivers
//! them. Persistent sessions (`clean_session = 0`) keep rumqttd's own window and packet ids, so
//! that what was not acknowledged is redelivered when they resume.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Semaphore;

/// Publishes a clean-session admin may have unacknowledged through the relay.
pub const RELAY_INFLIGHT: usize = 1024;
/// The broker's packet ids are 1 to this (rumqttd's `MAX_PKID`); the relay's are above.
pub const BROKER_MAX_PKID: u16 = 100;

/// Packet ids handed to one client and not yet acknowledged by it.
#[derive(Debug)]
pub struct AckWindow {
    slots: Semaphore,
    ids: Mutex<Ids>,
}

#[derive(Debug)]
struct Ids {
    next: u16,
    in_use: HashSet<u16>,
}

impl Default for AckWindow {
    fn default() -> Self {
        AckWindow::new(RELAY_INFLIGHT)
    }
}

impl AckWindow {
    pub fn new(size: usize) -> AckWindow {
        AckWindow {
            slots: Semaphore::new(size.clamp(1, usize::from(u16::MAX - BROKER_MAX_PKID) / 2)),
            ids: Mutex::new(Ids {
                next: BROKER_MAX_PKID + 1,
                in_use: HashSet::new(),
            }),
        }
    }

    /// A packet id for the next publish to the client: waits while the window is full.
    pub async fn take(&self) -> u16 {
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        // The window is at most half of the relay's range: a free id is always near.
        loop {
            let id = ids.next;
            ids.next = if id == u16::MAX {
                BROKER_MAX_PKID + 1
            } else {
                id + 1
            };
            if ids.in_use.insert(id) {
                return id;
            }
        }
    }

    /// Whether `pkid` is one this window handed out (its PUBACK then ends at the relay),
    /// freeing its slot; `false` for the broker's own ids (passed on).
    pub fn acknowledge(&self, pkid: u16) -> bool {
        if pkid <= BROKER_MAX_PKID {
            return false;
        }
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.in_use.remove(&pkid) {
            self.slots.add_permits(1);
        }
        // An id above the broker's range that is not in use: a duplicate PUBACK; ends here too.
        true
    }

    /// Whether the next [`AckWindow::take`] waits (no lock taken: asked per delivery).
    pub fn is_full(&self) -> bool {
        self.slots.available_permits() == 0
    }

    /// Publishes handed out and not yet acknowledged.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_use
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn ids_are_above_the_brokers_unique_and_bounded_by_the_window() {
        let w = AckWindow::new(3);
        let a = w.take().await;
        let b = w.take().await;
        let c = w.take().await;
        assert!(a > BROKER_MAX_PKID && b > BROKER_MAX_PKID && c > BROKER_MAX_PKID);
        assert!(a != b && b != c && a != c);
        assert_eq!(w.in_flight(), 3);
        assert!(w.is_full());
        // Full: the next one waits for an acknowledgement.
        assert!(tokio::time::timeout(Duration::from_millis(50), w.take())
            .await
            .is_err());
        assert!(w.acknowledge(b));
        let d = tokio::time::timeout(Duration::from_secs(1), w.take())
            .await
            .expect("a slot was freed");
        assert!(d > BROKER_MAX_PKID && d != a && d != c);
        // The broker's own ids are not the window's; a repeated ack frees nothing twice.
        assert!(!w.acknowledge(BROKER_MAX_PKID));
        assert!(w.acknowledge(b));
        assert_eq!(w.in_flight(), 3);
    }

    #[tokio::test]
    async fn ids_wrap_around_and_skip_those_still_in_use() {
        let w = AckWindow::new(4);
        let first = w.take().await;
        for _ in 0..(u16::MAX - BROKER_MAX_PKID) as usize + 10 {
            let id = w.take().await;
            assert_ne!(id, first, "an id in use is never handed out again");
            assert!(id > BROKER_MAX_PKID);
            assert!(w.acknowledge(id));
        }
        assert_eq!(w.in_flight(), 1);
    }
}
