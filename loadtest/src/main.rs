//! `drover-loadtest`: parse arguments, set up tracing, run one scenario,
//! print its tables and, with `--record`, append them to RESULTS.md.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use drover_loadtest::report::{Machine, Run};
use drover_loadtest::runtime::RuntimeConfig;
use drover_loadtest::scenario::console::ConsoleArgs;
use drover_loadtest::scenario::{self, Common, FootprintArgs, RolloutPath};
use drover_loadtest::target::{BrokerKind, TargetConfig};
use drover_shared::topic::Topics;

#[derive(Debug, Parser)]
#[command(
    name = "drover-loadtest",
    version,
    about = "Load-test a Drover orchestrator with simulated device agents (real MQTT, real protocol, SIMULATED container runtime)"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// The orchestrator binary the tool starts (and samples).
    #[arg(long, global = true, default_value = "target/release/drover")]
    orchestrator_bin: PathBuf,
    /// Use an orchestrator that is already running (its REST API base URL)
    /// instead of starting one; no RSS/CPU sampling then. Needs --mqtt-port.
    #[arg(long, global = true, requires = "mqtt_port")]
    api: Option<String>,
    /// MQTT port of the already-running orchestrator's broker (with --api).
    #[arg(long, global = true)]
    mqtt_port: Option<u16>,
    /// Mosquitto binary for --broker mosquitto.
    #[arg(long, global = true, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Spread agents over this many loopback destinations 127.0.0.1..127.0.0.K
    /// (each gives its own ~28k ephemeral ports).
    #[arg(long, global = true, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=254))]
    spread: u8,
    /// Seconds between heartbeats of each agent.
    #[arg(long, global = true, default_value_t = 30)]
    heartbeat_secs: u64,
    /// Seconds between telemetry samples of each agent.
    #[arg(long, global = true, default_value_t = 10)]
    telemetry_secs: u64,
    /// MQTT keep-alive of each agent (the real agent's default is 10).
    #[arg(long, global = true, default_value_t = 10)]
    keep_alive_secs: u64,
    /// TCP_NODELAY on the agents' sockets: on by default, as the real agent
    /// sets it; `--tcp-nodelay false` for rumqttc's default.
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    tcp_nodelay: bool,
    /// Agents started per second (start times jittered within each slot).
    #[arg(long, global = true, default_value_t = 500.0)]
    ramp_per_sec: f64,
    /// SIMULATED runtime: milliseconds an image pull takes.
    #[arg(long, global = true, default_value_t = 200)]
    pull_ms: u64,
    /// SIMULATED runtime: milliseconds a container start or stop takes.
    #[arg(long, global = true, default_value_t = 50)]
    start_ms: u64,
    /// SIMULATED runtime: probability that a pull fails (0..1).
    #[arg(long, global = true, default_value_t = 0.0)]
    failure_rate: f64,
    /// Root of the MQTT topic tree.
    #[arg(long, global = true, default_value = "drover")]
    topic_root: String,
    /// Directory for the orchestrator's data and logs of each run.
    #[arg(long, global = true, default_value_os_t = std::env::temp_dir().join("drover-loadtest"))]
    work_dir: PathBuf,
    /// Keep the data directory and logs after the run.
    #[arg(long, global = true)]
    keep: bool,
    /// Append the result to this markdown file (see --results).
    #[arg(long, global = true)]
    record: bool,
    /// Where --record appends.
    #[arg(long, global = true, default_value = "loadtest/RESULTS.md")]
    results: PathBuf,
    /// A label for the record, e.g. "small validation run on a busy machine".
    #[arg(long, global = true)]
    label: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Connect agents in steps until something breaks.
    Ramp {
        /// Cumulative agent counts, e.g. 1000,5000,10000,20000.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1000,5000,10000,15000,20000,30000"
        )]
        steps: Vec<usize>,
        /// Seconds each step may take before it counts as broken.
        #[arg(long, default_value_t = 300)]
        step_timeout_secs: u64,
    },
    /// N agents with heartbeats and telemetry for a while.
    Steady {
        #[arg(long, short = 'n', default_value_t = 10_000)]
        agents: usize,
        /// Seconds of steady state measured (after all are online and a 10 s settle).
        #[arg(long, visible_alias = "duration", default_value_t = 300)]
        duration_secs: u64,
        /// Broker(s), comma-separated; `embedded,mosquitto` runs both in one run and reports the ratio.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "embedded")]
        broker: Vec<BrokerKind>,
    },
    /// One app deployed to every agent as fast as the API takes it: one
    /// request per device, and one rollout request for the fleet.
    Rollout {
        #[arg(long, short = 'n', default_value_t = 10_000)]
        agents: usize,
        /// REST requests in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
        #[arg(long, value_enum, value_delimiter = ',', default_value = "embedded")]
        broker: Vec<BrokerKind>,
        /// One deploy request per device, one rollout request for the
        /// fleet (in 1 and in 10 batches), or both in the same run.
        #[arg(long, value_enum, default_value = "both")]
        path: RolloutPath,
    },
    /// Command round trip on a few probe devices, idle and under load.
    Rtt {
        #[arg(long, default_value_t = 5)]
        probes: usize,
        /// Stop/start requests per probe and phase.
        #[arg(long, default_value_t = 40)]
        rounds: usize,
        /// Also measure with this many steady agents connected (0: idle only).
        #[arg(long, default_value_t = 0)]
        under_load: usize,
        /// How often a probe polls its operation (the resolution).
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
    },
    /// What the image platform check costs a rollout request over N
    /// simulated agents: the registry asked (cache empty) and cached.
    PlatformCheck {
        #[arg(long, short = 'n', default_value_t = 1_000)]
        agents: usize,
        /// Requests after the first, answered from the cache.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// SIGKILL and restart the orchestrator under N agents.
    Storm {
        #[arg(long, short = 'n', default_value_t = 10_000)]
        agents: usize,
        /// Seconds the orchestrator stays dead.
        #[arg(long, default_value_t = 5)]
        down_secs: u64,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// What the web console costs: the orchestrator with no console and
    /// with several open, the feed each receives, the devices page's first
    /// response and its first render in a real headless Chromium.
    Console {
        #[arg(long, short = 'n', default_value_t = 10_000)]
        agents: usize,
        /// Subscribers of the console's feed (/api/v1/changes?coalesce=true)
        /// in the consoles phase, besides the one Chromium page.
        #[arg(long, default_value_t = 5)]
        consoles: usize,
        /// Seconds of each measured phase: baseline, consoles, uncoalesced.
        #[arg(long, visible_alias = "duration", default_value_t = 60)]
        duration_secs: u64,
        /// Sequential requests of the devices page's first page.
        #[arg(long, default_value_t = 200)]
        page_requests: usize,
        /// Rows per page (the console's default).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        page_size: u64,
        /// Fresh loads of #/devices in Chromium for the first-render time.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        render_runs: u64,
        /// chromedriver (Debian's chromium-driver), which starts Chromium.
        #[arg(long, default_value = "chromedriver")]
        chromedriver: PathBuf,
    },
    /// What the JSON mirror and rules cost: one orchestrator without them,
    /// one with the mirror and `--rules` rules, the same fleet on each; and
    /// a rule's latency from an MQTT trigger to its publish action.
    Automation {
        #[arg(long, short = 'n', default_value_t = 10_000)]
        agents: usize,
        /// Rules in the "with" phase (the first is the latency rule).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
        rules: u64,
        /// Seconds of each CPU phase.
        #[arg(long, visible_alias = "duration", default_value_t = 60)]
        duration_secs: u64,
        /// Messages sent through the latency rule (and as many echoes).
        #[arg(long, default_value_t = 500)]
        pings: usize,
        #[arg(long, default_value_t = 20)]
        ping_interval_ms: u64,
    },
    /// `drover deploy/remove --wait` next to `docker run -d` and
    /// `docker stop && docker rm`, real agent on the real Docker daemon.
    E2eLatency {
        #[arg(long, default_value = "target/release/drover-agent")]
        agent_bin: PathBuf,
        /// The `drover` binary run as the CLI (default: --orchestrator-bin).
        #[arg(long)]
        cli_bin: Option<PathBuf>,
        /// An image Docker has locally (pulled first if it does not).
        #[arg(long, default_value = "127.0.0.1:5000/drover/busybox:2")]
        image: String,
        /// The container's command for `/bin/sh -c`, the same on both sides.
        #[arg(long, default_value = drover_loadtest::latency::PROMPT_STOP_CMD)]
        shell_cmd: String,
        /// Measured rounds (after one warm-up round).
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// MQTT publish → receive samples for the round-trip baseline.
        #[arg(long, default_value_t = 200)]
        rtt_samples: usize,
    },
    /// The real drover-agent against the real Docker daemon.
    AgentFootprint {
        #[arg(long, default_value = "target/release/drover-agent")]
        agent_bin: PathBuf,
        /// A real image in the local registry (scripts/test-env.sh pushes it).
        #[arg(long, default_value = "127.0.0.1:5000/drover/busybox:2")]
        image: String,
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Ramp { .. } => "ramp",
            Scenario::Steady { .. } => "steady",
            Scenario::Rollout { .. } => "rollout",
            Scenario::PlatformCheck { .. } => "platform-check",
            Scenario::Rtt { .. } => "rtt",
            Scenario::Storm { .. } => "storm",
            Scenario::AgentFootprint { .. } => "agent-footprint",
            Scenario::Console { .. } => "console",
            Scenario::Automation { .. } => "automation",
            Scenario::E2eLatency { .. } => "e2e-latency",
        }
    }
}

