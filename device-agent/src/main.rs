//! `drover-agent`: parses arguments, sets up logging, runs the agent until
//! SIGTERM or Ctrl-C.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use drover_agent::tls::{BrokerUrl, ClientTlsFiles};
use drover_agent::AgentConfig;
use drover_shared::topic::Topics;
use drover_shared::DeviceId;

#[derive(Debug, Parser)]
#[command(name = "drover-agent", version, about = "The Drover device agent")]
struct Args {
    /// A TOML file of settings: keys are the long flag names
    /// (`broker = "mqtt://hub:1883"`); flags and environment variables win
    /// over it.
    #[arg(long, env = "DROVER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Broker address, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, 8883 by
    /// default). Without it the agent looks for an orchestrator on the local
    /// network (DNS-SD `_drover._tcp`, multicast DNS).
    #[arg(long, env = "DROVER_BROKER")]
    broker: Option<String>,
    /// Without --broker: connect only to the orchestrator that announces
    /// this instance name (its `drover serve --mdns-name`).
    #[arg(long, env = "DROVER_DISCOVER_NAME", conflicts_with = "broker")]
    discover_name: Option<String>,
    /// Without --broker: seconds to collect answers before choosing.
    #[arg(long, env = "DROVER_DISCOVER_SECS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    discover_secs: u64,
    /// CA certificates (PEM) that sign the broker's certificate; required
    /// with mqtts://. Without --broker: connect to the discovered
    /// orchestrator's MQTTS port and check it against this CA.
    #[arg(long, env = "DROVER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This device's client certificate (PEM), for a broker that requires one.
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// This device's id; generated and stored in the state directory when absent.
    #[arg(long, env = "DROVER_DEVICE_ID")]
    device_id: Option<String>,
    #[arg(long, env = "DROVER_STATE_DIR", default_value = ".drover/agent")]
    state_dir: PathBuf,
    #[arg(long, env = "DROVER_TOPIC_ROOT", default_value = drover_shared::topic::DEFAULT_ROOT)]
    topic_root: String,
    #[arg(long, env = "DROVER_KEEP_ALIVE_SECS", default_value_t = 10)]
    keep_alive_secs: u64,
    #[arg(long, env = "DROVER_HEARTBEAT_SECS", default_value_t = 5)]
    heartbeat_secs: u64,
    #[arg(long, env = "DROVER_TELEMETRY_SECS", default_value_t = 10)]
    telemetry_secs: u64,
    #[arg(long, env = "DROVER_RECONCILE_SECS", default_value_t = 15)]
    reconcile_secs: u64,
    /// First wait before retrying a pull that failed for a reason that may pass.
    #[arg(long, env = "DROVER_PULL_RETRY_BASE_MS", default_value_t = 1000)]
    pull_retry_base_ms: u64,
    /// Longest wait between pull retries.
    #[arg(long, env = "DROVER_PULL_RETRY_MAX_MS", default_value_t = 60_000)]
    pull_retry_max_ms: u64,
    /// Free space required on Docker's data root before a pull starts.
    #[arg(long, env = "DROVER_MIN_FREE_DISK_MB", default_value_t = 256)]
    min_free_disk_mb: u64,
    /// Never remove images, not even ones the agent pulled and no longer uses.
    #[arg(long, env = "DROVER_NO_IMAGE_CLEANUP")]
    no_image_cleanup: bool,
    /// Most unused images removed after one converged pass.
    #[arg(long, env = "DROVER_IMAGE_CLEANUP_MAX_PER_PASS", default_value_t = 5)]
    image_cleanup_max_per_pass: usize,
    /// Unused pulled images to keep anyway, most recently used first.
    #[arg(long, env = "DROVER_KEEP_UNUSED_IMAGES", default_value_t = 0)]
    keep_unused_images: usize,
    /// A file holding an enrollment token, used once when the state
    /// directory has no credential yet. The token may also come from the
    /// environment variable DROVER_ENROLL_TOKEN; never from the command line,
    /// where every user of the machine could read it.
    #[arg(long, env = "DROVER_ENROLL_TOKEN_FILE")]
    enroll_token_file: Option<std::path::PathBuf>,
    /// A label this device sets on itself, KEY=VALUE (repeatable), sent to
    /// the orchestrator in hello; an operator-set label of the same key
    /// wins. Keys as Kubernetes label keys ([prefix/]name), at most 128
    /// bytes; values at most 512 bytes.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = drover_agent::config::parse_label)]
    labels: Vec<(String, String)>,
    /// Seconds a new agent binary (a self-update) has to come online before
    /// the agent goes back to the previous one.
    #[arg(long, env = "DROVER_UPDATE_CONFIRM_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    update_confirm_secs: u64,
}

