//! Runs the example programs, so that they cannot rot.
use std::process::Command;

fn run_example(name: &str, args: &[&str], schema: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args(["run", "-q", "--example", name, "--"])
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

/// The README's example, quickstart and projection, run one after the other and again in
/// one schema as a user would run them in the default one: none may trip over the
/// streams or events another one wrote.
#[test]
fn examples_run_again_and_side_by_side() {
    let schema = format!("t_examples_{}", std::process::id());
    let quickstart = run_example("quickstart", &[], &schema);
    let readme = run_example("readme", &[], &schema);
    let readme_again = run_example("readme", &[], &schema);
    let first = run_example("projection", &[], &schema);
    let quickstart_again = run_example("quickstart", &[], &schema);
    let second = run_example("projection", &[], &schema);
    drop_schema(&schema);

    for out in [&quickstart, &quickstart_again] {
        assert!(out.contains("opened by ada"), "{out}");
        assert!(out.contains("is at version 2, balance 70"), "{out}");
        assert!(
            out.contains("stale append refused: wrong expected version"),
            "{out}"
        );
    }
    assert!(readme.contains("v0 Deposited\nv1 Deposited\n"), "{readme}");
    // The second run's subscription catches up over both runs' deposits.
    let deposits = |out: &str| out.lines().filter(|l| l.contains(" wallet-")).count();
    assert_eq!(deposits(&readme), 2, "{readme}");
    assert_eq!(deposits(&readme_again), 4, "{readme_again}");

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

#[test]
fn the_readme_shows_examples_readme() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{dir}/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{dir}/examples/readme.rs")).unwrap();
    let code: String = example
        .lines()
        .filter(|l| !l.starts_with("//!"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        readme.contains(&format!("```rust,no_run\n{code}```")),
        "README.md's example differs from examples/readme.rs"
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
