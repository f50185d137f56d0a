use std::thread;
use std::time::{Duration, Instant};

use crate::common::{events, TestResult, TestStore};
use fallible_iterator::FallibleIterator;
use pg_eventstore::{
    Config, EventData, ExpectedVersion, ImportOptions, RecordedEvent, Result, Store,
    SubscribeOptions, Subscription,
};

const WAIT: Duration = Duration::from_secs(10);

/// Takes `n` events, failing the test if they do not come within `WAIT`.
fn take(sub: &mut Subscription, n: usize) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.next_timeout(left) {
            Some(e) => out.push(e.expect("subscription error")),
            None => panic!("only {} of {n} events arrived in {WAIT:?}", out.len()),
        }
    }
    out
}

fn types(events: &[RecordedEvent]) -> Vec<String> {
    events.iter().map(|e| e.event_type.clone()).collect()
}

/// A second store on the same schema: another process, as far as notifications go.
fn other_process(t: &TestStore, f: impl FnOnce(Config) -> Config) -> Store {
    f(Config::new(&crate::common::database_url())
        .unwrap()
        .schema(&t.schema))
    .connect()
    .unwrap()
}

#[test]
fn catches_up_then_goes_live() -> TestResult {
    let t = TestStore::new("sub_catchup");
    t.append("a", ExpectedVersion::NoStream, &events("Old", 3))?;
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    let old = take(&mut sub, 3);
    assert_eq!(types(&old), ["Old", "Old", "Old"]);
    assert_eq!(sub.position(), Some(old[2].position));
    // Nothing more yet.
    assert!(sub.next_timeout(Duration::from_millis(100)).is_none());
    let store = t.store.clone();
    let writer = thread::spawn(move || {
        for i in 0..5 {
            thread::sleep(Duration::from_millis(20));
            store
                .append("b", ExpectedVersion::Any, &events(&format!("New{i}"), 1))
                .unwrap();
        }
    });
    let new = take(&mut sub, 5);
    writer.join().unwrap();
    assert_eq!(types(&new), ["New0", "New1", "New2", "New3", "New4"]);
    assert!(new[0].position > old[2].position);
    assert!(new.windows(2).all(|w| w[0].position < w[1].position));
    Ok(())
}

#[test]
fn starts_after_a_position() -> TestResult {
    let t = TestStore::new("sub_after");
    let first = t.append("a", ExpectedVersion::NoStream, &events("A", 4))?;
    t.append("b", ExpectedVersion::NoStream, &events("B", 2))?;
    let mut sub = t.subscribe(SubscribeOptions::all().after(first.first_position + 1))?;
    let got = take(&mut sub, 4);
    assert_eq!(types(&got), ["A", "A", "B", "B"]);
    assert_eq!(got[0].version, 2);
    assert!(sub.next_timeout(Duration::from_millis(100)).is_none());
    Ok(())
}

#[test]
fn live_only_delivers_what_commits_after_the_call() -> TestResult {
    let t = TestStore::new("sub_live");
    t.append("a", ExpectedVersion::NoStream, &events("Before", 3))?;
    // A transaction that is open when the subscription starts and commits afterwards:
    // its event commits after the call, so it is delivered.
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.append_in(
        &mut tx,
        "c",
        ExpectedVersion::NoStream,
        &events("InFlight", 1),
    )?;
    let mut sub = t.subscribe(SubscribeOptions::all().live())?;
    t.append("a", ExpectedVersion::Exact(2), &events("After", 1))?;
    tx.commit()?;
    let got = take(&mut sub, 2);
    let mut got_types = types(&got);
    got_types.sort();
    assert_eq!(got_types, ["After", "InFlight"]);
    assert!(sub.next_timeout(Duration::from_millis(200)).is_none());
    // A live stream subscription starts after the stream's current version.
    let mut one = t.subscribe(SubscribeOptions::stream("a").live())?;
    t.append("a", ExpectedVersion::Exact(3), &events("Later", 1))?;
    let got = take(&mut one, 1);
    assert_eq!((got[0].event_type.as_str(), got[0].version), ("Later", 4));
    Ok(())
}

#[test]
fn filters_by_stream_category_and_type() -> TestResult {
    let t = TestStore::new("sub_filter");
    t.append("order-1", ExpectedVersion::Any, &events("Placed", 2))?;
    t.append("user-1", ExpectedVersion::Any, &events("Registered", 1))?;
    t.append("order-2", ExpectedVersion::Any, &events("Shipped", 1))?;
    let mut stream = t.subscribe(SubscribeOptions::stream("order-1"))?;
    let mut category = t.subscribe(SubscribeOptions::category("order-"))?;
    let mut typed = t.subscribe(SubscribeOptions::all().event_types(["Registered", "Shipped"]))?;
    let mut stream_after = t.subscribe(SubscribeOptions::stream("order-1").after(0))?;
    let mut named = t.subscribe(SubscribeOptions::streams(["user-1", "order-2"]))?;
    let mut named_typed =
        t.subscribe(SubscribeOptions::streams(["user-1", "order-1"]).event_types(["Renamed"]))?;
    t.append("order-1", ExpectedVersion::Exact(1), &events("Paid", 1))?;
    t.append("user-1", ExpectedVersion::Exact(0), &events("Renamed", 1))?;

    let s = take(&mut stream, 3);
    assert_eq!(types(&s), ["Placed", "Placed", "Paid"]);
    assert_eq!(s.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(types(&take(&mut stream_after, 2)), ["Placed", "Paid"]);
    let c = take(&mut category, 4);
    assert_eq!(types(&c), ["Placed", "Placed", "Shipped", "Paid"]);
    assert_eq!(types(&take(&mut typed, 2)), ["Registered", "Shipped"]);
    let n = take(&mut named, 3);
    assert_eq!(types(&n), ["Registered", "Shipped", "Renamed"]);
    assert!(n.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(types(&take(&mut named_typed, 1)), ["Renamed"]);
    for sub in [
        &mut stream,
        &mut category,
        &mut typed,
        &mut named,
        &mut named_typed,
    ] {
        assert!(sub.next_timeout(Duration::from_millis(100)).is_none());
    }
    let err = t
        .subscribe(SubscribeOptions::stream("x").event_types(["A"]))
        .unwrap_err();
    assert!(err.to_string().contains("not to one stream"), "{err}");
    assert!(t.subscribe(SubscribeOptions::stream("")).is_err());
    Ok(())
}

#[test]
fn next_timeout_returns_none_on_silence_and_try_next_does_not_wait() -> TestResult {
    let t = TestStore::new("sub_timeout");
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    let started = Instant::now();
    assert!(sub.next_timeout(Duration::from_millis(300)).is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(!sub.is_stopped());
    assert!(sub.try_next().is_none());
    let r = t.append("s", ExpectedVersion::Any, &events("E", 1))?;
    // A concurrent test's open transaction may hold the $all horizon back for a moment.
    crate::common::wait_visible(&t, r.last_position);
    assert_eq!(sub.try_next().unwrap()?.event_type, "E");
    assert!(sub.try_next().is_none());
    Ok(())
}

#[test]
fn a_blocked_subscription_stops_from_another_thread() -> TestResult {
    let t = TestStore::new("sub_stop");
    let sub = t.subscribe(SubscribeOptions::all())?;
    let stopper = sub.stopper();
    let reader = thread::spawn(move || {
        let started = Instant::now();
        let count = sub.count(); // blocks until stopped
        (count, started.elapsed())
    });
    thread::sleep(Duration::from_millis(300));
    stopper.stop();
    let (count, blocked_for) = reader.join().unwrap();
    assert_eq!(count, 0);
    assert!(blocked_for >= Duration::from_millis(200), "{blocked_for:?}");
    Ok(())
}

#[test]
fn events_larger_than_a_notification_payload() -> TestResult {
    let t = TestStore::new("sub_large");
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    let blob = "y".repeat(64 * 1024);
    t.append(
        "big",
        ExpectedVersion::NoStream,
        &[EventData::json("Big", serde_json::json!({ "blob": blob }))],
    )?;
    let got = take(&mut sub, 1);
    assert_eq!(
        got[0].data.to_value()?["blob"].as_str().unwrap().len(),
        64 * 1024
    );
    Ok(())
}

#[test]
fn select_together_with_your_own_channels() -> TestResult {
    let t = TestStore::new("sub_select");
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    let (tick_tx, tick_rx) = crossbeam_channel::bounded::<&str>(1);
    tick_tx.send("tick")?;
    t.append("s", ExpectedVersion::Any, &events("E", 2))?;
    let mut got = Vec::new();
    let mut ticks = 0;
    let deadline = Instant::now() + WAIT;
    while got.len() < 2 && Instant::now() < deadline {
        crossbeam_channel::select! {
            recv(sub.ready()) -> _ => {
                while let Some(e) = sub.try_next() {
                    got.push(e?);
                }
            }
            recv(tick_rx) -> _ => ticks += 1,
            default(Duration::from_millis(50)) => {}
        }
    }
    assert_eq!(types(&got), ["E", "E"]);
    assert_eq!(ticks, 1);
    Ok(())
}

#[test]
fn other_processes_are_woken_by_notify_not_by_polling() -> TestResult {
    let t = TestStore::new("sub_notify");
    // The subscriber polls only every 60 s: a prompt delivery proves the NOTIFY path.
    let reader = other_process(&t, |c| c.poll_interval(Duration::from_secs(60)));
    let mut sub = reader.subscribe(SubscribeOptions::all())?;
    assert!(sub.next_timeout(Duration::from_millis(100)).is_none());
    // The writer's notifier notifies only while another process listens: let it see one.
    wait_connected(&reader);
    // Through the pool: the writer's notifier thread sends the NOTIFY after the commit.
    // The append happens while the subscriber is blocked waiting.
    let store = t.store.clone();
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        store.append("s", ExpectedVersion::Any, &events("Pooled", 1))
    });
    let got = woken_within(&mut sub, Duration::from_secs(3));
    writer.join().unwrap()?;
    assert_eq!(got.event_type, "Pooled");
    // Inside a caller's transaction: notified by that transaction's commit.
    let store = t.store.clone();
    let writer = thread::spawn(move || -> Result<()> {
        let mut conn = store.pool().get().unwrap();
        let mut tx = conn.transaction()?;
        store.append_in(&mut tx, "s", ExpectedVersion::Exact(0), &events("InTx", 1))?;
        thread::sleep(Duration::from_millis(200));
        tx.commit()?;
        Ok(())
    });
    let got = woken_within(&mut sub, Duration::from_secs(3));
    writer.join().unwrap()?;
    assert_eq!(got.event_type, "InTx");
    Ok(())
}

#[test]
fn a_commit_in_a_callers_transaction_wakes_subscribers_of_the_same_store() -> TestResult {
    // The subscriber polls only every 60 s: a prompt delivery proves the commit watcher.
    // (With notifying off, no `append_in` sends its own wake-up: the watcher wakes the
    // subscribers here either way.)
    let t = TestStore::with("sub_watch", |c| {
        c.poll_interval(Duration::from_secs(60))
            .notify_on_append(false)
    });
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    assert!(sub.next_timeout(Duration::from_millis(100)).is_none());
    three_held_appends_in_wake(&t.store, &mut sub)?;
    // The same for an import inside a caller's transaction.
    let store = t.store.clone();
    let writer = thread::spawn(move || -> Result<()> {
        let mut conn = store.pool().get().unwrap();
        let mut tx = conn.transaction()?;
        let imported = [("imported", events("Imported", 1).remove(0))];
        store.import_in(&mut tx, &imported, ImportOptions::new())?;
        thread::sleep(Duration::from_millis(100));
        tx.commit()?;
        Ok(())
    });
    let got = woken_within(&mut sub, Duration::from_secs(3));
    writer.join().unwrap()?;
    assert_eq!((got.stream_id.as_str(), got.version), ("imported", 0));
    // A rolled-back transaction wakes nobody with an event.
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("Gone", 1))?;
    tx.rollback()?;
    assert!(sub.next_timeout(Duration::from_millis(300)).is_none());
    Ok(())
}

