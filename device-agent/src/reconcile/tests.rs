//! Planner tests, and executor tests against a fake runtime. The fake is for
//! unit tests only.

use std::collections::HashMap;
use std::sync::Mutex;

use drover_shared::model::{AppSpec, DesiredApp, Health};
use drover_shared::payload::{DeviceEvent, EventKind};

use crate::backoff::Backoff;
use crate::runtime::ManagedNetwork;

use super::*;

/// The network of every desired app that wants one ([`wants_network`]), as
/// [`actual`] attaches containers to them.
fn nets_for(d: &DesiredState) -> Vec<ManagedNetwork> {
    d.apps
        .iter()
        .filter(|a| wants_network(&a.spec))
        .map(|a| ManagedNetwork {
            id: format!("net-{}", a.spec.name),
            name: format!("drover-dev1-{}", a.spec.name),
            app: a.spec.name.clone(),
        })
        .collect()
}

/// [`super::plan`] with every network an app wants in place.
fn plan(d: &DesiredState, a: &[ManagedContainer]) -> Vec<Step> {
    super::plan(d, a, &nets_for(d))
}

/// [`super::plan_with`] with every network an app wants in place.
fn plan_with(d: &DesiredState, a: &[ManagedContainer], settled: &Settled) -> Plan {
    super::plan_with(d, a, &nets_for(d), settled, &Restarted::default())
}

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

fn spec(container: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        name: name(container),
        image: image.into(),
        command: None,
        env: Default::default(),
        ports: vec![],
        volumes: vec![],
        restart: Default::default(),
        memory_mb: None,
        cpus: None,
        privileged: false,
        network_mode: Default::default(),
        cap_add: vec![],
        devices: vec![],
        host_mounts: vec![],
        healthcheck: None,
        depends_on: vec![],
    }
}

fn app(name_: &str, run: RunState, containers: Vec<ContainerSpec>) -> DesiredApp {
    DesiredApp {
        spec: AppSpec {
            name: name(name_),
            containers,
            labels: Default::default(),
        },
        run,
        started_at: 1,
        release: 0,
        restarted_at: 0,
    }
}

fn desired(generation: u64, apps: Vec<DesiredApp>) -> DesiredState {
    DesiredState {
        generation,
        apps,
        agent: None,
    }
}

fn actual(id: &str, app: &str, s: &ContainerSpec, state: &str) -> ManagedContainer {
    ManagedContainer {
        id: id.into(),
        app: name(app),
        container: s.name.clone(),
        spec_hash: s.fingerprint(),
        generation: 1,
        image: s.image.clone(),
        state: state.into(),
        exit_code: None,
        health: None,
        restarts: 0,
        networks: vec![format!("net-{app}")],
    }
}

#[test]
fn new_app_is_pulled_created_and_started() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    assert_eq!(
        plan(&d, &[]),
        vec![
            Step::Pull {
                app: name("web"),
                container: name("main"),
                image: "reg/web:1".into()
            },
            Step::Create {
                app: name("web"),
                spec: main,
                app_network: false
            },
            Step::Start {
                app: name("web"),
                container: name("main"),
                id: None
            },
        ]
    );
}

#[test]
fn new_app_desired_stopped_is_created_but_not_started() {
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Stopped,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let p = plan(&d, &[]);
    assert_eq!(p.len(), 2);
    assert!(!p.iter().any(|s| matches!(s, Step::Start { .. })));
}

#[test]
fn converged_state_plans_nothing() {
    let main = spec("main", "reg/web:1");
    let side = spec("side", "reg/side:2");
    let d = desired(
        3,
        vec![
            app("web", RunState::Running, vec![main.clone(), side.clone()]),
            app("batch", RunState::Stopped, vec![spec("job", "reg/job:1")]),
        ],
    );
    let job = spec("job", "reg/job:1");
    let a = vec![
        actual("1", "web", &main, "running"),
        actual("2", "web", &side, "running"),
        actual("3", "batch", &job, "exited"),
    ];
    assert_eq!(plan(&d, &a), vec![]);
}

#[test]
fn stopped_app_is_stopped() {
    let main = spec("main", "reg/web:1");
    let d = desired(2, vec![app("web", RunState::Stopped, vec![main.clone()])]);
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "running")]),
        vec![Step::Stop {
            app: name("web"),
            container: name("main"),
            id: "c1".into()
        }]
    );
}

#[test]
fn removed_app_is_stopped_and_removed() {
    let main = spec("main", "reg/web:1");
    let d = desired(2, vec![]);
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "running")]),
        vec![
            Step::Stop {
                app: name("web"),
                container: name("main"),
                id: "c1".into()
            },
            Step::Remove {
                app: name("web"),
                container: name("main"),
                id: "c1".into()
            },
        ]
    );
    // Already stopped: removal only.
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "exited")]),
        vec![Step::Remove {
            app: name("web"),
            container: name("main"),
            id: "c1".into()
        }]
    );
}

#[test]
fn container_dropped_from_an_app_is_removed() {
    let main = spec("main", "reg/web:1");
    let old = spec("old", "reg/old:1");
    let d = desired(2, vec![app("web", RunState::Running, vec![main.clone()])]);
    let p = plan(
        &d,
        &[
            actual("c1", "web", &main, "running"),
            actual("c2", "web", &old, "exited"),
        ],
    );
    assert_eq!(
        p,
        vec![Step::Remove {
            app: name("web"),
            container: name("old"),
            id: "c2".into()
        }]
    );
}

#[test]
fn changed_spec_is_pulled_first_then_replaced() {
    let v1 = spec("main", "reg/web:1");
    let v2 = spec("main", "reg/web:2");
    let d = desired(2, vec![app("web", RunState::Running, vec![v2.clone()])]);
    assert_eq!(
        plan(&d, &[actual("old", "web", &v1, "running")]),
        vec![
            Step::Pull {
                app: name("web"),
                container: name("main"),
                image: "reg/web:2".into()
            },
            Step::Stop {
                app: name("web"),
                container: name("main"),
                id: "old".into()
            },
            Step::Remove {
                app: name("web"),
                container: name("main"),
                id: "old".into()
            },
            Step::Create {
                app: name("web"),
                spec: v2,
                app_network: false
            },
            Step::Start {
                app: name("web"),
                container: name("main"),
                id: None
            },
        ]
    );
}

#[test]
fn env_change_also_recreates() {
    let v1 = spec("main", "reg/web:1");
    let mut v2 = v1.clone();
    v2.env.insert("MODE".into(), "fast".into());
    let d = desired(2, vec![app("web", RunState::Running, vec![v2])]);
    let p = plan(&d, &[actual("old", "web", &v1, "running")]);
    assert!(p.contains(&Step::Remove {
        app: name("web"),
        container: name("main"),
        id: "old".into()
    }));
}

#[test]
fn exited_container_desired_running_is_started() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    for state in ["exited", "created"] {
        assert_eq!(
            plan(&d, &[actual("c1", "web", &main, state)]),
            vec![Step::Start {
                app: name("web"),
                container: name("main"),
                id: Some("c1".into())
            }],
            "{state}"
        );
    }
}

#[test]
fn duplicates_are_removed_keeping_a_running_one() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    let p = plan(
        &d,
        &[
            actual("a", "web", &main, "exited"),
            actual("b", "web", &main, "running"),
        ],
    );
    assert_eq!(
        p,
        vec![Step::Remove {
            app: name("web"),
            container: name("main"),
            id: "a".into()
        }]
    );
}

#[test]
fn unmanaged_and_foreign_containers_never_reach_the_plan() {
    // The rule lives in ManagedContainer::from_labels; a list built through
    // it cannot contain them, so an empty desired state plans nothing.
    let me = DeviceId::new("me").expect("valid");
    let other = DeviceId::new("other").expect("valid");
    let main = spec("main", "reg/web:1");
    let foreign = crate::runtime::labels_for(&other, &name("web"), &main, 1);
    let unmanaged: HashMap<String, String> = HashMap::from([("some".into(), "label".into())]);
    let list: Vec<ManagedContainer> = [foreign, unmanaged]
        .iter()
        .filter_map(|l| ManagedContainer::from_labels(&me, "x", l, "img", "running", None))
        .collect();
    assert!(list.is_empty());
    assert_eq!(plan(&desired(1, vec![]), &list), vec![]);
}

#[test]
fn observe_reports_phases_and_absent_containers() {
    let main = spec("main", "reg/web:1");
    let d = desired(
        1,
        vec![
            app("web", RunState::Running, vec![main.clone()]),
            app("gone", RunState::Running, vec![spec("x", "reg/x:1")]),
            app("idle", RunState::Stopped, vec![spec("y", "reg/y:1")]),
        ],
    );
    let errors = BTreeMap::from([(name("gone"), "manifest unknown".to_string())]);
    let apps = observe(
        &d,
        &[actual("c1", "web", &main, "running")],
        &errors,
        &HashSet::new(),
    );
    assert_eq!(apps[0].phase, AppPhase::Running);
    assert_eq!(apps[0].containers[0].container_id.as_deref(), Some("c1"));
    assert_eq!(apps[1].phase, AppPhase::Failed);
    assert_eq!(apps[1].error.as_deref(), Some("manifest unknown"));
    assert_eq!(apps[1].containers[0].state, "absent");
    assert_eq!(apps[2].phase, AppPhase::Stopped);
}

