//! Processor administration: what a command-line tool or an operator needs to run
//! projections in production without touching the store's tables — list processors with
//! their position and lag, reset or delete their progress, list and delete dead letters —
//! and the advisory lock that lets one instance of a processor run at a time.
//!
//! Replaying dead letters needs the handler, so it is on the [`Worker`](crate::Worker):
//! [`Worker::replay_dead_letters`](crate::Worker::replay_dead_letters).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use postgres::types::Type;
use serde::Serialize;
use uuid::Uuid;

use crate::checkpoint::validate_processor_name;
use crate::error::{Error, Result};
use crate::store::{Conn, Store};

/// The advisory lock class of processors (with the hash of schema and processor name).
const LOCK_CLASS: i32 = 0x5045_5332; // "PES2"

/// One processor's progress, as [`Store::processors`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProcessorInfo {
    /// The processor name.
    pub name: String,
    /// Its checkpoint: every event up to this global position is done (`None`: none
    /// stored, it starts from the beginning).
    pub position: Option<u64>,
    /// When the checkpoint was last written.
    #[serde(serialize_with = "crate::event::serialize_time_opt")]
    pub updated_at: Option<SystemTime>,
    /// Events in the log after the checkpoint that `$all` readers can see now, whatever
    /// the processor's filters (a filtered processor moves its checkpoint past the events
    /// it skips, so its lag too falls to 0 once it has caught up).
    pub lag: u64,
    /// Streams with a per-stream claim of a transactional handler (exactly-once state).
    pub stream_claims: u64,
    /// Events parked in the dead-letter table.
    pub dead_letters: u64,
    /// Whether an instance of the processor runs now (holds its lock), in any process:
    /// a worker, or a member of a consumer group.
    pub is_running: bool,
    /// For a consumer group ([`Worker::group`](crate::Worker::group)): its partitions and
    /// live members. `position` is then its lowest partition checkpoint (`None` while a
    /// partition has none), `updated_at` its last checkpoint write, and `lag` the events
    /// after each partition's own checkpoint. [`Store::group_partitions`] and
    /// [`Store::group_members`] have the details.
    pub group: Option<GroupInfo>,
}

/// A consumer group's side of [`ProcessorInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// Its number of partitions.
    pub partitions: u32,
    /// Members whose lease is valid now, by the database's clock.
    pub live_members: u32,
}

/// What [`Store::reset_processor`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ResetReport {
    /// The checkpoint that was stored (`None`: there was none).
    pub checkpoint: Option<u64>,
    /// Per-stream claims removed.
    pub stream_claims: u64,
    /// Partition checkpoints of a consumer group removed (with its leases and members).
    pub partition_checkpoints: u64,
}

/// An event a worker's handler failed on and parked ([`OnFailure::Park`](crate::OnFailure::Park)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event's id.
    pub event_id: Uuid,
    /// Its stream.
    pub stream_id: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Its type (`None` if the event is no longer in the log).
    pub event_type: Option<String>,
    /// Handler calls made, the first one included.
    pub attempts: u32,
    /// The last error, with its causes.
    pub error: String,
    /// When it was parked (or last failed a replay).
    #[serde(serialize_with = "crate::event::serialize_time")]
    pub parked_at: SystemTime,
}

