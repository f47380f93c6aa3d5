//! `drover logs DEVICE APP [-c CONTAINER] [--tail N] [-f]`: the newest lines
//! from the orchestrator's history, and with `-f` every new one as it
//! arrives, followed on the change stream (`GET /api/v1/changes?device=ID`,
//! server-sent events) until Ctrl-C.
//!
//! The stream is opened first and the history read after, so nothing falls
//! between them; the lines both carry are printed once ([`Printed`]). When
//! the stream drops (the orchestrator restarted) or says it lagged, the
//! CLI subscribes again and reads what the history got meanwhile, from a
//! little before the newest line it printed, printing only what it has
//! not. Lines are told apart by their timestamp (the agent's), stream and
//! text: a line identical to one already printed in the same millisecond
//! is taken for it.

use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;

use drover_shared::payload::{LogBatch, LogLine, LogStream};

use super::{Client, LogsArgs, Output};
use crate::contract::ErrorBody;

/// How far back from the newest printed line a re-read after a reconnect
/// starts, and how long printed lines are remembered to tell them apart:
/// the lines of an app's containers arrive in time order per container,
/// not across them.
const OVERLAP_MS: u64 = 60_000;
/// The most lines one read asks for (the server's most).
const MAX_READ: usize = 10_000;
/// The server sends a keep-alive every 15 s: a stream silent for longer
/// than this is dead (a partition leaves no error behind).
const STREAM_IDLE: Duration = Duration::from_secs(45);
/// A follow may last for days; its request is renewed after this long.
const STREAM_REQUEST: Duration = Duration::from_secs(24 * 60 * 60);
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// Which device, app and container, from `drover logs`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selection {
    device: String,
    app: String,
    container: Option<String>,
}

impl LogsArgs {
    fn selection(&self) -> Result<Selection> {
        let (device, app) = match (&self.app, &self.device) {
            (Some(app), None) => (self.first.clone(), app.clone()),
            (None, Some(device)) => (device.clone(), self.first.clone()),
            (Some(_), Some(_)) => {
                bail!("name the device once: `drover logs DEVICE APP` or `drover logs APP --device DEVICE`")
            }
            (None, None) => bail!("which app? `drover logs DEVICE APP`"),
        };
        Ok(Selection {
            device,
            app,
            container: self.container.clone(),
        })
    }
}

/// A line as the CLI tells lines apart: time, stream (stderr or not),
/// text.
type Key = (u64, bool, String);

fn key(l: &LogLine) -> Key {
    (l.at_ms, l.stream == LogStream::Stderr, l.line.clone())
}

/// What has been printed, to print every line once across the first
/// read, the stream, reconnections and re-reads. Bounded: lines more than
/// [`OVERLAP_MS`] older than the newest printed are forgotten (re-reads
/// never reach that far back).
#[derive(Debug, Default)]
struct Printed {
    /// The newest timestamp printed.
    newest: u64,
    /// The oldest line of the first read (the tail): a re-read never
    /// prints a line of that millisecond or older, which the tail left out
    /// on purpose.
    floor: Option<u64>,
    /// How often each line was printed.
    count: HashMap<Key, u32>,
    /// Lines printed from the last read that the current stream may
    /// carry too (they reached the engine after the subscription).
    from_read: HashMap<Key, u32>,
}

impl Printed {
    /// The first read: the tail, all printed.
    fn first(&mut self, lines: Vec<LogLine>) -> Vec<LogLine> {
        let floor = lines.first().map(|l| l.at_ms);
        let out = self.read(lines);
        self.floor = floor;
        out
    }

