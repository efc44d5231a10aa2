//! The change feed: what other gateways sharing the store changed, applied here.
//!
//! Several gateways may run on one database (behind a TCP load balancer). A device is
//! connected to one of them, but an admin command, an activation timeout or a renewal may be
//! handled by another. Every write that ends sessions or changes a device's retained topics
//! adds a row to the store's change feed in its own transaction; each gateway polls the feed
//! every `[store] change_poll_ms` and, for each change made by another store instance, reads
//! the changed part of the device again and applies it:
//!
//! - credentials: the sessions of revoked credentials are closed;
//! - state: a revoked device loses every session; a revoked, pending or failed device loses
//!   its retained configuration and firmware job;
//! - config: the newest configuration of an enrolling or active device is retained again;
//! - firmware: the latest unfinished job is retained again, a finished one cleared.
//!
//! Applying reads the current state, so a change applied twice, or late, does no harm.
//! Ids increase, but on SQL Server a transaction may commit after one that took a later id:
//! an id skipped over is waited for (up to [`GAP_WAIT`]) before it is given up as a rollback.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::admin::firmware::{is_terminal, job_document};
use crate::bus::Bus;
use crate::front::session::Sessions;
use crate::metrics::Metrics;
use crate::store::{Change, ChangeKind, DeviceState, Store, StoreError};
use crate::topics;

/// Changes read per query.
const PAGE: u32 = 500;
/// How long an id skipped over is waited for (a transaction still open on another gateway).
pub const GAP_WAIT: Duration = Duration::from_secs(30);
/// Skipped ids tracked at most (a sequence jump after a server restart is not waited for).
const MAX_GAPS: i64 = 10_000;
/// How often old change rows are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where this gateway is in the feed: the highest id seen and the lower ids not seen yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cursor {
    high: i64,
    /// Ids below `high` not seen yet, with when they were first skipped.
    gaps: BTreeMap<i64, Instant>,
}

impl Cursor {
    /// Start after `high` (the newest change when the gateway started).
    pub fn new(high: i64) -> Cursor {
        Cursor {
            high,
            gaps: BTreeMap::new(),
        }
    }

    /// The highest id seen.
    pub fn high(&self) -> i64 {
        self.high
    }

    /// Read changes with ids above this.
    pub fn read_after(&self) -> i64 {
        self.gaps.keys().next().map_or(self.high, |first| first - 1)
    }

    /// Take a page read from the feed; returns the changes not seen before, in order.
    pub fn accept(&mut self, page: Vec<Change>, now: Instant) -> Vec<Change> {
        let mut fresh = Vec::new();
        for change in page {
            if change.id > self.high {
                if change.id - self.high - 1 <= MAX_GAPS {
                    for skipped in self.high + 1..change.id {
                        self.gaps.insert(skipped, now);
                    }
                }
                self.high = change.id;
                fresh.push(change);
            } else if self.gaps.remove(&change.id).is_some() {
                fresh.push(change);
            }
        }
        fresh
    }

    /// Give up the ids skipped longer than `wait` ago (their transaction rolled back).
    pub fn expire(&mut self, now: Instant, wait: Duration) {
        self.gaps
            .retain(|_, since| now.saturating_duration_since(*since) < wait);
    }

    /// Ids still waited for.
    pub fn gaps(&self) -> usize {
        self.gaps.len()
    }
}

/// Applies other gateways' changes to the sessions and retained topics of this one.
pub struct Feed {
    pub store: Arc<dyn Store>,
    pub sessions: Arc<Sessions>,
    pub link: Bus,
    /// Counts what is applied; times the feed's queries.
    pub metrics: Arc<Metrics>,
    /// `[store] change_poll_ms`.
    pub poll: Duration,
    /// `[store] change_retention_secs`.
    pub retention: Duration,
}

