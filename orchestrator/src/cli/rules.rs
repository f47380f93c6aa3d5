//! `drover rules`: list, show, create, update, enable, disable and delete
//! rules, and read what they did.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

use crate::cli::{ago, table, Client, Output};
use crate::contract::{Rule, RuleFiring};

#[derive(Debug, Subcommand)]
pub enum RulesCmd {
    /// Every rule (the default).
    List,
    /// One rule, as JSON.
    Show {
        name: String,
    },
    /// Create a rule from a JSON file (`-` for standard input).
    Create {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// Replace a rule with the one in a JSON file (same name).
    Update {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// Let a rule fire again.
    Enable {
        name: String,
    },
    /// Keep a rule from firing (it stays defined).
    Disable {
        name: String,
    },
    Delete {
        name: String,
    },
    /// What rules did, newest first: one rule's, or every rule's.
    Firings {
        name: Option<String>,
        /// Only on this device.
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

fn read_rule(file: &str) -> Result<Value> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the rule from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))
}

impl Client {
    pub(crate) async fn rules(&self, cmd: RulesCmd) -> Result<()> {
        match cmd {
            RulesCmd::List => {
                let v = self.get("/api/v1/rules").await?;
                self.print(&v, rules_table)
            }
            RulesCmd::Show { name } => {
                let v = self.get(&format!("/api/v1/rules/{name}")).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            RulesCmd::Create { file } => {
                let v = self.post("/api/v1/rules", &read_rule(&file)?).await?;
                self.print(&v, |r: Rule| format!("created rule {}\n", r.name))
            }
            RulesCmd::Update { file } => {
                let rule = read_rule(&file)?;
                let name = rule["name"].as_str().unwrap_or_default().to_string();
                self.put_rule(&name, &rule).await
            }
            RulesCmd::Enable { name } => self.set_enabled(&name, true).await,
            RulesCmd::Disable { name } => self.set_enabled(&name, false).await,
            RulesCmd::Delete { name } => {
                self.delete(&format!("/api/v1/rules/{name}")).await?;
                if self.output == Output::Table {
                    println!("deleted rule {name}");
                }
                Ok(())
            }
            RulesCmd::Firings {
                name,
                device,
                limit,
            } => {
                let mut path = match &name {
                    Some(n) => format!("/api/v1/rules/{n}/firings?limit={limit}"),
                    None => format!("/api/v1/rule-firings?limit={limit}"),
                };
                if let Some(d) = device {
                    path.push_str(&format!("&device={d}"));
                }
                let v = self.get(&path).await?;
                self.print(&v, firings_table)
            }
        }
    }

    async fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut rule = self.get(&format!("/api/v1/rules/{name}")).await?;
        rule["enabled"] = Value::Bool(enabled);
        self.put_rule(name, &rule).await
    }

    async fn put_rule(&self, name: &str, rule: &Value) -> Result<()> {
        let v = self
            .send(
                self.http
                    .put(format!("{}/api/v1/rules/{name}", self.base))
                    .json(rule),
            )
            .await?;
        self.print(&v, |r: Rule| {
            format!(
                "rule {} {}\n",
                r.name,
                if r.enabled { "enabled" } else { "disabled" }
            )
        })
    }
}

fn rules_table(rules: Vec<Rule>) -> String {
    table(
        &[
            "NAME", "ENABLED", "TRIGGER", "SELECTOR", "ACTIONS", "COOLDOWN",
        ],
        rules
            .into_iter()
            .map(|r| {
                vec![
                    r.name.to_string(),
                    r.enabled.to_string(),
                    r.trigger.kind().to_string(),
                    r.selector.clone(),
                    r.actions
                        .iter()
                        .map(|a| a.kind())
                        .collect::<Vec<_>>()
                        .join(","),
                    format!("{}s", r.cooldown_secs),
                ]
            })
            .collect(),
    )
}

fn firings_table(firings: Vec<RuleFiring>) -> String {
    table(
        &[
            "SEQ", "WHEN", "RULE", "DEVICE", "TRIGGER", "OUTCOME", "ACTIONS",
        ],
        firings
            .into_iter()
            .map(|f| {
                vec![
                    f.seq.to_string(),
                    ago(f.at_ms),
                    f.rule.to_string(),
                    f.device.map(|d| d.to_string()).unwrap_or_default(),
                    f.trigger,
                    f.outcome.as_str().to_string(),
                    f.actions
                        .iter()
                        .map(|a| format!("{}:{}", a.action, if a.ok { "ok" } else { "failed" }))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    )
}
