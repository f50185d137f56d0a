//! Bulk import: many events into many streams through one binary `COPY`, in one
//! transaction ([`Store::import`], [`Store::import_in`]).

use std::collections::HashMap;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::Transaction;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{validate_stream_id, EventData, JsonText};
use crate::sql::{quote, MAX_EVENTS_PER_TRANSACTION, POSITION_BITS};
use crate::store::{duplicate_id, unique_violation, Store, UniqueViolation};
use crate::version::{ActualVersion, ExpectedVersion};

/// Options for [`Store::import`]. The default refuses streams that already exist.
///
/// ```
/// use pg_eventstore::ImportOptions;
/// let options = ImportOptions::new().continue_existing_streams(true);
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    continue_existing: bool,
}

impl ImportOptions {
    /// Refuse streams that already hold events (the default).
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
}

/// What an import wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportSummary {
    /// How many events were written.
    pub events: u64,
    /// How many distinct streams they went to.
    pub streams: u64,
    /// Global position of the first event imported.
    pub first_position: u64,
    /// Global position of the last event imported. The events in between have
    /// consecutive positions, in input order.
    pub last_position: u64,
}

const COPY_TYPES: [Type; 7] = [
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::JSONB,
    Type::JSONB,
];

impl Store {
    /// Imports `events`, each given with its stream id, in one transaction through one
    /// binary `COPY`: the fastest way to load history (a migration from another store, a
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
    ///   each other (a transaction-scoped advisory lock per stream). Appends take no such
    ///   lock: an append that commits to one of the import's streams after the import has
    ///   read its heads makes the import fail with [`Error::WrongExpectedVersion`], and an
    ///   append that comes while the import runs waits for it and then sees the imported
    ///   events. The unique `(stream_id, version)` constraint decides, never a read.
    /// * Input is checked like [`Store::append`] checks it, before anything is sent. One
    ///   transaction holds at most [`MAX_EVENTS_PER_TRANSACTION`] events: a larger input
    ///   is refused with [`Error::TransactionTooLarge`]; split it into several imports
    ///   (each is atomic on its own). The import is not split silently, because an import
    ///   that half succeeds is harder to recover from than one that tells you to split it.
    /// * On any error nothing is written.
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
        let plan = Plan::new(events)?;
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(|e| self.map_error(e))?;
        let summary = match self.run_import(&mut tx, &plan, options) {
            Ok(s) => s,
            Err(e) => {
                drop(tx); // rolls back
                drop(conn);
                return Err(self.import_error(e, &plan));
            }
        };
        tx.commit().map_err(|e| self.map_error(e))?;
        drop(conn);
        self.hub().appended();
        Ok(summary)
    }

    /// [`Store::import`] inside the caller's transaction: the events commit or roll back
    /// with it, and share its global position slot with its appends (they may come
    /// before or after the import; the transaction's total is still limited to
    /// [`MAX_EVENTS_PER_TRANSACTION`]). Subscribers are notified when it commits. On an
    /// error PostgreSQL aborts the transaction: roll it back. If the transaction wrote
    /// before a concurrent transaction appended to one of the continued streams, the
    /// import fails with [`Error::StreamOrderConflict`], as [`Store::append_in`] would.
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
        let plan = Plan::new(events)?;
        let summary = self
            .run_import(tx, &plan, options)
            .map_err(|e| self.import_error(e, &plan))?;
        // Listeners (in this and other processes) hear of it when the caller commits.
        tx.execute("SELECT pg_notify($1, '')", &[&self.hub().channel()])
            .map_err(|e| self.map_error(e))?;
        Ok(summary)
    }

    fn run_import<S: AsRef<str>>(
        &self,
        tx: &mut Transaction<'_>,
        plan: &Plan<'_, S>,
        options: ImportOptions,
    ) -> std::result::Result<ImportSummary, Failure> {
        let schema = self.schema();
        let events = format!("{}.events", quote(schema));
        if options.continue_existing {
            // Sorted, so that two imports lock their common streams in the same order.
            let mut sorted: Vec<&str> = plan.streams.clone();
            sorted.sort_unstable();
            tx.execute(
                "SELECT count(pg_advisory_xact_lock(hashtext($1), hashtext(s)))
                   FROM unnest($2::text[]) AS s",
                &[&schema, &sorted],
            )?;
        }
        // The head (version, position) of each stream that already exists.
        let heads: HashMap<String, (i64, i64)> = tx
            .query(
                &format!(
                    "SELECT s.name, h.v, h.hp
                       FROM unnest($1::text[]) AS s(name),
                            LATERAL (SELECT e.stream_version AS v, e.global_position AS hp
                                       FROM {events} e WHERE e.stream_id = s.name
                                      ORDER BY e.stream_version DESC LIMIT 1) AS h"
                ),
                &[&plan.streams],
            )?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        if !options.continue_existing {
            if let Some(s) = plan.streams.iter().find(|s| heads.contains_key(**s)) {
                return Err(Failure::Done(Error::WrongExpectedVersion {
                    stream: s.to_string(),
                    expected: ExpectedVersion::NoStream,
                    actual: ActualVersion::Exact(heads[*s].0 as u64),
                }));
            }
        }
        // Take the events table's write lock before this transaction's id, where it has
        // none yet: a transaction that gets its id after it holds the lock can never be
        // passed by `$all` readers (see the crate docs), so only one that came with an
        // id needs the feed floor check after the COPY.
        tx.batch_execute(&format!("LOCK TABLE {events} IN ROW EXCLUSIVE MODE"))?;
        let had_id: bool = tx
            .query_one(self.sql().needs_floor_check.text(), &[])?
            .get(0);
        let row = tx.query_one(
            &format!(
                "WITH r AS (SELECT pg_current_xact_id()::text::bigint << {POSITION_BITS} AS lo)
                 SELECT r.lo, (SELECT max(e.global_position) FROM {events} e
                                WHERE e.global_position >= r.lo
                                  AND e.global_position < r.lo + {MAX_EVENTS_PER_TRANSACTION})
                   FROM r"
            ),
            &[],
        )?;
        let lo: i64 = row.get(0);
        let first = match row.get::<_, Option<i64>>(1) {
            Some(used) => used + 1,
            None => lo,
        };
        // A transaction that has appended before holds the lock since: no check either.
        let check_floor = had_id && first == lo;
        let total = (first - lo) as u64 + plan.events.len() as u64;
        if total > MAX_EVENTS_PER_TRANSACTION {
            return Err(Failure::Done(Error::TransactionTooLarge { events: total }));
        }

        // A stream's events must be in version order in the global order too (as for
        // appends): a head written by a transaction that sorts after this one is a
        // conflict. Only a caller's transaction that got its id before that write can
        // meet it.
        if let Some(s) = plan.streams.iter().find(|s| {
            heads
                .get(**s)
                .is_some_and(|h| h.1 >= lo + MAX_EVENTS_PER_TRANSACTION as i64)
        }) {
            return Err(Failure::Done(Error::StreamOrderConflict {
                stream: s.to_string(),
            }));
        }
        let mut next: HashMap<&str, i64> = HashMap::with_capacity(plan.streams.len());
        for s in &plan.streams {
            next.insert(s, heads.get(*s).map_or(0, |h| h.0 + 1));
        }
        let copy = format!(
            "COPY {events} (global_position, event_id, stream_id, stream_version, event_type, \
             data, metadata) FROM STDIN (FORMAT binary)"
        );
        let mut writer = BinaryCopyInWriter::new(tx.copy_in(&copy)?, &COPY_TYPES);
        for (i, (stream, event)) in plan.events.iter().enumerate() {
            let position = first + i as i64;
            let version = next
                .get_mut(stream.as_ref())
                .expect("every stream is planned");
            let row: [&(dyn ToSql + Sync); 7] = [
                &position,
                &event.id,
                &stream.as_ref(),
                &*version,
                &event.event_type,
                &JsonText(&event.data),
                &event.metadata.as_deref().map(JsonText),
            ];
            writer.write(&row)?;
            *version += 1;
        }
        let written = writer.finish()?;
        debug_assert_eq!(written, plan.events.len() as u64);
        if check_floor
            && tx
                .query_one(self.sql().floor_check.text(), &[])?
                .get::<_, bool>(0)
        {
            return Err(Failure::Done(Error::FeedOrderConflict { stream: None }));
        }
        Ok(ImportSummary {
            events: written,
            streams: plan.streams.len() as u64,
            first_position: first as u64,
            last_position: (first + written as i64 - 1) as u64,
        })
    }

    /// Turns a failed import into the error a caller can act on.
    fn import_error<S: AsRef<str>>(&self, failure: Failure, plan: &Plan<'_, S>) -> Error {
        let e = match failure {
            Failure::Done(e) => return e,
            Failure::Postgres(e) => e,
        };
        match unique_violation(&e) {
            Some(UniqueViolation::EventId) => match duplicate_id(&e) {
                Some(id) => Error::DuplicateEventId {
                    stream: plan
                        .events
                        .iter()
                        .find(|(_, ev)| ev.id == id)
                        .map_or_else(String::new, |(s, _)| s.as_ref().to_string()),
                    id,
                },
                None => self.map_error(e),
            },
            Some(UniqueViolation::StreamVersion) => match conflicting_stream(&e) {
                // The stream's version in "Key (…)=(stream, version)" was taken by a
                // concurrent writer: we expected the version before it.
                Some((stream, version)) => Error::WrongExpectedVersion {
                    actual: self.version_after_lost_race(&stream),
                    expected: if version == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version - 1)
                    },
                    stream,
                },
                None => self.map_error(e),
            },
            None => self.map_error(e),
        }
    }
}

