//! The `drover` CLI against a live orchestrator and agent: the commands the
//! README walkthrough uses, in both output formats, and their errors.

use std::time::Duration;

use drover_tests::*;
use serde_json::{json, Value};

async fn drover(api: &Api, args: &[&str]) -> (bool, String, String) {
    drover_cli(api, args, b"").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walkthrough_with_the_cli() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("cli"));
    let api = &orch.api;
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;

    let (ok, out, err) = drover(api, &["devices"]).await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("DEVICE") && out.contains(&agent.id) && out.contains("online"),
        "{out}"
    );
    let (ok, out, _) = drover(api, &["devices", "-o", "json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).expect("json output");
    assert!(v
        .as_array()
        .expect("array")
        .iter()
        .any(|d| d["id"] == json!(agent.id)));

    let image = fresh_image(&unique("cli")).await;
    let app = unique("cliapp");
    let (ok, out, err) = drover(
        api,
        &[
            "apps",
            "create",
            &app,
            "--image",
            &image,
            "-e",
            "GREETING=hi",
            "--memory-mb",
            "32",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("created app {app}")), "{out}");

    let (ok, out, err) = drover(
        api,
        &[
            "deploy",
            &app,
            "--device",
            &agent.id,
            "--wait",
            "--timeout",
            "90",
        ],
    )
    .await;
    assert!(ok, "deploy failed: {out} {err}");
    assert!(out.contains("succeeded"), "{out}");
    let name = agent.container_name(&app, "main");
    let c = docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("container exists");
    assert_eq!(c.state.and_then(|s| s.running), Some(true));
    let host = c.host_config.expect("host config");
    assert_eq!(host.memory, Some(32 * 1024 * 1024), "memory limit applied");
    let env = c.config.and_then(|c| c.env).unwrap_or_default();
    assert!(env.iter().any(|e| e == "GREETING=hi"), "{env:?}");

    let logs = wait_for(Duration::from_secs(20), "log lines via the CLI", || async {
        let (ok, out, _) = drover(api, &["logs", &app, "-d", &agent.id, "--tail", "5"]).await;
        (ok && out.contains("tick")).then_some(out)
    })
    .await;
    assert!(logs.lines().count() <= 5, "{logs}");

    let (ok, out, err) = drover(
        api,
        &["remove", &app, "-d", &agent.id, "--wait", "-o", "json"],
    )
    .await;
    assert!(ok, "{err}");
    let op: Value = serde_json::from_str(&out).expect("json op");
    assert_eq!(op["status"], json!("succeeded"));
    assert!(docker
        .inspect_container(
            &name,
            None::<bollard::query_parameters::InspectContainerOptions>
        )
        .await
        .is_err());

    // Errors: non-zero exit with the API's message.
    let (ok, _, err) = drover(api, &["deploy", "no-such-app", "-d", &agent.id]).await;
    assert!(!ok);
    assert!(err.contains("app no-such-app does not exist"), "{err}");
    let (ok, _, err) = drover(
        api,
        &[
            "apps",
            "create",
            "x",
            "--image",
            "busybox:1",
            "--port",
            "80",
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("--port \"80\" is not HOST:CONTAINER"), "{err}");
    let (ok, _, err) = drover(&Api::new("http://127.0.0.1:1".into()), &["devices"]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the Drover API"), "{err}");

    untag(&image);
    orch.stop().await;
}
