//! A private, throwaway PostgreSQL server for tests that stop, restart or reconfigure
//! a server: never the shared one on 5432. Started with `initdb` and `pg_ctl` in a temp
//! directory on a free port on 127.0.0.1, stopped and deleted on drop, even on panic.
//! As root, the server runs as the `postgres` user (initdb refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct TempServer {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

/// The directory of `initdb` and `pg_ctl`: on PATH, or the newest
/// `/usr/lib/postgresql/*/bin`. Panics with a clear message when there is none: a test
/// that needs a private server must fail, not pass silently, where it cannot run.
fn bin_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("PG_BIN") {
        candidates.push(dir.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.extend(versions.into_iter().rev());
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test starts a private PostgreSQL server and needs `initdb` and `pg_ctl` \
                 (on PATH, in /usr/lib/postgresql/<version>/bin, or in $PG_BIN); install \
                 PostgreSQL's server package (Debian: postgresql)"
            )
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl TempServer {
    /// Initialises and starts a server. `conf` lines are appended to postgresql.conf.
    pub fn start(conf: &[&str]) -> TempServer {
        static N: AtomicUsize = AtomicUsize::new(0);
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "pg-eventstore-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's temp dir");
        let server = TempServer {
            dir,
            port: free_port(),
            bin,
            as_postgres,
        };
        if as_postgres {
            server.run(
                "chown",
                &["-R", "postgres:postgres", server.path(&server.dir)],
            );
        }
        let data = server.data();
        server.pg(
            "initdb",
            &[
                "-D",
                server.path(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let mut config = String::from("\nfsync = off\nmax_connections = 40\n");
        for line in conf {
            config.push_str(line);
            config.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&config);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        server.start_again();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.data();
        let log = self.dir.join("server.log");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.display()
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                self.path(&data),
                "-l",
                self.path(&log),
                "-o",
                &options,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Stops the server (`-m fast`: sessions are terminated with SQLSTATE 57P01).
    pub fn stop(&self) {
        let data = self.data();
        self.pg(
            "pg_ctl",
            &["-D", self.path(&data), "-m", "fast", "-w", "stop"],
        );
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn path<'a>(&self, p: &'a Path) -> &'a str {
        p.to_str().expect("a UTF-8 temp path")
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        let tool = self.path(&tool).to_string();
        if self.as_postgres {
            let mut full = vec!["-u", "postgres", "--", tool.as_str()];
            full.extend_from_slice(args);
            self.run("runuser", &full);
        } else {
            self.run(&tool, args);
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let started = Instant::now();
        let out = Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed after {:?}: {}\n{}\n{}",
            started.elapsed(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TempServer {
    fn drop(&mut self) {
        let data = self.data();
        let tool = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        let _ = cmd
            .args(["-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `f` returns true, at most `limit`; returns how long it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}
