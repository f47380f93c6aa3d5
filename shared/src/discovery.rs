//! Zero-touch discovery: what an orchestrator announces by DNS-SD over
//! multicast DNS (RFC 6762/6763), and how an agent reads it. Names and
//! record keys only; the orchestrator and the agent do the network part.
//!
//! An orchestrator is one service instance of [`SERVICE_TYPE`]; its SRV
//! record carries the MQTT port agents should use (the MQTTS one when TLS
//! is required), its TXT record the [`Advert`].

use std::collections::BTreeMap;

/// The DNS-SD service type, with the `local.` domain.
pub const SERVICE_TYPE: &str = "_drover._tcp.local.";

/// Version of the TXT record's layout (RFC 6763 §6.7).
pub const TXT_VERSION: &str = "1";

const K_TXTVERS: &str = "txtvers";
const K_PROTOCOL: &str = "proto";
const K_VERSION: &str = "version";
const K_MQTT: &str = "mqtt";
const K_MQTTS: &str = "mqtts";
const K_TLS: &str = "tls";
const K_API: &str = "api";

/// What an orchestrator announces about itself in its TXT record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The plain MQTT port, when it is reachable from the network.
    pub mqtt_port: Option<u16>,
    /// The MQTT-over-TLS port, when there is one.
    pub mqtts_port: Option<u16>,
    /// Only MQTTS is offered to the network.
    pub tls_required: bool,
    /// Base URL of the REST API, when it is reachable from the network.
    pub api_url: Option<String>,
    /// The orchestrator's release.
    pub version: String,
    /// The device protocol it speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    #[error("TXT record has no {0:?} key")]
    Missing(&'static str),
    #[error("TXT key {key:?} has an invalid value {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("TXT record version {0:?} is not supported (this agent reads {TXT_VERSION})")]
    TxtVersion(String),
    #[error("the record offers no MQTT port")]
    NoPort,
}

impl Advert {
    /// The TXT record's key/value pairs, each far below DNS-SD's 255 bytes.
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mut txt = vec![
            (K_TXTVERS.to_string(), TXT_VERSION.to_string()),
            (K_PROTOCOL.to_string(), self.protocol.to_string()),
            (K_VERSION.to_string(), self.version.clone()),
            (
                K_TLS.to_string(),
                if self.tls_required {
                    "required"
                } else if self.mqtts_port.is_some() {
                    "optional"
                } else {
                    "none"
                }
                .to_string(),
            ),
        ];
        if let Some(p) = self.mqtt_port {
            txt.push((K_MQTT.to_string(), p.to_string()));
        }
        if let Some(p) = self.mqtts_port {
            txt.push((K_MQTTS.to_string(), p.to_string()));
        }
        if let Some(u) = &self.api_url {
            txt.push((K_API.to_string(), u.clone()));
        }
        txt
    }

    /// Reads a TXT record (keys are case-insensitive, RFC 6763 §6.4).
    /// Unknown keys are ignored so later orchestrators can add some.
    pub fn from_txt<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Advert, AdvertError> {
        let txt: BTreeMap<String, &str> = pairs
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let get = |k: &'static str| txt.get(k).copied();
        let need = |k: &'static str| get(k).ok_or(AdvertError::Missing(k));
        let port = |k: &'static str| -> Result<Option<u16>, AdvertError> {
            get(k)
                .map(|v| match v.parse::<u16>() {
                    Ok(p) if p != 0 => Ok(p),
                    _ => Err(AdvertError::Invalid {
                        key: k,
                        value: v.to_string(),
                    }),
                })
                .transpose()
        };
        let vers = need(K_TXTVERS)?;
        if vers != TXT_VERSION {
            return Err(AdvertError::TxtVersion(vers.to_string()));
        }
        let protocol = need(K_PROTOCOL)?;
        let protocol = protocol.parse().map_err(|_| AdvertError::Invalid {
            key: K_PROTOCOL,
            value: protocol.to_string(),
        })?;
        let tls_required = match need(K_TLS)? {
            "required" => true,
            "optional" | "none" => false,
            other => {
                return Err(AdvertError::Invalid {
                    key: K_TLS,
                    value: other.to_string(),
                })
            }
        };
        let advert = Advert {
            mqtt_port: port(K_MQTT)?,
            mqtts_port: port(K_MQTTS)?,
            tls_required,
            api_url: get(K_API).map(str::to_string),
            version: get(K_VERSION).unwrap_or_default().to_string(),
            protocol,
        };
        if tls_required && advert.mqtts_port.is_none() {
            return Err(AdvertError::Missing(K_MQTTS));
        }
        if advert.mqtt_port.is_none() && advert.mqtts_port.is_none() {
            return Err(AdvertError::NoPort);
        }
        Ok(advert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert() -> Advert {
        Advert {
            mqtt_port: Some(1883),
            mqtts_port: Some(8883),
            tls_required: false,
            api_url: Some("http://10.0.0.5:8080".into()),
            version: "0.1.0".into(),
            protocol: crate::PROTOCOL_VERSION,
        }
    }

    fn round_trip(a: &Advert) -> Result<Advert, AdvertError> {
        let txt = a.to_txt();
        Advert::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    #[test]
    fn the_txt_record_round_trips() {
        let a = advert();
        assert_eq!(round_trip(&a), Ok(a.clone()));
        let tls_only = Advert {
            mqtt_port: None,
            tls_required: true,
            api_url: None,
            ..a
        };
        assert_eq!(round_trip(&tls_only), Ok(tls_only.clone()));
        for (k, v) in tls_only.to_txt() {
            assert!(k.len() + v.len() < 255, "{k}={v}");
        }
    }

    #[test]
    fn bad_records_are_refused_by_name() {
        let bad = |pairs: &[(&str, &str)]| Advert::from_txt(pairs.iter().copied());
        assert_eq!(
            bad(&[("proto", "1"), ("tls", "none"), ("mqtt", "1")]),
            Err(AdvertError::Missing("txtvers"))
        );
        assert!(matches!(
            bad(&[("txtvers", "9"), ("proto", "1"), ("tls", "none")]),
            Err(AdvertError::TxtVersion(_))
        ));
        assert!(matches!(
            bad(&[
                ("txtvers", "1"),
                ("proto", "1"),
                ("tls", "none"),
                ("mqtt", "0")
            ]),
            Err(AdvertError::Invalid { key: "mqtt", .. })
        ));
        assert_eq!(
            bad(&[("txtvers", "1"), ("proto", "1"), ("tls", "none")]),
            Err(AdvertError::NoPort)
        );
        assert_eq!(
            bad(&[
                ("txtvers", "1"),
                ("proto", "1"),
                ("tls", "required"),
                ("mqtt", "1883")
            ]),
            Err(AdvertError::Missing("mqtts"))
        );
        // Keys are case-insensitive; unknown ones are ignored.
        let a = bad(&[
            ("TXTVERS", "1"),
            ("Proto", "1"),
            ("tls", "none"),
            ("mqtt", "1883"),
            ("future", "x"),
        ])
        .expect("valid");
        assert_eq!(a.mqtt_port, Some(1883));
    }
}
