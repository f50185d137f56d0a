//! Concurrent writers of every kind while other people's transactions stay open, and four
//! followers of the global feed: a reader thread tailing `read_all` from its last position,
//! two reader processes doing the same, and a subscription. Each follower must end with
//! exactly the committed events, each once, in strictly increasing position order, every
//! stream in version order.
//!
//! Open throughout the run: a transaction holding an id in another database, and one in
//! this database that wrote to another table. Writers: appends inside transactions that
//! append first, appends inside transactions that took their id long before appending
//! (writing another table first), and appends through the pool; a fifth of the
//! transactions roll back.
//!
//! A second test, on a private server, follows sparse pool appends that hand their events
//! to subscriptions without a read (in their own store and, through the notification, in
//! another) among the same kinds of transactions.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{client, Rng, TestResult, TestStore, XidHolder};
use pg_eventstore::{Error, EventData, ExpectedVersion, ReadAll, Store, SubscribeOptions};
use uuid::Uuid;

const WRITERS: u64 = 6;
const WRITE_FOR: Duration = Duration::from_secs(8);
/// How long followers may take after the writers stop.
const DRAIN: Duration = Duration::from_secs(30);

/// What a follower saw: position, id, stream, version.
type Seen = (u64, Uuid, String, u64);

#[derive(Default)]
struct Tally {
    committed: Vec<Uuid>,
    rolled_back: usize,
    refused: usize,
}

#[test]
fn the_feed_never_skips_or_repeats_whatever_else_is_open() -> TestResult {
    let t = TestStore::with("stress_all", |c| c.max_connections(16).read_page_size(200));
    let other = format!("\"{}\".other", t.schema);
    client().batch_execute(&format!("CREATE TABLE {other} (x int)"))?;
    let blockers = [
        XidHolder::in_other_database(),
        XidHolder::open(client(), &format!("INSERT INTO {other} VALUES (0)")),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let dir = std::env::temp_dir().join(format!("pg_eventstore_stress_{}", t.schema));
    std::fs::create_dir_all(&dir)?;

    let processes: Vec<_> = (0..2)
        .map(|i| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "stress::reader_process",
                    "--ignored",
                    "--nocapture",
                ])
                .env("PGES_STRESS_SCHEMA", &t.schema)
                .env("PGES_STRESS_DIR", &dir)
                .env("PGES_STRESS_OUT", dir.join(format!("reader-{i}")))
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let subscriber = follow(&t.store, &target, WRITE_FOR)?;
    let reader = {
        let store = t.store.clone();
        let target = target.clone();
        thread::spawn(move || tail(&store, || target.load(Ordering::Relaxed)))
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stop, other) = (t.store.clone(), stop.clone(), other.clone());
            thread::spawn(move || write(&store, w, &stop, &other))
        })
        .collect();

    let started = Instant::now();
    thread::sleep(WRITE_FOR);
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for w in writers {
        let one = w.join().unwrap()?;
        tally.committed.extend(one.committed);
        tally.rolled_back += one.rolled_back;
        tally.refused += one.refused;
    }
    let committed = tally.committed.len();
    target.store(committed, Ordering::Relaxed);
    std::fs::write(dir.join("target"), committed.to_string())?;

    let mut followers = vec![
        ("reader thread", reader.join().unwrap()?),
        ("subscription", subscriber.join().unwrap()?),
    ];
    for (i, mut p) in processes.into_iter().enumerate() {
        assert!(p.wait()?.success(), "reader process {i} failed");
        followers.push((
            "reader process",
            read_seen(&dir.join(format!("reader-{i}")))?,
        ));
    }
    drop(blockers);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "stress: {committed} events committed, {} transactions rolled back, {} refused \
         (feed order), in {:?}; delivered: {:?}",
        tally.rolled_back,
        tally.refused,
        started.elapsed(),
        followers.iter().map(|f| f.1.len()).collect::<Vec<_>>()
    );
    assert!(committed > 500, "too little traffic to prove anything");
    assert!(
        tally.rolled_back > 20,
        "too few rollbacks to prove anything"
    );
    let committed: HashSet<Uuid> = tally.committed.into_iter().collect();
    for (name, seen) in &followers {
        check(name, seen, &committed);
    }
    assert_eq!(t.count_events() as usize, committed.len());
    Ok(())
}

