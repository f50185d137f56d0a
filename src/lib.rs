//! A blocking event store on PostgreSQL, for programs that are not async: batch jobs,
//! CLIs, scripts, workers and threaded services.
//!
//! Append events with optimistic concurrency, read streams forwards and backwards, and
//! read the whole log in a global order that never skips or repeats an event, with
//! nothing but an `r2d2` pool of `postgres` connections underneath.
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
//! id (`pg_current_xact_id()`) and `n` counts that transaction's events. A reader takes
//! its snapshot's `xmin`, the oldest transaction still running, and reads only positions
//! below `xmin << 20`: every transaction below `xmin` has ended, so no event can ever
//! appear below that line again. The set a reader sees below its horizon is final, the
//! horizon only moves forward, and so "events after the last position I saw" never skips
//! and never repeats one, while appends to different streams run concurrently with no
//! lock at all.
//!
//! What this costs, and what it means for you:
//!
//! * Positions are unique and increase in read order, but they are sparse and large
//!   (they start near `xid × 1,048,576`). Treat them as opaque numbers to compare and
//!   store. Events of one transaction get consecutive positions.
//! * One transaction can append at most [`MAX_EVENTS_PER_TRANSACTION`] (1,048,576) events.
//! * A `$all` reader sees an event once every transaction that started writing before
//!   it has ended. Any long-running *writing* transaction in the cluster (read-only
//!   transactions do not count) holds back `read_all` for as long as it runs. Stream reads
//!   ([`Store::read_stream`]) are not held back: they see every committed event at once.
//! * Transaction ids must only grow. They do in one cluster and through `pg_upgrade`, but
//!   a logical dump restored into a *new* cluster starts again from small ids: restore
//!   into a cluster whose transaction id is past the log's (`pg_resetwal -e/-x`), or the
//!   new events would sort before the old ones.
//!
//! # Reads hold a connection
//!
//! [`Events`] owns a pooled connection while it reads. The first page is a plain query;
//! a longer read continues through a server-side cursor in a read-only transaction, one
//! page per round trip, so memory stays flat. A cursor holds a snapshot, which holds back
//! VACUUM: see [`Events`] for how a long batch job avoids that.
//!
//! # Bulk import
//!
//! [`Store::import`] loads many events into many streams with one binary `COPY` in one
//! transaction, the fastest way to load history: versions are counted per stream from 0,
//! positions are consecutive, existing streams are refused unless
//! [`ImportOptions::continue_existing_streams`] is set, and on any error nothing is
//! written. One import holds at most [`MAX_EVENTS_PER_TRANSACTION`] events.
//!
//! # Bad input
//!
//! An empty or over-long stream id or event type, a NUL byte in text, `\u0000` in JSON,
//! or a schema name that is not a plain identifier is refused with
//! [`Error::InvalidInput`] or [`Error::Config`] before anything is sent. User text is
//! never formatted into SQL.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod checkpoint;
mod config;
mod error;
mod event;
mod import;
mod listener;
mod migrate;
mod read;
mod sql;
mod store;
mod subscription;
mod worker;

pub use crate::checkpoint::{Tracker, MAX_PROCESSOR_NAME_BYTES};
pub use crate::config::{Config, DEFAULT_DATABASE_URL};
pub use crate::error::{Error, Result};
pub use crate::event::{
    AppendResult, EventData, ExpectedVersion, RecordedEvent, MAX_EVENT_TYPE_BYTES,
    MAX_STREAM_ID_BYTES,
};
pub use crate::import::{ImportOptions, ImportSummary};
pub use crate::listener::ListenerState;
pub use crate::migrate::{migration_sql, MigrationReport, SCHEMA_VERSION};
pub use crate::read::{Direction, Events, ReadAll, ReadStream};
pub use crate::sql::MAX_EVENTS_PER_TRANSACTION;
pub use crate::store::{Snapshot, Store};
pub use crate::subscription::{SubscribeOptions, Subscription, SubscriptionStopper};
pub use crate::worker::{HandlerError, IfLocked, OnFailure, Worker, WorkerHandle, WorkerSummary};

pub use crossbeam_channel;
pub use postgres;
pub use r2d2;
pub use r2d2_postgres;
pub use serde_json;
pub use uuid;
