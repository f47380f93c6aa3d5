//! The history's tables on a real redb file: what is written reads back,
//! survives a reopen, is bounded, and ages out in bounded chunks.

use std::sync::Arc;

use drover_shared::payload::{
    ContainerMetrics, HostMetrics, LogBatch, LogLine, LogStream, Telemetry,
};
use drover_shared::{DeviceId, Name};

use super::*;
use crate::history::plan::BUCKET_MS;

const HOUR: u64 = 60 * 60 * 1000;
const DAY: u64 = 24 * HOUR;
/// A fixed "now", well past the epoch.
const NOW: u64 = 1_000 * DAY;

fn store() -> (tempfile::TempDir, HistoryStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = HistoryStore::open(&dir.path().join("history.redb")).expect("open");
    (dir, s)
}

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

fn sample(device: &str, at_ms: u64, cpu: f32) -> Arc<Change> {
    Arc::new(Change::Telemetry {
        device: DeviceId::new(device).expect("valid id"),
        telemetry: Box::new(Telemetry {
            at_ms,
            host: HostMetrics {
                cpu_percent: cpu,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 4 << 30,
                disk_used_bytes: 5 << 30,
                disk_total_bytes: 32 << 30,
                ..Default::default()
            },
            containers: vec![ContainerMetrics {
                app: name("web"),
                container: name("main"),
                cpu_percent: cpu / 2.0,
                memory_bytes: 50 << 20,
                memory_limit_bytes: None,
            }],
        }),
    })
}

/// Lines at `base` + each offset, saying `{prefix}{offset}`; odd times on
/// stderr.
fn lines(device: &str, container: &str, base: u64, offsets: &[u64], prefix: &str) -> Arc<Change> {
    Arc::new(Change::Logs {
        device: DeviceId::new(device).expect("valid id"),
        batch: Box::new(LogBatch {
            app: name("web"),
            container: name(container),
            lines: offsets
                .iter()
                .map(|o| LogLine {
                    at_ms: base + o,
                    stream: if (base + o) % 2 == 1 {
                        LogStream::Stderr
                    } else {
                        LogStream::Stdout
                    },
                    line: format!("{prefix}{o}"),
                })
                .collect(),
            dropped: 0,
        }),
    })
}

fn retention() -> Retention {
    Retention::new(24, 30, 1_000)
}

fn at_ms(points: &[TelemetryPoint]) -> Vec<u64> {
    points.iter().map(|p| p.at_ms).collect()
}

fn text(lines: &[LogLine]) -> Vec<String> {
    lines.iter().map(|l| l.line.clone()).collect()
}

#[test]
fn a_window_of_one_device_reads_back_in_time_order() {
    let (_dir, s) = store();
    let start = NOW - HOUR;
    let mut batch: Vec<Arc<Change>> = (0..30)
        .rev()
        .map(|i| sample("pi-1", start + i * 10_000, i as f32))
        .collect();
    // Another device's samples, before and after in key order.
    batch.push(sample("pi-0", start, 1.0));
    batch.push(sample("pi-2", start, 1.0));
    let stats = s.write(&batch, &retention(), NOW, None).expect("write");
    assert_eq!(stats.samples, 32);
    let (points, next) = s
        .telemetry(
            "pi-1",
            start + 50_000,
            start + 100_000,
            Resolution::Raw,
            100,
        )
        .expect("read");
    assert_eq!(
        at_ms(&points),
        (5..=10).map(|i| start + i * 10_000).collect::<Vec<_>>(),
        "both ends included"
    );
    assert_eq!(next, None);
    assert_eq!(points[0].host.cpu_percent.avg, 5.0);
    assert_eq!(points[0].containers[0].cpu_percent.max, 2.5);
    // A limit cuts the window and says where to go on.
    let (points, next) = s
        .telemetry("pi-1", start, NOW, Resolution::Raw, 4)
        .expect("read");
    assert_eq!(at_ms(&points), [0, 1, 2, 3].map(|i| start + i * 10_000));
    assert_eq!(next, Some(start + 40_000));
    let (rest, _) = s
        .telemetry("pi-1", next.expect("more"), NOW, Resolution::Raw, 100)
        .expect("read");
    assert_eq!(rest.len(), 26);
    // A device with nothing stored has an empty window.
    let (none, _) = s
        .telemetry("pi-9", 0, NOW, Resolution::Raw, 100)
        .expect("read");
    assert!(none.is_empty());
}

