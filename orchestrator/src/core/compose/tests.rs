use super::*;

fn field(yaml: &str) -> (String, String) {
    let e = import(yaml, Some("app")).expect_err("refused");
    (e.field, e.message)
}

const TWO: &str = r#"
name: shop
x-common: &common
  restart: always
services:
  db:
    image: postgres:16
    environment:
      POSTGRES_PASSWORD: secret
      POSTGRES_DB: shop
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 10s
      timeout: 5s
      retries: 5
      start_period: 1m30s
    deploy:
      resources:
        limits:
          cpus: "0.5"
          memory: 512M
  web:
    <<: *common
    image: registry.example.com/shop/web:1.2
    command: ./serve --port "80" --name 'my shop'
    environment:
      - DATABASE_URL=postgres://db/shop
      - EMPTY=
    ports:
      - "8080:80"
      - "127.0.0.1:9090:90/udp"
      - target: 443
        published: 8443
    volumes:
      - /etc/ssl/certs:/certs:ro
    depends_on:
      db:
        condition: service_healthy
volumes:
  pgdata:
"#;

#[test]
fn a_realistic_two_service_file() {
    let spec = import(TWO, None).expect("imports");
    assert_eq!(spec.name.as_str(), "shop");
    let db = &spec.containers[0];
    assert_eq!(db.name.as_str(), "db");
    assert_eq!(db.image, "postgres:16");
    assert_eq!(db.env["POSTGRES_DB"], "shop");
    assert_eq!(
        db.volumes,
        vec![VolumeBind {
            source: "pgdata".into(),
            target: "/var/lib/postgresql/data".into(),
            read_only: false
        }]
    );
    let hc = db.healthcheck.as_ref().expect("healthcheck");
    assert_eq!(hc.test, ["CMD-SHELL", "pg_isready -U postgres"]);
    assert_eq!(hc.interval_ms, Some(10_000));
    assert_eq!(hc.timeout_ms, Some(5_000));
    assert_eq!(hc.retries, Some(5));
    assert_eq!(hc.start_period_ms, Some(90_000));
    assert_eq!(db.cpus, Some(0.5));
    assert_eq!(db.memory_mb, Some(512));
    assert_eq!(db.restart, RestartPolicy::UnlessStopped);

    let web = &spec.containers[1];
    assert_eq!(
        web.restart,
        RestartPolicy::Always,
        "merge key from an x- anchor"
    );
    assert_eq!(
        web.command.as_deref().expect("command"),
        ["./serve", "--port", "80", "--name", "my shop"]
    );
    assert_eq!(web.env["DATABASE_URL"], "postgres://db/shop");
    assert_eq!(web.env["EMPTY"], "");
    assert_eq!(web.ports.len(), 3);
    assert_eq!((web.ports[0].host, web.ports[0].container), (8080, 80));
    assert_eq!(web.ports[1].host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(web.ports[1].protocol, Protocol::Udp);
    assert_eq!((web.ports[2].host, web.ports[2].container), (8443, 443));
    assert_eq!(
        web.host_mounts,
        vec![HostMount {
            source: "/etc/ssl/certs".into(),
            target: "/certs".into(),
            read_only: true
        }]
    );
    assert_eq!(web.depends_on, vec![Name::new("db").expect("name")]);
}

#[test]
fn the_name_parameter_wins_and_one_is_required() {
    let spec = import(TWO, Some("other")).expect("imports");
    assert_eq!(spec.name.as_str(), "other");
    let e = import("services: {a: {image: x}}", None).expect_err("no name");
    assert_eq!(e.field, "name");
    let e = import("services: {a: {image: x}}", Some("Bad Name!")).expect_err("bad");
    assert_eq!(e.field, "name");
}

#[test]
fn each_supported_key() {
    let spec = import(
        r#"
services:
  s:
    image: busybox
    command: [sh, -c, "echo hi"]
    restart: "no"
    mem_limit: 1g
    cpus: 2
    privileged: true
    cap_add: [CAP_NET_ADMIN, SYS_TIME]
    devices: ["/dev/ttyUSB0:/dev/serial:rw", "/dev/i2c-1"]
    network_mode: host
    labels: {}
    healthcheck:
      disable: true
    depends_on: [t]
    x-ignored: {anything: [1, 2]}
  t:
    image: busybox
    restart: on-failure
    network_mode: bridge
    ports: ["7000-7001:8000-8001"]
    volumes:
      - type: volume
        source: v
        target: /v
        read_only: true
      - type: bind
        source: /srv
        target: /srv
  u:
    image: busybox
    network_mode: none
volumes:
  v: {}
"#,
        Some("a"),
    )
    .expect("imports");
    let s = &spec.containers[0];
    assert_eq!(s.command.as_deref().expect("cmd"), ["sh", "-c", "echo hi"]);
    assert_eq!(s.restart, RestartPolicy::No);
    assert_eq!(s.memory_mb, Some(1024));
    assert_eq!(s.cpus, Some(2.0));
    assert!(s.privileged);
    assert_eq!(s.cap_add, ["NET_ADMIN", "SYS_TIME"]);
    assert_eq!(s.devices[0].container.as_deref(), Some("/dev/serial"));
    assert_eq!(s.devices[0].permissions.as_deref(), Some("rw"));
    assert_eq!(s.devices[1].host, "/dev/i2c-1");
    assert_eq!(s.network_mode, NetworkMode::Host);
    assert_eq!(s.healthcheck.as_ref().expect("hc").test, ["NONE"]);
    let t = &spec.containers[1];
    assert_eq!(t.restart, RestartPolicy::OnFailure);
    assert_eq!(t.network_mode, NetworkMode::Bridge);
    assert_eq!(spec.containers[2].network_mode, NetworkMode::None);
    assert_eq!(t.ports.len(), 2);
    assert_eq!((t.ports[1].host, t.ports[1].container), (7001, 8001));
    assert!(t.volumes[0].read_only);
    assert_eq!(t.host_mounts[0].source, "/srv");
}

#[test]
fn durations() {
    assert_eq!(duration_ms("1m30s"), Ok(90_000));
    assert_eq!(duration_ms("500ms"), Ok(500));
    assert_eq!(duration_ms("1h"), Ok(3_600_000));
    assert_eq!(duration_ms("1.5s"), Ok(1_500));
    assert!(duration_ms("10").is_err());
    assert!(duration_ms("").is_err());
    assert!(duration_ms("5 parsecs").is_err());
}

#[test]
fn shell_splitting() {
    assert_eq!(
        shell_words(r#"a "b c" 'd e' f\ g "h\"i""#).expect("ok"),
        ["a", "b c", "d e", "f g", "h\"i"]
    );
    assert!(shell_words("'open").is_err());
    let (f, _) = field("services: {s: {image: x, command: \"echo 'open\"}}");
    assert_eq!(f, "services.s.command");
}

#[test]
fn each_refused_key_is_named_by_its_path() {
    let cases = [
        ("services: {s: {build: .}}", "services.s.build"),
        ("services: {s: {image: x, secrets: [a]}}", "services.s.secrets"),
        ("services: {s: {image: x}}\nnetworks: {n: {}}", "networks"),
        ("services: {s: {image: x}}\nsecrets: {}", "secrets"),
        ("services: {s: {image: x}}\nconfigs: {}", "configs"),
        ("services: {s: {image: x, entrypoint: [sh]}}", "services.s.entrypoint"),
        ("services: {s: {image: x, networks: [n]}}", "services.s.networks"),
        ("services: {s: {image: x, user: root}}", "services.s.user"),
        (
            "services: {s: {image: x, deploy: {replicas: 2}}}",
            "services.s.deploy.replicas",
        ),
        (
            "services: {s: {image: x, deploy: {resources: {reservations: {}}}}}",
            "services.s.deploy.resources.reservations",
        ),
        (
            "services: {s: {image: x, deploy: {resources: {limits: {pids: 5}}}}}",
            "services.s.deploy.resources.limits.pids",
        ),
        (
            "services: {s: {image: x, healthcheck: {test: [CMD, x], start_interval: 1s}}}",
            "services.s.healthcheck.start_interval",
        ),
        (
            "services: {s: {image: x, depends_on: {t: {condition: service_started, restart: true}}}}",
            "services.s.depends_on.t.restart",
        ),
        (
            "services: {s: {image: x, ports: [{target: 1, published: 2, name: web}]}}",
            "services.s.ports[0].name",
        ),
        (
            "services: {s: {image: x, volumes: [{type: bind, source: /a, target: /b, bind: {}}]}}",
            "services.s.volumes[0].bind",
        ),
        ("services: {s: {image: x}}\nvolumes: {v: {driver: nfs}}", "volumes.v.driver"),
        ("services: {s: {image: x, labels: {a: b}}}", "services.s.labels"),
    ];
    for (yaml, path) in cases {
        let (f, m) = field(yaml);
        assert_eq!(f, path, "{yaml}: {m}");
    }
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("services: {s: {}}", "services.s.image"),
        ("services: {\"bad name\": {image: x}}", "services.bad name"),
        ("services: {s: {image: x, depends_on: {t: {required: false}}}, t: {image: x}}", "services.s.depends_on.t.required"),
        ("services: {s: {image: x, mem_limit: 12q}}", "services.s.mem_limit"),
        ("services: {s: {image: x, environment: [KEY]}}", "services.s.environment[0]"),
        ("services: {s: {image: x, environment: {KEY: }}}", "services.s.environment.KEY"),
        ("services: {s: {image: x, ports: [\"80\"]}}", "services.s.ports[0]"),
        ("services: {s: {image: x, ports: [\"1:2/sctp\"]}}", "services.s.ports[0]"),
        ("services: {s: {image: x, volumes: [\"./data:/data\"]}}", "services.s.volumes[0]"),
        ("services: {s: {image: x, volumes: [\"undeclared:/data\"]}}", "services.s.volumes[0]"),
        ("services: {s: {image: x, restart: sometimes}}", "services.s.restart"),
        ("services: {s: {image: x, network_mode: \"service:t\"}}", "services.s.network_mode"),
        ("services: {s: {image: x, healthcheck: {test: [CMD, x], interval: 10}}}", "services.s.healthcheck.interval"),
        ("services: {s: {image: x, depends_on: {t: {condition: service_completed_successfully}}}}", "services.s.depends_on.t.condition"),
        ("services: {s: {image: x, mem_limit: lots}}", "services.s.mem_limit"),
        ("services: {}", "services"),
        ("name: a", "services"),
    ];
    for (yaml, path) in cases {
        let (f, m) = field(yaml);
        assert_eq!(f, path, "{yaml}: {m}");
    }
}

#[test]
fn the_model_validation_runs_with_paths() {
    // cap_add goes through AppSpec::validate, which names the container.
    let (f, m) = field("services: {s: {image: x, cap_add: [NOT_A_CAP]}}");
    assert!(f.contains("cap_add"), "{f}: {m}");
    // depends_on a service that is not there.
    let (f, m) = field("services: {s: {image: x, depends_on: [nope]}}");
    assert!(f.contains("depends_on"), "{f}: {m}");
}

#[test]
fn malformed_yaml_gives_line_and_column() {
    let (f, m) = field("services:\n  s:\n    image: [x\n");
    assert_eq!(f, "");
    assert!(m.contains("line"), "{m}");
    assert!(m.contains("column"), "{m}");
    let (_, m) = field("- just\n- a list\n");
    assert!(m.contains("mapping"), "{m}");
}

#[test]
fn input_size_is_limited() {
    let big = format!(
        "services: {{s: {{image: x}}}}\n#{}\n",
        "a".repeat(MAX_COMPOSE_BYTES)
    );
    let (f, m) = field(&big);
    assert_eq!(f, "");
    assert!(m.contains("at most"), "{m}");
}

#[test]
fn a_yaml_bomb_is_refused_not_expanded() {
    let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        y.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    y.push_str("services: {s: {image: x, command: *a11}}\n");
    let started = std::time::Instant::now();
    let (f, m) = field(&y);
    assert_eq!(f, "");
    assert!(m.contains("not valid YAML"), "{m}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn deep_nesting_is_refused() {
    let y = format!("services: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (f, m) = field(&y);
    assert_eq!(f, "");
    assert!(m.contains("not valid YAML"), "{m}");
}

#[test]
fn sizes() {
    let mb = |s: &str| memory_mb(&Value::String(s.into()), "m");
    assert_eq!(mb("512m"), Ok(512));
    assert_eq!(mb("512M"), Ok(512));
    assert_eq!(mb("1g"), Ok(1024));
    assert_eq!(mb("1.5gb"), Ok(1536));
    assert_eq!(mb("2048k"), Ok(2));
    assert_eq!(mb("1048576"), Ok(1));
    assert_eq!(mb("1048577b"), Ok(2), "rounded up");
    assert!(mb("lots").is_err());
    assert!(mb("1t").is_err());
    assert!(mb("").is_err());
    assert_eq!(memory_mb(&Value::Number(2_097_152.into()), "m"), Ok(2));
}

#[test]
fn service_labels_are_refused_with_the_reason() {
    let (f, m) = field("services: {s: {image: x, labels: [a=b]}}");
    assert_eq!(f, "services.s.labels");
    assert!(m.contains("container labels"), "{m}");
    let spec = import("services: {s: {image: x, labels: []}}", Some("a")).expect("empty is fine");
    assert!(spec.labels.is_empty());
}

#[test]
fn errors_of_the_model_name_the_service_and_its_compose_key() {
    let cases = [
        (
            "services: {s: {image: x}, t: {image: x, environment: {\"A=B\": c}}}",
            "services.t.environment.A=B",
        ),
        ("services: {s: {image: \"has space\"}}", "services.s.image"),
        (
            "services: {s: {image: x, mem_limit: 1k}}",
            "services.s.mem_limit",
        ),
        (
            "services: {s: {image: x, ports: [\"80:80\"]}, t: {image: x, ports: [\"80:81\"]}}",
            "services.t.ports",
        ),
        (
            "services: {s: {image: x, volumes: [\"/a:/data\", \"v:/data\"]}}\nvolumes: {v: }",
            "services.s.volumes",
        ),
        (
            "services: {s: {image: x, cap_add: [NOPE]}}",
            "services.s.cap_add[0]",
        ),
        (
            "services: {s: {image: x, depends_on: [s]}}",
            "services.s.depends_on[0]",
        ),
    ];
    for (yaml, path) in cases {
        let (f, m) = field(yaml);
        assert_eq!(f, path, "{yaml}: {m}");
        assert!(!m.contains("containers["), "{yaml}: {m}");
    }
    // The message of a clash names the other service in the same terms.
    let (_, m) =
        field("services: {s: {image: x, ports: [\"80:80\"]}, t: {image: x, ports: [\"80:81\"]}}");
    assert!(m.contains("services.s"), "{m}");
}

#[test]
fn yaml_features_compose_files_use() {
    // Anchors, aliases, merge keys (also a list of them), `---`, comments.
    let spec = import(
        r#"---
x-env: &env
  A: "1"
x-base: &base
  image: busybox
  restart: always
x-limits: &limits
  mem_limit: 64m
services:
  s:
    <<: [*base, *limits]
    environment: *env
  t:
    <<: *base
    restart: "no" # the service's own key wins over the merged one
"#,
        Some("a"),
    )
    .expect("imports");
    let (s, t) = (&spec.containers[0], &spec.containers[1]);
    assert_eq!(s.restart, RestartPolicy::Always);
    assert_eq!(s.memory_mb, Some(64));
    assert_eq!(s.env["A"], "1");
    assert_eq!(t.restart, RestartPolicy::No);
}

#[test]
fn yaml_that_compose_would_read_differently_is_refused() {
    // Duplicate keys: which one wins is not something to guess.
    let (f, m) = field("services:\n  s:\n    image: x\n    image: y\n");
    assert_eq!(f, "");
    assert!(m.contains("duplicate key") && m.contains("line"), "{m}");
    // Compose's `!reset` / `!override` tags change how files merge.
    let (f, m) = field("services:\n  s:\n    image: x\n    ports: !reset []\n");
    assert_eq!(f, "");
    assert!(m.contains("!reset"), "{m}");
    // Two documents in one stream.
    let (_, m) = field("services: {s: {image: x}}\n---\nservices: {t: {image: x}}\n");
    assert!(m.contains("not valid YAML"), "{m}");
    // Nothing at all.
    let (_, m) = field("");
    assert!(m.contains("mapping"), "{m}");
}

/// An anchor of N items aliased N times: serde_yaml_ng's own limit
/// counts alias jumps (at most 100 per event of the file), which this
/// stays under, so unchecked it would build N² values — about 4 million
/// from this 10 KB, and 6 GB of memory from 40 KB. The budget stops it
/// after `MAX_NODES`, quickly.
#[test]
fn a_quadratic_alias_blowup_is_refused_within_the_budget() {
    let n = 2000;
    let mut y = String::from("x-a: &a [");
    y.push_str(&"x,".repeat(n));
    y.push_str("x]\nx-b: [");
    y.push_str(&"*a,".repeat(n));
    y.push_str("*a]\nservices: {s: {image: x}}\n");
    assert!(y.len() < 12_000);
    let started = std::time::Instant::now();
    let (f, m) = field(&y);
    assert_eq!(f, "");
    assert!(m.contains("once its aliases are expanded"), "{m}");
    // Debug build, shared machine: generous, but far below the seconds
    // (and gigabytes) the full expansion takes.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The same with one long string instead of many items.
    let mut y = format!("x-a: &a \"{}\"\nx-b: [", "y".repeat(100_000));
    y.push_str(&"*a,".repeat(60));
    y.push_str("*a]\nservices: {s: {image: x}}\n");
    let (_, m) = field(&y);
    assert!(m.contains("once its aliases are expanded"), "{m}");

    // A file that uses aliases within reason imports.
    let mut y = String::from("x-a: &a [");
    y.push_str(&"x,".repeat(100));
    y.push_str("x]\nx-b: [");
    y.push_str(&"*a,".repeat(100));
    y.push_str("*a]\nservices: {s: {image: x}}\n");
    import(&y, Some("a")).expect("10,000 values are fine");
}
