use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{client, events, wait_visible, Fault, TestResult, TestStore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pg_eventstore::{
    Error, EventData, ExpectedVersion, IfLocked, ImportOptions, OnFailure, RecordedEvent, Store,
};

/// 10 streams × `per_stream` events, appended in interleaved batches.
fn fill(t: &TestStore, per_stream: usize) -> u64 {
    let mut last = 0;
    for round in 0..per_stream / 5 {
        for s in 0..10 {
            let stream = format!("acc-{s}");
            let expected = if round == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(round as u64 * 5 - 1)
            };
            last = t
                .append(&stream, expected, &events("E", 5))
                .unwrap()
                .last_position;
        }
    }
    wait_visible(t, last);
    last
}

type Totals = Mutex<Vec<(String, Vec<(String, String)>, u64)>>;

/// The global recorder, installed on first use: a test that reads a counter calls this
/// before its worker runs, or what the worker counts first goes nowhere.
fn recorder() -> &'static (Snapshotter, Totals) {
    static RECORDER: OnceLock<(Snapshotter, Totals)> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only global recorder");
        (snapshotter, Mutex::new(Vec::new()))
    })
}

/// A counter's total over the whole test binary, for the labels given. Workers count on
/// their own threads, so the recorder is global; a snapshot drains it, so every look
/// adds what it drained to running totals that all tests share.
fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let (snapshotter, totals) = recorder();
    let mut totals = totals.lock().unwrap();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Counter(n) = value {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            totals.push((key.key().name().to_string(), labels, n));
        }
    }
    totals
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|t| t.2)
        .sum()
}

/// Waits up to 20 s for `f` to hold.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn store_with(name: &str) -> TestStore {
    TestStore::with(name, |c| c.max_connections(10))
}

#[test]
fn batch_mode_handles_everything_once_and_checkpoints() -> TestResult {
    let t = store_with("worker_batch");
    let last = fill(&t, 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let summary = t.worker("batch").threads(4).run_batch(move |e| {
        sink.lock().unwrap().push(e.id);
        Ok(())
    })?;
    assert_eq!(summary.handled, 200);
    assert_eq!(summary.checkpoint, Some(last));
    assert_eq!(t.checkpoint("batch")?, Some(last));
    let ids: HashSet<_> = seen.lock().unwrap().iter().copied().collect();
    assert_eq!(ids.len(), 200);
    // Run again: nothing new.
    let again = t.worker("batch").run_batch(|_| Ok(()))?;
    assert_eq!(again.handled, 0);
    Ok(())
}

/// A log written stream by stream (an import), whose streams a fixed stream-to-thread
/// hash would all give to one thread: the transactional handler runs on every thread,
/// one stream at a time, each stream in order.
#[test]
fn streams_written_one_after_another_spread_over_the_threads() -> TestResult {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let t = store_with("worker_spread");
    // 24 streams that `DefaultHasher % 4` puts on thread 0.
    let streams: Vec<String> = (0..)
        .map(|k| format!("spread-{k}"))
        .filter(|s| {
            let mut h = DefaultHasher::new();
            s.hash(&mut h);
            h.finish() % 4 == 0
        })
        .take(24)
        .collect();
    let input: Vec<(&str, EventData)> = streams
        .iter()
        .flat_map(|s| events("E", 20).into_iter().map(move |e| (s.as_str(), e)))
        .collect();
    t.import(&input, ImportOptions::new())?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let summary = t
        .worker("spread")
        .threads(4)
        .run_batch_transactional(move |_, e| {
            sink.lock()
                .unwrap()
                .push((e.stream_id.clone(), e.version, thread::current().id()));
            Ok(())
        })?;
    assert_eq!(summary.handled, 480);
    let seen = seen.lock().unwrap();
    let threads: HashSet<_> = seen.iter().map(|(_, _, t)| *t).collect();
    assert!(threads.len() >= 3, "ran on {} threads", threads.len());
    let mut next: HashMap<&str, u64> = HashMap::new();
    for (stream, version, _) in seen.iter() {
        let v = next.entry(stream).or_insert(0);
        assert_eq!(*version, *v, "stream {stream} out of order");
        *v += 1;
    }
    Ok(())
}

#[test]
fn per_stream_order_with_four_threads() -> TestResult {
    let t = store_with("worker_order");
    fill(&t, 30);
    let busy = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let threads_used = Arc::new(Mutex::new(HashSet::new()));
    let (b, n, u) = (busy.clone(), next.clone(), threads_used.clone());
    let summary = t.worker("order").threads(4).run_batch(move |e| {
        assert!(
            b.lock().unwrap().insert(e.stream_id.clone()),
            "stream {} handled by two threads at once",
            e.stream_id
        );
        u.lock().unwrap().insert(thread::current().id());
        {
            let mut next = n.lock().unwrap();
            let v = next.entry(e.stream_id.clone()).or_insert(0);
            assert_eq!(e.version, *v, "stream {} out of order", e.stream_id);
            *v += 1;
        }
        thread::sleep(Duration::from_micros(200));
        b.lock().unwrap().remove(&e.stream_id);
        Ok(())
    })?;
    assert_eq!(summary.handled, 300);
    assert!(next.lock().unwrap().values().all(|v| *v == 30));
    assert!(
        threads_used.lock().unwrap().len() > 1,
        "ran on one thread only"
    );
    Ok(())
}

/// Puts the checkpoint back, as if the worker had crashed before writing it.
fn crash_back_to(t: &TestStore, name: &str, position: Option<u64>) {
    let sql = match position {
        Some(_) => format!(
            "UPDATE \"{}\".checkpoints SET position = $2 WHERE processor_name = $1",
            t.schema
        ),
        None => format!(
            "DELETE FROM \"{}\".checkpoints WHERE processor_name = $1 AND $2::bigint IS NULL",
            t.schema
        ),
    };
    crate::common::client()
        .execute(&sql, &[&name, &position.map(|p| p as i64)])
        .unwrap();
}

#[test]
fn after_a_crash_plain_handlers_see_events_again_and_transactional_ones_do_not() -> TestResult {
    let t = store_with("worker_crash");
    fill(&t, 20);
    let first_positions: Vec<u64> = t
        .read_all(pg_eventstore::ReadAll::from_start().max_count(60))?
        .map(|e| e.unwrap().position)
        .collect();
    let mut conn = t.pool().get()?;
    conn.batch_execute(&format!(
        "CREATE TABLE \"{}\".per_stream (stream_id text PRIMARY KEY, n int NOT NULL)",
        t.schema
    ))?;
    let upsert = format!(
        "INSERT INTO \"{}\".per_stream VALUES ($1, 1)
         ON CONFLICT (stream_id) DO UPDATE SET n = per_stream.n + 1",
        t.schema
    );

    // At-least-once: a plain handler.
    let count = Arc::new(Mutex::new(HashMap::<uuid::Uuid, u32>::new()));
    let c = count.clone();
    let run_plain = |c: Arc<Mutex<HashMap<uuid::Uuid, u32>>>| {
        t.worker("plain").threads(3).run_batch(move |e| {
            *c.lock().unwrap().entry(e.id).or_insert(0) += 1;
            Ok(())
        })
    };
    assert_eq!(run_plain(c.clone())?.handled, 200);
    crash_back_to(&t, "plain", Some(first_positions[59]));
    assert_eq!(run_plain(c)?.handled, 140);
    let count = count.lock().unwrap();
    assert_eq!(count.len(), 200, "every event at least once");
    assert_eq!(count.values().filter(|n| **n == 2).count(), 140);

    // Exactly-once: a transactional handler writing a read model.
    let run_tx = || {
        let upsert = upsert.clone();
        t.worker("model")
            .threads(3)
            .run_batch_transactional(move |tx, e| {
                tx.execute(&upsert, &[&e.stream_id])?;
                Ok(())
            })
    };
    assert_eq!(run_tx()?.handled, 200);
    crash_back_to(&t, "model", Some(first_positions[10]));
    let second = run_tx()?;
    assert_eq!((second.handled, second.skipped), (0, 189));
    crash_back_to(&t, "model", None);
    let third = run_tx()?;
    assert_eq!((third.handled, third.skipped), (0, 200));
    let counts: Vec<i32> = conn
        .query(&format!("SELECT n FROM \"{}\".per_stream", t.schema), &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        counts,
        vec![20; 10],
        "the read model counts each event once"
    );
    Ok(())
}

#[test]
fn the_checkpoint_never_passes_an_unfinished_event() -> TestResult {
    let t = store_with("worker_stall");
    fill(&t, 10);
    let stalled: RecordedEvent = t
        .read_all(pg_eventstore::ReadAll::from_start())?
        .map(|e| e.unwrap())
        .find(|e| e.stream_id == "acc-3" && e.version == 2)
        .unwrap();
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    let stalled_id = stalled.id;
    let worker = t
        .worker("stall")
        .threads(4)
        .checkpoint_interval(Duration::from_millis(10))
        .spawn(move |e| {
            if e.id == stalled_id {
                release_rx.recv().unwrap();
            }
            Ok(())
        })?;
    // Let the other streams run and the checkpoint settle where it is held.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let held = loop {
        thread::sleep(Duration::from_millis(300));
        let now = t.checkpoint("stall");
        match (&now, &last) {
            (Ok(Some(p)), Some(q)) if p == q => break now,
            _ if Instant::now() > deadline => break now,
            (Ok(p), _) => last = *p,
            _ => {}
        }
    };
    release_tx.send(())?; // before asserting, so that a failure cannot hang the worker
    let held = held?;
    assert!(
        held.is_some_and(|p| p < stalled.position),
        "checkpoint {held:?} passed the stalled event at {}",
        stalled.position
    );
    let summary = worker.stop()?;
    assert_eq!(summary.handled, 100);
    let head = t.head_position()?.unwrap();
    assert_eq!(t.checkpoint("stall")?, Some(head));
    Ok(())
}