#[test]
fn samples_fold_into_five_minute_buckets_across_commits() {
    let (_dir, s) = store();
    let b0 = bucket_start(NOW - 2 * HOUR);
    // Two commits into the same bucket, one into the next.
    s.write(
        &[
            sample("pi-1", b0 + 1_000, 10.0),
            sample("pi-1", b0 + 2_000, 30.0),
        ],
        &retention(),
        NOW,
        None,
    )
    .expect("write");
    s.write(
        &[
            sample("pi-1", b0 + 3_000, 20.0),
            sample("pi-1", b0 + BUCKET_MS, 50.0),
        ],
        &retention(),
        NOW,
        None,
    )
    .expect("write");
    // The window starts inside the first bucket: that bucket counts.
    let (points, _) = s
        .telemetry(
            "pi-1",
            b0 + 2_500,
            b0 + BUCKET_MS,
            Resolution::FiveMinutes,
            100,
        )
        .expect("read");
    assert_eq!(at_ms(&points), [b0, b0 + BUCKET_MS]);
    assert_eq!(points[0].samples, 3);
    assert_eq!(points[0].host.cpu_percent.avg, 20.0);
    assert_eq!(points[0].host.cpu_percent.max, 30.0);
    assert_eq!(points[0].containers[0].samples, 3);
    assert_eq!(points[1].samples, 1);
    assert_eq!(points[1].host.cpu_percent.max, 50.0);
}

#[test]
fn a_repeated_sample_is_stored_and_counted_once() {
    let (_dir, s) = store();
    let t = NOW - HOUR;
    s.write(&[sample("pi-1", t, 10.0)], &retention(), NOW, None)
        .expect("write");
    let stats = s
        .write(
            &[sample("pi-1", t, 10.0), sample("pi-1", t, 10.0)],
            &retention(),
            NOW,
            None,
        )
        .expect("write");
    assert_eq!((stats.samples, stats.skipped), (0, 2));
    let (points, _) = s
        .telemetry("pi-1", 0, NOW, Resolution::FiveMinutes, 10)
        .expect("read");
    assert_eq!(points[0].samples, 1, "the bucket did not count it again");
}

#[test]
fn samples_outside_retention_are_skipped() {
    let (_dir, s) = store();
    let stats = s
        .write(
            &[
                // A device clock at the epoch, and one a week ahead.
                sample("pi-1", 5, 1.0),
                sample("pi-1", NOW + 7 * DAY, 1.0),
                // Older than raw retention: only its bucket is kept.
                sample("pi-1", NOW - 2 * DAY, 1.0),
            ],
            &retention(),
            NOW,
            None,
        )
        .expect("write");
    assert_eq!((stats.samples, stats.skipped), (1, 2));
    let (raw, _) = s
        .telemetry("pi-1", 0, u64::MAX, Resolution::Raw, 10)
        .expect("read");
    assert!(raw.is_empty());
    let (buckets, _) = s
        .telemetry("pi-1", 0, u64::MAX, Resolution::FiveMinutes, 10)
        .expect("read");
    assert_eq!(at_ms(&buckets), [bucket_start(NOW - 2 * DAY)]);
}

#[test]
fn logs_keep_the_last_lines_per_container_in_order() {
    let (_dir, s) = store();
    let r = Retention::new(24, 30, 5);
    let t = NOW - HOUR;
    // Out of order within a batch and across batches: stored by time.
    s.write(
        &[
            lines("pi-1", "main", t, &[3, 1, 2], "m"),
            lines("pi-1", "side", t, &[2, 10], "s"),
        ],
        &r,
        NOW,
        None,
    )
    .expect("write");
    s.write(
        &[lines("pi-1", "main", t, &[4, 5, 6, 6], "m")],
        &r,
        NOW,
        None,
    )
    .expect("write");
    let main = s.logs("pi-1", "web", Some("main"), 0, 100).expect("read");
    // Seven arrived, five kept: the two oldest went.
    assert_eq!(text(&main), ["m3", "m4", "m5", "m6", "m6"]);
    assert_eq!(main[0].at_ms, t + 3);
    assert_eq!(main[0].stream, LogStream::Stderr);
    assert_eq!(main[1].stream, LogStream::Stdout);
    assert_eq!(
        text(&s.logs("pi-1", "web", Some("main"), 0, 2).expect("read")),
        ["m6", "m6"]
    );
    // Without a container: every container of the app, by time.
    assert_eq!(
        text(&s.logs("pi-1", "web", None, 0, 4).expect("read")),
        ["m5", "m6", "m6", "s10"]
    );
    // Since a time: only lines at or after it.
    assert_eq!(
        text(&s.logs("pi-1", "web", None, t + 6, 100).expect("read")),
        ["m6", "m6", "s10"]
    );
    // Another app or device has none.
    assert!(s.logs("pi-1", "db", None, 0, 100).expect("read").is_empty());
    assert!(s
        .logs("pi-2", "web", None, 0, 100)
        .expect("read")
        .is_empty());
}

#[test]
fn everything_survives_a_reopen_and_new_lines_follow_old_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("history.redb");
    let t = NOW - HOUR;
    {
        let s = HistoryStore::open(&path).expect("open");
        s.write(
            &[
                sample("pi-1", t, 7.0),
                lines("pi-1", "main", t, &[0, 0], "a"),
            ],
            &retention(),
            NOW,
            None,
        )
        .expect("write");
    }
    let s = HistoryStore::open(&path).expect("reopen");
    let (points, _) = s
        .telemetry("pi-1", 0, NOW, Resolution::Raw, 10)
        .expect("read");
    assert_eq!(at_ms(&points), [t]);
    assert_eq!(points[0].host.cpu_percent.avg, 7.0);
    // Lines of the same millisecond after the restart come after the
    // ones before it (the sequence number continues).
    s.write(
        &[lines("pi-1", "main", t, &[0], "b")],
        &retention(),
        NOW,
        None,
    )
    .expect("write");
    assert_eq!(
        text(&s.logs("pi-1", "web", None, 0, 10).expect("read")),
        ["a0", "a0", "b0"]
    );
    // A handle reopened in place (after an I/O error) reads the same.
    s.reopen().expect("reopen in place");
    assert_eq!(s.logs("pi-1", "web", None, 0, 10).expect("read").len(), 3);
}

