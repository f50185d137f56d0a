//! Schema migrations: written with `barrel`, applied by a versioned runner with a history
//! table and an advisory lock, so that several processes may start at once.

use barrel::backend::Pg;
use barrel::{types, Migration};
use postgres::error::SqlState;
use postgres::GenericClient;

use crate::error::{Error, Result};
use crate::sql::{check_identifier, quote, APPEND_IN_ARGS, LIFECYCLE_SETTING};

/// The newest schema version this library knows.
pub const SCHEMA_VERSION: i64 = 15;

/// The schema version that brought the key of notifications that carry events.
pub(crate) const FEED_KEY_VERSION: i64 = 12;
/// The schema version from which `append_in_notify` exists.
pub(crate) const APPEND_IN_NOTIFY_VERSION: i64 = 13;
/// The schema version from which `append_in_events_record` and `append_in_any_record`
/// exist.
pub(crate) const APPEND_IN_RECORD_VERSION: i64 = 15;

/// The advisory lock class taken (with the hash of the schema name) while migrating.
const LOCK_CLASS: i32 = 0x5045_5331; // "PES1"

struct Step {
    version: i64,
    name: &'static str,
    sql: fn(&str) -> String,
}

const STEPS: &[Step] = &[
    Step {
        version: 1,
        name: "create events",
        sql: m0001_events,
    },
    Step {
        version: 2,
        name: "create snapshots and checkpoints",
        sql: m0002_snapshots_checkpoints,
    },
    Step {
        version: 3,
        name: "create stream checkpoints and dead letters",
        sql: m0003_stream_checkpoints_dead_letters,
    },
    Step {
        version: 4,
        name: "create the feed floor and horizon",
        sql: m0004_feed_horizon,
    },
    Step {
        version: 5,
        name: "create consumer group members, leases and checkpoints",
        sql: m0005_consumer_groups,
    },
    Step {
        version: 6,
        name: "stream lifecycle: immutable events, stream metadata",
        sql: m0006_lifecycle,
    },
    Step {
        version: 7,
        name: "feed horizon: other databases ignored, floor moved only when needed; \
               stream heads under a lock for appends that expect any version",
        sql: m0007_feed_horizon,
    },
    Step {
        version: 8,
        name: "append_in: a lean statement for the first write of a transaction",
        sql: m0008_append_in_first_write,
    },
    Step {
        version: 9,
        name: "append_in: one statement for one event as the first write of a transaction",
        sql: m0009_append_in_first_event,
    },
    Step {
        version: 10,
        name: "append_in with any version: the stream lock before the one-event statement",
        sql: m0010_append_in_lock_first,
    },
    Step {
        version: 11,
        name: "append_in: the watcher's lock without a subplan in the one-event statement",
        sql: m0011_append_in_lean_returning,
    },
    Step {
        version: 12,
        name: "the key of notifications that carry events",
        sql: m0012_feed_key,
    },
    Step {
        version: 13,
        name: "append_in that sends its events in a NOTIFY of the caller's transaction",
        sql: m0013_append_in_notify,
    },
    Step {
        version: 14,
        name: "the checks of stream names and versions as domains",
        sql: m0014_check_domains,
    },
    Step {
        version: 15,
        name: "append_in functions that return one record",
        sql: m0015_append_in_record,
    },
];

fn bigint() -> types::Type {
    types::custom("BIGINT")
}

fn jsonb() -> types::Type {
    types::custom("JSONB")
}

fn timestamptz_now() -> types::Type {
    types::custom("TIMESTAMPTZ").default(barrel::functions::AutogenFunction::CurrentTimestamp)
}

fn finish(m: Migration) -> String {
    let mut sql = m.make::<Pg>();
    if !sql.ends_with(';') {
        sql.push(';');
    }
    sql
}

/// The event log. `global_position` is assigned by the append statement (see the crate
/// docs on the global order); the two unique constraints catch concurrent writers.
fn m0001_events(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    m.create_table("events", |t| {
        t.add_column("global_position", bigint().primary(true));
        t.add_column("event_id", types::uuid().unique(false));
        t.add_column("stream_id", types::text());
        t.add_column("stream_version", bigint());
        t.add_column("event_type", types::text());
        t.add_column("data", jsonb());
        t.add_column("metadata", jsonb().nullable(true));
        t.add_column("recorded_at", timestamptz_now());
        t.add_constraint(
            "events_event_id_key",
            types::unique_constraint(["event_id"]),
        );
        t.add_constraint(
            "events_stream_version_key",
            types::unique_constraint(["stream_id", "stream_version"]),
        );
        t.inject_custom("CONSTRAINT \"events_stream_version_check\" CHECK (stream_version >= 0)");
        t.inject_custom("CONSTRAINT \"events_stream_id_check\" CHECK (stream_id <> '')");
    });
    finish(m)
}

fn m0002_snapshots_checkpoints(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    m.create_table("snapshots", |t| {
        t.add_column("stream_id", types::text().primary(true));
        t.add_column("version", bigint());
        t.add_column("data", jsonb());
        t.add_column("created_at", timestamptz_now());
    });
    m.create_table("checkpoints", |t| {
        t.add_column("processor_name", types::text().primary(true));
        t.add_column("position", bigint());
        t.add_column("updated_at", timestamptz_now());
    });
    finish(m)
}

