//! Load generator: runs each workload twice in one run, once through pg-eventstore and
//! once as the leanest plain `postgres` code writing the same rows into an equivalent
//! plain table in a separate schema, and prints one JSON line per workload
//! (`{"workload":..,"ours":..,"raw":..,"ratio":..,"unit":..}`) and a markdown table.
//!
//! ```text
//! cargo run --release --example loadgen -- [--quick] [--reps N] [--only W1,W4] [--scale F]
//!     [--read-page-size N] [--no-notify]
//! ```
//!
//! * `--quick`: tiny sizes and one repetition, for smoke tests.
//! * `--reps N`: each side's number is the median of N runs (default 3; 1 with `--quick`).
//! * `--only W1,W4`: run only these workloads.
//! * `--scale F`: multiply every size by `F`.
//! * `--read-page-size N`: the store's `read_page_size` (default: the store's default).
//! * `--no-notify`: run our side with `notify_on_append(false)` (no cross-process NOTIFY
//!   after appends), to measure what the notification costs.
//! * `--subscriber`: while our side runs, a live `$all` subscription on a second store
//!   (its own pool and listener, as another process would have) follows every event, so
//!   appends pay for the NOTIFY that a listener elsewhere brings, and the server for
//!   the subscriber's reads. The raw side is unchanged.
//! * `--store-transaction`: the A workloads append through `Store::connection` and
//!   `StoreTransaction::append` (the statement prepared once per connection) instead of
//!   `append_in` on a plain client (parsed on every call). The raw side is unchanged.
//! * `--prepared-appends`: the A workloads append on their plain clients through
//!   `Store::prepared_appends` (the statements prepared once on each writer's connection)
//!   instead of `append_in`. The raw side is unchanged.
//!
//! The database comes from `DATABASE_URL` (or `DB_HOST`, ...; see `Config::from_env`).
//! Every schema the run creates is named `loadgen_<pid>_...` and dropped at the end.
//!
//! Workloads (default sizes):
//!
//! | id | what | ours | raw |
//! |----|------|------|-----|
//! | W1 | 20,000 single-event appends, exact expected version, round-robin over 1,000 streams, 1 connection | `append` | prepared single-row `INSERT` |
//! | W1A | W1 on a store (and raw table) analysed while empty: plans made from "empty" statistics must not slow appends down as the table grows | `append` | prepared single-row `INSERT` |
//! | W2 | 200,000 events, 100 per call, each call a new stream | `append` | one 100-row `INSERT ... SELECT FROM unnest(...)` per call |
//! | W3 | 20,000 single-event appends from 4 threads, each on its own 250 streams | `append` | prepared single-row `INSERT`, 4 connections |
//! | W4 | read one stream of 100,000 events | `read_stream` | `SELECT ... ORDER BY version` |
//! | W5 | read all 300,000 events in global order | `read_all` | `SELECT ... ORDER BY id` |
//! | W6 | live delivery: 2,000 appends, one every 2 ms over 10 streams, one subscriber (and, in the `other_store_*` fields, one in a second store, as another process would be) | `subscribe` | `INSERT` + `pg_notify` in one statement, `LISTEN` |
//! | W6X | W6 (ours only) while a transaction in another database holds an id throughout; the ratio is of append start → delivery p50s, as W6's | `subscribe` | `subscribe` in plain W6 conditions, same run |
//! | W6T | W6 with each append an `append_in` in a transaction of its own (one every 2 ms: each sends its events in its own `NOTIFY`), the subscriber in the same store and (extra fields) in a second store; `raw` is plain W6 through the pool in the same run; the ratio is of start → delivery p50s (the transaction's start, the pool append's), commit → delivery in the extra fields | `append_in` | (plain W6) |
//! | A6, A12 | `append_in` with 6 (12) writers, each in its own transactions: one event to one of 50 shared streams with `ExpectedVersion::Any`, the transaction held open 0–3 ms, a fifth rolled back; 300 transactions per writer, the same plan for both sides | `append_in` (a refused transaction is retried) | one `INSERT ... SELECT max(version) + 1` per transaction, retried after a unique violation |
//! | A6A | A6 on a store (and raw table) analysed while empty, as W1A | `append_in` | (same) |
//! | A6F, A12F | the same without the hold: commit as fast as possible (1,000 transactions per writer) | `append_in` | (same) |
//! | W7 | streaming bulk import of 1,000,000 events (10,000 streams of 100), generated as they are written, each side in a child process that reports its peak RSS; `--only W7 --scale 10 --reps 1` for 10,000,000 | `import_iter` (chunked above 1,048,576 events) | one binary `COPY` in one transaction |
//! | W8 | W1 (20,000 single appends to 1,000 new streams) on tables that already hold 10,000,000 events, loaded as W7 loads them and then vacuumed and analysed; loaded once per run, each repetition on new streams | `append` | prepared single-row `INSERT` |
//! | M1 | peak RSS (`VmHWM`) of a process reading 1,000,000 events vs one reading 10,000 | `read_all` | (same, 10,000) |
//! | P1 | the worker in batch mode over 20,000 events: 1 and 4 threads, trivial handler | `Worker::run_batch` | `read_all` of the same events (no raw side) |
//! | P2 | a transactional worker in batch mode over the same 20,000 events, 4 threads (and 1), one read-model upsert per event | `Worker::run_batch_transactional` | the same upserts from 4 connections (and, in `raw_batched_1`, from 1), 100 per transaction; and in `raw_batched_read` the same while a fifth connection reads every event, as the worker must (its ratio: `ratio_to_raw_with_read`) |
//! | P3 | the worker in batch mode over the same 20,000 events (written stream by stream), 4 threads, a handler that sleeps 100 µs per event (one that waits on I/O) | `Worker::run_batch` | 4 threads sleeping 100 µs per event over an even quarter of the events each: the best the threads can do |
//! | G1 | a consumer group of 4 members (and 2), each with its own pool and 1 thread, one read-model upsert per event in its transactional handler, over 20,000 events imported once the members have shared the partitions | `Worker::group` | the same group with 1 member |
//!
//! Throughputs are events per second and `ratio` is ours ÷ raw (1.0 = as fast as plain
//! PostgreSQL), the ratio of the two medians; `pair_ratios` lists the ratio of each
//! repetition's pair (ours and raw run back to back), in order, which shows the
//! machine's spread. P2 also reports each side's CPU per event (`*_cpu_us_per_event`: the
//! whole machine's busy time from `/proc/stat` over the side's run, client and server
//! together) and context switches per event, steadier than its throughput on a machine
//! whose speed moves from minute to minute; the A workloads report the CPU per
//! committed event of each side (`ours_cpu_us_per_event`, `raw_cpu_us_per_event`,
//! medians over the reps). For W6, `ours`/`raw` are the median p50 latency in ms from the start of
//! the append call to the subscriber receiving the event, and `ratio` is raw ÷ ours, so
//! that here too lower means we are slower; p99 and commit→delivery (from the moment the
//! append call returned; 0 when the event arrived before that) are extra fields, with
//! the number of events not delivered within 5 s after the last append. For M1, `ours` is the
//! peak RSS reading the large count and `raw` the peak RSS reading the small count (MiB),
//! and `ratio` is their difference in MiB (the target is at most 16).
//!
//! Both sides get the same rows, built before the clock starts: ~210-byte JSON data and
//! a small JSON metadata object per event. The raw table has the same columns, keys and
//! unique constraints as ours (`id bigint identity` primary key, unique `event_id`, unique
//! `(stream_id, version)`), so a ratio measures what the store does on top (expected
//! version check, global position slot, duplicate detection, notification), not a
//! different index set. Reps alternate which side goes first.
use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pg_eventstore::postgres::binary_copy::BinaryCopyInWriter;
use pg_eventstore::postgres::error::SqlState;
use pg_eventstore::postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use pg_eventstore::postgres::{Client, NoTls, Transaction};
use pg_eventstore::{
    Config, Error as PgError, EventData, ExpectedVersion, GroupOptions, ImportEvent, ImportOptions,
    ReadAll, ReadStream, Store, StoreTransaction, SubscribeOptions, SubscriptionStopper, Worker,
    MAX_EVENTS_PER_TRANSACTION,
};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn StdError + Send + Sync>>;

const EVENT_TYPE: &str = "UserRegistered";
const DATA_BYTES: usize = 210;

type Workload = fn(&Ctx) -> Res<Outcome>;

/// Every workload, in run order.
const WORKLOADS: &[(&str, &str, Workload)] = &[
    ("W1", "single appends, exact version, 1 connection", w1),
    ("W1A", "W1 after ANALYZE of the empty tables", w1a),
    ("W2", "100-event appends to new streams", w2),
    ("W3", "single appends, 4 connections", w3),
    ("W4", "read one stream", w4),
    ("W5", "read all in global order", w5),
    ("W6", "live subscription latency", w6),
    (
        "W6X",
        "W6 while another database holds a transaction id",
        w6x,
    ),
    (
        "W6T",
        "W6 through append_in (a transaction per append), subscriber here and in another store",
        w6t,
    ),
    (
        "A6",
        "append_in, 6 writers, transactions held 0-3 ms, a fifth rolled back",
        a6,
    ),
    ("A6A", "A6 after ANALYZE of the empty tables", a6a),
    (
        "A12",
        "append_in, 12 writers, transactions held 0-3 ms, a fifth rolled back",
        a12,
    ),
    (
        "A6F",
        "append_in, 6 writers, no hold, a fifth rolled back",
        a6f,
    ),
    (
        "A12F",
        "append_in, 12 writers, no hold, a fifth rolled back",
        a12f,
    ),
    ("W7", "bulk import", w7),
    ("W8", "W1 with 10,000,000 events stored", w8),
    ("M1", "peak RSS, large read vs small read", m1),
    ("P1", "worker, 4 threads, trivial handler, vs read_all", p1),
    (
        "P2",
        "transactional worker, 4 threads, read-model upsert, vs raw upserts in transactions of 100",
        p2,
    ),
    (
        "P3",
        "worker, 4 threads, a handler that waits 100 us per event, vs 4 threads on even shares",
        p3,
    ),
    (
        "G1",
        "consumer group, 4 members of 1 thread, read-model upsert, vs 1 member",
        g1,
    ),
];