    /// The lines of a read (oldest first) not printed yet; they are
    /// counted as printed, and the current stream's copies of them will
    /// be skipped.
    fn read(&mut self, lines: Vec<LogLine>) -> Vec<LogLine> {
        let mut seen: HashMap<Key, u32> = HashMap::new();
        let mut out = Vec::new();
        for l in lines {
            let k = key(&l);
            if self.floor.is_some_and(|f| l.at_ms <= f) && !self.count.contains_key(&k) {
                continue;
            }
            let n = seen.entry(k.clone()).or_default();
            *n += 1;
            if *n > self.count.get(&k).copied().unwrap_or(0) {
                out.push(l);
            }
        }
        for (k, n) in seen {
            let c = self.count.entry(k).or_default();
            *c = (*c).max(n);
        }
        self.from_read = out.iter().fold(HashMap::new(), |mut m, l| {
            *m.entry(key(l)).or_default() += 1;
            m
        });
        self.note(&out);
        out
    }

    /// Whether a line from the stream is to be printed (and counts it).
    fn live(&mut self, l: &LogLine) -> bool {
        let k = key(l);
        if let Some(n) = self.from_read.get_mut(&k) {
            if *n > 0 {
                *n -= 1;
                return false;
            }
        }
        *self.count.entry(k).or_default() += 1;
        self.note(std::slice::from_ref(l));
        true
    }

    /// Where a re-read starts.
    fn since(&self) -> u64 {
        let overlap = self.newest.saturating_sub(OVERLAP_MS);
        self.floor.map_or(overlap, |f| f.max(overlap))
    }

    /// From when printed lines are remembered.
    fn horizon(&self) -> u64 {
        self.newest.saturating_sub(OVERLAP_MS)
    }

    fn note(&mut self, printed: &[LogLine]) {
        let newest = printed.iter().map(|l| l.at_ms).max().unwrap_or(0);
        if newest > self.newest {
            self.newest = newest;
            let keep = self.horizon();
            self.count.retain(|k, _| k.0 >= keep);
            self.from_read.retain(|k, _| k.0 >= keep);
        }
    }
}

/// One thing the change stream said that matters here.
enum Seen {
    Lines(Vec<LogLine>),
    /// The server dropped changes for this client: read the history again.
    Lagged,
    Other,
}

fn parse_event(data: &str, want: &Selection) -> Result<Seen> {
    let v: Value = serde_json::from_str(data)
        .with_context(|| format!("the change stream sent an event that is not JSON: {data:?}"))?;
    Ok(match v.get("kind").and_then(Value::as_str) {
        Some("logs") => {
            let batch: LogBatch = serde_json::from_value(v["batch"].clone())
                .context("the change stream sent log lines this CLI cannot read")?;
            let device = v.get("device").and_then(Value::as_str);
            let ours = device == Some(want.device.as_str())
                && batch.app.as_str() == want.app
                && want
                    .container
                    .as_deref()
                    .is_none_or(|c| batch.container.as_str() == c);
            if ours {
                Seen::Lines(batch.lines)
            } else {
                Seen::Other
            }
        }
        Some("lagged") => Seen::Lagged,
        _ => Seen::Other,
    })
}

/// Why following stopped: the API refused (give up) or the connection
/// went (try again).
enum Stop {
    Refused(anyhow::Error),
    Lost(anyhow::Error),
}

