//! The SQL text of one store, built once from its validated, quoted schema name.
//!
//! No user text is ever formatted into SQL: identifiers are checked by
//! [`check_identifier`] and quoted, values travel as parameters.

use crate::error::{Error, Result};

/// How many low bits of a global position number the events of one transaction.
/// The high bits are the appending transaction's id (`xid8`); see the crate docs.
pub(crate) const POSITION_BITS: u32 = 20;

/// The most events one transaction can append.
pub const MAX_EVENTS_PER_TRANSACTION: u64 = 1 << POSITION_BITS;

/// Accepts a plain SQL identifier: ASCII letters, digits and `_`, not starting with a digit,
/// 1 to 63 bytes. Everything else is refused with a message naming the value.
pub(crate) fn check_identifier(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "the {what} name {name:?} is not allowed: use 1 to 63 ASCII letters, digits and \
             underscores, not starting with a digit"
        )))
    }
}

/// A string literal (standard-conforming: only `'` needs doubling).
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Quotes an identifier already accepted by [`check_identifier`].
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The columns every read returns, in the order `RecordedEvent::from_row` expects.
const COLUMNS: &str = "global_position, event_id, stream_id, stream_version, event_type, \
                       data, metadata, recorded_at";

// Statements that do not depend on the schema.

/// This connection's backend pid.
pub(crate) const BACKEND_PID: &str = "SELECT pg_backend_pid()";

/// For connections whose commits need not wait for the WAL flush (the notifier's).
pub(crate) const ASYNC_COMMIT: &str = "SET synchronous_commit = off";

/// The advisory lock class of the commit watcher: an `append_in` takes the shared lock
/// `(class, xid mod 2^31)` for the rest of its transaction (see the full append
/// statement); the watcher's exclusive request for it is granted when that transaction
/// ends.
pub(crate) const WATCH_LOCK_CLASS: i32 = 0x5045_5335; // "PES5"

/// Waits (up to `$2`, a `lock_timeout` value) for the transaction whose id is `$1` to
/// end: takes and at once gives back the watcher's lock on it; then, as
/// [`transaction_status`] does for `$3` and `$4`, whether any committed, which are still
/// open, and the `NOTIFY` on channel `$4`. (The columns are evaluated in order: the
/// statuses are read after the wait.)
pub(crate) fn wait_for_transaction() -> String {
    let class = WATCH_LOCK_CLASS;
    format!(
        "SELECT set_config('lock_timeout', $2, false),
       pg_advisory_lock({class}, ($1 % 2147483648)::int),
       pg_advisory_unlock({class}, ($1 % 2147483648)::int),
       {}",
        status_columns(3, 4)
    )
}

/// Of the transaction ids in `$1`: whether any committed, and which are still in
/// progress (an aborted one, or one too old to know, is neither); when any committed and
/// `$2` is not null, a `NOTIFY` on channel `$2`, sent when this statement's transaction
/// commits, that is, as it returns.
pub(crate) fn transaction_status() -> String {
    format!("SELECT {}", status_columns(1, 2))
}

/// The status columns of [`wait_for_transaction`] and [`transaction_status`]: `ids` and
/// `channel` are their parameter numbers.
fn status_columns(ids: u8, channel: u8) -> String {
    let committed = format!(
        "EXISTS (SELECT 1 FROM unnest(${ids}::bigint[]) x
                WHERE pg_xact_status(x::text::xid8) = 'committed')"
    );
    format!(
        "{committed},
       ARRAY(SELECT x FROM unnest(${ids}::bigint[]) x
              WHERE pg_xact_status(x::text::xid8) = 'in progress'),
       CASE WHEN ${channel}::text IS NOT NULL AND {committed}
            THEN pg_notify(${channel}::text, '')::text END"
    )
}

/// `LISTEN` on a channel; also what notifiers look for in `pg_stat_activity`.
pub(crate) fn listen(channel: &str) -> String {
    format!("LISTEN {}", quote(channel))
}

/// The table of the keys of the MAC of notifications that carry events (schema
/// version 12; see `notify_events` in [`Sql::new`]), as a parameter of
/// [`FEED_KEY_READABLE`].
pub(crate) fn feed_key_table(schema: &str) -> String {
    format!("{}.feed_key", quote(schema))
}

/// Whether the table `$1` exists and this role may read it: asked before reading the
/// key, so that a store at an older version, or a role without the grant, leaves no
/// error in the server's log at every look.
pub(crate) const FEED_KEY_READABLE: &str = "SELECT CASE WHEN to_regclass($1) IS NULL THEN false
            ELSE has_table_privilege($1, 'SELECT') END";

/// Whether every function of `$1` (signatures, as `regprocedure` reads them) exists and
/// this role may execute it.
pub(crate) const FUNCTION_CALLABLE: &str =
    "SELECT COALESCE(bool_and(COALESCE(has_function_privilege(to_regprocedure(f), 'EXECUTE'),
                                      false)), false)
       FROM unnest($1::text[]) f";

/// The argument types of the `append_in` functions.
pub(crate) const APPEND_IN_ARGS: &str =
    "(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)";

/// The signature of the `append_in` function `name` of `schema`, for
/// [`FUNCTION_CALLABLE`].
pub(crate) fn append_in_signature(schema: &str, name: &str) -> String {
    format!("{}.{name}{APPEND_IN_ARGS}", quote(schema))
}

/// The keys themselves.
pub(crate) fn feed_key(schema: &str) -> String {
    format!(
        "SELECT inner_key, outer_key FROM {}",
        feed_key_table(schema)
    )
}

/// `NOTIFY` on a channel.
pub(crate) fn notify(channel: &str) -> String {
    format!("NOTIFY {}", quote(channel))
}

/// Whether a backend other than ours and the listener `$2` runs `$1` (the `LISTEN`), or
/// may: a backend whose query text the role may not see counts as a listener. (Such a
/// row hides its `backend_type` too, as NULL.)
pub(crate) const OTHERS_LISTEN: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
     WHERE pid <> $2 AND pid <> pg_backend_pid()
       AND ((backend_type = 'client backend' AND query = $1)
            OR query = '<insufficient privilege>'))";

/// A processor's session-level advisory lock (`$1` the class, `$2` the key text).
pub(crate) const TRY_LOCK_PROCESSOR: &str = "SELECT pg_try_advisory_lock($1, hashtext($2))";
pub(crate) const UNLOCK_PROCESSOR: &str = "SELECT pg_advisory_unlock($1, hashtext($2))";
/// The same lock in shared mode: the members of a consumer group.
pub(crate) const TRY_LOCK_PROCESSOR_SHARED: &str =
    "SELECT pg_try_advisory_lock_shared($1, hashtext($2))";
pub(crate) const UNLOCK_PROCESSOR_SHARED: &str =
    "SELECT pg_advisory_unlock_shared($1, hashtext($2))";

/// Ends this connection's backend: the way out when a session lock cannot be released.
pub(crate) const TERMINATE_SELF: &str = "SELECT pg_terminate_backend(pg_backend_pid())";

/// The name of the transaction-local setting that the library's lifecycle statements
/// (removing deleted, truncated and expired events) set to `on` for their own
/// transaction; the trigger on the events table refuses any `DELETE` without it, and
/// every `UPDATE` and `TRUNCATE`.
pub(crate) const LIFECYCLE_SETTING: &str = "pg_eventstore.lifecycle";

/// The head version of a stream whose last event is a tombstone
/// ([`crate::STREAM_TOMBSTONE`]): no version can follow it.
pub(crate) const TOMBSTONE_HEAD: i64 = i64::MAX;

/// The last event of the stream named by the SQL expression `stream`: its version `v`
/// ([`TOMBSTONE_HEAD`] for a tombstone) and position `hp`, or no row. One index probe,
/// newest version first.
pub(crate) fn stream_head_lookup(events: &str, stream: &str) -> String {
    let tombstone = crate::event::STREAM_TOMBSTONE;
    format!(
        "SELECT CASE WHEN e.event_type = '{tombstone}' THEN {TOMBSTONE_HEAD}
                     ELSE e.stream_version END AS v,
                e.global_position AS hp
           FROM {events} e
          WHERE e.stream_id = {stream} ORDER BY e.stream_version DESC LIMIT 1"
    )
}

/// The head of the stream `$1` as one row, `(v, hp)` NULL when the stream does not exist.
fn stream_head_row(events: &str) -> String {
    format!(
        "SELECT h.v, h.hp FROM (SELECT 1) one LEFT JOIN LATERAL ({}) h ON true",
        stream_head_lookup(events, "$1")
    )
}

/// Whether the stream's head version `v` (NULL: no stream) is what the append expects:
/// `$6` is the kind (0 any, 1 no stream, 2 stream exists, 3 exact) and `$7` the version,
/// as `ExpectedVersion::to_params` gives them. Never after a tombstone.
fn expected_version_ok(v: &str) -> String {
    format!(
        "{v} IS DISTINCT FROM {TOMBSTONE_HEAD} AND CASE $6::int WHEN 0 THEN true
                      WHEN 1 THEN {v} IS NULL
                      WHEN 2 THEN {v} IS NOT NULL
                      ELSE {v} = $7::bigint END"
    )
}

/// The first free position of the transaction slot that starts at the SQL expression
/// `lo` (`xid << POSITION_BITS`): after the transaction's earlier events, if any.
pub(crate) fn slot_next(events: &str, lo: &str) -> String {
    let max = MAX_EVENTS_PER_TRANSACTION;
    format!(
        "COALESCE((SELECT max(e.global_position) + 1 FROM {events} e
                    WHERE e.global_position >= {lo} AND e.global_position < {lo} + {max}),
                  {lo})"
    )
}

/// One statement of a store: its SQL text, built once for the store's schema, and its
/// name (the field of [`Sql`] that holds it), which keys the prepared-statement cache of
/// each pooled connection. Key and text cannot drift apart: [`statements!`] takes both
/// from the same line.
#[derive(Debug)]
pub(crate) struct Statement {
    name: &'static str,
    text: String,
}

