//! Operations: pool errors, unreachable servers, health reports, the health thread's
//! life, and the metrics the store records.

use std::time::{Duration, Instant};

use crate::common::{client, database_url, events, schema_name, Fault, TestResult, TestStore};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pg_eventstore::{Config, Error, ExpectedVersion, ReadAll, ReadStream, SCHEMA_VERSION};

#[test]
fn exhausted_pool_times_out_naming_the_pool() -> TestResult {
    let t = TestStore::with("ops_exhaust", |c| {
        c.max_connections(2)
            .min_idle(0)
            .connection_timeout(Duration::from_millis(500))
    });
    let _a = t.pool().get()?;
    let _b = t.pool().get()?;
    let started = Instant::now();
    let e = t
        .append("s", ExpectedVersion::Any, &events("A", 1))
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("exhausted pool: error after {took:?}: {e}");
    // The configured wait, once: exhaustion is not retried.
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    match &e {
        Error::Pool {
            message,
            last_connect_error: None,
        } => {
            assert!(message.contains("pool is exhausted"), "{message}");
            assert!(message.contains("all 2 connections"), "{message}");
        }
        other => panic!("expected a pool error, got {other:?}"),
    }
    assert!(!e.is_transient());
    Ok(())
}

#[test]
fn unreachable_server_fails_fast_with_the_cause() -> TestResult {
    let started = Instant::now();
    let e = Config::new("postgres://postgres@127.0.0.1:1/postgres")?
        .connection_timeout(Duration::from_secs(10))
        .connect()
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("unreachable server: error after {took:?}: {e}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    match &e {
        Error::Connect { target, .. } => assert_eq!(target, "127.0.0.1:1"),
        other => panic!("expected a connect error, got {other:?}"),
    }
    let text = e.report();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert!(e.is_transient());
    Ok(())
}

#[test]
fn health_report() -> TestResult {
    let t = TestStore::with("ops_health", |c| c.max_connections(3));
    let r = t.health_check();
    assert!(r.reachable, "{r:?}");
    assert!(r.is_ready(), "{r:?}");
    assert_eq!(r.schema_version, Some(SCHEMA_VERSION));
    assert!(r.latency.is_some());
    assert_eq!(r.error, None);
    assert_eq!(r.pool.max_size, 3);
    assert_eq!(r.listener, None);

    // A busy pool is not an outage: the check opens a connection of its own.
    let held: Vec<_> = (0..3).map(|_| t.pool().get().unwrap()).collect();
    let r = t.health_check();
    assert!(r.reachable, "{r:?}");
    assert_eq!(r.pool.connections, 3);
    assert_eq!(r.pool.idle_connections, 0);
    drop(held);

    // An unmigrated schema is reachable but not ready.
    let store = Config::new(&database_url())?
        .schema(schema_name("ops_unmigrated"))
        .connect()?;
    let r = store.health_check();
    assert!(r.reachable && !r.is_ready(), "{r:?}");
    assert_eq!(r.schema_version, Some(0));
    Ok(())
}

fn health_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("pg-eventstore-h"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn health_thread_ends_with_the_last_store() -> TestResult {
    let before = health_threads();
    let store = Config::new(&database_url())?
        .schema(schema_name("ops_thread"))
        .health_check_interval(Some(Duration::from_millis(20)))
        .connect()?;
    let clone = store.clone();
    let events = store.connection_events();
    std::thread::sleep(Duration::from_millis(100));
    if cfg!(target_os = "linux") {
        assert_eq!(health_threads(), before + 1);
    }
    drop(store);
    // A clone keeps it alive.
    assert!(matches!(
        events.recv_timeout(Duration::from_millis(100)),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    ));
    drop(clone);
    // The receiver disconnects once the store is gone: nothing holds it any more.
    let started = Instant::now();
    assert_eq!(
        events.recv_timeout(Duration::from_secs(3)),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    );
    if cfg!(target_os = "linux") {
        let gone = crate::common::server::wait_until(Duration::from_secs(3), || {
            health_threads() == before
        });
        assert!(gone.is_some(), "the health thread is still running");
    }
    eprintln!(
        "health thread stopped {:?} after the last drop",
        started.elapsed()
    );
    Ok(())
}

/// What the recorder holds, as (metric name, value); taking it drains the counters.
fn names_and_values(snapshotter: &Snapshotter) -> Vec<(String, DebugValue)> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k.key().name().to_string(), v))
        .collect()
}

/// Sums a metric over its labels: a counter's total, or a histogram's sample count.
fn metric(snapshot: &[(String, DebugValue)], name: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| match v {
            DebugValue::Counter(c) => *c,
            DebugValue::Histogram(h) => h.len() as u64,
            DebugValue::Gauge(g) => g.into_inner() as u64,
        })
        .sum()
}