impl Client {
    pub(crate) async fn logs(&self, args: LogsArgs) -> Result<()> {
        let sel = args.selection()?;
        let tail = args.tail;
        if !(1..=MAX_READ).contains(&tail) {
            bail!("--tail must be from 1 to {MAX_READ}, got {tail}");
        }
        if !args.follow {
            let v = self
                .read_logs(&sel, tail, None)
                .await
                .map_err(|s| match s {
                    Stop::Refused(e) | Stop::Lost(e) => e,
                })?;
            return self.print(&v, |lines: Vec<LogLine>| {
                lines.into_iter().map(|l| l.line + "\n").collect()
            });
        }
        tokio::select! {
            r = self.follow_logs(&sel, tail) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }

    async fn read_logs(
        &self,
        sel: &Selection,
        tail: usize,
        since_ms: Option<u64>,
    ) -> std::result::Result<Value, Stop> {
        let mut q = vec![("app", sel.app.clone()), ("tail", tail.to_string())];
        if let Some(c) = &sel.container {
            q.push(("container", c.clone()));
        }
        if let Some(s) = since_ms {
            q.push(("since_ms", s.to_string()));
        }
        let resp = self
            .http
            .get(format!("{}/api/v1/devices/{}/logs", self.base, sel.device))
            .query(&q)
            .send()
            .await
            .map_err(|e| {
                Stop::Lost(
                    anyhow::Error::new(e)
                        .context(format!("cannot reach the Drover API at {}", self.base)),
                )
            })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Stop::Lost(anyhow::Error::new(e)))?;
        if !status.is_success() {
            let e = match serde_json::from_str::<ErrorBody>(&text) {
                Ok(e) => anyhow::anyhow!("{} ({status})", e.error.message),
                Err(_) => anyhow::anyhow!("{status}: {text}"),
            };
            return Err(if status.is_server_error() {
                Stop::Lost(e)
            } else {
                Stop::Refused(e)
            });
        }
        serde_json::from_str(&text).map_err(|e| Stop::Refused(e.into()))
    }