/// Per-stream progress of transactional workers (exactly-once claims), and events that a
/// worker's handler failed on and parked.
fn m0003_stream_checkpoints_dead_letters(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    m.create_table("stream_checkpoints", |t| {
        t.add_column("processor_name", types::text());
        t.add_column("stream_id", types::text());
        t.add_column("version", bigint());
        t.add_column("updated_at", timestamptz_now());
        t.set_primary_key(&["processor_name", "stream_id"]);
    });
    m.create_table("dead_letters", |t| {
        t.add_column("processor_name", types::text());
        t.add_column("event_id", types::uuid().unique(false));
        t.add_column("stream_id", types::text());
        t.add_column("stream_version", bigint());
        t.add_column("global_position", bigint());
        t.add_column("attempts", types::integer());
        t.add_column("error", types::text());
        t.add_column("parked_at", timestamptz_now());
        t.set_primary_key(&["processor_name", "event_id"]);
    });
    finish(m)
}

/// The `$all` horizon (see "The global order" in the crate docs): a sequence that holds the
/// feed floor, the transaction id below which no transaction may start appending, and the
/// function that readers call to move the floor and find how far they may read.
///
/// The floor lives in a sequence because `setval` is not transactional and a read of
/// `last_value` sees the newest value under every isolation level: an appender that checks
/// it after it has locked the events table sees every floor published before that check.
fn m0004_feed_horizon(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let s = quote(schema);
    m.inject_custom(format!(
        "CREATE SEQUENCE {s}.feed_floor AS bigint MINVALUE 0 START WITH 0"
    ));
    m.inject_custom(feed_horizon_function(schema));
    finish(m)
}

/// The horizon function of version 4 held the feed behind any running statement of this
/// database that had a transaction id, and moved the floor on every new tip; this one
/// ignores other databases' transactions and moves the floor only when a transaction of
/// this database that could still append would be passed (see `feed_horizon_function`).
/// It also returns the snapshot's transactions of other databases. A new schema gets it
/// from version 4 already; this step replaces it in older ones.
fn m0007_feed_horizon(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let s = quote(schema);
    m.inject_custom(format!("DROP FUNCTION {s}.feed_horizon(pg_snapshot)"));
    m.inject_custom(feed_horizon_function(schema));
    m.inject_custom(locked_stream_head_function(schema));
    let sql = crate::sql::Sql::new(schema);
    append_in_functions(&mut m, schema, &sql, First::Nothing, Returns::Table);
    finish(m)
}

/// `append_in_events` and `append_in_any` gain the lean statement (`append_first` in
/// sql.rs) for the first write of a transaction, which is the common case: no slot to
/// search, no feed floor to read, no repeats to collect. 6 writers through `append_in`
/// spent about a sixth more server time per transaction with the full statement alone.
fn m0008_append_in_first_write(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let sql = crate::sql::Sql::new(schema);
    append_in_functions(&mut m, schema, &sql, First::Write, Returns::Table);
    finish(m)
}

/// `append_in_events` and `append_in_any` run one statement for one event as the first
/// write of a transaction (`append_in_first` in sql.rs), before anything else: the
/// stream's lock (with `Any`), the transaction's id and the insert, where version 8 ran
/// three statements (the lock, the check for an id or a repeat, the insert). When that
/// statement writes nothing, the full statement runs after it, as before; a lost race
/// then no longer aborts the caller's transaction.
fn m0009_append_in_first_event(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let sql = crate::sql::Sql::new(schema);
    append_in_functions(&mut m, schema, &sql, First::Event, Returns::Table);
    finish(m)
}

/// `append_in_any` takes the stream's lock before the one-event statement instead of
/// inside it, so that the statement's snapshot is taken after any wait for the lock.
/// In version 9, an append that waited for another transaction on the same stream read
/// the head from before the wait, met the newer version on the unique key, wrote
/// nothing, and ran the full statement after it: 6 % of the calls of 6 writers over
/// 50 streams (pgbench), each costing about two statements' server time.
/// `append_in_events` (no lock) is unchanged; it is replaced with the same body.
fn m0010_append_in_lock_first(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let sql = crate::sql::Sql::new(schema);
    append_in_functions(&mut m, schema, &sql, First::LockedEvent, Returns::Table);
    finish(m)
}

/// The one-event statement of `append_in_events` and `append_in_any` takes the
/// watcher's lock in a `CASE` of its `RETURNING` instead of a subquery, which the server
/// set up and ran as a subplan on every call: 357,000 server instructions per
/// `append_in_any` call in version 10, 337,000 in this one (callgrind, 2,000 calls in a
/// single-user backend; see BENCHMARKS.md). Nothing else changes.
fn m0011_append_in_lean_returning(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let sql = crate::sql::Sql::new(schema);
    append_in_functions(&mut m, schema, &sql, First::LeanEvent, Returns::Table);
    finish(m)
}

/// The key that authenticates the events a pool append's notification carries (see
/// `notify_events` in sql.rs and "Live delivery" in the crate docs): anybody who can
/// connect can send a notification on the store's channel, so a subscription delivers
/// a notification's events only when their MAC checks out with this key. Two random
/// 64-byte keys, the MAC's inner and outer key, from `gen_random_uuid`, which draws on
/// the server's strong random source (122 random bits per UUID, 488 per key). One row.
fn m0012_feed_key(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    // Safe to run again (a test puts a store back to version 7 and upgrades it).
    m.create_table_if_not_exists("feed_key", |t| {
        t.add_column("inner_key", types::binary());
        t.add_column("outer_key", types::binary());
    });
    let s = quote(schema);
    let uuid = "gen_random_uuid()::text";
    let random = format!("decode(replace({uuid} || {uuid} || {uuid} || {uuid}, '-', ''), 'hex')");
    m.inject_custom(format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS feed_key_one ON {s}.feed_key ((true))"
    ));
    m.inject_custom(format!(
        "INSERT INTO {s}.feed_key (inner_key, outer_key) VALUES ({random}, {random})
    ON CONFLICT DO NOTHING"
    ));
    finish(m)
}

