//! `e2e-latency`: what `drover deploy --wait` and `drover remove --wait`
//! cost next to the same work done with the Docker CLI, in one run, as a
//! user would type them: each measurement is one process started and
//! waited for (`drover` or `docker`), against the real `drover-agent` on
//! the real Docker Engine, with an image Docker already has.
//!
//! Rounds interleave the two sides (raw run, Drover deploy, raw stop and
//! rm, Drover remove) so both see the same machine, and every container
//! has run for a while before it is stopped. One MQTT round trip through
//! the same broker (publish → receive, QoS 1) is the network baseline: the
//! goal is Drover ≤ 1.2 × raw + one round trip.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::procs::Proc;
use crate::report::{ms, percentile, Table};
use crate::scenario::{unique_app, Common, ScenarioError};
use crate::target::Target;

/// Exits at once on SIGTERM: `wait` on a background `sleep` is interrupted
/// by the trapped signal, where a foreground `sleep 1` (the test image's
/// own loop) would first run out, adding 0–1 s to both sides' stop.
pub const PROMPT_STOP_CMD: &str = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done";

pub struct LatencyArgs {
    pub agent_bin: PathBuf,
    /// The `drover` binary used as the CLI (the orchestrator's by default).
    pub cli_bin: PathBuf,
    pub image: String,
    /// The container's command, run by `/bin/sh -c` on both sides.
    pub shell_cmd: String,
    pub rounds: usize,
    pub rtt_samples: usize,
}

/// The fields of the CLI's `-o json` operation the breakdown needs.
#[derive(Debug, Deserialize)]
struct CliOp {
    status: String,
    #[serde(default)]
    detail: String,
    created_at_ms: u64,
    updated_at_ms: u64,
}

/// One timed CLI run: wall time, and the operation's stamps set against
/// the CLI's own start and exit (same machine, same clock).
struct Timed {
    total: f64,
    /// CLI start → operation created: process start, HTTP, the engine.
    to_created: f64,
    /// Created → final: durable write, broker, agent, Docker, ack.
    on_device: f64,
    /// Final → CLI exit: the change event, printing, process exit.
    to_exit: f64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn secs_between(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

/// Runs a command to its end; its wall time in seconds, or what it said.
async fn timed(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(f64, String), ScenarioError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd
        .output()
        .await
        .map_err(|e| ScenarioError::Failed(format!("cannot run {}: {e}", program.display())))?;
    let took = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(ScenarioError::Failed(format!(
            "`{} {}` failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

struct Cli<'a> {
    bin: &'a std::path::Path,
    api: String,
    token: String,
    device: String,
    app: String,
}

impl Cli<'_> {
    /// `drover <verb> APP -d DEVICE --wait -o json`, timed.
    async fn run(&self, verb: &str) -> Result<Timed, ScenarioError> {
        let start_ms = now_ms();
        let (total, out) = timed(
            self.bin,
            &[
                "--api",
                &self.api,
                "-o",
                "json",
                verb,
                &self.app,
                "-d",
                &self.device,
                "--wait",
                "--timeout",
                "120",
            ],
            &[("DROVER_TOKEN", &self.token)],
        )
        .await?;
        let exit_ms = now_ms();
        let op: CliOp = serde_json::from_str(&out).map_err(|e| {
            ScenarioError::Failed(format!("drover {verb} printed no operation ({e}): {out}"))
        })?;
        if op.status != "succeeded" {
            return Err(ScenarioError::Failed(format!(
                "drover {verb} ended {}: {}",
                op.status, op.detail
            )));
        }
        Ok(Timed {
            total,
            to_created: secs_between(start_ms, op.created_at_ms),
            on_device: secs_between(op.created_at_ms, op.updated_at_ms),
            to_exit: secs_between(op.updated_at_ms, exit_ms),
        })
    }
}

/// The probe's next incoming packet, or why there is none.
async fn next_packet(
    rx: &mut mpsc::Receiver<Result<Packet, String>>,
) -> Result<Packet, ScenarioError> {
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Ok(p))) => Ok(p),
        Ok(Some(Err(e))) => Err(ScenarioError::Failed(format!("rtt probe: {e}"))),
        _ => Err(ScenarioError::Failed("rtt probe: no answer in 10 s".into())),
    }
}

/// Publish → receive through the broker on `port`, QoS 1, `n` times.
async fn mqtt_rtt(port: u16, n: usize) -> Result<Vec<f64>, ScenarioError> {
    let id = format!("lt-rtt-{}", crate::unique_suffix());
    // Not a Drover topic: a private one for this probe only.
    let topic = format!("loadtest/{id}");
    let mut opts = MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, mut rx) = mpsc::channel::<Result<Packet, String>>(16);
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    });
    let fail = |e: rumqttc::ClientError| ScenarioError::Failed(format!("rtt probe: {e}"));
    client
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .map_err(fail)?;
    while !matches!(next_packet(&mut rx).await?, Packet::SubAck(_)) {}
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        client
            .publish(&topic, QoS::AtLeastOnce, false, i.to_string())
            .await
            .map_err(fail)?;
        while !matches!(next_packet(&mut rx).await?, Packet::Publish(_)) {}
        samples.push(t0.elapsed().as_secs_f64());
    }
    let _ = client.disconnect().await;
    driver.abort();
    Ok(samples)
}

