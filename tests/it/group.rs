//! Consumer groups: members in this process and in child processes (examples/group_member.rs)
//! sharing one processor name.
use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{client, events, wait_visible, TestResult, TestStore};
use pg_eventstore::{
    Config, Error, EventData, ExpectedVersion, GroupOptions, ImportOptions, ReadAll, Store, Worker,
};

/// Imports `streams` × `per_stream` events, interleaved (event k of every stream, then
/// event k + 1, ...), so that every stretch of the log touches every partition.
fn import_interleaved(t: &TestStore, prefix: &str, streams: usize, per_stream: usize) {
    let names: Vec<String> = (0..streams).map(|s| format!("{prefix}{s}")).collect();
    let input: Vec<(&str, EventData)> = (0..per_stream)
        .flat_map(|k| {
            names.iter().map(move |n| {
                (
                    n.as_str(),
                    EventData::json("E", serde_json::json!({ "k": k })),
                )
            })
        })
        .collect();
    let summary = t
        .import(&input, ImportOptions::new().continue_existing_streams(true))
        .expect("import");
    wait_visible(t, summary.last_position);
}

/// Waits up to `limit` for `f` to hold; returns how long it took.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

fn query_i64(sql: &str) -> i64 {
    client().query_one(sql, &[]).unwrap().get(0)
}

/// The partition of a stream, as the store computes it (see `partition_of` in sql.rs).
fn partition_sql(stream: &str, partitions: u32) -> String {
    format!("((('x' || substr(md5({stream}), 1, 8))::bit(32)::bigint % {partitions})::int)")
}