/// `append_in_notify`: `append_in_any` (with `$6` = 0, `ExpectedVersion::Any`) or
/// `append_in_events`, not asked to take the watcher's lock, and, when it inserted, a
/// `NOTIFY` on channel `$8` that carries the events as a pool append's does (see
/// `notify_events` in sql.rs and `listener::Batch`), sent as the caller's transaction
/// commits. Its payload starts with an empty token, so that the appending process's
/// own listener takes it too. An `append_in` that comes after a quiet moment calls it
/// (see `Hub::plan_append_in`): its subscribers, here and elsewhere, then deliver the
/// events without reading them. In a function, whose plans PostgreSQL keeps for the
/// session: the same statements sent by `append_in` on any client were parsed and
/// planned on every call, 1.3 ms of server time.
///
/// `prev` and the snapshot come from the function's first statement, before the call
/// takes the transaction's id (and, with `Any`, the stream's lock): every transaction
/// with an id below this one's that the snapshot does not see is then checked by
/// `final`, and one that appended to the stream first, and that this append waited
/// for, was running then and makes `final` false. When the transaction had an id
/// already, the snapshot may see newer transactions, which can only make `prev` too new
/// for a subscriber to place the events. A transaction that the snapshot does not see
/// stays unseen until this one commits, so `final` still holds when the notification
/// goes out. The events are rebuilt from the parameters and the call's result, as the
/// functions insert them: positions from `first_position` up and versions after `head`
/// in input order, data and metadata as the `jsonb` stored, and the transaction's start
/// time as `recorded_at`'s default. A test compares this text with a fingerprint: it is
/// frozen at this version.
fn m0013_append_in_notify(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let s = quote(schema);
    let bits = crate::sql::POSITION_BITS;
    let room = crate::sql::NOTIFY_ROOM;
    let call = |function: &str| {
        format!(
            "SELECT * INTO inserted, first_position, last_position, head, tx_events, dup_streams,
                      dup_versions, dup_positions, dup_index, dup_same, order_conflict,
                      behind_floor, watched
          FROM {s}.{function}($1, $2, $3, $4, $5, $6, $7, NULL)"
        )
    };
    m.inject_custom(format!(
        r#"CREATE OR REPLACE FUNCTION {s}.append_in_notify{APPEND_IN_ARGS}
{APPEND_IN_RETURNS}
LANGUAGE plpgsql VOLATILE AS $body$
DECLARE
    snap pg_snapshot;
    prev_position bigint;
    payload text;
BEGIN
    SELECT pg_current_snapshot(),
           (SELECT e.global_position FROM {s}.events e ORDER BY e.global_position DESC LIMIT 1)
      INTO snap, prev_position;
    IF $6 = 0 THEN
        {any};
    ELSE
        {events};
    END IF;
    IF inserted > 0 THEN
        SELECT COALESCE((
            SELECT ' ' || {mac} || ' ' || z.j
              FROM {s}.feed_key k, (
                   SELECT json_build_object('prev', prev_position, 'final', {is_final},
                          'events', (SELECT json_agg({event} ORDER BY i.global_position)
                                       FROM (SELECT first_position + t.n - 1 AS global_position,
                                                    t.event_id, $1 AS stream_id,
                                                    COALESCE(head, -1) + t.n AS stream_version,
                                                    t.event_type, t.data, t.metadata,
                                                    now() AS recorded_at
                                               FROM unnest($2, $3, $4, $5) WITH ORDINALITY
                                                    AS t(event_id, event_type, data, metadata, n)) i)
                          )::text AS j
                     FROM (SELECT first_position >> {bits} AS x) f OFFSET 0) z
             WHERE octet_length(z.j) < {room}), '')
          INTO payload;
        PERFORM pg_notify($8, payload);
    END IF;
    RETURN NEXT;
END
$body$"#,
        any = call("append_in_any"),
        events = call("append_in_events"),
        mac = crate::sql::mac("z.j"),
        is_final = crate::sql::is_final("snap", "f.x"),
        event = crate::sql::event_json("i"),
    ));
    finish(m)
}

/// What `append_in_events` and `append_in_any` run before the full statement.
#[derive(Clone, Copy)]
enum First {
    /// Nothing (versions 4 to 7).
    Nothing,
    /// `append_first` while the transaction has no id and none of the ids is stored
    /// (version 8).
    Write,
    /// `append_in_first` (or `_any`, which takes the stream's lock in the statement)
    /// for one event (version 9).
    Event,
    /// `append_in_first` (as frozen in `append_in_first_v9`) for one event, after the
    /// stream's lock with `Any` (version 10).
    LockedEvent,
    /// The same with `append_in_first`, whose `RETURNING` takes the watcher's lock in a
    /// `CASE` (version 11 on).
    LeanEvent,
}

