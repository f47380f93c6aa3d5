//! The scenarios. Each starts what it measures, drives it, and returns
//! tables; nothing here asserts a timing — numbers are recorded, not judged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::api::{Api, ApiError};
use crate::procs::{self, Proc, ProcError, Series};
use crate::report::{kib, mib, ms, percentile, secs, Table};
use crate::runtime::RuntimeConfig;
use crate::sim::{Fleet, SimConfig, SimError};
use crate::target::{BrokerKind, Target, TargetConfig, TargetError};

pub mod automation;
pub mod console;
pub mod platforms;
pub mod rollout_request;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Browser(#[from] crate::browser::BrowserError),
    #[error("{0}")]
    Failed(String),
}

/// Settings every scenario shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub target: TargetConfig,
    pub topics: drover_shared::topic::Topics,
    pub heartbeat: Duration,
    pub telemetry: Duration,
    pub keep_alive: Duration,
    pub tcp_nodelay: bool,
    pub runtime: RuntimeConfig,
    pub ramp_per_sec: f64,
    /// Keep the orchestrator's data directory and logs afterwards.
    pub keep: bool,
}

impl Common {
    fn sim(&self, t: &Target) -> SimConfig {
        SimConfig {
            topics: self.topics.clone(),
            hosts: t.mqtt_hosts.clone(),
            port: t.mqtt_port,
            heartbeat: self.heartbeat,
            telemetry: self.telemetry,
            keep_alive: self.keep_alive,
            tcp_nodelay: self.tcp_nodelay,
            runtime: self.runtime,
        }
    }

    fn with_broker(&self, broker: BrokerKind) -> Common {
        let mut c = self.clone();
        c.target.broker = broker;
        c
    }

    /// One line saying what was simulated and how agents connected.
    pub fn setup_note(&self, t: &Target) -> String {
        format!(
            "SIMULATED container runtime: pull {} ms, start/stop {} ms, pull failure rate {}; heartbeat {} s, telemetry {} s, keep-alive {} s{}; ramp {}/s; agents spread over {} loopback destination address(es) {}..{} port {}; broker: {}; orchestrator: `{}`",
            self.runtime.pull.as_millis(),
            self.runtime.start.as_millis(),
            self.runtime.failure_rate,
            self.heartbeat.as_secs(),
            self.telemetry.as_secs(),
            self.keep_alive.as_secs(),
            if self.tcp_nodelay { ", agents with TCP_NODELAY (as the real agent)" } else { ", agents without TCP_NODELAY" },
            self.ramp_per_sec,
            t.mqtt_hosts.len(),
            t.mqtt_hosts.first().map_or("", String::as_str),
            t.mqtt_hosts.last().map_or("", String::as_str),
            t.mqtt_port,
            t.broker.as_str(),
            t.orch_command(),
        )
    }
}

/// Raises the open-file limit for `agents` connections in this process;
/// the orchestrator and Mosquitto started from here inherit it.
pub fn prepare_fds(agents: usize) -> Result<String, ScenarioError> {
    let want = u64::try_from(agents)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(4096);
    let got = procs::raise_nofile(want)?;
    let note = format!(
        "open-file limit (tool, inherited by orchestrator and broker): {got} for {agents} agents"
    );
    if got < u64::try_from(agents).unwrap_or(u64::MAX) + 256 {
        warn!("{note}: too low, connections will fail with EMFILE");
    }
    Ok(note)
}

/// The series of online devices, as `/metrics` writes it.
const ONLINE_SERIES: &str = "drover_devices{status=\"online\"}";

fn online_from_metrics(m: &HashMap<String, f64>) -> usize {
    m.get(ONLINE_SERIES).map_or(0, |v| *v as usize)
}