/// A member process of examples/group_member.rs.
struct MemberProcess {
    child: Child,
    id: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl MemberProcess {
    fn start(schema: &str, group: &str, args: &[&str]) -> MemberProcess {
        Self::start_on(&crate::common::database_url(), schema, group, args)
    }

    /// A member that connects with `url`.
    fn start_on(url: &str, schema: &str, group: &str, args: &[&str]) -> MemberProcess {
        let mut child = Command::new(crate::common::example("group_member"))
            .args(["--group", group])
            .env("DATABASE_URL", url)
            .args(args)
            .env("DB_SCHEMA", schema)
            .env("DB_MAX_CONNECTIONS", "8")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the member starts");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = out
            .next()
            .expect("the member prints its id")
            .expect("stdout");
        let id = first
            .strip_prefix("member ")
            .and_then(|l| l.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let lines = Arc::new(Mutex::new(vec![first]));
        let sink = lines.clone();
        thread::spawn(move || {
            for l in out.map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        MemberProcess { child, id, lines }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then waits for a clean exit; returns its output.
    fn stop(mut self) -> String {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        thread::sleep(Duration::from_millis(50));
        let out = self.lines.lock().unwrap().join("\n");
        assert!(status.success(), "member exited with {status}:\n{out}");
        out
    }
}

impl Drop for MemberProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Member processes with a 1.5 s lease, a heartbeat every 0.25 s, 2 threads, and a
/// handler that takes `delay_us` µs per event.
fn member_args(delay_us: &'static str) -> [&'static str; 8] {
    [
        "--lease-ms",
        "1500",
        "--heartbeat-ms",
        "250",
        "--threads",
        "2",
        "--delay-us",
        delay_us,
    ]
}

/// Events the member processes have handled (`s`: the quoted schema).
fn logged(s: &str) -> i64 {
    query_i64(&format!("SELECT count(*) FROM {s}.group_log"))
}

/// The checks every run of examples/group_member.rs ends with: every event handled
/// exactly once, each stream in version order.
fn assert_exactly_once_in_order(schema: &str, total: i64, streams: i64, per_stream: i64) {
    let s = format!("\"{schema}\"");
    assert_eq!(
        query_i64(&format!("SELECT count(*) FROM {s}.group_log")),
        total,
        "events handled"
    );
    assert_eq!(
        query_i64(&format!(
            "SELECT count(*) FROM (SELECT 1 FROM {s}.group_log
              GROUP BY stream_id, version HAVING count(*) > 1) d"
        )),
        0,
        "events handled twice"
    );
    assert_eq!(
        query_i64(&format!("SELECT count(*) FROM {s}.group_violations")),
        0,
        "events out of order"
    );
    assert_eq!(
        query_i64(&format!(
            "SELECT count(*) FROM {s}.group_model
              WHERE last_version = {} AND handled = {per_stream}",
            per_stream - 1
        )),
        streams,
        "streams complete in the read model"
    );
}

#[test]
fn three_member_processes_one_killed_one_added_every_event_once_in_order() -> TestResult {
    const STREAMS: usize = 500;
    const PER_STREAM: usize = 100;
    const TOTAL: i64 = (STREAMS * PER_STREAM) as i64;
    let t = TestStore::new("group_procs");
    let s = format!("\"{}\"", t.schema);
    import_interleaved(&t, "acc-", STREAMS, PER_STREAM);
    let args = member_args("200");
    let mut members: Vec<MemberProcess> = (0..3)
        .map(|_| MemberProcess::start(&t.schema, "g", &args))
        .collect();
    let handled = || logged(&s);

    // Kill one member once the three share the work and it has done some of it.
    wait_for(
        "three members share the partitions",
        Duration::from_secs(30),
        || {
            let m = t.group_members("g").unwrap();
            m.len() == 3 && m.iter().all(|m| m.partitions.len() >= 21)
        },
    );
    wait_for("a tenth handled", Duration::from_secs(60), || {
        handled() >= TOTAL / 10
    });
    let victim = members.remove(0);
    let victim_partitions: Vec<u32> = t
        .group_members("g")?
        .into_iter()
        .find(|m| m.member_id.to_string() == victim.id)
        .expect("the victim is a member")
        .partitions;
    assert!(!victim_partitions.is_empty());
    let killed_at: std::time::SystemTime =
        client().query_one("SELECT clock_timestamp()", &[])?.get(0);
    victim.signal("KILL");
    let kill = Instant::now();
    let handled_at_kill = handled();
    // Poll the lease rows directly (the admin listing counts the lag, a scan).
    let parts: Vec<i32> = victim_partitions.iter().map(|p| *p as i32).collect();
    let victim_id: uuid::Uuid = victim.id.parse()?;
    let mut c = client();
    let (mut first_taken, mut removed) = (None, None);
    wait_for(
        "the victim's partitions taken over",
        Duration::from_secs(30),
        || {
            let row = c
                .query_one(
                    &format!(
                        "SELECT count(*) FILTER (WHERE owner <> $2),
                            NOT EXISTS (SELECT 1 FROM {s}.group_members WHERE member_id = $2)
                       FROM {s}.group_leases
                      WHERE group_name = 'g' AND partition = ANY($1)"
                    ),
                    &[&parts, &victim_id],
                )
                .unwrap();
            let (taken, gone): (i64, bool) = (row.get(0), row.get(1));
            if gone && removed.is_none() {
                removed = Some(kill.elapsed());
            }
            if taken > 0 && first_taken.is_none() {
                first_taken = Some(kill.elapsed());
            }
            taken == parts.len() as i64
        },
    );
    let takeover = kill.elapsed();
    let (first_taken, removed) = (first_taken.unwrap_or(takeover), removed.unwrap_or(takeover));
    drop(victim);

    // A new member joins mid-run and gets its share.
    assert!(
        handled() < TOTAL,
        "the run ended before a member could join"
    );
    members.push(MemberProcess::start(&t.schema, "g", &args));
    let newcomer = members.last().unwrap().id.clone();
    let rebalance = wait_for(
        "the newcomer gets its share",
        Duration::from_secs(30),
        || {
            t.group_members("g")
                .unwrap()
                .iter()
                .any(|m| m.member_id.to_string() == newcomer && m.partitions.len() >= 21)
        },
    );
    wait_for("every event handled", Duration::from_secs(90), || {
        handled() >= TOTAL
    });
    let outputs: Vec<String> = members.into_iter().map(MemberProcess::stop).collect();
    assert_exactly_once_in_order(&t.schema, TOTAL, STREAMS as i64, PER_STREAM as i64);

    // The newcomer handled events; the others handed partitions over to it.
    let newcomer_pid = outputs[2]
        .lines()
        .next()
        .and_then(|l| l.split(" pid ").nth(1))
        .expect("pid")
        .to_string();
    let by_newcomer = query_i64(&format!(
        "SELECT count(*) FROM {s}.group_log WHERE member = '{newcomer_pid}'"
    ));
    assert!(by_newcomer > 0, "the new member handled nothing");
    assert!(
        outputs[..2].iter().any(|o| !o.contains("released 0,")),
        "nobody handed a partition over: {outputs:?}"
    );
    // When did the victim's partitions' events flow again, by the database's clock?
    let resumed: Option<f64> = client()
        .query_one(
            &format!(
                "SELECT extract(epoch FROM min(at) - $1)::float8 FROM {s}.group_log
                  WHERE at > $1 AND {} = ANY($2)",
                partition_sql("stream_id", 64)
            ),
            &[&killed_at, &parts],
        )?
        .get(0);
    eprintln!(
        "group of processes: killed after {handled_at_kill} of {TOTAL} events; removed from \
         the group {:.2} s, leases taken over {:.2} s (first) to {:.2} s (all {}) after \
         kill -9 (lease timeout 1.5 s, \
         heartbeat 0.25 s); first event of the victim's partitions handled again {:.2} s \
         after the kill; newcomer got its share in {:.2} s and handled {by_newcomer} \
         events; whole run {:.1} s",
        removed.as_secs_f64(),
        first_taken.as_secs_f64(),
        takeover.as_secs_f64(),
        parts.len(),
        resumed.unwrap_or(f64::NAN),
        rebalance.as_secs_f64(),
        kill.elapsed().as_secs_f64()
    );
    for o in &outputs {
        eprintln!("  {}", o.replace('\n', " | "));
    }
    Ok(())
}

/// A store of its own (its own pool), as another process would have.
fn second_store(t: &TestStore) -> Store {
    let config = Config::new(&crate::common::database_url())
        .unwrap()
        .schema(&t.schema)
        .max_connections(8);
    Store::connect(config).unwrap()
}

/// Per-stream order and "handled once" for plain handlers of several members: the next
/// version each stream expects, the streams being handled right now, and every event id
/// handled.
#[derive(Default)]
struct Checker {
    next: HashMap<String, u64>,
    busy: HashSet<String>,
    seen: HashSet<uuid::Uuid>,
    repeats: u64,
    out_of_order: Vec<String>,
}

fn checked(
    checker: &Arc<Mutex<Checker>>,
) -> impl Fn(&pg_eventstore::RecordedEvent) -> Result<(), pg_eventstore::HandlerError>
       + Send
       + Sync
       + 'static {
    let checker = checker.clone();
    move |e| {
        {
            let mut c = checker.lock().unwrap();
            assert!(
                c.busy.insert(e.stream_id.clone()),
                "stream {} handled by two members at once",
                e.stream_id
            );
            let next = c.next.entry(e.stream_id.clone()).or_insert(0);
            if e.version != *next {
                let msg = format!("{} v{} (expected v{next})", e.stream_id, e.version);
                c.out_of_order.push(msg);
            }
            *c.next.get_mut(&e.stream_id).unwrap() = e.version + 1;
            if !c.seen.insert(e.id) {
                c.repeats += 1;
            }
        }
        thread::sleep(Duration::from_micros(50));
        checker.lock().unwrap().busy.remove(&e.stream_id);
        Ok(())
    }
}

#[test]
fn members_share_partitions_and_a_clean_stop_hands_them_over_without_repeats() -> TestResult {
    let t = TestStore::with("group_share", |c| c.max_connections(8));
    import_interleaved(&t, "s-", 200, 50);
    let other = second_store(&t);
    let options = || {
        GroupOptions::new()
            .partitions(16)
            // Long: a hand-over that waited for it would fail the timing below.
            .lease_timeout(Duration::from_secs(30))
            .heartbeat_interval(Duration::from_millis(100))
    };
    let checker = Arc::new(Mutex::new(Checker::default()));
    let a = t
        .worker("share")
        .threads(2)
        .checkpoint_interval(Duration::from_millis(100))
        .group(options())
        .spawn(checked(&checker))?;
    let b = other
        .worker("share")
        .threads(2)
        .checkpoint_interval(Duration::from_millis(100))
        .group(options())
        .spawn(checked(&checker))?;
    wait_for("an even split", Duration::from_secs(20), || {
        a.partitions().len() == 8 && b.partitions().len() == 8
    });
    let members = t.group_members("share")?;
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members
        .iter()
        .all(|m| m.is_alive && m.partitions.len() == 8));
    let mut all: Vec<u32> = a.partitions().into_iter().chain(b.partitions()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..16).collect::<Vec<_>>());

    // Live events reach them too, while they run.
    for k in 0..20 {
        t.append(
            &format!("live-{k}"),
            ExpectedVersion::NoStream,
            &events("L", 5),
        )?;
    }
    let total = 200 * 50 + 20 * 5;
    wait_for("half handled", Duration::from_secs(30), || {
        checker.lock().unwrap().seen.len() >= total / 2
    });

    // A clean stop: a finishes what it read, checkpoints, hands over; b takes all 16
    // long before the 30 s lease timeout.
    let stopped = Instant::now();
    let summary_a = a.stop()?;
    assert_eq!(summary_a.released, summary_a.acquired, "{summary_a:?}");
    let handover = wait_for("b holds everything", Duration::from_secs(10), || {
        b.partitions().len() == 16
    });
    assert!(stopped.elapsed() < Duration::from_secs(10));
    wait_for("everything handled", Duration::from_secs(30), || {
        checker.lock().unwrap().seen.len() >= total
    });
    wait_for("checkpoints at the end", Duration::from_secs(10), || {
        t.group_partitions("share")
            .unwrap()
            .iter()
            .all(|p| p.lag == 0 && p.position.is_some())
    });
    let summary_b = b.stop()?;
    let c = checker.lock().unwrap();
    assert_eq!(c.seen.len(), total);
    assert_eq!(c.repeats, 0, "a clean hand-over repeats nothing");
    assert!(c.out_of_order.is_empty(), "{:?}", c.out_of_order);
    assert_eq!(
        summary_a.handled + summary_b.handled,
        total as u64,
        "{summary_a:?} {summary_b:?}"
    );
    assert!(summary_a.handled > 0 && summary_b.handled > 0);

    // The admin view: the group with its partitions, nobody running, nothing left.
    let p = t.processors()?;
    let g = p.iter().find(|p| p.name == "share").expect("listed");
    let info = g.group.expect("a group");
    assert_eq!((info.partitions, info.live_members), (16, 0));
    assert_eq!((g.lag, g.is_running), (0, false));
    assert!(g.position.is_some());
    assert!(t.group_members("share")?.is_empty());
    let partitions = t.group_partitions("share")?;
    assert_eq!(partitions.len(), 16);
    assert!(partitions.iter().all(|p| p.owner.is_none() && p.epoch >= 1));
    eprintln!(
        "clean hand-over of 8 partitions took {:.2} s",
        handover.as_secs_f64()
    );
    Ok(())
}

/// Stream names (`f-k`): the first in partition `stolen`, the first in partition `kept`.
fn streams_in(stolen: u32, kept: u32, partitions: u32) -> (String, String) {
    let mut c = client();
    let mut inside = None;
    let mut outside = None;
    for k in 0..1000 {
        let name = format!("f-{k}");
        let p: i32 = c
            .query_one(
                &format!("SELECT {}", partition_sql("$1::text", partitions)),
                &[&name],
            )
            .unwrap()
            .get(0);
        if p as u32 == stolen {
            inside = inside.or(Some(name));
        } else if p as u32 == kept {
            outside = outside.or(Some(name));
        }
        if let (Some(i), Some(o)) = (&inside, &outside) {
            return (i.clone(), o.clone());
        }
    }
    panic!("no streams found");
}

#[test]
fn a_transactional_handler_commits_nothing_for_a_partition_taken_from_its_member() -> TestResult {
    let t = TestStore::with("group_fence", |c| c.max_connections(8));
    let s = format!("\"{}\"", t.schema);
    client().batch_execute(&format!(
        "CREATE TABLE {s}.seen (stream_id text, version bigint)"
    ))?;
    // The thief counts as a live member, so the member's share drops to two partitions
    // and it hands over its highest surplus one (3): the kept stream lives in 0, which
    // it keeps whatever the timing.
    let (stolen_stream, kept_stream) = streams_in(1, 0, 4);
    t.append(&stolen_stream, ExpectedVersion::NoStream, &events("E", 1))?;
    let calls = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let log = calls.clone();
    let insert = format!("INSERT INTO {s}.seen VALUES ($1, $2)");
    let member = t
        .worker("fence")
        // Rounds and checkpoints far apart: only the fence can notice the theft.
        .checkpoint_interval(Duration::from_secs(600))
        .group(
            GroupOptions::new()
                .partitions(4)
                .lease_timeout(Duration::from_secs(60))
                .heartbeat_interval(Duration::from_secs(20)),
        )
        .spawn_transactional(move |tx, e| {
            log.lock().unwrap().push((e.stream_id.clone(), e.version));
            let insert = Worker::prepare_cached(tx, &insert)?;
            tx.execute(&insert, &[&e.stream_id, &(e.version as i64)])?;
            Ok(())
        })?;
    let seen = |stream: &str| -> i64 {
        client()
            .query_one(
                &format!("SELECT count(*) FROM {s}.seen WHERE stream_id = $1"),
                &[&stream],
            )
            .unwrap()
            .get(0)
    };
    wait_for("the first event", Duration::from_secs(20), || {
        seen(&stolen_stream) == 1
    });
    assert_eq!(member.partitions(), vec![0, 1, 2, 3]);

    // Another (live) member takes partition 1 behind the member's back, as after a
    // pause longer than its lease.
    let thief = uuid::Uuid::now_v7();
    client().batch_execute(&format!(
        "INSERT INTO {s}.group_members (group_name, member_id, info, expires_at)
         VALUES ('fence', '{thief}', 'thief', now() + interval '1 hour');
         UPDATE {s}.group_leases SET owner = '{thief}', epoch = epoch + 1
          WHERE group_name = 'fence' AND partition = 1"
    ))?;
    t.append(&stolen_stream, ExpectedVersion::Exact(0), &events("E", 1))?;
    t.append(&kept_stream, ExpectedVersion::NoStream, &events("E", 1))?;
    wait_for(
        "the kept partition's event",
        Duration::from_secs(20),
        || seen(&kept_stream) == 1,
    );
    wait_for(
        "the member finds partition 1 gone",
        Duration::from_secs(20),
        || !member.partitions().contains(&1),
    );
    assert_eq!(
        seen(&stolen_stream),
        1,
        "an event of a stolen partition committed"
    );
    assert!(
        !calls.lock().unwrap().contains(&(stolen_stream.clone(), 1)),
        "the handler ran for an event of a stolen partition"
    );
    let summary = member.stop()?;
    assert!(summary.revoked >= 1 && summary.lost >= 1, "{summary:?}");

    // The thief goes away without handling it: its partition is free, and the next
    // member handles the event exactly once.
    client().batch_execute(&format!(
        "DELETE FROM {s}.group_members WHERE member_id = '{thief}'"
    ))?;
    let insert = format!("INSERT INTO {s}.seen VALUES ($1, $2)");
    let again = t
        .worker("fence")
        .group(
            GroupOptions::new()
                .partitions(4)
                .lease_timeout(Duration::from_secs(3))
                .heartbeat_interval(Duration::from_millis(100)),
        )
        .spawn_transactional(move |tx, e| {
            tx.execute(&insert, &[&e.stream_id, &(e.version as i64)])?;
            Ok(())
        })?;
    wait_for("the stolen stream's event", Duration::from_secs(20), || {
        seen(&stolen_stream) == 2
    });
    let summary = again.stop()?;
    assert_eq!(seen(&stolen_stream), 2);
    assert_eq!(seen(&kept_stream), 1, "{summary:?}");
    Ok(())
}

#[test]
fn bad_group_settings_and_a_worker_of_the_same_name_are_refused() -> TestResult {
    let t = TestStore::with("group_refuse", |c| c.max_connections(8));
    t.append("x-1", ExpectedVersion::NoStream, &events("E", 3))?;
    let options = || {
        GroupOptions::new()
            .partitions(4)
            .lease_timeout(Duration::from_secs(3))
            .heartbeat_interval(Duration::from_millis(100))
    };
    // Bad options write nothing.
    let e = t
        .worker("g")
        .group(options().heartbeat_interval(Duration::from_secs(2)))
        .spawn(|_| Ok(()))
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(t.group_partitions("g")?.is_empty());

    let member = t.worker("g").group(options()).spawn(|_| Ok(()))?;
    // Another partition count for the same group.
    let e = t
        .worker("g")
        .group(options().partitions(8))
        .spawn(|_| Ok(()))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("has 4 partitions")),
        "{e}"
    );
    // A worker of the same name, and a reset, while a member runs.
    let e = t.worker("g").run_batch(|_| Ok(())).unwrap_err();
    assert!(matches!(e, Error::ProcessorLocked { .. }), "{e}");
    assert!(matches!(
        t.reset_processor("g"),
        Err(Error::ProcessorLocked { .. })
    ));
    assert!(t
        .processors()?
        .iter()
        .any(|p| p.name == "g" && p.is_running));
    wait_for("caught up", Duration::from_secs(20), || {
        t.group_partitions("g").unwrap().iter().all(|p| p.lag == 0)
    });
    member.stop()?;

    // A member while a worker of the same name runs.
    let worker = t.worker("g").spawn(|_| Ok(()))?;
    let e = t
        .worker("g")
        .group(options())
        .spawn(|_| Ok(()))
        .unwrap_err();
    assert!(matches!(e, Error::ProcessorLocked { .. }), "{e}");
    worker.stop()?;

    // A reset removes the group: it may start again with another count.
    let report = t.reset_processor("g")?;
    assert_eq!(report.partition_checkpoints, 4, "{report:?}");
    assert!(t.group_partitions("g")?.is_empty());
    let member = t
        .worker("g")
        .group(options().partitions(8))
        .spawn(|_| Ok(()))?;
    wait_for("eight partitions", Duration::from_secs(20), || {
        member.partitions().len() == 8
    });
    member.stop()?;
    Ok(())
}

