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
