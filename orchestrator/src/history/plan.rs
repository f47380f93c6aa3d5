//! The pure part of the history: what a stored sample and a five-minute
//! bucket hold, how samples fold into buckets, which resolution answers a
//! window, and where retention cuts. No I/O; time comes in as `now_ms`.
//!
//! Stored values are CBOR arrays (tuple structs), not maps: no field names
//! on disk, so a sample of a host with two containers is under 80 bytes
//! (`a_sample_is_compact` keeps it so).

use drover_shared::payload::{LogLine, LogStream, Telemetry};
use drover_shared::Name;
use serde::{Deserialize, Serialize};

use crate::contract::{ContainerPoint, HostPoint, Resolution, Stat, TelemetryPoint};

/// The width of a downsampled bucket.
pub const BUCKET_MS: u64 = 5 * 60 * 1000;

const HOUR_MS: u64 = 60 * 60 * 1000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// How far ahead of the orchestrator's clock a device's timestamp may be
/// and still be kept (a device clock that is off by more would otherwise
/// keep its rows past every retention cut).
pub const MAX_AHEAD_MS: u64 = DAY_MS;

/// How long what is kept stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Every sample, as sent, this long.
    pub raw_ms: u64,
    /// Five-minute buckets and log lines this long.
    pub keep_ms: u64,
    /// And at most this many log lines per (device, app, container).
    pub log_lines: u64,
}

impl Retention {
    pub fn new(raw_hours: u64, days: u64, log_lines: u64) -> Retention {
        Retention {
            raw_ms: raw_hours.saturating_mul(HOUR_MS),
            keep_ms: days.saturating_mul(DAY_MS),
            log_lines,
        }
    }

    /// Raw samples before this are gone.
    pub fn raw_cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.raw_ms)
    }

    /// Buckets that start before this, and log lines before it, are gone.
    pub fn keep_cutoff(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.keep_ms)
    }

    /// Whether a raw sample taken at `at_ms` is kept.
    pub fn keeps_raw(&self, at_ms: u64, now_ms: u64) -> bool {
        at_ms >= self.raw_cutoff(now_ms) && at_ms <= now_ms.saturating_add(MAX_AHEAD_MS)
    }

    /// Whether a bucket (by the time of a sample in it) or a log line
    /// taken at `at_ms` is kept.
    pub fn keeps(&self, at_ms: u64, now_ms: u64) -> bool {
        at_ms >= self.keep_cutoff(now_ms) && at_ms <= now_ms.saturating_add(MAX_AHEAD_MS)
    }

    /// The resolution that answers a window starting at `since_ms`:
    /// `auto` (`None`) is raw when raw samples still reach back that far,
    /// five-minute buckets otherwise.
    pub fn resolution(&self, asked: Option<Resolution>, since_ms: u64, now_ms: u64) -> Resolution {
        match asked {
            Some(r) => r,
            None if since_ms >= self.raw_cutoff(now_ms) => Resolution::Raw,
            None => Resolution::FiveMinutes,
        }
    }
}

/// The start of the bucket `at_ms` falls in.
pub fn bucket_start(at_ms: u64) -> u64 {
    at_ms - at_ms % BUCKET_MS
}

/// One telemetry sample as stored: what a series shows of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample(pub HostSample, pub Vec<ContainerSample>);

/// CPU %, memory used, memory total, disk used, disk total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSample(pub f32, pub u64, pub u64, pub u64, pub u64);

/// App, container, CPU % (of one core), memory bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerSample(pub Name, pub Name, pub f32, pub u64);

impl Sample {
    pub fn of(t: &Telemetry) -> Sample {
        let h = &t.host;
        Sample(
            HostSample(
                h.cpu_percent,
                h.memory_used_bytes,
                h.memory_total_bytes,
                h.disk_used_bytes,
                h.disk_total_bytes,
            ),
            t.containers
                .iter()
                .map(|c| {
                    ContainerSample(
                        c.app.clone(),
                        c.container.clone(),
                        c.cpu_percent,
                        c.memory_bytes,
                    )
                })
                .collect(),
        )
    }

    pub fn point(&self, at_ms: u64) -> TelemetryPoint {
        let one = |v: f64| Stat { avg: v, max: v };
        let HostSample(cpu, mem, mem_total, disk, disk_total) = self.0;
        TelemetryPoint {
            at_ms,
            samples: 1,
            host: HostPoint {
                cpu_percent: one(f64::from(cpu)),
                memory_used_bytes: one(mem as f64),
                memory_total_bytes: mem_total,
                disk_used_bytes: one(disk as f64),
                disk_total_bytes: disk_total,
            },
            containers: self
                .1
                .iter()
                .map(|ContainerSample(app, container, cpu, mem)| ContainerPoint {
                    app: app.clone(),
                    container: container.clone(),
                    samples: 1,
                    cpu_percent: one(f64::from(*cpu)),
                    memory_bytes: one(*mem as f64),
                })
                .collect(),
        }
    }
}

