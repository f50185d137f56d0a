//! A worker that runs a handler over the event log on a pool of threads, with
//! checkpoints, retries, a dead-letter table and graceful shutdown.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use postgres::{Statement, Transaction};
use r2d2::PooledConnection;

use crate::checkpoint::validate_processor_name;
use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::processor::{HeldLock, LockKeeper, ProcessorLock};
use crate::read::ReadAll;
use crate::store::{Conn, Store};
use crate::subscription::SubscribeOptions;

/// What a handler returns on failure: any error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Events queued per handler thread before the reader waits. A log written stream by
/// stream (an import) sends long runs of events to one thread; a short queue would make
/// the reader wait on that thread while the others run dry (2,048 measured 1.4 times the
/// throughput of 256 with 4 threads on the loadgen's P2).
const QUEUE: usize = 2048;
/// Events a filtered worker looks at per query when it moves past unmatched ones.
const SCAN_PAGE: i64 = 100_000;

/// What a worker does with an event whose handler still fails after its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Stop the worker and return the error. The checkpoint stays before the event.
    Stop,
    /// Park the event in the `dead_letters` table with the error text and go on. A
    /// parked event that a later run handles after all (one from a checkpoint before it,
    /// after a crash or a [`Store::move_checkpoint`] back; a group member that took its
    /// partition) loses its dead letter: a transactional handler's in the transaction of
    /// its effects, so a replay never applies them twice.
    Park,
}

/// What a worker does when another worker with the same processor name is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfLocked {
    /// Refuse to start: [`Error::ProcessorLocked`].
    Fail,
    /// Wait until the other one stops (or this one is stopped). [`Worker::spawn`] (and
    /// a group member's) then returns its handle at once and waits on the worker's
    /// thread, so that the handle or its stopper can stop the waiting instance: it ends
    /// with nothing handled. [`Worker::run_batch`] waits in the calling thread, and
    /// cannot be stopped from outside while it waits.
    Wait,
}

/// What a worker did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerSummary {
    /// Events the handler finished.
    pub handled: u64,
    /// Events a transactional handler had already committed (after a restart): skipped.
    pub skipped: u64,
    /// Events parked in the dead-letter table.
    pub parked: u64,
    /// Handler calls that failed and were retried.
    pub retries: u64,
    /// The checkpoint written last: every event up to it is done.
    pub checkpoint: Option<u64>,
}

type PlainHandler = dyn Fn(&RecordedEvent) -> Result<(), HandlerError> + Send + Sync;
type TxHandler =
    dyn Fn(&mut Transaction<'_>, &RecordedEvent) -> Result<(), HandlerError> + Send + Sync;

#[derive(Clone)]
pub(crate) enum Handler {
    Plain(Arc<PlainHandler>),
    Tx(Arc<TxHandler>),
}

/// One event on its way to a handler thread.
pub(crate) struct Job {
    pub(crate) seq: u64,
    pub(crate) event: RecordedEvent,
    /// In a consumer group: the lease of the event's partition it was read under.
    pub(crate) lease: Option<Lease>,
}

/// A consumer group member's hold on one partition: the partition and the epoch (the
/// count of acquisitions) it was acquired with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Lease {
    pub(crate) partition: i32,
    pub(crate) epoch: i64,
}

/// What a consumer group member adds to its handler threads (implemented in `group.rs`):
/// plain handlers run only while the member's lease is valid by its own clock, and
/// transactional handlers only in a transaction that has locked the lease rows and found
/// them still held.
pub(crate) trait Fence: Send + Sync {
    /// Before a plain handler call: waits while the member's leases have lapsed by its
    /// own clock (a heartbeat may renew them), and says whether `lease` is still held.
    /// `false`: the event is dropped unfinished, for the partition's next owner.
    fn hold(&self, lease: Lease, abort: &AtomicBool) -> bool;
    /// The statement [`Fence::check`] runs, prepared on `conn` before its transaction.
    fn prepare(&self, store: &Store, conn: &mut Conn) -> Result<Statement>;
    /// Inside a transactional handler's transaction, before the handler runs: locks the
    /// lease rows of `leases` until the transaction ends and returns those of `leases`
    /// still held (the same partition with the same epoch).
    fn check(
        &self,
        tx: &mut Transaction<'_>,
        statement: &Statement,
        leases: &[Lease],
    ) -> Result<Vec<Lease>>;
    /// Counts events that a handler thread dropped because their lease was gone.
    fn revoked(&self, events: u64);
}

/// Runs a handler over the events of the log, from the processor's checkpoint on.
/// Made by [`Store::worker`].
///
/// Events of one stream are handled in order, by one thread at a time; different
/// streams run in parallel on [`Worker::threads`] threads. Delivery is at-least-once: the
/// stored checkpoint is the low-water mark of finished events, never past an event still
/// in flight, so after a crash the events after it are handled again. A transactional
/// handler ([`Worker::spawn_transactional`]) gets exactly-once effects: its writes commit
/// together with a per-stream claim, and a repeated event is skipped.
///
/// ```no_run
/// # use pg_eventstore::{OnFailure, Store};
/// # let store = Store::from_env()?;
/// let worker = store
///     .worker("mailer")
///     .threads(4)
///     .category("user-")
///     .on_failure(OnFailure::Park)
///     .spawn(|event| {
///         println!("welcome mail for {}", event.stream_id);
///         Ok(())
///     })?;
/// // ... later, from any thread:
/// let summary = worker.stop()?;
/// println!("{} events handled", summary.handled);
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
pub struct Worker {
    pub(crate) store: Store,
    pub(crate) name: String,
    pub(crate) threads: usize,
    /// Which events: the category, event type and stream filters of a `$all` read.
    pub(crate) filter: ReadAll,
    pub(crate) checkpoint_interval: Duration,
    retries: u32,
    pub(crate) retry_delay: Duration,
    on_failure: OnFailure,
    pub(crate) if_locked: IfLocked,
    pub(crate) batch: Batch,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("threads", &self.threads)
            .finish()
    }
}

impl Store {
    /// A [`Worker`] for processor `name`.
    pub fn worker(&self, name: &str) -> Worker {
        Worker {
            store: self.clone(),
            name: name.to_string(),
            threads: 1,
            filter: ReadAll::from_start(),
            checkpoint_interval: Duration::from_secs(1),
            retries: 3,
            retry_delay: Duration::from_millis(100),
            on_failure: OnFailure::Stop,
            if_locked: IfLocked::Fail,
            batch: Batch {
                max_events: 100,
                max_wait: Duration::ZERO,
            },
        }
    }
}

impl Worker {
    /// Handler threads. Default 1. The pool needs `threads + 3` connections.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Only events of streams whose id starts with `prefix`.
    pub fn category(mut self, prefix: impl Into<String>) -> Self {
        self.filter = self.filter.category(prefix);
        self
    }