#[test]
fn retries_then_parks_and_goes_on() -> TestResult {
    recorder();
    let t = store_with("worker_park");
    fill(&t, 5);
    let bad = t
        .read_stream("acc-7", pg_eventstore::ReadStream::forwards())?
        .nth(1)
        .unwrap()?;
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let bad_id = bad.id;
    let summary = t
        .worker("park")
        .threads(2)
        .retries(2)
        .retry_delay(Duration::from_millis(1))
        .on_failure(OnFailure::Park)
        .run_batch(move |e| {
            if e.id == bad_id {
                *c.lock().unwrap() += 1;
                return Err("the mail server said no".into());
            }
            Ok(())
        })?;
    assert_eq!(*calls.lock().unwrap(), 3, "one call and two retries");
    let errors = |kind| {
        counter(
            "pg_eventstore_worker_errors_total",
            &[("processor", "park"), ("kind", kind)],
        )
    };
    assert_eq!((errors("handler"), errors("parked")), (2, 1));
    assert_eq!(
        (summary.handled, summary.parked, summary.retries),
        (49, 1, 2)
    );
    let row = crate::common::client().query_one(
        &format!(
            "SELECT event_id, stream_id, stream_version, attempts, error FROM \"{}\".dead_letters",
            t.schema
        ),
        &[],
    )?;
    assert_eq!(row.get::<_, uuid::Uuid>(0), bad.id);
    assert_eq!(row.get::<_, String>(1), "acc-7");
    assert_eq!(row.get::<_, i64>(2), 1);
    assert_eq!(row.get::<_, i32>(3), 3);
    assert_eq!(row.get::<_, String>(4), "the mail server said no");
    assert_eq!(summary.checkpoint, t.head_position()?);
    Ok(())
}