impl Store {
    /// Every processor that has a checkpoint, per-stream claims or dead letters, by name,
    /// with its position and lag. The lag is counted, so it costs a scan of the
    /// positions after each checkpoint: meant for operators and tools, not a hot loop.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// for p in store.processors()? {
    ///     println!("{} at {:?}, {} behind, running: {}", p.name, p.position, p.lag, p.is_running);
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn processors(&self) -> Result<Vec<ProcessorInfo>> {
        crate::retry::run(self.config(), self.pool(), "read", || {
            let mut conn = self.conn()?;
            let statement = self.prepared(&mut conn, &self.sql().list_processors)?;
            let prefix = lock_key(self, "");
            let known = self.known_horizon();
            let rows = conn
                .query(&statement, &[&LOCK_CLASS, &prefix, &known])
                .map_err(|e| self.map_error(e))?;
            let mut list: Vec<ProcessorInfo> = rows
                .iter()
                .map(|r| ProcessorInfo {
                    name: r.get(0),
                    position: r.get::<_, Option<i64>>(1).map(|p| p as u64),
                    updated_at: r.get(2),
                    lag: r.get::<_, i64>(3) as u64,
                    stream_claims: r.get::<_, i64>(4) as u64,
                    dead_letters: r.get::<_, i64>(5) as u64,
                    is_running: r.get(6),
                    group: None,
                })
                .collect();
            let statement = self.prepared(&mut conn, &self.sql().group.list_groups)?;
            for r in conn.query(&statement, &[]).map_err(|e| self.map_error(e))? {
                let name: String = r.get(0);
                let i = match list.iter().position(|p| p.name == name) {
                    Some(i) => i,
                    None => {
                        list.push(ProcessorInfo {
                            name,
                            position: None,
                            updated_at: None,
                            lag: 0,
                            stream_claims: 0,
                            dead_letters: 0,
                            is_running: false,
                            group: None,
                        });
                        list.len() - 1
                    }
                };
                let live_members = r.get::<_, i64>(5) as u32;
                let p = &mut list[i];
                p.position = r.get::<_, Option<i64>>(2).map(|p| p as u64);
                p.updated_at = r.get(3);
                p.lag = r.get::<_, i64>(4) as u64;
                p.is_running |= live_members > 0;
                p.group = Some(GroupInfo {
                    partitions: r.get::<_, i64>(1) as u32,
                    live_members,
                });
            }
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(list)
        })
    }

    /// Resets processor `name` so that its next run rebuilds from the first event: its
    /// checkpoint and its per-stream claims — and for a consumer group its partition
    /// checkpoints, leases and members (so it may start again with another partition
    /// count) — are removed in one transaction. Its dead letters stay ([`Store::delete_dead_letters`] removes them). A transactional
    /// projection's own tables are yours to empty, in the same deployment step.
    ///
    /// Refused with [`Error::ProcessorLocked`] while an instance of the processor (a
    /// worker or a group member) runs anywhere: stop it first, or its next checkpoint write would undo the reset.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let removed = store.reset_processor("balances")?;
    /// println!("was at {:?}, {} stream claims removed", removed.checkpoint, removed.stream_claims);
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn reset_processor(&self, name: &str) -> Result<ResetReport> {
        validate_processor_name(name)?;
        let _lock = ProcessorLock::try_acquire(self, name)?;
        let mut conn = self.conn()?;
        let sql = &self.sql();
        let mut tx = conn.transaction()?;
        let checkpoint = tx
            .query_opt(sql.delete_checkpoint.text(), &[&name])
            .map_err(|e| self.map_error(e))?
            .map(|r| r.get::<_, i64>(0) as u64);
        let stream_claims = tx
            .execute(sql.delete_stream_claims.text(), &[&name])
            .map_err(|e| self.map_error(e))?;
        let partition_checkpoints = tx
            .query_one(sql.group.reset.text(), &[&name])
            .map_err(|e| self.map_error(e))?
            .get::<_, i64>(0) as u64;
        tx.commit()?;
        Ok(ResetReport {
            checkpoint,
            stream_claims,
            partition_checkpoints,
        })
    }

