//! The stream lifecycle at its edges: imports into streams that lost events, deletes
//! racing appends and metadata writes, markers for subscribers, times out of range.

use crate::common::{client, events, TestResult, TestStore};

use pg_eventstore::{Error, ExpectedVersion, ImportOptions, ReadAll, STREAM_TOMBSTONE};

/// `(stream, version, type)` of every row of the events table, in position order.
fn rows(t: &TestStore) -> Vec<(String, i64, String)> {
    crate::common::event_rows(t, "event_type")
}

/// A default import (no `continue_existing_streams`) into a tombstoned stream, whose
/// versions below the tombstone are gone, is `Error::StreamDeleted` and writes nothing.
#[test]
fn default_import_into_a_tombstoned_stream_is_refused() -> TestResult {
    let t = TestStore::new("edge_tomb_import");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.tombstone_stream("a", ExpectedVersion::Exact(2))?;
    let before = rows(&t);
    assert_eq!(
        before,
        vec![("a".to_string(), 3, STREAM_TOMBSTONE.to_string())]
    );
    let import = [("a", events("I", 1).remove(0))];
    let r = t.import(&import, ImportOptions::new());
    let after = rows(&t);
    assert!(
        matches!(r, Err(Error::StreamDeleted { .. })),
        "import into a tombstoned stream: {r:?}; rows now {after:?}"
    );
    assert_eq!(after, before, "nothing written");
    Ok(())
}

/// The same for a soft-deleted stream: it exists (its head is the marker), so a default
/// import is refused (`WrongExpectedVersion`, expected no stream) and writes nothing.
#[test]
fn default_import_into_a_soft_deleted_stream_is_refused() -> TestResult {
    let t = TestStore::new("edge_soft_import");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.delete_stream("a", ExpectedVersion::Exact(2))?;
    let before = rows(&t);
    let import = [
        ("a", events("I", 2).remove(0)),
        ("a", events("I", 2).remove(1)),
    ];
    let r = t.import(&import, ImportOptions::new());
    let after = rows(&t);
    assert!(
        matches!(r, Err(Error::WrongExpectedVersion { .. })),
        "import into an existing (soft-deleted) stream: {r:?}; rows now {after:?}"
    );
    assert_eq!(after, before, "nothing written");
    Ok(())
}

/// A truncated stream exists too (its version 0 is gone).
#[test]
fn default_import_into_a_truncated_stream_is_refused() -> TestResult {
    let t = TestStore::new("edge_trunc_import");
    t.append("a", ExpectedVersion::NoStream, &events("E", 5))?;
    t.truncate_stream("a", 5)?;
    let before = rows(&t);
    let import = [("a", events("I", 1).remove(0))];
    let r = t.import(&import, ImportOptions::new());
    let after = rows(&t);
    assert!(
        matches!(r, Err(Error::WrongExpectedVersion { .. })),
        "import into an existing (truncated) stream: {r:?}; rows now {after:?}"
    );
    assert_eq!(after, before, "nothing written");
    let _ = ReadAll::from_start();
    Ok(())
}

/// `delete_stream(s, Any)` racing appends that take the marker's version: with `Any`
/// there is no expected version to be wrong, so the delete goes on after them and never
/// reports `WrongExpectedVersion`.
#[test]
fn delete_with_any_never_reports_a_wrong_expected_version() -> TestResult {
    let t = TestStore::new("edge_delete_any");
    t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let bad = std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    t.append("s", ExpectedVersion::Any, &events("F", 1))
                        .unwrap();
                }
            });
        }
        let mut bad = Vec::new();
        for _ in 0..300 {
            match t.delete_stream("s", ExpectedVersion::Any) {
                Ok(_) => {}
                Err(e @ Error::WrongExpectedVersion { .. }) => bad.push(e.to_string()),
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        bad
    });
    assert!(
        bad.is_empty(),
        "{} of 300 deletes with Any failed, e.g. {:?}",
        bad.len(),
        bad.first()
    );
    Ok(())
}