/// A member whose lock's session ended, while a `Worker` of the same name took the
/// processor lock, stops handling as soon as its heartbeat finds the lock taken: the
/// events still queued on its threads are left unhandled (for the next owner) instead
/// of being handled beside the worker.
#[test]
fn a_member_that_finds_a_worker_holding_its_lock_stops_handling_at_once() -> TestResult {
    let t = TestStore::with("group_lock_taken", |c| c.max_connections(10));
    t.append("s", ExpectedVersion::NoStream, &events("E", 400))?;
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let c = calls.clone();
    let member = t
        .worker("g")
        .group(
            GroupOptions::new()
                .partitions(1)
                .heartbeat_interval(Duration::from_millis(200))
                .lease_timeout(Duration::from_secs(2)),
        )
        .spawn(move |_| {
            c.lock().unwrap().push(Instant::now());
            thread::sleep(Duration::from_millis(10));
            Ok(())
        })?;
    wait_for("the first events", Duration::from_secs(20), || {
        calls.lock().unwrap().len() >= 5
    });
    // The session holding the member's shared lock ends; a worker takes the lock.
    let key = format!("{}:g", t.schema);
    let pid: i32 = client()
        .query_one(
            "SELECT pid FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND objsubid = 2
                AND classid::text::bigint = 1346720562
                AND objid::text::bigint = (hashtext($1)::bigint + 4294967296) % 4294967296",
            &[&key],
        )?
        .get(0);
    client().execute("SELECT pg_terminate_backend($1)", &[&pid])?;
    let mut worker = None;
    wait_for("the worker takes the lock", Duration::from_secs(20), || {
        worker = t.worker("g").spawn(|_| Ok(())).ok();
        worker.is_some()
    });
    let started = Instant::now();
    // (Before, it could hang here: its threads waited for a lease renewal that the
    // ended heartbeat would never send.)
    wait_for("the member ends", Duration::from_secs(20), || {
        !member.is_running()
    });
    let e = member.join().unwrap_err();
    assert!(matches!(e, Error::ProcessorLocked { .. }), "{e:?}");
    // The heartbeat finds out within two intervals (one fails on the dead session, the
    // next finds the lock taken); the queue held about 200 events of 10 ms.
    let late = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > started + Duration::from_millis(1000))
        .count();
    worker.unwrap().stop()?;
    assert_eq!(
        late, 0,
        "handler calls beside the worker, after the member knew"
    );
    Ok(())
}

