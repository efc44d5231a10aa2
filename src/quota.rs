//! How many credentials one device may be issued: enrollments and renewals together, per
//! rolling hour (`[limits] credentials_per_device_per_hour`, default 10). Counted from the
//! credentials the store holds, so every gateway on one database sees the same count and a
//! restart forgets nothing; one device can never use up the gateway-wide rate of the others.

use time::{Duration, OffsetDateTime};

use crate::store::Credential;

/// The window the limit counts over.
pub const WINDOW: Duration = Duration::HOUR;

/// Credentials one device may be issued per [`WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueQuota {
    pub per_window: u32,
}

impl IssueQuota {
    /// `Ok` when a device that holds `issued` may be issued one more credential at `now`;
    /// otherwise the milliseconds until it may.
    pub fn check(&self, issued: &[Credential], now: OffsetDateTime) -> Result<(), u64> {
        let limit = usize::try_from(self.per_window.max(1)).unwrap_or(usize::MAX);
        let mut recent: Vec<OffsetDateTime> = issued
            .iter()
            .map(|c| c.created_at)
            .filter(|at| *at > now - WINDOW)
            .collect();
        if recent.len() < limit {
            return Ok(());
        }
        recent.sort_unstable();
        // One more may be issued once the oldest of the newest `limit` leaves the window.
        let frees_at = recent[recent.len() - limit] + WINDOW;
        let wait = (frees_at - now).whole_milliseconds().max(1);
        Err(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CredentialKind;

    fn issued_at(at: OffsetDateTime) -> Credential {
        Credential {
            serial: "s".into(),
            fingerprint: Vec::new(),
            device_id: "d".into(),
            kind: CredentialKind::Certificate,
            password_hash: None,
            not_after: None,
            created_at: at,
            activated_at: None,
            revoked_at: None,
            revoke_reason: None,
        }
    }

    #[test]
    fn counts_the_last_hour_only_and_says_when_one_frees_up() {
        let now = OffsetDateTime::now_utc();
        let quota = IssueQuota { per_window: 2 };
        let old = issued_at(now - Duration::minutes(61));
        let a = issued_at(now - Duration::minutes(50));
        let b = issued_at(now - Duration::minutes(10));
        assert_eq!(quota.check(&[old.clone(), a.clone()], now), Ok(()));
        let wait = quota.check(&[old, b, a], now).expect_err("limited");
        assert_eq!(
            wait,
            10 * 60 * 1000,
            "the 50-minute-old one leaves in 10 minutes"
        );
    }
}
