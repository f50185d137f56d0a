//! Bulk import through binary `COPY`: from a slice ([`Store::import`],
//! [`Store::import_in`]), or streamed with bounded memory from any iterator or from JSON
//! lines ([`Store::import_iter`], [`Store::import_json_lines`]).
//!
//! How a streaming import runs: the calling thread pulls events from the input, checks
//! them and hands them on in batches (at most [`BATCH_EVENTS`] events or [`BATCH_BYTES`]
//! bytes) through a channel that holds one batch; a writer thread owns the connection,
//! looks up the heads of the streams a batch brings that it does not know yet, and sends
//! the batch through one binary `COPY`. So the input is read while the server writes,
//! and memory holds at most three batches plus one small entry per stream of the current
//! transaction (at most [`MAX_KNOWN_STREAMS`]; beyond that the entries are dropped and
//! looked up again, which the transaction's own writes answer).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::thread;
use std::time::SystemTime;

use crossbeam_channel::{bounded, Receiver, Sender};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{Statement, Transaction};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{
    is_marker, validate_stream_id, EventData, ImportEvent, JsonbParam, STREAM_DELETED,
    STREAM_TOMBSTONE,
};
use crate::jsonl::JsonLines;
use crate::sql::{MAX_EVENTS_PER_TRANSACTION, TOMBSTONE_HEAD};
use crate::store::{duplicate_id, unique_violation, Store, UniqueViolation};
use crate::version::{ActualVersion, ExpectedVersion};

/// The most events the reader hands to the writer thread at once.
const BATCH_EVENTS: usize = 8192;
/// The most bytes of stream ids, types, data and metadata in one batch.
const BATCH_BYTES: usize = 4 << 20;
/// How many streams' next versions the writer keeps before it forgets them all.
const MAX_KNOWN_STREAMS: usize = 65_536;
/// [`MAX_EVENTS_PER_TRANSACTION`] as a position offset.
const SLOT: i64 = MAX_EVENTS_PER_TRANSACTION as i64;

/// Options for the imports ([`Store::import`], [`Store::import_iter`], ...). The default
/// refuses streams that already exist and makes the import one transaction.
///
/// ```
/// use pg_eventstore::ImportOptions;
/// // Add to existing streams, and commit every MAX_EVENTS_PER_TRANSACTION events.
/// let options = ImportOptions::new().continue_existing_streams(true).chunked(true);
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportOptions {
    continue_existing: bool,
    chunked: bool,
    chunk_events: u64,
    exported: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            continue_existing: false,
            chunked: false,
            chunk_events: MAX_EVENTS_PER_TRANSACTION,
            exported: false,
        }
    }
}

impl ImportOptions {
    /// Refuse streams that already hold events, all or nothing (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// With `true`, events for a stream that already exists are added after its last
    /// event (versions go on from its current version) instead of failing the import.
    /// Default: `false`.
    pub fn continue_existing_streams(mut self, yes: bool) -> Self {
        self.continue_existing = yes;
        self
    }

    /// With `true`, a streaming import ([`Store::import_iter`],
    /// [`Store::import_json_lines`]) of more than [`MAX_EVENTS_PER_TRANSACTION`] events
    /// commits them in transactions of that many, one after the other, instead of being
    /// refused. Each transaction is atomic and the committed ones always hold a prefix of
    /// the input: when a later one fails, the error is [`Error::ImportIncomplete`], which
    /// says how many input events are committed, so that the import can go on after them.
    /// An input that fits in one transaction is atomic either way. Default: `false`.
    /// [`Store::import`] and [`Store::import_in`] take slices that must fit in one
    /// transaction and refuse this option.
    pub fn chunked(mut self, yes: bool) -> Self {
        self.chunked = yes;
        self
    }

    /// With `true`, the input is an export of a store (`pg-eventstore export`, or the
    /// events of [`Store::read_all`] as [`ImportEvent`]s with their versions), and the
    /// import makes its streams read as they read there, also where the stream lifecycle
    /// removed events:
    ///
    /// * a stream the import starts may begin at the version its first event gives (the
    ///   versions before it were removed by a delete, a truncation or retention), and the
    ///   stream's `$tb` is set there;
    /// * the markers [`STREAM_DELETED`](crate::STREAM_DELETED) and
    ///   [`STREAM_TOMBSTONE`](crate::STREAM_TOMBSTONE) are imported as what they are:
    ///   after a delete marker the stream's `$tb` is set past it, and a tombstoned stream
    ///   can never be written again.
    ///
    /// Other event types starting with `$` are still refused, and so is a version that
    /// does not follow the one before it in the stream. Stream metadata (custom keys,
    /// `$maxCount`, `$maxAge`, and a `$tb` of its own) and snapshots are not part of an
    /// export: events that a `$tb` hides but that are not removed yet (a `$tb` written
    /// with [`Store::set_stream_metadata`](crate::Store::set_stream_metadata) before
    /// [`Store::scavenge`](crate::Store::scavenge) ran, a truncation cut short) are in
    /// the export and read again in the copy, so run `scavenge` before you export.
    /// Default: `false`, which refuses the markers and counts every new stream's versions
    /// from 0.
    pub fn exported(mut self, yes: bool) -> Self {
        self.exported = yes;
        self
    }

