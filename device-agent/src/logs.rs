//! Follows the logs of running managed containers and publishes them in
//! bounded batches.
//!
//! Per container: a follower reads Docker's log stream into a bounded
//! channel, a batcher drains it into `LogBatch`es of at most 100 lines,
//! 32 KiB or 1 s. When the channel is full (a chatty container, a slow
//! broker) lines are dropped and counted, never buffered without limit.
//! Docker ends a log stream when its container stops; the supervisor
//! re-attaches when it sees the container running again.
//!
//! Where to resume is decided by Docker's own clock, never the device's: a
//! device clock an hour ahead would skip every line, one behind would send
//! old lines again. Each line carries Docker's timestamp; the batcher
//! records the timestamp of the last line it handed on ([`Position`]), and
//! a re-attach asks Docker for lines from that second on and drops the ones
//! already sent ([`Resume`]). Positions are kept in the state directory,
//! so an agent restart neither repeats nor loses lines; a container seen
//! for the first time is read from its beginning.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use drover_shared::payload::{LogBatch, LogLine, LogStream};
use drover_shared::Name;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::mqtt::Publisher;
use crate::runtime::{DockerRuntime, ManagedContainer, Runtime};

const MAX_LINES: usize = 100;
const MAX_BYTES: usize = 32 * 1024;
const MAX_AGE: Duration = Duration::from_secs(1);
/// A single line longer than this is cut, so one line cannot fill a batch.
const MAX_LINE: usize = 8 * 1024;
/// Lines buffered per container between the follower and the batcher.
const BUFFER_LINES: usize = 1000;
/// How often the supervisor looks for newly running containers (and saves
/// positions that moved).
const SCAN_EVERY: Duration = Duration::from_secs(2);
const POSITIONS_FILE: &str = "log-positions.json";

/// How far a container's log has been handed on, in Docker's time: the
/// timestamp of the last line, and how many lines with exactly that
/// timestamp were handed on (Docker's `since` has whole seconds here and
/// includes its bound, so a re-attach repeats lines that must be skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub ts_ns: u64,
    pub same: u32,
}

impl Position {
    /// One more line handed on, with Docker's timestamp `ts_ns`.
    pub fn advance(&mut self, ts_ns: u64) {
        if ts_ns == self.ts_ns {
            self.same = self.same.saturating_add(1);
        } else if ts_ns > self.ts_ns {
            *self = Position { ts_ns, same: 1 };
        }
    }

    /// Docker's `since` for a re-attach: the whole second holding the last
    /// line, which the stream then repeats from.
    pub fn since_s(&self) -> i32 {
        i32::try_from(self.ts_ns / 1_000_000_000).unwrap_or(i32::MAX)
    }
}

/// Drops the lines of a re-attached stream that were handed on before.
#[derive(Debug)]
pub struct Resume {
    from: Option<Position>,
    same_seen: u32,
}

impl Resume {
    pub fn new(from: Option<Position>) -> Self {
        Resume { from, same_seen: 0 }
    }

    /// Whether the line with Docker's timestamp `ts_ns` is new.
    pub fn admit(&mut self, ts_ns: u64) -> bool {
        let Some(from) = self.from else { return true };
        if ts_ns < from.ts_ns {
            return false;
        }
        if ts_ns == from.ts_ns {
            self.same_seen += 1;
            return self.same_seen > from.same;
        }
        // Past the boundary: everything from here on is new.
        self.from = None;
        true
    }
}

/// Every container's position, shared by the batchers that move them and
/// the supervisor that saves them.
#[derive(Debug, Clone)]
pub struct Positions {
    path: PathBuf,
    inner: Arc<Mutex<(HashMap<String, Position>, bool)>>,
}

impl Positions {
    /// Loads the positions kept in `state_dir`; none when absent or unreadable
    /// (then containers are read from their beginning: repeated lines, never
    /// lost ones).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(POSITIONS_FILE);
        let map = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring unreadable log positions");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        Positions {
            path,
            inner: Arc::new(Mutex::new((map, false))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<String, Position>, bool)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, container_id: &str) -> Option<Position> {
        self.lock().0.get(container_id).copied()
    }

    fn advance(&self, container_id: &str, ts_ns: u64) {
        let mut g = self.lock();
        g.0.entry(container_id.to_string())
            .or_default()
            .advance(ts_ns);
        g.1 = true;
    }

    /// Forgets containers that no longer exist.
    fn retain(&self, ids: &HashSet<&str>) {
        let mut g = self.lock();
        let before = g.0.len();
        g.0.retain(|id, _| ids.contains(id.as_str()));
        if g.0.len() != before {
            g.1 = true;
        }
    }

    /// Writes the positions if they moved since the last save. Blocking.
    pub fn save(&self) -> std::io::Result<()> {
        let bytes = {
            let mut g = self.lock();
            if !g.1 {
                return Ok(());
            }
            g.1 = false;
            serde_json::to_vec(&g.0).map_err(std::io::Error::other)?
        };
        crate::store::write_file(&self.path, &bytes, None).inspect_err(|_| {
            // Still unsaved: try again next time.
            self.lock().1 = true;
        })
    }
}

