//! Subscriptions: an iterator that catches up from history, then follows new events.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender};

use crate::error::{Error, Result};
use crate::event::{validate_stream_id, RecordedEvent};
use crate::listener::{Batch, Mailbox};
use crate::read::{Events, ReadAll, ReadStream};
use crate::retry::Backoff;
use crate::store::Store;

/// How often a caught-up `$all` subscription re-reads while committed events wait behind
/// an open appending transaction (see the crate docs on the global order), at first and
/// at most: its end may come with no wake-up (a rollback sends none).
const HELD_BACK_POLL: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(10));
/// The wait after an error, at first and at most.
const ERROR_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// `$all`, through the category, event type and stream filters of a `ReadAll`.
    All(ReadAll),
    Stream(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Beginning,
    After(u64),
    Live,
}

/// What a subscription follows and where it starts.
///
/// ```
/// use pg_eventstore::SubscribeOptions;
/// // Every event, from the first one on.
/// let all = SubscribeOptions::all();
/// // Order events after a checkpoint.
/// let orders = SubscribeOptions::category("order-").after(1_234_567);
/// // Only what commits from now on, of two types.
/// let live = SubscribeOptions::all().event_types(["Paid", "Refunded"]).live();
/// // One stream, after version 9.
/// let one = SubscribeOptions::stream("order-7").after(9);
/// # let _ = (all, orders, live, one);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeOptions {
    target: Target,
    start: Start,
    misuse: Option<&'static str>,
}

impl SubscribeOptions {
    /// All events, from the beginning.
    pub fn all() -> Self {
        Self::filtered(ReadAll::from_start())
    }

    /// Events of streams whose id starts with `prefix`, from the beginning.
    pub fn category(prefix: impl Into<String>) -> Self {
        Self::filtered(ReadAll::from_start().category(prefix))
    }

    /// `$all` through the filters of `filter` (its start and count are not used).
    pub(crate) fn filtered(filter: ReadAll) -> Self {
        SubscribeOptions {
            target: Target::All(filter),
            start: Start::Beginning,
            misuse: None,
        }
    }

    /// Events of these streams (their ids, compared exactly), in the global order, from
    /// the beginning; positions are global positions. See [`ReadAll::streams`].
    pub fn streams<I, S>(streams: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::filtered(ReadAll::from_start().streams(streams))
    }

    /// The events of one stream, in version order, from version 0.
    pub fn stream(stream: impl Into<String>) -> Self {
        SubscribeOptions {
            target: Target::Stream(stream.into()),
            start: Start::Beginning,
            misuse: None,
        }
    }

    /// Only events of these types (for `all`, `category` and `streams` subscriptions).
    pub fn event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        match self.target {
            Target::All(filter) => self.target = Target::All(filter.event_types(types)),
            Target::Stream(_) => {
                self.misuse = Some(
                    "event type filters apply to all, category and streams subscriptions, not to one stream",
                )
            }
        }
        self
    }

    /// From the first event on (the default).
    pub fn from_start(mut self) -> Self {
        self.start = Start::Beginning;
        self
    }

    /// After a global position (exclusive) — for a stream subscription, after a version.
    /// Pass the last position you processed to go on from there.
    pub fn after(mut self, position_or_version: u64) -> Self {
        self.start = Start::After(position_or_version);
        self
    }

    /// Only events whose transaction commits after the subscription is created.
    pub fn live(mut self) -> Self {
        self.start = Start::Live;
        self
    }
}

impl Store {
    /// Follows events as they are appended: catches up from history first, then goes
    /// live. See [`SubscribeOptions`] for what to follow and where to start, and
    /// [`Subscription`] for how to wait, poll and stop.
    ///
    /// Fails at once with [`Error::NotMigrated`] when the schema has not been created,
    /// and with [`Error::InvalidInput`] for a start position above `i64::MAX`.
    pub fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        if self.schema_version()? == 0 {
            return Err(Error::NotMigrated {
                schema: self.schema().to_string(),
            });
        }
        Subscription::new(self.clone(), options)
    }
}

/// Stops a [`Subscription`] from another thread: a blocked `next()` returns `None`.
#[derive(Clone, Debug)]
pub struct SubscriptionStopper {
    stopped: Arc<AtomicBool>,
    tx: Sender<()>,
}

impl SubscriptionStopper {
    /// Stops the subscription. Its iterator then ends.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.tx.try_send(());
    }
}