/// A sum and a maximum: an average that can take more samples, from any
/// number of commits, in any order.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Agg(pub f64, pub f64);

impl Agg {
    fn add(&mut self, v: f64, first: bool) {
        self.0 += v;
        self.1 = if first { v } else { self.1.max(v) };
    }

    fn merge(&mut self, other: Agg, first: bool) {
        self.0 += other.0;
        self.1 = if first { other.1 } else { self.1.max(other.1) };
    }

    fn stat(self, n: u32) -> Stat {
        Stat {
            avg: if n == 0 { 0.0 } else { self.0 / f64::from(n) },
            max: self.1,
        }
    }
}

/// Five minutes of a device's telemetry as stored: samples, host CPU,
/// memory used, memory total (last), disk used, disk total (last), and
/// per container.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Bucket(
    pub u32,
    pub Agg,
    pub Agg,
    pub u64,
    pub Agg,
    pub u64,
    pub Vec<ContainerBucket>,
);

/// App, container, samples, CPU %, memory bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerBucket(pub Name, pub Name, pub u32, pub Agg, pub Agg);

impl Bucket {
    /// Folds one sample in.
    pub fn add(&mut self, s: &Sample) {
        let HostSample(cpu, mem, mem_total, disk, disk_total) = s.0;
        let first = self.0 == 0;
        self.0 += 1;
        self.1.add(f64::from(cpu), first);
        self.2.add(mem as f64, first);
        self.3 = mem_total;
        self.4.add(disk as f64, first);
        self.5 = disk_total;
        for ContainerSample(app, container, cpu, mem) in &s.1 {
            let c = self.container(app, container);
            let first = c.2 == 0;
            c.2 += 1;
            c.3.add(f64::from(*cpu), first);
            c.4.add(*mem as f64, first);
        }
    }

    /// Folds another bucket of the same five minutes in (`other`'s totals
    /// win: it is the newer one).
    pub fn merge(&mut self, other: &Bucket) {
        if other.0 == 0 {
            return;
        }
        let first = self.0 == 0;
        self.0 += other.0;
        self.1.merge(other.1, first);
        self.2.merge(other.2, first);
        self.3 = other.3;
        self.4.merge(other.4, first);
        self.5 = other.5;
        for ContainerBucket(app, container, n, cpu, mem) in &other.6 {
            let c = self.container(app, container);
            let first = c.2 == 0;
            c.2 += n;
            c.3.merge(*cpu, first);
            c.4.merge(*mem, first);
        }
    }

    fn container(&mut self, app: &Name, container: &Name) -> &mut ContainerBucket {
        let i = match self.6.iter().position(|c| &c.0 == app && &c.1 == container) {
            Some(i) => i,
            None => {
                self.6.push(ContainerBucket(
                    app.clone(),
                    container.clone(),
                    0,
                    Agg::default(),
                    Agg::default(),
                ));
                self.6.len() - 1
            }
        };
        &mut self.6[i]
    }

    pub fn point(&self, at_ms: u64) -> TelemetryPoint {
        let n = self.0;
        TelemetryPoint {
            at_ms,
            samples: n,
            host: HostPoint {
                cpu_percent: self.1.stat(n),
                memory_used_bytes: self.2.stat(n),
                memory_total_bytes: self.3,
                disk_used_bytes: self.4.stat(n),
                disk_total_bytes: self.5,
            },
            containers: self
                .6
                .iter()
                .map(
                    |ContainerBucket(app, container, n, cpu, mem)| ContainerPoint {
                        app: app.clone(),
                        container: container.clone(),
                        samples: *n,
                        cpu_percent: cpu.stat(*n),
                        memory_bytes: mem.stat(*n),
                    },
                )
                .collect(),
        }
    }
}

/// A log line as stored (its time is in the key): stream (0 stdout,
/// 1 stderr) and text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLine(pub u8, pub String);

impl StoredLine {
    pub fn of(l: &LogLine) -> StoredLine {
        let stream = match l.stream {
            LogStream::Stdout => 0,
            LogStream::Stderr => 1,
        };
        StoredLine(stream, l.line.clone())
    }