impl Statement {
    /// The key of this statement in a connection's prepared-statement cache.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The SQL text, for clients that are not ours (a caller's transaction).
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

/// Builds [`Sql`]: `name: text` (or a variable `name` that holds the text) for each
/// statement, named after its field.
macro_rules! statements {
    (schema: $schema:expr, group: $group:expr; $($name:ident $(: $text:expr)?),* $(,)?) => {
        Sql {
            schema: $schema,
            group: $group,
            $($name: Statement {
                name: stringify!($name),
                text: statements!(@text $name $(, $text)?),
            },)*
        }
    };
    (@text $name:ident) => { $name };
    (@text $name:ident, $text:expr) => { $text };
}

/// How `append_in_first` takes the stream's lock (for `ExpectedVersion::Any`).
#[derive(Clone, Copy)]
enum StreamLock {
    /// Not at all: the caller took it, or the append expects a version.
    None,
    /// Waiting for it inside the statement, whose snapshot then predates the wait.
    Wait,
    /// Only if it is free; otherwise the statement writes nothing.
    Try,
}

/// How `append_in_first` takes the watcher's lock in its `RETURNING` (when it inserted
/// and `$8` is set).
#[derive(Clone, Copy)]
enum WatchLock {
    /// In a subquery that counts the locks taken: schema versions 9 and 10 (frozen in
    /// their functions, see `append_in_first_v9`). The subquery is a subplan, which the
    /// server starts and runs once per call.
    Subquery,
    /// In a `CASE`, which evaluates the lock only when `$8` is set and adds no plan
    /// node: about 20,000 fewer server instructions per call (5.6 % of an
    /// `append_in_any` call, measured with callgrind; see BENCHMARKS.md).
    Case,
}

/// The columns an append that notifies returns besides `global_position` and
/// `stream_version`, for the events in its payload (see `notify_events` in `Sql::new`).
const PAYLOAD_COLUMNS: &str = "event_id, stream_id, event_type, data, metadata, recorded_at";

/// The most bytes of JSON a notification's payload carries after the store's own 32
/// characters and a space: PostgreSQL refuses payloads of 8,000 bytes or more.
pub(crate) const NOTIFY_ROOM: usize = 7_900;

/// The MAC (hex) of the JSON text `json` with the keys of the `feed_key` row `k` (see
/// `notify_events` in [`Sql::new`]; `listener::FeedKey::signed` checks it).
pub(crate) fn mac(json: &str) -> String {
    format!(
        "encode(sha256(k.outer_key || sha256(k.inner_key || convert_to({json}, 'UTF8'))), 'hex')"
    )
}

/// Whether `prev` is final for an append whose transaction id is `x` and whose
/// snapshot is `snapshot` (SQL expressions; see `prev_final` in [`Sql::new`]).
pub(crate) fn is_final(snapshot: &str, x: &str) -> String {
    format!(
        "{x} - pg_snapshot_xmax({snapshot})::text::bigint <= 64
           AND NOT EXISTS (
               SELECT 1
                 FROM (SELECT t::text::bigint AS t FROM pg_snapshot_xip({snapshot}) t
                       UNION ALL
                       SELECT generate_series(pg_snapshot_xmax({snapshot})::text::bigint, {x} - 1)) u
                WHERE u.t % 4294967296 NOT IN (
                      SELECT a.backend_xid::text::bigint FROM pg_stat_get_activity(NULL) a
                       WHERE a.backend_xid IS NOT NULL
                         AND a.datid IS DISTINCT FROM (SELECT oid FROM pg_database
                                                        WHERE datname = current_database())))"
    )
}

/// One event in a notification's payload (see `listener::PayloadEvent`), from the row
/// of `alias`: data and metadata as their `jsonb` text, exactly as a read returns them,
/// and the time recorded in microseconds since the Unix epoch (`extract` is exact).
pub(crate) fn event_json(alias: &str) -> String {
    format!(
        "json_build_object('p', {alias}.global_position, 'id', {alias}.event_id,
        's', {alias}.stream_id, 'v', {alias}.stream_version, 't', {alias}.event_type,
        'd', {alias}.data::text, 'm', {alias}.metadata::text,
        'r', (extract(epoch FROM {alias}.recorded_at) * 1000000)::bigint)"
    )
}

/// All statements of one store.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) append: Statement,
    pub(crate) append_any: Statement,
    /// `append` and `append_any` through their functions (see `append_in_function` in
    /// migrate.rs), for callers' connections.
    pub(crate) append_in: Statement,
    pub(crate) append_in_any: Statement,
    /// The same through the functions that return one record (schema version 15, see
    /// `m0015_append_in_record` in migrate.rs): one column, read as an `AppendRow`.
    pub(crate) append_in_record: Statement,
    pub(crate) append_in_any_record: Statement,
    /// `append_in` and `append_in_any` for an append that sends its own wake-up (see
    /// `Hub::plan_append_in`), not watched.
    pub(crate) append_in_notify: Statement,
    pub(crate) append_in_any_notify: Statement,
    /// Either with the events in the `NOTIFY` (schema version 13, `$8` the channel).
    pub(crate) append_in_notify_events: Statement,
    /// One event as the first write of a caller's transaction, inside the functions
    /// from schema version 9: see `append_in_first` below; `_any` for
    /// `ExpectedVersion::Any`.
    pub(crate) append_in_first: Statement,
    pub(crate) append_in_first_any: Statement,
    /// `append_in_first` as schema versions 9 and 10 froze it in the functions: it
    /// takes the watcher's lock in a subquery of its `RETURNING` (see `WatchLock`).
    pub(crate) append_in_first_v9: Statement,
    /// `append_in_first` for `ExpectedVersion::Any` sent by itself (prepared, by a
    /// `StoreTransaction`): it takes the stream's lock only when it is free, and
    /// otherwise writes nothing and takes no transaction id, so that `append_in_any`
    /// (schema version 10) then waits for the lock and appends with a snapshot taken
    /// after the wait.
    pub(crate) append_in_first_try: Statement,
    pub(crate) append_fast: Statement,
    /// The first write of a caller's transaction (see `append_in_function` in
    /// migrate.rs): the columns of `append`, through a lean statement.
    pub(crate) append_first: Statement,
    pub(crate) append_one: Statement,
    /// `append_fast` and `append_one` that also send the store's `NOTIFY` as they commit,
    /// a wake-up alone.
    pub(crate) append_fast_notify: Statement,
    pub(crate) append_one_notify: Statement,
    /// The same with the events in the `NOTIFY` (schema version 12: see `notify_events`
    /// below), for an append that comes after a quiet moment (see `Hub::notify_inline`).
    pub(crate) append_fast_notify_events: Statement,
    pub(crate) append_one_notify_events: Statement,
    /// `append_fast` and `append_one` that return what this process's own subscribers
    /// need to deliver the events without reading them (see `local_columns` below), for
    /// an append after a quiet moment while a subscription here is open. The `_events`
    /// variants above return the same columns.
    pub(crate) append_fast_local: Statement,
    pub(crate) append_one_local: Statement,
    /// The four `append_one` statements for `ExpectedVersion::Exact`: the head's index
    /// probe joined as it is, without the outer join that a stream with no events needs.
    pub(crate) append_one_exact: Statement,
    pub(crate) append_one_exact_notify: Statement,
    pub(crate) append_one_exact_notify_events: Statement,
    pub(crate) append_one_exact_local: Statement,
    pub(crate) stream_head: Statement,
    pub(crate) read_stream_forwards: Statement,
    pub(crate) read_stream_backwards: Statement,
    /// `read_stream_forwards` that also returns the delete markers below the stream's
    /// `$tb`, for stream subscriptions.
    pub(crate) read_stream_forwards_markers: Statement,
    /// `$all` reads without a filter.
    pub(crate) read_all_forwards: Statement,
    /// `read_all_forwards` (and `_filtered`) for a first page when nothing is held back:
    /// see `read_all_lean` below.
    pub(crate) read_all_lean: Statement,
    pub(crate) read_all_lean_filtered: Statement,
    pub(crate) read_all_backwards: Statement,
    /// The same, with transaction ids known to belong to other databases.
    pub(crate) read_all_forwards_others: Statement,
    pub(crate) read_all_backwards_others: Statement,
    /// The four above with a category, event types or a snapshot to leave out.
    pub(crate) read_all_forwards_filtered: Statement,
    pub(crate) read_all_backwards_filtered: Statement,
    pub(crate) read_all_forwards_others_filtered: Statement,
    pub(crate) read_all_backwards_others_filtered: Statement,
    /// A page of a `$all` read after its first, below the horizon its first page fixed
    /// (`$3`): `$1` the keyset bound, `$2` the page size, and in the `_filtered` ones
    /// `$4` to `$7` the filters (see `all_filters`). No horizon to compute, no status row.
    pub(crate) read_all_page_forwards: Statement,
    pub(crate) read_all_page_backwards: Statement,
    pub(crate) read_all_page_forwards_filtered: Statement,
    pub(crate) read_all_page_backwards_filtered: Statement,
    pub(crate) head_position: Statement,
    pub(crate) feed_status: Statement,
    pub(crate) horizon: Statement,
    pub(crate) live_start: Statement,
    pub(crate) floor_check: Statement,
    pub(crate) lock_for_appends: Statement,
    pub(crate) needs_floor_check: Statement,
    pub(crate) save_snapshot: Statement,
    pub(crate) load_snapshot: Statement,
    pub(crate) load_checkpoint: Statement,
    pub(crate) save_checkpoint: Statement,
    pub(crate) claim_stream_version: Statement,
    pub(crate) park: Statement,
    pub(crate) scan_past: Statement,
    pub(crate) list_processors: Statement,
    pub(crate) delete_checkpoint: Statement,
    /// `Store::move_checkpoint`: the stored checkpoint of `$1` (or none) and whether `$1`
    /// is a consumer group, for the update that follows in the same transaction.
    pub(crate) checkpoint_for_move: Statement,
    pub(crate) delete_stream_claims: Statement,
    pub(crate) list_dead_letters: Statement,
    pub(crate) delete_dead_letter: Statement,
    pub(crate) delete_dead_letters: Statement,
    pub(crate) has_dead_letters: Statement,
    pub(crate) take_dead_letter: Statement,
    pub(crate) event_at: Statement,
    pub(crate) read_claims: Statement,
    pub(crate) watch_in: Statement,
    pub(crate) lock_events: Statement,
    pub(crate) import_slot: Statement,
    pub(crate) import_lock_streams: Statement,
    pub(crate) import_heads: Statement,
    pub(crate) import_fresh_heads: Statement,
    pub(crate) import_truncate_before: Statement,
    pub(crate) import_copy: Statement,
    pub(crate) stats_categories: Statement,
    pub(crate) count_from: Statement,
    pub(crate) count_matching: Statement,
    pub(crate) write_claims: Statement,
    pub(crate) group: GroupSql,
    pub(crate) set_stream_metadata: Statement,
    pub(crate) stream_metadata: Statement,
    pub(crate) delete_stream: Statement,
    pub(crate) remove_events: Statement,
    pub(crate) delete_snapshot: Statement,
    pub(crate) scavenge_page: Statement,
    pub(crate) set_truncate_before: Statement,
}

/// Whether an event passes the filters of a `ReadAll` (`ReadAll::matches` in Rust), with
/// the parameters holding the category, the event types and the stream ids; a NULL
/// parameter lets every event through.
fn filters_match(category: &str, types: &str, streams: &str) -> String {
    format!(
        "({category}::text IS NULL OR starts_with(stream_id, {category}::text))
    AND ({types}::text[] IS NULL OR event_type = ANY({types}::text[]))
    AND ({streams}::text[] IS NULL OR stream_id = ANY({streams}::text[]))"
    )
}

/// The filters of the `_filtered` `$all` reads (none for the others), from parameter
/// `$first` on: the category, the event types, the snapshot whose events are left out,
/// the streams (`$5` to `$8` in the reads of a first page).
fn all_filters(filtered: bool, first: usize) -> String {
    if !filtered {
        return String::new();
    }
    let [category, types, snapshot, streams] = [0, 1, 2, 3].map(|i| format!("${}", first + i));
    format!(
        "
    AND {}
    AND ({snapshot}::text IS NULL OR NOT pg_visible_in_snapshot(
           (global_position >> {POSITION_BITS})::text::xid8, {snapshot}::text::pg_snapshot))",
        filters_match(&category, &types, &streams)
    )
}

/// `global_position` below the horizon `horizon` (a value: a parameter, or a subquery
/// that reads the horizon), as a bound of an index scan. Written as `< ANY (ARRAY[...])`, not as `< (...)`: beside a lower bound
/// `> $1`, a plain `<` on a value the planner does not know makes a range that it
/// estimates at 0.5 % of the table (its default), whatever the range really holds; on a
/// table with statistics it then read a whole `$all` range with a bitmap scan and sorted
/// it (a top-N sort of 300,000 events for a first page of 4,000, 74 ms instead of 1.6 ms;
/// an external sort of 42 MB on disk for the rest of the read). `< ANY` keeps the bound
/// in the index scan but is not paired with `> $1` into such a range, and the read's
/// `ORDER BY ... LIMIT` then takes the ordered index scan.
fn below_horizon(horizon: &str) -> String {
    format!("global_position < ANY (ARRAY[{horizon}])")
}

