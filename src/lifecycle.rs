//! Stream lifecycle: stream metadata (with retention settings), deletes, truncation and
//! the scavenger that removes what they allow.
//!
//! Events are immutable by the database's own rule (a trigger, schema version 6): only
//! the statements here may remove them, inside transactions that set the flag the
//! trigger checks, and nothing may update them.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::event::{has_nul_escape, validate_stream_id, STREAM_DELETED, STREAM_TOMBSTONE};
use crate::retry::Backoff;
use crate::sql::TOMBSTONE_HEAD;
use crate::store::{unique_violation, Store, APPEND_ATTEMPTS};
use crate::version::{ActualVersion, ExpectedVersion};

/// The reserved metadata key: keep at most this many of the stream's newest events.
pub const MAX_COUNT: &str = "$maxCount";
/// The reserved metadata key: keep events younger than this many seconds.
pub const MAX_AGE: &str = "$maxAge";
/// The reserved metadata key: events before this version are gone (truncate before).
pub const TRUNCATE_BEFORE: &str = "$tb";

/// The largest `$maxAge` accepted: 1,000 years in seconds. Anything longer is a mistake
/// (milliseconds given for seconds, say), not a retention policy.
pub const MAX_AGE_LIMIT_SECS: u64 = 1000 * 365 * 24 * 3600;

/// A stream's metadata: a JSON object with a version of its own (counted from 0, like
/// stream versions), custom keys and the reserved keys [`MAX_COUNT`], [`MAX_AGE`] and
/// [`TRUNCATE_BEFORE`], which the accessors read.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct StreamMetadata {
    /// The metadata's own version: 0 after the first write, one more after each.
    pub version: u64,
    /// The whole JSON object, custom keys included.
    pub metadata: Value,
    /// When it was last written (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::event::serialize_time")]
    pub updated_at: SystemTime,
}

impl StreamMetadata {
    /// `$maxCount`: how many of the newest events retention keeps.
    pub fn max_count(&self) -> Option<u64> {
        self.metadata.get(MAX_COUNT).and_then(Value::as_u64)
    }

    /// `$maxAge`: how old an event may get before retention removes it.
    pub fn max_age(&self) -> Option<Duration> {
        self.metadata
            .get(MAX_AGE)
            .and_then(Value::as_u64)
            .map(Duration::from_secs)
    }

    /// `$tb`: the first version that stream reads return; earlier ones are gone.
    pub fn truncate_before(&self) -> Option<u64> {
        self.metadata.get(TRUNCATE_BEFORE).and_then(Value::as_u64)
    }
}

/// How many events one removal statement deletes: each batch is its own short
/// transaction, so appends and `$all` readers never wait long for it.
pub const REMOVE_BATCH: i64 = 1000;

/// What [`Store::delete_stream`] or [`Store::tombstone_stream`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DeleteResult {
    /// The version of the marker appended ([`STREAM_DELETED`] or [`STREAM_TOMBSTONE`]),
    /// or `None` when a soft delete found no stream. After a soft delete the next append
    /// gets the version after it.
    pub marker_version: Option<u64>,
    /// How many events were physically removed (in batches of [`REMOVE_BATCH`]).
    pub removed: u64,
}

/// What [`Store::scavenge`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ScavengeReport {
    /// Streams with metadata that it looked at.
    pub streams_checked: u64,
    /// Streams it removed events from.
    pub streams_trimmed: u64,
    /// Events it removed.
    pub events_removed: u64,
}

/// How many streams the scavenger looks at per query.
const SCAVENGE_PAGE: i64 = 100;

