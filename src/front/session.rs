//! Live client connections, so that a revocation can disconnect a device at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::pki::Role;

#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    role: Role,
    serial: String,
    kill: CancellationToken,
}

/// Registry of open sessions by device id (admins by name).
#[derive(Default)]
pub struct Sessions {
    by_id: DashMap<String, Vec<Entry>>,
    next: AtomicU64,
}

/// Removes its session from the registry when dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    key: String,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(mut entries) = self.sessions.by_id.get_mut(&self.key) {
            entries.retain(|e| e.id != self.id);
        }
        self.sessions
            .by_id
            .remove_if(&self.key, |_, v| v.is_empty());
    }
}

impl Sessions {
    /// Register a session; `kill` is cancelled to disconnect it.
    pub fn register(
        self: &Arc<Self>,
        key: &str,
        role: Role,
        serial: &str,
        kill: CancellationToken,
    ) -> SessionGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_id.entry(key.to_owned()).or_default().push(Entry {
            id,
            role,
            serial: serial.to_owned(),
            kill,
        });
        SessionGuard {
            sessions: self.clone(),
            key: key.to_owned(),
            id,
        }
    }

    /// Disconnect every session of a device (any role). Returns how many.
    pub fn disconnect(&self, key: &str) -> usize {
        self.disconnect_where(key, |_| true)
    }

    /// Disconnect every session of a device in one role. Returns how many.
    pub fn disconnect_role(&self, key: &str, role: Role) -> usize {
        self.disconnect_where(key, |e| e.role == role)
    }

    /// Disconnect the sessions that use one credential.
    pub fn disconnect_serial(&self, key: &str, serial: &str) -> usize {
        self.disconnect_where(key, |e| e.serial == serial)
    }

    /// Disconnect every session of `role` whose credential serial `revoked` says is revoked,
    /// whoever it belongs to. Returns the (id, serial) of each session disconnected.
    pub fn disconnect_revoked(
        &self,
        role: Role,
        revoked: impl Fn(&str) -> bool,
    ) -> Vec<(String, String)> {
        let mut ended = Vec::new();
        for entries in self.by_id.iter() {
            for entry in entries.iter() {
                if entry.role == role && revoked(&entry.serial) {
                    entry.kill.cancel();
                    ended.push((entries.key().clone(), entry.serial.clone()));
                }
            }
        }
        ended
    }

    fn disconnect_where(&self, key: &str, matching: impl Fn(&Entry) -> bool) -> usize {
        self.by_id
            .get(key)
            .map(|entries| {
                let ended = entries.iter().filter(|e| matching(e));
                ended.map(|e| e.kill.cancel()).count()
            })
            .unwrap_or(0)
    }

    pub fn is_connected(&self, key: &str, role: Role) -> bool {
        self.by_id
            .get(key)
            .is_some_and(|entries| entries.iter().any(|e| e.role == role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnect_cancels_and_guard_unregisters() {
        let sessions = Arc::new(Sessions::default());
        let kill = CancellationToken::new();
        let guard = sessions.register("d1", Role::Device, "aa", kill.clone());
        assert!(sessions.is_connected("d1", Role::Device));
        assert_eq!(sessions.disconnect_serial("d1", "bb"), 0);
        assert!(!kill.is_cancelled());
        assert_eq!(sessions.disconnect("d1"), 1);
        assert!(kill.is_cancelled());
        drop(guard);
        assert!(!sessions.is_connected("d1", Role::Device));
        assert_eq!(sessions.disconnect("d1"), 0);
    }

    #[test]
    fn revoked_serials_of_one_role_are_disconnected() {
        let sessions = Arc::new(Sessions::default());
        let (alice, bob, dev) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let _a = sessions.register("alice", Role::Admin, "a1", alice.clone());
        let _b = sessions.register("bob", Role::Admin, "b1", bob.clone());
        let _d = sessions.register("d1", Role::Device, "a1", dev.clone());
        let ended = sessions.disconnect_revoked(Role::Admin, |serial| serial == "a1");
        assert_eq!(ended, [("alice".to_owned(), "a1".to_owned())]);
        assert!(alice.is_cancelled() && !bob.is_cancelled() && !dev.is_cancelled());
    }
}