/// The keyset bounds of `$all` reads, below the read's horizon `h`.
fn all_forwards() -> String {
    format!(
        "global_position > $1 AND {}",
        below_horizon("(SELECT horizon FROM h)")
    )
}
const ALL_BACKWARDS: &str = "global_position < LEAST($1, (SELECT horizon FROM h))";

impl Sql {
    pub(crate) fn new(schema: &str) -> Sql {
        let s = quote(schema);
        let events = format!("{s}.events");
        let max = MAX_EVENTS_PER_TRANSACTION;
        let bits = POSITION_BITS;
        let floor_seq = format!("{s}.feed_floor");
        // The `$all` horizon for a statement's own snapshot: see `feed_horizon` in
        // migrate.rs and "The global order" in the crate docs.
        let horizon = format!("{s}.feed_horizon(pg_current_snapshot())");
        // Set (to 'on', for the rest of the transaction) by `lock_for_appends` when the
        // transaction took the events table's lock before it had an id: it can never be
        // passed by readers, so its appends skip the floor check.
        let lock_flag = format!("'pg_eventstore.lock_' || '{events}'::regclass::oid::text");
        let locked_early = format!("current_setting({lock_flag}, true)");
        // A `$all` read returns, besides its events, one status row: the horizon it read
        // below in `global_position`, the newest committed position (or -1) in
        // `stream_version`, the transaction holding it back as `{{"pid", "xid"}}` in
        // `metadata`, the snapshot's transactions of other databases (when the function
        // ran) as an array in `data`, and NULL `event_id` (which every event has). `$6` is the horizon of an earlier
        // page of the same read, or NULL to compute it now; `$7` the store's highest
        // horizon; `$8` (in the `_others` variants) transaction ids known to belong to
        // other databases.
        let read_all = |direction: &str, bound: &str, others: bool, filtered: bool| {
            // Parameters: `$1` the keyset bound, `$2` the page size, `$3` an earlier
            // page's horizon, `$4` the store's highest horizon; in the filtered variants
            // `$5` the category, `$6` the event types, `$7` the snapshot whose events are
            // left out, `$8` the streams; last, in the `_others` variants, the other
            // databases' ids. The
            // unfiltered variants carry no filter at all: in a generic plan a filter
            // that is NULL is still evaluated on every row (3 % of a 300,000-event read
            // on the server).
            let (limit, hz, known) = ("$2", "$3", "$4");
            let others_p = if filtered { "$9" } else { "$5" };
            let filters = all_filters(filtered, 5);
            // The horizon of this read, `h0`, without a function call in two quick cases
            // (see feed_horizon): the newest event is below the snapshot's xmin, so
            // nothing is held back (`easy`); or (only in the `_others` variants, so that
            // other reads do not carry its subquery) every transaction of the snapshot
            // below `c` is one that an earlier read found in another database,
            // and can never append here (`clear`).
            let horizon_cte = if others {
                format!(
                    "WITH t AS MATERIALIZED (
    -- OFFSET 0 reads the tip once.
    SELECT y.tip, y.cheap, least((y.tip >> {bits}) + 1, y.xmax8) AS c,
           (y.tip IS NULL OR y.tip < y.cheap) AS easy,
           CASE WHEN NOT (y.tip IS NULL OR y.tip < y.cheap) THEN
               NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(y.snap) x
                            WHERE x::text::bigint < least((y.tip >> {bits}) + 1, y.xmax8)
                              AND x::text::bigint <> ALL({others_p}::bigint[]))
           END AS clear
      FROM (SELECT (SELECT e.global_position FROM {events} e
                     ORDER BY e.global_position DESC LIMIT 1) AS tip,
                   pg_snapshot_xmin(s.snap)::text::bigint << {bits} AS cheap,
                   pg_snapshot_xmax(s.snap)::text::bigint AS xmax8, s.snap
              FROM (SELECT pg_current_snapshot() AS snap) s
             WHERE {hz}::bigint IS NULL OFFSET 0) y
), h0 AS MATERIALIZED (
    SELECT t.cheap AS horizon, t.tip, NULL::int AS blocker_pid, NULL::bigint AS blocker_xid,
           NULL::bigint[] AS others
      FROM t WHERE t.easy
    UNION ALL
    SELECT t.c << {bits}, t.tip, NULL, NULL, NULL FROM t WHERE NOT t.easy AND t.clear
    UNION ALL
    SELECT f.horizon, f.tip, f.blocker_pid, f.blocker_xid, f.others
      FROM t CROSS JOIN LATERAL (
           SELECT * FROM {horizon} WHERE NOT t.easy AND NOT t.clear) f
    UNION ALL
    SELECT {hz}::bigint, NULL, NULL, NULL, NULL WHERE {hz}::bigint IS NOT NULL"
                )
            } else {
                format!(
                    "WITH t AS MATERIALIZED (
    SELECT (SELECT e.global_position FROM {events} e
             ORDER BY e.global_position DESC LIMIT 1) AS tip,
           pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {bits} AS cheap
     WHERE {hz}::bigint IS NULL
), h0 AS MATERIALIZED (
    SELECT t.cheap AS horizon, t.tip, NULL::int AS blocker_pid, NULL::bigint AS blocker_xid,
           NULL::bigint[] AS others
      FROM t WHERE t.tip IS NULL OR t.tip < t.cheap
    UNION ALL
    SELECT f.horizon, f.tip, f.blocker_pid, f.blocker_xid, f.others
      FROM t CROSS JOIN LATERAL (
           SELECT * FROM {horizon} WHERE NOT (t.tip IS NULL OR t.tip < t.cheap)) f
    UNION ALL
    SELECT {hz}::bigint, NULL, NULL, NULL, NULL WHERE {hz}::bigint IS NOT NULL"
                )
            };
            format!(
                "{horizon_cte}
), h AS MATERIALIZED (
    -- Never below a horizon this store has computed before (`$7`): each is final, and
    -- one computed later may be lower (see feed_horizon).
    SELECT CASE WHEN {hz}::bigint IS NULL THEN GREATEST(h0.horizon, {known}::bigint)
                ELSE h0.horizon END AS horizon,
           h0.tip, h0.blocker_pid, h0.blocker_xid, h0.others
      FROM h0
)
SELECT h.horizon, NULL::uuid, NULL::text, COALESCE(h.tip, -1), NULL::text, to_jsonb(h.others),
       jsonb_build_object('pid', h.blocker_pid, 'xid', h.blocker_xid), NULL::timestamptz
  FROM h
UNION ALL
(SELECT {COLUMNS} FROM {events}
  WHERE {bound}{filters}
  ORDER BY global_position {direction} LIMIT {limit})"
            )
        };
        // A forwards `$all` first page (same parameters as `read_all_forwards`, or
        // `_filtered`; `$3` is NULL) for the common case, without the horizon's
        // branches: it reads below the snapshot's xmin, or below the store's highest
        // horizon (`$4`) when that is higher. Everything below either is final. When
        // the newest event is below that bound too, nothing is held back and the page
        // is the one `read_all_forwards` returns; otherwise (its status row holds back)
        // the reader discards it and runs the full statement, which may find a higher
        // horizon. A subscription's read after a wake-up costs 30–45 µs less at the
        // server (pgbench, after 2 ms idle, as a subscriber's reads come).
        let read_all_lean = |filtered: bool| {
            let filters = all_filters(filtered, 5);
            let below = below_horizon("(SELECT horizon FROM t)");
            format!(
                "WITH t AS MATERIALIZED (
    SELECT (SELECT e.global_position FROM {events} e
             ORDER BY e.global_position DESC LIMIT 1) AS tip,
           GREATEST(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {bits},
                    $4::bigint) AS horizon
     WHERE $3::bigint IS NULL
)
SELECT t.horizon, NULL::uuid, NULL::text, COALESCE(t.tip, -1), NULL::text, NULL::jsonb,
       '{{}}'::jsonb, NULL::timestamptz
  FROM t
UNION ALL
(SELECT {COLUMNS} FROM {events}
  WHERE global_position > $1 AND {below}{filters}
  ORDER BY global_position LIMIT $2)"
            )
        };
        // The page statements: planned in a fraction of the full statement's time, which
        // every page would otherwise pay (about 3 % of W5 in alternated rounds).
        let read_all_page = |forwards: bool, filtered: bool| {
            let (bound, direction) = if forwards {
                (
                    format!("global_position > $1 AND {}", below_horizon("$3::bigint")),
                    "",
                )
            } else {
                (
                    "global_position < LEAST($1::bigint, $3::bigint)".to_string(),
                    " DESC",
                )
            };
            format!(
                "SELECT {COLUMNS} FROM {events}
  WHERE {bound}{}
  ORDER BY global_position{direction} LIMIT $2",
                all_filters(filtered, 4)
            )
        };
        // One statement, one round trip: find repeats of these ids, check the expected
        // version against the stream's head, claim positions inside this transaction's
        // slot, insert, and (inside a caller's transaction, `$8` set) take the lock that
        // lets this process's commit watcher learn when the transaction ends.
        // The head must sort before this transaction's slot, so that a stream's events
        // are in version order in the global order too. A concurrent writer that slips in between is caught by the unique
        // constraints, not by this read.
        let head = stream_head_row(&events);
        let expected = expected_version_ok("h.v");
        let slot = slot_next(&events, "r.lo");
        let full_append = |head: &str| {
            format!(
            "WITH input AS (
    SELECT t.event_id, t.event_type, t.data, t.metadata, t.n
      FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
           WITH ORDINALITY AS t(event_id, event_type, data, metadata, n)
), dup AS (
    SELECT e.stream_id, e.stream_version, e.global_position, i.n,
           (e.event_type = i.event_type AND e.data = i.data
            AND e.metadata IS NOT DISTINCT FROM i.metadata) AS same
      FROM input i CROSS JOIN LATERAL (
           -- LIMIT keeps this a per-event index probe: as a plain join, a plan made
           -- while the table was small (a new store, before autovacuum's first
           -- ANALYZE) hashes the input and scans the whole table on every append.
           SELECT e.stream_id, e.stream_version, e.global_position, e.event_type,
                  e.data, e.metadata
             FROM {events} e WHERE e.event_id = i.event_id LIMIT 1) e
), head AS (
    {head}
), slot_range AS MATERIALIZED (
    -- The feed floor and the stream's head are read before this transaction's id is
    -- taken (the CASE orders them): an id taken after the read is above every floor
    -- published before it, so only a transaction that came with an id can be refused
    -- below; and an append that waited for the stream's lock takes an id newer than
    -- the appender it waited for.
    SELECT f.last_value AS floor,
           (CASE WHEN f.last_value >= 0 AND (SELECT count(*) FROM head) >= 0
                 THEN pg_current_xact_id() END)::text::bigint << {bits} AS lo
      FROM {floor_seq} f
), slot AS (
    SELECT {slot} AS p FROM slot_range r
), floor AS (
    -- The first append of a transaction whose id is below the feed floor would sort
    -- before events that `$all` readers have passed (see the crate docs). Later appends
    -- of the same transaction are safe: it has held the events table's lock since the
    -- first one, and readers stop before it.
    SELECT s.p = r.lo AND (r.lo >> {bits}) < r.floor
           AND {locked_early} IS DISTINCT FROM 'on' AS behind
      FROM slot s, slot_range r
), ok AS (
    SELECT h.v, s.p FROM head h, slot s, slot_range r
     WHERE NOT EXISTS (SELECT 1 FROM dup)
       AND s.p + (SELECT count(*) FROM input) <= r.lo + {max}
       AND {expected}
       AND (h.hp IS NULL OR h.hp < r.lo + {max})
       AND NOT (SELECT behind FROM floor)
), ins AS (
    INSERT INTO {events} (global_position, event_id, stream_id, stream_version, event_type, data, metadata)
    SELECT ok.p + i.n - 1, i.event_id, $1, COALESCE(ok.v, -1) + i.n, i.event_type, i.data, i.metadata
      FROM input i, ok
    RETURNING global_position
)
SELECT (SELECT count(*) FROM ins) AS inserted,
       (SELECT min(global_position) FROM ins) AS first_position,
       (SELECT max(global_position) FROM ins) AS last_position,
       (SELECT v FROM head) AS head,
       (SELECT p FROM slot) - (SELECT lo FROM slot_range) + (SELECT count(*) FROM input) AS tx_events,
       (SELECT array_agg(d.stream_id::text ORDER BY d.n) FROM dup d) AS dup_streams,
       (SELECT array_agg(d.stream_version::bigint ORDER BY d.n) FROM dup d) AS dup_versions,
       (SELECT array_agg(d.global_position ORDER BY d.n) FROM dup d) AS dup_positions,
       (SELECT array_agg(d.n ORDER BY d.n) FROM dup d) AS dup_index,
       (SELECT bool_and(d.same) FROM dup d) AS dup_same,
       (SELECT hp >= (SELECT lo FROM slot_range) + {max} FROM head) AS order_conflict,
       (SELECT behind FROM floor) AS behind_floor,
       (SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared({WATCH_LOCK_CLASS},
               (((SELECT lo FROM slot_range) >> {bits}) % 2147483648)::int)
            WHERE $8::text IS NOT NULL AND EXISTS (SELECT 1 FROM ins)) n) AS watched"
            )
        };
        let append = full_append(&head);
        // A call of one of the `append_in` functions with the statement's parameters,
        // `eighth` in place of `$8`. The parameters' types come with the statement
        // (`APPEND_PARAM_TYPES`, whether it is prepared or sent with `query_typed`), so
        // they carry no casts: `append_in` sends its call unprepared, and the server
        // looks up the type name of every cast on every call (8 casts: about 42,800 of
        // the 147,400 instructions of analysing the call, see BENCHMARKS.md).
        let append_in_args = |function: &str, eighth: &str| {
            format!("{s}.{function}($1, $2, $3, $4, $5, $6, $7, {eighth})")
        };
        let append_in_call =
            |function: &str| format!("SELECT * FROM {}", append_in_args(function, "$8"));
        let append_in_record_call =
            |function: &str| format!("SELECT {}", append_in_args(function, "$8"));
        // For `ExpectedVersion::Any`: the head is read after taking the stream's lock,
        // which the transaction holds until it ends, with a snapshot taken after the wait
        // (see `locked_stream_head` in migrate.rs): a concurrent append to the same
        // stream makes this one wait, never fail with a version conflict.
        let append_any = full_append(&format!(
            "SELECT h.head_version AS v, h.head_position AS hp
       FROM {s}.locked_stream_head($1) h"
        ));
        // The head and the insert at the start of this transaction's slot, returning
        // `returning`.
        let lean_insert = |returning: &str| {
            format!(
                "WITH head AS (
    {head}
), ins AS (
    INSERT INTO {events} (global_position, event_id, stream_id, stream_version, event_type, data, metadata)
    SELECT (pg_current_xact_id()::text::bigint << {bits}) + t.n - 1, t.event_id, $1,
           COALESCE(h.v, -1) + t.n, t.event_type, t.data, t.metadata
      FROM head h, unnest($2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
           WITH ORDINALITY AS t(event_id, event_type, data, metadata, n)
     WHERE {expected}
    RETURNING {returning}
)"
            )
        };
        // The common case through the pool, in its own fresh transaction: check the head,
        // insert, nothing else. Its transaction id is newer than any committed head's, its
        // slot is empty, and a repeated id or a lost race fails on a unique constraint:
        // whenever this inserts nothing or fails, the full statement above decides.
        let append_fast = format!(
            "{}
SELECT count(*), min(global_position), max(global_position), max(stream_version) FROM ins",
            lean_insert("global_position, stream_version")
        );
        // `append_fast` and `append_one` with the store's `NOTIFY` in the append's own
        // transaction, sent as it commits when it inserted: for an append that finds
        // another process listening and no `NOTIFY` sent in the last moment (see
        // `Hub::notify_inline`), so that the other process is woken without the
        // notifier's hop. Extra last column, not read. The payload is `$8` (the store's
        // own, see `Hub::payload`).
        //
        // The `_events` variants, for an append that comes after a quiet moment, add to
        // it, when it all fits in a notification, a space, the MAC of the rest (hex), a
        // space and the events with what a subscriber in another process needs to
        // deliver them without reading them (see `listener::Batch`): the position
        // before the first (`prev`, the newest event in the statement's snapshot, which
        // holds none of this transaction's), and whether that is final (`final`): the
        // snapshot saw no transaction of this database with an id running, and this
        // transaction's id is the next one after it, so every transaction whose events could sort before
        // these had ended and is in the snapshot, and none after it. They cost the
        // server about 400,000 instructions more than the wake-up alone (callgrind: the
        // JSON 150,000, `prev` 130,000, the MAC with the key's table 170,000), which is
        // why busy writers send wake-ups alone. `events_json` is the SQL of the JSON
        // array of the events. The MAC is
        // `sha256(outer_key || sha256(inner_key || json))` with the keys of `feed_key`
        // (HMAC's construction with two independent random keys): anybody who can
        // connect can send a notification on the channel, but only a role that can read
        // the store's key can make one whose events a subscription delivers.
        //
        // `prev` and `final` come from the CTE `pf` (see `prev_final`), which the
        // statement's own columns for this process's subscribers share.
        let notify_events = |events_json: &str| {
            format!(
                "pg_notify({channel}, $8::text || COALESCE((
    SELECT ' ' || {mac} || ' ' || z.j
      FROM {s}.feed_key k, (SELECT json_build_object(
        'prev', pf.prev, 'final', pf.is_final, 'events', {events_json})::text AS j
      FROM pf OFFSET 0) z
     WHERE octet_length(z.j) < {room}), ''))::text",
                channel = literal(&crate::listener::channel_name(schema)),
                mac = mac("z.j"),
                room = NOTIFY_ROOM,
            )
        };
        // The CTE `pf` of an append whose inserted rows are the CTE `ins`: `prev`, the
        // newest position in the statement's snapshot, and whether it is final (see
        // `notify_events` above and `listener::Batch`): every transaction with an id
        // below this one's (`x` below) that the snapshot does not see, because it was
        // running (`xip`) or came after it (from `xmax` up), belongs to another
        // database, and so can never append here. They are found in `pg_stat_activity`
        // as `feed_horizon` finds them; one whose backend is not found (it ended
        // meanwhile, or it is prepared) counts as one of this database. The activity is
        // read once (a hashed subplan), only when there are such transactions, and at
        // most 64 are looked up.
        let prev_final = format!(
            "pf AS (
    SELECT (SELECT e.global_position FROM {events} e
             ORDER BY e.global_position DESC LIMIT 1) AS prev,
           {} AS is_final
      FROM (SELECT pg_current_snapshot() AS s) q,
           (SELECT min(x.global_position) >> {bits} AS x FROM ins x) f
)",
            is_final("q.s", "f.x")
        );
        // The call of `append_in_events` or `append_in_any` for an `append_in` that
        // sends its own wake-up (see `Hub::plan_append_in`), sent as the caller's
        // transaction commits, when the call inserted. The function is not asked to take
        // the watcher's lock (its `$8` is null, and the statement's `$8` is not used).
        // The payload is empty, not this process's own: its listener wakes the
        // subscribers here too. Extra last column, not read. (With the events in the
        // payload: `append_in_notify`, schema version 13, see migrate.rs.)
        let append_in_notify_call = |function: &str| {
            format!(
                "SELECT a.*, CASE WHEN a.inserted > 0 THEN pg_notify({}, '')::text END
  FROM {} a",
                literal(&crate::listener::channel_name(schema)),
                append_in_args(function, "NULL::text")
            )
        };
        // What this process's subscribers need besides what the store sent, after the
        // columns an append returns: the data and metadata as their `jsonb` text (exactly
        // as a read returns them) and the time recorded (microseconds since the Unix
        // epoch), as arrays in position order, then `prev` and `final`. The inserted
        // rows must return `PAYLOAD_COLUMNS`.
        let local_columns =
            "(SELECT array_agg(x.data::text ORDER BY x.global_position) FROM ins x),
       (SELECT array_agg(x.metadata::text ORDER BY x.global_position) FROM ins x),
       (SELECT array_agg((extract(epoch FROM x.recorded_at) * 1000000)::bigint
                         ORDER BY x.global_position) FROM ins x),
       (SELECT prev FROM pf), (SELECT is_final FROM pf)";
        let notify_wake = format!(
            "pg_notify({}, $8::text)::text",
            literal(&crate::listener::channel_name(schema))
        );
        let append_fast_notify = format!(
            "{}
SELECT count(*), min(global_position), max(global_position), max(stream_version),
       (SELECT {notify_wake} WHERE EXISTS (SELECT 1 FROM ins))
  FROM ins",
            lean_insert("global_position, stream_version")
        );
        let with_payload = lean_insert(&format!(
            "global_position, stream_version, {PAYLOAD_COLUMNS}"
        ));
        let append_fast_notify_events = format!(
            "{with_payload}, {prev_final}
SELECT count(*), min(global_position), max(global_position), max(stream_version),
       (SELECT {} WHERE EXISTS (SELECT 1 FROM ins)),
       {local_columns}
  FROM ins",
            notify_events(&format!(
                "(SELECT json_agg({} ORDER BY x.global_position) FROM ins x)",
                event_json("x")
            ))
        );
        let append_fast_local = format!(
            "{with_payload}, {prev_final}
SELECT count(*), min(global_position), max(global_position), max(stream_version),
       NULL::text, {local_columns}
  FROM ins"
        );
        // `append_fast` for a caller's transaction, inside `append_in_events` and
        // `append_in_any`, which run it only while the transaction has no id yet and
        // none of the ids is stored: the slot is then empty, the id taken by the insert
        // is above every feed floor published before it and newer than the head's
        // writer, and no event can be a repeat. It returns the columns of `append`
        // (no repeats, no conflict, not behind the floor), and takes the watcher's lock
        // when it inserted.
        let append_first = format!(
            "{}, r AS (
    SELECT count(*) AS c, min(global_position) AS lo, max(global_position) AS hi FROM ins
)
SELECT r.c, r.lo, r.hi, (SELECT v FROM head), cardinality($2)::bigint,
       NULL::text[], NULL::bigint[], NULL::bigint[], NULL::bigint[], NULL::boolean,
       false, false,
       (SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared({WATCH_LOCK_CLASS},
               ((r.lo >> {bits}) % 2147483648)::int)
            WHERE $8::text IS NOT NULL AND r.c > 0) n)
  FROM r",
            lean_insert("global_position")
        );
        // The same for one event, with plain parameters instead of arrays to unnest, in
        // two forms. For any expected version, through `head`, which is a row even when
        // the stream does not exist. For `ExpectedVersion::Exact`, which needs the head to
        // exist: the head's index probe joined as it is, checked on its version and
        // event type, for about 12,000 fewer server instructions per call (5.2 %: the
        // outer join's nodes, and the `CASE`s that map a tombstone and pick the check;
        // callgrind, see BENCHMARKS.md). It still reads `$6`, so that it cannot insert
        // for another kind of expectation (a `$6 = 3` of its own would cost a plan node
        // that gates the rest, 1,400 instructions more). Neither writes a wrong version:
        // they insert nothing or fail on a unique key, and the full statement decides.
        // Each gives `append_one`, `_notify`, `_notify_events` and `_local`.
        let one_event = |exact: bool| {
            // `head_cte`: the CTE that reads the head, for the first form.
            let (head_cte, from, check, version) = if exact {
                (
                    None,
                    format!(
                        "(SELECT e.stream_version AS v, e.event_type AS t FROM {events} e
          WHERE e.stream_id = $1 ORDER BY e.stream_version DESC LIMIT 1) h"
                    ),
                    format!(
                        "h.v = CASE $6::int WHEN 3 THEN $7::bigint END AND h.t <> '{}'",
                        crate::event::STREAM_TOMBSTONE
                    ),
                    "h.v + 1",
                )
            } else {
                (
                    Some(format!("head AS (\n    {head}\n)")),
                    "head h".to_string(),
                    expected.clone(),
                    "COALESCE(h.v, -1) + 1",
                )
            };
            let one_insert = format!(
                "INSERT INTO {events} (global_position, event_id, stream_id, stream_version, event_type, data, metadata)
SELECT pg_current_xact_id()::text::bigint << {bits}, $2::uuid, $1, {version},
       $3::text, $4::jsonb, $5::jsonb
  FROM {from}
 WHERE {check}
RETURNING global_position, stream_version"
            );
            // `WITH` and the CTEs of a statement built on `one_insert`, `head` first.
            let with = |ctes: &str| match &head_cte {
                Some(head) => format!("WITH {head}, {ctes}"),
                None => format!("WITH {ctes}"),
            };
            let one = match &head_cte {
                Some(head) => format!("WITH {head}\n{one_insert}"),
                None => one_insert.clone(),
            };
            let notify = format!(
                "{}
SELECT global_position, stream_version, {notify_wake} FROM ins",
                with(&format!("ins AS (\n{one_insert}\n)"))
            );
            let with_payload = with(&format!(
                "ins AS (\n{one_insert}, {PAYLOAD_COLUMNS}\n), {prev_final}"
            ));
            let with_events = format!(
                "{with_payload}
SELECT i.global_position, i.stream_version, {}, {local_columns} FROM ins i",
                notify_events(&format!("json_build_array({})", event_json("i")))
            );
            let local = format!(
                "{with_payload}
SELECT i.global_position, i.stream_version, NULL::text, {local_columns} FROM ins i"
            );
            [one, notify, with_events, local]
        };
        let [append_one, append_one_notify, append_one_notify_events, append_one_local] =
            one_event(false);
        let [append_one_exact, append_one_exact_notify, append_one_exact_notify_events, append_one_exact_local] =
            one_event(true);
        // One event, the first write of a caller's transaction, in one statement, run by
        // `append_in_events` and `append_in_any` from schema version 9 (see
        // `append_in_function` in migrate.rs) with their parameters: `$1` stream, `$2` to
        // `$5` one-element arrays (id, type, data, metadata), `$6`/`$7` expected, `$8`
        // channel. While the transaction has no id yet, the CASE takes the stream's lock
        // (in schema version 9's `append_in_any`, and, only when it is free, sent by a
        // `StoreTransaction`; from version 10 `append_in_any` takes it before the
        // statement, see `First::LockedEvent` in migrate.rs) and then the transaction's
        // id, in that order: an append that waited for the lock gets an id newer than
        // the appender it waited for, and the
        // id is above every feed floor published before (as in `append_first`). The
        // statement holds the events table's lock from before it runs, so the
        // transaction took that lock before its id, and it says so as
        // `lock_for_appends` does: when this inserts nothing, the full statement then
        // skips the floor check. The head comes from the statement's snapshot, taken
        // before any wait, so it may be stale; then the insert meets the newer version on
        // the unique key, and `ON CONFLICT DO NOTHING` makes it insert nothing rather
        // than fail, as it does for a repeated event id. Whenever it returns no row (the
        // transaction had an id, a conflict, a repeat, a tombstone, the wrong version),
        // nothing was written and the full statement runs after it and decides with a
        // fresh snapshot. It returns the columns of `append`, and takes the watcher's
        // lock when it inserted and `$8` is set: in a `CASE` from schema version 11, in a
        // subquery in versions 9 and 10 (see `WatchLock`). `RETURNING` runs once per
        // inserted row, and the `CASE` reaches the volatile lock only when `$8` is set.
        let append_in_first = |lock: StreamLock, watch: WatchLock| {
            let key = crate::migrate::stream_lock_key(schema, "$1");
            let lock = match lock {
                StreamLock::None => String::new(),
                StreamLock::Wait => format!(
                    "
                WHEN pg_advisory_xact_lock({key}) IS NULL THEN NULL"
                ),
                StreamLock::Try => format!(
                    "
                WHEN NOT pg_try_advisory_xact_lock({key}) THEN NULL"
                ),
            };
            // `$8` set: one lock taken, `1`; else `0`.
            let watched = match watch {
                WatchLock::Subquery => format!(
                    "(SELECT count(*) FROM (SELECT pg_advisory_xact_lock_shared({WATCH_LOCK_CLASS},
                  ((e.global_position >> {bits}) % 2147483648)::int)
            WHERE $8::text IS NOT NULL) n)"
                ),
                WatchLock::Case => format!(
                    "CASE WHEN $8::text IS NULL THEN 0::bigint
               WHEN pg_advisory_xact_lock_shared({WATCH_LOCK_CLASS},
                    ((e.global_position >> {bits}) % 2147483648)::int) IS NULL THEN 1::bigint
               ELSE 1::bigint END"
                ),
            };
            format!(
                "WITH g AS MATERIALIZED (
    SELECT CASE WHEN pg_current_xact_id_if_assigned() IS NOT NULL THEN NULL{lock}
                WHEN set_config({lock_flag}, 'on', true) IS NULL THEN NULL
                ELSE pg_current_xact_id()::text::bigint END AS x
)
INSERT INTO {events} AS e (global_position, event_id, stream_id, stream_version, event_type, data, metadata)
SELECT g.x << {bits}, $2[1], $1, COALESCE(h.v, -1) + 1, $3[1], $4[1], $5[1]
  FROM g, ({head}) h
 WHERE g.x IS NOT NULL AND {expected}
