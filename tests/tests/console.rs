//! The web console's files as a browser gets them (no token, the right
//! types, a strict Content-Security-Policy), and the server-side paging
//! and filtering of `GET /api/v1/devices` its device list is built on.

use std::time::Duration;

use drover_shared::encode;
use drover_shared::payload::{Hello, Status};
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::DeviceId;
use drover_tests::*;
use serde_json::Value;

async fn fetch(url: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    if let Some(tag) = if_none_match {
        req = req.header("if-none-match", tag);
    }
    req.send().await.expect("server reachable")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_without_a_token_under_a_strict_policy() {
    let orch = Orch::start().await;
    let base = &orch.api.base;

    let index = fetch(&format!("{base}/"), None).await;
    assert_eq!(index.status(), 200);
    assert_eq!(header(&index, "content-type"), "text/html; charset=utf-8");
    let csp = header(&index, "content-security-policy");
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&index, "x-content-type-options"), "nosniff");
    assert_eq!(header(&index, "x-frame-options"), "DENY");
    assert_eq!(header(&index, "cache-control"), "no-cache");
    let etag = header(&index, "etag");
    let html = index.text().await.expect("body");
    assert!(html.contains(r#"src="/console/app.js""#), "{html}");

    for (file, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("devices.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("index.html", "text/html; charset=utf-8"),
    ] {
        let resp = fetch(&format!("{base}/console/{file}"), None).await;
        assert_eq!(resp.status(), 200, "{file}");
        assert_eq!(header(&resp, "content-type"), content_type, "{file}");
        assert!(
            header(&resp, "content-security-policy").starts_with("default-src 'self'"),
            "{file}"
        );
        assert_eq!(header(&resp, "x-content-type-options"), "nosniff");
        assert!(!resp.bytes().await.expect("body").is_empty(), "{file}");
    }

    // Revalidation: an unchanged file is a 304 without a body.
    let again = fetch(&format!("{base}/"), Some(&etag)).await;
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), etag);
    let other = fetch(&format!("{base}/console/app.js"), Some(&etag)).await;
    assert_eq!(other.status(), 200, "another file's tag does not match");

    // Unknown files are a 404, and nothing outside the folder is reachable.
    for path in [
        "/console/nope.js",
        "/console/",
        "/console/..%2FCargo.toml",
        "/console/vendor/x.js",
    ] {
        let resp = fetch(&format!("{base}{path}"), None).await;
        assert_eq!(resp.status(), 404, "{path}");
        let body: Value = resp.json().await.expect("JSON error");
        assert_eq!(body["error"]["status"], 404, "{path}: {body}");
    }

    // The files are public; the API behind them is not.
    let api = fetch(&format!("{base}/api/v1/devices"), None).await;
    assert_eq!(api.status(), 401);

    // Not API: the OpenAPI document leaves them out.
    let (s, doc) = orch.api.get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(
        !paths.contains_key("/"),
        "the console is not in the document"
    );
    assert!(paths.keys().all(|p| !p.starts_with("/console")));
    orch.stop().await;
}

async fn device_page(orch: &Orch, query: &str) -> (u16, Option<u64>, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/devices{query}", orch.api.base))
        .bearer_auth(orch.api.token.as_deref().expect("token"))
        .send()
        .await
        .expect("API reachable");
    let status = resp.status().as_u16();
    let total = resp
        .headers()
        .get("x-total-count")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (status, total, resp.json().await.expect("JSON"))
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_filtered_and_paged_by_the_server() {
    let orch = Orch::start_open().await;
    let topics = Topics::default();
    // Twelve devices: pg-00..pg-11, hostnames Node-00.., env=prod on every
    // third; the first four go offline.
    for i in 0..12 {
        let id = DeviceId::new(format!("pg-{i:02}")).expect("id");
        let hello = Hello {
            hostname: format!("Node-{i:02}"),
            labels: [(
                "env".to_string(),
                if i % 3 == 0 { "prod" } else { "dev" }.to_string(),
            )]
            .into(),
            ..Hello::default()
        };
        mosquitto_pub(
            orch.mqtt_port,
            &topics.device(&id, TopicKind::Hello),
            &encode(&hello),
            false,
        )
        .await;
        if i < 4 {
            mosquitto_pub(
                orch.mqtt_port,
                &topics.device(&id, TopicKind::Status),
                &encode(&Status {
                    online: false,
                    at_ms: 1,
                }),
                false,
            )
            .await;
        }
    }
    wait_for(Duration::from_secs(20), "12 devices, 4 offline", || async {
        let (_, total, _) = device_page(&orch, "?status=offline").await;
        let (_, all, _) = device_page(&orch, "").await;
        (all == Some(12) && total == Some(4)).then_some(())
    })
    .await;

    // Without paging: every device, as before, and the total.
    let (s, total, v) = device_page(&orch, "").await;
    assert_eq!((s, total), (200, Some(12)));
    assert_eq!(ids(&v).len(), 12);

    // Pages in id order; the total counts every match.
    let (s, total, v) = device_page(&orch, "?limit=5&offset=5").await;
    assert_eq!((s, total), (200, Some(12)));
    assert_eq!(ids(&v), ["pg-05", "pg-06", "pg-07", "pg-08", "pg-09"]);
    let (_, total, v) = device_page(&orch, "?limit=5&offset=10").await;
    assert_eq!(
        (total, ids(&v)),
        (Some(12), vec!["pg-10".into(), "pg-11".into()])
    );
    let (_, total, v) = device_page(&orch, "?limit=5&offset=50").await;
    assert_eq!((total, ids(&v).len()), (Some(12), 0));

    // Status, text (id or hostname, any case) and selector, together.
    let (_, total, v) = device_page(&orch, "?status=offline&limit=2").await;
    assert_eq!(
        (total, ids(&v)),
        (Some(4), vec!["pg-00".into(), "pg-01".into()])
    );
    assert!(v
        .as_array()
        .expect("list")
        .iter()
        .all(|d| d["online"] == false));
    let (_, total, _) = device_page(&orch, "?status=online").await;
    assert_eq!(total, Some(8));
    let (_, total, v) = device_page(&orch, "?q=node-1").await;
    assert_eq!(
        (total, ids(&v)),
        (Some(2), vec!["pg-10".into(), "pg-11".into()])
    );
    let (_, total, v) = device_page(&orch, "?q=PG-0").await;
    assert_eq!((total, ids(&v).len()), (Some(10), 10));
    let (_, total, v) = device_page(&orch, "?selector=env%3Dprod&status=online").await;
    assert_eq!(
        (total, ids(&v)),
        (Some(2), vec!["pg-06".into(), "pg-09".into()])
    );

    // Bad parameters are a 400 naming the parameter.
    let long = "x".repeat(300);
    for (query, field) in [
        ("?status=maybe", "status"),
        ("?limit=0", "limit"),
        ("?limit=10001", "limit"),
        ("?offset=-1", "offset"),
        ("?offset=many", "offset"),
        (&format!("?q={long}") as &str, "q"),
        ("?selector=env%20in%20(prod", "selector"),
    ] {
        let (s, _, v) = device_page(&orch, query).await;
        assert_eq!(s, 400, "{query}: {v}");
        assert_eq!(v["error"]["field"], field, "{query}: {v}");
    }
    orch.stop().await;
}