/// Creates, or replaces, `append_in_events` and `append_in_any` (see `append_in_function`).
fn append_in_functions(
    m: &mut Migration,
    schema: &str,
    sql: &crate::sql::Sql,
    first: First,
    returns: Returns,
) {
    // With `Any`: the stream's lock first; the statement that follows takes its snapshot
    // after the wait (a new one per statement in `READ COMMITTED`), so it reads the head
    // that the appender it waited for committed, like `locked_stream_head` but without a
    // second function call.
    let lock = format!(
        "PERFORM pg_advisory_xact_lock({});\n    ",
        stream_lock_key(schema, "$1")
    );
    let s = quote(schema);
    let write = |first: &str| {
        let max = crate::sql::MAX_EVENTS_PER_TRANSACTION;
        format!(
            "IF pg_current_xact_id_if_assigned() IS NULL AND cardinality($2) <= {max}
       AND NOT EXISTS (SELECT 1 FROM unnest($2::uuid[]) i(id) CROSS JOIN LATERAL (
               SELECT 1 FROM {s}.events e WHERE e.event_id = i.id LIMIT 1) e) THEN
        {};
        {};
    END IF;
    ",
            returns.run(first),
            returns.end()
        )
    };
    let event = |first: &str| {
        format!(
            "IF cardinality($2) = 1 THEN
        {};
        IF FOUND THEN
            {};
        END IF;
    END IF;
    ",
            returns.run(first),
            returns.end()
        )
    };
    for (name, any) in [("append_in_events", false), ("append_in_any", true)] {
        let lock = if any { lock.as_str() } else { "" };
        let before = match first {
            First::Nothing => lock.to_string(),
            First::Write => format!("{lock}{}", write(sql.append_first.text())),
            First::Event if any => format!("{}{lock}", event(sql.append_in_first_any.text())),
            First::Event => event(sql.append_in_first_v9.text()),
            // `lock` is empty for `append_in_events`.
            First::LockedEvent => format!("{lock}{}", event(sql.append_in_first_v9.text())),
            First::LeanEvent => format!("{lock}{}", event(sql.append_in_first.text())),
        };
        let name = format!("{name}{}", returns.suffix());
        m.inject_custom(append_in_function(
            schema,
            &name,
            &before,
            sql.append.text(),
            returns,
        ));
    }
}

/// Consumer groups (see `group.rs`): the members of each group with their heartbeats
/// (`expires_at` is the database's clock plus the lease timeout), one lease row per
/// partition (`owner` a live member or NULL; `epoch` counts the acquisitions and fences
/// a former owner), and one checkpoint per partition.
fn m0005_consumer_groups(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    m.create_table("group_members", |t| {
        t.add_column("group_name", types::text());
        t.add_column("member_id", types::uuid().unique(false));
        t.add_column("info", types::text());
        t.add_column("joined_at", timestamptz_now());
        t.add_column("heartbeat_at", timestamptz_now());
        t.add_column("expires_at", types::custom("TIMESTAMPTZ"));
        t.set_primary_key(&["group_name", "member_id"]);
    });
    m.create_table("group_leases", |t| {
        t.add_column("group_name", types::text());
        t.add_column("partition", types::integer());
        t.add_column("owner", types::uuid().unique(false).nullable(true));
        t.add_column("epoch", bigint().default(0));
        t.add_column("acquired_at", types::custom("TIMESTAMPTZ").nullable(true));
        t.set_primary_key(&["group_name", "partition"]);
    });
    m.create_table("group_checkpoints", |t| {
        t.add_column("group_name", types::text());
        t.add_column("partition", types::integer());
        t.add_column("position", bigint());
        t.add_column("updated_at", timestamptz_now());
        t.set_primary_key(&["group_name", "partition"]);
    });
    finish(m)
}

/// `feed_horizon(snapshot)`: how far a `$all` reader whose statement runs with `snapshot`
/// may read (a position bound, exclusive), the newest committed position (`tip`), and the
/// oldest transaction that holds the reader back (`blocker_pid`, `blocker_xid`), and the
/// snapshot's transactions found to belong to other databases (`others`: a reader may
/// remember them, see `read_all` in sql.rs).
fn feed_horizon_function(schema: &str) -> String {
    let s = quote(schema);
    let bits = crate::sql::POSITION_BITS;
    // The schema name is a checked identifier (letters, digits, `_`), so it can stand
    // inside the string literals and the dollar-quoted body below.
    let events = format!("{s}.events");
    let floor = format!("{s}.feed_floor");
    let lock_key = format!("{FLOOR_LOCK_CLASS}, hashtext('{schema}')");
    // The 64-bit id of a 32-bit one (pg_locks and pg_stat_activity show 32 bits) that is
    // at most 2^31 older than xmax8: NULL for an id at or after xmax8.
    let widen = |x32: &str| {
        format!(
            "(SELECT xmax8 - d FROM (SELECT ((((xmax8 % 4294967296) - {x32}::text::bigint)
                % 4294967296) + 4294967296) % 4294967296 AS d) w
              WHERE d > 0 AND d <= 2147483648)"
        )
    };
    let locker = widen("t.transactionid");
    let stat_xid = widen("a.backend_xid");
    format!(
        r#"CREATE FUNCTION {s}.feed_horizon(snap pg_snapshot,
    OUT horizon bigint, OUT tip bigint, OUT blocker_pid integer, OUT blocker_xid bigint,
    OUT others bigint[])
LANGUAGE plpgsql VOLATILE AS $body$
DECLARE
    xmin8 bigint := pg_snapshot_xmin(snap)::text::bigint;
    xmax8 bigint := pg_snapshot_xmax(snap)::text::bigint;
    c bigint;
    floor_seen bigint;
    ours bigint[];
    unlocked bigint[];
    scan integer := 0;