/// A member's stop ends a failing handler's retries at once, cleanly: the event stays
/// after its partition's checkpoint, for the next owner.
#[test]
fn a_member_s_stop_ends_a_failing_handler_s_retries() -> TestResult {
    let t = TestStore::with("group_retry_stop", |c| c.max_connections(8));
    t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let member = t
        .worker("g")
        .retries(6)
        .retry_delay(Duration::from_millis(100))
        .group(GroupOptions::new().partitions(1))
        .spawn(move |_| {
            *c.lock().unwrap() += 1;
            Err("downstream unavailable".into())
        })?;
    wait_for("the first call", Duration::from_secs(20), || {
        *calls.lock().unwrap() >= 1
    });
    let asked = Instant::now();
    let summary = member.stop()?;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "stop took {took:?} ({} handler calls)",
        calls.lock().unwrap()
    );
    assert_eq!(summary.handled, 0);
    assert_eq!(
        t.group_partitions("g")?[0].lag,
        1,
        "the event is still to do"
    );
    Ok(())
}

/// A member info PostgreSQL text cannot store (a NUL byte), or a very long one, is
/// refused as `InvalidInput` naming the problem, before anything is written.
#[test]
fn a_member_info_the_database_cannot_store_is_refused_before_anything_is_written() -> TestResult {
    let t = TestStore::with("group_info", |c| c.max_connections(8));
    for info in ["pod\0x".to_string(), "p".repeat(4097)] {
        let e = t
            .worker("g")
            .group(GroupOptions::new().member_info(info))
            .spawn(|_| Ok(()))
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("member info")),
            "{e:?}"
        );
    }
    let n = query_i64(&format!(
        "SELECT count(*) FROM \"{}\".group_leases",
        t.schema
    ));
    assert_eq!(n, 0, "nothing written");
    // An info at the limit is taken.
    let member = t
        .worker("g")
        .group(
            GroupOptions::new()
                .partitions(2)
                .member_info("p".repeat(4096)),
        )
        .spawn(|_| Ok(()))?;
    assert_eq!(t.group_members("g")?[0].info.len(), 4096);
    member.stop()?;
    Ok(())
}