impl Feed {
    /// Poll until `shutdown`, starting after change `start`.
    pub async fn run(self: Arc<Self>, start: i64, shutdown: CancellationToken) {
        let mut cursor = Cursor::new(start);
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pruned = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.poll_once(&mut cursor).await {
                tracing::warn!(error = %e, "change feed not read; retrying at the next poll");
            }
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                self.prune().await;
            }
        }
    }

    /// Read and apply everything new. On an error the cursor is left where it was, so the
    /// changes are read (and applied) again at the next poll.
    /// Applying reads the device's current state, so one part of one device is applied once
    /// per poll however many changes name it (an enrollment wave on another gateway, a device
    /// acking configurations in a loop): the store reads follow the devices changed, not the
    /// rows written.
    pub async fn poll_once(&self, cursor: &mut Cursor) -> Result<usize, StoreError> {
        let mut next = cursor.clone();
        let mut applied: HashSet<(String, ChangeKind)> = HashSet::new();
        let mut after = next.read_after();
        loop {
            let page = self
                .metrics
                .store_op("changes_since", self.store.changes_since(after, PAGE))
                .await?;
            let full = page.len() == PAGE as usize;
            after = page.last().map_or(after, |c| c.id);
            for change in next.accept(page, Instant::now()) {
                if change.origin == self.store.origin() {
                    continue;
                }
                let part = (change.device_id.clone(), change.kind);
                if applied.contains(&part) {
                    continue;
                }
                self.apply(&change).await?;
                self.metrics
                    .changes_applied
                    .with_label_values(&[change.kind.as_str()])
                    .inc();
                applied.insert(part);
            }
            if !full {
                break;
            }
        }
        next.expire(Instant::now(), GAP_WAIT);
        *cursor = next;
        Ok(applied.len())
    }

    /// Read the changed part of the device again and make this gateway agree with it.
    async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        let id = change.device_id.as_str();
        tracing::debug!(device_id = id, kind = %change.kind, change = change.id, "applying change");
        match change.kind {
            ChangeKind::Credentials => {
                for credential in self.store.credentials_of(id).await? {
                    if credential.is_revoked() {
                        self.sessions.disconnect_serial(id, &credential.serial);
                    }
                }
            }
            ChangeKind::State => {
                let Some(device) = self.store.device(id).await? else {
                    return Ok(());
                };
                if device.state == DeviceState::Revoked {
                    self.sessions.disconnect(id);
                }
                if !publishes_config(device.state) {
                    self.link.clear_retained(&topics::config(id));
                    self.link.clear_retained(&topics::firmware(id));
                }
            }
            ChangeKind::Config => {
                let state = self.store.device(id).await?.map(|d| d.state);
                if !state.is_some_and(publishes_config) {
                    return Ok(());
                }
                if let Some(config) = self.store.latest_config(id).await? {
                    let body = serde_json::to_vec(&config.body).unwrap_or_default();
                    self.link.publish_retained(&topics::config(id), body);
                }
            }
            ChangeKind::Firmware => match self.store.latest_firmware_job(id).await? {
                Some(job) if !is_terminal(&job.status) => {
                    let document = serde_json::to_vec(&job_document(&job)).unwrap_or_default();
                    self.link.publish_retained(&topics::firmware(id), document);
                }
                _ => self.link.clear_retained(&topics::firmware(id)),
            },
        }
        Ok(())
    }

    async fn prune(&self) {
        let before = time::OffsetDateTime::now_utc() - self.retention;
        match self.store.prune_changes(before).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "old change-feed rows deleted"),
            Err(e) => tracing::warn!(error = %e, "change feed not pruned"),
        }
    }
}

/// Whether a device in `state` has its configuration retained (as at start).
fn publishes_config(state: DeviceState) -> bool {
    matches!(state, DeviceState::Enrolling | DeviceState::Active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: i64) -> Change {
        Change {
            id,
            device_id: "d".into(),
            kind: ChangeKind::Config,
            origin: "o".into(),
            at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn ids(changes: &[Change]) -> Vec<i64> {
        changes.iter().map(|c| c.id).collect()
    }

    #[test]
    fn new_changes_are_taken_once() {
        let now = Instant::now();
        let mut cursor = Cursor::new(3);
        assert_eq!(cursor.read_after(), 3);
        let fresh = cursor.accept(vec![change(4), change(5)], now);
        assert_eq!(ids(&fresh), [4, 5]);
        assert!(cursor.accept(vec![change(5)], now).is_empty());
        assert_eq!(cursor.high(), 5);
        assert_eq!(cursor.read_after(), 5);
    }

    #[test]
    fn a_skipped_id_is_read_again_until_it_commits() {
        let now = Instant::now();
        let mut cursor = Cursor::new(0);
        // Id 2 belongs to a transaction that has not committed yet.
        assert_eq!(ids(&cursor.accept(vec![change(1), change(3)], now)), [1, 3]);
        assert_eq!(cursor.gaps(), 1);
        assert_eq!(cursor.read_after(), 1);
        // It commits: read again from 1, only 2 is new.
        let fresh = cursor.accept(vec![change(2), change(3), change(4)], now);
        assert_eq!(ids(&fresh), [2, 4]);
        assert_eq!(cursor.gaps(), 0);
        assert_eq!(cursor.read_after(), 4);
    }

    #[test]
    fn a_skipped_id_is_given_up_after_the_wait() {
        let now = Instant::now();
        let mut cursor = Cursor::new(0);
        cursor.accept(vec![change(2)], now);
        cursor.expire(now + Duration::from_secs(1), GAP_WAIT);
        assert_eq!(cursor.read_after(), 0);
        cursor.expire(now + GAP_WAIT, GAP_WAIT);
        assert_eq!(cursor.read_after(), 2);
        // A rolled-back id never comes; a late one after the wait is not applied.
        assert!(cursor.accept(vec![change(1)], now).is_empty());
    }

    #[test]
    fn a_sequence_jump_is_not_tracked_id_by_id() {
        let mut cursor = Cursor::new(10);
        let fresh = cursor.accept(vec![change(10 + MAX_GAPS + 2)], Instant::now());
        assert_eq!(fresh.len(), 1);
        assert_eq!(cursor.gaps(), 0);
    }
}
