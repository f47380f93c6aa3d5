//! The console scenario: what the web console costs at fleet scale. On one
//! orchestrator with the fleet connected and telemetry flowing, one phase
//! after another:
//!
//! 1. **baseline**: no console open; the orchestrator's CPU and RSS;
//! 2. **first response**: the devices page's first request,
//!    `GET /api/v1/devices?offset=0&limit=50` (what the console asks),
//!    sequentially, and the unpaged list once for comparison;
//! 3. **first render**: a real headless Chromium signs in on the console's
//!    form and opens `#/devices`; navigation → first device row rendered,
//!    measured in the page;
//! 4. **consoles**: `--consoles` subscribers of the console's feed
//!    (`/api/v1/changes` + [`CONSOLE_FEED`]: coalesced, no
//!    logs or telemetry; plain HTTP clients reading the
//!    stream as an `EventSource` does, each with a session of its own)
//!    plus the Chromium page left open on `#/devices`; the events each
//!    receives, and the orchestrator's CPU and RSS;
//! 5. **uncoalesced**: the consoles closed, one subscriber of
//!    `/api/v1/changes` without `coalesce`, for comparison.
//!
//! Nothing here asserts a timing; [`measure`] is also what the CI smoke
//! test runs, on a small fleet and short phases.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use super::{prepare_fds, wait_online, Common, OrchSampler, ScenarioError};
use crate::api::{Api, ApiError, TimedGet};
use crate::browser::{Browser, PageStream, RenderSample};
use crate::procs::{Proc, Series};
use crate::report::{kib, mib, ms, percentile, Table};
use crate::sim::Fleet;
use crate::sse::{SseCounter, Tally};
use crate::target::Target;

/// The query of the console's fleet-wide feed, as the console opens it
/// (`drover::http::console::FEED`; the load test talks to the orchestrator
/// as an outside client and so keeps its own copy, which a unit test holds
/// equal).
pub const CONSOLE_FEED: &str =
    "?coalesce=true&kinds=device,inventory,state,operation,event,app,rollout,rule_firing,job";

/// What the console scenario does, besides the fleet.
#[derive(Debug, Clone)]
pub struct ConsoleArgs {
    /// Plain subscribers of the console's feed in the consoles phase (the
    /// Chromium page is one more).
    pub consoles: usize,
    /// Length of each measured phase (baseline, consoles, uncoalesced).
    pub duration: Duration,
    /// Before a phase's window starts, after its subscribers connected.
    pub warmup: Duration,
    /// Sequential requests of the devices page's first page.
    pub page_requests: usize,
    /// Rows per page, as the console asks by default.
    pub page_size: usize,
    /// Fresh loads of `#/devices` in Chromium.
    pub render_runs: usize,
    pub chromedriver: PathBuf,
}

/// One measured phase: its window and the orchestrator's samples over it
/// (`None` when the orchestrator is not a process started here).
#[derive(Debug, Clone)]
pub struct Phase {
    pub wall: Duration,
    pub series: Option<Series>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct ConsoleRun {
    pub baseline: Phase,
    /// The devices page's first request, each try.
    pub first_page: Vec<TimedGet>,
    /// `GET /api/v1/devices`, everything, once.
    pub unpaged: TimedGet,
    pub renders: Vec<RenderSample>,
    pub consoles: Phase,
    /// What each plain subscriber received in the consoles window.
    pub console_tallies: Vec<Tally>,
    /// Streams that ended before their phase did, and why.
    pub stream_errors: Vec<String>,
    /// What the Chromium page's EventSource received in the same window.
    pub page_stream: PageStream,
    /// EventSources the page had opened by the end (1 unless it reconnected).
    pub page_stream_opened: u64,
    /// The console's live indicator at the end of the consoles phase.
    pub page_live: String,
    pub uncoalesced: Phase,
    pub uncoalesced_tally: Tally,
}

// ----- statistics (pure) --------------------------------------------------------------

/// p50, p99 and the maximum of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The spread of `values` (any order), nearest rank; `None` when empty.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Spread {
        n: v.len(),
        p50: percentile(&v, 50.0)?,
        p99: percentile(&v, 99.0)?,
        max: *v.last()?,
    })
}

