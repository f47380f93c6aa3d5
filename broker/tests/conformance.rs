//! MQTT 3.1.1 conformance of the embedded broker, over real TCP with
//! packets written by hand, where a client library would hide the detail.

mod common;

use std::time::Duration;

use common::raw::{self, Client, Read};
use common::{AUTO_PASSWORD, AUTO_USER, DEVICE_PASSWORD};

const WAIT: Duration = Duration::from_secs(10);

/// §3.1.2.10: keep-alive 0 switches keep-alive off. rumqttd refused such a
/// CONNECT ("ZeroKeepAlive"); the Paho interoperability suite connects
/// this way by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_the_connection_works() {
    let (addr, _) = common::guarded().await;
    let (mut c, code) = Client::login(addr, "dev-1", Some(("dev-1", DEVICE_PASSWORD)), 0).await;
    assert_eq!(code, Some(0), "CONNECT with keep-alive 0 is accepted");

    // It works: a subscription is granted and a ping answered…
    c.send(&raw::subscribe(7, &[("drover/v1/dev/dev-1/cmd", 1)]))
        .await;
    assert_eq!(
        c.expect(raw::SUBACK, WAIT).await,
        Read::Packet(0x90, vec![0, 7, 1])
    );
    c.send(&raw::pingreq()).await;
    assert_eq!(
        c.expect(raw::PINGRESP, WAIT).await.kind(),
        Some(raw::PINGRESP)
    );

    // …and silence does not end it: with keep-alive off there is no read
    // deadline (rumqttd's would have been 1.5 × 0 s, at once).
    assert_eq!(c.read(Duration::from_secs(2)).await, Read::Nothing);
    let (mut other, code) =
        Client::login(addr, "auto-1", Some((AUTO_USER, AUTO_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));
    other.send(&raw::publish("lab/x", b"hi", 0)).await;
    c.send(&raw::pingreq()).await;
    assert_eq!(
        c.expect(raw::PINGRESP, WAIT).await.kind(),
        Some(raw::PINGRESP),
        "the keep-alive 0 connection is still open after a quiet spell"
    );
}

/// §3.9.3: a filter the server will not grant gets the failure code 0x80
/// in the SUBACK, and the others in the same SUBSCRIBE are granted. Before,
/// one refused filter closed the connection, so `mosquitto_sub -t '#'`
/// with an automation login saw nothing, forever, without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_filter_gets_0x80_and_the_connection_stays_up() {
    let (addr, stats) = common::guarded().await;
    let (mut auto, code) =
        Client::login(addr, "reader-1", Some((AUTO_USER, AUTO_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));

    // Mixed: '#' and another device's commands are refused, heartbeats
    // granted, each at its place in the SUBACK.
    auto.send(&raw::subscribe(
        3,
        &[
            ("#", 1),
            ("drover/v1/dev/+/heartbeat", 1),
            ("drover/v1/dev/+/cmd", 0),
        ],
    ))
    .await;
    assert_eq!(
        auto.expect(raw::SUBACK, WAIT).await,
        Read::Packet(0x90, vec![0, 3, 0x80, 0x01, 0x80])
    );
    // Every filter refused: still a SUBACK, still connected.
    auto.send(&raw::subscribe(4, &[("#", 0)])).await;
    assert_eq!(
        auto.expect(raw::SUBACK, WAIT).await,
        Read::Packet(0x90, vec![0, 4, 0x80])
    );
    // A later allowed subscription works as usual.
    auto.send(&raw::subscribe(5, &[("drover/v1/dev/dev-1/heartbeat", 0)]))
        .await;
    assert_eq!(
        auto.expect(raw::SUBACK, WAIT).await,
        Read::Packet(0x90, vec![0, 5, 0x00])
    );
    assert_eq!(
        stats
            .subscriptions_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );

    // What the granted filter matches is delivered; what only the refused
    // '#' would match is not.
    let (mut dev, code) = Client::login(addr, "dev-1", Some(("dev-1", DEVICE_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));
    for topic in [
        "drover/v1/dev/dev-1/status",
        "drover/v1/dev/dev-1/heartbeat",
    ] {
        dev.send(&raw::publish(topic, b"beat", 1)).await;
        assert_eq!(
            dev.expect(raw::PUBACK, WAIT).await.kind(),
            Some(raw::PUBACK)
        );
    }
    // Read until the heartbeat, then until the PINGRESP (anything routed
    // before the heartbeat has arrived by then).
    let mut seen = Vec::new();
    let mut pinged = false;
    loop {
        match auto.read(WAIT).await {
            Read::Packet(h, body) if h >> 4 == raw::PUBLISH => {
                let topic = raw::publish_topic(&body);
                if !pinged && topic.ends_with("/heartbeat") {
                    auto.send(&raw::pingreq()).await;
                    pinged = true;
                }
                seen.push(topic);
            }
            Read::Packet(h, _) if h >> 4 == raw::PINGRESP => break,
            Read::Packet(..) => {}
            other => panic!("the automation client got no heartbeat: {other:?} after {seen:?}"),
        }
    }
    // Once per matching subscription ('+' and the exact one), nothing else.
    assert!(
        seen.iter().all(|t| t == "drover/v1/dev/dev-1/heartbeat"),
        "a refused filter delivered something: {seen:?}"
    );

    // A forbidden publish still closes the connection.
    auto.send(&raw::publish("drover/v1/dev/dev-1/cmd", b"x", 1))
        .await;
    assert_eq!(auto.read(WAIT).await, Read::Closed);
}

/// What the person in the issue tried: `mosquitto_sub -t '#'` with an
/// automation login is now told its subscription was denied, instead of
/// being disconnected and seeing nothing, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_on_hash_is_told_it_was_denied() {
    let (addr, _) = common::guarded().await;
    let out = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-u", AUTO_USER, "-P", AUTO_PASSWORD, "-i", "person-1"])
        .args(["-t", "#", "-q", "1", "-C", "1", "-W", "10"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("mosquitto_sub finished")
        .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("denied"),
        "mosquitto_sub exited {:?} without saying why: {stderr}",
        out.status.code()
    );
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
}

/// A packet over the size limit closes the connection (rumqttd stops
/// reading before the body arrives), and is counted: before, a device
/// whose messages outgrew the limit just kept reconnecting, unexplained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_publish_is_counted() {
    let mut config = drover_broker::BrokerConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.max_payload_size = 4096;
    let (addr, stats) = common::start(config).await;
    let oversized = || {
        stats
            .oversized_packets
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    let (mut dev, code) = Client::login(addr, "dev-1", Some(("dev-1", DEVICE_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));
    // Under the limit: fine.
    dev.send(&raw::publish("drover/v1/dev/dev-1/logs", &[b'x'; 4000], 1))
        .await;
    assert_eq!(
        dev.expect(raw::PUBACK, WAIT).await.kind(),
        Some(raw::PUBACK)
    );
    assert_eq!(oversized(), 0);
    // Over it, at QoS 0 (the publisher is told nothing): closed, counted.
    dev.send(&raw::publish("drover/v1/dev/dev-1/logs", &[b'x'; 5000], 0))
        .await;
    assert_eq!(dev.read(WAIT).await, Read::Closed);
    assert_eq!(oversized(), 1);

    // A CONNECT over the limit, before any login, is counted too.
    let mut c = Client::open(addr).await;
    let huge_id = "x".repeat(5000);
    c.send(&raw::connect(&huge_id, None, 30)).await;
    assert_eq!(c.read(WAIT).await, Read::Closed);
    assert_eq!(oversized(), 2);
}