/// Targets for ours ÷ raw (W6 has none; M1's is a difference in MiB, at most).
fn target(workload: &str) -> Option<f64> {
    match workload {
        "W1" | "W1A" | "W8" => Some(0.92),
        "W2" => Some(0.80),
        "W3" => Some(0.85),
        "W4" | "W5" => Some(0.95),
        "W6X" => Some(0.80),
        "W7" => Some(0.95),
        "A6" | "A6A" | "A12" | "A6F" | "A12F" => Some(0.90),
        "P2" => Some(0.80),
        "M1" => Some(16.0),
        _ => None,
    }
}

struct Sizes {
    w1_events: usize,
    w1_streams: usize,
    w2_events: usize,
    w3_events: usize,
    w4_stream: usize,
    w5_all: usize,
    w6_events: usize,
    w7_events: usize,
    w8_stored: usize,
    p1_events: usize,
    a_transactions: usize,
    m1_large: usize,
    m1_small: usize,
}

impl Sizes {
    fn new(quick: bool, scale: f64) -> Sizes {
        let s = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        if quick {
            Sizes {
                w1_events: s(200),
                w1_streams: s(20),
                w2_events: s(2_000),
                w3_events: s(400),
                w4_stream: s(2_000),
                w5_all: s(6_000),
                w6_events: s(50),
                w7_events: s(10_000),
                w8_stored: s(20_000),
                p1_events: s(500),
                a_transactions: s(20),
                m1_large: s(20_000),
                m1_small: s(200),
            }
        } else {
            Sizes {
                w1_events: s(20_000),
                w1_streams: s(1_000),
                w2_events: s(200_000),
                w3_events: s(20_000),
                w4_stream: s(100_000),
                w5_all: s(300_000),
                w6_events: s(2_000),
                w7_events: s(1_000_000),
                w8_stored: s(10_000_000),
                p1_events: s(20_000),
                a_transactions: s(300),
                m1_large: s(1_000_000),
                m1_small: s(10_000),
            }
        }
    }
}

struct Ctx {
    config: Config,
    sizes: Sizes,
    reps: usize,
    run: String,
    subscriber: bool,
    store_transaction: bool,
    prepared_appends: bool,
    /// `--read-page-size`, for the children that open stores of their own.
    read_page_size: Option<u32>,
}

/// One workload's result.
struct Outcome {
    ours: f64,
    raw: f64,
    ratio: f64,
    unit: &'static str,
    extra: Vec<(&'static str, Value)>,
}

impl Outcome {
    fn throughput(events: usize, ours: &[Duration], raw: &[Duration]) -> Outcome {
        let pairs: Vec<f64> = ours
            .iter()
            .zip(raw)
            .map(|(o, r)| round3(r.as_secs_f64() / o.as_secs_f64()))
            .collect();
        let ours = events as f64 / median(ours).as_secs_f64();
        let raw = events as f64 / median(raw).as_secs_f64();
        Outcome {
            ours,
            raw,
            ratio: ours / raw,
            unit: "events/s",
            extra: vec![("events", json!(events)), ("pair_ratios", json!(pairs))],
        }
    }
}

fn median(d: &[Duration]) -> Duration {
    let mut d = d.to_vec();
    d.sort();
    d[d.len() / 2]
}

/// The median of one field of several runs' latencies.
fn median_of(runs: &[Latency], field: fn(&Latency) -> f64) -> f64 {
    median_f(&runs.iter().map(field).collect::<Vec<_>>())
}

fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    type Child = fn(&[String]) -> Res<()>;
    let children: [(&str, Child); 2] = [("--m1-child", m1_child), ("--w7-child", w7_child)];
    for (flag, f) in children {
        if args.first().map(String::as_str) == Some(flag) {
            if let Err(e) = f(&args[1..]) {
                eprintln!("loadgen {flag}: {e}");
                std::process::exit(1);
            }
            return;
        }
    }
    if let Err(e) = run(&args) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

fn usage() -> String {
    "usage: loadgen [--quick] [--reps N] [--only W1,W4] [--scale F] [--read-page-size N] [--no-notify] [--subscriber] [--store-transaction] [--prepared-appends]".into()
}

fn run(args: &[String]) -> Res<()> {
    let mut quick = false;
    let mut reps = None;
    let mut only: Option<Vec<String>> = None;
    let mut scale = 1.0;
    let mut page: Option<u32> = None;
    let mut notify = true;
    let mut subscriber = false;
    let mut store_transaction = false;
    let mut prepared_appends = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value; {}", usage()))
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--reps" => reps = Some(value()?.parse::<usize>()?.max(1)),
            "--only" => {
                only = Some(
                    value()?
                        .split(',')
                        .map(|w| w.trim().to_uppercase())
                        .collect(),
                )
            }
            "--scale" => scale = value()?.parse()?,
            "--read-page-size" => page = Some(value()?.parse()?),
            "--no-notify" => notify = false,
            "--subscriber" => subscriber = true,
            "--store-transaction" => store_transaction = true,
            "--prepared-appends" => prepared_appends = true,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}; {}", usage()).into()),
        }
    }
    if let Some(only) = &only {
        for w in only {
            if !WORKLOADS.iter().any(|(id, _, _)| id == w) {
                return Err(format!("unknown workload {w:?}").into());
            }
        }
    }
    let mut config = Config::from_env()?
        .max_connections(4)
        .min_idle(1)
        .notify_on_append(notify);
    if let Some(n) = page {
        config = config.read_page_size(n);
    }
    let ctx = Ctx {
        config,
        sizes: Sizes::new(quick, scale),
        reps: reps.unwrap_or(if quick { 1 } else { 3 }),
        run: format!("loadgen_{}", std::process::id()),
        subscriber,
        store_transaction,
        prepared_appends,
        read_page_size: page,
    };
    eprintln!("loadgen: schemas {}_*", ctx.run);
    let mut rows = Vec::new();
    for (id, what, f) in WORKLOADS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|w| w == id)) {
            continue;
        }
        eprintln!("loadgen: {id} {what} ...");
        let started = Instant::now();
        let outcome = f(&ctx).map_err(|e| format!("{id}: {}", chain(&*e)))?;
        let mut line = serde_json::Map::new();
        line.insert("workload".into(), json!(id));
        line.insert("ours".into(), json!(round(outcome.ours)));
        line.insert("raw".into(), json!(round(outcome.raw)));
        line.insert("ratio".into(), json!(round3(outcome.ratio)));
        line.insert("unit".into(), json!(outcome.unit));
        for (k, v) in &outcome.extra {
            line.insert((*k).into(), v.clone());
        }
        line.insert("reps".into(), json!(ctx.reps));
        println!("{}", Value::Object(line));
        eprintln!(
            "loadgen: {id} done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        rows.push((*id, *what, outcome));
    }
    println!();
    println!("| workload | what | ours | raw | unit | ratio | target | met |");
    println!("|---|---|---:|---:|---|---:|---:|---|");
    for (id, what, o) in &rows {
        let (goal, met) = match target(id) {
            Some(t) if *id == "M1" => (format!("≤ {t} MiB"), o.ratio <= t),
            Some(t) => (format!("≥ {t:.2}"), o.ratio >= t),
            None => ("–".into(), true),
        };
        let met = match target(id) {
            None => "–",
            Some(_) if met => "yes",
            Some(_) => "**no**",
        };
        println!(
            "| {id} | {what} | {} | {} | {} | {:.3} | {goal} | {met} |",
            fmt_num(o.ours),
            fmt_num(o.raw),
            o.unit,
            o.ratio
        );
    }
    Ok(())
}

/// An error and its sources on one line (`postgres::Error` alone says only "db error").
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(&format!(": {c}"));
        source = c.source();
    }
    s
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 1000.0).round() / 1000.0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{x:.3}")
    }
}

// ---------------------------------------------------------------------------------------
// Schemas and rows.

/// A pair of schemas for one repetition: ours (migrated store) and raw (plain table).
/// Both are dropped on drop.
struct Pair {
    /// With `--subscriber`: the other store's live subscription, drained by a thread.
    follower: Option<(SubscriptionStopper, thread::JoinHandle<()>)>,
    store: Option<Store>,
    ours: String,
    raw: String,
    admin: Client,
}

impl Pair {
    fn new(ctx: &Ctx, tag: &str) -> Res<Pair> {
        let ours = format!("{}_{tag}_ours", ctx.run);
        let raw = format!("{}_{tag}_raw", ctx.run);
        let mut admin = ctx.config.pg_config().connect(NoTls)?;
        admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {r} CASCADE; DROP SCHEMA IF EXISTS {o} CASCADE;
             CREATE SCHEMA {r};
             CREATE TABLE {r}.events (
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 event_id uuid NOT NULL UNIQUE,
                 stream_id text NOT NULL,
                 version bigint NOT NULL,
                 event_type text NOT NULL,
                 data jsonb NOT NULL,
                 metadata jsonb,
                 recorded_at timestamptz NOT NULL DEFAULT now(),
                 UNIQUE (stream_id, version));",
            r = quote(&raw),
            o = quote(&ours),
        ))?;
        let store = Store::connect(ctx.config.clone().schema(&ours))?;
        store.migrate()?;
        let follower = if ctx.subscriber {
            let other = Store::connect(ctx.config.clone().schema(&ours))?;
            let sub = other.subscribe(SubscribeOptions::all().live())?;
            let stopper = sub.stopper();
            let drain = thread::spawn(move || {
                for event in sub {
                    event.expect("the follower's subscription failed");
                }
                drop(other);
            });
            // Let its listener connect, so that the appends' notifier sees it.
            thread::sleep(Duration::from_millis(1500));
            Some((stopper, drain))
        } else {
            None
        };
        Ok(Pair {
            follower,
            store: Some(store),
            ours,
            raw,
            admin,
        })
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("set until drop")
    }

    fn raw_client(&self, ctx: &Ctx) -> Res<Client> {
        Ok(ctx.config.pg_config().connect(NoTls)?)
    }

    fn raw_table(&self) -> String {
        format!("{}.events", quote(&self.raw))
    }

    /// Settles both tables after a load: vacuum (sets hint bits and the visibility map,
    /// which the first reader would otherwise do) and analyze.
    fn vacuum(&mut self) -> Res<()> {
        for schema in [&self.ours, &self.raw] {
            let sql = format!("VACUUM ANALYZE {}.events", quote(schema));
            self.admin.batch_execute(&sql)?;
        }
        Ok(())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some((stopper, drain)) = self.follower.take() {
            stopper.stop();
            let _ = drain.join();
        }
        drop(self.store.take());
        let sql = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            quote(&self.ours),
            quote(&self.raw)
        );
        if let Err(e) = self.admin.batch_execute(&sql) {
            eprintln!("loadgen: could not drop {} / {}: {e}", self.ours, self.raw);
        }
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One event's content, for both sides.
struct Row {
    id: Uuid,
    data: Vec<u8>,
    metadata: Vec<u8>,
}