/// Three `append_in`s to stream `s`, each in a transaction held open for 100 ms: `sub`
/// is woken for each soon after its commit.
fn three_held_appends_in_wake(store: &Store, sub: &mut Subscription) -> TestResult {
    for round in 0..3 {
        let store = store.clone();
        let writer = thread::spawn(move || -> Result<()> {
            let mut conn = store.pool().get().unwrap();
            let mut tx = conn.transaction()?;
            store.append_in(&mut tx, "s", ExpectedVersion::Any, &events("InTx", 1))?;
            thread::sleep(Duration::from_millis(100));
            tx.commit()?;
            Ok(())
        });
        let got = woken_within(sub, Duration::from_secs(3));
        writer.join().unwrap()?;
        assert_eq!(got.version, round);
    }
    Ok(())
}

#[test]
fn a_killed_commit_watcher_loses_no_wake_up() -> TestResult {
    // Only this test's connections carry the name: the killer touches nothing else.
    let app = format!("pges_watch_kill_{}", std::process::id());
    let t = TestStore::with("sub_watch_kill", |c| {
        c.application_name(&app)
            .poll_interval(Duration::from_secs(60))
            .notify_on_append(false)
    });
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    // The watcher's backend: its last statement asks pg_xact_status (idle or waiting).
    let kill_watcher = || -> i64 {
        let mut c = crate::common::client();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let n: i64 = c
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE application_name = $1 AND query LIKE '%pg_xact_status%'",
                    &[&app],
                )
                .unwrap()
                .get(0);
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            thread::sleep(Duration::from_millis(5));
        }
    };
    let mut killed = 0;
    for round in 0..12u64 {
        let store = t.store.clone();
        // Each transaction stays open while the watcher waits for it; every third
        // round, the watcher's backend is killed during that wait.
        let writer = thread::spawn(move || -> Result<()> {
            let mut conn = store.pool().get().unwrap();
            let mut tx = conn.transaction()?;
            store.append_in(&mut tx, "s", ExpectedVersion::Any, &events("InTx", 1))?;
            thread::sleep(Duration::from_millis(150));
            tx.commit()?;
            Ok(())
        });
        if round % 3 == 1 {
            thread::sleep(Duration::from_millis(50));
            killed += kill_watcher();
        }
        let got = woken_within(&mut sub, Duration::from_secs(3));
        writer.join().unwrap()?;
        assert_eq!(got.version, round);
    }
    assert!(killed >= 4, "the watcher was killed {killed} times");
    Ok(())
}

/// The commit watcher's backend: the one that runs its wait statement.
fn watcher_pid(app: &str) -> i32 {
    let mut c = crate::common::client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1
                    AND query LIKE '%pg_advisory_unlock(%' LIMIT 1",
                &[&app],
            )
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(Instant::now() < deadline, "no commit watcher backend");
        thread::sleep(Duration::from_millis(20));
    }
}

/// While a transaction whose `append_in` the watcher watches stays open for `hold`, with
/// the append in a savepoint that is rolled back (`rolled_back`) or released: how many
/// statements the watcher's backend starts (the distinct `query_start`s seen by sampling
/// it as fast as possible, a lower bound), and the CPU ticks that backend uses.
fn watcher_rounds_while_open(
    t: &TestStore,
    app: &str,
    rolled_back: bool,
    hold: Duration,
) -> (usize, u64) {
    let mut c = t.pool().get().unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    t.append_in(&mut tx, "held-1", ExpectedVersion::Any, &events("E", 1))
        .unwrap();
    if rolled_back {
        tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    } else {
        tx.batch_execute("RELEASE SAVEPOINT s").unwrap();
    }
    let pid = watcher_pid(app);
    thread::sleep(Duration::from_millis(100));
    let ticks = crate::faults::backend_ticks(pid);
    let mut sampler = crate::common::client();
    let sample = sampler
        .prepare("SELECT query_start::text FROM pg_stat_activity WHERE pid = $1")
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let until = Instant::now() + hold;
    while Instant::now() < until {
        if let Some(row) = sampler.query_opt(&sample, &[&pid]).unwrap() {
            seen.insert(row.get::<_, Option<String>>(0));
        }
    }
    let ticks = crate::faults::backend_ticks(pid) - ticks;
    tx.rollback().unwrap();
    (seen.len(), ticks)
}

/// A transaction whose `append_in` was rolled back to a savepoint stays open without the
/// lock the commit watcher waits on: the watcher still sends one short query every
/// 1–10 ms (OPERATIONS.md), as while the lock is held, not one after the other.
#[test]
fn the_commit_watcher_paces_itself_on_a_transaction_that_gave_its_lock_back() -> TestResult {
    let app = format!("pges_watch_unlocked_{}", std::process::id());
    // No `NOTIFY` in the caller's transaction: every `append_in` is watched.
    let t = TestStore::with("sub_watch_unlocked", |c| {
        c.notify_on_append(false).application_name(&app)
    });
    // A subscriber here, so that transactions are watched, not only remembered.
    let _sub = t.subscribe(SubscribeOptions::all())?;
    let hold = Duration::from_secs(2);
    let (control, control_ticks) = watcher_rounds_while_open(&t, &app, false, hold);
    let (rounds, ticks) = watcher_rounds_while_open(&t, &app, true, hold);
    // At most about 2 × 2,000 in 2 s; about 400 at the usual 10 ms.
    assert!(
        rounds <= control * 3 + 100,
        "the commit watcher started at least {rounds} statements in {hold:?} ({ticks} CPU \
         ticks) while the transaction sat idle after ROLLBACK TO SAVEPOINT ({control}, \
         {control_ticks} ticks, while it held the lock)"
    );
    Ok(())
}

