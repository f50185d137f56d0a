//! Observability: `tracing` spans and `metrics` counters and histograms.
//!
//! The store only talks to the `tracing` and `metrics` facades; nothing is exported
//! unless the program installs a subscriber or recorder (see `OPERATIONS.md`). Spans and
//! log lines carry stream ids, counts and durations, never event data or metadata.
//!
//! Metric names (all prefixed `pg_eventstore_`):
//!
//! | name | kind | what |
//! |---|---|---|
//! | `events_appended_total` | counter | events written by appends that returned (label `mode`: `store`, committed; `in_transaction`, counted as the call returns, before your commit or rollback) |
//! | `append_duration_seconds` | histogram | time of one append call, retries included |
//! | `append_conflicts_total` | counter | appends refused for a wrong expected version |
//! | `events_read_total` | counter | events yielded by reads |
//! | `pool_wait_seconds` | histogram | time spent waiting for a pooled connection |
//! | `pool_timeouts_total` | counter | waits for a pooled connection that timed out |
//! | `connections_opened_total` | counter | connections the pool opened |
//! | `retries_total` | counter | retries of transient failures (label `operation`) |
//! | `connection_lost_total` | counter | outages seen by health checks |
//! | `subscription_events_total` | counter | events delivered by subscriptions |
//! | `subscription_lag_seconds` | histogram | from an event's `recorded_at` (its transaction's start) to its delivery by a subscription |
//! | `listener_reconnects_total` | counter | reconnects of the notification listener |
//! | `feed_held_back_seconds` | gauge | how long this store's subscriptions (and workers) have been held back by an open appending transaction (0: not held) |
//! | `group_leases_total` | counter | partitions a consumer group member took, handed over or lost (labels `processor`, `change`: `acquired`, `released`, `lost`) |
//! | `group_partitions` | gauge | partitions a consumer group member of this process holds (labels `processor`, `member`) |
//! | `group_revoked_events_total` | counter | events a consumer group member dropped unhandled because their partition's lease was gone (label `processor`) |
//! | `worker_errors_total` | counter | errors a worker absorbed and went on after (labels `processor`, and `kind`: `subscription` for a failed read of its subscription, `handler` for a handler call that failed and is retried, `parked` for an event parked in the dead-letter table, `lock_lost` for a live worker whose processor lock's session ended (it stopped its handlers and takes the lock again), `batch` for a transactional handler's group of events whose transaction failed (its events are then handled one by one, each with the worker's retries); a consumer group member also counts `heartbeat` for a failed renewal and `group` for a failed lease or read statement, both retried); retried checkpoint writes count in `retries_total` with `operation` `save_checkpoint` |

use std::time::Instant;

use ::metrics::{counter, histogram};
use tracing::field::Empty;
use tracing::Span;

use crate::error::Result;
use crate::event::AppendResult;

pub(crate) const EVENTS_APPENDED: &str = "pg_eventstore_events_appended_total";
pub(crate) const APPEND_DURATION: &str = "pg_eventstore_append_duration_seconds";
pub(crate) const APPEND_CONFLICTS: &str = "pg_eventstore_append_conflicts_total";
pub(crate) const EVENTS_READ: &str = "pg_eventstore_events_read_total";
pub(crate) const POOL_WAIT: &str = "pg_eventstore_pool_wait_seconds";
pub(crate) const POOL_TIMEOUTS: &str = "pg_eventstore_pool_timeouts_total";
pub(crate) const CONNECTIONS_OPENED: &str = "pg_eventstore_connections_opened_total";
pub(crate) const RETRIES: &str = "pg_eventstore_retries_total";
pub(crate) const CONNECTION_LOST: &str = "pg_eventstore_connection_lost_total";
pub(crate) const SUBSCRIPTION_LAG: &str = "pg_eventstore_subscription_lag_seconds";
pub(crate) const SUBSCRIPTION_EVENTS: &str = "pg_eventstore_subscription_events_total";
pub(crate) const LISTENER_RECONNECTS: &str = "pg_eventstore_listener_reconnects_total";
pub(crate) const FEED_HELD_BACK: &str = "pg_eventstore_feed_held_back_seconds";
pub(crate) const WORKER_ERRORS: &str = "pg_eventstore_worker_errors_total";
pub(crate) const GROUP_LEASES: &str = "pg_eventstore_group_leases_total";
pub(crate) const GROUP_PARTITIONS: &str = "pg_eventstore_group_partitions";
pub(crate) const GROUP_REVOKED: &str = "pg_eventstore_group_revoked_events_total";

/// Runs one append (`mode`: `store` or `in_transaction`) in a span, and records its
/// outcome and latency.
pub(crate) fn append(
    mode: &'static str,
    stream: &str,
    count: usize,
    f: impl FnOnce() -> Result<AppendResult>,
) -> Result<AppendResult> {
    let span = tracing::info_span!(
        "pg_eventstore.append",
        mode,
        stream,
        count,
        duration_ms = Empty,
        outcome = Empty,
    );
    let _entered = span.enter();
    let started = Instant::now();
    let result = f();
    let elapsed = started.elapsed();
    span.record("duration_ms", elapsed.as_secs_f64() * 1000.0);
    let outcome = match &result {
        Ok(r) if r.was_duplicate => "duplicate",
        Ok(_) => {
            counter!(EVENTS_APPENDED, "mode" => mode).increment(count as u64);
            "written"
        }
        Err(e) if e.is_wrong_expected_version() => {
            counter!(APPEND_CONFLICTS).increment(1);
            "conflict"
        }
        Err(_) => "error",
    };
    span.record("outcome", outcome);
    histogram!(APPEND_DURATION).record(elapsed);
    result
}