    pub fn line(self, at_ms: u64) -> LogLine {
        LogLine {
            at_ms,
            stream: if self.0 == 1 {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            },
            line: self.1,
        }
    }
}

/// The last `tail` lines of several containers' lines (each in time
/// order), merged in time order. Lines of the same millisecond keep the
/// order of the containers given.
pub fn merge_tail(per_container: Vec<Vec<LogLine>>, tail: usize) -> Vec<LogLine> {
    let mut all: Vec<LogLine> = per_container.into_iter().flatten().collect();
    all.sort_by_key(|l| l.at_ms);
    let skip = all.len().saturating_sub(tail);
    all.split_off(skip)
}

/// Encodes a stored value (CBOR). Writing into memory cannot fail for
/// these plain structs.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    if let Err(e) = ciborium::into_writer(v, &mut out) {
        unreachable!("CBOR encoding into memory failed: {e}");
    }
    out
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use drover_shared::payload::{ContainerMetrics, HostMetrics};

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    fn telemetry(at_ms: u64, cpu: f32, mem: u64, containers: &[(&str, f32, u64)]) -> Telemetry {
        Telemetry {
            at_ms,
            host: HostMetrics {
                cpu_percent: cpu,
                memory_used_bytes: mem,
                memory_total_bytes: 8 << 30,
                disk_used_bytes: 10 << 30,
                disk_total_bytes: 64 << 30,
                load_1: 0.5,
                load_5: 0.4,
                load_15: 0.3,
                uptime_s: 3600,
            },
            containers: containers
                .iter()
                .map(|(c, cpu, mem)| ContainerMetrics {
                    app: name("web"),
                    container: name(c),
                    cpu_percent: *cpu,
                    memory_bytes: *mem,
                    memory_limit_bytes: None,
                })
                .collect(),
        }
    }

    #[test]
    fn buckets_start_on_five_minute_marks() {
        assert_eq!(bucket_start(0), 0);
        assert_eq!(bucket_start(BUCKET_MS - 1), 0);
        assert_eq!(bucket_start(BUCKET_MS), BUCKET_MS);
        assert_eq!(bucket_start(7 * BUCKET_MS + 12_345), 7 * BUCKET_MS);
    }

    #[test]
    fn a_bucket_holds_average_and_maximum() {
        let mut b = Bucket::default();
        b.add(&Sample::of(&telemetry(
            1,
            10.0,
            100,
            &[("main", 50.0, 1000), ("db", 1.0, 10)],
        )));
        b.add(&Sample::of(&telemetry(
            2,
            30.0,
            300,
            &[("main", 150.0, 3000)],
        )));
        b.add(&Sample::of(&telemetry(
            3,
            20.0,
            200,
            &[("main", 100.0, 2000)],
        )));
        let p = b.point(0);
        assert_eq!(p.samples, 3);
        assert_eq!(
            p.host.cpu_percent,
            Stat {
                avg: 20.0,
                max: 30.0
            }
        );
        assert_eq!(
            p.host.memory_used_bytes,
            Stat {
                avg: 200.0,
                max: 300.0
            }
        );
        assert_eq!(p.host.memory_total_bytes, 8 << 30);
        let main = &p.containers[0];
        assert_eq!((main.container.as_str(), main.samples), ("main", 3));
        assert_eq!(
            main.cpu_percent,
            Stat {
                avg: 100.0,
                max: 150.0
            }
        );
        assert_eq!(
            main.memory_bytes,
            Stat {
                avg: 2000.0,
                max: 3000.0
            }
        );
        // A container seen once averages over its own samples, not the host's.
        let db = &p.containers[1];
        assert_eq!((db.container.as_str(), db.samples), ("db", 1));
        assert_eq!(db.cpu_percent, Stat { avg: 1.0, max: 1.0 });
    }

    #[test]
    fn a_maximum_below_zero_is_not_lost_to_the_empty_start() {
        // The first sample sets the maximum; it is not compared with 0.
        let mut b = Bucket::default();
        b.add(&Sample::of(&telemetry(1, -1.0, 0, &[])));
        assert_eq!(b.point(0).host.cpu_percent.max, -1.0);
    }

    #[test]
    fn merging_buckets_is_adding_their_samples() {
        let samples: Vec<Sample> = (0..6)
            .map(|i| {
                Sample::of(&telemetry(
                    i,
                    i as f32,
                    i * 10,
                    &[("main", i as f32 * 2.0, i)],
                ))
            })
            .collect();
        let mut whole = Bucket::default();
        samples.iter().for_each(|s| whole.add(s));
        let (mut a, mut b) = (Bucket::default(), Bucket::default());
        samples[..2].iter().for_each(|s| a.add(s));
        samples[2..].iter().for_each(|s| b.add(s));
        a.merge(&b);
        assert_eq!(a, whole);
        // Merging into nothing, or nothing in, changes nothing.
        let mut empty = Bucket::default();
        empty.merge(&whole);
        assert_eq!(empty, whole);
        whole.merge(&Bucket::default());
        assert_eq!(empty, whole);
    }

    #[test]
    fn a_raw_point_is_its_sample() {
        let t = telemetry(42, 12.5, 1234, &[("main", 3.0, 77)]);
        let p = Sample::of(&t).point(42);
        assert_eq!(p.at_ms, 42);
        assert_eq!(p.samples, 1);
        assert_eq!(
            p.host.cpu_percent,
            Stat {
                avg: 12.5,
                max: 12.5
            }
        );
        assert_eq!(p.host.disk_total_bytes, 64 << 30);
        assert_eq!(p.containers[0].memory_bytes.max, 77.0);
    }

    #[test]
    fn a_sample_is_compact() {
        let s = Sample::of(&telemetry(
            1,
            12.5,
            3 << 30,
            &[("main", 3.25, 50 << 20), ("db", 0.5, 200 << 20)],
        ));
        let bytes = encode(&s);
        assert!(bytes.len() <= 80, "{} bytes", bytes.len());
        assert_eq!(decode::<Sample>(&bytes).expect("decodes"), s);
        let mut b = Bucket::default();
        b.add(&s);
        let bytes = encode(&b);
        assert!(bytes.len() <= 160, "{} bytes", bytes.len());
        assert_eq!(decode::<Bucket>(&bytes).expect("decodes"), b);
    }

    #[test]
    fn retention_cuts_by_age_and_refuses_the_far_future() {
        let r = Retention::new(24, 30, 10_000);
        let now = 100 * DAY_MS;
        assert_eq!(r.raw_cutoff(now), now - DAY_MS);
        assert_eq!(r.keep_cutoff(now), now - 30 * DAY_MS);
        assert!(r.keeps_raw(now - DAY_MS, now));
        assert!(!r.keeps_raw(now - DAY_MS - 1, now));
        assert!(r.keeps(now - DAY_MS - 1, now));
        assert!(!r.keeps(now - 30 * DAY_MS - 1, now));
        assert!(r.keeps(now + MAX_AHEAD_MS, now));
        assert!(!r.keeps(now + MAX_AHEAD_MS + 1, now));
        assert!(!r.keeps_raw(now + MAX_AHEAD_MS + 1, now));
        // Early in the clock's life nothing is cut.
        assert_eq!(r.keep_cutoff(5), 0);
    }

    #[test]
    fn auto_is_raw_only_while_raw_samples_reach_back_that_far() {
        let r = Retention::new(24, 30, 10_000);
        let now = 100 * DAY_MS;
        assert_eq!(
            r.resolution(None, now - HOUR_MS, now),
            Resolution::Raw,
            "the last hour"
        );
        assert_eq!(r.resolution(None, now - DAY_MS, now), Resolution::Raw);
        assert_eq!(
            r.resolution(None, now - DAY_MS - 1, now),
            Resolution::FiveMinutes
        );
        assert_eq!(
            r.resolution(Some(Resolution::Raw), 0, now),
            Resolution::Raw,
            "asked for is answered"
        );
        assert_eq!(
            r.resolution(Some(Resolution::FiveMinutes), now, now),
            Resolution::FiveMinutes
        );
    }

    #[test]
    fn a_stored_line_keeps_its_stream_and_text() {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let l = LogLine {
                at_ms: 9,
                stream,
                line: "héllo".into(),
            };
            let back: StoredLine = decode(&encode(&StoredLine::of(&l))).expect("decodes");
            assert_eq!(back.line(9), l);
        }
    }

    #[test]
    fn the_tail_of_several_containers_is_in_time_order() {
        let l = |at_ms: u64, s: &str| LogLine {
            at_ms,
            stream: LogStream::Stdout,
            line: s.into(),
        };
        let merged = merge_tail(
            vec![
                vec![l(1, "a1"), l(4, "a4"), l(6, "a6")],
                vec![l(2, "b2"), l(4, "b4"), l(5, "b5")],
            ],
            4,
        );
        let text: Vec<&str> = merged.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(text, ["a4", "b4", "b5", "a6"]);
        assert_eq!(merge_tail(vec![vec![l(1, "x")]], 10).len(), 1);
        assert!(merge_tail(Vec::new(), 10).is_empty());
    }
}
