//! The REST API's listener (HTTP or HTTPS) and server loop, and `drover
//! serve`'s TLS flags.
//!
//! [`ApiListener::serve`] runs hyper's HTTP/1.1 connections itself rather
//! than `axum::serve`, which has neither a header-read timeout nor a
//! connection limit. [`HttpsListener`] is fed by our own accept loop:
//! accept, then a task per connection that does the TLS handshake
//! (tokio-rustls, ring) under a timeout and passes the finished stream on,
//! so a client that never finishes its handshake holds up nobody else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn, Instrument};

/// Time a new connection has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond that the kernel backlog waits.
const MAX_HANDSHAKES: usize = 256;

/// Where the REST API's certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    /// PEM: the server certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
}

impl ApiTls {
    /// Loads and checks the files (HTTP/1.1 over ALPN, no client certificates).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, drover_broker::tls::TlsError> {
        drover_broker::tls::server_config(&self.cert, &self.key, None, &[b"http/1.1"])
    }
}

/// The REST API's listener: plain HTTP, or HTTPS.
pub enum ApiListener {
    Http(TcpListener),
    Https(HttpsListener),
}

impl ApiListener {
    /// HTTPS when `tls` is given. Starts the TLS accept loop right away.
    pub fn new(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        match tls {
            Some(config) => ApiListener::Https(HttpsListener::new(listener, config)),
            None => ApiListener::Http(listener),
        }
    }

    /// Serves `app` until `shutdown` resolves and open requests have drained.
    ///
    /// Each connection has `limits.header_read_timeout` to send a request's
    /// headers (also while it idles between requests): a client that opens
    /// connections and says nothing, or half a request, is cut off. At most
    /// `limits.max_connections` are open at once; beyond that new ones wait
    /// in the kernel's backlog, so the API can never take the descriptors
    /// the MQTT broker needs.
    pub async fn serve(
        mut self,
        app: axum::Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        limits: ServeLimits,
    ) -> std::io::Result<()> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
                _ = &mut shutdown => break,
            };
            let io = tokio::select! {
                io = self.accept() => io,
                _ = &mut shutdown => break,
            };
            let service = TowerToHyperService::new(app.clone());
            let conn = http.serve_connection(TokioIo::new(io), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                drop(permit);
            });
        }
        // No new connections; open ones finish their request in flight and
        // close (idle keep-alive connections at once).
        drop(self);
        if tokio::time::timeout(limits.drain, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(
                "HTTP connections still open after {:?}; closing them",
                limits.drain
            );
        }
        Ok(())
    }

    async fn accept(&mut self) -> ApiStream {
        match self {
            ApiListener::Http(l) => loop {
                match l.accept().await {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        break ApiStream::Plain(tcp);
                    }
                    // Out of descriptors, most likely: wait, do not spin.
                    Err(e) => {
                        warn!(error = %e, "cannot accept an API connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            ApiListener::Https(l) => match l.handshaken.recv().await {
                Some((tls, _)) => ApiStream::Tls(Box::new(tls)),
                // The accept loop ended (it only does when aborted).
                None => std::future::pending().await,
            },
        }
    }
}

/// How the REST API guards its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Time to send a request's headers, and to idle between requests.
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub drain: Duration,
}

impl Default for ServeLimits {
    /// At most a quarter of the process's open-file limit (and 8 to 1024)
    /// for API connections: the rest stays for the broker's devices, the
    /// redb file and the rest of the process.
    fn default() -> Self {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024);
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: usize::try_from(nofile / 4).unwrap_or(1024).clamp(8, 1024),
            drain: Duration::from_secs(30),
        }
    }
}

/// A plain or TLS connection to the REST API.
enum ApiStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ApiStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ApiStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ApiStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ApiStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ApiStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            ApiStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ApiStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepted, handshaken HTTPS connections. Dropping it (the server does on
/// shutdown) stops the accept loop and closes the socket.
pub struct HttpsListener {
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        let (tx, handshaken) = mpsc::channel(64);
        let accept_task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        HttpsListener {
            handshaken,
            accept_task,
        }
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot accept HTTPS connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(
            async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        drop(permit);
                        // Fails only when the server is shutting down.
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    Err(_) => debug!("TLS handshake timed out"),
                }
            }
            .instrument(tracing::debug_span!("https_connection", %peer)),
        );
    }
}

/// `drover serve`'s TLS flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeTlsArgs {
    /// Also accept MQTT over TLS on this address (e.g. 0.0.0.0:8883); needs --tls-cert and --tls-key.
    #[arg(long, env = "DROVER_MQTTS_LISTEN")]
    pub mqtts_listen: Option<std::net::SocketAddr>,
    /// Certificate (PEM) of the MQTTS listener.
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the MQTTS listener.
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require MQTTS clients to present a certificate issued by this CA (PEM): mutual TLS.
    #[arg(long, env = "DROVER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve the REST API over HTTPS with this certificate (PEM).
    #[arg(long, env = "DROVER_API_TLS_CERT", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the REST API's certificate.
    #[arg(long, env = "DROVER_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// CA (PEM) that signed an external mqtts:// --broker's certificate.
    #[arg(long, env = "DROVER_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an external broker that requires one.
    #[arg(long, env = "DROVER_BROKER_CERT", requires = "broker_key")]
    pub broker_cert: Option<PathBuf>,
    /// Private key (PEM) of --broker-cert.
    #[arg(long, env = "DROVER_BROKER_KEY", requires = "broker_cert")]
    pub broker_key: Option<PathBuf>,
}

