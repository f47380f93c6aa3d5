//! TLS end to end: certificates made by the real `drover certs`, the
//! embedded broker's MQTTS listener checked with Debian's mosquitto
//! clients (OpenSSL, not our TLS stack), the real `drover-agent` deploying
//! over mqtts:// with a device certificate, and the REST API over HTTPS
//! through the real CLI.

use std::path::PathBuf;
use std::time::Duration;

use drover_broker::TlsListenerConfig;
use drover_tests::*;
use serde_json::{json, Value};

/// A fleet CA, a server certificate for localhost/127.0.0.1, and a second,
/// unrelated CA, all made with `drover certs` in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

async fn drover(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(binary("drover"))
        .args(args)
        .env_remove("DROVER_CA_CERT")
        .output()
        .await
        .expect("run drover")
}

async fn drover_ok(args: &[&str]) -> String {
    let out = drover(args).await;
    assert!(
        out.status.success(),
        "drover {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Pki {
    async fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let out = drover_ok(&["certs", "ca", "--out", &pki.s("ca")]).await;
        assert!(out.contains("ca-key.pem"), "{out}");
        drover_ok(&[
            "certs",
            "server",
            "--ca",
            &pki.s("ca"),
            "--name",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--out",
            &pki.s("server"),
        ])
        .await;
        drover_ok(&[
            "certs",
            "ca",
            "--name",
            "Someone else's CA",
            "--out",
            &pki.s("other-ca"),
        ])
        .await;
        pki
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// A client certificate for `device` from the CA in directory `ca`;
    /// returns its directory (client.pem, client-key.pem).
    async fn client(&self, ca: &str, device: &str) -> String {
        let out = format!("{ca}-{device}");
        drover_ok(&[
            "certs",
            "client",
            "--ca",
            &self.s(ca),
            "--device-id",
            device,
            "--out",
            &self.s(&out),
        ])
        .await;
        out
    }

    fn listener(&self, client_ca: bool) -> TlsListenerConfig {
        TlsListenerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: self.path("server/server.pem"),
            key: self.path("server/server-key.pem"),
            client_ca: client_ca.then(|| self.path("ca/ca.pem")),
        }
    }

    /// mosquitto client flags: trust `ca`, and present `client`'s certificate.
    fn tls_args(&self, ca: &str, client: Option<&str>) -> Vec<String> {
        let mut args = vec!["--cafile".to_string(), self.s(&format!("{ca}/ca.pem"))];
        if let Some(c) = client {
            args.extend([
                "--cert".to_string(),
                self.s(&format!("{c}/client.pem")),
                "--key".to_string(),
                self.s(&format!("{c}/client-key.pem")),
            ]);
        }
        args
    }
}

