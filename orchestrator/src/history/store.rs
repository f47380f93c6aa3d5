//! The history's own redb file (`<data-dir>/history.redb`), apart from the
//! control plane's: its commits never queue behind a desired-state write,
//! and the control plane's never behind a second of telemetry.
//!
//! Tables, keyed so that one device over a time window is one range scan:
//!
//! | table          | key                                     | value                  |
//! |----------------|-----------------------------------------|------------------------|
//! | `telemetry`    | (device, at_ms)                         | [`Sample`], CBOR       |
//! | `telemetry_5m` | (device, bucket start ms)               | [`Bucket`], CBOR       |
//! | `logs`         | (device, app, container, at_ms, seq)    | [`StoredLine`], CBOR   |
//! | `log_counts`   | (device, app, container)                | lines kept (u64)       |
//! | `meta`         | name                                    | u64 (`log_seq`)        |
//!
//! `seq` orders lines of the same millisecond as they arrived and makes
//! each key unique; it only grows (kept in `meta`).
//!
//! **What a sample costs.** A raw sample of a host with one container is
//! 56 bytes of CBOR and its key 19 (with a 10-character device id; the
//! key grows with the id). In the B-tree that is about 140 bytes: keys
//! interleave devices, so leaves split everywhere and stay a little over
//! half full. The file, free pages included, measured 197 bytes per
//! sample (`a_sample_costs_about_two_hundred_bytes_of_file`: 100,000
//! samples of 1,000 devices in 100 commits, with their buckets). So
//! 10,000 devices sending one every 10 s (1,000 a second) write about
//! 200 KB/s, in one commit a second, plus a read and a write of each
//! device's current bucket per sample; 24 hours of raw samples are 86.4
//! million rows, about 17 GB, and 30 days of their five-minute buckets
//! (8,640 per device, as many as a day of raw samples at 10 s) about as
//! much again. `--history-raw-hours` and `--history-days` are the knobs
//! for big fleets.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use drover_shared::payload::LogLine;
use redb::{Database, Key, ReadableDatabase, ReadableTable, Table, TableDefinition, Value};
use tracing::warn;

use super::plan::{
    bucket_start, decode, encode, merge_tail, Bucket, Retention, Sample, StoredLine,
};
use super::HistoryError;
use crate::contract::{Change, Resolution, TelemetryPoint};