impl Row {
    fn new(seq: usize) -> Row {
        let mut data = json!({
            "type": EVENT_TYPE,
            "seq": seq,
            "userId": format!("user-{seq}"),
            "email": format!("user-{seq}@example.com"),
            "padding": "",
        });
        let len = serde_json::to_vec(&data).expect("json").len();
        data["padding"] = json!("x".repeat(DATA_BYTES.saturating_sub(len)));
        let id = Uuid::now_v7();
        let metadata = json!({ "correlationId": Uuid::now_v7().to_string(), "source": "loadgen" });
        Row {
            id,
            data: serde_json::to_vec(&data).expect("json"),
            metadata: serde_json::to_vec(&metadata).expect("json"),
        }
    }

    fn event(&self) -> EventData {
        let data: Value = serde_json::from_slice(&self.data).expect("json");
        let metadata: Value = serde_json::from_slice(&self.metadata).expect("json");
        EventData::json(EVENT_TYPE, data)
            .metadata(&metadata)
            .expect("json")
            .id(self.id)
    }
}

fn rows(n: usize) -> Vec<Row> {
    (0..n).map(Row::new).collect()
}

/// JSON text sent as `jsonb` as it is: what lean raw code does with bytes it already has.
#[derive(Debug)]
struct Jsonb<'a>(&'a [u8]);

impl ToSql for Jsonb<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// The part of a row's data that W6's subscriber reads.
#[derive(serde::Deserialize)]
struct Seq {
    seq: usize,
}

/// What both sides decode from every row they read.
#[allow(dead_code)]
struct Decoded {
    id: i64,
    event_id: Uuid,
    stream_id: String,
    version: i64,
    event_type: String,
    data: JsonbText,
    metadata: Option<JsonbText>,
    recorded_at: std::time::SystemTime,
}

