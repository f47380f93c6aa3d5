//! Bounds on what clients can make the broker write to its log, and the
//! penalty for failed logins. Pure bookkeeping over caller-supplied
//! instants (unit-tested without a clock); the guard logs and sleeps.
//!
//! - [`LogLimit`]: at most a burst of lines per interval for one kind of
//!   event; the rest are counted and reported as one summary line.
//! - [`LoginThrottle`]: failed logins per source address: each source gets
//!   one line per interval (with a count of what it did in between), every
//!   source together at most a burst of lines per interval, and repeated
//!   failures from one source are answered later and later (up to a
//!   bound). Only failures are ever delayed: a correct password is
//!   answered at once, from any address, however many failures it sent.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` lines per `interval`.
#[derive(Debug)]
pub(crate) struct LogLimit {
    interval: Duration,
    burst: u32,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    written: u32,
    /// Events not written since the last line that was.
    suppressed: u64,
}

impl Window {
    /// Starts a new window if `interval` has passed; then whether a line
    /// fits in this one (and counts it).
    fn take(&mut self, now: Instant, interval: Duration, burst: u32) -> bool {
        if self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= interval)
        {
            self.start = Some(now);
            self.written = 0;
        }
        if self.written < burst {
            self.written += 1;
            true
        } else {
            false
        }
    }
}

impl LogLimit {
    pub(crate) fn new(interval: Duration, burst: u32) -> LogLimit {
        LogLimit {
            interval,
            burst,
            state: Mutex::default(),
        }
    }

    /// Whether the line for an event at `now` may be written. `Some(n)`:
    /// write it, and say that `n` earlier events were not.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.take(now, self.interval, self.burst) {
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    /// Events suppressed and not yet reported, once their window is over:
    /// the periodic summary.
    pub(crate) fn summary(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let over = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.interval);
        (over && w.suppressed > 0).then(|| std::mem::take(&mut w.suppressed))
    }
}

/// Settings of [`LoginThrottle`].
#[derive(Debug, Clone)]
pub struct LoginThrottleConfig {
    /// Failures from one source within `window` answered without delay.
    pub free_failures: u32,
    /// Delay of the first failure past `free_failures`; each further one
    /// doubles it, up to `max_delay`.
    pub base_delay: Duration,
    /// The longest a refusal is held back. Bounded, so a source is never
    /// locked out, only slowed.
    pub max_delay: Duration,
    /// How long failures are remembered; a source that stays quiet this
    /// long starts afresh.
    pub window: Duration,
    /// One line per source per interval, and the summaries' period.
    pub log_interval: Duration,
    /// Lines about failed logins per interval, all sources together.
    pub log_burst: u32,
    /// Sources tracked one by one; past this (after forgetting quiet
    /// ones), new sources share one entry.
    pub max_sources: usize,
}

impl Default for LoginThrottleConfig {
    fn default() -> Self {
        LoginThrottleConfig {
            free_failures: 5,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(3),
            window: Duration::from_secs(300),
            log_interval: Duration::from_secs(60),
            log_burst: 20,
            max_sources: 4096,
        }
    }
}

/// Where failed logins come from: an IPv4 address, or an IPv6 /64 (one
/// host usually has a whole /64 to pick addresses from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(std::net::Ipv4Addr),
    V6Net(u64),
    /// No address known, or the table was full.
    Other,
}

impl Source {
    fn of(ip: Option<IpAddr>) -> Source {
        match ip {
            Some(IpAddr::V4(a)) => Source::V4(a),
            Some(IpAddr::V6(a)) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Net((u128::from(a) >> 64) as u64),
            },
            None => Source::Other,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(a) => write!(f, "{a}"),
            Source::V6Net(n) => {
                let a = std::net::Ipv6Addr::from(u128::from(*n) << 64);
                write!(f, "{a}/64")
            }
            Source::Other => f.write_str("other addresses"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// Failures in the current window.
    failures: u32,
    window_start: Instant,
    last_seen: Instant,
    /// Failures not yet in a log line.
    unlogged: u64,
    last_line: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            window_start: now,
            last_seen: now,
            unlogged: 0,
            last_line: None,
        }
    }
}

