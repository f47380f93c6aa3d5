//! The CLI: every subcommand but `serve` is a thin client of the REST API.
//! Human-readable tables by default, `-o json` for scripts.

pub mod certs;
mod follow;
pub mod jobs;
mod logs;
pub mod rollouts;
pub mod rules;
pub mod security;
pub mod trust;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use drover_shared::model::{
    AppSpec, ContainerSpec, DeviceMapping, HostMount, NetworkMode, PortMapping, Protocol,
    RestartPolicy, VolumeBind,
};
use drover_shared::Name;
use serde_json::Value;

use crate::contract::{
    App as AppView, CredentialState, Device as DeviceView, ErrorBody, OpStatus, Operation,
    Registry as RegistryView,
};

/// Where `registries set` takes the password from when not from stdin.
const PASSWORD_ENV: &str = "DROVER_REGISTRY_PASSWORD";

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// List devices (the default).
    List,
    /// Show one device: inventory, desired and observed state, telemetry.
    Show { id: String },
    /// Revoke a device's credential: it is disconnected and cannot
    /// reconnect until re-enrolled with a token made for it.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AppsCmd {
    /// List apps.
    List,
    /// Show one app's spec.
    Show { name: String },
    /// Create an app: one container from flags, or a full spec with -f.
    Create(Box<CreateApp>),
    /// Replace an app's spec (same flags as create); deploy again to roll it out.
    Update(Box<CreateApp>),
    /// Create an app from a Compose file. Keys Drover does not support are
    /// refused by name, never ignored.
    Import(ImportApp),
    /// Delete an app that is deployed nowhere.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct CreateApp {
    /// App name (omit with -f; the file names the app).
    pub name: Option<String>,
    /// Full app spec as JSON (`-` for standard input).
    #[arg(short = 'f', long, conflicts_with_all = ["image", "name"])]
    pub file: Option<String>,
    /// Image reference, e.g. 127.0.0.1:5000/drover/busybox:1.
    #[arg(long)]
    pub image: Option<String>,
    /// Container name inside the app.
    #[arg(long, default_value = "main")]
    pub container: String,
    /// Command overriding the image's, e.g. --cmd /bin/sh -c 'echo hi'.
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub cmd: Option<Vec<String>>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Port mapping HOST:CONTAINER[/udp] (repeatable).
    #[arg(long = "port", short = 'p')]
    pub ports: Vec<String>,
    /// Named volume NAME:TARGET[:ro] (repeatable); host paths go in --mount.
    #[arg(long = "volume", short = 'v')]
    pub volumes: Vec<String>,
    /// Host path bind mount SOURCE:TARGET[:ro] (repeatable).
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    /// Host device HOST[:CONTAINER[:PERMISSIONS]], e.g. /dev/ttyUSB0 (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Linux capability to add, e.g. NET_ADMIN (repeatable).
    #[arg(long = "cap-add")]
    pub cap_add: Vec<String>,
    /// Network: bridge (default), host or none.
    #[arg(long, default_value = "bridge")]
    pub network: String,
    /// Run the container privileged (every capability, every host device).
    #[arg(long)]
    pub privileged: bool,
    /// Restart policy: no, unless-stopped, always, on-failure.
    #[arg(long, default_value = "unless-stopped")]
    pub restart: String,
    #[arg(long)]
    pub memory_mb: Option<u64>,
    #[arg(long)]
    pub cpus: Option<f64>,
}

