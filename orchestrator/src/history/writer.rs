//! The history's two tasks. The feed follows the engine's change stream
//! and offers telemetry and log batches to a bounded queue without ever
//! waiting (full: dropped and counted). The writer gathers the queue into
//! one redb transaction at most every [`COMMIT_INTERVAL`] on the blocking
//! pool, and goes on taking from the queue while a commit runs; every
//! [`PRUNE_INTERVAL`] the commit also removes a bounded chunk of what
//! has aged out.

use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::plan::Retention;
use super::store::{Cursors, HistoryStore, WriteStats};
use super::HistoryError;
use crate::contract::Change;
use crate::metrics::Metrics;

/// Telemetry samples and log batches waiting for the writer.
pub const QUEUE: usize = 50_000;
/// Changes one commit takes at most; beyond it the writer stops taking
/// from the queue until the commit in flight is done.
const MAX_BATCH: usize = 100_000;
/// How often the writer commits (when it has something).
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// How often a commit also prunes.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// At most one warning about losses this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The running feed and writer.
pub struct HistoryWriter {
    stop: watch::Sender<bool>,
    feed: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl HistoryWriter {
    pub fn spawn(
        store: HistoryStore,
        retention: Retention,
        changes: broadcast::Receiver<Arc<Change>>,
        metrics: Arc<Metrics>,
    ) -> HistoryWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stop, stopping) = watch::channel(false);
        let feed = tokio::spawn(feed(changes, tx, stopping, metrics.clone()));
        let writer = tokio::spawn(write(store, retention, rx, metrics));
        HistoryWriter { stop, feed, writer }
    }

    /// For shutdown, after the engine has stopped: the feed takes what the
    /// change stream still holds, the writer commits everything queued,
    /// and both end.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.feed.await;
        let _ = self.writer.await;
    }
}

/// Says what was lost, at most once per [`WARN_INTERVAL`].
struct Losses {
    last: Option<Instant>,
}

impl Losses {
    fn warn(&mut self, what: &str, n: u64) {
        if self.last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            self.last = Some(Instant::now());
            warn!(
                lost = n,
                "{what}; see drover_history_dropped_total and drover_history_lagged_total"
            );
        }
    }
}

async fn feed(
    mut changes: broadcast::Receiver<Arc<Change>>,
    tx: mpsc::Sender<Arc<Change>>,
    mut stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut losses = Losses { last: None };
    loop {
        let next = tokio::select! {
            biased;
            next = changes.recv() => next,
            _ = stopping.wait_for(|s| *s) => {
                // What the engine sent before it stopped is still here.
                loop {
                    match changes.try_recv() {
                        Ok(c) => offer(&tx, c, &metrics, &mut losses),
                        Err(TryRecvError::Lagged(n)) => lagged(n, &metrics, &mut losses),
                        Err(_) => return,
                    }
                }
            }
        };
        match next {
            Ok(c) => offer(&tx, c, &metrics, &mut losses),
            Err(RecvError::Lagged(n)) => lagged(n, &metrics, &mut losses),
            Err(RecvError::Closed) => return,
        }
    }
}

fn offer(tx: &mpsc::Sender<Arc<Change>>, c: Arc<Change>, metrics: &Metrics, losses: &mut Losses) {
    if !matches!(*c, Change::Telemetry { .. } | Change::Logs { .. }) {
        return;
    }
    if let Err(TrySendError::Full(_)) = tx.try_send(c) {
        let n = bump(&metrics.history_dropped, 1);
        losses.warn(
            "the history's queue is full; dropping telemetry and logs",
            n,
        );
    }
}

fn lagged(n: u64, metrics: &Metrics, losses: &mut Losses) {
    let total = bump(&metrics.history_lagged, n);
    losses.warn(
        "the history fell behind the engine's change stream and missed changes",
        total,
    );
}

fn bump(counter: &Counter, n: u64) -> u64 {
    counter.inc_by(n) + n
}

type Commit = JoinHandle<(Cursors, Result<WriteStats, HistoryError>)>;

async fn write(
    store: HistoryStore,
    retention: Retention,
    mut rx: mpsc::Receiver<Arc<Change>>,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<Arc<Change>> = Vec::new();
    // With the commit in flight while it runs.
    let mut cursors = Some(Cursors::default());
    let mut in_flight: Option<(Commit, usize)> = None;
    let mut tick = tokio::time::interval(COMMIT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Prune at the first tick: the orchestrator may have been down a while.
    let mut last_prune: Option<Instant> = None;
    let mut reopen = false;
    let mut open = true;
    let mut losses = Losses { last: None };
    loop {
        tokio::select! {
            item = rx.recv(), if open && batch.len() < MAX_BATCH => match item {
                Some(c) => batch.push(c),
                None => open = false,
            },
            _ = tick.tick(), if in_flight.is_none() && open => {
                let prune = last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL);
                if prune || !batch.is_empty() {
                    if prune {
                        last_prune = Some(Instant::now());
                    }
                    let n = batch.len();
                    let c = cursors.take().unwrap_or_default();
                    in_flight = Some((
                        commit(&store, retention, std::mem::take(&mut batch), c, prune, reopen),
                        n,
                    ));
                }
            },
            done = async { in_flight.as_mut().map(|(c, _)| c).expect("guarded").await },
                if in_flight.is_some() => {
                let n = in_flight.take().map_or(0, |(_, n)| n);
                let (c, res) = match done {
                    Ok(done) => done,
                    Err(e) => (Cursors::default(), Err(HistoryError::Db(format!("history commit task failed: {e}")))),
                };
                cursors = Some(c);
                reopen = settle(res, n, &metrics, &mut losses);
            },
        }
        if !open && in_flight.is_none() {
            break;
        }
    }
    // The queue is closed and drained: commit the rest.
    if !batch.is_empty() {
        let n = batch.len();
        let c = cursors.take().unwrap_or_default();
        let res = match commit(&store, retention, batch, c, false, reopen).await {
            Ok((_, res)) => res,
            Err(e) => Err(HistoryError::Db(format!("history commit task failed: {e}"))),
        };
        settle(res, n, &metrics, &mut losses);
    }
}