/// A stream's rate over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub events_per_sec: f64,
    pub bytes_per_sec: f64,
}

pub fn rate(events: u64, bytes: u64, wall: Duration) -> Rate {
    let s = wall.as_secs_f64();
    if s <= 0.0 {
        return Rate {
            events_per_sec: 0.0,
            bytes_per_sec: 0.0,
        };
    }
    Rate {
        events_per_sec: events as f64 / s,
        bytes_per_sec: bytes as f64 / s,
    }
}

/// Several subscribers' rates: the mean, and the lowest and highest event
/// rate (equal subscribers of one feed should receive the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Across {
    pub mean: Rate,
    pub min_events_per_sec: f64,
    pub max_events_per_sec: f64,
}

pub fn across(rates: &[Rate]) -> Option<Across> {
    if rates.is_empty() {
        return None;
    }
    let n = rates.len() as f64;
    let ev = rates.iter().map(|r| r.events_per_sec);
    Some(Across {
        mean: Rate {
            events_per_sec: rates.iter().map(|r| r.events_per_sec).sum::<f64>() / n,
            bytes_per_sec: rates.iter().map(|r| r.bytes_per_sec).sum::<f64>() / n,
        },
        min_events_per_sec: ev.clone().fold(f64::INFINITY, f64::min),
        max_events_per_sec: ev.fold(f64::NEG_INFINITY, f64::max),
    })
}

/// "telemetry 98.1/s, device 0.2/s": a window's events per kind, most first.
pub fn kinds_per_sec(t: &Tally, wall: Duration) -> String {
    let mut kinds: Vec<(&String, &u64)> = t.by_kind.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let s = wall.as_secs_f64().max(1e-9);
    kinds
        .iter()
        .map(|(k, n)| format!("{k} {:.1}/s", **n as f64 / s))
        .collect::<Vec<_>>()
        .join(", ")
}

// ----- a subscriber of the change stream ------------------------------------------------

/// One subscriber of `/api/v1/changes`, signed in with a session of its
/// own, counting what arrives in the background.
struct Reader {
    counter: Arc<Mutex<SseCounter>>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Why the stream ended before it was stopped, if it did.
    task: tokio::task::JoinHandle<Option<String>>,
}

impl Reader {
    async fn open(api: &Api, query: &str, limit: Duration) -> Result<Reader, ApiError> {
        let cookie = api.sign_in().await?;
        let mut resp = api.open_changes(query, &cookie, limit).await?;
        let counter = Arc::new(Mutex::new(SseCounter::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let c = counter.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return None,
                    chunk = resp.chunk() => match chunk {
                        Ok(Some(bytes)) => c
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .feed(&bytes),
                        Ok(None) => return Some("the server ended the stream".to_string()),
                        Err(e) => return Some(format!("the stream broke: {e}")),
                    },
                }
            }
        });
        Ok(Reader {
            counter,
            stop,
            task,
        })
    }

    fn tally(&self) -> Tally {
        self.counter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tally()
            .clone()
    }

    /// Stops reading and closes the stream; `Some(why)` if it had ended
    /// on its own before.
    async fn close(self) -> Option<String> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_else(|e| Some(e.to_string()))
    }
}

// ----- the measurement --------------------------------------------------------------------

/// Samples the orchestrator (when `pid` is known) for `wall`.
async fn sampled(pid: Option<u32>, wall: Duration) -> Phase {
    let sampler = OrchSampler::start(pid);
    let t0 = Instant::now();
    tokio::time::sleep(wall).await;
    let series = sampler.stop().await;
    Phase {
        wall: t0.elapsed(),
        series,
    }
}

