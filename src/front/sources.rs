//! Handshakes in progress per source address. A connection holds a slot of its source from
//! the moment it is accepted until it is authenticated or refused, so one address cannot park
//! many sockets in the TLS handshake or before CONNECT (each may take the whole handshake and
//! CONNECT timeouts). Past the limit a new socket is closed at once, before any TLS work.
//!
//! The table holds an entry only while its source has a handshake in progress, and every
//! handshake first holds one of the gateway's connection slots: it never has more entries than
//! `server.max_connections`, whatever the number of addresses that come and go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Concurrent handshakes per source address, and who holds them.
#[derive(Debug)]
pub struct HandshakeSlots {
    per_source: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake in progress; dropping it frees the slot (and the entry with its last slot).
#[derive(Debug)]
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    source: IpAddr,
}

impl HandshakeSlots {
    /// At most `per_source` concurrent handshakes from one address (at least one).
    pub fn new(per_source: usize) -> Arc<HandshakeSlots> {
        Arc::new(HandshakeSlots {
            per_source: per_source.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `source`, or `None` if it already has `per_source` handshakes in progress.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<HandshakeSlot> {
        let source = source_of(source);
        let mut held = self.held();
        let count = held.entry(source).or_insert(0);
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            slots: self.clone(),
            source,
        })
    }

    /// Addresses with a handshake in progress.
    pub fn sources(&self) -> usize {
        self.held().len()
    }

    fn held(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A panic elsewhere cannot leave a count half-updated: every update is one statement.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The source an address counts under: an IPv4 address (IPv4-mapped IPv6 included) as itself,
/// an IPv6 address by its /64 prefix, which one host or one site commonly owns whole (counting
/// single IPv6 addresses would let one attacker use as many sources as it likes).
fn source_of(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        if let Some(count) = held.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_limit_and_the_slot_comes_back_when_dropped() {
        let slots = HandshakeSlots::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(a).unwrap();
        assert!(
            slots.try_acquire(a).is_none(),
            "a third from the same source"
        );
        assert!(
            slots.try_acquire(b).is_some(),
            "another source is not affected"
        );
        drop(first);
        assert!(slots.try_acquire(a).is_some());
    }

    #[test]
    fn the_table_forgets_sources_with_nothing_in_progress() {
        let slots = HandshakeSlots::new(4);
        for i in 0..=255u8 {
            let slot = slots.try_acquire(IpAddr::from([198, 51, 100, i]));
            drop(slot);
        }
        assert_eq!(slots.sources(), 0);
    }

    #[test]
    fn ipv6_addresses_of_one_64_prefix_are_one_source() {
        let slots = HandshakeSlots::new(2);
        let _a = slots
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        let _b = slots
            .try_acquire("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(
            slots
                .try_acquire("2001:db8:1:2::77".parse().unwrap())
                .is_none(),
            "a third address of the same /64"
        );
        assert!(
            slots
                .try_acquire("2001:db8:1:3::1".parse().unwrap())
                .is_some(),
            "another /64"
        );
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_same_source() {
        let slots = HandshakeSlots::new(1);
        let _v4 = slots.try_acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert!(slots
            .try_acquire("::ffff:192.0.2.7".parse().unwrap())
            .is_none());
    }
}
