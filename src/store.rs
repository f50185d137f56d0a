//! The [`Store`]: a connection pool plus the statements of one schema.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row, Statement};
use r2d2::PooledConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::config::Config;
use crate::connect::{LastConnectError, Manager};
use crate::error::{Error, Result};
use crate::event::{validate_stream_id, AppendResult, EventData, Json, JsonbParam, RecordedEvent};
use crate::listener::{AppendPlan, Batch, Hub, Inline, ListenerState};
use crate::migrate::{self, MigrationReport, SCHEMA_VERSION};
use crate::retry::{Backoff, Retry};
use crate::sql::{Sql, MAX_EVENTS_PER_TRANSACTION};
use crate::version::{ActualVersion, ExpectedVersion};

pub(crate) type Conn = PooledConnection<Manager>;

/// How often an append that lost a race on a unique constraint is re-run. The re-run sees
/// the winner, so it either succeeds (`Any`, or a repeat of the same ids) or reports the
/// conflict; only a stream under constant contention with `Any` needs more than one.
pub(crate) const APPEND_ATTEMPTS: usize = 30;

/// An event store on one PostgreSQL schema. Cheap to clone: clones share the pool.
///
/// ```no_run
/// use pg_eventstore::{Config, EventData, ExpectedVersion, ReadStream, Store};
///
/// let store = Store::connect(Config::from_env()?)?;
/// store.migrate()?;
/// let event = EventData::json("Opened", serde_json::json!({ "owner": "ada" }));
/// store.append("account-1", ExpectedVersion::NoStream, &[event])?;
/// for event in store.read_stream("account-1", ReadStream::forwards())? {
///     println!("{:?}", event?);
/// }
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// How long `$all` first pages use the full statement after a lean one found events
/// held back.
const LEAN_PAUSE: Duration = Duration::from_millis(100);

struct Inner {
    pool: r2d2::Pool<Manager>,
    sql: Sql,
    config: Config,
    hub: Hub,
    last_connect_error: LastConnectError,
    monitor: Arc<crate::health::Monitor>,
    /// The highest `$all` horizon this store has computed: final, so never read below.
    known_horizon: std::sync::atomic::AtomicI64,
    /// Transaction ids that the last full horizon computation found in other databases.
    other_xids: std::sync::Mutex<Vec<i64>>,
    /// From when (in `now_micros`) `$all` first pages try the lean statement again (see
    /// `read_all_lean` in sql.rs): [`LEAN_PAUSE`] after one found events held back.
    lean_from: std::sync::atomic::AtomicU64,
    held_back: crate::horizon::HeldBackBoard,
    /// Whether the schema has the key of notifications that carry events (version 12)
    /// and the role may read it, as seen when the store connected or migrated: until
    /// then, appends that notify send a wake-up alone.
    events_in_notify: std::sync::atomic::AtomicBool,
    /// The same for `append_in` (`append_in_notify`, version 13).
    in_tx_events: std::sync::atomic::AtomicBool,
    /// Whether `append_in` calls the functions that return one record (schema version
    /// 15, when this role may execute them).
    record_calls: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("schema", &self.inner.sql.schema)
            .field("pool", &self.inner.pool.state())
            .finish()
    }
}

/// Keeps the last connection error, typed; r2d2 keeps only a short phrase.
#[derive(Debug)]
struct RecordConnectError(LastConnectError);

impl r2d2::HandleError<Error> for RecordConnectError {
    fn handle_error(&self, error: Error) {
        *self.0.lock().unwrap() = Some(Arc::new(error));
    }
}

/// How long a pooled connection may go untaken before [`Store::conn`] checks it.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// When a pooled connection was last taken by [`Store::conn`] (in its r2d2 extensions).
struct TakenAt(Instant);

/// Whether `conn` may be used: it is new, was taken within [`CHECK_AFTER_IDLE`], or
/// answers an empty query. One that does not is left closed, and the pool drops it.
fn usable(conn: &mut Conn) -> bool {
    let now = Instant::now();
    match PooledConnection::extensions_mut(conn).insert(TakenAt(now)) {
        Some(TakenAt(at)) if now.duration_since(at) >= CHECK_AFTER_IDLE => {
            crate::retry::answers(conn)
        }
        _ => true,
    }
}

/// Runs the session setup again on `conn` when a session of this process was found to
/// have dropped its prepared statements since `conn`'s were prepared (see
/// [`statements_lost`]: which connection ran `DISCARD ALL` is not known, so each one
/// does, once), and forgets its statements. False when the setup failed.
fn set_up_again_if_lost(conn: &mut Conn) -> bool {
    let generation = STATEMENTS_LOST.load(std::sync::atomic::Ordering::Relaxed);
    let extensions = PooledConnection::extensions_mut(conn);
    let stale = match extensions.get_mut::<Statements>() {
        Some(statements) => statements.generation != generation,
        None => {
            // No statement of the store's was prepared on it yet, so none can have
            // been found missing there.
            extensions.insert(Statements {
                generation,
                ..Statements::default()
            });
            false
        }
    };
    if !stale {
        return true;
    }
    if conn.batch_execute(crate::connect::SESSION_SETUP).is_err() {
        return false;
    }
    if let Some(statements) = PooledConnection::extensions_mut(conn).get_mut::<Statements>() {
        statements.of_generation(generation);
    }
    true
}