/// What the TLS flags configure.
#[derive(Debug, Default)]
pub struct ServeTls {
    pub mqtts: Option<drover_broker::TlsListenerConfig>,
    pub api: Option<ApiTls>,
    pub broker_client: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsArgsError {
    #[error("--mqtts-listen needs --tls-cert and --tls-key")]
    MqttsWithoutCert,
    #[error(
        "--tls-cert, --tls-key and --tls-client-ca configure --mqtts-listen, which is not set"
    )]
    CertWithoutMqtts,
    #[error("--mqtts-listen is a listener of the embedded broker; with --broker, configure TLS on that broker")]
    MqttsWithExternalBroker,
    #[error(
        "--broker mqtts://... needs --broker-ca FILE (the CA that signed the broker's certificate)"
    )]
    BrokerWithoutCa,
    #[error("--broker-ca, --broker-cert and --broker-key need an mqtts:// --broker")]
    BrokerTlsWithoutMqtts,
    #[error("--broker TLS: {0}")]
    BrokerClient(#[from] drover_agent::tls::TlsError),
}

impl ServeTlsArgs {
    /// Checks the combination and loads the external broker's client
    /// config (the listeners' files are loaded by `server::start`, before
    /// it binds anything). `broker` is the parsed `--broker`, if any.
    pub fn resolve(
        self,
        broker: Option<&drover_agent::tls::BrokerUrl>,
    ) -> Result<ServeTls, TlsArgsError> {
        let mqtts = match (self.mqtts_listen, self.tls_cert.zip(self.tls_key)) {
            (Some(_), _) if broker.is_some() => return Err(TlsArgsError::MqttsWithExternalBroker),
            (Some(listen), Some((cert, key))) => Some(drover_broker::TlsListenerConfig {
                listen,
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            (Some(_), None) => return Err(TlsArgsError::MqttsWithoutCert),
            (None, identity) if identity.is_some() || self.tls_client_ca.is_some() => {
                return Err(TlsArgsError::CertWithoutMqtts)
            }
            (None, _) => None,
        };
        let api = self
            .api_tls_cert
            .zip(self.api_tls_key)
            .map(|(cert, key)| ApiTls { cert, key });
        let identity = self.broker_cert.zip(self.broker_key);
        let broker_client = match broker {
            Some(url) if url.tls => {
                let ca = self.broker_ca.ok_or(TlsArgsError::BrokerWithoutCa)?;
                let files = drover_agent::tls::ClientTlsFiles { ca, identity };
                Some(drover_agent::tls::client_config(&files)?)
            }
            _ if self.broker_ca.is_some() || identity.is_some() => {
                return Err(TlsArgsError::BrokerTlsWithoutMqtts)
            }
            _ => None,
        };
        Ok(ServeTls {
            mqtts,
            api,
            broker_client,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        tls: ServeTlsArgs,
    }

    fn resolve(args: &[&str], broker: Option<&str>) -> Result<ServeTls, TlsArgsError> {
        let flags = Flags::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("flags parse");
        let url = broker.map(|b| drover_agent::tls::BrokerUrl::parse(b).expect("url"));
        flags.tls.resolve(url.as_ref())
    }

    #[test]
    fn flag_combinations() {
        let none = resolve(&[], None).expect("no TLS");
        assert!(none.mqtts.is_none() && none.api.is_none() && none.broker_client.is_none());

        let cert = ["--tls-cert", "s.pem", "--tls-key", "k.pem"];
        let mqtts = [&["--mqtts-listen", "127.0.0.1:0"][..], &cert[..]].concat();
        let t = resolve(&mqtts, None).expect("mqtts");
        let l = t.mqtts.expect("listener");
        assert_eq!((l.cert, l.client_ca), (PathBuf::from("s.pem"), None));

        assert!(matches!(
            resolve(&["--mqtts-listen", "127.0.0.1:0"], None),
            Err(TlsArgsError::MqttsWithoutCert)
        ));
        assert!(matches!(
            resolve(&cert, None),
            Err(TlsArgsError::CertWithoutMqtts)
        ));
        assert!(matches!(
            resolve(&["--tls-client-ca", "ca.pem"], None),
            Err(TlsArgsError::CertWithoutMqtts)
        ));
        assert!(matches!(
            resolve(&mqtts, Some("mqtt://h")),
            Err(TlsArgsError::MqttsWithExternalBroker)
        ));
        assert!(matches!(
            resolve(&[], Some("mqtts://h")),
            Err(TlsArgsError::BrokerWithoutCa)
        ));
        assert!(matches!(
            resolve(&["--broker-ca", "ca.pem"], Some("mqtt://h")),
            Err(TlsArgsError::BrokerTlsWithoutMqtts)
        ));
        assert!(matches!(
            resolve(&["--broker-ca", "/nonexistent/ca.pem"], Some("mqtts://h")),
            Err(TlsArgsError::BrokerClient(_))
        ));
        let api = resolve(&["--api-tls-cert", "a.pem", "--api-tls-key", "b.pem"], None)
            .expect("api")
            .api
            .expect("api tls");
        assert_eq!(api.key, PathBuf::from("b.pem"));
        // A certificate without its key is refused by clap itself.
        assert!(Flags::try_parse_from(["serve", "--api-tls-cert", "a.pem"]).is_err());
        assert!(Flags::try_parse_from(["serve", "--tls-key", "k.pem"]).is_err());
        assert!(Flags::try_parse_from(["serve", "--broker-cert", "c.pem"]).is_err());
    }
}
