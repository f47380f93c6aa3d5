//! `/metrics` against a real Prometheus (Debian's `prometheus` and
//! `promtool`, installed by scripts/test-env.sh): an orchestrator with a
//! real agent and a deploy, `promtool check metrics` on the exposition, a
//! Prometheus of the test's own scraping it every second, and every panel
//! query of every dashboard in `dashboards/` answered with data by that
//! Prometheus.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use drover_tests::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const TIMEOUT: Duration = Duration::from_secs(90);
/// What the dashboards' Grafana variables stand for here: windows long
/// enough to hold the deploy done after Prometheus started, at a 1 s
/// scrape interval.
const RATE_INTERVAL: &str = "1m";
const INTERVAL: &str = "15s";
const RANGE: &str = "5m";

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// A program of Debian's `prometheus` package; missing is a failure, as
/// for every service the tests need.
fn prometheus_bin(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing; run `bash scripts/test-env.sh` (it installs Debian's prometheus)"
        )
    })
}

/// `promtool check metrics` on an exposition: its output when it fails.
async fn promtool_check(body: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new(prometheus_bin("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run promtool");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(body.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool ran longer than 30 s")
        .expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// A Prometheus scraping `target` (host:port) every second, on a free
/// loopback port, with its config and data in a temporary directory.
struct Prometheus {
    base: String,
    http: reqwest::Client,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: drover\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = tokio::process::Command::new(prometheus_bin("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _child: child,
            _dir: dir,
        };
        let log = p._dir.path().join("prometheus.log");
        wait_for(Duration::from_secs(60), "prometheus ready", || async {
            let r = p
                .http
                .get(format!("{}/-/ready", p.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        // The target up and scraped (OpenMetrics parsed) at least once.
        let up = wait_for(Duration::from_secs(30), "a successful scrape", || async {
            let r = p.query("up").await.ok()?;
            let v = r.first()?["value"][1].as_str()?.to_string();
            (v == "1").then_some(v)
        })
        .await;
        assert_eq!(
            up,
            "1",
            "{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        p
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = self
            .http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if v["status"] != json!("success") {
            return Err(v.to_string());
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of an instant query, once it has one.
    async fn value(&self, expr: &str) -> f64 {
        wait_for(Duration::from_secs(30), expr, || async {
            let r = self.query(expr).await.ok()?;
            r.first()?["value"][1].as_str()?.parse().ok()
        })
        .await
    }
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// A query with the Grafana variables it uses replaced.
fn substitute(expr: &str, device: &str) -> String {
    expr.replace("${device}", device)
        .replace("$device", device)
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", INTERVAL)
        .replace("$__range", RANGE)
}

/// (dashboard, panel, expression) for every query of every dashboard,
/// and the metric of every `label_values(metric, label)` variable.
fn queries(device: &str) -> Vec<(String, String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("dashboards/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "dashboards: {files:?}");
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).expect("read"))
            .unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        assert!(
            d["uid"].is_string() && d["title"].is_string(),
            "{name}: no uid or title"
        );
        let mut n = 0;
        for p in panels(&d) {
            if p["type"] == json!("row") {
                continue;
            }
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{name}: panel {title:?} has no query");
            for t in targets {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: panel {title:?}: a target without expr"));
                out.push((name.clone(), title.clone(), substitute(expr, device)));
                n += 1;
            }
        }
        assert!(n > 0, "{name}: no panel queries");
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let def = v["definition"].as_str().unwrap_or_default();
            if let Some(args) = def
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
            {
                let metric = args.split(',').next().unwrap_or_default().trim();
                out.push((
                    name.clone(),
                    format!("variable {}", v["name"]),
                    metric.to_string(),
                ));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_drover_and_every_dashboard_panel_has_data() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let agent = Agent::spawn(&orch.broker_url(), &unique("prom"));
    wait_for(
        Duration::from_secs(30),
        "device online with telemetry",
        || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true) && d["telemetry"].is_object())
        },
    )
    .await;
    let target = api.base.trim_start_matches("http://").to_string();
    let prom = Prometheus::start(&target).await;

    // A deploy while Prometheus scrapes: operation counters and both
    // histograms get observations inside the dashboards' windows.
    let app = unique("metrics");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({"app": app}),
        )
        .await;
    assert_eq!(s, 202, "{op}");
    assert_eq!(
        api.wait_op(&op, TIMEOUT).await["status"],
        json!("succeeded")
    );

    // The classic text format (no Accept header) passes promtool's lint.
    let r = reqwest::get(format!("{}/metrics", api.base))
        .await
        .expect("GET /metrics");
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = r.text().await.expect("body");
    if let Err(out) = promtool_check(&body).await {
        panic!("promtool check metrics failed:\n{out}\n--- /metrics:\n{body}");
    }
    for name in [
        "drover_devices{status=\"online\"} 1",
        "drover_device_online{device=",
        "drover_operation_duration_seconds_bucket{",
        "drover_command_round_trip_seconds_count ",
        "drover_rule_firings_total{outcome=\"cut\"} 0",
        "drover_mqtt_requests_total{outcome=\"refused\"} 0",
        "drover_webhook_failures_total 0",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    // What Prometheus asks for: OpenMetrics, ending in `# EOF`.
    let om = reqwest::Client::new()
        .get(format!("{}/metrics", api.base))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("GET /metrics");
    assert!(om.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(om.text().await.expect("body").ends_with("# EOF\n"));

    // Values as Prometheus has them, not only their presence.
    let id = &agent.id;
    assert_eq!(prom.value("drover_devices{status=\"online\"}").await, 1.0);
    let running = format!("drover_app_running_devices{{app=\"{app}\"}}");
    wait_for(TIMEOUT, "the app running in Prometheus", || async {
        (prom.value(&running).await == 1.0).then_some(())
    })
    .await;
    let deploys = "drover_operations_total{kind=\"deploy\",outcome=\"succeeded\"}";
    wait_for(TIMEOUT, "the deploy counted in Prometheus", || async {
        (prom.value(deploys).await >= 1.0).then_some(())
    })
    .await;
    assert!(
        prom.value(&format!(
            "drover_device_memory_total_bytes{{device=\"{id}\"}}"
        ))
        .await
            > 0.0
    );
    assert_eq!(
        prom.value(&format!("drover_device_online{{device=\"{id}\"}}"))
            .await,
        1.0
    );

    // Every panel of every dashboard has data.
    let all = queries(id);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut empty = Vec::new();
    for (dashboard, panel, expr) in &all {
        let got = loop {
            let r = prom.query(expr).await;
            match &r {
                Ok(v) if !v.is_empty() => break r,
                Err(e) if e.contains("bad_data") => break r,
                _ if Instant::now() >= deadline => break r,
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        match got {
            Ok(v) if !v.is_empty() => {}
            Ok(_) => empty.push(format!("{dashboard}: panel {panel:?}: no data for {expr}")),
            Err(e) => empty.push(format!("{dashboard}: panel {panel:?}: {expr}: {e}")),
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        empty.len(),
        all.len(),
        empty.join("\n")
    );
    orch.stop().await;
}

/// `drover serve --metrics-per-device=false` leaves out the per-device
/// series (the fleet-wide ones stay); a value that is not a boolean is
/// refused, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_device_gauges_can_be_turned_off_and_the_flag_is_checked() {
    let out = tokio::process::Command::new(binary("drover"))
        .args(["serve", "--metrics-per-device=maybe"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run drover serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--metrics-per-device") && err.contains("maybe"),
        "{err}"
    );

    let orch = OrchProc::start_with(&["--metrics-per-device=false"], None).await;
    let agent = Agent::spawn(&orch.broker_url(), &unique("noper"));
    wait_for(
        Duration::from_secs(30),
        "device online with telemetry",
        || async {
            orch.api
                .device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true) && d["telemetry"].is_object())
        },
    )
    .await;
    let body = reqwest::get(format!("{}/metrics", orch.api.base))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    assert!(
        body.contains("drover_devices{status=\"online\"} 1"),
        "{body}"
    );
    assert!(!body.contains("drover_device_"), "{body}");
    if let Err(out) = promtool_check(&body).await {
        panic!("promtool check metrics failed:\n{out}\n--- /metrics:\n{body}");
    }
}
