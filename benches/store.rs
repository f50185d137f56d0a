//! Criterion benches of the store's basic operations against the PostgreSQL at
//! `DATABASE_URL`: `cargo bench --bench store`. Each bench group uses its own schema,
//! dropped at the end. Measurement times are short: the machine is small and shared.
//! For comparisons with plain PostgreSQL doing the same rows, see `examples/loadgen.rs`.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pg_eventstore::{
    Config, EventData, ExpectedVersion, ImportOptions, ReadAll, ReadStream, Store,
};
use serde_json::json;

/// A migrated store in a schema of its own, dropped on drop.
struct BenchStore {
    store: Option<Store>,
    schema: String,
}

impl BenchStore {
    fn new(name: &str) -> BenchStore {
        let schema = format!("bench_{name}_{}", std::process::id());
        let store = Store::connect(
            Config::from_env()
                .expect("DATABASE_URL")
                .schema(&schema)
                .max_connections(2)
                .min_idle(1),
        )
        .expect("connect");
        store.migrate().expect("migrate");
        BenchStore {
            store: Some(store),
            schema,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }
}

impl Drop for BenchStore {
    fn drop(&mut self) {
        let store = self.store.take().unwrap();
        let mut client = store.pool().get().expect("connection");
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        if let Err(e) = client.batch_execute(&sql) {
            eprintln!("could not drop {}: {e}", self.schema);
        }
    }
}

/// A ~210-byte event like the load generator's.
fn event(seq: usize) -> EventData {
    EventData::json(
        "UserRegistered",
        json!({
            "type": "UserRegistered",
            "seq": seq,
            "userId": format!("user-{seq}"),
            "email": format!("user-{seq}@example.com"),
            "padding": "x".repeat(100),
        }),
    )
    .metadata(&json!({ "correlationId": format!("c-{seq}"), "source": "bench" }))
    .expect("json")
}

fn short<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    g
}

fn appends(c: &mut Criterion) {
    let b = BenchStore::new("append");
    let store = b.store();
    let mut g = short(c, "append");
    let mut seq = 0;
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |bench| {
        bench.iter_batched(
            || {
                seq += 1;
                (format!("s-{}", seq % 100), event(seq))
            },
            |(stream, e)| store.append(&stream, ExpectedVersion::Any, &[e]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(100));
    let mut stream = 0;
    g.bench_function("100_events_new_stream", |bench| {
        bench.iter_batched(
            || {
                stream += 1;
                let events: Vec<EventData> = (0..100).map(event).collect();
                (format!("batch-{stream}"), events)
            },
            |(s, events)| {
                store
                    .append(&s, ExpectedVersion::NoStream, &events)
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn reads(c: &mut Criterion) {
    const STREAM: usize = 1_000;
    const ALL: usize = 10_000;
    let b = BenchStore::new("read");
    let store = b.store();
    let input: Vec<(String, EventData)> = (0..ALL)
        .map(|i| {
            let s = if i < STREAM {
                "one".to_string()
            } else {
                format!("s-{}", i / 100)
            };
            (s, event(i))
        })
        .collect();
    let summary = store.import(&input, ImportOptions::new()).expect("import");
    while store.head_position().unwrap().unwrap_or(0) < summary.last_position {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut g = short(c, "read");
    g.throughput(Throughput::Elements(STREAM as u64));
    g.bench_function("stream_1000", |bench| {
        bench.iter(|| {
            let mut n = 0;
            for e in store.read_stream("one", ReadStream::forwards()).unwrap() {
                std::hint::black_box(e.unwrap());
                n += 1;
            }
            assert_eq!(n, STREAM);
        })
    });
    g.throughput(Throughput::Elements(ALL as u64));
    g.bench_function("all_10000", |bench| {
        bench.iter(|| {
            let mut n = 0;
            for e in store.read_all(ReadAll::from_start()).unwrap() {
                std::hint::black_box(e.unwrap());
                n += 1;
            }
            assert_eq!(n, ALL);
        })
    });
    g.finish();
}

criterion_group!(benches, appends, reads);
criterion_main!(benches);
