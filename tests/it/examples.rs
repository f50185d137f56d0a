//! Runs the example programs, so that they cannot rot.
use std::process::Command;

/// Builds an example, runs its binary with `args` in `schema`, and returns its stdout.
fn run_example(name: &str, args: &[&str], schema: &str) -> String {
    let out = Command::new(crate::common::example(name))
        .args(args)
        .env("DB_SCHEMA", schema)
        .output()
        .expect("the example runs");
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

/// Sends `signal` (a `kill` name: TERM, INT, KILL) to a child process.
fn signal(child: &std::process::Child, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}

/// Reads the child's stdout lines until one equals `line`; returns everything read.
fn read_until(lines: &mut impl Iterator<Item = std::io::Result<String>>, line: &str) -> String {
    let mut out = String::new();
    for l in lines {
        let l = l.unwrap();
        out.push_str(&l);
        out.push('\n');
        if l == line {
            return out;
        }
    }
    panic!("the example ended before printing {line:?}:\n{out}");
}

#[test]
fn service_stops_cleanly_on_sigterm_and_sigint() {
    use std::io::BufRead;
    let schema = format!("t_service_{}", std::process::id());
    let binary = crate::common::example("service");
    for (sig, expected) in [("TERM", 3), ("INT", 3)] {
        let mut child = Command::new(&binary)
            .env("DB_SCHEMA", &schema)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the example starts");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut out = read_until(&mut lines, "ready");
        signal(&child, sig);
        for l in lines {
            out.push_str(&l.unwrap());
            out.push('\n');
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "SIG{sig}: {status}\n{out}");
        assert!(
            out.contains(&format!("stopped: handled {expected}, checkpoint Some(")),
            "SIG{sig}:\n{out}"
        );
    }
    // The lock is released and the checkpoint covers all six events.
    let config = pg_eventstore::Config::from_env().unwrap().schema(&schema);
    let store = pg_eventstore::Store::connect(config).unwrap();
    let p = store.processors().unwrap();
    drop_schema(&schema);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].name.as_str(), p[0].lag, p[0].is_running),
        ("service-demo", 0, false)
    );
}

/// Balances by account, in account order.
type Balances = Vec<(String, i64)>;

/// The read model of examples/projection.rs and the sums from the log, by account.
fn balances_and_log(schema: &str) -> (Balances, Balances) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| pg_eventstore::DEFAULT_DATABASE_URL.to_string());
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows = |c: &mut postgres::Client, sql: &str| -> Balances {
        match c.query(sql, &[]) {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(_) => Vec::new(), // not created yet
        }
    };
    let model = rows(
        &mut c,
        &format!("SELECT account, balance FROM \"{schema}\".balances ORDER BY 1"),
    );
    let log = rows(
        &mut c,
        &format!(
            "SELECT stream_id, sum((data->>'amount')::bigint)::bigint FROM \"{schema}\".events \
             WHERE starts_with(stream_id, 'projection-') GROUP BY 1 ORDER BY 1"
        ),
    );
    (model, log)
}

#[test]
fn projection_killed_with_sigkill_mid_run_ends_exactly_once() {
    let schema = format!("t_projection_kill_{}", std::process::id());
    let binary = crate::common::example("projection");
    let mut child = Command::new(&binary)
        .args(["--deposits", "20000"])
        .env("DB_SCHEMA", &schema)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the example starts");
    // Kill it as soon as the read model has taken its first groups of events.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (model, _) = balances_and_log(&schema);
        if model.iter().map(|r| r.1).sum::<i64>() > 0 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the example ended before it was killed"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    signal(&child, "KILL");
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
    let (model, log) = balances_and_log(&schema);
    let (done, total) = (
        model.iter().map(|r| r.1).sum::<i64>(),
        log.iter().map(|r| r.1).sum::<i64>(),
    );
    assert!(done < total, "killed after the end: {done} of {total}");

    // Started again, it finishes the job: every deposit counted exactly once.
    let out = run_example("projection", &[], &schema);
    let (model, log) = balances_and_log(&schema);
    drop_schema(&schema);
    assert!(out.contains("read model matches the log: true"), "{out}");
    assert_eq!(model, log);
    eprintln!("killed at {done} of {total}; {out}");
}
