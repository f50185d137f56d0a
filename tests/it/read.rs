use crate::common::{events, wait_visible, TestResult, TestStore};
use std::time::{Duration, Instant};

use pg_eventstore::{EventData, ExpectedVersion, ReadAll, ReadStream, Result};

fn stream_versions(t: &TestStore, stream: &str, options: ReadStream) -> Vec<u64> {
    t.read_stream(stream, options)
        .unwrap()
        .map(|e| e.unwrap().version)
        .collect::<Vec<_>>()
}

/// A store with a tiny page size, so that reads go through the cursor after one page.
fn small_pages(name: &str) -> TestStore {
    TestStore::with(name, |c| c.read_page_size(3).max_connections(1))
}

/// Small pages, each fetched in a transaction of its own (a snapshot may not get older
/// than zero): every page after the second goes through the cursor's renewal.
fn renewing(name: &str) -> TestStore {
    TestStore::with(name, |c| {
        c.read_page_size(3)
            .max_connections(1)
            .read_snapshot_max_age(Duration::ZERO)
    })
}

#[test]
fn stream_reads_forwards_backwards_from_and_max_count() -> TestResult {
    for t in [
        TestStore::new("read_stream"),
        small_pages("read_stream_paged"),
        renewing("read_stream_renewing"),
    ] {
        t.append("s", ExpectedVersion::NoStream, &events("E", 10))?;
        t.append("noise", ExpectedVersion::NoStream, &events("E", 4))?;
        let all: Vec<u64> = (0..10).collect();
        assert_eq!(stream_versions(&t, "s", ReadStream::forwards()), all);
        assert_eq!(
            stream_versions(&t, "s", ReadStream::backwards()),
            all.iter().rev().copied().collect::<Vec<_>>()
        );
        assert_eq!(
            stream_versions(&t, "s", ReadStream::forwards().from_version(4)),
            vec![4, 5, 6, 7, 8, 9]
        );
        assert_eq!(
            stream_versions(&t, "s", ReadStream::forwards().from_version(2).max_count(5)),
            vec![2, 3, 4, 5, 6]
        );
        assert_eq!(
            stream_versions(
                &t,
                "s",
                ReadStream::backwards().from_version(6).max_count(4)
            ),
            vec![6, 5, 4, 3]
        );
        assert_eq!(
            stream_versions(&t, "s", ReadStream::backwards().from_version(2)),
            vec![2, 1, 0]
        );
        assert_eq!(
            stream_versions(&t, "s", ReadStream::backwards().max_count(1)),
            vec![9]
        );
        assert_eq!(
            stream_versions(&t, "s", ReadStream::forwards().max_count(3)),
            vec![0, 1, 2]
        );
        assert!(stream_versions(&t, "s", ReadStream::forwards().max_count(0)).is_empty());
        assert!(stream_versions(&t, "s", ReadStream::forwards().from_version(10)).is_empty());
        assert!(stream_versions(&t, "nothing", ReadStream::forwards()).is_empty());
        // The data comes back in order, whichever path served it.
        let data: Vec<i64> = t
            .read_stream("s", ReadStream::forwards())?
            .map(|e| e.unwrap().data.to_value().unwrap()["i"].as_i64().unwrap())
            .collect();
        assert_eq!(data, (0..10).collect::<Vec<i64>>());
    }
    Ok(())
}