    /// Deletes the checkpoint of processor `name` and returns it (`None`: there was
    /// none). Its next run starts from the first event; a transactional handler still
    /// skips the events its per-stream claims cover ([`Store::reset_processor`] removes
    /// those too). Refused with [`Error::ProcessorLocked`] while the processor runs.
    pub fn delete_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        validate_processor_name(name)?;
        let _lock = ProcessorLock::try_acquire(self, name)?;
        let row = self.run(
            "delete_checkpoint",
            &self.sql().delete_checkpoint,
            |c, s| c.query_opt(s, &[&name]),
        )?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// Moves the checkpoint of processor `name` to `position`, forwards or back, and
    /// returns the one it replaced (`None`: there was none). Its next run starts after
    /// `position`: give it [`Store::head_position`] to start from now, skipping the log
    /// so far (a new projection that only needs what comes next, or one stuck behind
    /// events to skip), or an earlier position to handle events again. A transactional
    /// handler still skips the events its per-stream claims cover
    /// ([`Store::reset_processor`] removes those).
    ///
    /// Refused with [`Error::ProcessorLocked`] while the processor runs (its next
    /// checkpoint write would undo the move), and with [`Error::InvalidInput`], writing
    /// nothing, for a position past the newest event (a checkpoint ahead of the log would
    /// skip events appended later) and for a consumer group, whose partitions have
    /// checkpoints of their own.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// if let Some(head) = store.head_position()? {
    ///     let was = store.move_checkpoint("welcome-mails", head)?;
    ///     println!("welcome-mails was at {was:?}, goes on after {head}");
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn move_checkpoint(&self, name: &str, position: u64) -> Result<Option<u64>> {
        let stored = crate::checkpoint::stored_position(name, position)?;
        let _lock = ProcessorLock::try_acquire(self, name)?;
        match self.head_position()? {
            Some(head) if position <= head => {}
            head => {
                return Err(Error::InvalidInput(format!(
                    "checkpoint {name:?}: position {position} is past the newest event ({}), \
                     so events appended later could be skipped",
                    head.map_or("none yet".to_string(), |h| h.to_string())
                )))
            }
        }
        let mut conn = self.conn()?;
        let sql = &self.sql();
        let mut tx = conn.transaction()?;
        let row = tx
            .query_one(sql.checkpoint_for_move.text(), &[&name])
            .map_err(|e| self.map_error(e))?;
        if row.get::<_, bool>(1) {
            return Err(Error::InvalidInput(format!(
                "{name:?} is a consumer group: its partitions have checkpoints of their \
                 own (reset_processor resets them)"
            )));
        }
        let old = row
            .get::<_, Option<i64>>(0)
            .and_then(|p| u64::try_from(p).ok());
        tx.execute(sql.save_checkpoint.text(), &[&name, &stored])
            .map_err(|e| self.map_error(e))?;
        tx.commit()?;
        Ok(old)
    }

    /// The dead letters of processor `name`, in the global order.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// for d in store.dead_letters("mailer")? {
    ///     println!("{} v{} after {} attempts: {}", d.stream_id, d.version, d.attempts, d.error);
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        validate_processor_name(name)?;
        let rows = self.run("read", &self.sql().list_dead_letters, |c, s| {
            c.query(s, &[&name])
        })?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                event_id: r.get(0),
                stream_id: r.get(1),
                version: r.get::<_, i64>(2) as u64,
                position: r.get::<_, i64>(3) as u64,
                event_type: r.get(4),
                attempts: r.get::<_, i32>(5) as u32,
                error: r.get(6),
                parked_at: r.get(7),
            })
            .collect())
    }

    /// Deletes one dead letter of processor `name`; `false` when there was none for
    /// that event.
    pub fn delete_dead_letter(&self, name: &str, event_id: Uuid) -> Result<bool> {
        validate_processor_name(name)?;
        let n = self.run(
            "delete_dead_letter",
            &self.sql().delete_dead_letter,
            |c, s| c.execute(s, &[&name, &event_id]),
        )?;
        Ok(n > 0)
    }

    /// Deletes every dead letter of processor `name`; returns how many there were.
    pub fn delete_dead_letters(&self, name: &str) -> Result<u64> {
        validate_processor_name(name)?;
        self.run(
            "delete_dead_letters",
            &self.sql().delete_dead_letters,
            |c, s| c.execute(s, &[&name]),
        )
    }
}

/// The advisory lock key of processor `name` in this store's schema.
fn lock_key(store: &Store, name: &str) -> String {
    format!("{}:{}", store.schema(), name)
}

/// A session advisory lock on a dedicated pooled connection, released on drop: one
/// instance of a processor at a time, across processes and machines. The members of a
/// consumer group hold it in shared mode: any number of them, but no worker of the same
/// name, and no reset, while one runs.
pub(crate) struct ProcessorLock {
    conn: Option<Conn>,
    key: String,
    shared: bool,
}

