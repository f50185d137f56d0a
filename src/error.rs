//! The one error type of the crate.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::version::{ActualVersion, ExpectedVersion};
use postgres::error::SqlState;

/// A `Result` whose error defaults to this crate's [`Error`](crate::Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `pg_eventstore`.
///
/// Domain errors carry their data; wrapped failures keep their cause, reachable through
/// [`std::error::Error::source`]. As in `postgres`, `Display` says what went wrong at
/// this level only and `source()` gives the rest, so a report that walks the chain
/// (`anyhow`'s `{:#}`, or [`Error::report`](crate::Error::report)) prints every cause exactly once: the
/// SQLSTATE, the server's message, or "connection refused".
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the append expected. Nothing was written.
    WrongExpectedVersion {
        /// The stream appended to.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was refused, as far as it is known
        /// (see [`ActualVersion`]).
        actual: ActualVersion,
    },
    /// An event id given to an append already belongs to another event, and the append is
    /// not an exact repeat of the one that wrote it. Nothing was written.
    DuplicateEventId {
        /// The stream appended to (empty when a streaming import cannot tell: the server
        /// reports a repeated id at the end of a `COPY` of several batches).
        stream: String,
        /// The id that is taken.
        id: uuid::Uuid,
    },
    /// The stream was deleted for good ([`Store::tombstone_stream`](crate::Store::tombstone_stream)):
    /// it can never be written again. Nothing was written.
    StreamDeleted {
        /// The stream.
        stream: String,
    },
    /// Inside a caller's transaction: the stream's last event was appended by a
    /// transaction that began writing after this one, so this append would sort before it
    /// in the global order. Nothing was written by this append, but the caller's
    /// transaction is still open: roll it back and retry it, as after a serialization
    /// failure. (Appends through the pool never see this.)
    StreamOrderConflict {
        /// The stream appended to.
        stream: String,
    },
    /// Inside a caller's transaction (or a bulk import): the transaction got its id
    /// before it first appended, and `$all` readers have meanwhile moved past that id, so
    /// its events would sort before events already delivered. Nothing was written by this
    /// call; roll the transaction back and retry it, as after a serialization failure.
    /// Appends through the pool retry this themselves. See "The global order" in the crate
    /// docs: taking the id with the first append (append first, then write your other
    /// rows) avoids it.
    FeedOrderConflict {
        /// The stream appended to (`None` for an import).
        stream: Option<String>,
    },
    /// A `$all` read waited for events committed before it, held back by an open
    /// appending transaction, longer than its limit
    /// ([`Config::read_all_wait`](crate::Config::read_all_wait),
    /// [`ReadAll::wait_at_most`](crate::ReadAll::wait_at_most)). Nothing was read.
    HeldBack {
        /// What holds the feed back.
        held: crate::HeldBack,
        /// How long the read waited.
        waited: std::time::Duration,
    },
    /// Another worker with this processor name is running (it holds the advisory lock).
    ProcessorLocked {
        /// The processor name.
        name: String,
    },
    /// A worker in batch mode lost its processor lock: the session holding it ended (a
    /// network failure, a server restart, `pg_terminate_backend`), so another instance
    /// could take the lock. The worker stopped its handlers as soon as it noticed (its
    /// lock's session is checked four times a second) and returned this; run it again to
    /// go on. (A live worker takes the lock again itself, once it is free, and goes on
    /// from its checkpoint.)
    ProcessorLockLost {
        /// The processor name.
        name: String,
        /// Why the lock's connection failed.
        source: postgres::Error,
    },
    /// A worker's handler failed on an event after all its retries, and the worker
    /// stopped (see [`OnFailure::Stop`](crate::OnFailure::Stop)).
    Handler {
        /// The processor name.
        processor: String,
        /// The event's stream.
        stream: String,
        /// The event's global position; the checkpoint stays before it.
        position: u64,
        /// How often the handler was called for it.
        attempts: u32,
        /// What the handler returned.
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A worker's handler panicked; the worker stopped (whatever its
    /// [`OnFailure`](crate::OnFailure) policy), its checkpoint before the event.
    HandlerPanicked {
        /// The processor name.
        processor: String,
    },
    /// The input was refused before anything was sent; the text names the problem.
    InvalidInput(String),
    /// A configuration value is wrong or cannot be honoured; the text names it.
    Config(String),
    /// The schema has not been created yet: run [`Store::migrate`](crate::Store::migrate).
    NotMigrated {
        /// The configured schema.
        schema: String,
    },
    /// The database holds a schema version this library does not know (a newer release
    /// migrated it). Nothing was changed.
    SchemaTooNew {
        /// The version found in the history table.
        found: i64,
        /// The newest version this library knows.
        supported: i64,
    },
    /// The server runs a PostgreSQL release older than 13, the oldest whose functions the
    /// store's statements use (`pg_current_xact_id`, `pg_current_snapshot`, `xid8`).
    /// Found by [`Store::connect`](crate::Store::connect) before anything was read or
    /// created.
    ServerTooOld {
        /// The server's `server_version`, such as "12.17".
        version: String,
    },
    /// One transaction appended more events than one transaction can hold
    /// (see [`MAX_EVENTS_PER_TRANSACTION`](crate::MAX_EVENTS_PER_TRANSACTION)).
    TransactionTooLarge {
        /// How many events the transaction would have held.
        events: u64,
    },
    /// A chunked import ([`ImportOptions::chunked`](crate::ImportOptions::chunked))
    /// failed after it had committed some of its transactions. The committed events are
    /// the first `committed_events` of the input; nothing after them was written. The
    /// cause is [`std::error::Error::source`] (and [`Error::ImportIncomplete`](crate::Error::ImportIncomplete)'s `source`).
    ImportIncomplete {
        /// How many events of the input are committed: import the rest by skipping this
        /// many, continuing existing streams.
        committed_events: u64,
        /// How many transactions committed them.
        transactions: u64,
        /// The global position of the last committed event.
        last_position: u64,
        /// Why the import stopped.
        source: Box<Error>,
    },
    /// No connection could be had from the pool in time.
    Pool {
        /// What the pool reported, with its size and state.
        message: String,
        /// The last error seen while opening a connection, if any: the real cause when
        /// the server is down, refuses us or does not answer. It is also the `source()`.
        last_connect_error: Option<Arc<Error>>,
    },
    /// The server could not be reached or refused the connection, when the store was
    /// opened or a health check connected.
    Connect {
        /// Where the store tried to connect (`host:port`, several if configured).
        target: String,
        /// Why it failed, such as "connection refused" or a server error.
        source: postgres::Error,
    },
    /// The server did not finish opening a connection within the connect timeout
    /// ([`Config::connect_timeout`](crate::Config::connect_timeout), per configured
    /// host): it accepted the TCP connection and never answered the startup message (a
    /// hung server, a pooler whose queue is full), or no TCP connection was made (a name
    /// lookup or connect that hung).
    ConnectTimeout {
        /// The server waited for (`host:port`).
        target: String,
        /// The connect timeout.
        timeout: Duration,
        /// Whether the TCP connection was made, so that the wait was for the server's
        /// answer to the startup message (or the TLS handshake or authentication).
        connected: bool,
    },
    /// [`PreparedAppends::append`](crate::PreparedAppends::append) was given a
    /// connection that does not have its prepared statements: they were prepared on
    /// another connection, or the server has dropped them (`DISCARD ALL`, a pooler in
    /// transaction mode that does not track prepared statements). Also
    /// [`StoreTransaction::append`](crate::StoreTransaction::append) after a
    /// `DISCARD ALL` on its connection. Nothing was written, and the caller's transaction is aborted
    /// (roll it back). The next call prepares the statements again on the connection it
    /// is given.
    NotPreparedHere {
        /// The server's error (SQLSTATE 26000, `invalid_sql_statement_name`).
        source: postgres::Error,
    },
    /// A PostgreSQL error: from the server (with SQLSTATE) or from the connection.
    Postgres(postgres::Error),
    /// Data could not be turned into JSON, or a snapshot's state out of it (a stored
    /// event that cannot be decoded is [`Error::Decode`](crate::Error::Decode)).
    Json(serde_json::Error),
    /// A stored event's data or metadata could not be decoded into the type asked for
    /// ([`RecordedEvent::data_as`](crate::RecordedEvent::data_as),
    /// [`RecordedEvent::metadata_as`](crate::RecordedEvent::metadata_as)).
    Decode {
        /// The event's stream.
        stream: String,
        /// The event's version in its stream.
        version: u64,
        /// The event's type.
        event_type: String,
        /// `"data"` or `"metadata"`.
        part: &'static str,
        /// What serde reported, such as a missing field.
        source: serde_json::Error,
    },
}