    /// For a chunked import: commit every `events` events (at least 1, at most
    /// [`MAX_EVENTS_PER_TRANSACTION`], the default), for shorter transactions.
    /// Implies [`ImportOptions::chunked`].
    pub fn chunk_size(mut self, events: u64) -> Self {
        self.chunked = true;
        self.chunk_events = events.clamp(1, MAX_EVENTS_PER_TRANSACTION);
        self
    }
}

/// What an import wrote. Serializes with its field names, as `pg-eventstore import`
/// prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ImportSummary {
    /// How many events were written.
    pub events: u64,
    /// How many distinct streams they went to.
    pub streams: u64,
    /// Global position of the first event imported.
    pub first_position: u64,
    /// Global position of the last event imported. Within one transaction the events
    /// have consecutive positions, in input order; a chunked import's transactions each
    /// have their own range, in input order too.
    pub last_position: u64,
    /// How many transactions committed the events (more than 1 only for a chunked
    /// import).
    pub transactions: u64,
}

/// Names an input event in errors: "line 7" when it came from JSON lines, else
/// "event 6" (counting from 0, as [`Store::append`] does).
#[derive(Clone, Copy)]
struct Label {
    line: Option<u64>,
    index: u64,
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}"),
            None => write!(f, "event {}", self.index),
        }
    }
}

/// An input event on its way to the writer, with its index in the input.
struct Item {
    event: ImportEvent,
    index: u64,
}

impl Item {
    fn label(&self) -> Label {
        Label {
            line: self.event.line,
            index: self.index,
        }
    }
}

enum Msg {
    Batch(Vec<Item>),
    /// The input ended without an error (a closed channel without it means it failed).
    End,
}

const COPY_TYPES: [Type; 8] = [
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
    Type::TIMESTAMPTZ,
];

impl Store {
    /// Imports `events`, each given with its stream id, in one transaction through binary
    /// `COPY`: the fastest way to load history (a migration from another store, a
    /// replay, test fixtures).
    ///
    /// * Events get consecutive global positions in input order, in the same
    ///   transaction-ordered position space as [`Store::append`], so `$all` readers see
    ///   the whole import at once, after it commits, and never a part of it.
    /// * Versions are counted per stream in input order, starting at 0 (events of
    ///   different streams may be interleaved).
    /// * A stream that already holds events is refused with
    ///   [`Error::WrongExpectedVersion`] (expected: no stream) unless
    ///   [`ImportOptions::continue_existing_streams`] is set; then its versions go on from
    ///   its current version. Concurrent imports into the same existing streams wait for
    ///   each other (a transaction-scoped advisory lock per stream, taken in sorted order
    ///   for each batch of up to 8,192 events; two imports whose batches meet the same
    ///   streams in different orders can deadlock, and PostgreSQL then fails one of them,
    ///   which writes nothing). Appends take no such
    ///   lock: an append that commits to one of the import's streams after the import has
    ///   read its heads makes the import fail with [`Error::WrongExpectedVersion`], and an
    ///   append that comes while the import runs waits for it and then sees the imported
    ///   events. The unique `(stream_id, version)` constraint decides, never a read.
    /// * One transaction holds at most [`MAX_EVENTS_PER_TRANSACTION`] events: a larger
    ///   slice is refused with [`Error::TransactionTooLarge`] before anything is sent.
    ///   For more, stream the events with [`Store::import_iter`] and
    ///   [`ImportOptions::chunked`].
    /// * Input is checked like [`Store::append`] checks it (an id given twice is refused
    ///   before anything is sent); on any error nothing is written.
    ///
    /// ```no_run
    /// # use pg_eventstore::{EventData, ImportOptions, Store};
    /// # let store = Store::from_env()?;
    /// let events = vec![
    ///     ("user-1", EventData::json("Registered", serde_json::json!({ "name": "ada" }))),
    ///     ("user-2", EventData::json("Registered", serde_json::json!({ "name": "bob" }))),
    ///     ("user-1", EventData::json("Renamed", serde_json::json!({ "name": "Ada" }))),
    /// ];
    /// let summary = store.import(&events, ImportOptions::new())?;
    /// assert_eq!((summary.events, summary.streams), (3, 2));
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn import<S: AsRef<str>>(
        &self,
        events: &[(S, EventData)],
        options: ImportOptions,
    ) -> Result<ImportSummary> {
        check_slice(events, options)?;
        self.run_import(None, slice_events(events), options)
    }

