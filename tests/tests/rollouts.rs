//! Rollouts against a real orchestrator, real agents and real Docker: a
//! one-device canary then the rest; a broken release that stops at the
//! canary and rolls back; an orchestrator killed mid-rollout that goes on
//! where it was. Containers are checked through the Docker API, never
//! through Drover.

use std::collections::BTreeMap;
use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(120);

/// What Docker says of a container: its id, whether it runs, and its
/// `R` environment variable (which release of the test app made it).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    id: String,
    running: bool,
    release: Option<String>,
}

async fn seen(docker: &bollard::Docker, name: &str) -> Option<Seen> {
    let c = docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .ok()?;
    let release = c
        .config
        .as_ref()
        .and_then(|c| c.env.as_ref())
        .and_then(|env| {
            env.iter()
                .find_map(|e| e.strip_prefix("R=").map(String::from))
        });
    Some(Seen {
        id: c.id.unwrap_or_default(),
        running: c.state.and_then(|s| s.running).unwrap_or(false),
        release,
    })
}

/// An app spec of the test: release `r` sets `R=r`; `broken` adds a health
/// check that always fails.
fn spec(app: &str, image: &str, r: u32, broken: bool) -> Value {
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

async fn put_spec(api: &Api, app: &str, spec: &Value) {
    let (s, v) = api
        .send_json(Method::PUT, &format!("/api/v1/apps/{app}"), spec)
        .await;
    assert_eq!(s, 200, "{v}");
}

async fn label(api: &Api, id: &str, labels: Value) {
    let (s, v) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v1/devices/{id}/labels"),
            &json!({ "set": labels }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

async fn rollout(api: &Api, id: &str) -> Value {
    let (s, v) = api.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn wait_phase(api: &Api, id: &str, phase: &str) -> Value {
    wait_for(TIMEOUT, &format!("rollout {phase}"), || async {
        let v = rollout(api, id).await;
        (v["phase"] == json!(phase)).then_some(v)
    })
    .await
}

/// Each device's container of `app`, as Docker has it.
async fn containers(
    docker: &bollard::Docker,
    agents: &[&Agent],
    app: &str,
) -> BTreeMap<String, Option<Seen>> {
    let mut out = BTreeMap::new();
    for a in agents {
        out.insert(
            a.id.clone(),
            seen(docker, &a.container_name(app, "main")).await,
        );
    }
    out
}

async fn wait_release(docker: &bollard::Docker, agents: &[&Agent], app: &str, r: &str) {
    wait_for(
        TIMEOUT,
        &format!("every device runs release {r}"),
        || async {
            let all = containers(docker, agents, app).await;
            all.values()
                .all(|c| {
                    c.as_ref()
                        .is_some_and(|c| c.running && c.release.as_deref() == Some(r))
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_goes_first_and_a_broken_release_rolls_back_at_it() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let fleet = unique("fl");
    let a = Agent::spawn(&orch.broker_url(), &unique("ro-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("ro-b"));
    let c = Agent::spawn(&orch.broker_url(), &unique("ro-c"));
    let outside = Agent::spawn(&orch.broker_url(), &unique("ro-x"));
    for (agent, group) in [
        (&a, fleet.as_str()),
        (&b, &fleet),
        (&c, &fleet),
        (&outside, "other"),
    ] {
        wait_for(Duration::from_secs(30), "device online", || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true))
        })
        .await;
        label(api, &agent.id, json!({ "fleet": group })).await;
    }
    let ours = [&a, &b, &c];
    // Batches take devices in id order: the canary is the smallest id.
    let mut ids: Vec<&str> = ours.iter().map(|a| a.id.as_str()).collect();
    ids.sort();
    let canary = ids[0].to_string();

    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let app = unique("ro");
    let (s, v) = api
        .post("/api/v1/apps", &spec(&app, &image, 1, false))
        .await;
    assert_eq!(s, 201, "{v}");
    let selector = format!("fleet={fleet}");

    // Bad requests are refused by name, and change nothing.
    for (body, field) in [
        (json!({"app": app, "selector": "fleet in (x"}), "selector"),
        (json!({"app": app, "batches": [0]}), "batches"),
        (json!({"app": app, "batches": ["150%"]}), "batches"),
        (json!({"app": app, "release": 9}), "release"),
        (json!({"app": app, "surprise": 1}), "surprise"),
    ] {
        let (s, v) = api.post("/api/v1/rollouts", &body).await;
        assert!(s == 400 || s == 404, "{body} → {s} {v}");
        assert!(v.to_string().contains(field), "{body} → {v}");
    }
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "selector": "fleet=nobody"}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = api.get(&format!("/api/v1/rollouts?app={app}")).await;
    assert_eq!((s, v), (200, json!([])));

    // Release 1 everywhere the selector matches, as one rollout of one batch.
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "selector": selector}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["counts"]["total"], json!(3), "{v}");
    let first = v["id"].as_str().expect("id").to_string();
    wait_phase(api, &first, "succeeded").await;
    wait_release(&docker, &ours, &app, "1").await;
    assert!(seen(&docker, &outside.container_name(&app, "main"))
        .await
        .is_none());
    // The app's assignment is now the rollout's target.
    let (s, v) = api.get(&format!("/api/v1/apps/{app}/assignment")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["selector"].clone(), v["release"].clone()),
        (json!(selector), json!(1))
    );

    // Release 2: a one-device canary, approval, then the rest.
    put_spec(api, &app, &spec(&app, &image, 2, false)).await;
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "batches": [1], "approval": true, "device_timeout_secs": 90}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["from_release"].clone(), v["to_release"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(
        v["selector"],
        json!(selector),
        "the assignment's selector by default"
    );
    let second = v["id"].as_str().expect("id").to_string();
    let v = wait_phase(api, &second, "waiting_approval").await;
    assert_eq!(v["batches"][0]["updated"], json!(1), "{v}");
    assert_eq!(v["batches"][1]["pending"], json!(2), "{v}");
    let now = containers(&docker, &ours, &app).await;
    for (id, c) in &now {
        let c = c.as_ref().expect("container");
        let want = if *id == canary { "2" } else { "1" };
        assert_eq!(c.release.as_deref(), Some(want), "{id}: {now:?}");
    }
    // A running rollout keeps the assignment to itself.
    let (s, v) = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/apps/{app}/assignment"),
            &json!({"selector": selector, "release": 1}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = api
        .post(&format!("/api/v1/rollouts/{second}/resume"), &json!({}))
        .await;
    assert_eq!(s, 409, "resume is not approve: {v}");
    let (s, v) = api
        .post(&format!("/api/v1/rollouts/{second}/approve"), &json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    wait_phase(api, &second, "succeeded").await;
    wait_release(&docker, &ours, &app, "2").await;
    let before = containers(&docker, &ours, &app).await;

    // Release 3 is broken (its health check fails): the canary fails, the
    // rollout rolls it back to 2, and nobody else is touched.
    put_spec(api, &app, &spec(&app, &image, 3, true)).await;
    let (s, v) = api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "batches": [1], "device_timeout_secs": 90}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let third = v["id"].as_str().expect("id").to_string();
    let v = wait_phase(api, &third, "rolled_back").await;
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("batch 1 of 2"), "{v}");
    assert_eq!(v["batches"][0]["rolled_back"], json!(1), "{v}");
    assert_eq!(v["batches"][1]["pending"], json!(2), "{v}");
    let (s, d) = api
        .get(&format!(
            "/api/v1/rollouts/{third}/devices?state=rolled_back"
        ))
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d.as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(d[0]["device"], json!(canary));
    let why = d[0]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("unhealthy"),
        "the rolled back canary says why it failed: {d}"
    );
    wait_release(&docker, &ours, &app, "2").await;
    let after = containers(&docker, &ours, &app).await;
    for id in &ids[1..] {
        assert_eq!(after[*id], before[*id], "{id} was touched");
    }
    let (s, v) = api.get(&format!("/api/v1/apps/{app}/assignment")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["release"],
        json!(2),
        "the rollback put the assignment back: {v}"
    );
    assert!(seen(&docker, &outside.container_name(&app, "main"))
        .await
        .is_none());

    // The history lists all three, newest first; actions on a finished one conflict.
    let (s, v) = api.get(&format!("/api/v1/rollouts?app={app}")).await;
    assert_eq!(s, 200, "{v}");
    let listed: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(
        listed,
        vec![third.as_str(), second.as_str(), first.as_str()]
    );
    let (s, v) = api
        .post(&format!("/api/v1/rollouts/{third}/abort"), &json!({}))
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = api
        .post(&format!("/api/v1/rollouts/{third}/explode"), &json!({}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api.get("/api/v1/rollouts/no-such-rollout").await;
    assert_eq!(s, 404, "{v}");
    // A viewer reads rollouts and may not act on them.
    let viewer = api.as_role(&unique("viewer"), "viewer").await;
    let (s, _) = viewer.get(&format!("/api/v1/rollouts/{third}")).await;
    assert_eq!(s, 200);
    let (s, v) = viewer.post("/api/v1/rollouts", &json!({"app": app})).await;
    assert_eq!(s, 403, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_kill_9_and_runs_nothing_twice() {
    let docker = docker().await;
    let mut orch = OrchProc::start().await;
    let fleet = unique("fk");
    let a = Agent::spawn(&orch.broker_url(), &unique("rk-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("rk-b"));
    for agent in [&a, &b] {
        wait_for(Duration::from_secs(30), "device online", || async {
            orch.api
                .device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true))
        })
        .await;
        label(&orch.api, &agent.id, json!({ "fleet": fleet })).await;
    }
    let ours = [&a, &b];
    let mut ids: Vec<&str> = ours.iter().map(|a| a.id.as_str()).collect();
    ids.sort();

    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let app = unique("rk");
    let (s, v) = orch
        .api
        .post("/api/v1/apps", &spec(&app, &image, 1, false))
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = orch
        .api
        .send_json(
            Method::PUT,
            &format!("/api/v1/apps/{app}/assignment"),
            &json!({"selector": format!("fleet={fleet}"), "release": 1}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_release(&docker, &ours, &app, "1").await;

    // Release 2, one device at a time, each ready for 4 s before it counts.
    put_spec(&orch.api, &app, &spec(&app, &image, 2, false)).await;
    let (s, v) = orch
        .api
        .post(
            "/api/v1/rollouts",
            &json!({"app": app, "batches": [1], "min_ready_secs": 4, "device_timeout_secs": 90}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    // Mid-batch: the canary runs release 2 and is not yet counted.
    let canary_name = ids[0].to_string();
    let canary = ours.iter().find(|a| a.id == canary_name).expect("canary");
    let canary_container = wait_for(TIMEOUT, "the canary runs release 2", || async {
        seen(&docker, &canary.container_name(&app, "main"))
            .await
            .filter(|c| c.running && c.release.as_deref() == Some("2"))
    })
    .await;
    let v = rollout(&orch.api, &id).await;
    assert_eq!(v["phase"], json!("running"), "{v}");
    assert_eq!(v["current_batch"], json!(0), "{v}");
    orch.kill().await;
    orch.restart().await;

    let v = wait_phase(&orch.api, &id, "succeeded").await;
    assert_eq!(v["counts"]["updated"], json!(2), "{v}");
    wait_release(&docker, &ours, &app, "2").await;
    // Nothing ran twice: the canary's release-2 container is the one
    // made before the kill.
    let now = seen(&docker, &canary.container_name(&app, "main"))
        .await
        .expect("canary container");
    assert_eq!(
        now.id, canary_container.id,
        "the canary's container was made again"
    );
}
