//! Telemetry history and container logs kept by the orchestrator, end to
//! end: a real agent's telemetry becomes a series over REST, a line a
//! container prints is returned by the logs endpoint and printed by
//! `drover logs -f`, and all of it survives a SIGKILL of the orchestrator
//! (`drover serve` as a process) while the follower reconnects without
//! printing a line twice.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_tests::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const MARK: &str = "history-line";

/// `drover logs ... -f` running, its output lines gathered as they come.
struct Follower {
    child: tokio::process::Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn spawn(api: &Api, args: &[&str]) -> Follower {
        let mut cmd = tokio::process::Command::new(binary("drover"));
        cmd.arg("--api").arg(&api.base).args(args);
        cmd.current_dir(std::env::temp_dir())
            .env_remove("DROVER_TOKEN");
        if let Some(t) = &api.token {
            cmd.env("DROVER_TOKEN", t);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run drover logs -f");
        let gather = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let into = lines.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(pipe).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    into.lock().expect("lock").push(l);
                }
            });
            lines
        };
        let out = gather(Box::new(child.stdout.take().expect("stdout")));
        let err = gather(Box::new(child.stderr.take().expect("stderr")));
        Follower { child, out, err }
    }

    /// The numbers of the marked lines printed so far, in print order.
    fn numbers(&self) -> Vec<u64> {
        self.out
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{MARK} ")))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }

    fn stderr(&self) -> String {
        self.err.lock().expect("lock").join("\n")
    }
}

