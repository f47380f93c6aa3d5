//! The SIMULATED container runtime of a simulated agent.
//!
//! Nothing here touches Docker: an image "pull" and a container "start" are
//! sleeps of a configured length, and a pull fails with a configured
//! probability. Everything around it is real — the MQTT client, the protocol,
//! the ack rules (the real agent's own [`drover_agent::desired::Intake`]) and
//! the orchestrator — so a load test measures the control plane, not Docker.
//! End-to-end numbers on real Docker come from the `agent-footprint`
//! scenario and the `tests/` suite, never from here.
//!
//! Split like the real reconciler: [`plan`] is a pure function from the
//! desired state and what "runs" to steps; [`execute`] sleeps through them.

use std::time::Duration;

use drover_shared::model::{AppPhase, AppStatus, ContainerStatus, DesiredState, RunState};
use drover_shared::payload::Progress;
use drover_shared::Name;
use rand::Rng;

/// Latencies and failure rate of the simulated runtime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RuntimeConfig {
    /// How long a simulated image pull takes (first use of an image only).
    pub pull: Duration,
    /// How long creating and starting (or stopping) a container takes.
    pub start: Duration,
    /// Probability in [0, 1] that a pull fails.
    pub failure_rate: f64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            pull: Duration::from_millis(200),
            start: Duration::from_millis(50),
            failure_rate: 0.0,
        }
    }
}

/// One simulated container as the simulated runtime holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimContainer {
    pub app: Name,
    pub name: Name,
    pub image: String,
    /// `ContainerSpec::fingerprint`: a different one means recreate.
    pub spec_hash: String,
    pub running: bool,
    pub id: String,
}

/// One simulated runtime action, in the order the real reconciler uses:
/// pulls first, then teardown, then creates and starts.
#[derive(Debug, Clone, PartialEq)]
pub enum SimStep {
    Pull {
        container: Name,
        image: String,
    },
    Stop {
        app: Name,
        container: Name,
    },
    Remove {
        app: Name,
        container: Name,
    },
    CreateStart {
        app: Name,
        container: Name,
        image: String,
        spec_hash: String,
        run: bool,
    },
    Start {
        app: Name,
        container: Name,
    },
}

/// The steps that take `actual` to `desired`; empty when converged.
pub fn plan(desired: &DesiredState, actual: &[SimContainer], images: &[String]) -> Vec<SimStep> {
    let mut pulls = Vec::new();
    let mut teardown = Vec::new();
    let mut creates = Vec::new();
    for app in &desired.apps {
        let run = app.run == RunState::Running;
        for spec in &app.spec.containers {
            let hash = spec.fingerprint();
            let found = actual
                .iter()
                .find(|c| c.app == app.spec.name && c.name == spec.name);
            match found {
                Some(c) if c.spec_hash == hash => {
                    if run && !c.running {
                        creates.push(SimStep::Start {
                            app: c.app.clone(),
                            container: c.name.clone(),
                        });
                    } else if !run && c.running {
                        teardown.push(SimStep::Stop {
                            app: c.app.clone(),
                            container: c.name.clone(),
                        });
                    }
                }
                other => {
                    if let Some(c) = other {
                        if c.running {
                            teardown.push(SimStep::Stop {
                                app: c.app.clone(),
                                container: c.name.clone(),
                            });
                        }
                        teardown.push(SimStep::Remove {
                            app: c.app.clone(),
                            container: c.name.clone(),
                        });
                    }
                    if !images.contains(&spec.image)
                        && !pulls.iter().any(
                            |p| matches!(p, SimStep::Pull { image, .. } if image == &spec.image),
                        )
                    {
                        pulls.push(SimStep::Pull {
                            container: spec.name.clone(),
                            image: spec.image.clone(),
                        });
                    }
                    creates.push(SimStep::CreateStart {
                        app: app.spec.name.clone(),
                        container: spec.name.clone(),
                        image: spec.image.clone(),
                        spec_hash: hash,
                        run,
                    });
                }
            }
        }
    }
    for c in actual {
        let wanted = desired
            .app(&c.app)
            .is_some_and(|a| a.spec.containers.iter().any(|s| s.name == c.name));
        if !wanted {
            if c.running {
                teardown.push(SimStep::Stop {
                    app: c.app.clone(),
                    container: c.name.clone(),
                });
            }
            teardown.push(SimStep::Remove {
                app: c.app.clone(),
                container: c.name.clone(),
            });
        }
    }
    pulls.into_iter().chain(teardown).chain(creates).collect()
}

/// What [`execute`] reports back to the simulated agent while it works.
pub trait PassSink {
    /// A progress step, sent as a `progress` ack for the waiting commands.
    fn progress(&mut self, progress: Progress);
}

