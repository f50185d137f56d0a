//! Wake-ups for subscriptions: one listener thread per store on a dedicated `LISTEN`
//! connection, one notifier thread that tells other processes about our appends, one
//! commit watcher that learns when callers' transactions with `append_in` commit, and
//! the fan-out to subscribers over `crossbeam-channel`.
//!
//! A wake-up is only a hint: subscribers read the events from the table, so a merged,
//! late or lost notification costs latency, never an event. The one exception is a
//! notification that carries its append's events with a valid MAC ([`Batch`]): a
//! subscription delivers those without a read when it can prove they come next (see
//! "Live delivery" in the crate docs).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::tls::Connector;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use fallible_iterator::FallibleIterator;

use crate::error::chain;
use crate::event::{Json, RecordedEvent};
use crate::retry::Backoff;
use crate::sql;
use serde::Deserialize;
use uuid::Uuid;

/// How long one wait for a notification lasts before the listener checks its stop flag.
const LISTEN_ROUND: Duration = Duration::from_millis(100);
/// How long the listener waits before reconnecting, at first and at most.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));

/// The NOTIFY channel of a schema: `<schema>_events`, or the schema name itself when that
/// would not fit PostgreSQL's 63-byte identifiers.
pub(crate) fn channel_name(schema: &str) -> String {
    let name = format!("{schema}_events");
    if name.len() <= 63 {
        name
    } else {
        schema.to_string()
    }
}

/// What the listener knows about its connection, for health checks and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerState {
    /// Whether the listener connection is up and listening.
    pub connected: bool,
    /// How many times it has connected after the first time.
    pub reconnects: u64,
    /// The backend pid of the listener connection (0 when not connected).
    pub backend_pid: i32,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

/// The events of one append of another store (another process, mostly), carried by
/// its notification: see `notify_events` in sql.rs. A subscription delivers them
/// without reading when they are the next events it would read (see
/// `Subscription::take_mail`).
#[derive(Debug)]
pub(crate) struct Batch {
    /// The newest position below the first event's in the append's snapshot (`None`:
    /// there was none).
    pub(crate) prev: Option<u64>,
    /// Whether `prev` is final: no event can ever sort between it and the first event.
    pub(crate) is_final: bool,
    /// All the events of the append's transaction, in position order.
    pub(crate) events: Vec<RecordedEvent>,
}

/// The JSON of a [`Batch`], as the append statement builds it.
#[derive(Deserialize)]
struct Payload {
    prev: Option<i64>,
    #[serde(rename = "final")]
    is_final: bool,
    events: Vec<PayloadEvent>,
}

/// One event of a [`Payload`]: see `event_json` in sql.rs.
#[derive(Deserialize)]
struct PayloadEvent {
    p: i64,
    id: Uuid,
    s: String,
    v: i64,
    t: String,
    d: String,
    m: Option<String>,
    r: i64,
}

/// The keys of the MAC of notifications that carry events (see `m0012_feed_key` in
/// migrate.rs).
struct FeedKey {
    inner: Vec<u8>,
    outer: Vec<u8>,
}

impl FeedKey {
    /// Reads the store's key; `None` when the schema has none yet (before version 12)
    /// or the role may not read it: then notifications only wake subscribers.
    fn load(
        client: &mut postgres::Client,
        schema: &str,
    ) -> Result<Option<FeedKey>, postgres::Error> {
        let table = sql::feed_key_table(schema);
        if !client
            .query_one(sql::FEED_KEY_READABLE, &[&table])?
            .get::<_, bool>(0)
        {
            return Ok(None);
        }
        Ok(client
            .query_opt(&sql::feed_key(schema), &[])?
            .map(|row| FeedKey {
                inner: row.get(0),
                outer: row.get(1),
            }))
    }

    /// Whether `mac` (hex) is the MAC of `json`: `sha256(outer || sha256(inner || json))`.
    fn signed(&self, mac: &str, json: &str) -> bool {
        use sha2::{Digest, Sha256};
        let inner = Sha256::new()
            .chain_update(&self.inner)
            .chain_update(json.as_bytes())
            .finalize();
        let expected = Sha256::new()
            .chain_update(&self.outer)
            .chain_update(inner)
            .finalize();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hex = expected
            .iter()
            .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        let given = mac.as_bytes();
        // Every byte compared, whatever the first difference.
        given.len() == 2 * expected.len() && hex.zip(given).fold(0, |d, (a, b)| d | (a ^ b)) == 0
    }
}

/// The time `micros` microseconds after the Unix epoch (before it when negative), as
/// the store's statements send `recorded_at`.
pub(crate) fn unix_micros(micros: i64) -> Option<SystemTime> {
    let offset = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(offset)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(offset)
    }
}