    /// Only events of these types.
    pub fn event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.filter = self.filter.event_types(types);
        self
    }

    /// Only events of these streams (see [`ReadAll::streams`]).
    pub fn streams<I, S>(mut self, streams: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.filter = self.filter.streams(streams);
        self
    }

    /// How often the checkpoint is written. Default 1 s. It is always written on stop.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// How often a failing handler is retried before [`Worker::on_failure`] applies.
    /// Default 3; the waits double from [`Worker::retry_delay`].
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The first wait before a retry. Default 100 ms.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// What to do when the retries are used up. Default [`OnFailure::Stop`].
    pub fn on_failure(mut self, policy: OnFailure) -> Self {
        self.on_failure = policy;
        self
    }

    /// How a transactional handler's thread groups events: each of its transactions
    /// handles up to `max_events` events (with their per-stream claims), taking what is
    /// queued for the thread and waiting at most `max_wait` for more. Default 100 events,
    /// no wait: under load a group fills while the previous one commits, and a lone
    /// event is not delayed. `max_events` 1 commits every event on its own.
    ///
    /// Exactly-once holds either way: a group commits or rolls back whole. When a group
    /// fails, its events are handled again one by one, each in its own transaction, with
    /// [`Worker::retries`] and [`Worker::on_failure`] as usual; so a handler may see an
    /// event once in a group that rolled back and then again on its own. Plain handlers
    /// ignore this setting.
    pub fn transaction_batch(mut self, max_events: usize, max_wait: Duration) -> Self {
        self.batch = Batch {
            max_events,
            max_wait,
        };
        self
    }

    /// Inside a transactional handler: `sql` prepared once per pooled connection, so that
    /// each call is one round trip with a plan PostgreSQL keeps, where `tx.execute(sql)`
    /// with a string prepares and plans the statement on every call (two round trips).
    /// `tx` must be the transaction the handler was given. Outside a worker's
    /// transactional handler it prepares `sql` without caching it.
    ///
    /// ```no_run
    /// # use pg_eventstore::{Store, Worker};
    /// # let store = Store::from_env()?;
    /// let summary = store.worker("counts").run_batch_transactional(|tx, event| {
    ///     let upsert = Worker::prepare_cached(
    ///         tx,
    ///         "INSERT INTO counts VALUES ($1, 1)
    ///          ON CONFLICT (stream_id) DO UPDATE SET n = counts.n + 1",
    ///     )?;
    ///     tx.execute(&upsert, &[&event.stream_id])?;
    ///     Ok(())
    /// })?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn prepare_cached(tx: &mut Transaction<'_>, sql: &str) -> Result<Statement> {
        let cached = HANDLER_STATEMENTS.with(|c| {
            c.borrow()
                .as_ref()
                .map(|m| (m.get(sql).cloned(), true))
                .unwrap_or((None, false))
        });
        match cached {
            (Some(statement), _) => Ok(statement),
            (None, in_handler) => {
                let statement = tx.prepare(sql)?;
                if in_handler {
                    HANDLER_STATEMENTS.with(|c| {
                        if let Some(m) = c.borrow_mut().as_mut() {
                            m.insert(sql.to_string(), statement.clone());
                        }
                    });
                }
                Ok(statement)
            }
        }
    }

    /// What to do when a worker with this name already runs. Default [`IfLocked::Fail`].
    pub fn if_locked(mut self, policy: IfLocked) -> Self {
        self.if_locked = policy;
        self
    }

    /// Starts the worker on its own thread: it catches up, then follows new events
    /// until [`WorkerHandle::stop`].
    pub fn spawn<H>(self, handler: H) -> Result<WorkerHandle>
    where
        H: Fn(&RecordedEvent) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.start(Handler::Plain(Arc::new(handler)))
    }

    /// Like [`Worker::spawn`], with a handler that writes inside a transaction that
    /// commits together with the worker's per-stream claim on the event: each event's
    /// effects commit exactly once, even across crashes and restarts.
    pub fn spawn_transactional<H>(self, handler: H) -> Result<WorkerHandle>
    where
        H: Fn(&mut Transaction<'_>, &RecordedEvent) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.start(Handler::Tx(Arc::new(handler)))
    }

    /// Batch mode: handles every event committed before the call, then returns. Events
    /// that wait behind a running transaction for the `$all` horizon (see the crate docs)
    /// are waited for. With [`IfLocked::Wait`] it first waits, in the calling thread,
    /// until no other instance runs; nothing can stop that wait from outside.
    pub fn run_batch<H>(self, handler: H) -> Result<WorkerSummary>
    where
        H: Fn(&RecordedEvent) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.check()?;
        let stop = Arc::new(AtomicBool::new(false));
        self.run(Handler::Plain(Arc::new(handler)), Mode::Batch, stop)
    }

    /// Batch mode with a transactional handler (see [`Worker::spawn_transactional`]).
    pub fn run_batch_transactional<H>(self, handler: H) -> Result<WorkerSummary>
    where
        H: Fn(&mut Transaction<'_>, &RecordedEvent) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.check()?;
        let stop = Arc::new(AtomicBool::new(false));
        self.run(Handler::Tx(Arc::new(handler)), Mode::Batch, stop)
    }

    pub(crate) fn check(&self) -> Result<()> {
        validate_processor_name(&self.name)?;
        if self.batch.max_events == 0 {
            return Err(Error::InvalidInput(
                "a transaction batch needs at least one event".into(),
            ));
        }
        if self.threads == 0 {
            return Err(Error::InvalidInput(
                "a worker needs at least one thread".into(),
            ));
        }
        let max = self.store.config().max_connections as usize;
        if self.threads + 3 > max {
            return Err(Error::Config(format!(
                "a worker with {} threads needs {} pooled connections, but max_connections is {max}",
                self.threads,
                self.threads + 3
            )));
        }
        self.filter.validate()
    }

    fn start(self, handler: Handler) -> Result<WorkerHandle> {
        self.check()?;
        let stop = Arc::new(AtomicBool::new(false));
        // With `IfLocked::Fail` the lock is taken here, so that "already running" is
        // this call's error. With `IfLocked::Wait` it is taken on the worker's thread,
        // where a stop ends the wait: the handle comes back at once.
        let lock = match self.if_locked {
            IfLocked::Fail => Some(self.lock(&stop)?),
            IfLocked::Wait => None,
        };
        let flag = stop.clone();
        let name = self.name.clone();
        let thread = thread::Builder::new()
            .name(format!("pg-eventstore-worker-{}", self.name))
            .spawn(move || {
                let lock = match lock {
                    Some(lock) => lock,
                    None => match self.wait_for_lock(&flag)? {
                        Some(lock) => lock,
                        None => return Ok(WorkerSummary::default()), // stopped while waiting
                    },
                };
                self.run_locked(handler, Mode::Live, flag, lock)
            })
            .expect("spawn the worker thread");
        Ok(WorkerHandle {
            name,
            stop,
            thread: Some(thread),
        })
    }

    fn lock(&self, stop: &AtomicBool) -> Result<ProcessorLock> {
        let wait = self.if_locked == IfLocked::Wait;
        ProcessorLock::acquire(&self.store, &self.name, wait, stop)
    }

    fn run(self, handler: Handler, mode: Mode, stop: Arc<AtomicBool>) -> Result<WorkerSummary> {
        let lock = self.lock(&stop)?;
        self.run_locked(handler, mode, stop, lock)
    }

    /// Runs with the lock held. In live mode a lost lock (see [`LockKeeper`]) is taken
    /// again, waiting while another instance holds it, and the worker goes on from its
    /// checkpoint; a batch run returns [`Error::ProcessorLockLost`].
    fn run_locked(
        self,
        handler: Handler,
        mode: Mode,
        stop: Arc<AtomicBool>,
        lock: ProcessorLock,
    ) -> Result<WorkerSummary> {
        let mut summary = WorkerSummary::default();
        let mut lock = lock;
        loop {
            match self.run_once(handler.clone(), &mode, &stop, lock, &mut summary) {
                Err(Error::ProcessorLockLost { name, source }) if matches!(mode, Mode::Live) => {
                    crate::metrics::worker_error(&name, "lock_lost");
                    tracing::warn!(
                        processor = %name,
                        error = %crate::error::chain(&source),
                        "pg-eventstore: worker lost its processor lock; its handlers stopped, \
                         taking the lock again"
                    );
                    match self.wait_for_lock(&stop)? {
                        Some(l) => lock = l,
                        None => return Ok(summary), // stopped while waiting
                    }
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(summary),
            }
        }
    }

    /// Takes the processor lock (a standby's first, or again after losing it): waits
    /// while another instance holds it, and retries with the crate's backoff while the
    /// server cannot be reached. `None` once the worker is stopped.
    fn wait_for_lock(&self, stop: &AtomicBool) -> Result<Option<ProcessorLock>> {
        let mut backoff = crate::retry::Backoff::new(self.retry_delay, crate::retry::MAX_DELAY);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            match ProcessorLock::acquire(&self.store, &self.name, true, stop) {
                Ok(lock) => return Ok(Some(lock)),
                Err(Error::ProcessorLocked { .. }) => return Ok(None), // stopped
                Err(e) if e.is_transient() => thread::sleep(backoff.next_delay()),
                Err(e) => return Err(e),
            }
        }
    }

    /// One run with `lock`, adding what it did to `summary`.
    fn run_once(
        &self,
        handler: Handler,
        mode: &Mode,
        stop: &Arc<AtomicBool>,
        lock: ProcessorLock,
        summary: &mut WorkerSummary,
    ) -> Result<()> {
        // Declared first, so dropped last: on every way out of this function (an error
        // returned with `?` too) the tracker's last write comes first, then the
        // dispatcher joins the handler threads, and only then the keeper releases the
        // lock. A lost lock stops the handler threads at once (the dispatcher's abort).
        let keeper = LockKeeper::start(lock, self.store.config().connection_timeout);
        let mut dispatcher = Dispatcher::start(
            self,
            handler,
            Box::new(()),
            None,
            Some(keeper.held()),
            stop.clone(),
            QUEUE,
        );
        keeper.arm(dispatcher.abort.clone());
        dispatcher.may_have_dead_letters(self)?;
        let mut tracker = self
            .store
            .tracker(&self.name)?
            .checkpoint_interval(self.checkpoint_interval)
            .on_lock(keeper.held());
        let start = tracker.position();
        let mut source = match mode {
            Mode::Batch => {
                let mut options = self.filter.clone();
                options.position = start;
                Source::Batch(Box::new(UpToHead::new(&self.store, options)?))
            }
            Mode::Live => {
                let mut options = SubscribeOptions::filtered(self.filter.clone());
                if let Some(p) = start {
                    options = options.after(p);
                }
                Source::Live(Box::new(self.store.subscribe(options)?))
            }
        };
        let mut scan = Scan::new(self, start);
        let mut flight = InFlight::default();
        let mut fatal: Option<Error> = None;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) && !dispatcher.has_failed() {
            let next = match &mut source {
                Source::Batch(batch) => match batch.next() {
                    Some(e) => Some(e),
                    None => break,
                },
                Source::Live(sub) => sub.next_timeout(Duration::from_millis(50)),
            };
            match next {
                Some(Ok(event)) => {
                    flight.push(seq, event.position);
                    scan.dispatched(event.position);
                    if !dispatcher.send(Job {
                        seq,
                        event,
                        lease: None,
                    }) {
                        break; // a handler thread is gone: only after a fatal failure
                    }
                    seq += 1;
                }
                Some(Err(e)) => match &source {
                    // A live subscription carries on after an error (it retries after
                    // a backoff); a batch read cannot.
                    Source::Live(_) => {
                        crate::metrics::worker_error(&self.name, "subscription");
                        tracing::warn!(
                            processor = %self.name,
                            error = %crate::error::chain(&e),
                            "pg-eventstore: worker subscription failed, retrying"
                        );
                    }
                    Source::Batch(_) => {
                        fatal = Some(e);
                        break;
                    }
                },
                None => {}
            }
            self.collect(dispatcher.done(), &mut flight, summary, &mut fatal);
            if let Some(p) = flight.low_water.take() {
                tracker.update(p)?;
            } else if flight.queue.is_empty() && scan.is_due() {
                // Nothing in flight: move past what the filter left out.
                if let Some(p) = scan.read_past(tracker.position())? {
                    tracker.update(p)?;
                }
            } else {
                tracker.flush_if_due()?;
            }
        }
        // Finish what is in flight: close the queues, let the threads drain them.
        drop(source);
        if dispatcher.finish() {
            fatal.get_or_insert(Error::HandlerPanicked {
                processor: self.name.clone(),
            });
        }
        if let Some(source) = keeper.take_lost() {
            fatal.get_or_insert(Error::ProcessorLockLost {
                name: self.name.clone(),
                source,
            });
        }
        self.collect(dispatcher.done(), &mut flight, summary, &mut fatal);
        // Without the lock nothing is written (a write would fail anyway: it goes
        // through the lock's session): another instance, or a reset, may own the
        // checkpoint now.
        if !keeper.is_lost() {
            if let Some(p) = flight.low_water.take() {
                tracker.update(p)?;
            }
            if fatal.is_none() && flight.queue.is_empty() {
                if let Some(p) = scan.read_past(tracker.position())? {
                    tracker.update(p)?;
                }
            }
            tracker.flush()?;
        }
        summary.checkpoint = tracker.saved_position();
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Takes the finished events off the done channel and moves the low-water mark.
    fn collect(
        &self,
        done: &Receiver<Done>,
        flight: &mut InFlight,
        summary: &mut WorkerSummary,
        fatal: &mut Option<Error>,
    ) {
        for d in done.try_iter() {
            summary.retries += d.retries as u64;
            match d.outcome {
                Outcome::Handled => summary.handled += 1,
                Outcome::Skipped => summary.skipped += 1,
                Outcome::Parked => summary.parked += 1,
                Outcome::Failed(e) => {
                    fatal.get_or_insert(e);
                    continue;
                }
                // Left for the next run (stopped or aborted during its retries), or
                // (only in consumer groups) no longer this member's.
                Outcome::Unfinished | Outcome::Revoked => continue,
            }
            flight.finish(d.seq);
        }
    }
}

