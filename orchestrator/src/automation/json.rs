//! The JSON documents of the mirror (`<root>/v1/json/...`): their field
//! names are a published contract (docs/protocol.md, "The JSON tree"), so
//! each document is a struct here, serialized with serde_json straight to
//! bytes. They borrow what they show: the telemetry path, ~1,000 samples a
//! second at 10,000 devices, allocates only the output buffer and topic.

use std::collections::BTreeMap;

use drover_shared::model::{AppPhase, ContainerStatus, DesiredState, ObservedState, RunState};
use drover_shared::payload::{ContainerMetrics, DeviceEvent, Hello, Telemetry};
use drover_shared::{DeviceId, Name};
use serde::Serialize;

use crate::contract;

/// `json/dev/<id>/status` (retained).
#[derive(Debug, Serialize)]
pub struct Status<'a> {
    pub device: &'a DeviceId,
    pub online: bool,
    /// `"online"` or `"offline"`: the availability word Home Assistant
    /// and Node-RED dashboards compare with.
    pub status: &'static str,
    pub last_seen_ms: u64,
}

impl<'a> Status<'a> {
    pub fn new(device: &'a DeviceId, online: bool, last_seen_ms: u64) -> Status<'a> {
        Status {
            device,
            online,
            status: if online { "online" } else { "offline" },
            last_seen_ms,
        }
    }
}

/// `json/dev/<id>/inventory` (retained): the device's `hello`.
#[derive(Debug, Serialize)]
pub struct Inventory<'a> {
    pub device: &'a DeviceId,
    pub hostname: &'a str,
    pub agent_version: &'a str,
    pub os: &'a str,
    pub kernel: &'a str,
    pub arch: &'a str,
    /// `linux/arm/v7`: what the agent reports, or tells from `arch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub docker_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<&'a str>,
    pub images: &'a [String],
    pub booted_at_ms: u64,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> Inventory<'a> {
    pub fn new(
        device: &'a DeviceId,
        h: &'a Hello,
        labels: &'a BTreeMap<String, String>,
    ) -> Inventory<'a> {
        Inventory {
            device,
            hostname: &h.hostname,
            agent_version: &h.agent_version,
            os: &h.os,
            kernel: &h.kernel,
            arch: &h.arch,
            platform: h.effective_platform().map(|p| p.to_string()),
            cpus: h.cpus,
            memory_bytes: h.memory_bytes,
            disk_total_bytes: h.disk_total_bytes,
            disk_free_bytes: h.disk_free_bytes,
            docker_version: &h.docker_version,
            docker_error: h.docker_error.as_deref(),
            images: &h.images,
            booted_at_ms: h.booted_at_ms,
            labels,
        }
    }
}

/// `json/dev/<id>/state` (retained): every app the device should run or
/// still runs, keyed by name, so a template reads
/// `value_json.apps.web.state`.
#[derive(Debug, Serialize)]
pub struct State<'a> {
    pub device: &'a DeviceId,
    pub desired_generation: u64,
    pub applied_generation: u64,
    pub apps: BTreeMap<&'a str, AppState<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct AppState<'a> {
    /// What runs: the agent's phase (`pending`, `pulling`, `retrying`,
    /// `starting`, `running`, `stopped`, `paused`, `failed`), or `pending`
    /// while the device has not reported the app yet.
    pub state: &'static str,
    /// What it should do: `running`, `stopped`, `paused`, or `removed`
    /// while the device still reports an app it was told to remove.
    pub desired: &'static str,
    /// `state == "running"`, for templates and switches.
    pub running: bool,
    pub release: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub containers: Vec<Container<'a>>,
}

#[derive(Debug, Serialize)]
pub struct Container<'a> {
    pub name: &'a Name,
    pub image: &'a str,
    /// Docker's word: created, running, exited, … or `absent`.
    pub state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<drover_shared::model::Health>,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
}

impl<'a> From<&'a ContainerStatus> for Container<'a> {
    fn from(c: &'a ContainerStatus) -> Self {
        Container {
            name: &c.name,
            image: &c.image,
            state: &c.state,
            health: c.health,
            restarts: c.restarts,
            exit_code: c.exit_code,
        }
    }
}