/// Checks metadata before anything is sent: a JSON object whose reserved keys hold
/// whole numbers in range, and no other key starting with `$`.
fn validate_metadata(stream: &str, metadata: &Value) -> Result<Map<String, Value>> {
    let bad = |m: String| Error::InvalidInput(format!("metadata of stream {stream:?}: {m}"));
    let Value::Object(map) = metadata else {
        return Err(bad(format!(
            "must be a JSON object, not {}",
            match metadata {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => unreachable!(),
            }
        )));
    };
    for (key, value) in map {
        let (min, max) = match key.as_str() {
            MAX_COUNT => (1, i64::MAX as u64),
            MAX_AGE => (1, MAX_AGE_LIMIT_SECS),
            TRUNCATE_BEFORE => (0, i64::MAX as u64),
            k if k.starts_with('$') => {
                return Err(bad(format!(
                    "{k:?} is not a reserved key (those are {MAX_COUNT}, {MAX_AGE} and \
                     {TRUNCATE_BEFORE}); custom keys must not start with '$'"
                )))
            }
            _ => continue,
        };
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => {}
            _ => {
                return Err(bad(format!(
                    "{key} must be a whole number from {min} to {max}{}, not {value}",
                    if key == MAX_AGE { " (seconds)" } else { "" }
                )))
            }
        }
    }
    let text = serde_json::to_vec(metadata)?;
    if has_nul_escape(&text) {
        return Err(bad(
            "contains the NUL character \\u0000, which PostgreSQL's jsonb cannot store".into(),
        ));
    }
    Ok(map.clone())
}

/// The name under which metadata version conflicts are reported: the stream id with `$$`
/// in front, as event stores name a stream's metadata stream.
fn metadata_stream(stream: &str) -> String {
    format!("$${stream}")
}

impl Store {
    /// Replaces the metadata of `stream` if the metadata is at the `expected` version of
    /// its own (`NoStream`: the stream has no metadata yet), and returns its new version.
    ///
    /// The metadata must be a JSON object. Custom keys are free; keys starting with `$`
    /// are reserved: [`MAX_COUNT`] (at least 1), [`MAX_AGE`] (seconds, 1 up to
    /// [`MAX_AGE_LIMIT_SECS`]) and [`TRUNCATE_BEFORE`] (a version) take whole numbers.
    /// Anything else is [`Error::InvalidInput`] naming the key, and nothing is written. A
    /// wrong expected version is [`Error::WrongExpectedVersion`] with the stream named
    /// `$$<stream>` and the metadata's actual version. The object replaces the whole old
    /// one: keep `$tb` when you rewrite the metadata of a deleted or truncated stream, or
    /// what was hidden and not yet removed shows again. Stream reads and stream
    /// subscriptions honour `$tb` at once;
    /// [`Store::scavenge`] applies `$maxCount` and `$maxAge` and removes what `$tb`
    /// hides.
    ///
    /// ```no_run
    /// # use pg_eventstore::{ExpectedVersion, Store};
    /// # let store = Store::from_env()?;
    /// let v = store.set_stream_metadata("sensor-9", ExpectedVersion::NoStream,
    ///     &serde_json::json!({ "$maxCount": 1000, "$maxAge": 86400, "owner": "ops" }))?;
    /// assert_eq!(v, 0);
    /// let meta = store.stream_metadata("sensor-9")?.expect("just written");
    /// assert_eq!(meta.max_count(), Some(1000));
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn set_stream_metadata(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        metadata: &Value,
    ) -> Result<u64> {
        validate_stream_id(stream)?;
        validate_metadata(stream, metadata)?;
        if let ExpectedVersion::Exact(v) = expected {
            if v > i64::MAX as u64 {
                return Err(Error::InvalidInput(format!(
                    "expected metadata version {v} of stream {stream:?} is out of range"
                )));
            }
        }
        if self.is_tombstoned(stream)? {
            return Err(Error::StreamDeleted {
                stream: stream.to_string(),
            });
        }
        let (kind, version) = expected.to_params();
        // Not retried: a repeat after a lost reply would meet its own write and report a
        // wrong expected version.
        let mut conn = self.conn()?;
        let statement = self.prepared(&mut conn, &self.sql().set_stream_metadata)?;
        let row = conn
            .query_opt(&statement, &[&stream, metadata, &kind, &version])
            .map_err(|e| self.map_error(e))?;
        match row {
            Some(row) => {
                // Stream subscriptions here and elsewhere read before they take events
                // from a notification again: `$tb` may hide them now.
                self.hub().appended();
                Ok(row.get::<_, i64>(0) as u64)
            }
            // Tombstoned since the check above: the statement left it alone.
            None if self.is_tombstoned(stream)? => Err(Error::StreamDeleted {
                stream: stream.to_string(),
            }),
            None => Err(Error::WrongExpectedVersion {
                stream: metadata_stream(stream),
                expected,
                actual: ActualVersion::from_head(self.stream_metadata(stream)?.map(|m| m.version)),
            }),
        }
    }