/// The TLS client config for `url`: mqtts:// needs a CA file; the TLS flags
/// make no sense with plain mqtt://.
fn tls_config(
    url: &BrokerUrl,
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    if !url.tls {
        if ca.is_some() || identity.is_some() {
            bail!("--tls-ca, --tls-cert and --tls-key need an mqtts:// --broker (or no --broker: discovery then uses MQTTS)");
        }
        return Ok(None);
    }
    let Some(ca) = ca else {
        bail!("--broker mqtts://... needs --tls-ca FILE (the CA that signed the broker's certificate)");
    };
    let files = ClientTlsFiles { ca, identity };
    Ok(Some(drover_agent::tls::client_config(&files)?))
}

fn secs(name: &str, s: u64) -> anyhow::Result<Duration> {
    if s == 0 {
        bail!("--{name} must be at least 1");
    }
    Ok(Duration::from_secs(s))
}

/// The broker from --broker, or, without it, a placeholder that discovery
/// fills in (TLS exactly when there is a CA to check the broker with).
fn broker_url(args: &Args) -> anyhow::Result<BrokerUrl> {
    match &args.broker {
        Some(b) => BrokerUrl::parse(b).context("--broker"),
        None => Ok(BrokerUrl {
            host: String::new(),
            port: 0,
            tls: args.tls_ca.is_some(),
        }),
    }
}

