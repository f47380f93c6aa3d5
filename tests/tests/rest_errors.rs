//! Bad REST input gets a 4xx JSON error naming the field, and changes nothing.

use drover_tests::*;
use serde_json::json;

#[tokio::test]
async fn malformed_bodies_name_the_field() {
    let orch = Orch::start().await;
    let api = &orch.api;

    let cases = [
        (
            json!({"containers": [{"name": "main", "image": "busybox:1"}]}),
            "name",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main"}]}),
            "containers[0].image",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main", "image": "Bad Image"}]}),
            "containers[0].image",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main", "image": "busybox:1", "memory_mb": "lots"}]}),
            "containers[0].memory_mb",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main", "image": "busybox:1", "ports": [{"host": 0, "container": 80}]}]}),
            "containers[0].ports[0]",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main", "image": "busybox:1", "restart": "sometimes"}]}),
            "containers[0].restart",
        ),
        (
            json!({"name": "web", "containers": [{"name": "main", "image": "busybox:1", "imagee": "x"}]}),
            "containers[0].imagee",
        ),
        (
            json!({"name": "we/b", "containers": [{"name": "main", "image": "busybox:1"}]}),
            "name",
        ),
        (json!({"name": "web", "containers": []}), "containers"),
    ];
    for (body, field) in cases {
        let (s, v) = api.post("/api/v1/apps", &body).await;
        assert_eq!(s, 400, "{body} -> {v}");
        assert_eq!(v["error"]["field"], json!(field), "{body} -> {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "message names the field: {v}"
        );
    }

    for raw in ["{\"name\": ", "{bad", "{\"name\": \"web\",}"] {
        let (s, v) = api.post_raw("/api/v1/apps", raw).await;
        assert_eq!(s, 400, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not valid JSON"),
            "{v}"
        );
        // A syntax error is at a position, not in a field.
        assert!(v["error"].get("field").is_none(), "{raw}: {v}");
    }
    // Query strings: bad values and malformed ones are JSON errors naming
    // the parameter too.
    for (path, field) in [
        ("/api/v1/audit?limit=0", "limit"),
        ("/api/v1/audit?limit=1&limit=2", "limit"),
        ("/api/v1/operations?limit=x", "limit"),
        ("/api/v1/operations?device=a&device=b", "device"),
        ("/api/v1/audit?outcome=maybe", "outcome"),
    ] {
        let (s, v) = api.get(path).await;
        assert_eq!(
            (s, v["error"]["field"].clone()),
            (400, json!(field)),
            "{path}: {v}"
        );
    }
    let (s, _) = api.post_raw("/api/v1/apps", "").await;
    assert_eq!(s, 400);
    // serde would read an array positionally into a struct: refused.
    for path in [
        "/api/v1/apps",
        "/api/v1/enrollment-tokens",
        "/api/v1/tokens",
    ] {
        let (s, v) = api.post_raw(path, "[1, 2]").await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("JSON object"),
            "{v}"
        );
    }

    // Nothing was created by any of that.
    let (_, apps) = api.get("/api/v1/apps").await;
    assert_eq!(apps, json!([]));

    // A good app, then a duplicate.
    api.create_app("web", "busybox:1").await;
    let (s, v) = api
        .post(
            "/api/v1/apps",
            &json!({"name": "web", "containers": [{"name": "main", "image": "busybox:2"}]}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (409, json!("name")),
        "{v}"
    );
    let (_, v) = api.get("/api/v1/apps/web").await;
    assert_eq!(
        v["spec"]["containers"][0]["image"],
        json!("busybox:1"),
        "duplicate did not overwrite"
    );
    orch.stop().await;
}

