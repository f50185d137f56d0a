//! Events going in ([`EventData`](crate::EventData)) and coming out ([`RecordedEvent`](crate::RecordedEvent)).

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_BYTES: usize = 512;
/// The event type of the marker that [`Store::delete_stream`](crate::Store::delete_stream)
/// appends: `$all` readers and subscriptions see it; stream reads do not.
pub const STREAM_DELETED: &str = "$streamDeleted";
/// The event type of the tombstone that
/// [`Store::tombstone_stream`](crate::Store::tombstone_stream) appends: `$all` readers and
/// subscriptions see it; stream reads do not, and no append can follow it.
pub const STREAM_TOMBSTONE: &str = "$tombstone";
/// The longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 256;

/// Whether `event_type` is one of the store's markers ([`STREAM_DELETED`],
/// [`STREAM_TOMBSTONE`]).
pub(crate) fn is_marker(event_type: &str) -> bool {
    event_type == STREAM_DELETED || event_type == STREAM_TOMBSTONE
}

/// An event to append: a type name, JSON data, optional JSON metadata and an id.
///
/// The data is serialized once, when the `EventData` is built.
///
/// ```
/// use pg_eventstore::EventData;
/// #[derive(serde::Serialize)]
/// struct Deposited { amount: u64 }
///
/// let event = EventData::new("Deposited", &Deposited { amount: 10 })?
///     .metadata(&serde_json::json!({ "correlationId": "req-17" }))?;
/// assert_eq!(event.event_type(), "Deposited");
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventData {
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) data: Vec<u8>,
    pub(crate) metadata: Option<Vec<u8>>,
}

impl EventData {
    /// An event of type `event_type` whose data is `data` serialized as JSON.
    /// The id is a fresh UUIDv7; set your own with [`EventData::id`](crate::EventData::id) to make retries
    /// idempotent across processes.
    pub fn new<T: Serialize + ?Sized>(event_type: impl Into<String>, data: &T) -> Result<Self> {
        Ok(Self::from_json_bytes(
            event_type.into(),
            serde_json::to_vec(data)?,
        ))
    }

    /// An event whose data is a JSON value.
    pub fn json(event_type: impl Into<String>, data: Value) -> Self {
        let bytes = serde_json::to_vec(&data).expect("a serde_json::Value always serializes");
        Self::from_json_bytes(event_type.into(), bytes)
    }

    pub(crate) fn from_json_bytes(event_type: String, data: Vec<u8>) -> Self {
        EventData {
            id: Uuid::now_v7(),
            event_type,
            data,
            metadata: None,
        }
    }

    /// Sets the event id. Appending the same ids to the same stream again (after a lost
    /// reply, say) returns the original result instead of writing duplicates.
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets the metadata (correlation and causation ids, the user, ...), serialized as JSON.
    pub fn metadata<M: Serialize + ?Sized>(mut self, metadata: &M) -> Result<Self> {
        self.metadata = Some(serde_json::to_vec(metadata)?);
        Ok(self)
    }