/// Runs the console measurements against the orchestrator at `api` (its
/// token set; an admin's or any role that may read devices and changes),
/// whose process is `pid` if it is sampled. The fleet must be connected.
pub async fn measure(
    api: &Api,
    pid: Option<u32>,
    a: &ConsoleArgs,
) -> Result<ConsoleRun, ScenarioError> {
    let token = api
        .token()
        .ok_or_else(|| {
            ScenarioError::Failed(
                "no API token to sign in with (the orchestrator's admin.token, or DROVER_TOKEN with --api)".into(),
            )
        })?
        .to_string();

    info!(
        secs = a.duration.as_secs(),
        "console: baseline, no console open"
    );
    let baseline = sampled(pid, a.duration).await;

    info!(
        requests = a.page_requests,
        "console: the devices page's first request"
    );
    let cookie = api.sign_in().await?;
    let path = format!("/api/v1/devices?offset=0&limit={}", a.page_size);
    let mut first_page = Vec::with_capacity(a.page_requests);
    for _ in 0..a.page_requests {
        first_page.push(api.timed_get(&path, &cookie).await?);
    }
    let unpaged = api.timed_get("/api/v1/devices", &cookie).await?;

    info!(runs = a.render_runs, "console: first render in Chromium");
    let browser = Browser::start(&a.chromedriver).await?;
    let with_browser = async {
        browser.sign_in(api.base(), &token).await?;
        browser.instrument().await?;
        let mut renders = Vec::with_capacity(a.render_runs);
        for _ in 0..a.render_runs.max(1) {
            renders.push(
                browser
                    .render_devices(api.base(), Duration::from_secs(120))
                    .await?,
            );
        }
        // The last load stays open on #/devices through the consoles phase.
        info!(
            consoles = a.consoles,
            secs = a.duration.as_secs(),
            "console: consoles open"
        );
        let limit = a.warmup + a.duration + Duration::from_secs(120);
        let mut readers = Vec::with_capacity(a.consoles);
        for _ in 0..a.consoles {
            readers.push(Reader::open(api, CONSOLE_FEED, limit).await?);
        }
        tokio::time::sleep(a.warmup).await;
        let before: Vec<Tally> = readers.iter().map(Reader::tally).collect();
        let page_before = browser.page_stream().await?;
        let consoles = sampled(pid, a.duration).await;
        let after: Vec<Tally> = readers.iter().map(Reader::tally).collect();
        let page_after = browser.page_stream().await?;
        let page_live = browser.live_state().await?;
        let mut stream_errors = Vec::new();
        for (i, r) in readers.into_iter().enumerate() {
            if let Some(why) = r.close().await {
                stream_errors.push(format!("console stream {}: {why}", i + 1));
            }
        }
        Ok::<_, ScenarioError>((
            renders,
            consoles,
            after
                .iter()
                .zip(&before)
                .map(|(a, b)| a.since(b))
                .collect::<Vec<_>>(),
            stream_errors,
            PageStream {
                events: page_after.events.saturating_sub(page_before.events),
                chars: page_after.chars.saturating_sub(page_before.chars),
                opened: page_after.opened,
            },
            page_live,
        ))
    }
    .await;
    browser.close().await;
    let (renders, consoles, console_tallies, mut stream_errors, page_stream, page_live) =
        with_browser?;

    info!(
        secs = a.duration.as_secs(),
        "console: one uncoalesced subscriber"
    );
    let limit = a.warmup + a.duration + Duration::from_secs(120);
    let raw = Reader::open(api, "", limit).await?;
    tokio::time::sleep(a.warmup).await;
    let before = raw.tally();
    let uncoalesced = sampled(pid, a.duration).await;
    let uncoalesced_tally = raw.tally().since(&before);
    if let Some(why) = raw.close().await {
        stream_errors.push(format!("uncoalesced stream: {why}"));
    }

    Ok(ConsoleRun {
        baseline,
        first_page,
        unpaged,
        renders,
        consoles,
        console_tallies,
        stream_errors,
        page_stream_opened: page_stream.opened,
        page_stream,
        page_live,
        uncoalesced,
        uncoalesced_tally,
    })
}

// ----- the tables ---------------------------------------------------------------------------

fn cpu(p: &Phase) -> String {
    p.series
        .as_ref()
        .map_or("—".into(), |s| format!("{:.0} %", s.cpu_percent()))
}

