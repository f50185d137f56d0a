//! Test support: each test gets its own schema (and so its own NOTIFY channel), dropped
//! when the test ends, so tests run in parallel without seeing each other.
#![allow(dead_code)]

pub mod proxy;
pub mod server;

use std::sync::atomic::{AtomicUsize, Ordering};

use pg_eventstore::{Config, EventData, Store, DEFAULT_DATABASE_URL};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `DATABASE_URL`, or the default local server.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

/// A plain client to the test database, for checks behind the store's back.
pub fn client() -> postgres::Client {
    postgres::Client::connect(&database_url(), postgres::NoTls).expect("connect to DATABASE_URL")
}

/// A schema name unique to this test process and call.
pub fn schema_name(test: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t_{}_{}_{}",
        test,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A migrated store in a fresh schema; the schema is dropped on drop.
pub struct TestStore {
    pub store: Store,
    pub schema: String,
}

impl TestStore {
    pub fn new(test: &str) -> TestStore {
        Self::with(test, |c| c)
    }

    pub fn with(test: &str, f: impl FnOnce(Config) -> Config) -> TestStore {
        let t = Self::unmigrated_with(test, f);
        t.store.migrate().expect("migrate");
        t
    }

    pub fn unmigrated(test: &str) -> TestStore {
        Self::unmigrated_with(test, |c| c)
    }

    fn unmigrated_with(test: &str, f: impl FnOnce(Config) -> Config) -> TestStore {
        let schema = schema_name(test);
        let config = f(Config::new(&database_url())
            .expect("DATABASE_URL parses")
            .schema(&schema)
            .max_connections(8));
        let store = Store::connect(config).expect("connect");
        TestStore { store, schema }
    }

    /// Waits until `$all` readers can see every committed event of this schema.
    pub fn wait_all_visible(&self) {
        let sql = format!(
            "SELECT max(global_position) FROM \"{}\".events",
            self.schema
        );
        let tip: Option<i64> = client().query_one(&sql, &[]).unwrap().get(0);
        if let Some(tip) = tip {
            wait_visible(&self.store, tip as u64);
        }
    }

    /// Rows in this schema's events table.
    pub fn count_events(&self) -> i64 {
        let sql = format!("SELECT count(*) FROM \"{}\".events", self.schema);
        client().query_one(&sql, &[]).unwrap().get(0)
    }
}

impl std::ops::Deref for TestStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        if let Err(e) = client().batch_execute(&sql) {
            eprintln!("could not drop test schema {}: {e}", self.schema);
        }
    }
}

/// Drops a schema on drop, for stores that are not [`TestStore`]s.
pub struct DropSchema(pub String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0);
        if let Err(e) = client().batch_execute(&sql) {
            eprintln!("could not drop test schema {}: {e}", self.0);
        }
    }
}

/// An error and its `source()` chain, one level after the other, after checking that
/// no level repeats the text of a level below it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut levels = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        levels.push(s.to_string());
        source = s.source();
    }
    for (i, upper) in levels.iter().enumerate() {
        for lower in &levels[i + 1..] {
            let first_line = lower.lines().next().unwrap_or_default();
            assert!(
                !upper.contains(first_line),
                "{upper:?} repeats its cause {lower:?}"
            );
        }
    }
    levels.join(": ")
}

/// `n` small events of type `t`, data `{"i": k}`.
pub fn events(t: &str, n: usize) -> Vec<EventData> {
    (0..n)
        .map(|i| EventData::json(t, serde_json::json!({ "i": i })))
        .collect()
}

/// Waits until `$all` readers can see `position` (a concurrent test's open writing
/// transaction holds the horizon back for as long as it runs; see the crate docs).
pub fn wait_visible(store: &Store, position: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.head_position().unwrap().unwrap_or(0) < position {
        assert!(
            std::time::Instant::now() < deadline,
            "position {position} did not become visible to $all readers"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// xorshift64*: enough randomness for choosing streams and sleeps.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Terminates every backend whose application_name is `app` and waits until those
/// backends have exited (the store may open new ones meanwhile: they are not waited for).
pub fn kill_backends(app: &str) -> usize {
    let mut c = client();
    let pids: Vec<i32> = c
        .query(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&app],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    server::wait_until(std::time::Duration::from_secs(10), || {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 0
    })
    .expect("terminated backends exit");
    pids.len()
}
