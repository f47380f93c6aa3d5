//! Pause and unpause through REST and the CLI, against a real orchestrator,
//! a real agent and real Docker. The container is checked through the
//! Docker API, never through Drover.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

/// (container id, paused, running) as Docker reports it.
async fn docker_state(docker: &bollard::Docker, name: &str) -> (String, bool, bool) {
    let c = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .expect("the container exists");
    let st = c.state.expect("state");
    (
        c.id.unwrap_or_default(),
        st.paused.unwrap_or(false),
        st.running.unwrap_or(false),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_container_and_unpause_thaws_the_same_one() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("pause"));
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let app = unique("frz");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let base = format!("/api/v1/devices/{}/apps/{app}", agent.id);
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
    let name = agent.container_name(&app, "main");
    let (id, paused, running) = docker_state(&docker, &name).await;
    assert!(running && !paused);

    // Unpausing what is not paused is refused, and changes nothing.
    let (s, v) = api.post(&format!("{base}/unpause"), &json!(null)).await;
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("not paused"), "{v}");

    // Pause through REST: Docker holds the same container, frozen.
    let (s, op) = api.post(&format!("{base}/pause"), &json!(null)).await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(op["op"], json!("pause"));
    assert_eq!(
        api.wait_op(&op, TIMEOUT).await["status"],
        json!("succeeded")
    );
    assert_eq!(docker_state(&docker, &name).await, (id.clone(), true, true));
    let d = api.device(&agent.id).await.expect("device");
    let phase = d["observed"]["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == json!(app)))
        .map(|x| x["phase"].clone());
    assert_eq!(phase, Some(json!("paused")), "{d}");

    // Unpause through the CLI, which follows the operation to its end.
    let (ok, out, err) = drover_cli(api, &["unpause", &app, "-d", &agent.id, "--wait"], b"").await;
    assert!(ok, "drover unpause: {out} {err}");
    assert_eq!(docker_state(&docker, &name).await, (id, false, true));

    // A viewer may not pause.
    let viewer = api.as_role("watcher", "viewer").await;
    let (s, v) = viewer.post(&format!("{base}/pause"), &json!(null)).await;
    assert_eq!(s, 403, "{v}");
}
