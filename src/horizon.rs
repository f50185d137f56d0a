//! The `$all` horizon as data: what the `feed_horizon` function answers ([`Horizon`]),
//! what the store reports about it ([`FeedStatus`], [`HeldBack`]), and the board of what
//! holds this store's subscriptions back. Reading it is in `feed.rs`.
//!
//! The horizon is computed by the `feed_horizon` function that the migration creates;
//! the argument that it never lets a reader skip an event is in the crate docs ("The
//! global order").

use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::Row;

use crate::error::Result;

/// One answer of `feed_horizon`: read below `horizon`; the newest committed event is at
/// `tip`; the oldest appending transaction still open, if it is what holds the horizon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Horizon {
    pub(crate) horizon: u64,
    pub(crate) tip: Option<u64>,
    pub(crate) blocker_pid: Option<i32>,
    pub(crate) blocker_xid: Option<u64>,
}

impl Horizon {
    /// Whether committed events wait at or above the horizon.
    pub(crate) fn holds_back(&self) -> bool {
        self.tip.is_some_and(|t| t >= self.horizon)
    }

    /// Whether `row` is the status row of a `$all` read (see `read_all` in sql.rs): the
    /// only row without an event id.
    pub(crate) fn is_status_row(row: &Row) -> bool {
        row.try_get::<_, Option<uuid::Uuid>>(1)
            .is_ok_and(|id| id.is_none())
    }

    /// Reads `horizon, tip, blocker_pid, blocker_xid`, as the `horizon` and
    /// `feed_status` statements return them.
    pub(crate) fn from_row(row: &Row) -> Horizon {
        Horizon {
            horizon: row.get::<_, i64>(0) as u64,
            tip: row.get::<_, Option<i64>>(1).map(|t| t as u64),
            blocker_pid: row.get(2),
            blocker_xid: row.get::<_, Option<i64>>(3).map(|x| x as u64),
        }
    }

    /// The snapshot's transactions of other databases that a `$all` read's status row
    /// names, when its horizon was computed in full (`None` otherwise).
    pub(crate) fn others_in_status_row(row: &Row) -> Result<Option<Vec<i64>>> {
        let others: Option<serde_json::Value> = row.try_get(5)?;
        Ok(match others {
            Some(serde_json::Value::Array(xs)) => {
                Some(xs.iter().filter_map(|x| x.as_i64()).collect())
            }
            _ => None,
        })
    }

    /// Reads a `$all` read's status row.
    pub(crate) fn from_status_row(row: &Row) -> Result<Horizon> {
        let tip: i64 = row.try_get(3)?;
        let blocker: serde_json::Value = row.try_get(6)?;
        Ok(Horizon {
            horizon: row.try_get::<_, i64>(0)? as u64,
            tip: (tip >= 0).then_some(tip as u64),
            blocker_pid: blocker["pid"].as_i64().map(|p| p as i32),
            blocker_xid: blocker["xid"].as_u64(),
        })
    }
}

/// Where the global feed stands: what a `$all` reader can see now, and whether committed
/// events wait behind a transaction that is still open. See [`Store::feed_status`](crate::Store::feed_status).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FeedStatus {
    /// The position of the last event a `$all` reader can see now (`None`: none).
    pub head: Option<u64>,
    /// The position of the newest committed event, visible to `$all` readers or not yet
    /// (`None`: the log is empty).
    pub tip: Option<u64>,
    /// Readers see positions below this bound; everything below it is final.
    pub horizon: u64,
    /// Set when committed events wait at or above the horizon.
    pub held_back: Option<HeldBack>,
}

