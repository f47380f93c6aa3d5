//! What the broker's over-TCP tests share: a broker on a free loopback
//! port with a small fixed set of identities, and MQTT 3.1.1 packets
//! written by hand (`raw`), for what a well-behaved client library hides
//! or never sends (keep-alive 0, a SUBACK's return codes, an oversized
//! packet, control characters in a client id).

#![allow(dead_code)]

pub mod logs;
pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_broker::{Access, Authority, Broker, BrokerConfig, GuardStats, Principal};
use drover_shared::DeviceId;

/// The one device's password.
pub const DEVICE_PASSWORD: &str = "right";
/// The automation identity's password; it may read heartbeats only.
pub const AUTO_PASSWORD: &str = "auto-pass";
pub const AUTO_USER: &str = "$auto:reader";

/// Device `dev-1` (password [`DEVICE_PASSWORD`]) and the automation
/// identity [`AUTO_USER`], granted `drover/v1/dev/+/heartbeat` and
/// publishing on `lab/#`.
pub struct Fixed;

impl Authority for Fixed {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        match username {
            AUTO_USER => password == AUTO_PASSWORD,
            "dev-1" => client_id == "dev-1" && password == DEVICE_PASSWORD,
            _ => false,
        }
    }

    fn principal(&self, client_id: &str, username: Option<&str>) -> Option<Principal> {
        match username? {
            AUTO_USER => Some(Principal::Automation {
                name: "reader".into(),
                subscribe: vec!["drover/v1/dev/+/heartbeat".into()],
                publish: vec!["lab/#".into()],
            }),
            "dev-1" if client_id == "dev-1" => {
                Some(Principal::Device(DeviceId::new("dev-1").expect("id")))
            }
            _ => None,
        }
    }
}

/// A guarded broker on a free loopback port, running until the test ends.
pub async fn guarded() -> (SocketAddr, Arc<GuardStats>) {
    start(BrokerConfig::new("127.0.0.1:0".parse().expect("addr"))).await
}

/// A guarded broker with these settings (its `listen` should be port 0).
pub async fn start(config: BrokerConfig) -> (SocketAddr, Arc<GuardStats>) {
    let broker = Broker::start(config, Access::Guarded(Arc::new(Fixed))).expect("broker starts");
    let addr = broker.listen_addr();
    let stats = broker.stats();
    tokio::spawn(broker.run(std::future::pending()));
    // The listener is bound before `run`; this only waits for the accept
    // loop's task to be scheduled.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, stats)
}
