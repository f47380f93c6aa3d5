//! A client hammering the broker with wrong passwords: the log stays
//! small, every failure is counted, the source's refusals slow down, and
//! a correct password from the same address still gets in at once.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::raw::Client;
use common::DEVICE_PASSWORD;
use drover_broker::{BrokerConfig, LoginThrottleConfig};

const ATTEMPTS: usize = 200;
const PARALLEL: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_logins_is_counted_logged_briefly_and_slowed_but_never_locks_out() {
    // The orchestrator's default filter.
    let log = common::logs::capture("info,rumqttd=warn");
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().expect("addr"));
    let max_delay = Duration::from_millis(1500);
    let interval = Duration::from_secs(2);
    config.login_throttle = LoginThrottleConfig {
        free_failures: 3,
        base_delay: Duration::from_millis(100),
        max_delay,
        log_interval: interval,
        ..LoginThrottleConfig::default()
    };
    let (addr, stats) = common::start(config).await;
    let before = log.bytes().len();
    let flood_started = Instant::now();

    let workers: Vec<_> = (0..PARALLEL)
        .map(|w| {
            tokio::spawn(async move {
                for i in 0..ATTEMPTS / PARALLEL {
                    // As a real flood: a new wrong password, sometimes an
                    // unknown user, each time.
                    let user = if i % 2 == 0 { "dev-1" } else { "nobody" };
                    let pass = format!("guess-{w}-{i}");
                    let (_c, code) = Client::login(addr, user, Some((user, &pass)), 30).await;
                    assert_eq!(code, Some(5), "a wrong password gets CONNACK 5");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }

    // Counted, every one.
    assert_eq!(
        stats
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        ATTEMPTS as u64
    );

    // The source is being slowed: its next refusal is held back…
    let started = Instant::now();
    let (_c, code) = Client::login(addr, "dev-1", Some(("dev-1", "again")), 30).await;
    assert_eq!(code, Some(5));
    let refused_after = started.elapsed();
    assert!(
        refused_after >= max_delay.mul_f32(0.9),
        "a source with {ATTEMPTS} recent failures is answered at once ({refused_after:?})"
    );
    // …but a correct password from the very same address is not.
    let started = Instant::now();
    let (_c, code) = Client::login(addr, "dev-1", Some(("dev-1", DEVICE_PASSWORD)), 30).await;
    let admitted_after = started.elapsed();
    assert_eq!(code, Some(0), "the device's own password is refused");
    assert!(
        admitted_after < refused_after / 2,
        "the correct password waited like a failure: {admitted_after:?} (a refusal: {refused_after:?})"
    );
    // Another address is not slowed by this one's failures.
    let started = Instant::now();
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    let (_c, code) = Client::login_from(other, addr, "dev-1", Some(("dev-1", "x"))).await;
    assert_eq!(code, Some(5));
    assert!(
        started.elapsed() < refused_after / 2,
        "another address paid for this one's failures ({:?})",
        started.elapsed()
    );

    // The log: for each source one line per interval (with the count of
    // failures since its last line) and a periodic summary of the rest;
    // nothing per attempt. Before, each failure wrote two ~280-byte lines
    // (~110 KB here). Every failure is accounted for in those lines.
    let flood_took = flood_started.elapsed();
    let accounted = |t: &str| -> u64 {
        let field = |l: &str, name: &str| -> u64 {
            l.split(name)
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        t.lines()
            .filter(|l| l.contains("source=127.0.0.1 "))
            .map(|l| {
                if l.contains("not logged one by one") {
                    field(l, "refused=")
                } else {
                    1 + field(l, "earlier_not_logged=")
                }
            })
            .sum()
    };
    log.wait_until("every refused login accounted for", |t| {
        accounted(&t[before..]) == ATTEMPTS as u64 + 1
    })
    .await;
    let text = String::from_utf8_lossy(&log.bytes()[before..]).into_owned();
    let lines = text.lines().count() as u64;
    // Lines for 127.0.0.1: one per interval the flood lasted, plus the
    // summary after it; one for 127.0.0.2.
    let bound = flood_took.as_secs() / interval.as_secs() + 3;
    assert!(
        lines <= bound && text.len() as u64 <= bound * 250,
        "{ATTEMPTS} failed logins in {flood_took:?} wrote {lines} lines (at most {bound}), {} bytes:\n{text}",
        text.len()
    );
}