/// The next event, which must come well before `limit` (and so long before the 60 s
/// safety poll): `next_timeout` itself takes one last look at its deadline, so the wait is
/// longer than the limit and the time is checked.
fn woken_within(sub: &mut Subscription, limit: Duration) -> RecordedEvent {
    let started = Instant::now();
    let event = sub
        .next_timeout(limit * 2)
        .expect("an event")
        .expect("no error");
    let took = started.elapsed();
    assert!(took < limit, "took {took:?}: not woken by a notification");
    event
}

fn wait_connected(store: &Store) {
    let deadline = Instant::now() + WAIT;
    while store.listener_state().is_none_or(|s| !s.connected) {
        assert!(Instant::now() < deadline, "the listener did not connect");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the listener's backend and waits until it has reconnected.
fn kill_listener(store: &Store) {
    let before = store.listener_state().expect("listener started");
    let killed: bool = crate::common::client()
        .query_one("SELECT pg_terminate_backend($1)", &[&before.backend_pid])
        .unwrap()
        .get(0);
    assert!(killed, "listener backend {} not found", before.backend_pid);
    let deadline = Instant::now() + WAIT;
    loop {
        let now = store.listener_state().unwrap();
        if now.connected && now.reconnects > before.reconnects {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "listener did not reconnect: {now:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn keeps_working_across_a_listener_reconnect_by_the_safety_poll() -> TestResult {
    let t = TestStore::new("sub_reconnect");
    // The writer never notifies; the reader's listener is killed while events are written.
    let writer = other_process(&t, |c| c.notify_on_append(false));
    let reader = other_process(&t, |c| c.poll_interval(Duration::from_millis(200)));
    let mut sub = reader.subscribe(SubscribeOptions::all())?;
    assert!(sub.next_timeout(Duration::from_millis(50)).is_none());
    wait_connected(&reader);
    let pid_before = reader.listener_state().unwrap().backend_pid;
    writer.append("s", ExpectedVersion::Any, &events("DuringOutage", 2))?;
    kill_listener(&reader);
    let state = reader.listener_state().unwrap();
    assert_ne!(state.backend_pid, pid_before);
    assert_eq!(state.reconnects, 1);
    writer.append("s", ExpectedVersion::Any, &events("AfterReconnect", 1))?;
    let got = take(&mut sub, 3);
    assert_eq!(
        types(&got),
        ["DuringOutage", "DuringOutage", "AfterReconnect"]
    );
    Ok(())
}

fn backends_named(name: &str) -> i64 {
    crate::common::client()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
}

#[test]
fn dropping_subscriptions_and_the_store_leaks_no_connection_or_thread() -> TestResult {
    let t = TestStore::new("sub_leak");
    let app = format!("leak-{}", t.schema);
    let mut pg: postgres::Config = crate::common::database_url().parse()?;
    pg.application_name(&app);
    let store = Config::from_pg(pg)
        .schema(&t.schema)
        .min_idle(0)
        .connect()?;
    let mut subs: Vec<Subscription> = (0..3)
        .map(|_| store.subscribe(SubscribeOptions::all()))
        .collect::<Result<_>>()?;
    store.append("s", ExpectedVersion::Any, &events("E", 1))?;
    // And one inside a transaction, which starts the commit watcher (an `import_in` is
    // always watched; an `append_in` after a quiet moment sends its own wake-up).
    let mut conn = store.pool().get().unwrap();
    let mut tx = conn.transaction()?;
    store.import_in(
        &mut tx,
        &[("imported", events("E", 1).remove(0))],
        ImportOptions::new(),
    )?;
    tx.commit()?;
    drop(conn);
    for s in &mut subs {
        take(s, 2);
    }
    wait_connected(&store);
    assert!(
        backends_named(&app) >= 4,
        "pool, listener, notifier and watcher"
    );
    drop(subs);
    let started = Instant::now();
    drop(store);
    let dropped_in = started.elapsed();
    let deadline = Instant::now() + WAIT;
    while backends_named(&app) > 0 {
        assert!(
            Instant::now() < deadline,
            "connections left after the store was dropped"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(dropped_in < Duration::from_secs(2), "{dropped_in:?}");
    Ok(())
}

#[test]
fn appends_send_no_notify_while_no_other_process_listens() -> TestResult {
    let t = TestStore::new("sub_quiet");
    let channel = format!("\"{}_events\"", t.schema);
    // A spy that listens, but whose last statement is not the listener's own `LISTEN`:
    // to the store's notifier it looks like nobody listens.
    let mut spy = crate::common::client();
    spy.batch_execute(&format!("LISTEN {channel}; SELECT 1"))?;
    for _ in 0..5 {
        t.append("s", ExpectedVersion::Any, &events("E", 1))?;
    }
    // Nor does a caller's transaction: its commit carries no NOTIFY of its own.
    let mut conn = t.pool().get()?;
    for _ in 0..5 {
        let mut tx = conn.transaction()?;
        t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("E", 1))?;
        tx.commit()?;
    }
    let mut tx = conn.transaction()?;
    let imported = [("imported", events("E", 1).remove(0))];
    t.import_in(&mut tx, &imported, ImportOptions::new())?;
    tx.commit()?;
    let quiet = spy
        .notifications()
        .timeout_iter(Duration::from_millis(500))
        .count()?;
    assert_eq!(quiet, 0, "NOTIFY sent with no listener about");
    // Now it looks like a listener: within a check interval the notifier notices.
    spy.batch_execute(&format!("LISTEN {channel}"))?;
    let deadline = Instant::now() + WAIT;
    loop {
        t.append("s", ExpectedVersion::Any, &events("E", 1))?;
        let mut notifications = spy.notifications();
        if notifications
            .timeout_iter(Duration::from_millis(100))
            .next()?
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no NOTIFY although a listener appeared"
        );
    }
    Ok(())
}

/// While another process listens, an append through the pool that comes after a quiet
/// moment carries the `NOTIFY` in its own commit: the other process is woken without the
/// notifier's hop.
#[test]
fn a_pool_append_after_a_quiet_moment_notifies_in_its_own_commit() -> TestResult {
    let app = format!("pges_inline_notify_{}", std::process::id());
    let t = TestStore::with("sub_inline_notify", |c| c.application_name(&app));
    let channel = format!("\"{}_events\"", t.schema);
    let mut spy = crate::common::client();
    spy.batch_execute(&format!("LISTEN {channel}"))?;
    let deadline = Instant::now() + WAIT;
    let mut from = Vec::new();
    // One event and three: the two statements that can carry the NOTIFY. Then one
    // event with an exact expected version, which has statements of its own: small, so
    // that the NOTIFY carries it, and too large for that, so that it carries a wake-up.
    let large = "y".repeat(10_000);
    let rounds = [
        (1, false, ""),
        (3, false, ""),
        (1, true, ""),
        (1, true, &large),
    ];
    for (round, (n, exact, blob)) in rounds.into_iter().enumerate() {
        from.clear();
        let stream = format!("s{round}");
        let batch = || -> Vec<EventData> {
            (0..n)
                .map(|_| EventData::json("E", serde_json::json!({ "blob": blob })))
                .collect()
        };
        // The stream's head for the exact rounds, created first, its NOTIFY drained.
        let mut head = 0;
        if exact {
            head = t
                .append(&stream, ExpectedVersion::NoStream, &batch())?
                .last_version;
            spy.notifications()
                .timeout_iter(Duration::from_millis(100))
                .count()?;
        }
        loop {
            let expected = match exact {
                true => ExpectedVersion::Exact(head),
                false => ExpectedVersion::Any,
            };
            head = t.append(&stream, expected, &batch())?.last_version;
            let senders: Vec<i32> = spy
                .notifications()
                .timeout_iter(Duration::from_millis(100))
                .map(|n| Ok(n.process_id()))
                .collect()?;
            for pid in senders {
                let query: String = spy
                .query_one(
                    "SELECT query FROM pg_stat_activity WHERE pid = $1 AND application_name = $2",
                    &[&pid, &app],
                )?
                .get(0);
                from.push(query);
            }
            // (`pg_stat_activity` shows the first 1 kB of a statement: the INSERT, not
            // always the pg_notify after it; only the append statements insert.)
            // The first appends come before the notifier's first look at who listens: the
            // notifier sends their NOTIFY. Once it has looked, the appends send their own.
            if from.iter().any(|q| q.contains("INSERT INTO")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no append of {n} (round {round}) sent its own NOTIFY; senders ran: {from:?}"
            );
        }
    }
    Ok(())
}

/// A store whose connections carry `app` as their name, a spy that looks like another
/// process's listener on its channel (its last statement is `LISTEN`), and one of the
/// store's pooled connections with its backend's pid.
fn spied(
    name: &str,
    app: &str,
) -> Result<(
    TestStore,
    postgres::Client,
    r2d2::PooledConnection<pg_eventstore::Manager>,
    i32,
)> {
    let t = TestStore::with(name, |c| c.application_name(app));
    let mut spy = crate::common::client();
    spy.batch_execute(&format!("LISTEN \"{}_events\"", t.schema))?;
    let mut conn = t.pool().get().expect("a connection");
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    Ok((t, spy, conn, pid))
}

#[test]
fn the_commit_watcher_itself_notifies_other_processes() -> TestResult {
    let app = format!("pges_watch_notify_{}", std::process::id());
    let (t, mut spy, mut conn, caller) = spied("sub_watch_notify", &app)?;
    let deadline = Instant::now() + WAIT;
    for round in 0.. {
        // An `import_in` is always left to the commit watcher, which tells other
        // processes itself. (An `append_in` after a quiet moment sends its own.)
        let mut tx = conn.transaction()?;
        let imported = [(format!("s{round}"), events("InTx", 1).remove(0))];
        t.import_in(&mut tx, &imported, ImportOptions::new())?;
        tx.commit()?;
        let senders: Vec<i32> = spy
            .notifications()
            .timeout_iter(Duration::from_millis(200))
            .map(|n| Ok(n.process_id()))
            .collect()?;
        // The watcher's backend: both of its statements (the wait on the appenders'
        // lock, and the status check it runs after a pause) read `pg_xact_status`.
        let watcher: Option<i32> = spy
            .query(
                "SELECT pid FROM pg_stat_activity
                  WHERE application_name = $1 AND query LIKE '%pg_xact_status%'",
                &[&app],
            )?
            .first()
            .map(|r| r.get(0));
        assert!(
            senders
                .iter()
                .all(|pid| *pid == caller || Some(*pid) == watcher),
            "sent by {senders:?}: the caller is {caller}, the watcher {watcher:?}"
        );
        if watcher.is_some_and(|w| senders.contains(&w)) {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the watcher sent no NOTIFY for other processes (senders {senders:?})"
        );
    }
    unreachable!()
}

#[test]
fn a_quiet_append_in_sends_its_own_wake_up_as_the_transaction_commits() -> TestResult {
    let app = format!("pges_in_tx_notify_{}", std::process::id());
    let (t, mut spy, mut conn, caller) = spied("sub_in_tx_notify", &app)?;
    let deadline = Instant::now() + WAIT;
    let mut round = 0;
    loop {
        round += 1;
        let mut tx = conn.transaction()?;
        t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("InTx", 1))?;
        // Nothing is sent while the transaction is open (a late NOTIFY of the watcher,
        // for an earlier round, may come).
        let early: Vec<i32> = spy
            .notifications()
            .timeout_iter(Duration::from_millis(100))
            .map(|n| Ok(n.process_id()))
            .collect()?;
        assert!(!early.contains(&caller), "a NOTIFY before the commit");
        tx.commit()?;
        let got: Vec<(i32, String)> = spy
            .notifications()
            .timeout_iter(Duration::from_millis(200))
            .map(|n| Ok((n.process_id(), n.payload().to_string())))
            .collect()?;
        // The first appends come before the notifier's first look at who listens: the
        // watcher tells other processes. Once it has looked, the appends send their own,
        // with an empty payload.
        let mine: Vec<&String> = got
            .iter()
            .filter(|(pid, _)| *pid == caller)
            .map(|(_, payload)| payload)
            .collect();
        if !mine.is_empty() {
            // The payload's first token is empty, not the store's own: this process's
            // listener takes it too. (Its events and their MAC follow, checked elsewhere.)
            assert_eq!(mine.len(), 1, "round {round}: {mine:?}");
            assert!(
                mine[0].is_empty() || mine[0].starts_with(' '),
                "round {round}: {mine:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no append_in sent its own NOTIFY"
        );
    }
    // A rolled-back append sends nothing.
    thread::sleep(Duration::from_millis(5));
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("Gone", 1))?;
    tx.rollback()?;
    let after: Vec<i32> = spy
        .notifications()
        .timeout_iter(Duration::from_millis(300))
        .map(|n| Ok(n.process_id()))
        .collect()?;
    assert!(
        !after.contains(&caller),
        "a NOTIFY for a rolled-back append"
    );
    Ok(())
}

#[test]
fn a_quiet_append_in_wakes_subscribers_here_without_the_commit_watcher() -> TestResult {
    let app = format!("pges_in_tx_here_{}", std::process::id());
    // The subscriber polls only every 60 s: a prompt delivery proves a wake-up.
    let t = TestStore::with("sub_in_tx_here", |c| {
        c.application_name(&app)
            .poll_interval(Duration::from_secs(60))
    });
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    wait_connected(&t.store);
    three_held_appends_in_wake(&t.store, &mut sub)?;
    // The listener heard the appends' own NOTIFY: the commit watcher never started.
    let mut spy = crate::common::client();
    let watchers: i64 = spy
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = $1 AND query LIKE '%pg_xact_status%'",
            &[&app],
        )?
        .get(0);
    assert_eq!(watchers, 0, "the commit watcher ran");
    Ok(())
}

#[test]
fn a_subscriber_that_comes_while_an_unwatched_transaction_is_open_hears_its_commit() -> TestResult {
    let app = format!("pges_unwatched_{}", std::process::id());
    let t = TestStore::with("sub_unwatched", |c| {
        c.application_name(&app)
            .poll_interval(Duration::from_secs(60))
    });
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("First", 1))?;
    tx.commit()?;
    // That append started the commit watcher and the notifier; wait for the notifier's
    // first look, which finds nobody else listening on this test's channel.
    let mut spy = crate::common::client();
    // (On a busy machine the watcher looks for listeners too, when its first commit
    // comes before the notifier's first look: two backends may match the notifier's
    // statement. Only the watcher runs `pg_advisory_lock`.)
    let backend = |spy: &mut postgres::Client, like: &str| -> Option<(i32, String)> {
        spy.query(
            "SELECT pid, query_start::text FROM pg_stat_activity
              WHERE application_name = $1 AND query LIKE $2 AND state = 'idle'
              ORDER BY pid",
            &[&app, &like],
        )
        .unwrap()
        .first()
        .map(|r| (r.get(0), r.get(1)))
    };
    let deadline = Instant::now() + WAIT;
    while backend(&mut spy, "%pg_stat_activity%").is_none() {
        assert!(Instant::now() < deadline, "the notifier never looked");
        thread::sleep(Duration::from_millis(20));
    }
    // The watcher may still be finishing its rounds for that first transaction (on a
    // busy machine): wait until its last statement stays the same for 300 ms.
    let mut watcher = backend(&mut spy, "%pg_advisory_lock%");
    loop {
        thread::sleep(Duration::from_millis(300));
        let now = backend(&mut spy, "%pg_advisory_lock%");
        if now.is_some() && now == watcher {
            break;
        }
        assert!(Instant::now() < deadline, "the watcher never went idle");
        watcher = now;
    }
    let watcher = watcher.expect("the watcher's backend");

    // Nobody can be woken: this transaction is only remembered, not watched.
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("Second", 1))?;
    tx.commit()?;
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        backend(&mut spy, "%pg_advisory_lock%"),
        Some(watcher),
        "the watcher ran a round with nobody to wake"
    );

    // A transaction still open when the first subscriber comes: the subscriber reads
    // the stream without it, and only a wake-up at its commit (not the 60 s poll)
    // brings its event. (An `$all` subscriber would wait for it by itself: it holds
    // back the feed.)
    let mut tx = conn.transaction()?;
    t.append_in(&mut tx, "s", ExpectedVersion::Any, &events("Third", 1))?;
    let mut sub = t.subscribe(SubscribeOptions::stream("s"))?;
    assert_eq!(types(&take(&mut sub, 2)), ["First", "Second"]);
    // The listener wakes everyone once it has connected: let that pass first, and let
    // the subscriber find nothing more, so that it waits for a wake-up.
    wait_connected(&t);
    assert!(sub.next_timeout(Duration::from_millis(200)).is_none());
    let started = Instant::now();
    let third = thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(200));
            tx.commit().expect("commit");
        });
        take(&mut sub, 1)
    });
    assert_eq!(types(&third), ["Third"]);
    let took = started.elapsed();
    assert!(took < WAIT / 2, "took {took:?}: not woken at the commit");
    Ok(())
}