/// mosquitto client flags logging in as a fresh automation identity that may
/// use `tls-test/#` (the broker checks credentials on every listener).
async fn probe_login(api: &Api) -> Vec<String> {
    let name = unique("tlsprobe");
    let (s, v) = api
        .post(
            "/api/v1/mqtt-users",
            &json!({"name": name, "subscribe": ["tls-test/#"], "publish": ["tls-test/#"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    vec![
        "-u".to_string(),
        v["username"].as_str().expect("username").to_string(),
        "-P".to_string(),
        v["password"].as_str().expect("password").to_string(),
    ]
}

fn with_login(mut tls: Vec<String>, login: &[String]) -> Vec<String> {
    tls.extend(login.iter().cloned());
    tls
}

/// Publishes a retained QoS 1 message with `mosquitto_pub`; `Err` with its
/// stderr when it could not connect or publish.
async fn mosquitto_pub_tls(
    port: u16,
    tls: &[String],
    topic: &str,
    msg: &str,
) -> Result<(), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", "1", "-r", "-t", topic, "-m", msg])
            .args(tls)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub finished")
    .expect("mosquitto_pub is not installed; run `bash scripts/test-env.sh`");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The retained message on `topic` as `mosquitto_sub` reads it, or `None`
/// if it could not connect or nothing came within a few seconds.
async fn mosquitto_sub_retained(port: u16, tls: &[String], topic: &str) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", topic, "-C", "1", "-W", "5"])
            .args(tls)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_sub finished")
    .expect("mosquitto_sub is not installed; run `bash scripts/test-env.sh`");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_clients_must_trust_the_fleet_ca() {
    let pki = Pki::new().await;
    let orch = Orch::start_config(|c| c.mqtts = Some(pki.listener(false))).await;
    let port = orch.mqtts_addr.expect("MQTTS listener bound").port();
    let topic = format!("tls-test/{}", unique("ca"));
    let login = probe_login(&orch.api).await;
    let trusted = with_login(pki.tls_args("ca", None), &login);

    mosquitto_pub_tls(port, &trusted, &topic, "hello")
        .await
        .expect("a client trusting the fleet CA connects and publishes");
    assert_eq!(
        mosquitto_sub_retained(port, &trusted, &topic)
            .await
            .as_deref(),
        Some("hello")
    );

    // Without the fleet CA (the system's roots), with another CA, and
    // without TLS at all, nobody gets through.
    let os_roots = with_login(vec!["--tls-use-os-certs".to_string()], &login);
    let err = mosquitto_pub_tls(port, &os_roots, &topic, "system roots")
        .await
        .expect_err("the system's roots do not know the fleet CA");
    assert!(!err.is_empty());
    mosquitto_pub_tls(
        port,
        &with_login(pki.tls_args("other-ca", None), &login),
        &topic,
        "other ca",
    )
    .await
    .expect_err("another CA does not vouch for the server");
    mosquitto_pub_tls(port, &login, &topic, "plain")
        .await
        .expect_err("plain MQTT on the MQTTS port");
    assert_eq!(
        mosquitto_sub_retained(port, &os_roots, &topic).await,
        None,
        "a subscriber without the fleet CA read the topic"
    );
    assert_eq!(
        mosquitto_sub_retained(port, &trusted, &topic)
            .await
            .as_deref(),
        Some("hello"),
        "a refused client changed the retained message"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let pki = Pki::new().await;
    let good = pki.client("ca", &unique("dev")).await;
    let foreign = pki.client("other-ca", &unique("dev")).await;
    let orch = Orch::start_config(|c| c.mqtts = Some(pki.listener(true))).await;
    let port = orch.mqtts_addr.expect("MQTTS listener bound").port();
    let topic = format!("tls-test/{}", unique("mtls"));
    let login = probe_login(&orch.api).await;
    let with_cert = with_login(pki.tls_args("ca", Some(&good)), &login);

    mosquitto_pub_tls(port, &with_cert, &topic, "from a device")
        .await
        .expect("a client with a certificate from the client CA connects");
    assert_eq!(
        mosquitto_sub_retained(port, &with_cert, &topic)
            .await
            .as_deref(),
        Some("from a device")
    );

    let err = mosquitto_pub_tls(
        port,
        &with_login(pki.tls_args("ca", None), &login),
        &topic,
        "no cert",
    )
    .await
    .expect_err("a client without a certificate");
    assert!(!err.is_empty());
    mosquitto_pub_tls(
        port,
        &with_login(pki.tls_args("ca", Some(&foreign)), &login),
        &topic,
        "foreign cert",
    )
    .await
    .expect_err("a client with a certificate from another CA");
    assert_eq!(
        mosquitto_sub_retained(port, &with_login(pki.tls_args("ca", None), &login), &topic).await,
        None,
        "a subscriber without a certificate read the topic"
    );
    assert_eq!(
        mosquitto_sub_retained(port, &with_cert, &topic)
            .await
            .as_deref(),
        Some("from a device"),
        "a refused client changed the retained message"
    );
    orch.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_deploys_over_mqtts_with_its_device_certificate() {
    let docker = docker().await;
    let pki = Pki::new().await;
    let orch = Orch::start_config(|c| c.mqtts = Some(pki.listener(true))).await;
    let api = &orch.api;
    let url = format!(
        "mqtts://127.0.0.1:{}",
        orch.mqtts_addr.expect("MQTTS listener bound").port()
    );
    // Agents enroll over mqtts like over plain MQTT.
    register_enroller(&url, api);
    let agent_args = |ca: &str, client: &str| {
        vec![
            "--tls-ca".to_string(),
            pki.s(&format!("{ca}/ca.pem")),
            "--tls-cert".to_string(),
            pki.s(&format!("{client}/client.pem")),
            "--tls-key".to_string(),
            pki.s(&format!("{client}/client-key.pem")),
        ]
    };

    let id = unique("tls");
    let certs = pki.client("ca", &id).await;
    let args = agent_args("ca", &certs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::spawn_with(&url, &id, &args);
    // Trusts the broker, but its certificate comes from another CA.
    let intruder_id = unique("tls-intruder");
    let intruder_certs = pki.client("other-ca", &intruder_id).await;
    let intruder_args = agent_args("ca", &intruder_certs);
    let intruder_args: Vec<&str> = intruder_args.iter().map(String::as_str).collect();
    let intruder = Agent::spawn_with(&url, &intruder_id, &intruder_args);

    wait_for(
        Duration::from_secs(30),
        "the agent online over mqtts",
        || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true))
        },
    )
    .await;

    let image = fresh_image(&unique("tls")).await;
    let app = unique("tlsapp");
    api.create_app(&app, &image).await;
    let (status, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({ "app": app }),
        )
        .await;
    assert_eq!(status, 202, "deploy: {op}");
    let op = api.wait_op(&op, Duration::from_secs(90)).await;
    assert_eq!(op["status"], json!("succeeded"), "{op}");
    wait_converged(api, &docker, &agent.id, Duration::from_secs(60)).await;
    let running = device_containers(&docker, &agent.id).await;
    assert!(
        running.iter().any(|c| c.app == app && c.running),
        "{running:?}"
    );

    // All the while the intruder kept trying: the orchestrator never heard of it.
    assert!(
        api.device(&intruder.id).await.is_none(),
        "an agent with a foreign certificate reached the orchestrator"
    );

    // A valid certificate is bound to its device: another device id with
    // this device's certificate (and its own enrollment token) is refused.
    let violations = metric(api, "drover_broker_acl_violations_total").await;
    let swapper_id = unique("tls-swap");
    let swapper = Agent::spawn_with(&url, &swapper_id, &args);
    wait_for(
        Duration::from_secs(20),
        "the certificate swap refused",
        || async {
            (metric(api, "drover_broker_acl_violations_total").await > violations).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        api.device(&swapper.id).await.is_none(),
        "a device connected with another device's certificate"
    );
    assert!(!swapper.state_dir.path().join("credential").exists());
    drop(swapper);
    drop(intruder);
    drop(agent);
    orch.stop().await;
}

/// `drover serve` with every TLS flag, as an operator starts it.
async fn serve_with_tls(pki: &Pki, mqtts_port: u16) -> OrchProc {
    let mqtts = format!("127.0.0.1:{mqtts_port}");
    let (cert, key, ca) = (
        pki.s("server/server.pem"),
        pki.s("server/server-key.pem"),
        pki.s("ca/ca.pem"),
    );
    OrchProc::start_with(
        &[
            "--api-tls-cert",
            &cert,
            "--api-tls-key",
            &key,
            "--mqtts-listen",
            &mqtts,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        Some(&pki.path("ca/ca.pem")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_over_https_with_the_cli() {
    let pki = Pki::new().await;
    let mqtts_port = free_port();
    let orch = serve_with_tls(&pki, mqtts_port).await;
    let base = orch.api.base.clone();
    assert!(base.starts_with("https://"), "{base}");

    // The CLI trusts the API with --ca-cert, or DROVER_CA_CERT.
    let token = orch.api.token.clone().expect("admin token");
    let token_file = pki.path("admin.token");
    std::fs::write(&token_file, &token).expect("token file");
    let token_file = token_file.display().to_string();
    let out = drover_ok(&[
        "--api",
        &base,
        "--ca-cert",
        &pki.s("ca/ca.pem"),
        "--token-file",
        &token_file,
        "devices",
        "-o",
        "json",
    ])
    .await;
    let devices: Value = serde_json::from_str(&out).expect("json");
    assert!(devices.is_array(), "{devices}");
    let out = tokio::process::Command::new(binary("drover"))
        .args(["--api", &base, "apps"])
        .env("DROVER_CA_CERT", pki.path("ca/ca.pem"))
        .env("DROVER_TOKEN", &token)
        .output()
        .await
        .expect("run drover");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the CA, or trusting another one, the CLI refuses the server.
    let out = drover(&["--api", &base, "devices"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UnknownIssuer"), "{err}");
    let out = drover(&[
        "--api",
        &base,
        "--ca-cert",
        &pki.s("other-ca/ca.pem"),
        "devices",
    ])
    .await;
    assert!(!out.status.success());

    // Other clients: one without the CA, and plain HTTP on the HTTPS port.
    let healthz = format!("{base}/healthz");
    assert!(
        reqwest::get(&healthz).await.is_err(),
        "an HTTPS request trusting no CA succeeded"
    );
    let plain = healthz.replacen("https://", "http://", 1);
    let res = reqwest::Client::new()
        .get(&plain)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        res.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP on the HTTPS port: {res:?}"
    );
    let (status, _) = orch.api.get("/healthz").await;
    assert_eq!(status, 200, "HTTPS with the fleet CA");

    // The MQTTS flags reached the embedded broker: mutual TLS on the port.
    let device = pki.client("ca", &unique("dev")).await;
    let topic = format!("tls-test/{}", unique("serve"));
    let login = probe_login(&orch.api).await;
    mosquitto_pub_tls(
        mqtts_port,
        &with_login(pki.tls_args("ca", Some(&device)), &login),
        &topic,
        "hi",
    )
    .await
    .expect("a device certificate is accepted");
    mosquitto_pub_tls(
        mqtts_port,
        &with_login(pki.tls_args("ca", None), &login),
        &topic,
        "hi",
    )
    .await
    .expect_err("--tls-client-ca requires a client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_serve_before_it_listens() {
    let pki = Pki::new().await;
    let (cert, key) = (pki.s("server/server.pem"), pki.s("server/server-key.pem"));
    let missing = pki.s("nowhere/server.pem");
    let wrong_key = pki.s("other-ca/ca-key.pem");
    let cases: [(&[&str], &str); 5] = [
        (&["--mqtts-listen", "127.0.0.1:0"], "--tls-cert"),
        (
            &[
                "--mqtts-listen",
                "127.0.0.1:0",
                "--tls-cert",
                &missing,
                "--tls-key",
                &key,
            ],
            "cannot read certificate file",
        ),
        (
            &["--api-tls-cert", &cert, "--api-tls-key", &wrong_key],
            "not a usable server identity",
        ),
        (&["--api-tls-cert", &cert], "--api-tls-key"),
        (&["--broker", "mqtts://127.0.0.1:8883"], "--broker-ca"),
    ];
    for (args, expected) in cases {
        let data = tempfile::tempdir().expect("tempdir");
        let api = format!("127.0.0.1:{}", free_port());
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(binary("drover"))
                .args([
                    "serve",
                    "--api-listen",
                    &api,
                    "--mqtt-listen",
                    "127.0.0.1:0",
                ])
                .arg("--data-dir")
                .arg(data.path())
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("drover serve {args:?} kept running"))
        .expect("run drover serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stdout.contains("REST API on"), "{args:?} served: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_and_agent_use_an_external_mqtts_broker() {
    let docker = docker().await;
    let pki = Pki::new().await;
    // Mosquitto (OpenSSL) as the external broker, requiring client
    // certificates. `drover certs` makes keys and directories readable by
    // their owner only; started as root, Mosquitto would switch to its own
    // user and could not read them (as any other user, `user` is ignored).
    let mosquitto = Mosquitto::start_with(&format!(
        "user root\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true",
        pki.s("ca/ca.pem"),
        pki.s("server/server.pem"),
        pki.s("server/server-key.pem"),
    ))
    .await;
    let orch_certs = pki.client("ca", "drover-orchestrator").await;
    let broker_tls = drover_agent::tls::client_config(&drover_agent::tls::ClientTlsFiles {
        ca: pki.path("ca/ca.pem"),
        identity: Some((
            pki.path(&format!("{orch_certs}/client.pem")),
            pki.path(&format!("{orch_certs}/client-key.pem")),
        )),
    })
    .expect("orchestrator's client TLS");
    let orch = Orch::start_config(|c| {
        c.broker = drover::server::BrokerMode::External {
            host: "127.0.0.1".into(),
            port: mosquitto.port,
        };
        c.broker_tls = Some(broker_tls);
    })
    .await;
    let api = &orch.api;

    let id = unique("tls-ext");
    let certs = pki.client("ca", &id).await;
    let (ca, cert, key) = (
        pki.s("ca/ca.pem"),
        pki.s(&format!("{certs}/client.pem")),
        pki.s(&format!("{certs}/client-key.pem")),
    );
    let url = format!("mqtts://127.0.0.1:{}", mosquitto.port);
    let agent = Agent::spawn_with(
        &url,
        &id,
        &["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key],
    );
    wait_for(
        Duration::from_secs(30),
        "the agent online through Mosquitto over TLS",
        || async {
            api.device(&agent.id)
                .await
                .filter(|d| d["online"] == json!(true))
        },
    )
    .await;

    let image = fresh_image(&unique("tls-ext")).await;
    let app = unique("tlsext");
    api.create_app(&app, &image).await;
    let (status, op) = api
        .post(
            &format!("/api/v1/devices/{}/apps", agent.id),
            &json!({ "app": app }),
        )
        .await;
    assert_eq!(status, 202, "deploy: {op}");
    let op = api.wait_op(&op, Duration::from_secs(90)).await;
    assert_eq!(op["status"], json!("succeeded"), "{op}");
    wait_converged(api, &docker, &agent.id, Duration::from_secs(60)).await;

    // The broker really is TLS-only with client certificates.
    let topic = format!("tls-test/{}", unique("ext"));
    mosquitto_pub_tls(mosquitto.port, &pki.tls_args("ca", None), &topic, "x")
        .await
        .expect_err("Mosquitto requires a client certificate");
    drop(agent);
    orch.stop().await;
}