#[test]
fn a_member_paused_past_its_lease_commits_nothing_twice_and_joins_again() -> TestResult {
    paused_member("group_pause", &crate::common::database_url())
}

/// The same, where the server also ends sessions idle in a transaction after 3 s: the
/// paused member's open handler transactions are rolled back about when it goes on,
/// before the other member has taken their partitions. After SIGCONT its handler threads
/// still hold events read under the leases it had, and it takes some of the same
/// partitions again under new epochs. A group of events that held
/// both must handle only the new epoch's. (Before, it handled the old epoch's too,
/// because the fence was matched by partition only: events were handled twice, or a later
/// version moved the stream's claim past earlier ones, which were then skipped and never
/// handled. It failed in 5 of 8 runs; the timing decides.)
#[test]
fn a_paused_member_whose_transactions_the_server_ended_commits_nothing_twice() -> TestResult {
    let url = crate::common::database_url();
    let glue = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{glue}options=-c%20idle_in_transaction_session_timeout%3D3000");
    paused_member("group_pause_idle", &url)
}

/// Two members over 20,000 events; one is paused with SIGSTOP for 3 s (twice its lease),
/// then goes on. Members connect with `url`.
fn paused_member(test: &str, url: &str) -> TestResult {
    const STREAMS: usize = 200;
    const PER_STREAM: usize = 100;
    const TOTAL: i64 = (STREAMS * PER_STREAM) as i64;
    let t = TestStore::new(test);
    let s = format!("\"{}\"", t.schema);
    import_interleaved(&t, "p-", STREAMS, PER_STREAM);
    let args = member_args("300");
    let paused = MemberProcess::start_on(url, &t.schema, "g", &args);
    let other = MemberProcess::start_on(url, &t.schema, "g", &args);
    let handled = || logged(&s);
    let holds = |id: &str| -> usize {
        t.group_members("g")
            .unwrap()
            .iter()
            .find(|m| m.member_id.to_string() == id)
            .map_or(0, |m| m.partitions.len())
    };
    wait_for("an even split", Duration::from_secs(30), || {
        holds(&paused.id) == 32 && holds(&other.id) == 32
    });
    wait_for("a tenth handled", Duration::from_secs(60), || {
        handled() >= TOTAL / 10
    });
    // SIGSTOP: a pause (a GC, a VM migration) in the middle of whatever it was doing,
    // open handler transactions included, for twice its lease.
    paused.signal("STOP");
    let stopped_at = Instant::now();
    let (other_id, paused_id) = (other.id.clone(), paused.id.clone());
    wait_for(
        "the other member takes partitions over",
        Duration::from_secs(30),
        || holds(&other_id) > 32,
    );
    let removed = t
        .group_members("g")?
        .iter()
        .all(|m| m.member_id.to_string() != paused_id);
    thread::sleep(Duration::from_millis(3000).saturating_sub(stopped_at.elapsed()));
    // Partitions whose lease rows the paused member's open transactions lock cannot be
    // taken until those transactions end.
    let taken = holds(&other_id);
    paused.signal("CONT");
    wait_for("every event handled", Duration::from_secs(90), || {
        handled() >= TOTAL
    });
    let rejoined = wait_for(
        "the paused member joins again with a share",
        Duration::from_secs(30),
        || {
            t.group_members("g").unwrap().iter().any(|m| {
                m.member_id.to_string() != paused_id
                    && m.member_id.to_string() != other_id
                    && m.partitions.len() == 32
            })
        },
    );
    let out_paused = paused.stop();
    let out_other = other.stop();
    assert_exactly_once_in_order(&t.schema, TOTAL, STREAMS as i64, PER_STREAM as i64);
    assert!(
        removed,
        "the paused member was still listed after the takeover"
    );
    assert!(out_paused.contains("rejoined 1"), "{out_paused}");
    eprintln!(
        "paused member: the other held {taken} of 64 partitions after 3 s (the rest locked \
         by the paused member's open transactions); after SIGCONT the paused member joined \
         again and had its share back {:.2} s after the last event\n  {}\n  {}",
        rejoined.as_secs_f64(),
        out_paused.replace('\n', " | "),
        out_other.replace('\n', " | ")
    );
    Ok(())
}

