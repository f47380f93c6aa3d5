//! MQTT over TLS for the embedded broker: loading the server identity and
//! the optional client CA, and Drover's own accept loop.
//!
//! rumqttd's built-in TLS is chosen at compile time, uses an older rustls,
//! and handshakes inline in its accept loop, so one slow or silent client
//! stalls every other accept. Here the loop only accepts; each connection
//! gets its own task that handshakes under the broker's connection timeout
//! and then hands the encrypted stream to rumqttd
//! ([`Server::serve_stream`], a Drover patch), which runs it like any
//! accepted TCP connection.
//!
//! Crypto is rustls on ring only; configs are built with an explicit
//! provider, so nothing depends on a process-wide default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::Protocol;
use rumqttd::Server;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::throttle::LogLimit;

/// TLS handshakes in progress at once. When all are taken the loop stops
/// accepting and the kernel's backlog holds new connections: a reconnect
/// storm of a whole fleet queues instead of growing memory without bound.
const MAX_HANDSHAKES: usize = 1024;

/// An MQTT-over-TLS listener of the embedded broker.
#[derive(Debug, Clone)]
pub struct TlsListenerConfig {
    /// Where MQTTS clients connect (8883 by convention).
    pub listen: SocketAddr,
    /// PEM file: the server certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM file: the server certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file of CA certificates. When set, every client must present a
    /// certificate issued by one of them (mutual TLS); when not, clients
    /// are not asked for one.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not valid PEM: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("key file {path} holds no PEM private key: {source}")]
    NoKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("client CA file {path} has a certificate rustls cannot use: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("certificate {cert} and key {key} are not a usable server identity: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// rustls's ring provider. Every config is built with it explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file, in order; at least one.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::NoKey {
        path: path.to_path_buf(),
        source,
    })
}