/// A `jsonb` value's text, unparsed: what a lean reader keeps (and what the store's
/// `RecordedEvent` holds).
struct JsonbText(#[allow(dead_code)] Box<str>);

impl<'a> FromSql<'a> for JsonbText {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let text = match (*ty == Type::JSONB, raw.split_first()) {
            (false, _) => raw,
            (true, Some((1, text))) => text,
            (true, _) => return Err("unsupported jsonb version".into()),
        };
        Ok(JsonbText(std::str::from_utf8(text)?.into()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

const RAW_COLUMNS: &str =
    "id, event_id, stream_id, version, event_type, data, metadata, recorded_at";

/// Runs `ours` and `raw` `reps` times each, alternating which goes first.
fn alternate(
    reps: usize,
    mut ours: impl FnMut() -> Res<Duration>,
    mut raw: impl FnMut() -> Res<Duration>,
) -> Res<(Vec<Duration>, Vec<Duration>)> {
    let (mut o, mut r) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 2 == 0 {
            o.push(ours()?);
            r.push(raw()?);
        } else {
            r.push(raw()?);
            o.push(ours()?);
        }
    }
    Ok((o, r))
}

// ---------------------------------------------------------------------------------------
// Appends.

/// One transaction of the A workloads: its stream, how long it stays open after the
/// append, and whether it rolls back.
#[derive(Clone, Copy)]
struct TxPlan {
    stream: usize,
    hold: Duration,
    rollback: bool,
}

const A_STREAMS: usize = 50;

/// Writer `w`'s transactions (xorshift from a fixed seed: the same for both sides).
fn tx_plans(w: usize, n: usize, hold_max: Duration) -> Vec<TxPlan> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let max_us = hold_max.as_micros() as u64;
    (0..n)
        .map(|_| TxPlan {
            stream: (next() % A_STREAMS as u64) as usize,
            hold: Duration::from_micros(if max_us == 0 { 0 } else { next() % max_us }),
            rollback: next() % 5 == 0,
        })
        .collect()
}

fn a6(ctx: &Ctx) -> Res<Outcome> {
    append_in_load(ctx, 6, Duration::from_millis(3), false)
}

fn a6a(ctx: &Ctx) -> Res<Outcome> {
    append_in_load(ctx, 6, Duration::from_millis(3), true)
}

fn a12(ctx: &Ctx) -> Res<Outcome> {
    append_in_load(ctx, 12, Duration::from_millis(3), false)
}

fn a6f(ctx: &Ctx) -> Res<Outcome> {
    append_in_load(ctx, 6, Duration::ZERO, false)
}

fn a12f(ctx: &Ctx) -> Res<Outcome> {
    append_in_load(ctx, 12, Duration::ZERO, false)
}

/// `writers` threads run their planned transactions on their own connections: ours
/// with `append_in(Any)`, raw with a single INSERT that computes the next version.
/// With `analyze`, both tables are analysed while empty first (as in W1A).
fn append_in_load(ctx: &Ctx, writers: usize, hold_max: Duration, analyze: bool) -> Res<Outcome> {
    let per = if hold_max.is_zero() {
        ctx.sizes.a_transactions * 10 / 3
    } else {
        ctx.sizes.a_transactions
    };
    let plans: Vec<Vec<TxPlan>> = (0..writers).map(|w| tx_plans(w, per, hold_max)).collect();
    let rows = rows(writers * per);
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let names: Vec<String> = (0..A_STREAMS).map(|i| format!("acct-{i}")).collect();
    let committed = plans.iter().flatten().filter(|p| !p.rollback).count();
    let retried = std::sync::atomic::AtomicU64::new(0);
    let conflicts = std::sync::atomic::AtomicU64::new(0);
    let raw_conflicts = std::sync::atomic::AtomicU64::new(0);
    // The machine's CPU µs per committed event of each timed run: ours, then raw.
    let cpu = std::sync::Mutex::new([Vec::new(), Vec::new()]);
    let run = |raw: bool| -> Res<Duration> {
        let mut pair = Pair::new(ctx, "a")?;
        if analyze {
            pair.vacuum()?;
        }
        let table = pair.raw_table();
        let insert = format!(
            "INSERT INTO {table} (event_id, stream_id, version, event_type, data, metadata)
             SELECT $1, $2, COALESCE(max(version), -1) + 1, $3, $4, $5
               FROM {table} WHERE stream_id = $2"
        );
        let clients: Vec<Client> = (0..writers)
            .map(|_| pair.raw_client(ctx))
            .collect::<Res<_>>()?;
        // With --store-transaction, ours appends on connections of a store of its own,
        // with a connection for every writer.
        let tx_store = if ctx.store_transaction && !raw {
            Some(Store::connect(
                ctx.config
                    .clone()
                    .max_connections(writers as u32)
                    .schema(&pair.ours),
            )?)
        } else {
            None
        };
        let barrier = Barrier::new(writers + 1);
        thread::scope(|scope| -> Res<Duration> {
            let handles: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(w, mut client)| {
                    let (store, barrier, names, insert) = (pair.store(), &barrier, &names, &insert);
                    let (plans, rows, events) = (&plans[w], &rows[w * per..], &events[w * per..]);
                    let (retried, conflicts, raw_conflicts) =
                        (&retried, &conflicts, &raw_conflicts);
                    let tx_store = tx_store.as_ref();
                    scope.spawn(move || -> Res<()> {
                        if let Some(store) = tx_store {
                            let mut conn = store.connection()?;
                            barrier.wait();
                            for (k, plan) in plans.iter().enumerate() {
                                loop {
                                    let mut tx = conn.transaction()?;
                                    let event = std::slice::from_ref(&events[k]);
                                    let r =
                                        tx.append(&names[plan.stream], ExpectedVersion::Any, event);
                                    if !appended(r, retried, conflicts)? {
                                        continue;
                                    }
                                    end(
                                        plan,
                                        tx,
                                        StoreTransaction::rollback,
                                        StoreTransaction::commit,
                                    )?;
                                    break;
                                }
                            }
                            return Ok(());
                        }
                        let insert = client.prepare(insert)?;
                        let mut prepared = ctx.prepared_appends.then(|| store.prepared_appends());
                        barrier.wait();
                        for (k, plan) in plans.iter().enumerate() {
                            loop {
                                let mut tx = client.transaction()?;
                                let stream = &names[plan.stream];
                                if raw {
                                    let r = &rows[k];
                                    let params: [&(dyn ToSql + Sync); 5] = [
                                        &r.id,
                                        stream,
                                        &EVENT_TYPE,
                                        &Jsonb(&r.data),
                                        &Jsonb(&r.metadata),
                                    ];
                                    if let Err(e) = tx.execute(&insert, &params) {
                                        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                                            raw_conflicts.fetch_add(1, Ordering::Relaxed);
                                            continue; // rolled back on drop
                                        }
                                        return Err(e.into());
                                    }
                                } else {
                                    let event = std::slice::from_ref(&events[k]);
                                    let r = match &mut prepared {
                                        Some(p) => {
                                            p.append(&mut tx, stream, ExpectedVersion::Any, event)
                                        }
                                        None => store.append_in(
                                            &mut tx,
                                            stream,
                                            ExpectedVersion::Any,
                                            event,
                                        ),
                                    };
                                    if !appended(r, retried, conflicts)? {
                                        continue;
                                    }
                                }
                                end(plan, tx, Transaction::rollback, Transaction::commit)?;
                                break;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            barrier.wait();
            let before = machine_cpu();
            let t = Instant::now();
            for h in handles {
                h.join().expect("thread")?;
            }
            let elapsed = t.elapsed();
            if let Some((per_event, _)) = per_event_since(before, committed) {
                cpu.lock().unwrap()[usize::from(raw)].push(per_event);
            }
            Ok(elapsed)
        })
    };
    let (ours, raw) = alternate(ctx.reps, || run(false), || run(true))?;
    let mut outcome = Outcome::throughput(committed, &ours, &raw);
    let [ours_cpu, raw_cpu] = cpu.into_inner().unwrap();
    if !ours_cpu.is_empty() && !raw_cpu.is_empty() {
        outcome.extra.extend([
            ("ours_cpu_us_per_event", json!(median_f(&ours_cpu))),
            ("raw_cpu_us_per_event", json!(median_f(&raw_cpu))),
        ]);
    }
    outcome.extra.extend([
        ("writers", json!(writers)),
        ("store_transaction", json!(ctx.store_transaction)),
        ("prepared_appends", json!(ctx.prepared_appends)),
        ("hold_max_ms", json!(hold_max.as_millis() as u64)),
        // Over all reps of each side.
        (
            "ours_refused_and_retried",
            json!(retried.load(Ordering::Relaxed)),
        ),
        (
            "ours_version_conflicts",
            json!(conflicts.load(Ordering::Relaxed)),
        ),
        (
            "raw_unique_violations_retried",
            json!(raw_conflicts.load(Ordering::Relaxed)),
        ),
    ]);
    Ok(outcome)
}

/// Whether an A workload's append went in; `false` (counted) when the transaction is
/// to be retried: refused for the global order, or a version conflict (never expected
/// with `Any`, but counted rather than fatal).
fn appended<T>(
    result: pg_eventstore::Result<T>,
    retried: &std::sync::atomic::AtomicU64,
    conflicts: &std::sync::atomic::AtomicU64,
) -> Res<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(PgError::StreamOrderConflict { .. } | PgError::FeedOrderConflict { .. }) => {
            retried.fetch_add(1, Ordering::Relaxed);
            Ok(false)
        }
        Err(PgError::WrongExpectedVersion { .. }) => {
            conflicts.fetch_add(1, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Holds an A workload's transaction open as planned, then ends it as planned.
fn end<T, E: StdError + Send + Sync + 'static>(
    plan: &TxPlan,
    tx: T,
    rollback: impl FnOnce(T) -> Result<(), E>,
    commit: impl FnOnce(T) -> Result<(), E>,
) -> Res<()> {
    if !plan.hold.is_zero() {
        thread::sleep(plan.hold);
    }
    if plan.rollback {
        rollback(tx)?;
    } else {
        commit(tx)?;
    }
    Ok(())
}

fn raw_insert_one(raw_table: &str) -> String {
    format!(
        "INSERT INTO {raw_table} (event_id, stream_id, version, event_type, data, metadata)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )
}

/// Single appends with an exact expected version, round-robin over `streams`.
fn ours_singles(store: &Store, events: &[EventData], names: &[String]) -> Res<()> {
    let mut versions: Vec<Option<u64>> = vec![None; names.len()];
    for (i, e) in events.iter().enumerate() {
        let s = i % names.len();
        let expected = versions[s].map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let r = store.append(&names[s], expected, std::slice::from_ref(e))?;
        versions[s] = Some(r.last_version);
    }
    Ok(())
}

fn raw_singles(client: &mut Client, table: &str, rows: &[Row], names: &[String]) -> Res<()> {
    let insert = client.prepare(&raw_insert_one(table))?;
    let mut versions: Vec<i64> = vec![0; names.len()];
    for (i, r) in rows.iter().enumerate() {
        let s = i % names.len();
        client.execute(
            &insert,
            &[
                &r.id,
                &names[s],
                &versions[s],
                &EVENT_TYPE,
                &Jsonb(&r.data),
                &Jsonb(&r.metadata),
            ],
        )?;
        versions[s] += 1;
    }
    Ok(())
}

fn w1(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w1_events;
    let rows = rows(n);
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let names: Vec<String> = (0..ctx.sizes.w1_streams)
        .map(|i| format!("user-{i}"))
        .collect();
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let pair = Pair::new(ctx, "w1")?;
            let t = Instant::now();
            ours_singles(pair.store(), &events, &names)?;
            Ok(t.elapsed())
        },
        || {
            let pair = Pair::new(ctx, "w1")?;
            let mut client = pair.raw_client(ctx)?;
            let t = Instant::now();
            raw_singles(&mut client, &pair.raw_table(), &rows, &names)?;
            Ok(t.elapsed())
        },
    )?;
    Ok(Outcome::throughput(n, &ours, &raw))
}

/// W1 on stores whose events table was analysed while empty (what an operator, or
/// `vacuumdb --analyze-in-stages` after an upgrade, does), the raw table too.
fn w1a(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w1_events;
    let rows = rows(n);
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let names: Vec<String> = (0..ctx.sizes.w1_streams)
        .map(|i| format!("user-{i}"))
        .collect();
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let mut pair = Pair::new(ctx, "w1a")?;
            pair.vacuum()?;
            let t = Instant::now();
            ours_singles(pair.store(), &events, &names)?;
            Ok(t.elapsed())
        },
        || {
            let mut pair = Pair::new(ctx, "w1a")?;
            pair.vacuum()?;
            let mut client = pair.raw_client(ctx)?;
            let t = Instant::now();
            raw_singles(&mut client, &pair.raw_table(), &rows, &names)?;
            Ok(t.elapsed())
        },
    )?;
    Ok(Outcome::throughput(n, &ours, &raw))
}

fn w2(ctx: &Ctx) -> Res<Outcome> {
    const BATCH: usize = 100;
    let n = ctx.sizes.w2_events / BATCH * BATCH;
    let rows = rows(n);
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let pair = Pair::new(ctx, "w2")?;
            let store = pair.store();
            let t = Instant::now();
            for (k, chunk) in events.chunks(BATCH).enumerate() {
                store.append(&format!("user-{k}"), ExpectedVersion::NoStream, chunk)?;
            }
            Ok(t.elapsed())
        },
        || {
            let pair = Pair::new(ctx, "w2")?;
            let mut client = pair.raw_client(ctx)?;
            let insert = client.prepare(&format!(
                "INSERT INTO {} (event_id, stream_id, version, event_type, data, metadata)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[],
                                      $5::jsonb[], $6::jsonb[])",
                pair.raw_table()
            ))?;
            let t = Instant::now();
            for (k, chunk) in rows.chunks(BATCH).enumerate() {
                let stream = format!("user-{k}");
                let ids: Vec<Uuid> = chunk.iter().map(|r| r.id).collect();
                let streams: Vec<&str> = vec![&stream; chunk.len()];
                let versions: Vec<i64> = (0..chunk.len() as i64).collect();
                let types: Vec<&str> = vec![EVENT_TYPE; chunk.len()];
                let data: Vec<Jsonb<'_>> = chunk.iter().map(|r| Jsonb(&r.data)).collect();
                let meta: Vec<Jsonb<'_>> = chunk.iter().map(|r| Jsonb(&r.metadata)).collect();
                client.execute(&insert, &[&ids, &streams, &versions, &types, &data, &meta])?;
            }
            Ok(t.elapsed())
        },
    )?;
    Ok(Outcome::throughput(n, &ours, &raw))
}

fn w3(ctx: &Ctx) -> Res<Outcome> {
    const THREADS: usize = 4;
    let per = ctx.sizes.w3_events / THREADS;
    let n = per * THREADS;
    let streams_per = (per / 20).max(1);
    let rows = rows(n);
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let names: Vec<Vec<String>> = (0..THREADS)
        .map(|t| (0..streams_per).map(|i| format!("user-{t}-{i}")).collect())
        .collect();
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let pair = Pair::new(ctx, "w3")?;
            // Open all four pooled connections before the clock starts.
            let conns: Vec<_> = (0..THREADS)
                .map(|_| pair.store().pool().get())
                .collect::<Result<_, _>>()?;
            drop(conns);
            let barrier = Barrier::new(THREADS + 1);
            thread::scope(|scope| -> Res<Duration> {
                let handles: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let (store, barrier, names) = (pair.store(), &barrier, &names[t]);
                        let events = &events[t * per..(t + 1) * per];
                        scope.spawn(move || -> Res<()> {
                            barrier.wait();
                            ours_singles(store, events, names)
                        })
                    })
                    .collect();
                barrier.wait();
                let t = Instant::now();
                for h in handles {
                    h.join().expect("thread")?;
                }
                Ok(t.elapsed())
            })
        },
        || {
            let pair = Pair::new(ctx, "w3")?;
            let table = pair.raw_table();
            let clients: Vec<Client> = (0..THREADS)
                .map(|_| pair.raw_client(ctx))
                .collect::<Res<_>>()?;
            let barrier = Barrier::new(THREADS + 1);
            thread::scope(|scope| -> Res<Duration> {
                let handles: Vec<_> = clients
                    .into_iter()
                    .enumerate()
                    .map(|(t, mut client)| {
                        let (table, barrier, names) = (&table, &barrier, &names[t]);
                        let rows = &rows[t * per..(t + 1) * per];
                        scope.spawn(move || -> Res<()> {
                            barrier.wait();
                            raw_singles(&mut client, table, rows, names)
                        })
                    })
                    .collect();
                barrier.wait();
                let t = Instant::now();
                for h in handles {
                    h.join().expect("thread")?;
                }
                Ok(t.elapsed())
            })
        },
    )?;
    let mut o = Outcome::throughput(n, &ours, &raw);
    o.extra.push(("threads", json!(THREADS)));
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Reads.

/// Loads `big` events into the stream "big" and the rest into streams of 100 (ours by
/// import; raw by COPY unless `raw` is false; not timed), then vacuums.
fn read_fixture(ctx: &Ctx, tag: &str, total: usize, big: usize, raw: bool) -> Res<Pair> {
    let mut pair = Pair::new(ctx, tag)?;
    let rows = rows(total);
    let streams: Vec<(String, i64)> = (0..total)
        .map(|i| {
            if i < big {
                ("big".to_string(), i as i64)
            } else {
                (
                    format!("user-{}", (i - big) / 100),
                    ((i - big) % 100) as i64,
                )
            }
        })
        .collect();
    for chunk in (0..total).collect::<Vec<_>>().chunks(500_000) {
        let input: Vec<(&str, EventData)> = chunk
            .iter()
            .map(|&i| (streams[i].0.as_str(), rows[i].event()))
            .collect();
        pair.store()
            .import(&input, ImportOptions::new().continue_existing_streams(true))?;
    }
    if raw {
        let mut client = pair.raw_client(ctx)?;
        raw_copy(&mut client, &pair.raw_table(), &rows, |i| {
            (streams[i].0.as_str(), streams[i].1)
        })?;
    }
    pair.vacuum()?;
    Ok(pair)
}

fn raw_copy<'a>(
    client: &mut Client,
    table: &str,
    rows: &[Row],
    stream: impl Fn(usize) -> (&'a str, i64),
) -> Res<u64> {
    let mut tx = client.transaction()?;
    let mut writer = raw_copy_in(&mut tx, table)?;
    for (i, r) in rows.iter().enumerate() {
        let (s, v) = stream(i);
        raw_copy_row(&mut writer, &r.id, s, v, &r.data, &r.metadata)?;
    }
    let n = writer.finish()?;
    tx.commit()?;
    Ok(n)
}