fn common(a: &CommonArgs) -> Result<Common> {
    if !(0.0..=1.0).contains(&a.failure_rate) {
        bail!(
            "--failure-rate must be between 0 and 1, got {}",
            a.failure_rate
        );
    }
    if a.heartbeat_secs == 0 || a.telemetry_secs == 0 {
        bail!("--heartbeat-secs and --telemetry-secs must be at least 1");
    }
    if a.ramp_per_sec.is_nan() || a.ramp_per_sec <= 0.0 {
        bail!("--ramp-per-sec must be greater than 0");
    }
    let topics = Topics::new(a.topic_root.clone())
        .with_context(|| format!("--topic-root {:?}", a.topic_root))?;
    let external = match (&a.api, a.mqtt_port) {
        (Some(url), Some(port)) => Some((url.clone(), port)),
        _ => None,
    };
    if external.is_none() && !a.orchestrator_bin.exists() {
        bail!(
            "{} does not exist; build it with `cargo build --release -p drover` or pass --orchestrator-bin",
            a.orchestrator_bin.display()
        );
    }
    std::fs::create_dir_all(&a.work_dir)
        .with_context(|| format!("--work-dir {}", a.work_dir.display()))?;
    Ok(Common {
        target: TargetConfig {
            orchestrator_bin: a.orchestrator_bin.clone(),
            mosquitto_bin: a.mosquitto_bin.clone(),
            broker: BrokerKind::Embedded,
            spread: a.spread,
            external,
            work_dir: a.work_dir.clone(),
            extra_args: Vec::new(),
        },
        topics,
        heartbeat: Duration::from_secs(a.heartbeat_secs),
        telemetry: Duration::from_secs(a.telemetry_secs),
        keep_alive: Duration::from_secs(a.keep_alive_secs),
        tcp_nodelay: a.tcp_nodelay,
        runtime: RuntimeConfig {
            pull: Duration::from_millis(a.pull_ms),
            start: Duration::from_millis(a.start_ms),
            failure_rate: a.failure_rate,
        },
        ramp_per_sec: a.ramp_per_sec,
        keep: a.keep,
    })
}

