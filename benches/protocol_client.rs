//! The client of `benches/protocol_instructions.sh`: runs `N` appends of one kind on one
//! connection, each its own transaction, and prints the process id of the server backend
//! that runs them, so that the script can read that backend's instruction count.
//!
//! ```text
//! cargo bench --bench protocol_client -- MODE N
//! ```
//!
//! `PROTOCOL_CLIENT_URL` names the server, which the script starts for the run and
//! removes after: the client migrates the store's schema `eventstore` and drops and
//! creates the raw table `public.raw_events` there. Modes:
//!
//! * `raw-in-tx`: the A workloads' raw side, a prepared `INSERT` that computes the next
//!   version, in a transaction of its own.
//! * `append-in`: `Store::append_in` with `ExpectedVersion::Any` in a transaction (the
//!   call unprepared, as `append_in` sends it).
//! * `prepared-appends`: `PreparedAppends::append`, the same with the call prepared.
//! * `pool-exact`: `Store::append` with `ExpectedVersion::Exact` (W1's statement), after
//!   a first append to each of the 1,000 streams; the backend is the pool's one
//!   connection.
//! * `raw-autocommit`: W1's raw side, a prepared `INSERT ... VALUES` with the version
//!   known, after the same first appends.
//!
//! Each mode appends one event of about 20 bytes of JSON to stream `s-{i % 1000}`.
//! Without arguments (as `cargo bench` runs every bench) it does nothing.
use pg_eventstore::{Config, EventData, ExpectedVersion};
use postgres::types::Json;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [mode, n] = match &args[..] {
        [mode, n] => [mode.clone(), n.clone()],
        _ => {
            eprintln!("usage: protocol_client MODE N (see benches/protocol_instructions.sh)");
            return Ok(());
        }
    };
    let n: usize = n.parse()?;
    // Only the script's throwaway server: this drops and creates tables.
    let url = std::env::var("PROTOCOL_CLIENT_URL")
        .map_err(|_| "PROTOCOL_CLIENT_URL is not set (run benches/protocol_instructions.sh)")?;
    let store = Config::new(&url)?
        .schema("eventstore")
        .max_connections(1)
        .connect()?;
    store.migrate()?;
    let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
    client.batch_execute(
        "DROP TABLE IF EXISTS public.raw_events;
         CREATE TABLE public.raw_events (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id uuid NOT NULL UNIQUE, stream_id text NOT NULL, version bigint NOT NULL,
            event_type text NOT NULL, data jsonb NOT NULL, metadata jsonb,
            recorded_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream_id, version))",
    )?;
    let backend = |c: &mut postgres::Client| -> Res<i32> {
        Ok(c.query_one("SELECT pg_backend_pid()", &[])?.get(0))
    };
    let no_metadata = None::<Json<serde_json::Value>>;
    let data = |i: usize| serde_json::json!({ "a": 1, "i": i });
    match mode.as_str() {
        "raw-in-tx" | "append-in" | "prepared-appends" => {
            println!("{}", backend(&mut client)?);
            let insert = client.prepare(
                "INSERT INTO public.raw_events (event_id, stream_id, version, event_type, data, metadata)
                 SELECT $1, $2, COALESCE(max(version), -1) + 1, $3, $4, $5
                   FROM public.raw_events WHERE stream_id = $2",
            )?;
            let mut prepared = store.prepared_appends();
            for i in 0..n {
                let stream = format!("s-{}", i % 1000);
                let mut tx = client.transaction()?;
                let event = [EventData::json("E", data(i))];
                match mode.as_str() {
                    "raw-in-tx" => {
                        let id = uuid::Uuid::now_v7();
                        let params: [&(dyn postgres::types::ToSql + Sync); 5] =
                            [&id, &stream, &"E", &Json(data(i)), &no_metadata];
                        tx.execute(&insert, &params)?;
                    }
                    "append-in" => {
                        store.append_in(&mut tx, &stream, ExpectedVersion::Any, &event)?;
                    }
                    _ => {
                        prepared.append(&mut tx, &stream, ExpectedVersion::Any, &event)?;
                    }
                }
                tx.commit()?;
            }
        }
        "pool-exact" | "raw-autocommit" => {
            if mode == "pool-exact" {
                println!("{}", backend(&mut *store.pool().get()?)?);
            } else {
                println!("{}", backend(&mut client)?);
            }
            let values = client.prepare(
                "INSERT INTO public.raw_events (event_id, stream_id, version, event_type, data, metadata)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )?;
            // A first append to each stream, then `n` with the version known.
            for i in 0..1000 + n {
                let stream = format!("s-{}", i % 1000);
                let version = (i / 1000) as u64;
                if mode == "pool-exact" {
                    let expected = match version {
                        0 => ExpectedVersion::NoStream,
                        v => ExpectedVersion::Exact(v - 1),
                    };
                    store.append(&stream, expected, &[EventData::json("E", data(i))])?;
                } else {
                    let (id, version) = (uuid::Uuid::now_v7(), version as i64);
                    let params: [&(dyn postgres::types::ToSql + Sync); 6] =
                        [&id, &stream, &version, &"E", &Json(data(i)), &no_metadata];
                    client.execute(&values, &params)?;
                }
            }
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    Ok(())
}
