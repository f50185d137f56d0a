//! Connection and store settings: a consuming builder and [`Config::from_env`].

use std::env;
use std::time::Duration;

use postgres::config::SslMode;

use crate::error::{Error, Result};

/// The connection string used when neither `DATABASE_URL` nor `DB_HOST` is set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Settings for a [`Store`](crate::Store). Every setter documents its default.
///
/// ```no_run
/// use std::time::Duration;
/// use pg_eventstore::Config;
///
/// let store = Config::new("postgres://postgres@127.0.0.1/postgres")?
///     .schema("billing")
///     .max_connections(4)
///     .statement_timeout(Duration::from_secs(30))
///     .connect()?;
/// # Ok::<(), pg_eventstore::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) pg: postgres::Config,
    pub(crate) schema: String,
    pub(crate) migrations_table: String,
    pub(crate) max_connections: u32,
    pub(crate) min_idle: u32,
    pub(crate) connection_timeout: Duration,
    pub(crate) max_retries: u32,
    pub(crate) retry_delay: Duration,
    pub(crate) health_check_interval: Option<Duration>,
    pub(crate) danger_accept_invalid_certs: bool,
    pub(crate) tls_root_certificates: Vec<Vec<u8>>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) read_page_size: u32,
    pub(crate) read_snapshot_max_age: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) read_all_wait: Duration,
    pub(crate) held_back_warning: Duration,
    pub(crate) notify_on_append: bool,
}

/// `keepalives_idle` when neither the connection string nor [`Config::keepalives_idle`]
/// sets it.
pub(crate) const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// `keepalives_interval` when nothing sets it.
pub(crate) const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// `keepalives_retries` when nothing sets it.
pub(crate) const DEFAULT_KEEPALIVES_RETRIES: u32 = 3;
/// `tcp_user_timeout` when nothing sets it.
pub(crate) const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

impl Config {
    /// Settings for the database at `url`, a `postgres://` URL or a `key=value` string
    /// as `postgres::Config` parses them.
    pub fn new(url: &str) -> Result<Config> {
        let pg: postgres::Config = url.parse().map_err(|e| {
            Error::Config(format!(
                "cannot parse the connection string: {}",
                crate::error::chain(&e)
            ))
        })?;
        Ok(Config::from_pg(pg))
    }

    /// Settings for a `postgres::Config` built by hand.
    pub fn from_pg(pg: postgres::Config) -> Config {
        Config {
            pg,
            schema: "eventstore".into(),
            migrations_table: "schema_migrations".into(),
            max_connections: 10,
            min_idle: 1,
            connection_timeout: Duration::from_secs(5),
            max_retries: 5,
            retry_delay: Duration::from_millis(50),
            health_check_interval: None,
            danger_accept_invalid_certs: false,
            tls_root_certificates: Vec::new(),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            statement_timeout: None,
            read_page_size: 4000,
            read_snapshot_max_age: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            read_all_wait: Duration::from_secs(10),
            held_back_warning: Duration::from_secs(5),
            notify_on_append: true,
        }
    }

