//! The README's example: deposits to a wallet, read back, then followed by a
//! subscription. A test checks that the README shows this very code.
//!
//! `cargo run --example readme` (uses `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `DB_SCHEMA` picks the schema).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pg_eventstore::{EventData, ExpectedVersion, ReadStream, Store, SubscribeOptions};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

fn main() -> Result<(), pg_eventstore::Error> {
    let store = Store::from_env()?; // DATABASE_URL, or DB_HOST, DB_PORT, DB_NAME, ...
    store.migrate()?; // safe to run at every start, from many processes

    // A new stream each run: NoStream means "this stream must not exist yet".
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let wallet = format!("wallet-{}", now.as_micros());
    let first = store.append(
        &wallet,
        ExpectedVersion::NoStream,
        &[EventData::new("Deposited", &Deposited { amount: 10 })?],
    )?;
    store.append(
        &wallet,
        ExpectedVersion::Exact(first.last_version),
        &[EventData::new("Deposited", &Deposited { amount: 5 })?],
    )?;

    for event in store.read_stream(&wallet, ReadStream::forwards())? {
        let event = event?;
        println!("v{} {}", event.version, event.event_type);
    }
    // Catch up from the start, then wait for new deposits (here: until a quiet second).
    let options = SubscribeOptions::category("wallet-").event_types(["Deposited"]);
    let mut deposits = store.subscribe(options)?;
    while let Some(event) = deposits.next_timeout(Duration::from_secs(1)) {
        let event = event?;
        let amount = event.data_as::<Deposited>()?.amount;
        println!("{} {} {amount}", event.position, event.stream_id);
    }
    Ok(())
}