/// A delete wakes live subscriptions as an append does: the marker arrives within
/// milliseconds, not at the next safety poll (1 s by default).
#[test]
fn a_live_subscription_gets_a_delete_marker_as_fast_as_an_append() -> TestResult {
    use pg_eventstore::SubscribeOptions;
    use std::time::{Duration, Instant};
    let t = TestStore::new("edge_marker_wake");
    let mut sub = t.subscribe(SubscribeOptions::all().live())?;
    // Warm up: an append is delivered at once.
    std::thread::sleep(Duration::from_millis(300));
    let mut worst_append = Duration::ZERO;
    let mut worst_delete = Duration::ZERO;
    for i in 0..3 {
        let s = format!("s-{i}");
        let started = Instant::now();
        t.append(&s, ExpectedVersion::NoStream, &events("E", 1))?;
        let e = sub
            .next_timeout(Duration::from_secs(5))
            .expect("append delivered")?;
        assert_eq!(e.stream_id, s);
        worst_append = worst_append.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        t.delete_stream(&s, ExpectedVersion::Exact(0))?;
        let e = sub
            .next_timeout(Duration::from_secs(5))
            .expect("marker delivered")?;
        assert_eq!(e.event_type, pg_eventstore::STREAM_DELETED);
        worst_delete = worst_delete.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("worst append {worst_append:?}, worst delete marker {worst_delete:?}");
    assert!(
        worst_delete < Duration::from_millis(200),
        "delete marker took {worst_delete:?} (append: {worst_append:?})"
    );
    Ok(())
}

/// A metadata write racing a tombstone never lands after it: the statement checks for the
/// tombstone on the row it updates, and a write that lost is `Error::StreamDeleted`.
#[test]
fn a_metadata_write_racing_a_tombstone_never_lands_after_it() -> TestResult {
    let t = TestStore::new("edge_meta_tomb");
    let n = 150;
    for i in 0..n {
        t.append(
            &format!("s-{i}"),
            ExpectedVersion::NoStream,
            &events("E", 3),
        )?;
    }
    let barrier = std::sync::Barrier::new(2);
    let metas = std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..n {
                barrier.wait();
                if i % 2 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                t.tombstone_stream(&format!("s-{i}"), ExpectedVersion::Any)
                    .unwrap();
            }
        });
        let m = scope.spawn(|| {
            (0..n)
                .map(|i| {
                    barrier.wait();
                    t.set_stream_metadata(
                        &format!("s-{i}"),
                        ExpectedVersion::Any,
                        &serde_json::json!({ "owner": "ops" }),
                    )
                })
                .collect::<Vec<_>>()
        });
        m.join().unwrap()
    });
    let mut landed_after = Vec::new();
    for (i, r) in metas.iter().enumerate() {
        let s = format!("s-{i}");
        let meta = t.stream_metadata(&s)?.expect("written");
        let read: Vec<_> = t
            .read_stream(&s, pg_eventstore::ReadStream::forwards())?
            .collect::<Result<_, _>>()?;
        if r.is_ok() && meta.truncate_before() != Some(i64::MAX as u64) {
            landed_after.push((s.clone(), meta.metadata.clone(), read.len()));
        }
        // Every write that lost says why: the stream is tombstoned.
        if let Err(e) = r {
            assert!(matches!(e, Error::StreamDeleted { .. }), "{s}: {e:?}");
        }
        assert!(
            read.is_empty(),
            "{s}: a tombstoned stream reads as empty: {read:?}"
        );
    }
    assert!(
        landed_after.is_empty(),
        "{} metadata writes succeeded after the tombstone, e.g. {:?} (metadata, events a read returns)",
        landed_after.len(),
        landed_after.first()
    );
    Ok(())
}