    /// [`Store::import`] inside the caller's transaction: the events commit or roll back
    /// with it, and share its global position slot with its appends (they may come
    /// before or after the import; the transaction's total is still limited to
    /// [`MAX_EVENTS_PER_TRANSACTION`]). Subscribers are woken when it commits (by the
    /// store's commit watcher, as after [`Store::append_in`]: the commit itself carries
    /// no `NOTIFY`). On an error PostgreSQL aborts the transaction: roll it back. If the
    /// transaction wrote before a concurrent transaction appended to one of the continued
    /// streams, the import fails with [`Error::StreamOrderConflict`], as
    /// [`Store::append_in`] would.
    ///
    /// Heads of existing streams are read in the caller's snapshot; in a `REPEATABLE
    /// READ` transaction a concurrent import into the same streams therefore ends in a
    /// conflict instead of waiting and continuing after it.
    pub fn import_in<S: AsRef<str>>(
        &self,
        tx: &mut Transaction<'_>,
        events: &[(S, EventData)],
        options: ImportOptions,
    ) -> Result<ImportSummary> {
        check_slice(events, options)?;
        let summary = self.run_import(Some(&mut *tx), slice_events(events), options)?;
        if summary.events > 0 {
            // As after `append_in`: the commit watcher learns when the transaction ends
            // and wakes this process's subscribers (and notifies other processes'), so the
            // caller's commit carries no NOTIFY.
            // Unprepared in one round trip (`query_one` with a string prepares first);
            // the statement returns one row.
            let rows = tx
                .query_typed(self.sql().watch_in.text(), &[])
                .map_err(|e| self.map_error(e))?;
            if let Some(row) = rows.first() {
                self.hub().watch(row.get(0));
            }
        }
        Ok(summary)
    }

    /// Imports events as an iterator yields them, through binary `COPY`, without holding
    /// the input in memory: any number of events, in the order given, with the rules of
    /// [`Store::import`] (versions counted per stream, existing streams refused unless
    /// [`ImportOptions::continue_existing_streams`], the input's
    /// [`version`](ImportEvent::version) and [`position`](ImportEvent::position) checked).
    ///
    /// **Atomic up to [`MAX_EVENTS_PER_TRANSACTION`] events**: by default the import is
    /// one transaction, and an input with more events is refused with
    /// [`Error::TransactionTooLarge`] (after reading that far) and writes nothing. With
    /// [`ImportOptions::chunked`], a larger input is committed in transactions of that
    /// many events; if one fails, those before it stay committed and the error is
    /// [`Error::ImportIncomplete`], which says how many input events they hold: import
    /// the rest by skipping that many, with `continue_existing_streams(true)` (the
    /// streams of the committed part now exist). We chose this rather than splitting
    /// silently, because an import that half succeeds must be a choice you made.
    ///
    /// An `Err` item from the iterator (a bad input line, say) ends the import: the
    /// transaction it was writing rolls back and the error is returned (within
    /// [`Error::ImportIncomplete`] if earlier chunks were committed). Memory stays at a
    /// few batches of events however long the input; see the module source for how.
    ///
    /// Each transaction writes with one `COPY`, which lasts as long as its events take to
    /// arrive: the import's own transactions run without `statement_timeout` (the role's
    /// or [`Config::statement_timeout`](crate::Config::statement_timeout)).
    /// [`Store::import_in`] runs under your transaction's settings.
    ///
    /// ```no_run
    /// # use pg_eventstore::{EventData, ImportEvent, ImportOptions, Store};
    /// # let store = Store::from_env()?;
    /// // Ten million events, never more than a few thousand in memory.
    /// let events = (0..10_000_000u64).map(|i| {
    ///     let data = serde_json::json!({ "n": i });
    ///     Ok(ImportEvent::new(format!("meter-{}", i / 1000), EventData::json("Read", data)))
    /// });
    /// let summary = store.import_iter(events, ImportOptions::new().chunked(true))?;
    /// assert_eq!(summary.events, 10_000_000);
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn import_iter<I>(&self, events: I, options: ImportOptions) -> Result<ImportSummary>
    where
        I: IntoIterator<Item = Result<ImportEvent>>,
    {
        self.run_import(None, events.into_iter(), options)
    }

    /// [`Store::import_iter`] of the JSON lines that `reader` holds (see [`JsonLines`]
    /// for the format): what `pg-eventstore export` writes, this reads. A bad line ends
    /// the import with an [`Error::InvalidInput`] that names the line, and (for an atomic
    /// import) nothing is written.
    ///
    /// ```no_run
    /// # use pg_eventstore::{ImportOptions, Store};
    /// # let store = Store::from_env()?;
    /// let file = std::fs::File::open("events.jsonl").expect("the export");
    /// let summary = store.import_json_lines(file, ImportOptions::new())?;
    /// println!("{} events in {} streams", summary.events, summary.streams);
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn import_json_lines<R: Read>(
        &self,
        reader: R,
        options: ImportOptions,
    ) -> Result<ImportSummary> {
        self.import_iter(JsonLines::new(reader), options)
    }

