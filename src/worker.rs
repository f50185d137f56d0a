//! A worker that runs a handler over the event log on a pool of threads, with
//! checkpoints, retries, a dead-letter table and graceful shutdown.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use postgres::Transaction;

use crate::checkpoint::validate_processor_name;
use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::read::ReadAll;
use crate::store::{Conn, Store};
use crate::subscription::SubscribeOptions;

/// What a handler returns on failure: any error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The advisory lock class of workers (with the hash of schema and processor name).
const LOCK_CLASS: i32 = 0x5045_5332; // "PES2"
/// Events queued per handler thread before the reader waits.
const QUEUE: usize = 256;

/// What a worker does with an event whose handler still fails after its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Stop the worker and return the error. The checkpoint stays before the event.
    Stop,
    /// Park the event in the `dead_letters` table with the error text and go on.
    Park,
}

/// What a worker does when another worker with the same processor name is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfLocked {
    /// Refuse to start: [`Error::ProcessorLocked`].
    Fail,
    /// Wait until the other one stops (or this one is stopped).
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
enum Handler {
    Plain(Arc<PlainHandler>),
    Tx(Arc<TxHandler>),
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
    store: Store,
    name: String,
    threads: usize,
    /// Which events: the category and event type filters of a `$all` read.
    filter: ReadAll,
    checkpoint_interval: Duration,
    retries: u32,
    retry_delay: Duration,
    on_failure: OnFailure,
    if_locked: IfLocked,
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
    /// are waited for.
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

    fn check(&self) -> Result<()> {
        validate_processor_name(&self.name)?;
        if self.threads == 0 {
            return Err(Error::InvalidInput(
                "a worker needs at least one thread".into(),
            ));
        }
        let max = self.store.inner.config.max_connections as usize;
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
        // Take the lock here, so that "already running" is this call's error.
        let lock = ProcessorLock::acquire(&self.store, &self.name, self.if_locked, &stop)?;
        let flag = stop.clone();
        let name = self.name.clone();
        let thread = thread::Builder::new()
            .name(format!("pg-eventstore-worker-{}", self.name))
            .spawn(move || self.run_locked(handler, Mode::Live, flag, lock))
            .expect("spawn the worker thread");
        Ok(WorkerHandle {
            name,
            stop,
            thread: Some(thread),
        })
    }

    fn run(self, handler: Handler, mode: Mode, stop: Arc<AtomicBool>) -> Result<WorkerSummary> {
        let lock = ProcessorLock::acquire(&self.store, &self.name, self.if_locked, &stop)?;
        self.run_locked(handler, mode, stop, lock)
    }

