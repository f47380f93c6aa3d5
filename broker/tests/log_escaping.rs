//! Strings from the wire reach the log escaped: a client id, username,
//! filter or topic holding a newline cannot forge a log line, and one
//! holding a terminal escape sequence cannot recolour or hide one.

mod common;

use std::time::Duration;

use common::raw::{self, Client};
use common::{AUTO_PASSWORD, AUTO_USER};

/// Where a forged line would begin if a newline got through.
const FORGED: &str = "FORGED 2026-12-06T00:00:00Z INFO drover: all good";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_the_wire_are_escaped_in_the_log() {
    // Everything, rumqttd's own debug and trace lines included: an
    // operator turning the log up must not open the hole either.
    let log = common::logs::capture("trace");
    let (addr, _) = common::guarded().await;
    let evil = format!("x\n{FORGED}\x1b[31m\r\x1b[2K");

    // Refused logins: a wrong password, and no credentials at all.
    let (_c, code) = Client::login(addr, &evil, Some(("dev-1", "wrong")), 30).await;
    assert_eq!(code, Some(5));
    let (_c, code) = Client::login(addr, &evil, Some((&evil, "wrong")), 30).await;
    assert_eq!(code, Some(5));
    let (_c, code) = Client::login(addr, &evil, None, 30).await;
    assert_eq!(code, Some(5));

    // A client that logs in properly under an evil client id (automation
    // identities choose their own) and then asks for an evil filter and
    // publishes on an evil topic.
    let (mut c, code) = Client::login(addr, &evil, Some((AUTO_USER, AUTO_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));
    c.send(&raw::subscribe(1, &[(&format!("lab/{evil}"), 0)]))
        .await;
    let _ = c.read(Duration::from_secs(2)).await;
    let (mut c, code) = Client::login(addr, &evil, Some((AUTO_USER, AUTO_PASSWORD)), 30).await;
    assert_eq!(code, Some(0));
    c.send(&raw::publish(&format!("drover/v1/dev/{evil}/cmd"), b"x", 1))
        .await;
    let _ = c.read(Duration::from_secs(2)).await;
    // A client id rumqttd's router itself refuses (it holds a `/`).
    let (_c, _) = Client::login(
        addr,
        &format!("a/{evil}"),
        Some((AUTO_USER, AUTO_PASSWORD)),
        30,
    )
    .await;

    // Each of those was logged (so the check below is not vacuous): the
    // marker shows up, escaped, many times.
    log.wait_until("the evil client id, filter and topic", |t| {
        t.matches("FORGED").count() >= 6 && t.to_lowercase().contains("invalid client_id")
    })
    .await;
    let bytes = log.bytes();
    assert!(
        !bytes.contains(&0x1b),
        "a raw ESC reached the log:\n{}",
        log.text()
    );
    assert!(
        !bytes.contains(&b'\r'),
        "a raw carriage return reached the log:\n{}",
        log.text()
    );
    let text = log.text();
    for line in text.lines() {
        assert!(
            !line.starts_with("FORGED"),
            "a client forged a log line: {line:?}\nin:\n{text}"
        );
        // Every line is one of ours: it starts with the timestamp.
        assert!(
            line.starts_with("20") && line.as_bytes().get(4) == Some(&b'-'),
            "a line that is not a log record: {line:?}\nin:\n{text}"
        );
    }
}
