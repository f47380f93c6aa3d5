//! The embedded MQTT broker: rumqttd's router and its v4 TCP server, run on
//! the orchestrator's own tokio runtime instead of `Broker::start()` (which
//! blocks forever and owns its own threads).
//!
//! `RouterConfig::default()` is all zeros and unusable (zero connections,
//! panics on subscribe), so every router setting is chosen here on purpose
//! and documented on [`BrokerConfig`].

#![forbid(unsafe_code)]

pub mod acl;
pub mod guard;
mod throttle;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use drover_shared::topic::{TopicKind, Topics};
use rumqttd::{ConnectionSettings, Router, RouterConfig, SegmentConfig, Server, ServerSettings};
use tracing::{error, info, warn};

pub use acl::Principal;
pub use guard::{Authority, Connections, GuardStats};
use guard::{Guard, Shared};

/// Who may connect.
#[derive(Clone)]
pub enum Access {
    /// Every client is let in with every right. For development and load
    /// tests only.
    Open,
    /// Credentials are checked against the authority on every CONNECT and
    /// every publish and subscribe against the client's principal.
    Guarded(Arc<dyn Authority>),
}

pub(crate) struct OpenAuthority;

impl Authority for OpenAuthority {
    fn authenticate(&self, _: &str, _: &str, _: &str) -> bool {
        true
    }
    fn principal(&self, _: &str, _: Option<&str>) -> Option<Principal> {
        Some(Principal::Owner)
    }
}

pub use throttle::LoginThrottleConfig;
pub use tls::{TlsError, TlsListenerConfig};

/// Limits of the embedded broker. Every field is deliberate:
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Where MQTT clients connect.
    pub listen: SocketAddr,
    /// rumqttd pre-allocates slabs of this size and is reported to panic
    /// above it, so it is the hard cap on devices per node (plus the
    /// orchestrator's own connection and automation clients).
    pub max_connections: usize,
    /// Largest MQTT payload accepted; matches the protocol's limit plus room
    /// for the packet header.
    pub max_payload_size: usize,
    /// Unacknowledged QoS 1 messages in flight per connection.
    pub max_inflight_count: usize,
    /// Packets queued towards one slow client before the router stops
    /// reading for it.
    pub max_outgoing_packet_count: u64,
    /// Bytes per commit-log segment. Must comfortably exceed the largest
    /// payload; tiny segments make rumqttd panic on subscribe.
    ///
    /// Every subscribed filter has a log; the orchestrator's wildcard
    /// filters (one per device-to-orchestrator topic kind) carry the whole
    /// fleet's traffic, so their logs fill and stay full. rumqttd counts
    /// topic + payload bytes, while each kept message costs ~230 bytes of
    /// bookkeeping on top, so a full log of small messages (heartbeats)
    /// costs several times its counted size: at 10,000 devices the load
    /// test measured ~130 MB with 4 MiB segments and a plateau only after
    /// 15+ minutes. With 1 MiB the logs still hold minutes of heartbeats
    /// and seconds of telemetry for a subscriber that lags, and rollouts
    /// and reconnect storms at 10,000 devices measured the same
    /// (`loadtest/RESULTS.md`).
    pub max_segment_size: usize,
    /// Segments kept in memory per log. Offline QoS 1 delivery is a cursor
    /// into this log: when it rolls over, queued messages are dropped
    /// silently, which is why Drover never relies on the broker's queue
    /// as the source of truth (desired state is retained and generations
    /// are compared).
    pub max_segment_count: usize,
    /// Bytes per commit-log segment, two segments, for each device's own
    /// orchestrator-to-device filters (`cmd`, `desired`, `enrolled`,
    /// `secrets`). rumqttd keeps every filter's log until it rolls over,
    /// whether or not anyone still needs it, so with the fleet-wide
    /// segment size each device would keep up to
    /// `max_segment_size × max_segment_count` of the commands and desired
    /// states ever sent to it: memory that grows with every rollout, times
    /// the number of devices. A device reads these live, or from the
    /// retained desired state after an outage (Drover never relies on the
    /// broker's queue), so a short tail is enough. A segment may exceed
    /// this by one message, so any payload still fits.
    pub device_log_segment_size: usize,
    /// Time a new TCP connection has to send CONNECT; on the TLS listener
    /// also the time it has to finish the TLS handshake.
    pub connection_timeout_ms: u16,
    /// The topic tree the authorization rules apply to.
    pub topics: Topics,
    /// An MQTT-over-TLS listener besides the plain one (see [`tls`]).
    pub tls: Option<TlsListenerConfig>,
    /// How failed logins are logged and slowed down.
    pub login_throttle: LoginThrottleConfig,
}

