//! Checkpoints: how far a named processor has got in the global order.

use std::fmt;
use std::time::{Duration, Instant};

use postgres::types::Type;
use postgres::GenericClient;

use crate::error::{Error, Result};
use crate::event::validate_text;
use crate::store::Store;

/// The longest processor name accepted, in bytes.
pub const MAX_PROCESSOR_NAME_BYTES: usize = 256;

pub(crate) fn validate_processor_name(name: &str) -> Result<()> {
    validate_text("processor name", name, MAX_PROCESSOR_NAME_BYTES).map_err(Error::InvalidInput)
}

/// The checkpoint `position` of processor `name` as stored: positions are `bigint`s, so
/// a value above `i64::MAX` is refused rather than wrapped to a negative number.
pub(crate) fn stored_position(name: &str, position: u64) -> Result<i64> {
    validate_processor_name(name)?;
    i64::try_from(position).map_err(|_| {
        Error::InvalidInput(format!(
            "checkpoint {name:?}: position {position} is out of range (positions go up to {})",
            i64::MAX
        ))
    })
}

impl Store {
    /// The stored checkpoint of processor `name`: the global position of the last event
    /// it finished, or `None` when it has none.
    pub fn checkpoint(&self, name: &str) -> Result<Option<u64>> {
        validate_processor_name(name)?;
        let row = self.run("read", &self.sql().load_checkpoint, |c, s| {
            c.query_opt(s, &[&name])
        })?;
        match row.map(|r| r.get::<_, i64>(0)) {
            None => Ok(None),
            Some(p) => u64::try_from(p).map(Some).map_err(|_| {
                Error::InvalidInput(format!(
                    "checkpoint {name:?}: the stored position {p} is negative, so not a \
                     position (earlier releases stored positions above i64::MAX that way); \
                     save a valid checkpoint"
                ))
            }),
        }
    }

    /// Stores the checkpoint of processor `name` now. Transient failures are retried
    /// (see [`Config::max_retries`](crate::Config::max_retries)): the write is idempotent.
    pub fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        let position = stored_position(name, position)?;
        self.run("save_checkpoint", &self.sql().save_checkpoint, |c, s| {
            c.execute(s, &[&name, &position])
        })?;
        Ok(())
    }

    /// Stores the checkpoint inside the caller's transaction, so that a projection's
    /// read-model writes and its checkpoint commit together: after a crash the projection
    /// resumes exactly after the last event whose effects were committed.
    ///
    /// ```no_run
    /// # use pg_eventstore::{ReadAll, Store};
    /// # let store = Store::from_env()?;
    /// let after = store.checkpoint("balances")?;
    /// let mut client = store.pool().get().expect("connection");
    /// for event in store.read_all(after.map_or(ReadAll::from_start(), ReadAll::after))? {
    ///     let event = event?;
    ///     let mut tx = client.transaction()?;
    ///     tx.execute("UPDATE balances SET n = n + 1 WHERE id = $1", &[&event.stream_id])?;
    ///     store.save_checkpoint_in(&mut tx, "balances", event.position)?;
    ///     tx.commit()?;
    /// }
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn save_checkpoint_in<C: GenericClient>(
        &self,
        client: &mut C,
        name: &str,
        position: u64,
    ) -> Result<()> {
        let position = stored_position(name, position)?;
        // With the parameter types given, one round trip (`execute` with a string
        // prepares the statement first, which is another).
        client
            .query_typed(
                self.sql().save_checkpoint.text(),
                &[(&name, Type::TEXT), (&position, Type::INT8)],
            )
            .map_err(|e| self.map_error(e))?;
        Ok(())
    }

    /// A [`Tracker`] for processor `name`, starting from its stored checkpoint, writing
    /// at most once per second (see [`Tracker::checkpoint_interval`]).
    pub fn tracker(&self, name: &str) -> Result<Tracker> {
        let saved = self.checkpoint(name)?;
        Ok(Tracker {
            store: self.clone(),
            name: name.to_string(),
            interval: Duration::from_secs(1),
            saved,
            pending: None,
            last_write: Instant::now(),
            lock: None,
        })
    }
}

/// Tracks a processor's position, writing its checkpoint at most once per interval.
///
/// Updates in between are kept in memory and written by [`Tracker::flush`], by the next
/// update after the interval, and on drop. After a crash a processor may therefore see
/// the events of the last interval again: at-least-once. For exactly-once effects write
/// the checkpoint in the same transaction as the effects
/// ([`Store::save_checkpoint_in`]).
///
/// ```no_run
/// # use std::time::Duration;
/// # use pg_eventstore::{ReadAll, Store};
/// # let store = Store::from_env()?;
/// let mut tracker = store.tracker("mailer")?.checkpoint_interval(Duration::from_millis(500));
/// for event in store.read_all(tracker.read_options())? {
///     let event = event?;
///     // ... send the email ...
///     tracker.update(event.position)?;
/// }
/// tracker.flush()?;
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
pub struct Tracker {
    store: Store,
    name: String,
    interval: Duration,
    saved: Option<u64>,
    pending: Option<u64>,
    last_write: Instant,
    /// A worker's processor lock: the checkpoint is written on its session, so never
    /// after the lock was lost.
    lock: Option<crate::processor::HeldLock>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("name", &self.name)
            .field("saved", &self.saved)
            .field("pending", &self.pending)
            .finish()
    }
}

impl Tracker {
    /// Writes the checkpoint at most once per `interval`. Default 1 s; zero writes on
    /// every update.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Writes the checkpoint on the session that holds `lock` (a worker's): a write
    /// cannot succeed once the lock is lost, so an instance that lost it cannot undo a
    /// reset or a move made meanwhile.
    pub(crate) fn on_lock(mut self, lock: crate::processor::HeldLock) -> Self {
        self.lock = Some(lock);
        self
    }

    /// The processor name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last position recorded (written or not yet), `None` before the first.
    pub fn position(&self) -> Option<u64> {
        self.pending.or(self.saved)
    }

    /// The position last written to the database.
    pub fn saved_position(&self) -> Option<u64> {
        self.saved
    }

    /// `ReadAll` options that continue after [`Tracker::position`].
    pub fn read_options(&self) -> crate::ReadAll {
        match self.position() {
            Some(p) => crate::ReadAll::after(p),
            None => crate::ReadAll::from_start(),
        }
    }

    /// Records that everything up to `position` is done; writes it if the interval has
    /// passed since the last write.
    pub fn update(&mut self, position: u64) -> Result<()> {
        self.pending = Some(position);
        self.flush_if_due()
    }

    /// Writes the recorded position if the interval has passed since the last write.
    /// A processor whose position stops moving calls this now and then, so that its last
    /// update does not wait for the next one.
    pub fn flush_if_due(&mut self) -> Result<()> {
        if self.pending.is_some() && self.last_write.elapsed() >= self.interval {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the recorded position now, if it is not written yet.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(p) = self.pending {
            match &self.lock {
                Some(lock) => {
                    if !lock.save_checkpoint(&self.store, &self.name, p)? {
                        return Ok(()); // the lock is lost: never written again
                    }
                }
                None => self.store.save_checkpoint(&self.name, p)?,
            }
            self.saved = Some(p);
            self.pending = None;
        }
        self.last_write = Instant::now();
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