    /// The event id.
    pub fn event_id(&self) -> Uuid {
        self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The data as JSON text.
    pub fn data_json(&self) -> &[u8] {
        &self.data
    }

    /// Checks what PostgreSQL would refuse half-way through a write, so that a bad event
    /// fails the whole append before anything is sent.
    pub(crate) fn validate(&self, index: usize) -> Result<()> {
        self.validate_as(&format_args!("event {index}"))
    }

    /// [`EventData::validate`](crate::EventData::validate), naming the event as `label` ("event 3", "line 4").
    pub(crate) fn validate_as(&self, label: &dyn fmt::Display) -> Result<()> {
        validate_text("event type", &self.event_type, MAX_EVENT_TYPE_BYTES)
            .map_err(|m| Error::InvalidInput(format!("{label}: {m}")))?;
        if self.event_type.starts_with('$') {
            return Err(Error::InvalidInput(format!(
                "{label}: the event type {:?} starts with '$', which is reserved for the \
                 store's own markers ({STREAM_DELETED}, {STREAM_TOMBSTONE})",
                self.event_type
            )));
        }
        self.validate_json_as(label)
    }

    /// The data and metadata checks of [`EventData::validate_as`] (an import of an
    /// export also takes the store's markers, whose type starts with `$`).
    pub(crate) fn validate_json_as(&self, label: &dyn fmt::Display) -> Result<()> {
        for (what, json) in [
            ("data", Some(&self.data)),
            ("metadata", self.metadata.as_ref()),
        ] {
            if let Some(problem) = json.and_then(|j| jsonb_escape_problem(j)) {
                return Err(Error::InvalidInput(format!(
                    "{label} ({}): its {what} contains {problem}, which PostgreSQL's jsonb \
                     cannot store",
                    self.event_type
                )));
            }
        }
        Ok(())
    }
}

/// Checks a stream id: not empty, no NUL byte, at most [`MAX_STREAM_ID_BYTES`].
pub(crate) fn validate_stream_id(stream: &str) -> Result<()> {
    validate_text("stream id", stream, MAX_STREAM_ID_BYTES).map_err(Error::InvalidInput)
}

pub(crate) fn validate_text(what: &str, text: &str, max: usize) -> std::result::Result<(), String> {
    if text.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if text.len() > max {
        return Err(format!(
            "the {what} is {} bytes long; at most {max} are allowed",
            text.len()
        ));
    }
    if text.contains('\0') {
        return Err(format!(
            "the {what} {text:?} contains a NUL byte, which PostgreSQL text cannot store"
        ));
    }
    Ok(())
}

/// Whether serialized JSON holds the escape `\u0000` (an unescaped backslash followed by
/// `u0000`). serde_json escapes a NUL character that way, and jsonb refuses it.
pub(crate) fn has_nul_escape(json: &[u8]) -> bool {
    jsonb_escape_problem(json) == Some(NUL_ESCAPE)
}

const NUL_ESCAPE: &str = "the NUL character \\u0000";
const LONE_SURROGATE: &str = "a \\u escape of half a UTF-16 surrogate pair (\\uD800 to \\uDFFF) \
                              without its other half";

/// What in serialized JSON PostgreSQL's `jsonb` refuses although the JSON is valid: the
/// escape `\u0000` (a NUL character), and a `\u` escape of a UTF-16 surrogate that is
/// not a high one (`\uD800`–`\uDBFF`) followed at once by a low one (`\uDC00`–`\uDFFF`).
/// serde_json writes neither for a Rust string; JSON given as text (JSON lines, raw
/// values) may hold either.
pub(crate) fn jsonb_escape_problem(json: &[u8]) -> Option<&'static str> {
    // Only a backslash starts an escape: a vectorised search jumps from one to the next
    // (about 300 instead of 1,900 instructions for an event of 300 bytes).
    let unit = |at: usize| -> Option<u16> {
        let hex = json.get(at..at + 6)?.strip_prefix(b"\\u")?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut from = 0;
    while let Some(at) = memchr::memchr(b'\\', &json[from..]) {
        let i = from + at;
        // Skip the escaped character, so that `\\u0000` is not taken for an escape.
        from = i + 2;
        match unit(i) {
            Some(0) => return Some(NUL_ESCAPE),
            Some(0xD800..=0xDBFF) => match unit(i + 6) {
                Some(0xDC00..=0xDFFF) => from = i + 12,
                _ => return Some(LONE_SURROGATE),
            },
            Some(0xDC00..=0xDFFF) => return Some(LONE_SURROGATE),
            Some(_) => from = i + 6,
            None => {}
        }
        if from >= json.len() {
            return None;
        }
    }
    None
}

/// JSON as the store holds it: the text PostgreSQL returned for a `jsonb` column, parsed
/// only when asked.
///
/// [`RecordedEvent`](crate::RecordedEvent)'s data and metadata come as `Json`, so reading an
/// event costs one string, not a tree of [`serde_json::Value`]s that a handler may never look
/// at. Decode it straight into your own type with [`Json::decode`] (or
/// [`RecordedEvent::data_as`](crate::RecordedEvent::data_as), whose error names the event),
/// into a `Value` with [`Json::to_value`], or pass it on unparsed: [`Json::as_str`] gives
/// the text, and a `Json` is a parameter (`ToSql`) for a `jsonb` or `json` column of your
/// own, and a column type (`FromSql`) to read one.
///
/// The text is PostgreSQL's `jsonb` output: keys sorted by length then bytes, no duplicate
/// keys, one space after `:` and `,`. Two `Json`s are equal when their texts are; a `Json`
/// equals a `Value` when it parses to it. It serializes (serde) as the JSON it holds,
/// through a `Value`, so with any serializer, but a number is then what `f64` makes of it
/// (and one beyond its range fails); [`Json::write_compact`] and
/// [`RecordedEvent::write_json`](crate::RecordedEvent::write_json) write the text as
/// stored.
///
/// ```
/// # use pg_eventstore::RecordedEvent;
/// #[derive(serde::Deserialize)]
/// struct Deposited { amount: u64 }
///
/// fn amount(event: &RecordedEvent) -> pg_eventstore::Result<u64> {
///     let d: Deposited = event.data_as()?; // parsed here, straight into `Deposited`
///     Ok(d.amount)
/// }
/// fn log_line(event: &RecordedEvent) -> String {
///     format!("{} {}", event.event_type, event.data.as_str()) // not parsed at all
/// }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Json(Box<str>);

impl Json {
    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses the JSON into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.0)
    }

    /// JSON text as the server printed it (a notification's payload carries it).
    pub(crate) fn from_text(text: String) -> Json {
        Json(text.into_boxed_str())
    }

    #[cfg(test)]
    pub(crate) fn from_value(value: &Value) -> Json {
        Json(value.to_string().into())
    }

    /// Parses the JSON into a [`Value`]. It fails only where `Value` cannot hold what
    /// `jsonb` can, such as a number beyond `f64`'s range.
    pub fn to_value(&self) -> serde_json::Result<Value> {
        self.decode()
    }

    /// Writes the JSON without its insignificant whitespace (`jsonb` puts a space after
    /// `:` and `,`), unparsed: every number exactly as stored, keys in the stored order.
    pub fn write_compact<W: io::Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        let text = self.0.as_bytes();
        let (mut start, mut i, mut in_string) = (0, 0, false);
        while i < text.len() {
            match (in_string, text[i]) {
                (true, b'\\') => i += 1, // the escaped character is skipped below
                (_, b'"') => in_string = !in_string,
                (false, b' ' | b'\n' | b'\t' | b'\r') => {
                    out.write_all(&text[start..i])?;
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        out.write_all(&text[start..])
    }

    /// [`Json::write_compact`] into bytes.
    fn compact(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len());
        self.write_compact(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Json({})", self.0)
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Json {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().is_ok_and(|v| v == *other)
    }
}

impl PartialEq<Json> for Value {
    fn eq(&self, other: &Json) -> bool {
        other == self
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // Through `Value`, not `RawValue`: `RawValue` is only understood by serde_json's
        // own serializer. Exact output: `write_compact`.
        self.to_value()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

impl<'a> FromSql<'a> for Json {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unsupported jsonb binary format version".into()),
            }
        } else {
            raw
        };
        Ok(Json(std::str::from_utf8(text)?.into()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// As a parameter of your own statements (a `jsonb` or `json` column), sent as it is:
/// copying an event's data into a read model costs no parsing.
impl ToSql for Json {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        JsonbParam(self.0.as_bytes()).to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <JsonbParam<'_> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// JSON text sent as `jsonb` without parsing it into a `Value` first.
#[derive(Debug)]
pub(crate) struct JsonbParam<'a>(pub(crate) &'a [u8]);

impl ToSql for JsonbParam<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]); // jsonb binary format version
        }
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// An event as stored: what was appended plus where and when it was recorded.
///
/// It serializes (serde) to the JSON object that `pg-eventstore read` and `export` print,
/// one per line, and that [`Store::import_json_lines`](crate::Store::import_json_lines)
/// reads back: `id`, `stream`, `version`, `position`, `type`, `data`, `metadata` (left out
/// when the event has none) and `recorded_at` (RFC 3339 in UTC, in microseconds). The
/// CLI writes it with [`RecordedEvent::write_json`], which keeps the data exactly as
/// stored; serde parses the data into a `Value` first (see [`Json`]).
///
/// ```
/// # use pg_eventstore::RecordedEvent;
/// fn print_line(event: &RecordedEvent) -> serde_json::Result<()> {
///     // {"id":"0190…","stream":"account-1","version":0,"position":…,"type":"Deposited",
///     //  "data":{"amount":10},"recorded_at":"2026-11-25T10:00:00.123456Z"}
///     println!("{}", serde_json::to_string(event)?);
///     Ok(())
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// The event id.
    pub id: Uuid,
    /// The stream the event belongs to.
    #[serde(rename = "stream")]
    pub stream_id: String,
    /// The event's version in its stream, counting from 0.
    pub version: u64,
    /// The event's global position: unique, and increasing in the order in which `$all`
    /// readers and subscriptions deliver events. Positions are sparse (see the crate docs).
    pub position: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event data, as JSON text: [`RecordedEvent::data_as`] parses it.
    pub data: Json,
    /// The event metadata, if any was given: [`RecordedEvent::metadata_as`] parses it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Json>,
    /// When the event was recorded (the append transaction's start time on the server,
    /// or the time an import carried over).
    #[serde(serialize_with = "serialize_time")]
    pub recorded_at: SystemTime,
}

impl RecordedEvent {
    /// Deserializes the data into `T`. A failure is [`Error::Decode`](crate::Error::Decode), which names the
    /// event's stream, version and type.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T> {
        self.data.decode().map_err(|e| self.decode_error("data", e))
    }

    /// Deserializes the metadata into `T` (`Ok(None)` when there is none). A failure is
    /// [`Error::Decode`](crate::Error::Decode), which names the event's stream, version and type.
    pub fn metadata_as<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        match &self.metadata {
            None => Ok(None),
            Some(m) => m
                .decode()
                .map(Some)
                .map_err(|e| self.decode_error("metadata", e)),
        }
    }

    /// Writes the event as one JSON object, the line `pg-eventstore export` prints:
    /// `id`, `stream`, `version`, `position`, `type`, `data`, `metadata` (left out when
    /// there is none) and `recorded_at`, as `Serialize` names them. The data and
    /// metadata are written as stored ([`Json::write_compact`]), not parsed: unlike
    /// serializing through serde (which goes through [`Value`]), every digit of a number
    /// survives, and a number beyond `f64` is written rather than failing. An import of
    /// the line stores the same JSON.
    ///
    /// ```
    /// # use pg_eventstore::RecordedEvent;
    /// fn export(events: &[RecordedEvent], out: &mut impl std::io::Write) -> std::io::Result<()> {
    ///     for event in events {
    ///         event.write_json(out)?;
    ///         out.write_all(b"\n")?;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub fn write_json<W: io::Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        write!(out, r#"{{"id":"{}","stream":"#, self.id)?;
        serde_json::to_writer(&mut *out, &self.stream_id)?;
        write!(
            out,
            r#","version":{},"position":{},"type":"#,
            self.version, self.position
        )?;
        serde_json::to_writer(&mut *out, &self.event_type)?;
        out.write_all(br#","data":"#)?;
        self.data.write_compact(out)?;
        if let Some(m) = &self.metadata {
            out.write_all(br#","metadata":"#)?;
            m.write_compact(out)?;
        }
        let time =
            rfc3339(self.recorded_at).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        write!(out, r#","recorded_at":"{time}"}}"#)
    }

    /// The event as an [`EventData`] to append or import elsewhere (another store, a
    /// stream that replaces this one): the same id, type, data and metadata, the JSON
    /// copied as stored rather than parsed, so that every digit survives. An append of it
    /// to a store that already holds the id refuses it as a repeat (or returns the first
    /// append's result, for the same stream); give it a new one with [`EventData::id`]
    /// to store it twice.
    ///
    /// ```
    /// # use pg_eventstore::{ExpectedVersion, RecordedEvent, Store};
    /// fn copy(event: &RecordedEvent, to: &Store) -> pg_eventstore::Result<()> {
    ///     to.append(&event.stream_id, ExpectedVersion::Any, &[event.to_event_data()])?;
    ///     Ok(())
    /// }
    /// ```
    pub fn to_event_data(&self) -> EventData {
        EventData {
            id: self.id,
            event_type: self.event_type.clone(),
            data: self.data.compact(),
            metadata: self.metadata.as_ref().map(Json::compact),
        }
    }

    fn decode_error(&self, part: &'static str, source: serde_json::Error) -> Error {
        Error::Decode {
            stream: self.stream_id.clone(),
            version: self.version,
            event_type: self.event_type.clone(),
            part,
            source,
        }
    }

    pub(crate) fn from_row(row: &postgres::Row) -> Result<Self> {
        Ok(RecordedEvent {
            position: row.try_get::<_, i64>(0)? as u64,
            id: row.try_get(1)?,
            stream_id: row.try_get(2)?,
            version: row.try_get::<_, i64>(3)? as u64,
            event_type: row.try_get(4)?,
            data: row.try_get(5)?,
            metadata: row.try_get(6)?,
            recorded_at: row.try_get(7)?,
        })
    }
}

/// One event of a streaming import: the event, its stream, and what the input says
/// about it. Made by hand with [`ImportEvent::new`], or read by [`JsonLines`](crate::JsonLines).
///
/// ```
/// use pg_eventstore::{EventData, ImportEvent};
/// let event = ImportEvent::new("user-1", EventData::json("Registered", serde_json::json!({})))
///     .version(0);
/// assert_eq!(event.stream_id(), "user-1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportEvent {
    pub(crate) stream: String,
    pub(crate) event: EventData,
    pub(crate) version: Option<u64>,
    pub(crate) position: Option<u64>,
    pub(crate) recorded_at: Option<SystemTime>,
    /// The input line, for error messages (set by [`JsonLines`](crate::JsonLines)).
    pub(crate) line: Option<u64>,
}