/// A binary `COPY` into the raw table, row by row with [`raw_copy_row`].
fn raw_copy_in<'a>(
    tx: &'a mut pg_eventstore::postgres::Transaction<'_>,
    table: &str,
) -> Res<BinaryCopyInWriter<'a>> {
    let sink = tx.copy_in(&format!(
        "COPY {table} (event_id, stream_id, version, event_type, data, metadata) \
         FROM STDIN (FORMAT binary)"
    ))?;
    let types = [
        Type::UUID,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::JSONB,
        Type::JSONB,
    ];
    Ok(BinaryCopyInWriter::new(sink, &types))
}

fn raw_copy_row(
    writer: &mut BinaryCopyInWriter<'_>,
    id: &Uuid,
    stream: &str,
    version: i64,
    data: &[u8],
    metadata: &[u8],
) -> Res<()> {
    writer.write(&[
        id,
        &stream,
        &version,
        &EVENT_TYPE,
        &Jsonb(data),
        &Jsonb(metadata),
    ])?;
    Ok(())
}

fn decode_raw(row: &pg_eventstore::postgres::Row) -> Res<Decoded> {
    Ok(Decoded {
        id: row.try_get(0)?,
        event_id: row.try_get(1)?,
        stream_id: row.try_get(2)?,
        version: row.try_get(3)?,
        event_type: row.try_get(4)?,
        data: row.try_get(5)?,
        metadata: row.try_get(6)?,
        recorded_at: row.try_get(7)?,
    })
}

/// Reads every row of `sql` the lean way: one query, rows streamed as they arrive.
fn raw_read(client: &mut Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Res<usize> {
    use pg_eventstore::postgres::fallible_iterator::FallibleIterator;
    let statement = client.prepare(sql)?;
    let mut it = client.query_raw(&statement, params.iter().copied())?;
    let mut n = 0;
    let mut check = 0i64;
    while let Some(row) = it.next()? {
        let d = decode_raw(&row)?;
        check = check.wrapping_add(d.version);
        n += 1;
    }
    std::hint::black_box(check);
    Ok(n)
}

fn w4(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w4_stream;
    let total = ctx.sizes.w5_all.max(n);
    let pair = read_fixture(ctx, "w4", total, n, true)?;
    let mut client = pair.raw_client(ctx)?;
    let sql = format!(
        "SELECT {RAW_COLUMNS} FROM {} WHERE stream_id = $1 ORDER BY version",
        pair.raw_table()
    );
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let t = Instant::now();
            let mut count = 0;
            for e in pair.store().read_stream("big", ReadStream::forwards())? {
                std::hint::black_box(e?);
                count += 1;
            }
            check_count("ours", count, n)?;
            Ok(t.elapsed())
        },
        || {
            let t = Instant::now();
            let count = raw_read(&mut client, &sql, &[&"big"])?;
            check_count("raw", count, n)?;
            Ok(t.elapsed())
        },
    )?;
    Ok(Outcome::throughput(n, &ours, &raw))
}

fn check_count(side: &str, got: usize, want: usize) -> Res<()> {
    if got != want {
        return Err(format!("{side} read {got} events, expected {want}").into());
    }
    Ok(())
}

fn w5(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w5_all;
    let pair = read_fixture(ctx, "w5", n, ctx.sizes.w4_stream.min(n), true)?;
    let mut client = pair.raw_client(ctx)?;
    let sql = format!("SELECT {RAW_COLUMNS} FROM {} ORDER BY id", pair.raw_table());
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            let t = Instant::now();
            let mut count = 0;
            for e in pair.store().read_all(ReadAll::from_start())? {
                std::hint::black_box(e?);
                count += 1;
            }
            check_count("ours", count, n)?;
            Ok(t.elapsed())
        },
        || {
            let t = Instant::now();
            let count = raw_read(&mut client, &sql, &[])?;
            check_count("raw", count, n)?;
            Ok(t.elapsed())
        },
    )?;
    Ok(Outcome::throughput(n, &ours, &raw))
}

// ---------------------------------------------------------------------------------------
// Live delivery.

/// Latencies of one W6 run, in ms.
struct Latency {
    commit_p50: f64,
    commit_p99: f64,
    start_p50: f64,
    start_p99: f64,
    missing: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// `sent[i] = (append start, append returned)`, `got[i]` = delivery. A delivery seen
/// before the append call returned counts as 0 ms after the commit.
fn latency(sent: &[(Instant, Instant)], got: &HashMap<usize, Instant>) -> Latency {
    let (mut commit, mut start) = (Vec::new(), Vec::new());
    let mut missing = 0;
    for (i, (s, c)) in sent.iter().enumerate() {
        match got.get(&i) {
            Some(g) => {
                commit.push(g.saturating_duration_since(*c).as_secs_f64() * 1e3);
                start.push(g.saturating_duration_since(*s).as_secs_f64() * 1e3);
            }
            None => missing += 1,
        }
    }
    Latency {
        commit_p50: percentile(&mut commit, 0.50),
        commit_p99: percentile(&mut commit, 0.99),
        start_p50: percentile(&mut start, 0.50),
        start_p99: percentile(&mut start, 0.99),
        missing,
    }
}

const W6_INTERVAL: Duration = Duration::from_millis(2);
const W6_STREAMS: usize = 10;
const W6_GRACE: Duration = Duration::from_secs(5);

/// Appends one event every 2 ms with `append(i)`, returning (start, returned) instants.
fn paced(n: usize, mut append: impl FnMut(usize) -> Res<()>) -> Res<Vec<(Instant, Instant)>> {
    let mut sent = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let due = t0 + W6_INTERVAL * i as u32;
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let s = Instant::now();
        append(i)?;
        sent.push((s, Instant::now()));
    }
    Ok(sent)
}

/// A transaction in another database of the cluster that holds an id until dropped.
struct Blocker(Client);

impl Blocker {
    fn open(ctx: &Ctx) -> Res<Blocker> {
        let mut admin = ctx.config.pg_config().connect(NoTls)?;
        let db: String = admin
            .query_one(
                "SELECT datname FROM pg_database
                  WHERE datname <> current_database() AND datallowconn AND NOT datistemplate
                  ORDER BY datname LIMIT 1",
                &[],
            )
            .map_err(|e| format!("W6X needs a second database in the cluster: {e}"))?
            .get(0);
        let mut pg = ctx.config.pg_config().clone();
        pg.dbname(&db);
        let mut client = pg.connect(NoTls)?;
        client.batch_execute("BEGIN; SELECT pg_current_xact_id();")?;
        Ok(Blocker(client))
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        let _ = self.0.batch_execute("ROLLBACK");
    }
}

fn w6_ours(ctx: &Ctx, rows: &[Row]) -> Res<Latency> {
    w6_with(ctx, rows, false, false)
}

/// W6 through the store: appends through the pool, or (`in_tx`) `append_in` each in a
/// transaction of its own, committed at once; the subscriber in the same store, or
/// (`elsewhere`) in a second store, as another process would be (woken by `NOTIFY`).
fn w6_with(ctx: &Ctx, rows: &[Row], in_tx: bool, elsewhere: bool) -> Res<Latency> {
    let n = rows.len();
    let pair = Pair::new(ctx, "w6")?;
    let store = pair.store().clone();
    let events: Vec<EventData> = rows.iter().map(Row::event).collect();
    let reader = match elsewhere {
        true => Store::connect(ctx.config.clone().schema(&pair.ours))?,
        false => store.clone(),
    };
    let sub = reader.subscribe(SubscribeOptions::all().live())?;
    let mut conn = store.pool().get()?;
    let got: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let stopper = sub.stopper();
    let receiver = {
        let got = got.clone();
        thread::spawn(move || -> Res<()> {
            for e in sub {
                let e = e?;
                let at = Instant::now();
                let seq = e.data_as::<Seq>()?.seq;
                got.lock().unwrap().insert(seq, at);
            }
            Ok(())
        })
    };
    // Let the subscription's listener connect before the first append (and, for a
    // subscriber elsewhere, the notifier see it listen).
    thread::sleep(Duration::from_millis(if elsewhere { 1500 } else { 200 }));
    let sent = paced(n, |i| {
        let stream = format!("user-{}", i % W6_STREAMS);
        let event = std::slice::from_ref(&events[i]);
        if in_tx {
            let mut tx = conn.transaction()?;
            store.append_in(&mut tx, &stream, ExpectedVersion::Any, event)?;
            tx.commit()?;
        } else {
            store.append(&stream, ExpectedVersion::Any, event)?;
        }
        Ok(())
    })?;
    let deadline = Instant::now() + W6_GRACE;
    while got.lock().unwrap().len() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    stopper.stop();
    receiver.join().expect("receiver")?;
    let got = got.lock().unwrap();
    Ok(latency(&sent, &got))
}

fn w6_raw(ctx: &Ctx, rows: &[Row]) -> Res<Latency> {
    let n = rows.len();
    let pair = Pair::new(ctx, "w6")?;
    let channel = format!("{}_w6_raw", ctx.run);
    let mut listener = pair.raw_client(ctx)?;
    listener.batch_execute(&format!("LISTEN {}", quote(&channel)))?;
    let got: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let (got, stop) = (got.clone(), stop.clone());
        thread::spawn(move || -> Res<()> {
            use pg_eventstore::postgres::fallible_iterator::FallibleIterator;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A timed-out iterator stays finished: take a fresh one every round.
                let mut notifications = listener.notifications();
                let mut it = notifications.timeout_iter(Duration::from_millis(50));
                while let Some(n) = it.next()? {
                    let at = Instant::now();
                    got.lock().unwrap().insert(n.payload().parse()?, at);
                }
            }
            Ok(())
        })
    };
    let mut client = pair.raw_client(ctx)?;
    let insert = client.prepare(&format!(
        "WITH ins AS (
             INSERT INTO {} (event_id, stream_id, version, event_type, data, metadata)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING 1)
         SELECT pg_notify($7, $8) FROM ins",
        pair.raw_table()
    ))?;
    let mut versions = [0i64; W6_STREAMS];
    let sent = paced(n, |i| {
        let s = i % W6_STREAMS;
        let r = &rows[i];
        client.query(
            &insert,
            &[
                &r.id,
                &format!("user-{s}"),
                &versions[s],
                &EVENT_TYPE,
                &Jsonb(&r.data),
                &Jsonb(&r.metadata),
                &channel,
                &i.to_string(),
            ],
        )?;
        versions[s] += 1;
        Ok(())
    })?;
    let deadline = Instant::now() + W6_GRACE;
    while got.lock().unwrap().len() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    receiver.join().expect("receiver")?;
    let got = got.lock().unwrap();
    Ok(latency(&sent, &got))
}

