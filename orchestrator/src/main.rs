//! `drover`: the orchestrator (`drover serve`) and its CLI.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drover::cli::certs::CertsCmd;
use drover::cli::{Client, ClientCmd, Output};
use drover::history::HistoryConfig;
use drover::http::tls::ServeTlsArgs;
use drover::server::{self, BrokerMode, ServerConfig};
use drover_agent::tls::BrokerUrl;
use drover_shared::topic::Topics;
use drover_shared::DeviceId;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Orchestrate fleets of Docker devices over MQTT"
)]
struct Cli {
    /// Base URL of the Drover REST API (client commands).
    #[arg(
        long,
        global = true,
        env = "DROVER_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// CA certificate (PEM) to trust for an https:// API (client commands).
    #[arg(long, global = true, env = "DROVER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Output format of client commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// File holding the API token. Default: the token in DROVER_TOKEN, else
    /// the admin token a local `drover serve` wrote to
    /// .drover/orchestrator/admin.token, if that file exists.
    #[arg(long, global = true, env = "DROVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the orchestrator with its embedded broker and database.
    Serve(Box<Serve>),
    /// Create a CA and the server and device certificates for TLS.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    #[command(flatten)]
    Client(ClientCmd),
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// A TOML file of settings for `serve`: keys are the long flag names
    /// (`data-dir = "/var/lib/drover"`); flags and environment variables
    /// win over it.
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the redb database.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = ".drover/orchestrator")]
    data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, env = "DROVER_API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// Address of the embedded MQTT broker.
    #[arg(long, env = "DROVER_MQTT_LISTEN", default_value = "0.0.0.0:1883")]
    mqtt_listen: SocketAddr,
    /// Use this external broker (mqtt://HOST:PORT or mqtts://HOST:PORT) instead of the embedded one.
    #[arg(long, env = "DROVER_BROKER")]
    broker: Option<String>,
    /// Root of the MQTT topic tree.
    #[arg(long, env = "DROVER_TOPIC_ROOT", default_value = "drover")]
    topic_root: String,
    /// Also run a device agent for this machine's Docker in the same process.
    #[arg(long)]
    local_agent: bool,
    /// State directory of the local agent.
    #[arg(long, default_value = ".drover/agent")]
    agent_state_dir: PathBuf,
    /// Device id of the local agent (default: generated once and kept).
    #[arg(long)]
    agent_device_id: Option<String>,
    /// Let every MQTT client into the embedded broker with every right. For
    /// development and load tests only: no device identity, no topic
    /// isolation.
    #[arg(long)]
    insecure_open_broker: bool,
    /// Seconds without a live message after which a device counts as
    /// offline, for agents whose heartbeats do not say their interval
    /// (newer agents: three missed heartbeats).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    device_timeout: u64,
    /// Username for an external broker (`--broker`); the password comes
    /// from DROVER_BROKER_PASSWORD, never from the command line.
    #[arg(long, env = "DROVER_BROKER_USERNAME", requires = "broker")]
    broker_username: Option<String>,
    /// Hours of full-resolution telemetry kept per device (every sample);
    /// at most --history-days × 24.
    #[arg(long, env = "DROVER_HISTORY_RAW_HOURS", default_value_t = 24)]
    history_raw_hours: u64,
    /// Days of five-minute telemetry buckets (average and maximum) and of
    /// container log lines kept.
    #[arg(long, env = "DROVER_HISTORY_DAYS", default_value_t = 30)]
    history_days: u64,
    /// Log lines kept per device, app and container (the newest).
    #[arg(long, env = "DROVER_HISTORY_LOG_LINES", default_value_t = 10_000)]
    history_log_lines: u64,
    /// Publish the fleet as JSON under <root>/v1/json/ for automation
    /// (status, inventory, state, telemetry, events, operations, rollouts).
    #[arg(long, env = "DROVER_JSON_MIRROR", default_value_t = true, action = clap::ArgAction::Set)]
    json_mirror: bool,
    /// Announce every device to Home Assistant (MQTT discovery), whose
    /// switches send requests as this automation identity (`drover
    /// mqtt-users create NAME --role operator ...`).
    #[arg(long, env = "DROVER_HOMEASSISTANT_USER")]
    homeassistant_user: Option<String>,
    /// Home Assistant's discovery prefix.
    #[arg(
        long,
        env = "DROVER_HOMEASSISTANT_PREFIX",
        default_value = "homeassistant",
        requires = "homeassistant_user"
    )]
    homeassistant_prefix: String,
    /// Per-device gauges on /metrics (online, CPU, memory, disk, labelled
    /// `device`): one series per device and gauge, as many as the fleet
    /// has devices. `--metrics-per-device=false` leaves them out.
    #[arg(long, env = "DROVER_METRICS_PER_DEVICE", default_value_t = true, action = clap::ArgAction::Set)]
    metrics_per_device: bool,
    /// Announce this orchestrator on the local network by multicast DNS
    /// (DNS-SD `_drover._tcp`) so agents started without --broker find it.
    /// Default: on when the embedded broker listens on a non-loopback
    /// address; `--mdns` forces it on, `--mdns=false` off.
    #[arg(long, env = "DROVER_MDNS", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    mdns: Option<bool>,
    /// The instance name agents see (and pick with `drover-agent
    /// --discover-name`). Default: the host name.
    #[arg(long, env = "DROVER_MDNS_NAME")]
    mdns_name: Option<String>,
    #[command(flatten)]
    tls: ServeTlsArgs,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutting down");
}