    fn run_locked(
        self,
        handler: Handler,
        mode: Mode,
        stop: Arc<AtomicBool>,
        lock: ProcessorLock,
    ) -> Result<WorkerSummary> {
        let mut tracker = self
            .store
            .tracker(&self.name)?
            .checkpoint_interval(self.checkpoint_interval);
        let start = tracker.position();
        let mut source = match mode {
            Mode::Batch => {
                let mut options = self.filter.clone();
                options.position = start;
                Source::Batch(UpToHead::new(&self.store, options)?)
            }
            Mode::Live => {
                let mut options = SubscribeOptions::filtered(self.filter.clone());
                if let Some(p) = start {
                    options = options.after(p);
                }
                Source::Live(self.store.subscribe(options)?)
            }
        };

        let failed = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = unbounded::<Done>();
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for i in 0..self.threads {
            let (tx, rx) = bounded::<(u64, RecordedEvent)>(QUEUE);
            queues.push(tx);
            let ctx = ThreadContext {
                store: self.store.clone(),
                name: self.name.clone(),
                handler: handler.clone(),
                retries: self.retries,
                retry_delay: self.retry_delay,
                on_failure: self.on_failure,
                failed: failed.clone(),
                done: done_tx.clone(),
            };
            threads.push(
                thread::Builder::new()
                    .name(format!("pg-eventstore-handler-{i}"))
                    .spawn(move || ctx.run(rx))
                    .expect("spawn a handler thread"),
            );
        }
        drop(done_tx);

        let mut flight = InFlight::default();
        let mut summary = WorkerSummary::default();
        let mut fatal: Option<Error> = None;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed) {
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
                    let queue = &queues[thread_for(&event.stream_id, self.threads)];
                    if queue.send((seq, event)).is_err() {
                        break; // a handler thread is gone: only after a fatal failure
                    }
                    seq += 1;
                }
                Some(Err(e)) => match &source {
                    // A live subscription carries on after an error; a batch read cannot.
                    Source::Live(_) => {}
                    Source::Batch(_) => {
                        fatal = Some(e);
                        break;
                    }
                },
                None => {}
            }
            self.collect(&done_rx, &mut flight, &mut summary, &mut fatal);
            match flight.low_water.take() {
                Some(p) => tracker.update(p)?,
                None => tracker.flush_if_due()?,
            }
        }
        // Finish what is in flight: close the queues, let the threads drain them.
        drop(queues);
        drop(source);
        for t in threads {
            if t.join().is_err() {
                fatal.get_or_insert(Error::HandlerPanicked {
                    processor: self.name.clone(),
                });
            }
        }
        self.collect(&done_rx, &mut flight, &mut summary, &mut fatal);
        if let Some(p) = flight.low_water.take() {
            tracker.update(p)?;
        }
        let flushed = tracker.flush();
        summary.checkpoint = tracker.saved_position();
        drop(lock);
        flushed?;
        match fatal {
            Some(e) => Err(e),
            None => Ok(summary),
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
            }
            flight.finish(d.seq);
        }
    }
}

enum Mode {
    Live,
    Batch,
}

enum Source {
    Live(crate::Subscription),
    Batch(UpToHead),
}

/// Every event committed when the batch started, including events that still wait
/// behind a running transaction for the `$all` horizon: reads until the horizon has
/// passed the log's tip as it was at the start.
struct UpToHead {
    store: Store,
    options: ReadAll,
    events: Option<crate::Events>,
    tip: Option<u64>,
}

impl UpToHead {
    fn new(store: &Store, options: ReadAll) -> Result<UpToHead> {
        let (tip, _) = store.tip_and_horizon()?;
        Ok(UpToHead {
            events: Some(store.read_all(options.clone())?),
            store: store.clone(),
            options,
            tip,
        })
    }

