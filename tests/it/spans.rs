//! Tracing: the spans the store emits and their fields, captured by a small subscriber
//! written here, and that no event data reaches them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::{TestResult, TestStore};
use pg_eventstore::{EventData, ExpectedVersion, ReadStream};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

type FieldList = Vec<(String, String)>;

#[derive(Default)]
struct Captured {
    next: AtomicU64,
    /// (span name, fields), span id - 1 as the index.
    spans: Mutex<Vec<(String, FieldList)>>,
    /// Fields of log events.
    events: Mutex<Vec<FieldList>>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Captured>);

struct Fields<'a>(&'a mut FieldList);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let mut fields = Vec::new();
        span.record(&mut Fields(&mut fields));
        self.0
            .spans
            .lock()
            .unwrap()
            .push((span.metadata().name().to_string(), fields));
        Id::from_u64(id + 1)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.0.spans.lock().unwrap();
        let fields = &mut spans[span.into_u64() as usize - 1].1;
        values.record(&mut Fields(fields));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.events.lock().unwrap().push(fields);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

fn field<'a>(fields: &'a FieldList, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn spans_carry_stream_count_and_duration_but_no_data() -> TestResult {
    let t = TestStore::new("spans");
    let capture = Capture::default();
    tracing::subscriber::with_default(capture.clone(), || -> TestResult {
        // tracing caches each callsite's interest process-wide, and while one dispatcher
        // is registered it asks the registering thread's default: a test on another
        // thread, without a subscriber, that reaches a callsite first caches "never" and
        // this capture would miss the span. Ask again, with this thread's capture, before
        // each traced call.
        tracing::callsite::rebuild_interest_cache();
        t.migrate()?;
        let secret = serde_json::json!({ "card": "s3cr3t-payload" });
        let meta = serde_json::json!({ "note": "s3cr3t-metadata" });
        tracing::callsite::rebuild_interest_cache();
        t.append(
            "traced",
            ExpectedVersion::NoStream,
            &[
                EventData::json("Paid", secret.clone()).metadata(&meta)?,
                EventData::json("Paid", secret),
            ],
        )?;
        assert!(t
            .append(
                "traced",
                ExpectedVersion::NoStream,
                &[EventData::json("Paid", serde_json::json!({}))]
            )
            .is_err());
        tracing::callsite::rebuild_interest_cache();
        assert_eq!(t.read_stream("traced", ReadStream::forwards())?.count(), 2);
        Ok(())
    })?;
    let spans = capture.0.spans.lock().unwrap().clone();
    let named = |name: &str| -> Vec<&FieldList> {
        spans
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f)
            .collect()
    };

    let migrate = named("pg_eventstore.migrate");
    assert_eq!(migrate.len(), 1, "{spans:?}");
    assert_eq!(field(migrate[0], "schema"), Some(t.schema.as_str()));
    assert_eq!(field(migrate[0], "applied"), Some("0"));
    assert!(field(migrate[0], "duration_ms").is_some());

    let appends = named("pg_eventstore.append");
    assert_eq!(appends.len(), 2, "{spans:?}");
    assert_eq!(field(appends[0], "stream"), Some("traced"));
    assert_eq!(field(appends[0], "count"), Some("2"));
    assert_eq!(field(appends[0], "outcome"), Some("written"));
    assert!(field(appends[0], "duration_ms").is_some());
    assert_eq!(field(appends[1], "outcome"), Some("conflict"));

    let reads = named("pg_eventstore.read");
    assert_eq!(reads.len(), 1, "{spans:?}");
    assert_eq!(field(reads[0], "kind"), Some("stream"));
    assert_eq!(field(reads[0], "stream"), Some("traced"));
    assert_eq!(field(reads[0], "count"), Some("2"));
    assert!(field(reads[0], "duration_ms").is_some());

    let everything = format!("{spans:?} {:?}", capture.0.events.lock().unwrap());
    assert!(!everything.contains("s3cr3t"), "{everything}");
    Ok(())
}