ON CONFLICT DO NOTHING
RETURNING 1::bigint, e.global_position, e.global_position,
          CASE WHEN e.stream_version > 0 THEN e.stream_version - 1 END, 1::bigint,
          NULL::text[], NULL::bigint[], NULL::bigint[], NULL::bigint[], NULL::boolean,
          false, false,
          {watched}"
            )
        };
        // The first version that reads of stream `$1` return: its metadata's `$tb`
        // (truncate before; a delete sets it past the stream's end).
        let truncated = format!(
            "COALESCE((SELECT (m.metadata->>'$tb')::bigint FROM {s}.stream_metadata m
                        WHERE m.stream_id = $1), 0)"
        );
        statements! {
            schema: schema.to_string(), group: GroupSql::new(schema);
            append,
            append_any,
            append_in: append_in_call("append_in_events"),
            append_in_any: append_in_call("append_in_any"),
            append_in_record: append_in_record_call("append_in_events_record"),
            append_in_any_record: append_in_record_call("append_in_any_record"),
            append_in_notify: append_in_notify_call("append_in_events"),
            append_in_any_notify: append_in_notify_call("append_in_any"),
            append_in_notify_events: append_in_call("append_in_notify"),
            append_in_first: append_in_first(StreamLock::None, WatchLock::Case),
            append_in_first_any: append_in_first(StreamLock::Wait, WatchLock::Subquery),
            append_in_first_v9: append_in_first(StreamLock::None, WatchLock::Subquery),
            append_in_first_try: append_in_first(StreamLock::Try, WatchLock::Case),
            append_fast,
            append_fast_notify,
            append_fast_notify_events,
            append_first,
            append_one,
            append_one_notify,
            append_one_notify_events,
            append_fast_local,
            append_one_local,
            append_one_exact,
            append_one_exact_notify,
            append_one_exact_notify_events,
            append_one_exact_local,
            stream_head: format!("SELECT v FROM ({head}) h"),
            read_stream_forwards: format!(
                "SELECT {COLUMNS} FROM {events}
                  WHERE stream_id = $1 AND stream_version >= GREATEST($2, {truncated})
                  ORDER BY stream_version LIMIT $3"
            ),
            read_stream_forwards_markers: format!(
                "SELECT {COLUMNS} FROM {events}
                  WHERE stream_id = $1 AND stream_version >= $2
                    AND (stream_version >= {truncated}
                         OR event_type IN ('{deleted}', '{tombstone}'))
                  ORDER BY stream_version LIMIT $3",
                deleted = crate::event::STREAM_DELETED,
                tombstone = crate::event::STREAM_TOMBSTONE
            ),
            read_stream_backwards: format!(
                "SELECT {COLUMNS} FROM {events}
                  WHERE stream_id = $1 AND stream_version <= $2
                    AND stream_version >= {truncated}
                  ORDER BY stream_version DESC LIMIT $3"
            ),
            read_all_forwards: read_all("", &all_forwards(), false, false),
            read_all_lean: read_all_lean(false),
            read_all_lean_filtered: read_all_lean(true),
            read_all_backwards: read_all("DESC", ALL_BACKWARDS, false, false),
            read_all_forwards_others: read_all("", &all_forwards(), true, false),
            read_all_backwards_others: read_all("DESC", ALL_BACKWARDS, true, false),
            read_all_forwards_filtered: read_all("", &all_forwards(), false, true),
            read_all_backwards_filtered: read_all("DESC", ALL_BACKWARDS, false, true),
            read_all_forwards_others_filtered: read_all("", &all_forwards(), true, true),
            read_all_backwards_others_filtered: read_all("DESC", ALL_BACKWARDS, true, true),
            read_all_page_forwards: read_all_page(true, false),
            read_all_page_backwards: read_all_page(false, false),
            read_all_page_forwards_filtered: read_all_page(true, true),
            read_all_page_backwards_filtered: read_all_page(false, true),
            head_position: format!(
                "SELECT (SELECT max(e.global_position) FROM {events} e
                          WHERE e.global_position < g.horizon), g.horizon
                   FROM (SELECT GREATEST((SELECT horizon FROM {horizon}), $1::bigint)
                                AS horizon) g"
            ),
            // The horizon, the newest committed event, the head below the horizon, and
            // who holds the feed back.
            feed_status: format!(
                "SELECT g.horizon, f.tip, f.blocker_pid, f.blocker_xid,
                        (SELECT max(e.global_position) FROM {events} e
                          WHERE e.global_position < g.horizon) AS head,
                        a.application_name,
                        extract(epoch FROM clock_timestamp() - a.xact_start)::float8
                   FROM {horizon} f
                   CROSS JOIN LATERAL (SELECT GREATEST(f.horizon, $1::bigint) AS horizon) g
                   LEFT JOIN pg_stat_activity a ON a.pid = f.blocker_pid"
            ),
            horizon: format!(
                "SELECT GREATEST(f.horizon, $1::bigint), f.tip, f.blocker_pid, f.blocker_xid
                   FROM {horizon} f"
            ),
            // Where a live subscription starts: everything below the horizon is final;
            // what is above it and visible in the snapshot committed before the call.
            live_start: format!("SELECT pg_current_snapshot()::text, f.horizon FROM {horizon} f"),
            // After a bulk import's COPY (which holds the events table's lock): whether
            // the transaction is below the feed floor (see the `append` statement).
            floor_check: format!(
                "SELECT pg_current_xact_id()::text::bigint < last_value FROM {floor_seq}"
            ),
            lock_for_appends: format!(
                "LOCK TABLE {events} IN ROW EXCLUSIVE MODE;
                 SELECT set_config({lock_flag}, 'on', true)
                  WHERE pg_current_xact_id_if_assigned() IS NULL"
            ),
            // Run after taking the events table's lock: whether this transaction's first
            // append must check the feed floor (it had an id before it took the lock).
            needs_floor_check: format!(
                "SELECT pg_current_xact_id_if_assigned() IS NOT NULL
                        AND {locked_early} IS DISTINCT FROM 'on'"
            ),
            // Stores the snapshot unless the stream no longer reads the events it covers
            // (its `$tb` is above the version after it: a delete, a truncation) or is
            // tombstoned; returns the stream's `$tb` (NULL: none).
            save_snapshot: format!(
                "WITH m AS (
                     SELECT (metadata->>'$tb')::bigint AS tb FROM {s}.stream_metadata
                      WHERE stream_id = $1
                 ), ins AS (
                     INSERT INTO {s}.snapshots AS old (stream_id, version, data)
                     SELECT $1, $2, $3
                      WHERE NOT EXISTS (SELECT 1 FROM m
                                         WHERE m.tb = {TOMBSTONE_HEAD} OR m.tb - 1 > $2::bigint)
                     ON CONFLICT (stream_id) DO UPDATE
                       SET version = excluded.version, data = excluded.data, created_at = now()
                     WHERE old.version <= excluded.version
                 )
                 SELECT (SELECT tb FROM m)"
            ),
            load_snapshot: format!(
                "SELECT version, data, created_at FROM {s}.snapshots WHERE stream_id = $1"
            ),
            load_checkpoint: format!(
                "SELECT position FROM {s}.checkpoints WHERE processor_name = $1"
            ),
            save_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (processor_name, position) VALUES ($1, $2)
                 ON CONFLICT (processor_name) DO UPDATE
                   SET position = excluded.position, updated_at = now()"
            ),
            // Succeeds (returns a row) only for a version above the stored one: the claim
            // that makes a transactional handler run once per event. A successful claim
            // also removes the event's dead letter (`$4` its id), if an earlier attempt
            // parked it: committed with the handler's effects, so that a replay does not
            // apply them again.
            claim_stream_version: format!(
                "WITH claim AS (
                     INSERT INTO {s}.stream_checkpoints AS old (processor_name, stream_id, version)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (processor_name, stream_id) DO UPDATE
                       SET version = excluded.version, updated_at = now()
                     WHERE old.version < excluded.version
                     RETURNING 1
                 ), parked AS (
                     DELETE FROM {s}.dead_letters
                      WHERE processor_name = $1 AND event_id = $4::uuid
                        AND EXISTS (SELECT 1 FROM claim)
                 )
                 SELECT 1 FROM claim"
            ),
            park: format!(
                "INSERT INTO {s}.dead_letters
                   (processor_name, event_id, stream_id, stream_version, global_position,
                    attempts, error)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (processor_name, event_id) DO UPDATE
                   SET attempts = excluded.attempts, error = excluded.error, parked_at = now()"
            ),
            // A filtered worker's look past the events its filter left out: the last of
            // the next `$4` events below the horizon, and whether any of them matches
            // (`$2` the category, `$3` the event types, `$5` the streams).
            scan_past: format!(
                "SELECT count(*), max(p), COALESCE(bool_or(m), false) FROM (
                     SELECT global_position AS p, {} AS m
                       FROM {events}
                      WHERE global_position > $1 AND {below}
                      ORDER BY global_position LIMIT $4) s",
                filters_match("$2", "$3", "$5"),
                below = below_horizon(&format!("(SELECT horizon FROM {horizon})")),
            ),
            // Every processor with a checkpoint, per-stream claims or dead letters; the
            // lag counts the events after its checkpoint that `$all` readers can see;
            // it runs while a session holds its advisory lock ($1: the lock class).
            list_processors: format!(
                "WITH names AS (
                     SELECT processor_name FROM {s}.checkpoints
                     UNION SELECT DISTINCT processor_name FROM {s}.stream_checkpoints
                     UNION SELECT DISTINCT processor_name FROM {s}.dead_letters)
                 SELECT n.processor_name, c.position, c.updated_at,
                        (SELECT count(*) FROM {events} e
                          WHERE e.global_position > COALESCE(c.position, -1)
                            AND e.global_position < GREATEST((SELECT horizon FROM {horizon}),
                                                             $3::bigint)) AS lag,
                        (SELECT count(*) FROM {s}.stream_checkpoints sc
                          WHERE sc.processor_name = n.processor_name) AS claims,
                        (SELECT count(*) FROM {s}.dead_letters d
                          WHERE d.processor_name = n.processor_name) AS dead_letters,
                        EXISTS (SELECT 1 FROM pg_locks l
                                 WHERE l.locktype = 'advisory' AND l.granted
                                   AND l.database = (SELECT oid FROM pg_database
                                                      WHERE datname = current_database())
                                   AND l.classid = $1::int::oid AND l.objsubid = 2
                                   AND l.objid = hashtext($2 || n.processor_name)::oid) AS running
                   FROM names n LEFT JOIN {s}.checkpoints c USING (processor_name)
                  ORDER BY n.processor_name"
            ),
            delete_checkpoint: format!(
                "DELETE FROM {s}.checkpoints WHERE processor_name = $1 RETURNING position"
            ),
            checkpoint_for_move: format!(
                "SELECT (SELECT position FROM {s}.checkpoints WHERE processor_name = $1
                           FOR UPDATE),
                        EXISTS (SELECT 1 FROM {s}.group_leases WHERE group_name = $1)
                        OR EXISTS (SELECT 1 FROM {s}.group_checkpoints WHERE group_name = $1)"
            ),
            delete_stream_claims: format!(
                "DELETE FROM {s}.stream_checkpoints WHERE processor_name = $1"
            ),
            list_dead_letters: format!(
                "SELECT d.event_id, d.stream_id, d.stream_version, d.global_position,
                        e.event_type, d.attempts, d.error, d.parked_at
                   FROM {s}.dead_letters d LEFT JOIN {events} e USING (global_position)
                  WHERE d.processor_name = $1
                  ORDER BY d.global_position"
            ),
            delete_dead_letter: format!(
                "DELETE FROM {s}.dead_letters WHERE processor_name = $1 AND event_id = $2"
            ),
            delete_dead_letters: format!("DELETE FROM {s}.dead_letters WHERE processor_name = $1"),
            // Whether a plain handler's worker must remove the dead letters of the events
            // it handles (see `ThreadContext::forget_dead_letter`).
            has_dead_letters: format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.dead_letters WHERE processor_name = $1)"
            ),
            // Inside a replay's transaction: removes the dead letter and keeps its row
            // locked until the handler's effects commit with the removal.
            take_dead_letter: format!(
                "DELETE FROM {s}.dead_letters WHERE processor_name = $1 AND event_id = $2
                 RETURNING 1"
            ),
            // After `import_in`: the watcher's lock on this transaction (see `append`),
            // and the transaction's id for the watcher.
            watch_in: format!(
                "SELECT x, pg_advisory_xact_lock_shared({WATCH_LOCK_CLASS},
                                                    (x % 2147483648)::int)::text
                   FROM (SELECT pg_current_xact_id()::text::bigint AS x) t"
            ),
            // A bulk import's first statement: the events table's write lock (then
            // `needs_floor_check`).
            lock_events: format!("LOCK TABLE {events} IN ROW EXCLUSIVE MODE"),
            // The import's slot: its start (`xid << POSITION_BITS`), the first free
            // position in it, and the transaction's time.
            import_slot: format!(
                "WITH r AS (SELECT pg_current_xact_id()::text::bigint << {bits} AS lo)
                 SELECT r.lo, {}, now() FROM r",
                slot_next(&events, "r.lo")
            ),
            // Continuing streams: their locks, sorted so that two imports take their
            // common streams in one order (the same lock as `import_in` had).
            import_lock_streams: "SELECT count(pg_advisory_xact_lock(hashtext($1), hashtext(s)))
                 FROM unnest($2::text[]) AS s"
                .to_string(),
            // The head (version, position) of each of the streams `$1` that exists.
            import_heads: format!(
                "SELECT s.name, h.v, h.hp FROM unnest($1::text[]) AS s(name),
                        LATERAL ({}) AS h",
                stream_head_lookup(&events, "s.name")
            ),
            // Of the streams `$1` that an import's transaction (slot `$2`) started at
            // version 0 without looking them up, the first that has a metadata row and
            // an event of another transaction, with its head (`TOMBSTONE_HEAD` for a
            // tombstone): one that lost its version 0 to a delete, truncation or
            // retention.
            import_fresh_heads: format!(
                "SELECT s.name, h.v FROM unnest($1::text[]) AS s(name)
                   JOIN {s}.stream_metadata m ON m.stream_id = s.name
                  CROSS JOIN LATERAL (
                        SELECT CASE WHEN e.event_type = '{tombstone}' THEN {TOMBSTONE_HEAD}
                                    ELSE e.stream_version END AS v
                          FROM {events} e
                         WHERE e.stream_id = s.name
                           AND (e.global_position < $2 OR e.global_position >= $2 + {max})
                         ORDER BY e.stream_version DESC LIMIT 1) h
                  LIMIT 1",
                tombstone = crate::event::STREAM_TOMBSTONE
            ),
            // An import of an export: raises the `$tb` of the streams `$1` to `$2`
            // (never lowers it), keeping their other metadata keys.
            import_truncate_before: format!(
                "INSERT INTO {s}.stream_metadata AS old (stream_id, version, metadata)
                 SELECT t.s, 0, jsonb_build_object('$tb', t.tb)
                   FROM unnest($1::text[], $2::bigint[]) AS t(s, tb)
                 ON CONFLICT (stream_id) DO UPDATE
                   SET version = old.version + 1, updated_at = now(),
                       metadata = old.metadata || jsonb_build_object('$tb',
                           GREATEST((old.metadata->>'$tb')::bigint,
                                    (excluded.metadata->>'$tb')::bigint))"
            ),
            import_copy: format!(
                "COPY {events} (global_position, event_id, stream_id, stream_version, \
                 event_type, data, metadata, recorded_at) FROM STDIN (FORMAT binary)"
            ),
            // Events and streams per category (the stream id up to its first `-`).
            stats_categories: format!(
                "SELECT CASE WHEN strpos(stream_id, '-') > 0
                             THEN left(stream_id, strpos(stream_id, '-')) END AS category,
                        count(DISTINCT stream_id), count(*)
                   FROM {events} GROUP BY 1 ORDER BY 1 NULLS LAST"
            ),
            count_from: format!("SELECT count(*) FROM {events} WHERE global_position >= $1"),
            // How many events a `$all` read with these bounds and filters returns now
            // (`$3` the category, `$4` the event types, `$7` the streams).
            count_matching: format!(
                "SELECT count(*) FROM (
                     SELECT 1 FROM {events}
                      WHERE global_position > $1
                        AND global_position < LEAST($2, GREATEST((SELECT horizon FROM {horizon}),
                                                                 $6::bigint))
                        AND {}
                      LIMIT $5) AS matching",
                filters_match("$3", "$4", "$7")
            ),
            event_at: format!("SELECT {COLUMNS} FROM {events} WHERE global_position = $1"),
            // A group of a transactional worker's events: lock the claims of its
            // streams, then move them (update the rows that existed and were locked,
            // insert the others: a concurrent insert fails on the primary key), and
            // remove the dead letters of the events handled (`$5`), if earlier attempts
            // parked them.
            read_claims: format!(
                "SELECT stream_id, version FROM {s}.stream_checkpoints
                  WHERE processor_name = $1 AND stream_id = ANY($2::text[])
                  ORDER BY stream_id FOR UPDATE"
            ),
            write_claims: format!(
                "WITH t AS (
                     SELECT * FROM unnest($2::text[], $3::bigint[], $4::bool[]) AS t(s, v, existed)
                 ), upd AS (
                     UPDATE {s}.stream_checkpoints c SET version = t.v, updated_at = now()
                       FROM t
                      WHERE t.existed AND c.processor_name = $1 AND c.stream_id = t.s
                     RETURNING 1
                 ), ins AS (
                     INSERT INTO {s}.stream_checkpoints (processor_name, stream_id, version)
                     SELECT $1, t.s, t.v FROM t WHERE NOT t.existed
                     RETURNING 1
                 ), parked AS (
                     DELETE FROM {s}.dead_letters
                      WHERE processor_name = $1 AND event_id = ANY($5::uuid[])
                 )
                 SELECT (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)"
            ),
            // Writes a stream's metadata (`$2`) if its own version is what `$3` (the kind
            // of `ExpectedVersion::to_params`) and `$4` expect: a new row at version 0
            // for "any" and "no stream", the next version for "any", "exists" and a
            // matching exact version, checked on the locked row. No row back: the
            // expectation failed.
            set_stream_metadata: format!(
                "INSERT INTO {s}.stream_metadata AS old (stream_id, version, metadata)
                 SELECT $1, 0, $2 WHERE $3::int IN (0, 1)
                    OR EXISTS (SELECT 1 FROM {s}.stream_metadata m WHERE m.stream_id = $1)
                 ON CONFLICT (stream_id) DO UPDATE
                   SET version = old.version + 1, metadata = excluded.metadata,
                       updated_at = now()
                 WHERE ($3::int IN (0, 2) OR ($3::int = 3 AND old.version = $4::bigint))
                   -- Checked on the newest row, which the update locks: a tombstone
                   -- that committed after the caller's check still wins.
                   AND (old.metadata->>'$tb') IS DISTINCT FROM '{TOMBSTONE_HEAD}'
                 RETURNING version"
            ),
            stream_metadata: format!(
                "SELECT version, metadata, updated_at FROM {s}.stream_metadata
                  WHERE stream_id = $1"
            ),
            // Deletes stream `$1` in one statement (so atomically, and in its own fresh
            // transaction like `append_fast`): appends the marker `$3` (id `$2`, data
            // `$4`, metadata `$5`) after the head, if the head is what `$6`/`$7` expect
            // (a racing append at the same version fails on the unique constraint: one
            // wins), moves the stream's `$tb` past it (to the end of versions for a
            // tombstone) and drops its snapshot. Without a stream, only a tombstone is
            // written. Returns the head and the marker's version (NULL: refused).
            delete_stream: format!(
                "WITH head AS (
    {head}
), ins AS (
    INSERT INTO {events} (global_position, event_id, stream_id, stream_version, event_type, data, metadata)
    SELECT pg_current_xact_id()::text::bigint << {bits}, $2::uuid, $1, COALESCE(h.v, -1) + 1,
           $3::text, $4::jsonb, $5::jsonb
      FROM head h
     WHERE {expected} AND (h.v IS NOT NULL OR $3::text = '{tombstone}')
    RETURNING stream_version
), meta AS (
    INSERT INTO {s}.stream_metadata AS old (stream_id, version, metadata)
    SELECT $1, 0, jsonb_build_object('$tb', CASE WHEN $3::text = '{tombstone}'
                                                 THEN {TOMBSTONE_HEAD}
                                                 ELSE i.stream_version + 1 END)
      FROM ins i
    ON CONFLICT (stream_id) DO UPDATE
       SET version = old.version + 1, metadata = old.metadata || excluded.metadata,
           updated_at = now()
    RETURNING 1
), snap AS (
    DELETE FROM {s}.snapshots WHERE stream_id = $1 AND EXISTS (SELECT 1 FROM ins)
    RETURNING 1
)
SELECT (SELECT v FROM head), (SELECT stream_version FROM ins),
       (SELECT count(*) FROM meta), (SELECT count(*) FROM snap)",
                tombstone = crate::event::STREAM_TOMBSTONE,
            ),
            // Physically removes up to `$3` events of stream `$1` below version `$2`,
            // never its last event (which carries the version that appends continue
            // from), oldest first; in its own short transaction, with the flag the
            // immutability trigger checks (the scalar subquery runs once, before the
            // first row is deleted). Returns how many it removed.
            remove_events: format!(
                "DELETE FROM {events} e
                  WHERE (SELECT set_config('{setting}', 'on', true)) = 'on'
                    AND e.global_position IN (
                        SELECT d.global_position FROM {events} d
                         WHERE d.stream_id = $1 AND d.stream_version < $2::bigint
                           AND d.stream_version < (SELECT max(m.stream_version) FROM {events} m
                                                    WHERE m.stream_id = $1)
                         ORDER BY d.stream_version LIMIT $3)",
                setting = LIFECYCLE_SETTING,
            ),
            // The scavenger's look at up to `$2` streams with metadata after stream id
            // `$1`: each one's first and last version, and the version below which its
            // `$tb`, `$maxCount` and `$maxAge` allow removal.
            scavenge_page: format!(
                "SELECT m.stream_id, h.lo, h.hi,
                        GREATEST(
                            COALESCE((m.metadata->>'$tb')::bigint, 0),
                            COALESCE(h.hi + 1 - (m.metadata->>'$maxCount')::bigint, 0),
                            CASE WHEN m.metadata ? '$maxAge' THEN COALESCE(
                                (SELECT min(e.stream_version) FROM {events} e
                                  WHERE e.stream_id = m.stream_id
                                    AND e.recorded_at >= now() - make_interval(
                                        secs => (m.metadata->>'$maxAge')::float8)),
                                h.hi + 1) ELSE 0 END) AS cut
                   FROM {s}.stream_metadata m
                  CROSS JOIN LATERAL (
                        SELECT min(e.stream_version) AS lo, max(e.stream_version) AS hi
                          FROM {events} e WHERE e.stream_id = m.stream_id) h
                  WHERE m.stream_id > $1 AND h.hi IS NOT NULL
                  ORDER BY m.stream_id LIMIT $2"
            ),
            // Raises stream `$1`'s `$tb` to `$2` (never lowers it), keeping its other
            // metadata; returns the `$tb` now in force.
            set_truncate_before: format!(
                "INSERT INTO {s}.stream_metadata AS old (stream_id, version, metadata)
                 VALUES ($1, 0, jsonb_build_object('$tb', $2::bigint))
                 ON CONFLICT (stream_id) DO UPDATE
                   SET version = old.version + 1,
                       metadata = old.metadata || jsonb_build_object('$tb', GREATEST(
                           $2::bigint, COALESCE((old.metadata->>'$tb')::bigint, 0))),
                       updated_at = now()
                 RETURNING (metadata->>'$tb')::bigint"
            ),
            delete_snapshot: format!(
                "DELETE FROM {s}.snapshots WHERE stream_id = $1"
            ),
        }
    }
}

