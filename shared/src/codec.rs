//! The wire encoding: CBOR, wrapped in an envelope that carries the protocol
//! version. Decoding checks size first, version second, shape last, so a
//! peer speaking another version gets a precise error instead of a
//! confusing field mismatch.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::topic::TopicKind;

pub const PROTOCOL_VERSION: u16 = 1;

/// The largest payload either side accepts. MQTT brokers and clients must be
/// configured to allow at least this much (rumqttc defaults to 10 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// The largest MQTT packet the agents and the embedded broker take: a
/// payload of [`MAX_PAYLOAD_BYTES`] with room for the topic and headers.
/// A sender must not send a larger one: the receiver closes the connection.
pub const MAX_PACKET_BYTES: usize = MAX_PAYLOAD_BYTES + 4 * 1024;

/// A payload type bound to its topic kind.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: TopicKind;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("protocol version {got} is not supported (this side speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("malformed {kind} payload: {reason}")]
    Malformed { kind: TopicKind, reason: String },
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u16,
    m: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[allow(dead_code)]
    v: u16,
    m: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u16,
}

/// Encodes a message with the current protocol version.
pub fn encode<T: Message>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail, and every payload type serialises
    // without error (no maps with non-string keys, no untagged floats).
    if let Err(e) = ciborium::into_writer(
        &EnvelopeRef {
            v: PROTOCOL_VERSION,
            m: msg,
        },
        &mut out,
    ) {
        unreachable!("CBOR encoding into memory failed: {e}");
    }
    out
}

/// Decodes a message, checking size, protocol version and shape.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    let malformed = |e: String| DecodeError::Malformed {
        kind: T::KIND,
        reason: e,
    };
    let probe: VersionOnly = ciborium::from_reader(bytes).map_err(|e| malformed(e.to_string()))?;
    if probe.v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: probe.v,
            supported: PROTOCOL_VERSION,
        });
    }
    let env: Envelope<T> = ciborium::from_reader(bytes).map_err(|e| malformed(e.to_string()))?;
    Ok(env.m)
}

