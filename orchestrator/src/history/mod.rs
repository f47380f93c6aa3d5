//! Telemetry history and container logs, kept by the orchestrator: bounded,
//! in their own redb file (`<data-dir>/history.redb`), written by their own
//! writer, read by the REST API.
//!
//! ```text
//! engine ──broadcast (Arc<Change>)──► feed task ──bounded queue──► writer task
//!         Telemetry, Logs               drops and counts            one commit a second
//!                                       when full; counts           on the blocking pool,
//!                                       what it lagged by           pruning in chunks
//! ```
//!
//! The history is a subscriber of the engine's change stream like any
//! other: it never slows the engine (a full queue drops and counts, a lag
//! is counted) and never waits on the control plane's store writer (its
//! own file, its own writer). What it loses that way is a gap in a chart,
//! never a control-plane fact. A SIGKILL loses at most the last second.
//!
//! - [`plan`]: the pure part (samples, five-minute buckets, retention).
//! - `store`: the redb tables, keyed for one range scan per device and
//!   window, and what a sample costs on disk.
//! - `writer`: the feed and writer tasks.

pub mod plan;
mod store;
mod writer;

use std::path::Path;
use std::sync::Arc;

use drover_shared::payload::LogLine;
use drover_shared::{DeviceId, Name};
use tokio::sync::broadcast;

use crate::contract::{Change, Resolution, TelemetrySeries};
use crate::metrics::Metrics;
use plan::Retention;
pub use store::HistoryStore;
pub use writer::HistoryWriter;

/// The most points one telemetry response carries (10,000 is a day of
/// raw samples at one every 10 s, or 34 days of five-minute buckets).
pub const MAX_POINTS: usize = 10_000;
/// The most log lines one logs response carries.
pub const MAX_LOG_TAIL: usize = 10_000;
/// The window a telemetry request without `since_ms` gets.
pub const DEFAULT_WINDOW_MS: u64 = 60 * 60 * 1000;

/// How much history is kept (`drover serve --history-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Hours of raw telemetry samples.
    pub raw_hours: u64,
    /// Days of five-minute buckets and of log lines.
    pub days: u64,
    /// Log lines per (device, app, container).
    pub log_lines: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            raw_hours: 24,
            days: 30,
            log_lines: 10_000,
        }
    }
}