BEGIN
    horizon := xmin8 << {bits};
    SELECT e.global_position INTO tip FROM {events} e ORDER BY e.global_position DESC LIMIT 1;
    -- Every transaction below the snapshot's xmin has ended: when the newest event is
    -- below that line, nothing is held back.
    IF tip IS NULL OR tip < horizon THEN
        RETURN;
    END IF;
    -- On a hot standby (the primary's locks are not visible) and under another isolation
    -- level (the queries below would not see what committed meanwhile), the
    -- cluster-wide xmin is the horizon.
    IF current_setting('transaction_isolation') <> 'read committed' OR pg_is_in_recovery() THEN
        RETURN;
    END IF;
    -- The candidate: one past the newest committed event's transaction, never past the
    -- snapshot. Below it, only the snapshot's in-progress transactions can matter.
    c := least((tip >> {bits}) + 1, xmax8);
    horizon := c << {bits};
    -- 1. Those of them that may belong to this database: a transaction of another
    --    database can never append here. One whose backend cannot be found (it ended, or
    --    it is prepared) counts as ours.
    PERFORM pg_stat_clear_snapshot();
    WITH elsewhere AS MATERIALIZED (
        SELECT {stat_xid} AS x
          FROM pg_stat_get_activity(NULL) a
         WHERE a.backend_xid IS NOT NULL
           AND a.datid IS DISTINCT FROM (SELECT oid FROM pg_database
                                          WHERE datname = current_database())),
    xip AS MATERIALIZED (
        SELECT x::text::bigint AS x,
               x::text::bigint IN (SELECT o.x FROM elsewhere o WHERE o.x IS NOT NULL) AS other
          FROM pg_snapshot_xip(snap) x)
    SELECT array_agg(x ORDER BY x) FILTER (WHERE x < c AND NOT other),
           array_agg(x ORDER BY x) FILTER (WHERE other)
      INTO ours, others
      FROM xip;
    IF ours IS NULL THEN
        RETURN;
    END IF;
    -- 2. Appenders hold a write lock on the events table from before their first append
    --    (and before an id taken by it) until they end: the oldest lock holder of the
    --    snapshot below c holds the horizon. The floor is read before the locks.
    SELECT f.last_value INTO floor_seen FROM {floor} f;
    LOOP
        scan := scan + 1;
        -- A holder's id comes from its lock on it, and from the backend's entry: a new
        -- id is in snapshots (and in the backend's entry) before its lock is in the lock
        -- table, and taking that lock waits while pg_lock_status() holds the lock
        -- table's partitions: an appender seen without it here may be in the reader's
        -- snapshot already. (The backend entries were read after the snapshot, in step
        -- 1; a holder that ended since is found by step 4.) A prepared transaction has
        -- no backend, and always its lock.
        WITH locks AS MATERIALIZED (SELECT * FROM pg_lock_status()),
        holders AS (
            SELECT DISTINCT l.pid, l.virtualtransaction
              FROM locks l
             WHERE l.locktype = 'relation'
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.relation = '{events}'::regclass
               AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock',
                              'AccessExclusiveLock')
        ),
        lockers AS (
            SELECT {locker} AS x8, h.pid
              FROM holders h
              JOIN locks t ON t.virtualtransaction = h.virtualtransaction
                          AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock'
                          AND t.granted
            UNION
            SELECT {stat_xid} AS x8, h.pid
              FROM holders h
              JOIN pg_stat_get_activity(NULL) a ON a.pid = h.pid
             WHERE a.backend_xid IS NOT NULL
        ),
        oldest AS (
            SELECT k.x8, k.pid FROM lockers k
             WHERE k.x8 IS NOT NULL AND (k.x8 << {bits}) < horizon
             ORDER BY k.x8 LIMIT 1
        )
        SELECT coalesce((SELECT o.x8 FROM oldest o), blocker_xid),
               coalesce((SELECT o.pid FROM oldest o), blocker_pid),
               (SELECT array_agg(x) FROM unnest(ours) x
                 WHERE NOT EXISTS (SELECT 1 FROM lockers k WHERE k.x8 = x))
          INTO blocker_xid, blocker_pid, unlocked;
        IF blocker_xid IS NOT NULL THEN
            horizon := least(horizon, blocker_xid << {bits});
        END IF;
        -- 3. A transaction of this database below the horizon that holds no lock may
        --    still append later: the floor (read by every appender after it has taken
        --    the lock, when its id came first) must be past it, so that its first append
        --    is refused. If the floor is not there yet, move it, then look at the locks
        --    once more: an appender that took the lock between the first look and the
        --    move did not see the new floor.
        unlocked := ARRAY(SELECT x FROM unnest(unlocked) x WHERE (x << {bits}) < horizon);
        EXIT WHEN cardinality(unlocked) = 0 OR floor_seen >= c OR scan = 2;
        IF current_setting('transaction_read_only') = 'on'
           OR NOT has_sequence_privilege('{floor}', 'UPDATE') THEN
            -- The floor cannot move here: stop before them instead.
            SELECT min(x) INTO blocker_xid FROM unnest(unlocked) x;
            SELECT a.pid INTO blocker_pid FROM pg_stat_get_activity(NULL) a
             WHERE a.backend_xid::text::bigint = blocker_xid % 4294967296;
            horizon := blocker_xid << {bits};
            EXIT;
        END IF;
        PERFORM pg_advisory_xact_lock({lock_key});
        IF (SELECT f.last_value FROM {floor} f) < c THEN
            -- setval gives this transaction an id; its commit need not wait for the disk
            -- (after a crash no transaction that could be refused is left).
            PERFORM set_config('synchronous_commit', 'off', true);
            PERFORM setval('{floor}', c);
        END IF;
        floor_seen := c;
    END LOOP;
    -- 4. A transaction that was running at the snapshot and has committed events since
    --    (before step 2 looked) is not in the snapshot: stop before it; the next read
    --    gets it.
    SELECT least(horizon, min(x) << {bits}) INTO horizon
      FROM unnest(ours) x
     WHERE (x << {bits}) < horizon
       AND EXISTS (SELECT 1 FROM {events} e
                    WHERE e.global_position >= x << {bits}
                      AND e.global_position < (x + 1) << {bits});
END
$body$"#
    )
}