/// The numbers of the marked lines in a logs response.
fn numbers(lines: &Value) -> Vec<u64> {
    lines
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|l| l["line"].as_str()?.strip_prefix(&format!("{MARK} ")))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn at_ms(series: &Value) -> Vec<u64> {
    series["points"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["at_ms"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_logs_are_kept_followed_and_survive_a_sigkill() {
    init_tracing();
    let mut orch = OrchProc::start().await;
    let id = unique("hist");
    let _agent = Agent::spawn(&orch.broker_url(), &id);
    wait_for(Duration::from_secs(30), "device online", || async {
        orch.api
            .device(&id)
            .await
            .filter(|d| d["online"] == json!(true))
    })
    .await;

    let app = unique("histapp");
    let image = fresh_image(&unique("hist")).await;
    let script = format!("i=0; while true; do echo \"{MARK} $i\"; i=$((i+1)); sleep 0.3; done");
    let (s, v) = orch
        .api
        .post(
            "/api/v1/apps",
            &json!({"name": app, "containers": [
                {"name": "main", "image": image, "command": ["sh", "-c", script]}
            ]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, op) = orch
        .api
        .post(&format!("/api/v1/devices/{id}/apps"), &json!({"app": app}))
        .await;
    assert_eq!(s, 202, "{op}");
    let op = orch.api.wait_op(&op, Duration::from_secs(90)).await;
    assert_eq!(op["status"], json!("succeeded"), "{op}");

    // (a) The agent's telemetry (a sample a second here) is a raw series,
    // and the container shows in it once Docker has two stats samples.
    let telemetry = format!("/api/v1/devices/{id}/telemetry");
    let series = wait_for(Duration::from_secs(30), "telemetry history", || async {
        let (s, v) = orch.api.get(&format!("{telemetry}?resolution=raw")).await;
        assert_eq!(s, 200, "{v}");
        let with_app = v["points"].as_array()?.iter().any(|p| {
            p["containers"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["app"] == json!(app)))
        });
        (at_ms(&v).len() >= 5 && with_app).then_some(v)
    })
    .await;
    assert_eq!(series["resolution"], json!("raw"));
    let raw = at_ms(&series);
    assert!(raw.windows(2).all(|w| w[0] < w[1]), "time order: {raw:?}");
    assert!(series["points"][0]["host"]["memory_total_bytes"].as_u64() > Some(0));
    // `auto` over the last hour is raw; five-minute buckets hold the same
    // samples.
    let (_, auto) = orch.api.get(&telemetry).await;
    assert_eq!(auto["resolution"], json!("raw"), "{auto}");
    let (_, buckets) = orch.api.get(&format!("{telemetry}?resolution=5m")).await;
    let samples: u64 = buckets["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["samples"].as_u64())
        .sum();
    assert!(samples >= raw.len() as u64, "{buckets}");
    let (s, bad) = orch.api.get(&format!("{telemetry}?resolution=1h")).await;
    assert_eq!(
        (s, bad["error"]["field"].clone()),
        (400, json!("resolution"))
    );

    // (b) A line the container printed is returned by the logs endpoint...
    let logs = format!("/api/v1/devices/{id}/logs?app={app}&container=main&tail=10000");
    let before = wait_for(Duration::from_secs(30), "log lines over REST", || async {
        let (s, v) = orch.api.get(&logs).await;
        assert_eq!(s, 200, "{v}");
        (numbers(&v).len() >= 3).then_some(v)
    })
    .await;
    let before = numbers(&before);
    assert!(before.windows(2).all(|w| w[0] < w[1]), "{before:?}");
    // ...and printed by `drover logs -f`: the tail first, then new lines.
    let follower = Follower::spawn(
        &orch.api,
        &["logs", &id, &app, "-c", "main", "--tail", "2", "-f"],
    );
    let first = wait_for(
        Duration::from_secs(30),
        "drover logs -f printing",
        || async {
            let n = follower.numbers();
            (n.len() >= 5).then_some(n)
        },
    )
    .await;
    assert!(
        first[0] >= before[before.len() - 2],
        "the tail came first: {first:?} after {before:?}"
    );

    // (c) SIGKILL: the history was committed as it was read.
    let (_, series_before) = orch.api.get(&format!("{telemetry}?resolution=raw")).await;
    let raw_before: BTreeSet<u64> = at_ms(&series_before).into_iter().collect();
    let (_, lines_before) = orch.api.get(&logs).await;
    let lines_before: BTreeSet<u64> = numbers(&lines_before).into_iter().collect();
    orch.kill().await;
    let printed_at_kill = follower.numbers().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    orch.restart().await;

    let (s, series_after) = orch.api.get(&format!("{telemetry}?resolution=raw")).await;
    assert_eq!(s, 200, "{series_after}");
    let raw_after: BTreeSet<u64> = at_ms(&series_after).into_iter().collect();
    assert!(
        raw_before.is_subset(&raw_after),
        "samples lost in the restart: {:?}",
        raw_before.difference(&raw_after).collect::<Vec<_>>()
    );
    let (_, lines_after) = orch.api.get(&logs).await;
    let lines_after: BTreeSet<u64> = numbers(&lines_after).into_iter().collect();
    assert!(
        lines_before.is_subset(&lines_after),
        "lines lost in the restart: {:?}",
        lines_before.difference(&lines_after).collect::<Vec<_>>()
    );
    // New samples and lines come in again once the agent is back.
    let newest_before = raw_before.iter().max().copied().unwrap_or_default();
    wait_for(
        Duration::from_secs(60),
        "telemetry after the restart",
        || async {
            let (_, v) = orch.api.get(&format!("{telemetry}?resolution=raw")).await;
            at_ms(&v).iter().any(|t| *t > newest_before).then_some(())
        },
    )
    .await;

    // The follower reconnected by itself and goes on where it was, in
    // order, never printing a line twice.
    let newest_printed = follower.numbers().last().copied().unwrap_or_default();
    let after = wait_for(
        Duration::from_secs(60),
        "drover logs -f after the restart",
        || async {
            let n = follower.numbers();
            n.iter()
                .skip(printed_at_kill)
                .any(|x| *x > newest_printed + 3)
                .then_some(n)
        },
    )
    .await;
    assert!(
        after.windows(2).all(|w| w[0] < w[1]),
        "printed twice or out of order: {after:?}\nstderr: {}",
        follower.stderr()
    );
    assert!(
        follower.stderr().contains("reconnecting"),
        "{}",
        follower.stderr()
    );

    // Ctrl-C ends it cleanly.
    let mut follower = follower;
    let pid = follower.child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill -INT");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), follower.child.wait())
        .await
        .expect("drover logs -f ends on Ctrl-C")
        .expect("status");
    assert!(status.success(), "{status}: {}", follower.stderr());
}
