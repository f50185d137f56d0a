//! Test support: each test gets its own schema (and so its own NOTIFY channel), dropped
//! when the test ends, so tests run in parallel without seeing each other.

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

/// `(stream, version, column)` of every row of `t`'s events table, in position order,
/// read behind the store's back.
pub fn event_rows<T>(t: &TestStore, column: &str) -> Vec<(String, i64, T)>
where
    T: for<'a> postgres::types::FromSql<'a>,
{
    let sql = format!(
        "SELECT stream_id, stream_version, {column} FROM \"{}\".events ORDER BY global_position",
        t.schema
    );
    client()
        .query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
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

/// A plain client to another database of the same cluster than `DATABASE_URL`'s (one
/// that exists and takes connections, not a template; created if there is none).
pub fn other_database_client() -> postgres::Client {
    let mut c = client();
    let name: Option<String> = c
        .query_opt(
            "SELECT datname FROM pg_database
              WHERE datname <> current_database() AND datallowconn AND NOT datistemplate
              ORDER BY datname = 'pg_eventstore_other' DESC, datname LIMIT 1",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0));
    let name = name.unwrap_or_else(|| {
        // Two test processes may race to create it: the loser's "already exists" is fine.
        let _ = c.batch_execute("CREATE DATABASE pg_eventstore_other");
        "pg_eventstore_other".to_string()
    });
    let mut config: postgres::Config = database_url().parse().unwrap();
    config.dbname(&name);
    config
        .connect(postgres::NoTls)
        .expect("connect to another database")
}

/// Opens a transaction that holds a transaction id, on `client`, and keeps it open until
/// the returned guard is dropped (then rolls it back).
pub struct XidHolder {
    client: postgres::Client,
}

impl XidHolder {
    /// `setup` runs inside the transaction and must give it an id (write something).
    pub fn open(mut client: postgres::Client, setup: &str) -> XidHolder {
        client.batch_execute("BEGIN").unwrap();
        client.batch_execute(setup).unwrap();
        XidHolder { client }
    }

    /// A transaction in another database that only takes an id.
    pub fn in_other_database() -> XidHolder {
        XidHolder::open(other_database_client(), "SELECT pg_current_xact_id()")
    }
}

impl Drop for XidHolder {
    fn drop(&mut self) {
        let _ = self.client.batch_execute("ROLLBACK");
    }
}

/// The built example program `name` (`cargo test` builds the examples next to the test
/// binaries; a run of this test binary alone builds the one it needs first).
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/it-<hash> → target/<profile>/examples/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary sits in target/<profile>/deps")
        .join("examples")
        .join(name);
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "--example", name])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --example {name} failed");
    }
    path
}
/// A statement trigger on one table of a test schema that fails the next `n` inserts
/// (upserts included) with a chosen SQLSTATE. A sequence counts the attempts outside the
/// failing transactions, so a failure does not roll its own count back.
pub struct Fault {
    schema: String,
}

impl Fault {
    /// Installs the trigger on `table` of `t`'s schema; it does nothing until
    /// [`Fault::inject`].
    pub fn install(t: &TestStore, table: &str) -> Fault {
        let s = format!("\"{}\"", t.schema);
        client()
            .batch_execute(&format!(
                "CREATE TABLE {s}.fault (code text, fail_below bigint);
                 INSERT INTO {s}.fault VALUES (NULL, 0);
                 CREATE SEQUENCE {s}.fault_seq;
                 CREATE FUNCTION {s}.fault() RETURNS trigger LANGUAGE plpgsql AS $f$
                 DECLARE f record;
                 BEGIN
                     SELECT * INTO f FROM {s}.fault;
                     IF f.code IS NOT NULL AND nextval('{s}.fault_seq') <= f.fail_below THEN
                         RAISE EXCEPTION 'injected fault' USING ERRCODE = f.code;
                     END IF;
                     RETURN NULL;
                 END $f$;
                 CREATE TRIGGER fault BEFORE INSERT ON {s}.\"{table}\"
                     FOR EACH STATEMENT EXECUTE FUNCTION {s}.fault();"
            ))
            .expect("install the fault trigger");
        Fault { schema: s }
    }

    /// Fails the next `times` inserts with SQLSTATE `code` (`None`: none fail).
    pub fn inject(&self, code: Option<&str>, times: i64) {
        let s = &self.schema;
        let mut c = client();
        let mut tx = c.transaction().unwrap();
        tx.execute(&format!("SELECT setval('{s}.fault_seq', 1, false)"), &[])
            .unwrap();
        tx.execute(
            &format!("UPDATE {s}.fault SET code = $1, fail_below = $2"),
            &[&code, &times],
        )
        .unwrap();
        tx.commit().unwrap();
    }
}
