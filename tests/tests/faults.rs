//! Reconciliation that survives every fault: a SIGKILLed orchestrator, an
//! agent killed mid-pull, a partition, containers changed behind the
//! agent's back, a registry that goes away. Each case checks the result
//! through the Docker API (exactly the desired containers, no duplicates)
//! and that every operation ended (succeeded, failed or superseded). The
//! time to converge is printed for the notes.

use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};

const CONVERGE: Duration = Duration::from_secs(120);

async fn online(api: &Api, id: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("device {id} online"),
        || async {
            api.device(id)
                .await
                .filter(|d| d["online"] == json!(true) && d["inventory"].is_object())
        },
    )
    .await;
}

async fn request(api: &Api, path: &str, body: &Value) -> Value {
    let (s, op) = api.post(path, body).await;
    assert_eq!(s, 202, "POST {path}: {op}");
    op
}

async fn deploy(api: &Api, device: &str, app: &str) -> Value {
    request(
        api,
        &format!("/api/v1/devices/{device}/apps"),
        &json!({"app": app}),
    )
    .await
}

async fn op_status(api: &Api, op: &Value) -> String {
    let (_, v) = api
        .get(&format!(
            "/api/v1/operations/{}",
            op["id"].as_str().expect("op id")
        ))
        .await;
    v["status"].as_str().unwrap_or_default().to_string()
}

