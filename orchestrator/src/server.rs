//! Starting and stopping the orchestrator: store, broker, MQTT link,
//! service loop and REST API, in that order, with one shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_broker::{Access as BrokerAccess, Broker, BrokerConfig, BrokerError, TlsListenerConfig};
use drover_shared::identity::ORCHESTRATOR_USERNAME;
use drover_shared::topic::Topics;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::automation::AutomationConfig;
use crate::engine::rule_defs::RuleDefs;
use crate::engine::{Commands, Engine, Outbox};
use crate::history::{History, HistoryConfig, HistoryError};
use crate::http::tls::{ApiListener, ApiTls};
use crate::http::Api;
use crate::link::LinkConfig;
use crate::metrics::Metrics;
use crate::security::access::{Access, AccessError};
use crate::security::identity::Identities;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError};

/// The client id of the JSON mirror's in-process link to the embedded
/// broker. `:` keeps it out of reach of every remote login: a device id
/// cannot hold one and the guard prefixes every other session id.
const MIRROR_LINK_ID: &str = "drover:json-mirror";

/// Which broker the orchestrator and its devices use.
#[derive(Debug, Clone)]
pub enum BrokerMode {
    /// Run rumqttd in this process. Port 0 picks a free port.
    Embedded { listen: SocketAddr },
    /// Use a broker that is already running (Mosquitto, EMQX, …).
    External { host: String, port: u16 },
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub broker: BrokerMode,
    pub topics: Topics,
    /// MQTT client id of the orchestrator; stable so its session persists.
    pub client_id: String,
    /// Whether the embedded broker checks credentials and permissions.
    /// Off only for development and load tests.
    pub mqtt_auth: bool,
    /// Username and password for an external broker.
    pub broker_credentials: Option<(String, String)>,
    /// An MQTT-over-TLS listener on the embedded broker, besides the plain
    /// one (which the orchestrator's own client uses).
    pub mqtts: Option<TlsListenerConfig>,
    /// Serve the REST API over HTTPS instead of HTTP.
    pub api_tls: Option<ApiTls>,
    /// TLS client config for an external mqtts:// broker.
    pub broker_tls: Option<Arc<rustls::ClientConfig>>,
    /// A device whose heartbeats do not announce their interval counts as
    /// offline after this long without a live message (others after
    /// `MISSED_HEARTBEATS` of their intervals).
    pub device_timeout: Duration,
    /// The REST API's header-read timeout and connection limit.
    pub api_limits: crate::http::tls::ServeLimits,
    /// How much telemetry history and how many log lines to keep.
    pub history: HistoryConfig,
    /// The JSON tree, commands over MQTT, Home Assistant discovery.
    pub automation: AutomationConfig,
    /// Per-device gauges on `/metrics` (`--metrics-per-device`).
    pub metrics_per_device: bool,
    /// Announcing the orchestrator by multicast DNS (`--mdns`); `None`:
    /// never (what tests and embedders get unless they ask).
    pub mdns: Option<crate::mdns::MdnsConfig>,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker: BrokerMode::Embedded {
                listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            },
            topics: Topics::default(),
            client_id: "drover-orchestrator".into(),
            mqtt_auth: true,
            broker_credentials: None,
            mqtts: None,
            api_tls: None,
            broker_tls: None,
            device_timeout: Duration::from_secs(30),
            api_limits: Default::default(),
            history: HistoryConfig::default(),
            automation: AutomationConfig::default(),
            metrics_per_device: true,
            mdns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot listen for the REST API on {addr}: {source}")]
    ApiBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("REST API server failed: {0}")]
    Api(std::io::Error),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("REST API TLS: {0}")]
    ApiTls(drover_broker::TlsError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("{0}")]
    Automation(String),
    #[error(transparent)]
    Mdns(#[from] crate::mdns::MdnsError),
}