impl Batch {
    /// The batch, when its events are in position order after `prev` (else `None`: the
    /// subscribers then read).
    pub(crate) fn new(
        prev: Option<i64>,
        is_final: bool,
        events: Vec<RecordedEvent>,
    ) -> Option<Batch> {
        let ordered = events.windows(2).all(|w| w[0].position < w[1].position);
        let prev = match prev {
            None => None,
            Some(prev) => Some(u64::try_from(prev).ok()?),
        };
        let first = events.first()?.position;
        (ordered && prev.is_none_or(|p| p < first)).then_some(Batch {
            prev,
            is_final,
            events,
        })
    }

    /// The batch in a notification's payload: the store's 32 characters, a space, the
    /// MAC in hex, a space, the JSON. `None` for a payload without events (a plain
    /// wake-up), without a key to check it with, with a MAC that does not check out,
    /// and for anything else this version cannot read: the subscriber reads the table
    /// then, as always.
    fn parse(payload: &str, key: Option<&FeedKey>) -> Option<Batch> {
        let (_, signed) = payload.split_once(' ')?;
        let (mac, json) = signed.split_once(' ')?;
        if !key?.signed(mac, json) {
            return None;
        }
        let p: Payload = serde_json::from_str(json).ok()?;
        let events: Vec<RecordedEvent> = p
            .events
            .into_iter()
            .map(|e| {
                Some(RecordedEvent {
                    position: u64::try_from(e.p).ok()?,
                    id: e.id,
                    stream_id: e.s,
                    version: u64::try_from(e.v).ok()?,
                    event_type: e.t,
                    data: Json::from_text(e.d),
                    metadata: e.m.map(Json::from_text),
                    recorded_at: unix_micros(e.r)?,
                })
            })
            .collect::<Option<_>>()?;
        Batch::new(p.prev, p.is_final, events)
    }

    pub(crate) fn first(&self) -> u64 {
        self.events[0].position
    }

    pub(crate) fn last(&self) -> u64 {
        self.events[self.events.len() - 1].position
    }
}

/// What came for one subscriber since it last looked: batches of events, and whether
/// anything else woke it (then it must read the table).
#[derive(Default)]
pub(crate) struct Mailbox(Mutex<Mail>);

#[derive(Default)]
struct Mail {
    batches: VecDeque<Arc<Batch>>,
    read: bool,
}

/// How many batches wait for a subscriber that is busy elsewhere: beyond that the
/// oldest go, and the subscriber reads the table.
const MAILBOX_MAX: usize = 64;

impl Mailbox {
    /// Takes the batches, in the order they came, and whether a read is due.
    pub(crate) fn take(&self) -> (VecDeque<Arc<Batch>>, bool) {
        let mut mail = self.0.lock().unwrap();
        let read = std::mem::take(&mut mail.read);
        (std::mem::take(&mut mail.batches), read)
    }

    fn put(&self, batches: &[Arc<Batch>], read: bool) {
        let mut mail = self.0.lock().unwrap();
        for b in batches {
            if mail.batches.len() == MAILBOX_MAX {
                mail.batches.pop_front();
                mail.read = true;
            }
            mail.batches.push_back(b.clone());
        }
        mail.read |= read;
    }
}

/// One subscription, as the hub sees it.
struct Subscriber {
    id: u64,
    wake: Sender<()>,
    /// `None` for a subscriber that only wants wake-ups (a consumer group member).
    mail: Option<Arc<Mailbox>>,
}

/// State shared between the store, the threads and the subscriptions.
#[derive(Default)]
pub(crate) struct Shared {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    connected: AtomicBool,
    reconnects: AtomicU64,
    listener_pid: AtomicI32,
    notifier_pid: AtomicI32,
    /// The commit watcher's backend, which also sends `NOTIFY`.
    watcher_pid: AtomicI32,
    /// Whether, at the notifier's last look, another process listened on the channel.
    /// Appends do not even wake the notifier while nobody does.
    nobody_else_listens: AtomicBool,
    /// Whether anybody has looked yet: until then `nobody_else_listens` is only its
    /// starting value.
    listeners_looked: AtomicBool,
    /// When this process last sent (or had an append send) a `NOTIFY`, in [`now_micros`].
    last_notify: AtomicU64,
    /// When this process last made a pool append, in [`now_micros`] (0: never).
    last_append: AtomicU64,
    /// When this process last made an `append_in`, in [`now_micros`] (0: never).
    last_append_in: AtomicU64,
    /// How many subscribers take events from mail (see [`Hub::subscribe`]).
    mail_subscribers: AtomicUsize,
    /// The payload of the `NOTIFY`s this store's appends send themselves (a UUID of the
    /// store's own): its own listener ignores them, as it ignores those of
    /// its notifier and watcher, since the store wakes its subscribers directly.
    payload: String,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    /// Looks whether another process listens on the channel (`listen` is its `LISTEN`
    /// statement) and records the answer. Unsure (an error, or backends we may not look
    /// at) counts as "yes".
    fn look_for_listeners(&self, client: &mut postgres::Client, listen: &str) {
        let own = self.listener_pid.load(Ordering::Relaxed);
        let others = others_listen(client, listen, own).unwrap_or(true);
        self.nobody_else_listens.store(!others, Ordering::Relaxed);
        self.listeners_looked.store(true, Ordering::Relaxed);
    }

