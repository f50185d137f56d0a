//! A blocking event store on PostgreSQL, for programs that are not async: batch jobs,
//! CLIs, scripts, workers and threaded services.
//!
//! Append events with optimistic concurrency, read streams forwards and backwards, and
//! read the whole log in a global order that never skips or repeats an event, with
//! nothing but an `r2d2` pool of `postgres` connections underneath. The server must run
//! PostgreSQL 13 or newer ([`Store::connect`] refuses an older one with
//! [`Error::ServerTooOld`]); the crate is tested on PostgreSQL 15.
//!
//! # Quick start
//!
//! ```no_run
//! use pg_eventstore::{EventData, ExpectedVersion, ReadAll, ReadStream, Store};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Deposited { amount: u64 }
//!
//! fn main() -> Result<(), pg_eventstore::Error> {
//!     // DATABASE_URL, or DB_HOST / DB_PORT / DB_NAME / DB_USER / DB_PASSWORD.
//!     let store = Store::from_env()?;
//!     store.migrate()?; // creates the schema `eventstore`; safe to run every start
//!
//!     let written = store.append("account-1", ExpectedVersion::NoStream, &[
//!         EventData::new("Deposited", &Deposited { amount: 10 })?,
//!     ])?;
//!     store.append("account-1", ExpectedVersion::Exact(written.last_version), &[
//!         EventData::new("Deposited", &Deposited { amount: 5 })?,
//!     ])?;
//!
//!     let mut balance = 0;
//!     for event in store.read_stream("account-1", ReadStream::forwards())? {
//!         balance += event?.data_as::<Deposited>()?.amount;
//!     }
//!     assert_eq!(balance, 15);
//!
//!     for event in store.read_all(ReadAll::from_start().category("account-"))? {
//!         let event = event?;
//!         println!("{} {} v{}", event.position, event.stream_id, event.version);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! # Versions
//!
//! Stream versions count from 0: the first event of a stream has version 0.
//! [`ExpectedVersion::Exact(n)`](ExpectedVersion::Exact) means "the last event has version
//! `n`". An append is one SQL statement and one round trip; the stream's unique
//! `(stream_id, version)` constraint, not a read before the write, decides who wins a race,
//! and the loser gets [`Error::WrongExpectedVersion`] with the version it met.
//!
//! # The global order
//!
//! A sequence number taken at INSERT time cannot order the log: with two concurrent
//! appends, the one holding number 11 can commit before the one holding 10, and a reader
//! that has seen 11 never looks back at 10. A global lock would fix that, and also make
//! every append wait for every other, including the work callers do inside their own
//! transactions.
//!
//! This store orders events by the **transaction that appended them**. Every event's
//! global position is `xid << 20 | n`, where `xid` is the appending transaction's 64-bit
//! id (`pg_current_xact_id()`) and `n` counts that transaction's events. A `$all` reader
//! reads only below a **horizon**: a position below which no event can ever appear again.
//! The set a reader sees below its horizon is final, so "events after the last position
//! I saw" never skips and never repeats one, while appends to different streams run
//! concurrently with no lock between them.
//!
//! ## How the horizon is found
//!
//! The easy horizon is the reading snapshot's `xmin << 20`: every transaction below
//! `xmin` has ended. But `xmin` is cluster-wide: *any* transaction that holds an id, in
//! any database, for any reason, would hold the feed back for as long as it runs. So the
//! store uses it only when nothing is held back (the newest event is below it), and
//! otherwise lets only transactions that **append to this store** hold the feed, and only
//! at and after their own positions. Each read of `$all` (one statement; the
//! `feed_horizon` function that the migration creates) does, in this order (a forwards
//! read first tries a lean statement that reads below `xmin`, and keeps its page only
//! when nothing is held back):
//!
//! 1. **The candidate.** `C` = one past the id of the newest committed event (and not
//!    past the reader's snapshot). Below `C`, only the transactions that were in progress
//!    at the reader's snapshot can matter. Those of **another database** are dropped at
//!    once (`pg_stat_activity` names each backend's database and transaction id): they
//!    can never append here. If none is left, the horizon is `C`, and nothing else is
//!    looked at. A transaction whose backend is not found (it ended, or it is prepared)
//!    counts as one of this database.
//! 2. **Find the appenders.** Every transaction that appends holds a write lock on the
//!    events table from before its first append until it ends, visible in `pg_locks`.
//!    Its transaction id is taken from its backend's entry (`pg_stat_activity`, read
//!    after the snapshot) as well as from its lock on that id: PostgreSQL publishes a new
//!    id to snapshots before it enters the lock on it, and entering it waits while
//!    `pg_lock_status()` holds the lock table, so a reader can meet an appender whose id
//!    is in its snapshot and whose id lock is not there yet. (Found through those locks
//!    alone, the subscription stress test skipped a transaction's events in 3 of 12
//!    runs under load, and once more in a CI run.) The oldest appender below `C` caps
//!    the horizon.
//! 3. **Pass the others only behind the floor.** A transaction of this database below the
//!    horizon that holds no such lock (it wrote another table, say, and sits idle) may
//!    still append later. The **feed floor**, a sequence, must then be at least `C`: if
//!    the reader saw it lower before step 2, it raises it (under an advisory lock, so it
//!    only grows; `setval` is not transactional, and a read of the sequence sees the
//!    newest value under every isolation level) and looks at the locks once more, for
//!    an appender that took the lock between the first look and the move. Where the
//!    floor cannot move (a read-only transaction, a role without `UPDATE` on
//!    `<schema>.feed_floor`), the horizon stops before the oldest such transaction
//!    instead.
//! 4. **Catch the late committers.** A transaction of step 1 that has committed events
//!    by now (so it is not in the reader's snapshot, and no longer in `pg_locks`) caps
//!    the horizon too; the next read gets it.
//!
//! An appender checks the floor once, in its first append, after it has taken the table
//! lock: **a transaction whose id is below the floor may not start appending**, and gets
//! [`Error::FeedOrderConflict`] (retry the transaction). Why no event can then appear
//! below a reader's horizon `H`: take a transaction `T` with id `x < H` that commits
//! events. `x` is below `C`, so `x` is below the snapshot's `xmax`: `T` either ended
//! before the snapshot (the reader sees its events) or was in progress at it, and then
//! it belongs to this database (step 1 dropped only the others). Its first append took
//! the table lock and then read the floor.
//!
//! * If it held the lock at a look of step 2 and was still running, `H <= x`.
//! * If it had ended before that look (locks go after the commit is visible), step 4
//!   saw its events: `H <= x`.
//! * Otherwise it took the lock after the last look, so it read the floor after that
//!   look. The reader passed `T` without a lock only if the floor was at least `C`
//!   before the look (read before it, or raised before the second one): `x < H <= C`
//!   and `T` was refused.
//!
//! The same argument shows why most appends never check anything: an append through the
//! pool is one statement in its own transaction, which takes its id after the table lock
//! (so its id is not in an earlier snapshot); so does [`Store::append_in`] in a
//! transaction whose first write is the append, and every later append of a transaction
//! (it already holds the lock). Subtransactions do not change this: positions use the
//! top-level id, a subtransaction that rolls back releases its lock together with its
//! rows, and a released savepoint hands both to its parent. Prepared transactions keep
//! their locks and ids in `pg_locks` and hold the feed like any open appender.
//!
//! Schema 4 to 6 also waited for every statement of this database that was running with a
//! transaction id, which covered that gap by accident (a stress run had skipped an event
//! without it) and held the feed behind any long statement. Schema 7 closes the gap
//! itself (step 2) and drops the rule.
//!
//! What this costs, and what it means for you:
//!
//! * Positions are unique and increase in read order, but they are sparse and large
//!   (they start near `xid × 1,048,576`). Treat them as opaque numbers to compare and
//!   store. Events of one transaction get consecutive positions.
//! * One transaction can append at most [`MAX_EVENTS_PER_TRANSACTION`] (1,048,576) events.
//! * **What holds the feed back:** an open transaction that has appended to this store (or
//!   is appending, or holds a write lock on its events table) holds back `$all` readers at
//!   and after its own position, for as long as it stays open. Nothing else does:
//!   transactions in other databases, and transactions in this one that do not append
//!   (running or idle), are not waited for. A transaction of this database that holds an
//!   id makes readers move the floor, a small write, on each new event while it is open. [`Store::feed_status`] says whether events wait, and for whom;
//!   [`Store::read_all`] waits for everything committed before the call
//!   ([`Config::read_all_wait`], 10 s by default) and then fails with
//!   [`Error::HeldBack`] naming that transaction, rather than return a short read;
//!   subscriptions report it in [`Store::health_check`], a metric and a warning. Stream
//!   reads ([`Store::read_stream`]) are never held back.
//! * **What can be refused:** an [`Store::append_in`] (or [`Store::import_in`]) whose
//!   transaction got its id (by writing something else) before its first append, while
//!   readers moved past that id: [`Error::FeedOrderConflict`]. Append first and write
//!   your other rows after, and it cannot happen.
//! * **Where the store falls back to `xmin`:** on a **hot standby** (whose lock table
//!   does not show the primary's appenders). Where the reader may not move the floor (a read-only
//!   transaction or session, a role without `UPDATE` on `<schema>.feed_floor`), an idle
//!   transaction of this database that holds an id holds the feed like an appender.
//!   Reading from a standby with the precise horizon would need the primary's readers to
//!   publish it (the floor replicates with the WAL, the lock table does not); nothing in
//!   the design closes that door. (The horizon function also falls back in a
//!   transaction at another isolation level than `READ COMMITTED`; the store's
//!   connections start every transaction at that level, whatever the role's
//!   `default_transaction_isolation`.)
//! * A reader that moves the floor gets a transaction id for it (its commit does not wait
//!   for the disk: after a crash no transaction that the floor could refuse survives).
//!   Readers move it only while a transaction of this database that holds an id without
//!   appending is open, once per new event at most.
//! * Transaction ids must only grow. They do in one cluster and through `pg_upgrade`, but
//!   a logical dump restored into a *new* cluster starts again from small ids: restore
//!   into a cluster whose transaction id is past the log's (`pg_resetwal -e/-x`), or the
//!   new events would sort before the old ones.
//!
//! # Reads hold a connection
//!
//! [`Events`] owns a pooled connection while it reads. The first page is a plain query;
//! a longer read continues in a read-only transaction, one page per statement and round
//! trip, each going on after the last event fetched, so memory stays flat. That
//! transaction holds a snapshot, which holds back
//! VACUUM, so a read holds one only while it fetches: when you have not yet taken the
//! page it fetched ahead, it ends its transaction and fetches the next page in a new one
//! (after the last event it fetched) once you do; a read that you keep up with starts a
//! new transaction when its snapshot is [`Config::read_snapshot_max_age`] old (1 s). See
//! [`Events`].
//!
//! # Subscriptions
//!
//! [`Store::subscribe`] returns a [`Subscription`]: an iterator that first reads the
//! history through the same reads as [`Store::read_all`], then blocks for new events, in
//! the same global order and with the same guarantee. Start from the beginning, after a
//! position (a checkpoint), or live; follow everything, a category, some event types, a
//! list of streams (in the global order), or one stream (in version order).
//!
//! ```no_run
//! use std::time::Duration;
//! use pg_eventstore::{Store, SubscribeOptions};
//!
//! # fn main() -> Result<(), pg_eventstore::Error> {
//! let store = Store::from_env()?;
//! let mut orders = store.subscribe(SubscribeOptions::category("order-").live())?;
//! let stop = orders.stopper(); // hand this to another thread to end the loop
//! # drop(stop);
//! while let Some(event) = orders.next_timeout(Duration::from_secs(30)) {
//!     let event = event?;
//!     println!("{} {}", event.stream_id, event.event_type);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! A wake-up is a hint; events are read from the table (with the one exception below),
//! so they can be of any size, and a lost notification costs latency, never an event.
//! Each store has one
//! listener thread on its own connection (started by the first subscription, ended when
//! the store is dropped) that `LISTEN`s on the channel `<schema>_events`, reconnects with
//! backoff, and wakes every subscriber after a reconnect and on a safety poll
//! ([`Config::poll_interval`]). Appends through the pool wake the same store's
//! subscribers directly; other processes hear of them through a `NOTIFY`, and only while
//! another process listens ([`Config::notify_on_append`]). An append that finds no
//! `NOTIFY` sent by this process in the last millisecond sends its own, inside its
//! statement; the others leave it to a background thread, which sends one after the
//! commit for however many appends happened meanwhile: a `NOTIFY` inside every append's
//! transaction would serialise their commits (PostgreSQL holds one lock from a notifying
//! transaction's commit until it is flushed).
//! [`Store::append_in`] follows the same rule inside the caller's transaction: one that
//! comes after a quiet millisecond, while somebody can be woken, sends the `NOTIFY` from
//! the caller's transaction, delivered as it commits (see "Live delivery" below). The
//! others, and [`Store::import_in`], send nothing from inside the caller's transaction:
//! they take a shared advisory lock named after the transaction's id,
//! and the store's **commit watcher** thread (on its own connection, started by the first
//! of them) waits for that lock, asks `pg_xact_status` which of the transactions it
//! watches have committed, and then wakes this process's subscribers, once for all of
//! them; while another process listens, the query that finds a commit also sends the
//! `NOTIFY`. While it watches several, it looks every millisecond; one transaction that
//! stays open costs it one short query every 10 ms at most. While nobody can be woken (no
//! subscriber in this process, and no other process listening, or notifying off) a
//! transaction is not watched at all, only remembered (the newest 4,096): a process that
//! only writes pays no watcher round per commit, and the first subscriber hands the
//! remembered ones to the watcher, so that it still hears of those that commit later.
//!
//! ## Live delivery
//!
//! The exception: a subscriber in another process can take an append's events from its
//! notification, without a read. When an append sends the `NOTIFY` itself and this
//! process made no pool append in the millisecond before it (a sparse append, whose
//! subscribers would otherwise wait a read's round trip for it), the `NOTIFY` carries,
//! when it all fits in 7,900 bytes, the append's events, the newest position below them in the
//! append's snapshot (`prev`), and whether `prev` is final: it is when the snapshot saw
//! no transaction of this database with an id running (those of other databases, found
//! in `pg_stat_activity`, can never append here) and the append's transaction took the
//! very next id, so that no transaction that could still put an event between `prev`
//! and these exists. A `$all` or category subscription delivers the events (through its filters)
//! straight from the notification when `prev` is final and at or below what it has
//! delivered or read past, and the events are above it; a stream subscription takes
//! the events of its stream when their version is the next one. Otherwise it reads the
//! table, as always: on a busy server, where some transaction nearly always holds an
//! id, most notifications only wake. Busy writers send wake-ups alone: the events cost
//! the server about 400,000 instructions per append (callgrind; a one-event append
//! costs about 240,000), and their subscribers read many events per wake-up anyway.
//!
//! Anybody who can connect can `NOTIFY` on any channel, so the payload carries a MAC,
//! `sha256(outer || sha256(inner || json))`, made by the append statement with the two
//! random 64-byte keys of the schema's `feed_key` table (schema version 12) and checked
//! by the listener: only a role that can read that table makes a notification whose
//! events are delivered; any other notification only wakes. A store at version 11
//! keeps working with this version, with wake-ups alone, until [`Store::migrate`].
//!
//! A sparse [`Store::append_in`] (no `append_in` from this process in the millisecond
//! before, and no `NOTIFY` either) calls the schema's `append_in_notify` function
//! (schema version 13), which sends the same payload from the caller's transaction: its
//! snapshot and `prev` come from a statement before the call takes the transaction's id
//! (and, with `Any`, the stream's lock), and a transaction id the snapshot does not see
//! stays unseen until the commit, so `final` still holds when the notification goes out
//! as the transaction commits. Its first token is empty, so that the appending
//! process's listener delivers the events to the subscriptions there too. When the
//! transaction had an id before the call, the snapshot may see newer transactions,
//! which only makes `prev` too new to place: the subscribers read. It costs the sparse
//! transaction 0.26–0.42 ms (BENCHMARKS.md). A role that may not read the key, or call
//! the function (both looked up when the store connects), sends the wake-up alone.
//!
//! Subscribers in the appending process get the same without a notification: a sparse
//! pool append, while a subscription of this store is open, returns its events' data and
//! metadata as stored, their time, `prev` and whether it is final, and hands them to the
//! store's subscriptions, which place them under the same rules (at any schema version:
//! nothing crossed a process boundary, so no MAC is needed), when they hold at most
//! 64 KiB of JSON: larger appends wake the subscriptions to read in pages, so that each
//! does not hold a copy of all of it. An append that carries events in its `NOTIFY`
//! returns the same columns; one whose events cannot fit in a notification does not
//! try to put them in.
//!
//! Measured (W6 in the load generator, one append every 2 ms): commit to delivery in
//! 0.035–0.038 ms at the median with the subscriber in a second store, against
//! 0.20–0.30 ms with a read after the wake-up; 0.011–0.014 ms in the same store, against
//! 0.135–0.159 ms.
//!
//! # Checkpoints and workers
//!
//! A [`Tracker`] keeps a processor's position with batched writes
//! ([`Store::save_checkpoint_in`] writes it in your own transaction). A [`Worker`] runs a
//! handler on a pool of threads from the processor's checkpoint: one stream's events in
//! order on one thread at a time (a stream with no event in flight goes to the least busy
//! thread), checkpoints that never pass an unfinished event,
//! retries, then [`OnFailure::Stop`] or [`OnFailure::Park`] in the `dead_letters` table,
//! graceful shutdown, a batch mode for jobs ([`Worker::run_batch`]), and one running
//! worker per processor name. Transactional handlers ([`Worker::spawn_transactional`])
//! commit their writes together with a per-stream claim, for exactly-once effects.
//! [`WorkerHandle::stopper`] stops a running worker from anywhere (a signal handler:
//! `examples/service.rs`).
//!
//! Operating processors needs no SQL on the store's tables: [`Store::processors`] lists
//! them with position, lag and whether they run; [`Store::reset_processor`] and
//! [`Store::delete_checkpoint`] rebuild them; [`Store::dead_letters`],
//! [`Worker::replay_dead_letters`] and [`Store::delete_dead_letter`] handle parked events.
//!
//! # Consumer groups
//!
//! When one process is not enough, [`Worker::group`] makes a worker a member of a
//! [`ConsumerGroup`]: any number of processes, on any number of machines, run members with
//! the same processor name and share its streams, each owning a share of the group's
//! partitions (a stream's events are all in one partition, so each stream stays in order,
//! handled by one member at a time). Members, leases and per-partition checkpoints are rows
//! in the store's schema; members renew their leases with heartbeats, judged by the
//! database's clock; a new member gets its share within a few heartbeats, as the others
//! finish and checkpoint what they read of the partitions they hand over; a dead member's
//! partitions are taken over after the lease timeout, from their checkpoints. Transactional
//! handlers stay exactly-once through all of it, and are fenced: a member that was paused
//! past its lease cannot commit an effect for a partition another member has taken.
//! [`Store::group_members`] and [`Store::group_partitions`] show who holds what.
//!
//! ```no_run
//! use std::time::Duration;
//! use pg_eventstore::{GroupOptions, Store};
//!
//! # fn main() -> Result<(), pg_eventstore::Error> {
//! let store = Store::from_env()?;
//! // Run this in as many processes as needed.
//! let member = store
//!     .worker("read-model")
//!     .threads(2)
//!     .group(GroupOptions::new().lease_timeout(Duration::from_secs(10)))
//!     .spawn_transactional(|tx, event| {
//!         tx.execute("INSERT INTO seen VALUES ($1, $2)", &[&event.stream_id, &(event.version as i64)])?;
//!         Ok(())
//!     })?;
//! // ... until shutdown: hands its partitions over to the other members.
//! member.stop()?;
//! # Ok(())
//! # }
//! ```
//!
//! [`ConsumerGroup`] and `OPERATIONS.md` say what happens on a crash, a pause past the
//! lease (split brain), clock skew and a database restart.
//!
//! # Failures, health and observability
//!
//! Transient failures (a lost or refused connection, a server restart, a serialization
//! failure or deadlock) are retried with backoff and jitter: reads go on after the last
//! event they yielded, and appends are retried with the same event ids, so they never
//! write twice. A wrong expected version is never retried, nor is
//! [`Store::append_in`]. See [`Config::max_retries`].
//!
//! [`Store::health_check`] reports reachability, latency, schema version and pool state;
//! [`Config::health_check_interval`] runs it on a background thread, and
//! [`Store::connection_events`] tells of each outage once, when it begins and when it
//! ends. Spans (`tracing`) and metrics (`metrics`) go through their facades and reach
//! nothing until the program installs a subscriber or recorder; `OPERATIONS.md` lists
//! them. TLS needs the crate feature `tls`.
//!
//! # Bulk import, JSON lines and the command line
//!
//! [`Store::import`] loads many events into many streams with binary `COPY` in one
//! transaction, the fastest way to load history: versions are counted per stream from 0,
//! positions are consecutive, existing streams are refused unless
//! [`ImportOptions::continue_existing_streams`] is set, and on any error nothing is
//! written. [`Store::import_iter`] and [`Store::import_json_lines`] stream any number of
//! events with bounded memory: atomic up to [`MAX_EVENTS_PER_TRANSACTION`] events, and
//! with [`ImportOptions::chunked`] committed in transactions of that size beyond it.
//!
//! [`RecordedEvent`] serializes (serde) to one JSON object per event, and [`JsonLines`]
//! reads such lines back: the interchange format of the `pg-eventstore` command-line tool
//! (crate feature `cli`: `migrate`, `append`, `read`, `read-all`, `tail`, `export`,
//! `import`, `stats`, `schema`). [`Store::stats`] counts events and streams per category.
//!
//! # Stream lifecycle
//!
//! Events are immutable by the database's own rule: a trigger refuses `UPDATE`,
//! `TRUNCATE` and any `DELETE` that does not come through the statements below (it
//! guards against accidents, not against a superuser who means it). A stream has
//! metadata ([`Store::set_stream_metadata`]): a JSON object with a version of its own
//! and the reserved keys `$tb` (truncate before), `$maxCount` and `$maxAge`.
//! [`Store::delete_stream`] (soft) and [`Store::tombstone_stream`] (hard, for good)
//! append a marker event after the stream's head, atomically with respect to appends,
//! and then remove the stream's events in short batches; [`Store::truncate_stream`] and
//! [`Store::scavenge`] (retention) remove events the same way. `$all` readers and
//! subscriptions receive the marker; removed events stop being delivered, and events
//! already delivered are not recalled.
//!
//! # Bad input
//!
//! An empty or over-long stream id or event type, a NUL byte in text, `\u0000` in JSON,
//! or a schema name that is not a plain identifier is refused with
//! [`Error::InvalidInput`] or [`Error::Config`] before anything is sent. User text is
//! never formatted into SQL.
//!
//! # Module map
//!
//! One file per concept; each uses only those above it in this list (no module imports
//! one below it, and there are no cycles):
//!
//! | layer | files | what |
//! |---|---|---|
//! | values | `version`, `error`, `event`, `sql`, `jsonl`, `config`, `migrate` | versions, the one error type, events in and out, every SQL statement (the registry, built once per schema), JSON lines, settings, migrations |
//! | connections | `tls`, `connect`, `metrics`, `horizon`, `retry` | TLS, connecting within a deadline, metrics and spans, the `$all` horizon's data, the one backoff policy |
//! | services | `listener`, `health` | the wake-up hub (LISTEN, coalesced NOTIFY), health checks and outage events |
//! | the store | `store` | the pool, the statement cache, appends, and `Store::run` (checkout, prepare, query, error mapping, retry) |
//! | on the store | `read`, `feed`, `import`, `checkpoint`, `stats`, `subscription`, `processor`, `lifecycle`, `transaction` | reads, the feed's status and waits, bulk import, checkpoints, counts, subscriptions, processor admin, stream metadata, deletes and scavenging, your transactions on a store connection |
//! | workers | `worker` | handler threads over a subscription, with checkpoints |
//! | the tool | `main.rs` (feature `cli`) | the `pg-eventstore` command line, on the public API only |
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod checkpoint;
mod config;
mod connect;
mod error;
mod event;
mod feed;
mod group;
mod health;
mod horizon;
mod import;
mod jsonl;
mod lifecycle;
mod listener;
mod metrics;
mod migrate;
mod processor;
mod read;
mod retry;
mod sql;
mod stats;
mod store;
mod subscription;
mod tls;
mod transaction;
mod version;
mod worker;

