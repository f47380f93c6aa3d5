//! Zero-touch discovery over real multicast DNS: a real `drover serve` in
//! one network namespace announces itself, a real `drover-agent` with no
//! `--broker` in another finds it across a veth pair, enrolls with its
//! token and comes online. Where two orchestrators answer, the agent
//! refuses to guess and names both.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_tests::netns::{NetPair, ADDR_A};
use drover_tests::{binary, unique};
use serde_json::json;

/// A `drover serve` inside a namespace, its API on that namespace's
/// loopback, its broker on every address (so it announces itself).
struct NsOrch {
    ns: String,
    api: String,
    token: String,
    log: PathBuf,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl NsOrch {
    async fn start(ns: &str, name: &str, api_port: u16, mqtt_port: u16) -> NsOrch {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("drover.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = NetPair::command(ns, &binary("drover"))
            .arg("serve")
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .args(["--mqtt-listen", &format!("0.0.0.0:{mqtt_port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--mdns-name", name])
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn drover serve");
        let api = format!("http://127.0.0.1:{api_port}");
        NetPair::wait_http(ns, &format!("{api}/healthz"), Duration::from_secs(30)).await;
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        NsOrch {
            ns: ns.to_string(),
            api,
            token,
            log,
            child,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        NetPair::curl(
            &self.ns,
            method,
            &format!("{}{path}", self.api),
            &self.token,
            body,
        )
        .await
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A `drover-agent` with no `--broker` inside a namespace.
fn agent(
    ns: &str,
    id: &str,
    state: &std::path::Path,
    log: &std::path::Path,
    token: Option<&str>,
) -> tokio::process::Child {
    let file = std::fs::File::create(log).expect("log file");
    let mut cmd = NetPair::command(ns, &binary("drover-agent"));
    cmd.args(["--device-id", id])
        .arg("--state-dir")
        .arg(state)
        .args([
            "--discover-secs",
            "2",
            "--heartbeat-secs",
            "1",
            "--keep-alive-secs",
            "2",
        ])
        .env_remove("DROVER_BROKER")
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().expect("log file"))
        .stderr(file);
    match token {
        Some(t) => cmd.env("DROVER_ENROLL_TOKEN", t),
        None => cmd.env_remove("DROVER_ENROLL_TOKEN"),
    };
    cmd.spawn().expect("spawn drover-agent")
}

#[tokio::test]
async fn an_agent_without_broker_finds_the_orchestrator_and_enrolls() {
    let lan = NetPair::new();
    let name = unique("barn");
    let mut orch = NsOrch::start(&lan.a, &name, 18080, 1883).await;
    let id = unique("found");
    let (s, v) = orch
        .call(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(&json!({"ttl_secs": 600, "uses": 1, "device_id": id})),
        )
        .await;
    assert_eq!(s, 201, "enrollment token: {v}");
    let token = v["token"].as_str().expect("token").to_string();

    let state = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let agent_log = logs.path().join("agent.log");
    let started = Instant::now();
    let mut child = agent(&lan.b, &id, state.path(), &agent_log, Some(&token));

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, d) = orch
            .call("GET", &format!("/api/v1/devices/{id}"), None)
            .await;
        if s == 200 && d["online"] == json!(true) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the agent exited ({status}):\n{}\norchestrator:\n{}",
                std::fs::read_to_string(&agent_log).unwrap_or_default(),
                orch.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "device {id} not online after 60 s; agent:\n{}\norchestrator:\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(),
            orch.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("discovered, enrolled and online in {:?}", started.elapsed());
    let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(
        text.contains(&format!(
            "found Drover orchestrator \"{name}\" at {ADDR_A}:1883"
        )),
        "the agent's log names the orchestrator it found:\n{text}"
    );
    let orch_log = orch.log_text();
    assert!(
        orch_log.contains("announcing this orchestrator"),
        "{orch_log}"
    );

    // On shutdown the orchestrator withdraws its announcement.
    let _ = child.start_kill();
    let pid = orch.child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), orch.child.wait())
        .await
        .expect("drover serve stops within 30 s after SIGTERM")
        .expect("status");
    assert!(status.success(), "{status}\n{}", orch.log_text());
    assert!(
        orch.log_text()
            .contains("stopped announcing this orchestrator"),
        "{}",
        orch.log_text()
    );
}

#[tokio::test]
async fn with_two_orchestrators_the_agent_refuses_to_guess() {
    let lan = NetPair::new();
    let (barn, field) = (unique("barn"), unique("field"));
    let _one = NsOrch::start(&lan.a, &barn, 18080, 1883).await;
    let _two = NsOrch::start(&lan.a, &field, 18081, 1884).await;

    let state = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let agent_log = logs.path().join("agent.log");
    let mut child = agent(&lan.b, &unique("torn"), state.path(), &agent_log, None);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent kept running with two orchestrators:\n{}",
                std::fs::read_to_string(&agent_log).unwrap_or_default()
            )
        })
        .expect("status");
    let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(!status.success(), "{status}\n{text}");
    assert!(
        text.contains("several Drover orchestrators answered")
            && text.contains(&barn)
            && text.contains(&field)
            && text.contains("--discover-name"),
        "the agent names both and how to pick one:\n{text}"
    );
}
