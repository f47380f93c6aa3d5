//! A real headless Chromium for the web console's tests, driven through
//! Debian's `chromedriver` (WebDriver) with fantoccini. `scripts/test-env.sh`
//! installs both. Each [`Browser`] runs its own chromedriver on a free
//! loopback port and ends it when dropped.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// Where screenshots go: with `DROVER_UPDATE_SCREENSHOTS=1`,
/// `docs/screenshots/` of this checkout, which README.md shows; otherwise
/// a directory under the system's temporary one, so that running the
/// tests leaves the checkout as it was.
pub fn screenshot_dir() -> PathBuf {
    if std::env::var_os("DROVER_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("docs")
            .join("screenshots")
    } else {
        std::env::temp_dir().join(format!("drover-screenshots-{}", std::process::id()))
    }
}

pub struct Browser {
    pub client: Client,
    driver: std::process::Child,
}

/// chromedriver's (pre-W3C, still served) endpoint for the browser's
/// console log: `POST /session/{id}/se/log {"type": "browser"}`.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

impl Browser {
    /// A fresh headless Chromium at `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = crate::free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/test-env.sh installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", format!("--window-size={width},{height}"),
            ]}),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let conn = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(conn)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "chromedriver not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start a Chromium session: {e}"),
            }
        };
        Browser { client, driver }
    }

    /// Everything the page logged at SEVERE level (errors, failed loads,
    /// CSP violations) since the last call.
    pub async fn console_errors(&self) -> Vec<String> {
        let v = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("browser log");
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == json!("SEVERE"))
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits until `css` matches a displayed element and returns it.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> fantoccini::elements::Element {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if e.is_displayed().await.unwrap_or(false) {
                    return e;
                }
            }
            if std::time::Instant::now() > deadline {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let source = self.client.source().await.unwrap_or_default();
                panic!(
                    "no visible {css} within {timeout:?} at {url:?}; page: {}",
                    &source[..source.len().min(4000)]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's text under `css` contains `text`.
    pub async fn wait_text(&self, css: &str, text: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if e.text().await.unwrap_or_default().contains(text) {
                    return;
                }
            }
            if std::time::Instant::now() > deadline {
                let got = match self.client.find(Locator::Css(css)).await {
                    Ok(e) => e.text().await.unwrap_or_default(),
                    Err(_) => "(no such element)".into(),
                };
                panic!("{css} never showed {text:?} within {timeout:?}; it shows: {got}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .expect("script runs")
    }

    /// Saves a PNG of the window as `<name>.png` in [`screenshot_dir`].
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot {name} is a PNG"
        );
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