impl BrokerConfig {
    pub fn new(listen: SocketAddr) -> Self {
        BrokerConfig {
            topics: Topics::default(),
            listen,
            max_connections: 20_000,
            max_payload_size: drover_payload_limit(),
            max_inflight_count: 100,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            device_log_segment_size: 64 * 1024,
            connection_timeout_ms: 5_000,
            tls: None,
            login_throttle: LoginThrottleConfig::default(),
        }
    }
}

/// Segment settings for every device's own inbound filters. rumqttd
/// applies an entry to each new filter that matches its key as a topic, so
/// `<root>/v1/dev/+/cmd` covers `<root>/v1/dev/<id>/cmd` for every id.
fn device_logs(config: &BrokerConfig) -> HashMap<String, SegmentConfig> {
    TopicKind::TO_DEVICE
        .into_iter()
        .map(|kind| {
            (
                config.topics.all_devices(kind),
                SegmentConfig {
                    max_segment_size: config.device_log_segment_size,
                    max_segment_count: 2,
                },
            )
        })
        .collect()
}

/// The protocol's payload limit plus room for topic and header.
fn drover_payload_limit() -> usize {
    256 * 1024 + 4 * 1024
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid broker setting: {0}")]
    Config(String),
    #[error("MQTTS listener: {0}")]
    Tls(#[from] TlsError),
    #[error("in-process link to the router: {0}")]
    Local(String),
}

/// Most publishes a [`LocalPublisher`] lets wait for the router; a batch
/// beyond it is refused, not queued without bound.
const LOCAL_BACKLOG: usize = 100_000;

/// One message for [`LocalPublisher::publish_batch`].
#[derive(Debug, Clone)]
pub struct LocalMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Publishes at QoS 0 from inside the broker's process
/// ([`Broker::local_publisher`]).
pub struct LocalPublisher {
    tx: rumqttd::local::LinkTx,
    /// Kept so the router sees a live link; nothing is read from it (QoS
    /// 0 publishes get no acknowledgement).
    _rx: rumqttd::local::LinkRx,
}

impl LocalPublisher {
    /// Queues every message for the router and wakes it once. Never
    /// blocks. Returns false, queueing nothing, while the router has
    /// fallen [`LOCAL_BACKLOG`] messages behind or is gone.
    pub fn publish_batch(&mut self, messages: Vec<LocalMessage>) -> bool {
        if messages.is_empty() {
            return true;
        }
        let publishes = messages
            .into_iter()
            .map(|m| {
                rumqttd::protocol::Publish::new(
                    bytes::Bytes::from(m.topic),
                    m.payload.into(),
                    m.retain,
                )
            })
            .collect();
        self.tx.try_publish_batch(publishes, LOCAL_BACKLOG).is_ok()
    }
}

/// The MQTTS listener, bound and loaded in [`Broker::start`].
struct TlsListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// A started broker. Dropping it does not stop it; await [`Broker::run`].
pub struct Broker {
    config: BrokerConfig,
    /// The plain listener, bound in [`Broker::start`]; `config.listen`
    /// holds the address it really got (port 0 picks one).
    listener: std::net::TcpListener,
    server: Server<Guard>,
    /// The unconnected guard; each connection gets a clone.
    guard: Guard,
    shared: Arc<Shared>,
    stats: Arc<GuardStats>,
    connections: Arc<Connections>,
    tls: Option<TlsListener>,
    /// The router's channel, for links inside this process
    /// ([`Broker::local_publisher`]).
    router_tx: rumqttd::RouterTx,
}

impl Broker {
    /// Validates the settings, checks the listen address can be bound, and
    /// starts the router thread. Nothing is listening until [`Broker::run`].
    pub fn start(mut config: BrokerConfig, access: Access) -> Result<Broker, BrokerError> {
        if config.max_connections == 0 {
            return Err(BrokerError::Config(
                "max_connections must be at least 1".into(),
            ));
        }
        if config.max_segment_size < 2 * config.max_payload_size {
            return Err(BrokerError::Config(format!(
                "max_segment_size ({}) must be at least twice max_payload_size ({})",
                config.max_segment_size, config.max_payload_size
            )));
        }
        // rumqttd panics on a commit log with segments under 1 KiB.
        if config.device_log_segment_size < 1024 {
            return Err(BrokerError::Config(format!(
                "device_log_segment_size ({}) must be at least 1024",
                config.device_log_segment_size
            )));
        }
        // Certificates first: a bad file is an error before any port is bound.
        let tls_config = match &config.tls {
            Some(t) => Some((
                t,
                tls::server_config(&t.cert, &t.key, t.client_ca.as_deref(), &[])?,
            )),
            None => None,
        };
        // Bound here, so a taken port is a clear, early error and port 0
        // reports the port it got. Drover accepts on it itself (see
        // `serve_plain`) instead of rumqttd's `Server::start`, which binds
        // inside its accept loop and never tells a connection's guard who
        // is on the other end.
        let listen = config.listen;
        let bind_err = |source| BrokerError::Bind {
            addr: listen,
            source,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        config.listen = listener.local_addr().map_err(bind_err)?;
        // Our own listener is bound here and kept, so port 0 reports the
        // port it really got.
        let tls = match tls_config {
            Some((t, server_config)) => {
                let bind_err = |source| BrokerError::Bind {
                    addr: t.listen,
                    source,
                };
                let listener = std::net::TcpListener::bind(t.listen).map_err(bind_err)?;
                listener.set_nonblocking(true).map_err(bind_err)?;
                let addr = listener.local_addr().map_err(bind_err)?;
                Some(TlsListener {
                    listener,
                    addr,
                    acceptor: tokio_rustls::TlsAcceptor::from(server_config),
                })
            }
            None => None,
        };

        let router_config = RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: config.max_outgoing_packet_count,
            max_segment_size: config.max_segment_size,
            max_segment_count: config.max_segment_count,
            custom_segment: Some(device_logs(&config)),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        // The router runs on its own OS thread for the life of the process:
        // rumqttd offers no way to stop it.
        let router_tx = Router::new(0, router_config).spawn();
        let settings = ServerSettings {
            name: "drover-v4".into(),
            listen: config.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: config.connection_timeout_ms,
                max_payload_size: config.max_payload_size,
                max_inflight_count: config.max_inflight_count,
                auth: None::<HashMap<String, String>>,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let stats = Arc::new(GuardStats::default());
        let require_login = matches!(access, Access::Guarded(_));
        // Passwords are checked by the guard (`Protocol::login`), which
        // knows the client's address: rumqttd's own hook does not.
        let authority: Arc<dyn Authority> = match access {
            Access::Open => {
                warn!("broker authentication is off: every client may do anything");
                Arc::new(OpenAuthority)
            }
            Access::Guarded(authority) => authority,
        };
        let connections = Arc::new(Connections::default());
        let log_interval = config.login_throttle.log_interval;
        let shared = Arc::new(Shared {
            require_login,
            authority,
            topics: config.topics.clone(),
            stats: stats.clone(),
            connections: connections.clone(),
            logins: throttle::LoginThrottle::new(config.login_throttle.clone()),
            violation_lines: throttle::LogLimit::new(log_interval, 20),
            subscribe_lines: throttle::LogLimit::new(log_interval, 20),
            oversized_lines: throttle::LogLimit::new(log_interval, 20),
            tls_lines: Arc::new(throttle::LogLimit::new(log_interval, 20)),
        });
        let guard = Guard::new(shared.clone());
        let server = Server::new(settings, router_tx.clone(), guard.clone());
        Ok(Broker {
            config,
            listener,
            shared,
            server,
            guard,
            stats,
            connections,
            tls,
            router_tx,
        })
    }

    /// A publisher inside this process, straight into the router: no TCP,
    /// no MQTT codec, no guard (it is the orchestrator itself), and one
    /// router wake-up per batch. `name` becomes its client id; give one
    /// that no remote client can take (a device id cannot hold `:`, and
    /// the guard prefixes every other login's session id).
    pub async fn local_publisher(&self, name: &str) -> Result<LocalPublisher, BrokerError> {
        let (tx, rx, _) = rumqttd::local::LinkBuilder::new(name, self.router_tx.clone())
            .clean_session(true)
            .build_async()
            .await
            .map_err(|e| BrokerError::Local(e.to_string()))?;
        Ok(LocalPublisher { tx, _rx: rx })
    }

    /// Authorization and authentication counters.
    pub fn stats(&self) -> Arc<GuardStats> {
        self.stats.clone()
    }

    /// The identified open connections, to close one from outside.
    pub fn connections(&self) -> Arc<Connections> {
        self.connections.clone()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.config.listen
    }

    /// Where the MQTTS listener is bound, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.addr)
    }

    /// Accepts MQTT connections until `shutdown` resolves. Connections
    /// already open are owned by rumqttd's tasks and end with the runtime.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let addr = self.config.listen;
        let plain = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                error!(%addr, error = %e, "embedded MQTT broker cannot listen");
                return;
            }
        };
        info!(%addr, "embedded MQTT broker listening");
        let tls_loop = self.tls.take().map(|t| {
            let server = self.server.clone();
            // Each MQTTS connection's guard knows the verified client
            // certificate's CN, to bind it to the device's identity.
            let guard = self.guard.clone();
            let lines = self.shared.tls_lines.clone();
            let protocol_for = move |peer: SocketAddr, common_name: Option<String>| {
                guard.for_peer(peer.ip(), common_name)
            };
            let timeout =
                std::time::Duration::from_millis(u64::from(self.config.connection_timeout_ms));
            async move {
                match tokio::net::TcpListener::from_std(t.listener) {
                    Ok(listener) => {
                        info!(addr = %t.addr, "embedded MQTTS listener listening");
                        tls::serve(listener, t.acceptor, server, protocol_for, timeout, lines)
                            .await;
                    }
                    Err(e) => {
                        // The plain listener keeps serving.
                        error!(addr = %t.addr, error = %e, "MQTTS listener failed");
                        std::future::pending::<()>().await;
                    }
                }
            }
        });
        let tls_loop = async move {
            match tls_loop {
                Some(l) => l.await,
                None => std::future::pending().await,
            }
        };
        // What the rate limits kept out of the log, once per interval.
        let shared = self.shared.clone();
        let period = self.config.login_throttle.log_interval;
        let summaries = async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                shared.log_summaries(std::time::Instant::now());
            }
        };
        tokio::select! {
            () = serve_plain(plain, self.server.clone(), self.guard.clone()) => {}
            () = summaries => {}
            () = tls_loop => {}
            () = shutdown => info!(%addr, "embedded MQTT broker no longer accepting connections"),
        }
    }
}

/// Accepts plain MQTT connections forever, each served on its own task by
/// rumqttd's per-connection code (`Server::serve_stream`) with a guard that
/// knows the peer's address.
async fn serve_plain(listener: tokio::net::TcpListener, server: Server<Guard>, guard: Guard) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically out of file descriptors: back off instead of
                // spinning on the error.
                warn!(error = %e, "cannot accept MQTT connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // MQTT packets are small and latency-bound: do not hold them back
        // for Nagle's algorithm (see broker/vendor/PATCHES.md).
        let _ = tcp.set_nodelay(true);
        let protocol = guard.for_peer(peer.ip(), None);
        // One span per connection, `remote_link{peer}`, opened by
        // serve_stream: each live span keeps its formatted fields.
        tokio::spawn(server.serve_stream(tcp, protocol, peer));
    }
}