#[derive(Debug, Args)]
pub struct ImportApp {
    /// The Compose file (`-` for standard input).
    #[arg(short = 'f', long)]
    pub file: String,
    /// The app's name; without it, the file's top-level `name:`.
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the spec of an existing app of that name; deploy again to
    /// roll it out.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct Target {
    /// The app.
    pub app: String,
    /// The device.
    #[arg(long, short = 'd')]
    pub device: String,
    /// Wait until the device reports a final outcome.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum OpsCmd {
    /// Recent operations, newest first.
    List {
        #[arg(long, short = 'd')]
        device: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One operation.
    Show { id: String },
}

/// `drover logs DEVICE APP`, or `drover logs APP --device DEVICE`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The device (the app, when --device names the device).
    #[arg(value_name = "DEVICE")]
    pub first: String,
    /// The app.
    #[arg(value_name = "APP")]
    pub app: Option<String>,
    /// The device, when not named first.
    #[arg(long, short = 'd')]
    pub device: Option<String>,
    /// Only this container of the app.
    #[arg(long, short = 'c')]
    pub container: Option<String>,
    /// How many of the newest lines to print first (at most 10000).
    #[arg(long, default_value_t = 100)]
    pub tail: usize,
    /// Then keep printing new lines as they arrive, until Ctrl-C;
    /// reconnects when the orchestrator restarts.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum RegistriesCmd {
    /// Registries with stored credentials (passwords are never shown).
    List,
    /// One registry's stored username.
    Show { host: String },
    /// Store credentials for a registry host, e.g. 127.0.0.1:5001. The
    /// password comes from standard input (--password-stdin) or from
    /// DROVER_REGISTRY_PASSWORD, never from the command line.
    Set {
        host: String,
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password from standard input (one line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a registry's credentials.
    Delete { host: String },
}

#[derive(Debug, Subcommand)]
pub enum AgentReleasesCmd {
    /// Uploaded agent binaries, by version and architecture.
    List,
    /// Upload an agent binary (a Linux ELF executable) under a version.
    Upload {
        file: String,
        #[arg(long)]
        version: String,
    },
    /// Delete an agent binary by its digest (refused while in use).
    Delete { digest: String },
}

#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// Devices and their state (default: list).
    Devices {
        /// Only devices whose labels match this selector, e.g.
        /// `env=prod,region in (eu,us),!canary`.
        #[arg(long, short = 'l')]
        selector: Option<String>,
        #[command(subcommand)]
        cmd: Option<DevicesCmd>,
    },
    /// Set or remove a device's operator-set labels, kubectl style:
    /// `drover label pi-1 env=prod site=a canary-` (`k-` removes k).
    Label {
        device: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// An app's releases, oldest first.
    Releases { app: String },
    /// Put an app on every device matching a selector, and keep it so.
    Assign {
        app: String,
        /// e.g. `env=prod,region in (eu,us)`; empty: every device.
        #[arg(long, short = 'l')]
        selector: String,
        /// The release to run (default: the latest).
        #[arg(long)]
        release: Option<u64>,
        /// Keep the app stopped instead of running.
        #[arg(long)]
        stopped: bool,
    },
    /// Delete an app's assignment (the app leaves the devices it put it on).
    Unassign { app: String },
    /// Show an app's assignment and the devices it covers.
    Assignment { app: String },
    /// Move an app's devices to a release batch by batch, health-gated,
    /// with automatic rollback (default: list).
    Rollouts {
        #[command(subcommand)]
        cmd: Option<crate::cli::rollouts::RolloutsCmd>,
    },
    /// Edge jobs: a container run to completion on the devices a
    /// selector matches, each device's exit code and output collected
    /// (default: list).
    Jobs {
        #[command(subcommand)]
        cmd: Option<crate::cli::jobs::JobsCmd>,
    },
    /// Rules that act on their own: triggers, conditions, actions
    /// (default: list).
    Rules {
        #[command(subcommand)]
        cmd: Option<crate::cli::rules::RulesCmd>,
    },
    /// App definitions (default: list).
    Apps {
        #[command(subcommand)]
        cmd: Option<AppsCmd>,
    },
    /// Deploy an app to a device.
    Deploy(Target),
    /// Start a deployed app.
    Start(Target),
    /// Stop a deployed app (its containers stay).
    Stop(Target),
    /// Pause a deployed app: its processes are frozen, their memory kept.
    Pause(Target),
    /// Thaw a paused app.
    Unpause(Target),
    /// Restart a running app's containers (`docker restart`; they are kept).
    Restart(Target),
    /// Remove an app from a device.
    Remove(Target),
    /// Follow what deploy/start/stop/remove did (default: list).
    Ops {
        #[command(subcommand)]
        cmd: Option<OpsCmd>,
    },
    /// Recent log lines of an app's containers on a device.
    Logs(LogsArgs),
    /// Tokens agents present once to enroll.
    EnrollTokens {
        #[command(subcommand)]
        cmd: crate::cli::security::EnrollTokensCmd,
    },
    /// REST API tokens and their roles.
    Tokens {
        #[command(subcommand)]
        cmd: crate::cli::security::TokensCmd,
    },
    /// Broker identities for automation (Node-RED, scripts, …).
    MqttUsers {
        #[command(subcommand)]
        cmd: crate::cli::security::MqttUsersCmd,
    },
    /// Who changed what, when, and how it ended (admin).
    Audit(crate::cli::security::AuditArgs),
    /// Private registry credentials (default: list).
    Registries {
        #[command(subcommand)]
        cmd: Option<RegistriesCmd>,
    },
    /// Agent binaries that rollouts put on devices (default: list).
    AgentReleases {
        #[command(subcommand)]
        cmd: Option<AgentReleasesCmd>,
    },
}

/// A client command with the default subcommands filled in.
enum Resolved {
    Devices(DevicesCmd),
    Apps(AppsCmd),
    Ops(OpsCmd),
    Deploy(Target),
    Start(Target),
    Stop(Target),
    Pause(Target),
    Unpause(Target),
    Restart(Target),
    Remove(Target),
    Logs(LogsArgs),
    Registries(RegistriesCmd),
}

#[derive(Clone)]
pub struct Client {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) output: Output,
}

impl Client {
    /// `token` goes into every request as `Authorization: Bearer`; `ca`: a
    /// PEM file of CA certificates to trust for an https:// API.
    pub fn new(
        base: &str,
        output: Output,
        token: Option<&str>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--api must be an http:// or https:// URL, got {base:?}");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .context("the API token contains characters not allowed in a header")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = trust::http_client(ca)?
            .timeout(Duration::from_secs(30))
            .default_headers(headers)
            .build()?;
        Ok(Client { base, http, output })
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        Ok(self.send_status(req).await?.1)
    }