/// A thread following the feed with a `$all` subscription of `store` until it has
/// `target` events or the writers' time `writing` and the drain have passed.
fn follow(
    store: &Store,
    target: &Arc<AtomicUsize>,
    writing: Duration,
) -> pg_eventstore::Result<thread::JoinHandle<pg_eventstore::Result<Vec<Seen>>>> {
    let mut sub = store.subscribe(SubscribeOptions::all())?;
    let target = target.clone();
    Ok(thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + writing + DRAIN;
        while seen.len() < target.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Some(e) = sub.next_timeout(Duration::from_millis(100)) {
                let e = e?;
                seen.push((e.position, e.id, e.stream_id, e.version));
            }
        }
        Ok(seen)
    }))
}

/// Sparse pool appends hand their events to the subscriptions of their own store, and
/// their notifications carry them to another store, while `append_in` transactions open,
/// hold, roll back and commit around them, and a transaction of another database holds
/// an id throughout. On a private server, where nothing else takes ids, the appends'
/// events are often provably next, so both ways of delivering without a read run often.
/// Both subscriptions must end with exactly the committed events, each once, in order.
#[test]
fn events_handed_over_without_a_read_never_skip_or_repeat() -> TestResult {
    let server = crate::common::server::TempServer::start(&["autovacuum = off"]);
    let config = pg_eventstore::Config::new(&server.url())?
        .schema("handover")
        .max_connections(16);
    let store = config.clone().connect()?;
    store.migrate()?;
    // Another process, as far as the notifications go: its own pool and listener.
    let elsewhere = config.connect()?;
    let other = "handover.other";
    store
        .pool()
        .get()?
        .batch_execute(&format!("CREATE TABLE {other} (x int)"))?;
    let template1 = format!("{}/template1", server.url().rsplit_once('/').unwrap().0);
    let _held = XidHolder::open(
        postgres::Client::connect(&template1, postgres::NoTls)?,
        "SELECT pg_current_xact_id()",
    );
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let followers = [
        ("here", follow(&store, &target, HANDOVER_FOR)?),
        ("elsewhere", follow(&elsewhere, &target, HANDOVER_FOR)?),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    // One writer of every kind, and three that only append through the pool, a few
    // milliseconds apart (sparse appends, which hand their events over).
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            thread::spawn(move || {
                if w < 1 {
                    write(&store, w, &stop, other)
                } else {
                    write_sparse(&store, w, &stop)
                }
            })
        })
        .collect();
    thread::sleep(HANDOVER_FOR);
    stop.store(true, Ordering::Relaxed);
    let mut committed = HashSet::new();
    for w in writers {
        committed.extend(w.join().unwrap()?.committed);
    }
    target.store(committed.len(), Ordering::Relaxed);
    assert!(
        committed.len() > 300,
        "too little traffic to prove anything"
    );
    for (name, follower) in followers {
        check(name, &follower.join().unwrap()?, &committed);
    }
    Ok(())
}

/// Appends of one to three events through the pool, 1 to 4 ms apart.
fn write_sparse(store: &Store, w: u64, stop: &AtomicBool) -> pg_eventstore::Result<Tally> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let stream = format!("s-{}", rng.next() % 50);
        let batch: Vec<EventData> = (0..1 + rng.next() % 3)
            .map(|i| EventData::json("E", serde_json::json!({ "w": w, "i": i })))
            .collect();
        store.append(&stream, ExpectedVersion::Any, &batch)?;
        tally.committed.extend(batch.iter().map(|e| e.event_id()));
        thread::sleep(Duration::from_micros(1_000 + rng.next() % 3_000));
    }
    Ok(tally)
}

/// How long the writers of the hand-over test run.
const HANDOVER_FOR: Duration = Duration::from_secs(4);

