//! The `$all` horizon: only transactions that append to the store hold the feed back, and
//! only at and after their own positions; `read_all` never returns short without saying
//! so; subscribers get held-back events within milliseconds of the blocker's end.

use std::time::{Duration, Instant};

use crate::common::{client, events, TestResult, TestStore, XidHolder};
use pg_eventstore::{Error, EventData, ExpectedVersion, ImportOptions, ReadAll, SubscribeOptions};

/// All events a `$all` read returns now, without waiting.
fn visible(t: &TestStore) -> pg_eventstore::Result<usize> {
    let mut n = 0;
    for e in t.read_all(ReadAll::from_start().visible_now())? {
        e?;
        n += 1;
    }
    Ok(n)
}

#[test]
fn another_database_does_not_hold_back_a_bulk_import() -> TestResult {
    let t = TestStore::new("feed_import");
    let blocker = XidHolder::in_other_database();
    let batch: Vec<(String, EventData)> = (0..100_000)
        .map(|i| {
            (
                format!("imp-{}", i % 1000),
                EventData::json("Imported", serde_json::json!({ "i": i })),
            )
        })
        .collect();
    t.import(&batch, ImportOptions::new())?;
    // Not allowed to wait at all: had the other transaction held the feed back, the read
    // would fail at once with HeldBack instead of returning events.
    let started = Instant::now();
    let mut n = 0;
    for e in t.read_all(ReadAll::from_start().wait_at_most(Duration::ZERO))? {
        e?;
        n += 1;
    }
    eprintln!("read 100,000 events in {:?}", started.elapsed());
    assert_eq!(n, 100_000, "read_all must return the whole import");
    let status = t.feed_status()?;
    assert_eq!(status.held_back, None);
    assert_eq!(status.head, status.tip);
    drop(blocker);
    Ok(())
}

#[test]
fn a_writer_of_another_table_in_this_database_does_not_hold_back() -> TestResult {
    let t = TestStore::new("feed_other_table");
    client().batch_execute(&format!("CREATE TABLE \"{}\".other (x int)", t.schema))?;
    let _blocker = XidHolder::open(
        client(),
        &format!("INSERT INTO \"{}\".other VALUES (1)", t.schema),
    );
    let _other_db = XidHolder::in_other_database();
    let written = t.append("s-1", ExpectedVersion::NoStream, &events("E", 3))?;
    assert_eq!(t.head_position()?, Some(written.last_position));
    assert_eq!(visible(&t)?, 3);
    assert_eq!(t.feed_status()?.held_back, None);
    Ok(())
}