/// Trust anchors from a PEM file of CA certificates.
pub fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// A rustls server config from PEM files: `cert` and `key` are the server's
/// identity (checked to belong together); with `client_ca`, client
/// certificates are required and verified against it. `alpn` lists the
/// application protocols offered (empty: none).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs("certificate file", cert)?;
    let private_key = load_key(key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = load_roots("client CA file", ca)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The subject Common Name of a DER certificate, if it has one in UTF-8.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Accepts TLS connections on `listener` forever. Each connection is
/// handshaken on its own task within `handshake_timeout`; then
/// `protocol_for` gets the peer's address and the verified client
/// certificate's subject Common Name (`None` without mutual TLS) and
/// returns the protocol value rumqttd runs that connection with.
///
/// A failed or timed-out handshake is a line through `lines`: anyone who
/// can reach the port can fail one, as often as they like.
pub(crate) async fn serve<P, F>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    server: Server<P>,
    protocol_for: F,
    handshake_timeout: Duration,
    lines: Arc<LogLimit>,
) where
    P: Protocol + Clone + Send + Sync + 'static,
    F: Fn(SocketAddr, Option<String>) -> P + Send + Sync + 'static,
{
    let server = Arc::new(server);
    let protocol_for = Arc::new(protocol_for);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically out of file descriptors: back off instead of
                // spinning on the error.
                warn!(error = %e, "cannot accept MQTTS connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small, latency-bound packets (as on the plain listener).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let server = server.clone();
        let protocol_for = protocol_for.clone();
        let lines = lines.clone();
        let span =
            tracing::info_span!("mqtts_connection", %peer, common_name = tracing::field::Empty);
        tokio::spawn(
            async move {
                let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        if let Some(suppressed) = lines.admit(std::time::Instant::now()) {
                            info!(error = %e, suppressed, "TLS handshake failed");
                        }
                        return;
                    }
                    Err(_) => {
                        if let Some(suppressed) = lines.admit(std::time::Instant::now()) {
                            info!(
                                timeout_ms = handshake_timeout.as_millis() as u64,
                                suppressed, "TLS handshake timed out"
                            );
                        }
                        return;
                    }
                };
                drop(permit);
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(common_name);
                if let Some(cn) = &cn {
                    // Debug: escaped, like every string from the wire.
                    tracing::Span::current().record("common_name", tracing::field::debug(cn));
                }
                debug!("TLS handshake done");
                let protocol = protocol_for(peer, cn);
                server.serve_stream(tls, protocol, peer).await;
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    /// A CA, a server certificate for localhost and a client certificate
    /// with CN `dev-1`, as PEM files.
    fn files() -> Files {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test ca");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        server_params.distinguished_name = DistinguishedName::new();
        let server = server_params
            .signed_by(&server_key, &issuer)
            .expect("server cert");
        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "dev-1");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params
            .signed_by(&client_key, &issuer)
            .expect("client cert");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem);
        write("ca.pem", ca.pem()).expect("write");
        write("server.pem", server.pem()).expect("write");
        write("server-key.pem", server_key.serialize_pem()).expect("write");
        write("client.pem", client.pem()).expect("write");
        write("client-key.pem", client_key.serialize_pem()).expect("write");
        Files { dir }
    }

    #[test]
    fn a_valid_identity_loads_with_and_without_client_ca() {
        let f = files();
        let c = server_config(&f.path("server.pem"), &f.path("server-key.pem"), None, &[])
            .expect("no client auth");
        assert!(c.alpn_protocols.is_empty());
        server_config(
            &f.path("server.pem"),
            &f.path("server-key.pem"),
            Some(&f.path("ca.pem")),
            &[b"http/1.1"],
        )
        .expect("mutual TLS");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let f = files();
        let err = server_config(&f.path("missing.pem"), &f.path("server-key.pem"), None, &[])
            .expect_err("missing cert");
        assert!(
            err.to_string().contains("cannot read certificate file"),
            "{err}"
        );
        // A key file given as the certificate: no certificate in it.
        let err = server_config(
            &f.path("server-key.pem"),
            &f.path("server-key.pem"),
            None,
            &[],
        )
        .expect_err("key as cert");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        // A certificate given as the key.
        let err = server_config(&f.path("server.pem"), &f.path("server.pem"), None, &[])
            .expect_err("cert as key");
        assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
        // The key of another certificate.
        let err = server_config(&f.path("server.pem"), &f.path("client-key.pem"), None, &[])
            .expect_err("mismatched key");
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");
        // A client CA file without certificates.
        let err = server_config(
            &f.path("server.pem"),
            &f.path("server-key.pem"),
            Some(&f.path("server-key.pem")),
            &[],
        )
        .expect_err("empty client CA");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }

    /// A rumqttd server on its own router, as `Broker::start` builds it.
    fn rumqttd_server() -> Server<rumqttd::protocol::v4::V4> {
        let config = crate::BrokerConfig::new("127.0.0.1:0".parse().expect("addr"));
        let router_tx = rumqttd::Router::new(
            0,
            rumqttd::RouterConfig {
                max_connections: 10,
                max_outgoing_packet_count: 100,
                max_segment_size: config.max_segment_size,
                max_segment_count: 2,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        )
        .spawn();
        let settings = rumqttd::ServerSettings {
            name: "test".into(),
            listen: config.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 5_000,
                max_payload_size: config.max_payload_size,
                max_inflight_count: 10,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        Server::new(settings, router_tx, rumqttd::protocol::v4::V4)
    }

    async fn tls_client(
        f: &Files,
        addr: SocketAddr,
        with_cert: bool,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let roots = load_roots("ca", &f.path("ca.pem")).expect("roots");
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let config = if with_cert {
            builder
                .with_client_auth_cert(
                    load_certs("client", &f.path("client.pem")).expect("cert"),
                    load_key(&f.path("client-key.pem")).expect("key"),
                )
                .expect("client auth")
        } else {
            builder.with_no_client_auth()
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// The accept loop hands the verified client certificate's CN to the
    /// protocol closure, and a client that never handshakes neither blocks
    /// other clients nor stays connected past the handshake timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn protocol_closure_gets_the_verified_common_name() {
        use tokio::io::AsyncReadExt;

        let f = files();
        let config = server_config(
            &f.path("server.pem"),
            &f.path("server-key.pem"),
            Some(&f.path("ca.pem")),
            &[],
        )
        .expect("config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut names) = tokio::sync::mpsc::unbounded_channel();
        // Long enough that a loop stalled by the silent client below would
        // miss the one-second deadline for the good client.
        let handshake_timeout = Duration::from_secs(2);
        let lines = Arc::new(LogLimit::new(Duration::ZERO, 0));
        let accept_loop = tokio::spawn(serve(
            listener,
            TlsAcceptor::from(config),
            rumqttd_server(),
            move |_peer, cn| {
                let _ = tx.send(cn);
                rumqttd::protocol::v4::V4
            },
            handshake_timeout,
            // No line at all: every failure must show up as suppressed.
            lines.clone(),
        ));

        // Opens a socket and says nothing.
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");

        let (tls, cn) = tokio::time::timeout(Duration::from_secs(1), async {
            let tls = tls_client(&f, addr, true).await.expect("handshake");
            (tls, names.recv().await)
        })
        .await
        .expect("handshake and closure done while a silent client is connected");
        assert_eq!(cn, Some(Some("dev-1".to_string())));

        // Without a certificate the handshake fails and nothing reaches
        // the closure (TLS 1.3 clients learn it on their first read).
        if let Ok(mut rejected) = tls_client(&f, addr, false).await {
            let mut buf = [0u8; 1];
            assert!(!matches!(rejected.read(&mut buf).await, Ok(1..)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            names.try_recv().is_err(),
            "a client without certificate got through"
        );

        // The silent socket is closed once the handshake timeout passes.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("silent client disconnected after the handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Both failures (no certificate, silence) went through the line
        // limit: anyone can fail a handshake, as often as they like.
        let mut failures = 0;
        for _ in 0..100 {
            failures += lines.summary(std::time::Instant::now()).unwrap_or(0);
            if failures >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(failures, 2, "failed handshakes bypass the line limit");

        drop(tls);
        accept_loop.abort();
    }

    #[test]
    fn common_name_of_a_client_certificate() {
        let f = files();
        let cert = load_certs("client", &f.path("client.pem")).expect("load");
        assert_eq!(common_name(&cert[0]).as_deref(), Some("dev-1"));
        // The server certificate has no CN (only a SAN).
        let cert = load_certs("server", &f.path("server.pem")).expect("load");
        assert_eq!(common_name(&cert[0]), None);
    }
}
