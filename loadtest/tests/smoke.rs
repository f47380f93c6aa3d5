//! CI smoke test of the load generator: an in-process orchestrator with its
//! embedded broker, 300 simulated agents (real MQTT clients, SIMULATED
//! container runtime), one app deployed to all of them, then two more
//! through one rollout request each (one batch, ten batches). It checks
//! correctness only — every agent online, every operation `succeeded`,
//! every device reporting applied == desired, every rollout `succeeded`
//! with each batch seen — and asserts no timing; the deadlines below only
//! stop a hung run.

use std::time::{Duration, Instant};

use drover::server::{self, BrokerMode, ServerConfig};
use drover_loadtest::api::Api;
use drover_loadtest::runtime::RuntimeConfig;
use drover_loadtest::scenario::rollout_request::{plans, run_rollout_request};
use drover_loadtest::scenario::{run_rollout, unique_app};
use drover_loadtest::sim::{Fleet, SimConfig};
use drover_shared::topic::Topics;

const AGENTS: usize = 300;

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let state = f().await;
        match state {
            None => return,
            Some(s) => assert!(Instant::now() < deadline, "gave up waiting for {what}: {s}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_simulated_agents_take_a_rollout() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = ServerConfig::new(data.path().to_path_buf());
    cfg.api_listen = "127.0.0.1:0".parse().expect("addr");
    // Port 0: the server picks a free port for the embedded broker.
    cfg.broker = BrokerMode::Embedded {
        listen: "127.0.0.1:0".parse().expect("addr"),
    };
    cfg.client_id = format!("orch-smoke-{}", std::process::id());
    // Simulated agents do not enroll; the load test runs the broker open.
    cfg.mqtt_auth = false;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let orch = server::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .expect("orchestrator starts");
    let mut api = Api::new(format!("http://{}", orch.api_addr));
    let token = std::fs::read_to_string(orch.admin_token_file.as_ref().expect("admin token"))
        .expect("admin token file");
    api.set_token(token.trim().to_string());
    let (host, port) = orch.mqtt_addr.clone();
    let done = tokio::spawn(orch.wait());

    let sim = SimConfig {
        topics: Topics::default(),
        hosts: vec![host],
        port,
        heartbeat: Duration::from_secs(30),
        telemetry: Duration::from_secs(10),
        keep_alive: Duration::from_secs(10),
        tcp_nodelay: false,
        runtime: RuntimeConfig {
            pull: Duration::from_millis(20),
            start: Duration::from_millis(5),
            failure_rate: 0.0,
        },
    };
    let mut fleet = Fleet::new(sim, "smoke").expect("fleet");
    fleet.grow_to(AGENTS, 1000.0).await.expect("agents start");
    let ids: Vec<String> = fleet.devices().iter().map(ToString::to_string).collect();
    assert_eq!(ids.len(), AGENTS);

    wait_until(
        Duration::from_secs(120),
        "every agent online in the API",
        || {
            let api = api.clone();
            let ids = ids.clone();
            async move {
                let devices = api.devices().await.ok()?;
                let online = devices
                    .iter()
                    .filter(|d| d.online && ids.contains(&d.id))
                    .count();
                (online < AGENTS).then(|| format!("{online}/{AGENTS} online"))
            }
        },
    )
    .await;

    let app = unique_app();
    api.create_app(&app, "127.0.0.1:5000/loadtest/simulated:1", None)
        .await
        .expect("app created");
    let r = run_rollout(&api, &ids, &app, 16, Duration::from_secs(120)).await;
    assert!(
        r.issue_errors.is_empty(),
        "REST errors: {:?}",
        r.issue_errors
    );
    assert_eq!(r.issued, AGENTS, "one operation per device");
    assert_eq!(
        (r.succeeded, r.failed, r.other_final, r.open),
        (AGENTS, 0, 0, 0),
        "every operation ends succeeded (failures: {:?})",
        r.failure_samples
    );

    wait_until(
        Duration::from_secs(60),
        "every device reporting applied == desired",
        || {
            let api = api.clone();
            let ids = ids.clone();
            async move {
                let devices = api.devices().await.ok()?;
                let behind: Vec<String> = devices
                    .iter()
                    .filter(|d| ids.contains(&d.id))
                    .filter(|d| {
                        d.desired_generation == 0 || d.applied_generation != d.desired_generation
                    })
                    .map(|d| format!("{} {}/{}", d.id, d.applied_generation, d.desired_generation))
                    .take(5)
                    .collect();
                (!behind.is_empty()).then(|| format!("behind: {behind:?}"))
            }
        },
    )
    .await;

    // The same fleet again, through one rollout request each time: in one
    // batch and in ten, followed on the change stream to `succeeded`.
    for (label, batches) in plans() {
        let app = unique_app();
        api.create_app(&app, "127.0.0.1:5000/loadtest/simulated:1", None)
            .await
            .expect("app created");
        let r = run_rollout_request(
            &api,
            &app,
            &fleet.selector(),
            &batches,
            Duration::from_secs(120),
        )
        .await;
        let last = r.clock.last.as_ref().expect("the rollout was seen");
        assert_eq!(
            (last.phase.as_str(), last.counts.total, last.counts.updated),
            ("succeeded", AGENTS, AGENTS),
            "{label}: {:?} {:?}",
            r.error,
            last.reason
        );
        assert!(r.error.is_none(), "{label}: {:?}", r.error);
        let times = r.clock.batch_times();
        assert_eq!(times.len(), batches.len() + 1, "{label}: {times:?}");
        assert!(
            times.iter().all(Option::is_some),
            "{label}: every batch seen to start and end: {times:?}"
        );
        assert!(r.clock.half_updated.is_some() && r.clock.finished.is_some());
    }

    let stats = fleet.stats().snapshot();
    assert!(
        stats.acks_succeeded >= AGENTS as u64,
        "each agent acked its command succeeded"
    );
    assert_eq!(
        stats.malformed, 0,
        "the orchestrator's payloads decode with the shared codec"
    );

    fleet.shutdown(Duration::from_secs(5)).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), done).await;
}