fn rss(p: &Phase) -> String {
    p.series.as_ref().map_or("—".into(), |s| {
        format!(
            "{} → {} ({:+.1} MiB)",
            mib(s.first.rss_bytes),
            mib(s.last.rss_bytes),
            (s.last.rss_bytes as f64 - s.first.rss_bytes as f64) / 1048576.0
        )
    })
}

fn per_sec(r: Rate) -> (String, String) {
    (format!("{:.1}", r.events_per_sec), kib(r.bytes_per_sec))
}

impl ConsoleRun {
    /// The consoles window's per-subscriber rates.
    pub fn console_rates(&self) -> Vec<Rate> {
        self.console_tallies
            .iter()
            .map(|t| rate(t.events, t.bytes, self.consoles.wall))
            .collect()
    }

    /// Two tables: the cost of open consoles next to none, with the feed
    /// each receives; and the devices page's first response and render.
    pub fn tables(&self, devices: usize, a: &ConsoleArgs) -> Vec<Table> {
        let mut cost = Table::new(
            format!(
                "console: {devices} devices, no console vs {} consoles + 1 Chromium page",
                a.consoles
            ),
            &[
                "phase",
                "open",
                "orch CPU",
                "orch RSS start → end",
                "events/s per subscriber",
                "KiB/s per subscriber",
                "lagged",
                "events by kind (one subscriber)",
            ],
        );
        cost.row(vec![
            "baseline".into(),
            "no console".into(),
            cpu(&self.baseline),
            rss(&self.baseline),
            "—".into(),
            "—".into(),
            "—".into(),
            "—".into(),
        ]);
        let rates = self.console_rates();
        let (ev, kb) = across(&rates).map_or(("—".into(), "—".into()), |x| {
            let (e, k) = per_sec(x.mean);
            if rates.len() > 1 {
                (
                    format!(
                        "{e} (min {:.1}, max {:.1})",
                        x.min_events_per_sec, x.max_events_per_sec
                    ),
                    k,
                )
            } else {
                (e, k)
            }
        });
        cost.row(vec![
            "consoles".into(),
            format!(
                "{} × /api/v1/changes{} + 1 Chromium on #/devices",
                a.consoles, CONSOLE_FEED
            ),
            cpu(&self.consoles),
            rss(&self.consoles),
            ev,
            kb,
            self.console_tallies
                .iter()
                .map(Tally::lagged)
                .sum::<u64>()
                .to_string(),
            self.console_tallies
                .first()
                .map_or("—".into(), |t| kinds_per_sec(t, self.consoles.wall)),
        ]);
        let page = rate(
            self.page_stream.events,
            self.page_stream.chars,
            self.consoles.wall,
        );
        let (pe, pk) = per_sec(page);
        cost.row(vec![
            "consoles: the Chromium page".into(),
            "its EventSource (the console's feed), counted in the page".into(),
            "(same phase)".into(),
            "(same phase)".into(),
            pe,
            pk,
            "—".into(),
            "—".into(),
        ]);
        let raw = rate(
            self.uncoalesced_tally.events,
            self.uncoalesced_tally.bytes,
            self.uncoalesced.wall,
        );
        let (re, rk) = per_sec(raw);
        cost.row(vec![
            "uncoalesced".into(),
            "1 × /api/v1/changes (no coalesce), consoles closed".into(),
            cpu(&self.uncoalesced),
            rss(&self.uncoalesced),
            re,
            rk,
            self.uncoalesced_tally.lagged().to_string(),
            kinds_per_sec(&self.uncoalesced_tally, self.uncoalesced.wall),
        ]);
        cost.note(format!(
            "phases one after another on one orchestrator, each {} s after a {} s warm-up (subscribers connected, not counted): baseline; then the devices-page requests and renders (in no phase); consoles; uncoalesced",
            a.duration.as_secs(),
            a.warmup.as_secs()
        ));
        cost.note(format!("the consoles are plain HTTP clients reading /api/v1/changes{CONSOLE_FEED} as the console's EventSource does, each signed in with a session of its own (POST /api/v1/session, then the cookie); they do not render or re-read pages. The Chromium page is the real console on #/devices, which also re-reads its page of devices when one changes state (at most every 2 s) and every 10 s for its CPU and memory cells"));
        cost.note("KiB/s: bytes of the response body (SSE framing and keep-alives included); for the Chromium page, characters of the events' data (ASCII JSON: bytes, without the framing). CPU: percent of one core (200 % = both cores of a 2-core machine), sampled every 250 ms; RSS: first and last sample of the phase");
        cost.note(format!(
            "the Chromium page's live indicator at the end: {}; EventSources it opened: {}",
            self.page_live, self.page_stream_opened
        ));
        for e in &self.stream_errors {
            cost.note(format!("BROKE: {e}"));
        }

        let mut page = Table::new(
            format!("console: the devices page with {devices} devices"),
            &["measure", "value"],
        );
        let secs: Vec<f64> = self
            .first_page
            .iter()
            .map(|g| g.elapsed.as_secs_f64())
            .collect();
        let first = self.first_page.first();
        if let Some(s) = spread(&secs) {
            page.row(vec![
                format!(
                    "first response: GET /api/v1/devices?offset=0&limit={}, {} sequential",
                    a.page_size, s.n
                ),
                format!("p50 {} / p99 {} / max {}", ms(s.p50), ms(s.p99), ms(s.max)),
            ]);
        }
        if let Some(g) = first {
            page.row(vec![
                "… its answer".into(),
                format!(
                    "{} devices, X-Total-Count {}, {}",
                    g.items,
                    g.total
                        .map_or("absent (not paged)".into(), |t| t.to_string()),
                    kib(g.bytes as f64)
                ),
            ]);
        }
        page.row(vec![
            "unpaged: GET /api/v1/devices, once".into(),
            format!(
                "{}, {} devices, {}",
                ms(self.unpaged.elapsed.as_secs_f64()),
                self.unpaged.items,
                mib(self.unpaged.bytes as u64)
            ),
        ]);
        let frames: Vec<f64> = self.renders.iter().map(|r| r.frame / 1000.0).collect();
        if let Some(s) = spread(&frames) {
            page.row(vec![
                format!(
                    "first render: navigation → first device row rendered (Chromium, {} loads)",
                    s.n
                ),
                format!(
                    "p50 {} (each: {})",
                    ms(s.p50),
                    frames.iter().map(|f| ms(*f)).collect::<Vec<_>>().join(", ")
                ),
            ]);
        }
        let doms: Vec<f64> = self.renders.iter().map(|r| r.dom / 1000.0).collect();
        if let Some(s) = spread(&doms) {
            page.row(vec![
                "… the row in the DOM".into(),
                format!("p50 {}", ms(s.p50)),
            ]);
        }
        let api: Vec<f64> = self
            .renders
            .iter()
            .filter_map(|r| Some((r.api_end? - r.api_start?) / 1000.0))
            .collect();
        let api_end: Vec<f64> = self
            .renders
            .iter()
            .filter_map(|r| Some(r.api_end? / 1000.0))
            .collect();
        if let (Some(d), Some(e)) = (spread(&api), spread(&api_end)) {
            page.row(vec![
                "… the page's devices request (in the page)".into(),
                format!(
                    "p50 {} long, answered p50 {} after navigation",
                    ms(d.p50),
                    ms(e.p50)
                ),
            ]);
        }
        page.note("first response: request sent → last byte of the body, from this tool with a session cookie, no console open; what the console's devices page asks first (the console's default page size)");
        page.note("first render: headless Chromium (Debian's, via chromedriver), signed in on the console's form once; each load is a new document (about:blank first) of /#/devices with the session cookie: the HTML, the console's modules (revalidated, 304), GET /api/v1/session, the devices page's request, then the table. Times from the page's performance.now() (0 = navigation start): the row in the DOM and laid out (MutationObserver), then the frame showing it produced (requestAnimationFrame, then a task)");
        vec![cost, page]
    }
}

