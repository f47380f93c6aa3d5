//! Makes the local runtime match the desired state.
//!
//! Split in two: [`plan_with`] is a pure function from (desired, actual,
//! what the agent already brought about) to steps, so every decision is
//! unit-tested; [`Reconciler`] executes a plan against a [`Runtime`] and
//! reports what it saw. The reconciler is level-triggered: it re-reads the
//! runtime on every pass. Its only memory is what it needs to tell drift
//! from intent (which containers it already settled), pull retries, and
//! which events it already published.
//!
//! Passes run on every new desired state, on every periodic tick, soon after
//! a Docker event about one of this device's containers (debounced), and
//! when a pull retry is due.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_shared::model::{
    AppPhase, AppSpec, AppStatus, ContainerSpec, ContainerStatus, DesiredState, Health, ImageRef,
    NetworkMode, RestartPolicy, RunState,
};
use drover_shared::payload::{DeviceEvent, EventKind, Progress, RegistryCredential, Secrets};
use drover_shared::{DeviceId, Name};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::images::{self, ImageLedger, PulledImage};
use crate::now_ms;
use crate::pull::{self, PullErrorClass};
use crate::runtime::{
    container_name, labels_for, network_labels, network_name, ManagedContainer, ManagedNetwork,
    PullProgress, Runtime, RuntimeError,
};

/// Pull progress is sent at most this often per pass (≤ 2/s).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How often a pass looks again at a dependency being waited for, when no
/// Docker event (a health status change, a start) brings it sooner.
const DEPENDENCY_POLL: Duration = Duration::from_secs(1);
/// Docker events come in bursts (kill, die, stop, destroy): one pass for a burst.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// One runtime action. Steps that act on an existing container carry its id.
// `Create` carries a whole spec; a plan has a handful of steps, so boxing it
// would only make the planner's code and tests noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Pull {
        app: Name,
        container: Name,
        image: String,
    },
    /// `app_network`: the container joins its app's network (the app
    /// wants one, see [`wants_network`], and the container is in `bridge`
    /// mode); otherwise it gets its spec's own mode, Docker's default
    /// bridge for `bridge`.
    Create {
        app: Name,
        spec: ContainerSpec,
        app_network: bool,
    },
    /// `id: None` starts the container created earlier in the same pass.
    Start {
        app: Name,
        container: Name,
        id: Option<String>,
    },
    Stop {
        app: Name,
        container: Name,
        id: String,
    },
    Remove {
        app: Name,
        container: Name,
        id: String,
    },
    /// `docker pause`; `id: None` as for `Start`.
    Pause {
        app: Name,
        container: Name,
        id: Option<String>,
    },
    Unpause {
        app: Name,
        container: Name,
        id: String,
    },
    /// `docker restart`: the same container, new processes.
    Restart {
        app: Name,
        container: Name,
        id: String,
    },
    /// Creates the app's own network, before its containers.
    CreateNetwork { app: Name },
    /// Removes an app network no desired app wants (or a duplicate of
    /// one), after the containers that were on it are gone.
    RemoveNetwork { app: Name, id: String },
}

impl Step {
    /// The app and container a container step acts on; `None` for the
    /// network steps, which act on a whole app.
    fn key(&self) -> Option<(&Name, &Name)> {
        Some(match self {
            Step::Pull { app, container, .. }
            | Step::Start { app, container, .. }
            | Step::Stop { app, container, .. }
            | Step::Remove { app, container, .. }
            | Step::Pause { app, container, .. }
            | Step::Unpause { app, container, .. }
            | Step::Restart { app, container, .. } => (app, container),
            Step::Create { app, spec, .. } => (app, &spec.name),
            Step::CreateNetwork { .. } | Step::RemoveNetwork { .. } => return None,
        })
    }

    fn app(&self) -> &Name {
        match self {
            Step::Pull { app, .. }
            | Step::Create { app, .. }
            | Step::Start { app, .. }
            | Step::Stop { app, .. }
            | Step::Remove { app, .. }
            | Step::Pause { app, .. }
            | Step::Unpause { app, .. }
            | Step::Restart { app, .. }
            | Step::CreateNetwork { app }
            | Step::RemoveNetwork { app, .. } => app,
        }
    }

    /// What a successful step did, for the restore event.
    fn done_text(&self) -> String {
        let app = self.app();
        let Some((_, container)) = self.key() else {
            return match self {
                Step::CreateNetwork { .. } => format!("created the network of {app}"),
                _ => format!("removed the network of {app}"),
            };
        };
        match self {
            Step::Pull { image, .. } => format!("pulled {image}"),
            Step::Create { .. } => format!("created {app}/{container}"),
            Step::Start { .. } => format!("started {app}/{container}"),
            Step::Stop { .. } => format!("stopped {app}/{container}"),
            Step::Remove { .. } => format!("removed {app}/{container}"),
            Step::Pause { .. } => format!("paused {app}/{container}"),
            Step::Unpause { .. } => format!("unpaused {app}/{container}"),
            Step::Restart { .. } => format!("restarted {app}/{container}"),
            Step::CreateNetwork { .. } | Step::RemoveNetwork { .. } => String::new(),
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Step::Pull { .. } => "pulling",
            Step::Create { .. } => "creating",
            Step::Start { .. } => "starting",
            Step::Stop { .. } => "stopping",
            Step::Remove { .. } => "removing",
            Step::Pause { .. } => "pausing",
            Step::Unpause { .. } => "unpausing",
            Step::Restart { .. } => "restarting",
            Step::CreateNetwork { .. } => "creating network",
            Step::RemoveNetwork { .. } => "removing network",
        }
    }
}

/// What the agent has already brought about, per (app, container): the spec
/// fingerprint and run state it last converged to. A container that departs
/// from a settled state is drift; one that is not settled yet is still being
/// brought about (a deploy, a start) and the operator's intent wins.
pub type Settled = HashMap<(Name, Name), (String, RunState, u64)>;

/// The restart requests ([`DesiredApp::restarted_at`]) the agent has carried
/// out: per (app, container) the value it last did, and below that for
/// every container `floor`, a generation the agent fully applied before it
/// restarted (every restart at or below it was done then). A container of
/// a running app whose desired value is above what this says is restarted.
///
/// [`DesiredApp::restarted_at`]: drover_shared::model::DesiredApp::restarted_at
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restarted {
    pub done: HashMap<(Name, Name), u64>,
    pub floor: u64,
}

impl Restarted {
    /// Whether the restart requested at `wanted` is still to be done.
    pub fn due(&self, app: &Name, container: &Name, wanted: u64) -> bool {
        let done = self
            .done
            .get(&(app.clone(), container.clone()))
            .copied()
            .unwrap_or(self.floor);
        wanted > done
    }
}

/// Drift the planner found and repairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The container is gone (removed by hand, lost with the daemon's data).
    Removed,
    /// The container exited and its restart policy says to run it again.
    Exited { code: Option<i64> },
}

impl Drift {
    pub fn detail(&self) -> String {
        match self {
            Drift::Removed => "container was removed; recreated".to_string(),
            Drift::Exited { code: Some(c) } => format!("container exited with code {c}; started"),
            Drift::Exited { code: None } => "container exited; started".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub app: Name,
    pub container: Name,
    pub drift: Drift,
}

/// A container that exited while its app should run, and that its restart
/// policy says to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftExited {
    pub app: Name,
    pub container: Name,
    pub id: String,
    pub exit_code: Option<i64>,
    pub policy: RestartPolicy,
}

impl LeftExited {
    pub fn detail(&self) -> String {
        let code = self
            .exit_code
            .map_or_else(|| "an unknown code".to_string(), |c| format!("code {c}"));
        format!(
            "container exited with {code}; restart policy {} leaves it exited",
            self.policy.docker_name()
        )
    }
}

/// How far a dependency is from letting its dependents start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyState {
    /// Not running (Docker's state word, or `absent`).
    NotRunning(String),
    /// Running, its health check has not passed yet.
    Starting,
    /// Running, and Docker says its health check fails.
    Unhealthy,
}

