//! TLS against a private throwaway server with a certificate from a test CA made here
//! (`openssl` command line). Needs the crate feature `tls`:
//! `cargo test --features tls --test it tls::`.

use std::path::Path;
use std::process::Command;

use crate::common::server::TempServer;
use crate::common::{events, TestResult};
use pg_eventstore::{Config, Error, ExpectedVersion, ReadStream, Store};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("the TLS test needs the `openssl` command line tool (Debian: openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate it signed for 127.0.0.1 only, written into
/// the server's data directory. Returns the CA certificate (PEM).
fn make_certificates(server: &TempServer) -> Vec<u8> {
    let dir = server.dir.clone();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pg-eventstore test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let data = server.data();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(dir.join(f), data.join(f)).unwrap();
    }
    let _ = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(data.join("server.crt"))
        .arg(data.join("server.key"))
        .status();
    let _ = Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status();
    std::fs::read(dir.join("ca.crt")).unwrap()
}

fn is_tls(store: &Store) -> bool {
    store
        .pool()
        .get()
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn tls_verifies_certificates_unless_told_not_to() -> TestResult {
    let server = TempServer::start(&[]);
    let ca = make_certificates(&server);
    server.stop();
    {
        let conf = server.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text)?;
    }
    server.start_again();
    let url = format!("{}?sslmode=require", server.url());

    // Verification is on by default: the test CA is not trusted.
    let e = Config::new(&url)?.connect().unwrap_err();
    eprintln!("untrusted certificate: {e}");
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.report().contains("certificate"), "{e}");

    // Trusting the CA: verified TLS, and the store works over it.
    let store = Config::new(&url)?
        .schema("tls")
        .tls_root_certificate(ca.clone())
        .connect()?;
    store.migrate()?;
    assert!(is_tls(&store), "the connection is not encrypted");
    let r = store.append("s", ExpectedVersion::NoStream, &events("T", 2))?;
    assert_eq!(r.last_version, 1);
    let mut conn = store.pool().get()?;
    let mut tx = conn.transaction()?;
    store.append_in(&mut tx, "s", ExpectedVersion::Exact(1), &events("U", 1))?;
    tx.commit()?;
    drop(conn);
    assert_eq!(store.read_stream("s", ReadStream::forwards())?.count(), 3);
    assert!(store.health_check().is_ready());
    // Subscriptions: the listener and the notifier connect over TLS too.
    let mut sub = store.subscribe(pg_eventstore::SubscribeOptions::all().live())?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.listener_state().is_none_or(|s| !s.connected) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            store.listener_state()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    store.append("s", ExpectedVersion::Exact(2), &events("V", 1))?;
    let got = sub
        .next_timeout(std::time::Duration::from_secs(10))
        .expect("delivered over TLS")?;
    assert_eq!(got.event_type, "V");
    let listener_pid = store.listener_state().unwrap().backend_pid;
    let encrypted: bool = store
        .pool()
        .get()?
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = $1",
            &[&listener_pid],
        )?
        .get(0);
    assert!(encrypted, "the listener's connection is not encrypted");

    // A trusted certificate for another name is refused too: it is for 127.0.0.1,
    // not for "localhost".
    let wrong_host = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        server.port
    );
    match Config::new(&wrong_host)?
        .tls_root_certificate(ca.clone())
        .connect()
    {
        Err(e) => {
            eprintln!("wrong host name: {e}");
            assert!(e.report().contains("certificate"), "{e}");
        }
        Ok(_) => panic!("a certificate for 127.0.0.1 was accepted for localhost"),
    }

    // The explicit opt-out accepts the certificate without checking it.
    let store = Config::new(&url)?
        .schema("tls")
        .danger_accept_invalid_certs(true)
        .connect()?;
    assert!(is_tls(&store));
    assert_eq!(store.stream_version("s")?, Some(3));

    // Without sslmode=require the connection stays plain (prefer means disable).
    let store = Config::new(&server.url())?.schema("tls").connect()?;
    assert!(!is_tls(&store));
    Ok(())
}