#[test]
fn stop_policy_returns_the_error_and_keeps_the_checkpoint_before_it() -> TestResult {
    let t = store_with("worker_stop");
    fill(&t, 5);
    let bad = t
        .read_stream("acc-4", pg_eventstore::ReadStream::forwards())?
        .nth(3)
        .unwrap()?;
    let bad_id = bad.id;
    let err = t
        .worker("stopper")
        .retries(1)
        .retry_delay(Duration::from_millis(1))
        .run_batch(move |e| {
            if e.id == bad_id {
                Err("boom".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
    match &err {
        Error::Handler {
            stream,
            position,
            attempts,
            ..
        } => {
            assert_eq!(
                (stream.as_str(), *position, *attempts),
                ("acc-4", bad.position, 2)
            );
        }
        other => panic!("expected a handler error, got {other:?}"),
    }
    assert!(err.report().contains("boom"), "{err}");
    let checkpoint = t.checkpoint("stopper")?;
    assert!(
        checkpoint.is_none_or(|c| c < bad.position),
        "{checkpoint:?}"
    );
    Ok(())
}

#[test]
fn a_second_worker_with_the_same_name_is_refused_and_live_mode_follows() -> TestResult {
    let t = store_with("worker_lock");
    let seen = Arc::new(Mutex::new(0u64));
    let s = seen.clone();
    let first = t.worker("single").spawn(move |_| {
        *s.lock().unwrap() += 1;
        Ok(())
    })?;
    match t.worker("single").spawn(|_| Ok(())) {
        Err(Error::ProcessorLocked { name }) => assert_eq!(name, "single"),
        other => panic!("expected ProcessorLocked, got {other:?}"),
    }
    assert!(matches!(
        t.worker("single").run_batch(|_| Ok(())),
        Err(Error::ProcessorLocked { .. })
    ));
    // Live: events appended while it runs are handled.
    t.append("live", ExpectedVersion::NoStream, &events("E", 7))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while *seen.lock().unwrap() < 7 {
        assert!(
            Instant::now() < deadline,
            "the live worker did not handle the events"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // A waiting worker starts once the first one stops.
    let store: Store = t.store.clone();
    let waiter = thread::spawn(move || {
        store
            .worker("single")
            .if_locked(IfLocked::Wait)
            .run_batch(|_| Ok(()))
    });
    thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "the waiting worker did not wait");
    let summary = first.stop()?;
    assert_eq!(summary.handled, 7);
    assert_eq!(waiter.join().unwrap()?.handled, 0);
    Ok(())
}

/// A standby (`IfLocked::Wait`) started with `spawn` gets its handle at once, while it
/// waits for the lock: its stopper ends the wait, and it ends cleanly with nothing
/// handled. One that is not stopped takes the lock once the other instance stops. A
/// group member with `IfLocked::Wait` does the same.
#[test]
fn a_waiting_standby_returns_its_handle_at_once_and_can_be_stopped() -> TestResult {
    let t = TestStore::with("worker_standby", |c| c.max_connections(12));
    t.append("s", ExpectedVersion::NoStream, &events("E", 3))?;
    let active = t.worker("x").spawn(|_| Ok(()))?;
    wait_for("the active instance's checkpoint", || {
        t.checkpoint("x").unwrap().is_some()
    });
    let store = t.store.clone();
    let standby = thread::spawn(move || {
        store
            .worker("x")
            .if_locked(IfLocked::Wait)
            .spawn(|_| Ok(()))
    });
    wait_for("spawn returns", || standby.is_finished());
    let standby = standby.join().unwrap()?;
    let store = t.store.clone();
    let group = thread::spawn(move || {
        store
            .worker("x")
            .if_locked(IfLocked::Wait)
            .group(pg_eventstore::GroupOptions::new().partitions(1))
            .spawn(|_| Ok(()))
    });
    wait_for("the group's spawn returns", || group.is_finished());
    let group = group.join().unwrap()?;
    thread::sleep(Duration::from_millis(300));
    assert!(standby.is_running() && group.is_running(), "both wait");
    assert!(group.partitions().is_empty());
    let asked = Instant::now();
    standby.stopper().stop();
    let summary = standby.join()?;
    assert_eq!(summary.handled, 0);
    assert_eq!(group.stop()?.acquired, 0);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        t.group_members("x")?.is_empty(),
        "the waiting member never joined"
    );

    // A standby that is not stopped takes over once the active instance stops.
    let handled = Arc::new(Mutex::new(0u64));
    let h = handled.clone();
    let standby = t.worker("x").if_locked(IfLocked::Wait).spawn(move |_| {
        *h.lock().unwrap() += 1;
        Ok(())
    })?;
    active.stop()?;
    t.append("s", ExpectedVersion::Exact(2), &events("E", 1))?;
    wait_for("the standby handles the new event", || {
        *handled.lock().unwrap() == 1
    });
    assert_eq!(standby.stop()?.handled, 1);
    Ok(())
}

/// The backend holding processor `name`'s lock (see `ProcessorLock`: class "PES2",
/// `hashtext('<schema>:<name>')`), if one does.
fn lock_holder(t: &TestStore, name: &str) -> Option<i32> {
    lock_holder_on(&mut client(), &t.schema, name)
}

fn lock_holder_on(client: &mut postgres::Client, schema: &str, name: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 2
                AND classid::text::bigint = 1346720562
                AND objid::text::bigint = (hashtext($1)::bigint + 4294967296) % 4294967296",
            &[&format!("{schema}:{name}")],
        )
        .unwrap()
        .map(|r| r.get(0))
}

/// Terminates the backend holding processor `name`'s lock, once one does; returns its pid.
fn kill_lock(t: &TestStore, name: &str) -> i32 {
    let mut pid = None;
    wait_for("a lock holder", || {
        pid = lock_holder(t, name);
        pid.is_some()
    });
    let pid = pid.unwrap();
    let killed: bool = client()
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(killed);
    pid
}

/// A worker whose lock's session ends (a network failure, a restart, the server's
/// `idle_session_timeout`) no longer holds the lock, and another instance could start.
/// It must notice and stop its handlers rather than run on beside it: a batch run
/// returns `ProcessorLockLost`; a live worker takes the lock again (when it is free) and
/// goes on from its checkpoint.
#[test]
fn a_worker_that_loses_its_lock_stops_its_handlers_and_takes_it_again() -> TestResult {
    let t = store_with("worker_lock_lost");
    let handled = Arc::new(Mutex::new(0u64));
    let h = handled.clone();
    let worker = t
        .worker("kept")
        .checkpoint_interval(Duration::ZERO)
        .spawn(move |_| {
            *h.lock().unwrap() += 1;
            Ok(())
        })?;
    let first = t.append("s", ExpectedVersion::NoStream, &events("E", 5))?;
    wait_for("the first events", || *handled.lock().unwrap() == 5);
    // Without the lock nothing is written: what is after the stored checkpoint when the
    // lock is lost is handled again (at-least-once). Here nothing is.
    wait_for("their checkpoint", || {
        t.checkpoint("kept").unwrap() == Some(first.last_position)
    });
    let old = kill_lock(&t, "kept");
    wait_for("the lock taken again", || {
        lock_holder(&t, "kept").is_some_and(|pid| pid != old)
    });
    assert!(worker.is_running());
    t.append("s", ExpectedVersion::Exact(4), &events("E", 5))?;
    wait_for("the later events", || *handled.lock().unwrap() == 10);
    let summary = worker.stop()?;
    assert_eq!(summary.handled, 10, "both runs, nothing twice");

    // A batch run (a job, to be run again) returns the error.
    t.append("b", ExpectedVersion::NoStream, &events("E", 400))?;
    let store = t.store.clone();
    let batch = thread::spawn(move || {
        store.worker("batch").threads(1).run_batch(|_| {
            thread::sleep(Duration::from_millis(5));
            Ok(())
        })
    });
    thread::sleep(Duration::from_millis(200));
    kill_lock(&t, "batch");
    match batch.join().unwrap() {
        Err(Error::ProcessorLockLost { name, .. }) => assert_eq!(name, "batch"),
        other => panic!("expected ProcessorLockLost, got {other:?}"),
    }
    Ok(())
}

/// A worker whose lock's session ended during a handler call writes no checkpoint after
/// that call: its writes go through the lock's session. So a reset made while the lock
/// was free holds: the worker takes the lock again and rebuilds from the first event,
/// instead of writing its old low-water mark over the reset and going on from there.
#[test]
fn a_worker_that_lost_its_lock_writes_no_checkpoint_so_a_reset_meanwhile_holds() -> TestResult {
    let t = store_with("worker_lost_reset");
    // Lets the blocked handler call go on when set (and on any way out of the test).
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let release = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let (r, s) = (release.clone(), seen.clone());
    let worker = t
        .worker("w")
        .checkpoint_interval(Duration::ZERO)
        .spawn(move |e| {
            s.lock().unwrap().push(e.version);
            let deadline = Instant::now() + Duration::from_secs(30);
            while e.version == 1 && !r.load(Ordering::SeqCst) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5)); // a slow handler call
            }
            Ok(())
        })?;
    let release = Release(release);
    t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    wait_for("the first event", || seen.lock().unwrap().len() == 1);
    wait_for("its checkpoint", || t.checkpoint("w").unwrap().is_some());
    let first = t.checkpoint("w")?;
    let second = t.append("s", ExpectedVersion::Exact(0), &events("E", 1))?;
    wait_for("the second event in the handler", || {
        seen.lock().unwrap().len() == 2
    });

    // The lock's session ends; the operator resets the processor while the lock is free.
    let pid = kill_lock(&t, "w");
    let mut report = None;
    wait_for("the reset", || match t.reset_processor("w") {
        Ok(r) => {
            report = Some(r);
            true
        }
        Err(_) => false,
    });
    assert_eq!(report.unwrap().checkpoint, first);
    assert_eq!(t.checkpoint("w")?, None, "the reset removed the checkpoint");

    // The handler call ends; the worker takes its lock again and rebuilds.
    drop(release);
    wait_for("the lock taken again", || {
        lock_holder(&t, "w").is_some_and(|p| p != pid)
    });
    wait_for("the rebuild from the first event", || {
        seen.lock().unwrap().len() >= 4
    });
    wait_for("the rebuilt checkpoint", || {
        t.checkpoint("w").unwrap() == Some(second.last_position)
    });
    worker.stop()?;
    assert_eq!(*seen.lock().unwrap(), [0, 1, 0, 1]);
    Ok(())
}