/// W6 (ours) with and without a transaction in another database that holds an id from
/// before the first append to after the last delivery.
fn w6x(ctx: &Ctx) -> Res<Outcome> {
    let rows = rows(ctx.sizes.w6_events);
    let (mut blocked, mut plain) = (Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        let with_blocker = |out: &mut Vec<Latency>| -> Res<()> {
            let _blocker = Blocker::open(ctx)?;
            out.push(w6_ours(ctx, &rows)?);
            Ok(())
        };
        if rep % 2 == 0 {
            with_blocker(&mut blocked)?;
            plain.push(w6_ours(ctx, &rows)?);
        } else {
            plain.push(w6_ours(ctx, &rows)?);
            with_blocker(&mut blocked)?;
        }
    }
    // The ratio is taken from the append's start, as W6's is: an event handed to the
    // subscriber before `append` returned counts 0 ms after the commit, and two such
    // medians can both be 0.
    let m = median_of;
    let blocked_p50 = m(&blocked, |l| l.start_p50);
    let plain_p50 = m(&plain, |l| l.start_p50);
    Ok(Outcome {
        ours: blocked_p50,
        raw: plain_p50,
        ratio: plain_p50 / blocked_p50,
        unit: "ms p50 append start→delivery, blocked vs plain",
        extra: vec![
            ("events", json!(rows.len())),
            (
                "blocked_commit_p50_ms",
                json!(round3(m(&blocked, |l| l.commit_p50))),
            ),
            (
                "plain_commit_p50_ms",
                json!(round3(m(&plain, |l| l.commit_p50))),
            ),
            (
                "blocked_commit_p99_ms",
                json!(round3(m(&blocked, |l| l.commit_p99))),
            ),
            (
                "plain_commit_p99_ms",
                json!(round3(m(&plain, |l| l.commit_p99))),
            ),
            (
                "blocked_not_delivered",
                json!(blocked.iter().map(|l| l.missing).max()),
            ),
        ],
    })
}

fn w6t(ctx: &Ctx) -> Res<Outcome> {
    let rows = rows(ctx.sizes.w6_events);
    let (mut same, mut other, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ctx.reps {
        same.push(w6_with(ctx, &rows, true, false)?);
        other.push(w6_with(ctx, &rows, true, true)?);
        plain.push(w6_with(ctx, &rows, false, false)?);
    }
    // The ratio is taken from the start (of the transaction, or of the pool append), as
    // W6's is: an event can reach the subscriber before the call that committed it
    // returns, which counts 0 ms after the commit, and two such medians can both be 0.
    let m = median_of;
    let same_p50 = m(&same, |l| l.start_p50);
    let plain_p50 = m(&plain, |l| l.start_p50);
    let missing = same.iter().chain(&other).map(|l| l.missing).max();
    Ok(Outcome {
        ours: same_p50,
        raw: plain_p50,
        ratio: plain_p50 / same_p50,
        unit: "ms p50 start→delivery, append_in transaction vs pool append",
        extra: vec![
            ("events", json!(rows.len())),
            (
                "in_tx_commit_p50_ms",
                json!(round3(m(&same, |l| l.commit_p50))),
            ),
            (
                "in_tx_commit_p99_ms",
                json!(round3(m(&same, |l| l.commit_p99))),
            ),
            (
                "pool_commit_p50_ms",
                json!(round3(m(&plain, |l| l.commit_p50))),
            ),
            (
                "other_store_commit_p50_ms",
                json!(round3(m(&other, |l| l.commit_p50))),
            ),
            (
                "other_store_commit_p99_ms",
                json!(round3(m(&other, |l| l.commit_p99))),
            ),
            (
                "pool_commit_p99_ms",
                json!(round3(m(&plain, |l| l.commit_p99))),
            ),
            ("not_delivered", json!(missing)),
        ],
    })
}

fn w6(ctx: &Ctx) -> Res<Outcome> {
    let rows = rows(ctx.sizes.w6_events);
    let (mut ours, mut raw, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        if rep % 2 == 0 {
            ours.push(w6_ours(ctx, &rows)?);
            raw.push(w6_raw(ctx, &rows)?);
        } else {
            raw.push(w6_raw(ctx, &rows)?);
            ours.push(w6_ours(ctx, &rows)?);
        }
        other.push(w6_with(ctx, &rows, false, true)?);
    }
    let m = median_of;
    let ours_p50 = m(&ours, |l| l.start_p50);
    let raw_p50 = m(&raw, |l| l.start_p50);
    Ok(Outcome {
        ours: ours_p50,
        raw: raw_p50,
        ratio: raw_p50 / ours_p50,
        unit: "ms p50 append start→delivery",
        extra: vec![
            ("events", json!(rows.len())),
            (
                "ours_commit_p50_ms",
                json!(round3(m(&ours, |l| l.commit_p50))),
            ),
            (
                "raw_commit_p50_ms",
                json!(round3(m(&raw, |l| l.commit_p50))),
            ),
            (
                "ours_commit_p99_ms",
                json!(round3(m(&ours, |l| l.commit_p99))),
            ),
            (
                "raw_commit_p99_ms",
                json!(round3(m(&raw, |l| l.commit_p99))),
            ),
            (
                "ours_start_p99_ms",
                json!(round3(m(&ours, |l| l.start_p99))),
            ),
            ("raw_start_p99_ms", json!(round3(m(&raw, |l| l.start_p99)))),
            (
                "ours_not_delivered",
                json!(ours.iter().map(|l| l.missing).max()),
            ),
            (
                "other_store_commit_p50_ms",
                json!(round3(m(&other, |l| l.commit_p50))),
            ),
            (
                "other_store_commit_p99_ms",
                json!(round3(m(&other, |l| l.commit_p99))),
            ),
            (
                "other_store_not_delivered",
                json!(other.iter().map(|l| l.missing).max()),
            ),
            (
                "raw_not_delivered",
                json!(raw.iter().map(|l| l.missing).max()),
            ),
        ],
    })
}

// ---------------------------------------------------------------------------------------
// Bulk import.

/// W7: ours streams `n` generated events through `Store::import_iter` (chunked when `n`
/// is above one transaction's limit), raw streams the same rows through one binary
/// `COPY` in one transaction. Each side runs in a child process (`--w7-child`) that
/// generates its rows as it goes, so neither holds the input, and reports its time and
/// its peak RSS (`VmHWM`).
fn w7(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w7_events;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let (mut ours_rss, mut raw_rss) = (Vec::new(), Vec::new());
    let (o, r) = alternate(
        ctx.reps,
        || {
            let pair = Pair::new(ctx, "w7")?;
            let (elapsed, rss) = w7_run("ours", &pair.ours, n)?;
            ours_rss.push(rss);
            Ok(elapsed)
        },
        || {
            let pair = Pair::new(ctx, "w7")?;
            let (elapsed, rss) = w7_run("raw", &pair.raw_table(), n)?;
            raw_rss.push(rss);
            Ok(elapsed)
        },
    )?;
    ours.extend(o);
    raw.extend(r);
    let mut outcome = Outcome::throughput(n, &ours, &raw);
    outcome
        .extra
        .push(("ours_peak_rss_mib", json!(round(median_f(&ours_rss)))));
    outcome
        .extra
        .push(("raw_peak_rss_mib", json!(round(median_f(&raw_rss)))));
    Ok(outcome)
}

const W7_PER_STREAM: usize = 100;

/// The `i`th W7 event: ~210 bytes of data and a small metadata object, as `Row::new`
/// makes them, but cheap enough to make while importing.
fn w7_row(i: usize) -> (Uuid, String, String, String) {
    let id = Uuid::now_v7();
    let mut data = format!(
        r#"{{"type":"{EVENT_TYPE}","seq":{i},"userId":"user-{i}","email":"user-{i}@example.com","padding":""#
    );
    let padding = DATA_BYTES.saturating_sub(data.len() + 2);
    data.extend(std::iter::repeat_n('x', padding));
    data.push_str("\"}");
    let metadata = format!(r#"{{"correlationId":"{id}","source":"loadgen"}}"#);
    (id, format!("user-{}", i / W7_PER_STREAM), data, metadata)
}

/// `--w7-child ours|raw <schema or table> <count>`: imports `count` generated events and
/// prints the seconds it took and its peak RSS.
fn w7_child(args: &[String]) -> Res<()> {
    let side = args.first().ok_or("side missing")?;
    let target = args.get(1).ok_or("schema or table missing")?;
    let n: usize = args.get(2).ok_or("count missing")?.parse()?;
    let elapsed = if side == "ours" {
        let store = Store::connect(Config::from_env()?.schema(target).max_connections(2))?;
        let events = (0..n).map(|i| {
            let (id, stream, data, metadata) = w7_row(i);
            let data = RawValue::from_string(data)?;
            let metadata = RawValue::from_string(metadata)?;
            let event = EventData::new(EVENT_TYPE, &data)?
                .metadata(&metadata)?
                .id(id);
            Ok(ImportEvent::new(stream, event))
        });
        let options = ImportOptions::new().chunked(n as u64 > MAX_EVENTS_PER_TRANSACTION);
        let t = Instant::now();
        let summary = store.import_iter(events, options)?;
        let elapsed = t.elapsed();
        check_count("ours", summary.events as usize, n)?;
        elapsed
    } else {
        let mut client = Config::from_env()?.pg_config().connect(NoTls)?;
        let t = Instant::now();
        let mut tx = client.transaction()?;
        let mut writer = raw_copy_in(&mut tx, target)?;
        for i in 0..n {
            let (id, stream, data, metadata) = w7_row(i);
            let version = (i % W7_PER_STREAM) as i64;
            raw_copy_row(
                &mut writer,
                &id,
                &stream,
                version,
                data.as_bytes(),
                metadata.as_bytes(),
            )?;
        }
        let written = writer.finish()?;
        tx.commit()?;
        let elapsed = t.elapsed();
        check_count("raw", written as usize, n)?;
        elapsed
    };
    println!("elapsed_s {}", elapsed.as_secs_f64());
    println!("VmHWM_KiB {}", vm_hwm_kib()?);
    Ok(())
}

/// Runs one W7 side in a child process: (its time, its peak RSS in MiB).
fn w7_run(side: &str, target: &str, n: usize) -> Res<(Duration, f64)> {
    let out = child(&["--w7-child", side, target, &n.to_string()])?;
    let field = |name: &str| -> Res<f64> {
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("the W7 child printed no {name}"))?
            .trim()
            .parse()?)
    };
    Ok((
        Duration::from_secs_f64(field("elapsed_s ")?),
        field("VmHWM_KiB ")? / 1024.0,
    ))
}