/// Attaches followers to running managed containers until cancelled.
pub async fn run(runtime: DockerRuntime, publisher: Publisher, positions: Positions) {
    let mut followers: JoinSet<String> = JoinSet::new();
    let mut active: HashSet<String> = HashSet::new();
    let mut save_failing = false;
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = scan.tick() => {
                let p = positions.clone();
                match tokio::task::spawn_blocking(move || p.save()).await {
                    Ok(Ok(())) => save_failing = false,
                    Ok(Err(e)) if !save_failing => {
                        save_failing = true;
                        warn!(error = %e, "cannot save log positions; lines may be sent again after a restart");
                    }
                    _ => {}
                }
                let Ok(list) = runtime.list_managed().await else { continue };
                let Ok(docker) = runtime.client().await else { continue };
                let ids: HashSet<&str> = list.iter().map(|c| c.id.as_str()).collect();
                positions.retain(&ids);
                for c in list.into_iter().filter(|c| c.state == "running") {
                    if active.contains(&c.id) {
                        continue;
                    }
                    active.insert(c.id.clone());
                    followers.spawn(follow(docker.clone(), publisher.clone(), c, positions.clone()).in_current_span());
                }
            }
            Some(done) = followers.join_next() => {
                if let Ok(id) = done {
                    active.remove(&id);
                }
            }
        }
    }
}