/// The partition (0 to `count` - 1) of the stream id `stream` in a consumer group: the
/// first 32 bits of its MD5, modulo `count`. MD5 is defined once and for all, unlike
/// PostgreSQL's internal `hashtext`, so a stream keeps its partition across upgrades and
/// platforms; the per-partition checkpoints depend on it.
fn partition_of(stream: &str, count: &str) -> String {
    format!("((('x' || substr(md5({stream}), 1, 8))::bit(32)::bigint % ({count})::bigint)::int)")
}

/// The statements of consumer groups (`group.rs`; `processor.rs` for the admin lists),
/// named `group_<field>`.
#[derive(Debug)]
pub(crate) struct GroupSql {
    pub(crate) create_partitions: Statement,
    pub(crate) count_partitions: Statement,
    pub(crate) join: Statement,
    pub(crate) heartbeat: Statement,
    pub(crate) live_members: Statement,
    pub(crate) my_leases: Statement,
    pub(crate) acquire: Statement,
    pub(crate) save_checkpoints: Statement,
    pub(crate) release: Statement,
    pub(crate) leave: Statement,
    pub(crate) fence: Statement,
    pub(crate) read: Statement,
    pub(crate) list_members: Statement,
    pub(crate) list_partitions: Statement,
    pub(crate) list_groups: Statement,
    pub(crate) reset: Statement,
}

