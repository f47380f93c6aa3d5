//! Restart through REST and the CLI, against a real orchestrator, a real
//! agent and real Docker; also with the agent SIGKILLed right after the
//! request. What happened to the container is read from Docker (inspect and
//! its event log), never from Drover.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(90);

/// (container id, running, StartedAt) as Docker reports it.
async fn inspect(docker: &bollard::Docker, name: &str) -> (String, bool, String) {
    let c = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .expect("the container exists");
    let st = c.state.expect("state");
    (
        c.id.unwrap_or_default(),
        st.running.unwrap_or(false),
        st.started_at.unwrap_or_default(),
    )
}

/// Docker's clock, as a Unix time in seconds for `docker events --since`.
async fn docker_now() -> String {
    docker_cli(&["info", "--format", "{{.SystemTime}}"]).await
}

/// How many times Docker restarted container `id` (`restart` events)
/// between `since` and now.
async fn docker_restarts(id: &str, since: &str) -> usize {
    let until = docker_now().await;
    let out = docker_cli(&[
        "events",
        "--since",
        since,
        "--until",
        &until,
        "--filter",
        &format!("container={id}"),
        "--filter",
        "event=restart",
        "--format",
        "{{.Action}}",
    ])
    .await;
    out.lines().filter(|l| l.trim() == "restart").count()
}

/// An orchestrator, an online agent and `app` deployed and running on it.
async fn deployed(prefix: &str) -> (Orch, Agent, String) {
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique(prefix));
    let api = &orch.api;
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let app = unique("rst");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, TIMEOUT).await["status"],
        json!("succeeded")
    );
    (orch, agent, app)
}

