//! Retries of transient failures: which failures are transient, the backoff between
//! attempts, and a checkout that skips pooled connections the server has dropped.
//!
//! Where a retry is safe is decided by the callers: reads always (they resume at their
//! keyset bound), appends because they are idempotent by event id, never a wrong
//! expected version (it is not transient) and never `append_in` (the caller's
//! transaction is gone with its connection).

use std::time::Duration;

use crate::error::{Error, Result};
use r2d2::Pool;

use crate::config::Config;
use crate::connect::Manager;

/// The longest wait between two attempts of a call, however many there were.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30);

/// The one backoff policy of the crate: every loop that waits before trying again (calls
/// retried after transient failures, the listener's reconnects, a subscription after an
/// error or while events are held back, a worker's handler retries, appends that lost a
/// race) waits `first × 2^n`, at most `max`, less a random part of up to a half, so that
/// clients do not retry in step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    /// Waits handed out since the last reset.
    attempt: u32,
}

impl Backoff {
    pub(crate) const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            attempt: 0,
        }
    }

    /// The wait before the next attempt; each call doubles the next one, up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.delay(self.attempt)
    }

    /// The wait before attempt number `attempt` (from 1), without changing the state.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        let full = self.first.saturating_mul(factor).min(self.max);
        full.mul_f64(0.5 + 0.5 * fastrand::f64())
    }

    /// Waits handed out since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts again from the first wait (after a success).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The retry state of one operation.
#[derive(Debug)]
pub(crate) struct Retry {
    operation: &'static str,
    max: u32,
    /// Its attempts count the retries since the last success.
    backoff: Backoff,
}

impl Retry {
    pub(crate) fn new(config: &Config, operation: &'static str) -> Retry {
        Retry {
            operation,
            max: config.max_retries,
            backoff: Backoff::new(config.retry_delay, MAX_DELAY),
        }
    }

    /// Whether a failure is being retried: then the pool's idle connections may be
    /// dead ones left by a restart, and are checked before use ([`sweep`]).
    pub(crate) fn is_retrying(&self) -> bool {
        self.backoff.attempts() > 0
    }

    /// Whether to try again after `e`. If so, waits the backoff first and counts the
    /// retry; if not (not transient, or no retries left) the caller returns `e`.
    pub(crate) fn again(&mut self, e: &Error) -> bool {
        if self.backoff.attempts() >= self.max || !e.is_transient() {
            return false;
        }
        let delay = self.backoff.next_delay();
        crate::metrics::retried(self.operation);
        tracing::warn!(
            operation = self.operation,
            attempt = self.backoff.attempts(),
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
        self.backoff.reset();
    }
}

/// Runs `f` and retries it after transient failures. Only for operations that are safe
/// to repeat: reads, and writes that are idempotent. Before each retry the pool's idle
/// connections are checked, so that dead ones left by a restart cost no attempt.
pub(crate) fn run<T>(
    config: &Config,
    pool: &Pool<Manager>,
    operation: &'static str,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut retry = Retry::new(config, operation);
    loop {
        match f() {
            Err(e) if retry.again(&e) => sweep(pool),
            result => return result,
        }
    }
}

/// Checks every idle pooled connection with an empty query and lets the pool drop the
/// dead ones. The live ones are held until the end, so each is checked once.
pub(crate) fn sweep(pool: &Pool<Manager>) {
    let mut alive = Vec::new();
    for _ in 0..2 * pool.max_size() {
        let Some(mut conn) = pool.try_get() else {
            break;
        };
        if answers(&mut conn) {
            alive.push(conn);
        }
    }
}

/// Whether `client` answers an empty query. One that does not is asked once more, so
/// that the client knows it is closed and the pool drops it when it comes back.
pub(crate) fn answers(client: &mut postgres::Client) -> bool {
    if client.simple_query("").is_ok() {
        return true;
    }
    let _ = client.simple_query("");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let base = Duration::from_millis(100);
        let b = Backoff::new(base, MAX_DELAY);
        for attempt in 1..=6 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        assert!(b.delay(40) <= MAX_DELAY);
        assert!(b.delay(40) >= MAX_DELAY / 2);
        // The jitter varies.
        let samples: std::collections::HashSet<_> = (0..20).map(|_| b.delay(3)).collect();
        assert!(samples.len() > 1);
        // The state: each wait doubles the next, a reset starts again.
        let mut b = Backoff::new(base, Duration::from_millis(250));
        let waits: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        assert!(waits[0] <= base && waits[3] <= Duration::from_millis(250));
        assert!(waits[3] >= Duration::from_millis(125));
        assert_eq!(b.attempts(), 4);
        b.reset();
        assert!(b.next_delay() <= base);
    }
}