impl GroupSql {
    fn new(schema: &str) -> GroupSql {
        let t = GroupText::new(schema);
        GroupSql {
            create_partitions: Statement {
                name: concat!("group_", stringify!(create_partitions)),
                text: t.create_partitions,
            },
            count_partitions: Statement {
                name: concat!("group_", stringify!(count_partitions)),
                text: t.count_partitions,
            },
            join: Statement {
                name: concat!("group_", stringify!(join)),
                text: t.join,
            },
            heartbeat: Statement {
                name: concat!("group_", stringify!(heartbeat)),
                text: t.heartbeat,
            },
            live_members: Statement {
                name: concat!("group_", stringify!(live_members)),
                text: t.live_members,
            },
            my_leases: Statement {
                name: concat!("group_", stringify!(my_leases)),
                text: t.my_leases,
            },
            acquire: Statement {
                name: concat!("group_", stringify!(acquire)),
                text: t.acquire,
            },
            save_checkpoints: Statement {
                name: concat!("group_", stringify!(save_checkpoints)),
                text: t.save_checkpoints,
            },
            release: Statement {
                name: concat!("group_", stringify!(release)),
                text: t.release,
            },
            leave: Statement {
                name: concat!("group_", stringify!(leave)),
                text: t.leave,
            },
            fence: Statement {
                name: concat!("group_", stringify!(fence)),
                text: t.fence,
            },
            read: Statement {
                name: concat!("group_", stringify!(read)),
                text: t.read,
            },
            list_members: Statement {
                name: concat!("group_", stringify!(list_members)),
                text: t.list_members,
            },
            list_partitions: Statement {
                name: concat!("group_", stringify!(list_partitions)),
                text: t.list_partitions,
            },
            list_groups: Statement {
                name: concat!("group_", stringify!(list_groups)),
                text: t.list_groups,
            },
            reset: Statement {
                name: concat!("group_", stringify!(reset)),
                text: t.reset,
            },
        }
    }
}