    /// Prints the tail, then follows; reconnects with jittered backoff
    /// for as long as the API comes back, gives up when it refuses (or
    /// cannot be reached before the tail was printed).
    async fn follow_logs(&self, sel: &Selection, tail: usize) -> Result<()> {
        let mut printed = Printed::default();
        let mut first = true;
        let mut delay = RETRY_FIRST;
        loop {
            let (stop, caught_up) = self.follow_once(sel, tail, &mut first, &mut printed).await;
            match stop {
                Stop::Refused(e) => return Err(e),
                Stop::Lost(e) if first => return Err(e),
                Stop::Lost(e) => {
                    if caught_up {
                        delay = RETRY_FIRST;
                    }
                    eprintln!("drover: {e:#}; reconnecting");
                    let wait = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One subscription: stream, then read (the tail the first time, what
    /// the history got since the newest printed line after that), then
    /// the stream's lines until it ends.
    /// Also says whether it got as far as the stream.
    async fn follow_once(
        &self,
        sel: &Selection,
        tail: usize,
        first: &mut bool,
        printed: &mut Printed,
    ) -> (Stop, bool) {
        let resp = match self.subscribe(sel).await {
            Ok(resp) => resp,
            Err(stop) => return (stop, false),
        };
        // Subscribed: what the history has now, then the stream.
        if let Err(stop) = self.catch_up(sel, tail, *first, printed).await {
            return (stop, false);
        }
        *first = false;
        (self.stream_lines(resp, sel, tail, printed).await, true)
    }

    async fn subscribe(&self, sel: &Selection) -> std::result::Result<reqwest::Response, Stop> {
        let resp = match self
            .http
            .get(format!("{}/api/v1/changes", self.base))
            .query(&[("device", sel.device.as_str())])
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(STREAM_REQUEST)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Err(Stop::Lost(
                    anyhow::Error::new(e)
                        .context(format!("cannot reach the Drover API at {}", self.base)),
                ))
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let e = match serde_json::from_str::<ErrorBody>(&text) {
                Ok(e) => anyhow::anyhow!("cannot follow the logs: {} ({status})", e.error.message),
                Err(_) => anyhow::anyhow!("cannot follow the logs: {status}: {text}"),
            };
            return Err(if status.is_server_error() {
                Stop::Lost(e)
            } else {
                Stop::Refused(e)
            });
        }
        Ok(resp)
    }

    /// Prints the stream's lines of the selection until it ends.
    async fn stream_lines(
        &self,
        resp: reqwest::Response,
        sel: &Selection,
        tail: usize,
        printed: &mut Printed,
    ) -> Stop {
        let chunks = futures_util::stream::try_unfold(resp, |mut r| async move {
            match tokio::time::timeout(STREAM_IDLE, r.chunk()).await {
                Ok(c) => Ok(c?.map(|b| (b, r))),
                Err(_) => Err(StreamError::Idle),
            }
        });
        let mut events = pin!(chunks.eventsource());
        loop {
            let event = match events.next().await {
                None => {
                    return Stop::Lost(anyhow::anyhow!(
                        "the Drover API at {} closed the change stream",
                        self.base
                    ))
                }
                Some(Err(e)) => {
                    return Stop::Lost(anyhow::anyhow!(
                        "lost the change stream from the Drover API at {}: {e}",
                        self.base
                    ))
                }
                Some(Ok(e)) => e,
            };
            match parse_event(&event.data, sel) {
                Ok(Seen::Lines(lines)) => {
                    for l in lines {
                        if printed.live(&l) {
                            self.print_line(&l);
                        }
                    }
                }
                Ok(Seen::Lagged) => {
                    if let Err(stop) = self.catch_up(sel, tail, false, printed).await {
                        return stop;
                    }
                }
                Ok(Seen::Other) => {}
                Err(e) => return Stop::Refused(e),
            }
        }
    }

    /// Reads the history and prints what was not printed yet.
    async fn catch_up(
        &self,
        sel: &Selection,
        tail: usize,
        first: bool,
        printed: &mut Printed,
    ) -> std::result::Result<(), Stop> {
        let v = if first {
            self.read_logs(sel, tail, None).await?
        } else {
            self.read_logs(sel, MAX_READ, Some(printed.since())).await?
        };
        let lines: Vec<LogLine> = serde_json::from_value(v).map_err(|e| {
            Stop::Refused(
                anyhow::Error::new(e).context("the API sent log lines this CLI cannot read"),
            )
        })?;
        let new = if first {
            printed.first(lines)
        } else {
            printed.read(lines)
        };
        for l in new {
            self.print_line(&l);
        }
        Ok(())
    }

    fn print_line(&self, l: &LogLine) {
        match self.output {
            Output::Table => println!("{}", l.line),
            Output::Json => println!(
                "{}",
                serde_json::to_string(l).unwrap_or_else(|_| "{}".into())
            ),
        }
    }
}

/// Why the stream's bytes stopped.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("no keep-alive for {}s", STREAM_IDLE.as_secs())]
    Idle,
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at_ms: u64, text: &str) -> LogLine {
        LogLine {
            at_ms,
            stream: LogStream::Stdout,
            line: text.into(),
        }
    }

    fn texts(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    #[test]
    fn the_device_comes_first_or_with_its_flag() {
        let args = |first: &str, app: Option<&str>, device: Option<&str>| LogsArgs {
            first: first.into(),
            app: app.map(Into::into),
            device: device.map(Into::into),
            container: Some("main".into()),
            tail: 10,
            follow: false,
        };
        let want = Selection {
            device: "pi-1".into(),
            app: "web".into(),
            container: Some("main".into()),
        };
        assert_eq!(
            args("pi-1", Some("web"), None).selection().expect("ok"),
            want
        );
        assert_eq!(
            args("web", None, Some("pi-1")).selection().expect("ok"),
            want
        );
        assert!(args("pi-1", Some("web"), Some("pi-2")).selection().is_err());
        assert!(args("web", None, None).selection().is_err());
    }

    #[test]
    fn a_line_on_the_stream_and_in_the_read_is_printed_once() {
        let mut p = Printed::default();
        // The read after subscribing already has b; the stream carries
        // b again, then c.
        let out = p.read(vec![line(1, "a"), line(2, "b")]);
        assert_eq!(texts(&out), ["a", "b"]);
        assert!(!p.live(&line(2, "b")));
        assert!(p.live(&line(3, "c")));
        // The same text at another time is another line.
        assert!(p.live(&line(4, "b")));
    }

    #[test]
    fn identical_lines_of_one_millisecond_are_each_printed() {
        let mut p = Printed::default();
        assert_eq!(p.read(vec![line(1, ""), line(1, "")]).len(), 2);
        // Live, two more of them: new ones (the read's copies came first).
        assert!(!p.live(&line(1, "")));
        assert!(!p.live(&line(1, "")));
        assert!(p.live(&line(1, "")));
        // A re-read holding three of them prints none again.
        assert!(p
            .read(vec![line(1, ""), line(1, ""), line(1, "")])
            .is_empty());
        // With four, the fourth.
        assert_eq!(
            p.read(vec![line(1, ""), line(1, ""), line(1, ""), line(1, "")])
                .len(),
            1
        );
    }

    #[test]
    fn a_reread_after_a_reconnect_prints_only_what_was_missed() {
        let mut p = Printed::default();
        p.first(vec![line(10_000, "a")]);
        assert!(p.live(&line(100_000, "b")));
        assert_eq!(p.since(), 100_000 - OVERLAP_MS);
        // The orchestrator restarted; the history has b and what came
        // during the outage.
        let out = p.read(vec![
            line(100_000, "b"),
            line(101_000, "c"),
            line(102_000, "d"),
        ]);
        assert_eq!(texts(&out), ["c", "d"]);
        // The new stream carries d again: skipped; then e.
        assert!(!p.live(&line(102_000, "d")));
        assert!(p.live(&line(103_000, "e")));
    }

    #[test]
    fn a_reread_never_prints_what_the_tail_left_out() {
        let mut p = Printed::default();
        // The tail: the newest two of many.
        let out = p.first(vec![line(5_000, "x5"), line(6_000, "x6")]);
        assert_eq!(out.len(), 2);
        assert!(p.live(&line(7_000, "x7")));
        // Re-read from the tail's oldest line on, not a minute back.
        assert_eq!(p.since(), 5_000);
        // Even a server that answers with older lines gets only the new.
        let out = p.read(vec![
            line(4_000, "x4"),
            line(5_000, "x5-twin"),
            line(5_000, "x5"),
            line(6_000, "x6"),
            line(7_000, "x7"),
            line(8_000, "x8"),
        ]);
        assert_eq!(texts(&out), ["x8"]);
    }

    #[test]
    fn what_is_remembered_is_bounded_by_the_overlap() {
        let mut p = Printed::default();
        for i in 0..1_000u64 {
            assert!(p.live(&line(i * 1_000, "x")));
        }
        // Only the last minute's lines are remembered.
        assert!(
            p.count.len() <= (OVERLAP_MS / 1_000) as usize + 1,
            "{}",
            p.count.len()
        );
        // A container lagging behind by more than that still prints.
        assert!(p.live(&line(0, "late")));
    }

    #[test]
    fn only_the_selected_apps_lines_are_taken_from_the_stream() {
        let sel = Selection {
            device: "pi-1".into(),
            app: "web".into(),
            container: None,
        };
        let event = |device: &str, app: &str, container: &str| {
            serde_json::json!({
                "kind": "logs",
                "device": device,
                "batch": {"app": app, "container": container, "lines": [
                    {"at_ms": 1, "stream": "stdout", "line": "hi"}
                ], "dropped": 0}
            })
            .to_string()
        };
        assert!(matches!(
            parse_event(&event("pi-1", "web", "main"), &sel),
            Ok(Seen::Lines(l)) if l.len() == 1
        ));
        assert!(matches!(
            parse_event(&event("pi-1", "db", "main"), &sel),
            Ok(Seen::Other)
        ));
        assert!(matches!(
            parse_event(&event("pi-2", "web", "main"), &sel),
            Ok(Seen::Other)
        ));
        let only_side = Selection {
            container: Some("side".into()),
            ..sel.clone()
        };
        assert!(matches!(
            parse_event(&event("pi-1", "web", "main"), &only_side),
            Ok(Seen::Other)
        ));
        assert!(matches!(
            parse_event(r#"{"kind":"lagged","missed":3}"#, &sel),
            Ok(Seen::Lagged)
        ));
        assert!(matches!(
            parse_event(r#"{"kind":"telemetry"}"#, &sel),
            Ok(Seen::Other)
        ));
        assert!(parse_event("not json", &sel).is_err());
    }
}
