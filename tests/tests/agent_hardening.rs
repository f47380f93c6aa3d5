//! The agent under hostile conditions on the real Docker Engine: a second
//! agent on the same state directory, a state directory it cannot write,
//! Docker going away, an app that cannot be deployed next to ones that
//! can, log collection across restarts, and a restart with no broker.

use std::time::Duration;

use drover_tests::agent_lab::*;
use drover_tests::*;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_dir_is_refused() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("lock");
    let mut first = LabAgent::new(&orch.broker_url(), &id, state.path()).enrolling_with(api);
    first.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let mut second = LabAgent::new(&orch.broker_url(), &id, state.path());
    second.start(StateDirMode::Writable).await;
    let status = second.exited(Duration::from_secs(20)).await;
    assert!(!status.success(), "the second agent must fail: {status}");
    let text = second.log_text();
    assert!(
        text.contains("is in use by another drover-agent"),
        "the refusal says why: {text}"
    );
    assert!(
        !text.contains("connected to broker") && !text.contains("ConnAck"),
        "refused before connecting anywhere: {text}"
    );

    // The first keeps its session: still running, still online, and its
    // heartbeats keep coming.
    assert!(first.running(), "the first agent keeps running");
    let seq = |d: &serde_json::Value| d["heartbeat"]["seq"].as_u64().unwrap_or(0);
    let before = seq(&api.device(&id).await.expect("device"));
    wait_for(
        Duration::from_secs(15),
        "heartbeats after the refusal",
        || async {
            let d = api.device(&id).await?;
            (d["online"] == json!(true) && seq(&d) > before + 2).then_some(())
        },
    )
    .await;
    assert!(
        !first.log_text().contains("in use by another"),
        "the first agent was not disturbed"
    );
}

async fn deploy(api: &Api, device: &str, app: &str) -> serde_json::Value {
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{device}/apps"),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "deploy {app}: {op}");
    op
}

/// A desired state published straight on the device's topic (the broker is
/// open), as any MQTT client could: an image reference Docker refuses
/// ("invalid reference format") must fail its own app, visibly, and never
/// stop the app beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_reference_docker_refuses_fails_its_app_alone() {
    use drover_shared::model::DesiredState;
    use drover_shared::payload::Desired;
    use drover_shared::topic::{TopicKind, Topics};

    let docker = docker().await;
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("badref");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path());
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let image = fresh_image(&unique("goodref")).await;
    let desired: DesiredState = serde_json::from_value(json!({
        "generation": 1,
        "apps": [
            {"spec": {"name": "bad", "containers": [{"name": "main", "image": "a:b:c"}]},
             "run": "running", "started_at": 1},
            {"spec": {"name": "good", "containers": [{"name": "main", "image": image}]},
             "run": "running", "started_at": 1},
        ]
    }))
    .expect("desired state");
    let device = drover_shared::DeviceId::new(id.clone()).expect("device id");
    let topic = Topics::default().device(&device, TopicKind::Desired);
    mosquitto_pub(
        orch.mqtt_port,
        &topic,
        &drover_shared::encode(&Desired { state: desired }),
        true,
    )
    .await;

    let view = wait_for(
        CONVERGE,
        "generation 1 applied, bad failed, good running",
        || async {
            let d = api.device(&id).await?;
            let bad = observed_app(&d, "bad")?;
            let good = observed_app(&d, "good")?;
            (d["applied_generation"] == json!(1)
                && bad["phase"] == json!("failed")
                && good["phase"] == json!("running"))
            .then_some(d)
        },
    )
    .await;
    let bad = observed_app(&view, "bad").expect("bad app");
    assert!(
        bad["error"]
            .as_str()
            // The agent's own check of the reference (the distribution
            // grammar) or Docker's, whichever refuses it first.
            .is_some_and(|e| e.contains("invalid reference format")
                || e.contains("not a valid image reference")),
        "the observed state carries Docker's error: {bad}"
    );
    let seen = device_containers(&docker, &id).await;
    assert!(
        seen.iter().any(|c| c.app == "good" && c.running),
        "Docker runs the good app: {seen:?}"
    );
    assert!(
        !seen.iter().any(|c| c.app == "bad"),
        "nothing was created for the bad app: {seen:?}"
    );
    untag(&image);
}

