//! What a tiberius error means for the caller ([`classify`]), and how long to wait before
//! retrying a transient one ([`backoff_delay`]).

use std::time::Duration;

use rand::Rng;
use tiberius::error::{Error, IoErrorKind};

use super::batch;
use crate::store::StoreError;

/// First retry waits up to this long.
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// No retry waits longer than this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Server error numbers after which the same operation may well succeed a moment later.
///
/// - 1205: chosen as deadlock victim; 1222: lock request timeout.
/// - 4060: cannot open the database (restarting, failing over).
/// - 40197, 40501, 40613, 49918, 49919, 49920: Azure SQL failover, service busy, database
///   unavailable, too many operations.
/// - 10928, 10929: Azure SQL resource limits reached.
/// - 233, 10053, 10054, 10060: the connection was closed or reset by the server.
pub const TRANSIENT_CODES: &[u32] = &[
    1205, 1222, 4060, 40197, 40501, 40613, 49918, 49919, 49920, 10928, 10929, 233, 10053, 10054,
    10060,
];

/// Duplicate key in a unique index (2601) or a PRIMARY KEY / UNIQUE constraint (2627).
pub const DUPLICATE_KEY_CODES: &[u32] = &[2601, 2627];

/// How a server error number is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Duplicate,
    /// A guard of the store's own batches found the row changed ([`batch::CONFLICT`]).
    Conflict,
    /// A guard of the store's own batches found no row ([`batch::NOT_FOUND`]).
    Missing,
    Permanent,
}

/// Classify a server error number.
pub fn classify_code(code: u32) -> ErrorClass {
    if TRANSIENT_CODES.contains(&code) {
        ErrorClass::Transient
    } else if DUPLICATE_KEY_CODES.contains(&code) {
        ErrorClass::Duplicate
    } else if code == batch::CONFLICT {
        ErrorClass::Conflict
    } else if code == batch::NOT_FOUND {
        ErrorClass::Missing
    } else {
        ErrorClass::Permanent
    }
}

/// Map a tiberius error to the store's error: transient conditions become
/// [`StoreError::Unavailable`], duplicate keys [`StoreError::Conflict`], the rest
/// [`StoreError::Database`]. `context` names the operation (never a value).
pub fn classify(context: &str, err: &Error) -> StoreError {
    match err {
        Error::Server(token) => {
            let code = token.code();
            let message = format!("{context}: server error {code}: {}", token.message());
            match classify_code(code) {
                ErrorClass::Transient => StoreError::Unavailable(message),
                ErrorClass::Duplicate => StoreError::Conflict(message),
                ErrorClass::Conflict => {
                    StoreError::Conflict(format!("{context}: {}", token.message()))
                }
                ErrorClass::Missing => {
                    StoreError::NotFound(format!("{context}: {}", token.message()))
                }
                ErrorClass::Permanent => StoreError::Database(message),
            }
        }
        Error::Io { kind, message } => {
            let text = format!("{context}: i/o error: {message}");
            if io_kind_is_transient(*kind) {
                StoreError::Unavailable(text)
            } else {
                StoreError::Database(text)
            }
        }
        // A broken TLS session or a half-read packet: the connection is gone, a new one may work.
        Error::Tls(message) => StoreError::Unavailable(format!("{context}: tls: {message}")),
        Error::Protocol(message) => {
            StoreError::Unavailable(format!("{context}: protocol error: {message}"))
        }
        // Azure gateway redirect that was not followed: reconnecting follows it.
        Error::Routing { host, port } => {
            StoreError::Unavailable(format!("{context}: server redirected to {host}:{port}"))
        }
        Error::Conversion(message) | Error::Encoding(message) => {
            StoreError::Corrupt(format!("{context}: {message}"))
        }
        Error::Utf8 | Error::Utf16 => StoreError::Corrupt(format!("{context}: invalid text")),
        other => StoreError::Database(format!("{context}: {other}")),
    }
}

/// I/O failures worth a retry on a fresh connection. Permission or address problems are not.
pub fn io_kind_is_transient(kind: IoErrorKind) -> bool {
    !matches!(
        kind,
        IoErrorKind::PermissionDenied
            | IoErrorKind::InvalidInput
            | IoErrorKind::AddrNotAvailable
            | IoErrorKind::Unsupported
            | IoErrorKind::OutOfMemory
    )
}

/// Whether the connection that produced `err` must not be reused: anything but a server error
/// token (after which tiberius has read the full response and the session is intact).
pub fn breaks_connection(err: &Error) -> bool {
    !matches!(
        err,
        Error::Server(_) | Error::Conversion(_) | Error::Utf8 | Error::Utf16
    )
}

/// Upper bound of the wait before retry number `attempt` (0-based): `BASE * 2^attempt`,
/// capped at [`BACKOFF_CAP`].
pub fn backoff_ceiling(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
}

/// "Full jitter": a uniform wait in `[0, backoff_ceiling(attempt)]`.
pub fn backoff_delay(attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(attempt).as_micros() as u64;
    Duration::from_micros(rng.gen_range(0..=ceiling))
}

/// What to do after one attempt of an operation.
#[derive(Debug)]
pub enum Step<T> {
    /// Return this to the caller.
    Done(Result<T, StoreError>),
    /// Wait this long, then run the whole operation again.
    RetryAfter(Duration),
}

/// Retry bookkeeping for one operation: transient failures ([`StoreError::Unavailable`]) are
/// retried up to `max_retries` times; then the last one is returned, still `Unavailable`,
/// with the number of attempts added. Every other outcome is returned as is.
#[derive(Debug, Clone)]
pub struct Retry {
    op: &'static str,
    max_retries: u32,
    attempt: u32,
}

