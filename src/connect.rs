//! Opening connections with a deadline: every connection the store opens (the pool's,
//! the listener's, the notifier's, the health check's) gives up after the connect
//! timeout, however far it got.
//!
//! `postgres::Config::connect_timeout` bounds only the TCP connect. A server that accepts
//! the connection and then never answers the startup message (a hung server, a pooler
//! whose queue is full, a stopped process behind a live kernel) would keep `connect`
//! waiting forever: TCP keepalives are answered by the peer's kernel, and
//! `tcp_user_timeout` only fires for data that is not acknowledged. The synchronous
//! `postgres` crate has no `connect_raw` to hand it a socket of our own, and its runtime
//! is private, so the deadline is kept from outside: the connect runs on a short-lived
//! thread and the caller waits for it at most the timeout. TLS is untouched (the
//! configured connector does the handshake as before, inside the same deadline).
//!
//! An attempt that times out cannot be cancelled: its thread ends when the server
//! finally answers (the connection is then closed at once) or the TCP connection breaks.
//! At most [`MAX_ABANDONED`] such attempts per server are left waiting; a caller that
//! finds that many waits for one of them to end instead of starting another, so a hung
//! server costs a few threads, not one per retry.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};
use postgres::config::Host;
use postgres::tls::MakeTlsConnect;
use postgres::{Client, Socket};

use crate::error::{Error, Result};
use crate::tls::Connector;

/// How long a connect may take when the configuration sets no `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Run on every connection as it opens, inside the connect deadline. The store's
/// statements are written for `READ COMMITTED`: each sees what committed before it began
/// (an `Any` append reads the head after waiting for the stream's lock, a migration reads
/// the history after waiting for another migrator), and `$all` readers find the feed's
/// horizon from the appenders' locks only there. A role or database whose default is
/// another level would break the first two and make readers fall back to the
/// cluster-wide `xmin`. A `SET`, not a startup option: PgBouncer refuses startup
/// options it does not track, and a session `SET` also wins over the connection
/// string's `options`. A pooled connection runs it again after a `DISCARD ALL`, which
/// resets it (see `Store::conn`).
pub(crate) const SESSION_SETUP: &str = "SET default_transaction_isolation = 'read committed'";

/// How many timed-out attempts per server may still be waiting for an answer.
const MAX_ABANDONED: usize = 4;

/// Timed-out attempts still waiting, per server (`host:port` list).
static ABANDONED: LazyLock<(Mutex<HashMap<String, usize>>, Condvar)> =
    LazyLock::new(Default::default);

/// Opens a connection, or fails within the connect timeout (per configured host, as in
/// libpq) with an error that names the server and how far the connect got.
pub(crate) fn open(pg: &postgres::Config, connector: &Connector) -> Result<Client> {
    let timeout = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let budget = timeout * pg.get_hosts().len().max(1) as u32;
    let deadline = Instant::now() + budget;
    let servers = target(pg);
    wait_for_room(&servers, deadline).map_err(|()| Error::ConnectTimeout {
        target: servers.clone(),
        timeout,
        connected: true,
    })?;

    let reached = Arc::new(Mutex::new(None::<String>));
    let attempt = Arc::new(Mutex::new(Attempt::default()));
    let (tx, rx) = bounded(1);
    let tls = Watch {
        inner: crate::tls::clone(connector),
        reached: reached.clone(),
    };
    let config = pg.clone();
    let (thread_attempt, thread_servers) = (attempt.clone(), servers.clone());
    thread::Builder::new()
        .name("pg-eventstore-connect".into())
        .spawn(move || {
            let result = config.connect(tls).and_then(|mut client| {
                client.batch_execute(SESSION_SETUP)?;
                Ok(client)
            });
            let mut attempt = thread_attempt.lock().unwrap();
            attempt.done = true;
            if attempt.abandoned {
                // Nobody waits for it: close a late connection at once.
                drop(result);
                release(&thread_servers);
            } else {
                let _ = tx.send(result);
            }
        })
        .map_err(|e| Error::Config(format!("cannot start a connect thread: {e}")))?;

    let outcome = match rx.recv_deadline(deadline) {
        Ok(result) => Some(result),
        Err(RecvTimeoutError::Timeout) => {
            let mut attempt = attempt.lock().unwrap();
            if attempt.done {
                // Finished just now: the result is in the channel.
                rx.try_recv().ok()
            } else {
                attempt.abandoned = true;
                *ABANDONED
                    .0
                    .lock()
                    .unwrap()
                    .entry(servers.clone())
                    .or_insert(0) += 1;
                None
            }
        }
        Err(RecvTimeoutError::Disconnected) => None,
    };
    match outcome {
        Some(Ok(client)) => Ok(client),
        Some(Err(source)) => Err(Error::Connect {
            target: servers,
            source,
        }),
        None => {
            let reached = reached.lock().unwrap().take();
            Err(Error::ConnectTimeout {
                connected: reached.is_some(),
                target: reached
                    .and_then(|host| host_port(pg, &host))
                    .unwrap_or(servers),
                timeout,
            })
        }
    }
}

