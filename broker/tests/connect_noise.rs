//! Connections that fail before logging in (garbage, a health check that
//! connects and closes) cannot fill the log: anyone who can reach the port
//! can make them, as fast as they like.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_failing_before_login_write_a_bounded_number_of_lines() {
    // The orchestrator's default filter.
    let log = common::logs::capture("info,rumqttd=warn");
    let (addr, _) = common::guarded().await;
    // The listener announces itself from its own task: count from after
    // that line, or it may land among the lines counted below.
    log.wait_until("the listener's announcement", |t| {
        t.contains("embedded MQTT broker listening")
    })
    .await;
    let before = log.bytes().len();

    // TCP health checks: connect, close.
    for _ in 0..50 {
        drop(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // Not MQTT: a reserved packet type, or a PUBLISH before CONNECT, 100
    // times; each is closed at once.
    for i in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let garbage: &[u8] = if i % 2 == 0 {
            &[0xf0, 0x00]
        } else {
            &[0x30, 0x03, 0x00, 0x01, b'x']
        };
        s.write_all(garbage).await.expect("send");
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the broker closes a connection that does not start with CONNECT");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
    log.wait_until("a line about the garbage", |t| {
        t[before..].contains("Error while handling MQTT connect packet")
    })
    .await;
    let text = String::from_utf8_lossy(&log.bytes()[before..]).into_owned();
    let lines = text.lines().count();
    assert!(
        lines <= 20,
        "150 failed connections wrote {lines} lines:\n{text}"
    );
}