/// The handler threads of one run, with the processor lock (or a group membership).
///
/// Dropped on any path (an error returned early included), it closes the queues, tells
/// the threads to skip what is still queued, waits for them, and only then releases the
/// lock: once another instance can take the lock, no thread of this one is running a
/// handler. [`Dispatcher::finish`] is the graceful end, where the threads drain their
/// queues first.
pub(crate) struct Dispatcher {
    queues: Vec<Sender<Job>>,
    router: Router,
    threads: Vec<JoinHandle<()>>,
    /// Set by a thread whose handler failed for good, by a worker's `LockKeeper` when
    /// the lock is lost, and by `drop`: queued events are skipped, unfinished, so the
    /// checkpoint stays before them.
    abort: Arc<AtomicBool>,
    /// Whether the processor may have dead letters (see
    /// [`Dispatcher::may_have_dead_letters`]).
    dead_letters: Arc<AtomicBool>,
    /// Whether the handler is a plain one.
    plain: bool,
    done: Receiver<Done>,
    /// Released after the threads have ended (fields drop after `Drop::drop`): the
    /// membership of a group member. (A worker's processor lock is held by its
    /// `LockKeeper`, dropped after the dispatcher.)
    _guard: Box<dyn Send>,
}

impl Dispatcher {
    /// `lock`: a worker's processor lock, checked before a failing handler is retried.
    /// `stop`: the run's stop flag, which ends a failing handler's retries (as the abort
    /// flag does). `queue`: events queued per thread before a send waits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        worker: &Worker,
        handler: Handler,
        guard: Box<dyn Send>,
        fence: Option<Arc<dyn Fence>>,
        lock: Option<HeldLock>,
        stop: Arc<AtomicBool>,
        queue: usize,
    ) -> Dispatcher {
        let abort = Arc::new(AtomicBool::new(false));
        let dead_letters = Arc::new(AtomicBool::new(false));
        let plain = matches!(handler, Handler::Plain(_));
        let (done_tx, done) = unbounded::<Done>();
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        let router = Router::new(worker.threads, queue);
        for i in 0..worker.threads {
            let (tx, rx) = bounded::<Job>(queue);
            queues.push(tx);
            let mut ctx =
                ThreadContext::new(worker, handler.clone(), abort.clone(), done_tx.clone());
            ctx.fence = fence.clone();
            ctx.stop = stop.clone();
            ctx.lock = lock.clone();
            ctx.dead_letters = dead_letters.clone();
            let finished = router.finished[i].clone();
            threads.push(
                thread::Builder::new()
                    .name(format!("pg-eventstore-handler-{i}"))
                    .spawn(move || ctx.run(rx, &finished))
                    .expect("spawn a handler thread"),
            );
        }
        Dispatcher {
            queues,
            router,
            threads,
            abort,
            dead_letters,
            plain,
            done,
            _guard: guard,
        }
    }

    /// Sets whether processor `name` may have dead letters, from the table, when its
    /// handler is a plain one: the handler threads then remove the dead letter of each
    /// event they handle (a transactional handler's claim does that in its
    /// transaction). Called before events are sent, and by a group member after it took
    /// partitions (another member may have parked their events); a thread that parks an
    /// event sets it too. One query, not one per event.
    pub(crate) fn may_have_dead_letters(&self, worker: &Worker) -> Result<()> {
        if !self.plain {
            return Ok(());
        }
        let name = &worker.name;
        let found: bool = worker
            .store
            .run("read", &worker.store.sql().has_dead_letters, |c, s| {
                c.query_one(s, &[name])
            })?
            .get(0);
        if found {
            self.dead_letters.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Queues an event on its stream's thread (see [`Router`]); `false` when that
    /// thread is gone.
    fn send(&mut self, job: Job) -> bool {
        let (key, thread) = self.router.route(&job.event.stream_id);
        let sent = self.queues[thread].send(job).is_ok();
        if sent {
            self.router.sent(key, thread);
        }
        sent
    }

    /// Queues an event on its stream's thread, waiting at most `wait` for room: the job
    /// comes back in `Ok(Some(..))` when there was none, and `Err` says the thread is
    /// gone.
    pub(crate) fn send_within(
        &mut self,
        job: Job,
        wait: Duration,
    ) -> std::result::Result<Option<Job>, ()> {
        let (key, thread) = self.router.route(&job.event.stream_id);
        match self.queues[thread].send_timeout(job, wait) {
            Ok(()) => {
                self.router.sent(key, thread);
                Ok(None)
            }
            Err(crossbeam_channel::SendTimeoutError::Timeout(job)) => Ok(Some(job)),
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => Err(()),
        }
    }

    pub(crate) fn done(&self) -> &Receiver<Done> {
        &self.done
    }

    /// The abort flag: once set, the handler threads skip what is queued (unfinished),
    /// failing handlers are not retried, and a group member's threads stop waiting for
    /// a lease renewal.
    pub(crate) fn abort_flag(&self) -> Arc<AtomicBool> {
        self.abort.clone()
    }

    /// Whether a handler failed for good (the worker then stops).
    pub(crate) fn has_failed(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Closes the queues and waits until the threads have handled what is in them.
    /// Returns whether a thread panicked.
    pub(crate) fn finish(&mut self) -> bool {
        self.queues.clear();
        let mut panicked = false;
        for t in self.threads.drain(..) {
            panicked |= t.join().is_err();
        }
        panicked
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.abort.store(true, Ordering::Relaxed);
            self.finish();
        }
    }
}

/// How a filtered worker moves its checkpoint past the events its filter leaves out:
/// when nothing is in flight, one query looks at the events after the last one
/// dispatched and below the `$all` horizon; if none of them matches the filter, every
/// one of them has been read, and the checkpoint moves to the last.
struct Scan {
    store: Store,
    filter: Option<ReadAll>,
    interval: Duration,
    last: Option<Instant>,
    /// The position of the last event dispatched.
    dispatched: Option<u64>,
}

impl Scan {
    fn new(worker: &Worker, start: Option<u64>) -> Scan {
        let f = &worker.filter;
        let filtered = f.is_filtered();
        Scan {
            store: worker.store.clone(),
            filter: filtered.then(|| f.clone()),
            interval: worker.checkpoint_interval,
            last: None,
            dispatched: start,
        }
    }

    fn dispatched(&mut self, position: u64) {
        self.dispatched = Some(position);
    }

    fn is_due(&self) -> bool {
        self.filter.is_some() && self.last.is_none_or(|t| t.elapsed() >= self.interval)
    }

    /// The position the checkpoint may move to, if it is past `checkpoint`.
    fn read_past(&mut self, checkpoint: Option<u64>) -> Result<Option<u64>> {
        let Some(filter) = &self.filter else {
            return Ok(None);
        };
        self.last = Some(Instant::now());
        let mut after = self.dispatched.max(checkpoint);
        let mut past = None;
        let mut conn = self.store.conn()?;
        let sql = &self.store.sql().scan_past;
        let statement = self.store.prepared(&mut conn, sql)?;
        loop {
            let bound = after.map_or(-1, |p| p as i64);
            let row = conn
                .query_one(
                    &statement,
                    &[
                        &bound,
                        &filter.category,
                        &filter.event_types,
                        &SCAN_PAGE,
                        &filter.streams,
                    ],
                )
                .map_err(|e| self.store.map_error(e))?;
            let (count, last, matched): (i64, Option<i64>, bool) =
                (row.get(0), row.get(1), row.get(2));
            match last {
                Some(last) if !matched => {
                    past = Some(last as u64);
                    after = past;
                }
                _ => return Ok(past),
            }
            if count < SCAN_PAGE {
                return Ok(past);
            }
        }
    }
}

enum Mode {
    Live,
    Batch,
}

enum Source {
    Live(Box<crate::Subscription>),
    Batch(Box<UpToHead>),
}

/// Every event committed when the batch started, including events that still wait
/// behind an open appending transaction for the `$all` horizon: one read that waits, for
/// as long as it takes, until the horizon has passed the log's tip as it was at the start,
/// and reads below that horizon (see [`ReadAll::wait_at_most`]).
struct UpToHead {
    events: crate::Events,
}

impl UpToHead {
    fn new(store: &Store, options: ReadAll) -> Result<UpToHead> {
        Ok(UpToHead {
            events: store.read_all(options.wait_at_most(Duration::MAX))?,
        })
    }

    fn next(&mut self) -> Option<Result<RecordedEvent>> {
        self.events.next()
    }
}

thread_local! {
    /// The handler statements of the pooled connection whose transaction this thread's
    /// transactional handler runs in, while it runs (see [`Worker::prepare_cached`]).
    static HANDLER_STATEMENTS: RefCell<Option<HashMap<String, Statement>>> =
        const { RefCell::new(None) };
}

/// Statements a transactional handler prepared with [`Worker::prepare_cached`], kept in
/// the pooled connection's extensions between transactions.
#[derive(Default)]
struct HandlerStatements(HashMap<String, Statement>);

/// Runs `f` (which opens a transaction on `conn` and calls the handler) with `conn`'s
/// handler statements available to [`Worker::prepare_cached`] on this thread. They are
/// kept for the connection's next transaction only when `f` succeeds. After a failure
/// the connection forgets them and the store's statements too, and prepares them again
/// at their next use: a session that lost them (`DEALLOCATE ALL`) fails one
/// transaction, not every retry. (The handler's error is its own type, so whether it
/// was a missing statement is not looked into; failures are rare, and preparing the
/// few statements again costs one round trip each.)
fn with_handler_statements<T, E>(
    conn: &mut Conn,
    f: impl FnOnce(&mut Conn) -> Result<T, E>,
) -> Result<T, E> {
    let cache = PooledConnection::extensions_mut(conn)
        .remove::<HandlerStatements>()
        .unwrap_or_default();
    HANDLER_STATEMENTS.with(|c| *c.borrow_mut() = Some(cache.0));
    let out = f(conn);
    let cache = HANDLER_STATEMENTS.with(|c| c.borrow_mut().take().unwrap_or_default());
    let extensions = PooledConnection::extensions_mut(conn);
    if out.is_ok() {
        extensions.insert(HandlerStatements(cache));
    } else {
        extensions.remove::<crate::store::Statements>();
    }
    out
}

/// How a transactional handler's thread groups events into one transaction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batch {
    pub(crate) max_events: usize,
    max_wait: Duration,
}