/// A handler that fails and is being retried when the worker's lock's session ends is
/// not called again: before each retry the lock is checked, so the retries do not run
/// on beside another instance that took the free lock. The event is left for the
/// instance that holds the lock.
#[test]
fn a_retrying_handler_is_not_called_again_after_the_lock_is_lost() -> TestResult {
    let t = TestStore::with("worker_retry_lock", |c| c.max_connections(12));
    t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let c = calls.clone();
    let first = t
        .worker("r")
        .retries(6)
        .retry_delay(Duration::from_millis(100))
        .spawn(move |_| {
            c.lock().unwrap().push(Instant::now());
            Err("downstream unavailable".into())
        })?;
    wait_for("the first call", || !calls.lock().unwrap().is_empty());
    kill_lock(&t, "r");
    // Another instance starts as soon as the lock is free.
    let second_calls = Arc::new(Mutex::new(0u32));
    let mut second = None;
    wait_for("the second instance", || {
        let s2 = second_calls.clone();
        match t.worker("r").spawn(move |_| {
            *s2.lock().unwrap() += 1;
            Ok(())
        }) {
            Ok(h) => {
                second = Some(h);
                true
            }
            Err(_) => false,
        }
    });
    let started = Instant::now();
    wait_for("the second instance handles the event", || {
        *second_calls.lock().unwrap() == 1
    });
    thread::sleep(Duration::from_secs(1));
    let after: Vec<Duration> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > started)
        .map(|at| at.duration_since(started))
        .collect();
    second.unwrap().stop()?;
    first.stop()?;
    assert!(
        after.is_empty(),
        "the instance that lost its lock called its handler {} more times after another \
         instance had started (at {after:?} after it)",
        after.len()
    );
    Ok(())
}

/// A stop ends a failing handler's retries at once (it does not wait for every retry
/// and backoff), cleanly: the event stays after the checkpoint, and the next run
/// handles it.
#[test]
fn a_stop_ends_a_failing_handler_s_retries_and_leaves_its_event_for_the_next_run() -> TestResult {
    let t = store_with("worker_retry_stop");
    let r = t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    for transactional in [false, true] {
        let name = format!("r{}", u8::from(transactional));
        let calls = Arc::new(Mutex::new(0u32));
        let c = calls.clone();
        let worker = t
            .worker(&name)
            .retries(6)
            .retry_delay(Duration::from_millis(100));
        let worker = if transactional {
            worker.spawn_transactional(move |_, _| {
                *c.lock().unwrap() += 1;
                Err("downstream unavailable".into())
            })?
        } else {
            worker.spawn(move |_| {
                *c.lock().unwrap() += 1;
                Err("downstream unavailable".into())
            })?
        };
        wait_for("the first call", || *calls.lock().unwrap() >= 1);
        let asked = Instant::now();
        let summary = worker.stop()?;
        let took = asked.elapsed();
        // Six retries wait 100 ms doubling (jittered): about 3 to 6 s in all.
        assert!(
            took < Duration::from_millis(1500),
            "stop took {took:?} ({} handler calls)",
            calls.lock().unwrap()
        );
        assert_eq!(
            (summary.handled, summary.checkpoint),
            (0, None),
            "{summary:?}"
        );
        assert_eq!(t.checkpoint(&name)?, None);
        let again = t.worker(&name).run_batch(|_| Ok(()))?;
        assert_eq!(again.handled, 1);
        assert_eq!(again.checkpoint, Some(r.last_position));
    }
    Ok(())
}

/// A live worker rides out a database restart: afterwards it holds its lock again (on a
/// new session) and handles what is appended, every event once.
#[test]
fn a_live_worker_rides_out_a_database_restart_and_holds_its_lock_again() -> TestResult {
    let server = crate::common::server::TempServer::start(&[]);
    let store = pg_eventstore::Config::new(&server.url())?
        .schema("restart")
        .max_connections(8)
        .connect()?;
    store.migrate()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let worker = store.worker("kept").spawn(move |e| {
        s.lock().unwrap().push(e.version);
        Ok(())
    })?;
    store.append("s", ExpectedVersion::NoStream, &events("E", 20))?;
    wait_for("the first events", || seen.lock().unwrap().len() == 20);
    server.stop();
    thread::sleep(Duration::from_millis(500));
    server.start_again();
    store.append("s", ExpectedVersion::Exact(19), &events("E", 20))?;
    wait_for("the later events", || seen.lock().unwrap().len() >= 40);
    let mut c = postgres::Client::connect(&server.url(), postgres::NoTls)?;
    wait_for("the lock held again", || {
        lock_holder_on(&mut c, "restart", "kept").is_some()
    });
    assert!(worker.is_running());
    worker.stop()?;
    // Every event, in order; the last checkpoint before the restart may leave a few
    // handled twice (at least once), never out of order or missing.
    let seen = seen.lock().unwrap();
    let mut last = None;
    for v in seen.iter() {
        assert!(last.is_none_or(|l| *v == l + 1 || *v <= l), "{seen:?}");
        last = Some(*v);
    }
    let distinct: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), 40);
    Ok(())
}

/// A server that ends idle sessions after 1 s (`idle_session_timeout`): a live worker
/// keeps its lock through three idle seconds (its lock's session is never idle that long)
/// and handles what is appended after them, as does a subscription.
#[test]
fn a_worker_keeps_its_lock_under_idle_session_timeout() -> TestResult {
    let t = store_with("worker_idle_session");
    let mut pg: pg_eventstore::postgres::Config = crate::common::database_url().parse()?;
    pg.options("-c idle_session_timeout=1000");
    let store = Store::connect(
        pg_eventstore::Config::from_pg(pg)
            .schema(&t.schema)
            .max_connections(10),
    )?;
    let handled = Arc::new(Mutex::new(0u64));
    let h = handled.clone();
    let worker = store.worker("idle").spawn(move |_| {
        *h.lock().unwrap() += 1;
        Ok(())
    })?;
    let mut sub = store.subscribe(pg_eventstore::SubscribeOptions::all())?;
    thread::sleep(Duration::from_secs(3));
    assert!(worker.is_running(), "the worker stopped while idle");
    store.append("s", ExpectedVersion::NoStream, &events("E", 3))?;
    for _ in 0..3 {
        sub.next_timeout(Duration::from_secs(10))
            .expect("the subscription delivers")?;
    }
    wait_for("the worker to handle the events", || {
        *handled.lock().unwrap() == 3
    });
    assert!(lock_holder(&t, "idle").is_some());
    assert_eq!(worker.stop()?.handled, 3);
    Ok(())
}

