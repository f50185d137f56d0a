//! Health: [`Store::health_check`](crate::Store::health_check), the connection state, and the optional background
//! check that reports outages through [`Store::connection_events`](crate::Store::connection_events).

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::error::{Error, Result};
use crate::listener::ListenerState;
use crate::migrate;
use r2d2::Pool;

use crate::connect::Manager;
use crate::tls::Connector;

/// What [`Store::health_check`](crate::Store::health_check) found.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Whether the server answered a query.
    pub reachable: bool,
    /// How long the check took (checking out or opening a connection, plus one round
    /// trip), when the server answered.
    pub latency: Option<Duration>,
    /// The schema version recorded in the database (0: not migrated yet), when the
    /// server answered.
    pub schema_version: Option<i64>,
    /// Why the server did not answer.
    pub error: Option<String>,
    /// The connection pool's state at the end of the check.
    pub pool: PoolStatus,
    /// The state of the notification listener, when the store has one.
    pub listener: Option<ListenerState>,
    /// What has held this store's subscriptions (and workers) back the longest, if an
    /// open appending transaction holds one back now: by whom and for how long.
    pub held_back: Option<crate::HeldBack>,
    /// When the check ended.
    pub checked_at: SystemTime,
}

impl HealthReport {
    /// Whether the server answered and the schema is migrated to the version this
    /// library expects.
    pub fn is_ready(&self) -> bool {
        self.reachable && self.schema_version == Some(crate::SCHEMA_VERSION)
    }
}

/// The state of the connection pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Connections open, in use or idle.
    pub connections: u32,
    /// Connections open and idle.
    pub idle_connections: u32,
    /// The most connections the pool opens ([`Config::max_connections`](crate::Config::max_connections)).
    pub max_size: u32,
}

/// A change of the connection state, sent to every [`Store::connection_events`](crate::Store::connection_events) receiver.
/// Each outage gives one `Lost` and, when it ends, one `Restored`, however many calls
/// fail in between.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// A health check found the server unreachable after it had been reachable.
    Lost {
        /// When the check failed.
        at: SystemTime,
        /// Why, as the check saw it.
        error: String,
    },
    /// A health check reached the server again after an outage.
    Restored {
        /// When the check succeeded.
        at: SystemTime,
        /// How long the outage lasted, from the first failed check to this one.
        down_for: Duration,
    },
}

#[derive(Debug)]
enum Link {
    Up,
    Down { since: Instant },
}

/// The connection state of one store, and what is needed to check it: a connection of
/// its own when the pool has no idle one (so that a busy pool does not look like an
/// outage).
pub(crate) struct Monitor {
    pg: postgres::Config,
    connector: Connector,
    schema: String,
    migrations_table: String,
    link: Mutex<Link>,
    listeners: Mutex<Vec<Sender<ConnectionEvent>>>,
    /// Dropped with the store, which ends the background thread at once.
    stop: Mutex<Option<Sender<()>>>,
    /// A probe whose check gave up waiting for it: the next check waits for it rather
    /// than starting another on a server that does not answer.
    pending: Mutex<Option<Receiver<Result<i64>>>>,
}

impl Monitor {
    pub(crate) fn new(
        pg: postgres::Config,
        connector: Connector,
        schema: &str,
        migrations_table: &str,
    ) -> Monitor {
        Monitor {
            pg,
            connector,
            schema: schema.to_string(),
            migrations_table: migrations_table.to_string(),
            link: Mutex::new(Link::Up),
            listeners: Mutex::new(Vec::new()),
            stop: Mutex::new(None),
            pending: Mutex::new(None),
        }
    }

    /// A new connection outside the pool, or an error naming the server and the cause,
    /// within the connect timeout.
    pub(crate) fn connect(&self) -> Result<postgres::Client> {
        crate::connect::open(&self.pg, &self.connector)
    }

    /// Updates the state with a check's result and tells the listeners of a change.
    fn observe(&self, report: &HealthReport) {
        let event = {
            let mut link = self.link.lock().unwrap();
            match (&*link, report.reachable) {
                (Link::Up, false) => {
                    *link = Link::Down {
                        since: Instant::now(),
                    };
                    Some(ConnectionEvent::Lost {
                        at: report.checked_at,
                        error: report.error.clone().unwrap_or_default(),
                    })
                }
                (Link::Down { since }, true) => {
                    let down_for = since.elapsed();
                    *link = Link::Up;
                    Some(ConnectionEvent::Restored {
                        at: report.checked_at,
                        down_for,
                    })
                }
                _ => None,
            }
        };
        let Some(event) = event else { return };
        match &event {
            ConnectionEvent::Lost { error, .. } => {
                crate::metrics::connection_lost();
                tracing::error!(target: "pg_eventstore", %error, "pg-eventstore: connection to PostgreSQL lost");
            }
            ConnectionEvent::Restored { down_for, .. } => {
                tracing::info!(
                    target: "pg_eventstore",
                    down_for_ms = down_for.as_millis() as u64,
                    "pg-eventstore: connection to PostgreSQL restored"
                );
            }
        }
        self.listeners
            .lock()
            .unwrap()
            .retain(|tx| tx.send(event.clone()).is_ok());
    }
}