impl Batch {
    /// `first` and what follows it on the queue: at most `max_events`, waiting at most
    /// `max_wait` for more.
    fn collect(&self, first: Job, rx: &Receiver<Job>) -> Vec<Job> {
        let deadline = Instant::now() + self.max_wait;
        let mut batch = vec![first];
        while batch.len() < self.max_events {
            let next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(_) if self.max_wait.is_zero() => None,
                Err(_) => rx.recv_deadline(deadline).ok(),
            };
            match next {
                Some(item) => batch.push(item),
                None => break,
            }
        }
        batch
    }
}

/// The wait before retry number `attempt` (from 1) of a failing handler: the crate's
/// capped, jittered backoff from `base`.
fn retry_wait(base: Duration, attempt: u32) -> Duration {
    crate::retry::Backoff::new(base, crate::retry::MAX_DELAY).delay(attempt)
}

/// Which handler thread gets an event. A stream stays on one thread while any of its
/// events is queued or being handled there, so its events are handled one at a time and
/// in order; once a thread has finished them all (a transactional handler's transaction
/// committed), the stream's next event goes to the thread with the fewest events queued.
/// A fixed stream-to-thread hash would leave threads idle whenever the hash spreads the
/// busy streams unevenly: 200 streams of 100 events hashed over 4 threads put 61 streams
/// on one thread and 37 on another, and the run lasted as long as the busiest thread.
struct Router {
    /// Events sent to each thread, ever.
    sent: Vec<u64>,
    /// Events each thread has finished, ever (its handler thread counts them).
    finished: Vec<Arc<AtomicU64>>,
    /// Stream (by hash) → its thread and the count `sent` reached with its last event
    /// there. Streams whose hashes collide share a route, which costs nothing but balance.
    routes: HashMap<u64, (usize, u64)>,
    /// Where the search for the least busy thread starts, so that ties rotate.
    next: usize,
    /// The size of `routes` at which finished routes are dropped.
    prune_at: usize,
}