impl Retry {
    pub fn new(op: &'static str, max_retries: u32) -> Self {
        Retry {
            op,
            max_retries,
            attempt: 0,
        }
    }

    /// Retries done so far.
    pub fn retries(&self) -> u32 {
        self.attempt
    }

    /// Decide what follows `result`.
    pub fn step<T>(&mut self, result: Result<T, StoreError>, rng: &mut impl Rng) -> Step<T> {
        match result {
            Err(StoreError::Unavailable(reason)) if self.attempt < self.max_retries => {
                let delay = backoff_delay(self.attempt, rng);
                tracing::debug!(op = self.op, attempt = self.attempt, ?delay, %reason, "transient store error; retrying");
                self.attempt += 1;
                Step::RetryAfter(delay)
            }
            Err(StoreError::Unavailable(reason)) if self.attempt > 0 => {
                Step::Done(Err(StoreError::Unavailable(format!(
                    "{reason} (gave up after {} attempts)",
                    self.attempt + 1
                ))))
            }
            other => Step::Done(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn transient_codes() {
        for code in [
            1205, 1222, 40613, 40197, 40501, 49918, 49919, 49920, 4060, 10928, 10929,
        ] {
            assert_eq!(classify_code(code), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn duplicate_and_permanent_codes() {
        assert_eq!(classify_code(2627), ErrorClass::Duplicate);
        assert_eq!(classify_code(2601), ErrorClass::Duplicate);
        assert_eq!(classify_code(51001), ErrorClass::Conflict);
        assert_eq!(classify_code(51002), ErrorClass::Missing);
        assert_eq!(classify_code(50000), ErrorClass::Permanent);
        for code in [547, 8152, 208, 18456, 102, 515, 0] {
            assert_eq!(classify_code(code), ErrorClass::Permanent, "{code}");
        }
    }

    fn io(kind: IoErrorKind) -> Error {
        Error::from(std::io::Error::new(kind, "boom"))
    }

    #[test]
    fn io_errors_are_transient_except_configuration_ones() {
        for kind in [
            IoErrorKind::ConnectionReset,
            IoErrorKind::ConnectionAborted,
            IoErrorKind::ConnectionRefused,
            IoErrorKind::BrokenPipe,
            IoErrorKind::TimedOut,
            IoErrorKind::UnexpectedEof,
            IoErrorKind::NotConnected,
        ] {
            let e = classify("ping", &io(kind));
            assert!(matches!(e, StoreError::Unavailable(_)), "{kind:?}: {e:?}");
            assert!(breaks_connection(&io(kind)));
        }
        let e = classify("ping", &io(IoErrorKind::PermissionDenied));
        assert!(matches!(e, StoreError::Database(_)), "{e:?}");
    }

    #[test]
    fn other_client_errors() {
        let e = classify("q", &Error::Protocol("bad packet".into()));
        assert!(e.is_transient());
        let e = classify("q", &Error::Tls("handshake".into()));
        assert!(e.is_transient());
        let e = classify(
            "q",
            &Error::Routing {
                host: "h".into(),
                port: 1,
            },
        );
        assert!(e.is_transient());
        let e = classify("q", &Error::Conversion("nope".into()));
        assert!(matches!(e, StoreError::Corrupt(_)));
        assert!(!breaks_connection(&Error::Conversion("nope".into())));
        let e = classify("q", &Error::BulkInput("x".into()));
        assert!(matches!(e, StoreError::Database(_)));
        assert!(classify("device", &Error::Utf16)
            .to_string()
            .contains("device"));
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        assert_eq!(backoff_ceiling(0), Duration::from_millis(50));
        assert_eq!(backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(5), Duration::from_millis(1600));
        assert_eq!(backoff_ceiling(6), BACKOFF_CAP);
        assert_eq!(backoff_ceiling(40), BACKOFF_CAP);
        assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn backoff_delay_stays_within_bounds_and_jitters() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..200 {
                let d = backoff_delay(attempt, &mut rng);
                assert!(d <= backoff_ceiling(attempt), "{attempt}: {d:?}");
                seen.insert(d);
            }
            assert!(seen.len() > 10, "no jitter at attempt {attempt}");
        }
    }

    #[test]
    fn retry_transient_errors_up_to_the_limit() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut retry = Retry::new("op", 3);
        for attempt in 0..3 {
            match retry.step::<()>(Err(StoreError::Unavailable("deadlock".into())), &mut rng) {
                Step::RetryAfter(d) => assert!(d <= backoff_ceiling(attempt)),
                Step::Done(r) => panic!("gave up early: {r:?}"),
            }
        }
        assert_eq!(retry.retries(), 3);
        match retry.step::<()>(Err(StoreError::Unavailable("deadlock".into())), &mut rng) {
            Step::Done(Err(StoreError::Unavailable(m))) => {
                assert!(m.contains("deadlock") && m.contains("4 attempts"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_never_repeats_permanent_errors_or_successes() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut retry = Retry::new("op", 3);
        assert!(matches!(retry.step(Ok(5), &mut rng), Step::Done(Ok(5))));
        for e in [
            StoreError::Conflict("dup".into()),
            StoreError::Database("syntax".into()),
            StoreError::NotFound("x".into()),
        ] {
            assert!(matches!(
                retry.step::<()>(Err(e), &mut rng),
                Step::Done(Err(_))
            ));
        }
        assert_eq!(retry.retries(), 0);
        // with no retries allowed, a transient error is returned unchanged
        let mut retry = Retry::new("op", 0);
        match retry.step::<()>(Err(StoreError::Unavailable("gone".into())), &mut rng) {
            Step::Done(Err(StoreError::Unavailable(m))) => assert_eq!(m, "gone"),
            other => panic!("{other:?}"),
        }
    }
}