    /// Soft-deletes `stream` if it is at the `expected` version: stream reads return
    /// nothing from now on, the stream's snapshot is dropped, and its events are removed
    /// from the table in batches right away. A later append continues the stream's
    /// versions after the marker (its [`DeleteResult::marker_version`]); reads then
    /// return only what was appended after the delete.
    ///
    /// The delete is one statement that appends a [`STREAM_DELETED`] marker event after
    /// the stream's last event and sets the stream's `$tb` past it, so it is atomic with
    /// appends: a delete and an append racing for the stream's next version cannot both
    /// win. `$all` readers and subscriptions (stream subscriptions too) receive the
    /// marker like any event; the events removed stop being delivered (a reader that is
    /// behind never sees them; events already delivered are not recalled). The marker is
    /// kept (it carries the version) until a later append makes it removable by
    /// [`Store::scavenge`]. With `Any`, a delete that loses the race for the marker's
    /// version to an append goes on after that append.
    ///
    /// A wrong expected version is [`Error::WrongExpectedVersion`]; a tombstoned stream
    /// is [`Error::StreamDeleted`]. Deleting a stream that does not exist (with `Any` or
    /// `NoStream`) does nothing.
    ///
    /// ```no_run
    /// # use pg_eventstore::{ExpectedVersion, Store};
    /// # let store = Store::from_env()?;
    /// let deleted = store.delete_stream("cart-7", ExpectedVersion::Exact(2))?;
    /// assert_eq!(deleted.marker_version, Some(3));
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn delete_stream(&self, stream: &str, expected: ExpectedVersion) -> Result<DeleteResult> {
        self.delete(stream, expected, false)
    }

    /// Hard-deletes `stream` (a tombstone) if it is at the `expected` version: as
    /// [`Store::delete_stream`], but the stream can never be written again: appends,
    /// imports and metadata writes fail with [`Error::StreamDeleted`]. All its events
    /// but the [`STREAM_TOMBSTONE`] marker are removed at once, in batches. A stream that
    /// does not exist can be tombstoned too, so that it is never created.
    pub fn tombstone_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<DeleteResult> {
        self.delete(stream, expected, true)
    }