/// A container whose start waits for a dependency (`depends_on`) to be
/// running, and healthy where it has a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub app: Name,
    pub container: Name,
    pub dependency: Name,
    pub state: DependencyState,
    /// How long the wait may last before the app fails.
    pub bound: Duration,
}

/// The shortest wait for a dependency.
pub const DEPENDENCY_WAIT_MIN: Duration = Duration::from_secs(60);

/// How long a dependent waits for `dep`: the time its health check may
/// take to pass (start period, then one more than its retries of interval
/// plus timeout, with Docker's defaults for what it leaves out) and at
/// least [`DEPENDENCY_WAIT_MIN`]. A dependency with no check of its own but
/// a health status (the image's HEALTHCHECK) gets Docker's defaults.
pub fn dependency_wait(dep: &ContainerSpec, has_health: bool) -> Duration {
    let ms = match &dep.healthcheck {
        Some(h) if h.test.first().map(String::as_str) != Some("NONE") => {
            let interval = h.interval_ms.unwrap_or(30_000);
            let timeout = h.timeout_ms.unwrap_or(30_000);
            let tries = u64::from(h.retries.unwrap_or(3)) + 1;
            h.start_period_ms
                .unwrap_or(0)
                .saturating_add(tries.saturating_mul(interval.saturating_add(timeout)))
        }
        None if has_health => 4 * (30_000 + 30_000),
        _ => 0,
    };
    Duration::from_millis(ms).max(DEPENDENCY_WAIT_MIN)
}

/// Whether a wait of `waited` so far has failed: at once for an unhealthy
/// dependency (as Compose does), past its bound otherwise. The error names
/// the container and the dependency.
pub fn judge_wait(b: &Blocked, waited: Duration) -> Option<String> {
    let what = match &b.state {
        DependencyState::Unhealthy => {
            return Some(format!(
                "container {} not started: its dependency {} is unhealthy",
                b.container, b.dependency
            ))
        }
        _ if waited < b.bound => return None,
        DependencyState::NotRunning(state) => format!("not running ({state})"),
        DependencyState::Starting => "not healthy (health: starting)".to_string(),
    };
    Some(format!(
        "container {} not started: its dependency {} is still {what} after {} s",
        b.container,
        b.dependency,
        b.bound.as_secs()
    ))
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub repairs: Vec<Repair>,
    pub left_exited: Vec<LeftExited>,
    /// Containers whose start waits for a dependency; not started this pass.
    pub blocked: Vec<Blocked>,
}

/// Whether a container that exited with `exit_code` should run again, by
/// its restart policy (the same rule Docker applies to its own restarts).
pub fn restarts_after_exit(policy: RestartPolicy, exit_code: Option<i64>) -> bool {
    match policy {
        RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        // An unknown code counts as a failure: better one start too many.
        RestartPolicy::OnFailure => exit_code != Some(0),
        RestartPolicy::No => false,
    }
}

/// Whether an app gets a Docker network of its own: only with two or more
/// `bridge`-mode containers, the one case where its containers need to
/// reach each other by name. One such container runs on Docker's default
/// bridge: Docker's default address pools allow only about 30 user-defined
/// bridge networks per daemon, so a network per app would cap a device at
/// about 30 apps.
pub fn wants_network(app: &AppSpec) -> bool {
    app.containers
        .iter()
        .filter(|c| c.network_mode == NetworkMode::Bridge)
        .count()
        >= 2
}

/// [`plan_with`] for a fresh agent that has settled nothing.
pub fn plan(
    desired: &DesiredState,
    actual: &[ManagedContainer],
    networks: &[ManagedNetwork],
) -> Vec<Step> {
    plan_with(
        desired,
        actual,
        networks,
        &Settled::new(),
        &Restarted::default(),
    )
    .steps
}