/// What to do about one failed login.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) source: Source,
    /// Hold the refusal back this long.
    pub(crate) delay: Duration,
    /// `Some(n)`: write a line for this failure, saying `n` earlier ones
    /// from this source were not written.
    pub(crate) line: Option<u64>,
}

/// A periodic line: `count` failures from `source` not written one by one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) source: Source,
    pub(crate) count: u64,
}

#[derive(Debug)]
pub(crate) struct LoginThrottle {
    config: LoginThrottleConfig,
    state: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    sources: HashMap<Source, Entry>,
    /// Lines written, all sources together.
    lines: Window,
    last_purge: Option<Instant>,
}

impl LoginThrottle {
    pub(crate) fn new(config: LoginThrottleConfig) -> LoginThrottle {
        LoginThrottle {
            config,
            state: Mutex::default(),
        }
    }

    /// Records a failed login from `ip` at `now`.
    pub(crate) fn failed(&self, ip: Option<IpAddr>, now: Instant) -> Failure {
        let c = &self.config;
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut source = Source::of(ip);
        if !t.sources.contains_key(&source) && t.sources.len() >= c.max_sources {
            t.purge(now, c.window, false);
            if t.sources.len() >= c.max_sources {
                source = Source::Other;
            }
        }
        let e = t.sources.entry(source).or_insert_with(|| Entry::new(now));
        if now.saturating_duration_since(e.window_start) >= c.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_seen = now;
        let delay = match e.failures.checked_sub(c.free_failures + 1) {
            None => Duration::ZERO,
            Some(doublings) => c
                .base_delay
                .saturating_mul(1u32 << doublings.min(20))
                .min(c.max_delay),
        };
        let due = e
            .last_line
            .is_none_or(|l| now.saturating_duration_since(l) >= c.log_interval);
        let line = if due && t.lines.take(now, c.log_interval, c.log_burst) {
            let e = t.sources.get_mut(&source).expect("inserted above");
            e.last_line = Some(now);
            Some(std::mem::take(&mut e.unlogged))
        } else {
            let e = t.sources.get_mut(&source).expect("inserted above");
            e.unlogged += 1;
            None
        };
        Failure {
            source,
            delay,
            line,
        }
    }

    /// The periodic lines: per source, the failures not yet written, once
    /// its last line is an interval old, within the burst; what does not
    /// fit is one more summary for "other addresses". Also forgets sources
    /// quiet for a whole window, so the table only holds recent ones.
    pub(crate) fn summaries(&self, now: Instant) -> Vec<Summary> {
        let c = &self.config;
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut rest = 0u64;
        let Table { sources, lines, .. } = &mut *t;
        for (source, e) in sources.iter_mut() {
            let due = e
                .last_line
                .is_none_or(|l| now.saturating_duration_since(l) >= c.log_interval);
            if e.unlogged == 0 || !due {
                continue;
            }
            if lines.take(now, c.log_interval, c.log_burst) {
                out.push(Summary {
                    source: *source,
                    count: std::mem::take(&mut e.unlogged),
                });
                e.last_line = Some(now);
            } else {
                rest += std::mem::take(&mut e.unlogged);
            }
        }
        if rest > 0 {
            out.push(Summary {
                source: Source::Other,
                count: rest,
            });
        }
        t.purge(now, c.window, true);
        out
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .len()
    }
}

