//! Stream lifecycle: immutable events, metadata, deletes, truncation, retention.

use crate::common::{client, events, TestResult, TestStore};
use pg_eventstore::{ActualVersion, Error, ExpectedVersion, ReadStream, SCHEMA_VERSION};
use serde_json::json;

/// The `(stream_id, version, data)` of every row of the events table, in position order.
fn rows(t: &TestStore) -> Vec<(String, i64, serde_json::Value)> {
    let sql = format!(
        "SELECT stream_id, stream_version, data FROM \"{}\".events ORDER BY global_position",
        t.schema
    );
    client()
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn update_delete_and_truncate_from_a_plain_client_are_refused() -> TestResult {
    let t = TestStore::new("immutable");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    let before = rows(&t);
    let s = &t.schema;
    let mut c = client();
    for (sql, op) in [
        (format!("UPDATE \"{s}\".events SET data = '{{}}'"), "UPDATE"),
        (
            format!("UPDATE \"{s}\".events SET event_type = 'X' WHERE stream_version = 1"),
            "UPDATE",
        ),
        (format!("DELETE FROM \"{s}\".events"), "DELETE"),
        (
            format!("DELETE FROM \"{s}\".events WHERE stream_version = 2"),
            "DELETE",
        ),
        (format!("TRUNCATE \"{s}\".events"), "TRUNCATE"),
    ] {
        let e = c.batch_execute(&sql).expect_err(&sql);
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "23001", "{sql}: {db:?}");
        assert_eq!(
            db.message(),
            format!("pg-eventstore: events are immutable: {op} on {s}.events refused"),
            "{sql}"
        );
    }
    // Setting the flag outside a transaction lasts for one statement only (autocommit):
    // the next statement is refused again.
    c.batch_execute("SELECT set_config('pg_eventstore.lifecycle', 'on', true)")?;
    assert!(c
        .batch_execute(&format!("DELETE FROM \"{s}\".events"))
        .is_err());
    assert_eq!(rows(&t), before);
    Ok(())
}

#[test]
fn migrating_a_store_of_the_previous_version_keeps_every_event() -> TestResult {
    let t = TestStore::unmigrated("immutable_migrate");
    // The schema as the previous version left it: the script up to this version's step.
    let script = pg_eventstore::migration_sql(&t.schema, "schema_migrations")?;
    let cut = script
        .find(&format!("\n-- {SCHEMA_VERSION:04} "))
        .expect("the script has this version's step");
    client().batch_execute(&format!("{}\nCOMMIT;", &script[..cut]))?;
    assert_eq!(t.schema_version()?, SCHEMA_VERSION - 1);
    for i in 0..20 {
        t.append(&format!("s-{i}"), ExpectedVersion::Any, &events("E", 5))?;
    }
    let before = rows(&t);
    assert_eq!(before.len(), 100);
    let report = t.migrate()?;
    assert_eq!(report.previous_version, SCHEMA_VERSION - 1);
    assert_eq!(report.current_version, SCHEMA_VERSION);
    assert_eq!(rows(&t), before);
    let read: Vec<_> = t
        .read_stream("s-7", ReadStream::forwards())?
        .collect::<Result<_, _>>()?;
    assert_eq!(read.len(), 5);
    // And the migrated store refuses changes.
    assert!(client()
        .batch_execute(&format!("UPDATE \"{}\".events SET data = '{{}}'", t.schema))
        .is_err());
    t.append("s-7", ExpectedVersion::Exact(4), &events("E", 1))?;
    assert_eq!(rows(&t).len(), 101);
    Ok(())
}

