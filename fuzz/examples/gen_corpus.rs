//! Writes the seed corpora: a few valid encodings of every payload, topics
//! of every kind, and some app specs and image references.
//!
//! Run from `fuzz/`:
//!     cargo run --example gen_corpus --no-default-features
//! Files are named after their content and are rewritten identically, so
//! re-running is harmless.

use std::collections::BTreeMap;
use std::path::Path;

use drover_shared::codec::encode;
use drover_shared::model::*;
use drover_shared::payload::*;
use drover_shared::topic::{TopicKind, Topics};
use drover_shared::{DeviceId, Name};

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

fn write(target: &str, label: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(format!("seed-{label}")), bytes).expect("write seed");
}

fn app(image: &str) -> AppSpec {
    AppSpec {
        name: name("web"),
        containers: vec![ContainerSpec {
            name: name("main"),
            image: image.into(),
            command: Some(vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()]),
            env: [("A".to_string(), "1".to_string())].into(),
            ports: vec![PortMapping { host: 8080, container: 80, protocol: Protocol::Udp, host_ip: Some("127.0.0.1".into()) }],
            volumes: vec![VolumeBind { source: "data".into(), target: "/data".into(), read_only: true }],
            restart: RestartPolicy::OnFailure,
            memory_mb: Some(64),
            cpus: Some(0.5),
            privileged: false,
            network_mode: Default::default(),
            cap_add: vec![],
            devices: vec![],
            host_mounts: vec![],
        }],
        labels: [("tier".to_string(), "edge".to_string())].into(),
    }
}

fn desired() -> DesiredState {
    DesiredState {
        generation: 7,
        apps: vec![
            DesiredApp { spec: app("127.0.0.1:5000/hello:1"), run: RunState::Running, started_at: 1 },
            DesiredApp {
                spec: AppSpec {
                    name: name("db"),
                    containers: vec![ContainerSpec {
                        name: name("pg"),
                        image: "postgres@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
                        command: None,
                        env: BTreeMap::new(),
                        ports: vec![],
                        volumes: vec![],
                        restart: RestartPolicy::default(),
                        memory_mb: None,
                        cpus: None,
                        privileged: false,
                        network_mode: Default::default(),
                        cap_add: vec![],
                        devices: vec![],
                        host_mounts: vec![],
                    }],
                    labels: BTreeMap::new(),
                },
                run: RunState::Stopped,
                started_at: 1,
            },
        ],
    }
}

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("hello", encode(&Hello {
            agent_version: "0.1.0".into(),
            hostname: "pi-01".into(),
            os: "Debian 12".into(),
            kernel: "6.1.0".into(),
            arch: "aarch64".into(),
            cpus: 4,
            memory_bytes: 1 << 30,
            disk_total_bytes: 32 << 30,
            disk_free_bytes: 8 << 30,
            docker_version: "27.0.1".into(),
            docker_error: None,
            images: vec!["busybox:1".into(), "127.0.0.1:5000/hello:1".into()],
            booted_at_ms: 1_700_000_000_000,
        })),
        ("hello-nodocker", encode(&Hello { docker_error: Some("connection refused".into()), ..Default::default() })),
        ("status-online", encode(&Status { online: true, at_ms: 1_700_000_000_000 })),
        ("status-will", encode(&Status { online: false, at_ms: 0 })),
        ("heartbeat", encode(&Heartbeat { at_ms: 5, seq: 1, uptime_s: 9, applied_generation: 7, interval_ms: 5_000 })),
        ("state", encode(&StateReport {
            at_ms: 6,
            observed: ObservedState {
                applied_generation: 7,
                desired_generation: 8,
                apps: vec![AppStatus {
                    name: name("web"),
                    phase: AppPhase::Retrying,
                    error: Some("connection refused".into()),
                    attempts: 3,
                    next_retry_at_ms: Some(10),
                    containers: vec![ContainerStatus {
                        name: name("main"),
                        image: "x:1".into(),
                        container_id: Some("0123456789ab".into()),
                        state: "exited".into(),
                        exit_code: Some(-1),
                        error: Some("oom".into()),
                    }],
                }],
                storage_error: None,
                docker_error: None,
            },
        })),
        ("state-empty", encode(&StateReport { at_ms: 0, observed: ObservedState::default() })),
        ("telemetry", encode(&Telemetry {
            at_ms: 7,
            host: HostMetrics { cpu_percent: 12.5, memory_total_bytes: 10, load_1: 0.25, load_5: 1e-3, load_15: 3.0, ..Default::default() },
            containers: vec![ContainerMetrics {
                app: name("web"),
                container: name("main"),
                cpu_percent: 1.5,
                memory_bytes: 3,
                memory_limit_bytes: Some(4),
            }],
        })),
        ("logs", encode(&LogBatch {
            app: name("web"),
            container: name("main"),
            lines: vec![
                LogLine { at_ms: 8, stream: LogStream::Stdout, line: "hello".into() },
                LogLine { at_ms: 9, stream: LogStream::Stderr, line: "boom \u{1F4A5}".into() },
            ],
            dropped: 2,
        })),
        ("desired", encode(&Desired { state: desired() })),
        ("desired-empty", encode(&Desired { state: DesiredState::default() })),
        ("cmd-apply", encode(&Command {
            id: "c1".into(),
            issued_at_ms: 1,
            action: Action::Apply { op: Op::Deploy, app: name("web"), desired: desired() },
        })),
        ("cmd-resync", encode(&Command { id: "c2".into(), issued_at_ms: 2, action: Action::Resync })),
        ("ack-progress", encode(&Ack {
            command_id: "c1".into(),
            at_ms: 3,
            phase: AckPhase::Progress,
            detail: "pulling".into(),
            progress: Some(Progress { step: "pulling".into(), container: name("main"), current_bytes: Some(1), total_bytes: Some(2) }),
        })),
        ("ack-failed", encode(&Ack { command_id: "c1".into(), at_ms: 4, phase: AckPhase::Failed, detail: "manifest unknown".into(), progress: None })),
        ("event", encode(&DeviceEvent {
            at_ms: 9,
            kind: EventKind::DriftRepaired,
            app: Some(name("web")),
            container: Some(name("main")),
            detail: "container was removed by hand; recreated".into(),
        })),
        ("event-bare", encode(&DeviceEvent { at_ms: 10, kind: EventKind::RestoredFromLocalState, app: None, container: None, detail: String::new() })),
    ]
}