/// How many times a prepared statement was found missing on its connection in this
/// process (SQLSTATE 26000: the session ran `DISCARD ALL` or `DEALLOCATE ALL`). Each
/// pooled connection's [`Statements`] remember the count they were prepared under, and
/// are forgotten when it has moved on (see [`Store::prepared`]): which connection lost
/// its statements is not known where the error is seen, so every connection of every
/// store in the process prepares its statements again, once.
static STATEMENTS_LOST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Notes `e` if it says that a prepared statement was missing on its connection. Every
/// `postgres::Error` that becomes an [`Error`] passes here.
pub(crate) fn statements_lost(e: &postgres::Error) {
    if e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) {
        STATEMENTS_LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Prepared statements of one pooled connection, kept in its r2d2 extensions (and held
/// by a [`StoreConnection`](crate::StoreConnection) while it has the connection).
#[derive(Default)]
pub(crate) struct Statements {
    prepared: HashMap<&'static str, (Statement, u64)>,
    /// The process's count of lost statements when these were prepared (pool only).
    generation: u64,
}

impl Statements {
    /// `statement`, prepared on `client` with its parameters of `types` at its first use
    /// (and again now and then, see [`replan_at`]). `client` must be the connection
    /// these statements belong to.
    pub(crate) fn get<C: GenericClient>(
        &mut self,
        client: &mut C,
        statement: &crate::sql::Statement,
        types: &[Type],
    ) -> std::result::Result<Statement, postgres::Error> {
        if let Some(prepared) = self.cached(statement) {
            return Ok(prepared);
        }
        let prepared = client.prepare_typed(statement.text(), types)?;
        self.keep(statement, &prepared);
        Ok(prepared)
    }

    /// How many statements are prepared.
    pub(crate) fn len(&self) -> usize {
        self.prepared.len()
    }

    /// These statements, forgotten first if they were prepared before the process's
    /// count of lost statements reached `generation`.
    fn of_generation(&mut self, generation: u64) -> &mut Statements {
        if self.generation != generation {
            self.prepared.clear();
            self.generation = generation;
        }
        self
    }

    /// The cached `statement`, counting this use; `None` when it is not prepared yet or
    /// is due to be prepared again.
    fn cached(&mut self, statement: &crate::sql::Statement) -> Option<Statement> {
        let (prepared, uses) = self.prepared.get_mut(statement.name())?;
        *uses += 1;
        (!replan_at(*uses)).then(|| prepared.clone())
    }

    /// Keeps `prepared` as `statement`'s prepared form, in place of any earlier one.
    fn keep(&mut self, statement: &crate::sql::Statement, prepared: &Statement) {
        let entry = self
            .prepared
            .entry(statement.name())
            .or_insert_with(|| (prepared.clone(), 0));
        // The old statement, if any, is closed when its last copy is dropped.
        entry.0 = prepared.clone();
    }
}

/// Whether a cached statement is prepared anew at its `uses`-th use. PostgreSQL keeps a
/// prepared statement's generic plan, made at its sixth run, until the table's statistics
/// change: made while the events table was nearly empty (a new store, or one analysed
/// while empty), it may scan the whole table on every run as the table grows. Preparing
/// again after 64, 256, 1024, ... runs (every 65,536 at most) lets the planner see the
/// table as it is now, at a cost of one parse in thousands of runs.
fn replan_at(uses: u64) -> bool {
    const EVERY: u64 = 1 << 16;
    if uses >= EVERY {
        uses % EVERY == 0
    } else {
        uses >= 64 && uses.is_power_of_two() && uses.trailing_zeros() % 2 == 0
    }
}

impl Store {
    /// Opens a pool with `config` and checks the server: it must be reachable, run
    /// PostgreSQL 13 or newer ([`Error::ServerTooOld`] otherwise), and its schema (if any)
    /// must not be newer than this library. An unmigrated schema is fine here: call
    /// [`Store::migrate`] to create it.
    ///
    /// An unreachable server fails at once with [`Error::Connect`], which names the
    /// server and the cause (for example "connection refused"), rather than after the
    /// pool's [`Config::connection_timeout`].
    pub fn connect(config: Config) -> Result<Store> {
        let pg = config.finish()?;
        let connector = crate::tls::connector(&config)?;
        let monitor = Arc::new(crate::health::Monitor::new(
            pg.clone(),
            crate::tls::clone(&connector),
            &config.schema,
            &config.migrations_table,
        ));
        // One connection outside the pool: fails fast with the real cause.
        let (version, events_in_notify, in_tx_events, record_calls) = {
            let mut client = monitor.connect()?;
            crate::connect::check_server(&mut client)?;
            let version =
                migrate::current_version(&mut client, &config.schema, &config.migrations_table)?;
            let (readable, in_tx_events, record_calls) =
                what_the_role_may_use(&mut client, &config.schema, version)?;
            (version, readable, in_tx_events, record_calls)
        };
        if version > SCHEMA_VERSION {
            return Err(Error::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let last_connect_error = Arc::new(Mutex::new(None));
        let pool = r2d2::Pool::builder()
            .max_size(config.max_connections)
            .min_idle(Some(config.min_idle))
            .connection_timeout(config.connection_timeout)
            .idle_timeout(config.idle_timeout)
            .max_lifetime(config.max_lifetime)
            // A check on every checkout costs a round trip per call; broken connections
            // are found by the call that uses them instead.
            .test_on_check_out(false)
            .error_handler(Box::new(RecordConnectError(last_connect_error.clone())))
            .event_handler(Box::new(crate::metrics::PoolEvents::new(
                last_connect_error.clone(),
            )))
            .build_unchecked(Manager::new(pg.clone(), crate::tls::clone(&connector)));
        let hub = Hub::new(
            pg,
            connector,
            &config.schema,
            config.poll_interval,
            config.notify_on_append,
        );
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                hub,
                sql: Sql::new(&config.schema),
                config,
                last_connect_error,
                monitor,
                held_back: Default::default(),
                known_horizon: std::sync::atomic::AtomicI64::new(0),
                other_xids: Default::default(),
                lean_from: Default::default(),
                events_in_notify: events_in_notify.into(),
                in_tx_events: in_tx_events.into(),
                record_calls: record_calls.into(),
            }),
        };
        if let Some(interval) = store.config().health_check_interval {
            crate::health::start(&store.inner.monitor, interval, store.pool().clone())?;
        }
        Ok(store)
    }

    /// Opens a store with [`Config::from_env`].
    pub fn from_env() -> Result<Store> {
        Store::connect(Config::from_env()?)
    }

    /// Creates or upgrades the schema. Safe to call from many processes at once (an
    /// advisory lock serialises them) and to call again (it does nothing then).
    /// Transient failures are retried (see [`Config::max_retries`]).
    ///
    /// A call waits for another process that is migrating the same schema for as long as
    /// that takes, even past the session's `lock_timeout` and `statement_timeout`; the
    /// migrations themselves then run under those settings.
    pub fn migrate(&self) -> Result<MigrationReport> {
        let config = &self.inner.config;
        crate::metrics::migration(
            &config.schema,
            // One transaction under an advisory lock, and a no-op once done: safe to
            // retry.
            || {
                let (report, uses) =
                    crate::retry::run(self.config(), self.pool(), "migrate", || {
                        let mut conn = self.conn()?;
                        let report =
                            migrate::run(&mut conn, &config.schema, &config.migrations_table)?;
                        // What the new schema offers, as far as this role may use it:
                        // the same checks as `connect`'s.
                        let uses = what_the_role_may_use(
                            &mut conn,
                            &config.schema,
                            report.current_version,
                        )?;
                        Ok((report, uses))
                    })?;
                let (readable, in_tx_events, record_calls) = uses;
                let flags = [
                    (&self.inner.events_in_notify, readable),
                    (&self.inner.in_tx_events, in_tx_events),
                    (&self.inner.record_calls, record_calls),
                ];
                for (flag, on) in flags {
                    flag.store(on, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(report)
            },
            |r| r.applied.len(),
        )
    }

    /// The schema version recorded in the database (0 before [`Store::migrate`]).
    pub fn schema_version(&self) -> Result<i64> {
        crate::retry::run(self.config(), self.pool(), "read", || {
            let mut conn = self.conn()?;
            let config = &self.inner.config;
            migrate::current_version(&mut *conn, &config.schema, &config.migrations_table)
        })
    }

    /// The configured schema name.
    pub fn schema(&self) -> &str {
        &self.inner.sql.schema
    }

    /// The connection pool, for your own queries alongside the store. Its manager is
    /// [`Manager`](crate::Manager), whose TLS connector depends on the crate feature `tls`.
    ///
    /// The store's connections (these, and its listener's) start every transaction at
    /// `READ COMMITTED`, whatever `default_transaction_isolation` the role, the database
    /// or the connection string's `options` set: the store's statements are written for
    /// that level. For a transaction of your own at another level, say so when you
    /// begin it (`client.build_transaction().isolation_level(...)`).
    pub fn pool(&self) -> &r2d2::Pool<Manager> {
        &self.inner.pool
    }

    /// Appends `events` to `stream` atomically, if the stream is at the `expected` version.
    ///
    /// One statement, one round trip. Versions count from 0 (see [`ExpectedVersion`]).
    /// A conflict is [`Error::WrongExpectedVersion`] and writes nothing. Appending events
    /// whose ids are already stored, to the same stream, in the same order, returns the
    /// original result with [`AppendResult::was_duplicate`] set: a retry after a lost reply
    /// never writes twice.
    ///
    /// A transient failure (a lost connection, a server restart: see
    /// [`Config::max_retries`]) is retried with the same event ids, so an append whose
    /// first attempt committed is not written again: the retry reports it with
    /// `was_duplicate` set. A wrong expected version is never retried.
    ///
    /// ```no_run
    /// # use pg_eventstore::{EventData, ExpectedVersion, Store};
    /// # let store = Store::from_env()?;
    /// let first = store.append("cart-7", ExpectedVersion::NoStream, &[
    ///     EventData::json("Created", serde_json::json!({})),
    /// ])?;
    /// assert_eq!(first.last_version, 0);
    /// store.append("cart-7", ExpectedVersion::Exact(first.last_version), &[
    ///     EventData::json("ItemAdded", serde_json::json!({ "sku": "A-1" })),
    ///     EventData::json("ItemAdded", serde_json::json!({ "sku": "B-2" })),
    /// ])?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult> {
        let input = AppendInput::new(stream, expected, events)?;
        crate::metrics::append("store", stream, events.len(), || {
            let mut retry = Retry::new(self.config(), "append");
            let mut refused = 0;
            loop {
                match self.append_once(&input, &retry) {
                    Err(e) if retry.again(&e) => continue,
                    // Only the full statement checks the feed floor, and in a pool
                    // transaction it can be passed only between taking the transaction
                    // id and reading the floor, inside the statement: a new transaction
                    // gets a newer id.
                    Err(Error::FeedOrderConflict { .. }) if refused < APPEND_ATTEMPTS => {
                        refused += 1;
                        continue;
                    }
                    result => return result,
                }
            }
        })
    }

    /// One attempt of [`Store::append`]: the lean statement, and when it writes nothing
    /// or fails on a unique constraint, the full one, which tells a repeat, a conflict
    /// and a lost race apart.
    fn append_once(&self, input: &AppendInput<'_>, retry: &Retry) -> Result<AppendResult> {
        if retry.is_retrying() {
            crate::retry::sweep(self.pool());
        }
        let mut conn = self.conn()?;
        let plan = self.inner.hub.plan_append(input.json_bytes());
        if let Some((result, batch)) = self.append_fast(&mut conn, input, plan)? {
            self.inner
                .hub
                .appended_with(batch, plan.notify != Inline::No);
            return Ok(result);
        }
        let statement = self.prepared(&mut conn, self.full_append(input.expected))?;
        // Several writers on one hot stream lose to each other in turn: a random pause
        // breaks the lockstep.
        let mut pause = Backoff::new(Duration::from_micros(50), Duration::from_millis(20));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match conn.query_one(&statement, &input.params()) {
                Ok(row) => {
                    let row = AppendRow::from_row(&row).map_err(|e| self.map_error(e))?;
                    let result = input.outcome(&row)?;
                    // Also for a repeat: when it repeats an attempt whose reply was
                    // lost, nobody has been woken for those events yet.
                    self.inner.hub.appended();
                    return Ok(result);
                }
                Err(e) if attempt < APPEND_ATTEMPTS && unique_violation(&e).is_some() => {
                    std::thread::sleep(pause.next_delay());
                }
                Err(e) => return Err(self.map_error(e)),
            }
        }
    }

    /// The lean statements: `None` when they wrote nothing or lost on a unique
    /// constraint (the full statement then decides). With `plan.notify`, the variants
    /// that send the store's `NOTIFY` as they commit, with the events or without; with
    /// `plan.local`, those that also return what this process's subscribers need to
    /// deliver the events without reading them, and their [`Batch`] comes back with
    /// the result.
    fn append_fast(
        &self,
        conn: &mut Conn,
        input: &AppendInput<'_>,
        plan: AppendPlan,
    ) -> Result<Option<(AppendResult, Option<Batch>)>> {
        let sql = &self.inner.sql;
        let events_in_notify = self
            .inner
            .events_in_notify
            .load(std::sync::atomic::Ordering::Relaxed);
        // Events in the `NOTIFY` need the key of schema version 12. The statements that
        // return the local columns have them after a fifth (`_fast`) or third (`_one`)
        // column, which is the `NOTIFY` or NULL. One event with an exact expected version
        // takes the `_exact` forms of `append_one` (see `one_event` in sql.rs).
        let [one, one_notify, one_notify_events, one_local] = match input.expected {
            ExpectedVersion::Exact(_) => [
                &sql.append_one_exact,
                &sql.append_one_exact_notify,
                &sql.append_one_exact_notify_events,
                &sql.append_one_exact_local,
            ],
            _ => [
                &sql.append_one,
                &sql.append_one_notify,
                &sql.append_one_notify_events,
                &sql.append_one_local,
            ],
        };
        let (one, many, local) = match plan.notify {
            Inline::WithEvents if events_in_notify => {
                (one_notify_events, &sql.append_fast_notify_events, true)
            }
            Inline::WithEvents | Inline::Wake => (one_notify, &sql.append_fast_notify, false),
            Inline::No if plan.local => (one_local, &sql.append_fast_local, true),
            Inline::No => (one, &sql.append_fast, false),
        };
        let lost = |e: postgres::Error| match unique_violation(&e) {
            Some(_) => Ok(None),
            None => Err(self.map_error(e)),
        };
        let n = input.ids.len() as i64;
        // The lean statements take 7 parameters; those that notify the payload as `$8`.
        let payload = self.inner.hub.payload();
        let used = if plan.notify == Inline::No { 7 } else { 8 };
        let (row, count, first_position, last_position, last_version, columns) = if n == 1 {
            let statement = self.prepared(conn, one)?;
            let [a, b, c, d, e, f, g] = input.one_params();
            let params: [&(dyn ToSql + Sync); 8] = [a, b, c, d, e, f, g, &payload];
            match conn.query_opt(&statement, &params[..used]) {
                Ok(None) => return Ok(None),
                Ok(Some(row)) => {
                    let (position, version) = (row.get::<_, i64>(0), row.get(1));
                    (row, 1, position, position, version, 3)
                }
                Err(e) => return lost(e),
            }
        } else {
            let statement = self.prepared(conn, many)?;
            let mut params = input.params();
            params[7] = &payload;
            let row = match conn.query_one(&statement, &params[..used]) {
                Ok(row) => row,
                Err(e) => return lost(e),
            };
            if row.get::<_, i64>(0) != n {
                return Ok(None);
            }
            let (first, last, version) = (row.get(1), row.get(2), row.get::<_, i64>(3));
            (row, n, first, last, version, 5)
        };
        let result = AppendResult {
            first_version: (last_version + 1 - count) as u64,
            last_version: last_version as u64,
            first_position: first_position as u64,
            last_position: last_position as u64,
            was_duplicate: false,
        };
        let batch = if local && plan.local {
            input.batch(&result, &row, columns)
        } else {
            None
        };
        Ok(Some((result, batch)))
    }

    /// Appends inside the caller's own transaction (or on any client), so that a
    /// read-model or outbox row commits or rolls back together with the events.
    ///
    /// The events become visible when the transaction commits. A wrong expected version
    /// found by the statement itself leaves the transaction usable.
    ///
    /// With [`ExpectedVersion::Any`] there is no version check, and no version conflict:
    /// the append takes the stream's lock (an advisory lock held until the transaction
    /// ends), so a second transaction appending to the same stream waits for the first
    /// to end and then appends after whatever it committed (in `READ COMMITTED`, the
    /// default). Appends to different streams never wait for each other. A transaction
    /// that had its id before it waited (it wrote something else first) is older than
    /// the events it waited for, and is refused with the retryable
    /// [`Error::StreamOrderConflict`], which leaves the transaction usable: append first
    /// in the transaction, and it cannot happen from other `append_in` calls with `Any`.
    /// Appends through the pool and appends with an expected version do not wait for
    /// the stream's lock: when one of them takes the next version while this append
    /// waits, this one is refused the same way when it is one event as the transaction's
    /// first write, and otherwise fails on the unique key, which aborts the transaction,
    /// and reports [`Error::WrongExpectedVersion`]. Two transactions that append to the
    /// same two streams in opposite orders can deadlock, which PostgreSQL breaks after
    /// `deadlock_timeout` by failing one of them (a transient error: retry it).
    ///
    /// One event as the transaction's first write (the common case) takes one statement
    /// inside the function, after the stream's lock (with `Any`): the transaction's id
    /// and the insert. When it finds a newer version, a repeated event id or a deleted
    /// stream, it writes nothing and the full statement runs after it and decides.
    ///
    /// With an expected version, a concurrent append that takes the same version first
    /// (it commits while this statement waits for it) is a conflict. For one event as
    /// the transaction's first write, the statement writes nothing and the error carries
    /// the version that won, with the transaction still usable. Otherwise it makes the
    /// statement fail, which aborts the caller's transaction (PostgreSQL's rule): the
    /// error is still [`Error::WrongExpectedVersion`], and the caller rolls back and
    /// retries the whole transaction. Its `actual` version is read on an idle
    /// pooled connection if there is one at once, and is [`ActualVersion::Unknown`]
    /// otherwise: the caller's own connection can no longer read, and waiting for the
    /// pool (which may be the very connection the caller holds) would only delay the
    /// error. No savepoint is taken to keep the transaction alive: it would cost two
    /// more round trips per append and a subtransaction each, and more than 64
    /// subtransactions in one transaction slow down every snapshot on the server.
    /// Nothing is retried here, not even a lost connection: the caller's transaction
    /// went with it.
    ///
    /// Subscribers hear of the events when the transaction commits. Usually the
    /// store's commit watcher learns of the commit and wakes them (and tells other
    /// processes with a `NOTIFY` of its own), so that the caller's commit carries no
    /// `NOTIFY`: PostgreSQL serialises notifying commits, flush included, on one lock.
    /// An `append_in` that comes at least a millisecond after this process's last
    /// `NOTIFY`, while somebody can be woken, sends the wake-up itself, in the caller's
    /// transaction, delivered as it commits, with the events when they fit (schema
    /// version 13): subscribers here and in other processes then deliver them without
    /// reading (commit → delivery p50 0.065–0.084 ms against 0.32–0.40 ms through the
    /// watcher; see BENCHMARKS.md), for 0.26–0.42 ms more in that transaction. Busy
    /// writers' commits stay free of PostgreSQL's notify lock: at most one commit per
    /// millisecond and process sends a `NOTIFY`. PostgreSQL refuses
    /// `PREPARE TRANSACTION` in a transaction that sent a `NOTIFY`: for two-phase
    /// commit, turn notifying off with
    /// [`Config::notify_on_append`](crate::Config::notify_on_append)`(false)`.
    ///
    /// This works on any client, so the server parses and plans the call every time.
    /// From schema version 15 the call is `SELECT f(...)` of a function that returns one
    /// record, which costs the server about 23 % fewer instructions per one-event call
    /// than the table function of earlier versions (see BENCHMARKS.md); a store connected
    /// to an older schema, or whose role may not execute the new functions, calls the old
    /// ones. On a connection from the store's pool, [`Store::connection`] and
    /// [`StoreTransaction::append`](crate::StoreTransaction::append) do the same with the
    /// statement prepared once per connection.
    ///
    /// ```no_run
    /// # use pg_eventstore::{EventData, ExpectedVersion, Store};
    /// # let store = Store::from_env()?;
    /// let mut client = store.pool().get().expect("connection");
    /// let mut tx = client.transaction()?;
    /// tx.execute("UPDATE balances SET amount = amount - 10 WHERE id = 1", &[])?;
    /// store.append_in(&mut tx, "account-1", ExpectedVersion::Any, &[
    ///     EventData::json("Withdrawn", serde_json::json!({ "amount": 10 })),
    /// ])?;
    /// tx.commit()?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn append_in<C: GenericClient>(
        &self,
        client: &mut C,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult> {
        self.append_in_with(stream, expected, events, false, |statement, params| {
            let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                .iter()
                .copied()
                .zip(APPEND_PARAM_TYPES.iter().cloned())
                .collect();
            client.query_typed(statement.text(), &typed)
        })
    }

    /// [`Store::append_in`] with `run` running the append statements with their
    /// parameters on the caller's connection: parsed there on every call, or (with
    /// `prepared`) prepared once by a [`StoreTransaction`](crate::StoreTransaction), which
    /// also sends one event's statement without the function call around it.
    pub(crate) fn append_in_with(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
        prepared: bool,
        mut run: impl FnMut(
            &crate::sql::Statement,
            &[&(dyn ToSql + Sync)],
        ) -> std::result::Result<Vec<Row>, postgres::Error>,
    ) -> Result<AppendResult> {
        let mut input = AppendInput::new(stream, expected, events)?;
        // With the `NOTIFY` in the caller's transaction, the commit watcher is not asked
        // to watch it; otherwise `$8` asks the functions to take the watcher's lock.
        // Events in the `NOTIFY` need `append_in_notify` (schema version 13), and the
        // role's grants on it and on the key.
        let in_tx_events = self
            .inner
            .in_tx_events
            .load(std::sync::atomic::Ordering::Relaxed);
        let notify = match self.inner.hub.plan_append_in(input.json_bytes()) {
            Inline::WithEvents if !in_tx_events => Inline::Wake,
            plan => plan,
        };
        // `$8`: for `append_in_notify` the channel; for the other calls, set, a request
        // to take the watcher's lock.
        let watched = matches!(notify, Inline::No);
        if matches!(notify, Inline::No | Inline::WithEvents) {
            input.channel = Some(self.inner.hub.channel());
        }
        let result = crate::metrics::append("in_transaction", stream, events.len(), || {
            let sql = &self.inner.sql;
            let any = matches!(expected, ExpectedVersion::Any);
            let params = input.params();
            // The functions that return one record cost the server less per call, most
            // where the call is parsed and planned every time (see
            // `m0015_append_in_record` in migrate.rs).
            let record = self
                .inner
                .record_calls
                .load(std::sync::atomic::Ordering::Relaxed);
            let call = match (notify, any) {
                (Inline::No, true) if record => &sql.append_in_any_record,
                (Inline::No, false) if record => &sql.append_in_record,
                (Inline::No, true) => &sql.append_in_any,
                (Inline::No, false) => &sql.append_in,
                (Inline::Wake, true) => &sql.append_in_any_notify,
                (Inline::Wake, false) => &sql.append_in_notify,
                (Inline::WithEvents, _) => &sql.append_in_notify_events,
            };
            let first = if any {
                &sql.append_in_first_try
            } else {
                &sql.append_in_first
            };
            // The functions' one-event statement, sent without the call: prepared, it
            // costs less than the call (see `StoreTransaction::append`). When it writes
            // nothing, the call runs it again (a no-op if the transaction has an id by
            // now) and then the full statement, which decides. With `Any`, it writes
            // nothing and takes no id while another transaction holds the stream's
            // lock: the call then waits for the lock and appends with the lean
            // statement, whose snapshot sees what that transaction committed.
            // (Not for an append that sends its own wake-up: the call sends it.)
            let first = (prepared && input.ids.len() == 1 && watched).then_some(first);
            let mut rows = Vec::new();
            for statement in first.into_iter().chain([call]) {
                rows = run(statement, &params).map_err(|e| self.append_in_error(&input, e))?;
                if !rows.is_empty() {
                    break;
                }
            }
            let row = AppendRow::from_row(rows.first().expect("the append returns one row"))
                .map_err(|e| self.map_error(e))?;
            input.outcome(&row)
        })?;
        if !result.was_duplicate && watched {
            // Subscribers hear of these events once the caller's transaction commits.
            self.inner
                .hub
                .watch((result.first_position >> crate::sql::POSITION_BITS) as i64);
        }
        Ok(result)
    }

    /// The error of an append statement that failed in a caller's transaction.
    fn append_in_error(&self, input: &AppendInput<'_>, e: postgres::Error) -> Error {
        let stream = input.stream;
        match unique_violation(&e) {
            Some(UniqueViolation::StreamVersion) => self.lost_race(stream, input.expected),
            Some(UniqueViolation::EventId) => Error::DuplicateEventId {
                stream: stream.to_string(),
                id: duplicate_id(&e).unwrap_or(input.ids[0]),
            },
            None => self.map_error(e),
        }
    }

    /// The full append statement for `expected`: with [`ExpectedVersion::Any`] it waits
    /// for the stream's lock instead of failing when another append to the stream
    /// commits first.
    fn full_append(&self, expected: ExpectedVersion) -> &crate::sql::Statement {
        match expected {
            ExpectedVersion::Any => &self.inner.sql.append_any,
            _ => &self.inner.sql.append,
        }
    }

    /// Readies the caller's transaction for appends made later in it, so that they are
    /// never refused with [`Error::FeedOrderConflict`]: call it first, before the
    /// transaction writes anything. It takes the events table's write lock (which blocks
    /// no other appender) while the transaction has no id yet; see "The global order" in
    /// the crate docs. From its first write on, the transaction then holds back `$all`
    /// readers (at its own position) until it ends, as any appending transaction does.
    /// Called later, when the transaction already has an id, it does no harm and no good.
    ///
    /// ```no_run
    /// # use pg_eventstore::{EventData, ExpectedVersion, Store};
    /// # let store = Store::from_env()?;
    /// let mut client = store.pool().get().expect("connection");
    /// let mut tx = client.transaction()?;
    /// store.lock_for_appends(&mut tx)?;
    /// tx.execute("INSERT INTO outbox (topic) VALUES ('account-1')", &[])?;
    /// store.append_in(&mut tx, "account-1", ExpectedVersion::Any, &[
    ///     EventData::json("Opened", serde_json::json!({})),
    /// ])?;
    /// tx.commit()?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn lock_for_appends<C: GenericClient>(&self, client: &mut C) -> Result<()> {
        client
            .batch_execute(self.inner.sql.lock_for_appends.text())
            .map_err(|e| self.map_error(e))
    }

    /// The error of an append or import that lost the race for a version of `stream`:
    /// [`Error::StreamDeleted`] when a tombstone took it, else
    /// [`Error::WrongExpectedVersion`] with the stream's committed version, read on an
    /// idle pooled connection (the caller's own connection cannot read any more: its
    /// transaction is aborted). Never waits for the pool: with no idle connection, or any
    /// error, the version is [`ActualVersion::Unknown`] rather than a guess.
    pub(crate) fn lost_race(&self, stream: &str, expected: ExpectedVersion) -> Error {
        let head = self.inner.pool.try_get().and_then(|mut conn| {
            let statement = self.prepared(&mut conn, &self.inner.sql.stream_head).ok()?;
            let row = conn.query_one(&statement, &[&stream]).ok()?;
            Some(row.get::<_, Option<i64>>(0))
        });
        let actual = match head {
            Some(Some(crate::sql::TOMBSTONE_HEAD)) => {
                return Error::StreamDeleted {
                    stream: stream.to_string(),
                }
            }
            Some(head) => ActualVersion::from_head(head.map(|v| v as u64)),
            None => ActualVersion::Unknown,
        };
        Error::WrongExpectedVersion {
            stream: stream.to_string(),
            expected,
            actual,
        }
    }

    /// The version of the stream's last event, or `None` when the stream does not exist.
    /// After [`Store::delete_stream`] it is the marker's version (the next append follows
    /// it); after [`Store::tombstone_stream`] it is [`Error::StreamDeleted`].
    pub fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        validate_stream_id(stream)?;
        let row = self.run("read", &self.inner.sql.stream_head, |c, s| {
            c.query_one(s, &[&stream])
        })?;
        match row.get::<_, Option<i64>>(0) {
            Some(crate::sql::TOMBSTONE_HEAD) => Err(Error::StreamDeleted {
                stream: stream.to_string(),
            }),
            head => Ok(head.map(|v| v as u64)),
        }
    }

    /// The position of the last event a `$all` reader can see now, or `None` when there
    /// is none. Subscribing or reading "after" it skips the history. Committed events may
    /// wait above it for an open appending transaction: [`Store::feed_status`] says whether
    /// they do, and which transaction holds them.
    pub fn head_position(&self) -> Result<Option<u64>> {
        let known = self.known_horizon();
        let row = self.run("read", &self.inner.sql.head_position, |c, s| {
            c.query_one(s, &[&known])
        })?;
        self.saw_horizon(row.get::<_, i64>(1) as u64);
        Ok(row.get::<_, Option<i64>>(0).map(|v| v as u64))
    }

    /// The state of the listener connection, or `None` before the first subscription
    /// started it.
    pub fn listener_state(&self) -> Option<ListenerState> {
        self.inner.hub.state()
    }

    /// Where a live subscription starts: the current snapshot (as `pg_snapshot` text) and
    /// the `$all` horizon computed for it.
    pub(crate) fn snapshot_and_horizon(&self) -> Result<(String, u64)> {
        let row = self.run("read", &self.inner.sql.live_start, |c, s| {
            c.query_one(s, &[])
        })?;
        Ok((row.get(0), row.get::<_, i64>(1) as u64))
    }

    /// Stores a snapshot of a stream's state at `version` (the state after the event of
    /// that version). An older snapshot never replaces a newer one, and a snapshot of
    /// events the stream no longer reads (a version below its `$tb` less one: a snapshot
    /// made before a [`delete_stream`](Store::delete_stream) or
    /// [`truncate_stream`](Store::truncate_stream) and saved after it) is not stored
    /// either, so that it cannot bring deleted state back; a tombstoned stream's is
    /// [`Error::StreamDeleted`]. (A save that runs at the same moment as a delete may
    /// still land after it; load snapshots with the stream's version in mind.)
    pub fn save_snapshot<T: Serialize + ?Sized>(
        &self,
        stream: &str,
        version: u64,
        state: &T,
    ) -> Result<()> {
        validate_stream_id(stream)?;
        // Versions are `bigint`s: a larger one would wrap to a negative number, and an
        // older snapshot would then replace it.
        let version = i64::try_from(version).map_err(|_| {
            Error::InvalidInput(format!(
                "snapshot of stream {stream:?}: version {version} is out of range \
                 (versions go up to {})",
                i64::MAX
            ))
        })?;
        let data = serde_json::to_vec(state)?;
        if crate::event::has_nul_escape(&data) {
            return Err(Error::InvalidInput(format!(
                "snapshot of stream {stream:?}: the state contains the NUL character \\u0000, \
                 which PostgreSQL's jsonb cannot store"
            )));
        }
        let row = self.run("save_snapshot", &self.inner.sql.save_snapshot, |c, s| {
            c.query_one(s, &[&stream, &version, &JsonbParam(&data)])
        })?;
        if row.get::<_, Option<i64>>(0) == Some(crate::sql::TOMBSTONE_HEAD) {
            return Err(Error::StreamDeleted {
                stream: stream.to_string(),
            });
        }
        Ok(())
    }

    /// Loads the latest snapshot of a stream, if there is one.
    pub fn load_snapshot<T: DeserializeOwned>(&self, stream: &str) -> Result<Option<Snapshot<T>>> {
        validate_stream_id(stream)?;
        let row = self.run("read", &self.inner.sql.load_snapshot, |c, s| {
            c.query_opt(s, &[&stream])
        })?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(Snapshot {
                version: row.get::<_, i64>(0) as u64,
                state: T::deserialize(row.get::<_, serde_json::Value>(1))?,
                created_at: row.get(2),
            })),
        }
    }

    /// The highest `$all` horizon this store has computed (0: none yet). Every horizon
    /// is final, and one computed later may be lower (a transaction that readers passed
    /// and that was then refused holds its lock until it ends), so reads never go below
    /// this one.
    pub(crate) fn known_horizon(&self) -> i64 {
        self.inner
            .known_horizon
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `$all` first pages try the lean statement: unless one found events held
    /// back in the last [`LEAN_PAUSE`]. Under a steady load of appending transactions
    /// most would, and then pay a second round trip for the full statement.
    pub(crate) fn lean_reads(&self) -> bool {
        let from = self
            .inner
            .lean_from
            .load(std::sync::atomic::Ordering::Relaxed);
        crate::listener::now_micros() >= from
    }

    /// Records that a lean first page found events held back.
    pub(crate) fn lean_read_missed(&self) {
        self.inner.lean_from.store(
            crate::listener::now_micros() + LEAN_PAUSE.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Records a horizon that a read or status computed.
    pub(crate) fn saw_horizon(&self, horizon: u64) {
        self.inner
            .known_horizon
            .fetch_max(horizon as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Transaction ids known to belong to other databases of the cluster (a fact that
    /// never changes for an id): a `$all` read whose snapshot's open transactions below
    /// the newest event are all among them needs no function call for its horizon.
    pub(crate) fn other_xids(&self) -> Vec<i64> {
        self.inner.other_xids.lock().unwrap().clone()
    }

    /// Records the other databases' transactions that a horizon computation saw in its
    /// snapshot (they replace the earlier ones, which have most likely ended).
    pub(crate) fn saw_other_xids(&self, xids: Vec<i64>) {
        *self.inner.other_xids.lock().unwrap() = xids;
    }

    /// The statements of this store's schema.
    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    /// The settings the store was opened with.
    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The wake-up hub: listener, notifier and subscribers.
    pub(crate) fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// What holds this store's subscriptions back, for health checks.
    pub(crate) fn held_back_board(&self) -> &crate::horizon::HeldBackBoard {
        &self.inner.held_back
    }

    /// Checks the server: one round trip on an idle pooled connection, or on a new
    /// connection of its own when none is idle or the idle one is broken, so that a busy
    /// pool is not taken for an outage. Never fails: an unreachable server is a report
    /// with `reachable: false` and the reason in `error`.
    ///
    /// A check that finds the server gone after it was reachable, or back after it was
    /// gone, sends a [`ConnectionEvent`](crate::ConnectionEvent) to the
    /// [`Store::connection_events`] receivers.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let report = store.health_check();
    /// if !report.is_ready() {
    ///     eprintln!("not ready: {:?} (pool {:?})", report.error, report.pool);
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn health_check(&self) -> crate::HealthReport {
        self.inner.monitor.check(
            self.pool(),
            self.hub().state(),
            self.held_back_board().longest(),
        )
    }

    /// A receiver of [`ConnectionEvent`](crate::ConnectionEvent)s: one `Lost` when an outage begins and one
    /// `Restored` when it ends. Outages are found by health checks: those of the
    /// background thread that [`Config::health_check_interval`](crate::Config::health_check_interval)
    /// starts, and calls to [`Store::health_check`]. Every receiver gets every event;
    /// the channel is unbounded, and disconnects when the last clone of the store is
    /// dropped.
    ///
    /// ```no_run
    /// # use pg_eventstore::{Config, ConnectionEvent};
    /// # use std::time::Duration;
    /// let store = Config::from_env()?
    ///     .health_check_interval(Some(Duration::from_secs(5)))
    ///     .connect()?;
    /// let events = store.connection_events();
    /// std::thread::spawn(move || {
    ///     for event in events {
    ///         match event {
    ///             ConnectionEvent::Lost { error, .. } => eprintln!("database lost: {error}"),
    ///             ConnectionEvent::Restored { down_for, .. } => eprintln!("back after {down_for:?}"),
    ///             _ => {}
    ///         }
    ///     }
    /// });
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn connection_events(&self) -> crossbeam_channel::Receiver<crate::ConnectionEvent> {
        self.inner.monitor.events()
    }

    /// A pooled connection, or an error that says why none could be had: the pool was
    /// exhausted, or no connection could be opened (with the cause).
    ///
    /// One that nobody has taken for [`CHECK_AFTER_IDLE`] is first asked an empty query:
    /// the server may have ended its session meanwhile (`idle_session_timeout`, a
    /// restart, `pg_terminate_backend`), and calls that are not retried (imports, your
    /// transactions on a [`StoreConnection`](crate::StoreConnection)) would fail on it.
    /// A connection in steady use costs nothing; an idle one, one round trip.
    ///
    /// After a session was found to have dropped its prepared statements
    /// ([`statements_lost`]: a `DISCARD ALL`, which also resets the session's settings),
    /// each pooled connection runs the session setup again (`READ COMMITTED`, see
    /// [`Store::pool`]) the next time it is taken, once.
    pub(crate) fn conn(&self) -> Result<Conn> {
        for _ in 0..=self.inner.pool.max_size() {
            let mut conn = self.checkout()?;
            if usable(&mut conn) && set_up_again_if_lost(&mut conn) {
                return Ok(conn);
            }
        }
        self.checkout()
    }

    fn checkout(&self) -> Result<Conn> {
        // r2d2's own error is "timed out waiting for connection" plus the text of the
        // last connect error, which is our source already.
        self.inner.pool.get().map_err(|_| {
            let state = self.inner.pool.state();
            let max = self.inner.pool.max_size();
            let timeout = self.inner.config.connection_timeout;
            let last_connect_error = self.inner.last_connect_error.lock().unwrap().clone();
            let message = if last_connect_error.is_none() && state.connections >= max {
                format!(
                    "the connection pool is exhausted: all {max} connections were in use \
                     for {timeout:?} (raise max_connections, or return connections sooner)"
                )
            } else {
                format!(
                    "the connection pool could not open a connection within {timeout:?} \
                     ({} of at most {max} open, {} idle)",
                    state.connections, state.idle_connections
                )
            };
            Error::Pool {
                message,
                last_connect_error,
            }
        })
    }

    /// `statement`, prepared once per pooled connection (cached in the connection's
    /// r2d2 extensions under the statement's name). After any prepared statement was
    /// found missing on its connection ([`statements_lost`]), every connection's cache
    /// is forgotten at its next use, so a session that dropped its prepared statements
    /// fails one call (which is retried where the call may be), not every call after.
    pub(crate) fn prepared(
        &self,
        conn: &mut Conn,
        statement: &crate::sql::Statement,
    ) -> Result<Statement> {
        let generation = STATEMENTS_LOST.load(std::sync::atomic::Ordering::Relaxed);
        // Looked up in place: every pooled statement passes here.
        let cached = PooledConnection::extensions_mut(conn)
            .get_mut::<Statements>()
            .and_then(|c| c.of_generation(generation).cached(statement));
        if let Some(prepared) = cached {
            return Ok(prepared);
        }
        let prepared = conn
            .prepare(statement.text())
            .map_err(|e| self.map_error(e))?;
        let extensions = PooledConnection::extensions_mut(conn);
        match extensions.get_mut::<Statements>() {
            Some(statements) => statements
                .of_generation(generation)
                .keep(statement, &prepared),
            None => {
                let mut statements = Statements {
                    generation,
                    ..Statements::default()
                };
                statements.keep(statement, &prepared);
                extensions.insert(statements);
            }
        }
        Ok(prepared)
    }

    /// The one way the store runs a statement of its own on the pool: check out a
    /// connection, prepare `statement` (cached), run `f` with both, map the error, and
    /// retry the whole after transient failures. Only for work that is safe to repeat
    /// (`operation` names it in retry logs and metrics).
    pub(crate) fn run<T>(
        &self,
        operation: &'static str,
        statement: &crate::sql::Statement,
        mut f: impl FnMut(&mut Conn, &Statement) -> std::result::Result<T, postgres::Error>,
    ) -> Result<T> {
        crate::retry::run(self.config(), self.pool(), operation, || {
            let mut conn = self.conn()?;
            let prepared = self.prepared(&mut conn, statement)?;
            f(&mut conn, &prepared).map_err(|e| self.map_error(e))
        })
    }

    /// Turns "relation does not exist" into [`Error::NotMigrated`]; any other error is
    /// [`Error::Postgres`] (through `From`, which notes a lost statement, see
    /// [`statements_lost`]).
    /// Whether `e` says that a function of the store's schema does not exist (the
    /// server names it `schema.name(...)`, the schema quoted where it needs quotes).
    fn names_own_function(&self, e: &postgres::Error) -> bool {
        let schema = &self.inner.sql.schema;
        e.as_db_error().is_some_and(|db| {
            let message = db.message();
            message.starts_with(&format!("function {schema}."))
                || message.starts_with(&format!("function \"{schema}\"."))
        })
    }

    pub(crate) fn map_error(&self, e: postgres::Error) -> Error {
        match e.code() {
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME => {
                Error::NotMigrated {
                    schema: self.inner.sql.schema.clone(),
                }
            }
            // One of the store's functions (`append_in` calls them in an existing but
            // unmigrated schema); not a function that the caller's own statements miss.
            Some(c) if *c == SqlState::UNDEFINED_FUNCTION && self.names_own_function(&e) => {
                Error::NotMigrated {
                    schema: self.inner.sql.schema.clone(),
                }
            }
            _ => Error::from(e),
        }
    }
}

impl Config {
    /// Opens a [`Store`] with these settings (see [`Store::connect`]).
    pub fn connect(self) -> Result<Store> {
        Store::connect(self)
    }
}

/// A stored snapshot of a stream's state. In JSON (`serde`), `created_at` is RFC 3339.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Snapshot<T> {
    /// The version of the last event folded into the state.
    pub version: u64,
    /// The state.
    pub state: T,
    /// When the snapshot was saved.
    #[serde(serialize_with = "crate::event::serialize_time")]
    pub created_at: SystemTime,
}

pub(crate) const APPEND_PARAM_TYPES: [Type; 8] = [
    Type::TEXT,
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::JSONB_ARRAY,
    Type::JSONB_ARRAY,
    Type::INT4,
    Type::INT8,
    Type::TEXT,
];

/// The checked parameters of one append.
struct AppendInput<'a> {
    stream: &'a str,
    expected: ExpectedVersion,
    kind: i32,
    version: i64,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    data: Vec<JsonbParam<'a>>,
    metadata: Vec<Option<JsonbParam<'a>>>,
    /// The NOTIFY channel, for appends inside a caller's transaction.
    channel: Option<&'a str>,
}

impl<'a> AppendInput<'a> {
    fn new(stream: &'a str, expected: ExpectedVersion, events: &'a [EventData]) -> Result<Self> {
        validate_stream_id(stream)?;
        if events.is_empty() {
            return Err(Error::InvalidInput(format!(
                "no events to append to stream {stream:?}"
            )));
        }
        if events.len() as u64 > MAX_EVENTS_PER_TRANSACTION {
            return Err(Error::TransactionTooLarge {
                events: events.len() as u64,
            });
        }
        if let ExpectedVersion::Exact(v) = expected {
            if v > i64::MAX as u64 {
                return Err(Error::InvalidInput(format!(
                    "expected version {v} is out of range"
                )));
            }
        }
        for (i, e) in events.iter().enumerate() {
            e.validate(i)?;
        }
        let mut ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidInput(format!(
                "event id {} appears twice in one append to stream {stream:?}",
                w[0]
            )));
        }
        let (kind, version) = expected.to_params();
        Ok(AppendInput {
            stream,
            expected,
            kind,
            version,
            ids: events.iter().map(|e| e.id).collect(),
            types: events.iter().map(|e| e.event_type.as_str()).collect(),
            data: events.iter().map(|e| JsonbParam(&e.data)).collect(),
            metadata: events
                .iter()
                .map(|e| e.metadata.as_deref().map(JsonbParam))
                .collect(),
            channel: None,
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.stream,
            &self.ids,
            &self.types,
            &self.data,
            &self.metadata,
            &self.kind,
            &self.version,
            &self.channel,
        ]
    }

    /// The bytes of the events' data and metadata, as given.
    fn json_bytes(&self) -> usize {
        let data: usize = self.data.iter().map(|d| d.0.len()).sum();
        let metadata: usize = self.metadata.iter().flatten().map(|m| m.0.len()).sum();
        data + metadata
    }

    /// The parameters of `append_one`: those of [`AppendInput::params`] for its one
    /// event, without the channel.
    fn one_params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.stream,
            &self.ids[0],
            &self.types[0],
            &self.data[0],
            &self.metadata[0],
            &self.kind,
            &self.version,
        ]
    }

    /// The events of a lean append that wrote them (`result`), for this process's
    /// subscribers, from the local columns of its `row` that start at `first` (see
    /// `local_columns` in sql.rs): `None` when they do not add up.
    fn batch(&self, result: &AppendResult, row: &Row, first: usize) -> Option<Batch> {
        let data: Vec<String> = row.try_get(first).ok()?;
        let metadata: Vec<Option<String>> = row.try_get(first + 1).ok()?;
        let recorded: Vec<i64> = row.try_get(first + 2).ok()?;
        let prev: Option<i64> = row.try_get(first + 3).ok()?;
        let is_final: bool = row.try_get(first + 4).ok()?;
        let n = self.ids.len();
        let consecutive = result.last_position - result.first_position + 1 == n as u64;
        if !consecutive || data.len() != n || metadata.len() != n || recorded.len() != n {
            return None;
        }
        let events = data
            .into_iter()
            .zip(metadata)
            .zip(recorded)
            .enumerate()
            .map(|(k, ((data, metadata), micros))| {
                Some(RecordedEvent {
                    id: self.ids[k],
                    stream_id: self.stream.to_string(),
                    version: result.first_version + k as u64,
                    position: result.first_position + k as u64,
                    event_type: self.types[k].to_string(),
                    data: Json::from_text(data),
                    metadata: metadata.map(Json::from_text),
                    recorded_at: crate::listener::unix_micros(micros)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Batch::new(prev, is_final, events)
    }

    /// Reads the append statement's one row: written, repeated, too large, or refused.
    fn outcome(&self, row: &AppendRow) -> Result<AppendResult> {
        let (inserted, head) = (row.inserted, row.head);
        if inserted > 0 {
            let (first_position, last_position) = (row.first_position, row.last_position);
            let last_version = head.unwrap_or(-1) + inserted;
            return Ok(AppendResult {
                first_version: (last_version - inserted + 1) as u64,
                last_version: last_version as u64,
                first_position: first_position as u64,
                last_position: last_position as u64,
                was_duplicate: false,
            });
        }
        if let Some(streams) = &row.dup_streams {
            let (versions, positions) = (&row.dup_versions, &row.dup_positions);
            let same = row.dup_same;
            let repeat = same
                && streams.len() == self.ids.len()
                && streams.iter().all(|s| s == self.stream)
                && versions.windows(2).all(|w| w[1] == w[0] + 1)
                && positions.windows(2).all(|w| w[1] > w[0]);
            if repeat {
                return Ok(AppendResult {
                    first_version: versions[0] as u64,
                    last_version: versions[versions.len() - 1] as u64,
                    first_position: positions[0] as u64,
                    last_position: positions[positions.len() - 1] as u64,
                    was_duplicate: true,
                });
            }
            return Err(Error::DuplicateEventId {
                stream: self.stream.to_string(),
                id: self.ids[row.dup_index[0] as usize - 1],
            });
        }
        if row.behind_floor == Some(true) {
            return Err(Error::FeedOrderConflict {
                stream: Some(self.stream.to_string()),
            });
        }
        let tx_events = row.tx_events;
        if tx_events as u64 > MAX_EVENTS_PER_TRANSACTION {
            return Err(Error::TransactionTooLarge {
                events: tx_events as u64,
            });
        }
        if head == Some(crate::sql::TOMBSTONE_HEAD) {
            return Err(Error::StreamDeleted {
                stream: self.stream.to_string(),
            });
        }
        let expected_ok = match self.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => head.is_none(),
            ExpectedVersion::StreamExists => head.is_some(),
            ExpectedVersion::Exact(v) => head == Some(v as i64),
        };
        if expected_ok && row.order_conflict == Some(true) {
            return Err(Error::StreamOrderConflict {
                stream: self.stream.to_string(),
            });
        }
        Err(Error::WrongExpectedVersion {
            stream: self.stream.to_string(),
            expected: self.expected,
            actual: ActualVersion::from_head(head.map(|v| v as u64)),
        })
    }
}

/// Whether the `append_in` functions `names` of `schema` all exist and this role may
/// execute them (one round trip).
/// What this role may use of a schema at `version`: whether appends may put their events
/// in their `NOTIFY` (the role may read the key; a role granted the events alone still
/// appends, with wake-ups), whether `append_in` may too (through a function of version 13
/// that an operator may not have granted to this role), and whether the functions that
/// return one record (version 15) may be called.
fn what_the_role_may_use(
    client: &mut postgres::Client,
    schema: &str,
    version: i64,
) -> Result<(bool, bool, bool)> {
    let readable = version >= migrate::FEED_KEY_VERSION
        && client
            .query_one(
                crate::sql::FEED_KEY_READABLE,
                &[&crate::sql::feed_key_table(schema)],
            )?
            .get::<_, bool>(0);
    let in_tx_events = readable
        && version >= migrate::APPEND_IN_NOTIFY_VERSION
        && callable(client, schema, &["append_in_notify"])?;
    let record_calls = version >= migrate::APPEND_IN_RECORD_VERSION
        && callable(
            client,
            schema,
            &["append_in_events_record", "append_in_any_record"],
        )?;
    Ok((readable, in_tx_events, record_calls))
}

fn callable(client: &mut postgres::Client, schema: &str, names: &[&str]) -> Result<bool> {
    let signatures: Vec<String> = names
        .iter()
        .map(|name| crate::sql::append_in_signature(schema, name))
        .collect();
    Ok(client
        .query_one(crate::sql::FUNCTION_CALLABLE, &[&signatures])?
        .get(0))
}

/// An append statement's one row, as `AppendInput::outcome` reads it: from the columns
/// of the statements and of the functions that return a table (`col`), or from the
/// one `record` of the functions of schema version 15 (see `m0015_append_in_record`).
/// The positions are 0 where the statement gave none (nothing inserted), the repeats'
/// arrays empty where it found none.
#[derive(Debug, Default, PartialEq)]
struct AppendRow {
    inserted: i64,
    first_position: i64,
    last_position: i64,
    head: Option<i64>,
    tx_events: i64,
    dup_streams: Option<Vec<String>>,
    dup_versions: Vec<i64>,
    dup_positions: Vec<i64>,
    dup_index: Vec<i64>,
    dup_same: bool,
    order_conflict: Option<bool>,
    behind_floor: Option<bool>,
}

impl AppendRow {
    /// From an append statement's row: its columns (those of `col`), or the one record
    /// of the functions of schema version 15.
    fn from_row(row: &Row) -> std::result::Result<AppendRow, postgres::Error> {
        match row.columns() {
            [only] if *only.type_() == Type::RECORD => row.try_get(0),
            _ => AppendRow::read(row),
        }
    }

    /// From `values`, in the order of `col`.
    fn read<V: Values>(values: &V) -> std::result::Result<AppendRow, V::Error> {
        Ok(AppendRow {
            inserted: values.get(col::INSERTED)?,
            first_position: values.get::<Option<i64>>(col::FIRST_POSITION)?.unwrap_or(0),
            last_position: values.get::<Option<i64>>(col::LAST_POSITION)?.unwrap_or(0),
            head: values.get(col::HEAD)?,
            tx_events: values.get(col::TX_EVENTS)?,
            dup_streams: values.get(col::DUP_STREAMS)?,
            dup_versions: values
                .get::<Option<_>>(col::DUP_VERSIONS)?
                .unwrap_or_default(),
            dup_positions: values
                .get::<Option<_>>(col::DUP_POSITIONS)?
                .unwrap_or_default(),
            dup_index: values.get::<Option<_>>(col::DUP_INDEX)?.unwrap_or_default(),
            dup_same: values.get::<Option<bool>>(col::DUP_SAME)?.unwrap_or(false),
            order_conflict: values.get(col::ORDER_CONFLICT)?,
            behind_floor: values.get(col::BEHIND_FLOOR)?,
        })
    }
}

/// Where an `AppendRow`'s values come from: a row's columns, or a record's fields.
trait Values {
    type Error;
    fn get<T: postgres::types::FromSqlOwned>(
        &self,
        index: usize,
    ) -> std::result::Result<T, Self::Error>;
}

impl Values for Row {
    type Error = postgres::Error;
    fn get<T: postgres::types::FromSqlOwned>(
        &self,
        index: usize,
    ) -> std::result::Result<T, postgres::Error> {
        self.try_get(index)
    }
}

type DecodeError = Box<dyn std::error::Error + Sync + Send>;

/// The fields of a record: each one's type and bytes (`None` for NULL).
struct RecordFields<'a>(Vec<(Type, Option<&'a [u8]>)>);

impl Values for RecordFields<'_> {
    type Error = DecodeError;
    fn get<T: postgres::types::FromSqlOwned>(
        &self,
        index: usize,
    ) -> std::result::Result<T, DecodeError> {
        let (ty, value) = self
            .0
            .get(index)
            .ok_or_else(|| format!("an append's record has no field {index}"))?;
        if !T::accepts(ty) {
            return Err(format!("an append's record has a field of type {ty}").into());
        }
        T::from_sql_nullable(ty, *value)
    }
}

