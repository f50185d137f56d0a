use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{events, wait_visible, TestResult, TestStore};
use pg_eventstore::{
    ActualVersion, Error, EventData, ExpectedVersion, ImportEvent, ImportOptions, ReadAll,
    ReadStream, RecordedEvent, Result, MAX_EVENTS_PER_TRANSACTION,
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
        assert_eq!(
            e.metadata_as::<serde_json::Value>()?,
            Some(json!({ "m": i }))
        );
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

/// `n` events as JSON lines over `streams` round-robin, as an export would have them
/// (with versions, increasing positions and times).
fn json_lines(streams: &[&str], n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        out.push_str(
            &json!({
                "stream": streams[i % streams.len()],
                "version": i / streams.len(),
                "position": 1000 + 7 * i,
                "id": uuid::Uuid::now_v7(),
                "type": format!("T{}", i % 3),
                "data": { "k": i },
                "metadata": { "m": i },
                "recorded_at": format!("2020-01-02T03:04:{:02}.{:06}Z", i % 60, i),
            })
            .to_string(),
        );
        out.push('\n');
    }
    out
}

#[test]
fn streamed_json_lines_read_back_exactly() -> TestResult {
    let t = TestStore::with("import_stream", |c| c.read_page_size(500));
    // More than one batch (8,192 events), interleaved over streams.
    let n = 20_000;
    let lines = json_lines(&["a", "b", "c", "d", "e"], n);
    let summary = t.import_json_lines(lines.as_bytes(), ImportOptions::new())?;
    assert_eq!(
        (summary.events, summary.streams, summary.transactions),
        (n as u64, 5, 1)
    );
    assert_eq!(summary.last_position, summary.first_position + n as u64 - 1);
    wait_visible(&t, summary.last_position);
    let log = all(&t);
    assert_eq!(log.len(), n);
    for (i, (e, line)) in log.iter().zip(lines.lines()).enumerate() {
        let line: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(e.position, summary.first_position + i as u64);
        assert_eq!(json!(e.id), line["id"]);
        assert_eq!(e.stream_id, line["stream"].as_str().unwrap());
        assert_eq!(e.version, line["version"].as_u64().unwrap());
        assert_eq!(e.event_type, line["type"].as_str().unwrap());
        assert_eq!(e.data, line["data"]);
        assert_eq!(
            e.metadata_as::<serde_json::Value>()?.as_ref(),
            Some(&line["metadata"])
        );
        // Kept, to the microsecond; and serialized back the same way.
        let out = serde_json::to_value(e)?;
        assert_eq!(out["recorded_at"], line["recorded_at"]);
        assert_eq!(out["stream"], line["stream"]);
    }
    Ok(())
}

#[test]
fn a_bad_line_names_its_number_and_writes_nothing() -> TestResult {
    let t = TestStore::new("import_bad_line");
    let mut lines: Vec<String> = json_lines(&["a", "b"], 10_000)
        .lines()
        .map(String::from)
        .collect();
    // Past the first batch, so that the writer has already sent events.
    lines[9_000] = r#"{"stream":"a","type":"T","data":{"k":}}"#.into();
    let input = lines.join("\n");
    match t.import_json_lines(input.as_bytes(), ImportOptions::new()) {
        Err(Error::InvalidInput(msg)) => assert!(msg.starts_with("line 9001, column"), "{msg}"),
        other => panic!("expected a bad line, got {other:?}"),
    }
    assert_eq!(t.count_events(), 0);
    Ok(())
}