fn main() {
    for (label, bytes) in payloads() {
        write("decode_payloads", label, &bytes);
        write("orchestrator_decode", label, &bytes);
    }

    let device = DeviceId::new("pi-01").expect("valid id");
    for root in ["drover", "site-a/fleet"] {
        let topics = Topics::new(root).expect("valid root");
        for kind in TopicKind::ALL {
            let topic = topics.device(&device, kind);
            let label = format!("{}-{kind}", root.replace('/', "_"));
            write("topic_parse", &label, topic.as_bytes());
            write("topic_parse", &format!("{label}-rooted"), format!("{root}\n{topic}").as_bytes());
        }
        write("topic_parse", &format!("{}-filter", root.replace('/', "_")), topics.all_devices(TopicKind::Status).as_bytes());
    }

    let full = serde_json::to_vec_pretty(&app("127.0.0.1:5000/demo/hello:1.2")).expect("json");
    write("app_spec", "spec-full", &full);
    write("app_spec", "spec-minimal", br#"{"name":"web","containers":[{"name":"main","image":"busybox"}]}"#);
    write("app_spec", "spec-digest", br#"{"name":"db","containers":[{"name":"pg","image":"postgres@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","restart":"always","ports":[{"host":5432,"container":5432}]}]}"#);
    write("app_spec", "spec-two", br#"{"name":"a","containers":[{"name":"x","image":"localhost:5000/a/b","cpus":1e-3,"memory_mb":1},{"name":"y","image":"a.b/C/d:t","host_mounts":[{"source":"/srv","target":"/srv"}]}],"labels":{"k":"v"}}"#);
    for (label, image) in [
        ("image-plain", "busybox"),
        ("image-tag", "busybox:1.36"),
        ("image-registry", "registry.example.com:5000/team/app:v2"),
        ("image-digest", "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
        ("image-both", "localhost/a:b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
    ] {
        write("app_spec", label, image.as_bytes());
    }
}