    /// Wakes every subscriber to read the table.
    pub(crate) fn wake_all(&self) {
        self.deliver(&[], true);
    }

    /// Hands `batches` to every subscriber and wakes it; with `read`, it must also read
    /// the table. A full channel already holds a wake-up: nothing is lost by skipping
    /// it, and the listener never blocks on a slow subscriber.
    fn deliver(&self, batches: &[Arc<Batch>], read: bool) {
        let subscribers = self.subscribers.lock().unwrap();
        for s in subscribers.iter() {
            if let Some(mail) = &s.mail {
                mail.put(batches, read);
            }
            match s.wake.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

/// How a pool append tells subscribers: see [`Hub::plan_append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AppendPlan {
    /// What its own `NOTIFY` sends.
    pub(crate) notify: Inline,
    /// Whether it returns its events' columns for this process's subscribers.
    pub(crate) local: bool,
}

/// The most bytes of JSON (data and metadata, as given) that a sparse pool append hands
/// to this process's subscribers (see [`Hub::plan_append`]): a larger one wakes them to
/// read, in pages, so that every subscriber does not hold a copy of all of it at once.
const LOCAL_ROOM: usize = 64 * 1024;

/// What the `NOTIFY` of a pool append sends: see [`Hub::plan_append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inline {
    /// None: the notifier sends one after it, if anybody listens.
    No,
    /// A wake-up.
    Wake,
    /// A wake-up with the events.
    WithEvents,
}

/// The fan-out hub of one store.
pub(crate) struct Hub {
    shared: Arc<Shared>,
    pg: postgres::Config,
    connector: Connector,
    schema: String,
    channel: String,
    poll_interval: Duration,
    notify: bool,
    listener: Mutex<Option<JoinHandle<()>>>,
    notifier: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    watcher: Mutex<Option<(Sender<i64>, JoinHandle<()>)>>,
    /// The newest transactions that appended with `append_in` while nobody could be
    /// woken (no subscriber here, nobody listening elsewhere): not watched, so that a
    /// process that only writes pays no commit watcher round per transaction. The first
    /// subscriber, or the next transaction that is watched, hands them to the watcher.
    unwatched: Mutex<VecDeque<i64>>,
}

/// How many unwatched transactions are remembered: more than a process keeps open at
/// once. An older one that is still open when a subscriber comes is found at the next
/// wake-up or safety poll.
const UNWATCHED_MAX: usize = 4096;

impl Hub {
    pub(crate) fn new(
        pg: postgres::Config,
        connector: Connector,
        schema: &str,
        poll_interval: Duration,
        notify: bool,
    ) -> Hub {
        // A half-open TCP connection must not leave the listener waiting for hours: the
        // kernel gives up on a silent peer after about 5 + 3 × 2 seconds.
        let mut pg = pg;
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        // Unique across processes and machines: a store must not mistake another's
        // wake-up for its own.
        let payload = uuid::Uuid::now_v7().simple().to_string();
        Hub {
            shared: Arc::new(Shared {
                payload,
                ..Shared::default()
            }),
            pg,
            connector,
            schema: schema.to_string(),
            channel: channel_name(schema),
            poll_interval,
            notify,
            listener: Mutex::new(None),
            notifier: Mutex::new(None),
            watcher: Mutex::new(None),
            unwatched: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Registers a subscriber and starts the listener if it is not running yet. With
    /// `mail`, the subscriber also gets the events that notifications carry.
    pub(crate) fn subscribe(&self, mail: bool) -> (u64, Receiver<()>, Option<Arc<Mailbox>>) {
        let (tx, rx) = bounded(1);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mail = mail.then(|| Arc::new(Mailbox::default()));
        if mail.is_some() {
            self.shared.mail_subscribers.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.subscribers.lock().unwrap().push(Subscriber {
            id,
            wake: tx,
            mail: mail.clone(),
        });
        // Transactions that appended before there was anybody to wake may still commit:
        // their events must wake this subscriber, which may have read past them already.
        // (`watch` decides and remembers under this lock, after looking for subscribers.)
        let unwatched: Vec<i64> = self.unwatched.lock().unwrap().drain(..).collect();
        self.send_to_watcher(unwatched);
        let mut listener = self.listener.lock().unwrap();
        if listener.is_none() {
            let shared = self.shared.clone();
            let pg = self.pg.clone();
            let connector = crate::tls::clone(&self.connector);
            let channel = self.channel.clone();
            let schema = self.schema.clone();
            let poll = self.poll_interval;
            *listener = Some(
                thread::Builder::new()
                    .name("pg-eventstore-listener".into())
                    .spawn(move || listen(shared, pg, connector, (schema, channel), poll))
                    .expect("spawn the listener thread"),
            );
        }
        (id, rx, mail)
    }

    pub(crate) fn unsubscribe(&self, id: u64) {
        let mut subscribers = self.shared.subscribers.lock().unwrap();
        if let Some(k) = subscribers.iter().position(|s| s.id == id) {
            if subscribers.swap_remove(k).mail.is_some() {
                self.shared.mail_subscribers.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Called after an append committed on a pooled connection: wakes this process's
    /// subscribers at once, and asks the notifier to tell other processes.
    pub(crate) fn appended(&self) {
        self.appended_with(None, false);
    }

    /// Whether the pool append about to run should send the `NOTIFY` itself, in its own
    /// transaction, instead of having the notifier send one after it: yes when another
    /// process listens and this process has sent no `NOTIFY` for [`NOTIFY_INTERVAL`].
    /// Then the other process is woken as the append commits, without the notifier's
    /// hop (a channel wake-up and a round trip); and since that happens at most once per
    /// interval, commits under load still do not queue on PostgreSQL's notify lock. Such
    /// an append claims the interval. After it committed, call
    /// [`Hub::appended_with`]; if it wrote nothing, [`Hub::appended`] as usual.
    ///
    /// The `NOTIFY` carries the events too ([`Inline::WithEvents`]) when this process
    /// made no pool append for [`NOTIFY_INTERVAL`] before this one: a sparse append,
    /// whose subscribers elsewhere would otherwise wait a read's round trip for it.
    /// Busy writers send wake-ups alone: the events cost the server about 400,000
    /// instructions per append (see `notify_events` in sql.rs), and their subscribers
    /// read many events per wake-up anyway.
    ///
    /// The same sparse appends return their events' columns for this process's own
    /// subscribers (`local`) while one of them takes mail: they then deliver the events
    /// without reading them, as a subscriber elsewhere does from the notification (see
    /// [`Hub::appended_with`]).
    ///
    /// `json_bytes`, the events' data and metadata as given, bounds both: events that
    /// cannot fit in a notification ([`crate::sql::NOTIFY_ROOM`]) are not put in one
    /// (the `NOTIFY` wakes alone), and more than [`LOCAL_ROOM`] are not handed over.
    pub(crate) fn plan_append(&self, json_bytes: usize) -> AppendPlan {
        let s = &self.shared;
        let (now, sparse) = since(&s.last_append);
        let local =
            sparse && json_bytes <= LOCAL_ROOM && s.mail_subscribers.load(Ordering::Relaxed) > 0;
        let notify = self.inline(self.notify && self.others_listen(), now, sparse, json_bytes);
        AppendPlan { notify, local }
    }

    /// Whether another process listens, as the last look found (not yet looked: no).
    fn others_listen(&self) -> bool {
        let s = &self.shared;
        s.listeners_looked.load(Ordering::Relaxed) && !s.nobody_else_listens.load(Ordering::Relaxed)
    }

    /// What an append that may send its own `NOTIFY` (`may`) sends: nothing unless it
    /// claims the interval, then its events when it is `sparse` and they fit, else a
    /// wake-up alone.
    fn inline(&self, may: bool, now: u64, sparse: bool, json_bytes: usize) -> Inline {
        if !may || !claim_interval(&self.shared.last_notify, now) {
            Inline::No
        } else if sparse && json_bytes < crate::sql::NOTIFY_ROOM {
            Inline::WithEvents
        } else {
            Inline::Wake
        }
    }

    /// Whether the `append_in` about to run should send its own wake-up, in the
    /// caller's transaction, instead of having the commit watcher learn of the commit
    /// and then wake this process's subscribers and tell other processes: yes when
    /// somebody can be woken (a subscriber here, while the listener is connected to
    /// hear it; or another process listening) and this process has sent no `NOTIFY`
    /// for [`NOTIFY_INTERVAL`]. Such an append claims the interval, as a pool append
    /// that sends its own does (see [`Hub::plan_append`]): so at most one commit per
    /// interval and process queues on PostgreSQL's notify lock, and busy writers' commits
    /// stay free of it. The `NOTIFY` goes out as the caller's transaction commits, and
    /// not at all if it rolls back; its payload is empty, so that this process's
    /// listener wakes the subscribers here as well.
    ///
    /// The `NOTIFY` carries the events too ([`Inline::WithEvents`]) when this process
    /// made no `append_in` for [`NOTIFY_INTERVAL`] before this one and they fit in a
    /// notification (`json_bytes`, as [`Hub::plan_append`]): subscribers here and
    /// elsewhere then deliver them without reading, under the same rules as a pool
    /// append's.
    pub(crate) fn plan_append_in(&self, json_bytes: usize) -> Inline {
        let s = &self.shared;
        let (now, sparse) = since(&s.last_append_in);
        let may = self.notify && {
            let here = !s.subscribers.lock().unwrap().is_empty();
            (here || self.others_listen()) && (!here || s.connected.load(Ordering::Relaxed))
        };
        self.inline(may, now, sparse, json_bytes)
    }

    /// The payload for the `NOTIFY` of an append that sends its own.
    pub(crate) fn payload(&self) -> &str {
        &self.shared.payload
    }

    /// Called after a pool append committed, with its events when its statement
    /// returned what this process's subscribers need to deliver them (see
    /// [`Hub::plan_append`]); `notified`: the append sent its own `NOTIFY`, so other
    /// processes have been told. Subscribers that take mail get the events, and read
    /// only when they cannot place them; the others are woken to read.
    pub(crate) fn appended_with(&self, batch: Option<Batch>, notified: bool) {
        match batch {
            Some(batch) => self.shared.deliver(&[Arc::new(batch)], false),
            None => self.shared.wake_all(),
        }
        if !notified {
            self.with_notifier(|tx| poke(&self.shared, tx));
        }
    }

    /// Called after an `append_in` in the caller's transaction `xid`: the commit watcher
    /// wakes this process's subscribers, and has the notifier tell other processes, once
    /// that transaction has committed. The caller's commit thus carries no `NOTIFY`
    /// (PostgreSQL serialises notifying commits, flush included, on one lock).
    ///
    /// While nobody can be woken (no subscriber in this process, and no other process
    /// listening or notifying off) the transaction is only remembered: see `unwatched`.
    pub(crate) fn watch(&self, xid: i64) {
        let ids = {
            let mut unwatched = self.unwatched.lock().unwrap();
            let nobody = self.shared.subscribers.lock().unwrap().is_empty()
                && (!self.notify || self.shared.nobody_else_listens.load(Ordering::Relaxed));
            if nobody {
                if unwatched.len() == UNWATCHED_MAX {
                    unwatched.pop_front();
                }
                unwatched.push_back(xid);
                return;
            }
            let mut ids: Vec<i64> = unwatched.drain(..).collect();
            ids.push(xid);
            ids
        };
        self.send_to_watcher(ids);
    }

    /// Hands transaction ids to the commit watcher, which starts on first use (and
    /// starts the notifier, whose first look tells whether anybody else listens).
    fn send_to_watcher(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        let mut watcher = self.watcher.lock().unwrap();
        let (tx, _) = watcher.get_or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::unbounded();
            let shared = self.shared.clone();
            let pg = self.pg.clone();
            let connector = crate::tls::clone(&self.connector);
            let notifier = self.with_notifier(Sender::clone);
            let channel = self.channel.clone();
            let handle = thread::Builder::new()
                .name("pg-eventstore-watcher".into())
                .spawn(move || watch_loop(shared, pg, connector, channel, rx, notifier))
                .expect("spawn the commit watcher thread");
            (tx, handle)
        });
        for xid in ids {
            let _ = tx.send(xid);
        }
    }

    /// Runs `f` on the notifier's channel (the notifier starts on first use); `None`
    /// when appends are not to be announced to other processes.
    fn with_notifier<T>(&self, f: impl FnOnce(&Sender<()>) -> T) -> Option<T> {
        if !self.notify {
            return None;
        }
        let mut notifier = self.notifier.lock().unwrap();
        let (tx, _) = notifier.get_or_insert_with(|| {
            let (tx, rx) = bounded(1);
            let shared = self.shared.clone();
            let pg = self.pg.clone();
            let connector = crate::tls::clone(&self.connector);
            let channel = self.channel.clone();
            let handle = thread::Builder::new()
                .name("pg-eventstore-notifier".into())
                .spawn(move || notify_loop(shared, pg, connector, channel, rx))
                .expect("spawn the notifier thread");
            (tx, handle)
        });
        Some(f(tx))
    }

    pub(crate) fn state(&self) -> Option<ListenerState> {
        self.listener.lock().unwrap().as_ref()?;
        let s = &self.shared;
        Some(ListenerState {
            connected: s.connected.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            backend_pid: s.listener_pid.load(Ordering::Relaxed),
            last_error: s.last_error.lock().unwrap().clone(),
        })
    }
}

/// Asks the notifier for a NOTIFY, unless nobody else listens. A full channel means a
/// NOTIFY is already due: this append rides along.
fn poke(shared: &Shared, notifier: &Sender<()>) {
    if !shared.nobody_else_listens.load(Ordering::Relaxed) {
        let _ = notifier.try_send(());
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some((tx, handle)) = self.watcher.lock().unwrap().take() {
            drop(tx); // its wait ends within WATCH_WAIT_MAX, then it sees the channel gone
            let _ = handle.join();
        }
        if let Some((tx, handle)) = self.notifier.lock().unwrap().take() {
            drop(tx); // disconnects the notifier's channel: it ends at once
            let _ = handle.join();
        }
        if let Some(handle) = self.listener.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

/// Sleeps up to `d`, waking early when the store is dropped. Returns false on stop.
fn pause(shared: &Shared, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if shared.stop.load(Ordering::Relaxed) {
            return false;
        }
        thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
    }
    !shared.stop.load(Ordering::Relaxed)
}

/// The listener thread: connect, LISTEN, wake subscribers on every notification and on
/// every safety-poll tick; on any error reconnect with backoff and wake everyone, since
/// notifications sent while we were away are lost.
fn listen(
    shared: Arc<Shared>,
    pg: postgres::Config,
    connector: Connector,
    (schema, channel): (String, String),
    poll: Duration,
) {
    let mut backoff = RECONNECT;
    let mut first = true;
    while !shared.stop.load(Ordering::Relaxed) {
        let listen_sql = sql::listen(&channel);
        // LISTEN is the last statement this connection runs (the heartbeat repeats it), so
        // `pg_stat_activity.query` shows other processes' notifiers who is listening.
        let connected = crate::connect::open(&pg, &connector).and_then(|mut c| {
            let pid: i32 = c.query_one(sql::BACKEND_PID, &[])?.get(0);
            let key = FeedKey::load(&mut c, &schema)?;
            c.batch_execute(&listen_sql)?;
            Ok((c, pid, key))
        });
        let (mut client, pid, mut key) = match connected {
            Ok(c) => c,
            Err(e) => {
                *shared.last_error.lock().unwrap() = Some(chain(&e));
                if !pause(&shared, backoff.next_delay()) {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        if !first {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
            crate::metrics::listener_reconnected();
        }
        first = false;
        shared.listener_pid.store(pid, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        // Whatever happened while we were not listening, subscribers re-read the table.
        shared.wake_all();

        let mut last_poll = Instant::now();
        let error = loop {
            if shared.stop.load(Ordering::Relaxed) {
                break None;
            }
            let own = [
                shared.notifier_pid.load(Ordering::Relaxed),
                shared.watcher_pid.load(Ordering::Relaxed),
            ];
            let (mut woken, batches) =
                match wait_for_notifications(&mut client, own, &shared.payload, key.as_ref()) {
                    Ok(w) => w,
                    Err(e) => break Some(e),
                };
            if last_poll.elapsed() >= poll {
                woken = true;
                last_poll = Instant::now();
                // A store migrated to version 12 while we listen.
                if key.is_none() {
                    match FeedKey::load(&mut client, &schema) {
                        Ok(k) => key = k,
                        Err(e) => break Some(e),
                    }
                }
                // The safety poll doubles as a liveness check of a quiet connection.
                if let Err(e) = client.batch_execute(&listen_sql) {
                    break Some(e);
                }
            }
            if woken || !batches.is_empty() {
                shared.deliver(&batches, woken);
            }
        };
        shared.connected.store(false, Ordering::Relaxed);
        shared.listener_pid.store(0, Ordering::Relaxed);
        if let Some(e) = error {
            *shared.last_error.lock().unwrap() = Some(chain(&e));
            if !pause(&shared, backoff.next_delay()) {
                return;
            }
        }
    }
}

/// Waits one round for a notification, then takes whatever else is already buffered.
/// Returns whether any came from somebody other than our own notifier and commit
/// watcher (`own`) and our own appends (`payload`), who wake this process's subscribers
/// directly, without events in its payload; and the batches of events that the others
/// carried, in the order they came (the order their transactions committed in).
fn wait_for_notifications(
    client: &mut postgres::Client,
    own: [i32; 2],
    payload: &str,
    key: Option<&FeedKey>,
) -> Result<(bool, Vec<Arc<Batch>>), postgres::Error> {
    let (mut woken, mut batches) = (false, Vec::new());
    let mut take = |n: &postgres::Notification| {
        let ours = own.contains(&n.process_id()) || n.payload().split(' ').next() == Some(payload);
        if ours {
            return;
        }
        match Batch::parse(n.payload(), key) {
            Some(b) => batches.push(Arc::new(b)),
            None => woken = true,
        }
    };
    let mut notifications = client.notifications();
    let first = notifications.timeout_iter(LISTEN_ROUND).next()?;
    let Some(first) = first else {
        return Ok((false, Vec::new()));
    };
    take(&first);
    let mut pending = notifications.iter();
    while let Some(n) = pending.next()? {
        take(&n);
    }
    Ok((woken, batches))
}

/// The shortest time between two NOTIFYs of one notifier, and between two appends of
/// one process that send their own (see [`Hub::plan_append`]).
const NOTIFY_INTERVAL: Duration = Duration::from_millis(1);

/// Microseconds since this process first asked.
pub(crate) fn now_micros() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Now, which `last` takes, and whether it is at least [`NOTIFY_INTERVAL`] after what
/// `last` held (or that was never set).
fn since(last: &AtomicU64) -> (u64, bool) {
    let now = now_micros();
    let previous = last.swap(now, Ordering::Relaxed);
    (
        now,
        previous == 0 || now >= previous + NOTIFY_INTERVAL.as_micros() as u64,
    )
}

/// Moves `last` to `now` when `now` is at least [`NOTIFY_INTERVAL`] after it (or it was
/// never set), and says whether it did: of callers racing for one interval, one wins.
fn claim_interval(last: &AtomicU64, now: u64) -> bool {
    let interval = NOTIFY_INTERVAL.as_micros() as u64;
    let seen = last.load(Ordering::Relaxed);
    (seen == 0 || now >= seen + interval)
        && last
            .compare_exchange(seen, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// How long a notifier trusts its last look at who is listening.
const LISTENERS_CHECK: Duration = Duration::from_secs(1);

/// The notifier thread: one `NOTIFY` for however many appends happened while the last
/// one was in flight, on its own connection, off every append's commit path, and only
/// while some other process listens on the channel (looked up at most once a second; a
/// listener that appears meanwhile is covered by its own catch-up and safety poll).
fn notify_loop(
    shared: Arc<Shared>,
    pg: postgres::Config,
    connector: Connector,
    channel: String,
    rx: Receiver<()>,
) {
    let notify = sql::notify(&channel);
    let listen = sql::listen(&channel);
    let mut client: Option<postgres::Client> = None;
    let mut checked: Option<Instant> = None;
    let mut started = false;
    loop {
        // Woken by an append, or once per check interval to look again who listens; at
        // once on start, so that the commit watcher soon knows whether to notify.
        let append = if !started {
            started = true;
            false
        } else {
            match rx.recv_timeout(LISTENERS_CHECK) {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        for attempt in 0..2 {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                // A wake-up needs no durability: the commit of a NOTIFY-only transaction
                // need not wait for the WAL flush that the appends' commits also wait for.
                client = crate::connect::open(&pg, &connector)
                    .and_then(|mut c| {
                        c.batch_execute(sql::ASYNC_COMMIT)?;
                        Ok(c)
                    })
                    .ok();
                if let Some(c) = client.as_mut() {
                    let pid = c
                        .query_one(sql::BACKEND_PID, &[])
                        .map(|r| r.get::<_, i32>(0))
                        .unwrap_or(0);
                    shared.notifier_pid.store(pid, Ordering::Relaxed);
                }
            }
            let Some(c) = client.as_mut() else {
                shared.nobody_else_listens.store(false, Ordering::Relaxed);
                if attempt == 1 {
                    break;
                }
                continue;
            };
            if checked.is_none_or(|at| at.elapsed() >= LISTENERS_CHECK) {
                shared.look_for_listeners(c, &listen);
                checked = Some(Instant::now());
            }
            if !append || shared.nobody_else_listens.load(Ordering::Relaxed) {
                break;
            }
            match c.batch_execute(&notify) {
                Ok(()) => {
                    shared
                        .last_notify
                        .store(now_micros().max(1), Ordering::Relaxed);
                    // Under a stream of appends, at most one NOTIFY per interval: what
                    // commits meanwhile rides on the next one.
                    thread::sleep(NOTIFY_INTERVAL);
                    break;
                }
                // Lost: other processes' subscribers find the events at their next poll.
                Err(_) if attempt == 1 => break,
                Err(_) => client = None,
            }
        }
    }
}

/// The commit watcher's longest single wait for a transaction to end: it looks at the
/// others it watches (and at its stop flag) at least this often.
const WATCH_WAIT_MAX: Duration = Duration::from_millis(10);
/// Its first wait, and every wait while it watches more than one transaction: one of
/// them may commit while it waits for another.
const WATCH_WAIT_MIN: Duration = Duration::from_millis(1);
/// Its pauses between rounds while the oldest transaction it watches is still open but
/// no longer holds its lock (its `append_in` was rolled back to a savepoint, which gives
/// the lock back): the wait on that lock returns at once, so without them it would
/// send its queries back to back until the transaction ends.
const WATCH_UNLOCKED: Backoff = Backoff::new(WATCH_WAIT_MIN, WATCH_WAIT_MAX);

/// The commit watcher: for the ids of callers' transactions that appended (oldest
/// first), waits on the lock each holds until it ends, then asks which have committed,
/// and wakes subscribers once for all that did. While other processes listen, the same
/// round trip sends them the `NOTIFY` (the notifier thread's hop would add a channel
/// wake-up and a round trip). Without a connection it wakes subscribers (and has the
/// notifier tell other processes) anyway, so that nothing waits longer than without it;
/// a subscription's safety poll covers the rest.
fn watch_loop(
    shared: Arc<Shared>,
    pg: postgres::Config,
    connector: Connector,
    channel: String,
    rx: Receiver<i64>,
    notifier: Option<Sender<()>>,
) {
    let mut pending: Vec<i64> = Vec::new();
    // The connection with its two statements, prepared once: every round is then one
    // round trip, with no parsing or planning on the server.
    let mut client: Option<(postgres::Client, postgres::Statement, postgres::Statement)> = None;
    let mut wait = WATCH_WAIT_MIN;
    let mut unlocked = WATCH_UNLOCKED;
    let mut backoff = RECONNECT;
    let (wait_for_transaction, transaction_status) =
        (sql::wait_for_transaction(), sql::transaction_status());
    let open = || -> Option<(postgres::Client, postgres::Statement, postgres::Statement)> {
        let mut c = crate::connect::open(&pg, &connector).ok()?;
        // Its `NOTIFY` commits need no WAL flush (as the notifier's).
        c.batch_execute(sql::ASYNC_COMMIT).ok()?;
        let pid: i32 = c.query_one(sql::BACKEND_PID, &[]).ok()?.get(0);
        shared.watcher_pid.store(pid, Ordering::Relaxed);
        let wait = c.prepare(&wait_for_transaction).ok()?;
        let status = c.prepare(&transaction_status).ok()?;
        Some((c, wait, status))
    };
    let announce = || {
        shared.wake_all();
        if let Some(tx) = &notifier {
            poke(&shared, tx);
        }
    };
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(x) => pending.push(x),
                Err(_) => return,
            }
        }
        let before = pending.len();
        pending.extend(rx.try_iter());
        pending.sort_unstable();
        pending.dedup();
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if client.as_ref().is_none_or(|(c, _, _)| c.is_closed()) {
            client = open();
            if client.is_none() {
                announce();
                if !pause(&shared, backoff.next_delay()) {
                    return;
                }
                continue;
            }
            backoff = RECONNECT;
        }
        let (c, wait_statement, status_statement) = client.as_mut().expect("connected above");
        // The notifier, started with this thread, may not have looked for other
        // listeners yet (on a busy machine the first commit can come first): look here,
        // rather than notify on the starting guess.
        if notifier.is_some() && !shared.listeners_looked.load(Ordering::Relaxed) {
            shared.look_for_listeners(c, &sql::listen(&channel));
        }
        if pending.len() > 1 || pending.len() != before {
            wait = WATCH_WAIT_MIN;
        }
        let timeout = format!("{}ms", wait.as_millis());
        wait = (wait * 2).min(WATCH_WAIT_MAX);
        // The channel to notify when one committed: none while nobody else listens (as
        // the notifier's last look found), and none when notifying is off.
        let notify = (notifier.is_some() && !shared.nobody_else_listens.load(Ordering::Relaxed))
            .then_some(channel.as_str());
        // One round trip when the oldest ends within the wait: the statuses come with it.
        let oldest = pending[0];
        let mut locked = false;
        let statuses = match c.query_one(&*wait_statement, &[&oldest, &timeout, &pending, &notify])
        {
            Ok(row) => {
                locked = true;
                Ok((row.get::<_, bool>(3), row.get::<_, Vec<i64>>(4)))
            }
            // A timeout only means that the oldest is still open: ask about the others.
            Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => c
                .query_one(&*status_statement, &[&pending, &notify])
                .map(|row| (row.get::<_, bool>(0), row.get::<_, Vec<i64>>(1))),
            Err(e) => Err(e),
        };
        match statuses {
            Ok((committed, open)) => {
                if committed {
                    // Other processes were notified by the statement itself.
                    shared.wake_all();
                    wait = WATCH_WAIT_MIN;
                }
                // The lock was free, yet the oldest is still open: it gave the lock
                // back early (a savepoint rolled back), and the next wait would
                // return at once too.
                let gave_back = locked && open.contains(&oldest);
                pending = open;
                if !gave_back {
                    unlocked.reset();
                } else if !pause(&shared, unlocked.next_delay()) {
                    return;
                }
            }
            Err(_) => {
                // Unsure what ended: wake everyone, and look again on a new connection.
                client = None;
                announce();
            }
        }
    }
}

/// Whether a backend other than our own listener (`own`) listens on the channel, or may:
/// a backend whose query text we are not allowed to see counts as a listener.
fn others_listen(
    client: &mut postgres::Client,
    listen: &str,
    own: i32,
) -> Result<bool, postgres::Error> {
    let row = client.query_one(sql::OTHERS_LISTEN, &[&listen, &own])?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_notify_per_interval_is_claimed() {
        let step = NOTIFY_INTERVAL.as_micros() as u64;
        let last = AtomicU64::new(0);
        assert!(claim_interval(&last, 5), "never sent: free");
        assert!(!claim_interval(&last, 5 + step - 1), "within the interval");
        assert!(claim_interval(&last, 5 + step), "an interval later");
        assert!(!claim_interval(&last, 5 + step), "claimed once");
        assert!(!claim_interval(&last, 0), "a clock reading from before");
    }
}
