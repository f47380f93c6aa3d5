//! The OpenAPI document: it lists exactly the routes the router serves, and
//! a running `drover serve` keeps every promise it makes (schemathesis).

use std::collections::BTreeSet;
use std::time::Duration;

use drover_tests::schemathesis::{self, Outcome};
use drover_tests::{unique, wait_for, Agent, Orch, OrchProc, BASE_REPO, BASE_TAG, REGISTRY};
use serde_json::{json, Value};

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// (method, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            let m = method.to_ascii_uppercase();
            if METHODS.contains(&m.as_str()) {
                ops.insert((m, path.clone()));
            }
        }
    }
    ops
}

/// The routes README.md's REST API table names, `METHOD /path` in
/// backticks: a list written by hand, independent of the code.
fn readme_routes() -> BTreeSet<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split_once("\n## REST API\n")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
        .expect("README has a REST API section");
    let mut routes = BTreeSet::new();
    for span in section.split('`').skip(1).step_by(2) {
        if let Some((method, path)) = span.split_once(' ') {
            if METHODS.contains(&method) && path.starts_with('/') && !path.contains(' ') {
                routes.insert((method.to_string(), path.to_string()));
            }
        }
    }
    routes
}

/// Whether a response is the router's own "there is no such route":
/// its fallback's 404, or a 405 for a method the path does not take.
fn unrouted(status: u16, body: &str) -> bool {
    status == 405 || (status == 404 && body.contains("no such endpoint"))
}