/// A stream subscription receives the `$streamDeleted` marker (its stream's reads start
/// past it), then what is appended after it, in version order.
#[test]
fn a_stream_subscription_receives_the_delete_marker() -> TestResult {
    use pg_eventstore::SubscribeOptions;
    use std::time::Duration;
    let t = TestStore::new("edge_stream_sub_marker");
    t.append("s", ExpectedVersion::NoStream, &events("E", 2))?;
    let mut sub = t.subscribe(SubscribeOptions::stream("s"))?;
    for v in 0..2 {
        let e = sub
            .next_timeout(Duration::from_secs(5))
            .expect("caught up")?;
        assert_eq!(e.version, v);
    }
    assert!(sub.next_timeout(Duration::from_millis(300)).is_none());
    t.delete_stream("s", ExpectedVersion::Exact(1))?;
    t.append("s", ExpectedVersion::Exact(2), &events("After", 1))?;
    let got: Vec<(u64, String)> = (0..2)
        .filter_map(|_| sub.next_timeout(Duration::from_secs(3)))
        .map(|e| e.map(|e| (e.version, e.event_type)))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        got,
        vec![
            (2, pg_eventstore::STREAM_DELETED.to_string()),
            (3, "After".to_string())
        ]
    );
    Ok(())
}

/// Deletes, tombstones and truncations racing appends, with a subscription and `$all`
/// reads following: every reader sees positions strictly increasing, each stream's
/// versions increasing, and every event that remains at the end.
#[test]
fn lifecycle_racing_appends_keeps_all_readers_in_order() -> TestResult {
    use pg_eventstore::SubscribeOptions;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let t = TestStore::new("edge_lifecycle_race");
    let mut sub = t.subscribe(SubscribeOptions::all().from_start())?;
    let done = AtomicBool::new(false);
    let (delivered, paged) = std::thread::scope(|scope| {
        for w in 0..2u64 {
            let (t, done) = (&t, &done);
            scope.spawn(move || {
                let mut i = w;
                while !done.load(Ordering::Relaxed) {
                    let s = format!("s-{}", (i * 7) % 23);
                    let _ = t.append(&s, ExpectedVersion::Any, &events("E", 1 + (i % 3) as usize));
                    i += 1;
                }
            });
        }
        scope.spawn(|| {
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let s = format!("s-{}", (i * 5) % 23);
                match i % 10 {
                    0 => drop(t.tombstone_stream(&format!("s-{}", i % 3), ExpectedVersion::Any)),
                    1..=4 => drop(t.delete_stream(&s, ExpectedVersion::Any)),
                    5..=7 => {
                        if let Ok(Some(v)) = t.stream_version(&s) {
                            let _ = t.truncate_stream(&s, v / 2 + 1);
                        }
                    }
                    _ => drop(t.scavenge()),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let pager = scope.spawn(|| {
            let mut pages = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let got: Vec<(u64, String, u64)> = t
                    .read_all(ReadAll::from_start().visible_now())
                    .unwrap()
                    .map(|e| e.map(|e| (e.position, e.stream_id, e.version)).unwrap())
                    .collect();
                pages.push(got);
                std::thread::sleep(Duration::from_millis(200));
            }
            pages
        });
        let reader = scope.spawn(|| {
            let mut got = Vec::new();
            while let Some(e) = sub.next_timeout(Duration::from_secs(3)) {
                let e = e.unwrap();
                got.push((e.position, e.stream_id, e.version));
            }
            got
        });
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(100));
        }
        done.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), pager.join().unwrap())
    });
    let check = |what: &str, seq: &[(u64, String, u64)]| {
        assert!(
            seq.windows(2).all(|w| w[0].0 < w[1].0),
            "{what}: positions not increasing"
        );
        let mut last: std::collections::HashMap<&str, u64> = Default::default();
        for (p, s, v) in seq {
            if let Some(prev) = last.insert(s.as_str(), *v) {
                assert!(
                    prev < *v,
                    "{what}: {s} version {v} at {p} after version {prev}"
                );
            }
        }
    };
    check("subscription", &delivered);
    for (i, page) in paged.iter().enumerate() {
        check(&format!("read_all #{i}"), page);
    }
    t.wait_all_visible();
    let remaining: Vec<(u64, String, u64)> = t
        .read_all(ReadAll::from_start())?
        .map(|e| e.map(|e| (e.position, e.stream_id, e.version)))
        .collect::<Result<_, _>>()?;
    let seen: std::collections::HashSet<u64> = delivered.iter().map(|e| e.0).collect();
    let missing: Vec<_> = remaining.iter().filter(|e| !seen.contains(&e.0)).collect();
    eprintln!(
        "delivered {}, remaining {}, pages {}",
        delivered.len(),
        remaining.len(),
        paged.len()
    );
    assert!(
        missing.is_empty(),
        "{} remaining events never delivered, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    Ok(())
}

