//! The one error type of the crate.

use std::error::Error as StdError;
use std::fmt;

use crate::event::ExpectedVersion;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `pg_eventstore`.
///
/// Domain errors carry their data; wrapped failures keep their cause, reachable through
/// [`std::error::Error::source`] and printed by `Display`, so a log line says *why* (the
/// SQLSTATE and server message, or "connection refused") and not only "db error".
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the append expected. Nothing was written.
    WrongExpectedVersion {
        /// The stream appended to.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was refused (`None`: the stream does not
        /// exist). `None` is also reported when a concurrent append won a race inside the
        /// caller's own transaction and the winner has not committed yet.
        actual: Option<u64>,
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
    /// Inside a caller's transaction: the stream's last event was appended by a
    /// transaction that began writing after this one, so this append would sort before it
    /// in the global order. Nothing was written by this append, but the caller's
    /// transaction is still open: roll it back and retry it, as after a serialization
    /// failure. (Appends through the pool never see this.)
    StreamOrderConflict {
        /// The stream appended to.
        stream: String,
    },
    /// Another worker with this processor name is running (it holds the advisory lock).
    ProcessorLocked {
        /// The processor name.
        name: String,
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
    /// A worker's handler panicked; the worker stopped, its checkpoint before the event.
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
    /// One transaction appended more events than one transaction can hold
    /// (see [`MAX_EVENTS_PER_TRANSACTION`](crate::MAX_EVENTS_PER_TRANSACTION)).
    TransactionTooLarge {
        /// How many events the transaction would have held.
        events: u64,
    },
    /// A chunked import ([`ImportOptions::chunked`](crate::ImportOptions::chunked))
    /// failed after it had committed some of its transactions. The committed events are
    /// the first `committed_events` of the input; nothing after them was written. The
    /// cause is [`std::error::Error::source`] (and [`Error::ImportIncomplete`]'s `source`).
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
        /// the server is down or refuses us.
        last_connect_error: Option<String>,
    },
    /// The server could not be reached or refused the connection, when the store was
    /// opened or a health check connected.
    Connect {
        /// Where the store tried to connect (`host:port`, several if configured).
        target: String,
        /// Why it failed, such as "connection refused" or a server error.
        source: postgres::Error,
    },
    /// A PostgreSQL error: from the server (with SQLSTATE) or from the connection.
    Postgres(postgres::Error),
    /// Event data could not be turned into or out of JSON.
    Json(serde_json::Error),
}

impl Error {
    /// The SQLSTATE code when the server reported the error.
    pub fn code(&self) -> Option<&postgres::error::SqlState> {
        match self {
            Error::Postgres(e) | Error::Connect { source: e, .. } => e.code(),
            _ => None,
        }
    }

    /// Whether this is a [`Error::WrongExpectedVersion`].
    pub fn is_wrong_expected_version(&self) -> bool {
        matches!(self, Error::WrongExpectedVersion { .. })
    }

    /// Whether the failure is transient: the connection was lost or refused, the server
    /// is shutting down, starting up or full, or the transaction lost a serialization
    /// or deadlock conflict. The store has already retried such a failure
    /// [`Config::max_retries`](crate::Config::max_retries) times before returning it.
    pub fn is_transient(&self) -> bool {
        crate::retry::is_transient(self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "wrong expected version for stream {stream:?}: expected {expected}, but "
                )?;
                match actual {
                    Some(v) => write!(f, "the stream is at version {v}"),
                    None => write!(f, "the stream does not exist"),
                }
            }
            Error::DuplicateEventId { stream, id } if stream.is_empty() => {
                write!(f, "event id {id} is already used by another event")
            }
            Error::DuplicateEventId { stream, id } => write!(
                f,
                "event id {id} is already used by another event (appending to stream {stream:?})"
            ),
            Error::StreamOrderConflict { stream } => write!(
                f,
                "stream {stream:?} was appended to by a transaction that started writing after \
                 this one; roll this transaction back and retry it"
            ),
            Error::ProcessorLocked { name } => write!(
                f,
                "another worker named {name:?} is already running (it holds the processor's lock)"
            ),
            Error::Handler {
                processor,
                stream,
                position,
                attempts,
                source,
            } => write!(
                f,
                "worker {processor:?} failed on the event at position {position} of stream \
                 {stream:?} after {attempts} attempts: {source}"
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
            Error::Pool {
                message,
                last_connect_error,
            } => {
                write!(f, "{message}")?;
                if let Some(cause) = last_connect_error {
                    write!(f, "; last connection error: {cause}")?;
                }
                Ok(())
            }
            Error::Connect { target, source } => {
                write!(f, "cannot connect to PostgreSQL at {target}: ")?;
                write_postgres_error(f, source)
            }
            Error::Postgres(e) => write_postgres_error(f, e),
            Error::Json(e) => write!(f, "JSON error: {e}"),
        }
    }
}

/// `postgres::Error` prints only "db error"; print the server's words and SQLSTATE,
/// or the I/O cause, too.
fn write_postgres_error(f: &mut fmt::Formatter<'_>, e: &postgres::Error) -> fmt::Result {
    if let Some(db) = e.as_db_error() {
        write!(
            f,
            "database error {}: {}: {}",
            db.code().code(),
            db.severity(),
            db.message()
        )?;
        if let Some(detail) = db.detail() {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(c) = db.constraint() {
            write!(f, " (constraint: {c})")?;
        }
        return Ok(());
    }
    // The causes, each once: TLS errors repeat their source's text in their own.
    write!(f, "{}", chain(e))
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Postgres(e) => Some(e),
            Error::Connect { source, .. } => Some(source),
            Error::Json(e) => Some(e),
            Error::Handler { source, .. } => Some(source.as_ref()),
            Error::ImportIncomplete { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Postgres(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Json(e)
    }
}

/// Renders an error and its whole `source()` chain on one line.
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
