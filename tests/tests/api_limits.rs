//! The REST listener against clients that open connections and never
//! finish a request: they are cut off after the header-read timeout, there
//! are never more than the connection limit of them, and MQTT keeps
//! working while they try, even under a low open-file limit.

use std::time::{Duration, Instant};

use drover::http::tls::ServeLimits;
use drover_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection and sends half a request (or nothing).
async fn half_request(port: u16, say: &'static [u8]) -> Option<TcpStream> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(say).await.ok()?;
    Some(s)
}

/// Whether the server has closed `s` (EOF or reset) within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // hyper may answer 408 first; the close follows.
        Ok(Ok(_)) => matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_cut_off_and_bounded() {
    let orch = Orch::start_config(|cfg| {
        cfg.api_limits = ServeLimits {
            header_read_timeout: Duration::from_secs(1),
            max_connections: 20,
            drain: Duration::from_secs(5),
        };
    })
    .await;
    let port: u16 = orch
        .api
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("api port");
    let mut slow = Vec::new();
    for i in 0..60 {
        let say: &'static [u8] = if i % 2 == 0 {
            b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n"
        } else {
            b""
        };
        if let Some(s) = half_request(port, say).await {
            slow.push(s);
        }
    }
    assert!(slow.len() >= 20, "could not open the slow connections");

    // MQTT does not depend on the API's connections.
    let mut opts = rumqttc::MqttOptions::new(unique("probe"), &orch.mqtt_host, orch.mqtt_port);
    opts.set_credentials("nobody", "wrong");
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                // A refusal is an answer: the broker accepted and read us.
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "the broker did not answer while the API was busy"
    );

    // Every slow client is cut off: the first twenty after the timeout, the
    // rest (waiting for a slot) as slots free up.
    let start = Instant::now();
    for s in &mut slow {
        assert!(
            closed_by_server(s, Duration::from_secs(15)).await,
            "a connection that never finished its request is still open after {:?}",
            start.elapsed()
        );
    }
    // And the API serves again.
    let (status, _) = orch.api.get("/api/v1/devices").await;
    assert_eq!(status, 200);
    orch.stop().await;
}

/// Under a low open-file limit, a flood of idle API connections used to
/// take every descriptor, and the broker could accept no device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_accepts_while_the_api_is_flooded_under_a_low_file_limit() {
    let data = tempfile::tempdir().expect("tempdir");
    let (api_port, mqtt_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::new("prlimit")
        .arg("--nofile=128:128")
        .arg(binary("drover"))
        .args([
            "serve",
            "--insecure-open-broker",
            "--api-listen",
            &format!("127.0.0.1:{api_port}"),
            "--mqtt-listen",
            &format!("127.0.0.1:{mqtt_port}"),
            "--data-dir",
        ])
        .arg(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit (util-linux) runs drover serve");
    wait_for(
        Duration::from_secs(20),
        "drover serve listening",
        || async {
            TcpStream::connect(("127.0.0.1", api_port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    // More than the 128 descriptors the process has, all at once.
    let flood: Vec<TcpStream> = futures_util::future::join_all(
        (0..200).map(|_| half_request(api_port, b"GET / HTTP/1.1\r\n")),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(flood.len() > 128, "only {} connections opened", flood.len());
    // A device connects and is answered while the flood holds on.
    let mut opts = rumqttc::MqttOptions::new(unique("dev"), "127.0.0.1", mqtt_port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let connack = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => break Ok(a),
                Ok(_) => {}
                Err(e) => break Err(e.to_string()),
            }
        }
    })
    .await;
    assert!(
        matches!(connack, Ok(Ok(_))),
        "a device could not connect while the API was flooded: {connack:?}"
    );
    drop(flood);
    let _ = child.kill().await;
}
