//! Edge jobs against a real orchestrator, real `drover-agent` processes and
//! real Docker: a job over a selector with a concurrency of one, a failing
//! command, a timeout, a cancel, roles and the audit log, bad input, and
//! the CLI's `jobs run --wait`. Job containers are checked through the
//! Docker API, never through Drover.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(90);

fn image() -> String {
    format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}")
}

async fn online(api: &Api, agent: &Agent) {
    wait_for(Duration::from_secs(30), "device online", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;
}

async fn label(api: &Api, id: &str, group: &str) {
    let (s, v) = api
        .send_json(
            reqwest::Method::PATCH,
            &format!("/api/v1/devices/{id}/labels"),
            &json!({ "set": { "jobs": group } }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

async fn job(api: &Api, id: &str) -> Value {
    let (s, v) = api.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn wait_job(api: &Api, id: &str, phase: &str) -> Value {
    wait_for(TIMEOUT, &format!("job {phase}"), || async {
        let v = job(api, id).await;
        (v["phase"] == json!(phase)).then_some(v)
    })
    .await
}

async fn create(api: &Api, body: Value) -> String {
    let (s, v) = api.post("/api/v1/jobs", &body).await;
    assert_eq!(s, 201, "{body} → {v}");
    v["id"].as_str().expect("id").to_string()
}

/// Waits until `device` runs job `id`; its container's name.
async fn running(api: &Api, id: &str, device_id: &str) -> String {
    wait_for(TIMEOUT, "job running", || async {
        let v = job(api, id).await;
        (device(&v, device_id)["state"] == json!("running")).then_some(())
    })
    .await;
    format!("drover-job-{device_id}-{id}")
}

fn tail(d: &Value) -> &str {
    d["output_tail"].as_str().unwrap_or_default()
}

/// Waits until job `id` succeeded; `device_id` exited 0 and printed `text`.
async fn succeeded_with(api: &Api, id: &str, device_id: &str, text: &str) {
    let v = wait_job(api, id, "succeeded").await;
    let d = device(&v, device_id);
    assert_eq!(d["exit_code"], json!(0), "{d}");
    assert!(tail(d).contains(text), "{d}");
}

fn device<'a>(job: &'a Value, id: &str) -> &'a Value {
    job["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["device"] == json!(id))
        .unwrap_or_else(|| panic!("{id} not in {job}"))
}

async fn container_exists(docker: &bollard::Docker, name: &str) -> Option<bool> {
    docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .ok()
        .map(|c| c.state.and_then(|s| s.running).unwrap_or(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_across_a_selector_and_reports_per_device() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let group = unique("g");
    let a = Agent::spawn(&orch.broker_url(), &unique("jb-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("jb-b"));
    let outside = Agent::spawn(&orch.broker_url(), &unique("jb-x"));
    for (agent, g) in [(&a, group.as_str()), (&b, &group), (&outside, "other")] {
        online(api, agent).await;
        label(api, &agent.id, g).await;
    }
    let selector = format!("jobs={group}");

    // Bad input is refused naming the field, and makes no job.
    for (body, status, field) in [
        (
            json!({"selector": selector, "image": "Not An Image", "timeout_secs": 5}),
            400,
            "image",
        ),
        (
            json!({"selector": selector, "image": image(), "timeout_secs": 0}),
            400,
            "timeout_secs",
        ),
        (
            json!({"selector": selector, "image": image(), "timeout_secs": 86_401}),
            400,
            "timeout_secs",
        ),
        (
            json!({"selector": selector, "image": image(), "timeout_secs": 5, "concurrency": 0}),
            400,
            "concurrency",
        ),
        (
            json!({"selector": selector, "image": image(), "timeout_secs": 5, "env": {"A=B": "x"}}),
            400,
            "env",
        ),
        (
            json!({"selector": "jobs in (x", "image": image(), "timeout_secs": 5}),
            400,
            "selector",
        ),
        (
            json!({"selector": "jobs=nobody", "image": image(), "timeout_secs": 5}),
            409,
            "selector",
        ),
        (
            json!({"selector": selector, "image": image()}),
            400,
            "timeout_secs",
        ),
        (
            json!({"selector": selector, "image": image(), "timeout_secs": 5, "surprise": 1}),
            400,
            "surprise",
        ),
    ] {
        let (s, v) = api.post("/api/v1/jobs", &body).await;
        assert_eq!(s, status, "{body} → {v}");
        assert!(v.to_string().contains(field), "{body} → {v}");
    }
    let (s, v) = api.get("/api/v1/jobs").await;
    assert_eq!((s, v), (200, json!([])));

    // A viewer reads but neither creates nor cancels.
    let viewer = api.as_role("job-viewer", "viewer").await;
    let body = json!({"selector": selector, "image": image(), "timeout_secs": 60,
        "concurrency": 1,
        "command": ["sh", "-c", "echo \"out-$GREETING\"; sleep 1"],
        "env": {"GREETING": "hello"}});
    let (s, v) = viewer.post("/api/v1/jobs", &body).await;
    assert_eq!(s, 403, "{v}");

    // Two devices match; one at a time; both succeed with their output.
    let id = create(api, body).await;
    let v = wait_job(api, &id, "succeeded").await;
    assert_eq!(v["counts"]["total"], json!(2), "{v}");
    assert_eq!(v["counts"]["succeeded"], json!(2), "{v}");
    assert_eq!(v["concurrency"], json!(1), "{v}");
    assert!(v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .all(|d| d["device"] != json!(outside.id)));
    let (da, db) = (device(&v, &a.id), device(&v, &b.id));
    for d in [da, db] {
        assert_eq!(d["state"], json!("succeeded"), "{d}");
        assert_eq!(d["exit_code"], json!(0), "{d}");
        assert!(tail(d).contains("out-hello"), "{d}");
        assert!(d["started_at_ms"].as_u64() > Some(0), "{d}");
    }
    // At most one ran at a time: one finished before the other started.
    let span = |d: &Value| {
        (
            d["started_at_ms"].as_u64().expect("started"),
            d["finished_at_ms"].as_u64().expect("finished"),
        )
    };
    let (sa, fa) = span(da);
    let (sb, fb) = span(db);
    assert!(fa <= sb || fb <= sa, "overlap: a {sa}..{fa}, b {sb}..{fb}");
    // The list shows it without devices; the viewer may read it.
    let (s, list) = viewer.get("/api/v1/jobs").await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list[0]["id"], json!(id), "{list}");
    assert_eq!(viewer.get(&format!("/api/v1/jobs/{id}")).await.0, 200);
    // A finished job cannot be cancelled; the viewer is refused first.
    assert_eq!(
        viewer
            .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
            .await
            .0,
        403
    );
    assert_eq!(
        api.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
            .await
            .0,
        409
    );

    // A command that fails: its exit code and its stderr.
    let failing = create(
        api,
        json!({"selector": format!("jobs={group}"), "image": image(), "timeout_secs": 60,
            "command": ["sh", "-c", "echo broken-on-purpose >&2; exit 3"]}),
    )
    .await;
    let v = wait_job(api, &failing, "failed").await;
    for agent in [&a, &b] {
        let d = device(&v, &agent.id);
        assert_eq!(d["state"], json!("failed"), "{d}");
        assert_eq!(d["exit_code"], json!(3), "{d}");
        assert!(tail(d).contains("broken-on-purpose"), "{d}");
    }

    // The audit log has who created and who was refused.
    let (s, audit) = api.get("/api/v1/audit?limit=200").await;
    assert_eq!(s, 200, "{audit}");
    let entries = audit.as_array().expect("audit entries");
    let has = |command: &str, outcome: &str| {
        entries
            .iter()
            .any(|e| e["command"] == json!(command) && e["outcome"] == json!(outcome))
    };
    assert!(has("job.create", "ok"), "{audit}");
    assert!(has("job.create", "denied"), "{audit}");
    assert!(has("job.cancel", "denied"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_killed_and_a_cancelled_one_stops() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("jb-t"));
    online(api, &agent).await;
    let group = unique("t");
    label(api, &agent.id, &group).await;
    let selector = format!("jobs={group}");

    // Timed out: killed at 3 s, reported so, its container gone.
    let id = create(
        api,
        json!({"selector": selector, "image": image(), "timeout_secs": 3,
            "command": ["sh", "-c", "echo started; exec sleep 300"]}),
    )
    .await;
    let name = format!("drover-job-{}-{id}", agent.id);
    let v = wait_job(api, &id, "failed").await;
    let d = device(&v, &agent.id);
    assert_eq!(d["state"], json!("timed_out"), "{d}");
    assert!(tail(d).contains("started"), "{d}");
    let took = d["finished_at_ms"].as_u64().expect("finished")
        - d["started_at_ms"].as_u64().expect("started");
    assert!((3000..20_000).contains(&took), "ran {took} ms");
    assert_eq!(
        container_exists(&docker, &name).await,
        None,
        "container left"
    );

    // Cancelled while running: it survives reconcile passes until then
    // (the agent reconciles every 5 s and must leave a job's container be).
    let id = create(
        api,
        json!({"selector": selector, "image": image(), "timeout_secs": 600,
            "command": ["sleep", "300"]}),
    )
    .await;
    let name = running(api, &id, &agent.id).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(container_exists(&docker, &name).await, Some(true));
    let (s, v) = api
        .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["phase"], json!("cancelled"), "{v}");
    let v = wait_for(TIMEOUT, "device cancelled", || async {
        let v = job(api, &id).await;
        (device(&v, &agent.id)["state"] == json!("cancelled")).then_some(v)
    })
    .await;
    assert_eq!(v["phase"], json!("cancelled"), "{v}");
    assert_eq!(
        container_exists(&docker, &name).await,
        None,
        "container left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_job_and_waits_for_every_device() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("jb-c"));
    online(api, &agent).await;
    let group = unique("c");
    label(api, &agent.id, &group).await;
    let selector = format!("jobs={group}");
    let image = image();

    // `drover jobs run --selector S --image I EXTRA... --wait -- CMD...`
    let run = |extra: &[&str], cmd: &[&str]| {
        let mut args = vec![
            "jobs",
            "run",
            "--selector",
            selector.as_str(),
            "--image",
            image.as_str(),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--wait", "--"]);
        args.extend_from_slice(cmd);
        args.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let args = run(
        &["--env", "WHO=cli", "--timeout", "60s"],
        &["sh", "-c", "echo from-$WHO"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = drover_cli(api, &args, b"").await;
    assert!(ok, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("succeeded"), "{out}");
    let (s, list) = api.get("/api/v1/jobs").await;
    assert_eq!(s, 200);
    let id = list[0]["id"].as_str().expect("id").to_string();
    let (ok, out, err) = drover_cli(api, &["jobs", "show", &id], b"").await;
    assert!(ok, "{err}");
    assert!(out.contains(&agent.id) && out.contains("from-cli"), "{out}");
    let (ok, out, _) = drover_cli(api, &["jobs", "list"], b"").await;
    assert!(ok && out.contains(&id), "{out}");

    let args = run(&[], &["sh", "-c", "exit 3"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = drover_cli(api, &args, b"").await;
    assert!(!ok, "a failed job must fail the CLI: {out} {err}");
    assert!(format!("{out}{err}").contains("failed"), "{out} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outlives_a_killed_agent_and_an_offline_device_gets_it_when_back() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let mut agent = Agent::spawn(&orch.broker_url(), &unique("jb-r"));
    online(api, &agent).await;
    let group = unique("r");
    label(api, &agent.id, &group).await;
    let id = create(
        api,
        json!({"selector": format!("jobs={group}"), "image": image(), "timeout_secs": 120,
            "command": ["sh", "-c", "sleep 6; echo done-after-restart"]}),
    )
    .await;
    let name = running(api, &id, &agent.id).await;
    // SIGKILL: the container runs on without its agent; the restarted
    // agent finds it by its label and its spec in jobs.json, waits for it
    // and reports it.
    agent.kill().await;
    assert_eq!(container_exists(&docker, &name).await, Some(true));
    agent.start(&orch.broker_url());
    succeeded_with(api, &id, &agent.id, "done-after-restart").await;
    assert_eq!(
        container_exists(&docker, &name).await,
        None,
        "container left"
    );

    // Offline when the job is made: pending until the device is back,
    // then sent it.
    agent.kill().await;
    wait_for(Duration::from_secs(30), "device offline", || async {
        api.device(&agent.id)
            .await
            .filter(|d| d["online"] == json!(false))
    })
    .await;
    let later = create(
        api,
        json!({"selector": format!("jobs={group}"), "image": image(), "timeout_secs": 60,
            "command": ["echo", "sent-when-back"]}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        device(&job(api, &later).await, &agent.id)["state"],
        json!("pending")
    );
    agent.start(&orch.broker_url());
    succeeded_with(api, &later, &agent.id, "sent-when-back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_an_orchestrator_killed_while_it_runs() {
    let mut orch = OrchProc::start().await;
    let api = orch.api.clone();
    let agent = Agent::spawn(&orch.broker_url(), &unique("jb-o"));
    online(&api, &agent).await;
    let group = unique("o");
    label(&api, &agent.id, &group).await;
    let id = create(
        &api,
        json!({"selector": format!("jobs={group}"), "image": image(), "timeout_secs": 120,
            "command": ["sh", "-c", "sleep 6; echo after-the-orchestrator"]}),
    )
    .await;
    running(&api, &id, &agent.id).await;
    // SIGKILL: the job is in redb; the device's final report arrives
    // after the restart (or is sent again on its reconnect).
    orch.kill().await;
    orch.restart().await;
    succeeded_with(&api, &id, &agent.id, "after-the-orchestrator").await;
}