/// Encodes any serialisable value with an arbitrary version; for tests that
/// must produce payloads a correct peer never would.
pub fn encode_with_version<T: Serialize>(version: u16, msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = ciborium::into_writer(&EnvelopeRef { v: version, m: msg }, &mut out) {
        unreachable!("CBOR encoding into memory failed: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Name;
    use crate::model::*;
    use crate::payload::*;

    fn name(s: &str) -> Name {
        Name::new(s).expect("valid name")
    }

    fn app() -> AppSpec {
        AppSpec {
            name: name("web"),
            containers: vec![ContainerSpec {
                name: name("main"),
                image: "127.0.0.1:5000/hello:1".into(),
                command: Some(vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()]),
                env: [("A".to_string(), "1".to_string())].into(),
                ports: vec![PortMapping {
                    host: 8080,
                    container: 80,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                }],
                volumes: vec![VolumeBind {
                    source: "data".into(),
                    target: "/data".into(),
                    read_only: false,
                }],
                restart: RestartPolicy::Always,
                memory_mb: Some(64),
                cpus: Some(0.5),
                privileged: false,
                network_mode: Default::default(),
                cap_add: vec![],
                devices: vec![],
                host_mounts: vec![],
                healthcheck: Some(HealthCheck {
                    test: vec!["CMD-SHELL".into(), "true".into()],
                    interval_ms: Some(1000),
                    timeout_ms: None,
                    retries: Some(2),
                    start_period_ms: None,
                }),
                depends_on: vec![name("db")],
            }],
            labels: Default::default(),
        }
    }

    fn round_trip<T: Message + PartialEq + std::fmt::Debug>(m: T) {
        let bytes = encode(&m);
        assert_eq!(decode::<T>(&bytes).expect("decodes"), m);
    }

    #[test]
    fn every_payload_round_trips() {
        let desired = DesiredState {
            generation: 7,
            apps: vec![DesiredApp {
                spec: app(),
                run: RunState::Paused,
                started_at: 7,
                release: 4,
                restarted_at: 6,
            }],
            agent: None,
        };
        round_trip(Command {
            id: "c1".into(),
            issued_at_ms: 1,
            action: Action::Apply {
                op: Op::Deploy,
                app: name("web"),
                desired: desired.clone(),
            },
        });
        round_trip(Command {
            id: "c2".into(),
            issued_at_ms: 2,
            action: Action::Resync,
        });
        round_trip(Desired { state: desired });
        round_trip(Ack {
            command_id: "c1".into(),
            at_ms: 3,
            phase: AckPhase::Progress,
            detail: "pulling".into(),
            progress: Some(Progress {
                step: "pulling".into(),
                container: name("main"),
                current_bytes: Some(1),
                total_bytes: Some(2),
            }),
        });
        round_trip(Status {
            online: true,
            at_ms: 4,
        });
        round_trip(Heartbeat {
            at_ms: 5,
            seq: 1,
            uptime_s: 9,
            applied_generation: 7,
            interval_ms: 5_000,
        });
        round_trip(StateReport {
            at_ms: 6,
            observed: ObservedState {
                applied_generation: 7,
                desired_generation: 7,
                apps: vec![AppStatus {
                    name: name("web"),
                    phase: AppPhase::Retrying,
                    error: Some("connection refused".into()),
                    attempts: 3,
                    next_retry_at_ms: Some(10),
                    containers: vec![ContainerStatus {
                        name: name("main"),
                        image: "x:1".into(),
                        container_id: None,
                        state: "absent".into(),
                        exit_code: None,
                        error: None,
                        health: Some(Health::Unhealthy),
                        restarts: 2,
                    }],
                    release: 4,
                }],
                storage_error: Some("cannot write desired.cbor: read-only file system".into()),
                docker_error: Some("docker is not reachable: connection refused".into()),
                agent_update: None,
            },
        });
        round_trip(Telemetry {
            at_ms: 7,
            host: HostMetrics {
                cpu_percent: 12.5,
                memory_total_bytes: 10,
                ..Default::default()
            },
            containers: vec![ContainerMetrics {
                app: name("web"),
                container: name("main"),
                cpu_percent: 1.5,
                memory_bytes: 3,
                memory_limit_bytes: Some(4),
            }],
        });
        round_trip(LogBatch {
            app: name("web"),
            container: name("main"),
            lines: vec![LogLine {
                at_ms: 8,
                stream: LogStream::Stderr,
                line: "boom".into(),
            }],
            dropped: 2,
        });
        round_trip(DeviceEvent {
            at_ms: 9,
            kind: EventKind::DriftRepaired,
            app: Some(name("web")),
            container: Some(name("main")),
            detail: "container was removed by hand; recreated".into(),
        });
        round_trip(Hello {
            agent_version: "0.1.0".into(),
            images: vec!["a:1".into()],
            ..Default::default()
        });
        round_trip(Hello {
            arch: "arm".into(),
            platform: Some(crate::Platform::new("linux", "arm", Some("v6"))),
            ..Default::default()
        });
    }

    /// A hello from an agent older than the `platform` field decodes, and
    /// its platform is told from `arch` where that is unambiguous.
    #[test]
    fn older_hellos_decode_without_a_platform() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct OldHello {
            agent_version: String,
            hostname: String,
            os: String,
            kernel: String,
            arch: String,
            cpus: u32,
            memory_bytes: u64,
            disk_total_bytes: u64,
            disk_free_bytes: u64,
            docker_version: String,
            images: Vec<String>,
            booted_at_ms: u64,
        }
        impl Message for OldHello {
            const KIND: TopicKind = TopicKind::Hello;
        }
        let old = |arch: &str| OldHello {
            agent_version: "0.0.9".into(),
            hostname: "pi".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            arch: arch.into(),
            cpus: 4,
            memory_bytes: 1,
            disk_total_bytes: 2,
            disk_free_bytes: 1,
            docker_version: "26".into(),
            images: vec![],
            booted_at_ms: 0,
        };
        let hello: Hello = decode(&encode(&old("aarch64"))).expect("decodes");
        assert_eq!(hello.platform, None);
        assert_eq!(
            hello.effective_platform().map(|p| p.to_string()).as_deref(),
            Some("linux/arm64")
        );
        let hello: Hello = decode(&encode(&old("arm"))).expect("decodes");
        assert_eq!(
            hello.effective_platform(),
            None,
            "arm without a variant is unknown"
        );
    }

    #[test]
    fn other_versions_are_rejected() {
        let bytes = encode_with_version(
            2,
            &Status {
                online: true,
                at_ms: 1,
            },
        );
        assert_eq!(
            decode::<Status>(&bytes),
            Err(DecodeError::UnsupportedVersion {
                got: 2,
                supported: PROTOCOL_VERSION
            })
        );
    }

    #[test]
    fn garbage_truncated_and_wrong_type_are_malformed() {
        assert!(matches!(
            decode::<Status>(b"not cbor at all"),
            Err(DecodeError::Malformed { .. })
        ));
        let bytes = encode(&Heartbeat {
            at_ms: 5,
            seq: 1,
            uptime_s: 9,
            applied_generation: 7,
            interval_ms: 5_000,
        });
        assert!(matches!(
            decode::<Heartbeat>(&bytes[..bytes.len() - 3]),
            Err(DecodeError::Malformed { .. })
        ));
        // A heartbeat is not a command.
        assert!(matches!(
            decode::<Command>(&bytes),
            Err(DecodeError::Malformed {
                kind: TopicKind::Cmd,
                ..
            })
        ));
        assert!(matches!(
            decode::<Status>(&[]),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn oversized_is_rejected_before_parsing() {
        let big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            decode::<Status>(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn invalid_ids_inside_payloads_are_rejected() {
        #[derive(Serialize)]
        struct BadLogs<'a> {
            app: &'a str,
            container: &'a str,
            lines: Vec<LogLine>,
        }
        let bytes = encode_with_version(
            PROTOCOL_VERSION,
            &BadLogs {
                app: "a/b",
                container: "c",
                lines: vec![],
            },
        );
        assert!(matches!(
            decode::<LogBatch>(&bytes),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
