mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{events, wait_visible, TestResult, TestStore};
use pg_eventstore::{Error, ExpectedVersion, IfLocked, OnFailure, RecordedEvent, Store};

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
    common::client()
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
    assert_eq!(
        (summary.handled, summary.parked, summary.retries),
        (49, 1, 2)
    );
    let row = common::client().query_one(
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