pub fn phase_str(p: AppPhase) -> &'static str {
    match p {
        AppPhase::Pending => "pending",
        AppPhase::Pulling => "pulling",
        AppPhase::Retrying => "retrying",
        AppPhase::Starting => "starting",
        AppPhase::Running => "running",
        AppPhase::Stopped => "stopped",
        AppPhase::Paused => "paused",
        AppPhase::Failed => "failed",
    }
}

fn run_str(r: RunState) -> &'static str {
    match r {
        RunState::Running => "running",
        RunState::Stopped => "stopped",
        RunState::Paused => "paused",
    }
}

impl<'a> State<'a> {
    pub fn new(
        device: &'a DeviceId,
        desired: Option<&'a DesiredState>,
        observed: Option<&'a ObservedState>,
    ) -> State<'a> {
        let mut apps = BTreeMap::new();
        for d in desired.map(|d| d.apps.as_slice()).unwrap_or_default() {
            apps.insert(
                d.spec.name.as_str(),
                AppState {
                    state: "pending",
                    desired: run_str(d.run),
                    running: false,
                    release: d.release,
                    error: None,
                    containers: Vec::new(),
                },
            );
        }
        for o in observed.map(|o| o.apps.as_slice()).unwrap_or_default() {
            let a = apps.entry(o.name.as_str()).or_insert(AppState {
                state: "pending",
                desired: "removed",
                running: false,
                release: o.release,
                error: None,
                containers: Vec::new(),
            });
            a.state = phase_str(o.phase);
            a.running = o.phase == AppPhase::Running;
            a.error = o.error.as_deref();
            a.containers = o.containers.iter().map(Container::from).collect();
            if o.release != 0 {
                a.release = o.release;
            }
        }
        State {
            device,
            desired_generation: desired.map_or(0, |d| d.generation),
            applied_generation: observed.map_or(0, |o| o.applied_generation),
            apps,
            docker_error: observed.and_then(|o| o.docker_error.as_deref()),
        }
    }

    pub fn of(view: &'a contract::Device) -> State<'a> {
        State::new(&view.id, view.desired.as_ref(), view.observed.as_ref())
    }
}

/// `json/dev/<id>/telemetry` (retained: the latest sample). Host figures
/// are flat, with percentages computed, so templates stay short
/// (`value_json.memory_percent`).
#[derive(Debug, Serialize)]
pub struct TelemetryDoc<'a> {
    pub device: &'a DeviceId,
    pub at_ms: u64,
    pub cpu_percent: f32,
    pub memory_percent: f64,
    pub disk_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub uptime_s: u64,
    pub containers: &'a [ContainerMetrics],
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    // Two decimals: enough for a gauge, and stable text for a template.
    (used as f64 * 10_000.0 / total as f64).round() / 100.0
}

impl<'a> TelemetryDoc<'a> {
    pub fn new(device: &'a DeviceId, t: &'a Telemetry) -> TelemetryDoc<'a> {
        let h = &t.host;
        TelemetryDoc {
            device,
            at_ms: t.at_ms,
            cpu_percent: h.cpu_percent,
            memory_percent: percent(h.memory_used_bytes, h.memory_total_bytes),
            disk_percent: percent(h.disk_used_bytes, h.disk_total_bytes),
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            disk_used_bytes: h.disk_used_bytes,
            disk_total_bytes: h.disk_total_bytes,
            load_1: h.load_1,
            load_5: h.load_5,
            load_15: h.load_15,
            uptime_s: h.uptime_s,
            containers: &t.containers,
        }
    }
}

/// `json/dev/<id>/event` (not retained).
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub device: &'a DeviceId,
    #[serde(flatten)]
    pub event: &'a DeviceEvent,
}

#[cfg(test)]
mod tests {
    use drover_shared::model::{AppStatus, DesiredApp};
    use drover_shared::payload::HostMetrics;
    use serde_json::{json, Value};

    use super::*;