impl Error {
    /// The SQLSTATE code when the server reported the error.
    pub fn code(&self) -> Option<&postgres::error::SqlState> {
        match self {
            Error::Postgres(e)
            | Error::Connect { source: e, .. }
            | Error::NotPreparedHere { source: e } => e.code(),
            _ => None,
        }
    }

    /// The error and each of its causes on one line, each once: what `anyhow`'s `{:#}`
    /// prints.
    ///
    /// ```
    /// # use pg_eventstore::Config;
    /// let e = Config::new("postgres://[").unwrap_err();
    /// assert!(e.report().starts_with("invalid configuration"));
    /// ```
    pub fn report(&self) -> String {
        chain(self)
    }

    /// Whether this is a [`Error::WrongExpectedVersion`](crate::Error::WrongExpectedVersion).
    pub fn is_wrong_expected_version(&self) -> bool {
        matches!(self, Error::WrongExpectedVersion { .. })
    }

    /// Whether the failure is transient: the connection was lost or refused (also ended
    /// by the server's `idle_in_transaction_session_timeout` or `idle_session_timeout`),
    /// the server is shutting down, starting up or full, the transaction lost a
    /// serialization or deadlock conflict, or its `lock_timeout` ran out while it waited
    /// for a lock, or a statement the store had prepared was missing from its session
    /// (after `DISCARD ALL`; the next attempt prepares it again). The store has already
    /// retried such a failure
    /// [`Config::max_retries`](crate::Config::max_retries) times before returning it.
    pub fn is_transient(&self) -> bool {
        is_transient(self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => write!(
                f,
                "wrong expected version for stream {stream:?}: expected {expected}, but {actual}"
            ),
            Error::DuplicateEventId { stream, id } if stream.is_empty() => {
                write!(f, "event id {id} is already used by another event")
            }
            Error::DuplicateEventId { stream, id } => write!(
                f,
                "event id {id} is already used by another event (appending to stream {stream:?})"
            ),
            Error::StreamDeleted { stream } => write!(
                f,
                "stream {stream:?} has been deleted for good (tombstoned): it can never be \
                 written again"
            ),
            Error::StreamOrderConflict { stream } => write!(
                f,
                "stream {stream:?} was appended to by a transaction that started writing after \
                 this one; roll this transaction back and retry it"
            ),
            Error::FeedOrderConflict { stream } => {
                match stream {
                    Some(stream) => write!(f, "the append to stream {stream:?}")?,
                    None => write!(f, "the import")?,
                }
                write!(
                    f,
                    " was refused: its transaction got its id before readers of the global \
                     feed moved past it; roll this transaction back and retry it"
                )
            }
            Error::HeldBack { held, waited } => write!(
                f,
                "read_all waited {:.1}s for events committed before it: {held}",
                waited.as_secs_f64()
            ),
            Error::ProcessorLocked { name } => write!(
                f,
                "another worker named {name:?} is already running (it holds the processor's lock)"
            ),
            Error::ProcessorLockLost { name, source: _ } => write!(
                f,
                "worker {name:?} lost its processor lock (the connection holding it failed) \
                 and stopped, since another instance may take over"
            ),
            Error::Handler {
                processor,
                stream,
                position,
                attempts,
                source: _,
            } => write!(
                f,
                "worker {processor:?} failed on the event at position {position} of stream \
                 {stream:?} after {attempts} attempts"
            ),
            Error::HandlerPanicked { processor } => {
                write!(f, "a handler of worker {processor:?} panicked")
            }
            Error::InvalidInput(msg) => write!(f, "invalid input: {msg}"),
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::NotMigrated { schema } => write!(
                f,
                "the event store schema {schema:?} has not been created: run Store::migrate() first"
            ),
            Error::SchemaTooNew { found, supported } => write!(
                f,
                "the database schema is at version {found}, but this version of pg-eventstore \
                 knows versions up to {supported}: upgrade pg-eventstore"
            ),
            Error::ServerTooOld { version } => write!(
                f,
                "the server runs PostgreSQL {version}; pg-eventstore needs PostgreSQL 13 or newer"
            ),
            Error::TransactionTooLarge { events } => write!(
                f,
                "one transaction may append at most {} events, this one would hold {events}",
                crate::MAX_EVENTS_PER_TRANSACTION
            ),
            Error::ImportIncomplete {
                committed_events,
                transactions,
                last_position,
                ..
            } => write!(
                f,
                "the import stopped after committing the first {committed_events} events of \
                 its input in {transactions} transaction(s), up to position {last_position}; \
                 nothing after them was written (go on by skipping {committed_events} events \
                 and continuing existing streams)"
            ),
            Error::Pool { message, .. } => f.write_str(message),
            Error::Connect { target, .. } => {
                write!(f, "cannot connect to PostgreSQL at {target}")
            }
            Error::ConnectTimeout {
                target,
                timeout,
                connected: true,
            } => write!(
                f,
                "connecting to {target}: no answer to the startup message within {timeout:?} \
                 (the server accepted the TCP connection)"
            ),
            Error::ConnectTimeout {
                target,
                timeout,
                connected: false,
            } => write!(
                f,
                "connecting to {target}: no TCP connection within {timeout:?}"
            ),
            Error::NotPreparedHere { .. } => f.write_str(
                "the append statements are not prepared on this connection (they were \
                 prepared on another one, or the server dropped them); nothing was written",
            ),
            Error::Postgres(e) => match e.as_db_error() {
                // This level is the SQLSTATE (and constraint); the server's message,
                // detail and hint are the source's.
                Some(db) => {
                    write!(f, "database error {}", db.code().code())?;
                    if let Some(c) = db.constraint() {
                        write!(f, " on constraint {c}")?;
                    }
                    Ok(())
                }
                None => fmt::Display::fmt(e, f),
            },
            Error::Json(_) => f.write_str("JSON error"),
            Error::Decode {
                stream,
                version,
                event_type,
                part,
                source: _,
            } => write!(
                f,
                "cannot decode the {part} of event {version} of stream {stream:?} \
                 (type {event_type:?})"
            ),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            // `Display` stood in for the `postgres::Error` level: go on below it.
            Error::Postgres(e) => StdError::source(e),
            Error::Connect { source, .. } | Error::NotPreparedHere { source } => Some(source),
            Error::Json(e) => Some(e),
            Error::Decode { source, .. } => Some(source),
            Error::Handler { source, .. } => Some(source.as_ref()),
            Error::ProcessorLockLost { source, .. } => Some(source),
            Error::Pool {
                last_connect_error: Some(e),
                ..
            } => Some(e.as_ref()),
            Error::ImportIncomplete { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Whether `e` is worth another attempt (see [`Config::max_retries`](crate::Config::max_retries)).
fn is_transient(e: &Error) -> bool {
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
            // The server ended the session for being idle (in a transaction): a new
            // connection goes on.
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            SqlState::IDLE_SESSION_TIMEOUT,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            // `lock_timeout` ran out while another transaction held a lock we wait for
            // (a stream's, for an `Any` append): it ends, and the next attempt gets it.
            SqlState::LOCK_NOT_AVAILABLE,
            // A prepared statement the session no longer has (`DISCARD ALL`): the store
            // prepares its statements again on the next attempt.
            SqlState::INVALID_SQL_STATEMENT_NAME,
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

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        crate::store::statements_lost(&e);
        Error::Postgres(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e)
    }
}

/// Renders an error and its whole `source()` chain on one line. A level whose text is
/// already in the line is left out (TLS errors repeat their source's text in their own).
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Each level of the chain, from the error down.
    fn levels(e: &dyn StdError) -> Vec<String> {
        let mut levels = vec![e.to_string()];
        let mut source = e.source();
        while let Some(s) = source {
            levels.push(s.to_string());
            source = s.source();
        }
        levels
    }

    /// No level of `e`'s chain repeats what a level below it says.
    fn assert_no_repeats(e: &dyn StdError) {
        let levels = levels(e);
        for (i, upper) in levels.iter().enumerate() {
            assert!(!upper.is_empty(), "an empty level in {levels:?}");
            for lower in &levels[i + 1..] {
                let first_line = lower.lines().next().unwrap_or_default();
                assert!(
                    !upper.contains(first_line),
                    "{upper:?} repeats its cause {lower:?} (chain {levels:?})"
                );
            }
        }
    }

    /// The error of a connect to a port nobody listens on.
    pub(crate) fn refused() -> postgres::Error {
        match postgres::Config::new()
            .host("127.0.0.1")
            .port(1)
            .user("u")
            .connect(postgres::NoTls)
        {
            Ok(_) => panic!("something listens on port 1"),
            Err(e) => e,
        }
    }

    fn json_error() -> serde_json::Error {
        serde_json::from_str::<u32>("\"x\"").unwrap_err()
    }

    #[test]
    fn every_variant_prints_each_cause_once() {
        let connect = Error::Connect {
            target: "127.0.0.1:1".into(),
            source: refused(),
        };
        let report = connect.report().to_lowercase();
        assert!(
            report.starts_with("cannot connect to postgresql at 127.0.0.1:1: ")
                && report.contains("refused"),
            "{report}"
        );
        let timeout = Error::ConnectTimeout {
            target: "127.0.0.1:6543".into(),
            timeout: Duration::from_secs(2),
            connected: true,
        };
        assert!(timeout.to_string().starts_with(
            "connecting to 127.0.0.1:6543: no answer to the startup message within 2s"
        ));
        let handler_cause =
            std::io::Error::other(Error::InvalidInput("the amount is negative".into()));
        let all = vec![
            Error::WrongExpectedVersion {
                stream: "s".into(),
                expected: ExpectedVersion::Exact(1),
                actual: ActualVersion::Unknown,
            },
            Error::DuplicateEventId {
                stream: "s".into(),
                id: uuid::Uuid::nil(),
            },
            Error::StreamOrderConflict { stream: "s".into() },
            Error::StreamDeleted { stream: "s".into() },
            Error::ProcessorLocked { name: "p".into() },
            Error::Handler {
                processor: "p".into(),
                stream: "s".into(),
                position: 7,
                attempts: 3,
                source: Box::new(handler_cause),
            },
            Error::HandlerPanicked {
                processor: "p".into(),
            },
            Error::InvalidInput("x".into()),
            Error::Config("y".into()),
            Error::NotMigrated { schema: "s".into() },
            Error::SchemaTooNew {
                found: 9,
                supported: 4,
            },
            Error::ServerTooOld {
                version: "12.17".into(),
            },
            Error::TransactionTooLarge { events: 1 << 21 },
            Error::Pool {
                message: "the connection pool could not open a connection within 5s".into(),
                last_connect_error: Some(Arc::new(Error::Connect {
                    target: "127.0.0.1:1".into(),
                    source: refused(),
                })),
            },
            Error::Pool {
                message: "the connection pool is exhausted".into(),
                last_connect_error: Some(Arc::new(Error::ConnectTimeout {
                    target: "127.0.0.1:6543".into(),
                    timeout: Duration::from_secs(2),
                    connected: true,
                })),
            },
            connect,
            Error::ConnectTimeout {
                target: "127.0.0.1:6543".into(),
                timeout: Duration::from_secs(2),
                connected: false,
            },
            Error::Postgres(refused()),
            Error::Json(json_error()),
            Error::Decode {
                stream: "s".into(),
                version: 3,
                event_type: "Deposited".into(),
                part: "data",
                source: json_error(),
            },
        ];
        for e in &all {
            assert_no_repeats(e);
        }
    }

    #[test]
    fn what_is_transient() {
        assert!(!is_transient(&Error::InvalidInput("x".into())));
        assert!(!is_transient(&Error::WrongExpectedVersion {
            stream: "s".into(),
            expected: crate::ExpectedVersion::NoStream,
            actual: crate::ActualVersion::Exact(1),
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
