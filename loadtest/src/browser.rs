//! A real headless Chromium showing the web console, driven through
//! Debian's `chromedriver` (WebDriver) with fantoccini, as the workspace's
//! browser tests drive it. Each [`Browser`] runs its own chromedriver on a
//! free loopback port.
//!
//! Measurements are taken in the page, with its own clock: a script the
//! browser runs in every new document before the console's own scripts
//! (DevTools' `Page.addScriptToEvaluateOnNewDocument` through chromedriver,
//! so the console's Content-Security-Policy does not apply to it) notes
//! `performance.now()` when the first device row is in the DOM and laid
//! out, and again once the frame showing it has been produced; and it
//! counts the messages the page's `EventSource` receives.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("cannot run {program}: {error}; the console scenario renders the console in a real headless Chromium: install Debian's `chromium` and `chromium-driver` (scripts/test-env.sh does), or pass --chromedriver")]
    Driver {
        program: String,
        error: std::io::Error,
    },
    #[error(
        "chromedriver exited at start ({0}); is Debian's `chromium-driver` installed and working?"
    )]
    DriverExited(String),
    #[error("chromedriver could not start a headless Chromium (install Debian's `chromium`; scripts/test-env.sh does): {0}")]
    Session(String),
    #[error("WebDriver command {what} failed: {error}")]
    Cmd {
        what: &'static str,
        error: fantoccini::error::CmdError,
    },
    #[error("{0}")]
    Page(String),
}

/// The in-page instrument, run in every new document before its scripts.
/// `window.__drover`: `dom` and `frame` (ms since navigation start, null
/// until seen), `events`, `chars` and `opened` (EventSource messages, their
/// data's length in UTF-16 units, and EventSources created).
const INSTRUMENT: &str = r#"(() => {
  if (window.__drover) return;
  const m = { dom: null, frame: null, events: 0, chars: 0, opened: 0 };
  window.__drover = m;
  const Native = window.EventSource;
  if (Native) {
    window.EventSource = class extends Native {
      constructor(...args) {
        super(...args);
        m.opened += 1;
        this.addEventListener('message', (e) => { m.events += 1; m.chars += e.data.length; });
      }
    };
  }
  const seen = () => {
    const tr = document.querySelector('tr[data-test=device-row]');
    if (!tr || tr.getClientRects().length === 0) return false;
    m.dom = performance.now();
    // The next animation frame shows it; a task after that frame runs
    // once the frame has been produced.
    requestAnimationFrame(() => setTimeout(() => { m.frame = performance.now(); }, 0));
    return true;
  };
  const obs = new MutationObserver(() => { if (seen()) obs.disconnect(); });
  obs.observe(document, { childList: true, subtree: true });
})();"#;

/// What one navigation to the devices page measured, in milliseconds since
/// the navigation started (the page's `performance.now()`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct RenderSample {
    /// The first `tr[data-test=device-row]` in the DOM, laid out.
    pub dom: f64,
    /// The frame showing it produced: the first render.
    pub frame: f64,
    /// The page's `GET /api/v1/devices?…` (Resource Timing), if seen.
    pub api_start: Option<f64>,
    pub api_end: Option<f64>,
}

/// What the page's `EventSource` has received since the page loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PageStream {
    pub events: u64,
    /// Characters of the events' data (UTF-16 units; bytes for ASCII JSON).
    pub chars: u64,
    /// EventSources created (more than one: it reconnected or was reopened).
    pub opened: u64,
}

/// chromedriver's DevTools pass-through: `POST /session/{id}/goog/cdp/execute`.
#[derive(Debug)]
struct Cdp {
    cmd: &'static str,
    params: Value,
}

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/goog/cdp/execute",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"cmd": self.cmd, "params": self.params}).to_string()),
        )
    }
}

