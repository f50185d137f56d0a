use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{events, wait_visible, TestResult, TestStore};
use pg_eventstore::{
    ActualVersion, Error, EventData, ExpectedVersion, ImportOptions, ReadAll, ReadStream,
    RecordedEvent, Result, MAX_EVENTS_PER_TRANSACTION,
};
use serde_json::json;

fn stream(t: &TestStore, s: &str) -> Vec<RecordedEvent> {
    t.read_stream(s, ReadStream::forwards())
        .unwrap()
        .collect::<Result<Vec<_>>>()
        .unwrap()
}

fn all(t: &TestStore) -> Vec<RecordedEvent> {
    t.read_all(ReadAll::from_start())
        .unwrap()
        .collect::<Result<Vec<_>>>()
        .unwrap()
}

/// `n` events spread round-robin over the given streams, data `{"k": i}`, metadata `{"m": i}`.
fn input(streams: &[&str], n: usize) -> Vec<(String, EventData)> {
    (0..n)
        .map(|i| {
            let e = EventData::json(format!("T{}", i % 3), json!({ "k": i }))
                .metadata(&json!({ "m": i }))
                .unwrap();
            (streams[i % streams.len()].to_string(), e)
        })
        .collect()
}

#[test]
fn imported_events_read_back_exactly() -> TestResult {
    // Small pages, so reading back also goes through the cursor path.
    let t = TestStore::with("import_exact", |c| c.read_page_size(4));
    let before = t.append("other", ExpectedVersion::NoStream, &events("E", 2))?;
    let data = input(&["a", "b", "c"], 25);
    let summary = t.import(&data, ImportOptions::new())?;
    assert_eq!((summary.events, summary.streams), (25, 3));
    assert_eq!(summary.last_position, summary.first_position + 24);
    assert!(summary.first_position > before.last_position);
    wait_visible(&t, summary.last_position);

    let log = all(&t);
    assert_eq!(log.len(), 27);
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    let imported = &log[2..];
    for (i, (e, (s, d))) in imported.iter().zip(&data).enumerate() {
        assert_eq!(e.position, summary.first_position + i as u64);
        assert_eq!(&e.stream_id, s);
        assert_eq!(e.version, (i / 3) as u64, "event {i}");
        assert_eq!(e.id, d.event_id());
        assert_eq!(e.event_type, d.event_type());
        assert_eq!(e.data, json!({ "k": i }));
        assert_eq!(e.metadata, Some(json!({ "m": i })));
    }
    for (name, count) in [("a", 9), ("b", 8), ("c", 8)] {
        let events = stream(&t, name);
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (0..count).collect::<Vec<u64>>(), "stream {name}");
    }
    // Appends go on after the imported versions.
    let next = t.append("a", ExpectedVersion::Exact(8), &events("E", 1))?;
    assert_eq!(next.last_version, 9);
    Ok(())
}

#[test]
fn existing_stream_is_refused_and_nothing_written() -> TestResult {
    let t = TestStore::new("import_refuse");
    t.append("b", ExpectedVersion::NoStream, &events("E", 1))?;
    match t.import(&input(&["a", "b", "c"], 9), ImportOptions::new()) {
        Err(Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, "b");
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, ActualVersion::Exact(0));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(t.count_events(), 1);
    Ok(())
}

#[test]
fn opting_in_continues_existing_streams() -> TestResult {
    let t = TestStore::new("import_continue");
    t.append("b", ExpectedVersion::NoStream, &events("E", 2))?;
    let summary = t.import(
        &input(&["a", "b"], 6),
        ImportOptions::new().continue_existing_streams(true),
    )?;
    assert_eq!((summary.events, summary.streams), (6, 2));
    let b: Vec<(u64, String)> = stream(&t, "b")
        .into_iter()
        .map(|e| (e.version, e.event_type))
        .collect();
    assert_eq!(
        b,
        vec![
            (0, "E".into()),
            (1, "E".into()),
            (2, "T1".into()),
            (3, "T0".into()),
            (4, "T2".into())
        ]
    );
    let a: Vec<u64> = stream(&t, "a").iter().map(|e| e.version).collect();
    assert_eq!(a, vec![0, 1, 2]);
    Ok(())
}

