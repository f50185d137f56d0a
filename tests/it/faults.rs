//! Fault tests: killed backends on the shared server (only this test's own
//! connections), and a full restart of a private throwaway server. Each is bounded in
//! time; the only timing assertions are generous upper bounds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::common::proxy::{self, Proxy};
use crate::common::server::{wait_until, TempServer};
use crate::common::{client, events, TestResult, TestStore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pg_eventstore::{
    Config, ConnectionEvent, Error, ExpectedVersion, ReadAll, ReadStream, RecordedEvent, Store,
    SubscribeOptions,
};

fn retries(recorder: &DebuggingRecorder) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        if key.key().name() == "pg_eventstore_retries_total" {
            let op = key
                .key()
                .labels()
                .find(|l| l.key() == "operation")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            if let DebugValue::Counter(n) = value {
                *out.entry(op).or_default() += n;
            }
        }
    }
    out
}

/// Checks a full `$all` read: positions strictly increase, every event once, and each
/// stream's versions are 0, 1, 2, ... with no gap.
fn check_log(events: &[RecordedEvent]) -> HashMap<String, u64> {
    let mut ids = HashSet::new();
    let mut next: HashMap<String, u64> = HashMap::new();
    for w in events.windows(2) {
        assert!(w[0].position < w[1].position, "positions out of order");
    }
    for e in events {
        assert!(ids.insert(e.id), "event {} read twice", e.id);
        let n = next.entry(e.stream_id.clone()).or_default();
        assert_eq!(e.version, *n, "stream {} has a gap or repeat", e.stream_id);
        *n += 1;
    }
    next
}

/// Appends `rounds` batches of `batch` events to `stream` with exact expected
/// versions; any error fails the test.
fn writer(store: &Store, stream: &str, rounds: u64, batch: usize, duplicates: &AtomicU64) {
    let mut expected = ExpectedVersion::NoStream;
    for round in 0..rounds {
        let r = store
            .append(stream, expected, &events("W", batch))
            .unwrap_or_else(|e| panic!("append {round} to {stream} failed: {e}"));
        assert_eq!(r.last_version, (round + 1) * batch as u64 - 1);
        if r.was_duplicate {
            duplicates.fetch_add(1, Ordering::Relaxed);
        }
        expected = ExpectedVersion::Exact(r.last_version);
    }
}