/// Stream lifecycle. Events are immutable by the database's own rule: a trigger refuses
/// every `UPDATE` and `TRUNCATE` of the events table, and every `DELETE` that does not
/// come through the library's lifecycle statements (which set [`LIFECYCLE_SETTING`] in
/// their own transaction). This guards against accidents (a mistaken `UPDATE` in psql, a
/// migration script, an ORM), not against a superuser who means it: anyone who may set
/// the setting or drop the trigger can still change history.
fn m0006_lifecycle(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let s = quote(schema);
    let events = format!("{s}.events");
    let setting = LIFECYCLE_SETTING;
    // Stream metadata: a JSON object with a version of its own (from 0), read by stream
    // reads (`$tb`) and by the scavenger (`$maxCount`, `$maxAge`).
    m.create_table("stream_metadata", |t| {
        t.add_column("stream_id", types::text().primary(true));
        t.add_column("version", bigint());
        t.add_column("metadata", jsonb());
        t.add_column("updated_at", timestamptz_now());
        t.inject_custom(
            "CONSTRAINT \"stream_metadata_is_object\" CHECK (jsonb_typeof(metadata) = 'object')",
        );
    });
    // The schema name is a checked identifier: it may stand inside the message literal.
    m.inject_custom(format!(
        r#"CREATE FUNCTION {s}.events_are_immutable() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('{setting}', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'pg-eventstore: events are immutable: % on {schema}.events refused', TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = CASE TG_OP WHEN 'DELETE'
                  THEN 'remove events through the library: delete_stream, truncate_stream, scavenge'
                  ELSE 'append a new event that corrects the old one' END;
END
$body$"#
    ));
    m.inject_custom(format!(
        "CREATE TRIGGER events_are_immutable BEFORE UPDATE OR DELETE ON {events}
    FOR EACH ROW EXECUTE FUNCTION {s}.events_are_immutable()"
    ));
    m.inject_custom(format!(
        "CREATE TRIGGER events_are_not_truncated BEFORE TRUNCATE ON {events}
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_are_immutable()"
    ));
    finish(m)
}

/// `locked_stream_head(stream)`: takes the stream's advisory lock for the rest of the
/// transaction (a 64-bit key from the schema and stream names; another stream with the
/// same hash only shares the wait), then reads the stream's head with a snapshot taken
/// after the wait (a `VOLATILE` function's query in `READ COMMITTED`), so that an append
/// that expects any version sees what the appender it waited for committed.
fn locked_stream_head_function(schema: &str) -> String {
    let s = quote(schema);
    let events = format!("{s}.events");
    let lookup = crate::sql::stream_head_lookup(&events, "p_stream");
    let key = stream_lock_key(schema, "p_stream");
    format!(
        r#"CREATE FUNCTION {s}.locked_stream_head(p_stream text,
    OUT head_version bigint, OUT head_position bigint)
LANGUAGE plpgsql VOLATILE AS $body$
BEGIN
    PERFORM pg_advisory_xact_lock({key});
    SELECT h.v, h.hp INTO head_version, head_position FROM ({lookup}) h;
END
$body$"#
    )
}

/// A function (created, or replaced in place so that it keeps its grants) that runs
/// `before` (PL/pgSQL statements), then the full append `statement`
/// (see `append` in sql.rs) with its eight parameters, for `append_in`: the caller's
/// transaction runs on a connection the store does not own, so it cannot keep a prepared
/// statement there, and planning the full statement anew costs about 0.5 ms of server
/// time per call. A PL/pgSQL function keeps the plan for the session. Its body is the
/// statement as of this schema version: a change to the statement needs a migration
/// that replaces the function (a test compares the two). `before` may return first with
/// a lean statement (see [`First`]).
fn append_in_function(
    schema: &str,
    name: &str,
    before: &str,
    statement: &str,
    returns: Returns,
) -> String {
    let s = quote(schema);
    let (signature, declare) = match returns {
        Returns::Table => (APPEND_IN_RETURNS, ""),
        Returns::Record => ("RETURNS record", "DECLARE\n    result record;\n"),
    };
    format!(
        r#"CREATE OR REPLACE FUNCTION {s}.{name}{APPEND_IN_ARGS}
{signature}
LANGUAGE plpgsql VOLATILE AS $body$
#variable_conflict use_column
{declare}BEGIN
    {before}{};
{}END
$body$"#,
        returns.run(statement),
        match returns {
            Returns::Table => "",
            Returns::Record => "    RETURN result;\n",
        }
    )
}

/// How an `append_in` function gives its one row.
#[derive(Clone, Copy)]
enum Returns {
    /// As a table of the 13 columns of `APPEND_IN_RETURNS` (`append_in_events` and
    /// `append_in_any`, versions 4 on), called as `SELECT * FROM f(...)`.
    Table,
    /// As one `record` of the same columns (`append_in_events_record` and
    /// `append_in_any_record`, version 15 on), called as `SELECT f(...)`.
    Record,
}

