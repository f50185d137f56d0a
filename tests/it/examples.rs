//! Runs the example programs, so that they cannot rot.
use std::process::Command;

fn run_example(name: &str, args: &[&str], schema: &str) -> String {
    let out = Command::new(crate::common::example(name))
        .args(args)
        .env("DB_SCHEMA", schema)
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "example {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn drop_schema(schema: &str) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| pg_eventstore::DEFAULT_DATABASE_URL.to_string());
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .unwrap();
}

#[test]
fn quickstart_runs() {
    let schema = format!("t_quickstart_{}", std::process::id());
    let out = run_example("quickstart", &[], &schema);
    drop_schema(&schema);
    assert!(out.contains("opened by ada"), "{out}");
    assert!(out.contains("is at version 2, balance 70"), "{out}");
    assert!(
        out.contains("stale append refused: wrong expected version"),
        "{out}"
    );
}

#[test]
fn print_schema_prints_the_schema_dir() {
    let out = run_example("print_schema", &[], "unused");
    let expected = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/eventstore.sql"
    ))
    .unwrap();
    assert_eq!(out, expected);
}

#[test]
fn projection_is_restartable_and_exact() {
    let schema = format!("t_projection_{}", std::process::id());
    let first = run_example("projection", &[], &schema);
    let second = run_example("projection", &[], &schema);
    drop_schema(&schema);
    assert!(first.contains("handled 3 new events"), "{first}");
    assert!(first.contains("projection-a: 11"), "{first}");
    assert!(
        second.contains("handled 3 new events, skipped 0"),
        "{second}"
    );
    assert!(second.contains("projection-a: 22"), "{second}");
    assert!(second.contains("projection-b: 10"), "{second}");
    for out in [&first, &second] {
        assert!(out.contains("read model matches the log: true"), "{out}");
    }
}