/// W8: W1 on tables that hold `w8_stored` events already (loaded by the W7 children,
/// then vacuumed and analysed), so that the indexes an append walks are deep and mostly
/// out of the CPU caches. The tables are loaded once; each repetition appends fresh
/// events to new streams.
fn w8(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.w1_events;
    let stored = ctx.sizes.w8_stored;
    let mut pair = Pair::new(ctx, "w8")?;
    let t = Instant::now();
    w7_run("ours", &pair.ours, stored)?;
    w7_run("raw", &pair.raw_table(), stored)?;
    pair.vacuum()?;
    // Loading wrote gigabytes of WAL: without a checkpoint now, one may start during
    // either side's timed appends.
    if let Err(e) = pair.admin.batch_execute("CHECKPOINT") {
        eprintln!("loadgen: W8 could not run CHECKPOINT ({e}); its timings may include one");
    }
    eprintln!(
        "loadgen: W8 loaded {stored} events on each side in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let names = |side: &str, rep: usize| -> Vec<String> {
        (0..ctx.sizes.w1_streams)
            .map(|i| format!("w8-{side}-{rep}-{i}"))
            .collect()
    };
    let (mut ours_rep, mut raw_rep) = (0, 0);
    let (ours, raw) = alternate(
        ctx.reps,
        || {
            ours_rep += 1;
            let events: Vec<EventData> = rows(n).iter().map(Row::event).collect();
            let names = names("ours", ours_rep);
            let t = Instant::now();
            ours_singles(pair.store(), &events, &names)?;
            Ok(t.elapsed())
        },
        || {
            raw_rep += 1;
            let rows = rows(n);
            let names = names("raw", raw_rep);
            let mut client = pair.raw_client(ctx)?;
            let t = Instant::now();
            raw_singles(&mut client, &pair.raw_table(), &rows, &names)?;
            Ok(t.elapsed())
        },
    )?;
    let mut outcome = Outcome::throughput(n, &ours, &raw);
    outcome.extra.push(("stored", json!(stored)));
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Memory.

fn vm_hwm_kib() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("bad VmHWM line")?
        .parse()?)
}

/// `--m1-child <schema> <count> [read page size]`: reads `count` events of `$all` and
/// prints its peak RSS.
fn m1_child(args: &[String]) -> Res<()> {
    let schema = args.first().ok_or("schema missing")?;
    let count: u64 = args.get(1).ok_or("count missing")?.parse()?;
    let mut config = Config::from_env()?
        .schema(schema)
        .max_connections(1)
        .min_idle(0);
    if let Some(page) = args.get(2) {
        config = config.read_page_size(page.parse()?);
    }
    let store = Store::connect(config)?;
    let mut n = 0u64;
    for e in store.read_all(ReadAll::from_start().max_count(count))? {
        std::hint::black_box(e?);
        n += 1;
    }
    if n != count {
        return Err(format!("read {n} events, expected {count}").into());
    }
    println!("VmHWM_KiB {}", vm_hwm_kib()?);
    Ok(())
}

/// Runs this program with `args` and returns what it printed.
fn child(args: &[&str]) -> Res<String> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "the child {args:?} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(stdout)
}

