//! A projection run as a long-lived service: a worker follows the log until the process
//! gets SIGINT (Ctrl-C) or SIGTERM (`kill`, `docker stop`, systemd), then stops cleanly —
//! the events in flight finish, the checkpoint is written, the lock is released — and
//! exits 0.
//!
//! `cargo run --example service` — it appends a few events of its own first, prints
//! `ready` once it has handled them, and a summary when it stops.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pg_eventstore::{EventData, ExpectedVersion, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::from_env()?;
    store.migrate()?;
    for i in 0..3 {
        let event = EventData::json("Pinged", serde_json::json!({ "i": i }));
        store.append("service-demo", ExpectedVersion::Any, &[event])?;
    }
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let worker = store
        .worker("service-demo")
        .category("service-")
        .threads(2)
        .spawn(move |event| {
            counter.fetch_add(1, Ordering::Relaxed);
            println!("handled {} v{}", event.stream_id, event.version);
            Ok(())
        })?;

    // The signal handler runs on a thread of its own; all it does is ask for the stop.
    let stopper = worker.stopper();
    ctrlc::set_handler(move || stopper.stop())?;

    // Wait for our own three events, so that a caller knows the service is up.
    while handled.load(Ordering::Relaxed) < 3 && worker.is_running() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    println!("ready");

    // Returns once a signal stopped the worker (or a fatal error did).
    let summary = worker.join()?;
    println!(
        "stopped: handled {}, checkpoint {:?}",
        summary.handled, summary.checkpoint
    );
    Ok(())
}
