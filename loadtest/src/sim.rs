//! Simulated device agents: N real MQTT clients in one process.
//!
//! Each simulated agent is what a real `drover-agent` looks like from the
//! broker and the orchestrator: its own client id (= device id), a
//! persistent session (clean_session=false), the retained Last Will on its
//! status topic, and the real protocol from `drover_shared` — topics from
//! [`Topics`], payloads from its types, bytes from its codec. It decides acks
//! with the real agent's own [`Intake`] state machine, so Received →
//! Progress → Succeeded/Failed/Superseded follow exactly the agent's rules.
//! Only the container runtime is simulated ([`crate::runtime`]).
//!
//! Memory matters at 10k+ agents, so each agent is two small tasks (the
//! rumqttc event loop must be polled in its own task; publishing is
//! `try_publish` and never waits) with small request queues, a small
//! inflight window, and a few hundred bytes of state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent::desired::{AckOut, Intake};
use drover_shared::codec::{Message, MAX_PAYLOAD_BYTES};
use drover_shared::model::{DesiredState, ObservedState};
use drover_shared::payload::{
    Ack, AckPhase, Action, Command, ContainerMetrics, Desired, Heartbeat, Hello, HostMetrics,
    Progress, StateReport, Status, Telemetry,
};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{DeviceId, IdError};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info_span, Instrument};

use crate::runtime::{self, PassOutcome, PassSink, RuntimeConfig, SimContainer};

/// rumqttc request queue per agent. A connect needs 6 requests (2
/// subscribes, status, hello, state, heartbeat), a deploy about 8.
const REQUEST_CAPACITY: usize = 32;
/// QoS 1 publishes in flight per agent; rumqttc preallocates this many slots.
const INFLIGHT: u16 = 10;
/// Agent core inbox (connect events, commands, runtime progress).
const INBOX_CAPACITY: usize = 16;
/// Same reconnect policy as the real agent: exponential backoff from
/// 500 ms to 30 s with full jitter.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Distinct error texts kept for the report.
const MAX_ERROR_KINDS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulated device id {id:?}")]
    DeviceId { id: String, source: IdError },
    #[error("no broker address to connect to")]
    NoBroker,
}

/// How every simulated agent of a fleet behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub topics: Topics,
    /// Broker hosts, assigned round-robin (agent i connects to
    /// `hosts[i % len]`): several loopback addresses multiply the
    /// ephemeral ports available (see the README).
    pub hosts: Vec<String>,
    pub port: u16,
    pub heartbeat: Duration,
    pub telemetry: Duration,
    pub keep_alive: Duration,
    /// TCP_NODELAY on the agents' sockets. Off by default, as in rumqttc
    /// and the real agent, so the simulation matches what devices do.
    pub tcp_nodelay: bool,
    pub runtime: RuntimeConfig,
}