    /// Runs an import: this thread reads and checks the input, a scoped writer thread
    /// writes it into the caller's transaction `tx`, or (`None`) into transactions of its
    /// own on a pooled connection.
    fn run_import<I>(
        &self,
        tx: Option<&mut Transaction<'_>>,
        events: I,
        options: ImportOptions,
    ) -> Result<ImportSummary>
    where
        I: Iterator<Item = Result<ImportEvent>>,
    {
        let (sender, receiver) = bounded(1);
        let (fed, written, committed) = thread::scope(|scope| {
            let writer = thread::Builder::new()
                .name("pg-eventstore-import".into())
                .spawn_scoped(scope, move || {
                    let mut writer = Writer::new(self, options);
                    let written = match tx {
                        Some(tx) => writer.write_caller_transaction(tx, &receiver),
                        None => writer.write_own_transactions(&receiver),
                    };
                    (written, writer.committed)
                })
                .expect("spawn the import writer thread");
            let fed = feed(events, options.exported, sender);
            match writer.join() {
                Ok((written, committed)) => (fed, written, committed),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        });
        // An input error is the cause even when the writer saw it only as the end of
        // its input; otherwise the writer's error is, and the input just stopped.
        let result = match (fed, written) {
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(committed.summary()),
        };
        match result {
            Err(e) if committed.events > 0 => Err(Error::ImportIncomplete {
                committed_events: committed.events,
                transactions: committed.transactions,
                last_position: committed.last as u64,
                source: Box::new(e),
            }),
            other => other,
        }
    }
}

/// The checks of the slice imports that need the whole input: its size, and ids given
/// twice. Everything else is checked event by event as it goes to the writer.
fn check_slice<S: AsRef<str>>(events: &[(S, EventData)], options: ImportOptions) -> Result<()> {
    if options.chunked {
        return Err(Error::InvalidInput(
            "a chunked import streams its input: use Store::import_iter".into(),
        ));
    }
    if events.len() as u64 > MAX_EVENTS_PER_TRANSACTION {
        return Err(Error::TransactionTooLarge {
            events: events.len() as u64,
        });
    }
    let mut ids: Vec<Uuid> = events.iter().map(|(_, e)| e.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidInput(format!(
            "event id {} appears twice in one import",
            w[0]
        )));
    }
    Ok(())
}

fn slice_events<S: AsRef<str>>(
    events: &[(S, EventData)],
) -> impl Iterator<Item = Result<ImportEvent>> + '_ {
    events
        .iter()
        .map(|(s, e)| Ok(ImportEvent::new(s.as_ref(), e.clone())))
}

/// Raises the `$tb` to set for `stream` to at least `version`.
fn raise(truncate_before: &mut HashMap<String, i64>, stream: &str, version: i64) {
    let tb = truncate_before.entry(stream.to_string()).or_insert(version);
    *tb = (*tb).max(version);
}

/// The reading side: checks each event, batches them, and hands the batches to the
/// writer. `Ok` when the input ended (and `End` was sent) or the writer stopped (its
/// error is the one to report); `Err` when the input failed or was refused.
fn feed<I: Iterator<Item = Result<ImportEvent>>>(
    events: I,
    exported: bool,
    writer: Sender<Msg>,
) -> Result<()> {
    let mut batch = Vec::with_capacity(BATCH_EVENTS);
    let mut bytes = 0;
    let mut index = 0u64;
    let mut last_position: Option<u64> = None;
    for event in events {
        let event = event?;
        let item = Item { event, index };
        let (event, label) = (&item.event, item.label());
        validate_stream_id(&event.stream).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("{label}: {m}")),
            e => e,
        })?;
        // Markers only in an import of an export (see `ImportOptions::exported`).
        if exported && is_marker(&event.event.event_type) {
            event.event.validate_json_as(&label)?;
        } else {
            event.event.validate_as(&label)?;
        }
        if let Some(t) = event.recorded_at {
            crate::event::check_json_time(t)
                .map_err(|m| Error::InvalidInput(format!("{label}: recorded_at: {m}")))?;
        }
        if let Some(p) = event.position {
            if let Some(previous) = last_position.filter(|previous| p <= *previous) {
                return Err(Error::InvalidInput(format!(
                    "{label}: position {p} does not come after the previous event's \
                     position {previous}: the input is not in global order"
                )));
            }
            last_position = Some(p);
        }
        bytes += event.stream.len()
            + event.event.event_type.len()
            + event.event.data.len()
            + event.event.metadata.as_ref().map_or(0, Vec::len);
        batch.push(item);
        index += 1;
        if batch.len() >= BATCH_EVENTS || bytes >= BATCH_BYTES {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_EVENTS));
            if writer.send(Msg::Batch(full)).is_err() {
                return Ok(());
            }
            bytes = 0;
        }
    }
    if index == 0 {
        return Err(Error::InvalidInput("no events to import".into()));
    }
    if !batch.is_empty() && writer.send(Msg::Batch(batch)).is_err() {
        return Ok(());
    }
    let _ = writer.send(Msg::End);
    Ok(())
}

/// The next batch from the reader: `None` when the input has ended.
fn receive(input: &Receiver<Msg>) -> Result<Option<Vec<Item>>, Failure> {
    match input.recv() {
        Ok(Msg::Batch(batch)) => Ok(Some(batch)),
        Ok(Msg::End) => Ok(None),
        Err(_) => Err(Failure::InputFailed),
    }
}

/// Why the writer stopped.
enum Failure {
    /// An error decided here.
    Done(Error),
    /// A server error to map; for a repeated event id, the stream of the event that
    /// carried it (found in the batch).
    Postgres(postgres::Error, Option<String>),
    /// The input ended without `End`: it failed, and the reader reports why.
    InputFailed,
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Postgres(e, None)
    }
}