/// What the handlers of two instances of one processor did, to find overlaps.
#[derive(Default)]
struct Overlaps {
    /// stream -> the instance inside its handler now.
    busy: HashMap<String, u8>,
    /// "stream: instance x entered while y was inside".
    overlaps: Vec<String>,
    /// (instance, stream, version, entered, left), in the order handlers finished.
    log: Vec<(u8, String, u64, Instant, Instant)>,
}

fn watched(
    shared: &Arc<Mutex<Overlaps>>,
    instance: u8,
) -> impl Fn(&RecordedEvent) -> Result<(), pg_eventstore::HandlerError> + Send + Sync + 'static {
    let shared = shared.clone();
    move |e| {
        let entered = Instant::now();
        {
            let mut s = shared.lock().unwrap();
            if let Some(other) = s.busy.insert(e.stream_id.clone(), instance) {
                let msg = format!(
                    "{}: instance {instance} entered at v{} while instance {other} was inside",
                    e.stream_id, e.version
                );
                s.overlaps.push(msg);
            }
        }
        thread::sleep(Duration::from_millis(2));
        let mut s = shared.lock().unwrap();
        s.busy.remove(&e.stream_id);
        s.log.push((
            instance,
            e.stream_id.clone(),
            e.version,
            entered,
            Instant::now(),
        ));
        Ok(())
    }
}

#[test]
fn a_failed_checkpoint_write_ends_every_handler_before_another_instance_starts() -> TestResult {
    let t = store_with("worker_overlap");
    fill(&t, 100);
    let fault = Fault::install(&t, "checkpoints");
    let shared = Arc::new(Mutex::new(Overlaps::default()));
    let first = t
        .worker("twice")
        .threads(4)
        .checkpoint_interval(Duration::ZERO)
        .spawn(watched(&shared, 1))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while shared.lock().unwrap().log.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "the first instance handled nothing"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // A second instance waits for the lock, as a second process would.
    let store: Store = t.store.clone();
    let handlers = watched(&shared, 2);
    let second = thread::spawn(move || {
        store
            .worker("twice")
            .threads(4)
            .if_locked(IfLocked::Wait)
            .spawn(handlers)
    });
    // The next checkpoint write fails, with an error that is not worth a retry.
    fault.inject(Some("42501"), 1);
    let err = first.join().unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    let second = second.join().unwrap()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = {
            let s = shared.lock().unwrap();
            s.log
                .iter()
                .filter(|(i, _, v, _, _)| *i == 2 && *v == 99)
                .count()
        };
        if done == 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second instance did not finish"
        );
        thread::sleep(Duration::from_millis(10));
    }
    second.stop()?;
    let s = shared.lock().unwrap();
    assert!(
        s.overlaps.is_empty(),
        "{:#?}",
        &s.overlaps[..s.overlaps.len().min(10)]
    );
    // Every handler call of the first instance ended before the second one's first began.
    let first_left = s
        .log
        .iter()
        .filter(|l| l.0 == 1)
        .map(|l| l.4)
        .max()
        .unwrap();
    let second_entered = s
        .log
        .iter()
        .filter(|l| l.0 == 2)
        .map(|l| l.3)
        .min()
        .unwrap();
    assert!(
        first_left <= second_entered,
        "the first instance was still handling {:?} after the second one started",
        first_left - second_entered
    );
    // Each instance saw each stream in order, without gaps.
    for instance in [1, 2] {
        let mut next: HashMap<&str, u64> = HashMap::new();
        for (_, stream, version, _, _) in s.log.iter().filter(|l| l.0 == instance) {
            let n = next.entry(stream).or_insert(*version);
            assert_eq!(*version, *n, "instance {instance}: {stream} out of order");
            *n += 1;
        }
    }
    Ok(())
}

/// A transactional handler's transaction that drops the session's prepared statements
/// (`DEALLOCATE ALL`) part way through a group of events: the group fails on a missing
/// statement, its connection forgets the handler's and the store's statements, its
/// events are handled one by one, and the groups after it run on statements prepared
/// again. Before, the connection kept failing on its cached statements: the worker gave
/// up on an event after its retries, and every later group failed on the store's stale
/// statement.
#[test]
fn a_transactional_handler_after_deallocate_all_prepares_again() -> TestResult {
    recorder();
    let t = TestStore::with("worker_deallocate", |c| c.max_connections(4));
    fill(&t, 5);
    let mut conn = client();
    let model = format!("\"{}\".model", t.schema);
    conn.batch_execute(&format!("CREATE TABLE {model} (id uuid PRIMARY KEY)"))?;
    let insert = format!("INSERT INTO {model} VALUES ($1)");
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let summary = t
        .worker("deallocate-all")
        .threads(1)
        .transaction_batch(10, Duration::ZERO)
        .retries(3)
        .retry_delay(Duration::from_millis(1))
        .run_batch_transactional(move |tx, e| {
            let insert = pg_eventstore::Worker::prepare_cached(tx, &insert)?;
            tx.execute(&insert, &[&e.id])?;
            let mut calls = c.lock().unwrap();
            *calls += 1;
            if *calls == 5 {
                tx.batch_execute("DEALLOCATE ALL")?;
            }
            Ok(())
        })?;
    assert_eq!((summary.handled, summary.parked), (50, 0));
    let rows: i64 = conn
        .query_one(&format!("SELECT count(*) FROM {model}"), &[])?
        .get(0);
    assert_eq!(rows, 50);
    let failed_groups = counter(
        "pg_eventstore_worker_errors_total",
        &[("processor", "deallocate-all"), ("kind", "batch")],
    );
    assert_eq!(
        failed_groups, 1,
        "one group failed, the ones after it did not"
    );
    Ok(())
}

#[test]
fn a_filtered_worker_moves_its_checkpoint_past_what_it_reads() -> TestResult {
    let t = store_with("worker_filtered");
    let mut last = 0;
    for i in 0..10 {
        last = t
            .append(
                &format!("b-{i}"),
                ExpectedVersion::NoStream,
                &events("B", 100),
            )?
            .last_position;
    }
    wait_visible(&t, last);
    // Batch: nothing matches, and the checkpoint still ends at the last event read.
    let summary = t
        .worker("only-a")
        .event_types(["A"])
        .run_batch(|_| Ok(()))?;
    assert_eq!((summary.handled, summary.checkpoint), (0, Some(last)));
    assert_eq!(t.checkpoint("only-a")?, Some(last));
    // A stream filter: exactly those streams' events, each stream in order.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let summary = t
        .worker("two-streams")
        .streams(["b-3", "b-7"])
        .run_batch(move |e| {
            s.lock().unwrap().push((e.stream_id.clone(), e.version));
            Ok(())
        })?;
    assert_eq!((summary.handled, summary.checkpoint), (200, Some(last)));
    let seen = seen.lock().unwrap().clone();
    let want: Vec<(String, u64)> = ["b-3", "b-7"]
        .iter()
        .flat_map(|s| (0..100).map(move |v| (s.to_string(), v)))
        .collect();
    assert_eq!(seen, want);

    // Live: the checkpoint follows the log while nothing matches, and the one event
    // that matches is handled.
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let worker = t
        .worker("live-a")
        .category("b-")
        .streams(["b-1", "b-9"])
        .event_types(["A"])
        .checkpoint_interval(Duration::from_millis(10))
        .spawn(move |e| {
            h.lock().unwrap().push(e.position);
            Ok(())
        })?;
    wait_for(
        "the checkpoint of live-a reaches the end of the log",
        || t.checkpoint("live-a").unwrap() == Some(last),
    );
    let more = t.append("b-0", ExpectedVersion::Any, &events("B", 50))?;
    let a = t.append("b-1", ExpectedVersion::Any, &events("A", 1))?;
    let after = t.append("b-2", ExpectedVersion::Any, &events("B", 50))?;
    wait_visible(&t, after.last_position);
    wait_for("live-a checkpoints past the last B", || {
        t.checkpoint("live-a").unwrap() == Some(after.last_position)
    });
    assert!(more.last_position < a.last_position);
    assert_eq!(*handled.lock().unwrap(), vec![a.last_position]);
    let summary = worker.stop()?;
    assert_eq!(
        (summary.handled, summary.checkpoint),
        (1, Some(after.last_position))
    );
    Ok(())
}