#[test]
fn metrics_are_recorded() -> TestResult {
    let app = format!("pges_metrics_{}", std::process::id());
    let t = TestStore::with("ops_metrics", |c| c.application_name(&app));
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || -> TestResult {
        let r = t.append("m", ExpectedVersion::NoStream, &events("A", 3))?;
        assert!(t
            .append("m", ExpectedVersion::NoStream, &events("B", 1))
            .unwrap_err()
            .is_wrong_expected_version());
        let read: Vec<_> = t
            .read_stream("m", ReadStream::forwards())?
            .collect::<Result<_, _>>()?;
        assert_eq!(read.len(), 3);
        crate::common::wait_visible(&t, r.last_position);
        assert_eq!(t.read_all(ReadAll::from_start())?.count(), 3);
        // A killed connection: the next append retries on a new one.
        assert!(crate::common::kill_backends(&app) >= 1);
        let again = t.append("m", ExpectedVersion::Exact(2), &events("C", 2))?;
        assert_eq!((again.first_version, again.last_version), (3, 4));
        assert!(!again.was_duplicate);
        Ok(())
    })?;
    let snapshot = names_and_values(&snapshotter);
    eprintln!("{snapshot:#?}");
    assert_eq!(metric(&snapshot, "pg_eventstore_events_appended_total"), 5);
    assert_eq!(metric(&snapshot, "pg_eventstore_append_conflicts_total"), 1);
    assert_eq!(
        metric(&snapshot, "pg_eventstore_append_duration_seconds"),
        3
    );
    assert_eq!(metric(&snapshot, "pg_eventstore_events_read_total"), 6);
    assert!(metric(&snapshot, "pg_eventstore_pool_wait_seconds") >= 5);
    assert!(metric(&snapshot, "pg_eventstore_retries_total") >= 1);
    assert_eq!(t.count_events(), 5);
    Ok(())
}

#[test]
fn every_call_that_is_safe_to_repeat_survives_killed_backends() -> TestResult {
    let app = format!("pges_calls_{}", std::process::id());
    let t = TestStore::with("ops_calls", |c| c.application_name(&app).max_connections(4));
    t.append("c", ExpectedVersion::NoStream, &events("A", 2))?;
    t.save_snapshot("c", 1, &serde_json::json!({ "n": 2 }))?;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || -> TestResult {
        // Before each call: four pooled connections, all killed.
        let step = std::cell::Cell::new(0);
        let kill_pool = || {
            step.set(step.get() + 1);
            let held: Vec<_> = (0..4).map(|_| t.pool().get().unwrap()).collect();
            let state = t.pool().state();
            drop(held);
            let n = crate::common::kill_backends(&app);
            assert!(n >= 4, "step {}: killed {n}, pool {state:?}", step.get());
        };
        kill_pool();
        assert_eq!(t.stream_version("c")?, Some(1));
        kill_pool();
        assert!(t.head_position()?.is_some());
        kill_pool();
        assert_eq!(t.schema_version()?, SCHEMA_VERSION);
        kill_pool();
        t.save_snapshot("c", 2, &serde_json::json!({ "n": 3 }))?;
        kill_pool();
        let snap = t.load_snapshot::<serde_json::Value>("c")?.unwrap();
        assert_eq!((snap.version, snap.state["n"].as_i64()), (2, Some(3)));
        kill_pool();
        assert_eq!(t.migrate()?.applied.len(), 0);
        kill_pool();
        assert!(t.health_check().is_ready());
        kill_pool();
        let read: Vec<_> = t
            .read_stream("c", ReadStream::backwards())?
            .collect::<Result<_, _>>()?;
        assert_eq!(read.len(), 2);
        Ok(())
    })?;
    let snapshot = names_and_values(&snapshotter);
    let retries = metric(&snapshot, "pg_eventstore_retries_total");
    eprintln!("calls after killed backends: {retries} retries");
    // At most one retry for each of the seven calls, although four dead connections
    // waited in the pool each time: a retry skips them without spending attempts (and a
    // call whose connection sat untaken for a second checks it first, and needs none).
    // The health check needs none: it falls back to a new connection (and clears the
    // dead).
    assert!(retries <= 7, "{retries} retries");
    Ok(())
}

