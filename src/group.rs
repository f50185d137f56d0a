//! Consumer groups: several processes, on one machine or many, share one processor name,
//! each owning a part of the streams, with per-stream order and (with a transactional
//! handler) exactly-once effects kept. Built on PostgreSQL alone: members, leases and
//! checkpoints are rows in the store's schema, and the database's clock decides when a
//! lease lapses.
//!
//! The protocol and what happens on failures — a crash, a pause past the lease (split
//! brain), clock skew, a database restart — are documented on [`ConsumerGroup`], where the
//! rendered docs show them to users.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, Receiver, Sender};
use postgres::{Statement, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::processor::ProcessorLock;
use crate::sql::GroupSql;
use crate::store::{Conn, Store};
use crate::worker::{
    Dispatcher, Done, Fence, Handler, HandlerError, IfLocked, Job, Lease, Outcome, Worker,
    WorkerStopper,
};

/// The advisory lock class (with the hash of schema and group name) that serialises
/// members joining a group, so that the first one alone creates its partitions.
const JOIN_LOCK_CLASS: i32 = 0x5045_5333; // "PES3"
/// The longest a round waits for a wake-up when it has nothing to read.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The wait between reads while committed events wait behind an open transaction.
const HELD_BACK_WAIT: Duration = Duration::from_millis(5);
/// How long the coordinator waits for room on a full handler queue before it looks
/// after its leases again.
const SEND_WAIT: Duration = Duration::from_millis(20);
/// The most events queued on one handler thread of a member (twice its transaction
/// batch).
const QUEUE_PER_THREAD: usize = 512;
/// The share of the lease timeout a member trusts its lease for, counted by its own
/// clock from before it sent the renewal.
const TRUST: f64 = 0.9;

/// The longest [`GroupOptions::member_info`] accepted, in bytes.
const MAX_MEMBER_INFO_BYTES: usize = 4096;

/// How a consumer group shares out its partitions: made by [`GroupOptions::new`] and
/// given to [`Worker::group`].
#[derive(Clone, Debug)]
pub struct GroupOptions {
    partitions: u32,
    lease_timeout: Duration,
    heartbeat_interval: Duration,
    member_info: Option<String>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            partitions: 64,
            lease_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            member_info: None,
        }
    }
}

impl GroupOptions {
    /// The defaults: 64 partitions, a 10 s lease timeout, a heartbeat every second.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of partitions (1 to 4,096). Default 64. The first member of a group
    /// decides; a member with another count is refused with [`Error::Config`]. More
    /// partitions than members let shares stay even as members come and go.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// How long a member's leases last without a heartbeat, by the database's clock:
    /// the takeover time after a member dies, and the longest pause a member survives.
    /// Default 10 s; at least 3 heartbeat intervals.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = timeout;
        self
    }

    /// How often a member renews its leases and looks at the group (joins, leaves,
    /// takeovers, its share). Default 1 s.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// A text that names this member in [`Store::group_members`] (a host and pod name,
    /// say). Default: the host name and process id. At most 4,096 bytes, without NUL
    /// bytes: the member's start refuses others with [`Error::InvalidInput`], before
    /// anything is written.
    pub fn member_info(mut self, info: impl Into<String>) -> Self {
        self.member_info = Some(info.into());
        self
    }

    fn validate(&self) -> Result<()> {
        if let Some(info) = self.member_info.as_deref().filter(|i| !i.is_empty()) {
            crate::event::validate_text("member info", info, MAX_MEMBER_INFO_BYTES)
                .map_err(Error::InvalidInput)?;
        }
        if !(1..=4096).contains(&self.partitions) {
            return Err(Error::Config(format!(
                "a consumer group needs 1 to 4096 partitions, not {}",
                self.partitions
            )));
        }
        if self.heartbeat_interval.is_zero()
            || self.lease_timeout < self.heartbeat_interval * 3
            || self.lease_timeout < Duration::from_millis(100)
        {
            return Err(Error::Config(format!(
                "a consumer group's lease timeout ({:?}) must be at least 100 ms and three \
                 heartbeat intervals ({:?})",
                self.lease_timeout, self.heartbeat_interval
            )));
        }
        Ok(())
    }

    fn lease_ms(&self) -> i64 {
        self.lease_timeout.as_millis() as i64
    }

    fn info(&self) -> String {
        self.member_info.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_default();
            format!("{} pid {}", host.trim(), std::process::id())
        })
    }
}

impl Worker {
    /// Makes this worker a member of the consumer group named like the processor: every
    /// process that starts a member with the same name shares the streams with the
    /// others (see [`ConsumerGroup`]). The worker's settings apply to each member:
    /// threads, filters, checkpoint interval, retries, failure policy, transaction
    /// batches, and [`Worker::if_locked`] against a [`Worker`] of the same name.
    pub fn group(self, options: GroupOptions) -> ConsumerGroup {
        ConsumerGroup {
            worker: self,
            options,
        }
    }
}

