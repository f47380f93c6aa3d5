//! An app's containers on a network of their own, reaching each other by
//! name, started in dependency order; a single-container app on Docker's
//! default bridge, with no network; and the previous release's image kept
//! through an update. A real agent on the real Docker Engine, the desired
//! state published straight on the device's topic, the result read back
//! from Docker itself.

use std::time::Duration;

use bollard::models::EndpointSettings;
use bollard::query_parameters::InspectNetworkOptions;
use bollard::Docker;
use drover_tests::agent_lab::*;
use drover_tests::*;
use serde_json::{json, Value};

const CONVERGE: Duration = Duration::from_secs(120);

/// The networks a container is attached to, by network name.
async fn networks_of(
    docker: &Docker,
    container: &str,
) -> std::collections::HashMap<String, EndpointSettings> {
    docker
        .inspect_container(container, None)
        .await
        .expect("inspect")
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
}

/// Waits until `net` is gone from Docker.
async fn wait_network_gone(docker: &Docker, net: &str, what: &str) {
    wait_for(CONVERGE, what, || async {
        docker
            .inspect_network(net, None::<InspectNetworkOptions>)
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_an_app_reach_each_other_by_name_in_dependency_order() {
    let docker = docker().await;
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("appnet");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path());
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let image = fresh_image(&unique("appnet")).await;
    // `web` is listed first and fetches a page from `db` by name once at
    // start, without retrying and without a restart policy: it only runs
    // if db was serving when it started. db's health check passes only
    // once its server answers, after a second's delay.
    let desired = json!({
        "generation": 1,
        "apps": [{"spec": {"name": "pair", "containers": [
            {"name": "web", "image": image, "restart": "no", "depends_on": ["db"],
             "command": ["sh", "-c", "wget -q -O /tmp/page http://db:8080/ && exec sleep 3600"],
             "healthcheck": {"test": ["CMD-SHELL", "grep -q hello /tmp/page"],
                             "interval_ms": 300, "timeout_ms": 2000, "retries": 2}},
            {"name": "db", "image": image,
             "command": ["sh", "-c",
                 "mkdir -p /www && echo hello > /www/index.html && sleep 1 && exec httpd -f -p 8080 -h /www"],
             "healthcheck": {"test": ["CMD-SHELL", "wget -q -O - http://127.0.0.1:8080/ | grep -q hello"],
                             "interval_ms": 300, "timeout_ms": 2000, "retries": 3}}
        ]}, "run": "running", "started_at": 1}]
    });
    publish_desired(&orch, &id, desired.clone()).await;

    let view = wait_for(CONVERGE, "pair running and healthy", || async {
        let d = api.device(&id).await?;
        let pair = observed_app(&d, "pair")?;
        (d["applied_generation"] == json!(1)
            && pair["phase"] == json!("running")
            && pair["containers"]
                .as_array()?
                .iter()
                .all(|c| c["health"] == json!("healthy")))
        .then_some(d)
    })
    .await;
    let pair = observed_app(&view, "pair").expect("pair");

    // The network: Drover's, this device's and this app's.
    let net_name = format!("drover-{id}-pair");
    let net = docker
        .inspect_network(&net_name, None::<InspectNetworkOptions>)
        .await
        .expect("the app network exists");
    let labels = net.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("io.drover.managed").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels.get("io.drover.app").map(String::as_str),
        Some("pair")
    );
    assert_eq!(
        labels.get("io.drover.device").map(String::as_str),
        Some(id.as_str())
    );
    let net_id = net.id.clone().expect("network id");

    // Both containers on it, each under its spec name.
    let mut started = Vec::new();
    for c in ["db", "web"] {
        let i = docker
            .inspect_container(&format!("drover-{id}-pair-{c}"), None)
            .await
            .expect("inspect");
        let nets = i
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.clone())
            .unwrap_or_default();
        let ep = nets
            .get(&net_name)
            .unwrap_or_else(|| panic!("{c} is on {net_name}: {nets:?}"));
        assert_eq!(ep.network_id.as_deref(), Some(net_id.as_str()));
        assert!(
            ep.aliases
                .clone()
                .unwrap_or_default()
                .contains(&c.to_string()),
            "{c} has its name as alias: {ep:?}"
        );
        assert_eq!(nets.len(), 1, "{c} is on its app network only: {nets:?}");
        let st = i.state.expect("state");
        assert_eq!(st.running, Some(true), "{c} runs: {st:?}");
        assert_eq!(i.restart_count, Some(0), "{c} never restarted");
        started.push(sortable_time(st.started_at.as_deref().expect("started at")));
    }
    // db started first; web started after it and reached it by name (its
    // own check reads the page it fetched from http://db:8080/). web tries
    // once, and db serves only a second after it starts: web running at
    // all shows it waited for db's health check, not only for its start.
    assert!(
        started[0] < started[1],
        "db started before web: {started:?}"
    );
    assert!(
        pair["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .all(|c| c["restarts"].as_u64().unwrap_or(0) == 0),
        "{pair}"
    );

    // Down to db alone: one container has no one to reach by name, so
    // the app's network goes (Docker allows only about 30 such networks)
    // once db is moved off it to Docker's default bridge.
    let mut db_only = desired.clone();
    db_only["generation"] = json!(2);
    let db = desired["apps"][0]["spec"]["containers"][1].clone();
    db_only["apps"][0]["spec"]["containers"] = json!([db]);
    publish_desired(&orch, &id, db_only).await;
    wait_network_gone(
        &docker,
        &net_name,
        "the network of a one-container app removed",
    )
    .await;
    wait_for(CONVERGE, "db alone running", || async {
        let d = api.device(&id).await?;
        let pair = observed_app(&d, "pair")?;
        (d["applied_generation"] == json!(2)
            && pair["phase"] == json!("running")
            && pair["containers"].as_array()?.len() == 1)
            .then_some(())
    })
    .await;
    let db_nets = networks_of(&docker, &format!("drover-{id}-pair-db")).await;
    assert_eq!(
        db_nets.keys().collect::<Vec<_>>(),
        vec!["bridge"],
        "db is on Docker's default bridge only"
    );
    assert_eq!(device_containers(&docker, &id).await.len(), 1);

    // Both again: the network is back, and db moves onto it beside web,
    // which reaches it by name again.
    let mut both = desired.clone();
    both["generation"] = json!(3);
    publish_desired(&orch, &id, both).await;
    wait_for(CONVERGE, "pair running and healthy again", || async {
        let d = api.device(&id).await?;
        let pair = observed_app(&d, "pair")?;
        let cs = pair["containers"].as_array()?;
        (d["applied_generation"] == json!(3)
            && pair["phase"] == json!("running")
            && cs.len() == 2
            && cs.iter().all(|c| c["health"] == json!("healthy")))
        .then_some(())
    })
    .await;
    for c in ["db", "web"] {
        let nets = networks_of(&docker, &format!("drover-{id}-pair-{c}")).await;
        assert_eq!(
            nets.keys().collect::<Vec<_>>(),
            vec![&net_name],
            "{c} is on its app network only"
        );
    }

    // The app goes: its containers, then its network.
    publish_desired(&orch, &id, json!({"generation": 4, "apps": []})).await;
    wait_network_gone(&docker, &net_name, "the app network removed").await;
    assert!(device_containers(&docker, &id).await.is_empty());
    agent.stop().await;
}

/// Docker's RFC 3339 timestamps with nanoseconds, comparable as text once
/// the fraction has a fixed width.
fn sortable_time(t: &str) -> String {
    let (main, rest) = t.split_once('.').unwrap_or((t, "Z"));
    let frac: String = rest.trim_end_matches('Z').chars().take(9).collect();
    format!("{main}.{frac:0<9}")
}

/// An image of its own in the shared registry (the test image plus a file
/// with `tag` in it, so its id differs from every other image's), not kept
/// locally: the agent has to pull it.
async fn distinct_image(tag: &str) -> String {
    let base = base_image_local().await;
    let image = format!("{REGISTRY}/{BASE_REPO}:{tag}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("release");
    std::fs::write(&file, tag).expect("write");
    let builder = unique("drover-build");
    docker_cli(&["create", "--name", &builder, &base]).await;
    docker_cli(&[
        "cp",
        &file.display().to_string(),
        &format!("{builder}:/release"),
    ])
    .await;
    docker_cli(&["commit", &builder, &image]).await;
    docker_cli(&["rm", "-f", &builder]).await;
    docker_cli(&["push", "-q", &image]).await;
    docker_cli(&["rmi", &image]).await;
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_image_stays_until_the_new_one_is_healthy() {
    let docker = docker().await;
    let orch = Orch::start_open().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("keepimg");
    let mut agent = LabAgent::new(&orch.broker_url(), &id, state.path());
    agent.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let old = distinct_image(&unique("keep-old")).await;
    let new = distinct_image(&unique("keep-new")).await;
    let release = |generation: u64, image: &str, check: Option<Value>| {
        let mut c = json!({"name": "main", "image": image,
                           "command": ["sh", "-c", "exec sleep 3600"]});
        if let Some(check) = check {
            c["healthcheck"] = check;
        }
        json!({"generation": generation, "apps": [
            {"spec": {"name": "rel", "containers": [c]}, "run": "running", "started_at": 1}
        ]})
    };
    let phase_at = |generation: u64, health: &'static str| {
        let id = id.clone();
        move || {
            let id = id.clone();
            async move {
                let d = api.device(&id).await?;
                let rel = observed_app(&d, "rel")?;
                (d["applied_generation"] == json!(generation)
                    && rel["phase"] == json!("running")
                    && rel["containers"][0]["health"].as_str().unwrap_or("none") == health)
                    .then_some(())
            }
        }
    };
    publish_desired(&orch, &id, release(1, &old, None)).await;
    wait_for(CONVERGE, "release 1 running", phase_at(1, "none")).await;
    // One container: Docker's default bridge, no network of its own.
    let nets = networks_of(&docker, &format!("drover-{id}-rel-main")).await;
    assert_eq!(nets.keys().collect::<Vec<_>>(), vec!["bridge"]);
    assert!(
        docker
            .inspect_network(&format!("drover-{id}-rel"), None::<InspectNetworkOptions>)
            .await
            .is_err(),
        "a one-container app has no network"
    );

    // The update's health check never passes: the old image stays, held
    // in the ledger for the app.
    let failing = json!({"test": ["CMD", "false"], "interval_ms": 300,
                         "timeout_ms": 1000, "retries": 1});
    publish_desired(&orch, &id, release(2, &new, Some(failing))).await;
    wait_for(CONVERGE, "release 2 unhealthy", phase_at(2, "unhealthy")).await;
    docker
        .inspect_image(&old)
        .await
        .expect("the previous release's image is still on Docker");
    let ledger: Value =
        serde_json::from_slice(&std::fs::read(state.path().join("images.json")).expect("ledger"))
            .expect("json");
    assert_eq!(
        ledger["images"][&old]["held_for"],
        json!(["rel"]),
        "{ledger}"
    );

    // Back to the old release, from the local image: it runs, and the
    // failed release's image is an unused one the cleanup removes.
    publish_desired(&orch, &id, release(3, &old, None)).await;
    wait_for(CONVERGE, "release 1 again", phase_at(3, "none")).await;
    wait_for(CONVERGE, "the failed release's image removed", || async {
        docker.inspect_image(&new).await.is_err().then_some(())
    })
    .await;
    docker.inspect_image(&old).await.expect("old image present");
    agent.stop().await;
    // Dropping the agent removes its containers; then the image can go.
    drop(agent);
    let _ = std::process::Command::new("docker")
        .args(["rmi", &old])
        .output();
}