/// The state of one connect thread, shared with its caller.
#[derive(Default)]
struct Attempt {
    done: bool,
    abandoned: bool,
}

/// Waits until fewer than [`MAX_ABANDONED`] timed-out attempts to `servers` are still
/// waiting; `Err` at the deadline.
fn wait_for_room(servers: &str, deadline: Instant) -> std::result::Result<(), ()> {
    let (counts, changed) = &*ABANDONED;
    let mut counts = counts.lock().unwrap();
    while counts.get(servers).copied().unwrap_or(0) >= MAX_ABANDONED {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(());
        }
        counts = changed.wait_timeout(counts, left).unwrap().0;
    }
    Ok(())
}

/// A timed-out attempt to `servers` has ended.
fn release(servers: &str) {
    let (counts, changed) = &*ABANDONED;
    let mut counts = counts.lock().unwrap();
    if let Some(n) = counts.get_mut(servers) {
        *n -= 1;
        if *n == 0 {
            counts.remove(servers);
        }
    }
    changed.notify_all();
}

/// The configured connector, noting the host whose TCP connection was established:
/// `postgres` asks for the TLS connector right after the TCP connect, before the startup.
struct Watch {
    inner: Connector,
    reached: Arc<Mutex<Option<String>>>,
}

impl MakeTlsConnect<Socket> for Watch {
    type Stream = <Connector as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <Connector as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <Connector as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<Self::TlsConnect, Self::Error> {
        *self.reached.lock().unwrap() = Some(domain.to_string());
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.inner, domain)
    }
}

/// `host:port` of every configured host.
pub(crate) fn target(pg: &postgres::Config) -> String {
    let hosts: Vec<String> = (0..pg.get_hosts().len())
        .filter_map(|i| host_at(pg, i))
        .collect();
    if hosts.is_empty() {
        "(no host configured)".to_string()
    } else {
        hosts.join(", ")
    }
}

fn host_at(pg: &postgres::Config, i: usize) -> Option<String> {
    let ports = pg.get_ports();
    let port = ports
        .get(i)
        .or_else(|| ports.first())
        .copied()
        .unwrap_or(5432);
    Some(match pg.get_hosts().get(i)? {
        Host::Tcp(name) => format!("{name}:{port}"),
        Host::Unix(path) => format!("{} (port {port})", path.display()),
    })
}

/// `host:port` of the configured TCP host named `host`.
fn host_port(pg: &postgres::Config, host: &str) -> Option<String> {
    let i = pg
        .get_hosts()
        .iter()
        .position(|h| matches!(h, Host::Tcp(name) if name == host))?;
    host_at(pg, i)
}