/// The steps that take `actual` to `desired`; empty when converged.
///
/// Order matters: new images are pulled before anything is stopped, so a
/// failed pull leaves the old container running; old containers are removed
/// before new ones are created, because they share a name and may share
/// host ports.
///
/// Drift rules: a removed container is always recreated; an exited one
/// whose app should run is started when it is not settled yet (the
/// operator asked for it to run) or when its restart policy says so, and is
/// otherwise left exited and listed in `left_exited`. A container Docker is
/// restarting, or that is paused or being removed, is not drift.
///
/// Networks: an app with two or more bridge-mode containers
/// ([`wants_network`]) has a network of its own (`networks` are this
/// device's, by app label), created before its containers; a bridge-mode
/// container of such an app not attached to it is replaced (this also moves
/// an app's first container onto the network when a second one joins). A
/// bridge-mode container of an app that wants no network runs on Docker's
/// default bridge; one still attached to a network of its app (the app had
/// two and now has one) is replaced, so that the network can go. A network
/// no desired app wants, or a duplicate, is removed after the containers,
/// by then off it.
///
/// Start order: containers are created and started in the app's
/// `start_order()`; a container of a running app whose dependency is not
/// running, or not healthy where it has a health check, is created but not
/// started and listed in `blocked`; a later pass starts it.
///
/// Restarts: a kept container of a running app with a restart due
/// ([`Restarted::due`]) is restarted in start order with the other starts
/// (a paused one unpaused first, an exited one started, as `docker
/// restart` does); one created this pass needs none.
pub fn plan_with(
    desired: &DesiredState,
    actual: &[ManagedContainer],
    networks: &[ManagedNetwork],
    settled: &Settled,
    restarted: &Restarted,
) -> Plan {
    let mut pulls = Vec::new();
    let mut net_creates = Vec::new();
    let mut net_removes = Vec::new();
    let mut blocked = Vec::new();
    // One network per app: the first by id; any other is a duplicate.
    let mut app_net: BTreeMap<&Name, &ManagedNetwork> = BTreeMap::new();
    for n in networks {
        app_net.entry(&n.app).or_insert(n);
    }
    for n in networks {
        let wanted = desired.app(&n.app).is_some_and(|a| wants_network(&a.spec));
        if !wanted || app_net.get(&n.app).is_some_and(|k| k.id != n.id) {
            net_removes.push(Step::RemoveNetwork {
                app: n.app.clone(),
                id: n.id.clone(),
            });
        }
    }
    let mut teardown = Vec::new();
    let mut creates = Vec::new();
    let mut starts = Vec::new();
    let mut repairs = Vec::new();
    let mut left_exited = Vec::new();
    let mut claimed: HashSet<&str> = HashSet::new();

    let mut pauses = Vec::new();
    let retire = |c: &ManagedContainer, teardown: &mut Vec<Step>| {
        // A paused container cannot be stopped cleanly or removed as is.
        if c.state == "paused" {
            teardown.push(Step::Unpause {
                app: c.app.clone(),
                container: c.container.clone(),
                id: c.id.clone(),
            });
        }
        if c.is_running() || c.state == "paused" {
            teardown.push(Step::Stop {
                app: c.app.clone(),
                container: c.container.clone(),
                id: c.id.clone(),
            });
        }
        teardown.push(Step::Remove {
            app: c.app.clone(),
            container: c.container.clone(),
            id: c.id.clone(),
        });
    };

    for app in &desired.apps {
        let app_name = &app.spec.name;
        let net = app_net.get(app_name).copied();
        let wants_net = wants_network(&app.spec);
        if net.is_none() && wants_net {
            net_creates.push(Step::CreateNetwork {
                app: app_name.clone(),
            });
        }
        // Each container's readiness as a dependency, in start order.
        let mut ready: HashMap<&Name, (DependencyState, bool)> = HashMap::new();
        let order = app.spec.start_order();
        for spec in order
            .iter()
            .filter_map(|n| app.spec.containers.iter().find(|c| &c.name == n))
        {
            let hash = spec.fingerprint();
            let app_network = wants_net && spec.network_mode == NetworkMode::Bridge;
            // On the network it should be on: its app's where the app wants
            // one, and otherwise none of its app's (all about to go).
            let on_net = |c: &ManagedContainer| {
                if spec.network_mode != NetworkMode::Bridge {
                    true
                } else if wants_net {
                    net.is_some_and(|n| c.networks.contains(&n.id))
                } else {
                    !networks
                        .iter()
                        .any(|n| &n.app == app_name && c.networks.contains(&n.id))
                }
            };
            let is_settled = settled
                .get(&(app_name.clone(), spec.name.clone()))
                .is_some_and(|(h, run, started)| {
                    *h == hash && *run == app.run && *started == app.started_at
                });
            let candidates: Vec<&ManagedContainer> = actual
                .iter()
                .filter(|c| &c.app == app_name && c.container == spec.name)
                .collect();
            // Keep one container with the current spec, preferring a running one.
            let keep = candidates
                .iter()
                .filter(|c| c.spec_hash == hash && on_net(c))
                .max_by_key(|c| c.is_running())
                .copied();
            // What dependents see: ready only if it runs now and stays.
            let state = match keep {
                Some(k) if k.state == "running" => match k.health {
                    None | Some(Health::Healthy) => None,
                    Some(Health::Starting) => Some(DependencyState::Starting),
                    Some(Health::Unhealthy) => Some(DependencyState::Unhealthy),
                },
                Some(k) => Some(DependencyState::NotRunning(k.state.clone())),
                None => Some(DependencyState::NotRunning("absent".to_string())),
            };
            if let Some(state) = state {
                let has_health = keep.is_some_and(|k| k.health.is_some());
                ready.insert(&spec.name, (state, has_health));
            }
            // The first dependency that holds this container's start back.
            let waits_for = spec.depends_on.iter().find_map(|d| {
                let (state, has_health) = ready.get(d)?;
                let dep = app.spec.containers.iter().find(|c| &c.name == d)?;
                Some(Blocked {
                    app: app_name.clone(),
                    container: spec.name.clone(),
                    dependency: d.clone(),
                    state: state.clone(),
                    bound: dependency_wait(dep, *has_health),
                })
            });
            let waits_for = waits_for.filter(|_| app.run == RunState::Running);
            for c in &candidates {
                if keep.is_none_or(|k| k.id != c.id) {
                    retire(c, &mut teardown);
                }
                claimed.insert(c.id.as_str());
            }
            let repair = |drift| Repair {
                app: app_name.clone(),
                container: spec.name.clone(),
                drift,
            };
            let restart_due = restarted.due(app_name, &spec.name, app.restarted_at);
            match (keep, app.run) {
                (Some(k), RunState::Running) if restart_due && k.state != "removing" => {
                    let restart = Step::Restart {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: k.id.clone(),
                    };
                    match k.state.as_str() {
                        "running" | "restarting" => starts.push(restart),
                        "paused" => {
                            starts.push(Step::Unpause {
                                app: app_name.clone(),
                                container: spec.name.clone(),
                                id: k.id.clone(),
                            });
                            starts.push(restart);
                        }
                        _ if waits_for.is_some() => blocked.extend(waits_for),
                        _ => starts.push(Step::Start {
                            app: app_name.clone(),
                            container: spec.name.clone(),
                            id: Some(k.id.clone()),
                        }),
                    }
                }
                (None, run) => {
                    pulls.push(Step::Pull {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        image: spec.image.clone(),
                    });
                    creates.push(Step::Create {
                        app: app_name.clone(),
                        spec: spec.clone(),
                        app_network,
                    });
                    if let Some(b) = waits_for {
                        blocked.push(b);
                    } else if run != RunState::Stopped {
                        starts.push(Step::Start {
                            app: app_name.clone(),
                            container: spec.name.clone(),
                            id: None,
                        });
                    }
                    if run == RunState::Paused {
                        pauses.push(Step::Pause {
                            app: app_name.clone(),
                            container: spec.name.clone(),
                            id: None,
                        });
                    }
                    if candidates.is_empty() && is_settled {
                        repairs.push(repair(Drift::Removed));
                    }
                }
                (Some(k), RunState::Running) => {
                    let start = Step::Start {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: Some(k.id.clone()),
                    };
                    match k.state.as_str() {
                        // Running, Docker's own restart under way, or on its
                        // way out: not drift.
                        "running" | "restarting" | "removing" => {}
                        // Paused before (RunState::Paused) and now to run.
                        // A person's `docker pause` of a settled one is not.
                        "paused" if !is_settled => starts.push(Step::Unpause {
                            app: app_name.clone(),
                            container: spec.name.clone(),
                            id: k.id.clone(),
                        }),
                        "paused" => {}
                        _ if waits_for.is_some() => blocked.extend(waits_for),
                        // Never started: start it whatever the policy says.
                        "created" => starts.push(start),
                        _ if !is_settled => starts.push(start),
                        _ if restarts_after_exit(spec.restart, k.exit_code) => {
                            starts.push(start);
                            repairs.push(repair(Drift::Exited { code: k.exit_code }));
                        }
                        _ => left_exited.push(LeftExited {
                            app: app_name.clone(),
                            container: spec.name.clone(),
                            id: k.id.clone(),
                            exit_code: k.exit_code,
                            policy: spec.restart,
                        }),
                    }
                }
                (Some(k), RunState::Paused) => {
                    let pause = Step::Pause {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: Some(k.id.clone()),
                    };
                    match k.state.as_str() {
                        "paused" | "removing" => {}
                        "running" | "restarting" => pauses.push(pause),
                        // Created or exited: start it, then pause it.
                        _ => {
                            starts.push(Step::Start {
                                app: app_name.clone(),
                                container: spec.name.clone(),
                                id: Some(k.id.clone()),
                            });
                            pauses.push(pause);
                        }
                    }
                }
                (Some(k), RunState::Stopped) if k.state == "paused" => {
                    teardown.push(Step::Unpause {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: k.id.clone(),
                    });
                    teardown.push(Step::Stop {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: k.id.clone(),
                    });
                }
                (Some(k), RunState::Stopped) if k.is_running() => {
                    teardown.push(Step::Stop {
                        app: app_name.clone(),
                        container: spec.name.clone(),
                        id: k.id.clone(),
                    });
                }
                _ => {}
            }
        }
    }
    // Containers of apps, or of containers within apps, no longer desired.
    for c in actual.iter().filter(|c| !claimed.contains(c.id.as_str())) {
        retire(c, &mut teardown);
    }
    Plan {
        steps: pulls
            .into_iter()
            .chain(teardown)
            .chain(net_creates)
            .chain(creates)
            .chain(starts)
            .chain(pauses)
            .chain(net_removes)
            .collect(),
        repairs,
        left_exited,
        blocked,
    }
}

/// Sets the phase of apps whose containers their restart policy left
/// exited: `failed` (with the exit as error) for a non-zero or unknown exit
/// code, `stopped` for a clean exit when nothing else of the app runs.
pub fn mark_left_exited(apps: &mut [AppStatus], left: &[LeftExited]) {
    for l in left {
        let Some(a) = apps.iter_mut().find(|a| a.name == l.app) else {
            continue;
        };
        if a.phase == AppPhase::Failed {
            continue;
        }
        if l.exit_code == Some(0) {
            if a.containers
                .iter()
                .all(|c| c.state != "running" && c.state != "restarting")
            {
                a.phase = AppPhase::Stopped;
            }
        } else {
            a.phase = AppPhase::Failed;
            a.error = Some(format!(
                "container {} {}",
                l.container,
                l.detail().trim_start_matches("container ")
            ));
        }
    }
}

/// A pull that failed for a reason that may pass, waiting for its next attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub attempts: u32,
    /// The last error, verbatim.
    pub error: String,
    pub next_at: Instant,
    pub next_at_ms: u64,
}