#[test]
fn stream_metadata_has_a_version_of_its_own() -> TestResult {
    let t = TestStore::new("meta");
    assert_eq!(t.stream_metadata("m")?, None);
    let first = json!({ "owner": "ops", "$maxCount": 10 });
    assert_eq!(
        t.set_stream_metadata("m", ExpectedVersion::NoStream, &first)?,
        0
    );
    let m = t.stream_metadata("m")?.expect("written");
    assert_eq!((m.version, &m.metadata), (0, &first));
    assert_eq!(
        (m.max_count(), m.max_age(), m.truncate_before()),
        (Some(10), None, None)
    );

    match t.set_stream_metadata("m", ExpectedVersion::NoStream, &json!({})) {
        Err(Error::WrongExpectedVersion { stream, actual, .. }) => {
            assert_eq!(stream, "$$m");
            assert_eq!(actual, ActualVersion::Exact(0));
        }
        other => panic!("{other:?}"),
    }
    match t.set_stream_metadata("m", ExpectedVersion::Exact(3), &json!({})) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Exact(0))
        }
        other => panic!("{other:?}"),
    }
    match t.set_stream_metadata("new", ExpectedVersion::StreamExists, &json!({})) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::NoStream)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.stream_metadata("new")?, None);
    let second = json!({ "$maxAge": 3600, "$tb": 2 });
    assert_eq!(
        t.set_stream_metadata("m", ExpectedVersion::Exact(0), &second)?,
        1
    );
    assert_eq!(
        t.set_stream_metadata("m", ExpectedVersion::Any, &second)?,
        2
    );
    assert_eq!(
        t.set_stream_metadata("m", ExpectedVersion::StreamExists, &second)?,
        3
    );
    let m = t.stream_metadata("m")?.expect("written");
    assert_eq!(m.version, 3);
    assert_eq!(m.max_age(), Some(std::time::Duration::from_secs(3600)));
    assert_eq!(m.truncate_before(), Some(2));
    assert_eq!(m.max_count(), None);
    Ok(())
}

#[test]
fn bad_metadata_is_refused_and_changes_nothing() -> TestResult {
    let t = TestStore::new("meta_bad");
    let good = json!({ "$maxCount": 5 });
    t.set_stream_metadata("m", ExpectedVersion::NoStream, &good)?;
    for (bad, says) in [
        (json!([1, 2]), "must be a JSON object, not an array"),
        (json!(7), "must be a JSON object, not a number"),
        (
            json!({ "$maxCount": -1 }),
            "$maxCount must be a whole number from 1",
        ),
        (
            json!({ "$maxCount": 0 }),
            "$maxCount must be a whole number from 1",
        ),
        (
            json!({ "$maxAge": -60 }),
            "$maxAge must be a whole number from 1",
        ),
        (
            json!({ "$maxAge": 1e18 }),
            "$maxAge must be a whole number from 1",
        ),
        (json!({ "$maxAge": u64::MAX }), "(seconds)"),
        (json!({ "$tb": -2 }), "$tb must be a whole number from 0"),
        (
            json!({ "$maxcount": 5 }),
            "\"$maxcount\" is not a reserved key",
        ),
    ] {
        for expected in [ExpectedVersion::Any, ExpectedVersion::Exact(0)] {
            match t.set_stream_metadata("m", expected, &bad) {
                Err(Error::InvalidInput(m)) => {
                    assert!(m.contains(says), "{bad}: {m}");
                    assert!(m.contains("metadata of stream \"m\""), "{m}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
    let m = t.stream_metadata("m")?.expect("still there");
    assert_eq!((m.version, m.metadata), (0, good));
    Ok(())
}

/// The versions a stream read returns, forwards and backwards.
fn versions(t: &TestStore, stream: &str) -> (Vec<u64>, Vec<u64>) {
    let read = |options| -> Vec<u64> {
        t.read_stream(stream, options)
            .unwrap()
            .map(|e| e.unwrap().version)
            .collect()
    };
    (
        read(ReadStream::forwards()),
        read(ReadStream::backwards().max_count(100)),
    )
}

#[test]
fn stream_reads_start_at_truncate_before() -> TestResult {
    let t = TestStore::new("meta_tb");
    t.append("s", ExpectedVersion::NoStream, &events("E", 5))?;
    t.set_stream_metadata("s", ExpectedVersion::NoStream, &json!({ "$tb": 3 }))?;
    assert_eq!(versions(&t, "s"), (vec![3, 4], vec![4, 3]));
    let from_1: Vec<u64> = t
        .read_stream("s", ReadStream::forwards().from_version(1))?
        .map(|e| e.unwrap().version)
        .collect();
    assert_eq!(from_1, vec![3, 4]);
    assert_eq!(t.count_events(), 5, "hidden, not yet removed");
    Ok(())
}
