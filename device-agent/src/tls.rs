//! TLS for MQTT clients (the agent's, and the orchestrator's own link to an
//! external broker): a rustls client config from PEM files, on the ring
//! provider only.
//!
//! The trust anchors are exactly the CA file given: no system roots, since a
//! fleet's broker certificate comes from the fleet's own CA
//! (`drover certs`). With a client certificate the config also proves the
//! device's identity for mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is not valid PEM: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("key file {path} holds no PEM private key: {source}")]
    NoKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} has a certificate rustls cannot use: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client certificate {cert} and key {key} do not belong together: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Where a client's TLS settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM file of the CA certificates that may sign the broker's certificate.
    pub ca: PathBuf,
    /// PEM files of this client's certificate (chain) and private key, for
    /// brokers that require client certificates.
    pub identity: Option<(PathBuf, PathBuf)>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Builds the client config; every file is read and checked here, so a bad
/// file is a start-up error rather than a reconnect loop.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA file", &files.ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: files.ca.clone(),
            source,
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::BadCa {
            path: files.ca.clone(),
            source,
        })?
        .with_root_certificates(roots);
    let config = match &files.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs("client certificate", cert)?;
            let pem = read("key file", key)?;
            let private_key =
                PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::NoKey {
                    path: key.clone(),
                    source,
                })?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|source| TlsError::Identity {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
    };
    Ok(Arc::new(config))
}

/// A broker URL: `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?}: only mqtt://HOST:PORT and mqtts://HOST:PORT are supported")]
    Scheme(String),
    #[error("{url:?}: invalid port {port:?}")]
    Port { url: String, port: String },
    #[error("{0:?}: missing or invalid host")]
    Host(String),
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, UrlError> {
        let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else {
            return Err(UrlError::Scheme(url.to_string()));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>().map_err(|_| UrlError::Port {
                    url: url.to_string(),
                    port: p.to_string(),
                })?,
            ),
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(UrlError::Host(url.to_string()));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = |s: &str| BrokerUrl::parse(s).map(|u| (u.host, u.port, u.tls));
        assert_eq!(
            u("mqtt://127.0.0.1:1883").expect("ok"),
            ("127.0.0.1".into(), 1883, false)
        );
        assert_eq!(
            u("mqtt://broker").expect("ok"),
            ("broker".into(), 1883, false)
        );
        assert_eq!(
            u("mqtts://broker").expect("ok"),
            ("broker".into(), 8883, true)
        );
        assert_eq!(
            u("mqtts://[::1]:18883/").expect("ok"),
            ("::1".into(), 18883, true)
        );
        assert!(u("http://h").is_err());
        assert!(u("mqtt://h:notaport").is_err());
        assert!(u("mqtts://:8883").is_err());
    }

    #[test]
    fn missing_or_wrong_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = ClientTlsFiles {
            ca: dir.path().join("ca.pem"),
            identity: None,
        };
        let err = client_config(&missing).expect_err("missing CA");
        assert!(err.to_string().starts_with("cannot read CA file"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").expect("write");
        let err = client_config(&ClientTlsFiles {
            ca: junk,
            identity: None,
        })
        .expect_err("no certificate");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }
}
