//! `pg-eventstore`: the event store from the shell, for scripts and batch jobs (crate
//! feature `cli`). Everything it does goes through the library's public API; events go
//! in and out as JSON lines (see `pg_eventstore::JsonLines`).
#![warn(rust_2018_idioms)]

use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pg_eventstore::{
    migration_sql, Config, Error, EventData, ExpectedVersion, ImportOptions, JsonLines, ReadAll,
    ReadStream, RecordedEvent, Store, SubscribeOptions,
};
use serde::Serialize;

/// Exit codes: documented in `--help` (EXIT CODES below) and in the README.
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONFLICT: u8 = 3;
const EXIT_CONNECTION: u8 = 4;
const EXIT_INVALID_INPUT: u8 = 5;

const AFTER_HELP: &str = "\
EXAMPLES:
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
    pg-eventstore migrate
    echo '{\"type\":\"Deposited\",\"data\":{\"amount\":10}}' | pg-eventstore append account-1 --expected no-stream
    pg-eventstore read account-1 --backwards --limit 1
    pg-eventstore read-all --category account- --type Deposited --type Withdrawn
    pg-eventstore read-all --backwards --limit 10
    pg-eventstore read-all --in-stream account-1 --in-stream account-2
    pg-eventstore tail --category account- --live | head -n 5
    pg-eventstore export > events.jsonl
    pg-eventstore --schema copy migrate && pg-eventstore --schema copy import --exported < events.jsonl
    pg-eventstore schema print --schema billing > billing.sql
    pg-eventstore checkpoints list
    pg-eventstore checkpoints reset balances
    pg-eventstore checkpoints set welcome-mails --head
    pg-eventstore dead-letters list mailer
    pg-eventstore groups members mailer
    echo '{\"$maxAge\":86400}' | pg-eventstore streams set-metadata sensor-9
    pg-eventstore scavenge
    pg-eventstore streams delete cart-7 --expected 2

EVENTS AS JSON LINES:
    Output: one object per line with id, stream, version, position, type, data,
    metadata (when there is any) and recorded_at (RFC 3339, UTC).
    Input (append, import): type and data are required; metadata and id are optional;
    import also needs stream, keeps recorded_at, and checks version and position (a
    line whose version is not the one the import gives the event, or whose position
    does not increase, is refused); append ignores the other fields. A bad line is
    named by its number.

EXIT CODES:
    0  success (also: tail stopped by Ctrl-C, or its reader went away)
    1  any other error
    2  usage error: bad arguments, or a bad DATABASE_URL / DB_* / schema name
    3  conflict: wrong expected version, event id already used, stream order conflict,
       a tombstoned stream, a processor that is running (checkpoints reset/delete/set)
    4  connection failure: the server cannot be reached, refused us, or went away
    5  invalid input: a bad JSON line, a bad event, too many events for one transaction";

