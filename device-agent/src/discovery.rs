//! Zero-touch discovery: with no broker address, the agent browses the
//! local network by DNS-SD over multicast DNS for Drover orchestrators
//! (`_drover._tcp.local.`, see [`drover_shared::discovery`]) and connects
//! to the one that answers.
//!
//! Discovery is unauthenticated: anyone on the link can answer. It only
//! finds an address. What protects the device is what it already had: the
//! enrollment token goes only to a broker that then proves itself with
//! the CA pin (`--tls-ca`, MQTTS) where TLS is used, and the device's
//! credential is never sent anywhere but to the broker it enrolled with.
//! Where several orchestrators answer, the agent does not guess.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use drover_shared::discovery::{Advert, SERVICE_TYPE};
use tracing::{info, warn};

/// One orchestrator that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The DNS-SD instance name (the orchestrator's `--mdns-name`).
    pub instance: String,
    /// Its addresses, as announced.
    pub addrs: Vec<IpAddr>,
    /// The SRV port.
    pub port: u16,
    pub advert: Advert,
}

/// Where to connect after discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub instance: String,
    pub addr: IpAddr,
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("several Drover orchestrators answered ({}); refusing to guess: pick one with --discover-name NAME, or give --broker", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("orchestrator {0:?} requires MQTT over TLS: give --tls-ca FILE (the CA that signed its certificate)")]
    NeedsCa(String),
    #[error("--tls-ca is given but orchestrator {0:?} offers no MQTTS port; refusing to connect without TLS")]
    NoTls(String),
    #[error("orchestrator {0:?} announced no address this agent can use")]
    NoAddress(String),
    #[error("multicast DNS: {0}")]
    Mdns(String),
}

/// What the answers seen so far allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Exactly one orchestrator (after the name filter).
    One(Found),
    /// None yet: keep looking.
    Nothing,
}

/// Picks the orchestrator from everything that answered: the one whose
/// instance name is `name` (case-insensitive, as DNS names are), else the
/// only one. Several different ones are an error naming them all.
pub fn choose(found: &[Found], name: Option<&str>) -> Result<Choice, DiscoveryError> {
    let mut matching: BTreeMap<String, &Found> = BTreeMap::new();
    for f in found {
        if name.is_none_or(|n| f.instance.eq_ignore_ascii_case(n)) {
            matching.entry(f.instance.to_ascii_lowercase()).or_insert(f);
        }
    }
    match matching.len() {
        0 => Ok(Choice::Nothing),
        1 => {
            Ok(Choice::One(
                matching.into_values().next().cloned().ok_or_else(|| {
                    DiscoveryError::Mdns("internal: an entry vanished".to_string())
                })?,
            ))
        }
        _ => Err(DiscoveryError::Ambiguous(
            matching.values().map(|f| f.instance.clone()).collect(),
        )),
    }
}

/// The address, port and scheme to use for `found`: MQTTS when the agent
/// has a CA to check it with (and the orchestrator offers it), plain MQTT
/// otherwise. Never a silent downgrade: a CA with no MQTTS on offer is an
/// error, and so is an orchestrator that requires TLS when there is no CA.
pub fn endpoint(found: &Found, have_ca: bool) -> Result<Endpoint, DiscoveryError> {
    let a = &found.advert;
    let (port, tls) = match (have_ca, a.mqtts_port, a.mqtt_port) {
        (true, Some(p), _) => (p, true),
        (true, None, _) => return Err(DiscoveryError::NoTls(found.instance.clone())),
        (false, _, _) if a.tls_required => {
            return Err(DiscoveryError::NeedsCa(found.instance.clone()))
        }
        (false, _, Some(p)) => (p, false),
        (false, _, None) => return Err(DiscoveryError::NeedsCa(found.instance.clone())),
    };
    // IPv4 first, then global IPv6; a link-local IPv6 address needs a
    // scope the broker URL cannot carry.
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_loopback(),
        IpAddr::V6(v6) => {
            !v6.is_unspecified() && !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    };
    let mut addrs: Vec<IpAddr> = found.addrs.iter().copied().filter(usable).collect();
    addrs.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    let addr = addrs
        .first()
        .copied()
        .ok_or_else(|| DiscoveryError::NoAddress(found.instance.clone()))?;
    Ok(Endpoint {
        instance: found.instance.clone(),
        addr,
        port,
        tls,
    })
}

/// How the agent browses.
#[derive(Debug, Clone)]
pub struct Browse {
    /// Only the orchestrator of this instance name (`--discover-name`).
    pub name: Option<String>,
    /// How long to collect answers before choosing; with none, the agent
    /// keeps browsing and says so once per window.
    pub window: Duration,
    /// Whether the agent has `--tls-ca`.
    pub have_ca: bool,
}

/// Browses until exactly one orchestrator (matching the name filter)
/// has answered in a window, and returns where to connect.
pub async fn discover(opts: &Browse) -> Result<Endpoint, DiscoveryError> {
    let daemon = mdns_sd::ServiceDaemon::new().map_err(|e| DiscoveryError::Mdns(e.to_string()))?;
    let result = browse(&daemon, opts).await;
    if let Ok(rx) = daemon.shutdown() {
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await;
    }
    result
}