/// The r2d2 connection manager of the store's pool: opens connections with the
/// store's settings and the same deadline as every other connection of the store (see
/// [`Config::connect_timeout`](crate::Config::connect_timeout)), and keeps the typed
/// error of a failed connect.
pub struct Manager {
    pg: postgres::Config,
    connector: Connector,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("servers", &target(&self.pg))
            .finish()
    }
}

impl Manager {
    pub(crate) fn new(pg: postgres::Config, connector: Connector) -> Manager {
        Manager { pg, connector }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Client;
    type Error = Error;

    fn connect(&self) -> Result<Client> {
        open(&self.pg, &self.connector)
    }

    fn is_valid(&self, client: &mut Client) -> Result<()> {
        let timeout = self
            .pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        client.is_valid(timeout).map_err(Error::Postgres)
    }

    fn has_broken(&self, client: &mut Client) -> bool {
        client.is_closed()
    }
}

/// The oldest PostgreSQL release the store's statements run on, as `server_version_num`:
/// they use the transaction-id and snapshot functions and types that came with
/// PostgreSQL 13 (`pg_current_xact_id`, `pg_current_snapshot`, `xid8`, `pg_xact_status`),
/// and the built-in `gen_random_uuid`.
const MIN_SERVER_VERSION_NUM: i64 = 130_000;

/// Refuses a server older than PostgreSQL 13 with [`Error::ServerTooOld`], before the
/// store reads or creates anything on it (which would fail part way with "function
/// pg_current_xact_id() does not exist"). One round trip.
pub(crate) fn check_server(client: &mut Client) -> Result<()> {
    let rows = client.simple_query(
        "SELECT current_setting('server_version_num'), current_setting('server_version')",
    )?;
    let row = rows.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let (num, version) = match row {
        Some(row) => (row.get(0), row.get(1)),
        None => (None, None),
    };
    server_supported(num, version.unwrap_or("unknown"))
}

/// Whether a server reporting `server_version_num` `num` (and `server_version`
/// `version`) is new enough. A number that does not parse is let through: the version
/// check is a courtesy, and such a server says nothing about its age.
fn server_supported(num: Option<&str>, version: &str) -> Result<()> {
    match num.and_then(|n| n.trim().parse::<i64>().ok()) {
        Some(n) if n < MIN_SERVER_VERSION_NUM => Err(Error::ServerTooOld {
            version: version.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The last error of the pool's connects; r2d2 keeps only its text.
pub(crate) type LastConnectError =
    std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<crate::Error>>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_hosts_and_ports() {
        let pg: postgres::Config = "postgres://u@a:1,b/db".parse().unwrap();
        let t = target(&pg);
        assert!(t.contains("a:1"), "{t}");
        assert_eq!(host_port(&pg, "b").as_deref(), Some("b:5432"));
        let pg: postgres::Config = "host=h port=6000 user=u".parse().unwrap();
        assert_eq!(target(&pg), "h:6000");
        assert_eq!(host_port(&pg, "x"), None);
    }

    #[test]
    fn servers_older_than_postgresql_13_are_refused_by_name() {
        for (num, version) in [("120017", "12.17"), ("90624", "9.6.24"), ("129999", "12.x")] {
            match server_supported(Some(num), version) {
                Err(Error::ServerTooOld { version: v }) => {
                    assert_eq!(v, version);
                    let text = Error::ServerTooOld { version: v }.to_string();
                    assert!(
                        text.contains(version) && text.contains("13 or newer"),
                        "{text}"
                    );
                }
                other => panic!("{num}: expected ServerTooOld, got {other:?}"),
            }
        }
        for num in ["130000", "130016", "150018", "170000", " 160004 "] {
            assert!(server_supported(Some(num), "x").is_ok(), "{num}");
        }
        assert!(server_supported(None, "x").is_ok());
        assert!(server_supported(Some("devel"), "x").is_ok());
    }
}