/// Through the REST API: an app whose image the registry does not have
/// fails its operation; a later operation for another app on the same
/// device (whose desired state still holds the failing app) succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_app_does_not_fail_later_operations_on_other_apps() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("oneapp");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path()).enrolling_with(api);
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let missing = format!("{REGISTRY}/{BASE_REPO}:{}", unique("absent"));
    let (bad, good) = (unique("bad"), unique("good"));
    api.create_app(&bad, &missing).await;
    let image = fresh_image(&unique("good")).await;
    api.create_app(&good, &image).await;
    let bad_op = deploy(api, &id, &bad).await;
    let done = api.wait_op(&bad_op, CONVERGE).await;
    assert_eq!(done["status"], json!("failed"), "{done}");
    let good_op = deploy(api, &id, &good).await;
    let done = api.wait_op(&good_op, CONVERGE).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    let seen = device_containers(&docker, &id).await;
    assert!(seen.iter().any(|c| c.app == good && c.running), "{seen:?}");
    untag(&image);
}

/// Every line the API holds for the container, oldest first.
async fn api_log_lines(api: &Api, device: &str, app: &str) -> Vec<String> {
    let (s, v) = api
        .get(&format!(
            "/api/v1/devices/{device}/logs?app={app}&container=main&tail=2000"
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["line"].as_str().map(String::from))
        .collect()
}

/// Every line Docker holds for the container, over all its runs.
async fn docker_log_lines(container: &str) -> Vec<String> {
    docker_cli(&["logs", container])
        .await
        .lines()
        .map(String::from)
        .collect()
}

/// Log collection follows Docker's own positions: across an agent restart
/// (lines written while no agent ran) and a container restart (the stream
/// ends and is re-attached), the orchestrator holds exactly Docker's
/// lines, in order, none twice and none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_survive_agent_and_container_restarts_exactly_once() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("logpos");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path()).enrolling_with(api);
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let image = fresh_image(&unique("logpos")).await;
    let app = unique("counter");
    // A run id per container start, then a counter: every line is unique.
    let script = "r=$(cut -c1-8 /proc/sys/kernel/random/uuid); i=0; \
                  while true; do i=$((i+1)); echo \"$r $i\"; sleep 0.05; done";
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": [
                {"name": "main", "image": image, "command": ["sh", "-c", script]}
            ]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let op = deploy(api, &id, &app).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    let container = format!("drover-{id}-{app}-main");
    wait_for(Duration::from_secs(30), "first lines collected", || async {
        (api_log_lines(api, &id, &app).await.len() >= 20).then_some(())
    })
    .await;

    // The agent stops; the container keeps writing.
    agent.stop().await;
    let at_stop = docker_log_lines(&container).await.len();
    wait_for(
        Duration::from_secs(30),
        "lines written with no agent",
        || async { (docker_log_lines(&container).await.len() >= at_stop + 40).then_some(()) },
    )
    .await;
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    let first_run = docker_log_lines(&container).await[0]
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string();

    // The container restarts: its stream ends and is attached again.
    docker_cli(&["restart", "-t", "1", &container]).await;
    let lines = wait_for(CONVERGE, "lines of the container's second run", || async {
        let lines = api_log_lines(api, &id, &app).await;
        lines
            .iter()
            .filter(|l| !l.starts_with(&first_run))
            .nth(10)
            .is_some()
            .then_some(lines)
    })
    .await;
    let docker_lines = docker_log_lines(&container).await;
    assert!(
        docker_lines.len() >= lines.len(),
        "the API has more lines than Docker: duplicates ({} > {})",
        lines.len(),
        docker_lines.len()
    );
    let first_diff = lines.iter().zip(&docker_lines).position(|(a, b)| a != b);
    assert_eq!(
        first_diff,
        None,
        "the API's lines differ from Docker's at {first_diff:?}: api {:?} docker {:?}",
        first_diff.map(|i| &lines[i.saturating_sub(2)..(i + 3).min(lines.len())]),
        first_diff.map(|i| &docker_lines[i.saturating_sub(2)..(i + 3).min(docker_lines.len())]),
    );
    assert!(
        lines.len() > at_stop + 40,
        "the lines written while the agent was stopped were collected"
    );
    untag(&image);
}

/// The agent's own `.tmp` files in its state directory.
fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("state dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp") || n == ".write-probe")
        .collect()
}

