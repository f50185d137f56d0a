//! TLS for the store's connections, behind the crate feature `tls`.
//!
//! With the feature, connections use `native-tls` (OpenSSL on Linux) through
//! `postgres-native-tls` when TLS is asked for: `sslmode=require` in the connection
//! string or `DB_SSL=true`. The server's certificate is verified against the system's
//! roots and any given with [`Config::tls_root_certificate`](crate::Config::tls_root_certificate); only
//! [`Config::danger_accept_invalid_certs`](crate::Config::danger_accept_invalid_certs) turns that off. `sslmode=prefer`, the
//! connection strings' default, is treated as `disable`: an unverified "TLS if the
//! server offers it" gives no protection, and a verified one would break every plain
//! local setup whose server offers a self-signed certificate. Ask for `require`.
//!
//! Without the feature there is no TLS at all, and asking for it is an
//! [`Error::Config`](crate::Error::Config) rather than a silent plain-text connection.

use crate::config::Config;
#[cfg(feature = "tls")]
use crate::error::Error;
use crate::error::Result;

/// The TLS connector of the store's connections: `postgres_native_tls::MakeTlsConnector`
/// with the crate feature `tls`, `postgres::NoTls` without it. Name this alias rather
/// than either type, and code keeps compiling whichever way the feature is set.
#[cfg(feature = "tls")]
pub(crate) type Connector = postgres_native_tls::MakeTlsConnector;

/// The TLS connector of the store's connections: `postgres_native_tls::MakeTlsConnector`
/// with the crate feature `tls`, `postgres::NoTls` without it. Name this alias rather
/// than either type, and code keeps compiling whichever way the feature is set.
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = postgres::NoTls;

/// A copy of the connector (`NoTls` is `Copy`, the TLS connector only `Clone`).
#[allow(clippy::clone_on_copy)]
pub(crate) fn clone(connector: &Connector) -> Connector {
    connector.clone()
}

/// The connector for `config`.
#[cfg(feature = "tls")]
pub(crate) fn connector(config: &Config) -> Result<Connector> {
    let mut builder = native_tls::TlsConnector::builder();
    for (i, pem) in config.tls_root_certificates.iter().enumerate() {
        let cert = native_tls::Certificate::from_pem(pem).map_err(|e| {
            Error::Config(format!(
                "TLS root certificate {} is not a PEM certificate: {}",
                i + 1,
                crate::error::chain(&e)
            ))
        })?;
        builder.add_root_certificate(cert);
    }
    if config.danger_accept_invalid_certs {
        builder.danger_accept_invalid_certs(true);
        builder.danger_accept_invalid_hostnames(true);
    }
    let connector = builder
        .build()
        .map_err(|e| Error::Config(format!("cannot set up TLS: {}", crate::error::chain(&e))))?;
    Ok(postgres_native_tls::MakeTlsConnector::new(connector))
}

/// The connector for `config`.
#[cfg(not(feature = "tls"))]
pub(crate) fn connector(_config: &Config) -> Result<Connector> {
    Ok(postgres::NoTls)
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "tls")]
    use super::*;
    use crate::config::check_ssl_mode;
    use postgres::config::SslMode;

    #[test]
    fn prefer_means_disable() {
        let mut pg: postgres::Config = "postgres://u@h/db".parse().unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Prefer);
        check_ssl_mode(&mut pg).unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Disable);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn require_is_kept_and_bad_pem_is_refused() {
        let mut pg: postgres::Config = "postgres://u@h/db?sslmode=require".parse().unwrap();
        check_ssl_mode(&mut pg).unwrap();
        assert_eq!(pg.get_ssl_mode(), SslMode::Require);
        let config = Config::new("postgres://u@h/db")
            .unwrap()
            .tls_root_certificate(b"not a certificate".to_vec());
        let e = match connector(&config) {
            Ok(_) => panic!("a bad PEM was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("TLS root certificate 1"), "{e}");
    }
}