type SeriesKey = (&'static str, u64);
type LineKey = (&'static str, &'static str, &'static str, u64, u64);
type StreamKey = (&'static str, &'static str, &'static str);

const TELEMETRY: TableDefinition<SeriesKey, &[u8]> = TableDefinition::new("telemetry");
const BUCKETS: TableDefinition<SeriesKey, &[u8]> = TableDefinition::new("telemetry_5m");
const LOGS: TableDefinition<LineKey, &[u8]> = TableDefinition::new("logs");
const LOG_COUNTS: TableDefinition<StreamKey, u64> = TableDefinition::new("log_counts");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG_SEQ: &str = "log_seq";

/// redb's page cache for this file. Reads are mostly of the recent past;
/// the default (1 GiB) would be the orchestrator's biggest allocation.
const CACHE_BYTES: usize = 64 << 20;

/// Rows one pruning pass removes at most, over all tables.
pub const PRUNE_BUDGET: u64 = 100_000;
/// Devices (or containers, for logs) one pruning pass looks at per table
/// at most; the next pass goes on from there.
const PRUNE_GROUPS: usize = 20_000;

/// What one commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub samples: u64,
    pub lines: u64,
    /// Samples and lines outside retention (a device clock far off) or
    /// already stored (a repeated telemetry message).
    pub skipped: u64,
    pub pruned: u64,
}

/// Where the pruning passes have got to, per table, and how many rows a
/// pass may remove.
#[derive(Debug, Clone)]
pub struct Cursors {
    telemetry: Option<String>,
    buckets: Option<String>,
    logs: Option<(String, String, String)>,
    budget: u64,
}

impl Default for Cursors {
    fn default() -> Self {
        Cursors::with_budget(PRUNE_BUDGET)
    }
}

impl Cursors {
    pub fn with_budget(budget: u64) -> Cursors {
        Cursors {
            telemetry: None,
            buckets: None,
            logs: None,
            budget,
        }
    }

    /// Whether the last pass went through every table to the end.
    pub fn done(&self) -> bool {
        self.telemetry.is_none() && self.buckets.is_none() && self.logs.is_none()
    }
}

/// The history file. Clones share one open database, which
/// [`HistoryStore::reopen`] replaces after an I/O error.
#[derive(Clone)]
pub struct HistoryStore {
    path: Arc<PathBuf>,
    db: Arc<RwLock<Option<Arc<Database>>>>,
}

impl HistoryStore {
    pub fn open(path: &Path) -> Result<HistoryStore, HistoryError> {
        let db = open_db(path)?;
        Ok(HistoryStore {
            path: Arc::new(path.to_path_buf()),
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
        })
    }

    fn db(&self) -> Result<Arc<Database>, HistoryError> {
        self.db
            .read()
            .map_err(|_| HistoryError::Db("history database lock poisoned".into()))?
            .clone()
            .ok_or_else(|| HistoryError::Db("the history database is being reopened".into()))
    }

    /// Opens the file again: redb refuses everything after an I/O error
    /// (a full disk) until then. Fails while a read still holds the old
    /// handle; the writer tries again before its next commit.
    pub fn reopen(&self) -> Result<(), HistoryError> {
        let mut slot = self
            .db
            .write()
            .map_err(|_| HistoryError::Db("history database lock poisoned".into()))?;
        *slot = None;
        *slot = Some(Arc::new(open_db(&self.path)?));
        Ok(())
    }

    /// Stores the telemetry and log lines among `changes` in one
    /// transaction, keeps each container's lines to the retention's count,
    /// and with `prune` also removes a bounded chunk of what has aged out.
    pub fn write(
        &self,
        changes: &[Arc<Change>],
        retention: &Retention,
        now_ms: u64,
        prune: Option<&mut Cursors>,
    ) -> Result<WriteStats, HistoryError> {
        let db = self.db()?;
        let tx = db.begin_write()?;
        let mut stats = WriteStats::default();
        {
            let mut raw = tx.open_table(TELEMETRY)?;
            let mut buckets = tx.open_table(BUCKETS)?;
            let mut logs = tx.open_table(LOGS)?;
            let mut counts = tx.open_table(LOG_COUNTS)?;
            let mut meta = tx.open_table(META)?;
            let mut seq = meta.get(LOG_SEQ)?.map_or(0, |v| v.value());
            let mut new_buckets: BTreeMap<(&str, u64), Bucket> = BTreeMap::new();
            let mut added: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
            for change in changes {
                match &**change {
                    Change::Telemetry { device, telemetry } => {
                        let at = telemetry.at_ms;
                        let key = (device.as_str(), at);
                        if !retention.keeps(at, now_ms) || raw.get(key)?.is_some() {
                            stats.skipped += 1;
                            continue;
                        }
                        let sample = Sample::of(telemetry);
                        if retention.keeps_raw(at, now_ms) {
                            raw.insert(key, encode(&sample).as_slice())?;
                        }
                        new_buckets
                            .entry((device.as_str(), bucket_start(at)))
                            .or_default()
                            .add(&sample);
                        stats.samples += 1;
                    }
                    Change::Logs { device, batch } => {
                        let stream = (
                            device.as_str(),
                            batch.app.as_str(),
                            batch.container.as_str(),
                        );
                        for line in &batch.lines {
                            if !retention.keeps(line.at_ms, now_ms) {
                                stats.skipped += 1;
                                continue;
                            }
                            seq += 1;
                            let key = (stream.0, stream.1, stream.2, line.at_ms, seq);
                            logs.insert(key, encode(&StoredLine::of(line)).as_slice())?;
                            *added.entry(stream).or_default() += 1;
                            stats.lines += 1;
                        }
                    }
                    _ => {}
                }
            }
            for (key, new) in new_buckets {
                let stored = buckets
                    .get(key)?
                    .and_then(|v| decoded::<Bucket>(v.value(), "telemetry_5m"));
                let mut bucket = stored.unwrap_or_default();
                bucket.merge(&new);
                buckets.insert(key, encode(&bucket).as_slice())?;
            }
            for ((d, a, c), n) in added {
                let count = counts.get((d, a, c))?.map_or(0, |v| v.value()) + n;
                let over = count.saturating_sub(retention.log_lines);
                let removed = remove_first(
                    &mut logs,
                    (d, a, c, 0, 0)..=(d, a, c, u64::MAX, u64::MAX),
                    over,
                )?;
                counts.insert((d, a, c), count - removed)?;
            }
            meta.insert(LOG_SEQ, seq)?;
            if let Some(cursors) = prune {
                let mut budget = cursors.budget;
                let b = &mut budget;
                stats.pruned += prune_series(
                    &mut raw,
                    retention.raw_cutoff(now_ms),
                    b,
                    &mut cursors.telemetry,
                )?;
                // A bucket goes once all of it is older than the cut.
                let cut = bucket_start(retention.keep_cutoff(now_ms));
                stats.pruned += prune_series(&mut buckets, cut, b, &mut cursors.buckets)?;
                stats.pruned += prune_logs(
                    &mut logs,
                    &mut counts,
                    retention.keep_cutoff(now_ms),
                    b,
                    &mut cursors.logs,
                )?;
            }
        }
        tx.commit()?;
        Ok(stats)
    }

    /// A device's telemetry from `since_ms` to `until_ms` (both included)
    /// at `resolution`, oldest first, at most `limit` points; with more in
    /// the window, also the time to go on from.
    pub fn telemetry(
        &self,
        device: &str,
        since_ms: u64,
        until_ms: u64,
        resolution: Resolution,
        limit: usize,
    ) -> Result<(Vec<TelemetryPoint>, Option<u64>), HistoryError> {
        let db = self.db()?;
        let tx = db.begin_read()?;
        let (table, name, from) = match resolution {
            Resolution::Raw => (tx.open_table(TELEMETRY)?, "telemetry", since_ms),
            // The bucket `since_ms` falls in counts.
            Resolution::FiveMinutes => (
                tx.open_table(BUCKETS)?,
                "telemetry_5m",
                bucket_start(since_ms),
            ),
        };
        let mut points = Vec::new();
        for row in table.range((device, from)..=(device, until_ms))? {
            let (k, v) = row?;
            let at = k.value().1;
            if points.len() == limit {
                return Ok((points, Some(at)));
            }
            let point = match resolution {
                Resolution::Raw => decoded::<Sample>(v.value(), name).map(|s| s.point(at)),
                Resolution::FiveMinutes => decoded::<Bucket>(v.value(), name).map(|b| b.point(at)),
            };
            points.extend(point);
        }
        Ok((points, None))
    }

    /// The last `tail` lines of an app's containers on a device (only
    /// `container`'s when given) at or after `since_ms`, oldest first.
    pub fn logs(
        &self,
        device: &str,
        app: &str,
        container: Option<&str>,
        since_ms: u64,
        tail: usize,
    ) -> Result<Vec<LogLine>, HistoryError> {
        let db = self.db()?;
        let tx = db.begin_read()?;
        let logs = tx.open_table(LOGS)?;
        let containers: Vec<String> = match container {
            Some(c) => vec![c.to_string()],
            None => {
                let counts = tx.open_table(LOG_COUNTS)?;
                let mut names = Vec::new();
                for row in counts.range((device, app, "")..)? {
                    let (k, _) = row?;
                    let (d, a, c) = k.value();
                    if d != device || a != app {
                        break;
                    }
                    names.push(c.to_string());
                }
                names
            }
        };
        let mut per_container = Vec::with_capacity(containers.len());
        for c in &containers {
            let c = c.as_str();
            let range = (device, app, c, since_ms, 0)..=(device, app, c, u64::MAX, u64::MAX);
            let mut lines = Vec::new();
            for row in logs.range(range)?.rev() {
                if lines.len() == tail {
                    break;
                }
                let (k, v) = row?;
                if let Some(l) = decoded::<StoredLine>(v.value(), "logs") {
                    lines.push(l.line(k.value().3));
                }
            }
            lines.reverse();
            per_container.push(lines);
        }
        Ok(merge_tail(per_container, tail))
    }
}

fn open_db(path: &Path) -> Result<Database, HistoryError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|source| HistoryError::Open {
            path: path.display().to_string(),
            source,
        })?;
    // Every table exists from the start, so reads never find one missing.
    let tx = db.begin_write()?;
    tx.open_table(TELEMETRY)?;
    tx.open_table(BUCKETS)?;
    tx.open_table(LOGS)?;
    tx.open_table(LOG_COUNTS)?;
    tx.open_table(META)?;
    tx.commit()?;
    Ok(db)
}