/// id, labels, state.
type FakeContainer = (String, HashMap<String, String>, String);

/// An in-memory runtime for unit tests only.
#[derive(Default)]
struct FakeRuntime {
    device: Option<DeviceId>,
    containers: Mutex<Vec<FakeContainer>>,
    images: Mutex<Vec<String>>,
    pullable: Vec<String>,
    log: Mutex<Vec<String>>,
    /// Returned by the next pulls instead of pulling, while set.
    pull_error: Mutex<Option<RuntimeError>>,
    exit_codes: Mutex<HashMap<String, i64>>,
    free_disk: Option<u64>,
    in_use: Mutex<HashSet<String>>,
    /// A registry host whose pulls need the password "right".
    requires_auth: Mutex<Option<String>>,
    /// References Docker refuses to even inspect, as it does a reference
    /// its own parser rejects.
    malformed: Vec<String>,
    networks: Mutex<Vec<ManagedNetwork>>,
    /// Container id → the ids of the networks it is attached to.
    attached: Mutex<HashMap<String, Vec<String>>>,
    /// Container id → its health status.
    health: Mutex<HashMap<String, Health>>,
    /// Container id → the image it was created from.
    image_of: Mutex<HashMap<String, String>>,
}

impl FakeRuntime {
    fn new(pullable: &[&str]) -> Self {
        FakeRuntime {
            device: Some(DeviceId::new("dev1").expect("valid")),
            pullable: pullable.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
    fn log(&self, s: String) {
        self.log.lock().expect("lock").push(s);
    }
    fn set_state(&self, id: &str, state: &str) -> Result<(), RuntimeError> {
        let mut cs = self.containers.lock().expect("lock");
        let c = cs
            .iter_mut()
            .find(|c| c.0 == id)
            .ok_or_else(|| RuntimeError::Docker(format!("No such container: {id}")))?;
        c.2 = state.into();
        Ok(())
    }
}

impl Runtime for FakeRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let me = self.device.clone().expect("device");
        Ok(self
            .containers
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|(id, labels, state)| {
                let code = self.exit_codes.lock().expect("lock").get(id).copied();
                let image = self.image_of.lock().expect("lock").get(id).cloned();
                let image = image.as_deref().unwrap_or("img");
                let mut m = ManagedContainer::from_labels(&me, id, labels, image, state, code)?;
                m.networks = self
                    .attached
                    .lock()
                    .expect("lock")
                    .get(id)
                    .cloned()
                    .unwrap_or_default();
                m.health = self.health.lock().expect("lock").get(id).copied();
                Some(m)
            })
            .collect())
    }
    async fn image_present(&self, image: &ImageRef) -> Result<bool, RuntimeError> {
        if self.malformed.contains(&image.to_string()) {
            return Err(RuntimeError::Docker(format!(
                "no such image: {image}: invalid reference format"
            )));
        }
        Ok(self
            .images
            .lock()
            .expect("lock")
            .contains(&image.to_string()))
    }
    async fn pull(
        &self,
        image: &ImageRef,
        auth: Option<&RegistryCredential>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(), RuntimeError> {
        match auth {
            Some(a) => self.log(format!("pull {image} as {}@{}", a.username, a.host)),
            None => self.log(format!("pull {image}")),
        }
        if let Some(host) = self.requires_auth.lock().expect("lock").as_deref() {
            if image.registry_host() == host && auth.is_none_or(|a| a.password != "right") {
                return Err(RuntimeError::Pull {
                    status: Some(500),
                    message: format!(
                        "Head \"http://{host}/v2/x/manifests/1\": no basic auth credentials"
                    ),
                });
            }
        }
        if let Some(e) = self.pull_error.lock().expect("lock").clone() {
            return Err(e);
        }
        if !self.pullable.contains(&image.to_string()) {
            return Err(RuntimeError::Docker(format!(
                "manifest for {image} not found: manifest unknown"
            )));
        }
        progress(PullProgress {
            current: 5,
            total: 10,
        });
        self.images.lock().expect("lock").push(image.to_string());
        Ok(())
    }
    async fn create(
        &self,
        name: &str,
        spec: &ContainerSpec,
        labels: HashMap<String, String>,
        network: Option<&str>,
    ) -> Result<String, RuntimeError> {
        self.log(format!("create {name}"));
        let id = format!("id-{name}");
        self.image_of
            .lock()
            .expect("lock")
            .insert(id.clone(), spec.image.clone());
        if let (Some(net), NetworkMode::Bridge) = (network, spec.network_mode) {
            let found = self
                .networks
                .lock()
                .expect("lock")
                .iter()
                .find(|n| n.id == net || n.name == net)
                .map(|n| n.id.clone())
                .ok_or_else(|| RuntimeError::Docker(format!("network {net} not found")))?;
            self.attached
                .lock()
                .expect("lock")
                .insert(id.clone(), vec![found]);
        }
        self.containers
            .lock()
            .expect("lock")
            .push((id.clone(), labels, "created".into()));
        Ok(id)
    }
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("start {id}"));
        self.set_state(id, "running")
    }
    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("stop {id}"));
        self.set_state(id, "exited")
    }
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("pause {id}"));
        self.set_state(id, "paused")
    }
    async fn unpause(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("unpause {id}"));
        self.set_state(id, "running")
    }
    async fn restart(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("restart {id}"));
        self.set_state(id, "running")
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("remove {id}"));
        self.containers.lock().expect("lock").retain(|c| c.0 != id);
        self.attached.lock().expect("lock").remove(id);
        Ok(())
    }
    async fn list_networks(&self) -> Result<Vec<ManagedNetwork>, RuntimeError> {
        Ok(self.networks.lock().expect("lock").clone())
    }
    async fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, RuntimeError> {
        let me = self.device.clone().expect("device");
        let id = format!("netid-{name}");
        let n = ManagedNetwork::from_labels(&me, &id, name, &labels).expect("managed labels");
        self.networks.lock().expect("lock").push(n);
        Ok(id)
    }
    async fn remove_network(&self, id: &str) -> Result<(), RuntimeError> {
        if self
            .attached
            .lock()
            .expect("lock")
            .values()
            .any(|n| n.iter().any(|n| n == id))
        {
            return Err(RuntimeError::Docker(format!(
                "error while removing network: network {id} has active endpoints"
            )));
        }
        self.networks.lock().expect("lock").retain(|n| n.id != id);
        Ok(())
    }
    async fn free_disk(&self) -> Result<Option<crate::runtime::DiskSpace>, RuntimeError> {
        Ok(self.free_disk.map(|free_bytes| crate::runtime::DiskSpace {
            root: "/var/lib/docker".into(),
            free_bytes,
        }))
    }
    async fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
        Ok(self.in_use.lock().expect("lock").clone())
    }
    async fn image_id(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        Ok(self
            .images
            .lock()
            .expect("lock")
            .contains(&image.to_string())
            .then(|| format!("sha256:{image}")))
    }
    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.log(format!("rmi {image}"));
        self.images.lock().expect("lock").retain(|i| i != image);
        Ok(())
    }
}

fn reconciler(rt: Arc<FakeRuntime>) -> (Reconciler<FakeRuntime>, mpsc::Receiver<ReconcileEvent>) {
    let (tx, rx) = mpsc::channel(64);
    (
        Reconciler::new(rt, DeviceId::new("dev1").expect("valid"), tx),
        rx,
    )
}

#[tokio::test]
async fn a_pass_converges_and_a_second_pass_does_nothing() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    let report = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert!(report.failures.is_empty());
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec![
            "pull reg/web:1",
            "create drover-dev1-web-main",
            "start id-drover-dev1-web-main"
        ]
    );
    let mut saw_pull_progress = false;
    while let Ok(ev) = events.try_recv() {
        if let ReconcileEvent::Progress { progress, .. } = ev {
            saw_pull_progress |= progress.step == "pulling" && progress.total_bytes == Some(10);
        }
    }
    assert!(saw_pull_progress);

    rt.log.lock().expect("lock").clear();
    let again = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert_eq!(again.apps, report.apps);
    assert!(
        rt.log.lock().expect("lock").is_empty(),
        "nothing done twice"
    );
}

#[tokio::test]
async fn a_failed_pull_is_a_definitive_failure_with_the_registry_text() {
    let rt = Arc::new(FakeRuntime::new(&[]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let d = desired(
        4,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:nope")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    let report = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert_eq!(report.generation, 4);
    assert_eq!(
        report.failures.get(&name("web")).map(String::as_str),
        Some("manifest for reg/web:nope not found: manifest unknown")
    );
    assert_eq!(report.apps[0].phase, AppPhase::Failed);
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec!["pull reg/web:nope"],
        "nothing created after a failed pull"
    );
}

#[tokio::test]
async fn a_failed_pull_keeps_the_old_version_running() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let v1 = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    r.pass(&v1, &newer).await.expect("runs");
    let v2 = desired(
        2,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:2")],
        )],
    );
    let report = r
        .pass(&v2, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert!(report.failures.contains_key(&name("web")));
    assert_eq!(report.apps[0].containers[0].state, "running");
}

#[tokio::test]
async fn a_newer_desired_state_aborts_the_pass() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (tx, newer) = watch::channel(None);
    tx.send_replace(Some(Arc::new(desired(2, vec![]))));
    assert_eq!(r.pass(&d, &newer).await.expect("runs"), None);
}