/// Runs a migration in a span.
pub(crate) fn migration<T>(
    schema: &str,
    f: impl FnOnce() -> Result<T>,
    applied: impl Fn(&T) -> usize,
) -> Result<T> {
    let span = tracing::info_span!(
        "pg_eventstore.migrate",
        schema,
        applied = Empty,
        duration_ms = Empty,
    );
    let _entered = span.enter();
    let started = Instant::now();
    let result = f();
    span.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
    if let Ok(r) = &result {
        span.record("applied", applied(r));
    }
    result
}

/// Counts one retry of `operation`.
pub(crate) fn retried(operation: &'static str) {
    counter!(RETRIES, "operation" => operation).increment(1);
}

/// Counts an outage found by a health check.
pub(crate) fn connection_lost() {
    counter!(CONNECTION_LOST).increment(1);
}

/// Records one event delivered by a subscription, and how long after it was recorded.
pub(crate) fn subscription_delivered(recorded_at: std::time::SystemTime) {
    counter!(SUBSCRIPTION_EVENTS).increment(1);
    if let Ok(lag) = recorded_at.elapsed() {
        histogram!(SUBSCRIPTION_LAG).record(lag.as_secs_f64());
    }
}

/// Counts one reconnect of the notification listener.
pub(crate) fn listener_reconnected() {
    counter!(LISTENER_RECONNECTS).increment(1);
}

/// Counts one error a worker absorbed (`kind`: see the table above).
pub(crate) fn worker_error(processor: &str, kind: &'static str) {
    counter!(WORKER_ERRORS, "processor" => processor.to_string(), "kind" => kind).increment(1);
}

/// Counts partitions a consumer group member took, handed over or lost (`change`).
pub(crate) fn group_leases(processor: &str, change: &'static str, n: u64) {
    counter!(GROUP_LEASES, "processor" => processor.to_string(), "change" => change).increment(n);
}

/// The partitions a consumer group member of this process holds now.
pub(crate) fn group_partitions(processor: &str, member: uuid::Uuid, n: usize) {
    ::metrics::gauge!(GROUP_PARTITIONS, "processor" => processor.to_string(), "member" => member.to_string())
        .set(n as f64);
}

/// Counts events a consumer group member dropped because their partition's lease was
/// gone (the fence).
pub(crate) fn group_revoked(processor: &str, n: u64) {
    counter!(GROUP_REVOKED, "processor" => processor.to_string()).increment(n);
}

/// How many yielded events a read counts before it reports them.
const READ_FLUSH: u64 = 1000;

/// The span and counts of one read ([`Events`](crate::Events)). The span covers the
/// iterator's life; `count` and `duration_ms` are recorded when it is dropped.
#[derive(Debug)]
pub(crate) struct ReadOps {
    span: Span,
    started: Instant,
    yielded: u64,
    unreported: u64,
}

impl ReadOps {
    pub(crate) fn new(kind: &'static str, stream: Option<&str>) -> ReadOps {
        ReadOps {
            span: tracing::info_span!(
                "pg_eventstore.read",
                kind,
                stream,
                count = Empty,
                duration_ms = Empty,
            ),
            started: Instant::now(),
            yielded: 0,
            unreported: 0,
        }
    }

    /// The read's span, to enter while it talks to the server.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    pub(crate) fn yielded(&mut self) {
        self.yielded += 1;
        self.unreported += 1;
        if self.unreported >= READ_FLUSH {
            self.report();
        }
    }

    fn report(&mut self) {
        if self.unreported > 0 {
            counter!(EVENTS_READ).increment(self.unreported);
            self.unreported = 0;
        }
    }
}

impl Drop for ReadOps {
    fn drop(&mut self) {
        self.report();
        self.span.record("count", self.yielded);
        self.span
            .record("duration_ms", self.started.elapsed().as_secs_f64() * 1000.0);
    }
}

/// r2d2 events: clears the recorded connect error once a connection opens, and records
/// pool waits and timeouts.
#[derive(Debug)]
pub(crate) struct PoolEvents {
    last_connect_error: crate::connect::LastConnectError,
}

impl PoolEvents {
    pub(crate) fn new(last_connect_error: crate::connect::LastConnectError) -> PoolEvents {
        PoolEvents { last_connect_error }
    }
}

impl r2d2::HandleEvent for PoolEvents {
    fn handle_acquire(&self, _event: r2d2::event::AcquireEvent) {
        *self.last_connect_error.lock().unwrap() = None;
        counter!(CONNECTIONS_OPENED).increment(1);
    }

    fn handle_checkout(&self, event: r2d2::event::CheckoutEvent) {
        histogram!(POOL_WAIT).record(event.duration());
    }

    fn handle_timeout(&self, _event: r2d2::event::TimeoutEvent) {
        counter!(POOL_TIMEOUTS).increment(1);
    }
}
