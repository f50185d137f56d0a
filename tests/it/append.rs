use std::sync::{Arc, Barrier};
use std::thread;

use crate::common::{events, TestResult, TestStore};
use pg_eventstore::{
    ActualVersion, AppendResult, Error, EventData, ExpectedVersion, ReadAll, ReadStream,
};
use serde::{Deserialize, Serialize};

/// The notes of the outbox table `outbox`, in the order they were written.
fn notes(client: &mut postgres::Client, outbox: &str) -> Vec<String> {
    client
        .query(&format!("SELECT note FROM {outbox} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn versions(t: &TestStore, stream: &str) -> Vec<u64> {
    t.read_stream(stream, ReadStream::forwards())
        .unwrap()
        .map(|e| e.unwrap().version)
        .collect()
}

#[test]
fn no_stream_then_exact_then_conflicts() -> TestResult {
    let t = TestStore::new("append_exp");
    let r = t.append("s", ExpectedVersion::NoStream, &events("A", 2))?;
    assert_eq!((r.first_version, r.last_version), (0, 1));
    assert!(r.first_position < r.last_position);
    assert_eq!(r.last_position, r.first_position + 1);
    assert!(!r.was_duplicate);

    // NoStream on an existing stream.
    match t.append("s", ExpectedVersion::NoStream, &events("B", 1)) {
        Err(Error::WrongExpectedVersion {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, "s");
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, ActualVersion::Exact(1));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Exact with the right version.
    let r = t.append("s", ExpectedVersion::Exact(1), &events("C", 3))?;
    assert_eq!((r.first_version, r.last_version), (2, 4));
    // Exact with a stale version.
    let e = t
        .append("s", ExpectedVersion::Exact(1), &events("D", 1))
        .unwrap_err();
    assert!(e.is_wrong_expected_version());
    assert_eq!(
        e.to_string(),
        "wrong expected version for stream \"s\": expected version 1, but the stream is at version 4"
    );
    // Exact on a missing stream.
    match t.append("missing", ExpectedVersion::Exact(0), &events("D", 1)) {
        Err(Error::WrongExpectedVersion {
            actual: ActualVersion::NoStream,
            ..
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    // StreamExists.
    let r = t.append("s", ExpectedVersion::StreamExists, &events("E", 1))?;
    assert_eq!(r.last_version, 5);
    match t.append("missing", ExpectedVersion::StreamExists, &events("E", 1)) {
        Err(Error::WrongExpectedVersion {
            expected: ExpectedVersion::StreamExists,
            actual: ActualVersion::NoStream,
            ..
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Any, on an existing and on a new stream.
    assert_eq!(
        t.append("s", ExpectedVersion::Any, &events("F", 1))?
            .last_version,
        6
    );
    assert_eq!(
        t.append("new", ExpectedVersion::Any, &events("F", 2))?
            .last_version,
        1
    );

    assert_eq!(versions(&t, "s"), vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(t.stream_version("s")?, Some(6));
    assert_eq!(t.stream_version("missing")?, None);
    assert_eq!(t.count_events(), 9);
    Ok(())
}

#[test]
fn recorded_events_carry_everything() -> TestResult {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Registered {
        user: String,
        age: u32,
    }
    let t = TestStore::new("append_fields");
    let id = uuid::Uuid::now_v7();
    let data = Registered {
        user: "ada".into(),
        age: 36,
    };
    let meta = serde_json::json!({ "correlationId": "c-1", "causationId": "k-9" });
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    let r = t.append(
        "user-1",
        ExpectedVersion::NoStream,
        &[EventData::new("Registered", &data)?
            .id(id)
            .metadata(&meta)?],
    )?;
    let e = t
        .read_stream("user-1", ReadStream::forwards())?
        .next()
        .unwrap()?;
    assert_eq!(e.id, id);
    assert_eq!(e.stream_id, "user-1");
    assert_eq!(e.version, 0);
    assert_eq!(e.position, r.first_position);
    assert_eq!(e.event_type, "Registered");
    assert_eq!(e.data_as::<Registered>()?, data);
    assert_eq!(e.metadata_as::<serde_json::Value>()?, Some(meta));
    assert!(e.recorded_at > before);
    assert_eq!(
        t.append("user-1", ExpectedVersion::Any, &events("X", 1))?
            .last_version,
        1
    );
    let e2 = t
        .read_stream("user-1", ReadStream::backwards().max_count(1))?
        .next()
        .unwrap()?;
    assert_eq!(e2.metadata, None);
    assert_eq!(e2.metadata_as::<serde_json::Value>()?, None);
    Ok(())
}

#[test]
fn two_threads_racing_on_one_stream_exactly_one_wins() -> TestResult {
    let t = TestStore::new("append_race");
    t.append("race", ExpectedVersion::NoStream, &events("Init", 1))?;
    let mut head = 0u64;
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let store = t.store.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    store.append(
                        "race",
                        ExpectedVersion::Exact(head),
                        &events(&format!("T{i}"), 2),
                    )
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        for r in &results {
            match r {
                Ok(ok) => assert_eq!((ok.first_version, ok.last_version), (head + 1, head + 2)),
                // The loser either saw the winner's head or lost on the unique constraint
                // and re-ran: either way it reports the winner's version.
                Err(Error::WrongExpectedVersion { actual, .. }) => {
                    assert_eq!(*actual, ActualVersion::Exact(head + 2))
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        head += 2;
    }
    // Every round added exactly the winner's 2 events.
    assert_eq!(versions(&t, "race"), (0..=head).collect::<Vec<_>>());
    assert_eq!(t.count_events(), 41);
    Ok(())
}

#[test]
fn any_appends_from_many_threads_never_collide() -> TestResult {
    let t = TestStore::new("append_any");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let store = t.store.clone();
            thread::spawn(move || {
                for _ in 0..50 {
                    store
                        .append("hot", ExpectedVersion::Any, &events("E", 1))
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(versions(&t, "hot"), (0..200).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn retrying_with_the_same_ids_returns_the_original_result() -> TestResult {
    let t = TestStore::new("append_idem");
    let batch = events("E", 3);
    let first = t.append("s", ExpectedVersion::NoStream, &batch)?;
    // The reply was "lost": the caller sends the very same append again.
    let again = t.append("s", ExpectedVersion::NoStream, &batch)?;
    assert!(again.was_duplicate);
    assert_eq!(
        (
            again.first_version,
            again.last_version,
            again.first_position,
            again.last_position
        ),
        (
            first.first_version,
            first.last_version,
            first.first_position,
            first.last_position
        )
    );
    assert_eq!(t.count_events(), 3);
    // With `Any` the version check passes and the insert itself meets the stored ids.
    let any = t.append("s", ExpectedVersion::Any, &batch)?;
    assert!(any.was_duplicate);
    assert_eq!(any.last_position, first.last_position);
    assert_eq!(t.count_events(), 3);
    // Reusing one of the ids for something else is refused, and writes nothing.
    let reused = vec![EventData::json("X", serde_json::json!({})).id(batch[1].event_id())];
    match t.append("s", ExpectedVersion::Any, &reused) {
        Err(Error::DuplicateEventId { id, .. }) => assert_eq!(id, batch[1].event_id()),
        other => panic!("expected a duplicate id error, got {other:?}"),
    }
    match t.append("other", ExpectedVersion::Any, &batch) {
        Err(Error::DuplicateEventId { .. }) => {}
        other => panic!("expected a duplicate id error, got {other:?}"),
    }
    assert_eq!(t.count_events(), 3);
    Ok(())
}

#[test]
fn append_inside_the_callers_transaction() -> TestResult {
    let t = TestStore::new("append_tx");
    let mut conn = t.pool().get()?;
    conn.batch_execute(&format!(
        "CREATE TABLE \"{}\".outbox (id serial, note text)",
        t.schema
    ))?;
    let outbox = format!("INSERT INTO \"{}\".outbox (note) VALUES ($1)", t.schema);

    // Committed: the outbox row and the events land together.
    let mut tx = conn.transaction()?;
    tx.execute(&outbox, &[&"committed"])?;
    let r = t.append_in(&mut tx, "acc", ExpectedVersion::NoStream, &events("A", 2))?;
    assert_eq!(r.last_version, 1);
    // Not visible to others before the commit.
    assert_eq!(t.stream_version("acc")?, None);
    // A second append in the same transaction continues the stream and the positions.
    let r2 = t.append_in(&mut tx, "acc", ExpectedVersion::Exact(1), &events("B", 1))?;
    assert_eq!(r2.last_version, 2);
    assert_eq!(r2.first_position, r.last_position + 1);
    tx.commit()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2]);

    // Rolled back: neither the outbox row nor the events remain.
    let mut tx = conn.transaction()?;
    tx.execute(&outbox, &[&"rolled back"])?;
    t.append_in(&mut tx, "acc", ExpectedVersion::Exact(2), &events("C", 5))?;
    t.append_in(&mut tx, "other", ExpectedVersion::NoStream, &events("C", 1))?;
    tx.rollback()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2]);
    assert_eq!(t.stream_version("other")?, None);
    let notes: Vec<String> = conn
        .query(&format!("SELECT note FROM \"{}\".outbox", t.schema), &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, vec!["committed"]);

    // A conflict inside a transaction is reported with the version that won.
    let mut tx = conn.transaction()?;
    match t.append_in(&mut tx, "acc", ExpectedVersion::Exact(0), &events("D", 1)) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Exact(2))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    drop(tx);
    assert_eq!(t.count_events(), 3);
    Ok(())
}

/// The first write of a transaction takes a lean statement inside the `append_in`
/// functions (no id yet, no stored id among the events); every other case the full one.
/// Each outcome of the first must match the full statement's.
#[test]
fn the_first_append_of_a_transaction_reports_what_the_full_statement_does() -> TestResult {
    let t = TestStore::new("append_tx_first");
    let mut conn = t.pool().get()?;
    let xid = |tx: &mut pg_eventstore::postgres::Transaction<'_>| -> i64 {
        tx.query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .unwrap()
            .get(0)
    };

    // A new stream, then more of it in the same transaction: positions from the
    // transaction's id, in order.
    let mut tx = conn.transaction()?;
    let r = t.append_in(&mut tx, "s", ExpectedVersion::NoStream, &events("A", 3))?;
    let id = xid(&mut tx);
    assert_eq!((r.first_version, r.last_version), (0, 2));
    assert_eq!(r.first_position, (id as u64) << 20);
    assert_eq!(r.last_position, r.first_position + 2);
    let r2 = t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("B", 1))?;
    assert_eq!(
        (r2.first_version, r2.first_position),
        (3, r.last_position + 1)
    );
    tx.commit()?;
    assert_eq!(versions(&t, "s"), vec![0, 1, 2, 3]);

    // Every expectation, as the first write: a wrong one reports the actual version and
    // leaves the transaction usable.
    for (expected, ok) in [
        (ExpectedVersion::NoStream, false),
        (ExpectedVersion::Exact(2), false),
        (ExpectedVersion::StreamExists, true),
    ] {
        let mut tx = conn.transaction()?;
        match t.append_in(&mut tx, "s", expected, &events("C", 1)) {
            Ok(r) => assert!(ok && r.first_version == 4, "{expected:?}: {r:?}"),
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                assert!(!ok, "{expected:?}");
                assert_eq!(actual, ActualVersion::Exact(3));
                assert_eq!(tx.query_one("SELECT 1", &[])?.get::<_, i32>(0), 1);
            }
            Err(e) => panic!("{expected:?}: {e}"),
        }
        tx.rollback()?;
    }

    // A repeat of stored events as the first write is recognised as one, writes nothing
    // and gives the stored positions; a stored id among new ones is refused.
    let stored: Vec<EventData> = events("D", 2);
    let first = t.append("d", ExpectedVersion::NoStream, &stored)?;
    let mut tx = conn.transaction()?;
    let again = t.append_in(&mut tx, "d", ExpectedVersion::NoStream, &stored)?;
    assert!(again.was_duplicate);
    assert_eq!(
        (again.first_position, again.last_version),
        (first.first_position, 1)
    );
    let mixed = [events("E", 1).remove(0), stored[1].clone()];
    match t.append_in(&mut tx, "d", ExpectedVersion::Any, &mixed) {
        Err(Error::DuplicateEventId { id, .. }) => assert_eq!(id, stored[1].event_id()),
        other => panic!("expected a duplicate id, got {other:?}"),
    }
    tx.commit()?;
    assert_eq!(versions(&t, "d"), vec![0, 1]);

    // A tombstoned stream refuses the first write too.
    t.tombstone_stream("d", ExpectedVersion::Any)?;
    let mut tx = conn.transaction()?;
    match t.append_in(&mut tx, "d", ExpectedVersion::Any, &events("F", 1)) {
        Err(Error::StreamDeleted { .. }) => {}
        other => panic!("expected a deleted stream, got {other:?}"),
    }
    drop(tx);
    Ok(())
}

#[test]
fn racing_inside_transactions_reports_a_conflict() -> TestResult {
    let t = TestStore::new("append_tx_race");
    t.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
    let mut c1 = t.pool().get()?;
    let mut tx1 = c1.transaction()?;
    t.append_in(&mut tx1, "s", ExpectedVersion::Exact(0), &events("B", 1))?;
    // Two events: the full statement, which fails on the unique key and aborts the
    // loser's transaction; the version is read on an idle pooled connection.
    let loser = lose_race(&t, 2, false)?;
    assert!(
        crate::common::server::wait_until(std::time::Duration::from_secs(10), || {
            t.pool().state().idle_connections > 0
        })
        .is_some()
    );
    tx1.commit()?;
    let (result, _, usable) = loser.join().unwrap();
    match result {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Exact(1))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(!usable, "the failed statement aborted the transaction");
    assert_eq!(versions(&t, "s"), vec![0, 1]);
    Ok(())
}

#[test]
fn a_lost_race_for_one_event_reports_the_version_and_keeps_the_transaction() -> TestResult {
    // One event as the transaction's first write: the statement waits for the winner,
    // writes nothing instead of failing, and the full statement reads the version that
    // won, in the loser's own transaction. Two events take the full statement, which
    // fails and aborts the transaction. The same through `append_in` and through a
    // `StoreTransaction`.
    for (n, kept, store_transaction) in [
        (1, true, false),
        (1, true, true),
        (2, false, false),
        (2, false, true),
    ] {
        let t = TestStore::with(
            &format!("append_tx_race_first_{n}_{store_transaction}"),
            |c| c.max_connections(1).min_idle(0),
        );
        t.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
        let mut winner = crate::common::client();
        let mut tx1 = winner.transaction()?;
        t.append_in(&mut tx1, "s", ExpectedVersion::Exact(0), &events("B", 1))?;
        let loser = lose_race(&t, n, store_transaction)?;
        tx1.commit()?;
        let (result, _, usable) = loser.join().unwrap();
        match result {
            Err(Error::WrongExpectedVersion { actual, .. }) if kept => {
                assert_eq!(actual, ActualVersion::Exact(1))
            }
            // The pool's one connection is the loser's.
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                assert_eq!(actual, ActualVersion::Unknown)
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            usable, kept,
            "{n} events, StoreTransaction {store_transaction}: usable afterwards"
        );
        assert_eq!(versions(&t, "s"), vec![0, 1]);
    }
    Ok(())
}

type Loser = thread::JoinHandle<(
    pg_eventstore::Result<AppendResult>,
    std::time::Instant,
    bool,
)>;

/// Starts an append of `n` events from version 1 on to stream "s" in a transaction on a
/// pooled connection, once a transaction of the caller holds that version, and returns
/// when it waits for that transaction.
/// With `store_transaction`, it appends with `StoreTransaction::append`, else with
/// `Store::append_in`.
fn lose_race(t: &TestStore, n: usize, store_transaction: bool) -> pg_eventstore::Result<Loser> {
    let mut conn = t.store.connection()?;
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let store = t.store.clone();
    let loser = thread::spawn(move || {
        let mut tx = conn.transaction().unwrap();
        // Blocks on the unique constraint until the winner commits.
        let (expected, events) = (ExpectedVersion::Exact(0), events("C", n));
        let result = if store_transaction {
            tx.append("s", expected, &events)
        } else {
            store.append_in(&mut *tx, "s", expected, &events)
        };
        let at = std::time::Instant::now();
        let usable = tx.query_one("SELECT 1", &[]).is_ok();
        (result, at, usable)
    });
    wait_for_lock(pid);
    Ok(loser)
}

/// Waits until backend `pid` waits for a lock.
fn wait_for_lock(pid: i32) {
    let mut c = crate::common::client();
    let waiting = crate::common::server::wait_until(std::time::Duration::from_secs(10), || {
        c.query_one(
            "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .is_ok_and(|r| r.get::<_, bool>(0))
    });
    assert!(waiting.is_some(), "backend {pid} never waited for a lock");
}

/// Through `append_in` (the function waits for the stream's lock, then appends) and
/// through a `StoreTransaction` (its statement finds the lock taken and writes nothing,
/// then the function waits): the waiting append comes after the one it waited for, and
/// its transaction goes on. Also on a store still at schema version 9, whose function
/// waits inside its statement and then runs the full one.
#[test]
fn any_inside_a_transaction_waits_for_a_concurrent_append_instead_of_failing() -> TestResult {
    for schema_9 in [false, true] {
        for store_transaction in [false, true] {
            let mut t = TestStore::new(&format!(
                "append_in_any_race_{}_{store_transaction}",
                if schema_9 { 9 } else { 10 }
            ));
            if schema_9 {
                back_to_schema_9(&mut t)?;
                assert_eq!(t.schema_version()?, 9);
            }
            wait_then_append(&t, store_transaction)?;
        }
    }
    Ok(())
}

/// `append_in` calls the functions that return one record (schema version 15), for the
/// first write of a transaction and for the full statement after it; a store still at
/// version 14 (they are missing) calls the functions that return a table. Both give the
/// same results.
#[test]
fn append_in_calls_the_functions_that_return_a_record_and_at_version_14_the_others() -> TestResult {
    let t = TestStore::new("append_in_record");
    // Appends in one transaction on a client of its own, and the functions of the schema
    // that the transaction called (with their calls).
    let appends = |store: &pg_eventstore::Store,
                   stream: &str|
     -> Result<Vec<(String, i64)>, Error> {
        let mut c = crate::common::client();
        let mut tx = c.transaction()?;
        tx.batch_execute("SET LOCAL track_functions = 'pl'")?;
        let first = store.append_in(&mut tx, stream, ExpectedVersion::NoStream, &events("A", 1))?;
        let second = store.append_in(&mut tx, stream, ExpectedVersion::Any, &events("B", 2))?;
        let stored = events("C", 1);
        let third = store.append_in(&mut tx, stream, ExpectedVersion::Exact(2), &stored)?;
        let again = store.append_in(&mut tx, stream, ExpectedVersion::Exact(2), &stored)?;
        assert_eq!((first.first_version, first.last_version), (0, 0));
        assert_eq!((second.first_version, second.last_version), (1, 2));
        assert_eq!(second.first_position, first.last_position + 1);
        assert_eq!(third.last_version, 3);
        assert!(again.was_duplicate && again.first_position == third.first_position);
        match store.append_in(&mut tx, stream, ExpectedVersion::Exact(1), &events("D", 1)) {
            Err(Error::WrongExpectedVersion { actual, .. }) => {
                assert_eq!(actual, ActualVersion::Exact(3))
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        let called = tx
            .query(
                "SELECT funcname::text, calls FROM pg_stat_xact_user_functions
                  WHERE schemaname = $1 ORDER BY funcname",
                &[&t.schema],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit()?;
        Ok(called)
    };
    // In the order of their names: `Any` once, the other four times.
    let called = |names: [&str; 2]| vec![(names[0].to_string(), 1), (names[1].to_string(), 4)];
    assert_eq!(
        appends(&t.store, "s")?,
        called(["append_in_any_record", "append_in_events_record"])
    );
    let args = "(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)";
    crate::common::client().batch_execute(&format!(
        "DROP FUNCTION \"{s}\".append_in_events_record{args};
         DROP FUNCTION \"{s}\".append_in_any_record{args};
         DELETE FROM \"{s}\".schema_migrations WHERE version = 15",
        s = t.schema
    ))?;
    let at_14 = pg_eventstore::Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .connect()?;
    assert_eq!(at_14.schema_version()?, 14);
    assert_eq!(
        appends(&at_14, "t")?,
        called(["append_in_any", "append_in_events"])
    );
    assert_eq!(versions(&t, "s"), versions(&t, "t"));
    Ok(())
}

/// Puts `t`'s `append_in` functions back as schema version 9 made them, without those
/// of version 15, and connects `t` again (a store reads the version as it connects).
fn back_to_schema_9(t: &mut TestStore) -> TestResult {
    let script = pg_eventstore::migration_sql(&t.schema, "schema_migrations")?;
    let start = script.find("\n-- 0009 ").expect("step 9 in the script");
    let end = script.find("\n-- 0010 ").expect("step 10 in the script");
    let args = "(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)";
    crate::common::client().batch_execute(&format!(
        "DELETE FROM \"{s}\".schema_migrations WHERE version >= 9; {}
         DROP FUNCTION \"{s}\".append_in_events_record{args};
         DROP FUNCTION \"{s}\".append_in_any_record{args};",
        &script[start..end],
        s = t.schema,
    ))?;
    t.store = pg_eventstore::Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .connect()?;
    // Version 9's `append_in_any` takes the stream's lock inside its statement.
    let source: String = crate::common::client()
        .query_one(
            "SELECT prosrc FROM pg_proc
              WHERE proname = 'append_in_any' AND pronamespace = $1::text::regnamespace",
            &[&t.schema],
        )?
        .get(0);
    assert!(source.contains("WHEN pg_advisory_xact_lock("));
    Ok(())
}

fn wait_then_append(t: &TestStore, store_transaction: bool) -> TestResult {
    t.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
    let mut c1 = t.pool().get()?;
    let mut tx1 = c1.transaction()?;
    t.append_in(&mut tx1, "s", ExpectedVersion::Any, &events("B", 1))?;
    let mut conn = t.store.connection()?;
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let store = t.store.clone();
    let second = thread::spawn(move || -> pg_eventstore::Result<_> {
        let mut tx = conn.transaction()?;
        let r = if store_transaction {
            tx.append("s", ExpectedVersion::Any, &events("C", 1))?
        } else {
            store.append_in(&mut *tx, "s", ExpectedVersion::Any, &events("C", 1))?
        };
        // The transaction is usable afterwards: a second append in it.
        let r2 = if store_transaction {
            tx.append("t", ExpectedVersion::NoStream, &events("D", 1))?
        } else {
            store.append_in(&mut *tx, "t", ExpectedVersion::NoStream, &events("D", 1))?
        };
        tx.commit()?;
        Ok((r, r2))
    });
    wait_for_lock(pid);
    let first = t.append_in(&mut tx1, "u", ExpectedVersion::Any, &events("E", 1))?;
    tx1.commit()?;
    let (r, r2) = second.join().unwrap()?;
    assert_eq!(r.last_version, 2, "StoreTransaction {store_transaction}");
    assert_eq!(r2.last_version, 0);
    assert!(r.first_position > first.last_position);
    assert_eq!(versions(t, "s"), vec![0, 1, 2]);
    assert_eq!(versions(t, "t"), vec![0]);
    Ok(())
}

/// 6 threads append with `Any` inside their own transactions to 3 shared streams, a
/// fifth of the transactions rolled back, some after writing another table first (so
/// that they hold an id before they append): no version conflict ever, every stream's
/// versions without gaps, and every refusal of the per-stream order counted.
#[test]
fn any_inside_transactions_on_shared_streams_never_reports_a_version_conflict() -> TestResult {
    let t = TestStore::with("append_in_any_many", |c| c.max_connections(8));
    let s = format!("\"{}\"", t.schema);
    crate::common::client().batch_execute(&format!("CREATE TABLE {s}.other (x int)"))?;
    let handles: Vec<_> = (0..6u64)
        .map(|w| {
            let store = t.store.clone();
            let other = format!("INSERT INTO {s}.other VALUES (1)");
            thread::spawn(move || -> pg_eventstore::Result<(u64, u64, u64)> {
                let mut rng = crate::common::Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                let mut conn = store.pool().get().expect("a pooled connection");
                let (mut committed, mut order, mut feed) = (0, 0, 0);
                for _ in 0..150 {
                    let stream = format!("hot-{}", rng.next() % 3);
                    let mut tx = conn.transaction()?;
                    let early_id = rng.next() % 4 == 0;
                    if early_id {
                        tx.batch_execute(&other)?;
                    }
                    match store.append_in(&mut tx, &stream, ExpectedVersion::Any, &events("E", 1)) {
                        Ok(_) => {}
                        // Only a transaction that had its id before it waited for the
                        // stream can be older than the head it then finds.
                        Err(e @ Error::StreamOrderConflict { .. }) => {
                            assert!(early_id, "refused an append-first transaction: {e}");
                            order += 1;
                            continue;
                        }
                        Err(Error::FeedOrderConflict { .. }) => {
                            feed += 1;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    thread::sleep(std::time::Duration::from_micros(rng.next() % 1000));
                    if rng.next() % 5 == 0 {
                        tx.rollback()?;
                    } else {
                        tx.commit()?;
                        committed += 1;
                    }
                }
                Ok((committed, order, feed))
            })
        })
        .collect();
    let (mut committed, mut order, mut feed) = (0, 0, 0);
    for h in handles {
        let (c, o, f) = h.join().unwrap()?;
        committed += c;
        order += o;
        feed += f;
    }
    let mut total = 0;
    for k in 0..3 {
        let v = versions(&t, &format!("hot-{k}"));
        assert_eq!(v, (0..v.len() as u64).collect::<Vec<_>>());
        total += v.len() as u64;
    }
    assert_eq!(total, committed);
    eprintln!(
        "append_in Any on 3 shared streams: {committed} committed, 0 version conflicts, \
         {order} stream-order refusals, {feed} feed-order refusals, of 900 transactions"
    );
    Ok(())
}

#[test]
fn a_lost_race_inside_a_transaction_never_reports_a_wrong_version() -> TestResult {
    // One pooled connection, held by the loser's own transaction: the stream's version
    // cannot be read anywhere else without waiting for the pool.
    let t = TestStore::with("append_tx_race_one", |c| {
        c.max_connections(1)
            .min_idle(0)
            .connection_timeout(std::time::Duration::from_secs(30))
    });
    t.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
    let mut winner = crate::common::client();
    let mut tx1 = winner.transaction()?;
    t.append_in(&mut tx1, "s", ExpectedVersion::Exact(0), &events("B", 1))?;
    // Two events: the full statement fails on the unique key. (One event would wait and
    // then read the version in its own transaction.)
    let loser = lose_race(&t, 2, false)?;
    let committed = std::time::Instant::now();
    tx1.commit()?;
    let (result, failed, _) = loser.join().unwrap();
    match result {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Unknown)
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // It did not wait for the pool's connection timeout to find that out.
    let took = failed - committed;
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    assert_eq!(versions(&t, "s"), vec![0, 1]);
    Ok(())
}

#[test]
fn positions_follow_the_read_order() -> TestResult {
    let t = TestStore::new("append_pos");
    let a = t.append("a", ExpectedVersion::Any, &events("E", 2))?;
    let b = t.append("b", ExpectedVersion::Any, &events("E", 2))?;
    assert!(b.first_position > a.last_position);
    crate::common::wait_visible(&t, b.last_position);
    let all: Vec<_> = t
        .read_all(ReadAll::from_start())?
        .map(|e| e.unwrap().position)
        .collect();
    assert_eq!(
        all,
        vec![
            a.first_position,
            a.last_position,
            b.first_position,
            b.last_position
        ]
    );
    assert_eq!(t.head_position()?, Some(b.last_position));
    Ok(())
}

#[test]
fn snapshots_keep_the_newest() -> TestResult {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Balance(u64);
    let t = TestStore::new("snapshots");
    assert!(t.load_snapshot::<Balance>("acc")?.is_none());
    t.save_snapshot("acc", 10, &Balance(100))?;
    t.save_snapshot("acc", 5, &Balance(50))?; // older: ignored
    let s = t.load_snapshot::<Balance>("acc")?.unwrap();
    assert_eq!((s.version, s.state), (10, Balance(100)));
    t.save_snapshot("acc", 12, &Balance(120))?;
    assert_eq!(
        t.load_snapshot::<Balance>("acc")?.unwrap().state,
        Balance(120)
    );
    Ok(())
}

/// `Store::connection` and `StoreTransaction::append`: `append_in` with the statement
/// prepared once per pooled connection, not parsed on every call.
#[test]
fn a_store_transaction_appends_with_a_statement_prepared_once() -> TestResult {
    let t = TestStore::with("append_store_tx", |c| c.max_connections(1));
    let outbox = format!("\"{}\".outbox", t.schema);
    t.pool()
        .get()?
        .batch_execute(&format!("CREATE TABLE {outbox} (id serial, note text)"))?;
    let insert = format!("INSERT INTO {outbox} (note) VALUES ($1)");
    // Read on a connection of its own: the pool's only one is taken.
    let stored = |stream: &str| -> Vec<i64> {
        crate::common::client()
            .query(
                &format!(
                    "SELECT stream_version FROM \"{}\".events WHERE stream_id = $1
                      ORDER BY stream_version",
                    t.schema
                ),
                &[&stream],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // The names of the append statements prepared on this connection that call
    // `function`.
    let prepared = |c: &mut postgres::Client, function: &str| -> Vec<String> {
        c.query(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE $1",
            &[&format!("%.{function}(%")],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };

    // Committed: the outbox row and the events land together; the second append of
    // the transaction continues the stream.
    let mut conn = t.connection()?;
    let mut tx = conn.transaction()?;
    tx.execute(&insert, &[&"committed"])?;
    let r = tx.append("acc", ExpectedVersion::NoStream, &events("A", 2))?;
    assert_eq!((r.first_version, r.last_version), (0, 1));
    let r2 = tx.append("acc", ExpectedVersion::Exact(1), &events("B", 1))?;
    assert_eq!(r2.first_position, r.last_position + 1);
    tx.append("other", ExpectedVersion::Any, &events("B", 1))?;
    // A wrong expected version found by the statement leaves the transaction usable.
    match tx.append("acc", ExpectedVersion::Exact(0), &events("X", 1)) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Exact(2))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    tx.commit()?;
    assert_eq!(stored("acc"), vec![0, 1, 2]);
    assert_eq!(stored("other"), vec![0]);
    let names = [
        prepared(&mut conn, "append_in_events_record"),
        prepared(&mut conn, "append_in_any_record"),
    ];
    assert!(names.iter().all(|n| n.len() == 1), "{names:?}");

    // Rolled back, and dropped: nothing remains of either.
    let mut tx = conn.transaction()?;
    tx.execute(&insert, &[&"rolled back"])?;
    tx.append("acc", ExpectedVersion::Exact(2), &events("C", 5))?;
    tx.rollback()?;
    let mut tx = conn.transaction()?;
    tx.append("acc", ExpectedVersion::Any, &events("C", 5))?;
    drop(tx);
    assert_eq!(stored("acc"), vec![0, 1, 2]);
    assert_eq!(notes(&mut conn, &outbox), vec!["committed"]);

    // Back in the pool and out again (the pool has one connection): the statements are
    // still there, and are not prepared again.
    drop(conn);
    let mut conn = t.connection()?;
    let mut tx = conn.transaction()?;
    tx.append("acc", ExpectedVersion::Exact(2), &events("D", 1))?;
    tx.append("other", ExpectedVersion::Any, &events("D", 1))?;
    tx.commit()?;
    assert_eq!(stored("acc"), vec![0, 1, 2, 3]);
    let again = [
        prepared(&mut conn, "append_in_events_record"),
        prepared(&mut conn, "append_in_any_record"),
    ];
    assert_eq!(again, names, "prepared again");
    Ok(())
}

/// A `DISCARD ALL` on a `StoreConnection` drops the statements the store prepared there:
/// the next `StoreTransaction::append` is refused with `Error::NotPreparedHere` and
/// forgets them, and the next appends, in a transaction and through the pool on the same
/// connection, prepare them again.
#[test]
fn a_store_transaction_after_discard_all_is_refused_once_then_prepares_again() -> TestResult {
    let t = TestStore::with("append_store_tx_discard", |c| c.max_connections(1));
    let mut conn = t.connection()?;
    let mut tx = conn.transaction()?;
    tx.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
    tx.commit()?;
    conn.batch_execute("DISCARD ALL")?;
    let mut tx = conn.transaction()?;
    let refused = tx.append("s", ExpectedVersion::Exact(0), &events("B", 1));
    assert!(
        matches!(refused, Err(Error::NotPreparedHere { .. })),
        "{refused:?}"
    );
    drop(tx);
    let mut tx = conn.transaction()?;
    tx.append("s", ExpectedVersion::Exact(0), &events("C", 1))?;
    tx.commit()?;
    drop(conn);
    // The pool's one connection, with the statements it keeps.
    t.append("s", ExpectedVersion::Exact(1), &events("D", 1))?;
    assert_eq!(versions(&t, "s"), vec![0, 1, 2]);
    Ok(())
}

/// A `DISCARD ALL` on a `StoreConnection` drops the statements the pool had prepared on
/// that connection. The pool's next call on it fails once on the missing statement
/// (SQLSTATE 26000), which makes the pool prepare its statements again and is retried:
/// appends, reads and the stream's version each go on working, where before every later
/// call of the kind failed on that connection.
#[test]
fn pool_calls_after_discard_all_on_their_connection_prepare_again() -> TestResult {
    let t = TestStore::with("append_pool_discard", |c| c.max_connections(1));
    let mut expected = 0;
    let warm = |t: &TestStore, expected: &mut u64| -> TestResult {
        t.append("s", ExpectedVersion::Exact(*expected), &events("A", 1))?;
        *expected += 1;
        assert_eq!(t.stream_version("s")?, Some(*expected));
        assert_eq!(versions(t, "s").len() as u64, *expected + 1);
        Ok(())
    };
    t.append("s", ExpectedVersion::NoStream, &events("A", 1))?;
    warm(&t, &mut expected)?;
    for call in ["append", "stream_version", "read_stream"] {
        // The pool's one connection.
        let mut conn = t.connection()?;
        conn.batch_execute("DISCARD ALL")?;
        drop(conn);
        match call {
            "append" => {
                t.append("s", ExpectedVersion::Exact(expected), &events("B", 1))?;
                expected += 1;
            }
            "stream_version" => assert_eq!(t.stream_version("s")?, Some(expected)),
            _ => assert_eq!(versions(&t, "s").len() as u64, expected + 1),
        }
        warm(&t, &mut expected)?;
    }
    assert_eq!(versions(&t, "s"), (0..=expected).collect::<Vec<_>>());
    Ok(())
}

/// A `DISCARD ALL` also resets the session setup that makes the store's connections
/// `READ COMMITTED` where the role defaults to `SERIALIZABLE` (OPERATIONS.md). The one
/// failed call it costs makes every pooled connection run that setup again: afterwards
/// the connection is at `READ COMMITTED`, and the retried `$all` read is not held back
/// by a transaction in another database.
#[test]
fn pooled_connections_are_read_committed_again_after_discard_all() -> TestResult {
    let t = TestStore::new("append_discard_level");
    let role = format!("pges_serializable_{}", std::process::id());
    crate::common::client().batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         ALTER ROLE {role} SET default_transaction_isolation = 'serializable';
         GRANT USAGE ON SCHEMA \"{s}\" TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA \"{s}\" TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA \"{s}\" TO {role};",
        s = t.schema
    ))?;
    let _drop = crate::subscribe::DropRole(role.clone());
    let mut pg: postgres::Config = crate::common::database_url().parse()?;
    pg.user(&role);
    // One connection, so that the read meets the dropped statements.
    let store = pg_eventstore::Config::from_pg(pg)
        .schema(&t.schema)
        .max_connections(1)
        .connect()?;
    // A transaction in another database holds an id; an event commits after it.
    let holder = crate::common::XidHolder::in_other_database();
    t.append("s", ExpectedVersion::Any, &events("E", 1))?;
    let read = || -> pg_eventstore::Result<usize> {
        Ok(store
            .read_all(ReadAll::from_start().wait_at_most(std::time::Duration::from_millis(300)))?
            .collect::<pg_eventstore::Result<Vec<_>>>()?
            .len())
    };
    let level = || -> pg_eventstore::Result<String> {
        let mut c = store.connection()?;
        Ok(c.query_one("SHOW transaction_isolation", &[])?.get(0))
    };
    assert_eq!(level()?, "read committed");
    // The reads' statements are prepared (the first read learns of the other database's
    // transaction, the second prepares the statement that passes it).
    assert_eq!(read()?, 1);
    assert_eq!(read()?, 1);
    store.connection()?.batch_execute("DISCARD ALL")?;
    // The read meets a dropped statement, and is retried.
    let after = read();
    let after_level = level()?;
    drop(store);
    drop(holder);
    assert!(matches!(after, Ok(1)), "read after DISCARD ALL: {after:?}");
    assert_eq!(after_level, "read committed");
    Ok(())
}

/// `Store::prepared_appends`: `append_in` on a connection of the caller's, with the
/// statements prepared there once and kept; given another connection (or one that has
/// dropped them), the append fails with `Error::NotPreparedHere`, writes nothing, and
/// the next call prepares the statements on the connection it is given.
#[test]
fn prepared_appends_prepare_once_on_your_connection_and_refuse_another() -> TestResult {
    let t = TestStore::new("append_prepared");
    let outbox = format!("\"{}\".outbox", t.schema);
    let mut a = crate::common::client();
    a.batch_execute(&format!("CREATE TABLE {outbox} (id serial, note text)"))?;
    let insert = format!("INSERT INTO {outbox} (note) VALUES ($1)");
    // The names of the statements prepared on `c` that call the two functions.
    let prepared = |c: &mut postgres::Client| -> [Vec<String>; 2] {
        ["append_in_events_record", "append_in_any_record"].map(|function| {
            c.query(
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE $1",
                &[&format!("%\"{}\".{function}(%", t.schema)],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
        })
    };
    let mut appends = t.store.prepared_appends();

    // On `a`: the outbox row and the events commit together; a wrong expected version
    // for one event leaves the transaction usable.
    let mut tx = a.transaction()?;
    tx.execute(&insert, &[&"committed"])?;
    let r = appends.append(&mut tx, "acc", ExpectedVersion::NoStream, &events("A", 2))?;
    assert_eq!((r.first_version, r.last_version), (0, 1));
    appends.append(&mut tx, "acc", ExpectedVersion::Exact(1), &events("B", 1))?;
    appends.append(&mut tx, "other", ExpectedVersion::Any, &events("B", 1))?;
    match appends.append(&mut tx, "acc", ExpectedVersion::Exact(0), &events("X", 1)) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, ActualVersion::Exact(2))
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    tx.commit()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2]);
    assert_eq!(versions(&t, "other"), vec![0]);
    let names = prepared(&mut a);
    assert!(names.iter().all(|n| n.len() == 1), "{names:?}");

    // Again on `a`: the same statements, not prepared again.
    let mut tx = a.transaction()?;
    appends.append(&mut tx, "acc", ExpectedVersion::Exact(2), &events("C", 1))?;
    appends.append(&mut tx, "other", ExpectedVersion::Any, &events("C", 1))?;
    appends.append(&mut tx, "new", ExpectedVersion::NoStream, &events("C", 3))?;
    tx.commit()?;
    assert_eq!(prepared(&mut a), names, "prepared again");

    // On another connection: refused, nothing written, the transaction aborted.
    let mut b = crate::common::client();
    let mut tx = b.transaction()?;
    tx.execute(&insert, &[&"on b"])?;
    match appends.append(&mut tx, "acc", ExpectedVersion::Any, &events("D", 1)) {
        Err(e @ Error::NotPreparedHere { .. }) => {
            assert_eq!(
                e.code(),
                Some(&postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME)
            );
            assert!(
                e.to_string().contains("not prepared on this connection"),
                "{e}"
            );
        }
        other => panic!("expected NotPreparedHere, got {other:?}"),
    }
    assert!(
        tx.query_one("SELECT 1", &[]).is_err(),
        "the transaction goes on"
    );
    tx.rollback()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2, 3]);
    // The next call prepares the statements on `b`, and then `a` is the other one.
    let mut tx = b.transaction()?;
    appends.append(&mut tx, "acc", ExpectedVersion::Any, &events("E", 1))?;
    tx.commit()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2, 3, 4]);
    let on_b: i64 = b
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE $1",
            &[&format!("%\"{}\".%", t.schema)],
        )?
        .get(0);
    assert!(on_b > 0, "nothing prepared on the second connection");
    // An append on `c` that is refused; its transaction rolls back on drop.
    let refused = |appends: &mut pg_eventstore::PreparedAppends, c: &mut postgres::Client| {
        let mut tx = c.transaction().unwrap();
        let r = appends.append(&mut tx, "acc", ExpectedVersion::Any, &events("F", 1));
        assert!(matches!(r, Err(Error::NotPreparedHere { .. })), "{r:?}");
    };
    refused(&mut appends, &mut a);

    // A session that dropped its prepared statements is refused once, then served.
    let mut tx = b.transaction()?;
    appends.append(&mut tx, "acc", ExpectedVersion::Any, &events("G", 1))?;
    tx.commit()?;
    b.batch_execute("DISCARD ALL")?;
    refused(&mut appends, &mut b);
    let mut tx = b.transaction()?;
    appends.append(&mut tx, "acc", ExpectedVersion::Any, &events("I", 1))?;
    tx.commit()?;
    assert_eq!(versions(&t, "acc"), vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(notes(&mut a, &outbox), vec!["committed"]);
    Ok(())
}

/// With a `lock_timeout` on the store's sessions shorter than a caller's transaction that
/// holds a stream's lock, an `Any` append to that stream through the pool is refused by
/// the server (SQLSTATE 55P03) until the lock is free: it is retried like any transient
/// failure, and goes in once. (Before, the first refusal was the caller's error.)
#[test]
fn an_any_append_through_the_pool_retries_a_lock_timeout() -> TestResult {
    let t = TestStore::new("append_lock_timeout");
    let mut pg: pg_eventstore::postgres::Config = crate::common::database_url().parse()?;
    pg.options("-c lock_timeout=100");
    let store = pg_eventstore::Store::connect(
        pg_eventstore::Config::from_pg(pg)
            .schema(&t.schema)
            .max_connections(2)
            .retry_delay(std::time::Duration::from_millis(100)),
    )?;
    let mut client = crate::common::client();
    let mut tx = client.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("A", 1))?;
    let appending = thread::spawn(move || store.append("s", ExpectedVersion::Any, &events("B", 1)));
    thread::sleep(std::time::Duration::from_millis(400));
    tx.commit()?;
    let r = appending.join().unwrap()?;
    assert_eq!(r.last_version, 1);
    assert_eq!(versions(&t, "s"), vec![0, 1]);
    Ok(())
}

// The append paths side by side: the pool, `append_in`, a `StoreTransaction` and
// `PreparedAppends`.

pub(crate) fn path_ev(t: &str, i: usize) -> EventData {
    EventData::json(t, serde_json::json!({ "i": i }))
}

fn outcome(r: pg_eventstore::Result<pg_eventstore::AppendResult>) -> String {
    match r {
        Ok(a) => format!(
            "Ok(v{}..v{} dup={} n={})",
            a.first_version,
            a.last_version,
            a.was_duplicate,
            a.last_position - a.first_position + 1
        ),
        Err(Error::WrongExpectedVersion {
            expected, actual, ..
        }) => format!("WrongExpectedVersion(expected {expected:?}, actual {actual:?})"),
        Err(Error::DuplicateEventId { .. }) => "DuplicateEventId".into(),
        Err(Error::StreamDeleted { .. }) => "StreamDeleted".into(),
        Err(Error::NotMigrated { .. }) => "NotMigrated".into(),
        Err(e) => format!("other: {}", e.report()),
    }
}

#[derive(Clone, Copy, Debug)]
enum Before {
    Empty,
    Exists,
    Deleted,
    Tombstoned,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum AppendPath {
    Pool,
    AppendIn,
    StoreTx,
    Prepared,
}

/// The stream as `s` leaves it, its three events with the ids `ids`.
fn set_up(t: &pg_eventstore::Store, stream: &str, s: Before, ids: &[uuid::Uuid; 3]) {
    let three: Vec<EventData> = (0..3).map(|i| path_ev("Setup", i).id(ids[i])).collect();
    match s {
        Before::Empty => {}
        Before::Exists => {
            t.append(stream, ExpectedVersion::NoStream, &three).unwrap();
        }
        Before::Deleted => {
            t.append(stream, ExpectedVersion::NoStream, &three).unwrap();
            t.delete_stream(stream, ExpectedVersion::Any).unwrap();
        }
        Before::Tombstoned => {
            t.append(stream, ExpectedVersion::NoStream, &three).unwrap();
            t.tombstone_stream(stream, ExpectedVersion::Any).unwrap();
        }
    }
}

fn append_on(
    t: &pg_eventstore::Store,
    path: AppendPath,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> String {
    match path {
        AppendPath::Pool => outcome(t.append(stream, expected, events)),
        AppendPath::AppendIn => {
            let mut c = t.pool().get().unwrap();
            let mut tx = c.transaction().unwrap();
            let r = t.append_in(&mut tx, stream, expected, events);
            if r.is_ok() {
                tx.commit().unwrap();
            }
            outcome(r)
        }
        AppendPath::StoreTx => {
            let mut conn = t.connection().unwrap();
            let mut tx = conn.transaction().unwrap();
            let r = tx.append(stream, expected, events);
            if r.is_ok() {
                tx.commit().unwrap();
            }
            outcome(r)
        }
        AppendPath::Prepared => {
            let mut c =
                postgres::Client::connect(&crate::common::database_url(), postgres::NoTls).unwrap();
            let mut p = t.prepared_appends();
            let mut tx = c.transaction().unwrap();
            let r = p.append(&mut tx, stream, expected, events);
            if r.is_ok() {
                tx.commit().unwrap();
            }
            outcome(r)
        }
    }
}

#[test]
fn expected_versions_and_repeats_get_the_same_answer_on_every_append_path() -> TestResult {
    let t = TestStore::new("append_paths_agree");
    let setups = [
        Before::Empty,
        Before::Exists,
        Before::Deleted,
        Before::Tombstoned,
    ];
    let expecteds = [
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(0),
        ExpectedVersion::Exact(2),
        ExpectedVersion::Exact(3),
        ExpectedVersion::Exact(4),
    ];
    // What the events are: fresh ones (1 or 3), a repeat of the setup's append, a repeat
    // of its last event, the setup's first id with other data, fresh + one repeated id.
    let kinds = [
        "fresh1",
        "fresh3",
        "repeat3",
        "repeat_last",
        "id_other_data",
        "mixed",
    ];
    let paths = [
        AppendPath::Pool,
        AppendPath::AppendIn,
        AppendPath::StoreTx,
        AppendPath::Prepared,
    ];
    let mut diffs = Vec::new();
    let mut n = 0;
    for s in setups {
        for e in expecteds {
            for k in kinds {
                let mut got = Vec::new();
                for p in paths {
                    n += 1;
                    let stream = format!("s{n}");
                    let ids = [
                        uuid::Uuid::now_v7(),
                        uuid::Uuid::now_v7(),
                        uuid::Uuid::now_v7(),
                    ];
                    set_up(&t, &stream, s, &ids);
                    let events: Vec<EventData> = match k {
                        "fresh1" => vec![path_ev("E", 0)],
                        "fresh3" => (0..3).map(|i| path_ev("E", i)).collect(),
                        "repeat3" => (0..3).map(|i| path_ev("Setup", i).id(ids[i])).collect(),
                        "repeat_last" => vec![path_ev("Setup", 2).id(ids[2])],
                        "id_other_data" => vec![path_ev("Other", 9).id(ids[0])],
                        _ => vec![path_ev("E", 0), path_ev("Setup", 1).id(ids[1])],
                    };
                    got.push((p, append_on(&t, p, &stream, e, &events)));
                }
                let first = &got[0].1;
                if got.iter().any(|(_, g)| g != first) {
                    diffs.push(format!("{s:?} {e:?} {k}: {got:?}"));
                }
            }
        }
    }
    assert!(diffs.is_empty(), "paths disagree:\n{}", diffs.join("\n"));
    Ok(())
}

/// Many threads appending with `Any` to one hot stream through the pool: every append
/// succeeds (there is no version to conflict on), versions are gap-free.
#[test]
fn a_wrong_expected_version_leaves_the_transaction_usable_on_every_path() -> TestResult {
    let t = TestStore::new("append_paths_usable");
    t.append(
        "s",
        ExpectedVersion::NoStream,
        &[path_ev("E", 0), path_ev("E", 1)],
    )?;
    let mut failures = Vec::new();
    for path in [
        AppendPath::AppendIn,
        AppendPath::StoreTx,
        AppendPath::Prepared,
    ] {
        for n in [1usize, 3] {
            for write_first in [false, true] {
                for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(7)] {
                    let evs: Vec<EventData> = (0..n).map(|i| path_ev("E", i)).collect();
                    let mut own;
                    let mut pooled;
                    let mut conn;
                    let mut p = t.prepared_appends();
                    let (r, alive) = match path {
                        AppendPath::StoreTx => {
                            conn = t.connection()?;
                            let mut tx = conn.transaction()?;
                            if write_first {
                                tx.batch_execute("CREATE TEMP TABLE IF NOT EXISTS w (x int); INSERT INTO w VALUES (1)")?;
                            }
                            let r = tx.append("s", expected, &evs);
                            let alive = tx.query("SELECT 1", &[]).is_ok();
                            (r, alive)
                        }
                        AppendPath::AppendIn => {
                            pooled = t.pool().get()?;
                            let mut tx = pooled.transaction()?;
                            if write_first {
                                tx.batch_execute("CREATE TEMP TABLE IF NOT EXISTS w (x int); INSERT INTO w VALUES (1)")?;
                            }
                            let r = t.append_in(&mut tx, "s", expected, &evs);
                            let alive = tx.query("SELECT 1", &[]).is_ok();
                            (r, alive)
                        }
                        _ => {
                            own = postgres::Client::connect(
                                &crate::common::database_url(),
                                postgres::NoTls,
                            )?;
                            let mut tx = own.transaction()?;
                            if write_first {
                                tx.batch_execute("CREATE TEMP TABLE IF NOT EXISTS w (x int); INSERT INTO w VALUES (1)")?;
                            }
                            let r = p.append(&mut tx, "s", expected, &evs);
                            let alive = tx.query("SELECT 1", &[]).is_ok();
                            (r, alive)
                        }
                    };
                    let ok = matches!(r, Err(Error::WrongExpectedVersion { .. })) && alive;
                    if !ok {
                        failures.push(format!(
                            "{path:?} n={n} write_first={write_first} {expected:?}: {} usable={alive}",
                            outcome(r)
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
