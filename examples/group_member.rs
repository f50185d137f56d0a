//! One member of a consumer group: run it in as many processes (or on as many machines)
//! as you like with the same `--group`, and they share the streams of the log.
//!
//! Its transactional handler keeps a read model (`group_model`: per stream, the last
//! version handled and how many events), a log of every event handled with the member
//! that handled it (`group_log`), and a row in `group_violations` whenever a stream's
//! events arrive out of order: all in the transaction that claims the event, so each
//! event counts exactly once, however often members die, join and take over.
//!
//! ```text
//! cargo run --example group_member -- --group NAME [--partitions 64] [--lease-ms 10000]
//!     [--heartbeat-ms 1000] [--threads 2] [--plain] [--delay-us 0]
//! ```
//!
//! * `--plain`: a plain handler instead (at-least-once): its writes are not in the
//!   claiming transaction, so a takeover can repeat events.
//! * `--delay-us N`: the handler sleeps `N` µs per event (a slower handler).
//!
//! It prints `member <id> pid <pid>` once joined, and a summary when SIGINT or SIGTERM
//! stops it.
use std::time::Duration;

use pg_eventstore::{GroupOptions, OnFailure, RecordedEvent, Store, Worker};

struct Args {
    group: String,
    options: GroupOptions,
    threads: usize,
    plain: bool,
    delay: Duration,
}

fn args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut a = Args {
        group: String::new(),
        options: GroupOptions::new(),
        threads: 2,
        plain: false,
        delay: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--group" => a.group = value()?,
            "--partitions" => a.options = a.options.partitions(value()?.parse()?),
            "--lease-ms" => {
                a.options = a
                    .options
                    .lease_timeout(Duration::from_millis(value()?.parse()?))
            }
            "--heartbeat-ms" => {
                a.options = a
                    .options
                    .heartbeat_interval(Duration::from_millis(value()?.parse()?))
            }
            "--threads" => a.threads = value()?.parse()?,
            "--delay-us" => a.delay = Duration::from_micros(value()?.parse()?),
            "--plain" => a.plain = true,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.group.is_empty() {
        return Err("--group NAME is required".into());
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let store = Store::from_env()?;
    store.migrate()?;
    let s = format!("\"{}\"", store.schema());
    store.pool().get()?.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {s}.group_model (
             stream_id text PRIMARY KEY, last_version bigint NOT NULL, handled bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS {s}.group_log (
             stream_id text NOT NULL, version bigint NOT NULL, member text NOT NULL,
             at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE TABLE IF NOT EXISTS {s}.group_violations (
             stream_id text NOT NULL, version bigint NOT NULL, previous bigint)"
    ))?;
    // One statement per event: the order check, the read model and the log.
    let apply = format!(
        "WITH prev AS (SELECT last_version FROM {s}.group_model WHERE stream_id = $1),
         up AS (INSERT INTO {s}.group_model AS m VALUES ($1, $2, 1)
                ON CONFLICT (stream_id) DO UPDATE
                  SET last_version = excluded.last_version, handled = m.handled + 1),
         log AS (INSERT INTO {s}.group_log (stream_id, version, member) VALUES ($1, $2, $3))
         INSERT INTO {s}.group_violations
         SELECT $1, $2, (SELECT last_version FROM prev)
          WHERE COALESCE((SELECT last_version FROM prev), -1) <> $2 - 1"
    );
    // The log names the process that handled each event.
    let pid = std::process::id().to_string();
    let member = store
        .worker(&args.group)
        .threads(args.threads)
        .on_failure(OnFailure::Stop)
        .retries(10)
        .group(args.options);
    let delay = args.delay;
    let handle = if args.plain {
        let store = store.clone();
        member.spawn(move |event| {
            std::thread::sleep(delay);
            let mut client = store.connection()?;
            client.execute(&apply, &[&event.stream_id, &version(event), &pid])?;
            Ok(())
        })?
    } else {
        member.spawn_transactional(move |tx, event| {
            std::thread::sleep(delay);
            let apply = Worker::prepare_cached(tx, &apply)?;
            tx.execute(&apply, &[&event.stream_id, &version(event), &pid])?;
            Ok(())
        })?
    };
    println!("member {} pid {}", handle.member_id(), std::process::id());

    let stopper = handle.stopper();
    ctrlc::set_handler(move || stopper.stop())?;
    while handle.is_running() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let summary = handle.join()?;
    println!(
        "stopped: handled {}, skipped {}, acquired {}, released {}, lost {}, revoked {}, rejoined {}",
        summary.handled,
        summary.skipped,
        summary.acquired,
        summary.released,
        summary.lost,
        summary.revoked,
        summary.rejoined
    );
    Ok(())
}

fn version(event: &RecordedEvent) -> i64 {
    event.version as i64
}