impl Failure {
    /// A failed `COPY`: for a repeated id, remembers which stream it was given for.
    fn copy(e: postgres::Error, batch: &[Item]) -> Failure {
        let stream = match unique_violation(&e) {
            Some(UniqueViolation::EventId) => duplicate_id(&e).and_then(|id| {
                batch
                    .iter()
                    .find(|i| i.event.event.id == id)
                    .map(|i| i.event.stream.clone())
            }),
            _ => None,
        };
        Failure::Postgres(e, stream)
    }
}

/// Counts of what an import wrote (in one transaction, or committed in all).
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    events: u64,
    streams: u64,
    transactions: u64,
    first: Option<i64>,
    last: i64,
}

impl Progress {
    fn add(&mut self, other: &Progress) {
        self.events += other.events;
        self.streams += other.streams;
        self.transactions += other.transactions;
        self.first = self.first.or(other.first);
        if other.first.is_some() {
            self.last = other.last;
        }
    }

    fn summary(&self) -> ImportSummary {
        ImportSummary {
            events: self.events,
            streams: self.streams,
            first_position: self.first.unwrap_or(0) as u64,
            last_position: self.last as u64,
            transactions: self.transactions,
        }
    }
}

/// The position range of one transaction: `lo` is its first position (`xid << 20`),
/// `first` the first one this import writes (a caller's transaction may have appended
/// before), `next` the next one to write.
struct Slot {
    lo: i64,
    first: i64,
    next: i64,
    /// The transaction's time, for events without a `recorded_at` of their own.
    now: SystemTime,
}

/// Statements prepared once per import on the writer's connection.
struct Statements {
    slot: Statement,
    lock: Statement,
    heads: Statement,
    fresh: Statement,
    copy: Statement,
}

/// The writing side, on its own thread with the connection.
struct Writer<'s> {
    store: &'s Store,
    options: ImportOptions,
    statements: Option<Statements>,
    /// The next version of each stream met (in the current transaction, when
    /// continuing existing streams).
    known: HashMap<String, i64>,
    /// Whether `known` was ever emptied because it grew too large: from then on, a
    /// stream it does not hold may be one this import wrote, and is looked up.
    forgot: bool,
    /// The position ranges of the transactions this import has committed, so that a
    /// stream it wrote to there is not taken for one that existed before.
    ours: Vec<(i64, i64)>,
    /// The streams the current transaction started at version 0 without looking them
    /// up (see `must_look_up`), checked before it ends (see `check_fresh`).
    fresh: Vec<String>,
    /// For an import of an export: the `$tb` that the current transaction's streams get
    /// (see `ImportOptions::exported`).
    truncate_before: HashMap<String, i64>,
    /// For an import of an export: the streams it tombstoned, which take no more events.
    tombstoned: HashSet<String>,
    current: Progress,
    committed: Progress,
    /// Whether the (caller's) transaction had an id before it took the events table's
    /// lock and had not appended: then the feed floor is checked before it commits.
    check_floor: bool,
}

impl<'s> Writer<'s> {
    fn new(store: &'s Store, options: ImportOptions) -> Self {
        Writer {
            store,
            options,
            statements: None,
            known: HashMap::new(),
            forgot: false,
            ours: Vec::new(),
            fresh: Vec::new(),
            truncate_before: HashMap::new(),
            tombstoned: HashSet::new(),
            current: Progress::default(),
            committed: Progress::default(),
            check_floor: false,
        }
    }

    /// Writes into transactions of its own, one after the other (several only when
    /// chunked), on one pooled connection.
    fn write_own_transactions(&mut self, input: &Receiver<Msg>) -> Result<()> {
        let store = self.store;
        let mut conn = store.conn()?;
        let mut pending = None;
        loop {
            let mut tx = conn.transaction().map_err(|e| store.map_error(e))?;
            // Its COPY is one statement for however many events, and lasts as long as
            // the input takes to arrive: the session's `statement_timeout` (the role's,
            // or `Config::statement_timeout`) is for queries, not for this.
            tx.batch_execute("SET LOCAL statement_timeout = 0")
                .map_err(|e| store.map_error(e))?;
            let more = match self.transaction(&mut tx, input, &mut pending) {
                Ok(more) => more,
                Err(failure) => {
                    // Roll back and give the connection back before mapping the error,
                    // which may need a connection of its own.
                    drop(tx);
                    drop(conn);
                    return Err(self.error(failure));
                }
            };
            // Its own transaction took the events table's lock before its id (see
            // `transaction`): the feed floor cannot have passed it.
            tx.commit().map_err(|e| store.map_error(e))?;
            self.commit();
            store.hub().appended();
            if !more {
                return Ok(());
            }
        }
    }

    /// Writes into the caller's transaction, which it does not commit.
    fn write_caller_transaction(
        &mut self,
        tx: &mut Transaction<'_>,
        input: &Receiver<Msg>,
    ) -> Result<()> {
        let mut pending = None;
        match self.transaction(tx, input, &mut pending) {
            // Not chunked (refused before), so the input always fits or fails.
            Ok(_) => {
                // The COPY holds the events table's lock now: a transaction that had its
                // id before, and had not appended, may have been passed by `$all` readers
                // meanwhile (see "The global order" in the crate docs).
                if self.check_floor {
                    let behind: bool = tx
                        .query_one(self.store.sql().floor_check.text(), &[])
                        .map_err(|e| self.store.map_error(e))?
                        .get(0);
                    if behind {
                        return Err(Error::FeedOrderConflict { stream: None });
                    }
                }
                self.commit();
                Ok(())
            }
            Err(failure) => Err(self.error(failure)),
        }
    }