/// The texts of the consumer groups' statements, before they are named.
#[derive(Debug)]
struct GroupText {
    create_partitions: String,
    count_partitions: String,
    join: String,
    heartbeat: String,
    live_members: String,
    my_leases: String,
    acquire: String,
    save_checkpoints: String,
    release: String,
    leave: String,
    fence: String,
    read: String,
    list_members: String,
    list_partitions: String,
    list_groups: String,
    reset: String,
}

impl GroupText {
    fn new(schema: &str) -> GroupText {
        let s = quote(schema);
        let events = format!("{s}.events");
        let horizon = format!("{s}.feed_horizon(pg_current_snapshot())");
        let members = format!("{s}.group_members");
        let leases = format!("{s}.group_leases");
        let checkpoints = format!("{s}.group_checkpoints");
        let ms = "::bigint * interval '1 millisecond'";
        GroupText {
            // Only for a group that has no partitions yet (under the join's lock), so
            // that members configured with another count cannot add rows to it.
            create_partitions: format!(
                "INSERT INTO {leases} (group_name, partition)
                 SELECT $1, p FROM generate_series(0, $2::int - 1) p
                  WHERE NOT EXISTS (SELECT 1 FROM {leases} WHERE group_name = $1)"
            ),
            count_partitions: format!("SELECT count(*) FROM {leases} WHERE group_name = $1"),
            join: format!(
                "INSERT INTO {members} (group_name, member_id, info, expires_at)
                 VALUES ($1, $2, $3, clock_timestamp() + $4{ms})
                 ON CONFLICT DO NOTHING"
            ),
            // The database's clock decides when a member expires, never the members'.
            heartbeat: format!(
                "UPDATE {members} SET heartbeat_at = clock_timestamp(),
                        expires_at = clock_timestamp() + $3{ms}
                  WHERE group_name = $1 AND member_id = $2
                 RETURNING 1"
            ),
            // Removes the members whose heartbeats stopped (a renewal that commits first
            // wins: the DELETE re-checks the row it waited for), then lists the others in
            // the order that decides who gets the odd partitions.
            live_members: format!(
                "WITH reaped AS (
                     DELETE FROM {members} WHERE group_name = $1 AND expires_at < clock_timestamp()
                     RETURNING member_id)
                 SELECT m.member_id FROM {members} m
                  WHERE m.group_name = $1 AND m.expires_at >= clock_timestamp()
                    AND m.member_id NOT IN (SELECT member_id FROM reaped)
                  ORDER BY m.joined_at, m.member_id"
            ),
            my_leases: format!(
                "SELECT partition, epoch FROM {leases} WHERE group_name = $1 AND owner = $2"
            ),
            // Takes up to $3 partitions that nobody holds: no owner, or an owner that is
            // no longer a member (removed after its heartbeats stopped; member ids are
            // never reused). Rows locked by a former owner's transaction that is still
            // open (a fenced handler transaction) are skipped until it ends.
            acquire: format!(
                "WITH free AS (
                     SELECT l.partition FROM {leases} l
                      WHERE l.group_name = $1
                        AND (l.owner IS NULL OR NOT EXISTS (
                             SELECT 1 FROM {members} m
                              WHERE m.group_name = $1 AND m.member_id = l.owner))
                      ORDER BY l.partition LIMIT $3
                      FOR UPDATE SKIP LOCKED
                 ), took AS (
                     UPDATE {leases} l SET owner = $2, epoch = l.epoch + 1, acquired_at = now()
                       FROM free
                      WHERE l.group_name = $1 AND l.partition = free.partition
                        AND EXISTS (SELECT 1 FROM {members} m
                                     WHERE m.group_name = $1 AND m.member_id = $2)
                     RETURNING l.partition, l.epoch
                 )
                 SELECT t.partition, t.epoch, c.position FROM took t
                   LEFT JOIN {checkpoints} c ON c.group_name = $1 AND c.partition = t.partition
                  ORDER BY t.partition"
            ),
            // Fenced: only the partitions this member still holds with these epochs,
            // their lease rows share-locked so that no takeover commits in between.
            save_checkpoints: format!(
                "WITH held AS (
                     SELECT l.partition, t.pos FROM {leases} l
                       JOIN unnest($3::int[], $4::bigint[], $5::bigint[]) AS t(p, e, pos)
                         ON l.partition = t.p AND l.epoch = t.e
                      WHERE l.group_name = $1 AND l.owner = $2
                      ORDER BY l.partition FOR SHARE OF l)
                 INSERT INTO {checkpoints} AS c (group_name, partition, position)
                 SELECT $1, partition, pos FROM held
                 ON CONFLICT (group_name, partition) DO UPDATE
                   SET position = excluded.position, updated_at = now()
                 RETURNING c.partition"
            ),
            release: format!(
                "UPDATE {leases} l SET owner = NULL
                   FROM unnest($3::int[], $4::bigint[]) AS t(p, e)
                  WHERE l.group_name = $1 AND l.owner = $2 AND l.partition = t.p
                    AND l.epoch = t.e
                 RETURNING l.partition"
            ),
            leave: format!(
                "WITH gone AS (
                     DELETE FROM {members} WHERE group_name = $1 AND member_id = $2)
                 UPDATE {leases} SET owner = NULL WHERE group_name = $1 AND owner = $2"
            ),
            // Inside a transactional handler's transaction: locks the lease rows of its
            // events' partitions (in partition order) and returns those still held with
            // these epochs, with the epoch. A takeover waits for this transaction; a
            // transaction that comes after a takeover finds the new epoch and handles
            // nothing.
            fence: format!(
                "SELECT l.partition, l.epoch FROM {leases} l
                   JOIN unnest($2::int[], $3::bigint[]) AS t(p, e)
                     ON l.partition = t.p AND l.epoch = t.e
                  WHERE l.group_name = $1 AND l.owner = $4
                  ORDER BY l.partition FOR SHARE OF l"
            ),
            // A page of the events of some partitions below the `$all` horizon, with each
            // event's partition, and the horizon and tip on every row (one row of NULL
            // events when the page is empty).
            read: format!(
                "WITH h AS MATERIALIZED (SELECT f.horizon, f.tip FROM {horizon} f),
                 page AS (
                     SELECT {COLUMNS}, {part} AS partition FROM {events}
                      WHERE global_position > $1 AND {below}
                        AND {part} = ANY($2::int[])
                        AND {filters}
                      ORDER BY global_position LIMIT $6)
                 SELECT page.*, h.horizon, h.tip FROM h LEFT JOIN page ON true
                  ORDER BY page.global_position",
                part = partition_of("stream_id", "$3"),
                filters = filters_match("$4", "$5", "$7"),
                below = below_horizon("(SELECT horizon FROM h)")
            ),
            list_members: format!(
                "SELECT m.member_id, m.info, m.joined_at, m.heartbeat_at,
                        extract(epoch FROM m.expires_at - clock_timestamp())::float8,
                        ARRAY(SELECT l.partition FROM {leases} l
                               WHERE l.group_name = m.group_name AND l.owner = m.member_id
                               ORDER BY l.partition)
                   FROM {members} m WHERE m.group_name = $1
                  ORDER BY m.joined_at, m.member_id"
            ),
            // Each partition's lease and checkpoint, and the events after its checkpoint
            // that `$all` readers can see (one scan from the lowest checkpoint).
            list_partitions: format!(
                "WITH h AS MATERIALIZED (SELECT horizon FROM {horizon}),
                 g AS MATERIALIZED (
                     SELECT count(*) AS n, min(COALESCE(c.position, -1)) AS lo
                       FROM {leases} l LEFT JOIN {checkpoints} c USING (group_name, partition)
                      WHERE l.group_name = $1),
                 lag AS (
                     SELECT p.partition, count(*) AS n FROM (
                         SELECT {part} AS partition, e.global_position
                           FROM {events} e, g
                          WHERE e.global_position > g.lo
                            AND e.global_position < (SELECT horizon FROM h)) p
                       LEFT JOIN {checkpoints} c ON c.group_name = $1 AND c.partition = p.partition
                      WHERE p.global_position > COALESCE(c.position, -1)
                      GROUP BY p.partition)
                 SELECT l.partition, l.owner, l.epoch, l.acquired_at,
                        m.member_id IS NOT NULL AND m.expires_at >= clock_timestamp(),
                        c.position, c.updated_at, COALESCE(lag.n, 0)
                   FROM {leases} l
                   LEFT JOIN {checkpoints} c USING (group_name, partition)
                   LEFT JOIN {members} m ON m.group_name = l.group_name AND m.member_id = l.owner
                   LEFT JOIN lag ON lag.partition = l.partition
                  WHERE l.group_name = $1
                  ORDER BY l.partition",
                part = partition_of("e.stream_id", "(SELECT n FROM g)")
            ),
            // Every group: partitions, the lowest checkpoint (NULL while a partition has
            // none), the last checkpoint write, the events after each partition's
            // checkpoint that `$all` readers can see, and the live members.
            list_groups: format!(
                "WITH h AS MATERIALIZED (SELECT horizon FROM {horizon}),
                 g AS (
                     SELECT l.group_name, count(*) AS n, min(COALESCE(c.position, -1)) AS lo,
                            bool_and(c.position IS NOT NULL) AS all_set,
                            max(c.updated_at) AS updated_at
                       FROM {leases} l LEFT JOIN {checkpoints} c USING (group_name, partition)
                      GROUP BY l.group_name)
                 SELECT g.group_name, g.n, CASE WHEN g.all_set THEN g.lo END, g.updated_at,
                        (SELECT count(*) FROM {events} e
                           LEFT JOIN {checkpoints} c
                             ON c.group_name = g.group_name AND c.partition = {part}
                          WHERE e.global_position > g.lo
                            AND e.global_position < (SELECT horizon FROM h)
                            AND e.global_position > COALESCE(c.position, -1)),
                        (SELECT count(*) FROM {members} m
                          WHERE m.group_name = g.group_name
                            AND m.expires_at >= clock_timestamp())
                   FROM g ORDER BY g.group_name",
                part = partition_of("e.stream_id", "g.n")
            ),
            reset: format!(
                "WITH c AS (DELETE FROM {checkpoints} WHERE group_name = $1 RETURNING 1),
                      l AS (DELETE FROM {leases} WHERE group_name = $1),
                      m AS (DELETE FROM {members} WHERE group_name = $1)
                 SELECT count(*) FROM c"
            ),
        }
    }
}

