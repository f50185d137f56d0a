//! Reads: options ([`ReadStream`], [`ReadAll`]) and the iterator they produce ([`Events`]).

use std::collections::VecDeque;
use std::fmt;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender, TrySendError};

use postgres::types::ToSql;
use postgres::Row;

use crate::error::{Error, Result};
use crate::event::{
    validate_stream_id, validate_text, RecordedEvent, MAX_EVENT_TYPE_BYTES, MAX_STREAM_ID_BYTES,
};
use crate::horizon::Horizon;
use crate::metrics::ReadOps;
use crate::retry::Retry;
use crate::sql::Statement;
use crate::store::{Conn, Store};

/// Which way a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forwards,
    /// Newest first.
    Backwards,
}

/// Options for [`Store::read_stream`].
///
/// ```
/// use pg_eventstore::ReadStream;
/// // Versions 10, 11, ... up to 59.
/// let page = ReadStream::forwards().from_version(10).max_count(50);
/// // The last event of the stream.
/// let last = ReadStream::backwards().max_count(1);
/// # let _ = (page, last);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadStream {
    pub(crate) direction: Direction,
    pub(crate) from: Option<u64>,
    /// Whether `from` itself is left out ([`ReadStream::after_version`]).
    pub(crate) exclusive: bool,
    pub(crate) max_count: Option<u64>,
    /// Whether the delete markers below the stream's `$tb` are read too (forwards only):
    /// for stream subscriptions, which deliver them as `$all` subscriptions do.
    pub(crate) markers: bool,
}

impl ReadStream {
    /// From the first event (version 0) on.
    pub fn forwards() -> Self {
        ReadStream {
            direction: Direction::Forwards,
            from: None,
            exclusive: false,
            max_count: None,
            markers: false,
        }
    }

    /// From the last event back to the first.
    pub fn backwards() -> Self {
        ReadStream {
            direction: Direction::Backwards,
            ..ReadStream::forwards()
        }
    }

    /// Starts at this version, inclusive (forwards: this one and later ones; backwards:
    /// this one and earlier ones).
    pub fn from_version(mut self, version: u64) -> Self {
        self.from = Some(version);
        self.exclusive = false;
        self
    }

    /// Starts after this version, exclusive (forwards: the later ones; backwards: the
    /// earlier ones), as [`ReadAll::after`] does with positions: pass the version of the
    /// last event you processed. A backwards read after version 0 reads nothing.
    pub fn after_version(mut self, version: u64) -> Self {
        self.from = Some(version);
        self.exclusive = true;
        self
    }

    /// Reads at most `n` events.
    pub fn max_count(mut self, n: u64) -> Self {
        self.max_count = Some(n);
        self
    }

    /// Also reads the stream's delete markers (see `markers`).
    pub(crate) fn with_markers(mut self) -> Self {
        self.markers = true;
        self
    }
}

/// Options for [`Store::read_all`]: the whole log in the global order.
///
/// ```
/// use pg_eventstore::ReadAll;
/// // Order events after position 4096, of two types, in streams named "order-…".
/// let options = ReadAll::after(4096)
///     .category("order-")
///     .event_types(["OrderPlaced", "OrderShipped"]);
/// # let _ = options;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadAll {
    pub(crate) direction: Direction,
    pub(crate) position: Option<u64>,
    pub(crate) max_count: Option<u64>,
    pub(crate) category: Option<String>,
    pub(crate) event_types: Option<Vec<String>>,
    pub(crate) streams: Option<Vec<String>>,
    /// Leave out events visible in this snapshot (`pg_snapshot` text): live subscriptions.
    pub(crate) before_snapshot: Option<String>,
    pub(crate) wait: Wait,
}

/// Whether a `$all` read first waits for events committed before it that an open
/// appending transaction holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// For [`Config::read_all_wait`](crate::Config::read_all_wait).
    Default,
    /// At most this long.
    AtMost(Duration),
    /// Not at all: read what is visible now.
    No,
}

impl ReadAll {
    /// From the first event on.
    pub fn from_start() -> Self {
        ReadAll {
            direction: Direction::Forwards,
            position: None,
            max_count: None,
            category: None,
            event_types: None,
            streams: None,
            before_snapshot: None,
            wait: Wait::Default,
        }
    }