    fn commit(&mut self) {
        self.current.transactions = 1;
        if let Some(first) = self.current.first {
            self.ours.push((first, self.current.last));
        }
        self.committed.add(&self.current);
        self.current = Progress::default();
    }

    fn statements(&mut self, tx: &mut Transaction<'_>) -> Result<&Statements, Failure> {
        if self.statements.is_none() {
            let sql = self.store.sql();
            self.statements = Some(Statements {
                slot: tx.prepare(sql.import_slot.text())?,
                lock: tx.prepare(sql.import_lock_streams.text())?,
                heads: tx.prepare(sql.import_heads.text())?,
                fresh: tx.prepare(sql.import_fresh_heads.text())?,
                copy: tx.prepare(sql.import_copy.text())?,
            });
        }
        Ok(self.statements.as_ref().expect("prepared above"))
    }

    /// Writes batches into `tx` until the input ends (`Ok(false)`) or, for a chunked
    /// import, the transaction is full (`Ok(true)`; the rest of the batch waits in
    /// `pending`). One `COPY` takes batch after batch until one brings streams that
    /// must be looked up first.
    fn transaction(
        &mut self,
        tx: &mut Transaction<'_>,
        input: &Receiver<Msg>,
        pending: &mut Option<Vec<Item>>,
    ) -> Result<bool, Failure> {
        // The events table's write lock before this transaction's id, where it has none
        // yet: a transaction that gets its id after it holds the lock can never be passed
        // by `$all` readers (see the crate docs), so only one that came with an id is
        // checked against the feed floor before it commits.
        let sql = self.store.sql();
        tx.batch_execute(sql.lock_events.text())?;
        let had_id: bool = tx.query_one(sql.needs_floor_check.text(), &[])?.get(0);
        let slot = self.statements(tx)?.slot.clone();
        let row = tx.query_one(&slot, &[])?;
        let lo: i64 = row.get(0);
        let next: i64 = row.get(1);
        // One that has appended before holds the lock since: no check either.
        self.check_floor = had_id && next == lo;
        let mut slot = Slot {
            lo,
            first: next,
            next,
            now: row.get(2),
        };
        if self.options.continue_existing {
            // Existing streams are looked up (and locked) again in each transaction.
            self.known.clear();
        }
        self.fresh.clear();
        self.truncate_before.clear();
        let more = self.write_batches(tx, input, pending, &mut slot)?;
        self.check_fresh(tx, &slot)?;
        self.set_truncate_before(tx)?;
        Ok(more)
    }

    /// The batches of one transaction (see `transaction`).
    fn write_batches(
        &mut self,
        tx: &mut Transaction<'_>,
        input: &Receiver<Msg>,
        pending: &mut Option<Vec<Item>>,
        slot: &mut Slot,
    ) -> Result<bool, Failure> {
        let mut next_batch = pending.take();
        loop {
            let mut batch = match next_batch.take() {
                Some(batch) => batch,
                None => match receive(input)? {
                    Some(batch) => batch,
                    None => return Ok(false),
                },
            };
            let rest = self.split(slot, &mut batch)?;
            self.resolve(tx, slot, &batch)?;
            let copy = self.statements(tx)?.copy.clone();
            let mut writer = BinaryCopyInWriter::new(tx.copy_in(&copy)?, &COPY_TYPES);
            let first = slot.next;
            loop {
                self.write_rows(&mut writer, slot, &batch)?;
                if rest.is_some() {
                    self.finish(writer, first, slot, &batch)?;
                    *pending = rest;
                    return Ok(true);
                }
                // An error here drops the writer, which aborts the COPY.
                let Some(following) = receive(input)? else {
                    self.finish(writer, first, slot, &batch)?;
                    return Ok(false);
                };
                let fits = following.len() as u64 <= self.room(slot);
                if fits && !self.must_look_up(&following) {
                    self.add_new_streams(&following);
                    batch = following;
                    continue;
                }
                self.finish(writer, first, slot, &batch)?;
                next_batch = Some(following);
                break;
            }
        }
    }

    /// How many more events this transaction takes.
    fn room(&self, slot: &Slot) -> u64 {
        let written = (slot.next - slot.first) as u64;
        ((slot.lo + SLOT - slot.next) as u64).min(self.options.chunk_events - written)
    }

    /// Cuts `batch` to the room left in the transaction: the rest, for the next
    /// transaction of a chunked import; an error for an atomic one.
    fn split(&self, slot: &Slot, batch: &mut Vec<Item>) -> Result<Option<Vec<Item>>, Failure> {
        let room = self.room(slot) as usize;
        if batch.len() <= room {
            return Ok(None);
        }
        if !self.options.chunked {
            return Err(Failure::Done(Error::TransactionTooLarge {
                events: (slot.next - slot.lo) as u64 + batch.len() as u64,
            }));
        }
        Ok(Some(batch.split_off(room)))
    }