#[test]
fn retried_checkpoint_writes_and_failed_subscription_reads_are_counted_and_absorbed() -> TestResult
{
    recorder();
    let t = store_with("worker_absorb");
    let fault = Fault::install(&t, "checkpoints");
    // The worker runs as a role of its own, so that its reads can be refused.
    let role = format!("pges_absorb_{}", std::process::id());
    let mut admin = client();
    admin.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA \"{s}\" TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA \"{s}\" TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA \"{s}\" TO {role};",
        s = t.schema
    ))?;
    let mut pg: postgres::Config = crate::common::database_url().parse()?;
    pg.user(&role);
    let store = pg_eventstore::Config::from_pg(pg)
        .schema(&t.schema)
        .max_connections(6)
        .poll_interval(Duration::from_millis(50))
        .retry_delay(Duration::from_millis(5))
        .connect()?;
    let seen = Arc::new(Mutex::new(0u64));
    let s = seen.clone();
    let worker = store
        .worker("absorb")
        .checkpoint_interval(Duration::ZERO)
        .spawn(move |_| {
            *s.lock().unwrap() += 1;
            Ok(())
        })?;
    let retried = || {
        counter(
            "pg_eventstore_retries_total",
            &[("operation", "save_checkpoint")],
        )
    };
    let before = retried();

    // Three checkpoint writes fail with a serialization failure: retried, not fatal.
    fault.inject(Some("40001"), 3);
    let r = t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    wait_visible(&t, r.last_position);
    wait_for("the checkpoint reaches the appended events", || {
        t.checkpoint("absorb").unwrap() == Some(r.last_position)
    });
    assert!(
        worker.is_running(),
        "a retried checkpoint write stopped the worker"
    );
    assert_eq!(retried() - before, 3);

    // The subscription's reads are refused for a while: counted, and the worker goes on.
    let subscription_errors = || {
        counter(
            "pg_eventstore_worker_errors_total",
            &[("processor", "absorb"), ("kind", "subscription")],
        )
    };
    let events_table = format!("\"{}\".events", t.schema);
    admin.batch_execute(&format!("REVOKE SELECT ON {events_table} FROM {role}"))?;
    wait_for("a failed read is counted", || subscription_errors() >= 1);
    admin.batch_execute(&format!("GRANT SELECT ON {events_table} TO {role}"))?;
    let r = t.append("a", ExpectedVersion::Exact(2), &events("E", 2))?;
    wait_for("the worker handles events after the failure", || {
        *seen.lock().unwrap() == 5
    });
    assert!(worker.is_running());
    let summary = worker.stop()?;
    assert_eq!(summary.checkpoint, Some(r.last_position));
    drop(store);
    admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))?;
    Ok(())
}

#[test]
fn processors_are_listed_reset_and_deleted_through_the_api() -> TestResult {
    let t = store_with("worker_admin");
    let last = fill(&t, 5);
    let model = format!("\"{}\".model", t.schema);
    crate::common::client().batch_execute(&format!(
        "CREATE TABLE {model} (stream_id text PRIMARY KEY, n int NOT NULL)"
    ))?;
    let upsert = format!(
        "INSERT INTO {model} VALUES ($1, 1) ON CONFLICT (stream_id) DO UPDATE SET n = model.n + 1"
    );
    let run_model = || {
        let upsert = upsert.clone();
        t.worker("model")
            .threads(2)
            .run_batch_transactional(move |tx, e| {
                tx.execute(&upsert, &[&e.stream_id])?;
                Ok(())
            })
    };
    assert_eq!(run_model()?.handled, 50);
    let bad = t
        .read_stream("acc-3", pg_eventstore::ReadStream::forwards())?
        .next()
        .unwrap()?;
    let summary = t
        .worker("plain")
        .retries(0)
        .on_failure(OnFailure::Park)
        .run_batch(move |e| match e.id == bad.id {
            true => Err("no".into()),
            false => Ok(()),
        })?;
    assert_eq!((summary.handled, summary.parked), (49, 1));

    let list = t.processors()?;
    let summary: Vec<_> = list
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.position,
                p.lag,
                p.stream_claims,
                p.dead_letters,
                p.is_running,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("model", Some(last), 0, 10, 0, false),
            ("plain", Some(last), 0, 0, 1, false)
        ]
    );
    assert!(list[0].updated_at.is_some());
    let more = t.append("acc-0", ExpectedVersion::Exact(4), &events("E", 5))?;
    wait_visible(&t, more.last_position);
    assert!(t.processors()?.iter().all(|p| p.lag == 5));

    // A running processor cannot be reset or have its checkpoint deleted.
    let running = t.worker("model").spawn(|_| Ok(()))?;
    assert!(t.processors()?[0].is_running);
    assert!(matches!(
        t.reset_processor("model"),
        Err(Error::ProcessorLocked { .. })
    ));
    assert!(matches!(
        t.delete_checkpoint("model"),
        Err(Error::ProcessorLocked { .. })
    ));
    running.stop()?;
    let checkpoint = t.checkpoint("model")?;

    // Reset: checkpoint and claims go together, and the next run rebuilds everything.
    let report = t.reset_processor("model")?;
    assert_eq!((report.checkpoint, report.stream_claims), (checkpoint, 10));
    assert_eq!(t.processors()?.len(), 1, "model has no state left");
    assert_eq!(t.checkpoint("model")?, None);
    crate::common::client().batch_execute(&format!("TRUNCATE {model}"))?;
    let rebuilt = run_model()?;
    assert_eq!((rebuilt.handled, rebuilt.skipped), (55, 0));

    assert_eq!(t.delete_checkpoint("plain")?, Some(last));
    assert_eq!(t.delete_checkpoint("plain")?, None);
    assert!(matches!(t.reset_processor(""), Err(Error::InvalidInput(_))));
    Ok(())
}