    fn next(&mut self) -> Option<Result<RecordedEvent>> {
        loop {
            if let Some(events) = &mut self.events {
                match events.next() {
                    Some(Ok(e)) => {
                        self.options.position = Some(e.position);
                        return Some(Ok(e));
                    }
                    Some(Err(e)) => return Some(Err(e)),
                    None => self.events = None,
                }
            }
            let tip = self.tip?;
            match self.store.tip_and_horizon() {
                Ok((_, horizon)) if horizon > tip => return None,
                Ok(_) => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Some(Err(e)),
            }
            match self.store.read_all(self.options.clone()) {
                Ok(events) => self.events = Some(events),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Which thread handles a stream: always the same one, so a stream stays in order.
fn thread_for(stream: &str, threads: usize) -> usize {
    let mut h = DefaultHasher::new();
    stream.hash(&mut h);
    (h.finish() % threads as u64) as usize
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

struct Done {
    seq: u64,
    retries: u32,
    outcome: Outcome,
}

enum Outcome {
    Handled,
    Skipped,
    Parked,
    Failed(Error),
}

struct ThreadContext {
    store: Store,
    name: String,
    handler: Handler,
    retries: u32,
    retry_delay: Duration,
    on_failure: OnFailure,
    failed: Arc<AtomicBool>,
    done: Sender<Done>,
}

impl ThreadContext {
    fn run(self, rx: Receiver<(u64, RecordedEvent)>) {
        for (seq, event) in rx {
            if self.failed.load(Ordering::Relaxed) {
                continue; // after a fatal failure nothing more is handled: order matters
            }
            // A panicking handler is a fatal failure like any other: the worker stops
            // with the checkpoint before the event, instead of running on without it.
            let (outcome, retries) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(&event)))
                    .unwrap_or_else(|_| {
                        let panicked = Error::HandlerPanicked {
                            processor: self.name.clone(),
                        };
                        (Outcome::Failed(panicked), 0)
                    });
            if matches!(outcome, Outcome::Failed(_)) {
                self.failed.store(true, Ordering::Relaxed);
            }
            let _ = self.done.send(Done {
                seq,
                retries,
                outcome,
            });
        }
    }

    fn handle(&self, event: &RecordedEvent) -> (Outcome, u32) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match &self.handler {
                Handler::Plain(h) => h(event).map(|()| true),
                Handler::Tx(h) => self.in_transaction(h.as_ref(), event),
            };
            match result {
                Ok(true) => return (Outcome::Handled, attempt - 1),
                Ok(false) => return (Outcome::Skipped, attempt - 1),
                Err(_) if attempt <= self.retries => {
                    thread::sleep(self.retry_delay * 2u32.saturating_pow(attempt - 1));
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
                            Ok(()) => Outcome::Parked,
                            Err(e) => Outcome::Failed(e),
                        },
                    };
                    return (outcome, attempt - 1);
                }
            }
        }
    }

    /// Runs a transactional handler after claiming the event for this processor.
    /// Returns `Ok(false)` when an earlier run already committed it.
    fn in_transaction(&self, h: &TxHandler, event: &RecordedEvent) -> Result<bool, HandlerError> {
        let mut conn: Conn = self.store.conn()?;
        let claim = self.store.prepared(
            &mut conn,
            "claim_stream_version",
            &self.store.inner.sql.claim_stream_version,
        )?;
        let mut tx = conn.transaction()?;
        let claimed = tx.query_opt(
            &claim,
            &[&self.name, &event.stream_id, &(event.version as i64)],
        )?;
        if claimed.is_none() {
            return Ok(false); // the transaction rolls back on drop
        }
        h(&mut tx, event)?;
        tx.commit()?;
        Ok(true)
    }

    fn park(&self, event: &RecordedEvent, attempts: u32, error: &Error) -> Result<()> {
        let mut conn = self.store.conn()?;
        let park = self
            .store
            .prepared(&mut conn, "park", &self.store.inner.sql.park)?;
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

/// A session advisory lock on a dedicated pooled connection, released on drop.
struct ProcessorLock {
    conn: Option<Conn>,
    key: String,
}

impl ProcessorLock {
    fn acquire(
        store: &Store,
        name: &str,
        policy: IfLocked,
        stop: &AtomicBool,
    ) -> Result<ProcessorLock> {
        let key = format!("{}:{}", store.schema(), name);
        let mut conn = store.conn()?;
        loop {
            let got: bool = conn
                .query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&LOCK_CLASS, &key],
                )?
                .get(0);
            if got {
                return Ok(ProcessorLock {
                    conn: Some(conn),
                    key,
                });
            }
            if policy == IfLocked::Fail || stop.load(Ordering::Relaxed) {
                return Err(Error::ProcessorLocked {
                    name: name.to_string(),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ProcessorLock {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            // A session lock outlives the caller on a pooled connection: release it, or
            // close the connection if that fails.
            let released = conn.query_one(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                &[&LOCK_CLASS, &self.key],
            );
            if released.is_err() {
                let _ = conn.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())");
            }
        }
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
    /// Asks the worker to stop without waiting; [`WorkerHandle::join`] waits.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the worker is still running (it stops on its own after a fatal error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the worker and waits for it: in-flight events finish, the checkpoint is
    /// written. Returns what it did, or the error that stopped it.
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
    fn a_stream_always_goes_to_the_same_thread() {
        for n in 1..8 {
            let t = thread_for("order-17", n);
            assert!(t < n);
            assert_eq!(t, thread_for("order-17", n));
        }
    }
}