impl ImportEvent {
    /// `event`, to be imported into `stream`.
    pub fn new(stream: impl Into<String>, event: EventData) -> Self {
        ImportEvent {
            stream: stream.into(),
            event,
            version: None,
            position: None,
            recorded_at: None,
            line: None,
        }
    }

    /// The version the event must get in its stream. **Checked, not trusted**: the
    /// import counts versions itself (from 0, or on from the stream's last event with
    /// [`ImportOptions::continue_existing_streams`](crate::ImportOptions::continue_existing_streams)), and when the count differs from
    /// this one, it fails with [`Error::InvalidInput`](crate::Error::InvalidInput) naming the event and writes
    /// nothing (in a chunked import: nothing of that transaction). So an export that is
    /// imported with lines missing, repeated or reordered, or into streams that already
    /// hold other events, is refused rather than renumbered. With
    /// [`ImportOptions::exported`](crate::ImportOptions::exported), a stream new in the
    /// store begins at the version its first event gives.
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// The global position the event had where it came from. **Checked, not trusted**:
    /// positions are never copied (an imported event gets a position in the importing
    /// transaction's range, see the crate docs), but the positions that the input gives
    /// must increase strictly from one event to the next, so that the events are imported
    /// in the global order they were exported in; an event whose position does not is
    /// refused with [`Error::InvalidInput`](crate::Error::InvalidInput) and nothing is written.
    pub fn position(mut self, position: u64) -> Self {
        self.position = Some(position);
        self
    }