#[test]
fn members_ride_out_a_database_restart_within_the_lease() -> TestResult {
    let server = crate::common::server::TempServer::start(&[]);
    let connect = || {
        Config::new(&server.url())
            .unwrap()
            .schema("groups")
            .max_connections(6)
            .connect()
            .unwrap()
    };
    let first = connect();
    first.migrate()?;
    let mut c = postgres::Client::connect(&server.url(), postgres::NoTls)?;
    c.batch_execute("CREATE TABLE groups.seen (stream_id text, version bigint, previous bigint)")?;
    let names: Vec<String> = (0..50).map(|k| format!("r-{k}")).collect();
    let input: Vec<(&str, EventData)> = (0..60)
        .flat_map(|_| {
            names
                .iter()
                .map(|n| (n.as_str(), EventData::json("E", serde_json::json!({}))))
        })
        .collect();
    first.import(&input, ImportOptions::new())?;
    // Each event records the version it saw before, in the claiming transaction.
    let record = "INSERT INTO groups.seen
                  SELECT $1, $2, (SELECT max(version) FROM groups.seen WHERE stream_id = $1)";
    let member = |store: &Store| {
        store
            .worker("restart")
            .retries(30)
            .retry_delay(Duration::from_millis(100))
            .group(
                GroupOptions::new()
                    .partitions(8)
                    .lease_timeout(Duration::from_secs(8))
                    .heartbeat_interval(Duration::from_millis(300)),
            )
            .spawn_transactional(move |tx, e| {
                thread::sleep(Duration::from_millis(1));
                let record = Worker::prepare_cached(tx, record)?;
                tx.execute(&record, &[&e.stream_id, &(e.version as i64)])?;
                Ok(())
            })
            .unwrap()
    };
    let second = connect();
    let (a, b) = (member(&first), member(&second));
    let seen = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM groups.seen", &[])
            .map(|r| r.get(0))
            .unwrap_or(0)
    };
    wait_for("a fifth handled", Duration::from_secs(30), || {
        seen(&mut c) >= 600
    });
    let outage = Instant::now();
    server.stop();
    server.start_again();
    let down = outage.elapsed();
    let mut c = postgres::Client::connect(&server.url(), postgres::NoTls)?;
    wait_for("every event handled", Duration::from_secs(60), || {
        seen(&mut c) >= 3000
    });
    let (sa, sb) = (a.stop()?, b.stop()?);
    let row = c.query_one(
        "SELECT count(*), count(DISTINCT (stream_id, version)),
                count(*) FILTER (WHERE COALESCE(previous, -1) <> version - 1)
           FROM groups.seen",
        &[],
    )?;
    let (total, distinct, out_of_order): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (total, distinct, out_of_order),
        (3000, 3000, 0),
        "{}",
        server.log()
    );
    // Back within the lease: nobody lost a partition or had to join again.
    for s in [sa, sb] {
        assert_eq!((s.lost, s.rejoined), (0, 0), "{s:?}");
    }
    assert_eq!(sa.handled + sb.handled, 3000, "{sa:?} {sb:?}");
    eprintln!(
        "database restart of {:.2} s ridden out: {sa:?} {sb:?}",
        down.as_secs_f64()
    );
    Ok(())
}

