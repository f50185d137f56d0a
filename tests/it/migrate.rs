use std::thread;

use crate::common::{events, schema_name, TestResult, TestStore};
use pg_eventstore::{Config, Error, ExpectedVersion, ReadStream, Store, SCHEMA_VERSION};

#[test]
fn schema_dir_matches_what_the_migrations_produce() -> TestResult {
    let generated = pg_eventstore::migration_sql("eventstore", "schema_migrations")?;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/eventstore.sql");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &generated)?;
    }
    let on_disk = std::fs::read_to_string(path)?;
    assert!(
        on_disk == generated,
        "schema/eventstore.sql is out of date: run `UPDATE_SCHEMA=1 cargo test --test it migrate::`"
    );
    Ok(())
}

#[test]
fn the_schema_script_applied_by_hand_counts_as_migrated() -> TestResult {
    let t = TestStore::unmigrated("migrate_by_hand");
    let script = pg_eventstore::migration_sql(&t.schema, "schema_migrations")?;
    crate::common::client().batch_execute(&script)?;
    assert_eq!(t.schema_version()?, SCHEMA_VERSION);
    let report = t.migrate()?;
    assert!(report.applied.is_empty());
    t.append("s", ExpectedVersion::NoStream, &events("E", 1))?;
    Ok(())
}

#[test]
fn migrate_twice_is_a_no_op() -> TestResult {
    let t = TestStore::unmigrated("migrate_twice");
    assert_eq!(t.schema_version()?, 0);
    let first = t.migrate()?;
    assert_eq!(first.previous_version, 0);
    assert_eq!(first.current_version, SCHEMA_VERSION);
    assert_eq!(first.applied.len() as i64, SCHEMA_VERSION);
    t.append("s", ExpectedVersion::NoStream, &events("E", 2))?;
    let second = t.migrate()?;
    assert!(second.applied.is_empty());
    assert_eq!(second.previous_version, SCHEMA_VERSION);
    assert_eq!(t.count_events(), 2, "re-running migrations keeps the data");
    Ok(())
}

#[test]
fn concurrent_migrations_from_four_threads() -> TestResult {
    let t = TestStore::unmigrated("migrate_conc");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = crate::common::database_url();
            let schema = t.schema.clone();
            thread::spawn(move || -> pg_eventstore::Result<usize> {
                // Separate stores: as separate processes would be.
                let store = Config::new(&url)?.schema(schema).connect()?;
                Ok(store.migrate()?.applied.len())
            })
        })
        .collect();
    let applied: Vec<usize> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(
        applied.iter().sum::<usize>() as i64,
        SCHEMA_VERSION,
        "{applied:?}"
    );
    let rows: i64 = crate::common::client()
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".schema_migrations", t.schema),
            &[],
        )?
        .get(0);
    assert_eq!(rows, SCHEMA_VERSION);
    Ok(())
}

#[test]
fn custom_history_table_name() -> TestResult {
    let t = TestStore::with("migrate_table", |c| c.migrations_table("my_history"));
    let rows: i64 = crate::common::client()
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".my_history", t.schema),
            &[],
        )?
        .get(0);
    assert_eq!(rows, SCHEMA_VERSION);
    Ok(())
}

#[test]
fn a_newer_schema_is_refused() -> TestResult {
    let t = TestStore::new("migrate_newer");
    crate::common::client().execute(
        &format!(
            "INSERT INTO \"{}\".schema_migrations (version, name) VALUES ($1, 'from the future')",
            t.schema
        ),
        &[&(SCHEMA_VERSION + 1)],
    )?;
    match t.migrate() {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION))
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    let err = Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .connect()
        .unwrap_err();
    assert!(err.to_string().contains("upgrade pg-eventstore"), "{err}");
    Ok(())
}

#[test]
fn an_unmigrated_database_gives_a_clear_error() -> TestResult {
    let schema = schema_name("not_migrated");
    let store: Store = Config::new(&crate::common::database_url())?
        .schema(&schema)
        .connect()?;
    let err = store
        .append("s", ExpectedVersion::Any, &events("E", 1))
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
    assert!(err.to_string().contains("Store::migrate"), "{err}");
    let err = store
        .read_stream("s", ReadStream::forwards())?
        .next()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "{err:?}");
    // Nothing was created behind the caller's back.
    let exists: bool = crate::common::client()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )?
        .get(0);
    assert!(!exists);
    Ok(())
}