/// Whether a stream subscription may deliver the next version of its stream from a
/// batch (a notification's events) without reading. A read returns only versions at or
/// above the stream's `$tb` (and the delete markers), which a batch does not know.
/// Batches are trusted after a read that completed with an event that is not a marker
/// (`$tb` was at or below it, so the next version is visible) until a wake-up without
/// events comes (which every metadata write, truncation and delete sends, and which may
/// mean that `$tb` moved); before that, a batch that holds the next version is not
/// taken, and a read that starts after it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Batches {
    /// Taken when they hold the next version.
    Trusted,
    /// A wake-up without events came since the last such read, or there was none yet.
    Doubtful,
    /// A batch with the next version was refused; the next read to complete started
    /// after it.
    Confirming,
}

/// Where a subscription has got to.
#[derive(Debug)]
enum Cursor {
    /// `$all`: the last position delivered (`None`: nothing yet, from the start).
    Position(Option<u64>),
    /// One stream: the next version to deliver.
    Version(u64),
}

/// A subscription: an `Iterator<Item = Result<RecordedEvent>>` that first catches up from
/// history, then blocks for new events. Made by [`Store::subscribe`].
///
/// Events come in strictly increasing global position (a stream subscription: in version
/// order), each once, with the guarantee of [`Store::read_all`]: an event that commits
/// late with a smaller position is never skipped.
///
/// Wake-ups come from the store's listener (`LISTEN`), from appends made through the same
/// store, and from a safety poll ([`Config::poll_interval`](crate::Config::poll_interval)).
/// The events are read from the table, with one exception: an append through another
/// store's pool (another process, mostly) may carry its events in its notification,
/// and the subscription delivers them from there when they are the very next events it
/// would read, which the append proves with the position before its first event and
/// with no other transaction holding an id at that moment (see "Live delivery" in the
/// crate docs). A stream subscription takes them only after a read has shown that the
/// stream's `$tb` does not hide them, and reads again after every wake-up without events
/// (metadata writes, truncations and deletes send one; from another process it comes
/// through its notifier, a moment after the write). An error (the database is down,
/// say) is yielded as an `Err` item and the subscription carries on from where it was:
/// the next call retries after a backoff. Only [`Subscription::stop`] ends it.
///
/// ```no_run
/// # use pg_eventstore::{Store, SubscribeOptions};
/// # let store = Store::from_env()?;
/// for event in store.subscribe(SubscribeOptions::all())? {
///     let event = event?;
///     println!("{} {}", event.position, event.event_type);
/// }
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
pub struct Subscription {
    store: Store,
    target: Target,
    cursor: Cursor,
    /// Live `$all` subscriptions skip what was visible when they were created.
    before_snapshot: Option<String>,
    /// The same snapshot, to leave out the events of a notification. `None` with a
    /// `before_snapshot` that this version cannot parse: then it reads instead.
    before: Option<SnapshotIds>,
    /// `$all`: the position up to which every event this subscription follows has been
    /// delivered (or left out): the last one delivered, or, after a read, the position
    /// below the read's horizon. Events that a notification carries are delivered only
    /// when the newest event before them is at or below it.
    scanned: Option<u64>,
    read: Option<Events>,
    /// Events taken from notifications, to deliver before anything else.
    pending: VecDeque<RecordedEvent>,
    /// Whether the table must be read when no read is open and nothing is pending:
    /// at first, after an error or a wait that timed out, and when a wake-up came that
    /// no notification's events account for.
    read_due: bool,
    id: u64,
    wake: Receiver<()>,
    mail: Arc<Mailbox>,
    stop_rx: Receiver<()>,
    stopper: SubscriptionStopper,
    /// While committed events wait behind an open appending transaction: the pauses
    /// between looks.
    held_back: Option<Backoff>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Stream subscriptions: whether batches are taken (see [`Batches`]).
    batches: Batches,
    /// Stream subscriptions: whether the open read returned an event that is not a
    /// delete marker at or after the version before the cursor, which shows that the
    /// stream's `$tb` was below the cursor.
    tb_below_cursor: bool,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("target", &self.target)
            .field("cursor", &self.cursor)
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl Subscription {
    pub(crate) fn new(store: Store, options: SubscribeOptions) -> Result<Subscription> {
        if let Some(msg) = options.misuse {
            return Err(Error::InvalidInput(msg.into()));
        }
        if let Start::After(p) = options.start {
            if p > i64::MAX as u64 {
                return Err(Error::InvalidInput(format!(
                    "cannot subscribe after {p}: positions and versions go up to {}",
                    i64::MAX
                )));
            }
        }
        let mut before_snapshot = None;
        let cursor = match (&options.target, options.start) {
            (Target::All(filter), start) => {
                filter.validate()?;
                match start {
                    Start::Beginning => Cursor::Position(None),
                    Start::After(p) => Cursor::Position(Some(p)),
                    Start::Live => {
                        let (snapshot, horizon) = store.snapshot_and_horizon()?;
                        before_snapshot = Some(snapshot);
                        Cursor::Position(horizon.checked_sub(1))
                    }
                }
            }
            (Target::Stream(stream), start) => {
                validate_stream_id(stream)?;
                match start {
                    Start::Beginning => Cursor::Version(0),
                    Start::After(v) => Cursor::Version(v.saturating_add(1)),
                    Start::Live => {
                        Cursor::Version(store.stream_version(stream)?.map_or(0, |v| v + 1))
                    }
                }
            }
        };
        let (id, wake, mail) = store.hub().subscribe(true);
        let mail = mail.expect("a subscription's mailbox");
        let (tx, stop_rx) = bounded(1);
        let scanned = match cursor {
            Cursor::Position(p) => p,
            Cursor::Version(_) => None,
        };
        Ok(Subscription {
            store,
            target: options.target,
            cursor,
            before: before_snapshot.as_deref().and_then(SnapshotIds::parse),
            before_snapshot,
            scanned,
            read: None,
            pending: VecDeque::new(),
            read_due: true,
            id,
            wake,
            mail,
            stop_rx,
            stopper: SubscriptionStopper {
                stopped: Arc::new(AtomicBool::new(false)),
                tx,
            },
            held_back: None,
            retry_at: None,
            backoff: ERROR_BACKOFF,
            batches: Batches::Doubtful,
            tb_below_cursor: false,
        })
    }

    /// A handle that stops this subscription from another thread.
    pub fn stopper(&self) -> SubscriptionStopper {
        self.stopper.clone()
    }

    /// Stops the subscription: the iterator ends.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Whether the subscription was stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopper.stopped.load(Ordering::SeqCst)
    }