    /// As [`Client::send`], with the status of a success.
    pub(crate) async fn send_status(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Drover API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            if let Ok(e) = serde_json::from_str::<ErrorBody>(&text) {
                bail!("{} ({})", e.error.message, status);
            }
            bail!("{status}: {text}");
        }
        if text.is_empty() {
            return Ok((status, Value::Null));
        }
        Ok((status, serde_json::from_str(&text)?))
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// `drover label DEVICE k=v k2-`: one PATCH with every change.
    async fn label(&self, device: &str, changes: &[String]) -> Result<()> {
        let body = label_body(changes)?;
        let v = self
            .send(
                self.http
                    .patch(format!("{}/api/v1/devices/{device}/labels", self.base))
                    .json(&body),
            )
            .await?;
        self.print(&v, |d: crate::contract::Device| {
            let text = d
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            format!("device {} labels: {text}\n", d.id)
        })
    }

    pub(crate) fn print<T: serde::de::DeserializeOwned>(
        &self,
        v: &Value,
        table: impl FnOnce(T) -> String,
    ) -> Result<()> {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
            Output::Table => print!("{}", table(serde_json::from_value(v.clone())?)),
        }
        Ok(())
    }

    pub async fn run(&self, cmd: ClientCmd) -> Result<()> {
        let cmd = match cmd {
            ClientCmd::Devices {
                selector: Some(sel),
                cmd: None | Some(DevicesCmd::List),
            } => {
                let v = self
                    .send(
                        self.http
                            .get(format!("{}/api/v1/devices", self.base))
                            .query(&[("selector", sel)]),
                    )
                    .await?;
                return self.print(&v, devices_table);
            }
            ClientCmd::Devices {
                selector: Some(_), ..
            } => {
                bail!("--selector applies to listing devices only")
            }
            ClientCmd::Devices { cmd, .. } => Resolved::Devices(cmd.unwrap_or(DevicesCmd::List)),
            ClientCmd::Releases { app } => {
                let v = self.get(&format!("/api/v1/apps/{app}/releases")).await?;
                return self.print(&v, |rs: Vec<crate::contract::Release>| {
                    let mut out = String::from("RELEASE  CREATED_AT_MS  AUTHOR\n");
                    for r in rs {
                        out.push_str(&format!(
                            "{:<8} {:<14} {}\n",
                            r.number, r.created_at_ms, r.author
                        ));
                    }
                    out
                });
            }
            ClientCmd::Assign {
                app,
                selector,
                release,
                stopped,
            } => {
                let body = serde_json::json!({
                    "selector": selector,
                    "release": release.unwrap_or(0),
                    "run": if stopped { "stopped" } else { "running" },
                });
                let v = self
                    .send(
                        self.http
                            .put(format!("{}/api/v1/apps/{app}/assignment", self.base))
                            .json(&body),
                    )
                    .await?;
                return self.print(&v, assignment_text);
            }
            ClientCmd::Unassign { app } => {
                self.delete(&format!("/api/v1/apps/{app}/assignment"))
                    .await?;
                if self.output == Output::Table {
                    println!("deleted the assignment of {app}");
                }
                return Ok(());
            }
            ClientCmd::Assignment { app } => {
                let v = self.get(&format!("/api/v1/apps/{app}/assignment")).await?;
                return self.print(&v, assignment_text);
            }
            ClientCmd::Label { device, changes } => return self.label(&device, &changes).await,
            ClientCmd::Rollouts { cmd } => {
                return self
                    .rollouts(cmd.unwrap_or(rollouts::RolloutsCmd::List { app: None }))
                    .await
            }
            ClientCmd::Jobs { cmd } => return self.jobs(cmd.unwrap_or(jobs::JobsCmd::List)).await,
            ClientCmd::Rules { cmd } => {
                return self.rules(cmd.unwrap_or(rules::RulesCmd::List)).await
            }
            ClientCmd::Apps { cmd } => Resolved::Apps(cmd.unwrap_or(AppsCmd::List)),
            ClientCmd::Ops { cmd } => Resolved::Ops(cmd.unwrap_or(OpsCmd::List {
                device: None,
                limit: 20,
            })),
            ClientCmd::Deploy(t) => Resolved::Deploy(t),
            ClientCmd::Start(t) => Resolved::Start(t),
            ClientCmd::Stop(t) => Resolved::Stop(t),
            ClientCmd::Pause(t) => Resolved::Pause(t),
            ClientCmd::Unpause(t) => Resolved::Unpause(t),
            ClientCmd::Restart(t) => Resolved::Restart(t),
            ClientCmd::Remove(t) => Resolved::Remove(t),
            ClientCmd::Logs(l) => Resolved::Logs(l),
            ClientCmd::Registries { cmd } => {
                Resolved::Registries(cmd.unwrap_or(RegistriesCmd::List))
            }
            ClientCmd::EnrollTokens { cmd } => return self.enroll_tokens(cmd).await,
            ClientCmd::Tokens { cmd } => return self.tokens(cmd).await,
            ClientCmd::MqttUsers { cmd } => return self.mqtt_users(cmd).await,
            ClientCmd::Audit(a) => return self.audit(a).await,
            ClientCmd::AgentReleases { cmd } => {
                return self
                    .agent_releases(cmd.unwrap_or(AgentReleasesCmd::List))
                    .await
            }
        };
        match cmd {
            Resolved::Devices(DevicesCmd::List) => {
                let v = self.get("/api/v1/devices").await?;
                self.print(&v, devices_table)
            }
            Resolved::Devices(DevicesCmd::Show { id }) => {
                let v = self.get(&format!("/api/v1/devices/{id}")).await?;
                self.print(&v, device_detail)
            }
            Resolved::Devices(DevicesCmd::Revoke { id }) => self.revoke(&id).await,
            Resolved::Apps(AppsCmd::List) => {
                let v = self.get("/api/v1/apps").await?;
                self.print(&v, apps_table)
            }
            Resolved::Apps(AppsCmd::Show { name }) => {
                let v = self.get(&format!("/api/v1/apps/{name}")).await?;
                self.print(&v, |a: AppView| {
                    format!(
                        "privileges:  {}\n{}\n",
                        privileges_text(&a.privileges),
                        serde_json::to_string_pretty(&a.spec).unwrap_or_default()
                    )
                })
            }
            Resolved::Apps(AppsCmd::Create(c)) => {
                let body = app_body(*c)?;
                let v = self.post("/api/v1/apps", &body).await?;
                self.print(&v, |a: AppView| {
                    format!(
                        "created app {} (privileges: {})\n",
                        a.spec.name,
                        privileges_text(&a.privileges)
                    )
                })
            }
            Resolved::Apps(AppsCmd::Update(c)) => {
                let body = app_body(*c)?;
                let name = body["name"].as_str().unwrap_or_default().to_string();
                let v = self
                    .send(
                        self.http
                            .put(format!("{}/api/v1/apps/{name}", self.base))
                            .json(&body),
                    )
                    .await?;
                self.print(&v, |a: AppView| {
                    format!(
                        "updated app {} (privileges: {}); deploy it again to roll it out\n",
                        a.spec.name,
                        privileges_text(&a.privileges)
                    )
                })
            }
            Resolved::Apps(AppsCmd::Import(i)) => self.import(i).await,
            Resolved::Apps(AppsCmd::Delete { name }) => {
                self.delete(&format!("/api/v1/apps/{name}")).await?;
                if self.output == Output::Table {
                    println!("deleted app {name}");
                }
                Ok(())
            }
            Resolved::Deploy(t) => {
                let body = serde_json::json!({ "app": t.app });
                let v = self
                    .post(&format!("/api/v1/devices/{}/apps", t.device), &body)
                    .await?;
                self.follow(v, &t).await
            }
            Resolved::Start(t) => {
                let v = self
                    .post(
                        &format!("/api/v1/devices/{}/apps/{}/start", t.device, t.app),
                        &Value::Null,
                    )
                    .await?;
                self.follow(v, &t).await
            }
            Resolved::Stop(t) => {
                let v = self
                    .post(
                        &format!("/api/v1/devices/{}/apps/{}/stop", t.device, t.app),
                        &Value::Null,
                    )
                    .await?;
                self.follow(v, &t).await
            }
            Resolved::Pause(t) => self.app_action(t, "pause").await,
            Resolved::Unpause(t) => self.app_action(t, "unpause").await,
            Resolved::Restart(t) => self.app_action(t, "restart").await,
            Resolved::Remove(t) => {
                let v = self
                    .delete(&format!("/api/v1/devices/{}/apps/{}", t.device, t.app))
                    .await?;
                self.follow(v, &t).await
            }
            Resolved::Ops(OpsCmd::List { device, limit }) => {
                let mut path = format!("/api/v1/operations?limit={limit}");
                if let Some(d) = device {
                    path.push_str(&format!("&device={d}"));
                }
                let v = self.get(&path).await?;
                self.print(&v, ops_table)
            }
            Resolved::Ops(OpsCmd::Show { id }) => {
                let v = self.get(&format!("/api/v1/operations/{id}")).await?;
                self.print(&v, |o: Operation| ops_table(vec![o]))
            }
            Resolved::Logs(l) => self.logs(l).await,
            Resolved::Registries(cmd) => self.registries(cmd).await,
        }
    }