#[test]
fn a_stopped_processor_s_checkpoint_moves_forwards_and_back() -> TestResult {
    let t = store_with("worker_move");
    fill(&t, 5); // 50 events, 5 in each of 10 streams
    let all: Vec<RecordedEvent> = t
        .read_all(pg_eventstore::ReadAll::from_start())?
        .collect::<Result<_, _>>()?;
    let handled = |name: &str| -> Result<Vec<uuid::Uuid>, Error> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        t.worker(name).run_batch(move |e| {
            sink.lock().unwrap().push(e.id);
            Ok(())
        })?;
        let seen = seen.lock().unwrap().clone();
        Ok(seen)
    };
    // To the head: a new processor that only wants what comes next handles nothing old.
    let head = t.head_position()?.expect("events");
    assert_eq!(t.move_checkpoint("mailer", head)?, None);
    assert!(handled("mailer")?.is_empty());
    // Back: the events after the new position are handled again, in order.
    assert_eq!(t.move_checkpoint("mailer", all[39].position)?, Some(head));
    let again = handled("mailer")?;
    assert_eq!(again, all[40..].iter().map(|e| e.id).collect::<Vec<_>>());

    // Refused, writing nothing: past the head, while it runs, for a consumer group.
    let e = t.move_checkpoint("mailer", head + 1).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m.contains("past the newest")),
        "{e}"
    );
    let running = t.worker("mailer").spawn(|_| Ok(()))?;
    let e = t.move_checkpoint("mailer", all[0].position).unwrap_err();
    assert!(matches!(e, Error::ProcessorLocked { .. }), "{e}");
    running.stop()?;
    assert_eq!(t.checkpoint("mailer")?, Some(head));
    let member = t
        .worker("group")
        .group(pg_eventstore::GroupOptions::new().partitions(2))
        .spawn(|_| Ok(()))?;
    member.stop()?;
    let e = t.move_checkpoint("group", all[0].position).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m.contains("consumer group")),
        "{e}"
    );
    assert_eq!(t.checkpoint("group")?, None);
    assert!(matches!(
        t.move_checkpoint("", 1),
        Err(Error::InvalidInput(_))
    ));
    Ok(())
}

/// An event parked by an earlier attempt and handled later (here a run from an earlier
/// checkpoint, as after a crash before the checkpoint passed it; a group takeover or
/// `move_checkpoint` back do the same) loses its dead letter: a transactional handler's
/// claim removes it in the transaction of its effects (grouped or one by one), a plain
/// handler's worker right after the call. So a replay of the dead letters does not apply
/// the event again.
#[test]
fn a_parked_event_handled_later_loses_its_dead_letter_and_is_not_replayed() -> TestResult {
    let t = store_with("worker_dead_handled");
    let first = t.append("acc-1", ExpectedVersion::NoStream, &events("E", 1))?;
    let second = t.append("acc-1", ExpectedVersion::Exact(0), &events("E", 1))?;
    wait_visible(&t, second.last_position);
    let bad = second.last_position;
    let table = format!("\"{}\".effects", t.schema);
    client().batch_execute(&format!(
        "CREATE TABLE {table} (processor text NOT NULL, position bigint NOT NULL)"
    ))?;
    let effects = |name: &str| -> i64 {
        client()
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE processor = $1 AND position = $2"),
                &[&name, &(bad as i64)],
            )
            .unwrap()
            .get(0)
    };
    for (name, batch) in [("grouped", 100), ("one-by-one", 1), ("plain", 0)] {
        let broken = Arc::new(AtomicBool::new(true));
        let worker = || {
            t.worker(name)
                .retries(0)
                .on_failure(OnFailure::Park)
                .transaction_batch(batch.max(1), Duration::ZERO)
        };
        let tx_handler = {
            let (broken, insert) = (
                broken.clone(),
                format!("INSERT INTO {table} VALUES ($1, $2)"),
            );
            let name = name.to_string();
            move |tx: &mut postgres::Transaction<'_>, e: &RecordedEvent| {
                if e.position == bad && broken.load(Ordering::SeqCst) {
                    return Err("downstream unavailable".into());
                }
                tx.execute(&insert, &[&name, &(e.position as i64)])?;
                Ok(())
            }
        };
        let plain_handler = {
            let (broken, insert) = (
                broken.clone(),
                format!("INSERT INTO {table} VALUES ($1, $2)"),
            );
            let name = name.to_string();
            move |e: &RecordedEvent| {
                if e.position == bad && broken.load(Ordering::SeqCst) {
                    return Err("downstream unavailable".into());
                }
                client().execute(&insert, &[&name, &(e.position as i64)])?;
                Ok(())
            }
        };
        let run = || match batch {
            0 => worker().run_batch(plain_handler.clone()),
            _ => worker().run_batch_transactional(tx_handler.clone()),
        };
        let s = run()?;
        assert_eq!((s.handled, s.parked), (1, 1), "{name}");
        assert_eq!(t.dead_letters(name)?.len(), 1, "{name}");

        // The process dies before the checkpoint write that passes the parked event.
        crash_back_to(&t, name, Some(first.last_position));
        broken.store(false, Ordering::SeqCst);
        let s = run()?;
        assert_eq!(s.handled, 1, "{name}: the event is handled on the re-read");
        assert!(
            t.dead_letters(name)?.is_empty(),
            "{name}: its dead letter is gone"
        );

        let replayed = match batch {
            0 => worker().replay_dead_letters(plain_handler.clone())?,
            _ => worker().replay_dead_letters_transactional(tx_handler.clone())?,
        };
        assert_eq!(replayed.replayed, 0, "{name}");
        assert_eq!(effects(name), 1, "{name}: the event's effects, once");
    }
    Ok(())
}

/// A transactional handler's replayed event also moves its stream's claim: a later run
/// from a checkpoint before the event (a crash, `move_checkpoint` back) skips it rather
/// than applying it a second time.
#[test]
fn a_replayed_event_is_skipped_by_a_run_from_an_earlier_checkpoint() -> TestResult {
    let t = store_with("worker_dead_replayed");
    let first = t.append("acc-1", ExpectedVersion::NoStream, &events("E", 1))?;
    let second = t.append("acc-1", ExpectedVersion::Exact(0), &events("E", 1))?;
    wait_visible(&t, second.last_position);
    let bad = second.last_position;
    let table = format!("\"{}\".effects", t.schema);
    client().batch_execute(&format!("CREATE TABLE {table} (position bigint NOT NULL)"))?;
    let broken = Arc::new(AtomicBool::new(true));
    let handler = {
        let (broken, insert) = (broken.clone(), format!("INSERT INTO {table} VALUES ($1)"));
        move |tx: &mut postgres::Transaction<'_>, e: &RecordedEvent| {
            if e.position == bad && broken.load(Ordering::SeqCst) {
                return Err("downstream unavailable".into());
            }
            tx.execute(&insert, &[&(e.position as i64)])?;
            Ok(())
        }
    };
    let worker = || t.worker("model").retries(0).on_failure(OnFailure::Park);
    let s = worker().run_batch_transactional(handler.clone())?;
    assert_eq!((s.handled, s.parked), (1, 1));
    broken.store(false, Ordering::SeqCst);
    assert_eq!(
        worker()
            .replay_dead_letters_transactional(handler.clone())?
            .replayed,
        1
    );
    t.move_checkpoint("model", first.last_position)?;
    let s = worker().run_batch_transactional(handler)?;
    assert_eq!((s.handled, s.skipped), (0, 1), "{s:?}");
    let n: i64 = client()
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE position = $1"),
            &[&(bad as i64)],
        )?
        .get(0);
    assert_eq!(n, 1, "the replayed event's effects, once");
    Ok(())
}