    /// A channel that receives a message whenever new events may be there, to wait on
    /// together with your own channels in `crossbeam_channel::select!`. When it fires,
    /// call [`Subscription::try_next`] until it returns `None`.
    pub fn ready(&self) -> &Receiver<()> {
        &self.wake
    }

    /// Where this `$all` subscription goes on from: the global position of the last event
    /// delivered, or, before the first one, the position it starts after (`p` for
    /// [`SubscribeOptions::after`]`(p)`, the position just below what was visible when a
    /// [`SubscribeOptions::live`] one was made, `None` from the start). A subscription
    /// made with `after(position)` goes on from the same place. `None` for stream
    /// subscriptions.
    pub fn position(&self) -> Option<u64> {
        match self.cursor {
            Cursor::Position(p) => p,
            Cursor::Version(_) => None,
        }
    }

    /// The next event if one can be had without waiting (one query at most),
    /// else `None`.
    pub fn try_next(&mut self) -> Option<Result<RecordedEvent>> {
        // Called by hand, not only after a wake-up that this subscription took itself:
        // whatever a notification brought comes first, then the table is read.
        self.read_due = true;
        self.step()
    }

    /// One step of [`Subscription::try_next`]: an event taken from a notification, the
    /// next of an open read, or the first of a new read when one is due.
    fn step(&mut self) -> Option<Result<RecordedEvent>> {
        if self.is_stopped() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if let Some(event) = self.pending.pop_front() {
            return Some(Ok(self.delivered(event)));
        }
        if self.read.is_some() {
            // `None` when the read is exhausted: what committed since is announced by a
            // wake-up, and the next call reads again.
            return self.next_from_read();
        }
        // A fresh read sees everything that any wake-up taken here announced; one that
        // arrives during the read stays in the channel and triggers the next read.
        let _ = self.wake.try_recv();
        if self.take_mail() {
            self.read_due = true;
        }
        if let Some(event) = self.pending.pop_front() {
            return Some(Ok(self.delivered(event)));
        }
        if !self.read_due {
            return None;
        }
        self.read_due = false;
        self.tb_below_cursor = false;
        match self.open_read() {
            Ok(read) => self.read = Some(read),
            Err(e) => return Some(self.failed(e)),
        }
        self.next_from_read()
    }

