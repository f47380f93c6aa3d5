//! CLI commands for enrollment tokens, API tokens, automation identities,
//! revocation and the audit log. Secrets are printed once, when created.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::cli::{ago, table, Client, Output};
use crate::contract::{
    ApiToken as ApiTokenView, AuditEntry as AuditRecord, EnrollToken as EnrollTokenView,
    MqttUser as AutomationView,
};

#[derive(Debug, Subcommand)]
pub enum EnrollTokensCmd {
    /// Create a token an agent presents once to get its credential.
    Create {
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Only this device id may use it; required to re-enroll a device
        /// that was enrolled or revoked before.
        #[arg(long, short = 'd')]
        device: Option<String>,
    },
    /// List tokens (ids and limits; the tokens themselves are not stored).
    List,
    /// Delete a token so nobody can enroll with it.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create an API token with a role: viewer, operator or admin.
    Create {
        name: String,
        #[arg(long)]
        role: String,
    },
    List,
    /// Revoke an API token by id.
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MqttUsersCmd {
    /// Create an automation identity for the broker.
    Create {
        name: String,
        /// What its JSON requests (`<root>/v1/json/req/NAME`) may do:
        /// viewer (read) or operator (also deploy, start, stop, …).
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Topic filter it may subscribe to (repeatable); default: the
        /// JSON tree (`<root>/v1/json/dev/#`, `<root>/v1/json/fleet/#`) and
        /// what devices report (status, heartbeat, state, telemetry,
        /// hello, event). Its own response topic needs no grant.
        #[arg(long = "subscribe")]
        subscribe: Vec<String>,
        /// Topic filter it may publish on (repeatable); never device topics.
        #[arg(long = "publish")]
        publish: Vec<String>,
    },
    List,
    /// Delete an automation identity and disconnect it.
    Delete {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Only this actor (an API token's name, `device:<id>`, `anonymous`).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only ok, denied or failed.
    #[arg(long)]
    pub outcome: Option<String>,
}

fn when(ms: u64) -> String {
    ago(ms)
}

impl Client {
    pub(crate) async fn enroll_tokens(&self, cmd: EnrollTokensCmd) -> Result<()> {
        match cmd {
            EnrollTokensCmd::Create { ttl, uses, device } => {
                let mut body = json!({ "ttl_secs": ttl, "uses": uses });
                if let Some(d) = device {
                    body["device_id"] = json!(d);
                }
                let v = self.post("/api/v1/enrollment-tokens", &body).await?;
                self.print(&v, |t: EnrollTokenView| {
                    format!(
                        "enrollment token {} (valid {ttl} s, {} use(s){}):\n{}\n",
                        t.id,
                        t.uses_left,
                        t.device
                            .map(|d| format!(", device {d} only"))
                            .unwrap_or_default(),
                        t.token.unwrap_or_default()
                    )
                })
            }
            EnrollTokensCmd::List => {
                let v = self.get("/api/v1/enrollment-tokens").await?;
                self.print(&v, |ts: Vec<EnrollTokenView>| {
                    table(
                        &["ID", "USES LEFT", "DEVICE", "EXPIRES", "CREATED BY"],
                        ts.into_iter()
                            .map(|t| {
                                vec![
                                    t.id,
                                    t.uses_left.to_string(),
                                    t.device
                                        .map(|d| d.to_string())
                                        .unwrap_or_else(|| "any".into()),
                                    expires(t.expires_at_ms),
                                    t.created_by,
                                ]
                            })
                            .collect(),
                    )
                })
            }
            EnrollTokensCmd::Delete { id } => {
                self.delete(&format!("/api/v1/enrollment-tokens/{id}"))
                    .await?;
                self.done(&format!("deleted enrollment token {id}"))
            }
        }
    }

    pub(crate) async fn revoke(&self, device: &str) -> Result<()> {
        let v = self
            .post(&format!("/api/v1/devices/{device}/revoke"), &Value::Null)
            .await?;
        self.print(&v, |_: Value| {
            format!(
                "revoked the credential of {device}; it was disconnected and cannot reconnect\n"
            )
        })
    }

    pub(crate) async fn tokens(&self, cmd: TokensCmd) -> Result<()> {
        match cmd {
            TokensCmd::Create { name, role } => {
                let v = self
                    .post("/api/v1/tokens", &json!({ "name": name, "role": role }))
                    .await?;
                self.print(&v, |t: ApiTokenView| {
                    format!(
                        "API token {} ({}, role {}):\n{}\n",
                        t.id,
                        t.name,
                        t.role,
                        t.token.unwrap_or_default()
                    )
                })
            }
            TokensCmd::List => {
                let v = self.get("/api/v1/tokens").await?;
                self.print(&v, |ts: Vec<ApiTokenView>| {
                    table(
                        &["ID", "NAME", "ROLE", "CREATED", "CREATED BY"],
                        ts.into_iter()
                            .map(|t| {
                                vec![
                                    t.id,
                                    t.name.to_string(),
                                    t.role.to_string(),
                                    when(t.created_at_ms),
                                    t.created_by,
                                ]
                            })
                            .collect(),
                    )
                })
            }
            TokensCmd::Delete { id } => {
                self.delete(&format!("/api/v1/tokens/{id}")).await?;
                self.done(&format!("revoked API token {id}"))
            }
        }
    }

    pub(crate) async fn mqtt_users(&self, cmd: MqttUsersCmd) -> Result<()> {
        match cmd {
            MqttUsersCmd::Create {
                name,
                role,
                subscribe,
                publish,
            } => {
                let mut body = json!({ "name": name, "role": role, "publish": publish });
                if !subscribe.is_empty() {
                    body["subscribe"] = json!(subscribe);
                }
                let v = self.post("/api/v1/mqtt-users", &body).await?;
                self.print(&v, |u: AutomationView| {
                    format!(
                        "MQTT username: {}\npassword: {}\nrole: {}\nsubscribe: {}\npublish: {}\n",
                        u.username,
                        u.password.unwrap_or_default(),
                        u.role,
                        u.subscribe.join(" "),
                        if u.publish.is_empty() {
                            "nothing".into()
                        } else {
                            u.publish.join(" ")
                        }
                    )
                })
            }
            MqttUsersCmd::List => {
                let v = self.get("/api/v1/mqtt-users").await?;
                self.print(&v, |us: Vec<AutomationView>| {
                    table(
                        &["USERNAME", "ROLE", "SUBSCRIBE", "PUBLISH", "CREATED"],
                        us.into_iter()
                            .map(|u| {
                                vec![
                                    u.username,
                                    u.role.to_string(),
                                    u.subscribe.join(" "),
                                    u.publish.join(" "),
                                    when(u.created_at_ms),
                                ]
                            })
                            .collect(),
                    )
                })
            }
            MqttUsersCmd::Delete { name } => {
                self.delete(&format!("/api/v1/mqtt-users/{name}")).await?;
                self.done(&format!("deleted MQTT identity {name}"))
            }
        }
    }

    pub(crate) async fn audit(&self, a: AuditArgs) -> Result<()> {
        let mut path = format!("/api/v1/audit?limit={}", a.limit);
        if let Some(actor) = a.actor {
            path.push_str(&format!("&actor={actor}"));
        }
        if let Some(o) = a.outcome {
            path.push_str(&format!("&outcome={o}"));
        }
        let v = self.get(&path).await?;
        self.print(&v, |rs: Vec<AuditRecord>| {
            table(
                &["WHEN", "ACTOR", "ACTION", "OUTCOME", "DETAIL"],
                rs.into_iter()
                    .map(|r| {
                        vec![
                            when(r.at_ms),
                            r.actor,
                            r.action,
                            match r.status {
                                Some(s) => format!("{} ({s})", r.outcome.as_str()),
                                None => r.outcome.as_str().to_string(),
                            },
                            r.detail,
                        ]
                    })
                    .collect(),
            )
        })
    }

    fn done(&self, msg: &str) -> Result<()> {
        if self.output == Output::Table {
            println!("{msg}");
        }
        Ok(())
    }
}

fn expires(at_ms: u64) -> String {
    let now = crate::cli::now_ms();
    if at_ms <= now {
        "expired".into()
    } else {
        format!("in {} s", (at_ms - now) / 1000)
    }
}
