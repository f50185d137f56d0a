//! Stream lifecycle: immutable events, metadata, deletes, truncation, retention.

use crate::common::{client, events, TestResult, TestStore};
use pg_eventstore::{ExpectedVersion, ReadStream, SCHEMA_VERSION};

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