/// A 64-bit FNV-1a hash of `text`: the fingerprint of SQL that a migration froze.
#[cfg(test)]
pub(crate) fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statements in the functions `append_in_events` and `append_in_any`: the full
    /// statement as schema version 14 replaced it (the repeats' names and versions cast
    /// to their base types), the others as schema versions 9 to 11 left them.
    const APPEND_FINGERPRINT: u64 = 0x5c94_46b1_48f7_7d12;
    const APPEND_FIRST_FINGERPRINT: u64 = 0xcd3e_ac0f_aa8a_465b;
    const APPEND_IN_FIRST_FINGERPRINT: u64 = 0xd72d_ce79_f243_d124;
    const APPEND_IN_FIRST_V9_FINGERPRINT: u64 = 0xf05a_657c_740d_c170;
    const APPEND_IN_FIRST_ANY_FINGERPRINT: u64 = 0xb0ce_d921_8174_1ce6;

    /// `append_in` runs the append statements through functions whose bodies a
    /// migration froze (see `append_in_function` in migrate.rs). If this fails, a
    /// statement changed: add a migration that replaces `append_in_events`,
    /// `append_in_any` and their `_record` twins with the new text, then update the
    /// fingerprints here.
    #[test]
    fn the_append_statements_match_the_functions_that_migrations_created() {
        let sql = Sql::new("eventstore");
        let got = fnv(sql.append.text());
        assert_eq!(got, APPEND_FINGERPRINT, "append: {got:#x}");
        let got = fnv(sql.append_first.text());
        assert_eq!(got, APPEND_FIRST_FINGERPRINT, "append_first: {got:#x}");
        let got = fnv(sql.append_in_first.text());
        assert_eq!(
            got, APPEND_IN_FIRST_FINGERPRINT,
            "append_in_first: {got:#x}"
        );
        let got = fnv(sql.append_in_first_v9.text());
        assert_eq!(
            got, APPEND_IN_FIRST_V9_FINGERPRINT,
            "append_in_first_v9: {got:#x}"
        );
        let got = fnv(sql.append_in_first_any.text());
        assert_eq!(
            got, APPEND_IN_FIRST_ANY_FINGERPRINT,
            "append_in_first_any: {got:#x}"
        );
    }

    #[test]
    fn the_watcher_waits_on_the_class_appenders_lock() {
        let class = WATCH_LOCK_CLASS.to_string();
        assert_eq!(wait_for_transaction().matches(class.as_str()).count(), 2);
        assert!(Sql::new("s").append.text().contains(class.as_str()));
        assert!(Sql::new("s").append_first.text().contains(class.as_str()));
        assert!(Sql::new("s")
            .append_in_first
            .text()
            .contains(class.as_str()));
    }

    #[test]
    fn identifiers() {
        for ok in ["eventstore", "_x", "A1_b", &"a".repeat(63)] {
            check_identifier("schema", ok).unwrap();
        }
        for bad in [
            "",
            "1abc",
            "x; DROP TABLE y",
            "a\"b",
            "a-b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(check_identifier("schema", bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote("ab"), "\"ab\"");
    }
}