    fn delete(&self, stream: &str, expected: ExpectedVersion, hard: bool) -> Result<DeleteResult> {
        validate_stream_id(stream)?;
        if let ExpectedVersion::Exact(v) = expected {
            if v > i64::MAX as u64 {
                return Err(Error::InvalidInput(format!(
                    "expected version {v} of stream {stream:?} is out of range"
                )));
            }
        }
        let (kind, version) = expected.to_params();
        let marker = if hard {
            STREAM_TOMBSTONE
        } else {
            STREAM_DELETED
        };
        let data = serde_json::json!({});
        let metadata: Option<Value> = None;
        // Not retried after a transient failure: a repeat after a lost reply would meet
        // its own marker. A lost race for the marker's version (a concurrent append took
        // it first) wrote nothing and is run again, as a pool append is: the statement
        // then sees the winner, and decides (with `Any`, it deletes after it). The
        // statement is slower than an append, so against appenders that never pause it
        // loses most rounds (against two appenders in a tight loop, one delete in 300
        // lost 30 rounds in a row): `Any`, which has no version to be wrong about, gets
        // ten times an append's rounds.
        let mut conn = self.conn()?;
        let statement = self.prepared(&mut conn, &self.sql().delete_stream)?;
        let mut pause = Backoff::new(Duration::from_micros(50), Duration::from_millis(5));
        let attempts = match expected {
            ExpectedVersion::Any => 10 * APPEND_ATTEMPTS,
            _ => APPEND_ATTEMPTS,
        };
        let mut attempt = 0;
        let row = loop {
            attempt += 1;
            let row = conn.query_one(
                &statement,
                &[
                    &stream,
                    &uuid::Uuid::now_v7(),
                    &marker,
                    &data,
                    &metadata,
                    &kind,
                    &version,
                ],
            );
            match row {
                Err(e) if attempt < attempts && unique_violation(&e).is_some() => {
                    std::thread::sleep(pause.next_delay());
                }
                row => break row,
            }
        };
        drop(conn);
        let (head, marker_version) = match row {
            Ok(row) => (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)),
            // Lost the race every time.
            Err(e) if unique_violation(&e).is_some() && expected != ExpectedVersion::Any => {
                return Err(match self.stream_version(stream) {
                    Err(e) => e,
                    Ok(actual) => Error::WrongExpectedVersion {
                        stream: stream.to_string(),
                        expected,
                        actual: ActualVersion::from_head(actual),
                    },
                })
            }
            Err(e) => return Err(self.map_error(e)),
        };
        let Some(marker_version) = marker_version else {
            return match head {
                Some(TOMBSTONE_HEAD) => Err(Error::StreamDeleted {
                    stream: stream.to_string(),
                }),
                None if matches!(expected, ExpectedVersion::Any | ExpectedVersion::NoStream) => {
                    Ok(DeleteResult {
                        marker_version: None,
                        removed: 0,
                    })
                }
                _ => Err(Error::WrongExpectedVersion {
                    stream: stream.to_string(),
                    expected,
                    actual: ActualVersion::from_head(head.map(|v| v as u64)),
                }),
            };
        };
        // Subscribers here and elsewhere learn of the marker now, not at their next poll.
        self.hub().appended();
        // Everything below the marker; the marker stays (it carries the version, and
        // `$all` readers that are behind must still get it), even when an append after it
        // has made it removable: that is `scavenge`'s to do.
        let before = if hard { TOMBSTONE_HEAD } else { marker_version };
        Ok(DeleteResult {
            marker_version: Some(marker_version as u64),
            removed: self.remove_before(stream, before)?,
        })
    }

    /// Removes the events of `stream` below version `before` (never its last event), in
    /// batches of [`REMOVE_BATCH`], each in its own short transaction.
    pub(crate) fn remove_before(&self, stream: &str, before: i64) -> Result<u64> {
        let mut removed = 0;
        loop {
            let n = self.run("remove_events", &self.sql().remove_events, |c, s| {
                c.execute(s, &[&stream, &before, &REMOVE_BATCH])
            })?;
            removed += n;
            if n < REMOVE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }

    /// Truncates `stream` before version `before`: stream reads start there at once (the
    /// stream's `$tb` is raised to it, never lowered; its other metadata keys stay), and
    /// the events below it are removed in batches. Returns how many were removed. The
    /// stream's last event is always kept (it carries the version appends continue from),
    /// so `before` may be at most one past it. A stream that does not exist is
    /// [`Error::InvalidInput`]; a tombstoned one [`Error::StreamDeleted`].
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// // A snapshot covers versions 0..=499: keep the tail.
    /// let removed = store.truncate_stream("meter-4", 500)?;
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn truncate_stream(&self, stream: &str, before: u64) -> Result<u64> {
        validate_stream_id(stream)?;
        let head = self.stream_version(stream)?;
        let Some(head) = head else {
            return Err(Error::InvalidInput(format!(
                "cannot truncate stream {stream:?}: it does not exist"
            )));
        };
        if before > head + 1 {
            return Err(Error::InvalidInput(format!(
                "cannot truncate stream {stream:?} before version {before}: its last version \
                 is {head}, so {} is the most",
                head + 1
            )));
        }
        let before = before as i64;
        let tb: i64 = self
            .run("truncate", &self.sql().set_truncate_before, |c, s| {
                c.query_one(s, &[&stream, &before])
            })?
            .get(0);
        // As after a metadata write: stream subscriptions read before they take events
        // from a notification again.
        self.hub().appended();
        self.remove_before(stream, tb)
    }

    /// Removes what stream metadata allows, in bounded batches: events below each
    /// stream's `$tb` (left by truncation, or by a delete that was interrupted), beyond
    /// its `$maxCount` newest, and older than its `$maxAge` seconds. Looks at streams
    /// with metadata 100 at a time and removes at most [`REMOVE_BATCH`] events per short
    /// transaction, so appends and readers never wait long. A stream's last event is
    /// always kept (it carries the version), even when it is older than `$maxAge`.
    ///
    /// `$maxCount` and `$maxAge` take effect here, not on reads: between scavenges a
    /// stream read may still return events that retention allows to remove.
    /// `$all` readers and subscriptions stop receiving removed events, as after a delete.
    ///
    /// ```no_run
    /// # use pg_eventstore::Store;
    /// # let store = Store::from_env()?;
    /// let report = store.scavenge()?;
    /// println!("removed {} events from {} streams", report.events_removed, report.streams_trimmed);
    /// # Ok::<(), pg_eventstore::Error>(())
    /// ```
    pub fn scavenge(&self) -> Result<ScavengeReport> {
        let mut report = ScavengeReport::default();
        let mut after = String::new();
        loop {
            let rows = self.run("scavenge", &self.sql().scavenge_page, |c, s| {
                c.query(s, &[&after, &SCAVENGE_PAGE])
            })?;
            for row in &rows {
                let stream: String = row.get(0);
                let (lo, hi, cut): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
                report.streams_checked += 1;
                if lo < cut.min(hi) {
                    let n = self.remove_before(&stream, cut)?;
                    if n > 0 {
                        report.streams_trimmed += 1;
                        report.events_removed += n;
                    }
                }
            }
            match rows.last() {
                Some(row) if rows.len() as i64 == SCAVENGE_PAGE => after = row.get(0),
                _ => return Ok(report),
            }
        }
    }

    /// Deletes the snapshot of `stream`; returns whether there was one. (Deleting the
    /// stream deletes its snapshot too.)
    pub fn delete_snapshot(&self, stream: &str) -> Result<bool> {
        validate_stream_id(stream)?;
        let n = self.run("delete_snapshot", &self.sql().delete_snapshot, |c, s| {
            c.execute(s, &[&stream])
        })?;
        Ok(n > 0)
    }

    fn is_tombstoned(&self, stream: &str) -> Result<bool> {
        match self.stream_version(stream) {
            Err(Error::StreamDeleted { .. }) => Ok(true),
            Err(e) => Err(e),
            Ok(_) => Ok(false),
        }
    }

    /// The metadata of `stream`, or `None` when none was ever written.
    pub fn stream_metadata(&self, stream: &str) -> Result<Option<StreamMetadata>> {
        validate_stream_id(stream)?;
        let row = self.run("read", &self.sql().stream_metadata, |c, s| {
            c.query_opt(s, &[&stream])
        })?;
        Ok(row.map(|row| StreamMetadata {
            version: row.get::<_, i64>(0) as u64,
            metadata: row.get(1),
            updated_at: row.get(2),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn metadata_validation() {
        for ok in [
            json!({}),
            json!({ "owner": "x", "$maxCount": 1, "$maxAge": 60, "$tb": 0 }),
            json!({ "$maxAge": MAX_AGE_LIMIT_SECS }),
        ] {
            validate_metadata("s", &ok).unwrap();
        }
        for (bad, says) in [
            (json!([1]), "must be a JSON object, not an array"),
            (json!("x"), "not a string"),
            (json!(null), "not null"),
            (
                json!({ "$maxCount": 0 }),
                "$maxCount must be a whole number from 1",
            ),
            (json!({ "$maxCount": -5 }), "not -5"),
            (json!({ "$maxAge": -1 }), "$maxAge must be"),
            (json!({ "$maxAge": 1.5 }), "not 1.5"),
            (json!({ "$maxAge": MAX_AGE_LIMIT_SECS + 1 }), "(seconds)"),
            (json!({ "$tb": "3" }), "$tb must be"),
            (
                json!({ "$maxcount": 3 }),
                "\"$maxcount\" is not a reserved key",
            ),
            (json!({ "k": "a\u{0}b" }), "NUL"),
        ] {
            let e = validate_metadata("s", &bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("metadata of stream \"s\""), "{e}");
        }
    }
}