    /// Settings from the environment.
    ///
    /// `DATABASE_URL` wins when set. Otherwise the connection is put together from
    /// `DB_HOST` (default `127.0.0.1`), `DB_PORT` (5432), `DB_NAME`
    /// (`postgres`), `DB_USER` (`postgres`) and `DB_PASSWORD`. `DB_MAX_CONNECTIONS` (10),
    /// `DB_SSL` and `DB_SCHEMA` apply in both cases, but `DB_SSL=false` never weakens a
    /// URL's `sslmode=require`: that pair is an error naming both.
    ///
    /// `DB_SSL=true` (or `sslmode=require` in the URL) needs the crate feature `tls`;
    /// without it, it is an error rather than a plain-text connection.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|k| env::var(k).ok())
    }

    pub(crate) fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let url = var("DATABASE_URL");
        let from_url = url.is_some();
        let mut config = match url {
            Some(url) => {
                Config::new(&url).map_err(|e| Error::Config(format!("DATABASE_URL: {e}")))?
            }
            None => {
                let mut pg = postgres::Config::new();
                pg.host(var("DB_HOST").as_deref().unwrap_or("127.0.0.1"));
                let port = match var("DB_PORT") {
                    Some(p) => p.trim().parse::<u16>().map_err(|_| {
                        Error::Config(format!("DB_PORT must be a port number, not {p:?}"))
                    })?,
                    None => 5432,
                };
                pg.port(port);
                pg.dbname(var("DB_NAME").as_deref().unwrap_or("postgres"));
                pg.user(var("DB_USER").as_deref().unwrap_or("postgres"));
                if let Some(pw) = var("DB_PASSWORD") {
                    pg.password(pw);
                }
                Config::from_pg(pg)
            }
        };
        if let Some(n) = var("DB_MAX_CONNECTIONS") {
            let n = n
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "DB_MAX_CONNECTIONS must be a whole number above 0, not {n:?}"
                    ))
                })?;
            config = config.max_connections(n);
        }
        if let Some(ssl) = var("DB_SSL") {
            match ssl.trim().to_ascii_lowercase().as_str() {
                "false" | "0" | "no" | "off" | "disable" => {
                    let mode = config.pg.get_ssl_mode();
                    if from_url && !matches!(mode, SslMode::Disable | SslMode::Prefer) {
                        return Err(Error::Config(format!(
                            "DB_SSL={ssl} would turn off the TLS that DATABASE_URL requires \
                             (sslmode={mode:?}): remove one of the two"
                        )));
                    }
                    config.pg.ssl_mode(SslMode::Disable);
                }
                "true" | "1" | "yes" | "on" | "require" => {
                    config.pg.ssl_mode(SslMode::Require);
                }
                other => {
                    return Err(Error::Config(format!(
                        "DB_SSL must be true or false, not {other:?}"
                    )))
                }
            }
        }
        if let Some(schema) = var("DB_SCHEMA") {
            config = config.schema(schema);
        }
        Ok(config)
    }

    /// The PostgreSQL schema that holds the store's tables. Default `eventstore`.
    /// It must be a plain identifier: ASCII letters, digits and `_`, not starting with a
    /// digit, at most 63 bytes; anything else is refused when the store connects.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The name of the migration history table, in the store's schema.
    /// Default `schema_migrations`; the same rules as [`Config::schema`].
    pub fn migrations_table(mut self, table: impl Into<String>) -> Self {
        self.migrations_table = table.into();
        self
    }

    /// The `application_name` the store's connections show in `pg_stat_activity`.
    /// Default `pg-eventstore`, unless the connection string sets one.
    pub fn application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }

    /// The most connections the pool opens. Default 10.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How many idle connections the pool keeps open. Default 1, so a script opens
    /// only the connections it uses.
    pub fn min_idle(mut self, n: u32) -> Self {
        self.min_idle = n;
        self
    }

    /// How long to wait for a pooled connection (and to open a new one). Default 5 s;
    /// zero is refused when the store connects.
    ///
    /// When it runs out, the error is [`Error::Pool`] and says whether the pool was
    /// exhausted (every connection in use) or no connection could be opened (with the
    /// cause, such as "connection refused").
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long opening one connection may take, per configured host: the name lookup,
    /// the TCP connect, the TLS handshake, authentication and the server's answer to the
    /// startup message. Default: the `connect_timeout` of the connection string, or else
    /// [`Config::connection_timeout`].
    ///
    /// It bounds every connection the store opens: [`Store::connect`](crate::Store::connect), the pool's, the
    /// listener's, the notifier's and the health check's. A server that accepts the TCP
    /// connection and never answers (a hung server, a pooler whose queue is full) gives
    /// [`Error::ConnectTimeout`], naming the server. A health check also waits at most
    /// twice this long for its query.
    ///
    /// Once a connection is open, nothing on the client side limits how long a query may
    /// wait for its answer, since a query that waits for a lock cannot be told from a
    /// server that stopped. A server or network that died is found by TCP keepalives
    /// ([`Config::keepalives_idle`]; about a minute with the defaults) and by
    /// [`Config::tcp_user_timeout`] for data sent and never acknowledged; a server that
    /// is alive but stopped answering (a stopped process, a disk that hangs) keeps a
    /// query waiting until it answers, and [`Config::statement_timeout`] bounds only what
    /// the server itself does.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.pg.connect_timeout(timeout);
        self
    }

    /// How long a connection may be idle before TCP keepalive probes start. Default 30 s
    /// (the operating system's default is 2 hours), unless the connection string sets
    /// `keepalives_idle`. Keepalives find a server or network path that died silently,
    /// which would otherwise leave a call waiting for hours.
    pub fn keepalives_idle(mut self, idle: Duration) -> Self {
        self.pg.keepalives_idle(idle);
        self
    }

    /// The time between TCP keepalive probes. Default 10 s, unless the connection string
    /// sets `keepalives_interval`.
    pub fn keepalives_interval(mut self, interval: Duration) -> Self {
        self.pg.keepalives_interval(interval);
        self
    }

    /// How many unanswered keepalive probes mark the connection dead. Default 3, unless
    /// the connection string sets `keepalives_retries`. With the defaults a dead idle
    /// connection is noticed after about a minute.
    pub fn keepalives_retries(mut self, retries: u32) -> Self {
        self.pg.keepalives_retries(retries);
        self
    }

    /// How long sent data may stay unacknowledged before the connection is dropped
    /// (`TCP_USER_TIMEOUT`, Linux only). Default 60 s, unless the connection string sets
    /// `tcp_user_timeout`. This catches a dead server while a request is in flight,
    /// where keepalives do not apply.
    pub fn tcp_user_timeout(mut self, timeout: Duration) -> Self {
        self.pg.tcp_user_timeout(timeout);
        self
    }

    /// How often a call that failed for a transient reason is tried again. Default 5.
    /// `0` turns retries off.
    ///
    /// Transient means: the connection was refused, reset or closed, the server is
    /// shutting down or starting up (SQLSTATE 57P01, 57P02, 57P03), too many connections
    /// (53300), a serialization failure (40001), a deadlock (40P01), or a `lock_timeout`
    /// that ran out (55P03: waiting for a stream's lock, say). Reads are always
    /// retried (a read that already yielded events goes on after the last one it
    /// yielded). Appends are retried with the same event ids, which makes them
    /// idempotent: an append whose first attempt did commit before its connection died
    /// comes back with [`AppendResult::was_duplicate`](crate::AppendResult::was_duplicate)
    /// set instead of writing twice. A wrong expected version is never retried, and
    /// neither is [`Store::append_in`](crate::Store::append_in) (the caller owns that transaction), an exhausted
    /// pool, or [`Store::connect`](crate::Store::connect) (it fails fast, so that a wrong address shows at once).
    ///
    /// While the server is down each attempt waits up to [`Config::connection_timeout`]
    /// for a connection, so a call gives up after about `(max_retries + 1) ×
    /// connection_timeout` plus the backoff: 30 s with the defaults.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The wait before the first retry. Default 50 ms. Each further retry waits twice
    /// as long as the one before (at most 30 s), and every wait is shortened by a random
    /// part of up to a half, so that many clients do not retry in step.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// Checks the connection to the server every `interval` on a background thread and
    /// reports an outage and its end through [`Store::connection_events`](crate::Store::connection_events). Default: off
    /// (`None`); then only calls to [`Store::health_check`](crate::Store::health_check) update the connection state.
    /// The thread ends when the last clone of the [`Store`](crate::Store) is dropped.
    pub fn health_check_interval(mut self, interval: Option<Duration>) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// Accepts any server certificate, even an expired, self-signed or wrong-host one.
    /// Default `false`: certificates are verified against the system's trusted roots
    /// and any added with [`Config::tls_root_certificate`]. Only for tests and
    /// throwaway servers: it lets anyone on the path read and change the traffic.
    /// Applies with the crate feature `tls` only.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.danger_accept_invalid_certs = accept;
        self
    }

    /// Trusts this PEM-encoded certificate as a root, besides the system's roots: for
    /// a server whose certificate a private CA signed. May be called more than once.
    /// Applies with the crate feature `tls` only; a bad PEM is refused when connecting.
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificates.push(pem.into());
        self
    }

    /// Idle connections above `min_idle` are closed after this long. Default 10 min;
    /// `None` keeps them. Zero is refused when the store connects.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Connections are closed and replaced after this long. Default 30 min; `None`
    /// keeps them forever. Zero is refused when the store connects.
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// PostgreSQL's `statement_timeout` for the store's connections, in whole
    /// milliseconds (a nonzero timeout below one millisecond counts as one; zero turns
    /// the timeout off, as in PostgreSQL). Default: none (the server's setting applies).
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// How many events a read fetches per round trip. Default 4000. A read that goes past
    /// its first page holds up to three pages at a time (the one being yielded, one
    /// handed over, one being fetched): about 1.2 MiB of peak memory per 1,000 events of
    /// page size with the load generator's events (~210 bytes of data), 11 MiB of peak
    /// RSS for a whole process reading 1,000,000 events at the default. Larger pages cost
    /// fewer round trips, in which the server waits for the next fetch: in six alternated
    /// rounds reading 300,000 events, pages of 4,000 ran at 0.90–1.07 of a lean reader's
    /// single query, pages of 1,000 at 0.72–0.90.
    pub fn read_page_size(mut self, n: u32) -> Self {
        self.read_page_size = n;
        self
    }

    /// How long a read that goes on past its first page may keep one snapshot. Such a
    /// read fetches its pages in a read-only transaction, and while that
    /// transaction is open its snapshot holds back `VACUUM` and HOT pruning in the whole
    /// database. A read never waits for you inside that transaction: when you have not
    /// taken the page it fetched ahead, it ends the transaction at once and fetches the
    /// next page in a new one (after the last event it fetched) when you do. This setting
    /// bounds a read that you keep up with: it ends the transaction and goes on in a new
    /// one once the snapshot is this old, so that even a fast consumer of millions of
    /// events never holds a snapshot for longer. The order is unchanged and no event is
    /// skipped or repeated; a `$all` read still ends at the horizon it found on its first
    /// page. Default: 1 s; zero starts a new transaction for every page.
    ///
    /// A page that has waited this long for you also gives the read's connection back to
    /// the pool until you take it, so reads you have paused (a slow consumer, an iterator
    /// put aside) do not use up the pool's [`max_connections`](Config::max_connections).
    /// The read then needs a pool connection to go on, and fails like any other call if
    /// none comes within [`connection_timeout`](Config::connection_timeout).
    pub fn read_snapshot_max_age(mut self, age: Duration) -> Self {
        self.read_snapshot_max_age = age;
        self
    }

    /// How long [`Store::read_all`](crate::Store::read_all) waits, by default, for events
    /// committed before the call that an open appending transaction still holds back
    /// (see [`Store::feed_status`](crate::Store::feed_status)), before it fails with
    /// [`Error::HeldBack`] naming that transaction. A read never returns short without
    /// saying so; [`ReadAll::visible_now`](crate::ReadAll::visible_now) reads only what is
    /// visible at once instead. Default: 10 s.
    pub fn read_all_wait(mut self, wait: Duration) -> Self {
        self.read_all_wait = wait;
        self
    }

    /// How long subscriptions and workers may be held back by an open appending
    /// transaction before the store logs a `tracing` warning that names it (once per
    /// blocker). The state is always in [`Store::health_check`](crate::Store::health_check)
    /// and the metric `pg_eventstore_feed_held_back_seconds`. Default: 5 s.
    pub fn held_back_warning(mut self, after: Duration) -> Self {
        self.held_back_warning = after;
        self
    }

    /// How often caught-up subscriptions look at the table even without a wake-up: the
    /// safety net for notifications lost while the listener reconnects, or sent by
    /// writers that do not notify. Default 1 s.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Whether appends through the pool tell subscribers in other processes, with one
    /// coalesced `NOTIFY` sent by a background thread on its own connection after the
    /// append committed, or, by at most one append per millisecond, in the append's own
    /// statement. Default `true`. The
    /// thread sends nothing while no other process listens on the store's channel: it
    /// looks at `pg_stat_activity` once a second (a backend whose query it may not read
    /// counts as a listener), so a subscriber that starts elsewhere is woken by `NOTIFY`
    /// within about a second, and finds the events by its own catch-up and safety poll
    /// before that. With `false` other processes find new events at their safety poll
    /// only; subscribers of this store are woken directly either way.
    /// The same holds for [`Store::append_in`](crate::Store::append_in): the store's
    /// commit watcher learns when the caller's transaction commits, and then wakes this
    /// store's subscribers and (with `true`, while another process listens) sends the
    /// `NOTIFY` itself, in the query that found the commit; with `true`, at most one
    /// `append_in` per millisecond sends it in the caller's transaction instead. With
    /// `false`, `append_in` never sends a `NOTIFY` in the caller's transaction, which
    /// two-phase commit (`PREPARE TRANSACTION`) requires.
    pub fn notify_on_append(mut self, notify: bool) -> Self {
        self.notify_on_append = notify;
        self
    }

    /// The PostgreSQL connection settings.
    pub fn pg_config(&self) -> &postgres::Config {
        &self.pg
    }

    /// Checks what can be checked without a server and fills in connection defaults.
    pub(crate) fn finish(&self) -> Result<postgres::Config> {
        crate::sql::check_identifier("schema", &self.schema)?;
        crate::sql::check_identifier("migrations table", &self.migrations_table)?;
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.min_idle > self.max_connections {
            return Err(Error::Config(format!(
                "min_idle ({}) is larger than max_connections ({})",
                self.min_idle, self.max_connections
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config("poll_interval must be above zero".into()));
        }
        if self.read_page_size == 0 {
            return Err(Error::Config("read_page_size must be at least 1".into()));
        }
        // The pool refuses zero durations with a panic: refuse them here, by name.
        if self.connection_timeout.is_zero() {
            return Err(Error::Config(
                "connection_timeout must be above zero".into(),
            ));
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config(
                "idle_timeout must be above zero (None keeps idle connections)".into(),
            ));
        }
        if self.max_lifetime.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config(
                "max_lifetime must be above zero (None keeps connections forever)".into(),
            ));
        }
        if self.health_check_interval.is_some_and(|i| i.is_zero()) {
            return Err(Error::Config(
                "health_check_interval must be above zero (None turns it off)".into(),
            ));
        }
        let mut pg = self.pg.clone();
        check_ssl_mode(&mut pg)?;
        if pg.get_application_name().is_none() {
            pg.application_name("pg-eventstore");
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(self.connection_timeout);
        }
        // A half-open TCP connection must not stall a caller for hours.
        pg.keepalives(true);
        if pg.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            pg.keepalives_idle(DEFAULT_KEEPALIVES_IDLE);
        }
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval(DEFAULT_KEEPALIVES_INTERVAL);
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(DEFAULT_KEEPALIVES_RETRIES);
        }
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
        }
        if let Some(t) = self.statement_timeout {
            let mut options = pg.get_options().unwrap_or("").to_string();
            if !options.is_empty() {
                options.push(' ');
            }
            // In whole milliseconds, PostgreSQL's unit; a timeout below one is one, not
            // zero (which turns the timeout off).
            let millis = if t.is_zero() { 0 } else { t.as_millis().max(1) };
            options.push_str(&format!("-c statement_timeout={millis}"));
            pg.options(&options);
        }
        Ok(pg)
    }
}