/// A member of a consumer group, ready to start: made by [`Worker::group`].
///
/// Start one in each process; members find each other through the database. Each
/// member owns a share of the group's partitions (a stream's events are all in one
/// partition), handles their events in per-stream order on its worker's threads, and
/// keeps a checkpoint per partition. Members join, leave and die at any time: a new
/// member gets its share within a few heartbeat intervals, a dead one's partitions are
/// taken over after the lease timeout: see below for how, and for what a member paused
/// past its lease can and cannot do (split brain).
///
/// ```no_run
/// # use std::time::Duration;
/// # use pg_eventstore::{GroupOptions, OnFailure, Store, Worker};
/// # let store = Store::from_env()?;
/// let member = store
///     .worker("balances")
///     .threads(2)
///     .on_failure(OnFailure::Park)
///     .group(GroupOptions::new().lease_timeout(Duration::from_secs(10)))
///     .spawn_transactional(|tx, event| {
///         let upsert = Worker::prepare_cached(
///             tx,
///             "INSERT INTO balances VALUES ($1, 1)
///              ON CONFLICT (account) DO UPDATE SET n = balances.n + 1",
///         )?;
///         tx.execute(&upsert, &[&event.stream_id])?;
///         Ok(())
///     })?;
/// println!("member {} holds {:?}", member.member_id(), member.partitions());
/// // ... on shutdown: finishes what it read, checkpoints, hands its partitions over.
/// let summary = member.stop()?;
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
///
/// # How it works
///
/// * **Partitions.** A group has a fixed number of partitions (64 by default, chosen by
///   its first member and stored with it). A stream belongs to partition
///   `md5(stream_id)`'s first 32 bits modulo that number: stable across PostgreSQL
///   versions and platforms, so a stream never changes partition. All of a stream's
///   events are in one partition, so one member at a time handles a stream, in order.
/// * **Members.** A member joins with a fresh random id and a row in `group_members`
///   whose `expires_at` is the database's `clock_timestamp()` plus the lease timeout. A
///   heartbeat thread renews it every [`GroupOptions::heartbeat_interval`]. A member
///   whose row has expired is removed by the next member that looks (every member looks
///   on each of its rounds); a member id is never used again, so a removed member that
///   wakes up finds itself gone, drops everything it held and joins again as a new member.
/// * **Leases.** Each partition has a row in `group_leases` with its owner and an
///   `epoch` that counts its acquisitions. A lease is valid as long as its owner's member
///   row is there: one heartbeat renews all of a member's leases. A partition is free
///   when it has no owner or its owner is no longer a member; taking it sets the owner
///   and increments the epoch, in one statement that skips rows another transaction has
///   locked.
/// * **Fair shares and rebalancing.** On every round (once per heartbeat interval) a
///   member lists the live members (in the order they joined) and computes its share:
///   `partitions / members`, one more for the first `partitions % members`. Below its
///   share it takes free partitions; above it, it stops reading the surplus, lets the
///   events already read of those partitions finish, writes their checkpoints, and only
///   then releases them, in one transaction. A new member thus gets its share within a
///   few rounds, and no partition is ever handled by two members that both hold it.
/// * **Checkpoints per partition.** `group_checkpoints` holds one position per partition:
///   every event of that partition up to it is done. It moves with what the member has
///   read, not only with what it handled, so it passes the events of other partitions
///   (and of filtered-out types). A member reads the events of its partitions with one
///   `$all` read per page (below the feed horizon, like every `$all` reader); a partition
///   it has just taken from an older checkpoint is read on its own until it has caught up
///   with the others. A member that takes a partition starts after its checkpoint.
///
/// # Failures
///
/// **A member dies** (`kill -9`, a crash, a lost machine): its heartbeats stop, its row
/// expires after the lease timeout, the next member to look removes it, and its
/// partitions are free; the other members take them (up to their new shares) from the
/// partitions' checkpoints. Takeover time is the lease timeout plus up to one heartbeat
/// interval. Events the dead member had handled after its last checkpoint are handled
/// again: a transactional handler skips them (its per-stream claims committed with the
/// effects), a plain handler sees them again (at-least-once, in order).
///
/// **A member stops cleanly** ([`GroupHandle::stop`]): it finishes the events it has
/// read, writes its checkpoints, releases its partitions and leaves; the others take
/// them at their next round, without waiting for a timeout.
///
/// **Split brain: a member that was paused for longer than its lease** (a long GC or
/// swap pause, `SIGSTOP`, a VM migration, a network partition between it and the
/// database) comes back believing it still holds partitions that others have taken.
/// What it may still do:
///
/// * *Transactional handlers are fenced.* Every handler transaction first locks the
///   lease rows of its events' partitions (`FOR SHARE`) and checks that this member still
///   holds them with the epoch it read them under; events of partitions it no longer
///   holds are left out (not handled, not claimed) and the member drops their partitions.
///   A takeover changes the owner and epoch with an `UPDATE` that cannot commit while
///   such a lock is held, and skips the row until the transaction ends. So every handler
///   transaction either commits before the takeover (and the new owner, reading the
///   per-stream claims, skips what it committed) or finds the new epoch and writes
///   nothing. **No effect of a handler transaction commits after another member took its
///   partition**, whatever the clocks say and however long the pause. Checkpoint writes
///   and releases are fenced the same way. The cost: a member paused *inside* a handler
///   transaction holds its partitions' lease rows until the transaction ends, and they
///   cannot be taken over until then. A member cut off from the database by a network
///   partition keeps its transaction open until the server notices the dead connection:
///   set `idle_in_transaction_session_timeout` and TCP keepalives on the server to
///   bound that.
/// * *Plain handlers are not fenced*: their effects happen outside the database.
///   A member calls a plain handler only while its own lease is valid by its own
///   monotonic clock: from the moment it *sent* the last successful renewal, for 90 % of
///   the lease timeout (the database starts the timeout later than that, when it runs
///   the renewal). Once that passes without a renewal, its handler threads wait; a
///   renewal that finds the member still there (and its epochs unchanged) lets them go
///   on, and one that finds it removed drops all its partitions. So a plain handler call
///   can overlap with the new owner's calls only if it **started** before the deadline
///   and is still running, or paused, after the lease lapsed in the database: a pause
///   (or a handler call) longer than the remaining 10 % of the lease timeout, in the
///   middle of a handler call. Plain handlers get at-least-once delivery and per-stream
///   order within one owner's tenure; make their effects idempotent, or use the
///   transactional handler, where overlap must be impossible.
///
/// **Clock skew.** Expiry is decided by the database's `clock_timestamp()` alone: the
/// members' wall clocks never meet, and may be hours apart. A member measures its own
/// deadline with its monotonic clock, from before it sent the renewal, so it gives up
/// before the database lets its lease lapse as long as the two clocks run at about the
/// same *rate* (any real clock does: the 10 % margin is far above drift). A **step** of
/// the database server's clock (a manual change, an NTP step rather than a slew) moves
/// every expiry at once: a forward step can let leases lapse early; transactional
/// handlers stay fenced, plain handlers can overlap for the size of the step. Run the
/// database server with a slewing time daemon.
///
/// **The database restarts (or fails over).** Connections break: handler transactions
/// roll back (and are retried with the worker's retries), heartbeats and rounds fail and
/// are retried on the next interval, and the member rows, leases and checkpoints are as
/// last committed (they are ordinary logged tables). If the database is back within the
/// lease timeout, the first renewal succeeds and every member goes on with the
/// partitions it had. If it stays away longer, every member's own deadline passes first
/// (plain handlers wait), the members expire in the database too, and when it is back
/// the first member to look removes the others; each then finds itself removed, drops its
/// partitions and joins again, and the partitions are shared out afresh from their
/// checkpoints. A member whose handler transactions keep failing for longer than its
/// [`Worker::retries`] allow stops with the error (as a [`Worker`] does): raise the
/// retries for members that must ride out a restart. The shared advisory lock that keeps
/// a [`Worker`] of the same name away is taken again on the heartbeat's new connection;
/// if a worker or a reset took it meanwhile, the member stops with
/// [`Error::ProcessorLocked`], at once: the events queued on its threads are left
/// unhandled, for the next owner.
///
/// A [`Worker`] and a group with the same name exclude each other (the processor's
/// advisory lock, taken shared by every member), and [`Store::reset_processor`] is
/// refused while a member runs; it removes the group's checkpoints, leases and members
/// with the rest, which is also how a group changes its partition count.
pub struct ConsumerGroup {
    worker: Worker,
    options: GroupOptions,
}

impl fmt::Debug for ConsumerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerGroup")
            .field("name", &self.worker.name)
            .field("options", &self.options)
            .finish()
    }
}