pub use crate::checkpoint::{Tracker, MAX_PROCESSOR_NAME_BYTES};
pub use crate::config::{Config, DEFAULT_DATABASE_URL};
pub use crate::connect::Manager;
pub use crate::error::{Error, Result};
pub use crate::event::{
    AppendResult, EventData, ImportEvent, Json, RecordedEvent, MAX_EVENT_TYPE_BYTES,
    MAX_STREAM_ID_BYTES, STREAM_DELETED, STREAM_TOMBSTONE,
};
pub use crate::group::{
    ConsumerGroup, GroupHandle, GroupMember, GroupOptions, GroupPartition, GroupSummary,
};
pub use crate::health::{ConnectionEvent, HealthReport, PoolStatus};
pub use crate::horizon::{FeedStatus, HeldBack};
pub use crate::import::{ImportOptions, ImportSummary};
pub use crate::jsonl::JsonLines;
pub use crate::lifecycle::{
    DeleteResult, ScavengeReport, StreamMetadata, MAX_AGE, MAX_AGE_LIMIT_SECS, MAX_COUNT,
    REMOVE_BATCH, TRUNCATE_BEFORE,
};
pub use crate::listener::ListenerState;
pub use crate::migrate::{migration_sql, MigrationReport, SCHEMA_VERSION};
pub use crate::processor::{DeadLetter, GroupInfo, ProcessorInfo, ResetReport};
pub use crate::read::{Direction, Events, ReadAll, ReadStream};
pub use crate::sql::MAX_EVENTS_PER_TRANSACTION;
pub use crate::stats::{CategoryStats, Stats};
pub use crate::store::{Snapshot, Store};
pub use crate::subscription::{SubscribeOptions, Subscription, SubscriptionStopper};
pub use crate::transaction::{PreparedAppends, StoreConnection, StoreTransaction};
pub use crate::version::{ActualVersion, ExpectedVersion};
pub use crate::worker::{
    HandlerError, IfLocked, OnFailure, ReplaySummary, Worker, WorkerHandle, WorkerStopper,
    WorkerSummary,
};

// The crates whose types a caller must name to call the API: `postgres` for the
// transaction and client of `append_in` and friends, `r2d2` for the pool. Others that
// appear in signatures (`uuid::Uuid` ids, `serde_json::Value` data going in, the
// `crossbeam_channel::Receiver` of `Subscription::ready`) are the caller's own
// dependencies, at the major versions named in the README.
pub use postgres;
pub use r2d2;

/// The README's example compiles (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