/// A stored value, or `None` (logged) when it does not decode: one bad
/// row must not make a whole window unreadable.
fn decoded<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8], table: &str) -> Option<T> {
    match decode(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(table, error = %e, "skipping a history row that does not decode");
            None
        }
    }
}

/// Removes the first `max` rows of `range`; returns how many it removed.
fn remove_first<'a, K, V, KR>(
    table: &mut Table<'_, K, V>,
    range: impl RangeBounds<KR> + 'a,
    max: u64,
) -> Result<u64, HistoryError>
where
    K: Key + 'static,
    V: Value + 'static,
    KR: Borrow<K::SelfType<'a>> + 'a,
{
    if max == 0 {
        return Ok(0);
    }
    let mut removed = 0;
    let mut rows = table.extract_from_if(range, |_, _| true)?;
    while removed < max {
        match rows.next() {
            Some(row) => {
                row?;
                removed += 1;
            }
            None => break,
        }
    }
    Ok(removed)
}

/// The first device with a row at or after `from` (from the start with
/// `None`), or after all of `after`'s rows.
fn device_from(
    table: &Table<'_, SeriesKey, &[u8]>,
    from: Bound<&str>,
) -> Result<Option<String>, HistoryError> {
    let lower = match from {
        Bound::Unbounded => Bound::Unbounded,
        Bound::Included(d) => Bound::Included((d, 0)),
        Bound::Excluded(d) => Bound::Excluded((d, u64::MAX)),
    };
    let first = table
        .range::<(&str, u64)>((lower, Bound::Unbounded))?
        .next()
        .transpose()?;
    Ok(first.map(|(k, _)| k.value().0.to_string()))
}