async fn browse(
    daemon: &mdns_sd::ServiceDaemon,
    opts: &Browse,
) -> Result<Endpoint, DiscoveryError> {
    let rx = daemon
        .browse(SERVICE_TYPE)
        .map_err(|e| DiscoveryError::Mdns(e.to_string()))?;
    info!(service = SERVICE_TYPE, name = ?opts.name, "no --broker: looking for a Drover orchestrator on the local network");
    let mut seen: BTreeMap<String, Found> = BTreeMap::new();
    let started = tokio::time::Instant::now();
    let mut deadline = started + opts.window;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv_async()).await {
            Ok(Ok(mdns_sd::ServiceEvent::ServiceResolved(svc))) => {
                if let Some(f) = found_from(&svc) {
                    seen.insert(svc.get_fullname().to_string(), f);
                }
            }
            Ok(Ok(mdns_sd::ServiceEvent::ServiceRemoved(_, fullname))) => {
                seen.remove(&fullname);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(DiscoveryError::Mdns(e.to_string())),
            Err(_) => {
                let all: Vec<Found> = seen.values().cloned().collect();
                match choose(&all, opts.name.as_deref())? {
                    Choice::One(f) => {
                        let ep = endpoint(&f, opts.have_ca)?;
                        info!(
                            orchestrator = %ep.instance,
                            address = %ep.addr,
                            port = ep.port,
                            tls = ep.tls,
                            version = %f.advert.version,
                            api = f.advert.api_url.as_deref().unwrap_or("-"),
                            "found Drover orchestrator {:?} at {}:{}",
                            ep.instance,
                            ep.addr,
                            ep.port
                        );
                        return Ok(ep);
                    }
                    Choice::Nothing => {
                        let others: Vec<&str> = all.iter().map(|f| f.instance.as_str()).collect();
                        info!(
                            waited_secs = started.elapsed().as_secs(),
                            other_orchestrators = ?others,
                            "no Drover orchestrator{} has answered yet; still looking (give --broker mqtt://HOST:PORT to skip discovery)",
                            opts.name.as_deref().map(|n| format!(" named {n:?}")).unwrap_or_default()
                        );
                        deadline += opts.window.max(Duration::from_secs(5));
                    }
                }
            }
        }
    }
}

fn found_from(svc: &mdns_sd::ResolvedService) -> Option<Found> {
    let instance = svc
        .get_fullname()
        .strip_suffix(SERVICE_TYPE)
        .map(|s| s.trim_end_matches('.'))
        .unwrap_or(svc.get_fullname())
        .to_string();
    let props = svc.get_properties();
    let advert = match Advert::from_txt(props.iter().map(|p| (p.key(), p.val_str()))) {
        Ok(a) => a,
        Err(e) => {
            warn!(orchestrator = %instance, error = %e, "ignoring an announcement with an unreadable TXT record");
            return None;
        }
    };
    if advert.protocol != drover_shared::PROTOCOL_VERSION {
        warn!(orchestrator = %instance, protocol = advert.protocol, supported = drover_shared::PROTOCOL_VERSION, "ignoring an orchestrator that speaks another protocol version");
        return None;
    }
    Some(Found {
        instance,
        addrs: svc.get_addresses().iter().map(|a| a.to_ip_addr()).collect(),
        port: svc.get_port(),
        advert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, addrs: &[&str]) -> Found {
        Found {
            instance: name.into(),
            addrs: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
            port: 1883,
            advert: Advert {
                mqtt_port: Some(1883),
                mqtts_port: None,
                tls_required: false,
                api_url: None,
                version: "0.1.0".into(),
                protocol: drover_shared::PROTOCOL_VERSION,
            },
        }
    }

    #[test]
    fn one_answer_is_chosen_none_waits_several_refuse() {
        assert_eq!(choose(&[], None), Ok(Choice::Nothing));
        let a = found("barn", &["10.1.0.1"]);
        assert_eq!(
            choose(std::slice::from_ref(&a), None),
            Ok(Choice::One(a.clone()))
        );
        // The same orchestrator twice (two interfaces) is still one.
        let a2 = found("Barn", &["10.2.0.1"]);
        assert!(matches!(choose(&[a.clone(), a2], None), Ok(Choice::One(_))));
        let b = found("field", &["10.1.0.2"]);
        assert_eq!(
            choose(&[b.clone(), a.clone()], None),
            Err(DiscoveryError::Ambiguous(vec![
                "barn".into(),
                "field".into()
            ]))
        );
        let msg = choose(&[a.clone(), b.clone()], None)
            .expect_err("ambiguous")
            .to_string();
        assert!(
            msg.contains("barn") && msg.contains("field") && msg.contains("--discover-name"),
            "{msg}"
        );
        // The name filter picks one, case-insensitively, or waits.
        assert_eq!(
            choose(&[a.clone(), b.clone()], Some("FIELD")),
            Ok(Choice::One(b.clone()))
        );
        assert_eq!(choose(&[a, b], Some("shed")), Ok(Choice::Nothing));
    }

    #[test]
    fn the_endpoint_never_downgrades_tls() {
        let mut f = found("barn", &["fe80::1", "10.1.0.1", "2001:db8::1", "127.0.0.1"]);
        let ep = endpoint(&f, false).expect("plain");
        assert_eq!(
            (ep.addr, ep.port, ep.tls),
            ("10.1.0.1".parse().expect("ip"), 1883, false)
        );
        assert_eq!(
            endpoint(&f, true),
            Err(DiscoveryError::NoTls("barn".into()))
        );
        f.advert.mqtts_port = Some(8883);
        let ep = endpoint(&f, true).expect("tls");
        assert_eq!((ep.port, ep.tls), (8883, true));
        f.advert.tls_required = true;
        f.advert.mqtt_port = None;
        assert_eq!(
            endpoint(&f, false),
            Err(DiscoveryError::NeedsCa("barn".into()))
        );
        f.addrs = vec!["2001:db8::1".parse().expect("ip")];
        assert_eq!(
            endpoint(&f, true).expect("v6").addr,
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        f.addrs = vec!["fe80::1".parse().expect("ip")];
        assert_eq!(
            endpoint(&f, true),
            Err(DiscoveryError::NoAddress("barn".into()))
        );
    }
}