/// The one column of `SELECT append_in_events_record(...)`: an anonymous `record`,
/// which the server sends in binary as its number of fields, then for each its type's
/// OID, its length (-1 for NULL) and its bytes. The fields are those of `col`, with the
/// watcher's count last, not read.
impl<'a> postgres::types::FromSql<'a> for AppendRow {
    fn from_sql(_: &Type, raw: &'a [u8]) -> std::result::Result<AppendRow, DecodeError> {
        fn take<'a>(raw: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], DecodeError> {
            if raw.len() < n {
                return Err("an append's record ends early".into());
            }
            let (head, rest) = raw.split_at(n);
            *raw = rest;
            Ok(head)
        }
        fn int(raw: &mut &[u8]) -> std::result::Result<i32, DecodeError> {
            Ok(i32::from_be_bytes(take(raw, 4)?.try_into()?))
        }
        let mut raw = raw;
        let count = int(&mut raw)?;
        if count != 13 {
            return Err(format!("an append's record has {count} fields, not 13").into());
        }
        let mut fields = Vec::with_capacity(13);
        for _ in 0..count {
            let oid = int(&mut raw)? as u32;
            let len = int(&mut raw)?;
            let ty = Type::from_oid(oid).ok_or_else(|| format!("unknown type {oid}"))?;
            let value = if len < 0 {
                None
            } else {
                Some(take(&mut raw, len as usize)?)
            };
            fields.push((ty, value));
        }
        AppendRow::read(&RecordFields(fields))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::RECORD
    }
}