fn m1_run(ctx: &Ctx, schema: &str, count: usize) -> Res<f64> {
    let count = count.to_string();
    let page = ctx.read_page_size.map(|n| n.to_string());
    let mut args = vec!["--m1-child", schema, &count];
    args.extend(page.as_deref());
    let stdout = child(&args)?;
    let kib: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM_KiB "))
        .ok_or("the M1 child printed no VmHWM")?
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

fn m1(ctx: &Ctx) -> Res<Outcome> {
    let (large, small) = (ctx.sizes.m1_large, ctx.sizes.m1_small);
    let pair = read_fixture(ctx, "m1", large, 0, false)?;
    let (mut big, mut little) = (Vec::new(), Vec::new());
    for _ in 0..ctx.reps {
        big.push(m1_run(ctx, &pair.ours, large)?);
        little.push(m1_run(ctx, &pair.ours, small)?);
    }
    let (b, l) = (median_f(&big), median_f(&little));
    Ok(Outcome {
        ours: b,
        raw: l,
        ratio: b - l,
        unit: "MiB VmHWM (ours: large read, raw: small read, ratio: difference)",
        extra: vec![("large", json!(large)), ("small", json!(small))],
    })
}

// ---------------------------------------------------------------------------------------
// Workers.

/// P1: the worker in batch mode over `p1_events` events in streams of 100, with 1 and 4
/// threads and a trivial handler, next to `read_all` of the same events. "ours" is 4
/// threads, "raw" is `read_all` (no raw PostgreSQL side: what the worker adds to a read).
fn p1(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.p1_events;
    let pair = read_fixture(ctx, "p1", n, 0, false)?;
    // Workers need threads + 3 connections.
    let store = Store::connect(ctx.config.clone().max_connections(8).schema(&pair.ours))?;
    let mut runs: HashMap<&str, Vec<f64>> = HashMap::new();
    for rep in 0..ctx.reps {
        let t = Instant::now();
        let read = store.read_all(ReadAll::from_start())?.count();
        check_count("read_all", read, n)?;
        runs.entry("read_all")
            .or_default()
            .push(n as f64 / t.elapsed().as_secs_f64());
        for threads in [1usize, 4] {
            let t = Instant::now();
            let s = store
                .worker(&format!("trivial-{threads}-{rep}"))
                .threads(threads)
                .run_batch(|_| Ok(()))?;
            check_count("worker", s.handled as usize, n)?;
            let key = if threads == 1 {
                "t1_trivial"
            } else {
                "t4_trivial"
            };
            runs.entry(key)
                .or_default()
                .push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    drop(store);
    Ok(median_outcome(&runs, "t4_trivial", "read_all", n))
}

/// Events per second: the median of each run kind, with `ours` ÷ `raw` as the ratio and
/// every kind as an extra field.
fn median_outcome(
    runs: &HashMap<&'static str, Vec<f64>>,
    ours: &str,
    raw: &str,
    n: usize,
) -> Outcome {
    let m = |k: &str| round(median_f(&runs[k]));
    let pairs: Vec<f64> = runs[ours]
        .iter()
        .zip(&runs[raw])
        .map(|(o, r)| round3(o / r))
        .collect();
    let mut extra = vec![("events", json!(n)), ("pair_ratios", json!(pairs))];
    let mut kinds: Vec<&&str> = runs.keys().collect();
    kinds.sort();
    for k in kinds {
        extra.push((*k, json!(m(k))));
    }
    Outcome {
        ours: m(ours),
        raw: m(raw),
        ratio: m(ours) / m(raw),
        unit: "events/s",
        extra,
    }
}

/// The whole machine's busy CPU time (user, nice, system, irq, softirq; not idle, iowait
/// or steal) and its context switches so far, from `/proc/stat`; `None` where there is
/// no such file. On a machine that runs little else, the difference over a run is the
/// run's CPU (ours or raw, the client and the server together), a steadier measure than
/// its throughput on a machine whose speed moves from minute to minute.
fn machine_cpu() -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let ticks: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...; USER_HZ is 100 on Linux.
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    let switches = lines
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|n| n.trim().parse().ok())?;
    Some((Duration::from_millis(busy * 10), switches))
}

/// Runs `f` and records, under `name`, the machine's CPU µs and context switches per
/// event over it (see [`machine_cpu`]).
fn with_machine_cpu<T>(
    runs: &mut HashMap<&'static str, Vec<f64>>,
    names: (&'static str, &'static str),
    events: usize,
    f: impl FnOnce() -> Res<T>,
) -> Res<T> {
    let before = machine_cpu();
    let out = f()?;
    if let Some((cpu, switches)) = per_event_since(before, events) {
        runs.entry(names.0).or_default().push(cpu);
        runs.entry(names.1).or_default().push(switches);
    }
    Ok(out)
}

/// The machine's CPU µs and context switches per event since `before` (a
/// [`machine_cpu`] reading), over `events` events; `None` without `/proc/stat`.
fn per_event_since(before: Option<(Duration, u64)>, events: usize) -> Option<(f64, f64)> {
    let ((cpu0, csw0), (cpu1, csw1)) = (before?, machine_cpu()?);
    let per = |x: f64| round3(x / events as f64);
    Some((
        per((cpu1 - cpu0).as_secs_f64() * 1e6),
        per((csw1 - csw0) as f64),
    ))
}

/// P2: a transactional worker in batch mode over `p1_events` events (streams of 100),
/// 4 threads, its handler upserting one read-model row per event in the worker's
/// transaction (grouped: `Worker::transaction_batch`, default 100 events); next to raw
/// PostgreSQL doing the same upserts from 4 connections (the events of a stream on one
/// connection, as the worker does) in transactions of 100. Also the worker with 1 thread,
/// and raw's upserts while one more raw connection reads every event of the log (the
/// worker reads them too; raw is handed the stream names): `raw_batched_read` and
/// `ratio_to_raw_with_read`, besides the issue's ratio to raw without the read.
fn p2(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.p1_events;
    let pair = read_fixture(ctx, "p2", n, 0, false)?;
    let store = Store::connect(ctx.config.clone().max_connections(8).schema(&pair.ours))?;
    let model = |schema: &str| format!("{}.model", quote(schema));
    let upsert = |table: &str| {
        format!(
            "INSERT INTO {table} AS m VALUES ($1, 1) \
             ON CONFLICT (stream_id) DO UPDATE SET n = m.n + 1"
        )
    };
    for schema in [&pair.ours, &pair.raw] {
        store.pool().get()?.batch_execute(&format!(
            "CREATE TABLE {} (stream_id text PRIMARY KEY, n bigint NOT NULL)",
            model(schema)
        ))?;
    }
    // The raw side's input: the stream of every event, in the log's order, split over
    // 4 connections by stream.
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); 4];
    for e in store.read_all(ReadAll::from_start())? {
        let stream = e?.stream_id;
        let k = stream.bytes().map(usize::from).sum::<usize>() % 4;
        parts[k].push(stream);
    }
    let parts = Arc::new(parts);
    // What a lean reader of the store's table sends (see `raw` below).
    let read_all_sql = format!(
        "SELECT global_position, event_id, stream_id, stream_version, event_type, data, \
         metadata, recorded_at FROM {}.events ORDER BY global_position",
        quote(&pair.ours)
    );
    let mut runs: HashMap<&str, Vec<f64>> = HashMap::new();
    for rep in 0..ctx.reps {
        let ours = |threads: usize| -> Res<f64> {
            let sql = upsert(&model(&pair.ours));
            let t = Instant::now();
            let s = store
                .worker(&format!("model-{threads}-{rep}"))
                .threads(threads)
                .run_batch_transactional(move |tx, e| {
                    let upsert = Worker::prepare_cached(tx, &sql)?;
                    tx.execute(&upsert, &[&e.stream_id])?;
                    Ok(())
                })?;
            check_count("worker", s.handled as usize, n)?;
            Ok(n as f64 / t.elapsed().as_secs_f64())
        };
        // `connections` raw clients, each with the streams of `parts` it is given (all
        // four parts on one connection, in turn, for 1). With `read`, one more raw
        // client reads every event of the log meanwhile, as the worker must (the lean
        // reader of W5, on the store's table).
        let raw = |connections: usize, read: bool| -> Res<f64> {
            let sql = upsert(&model(&pair.raw));
            let mut clients = Vec::new();
            for _ in 0..connections {
                clients.push(pair.raw_client(ctx)?);
            }
            let barrier = Arc::new(Barrier::new(connections + 1 + usize::from(read)));
            let reading = match read {
                true => {
                    let (mut client, barrier) = (pair.raw_client(ctx)?, barrier.clone());
                    let sql = read_all_sql.clone();
                    Some(thread::spawn(move || -> Result<usize, String> {
                        barrier.wait();
                        raw_read(&mut client, &sql, &[]).map_err(|e| e.to_string())
                    }))
                }
                false => None,
            };
            let handles: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(k, mut client)| {
                    let (sql, parts, barrier) = (sql.clone(), parts.clone(), barrier.clone());
                    thread::spawn(move || -> Result<(), String> {
                        let statement = client.prepare(&sql).map_err(|e| e.to_string())?;
                        barrier.wait();
                        let mine: Vec<&String> = if connections == 1 {
                            parts.iter().flatten().collect()
                        } else {
                            parts[k].iter().collect()
                        };
                        for chunk in mine.chunks(100) {
                            let mut tx = client.transaction().map_err(|e| e.to_string())?;
                            for stream in chunk {
                                tx.execute(&statement, &[stream])
                                    .map_err(|e| e.to_string())?;
                            }
                            tx.commit().map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                })
                .collect();
            barrier.wait();
            let t = Instant::now();
            for h in handles {
                h.join().expect("raw upsert thread")?;
            }
            if let Some(h) = reading {
                check_count("raw read", h.join().expect("raw reading thread")?, n)?;
            }
            Ok(n as f64 / t.elapsed().as_secs_f64())
        };
        let cpu = ("t4_cpu_us_per_event", "t4_switches_per_event");
        let raw_cpu = ("raw_cpu_us_per_event", "raw_switches_per_event");
        let read_cpu = ("raw_read_cpu_us_per_event", "raw_read_switches_per_event");
        let (o, r, rr);
        if rep % 2 == 0 {
            o = with_machine_cpu(&mut runs, cpu, n, || ours(4))?;
            r = with_machine_cpu(&mut runs, raw_cpu, n, || raw(4, false))?;
            rr = with_machine_cpu(&mut runs, read_cpu, n, || raw(4, true))?;
        } else {
            rr = with_machine_cpu(&mut runs, read_cpu, n, || raw(4, true))?;
            r = with_machine_cpu(&mut runs, raw_cpu, n, || raw(4, false))?;
            o = with_machine_cpu(&mut runs, cpu, n, || ours(4))?;
        }
        let (t1, r1) = (ours(1)?, raw(1, false)?);
        for (name, value) in [
            ("t4_model", o),
            ("raw_batched", r),
            ("raw_batched_read", rr),
            ("t1_model", t1),
            ("raw_batched_1", r1),
        ] {
            runs.entry(name).or_default().push(value);
        }
    }
    drop(store);
    let mut outcome = median_outcome(&runs, "t4_model", "raw_batched", n);
    let with_read = median_f(&runs["raw_batched_read"]);
    outcome.extra.push((
        "ratio_to_raw_with_read",
        json!(round3(median_f(&runs["t4_model"]) / with_read)),
    ));
    Ok(outcome)
}

/// P3: the worker in batch mode over `p1_events` events written stream by stream (streams
/// of 100), 4 threads, a handler that sleeps 100 µs per event: one bound by waiting (on a
/// mail server, an HTTP call), not by CPU, where how evenly the streams spread over the
/// threads decides the run's length. "raw" is 4 plain threads sleeping the same 100 µs
/// per event over an even quarter of the events each: the best 4 threads can do.
fn p3(ctx: &Ctx) -> Res<Outcome> {
    const WAIT: Duration = Duration::from_micros(100);
    let n = ctx.sizes.p1_events;
    let pair = read_fixture(ctx, "p3", n, 0, false)?;
    let store = Store::connect(ctx.config.clone().max_connections(8).schema(&pair.ours))?;
    let mut runs: HashMap<&str, Vec<f64>> = HashMap::new();
    for rep in 0..ctx.reps {
        let ours = || -> Res<f64> {
            let t = Instant::now();
            let s = store
                .worker(&format!("waits-{rep}"))
                .threads(4)
                .run_batch(|_| {
                    thread::sleep(WAIT);
                    Ok(())
                })?;
            check_count("worker", s.handled as usize, n)?;
            Ok(n as f64 / t.elapsed().as_secs_f64())
        };
        let ideal = || -> f64 {
            let t = Instant::now();
            let threads: Vec<_> = (0..4)
                .map(|k| {
                    thread::spawn(move || {
                        for _ in (k..n).step_by(4) {
                            thread::sleep(WAIT);
                        }
                    })
                })
                .collect();
            for h in threads {
                h.join().expect("a sleeping thread");
            }
            n as f64 / t.elapsed().as_secs_f64()
        };
        let (o, r) = if rep % 2 == 0 {
            let o = ours()?;
            (o, ideal())
        } else {
            let r = ideal();
            (ours()?, r)
        };
        runs.entry("t4_waits").or_default().push(o);
        runs.entry("even_shares").or_default().push(r);
    }
    drop(store);
    Ok(median_outcome(&runs, "t4_waits", "even_shares", n))
}

/// G1: a consumer group over `p1_events` events (streams of 100) with 1, 2 and 4
/// members in this process, each with its own store (pool, listener) as a process of its
/// own would have, 1 handler thread, and a transactional handler upserting one
/// read-model row per event. The members join a fresh schema and share its partitions
/// first; then the events are imported in one transaction, and the clock runs from the
/// import's commit until the handlers have taken every event. "ours" is 4 members, "raw"
/// 1 member; the read model is checked against the count after each run.
fn g1(ctx: &Ctx) -> Res<Outcome> {
    let n = ctx.sizes.p1_events;
    let rows = rows(n);
    let streams: Vec<String> = (0..n.div_ceil(100)).map(|k| format!("user-{k}")).collect();
    let input: Vec<(&str, EventData)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (streams[i / 100].as_str(), r.event()))
        .collect();
    let mut runs: HashMap<&str, Vec<f64>> = HashMap::new();
    for rep in 0..ctx.reps {
        let mut sizes = [1usize, 2, 4];
        if rep % 2 == 1 {
            sizes.reverse();
        }
        for members in sizes {
            let pair = Pair::new(ctx, &format!("g1_{members}"))?;
            let model = format!("{}.model", quote(&pair.ours));
            pair.store().pool().get()?.batch_execute(&format!(
                "CREATE TABLE {model} (stream_id text PRIMARY KEY, n bigint NOT NULL)"
            ))?;
            let upsert = format!(
                "INSERT INTO {model} AS m VALUES ($1, 1) \
                 ON CONFLICT (stream_id) DO UPDATE SET n = m.n + 1"
            );
            let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut handles = Vec::new();
            for _ in 0..members {
                let store =
                    Store::connect(ctx.config.clone().max_connections(4).schema(&pair.ours))?;
                let (sql, count) = (upsert.clone(), handled.clone());
                let handle = store
                    .worker("g1")
                    .threads(1)
                    .group(
                        GroupOptions::new()
                            .lease_timeout(Duration::from_secs(5))
                            .heartbeat_interval(Duration::from_millis(100)),
                    )
                    .spawn_transactional(move |tx, e| {
                        let upsert = Worker::prepare_cached(tx, &sql)?;
                        tx.execute(&upsert, &[&e.stream_id])?;
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Ok(())
                    })?;
                handles.push((handle, store));
            }
            let settled = Instant::now();
            while handles
                .iter()
                .any(|(h, _)| h.partitions().len() != 64 / members)
            {
                if settled.elapsed() > Duration::from_secs(30) {
                    return Err(format!("{members} members did not share the partitions").into());
                }
                thread::sleep(Duration::from_millis(10));
            }
            pair.store().import(&input, ImportOptions::new())?;
            let t = Instant::now();
            while handled.load(std::sync::atomic::Ordering::Relaxed) < n as u64 {
                if t.elapsed() > Duration::from_secs(600) {
                    return Err("the group did not handle every event".into());
                }
                thread::sleep(Duration::from_millis(1));
            }
            let elapsed = t.elapsed();
            for (h, _) in handles {
                h.stop()?;
            }
            let sum: i64 = pair
                .store()
                .pool()
                .get()?
                .query_one(
                    &format!("SELECT COALESCE(sum(n), 0)::bigint FROM {model}"),
                    &[],
                )?
                .get(0);
            check_count("group read model", sum as usize, n)?;
            let key = match members {
                1 => "members_1",
                2 => "members_2",
                _ => "members_4",
            };
            runs.entry(key)
                .or_default()
                .push(n as f64 / elapsed.as_secs_f64());
        }
    }
    let mut outcome = median_outcome(&runs, "members_4", "members_1", n);
    let m = |k: &str| median_f(&runs[k]);
    outcome.extra.push((
        "ratio_2_to_1",
        json!(round3(m("members_2") / m("members_1"))),
    ));
    Ok(outcome)
}