/// One writer: a third of its transactions append first, a third take their id by writing
/// `other` up to 20 ms before they append (half of them after `lock_for_appends`), a
/// third append through the pool.
fn write(store: &Store, w: u64, stop: &AtomicBool, other: &str) -> pg_eventstore::Result<Tally> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
    let mut tally = Tally::default();
    let mut conn = store.pool().get().expect("connection");
    while !stop.load(Ordering::Relaxed) {
        let stream = format!("s-{}", rng.next() % 50);
        let n = 1 + (rng.next() % 3) as usize;
        let batch: Vec<EventData> = (0..n)
            .map(|i| EventData::json("E", serde_json::json!({ "w": w, "i": i })))
            .collect();
        let ids: Vec<Uuid> = batch.iter().map(|e| e.event_id()).collect();
        let mode = rng.next() % 3;
        if mode == 2 {
            store.append(&stream, ExpectedVersion::Any, &batch)?;
            tally.committed.extend(ids);
            continue;
        }
        let roll = rng.next() % 5 == 0;
        let hold = Duration::from_micros(rng.next() % 3000);
        let mut tx = conn.transaction()?;
        // Half of those that write elsewhere first take the events table's lock before.
        let locked = mode == 1 && rng.next() % 2 == 0;
        if locked {
            store.lock_for_appends(&mut tx)?;
        }
        if mode == 1 {
            tx.execute(&format!("INSERT INTO {other} VALUES (1)"), &[])?;
            thread::sleep(Duration::from_micros(rng.next() % 20_000));
        }
        match store.append_in(&mut tx, &stream, ExpectedVersion::Any, &batch) {
            Ok(_) => {}
            // A lost race, or a stream appended by a younger transaction.
            Err(e)
                if e.is_wrong_expected_version()
                    || matches!(e, Error::StreamOrderConflict { .. }) =>
            {
                tx.rollback()?;
                continue;
            }
            Err(e @ Error::FeedOrderConflict { .. }) => {
                // Only a transaction that took its id before its first append (and
                // did not lock for appends first) may be refused.
                assert!(mode == 1 && !locked, "refused: {e}");
                tx.rollback()?;
                tally.refused += 1;
                continue;
            }
            Err(e) => return Err(e),
        }
        thread::sleep(hold);
        if roll {
            tx.rollback()?;
            tally.rolled_back += 1;
        } else {
            tx.commit()?;
            tally.committed.extend(ids);
        }
    }
    Ok(tally)
}

/// Tails the log the way a naive consumer would: "after my last position", until it has
/// `target()` events (or more, which the checks catch) or the time is up.
fn tail(store: &Store, target: impl Fn() -> usize) -> pg_eventstore::Result<Vec<Seen>> {
    let mut seen = Vec::new();
    let mut last = None;
    let deadline = Instant::now() + WRITE_FOR + DRAIN;
    while seen.len() < target() && Instant::now() < deadline {
        let options = match last {
            None => ReadAll::from_start(),
            Some(p) => ReadAll::after(p),
        };
        for e in store.read_all(options)? {
            let e = e?;
            last = Some(e.position);
            seen.push((e.position, e.id, e.stream_id, e.version));
        }
        thread::sleep(Duration::from_millis(2));
    }
    // A few more rounds: anything delivered beyond the target is a phantom or a repeat.
    for _ in 0..3 {
        for e in store.read_all(ReadAll::after(last.unwrap_or(0)))? {
            let e = e?;
            seen.push((e.position, e.id, e.stream_id, e.version));
        }
    }
    Ok(seen)
}

fn check(name: &str, seen: &[Seen], committed: &HashSet<Uuid>) {
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "{name}: positions must strictly increase"
    );
    let mut next_version = HashMap::new();
    for (_, _, stream, version) in seen {
        let next = next_version.entry(stream.clone()).or_insert(0u64);
        assert_eq!(version, next, "{name}: stream {stream} out of order");
        *next += 1;
    }
    let unique: HashSet<Uuid> = seen.iter().map(|s| s.1).collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "{name}: an event was delivered twice"
    );
    let missed = committed.difference(&unique).count();
    let phantom = unique.difference(committed).count();
    assert_eq!(missed, 0, "{name}: skipped committed events");
    assert_eq!(phantom, 0, "{name}: saw events that were rolled back");
}

/// The reader processes: run by the test above as this test binary with
/// `--exact reader_process --ignored`; they tail the schema it names and write what they
/// saw to a file.
#[test]
#[ignore = "run as a child process by the_feed_never_skips_or_repeats_whatever_else_is_open"]
fn reader_process() -> TestResult {
    let schema = std::env::var("PGES_STRESS_SCHEMA")?;
    let dir = PathBuf::from(std::env::var("PGES_STRESS_DIR")?);
    let out = PathBuf::from(std::env::var("PGES_STRESS_OUT")?);
    let store = pg_eventstore::Config::new(&crate::common::database_url())?
        .schema(&schema)
        .max_connections(2)
        .connect()?;
    let target_file = dir.join("target");
    let seen = tail(&store, || {
        std::fs::read_to_string(&target_file)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX)
    })?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    for (position, id, stream, version) in seen {
        writeln!(file, "{position} {id} {stream} {version}")?;
    }
    file.flush()?;
    Ok(())
}

fn read_seen(path: &Path) -> Result<Vec<Seen>, Box<dyn std::error::Error>> {
    let mut seen = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let mut parts = line.split(' ');
        let mut next = || parts.next().ok_or("short line");
        seen.push((
            next()?.parse()?,
            next()?.parse()?,
            next()?.to_string(),
            next()?.parse()?,
        ));
    }
    Ok(seen)
}