/// A delete keeps its marker until `scavenge`, even when an append lands while the
/// delete's removal batches run (they remove what is below the marker, not the marker),
/// so that a `$all` reader that was behind still learns that the stream was deleted.
#[test]
fn an_append_during_the_delete_removal_does_not_remove_the_marker() -> TestResult {
    use std::sync::atomic::{AtomicBool, Ordering};
    let t = TestStore::new("edge_marker_removed");
    let big: Vec<(String, pg_eventstore::EventData)> = (0..20_000)
        .map(|_| ("s".to_string(), events("E", 1).remove(0)))
        .collect();
    t.import(&big, ImportOptions::new())?;
    let deleted = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Append as soon as the marker (version 20000) is the head.
            loop {
                if let Ok(Some(20_000)) = t.stream_version("s") {
                    t.append("s", ExpectedVersion::Exact(20_000), &events("After", 1))
                        .unwrap();
                    return;
                }
                if deleted.load(Ordering::Relaxed) {
                    return;
                }
            }
        });
        let r = t
            .delete_stream("s", ExpectedVersion::Exact(19_999))
            .unwrap();
        deleted.store(true, Ordering::Relaxed);
        eprintln!("{r:?}");
    });
    let rows = rows(&t);
    eprintln!("rows left: {:?}", rows);
    assert!(
        rows.iter().any(|r| r.2 == pg_eventstore::STREAM_DELETED),
        "the delete removed its own marker: $all readers never see it; rows {rows:?}"
    );
    Ok(())
}

/// A stream that has metadata but no events (retention set before its first event) is a
/// new stream for a default import, which starts it at version 0.
#[test]
fn a_default_import_starts_a_stream_that_has_only_metadata() -> TestResult {
    let t = TestStore::new("edge_meta_only");
    t.set_stream_metadata(
        "a",
        ExpectedVersion::NoStream,
        &serde_json::json!({ "$maxCount": 5 }),
    )?;
    t.import(&[("a", events("I", 1).remove(0))], ImportOptions::new())?;
    assert_eq!(rows(&t), vec![("a".to_string(), 0, "I".to_string())]);
    // And a deleted stream whose events were all imported by the same import earlier
    // in a chunked run is its own: the check looks only at other transactions' events.
    let big = (0..10).map(|_| {
        Ok(pg_eventstore::ImportEvent::new(
            "b",
            events("E", 1).remove(0),
        ))
    });
    t.set_stream_metadata("b", ExpectedVersion::NoStream, &serde_json::json!({}))?;
    let summary = t.import_iter(big, ImportOptions::new().chunked(true).chunk_size(3))?;
    assert_eq!(summary.transactions, 4);
    assert_eq!(t.stream_version("b")?, Some(9));
    Ok(())
}