/// Shows apps with a pull waiting for retry as `retrying`.
pub fn mark_retrying(apps: &mut [AppStatus], retrying: &BTreeMap<Name, Retry>) {
    for a in apps.iter_mut() {
        if let Some(r) = retrying.get(&a.name) {
            a.phase = AppPhase::Retrying;
            a.error = Some(r.error.clone());
            a.attempts = r.attempts;
            a.next_retry_at_ms = Some(r.next_at_ms);
        }
    }
}

/// What a pass saw and whether it counts for its generation.
#[derive(Debug, Clone, PartialEq)]
pub struct PassReport {
    pub generation: u64,
    pub apps: Vec<AppStatus>,
    /// Per app that failed, Docker's or the registry's text, verbatim. One
    /// app's failure is its own: the other apps of the pass went on.
    pub failures: BTreeMap<Name, String>,
    /// Some pull failed for a reason that may pass: the pass is not done,
    /// and the next attempt is due then.
    pub retry_at: Option<Instant>,
}

/// Messages from the reconciler to the agent core.
#[derive(Debug)]
pub enum ReconcileEvent {
    /// `detail`: the last error while retrying, else empty.
    Progress {
        generation: u64,
        progress: Progress,
        detail: String,
    },
    /// Work has started or is waiting to retry; apps being pulled or
    /// retrying are shown as such.
    Interim {
        generation: u64,
        apps: Vec<AppStatus>,
    },
    /// The pass finished (converged or failed for good) for this generation.
    Done(PassReport),
    /// Something the agent did or saw on its own, for the `event` topic.
    Event(DeviceEvent),
    /// Whether the Docker daemon answers (`Err`: why not). Sent by the
    /// reconciler and the Docker event watcher; the core reports changes.
    Docker(Result<(), String>),
    /// The images on the device changed (a pull, a cleanup): the inventory
    /// is stale.
    InventoryChanged,
}

/// Restarts by Docker's restart policy from which a container that is not
/// up (restarting, exited or dead) is crash-looping rather than recovering.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

/// The error of an app one of whose containers Docker keeps restarting:
/// it has been restarted at least [`CRASH_LOOP_RESTARTS`] times and is not
/// running now. A container that crashed a few times long ago and runs
/// again is not one (its restart count stays, its state is `running`).
pub fn crash_loop(containers: &[ContainerStatus]) -> Option<String> {
    containers
        .iter()
        .find(|c| {
            c.restarts >= CRASH_LOOP_RESTARTS
                && matches!(c.state.as_str(), "restarting" | "exited" | "dead")
        })
        .map(|c| {
            let code = c
                .exit_code
                .map_or_else(|| "unknown".to_string(), |e| e.to_string());
            format!(
                "container {} crash-loops: restarted {} times, last exit code {code}",
                c.name, c.restarts
            )
        })
}

/// Builds the per-app status from what the runtime shows after a pass.
pub fn observe(
    desired: &DesiredState,
    actual: &[ManagedContainer],
    errors: &BTreeMap<Name, String>,
    pulling: &HashSet<Name>,
) -> Vec<AppStatus> {
    let mut apps: Vec<AppStatus> = desired
        .apps
        .iter()
        .map(|app| {
            let containers: Vec<ContainerStatus> = app
                .spec
                .containers
                .iter()
                .map(|spec| {
                    let hash = spec.fingerprint();
                    let found = actual
                        .iter()
                        .filter(|c| c.app == app.spec.name && c.container == spec.name)
                        .max_by_key(|c| (c.spec_hash == hash, c.is_running()));
                    match found {
                        Some(c) => ContainerStatus {
                            name: spec.name.clone(),
                            image: c.image.clone(),
                            container_id: Some(c.id.clone()),
                            state: c.state.clone(),
                            // A restarting container's last exit says why.
                            exit_code: if c.state == "running" {
                                None
                            } else {
                                c.exit_code
                            },
                            error: None,
                            health: c.health,
                            restarts: c.restarts,
                        },
                        None => ContainerStatus {
                            name: spec.name.clone(),
                            image: spec.image.clone(),
                            container_id: None,
                            state: "absent".to_string(),
                            exit_code: None,
                            error: None,
                            health: None,
                            restarts: 0,
                        },
                    }
                })
                .collect();
            let current = app.spec.containers.iter().all(|spec| {
                let hash = spec.fingerprint();
                actual.iter().any(|c| {
                    c.app == app.spec.name && c.container == spec.name && c.spec_hash == hash
                })
            });
            let error = errors
                .get(&app.spec.name)
                .cloned()
                .or_else(|| crash_loop(&containers));
            let all_running = containers.iter().all(|c| c.state == "running");
            let none_running = containers
                .iter()
                .all(|c| c.state != "running" && c.state != "restarting");
            let phase = if error.is_some() {
                AppPhase::Failed
            } else if pulling.contains(&app.spec.name) {
                AppPhase::Pulling
            } else {
                match app.run {
                    RunState::Running if all_running => AppPhase::Running,
                    RunState::Stopped if none_running => AppPhase::Stopped,
                    RunState::Paused if containers.iter().all(|c| c.state == "paused") => {
                        AppPhase::Paused
                    }
                    _ => AppPhase::Starting,
                }
            };
            AppStatus {
                name: app.spec.name.clone(),
                phase,
                error,
                attempts: 0,
                next_retry_at_ms: None,
                // The release of what runs: the spec's only once every
                // container is made from it; 0 (unknown) while an older
                // spec's containers are still there or none exist.
                release: if current { app.release } else { 0 },
                containers,
            }
        })
        .collect();
    // An app that should be gone but could not be removed is still news.
    for (name, error) in errors.iter().filter(|(n, _)| desired.app(n).is_none()) {
        apps.push(AppStatus {
            name: name.clone(),
            phase: AppPhase::Failed,
            error: Some(error.clone()),
            attempts: 0,
            next_retry_at_ms: None,
            containers: vec![],
            release: 0,
        });
    }
    apps
}

/// How the reconciler pulls and cleans up.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub pull_backoff: Backoff,
    /// A pull is not started with less free space than this where Docker
    /// keeps its images.
    pub min_free_disk_bytes: u64,
    pub image_cleanup: bool,
    pub image_cleanup_max_per_pass: usize,
    pub keep_unused_images: usize,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            pull_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            min_free_disk_bytes: 256 * 1024 * 1024,
            image_cleanup: true,
            image_cleanup_max_per_pass: 5,
            keep_unused_images: 0,
        }
    }
}

/// What the reconciler remembers between passes. Never held across an await.
#[derive(Debug, Default)]
struct Memory {
    /// The generation of the last finished pass. A periodic retry of the same
    /// generation sends no interim report, so the state does not flap
    /// between pulling and failed every interval.
    finished: u64,
    settled: Settled,
    restarted: Restarted,
    /// Pull retries by image, for `retries_generation` only.
    retries: HashMap<String, Retry>,
    retries_generation: u64,
    /// Container id → exit code already reported as `container_exited`.
    reported_exits: HashMap<String, Option<i64>>,
    /// The stored generation the agent started with, until its first pass
    /// finishes and is reported as `restored_from_local_state`.
    restoring: Option<u64>,
    /// What the passes restoring it did, for that event: it says what was
    /// done, not what drift was seen.
    restore_actions: Vec<String>,
    /// The stored generation was found older than what runs and left alone;
    /// reported once.
    restore_refused: bool,
    /// Pulled images the desired state referenced at the last converged pass.
    referenced: BTreeSet<String>,
    /// Containers waiting for a dependency: since when, in which generation.
    waits: HashMap<(Name, Name), (u64, Instant)>,
}