// ----- drift and restart policies --------------------------------------------

fn with_policy(mut s: ContainerSpec, policy: RestartPolicy) -> ContainerSpec {
    s.restart = policy;
    s
}

fn exited(id: &str, app: &str, s: &ContainerSpec, code: Option<i64>) -> ManagedContainer {
    ManagedContainer {
        exit_code: code,
        ..actual(id, app, s, "exited")
    }
}

fn settled_as(d: &DesiredState) -> Settled {
    d.apps
        .iter()
        .flat_map(|a| {
            a.spec.containers.iter().map(move |c| {
                (
                    (a.spec.name.clone(), c.name.clone()),
                    (c.fingerprint(), a.run, a.started_at),
                )
            })
        })
        .collect()
}

#[test]
fn restart_policy_matrix() {
    use RestartPolicy::*;
    for (policy, code, restart) in [
        (Always, Some(0), true),
        (Always, Some(137), true),
        (UnlessStopped, Some(0), true),
        (UnlessStopped, Some(143), true),
        (OnFailure, Some(1), true),
        (OnFailure, Some(137), true),
        (OnFailure, None, true),
        (OnFailure, Some(0), false),
        (No, Some(0), false),
        (No, Some(137), false),
        (No, None, false),
    ] {
        assert_eq!(
            restarts_after_exit(policy, code),
            restart,
            "{policy:?} {code:?}"
        );
    }
}

#[test]
fn exited_settled_container_follows_its_restart_policy() {
    for (policy, code, started) in [
        (RestartPolicy::UnlessStopped, Some(143), true),
        (RestartPolicy::Always, Some(0), true),
        (RestartPolicy::OnFailure, Some(137), true),
        (RestartPolicy::OnFailure, Some(0), false),
        (RestartPolicy::No, Some(137), false),
    ] {
        let main = with_policy(spec("main", "reg/web:1"), policy);
        let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
        let p = plan_with(&d, &[exited("c1", "web", &main, code)], &settled_as(&d));
        if started {
            assert_eq!(
                p.steps,
                vec![Step::Start {
                    app: name("web"),
                    container: name("main"),
                    id: Some("c1".into())
                }],
                "{policy:?}"
            );
            assert_eq!(
                p.repairs,
                vec![Repair {
                    app: name("web"),
                    container: name("main"),
                    drift: Drift::Exited { code }
                }]
            );
            assert!(p.left_exited.is_empty());
        } else {
            assert_eq!(p.steps, vec![], "{policy:?} {code:?}");
            assert_eq!(p.left_exited.len(), 1);
            assert_eq!(p.left_exited[0].exit_code, code);
        }
    }
}

#[test]
fn exited_container_not_yet_settled_is_started_whatever_the_policy() {
    // A start command (stopped -> running) or a deploy still under way: intent wins.
    let main = with_policy(spec("main", "reg/web:1"), RestartPolicy::No);
    let d = desired(2, vec![app("web", RunState::Running, vec![main.clone()])]);
    let stopped_before = settled_as(&desired(
        1,
        vec![app("web", RunState::Stopped, vec![main.clone()])],
    ));
    let p = plan_with(&d, &[exited("c1", "web", &main, Some(0))], &stopped_before);
    assert_eq!(
        p.steps,
        vec![Step::Start {
            app: name("web"),
            container: name("main"),
            id: Some("c1".into())
        }]
    );
    assert!(p.repairs.is_empty(), "a start command is not drift");
}

#[test]
fn removed_container_is_recreated_and_reported_as_drift() {
    for run in [RunState::Running, RunState::Stopped] {
        let main = with_policy(spec("main", "reg/web:1"), RestartPolicy::No);
        let d = desired(1, vec![app("web", run, vec![main.clone()])]);
        let p = plan_with(&d, &[], &settled_as(&d));
        assert!(
            p.steps.contains(&Step::Create {
                app: name("web"),
                spec: main.clone(),
                app_network: false
            }),
            "{run:?}"
        );
        assert_eq!(
            p.steps.iter().any(|s| matches!(s, Step::Start { .. })),
            run == RunState::Running
        );
        assert_eq!(
            p.repairs,
            vec![Repair {
                app: name("web"),
                container: name("main"),
                drift: Drift::Removed
            }]
        );
        assert_eq!(Drift::Removed.detail(), "container was removed; recreated");
    }
    // The first deploy creates too, but that is no repair.
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main])]);
    assert!(plan_with(&d, &[], &Settled::new()).repairs.is_empty());
}

#[test]
fn docker_restarting_paused_or_removing_is_not_drift() {
    let main = with_policy(spec("main", "reg/web:1"), RestartPolicy::Always);
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    for state in ["restarting", "paused", "removing", "running"] {
        let p = plan_with(&d, &[actual("c1", "web", &main, state)], &settled_as(&d));
        assert_eq!(p, Plan::default(), "{state}");
    }
}

#[test]
fn drift_details_name_what_was_found() {
    assert_eq!(
        Drift::Exited { code: Some(137) }.detail(),
        "container exited with code 137; started"
    );
    let l = LeftExited {
        app: name("web"),
        container: name("main"),
        id: "c1".into(),
        exit_code: Some(137),
        policy: RestartPolicy::No,
    };
    assert_eq!(
        l.detail(),
        "container exited with code 137; restart policy no leaves it exited"
    );
}

#[tokio::test]
async fn a_left_exited_container_is_reported_once_and_shown_failed() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let main = with_policy(spec("main", "reg/web:1"), RestartPolicy::No);
    let d = desired(1, vec![app("web", RunState::Running, vec![main])]);
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs").expect("done");
    rt.set_state("id-drover-dev1-web-main", "exited")
        .expect("exists");
    rt.exit_codes
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-main".into(), 137);
    rt.log.lock().expect("lock").clear();
    let report = r.pass(&d, &newer).await.expect("runs").expect("done");
    assert!(
        rt.log.lock().expect("lock").is_empty(),
        "restart policy no: left exited"
    );
    assert_eq!(report.apps[0].phase, AppPhase::Failed);
    assert_eq!(
        report.apps[0].error.as_deref(),
        Some("container main exited with code 137; restart policy no leaves it exited")
    );
    assert!(report.failures.is_empty(), "no command failed");
    r.pass(&d, &newer).await.expect("runs");
    let exits: Vec<DeviceEvent> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.kind == EventKind::ContainerExited)
        .collect();
    assert_eq!(exits.len(), 1, "reported once: {exits:?}");
    assert_eq!(
        exits[0].detail,
        "container exited with code 137; restart policy no leaves it exited"
    );

    // An explicit start (a newer `started_at`) overrides the policy, in
    // the desired state itself, whichever message brought it.
    let mut d = d.clone();
    d.generation += 1;
    d.apps[0].started_at = d.generation;
    let report = r.pass(&d, &newer).await.expect("runs").expect("done");
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec!["start id-drover-dev1-web-main"]
    );
    assert_eq!(report.apps[0].phase, AppPhase::Running);
}

#[tokio::test]
async fn removed_and_stopped_containers_are_repaired_with_events() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs");
    assert!(drain_events(&mut events).is_empty(), "a deploy is no drift");

    rt.containers.lock().expect("lock").clear();
    rt.log.lock().expect("lock").clear();
    let report = r.pass(&d, &newer).await.expect("runs").expect("done");
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec![
            "create drover-dev1-web-main",
            "start id-drover-dev1-web-main"
        ]
    );
    let ev = drain_events(&mut events);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].kind, ev[0].detail.as_str()),
        (EventKind::DriftRepaired, "container was removed; recreated")
    );
    assert_eq!(ev[0].container, Some(name("main")));

    rt.set_state("id-drover-dev1-web-main", "exited")
        .expect("exists");
    rt.exit_codes
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-main".into(), 143);
    r.pass(&d, &newer).await.expect("runs");
    let ev = drain_events(&mut events);
    assert_eq!(ev[0].detail, "container exited with code 143; started");
}

fn drain_events(rx: &mut mpsc::Receiver<ReconcileEvent>) -> Vec<DeviceEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let ReconcileEvent::Event(e) = ev {
            out.push(e);
        }
    }
    out
}

#[tokio::test]
async fn restoring_reports_restored_from_local_state_once() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let d = desired(
        7,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let r = r.restoring(&d, true, d.generation);
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs");
    r.pass(&d, &newer).await.expect("runs");
    let restored: Vec<DeviceEvent> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.kind == EventKind::RestoredFromLocalState)
        .collect();
    assert_eq!(restored.len(), 1);
    assert!(
        restored[0].detail.contains("generation 7"),
        "{}",
        restored[0].detail
    );
    assert!(
        restored[0]
            .detail
            .contains("created web/main, started web/main"),
        "{}",
        restored[0].detail
    );
}

#[tokio::test]
async fn restoring_a_generation_never_applied_reports_no_drift() {
    // The agent was killed mid-deploy: the container was never created.
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let d = desired(
        7,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let r = r.restoring(&d, false, 0);
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs");
    let events = drain_events(&mut events);
    assert!(
        !events.iter().any(|e| e.kind == EventKind::DriftRepaired),
        "{events:?}"
    );
    let restored: Vec<&DeviceEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::RestoredFromLocalState)
        .collect();
    assert_eq!(
        restored.len(),
        1,
        "still restored from local state: {events:?}"
    );
    assert!(
        !restored[0].detail.contains("was removed"),
        "{}",
        restored[0].detail
    );
    // It says what it did: the container was created and started, not
    // "already as desired".
    assert!(
        restored[0].detail.contains("created web/main")
            && restored[0].detail.contains("started web/main")
            && !restored[0].detail.contains("already as desired"),
        "{}",
        restored[0].detail
    );
}

