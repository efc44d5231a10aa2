//! Refusals that name no one (a bare TCP connect-and-close, a failed or abandoned TLS
//! handshake, no client certificate, no CONNECT in time, a full gateway) are what a scanner or
//! a flood produces. They are counted in `onboard_auth_failures_total` one by one, but audited
//! in aggregate: one `unauthenticated_refusals` row per reason per window (a minute by default)
//! with the count and a few sample sources, and one live event with it. A refusal that names
//! a device or an admin is audited on its own, as before.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::identity::RefusalReason;
use crate::audit::Auditor;
use crate::store::AuditEvent;

/// The audit event name of an aggregated row.
pub const EVENT: &str = "unauthenticated_refusals";
/// The device id an aggregated row is filed under.
pub const NO_DEVICE: &str = "-";
/// Sources quoted per reason and window.
pub const SAMPLES: usize = 5;

/// Refusals of one reason in the current window.
#[derive(Debug)]
struct Count {
    count: u64,
    since: OffsetDateTime,
    samples: Vec<IpAddr>,
}

/// Anonymous refusals counted per reason until the window closes. The table has at most one
/// entry per [`RefusalReason`], however many connections are refused.
pub struct RefusalTally {
    window: Duration,
    audit: Auditor,
    counts: Mutex<HashMap<RefusalReason, Count>>,
}

impl RefusalTally {
    pub fn new(window: Duration, audit: Auditor) -> Arc<RefusalTally> {
        Arc::new(RefusalTally {
            window: window.max(Duration::from_millis(10)),
            audit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Count one refusal from `remote`.
    pub fn count(&self, reason: RefusalReason, remote: SocketAddr) {
        let mut counts = self.counts();
        let entry = counts.entry(reason).or_insert_with(|| Count {
            count: 0,
            since: OffsetDateTime::now_utc(),
            samples: Vec::new(),
        });
        entry.count += 1;
        // Past the samples a refusal costs one increment: nothing is formatted or allocated.
        let source = remote.ip().to_canonical();
        if entry.samples.len() < SAMPLES && !entry.samples.contains(&source) {
            entry.samples.push(source);
        }
    }

    /// Audit what the window counted (one row per reason) and start a new window.
    pub fn flush(&self) {
        let counted = std::mem::take(&mut *self.counts());
        let until = rfc3339(OffsetDateTime::now_utc());
        for (reason, c) in counted {
            self.audit.record(AuditEvent::new(
                NO_DEVICE,
                EVENT,
                "gateway",
                json!({
                    "reason": reason.as_str(),
                    "count": c.count,
                    "since": rfc3339(c.since),
                    "until": until,
                    "sample_sources": c.samples,
                }),
            ));
        }
    }

    /// Flush every window until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.window);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush(),
            }
        }
        self.flush();
    }

    fn counts(&self) -> MutexGuard<'_, HashMap<RefusalReason, Count>> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}