    /// Events after `position`, exclusive: pass the position of the last event you
    /// processed to go on from there.
    pub fn after(position: u64) -> Self {
        ReadAll {
            position: Some(position),
            ..ReadAll::from_start()
        }
    }

    /// From the newest event back to the oldest.
    pub fn backwards() -> Self {
        ReadAll {
            direction: Direction::Backwards,
            ..ReadAll::from_start()
        }
    }

    /// Backwards from before `position`, exclusive.
    pub fn backwards_before(position: u64) -> Self {
        ReadAll {
            position: Some(position),
            ..ReadAll::backwards()
        }
    }

    /// Reads at most `n` events.
    pub fn max_count(mut self, n: u64) -> Self {
        self.max_count = Some(n);
        self
    }

    /// Only events of streams whose id starts with `prefix` (a category such as
    /// `"order-"`). The prefix is compared as text, not as a pattern.
    pub fn category(mut self, prefix: impl Into<String>) -> Self {
        self.category = Some(prefix.into());
        self
    }

    /// Only events of these types.
    pub fn event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// Only events of these streams (their ids, compared exactly), still in the global
    /// order: several streams read as one, each in its version order. Combines with
    /// [`category`](Self::category) and [`event_types`](Self::event_types) (an event must
    /// pass every filter). A stream subscription
    /// ([`SubscribeOptions::stream`](crate::SubscribeOptions::stream)) follows a single
    /// stream by version instead.
    ///
    /// Like the other filters, this one is applied while the read walks the global
    /// order: the server looks at every event after the start position, so reading a few
    /// streams out of a large log costs about what reading the log costs on the server.
    /// To read one stream, [`Store::read_stream`] goes straight to it.
    ///
    /// ```
    /// use pg_eventstore::ReadAll;
    /// let two_orders = ReadAll::from_start().streams(["order-1", "order-2"]);
    /// # let _ = two_orders;
    /// ```
    pub fn streams<I, S>(mut self, streams: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.streams = Some(streams.into_iter().map(Into::into).collect());
        self
    }

    /// Reads only what a `$all` reader can see now, without waiting for events that
    /// committed before the call but wait behind an open appending transaction with a
    /// smaller position (see [`Store::feed_status`](crate::Store::feed_status)). The read
    /// may then end before the newest committed event.
    pub fn visible_now(mut self) -> Self {
        self.wait = Wait::No;
        self
    }

    /// Waits at most `limit` for events committed before the call that an open
    /// appending transaction holds back, then fails with
    /// [`Error::HeldBack`](crate::Error::HeldBack). Default:
    /// [`Config::read_all_wait`](crate::Config::read_all_wait).
    pub fn wait_at_most(mut self, limit: Duration) -> Self {
        self.wait = Wait::AtMost(limit);
        self
    }

    /// Whether `event` passes the category, event type and stream filters, as the
    /// `$all` statements decide (`starts_with`, and `=` on the type and on the stream id:
    /// `filters_match` in sql.rs).
    pub(crate) fn matches(&self, event: &RecordedEvent) -> bool {
        self.category
            .as_ref()
            .is_none_or(|c| event.stream_id.starts_with(c.as_str()))
            && self
                .event_types
                .as_ref()
                .is_none_or(|t| t.contains(&event.event_type))
            && self
                .streams
                .as_ref()
                .is_none_or(|s| s.contains(&event.stream_id))
    }

    /// Whether any filter leaves events out.
    pub(crate) fn is_filtered(&self) -> bool {
        self.category.is_some() || self.event_types.is_some() || self.streams.is_some()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(c) = &self.category {
            validate_text("category prefix", c, MAX_STREAM_ID_BYTES)
                .map_err(Error::InvalidInput)?;
        }
        let lists = [
            (
                "event type filter",
                "event type filter",
                &self.event_types,
                MAX_EVENT_TYPE_BYTES,
            ),
            (
                "stream filter",
                "stream filter's stream id",
                &self.streams,
                MAX_STREAM_ID_BYTES,
            ),
        ];
        for (list, item, values, max) in lists {
            let Some(values) = values else { continue };
            if values.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "the {list} is empty, so nothing could match"
                )));
            }
            for v in values {
                validate_text(item, v, max).map_err(Error::InvalidInput)?;
            }
        }
        if let Some(p) = self.position.filter(|p| *p > i64::MAX as u64) {
            return Err(Error::InvalidInput(format!(
                "the position {p} is out of range (positions go up to {})",
                i64::MAX
            )));
        }
        Ok(())
    }
}