async fn serve(args: Serve) -> Result<()> {
    if let Some(path) = &args.config {
        info!(file = %path.display(), "settings from the config file under flags and environment");
    }
    let history = HistoryConfig {
        raw_hours: args.history_raw_hours,
        days: args.history_days,
        log_lines: args.history_log_lines,
    };
    history.validate()?;
    let topics = Topics::new(args.topic_root.clone())
        .with_context(|| format!("--topic-root {:?}", args.topic_root))?;
    let agent_id = args
        .agent_device_id
        .as_deref()
        .map(DeviceId::new)
        .transpose()
        .with_context(|| {
            format!(
                "--agent-device-id {:?}",
                args.agent_device_id.as_deref().unwrap_or_default()
            )
        })?;
    let broker_url = args
        .broker
        .as_deref()
        .map(BrokerUrl::parse)
        .transpose()
        .context("--broker")?;
    let tls = args.tls.resolve(broker_url.as_ref())?;
    let broker = match broker_url {
        Some(url) => BrokerMode::External {
            host: url.host,
            port: url.port,
        },
        None => BrokerMode::Embedded {
            listen: args.mqtt_listen,
        },
    };
    let broker_credentials = match &args.broker_username {
        Some(u) => Some((
            u.clone(),
            std::env::var("DROVER_BROKER_PASSWORD")
                .context("--broker-username needs the password in DROVER_BROKER_PASSWORD")?,
        )),
        None => None,
    };
    let token_file = args
        .data_dir
        .join(drover::security::access::ADMIN_TOKEN_FILE);
    let mut config = ServerConfig::new(args.data_dir);
    config.mqtt_auth = !args.insecure_open_broker;
    config.device_timeout = std::time::Duration::from_secs(args.device_timeout);
    config.broker_credentials = broker_credentials;
    config.api_listen = args.api_listen;
    config.broker = broker;
    config.topics = topics.clone();
    config.mqtts = tls.mqtts;
    config.api_tls = tls.api;
    config.broker_tls = tls.broker_client;
    config.history = history;
    config.automation.json_mirror = args.json_mirror;
    if let Some(user) = args.homeassistant_user {
        let user = drover_shared::Name::new(user.clone())
            .with_context(|| format!("--homeassistant-user {user:?}"))?;
        let discovery = drover_shared::topic::Discovery::new(args.homeassistant_prefix.clone())
            .with_context(|| format!("--homeassistant-prefix {:?}", args.homeassistant_prefix))?;
        config.automation.homeassistant = Some(drover::automation::HomeAssistantConfig {
            user: user.as_str().to_string(),
            discovery,
        });
    }
    config.metrics_per_device = args.metrics_per_device;
    let host = drover::mdns::host_label();
    config.mdns = Some(drover::mdns::MdnsConfig {
        mode: match args.mdns {
            None => drover::mdns::MdnsMode::Auto,
            Some(true) => drover::mdns::MdnsMode::On,
            Some(false) => drover::mdns::MdnsMode::Off,
        },
        name: args.mdns_name.unwrap_or_else(|| host.clone()),
        host,
    });

    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let orch = server::start(config, wait(rx.clone())).await?;
    let mqtts = orch
        .mqtts_addr
        .map(|a| format!("  MQTTS on {a}"))
        .unwrap_or_default();
    println!(
        "drover: REST API on {}  MQTT on {}:{}{mqtts}",
        orch.api_url(),
        orch.mqtt_addr.0,
        orch.mqtt_addr.1
    );
    if let Some(path) = &orch.admin_token_file {
        println!(
            "drover: the first admin API token is in {} (the CLI reads it from there)",
            path.display()
        );
    }
    if token_file.exists() {
        println!(
            "drover: console: {}/ — sign in with the token in {}",
            orch.api_url(),
            token_file.display()
        );
    } else {
        println!(
            "drover: console: {}/ — sign in with an API token (drover tokens create NAME --role viewer)",
            orch.api_url()
        );
    }

    let agent = if args.local_agent {
        let mut cfg = drover_agent::AgentConfig::new(
            orch.mqtt_addr.0.clone(),
            orch.mqtt_addr.1,
            args.agent_state_dir,
        );
        cfg.device_id = agent_id;
        cfg.topics = topics;
        // The agent in this process needs no enrollment: the orchestrator
        // issues its credential directly, unless it already has one.
        let identity = drover_agent::identity_for(&cfg).context("local agent")?;
        let state = orch.identities.credential_state(&identity.device);
        let guarded = args.broker.is_none() && !args.insecure_open_broker;
        if guarded && state == drover::contract::CredentialState::Revoked {
            // A revoked device stays out, this one included: a restart
            // must not quietly undo an admin's revocation.
            tracing::warn!(
                device = %identity.device,
                "the local agent's device is revoked and stays disconnected; give the local agent another --agent-device-id, or re-enroll this one with drover-agent and a token made for it"
            );
        } else if guarded
            && (identity.credential.is_none() || state != drover::contract::CredentialState::Active)
        {
            let password = orch
                .identities
                .issue_local(&identity.device)
                .await
                .context("issuing the local agent's credential")?;
            drover_agent::save_credential(&cfg.state_dir, &identity.device, &password)
                .context("storing the local agent's credential")?;
        }
        Some(tokio::spawn(drover_agent::run(cfg, wait(rx.clone()))))
    } else {
        None
    };
    let res = orch.wait().await;
    if let Some(a) = agent {
        match tokio::time::timeout(Duration::from_secs(10), a).await {
            Ok(Ok(Err(e))) => eprintln!("drover: local agent: {e}"),
            Err(_) => eprintln!("drover: local agent did not stop in time"),
            _ => {}
        }
    }
    res.map_err(Into::into)
}