/// Removes each device's rows before `cutoff`, device after device from
/// the cursor, until the budget or the pass's device count runs out.
fn prune_series(
    table: &mut Table<'_, SeriesKey, &[u8]>,
    cutoff: u64,
    budget: &mut u64,
    cursor: &mut Option<String>,
) -> Result<u64, HistoryError> {
    let mut removed = 0;
    let mut next = match cursor.take() {
        Some(d) => device_from(table, Bound::Included(&d))?,
        None => device_from(table, Bound::Unbounded)?,
    };
    let mut visited = 0;
    while let Some(d) = next {
        if *budget == 0 || visited == PRUNE_GROUPS {
            *cursor = Some(d);
            return Ok(removed);
        }
        visited += 1;
        let n = remove_first(table, (d.as_str(), 0)..(d.as_str(), cutoff), *budget)?;
        removed += n;
        *budget -= n;
        next = if *budget == 0 {
            // Maybe more of this one: start from it next time.
            Some(d)
        } else {
            device_from(table, Bound::Excluded(&d))?
        };
    }
    Ok(removed)
}

/// Removes log lines before `cutoff`, container after container from the
/// cursor, keeping `log_counts` right (a container with none left loses
/// its count row).
fn prune_logs(
    logs: &mut Table<'_, LineKey, &[u8]>,
    counts: &mut Table<'_, StreamKey, u64>,
    cutoff: u64,
    budget: &mut u64,
    cursor: &mut Option<(String, String, String)>,
) -> Result<u64, HistoryError> {
    let start = cursor.take();
    let mut streams: Vec<(String, String, String, u64)> = Vec::new();
    {
        let rows = match &start {
            Some((d, a, c)) => {
                counts.range::<(&str, &str, &str)>((d.as_str(), a.as_str(), c.as_str())..)?
            }
            None => counts.range::<(&str, &str, &str)>(..)?,
        };
        for row in rows.take(PRUNE_GROUPS + 1) {
            let (k, v) = row?;
            let (d, a, c) = k.value();
            streams.push((d.to_string(), a.to_string(), c.to_string(), v.value()));
        }
    }
    // One more than a pass takes: where the next pass starts.
    let rest = (streams.len() > PRUNE_GROUPS)
        .then(|| streams.pop())
        .flatten();
    let mut removed = 0;
    for (d, a, c, count) in streams {
        if *budget == 0 {
            *cursor = Some((d, a, c));
            return Ok(removed);
        }
        let (d_, a_, c_) = (d.as_str(), a.as_str(), c.as_str());
        let n = remove_first(logs, (d_, a_, c_, 0, 0)..(d_, a_, c_, cutoff, 0), *budget)?;
        removed += n;
        *budget -= n;
        let left = count.saturating_sub(n);
        if left == 0 {
            counts.remove((d_, a_, c_))?;
        } else if n > 0 {
            counts.insert((d_, a_, c_), left)?;
        }
        if *budget == 0 {
            *cursor = Some((d, a, c));
            return Ok(removed);
        }
    }
    *cursor = rest.map(|(d, a, c, _)| (d, a, c));
    Ok(removed)
}

#[cfg(test)]
mod tests;
