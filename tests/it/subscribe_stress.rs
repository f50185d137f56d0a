//! 8 writers (a fifth of their transactions rolled back), 3 subscribers (from the start,
//! from a middle position, live) and the listener's backend killed twice: each subscriber
//! must receive exactly the committed events of its range, in order, each once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Rng, TestResult, TestStore};
use pg_eventstore::{Config, Error, EventData, ExpectedVersion, Store, SubscribeOptions};
use uuid::Uuid;

const WRITERS: u64 = 8;
const WRITE_FOR: Duration = Duration::from_secs(6);

/// One committed event as its writer saw it.
#[derive(Clone, Copy)]
struct Written {
    id: Uuid,
    position: u64,
    /// When the writing transaction began, and when its commit returned.
    began: Instant,
    committed: Instant,
}

type Received = Arc<Mutex<Vec<(u64, Uuid)>>>;

fn spawn_subscriber(
    store: &Store,
    options: SubscribeOptions,
) -> pg_eventstore::Result<(
    Received,
    pg_eventstore::SubscriptionStopper,
    thread::JoinHandle<()>,
)> {
    let sub = store.subscribe(options)?;
    let stopper = sub.stopper();
    let received: Received = Arc::default();
    let sink = received.clone();
    let handle = thread::spawn(move || {
        for item in sub {
            match item {
                Ok(e) => sink.lock().unwrap().push((e.position, e.id)),
                // A killed listener never surfaces here; a read error would, and the
                // subscription carries on after it.
                Err(e) => eprintln!("subscription error (carrying on): {e}"),
            }
        }
    });
    Ok((received, stopper, handle))
}

fn kill_listener(store: &Store) {
    let pid = store.listener_state().expect("listener").backend_pid;
    let killed: bool = crate::common::client()
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(killed, "listener backend {pid} not found");
}