#[test]
fn killed_backends_are_retried_and_nothing_is_written_twice() -> TestResult {
    // A name only this test's connections carry: the killer touches nothing else on the
    // shared server.
    let app = format!("pges_faults_kill_{}", std::process::id());
    let t = TestStore::with("faults_kill", |c| {
        c.application_name(&app)
            .max_connections(6)
            .read_page_size(7)
    });
    const WRITERS: usize = 4;
    const ROUNDS: u64 = 40;
    const BATCH: usize = 3;
    let recorder = DebuggingRecorder::new();
    let stop = AtomicBool::new(false);
    let killed = AtomicU64::new(0);
    let duplicates = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let started = Instant::now();
    let final_read: Vec<RecordedEvent> = thread::scope(|s| {
        // The killer: every 100 ms, terminate every backend of this store, idle or busy.
        let killer = s.spawn(|| {
            let mut c = client();
            while !stop.load(Ordering::Relaxed) {
                let n = c
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&app],
                    )
                    .unwrap()
                    .len();
                killed.fetch_add(n as u64, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, recorder, duplicates) = (&t.store, &recorder, &duplicates);
                s.spawn(move || {
                    metrics::with_local_recorder(recorder, || {
                        writer(store, &format!("w{w}"), ROUNDS, BATCH, duplicates)
                    })
                })
            })
            .collect();
        // A reader during the writes: stream reads through cursors (page size 7).
        let reader = s.spawn(|| {
            metrics::with_local_recorder(&recorder, || {
                while !stop.load(Ordering::Relaxed) {
                    let versions: Vec<u64> = t
                        .read_stream("w0", ReadStream::forwards())
                        .unwrap()
                        .map(|e| e.expect("a read error reached the caller").version)
                        .collect();
                    assert_eq!(versions, (0..versions.len() as u64).collect::<Vec<_>>());
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        for w in writers {
            w.join().expect("writer");
        }
        // The last read, slow enough (2 ms an event) to be cut by several kills.
        t.wait_all_visible();
        let all: Vec<RecordedEvent> = metrics::with_local_recorder(&recorder, || {
            t.read_all(ReadAll::from_start())
                .unwrap()
                .map(|e| {
                    thread::sleep(Duration::from_millis(2));
                    e.expect("a read error reached the caller")
                })
                .collect()
        });
        stop.store(true, Ordering::Relaxed);
        killer.join().expect("killer");
        reader.join().expect("reader");
        all
    });
    let took = started.elapsed();
    let retries = retries(&recorder);
    eprintln!(
        "killed backends: {} backends killed in {took:?}; retries {retries:?}; \
         {} appends came back as duplicates of a committed first attempt; {} stream reads",
        killed.load(Ordering::Relaxed),
        duplicates.load(Ordering::Relaxed),
        reads.load(Ordering::Relaxed),
    );
    let total = WRITERS as u64 * ROUNDS * BATCH as u64;
    assert_eq!(final_read.len() as u64, total);
    let heads = check_log(&final_read);
    for w in 0..WRITERS {
        assert_eq!(heads[&format!("w{w}")], ROUNDS * BATCH as u64);
    }
    assert_eq!(t.count_events() as u64, total, "an event was written twice");
    assert!(
        killed.load(Ordering::Relaxed) >= 5,
        "the killer did not run"
    );
    assert!(
        retries.get("append").copied().unwrap_or(0) >= 1,
        "no append was retried"
    );
    assert!(
        retries.get("read").copied().unwrap_or(0) >= 1,
        "no read was retried"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    Ok(())
}

#[test]
fn server_restart_loses_nothing_and_is_reported_once() -> TestResult {
    let server = TempServer::start(&[]);
    let store = Config::new(&server.url())?
        .schema("restart")
        .health_check_interval(Some(Duration::from_millis(100)))
        .connect()?;
    store.migrate()?;
    let connection_events = store.connection_events();
    let recorder = DebuggingRecorder::new();

    let stop = AtomicBool::new(false);
    let appended = AtomicU64::new(0);
    let last_ok = Mutex::new(Instant::now());
    let longest_append = Mutex::new(Duration::ZERO);
    let (stopped_at, restarted_at, restarted_wall, recovered_after) = thread::scope(|s| {
        // One writer appending one event at a time with exact expected versions.
        let writer = s.spawn(|| {
            metrics::with_local_recorder(&recorder, || {
                let mut expected = ExpectedVersion::NoStream;
                while !stop.load(Ordering::Relaxed) {
                    let call = Instant::now();
                    let r = store
                        .append("r", expected, &events("R", 1))
                        .unwrap_or_else(|e| panic!("append failed across the restart: {e}"));
                    let took = call.elapsed();
                    let mut longest = longest_append.lock().unwrap();
                    *longest = (*longest).max(took);
                    drop(longest);
                    expected = ExpectedVersion::Exact(r.last_version);
                    appended.fetch_add(1, Ordering::Relaxed);
                    *last_ok.lock().unwrap() = Instant::now();
                    thread::sleep(Duration::from_millis(5));
                }
            })
        });
        // A reader re-reading the stream in pages of 1000 (one query a read).
        let reader = s.spawn(|| {
            metrics::with_local_recorder(&recorder, || {
                while !stop.load(Ordering::Relaxed) {
                    let n = store
                        .read_stream("r", ReadStream::forwards())
                        .unwrap()
                        .enumerate()
                        .map(|(i, e)| {
                            let e = e.unwrap_or_else(|e| panic!("read failed: {e}"));
                            assert_eq!(e.version, i as u64);
                        })
                        .count();
                    let _ = n;
                    thread::sleep(Duration::from_millis(20));
                }
            })
        });
        wait_until(Duration::from_secs(10), || {
            appended.load(Ordering::Relaxed) >= 20
        })
        .expect("appends before the restart");
        server.stop();
        let stopped_at = Instant::now();
        thread::sleep(Duration::from_millis(1000));
        server.start_again();
        let restarted_at = Instant::now();
        let restarted_wall = SystemTime::now();
        let before = appended.load(Ordering::Relaxed);
        let recovered_after = wait_until(Duration::from_secs(10), || {
            appended.load(Ordering::Relaxed) > before + 5 && *last_ok.lock().unwrap() > restarted_at
        });
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        reader.join().expect("reader");
        (stopped_at, restarted_at, restarted_wall, recovered_after)
    });
    let recovered_after = recovered_after.unwrap_or_else(|| {
        panic!(
            "appends did not resume within 10 s of the restart\n{}",
            server.log()
        )
    });

    // Exactly one Lost and one Restored, and no more after a quiet moment.
    let mut seen = Vec::new();
    while let Ok(e) = connection_events.recv_timeout(Duration::from_millis(700)) {
        seen.push(e);
    }
    let (restored_at, down_for) = match seen.as_slice() {
        [ConnectionEvent::Lost { .. }, ConnectionEvent::Restored { at, down_for }] => {
            (*at, *down_for)
        }
        other => panic!("expected one Lost and one Restored, got {other:?}"),
    };
    // Signed: the health check may see the server up before `pg_ctl start -w` returns.
    let restored_after_start_ms = match restored_at.duration_since(restarted_wall) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    };

    let total = appended.load(Ordering::Relaxed);
    let versions: Vec<u64> = store
        .read_stream("r", ReadStream::forwards())?
        .map(|e| e.map(|e| e.version))
        .collect::<Result<_, _>>()?;
    assert_eq!(versions, (0..total).collect::<Vec<_>>(), "lost or doubled");
    let rows: i64 = store
        .pool()
        .get()?
        .query_one("SELECT count(*) FROM restart.events", &[])?
        .get(0);
    assert_eq!(rows as u64, total);
    let retries = retries(&recorder);
    let longest_append = *longest_append.lock().unwrap();
    eprintln!(
        "server restart: down {:?} (pg_ctl stop to start); appends resumed {recovered_after:?} \
         after pg_ctl start returned; Restored reported {restored_after_start_ms:.0} ms after \
         it (outage seen as {down_for:?}); the longest append call took {longest_append:?}; \
         {total} events, none lost or doubled; retries {retries:?}",
        restarted_at - stopped_at
    );
    assert!(
        recovered_after < Duration::from_secs(5),
        "{recovered_after:?}"
    );
    assert!(
        restored_after_start_ms < 5000.0,
        "{restored_after_start_ms} ms"
    );
    // Whether an append needed a retry depends on timing (one that waits in the pool
    // for the server to come back needs none), so the count is reported, not asserted.

    // A server that stays down: a clear error naming the cause once retries run out.
    let quick = Config::new(&server.url())?
        .schema("restart")
        .connection_timeout(Duration::from_millis(500))
        .max_retries(1)
        .connect()?;
    server.stop();
    let started = Instant::now();
    let e = quick
        .append("r", ExpectedVersion::Any, &events("R", 1))
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("server down: append failed after {took:?}: {e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(e.is_transient(), "{e:?}");
    let text = e.report().to_lowercase();
    assert!(
        text.contains("refused") || text.contains("terminat") || text.contains("closed"),
        "{text}"
    );
    assert!(
        matches!(e, Error::Pool { .. } | Error::Postgres(_)),
        "{e:?}"
    );
    Ok(())
}

#[test]
fn a_read_cut_midway_resumes_after_its_last_event() -> TestResult {
    let app = format!("pges_faults_resume_{}", std::process::id());
    let t = TestStore::with("faults_resume", |c| {
        c.application_name(&app).read_page_size(3)
    });
    let first = t.append("s", ExpectedVersion::NoStream, &events("E", 20))?;
    crate::common::wait_visible(&t, first.last_position);
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || -> TestResult {
        // Cut before the first event: the read starts again.
        let mut read = t.read_stream("s", ReadStream::forwards())?;
        assert!(crate::common::kill_backends(&app) >= 1);
        let versions: Vec<u64> = read.by_ref().map(|e| e.unwrap().version).collect();
        assert_eq!(versions, (0..20).collect::<Vec<_>>());

        // Cut inside the cursor, after 7 events (pages of 3): the read goes on at 7.
        for direction in [ReadStream::forwards(), ReadStream::backwards()] {
            let mut read = t.read_stream("s", direction.clone())?;
            let head: Vec<u64> = read.by_ref().take(7).map(|e| e.unwrap().version).collect();
            assert!(
                crate::common::kill_backends(&app) >= 1,
                "the open cursor's connection"
            );
            let rest: Vec<u64> = read.map(|e| e.unwrap().version).collect();
            let mut all = head;
            all.extend(rest);
            let mut expected: Vec<u64> = (0..20).collect();
            if direction == ReadStream::backwards() {
                expected.reverse();
            }
            assert_eq!(all, expected);
        }

        // The same for $all, with a limit that must still hold across the cut.
        let mut read = t.read_all(ReadAll::from_start().max_count(15))?;
        let head: Vec<u64> = read.by_ref().take(5).map(|e| e.unwrap().version).collect();
        assert!(crate::common::kill_backends(&app) >= 1);
        let rest: Vec<u64> = read.map(|e| e.unwrap().version).collect();
        assert_eq!(head, (0..5).collect::<Vec<_>>());
        assert_eq!(rest, (5..15).collect::<Vec<_>>());
        Ok(())
    })?;
    let retries = retries(&recorder);
    eprintln!("reads cut midway: retries {retries:?}");
    assert_eq!(retries.get("read").copied(), Some(4));
    Ok(())
}

/// Runs `f` on a thread and waits at most `limit` for it: a hang fails the test with
/// `what` instead of blocking the test run.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} was still blocked after {limit:?}"))
}

#[test]
fn opening_a_store_gives_up_on_a_server_that_never_answers() -> TestResult {
    let silent = Proxy::silent();
    let config = Config::new(&silent.url(&crate::common::database_url()))?
        .connect_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let result = within(Duration::from_secs(30), "Store::connect", move || {
        Store::connect(config).map(drop)
    });
    let e = result.expect_err("a server that never answers cannot be connected to");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let text = e.to_string();
    assert!(
        matches!(
            e,
            Error::ConnectTimeout {
                connected: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}", silent.port))
            && text.contains("no answer to the startup message within 1s"),
        "{text}"
    );
    Ok(())
}

#[test]
fn every_connection_gives_up_when_the_server_stops_answering() -> TestResult {
    let proxy = Proxy::to(proxy::upstream(&crate::common::database_url()));
    let schema = crate::common::schema_name("silent");
    let store = Config::new(&proxy.url(&crate::common::database_url()))?
        .schema(&schema)
        .max_connections(4)
        .connect_timeout(Duration::from_secs(1))
        .connection_timeout(Duration::from_secs(2))
        .max_retries(0)
        .connect()?;
    store.migrate()?;
    let _drop_schema = crate::common::DropSchema(schema);
    proxy.silence_new_connections();

    // The pool: a new connection is needed while the open ones are held.
    let mut held = Vec::new();
    while let Some(c) = store.pool().try_get() {
        held.push(c);
    }
    let e = store
        .stream_version("s-1")
        .expect_err("no connection can be opened");
    let chain = crate::common::chain(&e);
    assert!(
        chain.contains("no answer to the startup message"),
        "{chain}"
    );
    drop(held);

    // The listener, started by the first subscription, reports why it is not connected.
    let _subscription = store.subscribe(SubscribeOptions::all())?;
    let waited = wait_until(Duration::from_secs(20), || {
        store
            .listener_state()
            .and_then(|s| s.last_error)
            .is_some_and(|e| e.contains("no answer to the startup message"))
    });
    assert!(waited.is_some(), "{:?}", store.listener_state());
    drop(_subscription);

    // The notifier, started by an append through the pool.
    store.append("s-1", ExpectedVersion::NoStream, &events("E", 1))?;

    // A health check on an established connection that stops answering.
    proxy.freeze();
    let checked = store.clone();
    let report = within(Duration::from_secs(30), "health_check", move || {
        checked.health_check()
    });
    assert!(!report.reachable, "{report:?}");

    // Dropping the store joins the listener and notifier threads: neither is stuck.
    within(Duration::from_secs(30), "dropping the store", move || {
        drop(store)
    });
    Ok(())
}

/// A subscription whose read failed once (its pooled connection was killed, and no
/// retries are configured) goes back to waiting for wake-ups and its safety poll once a
/// read succeeds: on a quiet store it reads about as often as before the error.
#[test]
fn a_subscription_goes_back_to_waiting_after_a_failed_read() -> TestResult {
    let app = format!("pges_sub_recovers_{}", std::process::id());
    let t = TestStore::with("sub_recovers", |c| {
        c.max_connections(1)
            .min_idle(1)
            .max_retries(0)
            .application_name(&app)
    });
    t.append("s-1", ExpectedVersion::NoStream, &events("E", 1))?;
    let mut sub = t.subscribe(SubscribeOptions::all())?;
    let first = sub.next_timeout(Duration::from_secs(5)).expect("event")?;
    assert_eq!(first.stream_id, "s-1");
    assert!(sub.next_timeout(Duration::from_millis(200)).is_none());
    // Reads in two quiet seconds (less the count's own statement): the safety poll's.
    let reads_in_two_quiet_seconds = |sub: &mut pg_eventstore::Subscription| {
        let before = crate::subscribe::statements_run(&t);
        assert!(sub.next_timeout(Duration::from_secs(2)).is_none());
        crate::subscribe::statements_run(&t) - before - 1
    };
    let control = reads_in_two_quiet_seconds(&mut sub);
    assert!(control <= 10, "before the error: {control} reads");

    // The pooled connection dies: the next read fails once.
    assert!(crate::common::kill_backends(&app) >= 1);
    let mut failed = false;
    for _ in 0..3 {
        match sub.try_next() {
            Some(Err(_)) => {
                failed = true;
                break;
            }
            Some(Ok(e)) => panic!("unexpected event {e:?}"),
            None => thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(failed, "the read on the killed connection fails");

    // It reads again after its backoff, is caught up, and nothing is appended.
    assert!(sub.next_timeout(Duration::from_millis(300)).is_none());
    let after = reads_in_two_quiet_seconds(&mut sub);
    assert!(
        after <= 10,
        "after the error, a caught-up subscription read {after} times in 2 quiet seconds \
         ({control} before; safety poll: 1 s)"
    );
    Ok(())
}

/// CPU time (clock ticks) that a server backend has used, from /proc (the server runs
/// on this machine).
pub(crate) fn backend_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return 0; // the backend has exited
    };
    let fields: Vec<&str> = stat[end + 2..].split(' ').collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after "pid (comm) ".
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// CPU ticks used so far by every server backend of `app`.
fn app_ticks(app: &str) -> u64 {
    let pids: Vec<i32> = client()
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    pids.into_iter().map(backend_ticks).sum()
}

/// A live worker whose subscription read failed once (a statement timeout while another
/// session held the events table) goes back to idling: its backends use about as much
/// CPU on a quiet store as before the error.
#[test]
fn an_idle_worker_stays_idle_after_one_failed_read() -> TestResult {
    let app = format!("pges_worker_recovers_{}", std::process::id());
    let t = TestStore::with("worker_recovers", |c| {
        c.application_name(&app)
            .statement_timeout(Duration::from_millis(300))
    });
    t.append("s-1", ExpectedVersion::NoStream, &events("E", 1))?;
    let handled = std::sync::Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let worker = t.worker("recovers").spawn(move |_| {
        h.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })?;
    assert!(
        wait_until(Duration::from_secs(10), || handled.load(Ordering::Relaxed)
            >= 1)
        .is_some()
    );
    thread::sleep(Duration::from_millis(500));
    let t0 = app_ticks(&app);
    thread::sleep(Duration::from_secs(2));
    let quiet = app_ticks(&app) - t0;
    // Another session holds the events table for 1.5 s: the worker's safety-poll read
    // times out (57014, not transient).
    let mut blocker = client();
    let mut tx = blocker.transaction()?;
    tx.batch_execute(&format!(
        "LOCK TABLE \"{}\".events IN ACCESS EXCLUSIVE MODE",
        t.schema
    ))?;
    thread::sleep(Duration::from_millis(1500));
    tx.rollback()?;
    thread::sleep(Duration::from_millis(500));
    let t1 = app_ticks(&app);
    thread::sleep(Duration::from_secs(2));
    let after = app_ticks(&app) - t1;
    worker.stop()?;
    assert!(
        after <= quiet * 3 + 10,
        "after one failed read, the idle worker's backends used {after} CPU ticks in 2 s \
         ({quiet} before)"
    );
    Ok(())
}