#[test]
fn bad_input_writes_nothing() -> TestResult {
    let t = TestStore::new("import_bad");
    let taken = t.append("x", ExpectedVersion::NoStream, &events("E", 1))?;
    let taken_id = stream(&t, "x")[0].id;
    assert_eq!(taken.last_version, 0);

    let invalid =
        |data: Vec<(String, EventData)>, what: &str| match t.import(&data, ImportOptions::new()) {
            Err(Error::InvalidInput(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("expected invalid input ({what}), got {other:?}"),
        };
    let mut empty_stream = input(&["a"], 3);
    empty_stream[2].0 = String::new();
    invalid(empty_stream, "event 2: the stream id is empty");
    let mut nul = input(&["a"], 3);
    nul[1].1 = EventData::json("T", json!({ "s": "a\0b" }));
    invalid(nul, "event 1");
    let mut nul_type = input(&["a"], 3);
    nul_type[0].1 = EventData::json("T\0", json!({}));
    invalid(nul_type, "NUL byte");
    let mut twice = input(&["a", "b"], 4);
    twice[3].1 = twice[3].1.clone().id(twice[0].1.event_id());
    invalid(twice, "appears twice");
    invalid(Vec::new(), "no events");

    // An id already stored: refused by the database, in the middle of the COPY.
    let mut stored = input(&["a", "b"], 50);
    stored[40].1 = stored[40].1.clone().id(taken_id);
    match t.import(&stored, ImportOptions::new()) {
        Err(Error::DuplicateEventId { stream, id }) => {
            assert_eq!((stream.as_str(), id), ("a", taken_id));
        }
        other => panic!("expected a duplicate id, got {other:?}"),
    }
    assert_eq!(t.count_events(), 1);
    Ok(())
}

#[test]
fn too_many_events_are_refused_before_sending() -> TestResult {
    let t = TestStore::new("import_large");
    let e = EventData::json("T", serde_json::Value::Null);
    let data: Vec<(&str, EventData)> = (0..=MAX_EVENTS_PER_TRANSACTION)
        .map(|_| ("s", e.clone()))
        .collect();
    match t.import(&data, ImportOptions::new()) {
        Err(Error::TransactionTooLarge { events }) => {
            assert_eq!(events, MAX_EVENTS_PER_TRANSACTION + 1)
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(t.count_events(), 0);
    Ok(())
}

#[test]
fn import_in_shares_the_transaction_with_appends() -> TestResult {
    let t = TestStore::new("import_in");
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    let first = t.append_in(&mut tx, "x", ExpectedVersion::NoStream, &events("E", 2))?;
    let summary = t.import_in(&mut tx, &input(&["a", "b"], 3), ImportOptions::new())?;
    let last = t.append_in(&mut tx, "x", ExpectedVersion::Exact(1), &events("E", 1))?;
    tx.commit()?;
    assert_eq!(summary.first_position, first.last_position + 1);
    assert_eq!(last.first_position, summary.last_position + 1);
    drop(conn);
    wait_visible(&t, last.last_position);
    let positions: Vec<u64> = all(&t).iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (first.first_position..=last.last_position).collect::<Vec<u64>>()
    );

    // Rolled back with the caller's transaction.
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.import_in(&mut tx, &input(&["c"], 3), ImportOptions::new())?;
    tx.rollback()?;
    assert_eq!(t.count_events(), 6);
    Ok(())
}

#[test]
fn import_during_concurrent_appends_keeps_read_all_gap_free() -> TestResult {
    let t = TestStore::with("import_concurrent", |c| c.read_page_size(50));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    thread::scope(|scope| -> TestResult {
        let appenders: Vec<_> = (0..2)
            .map(|w| {
                let store = t.store.clone();
                let stop = stop.clone();
                let progress = progress.clone();
                scope.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        store
                            .append(&format!("w{w}"), ExpectedVersion::Any, &events("A", 2))
                            .unwrap();
                        n += 2;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    n
                })
            })
            .collect();
        // A reader tailing $all the way a subscriber would: "after the last I saw",
        // until it has seen as many events as were written in all.
        let tail_store = t.store.clone();
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let tail_target = target.clone();
        let tailer = scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seen: Vec<u64> = Vec::new();
            while (seen.len() as u64) < tail_target.load(Ordering::Relaxed) {
                assert!(
                    Instant::now() < deadline,
                    "the tailer did not see every event"
                );
                let options = seen
                    .last()
                    .map_or_else(ReadAll::from_start, |p| ReadAll::after(*p));
                for e in tail_store.read_all(options).unwrap() {
                    seen.push(e.unwrap().position);
                }
                thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        let imports = || -> Result<u64> {
            let mut imported = 0;
            for round in 0..3 {
                // Appends run before, during and after each import.
                let before = progress.load(Ordering::Relaxed);
                while progress.load(Ordering::Relaxed) < before + 5 {
                    thread::sleep(Duration::from_millis(1));
                }
                let streams = [format!("imp{round}-a"), format!("imp{round}-b")];
                let data = input(&[&streams[0], &streams[1]], 3000);
                imported += t.import(&data, ImportOptions::new())?.events;
            }
            Ok(imported)
        };
        let imported = imports();
        // Stop the other threads whatever happened, or the scope would wait for ever.
        stop.store(true, Ordering::Relaxed);
        let appended: u64 = appenders.into_iter().map(|h| h.join().unwrap()).sum();
        if imported.is_err() {
            target.store(0, Ordering::Relaxed);
        }
        let imported = imported?;
        assert!(appended >= 30);
        let total = appended + imported;
        assert_eq!(t.count_events() as u64, total);
        target.store(total, Ordering::Relaxed);
        let seen = tailer.join().unwrap();
        let positions: Vec<u64> = all(&t).iter().map(|e| e.position).collect();
        assert_eq!(positions.len() as u64, total);
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
        // The tailer saw every event exactly once, in order: nothing skipped, nothing repeated.
        assert_eq!(
            seen, positions,
            "the tailing reader skipped or repeated events"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_concurrent_append_to_a_continued_stream_fails_the_import_cleanly() -> TestResult {
    let t = TestStore::new("import_race");
    t.append("b", ExpectedVersion::NoStream, &events("E", 2))?;
    // An append to "b" that has inserted version 2 but not committed yet.
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "b", ExpectedVersion::Exact(1), &events("X", 1))?;
    thread::scope(|scope| -> TestResult {
        let importer = scope.spawn(|| {
            t.import(
                &input(&["a", "b"], 10),
                ImportOptions::new().continue_existing_streams(true),
            )
        });
        // Wait until the import's COPY waits for the append's row, then commit the append.
        let mut client = crate::common::client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE wait_event_type = 'Lock' AND starts_with(query, 'COPY ' || $1)",
                    &[&format!("\"{}\"", t.schema)],
                )?
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the import never waited for the append"
            );
            thread::sleep(Duration::from_millis(5));
        }
        tx.commit()?;
        match importer.join().unwrap() {
            Err(Error::WrongExpectedVersion {
                stream,
                expected,
                actual,
            }) => {
                assert_eq!(stream, "b");
                assert_eq!(expected, ExpectedVersion::Exact(1));
                assert_eq!(actual, ActualVersion::Exact(2));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        Ok(())
    })?;
    assert_eq!(t.count_events(), 3);
    Ok(())
}
