//! The spine, end to end: real Docker Engine, real registry, real MQTT over
//! TCP, real redb. Container state is always checked through the Docker API
//! directly, never through Drover.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::json;

const OP_TIMEOUT: Duration = Duration::from_secs(90);

async fn container_running(docker: &bollard::Docker, name: &str) -> Option<bool> {
    match docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    {
        Ok(c) => Some(c.state.and_then(|s| s.running).unwrap_or(false)),
        Err(_) => None,
    }
}

async fn online_device(api: &Api, id: &str) -> serde_json::Value {
    wait_for(
        Duration::from_secs(30),
        &format!("device {id} online with inventory"),
        || async {
            api.device(id).await.filter(|d| {
                d["online"] == json!(true)
                    && d["inventory"]["docker_version"]
                        .as_str()
                        .is_some_and(|v| !v.is_empty())
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_stop_start_remove_on_real_docker() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("spine"));
    let api = &orch.api;

    // Online, with an inventory that describes this machine.
    let dev = online_device(api, &agent.id).await;
    let inv = &dev["inventory"];
    assert_eq!(inv["arch"], json!(std::env::consts::ARCH));
    assert!(inv["cpus"].as_u64().unwrap_or(0) >= 1, "{inv}");
    assert!(inv["memory_bytes"].as_u64().unwrap_or(0) > 0, "{inv}");
    assert!(
        !inv["hostname"].as_str().unwrap_or_default().is_empty(),
        "{inv}"
    );
    assert!(
        !inv["kernel"].as_str().unwrap_or_default().is_empty(),
        "{inv}"
    );

    // Heartbeat and host telemetry arrive.
    wait_for(
        Duration::from_secs(20),
        "heartbeat and telemetry",
        || async {
            let d = api.device(&agent.id).await?;
            (d["heartbeat"]["seq"].as_u64().is_some()
                && d["telemetry"]["host"]["memory_total_bytes"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0)
            .then_some(())
        },
    )
    .await;

    // A tag that exists only in the registry: the agent has to pull it.
    let tag = unique("t");
    let image = fresh_image(&tag).await;
    assert!(
        docker.inspect_image(&image).await.is_err(),
        "image must not be local before the deploy"
    );
    let app = unique("app");
    api.create_app(&app, &image).await;

    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert!(
        op["id"].as_str().is_some(),
        "deploy returns an operation id: {op}"
    );
    let done = api.wait_op(&op, OP_TIMEOUT).await;
    assert_eq!(done["status"], json!("succeeded"), "{done}");

    let name = agent.container_name(&app, "main");
    assert_eq!(
        container_running(&docker, &name).await,
        Some(true),
        "container {name} runs"
    );
    docker
        .inspect_image(&image)
        .await
        .expect("the agent pulled the image from the registry");
    let c = docker
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
        .expect("inspect");
    let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(
        labels.get("io.drover.managed").map(String::as_str),
        Some("true")
    );
    assert_eq!(labels.get("io.drover.device"), Some(&agent.id));

    // Observed state and per-container telemetry and logs reach the orchestrator.
    wait_for(
        Duration::from_secs(30),
        "observed running app, container telemetry and logs",
        || async {
            let d = api.device(&agent.id).await?;
            let running = d["observed"]["apps"]
                .as_array()?
                .iter()
                .any(|a| a["name"] == json!(app) && a["phase"] == json!("running"));
            let metrics = d["telemetry"]["containers"]
                .as_array()?
                .iter()
                .any(|c| c["app"] == json!(app));
            let (_, logs) = api
                .get(&format!("/api/v1/devices/{}/logs?app={app}", agent.id))
                .await;
            let ticks = logs
                .as_array()?
                .iter()
                .any(|l| l["line"].as_str().unwrap_or_default().contains("tick"));
            (running && metrics && ticks).then_some(())
        },
    )
    .await;

    // Stop: the container stays but does not run.
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps/{app}/stop", agent.id),
            &json!(null),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    assert_eq!(
        container_running(&docker, &name).await,
        Some(false),
        "stopped container {name}"
    );

    // Start again.
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps/{app}/start", agent.id),
            &json!(null),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    assert_eq!(
        container_running(&docker, &name).await,
        Some(true),
        "restarted container {name}"
    );

    // Remove: the container is gone.
    let (s, op) = api
        .delete(&format!("/api/v1/devices/{}/apps/{app}", agent.id))
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, OP_TIMEOUT).await["status"],
        json!("succeeded")
    );
    assert_eq!(
        container_running(&docker, &name).await,
        None,
        "container {name} removed"
    );

    // Generations: four changes, all applied.
    let d = api.device(&agent.id).await.expect("device");
    assert_eq!(
        (
            d["desired_generation"].as_u64(),
            d["applied_generation"].as_u64()
        ),
        (Some(4), Some(4)),
        "{d}"
    );

    let (s, _) = api.delete(&format!("/api/v1/apps/{app}")).await;
    assert_eq!(s, 204);
    untag(&image);
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_offline_through_last_will() {
    let orch = Orch::start().await;
    let mut agent = Agent::spawn(&orch.broker_url(), &unique("lwt"));
    online_device(&orch.api, &agent.id).await;
    agent.kill().await;
    let killed = std::time::Instant::now();
    // Keep-alive is 2 s; a killed process closes its socket at once, and the
    // broker publishes the Last Will. Allow 1.5 x keep-alive plus slack.
    wait_for(
        Duration::from_secs(6),
        "device offline after SIGKILL",
        || async {
            orch.api
                .device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(false))
        },
    )
    .await;
    eprintln!("offline {:?} after SIGKILL", killed.elapsed());

    // And back online when it restarts with the same identity.
    agent.start(&orch.broker_url());
    online_device(&orch.api, &agent.id).await;
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_fails_with_the_registry_error() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("missing"));
    online_device(&orch.api, &agent.id).await;
    let api = &orch.api;

    for (app, image) in [
        (
            unique("notag"),
            format!("{REGISTRY}/{BASE_REPO}:no-such-tag"),
        ),
        (
            unique("norepo"),
            format!("{REGISTRY}/drover/no-such-image:1"),
        ),
    ] {
        api.create_app(&app, &image).await;
        let (s, op) = api
            .post(
                &format!("/api/v1/devices/{}/apps", agent.id),
                &json!({"app": app}),
            )
            .await;
        assert_eq!(s, 202, "{op}");
        let done = api.wait_op(&op, OP_TIMEOUT).await;
        assert_eq!(done["status"], json!("failed"), "{done}");
        let detail = done["detail"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            detail.contains("manifest unknown") || detail.contains("not found"),
            "registry's error text expected: {detail}"
        );

        // The failure is also visible in the device's observed state.
        let d = api.device(&agent.id).await.expect("device");
        let a = d["observed"]["apps"]
            .as_array()
            .expect("apps")
            .iter()
            .find(|a| a["name"] == json!(app))
            .cloned()
            .expect("app status");
        assert_eq!(a["phase"], json!("failed"), "{a}");
        assert!(!a["error"].as_str().unwrap_or_default().is_empty(), "{a}");
        assert!(docker
            .inspect_container(
                &agent.container_name(&app, "main"),
                None::<InspectContainerOptions>
            )
            .await
            .is_err());
    }
    orch.stop().await;
}