impl Returns {
    /// The function's name after `append_in_events` or `append_in_any`.
    fn suffix(self) -> &'static str {
        match self {
            Returns::Table => "",
            Returns::Record => "_record",
        }
    }

    /// PL/pgSQL that runs `statement` (one row or none) for the function's result.
    fn run(self, statement: &str) -> String {
        match self {
            Returns::Table => format!("RETURN QUERY {statement}"),
            Returns::Record => format!("{statement}\n      INTO result"),
        }
    }

    /// PL/pgSQL that ends the function with the row `run` gave.
    fn end(self) -> &'static str {
        match self {
            Returns::Table => "RETURN",
            Returns::Record => "RETURN result",
        }
    }
}

/// The signature's tail of the `append_in` functions (and of `append_in_notify`).
const APPEND_IN_RETURNS: &str =
    "RETURNS TABLE (inserted bigint, first_position bigint, last_position bigint, head bigint,
               tx_events bigint, dup_streams text[], dup_versions bigint[],
               dup_positions bigint[], dup_index bigint[], dup_same boolean,
               order_conflict boolean, behind_floor boolean, watched bigint)";

/// The two `CHECK` constraints of `events` (a stream name is not empty, a version is not
/// negative) become the constraints of two domains, the columns' new types. The same rule
/// for every row written, by every path, at a fraction of the cost: PostgreSQL parses and
/// prepares a table's `CHECK` expressions anew for every statement that inserts (about
/// 26,000 instructions of a one-event append, counted by callgrind), and a domain's once
/// per session (about 4,000 for a one-row statement).
///
/// No row is rewritten and no index rebuilt: each column first takes a domain without a
/// constraint (the same type underneath), then the domain takes its constraint as
/// `NOT VALID`, while the table's check still holds, then the table's check goes (if an
/// operator had not dropped it) and the domain's is validated (a scan of the table each).
fn m0014_check_domains(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    let s = quote(schema);
    // Safe to run again (a test puts a store back to version 7 and upgrades it).
    m.inject_custom(format!(
        "DO $m$ BEGIN
IF (SELECT atttypid FROM pg_attribute
     WHERE attrelid = '{s}.events'::regclass AND attname = 'stream_id') = 'text'::regtype THEN
    CREATE DOMAIN {s}.stream_name AS text;
    CREATE DOMAIN {s}.stream_version AS bigint;
    ALTER TABLE {s}.events ALTER COLUMN stream_id TYPE {s}.stream_name,
        ALTER COLUMN stream_version TYPE {s}.stream_version;
    ALTER DOMAIN {s}.stream_name ADD CONSTRAINT stream_name_not_empty
        CHECK (VALUE <> '') NOT VALID;
    ALTER DOMAIN {s}.stream_version ADD CONSTRAINT stream_version_not_negative
        CHECK (VALUE >= 0) NOT VALID;
    ALTER TABLE {s}.events DROP CONSTRAINT IF EXISTS events_stream_id_check,
        DROP CONSTRAINT IF EXISTS events_stream_version_check;
    ALTER DOMAIN {s}.stream_name VALIDATE CONSTRAINT stream_name_not_empty;
    ALTER DOMAIN {s}.stream_version VALIDATE CONSTRAINT stream_version_not_negative;
END IF;
END $m$"
    ));
    // The functions again, with the statement that gives the repeats' stream names and
    // versions as arrays of the base types (an array of a domain is a type of its own).
    append_in_functions(
        &mut m,
        schema,
        &crate::sql::Sql::new(schema),
        First::LeanEvent,
        Returns::Table,
    );
    finish(m)
}

/// `append_in_events_record` and `append_in_any_record`: `append_in_events` and
/// `append_in_any` with the same body and arguments, returning their one row as a
/// `record`, for `append_in` to call as `SELECT f(...)`. The server parses, analyses and
/// plans the call that `append_in` sends every time (it works on any client, so it cannot
/// keep it prepared); a function in `FROM` with 13 named columns and a `RETURN QUERY`
/// costs more there than a function in the select list that fills one record: 546,038
/// against 418,329 server instructions per one-event call (`benches/server_instructions.sh`:
/// callgrind, top-level statements in a single-user backend), and 317,047 against
/// 291,189 for the functions' own work, called from a loop that plans the call once.
/// The functions of version 14 stay, for processes still running an older version of
/// this library. The new ones get the same `EXECUTE` grants as the functions they copy.
fn m0015_append_in_record(schema: &str) -> String {
    let mut m = Migration::new().schema(schema);
    append_in_functions(
        &mut m,
        schema,
        &crate::sql::Sql::new(schema),
        First::LeanEvent,
        Returns::Record,
    );
    let s = quote(schema);
    let args = APPEND_IN_ARGS;
    // A function is created executable by PUBLIC unless default privileges say
    // otherwise; an operator who revoked that from the old functions granted them to
    // some roles instead.
    m.inject_custom(format!(
        "DO $m$ DECLARE f record; g record; BEGIN
FOR f IN SELECT p.proacl, n.new
           FROM (VALUES ('{s}.append_in_events{args}'::regprocedure,
                         '{s}.append_in_events_record{args}'::regprocedure),
                        ('{s}.append_in_any{args}'::regprocedure,
                         '{s}.append_in_any_record{args}'::regprocedure)) n(old, new)
           JOIN pg_proc p ON p.oid = n.old
          WHERE p.proacl IS NOT NULL LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.new);
    FOR g IN SELECT a.grantee, a.is_grantable FROM aclexplode(f.proacl) a
              WHERE a.privilege_type = 'EXECUTE' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', f.new,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(g.grantee)) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END LOOP;
END $m$"
    ));
    finish(m)
}

/// The advisory lock key of the stream named by the SQL expression `stream`: 64 bits
/// hashed from the schema and stream names. The schema name is a checked identifier.
pub(crate) fn stream_lock_key(schema: &str, stream: &str) -> String {
    format!("hashtextextended('{schema}/' || {stream}, 0)")
}