#[tokio::test]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let orch = Orch::start().await;
    let http = reqwest::Client::new();
    let base = orch.api.base.clone();

    // Public: no token needed.
    let resp = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await
        .expect("reachable");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json")));
    let doc: Value = resp.json().await.expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert_eq!(
        doc,
        serde_json::to_value(drover::http::openapi()).expect("serializes"),
        "the served document is the one the library builds"
    );
    let documented = operations(&doc);

    // The hand-written list in README.md names the same operations.
    let readme = readme_routes();
    assert_eq!(
        readme.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in README.md but not in the document"
    );
    assert_eq!(
        documented.difference(&readme).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in the document but not in README.md"
    );

    // Every documented path, with every method: the documented ones reach
    // a handler, the others are refused by the router. A parameter gets a
    // value valid for every kind of identifier (device id, name, host).
    let token = orch.api.token.clone().expect("admin token");
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for path in paths {
        let concrete = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "probe-1" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in METHODS {
            let mut req = http
                .request(method.parse().expect("method"), format!("{base}{concrete}"))
                .bearer_auth(&token)
                .timeout(Duration::from_secs(10));
            if matches!(method, "POST" | "PUT" | "PATCH") {
                req = req.header("content-type", "application/json").body("{}");
            }
            let resp = req.send().await.expect("reachable");
            let status = resp.status().as_u16();
            let is_stream = resp
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // The change stream never ends: its headers say enough.
            let body = if is_stream {
                String::new()
            } else {
                resp.text().await.unwrap_or_default()
            };
            let served = !unrouted(status, &body);
            let is_documented = documented.contains(&(method.to_string(), path.clone()));
            assert_eq!(
                served, is_documented,
                "{method} {concrete} answered {status} {body}; documented: {is_documented}"
            );
        }
    }

    // The check above can tell: a path the router does not have is
    // refused the same way.
    let resp = http
        .get(format!("{base}/api/v1/nothing-here"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("reachable");
    let status = resp.status().as_u16();
    assert!(unrouted(status, &resp.text().await.unwrap_or_default()));
    orch.stop().await;
}

fn schemathesis_args(url: &str, token: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        url,
        "--header",
        &format!("Authorization: Bearer {token}"),
        // Everything the document promises about responses; not
        // `positive_data_acceptance`: a well-formed deploy of an app that
        // does not exist is rightly refused.
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
        "--max-examples",
        "10",
        "--request-timeout",
        "30",
        // One worker: hypothesis describes its filters by parsing source,
        // which Python 3.11's parser does not survive from two threads.
        "--workers",
        "1",
        "--no-color",
        "--output-truncate",
        "true",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args
}

async fn schemathesis_run(what: &str, args: Vec<String>) {
    let Outcome { success, output } =
        schemathesis::run("schemathesis", &args, Duration::from_secs(240)).await;
    assert!(success, "schemathesis ({what}) found problems:\n{output}");
    // A run that tested nothing would pass too.
    assert!(
        output.contains("passed") && !output.contains("No operations"),
        "schemathesis ({what}) tested nothing:\n{output}"
    );
    // The summary, for whoever reads the test's output.
    let lines: Vec<&str> = output.lines().collect();
    eprintln!(
        "schemathesis ({what}):\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_keeps_every_promise_of_its_document() {
    let orch = OrchProc::start().await;
    let api = &orch.api;
    let token = api.token.clone().expect("admin token");
    let url = format!("{}/api/v1/openapi.json", api.base);

    // Something to show: a device with inventory, telemetry and an app
    // running, an operation, registry credentials, an automation identity.
    let device = unique("oa");
    let _agent = Agent::spawn(&orch.broker_url(), &device);
    wait_for(Duration::from_secs(30), "the device reports", || async {
        let d = api.device(&device).await?;
        (d["online"] == json!(true) && !d["inventory"].is_null() && !d["telemetry"].is_null())
            .then_some(())
    })
    .await;
    let app = unique("oaapp");
    api.create_app(&app, &format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}"))
        .await;
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{device}/apps"),
            &json!({ "app": app }),
        )
        .await;
    assert_eq!(s, 202, "deploy: {op}");
    let op = api.wait_op(&op, Duration::from_secs(60)).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let op_id = op["id"].as_str().expect("operation id").to_string();
    let (s, v) = api
        .send_json(
            reqwest::Method::PUT,
            "/api/v1/registries/127.0.0.1:5001",
            &json!({"username": "someone", "password": "secret"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .post("/api/v1/mqtt-users", &json!({"name": unique("oauser")}))
        .await;
    assert_eq!(s, 201, "{v}");

    // The change stream, which never ends and so is not for schemathesis:
    // what it sends must match the document's `Change`.
    check_change_stream(&orch, &device, &app, &url).await;

    // 1: every operation but the change stream and token deletion, with
    // identifiers of schemathesis's own making.
    schemathesis_run(
        "generated identifiers",
        schemathesis_args(
            &url,
            &token,
            &[
                "--exclude-path",
                "/api/v1/changes",
                "--exclude-path",
                "/api/v1/tokens/{id}",
            ],
        ),
    )
    .await;

    // 2: the operations that take an identifier, with the ones that exist,
    // so their success answers are checked too.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path-regex = "^/api/v1/devices/\\{{id\\}}"
parameters = {{ id = "{device}", app = "{app}" }}

[[operations]]
include-path-regex = "^/api/v1/apps/\\{{name\\}}$"
parameters = {{ name = "{app}" }}

[[operations]]
include-path-regex = "^/api/v1/registries/\\{{host\\}}$"
parameters = {{ host = "127.0.0.1:5001" }}

[[operations]]
include-path-regex = "^/api/v1/operations/\\{{id\\}}$"
parameters = {{ id = "{op_id}" }}
"#
        ),
    )
    .expect("write config");
    let mut args = vec!["--config-file".to_string(), config.display().to_string()];
    args.extend(schemathesis_args(
        &url,
        &token,
        &[
            "--include-path-regex",
            r"^/api/v1/(devices|apps|registries|operations)/\{",
        ],
    ));
    schemathesis_run("existing identifiers", args).await;

    // 3: deleting tokens last: it may delete the admin token the runs use.
    // Once with identifiers of its own, once with a token that exists.
    schemathesis_run(
        "token deletion",
        schemathesis_args(&url, &token, &["--include-path", "/api/v1/tokens/{id}"]),
    )
    .await;
    let (s, viewer) = api
        .post(
            "/api/v1/tokens",
            &json!({"name": unique("oaviewer"), "role": "viewer"}),
        )
        .await;
    assert_eq!(s, 201, "{viewer}");
    let viewer_id = viewer["id"].as_str().expect("token id");
    let config = dir.path().join("tokens.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path = "/api/v1/tokens/{{id}}"
parameters = {{ id = "{viewer_id}" }}
"#
        ),
    )
    .expect("write config");
    let mut args = vec!["--config-file".to_string(), config.display().to_string()];
    args.extend(schemathesis_args(
        &url,
        &token,
        &["--include-path", "/api/v1/tokens/{id}"],
    ));
    schemathesis_run("deleting a token that exists", args).await;
    let (_, tokens) = api.get("/api/v1/tokens").await;
    assert!(
        !tokens.to_string().contains(viewer_id),
        "schemathesis deleted the viewer token: {tokens}"
    );
}

/// Follows `/api/v1/changes` while the device stops and starts the app,
/// and checks every event against the document's `Change` schema with a
/// JSON Schema validator (the one schemathesis uses).
async fn check_change_stream(orch: &OrchProc, device: &str, app: &str, doc_url: &str) {
    let api = orch.api.clone();
    let token = api.token.clone().expect("token");
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/v1/changes", api.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("change stream");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")));
    let (s, op) = api
        .post(
            &format!("/api/v1/devices/{device}/apps/{app}/stop"),
            &json!({}),
        )
        .await;
    assert_eq!(s, 202, "stop: {op}");
    // Read until the stop has been seen to succeed (operation and state
    // changes, telemetry samples come along).
    let mut text = String::new();
    let mut events: Vec<Value> = Vec::new();
    let read = async {
        loop {
            let chunk = resp.chunk().await.expect("stream").expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some((event, rest)) = text.split_once("\n\n") {
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        events.push(serde_json::from_str(data.trim()).expect("JSON event"));
                    }
                }
                text = rest.to_string();
            }
            let done = events.iter().any(|e| {
                e["kind"] == "operation"
                    && e["operation"]["id"] == op["id"]
                    && e["operation"]["status"] == "succeeded"
            });
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stop shows up on the change stream");
    let doc: Value = reqwest::get(doc_url)
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({"doc": doc, "events": events})).expect("JSON"),
    )
    .expect("write events");
    let script = r##"
import json, sys
import jsonschema_rs
data = json.load(open(sys.argv[1]))
schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
          "$ref": "#/components/schemas/Change",
          "components": data["doc"]["components"]}
validator = jsonschema_rs.Draft202012Validator(schema)
kinds = set()
for event in data["events"]:
    errors = [e.message for e in validator.iter_errors(event)]
    if errors:
        print("event does not match Change:", json.dumps(event), errors)
        sys.exit(1)
    kinds.add(event["kind"])
print("checked", len(data["events"]), "events:", sorted(kinds))
"##;
    let Outcome { success, output } = schemathesis::run(
        "python",
        &[
            "-c".to_string(),
            script.to_string(),
            file.display().to_string(),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(success, "{output}");
    assert!(output.contains("'operation'"), "{output}");
}
