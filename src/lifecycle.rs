//! Stream lifecycle: stream metadata (with retention settings), deletes, truncation and
//! the scavenger that removes what they allow.
//!
//! Events are immutable by the database's own rule (a trigger, schema version 5): only
//! the statements here may remove them, inside transactions that set the flag the
//! trigger checks, and nothing may update them.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::event::{has_nul_escape, validate_stream_id};
use crate::store::Store;
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
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StreamMetadata {
    /// The metadata's own version: 0 after the first write, one more after each.
    pub version: u64,
    /// The whole JSON object, custom keys included.
    pub metadata: Value,
    /// When it was last written.
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
    /// `$$<stream>` and the metadata's actual version. Stream reads honour `$tb` at once;
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
        let (kind, version) = expected.to_params();
        // Not retried: a repeat after a lost reply would meet its own write and report a
        // wrong expected version.
        let mut conn = self.conn()?;
        let statement = self.prepared(&mut conn, &self.sql().set_stream_metadata)?;
        let row = conn
            .query_opt(&statement, &[&stream, metadata, &kind, &version])
            .map_err(|e| self.map_error(e))?;
        match row {
            Some(row) => Ok(row.get::<_, i64>(0) as u64),
            None => Err(Error::WrongExpectedVersion {
                stream: metadata_stream(stream),
                expected,
                actual: ActualVersion::from_head(self.stream_metadata(stream)?.map(|m| m.version)),
            }),
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