#[test]
fn pruning_removes_what_aged_out_in_bounded_passes() {
    let (_dir, s) = store();
    let r = Retention::new(1, 2, 1_000);
    let old = NOW - 3 * HOUR; // past raw retention, within the buckets'
    let ancient = NOW - 3 * DAY + HOUR; // kept at first, past everything later
    let mut batch = Vec::new();
    for d in 0..5 {
        let dev = format!("pi-{d}");
        for i in 0..10 {
            batch.push(sample(&dev, NOW - HOUR + 1 + i, 1.0));
        }
        batch.push(lines(&dev, "main", NOW - HOUR, &[0, HOUR - 1], "x"));
    }
    s.write(&batch, &r, NOW, None).expect("write");
    // Written a while ago, as the clock was then.
    for (at, with_lines) in [(old, false), (ancient, true)] {
        let mut then = Vec::new();
        for d in 0..5 {
            let dev = format!("pi-{d}");
            then.push(sample(&dev, at, 1.0));
            if with_lines {
                then.push(lines(&dev, "main", at, &[0], "x"));
            }
        }
        let stats = s.write(&then, &r, at, None).expect("write");
        assert_eq!(stats.skipped, 0);
    }

    // A budget of 3 rows a pass: several passes, each bounded.
    let mut cursors = Cursors::with_budget(3);
    let mut passes = 0;
    let mut pruned = 0;
    loop {
        let stats = s.write(&[], &r, NOW, Some(&mut cursors)).expect("prune");
        assert!(stats.pruned <= 3, "{stats:?}");
        pruned += stats.pruned;
        passes += 1;
        if cursors.done() && stats.pruned == 0 {
            break;
        }
        assert!(passes < 100, "pruning does not end");
    }
    assert!(passes > 5, "the budget bounded each pass ({passes} passes)");
    // Raw: per device the two old samples; buckets: the ancient one;
    // logs: the ancient line.
    assert_eq!(pruned, 5 * 2 + 5 + 5);
    for d in 0..5 {
        let dev = format!("pi-{d}");
        let (raw, _) = s
            .telemetry(&dev, 0, NOW, Resolution::Raw, 100)
            .expect("read");
        assert_eq!(raw.len(), 10, "{dev}");
        let (buckets, _) = s
            .telemetry(&dev, 0, NOW, Resolution::FiveMinutes, 100)
            .expect("read");
        assert_eq!(
            at_ms(&buckets),
            [bucket_start(old), bucket_start(NOW - HOUR)],
            "{dev}"
        );
        assert_eq!(
            s.logs(&dev, "web", None, 0, 100).expect("read").len(),
            2,
            "{dev}"
        );
    }
    // The count followed the pruning: 1,000 more lines keep exactly
    // 1,000, the newest by time: the x line an hour ago and y0 go; the x
    // line a millisecond ago stays, before y999 of the same millisecond
    // (it came first).
    let many: Vec<u64> = (0..1_000).collect();
    s.write(
        &[lines("pi-0", "main", NOW - 1_000, &many, "y")],
        &r,
        NOW,
        None,
    )
    .expect("write");
    let kept = s.logs("pi-0", "web", None, 0, 10_000).expect("read");
    assert_eq!(kept.len(), 1_000);
    assert_eq!(kept[0].line, "y1");
    assert_eq!(kept[998].line, format!("x{}", HOUR - 1));
    assert_eq!(kept[999].line, "y999");
}

/// What one sample costs on disk, the number the module's doc gives:
/// many devices' samples in one file, divided by their count. Also run
/// with `--nocapture` to see it.
#[test]
fn a_sample_costs_about_two_hundred_bytes_of_file() {
    let (dir, s) = store();
    let devices = 1_000;
    let per_device = 100;
    for i in 0..per_device {
        let batch: Vec<Arc<Change>> = (0..devices)
            .map(|d| sample(&format!("device-{d:03}"), NOW - DAY / 2 + i * 10_000, 12.5))
            .collect();
        s.write(&batch, &retention(), NOW, None).expect("write");
    }
    drop(s);
    let bytes = std::fs::metadata(dir.path().join("history.redb"))
        .expect("file")
        .len();
    let samples = devices * per_device;
    let per_sample = bytes / samples;
    println!("{samples} samples (with their buckets): {bytes} bytes, {per_sample} bytes each");
    assert!(per_sample <= 250, "{per_sample} bytes per sample");
}