impl HistoryConfig {
    /// Checks the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), HistoryError> {
        let bad = |flag, message: String| Err(HistoryError::Config { flag, message });
        if !(1..=10 * 365).contains(&self.days) {
            return bad(
                "--history-days",
                format!("must be between 1 and 3650, got {}", self.days),
            );
        }
        if !(1..=self.days * 24).contains(&self.raw_hours) {
            return bad(
                "--history-raw-hours",
                format!(
                    "must be between 1 and --history-days × 24 ({}): raw samples cannot outlive the five-minute buckets; got {}",
                    self.days * 24,
                    self.raw_hours
                ),
            );
        }
        if !(1..=1_000_000).contains(&self.log_lines) {
            return bad(
                "--history-log-lines",
                format!("must be between 1 and 1000000, got {}", self.log_lines),
            );
        }
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        Retention::new(self.raw_hours, self.days, self.log_lines)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{flag}: {message}")]
    Config { flag: &'static str, message: String },
    #[error("cannot open history database {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("history database error: {0}")]
    Db(String),
    /// A request parameter that cannot be answered; `field` names it.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for HistoryError {
            fn from(e: $t) -> Self { HistoryError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The history, for the REST API to read and the server to start. Clones
/// share the file.
#[derive(Clone)]
pub struct History {
    store: HistoryStore,
    retention: Retention,
}

impl History {
    /// Opens (or creates) the file. Blocking: call it on the blocking pool.
    pub fn open(path: &Path, config: &HistoryConfig) -> Result<History, HistoryError> {
        config.validate()?;
        Ok(History {
            store: HistoryStore::open(path)?,
            retention: config.retention(),
        })
    }

    /// Starts storing what `changes` (a subscription to the engine's
    /// change stream) carries.
    pub fn start(
        &self,
        changes: broadcast::Receiver<Arc<Change>>,
        metrics: Arc<Metrics>,
    ) -> HistoryWriter {
        HistoryWriter::spawn(self.store.clone(), self.retention, changes, metrics)
    }

    /// A device's telemetry over a window (default: the last hour up to
    /// now) at a resolution (`None`: raw when raw samples reach back to
    /// `since_ms`, else five-minute buckets), at most `limit` points.
    pub async fn telemetry(
        &self,
        device: DeviceId,
        since_ms: Option<u64>,
        until_ms: Option<u64>,
        resolution: Option<Resolution>,
        limit: usize,
    ) -> Result<TelemetrySeries, HistoryError> {
        let now = crate::clock::now_ms();
        let until = until_ms.unwrap_or(now);
        let since = since_ms.unwrap_or_else(|| until.saturating_sub(DEFAULT_WINDOW_MS));
        if since > until {
            return Err(HistoryError::Invalid {
                field: "since_ms",
                message: format!("`since_ms` ({since}) is after `until_ms` ({until})"),
            });
        }
        let resolution = self.retention.resolution(resolution, since, now);
        let limit = limit.clamp(1, MAX_POINTS);
        let store = self.store.clone();
        let id = device.clone();
        let (points, next_since_ms) = tokio::task::spawn_blocking(move || {
            store.telemetry(id.as_str(), since, until, resolution, limit)
        })
        .await
        .map_err(|e| HistoryError::Db(format!("history read failed: {e}")))??;
        Ok(TelemetrySeries {
            device,
            resolution,
            since_ms: since,
            until_ms: until,
            points,
            next_since_ms,
        })
    }

    /// The last `tail` (at most [`MAX_LOG_TAIL`]) log lines of an app's
    /// containers on a device, only `container`'s when given, at or after
    /// `since_ms`; oldest first.
    pub async fn logs(
        &self,
        device: &DeviceId,
        app: &Name,
        container: Option<&Name>,
        since_ms: Option<u64>,
        tail: usize,
    ) -> Result<Vec<LogLine>, HistoryError> {
        let store = self.store.clone();
        let (device, app) = (device.to_string(), app.to_string());
        let container = container.map(|c| c.to_string());
        let tail = tail.clamp(1, MAX_LOG_TAIL);
        tokio::task::spawn_blocking(move || {
            store.logs(
                &device,
                &app,
                container.as_deref(),
                since_ms.unwrap_or(0),
                tail,
            )
        })
        .await
        .map_err(|e| HistoryError::Db(format!("history read failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag_of(c: HistoryConfig) -> Option<&'static str> {
        match c.validate() {
            Ok(()) => None,
            Err(HistoryError::Config { flag, .. }) => Some(flag),
            Err(e) => panic!("not a config error: {e}"),
        }
    }

    #[test]
    fn settings_are_checked_naming_the_flag() {
        let ok = HistoryConfig::default();
        assert_eq!(flag_of(ok), None);
        let with = |raw_hours, days, log_lines| HistoryConfig {
            raw_hours,
            days,
            log_lines,
        };
        assert_eq!(flag_of(with(0, 30, 10)), Some("--history-raw-hours"));
        assert_eq!(flag_of(with(24, 0, 10)), Some("--history-days"));
        assert_eq!(flag_of(with(24, 3651, 10)), Some("--history-days"));
        assert_eq!(flag_of(with(24, 30, 0)), Some("--history-log-lines"));
        assert_eq!(
            flag_of(with(24, 30, 1_000_001)),
            Some("--history-log-lines")
        );
        // Raw samples may not outlive the buckets made of them.
        assert_eq!(flag_of(with(48, 2, 10)), None);
        assert_eq!(flag_of(with(49, 2, 10)), Some("--history-raw-hours"));
        let msg = with(49, 2, 10).validate().expect_err("refused").to_string();
        assert!(msg.starts_with("--history-raw-hours: "), "{msg}");
    }
}