fn config(args: Args) -> anyhow::Result<AgentConfig> {
    let url = broker_url(&args)?;
    let identity = args.tls_cert.zip(args.tls_key);
    let tls = tls_config(&url, args.tls_ca, identity)?;
    let mut c = AgentConfig::new(url.host, url.port, args.state_dir);
    c.tls = tls;
    c.device_id = args
        .device_id
        .map(|d| DeviceId::new(d.clone()).with_context(|| format!("--device-id {d:?} is invalid")))
        .transpose()?;
    c.topics = Topics::new(args.topic_root.clone())
        .with_context(|| format!("--topic-root {:?} is invalid", args.topic_root))?;
    c.keep_alive = secs("keep-alive-secs", args.keep_alive_secs)?;
    c.heartbeat_interval = secs("heartbeat-secs", args.heartbeat_secs)?;
    c.telemetry_interval = secs("telemetry-secs", args.telemetry_secs)?;
    c.reconcile_interval = secs("reconcile-secs", args.reconcile_secs)?;
    if args.pull_retry_base_ms == 0 {
        bail!("--pull-retry-base-ms must be at least 1");
    }
    if args.pull_retry_max_ms < args.pull_retry_base_ms {
        bail!(
            "--pull-retry-max-ms ({}) must not be below --pull-retry-base-ms ({})",
            args.pull_retry_max_ms,
            args.pull_retry_base_ms
        );
    }
    c.pull_retry_base = Duration::from_millis(args.pull_retry_base_ms);
    c.pull_retry_max = Duration::from_millis(args.pull_retry_max_ms);
    c.min_free_disk_bytes = args.min_free_disk_mb.saturating_mul(1024 * 1024);
    c.image_cleanup = !args.no_image_cleanup;
    c.image_cleanup_max_per_pass = args.image_cleanup_max_per_pass;
    c.keep_unused_images = args.keep_unused_images;
    c.labels = args.labels.into_iter().collect();
    c.self_update = match drover_agent::update::SelfUpdate::of_this_process(Duration::from_secs(
        args.update_confirm_secs,
    )) {
        Ok(me) => Some(me),
        Err(e) => {
            // Runs, but cannot tell its own digest: no self-update.
            eprintln!("drover-agent: cannot read the running binary ({e}); self-update is off");
            None
        }
    };
    c.enroll_token = match (
        &args.enroll_token_file,
        std::env::var("DROVER_ENROLL_TOKEN"),
    ) {
        (Some(path), _) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("--enroll-token-file {}", path.display()))?;
            let t = t.trim();
            if t.is_empty() {
                bail!("--enroll-token-file {} is empty", path.display());
            }
            Some(drover_shared::payload::Secret::new(t))
        }
        (None, Ok(t)) if !t.trim().is_empty() => {
            Some(drover_shared::payload::Secret::new(t.trim()))
        }
        _ => None,
    };
    Ok(c)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Discovers the broker first where there is no --broker (until SIGTERM,
/// which ends the agent before it ever connects), then runs the agent.
async fn run(
    mut config: AgentConfig,
    browse: Option<drover_agent::discovery::Browse>,
) -> anyhow::Result<()> {
    if let Some(b) = browse {
        let ep = tokio::select! {
            r = drover_agent::discovery::discover(&b) => r?,
            () = shutdown_signal() => return Ok(()),
        };
        if !ep.tls {
            tracing::warn!(
                orchestrator = %ep.instance,
                "discovered over plain MQTT: anyone on this network could have answered, and gets the enrollment token or credential; on a network you do not trust, use --tls-ca (or --broker)"
            );
        }
        config.broker_host = ep.addr.to_string();
        config.broker_port = ep.port;
    }
    drover_agent::run(config, shutdown_signal())
        .await
        .map_err(anyhow::Error::from)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match drover_agent::config_file::parse::<Args>() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("drover-agent: {}", error_chain(&e.into()));
            return std::process::ExitCode::FAILURE;
        }
    };
    // A self-updated binary runs instead of this one (or an update that
    // keeps failing is rolled back) before anything else happens.
    drover_agent::update::launch_at_start(&args.state_dir);
    // The only provider compiled in; installed so nothing can pick another.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(path) = &args.config {
        tracing::info!(file = %path.display(), "settings from the config file under flags and environment");
    }
    let browse = args
        .broker
        .is_none()
        .then(|| drover_agent::discovery::Browse {
            name: args.discover_name.clone(),
            window: Duration::from_secs(args.discover_secs),
            have_ca: args.tls_ca.is_some(),
        });
    let result = match config(args) {
        Ok(config) => run(config, browse).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-agent: {}", error_chain(&e));
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

    #[test]
    fn tls_flags_must_match_the_scheme() {
        let err = config(args(&["--broker", "mqtts://h:8883"])).expect_err("no CA");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let err =
            config(args(&["--broker", "mqtt://h", "--tls-ca", "ca.pem"])).expect_err("plain mqtt");
        assert!(err.to_string().contains("mqtts://"), "{err}");
        let err = config(args(&[
            "--broker",
            "mqtts://h",
            "--tls-ca",
            "/nonexistent/ca.pem",
        ]))
        .expect_err("missing file");
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.pem"),
            "{err:#}"
        );
        assert!(Args::try_parse_from(["drover-agent", "--tls-cert", "c.pem"]).is_err());
        assert!(config(args(&["--broker", "ftp://h"])).is_err());
    }

    #[test]
    fn no_broker_means_discovery() {
        let a = args(&[]);
        assert!(a.broker.is_none());
        assert_eq!(a.discover_secs, 3);
        // Discovery with a CA connects with TLS: the CA is loaded up front.
        let err = config(args(&["--tls-ca", "/nonexistent/ca.pem"])).expect_err("missing CA");
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.pem"),
            "{err:#}"
        );
        let a = args(&["--discover-name", "barn"]);
        assert_eq!(a.discover_name.as_deref(), Some("barn"));
        assert!(Args::try_parse_from([
            "drover-agent",
            "--broker",
            "mqtt://h",
            "--discover-name",
            "barn"
        ])
        .is_err());
        assert!(Args::try_parse_from(["drover-agent", "--discover-secs", "0"]).is_err());
    }

    fn args(extra: &[&str]) -> Args {
        Args::parse_from(["drover-agent"].iter().chain(extra))
    }

    #[test]
    fn pull_and_cleanup_flags() {
        let c = config(args(&[])).expect("defaults are valid");
        assert_eq!(
            (c.pull_retry_base, c.pull_retry_max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        assert_eq!(c.min_free_disk_bytes, 256 * 1024 * 1024);
        assert!(c.image_cleanup);
        assert_eq!((c.image_cleanup_max_per_pass, c.keep_unused_images), (5, 0));
        let c = config(args(&[
            "--pull-retry-base-ms",
            "200",
            "--pull-retry-max-ms",
            "2000",
            "--min-free-disk-mb",
            "100000000",
            "--no-image-cleanup",
            "--keep-unused-images",
            "3",
        ]))
        .expect("valid");
        assert_eq!(
            (c.pull_retry_base, c.pull_retry_max),
            (Duration::from_millis(200), Duration::from_secs(2))
        );
        assert_eq!(c.min_free_disk_bytes, 100_000_000 * 1024 * 1024);
        assert!(!c.image_cleanup);
        assert_eq!(c.keep_unused_images, 3);
        assert!(config(args(&["--pull-retry-base-ms", "0"])).is_err());
        assert!(config(args(&[
            "--pull-retry-base-ms",
            "5000",
            "--pull-retry-max-ms",
            "1000"
        ]))
        .is_err());
    }

    /// The packaged config file with every `#key = value` example
    /// uncommented.
    fn packaged_config_uncommented(text: &str) -> tempfile::NamedTempFile {
        let all = drover_agent::config_file::uncomment_examples(text);
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), all).expect("write config");
        f
    }

    /// Every setting the packaged /etc/drover/agent.toml shows, commented
    /// out or not, is a key the agent takes.
    #[test]
    fn the_packaged_config_names_real_flags() {
        let f = packaged_config_uncommented(include_str!("../debian/agent.toml"));
        let path = f.path().to_str().expect("utf-8 path");
        let a: Args = drover_agent::config_file::try_parse_from(["drover-agent", "--config", path])
            .expect("packaged config");
        assert_eq!(a.broker.as_deref(), Some("mqtt://drover.example.net:1883"));
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/drover-agent"));
        assert_eq!(a.labels.len(), 2);
    }

    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read f: {source}")]
        struct Read {
            source: std::io::Error,
        }
        let e = anyhow::Error::from(Read {
            source: std::io::Error::other("gone"),
        });
        assert_eq!(error_chain(&e), "cannot read f: gone");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
