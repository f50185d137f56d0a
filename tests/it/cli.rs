//! The `pg-eventstore` binary against the real PostgreSQL (`cargo test --features cli --test it cli::`):
//! each test runs the built binary on a schema of its own.

use std::process::{Command, Output, Stdio};

use crate::common::{database_url, events, TestResult, TestStore};
use pg_eventstore::{
    EventData, ExpectedVersion, ImportOptions, ReadAll, RecordedEvent, Result, SCHEMA_VERSION,
};
use serde_json::{json, Value};

fn bin() -> &'static std::path::Path {
    assert_cmd::cargo::cargo_bin!("pg-eventstore")
}

/// `pg-eventstore --url DATABASE_URL --schema <schema> args...` with `stdin`.
fn run(schema: &str, args: &[&str], stdin: &str) -> Output {
    assert_cmd::Command::new(bin())
        .args(["--url", &database_url(), "--schema", schema])
        .args(args)
        .write_stdin(stdin)
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .expect("run pg-eventstore")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn all(t: &TestStore) -> Vec<RecordedEvent> {
    t.read_all(ReadAll::from_start())
        .unwrap()
        .collect::<Result<Vec<_>>>()
        .unwrap()
}

#[test]
fn export_then_import_into_another_schema_gives_identical_events() -> TestResult {
    let from = TestStore::new("cli_export");
    let into = TestStore::new("cli_import");
    // Appends (several transactions) and an import, several streams, with and without
    // metadata, JSON null metadata, and unicode.
    from.append("order-1", ExpectedVersion::NoStream, &events("Placed", 3))?;
    from.append(
        "user-ä",
        ExpectedVersion::NoStream,
        &[
            EventData::json("Named", json!({ "name": "Åsa \"q\"" })).metadata(&json!({"by": 1}))?,
            EventData::json("Nothing", Value::Null).metadata(&Value::Null)?,
        ],
    )?;
    let bulk: Vec<(String, EventData)> = (0..2_500)
        .map(|i| {
            let e = EventData::json("Bulk", json!({ "i": i, "nested": [i, { "x": true }] }));
            (format!("bulk-{}", i % 7), e)
        })
        .collect();
    from.import(&bulk, ImportOptions::new())?;
    from.append("order-1", ExpectedVersion::Exact(2), &events("Shipped", 1))?;
    from.wait_all_visible();

    let export = run(&from.schema, &["export"], "");
    assert!(export.status.success(), "{}", stderr(&export));
    assert!(export.stderr.is_empty(), "silent without a terminal");
    let lines = stdout(&export);
    assert_eq!(lines.lines().count(), 2_506);

    let import = run(&into.schema, &["import"], &lines);
    assert!(import.status.success(), "{}", stderr(&import));
    let summary: Value = serde_json::from_slice(&import.stdout)?;
    assert_eq!(summary["events"], 2_506);
    assert_eq!(summary["streams"], 9);
    assert_eq!(summary["transactions"], 1);

    into.wait_all_visible();
    let (a, b) = (all(&from), all(&into));
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        // Everything but the position, which belongs to the importing transaction.
        assert_eq!(
            (
                &a.id,
                &a.stream_id,
                a.version,
                &a.event_type,
                &a.data,
                &a.metadata,
                a.recorded_at
            ),
            (
                &b.id,
                &b.stream_id,
                b.version,
                &b.event_type,
                &b.data,
                &b.metadata,
                b.recorded_at
            )
        );
    }
    assert!(b.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(b[3].metadata_as::<Value>()?, Some(json!({"by": 1})));
    assert_eq!(b[4].metadata_as::<Value>()?, Some(Value::Null));
    assert_eq!(b[0].metadata, None);

    // Importing the same export again: the streams exist, so it is a conflict and
    // nothing is written.
    let again = run(&into.schema, &["import"], &lines);
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert_eq!(into.count_events(), 2_506);
    Ok(())
}

#[test]
fn export_keeps_every_digit_of_the_data() -> TestResult {
    // Numbers that jsonb keeps exactly and `f64` cannot: more digits than a double holds,
    // trailing zeros, one beyond its range; keys and strings with spaces and escapes.
    let from = TestStore::new("cli_export_exact");
    let into = TestStore::new("cli_import_exact");
    let input = concat!(
        r#"{"stream":"n-1","type":"Big","data":{"n": 12345678901234567890123, "x": 1.50}}"#,
        "\n",
        r#"{"stream":"n-1","type":"Huge","data":{"h": 1e400},"metadata":{"a b": "c \" d\\"}}"#,
        "\n",
    );
    let import = run(&from.schema, &["import"], input);
    assert!(import.status.success(), "{}", stderr(&import));
    from.wait_all_visible();

    let export = run(&from.schema, &["export"], "");
    assert!(export.status.success(), "{}", stderr(&export));
    let lines = stdout(&export);
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].contains(r#""data":{"n":12345678901234567890123,"x":1.50}"#),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(&format!(r#""data":{{"h":1{}}}"#, "0".repeat(400))),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains(r#""metadata":{"a b":"c \" d\\"}"#),
        "{}",
        lines[1]
    );
    // Each line is JSON, and imports into another store as the same data.
    for line in &lines {
        serde_json::from_str::<serde::de::IgnoredAny>(line)?;
    }
    let import = run(&into.schema, &["import"], &(lines.join("\n") + "\n"));
    assert!(import.status.success(), "{}", stderr(&import));
    into.wait_all_visible();
    let (a, b) = (all(&from), all(&into));
    assert_eq!(
        a.iter().map(|e| (&e.data, &e.metadata)).collect::<Vec<_>>(),
        b.iter().map(|e| (&e.data, &e.metadata)).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn append_with_a_wrong_expected_version_is_a_conflict_and_writes_nothing() -> TestResult {
    let t = TestStore::new("cli_conflict");
    let lines = "{\"type\":\"Deposited\",\"data\":{\"amount\":10}}\n\
                 {\"type\":\"Deposited\",\"data\":{\"amount\":5},\"metadata\":{\"by\":\"ada\"}}\n";
    let first = run(
        &t.schema,
        &["append", "account-1", "--expected", "no-stream"],
        lines,
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let result: Value = serde_json::from_slice(&first.stdout)?;
    assert_eq!(
        (
            &result["first_version"],
            &result["last_version"],
            &result["was_duplicate"]
        ),
        (&json!(0), &json!(1), &json!(false))
    );

    let wrong = run(
        &t.schema,
        &["append", "account-1", "--expected", "0"],
        lines,
    );
    assert_eq!(wrong.status.code(), Some(3), "{}", stderr(&wrong));
    assert!(
        stderr(&wrong).contains("expected version 0, but the stream is at version 1"),
        "{}",
        stderr(&wrong)
    );
    assert!(wrong.stdout.is_empty());
    assert_eq!(t.count_events(), 2);

    let right = run(
        &t.schema,
        &["append", "account-1", "--expected", "1"],
        lines,
    );
    assert!(right.status.success(), "{}", stderr(&right));
    let read = run(
        &t.schema,
        &["read", "account-1", "--backwards", "--limit", "2"],
        "",
    );
    let versions: Vec<u64> = stdout(&read)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, vec![3, 2]);
    Ok(())
}

#[test]
fn a_bad_json_line_in_an_import_names_the_line_and_writes_nothing() -> TestResult {
    let t = TestStore::new("cli_bad_line");
    let input = "{\"stream\":\"a\",\"type\":\"T\",\"data\":{}}\n\
                 {\"stream\":\"a\",\"type\":\"T\",\"data\":{}}\n\
                 {\"stream\":\"a\",\"type\":\"T\",\"data\":{]}\n\
                 {\"stream\":\"a\",\"type\":\"T\",\"data\":{}}\n";
    let out = run(&t.schema, &["import"], input);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 3, column"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert_eq!(t.count_events(), 0);
    Ok(())
}

#[test]
fn tail_piped_into_head_exits_cleanly() -> TestResult {
    let t = TestStore::new("cli_tail");
    for i in 0..3 {
        t.append(
            &format!("s-{i}"),
            ExpectedVersion::NoStream,
            &events("T", 2),
        )?;
    }
    t.wait_all_visible();
    // Six events and `head -n 6`: tail has written everything and waits for more when
    // head exits, so it must notice the closed pipe without writing. And `head -n 5`,
    // where the sixth line meets the closed pipe.
    for n in [5, 6] {
        let script = format!(
            "set -o pipefail; timeout 60 \"$0\" --url \"$1\" --schema \"$2\" tail | head -n {n}"
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .arg(bin())
            .args([&database_url(), &t.schema])
            .stdin(Stdio::null())
            .output()?;
        assert!(
            out.status.success(),
            "tail | head -n {n}: {:?} {}",
            out.status,
            stderr(&out)
        );
        assert_eq!(stdout(&out).lines().count(), n);
    }
    // Two named streams: their four events, then head closes the pipe.
    let script = "set -o pipefail; timeout 60 \"$0\" --url \"$1\" --schema \"$2\" \
                  tail --in-stream s-2 --in-stream s-0 | head -n 4";
    let out = Command::new("bash")
        .args(["-c", script])
        .arg(bin())
        .args([&database_url(), &t.schema])
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{:?} {}", out.status, stderr(&out));
    let streams: Vec<String> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["stream"].to_string())
        .collect();
    assert_eq!(streams, ["\"s-0\"", "\"s-0\"", "\"s-2\"", "\"s-2\""]);
    Ok(())
}

#[test]
fn read_all_stats_and_schema() -> TestResult {
    let t = TestStore::new("cli_misc");
    t.append("order-1", ExpectedVersion::NoStream, &events("Placed", 2))?;
    t.append("order-2", ExpectedVersion::NoStream, &events("Paid", 1))?;
    t.append("lonely", ExpectedVersion::NoStream, &events("Placed", 1))?;
    t.wait_all_visible();

    let out = run(
        &t.schema,
        &["read-all", "--category", "order-", "--type", "Placed"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let streams: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["stream"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();
    assert_eq!(streams, vec!["order-1", "order-1"]);

    // Newest first, and before a position; --backwards with --after is a usage error.
    let all: Vec<RecordedEvent> = t.read_all(ReadAll::from_start())?.collect::<Result<_>>()?;
    let positions = |args: &[&str]| -> Vec<u64> {
        let out = run(&t.schema, args, "");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["position"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(
        positions(&["read-all", "--backwards", "--limit", "2"]),
        [all[3].position, all[2].position]
    );
    let before = all[2].position.to_string();
    assert_eq!(
        positions(&["read-all", "--backwards", "--before", &before]),
        [all[1].position, all[0].position]
    );
    assert_eq!(
        positions(&["read-all", "--backwards", "--type", "Paid"]),
        [all[2].position]
    );
    // Named streams, in the global order.
    assert_eq!(
        positions(&[
            "read-all",
            "--in-stream",
            "lonely",
            "--in-stream",
            "order-1"
        ]),
        [all[0].position, all[1].position, all[3].position]
    );
    assert_eq!(
        positions(&["export", "--in-stream", "order-2"]),
        [all[2].position]
    );
    let out = run(&t.schema, &["read-all", "--in-stream", ""], "");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stream id is empty"),
        "{}",
        stderr(&out)
    );
    for args in [
        &["read-all", "--backwards", "--after", "1"][..],
        &["read-all", "--before", "1"][..],
        &["read-all", "--in-stream", "a", "--category", "a"][..],
        &["tail", "--in-stream", "a", "--stream", "a"][..],
    ] {
        let out = run(&t.schema, args, "");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }

    let stats: Value = serde_json::from_slice(&run(&t.schema, &["stats"], "").stdout)?;
    assert_eq!(
        stats,
        json!({
            "events": 4,
            "streams": 3,
            "head_position": t.head_position()?,
            "held_back_events": 0,
            "held_back_by_pid": null,
            "categories": [
                { "category": "order-", "streams": 2, "events": 3 },
                { "category": null, "streams": 1, "events": 1 },
            ],
        })
    );

    let version = run(&t.schema, &["schema", "version"], "");
    assert_eq!(stdout(&version).trim(), SCHEMA_VERSION.to_string());
    // Printing the schema needs no server.
    let print = assert_cmd::Command::new(bin())
        .args([
            "--url",
            "postgres://nobody@127.0.0.1:1/none",
            "--schema",
            "billing",
        ])
        .args(["schema", "print"])
        .output()?;
    assert!(print.status.success(), "{}", stderr(&print));
    assert!(stdout(&print).contains("CREATE SCHEMA IF NOT EXISTS \"billing\""));
    Ok(())
}

#[test]
fn exit_codes_tell_usage_connection_and_input_errors_apart() -> TestResult {
    let t = TestStore::new("cli_codes");
    let usage = run(&t.schema, &["append"], "");
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    let bad_expected = run(&t.schema, &["append", "s", "--expected", "soon"], "");
    assert_eq!(bad_expected.status.code(), Some(2));
    let bad_schema = run("no such schema", &["stats"], "");
    assert_eq!(bad_schema.status.code(), Some(2), "{}", stderr(&bad_schema));

    let refused = assert_cmd::Command::new(bin())
        .args(["--url", "postgres://postgres@127.0.0.1:1/postgres", "stats"])
        .output()?;
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("127.0.0.1:1"),
        "{}",
        stderr(&refused)
    );

    let empty = run(&t.schema, &["append", "s"], "");
    assert_eq!(empty.status.code(), Some(5), "{}", stderr(&empty));
    let help = assert_cmd::Command::new(bin()).arg("--help").output()?;
    assert!(help.status.success());
    assert!(stdout(&help).contains("EXIT CODES"));
    Ok(())
}

#[test]
fn checkpoints_and_dead_letters_from_the_shell() -> TestResult {
    let t = TestStore::new("cli_admin");
    let written = t.append("acc-1", ExpectedVersion::NoStream, &events("E", 2))?;
    t.save_checkpoint("balances", written.first_position)?;
    crate::common::client().execute(
        &format!(
            "INSERT INTO \"{}\".dead_letters (processor_name, event_id, stream_id,
                 stream_version, global_position, attempts, error)
             VALUES ('mailer', gen_random_uuid(), 'acc-1', 1, $1, 3, 'smtp down')",
            t.schema
        ),
        &[&(written.last_position as i64)],
    )?;

    let out = run(&t.schema, &["checkpoints", "list"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let balances = lines
        .iter()
        .find(|l| l["name"] == "balances")
        .expect("listed");
    assert_eq!(balances["position"], json!(written.first_position));
    assert_eq!(balances["lag"], json!(1));
    assert_eq!(balances["is_running"], json!(false));
    assert!(lines
        .iter()
        .any(|l| l["name"] == "mailer" && l["dead_letters"] == 1));

    let out = run(&t.schema, &["dead-letters", "list", "mailer"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let dead: Value = serde_json::from_str(stdout(&out).trim())?;
    assert_eq!(dead["stream_id"], "acc-1");
    assert_eq!(dead["error"], "smtp down");

    // Moved to the head, then back; without a position or --head a usage error, past
    // the head invalid input.
    let set = |args: &[&str]| {
        run(
            &t.schema,
            &[&["checkpoints", "set", "balances"], args].concat(),
            "",
        )
    };
    let out = set(&["--head"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<Value>(stdout(&out).trim())?,
        json!({ "previous": written.first_position, "position": written.last_position })
    );
    let first = written.first_position.to_string();
    assert!(set(&[&first]).status.success());
    assert_eq!(t.checkpoint("balances")?, Some(written.first_position));
    assert_eq!(set(&[]).status.code(), Some(2));
    let past = (written.last_position + 1).to_string();
    assert_eq!(set(&[&past]).status.code(), Some(5));
    assert_eq!(t.checkpoint("balances")?, Some(written.first_position));

    let out = run(&t.schema, &["checkpoints", "reset", "balances"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(t.checkpoint("balances")?, None);
    let out = run(
        &t.schema,
        &["dead-letters", "delete", "mailer", "--all"],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<Value>(stdout(&out).trim())?["deleted"],
        1
    );
    assert!(t.dead_letters("mailer")?.is_empty());
    // Neither --event nor --all: a usage error.
    let out = run(&t.schema, &["dead-letters", "delete", "mailer"], "");
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn stream_lifecycle_and_retention_from_the_shell() -> TestResult {
    let t = TestStore::new("cli_lifecycle");
    t.append("sensor-1", ExpectedVersion::NoStream, &events("Reading", 5))?;
    t.append("cart-1", ExpectedVersion::NoStream, &events("Added", 3))?;
    t.append("cart-2", ExpectedVersion::NoStream, &events("Added", 2))?;
    t.append("meter-1", ExpectedVersion::NoStream, &events("Reading", 6))?;
    let json_out = |out: &Output| -> Value {
        assert!(out.status.success(), "{}", stderr(out));
        serde_json::from_str(stdout(out).trim()).expect("one JSON value")
    };
    let versions = |stream: &str| -> Vec<u64> {
        t.read_stream(stream, pg_eventstore::ReadStream::forwards())
            .unwrap()
            .map(|e| e.unwrap().version)
            .collect()
    };

    // Metadata: none yet, then set from stdin, then printed; a stale version conflicts.
    let out = run(&t.schema, &["streams", "metadata", "sensor-1"], "");
    assert_eq!(json_out(&out), Value::Null);
    let set_new_metadata = |stdin: &str| {
        run(
            &t.schema,
            &[
                "streams",
                "set-metadata",
                "sensor-1",
                "--expected",
                "no-stream",
            ],
            stdin,
        )
    };
    let out = set_new_metadata(r#"{"$maxCount": 2, "owner": "ops"}"#);
    assert_eq!(json_out(&out), json!({ "version": 0 }));
    let meta = json_out(&run(&t.schema, &["streams", "metadata", "sensor-1"], ""));
    assert_eq!(meta["version"], 0);
    assert_eq!(meta["metadata"], json!({ "$maxCount": 2, "owner": "ops" }));
    assert!(meta["updated_at"].as_str().unwrap().ends_with('Z'));
    let out = set_new_metadata("{}");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // Bad metadata: not JSON, not an object, a bad retention value; nothing changes.
    for bad in ["{", "[1]", r#"{"$maxCount": -1}"#] {
        let out = run(&t.schema, &["streams", "set-metadata", "sensor-1"], bad);
        assert_eq!(out.status.code(), Some(5), "{bad}: {}", stderr(&out));
    }
    assert_eq!(t.stream_metadata("sensor-1")?.unwrap().version, 0);

    // Scavenge applies $maxCount: the newest 2 of 5 stay.
    let report = json_out(&run(&t.schema, &["scavenge"], ""));
    assert_eq!(report["events_removed"], 3, "{report}");
    assert_eq!(versions("sensor-1"), [3, 4]);

    // A snapshot: shown, deleted once, then gone.
    t.save_snapshot("meter-1", 5, &json!({ "total": 42, "unit": "kWh" }))?;
    let snap = json_out(&run(&t.schema, &["snapshots", "show", "meter-1"], ""));
    assert_eq!(snap["version"], 5);
    assert_eq!(snap["state"], json!({ "total": 42, "unit": "kWh" }));
    assert!(snap["created_at"].as_str().unwrap().ends_with('Z'));
    let deleted = |expect: bool| {
        let out = run(&t.schema, &["snapshots", "delete", "meter-1"], "");
        assert_eq!(json_out(&out), json!({ "deleted": expect }));
    };
    deleted(true);
    deleted(false);
    let out = run(&t.schema, &["snapshots", "show", "meter-1"], "");
    assert_eq!(json_out(&out), Value::Null);

    // Truncate keeps versions from --before on.
    let out = run(
        &t.schema,
        &["streams", "truncate", "meter-1", "--before", "4"],
        "",
    );
    assert_eq!(json_out(&out), json!({ "removed": 4 }));
    assert_eq!(versions("meter-1"), [4, 5]);

    // Delete needs --expected; a wrong one conflicts and writes nothing.
    let out = run(&t.schema, &["streams", "delete", "cart-1"], "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(
        &t.schema,
        &["streams", "delete", "cart-1", "--expected", "1"],
        "",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(versions("cart-1"), [0, 1, 2]);
    let out = run(
        &t.schema,
        &["streams", "delete", "cart-1", "--expected", "2"],
        "",
    );
    assert_eq!(json_out(&out)["marker_version"], 3);
    assert!(versions("cart-1").is_empty());

    // A tombstoned stream can never be written again: appending is a conflict.
    let out = run(
        &t.schema,
        &["streams", "tombstone", "cart-2", "--expected", "any"],
        "",
    );
    assert_eq!(json_out(&out)["marker_version"], 2);
    let out = run(
        &t.schema,
        &["append", "cart-2"],
        r#"{"type":"Added","data":{}}"#,
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cart-2"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn consumer_group_members_and_partitions_from_the_shell() -> TestResult {
    let t = TestStore::new("cli_groups");
    t.append("job-1", ExpectedVersion::NoStream, &events("Queued", 3))?;
    let member = t
        .worker("mailer")
        .group(
            pg_eventstore::GroupOptions::new()
                .partitions(4)
                .member_info("host-a")
                .lease_timeout(std::time::Duration::from_secs(3))
                .heartbeat_interval(std::time::Duration::from_millis(100)),
        )
        .spawn(|_| Ok(()))?;
    let lines = |args: &[&str]| -> Vec<Value> {
        let out = run(&t.schema, args, "");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let partitions = loop {
        let p = lines(&["groups", "partitions", "mailer"]);
        if p.len() == 4 && p.iter().all(|p| p["lag"] == 0 && p["owner_alive"] == true) {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "not caught up: {p:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let members = lines(&["groups", "members", "mailer"]);
    assert_eq!(members.len(), 1, "{members:?}");
    let m = &members[0];
    assert_eq!(m["info"], "host-a");
    assert_eq!(m["is_alive"], true);
    assert_eq!(m["partitions"], json!([0, 1, 2, 3]));
    assert!(m["expires_in"].as_f64().unwrap() > 0.0, "{m}");
    assert!(m["heartbeat_at"].as_str().unwrap().ends_with('Z'), "{m}");
    for p in &partitions {
        assert_eq!(p["owner"], m["member_id"], "{p}");
    }
    member.stop()?;
    // A group that does not exist lists nothing; a bad name is invalid input.
    assert!(lines(&["groups", "members", "nobody"]).is_empty());
    let out = run(&t.schema, &["groups", "partitions", ""], "");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    Ok(())
}

/// Exit 4 also for a server that accepts the connection but never answers (a hung
/// server, a full pooler queue): `Error::ConnectTimeout`.
#[test]
fn a_server_that_never_answers_is_exit_4() -> TestResult {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let _hold = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(8).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(held);
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?connect_timeout=1");
    let out = assert_cmd::Command::new(bin())
        .args(["--url", &url, "stats"])
        .timeout(std::time::Duration::from_secs(60))
        .output()?;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    Ok(())
}

/// A closed pipe ends the commands that print JSON values (`checkpoints list`,
/// `dead-letters list`, `groups ...`) as it ends `read-all`: exit 0, nothing on stderr.
#[test]
fn checkpoints_list_into_a_closed_pipe_exits_0() -> TestResult {
    use std::io::Read;
    let t = TestStore::new("cli_pipe");
    crate::common::client().batch_execute(&format!(
        "INSERT INTO \"{}\".checkpoints (processor_name, position)
         SELECT 'processor-with-a-rather-long-name-' || g, 1 FROM generate_series(1, 3000) g",
        t.schema
    ))?;
    let mut child = Command::new(bin())
        .args(["--url", &database_url(), "--schema", &t.schema])
        .args(["checkpoints", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first)?; // then the pipe closes
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    Ok(())
}

/// `tail` ends cleanly on SIGTERM as on SIGINT. Tests cannot see it in the binary they
/// run (the dev-dependency on `ctrlc` enables `termination` for every build of the test
/// run), so this checks what an installed binary is built with: the optional `ctrlc`
/// dependency itself must enable it.
#[test]
fn the_cli_s_ctrlc_handles_sigterm_in_an_installed_build() {
    let manifest = include_str!("../../Cargo.toml");
    let line = manifest
        .lines()
        .find(|l| l.starts_with("ctrlc") && l.contains("optional = true"))
        .expect("the cli feature's ctrlc dependency");
    assert!(line.contains("\"termination\""), "{line}");
}

/// `export` then `import --exported` copies a store whose streams lost events (a delete,
/// a truncation); a plain `import` refuses it with exit 5, says to use `--exported`, and
/// writes nothing.
#[test]
fn export_then_import_exported_copies_a_store_after_a_delete_and_a_truncate() -> TestResult {
    let from = TestStore::new("cli_copy_from");
    let into = TestStore::new("cli_copy_into");
    from.append("keep", ExpectedVersion::NoStream, &events("E", 3))?;
    from.append("gone", ExpectedVersion::NoStream, &events("E", 2))?;
    from.delete_stream("gone", ExpectedVersion::Exact(1))?;
    from.truncate_stream("keep", 1)?;
    from.wait_all_visible();
    let export = run(&from.schema, &["export"], "");
    assert!(export.status.success(), "{}", stderr(&export));
    let lines = stdout(&export);
    let plain = run(&into.schema, &["import"], &lines);
    assert_eq!(plain.status.code(), Some(5), "{}", stderr(&plain));
    assert!(
        stderr(&plain).contains("import --exported"),
        "{}",
        stderr(&plain)
    );
    assert!(all(&into).is_empty());
    let copy = run(&into.schema, &["import", "--exported"], &lines);
    assert!(copy.status.success(), "{}", stderr(&copy));
    for s in ["keep", "gone"] {
        let versions = |t: &TestStore| -> Vec<u64> {
            t.read_stream(s, pg_eventstore::ReadStream::forwards())
                .unwrap()
                .map(|e| e.unwrap().version)
                .collect()
        };
        assert_eq!(versions(&into), versions(&from), "{s}");
        assert_eq!(into.stream_version(s)?, from.stream_version(s)?, "{s}");
    }
    Ok(())
}