/// Polls `/metrics` until at least `n` devices are online. `Err` says why
/// not: timeout (with counts and the agents' connection errors) or the
/// orchestrator exiting.
async fn wait_online(
    t: &mut Target,
    fleet: &Fleet,
    n: usize,
    timeout: Duration,
    started: Instant,
) -> Result<Duration, String> {
    let deadline = started + timeout;
    let mut last = 0;
    loop {
        if let Some(why) = t.orch_exit() {
            return Err(why);
        }
        match t.api.metrics().await {
            Ok(m) => {
                last = online_from_metrics(&m);
                if last >= n {
                    return Ok(started.elapsed());
                }
            }
            Err(e) => warn!(error = %e, "metrics not readable"),
        }
        if Instant::now() > deadline {
            let s = fleet.stats().snapshot();
            let errors = top_errors(fleet);
            return Err(format!(
                "after {} s: {last}/{n} online in the API, {} agents connected on the simulated side, {} connect errors{}",
                timeout.as_secs(),
                s.connected,
                s.connect_errors,
                if errors.is_empty() { String::new() } else { format!(" ({errors})") }
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The three most frequent connect errors of the simulated agents, e.g.
/// "272× I/O: Too many open files; 105× Network timeout".
fn top_errors(fleet: &Fleet) -> String {
    fleet
        .stats()
        .errors()
        .into_iter()
        .take(3)
        .map(|(e, k)| format!("{k}× {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn self_rss() -> u64 {
    procs::sample(std::process::id()).map_or(0, |s| s.rss_bytes)
}

// ----- ramp --------------------------------------------------------------------

pub async fn ramp(
    c: &Common,
    steps: &[usize],
    step_timeout: Duration,
) -> Result<Vec<Table>, ScenarioError> {
    let max = steps.iter().copied().max().unwrap_or(0);
    let fd_note = prepare_fds(max)?;
    let mut t = Target::start(c.target.clone()).await?;
    let mut fleet = Fleet::new(c.sim(&t), "sim")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = t.orch_sample();
    let base_self = self_rss();
    let mut table = Table::new(
        "ramp: connect until something breaks",
        &[
            "agents",
            "ramp time",
            "all online in API after",
            "orch RSS",
            "orch RSS / device",
            "orch CPU during step",
            "orch threads",
            "tool RSS / agent",
            "connect errors",
            "result",
        ],
    );
    table.note(c.setup_note(&t));
    table.note(fd_note);
    if let Some(b) = base {
        table.note(format!(
            "orchestrator RSS before any agent: {}",
            mib(b.rss_bytes)
        ));
    }
    let mut prev = 0usize;
    for &step in steps {
        if step <= prev {
            continue;
        }
        let started = Instant::now();
        let s0 = t.orch_sample();
        let errors_before = fleet.stats().snapshot().connect_errors;
        fleet.grow_to(step, c.ramp_per_sec).await?;
        let ramp_time = started.elapsed();
        let res = wait_online(&mut t, &fleet, step, step_timeout, started).await;
        let s1 = t.orch_sample();
        let errs = fleet.stats().snapshot().connect_errors - errors_before;
        let cpu = match (s0, s1) {
            (Some(a), Some(b)) => format!("{:.0} %", procs::cpu_percent(&a, &b, started.elapsed())),
            _ => "—".into(),
        };
        let (online_after, result) = match &res {
            Ok(d) => (secs(d.as_secs_f64()), "ok".to_string()),
            Err(why) => ("—".into(), format!("BROKE: {why}")),
        };
        let per_dev = match (base, s1) {
            (Some(b), Some(s)) => kib(s.rss_bytes.saturating_sub(b.rss_bytes) as f64 / step as f64),
            _ => "—".into(),
        };
        table.row(vec![
            step.to_string(),
            secs(ramp_time.as_secs_f64()),
            online_after,
            s1.map_or("—".into(), |s| mib(s.rss_bytes)),
            per_dev,
            cpu,
            s1.map_or("—".into(), |s| s.threads.to_string()),
            kib(self_rss().saturating_sub(base_self) as f64 / step as f64),
            errs.to_string(),
            result,
        ]);
        info!(step, ?res, "ramp step done");
        if res.is_err() {
            break;
        }
        prev = step;
    }
    if prev == steps.iter().copied().max().unwrap_or(0) {
        table.note("no step broke; extend --steps to find the limit");
    }
    fleet.shutdown(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    Ok(vec![table])
}

// ----- steady --------------------------------------------------------------------

struct SteadyResult {
    broker: BrokerKind,
    sim_rate: f64,
    orch_rate: f64,
    orch_cpu: Option<f64>,
    broker_cpu: Option<f64>,
    rss_start: Option<u64>,
    rss_end: Option<u64>,
    rss_per_device: Option<f64>,
    broker_rss: Option<u64>,
}

pub async fn steady(
    c: &Common,
    n: usize,
    duration: Duration,
    brokers: &[BrokerKind],
) -> Result<Vec<Table>, ScenarioError> {
    let fd_note = prepare_fds(n)?;
    let mut table = Table::new(
        format!("steady: {n} agents for {} s", duration.as_secs()),
        &[
            "broker",
            "msgs/s sent by agents",
            "msgs/s received by orch (/metrics)",
            "orch CPU",
            "broker CPU",
            "orch RSS start → end",
            "RSS change, 2nd half",
            "orch RSS / device",
            "broker RSS",
            "dropped",
            "disconnects",
        ],
    );
    table.note(fd_note);
    let mut results = Vec::new();
    for &b in brokers {
        let c = c.with_broker(b);
        let mut t = Target::start(c.target.clone()).await?;
        table.note(c.setup_note(&t));
        let base = t.orch_sample();
        let mut fleet = Fleet::new(c.sim(&t), "sim")?;
        let started = Instant::now();
        fleet.grow_to(n, c.ramp_per_sec).await?;
        if let Err(why) = wait_online(&mut t, &fleet, n, Duration::from_secs(600), started).await {
            table.row(vec![
                b.as_str().into(),
                format!("BROKE while connecting: {why}"),
            ]);
            fleet.shutdown(Duration::from_secs(5)).await;
            t.stop(c.keep).await;
            continue;
        }
        // Let the connect burst (hello, state) drain before measuring.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let m0 = t.api.metrics().await?;
        let sim0 = fleet.stats().snapshot();
        // None with --api: an orchestrator not started here is not sampled.
        let mut orch = t.orch_sample().map(Series::new);
        let mut mosq = t.mosquitto_sample().map(Series::new);
        let t0 = Instant::now();
        let mut broke = None;
        while t0.elapsed() < duration {
            tokio::time::sleep(
                Duration::from_secs(5).min(
                    duration
                        .saturating_sub(t0.elapsed())
                        .max(Duration::from_millis(10)),
                ),
            )
            .await;
            if let Some(why) = t.orch_exit() {
                broke = Some(why);
                break;
            }
            if let (Some(o), Some(s)) = (orch.as_mut(), t.orch_sample()) {
                o.push(s);
            }
            if let (Some(m), Some(s)) = (mosq.as_mut(), t.mosquitto_sample()) {
                m.push(s);
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let sim1 = fleet.stats().snapshot();
        let m1 = t.api.metrics().await.unwrap_or_default();
        let recv =
            |m: &HashMap<String, f64>| m.get("drover_mqtt_received_total").copied().unwrap_or(0.0);
        let r = SteadyResult {
            broker: b,
            sim_rate: (sim1.published - sim0.published) as f64 / wall,
            orch_rate: (recv(&m1) - recv(&m0)) / wall,
            orch_cpu: orch.as_ref().map(Series::cpu_percent),
            broker_cpu: mosq.as_ref().map(Series::cpu_percent),
            rss_start: orch.as_ref().map(|o| o.first.rss_bytes),
            rss_end: orch.as_ref().map(|o| o.last.rss_bytes),
            rss_per_device: base
                .zip(orch.as_ref())
                .map(|(b, o)| o.last.rss_bytes.saturating_sub(b.rss_bytes) as f64 / n as f64),
            broker_rss: mosq.as_ref().map(|m| m.last.rss_bytes),
        };
        table.row(vec![
            b.as_str().into(),
            format!("{:.0}", r.sim_rate),
            format!("{:.0}", r.orch_rate),
            r.orch_cpu.map_or("—".into(), |v| format!("{v:.0} %")),
            r.broker_cpu
                .map_or("(in orch)".into(), |v| format!("{v:.0} %")),
            match (r.rss_start, r.rss_end) {
                (Some(a), Some(b)) => format!(
                    "{} → {} ({:+.1} MiB)",
                    mib(a),
                    mib(b),
                    (b as f64 - a as f64) / 1048576.0
                ),
                _ => "—".into(),
            },
            orch.as_ref()
                .and_then(Series::second_half_growth)
                .map_or("—".into(), |g| {
                    format!("{:+.1} MiB", g as f64 / 1048576.0)
                }),
            r.rss_per_device.map_or("—".into(), kib),
            r.broker_rss.map_or("(in orch)".into(), mib),
            (sim1.dropped - sim0.dropped).to_string(),
            (sim1.disconnects - sim0.disconnects).to_string(),
        ]);
        if let Some(o) = orch.as_ref().filter(|o| o.rss_by_minute.len() > 1) {
            let series: Vec<String> = o
                .rss_by_minute
                .iter()
                .map(|&b| format!("{:.0}", b as f64 / 1048576.0))
                .collect();
            table.note(format!(
                "{}: orchestrator RSS at each minute of the run, MiB: {}",
                b.as_str(),
                series.join(", ")
            ));
        }
        if let Some(why) = broke {
            table.note(format!("{}: BROKE during the run: {why}", b.as_str()));
        }
        results.push(r);
        fleet.shutdown(Duration::from_secs(10)).await;
        t.stop(c.keep).await;
    }
    table.note("CPU is percent of one core (200 % = both cores of a 2-core machine); msgs/s counts every publish (heartbeat, telemetry, status, state, hello, acks)");
    let mut tables = vec![table];
    if let (Some(e), Some(m)) = (
        results.iter().find(|r| r.broker == BrokerKind::Embedded),
        results.iter().find(|r| r.broker == BrokerKind::Mosquitto),
    ) {
        let mut ratio = Table::new(
            "steady: mosquitto ÷ embedded (same run)",
            &["measure", "embedded", "mosquitto (orch + broker)", "ratio"],
        );
        let (e_cpu, e_rss) = (e.orch_cpu.unwrap_or(0.0), e.rss_end.unwrap_or(0));
        let mosq_cpu = m.orch_cpu.unwrap_or(0.0) + m.broker_cpu.unwrap_or(0.0);
        let mosq_rss = m.rss_end.unwrap_or(0) + m.broker_rss.unwrap_or(0);
        ratio.row(vec![
            "msgs/s received by orch".into(),
            format!("{:.0}", e.orch_rate),
            format!("{:.0}", m.orch_rate),
            format!("{:.2}", m.orch_rate / e.orch_rate.max(1e-9)),
        ]);
        ratio.row(vec![
            "server-side CPU".into(),
            format!("{e_cpu:.0} %"),
            format!("{mosq_cpu:.0} %"),
            format!("{:.2}", mosq_cpu / e_cpu.max(1e-9)),
        ]);
        ratio.row(vec![
            "server-side RSS".into(),
            mib(e_rss),
            mib(mosq_rss),
            format!("{:.2}", mosq_rss as f64 / (e_rss as f64).max(1.0)),
        ]);
        tables.push(ratio);
    }
    Ok(tables)
}

// ----- rollout ----------------------------------------------------------------------

/// How a rollout went, from the first REST request.
pub struct RolloutResult {
    pub issued: usize,
    pub issue_errors: Vec<String>,
    pub issue_time: Duration,
    pub rest_latencies: Vec<f64>,
    pub t50: Option<Duration>,
    pub t99: Option<Duration>,
    pub t100: Option<Duration>,
    pub succeeded: usize,
    pub failed: usize,
    pub other_final: usize,
    pub open: usize,
    pub failure_samples: Vec<String>,
}

pub fn unique_app() -> String {
    format!("lt-{}", crate::unique_suffix())
}

/// Deploys `app` to every device (one REST call each, at most `concurrency`
/// at once) and follows the operations until all are final or `timeout`.
pub async fn run_rollout(
    api: &Api,
    devices: &[String],
    app: &str,
    concurrency: usize,
    timeout: Duration,
) -> RolloutResult {
    let n = devices.len();
    let ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let t0 = Instant::now();
    let issuer = {
        let api = api.clone();
        let ids = ids.clone();
        let devices = devices.to_vec();
        let app = app.to_string();
        tokio::spawn(async move {
            let sem = Arc::new(Semaphore::new(concurrency.max(1)));
            let mut tasks = Vec::with_capacity(devices.len());
            for d in devices {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let api = api.clone();
                let ids = ids.clone();
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let s = Instant::now();
                    let r = api.deploy(&d, &app).await;
                    drop(permit);
                    let lat = s.elapsed().as_secs_f64();
                    match r {
                        Ok(op) => {
                            ids.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(op.id);
                            Ok(lat)
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }));
            }
            let mut lats = Vec::new();
            let mut errors = Vec::new();
            for t in tasks {
                match t.await {
                    Ok(Ok(l)) => lats.push(l),
                    Ok(Err(e)) => errors.push(e),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (lats, errors, t0.elapsed())
        })
    };
    let mut res = RolloutResult {
        issued: 0,
        issue_errors: Vec::new(),
        issue_time: Duration::ZERO,
        rest_latencies: Vec::new(),
        t50: None,
        t99: None,
        t100: None,
        succeeded: 0,
        failed: 0,
        other_final: 0,
        open: n,
        failure_samples: Vec::new(),
    };
    let mut issuer = Some(issuer);
    let mut finals: HashMap<String, String> = HashMap::new();
    let deadline = t0 + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(h) = issuer.as_ref() {
            if h.is_finished() {
                if let Some(h) = issuer.take() {
                    if let Ok((lats, errors, took)) = h.await {
                        res.rest_latencies = lats;
                        res.issue_errors = errors;
                        res.issue_time = took;
                    }
                }
            }
        }
        let pending: Vec<String> = {
            let ids = ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            res.issued = ids.len();
            ids.iter()
                .filter(|i| !finals.contains_key(*i))
                .cloned()
                .collect()
        };
        if n <= 10_000 {
            // One request: the newest operations cover the whole rollout.
            if let Ok(ops) = api.operations(n).await {
                for op in ops.into_iter().filter(|o| o.app == app && o.is_final()) {
                    if op.status == "failed" && res.failure_samples.len() < 3 {
                        res.failure_samples
                            .push(format!("{}: {}", op.device, op.detail));
                    }
                    finals.insert(op.id, op.status);
                }
            }
        } else {
            let sem = Arc::new(Semaphore::new(64));
            let mut tasks = Vec::new();
            for id in pending {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let api = api.clone();
                tasks.push(tokio::spawn(async move {
                    let r = api.operation(&id).await;
                    drop(permit);
                    r
                }));
            }
            for t in tasks {
                if let Ok(Ok(op)) = t.await {
                    if op.is_final() {
                        finals.insert(op.id, op.status);
                    }
                }
            }
        }
        let succeeded = finals.values().filter(|s| *s == "succeeded").count();
        let el = t0.elapsed();
        if res.t50.is_none() && succeeded * 2 >= n {
            res.t50 = Some(el);
        }
        if res.t99.is_none() && succeeded * 100 >= n * 99 {
            res.t99 = Some(el);
        }
        if res.t100.is_none() && succeeded >= n {
            res.t100 = Some(el);
        }
        let all_final = issuer.is_none() && finals.len() >= res.issued;
        if all_final || Instant::now() > deadline {
            break;
        }
    }
    if let Some(h) = issuer.take() {
        h.abort();
    }
    res.succeeded = finals.values().filter(|s| *s == "succeeded").count();
    res.failed = finals.values().filter(|s| *s == "failed").count();
    res.other_final = finals.len() - res.succeeded - res.failed;
    res.open = n - finals.len();
    res.rest_latencies.sort_by(f64::total_cmp);
    res
}

/// Devices whose applied generation equals the desired one, per the API.
async fn converged(api: &Api, ids: &[String]) -> Result<usize, ApiError> {
    let devices = api.devices().await?;
    let want: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    Ok(devices
        .iter()
        .filter(|d| {
            want.contains(d.id.as_str())
                && d.desired_generation > 0
                && d.applied_generation == d.desired_generation
        })
        .count())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| secs(d.as_secs_f64()))
}

/// Which way the rollout scenario moves the fleet to a new app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RolloutPath {
    /// One `POST /api/v1/devices/{id}/apps` per device.
    PerDevice,
    /// One `POST /api/v1/rollouts` for the whole fleet, in one batch and
    /// in ten.
    Rollout,
    /// Both, one after the other on the same orchestrator and agents.
    Both,
}

impl RolloutPath {
    fn per_device(self) -> bool {
        self != RolloutPath::Rollout
    }

    fn rollout(self) -> bool {
        self != RolloutPath::PerDevice
    }
}

pub async fn rollout(
    c: &Common,
    n: usize,
    concurrency: usize,
    timeout: Duration,
    brokers: &[BrokerKind],
    path: RolloutPath,
) -> Result<Vec<Table>, ScenarioError> {
    let fd_note = prepare_fds(n)?;
    let mut table = Table::new(
        format!("rollout: one app to {n} agents"),
        &[
            "broker",
            "REST issue time",
            "REST req/s",
            "REST p50 / p99",
            "50 % succeeded",
            "99 %",
            "100 %",
            "succeeded / failed / other / open",
            "applied == desired",
            "orch CPU",
            "orch peak RSS",
        ],
    );
    table.note(fd_note.clone());
    table.note(format!("one POST /api/v1/devices/{{id}}/apps per device, {concurrency} in flight; times from the first request; operations polled every 0.5 s"));
    let mut requests = Table::new(
        format!("rollout: one POST /api/v1/rollouts to {n} agents"),
        &[
            "broker",
            "batches",
            "request answered",
            "50 % updated",
            "100 % updated (final)",
            "final phase",
            "batch time p50 / max",
            "updated / failed / skipped",
            "applied == desired",
            "orch CPU",
            "orch peak RSS",
        ],
    );
    requests.note(fd_note);
    requests.note("one request for the whole fleet (selector: the label every simulated agent of this run sets on itself; release: the latest; on_failure: continue, so a simulated pull failure does not roll the fleet back mid-measurement); followed on GET /api/v1/changes?rollout=ID (subscribe, then one read; a read again on `lagged`), never polled; times from the request, as the changes arrive here (the server coalesces progress to a few changes per second); a batch ends when the next begins");
    requests.note("updated = the device reports the target release running, every container running, health absent or healthy (the orchestrator's rule)");
    let mut rows: Vec<(BrokerKind, f64)> = Vec::new();
    // Time to the end, per broker and path, for the comparison note.
    let mut ends: Vec<(BrokerKind, String, Option<Duration>)> = Vec::new();
    for &b in brokers {
        let c = c.with_broker(b);
        let mut t = Target::start(c.target.clone()).await?;
        table.note(c.setup_note(&t));
        requests.note(c.setup_note(&t));
        let mut fleet = Fleet::new(c.sim(&t), "sim")?;
        let started = Instant::now();
        fleet.grow_to(n, c.ramp_per_sec).await?;
        if let Err(why) = wait_online(&mut t, &fleet, n, Duration::from_secs(600), started).await {
            let row = vec![b.as_str().into(), format!("BROKE while connecting: {why}")];
            table.row(row.clone());
            requests.row(row);
            fleet.shutdown(Duration::from_secs(5)).await;
            t.stop(c.keep).await;
            continue;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let ids: Vec<String> = fleet.devices().iter().map(ToString::to_string).collect();
        if path.per_device() {
            let app = unique_app();
            t.api.create_app(&app, &path_image(&app), None).await?;
            let o0 = t.orch_sample();
            let sampler = OrchSampler::start(t.orch.as_ref().map(Proc::pid));
            let r = run_rollout(&t.api, &ids, &app, concurrency, timeout).await;
            let series = sampler.stop().await;
            let conv = converged(&t.api, &ids)
                .await
                .map_or_else(|e| e.to_string(), |k| format!("{k}/{n}"));
            let p = |q| percentile(&r.rest_latencies, q).map_or("—".into(), ms);
            table.row(vec![
                b.as_str().into(),
                secs(r.issue_time.as_secs_f64()),
                format!(
                    "{:.0}",
                    r.issued as f64 / r.issue_time.as_secs_f64().max(1e-9)
                ),
                format!("{} / {}", p(50.0), p(99.0)),
                opt_secs(r.t50),
                opt_secs(r.t99),
                opt_secs(r.t100),
                format!(
                    "{} / {} / {} / {}",
                    r.succeeded, r.failed, r.other_final, r.open
                ),
                conv,
                series
                    .as_ref()
                    .map_or("—".into(), |s| format!("{:.0} %", s.cpu_percent())),
                series.as_ref().map_or_else(
                    || o0.map_or("—".into(), |s| mib(s.rss_bytes)),
                    |s| mib(s.max_rss),
                ),
            ]);
            if !r.issue_errors.is_empty() {
                table.note(format!(
                    "{}: {} REST errors, first: {}",
                    b.as_str(),
                    r.issue_errors.len(),
                    r.issue_errors[0]
                ));
            }
            for f in &r.failure_samples {
                table.note(format!("{}: failed operation: {f}", b.as_str()));
            }
            if let Some(t100) = r.t100 {
                rows.push((b, t100.as_secs_f64()));
            }
            ends.push((b, "one request per device".into(), r.t100));
        }
        if path.rollout() {
            for (label, batches) in rollout_request::plans() {
                // Let the previous path's last reports drain first.
                tokio::time::sleep(Duration::from_secs(5)).await;
                let app = unique_app();
                t.api.create_app(&app, &path_image(&app), None).await?;
                let o0 = t.orch_sample();
                let sampler = OrchSampler::start(t.orch.as_ref().map(Proc::pid));
                let r = rollout_request::run_rollout_request(
                    &t.api,
                    &app,
                    &fleet.selector(),
                    &batches,
                    timeout,
                )
                .await;
                let series = sampler.stop().await;
                let conv = converged(&t.api, &ids)
                    .await
                    .map_or_else(|e| e.to_string(), |k| format!("{k}/{n}"));
                let last = r.clock.last.as_ref();
                let succeeded = last.is_some_and(|l| l.phase == "succeeded");
                let mut times: Vec<f64> = r
                    .clock
                    .batch_times()
                    .iter()
                    .flatten()
                    .map(Duration::as_secs_f64)
                    .collect();
                times.sort_by(f64::total_cmp);
                requests.row(vec![
                    b.as_str().into(),
                    label.into(),
                    opt_secs(r.request_time),
                    opt_secs(r.clock.half_updated),
                    opt_secs(r.clock.finished),
                    last.map_or("—".into(), |l| l.phase.clone()),
                    format!(
                        "{} / {}",
                        percentile(&times, 50.0).map_or("—".into(), secs),
                        times.last().map_or("—".into(), |v| secs(*v))
                    ),
                    last.map_or("—".into(), |l| {
                        format!(
                            "{} / {} / {}",
                            l.counts.updated, l.counts.failed, l.counts.skipped
                        )
                    }),
                    conv,
                    series
                        .as_ref()
                        .map_or("—".into(), |s| format!("{:.0} %", s.cpu_percent())),
                    series.as_ref().map_or_else(
                        || o0.map_or("—".into(), |s| mib(s.rss_bytes)),
                        |s| mib(s.max_rss),
                    ),
                ]);
                let per_batch: Vec<String> = r
                    .clock
                    .batch_times()
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("{}: {}", i + 1, opt_secs(*d)))
                    .collect();
                requests.note(format!(
                    "{}, {label}: time per batch: {}; lagged {}, subscribed again {}",
                    b.as_str(),
                    per_batch.join(", "),
                    r.lagged,
                    r.resubscribed
                ));
                if let Some(l) = last.filter(|l| l.phase != "succeeded") {
                    if let Some(why) = &l.reason {
                        requests.note(format!("{}, {label}: {}: {why}", b.as_str(), l.phase));
                    }
                }
                if let Some(e) = &r.error {
                    requests.note(format!("{}, {label}: {e}", b.as_str()));
                }
                ends.push((
                    b,
                    format!("one rollout request, {label}"),
                    r.clock.finished.filter(|_| succeeded),
                ));
            }
        }
        fleet.shutdown(Duration::from_secs(10)).await;
        t.stop(c.keep).await;
    }
    if let (Some(e), Some(m)) = (
        rows.iter().find(|r| r.0 == BrokerKind::Embedded),
        rows.iter().find(|r| r.0 == BrokerKind::Mosquitto),
    ) {
        table.note(format!(
            "time to 100 %: mosquitto ÷ embedded = {:.2}",
            m.1 / e.1.max(1e-9)
        ));
    }
    let mut tables = Vec::new();
    if path.per_device() {
        tables.push(table);
    }
    if path.rollout() {
        if path.per_device() {
            requests.note(compare_paths(&ends));
        }
        tables.push(requests);
    }
    Ok(tables)
}

/// An image of the app's own: every path of the rollout scenario pays the
/// simulated pull, as a new release's image would, instead of finding the
/// previous path's image on the agents.
fn path_image(app: &str) -> String {
    format!("127.0.0.1:5000/loadtest/simulated:{app}")
}

/// "time to 100 %, embedded rumqttd: one request per device 41.20 s; one
/// rollout request, 1 batch 38.10 s (0.92×); …": every path next to the
/// first, per broker.
fn compare_paths(ends: &[(BrokerKind, String, Option<Duration>)]) -> String {
    let mut parts = Vec::new();
    let mut brokers: Vec<BrokerKind> = Vec::new();
    for (b, _, _) in ends {
        if !brokers.contains(b) {
            brokers.push(*b);
        }
    }
    for b in brokers {
        let mine: Vec<&(BrokerKind, String, Option<Duration>)> =
            ends.iter().filter(|e| e.0 == b).collect();
        let base = mine.first().and_then(|e| e.2);
        let cells: Vec<String> = mine
            .iter()
            .enumerate()
            .map(|(i, (_, what, d))| match (d, base) {
                (Some(d), Some(base)) if i > 0 => format!(
                    "{what} {} ({:.2}×)",
                    secs(d.as_secs_f64()),
                    d.as_secs_f64() / base.as_secs_f64().max(1e-9)
                ),
                (Some(d), _) => format!("{what} {}", secs(d.as_secs_f64())),
                (None, _) => format!("{what} did not reach 100 %"),
            })
            .collect();
        parts.push(format!("{}: {}", b.as_str(), cells.join("; ")));
    }
    format!("time to 100 % (same orchestrator and agents, paths one after the other, each a new app with an image of its own; the per-device time is polled every 0.5 s, so rounded up to it), {}", parts.join(" | "))
}

/// Samples the orchestrator every 250 ms in the background.
struct OrchSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<Series>>,
}

impl OrchSampler {
    fn start(pid: Option<u32>) -> OrchSampler {
        let (stop, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let pid = pid?;
            let mut s = Series::new(procs::sample(pid).ok()?);
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                match procs::sample(pid) {
                    Ok(x) => s.push(x),
                    Err(_) => break,
                }
            }
            Some(s)
        });
        OrchSampler { stop, task }
    }

    async fn stop(self) -> Option<Series> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

// ----- rtt ----------------------------------------------------------------------------

/// Stop/start round trips on each probe device; returns (accepted, succeeded)
/// latencies in seconds.
async fn rtt_rounds(
    api: &Api,
    probes: &[String],
    app: &str,
    rounds: usize,
    poll: Duration,
) -> (Vec<f64>, Vec<f64>, Vec<String>) {
    let mut tasks = Vec::new();
    for d in probes {
        let api = api.clone();
        let d = d.clone();
        let app = app.to_string();
        tasks.push(tokio::spawn(async move {
            let mut acc = Vec::new();
            let mut done = Vec::new();
            let mut errors = Vec::new();
            for r in 0..rounds {
                let verb = if r % 2 == 0 { "stop" } else { "start" };
                let t0 = Instant::now();
                let op = match api.change(&d, &app, verb).await {
                    Ok(op) => op,
                    Err(e) => {
                        errors.push(e.to_string());
                        continue;
                    }
                };
                acc.push(t0.elapsed().as_secs_f64());
                let deadline = t0 + Duration::from_secs(60);
                loop {
                    match api.operation(&op.id).await {
                        Ok(o) if o.status == "succeeded" => {
                            done.push(t0.elapsed().as_secs_f64());
                            break;
                        }
                        Ok(o) if o.is_final() => {
                            errors.push(format!("{d}: {verb} ended {}: {}", o.status, o.detail));
                            break;
                        }
                        _ if Instant::now() > deadline => {
                            errors.push(format!("{d}: {verb} not final after 60 s"));
                            break;
                        }
                        _ => tokio::time::sleep(poll).await,
                    }
                }
            }
            (acc, done, errors)
        }));
    }
    let (mut acc, mut done, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        if let Ok((a, d, e)) = t.await {
            acc.extend(a);
            done.extend(d);
            errors.extend(e);
        }
    }
    acc.sort_by(f64::total_cmp);
    done.sort_by(f64::total_cmp);
    (acc, done, errors)
}

pub async fn rtt(
    c: &Common,
    probes: usize,
    rounds: usize,
    under_load: usize,
    poll: Duration,
) -> Result<Vec<Table>, ScenarioError> {
    let fd_note = prepare_fds(probes + under_load)?;
    let mut t = Target::start(c.target.clone()).await?;
    let mut table = Table::new(
        "rtt: request → operation succeeded (stop/start alternating)",
        &[
            "phase",
            "agents connected",
            "round trips",
            "accepted p50 / p99",
            "succeeded p50 / p99",
            "succeeded max",
            "errors",
        ],
    );
    table.note(c.setup_note(&t));
    table.note(fd_note);
    table.note(format!(
        "round trip = REST request sent → GET /api/v1/operations/{{id}} shows `succeeded`, polled every {} ms per probe (resolution); includes the simulated stop/start latency of {} ms",
        poll.as_millis(),
        c.runtime.start.as_millis()
    ));
    let mut probe_fleet = Fleet::new(c.sim(&t), "probe")?;
    let started = Instant::now();
    probe_fleet.grow_to(probes, c.ramp_per_sec).await?;
    wait_online(
        &mut t,
        &probe_fleet,
        probes,
        Duration::from_secs(120),
        started,
    )
    .await
    .map_err(ScenarioError::Failed)?;
    let app = unique_app();
    t.api
        .create_app(&app, "127.0.0.1:5000/loadtest/simulated:1", None)
        .await?;
    let ids: Vec<String> = probe_fleet
        .devices()
        .iter()
        .map(ToString::to_string)
        .collect();
    let r = run_rollout(&t.api, &ids, &app, probes, Duration::from_secs(120)).await;
    if r.succeeded != probes {
        return Err(ScenarioError::Failed(format!(
            "deploying to the probes: {} of {probes} succeeded",
            r.succeeded
        )));
    }
    let mut phases = vec![("idle".to_string(), 0usize)];
    if under_load > 0 {
        phases.push((
            format!("under load ({under_load} agents, steady)"),
            under_load,
        ));
    }
    let mut load_fleet = Fleet::new(c.sim(&t), "sim")?;
    for (phase, load) in phases {
        if load > 0 {
            let started = Instant::now();
            load_fleet.grow_to(load, c.ramp_per_sec).await?;
            if let Err(why) = wait_online(
                &mut t,
                &load_fleet,
                load + probes,
                Duration::from_secs(600),
                started,
            )
            .await
            {
                table.row(vec![phase, format!("BROKE while connecting: {why}")]);
                break;
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
        let (acc, done, errors) = rtt_rounds(&t.api, &ids, &app, rounds, poll).await;
        let p = |v: &[f64], q| percentile(v, q).map_or("—".into(), ms);
        table.row(vec![
            phase,
            (probe_fleet.stats().snapshot().connected + load_fleet.stats().snapshot().connected)
                .to_string(),
            done.len().to_string(),
            format!("{} / {}", p(&acc, 50.0), p(&acc, 99.0)),
            format!("{} / {}", p(&done, 50.0), p(&done, 99.0)),
            done.last().map_or("—".into(), |v| ms(*v)),
            errors.len().to_string(),
        ]);
        if let Some(e) = errors.first() {
            table.note(format!("first error: {e}"));
        }
    }
    load_fleet.shutdown(Duration::from_secs(10)).await;
    probe_fleet.shutdown(Duration::from_secs(5)).await;
    t.stop(c.keep).await;
    Ok(vec![table])
}

// ----- storm --------------------------------------------------------------------------

pub async fn storm(
    c: &Common,
    n: usize,
    down: Duration,
    timeout: Duration,
) -> Result<Vec<Table>, ScenarioError> {
    let fd_note = prepare_fds(n)?;
    let mut t = Target::start(c.target.clone()).await?;
    if t.orch.is_none() {
        return Err(ScenarioError::Failed("storm kills and restarts the orchestrator, so it must be started by the tool (no --api)".into()));
    }
    let mut table = Table::new(
        format!(
            "storm: SIGKILL the orchestrator under {n} agents, restart after {} s",
            down.as_secs()
        ),
        &[
            "agents",
            "all online after restart",
            "all reconciled after restart",
            "online / reconciled at end",
            "agent reconnects",
            "agent connect errors",
            "orch RSS after",
            "result",
        ],
    );
    table.note(c.setup_note(&t));
    table.note(fd_note);
    table.note("reconciled = online, applied_generation == desired_generation > 0, and a report received after the restart (last_seen after it)");
    let mut fleet = Fleet::new(c.sim(&t), "sim")?;
    let started = Instant::now();
    fleet.grow_to(n, c.ramp_per_sec).await?;
    wait_online(&mut t, &fleet, n, Duration::from_secs(600), started)
        .await
        .map_err(ScenarioError::Failed)?;
    let app = unique_app();
    t.api
        .create_app(&app, "127.0.0.1:5000/loadtest/simulated:1", None)
        .await?;
    let ids: Vec<String> = fleet.devices().iter().map(ToString::to_string).collect();
    let r = run_rollout(&t.api, &ids, &app, 32, Duration::from_secs(600)).await;
    table.note(format!(
        "before the kill: app deployed to all, {} of {n} operations succeeded",
        r.succeeded
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s0 = fleet.stats().snapshot();
    t.kill_orchestrator().await;
    info!("orchestrator killed");
    tokio::time::sleep(down).await;
    let restart_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(0);
    let restarted = Instant::now();
    t.restart_orchestrator().await?;
    let (mut t_online, mut t_rec) = (None, None);
    let (mut online, mut rec) = (0, 0);
    let mut result = "ok".to_string();
    loop {
        if let Some(why) = t.orch_exit() {
            result = format!("BROKE: {why}");
            break;
        }
        if let Ok(devs) = t.api.devices().await {
            online = devs.iter().filter(|d| d.online).count();
            rec = devs
                .iter()
                .filter(|d| {
                    d.online
                        && d.desired_generation > 0
                        && d.applied_generation == d.desired_generation
                        && d.last_seen_ms >= restart_ms
                })
                .count();
        }
        if t_online.is_none() && online >= n {
            t_online = Some(restarted.elapsed());
        }
        if t_rec.is_none() && rec >= n {
            t_rec = Some(restarted.elapsed());
        }
        if t_online.is_some() && t_rec.is_some() {
            break;
        }
        if restarted.elapsed() > timeout {
            let errors = top_errors(&fleet);
            result = format!(
                "BROKE: not converged after {} s; {} agents connected on the simulated side{}",
                timeout.as_secs(),
                fleet.stats().snapshot().connected,
                if errors.is_empty() {
                    String::new()
                } else {
                    format!("; connect errors since the start: {errors}")
                }
            );
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let s1 = fleet.stats().snapshot();
    table.row(vec![
        n.to_string(),
        opt_secs(t_online),
        opt_secs(t_rec),
        format!("{online} / {rec}"),
        (s1.connects - s0.connects).to_string(),
        (s1.connect_errors - s0.connect_errors).to_string(),
        t.orch_sample().map_or("—".into(), |s| mib(s.rss_bytes)),
        result,
    ]);
    table.note("times are from the restarted process's spawn; agents reconnect with the real agent's policy (backoff 0.5 s doubling to 30 s, full jitter)");
    fleet.shutdown(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    Ok(vec![table])
}

// ----- agent footprint --------------------------------------------------------------

pub struct FootprintArgs {
    pub agent_bin: PathBuf,
    pub image: String,
    pub idle: Duration,
}

pub async fn agent_footprint(c: &Common, a: &FootprintArgs) -> Result<Vec<Table>, ScenarioError> {
    let size = std::fs::metadata(&a.agent_bin)
        .map_err(|e| {
            ScenarioError::Failed(format!(
                "{}: {e}; build it with `cargo build --release -p drover-agent`",
                a.agent_bin.display()
            ))
        })?
        .len();
    let t = Target::start(c.target.clone()).await?;
    let device = format!("fp-{}", crate::unique_suffix());
    let state = t.data_dir().join("agent");
    let args = vec![
        "--broker".to_string(),
        format!("mqtt://127.0.0.1:{}", t.mqtt_port),
        "--device-id".into(),
        device.clone(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let log = t.data_dir().join("agent.log");
    let mut agent = Proc::spawn("drover-agent", &a.agent_bin, &args, &log)?;
    let mut table = Table::new(
        "agent-footprint: real drover-agent (release) on the real Docker daemon",
        &["measure", "value"],
    );
    table.note(format!(
        "agent: `{} {}`; orchestrator: `{}`",
        a.agent_bin.display(),
        args.join(" "),
        t.orch_command()
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = agent.exited() {
            return Err(ScenarioError::Failed(format!(
                "drover-agent exited ({s}):\n{}",
                agent.log_tail(15)
            )));
        }
        if t.api
            .devices()
            .await
            .map(|d| d.iter().any(|x| x.id == device && x.online))
            .unwrap_or(false)
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(ScenarioError::Failed(format!(
                "agent not online after 60 s:\n{}",
                agent.log_tail(15)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idle: connected, nothing deployed, heartbeats and telemetry flowing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut idle = Series::new(agent.sample()?);
    let t0 = Instant::now();
    while t0.elapsed() < a.idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle.push(agent.sample()?);
    }
    // Deploy a real image from the local registry. Whether Docker already
    // had it decides whether the deploy includes a real pull.
    let cached = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &a.image])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    table.note(if cached {
        format!(
            "`{}` was already on the Docker host: the deploy is a cached one (no layer download)",
            a.image
        )
    } else {
        format!(
            "`{}` was not on the Docker host: the deploy includes a real pull from the registry",
            a.image
        )
    });
    let app = unique_app();
    t.api
        .create_app(&app, &a.image, Some(vec!["sleep".into(), "3600".into()]))
        .await?;
    let op = t.api.deploy(&device, &app).await?;
    let mut deploy = Series::new(agent.sample()?);
    let d0 = Instant::now();
    let status = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        deploy.push(agent.sample()?);
        let o = t.api.operation(&op.id).await?;
        if o.is_final() {
            break if o.detail.is_empty() {
                o.status
            } else {
                format!("{}: {}", o.status, o.detail)
            };
        }
        if d0.elapsed() > Duration::from_secs(300) {
            break "not final after 300 s".to_string();
        }
    };
    let deploy_time = d0.elapsed();
    // Running one app, idle again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut running = Series::new(agent.sample()?);
    let r0 = Instant::now();
    while r0.elapsed() < a.idle.min(Duration::from_secs(30)) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        running.push(agent.sample()?);
    }
    table.row(vec![
        "binary size (stripped release)".into(),
        format!("{} ({size} bytes)", mib(size)),
    ]);
    table.row(vec![
        format!("RSS idle, no apps ({} s)", a.idle.as_secs()),
        format!("{} – {}", mib(idle.first.rss_bytes), mib(idle.max_rss)),
    ]);
    table.row(vec![
        "CPU idle, no apps".into(),
        format!("{:.2} % of one core", idle.cpu_percent()),
    ]);
    table.row(vec![
        format!("deploy of `{}`", a.image),
        format!("{status} in {}", secs(deploy_time.as_secs_f64())),
    ]);
    table.row(vec![
        "RSS peak during the deploy".into(),
        mib(deploy.max_rss),
    ]);
    table.row(vec![
        "CPU during the deploy".into(),
        format!("{:.1} % of one core", deploy.cpu_percent()),
    ]);
    table.row(vec![
        "RSS with one app running".into(),
        format!(
            "{} – {}",
            mib(running.first.rss_bytes),
            mib(running.max_rss)
        ),
    ]);
    table.row(vec![
        "CPU with one app running".into(),
        format!("{:.2} % of one core", running.cpu_percent()),
    ]);
    table.row(vec![
        "peak RSS over the run (VmHWM)".into(),
        mib(running.last.peak_rss_bytes),
    ]);
    // Clean up the container before the agent goes.
    if let Ok(rm) = t.api.remove(&device, &app).await {
        let d = Instant::now();
        while d.elapsed() < Duration::from_secs(60) {
            if t.api
                .operation(&rm.id)
                .await
                .map(|o| o.is_final())
                .unwrap_or(true)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    agent.terminate(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    Ok(vec![table])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_compared_with_the_first_per_broker() {
        let s = |v: f64| Some(Duration::from_secs_f64(v));
        let note = compare_paths(&[
            (BrokerKind::Embedded, "per device".into(), s(40.0)),
            (BrokerKind::Embedded, "1 batch".into(), s(30.0)),
            (BrokerKind::Embedded, "10 batches".into(), None),
            (BrokerKind::Mosquitto, "per device".into(), None),
            (BrokerKind::Mosquitto, "1 batch".into(), s(20.0)),
        ]);
        assert!(
            note.ends_with("embedded rumqttd: per device 40.00 s; 1 batch 30.00 s (0.75×); 10 batches did not reach 100 % | mosquitto: per device did not reach 100 %; 1 batch 20.00 s"),
            "{note}"
        );
    }

    #[test]
    fn both_paths_run_both() {
        assert!(RolloutPath::Both.per_device() && RolloutPath::Both.rollout());
        assert!(RolloutPath::PerDevice.per_device() && !RolloutPath::PerDevice.rollout());
        assert!(!RolloutPath::Rollout.per_device() && RolloutPath::Rollout.rollout());
    }
}
