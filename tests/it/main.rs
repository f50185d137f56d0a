//! The integration tests: one binary, one module per area, all against the PostgreSQL
//! named by `DATABASE_URL`. Each test works in a schema of its own and drops it.

mod common;

mod append;
mod bad_input;
mod checkpoint;
// Needs the crate feature `cli`: `cargo test --features cli --test it cli::`.
#[cfg(feature = "cli")]
mod cli;
mod examples;
mod faults;
mod feed;
mod group;
mod import;
mod lifecycle;
mod lifecycle_edges;
mod loadgen;
mod migrate;
mod ops;
mod read;
mod spans;
mod stress;
mod subscribe;
mod subscribe_stress;
// Needs the crate feature `tls`: `cargo test --features tls --test it tls::`.
#[cfg(feature = "tls")]
mod tls;
mod worker;
