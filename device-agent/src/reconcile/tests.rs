//! Planner tests, and executor tests against a fake runtime. The fake is for
//! unit tests only.

use std::collections::HashMap;
use std::sync::Mutex;

use drover_shared::model::{AppSpec, DesiredApp};

use super::*;

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
    }
}

fn app(name_: &str, run: RunState, containers: Vec<ContainerSpec>) -> DesiredApp {
    DesiredApp { spec: AppSpec { name: name(name_), containers, labels: Default::default() }, run }
}

fn desired(generation: u64, apps: Vec<DesiredApp>) -> DesiredState {
    DesiredState { generation, apps }
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
    }
}

#[test]
fn new_app_is_pulled_created_and_started() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    assert_eq!(
        plan(&d, &[]),
        vec![
            Step::Pull { app: name("web"), container: name("main"), image: "reg/web:1".into() },
            Step::Create { app: name("web"), spec: main },
            Step::Start { app: name("web"), container: name("main"), id: None },
        ]
    );
}

#[test]
fn new_app_desired_stopped_is_created_but_not_started() {
    let d = desired(1, vec![app("web", RunState::Stopped, vec![spec("main", "reg/web:1")])]);
    let p = plan(&d, &[]);
    assert_eq!(p.len(), 2);
    assert!(!p.iter().any(|s| matches!(s, Step::Start { .. })));
}

#[test]
fn converged_state_plans_nothing() {
    let main = spec("main", "reg/web:1");
    let side = spec("side", "reg/side:2");
    let d = desired(3, vec![
        app("web", RunState::Running, vec![main.clone(), side.clone()]),
        app("batch", RunState::Stopped, vec![spec("job", "reg/job:1")]),
    ]);
    let job = spec("job", "reg/job:1");
    let a = vec![actual("1", "web", &main, "running"), actual("2", "web", &side, "running"), actual("3", "batch", &job, "exited")];
    assert_eq!(plan(&d, &a), vec![]);
}

#[test]
fn stopped_app_is_stopped() {
    let main = spec("main", "reg/web:1");
    let d = desired(2, vec![app("web", RunState::Stopped, vec![main.clone()])]);
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "running")]),
        vec![Step::Stop { app: name("web"), container: name("main"), id: "c1".into() }]
    );
}

#[test]
fn removed_app_is_stopped_and_removed() {
    let main = spec("main", "reg/web:1");
    let d = desired(2, vec![]);
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "running")]),
        vec![
            Step::Stop { app: name("web"), container: name("main"), id: "c1".into() },
            Step::Remove { app: name("web"), container: name("main"), id: "c1".into() },
        ]
    );
    // Already stopped: removal only.
    assert_eq!(
        plan(&d, &[actual("c1", "web", &main, "exited")]),
        vec![Step::Remove { app: name("web"), container: name("main"), id: "c1".into() }]
    );
}

#[test]
fn container_dropped_from_an_app_is_removed() {
    let main = spec("main", "reg/web:1");
    let old = spec("old", "reg/old:1");
    let d = desired(2, vec![app("web", RunState::Running, vec![main.clone()])]);
    let p = plan(&d, &[actual("c1", "web", &main, "running"), actual("c2", "web", &old, "exited")]);
    assert_eq!(p, vec![Step::Remove { app: name("web"), container: name("old"), id: "c2".into() }]);
}

#[test]
fn changed_spec_is_pulled_first_then_replaced() {
    let v1 = spec("main", "reg/web:1");
    let v2 = spec("main", "reg/web:2");
    let d = desired(2, vec![app("web", RunState::Running, vec![v2.clone()])]);
    assert_eq!(
        plan(&d, &[actual("old", "web", &v1, "running")]),
        vec![
            Step::Pull { app: name("web"), container: name("main"), image: "reg/web:2".into() },
            Step::Stop { app: name("web"), container: name("main"), id: "old".into() },
            Step::Remove { app: name("web"), container: name("main"), id: "old".into() },
            Step::Create { app: name("web"), spec: v2 },
            Step::Start { app: name("web"), container: name("main"), id: None },
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
    assert!(p.contains(&Step::Remove { app: name("web"), container: name("main"), id: "old".into() }));
}

#[test]
fn exited_container_desired_running_is_started() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    for state in ["exited", "created"] {
        assert_eq!(
            plan(&d, &[actual("c1", "web", &main, state)]),
            vec![Step::Start { app: name("web"), container: name("main"), id: Some("c1".into()) }],
            "{state}"
        );
    }
}

#[test]
fn duplicates_are_removed_keeping_a_running_one() {
    let main = spec("main", "reg/web:1");
    let d = desired(1, vec![app("web", RunState::Running, vec![main.clone()])]);
    let p = plan(&d, &[actual("a", "web", &main, "exited"), actual("b", "web", &main, "running")]);
    assert_eq!(p, vec![Step::Remove { app: name("web"), container: name("main"), id: "a".into() }]);
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
    let d = desired(1, vec![
        app("web", RunState::Running, vec![main.clone()]),
        app("gone", RunState::Running, vec![spec("x", "reg/x:1")]),
        app("idle", RunState::Stopped, vec![spec("y", "reg/y:1")]),
    ]);
    let errors = BTreeMap::from([(name("gone"), "manifest unknown".to_string())]);
    let apps = observe(&d, &[actual("c1", "web", &main, "running")], &errors, &HashSet::new());
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
        let c = cs.iter_mut().find(|c| c.0 == id).ok_or_else(|| RuntimeError::Docker(format!("No such container: {id}")))?;
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
            .filter_map(|(id, labels, state)| ManagedContainer::from_labels(&me, id, labels, "img", state, None))
            .collect())
    }
    async fn image_present(&self, image: &ImageRef) -> Result<bool, RuntimeError> {
        Ok(self.images.lock().expect("lock").contains(&image.to_string()))
    }
    async fn pull(&self, image: &ImageRef, progress: &mut (dyn FnMut(PullProgress) + Send)) -> Result<(), RuntimeError> {
        self.log(format!("pull {image}"));
        if !self.pullable.contains(&image.to_string()) {
            return Err(RuntimeError::Docker(format!("manifest for {image} not found: manifest unknown")));
        }
        progress(PullProgress { current: 5, total: 10 });
        self.images.lock().expect("lock").push(image.to_string());
        Ok(())
    }
    async fn create(&self, name: &str, _spec: &ContainerSpec, labels: HashMap<String, String>) -> Result<String, RuntimeError> {
        self.log(format!("create {name}"));
        let id = format!("id-{name}");
        self.containers.lock().expect("lock").push((id.clone(), labels, "created".into()));
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
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("remove {id}"));
        self.containers.lock().expect("lock").retain(|c| c.0 != id);
        Ok(())
    }
}

