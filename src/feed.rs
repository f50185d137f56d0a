//! The `$all` horizon on the store: where the feed stands ([`Store::feed_status`]) and
//! waiting for it.
//!
//! The horizon is computed by the `feed_horizon` function that the migration creates;
//! the argument that it never lets a reader skip an event is in the crate docs ("The
//! global order").

use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::horizon::{held_back, FeedStatus, HeldBack, Horizon};
use crate::retry::Backoff;
use crate::store::Store;

/// The waits between two looks at a held-back horizon.
const WAIT: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(20));

impl Store {
    /// Where the global feed stands: the last position a `$all` reader can see now, the
    /// newest committed position, and — when committed events wait for an open
    /// transaction that appends to this store — which one ([`HeldBack`]).
    ///
    /// Only appending transactions hold the feed back, and only at and after their own
    /// positions: transactions in other databases, and transactions in this one that
    /// never append, do not (see "The global order" in the crate docs).
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let status = store.feed_status()?;
    /// if let Some(held) = &status.held_back {
    ///     eprintln!("events wait: {held}");
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn feed_status(&self) -> Result<FeedStatus> {
        let known = self.known_horizon();
        let row = self.run("read", &self.sql().feed_status, |c, s| {
            c.query_one(s, &[&known])
        })?;
        let horizon = Horizon::from_row(&row);
        self.saw_horizon(horizon.horizon);
        let held_back = horizon.holds_back().then(|| HeldBack {
            application_name: row.get(5),
            transaction_age: row
                .get::<_, Option<f64>>(6)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64),
            ..held_back(&horizon, None)
        });
        Ok(FeedStatus {
            head: row.get::<_, Option<i64>>(4).map(|p| p as u64),
            tip: horizon.tip,
            horizon: horizon.horizon,
            held_back,
        })
    }

    /// The `$all` horizon now, as a read computes it.
    pub(crate) fn horizon(&self) -> Result<Horizon> {
        let known = self.known_horizon();
        let row = self.run("read", &self.sql().horizon, |c, s| {
            c.query_one(s, &[&known])
        })?;
        let horizon = Horizon::from_row(&row);
        self.saw_horizon(horizon.horizon);
        Ok(horizon)
    }

    /// Waits until the horizon has passed `tip` (the newest event committed before a
    /// read began) and returns it; after `timeout`, [`Error::HeldBack`] names what holds
    /// it.
    pub(crate) fn wait_for_feed(&self, tip: u64, timeout: Duration) -> Result<Horizon> {
        let started = Instant::now();
        let mut pauses = WAIT;
        loop {
            let now = self.horizon()?;
            if now.horizon > tip {
                return Ok(now);
            }
            let waited = started.elapsed();
            if waited >= timeout {
                let status = self.feed_status()?;
                let held = match status.held_back {
                    Some(held) => held,
                    None if status.horizon > tip => return self.horizon(),
                    None => held_back(&now, None),
                };
                return Err(Error::HeldBack { held, waited });
            }
            thread::sleep(pauses.next_delay().min(timeout - waited));
        }
    }
}
