//! The orchestrator's REST API as the load tool uses it. Only the fields the
//! measurements need are read; everything else in the JSON is ignored.

use std::collections::HashMap;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot decode the answer of {url}: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
    #[error("the change stream {url} broke: {message}")]
    Stream { url: String, message: String },
}

/// An operation as `GET /api/v1/operations` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct OpView {
    pub id: String,
    pub device: String,
    pub app: String,
    pub status: String,
    #[serde(default)]
    pub detail: String,
    pub generation: u64,
}

impl OpView {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "superseded")
    }
}

/// A device as `GET /api/v1/devices` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceSummary {
    pub id: String,
    pub online: bool,
    pub last_seen_ms: u64,
    pub desired_generation: u64,
    pub applied_generation: u64,
}

/// A rollout as `GET /api/v1/rollouts/{id}` and the change stream show it.
#[derive(Debug, Clone, Deserialize)]
pub struct RolloutView {
    pub id: String,
    pub phase: String,
    /// The batch running (or next), from 0.
    pub current_batch: usize,
    pub batches: Vec<RolloutCountsView>,
    pub counts: RolloutCountsView,
    pub updated_at_ms: u64,
    #[serde(default)]
    pub reason: Option<String>,
}

impl RolloutView {
    pub fn is_final(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "succeeded" | "failed" | "rolled_back" | "aborted" | "superseded"
        )
    }
}

/// A rollout's device counts (of one batch, or of all).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RolloutCountsView {
    pub total: usize,
    pub updated: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// What the change stream says about a followed rollout.
#[derive(Debug, Clone)]
pub enum RolloutChange {
    /// The rollout as it is now.
    Now(Box<RolloutView>),
    /// Changes were dropped for this subscriber: read the rollout again.
    Lagged,
    /// Anything else (another rollout, a kind this tool does not read).
    Other,
}

/// One event of `GET /api/v1/changes?rollout=ID`.
pub fn parse_rollout_change(data: &str, id: &str) -> Result<RolloutChange, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(data)?;
    Ok(match v.get("kind").and_then(serde_json::Value::as_str) {
        Some("rollout") => {
            let r: RolloutView = serde_json::from_value(v["rollout"].clone())?;
            if r.id == id {
                RolloutChange::Now(Box::new(r))
            } else {
                RolloutChange::Other
            }
        }
        Some("lagged") => RolloutChange::Lagged,
        _ => RolloutChange::Other,
    })
}

/// A list read in full, and how long that took.
#[derive(Debug, Clone, Copy)]
pub struct TimedGet {
    /// Request sent → last byte of the body.
    pub elapsed: Duration,
    /// `X-Total-Count`, when the server sent it (a paged list).
    pub total: Option<u64>,
    /// Items in the JSON array.
    pub items: usize,
    pub bytes: usize,
}

