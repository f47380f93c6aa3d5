//! Health checks, crash loops and pausing on the real Docker Engine, with
//! the desired state published straight on the device's topic and the
//! result read back from Docker itself.

use std::time::Duration;

use drover_tests::agent_lab::*;
use drover_tests::*;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_crash_loops_and_pause_reach_docker() {
    let docker = docker().await;
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("health");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path());
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let image = fresh_image(&unique("health")).await;
    let apps = |run: &str, generation: u64| {
        json!({
            "generation": generation,
            "apps": [
                {"spec": {"name": "hc", "containers": [{
                    "name": "main", "image": image,
                    "command": ["sh", "-c", "touch /tmp/ok; exec sleep 3600"],
                    "healthcheck": {"test": ["CMD-SHELL", "test -f /tmp/ok"],
                                    "interval_ms": 300, "timeout_ms": 2000, "retries": 2}
                 }]},
                 "run": run, "started_at": 1, "release": 7},
                {"spec": {"name": "crash", "containers": [{
                    "name": "main", "image": image, "restart": "always",
                    "command": ["sh", "-c", "exit 3"]
                 }]},
                 "run": "running", "started_at": 1},
            ]
        })
    };
    publish_desired(&orch, &id, apps("running", 1)).await;

    let hc_name = format!("drover-{id}-hc-main");
    let crash_name = format!("drover-{id}-crash-main");
    let view = wait_for(CONVERGE, "hc healthy, crash failed", || async {
        let d = api.device(&id).await?;
        let hc = observed_app(&d, "hc")?;
        let crash = observed_app(&d, "crash")?;
        (hc["phase"] == json!("running")
            && hc["containers"][0]["health"] == json!("healthy")
            && crash["phase"] == json!("failed"))
        .then_some(d)
    })
    .await;
    let hc = observed_app(&view, "hc").expect("hc");
    assert_eq!(hc["release"], json!(7), "the release is echoed: {hc}");
    let crash = observed_app(&view, "crash").expect("crash");
    let error = crash["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("crash-loops") && error.contains("exit code 3"),
        "the error says it crash-loops, with the exit code: {crash}"
    );

    // Docker's own view: the health check as given, in nanoseconds, and
    // healthy; the crashing container restarted at least three times.
    let i = docker
        .inspect_container(&hc_name, None)
        .await
        .expect("inspect hc");
    let hcfg = i
        .config
        .as_ref()
        .and_then(|c| c.healthcheck.clone())
        .expect("a health check");
    assert_eq!(
        hcfg.test,
        Some(vec!["CMD-SHELL".to_string(), "test -f /tmp/ok".to_string()])
    );
    assert_eq!(hcfg.interval, Some(300_000_000));
    assert_eq!(hcfg.timeout, Some(2_000_000_000));
    assert_eq!(hcfg.retries, Some(2));
    let health = i
        .state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status);
    assert_eq!(health, Some(bollard::models::HealthStatusEnum::HEALTHY));
    let c = docker
        .inspect_container(&crash_name, None)
        .await
        .expect("inspect crash");
    assert!(
        c.restart_count.unwrap_or(0) >= 3,
        "restarts: {:?}",
        c.restart_count
    );
    assert!(
        crash["containers"][0]["restarts"].as_u64().unwrap_or(0) >= 3,
        "restarts are reported: {crash}"
    );

    // Paused: Docker holds the same container paused, and the phase says so.
    let hc_id = i.id.clone().expect("id");
    publish_desired(&orch, &id, apps("paused", 2)).await;
    wait_for(CONVERGE, "hc paused", || async {
        let d = api.device(&id).await?;
        (observed_app(&d, "hc")?["phase"] == json!("paused")).then_some(())
    })
    .await;
    let p = docker
        .inspect_container(&hc_name, None)
        .await
        .expect("inspect");
    assert_eq!(p.id.as_deref(), Some(hc_id.as_str()), "not recreated");
    assert_eq!(p.state.as_ref().and_then(|s| s.paused), Some(true));

    // Running again: unpaused, still the same container.
    publish_desired(&orch, &id, apps("running", 3)).await;
    wait_for(CONVERGE, "hc running again", || async {
        let d = api.device(&id).await?;
        (d["applied_generation"] == json!(3)
            && observed_app(&d, "hc")?["phase"] == json!("running"))
        .then_some(())
    })
    .await;
    let r = docker
        .inspect_container(&hc_name, None)
        .await
        .expect("inspect");
    assert_eq!(r.id.as_deref(), Some(hc_id.as_str()), "not recreated");
    let st = r.state.expect("state");
    assert_eq!((st.paused, st.running), (Some(false), Some(true)));
    agent.stop().await;
}