#[test]
fn three_subscribers_get_exactly_the_committed_events_across_listener_kills() -> TestResult {
    let t = TestStore::with("sub_stress", |c| c.max_connections(12));
    // Subscribers live in their own store: woken by NOTIFY, as another process would be.
    let readers = Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .poll_interval(Duration::from_millis(500))
        .connect()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let from_start = spawn_subscriber(&readers, SubscribeOptions::all())?;

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = t.store.clone();
            let stop = stop.clone();
            thread::spawn(move || -> pg_eventstore::Result<(Vec<Written>, usize)> {
                let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (w + 1));
                let mut written = Vec::new();
                let mut rolled_back = 0;
                let mut conn = store.pool().get().expect("connection");
                while !stop.load(Ordering::Relaxed) {
                    let stream = format!("s-{}", rng.next() % 40);
                    let batch: Vec<EventData> = (0..1 + rng.next() % 3)
                        .map(|i| EventData::json("E", serde_json::json!({ "w": w, "i": i })))
                        .collect();
                    let began = Instant::now();
                    let result = if rng.next() % 3 == 0 {
                        // Through the pool: commits at once, never rolled back.
                        store.append(&stream, ExpectedVersion::Any, &batch)
                    } else {
                        let mut tx = conn.transaction()?;
                        let r = store.append_in(&mut tx, &stream, ExpectedVersion::Any, &batch);
                        thread::sleep(Duration::from_micros(rng.next() % 2000));
                        match r {
                            Ok(r) if rng.next() % 5 != 0 => {
                                tx.commit()?;
                                Ok(r)
                            }
                            Ok(_) => {
                                tx.rollback()?;
                                rolled_back += 1;
                                continue;
                            }
                            Err(e) => Err(e),
                        }
                    };
                    match result {
                        Ok(r) => {
                            let committed = Instant::now();
                            for (i, e) in batch.iter().enumerate() {
                                written.push(Written {
                                    id: e.event_id(),
                                    position: r.first_position + i as u64,
                                    began,
                                    committed,
                                });
                            }
                        }
                        // An append through the pool does not wait for the stream's
                        // lock: when it takes the next version while an `append_in`
                        // waits, that one is refused, to be retried.
                        Err(Error::WrongExpectedVersion { .. })
                        | Err(Error::StreamOrderConflict { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok((written, rolled_back))
            })
        })
        .collect();

    thread::sleep(WRITE_FOR / 3);
    let middle_position = t.head_position()?.unwrap_or(0);
    let from_middle = spawn_subscriber(&readers, SubscribeOptions::all().after(middle_position))?;
    let live_called = Instant::now();
    let live = spawn_subscriber(&readers, SubscribeOptions::all().live())?;
    let live_returned = Instant::now();
    kill_listener(&readers);
    thread::sleep(WRITE_FOR / 3);
    kill_listener(&readers);
    thread::sleep(WRITE_FOR / 3);
    stop.store(true, Ordering::Relaxed);

    let mut written = Vec::new();
    let mut rolled_back = 0;
    for w in writers {
        let (x, r) = w.join().unwrap()?;
        written.extend(x);
        rolled_back += r;
    }
    assert!(written.len() > 500, "too little traffic: {}", written.len());
    assert!(rolled_back > 20, "too few rollbacks: {rolled_back}");

    let expected_all: HashSet<Uuid> = written.iter().map(|w| w.id).collect();
    let expected_middle: HashSet<Uuid> = written
        .iter()
        .filter(|w| w.position > middle_position)
        .map(|w| w.id)
        .collect();
    // Live: nothing committed before the call; everything begun after it returned.
    let not_live: HashSet<Uuid> = written
        .iter()
        .filter(|w| w.committed < live_called)
        .map(|w| w.id)
        .collect();
    let must_live: HashSet<Uuid> = written
        .iter()
        .filter(|w| w.began > live_returned)
        .map(|w| w.id)
        .collect();

    // Wait until the subscribers have caught up, then a little longer for strays.
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = |r: &Received, want: usize| r.lock().unwrap().len() >= want;
    while !(done(&from_start.0, expected_all.len())
        && done(&from_middle.0, expected_middle.len())
        && done(&live.0, must_live.len()))
    {
        if Instant::now() >= deadline {
            let got: HashSet<Uuid> = from_start.0.lock().unwrap().iter().map(|g| g.1).collect();
            let delivered: Vec<u64> = from_start.0.lock().unwrap().iter().map(|g| g.0).collect();
            for w in written.iter().filter(|w| !got.contains(&w.id)) {
                let before = delivered.iter().filter(|p| **p < w.position).max();
                let after = delivered.iter().filter(|p| **p > w.position).min();
                eprintln!(
                    "missing: position {} (xid {}), delivered around it: {:?} / {:?}, \
                     began {:?} committed {:?} after the start",
                    w.position,
                    w.position >> 20,
                    before.map(|p| (p, p >> 20)),
                    after.map(|p| (p, p >> 20)),
                    w.began - started,
                    w.committed - started
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not catch up: {} of {}, {} of {}, {} of {} (live); feed: {:?}",
            from_start.0.lock().unwrap().len(),
            expected_all.len(),
            from_middle.0.lock().unwrap().len(),
            expected_middle.len(),
            live.0.lock().unwrap().len(),
            must_live.len(),
            t.feed_status()
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));
    for (_, stopper, _) in [&from_start, &from_middle, &live] {
        stopper.stop();
    }
    let check_order = |name: &str, r: &Received| -> HashSet<Uuid> {
        let got = r.lock().unwrap().clone();
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: positions not strictly increasing"
        );
        let ids: HashSet<Uuid> = got.iter().map(|g| g.1).collect();
        assert_eq!(ids.len(), got.len(), "{name}: an event came twice");
        ids
    };
    let got_all = check_order("from start", &from_start.0);
    let got_middle = check_order("from middle", &from_middle.0);
    let got_live = check_order("live", &live.0);
    assert_eq!(
        got_all, expected_all,
        "from start: not exactly the committed events"
    );
    assert_eq!(
        got_middle, expected_middle,
        "from middle: not exactly its range"
    );
    assert!(
        got_live.is_disjoint(&not_live),
        "live: delivered events from before the call"
    );
    assert!(
        got_live.is_subset(&expected_all),
        "live: delivered uncommitted events"
    );
    assert!(
        must_live.is_subset(&got_live),
        "live: missed events committed after the call"
    );
    let state = readers.listener_state().unwrap();
    assert!(state.reconnects >= 2, "{state:?}");
    eprintln!(
        "subscribe stress: {} committed, {} rolled back, delivered {} / {} / {}, \
         listener reconnects {}, in {:?}",
        written.len(),
        rolled_back,
        got_all.len(),
        got_middle.len(),
        got_live.len(),
        state.reconnects,
        started.elapsed()
    );
    for (_, _, handle) in [from_start, from_middle, live] {
        handle.join().unwrap();
    }
    Ok(())
}