// ----- the scenario -----------------------------------------------------------------------

/// `console -n N`: start the orchestrator, connect the fleet with telemetry
/// flowing, measure, tabulate.
pub async fn console(c: &Common, n: usize, a: &ConsoleArgs) -> Result<Vec<Table>, ScenarioError> {
    // Before minutes of ramping: no browser, no measurement.
    Browser::start(&a.chromedriver).await?.close().await;
    let fd_note = prepare_fds(n)?;
    let mut t = Target::start(c.target.clone()).await?;
    let mut fleet = Fleet::new(c.sim(&t), "sim")?;
    let started = Instant::now();
    fleet.grow_to(n, c.ramp_per_sec).await?;
    if let Err(why) = wait_online(&mut t, &fleet, n, Duration::from_secs(600), started).await {
        fleet.shutdown(Duration::from_secs(5)).await;
        t.stop(c.keep).await;
        return Err(ScenarioError::Failed(format!(
            "not every agent came online: {why}"
        )));
    }
    // Let the connect burst (hello, state) drain before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let sim0 = fleet.stats().snapshot();
    let run = measure(&t.api, t.orch.as_ref().map(Proc::pid), a).await;
    let sim1 = fleet.stats().snapshot();
    let exited = t.orch_exit();
    let setup = c.setup_note(&t);
    fleet.shutdown(Duration::from_secs(10)).await;
    t.stop(c.keep).await;
    let run = match (run, exited) {
        (Ok(r), None) => r,
        (Ok(_), Some(why)) | (Err(_), Some(why)) => return Err(ScenarioError::Failed(why)),
        (Err(e), None) => return Err(e),
    };
    let mut tables = run.tables(n, a);
    tables[0].note(setup);
    tables[0].note(fd_note);
    tables[0].note(format!(
        "SIMULATED agents: real MQTT clients sending heartbeats every {} s and telemetry every {} s (simulated values); over the measurement {} publishes, {} dropped, {} disconnects",
        c.heartbeat.as_secs(),
        c.telemetry.as_secs(),
        sim1.published - sim0.published,
        sim1.dropped - sim0.dropped,
        sim1.disconnects - sim0.disconnects
    ));
    tables[0].note("the tool (agents, subscribers) and Chromium run on the same machine as the orchestrator and compete with it for CPU");
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_nearest_rank_of_any_order() {
        let v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        let s = spread(&v).expect("values");
        assert_eq!((s.n, s.p50, s.p99, s.max), (200, 100.0, 198.0, 200.0));
        let one = spread(&[0.5]).expect("one value");
        assert_eq!((one.p50, one.p99, one.max), (0.5, 0.5, 0.5));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn rates_are_per_second_and_zero_without_a_window() {
        let r = rate(300, 3 * 1024 * 1024, Duration::from_secs(3));
        assert_eq!(r.events_per_sec, 100.0);
        assert_eq!(r.bytes_per_sec, 1024.0 * 1024.0);
        let z = rate(5, 5, Duration::ZERO);
        assert_eq!((z.events_per_sec, z.bytes_per_sec), (0.0, 0.0));
    }

    #[test]
    fn subscribers_are_summed_up_by_mean_and_extremes() {
        let r = |e, b| Rate {
            events_per_sec: e,
            bytes_per_sec: b,
        };
        let x = across(&[r(10.0, 100.0), r(14.0, 300.0), r(12.0, 200.0)]).expect("rates");
        assert_eq!(x.mean, r(12.0, 200.0));
        assert_eq!((x.min_events_per_sec, x.max_events_per_sec), (10.0, 14.0));
        assert_eq!(across(&[]), None);
    }

    #[test]
    fn kinds_are_listed_most_first() {
        let mut t = Tally::default();
        t.by_kind.insert("device".into(), 4);
        t.by_kind.insert("telemetry".into(), 200);
        t.by_kind.insert("app".into(), 4);
        assert_eq!(
            kinds_per_sec(&t, Duration::from_secs(4)),
            "telemetry 50.0/s, app 1.0/s, device 1.0/s"
        );
        assert_eq!(kinds_per_sec(&Tally::default(), Duration::from_secs(1)), "");
    }
}

#[cfg(test)]
mod feed_tests {
    #[test]
    fn the_load_test_subscribes_as_the_console_does() {
        assert_eq!(super::CONSOLE_FEED, drover::http::console::FEED);
    }
}