impl Table {
    /// Forgets sources quiet for a whole window with nothing left to
    /// report. At most once a second unless `force`: a full table of
    /// active sources must not cost a scan per failure.
    fn purge(&mut self, now: Instant, window: Duration, force: bool) {
        if !force
            && self
                .last_purge
                .is_some_and(|p| now.saturating_duration_since(p) < Duration::from_secs(1))
        {
            return;
        }
        self.last_purge = Some(now);
        self.sources
            .retain(|_, e| e.unlogged > 0 || now.saturating_duration_since(e.last_seen) < window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    fn config() -> LoginThrottleConfig {
        LoginThrottleConfig {
            free_failures: 2,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            window: Duration::from_secs(60),
            log_interval: Duration::from_secs(10),
            log_burst: 3,
            max_sources: 4,
        }
    }

    #[test]
    fn repeated_failures_wait_longer_up_to_a_bound_and_quiet_resets() {
        let t = LoginThrottle::new(config());
        let now = Instant::now();
        let delays: Vec<u64> = (0..8)
            .map(|_| t.failed(ip("10.0.0.1"), now).delay.as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1000, 1000]);
        // Another address is not slowed by the first one's failures.
        assert_eq!(t.failed(ip("10.0.0.2"), now).delay, Duration::ZERO);
        // After a quiet window the first starts afresh.
        let later = now + Duration::from_secs(61);
        assert_eq!(t.failed(ip("10.0.0.1"), later).delay, Duration::ZERO);
    }

    #[test]
    fn one_line_per_source_per_interval_with_the_count_in_between() {
        let t = LoginThrottle::new(config());
        let now = Instant::now();
        assert_eq!(t.failed(ip("10.0.0.1"), now).line, Some(0));
        for i in 1..100 {
            let at = now + Duration::from_millis(i);
            assert_eq!(t.failed(ip("10.0.0.1"), at).line, None);
        }
        // Nothing is due yet; one interval later the 99 are one line.
        assert_eq!(t.summaries(now + Duration::from_secs(1)), []);
        assert_eq!(
            t.summaries(now + Duration::from_secs(10)),
            [Summary {
                source: Source::V4("10.0.0.1".parse().expect("ip")),
                count: 99
            }]
        );
        assert_eq!(t.summaries(now + Duration::from_secs(20)), []);
        // Or a new failure after the interval carries the count itself.
        let at = now + Duration::from_secs(30);
        assert_eq!(t.failed(ip("10.0.0.1"), at).line, Some(0));
        assert_eq!(t.failed(ip("10.0.0.1"), at).line, None);
        assert_eq!(
            t.failed(ip("10.0.0.1"), at + Duration::from_secs(10)).line,
            Some(1)
        );
    }

    #[test]
    fn many_sources_share_a_burst_and_the_rest_is_one_summary() {
        let t = LoginThrottle::new(LoginThrottleConfig {
            max_sources: 100,
            ..config()
        });
        let now = Instant::now();
        let lines = (0..50)
            .filter(|i| t.failed(ip(&format!("10.0.1.{i}")), now).line.is_some())
            .count();
        assert_eq!(lines, 3, "the burst bounds lines across sources");
        let s = t.summaries(now + Duration::from_secs(10));
        assert_eq!(s.len(), 3 + 1, "{s:?}");
        assert_eq!(s.iter().map(|s| s.count).sum::<u64>(), 47);
        assert_eq!(s.last().map(|s| s.source), Some(Source::Other));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_quiet_sources() {
        let t = LoginThrottle::new(config());
        let now = Instant::now();
        for i in 0..1000 {
            t.failed(ip(&format!("10.1.{}.{}", i / 256, i % 256)), now);
        }
        assert!(t.tracked() <= 4 + 1, "{}", t.tracked());
        // Sources past the limit share one entry (and its penalty).
        assert_eq!(
            t.failed(ip("10.9.9.9"), now).source,
            Source::Other,
            "a full table does not grow"
        );
        let _ = t.summaries(now + Duration::from_secs(10));
        let _ = t.summaries(now + Duration::from_secs(120));
        assert_eq!(t.tracked(), 0, "quiet, reported sources are forgotten");
        assert!(matches!(
            t.failed(ip("10.9.9.9"), now + Duration::from_secs(121))
                .source,
            Source::V4(_)
        ));
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2:aaaa::1")),
            Source::of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:10.0.0.1")),
            Source::of(ip("10.0.0.1"))
        );
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn a_log_limit_lets_a_burst_through_and_reports_the_rest() {
        let l = LogLimit::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        assert_eq!(l.admit(now), Some(0));
        assert_eq!(l.admit(now), Some(0));
        assert_eq!(l.admit(now), None);
        assert_eq!(l.admit(now), None);
        assert_eq!(l.summary(now), None, "not before the window is over");
        assert_eq!(l.admit(now + Duration::from_secs(10)), Some(2));
        assert_eq!(l.admit(now + Duration::from_secs(10)), Some(0));
        assert_eq!(l.admit(now + Duration::from_secs(10)), None);
        assert_eq!(l.summary(now + Duration::from_secs(20)), Some(1));
        assert_eq!(l.summary(now + Duration::from_secs(30)), None);
    }
}