/// A state directory the agent cannot write: it starts anyway, applies
/// deploys from memory and says it cannot store them (event and state
/// report); a restart with no broker then finds an older stored state than
/// what runs and leaves the running containers alone instead of rolling
/// the device back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_dir_is_reported_and_never_rolls_the_device_back() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let proxy = Proxy::start(orch.mqtt_port).await;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("rostate");
    let mut agent = LabAgent::new(&proxy.url(), &id, state.path()).enrolling_with(api);
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    let image = fresh_image(&unique("rostate")).await;
    let (first, second) = (unique("first"), unique("second"));
    api.create_app(&first, &image).await;
    api.create_app(&second, &image).await;
    let op = deploy(api, &id, &first).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    let stored = std::fs::read(state.path().join("desired.cbor")).expect("stored state");

    // Restarted on a read-only state directory: it runs and says so.
    agent.stop().await;
    agent.start(StateDirMode::ReadOnly).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    assert!(agent.running(), "a read-only state directory is not fatal");
    let ev = wait_event(
        api,
        &id,
        "persistence_failed",
        Duration::from_secs(30),
        |d| d.contains("Read-only file system"),
    )
    .await;
    assert!(
        ev["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("held in memory"),
        "{ev}"
    );

    // A deploy is applied from memory; the device's state says it is not stored.
    let op = deploy(api, &id, &second).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    let view = wait_for(
        Duration::from_secs(30),
        "storage_error in the state report",
        || async {
            let d = api.device(&id).await?;
            (d["applied_generation"] == json!(2) && d["observed"]["storage_error"].is_string())
                .then_some(d)
        },
    )
    .await;
    assert!(
        view["observed"]["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("desired.cbor") && e.contains("Read-only")),
        "{}",
        view["observed"]
    );
    assert_eq!(
        std::fs::read(state.path().join("desired.cbor")).expect("stored state"),
        stored,
        "the stored state is the older one"
    );
    assert_eq!(temp_files(state.path()), Vec::<String>::new());
    let before: Vec<(String, String)> = device_containers(&docker, &id)
        .await
        .into_iter()
        .map(|c| (c.app, c.id))
        .collect();
    assert_eq!(before.len(), 2, "{before:?}");

    // Killed and restarted with no broker: the stored generation 1 is older
    // than the running generation-2 container, so nothing is rolled back.
    agent.kill().await;
    proxy.cut();
    agent.start(StateDirMode::ReadOnly).await;
    wait_for(
        Duration::from_secs(30),
        "the refusal in the agent's log",
        || async {
            agent
                .log_text()
                .contains("did not restore the local desired state")
                .then_some(())
        },
    )
    .await;
    let after: Vec<(String, String)> = device_containers(&docker, &id)
        .await
        .into_iter()
        .map(|c| (c.app, c.id))
        .collect();
    assert_eq!(after, before, "the running containers were left alone");
    assert!(
        device_containers(&docker, &id)
            .await
            .iter()
            .all(|c| c.running),
        "still running"
    );

    // The broker is back: the refusal is reported and the device is on
    // the orchestrator's state.
    proxy.heal();
    let ev = wait_event(api, &id, "restore_refused", Duration::from_secs(60), |_| {
        true
    })
    .await;
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains("generation 1") && d.contains("generation 2")),
        "{ev}"
    );
    wait_converged(api, &docker, &id, CONVERGE).await;
    let after: Vec<(String, String)> = device_containers(&docker, &id)
        .await
        .into_iter()
        .map(|c| (c.app, c.id))
        .collect();
    assert_eq!(after, before, "converged without recreating anything");
    untag(&image);
}

/// Docker going away (the agent's own connection to the daemon is cut by a
/// socket proxy; the daemon itself is shared and never stopped) is
/// reported as an event, in the state report and in the inventory; a
/// waiting operation carries the reason; recovery is reported and the
/// inventory refreshed, and the inventory lists images as they are pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_loss_and_recovery_are_reported() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let proxy = DockerProxy::start().await;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("dockerloss");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path())
        .enrolling_with(api)
        .env("DOCKER_HOST", &proxy.docker_host());
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let (one, two) = (unique("one"), unique("two"));
    let image = fresh_image(&unique("dockerloss")).await;
    api.create_app(&one, &image).await;
    api.create_app(&two, &image).await;
    let op = deploy(api, &id, &one).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    // The image pulled after the connect is in the inventory without a reconnect.
    wait_for(
        Duration::from_secs(30),
        "the pulled image in the inventory",
        || async {
            let d = api.device(&id).await?;
            d["inventory"]["images"]
                .as_array()?
                .iter()
                .any(|i| i == &json!(image))
                .then_some(())
        },
    )
    .await;

    proxy.cut();
    wait_event(
        api,
        &id,
        "docker_unreachable",
        Duration::from_secs(30),
        |d| d.contains("docker is not reachable"),
    )
    .await;
    let op = deploy(api, &id, &two).await;
    let waiting = wait_for(
        Duration::from_secs(30),
        "the operation says what it waits for",
        || async {
            let (_, v) = api
                .get(&format!("/api/v1/operations/{}", op["id"].as_str()?))
                .await;
            (v["status"] == json!("in_progress")
                && v["detail"].as_str()?.contains("waiting for docker"))
            .then_some(v)
        },
    )
    .await;
    eprintln!("while docker is away: {waiting}");
    let d = wait_for(
        Duration::from_secs(30),
        "docker_error in state and inventory",
        || async {
            let d = api.device(&id).await?;
            (d["observed"]["docker_error"].is_string()
                && d["inventory"]["docker_error"].is_string())
            .then_some(d)
        },
    )
    .await;
    assert_eq!(d["online"], json!(true), "the device itself is still there");

    proxy.heal();
    wait_event(
        api,
        &id,
        "docker_reachable",
        Duration::from_secs(30),
        |_| true,
    )
    .await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    wait_for(
        Duration::from_secs(30),
        "docker_error cleared everywhere",
        || async {
            let d = api.device(&id).await?;
            (d["observed"]["docker_error"].is_null()
                && d["inventory"].is_object()
                && d["inventory"]["docker_error"].is_null())
            .then_some(())
        },
    )
    .await;
    wait_converged(api, &docker, &id, CONVERGE).await;
    untag(&image);
}