/// Counters shared by all agents of a fleet.
#[derive(Debug, Default)]
pub struct Stats {
    /// Agents connected right now (ConnAck seen, no error since).
    pub connected: AtomicI64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Publishes handed to rumqttc.
    pub published: AtomicU64,
    pub telemetry: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Publishes dropped because the request queue was full.
    pub dropped: AtomicU64,
    /// Publishes received (commands and desired states).
    pub received: AtomicU64,
    pub commands: AtomicU64,
    pub malformed: AtomicU64,
    pub acks_succeeded: AtomicU64,
    pub acks_failed: AtomicU64,
    pub acks_superseded: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// A copy of the counters at one moment, for deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connected: i64,
    pub connects: u64,
    pub disconnects: u64,
    pub connect_errors: u64,
    pub published: u64,
    pub telemetry: u64,
    pub heartbeats: u64,
    pub dropped: u64,
    pub received: u64,
    pub commands: u64,
    pub malformed: u64,
    pub acks_succeeded: u64,
    pub acks_failed: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connects: l(&self.connects),
            disconnects: l(&self.disconnects),
            connect_errors: l(&self.connect_errors),
            published: l(&self.published),
            telemetry: l(&self.telemetry),
            heartbeats: l(&self.heartbeats),
            dropped: l(&self.dropped),
            received: l(&self.received),
            commands: l(&self.commands),
            malformed: l(&self.malformed),
            acks_succeeded: l(&self.acks_succeeded),
            acks_failed: l(&self.acks_failed),
        }
    }

    fn error(&self, text: String) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        let mut map = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() < MAX_ERROR_KINDS || map.contains_key(&text) {
            *map.entry(text).or_default() += 1;
        }
    }

    /// Connection errors seen, by text, most frequent first.
    pub fn errors(&self) -> Vec<(String, u64)> {
        let map = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<(String, u64)> = map.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// The label every agent of a fleet sets on itself (in its `hello`), with a
/// value unique to the fleet: a rollout's selector picks exactly this run's
/// agents, even on an orchestrator that has other devices (`--api`).
pub const FLEET_LABEL: &str = "loadtest-fleet";

/// The device id of simulated agent `index` (1-based): `sim-00001`.
pub fn device_id(prefix: &str, index: usize) -> Result<DeviceId, SimError> {
    let id = format!("{prefix}-{index:05}");
    DeviceId::new(id.clone()).map_err(|source| SimError::DeviceId { id, source })
}

/// A growing set of simulated agents.
pub struct Fleet {
    cfg: Arc<SimConfig>,
    prefix: String,
    /// The value of [`FLEET_LABEL`] on its agents.
    label: Arc<str>,
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    devices: Vec<DeviceId>,
}

impl Fleet {
    pub fn new(cfg: SimConfig, prefix: &str) -> Result<Fleet, SimError> {
        if cfg.hosts.is_empty() {
            return Err(SimError::NoBroker);
        }
        Ok(Fleet {
            cfg: Arc::new(cfg),
            prefix: prefix.to_string(),
            label: format!("{prefix}-{}", crate::unique_suffix()).into(),
            stats: Arc::new(Stats::default()),
            stop: watch::channel(false).0,
            tasks: Vec::new(),
            devices: Vec::new(),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// A label selector that matches this fleet's agents and nothing else.
    pub fn selector(&self) -> String {
        format!("{FLEET_LABEL}={}", self.label)
    }

    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Starts agents until there are `n`, at about `per_sec` per second.
    /// Start times are jittered within each slot so connects never land in
    /// lockstep.
    pub async fn grow_to(&mut self, n: usize, per_sec: f64) -> Result<(), SimError> {
        let slot = Duration::from_secs_f64(1.0 / per_sec.max(0.001));
        let begin = tokio::time::Instant::now();
        let first = self.devices.len();
        for i in first..n {
            let k = u32::try_from(i - first).unwrap_or(u32::MAX);
            let jitter = slot.mul_f64(rand::rng().random::<f64>());
            let at = begin + slot * k + jitter;
            tokio::time::sleep_until(at).await;
            let device = device_id(&self.prefix, i + 1)?;
            let host = self.cfg.hosts[i % self.cfg.hosts.len()].clone();
            self.tasks.extend(spawn_agent(
                self.cfg.clone(),
                self.label.clone(),
                device.clone(),
                host,
                self.stats.clone(),
                self.stop.subscribe(),
            ));
            self.devices.push(device);
        }
        Ok(())
    }

    /// Disconnects every agent cleanly (DISCONNECT, so no Last Will), then
    /// ends whatever is left after `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && self.tasks.iter().any(|t| !t.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// What the event-loop task and the runtime tell an agent core.
#[derive(Debug)]
enum Input {
    Connected,
    Disconnected,
    Desired(Desired),
    Command(Command),
    Progress {
        generation: u64,
        progress: Progress,
    },
    Done {
        generation: u64,
        outcome: PassOutcome,
    },
}

fn qos(kind: TopicKind) -> QoS {
    if kind.qos() == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn spawn_agent(
    cfg: Arc<SimConfig>,
    fleet: Arc<str>,
    device: DeviceId,
    host: String,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> [JoinHandle<()>; 2] {
    let mut opts = MqttOptions::new(device.as_str(), host, cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_session(false);
    opts.set_inflight(INFLIGHT);
    opts.set_max_packet_size(MAX_PAYLOAD_BYTES + 4096, MAX_PAYLOAD_BYTES + 4096);
    opts.set_last_will(LastWill::new(
        cfg.topics.device(&device, TopicKind::Status),
        drover_shared::encode(&Status {
            online: false,
            at_ms: 0,
        }),
        qos(TopicKind::Status),
        TopicKind::Status.retained(),
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = NetworkOptions::new();
    // A connect queued behind thousands of others at the broker can take
    // longer than rumqttc's 5 s default; a timeout then is a real finding,
    // not noise, so allow a little more.
    net.set_connection_timeout(10);
    net.set_tcp_nodelay(cfg.tcp_nodelay);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let span = info_span!("sim", device = %device);
    let driver = tokio::spawn(
        drive(
            eventloop,
            cfg.topics.clone(),
            device.clone(),
            tx.clone(),
            stats.clone(),
        )
        .instrument(span.clone()),
    );
    let agent = Agent {
        cfg,
        fleet,
        device,
        client,
        stats,
        inbox_tx: tx,
        intake: Intake::new(None),
        online: false,
        seq: 0,
        booted_ms: now_ms().saturating_sub(rand::rng().random_range(60_000..86_400_000)),
        observed: ObservedState::default(),
        published: None,
        containers: Vec::new(),
        images: Vec::new(),
        pass: None,
    };
    let core = tokio::spawn(agent.run(rx, stop).instrument(span));
    [driver, core]
}

/// Polls the event loop; the same backoff policy as the real agent.
async fn drive(
    mut eventloop: EventLoop,
    topics: Topics,
    device: DeviceId,
    tx: mpsc::Sender<Input>,
    stats: Arc<Stats>,
) {
    let mut backoff = BACKOFF_START;
    let mut connected = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = BACKOFF_START;
                connected = true;
                stats.connected.fetch_add(1, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                if tx.send(Input::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                let input = match topics.parse(&p.topic) {
                    Some((d, TopicKind::Desired)) if d == device => {
                        drover_shared::decode::<Desired>(&p.payload).map(Input::Desired)
                    }
                    Some((d, TopicKind::Cmd)) if d == device => {
                        drover_shared::decode::<Command>(&p.payload).map(Input::Command)
                    }
                    _ => continue,
                };
                match input {
                    Ok(input) => {
                        if tx.send(input).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                        debug!(error = %e, "malformed payload");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                if connected {
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    connected = false;
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                    stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.try_send(Input::Disconnected);
                }
                stats.error(e.to_string());
                let max = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                let delay = Duration::from_millis(rand::rng().random_range(0..=max));
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One simulated agent's core: the owner of its desired state and acks.
struct Agent {
    cfg: Arc<SimConfig>,
    /// Its fleet's [`FLEET_LABEL`] value.
    fleet: Arc<str>,
    device: DeviceId,
    client: AsyncClient,
    stats: Arc<Stats>,
    inbox_tx: mpsc::Sender<Input>,
    intake: Intake,
    online: bool,
    seq: u64,
    booted_ms: u64,
    observed: ObservedState,
    published: Option<ObservedState>,
    /// What the simulated runtime "runs" and which images it has.
    containers: Vec<SimContainer>,
    images: Vec<String>,
    pass: Option<JoinHandle<()>>,
}

/// Forwards runtime progress to the agent core without waiting: a full
/// inbox drops a progress step, never a final outcome.
struct InboxSink {
    generation: u64,
    tx: mpsc::Sender<Input>,
}

impl PassSink for InboxSink {
    fn progress(&mut self, progress: Progress) {
        let _ = self.tx.try_send(Input::Progress {
            generation: self.generation,
            progress,
        });
    }
}

impl Agent {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut stop: watch::Receiver<bool>) {
        let start = tokio::time::Instant::now();
        let jitter = |period: Duration| period.mul_f64(rand::rng().random::<f64>());
        let mut heartbeat =
            tokio::time::interval_at(start + jitter(self.cfg.heartbeat), self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut telemetry =
            tokio::time::interval_at(start + jitter(self.cfg.telemetry), self.cfg.telemetry);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                input = rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                _ = heartbeat.tick() => self.heartbeat(),
                _ = telemetry.tick() => self.telemetry(),
            }
        }
        if let Some(p) = self.pass.take() {
            p.abort();
        }
        // DISCONNECT: a clean goodbye, so the broker does not fire the will.
        let _ = self.client.try_disconnect();
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Connected => {
                self.online = true;
                for kind in TopicKind::TO_DEVICE {
                    if let Err(e) = self
                        .client
                        .try_subscribe(self.cfg.topics.device(&self.device, kind), qos(kind))
                    {
                        debug!(error = %e, "subscribe not queued");
                    }
                }
                self.send(&Status {
                    online: true,
                    at_ms: now_ms(),
                });
                self.send(&self.hello());
                self.published = None;
                self.publish_state();
                self.heartbeat();
            }
            Input::Disconnected => self.online = false,
            Input::Desired(d) => self.offer(d.state, None),
            Input::Command(c) => {
                self.stats.commands.fetch_add(1, Ordering::Relaxed);
                match c.action {
                    Action::Apply { desired, app, .. } => {
                        self.offer(desired, Some((&c.id, Some(&app))))
                    }
                    // The simulated fleet runs no containers, so no jobs.
                    Action::RunJob(_) | Action::CancelJob { .. } => {}
                    Action::Resync => {
                        self.ack(&AckOut {
                            command_id: c.id.clone(),
                            phase: AckPhase::Received,
                            detail: String::new(),
                        });
                        self.published = None;
                        self.send(&self.hello());
                        self.publish_state();
                        self.heartbeat();
                        self.ack(&AckOut {
                            command_id: c.id,
                            phase: AckPhase::Succeeded,
                            detail: String::new(),
                        });
                    }
                }
            }
            Input::Progress {
                generation,
                progress,
            } => {
                for ack in self
                    .intake
                    .progress_acks(generation, &progress, "", now_ms())
                {
                    self.send(&ack);
                }
            }
            Input::Done {
                generation,
                outcome,
            } => {
                if generation != self.intake.held_generation() {
                    return;
                }
                self.pass = None;
                let Some(held) = self.intake.held() else {
                    return;
                };
                let apps = runtime::observe(held, &outcome.containers, outcome.failure.as_ref());
                // Per app, as the real agent answers commands: the failure
                // belongs to the app(s) using that container name.
                let failures: drover_agent::desired::Failures = outcome
                    .failure
                    .map(|(container, text)| {
                        held.apps
                            .iter()
                            .filter(|a| a.spec.containers.iter().any(|c| c.name == container))
                            .map(|a| (a.spec.name.clone(), text.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                self.containers = outcome.containers;
                self.images = outcome.images;
                for ack in self.intake.finished(generation, failures) {
                    self.ack(&ack);
                }
                self.observed.applied_generation = self.intake.applied_generation();
                self.observed.apps = apps;
                self.publish_state();
            }
        }
    }

    /// As the real agent's `Core::offer`, with the simulated runtime in place
    /// of persisting and reconciling.
    fn offer(
        &mut self,
        state: DesiredState,
        command: Option<(&str, Option<&drover_shared::Name>)>,
    ) {
        let offer = self.intake.offer(state, command);
        for ack in &offer.acks {
            self.ack(ack);
        }
        if !offer.adopted {
            return;
        }
        let Some(held) = self.intake.held().cloned() else {
            return;
        };
        self.observed.desired_generation = held.generation;
        self.publish_state();
        if let Some(p) = self.pass.take() {
            p.abort();
        }
        let steps = runtime::plan(&held, &self.containers, &self.images);
        let cfg = self.cfg.runtime;
        let containers = self.containers.clone();
        let images = self.images.clone();
        let tx = self.inbox_tx.clone();
        let generation = held.generation;
        self.pass = Some(tokio::spawn(
            async move {
                let mut sink = InboxSink {
                    generation,
                    tx: tx.clone(),
                };
                let outcome = runtime::execute(cfg, steps, containers, images, &mut sink).await;
                let _ = tx
                    .send(Input::Done {
                        generation,
                        outcome,
                    })
                    .await;
            }
            .in_current_span(),
        ));
    }

    fn hello(&self) -> Hello {
        Hello {
            agent_version: concat!(env!("CARGO_PKG_VERSION"), "-sim").to_string(),
            hostname: self.device.to_string(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.6.51+rpt-rpi-v8".into(),
            arch: "aarch64".into(),
            // As an agent from before the platform report: the
            // orchestrator tells linux/arm64 from `arch`.
            platform: None,
            cpus: 4,
            memory_bytes: 4 * 1024 * 1024 * 1024,
            disk_total_bytes: 32_000_000_000,
            disk_free_bytes: 21_500_000_000,
            docker_version: "20.10.24+dfsg1".into(),
            docker_error: None,
            images: self.images.clone(),
            booted_at_ms: self.booted_ms,
            labels: BTreeMap::from([(FLEET_LABEL.to_string(), self.fleet.to_string())]),
            agent_digest: None,
            self_update: false,
        }
    }

    fn publish_state(&mut self) {
        if self.published.as_ref() == Some(&self.observed) {
            return;
        }
        self.send(&StateReport {
            at_ms: now_ms(),
            observed: self.observed.clone(),
        });
        self.published = Some(self.observed.clone());
    }

    fn heartbeat(&mut self) {
        if !self.online {
            return;
        }
        self.seq += 1;
        let hb = Heartbeat {
            at_ms: now_ms(),
            seq: self.seq,
            uptime_s: now_ms().saturating_sub(self.booted_ms) / 1000,
            applied_generation: self.intake.applied_generation(),
            interval_ms: self.cfg.heartbeat.as_millis() as u64,
        };
        if self.send(&hb) {
            self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn telemetry(&mut self) {
        if !self.online {
            return;
        }
        let mut rng = rand::rng();
        let t = Telemetry {
            at_ms: now_ms(),
            host: HostMetrics {
                cpu_percent: rng.random_range(1.0..40.0),
                memory_used_bytes: rng.random_range(400_000_000..1_800_000_000),
                memory_total_bytes: 4 * 1024 * 1024 * 1024,
                disk_used_bytes: 10_500_000_000,
                disk_total_bytes: 32_000_000_000,
                load_1: rng.random_range(0.0..2.0),
                load_5: 0.5,
                load_15: 0.4,
                uptime_s: now_ms().saturating_sub(self.booted_ms) / 1000,
            },
            containers: self
                .containers
                .iter()
                .filter(|c| c.running)
                .map(|c| ContainerMetrics {
                    app: c.app.clone(),
                    container: c.name.clone(),
                    cpu_percent: rng.random_range(0.1..15.0),
                    memory_bytes: rng.random_range(5_000_000..80_000_000),
                    memory_limit_bytes: None,
                })
                .collect(),
        };
        if self.send(&t) {
            self.stats.telemetry.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn ack(&self, a: &AckOut) {
        let counter = match a.phase {
            AckPhase::Succeeded => Some(&self.stats.acks_succeeded),
            AckPhase::Failed => Some(&self.stats.acks_failed),
            AckPhase::Superseded => Some(&self.stats.acks_superseded),
            AckPhase::Received | AckPhase::Progress => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.send(&Ack {
            command_id: a.command_id.clone(),
            at_ms: now_ms(),
            phase: a.phase,
            detail: a.detail.clone(),
            progress: None,
        });
    }

    /// Queues a publish without waiting; `false` if the queue was full.
    fn send<T: Message>(&self, msg: &T) -> bool {
        let kind = T::KIND;
        let topic = self.cfg.topics.device(&self.device, kind);
        match self.client.try_publish(
            topic,
            qos(kind),
            kind.retained(),
            drover_shared::encode(msg),
        ) {
            Ok(()) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_valid_and_sortable() {
        assert_eq!(device_id("sim", 1).expect("valid").as_str(), "sim-00001");
        assert_eq!(
            device_id("sim", 123_456).expect("valid").as_str(),
            "sim-123456"
        );
        assert!(device_id("bad/prefix", 1).is_err());
    }

    #[test]
    fn a_fleet_selector_picks_its_own_agents_only() {
        use drover::core::selector::{validate_labels, Selector};
        let cfg = SimConfig {
            topics: Topics::default(),
            hosts: vec!["127.0.0.1".into()],
            port: 1883,
            heartbeat: Duration::from_secs(30),
            telemetry: Duration::from_secs(10),
            keep_alive: Duration::from_secs(10),
            tcp_nodelay: false,
            runtime: RuntimeConfig::default(),
        };
        let a = Fleet::new(cfg.clone(), "sim").expect("fleet");
        let b = Fleet::new(cfg, "sim").expect("fleet");
        let own = BTreeMap::from([(FLEET_LABEL.to_string(), a.label.to_string())]);
        validate_labels(&own).expect("the orchestrator accepts the label in a hello");
        let sel = Selector::parse(&a.selector()).expect("a valid selector");
        assert!(sel.matches(&own));
        let other = BTreeMap::from([(FLEET_LABEL.to_string(), b.label.to_string())]);
        assert!(!sel.matches(&other), "another fleet of the same prefix");
    }
}