#[test]
fn dead_letters_are_listed_replayed_and_deleted_through_the_api() -> TestResult {
    let t = store_with("worker_dead");
    fill(&t, 5);
    let all: Vec<RecordedEvent> = t
        .read_all(pg_eventstore::ReadAll::from_start())?
        .collect::<Result<_, _>>()?;
    let (bad1, bad2, bad3) = (all[7].clone(), all[21].clone(), all[33].clone());
    let failing = Arc::new(Mutex::new(HashSet::from([bad1.id, bad2.id, bad3.id])));
    let handler = |failing: Arc<Mutex<HashSet<uuid::Uuid>>>| {
        move |e: &RecordedEvent| match failing.lock().unwrap().contains(&e.id) {
            true => Err(format!("cannot handle {}", e.id).into()),
            false => Ok(()),
        }
    };
    let parked = t
        .worker("mailer")
        .retries(1)
        .retry_delay(Duration::from_millis(1))
        .on_failure(OnFailure::Park)
        .run_batch(handler(failing.clone()))?
        .parked;
    assert_eq!(parked, 3);
    let dead = t.dead_letters("mailer")?;
    let got: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.event_id,
                d.stream_id.as_str(),
                d.version,
                d.position,
                d.attempts,
            )
        })
        .collect();
    let want: Vec<_> = [&bad1, &bad2, &bad3]
        .iter()
        .map(|e| (e.id, e.stream_id.as_str(), e.version, e.position, 2))
        .collect();
    assert_eq!(got, want);
    assert_eq!(dead[0].event_type.as_deref(), Some("E"));
    assert_eq!(dead[0].error, format!("cannot handle {}", bad1.id));

    // Replay while the processor runs: refused.
    let running = t.worker("mailer").spawn(|_| Ok(()))?;
    assert!(matches!(
        t.worker("mailer").replay_dead_letters(|_| Ok(())),
        Err(Error::ProcessorLocked { .. })
    ));
    running.stop()?;

    // bad1 is fixed now; bad2 and bad3 still fail.
    failing.lock().unwrap().remove(&bad1.id);
    let replayed = Arc::new(Mutex::new(Vec::new()));
    let (r, f) = (replayed.clone(), failing.clone());
    let summary = t
        .worker("mailer")
        .retries(0)
        .replay_dead_letters(move |e| {
            r.lock().unwrap().push(e.id);
            handler(f.clone())(e)
        })?;
    assert_eq!(
        (summary.replayed, summary.failed, summary.missing),
        (1, 2, 0)
    );
    assert_eq!(*replayed.lock().unwrap(), vec![bad1.id, bad2.id, bad3.id]);
    let left: Vec<_> = t
        .dead_letters("mailer")?
        .iter()
        .map(|d| (d.event_id, d.attempts))
        .collect();
    assert_eq!(left, vec![(bad2.id, 1), (bad3.id, 1)]);

    assert!(t.delete_dead_letter("mailer", bad2.id)?);
    assert!(!t.delete_dead_letter("mailer", bad2.id)?);
    assert_eq!(t.delete_dead_letters("mailer")?, 1);
    assert!(t.dead_letters("mailer")?.is_empty());

    // A transactional replay commits the handler's writes with the removal: once.
    let table = format!("\"{}\".replayed", t.schema);
    crate::common::client()
        .batch_execute(&format!("CREATE TABLE {table} (event_id uuid PRIMARY KEY)"))?;
    failing.lock().unwrap().insert(bad1.id);
    let parked = t
        .worker("model")
        .retries(0)
        .on_failure(OnFailure::Park)
        .run_batch_transactional({
            let failing = failing.clone();
            move |_, e| handler(failing.clone())(e)
        })?
        .parked;
    assert_eq!(parked, 3);
    failing.lock().unwrap().clear();
    let insert = format!("INSERT INTO {table} VALUES ($1)");
    let replay = || {
        let insert = insert.clone();
        t.worker("model")
            .replay_dead_letters_transactional(move |tx, e| {
                tx.execute(&insert, &[&e.id])?;
                Ok(())
            })
    };
    assert_eq!(replay()?.replayed, 3);
    assert_eq!(replay()?.replayed, 0);
    let n: i64 = crate::common::client()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])?
        .get(0);
    assert_eq!(n, 3);
    assert!(t.dead_letters("model")?.is_empty());
    Ok(())
}

#[test]
fn batch_mode_reads_again_after_the_horizon_passes_the_tip() -> TestResult {
    // A batch run that starts while another transaction holds the `$all` horizon below
    // an event committed before the run must still handle it, however the blocker's
    // commit falls between the run's reads and its horizon checks.
    let t = store_with("worker_tip");
    let mut blocker = client();
    let mut rng = crate::common::Rng(0x9e37_79b9_7f4a_7c15);
    let mut missed = Vec::new();
    for round in 0..40u64 {
        let mut tx = blocker.transaction()?;
        tx.batch_execute("SELECT pg_current_xact_id()")?;
        let e = t.append(
            &format!("tip-{round}"),
            ExpectedVersion::NoStream,
            &events("E", 1),
        )?;
        let store: Store = t.store.clone();
        let run = thread::spawn(move || store.worker("tip").run_batch(|_| Ok(())));
        thread::sleep(Duration::from_micros(rng.next() % 15_000));
        tx.commit()?;
        let summary = run.join().unwrap()?;
        if summary.handled != 1 || summary.checkpoint != Some(e.last_position) {
            missed.push((round, summary));
        }
    }
    assert!(missed.is_empty(), "{missed:?}");
    Ok(())
}

#[test]
fn a_panicking_handler_stops_the_worker_and_names_it() -> TestResult {
    let t = store_with("worker_panic");
    fill(&t, 5);
    let (tx, rx) = std::sync::mpsc::channel();
    let store = t.store.clone();
    thread::spawn(move || {
        let result = store.worker("panicker").threads(2).run_batch(|e| {
            if e.version == 2 {
                panic!("handler bug")
            } else {
                Ok(())
            }
        });
        let _ = tx.send(result);
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("run_batch returns after a handler panicked");
    match result {
        Err(Error::HandlerPanicked { processor }) => assert_eq!(processor, "panicker"),
        other => panic!("expected HandlerPanicked, got {other:?}"),
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let handle = t.worker("live-panicker").spawn(|e| {
        if e.version == 2 {
            panic!("handler bug")
        } else {
            Ok(())
        }
    })?;
    thread::spawn(move || {
        let _ = tx.send(handle.join());
    });
    let result = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("join returns after a handler panicked");
    match result {
        Err(Error::HandlerPanicked { processor }) => assert_eq!(processor, "live-panicker"),
        other => panic!("expected HandlerPanicked, got {other:?}"),
    }
    Ok(())
}