async fn follow(
    docker: bollard::Docker,
    publisher: Publisher,
    c: ManagedContainer,
    positions: Positions,
) -> String {
    let from = positions.get(&c.id);
    debug!(container = %c.id, app = %c.app, ?from, "following logs");
    let (tx, rx) = mpsc::channel(BUFFER_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let batcher = tokio::spawn(
        batch(
            rx,
            Arc::clone(&dropped),
            publisher,
            (c.app.clone(), c.container.clone()),
            (c.id.clone(), positions),
        )
        .in_current_span(),
    );
    let opts = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        // Never seen: from the container's beginning, by Docker's clock.
        .since(from.map_or(0, |p| p.since_s()))
        .build();
    let mut resume = Resume::new(from);
    let mut last_ts = from.map(|p| p.ts_ns);
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
            let (line, ts) = parse_line(raw, stream_kind, last_ts);
            let Some(ts) = ts else {
                // No timestamp at all: nothing to resume by; passed on.
                if tx.try_send((line, None)).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            last_ts = Some(ts);
            if !resume.admit(ts) {
                continue;
            }
            if tx.try_send((line, Some(ts))).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(tx);
    let _ = batcher.await;
    c.id
}

/// Splits Docker's `<RFC 3339 timestamp> <text>` and bounds the text. A
/// line without a timestamp of its own (the continuation of a multi-line
/// message) takes the one before it.
fn parse_line(raw: &str, stream: LogStream, previous: Option<u64>) -> (LogLine, Option<u64>) {
    let (ts, text) = match raw.split_once(' ') {
        Some((ts, rest)) => match parse_rfc3339_ns(ts) {
            Some(ns) => (Some(ns), rest),
            None => (previous, raw),
        },
        None => match parse_rfc3339_ns(raw) {
            Some(ns) => (Some(ns), ""),
            None => (previous, raw),
        },
    };
    let mut line = text.to_string();
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    let at_ms = ts.map_or(0, |ns| ns / 1_000_000);
    (
        LogLine {
            at_ms,
            stream,
            line,
        },
        ts,
    )
}

/// Docker writes `2024-05-01T12:34:56.123456789Z`; only UTC is expected.
fn parse_rfc3339_ns(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = format!("{frac:0<9}").parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs.checked_mul(1_000_000_000)?.checked_add(nanos)?).ok()
}

async fn batch(
    mut rx: mpsc::Receiver<(LogLine, Option<u64>)>,
    dropped: Arc<AtomicU64>,
    publisher: Publisher,
    (app, container): (Name, Name),
    (id, positions): (String, Positions),
) {
    loop {
        let Some(first) = rx.recv().await else { return };
        let deadline = tokio::time::Instant::now() + MAX_AGE;
        let mut bytes = first.0.line.len();
        let mut lines = vec![first];
        let mut closed = false;
        while lines.len() < MAX_LINES && bytes < MAX_BYTES {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(l) => {
                        bytes += l.0.line.len();
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
        let stamps: Vec<u64> = lines.iter().filter_map(|(_, ts)| *ts).collect();
        let msg = LogBatch {
            app: app.clone(),
            container: container.clone(),
            lines: lines.into_iter().map(|(l, _)| l).collect(),
            dropped: dropped.swap(0, Ordering::Relaxed),
        };
        if !publisher.send_sample(&msg) {
            // Offline: these lines are lost too; say so in the next batch.
            dropped.fetch_add(n + msg.dropped, Ordering::Relaxed);
        }
        // Handed on (sent, or counted as dropped): a re-attach starts after them.
        for ts in stamps {
            positions.advance(&id, ts);
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn docker_timestamps_parse_to_unix_nanos() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("2024-05-01T12:34:56.123456789Z"),
            Some(1_714_566_896_123_456_789)
        );
        assert_eq!(
            parse_rfc3339_ns("2000-02-29T00:00:01.5Z"),
            Some(951_782_401_500 * MS)
        );
        assert_eq!(parse_rfc3339_ns("garbage"), None);
        assert_eq!(parse_rfc3339_ns("2024-05-01T12:34:56.1x3Z"), None);
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let (l, ts) = parse_line(
            "2024-05-01T12:34:56.1Z hello world",
            LogStream::Stderr,
            None,
        );
        assert_eq!(
            (l.at_ms, l.line.as_str(), l.stream, ts),
            (
                1_714_566_896_100,
                "hello world",
                LogStream::Stderr,
                Some(1_714_566_896_100 * MS)
            )
        );
        let long = format!("2024-05-01T12:34:56Z {}", "é".repeat(MAX_LINE));
        assert!(parse_line(&long, LogStream::Stdout, None).0.line.len() <= MAX_LINE);
    }

    #[test]
    fn a_line_without_its_own_timestamp_takes_the_previous_one_never_the_local_clock() {
        let (l, ts) = parse_line("continued text", LogStream::Stdout, Some(42 * S));
        assert_eq!(
            (l.line.as_str(), l.at_ms, ts),
            ("continued text", 42_000, Some(42 * S))
        );
        let (l, ts) = parse_line("no stamp at all", LogStream::Stdout, None);
        assert_eq!((l.at_ms, ts), (0, None));
    }

    /// Docker's log with timestamps, as a re-attach with `since` sees it:
    /// every line at or after the whole second.
    fn from_second(log: &[u64], since_s: i32) -> Vec<u64> {
        log.iter()
            .copied()
            .filter(|ts| *ts >= u64::try_from(since_s).unwrap_or(0) * S)
            .collect()
    }

    /// Reads `log` in attaches that stop after `cuts[i]` lines each; every
    /// line must come out exactly once, in order.
    fn read_in_attaches(log: &[u64], cuts: &[usize]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut pos: Option<Position> = None;
        let mut cuts = cuts.iter();
        loop {
            let stream = from_second(log, pos.map_or(0, |p| p.since_s()));
            let mut resume = Resume::new(pos);
            let limit = cuts.next().copied().unwrap_or(usize::MAX);
            let mut taken = 0;
            for ts in stream {
                if taken == limit {
                    break;
                }
                if resume.admit(ts) {
                    out.push(ts);
                    pos.get_or_insert_with(Position::default).advance(ts);
                    taken += 1;
                }
            }
            if taken < limit {
                return out;
            }
        }
    }

    #[test]
    fn re_attaches_lose_nothing_and_repeat_nothing() {
        // Several lines in one second, three with the very same timestamp,
        // and a gap of seconds with nothing logged.
        let log = vec![
            10 * S + 100 * MS,
            10 * S + 200 * MS,
            10 * S + 200 * MS,
            10 * S + 200 * MS,
            10 * S + 900 * MS,
            11 * S,
            15 * S + 1,
            15 * S + 2,
        ];
        for cuts in [
            vec![],
            vec![1],
            vec![2],
            vec![3, 1],
            vec![1, 1, 1, 1, 1, 1, 1],
            vec![5, 0, 0, 2],
        ] {
            assert_eq!(read_in_attaches(&log, &cuts), log, "cut after {cuts:?}");
        }
    }

    #[test]
    fn the_resume_point_is_docker_time_only() {
        let mut p = Position::default();
        p.advance(7 * S + 5);
        p.advance(7 * S + 5);
        assert_eq!(
            (p, p.since_s()),
            (
                Position {
                    ts_ns: 7 * S + 5,
                    same: 2
                },
                7
            )
        );
        // An older stamp (stdout and stderr interleave) never moves it back.
        p.advance(6 * S);
        assert_eq!(p.ts_ns, 7 * S + 5);
    }

    #[test]
    fn positions_survive_a_restart_and_forget_gone_containers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Positions::load(dir.path());
        p.advance("c1", 5 * S);
        p.advance("c2", 9 * S);
        p.save().expect("saves");
        let back = Positions::load(dir.path());
        assert_eq!(
            back.get("c1"),
            Some(Position {
                ts_ns: 5 * S,
                same: 1
            })
        );
        back.retain(&HashSet::from(["c2"]));
        back.save().expect("saves");
        let again = Positions::load(dir.path());
        assert_eq!(
            (again.get("c1"), again.get("c2").map(|p| p.ts_ns)),
            (None, Some(9 * S))
        );
    }

    #[test]
    fn an_unsaved_move_is_saved_again_after_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Positions::load(&dir.path().join("missing"));
        p.advance("c1", S);
        assert!(p.save().is_err());
        std::fs::create_dir(dir.path().join("missing")).expect("mkdir");
        p.save().expect("saved once the directory is there");
        assert_eq!(
            Positions::load(&dir.path().join("missing")).get("c1"),
            Some(Position { ts_ns: S, same: 1 })
        );
    }
}