impl Router {
    fn new(threads: usize, queue: usize) -> Router {
        Router {
            sent: vec![0; threads],
            finished: (0..threads).map(|_| Arc::new(AtomicU64::new(0))).collect(),
            routes: HashMap::new(),
            next: 0,
            // At most `threads * queue` events are queued, so after pruning at most
            // that many routes remain.
            prune_at: 2 * threads * queue.max(1),
        }
    }

    /// The stream's key and the thread for its next event.
    fn route(&mut self, stream: &str) -> (u64, usize) {
        let mut h = DefaultHasher::new();
        stream.hash(&mut h);
        let key = h.finish();
        if let Some(&(thread, last)) = self.routes.get(&key) {
            if self.finished[thread].load(Ordering::Acquire) < last {
                return (key, thread);
            }
        }
        let n = self.sent.len();
        let thread = (0..n)
            .map(|i| (self.next + i) % n)
            .min_by_key(|&t| self.sent[t] - self.finished[t].load(Ordering::Acquire))
            .expect("a worker has at least one thread");
        self.next = (thread + 1) % n;
        (key, thread)
    }

    /// Records that the stream's event went to `thread`.
    fn sent(&mut self, key: u64, thread: usize) {
        self.sent[thread] += 1;
        self.routes.insert(key, (thread, self.sent[thread]));
        if self.routes.len() >= self.prune_at {
            let finished: Vec<u64> = self
                .finished
                .iter()
                .map(|f| f.load(Ordering::Acquire))
                .collect();
            self.routes.retain(|_, &mut (t, last)| finished[t] < last);
        }
    }
}

/// Dispatched events in order, and which are finished: the checkpoint may move past an
/// event only when it and everything before it is finished.
#[derive(Default)]
struct InFlight {
    /// (sequence number, position, finished), oldest first.
    queue: VecDeque<(u64, u64, bool)>,
    /// A new low-water mark to write, if it moved.
    low_water: Option<u64>,
}

impl InFlight {
    fn push(&mut self, seq: u64, position: u64) {
        self.queue.push_back((seq, position, false));
    }

    fn finish(&mut self, seq: u64) {
        if let Some(front) = self.queue.front() {
            let index = (seq - front.0) as usize;
            if let Some(slot) = self.queue.get_mut(index) {
                slot.2 = true;
            }
        }
        while let Some(&(_, position, true)) = self.queue.front() {
            self.low_water = Some(position);
            self.queue.pop_front();
        }
    }
}

/// What a handler thread did with one event.
pub(crate) struct Done {
    pub(crate) seq: u64,
    pub(crate) retries: u32,
    pub(crate) outcome: Outcome,
    /// The lease the event was dispatched under (consumer groups).
    pub(crate) lease: Option<Lease>,
}

pub(crate) enum Outcome {
    Handled,
    Skipped,
    Parked,
    Failed(Error),
    /// Not handled: the member no longer holds the event's partition (consumer groups).
    Revoked,
    /// Not handled: its handler was failing and being retried when the run was stopped
    /// or aborted (a lost lock, another thread's fatal failure). The checkpoint stays
    /// before it, and the next run handles it again.
    Unfinished,
}

/// What a transactional handler's transaction did with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxOutcome {
    Handled,
    /// An earlier transaction had committed it (its claim was there).
    Skipped,
    /// The lease of its partition was gone (consumer groups): nothing was written.
    Revoked,
}

struct ThreadContext {
    store: Store,
    name: String,
    handler: Handler,
    retries: u32,
    retry_delay: Duration,
    on_failure: OnFailure,
    failed: Arc<AtomicBool>,
    /// The run's stop flag: a failing handler is not retried once it is set.
    stop: Arc<AtomicBool>,
    /// A worker's processor lock: checked before each retry of a failing handler, so
    /// that a retry never runs on after the lock's session ended (the keeper checks it
    /// only four times a second).
    lock: Option<HeldLock>,
    /// The processor may have dead letters: a plain handler's thread removes the dead
    /// letter of each event it handles (see [`Dispatcher::may_have_dead_letters`]).
    dead_letters: Arc<AtomicBool>,
    /// This thread left an event unfinished: it handles nothing more (the events queued
    /// after it, of its stream too, wait for the next run), so that order holds.
    abandoned: Cell<bool>,
    done: Sender<Done>,
    /// Replaying dead letters: a transactional handler's guard is the removal of the
    /// dead letter, not the per-stream claim (which later events have moved past).
    replay: bool,
    batch: Batch,
    /// In a consumer group: the lease checks.
    fence: Option<Arc<dyn Fence>>,
}

impl ThreadContext {
    fn new(
        worker: &Worker,
        handler: Handler,
        failed: Arc<AtomicBool>,
        done: Sender<Done>,
    ) -> ThreadContext {
        ThreadContext {
            store: worker.store.clone(),
            name: worker.name.clone(),
            handler,
            retries: worker.retries,
            retry_delay: worker.retry_delay,
            on_failure: worker.on_failure,
            failed,
            stop: Arc::new(AtomicBool::new(false)),
            lock: None,
            dead_letters: Arc::new(AtomicBool::new(false)),
            abandoned: Cell::new(false),
            done,
            replay: false,
            batch: worker.batch,
            fence: None,
        }
    }

