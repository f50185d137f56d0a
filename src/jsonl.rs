//! JSON lines, the interchange format of the command-line tool: one event per line.
//!
//! Output lines are [`RecordedEvent`](crate::RecordedEvent)s written by
//! [`RecordedEvent::write_json`](crate::RecordedEvent::write_json): the fields serde gives
//! them, with the data and metadata exactly as stored.
//! Input lines ([`JsonLines`]) are JSON objects with
//!
//! * `type` (a string) and `data` (any JSON value): required;
//! * `metadata` (any JSON value) and `id` (a UUID): optional; a missing id gets a fresh
//!   UUIDv7;
//! * `stream`: required for an import, ignored by an append (which names its stream);
//! * `version`, `position`: optional, **checked, never trusted** by an import (see
//!   [`ImportEvent::version`] and [`ImportEvent::position`]);
//! * `recorded_at` (RFC 3339 in UTC, as output lines have it): optional; an import keeps
//!   it as the event's time.
//!
//! Other fields are ignored, so an exported line imports as it is. Blank lines are
//! skipped; lines are counted from 1, blank ones included, and every error names its line.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read};

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::{EventData, ImportEvent};

/// One input line, borrowed from the line buffer.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    /// `Some("null")` for `"metadata": null`, `None` when the field is missing, so that
    /// JSON `null` metadata survives an export and import.
    #[serde(borrow, default, deserialize_with = "present")]
    metadata: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<Uuid>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    position: Option<u64>,
    #[serde(borrow, default)]
    recorded_at: Option<Cow<'a, str>>,
}

fn present<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Reads JSON lines from any [`Read`] (buffered here), one [`ImportEvent`] per line, for
/// [`Store::import_iter`](crate::Store::import_iter). Holds one line at a time.
///
/// The first bad line ends the iteration with an [`Error::InvalidInput`](crate::Error::InvalidInput) that names it
/// ("line 3, column 7: expected value").
///
/// ```
/// use pg_eventstore::JsonLines;
/// let input = br#"{"stream":"user-1","type":"Registered","data":{"name":"ada"}}
/// {"stream":"user-1","type":"Renamed","data":{"name":"Ada"},"version":1}
/// "#;
/// let events: Vec<_> = JsonLines::new(&input[..]).collect::<Result<_, _>>()?;
/// assert_eq!(events[1].stream_id(), "user-1");
/// assert_eq!(events[1].event_data().event_type(), "Renamed");
///
/// let bad = JsonLines::new(&b"{\"stream\":\"a\",\"type\":\"T\",\"data\":{}}\n{oops}\n"[..]);
/// let err = bad.collect::<Result<Vec<_>, _>>().unwrap_err();
/// assert!(err.to_string().contains("line 2"), "{err}");
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
#[derive(Debug)]
pub struct JsonLines<R> {
    reader: BufReader<R>,
    buf: Vec<u8>,
    line: u64,
    default_stream: Option<String>,
    done: bool,
}

impl<R: Read> JsonLines<R> {
    /// Lines from `reader`. A line without `stream` is an error.
    pub fn new(reader: R) -> Self {
        JsonLines {
            reader: BufReader::with_capacity(256 * 1024, reader),
            buf: Vec::new(),
            line: 0,
            default_stream: None,
            done: false,
        }
    }

    /// Lines without a `stream` field go to `stream` (lines with one keep theirs).
    pub fn default_stream(mut self, stream: impl Into<String>) -> Self {
        self.default_stream = Some(stream.into());
        self
    }

    /// The number of the last line read (from 1; 0 before the first).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Reads the next line that is not blank into `buf`; `false` at the end.
    fn next_line(&mut self) -> Result<bool> {
        loop {
            self.buf.clear();
            let n = self.reader.read_until(b'\n', &mut self.buf).map_err(|e| {
                Error::InvalidInput(format!("line {}: cannot read: {e}", self.line + 1))
            })?;
            if n == 0 {
                return Ok(false);
            }
            self.line += 1;
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                return Ok(true);
            }
        }
    }

    fn parse(&self) -> Result<ImportEvent> {
        let n = self.line;
        let line: Line<'_> = serde_json::from_slice(&self.buf).map_err(|e| {
            // serde_json says "at line 1 column 7" of the one line it was given.
            let mut msg = e.to_string();
            if let Some(i) = msg.rfind(" at line ") {
                msg.truncate(i);
            }
            Error::InvalidInput(format!("line {n}, column {}: {msg}", e.column()))
        })?;
        let stream = match (line.stream, &self.default_stream) {
            (Some(s), _) => s.into_owned(),
            (None, Some(s)) => s.clone(),
            (None, None) => {
                return Err(Error::InvalidInput(format!(
                    "line {n}: the field \"stream\" is missing"
                )))
            }
        };
        let mut event = EventData::from_json_bytes(
            line.event_type.into_owned(),
            line.data.get().as_bytes().to_vec(),
        );
        event.metadata = line.metadata.map(|m| m.get().as_bytes().to_vec());
        if let Some(id) = line.id {
            event.id = id;
        }
        let mut out = ImportEvent::new(stream, event).line(n);
        if let Some(v) = line.version {
            out = out.version(v);
        }
        if let Some(p) = line.position {
            out = out.position(p);
        }
        if let Some(t) = line.recorded_at {
            let t = humantime::parse_rfc3339(&t).map_err(|e| {
                Error::InvalidInput(format!(
                    "line {n}: recorded_at {t:?} is not an RFC 3339 time in UTC \
                     (like 2026-11-25T10:00:00.123456Z): {e}"
                ))
            })?;
            out = out.recorded_at(t);
        }
        Ok(out)
    }
}