#[test]
fn which_sqlstates_are_transient() -> TestResult {
    let mut c = client();
    let mut raise = |code: &str| -> Error {
        // A real server error with the chosen SQLSTATE (passed as a parameter).
        c.execute("SELECT set_config('pges.code', $1, false)", &[&code])
            .unwrap();
        c.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = \
             current_setting('pges.code'); END $$",
            &[],
        )
        .map(|_| ())
        .map_err(Error::from)
        .unwrap_err()
    };
    for code in [
        "40001", "40P01", "53300", "57P01", "57P02", "57P03", "08006",
    ] {
        let e = raise(code);
        assert_eq!(e.code().map(|c| c.code()), Some(code));
        assert!(e.is_transient(), "{code}: {e}");
    }
    for code in ["23505", "23514", "42P01", "22P02", "57014", "XX000"] {
        let e = raise(code);
        assert!(!e.is_transient(), "{code}: {e}");
    }
    Ok(())
}

#[test]
fn serialization_failures_and_deadlocks_in_appends_are_retried() -> TestResult {
    let t = TestStore::new("ops_faultinject");
    // The next `n` appends fail with a chosen SQLSTATE.
    let fault = Fault::install(&t, "events");
    let inject = |code: Option<&str>, times: i64| fault.inject(code, times);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Retries since the previous look: a snapshot drains the recorder's counters.
    let retries = || -> u64 {
        metric(
            &names_and_values(&snapshotter),
            "pg_eventstore_retries_total",
        )
    };
    metrics::with_local_recorder(&recorder, || -> TestResult {
        inject(Some("40001"), 2);
        let r = t.append("f", ExpectedVersion::NoStream, &events("A", 2))?;
        assert_eq!((r.first_version, r.last_version), (0, 1));
        assert!(!r.was_duplicate);
        assert_eq!(retries(), 2, "two serialization failures, two retries");

        inject(Some("40P01"), 3);
        let r = t.append("f", ExpectedVersion::Exact(1), &events("B", 1))?;
        assert_eq!(r.last_version, 2);
        assert_eq!(retries(), 3, "three deadlocks, three retries");

        // More failures than retries: the error reaches the caller, after max_retries.
        inject(Some("40001"), 100);
        let e = t
            .append("f", ExpectedVersion::Exact(2), &events("C", 1))
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("40001"), "{e}");
        assert!(e.is_transient());
        assert_eq!(retries(), 5, "the default max_retries");

        // Not transient: no retry.
        inject(Some("23514"), 1);
        let e = t
            .append("f", ExpectedVersion::Exact(2), &events("C", 1))
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("23514"), "{e}");
        assert_eq!(retries(), 0);

        // A wrong expected version: never retried.
        inject(None, 0);
        assert!(t
            .append("f", ExpectedVersion::Exact(0), &events("D", 1))
            .unwrap_err()
            .is_wrong_expected_version());
        assert_eq!(retries(), 0);

        // append_in: never retried, the caller's transaction is aborted.
        inject(Some("40001"), 1);
        let mut conn = t.pool().get()?;
        let mut tx = conn.transaction()?;
        let e = t
            .append_in(&mut tx, "f", ExpectedVersion::Exact(2), &events("E", 1))
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("40001"), "{e}");
        drop(tx);
        assert_eq!(retries(), 0);
        Ok(())
    })?;
    assert_eq!(t.count_events(), 3);
    assert_eq!(t.stream_version("f")?, Some(2));
    Ok(())
}

/// A server that ends idle sessions (`idle_session_timeout`, as managed services often
/// set it) closes the pool's idle connections. The store's calls that are not retried
/// still get live ones: a connection nobody took for a second is checked first. (Before,
/// an import failed with "connection closed", and so did the first statement of a
/// `StoreConnection` transaction.)
#[test]
fn calls_after_the_server_closed_idle_connections_get_live_ones() -> TestResult {
    let t = TestStore::new("ops_idle_session");
    let mut pg: pg_eventstore::postgres::Config = database_url().parse()?;
    pg.options("-c idle_session_timeout=300");
    let store = Config::from_pg(pg)
        .schema(&t.schema)
        .max_connections(3)
        .connect()?;
    let idle_out = || {
        let held: Vec<_> = (0..3).map(|_| store.connection().unwrap()).collect();
        drop(held);
        std::thread::sleep(Duration::from_millis(1200));
    };
    idle_out();
    let input: Vec<(&str, pg_eventstore::EventData)> = events("E", 3)
        .into_iter()
        .map(|e| ("imported", e))
        .collect();
    store
        .import(&input, pg_eventstore::ImportOptions::new())
        .map_err(|e| format!("import: {e}"))?;
    idle_out();
    let mut conn = store.connection()?;
    let mut tx = conn.transaction().map_err(|e| format!("begin: {e}"))?;
    tx.append("in-tx", ExpectedVersion::NoStream, &events("E", 1))?;
    tx.commit()?;
    assert_eq!(store.stream_version("imported")?, Some(2));
    assert_eq!(store.stream_version("in-tx")?, Some(0));
    Ok(())
}