#[test]
fn a_running_statement_of_this_database_does_not_hold_back() -> TestResult {
    let t = TestStore::new("feed_running");
    let s = format!("\"{}\"", t.schema);
    client().batch_execute(&format!("CREATE TABLE {s}.other (x int)"))?;
    // A long statement with a transaction id, still running while events commit.
    let mut busy = client();
    let busy_pid: i32 = busy.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let sql = format!("BEGIN; INSERT INTO {s}.other VALUES (1); SELECT pg_sleep(3); ROLLBACK");
    let runner = std::thread::spawn(move || busy.batch_execute(&sql));
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = loop {
        let active: bool = client()
            .query_one(
                "SELECT coalesce(bool_or(state = 'active' AND backend_xid IS NOT NULL), false)
                   FROM pg_stat_activity WHERE pid = $1",
                &[&busy_pid],
            )?
            .get(0);
        if active || Instant::now() > deadline {
            break active;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(running, "the long statement never ran");
    let written = t.append("s-1", ExpectedVersion::NoStream, &events("E", 3))?;
    assert_eq!(visible(&t)?, 3);
    assert_eq!(t.head_position()?, Some(written.last_position));
    assert_eq!(t.feed_status()?.held_back, None);
    // Passed without a lock, so readers moved the floor past it.
    let floor: i64 = client()
        .query_one(&format!("SELECT last_value FROM {s}.feed_floor"), &[])?
        .get(0);
    assert!(floor > 0, "the floor did not move");
    runner.join().unwrap()?;
    Ok(())
}

#[test]
fn a_reader_that_cannot_move_the_floor_stops_before_an_idle_writer_of_this_database() -> TestResult
{
    let t = TestStore::new("feed_readonly");
    let s = format!("\"{}\"", t.schema);
    client().batch_execute(&format!("CREATE TABLE {s}.other (x int)"))?;
    t.append("before", ExpectedVersion::NoStream, &events("E", 1))?;
    let mut holder = client();
    let holder_pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let holder = XidHolder::open(holder, &format!("INSERT INTO {s}.other VALUES (1)"));
    let after = t.append("after", ExpectedVersion::NoStream, &events("E", 1))?;
    let horizon = format!("SELECT * FROM {s}.feed_horizon(pg_current_snapshot())");
    let mut reader = client();
    let mut tx = reader.build_transaction().read_only(true).start()?;
    let row = tx.query_one(&horizon, &[])?;
    let (h, tip, pid, xid): (i64, i64, Option<i32>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(tip as u64, after.last_position);
    assert!(
        h as u64 <= after.last_position,
        "read-only reader passed the idle writer"
    );
    // The blocker named is the holder, or a transaction of this database older than it
    // (another test's, running at the same time).
    let holder_xid: i64 = client()
        .query_one(
            "SELECT backend_xid::text::bigint FROM pg_stat_activity WHERE pid = $1",
            &[&holder_pid],
        )?
        .get(0);
    assert!(
        pid == Some(holder_pid) || xid.is_some_and(|x| x % 4_294_967_296 < holder_xid),
        "blocker {pid:?} (xid {xid:?}), the holder is {holder_pid} (xid {holder_xid})"
    );
    tx.commit()?;
    // A reader that may move the floor passes it.
    let row = reader.query_one(&horizon, &[])?;
    assert!(row.get::<_, i64>(0) as u64 > after.last_position);
    assert_eq!(row.get::<_, Option<i32>>(2), None);
    drop(holder);
    Ok(())
}

#[test]
fn read_all_waits_for_an_open_appender_then_names_it() -> TestResult {
    let t = TestStore::with("feed_wait", |c| {
        c.read_all_wait(Duration::from_millis(300))
            .application_name("feed-wait-blocker")
    });
    t.append("before", ExpectedVersion::NoStream, &events("E", 2))?;
    // An appending transaction stays open; events commit after it.
    let mut conn = t.pool().get()?;
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "open", ExpectedVersion::NoStream, &events("E", 1))?;
    let after = t.append("after", ExpectedVersion::NoStream, &events("E", 2))?;

    // The default read waits (here 300 ms), then names the blocker.
    let started = Instant::now();
    let error = t
        .read_all(ReadAll::from_start())?
        .collect::<Result<Vec<_>, _>>()
        .expect_err("a short read must not pass silently");
    let waited = started.elapsed();
    match &error {
        Error::HeldBack { held, waited } => {
            assert_eq!(held.pid, Some(pid));
            assert_eq!(held.application_name.as_deref(), Some("feed-wait-blocker"));
            assert!(held.transaction_age.is_some());
            assert!(*waited >= Duration::from_millis(300));
        }
        other => panic!("expected HeldBack, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    let text = error.to_string();
    assert!(text.contains(&format!("pid {pid}")), "{text}");

    // Only what is visible now, on request: the events before the open transaction.
    assert_eq!(visible(&t)?, 2);
    let status = t.feed_status()?;
    let held = status.held_back.expect("held back");
    assert_eq!(held.pid, Some(pid));
    assert_eq!(status.tip, Some(after.last_position));
    assert!(status.head < status.tip);

    // A longer wait succeeds when the blocker commits meanwhile, forwards and backwards.
    let reader = |options: ReadAll| {
        let store = t.store.clone();
        std::thread::spawn(move || -> pg_eventstore::Result<Vec<String>> {
            store
                .read_all(options.wait_at_most(Duration::from_secs(20)))?
                .map(|e| e.map(|e| e.stream_id))
                .collect()
        })
    };
    let forwards = reader(ReadAll::from_start());
    let backwards = reader(ReadAll::backwards());
    std::thread::sleep(Duration::from_millis(100));
    tx.commit()?;
    let forwards = forwards.join().unwrap()?;
    assert_eq!(forwards, ["before", "before", "open", "after", "after"]);
    let mut backwards = backwards.join().unwrap()?;
    backwards.reverse();
    assert_eq!(backwards, forwards);
    assert_eq!(t.feed_status()?.held_back, None);
    Ok(())
}

#[test]
fn subscriber_gets_events_within_milliseconds_of_a_rollback() -> TestResult {
    // A 10 s safety poll: only the held-back logic can deliver E in time.
    let t = TestStore::with("feed_prompt", |c| c.poll_interval(Duration::from_secs(10)));
    t.append("warm", ExpectedVersion::NoStream, &events("W", 1))?;
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    assert_eq!(
        sub.next_timeout(Duration::from_secs(5)).unwrap()?.stream_id,
        "warm"
    );

    // T1 appends D and stays open; T2 (a newer transaction id) appends and stays open.
    let mut c1 = t.pool().get()?;
    let mut t1 = c1.transaction()?;
    t.append_in(&mut t1, "d", ExpectedVersion::NoStream, &events("D", 1))?;
    let mut c2 = t.pool().get()?;
    let mut t2 = c2.transaction()?;
    t.append_in(&mut t2, "x", ExpectedVersion::NoStream, &events("X", 1))?;
    t1.commit()?;
    // E is held back by T2.
    t.append("e", ExpectedVersion::NoStream, &events("E", 1))?;
    let d = sub.next_timeout(Duration::from_secs(5)).expect("D")?;
    assert_eq!(d.stream_id, "d");
    assert!(sub.try_next().is_none(), "E must wait for T2");
    let health = t.health_check();
    assert!(health.held_back.is_some(), "health names the blocker");

    let rolled_back = Instant::now();
    t2.rollback()?;
    let e = sub.next_timeout(Duration::from_secs(5)).expect("E")?;
    let took = rolled_back.elapsed();
    assert_eq!(e.stream_id, "e");
    assert!(
        took < Duration::from_millis(500),
        "E came {took:?} after the rollback"
    );
    assert!(sub.try_next().is_none());
    assert_eq!(t.health_check().held_back, None);
    Ok(())
}

#[test]
fn a_transaction_passed_by_readers_may_not_start_appending() -> TestResult {
    let t = TestStore::new("feed_floor");
    client().batch_execute(&format!("CREATE TABLE \"{}\".outbox (x int)", t.schema))?;
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    // The transaction gets its id by writing elsewhere first...
    tx.execute(
        &format!("INSERT INTO \"{}\".outbox VALUES (1)", t.schema),
        &[],
    )?;
    // ...a younger transaction's event commits, and a reader passes both.
    let later = t.append("later", ExpectedVersion::NoStream, &events("L", 1))?;
    assert_eq!(t.head_position()?, Some(later.last_position));
    let error = t
        .append_in(&mut tx, "late", ExpectedVersion::NoStream, &events("E", 1))
        .expect_err("refused");
    assert!(
        matches!(&error, Error::FeedOrderConflict { stream: Some(s) } if s == "late"),
        "{error:?}"
    );
    tx.rollback()?;
    assert_eq!(t.stream_version("late")?, None, "nothing written");

    // Appending first takes the table lock with the id: later appends of the same
    // transaction are never refused, however far readers go meanwhile.
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "first", ExpectedVersion::NoStream, &events("F", 1))?;
    tx.execute(
        &format!("INSERT INTO \"{}\".outbox VALUES (2)", t.schema),
        &[],
    )?;
    t.append("other", ExpectedVersion::NoStream, &events("O", 1))?;
    assert_eq!(visible(&t)?, 1, "held back by the open appender");
    t.append_in(&mut tx, "first", ExpectedVersion::Exact(0), &events("F", 1))?;
    tx.commit()?;
    assert_eq!(visible(&t)?, 4);
    Ok(())
}

#[test]
fn a_transaction_locked_for_appends_first_is_never_refused() -> TestResult {
    let t = TestStore::new("feed_lock_first");
    client().batch_execute(&format!("CREATE TABLE \"{}\".outbox (x int)", t.schema))?;
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.lock_for_appends(&mut tx)?;
    tx.execute(
        &format!("INSERT INTO \"{}\".outbox VALUES (1)", t.schema),
        &[],
    )?;
    let later = t.append("later", ExpectedVersion::NoStream, &events("L", 1))?;
    // The open transaction holds `later` back: it may still append before it.
    assert_eq!(t.head_position()?, None);
    assert_eq!(
        t.feed_status()?.held_back.and_then(|h| h.pid),
        Some(pid(&mut tx)?)
    );
    let early = t.append_in(&mut tx, "early", ExpectedVersion::NoStream, &events("E", 1))?;
    tx.commit()?;
    assert!(early.last_position < later.first_position);
    let order: Vec<String> = t
        .read_all(ReadAll::from_start())?
        .map(|e| e.map(|e| e.stream_id))
        .collect::<Result<_, _>>()?;
    assert_eq!(order, ["early", "later"]);
    Ok(())
}

fn pid(tx: &mut postgres::Transaction<'_>) -> Result<i32, postgres::Error> {
    Ok(tx.query_one("SELECT pg_backend_pid()", &[])?.get(0))
}

#[test]
fn an_import_in_a_passed_transaction_is_refused_and_writes_nothing() -> TestResult {
    let t = TestStore::new("feed_import_in");
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_current_xact_id()", &[])?;
    t.append("later", ExpectedVersion::NoStream, &events("L", 1))?;
    assert!(t.head_position()?.is_some());
    let batch = vec![("imp", EventData::json("I", serde_json::json!({})))];
    let error = t
        .import_in(&mut tx, &batch, ImportOptions::new())
        .expect_err("refused");
    assert!(
        matches!(error, Error::FeedOrderConflict { stream: None }),
        "{error:?}"
    );
    tx.rollback()?;
    assert_eq!(t.count_events(), 1);
    // A transaction with no id yet is never refused.
    let mut tx = conn.transaction()?;
    t.import_in(&mut tx, &batch, ImportOptions::new())?;
    tx.commit()?;
    assert_eq!(visible(&t)?, 2);
    Ok(())
}

#[test]
fn a_live_subscription_starts_at_the_precise_horizon() -> TestResult {
    let t = TestStore::new("feed_live");
    let _other_db = XidHolder::in_other_database();
    t.append("old", ExpectedVersion::NoStream, &events("O", 2))?;
    let mut sub = t.subscribe(SubscribeOptions::all().live())?;
    assert!(sub.try_next().is_none(), "history is skipped");
    t.append("new", ExpectedVersion::NoStream, &events("N", 1))?;
    let e = sub.next_timeout(Duration::from_secs(5)).expect("new")?;
    assert_eq!(e.stream_id, "new");
    Ok(())
}

/// A read whose range lies wholly below an open appending transaction (backwards before
/// a visible position; or forwards, with a `max_count` that the visible events fill)
/// cannot return any held-back event: it reads at once instead of failing with
/// `HeldBack`. Reads that could return one still wait and say so.
#[test]
fn reads_whose_range_holds_no_held_back_event_do_not_wait() -> TestResult {
    let t = TestStore::new("feed_range");
    let old = t.append("old", ExpectedVersion::NoStream, &events("E", 3))?;
    t.wait_all_visible();
    // An appending transaction stays open; an append commits after it.
    let mut c = t.pool().get()?;
    let mut tx = c.transaction()?;
    t.append_in(&mut tx, "open", ExpectedVersion::Any, &events("E", 1))?;
    let late = t.append("late", ExpectedVersion::NoStream, &events("E", 1))?;
    let wait = Duration::from_millis(300);
    let read = |options: ReadAll| -> pg_eventstore::Result<Vec<u64>> {
        t.read_all(options.wait_at_most(wait))?
            .map(|e| e.map(|e| e.position))
            .collect()
    };
    let started = Instant::now();
    let back = read(ReadAll::backwards_before(old.last_position + 1))?;
    assert_eq!(back.len(), 3);
    assert_eq!(back[0], old.last_position);
    let first = read(ReadAll::from_start().max_count(2))?;
    assert_eq!(first, [old.first_position, old.first_position + 1]);
    assert!(started.elapsed() < wait, "took {:?}", started.elapsed());
    // Ranges that reach the held-back event wait, then fail naming the blocker.
    for options in [
        ReadAll::backwards_before(late.last_position + 1),
        ReadAll::backwards(),
        ReadAll::from_start().max_count(4),
        ReadAll::from_start(),
    ] {
        let what = format!("{options:?}");
        match read(options) {
            Err(Error::HeldBack { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    tx.rollback()?;
    Ok(())
}

/// A `read_all` that waits for held-back events gives its connection back meanwhile: on
/// a pool of one connection it waits, then reads (its pages after the first through a
/// cursor, here), rather than exhausting the pool.
#[test]
fn a_waiting_read_all_needs_no_second_connection() -> TestResult {
    let t = TestStore::with("feed_pool1", |c| {
        c.max_connections(1)
            .min_idle(1)
            .read_page_size(1)
            .connection_timeout(Duration::from_secs(3))
    });
    t.append("before", ExpectedVersion::NoStream, &events("E", 1))?;
    t.wait_all_visible();
    // An appending transaction on a connection of our own, and an event after it.
    let mut own = client();
    own.batch_execute("BEGIN")?;
    t.append_in(&mut own, "open", ExpectedVersion::Any, &events("E", 1))?;
    t.append("late", ExpectedVersion::NoStream, &events("E", 1))?;
    // The blocker commits after 300 ms.
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        own.batch_execute("COMMIT").unwrap();
    });
    let read: pg_eventstore::Result<Vec<String>> = t
        .read_all(ReadAll::from_start().wait_at_most(Duration::from_secs(10)))?
        .map(|e| e.map(|e| e.stream_id))
        .collect();
    committer.join().unwrap();
    assert_eq!(read?, ["before", "open", "late"]);
    Ok(())
}