/// Versions 8, 9 and 10 replace the `append_in` functions in place: what an operator granted
/// or revoked on them before the upgrade still holds after it.
#[test]
fn upgrading_from_7_keeps_the_append_in_functions_and_their_grants() -> TestResult {
    let t = TestStore::new("migrate_v8");
    let mut c = crate::common::client();
    let role = crate::subscribe::DropRole(format!("pges_appender_{}", std::process::id()));
    let signature = |name: &str| {
        format!(
            "\"{}\".{name}(text, uuid[], text[], jsonb[], jsonb[], integer, bigint, text)",
            t.schema
        )
    };
    let function = signature("append_in_any");
    let state = |c: &mut pg_eventstore::postgres::Client| -> (u32, bool) {
        let row = c
            .query_one(
                &format!(
                    "SELECT '{function}'::regprocedure::oid,
                            has_function_privilege('public', '{function}'::regprocedure, 'EXECUTE')"
                ),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // As if versions 8 on had not run yet, and the operator had revoked the function
    // from everyone and granted it to one role.
    c.batch_execute(&format!(
        "DELETE FROM \"{s}\".schema_migrations WHERE version >= 8;
         DROP FUNCTION {events_record}; DROP FUNCTION {any_record};
         REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC;
         DROP ROLE IF EXISTS {r}; CREATE ROLE {r};
         GRANT EXECUTE ON FUNCTION {function} TO {r}",
        s = t.schema,
        events_record = signature("append_in_events_record"),
        any_record = signature("append_in_any_record"),
        r = role.0,
    ))?;
    let before = state(&mut c);
    assert!(!before.1);
    let report = t.migrate()?;
    assert_eq!(report.applied.len() as i64, SCHEMA_VERSION - 7);
    assert_eq!(
        state(&mut c),
        before,
        "the function was replaced, not recreated"
    );
    // The functions of version 15 may be executed by whoever may execute those they copy.
    let may = |c: &mut pg_eventstore::postgres::Client, who: &str, name: &str| -> bool {
        c.query_one(
            "SELECT has_function_privilege($1, $2::text::regprocedure, 'EXECUTE')",
            &[&who, &signature(name)],
        )
        .unwrap()
        .get(0)
    };
    assert!(!may(&mut c, "public", "append_in_any_record"));
    assert!(may(&mut c, &role.0, "append_in_any_record"));
    assert!(may(&mut c, "public", "append_in_events_record"));
    Ok(())
}

/// Two processes that start at once both migrate: the second waits for the first's
/// advisory lock for as long as its migrations take, even when the role (or the store's
/// `Config::statement_timeout`) sets `lock_timeout` and `statement_timeout` below that.
/// (Before, the waiting one failed with "canceling statement due to lock timeout".)
#[test]
fn migrate_waits_for_another_migrator_longer_than_the_sessions_timeouts() -> TestResult {
    let schema = schema_name("migrate_waits");
    let mut pg: pg_eventstore::postgres::Config = crate::common::database_url().parse()?;
    pg.options("-c lock_timeout=200 -c statement_timeout=400");
    // No retries: the wait itself must outlast the timeouts (a lock timeout is transient,
    // and retries alone could cover a short wait).
    let store = Store::connect(
        Config::from_pg(pg)
            .schema(&schema)
            .max_connections(2)
            .max_retries(0),
    )?;
    // The other migrator: it holds the schema's migration lock for a second and a half.
    let mut other = crate::common::client();
    other.batch_execute("SET idle_in_transaction_session_timeout = 0")?;
    let mut tx = other.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(x'50455331'::int, hashtext($1))",
        &[&schema],
    )?;
    let migrating = thread::spawn(move || store.migrate().map(|r| (r, store)));
    thread::sleep(std::time::Duration::from_millis(1500));
    tx.commit()?;
    let (report, store) = migrating.join().unwrap()?;
    assert_eq!(report.current_version, SCHEMA_VERSION);
    drop(store);
    crate::common::client().batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))?;
    Ok(())
}

/// Some sites make `SERIALIZABLE` the default for a role (`ALTER ROLE … SET
/// default_transaction_isolation`). The store's own connections still run `READ
/// COMMITTED`, the level its statements are written for: four processes migrating one
/// schema at once all succeed (before, those that waited read the history in a snapshot
/// from before the wait and failed with "relation \"events\" already exists"), and `Any`
/// appends from four threads to one stream never fail.
#[test]
fn a_role_that_defaults_to_serializable_gets_read_committed_connections() -> TestResult {
    let schema = schema_name("migrate_serializable");
    let role = format!("pges_{schema}");
    let mut admin = crate::common::client();
    admin.batch_execute(&format!(
        "CREATE ROLE \"{role}\" LOGIN SUPERUSER;
         ALTER ROLE \"{role}\" SET default_transaction_isolation = 'serializable'"
    ))?;
    let result = (|| -> TestResult {
        let mut pg: pg_eventstore::postgres::Config = crate::common::database_url().parse()?;
        pg.user(&role);
        // The role's setting holds on a plain connection.
        let mut plain = pg.connect(pg_eventstore::postgres::NoTls)?;
        let level: String = plain.query_one("SHOW transaction_isolation", &[])?.get(0);
        assert_eq!(level, "serializable");
        let stores = (0..4)
            .map(|_| Store::connect(Config::from_pg(pg.clone()).schema(&schema)))
            .collect::<pg_eventstore::Result<Vec<_>>>()?;
        let applied: Vec<usize> = thread::scope(|s| {
            let runs: Vec<_> = stores.iter().map(|st| s.spawn(|| st.migrate())).collect();
            runs.into_iter()
                .map(|r| r.join().unwrap().map(|r| r.applied.len()))
                .collect::<pg_eventstore::Result<_>>()
        })?;
        assert_eq!(applied.iter().sum::<usize>() as i64, SCHEMA_VERSION);
        let mut conn = stores[0].pool().get()?;
        let level: String = conn.query_one("SHOW transaction_isolation", &[])?.get(0);
        assert_eq!(level, "read committed");
        drop(conn);
        thread::scope(|s| {
            for st in &stores {
                s.spawn(move || {
                    for _ in 0..20 {
                        st.append("hot", ExpectedVersion::Any, &events("E", 1))
                            .expect("an Any append");
                    }
                });
            }
        });
        let versions: Vec<u64> = stores[0]
            .read_stream("hot", ReadStream::forwards())?
            .map(|e| e.map(|e| e.version))
            .collect::<pg_eventstore::Result<_>>()?;
        assert_eq!(versions, (0..80).collect::<Vec<u64>>());
        Ok(())
    })();
    admin.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; DROP ROLE \"{role}\""
    ))?;
    result
}