    fn id() -> DeviceId {
        DeviceId::new("pi-01").expect("id")
    }

    #[test]
    fn telemetry_is_flat_with_percentages() {
        let t = Telemetry {
            at_ms: 5,
            host: HostMetrics {
                cpu_percent: 12.5,
                memory_used_bytes: 1,
                memory_total_bytes: 3,
                disk_used_bytes: 50,
                disk_total_bytes: 200,
                ..Default::default()
            },
            containers: vec![],
        };
        let d = id();
        let v: Value =
            serde_json::from_slice(&serde_json::to_vec(&TelemetryDoc::new(&d, &t)).expect("json"))
                .expect("parse");
        assert_eq!(v["device"], "pi-01");
        assert_eq!(v["cpu_percent"], 12.5);
        assert_eq!(v["memory_percent"], 33.33);
        assert_eq!(v["disk_percent"], 25.0);
        assert_eq!(v["containers"], json!([]));
        let zero = Telemetry {
            at_ms: 0,
            host: HostMetrics::default(),
            containers: vec![],
        };
        let v = serde_json::to_value(TelemetryDoc::new(&d, &zero)).expect("json");
        assert_eq!(v["memory_percent"], 0.0, "no division by zero");
    }

    #[test]
    fn state_is_keyed_by_app_and_merges_desired_and_observed() {
        let spec = |n: &str| {
            serde_json::from_value(json!({
                "name": n, "containers": [{"name": "main", "image": "busybox:1"}]
            }))
            .expect("spec")
        };
        let desired = DesiredState {
            generation: 4,
            apps: vec![
                DesiredApp {
                    spec: spec("web"),
                    run: RunState::Running,
                    started_at: 4,
                    release: 2,
                    restarted_at: 0,
                },
                DesiredApp {
                    spec: spec("new"),
                    run: RunState::Stopped,
                    started_at: 0,
                    release: 1,
                    restarted_at: 0,
                },
            ],
            agent: None,
        };
        let observed = ObservedState {
            applied_generation: 3,
            desired_generation: 4,
            apps: vec![
                AppStatus {
                    name: Name::new("web").expect("n"),
                    phase: AppPhase::Running,
                    error: None,
                    attempts: 0,
                    next_retry_at_ms: None,
                    containers: vec![ContainerStatus {
                        name: Name::new("main").expect("n"),
                        image: "busybox:1".into(),
                        container_id: None,
                        state: "running".into(),
                        exit_code: None,
                        error: None,
                        health: None,
                        restarts: 0,
                    }],
                    release: 2,
                },
                AppStatus {
                    name: Name::new("old").expect("n"),
                    phase: AppPhase::Stopped,
                    error: None,
                    attempts: 0,
                    next_retry_at_ms: None,
                    containers: vec![],
                    release: 0,
                },
            ],
            storage_error: None,
            docker_error: None,
            agent_update: None,
        };
        let d = id();
        let v =
            serde_json::to_value(State::new(&d, Some(&desired), Some(&observed))).expect("json");
        assert_eq!(v["apps"]["web"]["state"], "running");
        assert_eq!(v["apps"]["web"]["running"], true);
        assert_eq!(v["apps"]["web"]["desired"], "running");
        assert_eq!(v["apps"]["web"]["containers"][0]["state"], "running");
        assert_eq!(v["apps"]["new"]["state"], "pending");
        assert_eq!(v["apps"]["new"]["desired"], "stopped");
        assert_eq!(v["apps"]["old"]["desired"], "removed");
        assert_eq!(v["desired_generation"], 4);
        assert_eq!(v["applied_generation"], 3);
        let empty = serde_json::to_value(State::new(&d, None, None)).expect("json");
        assert_eq!(empty["apps"], json!({}));
    }

    #[test]
    fn status_says_the_availability_word() {
        let d = id();
        let v = serde_json::to_value(Status::new(&d, false, 9)).expect("json");
        assert_eq!(
            v,
            json!({"device": "pi-01", "online": false, "status": "offline", "last_seen_ms": 9})
        );
    }
}
