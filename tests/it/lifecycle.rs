//! Stream lifecycle: immutable events, metadata, deletes, truncation, retention.

use crate::common::{client, events, TestResult, TestStore};
use std::time::{Duration, SystemTime};

use pg_eventstore::{
    ActualVersion, Error, ExpectedVersion, ImportEvent, ImportOptions, ReadAll, ReadStream,
    SubscribeOptions, SCHEMA_VERSION, STREAM_DELETED, STREAM_TOMBSTONE,
};
use serde_json::json;

/// The `(stream_id, version, data)` of every row of the events table, in position order.
fn rows(t: &TestStore) -> Vec<(String, i64, serde_json::Value)> {
    crate::common::event_rows(t, "data")
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

/// `(stream, version, type)` of every event a `$all` read returns now.
fn all_events(t: &TestStore) -> Vec<(String, u64, String)> {
    t.wait_all_visible();
    t.read_all(ReadAll::from_start())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.stream_id, e.version, e.event_type)
        })
        .collect()
}

#[test]
fn soft_delete_hides_removes_and_a_later_append_continues_the_versions() -> TestResult {
    let t = TestStore::new("soft_delete");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.append("b", ExpectedVersion::NoStream, &events("E", 2))?;
    t.save_snapshot("a", 2, &json!({ "n": 3 }))?;
    let before = all_events(&t);
    assert_eq!(before.len(), 5);

    let r = t.delete_stream("a", ExpectedVersion::Exact(2))?;
    assert_eq!((r.marker_version, r.removed), (Some(3), 3));
    assert_eq!(versions(&t, "a"), (vec![], vec![]));
    assert!(t.load_snapshot::<serde_json::Value>("a")?.is_none());
    assert_eq!(t.stream_version("a")?, Some(3));
    // Only the marker is left of `a`; `b` is untouched.
    let after = all_events(&t);
    assert_eq!(
        after,
        vec![
            ("b".to_string(), 0, "E".to_string()),
            ("b".to_string(), 1, "E".to_string()),
            ("a".to_string(), 3, STREAM_DELETED.to_string()),
        ]
    );
    assert_eq!(t.stream_metadata("a")?.unwrap().truncate_before(), Some(4));

    let next = t.append("a", ExpectedVersion::Exact(3), &events("F", 2))?;
    assert_eq!((next.first_version, next.last_version), (4, 5));
    assert_eq!(versions(&t, "a"), (vec![4, 5], vec![5, 4]));
    // Deleting again, with Any, removes the old marker too.
    let again = t.delete_stream("a", ExpectedVersion::Any)?;
    assert_eq!((again.marker_version, again.removed), (Some(6), 3));
    assert_eq!(versions(&t, "a"), (vec![], vec![]));
    // A stream that does not exist: nothing to do.
    let none = t.delete_stream("nothing", ExpectedVersion::Any)?;
    assert_eq!((none.marker_version, none.removed), (None, 0));
    assert_eq!(t.stream_version("nothing")?, None);
    Ok(())
}

