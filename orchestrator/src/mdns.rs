//! Zero-touch discovery, the orchestrator's side: it announces itself by
//! DNS-SD over multicast DNS as an instance of `_drover._tcp.local.` so an
//! agent started without `--broker` finds it (see
//! [`drover_shared::discovery`] for the record, `drover_agent::discovery`
//! for the browser). The announcement is withdrawn with goodbye packets
//! (TTL 0) when the orchestrator shuts down.
//!
//! [`plan`] decides, without I/O, whether and what to announce; the
//! [`Advertiser`] does the multicast through `mdns-sd`, whose responder
//! runs on a thread of its own.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use drover_shared::discovery::{Advert, SERVICE_TYPE};
use tracing::{info, warn};

/// `drover serve --mdns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MdnsMode {
    /// Announce when the embedded broker listens on an address other
    /// machines can reach (not loopback).
    #[default]
    Auto,
    /// Always announce; an error where nothing could be reached.
    On,
    Off,
}

/// What the orchestrator announces and under which name.
#[derive(Debug, Clone)]
pub struct MdnsConfig {
    pub mode: MdnsMode,
    /// The DNS-SD instance name agents see and pick with
    /// `--discover-name`: stable, by default the host name.
    pub name: String,
    /// The host name for the SRV record (without `.local.`).
    pub host: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MdnsError {
    #[error("--mdns: the embedded broker listens on loopback only ({0}); nothing on the network could connect. Give --mqtt-listen 0.0.0.0:1883 (or --mqtts-listen) or drop --mdns")]
    LoopbackOnly(String),
    #[error(
        "--mdns announces the embedded broker; with --broker, point agents at that broker instead"
    )]
    ExternalBroker,
    #[error("--mdns-name {0:?}: must be 1 to 63 bytes of printable text")]
    Name(String),
    #[error("multicast DNS: {0}")]
    Daemon(String),
}

/// What to announce: the SRV port and address, and the TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub port: u16,
    /// `None`: every address of every interface (the broker listens on
    /// all of them); else only this one.
    pub addr: Option<IpAddr>,
    pub advert: Advert,
}

/// Where the orchestrator listens, as far as announcing goes.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    /// The embedded broker's plain listener; `None` with an external one.
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub api: SocketAddr,
    pub api_https: bool,
}