/// Whatever writes to the events table, an empty stream name and a negative version are
/// refused by the database itself (the domains of schema version 14).
#[test]
fn the_database_refuses_an_empty_stream_name_or_a_negative_version() -> TestResult {
    let t = TestStore::new("migrate_domains");
    let mut c = crate::common::client();
    let insert = |stream: &str, version: i64| {
        format!(
            "INSERT INTO \"{}\".events (global_position, event_id, stream_id, stream_version,
                                       event_type, data)
             VALUES (1, gen_random_uuid(), '{stream}', {version}, 'E', '{{}}')",
            t.schema
        )
    };
    for (stream, version, constraint) in [
        ("", 0, "stream_name_not_empty"),
        ("s", -1, "stream_version_not_negative"),
    ] {
        let err = c.batch_execute(&insert(stream, version)).unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "23514", "{db}");
        assert_eq!(db.constraint(), Some(constraint), "{db}");
    }
    c.batch_execute(&insert("s", 0))?;
    assert_eq!(t.count_events(), 1);
    Ok(())
}

/// Version 14 turns the table's two `CHECK` constraints into domains' without rewriting
/// the table or its indexes, keeps every row, and leaves the domains' constraints
/// validated.
#[test]
fn upgrading_to_14_rewrites_nothing_and_keeps_the_rules() -> TestResult {
    let t = TestStore::new("migrate_to_14");
    t.append("a", ExpectedVersion::NoStream, &events("E", 3))?;
    t.append("b", ExpectedVersion::NoStream, &events("E", 2))?;
    let mut c = crate::common::client();
    let s = &t.schema;
    // The events table as version 13 left it.
    c.batch_execute(&format!(
        "ALTER TABLE \"{s}\".events ALTER COLUMN stream_id TYPE text,
             ALTER COLUMN stream_version TYPE bigint,
             ADD CONSTRAINT events_stream_version_check CHECK (stream_version >= 0),
             ADD CONSTRAINT events_stream_id_check CHECK (stream_id <> '');
         DROP DOMAIN \"{s}\".stream_name;
         DROP DOMAIN \"{s}\".stream_version;
         DELETE FROM \"{s}\".schema_migrations WHERE version >= 14"
    ))?;
    let files = |c: &mut postgres::Client| -> Vec<u32> {
        ["events", "events_stream_version_key", "events_pkey"]
            .iter()
            .map(|r| {
                let q = format!("SELECT pg_relation_filenode('\"{s}\".{r}')::oid");
                c.query_one(&q, &[]).unwrap().get(0)
            })
            .collect()
    };
    let before = files(&mut c);
    let report = t.migrate()?;
    assert_eq!(report.applied.len() as i64, SCHEMA_VERSION - 13);
    assert_eq!(files(&mut c), before, "a table or index was rewritten");
    let checks: Vec<(String, bool)> = c
        .query(
            "SELECT conname::text, convalidated FROM pg_constraint
              WHERE contype = 'c' AND connamespace = $1::text::regnamespace
              ORDER BY conname",
            &[&format!("\"{s}\"")],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        checks,
        [
            ("stream_metadata_is_object".to_string(), true),
            ("stream_name_not_empty".to_string(), true),
            ("stream_version_not_negative".to_string(), true),
        ]
    );
    assert_eq!(t.count_events(), 5);
    let read: Vec<_> = t
        .read_stream("a", ReadStream::forwards())?
        .map(|e| e.map(|e| e.version))
        .collect::<Result<_, _>>()?;
    assert_eq!(read, [0, 1, 2]);
    t.append("a", ExpectedVersion::Exact(2), &events("E", 1))?;
    Ok(())
}