/// The outcome of a pass: the new simulated containers and images, and the
/// first failure in words (as Docker's text would be passed through).
#[derive(Debug, Clone, PartialEq)]
pub struct PassOutcome {
    pub containers: Vec<SimContainer>,
    pub images: Vec<String>,
    pub failure: Option<(Name, String)>,
}

fn progress(step: &str, container: &Name) -> Progress {
    Progress {
        step: step.to_string(),
        container: container.clone(),
        current_bytes: None,
        total_bytes: None,
    }
}

/// Sleeps through the steps. A failed pull stops the pass before anything
/// is torn down, as in the real reconciler (the old container keeps running).
pub async fn execute(
    cfg: RuntimeConfig,
    steps: Vec<SimStep>,
    mut containers: Vec<SimContainer>,
    mut images: Vec<String>,
    sink: &mut impl PassSink,
) -> PassOutcome {
    for step in steps {
        match step {
            SimStep::Pull { container, image } => {
                sink.progress(progress("pulling", &container));
                tokio::time::sleep(cfg.pull).await;
                if cfg.failure_rate > 0.0
                    && rand::rng().random_bool(cfg.failure_rate.clamp(0.0, 1.0))
                {
                    // `observe` puts the failure on the app(s) that use this container name.
                    let text = format!(
                        "simulated runtime: pull of {image} failed: simulated registry error"
                    );
                    return PassOutcome {
                        containers,
                        images,
                        failure: Some((container, text)),
                    };
                }
                images.push(image);
            }
            SimStep::Stop { app, container } => {
                sink.progress(progress("stopping", &container));
                tokio::time::sleep(cfg.start).await;
                if let Some(c) = containers
                    .iter_mut()
                    .find(|c| c.app == app && c.name == container)
                {
                    c.running = false;
                }
            }
            SimStep::Remove { app, container } => {
                sink.progress(progress("removing", &container));
                containers.retain(|c| !(c.app == app && c.name == container));
            }
            SimStep::CreateStart {
                app,
                container,
                image,
                spec_hash,
                run,
            } => {
                sink.progress(progress("creating", &container));
                if run {
                    sink.progress(progress("starting", &container));
                    tokio::time::sleep(cfg.start).await;
                }
                let id = format!("{:016x}", rand::rng().random::<u64>());
                containers.push(SimContainer {
                    app,
                    name: container,
                    image,
                    spec_hash,
                    running: run,
                    id,
                });
            }
            SimStep::Start { app, container } => {
                sink.progress(progress("starting", &container));
                tokio::time::sleep(cfg.start).await;
                if let Some(c) = containers
                    .iter_mut()
                    .find(|c| c.app == app && c.name == container)
                {
                    c.running = true;
                }
            }
        }
    }
    PassOutcome {
        containers,
        images,
        failure: None,
    }
}

