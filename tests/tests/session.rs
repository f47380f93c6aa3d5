//! The console's sign-in: an API token buys an HttpOnly, SameSite=Strict
//! session cookie; changing requests made with the cookie need the
//! session's CSRF value and are refused cross-site; roles still hold;
//! sign-out, token revocation and expiry end it; it survives an
//! orchestrator restart. Requests are made as a browser would make them,
//! cookie header and all, with no bearer token.

use std::time::Duration;

use drover_tests::*;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{json, Value};

struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
    csrf: Option<String>,
}

impl Browser {
    fn new(base: &str) -> Browser {
        Browser {
            base: base.to_string(),
            http: reqwest::Client::new(),
            cookie: None,
            csrf: None,
        }
    }

    async fn sign_in(&mut self, token: &str) -> (u16, Value, Option<String>) {
        let resp = self
            .http
            .post(format!("{}/api/v1/session", self.base))
            .json(&json!({ "token": token }))
            .send()
            .await
            .expect("reachable");
        let status = resp.status().as_u16();
        let set = resp
            .headers()
            .get(SET_COOKIE)
            .map(|v| v.to_str().expect("ascii").to_string());
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status == 201 {
            let set = set.clone().expect("a cookie");
            self.cookie = Some(set.split(';').next().expect("pair").to_string());
            self.csrf = v["csrf"].as_str().map(String::from);
        }
        (status, v, set)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        csrf: Option<&str>,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            req = req.header(COOKIE, c);
        }
        if let Some(t) = csrf {
            req = req.header("X-Drover-CSRF", t);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("reachable");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None, None, &[]).await
    }
}

fn admin_token(orch: &OrchProc) -> String {
    std::fs::read_to_string(orch.data.path().join("admin.token"))
        .expect("admin token")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_signs_in_checks_csrf_and_roles_and_ends() {
    let mut orch = OrchProc::start().await;
    let base = orch.api.base.clone();
    let mut b = Browser::new(&base);

    // A wrong token: 401, and the refusal is in the audit log.
    let (s, v, set) = b.sign_in("at.nope.nope").await;
    assert_eq!(s, 401, "{v}");
    assert!(set.is_none(), "no cookie for a wrong token");
    let (s, v, _) = b.sign_in("").await;
    assert_eq!(s, 401, "{v}");
    let (s, audit) = orch.api.get("/api/v1/audit?limit=20").await;
    assert_eq!(s, 200, "{audit}");
    assert!(
        audit
            .to_string()
            .contains("sign-in with a token that is not valid"),
        "{audit}"
    );

    // Sign in: the cookie is HttpOnly, SameSite=Strict, for the whole site.
    let (s, v, set) = b.sign_in(&admin_token(&orch)).await;
    assert_eq!(s, 201, "{v}");
    let set = set.expect("cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag: {set}");
    assert_eq!(v["role"], json!("admin"));
    assert_eq!(v["name"], json!("admin"));
    let csrf = b.csrf.clone().expect("csrf");

    // Reads need only the cookie.
    let (s, v) = b.get("/api/v1/session").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["csrf"], json!(csrf));
    let (s, v) = b.get("/api/v1/devices").await;
    assert_eq!(s, 200, "{v}");

    // Changes need the CSRF value, and never come cross-site.
    let app =
        json!({"name": "sess", "containers": [{"name": "main", "image": "127.0.0.1:5000/x:1"}]});
    let post = |csrf: Option<&str>, extra: Vec<(&'static str, &'static str)>| {
        let b = &b;
        let app = app.clone();
        let csrf = csrf.map(String::from);
        async move {
            b.send(
                reqwest::Method::POST,
                "/api/v1/apps",
                Some(app),
                csrf.as_deref(),
                &extra,
            )
            .await
        }
    };
    let (s, v) = post(None, vec![]).await;
    assert_eq!(s, 403, "no CSRF header: {v}");
    assert!(v.to_string().contains("X-Drover-CSRF"), "{v}");
    let (s, v) = post(Some("forged"), vec![]).await;
    assert_eq!(s, 403, "wrong CSRF value: {v}");
    let (s, v) = post(Some(&csrf), vec![("Sec-Fetch-Site", "cross-site")]).await;
    assert_eq!(s, 403, "cross-site: {v}");
    let (s, v) = post(Some(&csrf), vec![("Sec-Fetch-Site", "same-origin")]).await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = orch.api.get("/api/v1/apps/sess").await;
    assert_eq!(s, 200, "the app exists");

    // A viewer's session reads, and its changes are refused by role even
    // with the right CSRF value.
    let viewer = orch.api.as_role("console-viewer", "viewer").await;
    let mut vb = Browser::new(&base);
    let (s, v, _) = vb.sign_in(viewer.token.as_deref().expect("token")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["role"], json!("viewer"));
    let vcsrf = vb.csrf.clone().expect("csrf");
    let (s, _) = vb.get("/api/v1/apps").await;
    assert_eq!(s, 200);
    let (s, v) = vb
        .send(
            reqwest::Method::DELETE,
            "/api/v1/apps/sess",
            None,
            Some(&vcsrf),
            &[],
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(v.to_string().contains("role"), "{v}");

    // The session survives an orchestrator restart.
    orch.kill().await;
    orch.restart().await;
    let (s, v) = b.get("/api/v1/session").await;
    assert_eq!(s, 200, "after a restart: {v}");

    // Revoking the viewer's API token ends its session.
    let (s, tokens) = orch.api.get("/api/v1/tokens").await;
    assert_eq!(s, 200);
    let id = tokens
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["name"] == json!("console-viewer"))
        .and_then(|t| t["id"].as_str())
        .expect("viewer token")
        .to_string();
    let (s, _) = orch.api.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(s, 204);
    let (s, v) = vb.get("/api/v1/apps").await;
    assert_eq!(s, 401, "{v}");

    // Sign out: the cookie is cleared and no longer works.
    let (s, _) = b
        .send(
            reqwest::Method::DELETE,
            "/api/v1/session",
            None,
            Some(&csrf),
            &[],
        )
        .await;
    assert_eq!(s, 204);
    let (s, v) = b.get("/api/v1/devices").await;
    assert_eq!(s, 401, "{v}");
    assert!(v.to_string().contains("sign in again"), "{v}");

    // A coalesced change stream is a valid request; a bad flag is named.
    let (s, v) = orch.api.get("/api/v1/changes?coalesce=maybe").await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("coalesce"), "{v}");
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/v1/changes?coalesce=true"))
        .bearer_auth(orch.api.token.as_deref().expect("token"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("reachable");
    assert_eq!(resp.status().as_u16(), 200);
}