/// The advisory lock class (with the hash of the schema name) that orders moves of the
/// feed floor, so that it only ever grows.
// Not 0x5045_5332, which the processor lock uses with the hash of a processor's name: a
// worker named like its schema would have blocked every move of the floor.
const FLOOR_LOCK_CLASS: i32 = 0x5045_5334; // "PES4"

fn history_table(schema: &str, table: &str) -> String {
    let mut m = Migration::new().schema(schema);
    m.create_table_if_not_exists(table, |t| {
        t.add_column("version", bigint().primary(true));
        t.add_column("name", types::text());
        t.add_column("applied_at", timestamptz_now());
    });
    finish(m)
}

/// The whole schema as one SQL script, for people who apply SQL by hand: the same
/// statements the runner executes, plus the history rows, so that the library later sees
/// the schema as migrated. `schema/eventstore.sql` holds it for the default names.
///
/// ```
/// let sql = pg_eventstore::migration_sql("eventstore", "schema_migrations")?;
/// assert!(sql.contains("CREATE TABLE \"eventstore\".\"events\""));
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
pub fn migration_sql(schema: &str, migrations_table: &str) -> Result<String> {
    check_identifier("schema", schema)?;
    check_identifier("migrations table", migrations_table)?;
    let history = format!("{}.{}", quote(schema), quote(migrations_table));
    let mut out = format!(
        "-- pg-eventstore schema version {SCHEMA_VERSION}. Generated by \
         pg_eventstore::migration_sql; do not edit by hand.\nBEGIN;\n\
         CREATE SCHEMA IF NOT EXISTS {};\n{}\n",
        quote(schema),
        history_table(schema, migrations_table)
    );
    for step in STEPS {
        out.push_str(&format!(
            "\n-- {:04} {}\n{}\nINSERT INTO {history} (version, name) VALUES ({}, {});\n",
            step.version,
            step.name,
            (step.sql)(schema),
            step.version,
            crate::sql::literal(step.name)
        ));
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// What [`Store::migrate`](crate::Store::migrate) did. Serializes with its field names
/// (`applied` as `[[version, "name"], ...]`), as `pg-eventstore migrate` prints it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The schema version before (0: nothing was there).
    pub previous_version: i64,
    /// The schema version now.
    pub current_version: i64,
    /// The migrations applied by this call, as `(version, name)`.
    pub applied: Vec<(i64, String)>,
}

/// Brings `schema` up to [`SCHEMA_VERSION`] in one transaction, under an advisory lock.
pub(crate) fn run(
    client: &mut postgres::Client,
    schema: &str,
    table: &str,
) -> Result<MigrationReport> {
    let history = format!("{}.{}", quote(schema), quote(table));
    let mut tx = client.transaction()?;
    // Another process migrating the same schema holds the lock for as long as its
    // migrations take: wait for it, whatever `lock_timeout` and `statement_timeout` the
    // role or the store sets, and put them back for the migrations themselves (so that
    // DDL stuck behind the application's locks still gives up as configured).
    let timeouts = tx.query_one(
        "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')",
        &[],
    )?;
    let (lock_timeout, statement_timeout): (String, String) = (timeouts.get(0), timeouts.get(1));
    tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &schema],
    )?;
    tx.execute(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
        &[&lock_timeout, &statement_timeout],
    )?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {};\n{}",
        quote(schema),
        history_table(schema, table)
    ))?;
    let previous: i64 = tx
        .query_one(
            &format!("SELECT COALESCE(max(version), 0) FROM {history}"),
            &[],
        )?
        .get(0);
    if previous > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found: previous,
            supported: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for step in STEPS.iter().filter(|s| s.version > previous) {
        tx.batch_execute(&(step.sql)(schema))?;
        tx.execute(
            &format!("INSERT INTO {history} (version, name) VALUES ($1, $2)"),
            &[&step.version, &step.name],
        )?;
        applied.push((step.version, step.name.to_string()));
    }
    tx.commit()?;
    Ok(MigrationReport {
        previous_version: previous,
        current_version: SCHEMA_VERSION.max(previous),
        applied,
    })
}

/// The schema version recorded in the history table, or 0 when there is none.
pub(crate) fn current_version(
    client: &mut impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<i64> {
    let sql = format!(
        "SELECT COALESCE(max(version), 0) FROM {}.{}",
        quote(schema),
        quote(table)
    );
    match client.query_one(&sql, &[]) {
        Ok(row) => Ok(row.get(0)),
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
        {
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_numbered_in_order() {
        for (i, s) in STEPS.iter().enumerate() {
            assert_eq!(s.version, i as i64 + 1);
        }
        assert_eq!(STEPS.last().unwrap().version, SCHEMA_VERSION);
    }

    /// Version 13's `append_in_notify` embeds `sql::mac`, `sql::is_final` and
    /// `sql::event_json`.
    /// If this fails, one of them changed: add a migration that replaces the function
    /// with the new text, and keep version 13's as it was.
    #[test]
    fn version_13_is_frozen() {
        let got = crate::sql::fnv(&m0013_append_in_notify("eventstore"));
        assert_eq!(
            got, 0x5e2d_6c51_d2f5_17a8,
            "m0013_append_in_notify: {got:#x}"
        );
    }

    #[test]
    fn script_refuses_bad_names() {
        assert!(migration_sql("x; DROP TABLE y", "h").is_err());
        assert!(migration_sql("ok", "h\"").is_err());
    }
}