    /// Whether `batch` brings a stream whose next version must be queried. Without
    /// continuing existing streams, and while `known` holds every stream the import has
    /// written, an unknown stream is taken for a new one and needs no query: if it exists
    /// after all, its version 0 is taken and the `COPY` fails on the unique constraint,
    /// or (a stream that lost its version 0) `check_fresh` refuses the transaction.
    fn must_look_up(&self, batch: &[Item]) -> bool {
        (self.options.continue_existing || self.forgot)
            && batch
                .iter()
                .any(|i| !self.known.contains_key(i.event.stream.as_str()))
    }

    /// Starts the new streams of `batch` at version 0 (when no query is needed).
    fn add_new_streams(&mut self, batch: &[Item]) {
        for item in batch {
            if !self.known.contains_key(item.event.stream.as_str()) {
                self.known.insert(item.event.stream.clone(), 0);
                self.fresh.push(item.event.stream.clone());
                self.current.streams += 1;
            }
        }
    }

    /// For an import of an export: sets the `$tb` of the streams that lost events in the
    /// store they were exported from, never lowering one (see `ImportOptions::exported`).
    fn set_truncate_before(&mut self, tx: &mut Transaction<'_>) -> Result<(), Failure> {
        if self.truncate_before.is_empty() {
            return Ok(());
        }
        let (streams, before): (Vec<&str>, Vec<i64>) = self
            .truncate_before
            .iter()
            .map(|(s, v)| (s.as_str(), *v))
            .unzip();
        tx.execute(
            self.store.sql().import_truncate_before.text(),
            &[&streams, &before],
        )?;
        Ok(())
    }

    /// Before the transaction ends: refuses it if a stream it started at version 0
    /// without a look-up exists after all. Its version 0 being taken makes the `COPY`
    /// fail, but a stream that was deleted, tombstoned, truncated or scavenged has lost
    /// its version 0 (never its last event), and every such stream has a metadata row
    /// (its `$tb`, `$maxCount` or `$maxAge`), so only those are looked at, once per
    /// transaction. Run after the `COPY`, the check sees any removal that could have
    /// let the `COPY` through: the removal's own statement committed after the marker
    /// or `$tb` that it finds.
    fn check_fresh(&mut self, tx: &mut Transaction<'_>, slot: &Slot) -> Result<(), Failure> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        let fresh = self.statements(tx)?.fresh.clone();
        let Some(row) = tx.query_opt(&fresh, &[&self.fresh, &slot.lo])? else {
            return Ok(());
        };
        let (stream, version): (String, i64) = (row.get(0), row.get(1));
        Err(Failure::Done(if version == crate::sql::TOMBSTONE_HEAD {
            Error::StreamDeleted { stream }
        } else {
            Error::WrongExpectedVersion {
                stream,
                expected: ExpectedVersion::NoStream,
                actual: ActualVersion::Exact(version as u64),
            }
        }))
    }

    /// Makes sure every stream of `batch` has its next version in `known`.
    fn resolve(
        &mut self,
        tx: &mut Transaction<'_>,
        slot: &Slot,
        batch: &[Item],
    ) -> Result<(), Failure> {
        if self.known.len() > MAX_KNOWN_STREAMS {
            self.known.clear();
            self.forgot = true;
        }
        if !self.must_look_up(batch) {
            self.add_new_streams(batch);
            return Ok(());
        }
        let mut seen = HashSet::new();
        let unknown: Vec<&str> = batch
            .iter()
            .map(|i| i.event.stream.as_str())
            .filter(|s| !self.known.contains_key(*s) && seen.insert(*s))
            .collect();
        self.look_up(tx, slot, unknown)
    }

    /// Writes the rows of one batch into the open `COPY`.
    fn write_rows(
        &mut self,
        writer: &mut BinaryCopyInWriter<'_>,
        slot: &mut Slot,
        batch: &[Item],
    ) -> Result<(), Failure> {
        for item in batch {
            let e = &item.event;
            let version = self
                .known
                .get_mut(e.stream.as_str())
                .expect("every stream of the batch is resolved");
            if self.options.exported {
                if self.tombstoned.contains(e.stream.as_str()) {
                    return Err(Failure::Done(Error::InvalidInput(format!(
                        "{}: stream {:?} was tombstoned earlier in the input: it takes no \
                         more events",
                        item.label(),
                        e.stream
                    ))));
                }
                // A stream new in this store (no version yet) begins where the export
                // says: the versions before were removed there.
                match e.version {
                    Some(given) if *version == 0 && given > 0 && given <= i64::MAX as u64 => {
                        *version = given as i64;
                        raise(&mut self.truncate_before, &e.stream, *version);
                    }
                    _ => {}
                }
                match e.event.event_type.as_str() {
                    STREAM_DELETED => raise(&mut self.truncate_before, &e.stream, *version + 1),
                    STREAM_TOMBSTONE => {
                        raise(&mut self.truncate_before, &e.stream, TOMBSTONE_HEAD);
                        self.tombstoned.insert(e.stream.clone());
                    }
                    _ => {}
                }
            }
            if let Some(given) = e.version.filter(|v| *v as i64 != *version) {
                return Err(Failure::Done(Error::InvalidInput(format!(
                    "{}: the input gives version {given}, but the event would be version \
                     {version} of stream {:?}: events of the stream are missing, repeated \
                     or out of order, or the stream held other events",
                    item.label(),
                    e.stream
                ))));
            }
            let recorded_at = e.recorded_at.unwrap_or(slot.now);
            let row: [&(dyn ToSql + Sync); 8] = [
                &slot.next,
                &e.event.id,
                &e.stream,
                &*version,
                &e.event.event_type,
                &JsonbParam(&e.event.data),
                &e.event.metadata.as_deref().map(JsonbParam),
                &recorded_at,
            ];
            writer.write(&row).map_err(|e| Failure::copy(e, batch))?;
            *version += 1;
            slot.next += 1;
        }
        Ok(())
    }