impl Monitor {
    /// A health check of the store with this `pool` (see [`Store::health_check`](crate::Store::health_check)).
    pub(crate) fn check(
        &self,
        pool: &Pool<Manager>,
        listener: Option<ListenerState>,
        held_back: Option<crate::HeldBack>,
    ) -> HealthReport {
        let started = Instant::now();
        let outcome = self.probe(pool);
        let latency = started.elapsed();
        let state = pool.state();
        let (schema_version, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let report = HealthReport {
            reachable: error.is_none(),
            latency: error.is_none().then_some(latency),
            schema_version,
            error,
            pool: PoolStatus {
                connections: state.connections,
                idle_connections: state.idle_connections,
                max_size: pool.max_size(),
            },
            listener,
            held_back,
            checked_at: SystemTime::now(),
        };
        self.observe(&report);
        report
    }

    /// A new receiver of the outage events (see [`Store::connection_events`](crate::Store::connection_events)).
    pub(crate) fn events(&self) -> Receiver<ConnectionEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.listeners.lock().unwrap().push(tx);
        rx
    }

    /// The schema version, or why the server did not tell it. The probe runs on a
    /// thread of its own and is waited for at most twice the connect timeout (a new
    /// connection, then one round trip): a server that accepts connections but stopped
    /// answering is reported, not waited for. The probe goes on waiting in the background
    /// and the next check waits for it instead of starting another.
    fn probe(&self, pool: &Pool<Manager>) -> std::result::Result<i64, String> {
        let monitor = self;
        let mut pending = monitor.pending.lock().unwrap();
        let rx = match pending.take() {
            Some(rx) => rx,
            None => {
                let probe = Probe {
                    pool: pool.clone(),
                    pg: monitor.pg.clone(),
                    connector: crate::tls::clone(&monitor.connector),
                    schema: monitor.schema.clone(),
                    migrations_table: monitor.migrations_table.clone(),
                };
                let (tx, rx) = crossbeam_channel::bounded(1);
                thread::Builder::new()
                    .name("pg-eventstore-probe".into())
                    .spawn(move || {
                        let _ = tx.send(probe.run());
                    })
                    .map_err(|e| format!("cannot start the health check thread: {e}"))?;
                rx
            }
        };
        let timeout = monitor
            .pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let limit = 2 * timeout;
        match rx.recv_timeout(limit) {
            Ok(result) => result.map_err(|e| e.report()),
            Err(RecvTimeoutError::Timeout) => {
                *pending = Some(rx);
                Err(format!(
                    "no answer from {} within {limit:?}: the server accepts connections but \
                     does not answer queries",
                    crate::connect::target(&monitor.pg)
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err("the health check thread ended without an answer".into())
            }
        }
    }
}

/// What a health check's probe needs, apart from the store (so that a probe stuck on a
/// server that does not answer keeps nothing but the pool alive).
struct Probe {
    pool: r2d2::Pool<crate::Manager>,
    pg: postgres::Config,
    connector: Connector,
    schema: String,
    migrations_table: String,
}

impl Probe {
    /// The schema version, through an idle pooled connection or a new one.
    fn run(&self) -> Result<i64> {
        if let Some(mut conn) = self.pool.try_get() {
            match migrate::current_version(&mut *conn, &self.schema, &self.migrations_table) {
                Ok(v) => return Ok(v),
                // Poll the broken client once more so the pool drops it, clear out
                // the other dead idle connections (after a restart they all are), and
                // try a connection of our own.
                Err(_) => {
                    let _ = conn.simple_query("");
                    drop(conn);
                    crate::retry::sweep(&self.pool);
                }
            }
        }
        let mut client = crate::connect::open(&self.pg, &self.connector)?;
        migrate::current_version(&mut client, &self.schema, &self.migrations_table)
    }
}

/// Starts the background check every `interval` of the store with this `pool`. The
/// thread holds the monitor only weakly and ends when the store (its only strong owner)
/// is dropped: then the stop channel disconnects at once.
pub(crate) fn start(monitor: &Arc<Monitor>, interval: Duration, pool: Pool<Manager>) -> Result<()> {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    *monitor.stop.lock().unwrap() = Some(stop_tx);
    let weak = Arc::downgrade(monitor);
    thread::Builder::new()
        .name("pg-eventstore-health".into())
        .spawn(move || loop {
            match stop_rx.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let Some(monitor) = weak.upgrade() else {
                return;
            };
            monitor.check(&pool, None, None);
        })
        .map_err(|e| Error::Config(format!("cannot start the health check thread: {e}")))?;
    Ok(())
}