pub struct Browser {
    client: Client,
    driver: tokio::process::Child,
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session.
    pub async fn start(chromedriver: &Path) -> Result<Browser, BrowserError> {
        let port = crate::target::free_port()
            .map_err(|e| BrowserError::DriverExited(format!("no free port: {e}")))?;
        let mut driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| BrowserError::Driver {
                program: chromedriver.display().to_string(),
                error,
            })?;
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,900",
            ]}),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            if let Ok(Some(status)) = driver.try_wait() {
                return Err(BrowserError::DriverExited(status.to_string()));
            }
            let conn = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(conn)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                // Not listening yet.
                Err(
                    e @ (fantoccini::error::NewSessionError::Failed(_)
                    | fantoccini::error::NewSessionError::FailedC(_)
                    | fantoccini::error::NewSessionError::Lost(_)),
                ) if Instant::now() < deadline => {
                    debug!(error = %e, "chromedriver not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    let _ = driver.start_kill();
                    let _ = driver.wait().await;
                    return Err(BrowserError::Session(e.to_string()));
                }
            }
        };
        Ok(Browser { client, driver })
    }

    /// The default `chromedriver` (Debian's `chromium-driver`), from PATH.
    pub fn default_driver() -> PathBuf {
        PathBuf::from("chromedriver")
    }

    fn cmd(what: &'static str) -> impl FnOnce(fantoccini::error::CmdError) -> BrowserError {
        move |error| BrowserError::Cmd { what, error }
    }

    /// Signs in on the console's form at `base` with an API token, as a
    /// person does, and waits until the console shows who is signed in.
    pub async fn sign_in(&self, base: &str, token: &str) -> Result<(), BrowserError> {
        self.client
            .goto(&format!("{base}/"))
            .await
            .map_err(Self::cmd("goto"))?;
        let field = self
            .wait_visible("#signin-token", Duration::from_secs(30))
            .await?;
        field.send_keys(token).await.map_err(Self::cmd("type"))?;
        self.client
            .find(Locator::Css("#signin-submit"))
            .await
            .map_err(Self::cmd("find"))?
            .click()
            .await
            .map_err(Self::cmd("click"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.visible("[data-test=whoami]").await.unwrap_or(false) {
                return Ok(());
            }
            if let Ok(e) = self
                .client
                .find(Locator::Css("[data-test=signin-error]"))
                .await
            {
                if e.is_displayed().await.unwrap_or(false) {
                    let why = e.text().await.unwrap_or_default();
                    return Err(BrowserError::Page(format!(
                        "console sign-in refused: {why}"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(BrowserError::Page(
                    "the console did not show the signed-in user within 30 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// From now on every new document runs the instrument first.
    pub async fn instrument(&self) -> Result<(), BrowserError> {
        self.client
            .issue_cmd(Cdp {
                cmd: "Page.addScriptToEvaluateOnNewDocument",
                params: json!({ "source": INSTRUMENT }),
            })
            .await
            .map_err(Self::cmd("Page.addScriptToEvaluateOnNewDocument"))?;
        Ok(())
    }

    /// Loads the console's devices page afresh (a new document, signed in
    /// by its cookie) and returns when its first row was rendered.
    pub async fn render_devices(
        &self,
        base: &str,
        timeout: Duration,
    ) -> Result<RenderSample, BrowserError> {
        // A hash change alone is no navigation: leave the page first.
        self.client
            .goto("about:blank")
            .await
            .map_err(Self::cmd("goto"))?;
        self.client
            .goto(&format!("{base}/#/devices"))
            .await
            .map_err(Self::cmd("goto"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .client
                .execute(
                    r"const m = window.__drover;
                      if (!m || m.frame === null) return null;
                      const r = performance.getEntriesByType('resource')
                        .find((e) => e.name.includes('/api/v1/devices?'));
                      return { dom: m.dom, frame: m.frame,
                               api_start: r ? r.startTime : null, api_end: r ? r.responseEnd : null };",
                    Vec::new(),
                )
                .await
                .map_err(Self::cmd("execute"))?;
            if !v.is_null() {
                return serde_json::from_value(v)
                    .map_err(|e| BrowserError::Page(format!("unexpected page timings: {e}")));
            }
            if Instant::now() > deadline {
                let page = self.client.source().await.unwrap_or_default();
                let page: String = page.chars().take(2000).collect();
                return Err(BrowserError::Page(format!(
                    "no device row rendered within {} s; is the instrument installed? page: {page}",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the page's change stream has received since it loaded.
    pub async fn page_stream(&self) -> Result<PageStream, BrowserError> {
        let v = self
            .client
            .execute(
                "const m = window.__drover; return m ? { events: m.events, chars: m.chars, opened: m.opened } : null;",
                Vec::new(),
            )
            .await
            .map_err(Self::cmd("execute"))?;
        if v.is_null() {
            return Err(BrowserError::Page("the page has no instrument".into()));
        }
        serde_json::from_value(v)
            .map_err(|e| BrowserError::Page(format!("unexpected stream counts: {e}")))
    }

    /// The console's live indicator (`live`, `connecting` or `down`).
    pub async fn live_state(&self) -> Result<String, BrowserError> {
        let v = self
            .client
            .execute(
                "const e = document.querySelector('[data-test=live-status]'); return e ? e.dataset.state : null;",
                Vec::new(),
            )
            .await
            .map_err(Self::cmd("execute"))?;
        Ok(v.as_str().unwrap_or("absent").to_string())
    }

    async fn visible(&self, css: &str) -> Result<bool, BrowserError> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => Ok(e.is_displayed().await.unwrap_or(false)),
            Err(_) => Ok(false),
        }
    }

    async fn wait_visible(
        &self,
        css: &str,
        timeout: Duration,
    ) -> Result<fantoccini::elements::Element, BrowserError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if e.is_displayed().await.unwrap_or(false) {
                    return Ok(e);
                }
            }
            if Instant::now() > deadline {
                return Err(BrowserError::Page(format!(
                    "no visible {css} within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session (chromedriver closes Chromium) and chromedriver.
    pub async fn close(self) {
        let Browser { client, mut driver } = self;
        if tokio::time::timeout(Duration::from_secs(10), client.close())
            .await
            .is_err()
        {
            debug!("the browser session did not close within 10 s");
        }
        let _ = driver.start_kill();
        let _ = driver.wait().await;
    }
}