#[tokio::test]
async fn a_stored_state_older_than_what_runs_is_not_restored() {
    // Generation 9 was applied but could not be stored: the state
    // directory still holds generation 7.
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1", "reg/new:2"]));
    let newer_spec = spec("main", "reg/new:2");
    let dev = DeviceId::new("dev1").expect("valid");
    rt.containers.lock().expect("lock").push((
        "id-new".into(),
        crate::runtime::labels_for(&dev, &name("new"), &newer_spec, 9),
        "running".into(),
    ));
    // On Docker's default bridge, as generation 9 made it: a one-container
    // app has no network of its own.
    rt.attached
        .lock()
        .expect("lock")
        .insert("id-new".into(), vec!["default-bridge".into()]);
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let stored = desired(
        7,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let r = r.restoring(&stored, false, 0);
    let (_tx, newer) = watch::channel(None);
    for _ in 0..2 {
        assert_eq!(
            r.pass(&stored, &newer).await.expect("runs"),
            None,
            "the stale state is not applied"
        );
    }
    assert!(
        rt.log.lock().expect("lock").is_empty(),
        "nothing was touched: {:?}",
        rt.log.lock().expect("lock")
    );
    let events = drain_events(&mut events);
    let refused: Vec<&DeviceEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::RestoreRefused)
        .collect();
    assert_eq!(refused.len(), 1, "reported once: {events:?}");
    assert!(
        refused[0].detail.contains("generation 7") && refused[0].detail.contains("generation 9"),
        "{}",
        refused[0].detail
    );
    assert!(!events
        .iter()
        .any(|e| e.kind == EventKind::RestoredFromLocalState));

    // The orchestrator's current state (generation 9) is applied normally.
    let current = desired(9, vec![app("new", RunState::Running, vec![newer_spec])]);
    let report = r
        .pass(&current, &newer)
        .await
        .expect("runs")
        .expect("counted");
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert!(
        rt.log.lock().expect("lock").is_empty(),
        "already as desired"
    );
}

// ----- pull retries, disk, cleanup --------------------------------------------

fn fast_retries() -> ReconcileOptions {
    ReconcileOptions {
        pull_backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
        ..ReconcileOptions::default()
    }
}

#[tokio::test]
async fn a_transient_pull_error_retries_instead_of_failing() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let refused = r#"Get "http://reg/v2/": dial tcp 127.0.0.1:5999: connect: connection refused"#;
    *rt.pull_error.lock().expect("lock") = Some(RuntimeError::Pull {
        status: Some(500),
        message: refused.into(),
    });
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let r = r.with_options(fast_retries());
    let d = desired(
        3,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);

    let first = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert!(first.retry_at.is_some(), "not done: waiting to retry");
    assert!(first.failures.is_empty());
    assert_eq!(first.apps[0].phase, AppPhase::Retrying);
    assert_eq!(
        first.apps[0].error.as_deref(),
        Some(refused),
        "the last error, verbatim"
    );
    assert_eq!(first.apps[0].attempts, 1);
    assert!(first.apps[0].next_retry_at_ms.is_some());
    let mut acks = Vec::new();
    let mut retry_events = Vec::new();
    while let Ok(ev) = events.try_recv() {
        match ev {
            ReconcileEvent::Progress {
                progress, detail, ..
            } if progress.step == "retrying" => acks.push(detail),
            ReconcileEvent::Event(e) if e.kind == EventKind::PullRetrying => retry_events.push(e),
            _ => {}
        }
    }
    assert_eq!(acks, vec![refused.to_string()]);
    assert_eq!(retry_events.len(), 1);
    assert!(
        retry_events[0].detail.contains("attempt 1"),
        "{}",
        retry_events[0].detail
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert_eq!(second.apps[0].attempts, 2);

    // The registry is back: the same generation converges.
    *rt.pull_error.lock().expect("lock") = None;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let done = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert_eq!((done.retry_at, done.failures.is_empty()), (None, true));
    assert_eq!(done.apps[0].phase, AppPhase::Running);
    assert_eq!(done.apps[0].attempts, 0);
}

#[tokio::test]
async fn a_pull_not_yet_due_is_not_attempted() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    *rt.pull_error.lock().expect("lock") = Some(RuntimeError::Pull {
        status: Some(503),
        message: "service unavailable".into(),
    });
    let (r, _events) = reconciler(Arc::clone(&rt));
    let r = r.with_options(ReconcileOptions {
        pull_backoff: Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)),
        ..ReconcileOptions::default()
    });
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs");
    // The next attempt is up to an hour away (a draw below a millisecond
    // has odds of one in millions).
    let again = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    let pulls = rt
        .log
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.starts_with("pull"))
        .count();
    assert_eq!(pulls, 1, "waiting, not attempting");
    assert_eq!(again.apps[0].phase, AppPhase::Retrying);
    // A newer generation starts over at once.
    let d2 = desired(
        2,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let before = rt.log.lock().expect("lock").len();
    let fresh = r
        .pass(&d2, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert_eq!(
        rt.log.lock().expect("lock").len(),
        before + 1,
        "pulled at once for the new generation"
    );
    assert_eq!(fresh.apps[0].attempts, 1);
}

#[tokio::test]
async fn not_enough_disk_is_retried_with_a_clear_error() {
    let rt = Arc::new(FakeRuntime {
        free_disk: Some(120 * 1024 * 1024),
        ..FakeRuntime::new(&["reg/web:1"])
    });
    let (r, _events) = reconciler(Arc::clone(&rt));
    let r = r.with_options(fast_retries());
    let d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    let report = r
        .pass(&d, &newer)
        .await
        .expect("runs")
        .expect("not superseded");
    assert!(rt.log.lock().expect("lock").is_empty(), "no pull started");
    assert_eq!(report.apps[0].phase, AppPhase::Retrying);
    assert_eq!(
        report.apps[0].error.as_deref(),
        Some("not enough free disk for pulling reg/web:1: 120 MiB free on /var/lib/docker, 256 MiB required")
    );
}

#[tokio::test]
async fn unused_pulled_images_are_cleaned_up_after_convergence() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1", "reg/web:2", "reg/side:1"]));
    rt.images.lock().expect("lock").push("preloaded:1".into());
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let v1 = desired(
        1,
        vec![
            app("web", RunState::Running, vec![spec("main", "reg/web:1")]),
            app("side", RunState::Running, vec![spec("main", "reg/side:1")]),
        ],
    );
    let report = r.pass(&v1, &newer).await.expect("runs").expect("counted");
    r.cleanup_images(&v1, &report.apps).await;
    assert!(
        !rt.log
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.starts_with("rmi")),
        "everything is still desired"
    );

    // web moves to :2 and side goes; side's image is still used by some container.
    rt.in_use
        .lock()
        .expect("lock")
        .insert("sha256:reg/side:1".into());
    let v2 = desired(
        2,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:2")],
        )],
    );
    let report = r.pass(&v2, &newer).await.expect("runs").expect("counted");
    r.cleanup_images(&v2, &report.apps).await;
    let rmi: Vec<String> = rt
        .log
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.starts_with("rmi"))
        .cloned()
        .collect();
    assert_eq!(
        rmi,
        vec!["rmi reg/web:1"],
        "never in use, never desired, never not ours"
    );
    let removed: Vec<DeviceEvent> = drain_events(&mut events)
        .into_iter()
        .filter(|e| e.kind == EventKind::ImageRemoved)
        .collect();
    assert_eq!(removed.len(), 1);
    assert!(removed[0].detail.contains("reg/web:1"));
}

// ----- private registries ----------------------------------------------------

