//! A TCP proxy in front of the test database that can stop answering: new connections
//! accepted and never answered (a hung server, a pooler's full queue), and established
//! ones whose bytes are no longer passed on (a server that stopped mid-session).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct Switches {
    silent: AtomicBool,
    frozen: AtomicBool,
    stop: AtomicBool,
    /// Accepted connections that are never answered, kept open until the proxy is dropped.
    held: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub port: u16,
    switches: Arc<Switches>,
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`), passing bytes both ways until told otherwise.
    pub fn to(upstream: String) -> Proxy {
        Self::start(Some(upstream))
    }

    /// A server that accepts TCP connections and never sends a byte.
    pub fn silent() -> Proxy {
        let proxy = Self::start(None);
        proxy.silence_new_connections();
        proxy
    }

    fn start(upstream: Option<String>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        let port = listener.local_addr().unwrap().port();
        let switches = Arc::new(Switches::default());
        let s = switches.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                match &upstream {
                    Some(up) if !s.silent.load(Ordering::SeqCst) => {
                        let server = TcpStream::connect(up).expect("connect upstream");
                        pipe(&client, &server, s.clone());
                        pipe(&server, &client, s.clone());
                    }
                    _ => s.held.lock().unwrap().push(client),
                }
            }
        });
        Proxy { port, switches }
    }

    /// From now on, new connections are accepted and never answered.
    pub fn silence_new_connections(&self) {
        self.switches.silent.store(true, Ordering::SeqCst);
    }

    /// From now on, established connections pass no more bytes either way.
    pub fn freeze(&self) {
        self.switches.frozen.store(true, Ordering::SeqCst);
    }

    /// A `postgres://` URL to `upstream_url`'s user and database through this proxy.
    pub fn url(&self, upstream_url: &str) -> String {
        let pg: postgres::Config = upstream_url.parse().expect("upstream URL parses");
        let user = pg.get_user().unwrap_or("postgres");
        let db = pg.get_dbname().unwrap_or("postgres");
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.switches.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        for c in self.switches.held.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes, the proxy is
/// dropped, or (frozen) forever without passing anything on.
fn pipe(from: &TcpStream, to: &TcpStream, s: Arc<Switches>) {
    let mut from = from.try_clone().unwrap();
    let mut to = to.try_clone().unwrap();
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while !s.stop.load(Ordering::SeqCst) {
            if s.frozen.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// `host:port` of the test database.
pub fn upstream(url: &str) -> String {
    let pg: postgres::Config = url.parse().expect("DATABASE_URL parses");
    let host = match pg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}