fn reconciler(rt: Arc<FakeRuntime>) -> (Reconciler<FakeRuntime>, mpsc::Receiver<ReconcileEvent>) {
    let (tx, rx) = mpsc::channel(64);
    (Reconciler::new(rt, DeviceId::new("dev1").expect("valid"), tx), rx)
}

#[tokio::test]
async fn a_pass_converges_and_a_second_pass_does_nothing() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, mut events) = reconciler(Arc::clone(&rt));
    let d = desired(1, vec![app("web", RunState::Running, vec![spec("main", "reg/web:1")])]);
    let (_tx, newer) = watch::channel(None);
    let report = r.pass(&d, &newer).await.expect("runs").expect("not superseded");
    assert_eq!(report.failure, None);
    assert_eq!(report.apps[0].phase, AppPhase::Running);
    assert_eq!(
        *rt.log.lock().expect("lock"),
        vec!["pull reg/web:1", "create drover-dev1-web-main", "start id-drover-dev1-web-main"]
    );
    let mut saw_pull_progress = false;
    while let Ok(ev) = events.try_recv() {
        if let ReconcileEvent::Progress { progress, .. } = ev {
            saw_pull_progress |= progress.step == "pulling" && progress.total_bytes == Some(10);
        }
    }
    assert!(saw_pull_progress);

    rt.log.lock().expect("lock").clear();
    let again = r.pass(&d, &newer).await.expect("runs").expect("not superseded");
    assert_eq!(again.apps, report.apps);
    assert!(rt.log.lock().expect("lock").is_empty(), "nothing done twice");
}

#[tokio::test]
async fn a_failed_pull_is_a_definitive_failure_with_the_registry_text() {
    let rt = Arc::new(FakeRuntime::new(&[]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let d = desired(4, vec![app("web", RunState::Running, vec![spec("main", "reg/web:nope")])]);
    let (_tx, newer) = watch::channel(None);
    let report = r.pass(&d, &newer).await.expect("runs").expect("not superseded");
    assert_eq!(report.generation, 4);
    assert_eq!(report.failure.as_deref(), Some("manifest for reg/web:nope not found: manifest unknown"));
    assert_eq!(report.apps[0].phase, AppPhase::Failed);
    assert_eq!(*rt.log.lock().expect("lock"), vec!["pull reg/web:nope"], "nothing created after a failed pull");
}

#[tokio::test]
async fn a_failed_pull_keeps_the_old_version_running() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let (_tx, newer) = watch::channel(None);
    let v1 = desired(1, vec![app("web", RunState::Running, vec![spec("main", "reg/web:1")])]);
    r.pass(&v1, &newer).await.expect("runs");
    let v2 = desired(2, vec![app("web", RunState::Running, vec![spec("main", "reg/web:2")])]);
    let report = r.pass(&v2, &newer).await.expect("runs").expect("not superseded");
    assert!(report.failure.is_some());
    assert_eq!(report.apps[0].containers[0].state, "running");
}

#[tokio::test]
async fn a_newer_desired_state_aborts_the_pass() {
    let rt = Arc::new(FakeRuntime::new(&["reg/web:1"]));
    let (r, _events) = reconciler(Arc::clone(&rt));
    let d = desired(1, vec![app("web", RunState::Running, vec![spec("main", "reg/web:1")])]);
    let (tx, newer) = watch::channel(None);
    tx.send_replace(Some(Arc::new(desired(2, vec![]))));
    assert_eq!(r.pass(&d, &newer).await.expect("runs"), None);
}
