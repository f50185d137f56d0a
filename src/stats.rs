//! Counts for operators and scripts: [`Store::stats`] and [`Store::count`].

use serde::Serialize;

use crate::error::Result;
use crate::read::{Direction, ReadAll};
use crate::store::Store;

/// What a store holds, from [`Store::stats`]. Serializes with its field names, as
/// `pg-eventstore stats` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// How many events are stored (every committed event, including those that `$all`
    /// readers cannot see yet).
    pub events: u64,
    /// How many streams hold them.
    pub streams: u64,
    /// The position of the last event `$all` readers can see now
    /// ([`Store::head_position`]); `None` for an empty log.
    pub head_position: Option<u64>,
    /// Committed events that `$all` readers cannot see yet: they wait behind an open
    /// appending transaction ([`Store::feed_status`]).
    pub held_back_events: u64,
    /// The backend pid of the transaction that holds them, when known.
    pub held_back_by_pid: Option<i32>,
    /// Events and streams per category, by category name.
    pub categories: Vec<CategoryStats>,
}

/// The events and streams of one category: the streams whose id starts with the same
/// text up to and including its first `-` (`order-` for `order-17`), the prefix that
/// [`ReadAll::category`] and [`SubscribeOptions::category`](crate::SubscribeOptions::category)
/// filter on. Streams without a `-` have no category (`None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CategoryStats {
    /// The category prefix, such as `order-`; `None` for streams without a `-`.
    pub category: Option<String>,
    /// How many streams it has.
    pub streams: u64,
    /// How many events they hold.
    pub events: u64,
}

impl Store {
    /// Counts the store's events and streams, in all and per category, and reads the head
    /// position. It reads every event's stream id: on a large log it takes as long as a
    /// scan of the events table's `(stream_id, stream_version)` index.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let stats = store.stats()?;
    /// println!("{} events in {} streams", stats.events, stats.streams);
    /// for c in &stats.categories {
    ///     println!("{:?}: {} events", c.category, c.events);
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn stats(&self) -> Result<Stats> {
        let rows = self.run("read", &self.sql().stats_categories, |c, s| c.query(s, &[]))?;
        let categories: Vec<CategoryStats> = rows
            .iter()
            .map(|r| CategoryStats {
                category: r.get(0),
                streams: r.get::<_, i64>(1) as u64,
                events: r.get::<_, i64>(2) as u64,
            })
            .collect();
        let feed = self.feed_status()?;
        let horizon = feed.horizon as i64;
        let held = self.run("read", &self.sql().count_from, |c, s| {
            c.query_one(s, &[&horizon])
        })?;
        Ok(Stats {
            events: categories.iter().map(|c| c.events).sum(),
            streams: categories.iter().map(|c| c.streams).sum(),
            head_position: feed.head,
            held_back_events: held.get::<_, i64>(0) as u64,
            held_back_by_pid: feed.held_back.and_then(|h| h.pid),
            categories,
        })
    }

    /// How many events [`Store::read_all`] with these options would return now (its
    /// start, direction, filters and maximum count): for progress bars and checks. One
    /// query that counts the matching rows.
    ///
    /// ```no_run
    /// # use pg_eventstore::{ReadAll, Store};
    /// # let store = Store::from_env()?;
    /// let orders = store.count(&ReadAll::from_start().category("order-"))?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn count(&self, options: &ReadAll) -> Result<u64> {
        options.validate()?;
        let position = options.position.map(|p| p as i64);
        let (after, before) = match options.direction {
            Direction::Forwards => (position.unwrap_or(-1), i64::MAX),
            Direction::Backwards => (-1, position.unwrap_or(i64::MAX)),
        };
        let limit = options.max_count.map(|n| n.min(i64::MAX as u64) as i64);
        let known = self.known_horizon();
        let row = self.run("read", &self.sql().count_matching, |c, s| {
            c.query_one(
                s,
                &[
                    &after,
                    &before,
                    &options.category,
                    &options.event_types,
                    &limit,
                    &known,
                    &options.streams,
                ],
            )
        })?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}
