use crate::common::{events, TestResult, TestStore};
use pg_eventstore::{
    Config, Error, EventData, ExpectedVersion, ReadAll, ReadStream, SubscribeOptions,
    MAX_STREAM_ID_BYTES,
};
use serde_json::json;

fn assert_invalid(result: pg_eventstore::Result<impl std::fmt::Debug>, needle: &str) {
    match result {
        Err(Error::InvalidInput(msg)) => {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}")
        }
        other => panic!("expected InvalidInput mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_appends_are_refused_and_write_nothing() -> TestResult {
    let t = TestStore::new("bad_append");
    t.append("s", ExpectedVersion::NoStream, &events("Ok", 1))?;
    let good = || EventData::json("Ok", json!({ "x": 1 }));

    assert_invalid(
        t.append("", ExpectedVersion::Any, &[good()]),
        "stream id is empty",
    );
    let long = "s".repeat(MAX_STREAM_ID_BYTES + 1);
    assert_invalid(
        t.append(&long, ExpectedVersion::Any, &[good()]),
        "513 bytes",
    );
    assert_invalid(t.append("a\0b", ExpectedVersion::Any, &[good()]), "NUL");
    assert_invalid(
        t.append("s", ExpectedVersion::Any, &[EventData::json("", json!({}))]),
        "event type is empty",
    );
    assert_invalid(
        t.append(
            "s",
            ExpectedVersion::Any,
            &[EventData::json("T\0", json!({}))],
        ),
        "NUL",
    );
    // One bad event in the middle of a batch: nothing of the batch is written.
    let batch = vec![
        good(),
        EventData::json("Bad", json!({ "text": "nul \u{0} here" })),
        good(),
    ];
    assert_invalid(t.append("s", ExpectedVersion::Any, &batch), "event 1 (Bad)");
    let meta = good().metadata(&json!({ "k\u{0}": 1 }))?;
    assert_invalid(t.append("s", ExpectedVersion::Any, &[meta]), "metadata");
    assert_invalid(t.append("s", ExpectedVersion::Any, &[]), "no events");
    let same_id = good();
    assert_invalid(
        t.append("s", ExpectedVersion::Any, &[same_id.clone(), same_id]),
        "appears twice",
    );
    assert_invalid(
        t.append("s", ExpectedVersion::Exact(u64::MAX), &[good()]),
        "out of range",
    );
    // The transaction variant checks the same way, before touching the transaction.
    let mut conn = t.pool().get()?;
    let mut tx = conn.transaction()?;
    assert_invalid(
        t.append_in(&mut tx, "", ExpectedVersion::Any, &[good()]),
        "empty",
    );
    t.append_in(&mut tx, "s2", ExpectedVersion::NoStream, &[good()])?;
    tx.commit()?;

    assert_eq!(t.count_events(), 2);
    assert_eq!(t.stream_version("s")?, Some(0));
    Ok(())
}

#[test]
fn bad_reads_are_refused() -> TestResult {
    let t = TestStore::new("bad_read");
    assert_invalid(
        t.read_stream("", ReadStream::forwards()).map(|_| ()),
        "empty",
    );
    assert_invalid(
        t.read_all(ReadAll::from_start().category("a\0"))
            .map(|_| ()),
        "NUL",
    );
    assert_invalid(
        t.read_all(ReadAll::from_start().event_types(Vec::<String>::new()))
            .map(|_| ()),
        "event type filter is empty",
    );
    assert_invalid(
        t.read_all(ReadAll::from_start().streams(Vec::<String>::new()))
            .map(|_| ()),
        "stream filter is empty",
    );
    assert_invalid(
        t.read_all(ReadAll::from_start().streams(["a", ""]))
            .map(|_| ()),
        "stream filter's stream id is empty",
    );
    assert_invalid(
        t.subscribe(SubscribeOptions::streams(["a\0"])).map(|_| ()),
        "NUL",
    );
    assert_invalid(
        t.count(&ReadAll::from_start().streams([""])).map(|_| ()),
        "empty",
    );
    assert_invalid(
        t.worker("w")
            .streams(Vec::<String>::new())
            .spawn(|_| Ok(()))
            .map(|_| ()),
        "stream filter is empty",
    );
    assert_invalid(t.save_snapshot("", 1, &1).map(|_| ()), "empty");
    Ok(())
}

#[test]
fn a_hostile_schema_name_is_refused_before_connecting() {
    for bad in ["x; DROP TABLE y", "x\"y", "", "1x", "a b"] {
        match Config::new(&crate::common::database_url())
            .unwrap()
            .schema(bad)
            .connect()
        {
            Err(Error::Config(msg)) => assert!(msg.contains("schema name"), "{msg}"),
            other => panic!("{bad:?}: expected a config error, got {other:?}"),
        }
    }
    match Config::new(&crate::common::database_url())
        .unwrap()
        .migrations_table("t; --")
        .connect()
    {
        Err(Error::Config(msg)) => assert!(msg.contains("migrations table"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn server_errors_keep_their_cause() -> TestResult {
    let t = TestStore::new("bad_cause");
    // A statement timeout from the server reaches the caller with its SQLSTATE and text.
    // (A second store on the same schema: a 50 ms limit could stop a migration on a
    // busy machine.)
    let t2 = Config::new(&crate::common::database_url())?
        .schema(&t.schema)
        .statement_timeout(std::time::Duration::from_millis(50))
        .connect()?;
    let mut conn = t2.pool().get()?;
    let err: pg_eventstore::Error = conn.execute("SELECT pg_sleep(1)", &[]).unwrap_err().into();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    let text = err.report();
    assert_eq!(crate::common::chain(&err), text);
    assert!(
        text.contains("57014") && text.contains("statement timeout"),
        "{text}"
    );
    assert!(std::error::Error::source(&err).is_some());
    drop(t);
    Ok(())
}

#[test]
fn values_above_i64_max_are_refused_not_wrapped() -> TestResult {
    let t = TestStore::new("bad_overflow");
    // A checkpoint would be stored as -1 and read back as u64::MAX.
    let e = t.save_checkpoint("projector", u64::MAX).unwrap_err();
    assert_invalid(Err::<(), _>(e), "18446744073709551615");
    let e = t.save_checkpoint("projector", u64::MAX).unwrap_err();
    assert!(e.to_string().contains("\"projector\""), "{e}");
    let mut client = crate::common::client();
    let mut tx = client.transaction()?;
    assert_invalid(
        t.save_checkpoint_in(&mut tx, "projector", i64::MAX as u64 + 1),
        "projector",
    );
    drop(tx);
    assert_eq!(t.checkpoint("projector")?, None, "nothing was written");
    t.save_checkpoint("projector", i64::MAX as u64)?;
    assert_eq!(t.checkpoint("projector")?, Some(i64::MAX as u64));

    // A snapshot would be stored as -1, and an older one would then replace it.
    let e = t.save_snapshot("acc-1", u64::MAX, &json!({ "balance": 1 }));
    assert_invalid(e, "acc-1");
    assert!(t.load_snapshot::<serde_json::Value>("acc-1")?.is_none());

    // A subscription after an impossible position fails at once, not on every next().
    assert_invalid(
        t.subscribe(pg_eventstore::SubscribeOptions::all().after(u64::MAX)),
        "18446744073709551615",
    );
    assert_invalid(
        t.subscribe(pg_eventstore::SubscribeOptions::stream("acc-1").after(u64::MAX)),
        "18446744073709551615",
    );
    Ok(())
}

#[test]
fn a_stored_checkpoint_out_of_range_is_named() -> TestResult {
    let t = TestStore::new("bad_stored_ckpt");
    // Written behind the store's back, as an older release did for u64::MAX.
    crate::common::client().execute(
        &format!(
            "INSERT INTO \"{}\".checkpoints (processor_name, position) VALUES ('mailer', -1)",
            t.schema
        ),
        &[],
    )?;
    let e = t.checkpoint("mailer").unwrap_err().to_string();
    assert!(e.contains("\"mailer\"") && e.contains("-1"), "{e}");
    // A worker of that processor says which checkpoint is wrong.
    let e = t.worker("mailer").run_batch(|_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("checkpoint \"mailer\""), "{e}");
    Ok(())
}

#[test]
fn snapshots_refuse_nul_like_appends() -> TestResult {
    let t = TestStore::new("bad_snapshot_nul");
    assert_invalid(
        t.save_snapshot("acc-1", 3, &json!({ "name": "a\u{0}b" })),
        "NUL",
    );
    assert!(t.load_snapshot::<serde_json::Value>("acc-1")?.is_none());
    Ok(())
}

#[test]
fn subscribing_to_an_unmigrated_schema_fails_at_once() -> TestResult {
    let t = TestStore::unmigrated("bad_sub_unmigrated");
    for options in [
        pg_eventstore::SubscribeOptions::all().live(),
        pg_eventstore::SubscribeOptions::all(),
        pg_eventstore::SubscribeOptions::category("acc-"),
    ] {
        match t.subscribe(options) {
            Err(Error::NotMigrated { .. }) => {}
            other => panic!("expected NotMigrated, got {other:?}"),
        }
    }
    Ok(())
}

/// In a schema that exists but was never migrated (created by hand, as many deployments
/// do), every append path and `read_all` report `Error::NotMigrated`.
#[test]
fn appends_to_an_existing_unmigrated_schema_report_not_migrated() -> TestResult {
    let t = TestStore::unmigrated("bad_append_unmigrated");
    crate::common::client().batch_execute(&format!("CREATE SCHEMA \"{}\"", t.schema))?;
    let not_migrated = |what: &str, r: pg_eventstore::Result<pg_eventstore::AppendResult>| match r {
        Err(Error::NotMigrated { .. }) => {}
        other => panic!("{what}: expected NotMigrated, got {other:?}"),
    };
    let e = || events("E", 1);
    not_migrated("append", t.append("s", ExpectedVersion::Any, &e()));
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
        let mut c = t.pool().get()?;
        let mut tx = c.transaction()?;
        not_migrated("append_in", t.append_in(&mut tx, "s", expected, &e()));
    }
    let mut conn = t.connection()?;
    let mut tx = conn.transaction()?;
    not_migrated(
        "StoreTransaction::append",
        tx.append("s", ExpectedVersion::Any, &e()),
    );
    drop(tx);
    let mut own = crate::common::client();
    let mut tx = own.transaction()?;
    let mut prepared = t.prepared_appends();
    not_migrated(
        "PreparedAppends::append",
        prepared.append(&mut tx, "s", ExpectedVersion::Any, &e()),
    );
    drop(tx);
    match t.read_all(ReadAll::from_start())?.next() {
        Some(Err(Error::NotMigrated { .. })) => {}
        other => panic!("read_all: expected NotMigrated, got {other:?}"),
    }
    Ok(())
}
