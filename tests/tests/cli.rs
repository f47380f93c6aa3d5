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

/// Milliseconds since the Unix epoch, the clock operations are stamped with
/// (the orchestrator runs in this process).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs a `--wait` command with `-o json` and returns the final operation
/// and how long after its last update the command had returned.
async fn wait_json(api: &Api, args: &[&str]) -> (Value, u64) {
    let mut all = args.to_vec();
    all.extend(["--wait", "--timeout", "90", "-o", "json"]);
    let (ok, out, err) = drover(api, &all).await;
    let returned = now_ms();
    assert!(ok, "{args:?} failed: {out} {err}");
    let op: Value = serde_json::from_str(&out).expect("json op");
    let updated = op["updated_at_ms"].as_u64().expect("updated_at_ms");
    (op, returned.saturating_sub(updated))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_returns_as_soon_as_the_operation_ends() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("wait"));
    let api = &orch.api;
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let app = unique("waitapp");
    api.create_app(&app, &base_image_local().await).await;

    let (op, late) = wait_json(api, &["deploy", &app, "-d", &agent.id]).await;
    assert_eq!(op["status"], json!("succeeded"), "{op}");
    let c = docker
        .inspect_container(
            &agent.container_name(&app, "main"),
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("the container exists when --wait returns");
    assert_eq!(c.state.and_then(|s| s.running), Some(true));
    // Polling every 250 ms, the CLI returned on average 125 ms and up to
    // 250 ms after the outcome; following the change stream, it is the
    // time to pass one event and exit (a few ms, tens on a busy machine).
    assert!(
        late < 250,
        "deploy --wait returned {late} ms after the operation ended"
    );

    let (op, late) = wait_json(api, &["remove", &app, "-d", &agent.id]).await;
    assert_eq!(op["status"], json!("succeeded"), "{op}");
    assert!(
        late < 250,
        "remove --wait returned {late} ms after the operation ended"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_on_a_failing_deploy_exits_non_zero_with_the_reason() {
    let orch = Orch::start().await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("waitfail"));
    let api = &orch.api;
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    let app = unique("waitfail");
    // A repository the registry does not have: a refusal, not a retry.
    let image = format!("{REGISTRY}/drover/{}:1", unique("missing"));
    api.create_app(&app, &image).await;
    let (ok, out, err) = drover(
        api,
        &["deploy", &app, "-d", &agent.id, "--wait", "--timeout", "90"],
    )
    .await;
    assert!(!ok, "a failed deploy must fail the command: {out}");
    assert!(out.contains("failed"), "the table shows the outcome: {out}");
    assert!(
        err.contains(&format!("deploy of {app} on {} failed:", agent.id))
            && err.contains("manifest unknown"),
        "the reason is on standard error: {err}"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_wait_says_so_when_the_server_goes_away() {
    use tokio::io::AsyncBufReadExt;

    let orch = Orch::start().await;
    let mut agent = Agent::spawn(&orch.broker_url(), &unique("waitgone"));
    let api = orch.api.clone();
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
    // With the device gone, the operation stays `sent`: only the server's
    // shutdown can end the wait.
    agent.kill().await;
    let app = unique("waitgone");
    api.create_app(&app, &base_image_local().await).await;
    let mut child = tokio::process::Command::new(binary("drover"))
        .args([
            "--api", &api.base, "deploy", &app, "-d", &agent.id, "--wait",
        ])
        .env("DROVER_TOKEN", api.token.as_deref().expect("admin token"))
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run drover");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    // The first progress line is printed once the CLI follows the stream.
    let first = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .expect("a progress line")
        .expect("read stderr")
        .unwrap_or_default();
    assert_eq!(first, "sent");
    orch.stop().await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the CLI ends with the server")
        .expect("wait for the CLI");
    let mut rest = String::new();
    while let Ok(Some(line)) = stderr.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert!(!status.success(), "{rest}");
    assert!(
        rest.contains("closed the change stream before operation")
            && rest.contains("(last seen: sent)"),
        "{rest}"
    );
}