/// The per-app status a state report shows, from the desired state and the
/// simulated containers (same shape as the real agent's `observe`).
pub fn observe(
    desired: &DesiredState,
    containers: &[SimContainer],
    failure: Option<&(Name, String)>,
) -> Vec<AppStatus> {
    desired
        .apps
        .iter()
        .map(|app| {
            let statuses: Vec<ContainerStatus> = app
                .spec
                .containers
                .iter()
                .map(|spec| {
                    match containers
                        .iter()
                        .find(|c| c.app == app.spec.name && c.name == spec.name)
                    {
                        Some(c) => ContainerStatus {
                            name: spec.name.clone(),
                            image: c.image.clone(),
                            container_id: Some(c.id.clone()),
                            state: if c.running { "running" } else { "exited" }.to_string(),
                            exit_code: if c.running { None } else { Some(0) },
                            error: None,
                            health: None,
                            restarts: 0,
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
            let error = failure
                .filter(|(container, _)| app.spec.containers.iter().any(|s| &s.name == container))
                .map(|(_, text)| text.clone());
            // As the real agent: the release of what runs, so the spec's
            // only once every container is made from it; 0 (unknown) while
            // an older spec's containers are still there or none exist. A
            // rollout counts a device updated on this, so echoing the
            // desired release early would count it too soon.
            let current = app.spec.containers.iter().all(|spec| {
                let hash = spec.fingerprint();
                containers
                    .iter()
                    .any(|c| c.app == app.spec.name && c.name == spec.name && c.spec_hash == hash)
            });
            let all_running = statuses.iter().all(|c| c.state == "running");
            let none_running = statuses.iter().all(|c| c.state != "running");
            let phase = match (&error, app.run) {
                (Some(_), _) => AppPhase::Failed,
                (None, RunState::Running) if all_running => AppPhase::Running,
                (None, RunState::Stopped) if none_running => AppPhase::Stopped,
                _ => AppPhase::Starting,
            };
            AppStatus {
                name: app.spec.name.clone(),
                phase,
                error,
                attempts: 0,
                next_retry_at_ms: None,
                containers: statuses,
                release: if current { app.release } else { 0 },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::model::{AppSpec, ContainerSpec, DesiredApp};

    fn name(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    fn desired(gen: u64, run: RunState, image: &str) -> DesiredState {
        desired_release(gen, run, image, 0)
    }

    fn desired_release(gen: u64, run: RunState, image: &str, release: u64) -> DesiredState {
        let spec: ContainerSpec =
            serde_json::from_value(serde_json::json!({"name": "main", "image": image}))
                .expect("spec");
        DesiredState {
            generation: gen,
            apps: vec![DesiredApp {
                spec: AppSpec {
                    name: name("web"),
                    containers: vec![spec],
                    labels: Default::default(),
                },
                run,
                started_at: 1,
                release,
                restarted_at: 0,
            }],
            agent: None,
        }
    }

    struct Steps(Vec<String>);
    impl PassSink for Steps {
        fn progress(&mut self, p: Progress) {
            self.0.push(p.step);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deploy_pulls_once_then_stop_and_start_only_toggle() {
        let cfg = RuntimeConfig::default();
        let d = desired(1, RunState::Running, "r/a:1");
        let steps = plan(&d, &[], &[]);
        assert!(matches!(steps[0], SimStep::Pull { .. }));
        let mut sink = Steps(Vec::new());
        let out = execute(cfg, steps, Vec::new(), Vec::new(), &mut sink).await;
        assert_eq!(sink.0, ["pulling", "creating", "starting"]);
        assert!(out.failure.is_none());
        assert_eq!(
            observe(&d, &out.containers, None)[0].phase,
            AppPhase::Running
        );
        assert!(
            plan(&d, &out.containers, &out.images).is_empty(),
            "converged"
        );

        let stopped = desired(2, RunState::Stopped, "r/a:1");
        assert_eq!(
            plan(&stopped, &out.containers, &out.images),
            vec![SimStep::Stop {
                app: name("web"),
                container: name("main")
            }]
        );
        let empty = DesiredState {
            generation: 3,
            apps: vec![],
            agent: None,
        };
        assert_eq!(
            plan(&empty, &out.containers, &out.images).len(),
            2,
            "stop and remove"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pull_is_reported_on_its_app() {
        let cfg = RuntimeConfig {
            failure_rate: 1.0,
            ..RuntimeConfig::default()
        };
        let d = desired(1, RunState::Running, "r/a:1");
        let out = execute(
            cfg,
            plan(&d, &[], &[]),
            Vec::new(),
            Vec::new(),
            &mut Steps(Vec::new()),
        )
        .await;
        let apps = observe(&d, &out.containers, out.failure.as_ref());
        assert_eq!(apps[0].phase, AppPhase::Failed);
        assert!(apps[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("simulated")));
    }

    #[tokio::test(start_paused = true)]
    async fn the_release_reported_is_the_one_the_containers_run() {
        let cfg = RuntimeConfig::default();
        let one = desired_release(1, RunState::Running, "r/a:1", 1);
        let out = execute(
            cfg,
            plan(&one, &[], &[]),
            Vec::new(),
            Vec::new(),
            &mut Steps(Vec::new()),
        )
        .await;
        let apps = observe(&one, &out.containers, None);
        assert_eq!((apps[0].release, apps[0].phase), (1, AppPhase::Running));
        // Release 2 is adopted; release 1's container still runs.
        let two = desired_release(2, RunState::Running, "r/a:2", 2);
        let apps = observe(&two, &out.containers, None);
        assert_eq!(
            (apps[0].release, apps[0].phase),
            (0, AppPhase::Running),
            "not release 2 before its containers exist"
        );
        // Its pull fails: the old container stays, and so does "unknown".
        let failed = execute(
            RuntimeConfig {
                failure_rate: 1.0,
                ..cfg
            },
            plan(&two, &out.containers, &out.images),
            out.containers.clone(),
            out.images.clone(),
            &mut Steps(Vec::new()),
        )
        .await;
        let apps = observe(&two, &failed.containers, failed.failure.as_ref());
        assert_eq!((apps[0].release, apps[0].phase), (0, AppPhase::Failed));
        let done = execute(
            cfg,
            plan(&two, &out.containers, &out.images),
            out.containers,
            out.images,
            &mut Steps(Vec::new()),
        )
        .await;
        let apps = observe(&two, &done.containers, None);
        assert_eq!((apps[0].release, apps[0].phase), (2, AppPhase::Running));
        assert!(apps[0]
            .containers
            .iter()
            .all(|c| c.state == "running" && c.health.is_none()));
    }
}