    /// Takes the events that notifications brought since the last look, queueing those
    /// this subscription delivers next. Returns whether the table must be read: a
    /// wake-up came without events, or with events it cannot place.
    fn take_mail(&mut self) -> bool {
        let (batches, mut read) = self.mail.take();
        if read {
            // Perhaps a metadata write: no batch for a stream before the next read.
            self.batches = Batches::Doubtful;
        }
        for batch in batches {
            read |= !self.place(&batch);
        }
        read
    }

    /// Queues the events of `batch` that come next for this subscription. False when
    /// it cannot tell: a read decides.
    fn place(&mut self, batch: &Batch) -> bool {
        match (&self.target, &self.cursor) {
            (Target::All(filter), _) => {
                if Some(batch.last()) <= self.scanned {
                    return true; // read already
                }
                // Nothing can come between what this subscription has seen and the
                // batch: the newest event before it is final, and seen.
                let next = batch.is_final
                    && batch.prev <= self.scanned
                    && self.scanned < Some(batch.first());
                let hidden = match (&self.before_snapshot, &self.before) {
                    (None, _) => false,
                    (Some(_), Some(ids)) => ids.sees(batch.first() >> crate::sql::POSITION_BITS),
                    (Some(_), None) => return false,
                };
                if !next {
                    return false;
                }
                if !hidden {
                    let matching = batch.events.iter().filter(|e| filter.matches(e));
                    self.pending.extend(matching.cloned());
                }
                self.scanned = Some(batch.last());
                true
            }
            (Target::Stream(stream), Cursor::Version(v)) => {
                // A stream's versions commit in order, one after the other.
                let mut next = *v + self.pending.len() as u64;
                for event in batch.events.iter().filter(|e| &e.stream_id == stream) {
                    if event.version > next {
                        return false;
                    }
                    if event.version == next && self.batches != Batches::Trusted {
                        // Its `$tb` may hide it: a read decides.
                        self.batches = Batches::Confirming;
                        return false;
                    }
                    if event.version == next {
                        self.pending.push_back(event.clone());
                        next += 1;
                    }
                }
                true
            }
            _ => unreachable!("the cursor always matches the target"),
        }
    }

    /// Moves the cursor past `event`, which is being delivered.
    fn delivered(&mut self, event: RecordedEvent) -> RecordedEvent {
        self.retry_at = None;
        self.backoff.reset();
        match &mut self.cursor {
            Cursor::Position(p) => {
                *p = Some(event.position);
                self.scanned = self.scanned.max(Some(event.position));
            }
            Cursor::Version(v) => *v = event.version + 1,
        }
        crate::metrics::subscription_delivered(event.recorded_at);
        event
    }

    /// The next event, waiting at most `timeout`. `None` when nothing came in time, or
    /// when the subscription was stopped (see [`Subscription::is_stopped`]).
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<RecordedEvent>> {
        self.next_deadline(Some(Instant::now() + timeout))
    }

    fn next_deadline(&mut self, deadline: Option<Instant>) -> Option<Result<RecordedEvent>> {
        loop {
            if self.is_stopped() {
                return None;
            }
            if let Some(item) = self.step() {
                return Some(item);
            }
            if self.retry_at.is_none() && !self.wake.is_empty() {
                continue; // announced during the last read: read again at once
            }
            let poll = match &mut self.held_back {
                Some(pauses) => pauses.next_delay(),
                None => self.store.config().poll_interval,
            };
            let mut until = Instant::now() + poll;
            // Only a retry still ahead shortens the wait: a past one is due now, and the
            // step above has made it.
            if let Some(t) = self.retry_at.filter(|t| *t > Instant::now()) {
                until = t;
            }
            if let Some(d) = deadline {
                until = until.min(d);
            }
            let wait = until.saturating_duration_since(Instant::now());
            select! {
                recv(self.wake) -> _ => {}
                recv(self.stop_rx) -> _ => return None,
                // A safety poll, a look while events are held back, or the deadline.
                default(wait) => self.read_due = true,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // One last look, so that a wake-up at the deadline is not wasted.
                return self.step();
            }
        }
    }