    /// The time the event was first recorded, kept as its `recorded_at`. Without it the
    /// event gets the importing transaction's time. It must lie between 1970-01-01 and
    /// the end of 9999 (what JSON output and JSON lines hold, so that an export can be
    /// imported again); the import refuses any other with
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) and writes nothing.
    pub fn recorded_at(mut self, time: SystemTime) -> Self {
        self.recorded_at = Some(time);
        self
    }

    pub(crate) fn line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }

    /// The stream the event goes to.
    pub fn stream_id(&self) -> &str {
        &self.stream
    }

    /// The event.
    pub fn event_data(&self) -> &EventData {
        &self.event
    }

    /// The event, without its stream and checks (to append it somewhere).
    pub fn into_event_data(self) -> EventData {
        self.event
    }
}

/// What an append wrote (or, for a repeated append, what the original wrote).
/// Serializes with its field names, as `pg-eventstore append` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AppendResult {
    /// Version of the first event appended.
    pub first_version: u64,
    /// Version of the last event appended: the stream's version now, and what to pass as
    /// `ExpectedVersion::Exact` for the next append.
    pub last_version: u64,
    /// Global position of the first event appended.
    pub first_position: u64,
    /// Global position of the last event appended.
    pub last_position: u64,
    /// `true` when these events were already stored by an earlier call with the same ids,
    /// and this call wrote nothing.
    pub was_duplicate: bool,
}