impl ConsumerGroup {
    /// Joins the group and starts handling on the worker's threads with a plain handler:
    /// at-least-once, per-stream order (see [`ConsumerGroup`] on what a paused member may
    /// still do). Returns once joined: a group created with another partition count, or
    /// a running [`Worker`] of the same name, is this call's error. With
    /// [`IfLocked::Wait`] it returns at once instead, and the member waits for the
    /// worker to stop and joins on its own thread (a stop ends the wait; an error ends
    /// the member, and [`GroupHandle::join`] returns it).
    pub fn spawn<H>(self, handler: H) -> Result<GroupHandle>
    where
        H: Fn(&RecordedEvent) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.start(Handler::Plain(Arc::new(handler)))
    }

    /// Like [`ConsumerGroup::spawn`] with a handler that writes in the transaction that
    /// claims each event for the group and checks the member's lease: exactly-once
    /// effects, across crashes, takeovers and rebalances, and none after the member lost
    /// the event's partition.
    pub fn spawn_transactional<H>(self, handler: H) -> Result<GroupHandle>
    where
        H: Fn(&mut Transaction<'_>, &RecordedEvent) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.start(Handler::Tx(Arc::new(handler)))
    }

    fn start(self, handler: Handler) -> Result<GroupHandle> {
        self.worker.check()?;
        self.options.validate()?;
        let name = self.worker.name.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            name: name.clone(),
            identity: Mutex::new(Identity {
                id: Uuid::now_v7(),
                valid_until: Instant::now(),
                expelled: false,
            }),
            held: RwLock::new(HashMap::new()),
            stop: stop.clone(),
            fatal: Mutex::new(None),
            abort: OnceLock::new(),
            lease_timeout: self.options.lease_timeout,
        });
        let ConsumerGroup { worker, options } = self;
        // With `IfLocked::Fail` the lock is taken and the group joined here, so that
        // "already running" and a wrong partition count are this call's errors. With
        // `IfLocked::Wait` both happen on the member's thread, where a stop ends the
        // wait: the handle comes back at once.
        let joined = match worker.if_locked {
            IfLocked::Fail => Some(join_group(&worker, &options, &shared, false)?),
            IfLocked::Wait => None,
        };
        let member_shared = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("pg-eventstore-group-{name}"))
            .spawn(move || {
                let shared = member_shared;
                let (lock, partitions) = match joined {
                    Some(joined) => joined,
                    None => match join_group(&worker, &options, &shared, true) {
                        Ok(joined) => joined,
                        Err(Error::ProcessorLocked { .. })
                            if shared.stop.load(Ordering::Relaxed) =>
                        {
                            return Ok(GroupSummary::default()); // stopped while waiting
                        }
                        Err(e) => return Err(e),
                    },
                };
                let store = &worker.store;
                let membership = Membership::start(store, shared.clone(), lock, &options);
                let member = Member {
                    store: store.clone(),
                    options,
                    shared,
                    partitions,
                    parts: BTreeMap::new(),
                    buffer: VecDeque::new(),
                    seq: 0,
                    summary: GroupSummary::default(),
                    next_round: Instant::now(),
                    last_checkpoint: Instant::now(),
                    wake: {
                        let (id, wake, _) = store.hub().subscribe(false);
                        (id, wake)
                    },
                    took: false,
                };
                member.run(&worker, handler, membership)
            })
            .expect("spawn the group member thread");
        Ok(GroupHandle {
            stop,
            shared,
            thread: Some(thread),
        })
    }
}

/// Takes the processor lock in shared mode and joins the group with the member's id;
/// returns the lock and the number of partitions. With `wait`, waits while a [`Worker`]
/// of the same name holds the lock, until it is free or the member is stopped
/// ([`Error::ProcessorLocked`] then), retrying transient failures.
fn join_group(
    worker: &Worker,
    options: &GroupOptions,
    shared: &Shared,
    wait: bool,
) -> Result<(ProcessorLock, u32)> {
    let store = &worker.store;
    let mut backoff = crate::retry::Backoff::new(worker.retry_delay, crate::retry::MAX_DELAY);
    let lock = loop {
        match ProcessorLock::acquire_shared(store, &shared.name, wait, &shared.stop) {
            Ok(lock) => break lock,
            Err(e) if wait && e.is_transient() && !shared.stop.load(Ordering::Relaxed) => {
                thread::sleep(backoff.next_delay());
            }
            Err(e) => return Err(e),
        }
    };
    let sent = Instant::now();
    let partitions = join(store, &shared.name, options, shared.id())?;
    shared.identity.lock().unwrap().valid_until = sent + options.lease_timeout.mul_f64(TRUST);
    Ok((lock, partitions))
}

/// What a consumer group member did, from [`GroupHandle::stop`] or
/// [`GroupHandle::join`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSummary {
    /// Events the handler finished.
    pub handled: u64,
    /// Events a transactional handler found already committed (after a takeover or a
    /// crash): skipped.
    pub skipped: u64,
    /// Events parked in the dead-letter table.
    pub parked: u64,
    /// Handler calls that failed and were retried.
    pub retries: u64,
    /// Partitions this member took.
    pub acquired: u64,
    /// Partitions it handed over (rebalancing, and on stop).
    pub released: u64,
    /// Partitions it lost: taken by another member after its lease lapsed.
    pub lost: u64,
    /// Events it dropped unhandled because their partition's lease was gone (the fence).
    pub revoked: u64,
    /// Times it found itself removed from the group and joined again as a new member.
    pub rejoined: u64,
}

/// A running consumer group member. [`GroupHandle::stop`] ends it cleanly: the events
/// it read are finished, its checkpoints written, its partitions handed over. Dropping
/// the handle does the same.
pub struct GroupHandle {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<GroupSummary>>>,
}

impl fmt::Debug for GroupHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupHandle")
            .field("group", &self.shared.name)
            .field("member_id", &self.member_id())
            .field("running", &self.is_running())
            .finish()
    }
}

impl GroupHandle {
    /// The member's id in [`Store::group_members`] (a new one after it rejoined; the one
    /// it will join with while it waits for its lock, see [`IfLocked::Wait`]).
    pub fn member_id(&self) -> Uuid {
        self.shared.identity.lock().unwrap().id
    }

    /// The partitions this member holds now.
    pub fn partitions(&self) -> Vec<u32> {
        let mut held: Vec<u32> = self
            .shared
            .held
            .read()
            .unwrap()
            .keys()
            .map(|p| *p as u32)
            .collect();
        held.sort_unstable();
        held
    }

    /// A cloneable handle that stops this member from anywhere (a signal handler).
    pub fn stopper(&self) -> WorkerStopper {
        WorkerStopper::new(self.stop.clone())
    }

    /// Whether the member is still running (it stops on its own after a fatal error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the member and waits for it. Returns what it did, or the error that
    /// stopped it.
    pub fn stop(mut self) -> Result<GroupSummary> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits until the member ends (after a stop request or a fatal error).
    pub fn join(mut self) -> Result<GroupSummary> {
        self.wait()
    }

    fn wait(&mut self) -> Result<GroupSummary> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::HandlerPanicked {
                    processor: self.shared.name.clone(),
                })
            }),
            None => Ok(GroupSummary::default()),
        }
    }
}

impl Drop for GroupHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wait();
    }
}

/// One member of a group, as [`Store::group_members`] lists it. In JSON (`serde`), times
/// are RFC 3339 and `expires_in` is in seconds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupMember {
    /// Its id (new each time a member joins).
    pub member_id: Uuid,
    /// What it said about itself ([`GroupOptions::member_info`]).
    pub info: String,
    /// When it joined.
    #[serde(serialize_with = "crate::event::serialize_time")]
    pub joined_at: SystemTime,
    /// Its last heartbeat, by the database's clock.
    #[serde(serialize_with = "crate::event::serialize_time")]
    pub heartbeat_at: SystemTime,
    /// Whether its lease is still valid by the database's clock. An expired member is
    /// removed by the next member that looks, and its partitions are free.
    pub is_alive: bool,
    /// How long its lease still lasts without a heartbeat (zero when it has expired).
    #[serde(serialize_with = "crate::event::serialize_seconds")]
    pub expires_in: Duration,
    /// The partitions it holds.
    pub partitions: Vec<u32>,
}