#[test]
fn versions_and_positions_are_checked_not_trusted() -> TestResult {
    let t = TestStore::new("import_checks");
    let lines: Vec<String> = json_lines(&["a", "b"], 20)
        .lines()
        .map(String::from)
        .collect();
    // Line 9 (stream "a") missing: line 11 says version 5, but would be version 4.
    let mut missing = lines.clone();
    missing.remove(8);
    let input = missing.join("\n");
    match t.import_json_lines(input.as_bytes(), ImportOptions::new()) {
        Err(Error::InvalidInput(msg)) => assert!(
            msg.starts_with("line 10: the input gives version 5, but the event would be version 4 of stream \"a\""),
            "{msg}"
        ),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    // Lines 4 and 6 swapped (the same stream): the positions go backwards at line 6.
    let mut swapped = lines.clone();
    swapped.swap(3, 5);
    let input = swapped.join("\n");
    match t.import_json_lines(input.as_bytes(), ImportOptions::new()) {
        Err(Error::InvalidInput(msg)) => assert!(
            msg.starts_with(
                "line 5: position 1028 does not come after the previous event's position 1035"
            ),
            "{msg}"
        ),
        other => panic!("expected positions out of order, got {other:?}"),
    }
    assert_eq!(t.count_events(), 0);
    // Into a stream that already holds events, with continuing allowed: the versions of
    // the lines are those of a new stream, so they are refused too.
    t.append("a", ExpectedVersion::NoStream, &events("E", 1))?;
    let input = lines.join("\n");
    let options = ImportOptions::new().continue_existing_streams(true);
    match t.import_json_lines(input.as_bytes(), options) {
        Err(Error::InvalidInput(msg)) => assert!(
            msg.contains("line 1: the input gives version 0, but the event would be version 1"),
            "{msg}"
        ),
        other => panic!("expected a version mismatch, got {other:?}"),
    }
    assert_eq!(t.count_events(), 1);
    Ok(())
}

#[test]
fn a_chunked_import_commits_a_prefix_and_resumes_after_it() -> TestResult {
    let t = TestStore::with("import_chunks", |c| c.read_page_size(300));
    // Batches of 8,192 reach the writer before the reader meets line 25,001: the
    // transactions of 10,000 that they filled are committed, the third one is not.
    let n = 30_000;
    let mut lines: Vec<String> = json_lines(&["a", "b", "c"], n)
        .lines()
        .map(String::from)
        .collect();
    let good = lines[25_000].clone();
    lines[25_000] = "{oops".into();
    let options = ImportOptions::new().chunk_size(10_000);
    let err = t
        .import_json_lines(lines.join("\n").as_bytes(), options)
        .unwrap_err();
    let committed = match &err {
        Error::ImportIncomplete {
            committed_events,
            transactions,
            source,
            ..
        } => {
            assert_eq!((*committed_events, *transactions), (20_000, 2));
            assert!(
                source.to_string().contains("line 25001, column 2"),
                "{source}"
            );
            *committed_events
        }
        other => panic!("expected an incomplete import, got {other:?}"),
    };
    assert_eq!(t.count_events(), 20_000);
    // Fixed, and resumed after the committed prefix: the versions on the lines check
    // that it goes on exactly where it stopped.
    lines[25_000] = good;
    let rest = lines[committed as usize..].join("\n");
    let options = options.continue_existing_streams(true);
    let summary = t.import_json_lines(rest.as_bytes(), options)?;
    assert_eq!((summary.events, summary.transactions), (10_000, 1));
    assert_eq!(summary.streams, 3);
    t.wait_all_visible();
    let log = all(&t);
    assert_eq!(log.len(), n);
    for (e, line) in log.iter().zip(&lines) {
        let line: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(json!(e.id), line["id"]);
        assert_eq!(json!(e.version), line["version"]);
    }
    Ok(())
}

#[test]
fn a_stream_met_again_after_many_others_goes_on_where_it_was() -> TestResult {
    // More streams than the writer keeps in memory, then the first ones again: they are
    // looked up again, in the import's own transaction, and recognised as its own.
    let t = TestStore::new("import_forget");
    let streams = 80_000;
    let events = (0..streams + 10).map(|i| {
        let stream = format!("s-{}", i % streams);
        Ok(ImportEvent::new(stream, EventData::json("T", json!(i))))
    });
    let summary = t.import_iter(events, ImportOptions::new())?;
    assert_eq!(
        (summary.events, summary.streams),
        (streams as u64 + 10, streams as u64)
    );
    let s0 = stream(&t, "s-0");
    assert_eq!(s0.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(s0[1].data, json!(streams));
    Ok(())
}

#[test]
fn an_atomic_stream_of_more_than_one_transaction_writes_nothing() -> TestResult {
    let t = TestStore::new("import_too_many");
    let e = EventData::json("T", serde_json::Value::Null);
    let events = (0..=MAX_EVENTS_PER_TRANSACTION).map(|i| {
        Ok(ImportEvent::new(
            format!("s-{}", i % 100),
            e.clone().id(uuid::Uuid::now_v7()),
        ))
    });
    match t.import_iter(events, ImportOptions::new()) {
        Err(Error::TransactionTooLarge { events }) => {
            assert!(events > MAX_EVENTS_PER_TRANSACTION, "{events}")
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(t.count_events(), 0);
    Ok(())
}

/// An import from a slow source (events arriving over a network, say) under a
/// `statement_timeout`: its `COPY` is one statement that lasts as long as the input, so
/// the import's own transactions run without the timeout. (Before, it failed with
/// "canceling statement due to statement timeout" and wrote nothing.)
#[test]
fn a_slow_import_is_not_cut_off_by_the_statement_timeout() -> TestResult {
    let t = TestStore::with("import_slow", |c| {
        c.statement_timeout(Duration::from_millis(300))
    });
    // The writer starts its COPY with the reader's first batch of 8,192 events; the
    // input then stalls twice while that COPY is running.
    let input = (0..20_000u64).map(|i| {
        if i == 10_000 || i == 18_000 {
            thread::sleep(Duration::from_millis(800));
        }
        Ok(ImportEvent::new(
            "slow",
            EventData::json("E", serde_json::json!({ "i": i })),
        ))
    });
    let summary = t.import_iter(input, ImportOptions::new())?;
    assert_eq!(summary.events, 20_000);
    assert_eq!(t.stream_version("slow")?, Some(19_999));
    // Other calls still run under the timeout.
    let mut conn = t.pool().get()?;
    let e = conn.batch_execute("SELECT pg_sleep(1)").unwrap_err();
    assert_eq!(
        e.code(),
        Some(&pg_eventstore::postgres::error::SqlState::QUERY_CANCELED)
    );
    Ok(())
}