#[tokio::test]
async fn unknown_things_are_404() {
    let orch = Orch::start().await;
    let api = &orch.api;
    api.create_app("web", "busybox:1").await;

    let (s, v) = api.get("/api/v1/devices/ghost").await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (404, json!("device")),
        "{v}"
    );
    let (s, v) = api
        .post("/api/v1/devices/ghost/apps", &json!({"app": "web"}))
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (404, json!("device")),
        "{v}"
    );
    let (s, _) = api
        .post("/api/v1/devices/ghost/apps/web/stop", &json!(null))
        .await;
    assert_eq!(s, 404);
    let (s, _) = api.delete("/api/v1/devices/ghost/apps/web").await;
    assert_eq!(s, 404);
    let (s, _) = api.get("/api/v1/devices/ghost/logs?app=web").await;
    assert_eq!(s, 404);
    let (s, v) = api.get("/api/v1/apps/nope").await;
    assert_eq!((s, v["error"]["field"].clone()), (404, json!("app")), "{v}");
    let (s, _) = api.get("/api/v1/operations/nope").await;
    assert_eq!(s, 404);
    let (s, v) = api.get("/api/v1/devices/bad%2Bid").await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("device")),
        "{v}"
    );
    let (s, v) = api.get("/api/v1/operations?limit=0").await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("limit")),
        "{v}"
    );
    let (s, _) = api.get("/api/v1/nothing-here").await;
    assert_eq!(s, 404);
    orch.stop().await;
}

#[tokio::test]
async fn what_axum_rejects_is_a_json_error_too() {
    let orch = Orch::start().await;
    let api = &orch.api;
    // Over the body limit, a method the route does not take, a path that
    // is not UTF-8: the API's JSON error, saying so.
    let huge = format!(
        "{{\"name\": \"{}\", \"containers\": []}}",
        "a".repeat(3 << 20)
    );
    let (s, v) = api
        .send_json(
            reqwest::Method::POST,
            "/api/v1/apps",
            &serde_json::from_str(&huge).expect("json"),
        )
        .await;
    assert_eq!(s, 413, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("limit"),
        "{v}"
    );
    let (s, v) = api
        .send_json(reqwest::Method::PATCH, "/api/v1/apps", &json!({}))
        .await;
    assert_eq!(s, 405, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("PATCH"),
        "{v}"
    );
    let (s, v) = api.get("/api/v1/devices/%FF").await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("UTF-8"),
        "{v}"
    );
    // Nothing was created.
    assert_eq!(api.get("/api/v1/apps").await.1, json!([]));
    orch.stop().await;
}

#[tokio::test]
async fn apps_can_be_replaced_but_not_renamed() {
    let orch = Orch::start().await;
    let api = &orch.api;
    api.create_app("web", "busybox:1").await;
    let v2 = json!({"name": "web", "containers": [{"name": "main", "image": "busybox:2", "env": {"A": "1"}}]});
    let (s, v) = api
        .send_json(reqwest::Method::PUT, "/api/v1/apps/web", &v2)
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = api.get("/api/v1/apps/web").await;
    assert_eq!(v["spec"]["containers"][0]["image"], json!("busybox:2"));
    assert!(v["updated_at_ms"].as_u64() >= v["created_at_ms"].as_u64());

    let (s, v) = api
        .send_json(reqwest::Method::PUT, "/api/v1/apps/other", &v2)
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("name")),
        "{v}"
    );
    let other = json!({"name": "other", "containers": [{"name": "main", "image": "busybox:2"}]});
    let (s, v) = api
        .send_json(reqwest::Method::PUT, "/api/v1/apps/other", &other)
        .await;
    assert_eq!((s, v["error"]["field"].clone()), (404, json!("app")), "{v}");
    let bad = json!({"name": "web", "containers": [{"name": "main", "image": ""}]});
    let (s, v) = api
        .send_json(reqwest::Method::PUT, "/api/v1/apps/web", &bad)
        .await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("containers[0].image")),
        "{v}"
    );
    let (_, v) = api.get("/api/v1/apps/web").await;
    assert_eq!(
        v["spec"]["containers"][0]["image"],
        json!("busybox:2"),
        "a rejected update changes nothing"
    );
    orch.stop().await;
}

#[tokio::test]
async fn change_stream_filters_are_checked() {
    let orch = Orch::start().await;
    let api = &orch.api;
    let (s, v) = api.get("/api/v1/changes?operation=no-such-op").await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (404, json!("operation")),
        "a filter on an unknown operation would be a stream that never says anything: {v}"
    );
    let (s, v) = api.get("/api/v1/changes?device=not%20a%20device").await;
    assert_eq!(
        (s, v["error"]["field"].clone()),
        (400, json!("device")),
        "{v}"
    );
    orch.stop().await;
}