#[test]
fn read_all_in_order_with_filters() -> TestResult {
    for t in [
        TestStore::new("read_all"),
        small_pages("read_all_paged"),
        renewing("read_all_renewing"),
    ] {
        t.append("order-1", ExpectedVersion::Any, &events("OrderPlaced", 2))?;
        t.append("user-1", ExpectedVersion::Any, &events("UserRegistered", 1))?;
        t.append("order-2", ExpectedVersion::Any, &events("OrderShipped", 3))?;
        let last = t.append("order_3", ExpectedVersion::Any, &events("OrderPlaced", 1))?;
        wait_visible(&t, last.last_position);

        let read = |o: ReadAll| -> Vec<(String, String)> {
            t.read_all(o)
                .unwrap()
                .map(|e| e.unwrap())
                .map(|e| (e.stream_id, e.event_type))
                .collect()
        };
        let all = t
            .read_all(ReadAll::from_start())?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(all.len(), 7);
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        let streams: Vec<&str> = all.iter().map(|e| e.stream_id.as_str()).collect();
        assert_eq!(
            streams,
            ["order-1", "order-1", "user-1", "order-2", "order-2", "order-2", "order_3"]
        );

        // A category prefix is text, not a LIKE pattern: "order-" does not match "order_3".
        let orders = read(ReadAll::from_start().category("order-"));
        assert_eq!(orders.len(), 5);
        assert!(orders.iter().all(|(s, _)| s.starts_with("order-")));
        let placed = read(ReadAll::from_start().event_types(["OrderPlaced"]));
        assert_eq!(
            placed,
            vec![
                ("order-1".into(), "OrderPlaced".into()),
                ("order-1".into(), "OrderPlaced".into()),
                ("order_3".into(), "OrderPlaced".into())
            ]
        );
        let both = read(
            ReadAll::from_start()
                .category("order-")
                .event_types(["OrderShipped", "Nope"]),
        );
        assert_eq!(both.len(), 3);
        // Named streams, in the global order; with the other filters, every one applies.
        let named = read(ReadAll::from_start().streams(["user-1", "order-1", "none"]));
        assert_eq!(
            named,
            vec![
                ("order-1".into(), "OrderPlaced".into()),
                ("order-1".into(), "OrderPlaced".into()),
                ("user-1".into(), "UserRegistered".into())
            ]
        );
        let named_all: Vec<_> = t
            .read_all(ReadAll::from_start().streams(["order-2", "order_3"]))?
            .collect::<Result<_>>()?;
        assert_eq!(named_all, all[3..].to_vec());
        assert_eq!(
            read(
                ReadAll::backwards()
                    .streams(["order-2", "user-1"])
                    .max_count(2)
            ),
            vec![
                ("order-2".into(), "OrderShipped".into()),
                ("order-2".into(), "OrderShipped".into())
            ]
        );
        assert_eq!(
            read(
                ReadAll::after(all[0].position)
                    .streams(["order-1", "order_3"])
                    .event_types(["OrderPlaced"])
                    .category("order")
            ),
            vec![
                ("order-1".into(), "OrderPlaced".into()),
                ("order_3".into(), "OrderPlaced".into())
            ]
        );
        assert!(read(ReadAll::from_start().streams(["user-1"]).category("order-")).is_empty());
        assert_eq!(
            t.count(&ReadAll::from_start().streams(["order-2", "user-1"]))?,
            4
        );
        assert_eq!(
            t.count(
                &ReadAll::from_start()
                    .streams(["order-2"])
                    .event_types(["Nope"])
            )?,
            0
        );

        // After a position (exclusive), max count, backwards.
        let after = t
            .read_all(ReadAll::after(all[2].position))?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(after, all[3..].to_vec());
        let two = t
            .read_all(ReadAll::after(all[0].position).max_count(2))?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(two, all[1..3].to_vec());
        let back = t
            .read_all(ReadAll::backwards())?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(back, all.iter().rev().cloned().collect::<Vec<_>>());
        let back_before = t
            .read_all(ReadAll::backwards_before(all[3].position).max_count(2))?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(back_before, vec![all[2].clone(), all[1].clone()]);
        assert_eq!(
            t.read_all(ReadAll::after(all[6].position))?.count(),
            0,
            "nothing after the head"
        );
    }
    Ok(())
}

