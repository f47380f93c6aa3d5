//! `POST /api/v1/apps/import` and `drover apps import` against a real
//! `drover serve`: a Compose file becomes an app with the spec it says,
//! and a file Drover cannot honour is refused by the key's path with
//! nothing created.

use drover_tests::*;
use serde_json::{json, Value};

/// Two services with what a small real stack uses: depends_on on a health
/// check, a named volume, ports, environment in both forms, a merge key.
fn two_services(image: &str) -> String {
    format!(
        r#"
name: ignored-when-the-query-names-the-app
x-common: &common
  restart: always
services:
  db:
    image: {image}
    command: ["sh", "-c", "touch /data/ready && sleep 3600"]
    environment:
      ROLE: db
    volumes:
      - dbdata:/data
    healthcheck:
      test: ["CMD", "test", "-f", "/data/ready"]
      interval: 2s
      timeout: 1s
      retries: 3
      start_period: 1m30s
    mem_limit: 64m
  web:
    <<: *common
    image: {image}
    command: httpd -f -p 80
    environment:
      - DB_HOST=db
    ports:
      - "18080:80"
      - "127.0.0.1:18081:81/udp"
    depends_on:
      db:
        condition: service_healthy
volumes:
  dbdata:
"#
    )
}

async fn import(api: &Api, query: &str, content_type: &str, body: String) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/apps/import{query}", api.base))
        .bearer_auth(api.token.as_deref().expect("token"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("API reachable");
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compose_file_becomes_an_app_or_is_refused_by_key() {
    let orch = OrchProc::start().await;
    let api = &orch.api;
    let image = format!("{REGISTRY}/{BASE_REPO}:{BASE_TAG}");
    let file = two_services(&image);

    // REST: created with the spec the file says, read back.
    let app = unique("compose");
    let (s, v) = import(
        api,
        &format!("?name={app}"),
        "application/yaml",
        file.clone(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, got) = api.get(&format!("/api/v1/apps/{app}")).await;
    assert_eq!(s, 200, "{got}");
    let spec = &got["spec"];
    assert_eq!(spec["name"], json!(app));
    let expected_db = json!({
        "name": "db",
        "image": image,
        "command": ["sh", "-c", "touch /data/ready && sleep 3600"],
        "env": {"ROLE": "db"},
        "volumes": [{"source": "dbdata", "target": "/data", "read_only": false}],
        "restart": "unless-stopped",
        "memory_mb": 64,
        "healthcheck": {
            "test": ["CMD", "test", "-f", "/data/ready"],
            "interval_ms": 2000,
            "timeout_ms": 1000,
            "retries": 3,
            "start_period_ms": 90000
        }
    });
    assert_eq!(spec["containers"][0], expected_db, "{spec}");
    let web = &spec["containers"][1];
    assert_eq!(web["name"], "web");
    assert_eq!(web["command"], json!(["httpd", "-f", "-p", "80"]));
    assert_eq!(web["env"], json!({"DB_HOST": "db"}));
    assert_eq!(web["restart"], "always", "from the merge key");
    assert_eq!(web["depends_on"], json!(["db"]));
    assert_eq!(web["ports"][0]["host"], 18080);
    assert_eq!(web["ports"][0]["container"], 80);
    assert_eq!(web["ports"][1]["host_ip"], "127.0.0.1");
    assert_eq!(web["ports"][1]["protocol"], "udp");
    assert_eq!(spec["containers"].as_array().map(Vec::len), Some(2));
    // The answer of the import is the app as stored.
    assert_eq!(v["spec"], *spec);

    // Importing it again is a conflict unless asked to replace.
    let (s, v) = import(api, &format!("?name={app}"), "text/yaml", file.clone()).await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = import(
        api,
        &format!("?name={app}&replace=false"),
        "application/x-yaml",
        file.clone(),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let changed = file.replace("ROLE: db", "ROLE: primary");
    let (s, v) = import(
        api,
        &format!("?name={app}&replace=true"),
        "text/plain; charset=utf-8",
        changed,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, got) = api.get(&format!("/api/v1/apps/{app}")).await;
    assert_eq!(got["spec"]["containers"][0]["env"]["ROLE"], "primary");

    // Refused by the key's path, and nothing created.
    let refused = [
        (
            file.replace("    <<: *common\n", "    <<: *common\n    build: .\n"),
            "services.web.build",
        ),
        (format!("{file}networks:\n  back: {{}}\n"), "networks"),
        (
            file.replace("      - dbdata:/data", "      - ./data:/data"),
            "services.db.volumes[0]",
        ),
        (
            file.replace(
                "      ROLE: db",
                "      ROLE: db\n    labels:\n      traefik.enable: \"true\"",
            ),
            "services.db.labels",
        ),
    ];
    for (body, key) in refused {
        let name = unique("refused");
        let (s, v) = import(api, &format!("?name={name}"), "application/yaml", body).await;
        assert_eq!(s, 400, "{key}: {v}");
        assert_eq!(v["error"]["field"], json!(key), "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(key)),
            "{v}"
        );
        let (s, _) = api.get(&format!("/api/v1/apps/{name}")).await;
        assert_eq!(s, 404, "{key}: nothing is created");
    }

    // Malformed YAML: where it went wrong.
    let name = unique("bad");
    let (s, v) = import(
        api,
        &format!("?name={name}"),
        "application/yaml",
        "services:\n  web:\n    image: [x\n".into(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let m = v["error"]["message"].as_str().expect("message");
    assert!(m.contains("line") && m.contains("column"), "{m}");
    assert_eq!(api.get(&format!("/api/v1/apps/{name}")).await.0, 404);

    // No name in the query nor in the file.
    let (s, v) = import(
        api,
        "",
        "application/yaml",
        format!("services: {{s: {{image: {image}}}}}"),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "name", "{v}");

    // Not YAML by its media type; too large; a bad `replace`.
    let (s, v) = import(api, "?name=x", "application/json", file.clone()).await;
    assert_eq!(s, 415, "{v}");
    let big = format!("{file}#{}\n", "a".repeat(300 * 1024));
    let (s, v) = import(api, "?name=x", "application/yaml", big).await;
    assert_eq!(s, 413, "{v}");
    let (s, v) = import(api, "?name=x&replace=yes", "application/yaml", file.clone()).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "replace", "{v}");

    // Same role as defining an app, and audited under its own name.
    let operator = api.as_role(&unique("op"), "operator").await;
    let name = unique("denied");
    let (s, v) = import(
        &operator,
        &format!("?name={name}"),
        "application/yaml",
        file.clone(),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(api.get(&format!("/api/v1/apps/{name}")).await.0, 404);
    let (s, audit) = api.get("/api/v1/audit?limit=1000").await;
    assert_eq!(s, 200, "{audit}");
    let entries = audit.as_array().expect("entries");
    let ours = |outcome: &str| {
        entries.iter().any(|e| {
            e["command"] == "app.import"
                && e["outcome"] == outcome
                && e["action"] == "POST /api/v1/apps/import"
        })
    };
    assert!(ours("ok") && ours("denied"), "{audit}");
    assert!(
        entries.iter().any(|e| e["command"] == "app.import"
            && e["status"] == 200
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("replaced"))),
        "{audit}"
    );

    // The CLI: the same file, the app printed; a refusal's message and a
    // non-zero exit.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("docker-compose.yml");
    std::fs::write(&path, &file).expect("write");
    let path = path.display().to_string();
    let cli_app = unique("cliimport");
    let (ok, out, err) = drover_cli(
        api,
        &["apps", "import", "-f", &path, "--name", &cli_app],
        b"",
    )
    .await;
    assert!(ok, "{out} {err}");
    assert!(out.contains(&format!("created app {cli_app}")), "{out}");
    assert!(out.contains("\"depends_on\""), "the spec is printed: {out}");
    let (s, got) = api.get(&format!("/api/v1/apps/{cli_app}")).await;
    assert_eq!(s, 200);
    assert_eq!(got["spec"]["containers"][0], expected_db);
    // Again without --replace: refused; with it: replaced; from stdin, JSON.
    let (ok, _, err) = drover_cli(
        api,
        &["apps", "import", "-f", &path, "--name", &cli_app],
        b"",
    )
    .await;
    assert!(!ok);
    assert!(err.contains("409"), "{err}");
    let (ok, out, err) = drover_cli(
        api,
        &[
            "-o",
            "json",
            "apps",
            "import",
            "-f",
            "-",
            "--name",
            &cli_app,
            "--replace",
        ],
        file.replace("ROLE: db", "ROLE: replica").as_bytes(),
    )
    .await;
    assert!(ok, "{out} {err}");
    let v: Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["spec"]["containers"][0]["env"]["ROLE"], "replica");
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        file.replace("    <<: *common\n", "    <<: *common\n    build: .\n"),
    )
    .expect("write");
    let other = unique("clibad");
    let (ok, out, err) = drover_cli(
        api,
        &[
            "apps",
            "import",
            "-f",
            &bad.display().to_string(),
            "--name",
            &other,
        ],
        b"",
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("services.web.build") && err.contains("not supported"),
        "{err}"
    );
    assert_eq!(api.get(&format!("/api/v1/apps/{other}")).await.0, 404);
}
