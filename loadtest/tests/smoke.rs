//! CI smoke tests of the load generator. The first: an in-process
//! orchestrator with its embedded broker, 300 simulated agents (real MQTT clients, SIMULATED
//! container runtime), one app deployed to all of them, then two more
//! through one rollout request each (one batch, ten batches). It checks
//! correctness only — every agent online, every operation `succeeded`,
//! every device reporting applied == desired, every rollout `succeeded`
//! with each batch seen — and asserts no timing; the deadlines below only
//! stop a hung run.

use std::time::{Duration, Instant};

use drover::server::{self, BrokerMode, ServerConfig};
use drover_loadtest::api::Api;
use drover_loadtest::browser::Browser;
use drover_loadtest::runtime::RuntimeConfig;
use drover_loadtest::scenario::console::{measure, ConsoleArgs};
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

/// An in-process orchestrator with its embedded broker on free ports.
struct Orch {
    api: Api,
    mqtt: (String, u16),
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Orch {
    async fn start(data: &std::path::Path) -> Orch {
        let mut cfg = ServerConfig::new(data.to_path_buf());
        cfg.api_listen = "127.0.0.1:0".parse().expect("addr");
        // Port 0: the server picks a free port for the embedded broker.
        cfg.broker = BrokerMode::Embedded {
            listen: "127.0.0.1:0".parse().expect("addr"),
        };
        cfg.client_id = format!("orch-smoke-{}", drover_loadtest::unique_suffix());
        // Simulated agents do not enroll; the load test runs the broker open.
        cfg.mqtt_auth = false;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let orch = server::start(cfg, async move {
            let _ = stop_rx.await;
        })
        .await
        .expect("orchestrator starts");
        let mut api = Api::new(format!("http://{}", orch.api_addr));
        let token = std::fs::read_to_string(orch.admin_token_file.as_ref().expect("admin token"))
            .expect("admin token file");
        api.set_token(token.trim().to_string());
        let mqtt = orch.mqtt_addr.clone();
        let done = tokio::spawn(async move {
            let _ = orch.wait().await;
        });
        Orch {
            api,
            mqtt,
            stop,
            done,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.done).await;
    }
}

fn sim(orch: &Orch, telemetry: Duration) -> SimConfig {
    SimConfig {
        topics: Topics::default(),
        hosts: vec![orch.mqtt.0.clone()],
        port: orch.mqtt.1,
        heartbeat: Duration::from_secs(30),
        telemetry,
        keep_alive: Duration::from_secs(10),
        tcp_nodelay: false,
        runtime: RuntimeConfig {
            pull: Duration::from_millis(20),
            start: Duration::from_millis(5),
            failure_rate: 0.0,
        },
    }
}

async fn all_online(api: &Api, ids: &[String]) {
    wait_until(
        Duration::from_secs(120),
        "every agent online in the API",
        || {
            let api = api.clone();
            let ids = ids.to_vec();
            async move {
                let devices = api.devices().await.ok()?;
                let online = devices
                    .iter()
                    .filter(|d| d.online && ids.contains(&d.id))
                    .count();
                (online < ids.len()).then(|| format!("{online}/{} online", ids.len()))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_simulated_agents_take_a_rollout() {
    let data = tempfile::tempdir().expect("tempdir");
    let orch = Orch::start(data.path()).await;
    let api = orch.api.clone();

    let mut fleet = Fleet::new(sim(&orch, Duration::from_secs(10)), "smoke").expect("fleet");
    fleet.grow_to(AGENTS, 1000.0).await.expect("agents start");
    let ids: Vec<String> = fleet.devices().iter().map(ToString::to_string).collect();
    assert_eq!(ids.len(), AGENTS);

    all_online(&api, &ids).await;

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
    orch.stop().await;
}

const CONSOLE_AGENTS: usize = 200;

/// The console scenario's measurements end to end on a small fleet with
/// telemetry flowing: baseline, the devices page's first request, two
/// loads of the console's devices page in a real headless Chromium
/// (chromium and chromedriver must be installed: scripts/test-env.sh;
/// without them this fails), two subscribers of the console's feed next
/// to the open page, and one uncoalesced subscriber. Correctness only: the
/// page is paged, rows render, the console's feed carries the changes it
/// is for (apps made meanwhile) and no telemetry while the uncoalesced
/// stream does, nothing lags or breaks; no timing is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_scenario_measures_two_hundred_agents_and_a_chromium_page() {
    let data = tempfile::tempdir().expect("tempdir");
    let orch = Orch::start(data.path()).await;
    // Telemetry every 2 s: ~100 changes a second, so short windows see some.
    let mut fleet = Fleet::new(sim(&orch, Duration::from_secs(2)), "console").expect("fleet");
    fleet
        .grow_to(CONSOLE_AGENTS, 1000.0)
        .await
        .expect("agents start");
    let ids: Vec<String> = fleet.devices().iter().map(ToString::to_string).collect();
    all_online(&orch.api, &ids).await;

    let a = ConsoleArgs {
        consoles: 2,
        duration: Duration::from_secs(3),
        warmup: Duration::from_secs(1),
        page_requests: 20,
        page_size: 50,
        render_runs: 2,
        chromedriver: Browser::default_driver(),
    };
    // A steady fleet sends the console's feed nothing but telemetry, which
    // it leaves out: make apps meanwhile, so that the feed has changes.
    let maker = {
        let api = orch.api.clone();
        tokio::spawn(async move {
            for i in 0.. {
                api.create_app(&format!("smoke-{i}"), "127.0.0.1:5000/x:1", None)
                    .await
                    .expect("create an app");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // The orchestrator runs in this process: sampling it exercises the sampler.
    let run = measure(&orch.api, Some(std::process::id()), &a)
        .await
        .expect("the console scenario runs (chromium and chromedriver installed?)");
    maker.abort();

    assert_eq!(run.first_page.len(), 20);
    for g in &run.first_page {
        assert_eq!(
            (g.items, g.total),
            (50, Some(CONSOLE_AGENTS as u64)),
            "one page of 50 and the total"
        );
    }
    assert_eq!(run.unpaged.items, CONSOLE_AGENTS);
    assert!(run.unpaged.bytes > run.first_page[0].bytes);

    assert_eq!(run.renders.len(), 2);
    for r in &run.renders {
        assert!(
            r.dom > 0.0 && r.frame >= r.dom,
            "the row is seen, then rendered: {r:?}"
        );
        let (start, end) = (
            r.api_start.expect("devices request"),
            r.api_end.expect("answered"),
        );
        assert!(
            start <= end && end <= r.dom,
            "the rows come from its answer: {r:?}"
        );
    }

    assert_eq!(run.console_tallies.len(), 2);
    for t in &run.console_tallies {
        assert_eq!(
            t.by_kind.get("telemetry").copied().unwrap_or(0),
            0,
            "the console's feed leaves telemetry out: {t:?}"
        );
        assert!(
            t.by_kind.get("app").copied().unwrap_or(0) > 0,
            "a console receives the apps made meanwhile: {t:?}"
        );
        assert_eq!(t.lagged(), 0, "{t:?}");
    }
    assert!(
        run.page_stream.events > 0,
        "the page's EventSource receives changes"
    );
    assert_eq!(run.page_live, "live");
    assert_eq!(run.page_stream_opened, 1, "the page kept its one stream");
    assert!(
        run.uncoalesced_tally
            .by_kind
            .get("telemetry")
            .copied()
            .unwrap_or(0)
            > 0,
        "{:?}",
        run.uncoalesced_tally
    );
    assert!(run.stream_errors.is_empty(), "{:?}", run.stream_errors);
    for p in [&run.baseline, &run.consoles, &run.uncoalesced] {
        assert!(p.series.is_some() && p.wall >= a.duration);
    }

    let tables = run.tables(CONSOLE_AGENTS, &a);
    for t in &tables {
        // Shown when the test fails, or with --no-capture.
        eprintln!("{}", t.markdown());
    }
    assert_eq!(tables.len(), 2);
    assert_eq!(
        tables[0].rows.len(),
        4,
        "baseline, consoles, the page, uncoalesced"
    );
    assert!(
        tables[1]
            .rows
            .iter()
            .any(|r| r[0].starts_with("first render")),
        "{}",
        tables[1].markdown()
    );

    fleet.shutdown(Duration::from_secs(5)).await;
    orch.stop().await;
}