/// Executes plans against a runtime, one pass at a time.
pub struct Reconciler<R> {
    runtime: Arc<R>,
    device: DeviceId,
    events: mpsc::Sender<ReconcileEvent>,
    options: ReconcileOptions,
    memory: std::sync::Mutex<Memory>,
    ledger: tokio::sync::Mutex<ImageLedger>,
    /// Registry credentials from the orchestrator; a change makes waiting
    /// pull retries due at once (an unauthorized pull may pass now).
    secrets: Option<watch::Receiver<Arc<Secrets>>>,
}

impl<R: Runtime> Reconciler<R> {
    /// Default options and an in-memory image ledger.
    pub fn new(runtime: Arc<R>, device: DeviceId, events: mpsc::Sender<ReconcileEvent>) -> Self {
        Reconciler {
            runtime,
            device,
            events,
            options: ReconcileOptions::default(),
            memory: std::sync::Mutex::new(Memory::default()),
            ledger: tokio::sync::Mutex::new(ImageLedger::in_memory()),
            secrets: None,
        }
    }

    /// Pulls from private registries with these credentials.
    pub fn with_secrets(mut self, secrets: watch::Receiver<Arc<Secrets>>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// The credentials for an image's registry, if the agent holds any.
    fn credentials(&self, image: &ImageRef) -> Option<RegistryCredential> {
        let secrets = self.secrets.as_ref()?.borrow();
        crate::secrets::credentials_for(&secrets, image).cloned()
    }

    /// Makes every waiting pull retry due now, keeping its attempt count.
    fn retry_pulls_now(&self) {
        let now = Instant::now();
        let at_ms = now_ms();
        for r in self.mem().retries.values_mut() {
            r.next_at = now;
            r.next_at_ms = at_ms;
        }
    }

    pub fn with_options(mut self, options: ReconcileOptions) -> Self {
        self.options = options;
        self
    }

    pub fn with_ledger(mut self, ledger: ImageLedger) -> Self {
        self.ledger = tokio::sync::Mutex::new(ledger);
        self
    }

    /// Starts from a desired state restored from local disk; the first
    /// finished pass is reported as `restored_from_local_state`. When it was
    /// fully applied before the agent stopped (`applied`), its containers
    /// count as settled, so restart policies hold across an agent restart;
    /// otherwise missing containers are simply created, not called drift.
    ///
    /// `applied_before`: the generation last recorded as fully applied
    /// (the stored one when `applied`): restarts at or below it were done.
    pub fn restoring(self, stored: &DesiredState, applied: bool, applied_before: u64) -> Self {
        {
            let mut m = self.mem();
            m.restoring = Some(stored.generation);
            m.restarted.floor = if applied {
                stored.generation
            } else {
                applied_before.min(stored.generation)
            };
            if !applied {
                drop(m);
                return self;
            }
            for app in &stored.apps {
                for spec in &app.spec.containers {
                    m.settled.insert(
                        (app.spec.name.clone(), spec.name.clone()),
                        (spec.fingerprint(), app.run, app.started_at),
                    );
                }
            }
        }
        self
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A panic while holding it cannot leave it inconsistent in a way that
        // matters: every pass re-reads the runtime.
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs passes until `desired` closes: on every new desired state, on
    /// every `interval` tick, [`DEBOUNCE`] after a `trigger` (a Docker event),
    /// and when a pull retry is due.
    pub async fn run(
        self,
        mut desired: watch::Receiver<Option<Arc<DesiredState>>>,
        interval: Duration,
        mut triggers: mpsc::Receiver<()>,
    ) {
        let mut secrets = self.secrets.clone();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut docker_down = false;
        loop {
            let current = desired.borrow_and_update().clone();
            let mut retry_at = None;
            if let Some(state) = current {
                let result = self.pass(&state, &desired).await;
                match &result {
                    Err(e) if e.is_unreachable() => {
                        docker_down = true;
                        let _ = self
                            .events
                            .try_send(ReconcileEvent::Docker(Err(e.to_string())));
                    }
                    Ok(_) if std::mem::take(&mut docker_down) => {
                        let _ = self.events.try_send(ReconcileEvent::Docker(Ok(())));
                    }
                    _ => {}
                }
                match result {
                    Ok(Some(report)) => {
                        retry_at = report.retry_at;
                        let apps = report.apps.clone();
                        let converged = report.failures.is_empty() && report.retry_at.is_none();
                        let ev = match report.retry_at {
                            Some(_) => ReconcileEvent::Interim {
                                generation: report.generation,
                                apps: report.apps,
                            },
                            None => ReconcileEvent::Done(report),
                        };
                        if self.events.send(ev).await.is_err() {
                            return;
                        }
                        if converged {
                            self.cleanup_images(&state, &apps).await;
                        }
                    }
                    Ok(None) => debug!(
                        generation = state.generation,
                        "pass not counted: superseded, or a stored state older than what runs"
                    ),
                    Err(e) => {
                        warn!(generation = state.generation, error = %e, "reconcile pass could not run; retrying later")
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let secrets_changed = async {
                match secrets.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                ok = secrets_changed => {
                    if ok {
                        debug!("registry credentials changed; retrying waiting pulls now");
                        self.retry_pulls_now();
                    } else {
                        // The agent core is gone: keep going on the last set.
                        secrets = None;
                    }
                }
                _ = tick.tick() => {}
                Some(()) = triggers.recv() => {
                    // A new desired state ends the wait at once: its pass
                    // re-reads everything the burst did. Without this, a
                    // deploy right after a remove (whose own stop and
                    // destroy events are such a burst) waited up to
                    // DEBOUNCE before anything started.
                    tokio::select! {
                        () = tokio::time::sleep(DEBOUNCE) => {}
                        changed = desired.changed() => if changed.is_err() { return },
                    }
                    while triggers.try_recv().is_ok() {}
                }
                () = retry => {}
            }
        }
    }

    /// One pass. `Ok(None)`: a newer desired state arrived mid-pass, so this
    /// one no longer counts. `Err`: the runtime is unreachable; nothing is
    /// definitive and the next tick retries. A report with `retry_at` is not
    /// done: a pull is waiting to be retried.
    pub async fn pass(
        &self,
        desired: &DesiredState,
        newer: &watch::Receiver<Option<Arc<DesiredState>>>,
    ) -> Result<Option<PassReport>, RuntimeError> {
        let generation = desired.generation;
        {
            let mut m = self.mem();
            if m.retries_generation != generation {
                m.retries.clear();
                m.retries_generation = generation;
            }
        }
        let actual = self.runtime.list_managed().await?;
        if self.refuse_stale_restore(generation, &actual).await {
            return Ok(None);
        }
        let networks = self.runtime.list_networks().await?;
        let (settled, restarted) = {
            let m = self.mem();
            (m.settled.clone(), m.restarted.clone())
        };
        let Plan {
            steps,
            repairs,
            left_exited,
            blocked,
        } = plan_with(desired, &actual, &networks, &settled, &restarted);
        self.report_exits(&left_exited).await;
        if blocked.is_empty() {
            self.mem().waits.clear();
        }
        if steps.is_empty() && blocked.is_empty() {
            let mut apps = observe(desired, &actual, &BTreeMap::new(), &HashSet::new());
            mark_left_exited(&mut apps, &left_exited);
            self.settle(desired, &HashSet::new());
            self.finish(generation, &[]).await;
            return Ok(Some(PassReport {
                generation,
                apps,
                failures: BTreeMap::new(),
                retry_at: None,
            }));
        }
        info!(generation, steps = steps.len(), "reconciling");

        let mut pulling = HashSet::new();
        let mut retrying: BTreeMap<Name, Retry> = BTreeMap::new();
        for s in &steps {
            if let Step::Pull { app, image, .. } = s {
                let present = match ImageRef::parse(image) {
                    Ok(r) => match self.runtime.image_present(&r).await {
                        Ok(present) => present,
                        Err(e) if e.is_unreachable() => return Err(e),
                        // Docker refused to even look (e.g. "invalid
                        // reference format"): the pull step fails this app
                        // alone, with Docker's text; the pass goes on.
                        Err(e) => {
                            debug!(%app, image = ?image, error = ?e.to_string(), "cannot inspect image; the pull will tell");
                            false
                        }
                    },
                    Err(_) => false,
                };
                if !present {
                    pulling.insert(app.clone());
                    if let Some(r) = self.mem().retries.get(image) {
                        retrying.insert(app.clone(), r.clone());
                    }
                }
            }
        }
        if self.mem().finished != generation {
            let mut interim = observe(desired, &actual, &BTreeMap::new(), &pulling);
            mark_retrying(&mut interim, &retrying);
            let _ = self.events.try_send(ReconcileEvent::Interim {
                generation,
                apps: interim,
            });
        }

        self.hold_previous_images(&steps, &actual, desired).await;
        let mut errors: BTreeMap<Name, String> = BTreeMap::new();
        let mut failed: HashSet<(Name, Name)> = HashSet::new();
        let mut created: BTreeMap<(Name, Name), String> = BTreeMap::new();
        // App → its network's id, for the containers created this pass.
        let mut nets: BTreeMap<Name, String> = BTreeMap::new();
        for n in &networks {
            nets.entry(n.app.clone()).or_insert_with(|| n.id.clone());
        }
        retrying.clear();
        for step in steps {
            if newer.has_changed().unwrap_or(false) {
                return Ok(None);
            }
            let Some((app, container)) = step.key() else {
                // A network step: it fails its app, and an app without its
                // network creates none of its containers.
                let app = step.app().clone();
                if errors.contains_key(&app) {
                    continue;
                }
                match self.execute_network(&step, &mut nets).await {
                    Ok(()) => {
                        let mut m = self.mem();
                        if m.restoring == Some(generation) {
                            m.restore_actions.push(step.done_text());
                        }
                    }
                    Err(e) if e.is_unreachable() => return Err(e),
                    Err(e) => {
                        let text = format!("{} failed: {e}", step.word());
                        warn!(%app, error = %text, "network step failed");
                        if let (Step::CreateNetwork { .. }, Some(a)) = (&step, desired.app(&app)) {
                            for c in &a.spec.containers {
                                failed.insert((app.clone(), c.name.clone()));
                            }
                        }
                        errors.entry(app).or_insert(text);
                    }
                }
                continue;
            };
            let key = (app.clone(), container.clone());
            if failed.contains(&key) {
                continue;
            }
            if let Step::Pull { image, .. } = &step {
                // Waiting for a retry: neither an attempt nor a failure.
                let waiting = self
                    .mem()
                    .retries
                    .get(image)
                    .filter(|r| r.next_at > Instant::now())
                    .cloned();
                if let (Some(r), true) = (waiting, pulling.contains(app)) {
                    retrying.insert(key.0.clone(), r);
                    failed.insert(key);
                    continue;
                }
            }
            self.progress(
                generation,
                Progress {
                    step: step.word().to_string(),
                    container: container.clone(),
                    current_bytes: None,
                    total_bytes: None,
                },
            );
            let result = self
                .execute(generation, &step, &pulling, &mut created, &nets)
                .await;
            if result.is_ok() {
                let did = !matches!(step, Step::Pull { .. }) || pulling.contains(app);
                let mut m = self.mem();
                if did && m.restoring == Some(generation) {
                    m.restore_actions.push(step.done_text());
                }
            }
            match (result, &step) {
                (Ok(()), Step::Pull { image, .. }) => {
                    self.mem().retries.remove(image);
                }
                (Ok(()), _) => {}
                (Err(e), _) if e.is_unreachable() => return Err(e),
                (Err(e), Step::Pull { image, .. })
                    if e.pull_class() == PullErrorClass::Transient =>
                {
                    let r = self
                        .retry_later(generation, &key, image, e.to_string())
                        .await;
                    retrying.insert(key.0.clone(), r);
                    failed.insert(key);
                }
                (Err(e), _) => {
                    let text = e.to_string();
                    warn!(app = %key.0, container = %key.1, step = step.word(), error = %text, "step failed");
                    errors.entry(key.0.clone()).or_insert(text);
                    failed.insert(key);
                }
            }
        }
        let wait_at = self.judge_waits(generation, &blocked, &mut errors);
        // A container still waiting is not brought about yet.
        failed.extend(blocked.iter().map(|b| (b.app.clone(), b.container.clone())));
        let actual = self.runtime.list_managed().await?;
        let mut apps = observe(desired, &actual, &errors, &HashSet::new());
        mark_left_exited(&mut apps, &left_exited);
        mark_retrying(&mut apps, &retrying);
        self.settle(desired, &failed);
        let done: Vec<&Repair> = repairs
            .iter()
            .filter(|r| !failed.contains(&(r.app.clone(), r.container.clone())))
            .collect();
        if let Some(at) = retrying.values().map(|r| r.next_at).chain(wait_at).min() {
            self.publish_repairs(&done).await;
            return Ok(Some(PassReport {
                generation,
                apps,
                failures: errors,
                retry_at: Some(at),
            }));
        }
        self.finish(generation, &done).await;
        Ok(Some(PassReport {
            generation,
            apps,
            failures: errors,
            retry_at: None,
        }))
    }

    /// Records a pull failure that may pass and schedules the next attempt;
    /// tells the agent core (ack progress) and the orchestrator (event).
    async fn retry_later(
        &self,
        generation: u64,
        key: &(Name, Name),
        image: &str,
        error: String,
    ) -> Retry {
        let r = {
            let mut m = self.mem();
            let attempts = m
                .retries
                .get(image)
                .map_or(0, |r| r.attempts)
                .saturating_add(1);
            let delay = self.options.pull_backoff.delay(attempts);
            let r = Retry {
                attempts,
                error,
                next_at: Instant::now() + delay,
                next_at_ms: now_ms()
                    .saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            };
            m.retries.insert(image.to_string(), r.clone());
            r
        };
        let wait = r.next_at.saturating_duration_since(Instant::now());
        warn!(app = %key.0, container = %key.1, image = ?image, attempts = r.attempts, retry_in_ms = wait.as_millis() as u64, error = ?r.error, "pull failed; will retry");
        let _ = self.events.try_send(ReconcileEvent::Progress {
            generation,
            progress: Progress {
                step: "retrying".to_string(),
                container: key.1.clone(),
                current_bytes: None,
                total_bytes: None,
            },
            detail: r.error.clone(),
        });
        let detail = format!(
            "pull of {image} failed (attempt {}): {}; next attempt in {:.1} s",
            r.attempts,
            r.error,
            wait.as_secs_f64()
        );
        self.publish(EventKind::PullRetrying, Some(&key.0), Some(&key.1), detail)
            .await;
        r
    }

    /// Remembers what this pass brought about; containers whose steps failed
    /// are not settled, so the operator's intent still applies to them.
    /// Restarts count as done for every container that did not fail,
    /// whether restarted, created or started this pass; a failed one keeps
    /// its older mark and is restarted again by a later pass.
    fn settle(&self, desired: &DesiredState, failed: &HashSet<(Name, Name)>) {
        let mut m = self.mem();
        let mut now = Settled::new();
        let mut restarted = HashMap::new();
        for app in &desired.apps {
            for spec in &app.spec.containers {
                let key = (app.spec.name.clone(), spec.name.clone());
                if !failed.contains(&key) {
                    restarted.insert(key.clone(), app.restarted_at);
                    now.insert(key, (spec.fingerprint(), app.run, app.started_at));
                } else if let Some(done) = m.restarted.done.get(&key) {
                    restarted.insert(key, *done);
                }
            }
        }
        m.settled = now;
        m.restarted.done = restarted;
    }

    /// Whether `generation` is the stored state the agent started with and
    /// is older than what runs: containers are labelled with the generation
    /// that created them, so one newer than the stored state means the
    /// state directory missed a later desired state (it could not be
    /// written). Restoring would roll the device back; it keeps what runs
    /// until the orchestrator's desired state arrives.
    async fn refuse_stale_restore(&self, generation: u64, actual: &[ManagedContainer]) -> bool {
        if self.mem().restoring != Some(generation) {
            return false;
        }
        let newest = actual.iter().map(|c| c.generation).max().unwrap_or(0);
        if newest <= generation {
            return false;
        }
        if std::mem::replace(&mut self.mem().restore_refused, true) {
            return true;
        }
        let detail = format!(
            "did not restore the local desired state, generation {generation}: running containers were created by generation {newest}, so it is out of date; keeping what runs until the orchestrator's desired state arrives"
        );
        warn!(generation, newest, "{detail}");
        self.publish(EventKind::RestoreRefused, None, None, detail)
            .await;
        true
    }

    /// A pass finished for `generation`: publishes its repairs, and the
    /// restore from local state when this was the first pass after start.
    async fn finish(&self, generation: u64, repairs: &[&Repair]) {
        let (restoring, actions) = {
            let mut m = self.mem();
            m.finished = generation;
            (m.restoring.take(), std::mem::take(&mut m.restore_actions))
        };
        if restoring == Some(generation) {
            // What was done, not what was called drift: a restore whose
            // containers were missing recreates them either way.
            let what = if actions.is_empty() {
                "all containers were already as desired".to_string()
            } else {
                actions.join(", ")
            };
            let detail = format!(
                "restored apps from the local desired state, generation {generation}: {what}"
            );
            info!(generation, "{detail}");
            self.publish(EventKind::RestoredFromLocalState, None, None, detail)
                .await;
        }
        self.publish_repairs(repairs).await;
    }

    async fn publish_repairs(&self, repairs: &[&Repair]) {
        for r in repairs {
            info!(app = %r.app, container = %r.container, "drift repaired: {}", r.drift.detail());
            self.publish(
                EventKind::DriftRepaired,
                Some(&r.app),
                Some(&r.container),
                r.drift.detail(),
            )
            .await;
        }
    }

    /// Publishes `container_exited` once per container and exit.
    async fn report_exits(&self, left: &[LeftExited]) {
        let fresh: Vec<&LeftExited> = {
            let mut m = self.mem();
            m.reported_exits
                .retain(|id, _| left.iter().any(|l| &l.id == id));
            left.iter()
                .filter(|l| m.reported_exits.insert(l.id.clone(), l.exit_code) != Some(l.exit_code))
                .collect()
        };
        for l in fresh {
            info!(app = %l.app, container = %l.container, "{}", l.detail());
            self.publish(
                EventKind::ContainerExited,
                Some(&l.app),
                Some(&l.container),
                l.detail(),
            )
            .await;
        }
    }

    async fn publish(
        &self,
        kind: EventKind,
        app: Option<&Name>,
        container: Option<&Name>,
        detail: String,
    ) {
        let ev = DeviceEvent {
            at_ms: now_ms(),
            kind,
            app: app.cloned(),
            container: container.cloned(),
            detail,
        };
        let _ = self.events.send(ReconcileEvent::Event(ev)).await;
    }

    async fn execute(
        &self,
        generation: u64,
        step: &Step,
        pulling: &HashSet<Name>,
        created: &mut BTreeMap<(Name, Name), String>,
        nets: &BTreeMap<Name, String>,
    ) -> Result<(), RuntimeError> {
        match step {
            // Run by `execute_network`.
            Step::CreateNetwork { .. } | Step::RemoveNetwork { .. } => Ok(()),
            Step::Pull {
                app,
                container,
                image,
            } => {
                if !pulling.contains(app) {
                    return Ok(());
                }
                self.pull(generation, container, image).await
            }
            Step::Create {
                app,
                spec,
                app_network,
            } => {
                let name = container_name(&self.device, app, &spec.name);
                let labels = labels_for(&self.device, app, spec, generation);
                // By id where known: names of networks need not be unique
                // on older daemons.
                let net = app_network.then(|| {
                    nets.get(app)
                        .cloned()
                        .unwrap_or_else(|| network_name(&self.device, app))
                });
                let net = net.as_deref();
                let id = match self.runtime.create(&name, spec, labels.clone(), net).await {
                    // The image went away since the pass looked (another
                    // agent's cleanup, a person's `docker rmi`): pull again.
                    Err(RuntimeError::Docker(m)) if m.to_lowercase().contains("no such image") => {
                        info!(image = ?spec.image, "image vanished before create; pulling again");
                        self.pull(generation, &spec.name, &spec.image).await?;
                        self.runtime.create(&name, spec, labels, net).await?
                    }
                    r => r?,
                };
                info!(%app, container = %spec.name, %id, "created");
                created.insert((app.clone(), spec.name.clone()), id);
                Ok(())
            }
            Step::Start { app, container, id } => {
                let id = match id {
                    Some(id) => id.clone(),
                    None => created
                        .get(&(app.clone(), container.clone()))
                        .cloned()
                        .unwrap_or_else(|| container_name(&self.device, app, container)),
                };
                self.runtime.start(&id).await?;
                info!(%app, %container, "started");
                Ok(())
            }
            Step::Stop { app, container, id } => {
                self.runtime.stop(id).await?;
                info!(%app, %container, "stopped");
                Ok(())
            }
            Step::Remove { app, container, id } => {
                self.runtime.remove(id).await?;
                info!(%app, %container, "removed");
                Ok(())
            }
            Step::Pause { app, container, id } => {
                let id = match id {
                    Some(id) => id.clone(),
                    None => created
                        .get(&(app.clone(), container.clone()))
                        .cloned()
                        .unwrap_or_else(|| container_name(&self.device, app, container)),
                };
                self.runtime.pause(&id).await?;
                info!(%app, %container, "paused");
                Ok(())
            }
            Step::Unpause { app, container, id } => {
                self.runtime.unpause(id).await?;
                info!(%app, %container, "unpaused");
                Ok(())
            }
            Step::Restart { app, container, id } => {
                self.runtime.restart(id).await?;
                info!(%app, %container, "restarted");
                Ok(())
            }
        }
    }

    /// Creates or removes an app network; a created one's id goes in `nets`.
    async fn execute_network(
        &self,
        step: &Step,
        nets: &mut BTreeMap<Name, String>,
    ) -> Result<(), RuntimeError> {
        match step {
            Step::CreateNetwork { app } => {
                let name = network_name(&self.device, app);
                let id = self
                    .runtime
                    .create_network(&name, network_labels(&self.device, app))
                    .await?;
                info!(%app, network = %name, "created network");
                nets.insert(app.clone(), id);
            }
            Step::RemoveNetwork { app, id } => {
                self.runtime.remove_network(id).await?;
                info!(%app, network = %id, "removed network");
            }
            _ => {}
        }
        Ok(())
    }

    /// Times the waits for dependencies: each blocked container's wait
    /// starts at the first pass of this generation that found it blocked.
    /// A wait that failed ([`judge_wait`]) is its app's error; the others
    /// ask for a pass again soon (a Docker event may bring it sooner).
    fn judge_waits(
        &self,
        generation: u64,
        blocked: &[Blocked],
        errors: &mut BTreeMap<Name, String>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut m = self.mem();
        m.waits.retain(|k, (g, _)| {
            *g == generation && blocked.iter().any(|b| b.app == k.0 && b.container == k.1)
        });
        let mut next: Option<Instant> = None;
        for b in blocked {
            let (_, since) = *m
                .waits
                .entry((b.app.clone(), b.container.clone()))
                .or_insert((generation, now));
            match judge_wait(b, now.saturating_duration_since(since)) {
                Some(error) => {
                    if !errors.contains_key(&b.app) {
                        warn!(app = %b.app, container = %b.container, "{error}");
                        errors.insert(b.app.clone(), error);
                    }
                }
                None => {
                    let at = (now + DEPENDENCY_POLL).min(since + b.bound);
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        next
    }

    /// Pulls one image unless present, after checking free disk, and
    /// records it in the ledger as pulled by this agent.
    async fn pull(
        &self,
        generation: u64,
        container: &Name,
        image: &str,
    ) -> Result<(), RuntimeError> {
        let image_ref = ImageRef::parse(image)
            .map_err(|e| RuntimeError::Docker(format!("invalid image reference {image:?}: {e}")))?;
        if self.runtime.image_present(&image_ref).await? {
            return Ok(());
        }
        match self.runtime.free_disk().await {
            Ok(Some(disk)) => {
                if let Some(text) = pull::disk_shortfall(
                    image,
                    &disk.root,
                    disk.free_bytes,
                    self.options.min_free_disk_bytes,
                ) {
                    return Err(RuntimeError::Pull {
                        status: None,
                        message: text,
                    });
                }
            }
            Ok(None) => debug!("free disk unknown; pulling unchecked"),
            Err(e) if e.is_unreachable() => return Err(e),
            Err(e) => warn!(error = %e, "cannot tell free disk; pulling unchecked"),
        }
        info!(%image, "pulling");
        let mut last: Option<Instant> = None;
        let events = self.events.clone();
        let container = container.clone();
        let mut on_progress = move |p: PullProgress| {
            if last.is_none_or(|l| l.elapsed() >= PROGRESS_EVERY) {
                last = Some(Instant::now());
                let progress = Progress {
                    step: "pulling".to_string(),
                    container: container.clone(),
                    current_bytes: Some(p.current),
                    total_bytes: Some(p.total),
                };
                let _ = events.try_send(ReconcileEvent::Progress {
                    generation,
                    progress,
                    detail: String::new(),
                });
            }
        };
        let auth = self.credentials(&image_ref);
        self.runtime
            .pull(&image_ref, auth.as_ref(), &mut on_progress)
            .await
            .map_err(|e| pull::explain_unauthorized(e, &image_ref, auth.as_ref()))?;
        let now = now_ms();
        let snapshot = {
            let mut ledger = self.ledger.lock().await;
            // A re-pull keeps the image's holds.
            let held_for = ledger
                .images
                .remove(image)
                .map(|p| p.held_for)
                .unwrap_or_default();
            ledger.images.insert(
                image.to_string(),
                PulledImage {
                    held_for,
                    ..PulledImage::new(now)
                },
            );
            ledger.snapshot()
        };
        save_ledger(snapshot).await;
        let _ = self.events.try_send(ReconcileEvent::InventoryChanged);
        Ok(())
    }

    /// Holds the images of containers this pass replaces in apps that stay
    /// (their previous release), before anything is removed: see
    /// [`PulledImage::held_for`]. Only images this agent pulled are tracked.
    async fn hold_previous_images(
        &self,
        steps: &[Step],
        actual: &[ManagedContainer],
        desired: &DesiredState,
    ) {
        let held: Vec<(&Name, &str)> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Remove { app, id, .. } if desired.app(app).is_some() => actual
                    .iter()
                    .find(|c| &c.id == id)
                    .map(|c| (app, c.image.as_str())),
                _ => None,
            })
            .collect();
        if held.is_empty() {
            return;
        }
        let mut ledger = self.ledger.lock().await;
        let mut dirty = false;
        for (app, image) in held {
            if let Some(p) = ledger.images.get_mut(image) {
                dirty |= p.held_for.insert(app.to_string());
            }
        }
        if dirty {
            let snapshot = ledger.snapshot();
            drop(ledger);
            save_ledger(snapshot).await;
        }
    }

    /// After a converged pass: releases the holds of apps that are gone or
    /// whose current release runs, healthy where it has a health check;
    /// then removes images this agent pulled that no desired app references,
    /// no container uses and no app holds, within the limits. Failures are
    /// logged and skipped; cleanup never fails a pass.
    pub async fn cleanup_images(&self, desired: &DesiredState, apps: &[AppStatus]) {
        let wanted: HashSet<String> = desired
            .apps
            .iter()
            .flat_map(|a| a.spec.containers.iter().map(|c| c.image.clone()))
            .collect();
        let mut ledger = self.ledger.lock().await;
        let mut dirty = false;
        let settled_app = |app: &str| {
            desired.apps.iter().all(|a| a.spec.name.as_str() != app)
                || apps.iter().any(|s| {
                    s.name.as_str() == app
                        && s.phase == AppPhase::Running
                        && s.containers
                            .iter()
                            .all(|c| matches!(c.health, None | Some(Health::Healthy)))
                })
        };
        for (r, p) in ledger.images.iter_mut() {
            let before = p.held_for.len();
            p.held_for.retain(|app| !settled_app(app));
            if p.held_for.len() != before {
                debug!(image = ?r, "previous release's image no longer held");
                dirty = true;
            }
        }
        // Last use: refreshed whenever the set of referenced pulled images
        // changes, which also stamps images at the moment they fall out of use.
        let referenced: BTreeSet<String> = ledger
            .images
            .keys()
            .filter(|r| wanted.contains(*r))
            .cloned()
            .collect();
        let previous = std::mem::replace(&mut self.mem().referenced, referenced.clone());
        if referenced != previous {
            let now = now_ms();
            for r in referenced.union(&previous) {
                if let Some(p) = ledger.images.get_mut(r) {
                    p.last_used_ms = now;
                    dirty = true;
                }
            }
        }
        let candidates: Vec<String> = ledger
            .images
            .keys()
            .filter(|r| !wanted.contains(*r))
            .cloned()
            .collect();
        if self.options.image_cleanup && !candidates.is_empty() {
            match self.runtime.images_in_use().await {
                Ok(used) => {
                    let mut in_use = HashSet::new();
                    for r in &candidates {
                        match self.runtime.image_id(r).await {
                            Ok(Some(id)) if used.contains(&id) || used.contains(r) => {
                                in_use.insert(r.clone());
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => {
                                debug!(image = ?r, "pulled image is gone; forgetting it");
                                ledger.images.remove(r);
                                dirty = true;
                            }
                            Err(e) => {
                                debug!(image = ?r, error = ?e.to_string(), "cannot inspect image; keeping it");
                                in_use.insert(r.clone());
                            }
                        }
                    }
                    let chosen = images::select_for_cleanup(
                        &ledger.images,
                        &wanted,
                        &in_use,
                        self.options.keep_unused_images,
                        self.options.image_cleanup_max_per_pass,
                    );
                    for r in chosen {
                        match self.runtime.remove_image(&r).await {
                            Ok(()) => {
                                info!(image = ?r, "removed unused image");
                                ledger.images.remove(&r);
                                dirty = true;
                                let detail = format!("removed image {r}: pulled by this agent, no desired app or container uses it");
                                self.publish(EventKind::ImageRemoved, None, None, detail)
                                    .await;
                                let _ = self.events.try_send(ReconcileEvent::InventoryChanged);
                            }
                            Err(e) => {
                                warn!(image = ?r, error = ?e.to_string(), "could not remove unused image; skipping")
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot list containers for image cleanup; skipping"),
            }
        }
        if dirty {
            let snapshot = ledger.snapshot();
            drop(ledger);
            save_ledger(snapshot).await;
        }
    }

    fn progress(&self, generation: u64, progress: Progress) {
        let _ = self.events.try_send(ReconcileEvent::Progress {
            generation,
            progress,
            detail: String::new(),
        });
    }
}

/// Writes the ledger off the executor; a failure costs only cleanup.
async fn save_ledger(snapshot: Option<(std::path::PathBuf, Vec<u8>)>) {
    let Some((path, bytes)) = snapshot else {
        return;
    };
    match tokio::task::spawn_blocking(move || images::write_snapshot(&path, &bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(error = %e, cause = ?std::error::Error::source(&e), "could not save the image ledger")
        }
        Err(e) => warn!(error = %e, "saving the image ledger panicked"),
    }
}

#[cfg(test)]
mod tests;