#[test]
fn dropping_a_read_midway_gives_the_connection_back_clean() -> TestResult {
    // One connection only: if a dropped read left its transaction or cursor open, the
    // next read on the same connection would fail ("cursor already exists").
    let t = small_pages("read_drop");
    t.append("s", ExpectedVersion::NoStream, &events("E", 20))?;
    for _ in 0..3 {
        let mut read = t.read_stream("s", ReadStream::forwards())?;
        for _ in 0..7 {
            read.next().unwrap()?; // into the cursor (pages of 3)
        }
        drop(read);
        assert_eq!(t.pool().state().connections, 1);
        assert_eq!(stream_versions(&t, "s", ReadStream::forwards()).len(), 20);
    }
    let pid: i32 = t
        .pool()
        .get()?
        .query_one("SELECT pg_backend_pid()", &[])?
        .get(0);
    let state: String = crate::common::client()
        .query_one("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])?
        .get(0);
    assert_eq!(
        state, "idle",
        "the pooled connection was left inside a transaction"
    );
    Ok(())
}

/// Backends of `schema`'s store that sit in an open transaction holding a snapshot.
fn snapshots_held(schema: &str) -> i64 {
    crate::common::client()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE state = 'idle in transaction' AND backend_xmin IS NOT NULL
                AND strpos(query, $1) > 0",
            &[&schema],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_read_holds_no_snapshot_while_you_work_through_it() -> TestResult {
    // Pages of 10: after 25 events the reader has fetched a page ahead and waits for the
    // consumer. It must not wait inside its cursor's transaction, holding the snapshot
    // (which keeps VACUUM, and the pruning of the rows that the consumer's own updates
    // leave behind, from cleaning up): not for `read_snapshot_max_age` (100 ms), nor at
    // all (10 minutes: the read must end its transaction at once, not when the snapshot
    // is old).
    for max_age in [Duration::from_millis(100), Duration::from_secs(600)] {
        let t = TestStore::with("read_no_snapshot", |c| {
            c.read_page_size(10)
                .max_connections(1)
                .read_snapshot_max_age(max_age)
        });
        let last = t
            .append("s", ExpectedVersion::NoStream, &events("E", 100))?
            .last_position;
        wait_visible(&t, last);
        for all in [false, true] {
            let mut read = if all {
                t.read_all(ReadAll::from_start())?
            } else {
                t.read_stream("s", ReadStream::forwards())?
            };
            let mut seen: Vec<u64> = Vec::new();
            for _ in 0..25 {
                seen.push(read.next().unwrap()?.version);
            }
            let no_snapshot_soon = |at: usize| {
                let waited = Instant::now();
                while snapshots_held(&t.schema) > 0 {
                    assert!(
                        waited.elapsed() < Duration::from_secs(10),
                        "the reader holds its snapshot while it waits for the consumer \
                         (max age {max_age:?}, all: {all}, at event {at})"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            no_snapshot_soon(seen.len());
            // On where it was, pausing in every page: each time the read has ended its
            // transaction, and it yields every event once, in order.
            for e in read {
                seen.push(e?.version);
                if seen.len() % 10 == 5 {
                    no_snapshot_soon(seen.len());
                }
            }
            assert_eq!(seen, (0..100).collect::<Vec<u64>>(), "all: {all}");
        }
    }
    Ok(())
}

#[test]
fn paused_reads_give_their_connections_back_to_the_pool() -> TestResult {
    // A pool of two, and two reads paused mid-way, each with a page fetched ahead: once
    // those pages have waited `read_snapshot_max_age`, both connections are back in the
    // pool, other work gets them, and both reads then go on where they were.
    let t = TestStore::with("read_paused_pool", |c| {
        c.read_page_size(10)
            .max_connections(2)
            .connection_timeout(Duration::from_secs(2))
            .read_snapshot_max_age(Duration::from_millis(100))
    });
    t.append("s", ExpectedVersion::NoStream, &events("E", 100))?;
    t.wait_all_visible();
    let mut stream = t.read_stream("s", ReadStream::forwards())?;
    let mut all = t.read_all(ReadAll::from_start())?;
    let (mut from_stream, mut from_all): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for _ in 0..25 {
        from_stream.push(stream.next().unwrap()?.version);
        from_all.push(all.next().unwrap()?.version);
    }
    let waited = Instant::now();
    while t.pool().state().idle_connections < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the paused reads still hold {} of the pool's connections",
            2 - t.pool().state().idle_connections
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both at once, as two other threads of the program would.
    std::thread::scope(|s| {
        let appends: Vec<_> = (0..2)
            .map(|k| {
                let store = &t.store;
                s.spawn(move || {
                    let stream = format!("other-{k}");
                    let mut conn = store.connection()?;
                    let mut tx = conn.transaction()?;
                    tx.append(&stream, ExpectedVersion::NoStream, &events("F", 1))?;
                    std::thread::sleep(Duration::from_millis(200));
                    tx.commit()
                })
            })
            .collect();
        for a in appends {
            a.join()
                .unwrap()
                .expect("an append while the reads are paused");
        }
    });
    from_stream.extend(stream.map(|e| e.unwrap().version));
    from_all.extend(all.map(|e| e.unwrap().version));
    assert_eq!(from_stream, (0..100).collect::<Vec<u64>>());
    assert_eq!(from_all, (0..100).collect::<Vec<u64>>());
    Ok(())
}

/// A `$all` read that starts a new transaction for every page (a zero max age) while
/// four writers append, some in `append_in` transactions that stay open a moment: it
/// returns exactly the events a later read finds below its last position, each once, in
/// order. The renewals never skip or repeat an event.
#[test]
fn a_read_renewing_its_snapshot_under_concurrent_appends_skips_and_repeats_nothing() -> TestResult {
    let t = TestStore::with("read_renew_concurrent", |c| {
        c.read_page_size(5)
            .read_snapshot_max_age(Duration::ZERO)
            .max_connections(8)
    });
    t.append("seed", ExpectedVersion::NoStream, &events("E", 50))?;
    t.wait_all_visible();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let read: Vec<u64> = std::thread::scope(|s| -> Result<Vec<u64>> {
        for w in 0..4 {
            let (store, stop) = (&t.store, &stop);
            s.spawn(move || {
                let mut i = 0;
                let mut client = crate::common::client();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let stream = format!("w{w}-{}", i % 5);
                    if w % 2 == 0 {
                        store
                            .append(&stream, ExpectedVersion::Any, &events("E", 2))
                            .unwrap();
                    } else {
                        let mut tx = client.transaction().unwrap();
                        store
                            .append_in(&mut tx, &stream, ExpectedVersion::Any, &events("E", 2))
                            .unwrap();
                        std::thread::sleep(Duration::from_millis(2));
                        tx.commit().unwrap();
                    }
                    i += 1;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut positions = Vec::new();
        for e in t.read_all(ReadAll::from_start())? {
            positions.push(e?.position);
            if positions.len() % 20 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(positions)
    })?;
    // What the table holds up to the read's last event, once every writer has ended,
    // by SQL (not through the code under test).
    let last = *read.last().unwrap();
    let later: Vec<u64> = crate::common::client()
        .query(
            &format!(
                "SELECT global_position FROM \"{}\".events
                  WHERE global_position <= $1 ORDER BY global_position",
                t.schema
            ),
            &[&(last as i64)],
        )?
        .iter()
        .map(|r| r.get::<_, i64>(0) as u64)
        .collect();
    assert!(read.len() > 50, "the read saw only the seed");
    assert!(
        read.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated"
    );
    assert_eq!(read, later);
    Ok(())
}

/// A server that ends sessions idle in a transaction for longer than 800 ms
/// (`idle_in_transaction_session_timeout`, as many operators set it; 800 leaves room for a
/// busy machine) does not break a read whose consumer pauses for two seconds mid-read:
/// the reader never waits for its consumer inside its transaction, so nothing fails and
/// nothing is retried, whatever `read_snapshot_max_age` is. (Before, the read failed:
/// "terminating connection due to idle-in-transaction timeout"; later, with a
/// `read_snapshot_max_age` above the timeout, it went on after a retry.) A transaction of
/// the same store left idle that long is ended, so the server's setting is in force.
#[test]
fn a_paused_read_survives_an_idle_in_transaction_timeout() -> TestResult {
    let t = TestStore::new("read_idle_timeout");
    let store = |max_age: Duration| {
        let mut pg: pg_eventstore::postgres::Config =
            crate::common::database_url().parse().unwrap();
        pg.options("-c idle_in_transaction_session_timeout=800");
        pg_eventstore::Store::connect(
            pg_eventstore::Config::from_pg(pg)
                .schema(&t.schema)
                .max_connections(2)
                .read_page_size(10)
                .read_snapshot_max_age(max_age),
        )
        .unwrap()
    };
    let last = t
        .append("s", ExpectedVersion::NoStream, &events("E", 100))?
        .last_position;
    wait_visible(&t, last);
    {
        let store = store(Duration::from_secs(1));
        let mut conn = store.connection()?;
        let mut tx = conn.transaction()?;
        tx.execute("SELECT 1", &[])?;
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            tx.execute("SELECT 1", &[]).is_err(),
            "the server did not end a transaction idle for 2 s"
        );
    }
    for max_age in [100, 10_000] {
        let store = store(Duration::from_millis(max_age));
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let versions = metrics::with_local_recorder(&recorder, || -> Result<Vec<u64>> {
            let mut read = store.read_all(ReadAll::from_start())?;
            let mut seen = Vec::new();
            for e in read.by_ref().take(25) {
                seen.push(e?.version);
            }
            std::thread::sleep(Duration::from_secs(2));
            for e in read {
                seen.push(e?.version);
            }
            Ok(seen)
        })?;
        assert_eq!(versions, (0..100).collect::<Vec<u64>>());
        let retried: u64 = recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "pg_eventstore_retries_total")
            .map(|(.., value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(retried, 0, "max age {max_age} ms");
    }
    Ok(())
}

#[test]
fn large_events_round_trip() -> TestResult {
    let t = TestStore::new("read_large");
    let big = "x".repeat(100_000);
    t.append(
        "big",
        ExpectedVersion::NoStream,
        &[EventData::json("Big", serde_json::json!({ "blob": big }))],
    )?;
    let e = t
        .read_stream("big", ReadStream::forwards())?
        .next()
        .unwrap()?;
    assert_eq!(e.data.to_value()?["blob"].as_str().unwrap().len(), 100_000);
    Ok(())
}

#[test]
fn reads_of_many_pages_see_every_event_once() -> TestResult {
    let t = TestStore::with("read_many", |c| c.read_page_size(100));
    let batch = 1000;
    let mut last = 0;
    for i in 0..5 {
        last = t
            .append(
                &format!("s{i}"),
                ExpectedVersion::NoStream,
                &events("E", batch),
            )?
            .last_position;
    }
    wait_visible(&t, last);
    let positions: Vec<u64> = t
        .read_all(ReadAll::from_start())?
        .map(|e| e.unwrap().position)
        .collect();
    assert_eq!(positions.len(), 5 * batch);
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    let versions: Vec<u64> = t
        .read_stream("s3", ReadStream::backwards())?
        .map(|e| e.unwrap().version)
        .collect();
    assert_eq!(versions, (0..batch as u64).rev().collect::<Vec<_>>());
    Ok(())
}

#[test]
fn a_decode_error_names_the_event() -> TestResult {
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Deposited {
        amount: u64,
    }
    let t = TestStore::new("read_decode");
    t.append(
        "account-7",
        ExpectedVersion::NoStream,
        &[
            EventData::json("Opened", serde_json::json!({ "owner": "ada" })),
            EventData::json("Opened", serde_json::json!({ "owner": "bob" }))
                .metadata(&serde_json::json!({ "by": 1 }))?,
        ],
    )?;
    let event = t
        .read_stream("account-7", ReadStream::forwards())?
        .nth(1)
        .unwrap()?;
    let e = event.data_as::<Deposited>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot decode the data of event 1 of stream \"account-7\" (type \"Opened\")"
    );
    assert!(e.report().contains("missing field `amount`"), "{e:?}");
    let e = event.metadata_as::<Deposited>().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot decode the metadata of event 1 of stream \"account-7\""),
        "{e}"
    );
    Ok(())
}

#[test]
fn stream_reads_start_from_or_after_a_version() -> TestResult {
    let t = TestStore::new("read_after_version");
    t.append(
        "s",
        pg_eventstore::ExpectedVersion::NoStream,
        &events("E", 5),
    )?;
    let versions = |options: ReadStream| -> pg_eventstore::Result<Vec<u64>> {
        t.read_stream("s", options)?
            .map(|e| e.map(|e| e.version))
            .collect()
    };
    assert_eq!(versions(ReadStream::forwards().from_version(2))?, [2, 3, 4]);
    assert_eq!(versions(ReadStream::forwards().after_version(2))?, [3, 4]);
    assert_eq!(
        versions(ReadStream::backwards().from_version(2))?,
        [2, 1, 0]
    );
    assert_eq!(versions(ReadStream::backwards().after_version(2))?, [1, 0]);
    assert_eq!(
        versions(ReadStream::backwards().after_version(0))?,
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(ReadStream::forwards().after_version(4))?,
        Vec::<u64>::new()
    );
    Ok(())
}

/// jsonb holds numbers that `serde_json::Value` cannot (beyond `f64`). An event with one
/// reads like any other; only parsing its data fails, with an error that names it.
#[test]
fn data_that_value_cannot_hold_reads_and_fails_only_when_parsed() -> TestResult {
    let t = TestStore::new("read_unparsable");
    let line = r#"{"stream":"s","type":"Big","data":{"n":1e400}}"#;
    t.import_json_lines(line.as_bytes(), pg_eventstore::ImportOptions::new())?;
    t.append("s", ExpectedVersion::Exact(0), &events("E", 1))?;
    let read: Vec<_> = t
        .read_stream("s", ReadStream::forwards())?
        .collect::<Result<_>>()?;
    assert_eq!(read.len(), 2);
    assert!(
        read[0].data.as_str().starts_with(r#"{"n": 1000"#),
        "{}",
        read[0].data
    );
    match read[0].data_as::<serde_json::Value>() {
        Err(pg_eventstore::Error::Decode {
            stream,
            version,
            part,
            ..
        }) => assert_eq!((stream.as_str(), version, part), ("s", 0, "data")),
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert!(read[1].data_as::<serde_json::Value>().is_ok());
    Ok(())
}

/// `to_event_data` copies an event's JSON as stored: appended to another store, it is
/// the same `jsonb`, digits and all; through serde (a `Value`) it would not be.
#[test]
fn an_event_copied_to_another_store_keeps_its_data_exactly() -> TestResult {
    let (from, to) = (TestStore::new("copy_from"), TestStore::new("copy_to"));
    let line = concat!(
        r#"{"stream":"s","type":"Big","data":{"n": 12345678901234567890123, "x": 1.50, "h": 1e400},"#,
        r#""metadata":{"s": "a \" b"}}"#
    );
    from.import_json_lines(line.as_bytes(), pg_eventstore::ImportOptions::new())?;
    let event = from
        .read_stream("s", ReadStream::forwards())?
        .next()
        .unwrap()?;
    assert!(
        pg_eventstore::EventData::new("Big", &event.data).is_err(),
        "serde goes through Value, which cannot hold 1e400"
    );
    let copy = event.to_event_data();
    assert_eq!(copy.event_id(), event.id);
    to.append("s", ExpectedVersion::NoStream, &[copy])?;
    let copied = to
        .read_stream("s", ReadStream::forwards())?
        .next()
        .unwrap()?;
    assert_eq!(
        (
            &copied.id,
            &copied.event_type,
            &copied.data,
            &copied.metadata
        ),
        (&event.id, &event.event_type, &event.data, &event.metadata)
    );
    assert!(copied.data.as_str().contains("12345678901234567890123"));
    assert!(copied.data.as_str().contains("1.50"));
    Ok(())
}

/// An event's data and metadata go into a table of one's own as they were read (a `Json`
/// is a `jsonb` and `json` parameter) and come back out of it as `Json`.
#[test]
fn json_is_a_parameter_and_a_column_type_for_your_own_tables() -> TestResult {
    use pg_eventstore::Json;
    let t = TestStore::new("read_json_param");
    let data =
        serde_json::json!({ "amount": 10, "note": "ünïcode \"quoted\"", "list": [1, 2.5, null] });
    let meta = serde_json::json!({ "by": "me" });
    let event = EventData::json("Deposited", data.clone()).metadata(&meta)?;
    t.append("acc-1", ExpectedVersion::NoStream, &[event])?;
    let e = t
        .read_stream("acc-1", ReadStream::forwards())?
        .next()
        .unwrap()?;
    let mut conn = t.pool().get()?;
    let table = format!("\"{}\".model", t.schema);
    conn.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, b jsonb NOT NULL, j json, m jsonb)"
    ))?;
    conn.execute(
        &format!("INSERT INTO {table} VALUES (1, $1, $2, $3)"),
        &[&e.data, &e.data, &e.metadata],
    )?;
    let row = conn.query_one(
        &format!("SELECT b, j, m, b = $1::jsonb FROM {table}"),
        &[&data],
    )?;
    let (b, j, m): (Json, Json, Option<Json>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(b, e.data);
    assert_eq!(b, data);
    assert_eq!(j, data);
    assert_eq!(m, e.metadata);
    assert!(row.get::<_, bool>(3), "stored as the same jsonb");
    Ok(())
}

/// A `$all` read's first page runs the lean statement while nothing is held back, and the
/// full one, which can pass another database's transactions, when the lean one finds
/// events held back; both read every event.
#[test]
fn a_first_page_with_nothing_held_back_runs_the_lean_statement() -> TestResult {
    let t = TestStore::with("read_lean", |c| c.max_connections(1));
    t.append("a", ExpectedVersion::NoStream, &events("A", 3))?;
    // How often the store's connection ran the lean and the full statement.
    let runs = |t: &TestStore| -> (i64, i64) {
        let mut c = t.store.connection().unwrap();
        let count = |c: &mut pg_eventstore::StoreConnection, pattern: &str| -> i64 {
            c.query_one(
                "SELECT coalesce(sum(generic_plans + custom_plans), 0)::bigint
                   FROM pg_prepared_statements WHERE strpos(statement, $1) > 0",
                &[&pattern],
            )
            .unwrap()
            .get(0)
        };
        (
            count(&mut c, "GREATEST(pg_snapshot_xmin"),
            count(&mut c, "feed_horizon("),
        )
    };
    let count = |t: &TestStore| t.read_all(ReadAll::from_start()).unwrap().count();
    // Any transaction of the cluster that took an id before the last append and is
    // still open holds the lean page back (other tests run beside this one): look
    // again, after the pause that follows a lean page that held events back.
    let lean_alone = crate::common::server::wait_until(Duration::from_secs(10), || {
        let before = runs(&t);
        assert_eq!(count(&t), 3);
        let after = runs(&t);
        if after == (before.0 + 1, before.1) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(150));
        false
    });
    assert!(lean_alone.is_some(), "the lean statement never ran alone");
    // A transaction with an id in another database: the lean page holds the new events
    // back behind it; the full statement finds that it cannot append here.
    let _other = crate::common::XidHolder::in_other_database();
    t.append("b", ExpectedVersion::NoStream, &events("B", 2))?;
    let before = runs(&t);
    assert_eq!(count(&t), 5);
    let after = runs(&t);
    assert_eq!(after.1, before.1 + 1, "the full statement ran");
    Ok(())
}

/// Reads of a large store with statistics (what autovacuum gives every production store)
/// walk the index in order, page by page: none sorts the rest of the log first. The
/// store's sessions here may not write temporary files, so a read planned as a sort of
/// the range (as `$all` and stream reads were, past their first page) fails.
#[test]
fn reads_of_an_analyzed_store_never_sort_the_log() -> TestResult {
    let setup = TestStore::new("read_analyzed");
    let n = 60_000;
    let input: Vec<(String, EventData)> = (0..n)
        .map(|i| {
            let stream = if i % 2 == 0 {
                "big".to_string()
            } else {
                format!("s-{}", i % 500)
            };
            let data = serde_json::json!({ "i": i, "text": "x".repeat(100) });
            (stream, EventData::json("E", data))
        })
        .collect();
    setup.import(&input, pg_eventstore::ImportOptions::new())?;
    crate::common::client().batch_execute(&format!("ANALYZE \"{}\".events", setup.schema))?;
    setup.wait_all_visible();
    let url = crate::common::database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let strict = format!("{url}{sep}options=-c%20work_mem%3D64kB%20-c%20temp_file_limit%3D0");
    let t = pg_eventstore::Config::new(&strict)?
        .schema(&setup.schema)
        .max_connections(2)
        .connect()?;
    for options in [
        ReadAll::from_start(),
        ReadAll::after(1),
        ReadAll::backwards(),
    ] {
        assert_eq!(
            t.read_all(options.clone())?
                .collect::<Result<Vec<_>>>()?
                .len(),
            n,
            "{options:?}"
        );
    }
    let big = t
        .read_stream("big", ReadStream::forwards())?
        .collect::<Result<Vec<_>>>()?;
    assert_eq!(big.len(), n / 2);
    assert!(big.windows(2).all(|w| w[0].version + 1 == w[1].version));
    Ok(())
}

/// `max_count(n)` with `n` above `i64::MAX` (`u64::MAX`: no limit) reads everything, as
/// no `max_count` does, also past the first page.
#[test]
fn a_huge_max_count_reads_everything() -> TestResult {
    let t = TestStore::with("read_huge_count", |c| {
        c.read_page_size(3).max_connections(2)
    });
    t.append("s-1", ExpectedVersion::NoStream, &events("E", 10))?;
    for n in [u64::MAX, i64::MAX as u64 + 1, i64::MAX as u64] {
        let all = t
            .read_all(ReadAll::from_start().max_count(n))?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(all.len(), 10, "read_all max_count({n})");
        let back = t
            .read_all(ReadAll::backwards().max_count(n))?
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(back.len(), 10, "read_all backwards max_count({n})");
        for options in [ReadStream::forwards(), ReadStream::backwards()] {
            let stream = t
                .read_stream("s-1", options.clone().max_count(n))?
                .collect::<Result<Vec<_>>>()?;
            assert_eq!(stream.len(), 10, "{options:?} max_count({n})");
        }
    }
    Ok(())
}

#[test]
fn edge_positions_and_zero_counts() -> TestResult {
    let t = TestStore::with("read_edges", |c| c.read_page_size(2));
    let five: Vec<EventData> = (0..5).map(|i| crate::append::path_ev("E", i)).collect();
    let r = t.append("s-1", ExpectedVersion::NoStream, &five)?;
    let five2: Vec<EventData> = (0..5).map(|i| crate::append::path_ev("E", i)).collect();
    let r2 = t.append("s-2", ExpectedVersion::NoStream, &five2)?;
    let mid = r.first_position + 2;
    let back: Vec<u64> = t
        .read_all(pg_eventstore::ReadAll::backwards_before(mid))?
        .map(|e| e.unwrap().position)
        .collect();
    assert_eq!(back, vec![mid - 1, mid - 2]);
    assert_eq!(
        t.read_all(pg_eventstore::ReadAll::from_start().max_count(0))?
            .count(),
        0
    );
    assert_eq!(
        t.read_all(pg_eventstore::ReadAll::backwards().max_count(0))?
            .count(),
        0
    );
    assert_eq!(
        t.read_stream("s-1", pg_eventstore::ReadStream::forwards().max_count(0))?
            .count(),
        0
    );
    let back3: Vec<u64> = t
        .read_all(pg_eventstore::ReadAll::backwards().max_count(3))?
        .map(|e| e.unwrap().position)
        .collect();
    assert_eq!(
        back3,
        vec![r2.last_position, r2.last_position - 1, r2.last_position - 2]
    );
    let mut sub = t.subscribe(pg_eventstore::SubscribeOptions::all().after(mid))?;
    let mut got = Vec::new();
    while let Some(e) = sub.next_timeout(std::time::Duration::from_millis(300)) {
        got.push(e?.position);
    }
    let want: Vec<u64> = (mid + 1..=r.last_position)
        .chain(r2.first_position..=r2.last_position)
        .collect();
    assert_eq!(got, want);
    Ok(())
}

// Paging: every read, split into pages of 2 or 3 (also each in a transaction of its own),
// forwards and backwards, with max counts around the page size and every filter,
// returns what one page would; so do reads that first wait for a held-back event.

fn positions(store: &pg_eventstore::Store, o: ReadAll) -> Vec<u64> {
    store
        .read_all(o)
        .unwrap()
        .map(|e| e.map(|e: pg_eventstore::RecordedEvent| e.position))
        .collect::<Result<_, _>>()
        .unwrap()
}

fn check_paging(t: &TestStore) {
    let all: Vec<pg_eventstore::RecordedEvent> = t
        .read_all(ReadAll::from_start().max_count(10_000))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len(), 26);
    let pos: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions(t, ReadAll::from_start()), pos);
    let mut back = pos.clone();
    back.reverse();
    assert_eq!(positions(t, ReadAll::backwards()), back);
    for n in [1u64, 2, 3, 4, 5, 6, 7, 9, 12, 25, 26, 27] {
        assert_eq!(
            positions(t, ReadAll::from_start().max_count(n)),
            pos[..(n as usize).min(26)].to_vec(),
            "fwd max {n}"
        );
        assert_eq!(
            positions(t, ReadAll::backwards().max_count(n)),
            back[..(n as usize).min(26)].to_vec(),
            "back max {n}"
        );
        let mid = pos[4];
        let exp: Vec<u64> = pos
            .iter()
            .copied()
            .filter(|p| *p > mid)
            .take(n as usize)
            .collect();
        assert_eq!(
            positions(t, ReadAll::after(mid).max_count(n)),
            exp,
            "after max {n}"
        );
        let midb = pos[20];
        let exp: Vec<u64> = back
            .iter()
            .copied()
            .filter(|p| *p < midb)
            .take(n as usize)
            .collect();
        assert_eq!(
            positions(t, ReadAll::backwards_before(midb).max_count(n)),
            exp,
            "before max {n}"
        );
    }
    // Filters: streams, category, types, each combination.
    let want = |f: &dyn Fn(&pg_eventstore::RecordedEvent) -> bool| -> Vec<u64> {
        all.iter().filter(|e| f(e)).map(|e| e.position).collect()
    };
    let s = want(&|e| e.stream_id == "a-1" || e.stream_id == "b-2");
    assert_eq!(
        positions(t, ReadAll::from_start().streams(["a-1", "b-2"])),
        s
    );
    let mut sb = s.clone();
    sb.reverse();
    assert_eq!(
        positions(t, ReadAll::backwards().streams(["a-1", "b-2"])),
        sb
    );
    let s2 = want(&|e| (e.stream_id == "a-1" || e.stream_id == "b-2") && e.event_type == "T");
    assert_eq!(
        positions(
            t,
            ReadAll::from_start()
                .streams(["a-1", "b-2"])
                .event_types(["T"])
        ),
        s2
    );
    let s3 = want(&|e| e.stream_id.starts_with("a-") && e.event_type == "T");
    assert_eq!(
        positions(t, ReadAll::from_start().category("a-").event_types(["T"])),
        s3
    );
    let s4 = want(&|e| e.stream_id.starts_with("b-") && e.stream_id == "b-2");
    assert_eq!(
        positions(
            t,
            ReadAll::from_start().category("b-").streams(["b-2", "a-1"])
        ),
        s4
    );
    for n in [1u64, 2, 3, 4, 5] {
        assert_eq!(
            positions(
                t,
                ReadAll::from_start().streams(["a-1", "b-2"]).max_count(n)
            ),
            s[..(n as usize).min(s.len())].to_vec()
        );
        assert_eq!(
            positions(t, ReadAll::backwards().streams(["a-1", "b-2"]).max_count(n)),
            sb[..(n as usize).min(sb.len())].to_vec()
        );
    }
    assert_eq!(
        t.count(&ReadAll::from_start().streams(["a-1", "b-2"]))
            .unwrap(),
        s.len() as u64
    );
}

fn fill(t: &TestStore) {
    for i in 0..13 {
        let s = if i % 2 == 0 {
            format!("a-{}", i % 3)
        } else {
            format!("b-{}", i % 3)
        };
        let ty = if i % 3 == 0 { "T" } else { "U" };
        t.append(&s, ExpectedVersion::Any, &events(ty, 2)).unwrap();
    }
    t.wait_all_visible();
}

#[test]
fn paged_reads_return_what_one_page_would() -> TestResult {
    let t = TestStore::with("read_paging", |c| c.read_page_size(3));
    fill(&t);
    check_paging(&t);
    Ok(())
}

#[test]
fn paged_reads_in_a_transaction_per_page_return_what_one_page_would() -> TestResult {
    let t = TestStore::with("read_paging_renewing", |c| {
        c.read_page_size(2).read_snapshot_max_age(Duration::ZERO)
    });
    fill(&t);
    check_paging(&t);
    Ok(())
}

/// Reads that wait for a held-back event (its transaction commits 300 ms later), with
/// pages of 2: the result equals the same read made after the commit.
#[test]
fn paged_reads_that_wait_for_held_back_events_return_what_a_later_read_does() -> TestResult {
    let t = TestStore::with("read_paging_wait", |c| c.read_page_size(2));
    let options: Vec<ReadAll> = vec![
        ReadAll::from_start(),
        ReadAll::backwards(),
        ReadAll::from_start().max_count(5),
        ReadAll::from_start().max_count(2),
        ReadAll::backwards().max_count(5),
        ReadAll::from_start().streams(["x-1", "open"]),
        ReadAll::backwards().streams(["x-1", "open"]),
        ReadAll::from_start().category("x-"),
        ReadAll::backwards().category("x-"),
        ReadAll::from_start().event_types(["T"]),
        ReadAll::backwards().event_types(["T"]),
        ReadAll::from_start().streams(["x-1", "open"]).max_count(3),
    ];
    for (round, o) in options.into_iter().enumerate() {
        for i in 0..5 {
            t.append(
                &format!("x-{}", i % 2),
                ExpectedVersion::Any,
                &events(if i % 2 == 0 { "T" } else { "U" }, 1),
            )?;
        }
        t.wait_all_visible();
        let mut own = crate::common::client();
        own.batch_execute("BEGIN")?;
        t.append_in(&mut own, "open", ExpectedVersion::Any, &events("T", 1))?;
        for i in 0..5 {
            t.append(
                &format!("x-{}", i % 2),
                ExpectedVersion::Any,
                &events(if i % 2 == 0 { "T" } else { "U" }, 1),
            )?;
        }
        let committer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            own.batch_execute("COMMIT").unwrap();
        });
        let got: Vec<u64> = t
            .read_all(o.clone().wait_at_most(Duration::from_secs(10)))?
            .map(|e| e.map(|e| e.position))
            .collect::<Result<_, _>>()?;
        committer.join().unwrap();
        t.wait_all_visible();
        let want = positions(&t, o.clone());
        assert_eq!(got, want, "round {round}: {o:?}");
    }
    Ok(())
}
