//! Follows the logs of running managed containers and publishes them in
//! bounded batches.
//!
//! Per container: a follower reads Docker's log stream into a bounded
//! channel, a batcher drains it into `LogBatch`es of at most 100 lines,
//! 32 KiB or 1 s. When the channel is full (a chatty container, a slow
//! broker) lines are dropped and counted, never buffered without limit.
//! Docker ends a log stream when its container stops; the supervisor
//! re-attaches when it sees the container running again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use drover_shared::payload::{LogBatch, LogLine, LogStream};
use drover_shared::Name;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::mqtt::Publisher;
use crate::now_ms;
use crate::runtime::{DockerRuntime, ManagedContainer, Runtime};

const MAX_LINES: usize = 100;
const MAX_BYTES: usize = 32 * 1024;
const MAX_AGE: Duration = Duration::from_secs(1);
/// A single line longer than this is cut, so one line cannot fill a batch.
const MAX_LINE: usize = 8 * 1024;
/// Lines buffered per container between the follower and the batcher.
const BUFFER_LINES: usize = 1000;
/// How often the supervisor looks for newly running containers.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// Attaches followers to running managed containers until cancelled.
pub async fn run(runtime: DockerRuntime, publisher: Publisher) {
    let mut followers: JoinSet<(String, i64)> = JoinSet::new();
    let mut active: HashSet<String> = HashSet::new();
    // Where to resume a container's stream after it stopped and restarted.
    let mut resume_at: HashMap<String, i64> = HashMap::new();
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = scan.tick() => {
                let Ok(list) = runtime.list_managed().await else { continue };
                let Ok(docker) = runtime.client().await else { continue };
                let ids: HashSet<&str> = list.iter().map(|c| c.id.as_str()).collect();
                resume_at.retain(|id, _| ids.contains(id.as_str()));
                for c in list.into_iter().filter(|c| c.state == "running") {
                    if active.contains(&c.id) {
                        continue;
                    }
                    // First attach: from now, not the container's whole history.
                    let since = resume_at.get(&c.id).copied().unwrap_or_else(unix_now_s);
                    active.insert(c.id.clone());
                    followers.spawn(follow(docker.clone(), publisher.clone(), c, since).in_current_span());
                }
            }
            Some(done) = followers.join_next() => {
                if let Ok((id, ended_at)) = done {
                    active.remove(&id);
                    resume_at.insert(id, ended_at);
                }
            }
        }
    }
}

fn unix_now_s() -> i64 {
    i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX)
}

async fn follow(
    docker: bollard::Docker,
    publisher: Publisher,
    c: ManagedContainer,
    since: i64,
) -> (String, i64) {
    debug!(container = %c.id, app = %c.app, "following logs");
    let (tx, rx) = mpsc::channel(BUFFER_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let batcher = tokio::spawn(
        batch(
            rx,
            Arc::clone(&dropped),
            publisher,
            c.app.clone(),
            c.container.clone(),
        )
        .in_current_span(),
    );
    let opts = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .since(i32::try_from(since).unwrap_or(i32::MAX))
        .build();
    let mut stream = docker.logs(&c.id, Some(opts));
    while let Some(item) = stream.next().await {
        let (stream_kind, bytes) = match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                (LogStream::Stdout, message)
            }
            Ok(LogOutput::StdErr { message }) => (LogStream::Stderr, message),
            Ok(LogOutput::StdIn { .. }) => continue,
            Err(e) => {
                warn!(container = %c.id, error = %e, "log stream failed");
                break;
            }
        };
        for raw in String::from_utf8_lossy(&bytes).lines() {
            let line = parse_line(raw, stream_kind);
            if tx.try_send(line).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(tx);
    let _ = batcher.await;
    (c.id, unix_now_s())
}

/// Splits Docker's `<RFC 3339 timestamp> <text>` and bounds the text.
fn parse_line(raw: &str, stream: LogStream) -> LogLine {
    let (at_ms, text) = match raw.split_once(' ') {
        Some((ts, rest)) => match parse_rfc3339_ms(ts) {
            Some(ms) => (ms, rest),
            None => (now_ms(), raw),
        },
        None => (parse_rfc3339_ms(raw).unwrap_or_else(now_ms), ""),
    };
    let mut line = text.to_string();
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    LogLine {
        at_ms,
        stream,
        line,
    }
}

/// Docker writes `2024-05-01T12:34:56.123456789Z`; only UTC is expected.
fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + millis).ok()
}

async fn batch(
    mut rx: mpsc::Receiver<LogLine>,
    dropped: Arc<AtomicU64>,
    publisher: Publisher,
    app: Name,
    container: Name,
) {
    loop {
        let Some(first) = rx.recv().await else { return };
        let deadline = tokio::time::Instant::now() + MAX_AGE;
        let mut bytes = first.line.len();
        let mut lines = vec![first];
        let mut closed = false;
        while lines.len() < MAX_LINES && bytes < MAX_BYTES {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(l) => {
                        bytes += l.line.len();
                        lines.push(l);
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let n = lines.len() as u64;
        let msg = LogBatch {
            app: app.clone(),
            container: container.clone(),
            lines,
            dropped: dropped.swap(0, Ordering::Relaxed),
        };
        if !publisher.send_sample(&msg) {
            // Offline: these lines are lost too; say so in the next batch.
            dropped.fetch_add(n + msg.dropped, Ordering::Relaxed);
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_parse_to_unix_millis() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2024-05-01T12:34:56.123456789Z"),
            Some(1_714_566_896_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:01.5Z"),
            Some(951_782_401_500)
        );
        assert_eq!(parse_rfc3339_ms("garbage"), None);
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let l = parse_line("2024-05-01T12:34:56.1Z hello world", LogStream::Stderr);
        assert_eq!(
            (l.at_ms, l.line.as_str(), l.stream),
            (1_714_566_896_100, "hello world", LogStream::Stderr)
        );
        let long = format!("2024-05-01T12:34:56Z {}", "é".repeat(MAX_LINE));
        assert!(parse_line(&long, LogStream::Stdout).line.len() <= MAX_LINE);
    }
}