impl<R: Read> Iterator for JsonLines<R> {
    type Item = Result<ImportEvent>;

    fn next(&mut self) -> Option<Result<ImportEvent>> {
        if self.done {
            return None;
        }
        let item = match self.next_line() {
            Ok(false) => None,
            Ok(true) => Some(self.parse()),
            Err(e) => Some(Err(e)),
        };
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &str) -> Result<Vec<ImportEvent>> {
        JsonLines::new(input.as_bytes()).collect()
    }

    #[test]
    fn fields_and_defaults() {
        let id = Uuid::now_v7();
        let lines = format!(
            "{{\"stream\":\"s\",\"type\":\"T\",\"data\":{{\"a\": [1, 2]}},\"id\":\"{id}\",\
             \"version\":4,\"position\":99,\"recorded_at\":\"2026-01-02T03:04:05.000006Z\",\
             \"extra\":true}}\n\n  \n{{\"stream\":\"s\",\"type\":\"U\",\"data\":null,\"metadata\":null}}"
        );
        let events = parse(&lines).unwrap();
        assert_eq!(events.len(), 2);
        let (a, b) = (&events[0], &events[1]);
        assert_eq!(a.event_data().event_id(), id);
        assert_eq!(a.event_data().data_json(), br#"{"a": [1, 2]}"#);
        assert_eq!(a.event_data().metadata, None);
        assert_eq!(
            (a.version, a.position, a.line),
            (Some(4), Some(99), Some(1))
        );
        assert_eq!(
            a.recorded_at,
            Some(humantime::parse_rfc3339("2026-01-02T03:04:05.000006Z").unwrap())
        );
        assert_eq!(b.line, Some(4));
        assert_eq!(b.event_data().metadata.as_deref(), Some(&b"null"[..]));
        assert_eq!(b.event_data().data_json(), b"null");
    }

    #[test]
    fn errors_name_the_line() {
        let good = r#"{"stream":"s","type":"T","data":{}}"#;
        for (bad, want) in [
            (
                "{\"stream\":\"s\",\"type\":\"T\"}",
                "line 3, column 25: missing field `data`",
            ),
            ("{not json", "line 3, column 2: key must be a string"),
            (
                "{\"type\":\"T\",\"data\":1}",
                "line 3: the field \"stream\" is missing",
            ),
            (
                "{\"stream\":\"s\",\"type\":\"T\",\"data\":1,\"recorded_at\":\"yesterday\"}",
                "line 3: recorded_at \"yesterday\"",
            ),
            (
                "{\"stream\":\"s\",\"type\":\"T\",\"data\":1,\"id\":\"x\"}",
                "line 3, column",
            ),
        ] {
            let input = format!("{good}\n{good}\n{bad}\n{good}\n");
            let mut it = JsonLines::new(input.as_bytes());
            assert!(it.next().unwrap().is_ok());
            assert!(it.next().unwrap().is_ok());
            let msg = it.next().unwrap().unwrap_err().to_string();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
            assert!(it.next().is_none(), "fused after an error");
        }
    }

    #[test]
    fn default_stream() {
        let lines = "{\"type\":\"T\",\"data\":1}\n{\"stream\":\"own\",\"type\":\"T\",\"data\":1}\n";
        let events: Vec<ImportEvent> = JsonLines::new(lines.as_bytes())
            .default_stream("given")
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(events[0].stream_id(), "given");
        assert_eq!(events[1].stream_id(), "own");
    }

    #[test]
    fn time_format() {
        let t = humantime::parse_rfc3339("2026-11-25T10:00:00.123456Z").unwrap();
        let json = serde_json::to_string(&crate::RecordedEvent {
            id: Uuid::nil(),
            stream_id: "s".into(),
            version: 1,
            position: 2,
            event_type: "T".into(),
            data: crate::Json::from_value(&serde_json::json!({"k": 1})),
            metadata: None,
            recorded_at: t,
        })
        .unwrap();
        assert_eq!(
            json,
            "{\"id\":\"00000000-0000-0000-0000-000000000000\",\"stream\":\"s\",\"version\":1,\
             \"position\":2,\"type\":\"T\",\"data\":{\"k\":1},\
             \"recorded_at\":\"2026-11-25T10:00:00.123456Z\"}"
        );
    }
}