    /// Ends a `COPY` that wrote the positions from `first` up to `slot.next`.
    fn finish(
        &mut self,
        writer: BinaryCopyInWriter<'_>,
        first: i64,
        slot: &Slot,
        last_batch: &[Item],
    ) -> Result<(), Failure> {
        let written = writer.finish().map_err(|e| Failure::copy(e, last_batch))?;
        debug_assert_eq!(written as i64, slot.next - first);
        if written > 0 {
            self.current.first = self.current.first.or(Some(first));
            self.current.last = slot.next - 1;
            self.current.events += written;
        }
        Ok(())
    }

    /// Finds where each of `streams` goes on: a new stream at version 0, one this import
    /// wrote after its last event, an existing one after its last event if continuing
    /// existing streams is allowed.
    fn look_up(
        &mut self,
        tx: &mut Transaction<'_>,
        slot: &Slot,
        mut streams: Vec<&str>,
    ) -> Result<(), Failure> {
        let continuing = self.options.continue_existing;
        let (lock, heads) = {
            let s = self.statements(tx)?;
            (s.lock.clone(), s.heads.clone())
        };
        if continuing {
            streams.sort_unstable();
            tx.execute(&lock, &[&self.store.schema(), &streams])?;
        }
        let heads: HashMap<String, (i64, i64)> = tx
            .query(&heads, &[&streams])?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for stream in streams {
            let next = match heads.get(stream) {
                None => {
                    self.current.streams += 1;
                    0
                }
                Some(&(crate::sql::TOMBSTONE_HEAD, _)) => {
                    return Err(Failure::Done(Error::StreamDeleted {
                        stream: stream.to_string(),
                    }));
                }
                Some(&(version, head)) => {
                    // A stream's events must be in version order in the global order too
                    // (as for appends): a head written by a transaction that sorts after
                    // this one is a conflict.
                    if head >= slot.lo + SLOT {
                        return Err(Failure::Done(Error::StreamOrderConflict {
                            stream: stream.to_string(),
                        }));
                    }
                    let ours = head >= slot.first
                        || self.ours.iter().any(|&(a, b)| a <= head && head <= b);
                    if !ours {
                        if !continuing {
                            return Err(Failure::Done(Error::WrongExpectedVersion {
                                stream: stream.to_string(),
                                expected: ExpectedVersion::NoStream,
                                actual: ActualVersion::Exact(version as u64),
                            }));
                        }
                        self.current.streams += 1;
                    }
                    version + 1
                }
            };
            self.known.insert(stream.to_string(), next);
        }
        Ok(())
    }

    /// Turns a failure into the error a caller can act on.
    fn error(&self, failure: Failure) -> Error {
        let (e, stream) = match failure {
            Failure::Done(e) => return e,
            // Replaced by the reader's error; this text is never seen.
            Failure::InputFailed => return Error::InvalidInput("the input failed".into()),
            Failure::Postgres(e, stream) => (e, stream),
        };
        match unique_violation(&e) {
            Some(UniqueViolation::EventId) => match duplicate_id(&e) {
                Some(id) => Error::DuplicateEventId {
                    stream: stream.unwrap_or_default(),
                    id,
                },
                None => self.store.map_error(e),
            },
            Some(UniqueViolation::StreamVersion) => match conflicting_stream(&e) {
                // The stream's version in "Key (…)=(stream, version)" was taken by a
                // concurrent writer: we expected the version before it.
                Some((stream, version)) => self.store.lost_race(
                    &stream,
                    if version == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version - 1)
                    },
                ),
                None => self.store.map_error(e),
            },
            None => self.store.map_error(e),
        }
    }
}

/// The stream and version in "Key (stream_id, stream_version)=(s, 6) already exists.".
/// The version is the last comma-separated field, so a stream id with commas is fine.
fn conflicting_stream(e: &postgres::Error) -> Option<(String, u64)> {
    let detail = e.as_db_error()?.detail()?;
    let rest = detail.strip_prefix("Key (stream_id, stream_version)=(")?;
    let inner = rest.strip_suffix(") already exists.")?;
    let (stream, version) = inner.rsplit_once(", ")?;
    Some((stream.to_string(), version.parse().ok()?))
}