fn commit(
    store: &HistoryStore,
    retention: Retention,
    batch: Vec<Arc<Change>>,
    mut cursors: Cursors,
    prune: bool,
    reopen: bool,
) -> Commit {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        if reopen {
            if let Err(e) = store.reopen() {
                return (cursors, Err(e));
            }
        }
        let now = crate::clock::now_ms();
        let res = store.write(&batch, &retention, now, prune.then_some(&mut cursors));
        (cursors, res)
    })
}

/// Counts what a commit did; `true` when it failed (reopen before the
/// next one: redb refuses everything after an I/O error until then).
fn settle(
    res: Result<WriteStats, HistoryError>,
    changes: usize,
    metrics: &Metrics,
    losses: &mut Losses,
) -> bool {
    match res {
        Ok(s) => {
            bump(&metrics.history_samples, s.samples);
            bump(&metrics.history_log_lines, s.lines);
            bump(&metrics.history_skipped, s.skipped);
            if s.pruned > 0 {
                debug!(rows = s.pruned, "history pruned");
            }
            false
        }
        Err(e) => {
            bump(&metrics.history_write_failed, 1);
            let n = bump(&metrics.history_dropped, changes as u64);
            losses.warn(&format!("a history commit failed ({e})"), n);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use drover_shared::payload::{HostMetrics, LogBatch, LogLine, LogStream, Telemetry};
    use drover_shared::{DeviceId, Name};

    use super::*;
    use crate::contract::Resolution;

    fn telemetry(device: &str, at_ms: u64) -> Arc<Change> {
        Arc::new(Change::Telemetry {
            device: DeviceId::new(device).expect("id"),
            telemetry: Box::new(Telemetry {
                at_ms,
                host: HostMetrics {
                    cpu_percent: 5.0,
                    ..Default::default()
                },
                containers: Vec::new(),
            }),
        })
    }

    fn logs(device: &str, at_ms: u64, text: &str) -> Arc<Change> {
        Arc::new(Change::Logs {
            device: DeviceId::new(device).expect("id"),
            batch: Box::new(LogBatch {
                app: Name::new("web").expect("name"),
                container: Name::new("main").expect("name"),
                lines: vec![LogLine {
                    at_ms,
                    stream: LogStream::Stdout,
                    line: text.into(),
                }],
                dropped: 0,
            }),
        })
    }

    /// What the engine publishes reaches the file; other changes are
    /// left alone; closing commits what is queued.
    #[tokio::test]
    async fn changes_on_the_stream_are_stored_and_close_commits_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = HistoryStore::open(&dir.path().join("h.redb")).expect("open");
        let (tx, rx) = broadcast::channel(64);
        let metrics = Arc::new(Metrics::default());
        let retention = Retention::new(24, 30, 100);
        let w = HistoryWriter::spawn(store.clone(), retention, rx, metrics.clone());
        let now = crate::clock::now_ms();
        tx.send(telemetry("pi-1", now - 2)).expect("send");
        tx.send(Arc::new(Change::Lagged { missed: 0 }))
            .expect("send");
        tx.send(logs("pi-1", now - 1, "hello")).expect("send");
        tx.send(telemetry("pi-1", now)).expect("send");
        w.close().await;
        let (points, _) = store
            .telemetry("pi-1", now - 10, now, Resolution::Raw, 10)
            .expect("read");
        assert_eq!(
            points.iter().map(|p| p.at_ms).collect::<Vec<_>>(),
            [now - 2, now]
        );
        let lines = store.logs("pi-1", "web", None, 0, 10).expect("read");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].line, "hello");
        assert_eq!(metrics.history_samples.get(), 2);
        assert_eq!(metrics.history_log_lines.get(), 1);
        assert_eq!(metrics.history_dropped.get(), 0);
    }

    /// A feed that cannot keep up with the stream counts what it missed.
    #[tokio::test]
    async fn a_lag_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = HistoryStore::open(&dir.path().join("h.redb")).expect("open");
        let (tx, rx) = broadcast::channel(4);
        let metrics = Arc::new(Metrics::default());
        let now = crate::clock::now_ms();
        // Ten sent before the feed runs: the receiver keeps the last four.
        for i in 0..10 {
            tx.send(telemetry("pi-1", now - 100 + i)).expect("send");
        }
        let w = HistoryWriter::spawn(
            store.clone(),
            Retention::new(24, 30, 100),
            rx,
            metrics.clone(),
        );
        w.close().await;
        assert_eq!(metrics.history_lagged.get(), 6);
        assert_eq!(metrics.history_samples.get(), 4);
    }

    /// A full queue drops and counts; the feed never waits for the writer.
    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(2);
        let metrics = Metrics::default();
        let mut losses = Losses { last: None };
        for i in 0..5 {
            offer(&tx, telemetry("pi-1", i), &metrics, &mut losses);
        }
        // Only telemetry and logs are queued at all.
        offer(
            &tx,
            Arc::new(Change::Lagged { missed: 1 }),
            &metrics,
            &mut losses,
        );
        assert_eq!(metrics.history_dropped.get(), 3);
    }
}
