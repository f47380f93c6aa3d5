//! The agent under hostile conditions on the real Docker Engine: a second
//! agent on the same state directory, a state directory it cannot write,
//! Docker going away, an app that cannot be deployed next to ones that
//! can, log collection across restarts, and a restart with no broker.

use std::time::Duration;

use drover_tests::agent_lab::*;
use drover_tests::*;
use serde_json::json;

#[allow(dead_code)]
const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_dir_is_refused() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let state = tempfile::tempdir().expect("tempdir");
    let id = unique("lock");
    let mut first = LabAgent::new(&orch.broker_url(), &id, state.path()).enrolling_with(api);
    first.start(StateDirMode::Writable).await;
    wait_online(api, &id, Duration::from_secs(30)).await;

    let mut second = LabAgent::new(&orch.broker_url(), &id, state.path());
    second.start(StateDirMode::Writable).await;
    let status = second.exited(Duration::from_secs(20)).await;
    assert!(!status.success(), "the second agent must fail: {status}");
    let text = second.log_text();
    assert!(
        text.contains("is in use by another drover-agent"),
        "the refusal says why: {text}"
    );
    assert!(
        !text.contains("connected to broker") && !text.contains("ConnAck"),
        "refused before connecting anywhere: {text}"
    );

    // The first keeps its session: still running, still online, and its
    // heartbeats keep coming.
    assert!(first.running(), "the first agent keeps running");
    let seq = |d: &serde_json::Value| d["heartbeat"]["seq"].as_u64().unwrap_or(0);
    let before = seq(&api.device(&id).await.expect("device"));
    wait_for(
        Duration::from_secs(15),
        "heartbeats after the refusal",
        || async {
            let d = api.device(&id).await?;
            (d["online"] == json!(true) && seq(&d) > before + 2).then_some(())
        },
    )
    .await;
    assert!(
        !first.log_text().contains("in use by another"),
        "the first agent was not disturbed"
    );
}