impl ProcessorLock {
    /// Takes the lock, or fails with [`Error::ProcessorLocked`].
    pub(crate) fn try_acquire(store: &Store, name: &str) -> Result<ProcessorLock> {
        Self::acquire(store, name, false, &AtomicBool::new(false))
    }

    /// Takes the lock; with `wait`, polls until it is free or `stop` is set.
    pub(crate) fn acquire(
        store: &Store,
        name: &str,
        wait: bool,
        stop: &AtomicBool,
    ) -> Result<ProcessorLock> {
        Self::take(store, name, false, wait, stop)
    }

    /// Takes the lock in shared mode (a consumer group member), like
    /// [`ProcessorLock::acquire`].
    pub(crate) fn acquire_shared(
        store: &Store,
        name: &str,
        wait: bool,
        stop: &AtomicBool,
    ) -> Result<ProcessorLock> {
        Self::take(store, name, true, wait, stop)
    }

    /// The connection that holds the lock: the lock lasts as long as its session.
    pub(crate) fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until drop")
    }

    fn take(
        store: &Store,
        name: &str,
        shared: bool,
        wait: bool,
        stop: &AtomicBool,
    ) -> Result<ProcessorLock> {
        let key = lock_key(store, name);
        let mut conn = store.conn()?;
        let sql = match shared {
            true => crate::sql::TRY_LOCK_PROCESSOR_SHARED,
            false => crate::sql::TRY_LOCK_PROCESSOR,
        };
        loop {
            let got: bool = conn.query_one(sql, &[&LOCK_CLASS, &key])?.get(0);
            if got {
                return Ok(ProcessorLock {
                    conn: Some(conn),
                    key,
                    shared,
                });
            }
            if !wait || stop.load(Ordering::Relaxed) {
                return Err(Error::ProcessorLocked {
                    name: name.to_string(),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How often a running worker checks the session that holds its processor lock.
const LOCK_CHECK: Duration = Duration::from_millis(250);

/// A running worker's [`ProcessorLock`], watched by a thread of its own that sends an
/// empty query on the lock's connection every [`LOCK_CHECK`]. A session lock lasts as
/// long as its session, and a session can end under a running worker: a network
/// failure, a server restart, `pg_terminate_backend`, or the server's
/// `idle_session_timeout` (which these checks keep from firing). Another instance can
/// then take the lock, so when a check fails the keeper sets the flag it was armed with
/// (the dispatcher's abort flag: the handler threads stop taking events at once) and
/// keeps the error for the worker to return. The worker writes its checkpoint through
/// the keeper's [`HeldLock`], on the lock's own session: a write can only succeed while
/// that session, and so the lock, lives. Dropping the keeper stops the thread and
/// releases the lock (once no [`HeldLock`] is left).
pub(crate) struct LockKeeper {
    held: HeldLock,
    stop: Option<Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct KeeperShared {
    abort: OnceLock<Arc<AtomicBool>>,
    /// Set once the lock's session is known to have ended.
    is_lost: AtomicBool,
    /// Why, for the worker to return (taken once).
    lost: Mutex<Option<postgres::Error>>,
}

/// A running worker's processor lock, shared by its keeper's thread, its checkpoint
/// [`Tracker`](crate::Tracker) and its handler threads: statements sent through it run on
/// the session that holds the lock, so they fail once it has ended.
#[derive(Clone)]
pub(crate) struct HeldLock {
    lock: Arc<Mutex<ProcessorLock>>,
    shared: Arc<KeeperShared>,
    timeout: Duration,
}

impl HeldLock {
    /// Whether the lock is still held: an empty query on its session, with the keeper's
    /// timeout. A failure marks the lock lost (and aborts the worker's handlers).
    pub(crate) fn check(&self) -> bool {
        if self.is_lost() {
            return false;
        }
        let mut lock = self.lock.lock().unwrap();
        match lock.conn().is_valid(self.timeout) {
            Ok(()) => true,
            Err(e) => {
                self.lose(Some(e));
                false
            }
        }
    }

    /// Stores the checkpoint of processor `name` on the lock's session, so only while
    /// the lock is held; `false`, writing nothing, once the lock is known to be lost.
    /// Transient failures that leave the session open are retried on it (see
    /// [`Config::max_retries`](crate::Config::max_retries)); a failure that ended the
    /// session marks the lock lost and is [`Error::ProcessorLockLost`].
    pub(crate) fn save_checkpoint(&self, store: &Store, name: &str, position: u64) -> Result<bool> {
        let position = crate::checkpoint::stored_position(name, position)?;
        let mut retry = crate::retry::Retry::new(store.config(), "save_checkpoint");
        loop {
            let error = {
                let mut lock = self.lock.lock().unwrap();
                if self.is_lost() {
                    return Ok(false);
                }
                let conn = lock.conn();
                // With the parameter types given, one round trip and nothing to prepare.
                let written = conn.query_typed(
                    store.sql().save_checkpoint.text(),
                    &[(&name, Type::TEXT), (&position, Type::INT8)],
                );
                match written {
                    Ok(_) => return Ok(true),
                    Err(e) if conn.is_closed() => {
                        self.lose(None);
                        return Err(Error::ProcessorLockLost {
                            name: name.to_string(),
                            source: e,
                        });
                    }
                    Err(e) => store.map_error(e),
                }
            };
            // Waits (if at all) without holding the lock's connection.
            if !retry.again(&error) {
                return Err(error);
            }
        }
    }

    fn is_lost(&self) -> bool {
        self.shared.is_lost.load(Ordering::Relaxed)
    }

    /// Marks the lock lost, keeping `error` (the first one) for the worker, and sets the
    /// abort flag.
    fn lose(&self, error: Option<postgres::Error>) {
        let mut lost = self.shared.lost.lock().unwrap();
        if !self.shared.is_lost.swap(true, Ordering::Relaxed) {
            *lost = error;
        }
        if let Some(abort) = self.shared.abort.get() {
            abort.store(true, Ordering::Relaxed);
        }
    }
}

impl LockKeeper {
    /// Starts watching `lock`; a check that gets no answer within `timeout` fails.
    pub(crate) fn start(lock: ProcessorLock, timeout: Duration) -> LockKeeper {
        let held = HeldLock {
            lock: Arc::new(Mutex::new(lock)),
            shared: Arc::new(KeeperShared::default()),
            timeout,
        };
        let (stop, stopped) = bounded::<()>(0);
        let watch = held.clone();
        let thread = thread::Builder::new()
            .name("pg-eventstore-lock".into())
            .spawn(move || loop {
                if stopped.recv_timeout(LOCK_CHECK) != Err(RecvTimeoutError::Timeout) {
                    return; // dropped
                }
                if !watch.check() {
                    return;
                }
            })
            .expect("spawn the processor lock keeper");
        LockKeeper {
            held,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The lock, for checkpoint writes and checks on its session.
    pub(crate) fn held(&self) -> HeldLock {
        self.held.clone()
    }

    /// Sets `abort` when the lock is lost (at once if it already is).
    pub(crate) fn arm(&self, abort: Arc<AtomicBool>) {
        let _ = self.held.shared.abort.set(abort.clone());
        if self.held.is_lost() {
            abort.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the lock is known to be lost.
    pub(crate) fn is_lost(&self) -> bool {
        self.held.is_lost()
    }

    /// The failure that lost the lock, once (`None` also when a checkpoint write found it
    /// lost and returned it already).
    pub(crate) fn take_lost(&self) -> Option<postgres::Error> {
        self.held.shared.lost.lock().unwrap().take()
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // `held` drops next: the last holder of the lock releases it.
    }
}

impl Drop for ProcessorLock {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // A session lock outlives the caller on a pooled connection: release it, or
            // close the connection if that fails.
            let sql = match self.shared {
                true => crate::sql::UNLOCK_PROCESSOR_SHARED,
                false => crate::sql::UNLOCK_PROCESSOR,
            };
            let released = conn.query_one(sql, &[&LOCK_CLASS, &self.key]);
            if released.is_err() {
                let _ = conn.batch_execute(crate::sql::TERMINATE_SELF);
            }
        }
    }
}