/// An import refuses a `recorded_at` before 1970 or after 9999 (what JSON output and
/// JSON lines cannot hold), naming the event and writing nothing; an event stored with
/// such a time by other means is an error when written as JSON, never a panic.
#[test]
fn recorded_at_outside_what_json_holds_is_refused_and_never_panics() -> TestResult {
    use pg_eventstore::ImportEvent;
    use std::time::{Duration, UNIX_EPOCH};
    let t = TestStore::new("edge_times");
    let old = UNIX_EPOCH - Duration::from_secs(86_400);
    let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
    let last_ok = UNIX_EPOCH + Duration::from_micros(253_402_300_800_000_000 - 1);
    for (time, what) in [(old, "before 1970"), (far, "after the end of 9999")] {
        let input = [
            Ok(ImportEvent::new("ok", events("E", 1).remove(0))),
            Ok(ImportEvent::new("legacy-1", events("Born", 1).remove(0)).recorded_at(time)),
        ];
        match t.import_iter(input, ImportOptions::new()) {
            Err(Error::InvalidInput(m)) => {
                assert!(m.contains("event 1") && m.contains(what), "{m}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(rows(&t).is_empty(), "nothing written");
    }
    let edges = [
        Ok(ImportEvent::new("edge", events("E", 1).remove(0)).recorded_at(UNIX_EPOCH)),
        Ok(ImportEvent::new("edge", events("E", 1).remove(0)).recorded_at(last_ok)),
    ];
    t.import_iter(edges, ImportOptions::new())?;

    // Stored behind the store's back: writing it out fails with a message, no panic.
    client()
        .execute(
            &format!(
                "UPDATE \"{}\".events SET recorded_at = '1969-07-20T20:17:40Z'
              WHERE stream_version = 0",
                t.schema
            ),
            &[],
        )
        .expect_err("events are immutable: an UPDATE is refused");
    let mut c = client();
    let mut tx = c.transaction()?;
    tx.batch_execute(&format!(
        "SET LOCAL session_replication_role = replica;
         UPDATE \"{}\".events SET recorded_at = '1969-07-20T20:17:40Z' WHERE stream_version = 0",
        t.schema
    ))?;
    tx.commit()?;
    t.wait_all_visible();
    let event = t.read_all(ReadAll::from_start())?.next().expect("one")?;
    let mut line = Vec::new();
    let e = event
        .write_json(&mut line)
        .expect_err("no RFC 3339 for 1969 here");
    assert!(e.to_string().contains("before 1970"), "{e}");
    let e = serde_json::to_string(&event).expect_err("the same through serde");
    assert!(e.to_string().contains("before 1970"), "{e}");
    Ok(())
}

/// A JSON line whose data holds half a UTF-16 surrogate pair as an escape (`"\ud800"`),
/// which PostgreSQL's jsonb refuses, is `Error::InvalidInput` naming the line, and the
/// import writes nothing; a whole pair is imported.
#[test]
fn a_lone_surrogate_in_a_json_line_is_invalid_input_naming_the_line() -> TestResult {
    let t = TestStore::new("edge_surrogate");
    let input = "{\"stream\":\"a\",\"type\":\"T\",\"data\":1}\n\
                 {\"stream\":\"a\",\"type\":\"T\",\"data\":{\"k\":\"\\ud800\"}}\n";
    match t.import_json_lines(input.as_bytes(), ImportOptions::new()) {
        Err(Error::InvalidInput(m)) if m.contains("line 2") && m.contains("surrogate") => {}
        other => panic!("expected InvalidInput naming line 2, got {other:?}"),
    }
    assert!(rows(&t).is_empty());
    let pair = "{\"stream\":\"a\",\"type\":\"T\",\"data\":{\"k\":\"\\ud83d\\ude00\"}}\n";
    t.import_json_lines(pair.as_bytes(), ImportOptions::new())?;
    t.wait_all_visible();
    let e = t.read_all(ReadAll::from_start())?.next().expect("one")?;
    assert_eq!(e.data.to_value()?["k"], "\u{1F600}");
    Ok(())
}

/// An export (the events of `read_all`, with their versions) of a store that deleted,
/// tombstoned and truncated streams, imported with `ImportOptions::exported`, reads as
/// it did there: each stream's events and version, a tombstone that refuses appends, and
/// a deleted stream whose next append gets the same version. Without the option the
/// markers and the streams that begin after version 0 are refused, and nothing is
/// written.
#[test]
fn an_export_of_a_store_whose_streams_lost_events_imports_as_it_reads() -> TestResult {
    use pg_eventstore::{ImportEvent, ReadStream};
    let from = TestStore::new("edge_export_from");
    from.append("keep", ExpectedVersion::NoStream, &events("E", 3))?;
    from.append("gone", ExpectedVersion::NoStream, &events("E", 2))?;
    from.append("dead", ExpectedVersion::NoStream, &events("E", 2))?;
    from.append("plain", ExpectedVersion::NoStream, &events("E", 2))?;
    from.append("again", ExpectedVersion::NoStream, &events("E", 2))?;
    from.truncate_stream("keep", 1)?;
    from.delete_stream("gone", ExpectedVersion::Exact(1))?;
    from.tombstone_stream("dead", ExpectedVersion::Any)?;
    from.delete_stream("again", ExpectedVersion::Any)?;
    from.append("again", ExpectedVersion::Exact(2), &events("After", 2))?;
    from.wait_all_visible();
    let exported: Vec<pg_eventstore::RecordedEvent> = from
        .read_all(ReadAll::from_start())?
        .collect::<Result<_, _>>()?;
    let input = || {
        exported.iter().map(|e| {
            Ok(ImportEvent::new(e.stream_id.clone(), e.to_event_data())
                .version(e.version)
                .position(e.position)
                .recorded_at(e.recorded_at))
        })
    };

    let plain = TestStore::new("edge_export_plain");
    match plain.import_iter(input(), ImportOptions::new()) {
        Err(Error::InvalidInput(m)) => {
            assert!(m.contains("version 1") || m.contains("reserved"), "{m}")
        }
        other => panic!("without exported: {other:?}"),
    }
    assert!(rows(&plain).is_empty());

    let into = TestStore::new("edge_export_into");
    into.import_iter(input(), ImportOptions::new().exported(true))?;
    let read = |t: &TestStore, s: &str| -> Vec<(uuid::Uuid, u64, String)> {
        t.read_stream(s, ReadStream::forwards())
            .unwrap()
            .map(|e| e.map(|e| (e.id, e.version, e.event_type)))
            .collect::<Result<_, _>>()
            .unwrap()
    };
    for s in ["keep", "gone", "plain", "again"] {
        assert_eq!(read(&into, s), read(&from, s), "{s}");
        assert_eq!(into.stream_version(s)?, from.stream_version(s)?, "{s}");
    }
    assert!(read(&into, "gone").is_empty());
    assert_eq!(read(&into, "keep").first().map(|e| e.1), Some(1));
    assert!(matches!(
        into.append("dead", ExpectedVersion::Any, &events("X", 1)),
        Err(Error::StreamDeleted { .. })
    ));
    assert!(matches!(
        into.stream_version("dead"),
        Err(Error::StreamDeleted { .. })
    ));
    let next = into.append("gone", ExpectedVersion::Exact(2), &events("X", 1))?;
    assert_eq!(next.last_version, 3);
    assert_eq!(read(&into, "gone").len(), 1);

    // Events after a tombstone in the input are refused.
    let after_tombstone = [
        Ok(ImportEvent::new("t", events("E", 1).remove(0)).version(0)),
        Ok(ImportEvent::new(
            "t",
            pg_eventstore::EventData::json(STREAM_TOMBSTONE, serde_json::json!({})),
        )
        .version(1)),
        Ok(ImportEvent::new("t", events("E", 1).remove(0)).version(2)),
    ];
    let other = TestStore::new("edge_export_tomb");
    match other.import_iter(after_tombstone, ImportOptions::new().exported(true)) {
        Err(Error::InvalidInput(m)) => assert!(m.contains("tombstoned"), "{m}"),
        r => panic!("{r:?}"),
    }
    assert!(rows(&other).is_empty());
    Ok(())
}

/// A snapshot saved after its stream was deleted or truncated past the events it
/// covers is not stored (it would bring deleted state back); one of the versions the
/// stream still reads is; a tombstoned stream's is `StreamDeleted`.
#[test]
fn a_snapshot_of_events_a_stream_no_longer_reads_is_not_stored() -> TestResult {
    let t = TestStore::new("edge_snapshots");
    let state = serde_json::json!({ "n": 3 });
    t.append("gone", ExpectedVersion::NoStream, &events("E", 2))?;
    t.delete_stream("gone", ExpectedVersion::Any)?;
    t.save_snapshot("gone", 1, &state)?;
    assert!(t.load_snapshot::<serde_json::Value>("gone")?.is_none());
    // The marker's version: the state after the delete.
    t.save_snapshot("gone", 2, &state)?;
    assert_eq!(
        t.load_snapshot::<serde_json::Value>("gone")?
            .map(|s| s.version),
        Some(2)
    );

    t.append("dead", ExpectedVersion::NoStream, &events("E", 2))?;
    t.tombstone_stream("dead", ExpectedVersion::Any)?;
    assert!(matches!(
        t.save_snapshot("dead", 1, &state),
        Err(Error::StreamDeleted { .. })
    ));
    assert!(t.load_snapshot::<serde_json::Value>("dead")?.is_none());

    t.append("long", ExpectedVersion::NoStream, &events("E", 10))?;
    t.truncate_stream("long", 5)?;
    t.save_snapshot("long", 2, &state)?;
    assert!(t.load_snapshot::<serde_json::Value>("long")?.is_none());
    t.save_snapshot("long", 4, &state)?; // covers 0..=4, the stream reads from 5
    assert_eq!(
        t.load_snapshot::<serde_json::Value>("long")?
            .map(|s| s.version),
        Some(4)
    );
    Ok(())
}

/// An import into a tombstoned stream is `Error::StreamDeleted` also where its `COPY`
/// meets the tombstone's own version (a stream tombstoned before it existed, or a longer
/// import), in every mode, and writes nothing.
#[test]
fn an_import_into_a_tombstoned_stream_is_stream_deleted_wherever_it_meets_it() -> TestResult {
    use pg_eventstore::ImportEvent;
    let t = TestStore::new("edge_import_tomb");
    // Tombstoned before it existed: the marker is version 0.
    t.tombstone_stream("z0", ExpectedVersion::Any)?;
    // Tombstoned after 3 events: the marker is version 3.
    t.append("z3", ExpectedVersion::NoStream, &events("E", 3))?;
    t.tombstone_stream("z3", ExpectedVersion::Any)?;
    let before = t.count_events();
    let mut bad = Vec::new();
    for (s, n) in [("z0", 1usize), ("z0", 3), ("z3", 2), ("z3", 5)] {
        for (what, opts) in [
            ("default", ImportOptions::new()),
            ("chunked", ImportOptions::new().chunk_size(1)),
            ("exported", ImportOptions::new().exported(true)),
        ] {
            let input: Vec<_> = events("I", n)
                .into_iter()
                .map(|e| Ok(ImportEvent::new(s, e)))
                .collect();
            match t.import_iter(input, opts) {
                Err(Error::StreamDeleted { .. }) => {}
                Err(Error::ImportIncomplete { source, .. })
                    if matches!(*source, Error::StreamDeleted { .. }) => {}
                other => bad.push(format!("{s}, {n} events, {what}: {other:?}")),
            }
        }
    }
    assert_eq!(t.count_events(), before);
    assert!(bad.is_empty(), "wrong errors:\n{}", bad.join("\n"));
    Ok(())
}