    async fn agent_releases(&self, cmd: AgentReleasesCmd) -> Result<()> {
        match cmd {
            AgentReleasesCmd::List => {
                let v = self.get("/api/v1/agent-releases").await?;
                self.print(&v, agent_releases_table)
            }
            AgentReleasesCmd::Upload { file, version } => {
                let binary = std::fs::read(&file).with_context(|| format!("cannot read {file}"))?;
                let req = self
                    .http
                    .post(format!("{}/api/v1/agent-releases", self.base))
                    .query(&[("version", version.as_str())])
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(binary);
                let v = self
                    .send(req)
                    .await
                    .with_context(|| format!("{file} was not uploaded"))?;
                self.print(&v, |r: crate::contract::AgentRelease| {
                    format!(
                        "uploaded {file} as agent version {} ({}, {} bytes, sha256 {})\n",
                        r.version, r.arch, r.size, r.digest
                    )
                })
            }
            AgentReleasesCmd::Delete { digest } => {
                self.delete(&format!("/api/v1/agent-releases/{digest}"))
                    .await?;
                if self.output == Output::Table {
                    println!("deleted agent release {digest}");
                }
                Ok(())
            }
        }
    }

    async fn registries(&self, cmd: RegistriesCmd) -> Result<()> {
        match cmd {
            RegistriesCmd::List => {
                let v = self.get("/api/v1/registries").await?;
                self.print(&v, registries_table)
            }
            RegistriesCmd::Show { host } => {
                let v = self.get(&format!("/api/v1/registries/{host}")).await?;
                self.print(&v, |r: RegistryView| registries_table(vec![r]))
            }
            RegistriesCmd::Set {
                host,
                username,
                password_stdin,
            } => {
                let password = read_password(password_stdin)?;
                let body = serde_json::json!({ "username": username, "password": password });
                let v = self
                    .send(
                        self.http
                            .put(format!("{}/api/v1/registries/{host}", self.base))
                            .json(&body),
                    )
                    .await?;
                self.print(&v, |r: RegistryView| {
                    format!("stored credentials for {} (user {})\n", r.host, r.username)
                })
            }
            RegistriesCmd::Delete { host } => {
                self.delete(&format!("/api/v1/registries/{host}")).await?;
                if self.output == Output::Table {
                    println!("deleted credentials for {host}");
                }
                Ok(())
            }
        }
    }

