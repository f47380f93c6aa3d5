//! The orchestrator's REST API as the load tool uses it. Only the fields the
//! measurements need are read; everything else in the JSON is ignored.

use std::collections::HashMap;
use std::time::Duration;

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

    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, ApiError> {
        self.get_json("/api/v1/devices").await
    }

    /// `/metrics` as name → value (samples without labels only).
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

    #[test]
    fn metrics_text_is_parsed() {
        let m = parse_metrics("# HELP x y\n# TYPE x counter\ndrover_mqtt_received_total 42\ndrover_devices_online 7\n");
        assert_eq!(m.get("drover_mqtt_received_total"), Some(&42.0));
        assert_eq!(m.get("drover_devices_online"), Some(&7.0));
    }
}