/// One partition of a group, as [`Store::group_partitions`] lists it. In JSON (`serde`),
/// times are RFC 3339.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct GroupPartition {
    /// The partition number.
    pub partition: u32,
    /// The member holding it, if any.
    pub owner: Option<Uuid>,
    /// Whether that member is alive (`false`: free for the taking).
    pub owner_alive: bool,
    /// How often it has been acquired: the fencing token of its current lease.
    pub epoch: u64,
    /// When its owner took it.
    #[serde(serialize_with = "crate::event::serialize_time_opt")]
    pub acquired_at: Option<SystemTime>,
    /// Its checkpoint: every event of this partition up to this global position is done.
    pub position: Option<u64>,
    /// When the checkpoint was last written.
    #[serde(serialize_with = "crate::event::serialize_time_opt")]
    pub updated_at: Option<SystemTime>,
    /// Events of this partition after its checkpoint that `$all` readers can see now
    /// (whatever the group's filters).
    pub lag: u64,
}

impl Store {
    /// The members of consumer group `name`: who holds which partitions, and how fresh
    /// their heartbeats are (by the database's clock).
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// for m in store.group_members("balances")? {
    ///     println!("{} ({}): {} partitions, alive: {}", m.member_id, m.info, m.partitions.len(), m.is_alive);
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn group_members(&self, name: &str) -> Result<Vec<GroupMember>> {
        crate::checkpoint::validate_processor_name(name)?;
        crate::retry::run(self.config(), self.pool(), "read", || {
            let mut conn = self.conn()?;
            let statement = statement(self, &mut conn, S::ListMembers)?;
            let rows = conn
                .query(&statement, &[&name])
                .map_err(|e| self.map_error(e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let expires_in: f64 = r.get(4);
                    GroupMember {
                        member_id: r.get(0),
                        info: r.get(1),
                        joined_at: r.get(2),
                        heartbeat_at: r.get(3),
                        is_alive: expires_in >= 0.0,
                        expires_in: Duration::try_from_secs_f64(expires_in).unwrap_or_default(),
                        partitions: r
                            .get::<_, Vec<i32>>(5)
                            .into_iter()
                            .map(|p| p as u32)
                            .collect(),
                    }
                })
                .collect())
        })
    }

    /// The partitions of consumer group `name` with owner, epoch, checkpoint and lag
    /// (empty when no member ever joined). The lag is counted in one scan from the
    /// lowest checkpoint: meant for operators, not a hot loop.
    pub fn group_partitions(&self, name: &str) -> Result<Vec<GroupPartition>> {
        crate::checkpoint::validate_processor_name(name)?;
        crate::retry::run(self.config(), self.pool(), "read", || {
            let mut conn = self.conn()?;
            let statement = statement(self, &mut conn, S::ListPartitions)?;
            let rows = conn
                .query(&statement, &[&name])
                .map_err(|e| self.map_error(e))?;
            Ok(rows
                .iter()
                .map(|r| GroupPartition {
                    partition: r.get::<_, i32>(0) as u32,
                    owner: r.get(1),
                    owner_alive: r.get::<_, Option<bool>>(4).unwrap_or(false),
                    epoch: r.get::<_, i64>(2) as u64,
                    acquired_at: r.get(3),
                    position: r.get::<_, Option<i64>>(5).map(|p| p as u64),
                    updated_at: r.get(6),
                    lag: r.get::<_, i64>(7) as u64,
                })
                .collect())
        })
    }
}

/// The group statements (in `GroupSql`), each prepared once per pooled connection: the
/// one way this file reaches its SQL.
#[derive(Clone, Copy, Debug)]
enum S {
    CreatePartitions,
    CountPartitions,
    Join,
    Heartbeat,
    LiveMembers,
    MyLeases,
    Acquire,
    SaveCheckpoints,
    Release,
    Leave,
    Fence,
    Read,
    ListMembers,
    ListPartitions,
}

fn statement(store: &Store, conn: &mut Conn, s: S) -> Result<Statement> {
    let g: &GroupSql = &store.sql().group;
    let statement = match s {
        S::CreatePartitions => &g.create_partitions,
        S::CountPartitions => &g.count_partitions,
        S::Join => &g.join,
        S::Heartbeat => &g.heartbeat,
        S::LiveMembers => &g.live_members,
        S::MyLeases => &g.my_leases,
        S::Acquire => &g.acquire,
        S::SaveCheckpoints => &g.save_checkpoints,
        S::Release => &g.release,
        S::Leave => &g.leave,
        S::Fence => &g.fence,
        S::Read => &g.read,
        S::ListMembers => &g.list_members,
        S::ListPartitions => &g.list_partitions,
    };
    store.prepared(conn, statement)
}

/// Joins group `name` as member `id`: creates its partitions if it has none (the first
/// member), checks that it has the configured number, and inserts the member row.
/// Returns the number of partitions.
fn join(store: &Store, name: &str, options: &GroupOptions, id: Uuid) -> Result<u32> {
    crate::retry::run(store.config(), store.pool(), "group_join", || {
        let mut conn = store.conn()?;
        let create = statement(store, &mut conn, S::CreatePartitions)?;
        let count = statement(store, &mut conn, S::CountPartitions)?;
        let insert = statement(store, &mut conn, S::Join)?;
        let key = format!("{}:{}", store.schema(), name);
        let n = options.partitions as i32;
        let run = |conn: &mut Conn| -> std::result::Result<i64, postgres::Error> {
            let mut tx = conn.transaction()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&JOIN_LOCK_CLASS, &key],
            )?;
            tx.execute(&create, &[&name, &n])?;
            let found: i64 = tx.query_one(&count, &[&name])?.get(0);
            if found == n as i64 {
                tx.execute(&insert, &[&name, &id, &options.info(), &options.lease_ms()])?;
                tx.commit()?;
            }
            Ok(found)
        };
        let found = run(&mut conn).map_err(|e| store.map_error(e))?;
        if found != n as i64 {
            return Err(Error::Config(format!(
                "consumer group {name:?} has {found} partitions, but this member was \
                 configured with {n}: every member must use the same count \
                 (reset_processor removes the group, to start again with another)"
            )));
        }
        Ok(options.partitions)
    })
}

/// Who this member is, and until when its leases are valid by its own clock.
#[derive(Debug)]
struct Identity {
    id: Uuid,
    valid_until: Instant,
    /// Its row was found gone: everything it held is void; it must join again.
    expelled: bool,
}

/// What the coordinator, the heartbeat thread and the handler threads of one member
/// share.
struct Shared {
    name: String,
    identity: Mutex<Identity>,
    /// The partitions this member holds, with their epochs.
    held: RwLock<HashMap<i32, i64>>,
    stop: Arc<AtomicBool>,
    /// An error that must stop the member (the heartbeat could not take the processor
    /// lock again).
    fatal: Mutex<Option<Error>>,
    /// The dispatcher's abort flag, set with `fatal`: the handler threads stop at once,
    /// leaving what is queued unhandled.
    abort: OnceLock<Arc<AtomicBool>>,
    lease_timeout: Duration,
}