/// A running orchestrator.
pub struct Orchestrator {
    /// Where the REST API listens.
    pub api_addr: SocketAddr,
    /// Where MQTT clients (agents) should connect.
    pub mqtt_addr: (String, u16),
    /// Device credentials and enrollment, e.g. to issue the in-process
    /// agent its credential.
    pub identities: Arc<Identities>,
    /// Where the first admin API token was written, when this start
    /// created it.
    pub admin_token_file: Option<PathBuf>,
    /// Where the embedded broker's MQTTS listener is bound, if configured.
    pub mqtts_addr: Option<SocketAddr>,
    /// Whether the REST API is served over HTTPS.
    pub api_https: bool,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Orchestrator {
    /// Base URL of the REST API.
    pub fn api_url(&self) -> String {
        let scheme = if self.api_https { "https" } else { "http" };
        format!("{scheme}://{}", self.api_addr)
    }

    /// Waits until the orchestrator has shut down.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task
            .await
            .unwrap_or_else(|e| Err(ServeError::Api(std::io::Error::other(e))))
    }
}

/// Binds everything and starts serving. Any bad setting or taken port is an
/// error here, before anything is served.
pub async fn start(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Orchestrator, ServeError> {
    config.history.validate()?;
    if config.automation.homeassistant.is_some() && !config.automation.json_mirror {
        return Err(ServeError::Automation(
            "--homeassistant-user needs the JSON mirror: Home Assistant reads the JSON tree; drop --json-mirror=false".into(),
        ));
    }
    // Certificate files are checked before anything is bound (the MQTTS
    // ones by `Broker::start`, before its ports).
    let api_tls = config
        .api_tls
        .as_ref()
        .map(ApiTls::server_config)
        .transpose()
        .map_err(ServeError::ApiTls)?;
    crate::security::access::create_private_dir(&config.data_dir).map_err(|source| {
        ServeError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        }
    })?;
    let db_path = config.data_dir.join("drover.redb");
    let store = tokio::task::spawn_blocking(move || Store::open(&db_path))
        .await
        .map_err(|e| StoreError::Db(e.to_string()))??;
    // Telemetry and logs have their own file and writer: their commits
    // never wait on the control plane's, nor the other way round.
    let history_path = config.data_dir.join("history.redb");
    let history_config = config.history;
    let history =
        tokio::task::spawn_blocking(move || History::open(&history_path, &history_config))
            .await
            .map_err(|e| HistoryError::Db(e.to_string()))??;
    let metrics = Arc::new(Metrics::new(config.metrics_per_device));
    let writer = StoreWriter::spawn(store.clone(), metrics.clone());
    let identities = Arc::new(Identities::load(
        store.clone(),
        writer.clone(),
        config.topics.clone(),
    )?);

    let mut embedded_listen = None;
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_stopping = stop_rx.clone();
    let stopped_rx = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // The broker stops last, after the API has drained and our own client
    // (and any in-process agent) has disconnected cleanly.
    let (broker_stop_tx, broker_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut broker_task = None;
    let mut mqtts_addr = None;
    let mut mirror_publisher = None;
    let mqtt_addr = match &config.broker {
        BrokerMode::Embedded { listen } => {
            let mut listen = *listen;
            if listen.port() == 0 {
                // rumqttd binds inside its own accept loop and cannot report
                // the port it got, so pick a free one here.
                let probe =
                    std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
                        addr: listen,
                        source,
                    })?;
                listen = probe.local_addr().map_err(|source| BrokerError::Bind {
                    addr: listen,
                    source,
                })?;
            }
            embedded_listen = Some(listen);
            let mut broker_config = BrokerConfig::new(listen);
            broker_config.topics = config.topics.clone();
            broker_config.tls = config.mqtts.clone();
            let access = if config.mqtt_auth {
                BrokerAccess::Guarded(identities.clone())
            } else {
                BrokerAccess::Open
            };
            let broker = Broker::start(broker_config, access)?;
            identities.attach_connections(broker.connections());
            metrics.set_broker(broker.stats(), broker.connections());
            mqtts_addr = broker.tls_addr();
            // The JSON mirror's telemetry goes straight into the router,
            // in batches (see `automation::mirror`).
            if config.automation.json_mirror {
                mirror_publisher = Some(broker.local_publisher(MIRROR_LINK_ID).await?);
            }
            broker_task = Some(tokio::spawn(broker.run(async move {
                let _ = broker_stop_rx.await;
            })));
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            (host, listen.port())
        }
        BrokerMode::External { host, port } => (host.clone(), *port),
    };

    let listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| ServeError::ApiBind {
            addr: config.api_listen,
            source,
        })?;
    let api_addr = listener
        .local_addr()
        .map_err(|source| ServeError::ApiBind {
            addr: config.api_listen,
            source,
        })?;
    let api_https = api_tls.is_some();
    let listener = ApiListener::new(listener, api_tls);
    // Announced once everything agents need is bound; withdrawn as soon as
    // shutdown begins, so no agent finds an orchestrator on its way out.
    let advertiser = match &config.mdns {
        Some(m) => {
            let listeners = crate::mdns::Listeners {
                mqtt: embedded_listen,
                mqtts: mqtts_addr,
                api: api_addr,
                api_https,
            };
            match crate::mdns::plan(m.mode, &listeners, &m.host, env!("CARGO_PKG_VERSION"))? {
                Some(plan) => match crate::mdns::Advertiser::start(m, &plan) {
                    Ok(a) => Some(a),
                    Err(e) if m.mode == crate::mdns::MdnsMode::Auto => {
                        warn!(error = %e, "cannot announce this orchestrator by multicast DNS; agents need --broker");
                        None
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            }
        }
        None => None,
    };
    let mdns_task = advertiser.map(|a| {
        let stop = stopped();
        tokio::spawn(async move {
            stop.await;
            a.stop().await;
        })
    });

    let credentials = match &config.broker {
        BrokerMode::Embedded { .. } => Some((
            ORCHESTRATOR_USERNAME.to_string(),
            identities.orchestrator_secret().to_string(),
        )),
        BrokerMode::External { .. } => config.broker_credentials.clone(),
    };
    let link = LinkConfig {
        credentials,
        host: mqtt_addr.0.clone(),
        port: mqtt_addr.1,
        client_id: config.client_id.clone(),
        keep_alive: Duration::from_secs(15),
        topics: config.topics.clone(),
        tls: match config.broker {
            BrokerMode::External { .. } => config.broker_tls.clone(),
            BrokerMode::Embedded { .. } => None,
        },
    };
    let (client, eventloop) = crate::link::connect(&link);
    let access = Arc::new(Access::load(store.clone(), writer.clone())?);
    let admin_token_file = access.bootstrap_admin(&config.data_dir).await?;
    let (outbox, outbox_task) =
        Outbox::spawn(client.clone(), config.topics.clone(), metrics.clone());
    let (events_tx, events_rx) = mpsc::channel(10_000);
    let agent_releases = {
        let (store, writer, dir) = (store.clone(), writer.clone(), config.data_dir.clone());
        Arc::new(
            tokio::task::spawn_blocking(move || {
                crate::engine::agent_releases::AgentReleases::load(&store, writer, &dir)
            })
            .await
            .map_err(|e| StoreError::Db(e.to_string()))??,
        )
    };
    let blobs = crate::engine::agent_releases::BlobServer::spawn(
        agent_releases.clone(),
        outbox.clone(),
        metrics.clone(),
    );
    let (engine, engine_task) = Engine::spawn(
        store.clone(),
        writer.clone(),
        outbox.clone(),
        events_rx,
        metrics.clone(),
        identities.clone(),
        access.clone(),
        config.device_timeout,
        Some(blobs),
    )?;
    let history_writer = history.start(engine.subscribe(), metrics.clone());
    tokio::spawn(crate::metrics::follow(engine.subscribe(), metrics.clone()));
    // Topics outside the device tree that automation and rules ask for,
    // and where the link hands what arrives on them.
    let subscriptions = crate::link::Subscriptions::new(client.clone());
    let (inbox, _) = tokio::sync::broadcast::channel(crate::link::INBOX);
    let link_task = tokio::spawn(crate::link::drive(
        client.clone(),
        eventloop,
        link,
        events_tx,
        subscriptions.clone(),
        inbox.clone(),
        metrics.clone(),
    ));
    let rule_defs = {
        let (store, writer, topics) = (store.clone(), writer.clone(), config.topics.clone());
        tokio::task::spawn_blocking(move || RuleDefs::load(store, writer, topics))
            .await
            .map_err(|e| StoreError::Db(e.to_string()))??
    };
    let registries = Arc::new(crate::registry::Registries::new(metrics.clone()));
    let commands = Commands::new(
        engine.clone(),
        identities.clone(),
        access,
        metrics,
        Arc::new(rule_defs),
        registries,
        agent_releases,
        store,
    );
    let mut automation_config = config.automation.clone();
    // Only the embedded broker's ACL makes `json/req/<name>` speak for
    // `<name>`; anywhere else a request's topic proves nothing.
    let guarded = matches!(config.broker, BrokerMode::Embedded { .. }) && config.mqtt_auth;
    if automation_config.requests && !guarded {
        automation_config.requests = false;
        info!("MQTT commands (JSON requests) are off: they need the embedded broker with authentication, which alone enforces who publishes on each request topic");
    }
    if let Some(ha) = &automation_config.homeassistant {
        if identities.automation_role(&ha.user).is_none() {
            warn!(user = %ha.user, "Home Assistant discovery names an automation identity that does not exist yet; its switches work once `drover mqtt-users create` makes it");
        }
    }
    let automation = crate::automation::start(
        automation_config,
        config.topics.clone(),
        commands.clone(),
        outbox.clone(),
        &subscriptions,
        &inbox,
        mirror_publisher,
        stopped_rx.clone(),
    )
    .await;
    // Rules hold a clone of the outbox: the task ends (and drops it) at
    // the shutdown signal, before the outbox is drained below.
    let rules_task = crate::rules::spawn(
        crate::rules::RulesDeps {
            commands: commands.clone(),
            outbox,
            subscriptions,
            inbox,
            topics: config.topics.clone(),
        },
        stopped(),
    );

    info!(api = %api_addr, https = api_https, mqtts = ?mqtts_addr, mqtt = %format!("{}:{}", mqtt_addr.0, mqtt_addr.1), data = %config.data_dir.display(), "drover orchestrator started");
    let app = crate::http::router(Arc::new(Api {
        commands,
        history,
        stopping: api_stopping,
        secure_cookies: api_https,
    }));
    let stop_api = stopped();
    let api_limits = config.api_limits;
    let task = tokio::spawn(async move {
        // 1. Intake stops: the API answers what it has begun (long polls
        //    and change streams end at once) and takes nothing new.
        let served = listener.serve(app, stop_api, api_limits).await;
        //    The automation tasks answer the requests they have begun and
        //    end, dropping their outbox clones (the outbox drains in 3.).
        automation.join().await;
        // 2. The engine finishes the changes in flight: their writes
        //    committed or failed, their replies sent, their publishes queued.
        //    Rules stop first: their actions are commands to the engine.
        let _ = rules_task.await;
        engine.shutdown().await;
        let _ = engine_task.await;
        // 3. What the engine queued for devices reaches the MQTT client...
        if tokio::time::timeout(Duration::from_secs(10), outbox_task)
            .await
            .is_err()
        {
            warn!("the outbox did not drain within 10 s; devices get the rest on resync");
        }
        // 4. ...and the broker, before our client says goodbye. The link
        //    ends on its own DISCONNECT and does not reconnect.
        if tokio::time::timeout(Duration::from_secs(5), client.disconnect())
            .await
            .is_err()
        {
            warn!("MQTT disconnect timed out");
        }
        if tokio::time::timeout(Duration::from_secs(5), link_task)
            .await
            .is_err()
        {
            warn!("the MQTT link did not close within 5 s");
        }
        // 5. Everything queued for redb (audit records too) is committed
        //    and the writer task has ended; so is what the history holds
        //    of the engine's last changes.
        writer.close().await;
        history_writer.close().await;
        //    The multicast DNS goodbye went out at the signal.
        if let Some(t) = mdns_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // 6. Last, the broker.
        let _ = broker_stop_tx.send(());
        if let Some(b) = broker_task {
            let _ = b.await;
        }
        info!("drover orchestrator stopped");
        served.map_err(ServeError::Api)
    });
    Ok(Orchestrator {
        api_addr,
        mqtt_addr,
        identities,
        admin_token_file,
        mqtts_addr,
        api_https,
        task,
    })
}