fn micros(s: f64) -> String {
    format!("{:.0} µs", s * 1e6)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn p(v: &[f64], q: f64) -> f64 {
    percentile(v, q).unwrap_or(f64::NAN)
}

/// A Drover row next to its raw Docker row: p50, p99, ratios, the budget.
fn compare(table: &mut Table, what: &str, raw: &[f64], drover: &[f64], rtt_p50: f64) {
    let budget = 1.2 * p(raw, 50.0) + rtt_p50;
    table.row(vec![
        what.to_string(),
        ms(p(raw, 50.0)),
        ms(p(raw, 99.0)),
        ms(p(drover, 50.0)),
        ms(p(drover, 99.0)),
        format!("{:.2}×", p(drover, 50.0) / p(raw, 50.0)),
        format!("{:.2}×", p(drover, 99.0) / p(raw, 99.0)),
        ms(budget),
        if p(drover, 50.0) <= budget {
            "yes"
        } else {
            "no"
        }
        .to_string(),
    ]);
}

pub async fn e2e_latency(c: &Common, a: &LatencyArgs) -> Result<Vec<Table>, ScenarioError> {
    if a.rounds == 0 {
        return Err(ScenarioError::Failed("--rounds must be at least 1".into()));
    }
    let docker = PathBuf::from("docker");
    // The point is a cached image: make sure Docker has it before timing.
    if timed(&docker, &["image", "inspect", &a.image], &[])
        .await
        .is_err()
    {
        timed(&docker, &["pull", "-q", &a.image], &[]).await?;
    }
    let t = Target::start(c.target.clone()).await?;
    let device = format!("lat-{}", crate::unique_suffix());
    let state = t.data_dir().join("agent");
    let agent_args = vec![
        "--broker".to_string(),
        format!("mqtt://127.0.0.1:{}", t.mqtt_port),
        "--device-id".into(),
        device.clone(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    let mut agent = Proc::spawn(
        "drover-agent",
        &a.agent_bin,
        &agent_args,
        &t.data_dir().join("agent.log"),
    )?;
    let result = measure(c, a, &t, &mut agent, &device, &agent_args).await;
    agent.terminate(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    result
}

async fn measure(
    _c: &Common,
    a: &LatencyArgs,
    t: &Target,
    agent: &mut Proc,
    device: &str,
    agent_args: &[String],
) -> Result<Vec<Table>, ScenarioError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = agent.exited() {
            return Err(ScenarioError::Failed(format!(
                "drover-agent exited ({s}):\n{}",
                agent.log_tail(15)
            )));
        }
        let online = t
            .api
            .devices()
            .await
            .map(|d| d.iter().any(|x| x.id == device && x.online));
        if online.unwrap_or(false) {
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
    let app = unique_app();
    let command = vec!["/bin/sh".to_string(), "-c".into(), a.shell_cmd.clone()];
    t.api.create_app(&app, &a.image, Some(command)).await?;
    let cli = Cli {
        bin: &a.cli_bin,
        api: t.api.base().to_string(),
        token: t.api.token().unwrap_or_default().to_string(),
        device: device.to_string(),
        app: app.clone(),
    };
    let docker = PathBuf::from("docker");
    let raw_name = |i: usize| format!("{app}-raw-{i}");
    let load_start = crate::report::Machine::read().load;

    let (mut run, mut stop_rm, mut deploy, mut remove) = (vec![], vec![], vec![], vec![]);
    let (mut to_created, mut on_device, mut to_exit) = (vec![], vec![], vec![]);
    let (mut rm_created, mut rm_device, mut rm_exit) = (vec![], vec![], vec![]);
    // Round 0 warms both sides up (first container on this network, the
    // agent's first pass for the app) and is not recorded.
    for i in 0..=a.rounds {
        let name = raw_name(i);
        let (r, _) = timed(
            &docker,
            &[
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                "io.drover.loadtest=e2e-latency",
                &a.image,
                "/bin/sh",
                "-c",
                &a.shell_cmd,
            ],
            &[],
        )
        .await?;
        let d = cli.run("deploy").await?;
        let (s, _) = timed(&docker, &["stop", &name], &[]).await?;
        let (rm, _) = timed(&docker, &["rm", &name], &[]).await?;
        let x = cli.run("remove").await?;
        if i == 0 {
            continue;
        }
        run.push(r);
        stop_rm.push(s + rm);
        deploy.push(d.total);
        to_created.push(d.to_created);
        on_device.push(d.on_device);
        to_exit.push(d.to_exit);
        remove.push(x.total);
        rm_created.push(x.to_created);
        rm_device.push(x.on_device);
        rm_exit.push(x.to_exit);
    }
    let rtt = sorted(mqtt_rtt(t.mqtt_port, a.rtt_samples.max(1)).await?);
    let load_end = crate::report::Machine::read().load;

    let raw_cycle: Vec<f64> = sorted(run.iter().zip(&stop_rm).map(|(a, b)| a + b).collect());
    let drover_cycle: Vec<f64> = sorted(deploy.iter().zip(&remove).map(|(a, b)| a + b).collect());
    let (run, stop_rm, deploy, remove) =
        (sorted(run), sorted(stop_rm), sorted(deploy), sorted(remove));
    let rtt_p50 = p(&rtt, 50.0);

    let mut table = Table::new(
        "e2e-latency: Drover next to raw Docker, real drover-agent on the real Docker Engine, cached image",
        &[
            "operation (raw vs Drover)",
            "raw p50",
            "raw p99",
            "Drover p50",
            "Drover p99",
            "ratio p50",
            "ratio p99",
            "budget: 1.2 × raw p50 + RTT p50",
            "Drover p50 within",
        ],
    );
    compare(
        &mut table,
        "`docker run -d` vs `drover deploy --wait`",
        &run,
        &deploy,
        rtt_p50,
    );
    compare(
        &mut table,
        "`docker stop && docker rm` vs `drover remove --wait`",
        &stop_rm,
        &remove,
        rtt_p50,
    );
    compare(
        &mut table,
        "whole cycle",
        &raw_cycle,
        &drover_cycle,
        rtt_p50,
    );
    table.row(vec![
        format!(
            "MQTT round trip, publish → receive, QoS 1, same broker ({} samples)",
            rtt.len()
        ),
        // Loopback round trips are tens of microseconds: ms() would say 0.0.
        micros(rtt_p50),
        micros(p(&rtt, 99.0)),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    table.note(format!(
        "{} rounds (after one warm-up round), each: `docker run -d`, `drover deploy --wait`, `docker stop` then `docker rm`, `drover remove --wait`; every measurement is one process started and waited for, as a user would; p99 of fewer than 100 rounds is the slowest round",
        a.rounds
    ));
    table.note(format!(
        "image `{}` (already on the Docker host), command `/bin/sh -c \"{}\"` on both sides; Docker's default stop timeout (10 s) on both sides",
        a.image, a.shell_cmd
    ));
    table.note(format!(
        "CLI: `{} --api … -o json deploy|remove APP -d DEVICE --wait`; agent: `{} {}`; orchestrator: `{}`",
        a.cli_bin.display(),
        a.agent_bin.display(),
        agent_args.join(" "),
        t.orch_command()
    ));
    table.note(format!(
        "load average at the start of the rounds: {load_start}; at the end: {load_end}"
    ));

    let mut parts = Table::new(
        "e2e-latency: where Drover's time goes (p50 / p99, from the operation's own timestamps)",
        &[
            "operation",
            "CLI start → created",
            "created → final",
            "final → CLI exit",
            "total",
        ],
    );
    for (what, created, device_part, exit, total) in [
        ("deploy --wait", to_created, on_device, to_exit, &deploy),
        ("remove --wait", rm_created, rm_device, rm_exit, &remove),
    ] {
        let (created, device_part, exit) = (sorted(created), sorted(device_part), sorted(exit));
        let cell = |v: &[f64]| format!("{} / {}", ms(p(v, 50.0)), ms(p(v, 99.0)));
        parts.row(vec![
            what.into(),
            cell(&created),
            cell(&device_part),
            cell(&exit),
            cell(total),
        ]);
    }
    parts.note("CLI start → created: process start, the HTTP request, the engine; created → final: the durable write, the broker, the agent's pass (Docker's own work), the ack; final → CLI exit: the change event reaching the CLI, printing, exit. Millisecond stamps from the orchestrator's clock, same machine");
    Ok(vec![table, parts])
}