    /// Prints the operation; with `--wait`, follows it to a final outcome
    /// (`follow.rs`) and fails the command if the device reports failure.
    /// `apps import`: the file goes to the server as it is; the server
    /// converts it and names whatever it refuses.
    async fn import(&self, i: ImportApp) -> Result<()> {
        let text = if i.file == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
        } else {
            std::fs::read_to_string(&i.file).with_context(|| format!("cannot read {}", i.file))?
        };
        let mut query: Vec<(&str, String)> = vec![("replace", i.replace.to_string())];
        if let Some(n) = &i.name {
            query.push(("name", n.clone()));
        }
        let req = self
            .http
            .post(format!("{}/api/v1/apps/import", self.base))
            .query(&query)
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(text);
        let (status, v) = self
            .send_status(req)
            .await
            .with_context(|| format!("{} was not imported", i.file))?;
        let verb = if status == reqwest::StatusCode::CREATED {
            "created"
        } else {
            "replaced the spec of"
        };
        self.print(&v, |a: AppView| {
            let names: Vec<&str> = a.spec.containers.iter().map(|c| c.name.as_str()).collect();
            format!(
                "{verb} app {} from {} ({} containers: {}; privileges: {})\n{}\n",
                a.spec.name,
                i.file,
                names.len(),
                names.join(", "),
                privileges_text(&a.privileges),
                serde_json::to_string_pretty(&a.spec).unwrap_or_default()
            )
        })
    }

    /// `drover pause` / `unpause` / `restart`: `verb` is the route's last word.
    async fn app_action(&self, t: Target, verb: &str) -> anyhow::Result<()> {
        let v = self
            .post(
                &format!("/api/v1/devices/{}/apps/{}/{verb}", t.device, t.app),
                &Value::Null,
            )
            .await?;
        self.follow(v, &t).await
    }

    async fn follow(&self, v: Value, t: &Target) -> Result<()> {
        let mut op: Operation = serde_json::from_value(v)?;
        if t.wait {
            op = self.wait_final(op, Duration::from_secs(t.timeout)).await?;
        }
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&op)?),
            Output::Table => print!("{}", ops_table(vec![op.clone()])),
        }
        if op.status == OpStatus::Failed {
            bail!(
                "{} of {} on {} failed: {}",
                op.op.as_str(),
                op.app,
                op.device,
                op.detail
            );
        }
        Ok(())
    }
}

