//! Concurrent writers (some rolling back, some holding their transaction open) while a
//! reader tails `read_all` from its last position: the reader must end with exactly the
//! committed events, each once, in strictly increasing position order.
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Rng, TestResult, TestStore};
use pg_eventstore::{EventData, ExpectedVersion, ReadAll};
use uuid::Uuid;

const WRITERS: u64 = 6;

/// What the reader saw: position, id, stream, version.
type Seen = (u64, Uuid, String, u64);
const WRITE_FOR: Duration = Duration::from_secs(8);

#[test]
fn tailing_read_all_never_skips_or_repeats_under_concurrent_writers() -> TestResult {
    let t = TestStore::with("stress_all", |c| c.max_connections(12).read_page_size(200));
    let stop = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = t.store.clone();
            let stop = stop.clone();
            thread::spawn(move || -> pg_eventstore::Result<(Vec<Uuid>, usize)> {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                let mut committed = Vec::new();
                let mut rolled_back = 0;
                let mut conn = store.pool().get().expect("connection");
                while !stop.load(Ordering::Relaxed) {
                    let stream = format!("s-{}", rng.next() % 50);
                    let n = 1 + (rng.next() % 3) as usize;
                    let batch: Vec<EventData> = (0..n)
                        .map(|i| EventData::json("E", serde_json::json!({ "w": w, "i": i })))
                        .collect();
                    let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id()).collect();
                    let roll = rng.next() % 5 == 0;
                    // Half the transactions do other work before the append, so that
                    // their xid is taken well before their events are inserted.
                    let early_xid = rng.next() % 2 == 0;
                    let hold = Duration::from_micros(rng.next() % 3000);
                    let mut tx = conn.transaction()?;
                    if early_xid {
                        tx.execute("SELECT pg_current_xact_id()", &[])?;
                        thread::sleep(hold);
                    }
                    match store.append_in(&mut tx, &stream, ExpectedVersion::Any, &batch) {
                        Ok(_) => {}
                        // A lost race, or a stream appended by a younger transaction.
                        Err(e)
                            if e.is_wrong_expected_version()
                                || matches!(
                                    e,
                                    pg_eventstore::Error::StreamOrderConflict { .. }
                                ) =>
                        {
                            tx.rollback()?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    if !early_xid {
                        thread::sleep(hold);
                    }
                    if roll {
                        tx.rollback()?;
                        rolled_back += 1;
                    } else {
                        tx.commit()?;
                        committed.extend(ids);
                    }
                }
                Ok((committed, rolled_back))
            })
        })
        .collect();

    // The reader tails the log the way a naive consumer would: "after my last position".
    // Set once the writers are done: how many events the reader should end up with. The
    // reader goes on until it has that many (or more, which the checks below catch), so
    // an event held back by some other open transaction in the cluster is waited for.
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let reader = {
        let store = t.store.clone();
        let target = target.clone();
        thread::spawn(move || -> pg_eventstore::Result<Vec<Seen>> {
            let mut seen = Vec::new();
            let mut last = None;
            let mut extra_rounds = 0;
            let deadline = Instant::now() + WRITE_FOR + Duration::from_secs(30);
            loop {
                let options = match last {
                    None => ReadAll::from_start(),
                    Some(p) => ReadAll::after(p),
                };
                for e in store.read_all(options)? {
                    let e = e?;
                    last = Some(e.position);
                    seen.push((e.position, e.id, e.stream_id, e.version));
                }
                if seen.len() >= target.load(Ordering::Relaxed) || Instant::now() > deadline {
                    extra_rounds += 1;
                    if extra_rounds > 50 {
                        return Ok(seen);
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let started = Instant::now();
    thread::sleep(WRITE_FOR);
    stop.store(true, Ordering::Relaxed);
    let mut committed = Vec::new();
    let mut rolled_back = 0;
    for w in writers {
        let (c, r) = w.join().unwrap()?;
        committed.extend(c);
        rolled_back += r;
    }
    target.store(committed.len(), Ordering::Relaxed);
    let seen = reader.join().unwrap()?;
    eprintln!(
        "stress: {} events committed, {} transactions rolled back, {} delivered, in {:?}",
        committed.len(),
        rolled_back,
        seen.len(),
        started.elapsed()
    );
    assert!(
        committed.len() > 500,
        "too little traffic to prove anything"
    );
    assert!(rolled_back > 20, "too few rollbacks to prove anything");

    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "positions must strictly increase"
    );
    // Each stream's events come in version order, with no version missing.
    let mut next_version = std::collections::HashMap::new();
    for (_, _, stream, version) in &seen {
        let next = next_version.entry(stream.clone()).or_insert(0u64);
        assert_eq!(
            version, next,
            "stream {stream} out of order in the global order"
        );
        *next += 1;
    }
    let seen_ids: Vec<Uuid> = seen.iter().map(|s| s.1).collect();
    let unique: HashSet<Uuid> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "an event was delivered twice");
    let committed_set: HashSet<Uuid> = committed.iter().copied().collect();
    let missed = committed_set.difference(&unique).count();
    let phantom = unique.difference(&committed_set).count();
    assert_eq!(missed, 0, "the reader skipped committed events");
    assert_eq!(phantom, 0, "the reader saw events that were rolled back");
    assert_eq!(t.count_events() as usize, committed.len());
    Ok(())
}