/// The token for CLI requests: --token-file, else DROVER_TOKEN, else the
/// default admin token file when it exists, else none (the API answers 401).
fn api_token(file: Option<&std::path::Path>) -> Result<Option<String>> {
    if let Some(f) = file {
        let t =
            std::fs::read_to_string(f).with_context(|| format!("--token-file {}", f.display()))?;
        return Ok(Some(t.trim().to_string()));
    }
    if let Ok(t) = std::env::var("DROVER_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    let default = std::path::Path::new(".drover/orchestrator")
        .join(drover::security::access::ADMIN_TOKEN_FILE);
    Ok(std::fs::read_to_string(default)
        .ok()
        .map(|t| t.trim().to_string()))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match drover_agent::config_file::parse::<Cli>() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("drover: error: {}", error_chain(&e.into()));
            return std::process::ExitCode::FAILURE;
        }
    };
    // The only provider compiled in; installed so nothing can pick another.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let res = match cli.command {
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                        tracing_subscriber::EnvFilter::new("info,rumqttd=warn")
                    }),
                )
                .init();
            serve(*args).await
        }
        Command::Certs { cmd } => drover::cli::certs::run(&cmd)
            .map(|written| {
                for w in written {
                    println!("wrote {}: {}", w.path.display(), w.what);
                }
            })
            .map_err(Into::into),
        Command::Client(cmd) => match api_token(cli.token_file.as_deref())
            .and_then(|t| Client::new(&cli.api, cli.output, t.as_deref(), cli.ca_cert.as_deref()))
        {
            Ok(c) => c.run(cmd).await,
            Err(e) => Err(e),
        },
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover: error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. `{:#}` would print a cause twice
/// where a message already ends with it (`cannot read F: {source}`), so a
/// cause is added only when the text so far does not end with it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.ends_with(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged config file with every `#key = value` example
    /// uncommented.
    fn packaged_config_uncommented(text: &str) -> tempfile::NamedTempFile {
        let all = drover_agent::config_file::uncomment_examples(text);
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), all).expect("write config");
        f
    }

    /// Every setting the packaged /etc/drover/drover.toml shows, commented
    /// out or not, is a key `drover serve` takes.
    #[test]
    fn the_packaged_config_names_real_flags() {
        let f = packaged_config_uncommented(include_str!("../debian/drover.toml"));
        let path = f.path().to_str().expect("utf-8 path");
        let cli: Cli =
            drover_agent::config_file::try_parse_from(["drover", "serve", "--config", path])
                .expect("packaged config");
        let Command::Serve(serve) = cli.command else {
            panic!("not serve: {cli:?}")
        };
        assert_eq!(serve.data_dir, PathBuf::from("/var/lib/drover"));
        assert_eq!(serve.history_days, 30);
        assert_eq!(serve.broker_username.as_deref(), Some("drover"));
    }
}