#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    /// Bearer token for every request.
    token: Option<String>,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Api {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(256)
            .build()
            .unwrap_or_default();
        Api {
            base: base.into().trim_end_matches('/').to_string(),
            http,
            token: std::env::var("DROVER_TOKEN").ok(),
        }
    }

    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
    }

    /// The bearer token requests carry, for a `drover` CLI run against the
    /// same orchestrator.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(&self, req: reqwest::RequestBuilder, url: &str) -> Result<String, ApiError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.map_err(|source| ApiError::Http {
            url: url.to_string(),
            source,
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|source| ApiError::Http {
            url: url.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(ApiError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body,
            });
        }
        Ok(body)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let body = self.call(self.http.get(&url), &url).await?;
        serde_json::from_str(&body).map_err(|source| ApiError::Decode { url, source })
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        let text = self.call(self.http.post(&url).json(&body), &url).await?;
        serde_json::from_str(&text).map_err(|source| ApiError::Decode { url, source })
    }

    pub async fn healthy(&self) -> bool {
        let url = format!("{}/healthz", self.base);
        self.call(self.http.get(&url).timeout(Duration::from_secs(2)), &url)
            .await
            .is_ok()
    }

    /// Creates an app with one container.
    pub async fn create_app(
        &self,
        name: &str,
        image: &str,
        command: Option<Vec<String>>,
    ) -> Result<(), ApiError> {
        let mut container = serde_json::json!({ "name": "main", "image": image });
        if let Some(c) = command {
            container["command"] = serde_json::json!(c);
        }
        let _: serde_json::Value = self
            .post_json(
                "/api/v1/apps",
                serde_json::json!({ "name": name, "containers": [container] }),
            )
            .await?;
        Ok(())
    }

    pub async fn deploy(&self, device: &str, app: &str) -> Result<OpView, ApiError> {
        self.post_json(
            &format!("/api/v1/devices/{device}/apps"),
            serde_json::json!({ "app": app }),
        )
        .await
    }

    /// `verb` is `start` or `stop`.
    pub async fn change(&self, device: &str, app: &str, verb: &str) -> Result<OpView, ApiError> {
        let url = format!("{}/api/v1/devices/{device}/apps/{app}/{verb}", self.base);
        let text = self.call(self.http.post(&url), &url).await?;
        serde_json::from_str(&text).map_err(|source| ApiError::Decode { url, source })
    }

    pub async fn remove(&self, device: &str, app: &str) -> Result<OpView, ApiError> {
        let url = format!("{}/api/v1/devices/{device}/apps/{app}", self.base);
        let text = self.call(self.http.delete(&url), &url).await?;
        serde_json::from_str(&text).map_err(|source| ApiError::Decode { url, source })
    }

    pub async fn operation(&self, id: &str) -> Result<OpView, ApiError> {
        self.get_json(&format!("/api/v1/operations/{id}")).await
    }

    /// Newest first; the API caps `limit` at 10 000.
    pub async fn operations(&self, limit: usize) -> Result<Vec<OpView>, ApiError> {
        self.get_json(&format!(
            "/api/v1/operations?limit={}",
            limit.clamp(1, 10_000)
        ))
        .await
    }

    /// `POST /api/v1/rollouts` with `body` (a `CreateRollout`).
    pub async fn create_rollout(&self, body: serde_json::Value) -> Result<RolloutView, ApiError> {
        self.post_json("/api/v1/rollouts", body).await
    }

    /// `POST /api/v1/rules` with `body` (a `Rule`).
    pub async fn create_rule(&self, body: serde_json::Value) -> Result<(), ApiError> {
        let _: serde_json::Value = self.post_json("/api/v1/rules", body).await?;
        Ok(())
    }

    pub async fn rollout(&self, id: &str) -> Result<RolloutView, ApiError> {
        self.get_json(&format!("/api/v1/rollouts/{id}")).await
    }

    /// Subscribes to one rollout's changes (server-sent events); the
    /// request lives at most `limit`.
    pub async fn rollout_changes(
        &self,
        id: &str,
        limit: Duration,
    ) -> Result<impl Stream<Item = Result<RolloutChange, ApiError>>, ApiError> {
        let url = format!("{}/api/v1/changes?rollout={id}", self.base);
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(limit);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|source| ApiError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ApiError::Status {
                url,
                status: status.as_u16(),
                body: resp.text().await.unwrap_or_default(),
            });
        }
        let chunks = futures_util::stream::try_unfold(resp, |mut r| async move {
            Ok::<_, reqwest::Error>(r.chunk().await?.map(|b| (b, r)))
        });
        let id = id.to_string();
        Ok(chunks.eventsource().map(move |event| match event {
            Ok(e) => parse_rollout_change(&e.data, &id).map_err(|source| ApiError::Decode {
                url: url.clone(),
                source,
            }),
            Err(e) => Err(ApiError::Stream {
                url: url.clone(),
                message: e.to_string(),
            }),
        }))
    }

    /// Signs in as the console does (`POST /api/v1/session` with the API
    /// token) and returns the session cookie as `name=value`, for the
    /// `Cookie` header of later requests.
    pub async fn sign_in(&self) -> Result<String, ApiError> {
        let url = format!("{}/api/v1/session", self.base);
        let token = self.token.clone().unwrap_or_default();
        let resp = self
            .http
            .post(&url)
            .json(&serde_json::json!({ "token": token }))
            .send()
            .await
            .map_err(|source| ApiError::Http {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let cookie = resp
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| cookie::Cookie::parse(v.to_string()).ok())
            .find(|c| !c.value().is_empty())
            .map(|c| format!("{}={}", c.name(), c.value()));
        match cookie {
            Some(c) if status.is_success() => Ok(c),
            _ => Err(ApiError::Status {
                url,
                status: status.as_u16(),
                body: resp.text().await.unwrap_or_default(),
            }),
        }
    }

    /// One `GET {path}` with a session cookie, timed from sending the
    /// request to the last byte of the body.
    pub async fn timed_get(&self, path: &str, cookie: &str) -> Result<TimedGet, ApiError> {
        let url = format!("{}{path}", self.base);
        let t0 = std::time::Instant::now();
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::COOKIE, cookie)
            .send()
            .await
            .map_err(|source| ApiError::Http {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let total = resp
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp.bytes().await.map_err(|source| ApiError::Http {
            url: url.clone(),
            source,
        })?;
        let elapsed = t0.elapsed();
        if !status.is_success() {
            return Err(ApiError::Status {
                url,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let items = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body)
            .map_err(|source| ApiError::Decode { url, source })?
            .len();
        Ok(TimedGet {
            elapsed,
            total,
            items,
            bytes: body.len(),
        })
    }

    /// Opens `GET /api/v1/changes{query}` with a session cookie, as a
    /// console's `EventSource` does; the response body is the stream, read
    /// by the caller, and lives at most `limit`.
    pub async fn open_changes(
        &self,
        query: &str,
        cookie: &str,
        limit: Duration,
    ) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}/api/v1/changes{query}", self.base);
        let resp = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::COOKIE, cookie)
            .timeout(limit)
            .send()
            .await
            .map_err(|source| ApiError::Http {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ApiError::Status {
                url,
                status: status.as_u16(),
                body: resp.text().await.unwrap_or_default(),
            });
        }
        Ok(resp)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, ApiError> {
        self.get_json("/api/v1/devices").await
    }

    /// `/metrics` as series → value (a labelled series keyed as written:
    /// `name{label="value"}`).
    pub async fn metrics(&self) -> Result<HashMap<String, f64>, ApiError> {
        let url = format!("{}/metrics", self.base);
        let text = self.call(self.http.get(&url), &url).await?;
        Ok(parse_metrics(&text))
    }
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orchestrator's own change, as it goes on the wire.
    fn rollout_change(id: &str, current_batch: usize, updated: usize) -> String {
        use drover::contract::{Change, OnFailure, Rollout, RolloutCounts, RolloutPhase};
        let counts = RolloutCounts {
            total: 10,
            pending: 10 - updated,
            updated,
            ..Default::default()
        };
        let r = Rollout {
            id: id.into(),
            app: drover_shared::Name::new("web").expect("valid name"),
            agent_version: None,
            selector: String::new(),
            from_release: 0,
            to_release: 1,
            phase: RolloutPhase::Running,
            created_at_ms: 1,
            author: "admin".into(),
            current_batch,
            batches: vec![counts.clone()],
            counts,
            percent: 70,
            on_failure: OnFailure::Rollback,
            approval: false,
            updated_at_ms: 5,
            finished_at_ms: None,
            reason: None,
        };
        serde_json::to_string(&Change::Rollout {
            rollout: Box::new(r),
        })
        .expect("serialises")
    }

    #[test]
    fn rollout_changes_are_read_by_kind_and_id() {
        let r = rollout_change("r-1", 2, 7);
        match parse_rollout_change(&r, "r-1") {
            Ok(RolloutChange::Now(v)) => {
                assert_eq!(
                    (v.current_batch, v.counts.updated, v.batches.len()),
                    (2, 7, 1)
                );
                assert_eq!(v.phase, "running");
                assert!(!v.is_final());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_rollout_change(&r, "r-2"),
            Ok(RolloutChange::Other)
        ));
        assert!(matches!(
            parse_rollout_change(r#"{"kind":"lagged","missed":3}"#, "r-1"),
            Ok(RolloutChange::Lagged)
        ));
        assert!(matches!(
            parse_rollout_change(r#"{"kind":"app","name":"web","deleted":false}"#, "r-1"),
            Ok(RolloutChange::Other)
        ));
        assert!(parse_rollout_change("{", "r-1").is_err());
    }

    #[test]
    fn metrics_text_is_parsed() {
        let m = parse_metrics("# HELP x y\n# TYPE x counter\ndrover_mqtt_received_total 42\ndrover_devices{status=\"online\"} 7\n");
        assert_eq!(m.get("drover_mqtt_received_total"), Some(&42.0));
        assert_eq!(m.get("drover_devices{status=\"online\"}"), Some(&7.0));
    }
}
