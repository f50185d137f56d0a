//! A read model built by a worker: account balances in a table, updated in the same
//! transaction as the worker's claim on each event, so every event counts exactly once,
//! however often the program is stopped and started again.
//!
//! `cargo run --example projection` — each run appends a few deposits, then brings the
//! `balances` table up to date with everything in the log and checks it against the log.
//! `-- --deposits N` appends `N` more deposits over 100 accounts first (a test kills the
//! program with `kill -9` in the middle of such a run, then runs it again).
use std::collections::BTreeMap;

use pg_eventstore::{EventData, ExpectedVersion, OnFailure, ReadAll, Store, Worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: i64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::from_env()?;
    store.migrate()?;
    let schema = store.schema().to_string();
    // Connections for our own statements come from the store when needed, not held
    // across the run: `Store::connection` checks one that sat idle (the server may have
    // closed it meanwhile, with `idle_session_timeout`, say).
    store.connection()?.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS \"{schema}\".balances (
             account text PRIMARY KEY,
             balance bigint NOT NULL)"
    ))?;

    let args: Vec<String> = std::env::args().collect();
    let deposits: usize = match args.iter().position(|a| a == "--deposits") {
        Some(i) => args
            .get(i + 1)
            .ok_or("--deposits needs a number")?
            .parse()?,
        None => 0,
    };
    for (k, chunk) in (0..deposits).collect::<Vec<_>>().chunks(100).enumerate() {
        let events = chunk
            .iter()
            .map(|i| {
                EventData::new(
                    "Deposited",
                    &Deposited {
                        amount: (*i % 7) as i64 + 1,
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let account = format!("projection-many-{}", k % 100);
        store.append(&account, ExpectedVersion::Any, &events)?;
    }

    // New events for this run.
    for (account, amount) in [
        ("projection-a", 10),
        ("projection-b", 5),
        ("projection-a", 1),
    ] {
        store.append(
            account,
            ExpectedVersion::Any,
            &[EventData::new("Deposited", &Deposited { amount })?],
        )?;
    }

    let upsert = format!(
        "INSERT INTO \"{schema}\".balances (account, balance) VALUES ($1, $2)
         ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance"
    );
    let summary = store
        .worker("balances")
        .category("projection-")
        .threads(2)
        .on_failure(OnFailure::Stop)
        .run_batch_transactional(move |tx, event| {
            let deposit: Deposited = event.data_as()?;
            // Prepared once per pooled connection, not on every call.
            let upsert = Worker::prepare_cached(tx, &upsert)?;
            tx.execute(&upsert, &[&event.stream_id, &deposit.amount])?;
            Ok(())
        })?;
    println!(
        "handled {} new events, skipped {} already applied",
        summary.handled, summary.skipped
    );

    // The read model against the log itself.
    let mut from_log = BTreeMap::new();
    for event in store.read_all(ReadAll::from_start().category("projection-"))? {
        let event = event?;
        *from_log.entry(event.stream_id.clone()).or_insert(0i64) +=
            event.data_as::<Deposited>()?.amount;
    }
    let from_table: BTreeMap<String, i64> = store
        .connection()?
        .query(
            &format!("SELECT account, balance FROM \"{schema}\".balances"),
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (account, balance) in &from_table {
        println!("{account}: {balance}");
    }
    println!("read model matches the log: {}", from_table == from_log);
    Ok(())
}