/// An agent restarted while no broker is reachable brings its apps back
/// from its local desired state, checked through Docker, and says what it
/// did once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_with_no_broker_restores_its_apps() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let proxy = Proxy::start(orch.mqtt_port).await;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("nobroker");
    let mut agent = LabAgent::new(&proxy.url(), &id, state.path()).enrolling_with(api);
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    let image = fresh_image(&unique("nobroker")).await;
    let app = unique("keep");
    api.create_app(&app, &image).await;
    let op = deploy(api, &id, &app).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );

    // The agent dies and its containers are lost with it (as after a
    // reboot that wiped them); the broker is unreachable when it returns.
    agent.kill().await;
    remove_device_containers(&id);
    assert!(device_containers(&docker, &id).await.is_empty());
    proxy.cut();
    let connects_before = agent.log_text().matches("connected to broker").count();
    let started = std::time::Instant::now();
    agent.start(StateDirMode::Writable).await;
    let seen = wait_for(
        CONVERGE,
        "the app running again, with no broker",
        || async {
            let seen = device_containers(&docker, &id).await;
            (seen.len() == 1 && seen[0].running && seen[0].app == app).then_some(seen)
        },
    )
    .await;
    eprintln!("restored with no broker in {:?}", started.elapsed());
    assert_eq!(seen[0].image, image);
    assert_eq!(
        agent.log_text().matches("connected to broker").count(),
        connects_before,
        "restored before any broker connection"
    );

    proxy.heal();
    let ev = wait_event(
        api,
        &id,
        "restored_from_local_state",
        Duration::from_secs(60),
        |_| true,
    )
    .await;
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("created {app}/main"))),
        "the event says what the restore did: {ev}"
    );
    wait_converged(api, &docker, &id, CONVERGE).await;
    untag(&image);
}

/// A full state directory: the agent starts, applies a deploy from memory,
/// reports "No space left on device", and leaves no (zero-byte) temporary
/// file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_is_reported_and_leaves_no_temporary_files() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("fullstate");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path()).enrolling_with(api);
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    let image = fresh_image(&unique("fullstate")).await;
    let (first, second) = (unique("first"), unique("second"));
    api.create_app(&first, &image).await;
    api.create_app(&second, &image).await;
    let op = deploy(api, &id, &first).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );

    agent.stop().await;
    agent.start(StateDirMode::Full).await;
    wait_online(api, &id, Duration::from_secs(30)).await;
    let view = agent.agent_view();
    assert!(
        view.join(".fill").exists(),
        "the agent runs on the full copy: {}",
        view.display()
    );
    let op = deploy(api, &id, &second).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    wait_event(
        api,
        &id,
        "persistence_failed",
        Duration::from_secs(30),
        |d| d.contains("No space left on device"),
    )
    .await;
    let d = wait_for(
        Duration::from_secs(30),
        "storage_error in the state report",
        || async {
            let d = api.device(&id).await?;
            d["observed"]["storage_error"].is_string().then_some(d)
        },
    )
    .await;
    assert_eq!(d["applied_generation"], json!(2), "applied from memory");
    assert!(agent.running());
    assert_eq!(
        temp_files(&view),
        Vec::<String>::new(),
        "no temporary file left on the full file system"
    );
    let stored = std::fs::read(view.join("desired.cbor")).expect("stored state");

    // Space comes back: the agent notices by itself, stores what it holds
    // and says so.
    std::fs::remove_file(view.join(".fill")).expect("free the space");
    wait_event(
        api,
        &id,
        "persistence_recovered",
        Duration::from_secs(60),
        |d| d.contains("generation 2"),
    )
    .await;
    wait_for(Duration::from_secs(30), "storage_error cleared", || async {
        let d = api.device(&id).await?;
        d["observed"]["storage_error"].is_null().then_some(())
    })
    .await;
    assert_ne!(
        std::fs::read(view.join("desired.cbor")).expect("stored state"),
        stored,
        "the newer state is stored now"
    );
    untag(&image);
}