#[tokio::test]
async fn an_unauthorized_pull_retries_at_once_when_credentials_arrive() {
    let private = "reg.example:5001/web:1";
    let public = "reg/side:1";
    let rt = Arc::new(FakeRuntime::new(&[private, public]));
    *rt.requires_auth.lock().expect("lock") = Some("reg.example:5001".into());
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let (secrets_tx, secrets_rx) = watch::channel(Arc::new(Secrets::default()));
    // Retries an hour apart: only new credentials can make the next one soon.
    let r = r
        .with_options(ReconcileOptions {
            pull_backoff: Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600)),
            ..ReconcileOptions::default()
        })
        .with_secrets(secrets_rx);
    let d = desired(
        1,
        vec![
            app("web", RunState::Running, vec![spec("main", private)]),
            app("side", RunState::Running, vec![spec("main", public)]),
        ],
    );
    let (desired_tx, desired_rx) = watch::channel(Some(Arc::new(d)));
    let (_trigger_tx, trigger_rx) = mpsc::channel(1);
    let task = tokio::spawn(r.run(desired_rx, Duration::from_secs(3600), trigger_rx));

    let next_apps = |events: &mut mpsc::Receiver<ReconcileEvent>| {
        let mut apps = None;
        while let Ok(ev) = events.try_recv() {
            match ev {
                ReconcileEvent::Interim { apps: a, .. } => apps = Some((a, false)),
                ReconcileEvent::Done(rep) => apps = Some((rep.apps, true)),
                _ => {}
            }
        }
        apps
    };
    let mut seen = None;
    for _ in 0..200 {
        if let Some((apps, false)) = next_apps(&mut events) {
            if apps.iter().any(|a| a.phase == AppPhase::Retrying) {
                seen = Some(apps);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let apps = seen.expect("the private app retries");
    let web = apps.iter().find(|a| a.name == name("web")).expect("web");
    let error = web.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("unauthorized: registry reg.example:5001"),
        "{error}"
    );

    let cred = |password: &str, at: u64| Secrets {
        issued_at_ms: at,
        registries: vec![RegistryCredential {
            host: "reg.example:5001".into(),
            username: "robot".into(),
            password: password.into(),
        }],
    };
    secrets_tx.send_replace(Arc::new(cred("right", 1)));
    let mut done = None;
    for _ in 0..200 {
        if let Some((apps, true)) = next_apps(&mut events) {
            done = Some(apps);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let apps = done.expect("converges long before the hour-long backoff");
    assert!(
        apps.iter().all(|a| a.phase == AppPhase::Running),
        "{apps:?}"
    );
    let log = rt.log.lock().expect("lock").clone();
    assert!(
        log.contains(&format!("pull {private} as robot@reg.example:5001")),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("pull {public}")),
        "the other registry's image is pulled without credentials: {log:?}"
    );
    drop(desired_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[tokio::test]
async fn an_app_docker_refuses_fails_alone_and_the_others_deploy() {
    let mut fake = FakeRuntime::new(&["reg/web:1"]);
    fake.malformed = vec!["a:b:c".into()];
    let rt = Arc::new(fake);
    let (r, _events) = reconciler(Arc::clone(&rt));
    let d = desired(
        2,
        vec![
            app("bad", RunState::Running, vec![spec("main", "a:b:c")]),
            app("good", RunState::Running, vec![spec("main", "reg/web:1")]),
        ],
    );
    let (_tx, newer) = watch::channel(None);
    let report = r
        .pass(&d, &newer)
        .await
        .expect("one refused image does not stop the pass")
        .expect("not superseded");
    assert_eq!(
        report.failures.keys().collect::<Vec<_>>(),
        vec![&name("bad")],
        "only the bad app failed"
    );
    let status = |n: &str| {
        report
            .apps
            .iter()
            .find(|a| a.name == name(n))
            .expect("app reported")
    };
    assert_eq!(status("good").phase, AppPhase::Running);
    assert_eq!(status("bad").phase, AppPhase::Failed);
    assert!(
        status("bad")
            .error
            .as_deref()
            // Refused by the reference grammar before Docker is asked, or
            // by Docker itself.
            .is_some_and(|e| e.contains("invalid reference format")
                || e.contains("not a valid image reference")),
        "{:?}",
        status("bad").error
    );
    assert!(rt
        .log
        .lock()
        .expect("lock")
        .contains(&"start id-drover-dev1-good-main".to_string()));
}

// ----- pass scheduling -------------------------------------------------------

/// Waits (in paused time) for the report that ends a pass of `generation`.
async fn done_for(events: &mut mpsc::Receiver<ReconcileEvent>, generation: u64) -> PassReport {
    loop {
        match events.recv().await.expect("the reconciler runs") {
            ReconcileEvent::Done(rep) if rep.generation == generation => return rep,
            _ => {}
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_desired_state_does_not_wait_out_the_event_debounce() {
    let rt = Arc::new(FakeRuntime::new(&[]));
    rt.images.lock().expect("lock").push("reg/web:1".into());
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let running = |generation| {
        desired(
            generation,
            vec![app(
                "web",
                RunState::Running,
                vec![spec("main", "reg/web:1")],
            )],
        )
    };
    let (desired_tx, desired_rx) = watch::channel(Some(Arc::new(running(1))));
    let (trigger_tx, trigger_rx) = mpsc::channel(1);
    let task = tokio::spawn(r.run(desired_rx, Duration::from_secs(3600), trigger_rx));
    done_for(&mut events, 1).await;

    // A Docker event (e.g. the destroy of a container just removed) starts
    // the debounce; a new desired state arrives while it runs.
    let t0 = tokio::time::Instant::now();
    trigger_tx.send(()).await.expect("the reconciler listens");
    tokio::time::sleep(DEBOUNCE / 4).await;
    desired_tx.send_replace(Some(Arc::new(desired(2, vec![]))));
    let rep = done_for(&mut events, 2).await;
    let took = t0.elapsed();
    assert!(rep.apps.is_empty(), "{:?}", rep.apps);
    assert!(
        took < DEBOUNCE,
        "the pass for generation 2 waited out the debounce: {took:?}"
    );
    assert!(
        rt.log
            .lock()
            .expect("lock")
            .contains(&"remove id-drover-dev1-web-main".to_string()),
        "{:?}",
        rt.log.lock().expect("lock")
    );
    drop(desired_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

#[test]
fn paused_apps_are_started_then_paused_and_unpaused_to_run() {
    let main = spec("main", "reg/web:1");
    let paused = desired(1, vec![app("web", RunState::Paused, vec![main.clone()])]);
    let steps = plan(&paused, &[]);
    assert_eq!(
        steps[2..],
        [
            Step::Start {
                app: name("web"),
                container: name("main"),
                id: None
            },
            Step::Pause {
                app: name("web"),
                container: name("main"),
                id: None
            },
        ]
    );
    // Running → pause; exited → start then pause; paused → nothing.
    assert_eq!(
        plan(&paused, &[actual("c1", "web", &main, "running")]),
        vec![Step::Pause {
            app: name("web"),
            container: name("main"),
            id: Some("c1".into())
        }]
    );
    assert_eq!(
        plan(&paused, &[actual("c1", "web", &main, "exited")]),
        vec![
            Step::Start {
                app: name("web"),
                container: name("main"),
                id: Some("c1".into())
            },
            Step::Pause {
                app: name("web"),
                container: name("main"),
                id: Some("c1".into())
            },
        ]
    );
    assert!(plan(&paused, &[actual("c1", "web", &main, "paused")]).is_empty());
    // Back to running: unpause. Stopped from paused: unpause, stop.
    let running = desired(2, vec![app("web", RunState::Running, vec![main.clone()])]);
    assert_eq!(
        plan(&running, &[actual("c1", "web", &main, "paused")]),
        vec![Step::Unpause {
            app: name("web"),
            container: name("main"),
            id: "c1".into()
        }]
    );
    let stopped = desired(3, vec![app("web", RunState::Stopped, vec![main.clone()])]);
    assert_eq!(
        plan(&stopped, &[actual("c1", "web", &main, "paused")]),
        vec![
            Step::Unpause {
                app: name("web"),
                container: name("main"),
                id: "c1".into()
            },
            Step::Stop {
                app: name("web"),
                container: name("main"),
                id: "c1".into()
            },
        ]
    );
    // The phase says paused only when every container is.
    let apps = observe(
        &paused,
        &[actual("c1", "web", &main, "paused")],
        &BTreeMap::new(),
        &HashSet::new(),
    );
    assert_eq!(apps[0].phase, AppPhase::Paused);
    let apps = observe(
        &paused,
        &[actual("c1", "web", &main, "running")],
        &BTreeMap::new(),
        &HashSet::new(),
    );
    assert_eq!(apps[0].phase, AppPhase::Starting);
}

#[test]
fn a_container_docker_keeps_restarting_fails_its_app() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    let with = |state: &str, restarts: u32, code: Option<i64>, health| ManagedContainer {
        restarts,
        exit_code: code,
        health,
        ..actual("c1", "web", &main, state)
    };
    let phase = |c: ManagedContainer| {
        let apps = observe(&d, &[c], &BTreeMap::new(), &HashSet::new());
        (
            apps[0].phase,
            apps[0].error.clone(),
            apps[0].containers[0].clone(),
        )
    };
    let (p, e, _) = phase(with("restarting", 4, Some(3), None));
    assert_eq!(p, AppPhase::Failed);
    let e = e.expect("an error");
    assert!(
        e.contains("crash-loops") && e.contains("4 times") && e.contains("exit code 3"),
        "{e}"
    );
    // Restarted twice: Docker may still recover it.
    assert_eq!(
        phase(with("restarting", 2, Some(3), None)).0,
        AppPhase::Starting
    );
    // Crashed long ago and running again: fine.
    assert_eq!(phase(with("running", 5, None, None)).0, AppPhase::Running);
    // Running but unhealthy stays running; the health field says it.
    let (p, e, c) = phase(with("running", 0, None, Some(Health::Unhealthy)));
    assert_eq!((p, e), (AppPhase::Running, None));
    assert_eq!((c.health, c.restarts), (Some(Health::Unhealthy), 0));
}

#[test]
fn the_release_reported_is_that_of_the_containers_found() {
    let v1 = spec("main", "reg/web:1");
    let v2 = spec("main", "reg/web:2");
    let mut d = desired(2, vec![app("web", RunState::Running, vec![v2.clone()])]);
    d.apps[0].release = 5;
    let none = HashSet::new();
    let old = observe(
        &d,
        &[actual("c1", "web", &v1, "running")],
        &BTreeMap::new(),
        &none,
    );
    assert_eq!(old[0].release, 0, "still the old spec's container");
    let new = observe(
        &d,
        &[actual("c2", "web", &v2, "running")],
        &BTreeMap::new(),
        &none,
    );
    assert_eq!(new[0].release, 5);
}

// ----- app networks and start order ------------------------------------------

fn bridge_net(app_: &str, id: &str) -> ManagedNetwork {
    ManagedNetwork {
        id: id.into(),
        name: format!("drover-dev1-{app_}"),
        app: name(app_),
    }
}

/// Two bridge-mode containers with no dependency between them: the
/// smallest app that wants a network.
fn pair() -> (ContainerSpec, ContainerSpec) {
    (spec("web", "reg/web:1"), spec("db", "reg/db:1"))
}

/// The containers a plan creates, and whether each joins its app network.
fn creates(steps: &[Step]) -> Vec<(&str, bool)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Create {
                spec, app_network, ..
            } => Some((spec.name.as_str(), *app_network)),
            _ => None,
        })
        .collect()
}

fn network_steps(steps: &[Step]) -> Vec<&Step> {
    steps
        .iter()
        .filter(|s| matches!(s, Step::CreateNetwork { .. } | Step::RemoveNetwork { .. }))
        .collect()
}

#[test]
fn an_app_network_is_created_before_the_containers_and_removed_after_them() {
    let (web, db) = pair();
    let d = desired(
        1,
        vec![app(
            "shop",
            RunState::Running,
            vec![web.clone(), db.clone()],
        )],
    );
    let steps = super::plan(&d, &[], &[]);
    let net = steps
        .iter()
        .position(|s| matches!(s, Step::CreateNetwork { app } if app == &name("shop")))
        .expect("the network is created");
    let create = steps
        .iter()
        .position(|s| matches!(s, Step::Create { .. }))
        .expect("create");
    assert!(net < create, "{steps:?}");

    // The app goes: its containers first, then its network.
    let gone = desired(2, vec![]);
    let steps = super::plan(
        &gone,
        &[
            actual("c1", "shop", &web, "running"),
            actual("c2", "shop", &db, "running"),
        ],
        &[bridge_net("shop", "net-shop")],
    );
    assert_eq!(
        steps.last(),
        Some(&Step::RemoveNetwork {
            app: name("shop"),
            id: "net-shop".into()
        })
    );
    assert_eq!(
        steps
            .iter()
            .filter(|s| matches!(s, Step::Remove { .. }))
            .count(),
        2
    );
    assert!(matches!(steps[steps.len() - 2], Step::Remove { .. }));

    // Host and none networking need no app network; a left-over one goes.
    let mut host = spec("main", "reg/web:1");
    host.network_mode = NetworkMode::Host;
    let mut none = spec("side", "reg/side:1");
    none.network_mode = NetworkMode::None;
    let d = desired(
        3,
        vec![app("web", RunState::Running, vec![host.clone(), none])],
    );
    assert!(network_steps(&super::plan(&d, &[], &[])).is_empty());
    let d = desired(3, vec![app("web", RunState::Running, vec![host.clone()])]);
    let mut on_host = actual("c1", "web", &host, "running");
    on_host.networks.clear();
    assert_eq!(
        super::plan(&d, &[on_host], &[bridge_net("web", "net-web")]),
        vec![Step::RemoveNetwork {
            app: name("web"),
            id: "net-web".into()
        }]
    );
}

#[test]
fn a_one_container_app_runs_on_the_default_bridge() {
    // New: no network, created with none.
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    let steps = super::plan(&d, &[], &[]);
    assert!(network_steps(&steps).is_empty(), "{steps:?}");
    assert_eq!(creates(&steps), vec![("main", false)]);

    // Running on Docker's default bridge (made by an agent older than app
    // networks, or by this one): kept as it is.
    let mut old = actual("c1", "web", &main, "running");
    old.networks = vec!["default-bridge".into()];
    assert_eq!(super::plan(&d, &[old], &[]), vec![]);

    // One bridge container beside host and none ones is still alone on
    // its bridge: no network either.
    let mut host = spec("agent", "reg/agent:1");
    host.network_mode = NetworkMode::Host;
    let mut none = spec("batch", "reg/batch:1");
    none.network_mode = NetworkMode::None;
    let d = desired(
        2,
        vec![app("web", RunState::Running, vec![main, host, none])],
    );
    let steps = super::plan(&d, &[], &[]);
    assert!(network_steps(&steps).is_empty(), "{steps:?}");
    assert_eq!(
        creates(&steps),
        vec![("main", false), ("agent", false), ("batch", false)]
    );
}

#[test]
fn two_bridge_containers_share_their_app_network() {
    let (web, db) = pair();
    let d = desired(
        1,
        vec![app(
            "shop",
            RunState::Running,
            vec![web.clone(), db.clone()],
        )],
    );
    let steps = super::plan(&d, &[], &[]);
    assert_eq!(
        network_steps(&steps),
        vec![&Step::CreateNetwork { app: name("shop") }]
    );
    assert_eq!(creates(&steps), vec![("web", true), ("db", true)]);

    // Both on it: nothing to do.
    let both = [
        actual("c1", "shop", &web, "running"),
        actual("c2", "shop", &db, "running"),
    ];
    assert_eq!(
        super::plan(&d, &both, &[bridge_net("shop", "net-shop")]),
        vec![]
    );
}

#[test]
fn a_bridge_container_off_its_app_network_is_replaced() {
    // Made before the app had a network: on Docker's default bridge.
    let (web, db) = pair();
    let d = desired(
        1,
        vec![app(
            "shop",
            RunState::Running,
            vec![web.clone(), db.clone()],
        )],
    );
    let mut old = actual("c1", "shop", &web, "running");
    old.networks = vec!["default-bridge".into()];
    let on_net = actual("c2", "shop", &db, "running");
    let steps = super::plan(&d, &[old.clone(), on_net.clone()], &[]);
    assert!(
        matches!(steps.as_slice(), [
            Step::Pull { .. },
            Step::Pull { .. },
            Step::Stop { id: s, .. },
            Step::Remove { id: r, .. },
            Step::Stop { .. },
            Step::Remove { .. },
            Step::CreateNetwork { .. },
            Step::Create { .. },
            Step::Create { .. },
            Step::Start { id: None, .. },
            Step::Start { id: None, .. },
        ] if s == "c1" && r == "c1"),
        "{steps:?}"
    );
    assert_eq!(creates(&steps), vec![("web", true), ("db", true)]);
    // The network is there: only the container off it is replaced.
    let steps = super::plan(
        &d,
        &[old, on_net.clone()],
        &[bridge_net("shop", "net-shop")],
    );
    assert_eq!(creates(&steps), vec![("web", true)]);
    assert!(network_steps(&steps).is_empty(), "{steps:?}");

    // A duplicate network of the same app is removed; the one the
    // containers are on stays.
    let ok = actual("c1", "shop", &web, "running");
    let steps = super::plan(
        &d,
        &[ok, on_net],
        &[
            bridge_net("shop", "net-shop"),
            bridge_net("shop", "net-zzz"),
        ],
    );
    assert_eq!(
        steps,
        vec![Step::RemoveNetwork {
            app: name("shop"),
            id: "net-zzz".into()
        }]
    );
}

#[test]
fn an_app_down_to_one_bridge_container_moves_it_off_its_network_then_drops_it() {
    let (web, db) = pair();
    let on_net = [
        actual("c-web", "shop", &web, "running"),
        actual("c-db", "shop", &db, "running"),
    ];
    let nets = [bridge_net("shop", "net-shop")];
    let d = desired(2, vec![app("shop", RunState::Running, vec![db.clone()])]);
    let stop = |c: &str, id: &str| Step::Stop {
        app: name("shop"),
        container: name(c),
        id: id.into(),
    };
    let remove = |c: &str, id: &str| Step::Remove {
        app: name("shop"),
        container: name(c),
        id: id.into(),
    };
    // db is replaced although its spec is the same: it is on the network,
    // which cannot go while anything is attached to it.
    assert_eq!(
        super::plan(&d, &on_net, &nets),
        vec![
            Step::Pull {
                app: name("shop"),
                container: name("db"),
                image: "reg/db:1".into()
            },
            stop("db", "c-db"),
            remove("db", "c-db"),
            stop("web", "c-web"),
            remove("web", "c-web"),
            Step::Create {
                app: name("shop"),
                spec: db.clone(),
                app_network: false
            },
            Step::Start {
                app: name("shop"),
                container: name("db"),
                id: None
            },
            Step::RemoveNetwork {
                app: name("shop"),
                id: "net-shop".into()
            },
        ]
    );
    // The same when the other container stays but leaves bridge mode.
    let mut web_host = web.clone();
    web_host.network_mode = NetworkMode::Host;
    let d = desired(
        3,
        vec![app("shop", RunState::Running, vec![web_host, db.clone()])],
    );
    let steps = super::plan(&d, &on_net, &nets);
    assert_eq!(creates(&steps), vec![("web", false), ("db", false)]);
    assert_eq!(
        steps.last(),
        Some(&Step::RemoveNetwork {
            app: name("shop"),
            id: "net-shop".into()
        })
    );

    // Once off it and the network gone, nothing more.
    let mut db_alone = actual("c-db2", "shop", &db, "running");
    db_alone.networks = vec!["default-bridge".into()];
    let d = desired(2, vec![app("shop", RunState::Running, vec![db])]);
    assert_eq!(super::plan(&d, &[db_alone], &[]), vec![]);
}

#[test]
fn an_app_up_to_two_bridge_containers_gets_a_network_and_moves_the_first_onto_it() {
    let (web, db) = pair();
    let mut alone = actual("c-db", "shop", &db, "running");
    alone.networks = vec!["default-bridge".into()];
    let d = desired(
        2,
        vec![app(
            "shop",
            RunState::Running,
            vec![web.clone(), db.clone()],
        )],
    );
    let steps = super::plan(&d, &[alone], &[]);
    assert!(
        matches!(steps.as_slice(), [
            Step::Pull { .. },
            Step::Pull { .. },
            Step::Stop { id: s, .. },
            Step::Remove { id: r, .. },
            Step::CreateNetwork { app },
            Step::Create { .. },
            Step::Create { .. },
            Step::Start { id: None, .. },
            Step::Start { id: None, .. },
        ] if s == "c-db" && r == "c-db" && app == &name("shop")),
        "{steps:?}"
    );
    assert_eq!(creates(&steps), vec![("web", true), ("db", true)]);
}

#[tokio::test]
async fn an_app_network_comes_with_a_second_container_and_goes_with_it() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1", "reg/db:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let (web, db) = pair();
    let attached = |rt: &FakeRuntime| {
        let mut a: Vec<(String, Vec<String>)> = rt
            .attached
            .lock()
            .expect("lock")
            .clone()
            .into_iter()
            .collect();
        a.sort();
        a
    };
    let one = desired(1, vec![app("shop", RunState::Running, vec![db.clone()])]);
    let report = r.pass(&one, &newer).await.expect("runs").expect("counted");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(rt.networks.lock().expect("lock").is_empty());
    assert_eq!(attached(&rt), vec![], "db is on the default bridge");

    // 1 → 2: the network, and both on it.
    let two = desired(
        2,
        vec![app("shop", RunState::Running, vec![web, db.clone()])],
    );
    let report = r.pass(&two, &newer).await.expect("runs").expect("counted");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let nets = rt.networks.lock().expect("lock").clone();
    assert_eq!(nets.len(), 1);
    let net = vec![nets[0].id.clone()];
    assert_eq!(
        attached(&rt),
        vec![
            ("id-drover-dev1-shop-db".into(), net.clone()),
            ("id-drover-dev1-shop-web".into(), net),
        ]
    );

    // 2 → 1: db off the network first (the fake, as Docker, refuses to
    // remove a network still in use), then the network goes.
    let back = desired(3, vec![app("shop", RunState::Running, vec![db])]);
    let report = r.pass(&back, &newer).await.expect("runs").expect("counted");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert!(rt.networks.lock().expect("lock").is_empty());
    assert_eq!(attached(&rt), vec![]);
    let containers = rt.containers.lock().expect("lock").clone();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].0, "id-drover-dev1-shop-db");
    assert_eq!(containers[0].2, "running");
    // Converged: a further pass does nothing.
    let before = rt.log.lock().expect("lock").len();
    r.pass(&back, &newer).await.expect("runs");
    assert_eq!(rt.log.lock().expect("lock").len(), before);
}

fn api_db() -> (ContainerSpec, ContainerSpec) {
    let mut api = spec("api", "reg/api:1");
    api.depends_on = vec![name("db")];
    (api, spec("db", "reg/db:1"))
}

#[test]
fn dependencies_are_created_first_and_dependents_wait_for_them() {
    // Listed dependent first: the start order puts db first anyway.
    let (api, db) = api_db();
    let d = desired(
        1,
        vec![app("web", RunState::Running, vec![api.clone(), db.clone()])],
    );
    let p = plan_with(&d, &[], &Settled::new());
    let created: Vec<&str> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Create { spec, .. } => Some(spec.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(created, vec!["db", "api"]);
    let started: Vec<&Name> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Start { container, .. } => Some(container),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![&name("db")], "api waits for db");
    assert_eq!(
        p.blocked,
        vec![Blocked {
            app: name("web"),
            container: name("api"),
            dependency: name("db"),
            state: DependencyState::NotRunning("absent".into()),
            bound: DEPENDENCY_WAIT_MIN,
        }]
    );

    // db runs but its health check has not passed: api still waits.
    let with_health = |h| ManagedContainer {
        health: h,
        ..actual("c-db", "web", &db, "running")
    };
    let api_created = actual("c-api", "web", &api, "created");
    let p = plan_with(
        &d,
        &[with_health(Some(Health::Starting)), api_created.clone()],
        &Settled::new(),
    );
    assert_eq!(p.steps, vec![]);
    assert_eq!(p.blocked[0].state, DependencyState::Starting);
    assert_eq!(
        p.blocked[0].bound,
        Duration::from_secs(240),
        "an image's check: Docker's defaults"
    );
    let p = plan_with(
        &d,
        &[with_health(Some(Health::Unhealthy)), api_created.clone()],
        &Settled::new(),
    );
    assert_eq!(p.blocked[0].state, DependencyState::Unhealthy);

    // Healthy (or no check at all): api starts.
    for h in [Some(Health::Healthy), None] {
        let p = plan_with(&d, &[with_health(h), api_created.clone()], &Settled::new());
        assert_eq!(
            p.steps,
            vec![Step::Start {
                app: name("web"),
                container: name("api"),
                id: Some("c-api".into())
            }]
        );
        assert!(p.blocked.is_empty());
    }

    // A stopped app waits for nothing: its containers are only created.
    let stopped = desired(2, vec![app("web", RunState::Stopped, vec![api, db])]);
    assert!(plan_with(&stopped, &[], &Settled::new()).blocked.is_empty());
}

#[test]
fn a_wait_is_bounded_by_the_dependency_health_check_and_fails_naming_it() {
    let (_, mut db) = api_db();
    assert_eq!(dependency_wait(&db, false), DEPENDENCY_WAIT_MIN);
    db.healthcheck = Some(drover_shared::model::HealthCheck {
        test: vec!["CMD-SHELL".into(), "true".into()],
        interval_ms: Some(10_000),
        timeout_ms: Some(5_000),
        retries: Some(5),
        start_period_ms: Some(30_000),
    });
    // 30 s start period, then 6 × (10 s + 5 s).
    assert_eq!(dependency_wait(&db, true), Duration::from_secs(120));
    let b = |state| Blocked {
        app: name("web"),
        container: name("api"),
        dependency: name("db"),
        state,
        bound: Duration::from_secs(120),
    };
    let starting = b(DependencyState::Starting);
    assert_eq!(judge_wait(&starting, Duration::from_secs(119)), None);
    let e = judge_wait(&starting, Duration::from_secs(120)).expect("failed");
    assert!(
        e.contains("container api") && e.contains("dependency db") && e.contains("120 s"),
        "{e}"
    );
    let e = judge_wait(&b(DependencyState::Unhealthy), Duration::ZERO).expect("at once");
    assert!(e.contains("db is unhealthy"), "{e}");
    let e = judge_wait(
        &b(DependencyState::NotRunning("exited".into())),
        Duration::from_secs(121),
    )
    .expect("failed");
    assert!(e.contains("not running (exited)"), "{e}");
}

#[tokio::test]
async fn an_app_runs_on_its_network_and_a_dependent_starts_once_its_dependency_runs() {
    let rt = Arc::new(FakeRuntime::new(&["reg/api:1", "reg/db:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let (api, db) = api_db();
    let d = desired(1, vec![app("web", RunState::Running, vec![api, db])]);
    let first = r.pass(&d, &newer).await.expect("runs").expect("counted");
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    assert!(first.retry_at.is_some(), "api waits: the pass comes back");
    assert_eq!(first.apps[0].phase, AppPhase::Starting);
    let nets = rt.networks.lock().expect("lock").clone();
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0].name, "drover-dev1-web");
    let attached = rt.attached.lock().expect("lock").clone();
    for c in ["id-drover-dev1-web-db", "id-drover-dev1-web-api"] {
        assert_eq!(attached.get(c), Some(&vec![nets[0].id.clone()]), "{c}");
    }
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec![
            "pull reg/db:1",
            "pull reg/api:1",
            "create drover-dev1-web-db",
            "create drover-dev1-web-api",
            "start id-drover-dev1-web-db",
        ]
    );

    // db runs now: the next pass starts api and the app converges.
    let second = r.pass(&d, &newer).await.expect("runs").expect("counted");
    assert_eq!(second.retry_at, None);
    assert_eq!(second.apps[0].phase, AppPhase::Running);
    assert_eq!(
        rt.log.lock().expect("lock").last().map(String::as_str),
        Some("start id-drover-dev1-web-api")
    );

    // The app goes: containers, then its network.
    r.pass(&desired(2, vec![]), &newer).await.expect("runs");
    assert!(rt.networks.lock().expect("lock").is_empty());
    assert!(rt.containers.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn an_unhealthy_dependency_fails_the_app_naming_it() {
    let rt = Arc::new(FakeRuntime::new(&["reg/api:1", "reg/db:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let (api, db) = api_db();
    let d = desired(1, vec![app("web", RunState::Running, vec![api, db])]);
    r.pass(&d, &newer).await.expect("runs");
    rt.health
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-db".into(), Health::Unhealthy);
    let report = r.pass(&d, &newer).await.expect("runs").expect("counted");
    assert_eq!(report.apps[0].phase, AppPhase::Failed);
    let e = report.failures.get(&name("web")).expect("a failure");
    assert!(e.contains("api") && e.contains("db is unhealthy"), "{e}");
    assert!(
        !rt.log
            .lock()
            .expect("lock")
            .contains(&"start id-drover-dev1-web-api".to_string()),
        "api never started"
    );
}

// ----- the previous release's image --------------------------------------

#[tokio::test]
async fn the_previous_release_image_is_kept_until_the_new_one_is_healthy() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1", "reg/web:2"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let v1 = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let report = r.pass(&v1, &newer).await.expect("runs").expect("counted");
    r.cleanup_images(&v1, &report.apps).await;

    // :2 has a health check that has not passed yet: :1 stays.
    let mut main2 = spec("main", "reg/web:2");
    main2.healthcheck = Some(drover_shared::model::HealthCheck {
        test: vec!["CMD".into(), "true".into()],
        interval_ms: None,
        timeout_ms: None,
        retries: None,
        start_period_ms: None,
    });
    let v2 = desired(2, vec![app("web", RunState::Running, vec![main2])]);
    let report = r.pass(&v2, &newer).await.expect("runs").expect("counted");
    rt.health
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-main".into(), Health::Starting);
    let report = {
        let mut apps = report.apps;
        apps[0].containers[0].health = Some(Health::Starting);
        apps
    };
    r.cleanup_images(&v2, &report).await;
    let rmi = |rt: &FakeRuntime| -> Vec<String> {
        rt.log
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.starts_with("rmi"))
            .cloned()
            .collect()
    };
    assert_eq!(rmi(&rt), Vec::<String>::new(), "held for a rollback");
    assert!(r.ledger.lock().await.images["reg/web:1"]
        .held_for
        .contains("web"));

    // Unhealthy: still held.
    rt.health
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-main".into(), Health::Unhealthy);
    let report = r.pass(&v2, &newer).await.expect("runs").expect("counted");
    r.cleanup_images(&v2, &report.apps).await;
    assert_eq!(rmi(&rt), Vec::<String>::new());

    // Healthy: the hold ends and :1 is an unused image like any other.
    rt.health
        .lock()
        .expect("lock")
        .insert("id-drover-dev1-web-main".into(), Health::Healthy);
    let report = r.pass(&v2, &newer).await.expect("runs").expect("counted");
    r.cleanup_images(&v2, &report.apps).await;
    assert_eq!(rmi(&rt), vec!["rmi reg/web:1"]);
    drain_events(&mut events);
}

/// An app whose `api` waits for `db`, restart requested at generation 5.
fn restarting_pair() -> (DesiredState, ContainerSpec, ContainerSpec) {
    let db = spec("db", "reg/db:1");
    let mut api = spec("api", "reg/api:1");
    api.depends_on = vec![name("db")];
    // Listed dependent first: the plan must follow start order, not the list.
    let mut a = app("web", RunState::Running, vec![api.clone(), db.clone()]);
    a.restarted_at = 5;
    (desired(5, vec![a]), db, api)
}

fn full_plan(d: &DesiredState, a: &[ManagedContainer], restarted: &Restarted) -> Plan {
    super::plan_with(d, a, &nets_for(d), &settled_as(d), restarted)
}

#[test]
fn a_due_restart_restarts_kept_containers_in_start_order() {
    let (d, db, api) = restarting_pair();
    let running = [
        actual("c-api", "web", &api, "running"),
        actual("c-db", "web", &db, "running"),
    ];
    let restart = |c: &str, id: &str| Step::Restart {
        app: name("web"),
        container: name(c),
        id: id.into(),
    };
    let p = full_plan(&d, &running, &Restarted::default());
    assert_eq!(p.steps, [restart("db", "c-db"), restart("api", "c-api")]);
    assert!(p.repairs.is_empty(), "an asked-for restart is not drift");
    // Done, per container or below the floor: nothing.
    let done = Restarted {
        done: [
            ((name("web"), name("db")), 5),
            ((name("web"), name("api")), 5),
        ]
        .into(),
        floor: 0,
    };
    assert!(full_plan(&d, &running, &done).steps.is_empty());
    let floor = Restarted {
        done: HashMap::new(),
        floor: 5,
    };
    assert!(full_plan(&d, &running, &floor).steps.is_empty());
    // One container done, the other not (a pass cut short): only that one.
    let half = Restarted {
        done: [((name("web"), name("db")), 5)].into(),
        floor: 4,
    };
    assert_eq!(
        full_plan(&d, &running, &half).steps,
        [restart("api", "c-api")]
    );
}

#[test]
fn a_restart_unpauses_a_paused_container_and_starts_an_exited_one() {
    let (d, db, api) = restarting_pair();
    let (db_, db_id) = (name("db"), "c-db".to_string());
    let p = full_plan(
        &d,
        &[
            actual("c-api", "web", &api, "exited"),
            actual("c-db", "web", &db, "paused"),
        ],
        &Restarted::default(),
    );
    assert_eq!(
        p.steps,
        [
            Step::Unpause {
                app: name("web"),
                container: db_.clone(),
                id: db_id.clone()
            },
            Step::Restart {
                app: name("web"),
                container: db_.clone(),
                id: db_id.clone()
            },
        ]
    );
    // Its dependency is paused when the pass looks: a later pass starts it.
    assert_eq!(p.blocked.len(), 1);
    assert_eq!(p.blocked[0].container, name("api"));
    let p = full_plan(
        &d,
        &[
            actual("c-api", "web", &api, "exited"),
            actual("c-db", "web", &db, "running"),
        ],
        &Restarted::default(),
    );
    assert_eq!(
        p.steps,
        [
            Step::Restart {
                app: name("web"),
                container: db_,
                id: db_id
            },
            Step::Start {
                app: name("web"),
                container: name("api"),
                id: Some("c-api".into())
            },
        ]
    );
}

#[test]
fn a_created_container_counts_as_restarted_and_a_stopped_app_is_not_restarted() {
    let (d, db, api) = restarting_pair();
    // db is gone: created and started; api is restarted after it.
    let p = full_plan(
        &d,
        &[actual("c-api", "web", &api, "running")],
        &Restarted::default(),
    );
    assert!(
        !p.steps
            .iter()
            .any(|s| matches!(s, Step::Restart { container, .. } if container.as_str() == "db")),
        "{:?}",
        p.steps
    );
    assert!(p.steps.contains(&Step::Restart {
        app: name("web"),
        container: name("api"),
        id: "c-api".into()
    }));
    let mut stopped = d.clone();
    stopped.apps[0].run = RunState::Stopped;
    let p = full_plan(
        &stopped,
        &[
            actual("c-api", "web", &api, "exited"),
            actual("c-db", "web", &db, "exited"),
        ],
        &Restarted::default(),
    );
    assert!(p.steps.is_empty(), "{:?}", p.steps);
}

fn restarts_in(rt: &FakeRuntime) -> Vec<String> {
    rt.log
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.starts_with("restart "))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_restart_is_carried_out_once_and_recorded() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let mut d = desired(
        1,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    let (_tx, newer) = watch::channel(None);
    r.pass(&d, &newer).await.expect("runs");
    assert!(restarts_in(&rt).is_empty(), "a deploy is no restart");
    d.generation = 2;
    d.apps[0].restarted_at = 2;
    let report = r.pass(&d, &newer).await.expect("runs").expect("done");
    assert!(report.failures.is_empty());
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert_eq!(restarts_in(&rt), ["restart id-drover-dev1-web-main"]);
    r.pass(&d, &newer).await.expect("runs");
    assert_eq!(restarts_in(&rt).len(), 1, "carried out once");
    // A later generation that keeps the mark (another app's deploy, a
    // release move) does not replay it.
    d.generation = 3;
    r.pass(&d, &newer).await.expect("runs");
    assert_eq!(restarts_in(&rt).len(), 1);
}

/// After an agent restart: a restart at or below the generation recorded
/// as applied was done; one above it (killed mid-restart) is done again.
#[tokio::test]
async fn after_an_agent_restart_an_unapplied_restart_is_done_again_and_an_applied_one_not() {
    let mut d = desired(
        4,
        vec![app(
            "web",
            RunState::Running,
            vec![spec("main", "reg/web:1")],
        )],
    );
    d.apps[0].restarted_at = 4;
    for (applied, applied_before, expect) in [(true, 4, 0), (false, 3, 1), (false, 0, 1)] {
        let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
        {
            // What the agent left running before it died.
            let (before, _e) = reconciler(Arc::clone(&rt));
            let (_tx, newer) = watch::channel(None);
            let mut older = d.clone();
            older.apps[0].restarted_at = 0;
            before.pass(&older, &newer).await.expect("runs");
        }
        rt.log.lock().expect("lock").clear();
        let (r, _events) = reconciler(Arc::clone(&rt));
        let r = r.restoring(&d, applied, applied_before);
        let (_tx, newer) = watch::channel(None);
        r.pass(&d, &newer).await.expect("runs");
        r.pass(&d, &newer).await.expect("runs");
        assert_eq!(
            restarts_in(&rt).len(),
            expect,
            "applied {applied}, applied before {applied_before}"
        );
    }
}