/// Whether and what to announce. Loopback listeners are nobody else's
/// business: a broker on 127.0.0.1 only (the default of tests and of a
/// laptop trying Drover out) announces nothing in `Auto`. TLS counts as
/// required where MQTTS is reachable and plain MQTT is not.
pub fn plan(
    mode: MdnsMode,
    l: &Listeners,
    host: &str,
    version: &str,
) -> Result<Option<Plan>, MdnsError> {
    if mode == MdnsMode::Off {
        return Ok(None);
    }
    let Some(mqtt) = l.mqtt else {
        return match mode {
            MdnsMode::On => Err(MdnsError::ExternalBroker),
            _ => Ok(None),
        };
    };
    let reachable = |a: &SocketAddr| !a.ip().is_loopback();
    let plain = Some(mqtt).filter(reachable);
    let tls = l.mqtts.filter(reachable);
    let Some(srv) = tls.or(plain) else {
        return match mode {
            MdnsMode::On => Err(MdnsError::LoopbackOnly(
                std::iter::once(mqtt)
                    .chain(l.mqtts)
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            _ => Ok(None),
        };
    };
    // Plain MQTT in the SRV record where there is plain MQTT: an agent
    // with no CA can use it; one with a CA reads the MQTTS port from TXT.
    let srv = plain.unwrap_or(srv);
    let api_url = reachable(&l.api).then(|| {
        let scheme = if l.api_https { "https" } else { "http" };
        let h = if l.api.ip().is_unspecified() {
            format!("{host}.local")
        } else {
            match l.api.ip() {
                IpAddr::V6(v6) => format!("[{v6}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{h}:{}", l.api.port())
    });
    Ok(Some(Plan {
        port: srv.port(),
        addr: Some(srv.ip()).filter(|ip| !ip.is_unspecified()),
        advert: Advert {
            mqtt_port: plain.map(|a| a.port()),
            mqtts_port: tls.map(|a| a.port()),
            tls_required: plain.is_none(),
            api_url,
            version: version.to_string(),
            protocol: drover_shared::PROTOCOL_VERSION,
        },
    }))
}

/// This machine's host name as a DNS label (what the SRV record points
/// at, `<label>.local.`), and the default instance name.
pub fn host_label() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_string();
    if label.is_empty() {
        "drover".to_string()
    } else {
        label
    }
}

/// Checks an instance name (`--mdns-name`): DNS-SD allows any UTF-8 up
/// to 63 bytes; control characters would only confuse logs.
pub fn check_name(name: &str) -> Result<(), MdnsError> {
    if name.is_empty() || name.len() > 63 || name.chars().any(char::is_control) {
        return Err(MdnsError::Name(name.to_string()));
    }
    Ok(())
}

/// A running announcement. [`Advertiser::stop`] withdraws it.
pub struct Advertiser {
    daemon: mdns_sd::ServiceDaemon,
    fullname: String,
}

impl Advertiser {
    pub fn start(config: &MdnsConfig, plan: &Plan) -> Result<Advertiser, MdnsError> {
        check_name(&config.name)?;
        let daemon = mdns_sd::ServiceDaemon::new().map_err(|e| MdnsError::Daemon(e.to_string()))?;
        let txt = plan.advert.to_txt();
        let txt: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let hostname = format!("{}.local.", config.host);
        let addrs: Vec<IpAddr> = plan.addr.into_iter().collect();
        let info = mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            &config.name,
            &hostname,
            &addrs[..],
            plan.port,
            &txt[..],
        )
        .map_err(|e| MdnsError::Daemon(e.to_string()))?;
        let info = if plan.addr.is_none() {
            info.enable_addr_auto()
        } else {
            info
        };
        let fullname = info.get_fullname().to_string();
        daemon
            .register(info)
            .map_err(|e| MdnsError::Daemon(e.to_string()))?;
        info!(
            name = %config.name,
            service = SERVICE_TYPE,
            port = plan.port,
            address = %plan.addr.map_or_else(|| "all interfaces".to_string(), |a| a.to_string()),
            tls_required = plan.advert.tls_required,
            "announcing this orchestrator by multicast DNS (--mdns=false turns it off)"
        );
        Ok(Advertiser { daemon, fullname })
    }

    /// Sends the goodbye packets and stops the responder.
    pub async fn stop(self) {
        match self.daemon.unregister(&self.fullname) {
            Ok(rx) => {
                if tokio::time::timeout(Duration::from_secs(2), rx.recv_async())
                    .await
                    .is_err()
                {
                    warn!("multicast DNS: the goodbye was not confirmed within 2 s");
                }
            }
            Err(e) => warn!(error = %e, "multicast DNS: cannot withdraw the announcement"),
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx.recv_async()).await;
        }
        info!("stopped announcing this orchestrator");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(mqtt: &str, mqtts: Option<&str>, api: &str) -> Listeners {
        Listeners {
            mqtt: Some(mqtt.parse().expect("addr")),
            mqtts: mqtts.map(|a| a.parse().expect("addr")),
            api: api.parse().expect("addr"),
            api_https: false,
        }
    }

    #[test]
    fn loopback_only_announces_nothing_unless_asked() {
        let local = l("127.0.0.1:1883", None, "127.0.0.1:8080");
        assert_eq!(plan(MdnsMode::Auto, &local, "h", "1").expect("ok"), None);
        assert!(matches!(
            plan(MdnsMode::On, &local, "h", "1"),
            Err(MdnsError::LoopbackOnly(_))
        ));
        let open = l("0.0.0.0:1883", None, "0.0.0.0:8080");
        assert_eq!(plan(MdnsMode::Off, &open, "h", "1").expect("ok"), None);
        let ext = Listeners { mqtt: None, ..open };
        assert_eq!(plan(MdnsMode::Auto, &ext, "h", "1").expect("ok"), None);
        assert!(matches!(
            plan(MdnsMode::On, &ext, "h", "1"),
            Err(MdnsError::ExternalBroker)
        ));
    }

    #[test]
    fn the_plan_names_ports_tls_and_api() {
        let p = plan(
            MdnsMode::Auto,
            &l("0.0.0.0:1883", Some("0.0.0.0:8883"), "0.0.0.0:8080"),
            "barn",
            "0.1.0",
        )
        .expect("ok")
        .expect("announced");
        assert_eq!((p.port, p.addr), (1883, None));
        assert_eq!(
            (
                p.advert.mqtt_port,
                p.advert.mqtts_port,
                p.advert.tls_required
            ),
            (Some(1883), Some(8883), false)
        );
        assert_eq!(p.advert.api_url.as_deref(), Some("http://barn.local:8080"));
        // Plain MQTT on loopback and MQTTS outside: TLS is required.
        let p = plan(
            MdnsMode::Auto,
            &l("127.0.0.1:1883", Some("10.9.0.1:8883"), "127.0.0.1:8080"),
            "barn",
            "0.1.0",
        )
        .expect("ok")
        .expect("announced");
        assert_eq!(
            (p.port, p.addr),
            (8883, Some("10.9.0.1".parse().expect("ip")))
        );
        assert!(p.advert.tls_required);
        assert_eq!(p.advert.mqtt_port, None);
        assert_eq!(p.advert.api_url, None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("barn orchestrator").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert!(check_name("a\nb").is_err());
        let h = host_label();
        assert!(!h.is_empty() && h.len() <= 63, "{h}");
    }
}