/// A group's filters (streams, category, event types) pick the same events as a `$all`
/// read, and its partitions' checkpoints still reach the end of the log.
#[test]
fn a_filtered_group_handles_exactly_what_its_filters_pick() -> TestResult {
    let t = TestStore::with("group_filter", |c| c.max_connections(8));
    import_interleaved(&t, "s-", 20, 10);
    let last = t.append("s-3", ExpectedVersion::Any, &events("Other", 2))?;
    wait_visible(&t, last.last_position);
    let picked = |w: Worker| w.streams(["s-3", "s-11", "none"]).event_types(["E"]);
    let want: Vec<(String, u64)> = t
        .read_all(
            ReadAll::from_start()
                .streams(["s-3", "s-11", "none"])
                .event_types(["E"]),
        )?
        .map(|e| e.map(|e| (e.stream_id, e.version)))
        .collect::<Result<_, _>>()?;
    assert_eq!(want.len(), 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let member = picked(t.worker("filtered").threads(2))
        .checkpoint_interval(Duration::from_millis(50))
        .group(GroupOptions::new().partitions(4))
        .spawn(move |e| {
            s.lock().unwrap().push((e.stream_id.clone(), e.version));
            Ok(())
        })?;
    wait_for(
        "every partition checkpointed",
        Duration::from_secs(20),
        || {
            t.group_partitions("filtered")
                .unwrap()
                .iter()
                .all(|p| p.lag == 0 && p.position.is_some())
        },
    );
    member.stop()?;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut want = want;
    want.sort();
    assert_eq!(seen, want);
    Ok(())
}