    /// Handles what comes on `rx` until it closes, counting in `finished` each event
    /// that is done with (handled and committed, parked, or skipped).
    fn run(self, rx: Receiver<Job>, finished: &AtomicU64) {
        while let Ok(first) = rx.recv() {
            let n = if self.failed.load(Ordering::Relaxed) || self.abandoned.get() {
                1 // after a fatal failure or an unfinished event nothing more is
                  // handled: order matters
            } else {
                match &self.handler {
                    Handler::Tx(h) if self.batch.max_events > 1 => {
                        let batch = self.batch.collect(first, &rx);
                        let n = batch.len();
                        self.in_batch(h.as_ref(), batch);
                        n
                    }
                    _ => {
                        self.one(first);
                        1
                    }
                }
            };
            finished.fetch_add(n as u64, Ordering::Release);
        }
    }

    /// Handles one event on its own, with retries, and reports it.
    fn one(&self, job: Job) {
        if self.failed.load(Ordering::Relaxed) || self.abandoned.get() {
            return;
        }
        // A panicking handler is a fatal failure like any other: the worker stops with
        // the checkpoint before the event, instead of running on without this thread.
        let (outcome, retries) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.handle(&job.event, job.lease)
        }))
        .unwrap_or_else(|_| {
            let panicked = Error::HandlerPanicked {
                processor: self.name.clone(),
            };
            (Outcome::Failed(panicked), 0)
        });
        if matches!(outcome, Outcome::Unfinished) {
            self.abandoned.set(true);
        }
        self.report(job.seq, job.lease, retries, outcome);
    }

    fn report(&self, seq: u64, lease: Option<Lease>, retries: u32, outcome: Outcome) {
        match &outcome {
            Outcome::Failed(_) => self.failed.store(true, Ordering::Relaxed),
            Outcome::Revoked => {
                if let Some(f) = &self.fence {
                    f.revoked(1);
                }
            }
            _ => {}
        }
        let _ = self.done.send(Done {
            seq,
            retries,
            outcome,
            lease,
        });
    }

    /// Handles a group of events in one transaction with their claims. If anything in
    /// it fails, it is rolled back and the events are handled one by one instead, each
    /// in its own transaction with the worker's retries, so that a failing event gets
    /// the same treatment (retries, then stop or park) as without grouping.
    fn in_batch(&self, h: &TxHandler, batch: Vec<Job>) {
        // A panic in the group rolls it back like an error; handled one by one, the
        // event that panics then stops the worker.
        let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.commit_batch(h, &batch)
        }))
        .unwrap_or_else(|_| Err("a handler panicked".into()));
        match committed {
            Ok(outcomes) => {
                for (job, outcome) in batch.iter().zip(outcomes) {
                    let outcome = match outcome {
                        TxOutcome::Handled => Outcome::Handled,
                        TxOutcome::Skipped => Outcome::Skipped,
                        TxOutcome::Revoked => Outcome::Revoked,
                    };
                    self.report(job.seq, job.lease, 0, outcome);
                }
            }
            Err(e) => {
                crate::metrics::worker_error(&self.name, "batch");
                tracing::debug!(
                    processor = %self.name,
                    events = batch.len(),
                    error = %crate::error::chain(e.as_ref()),
                    "pg-eventstore: a group of events failed, handling them one by one"
                );
                for item in batch {
                    self.one(item);
                }
            }
        }
    }

    /// One transaction: (in a consumer group, locks the leases of the events'
    /// partitions and leaves out the events of partitions no longer held,) reads and
    /// locks the claims of the group's streams, runs the handler on every event not
    /// claimed yet, moves the claims, commits. Returns what happened to each event.
    fn commit_batch(&self, h: &TxHandler, batch: &[Job]) -> Result<Vec<TxOutcome>, HandlerError> {
        let mut conn: Conn = self.store.conn()?;
        with_handler_statements(&mut conn, |conn| self.commit_batch_on(conn, h, batch))
    }

    fn commit_batch_on(
        &self,
        conn: &mut Conn,
        h: &TxHandler,
        batch: &[Job],
    ) -> Result<Vec<TxOutcome>, HandlerError> {
        let sql = &self.store.sql();
        let read = self.store.prepared(conn, &sql.read_claims)?;
        let write = self.store.prepared(conn, &sql.write_claims)?;
        let fence = match &self.fence {
            Some(f) => Some((f, f.prepare(&self.store, conn)?)),
            None => None,
        };
        let mut tx = conn.transaction()?;
        let revoked = match &fence {
            Some((f, statement)) => {
                let mut leases: Vec<Lease> = batch.iter().filter_map(|j| j.lease).collect();
                leases.sort_unstable_by_key(|l| (l.partition, l.epoch));
                leases.dedup();
                // By lease, not by partition: a batch can hold events of one partition
                // read under two epochs (queued before this member lost it and after it
                // took it again), and only the current epoch's may be handled.
                let held = f.check(&mut tx, statement, &leases)?;
                batch
                    .iter()
                    .map(|j| j.lease.is_some_and(|l| !held.contains(&l)))
                    .collect()
            }
            None => vec![false; batch.len()],
        };
        let mut streams: Vec<&str> = batch
            .iter()
            .zip(&revoked)
            .filter(|(_, r)| !**r)
            .map(|(j, _)| j.event.stream_id.as_str())
            .collect();
        streams.sort_unstable();
        streams.dedup();
        // stream -> (claimed version, whether a claim row exists, last version handled here)
        let mut claims: HashMap<&str, (Option<i64>, bool, Option<i64>)> =
            streams.iter().map(|s| (*s, (None, false, None))).collect();
        for row in tx.query(&read, &[&self.name, &streams])? {
            let stream: &str = row.get(0);
            if let Some(c) = claims.get_mut(stream) {
                *c = (Some(row.get(1)), true, None);
            }
        }
        let mut handled = Vec::with_capacity(batch.len());
        let mut handled_ids = Vec::new();
        for (job, revoked) in batch.iter().zip(revoked) {
            if revoked {
                handled.push(TxOutcome::Revoked);
                continue;
            }
            let event = &job.event;
            let claim = claims
                .get_mut(event.stream_id.as_str())
                .expect("every stream of the group");
            let version = event.version as i64;
            if claim.0.is_some_and(|c| c >= version) {
                handled.push(TxOutcome::Skipped);
                continue;
            }
            h(&mut tx, event)?;
            claim.2 = Some(version);
            handled.push(TxOutcome::Handled);
            handled_ids.push(event.id);
        }
        let (mut ids, mut versions, mut existed) = (Vec::new(), Vec::new(), Vec::new());
        for (stream, (_, exists, last)) in &claims {
            if let Some(last) = last {
                ids.push(*stream);
                versions.push(*last);
                existed.push(*exists);
            }
        }
        if !ids.is_empty() {
            // Rows that existed are locked by this transaction; a new one that another
            // transaction inserted meanwhile fails the insert, and the group rolls back.
            let written: i64 = tx
                .query_one(
                    &write,
                    &[&self.name, &ids, &versions, &existed, &handled_ids],
                )?
                .get(0);
            if written != ids.len() as i64 {
                return Err("the claims of a group of events moved during its transaction".into());
            }
        }
        tx.commit()?;
        Ok(handled)
    }

    fn handle(&self, event: &RecordedEvent, lease: Option<Lease>) -> (Outcome, u32) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match &self.handler {
                Handler::Plain(h) => match (&self.fence, lease) {
                    (Some(f), Some(l)) if !f.hold(l, &self.failed) => Ok(TxOutcome::Revoked),
                    _ => h(event).map(|()| TxOutcome::Handled),
                },
                Handler::Tx(h) => self.in_transaction(h.as_ref(), event, lease),
            };
            match result {
                Ok(TxOutcome::Handled) => {
                    if matches!(self.handler, Handler::Plain(_)) {
                        self.forget_dead_letter(event);
                    }
                    return (Outcome::Handled, attempt - 1);
                }
                Ok(TxOutcome::Skipped) => return (Outcome::Skipped, attempt - 1),
                Ok(TxOutcome::Revoked) => return (Outcome::Revoked, attempt - 1),
                Err(e) if attempt <= self.retries => {
                    let wait = retry_wait(self.retry_delay, attempt);
                    crate::metrics::worker_error(&self.name, "handler");
                    tracing::warn!(
                        processor = %self.name,
                        stream = %event.stream_id,
                        position = event.position,
                        attempt,
                        retries = self.retries,
                        wait_ms = wait.as_millis() as u64,
                        error = %crate::error::chain(e.as_ref()),
                        "pg-eventstore: handler failed, retrying"
                    );
                    if !self.wait_to_retry(wait) || self.lock.as_ref().is_some_and(|l| !l.check()) {
                        return (Outcome::Unfinished, attempt - 1);
                    }
                }
                Err(e) => {
                    let error = Error::Handler {
                        processor: self.name.clone(),
                        stream: event.stream_id.clone(),
                        position: event.position,
                        attempts: attempt,
                        source: e,
                    };
                    let outcome = match self.on_failure {
                        OnFailure::Stop => Outcome::Failed(error),
                        OnFailure::Park => match self.park(event, attempt, &error) {
                            Ok(()) => {
                                self.dead_letters.store(true, Ordering::Relaxed);
                                crate::metrics::worker_error(&self.name, "parked");
                                tracing::error!(
                                    processor = %self.name,
                                    stream = %event.stream_id,
                                    position = event.position,
                                    attempts = attempt,
                                    error = %error,
                                    "pg-eventstore: handler failed, event parked"
                                );
                                Outcome::Parked
                            }
                            Err(e) => Outcome::Failed(e),
                        },
                    };
                    return (outcome, attempt - 1);
                }
            }
        }
    }

    /// After a plain handler succeeded on `event`: removes its dead letter, if an earlier
    /// attempt parked it (a crash or a takeover before the checkpoint passed it, or a
    /// checkpoint moved back), so that a replay does not handle it again. Only when the
    /// processor may have dead letters: no statement per event otherwise. A failure is
    /// logged, not fatal: the handler's work is done, and a plain handler's delivery is
    /// at-least-once.
    fn forget_dead_letter(&self, event: &RecordedEvent) {
        if self.replay || !self.dead_letters.load(Ordering::Relaxed) {
            return; // a replay removes the dead letter itself
        }
        if let Err(e) = self.store.delete_dead_letter(&self.name, event.id) {
            crate::metrics::worker_error(&self.name, "dead_letter");
            tracing::warn!(
                processor = %self.name,
                stream = %event.stream_id,
                position = event.position,
                error = %crate::error::chain(&e),
                "pg-eventstore: could not remove the dead letter of an event handled again"
            );
        }
    }

    /// Waits `wait` before a retry; `false` (at once) when the run is stopped or aborted
    /// meanwhile: the event is then left unfinished, for the next run, instead of being
    /// retried beside an instance that may have taken the lock, or keeping a stop
    /// waiting for every remaining retry.
    fn wait_to_retry(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.failed.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            thread::sleep(left.min(Duration::from_millis(10)));
        }
    }

    /// Runs a transactional handler after claiming the event for this processor (in a
    /// consumer group, after checking the lease of its partition).
    fn in_transaction(
        &self,
        h: &TxHandler,
        event: &RecordedEvent,
        lease: Option<Lease>,
    ) -> Result<TxOutcome, HandlerError> {
        let mut conn: Conn = self.store.conn()?;
        with_handler_statements(&mut conn, |conn| {
            self.in_transaction_on(conn, h, event, lease)
        })
    }

    fn in_transaction_on(
        &self,
        conn: &mut Conn,
        h: &TxHandler,
        event: &RecordedEvent,
        lease: Option<Lease>,
    ) -> Result<TxOutcome, HandlerError> {
        let sql = &self.store.sql();
        if let (Some(f), Some(lease)) = (&self.fence, lease) {
            let statement = f.prepare(&self.store, conn)?;
            let claim = self.store.prepared(conn, &sql.claim_stream_version)?;
            let mut tx = conn.transaction()?;
            if f.check(&mut tx, &statement, &[lease])?.is_empty() {
                return Ok(TxOutcome::Revoked);
            }
            let claimed = tx.query_opt(
                &claim,
                &[
                    &self.name,
                    &event.stream_id,
                    &(event.version as i64),
                    &event.id,
                ],
            )?;
            if claimed.is_none() {
                return Ok(TxOutcome::Skipped);
            }
            h(&mut tx, event)?;
            tx.commit()?;
            return Ok(TxOutcome::Handled);
        }
        let claim = self.store.prepared(conn, &sql.claim_stream_version)?;
        let claim_params: [&(dyn postgres::types::ToSql + Sync); 4] = [
            &self.name,
            &event.stream_id,
            &(event.version as i64),
            &event.id,
        ];
        let claimed = if self.replay {
            let take = self.store.prepared(conn, &sql.take_dead_letter)?;
            let mut tx = conn.transaction()?;
            let taken = tx.query_opt(&take, &[&self.name, &event.id])?;
            if taken.is_some() {
                // Moves the stream's claim up to the event if it is behind (the event was
                // the last one of its stream that the worker tried), so that a run from
                // an earlier checkpoint skips it instead of applying it again.
                tx.query_opt(&claim, &claim_params)?;
            }
            (tx, taken)
        } else {
            let mut tx = conn.transaction()?;
            let claimed = tx.query_opt(&claim, &claim_params)?;
            (tx, claimed)
        };
        let (mut tx, claimed) = claimed;
        if claimed.is_none() {
            return Ok(TxOutcome::Skipped); // the transaction rolls back on drop
        }
        h(&mut tx, event)?;
        tx.commit()?;
        Ok(TxOutcome::Handled)
    }

    fn park(&self, event: &RecordedEvent, attempts: u32, error: &Error) -> Result<()> {
        let mut conn = self.store.conn()?;
        let park = self.store.prepared(&mut conn, &self.store.sql().park)?;
        let text = match error {
            Error::Handler { source, .. } => crate::error::chain(source.as_ref()),
            other => other.to_string(),
        };
        conn.execute(
            &park,
            &[
                &self.name,
                &event.id,
                &event.stream_id,
                &(event.version as i64),
                &(event.position as i64),
                &(attempts as i32),
                &text,
            ],
        )
        .map_err(|e| self.store.map_error(e))?;
        Ok(())
    }
}

