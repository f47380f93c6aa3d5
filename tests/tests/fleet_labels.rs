//! Labels, selectors, releases and fleet assignment against a real
//! orchestrator, real agents and real Docker. Containers are checked
//! through the Docker API, never through Drover.

use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use drover_tests::*;
use reqwest::Method;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

async fn exists(docker: &bollard::Docker, name: &str) -> bool {
    docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .is_ok()
}

async fn running(docker: &bollard::Docker, name: &str) -> bool {
    docker
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.state?.running)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relabelled_into_the_selector_gets_the_app_and_out_loses_it() {
    let docker = docker().await;
    let orch = Orch::start().await;
    let api = &orch.api;
    let a = Agent::spawn(&orch.broker_url(), &unique("lbl-a"));
    let b = Agent::spawn(&orch.broker_url(), &unique("lbl-b"));
    for id in [&a.id, &b.id] {
        wait_for(Duration::from_secs(30), "device online", || async {
            api.device(id).await.filter(|d| d["online"] == json!(true))
        })
        .await;
    }

    // Operator labels; a selector picks the device; a bad one is a 400.
    let (s, v) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v1/devices/{}/labels", a.id),
            &json!({"set": {"env": "prod", "region": "eu"}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["labels"]["env"], json!("prod"));
    assert_eq!(v["operator_labels"]["region"], json!("eu"));
    let (s, v) = api
        .get("/api/v1/devices?selector=env%3Dprod%2Cregion%20in%20(eu%2Cus)")
        .await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<_> = v
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, vec![a.id.clone()]);
    let (s, v) = api.get("/api/v1/devices?selector=env%20in%20(prod").await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("selector"), "{v}");
    let (s, v) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v1/devices/{}/labels", a.id),
            &json!({"set": {"bad key": "x"}}),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    // Two releases of one app.
    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let app = unique("fleet");
    api.create_app(&app, &image).await;
    let (s, v) = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/apps/{app}"),
            &json!({"name": app, "containers": [{"name": "main", "image": image, "env": {"R": "2"}}]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["latest_release"], json!(2));
    // The same spec again makes no release.
    let (s, _) = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/apps/{app}"),
            &json!({"name": app, "containers": [{"name": "main", "image": image, "env": {"R": "2"}}]}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = api.get(&format!("/api/v1/apps/{app}/releases")).await;
    assert_eq!(s, 200, "{v}");
    let numbers: Vec<_> = v
        .as_array()
        .expect("releases")
        .iter()
        .map(|r| r["number"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(numbers, vec![1, 2]);
    let (s, v) = api.get(&format!("/api/v1/apps/{app}/releases/1")).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["spec"]["containers"][0]["env"].get("R").is_none(), "{v}");

    // Assign release 1 to env=prod: only a runs it.
    let (s, v) = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/apps/{app}/assignment"),
            &json!({"selector": "env=prod", "release": 1}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["assigned"], json!([a.id]));
    let name_a = a.container_name(&app, "main");
    let name_b = b.container_name(&app, "main");
    wait_for(TIMEOUT, "a runs the app", || async {
        running(&docker, &name_a).await.then_some(())
    })
    .await;
    assert!(!exists(&docker, &name_b).await, "b does not match");
    // The desired state carries the release. (The agent echoing it in
    // AppStatus.release is the agent's part, checked by its own tests.)
    let d = api.device(&a.id).await.expect("a");
    let desired = d["desired"]["apps"].as_array().expect("apps");
    assert!(
        desired
            .iter()
            .any(|x| x["spec"]["name"] == json!(app) && x["release"] == json!(1)),
        "{d}"
    );

    // b relabelled into the selector gets it.
    let (s, v) = api
        .send_json(
            Method::PUT,
            &format!("/api/v1/devices/{}/labels", b.id),
            &json!({"labels": {"env": "prod"}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_for(TIMEOUT, "b runs the app", || async {
        running(&docker, &name_b).await.then_some(())
    })
    .await;

    // a relabelled out loses it.
    let (s, v) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v1/devices/{}/labels", a.id),
            &json!({"remove": ["env"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_for(TIMEOUT, "a's container removed", || async {
        (!exists(&docker, &name_a).await).then_some(())
    })
    .await;
    assert!(running(&docker, &name_b).await);

    // Deleting the assignment removes the app where it put it.
    let (s, v) = api.delete(&format!("/api/v1/apps/{app}/assignment")).await;
    assert_eq!(s, 204, "{v}");
    wait_for(TIMEOUT, "b's container removed", || async {
        (!exists(&docker, &name_b).await).then_some(())
    })
    .await;
}
