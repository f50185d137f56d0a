//! Retries of transient failures: which failures are transient, the backoff between
//! attempts, and a checkout that skips pooled connections the server has dropped.
//!
//! Where a retry is safe is decided by the callers: reads always (they resume at their
//! keyset bound), appends because they are idempotent by event id, never a wrong
//! expected version (it is not transient) and never `append_in` (the caller's
//! transaction is gone with its connection).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::error::SqlState;

use crate::error::{Error, Result};
use crate::store::{Conn, Store};

/// The longest wait between two attempts, however many there were.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Whether `e` is worth another attempt (see [`Config::max_retries`](crate::Config::max_retries)).
pub(crate) fn is_transient(e: &Error) -> bool {
    match e {
        Error::Postgres(e) | Error::Connect { source: e, .. } => is_transient_pg(e),
        // The server did not answer in time: it may be restarting or overloaded.
        Error::ConnectTimeout { .. } => true,
        // No connection could be opened in time (the pool was not merely exhausted: that
        // leaves no connect error): the server is down or restarting.
        Error::Pool {
            last_connect_error: Some(_),
            ..
        } => true,
        _ => false,
    }
}

fn is_transient_pg(e: &postgres::Error) -> bool {
    if let Some(code) = e.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
            // Class 08: connection exceptions.
            || code.code().starts_with("08");
    }
    if e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::TimedOut
            );
        }
        source = s.source();
    }
    false
}

/// The retry state of one operation.
#[derive(Debug)]
pub(crate) struct Retry {
    operation: &'static str,
    max: u32,
    base: Duration,
    /// Retries since the last success.
    attempt: u32,
}

impl Retry {
    pub(crate) fn new(store: &Store, operation: &'static str) -> Retry {
        let config = &store.inner.config;
        Retry {
            operation,
            max: config.max_retries,
            base: config.retry_delay,
            attempt: 0,
        }
    }

    /// A pooled connection. On a retry, pooled connections are checked first: after a
    /// server restart or a killed backend the pool still holds dead ones, and each
    /// would otherwise cost an attempt.
    pub(crate) fn conn(&self, store: &Store) -> Result<Conn> {
        if self.attempt == 0 {
            return store.conn();
        }
        for _ in 0..store.inner.pool.max_size() {
            let mut conn = store.conn()?;
            if conn.simple_query("").is_ok() {
                return Ok(conn);
            }
            // Polled once more so the client knows it is closed; dropped here, the pool
            // discards it instead of handing it out again.
            let _ = conn.simple_query("");
        }
        store.conn()
    }

    /// Whether to try again after `e`. If so, waits the backoff first and counts the
    /// retry; if not (not transient, or no retries left) the caller returns `e`.
    pub(crate) fn again(&mut self, e: &Error) -> bool {
        if self.attempt >= self.max || !is_transient(e) {
            return false;
        }
        self.attempt += 1;
        let delay = backoff(self.base, self.attempt);
        crate::metrics::retried(self.operation);
        tracing::warn!(
            operation = self.operation,
            attempt = self.attempt,
            max_retries = self.max,
            delay_ms = delay.as_millis() as u64,
            error = %e.report(),
            "pg-eventstore: transient failure, retrying"
        );
        std::thread::sleep(delay);
        true
    }

    /// Forgets earlier failures: a long read gets its full budget for each outage.
    pub(crate) fn succeeded(&mut self) {
        self.attempt = 0;
    }
}

/// Runs `f` and retries it after transient failures. Only for operations that are safe
/// to repeat: reads, and writes that are idempotent. Before each retry the pool's idle
/// connections are checked, so that dead ones left by a restart cost no attempt.
pub(crate) fn run<T>(
    store: &Store,
    operation: &'static str,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut retry = Retry::new(store, operation);
    loop {
        match f() {
            Err(e) if retry.again(&e) => sweep(&store.inner.pool),
            result => return result,
        }
    }
}

/// Checks every idle pooled connection with an empty query and lets the pool drop the
/// dead ones. The live ones are held until the end, so each is checked once.
pub(crate) fn sweep(pool: &r2d2::Pool<crate::Manager>) {
    let mut alive = Vec::new();
    for _ in 0..2 * pool.max_size() {
        let Some(mut conn) = pool.try_get() else {
            break;
        };
        if conn.simple_query("").is_ok() {
            alive.push(conn);
        } else {
            // Polled once more so the client knows it is closed; the pool then drops it.
            let _ = conn.simple_query("");
        }
    }
}

/// Before retry number `attempt` (from 1): `base × 2^(attempt-1)`, at most
/// [`MAX_DELAY`], less a random part of up to a half.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(factor).min(MAX_DELAY);
    full.mul_f64(0.5 + 0.5 * random_fraction())
}

/// A number in `[0, 1)`, random enough to keep clients from retrying in step.
fn random_fraction() -> f64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let base = Duration::from_millis(100);
        for attempt in 1..=6 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let d = backoff(base, attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        assert!(backoff(base, 40) <= MAX_DELAY);
        assert!(backoff(base, 40) >= MAX_DELAY / 2);
        // The jitter varies.
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(base, 3)).collect();
        assert!(samples.len() > 1);
    }

    #[test]
    fn what_is_transient() {
        assert!(!is_transient(&Error::InvalidInput("x".into())));
        assert!(!is_transient(&Error::WrongExpectedVersion {
            stream: "s".into(),
            expected: crate::ExpectedVersion::NoStream,
            actual: crate::error::ActualVersion::Exact(1),
        }));
        // Exhaustion is not retried: it would only queue more callers.
        assert!(!is_transient(&Error::Pool {
            message: "exhausted".into(),
            last_connect_error: None,
        }));
        assert!(is_transient(&Error::Pool {
            message: "cannot open".into(),
            last_connect_error: Some(std::sync::Arc::new(Error::ConnectTimeout {
                target: "h:5432".into(),
                timeout: Duration::from_secs(1),
                connected: true,
            })),
        }));
    }

    #[test]
    fn refused_connection_is_transient() {
        let e = crate::error::tests::refused();
        assert!(is_transient_pg(&e), "{e:?}");
    }
}