fn find<'a>(ops: &'a [Value], op: &Value) -> &'a Value {
    ops.iter()
        .find(|o| o["id"] == op["id"])
        .unwrap_or_else(|| panic!("operation {} missing from {ops:?}", op["id"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_sigkilled_mid_deploy_converges_after_restart() {
    let docker = docker().await;
    let mut orch = OrchProc::start().await;
    let agents: Vec<Agent> = (0..3)
        .map(|i| Agent::spawn(&orch.broker_url(), &unique(&format!("okill{i}"))))
        .collect();
    for a in &agents {
        online(&orch.api, &a.id).await;
    }
    let image = fresh_image(&unique("okill")).await;
    let app = unique("okapp");
    orch.api.create_app(&app, &image).await;

    // Deploy to all three in quick succession, then SIGKILL as soon as the
    // requests are accepted: stored, maybe published, surely not finished.
    let mut ops = Vec::new();
    for a in &agents {
        ops.push(deploy(&orch.api, &a.id, &app).await);
    }
    orch.kill().await;
    let killed = Instant::now();
    orch.restart().await;
    eprintln!("orchestrator back {:?} after SIGKILL", killed.elapsed());

    for (a, op) in agents.iter().zip(&ops) {
        wait_converged(&orch.api, &docker, &a.id, CONVERGE).await;
        let all = wait_all_ops_final(&orch.api, &a.id, CONVERGE).await;
        assert_eq!(find(&all, op)["status"], json!("succeeded"), "{all:?}");
        eprintln!(
            "{} converged, every operation final, {:?} after the SIGKILL",
            a.id,
            killed.elapsed()
        );
    }
    untag(&image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_mid_pull_converges_without_duplicates() {
    let docker = docker().await;
    let registry = PrivateRegistry::start().await;
    // A 48 MiB random layer on top of the test image, so the pull takes a while.
    let image = registry
        .push_big(&format!("drover/big:{}", unique("t")), 48)
        .await;
    let orch = Orch::start().await;
    let mut agent = Agent::spawn(&orch.broker_url(), &unique("pullkill"));
    online(&orch.api, &agent.id).await;
    let app = unique("bigapp");
    orch.api.create_app(&app, &image).await;

    let op = deploy(&orch.api, &agent.id, &app).await;
    wait_for(
        Duration::from_secs(60),
        "deploy in progress (pulling)",
        || async {
            let s = op_status(&orch.api, &op).await;
            assert!(
                !matches!(s.as_str(), "succeeded" | "failed" | "superseded"),
                "operation ended before the kill: {s}"
            );
            (s == "in_progress").then_some(())
        },
    )
    .await;
    agent.kill().await;
    let killed = Instant::now();
    let pulled = docker.inspect_image(&image).await.is_ok();
    eprintln!("agent SIGKILLed mid-pull (image complete locally at kill time: {pulled})");
    agent.start(&orch.broker_url());

    let took = wait_converged(&orch.api, &docker, &agent.id, CONVERGE).await;
    let all = wait_all_ops_final(&orch.api, &agent.id, CONVERGE).await;
    assert_eq!(find(&all, &op)["status"], json!("succeeded"), "{all:?}");
    eprintln!(
        "converged {:?} after the restart ({:?} after the SIGKILL)",
        took,
        killed.elapsed()
    );
    let (_, events) = orch
        .api
        .get(&format!("/api/v1/devices/{}/events", agent.id))
        .await;
    eprintln!("device events after the restart: {events}");
    // A deploy cut short is finished, not mistaken for drift: the container
    // never existed, so nothing was "removed".
    let drift = events
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["kind"] == json!("drift_repaired"));
    assert!(
        !drift,
        "no drift_repaired after a deploy cut short: {events}"
    );
    untag(&image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_agent_ends_on_the_latest_desired_state() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let proxy = Proxy::start(orch.mqtt_port).await;
    let agent = Agent::spawn(&proxy.url(), &unique("part"));
    let api = &orch.api;
    online(api, &agent.id).await;
    let image = fresh_image(&unique("part")).await;
    let (a, b) = (unique("parta"), unique("partb"));
    api.create_app(&a, &image).await;
    api.create_app(&b, &image).await;
    let first = deploy(api, &agent.id, &a).await;
    assert_eq!(
        api.wait_op(&first, CONVERGE).await["status"],
        json!("succeeded")
    );
    let name_a = agent.container_name(&a, "main");
    let started_before = device_containers(&docker, &agent.id)
        .await
        .into_iter()
        .find(|c| c.name == name_a)
        .expect("A runs")
        .started_at;

    // Partition; the broker notices and publishes the Last Will.
    proxy.cut();
    wait_for(
        Duration::from_secs(15),
        "device offline behind the partition",
        || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(false))
        },
    )
    .await;
    // The desired state changes three times while the device cannot hear.
    let stop_a = request(
        api,
        &format!("/api/v1/devices/{}/apps/{a}/stop", agent.id),
        &json!(null),
    )
    .await;
    let start_a = request(
        api,
        &format!("/api/v1/devices/{}/apps/{a}/start", agent.id),
        &json!(null),
    )
    .await;
    let deploy_b = deploy(api, &agent.id, &b).await;
    for op in [&stop_a, &start_a, &deploy_b] {
        let s = op_status(api, op).await;
        assert!(
            matches!(s.as_str(), "pending" | "sent"),
            "nothing can have happened behind the partition: {s}"
        );
    }

    proxy.heal();
    let healed = Instant::now();
    let took = wait_converged(api, &docker, &agent.id, CONVERGE).await;
    let all = wait_all_ops_final(api, &agent.id, CONVERGE).await;
    eprintln!(
        "converged {took:?} after the partition healed; every operation final after {:?}",
        healed.elapsed()
    );

    // The latest change succeeded. The start is intermediate: its effect is
    // in the final state, but generation 4 replaced generation 3 before the
    // device finished it, so the agent answers superseded (the orchestrator's
    // level-triggered settling, without that ack, would say succeeded).
    assert_eq!(
        find(&all, &deploy_b)["status"],
        json!("succeeded"),
        "{all:?}"
    );
    let start_status = find(&all, &start_a)["status"].clone();
    assert!(
        start_status == json!("superseded") || start_status == json!("succeeded"),
        "{all:?}"
    );
    // The stop was overtaken by the start. If A never stopped, the device
    // never applied it: it must be superseded, never succeeded. If the queued
    // command did reach the device first, A was stopped and started again
    // and the stop may have finished (succeeded) or been overtaken.
    let started_after = device_containers(&docker, &agent.id)
        .await
        .into_iter()
        .find(|c| c.name == name_a)
        .expect("A runs")
        .started_at;
    let stop_status = find(&all, &stop_a)["status"].clone();
    eprintln!(
        "intermediate stop: {stop_status}, start: {start_status}; A restarted in between: {}",
        started_after != started_before
    );
    if started_after == started_before {
        assert_eq!(stop_status, json!("superseded"), "{all:?}");
    } else {
        assert!(
            stop_status == json!("superseded") || stop_status == json!("succeeded"),
            "{all:?}"
        );
    }
    let d = api.device(&agent.id).await.expect("device");
    assert_eq!(d["desired_generation"], json!(4), "{d}");
    untag(&image);
}

/// One app with a container per kind of tampering.
async fn four_container_app(api: &Api, image: &str) -> String {
    let app = unique("drift");
    let containers: Vec<Value> = ["killed", "removed", "stopped", "restarted"]
        .iter()
        .map(|n| json!({"name": n, "image": image}))
        .collect();
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": containers}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_killed_removed_or_restarted_by_hand_are_restored() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("drift"));
    let api = &orch.api;
    online(api, &agent.id).await;
    let image = fresh_image(&unique("drift")).await;
    let app = four_container_app(api, &image).await;
    let op = deploy(api, &agent.id, &app).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );
    wait_converged(api, &docker, &agent.id, CONVERGE).await;
    let before = device_containers(&docker, &agent.id).await;
    let id_of = |seen: &[SeenContainer], c: &str| {
        seen.iter()
            .find(|s| s.container == c)
            .map(|s| s.id.clone())
            .expect("container")
    };

    // Behind the agent's back; the Docker daemon itself is shared and stays up,
    // so its restart is simulated on the managed containers.
    docker_cli(&["kill", &agent.container_name(&app, "killed")]).await;
    docker_cli(&["rm", "-f", &agent.container_name(&app, "removed")]).await;
    docker_cli(&["stop", "-t", "1", &agent.container_name(&app, "stopped")]).await;
    docker_cli(&[
        "restart",
        "-t",
        "1",
        &agent.container_name(&app, "restarted"),
    ])
    .await;
    let tampered = Instant::now();

    let took = wait_converged(api, &docker, &agent.id, CONVERGE).await;
    eprintln!("drift repaired in {took:?} (reconcile interval 5 s)");
    let after = device_containers(&docker, &agent.id).await;
    // Stopped containers are started in place; only the removed one is new.
    for c in ["killed", "stopped", "restarted"] {
        assert_eq!(
            id_of(&before, c),
            id_of(&after, c),
            "{c} restarted in place, not recreated"
        );
    }
    assert_ne!(
        id_of(&before, "removed"),
        id_of(&after, "removed"),
        "the removed container was recreated"
    );
    let all = wait_all_ops_final(api, &agent.id, CONVERGE).await;
    assert_eq!(all.len(), 1, "drift repair is not an operation: {all:?}");
    eprintln!(
        "every operation final {:?} after the tampering",
        tampered.elapsed()
    );
    untag(&image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_repair_is_reported_as_an_event() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("drev"));
    let api = &orch.api;
    online(api, &agent.id).await;
    let image = fresh_image(&unique("drev")).await;
    let app = unique("drevapp");
    api.create_app(&app, &image).await;
    let op = deploy(api, &agent.id, &app).await;
    assert_eq!(
        api.wait_op(&op, CONVERGE).await["status"],
        json!("succeeded")
    );

    docker_cli(&["rm", "-f", &agent.container_name(&app, "main")]).await;
    let took = wait_converged(api, &docker, &agent.id, CONVERGE).await;
    eprintln!("removed container recreated in {took:?}");
    let ev = wait_for(
        Duration::from_secs(20),
        "a drift_repaired event for the app",
        || async {
            let (s, v) = api
                .get(&format!("/api/v1/devices/{}/events", agent.id))
                .await;
            assert_eq!(s, 200, "{v}");
            v.as_array()?
                .iter()
                .find(|e| e["kind"] == json!("drift_repaired") && e["app"] == json!(app))
                .cloned()
        },
    )
    .await;
    assert_eq!(ev["container"], json!("main"), "{ev}");
    assert!(
        !ev["detail"].as_str().unwrap_or_default().is_empty(),
        "{ev}"
    );
    untag(&image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_during_deploy_retries_then_converges() {
    let docker = docker().await;
    let mut registry = PrivateRegistry::start().await;
    let image = registry
        .push_base(&format!("drover/busybox:{}", unique("t")))
        .await;
    registry.stop().await;

    let orch = Orch::start().await;
    let agent = Agent::spawn_with(
        &orch.broker_url(),
        &unique("regdown"),
        &["--pull-retry-base-ms", "200", "--pull-retry-max-ms", "2000"],
    );
    let api = &orch.api;
    online(api, &agent.id).await;
    let app = unique("regapp");
    api.create_app(&app, &image).await;
    let op = deploy(api, &agent.id, &app).await;

    // Retrying, with the registry's (or the connection's) error, and the
    // operation still open, over several attempts.
    let status = wait_for(
        Duration::from_secs(60),
        "app retrying after several failed pulls",
        || async {
            let s = op_status(api, &op).await;
            assert!(
                !matches!(s.as_str(), "succeeded" | "failed" | "superseded"),
                "operation ended while the registry is down: {s}"
            );
            let d = api.device(&agent.id).await?;
            let a = d["observed"]["apps"]
                .as_array()?
                .iter()
                .find(|a| a["name"] == json!(app))?
                .clone();
            (a["phase"] == json!("retrying") && a["attempts"].as_u64().unwrap_or(0) >= 3)
                .then_some(a)
        },
    )
    .await;
    assert!(
        !status["error"].as_str().unwrap_or_default().is_empty(),
        "retrying shows the error: {status}"
    );
    eprintln!("retrying: {status}");

    registry.start_again().await;
    let back = Instant::now();
    let done = api.wait_op(&op, CONVERGE).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    let took = wait_converged(api, &docker, &agent.id, CONVERGE).await;
    wait_all_ops_final(api, &agent.id, CONVERGE).await;
    eprintln!(
        "converged {:?} after the registry came back",
        back.elapsed().max(took)
    );
    untag(&image);
}