/// What [`Worker::replay_dead_letters`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplaySummary {
    /// Dead letters the handler succeeded on: removed from the dead-letter table.
    pub replayed: u64,
    /// Dead letters the handler failed on again, after the worker's retries: kept, with
    /// the new error and attempt count.
    pub failed: u64,
    /// Dead letters whose event is no longer in the log: kept, for you to delete.
    pub missing: u64,
}

impl Worker {
    /// Runs the handler again on every dead letter of this processor, in the global
    /// order, with the worker's retries. A dead letter the handler now succeeds on is
    /// removed; one it fails on again stays, with the new error. Takes the processor's
    /// lock like a run does ([`Worker::if_locked`]): stop the running instance first.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let summary = store.worker("mailer").replay_dead_letters(|event| {
    ///     println!("mail for {} again", event.stream_id);
    ///     Ok(())
    /// })?;
    /// println!("{} replayed, {} failed again", summary.replayed, summary.failed);
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn replay_dead_letters<H>(self, handler: H) -> Result<ReplaySummary>
    where
        H: Fn(&RecordedEvent) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.replay(Handler::Plain(Arc::new(handler)))
    }

    /// Like [`Worker::replay_dead_letters`] with a transactional handler: the handler's
    /// writes commit in one transaction with the removal of the dead letter, so each
    /// replayed event's effects commit exactly once.
    pub fn replay_dead_letters_transactional<H>(self, handler: H) -> Result<ReplaySummary>
    where
        H: Fn(&mut Transaction<'_>, &RecordedEvent) -> Result<(), HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.replay(Handler::Tx(Arc::new(handler)))
    }

    fn replay(self, handler: Handler) -> Result<ReplaySummary> {
        self.check()?;
        let _lock = self.lock(&AtomicBool::new(false))?;
        let (done, _) = unbounded();
        let plain = matches!(handler, Handler::Plain(_));
        let mut ctx = ThreadContext::new(&self, handler, Arc::new(AtomicBool::new(false)), done);
        ctx.on_failure = OnFailure::Park;
        ctx.replay = true;
        let mut summary = ReplaySummary::default();
        for dead in self.store.dead_letters(&self.name)? {
            let event = self.event_at(dead.position)?;
            let Some(event) = event.filter(|e| e.id == dead.event_id) else {
                summary.missing += 1;
                continue;
            };
            match ctx.handle(&event, None).0 {
                Outcome::Handled => {
                    if plain {
                        self.store.delete_dead_letter(&self.name, event.id)?;
                    }
                    summary.replayed += 1;
                }
                // Removed meanwhile, by another replay (Unfinished: never, nothing stops
                // or aborts a replay).
                Outcome::Skipped | Outcome::Revoked | Outcome::Unfinished => {}
                Outcome::Parked => summary.failed += 1,
                Outcome::Failed(e) => return Err(e),
            }
        }
        Ok(summary)
    }

    fn event_at(&self, position: u64) -> Result<Option<RecordedEvent>> {
        let mut conn = self.store.conn()?;
        let sql = &self.store.sql().event_at;
        let statement = self.store.prepared(&mut conn, sql)?;
        let row = conn
            .query_opt(&statement, &[&(position as i64)])
            .map_err(|e| self.store.map_error(e))?;
        row.as_ref().map(RecordedEvent::from_row).transpose()
    }
}