/// The command line as typed, quoted where a word needs it.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(cli: Cli) -> Result<()> {
    let c = common(&cli.common)?;
    if cli.common.api.is_some() {
        if let Scenario::Steady { broker, .. } | Scenario::Rollout { broker, .. } = &cli.scenario {
            if broker.contains(&BrokerKind::Mosquitto) {
                bail!("--broker mosquitto starts its own orchestrator; it cannot be combined with --api");
            }
        }
    }
    let machine = Machine::read();
    let tables = match &cli.scenario {
        Scenario::Ramp {
            steps,
            step_timeout_secs,
        } => {
            if steps.is_empty() {
                bail!("--steps needs at least one agent count");
            }
            scenario::ramp(&c, steps, Duration::from_secs(*step_timeout_secs)).await?
        }
        Scenario::Steady {
            agents,
            duration_secs,
            broker,
        } => scenario::steady(&c, *agents, Duration::from_secs(*duration_secs), broker).await?,
        Scenario::Rollout {
            agents,
            concurrency,
            timeout_secs,
            broker,
            path,
        } => {
            scenario::rollout(
                &c,
                *agents,
                *concurrency,
                Duration::from_secs(*timeout_secs),
                broker,
                *path,
            )
            .await?
        }
        Scenario::PlatformCheck { agents, rounds } => {
            scenario::platforms::platform_check(&c, *agents, *rounds).await?
        }
        Scenario::Rtt {
            probes,
            rounds,
            under_load,
            poll_ms,
        } => {
            if *probes == 0 {
                bail!("--probes must be at least 1");
            }
            scenario::rtt(
                &c,
                *probes,
                *rounds,
                *under_load,
                Duration::from_millis(*poll_ms),
            )
            .await?
        }
        Scenario::Storm {
            agents,
            down_secs,
            timeout_secs,
        } => {
            scenario::storm(
                &c,
                *agents,
                Duration::from_secs(*down_secs),
                Duration::from_secs(*timeout_secs),
            )
            .await?
        }
        Scenario::Console {
            agents,
            consoles,
            duration_secs,
            page_requests,
            page_size,
            render_runs,
            chromedriver,
        } => {
            if *page_requests == 0 {
                bail!("--page-requests must be at least 1");
            }
            let a = ConsoleArgs {
                consoles: *consoles,
                duration: Duration::from_secs(*duration_secs),
                warmup: Duration::from_secs(2),
                page_requests: *page_requests,
                page_size: usize::try_from(*page_size)?,
                render_runs: usize::try_from(*render_runs)?,
                chromedriver: chromedriver.clone(),
            };
            scenario::console::console(&c, *agents, &a).await?
        }
        Scenario::Automation {
            agents,
            rules,
            duration_secs,
            pings,
            ping_interval_ms,
        } => {
            let a = scenario::automation::AutomationArgs {
                rules: usize::try_from(*rules)?,
                duration: Duration::from_secs(*duration_secs),
                pings: *pings,
                ping_interval: Duration::from_millis(*ping_interval_ms),
            };
            scenario::automation::automation(&c, *agents, &a).await?
        }
        Scenario::E2eLatency {
            agent_bin,
            cli_bin,
            image,
            shell_cmd,
            rounds,
            rtt_samples,
        } => {
            if c.target.external.is_some() {
                bail!("e2e-latency starts its own orchestrator; it cannot be combined with --api");
            }
            let a = drover_loadtest::latency::LatencyArgs {
                agent_bin: agent_bin.clone(),
                cli_bin: cli_bin
                    .clone()
                    .unwrap_or_else(|| cli.common.orchestrator_bin.clone()),
                image: image.clone(),
                shell_cmd: shell_cmd.clone(),
                rounds: *rounds,
                rtt_samples: *rtt_samples,
            };
            drover_loadtest::latency::e2e_latency(&c, &a).await?
        }
        Scenario::AgentFootprint {
            agent_bin,
            image,
            idle_secs,
        } => {
            let a = FootprintArgs {
                agent_bin: agent_bin.clone(),
                image: image.clone(),
                idle: Duration::from_secs(*idle_secs),
            };
            scenario::agent_footprint(&c, &a).await?
        }
    };
    let run = Run {
        scenario: cli.scenario.name().into(),
        command_line: command_line(),
        label: cli.common.label.clone(),
        machine,
        tables,
    };
    println!("{}", run.markdown());
    if cli.common.record {
        run.append_to(&cli.common.results)
            .with_context(|| "recording the result")?;
        eprintln!(
            "drover-loadtest: appended to {}",
            cli.common.results.display()
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttc=warn")),
        )
        .init();
    // One worker per core: the tool shares the machine with the process it
    // measures, which every recorded result states (see the README).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-loadtest: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
