//! Prints the SQL that `Store::migrate` applies, for people who apply SQL by hand:
//! `cargo run --example print_schema -- [schema] [migrations_table] > schema.sql`.
fn main() -> Result<(), pg_eventstore::Error> {
    let mut args = std::env::args().skip(1);
    let schema = args.next().unwrap_or_else(|| "eventstore".into());
    let table = args.next().unwrap_or_else(|| "schema_migrations".into());
    print!("{}", pg_eventstore::migration_sql(&schema, &table)?);
    Ok(())
}