impl Shared {
    fn id(&self) -> Uuid {
        self.identity.lock().unwrap().id
    }

    /// A renewal of member `id`, sent at `sent`, succeeded.
    fn renewed(&self, id: Uuid, sent: Instant) {
        let mut identity = self.identity.lock().unwrap();
        if identity.id == id && !identity.expelled {
            identity.valid_until = sent + self.lease_timeout.mul_f64(TRUST);
        }
    }

    /// Member `id` was found removed from the group: nothing it held may be used.
    fn expel(&self, id: Uuid) {
        let mut identity = self.identity.lock().unwrap();
        if identity.id == id && !identity.expelled {
            identity.expelled = true;
            self.held.write().unwrap().clear();
            tracing::warn!(
                group = %self.name,
                member = %id,
                "pg-eventstore: consumer group member was removed from the group \
                 (its lease lapsed); joining again"
            );
        }
    }

    fn is_expelled(&self) -> bool {
        self.identity.lock().unwrap().expelled
    }
}

impl Fence for Shared {
    fn hold(&self, lease: Lease, abort: &AtomicBool) -> bool {
        loop {
            if self.held.read().unwrap().get(&lease.partition) != Some(&lease.epoch) {
                return false;
            }
            if Instant::now() < self.identity.lock().unwrap().valid_until {
                return true;
            }
            // The lease lapsed by this member's clock: wait for a renewal, or for the
            // news that it is gone.
            if abort.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed) {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn prepare(&self, store: &Store, conn: &mut Conn) -> Result<Statement> {
        statement(store, conn, S::Fence)
    }

    fn check(
        &self,
        tx: &mut Transaction<'_>,
        statement: &Statement,
        leases: &[Lease],
    ) -> Result<Vec<Lease>> {
        let partitions: Vec<i32> = leases.iter().map(|l| l.partition).collect();
        let epochs: Vec<i64> = leases.iter().map(|l| l.epoch).collect();
        let rows = tx.query(statement, &[&self.name, &partitions, &epochs, &self.id()])?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                partition: r.get(0),
                epoch: r.get(1),
            })
            .collect())
    }

    fn revoked(&self, events: u64) {
        crate::metrics::group_revoked(&self.name, events);
    }
}

/// A member's presence in the group: the heartbeat thread (which holds the processor
/// lock in shared mode) and, when dropped, the leave. It is the dispatcher's guard, so
/// that it is dropped only after every handler thread has ended.
struct Membership {
    store: Store,
    shared: Arc<Shared>,
    heartbeat: Option<(Sender<()>, JoinHandle<()>)>,
}

