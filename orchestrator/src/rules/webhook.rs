//! Webhook calls: POST the firing as JSON, with a timeout, retries with
//! exponential backoff and full jitter, and a bound on calls in flight.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::backoff::Backoff;

/// Each attempt's limit, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per call, the first included.
const ATTEMPTS: u32 = 5;

pub struct Webhooks {
    client: reqwest::Client,
    slots: Arc<Semaphore>,
}

impl Webhooks {
    pub fn new(in_flight: usize) -> Webhooks {
        // https webhooks reach outside services: they are checked against
        // the system's trusted roots (the one client of Drover that does).
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")));
        let roots = rustls_native_certs::load_native_certs();
        for cert in roots.certs {
            if let Ok(c) = reqwest::Certificate::from_der(&cert) {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "webhook client with system roots failed; plain client");
            reqwest::Client::new()
        });
        Webhooks {
            client,
            slots: Arc::new(Semaphore::new(in_flight)),
        }
    }

    /// POSTs `body` to `url` until a 2xx answer or the attempts run out;
    /// whether it got through, and what happened.
    pub async fn post(&self, url: &str, body: &serde_json::Value) -> (bool, String) {
        let Ok(_slot) = self.slots.acquire().await else {
            return (false, "shutting down".into());
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.client.post(url).json(body).send().await {
                Ok(r) if r.status().is_success() => {
                    return (true, format!("{} after {attempt} attempt(s)", r.status()));
                }
                // A 4xx other than 408/429 will not change by retrying.
                Ok(r)
                    if r.status().is_client_error()
                        && r.status() != reqwest::StatusCode::REQUEST_TIMEOUT
                        && r.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                {
                    return (false, format!("{} (not retried)", r.status()));
                }
                Ok(r) => last = r.status().to_string(),
                Err(e) => last = without_url(&e),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        (false, format!("{last} after {ATTEMPTS} attempts"))
    }
}

/// reqwest's error text without the URL (it may carry a token in its
/// query), with its causes.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