#[test]
fn a_tombstoned_stream_can_never_be_written_again() -> TestResult {
    let t = TestStore::new("tombstone");
    t.append("a", ExpectedVersion::NoStream, &events("E", 4))?;
    t.save_snapshot("a", 3, &json!({}))?;
    let r = t.tombstone_stream("a", ExpectedVersion::StreamExists)?;
    assert_eq!((r.marker_version, r.removed), (Some(4), 4));
    assert_eq!(versions(&t, "a"), (vec![], vec![]));
    assert!(t.load_snapshot::<serde_json::Value>("a")?.is_none());
    assert_eq!(
        all_events(&t),
        vec![("a".to_string(), 4, STREAM_TOMBSTONE.to_string())]
    );
    let deleted = |r: pg_eventstore::Result<_>| match r {
        Err(Error::StreamDeleted { stream }) => assert_eq!(stream, "a"),
        other => panic!("{other:?}"),
    };
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(4),
        ExpectedVersion::Exact(i64::MAX as u64),
    ] {
        for n in [1, 3] {
            deleted(t.append("a", expected, &events("E", n)).map(|_| ()));
        }
        deleted(t.delete_stream("a", expected).map(|_| ()));
        deleted(t.tombstone_stream("a", expected).map(|_| ()));
    }
    let mut c = client();
    let mut tx = c.transaction()?;
    deleted(
        t.append_in(&mut tx, "a", ExpectedVersion::Any, &events("E", 1))
            .map(|_| ()),
    );
    drop(tx);
    let import = [("a", events("E", 1).remove(0))];
    deleted(
        t.import(
            &import,
            ImportOptions::new().continue_existing_streams(true),
        )
        .map(|_| ()),
    );
    deleted(t.stream_version("a").map(|_| ()));
    deleted(
        t.set_stream_metadata("a", ExpectedVersion::Any, &json!({}))
            .map(|_| ()),
    );
    let msg = t
        .append("a", ExpectedVersion::Any, &events("E", 1))
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "stream \"a\" has been deleted for good (tombstoned): it can never be written again"
    );
    assert_eq!(t.count_events(), 1);
    // A stream that never existed can be tombstoned, so that it is never created.
    let r = t.tombstone_stream("never", ExpectedVersion::NoStream)?;
    assert_eq!((r.marker_version, r.removed), (Some(0), 0));
    deleted_named(
        t.append("never", ExpectedVersion::NoStream, &events("E", 1)),
        "never",
    );
    Ok(())
}