/// Stops a running worker from another thread or a signal handler: a cloneable handle,
/// like [`SubscriptionStopper`](crate::SubscriptionStopper). Made by
/// [`WorkerHandle::stopper`].
///
/// ```no_run
/// # use pg_eventstore::Store;
/// # let store = Store::from_env()?;
/// let worker = store.worker("mailer").spawn(|_| Ok(()))?;
/// let stopper = worker.stopper();
/// std::thread::spawn(move || {
///     // ... on shutdown:
///     stopper.stop();
/// });
/// let summary = worker.join()?; // returns once stopped: in-flight events finished
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct WorkerStopper {
    stop: Arc<AtomicBool>,
}

impl WorkerStopper {
    pub(crate) fn new(stop: Arc<AtomicBool>) -> WorkerStopper {
        WorkerStopper { stop }
    }

    /// Asks the worker to stop: it finishes the events in flight, writes its checkpoint,
    /// and ends (within about 50 ms plus the handler calls in flight). A failing handler
    /// is not retried after the stop: its event (and what its thread had queued after
    /// it) stays after the checkpoint, for the next run. Does not wait.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A running worker. [`WorkerHandle::stop`] shuts it down gracefully: in-flight events
/// finish and the checkpoint is written. Dropping the handle does the same.
pub struct WorkerHandle {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<WorkerSummary>>>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("name", &self.name)
            .field("running", &self.is_running())
            .finish()
    }
}

impl WorkerHandle {
    /// A cloneable handle that stops this worker from anywhere.
    pub fn stopper(&self) -> WorkerStopper {
        WorkerStopper {
            stop: self.stop.clone(),
        }
    }

    /// Asks the worker to stop without waiting; [`WorkerHandle::join`] waits.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the worker is still running (it stops on its own after a fatal error). A
    /// standby ([`IfLocked::Wait`]) waiting for its lock is running: it has not ended.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the worker and waits for it: in-flight events finish (a failing handler is
    /// not retried: its event is left for the next run), the checkpoint is written.
    /// Returns what it did, or the error that stopped it.
    pub fn stop(mut self) -> Result<WorkerSummary> {
        self.request_stop();
        self.wait()
    }

    /// Waits until the worker ends (after a stop request or a fatal error).
    pub fn join(mut self) -> Result<WorkerSummary> {
        self.wait()
    }

    fn wait(&mut self) -> Result<WorkerSummary> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::HandlerPanicked {
                    processor: self.name.clone(),
                })
            }),
            None => Ok(WorkerSummary::default()),
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.request_stop();
        let _ = self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_mark_waits_for_the_oldest() {
        let mut f = InFlight::default();
        for (seq, pos) in [(0, 10), (1, 20), (2, 30)] {
            f.push(seq, pos);
        }
        f.finish(1);
        assert_eq!(f.low_water.take(), None);
        f.finish(0);
        assert_eq!(f.low_water.take(), Some(20));
        f.finish(2);
        assert_eq!(f.low_water.take(), Some(30));
        assert!(f.queue.is_empty());
    }

    #[test]
    fn retry_waits_are_capped() {
        let base = Duration::from_millis(100);
        assert!(retry_wait(base, 1) <= base);
        // `retries(30)`: the 30th wait is at most 30 s, not years.
        assert!(retry_wait(base, 30) <= Duration::from_secs(30));
        let total: Duration = (1..=30).map(|a| retry_wait(base, a)).sum();
        assert!(total <= Duration::from_secs(15 * 60), "{total:?}");
    }

    #[test]
    fn a_stream_stays_on_its_thread_while_its_events_are_unfinished() {
        let mut r = Router::new(3, 4);
        let (a, ta) = r.route("a");
        r.sent(a, ta);
        let (b, tb) = r.route("b");
        r.sent(b, tb);
        assert_ne!(ta, tb, "a new stream goes to an idle thread");
        for _ in 0..3 {
            assert_eq!(r.route("a"), (a, ta));
            r.sent(a, ta);
        }
        // The thread finishes three of a's four events: a stays.
        r.finished[ta].fetch_add(3, Ordering::Release);
        assert_eq!(r.route("a").1, ta);
        // All four finished: a goes to the least busy thread, the one b is not on.
        r.finished[ta].fetch_add(1, Ordering::Release);
        let (_, t) = r.route("a");
        assert_ne!(t, tb);
    }

    #[test]
    fn new_streams_spread_over_the_threads() {
        let mut r = Router::new(4, 8);
        let mut load = [0; 4];
        for s in 0..40 {
            let stream = format!("s-{s}");
            for _ in 0..3 {
                let (key, t) = r.route(&stream);
                r.sent(key, t);
                load[t] += 1;
            }
        }
        assert_eq!(load, [30; 4]);
    }

    #[test]
    fn finished_routes_are_pruned() {
        let mut r = Router::new(2, 2);
        for s in 0..100 {
            let (key, t) = r.route(&format!("s-{s}"));
            r.sent(key, t);
            r.finished[t].fetch_add(1, Ordering::Release);
        }
        assert!(r.routes.len() < r.prune_at, "{}", r.routes.len());
    }
}