/// What holds the global feed back: committed events wait for a transaction that is
/// still open and appended (or is appending) to this store, with a smaller position.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HeldBack {
    /// The backend pid of the oldest open appending transaction, when that is what holds
    /// the horizon (`None`: a transaction that has just ended, to be passed at the next
    /// read; or, where the store cannot move the feed floor — a read-only role or
    /// transaction, a hot standby — any transaction of the cluster that has an id).
    pub pid: Option<i32>,
    /// Its transaction id.
    pub xid: Option<u64>,
    /// Its `application_name`, where the role may see it.
    pub application_name: Option<String>,
    /// How long its transaction has been open, where the role may see it.
    pub transaction_age: Option<Duration>,
    /// The horizon: the first position that is held back.
    pub from_position: u64,
    /// In [`Store::health_check`](crate::Store::health_check): how long this store's subscriptions have been held
    /// back at this position.
    pub held_for: Option<Duration>,
}

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "an open transaction that appends (pid {pid}")?,
            None => write!(f, "an open transaction (pid unknown")?,
        }
        if let Some(xid) = self.xid {
            write!(f, ", xid {xid}")?;
        }
        if let Some(name) = self.application_name.as_deref().filter(|n| !n.is_empty()) {
            write!(f, ", application {name:?}")?;
        }
        if let Some(age) = self.transaction_age {
            write!(f, ", open for {:.1}s", age.as_secs_f64())?;
        }
        if let Some(held) = self.held_for {
            write!(f, ", for {:.1}s", held.as_secs_f64())?;
        }
        write!(f, ") holds the feed at position {}", self.from_position)
    }
}

/// What this store's subscriptions (and so its workers) are held back by: per
/// subscription, since when and by whom, for [`Store::health_check`](crate::Store::health_check), the metric
/// `pg_eventstore_feed_held_back_seconds` and the `tracing` warning.
#[derive(Debug, Default)]
pub(crate) struct HeldBackBoard {
    entries: Mutex<Vec<Entry>>,
}

#[derive(Debug)]
struct Entry {
    subscription: u64,
    since: Instant,
    horizon: Horizon,
    warned: bool,
}

impl HeldBackBoard {
    /// Records what subscription `id` saw on its last read, and logs a warning once per
    /// horizon held for longer than `warn_after`.
    pub(crate) fn report(&self, id: u64, seen: Option<&Horizon>, warn_after: Duration) {
        let mut entries = self.entries.lock().unwrap();
        let held = seen.filter(|h| h.holds_back());
        let index = entries.iter().position(|e| e.subscription == id);
        match (index, held) {
            (Some(i), Some(h)) if entries[i].horizon.horizon == h.horizon => {
                entries[i].horizon = *h;
            }
            (Some(i), Some(h)) => {
                entries[i] = Entry {
                    subscription: id,
                    since: Instant::now(),
                    horizon: *h,
                    warned: false,
                }
            }
            (None, Some(h)) => entries.push(Entry {
                subscription: id,
                since: Instant::now(),
                horizon: *h,
                warned: false,
            }),
            (Some(i), None) => {
                entries.swap_remove(i);
            }
            (None, None) => {}
        }
        if let Some(e) = index
            .and_then(|i| entries.get_mut(i))
            .filter(|e| e.subscription == id && !e.warned && e.since.elapsed() >= warn_after)
        {
            e.warned = true;
            let held = held_back(&e.horizon, Some(e.since.elapsed()));
            tracing::warn!(
                pid = e.horizon.blocker_pid,
                xid = e.horizon.blocker_xid,
                held_for_ms = e.since.elapsed().as_millis() as u64,
                "subscription held back: {held}"
            );
        }
        let longest = entries.iter().map(|e| e.since).min();
        ::metrics::gauge!(crate::metrics::FEED_HELD_BACK)
            .set(longest.map_or(0.0, |s| s.elapsed().as_secs_f64()));
    }

    /// Forgets a subscription that has ended.
    pub(crate) fn remove(&self, id: u64) {
        self.report(id, None, Duration::MAX);
    }

    /// What has held a subscription back the longest, if anything does now.
    pub(crate) fn longest(&self) -> Option<HeldBack> {
        let entries = self.entries.lock().unwrap();
        let e = entries.iter().min_by_key(|e| e.since)?;
        Some(held_back(&e.horizon, Some(e.since.elapsed())))
    }
}

pub(crate) fn held_back(h: &Horizon, held_for: Option<Duration>) -> HeldBack {
    HeldBack {
        pid: h.blocker_pid,
        xid: h.blocker_xid,
        application_name: None,
        transaction_age: None,
        from_position: h.horizon,
        held_for,
    }
}