fn deleted_named<T: std::fmt::Debug>(r: pg_eventstore::Result<T>, name: &str) {
    match r {
        Err(Error::StreamDeleted { stream }) => assert_eq!(stream, name),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_delete_with_a_wrong_expected_version_changes_nothing() -> TestResult {
    let t = TestStore::new("delete_wrong");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.save_snapshot("a", 2, &json!({}))?;
    let before = rows(&t);
    for (expected, actual) in [
        (ExpectedVersion::Exact(1), ActualVersion::Exact(2)),
        (ExpectedVersion::NoStream, ActualVersion::Exact(2)),
    ] {
        for hard in [false, true] {
            let r = if hard {
                t.tombstone_stream("a", expected)
            } else {
                t.delete_stream("a", expected)
            };
            match r {
                Err(Error::WrongExpectedVersion {
                    stream, actual: a, ..
                }) => {
                    assert_eq!((stream.as_str(), a), ("a", actual))
                }
                other => panic!("{other:?}"),
            }
        }
    }
    match t.delete_stream("missing", ExpectedVersion::StreamExists) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::NoStream)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rows(&t), before);
    assert_eq!(t.stream_metadata("a")?, None);
    assert!(t.load_snapshot::<serde_json::Value>("a")?.is_some());
    // Event types starting with '$' are the store's own.
    match t.append("a", ExpectedVersion::Any, &events(STREAM_TOMBSTONE, 1)) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("reserved"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(t.delete_snapshot("a")?);
    assert!(!t.delete_snapshot("a")?);
    assert!(t.load_snapshot::<serde_json::Value>("a")?.is_none());
    Ok(())
}

#[test]
fn a_delete_racing_an_append_one_wins() -> TestResult {
    let t = TestStore::new("delete_race");
    let n = 40;
    for i in 0..n {
        t.append(
            &format!("s-{i}"),
            ExpectedVersion::NoStream,
            &events("E", 1),
        )?;
    }
    for hard in [false, true] {
        let prefix = if hard { "h" } else { "s" };
        if hard {
            for i in 0..n {
                t.append(
                    &format!("h-{i}"),
                    ExpectedVersion::NoStream,
                    &events("E", 1),
                )?;
            }
        }
        let barrier = std::sync::Barrier::new(2);
        let (deletes, appends) = std::thread::scope(|scope| {
            let deleter = scope.spawn(|| {
                barrier.wait();
                (0..n)
                    .map(|i| {
                        let s = format!("{prefix}-{i}");
                        if hard {
                            t.tombstone_stream(&s, ExpectedVersion::Exact(0))
                        } else {
                            t.delete_stream(&s, ExpectedVersion::Exact(0))
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let appender = scope.spawn(|| {
                barrier.wait();
                (0..n)
                    .map(|i| {
                        t.append(
                            &format!("{prefix}-{i}"),
                            ExpectedVersion::Exact(0),
                            &events("F", 1),
                        )
                    })
                    .collect::<Vec<_>>()
            });
            (deleter.join().unwrap(), appender.join().unwrap())
        });
        let mut both = [0, 0];
        for (i, (d, a)) in deletes.iter().zip(&appends).enumerate() {
            let s = format!("{prefix}-{i}");
            match (d, a) {
                (Ok(d), Err(Error::WrongExpectedVersion { .. } | Error::StreamDeleted { .. })) => {
                    both[0] += 1;
                    assert_eq!(d.marker_version, Some(1));
                    assert_eq!(versions(&t, &s), (vec![], vec![]), "{s}");
                }
                (Err(Error::WrongExpectedVersion { actual, .. }), Ok(a)) => {
                    both[1] += 1;
                    assert_eq!(a.last_version, 1);
                    assert_eq!(*actual, ActualVersion::Exact(1));
                    assert_eq!(versions(&t, &s), (vec![0, 1], vec![1, 0]), "{s}");
                }
                other => panic!("{s}: {other:?}"),
            }
        }
        eprintln!(
            "hard {hard}: deletes won {}, appends won {}",
            both[0], both[1]
        );
    }
    Ok(())
}

#[test]
fn all_readers_and_subscriptions_stop_seeing_removed_events() -> TestResult {
    let t = TestStore::new("delete_feed");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.append("b", ExpectedVersion::NoStream, &events("E", 1))?;
    t.wait_all_visible();
    // A subscriber that has received everything before the delete keeps it (nothing is
    // recalled) and then gets the marker and what follows.
    let mut sub = t.subscribe(SubscribeOptions::all().from_start())?;
    let next = |sub: &mut pg_eventstore::Subscription| {
        let e = sub
            .next_timeout(Duration::from_secs(10))
            .expect("an event")
            .unwrap();
        (e.stream_id, e.version, e.event_type)
    };
    let e = |s: &str, v: u64, ty: &str| (s.to_string(), v, ty.to_string());
    let seen: Vec<_> = (0..4).map(|_| next(&mut sub)).collect();
    assert_eq!(
        seen,
        vec![
            e("a", 0, "E"),
            e("a", 1, "E"),
            e("a", 2, "E"),
            e("b", 0, "E")
        ]
    );
    t.delete_stream("a", ExpectedVersion::Exact(2))?;
    t.append("b", ExpectedVersion::Exact(0), &events("E", 1))?;
    assert_eq!(next(&mut sub), e("a", 3, STREAM_DELETED));
    assert_eq!(next(&mut sub), e("b", 1, "E"));
    // Readers and subscribers that come later never see the removed events.
    let after = vec![e("b", 0, "E"), e("a", 3, STREAM_DELETED), e("b", 1, "E")];
    assert_eq!(all_events(&t), after);
    let mut late = t.subscribe(SubscribeOptions::all().from_start())?;
    let got: Vec<_> = (0..3).map(|_| next(&mut late)).collect();
    assert_eq!(got, after);
    assert!(late.next_timeout(Duration::from_millis(200)).is_none());
    Ok(())
}

#[test]
fn truncate_before_keeps_exactly_the_tail() -> TestResult {
    let t = TestStore::new("truncate");
    t.append("s", ExpectedVersion::NoStream, &events("E", 10))?;
    t.append("other", ExpectedVersion::NoStream, &events("E", 3))?;
    t.set_stream_metadata("s", ExpectedVersion::NoStream, &json!({ "owner": "x" }))?;
    assert_eq!(t.truncate_stream("s", 6)?, 6);
    assert_eq!(versions(&t, "s"), (vec![6, 7, 8, 9], vec![9, 8, 7, 6]));
    assert_eq!(t.count_events(), 7);
    let m = t.stream_metadata("s")?.unwrap();
    assert_eq!(m.metadata, json!({ "owner": "x", "$tb": 6 }));
    // Never lowered.
    assert_eq!(t.truncate_stream("s", 2)?, 0);
    assert_eq!(t.stream_metadata("s")?.unwrap().truncate_before(), Some(6));
    // Up to one past the end: the last event stays in the table, hidden.
    assert_eq!(t.truncate_stream("s", 10)?, 3);
    assert_eq!(versions(&t, "s"), (vec![], vec![]));
    let next = t.append("s", ExpectedVersion::Exact(9), &events("E", 1))?;
    assert_eq!(next.last_version, 10);
    assert_eq!(versions(&t, "s"), (vec![10], vec![10]));
    for (stream, before, says) in [
        ("s", 12, "its last version is 10, so 11 is the most"),
        ("none", 0, "it does not exist"),
    ] {
        match t.truncate_stream(stream, before) {
            Err(Error::InvalidInput(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(versions(&t, "other"), (vec![0, 1, 2], vec![2, 1, 0]));
    Ok(())
}

#[test]
fn scavenge_applies_max_count_max_age_and_truncate_before_and_nothing_else() -> TestResult {
    let t = TestStore::new("scavenge");
    let old = SystemTime::now() - Duration::from_secs(7200);
    let mut import = Vec::new();
    for v in 0..10u64 {
        let at = if v < 6 { old } else { SystemTime::now() };
        import.push(Ok(
            ImportEvent::new("aged", events("E", 1).remove(0)).recorded_at(at)
        ));
    }
    for _ in 0..5 {
        import.push(Ok(
            ImportEvent::new("all-old", events("E", 1).remove(0)).recorded_at(old)
        ));
    }
    t.import_iter(import, ImportOptions::new())?;
    t.append("counted", ExpectedVersion::NoStream, &events("E", 10))?;
    t.append("plain", ExpectedVersion::NoStream, &events("E", 10))?;
    t.append("truncated", ExpectedVersion::NoStream, &events("E", 10))?;
    t.append("roomy", ExpectedVersion::NoStream, &events("E", 4))?;
    t.set_stream_metadata(
        "aged",
        ExpectedVersion::NoStream,
        &json!({ "$maxAge": 3600 }),
    )?;
    t.set_stream_metadata(
        "all-old",
        ExpectedVersion::NoStream,
        &json!({ "$maxAge": 3600 }),
    )?;
    t.set_stream_metadata(
        "counted",
        ExpectedVersion::NoStream,
        &json!({ "$maxCount": 3 }),
    )?;
    t.set_stream_metadata(
        "truncated",
        ExpectedVersion::NoStream,
        &json!({ "$tb": 4, "$maxCount": 8 }),
    )?;
    t.set_stream_metadata(
        "roomy",
        ExpectedVersion::NoStream,
        &json!({ "$maxCount": 5, "$maxAge": 3600 }),
    )?;
    // Many streams with metadata and nothing to remove: the scavenger pages through them.
    for i in 0..150 {
        let s = format!("quiet-{i:03}");
        t.append(&s, ExpectedVersion::NoStream, &events("E", 1))?;
        t.set_stream_metadata(&s, ExpectedVersion::NoStream, &json!({ "$maxCount": 1 }))?;
    }
    let report = t.scavenge()?;
    assert_eq!(report.streams_checked, 155);
    assert_eq!(report.streams_trimmed, 4);
    assert_eq!(report.events_removed, 6 + 4 + 7 + 4);
    assert_eq!(versions(&t, "aged").0, vec![6, 7, 8, 9]);
    // The last event carries the version: kept, though old.
    assert_eq!(versions(&t, "all-old").0, vec![4]);
    assert_eq!(versions(&t, "counted").0, vec![7, 8, 9]);
    assert_eq!(versions(&t, "truncated").0, vec![4, 5, 6, 7, 8, 9]);
    assert_eq!(versions(&t, "roomy").0, vec![0, 1, 2, 3]);
    assert_eq!(versions(&t, "plain").0, (0..10).collect::<Vec<u64>>());
    assert_eq!(versions(&t, "quiet-149").0, vec![0]);
    assert_eq!(t.count_events(), 4 + 1 + 3 + 6 + 4 + 10 + 150);
    // Nothing left to do.
    let again = t.scavenge()?;
    assert_eq!((again.streams_trimmed, again.events_removed), (0, 0));
    Ok(())
}

/// 100,000 events in 1,000 streams with `$maxCount` retention, scavenged while a writer
/// appends and a subscription follows `$all`: every event that remains is delivered once,
/// in order, and exactly what retention allows is removed.
#[test]
fn scavenge_under_load_keeps_every_remaining_event_delivered_once() -> TestResult {
    let t = TestStore::new("scavenge_load");
    let streams = 1000;
    let per_stream = 100;
    let keep = 30;
    let import = (0..streams * per_stream).map(|i| {
        Ok(ImportEvent::new(
            format!("r-{:04}", i / per_stream),
            events("E", 1).remove(0),
        ))
    });
    t.import_iter(import, ImportOptions::new())?;
    for s in 0..streams {
        t.set_stream_metadata(
            &format!("r-{s:04}"),
            ExpectedVersion::NoStream,
            &json!({ "$maxCount": keep }),
        )?;
    }
    t.wait_all_visible();
    let mut sub = t.subscribe(SubscribeOptions::all().from_start())?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let scavenging = std::sync::atomic::AtomicBool::new(false);
    let (report, latencies, delivered) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || i < 200 {
                let stream = if i % 2 == 0 {
                    format!("live-{}", i % 50)
                } else {
                    format!("r-{:04}", i % streams)
                };
                let start = std::time::Instant::now();
                t.append(&stream, ExpectedVersion::Any, &events("L", 1))
                    .unwrap();
                latencies.push((
                    scavenging.load(std::sync::atomic::Ordering::Relaxed),
                    start.elapsed(),
                ));
                i += 1;
            }
            latencies
        });
        let reader = scope.spawn(|| {
            let mut got = Vec::new();
            while let Some(e) = sub.next_timeout(Duration::from_secs(5)) {
                let e = e.unwrap();
                got.push((e.position, e.stream_id, e.version));
            }
            // The feed was quiet for 5 s: the writer has stopped.
            got
        });
        // The writer's usual latency first, then during the scavenge.
        std::thread::sleep(Duration::from_secs(2));
        scavenging.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = t.scavenge().unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let latencies = writer.join().unwrap();
        (report, latencies, reader.join().unwrap())
    });
    assert_eq!(report.streams_checked, streams);
    t.wait_all_visible();
    let remaining: Vec<(u64, String, u64)> = t
        .read_all(ReadAll::from_start())?
        .map(|e| {
            let e = e.unwrap();
            (e.position, e.stream_id, e.version)
        })
        .collect();
    // The scavenger removed exactly what `$maxCount` allowed when it looked at each
    // stream: the last `keep` events then, of which the writer's appends made before
    // that look take some places (how many is up to the machine's speed; at most all of
    // its appends to the stream).
    for s in 0..streams {
        let name = format!("r-{s:04}");
        let v: Vec<u64> = remaining
            .iter()
            .filter(|e| e.1 == name && e.2 < per_stream)
            .map(|e| e.2)
            .collect();
        assert!(v.len() <= keep as usize, "{name}: {}", v.len());
        assert_eq!(
            v.first().map(|f| per_stream - f),
            Some(v.len() as u64),
            "{name}"
        );
        let appended = remaining
            .iter()
            .filter(|e| e.1 == name && e.2 >= per_stream)
            .count() as u64;
        assert!(
            v.len() as u64 + appended >= keep,
            "{name}: {} kept, {appended} appended",
            v.len()
        );
    }
    assert_eq!(
        report.events_removed,
        streams * per_stream
            - remaining
                .iter()
                .filter(|e| e.2 < per_stream && e.1.starts_with("r-"))
                .count() as u64
    );
    // Delivered once each, in order; every event that remains was delivered.
    assert!(
        delivered.windows(2).all(|w| w[0].0 < w[1].0),
        "out of order or repeated"
    );
    let delivered: std::collections::HashSet<u64> = delivered.iter().map(|e| e.0).collect();
    let missing = remaining
        .iter()
        .filter(|e| !delivered.contains(&e.0))
        .count();
    assert_eq!(missing, 0, "of {} remaining", remaining.len());
    for (phase, during) in [("before", false), ("during", true)] {
        let mut l: Vec<Duration> = latencies
            .iter()
            .filter(|l| l.0 == during)
            .map(|l| l.1)
            .collect();
        l.sort();
        eprintln!(
            "appends {phase} the scavenge ({} removed from {} streams): {}, median {:?}, \
             p99 {:?}, worst {:?}",
            report.events_removed,
            report.streams_trimmed,
            l.len(),
            l[l.len() / 2],
            l[l.len() * 99 / 100],
            l[l.len() - 1]
        );
    }
    Ok(())
}