impl Membership {
    fn start(
        store: &Store,
        shared: Arc<Shared>,
        lock: ProcessorLock,
        options: &GroupOptions,
    ) -> Membership {
        let (tx, rx) = bounded::<()>(0);
        let beat = Heartbeat {
            store: store.clone(),
            shared: shared.clone(),
            lock: Some(lock),
            every: options.heartbeat_interval,
            lease_ms: options.lease_ms(),
        };
        let handle = thread::Builder::new()
            .name(format!("pg-eventstore-heartbeat-{}", shared.name))
            .spawn(move || beat.run(rx))
            .expect("spawn the heartbeat thread");
        Membership {
            store: store.clone(),
            shared,
            heartbeat: Some((tx, handle)),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The handler threads have ended: whatever this member still holds is free now,
        // and its row goes. If that fails, the lease timeout frees them.
        let id = self.shared.id();
        let left = (|| -> Result<()> {
            let mut conn = self.store.conn()?;
            let leave = statement(&self.store, &mut conn, S::Leave)?;
            conn.execute(&leave, &[&self.shared.name, &id])?;
            Ok(())
        })();
        if let Err(e) = left {
            tracing::warn!(
                group = %self.shared.name,
                member = %id,
                error = %crate::error::chain(&e),
                "pg-eventstore: consumer group member could not leave; its leases lapse \
                 after the lease timeout"
            );
        }
        self.shared.held.write().unwrap().clear();
        crate::metrics::group_partitions(&self.shared.name, id, 0);
        if let Some((tx, handle)) = self.heartbeat.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// The heartbeat thread: renews the member's row on the connection that holds the
/// processor lock in shared mode.
struct Heartbeat {
    store: Store,
    shared: Arc<Shared>,
    lock: Option<ProcessorLock>,
    every: Duration,
    lease_ms: i64,
}

impl Heartbeat {
    fn run(mut self, stop: Receiver<()>) {
        loop {
            match stop.recv_timeout(self.every) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                _ => return, // the membership ended
            }
            let id = self.shared.id();
            let sent = Instant::now();
            match self.renew(id) {
                Ok(true) => self.shared.renewed(id, sent),
                Ok(false) => self.shared.expel(id),
                Err(Error::ProcessorLocked { name }) => {
                    // A worker of the same name (or a reset) has the lock: stop handling
                    // now, not after what is queued.
                    *self.shared.fatal.lock().unwrap() = Some(Error::ProcessorLocked { name });
                    if let Some(abort) = self.shared.abort.get() {
                        abort.store(true, Ordering::Relaxed);
                    }
                    return;
                }
                Err(e) => {
                    crate::metrics::worker_error(&self.shared.name, "heartbeat");
                    tracing::warn!(
                        group = %self.shared.name,
                        member = %id,
                        error = %crate::error::chain(&e),
                        "pg-eventstore: consumer group heartbeat failed, retrying"
                    );
                }
            }
        }
    }

    /// Renews member `id`; `false` when its row is gone.
    fn renew(&mut self, id: Uuid) -> Result<bool> {
        if self.lock.is_none() {
            // The session that held the lock ended (a restart, a killed backend).
            let never = AtomicBool::new(false);
            self.lock = Some(ProcessorLock::acquire_shared(
                &self.store,
                &self.shared.name,
                false,
                &never,
            )?);
        }
        let lock = self.lock.as_mut().expect("taken above");
        let result = (|| -> Result<bool> {
            let statement = statement(&self.store, lock.conn(), S::Heartbeat)?;
            let rows = lock
                .conn()
                .query(&statement, &[&self.shared.name, &id, &self.lease_ms])
                .map_err(|e| self.store.map_error(e))?;
            Ok(rows.len() == 1)
        })();
        if result.is_err() {
            // Polled once more so a broken client knows it is closed; then the lock
            // (with its connection) is taken again on the next round.
            let closed = {
                let conn = lock.conn();
                let _ = conn.simple_query("");
                conn.is_closed()
            };
            if closed {
                self.lock = None;
            }
        }
        result
    }
}

/// What a member knows of one of its partitions.
#[derive(Debug)]
struct Part {
    epoch: i64,
    /// Every event of this partition up to here has been read (queued or left out by
    /// the filters); `None`: nothing yet, from the start of the log.
    read: Option<u64>,
    /// The checkpoint stored for it.
    saved: Option<u64>,
    /// Events read and not finished yet, oldest first: (sequence, position, finished).
    flight: VecDeque<(u64, u64, bool)>,
    /// Over this member's share: read no more, hand it over once `flight` is empty.
    draining: bool,
}

impl Part {
    /// Everything of this partition up to here is done.
    fn checkpoint(&self) -> Option<u64> {
        match self.flight.front() {
            None => self.read,
            Some(&(_, position, _)) => position.checked_sub(1).or(self.saved),
        }
    }

    fn finish(&mut self, seq: u64) {
        if let Ok(i) = self.flight.binary_search_by_key(&seq, |f| f.0) {
            self.flight[i].2 = true;
        }
        while self.flight.front().is_some_and(|f| f.2) {
            self.flight.pop_front();
        }
    }
}

/// The coordinator of one member: takes and hands over partitions, reads their events
/// and queues them on the handler threads, collects what they finished and writes the
/// per-partition checkpoints.
struct Member {
    store: Store,
    options: GroupOptions,
    shared: Arc<Shared>,
    partitions: u32,
    parts: BTreeMap<i32, Part>,
    /// Events read and not queued yet (a handler queue was full).
    buffer: VecDeque<Job>,
    seq: u64,
    summary: GroupSummary,
    next_round: Instant,
    last_checkpoint: Instant,
    /// This store's wake-ups for new events.
    wake: (u64, Receiver<()>),
    /// Partitions were taken since the dispatcher last looked for dead letters.
    took: bool,
}

impl Member {
    fn run(
        mut self,
        worker: &Worker,
        handler: Handler,
        membership: Membership,
    ) -> Result<GroupSummary> {
        let fence: Arc<dyn Fence> = self.shared.clone();
        // Its guard is the membership: dropped after the handler threads have ended.
        // Short queues: what is queued must be finished before a partition can be
        // handed over; what is read beyond them waits in `buffer`, where a partition
        // being handed over can take it back.
        let queue = (2 * worker.batch.max_events).clamp(16, QUEUE_PER_THREAD);
        let mut dispatcher = Dispatcher::start(
            worker,
            handler,
            Box::new(membership),
            Some(fence),
            None,
            self.shared.stop.clone(),
            queue,
        );
        let _ = self.shared.abort.set(dispatcher.abort_flag());
        if self.shared.fatal.lock().unwrap().is_some() {
            dispatcher.abort_flag().store(true, Ordering::Relaxed);
        }
        let mut fatal: Option<Error> = None;
        let result = self.run_loop(worker, &mut dispatcher, &mut fatal);
        if result.is_err() {
            // Ending on an error: what is queued stays unhandled (unfinished, for the
            // next owner), and threads waiting for a renewal that will not come stop.
            dispatcher.abort_flag().store(true, Ordering::Relaxed);
        }
        self.buffer.clear();
        if dispatcher.finish() {
            fatal.get_or_insert(Error::HandlerPanicked {
                processor: worker.name.clone(),
            });
        }
        self.collect(&dispatcher, &mut fatal);
        // Hand everything over with its checkpoint (only what is finished counts).
        let handed = self.hand_over(true);
        self.store.hub().unsubscribe(self.wake.0);
        result?;
        if let Some(e) = fatal {
            return Err(e);
        }
        handed?;
        Ok(self.summary)
    }

    fn run_loop(
        &mut self,
        worker: &Worker,
        dispatcher: &mut Dispatcher,
        fatal: &mut Option<Error>,
    ) -> Result<()> {
        let mut failures = 0u32;
        while !self.shared.stop.load(Ordering::Relaxed) && !dispatcher.has_failed() {
            if let Some(e) = self.shared.fatal.lock().unwrap().take() {
                return Err(e);
            }
            self.collect(dispatcher, fatal);
            match self.step(worker, dispatcher) {
                Ok(()) => failures = 0,
                Err(e) if e.is_transient() => {
                    failures += 1;
                    crate::metrics::worker_error(&worker.name, "group");
                    let wait = crate::retry::Backoff::new(
                        self.options
                            .heartbeat_interval
                            .min(Duration::from_millis(200)),
                        self.options.heartbeat_interval,
                    )
                    .delay(failures);
                    tracing::warn!(
                        group = %worker.name,
                        error = %crate::error::chain(&e),
                        wait_ms = wait.as_millis() as u64,
                        "pg-eventstore: consumer group member failed, retrying"
                    );
                    thread::sleep(wait);
                }
                Err(e) => return Err(e),
            }
        }
        // Aborted by the heartbeat: its error.
        if let Some(e) = self.shared.fatal.lock().unwrap().take() {
            return Err(e);
        }
        Ok(())
    }

    /// One turn: the group round when due, hand-overs, checkpoints, then reading and
    /// queueing (or waiting for new events).
    fn step(&mut self, worker: &Worker, dispatcher: &mut Dispatcher) -> Result<()> {
        if self.shared.is_expelled() {
            self.rejoin()?;
        }
        if Instant::now() >= self.next_round {
            self.round()?;
        }
        if self.took {
            // Another member may have parked events of the partitions just taken: a
            // plain handler removes the dead letters of the events it handles.
            dispatcher.may_have_dead_letters(worker)?;
            self.took = false;
        }
        self.hand_over(false)?;
        if self.last_checkpoint.elapsed() >= worker.checkpoint_interval {
            self.save_checkpoints()?;
        }
        if !self.queue(dispatcher) {
            return Ok(()); // a queue is full or a thread is gone: look again
        }
        let wait = self.read(worker)?;
        if !wait.is_zero() {
            let until_round = self.next_round.saturating_duration_since(Instant::now());
            let _ = self.wake.1.recv_timeout(wait.min(until_round));
        }
        Ok(())
    }

    /// Takes the finished events off the done channel.
    fn collect(&mut self, dispatcher: &Dispatcher, fatal: &mut Option<Error>) {
        for Done {
            seq,
            retries,
            outcome,
            lease,
        } in dispatcher.done().try_iter()
        {
            self.summary.retries += retries as u64;
            match outcome {
                Outcome::Handled => self.summary.handled += 1,
                Outcome::Skipped => self.summary.skipped += 1,
                Outcome::Parked => self.summary.parked += 1,
                Outcome::Failed(e) => {
                    fatal.get_or_insert(e);
                    continue;
                }
                // Left unfinished (stopped or aborted during its retries): its partition's
                // checkpoint stays before it.
                Outcome::Unfinished => continue,
                Outcome::Revoked => {
                    // The fence says the partition is gone: find out now.
                    self.summary.revoked += 1;
                    self.next_round = Instant::now();
                    continue;
                }
            }
            if let Some(lease) = lease {
                if let Some(part) = self.parts.get_mut(&lease.partition) {
                    if part.epoch == lease.epoch {
                        part.finish(seq);
                    }
                }
            }
        }
    }

    /// The group round: removes expired members, drops partitions this member lost,
    /// and takes or hands over partitions to match its share.
    fn round(&mut self) -> Result<()> {
        self.next_round = Instant::now() + self.options.heartbeat_interval;
        let me = self.shared.id();
        let name = self.shared.name.clone();
        let mut conn = self.store.conn()?;
        let live = statement(&self.store, &mut conn, S::LiveMembers)?;
        let mine = statement(&self.store, &mut conn, S::MyLeases)?;
        let members: Vec<Uuid> = conn
            .query(&live, &[&name])
            .map_err(|e| self.store.map_error(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(rank) = members.iter().position(|m| *m == me) else {
            // Our own row has expired (and the statement above removed it).
            self.shared.expel(me);
            return Ok(());
        };
        let held: HashMap<i32, i64> = conn
            .query(&mine, &[&name, &me])
            .map_err(|e| self.store.map_error(e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let lost: Vec<i32> = self
            .parts
            .iter()
            .filter(|(p, part)| held.get(p) != Some(&part.epoch))
            .map(|(p, _)| *p)
            .collect();
        for p in lost {
            self.lose(p);
        }
        // Held in the database but unknown here (the reply to a take was lost): free.
        let orphans: Vec<Lease> = held
            .iter()
            .filter(|(p, _)| !self.parts.contains_key(p))
            .map(|(p, e)| Lease {
                partition: *p,
                epoch: *e,
            })
            .collect();
        if !orphans.is_empty() {
            let release = statement(&self.store, &mut conn, S::Release)?;
            let (ps, es) = split(&orphans);
            conn.execute(&release, &[&name, &me, &ps, &es])
                .map_err(|e| self.store.map_error(e))?;
        }
        let n = self.partitions as usize;
        let share = n / members.len() + usize::from(rank < n % members.len());
        let mut holding = self.parts.values().filter(|p| !p.draining).count();
        // Keep what is being handed over before taking anything new.
        for part in self.parts.values_mut() {
            if holding < share && part.draining {
                part.draining = false;
                holding += 1;
            }
        }
        if holding < share {
            let acquire = statement(&self.store, &mut conn, S::Acquire)?;
            let want = (share - holding) as i64;
            let rows = conn
                .query(&acquire, &[&name, &me, &want])
                .map_err(|e| self.store.map_error(e))?;
            for r in &rows {
                let partition: i32 = r.get(0);
                let position = r.get::<_, Option<i64>>(2).map(|p| p as u64);
                self.parts.insert(
                    partition,
                    Part {
                        epoch: r.get(1),
                        read: position,
                        saved: position,
                        flight: VecDeque::new(),
                        draining: false,
                    },
                );
                tracing::info!(group = %name, member = %me, partition, "pg-eventstore: partition acquired");
            }
            self.summary.acquired += rows.len() as u64;
            self.took |= !rows.is_empty();
            crate::metrics::group_leases(&name, "acquired", rows.len() as u64);
            if (rows.len() as i64) < want {
                // Others still hand theirs over: look again soon.
                self.next_round = Instant::now() + self.options.heartbeat_interval / 4;
            }
        } else if holding > share {
            let surplus: Vec<i32> = self
                .parts
                .iter()
                .rev()
                .filter(|(_, part)| !part.draining)
                .take(holding - share)
                .map(|(p, _)| *p)
                .collect();
            for p in surplus {
                self.drain(p);
            }
        }
        self.publish();
        Ok(())
    }

    /// Starts handing partition `p` over: no more reading, and the events read but not
    /// queued yet go back (its read position moves back before them), so that only what
    /// the handler threads have must finish first.
    fn drain(&mut self, p: i32) {
        let Some(part) = self.parts.get_mut(&p) else {
            return;
        };
        part.draining = true;
        let mut first_taken_back = None;
        self.buffer.retain(|job| {
            let mine = job.lease.is_some_and(|l| l.partition == p);
            if mine && first_taken_back.is_none() {
                first_taken_back = Some((job.seq, job.event.position));
            }
            !mine
        });
        if let Some((seq, position)) = first_taken_back {
            // The buffer holds the newest events read: a tail of the partition's flight.
            while part.flight.back().is_some_and(|f| f.0 >= seq) {
                part.flight.pop_back();
            }
            part.read = position.checked_sub(1);
        }
    }

    /// Makes the partitions held known to the handler threads (and the metrics); not
    /// after the member was removed (everything it held is void then).
    fn publish(&self) {
        let identity = self.shared.identity.lock().unwrap();
        if identity.expelled {
            return;
        }
        let mut held = self.shared.held.write().unwrap();
        held.clear();
        held.extend(self.parts.iter().map(|(p, part)| (*p, part.epoch)));
        crate::metrics::group_partitions(&self.shared.name, identity.id, held.len());
    }

    /// Forgets partition `p`: another member has it now.
    fn lose(&mut self, p: i32) {
        if self.parts.remove(&p).is_some() {
            self.summary.lost += 1;
            crate::metrics::group_leases(&self.shared.name, "lost", 1);
            tracing::warn!(
                group = %self.shared.name,
                partition = p,
                "pg-eventstore: partition lost to another member (this member's lease lapsed)"
            );
        }
        self.shared.held.write().unwrap().remove(&p);
    }

    /// After this member was removed from the group: everything it held is void; it
    /// joins again with a new id.
    fn rejoin(&mut self) -> Result<()> {
        let lost: Vec<i32> = self.parts.keys().copied().collect();
        for p in lost {
            self.lose(p);
        }
        self.buffer.clear();
        let id = Uuid::now_v7();
        let sent = Instant::now();
        join(&self.store, &self.shared.name, &self.options, id)?;
        *self.shared.identity.lock().unwrap() = Identity {
            id,
            valid_until: sent + self.options.lease_timeout.mul_f64(TRUST),
            expelled: false,
        };
        self.summary.rejoined += 1;
        self.next_round = Instant::now();
        Ok(())
    }

    /// Writes the checkpoints that moved (fenced); drops partitions found taken.
    fn save_checkpoints(&mut self) -> Result<()> {
        self.last_checkpoint = Instant::now();
        let moved: Vec<(Lease, u64)> = self
            .parts
            .iter()
            .filter_map(|(p, part)| {
                let c = part.checkpoint()?;
                (Some(c) != part.saved).then_some((
                    Lease {
                        partition: *p,
                        epoch: part.epoch,
                    },
                    c,
                ))
            })
            .collect();
        if moved.is_empty() {
            return Ok(());
        }
        let mut conn = self.store.conn()?;
        let save = statement(&self.store, &mut conn, S::SaveCheckpoints)?;
        let written = self.write_checkpoints(&mut *conn, &save, &moved)?;
        self.saved(&moved, &written);
        Ok(())
    }

    fn write_checkpoints(
        &self,
        client: &mut impl postgres::GenericClient,
        save: &Statement,
        moved: &[(Lease, u64)],
    ) -> Result<Vec<i32>> {
        let leases: Vec<Lease> = moved.iter().map(|m| m.0).collect();
        let (ps, es) = split(&leases);
        let positions: Vec<i64> = moved.iter().map(|m| m.1 as i64).collect();
        let rows = client
            .query(
                save,
                &[&self.shared.name, &self.shared.id(), &ps, &es, &positions],
            )
            .map_err(|e| self.store.map_error(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records the checkpoints written; the partitions not written are lost.
    fn saved(&mut self, moved: &[(Lease, u64)], written: &[i32]) {
        for (lease, c) in moved {
            if written.contains(&lease.partition) {
                if let Some(part) = self.parts.get_mut(&lease.partition) {
                    part.saved = Some(*c);
                }
            } else {
                self.lose(lease.partition);
            }
        }
    }

    /// Hands over the partitions being drained whose events are all finished (`all`:
    /// every partition, on stop), with their checkpoints, in one transaction.
    fn hand_over(&mut self, all: bool) -> Result<()> {
        let ready: Vec<(Lease, Option<u64>)> = self
            .parts
            .iter()
            .filter(|(_, part)| all || (part.draining && part.flight.is_empty()))
            .map(|(p, part)| {
                let lease = Lease {
                    partition: *p,
                    epoch: part.epoch,
                };
                (lease, part.checkpoint())
            })
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let name = self.shared.name.clone();
        let me = self.shared.id();
        let mut conn = self.store.conn()?;
        let save = statement(&self.store, &mut conn, S::SaveCheckpoints)?;
        let release = statement(&self.store, &mut conn, S::Release)?;
        let moved: Vec<(Lease, u64)> = ready
            .iter()
            .filter_map(|(l, c)| c.map(|c| (*l, c)))
            .collect();
        let leases: Vec<Lease> = ready.iter().map(|r| r.0).collect();
        let (ps, es) = split(&leases);
        let mut tx = conn.transaction().map_err(|e| self.store.map_error(e))?;
        let written = self.write_checkpoints(&mut tx, &save, &moved)?;
        let released: Vec<i32> = tx
            .query(&release, &[&name, &me, &ps, &es])
            .map_err(|e| self.store.map_error(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().map_err(|e| self.store.map_error(e))?;
        self.saved(&moved, &written);
        for lease in &leases {
            if released.contains(&lease.partition) && self.parts.remove(&lease.partition).is_some()
            {
                self.summary.released += 1;
                crate::metrics::group_leases(&name, "released", 1);
                tracing::info!(group = %name, member = %me, partition = lease.partition, "pg-eventstore: partition handed over");
            } else {
                self.lose(lease.partition);
            }
        }
        self.publish();
        Ok(())
    }

    /// Queues what was read on the handler threads; `false` when one was full (or gone).
    fn queue(&mut self, dispatcher: &mut Dispatcher) -> bool {
        while let Some(job) = self.buffer.pop_front() {
            let lease = job.lease.expect("group jobs have leases");
            if self
                .parts
                .get(&lease.partition)
                .is_none_or(|p| p.epoch != lease.epoch)
            {
                continue; // lost meanwhile
            }
            match dispatcher.send_within(job, SEND_WAIT) {
                Ok(None) => {}
                Ok(Some(job)) => {
                    self.buffer.push_front(job);
                    return false;
                }
                Err(()) => return false,
            }
        }
        true
    }

    /// Reads the next page of the partitions this member reads that are furthest
    /// behind (all of them once they have caught up; a partition just taken from an old
    /// checkpoint alone until it reaches the others). Returns how long to wait before
    /// the next read (zero: more to read now).
    fn read(&mut self, worker: &Worker) -> Result<Duration> {
        let active = || self.parts.iter().filter(|(_, p)| !p.draining);
        let Some(behind) = active().map(|(_, p)| p.read).min() else {
            return Ok(IDLE_WAIT);
        };
        let laggards: Vec<i32> = active()
            .filter(|(_, p)| p.read == behind)
            .map(|(p, _)| *p)
            .collect();
        let others = active().count() > laggards.len();
        let page = i64::from(self.store.config().read_page_size.max(1));
        let mut conn = self.store.conn()?;
        let read = statement(&self.store, &mut conn, S::Read)?;
        let rows = conn
            .query(
                &read,
                &[
                    &behind.map_or(-1, |r| r as i64),
                    &laggards,
                    &(self.partitions as i64),
                    &worker.filter.category,
                    &worker.filter.event_types,
                    &page,
                    &worker.filter.streams,
                ],
            )
            .map_err(|e| self.store.map_error(e))?;
        drop(conn);
        let Some(first) = rows.first() else {
            return Ok(IDLE_WAIT);
        };
        let horizon: i64 = first.get(9);
        let tip: Option<i64> = first.get(10);
        let mut count = 0i64;
        let mut last = None;
        for row in &rows {
            if row.get::<_, Option<i64>>(0).is_none() {
                continue; // the empty page's row
            }
            count += 1;
            let event = RecordedEvent::from_row(row)?;
            let partition: i32 = row.get(8);
            last = Some(event.position);
            let Some(part) = self.parts.get_mut(&partition) else {
                continue;
            };
            if part.read.is_some_and(|r| r >= event.position) {
                continue;
            }
            let seq = self.seq;
            self.seq += 1;
            part.flight.push_back((seq, event.position, false));
            self.buffer.push_back(Job {
                seq,
                event,
                lease: Some(Lease {
                    partition,
                    epoch: part.epoch,
                }),
            });
        }
        // Everything of the laggards up to the frontier is read: the last event of a
        // full page; otherwise the horizon, or the newest event if that is lower (no
        // need to move past positions no event holds: an idle log writes no checkpoints).
        let full = count == page;
        let frontier = match (full, last) {
            (true, Some(last)) => Some(last),
            _ => tip
                .map(|t| t.min(horizon - 1))
                .and_then(|f| u64::try_from(f).ok()),
        };
        let mut moved = false;
        if let Some(f) = frontier {
            for p in &laggards {
                if let Some(part) = self.parts.get_mut(p) {
                    moved |= part.read < Some(f);
                    part.read = part.read.max(Some(f));
                }
            }
        }
        Ok(if full || (moved && others) {
            Duration::ZERO
        } else if tip.is_some_and(|t| t >= horizon) {
            HELD_BACK_WAIT // committed events wait behind an open transaction
        } else {
            IDLE_WAIT
        })
    }
}

/// Partitions and epochs as the two arrays the statements take.
fn split(leases: &[Lease]) -> (Vec<i32>, Vec<i64>) {
    leases.iter().map(|l| (l.partition, l.epoch)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(read: Option<u64>, saved: Option<u64>) -> Part {
        Part {
            epoch: 1,
            read,
            saved,
            flight: VecDeque::new(),
            draining: false,
        }
    }

    #[test]
    fn a_partition_checkpoint_follows_what_was_read_and_stops_before_the_unfinished() {
        let mut p = part(Some(100), Some(10));
        // Nothing in flight: everything read is done, past other partitions' events.
        assert_eq!(p.checkpoint(), Some(100));
        for (seq, pos) in [(7, 120), (9, 130), (12, 150)] {
            p.flight.push_back((seq, pos, false));
        }
        p.read = Some(200);
        assert_eq!(p.checkpoint(), Some(119));
        p.finish(9);
        assert_eq!(p.checkpoint(), Some(119));
        p.finish(7);
        assert_eq!(p.checkpoint(), Some(149));
        p.finish(12);
        assert_eq!(p.checkpoint(), Some(200));
    }

    #[test]
    fn options_are_checked() {
        assert!(GroupOptions::new().validate().is_ok());
        assert!(GroupOptions::new().partitions(0).validate().is_err());
        assert!(GroupOptions::new().partitions(5000).validate().is_err());
        let short = GroupOptions::new()
            .lease_timeout(Duration::from_secs(2))
            .heartbeat_interval(Duration::from_secs(1));
        assert!(short.validate().is_err());
        assert!(GroupOptions::new()
            .heartbeat_interval(Duration::ZERO)
            .validate()
            .is_err());
    }
}