impl Store {
    /// Reads one stream; see [`ReadStream`] for direction, start and count.
    /// The iterator owns a pooled connection until it is exhausted or dropped.
    pub fn read_stream(&self, stream: &str, options: ReadStream) -> Result<Events> {
        validate_stream_id(stream)?;
        Ok(Events::stream(self.clone(), stream.to_string(), options))
    }

    /// Reads all events in the global order; see [`ReadAll`] for the start, filters and
    /// count, and the crate docs for what the order guarantees.
    ///
    /// The read includes every event committed before the call. When some of them still
    /// wait behind an open transaction that appends to this store (see
    /// [`Store::feed_status`]), the read waits for it, at most
    /// [`Config::read_all_wait`](crate::Config::read_all_wait) (10 s by default), and then
    /// fails with [`Error::HeldBack`] naming that transaction: it never returns short
    /// without saying so. A read that cannot return any of them does not wait: backwards
    /// before a position that is visible already, or forwards when its first page holds
    /// the `max_count` events asked for. [`ReadAll::visible_now`] reads only what is
    /// visible at once.
    pub fn read_all(&self, options: ReadAll) -> Result<Events> {
        options.validate()?;
        Ok(Events::all(self.clone(), options))
    }
}

/// What a read walks over, and where it has got to (a keyset bound, so that the read
/// can go on in a cursor after its first page).
#[derive(Clone, Debug)]
enum Query {
    Stream {
        stream: String,
        forwards: bool,
        /// The next version to read (inclusive); `i64::MAX` backwards means "the end".
        next: i64,
        /// Forwards: the delete markers below `$tb` too (see `ReadStream::markers`).
        markers: bool,
    },
    All {
        forwards: bool,
        /// The exclusive bound: after it (forwards) or before it (backwards).
        bound: i64,
        category: Option<String>,
        types: Option<Vec<String>>,
        streams: Option<Vec<String>>,
        before_snapshot: Option<String>,
        /// The horizon this read stops at, once known: all its pages stop at the same one.
        horizon: Option<i64>,
        /// How long to wait for held-back events before the first page (`None`: not).
        wait: Option<Duration>,
        /// The store's highest horizon when the read began (see `Store::known_horizon`).
        known: i64,
        /// Transaction ids of other databases (see `Store::other_xids`).
        others: Vec<i64>,
    },
}