fn restart_path(device: &str, app: &str) -> String {
    format!("/api/v1/devices/{device}/apps/{app}/restart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_the_same_container_a_new_process() {
    let docker = docker().await;
    let (orch, agent, app) = deployed("restart").await;
    let api = &orch.api;
    let name = agent.container_name(&app, "main");
    let (id, running, started) = inspect(&docker, &name).await;
    assert!(running);
    let since = docker_now().await;

    let (s, op) = api.post(&restart_path(&agent.id, &app), &json!(null)).await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(op["op"], json!("restart"));
    let done = api.wait_op(&op, TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    let (id2, running, started2) = inspect(&docker, &name).await;
    assert_eq!(id2, id, "the same container");
    assert!(running);
    assert_ne!(started2, started, "a new process");
    assert_eq!(docker_restarts(&id, &since).await, 1);

    // The CLI follows the operation to its end, as for start and stop.
    let (ok, out, err) = drover_cli(api, &["restart", &app, "-d", &agent.id, "--wait"], b"").await;
    assert!(ok, "drover restart: {out} {err}");
    let (id3, running, started3) = inspect(&docker, &name).await;
    assert_eq!((id3.as_str(), running), (id.as_str(), true));
    assert_ne!(started3, started2);
    assert_eq!(docker_restarts(&id, &since).await, 2);

    // Nothing more happens on its own: the restart is carried out once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(docker_restarts(&id, &since).await, 2);
    assert_eq!(inspect(&docker, &name).await.2, started3);

    // Refusals name what is wrong and change nothing.
    let other = unique("absent");
    api.create_app(&other, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let cases: [(String, u16, &str); 4] = [
        (
            restart_path(&agent.id, &other),
            409,
            "is not deployed on device",
        ),
        (restart_path(&agent.id, "no-such-app"), 409, "not deployed"),
        (restart_path("no-such-device", &app), 404, "no-such-device"),
        (restart_path(&agent.id, "Bad*Name"), 400, "app"),
    ];
    for (path, status, says) in cases {
        let (s, v) = api.post(&path, &json!(null)).await;
        assert_eq!(s, status, "{path}: {v}");
        assert!(v.to_string().contains(says), "{path}: {v}");
    }
    let viewer = api.as_role("watcher", "viewer").await;
    let (s, v) = viewer
        .post(&restart_path(&agent.id, &app), &json!(null))
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps/{app}/stop", agent.id),
            &json!(null),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    api.wait_op(&op, TIMEOUT).await;
    let (s, v) = api.post(&restart_path(&agent.id, &app), &json!(null)).await;
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("is stopped"), "{v}");
    assert!(!inspect(&docker, &name).await.1, "still stopped");
    assert_eq!(docker_restarts(&id, &since).await, 2);

    // Audited with its own name and the actor.
    let (s, audit) = api.get("/api/v1/audit").await;
    assert_eq!(s, 200, "{audit}");
    let restarts: Vec<&Value> = audit
        .as_array()
        .or_else(|| audit["entries"].as_array())
        .expect("audit entries")
        .iter()
        .filter(|e| e["command"] == json!("restart") && e["outcome"] == json!("ok"))
        .collect();
    assert_eq!(restarts.len(), 2, "{audit}");
    assert!(
        restarts.iter().all(|e| e["actor"] != json!("watcher")),
        "{audit}"
    );
}

/// The agent is SIGKILLed right after the request and started again: the
/// app ends restarted once or twice (killed mid-restart, it cannot know it
/// was done), never zero times, and the operation ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_right_after_a_restart_request_restarts_the_app_at_least_once() {
    let docker = docker().await;
    let (orch, mut agent, app) = deployed("rstkill").await;
    let api = &orch.api;
    let name = agent.container_name(&app, "main");
    let (id, _, started) = inspect(&docker, &name).await;
    let since = docker_now().await;
    let (s, op) = api.post(&restart_path(&agent.id, &app), &json!(null)).await;
    assert_eq!(s, 202, "{op}");
    agent.kill().await;
    agent.start(&orch.broker_url());
    let done = api.wait_op(&op, TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    let (id2, running, started2) = inspect(&docker, &name).await;
    assert_eq!(id2, id, "the same container");
    assert!(running);
    assert_ne!(started2, started);
    // Let any pass of the restarted agent run before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = docker_restarts(&id, &since).await;
    eprintln!("restarted {n} time(s) around the agent's SIGKILL");
    assert!((1..=2).contains(&n), "restarted {n} times");
}

/// A rule's `restart` action restarts the app through the same command:
/// a telemetry rule that holds at once, with a long cooldown, restarts the
/// running container exactly once, audited as the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_restarts_an_app_once_per_cooldown() {
    let docker = docker().await;
    let (orch, agent, app) = deployed("rrst").await;
    let api = &orch.api;
    let name = agent.container_name(&app, "main");
    let (id, _, started) = inspect(&docker, &name).await;
    let since = docker_now().await;
    let rule = unique("restarter");
    let (s, v) = api
        .post(
            "/api/v1/rules",
            &json!({
                "name": rule,
                "trigger": {"type": "telemetry", "for_secs": 0},
                "selector": "",
                "condition": "telemetry.host.cpu_percent >= 0.0",
                "actions": [{"type": "restart", "app": app}],
                "cooldown_secs": 3600,
            }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    wait_for(TIMEOUT, "the rule restarted the container", || async {
        let (_, _, now) = inspect(&docker, &name).await;
        (now != started).then_some(())
    })
    .await;
    let (id2, running, _) = inspect(&docker, &name).await;
    assert_eq!(
        (id2.as_str(), running),
        (id.as_str(), true),
        "same container, running"
    );
    // More telemetry arrives meanwhile; the cooldown holds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(docker_restarts(&id, &since).await, 1);
    let (_, firings) = api.get(&format!("/api/v1/rules/{rule}/firings")).await;
    let f = &firings.as_array().expect("firings")[0];
    assert_eq!(f["outcome"], json!("ok"), "{firings}");
    assert_eq!(f["actions"][0]["action"], json!("restart"), "{firings}");
    let (_, audit) = api.get("/api/v1/audit?limit=200").await;
    assert!(
        audit
            .as_array()
            .expect("audit")
            .iter()
            .any(|e| e["actor"] == json!(format!("rule:{rule}"))
                && e["command"] == json!("restart")
                && e["outcome"] == json!("ok")),
        "{audit}"
    );
    orch.stop().await;
}