/// Why an import stopped: an error decided here, or one from the server to map.
enum Failure {
    Done(Error),
    Postgres(postgres::Error),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Postgres(e)
    }
}

/// Checked input: the events and their distinct streams in order of first appearance.
struct Plan<'a, S> {
    events: &'a [(S, EventData)],
    streams: Vec<&'a str>,
}

impl<'a, S: AsRef<str>> Plan<'a, S> {
    fn new(events: &'a [(S, EventData)]) -> Result<Self> {
        if events.is_empty() {
            return Err(Error::InvalidInput("no events to import".into()));
        }
        if events.len() as u64 > MAX_EVENTS_PER_TRANSACTION {
            return Err(Error::TransactionTooLarge {
                events: events.len() as u64,
            });
        }
        let mut seen: HashMap<&str, ()> = HashMap::new();
        let mut streams = Vec::new();
        for (i, (stream, event)) in events.iter().enumerate() {
            let stream = stream.as_ref();
            if seen.insert(stream, ()).is_none() {
                validate_stream_id(stream).map_err(|e| match e {
                    Error::InvalidInput(m) => Error::InvalidInput(format!("event {i}: {m}")),
                    e => e,
                })?;
                streams.push(stream);
            }
            event.validate(i)?;
        }
        let mut ids: Vec<Uuid> = events.iter().map(|(_, e)| e.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidInput(format!(
                "event id {} appears twice in one import",
                w[0]
            )));
        }
        Ok(Plan { events, streams })
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