fn progress_line(op: &Operation) -> String {
    let status = serde_json::to_value(op.status)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    match &op.progress {
        Some(p) => match (p.current_bytes, p.total_bytes) {
            (Some(c), Some(t)) if t > 0 => {
                format!("{status}: {} {} {}%", p.step, p.container, c * 100 / t)
            }
            _ => format!("{status}: {} {}", p.step, p.container),
        },
        None => status,
    }
}

fn app_body(c: CreateApp) -> Result<Value> {
    if let Some(f) = c.file {
        let text = if f == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {f}"))?
        };
        return serde_json::from_str(&text).with_context(|| format!("{f} is not valid JSON"));
    }
    let name = c
        .name
        .ok_or_else(|| anyhow!("an app name is required (or -f FILE)"))?;
    let image = c
        .image
        .ok_or_else(|| anyhow!("--image is required (or -f FILE)"))?;
    let mut env = BTreeMap::new();
    for e in c.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {e:?} is not KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    let ports = c
        .ports
        .iter()
        .map(|p| {
            let (spec, proto) = match p.split_once('/') {
                Some((s, "udp")) => (s, Protocol::Udp),
                Some((s, "tcp")) => (s, Protocol::Tcp),
                Some((_, other)) => bail!("--port {p:?}: protocol {other:?} is not tcp or udp"),
                None => (p.as_str(), Protocol::Tcp),
            };
            let (h, ct) = spec
                .split_once(':')
                .ok_or_else(|| anyhow!("--port {p:?} is not HOST:CONTAINER"))?;
            Ok(PortMapping {
                host: h
                    .parse()
                    .with_context(|| format!("--port {p:?}: bad host port"))?,
                container: ct
                    .parse()
                    .with_context(|| format!("--port {p:?}: bad container port"))?,
                protocol: proto,
                host_ip: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let volumes = c
        .volumes
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            match parts.as_slice() {
                [s, t] => Ok(VolumeBind {
                    source: s.to_string(),
                    target: t.to_string(),
                    read_only: false,
                }),
                [s, t, "ro"] => Ok(VolumeBind {
                    source: s.to_string(),
                    target: t.to_string(),
                    read_only: true,
                }),
                _ => bail!("--volume {v:?} is not SOURCE:TARGET[:ro]"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let host_mounts = c
        .mounts
        .iter()
        .map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            match parts.as_slice() {
                [s, t] => Ok(HostMount {
                    source: s.to_string(),
                    target: t.to_string(),
                    read_only: false,
                }),
                [s, t, "ro"] => Ok(HostMount {
                    source: s.to_string(),
                    target: t.to_string(),
                    read_only: true,
                }),
                _ => bail!("--mount {m:?} is not SOURCE:TARGET[:ro]"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let devices = c
        .devices
        .iter()
        .map(|d| {
            let parts: Vec<&str> = d.split(':').collect();
            let (host, container, permissions) = match parts.as_slice() {
                [h] => (h, None, None),
                [h, c] => (h, Some(c.to_string()), None),
                [h, c, p] => (h, Some(c.to_string()), Some(p.to_string())),
                _ => bail!("--device {d:?} is not HOST[:CONTAINER[:PERMISSIONS]]"),
            };
            Ok(DeviceMapping {
                host: host.to_string(),
                container,
                permissions,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let network_mode: NetworkMode = serde_json::from_value(Value::String(c.network.clone()))
        .map_err(|_| anyhow!("--network {:?} is not one of bridge, host, none", c.network))?;
    let restart: RestartPolicy =
        serde_json::from_value(Value::String(c.restart.clone())).map_err(|_| {
            anyhow!(
                "--restart {:?} is not one of no, unless-stopped, always, on-failure",
                c.restart
            )
        })?;
    let spec = AppSpec {
        name: Name::new(&name).map_err(|e| anyhow!("app name {name:?}: {e}"))?,
        containers: vec![ContainerSpec {
            name: Name::new(&c.container)
                .map_err(|e| anyhow!("--container {:?}: {e}", c.container))?,
            image,
            command: c.cmd,
            env,
            ports,
            volumes,
            restart,
            memory_mb: c.memory_mb,
            cpus: c.cpus,
            privileged: c.privileged,
            network_mode,
            cap_add: c.cap_add,
            devices,
            host_mounts,
            healthcheck: None,
            depends_on: vec![],
        }],
        labels: BTreeMap::new(),
    };
    Ok(serde_json::to_value(spec)?)
}

/// The password for `registries set`: one line of standard input, or the
/// environment. Never an argument, so it stays out of shell history and
/// of other users' `ps`.
fn read_password(from_stdin: bool) -> Result<String> {
    let password = if from_stdin {
        let mut text = std::io::read_to_string(std::io::stdin())
            .context("cannot read the password from standard input")?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        text
    } else {
        match std::env::var(PASSWORD_ENV) {
            Ok(p) => p,
            Err(_) => bail!(
                "no password: pass --password-stdin and write it to standard input, or set {PASSWORD_ENV}"
            ),
        }
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

fn privileges_text(p: &[String]) -> String {
    if p.is_empty() {
        "none (unprivileged)".to_string()
    } else {
        p.join(", ")
    }
}

fn agent_releases_table(all: Vec<crate::contract::AgentRelease>) -> String {
    let rows = all
        .into_iter()
        .map(|r| {
            vec![
                r.version,
                r.release.to_string(),
                r.arch,
                r.size.to_string(),
                r.digest,
                ago(r.created_ms),
            ]
        })
        .collect();
    table(
        &["VERSION", "RELEASE", "ARCH", "BYTES", "DIGEST", "UPLOADED"],
        rows,
    )
}

fn registries_table(regs: Vec<RegistryView>) -> String {
    let rows = regs
        .into_iter()
        .map(|r| {
            vec![
                r.host,
                r.username,
                if r.password_set { "set" } else { "not set" }.to_string(),
                ago(r.updated_at_ms),
            ]
        })
        .collect();
    table(&["REGISTRY", "USERNAME", "PASSWORD", "UPDATED"], rows)
}

pub(crate) fn ago(ms: u64) -> String {
    let now = now_ms();
    if ms == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn devices_table(devices: Vec<DeviceView>) -> String {
    let rows = devices
        .into_iter()
        .map(|d| {
            let inv = d.inventory.unwrap_or_default();
            vec![
                d.id.to_string(),
                if d.online {
                    "online".into()
                } else {
                    "offline".into()
                },
                ago(d.last_seen_ms),
                inv.hostname,
                d.platform.unwrap_or(inv.arch),
                format!("{}/{}", d.applied_generation, d.desired_generation),
                d.observed.map_or(0, |o| o.apps.len()).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "DEVICE",
            "STATUS",
            "LAST SEEN",
            "HOSTNAME",
            "PLATFORM",
            "GEN (APPLIED/DESIRED)",
            "APPS",
        ],
        rows,
    )
}

fn device_detail(d: DeviceView) -> String {
    let mut out = String::new();
    let inv = d.inventory.clone().unwrap_or_default();
    out += &format!(
        "device:      {}\nstatus:      {} (last seen {})\n",
        d.id,
        if d.online { "online" } else { "offline" },
        ago(d.last_seen_ms)
    );
    if let Some(c) = d.credential {
        let c = match c {
            CredentialState::None => "none (not enrolled)",
            CredentialState::Active => "active",
            CredentialState::Revoked => "revoked",
        };
        out += &format!("credential:  {c}\n");
    }
    out += &format!(
        "hostname:    {}\nos:          {} (kernel {}, {} , {} cpus, {} MiB)\nplatform:    {}\n",
        inv.hostname,
        inv.os,
        inv.kernel,
        inv.arch,
        inv.cpus,
        inv.memory_bytes / (1 << 20),
        d.platform
            .as_deref()
            .unwrap_or("unknown (the agent does not report one)")
    );
    out += &format!(
        "docker:      {}{}\nagent:       {}\n",
        inv.docker_version,
        inv.docker_error
            .map(|e| format!(" ({e})"))
            .unwrap_or_default(),
        inv.agent_version
    );
    out += &format!(
        "generation:  applied {} of desired {}\n",
        d.applied_generation, d.desired_generation
    );
    if let Some(t) = &d.telemetry {
        out += &format!(
            "telemetry:   cpu {:.1}%  mem {}/{} MiB  load {:.2}\n",
            t.host.cpu_percent,
            t.host.memory_used_bytes >> 20,
            t.host.memory_total_bytes >> 20,
            t.host.load_1
        );
    }
    for (app, p) in &d.privileges {
        out += &format!("privileges:  {app}: {}\n", privileges_text(p));
    }
    let mut rows = Vec::new();
    for a in d.observed.map(|o| o.apps).unwrap_or_default() {
        for c in a.containers {
            rows.push(vec![
                a.name.to_string(),
                format!("{:?}", a.phase).to_lowercase(),
                c.name.to_string(),
                c.state,
                c.image,
                c.error.or(a.error.clone()).unwrap_or_default(),
            ]);
        }
    }
    out += "\n";
    out += &table(
        &["APP", "PHASE", "CONTAINER", "STATE", "IMAGE", "ERROR"],
        rows,
    );
    out
}

fn apps_table(apps: Vec<AppView>) -> String {
    let rows = apps
        .into_iter()
        .map(|a| {
            let spec = &a.spec;
            let images: Vec<String> = spec.containers.iter().map(|c| c.image.clone()).collect();
            vec![
                spec.name.to_string(),
                spec.containers.len().to_string(),
                images.join(","),
                privileges_text(&a.privileges),
            ]
        })
        .collect();
    table(&["APP", "CONTAINERS", "IMAGES", "PRIVILEGES"], rows)
}

fn ops_table(ops: Vec<Operation>) -> String {
    let rows = ops
        .into_iter()
        .map(|o| {
            vec![
                o.id.clone(),
                o.op.as_str().to_string(),
                o.app.to_string(),
                o.device.to_string(),
                o.generation.to_string(),
                serde_json::to_value(o.status)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                o.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "OPERATION",
            "OP",
            "APP",
            "DEVICE",
            "GEN",
            "STATUS",
            "DETAIL",
        ],
        rows,
    )
}

/// Milliseconds since the Unix epoch, to show how long ago things were.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `k=v` sets, `k-` removes; anything else is refused by name.
fn label_body(changes: &[String]) -> Result<Value> {
    let mut set = serde_json::Map::new();
    let mut remove = Vec::new();
    for c in changes {
        if let Some((k, v)) = c.split_once('=') {
            set.insert(k.to_string(), Value::String(v.to_string()));
        } else if let Some(k) = c.strip_suffix('-') {
            remove.push(Value::String(k.to_string()));
        } else {
            bail!("{c:?}: write key=value to set a label, or key- to remove it");
        }
    }
    Ok(serde_json::json!({ "set": set, "remove": remove }))
}

fn assignment_text(a: crate::contract::Assignment) -> String {
    let list = |v: &[drover_shared::DeviceId]| {
        v.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "app {} release {} {:?} on selector {:?}\nmatching:   {}\nassigned:   {}\noverridden: {}\n",
        a.app,
        a.release,
        a.run,
        a.selector,
        list(&a.matching),
        list(&a.assigned),
        list(&a.overridden)
    )
}