/// The columns of an append's result row, by position: the full statements name them,
/// the functions declare them, and the one-event statement (whose text is fixed by
/// schema version 9) returns them unnamed.
mod col {
    pub(super) const INSERTED: usize = 0;
    pub(super) const FIRST_POSITION: usize = 1;
    pub(super) const LAST_POSITION: usize = 2;
    pub(super) const HEAD: usize = 3;
    pub(super) const TX_EVENTS: usize = 4;
    pub(super) const DUP_STREAMS: usize = 5;
    pub(super) const DUP_VERSIONS: usize = 6;
    pub(super) const DUP_POSITIONS: usize = 7;
    pub(super) const DUP_INDEX: usize = 8;
    pub(super) const DUP_SAME: usize = 9;
    pub(super) const ORDER_CONFLICT: usize = 10;
    pub(super) const BEHIND_FLOOR: usize = 11;
}

pub(crate) enum UniqueViolation {
    StreamVersion,
    EventId,
}

pub(crate) fn unique_violation(e: &postgres::Error) -> Option<UniqueViolation> {
    let db = e.as_db_error()?;
    if *db.code() != SqlState::UNIQUE_VIOLATION {
        return None;
    }
    match db.constraint() {
        Some("events_stream_version_key") => Some(UniqueViolation::StreamVersion),
        Some("events_event_id_key") => Some(UniqueViolation::EventId),
        _ => None,
    }
}

