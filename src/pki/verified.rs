//! Client certificates that passed full verification, remembered by their bytes.
//!
//! A device reconnects with the same certificate, again and again; verifying its chain (path
//! building, the CA's signature on it, key usage, key strength) gives the same answer each
//! time as long as the trust store is the same and the time is inside the certificate's
//! validity. So a certificate that passed is remembered, by the SHA-256 of its DER, with its
//! validity window and the role its issuer grants, and its next handshakes skip the signature
//! check. What can change between two connections is still checked every time: the clock
//! against the window, the admin revocation list, and (after the handshake) the credential and
//! the device in the store. The cache belongs to one trust store: a reload (SIGHUP) builds a
//! new, empty one. Only certificates issued directly by one of our CAs are remembered (a
//! chain with intermediates is verified in full on every handshake).

use std::collections::HashMap;
use std::sync::Mutex;

use rustls_pki_types::UnixTime;
use sha2::{Digest, Sha256};

use super::Role;

/// Certificates remembered at most; past it the cache starts again empty.
pub const CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    role: Role,
    /// Validity, in seconds since the epoch.
    not_before: u64,
    not_after: u64,
}

#[derive(Debug, Default)]
pub(crate) struct VerifiedCerts {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

/// The cache key of a certificate.
pub(crate) fn key(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

impl VerifiedCerts {
    /// Whether the certificate `key` was verified for `role` and `now` is inside its validity.
    pub(crate) fn holds(&self, key: &[u8; 32], role: Role, now: UnixTime) -> bool {
        let now = now.as_secs();
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .is_some_and(|e| e.role == role && e.not_before <= now && now <= e.not_after)
    }

    /// Remember the certificate `key`, verified for `role`, valid from `not_before` to
    /// `not_after` (seconds since the epoch).
    pub(crate) fn remember(&self, key: [u8; 32], role: Role, not_before: i64, not_after: i64) {
        let (Ok(not_before), Ok(not_after)) = (u64::try_from(not_before), u64::try_from(not_after))
        else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                role,
                not_before,
                not_after,
            },
        );
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn a_remembered_certificate_holds_only_inside_its_validity_and_for_its_role() {
        let cache = VerifiedCerts::default();
        let k = key(b"certificate");
        assert!(!cache.holds(&k, Role::Device, at(150)));
        cache.remember(k, Role::Device, 100, 200);
        assert!(cache.holds(&k, Role::Device, at(100)));
        assert!(cache.holds(&k, Role::Device, at(200)));
        assert!(!cache.holds(&k, Role::Device, at(99)), "not yet valid");
        assert!(!cache.holds(&k, Role::Device, at(201)), "expired");
        assert!(!cache.holds(&k, Role::Admin, at(150)), "another role");
        assert!(!cache.holds(&key(b"other"), Role::Device, at(150)));
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = VerifiedCerts::default();
        for i in 0..CAPACITY + 10 {
            cache.remember(key(&i.to_be_bytes()), Role::Device, 0, 10);
        }
        assert!(cache.len() <= CAPACITY);
    }
}
