//! The README's example: a bank account as an event stream.
//!
//! `cargo run --example quickstart` (uses `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `DB_SCHEMA` picks the schema).
use pg_eventstore::{Error, EventData, ExpectedVersion, ReadAll, ReadStream, Store};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type")]
enum Account {
    Opened { owner: String },
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
}

impl Account {
    fn event(&self) -> pg_eventstore::Result<EventData> {
        let name = match self {
            Account::Opened { .. } => "Opened",
            Account::Deposited { .. } => "Deposited",
            Account::Withdrawn { .. } => "Withdrawn",
        };
        EventData::new(name, self)
    }
}

fn main() -> Result<(), Error> {
    let store = Store::from_env()?;
    store.migrate()?;

    // A fresh stream per run, so the example can run again and again.
    let stream = format!("account-{}", uuid::Uuid::now_v7().simple());
    let opened = store.append(
        &stream,
        ExpectedVersion::NoStream,
        &[Account::Opened {
            owner: "ada".into(),
        }
        .event()?],
    )?;
    let last = store.append(
        &stream,
        ExpectedVersion::Exact(opened.last_version),
        &[
            Account::Deposited { amount: 100 }.event()?,
            Account::Withdrawn { amount: 30 }.event()?,
        ],
    )?;

    // Optimistic concurrency: a writer that read version 0 cannot append blindly.
    let stale = store.append(
        &stream,
        ExpectedVersion::Exact(0),
        &[Account::Deposited { amount: 1 }.event()?],
    );
    println!("stale append refused: {}", stale.unwrap_err());

    let mut balance = 0i64;
    for event in store.read_stream(&stream, ReadStream::forwards())? {
        match event?.data_as::<Account>()? {
            Account::Opened { owner } => println!("opened by {owner}"),
            Account::Deposited { amount } => balance += amount as i64,
            Account::Withdrawn { amount } => balance -= amount as i64,
        }
    }
    println!(
        "{stream} is at version {}, balance {balance}",
        last.last_version
    );

    let recent = store
        .read_all(ReadAll::backwards().category("account-").max_count(3))?
        .collect::<pg_eventstore::Result<Vec<_>>>()?;
    println!("the log's newest account events: {}", recent.len());
    Ok(())
}