impl Query {
    fn statement<'s>(&self, store: &'s Store) -> &'s Statement {
        let sql = &store.sql();
        match self {
            Query::Stream {
                forwards: true,
                markers: false,
                ..
            } => &sql.read_stream_forwards,
            Query::Stream {
                forwards: true,
                markers: true,
                ..
            } => &sql.read_stream_forwards_markers,
            Query::Stream {
                forwards: false, ..
            } => &sql.read_stream_backwards,
            Query::All {
                forwards, others, ..
            } => match (forwards, others.is_empty(), self.is_filtered()) {
                (true, true, false) => &sql.read_all_forwards,
                (false, true, false) => &sql.read_all_backwards,
                (true, false, false) => &sql.read_all_forwards_others,
                (false, false, false) => &sql.read_all_backwards_others,
                (true, true, true) => &sql.read_all_forwards_filtered,
                (false, true, true) => &sql.read_all_backwards_filtered,
                (true, false, true) => &sql.read_all_forwards_others_filtered,
                (false, false, true) => &sql.read_all_backwards_others_filtered,
            },
        }
    }

    fn params<'a>(&'a self, limit: &'a Option<i64>) -> Vec<&'a (dyn ToSql + Sync)> {
        match self {
            Query::Stream { stream, next, .. } => vec![stream, next, limit],
            Query::All {
                bound,
                horizon,
                known,
                others,
                ..
            } => {
                let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![bound, limit, horizon, known];
                params.extend(self.filter_params());
                if !others.is_empty() {
                    params.push(others);
                }
                params
            }
        }
    }

    /// The statement for a page after the first: for `$all`, one that reads below the
    /// horizon the first page fixed, without computing one (see `read_all_page` in
    /// sql.rs), with `page_params`.
    fn page_statement<'s>(&self, store: &'s Store) -> &'s Statement {
        let sql = &store.sql();
        match self {
            Query::All {
                forwards,
                horizon: Some(_),
                ..
            } => match (forwards, self.is_filtered()) {
                (true, false) => &sql.read_all_page_forwards,
                (false, false) => &sql.read_all_page_backwards,
                (true, true) => &sql.read_all_page_forwards_filtered,
                (false, true) => &sql.read_all_page_backwards_filtered,
            },
            _ => self.statement(store),
        }
    }

    /// The parameters of `page_statement`.
    fn page_params<'a>(&'a self, limit: &'a Option<i64>) -> Vec<&'a (dyn ToSql + Sync)> {
        match self {
            Query::All {
                bound,
                horizon: horizon @ Some(_),
                ..
            } => {
                let mut params: Vec<&'a (dyn ToSql + Sync)> = vec![bound, limit, horizon];
                params.extend(self.filter_params());
                params
            }
            _ => self.params(limit),
        }
    }

    /// The filters' parameters of a filtered `$all` statement, in their order (see
    /// `all_filters` in sql.rs); none for an unfiltered one.
    fn filter_params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Query::All {
                category,
                types,
                streams,
                before_snapshot,
                ..
            } if self.is_filtered() => vec![category, types, before_snapshot, streams],
            _ => Vec::new(),
        }
    }

    /// The lean statement for this read's first page, when it may try one: forwards
    /// through `$all`, with no horizon yet and no other databases' transactions to
    /// pass (see `read_all_lean` in sql.rs).
    fn lean_statement<'s>(&self, store: &'s Store) -> Option<&'s Statement> {
        match self {
            Query::All {
                forwards: true,
                horizon: None,
                others,
                ..
            } if others.is_empty() && store.lean_reads() => Some(if self.is_filtered() {
                &store.sql().read_all_lean_filtered
            } else {
                &store.sql().read_all_lean
            }),
            _ => None,
        }
    }

    /// Whether an `$all` read leaves events out (see the `_filtered` statements).
    fn is_filtered(&self) -> bool {
        matches!(self, Query::All { category, types, streams, before_snapshot, .. }
            if category.is_some() || types.is_some() || streams.is_some()
                || before_snapshot.is_some())
    }

    /// Moves the bound past `event`.
    fn advance(&mut self, event: &RecordedEvent) {
        self.advance_to(event.version as i64, event.position as i64);
    }

    /// Moves the bound past the event with this version and position.
    fn advance_to(&mut self, version: i64, position: i64) {
        match self {
            Query::Stream { forwards, next, .. } => {
                *next = if *forwards { version + 1 } else { version - 1 }
            }
            Query::All { bound, .. } => *bound = position,
        }
    }

    /// Whether a backwards stream read has gone below version 0.
    fn is_exhausted(&self) -> bool {
        matches!(self, Query::Stream { forwards: false, next, .. } if *next < 0)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Nothing fetched yet: the first page is a plain query, no transaction.
    Start,
    /// The first page was full: the rest comes through a cursor, read by a thread.
    Cursor,
    /// Everything is fetched; the connection is back in the pool.
    Done,
}