    fn next_from_read(&mut self) -> Option<Result<RecordedEvent>> {
        loop {
            let read = self.read.as_mut()?;
            let event = match read.next() {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Some(self.failed(e)),
                None => {
                    self.read_ended();
                    return None;
                }
            };
            self.tb_below_cursor |= !crate::event::is_marker(&event.event_type);
            match self.cursor {
                // The version before the cursor, delivered already (see `open_read`).
                Cursor::Version(v) if event.version < v => continue,
                _ => return Some(Ok(self.delivered(event))),
            }
        }
    }

    /// The open read has ended: this subscription has caught up.
    fn read_ended(&mut self) {
        let Some(read) = self.read.as_mut() else {
            return;
        };
        // Caught up: do committed events wait behind an open appending
        // transaction? Then look again soon, as its end may bring no wake-up.
        let status = read.status().copied();
        self.read = None;
        // A read that completes ends the error backoff: from here on the
        // subscription waits for wake-ups and its safety poll again.
        self.retry_at = None;
        self.backoff.reset();
        // Reads open only when no batch waits: a read that completes while
        // confirming started after the batch that was refused, and applied the
        // stream's `$tb` of then. One that returned a visible event at or
        // after the version before the cursor shows that `$tb` was below the
        // cursor.
        if self.batches == Batches::Confirming || self.tb_below_cursor {
            self.batches = Batches::Trusted;
        }
        // Everything below the read's horizon that this subscription follows
        // has been delivered now.
        if let Some(h) = &status {
            self.scanned = self.scanned.max(h.horizon.checked_sub(1));
        }
        let held = status.is_some_and(|h| h.holds_back());
        self.held_back = match (held, self.held_back) {
            (false, _) => None,
            (true, None) => Some(HELD_BACK_POLL),
            (true, pauses) => pauses,
        };
        let config = &self.store.config();
        self.store
            .held_back_board()
            .report(self.id, status.as_ref(), config.held_back_warning);
    }

    fn failed(&mut self, e: Error) -> Result<RecordedEvent> {
        self.read = None;
        self.read_due = true;
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
        Err(e)
    }

    fn open_read(&self) -> Result<Events> {
        match (&self.target, &self.cursor) {
            // From the version before the cursor, delivered already and skipped: when
            // it is still visible, the read shows that `$tb` is below the cursor, and
            // batches may be taken (see `Batches`).
            (Target::Stream(stream), Cursor::Version(v)) => self.store.read_stream(
                stream,
                ReadStream::forwards()
                    .from_version(v.saturating_sub(1))
                    .with_markers(),
            ),
            (Target::All(filter), Cursor::Position(p)) => {
                // A subscription never waits inside a read: it delivers what is visible
                // and looks again when woken (or soon, while events are held back).
                let mut options = filter.clone().visible_now();
                options.position = *p;
                // Every event up to the horizon: `scanned` relies on it.
                options.max_count = None;
                options.before_snapshot = self.before_snapshot.clone();
                self.store.read_all(options)
            }
            _ => unreachable!("the cursor always matches the target"),
        }
    }
}

impl Iterator for Subscription {
    type Item = Result<RecordedEvent>;

    /// Blocks until the next event, an error, or [`Subscription::stop`] (then `None`).
    fn next(&mut self) -> Option<Result<RecordedEvent>> {
        self.next_deadline(None)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.read = None;
        self.store.hub().unsubscribe(self.id);
        self.store.held_back_board().remove(self.id);
    }
}

/// The transaction ids of a `pg_snapshot` (`xmin:xmax:xip,...`), to tell which
/// committed transactions it sees.
#[derive(Debug)]
struct SnapshotIds {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl SnapshotIds {
    fn parse(text: &str) -> Option<SnapshotIds> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        parts
            .next()
            .is_none()
            .then_some(SnapshotIds { xmin, xmax, xip })
    }

    /// Whether the snapshot sees the committed transaction `xid`.
    fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotIds;

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = SnapshotIds::parse("10:20:12,15").unwrap();
        assert!(s.sees(9));
        assert!(s.sees(11));
        assert!(!s.sees(12));
        assert!(!s.sees(15));
        assert!(s.sees(19));
        assert!(!s.sees(20));
        let empty = SnapshotIds::parse("7:7:").unwrap();
        assert!(empty.sees(6));
        assert!(!empty.sees(7));
        assert!(SnapshotIds::parse("7:x:").is_none());
        assert!(SnapshotIds::parse("7:8").is_none());
    }
}