/// The id in "Key (event_id)=(…) already exists."
pub(crate) fn duplicate_id(e: &postgres::Error) -> Option<Uuid> {
    let detail = e.as_db_error()?.detail()?;
    let start = detail.find(")=(")? + 3;
    let end = start + detail[start..].find(')')?;
    detail[start..end].parse().ok()
}

#[cfg(test)]
mod tests {
    /// `AppendInput::outcome` reads columns by position: the full statements must name
    /// theirs in the order of `col`, as the functions declare them.
    #[test]
    fn append_statements_return_their_columns_in_the_order_read() {
        use super::col::*;
        let order = [
            ("inserted", INSERTED),
            ("first_position", FIRST_POSITION),
            ("last_position", LAST_POSITION),
            ("head", HEAD),
            ("tx_events", TX_EVENTS),
            ("dup_streams", DUP_STREAMS),
            ("dup_versions", DUP_VERSIONS),
            ("dup_positions", DUP_POSITIONS),
            ("dup_index", DUP_INDEX),
            ("dup_same", DUP_SAME),
            ("order_conflict", ORDER_CONFLICT),
            ("behind_floor", BEHIND_FLOOR),
        ];
        let sql = crate::sql::Sql::new("s");
        let function =
            crate::migrate::migration_sql("s", "schema_migrations").expect("the migrations");
        for (i, (name, index)) in order.iter().enumerate() {
            assert_eq!(i, *index, "{name}");
        }
        for text in [sql.append.text(), sql.append_any.text()] {
            let at: Vec<usize> = order
                .iter()
                .map(|(name, _)| text.rfind(&format!(") AS {name}")).expect(name))
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
        }
        let declared = function
            .rfind("RETURNS TABLE (inserted bigint, first_position bigint, last_position bigint, head bigint,")
            .expect("the functions' columns");
        let rest = &function[declared..];
        let at: Vec<usize> = order
            .iter()
            .map(|(name, _)| rest.find(&format!("{name} ")).expect(name))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    }

    #[test]
    fn statements_are_prepared_again_at_growing_intervals() {
        let at: Vec<u64> = (1..=70_000u64).filter(|&u| super::replan_at(u)).collect();
        assert_eq!(at, [64, 256, 1024, 4096, 16384, 65536]);
        assert!(super::replan_at(2 * 65536) && !super::replan_at(2 * 65536 + 1));
    }
}