/// The events of a read, in order: an `Iterator<Item = Result<RecordedEvent>>`.
///
/// The first page is one plain query; a read that goes on past it opens a read-only
/// transaction and fetches a page per statement and round trip, each with the page's
/// `LIMIT` and going on after the last event fetched (so the server walks the index in
/// order, never sorting the rest of the log), and memory stays at a few pages however
/// long the read. The pages after the first are fetched by
/// a helper thread one page ahead of you, so that the server produces the next page
/// while you decode this one. The transaction ends, and the pooled connection goes back
/// to the pool, as soon as the last page has arrived, when the iterator is dropped (the
/// drop waits for the page in flight), or after an error (after which it yields `None`).
///
/// An open cursor holds a snapshot, and while a snapshot is held, neither `VACUUM` nor the
/// pruning that PostgreSQL does as it goes can remove the row versions that any
/// transaction of the database left behind since: tables that are updated again and
/// again (a projection's read model, counters, queues) grow, and their updates get
/// slower. So a read holds its snapshot only while it fetches. When you have not taken
/// the page it fetched ahead (you are busy with the one before), it ends the transaction
/// at once and, when you take that page, fetches the next one in a new transaction that
/// goes on after the last event fetched. A read that you keep up with stays in its
/// transaction, but never for longer than
/// [`Config::read_snapshot_max_age`](crate::Config::read_snapshot_max_age) (1 s by
/// default). Reading for hours, or slowly (a worker or a subscription catching up, a
/// handler that takes its time), holds nothing back. The order and the guarantee stay
/// the same: no event is skipped or repeated, and a `$all` read still ends at the horizon
/// of its first page; a forwards stream read may include events appended to the stream
/// while it ran.
///
/// A transient failure (a lost connection, a server restart: see
/// [`Config::max_retries`](crate::Config::max_retries)) is retried: a read that has
/// yielded nothing starts again, one that has goes on after the last event it yielded,
/// so no event is skipped or yielded twice.
pub struct Events {
    store: Store,
    query: Query,
    state: State,
    rows: VecDeque<Row>,
    remaining: Option<u64>,
    page: u64,
    retry: Retry,
    ops: ReadOps,
    /// The cursor reader's pages, and the thread (which owns the connection meanwhile).
    pages: Option<Receiver<Result<Vec<Row>>>>,
    reader: Option<JoinHandle<()>>,
    /// What the last `$all` page said about the horizon.
    status: Option<Horizon>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("query", &self.query)
            .field("state", &self.state)
            .field("buffered", &self.rows.len())
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Events {
    pub(crate) fn stream(store: Store, stream: String, options: ReadStream) -> Events {
        let forwards = options.direction == Direction::Forwards;
        let next = match (options.from, forwards) {
            (Some(v), _) => {
                let v = v.min(i64::MAX as u64) as i64;
                match (options.exclusive, forwards) {
                    (false, _) => v,
                    (true, true) => v.saturating_add(1),
                    // -1 after version 0: nothing is left to read.
                    (true, false) => v - 1,
                }
            }
            (None, true) => 0,
            (None, false) => i64::MAX,
        };
        Events::new(
            store,
            Query::Stream {
                stream,
                forwards,
                next,
                markers: options.markers && forwards,
            },
            options.max_count,
        )
    }

    pub(crate) fn all(store: Store, options: ReadAll) -> Events {
        let forwards = options.direction == Direction::Forwards;
        let known = store.known_horizon();
        let others = store.other_xids();
        let wait = match options.wait {
            Wait::Default => Some(store.config().read_all_wait),
            Wait::AtMost(d) => Some(d),
            Wait::No => None,
        };
        let bound = match (options.position, forwards) {
            (Some(p), _) => p as i64,
            (None, true) => -1,
            (None, false) => i64::MAX,
        };
        Events::new(
            store,
            Query::All {
                forwards,
                bound,
                category: options.category,
                types: options.event_types,
                streams: options.streams,
                before_snapshot: options.before_snapshot,
                horizon: None,
                wait,
                known,
                others,
            },
            options.max_count,
        )
    }

    fn new(store: Store, query: Query, max_count: Option<u64>) -> Events {
        let page = store.config().read_page_size as u64;
        let ops = match &query {
            Query::Stream { stream, .. } => ReadOps::new("stream", Some(stream)),
            Query::All { .. } => ReadOps::new("all", None),
        };
        Events {
            retry: Retry::new(store.config(), "read"),
            ops,
            store,
            query,
            state: State::Start,
            rows: VecDeque::new(),
            remaining: max_count,
            page,
            pages: None,
            reader: None,
            status: None,
        }
    }

    /// What the read's last page said about the `$all` horizon (`None` for stream reads).
    pub(crate) fn status(&self) -> Option<&Horizon> {
        self.status.as_ref()
    }

    /// Takes the status row out of a `$all` page, and fixes the read's horizon to it.
    fn take_status(&mut self, rows: &mut Vec<Row>) -> Result<()> {
        let Query::All { horizon, .. } = &mut self.query else {
            return Ok(());
        };
        // The status row comes first (the first branch of the statement's UNION ALL); a
        // page of a cursor after its first has none. Only a first page that did not put
        // it first is searched.
        let at = match rows.first() {
            Some(row) if Horizon::is_status_row(row) => Some(0),
            Some(_) if horizon.is_none() => rows.iter().position(Horizon::is_status_row),
            _ => None,
        };
        if let Some(i) = at {
            let row = rows.remove(i);
            // A page read below a horizon fixed earlier says nothing new.
            if horizon.is_none() {
                let status = Horizon::from_status_row(&row)?;
                *horizon = Some(status.horizon as i64);
                self.store.saw_horizon(status.horizon);
                if let Some(others) = Horizon::others_in_status_row(&row)? {
                    self.store.saw_other_xids(others);
                }
                self.status = Some(status);
            }
        }
        Ok(())
    }

    /// After the first page of a `$all` read that waits: when committed events are held
    /// back, and the read could return any of them, waits until the horizon has passed
    /// them (or fails naming the blocker), and moves the read's horizon there. Returns
    /// whether it waited. `filled`: the first page holds all the events the read was
    /// asked for. `conn`, the connection of the first page, goes back to the pool before
    /// the wait, whose queries take one of their own.
    fn wait_for_held_back(&mut self, filled: bool, conn: &mut Option<Conn>) -> Result<bool> {
        let Query::All {
            horizon,
            wait,
            forwards,
            bound,
            ..
        } = &mut self.query
        else {
            return Ok(false);
        };
        let Some(limit) = wait.take() else {
            return Ok(false);
        };
        let Some(status) = self.status.filter(|s| s.holds_back()) else {
            return Ok(false);
        };
        let Some(tip) = status.tip else {
            return Ok(false);
        };
        // The held-back events all lie at or above the horizon, and every event below
        // it is final: none can still commit there. A read whose whole range lies below
        // the horizon therefore returns exactly what it would return after the wait, and
        // waiting gains nothing: backwards before a position at or below the horizon;
        // and forwards, a first page that already holds every event asked for (it comes
        // from below the horizon, in order, so no event that the wait could add comes
        // before any of it). Neither returns short.
        let below = if *forwards {
            filled
        } else {
            *bound <= status.horizon as i64
        };
        if below {
            return Ok(false);
        }
        *conn = None;
        let passed = self.store.wait_for_feed(tip, limit)?;
        *horizon = Some(passed.horizon as i64);
        self.status = Some(passed);
        Ok(true)
    }

    /// Fetches the next page into `rows`, moving through the states.
    fn fetch(&mut self) -> Result<()> {
        if self.remaining == Some(0) || self.query.is_exhausted() {
            self.finish();
            return Ok(());
        }
        match self.state {
            State::Done => Ok(()),
            State::Start => {
                let limit = self.remaining.map_or(self.page, |r| r.min(self.page));
                let mut conn = self.store.conn()?;
                let limit_param = Some(limit as i64);
                let params = self.query.params(&limit_param);
                let store = &self.store;
                let mut run = |statement| -> Result<Vec<Row>> {
                    let statement = store.prepared(&mut conn, statement)?;
                    conn.query(&statement, &params)
                        .map_err(|e| store.map_error(e))
                };
                let mut lean = None;
                if let Some(statement) = self.query.lean_statement(store) {
                    let rows = run(statement)?;
                    // Nothing held back: the page the full statement would return.
                    let status = rows.iter().find(|r| Horizon::is_status_row(r));
                    match status.map(Horizon::from_status_row).transpose()? {
                        Some(s) if !s.holds_back() => lean = Some(rows),
                        _ => store.lean_read_missed(),
                    }
                }
                let mut rows = match lean {
                    Some(rows) => rows,
                    None => run(self.query.statement(store))?,
                };
                self.take_status(&mut rows)?;
                let full = rows.len() as u64 == limit;
                let filled = full && self.remaining == Some(limit);
                let mut conn = Some(conn);
                if self.wait_for_held_back(filled, &mut conn)? {
                    if matches!(
                        self.query,
                        Query::All {
                            forwards: false,
                            ..
                        }
                    ) {
                        // Backwards, the events between the two horizons come first.
                        return Ok(());
                    }
                    if !full {
                        // This page ended at the old horizon: the next one starts after
                        // it and goes on to the new one.
                        self.rows.extend(rows);
                        return Ok(());
                    }
                }
                if full && self.remaining.is_none_or(|r| r > limit) {
                    // The cursor starts after the first page, which is still buffered:
                    // start reading ahead now, while the caller works through it.
                    let mut query = self.query.clone();
                    advance_past(&mut query, &rows)?;
                    // At most i64::MAX (`max_count(u64::MAX)` means no limit).
                    let limit = self
                        .remaining
                        .map(|r| i64::try_from(r - limit).unwrap_or(i64::MAX));
                    let (tx, rx) = bounded(1);
                    let store = self.store.clone();
                    let page = self.page;
                    let reader = thread::Builder::new()
                        .name("pg-eventstore-read".into())
                        .spawn(move || read_cursor(store, conn, query, limit, page, tx))
                        .expect("spawn the cursor reader thread");
                    self.pages = Some(rx);
                    self.reader = Some(reader);
                    self.state = State::Cursor;
                } else {
                    drop(conn);
                    self.state = State::Done;
                }
                self.rows.extend(rows);
                Ok(())
            }
            State::Cursor => {
                let page = self.pages.as_ref().expect("a cursor has its reader").recv();
                match page {
                    Ok(Ok(mut rows)) => {
                        let last = (rows.len() as u64) < self.page;
                        self.take_status(&mut rows)?;
                        self.rows.extend(rows);
                        if last {
                            // The reader has committed: wait for it to give the
                            // connection back, so that it is in the pool when we end.
                            self.finish();
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    // The reader has sent its last page, ended the transaction and
                    // given the connection back.
                    Err(_) => {
                        self.finish();
                        Ok(())
                    }
                }
            }
        }
    }

    /// Stops the reader thread, if any, and waits until it has ended its transaction
    /// and given the connection back to the pool.
    fn finish(&mut self) {
        self.state = State::Done;
        // A reader blocked on a full channel wakes up to a closed one and stops.
        self.pages = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Fetches the next page, retrying transient failures. A retry starts again from
    /// the keyset bound, which only ever moves past events already yielded: rows that
    /// were fetched but not yet yielded are fetched again.
    fn fetch_retrying(&mut self) -> Result<()> {
        let span = self.ops.span().clone();
        let _entered = span.enter();
        loop {
            match self.fetch() {
                Ok(()) => {
                    self.retry.succeeded();
                    return Ok(());
                }
                Err(e) if self.retry.again(&e) => {
                    self.rows.clear();
                    self.finish();
                    self.state = State::Start;
                    // Dead idle connections (a restart leaves only those) cost no attempt.
                    crate::retry::sweep(self.store.pool());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn fail(&mut self, e: Error) -> Option<Result<RecordedEvent>> {
        self.rows.clear();
        self.finish();
        Some(Err(e))
    }
}

/// The cursor reader: opens a read-only transaction after the first page, and sends page
/// after page (one ahead of the consumer), each fetched by the read's statement with the
/// page's `LIMIT`, after the last event fetched. It commits after the last page, and also, so that no snapshot
/// is held while nothing is fetched: when the consumer cannot take a fetched page at once,
/// and when the transaction is [`Config::read_snapshot_max_age`](crate::Config::read_snapshot_max_age)
/// old; the next page then comes from a new transaction, after the last event fetched. When a page has waited that long for a busy consumer, the reader
/// also gives the connection back to the pool, and takes one again when the consumer has
/// taken the page. On an error, or when the consumer has gone, the transaction is
/// dropped, which rolls it back. Dropping `conn` at the end gives it back to the pool; if
/// the rollback failed the connection is broken, and the pool drops it instead of reusing
/// it.
fn read_cursor(
    store: Store,
    conn: Option<Conn>,
    mut query: Query,
    mut limit: Option<i64>,
    page: u64,
    pages: Sender<Result<Vec<Row>>>,
) {
    let max_age = store.config().read_snapshot_max_age;
    // `None` while the consumer is away (or the read waited for held-back events): the
    // connection is back in the pool.
    let mut held = conn;
    let mut run = || -> Result<()> {
        let page = i64::try_from(page).unwrap_or(i64::MAX);
        loop {
            let conn = match &mut held {
                Some(conn) => conn,
                None => held.insert(store.conn()?),
            };
            let statement = store.prepared(conn, query.page_statement(&store))?;
            let mut tx = conn.build_transaction().read_only(true).start()?;
            let began = Instant::now();
            loop {
                // One statement per page, each with the page's `LIMIT`, going on after
                // the last event fetched (the keyset bound), rather than one portal
                // fetched page by page: the planner sees a `LIMIT` of one page and takes
                // the ordered index scan. Without a `LIMIT` it planned for the whole rest
                // of the read, and on a table with statistics chose to sort it (an
                // external sort of 42 MB on disk for 300,000 events, before the first
                // row). A page costs a `Bind` more.
                let asked = limit.map_or(page, |l| l.min(page));
                let rows = tx
                    .query(&statement, &query.page_params(&Some(asked)))
                    .map_err(|e| store.map_error(e))?;
                let events = advance_past(&mut query, &rows)?;
                if let Some(l) = &mut limit {
                    *l -= events;
                }
                if events < asked || limit == Some(0) {
                    // End the transaction before handing over the last page, so that the
                    // connection is back in the pool when the consumer sees the end.
                    tx.commit()?;
                    let _ = pages.send(Ok(rows));
                    return Ok(());
                }
                match pages.try_send(Ok(rows)) {
                    Ok(()) if began.elapsed() < max_age => continue,
                    Ok(()) => {
                        tx.commit()?;
                        break;
                    }
                    Err(TrySendError::Full(rows)) => {
                        // The consumer is busy with the page before: wait for it without
                        // a snapshot, which would keep `VACUUM` and the pruning of
                        // updated rows (a projection's read model) from cleaning up
                        // behind the consumer's own writes; and, once the page has
                        // waited `max_age`, without a connection that other threads
                        // may need meanwhile.
                        tx.commit()?;
                        match pages.send_timeout(rows, max_age) {
                            Ok(()) => {}
                            Err(SendTimeoutError::Timeout(rows)) => {
                                held = None;
                                if pages.send(rows).is_err() {
                                    return Ok(()); // the consumer has gone
                                }
                            }
                            Err(SendTimeoutError::Disconnected(_)) => return Ok(()),
                        }
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => return Ok(()), // gone
                }
            }
        }
    };
    if let Err(e) = run() {
        let _ = pages.send(Err(e));
    }
}

/// Moves `query`'s keyset bound past the last event of `rows` (a page as the read's
/// statement returns it, whose first row may be a `$all` status row), and returns how
/// many events the page holds.
fn advance_past(query: &mut Query, rows: &[Row]) -> Result<i64> {
    let status = rows.first().is_some_and(Horizon::is_status_row);
    let events = rows.len() - usize::from(status);
    if events > 0 {
        let last = rows.last().expect("a page with events");
        query.advance_to(last.try_get(3)?, last.try_get(0)?);
    }
    Ok(events as i64)
}

impl Iterator for Events {
    type Item = Result<RecordedEvent>;

    fn next(&mut self) -> Option<Result<RecordedEvent>> {
        // A page may be empty and still not the last: one that ended at a horizon the
        // read then waited past.
        while self.rows.is_empty() {
            if self.state == State::Done {
                return None;
            }
            if let Err(e) = self.fetch_retrying() {
                return self.fail(e);
            }
        }
        let row = self.rows.pop_front()?;
        match RecordedEvent::from_row(&row) {
            Ok(event) => {
                self.query.advance(&event);
                self.ops.yielded();
                if let Some(r) = &mut self.remaining {
                    *r -= 1;
                }
                Some(Ok(event))
            }
            Err(e) => self.fail(e),
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.finish();
    }
}