/// How many statements the store's one pooled connection has run (its prepared
/// statements' executions): a subscription's reads, here.
pub(crate) fn statements_run(store: &Store) -> i64 {
    let mut c = store.connection().unwrap();
    c.query_one(
        "SELECT coalesce(sum(generic_plans + custom_plans), 0)::bigint
           FROM pg_prepared_statements WHERE strpos(statement, 'pg_prepared_statements') = 0",
        &[],
    )
    .unwrap()
    .get(0)
}

/// How many appends the store's one pooled connection ran that send their own `NOTIFY`:
/// with the events (the statement reads the key's table), or a wake-up alone.
fn notifying_appends(store: &Store, with_events: bool) -> i64 {
    let mut c = store.connection().unwrap();
    c.query_one(
        "SELECT coalesce(sum(generic_plans + custom_plans), 0)::bigint
           FROM pg_prepared_statements
          WHERE strpos(statement, 'pg_notify(') > 0
            AND (strpos(statement, 'feed_key') > 0) = $1
            AND strpos(statement, 'pg_prepared_statements') = 0",
        &[&with_events],
    )
    .unwrap()
    .get(0)
}

/// A subscriber in another process (a second store on the same schema) delivers the
/// events that an append's notification carries without reading them, exactly as a
/// read returns them; and never past an open appending transaction. On a private
/// server, where no other transaction takes ids: the notification proves its events
/// come next only when none is running.
#[test]
fn a_subscriber_elsewhere_takes_events_from_the_notification_but_never_past_a_gap() -> TestResult {
    // (No autovacuum: an ANALYZE takes a transaction id too.)
    let server = crate::common::server::TempServer::start(&["autovacuum = off"]);
    let config = Config::new(&server.url())?.schema("payload");
    let writer = config.clone().connect()?;
    writer.migrate()?;
    let reader = config.max_connections(1).connect()?;
    writer.append("s-1", ExpectedVersion::Any, &events("Seed", 1))?;
    let mut all = reader.subscribe(SubscribeOptions::all())?;
    let mut orders =
        reader.subscribe(SubscribeOptions::category("order-").event_types(["Paid"]))?;
    let mut stream = reader.subscribe(SubscribeOptions::stream("s-1"))?;
    assert_eq!(take(&mut all, 1)[0].event_type, "Seed");
    assert_eq!(take(&mut stream, 1)[0].event_type, "Seed");
    let event = |n: usize| {
        EventData::json(
            "Noted",
            serde_json::json!({ "n": n, "text": "grüße, \"quoted\"\n", "x": 1.50, "nested": { "b": [1, 2.0e3], "a": null } }),
        )
        .metadata(&serde_json::json!({ "by": "test" }))
    };
    // The writer sends its own NOTIFY once its notifier has seen the reader listen:
    // append until one event arrives without a read.
    let mut from_notification = None;
    for n in 0..300 {
        let before = statements_run(&reader);
        writer.append("s-1", ExpectedVersion::Any, &[event(n)?])?;
        let got = take(&mut all, 1).remove(0);
        if statements_run(&reader) == before {
            from_notification = Some(got);
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let got = from_notification.expect("no event came from a notification");
    let stored = reader
        .read_stream(
            "s-1",
            pg_eventstore::ReadStream::forwards().from_version(got.version),
        )?
        .next()
        .expect("the event")?;
    assert_eq!(
        got, stored,
        "an event from a notification is the stored one"
    );
    assert_eq!(got.data.as_str(), stored.data.as_str());
    // The stream subscription took the same events.
    let versions: Vec<u64> = take(&mut stream, got.version as usize)
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, (1..=got.version).collect::<Vec<_>>());

    // Several events in one append, through a filter: only the matching ones.
    assert!(orders.next_timeout(Duration::from_millis(100)).is_none());
    thread::sleep(Duration::from_millis(20));
    let before = statements_run(&reader);
    three_orders_through_a_filter(&writer, &mut orders, &mut all)?;
    assert_eq!(
        statements_run(&reader),
        before,
        "both subscriptions took the events from the notification"
    );

    // An `append_in` after a quiet moment sends its events in a `NOTIFY` of the
    // caller's transaction: they arrive as it commits, without a read, as stored.
    // (First the read that any wake-up without events still asks for.)
    assert!(all.next_timeout(Duration::from_millis(20)).is_none());
    let before = statements_run(&reader);
    {
        let mut conn = writer.pool().get()?;
        let mut tx = conn.transaction()?;
        let two = [event(1000)?, event(1001)?];
        writer.append_in(&mut tx, "in-tx", ExpectedVersion::NoStream, &two)?;
        tx.commit()?;
    }
    let got = take(&mut all, 2);
    assert_eq!(
        statements_run(&reader),
        before,
        "the subscription read an append_in's events"
    );
    let stored: Vec<RecordedEvent> = reader
        .read_stream("in-tx", pg_eventstore::ReadStream::forwards())?
        .collect::<Result<_>>()?;
    assert_eq!(got, stored);

    // A notification whose events follow one this subscription has not seen yet
    // (announced by a wake-up without events) waits for a read.
    {
        let mut conn = writer.pool().get()?;
        let mut tx = conn.transaction()?;
        writer.append_in(&mut tx, "s-4", ExpectedVersion::Any, &events("Before", 1))?;
        tx.commit()?;
    }
    thread::sleep(Duration::from_millis(20));
    writer.append("s-5", ExpectedVersion::Any, &events("After", 1))?;
    thread::sleep(Duration::from_millis(200));
    assert_eq!(types(&take(&mut all, 2)), ["Before", "After"]);

    // An open transaction that appended holds the next append's events back: its
    // notification cannot prove they come next.
    let mut conn = writer.pool().get()?;
    let mut tx = conn.transaction()?;
    writer.append_in(&mut tx, "s-2", ExpectedVersion::Any, &events("Early", 1))?;
    thread::sleep(Duration::from_millis(20));
    writer.append("s-3", ExpectedVersion::Any, &events("Late", 1))?;
    assert!(
        all.next_timeout(Duration::from_millis(500)).is_none(),
        "an event was delivered past an open appending transaction"
    );
    tx.commit()?;
    let late = take(&mut all, 2);
    assert_eq!(types(&late), ["Early", "Late"]);

    // The same when the later events come from an `append_in` that sends them itself:
    // its `NOTIFY` goes out after the earlier transaction took its id.
    let mut tx = conn.transaction()?;
    writer.append_in(&mut tx, "s-2", ExpectedVersion::Any, &events("Early", 1))?;
    thread::sleep(Duration::from_millis(20));
    {
        let mut conn = writer.pool().get()?;
        let mut later = conn.transaction()?;
        writer.append_in(&mut later, "s-3", ExpectedVersion::Any, &events("Late", 1))?;
        later.commit()?;
    }
    assert!(
        all.next_timeout(Duration::from_millis(500)).is_none(),
        "an append_in's event was delivered past an open appending transaction"
    );
    tx.commit()?;
    let late = take(&mut all, 2);
    assert_eq!(types(&late), ["Early", "Late"]);

    // Anybody who can connect can notify on the channel; without the store's key the
    // events are not delivered.
    let forged = serde_json::json!({
        "prev": late[1].position, "final": true,
        "events": [{ "p": late[1].position + (1 << 30), "id": uuid::Uuid::now_v7(), "s": "s-9",
                     "v": 0, "t": "Forged", "d": "{}", "m": null, "r": 0 }],
    });
    let mut raw = postgres::Client::connect(&server.url(), postgres::NoTls)?;
    for mac in ["0".repeat(64), "x".into()] {
        raw.execute(
            "SELECT pg_notify('payload_events', $1)",
            &[&format!("0123 {mac} {forged}")],
        )?;
    }
    assert!(
        all.next_timeout(Duration::from_millis(300)).is_none(),
        "a forged notification delivered an event"
    );

    // Appends that follow each other within a millisecond send wake-ups alone; the first
    // after a pause sends its events.
    let busy = Config::new(&server.url())?
        .schema("payload")
        .max_connections(1)
        .connect()?;
    let runs = |with_events: bool| notifying_appends(&busy, with_events);
    // (A busy machine can take a millisecond per append for seconds: try for a while.)
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while runs(false) == 0 || runs(true) == 0 {
        assert!(
            Instant::now() < deadline,
            "busy appends never sent a wake-up alone, or never events"
        );
        rounds += 1;
        for _ in 0..20 {
            busy.append("busy", ExpectedVersion::Any, &events("Busy", 1))?;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut n = 0;
    while let Some(e) = all.next_timeout(Duration::from_millis(500)) {
        assert_eq!(e?.event_type, "Busy");
        n += 1;
    }
    assert_eq!(n, 20 * rounds);

    // An append whose events cannot fit in a notification sends a wake-up alone, and
    // the subscriber reads it.
    thread::sleep(Duration::from_millis(20));
    let (with, without) = (runs(true), runs(false));
    let text = "x".repeat(8_000);
    busy.append(
        "big",
        ExpectedVersion::Any,
        &[EventData::json("Big", serde_json::json!({ "text": text }))],
    )?;
    assert_eq!((runs(true), runs(false)), (with, without + 1));
    assert_eq!(
        take(&mut all, 1)[0].data_as::<serde_json::Value>()?["text"],
        text
    );
    Ok(())
}

/// Appends three events to the new stream `order-1`: `all` gets them all, and `orders`
/// (category `order-`, type `Paid`) only the second.
fn three_orders_through_a_filter(
    writer: &Store,
    orders: &mut Subscription,
    all: &mut Subscription,
) -> TestResult {
    writer.append(
        "order-1",
        ExpectedVersion::NoStream,
        &[
            EventData::json("Placed", serde_json::json!({})),
            EventData::json("Paid", serde_json::json!({ "amount": 5 })),
            EventData::json("Shipped", serde_json::json!({})),
        ],
    )?;
    let paid = take(orders, 1).remove(0);
    assert_eq!((paid.event_type.as_str(), paid.version), ("Paid", 1));
    let placed = take(all, 3);
    assert_eq!(types(&placed), ["Placed", "Paid", "Shipped"]);
    assert_eq!(placed[1], paid);
    Ok(())
}

/// How many statements other than appends the store's one pooled connection ran: the
/// subscriptions' reads.
fn reads_run(store: &Store) -> i64 {
    let mut c = store.connection().unwrap();
    c.query_one(
        "SELECT coalesce(sum(generic_plans + custom_plans), 0)::bigint
           FROM pg_prepared_statements
          WHERE strpos(statement, 'INSERT INTO') = 0
            AND strpos(statement, 'pg_prepared_statements') = 0",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Subscribers in the appending process take the events of a sparse pool append from
/// what the append returned, under the same rules as those elsewhere: nothing past an
/// open appending transaction, and busy appends wake them to read.
#[test]
fn subscribers_here_take_a_sparse_appends_events_without_reading_but_never_past_a_gap() -> TestResult
{
    // A private server: no other transaction takes ids, so an append's events are final.
    // (No autovacuum: an ANALYZE takes a transaction id too.)
    let server = crate::common::server::TempServer::start(&["autovacuum = off"]);
    let store = Config::new(&server.url())?
        .schema("local")
        .max_connections(1)
        .connect()?;
    store.migrate()?;
    store.append("s-1", ExpectedVersion::Any, &events("Seed", 1))?;
    let mut all = store.subscribe(SubscribeOptions::all())?;
    let mut orders = store.subscribe(SubscribeOptions::category("order-").event_types(["Paid"]))?;
    let mut stream = store.subscribe(SubscribeOptions::stream("s-1"))?;
    let mut named = store.subscribe(SubscribeOptions::streams(["s-9", "order-1"]))?;
    assert_eq!(take(&mut all, 1)[0].event_type, "Seed");
    assert_eq!(take(&mut stream, 1)[0].event_type, "Seed");
    // The listener has connected, and its wake-up was taken (a stream subscription
    // takes a batch only after a read since the last wake-up without events).
    wait_connected(&store);
    for sub in [&mut all, &mut orders, &mut stream, &mut named] {
        assert!(sub.next_timeout(Duration::from_millis(50)).is_none());
    }

    // One event, its data in a form that `jsonb` writes differently.
    thread::sleep(Duration::from_millis(20));
    let before = reads_run(&store);
    let data = serde_json::json!({ "z": 1.50, "text": "grüße, \"quoted\"\n", "a": [1, 2.0e3] });
    store.append(
        "s-1",
        ExpectedVersion::Exact(0),
        &[EventData::json("Noted", data).metadata(&serde_json::json!({ "by": "test" }))?],
    )?;
    let got = take(&mut all, 1).remove(0);
    assert_eq!(take(&mut stream, 1)[0], got);
    assert_eq!(
        reads_run(&store),
        before,
        "the subscriptions read an event the append handed them"
    );
    let stored = store
        .read_stream("s-1", pg_eventstore::ReadStream::forwards().from_version(1))?
        .next()
        .expect("the event")?;
    assert_eq!(got, stored, "a handed event is the stored one");
    assert_eq!(got.data.as_str(), stored.data.as_str());
    assert_eq!(
        got.metadata.as_ref().map(|m| m.as_str()),
        stored.metadata.as_ref().map(|m| m.as_str())
    );

    // Several events in one append, through a filter: only the matching ones.
    thread::sleep(Duration::from_millis(20));
    let before = reads_run(&store);
    three_orders_through_a_filter(&store, &mut orders, &mut all)?;
    assert_eq!(
        types(&take(&mut named, 3)),
        ["Placed", "Paid", "Shipped"],
        "a stream filter takes the named stream's events, not s-1's"
    );
    assert_eq!(reads_run(&store), before, "the subscriptions read");

    // An `append_in` after a quiet moment: its `NOTIFY`, sent as the caller's
    // transaction commits, carries the events, and this process's listener hands them
    // to the subscriptions, which do not read them. (First the read that any wake-up
    // without events still asks for: here, the listener's first, as it connected.)
    assert!(all.next_timeout(Duration::from_millis(20)).is_none());
    let before = reads_run(&store);
    {
        let mut conn = store.pool().get()?;
        let mut tx = conn.transaction()?;
        let data = serde_json::json!({ "z": 2.50, "text": "in a transaction" });
        let event = EventData::json("InTx", data).metadata(&serde_json::json!({ "by": "tx" }))?;
        store.append_in(&mut tx, "in-tx", ExpectedVersion::NoStream, &[event])?;
        tx.commit()?;
    }
    let got = take(&mut all, 1).remove(0);
    assert_eq!(
        reads_run(&store),
        before,
        "the subscriptions read an append_in's events"
    );
    let stored = store
        .read_stream("in-tx", pg_eventstore::ReadStream::forwards())?
        .next()
        .expect("the event")?;
    assert_eq!(got, stored);
    assert_eq!(got.data.as_str(), stored.data.as_str());

    // A transaction of another database that holds an id cannot append here: it does
    // not hold the events back.
    let mut elsewhere = postgres::Client::connect(
        &format!("{}/template1", server.url().rsplit_once('/').unwrap().0),
        postgres::NoTls,
    )?;
    let mut held = elsewhere.transaction()?;
    held.query_one("SELECT pg_current_xact_id()", &[])?;
    thread::sleep(Duration::from_millis(20));
    let before = reads_run(&store);
    store.append("s-1", ExpectedVersion::Exact(1), &events("Beside", 1))?;
    assert_eq!(take(&mut all, 1)[0].event_type, "Beside");
    assert_eq!(
        reads_run(&store),
        before,
        "a transaction of another database held the events back"
    );
    held.commit()?;

    // More than 64 KiB of JSON in one append: the subscriptions read it, in pages.
    thread::sleep(Duration::from_millis(20));
    let before = reads_run(&store);
    let text = "y".repeat(70_000);
    store.append(
        "big",
        ExpectedVersion::NoStream,
        &[EventData::json("Big", serde_json::json!({ "text": text }))],
    )?;
    assert_eq!(
        take(&mut all, 1)[0].data_as::<serde_json::Value>()?["text"],
        text
    );
    assert!(reads_run(&store) > before, "a large append was handed over");

    // An open transaction that appended holds the next append's events back.
    let other = Config::new(&server.url())?.schema("local").connect()?;
    let mut conn = other.pool().get()?;
    let mut tx = conn.transaction()?;
    other.append_in(&mut tx, "s-2", ExpectedVersion::Any, &events("Early", 1))?;
    thread::sleep(Duration::from_millis(20));
    store.append("s-3", ExpectedVersion::Any, &events("Late", 1))?;
    assert!(
        all.next_timeout(Duration::from_millis(500)).is_none(),
        "an event was delivered past an open appending transaction"
    );
    tx.commit()?;
    assert_eq!(types(&take(&mut all, 2)), ["Early", "Late"]);

    // Appends that follow each other within a millisecond wake the subscribers to read.
    // (A busy machine can take a millisecond per append, for seconds while the other
    // tests run: try for a while.)
    let before = reads_run(&store);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for _ in 0..20 {
            store.append("busy", ExpectedVersion::Any, &events("Busy", 1))?;
        }
        assert_eq!(types(&take(&mut all, 20)), ["Busy"; 20]);
        if reads_run(&store) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "busy appends always handed their events over"
        );
    }
    Ok(())
}

/// A store still at schema version 11 (no key for notifications that carry events)
/// works with this version: appends that notify send a wake-up alone, and a subscriber
/// in another process reads what it is woken for.
#[test]
fn a_store_at_version_11_notifies_without_events_and_subscribers_elsewhere_read() -> TestResult {
    let t = TestStore::new("notify_v11");
    crate::common::client().batch_execute(&format!(
        "DROP FUNCTION \"{s}\".append_in_notify(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text);
         DROP TABLE \"{s}\".feed_key; DELETE FROM \"{s}\".schema_migrations WHERE version >= 12",
        s = t.schema
    ))?;
    let config = Config::new(&crate::common::database_url())?.schema(&t.schema);
    let writer = config.clone().max_connections(1).connect()?;
    assert_eq!(writer.schema_version()?, 11);
    let reader = config.connect()?;
    let mut all = reader.subscribe(SubscribeOptions::all())?;
    assert!(all.next_timeout(Duration::from_millis(50)).is_none());
    // How often the writer's connection sent its own NOTIFY with an append.
    let notified = |store: &Store| -> i64 {
        let mut c = store.connection().unwrap();
        c.query_one(
            "SELECT coalesce(sum(generic_plans + custom_plans), 0)::bigint
               FROM pg_prepared_statements
              WHERE strpos(statement, 'pg_notify(') > 0
                AND strpos(statement, 'pg_prepared_statements') = 0",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let mut n = 0;
    while notified(&writer) == 0 {
        assert!(n < 300, "the writer never sent its own NOTIFY");
        writer.append("s", ExpectedVersion::Any, &events("E", 1))?;
        n += 1;
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(take(&mut all, n).len(), n);
    Ok(())
}

/// Dropped at the end, even when an assertion fails: roles belong to the cluster.
pub(crate) struct DropRole(pub(crate) String);

impl Drop for DropRole {
    fn drop(&mut self) {
        let _ = crate::common::client().batch_execute(&format!(
            "DROP OWNED BY {r}; DROP ROLE IF EXISTS {r}",
            r = self.0
        ));
    }
}

/// A role named `name` (and this process's id) that may use every table and sequence of
/// `t`'s schema, then `revoke` (SQL run as the superuser, `{role}` and `{s}` replaced),
/// and a store of one connection that logs in as it.
fn store_as_role(t: &TestStore, name: &str, revoke: &str) -> Result<(DropRole, Store)> {
    let role = format!("{name}_{}", std::process::id());
    let revoke = revoke.replace("{role}", &role).replace("{s}", &t.schema);
    crate::common::client()
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA \"{s}\" TO {role};
             GRANT ALL ON ALL TABLES IN SCHEMA \"{s}\" TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA \"{s}\" TO {role};
             {revoke}",
            s = t.schema
        ))
        .expect("the role");
    let dropped = DropRole(role.clone());
    let mut pg: postgres::Config = crate::common::database_url().parse().expect("the URL");
    pg.user(&role);
    let store = Config::from_pg(pg)
        .schema(&t.schema)
        .max_connections(1)
        .connect()?;
    Ok((dropped, store))
}

/// A role that may append but not read the store's key still appends while another
/// process listens: its appends send wake-ups alone (before, the statement with the
/// events failed on the key's table), and the other process reads.
#[test]
fn a_role_without_the_key_appends_with_wake_ups_alone() -> TestResult {
    let t = TestStore::new("notify_no_key");
    let (_role, writer) = store_as_role(
        &t,
        "pges_no_key",
        "REVOKE ALL ON \"{s}\".feed_key FROM {role};",
    )?;
    let mut all = t.store.subscribe(SubscribeOptions::all())?;
    assert!(all.next_timeout(Duration::from_millis(50)).is_none());
    let notified = |with_key: bool| notifying_appends(&writer, with_key);
    let mut n = 0;
    while notified(false) == 0 {
        assert!(n < 300, "the writer never sent its own NOTIFY");
        writer.append("s", ExpectedVersion::Any, &events("E", 1))?;
        n += 1;
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(notified(true), 0);
    assert_eq!(take(&mut all, n).len(), n);
    // The role's sessions end before the role goes.
    drop(writer);
    Ok(())
}

/// `migrate()` at start ("safe to run at every start") leaves alone what `connect` found
/// the role may not use: a role that may create in the schema (so the no-op migration
/// runs) but may not read the key still appends with wake-ups alone afterwards.
#[test]
fn a_no_op_migrate_keeps_appends_within_what_the_role_may_do() -> TestResult {
    let t = TestStore::new("notify_no_key_migrate");
    let db: String = crate::common::client()
        .query_one("SELECT current_database()", &[])?
        .get(0);
    let (_role, writer) = store_as_role(
        &t,
        "pges_no_key_migrate",
        &format!(
            "GRANT CREATE ON DATABASE \"{db}\" TO {{role}};
             GRANT CREATE ON SCHEMA \"{{s}}\" TO {{role}};
             REVOKE ALL ON \"{{s}}\".feed_key FROM {{role}};"
        ),
    )?;
    // Another process listens, so that sparse appends send their own NOTIFY.
    let mut all = t.store.subscribe(SubscribeOptions::all())?;
    assert!(all.next_timeout(Duration::from_millis(50)).is_none());
    let report = writer.migrate()?;
    assert!(report.applied.is_empty(), "a no-op migration");
    let mut failed = Vec::new();
    let n = 50;
    for _ in 0..n {
        if let Err(e) = writer.append("s", ExpectedVersion::Any, &events("E", 1)) {
            failed.push(e.report());
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        failed.is_empty(),
        "{} of {n} appends failed after migrate(), first: {}",
        failed.len(),
        failed[0]
    );
    assert!(
        notifying_appends(&writer, false) > 0,
        "no wake-up alone sent"
    );
    assert_eq!(notifying_appends(&writer, true), 0);
    assert_eq!(take(&mut all, n).len(), n);
    // The role's sessions end before the role goes.
    drop(writer);
    Ok(())
}

/// A role that may not execute the `append_in` functions of schema version 15 (an
/// operator revoked them from everyone) appends in its transactions through those of
/// version 14, which it may execute.
#[test]
fn a_role_that_may_not_call_the_record_functions_appends_through_the_others() -> TestResult {
    let t = TestStore::new("append_in_no_record");
    let (_role, writer) = store_as_role(
        &t,
        "pges_no_record",
        "REVOKE EXECUTE ON FUNCTION \"{s}\".append_in_events_record(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text),
             \"{s}\".append_in_any_record(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)
         FROM PUBLIC;
         ALTER ROLE {role} SET track_functions = 'pl';",
    )?;
    let mut conn = writer.pool().get()?;
    let mut tx = conn.transaction()?;
    let first = writer.append_in(&mut tx, "s", ExpectedVersion::NoStream, &events("A", 1))?;
    let second = writer.append_in(&mut tx, "s", ExpectedVersion::Any, &events("B", 2))?;
    assert_eq!((first.last_version, second.last_version), (0, 2));
    let called: Vec<String> = tx
        .query(
            "SELECT funcname::text FROM pg_stat_xact_user_functions
              WHERE schemaname = $1 ORDER BY funcname",
            &[&t.schema],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit()?;
    assert_eq!(called, ["append_in_any", "append_in_events"]);
    drop(conn);
    // The role's sessions end before the role goes.
    drop(writer);
    Ok(())
}

/// A role that may not call `append_in_notify` (an operator revoked it from everyone)
/// still appends in its transactions while another process listens: they leave the
/// wake-up to the commit watcher, or send it alone.
#[test]
fn a_role_that_may_not_call_append_in_notify_still_appends_in_transactions() -> TestResult {
    let t = TestStore::new("notify_no_fn");
    let (_role, writer) = store_as_role(
        &t,
        "pges_no_fn",
        "REVOKE EXECUTE ON FUNCTION \"{s}\".append_in_notify(text, uuid[], text[], jsonb[],
             jsonb[], integer, bigint, text) FROM PUBLIC;",
    )?;
    let mut all = t.store.subscribe(SubscribeOptions::all())?;
    assert!(all.next_timeout(Duration::from_millis(50)).is_none());
    // Past the writer's first look at who listens (once a second), appends after a
    // quiet moment would call the function.
    let until = Instant::now() + Duration::from_millis(1_500);
    let mut n = 0;
    while Instant::now() < until {
        let mut conn = writer.pool().get()?;
        let mut tx = conn.transaction()?;
        writer.append_in(&mut tx, "s", ExpectedVersion::Any, &events("InTx", 1))?;
        tx.commit()?;
        drop(conn);
        n += 1;
        assert_eq!(take(&mut all, 1)[0].version, n - 1);
        thread::sleep(Duration::from_millis(20));
    }
    drop(writer);
    Ok(())
}

/// `position()` is where a subscription goes on from: before its first event, `None`
/// from the start, `p` after `p`, and for a live one a position below which nothing new
/// comes; then the position of the last event delivered. Stream subscriptions: `None`.
#[test]
fn position_is_where_the_subscription_goes_on_from() -> TestResult {
    let t = TestStore::new("sub_position");
    let r = t.append("s-1", ExpectedVersion::NoStream, &events("E", 1))?;
    t.wait_all_visible();
    let mut start = t.subscribe(SubscribeOptions::all())?;
    let after = t.subscribe(SubscribeOptions::all().after(r.last_position))?;
    let live = t.subscribe(SubscribeOptions::all().live())?;
    let stream = t.subscribe(SubscribeOptions::stream("s-1"))?;
    assert_eq!(start.position(), None);
    assert_eq!(after.position(), Some(r.last_position));
    let live_at = live.position().expect("a live subscription's start");
    assert!(
        live_at >= r.last_position,
        "{live_at} < {}",
        r.last_position
    );
    assert_eq!(stream.position(), None);
    let r2 = t.append("s-2", ExpectedVersion::NoStream, &events("E", 1))?;
    assert!(live_at < r2.first_position);
    assert_eq!(take(&mut start, 2)[1].position, r2.last_position);
    for mut sub in [start, after, live] {
        if sub.position() != Some(r2.last_position) {
            take(&mut sub, 1);
        }
        assert_eq!(sub.position(), Some(r2.last_position));
    }
    Ok(())
}

/// A stream subscription delivers what a stream read returns: once `$tb` hides the
/// versions below it, an event appended below `$tb` is neither read nor delivered from
/// its append's events, whether the subscription was caught up before the metadata
/// write, looked at the table between the write and the append, or was made between
/// them. Events at or above `$tb` are delivered as usual.
#[test]
fn a_stream_subscription_honours_truncate_before_like_a_stream_read() -> TestResult {
    // No safety poll meanwhile: its wake-ups, too, make stream subscriptions read.
    let t = TestStore::with("sub_stream_tb", |c| {
        c.poll_interval(Duration::from_secs(60))
    });
    t.append("s-1", ExpectedVersion::NoStream, &events("E", 2))?;
    let mut caught_up = t.subscribe(SubscribeOptions::stream("s-1"))?;
    let mut looked = t.subscribe(SubscribeOptions::stream("s-1"))?;
    wait_connected(&t);
    assert_eq!(take(&mut caught_up, 2).len(), 2);
    assert_eq!(take(&mut looked, 2).len(), 2);
    // Sparse appends, whose events reach this store's subscribers with the append.
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(20));
        t.append("s-1", ExpectedVersion::Any, &events("E", 1))?;
        assert_eq!(take(&mut caught_up, 1).len(), 1);
        assert_eq!(take(&mut looked, 1).len(), 1);
    }
    assert!(caught_up.next_timeout(Duration::from_millis(100)).is_none());
    assert!(looked.next_timeout(Duration::from_millis(100)).is_none());
    t.set_stream_metadata(
        "s-1",
        ExpectedVersion::Any,
        &serde_json::json!({ "$tb": 6 }),
    )?;
    assert!(looked.try_next().is_none());
    let mut made_between = t.subscribe(SubscribeOptions::stream("s-1").after(3))?;
    assert!(made_between.try_next().is_none());
    // Versions 4 and 5 are hidden; 6 is not.
    for n in 4..7 {
        thread::sleep(Duration::from_millis(20));
        t.append("s-1", ExpectedVersion::Any, &events("E", 1))?;
        let read: Vec<u64> = t
            .read_stream("s-1", pg_eventstore::ReadStream::forwards())?
            .map(|e| e.map(|e| e.version))
            .collect::<Result<_>>()?;
        let visible: Vec<u64> = (6..=n).collect();
        assert_eq!(read, visible);
    }
    for (name, sub) in [
        ("caught up", &mut caught_up),
        ("looked", &mut looked),
        ("made between", &mut made_between),
    ] {
        let got: Vec<u64> = take(sub, 1).iter().map(|e| e.version).collect();
        assert_eq!(got, [6], "{name}");
        assert!(
            sub.next_timeout(Duration::from_millis(100)).is_none(),
            "{name}"
        );
    }
    Ok(())
}

/// The positions and ids that a `follow` thread's subscription delivered.
type Followed = std::sync::Arc<std::sync::Mutex<Vec<(u64, uuid::Uuid)>>>;

/// A thread that collects what a `$all` subscription of `store` delivers, until stopped.
fn follow(
    store: &Store,
) -> (
    Followed,
    pg_eventstore::SubscriptionStopper,
    std::thread::JoinHandle<()>,
) {
    let sub = store.subscribe(SubscribeOptions::all()).unwrap();
    let stopper = sub.stopper();
    let got: Followed = Default::default();
    let sink = got.clone();
    let h = std::thread::spawn(move || {
        for item in sub {
            match item {
                Ok(e) => sink.lock().unwrap().push((e.position, e.id)),
                Err(e) => eprintln!("subscription error: {e}"),
            }
        }
    });
    (got, stopper, h)
}

/// `append_in` transactions with savepoints (kept or rolled back), two appends with a
/// pause between them (so that one sends its own `NOTIFY` with events and the other is
/// watched), two streams, whole rollbacks and pool appends: a subscriber here and one in
/// another store get exactly the committed events, in order, once each.
#[test]
fn savepoints_and_mixed_append_in_deliver_exactly_the_committed_events() -> TestResult {
    let t = TestStore::new("sub_savepoints");
    let other = Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .connect()?;
    let (here, stop_here, h1) = follow(&t);
    let (there, stop_there, h2) = follow(&other);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for w in 0..3u64 {
            let (t, stop) = (&t, &stop);
            s.spawn(move || {
                let mut rng = crate::common::Rng(0x9e37_79b9 + w * 7919);
                let mut k = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    k += 1;
                    let a = format!("a{w}-{}", rng.next() % 4);
                    let b = format!("b{w}-{}", rng.next() % 4);
                    match rng.next() % 5 {
                        0 => {
                            t.append(&a, ExpectedVersion::Any, &[crate::append::path_ev("P", k)])
                                .unwrap();
                        }
                        mode => {
                            let mut c = t.pool().get().unwrap();
                            let mut tx = c.transaction().unwrap();
                            t.append_in(
                                &mut tx,
                                &a,
                                ExpectedVersion::Any,
                                &[crate::append::path_ev("T1", k)],
                            )
                            .unwrap();
                            std::thread::sleep(std::time::Duration::from_micros(rng.next() % 3000));
                            tx.batch_execute("SAVEPOINT s").unwrap();
                            let n = 1 + (rng.next() % 3) as usize;
                            let evs: Vec<EventData> =
                                (0..n).map(|i| crate::append::path_ev("T2", i)).collect();
                            t.append_in(&mut tx, &b, ExpectedVersion::Any, &evs)
                                .unwrap();
                            if mode == 1 {
                                tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
                            } else {
                                tx.batch_execute("RELEASE SAVEPOINT s").unwrap();
                            }
                            std::thread::sleep(std::time::Duration::from_micros(rng.next() % 2000));
                            if mode == 2 {
                                t.append_in(
                                    &mut tx,
                                    &a,
                                    ExpectedVersion::Any,
                                    &[crate::append::path_ev("T3", k)],
                                )
                                .unwrap();
                            }
                            if rng.next() % 6 == 0 {
                                tx.rollback().unwrap();
                            } else {
                                tx.commit().unwrap();
                            }
                        }
                    }
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        // Kill the other store's listener once meanwhile.
        let pid = other.listener_state().expect("listener").backend_pid;
        crate::common::client()
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    t.wait_all_visible();
    let all: Vec<(u64, uuid::Uuid)> = t
        .read_all(pg_eventstore::ReadAll::from_start())?
        .map(|e| e.map(|e| (e.position, e.id)))
        .collect::<pg_eventstore::Result<_>>()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while (here.lock().unwrap().len() < all.len() || there.lock().unwrap().len() < all.len())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop_here.stop();
    stop_there.stop();
    h1.join().unwrap();
    h2.join().unwrap();
    let here = here.lock().unwrap().clone();
    let there = there.lock().unwrap().clone();
    eprintln!(
        "committed {}, here {}, there {}",
        all.len(),
        here.len(),
        there.len()
    );
    for (name, got) in [("here", &here), ("there", &there)] {
        if *got != all {
            let first = got.iter().zip(&all).position(|(a, b)| a != b);
            panic!(
                "{name}: {} events against {} committed; first difference at {first:?}",
                got.len(),
                all.len()
            );
        }
    }
    Ok(())
}