/// The event store from the shell: migrate, append, read, tail, export and import
/// events as JSON lines.
#[derive(Parser, Debug)]
#[command(name = "pg-eventstore", version, after_help = AFTER_HELP)]
struct Cli {
    /// PostgreSQL connection string [default: DATABASE_URL, or DB_HOST, DB_PORT, DB_NAME,
    /// DB_USER, DB_PASSWORD, DB_SSL]
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// The store's schema [default: DB_SCHEMA, or eventstore]
    #[arg(long, global = true, value_name = "NAME")]
    schema: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or upgrade the store's schema (safe to run again); prints what it did.
    Migrate,
    /// Append the JSON lines on stdin to STREAM, atomically; prints the result.
    Append {
        /// The stream to append to.
        stream: String,
        /// The version the stream must be at: a number (its last event's version,
        /// counting from 0), any, no-stream, or exists.
        #[arg(long, value_name = "V", default_value = "any", value_parser = parse_expected)]
        expected: ExpectedVersion,
    },
    /// Print the events of one stream as JSON lines.
    Read {
        /// The stream to read.
        stream: String,
        /// Newest first.
        #[arg(long)]
        backwards: bool,
        /// Start at this version (inclusive).
        #[arg(long, value_name = "V")]
        from: Option<u64>,
        /// At most this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Print all events in the global order (or newest first) as JSON lines.
    ReadAll {
        /// Only events after this global position.
        #[arg(long, value_name = "P", conflicts_with = "backwards")]
        after: Option<u64>,
        /// Newest first.
        #[arg(long)]
        backwards: bool,
        /// With --backwards: only events before this global position.
        #[arg(long, value_name = "P", requires = "backwards")]
        before: Option<u64>,
        #[command(flatten)]
        filters: Filters,
        /// At most this many events.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Follow events as they are appended (history first, unless --live), as JSON lines,
    /// until Ctrl-C or until the reader of its output goes away.
    Tail {
        #[command(flatten)]
        filters: Filters,
        /// Follow one stream, in version order (--after is then a version).
        #[arg(long, value_name = "STREAM", conflicts_with_all = ["category", "types", "in_streams"])]
        stream: Option<String>,
        /// Start after this global position.
        #[arg(long, value_name = "P", conflicts_with = "live")]
        after: Option<u64>,
        /// Only events committed from now on.
        #[arg(long)]
        live: bool,
    },
    /// Write all events (or those the filters select) as JSON lines, for `import`.
    /// A progress bar goes to stderr when it is a terminal.
    Export {
        /// Only events after this global position.
        #[arg(long, value_name = "P")]
        after: Option<u64>,
        #[command(flatten)]
        filters: Filters,
    },
    /// Import the JSON lines on stdin (as `export` writes them) through binary COPY;
    /// prints what it wrote. Atomic unless --chunked. A progress bar goes to stderr when
    /// it is a terminal.
    Import {
        /// Add to streams that already hold events (else they are refused).
        #[arg(long)]
        continue_existing: bool,
        /// Commit every 1,048,576 events (the most one transaction holds) instead of
        /// refusing a larger input; if a later transaction fails, the error says how
        /// many events are committed and how to go on.
        #[arg(long)]
        chunked: bool,
        /// Skip this many events of the input first (to go on after a failed chunked
        /// import).
        #[arg(long, value_name = "N", default_value_t = 0)]
        skip: u64,
        /// The input is an export of a store whose streams lost events (deleted,
        /// tombstoned, truncated, trimmed by retention): take its delete markers and let
        /// each new stream begin at its first exported version, so that the streams read
        /// as they did there.
        #[arg(long)]
        exported: bool,
    },
    /// Counts: events, streams, per category, and the head position, as JSON.
    Stats,
    /// Stream lifecycle: delete, tombstone, truncate, and metadata (retention).
    Streams {
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// Apply every stream's retention ($tb, $maxCount, $maxAge): remove the events it
    /// hides, in short transactions, and print what was done. Run it from cron.
    Scavenge,
    /// A stream's snapshot: show, delete.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
    },
    /// Processors' checkpoints: list, reset, delete, set.
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
    /// A processor's dead letters: list, delete.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// A consumer group's members and partitions.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// The schema's SQL, or its version in the database.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointsCommand {
    /// One JSON line per processor: name, position, lag (events `read-all` would still
    /// give it), stream claims, dead letters, and whether it is running.
    List,
    /// Rebuild a processor from the first event: remove its checkpoint and its
    /// per-stream claims together. Refused (exit 3) while it runs.
    Reset {
        /// The processor name.
        name: String,
    },
    /// Remove a processor's checkpoint only. Refused (exit 3) while it runs.
    Delete {
        /// The processor name.
        name: String,
    },
    /// Move a processor's checkpoint, forwards or back: its next run starts after
    /// POSITION, or after the newest event with --head. Refused (exit 3) while it runs.
    Set {
        /// The processor name.
        name: String,
        /// The global position of the last event to count as done.
        #[arg(required_unless_present = "head", conflicts_with = "head")]
        position: Option<u64>,
        /// The newest event's position: skip everything in the log so far.
        #[arg(long)]
        head: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotsCommand {
    /// Print STREAM's snapshot (version, state, created_at), or null if it has none.
    Show {
        /// The stream.
        stream: String,
    },
    /// Delete STREAM's snapshot (after a change to the state it holds, say); prints
    /// whether there was one.
    Delete {
        /// The stream.
        stream: String,
    },
}

#[derive(Subcommand, Debug)]
enum GroupsCommand {
    /// One JSON line per member of GROUP: id, info, heartbeat, whether its lease is
    /// valid, and the partitions it holds.
    Members {
        /// The group (processor) name.
        group: String,
    },
    /// One JSON line per partition of GROUP: its owner, epoch, checkpoint and lag.
    Partitions {
        /// The group (processor) name.
        group: String,
    },
}

#[derive(Subcommand, Debug)]
enum StreamsCommand {
    /// Soft-delete STREAM: it reads as empty, a later append continues its versions.
    /// Prints the marker event's version and how many events were removed.
    Delete {
        /// The stream to delete.
        stream: String,
        /// The version STREAM must be at: a number, any, no-stream, or exists. Required:
        /// a delete is not undone.
        #[arg(long, value_name = "V", value_parser = parse_expected)]
        expected: ExpectedVersion,
    },
    /// Tombstone STREAM: delete it for good; it can never be written again.
    Tombstone {
        /// The stream to tombstone.
        stream: String,
        /// The version STREAM must be at: a number, any, no-stream, or exists. Required.
        #[arg(long, value_name = "V", value_parser = parse_expected)]
        expected: ExpectedVersion,
    },
    /// Remove STREAM's events before version V (its reads start there at once); prints
    /// how many were removed. The stream's last event is always kept.
    Truncate {
        /// The stream to truncate.
        stream: String,
        /// The first version to keep.
        #[arg(long, value_name = "V")]
        before: u64,
    },
    /// Print STREAM's metadata (version, metadata, updated_at), or null if it has none.
    Metadata {
        /// The stream.
        stream: String,
    },
    /// Set STREAM's metadata to the JSON object on stdin: $maxCount, $maxAge (seconds),
    /// $tb (truncate before), and keys of your own. Prints the metadata's new version.
    SetMetadata {
        /// The stream.
        stream: String,
        /// The version the metadata must be at (its own, from 0): a number, any,
        /// no-stream, or exists.
        #[arg(long, value_name = "V", default_value = "any", value_parser = parse_expected)]
        expected: ExpectedVersion,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLettersCommand {
    /// One JSON line per dead letter of PROCESSOR, in the global order. (Replaying one
    /// needs the processor's handler: `Worker::replay_dead_letters` in its program.)
    List {
        /// The processor name.
        processor: String,
    },
    /// Delete one dead letter (--event ID) or all of them (--all).
    Delete {
        /// The processor name.
        processor: String,
        /// The event id of the dead letter to delete.
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        event: Option<uuid::Uuid>,
        /// Delete every dead letter of the processor.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SchemaCommand {
    /// Print the SQL that creates the schema (for --schema NAME), without connecting.
    Print,
    /// Print the schema version recorded in the database (0: not migrated).
    Version,
}

#[derive(Args, Debug)]
struct Filters {
    /// Only streams whose id starts with this prefix (such as order-).
    #[arg(long, value_name = "PREFIX")]
    category: Option<String>,
    /// Only events of this type (repeat for several).
    #[arg(long = "type", value_name = "TYPE", id = "types")]
    types: Vec<String>,
    /// Only events of this stream, in the global order (repeat for several).
    #[arg(
        long = "in-stream",
        value_name = "STREAM",
        id = "in_streams",
        conflicts_with = "category"
    )]
    in_streams: Vec<String>,
}

impl Filters {
    fn apply(&self, mut options: ReadAll) -> ReadAll {
        if let Some(c) = &self.category {
            options = options.category(c);
        }
        if !self.types.is_empty() {
            options = options.event_types(&self.types);
        }
        if !self.in_streams.is_empty() {
            options = options.streams(&self.in_streams);
        }
        options
    }
}

fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "no-stream" => Ok(ExpectedVersion::NoStream),
        "exists" => Ok(ExpectedVersion::StreamExists),
        n => n
            .parse()
            .map(ExpectedVersion::Exact)
            .map_err(|_| format!("{n:?} is not a version: use a number, any, no-stream or exists")),
    }
}

/// Why the program ends with an error.
enum Failure {
    Store(Error),
    /// Writing to stdout failed for another reason than a closed pipe.
    Output(io::Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): that is how we were told to stop.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            eprintln!("pg-eventstore: cannot write the output: {e}");
            ExitCode::from(EXIT_ERROR)
        }
        Err(Failure::Store(e)) => {
            eprintln!("pg-eventstore: {}", message(&e, &cli));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::WrongExpectedVersion { .. }
        | Error::DuplicateEventId { .. }
        | Error::StreamOrderConflict { .. }
        | Error::FeedOrderConflict { .. }
        | Error::ProcessorLocked { .. }
        | Error::StreamDeleted { .. } => EXIT_CONFLICT,
        Error::Connect { .. } | Error::ConnectTimeout { .. } | Error::Pool { .. } => {
            EXIT_CONNECTION
        }
        // No SQLSTATE: the connection itself failed.
        Error::Postgres(p) if p.as_db_error().is_none() => EXIT_CONNECTION,
        Error::Config(_) => EXIT_USAGE,
        Error::InvalidInput(_) | Error::Json(_) | Error::TransactionTooLarge { .. } => {
            EXIT_INVALID_INPUT
        }
        Error::ImportIncomplete { source, .. } => exit_code(source),
        _ => EXIT_ERROR,
    }
}

/// The error and its causes on one line, each once, with a hint where one helps.
fn message(e: &Error, cli: &Cli) -> String {
    let mut text = e.report();
    match (e, &cli.command) {
        (Error::NotMigrated { .. }, _) => text.push_str(" (pg-eventstore migrate)"),
        (Error::TransactionTooLarge { .. }, Command::Import { .. }) => {
            text.push_str(" (import --chunked commits a larger input in several transactions)")
        }
        (
            Error::InvalidInput(m),
            Command::Import {
                exported: false, ..
            },
        ) if m.contains("reserved for the store's own markers")
            || m.contains("events of the stream are missing") =>
        {
            text.push_str(" (an export of a store whose streams lost events: import --exported)")
        }
        (
            Error::ImportIncomplete {
                committed_events, ..
            },
            Command::Import { skip, .. },
        ) => text.push_str(&format!(
            "\nto go on: pg-eventstore import --chunked --continue-existing --skip {} < FILE",
            skip + committed_events
        )),
        _ => {}
    }
    text
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let out = &mut BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    match &cli.command {
        Command::Schema {
            command: SchemaCommand::Print,
        } => {
            let schema = cli
                .schema
                .clone()
                .or_else(|| std::env::var("DB_SCHEMA").ok().filter(|s| !s.is_empty()))
                .unwrap_or_else(|| "eventstore".into());
            let sql = migration_sql(&schema, "schema_migrations")?;
            out.write_all(sql.as_bytes())?;
        }
        Command::Schema {
            command: SchemaCommand::Version,
        } => writeln!(out, "{}", connect(cli)?.schema_version()?)?,
        Command::Migrate => print_json(out, &connect(cli)?.migrate()?)?,
        Command::Append { stream, expected } => {
            let events = JsonLines::new(io::stdin().lock())
                .default_stream(stream.as_str())
                .map(|e| e.map(|e| e.into_event_data()))
                .collect::<Result<Vec<EventData>, Error>>()?;
            print_json(out, &connect(cli)?.append(stream, *expected, &events)?)?;
        }
        Command::Read {
            stream,
            backwards,
            from,
            limit,
        } => {
            let mut options = if *backwards {
                ReadStream::backwards()
            } else {
                ReadStream::forwards()
            };
            if let Some(v) = from {
                options = options.from_version(*v);
            }
            if let Some(n) = limit {
                options = options.max_count(*n);
            }
            write_events(out, connect(cli)?.read_stream(stream, options)?, None)?;
        }
        Command::ReadAll {
            after,
            backwards,
            before,
            filters,
            limit,
        } => {
            let base = match (backwards, before) {
                (false, _) => start(*after),
                (true, None) => ReadAll::backwards(),
                (true, Some(p)) => ReadAll::backwards_before(*p),
            };
            let mut options = filters.apply(base);
            if let Some(n) = limit {
                options = options.max_count(*n);
            }
            write_events(out, connect(cli)?.read_all(options)?, None)?;
        }
        Command::Export { after, filters } => {
            let store = connect(cli)?;
            let options = filters.apply(start(*after));
            let bar = if io::stderr().is_terminal() {
                let bar = ProgressBar::new(store.count(&options)?);
                bar.set_style(style(
                    "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events \
                     ({rate}, ETA {eta})",
                ));
                Some(bar)
            } else {
                None
            };
            write_events(out, store.read_all(options)?, bar.as_ref())?;
            if let Some(bar) = bar {
                bar.finish();
            }
        }
        Command::Import {
            continue_existing,
            chunked,
            skip,
            exported,
        } => {
            let options = ImportOptions::new()
                .continue_existing_streams(*continue_existing)
                .chunked(*chunked)
                .exported(*exported);
            import(cli, out, options, *skip)?
        }
        Command::Tail {
            filters,
            stream,
            after,
            live,
        } => {
            let mut options = match stream {
                Some(s) => SubscribeOptions::stream(s.as_str()),
                None => {
                    let mut o = SubscribeOptions::all();
                    if let Some(c) = &filters.category {
                        o = SubscribeOptions::category(c.as_str());
                    }
                    if !filters.in_streams.is_empty() {
                        o = SubscribeOptions::streams(&filters.in_streams);
                    }
                    if !filters.types.is_empty() {
                        o = o.event_types(&filters.types);
                    }
                    o
                }
            };
            if let Some(p) = after {
                options = options.after(*p);
            }
            if *live {
                options = options.live();
            }
            tail(&connect(cli)?, options, out)?;
        }
        Command::Stats => print_json(out, &connect(cli)?.stats()?)?,
        Command::Scavenge => print_json(out, &connect(cli)?.scavenge()?)?,
        Command::Snapshots { command } => {
            let store = connect(cli)?;
            match command {
                SnapshotsCommand::Show { stream } => {
                    print_json(out, &store.load_snapshot::<serde_json::Value>(stream)?)?
                }
                SnapshotsCommand::Delete { stream } => {
                    let deleted = store.delete_snapshot(stream)?;
                    print_json(out, &serde_json::json!({ "deleted": deleted }))?
                }
            }
        }
        Command::Groups { command } => {
            let store = connect(cli)?;
            match command {
                GroupsCommand::Members { group } => print_lines(out, store.group_members(group)?)?,
                GroupsCommand::Partitions { group } => {
                    print_lines(out, store.group_partitions(group)?)?
                }
            }
        }
        Command::Streams { command } => streams(cli, command, out)?,
        Command::Checkpoints { command } => {
            let store = connect(cli)?;
            match command {
                CheckpointsCommand::List => print_lines(out, store.processors()?)?,
                CheckpointsCommand::Reset { name } => {
                    print_json(out, &store.reset_processor(name)?)?
                }
                CheckpointsCommand::Delete { name } => {
                    let removed = store.delete_checkpoint(name)?;
                    print_json(out, &serde_json::json!({ "checkpoint": removed }))?
                }
                CheckpointsCommand::Set { name, position, .. } => {
                    // Without a position, clap has made sure that --head was given.
                    let position = match position {
                        Some(p) => *p,
                        None => store.head_position()?.ok_or_else(|| {
                            Error::InvalidInput("the store has no events yet".into())
                        })?,
                    };
                    let previous = store.move_checkpoint(name, position)?;
                    print_json(
                        out,
                        &serde_json::json!({ "previous": previous, "position": position }),
                    )?
                }
            }
        }
        Command::DeadLetters { command } => {
            let store = connect(cli)?;
            match command {
                DeadLettersCommand::List { processor } => {
                    print_lines(out, store.dead_letters(processor)?)?
                }
                DeadLettersCommand::Delete {
                    processor,
                    event: Some(id),
                    ..
                } => {
                    let deleted = u64::from(store.delete_dead_letter(processor, *id)?);
                    print_json(out, &serde_json::json!({ "deleted": deleted }))?
                }
                DeadLettersCommand::Delete { processor, .. } => {
                    let deleted = store.delete_dead_letters(processor)?;
                    print_json(out, &serde_json::json!({ "deleted": deleted }))?
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn start(after: Option<u64>) -> ReadAll {
    after.map_or_else(ReadAll::from_start, ReadAll::after)
}

/// Opens the store named by --url (or the environment) and --schema (or DB_SCHEMA).
fn connect(cli: &Cli) -> Result<Store, Error> {
    let mut config = match &cli.url {
        Some(url) => {
            let config = Config::new(url)?;
            match std::env::var("DB_SCHEMA").ok().filter(|s| !s.is_empty()) {
                Some(schema) => config.schema(schema),
                None => config,
            }
        }
        None => Config::from_env()?,
    };
    if let Some(schema) = &cli.schema {
        config = config.schema(schema);
    }
    // A script needs a connection or two: one to work on, one for the reads that an
    // import or a subscription makes on the side.
    config
        .max_connections(3)
        .min_idle(0)
        .application_name("pg-eventstore-cli")
        .connect()
}

/// A progress bar style; `{rate}` is the events per second (whole numbers).
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid progress template")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        )
}

fn streams(cli: &Cli, command: &StreamsCommand, out: &mut impl Write) -> Result<(), Failure> {
    match command {
        StreamsCommand::Delete { stream, expected } => {
            print_json(out, &connect(cli)?.delete_stream(stream, *expected)?)
        }
        StreamsCommand::Tombstone { stream, expected } => {
            print_json(out, &connect(cli)?.tombstone_stream(stream, *expected)?)
        }
        StreamsCommand::Truncate { stream, before } => {
            let removed = connect(cli)?.truncate_stream(stream, *before)?;
            print_json(out, &serde_json::json!({ "removed": removed }))
        }
        StreamsCommand::Metadata { stream } => {
            print_json(out, &connect(cli)?.stream_metadata(stream)?)
        }
        StreamsCommand::SetMetadata { stream, expected } => {
            let mut input = String::new();
            io::stdin().read_to_string(&mut input).map_err(|e| {
                Error::InvalidInput(format!("cannot read the metadata from stdin: {e}"))
            })?;
            let metadata: serde_json::Value = serde_json::from_str(&input).map_err(|e| {
                Error::InvalidInput(format!("the metadata on stdin is not JSON: {e}"))
            })?;
            let version = connect(cli)?.set_stream_metadata(stream, *expected, &metadata)?;
            print_json(out, &serde_json::json!({ "version": version }))
        }
    }
}

/// One JSON line per item.
fn print_lines<T: Serialize>(out: &mut impl Write, items: Vec<T>) -> Result<(), Failure> {
    items.iter().try_for_each(|item| print_json(out, item))
}

fn print_json<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, value).map_err(|e| match e.io_error_kind() {
        // Writing failed (a closed pipe: `checkpoints list | head -1`), not the value.
        Some(kind) => Failure::Output(io::Error::from(kind)),
        None => Failure::Store(Error::from(e)),
    })?;
    out.write_all(b"\n")?;
    Ok(())
}

fn write_event(out: &mut impl Write, event: &RecordedEvent) -> Result<(), Failure> {
    event.write_json(out)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn write_events(
    out: &mut impl Write,
    events: impl Iterator<Item = Result<RecordedEvent, Error>>,
    bar: Option<&ProgressBar>,
) -> Result<(), Failure> {
    for event in events {
        write_event(out, &event?)?;
        if let Some(bar) = bar {
            bar.inc(1);
        }
    }
    Ok(())
}

fn import(
    cli: &Cli,
    out: &mut impl Write,
    options: ImportOptions,
    skip: u64,
) -> Result<(), Failure> {
    let store = connect(cli)?;
    let stdin = io::stdin().lock();
    let bar = if io::stderr().is_terminal() {
        // The ETA comes from how much of the input has been read, when it is a file.
        let size = input_size();
        let bar = match size {
            Some(bytes) => ProgressBar::new(bytes).with_style(style(
                "{elapsed_precise} [{wide_bar}] {percent}% {msg} (ETA {eta})",
            )),
            None => ProgressBar::new_spinner().with_style(style("{elapsed_precise} {msg}")),
        };
        Some(bar)
    } else {
        None
    };
    let reader: Box<dyn Read> = match &bar {
        Some(bar) => Box::new(bar.wrap_read(stdin)),
        None => Box::new(stdin),
    };
    let mut lines = JsonLines::new(reader);
    for _ in 0..skip {
        match lines.next() {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    let started = std::time::Instant::now();
    let mut count = 0u64;
    let events = lines.inspect(|_| {
        count += 1;
        if let Some(bar) = bar.as_ref().filter(|_| count % 4096 == 0) {
            let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{count} events ({rate:.0}/s)"));
        }
    });
    let summary = store.import_iter(events, options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_json(out, &summary?)
}

/// The size of stdin when it is a regular file (`< file.jsonl`).
fn input_size() -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let fd = io::stdin().as_fd().try_clone_to_owned().ok()?;
        let meta = std::fs::File::from(fd).metadata().ok()?;
        meta.is_file().then_some(meta.len())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Follows a subscription until Ctrl-C (or SIGTERM), or until stdout's reader has gone.
fn tail(store: &Store, options: SubscribeOptions, out: &mut impl Write) -> Result<(), Failure> {
    let mut subscription = store.subscribe(options)?;
    let stopper = subscription.stopper();
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        flag.store(true, Ordering::SeqCst);
        stopper.stop();
    })
    .map_err(|e| Error::Config(format!("cannot handle Ctrl-C: {e}")))?;
    loop {
        // Write what can be had at once, flush before waiting.
        let item = match subscription.try_next() {
            Some(item) => item,
            None => {
                out.flush()?;
                if interrupted.load(Ordering::SeqCst) || subscription.is_stopped() {
                    return Ok(());
                }
                if stdout_is_closed() {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe).into());
                }
                match subscription.next_timeout(Duration::from_millis(200)) {
                    Some(item) => item,
                    None => continue,
                }
            }
        };
        match item {
            Ok(event) => write_event(out, &event)?,
            // The subscription retries after a backoff; say so, and go on.
            Err(e) if e.is_transient() => eprintln!("pg-eventstore: tail: {e} (retrying)"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether stdout is a pipe or socket whose reader has gone: a waiting `tail` notices
/// it without having to write (`tail | head -n 5` ends when `head` does).
fn stdout_is_closed() -> bool {
    #[cfg(unix)]
    {
        let mut fd = libc::pollfd {
            fd: 1,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout; poll only reads and writes `fd`.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
    }
    #[cfg(not(unix))]
    {
        false
    }
}
