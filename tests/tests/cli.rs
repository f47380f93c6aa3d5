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

/// An app whose release `r` sets `R=r`; `broken` adds a health check that
/// always fails, so a device running it never counts as updated.
fn release_spec(app: &str, image: &str, r: u32, broken: bool) -> Value {
    let mut c = json!({
        "name": "main", "image": image,
        "command": ["sh", "-c", "exec sleep 3600"],
        "env": {"R": r.to_string()},
    });
    if broken {
        c["healthcheck"] = json!({"test": ["CMD-SHELL", "exit 1"],
            "interval_ms": 300, "timeout_ms": 1000, "retries": 1});
    }
    json!({"name": app, "containers": [c]})
}

/// The rollout id in `drover rollouts ... -o json` output.
fn rollout_id(out: &str) -> String {
    let v: Value = serde_json::from_str(out).expect("json rollout");
    v["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_with_the_cli() {
    let _docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let fleet = unique("clifl");
    let a = Agent::spawn(&orch.broker_url(), &unique("clro-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("clro-b"));
    for agent in [&a, &b] {
        wait_for(Duration::from_secs(30), "device online", || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true))
        })
        .await;
        let (ok, _, err) = drover(api, &["label", &agent.id, &format!("fleet={fleet}")]).await;
        assert!(ok, "{err}");
    }
    let image = base_image_local().await;
    let app = unique("clro");
    let (s, v) = api
        .post("/api/v1/apps", &release_spec(&app, &image, 1, false))
        .await;
    assert_eq!(s, 201, "{v}");
    let selector = format!("fleet={fleet}");

    // Bad arguments never reach the server; the server's refusals are said.
    let (ok, _, err) = drover(api, &["rollouts", "create", &app, "--batches", "1,x"]).await;
    assert!(!ok && err.contains("--batches \"1,x\": item 2"), "{err}");
    let (ok, _, err) = drover(api, &["rollouts", "create", &app, "--release", "9"]).await;
    assert!(!ok && err.contains("404"), "{err}");

    // Release 1: a canary of one, then the other; followed to the end.
    let (ok, out, err) = drover(
        api,
        &[
            "rollouts",
            "create",
            &app,
            "-l",
            &selector,
            "--batches",
            "1",
            "--wait",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert!(out.contains("phase:       succeeded"), "{out}");
    assert!(out.contains("release none->1"), "{out}");
    // Not a terminal: one line per phase or batch change, the last one the
    // end, no cursor movement.
    assert!(!err.contains('\r'), "{err:?}");
    assert!(err.contains("batch 1/2"), "{err}");
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.ends_with("updated 2/2  failed 0  succeeded")),
        "{err}"
    );

    let (ok, out, err) = drover(api, &["rollouts", "list", "--app", &app, "-o", "json"]).await;
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("json list");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let first = list[0]["id"].as_str().expect("id").to_string();
    let (ok, out, err) = drover(api, &["rollouts"]).await;
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with(&first))
        .unwrap_or_else(|| panic!("no row for {first}: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[1..8],
        [
            app.as_str(),
            "none->1",
            "succeeded",
            "2/2",
            "2/2",
            "100%",
            "0"
        ],
        "{out}"
    );
    let (ok, out, err) = drover(api, &["rollouts", "show", &first, "--devices"]).await;
    assert!(ok, "{err}");
    let mut ids = [a.id.as_str(), b.id.as_str()];
    ids.sort();
    for (i, id) in ids.iter().enumerate() {
        assert!(
            out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [*id, &(i + 1).to_string(), "updated"]),
            "{id} in batch {}: {out}",
            i + 1
        );
    }
    let (ok, out, err) = drover(api, &["rollouts", "show", &first, "--state", "failed"]).await;
    assert!(ok, "{err}");
    assert!(
        out.trim_end().ends_with("DEVICE  BATCH  STATE  REASON"),
        "{out}"
    );
    // An action the phase does not allow is the server's 409, said.
    let (ok, _, err) = drover(api, &["rollouts", "approve", &first]).await;
    assert!(
        !ok && err.contains(&format!("cannot approve rollout {first}")) && err.contains("409"),
        "{err}"
    );

    // Release 2 with approval: it waits after the canary until approved.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/apps/{app}"),
            &release_spec(&app, &image, 2, false),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (ok, out, err) = drover(
        api,
        &[
            "rollouts",
            "create",
            &app,
            "--batches",
            "1",
            "--approval",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let second = rollout_id(&out);
    wait_for(Duration::from_secs(120), "waiting for approval", || async {
        let (_, v) = api.get(&format!("/api/v1/rollouts/{second}")).await;
        (v["phase"] == json!("waiting_approval")).then_some(())
    })
    .await;
    let (ok, out, err) = drover(
        api,
        &["rollouts", "approve", &second, "--wait", "--timeout", "120"],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("phase:       succeeded") && out.contains("release 1->2"),
        "{out}"
    );

    // Release 3 never gets healthy: the canary fails, the rollout rolls it
    // back, and --wait exits non-zero saying so.
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            &format!("/api/v1/apps/{app}"),
            &release_spec(&app, &image, 3, true),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (ok, out, err) = drover(
        api,
        &[
            "rollouts",
            "create",
            &app,
            "--batches",
            "1",
            "--device-timeout",
            "60",
            "--wait",
            "--timeout",
            "120",
        ],
    )
    .await;
    assert!(!ok, "a rollback is not a success: {out}");
    assert!(out.contains("phase:       rolled_back"), "{out}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("batch 1 of 2: ") && l.ends_with(": rolling back"))
            && err.contains("drover: error: rollout ")
            && err.contains(" ended rolled_back: batch 1 of 2"),
        "{err}"
    );
    orch.stop().await;
}