/// Refuses TLS that cannot be had, and turns `prefer` into `disable` (see the `tls` module docs).
pub(crate) fn check_ssl_mode(pg: &mut postgres::Config) -> Result<()> {
    let mode = pg.get_ssl_mode();
    if mode == SslMode::Prefer {
        pg.ssl_mode(SslMode::Disable);
    }
    if mode == SslMode::Require && !cfg!(feature = "tls") {
        return Err(Error::Config(
            "TLS was requested (DB_SSL or sslmode=require), but this build of \
             pg-eventstore has no TLS support: enable the crate feature `tls`, or \
             connect without TLS or over a tunnel"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn env_database_url_wins() {
        let c = lookup(&[
            ("DATABASE_URL", "postgres://u@db.example:6543/app"),
            ("DB_HOST", "ignored"),
            ("DB_MAX_CONNECTIONS", "3"),
        ])
        .unwrap();
        assert_eq!(c.pg.get_ports(), &[6543]);
        assert_eq!(c.pg.get_user(), Some("u"));
        assert_eq!(c.max_connections, 3);
    }

    #[test]
    fn env_db_ssl_false_never_weakens_the_url_s_sslmode_require() {
        let url = "postgres://u:p@db.example:5432/app?sslmode=require";
        match lookup(&[("DATABASE_URL", url), ("DB_SSL", "false")]) {
            Err(Error::Config(m)) => {
                assert!(m.contains("DB_SSL") && m.contains("DATABASE_URL"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let plain = "postgres://u:p@db.example:5432/app?sslmode=prefer";
        let c = lookup(&[("DATABASE_URL", plain), ("DB_SSL", "false")]).unwrap();
        assert_eq!(c.pg.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn env_db_variables() {
        let c = lookup(&[
            ("DB_HOST", "h"),
            ("DB_PORT", "7000"),
            ("DB_NAME", "n"),
            ("DB_USER", "u"),
            ("DB_PASSWORD", "p@ss word"),
            ("DB_SSL", "false"),
            ("DB_SCHEMA", "s1"),
        ])
        .unwrap();
        assert_eq!(c.pg.get_ports(), &[7000]);
        assert_eq!(c.pg.get_dbname(), Some("n"));
        assert_eq!(c.pg.get_password(), Some(&b"p@ss word"[..]));
        assert_eq!(c.schema, "s1");
        c.finish().unwrap();
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = lookup(&[("DB_PORT", "x")]).unwrap_err().to_string();
        assert!(e.contains("DB_PORT"), "{e}");
        let e = lookup(&[("DB_MAX_CONNECTIONS", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DB_MAX_CONNECTIONS"), "{e}");
        let e = lookup(&[("DB_SSL", "maybe")]).unwrap_err().to_string();
        assert!(e.contains("DB_SSL"), "{e}");
        let e = lookup(&[("DATABASE_URL", "postgres://[")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DATABASE_URL"), "{e}");
    }

    #[test]
    fn keepalive_defaults_and_overrides() {
        let pg = Config::new("postgres://u@h/db").unwrap().finish().unwrap();
        assert_eq!(pg.get_keepalives_idle(), DEFAULT_KEEPALIVES_IDLE);
        assert_eq!(
            pg.get_keepalives_interval(),
            Some(DEFAULT_KEEPALIVES_INTERVAL)
        );
        assert_eq!(
            pg.get_keepalives_retries(),
            Some(DEFAULT_KEEPALIVES_RETRIES)
        );
        assert_eq!(pg.get_tcp_user_timeout(), Some(&DEFAULT_TCP_USER_TIMEOUT));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(5)));
        let pg = Config::new("postgres://u@h/db?keepalives_idle=7")
            .unwrap()
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(9)
            .tcp_user_timeout(Duration::from_secs(4))
            .connect_timeout(Duration::from_millis(1500))
            .finish()
            .unwrap();
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert_eq!(pg.get_keepalives_retries(), Some(9));
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(4)));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_millis(1500)));
    }

    #[test]
    fn zero_health_check_interval_is_refused() {
        let c = Config::new(DEFAULT_DATABASE_URL)
            .unwrap()
            .health_check_interval(Some(Duration::ZERO));
        let e = c.finish().unwrap_err().to_string();
        assert!(e.contains("health_check_interval"), "{e}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_is_required_when_asked() {
        let c = lookup(&[("DB_SSL", "true")]).unwrap();
        assert_eq!(c.finish().unwrap().get_ssl_mode(), SslMode::Require);
        let c = Config::new("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(c.finish().unwrap().get_ssl_mode(), SslMode::Require);
        let c = lookup(&[("DB_SSL", "false")]).unwrap();
        assert_eq!(c.finish().unwrap().get_ssl_mode(), SslMode::Disable);
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn tls_is_refused_not_ignored() {
        let c = lookup(&[("DB_SSL", "true")]).unwrap();
        let e = c.finish().unwrap_err().to_string();
        assert!(e.contains("TLS"), "{e}");
        let c = Config::new("postgres://u@h/db?sslmode=require").unwrap();
        assert!(c.finish().is_err());
    }

    #[test]
    fn hostile_schema_is_refused() {
        let c = Config::new(DEFAULT_DATABASE_URL)
            .unwrap()
            .schema("x; DROP TABLE y");
        let e = c.finish().unwrap_err().to_string();
        assert!(e.contains("schema") && e.contains("x; DROP TABLE y"), "{e}");
    }

    #[test]
    fn zero_pool_durations_are_refused_by_name() {
        let base = || Config::new("postgres://u@h/db").unwrap();
        let cases = [
            ("idle_timeout", base().idle_timeout(Some(Duration::ZERO))),
            ("max_lifetime", base().max_lifetime(Some(Duration::ZERO))),
            (
                "connection_timeout",
                base()
                    .connect_timeout(Duration::from_secs(1))
                    .connection_timeout(Duration::ZERO),
            ),
        ];
        for (name, config) in cases {
            match config.finish() {
                Err(Error::Config(msg)) => assert!(msg.starts_with(name), "{name}: {msg}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        base()
            .idle_timeout(None)
            .max_lifetime(None)
            .finish()
            .unwrap();
    }

    #[test]
    fn a_statement_timeout_below_a_millisecond_is_one_not_off() {
        let options = |t: Duration| {
            let pg = Config::new("postgres://u@h/db")
                .unwrap()
                .statement_timeout(t)
                .finish()
                .unwrap();
            pg.get_options().unwrap().to_string()
        };
        assert_eq!(
            options(Duration::from_micros(300)),
            "-c statement_timeout=1"
        );
        assert_eq!(options(Duration::ZERO), "-c statement_timeout=0");
        assert_eq!(
            options(Duration::from_micros(2500)),
            "-c statement_timeout=2"
        );
    }

    #[test]
    fn statement_timeout_goes_into_options() {
        let c = Config::new("postgres://u@h/db?options=-c%20work_mem%3D4MB")
            .unwrap()
            .statement_timeout(Duration::from_millis(1500));
        let pg = c.finish().unwrap();
        assert_eq!(
            pg.get_options(),
            Some("-c work_mem=4MB -c statement_timeout=1500")
        );
    }
}