/// A duration as seconds, with their fraction.
pub(crate) fn serialize_seconds<S: Serializer>(
    d: &std::time::Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Serializes a time as RFC 3339 in UTC with microseconds, PostgreSQL's precision.
/// [`serialize_time`] for an optional time (`null` when there is none).
pub(crate) fn serialize_time_opt<S: Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_time(t, s),
        None => s.serialize_none(),
    }
}

pub(crate) fn serialize_time<S: Serializer>(
    t: &SystemTime,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&rfc3339(*t).map_err(serde::ser::Error::custom)?)
}

/// The times that JSON output writes and JSON-lines input reads (RFC 3339 in UTC, with
/// microseconds): from 1970-01-01 up to the end of the year 9999. An import refuses a
/// `recorded_at` outside them, so that whatever is exported can be imported again.
pub(crate) fn check_json_time(t: SystemTime) -> std::result::Result<(), String> {
    rfc3339(t).map(|_| ())
}

/// `t` as RFC 3339 in UTC with microseconds, or why it cannot be written.
fn rfc3339(t: SystemTime) -> std::result::Result<humantime::Rfc3339Timestamp, String> {
    // 10000-01-01T00:00:00Z
    const END: Duration = Duration::from_secs(253_402_300_800);
    let outside = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since < END => return Ok(humantime::format_rfc3339_micros(t)),
        Ok(_) => "after the end of 9999",
        Err(_) => "before 1970",
    };
    Err(format!(
        "the time is {outside}: JSON times here are RFC 3339 from 1970-01-01T00:00:00Z to \
         9999-12-31T23:59:59.999999Z"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escape_detection() {
        assert!(has_nul_escape(br#"{"a":"x\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a\u0000":1}"#));
        assert!(!has_nul_escape(br#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a":"x\\\u0000y"}"#));
        assert!(!has_nul_escape(br#"{"a":"\u0001"}"#));
        // Escapes at the edges, and one after many others.
        assert!(has_nul_escape(br#"\u0000"#));
        assert!(!has_nul_escape(br#"\"#));
        assert!(!has_nul_escape(br#"\\"#));
        assert!(!has_nul_escape(b""));
        assert!(has_nul_escape(br#"{"a":"\n\t\\\"x\u0000"}"#));
        assert!(!has_nul_escape(br#"{"a":"\n\t\\\"x\\u0000"}"#));
        // Surrogate escapes: a pair is fine, half of one is not.
        assert_eq!(jsonb_escape_problem(br#"{"a":"\ud83d\ude00"}"#), None);
        assert_eq!(jsonb_escape_problem(br#"{"a":"\uD83D\uDE00\u00e9"}"#), None);
        for lone in [
            &br#"{"a":"\ud800"}"#[..],
            br#"{"a":"\ud800x"}"#,
            br#"{"a":"\udc00"}"#,
            br#"{"a":"\ud800\u0041"}"#,
            br#"{"a":"\ud800\ud800"}"#,
            br#"\ud800"#,
        ] {
            assert_eq!(jsonb_escape_problem(lone), Some(LONE_SURROGATE), "{lone:?}");
        }
        assert_eq!(jsonb_escape_problem(br#"{"a":"\\ud800"}"#), None);
        let e = EventData::json("T", serde_json::json!({"s": "a\0b"}));
        assert!(e.validate(0).is_err());
    }

    fn compact(text: &str) -> String {
        String::from_utf8(Json(text.into()).compact()).unwrap()
    }

    #[test]
    fn write_compact_drops_only_the_whitespace_between_tokens() {
        assert_eq!(
            compact(r#"{"a": 1, "b c": "x \" y\\", "d": [1.50, 2, {"e": null}]}"#),
            r#"{"a":1,"b c":"x \" y\\","d":[1.50,2,{"e":null}]}"#
        );
        // `json` (not `jsonb`) keeps the text as written.
        assert_eq!(
            compact("{\n\t\"a\" : [ 1 ,2 ],\r\n \"b\": \" \\\\\" }"),
            r#"{"a":[1,2],"b":" \\"}"#
        );
        assert_eq!(
            compact("12345678901234567890123"),
            "12345678901234567890123"
        );
        assert_eq!(compact(r#""""#), r#""""#);
    }

    #[test]
    fn write_json_is_the_serde_line_with_the_data_as_stored() {
        let t = humantime::parse_rfc3339("2026-11-25T10:00:00.123456Z").unwrap();
        let mut event = RecordedEvent {
            id: Uuid::now_v7(),
            stream_id: "user-\"ä\"\n".into(),
            version: 7,
            position: 1 << 40,
            event_type: "T\\".into(),
            data: Json(r#"{"a": 1, "bb": [true, null, "x y"]}"#.into()),
            metadata: None,
            recorded_at: t,
        };
        for metadata in [
            None,
            Some(Json("null".into())),
            Some(Json(r#"{"k": 2}"#.into())),
        ] {
            event.metadata = metadata;
            let mut line = Vec::new();
            event.write_json(&mut line).unwrap();
            assert_eq!(
                String::from_utf8(line).unwrap(),
                serde_json::to_string(&event).unwrap()
            );
        }
    }

    #[test]
    fn json_compares_decodes_and_serializes_as_the_json_it_holds() {
        let j = Json(r#"{"a": 1, "bb": [true, null]}"#.into());
        assert_eq!(j, serde_json::json!({"bb": [true, null], "a": 1}));
        assert_eq!(serde_json::json!({"a": 1, "bb": [true, null]}), j);
        assert_ne!(j, serde_json::json!({"a": 2, "bb": [true, null]}));
        #[derive(serde::Deserialize)]
        struct A {
            a: u8,
        }
        assert_eq!(j.decode::<A>().unwrap().a, 1);
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"a":1,"bb":[true,null]}"#
        );
        assert_eq!(format!("{j:?}"), r#"Json({"a": 1, "bb": [true, null]})"#);
        assert_eq!(j.to_string(), j.as_str());
        // What jsonb can hold and `Value` cannot: an error when parsed, not before.
        let big = Json(format!("1{}", "0".repeat(400)).into());
        assert!(big.to_value().is_err());
        assert_ne!(big, Value::Null);
        assert!(serde_json::to_string(&big).is_err());
    }

    #[test]
    fn json_from_sql_takes_jsonb_and_json() {
        let j = Json::from_sql(&Type::JSONB, b"\x01{\"a\": 1}").unwrap();
        assert_eq!(j.as_str(), r#"{"a": 1}"#);
        let j = Json::from_sql(&Type::JSON, br#"{"a":1}"#).unwrap();
        assert_eq!(j.as_str(), r#"{"a":1}"#);
        assert!(Json::from_sql(&Type::JSONB, b"\x02{}").is_err());
        assert!(Json::from_sql(&Type::JSONB, b"").is_err());
        assert!(Json::from_sql(&Type::JSON, b"\xff").is_err());
        assert!(!<Json as FromSql>::accepts(&Type::TEXT));
    }

    #[test]
    fn text_validation() {
        assert!(validate_stream_id("").is_err());
        assert!(validate_stream_id("a\0b").is_err());
        assert!(validate_stream_id(&"x".repeat(MAX_STREAM_ID_BYTES + 1)).is_err());
        assert!(validate_stream_id(&"x".repeat(MAX_STREAM_ID_BYTES)).is_ok());
        let e = EventData::json("", Value::Null);
        let msg = e.validate(3).unwrap_err().to_string();
        assert!(
            msg.contains("event 3") && msg.contains("event type is empty"),
            "{msg}"
        );
    }
}
