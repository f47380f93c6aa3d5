//! Rule definitions and firings, stored in redb through the store writer.
//! The command path changes definitions here (`Command::CreateRule` …);
//! the rules task (`rules/`) follows them through [`RuleDefs::watch`] and
//! records what it fired through [`RuleDefs::record`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use drover_shared::topic::Topics;
use drover_shared::{DeviceId, Name};
use tokio::sync::{watch, Mutex};

use super::CommandError;
use crate::contract::{Rule, RuleFiring};
use crate::core::rules::{self, MAX_RULES};
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoreError, Write};

/// Firings kept in redb; older ones are dropped as new ones come.
pub const FIRINGS_KEPT: u64 = 10_000;

pub struct RuleDefs {
    topics: Topics,
    store: Store,
    writer: StoreWriter,
    rules: RwLock<BTreeMap<Name, Rule>>,
    /// Serialises changes so the store and memory agree on their order.
    changing: Mutex<()>,
    version: watch::Sender<u64>,
    firing_seq: AtomicU64,
}

impl RuleDefs {
    /// Reads the rules and the last firing's number from the store.
    pub fn load(store: Store, writer: StoreWriter, topics: Topics) -> Result<RuleDefs, StoreError> {
        let rules = store
            .rules()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let seq = store.last_firing_seq()?;
        Ok(RuleDefs {
            topics,
            store,
            writer,
            rules: RwLock::new(rules),
            changing: Mutex::new(()),
            version: watch::channel(0).0,
            firing_seq: AtomicU64::new(seq),
        })
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Changes whenever a rule is created, changed or deleted.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn list(&self) -> Vec<Rule> {
        self.rules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, name: &Name) -> Option<Rule> {
        self.rules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Creates (`create`) or replaces a rule after validating it; stored
    /// before it is used.
    pub async fn put(&self, rule: Rule, create: bool) -> Result<Rule, CommandError> {
        rules::validate(&rule, &self.topics)
            .map_err(|e| CommandError::invalid(e.field.clone(), e.to_string()))?;
        let _g = self.changing.lock().await;
        {
            let map = self.rules.read().unwrap_or_else(|e| e.into_inner());
            let exists = map.contains_key(&rule.name);
            if create && exists {
                return Err(CommandError::Conflict {
                    field: Some("name".into()),
                    message: format!("rule {} already exists", rule.name),
                });
            }
            if !create && !exists {
                return Err(no_rule(&rule.name));
            }
            if create && map.len() >= MAX_RULES {
                return Err(CommandError::Conflict {
                    field: None,
                    message: format!("there are already {MAX_RULES} rules, the most there may be"),
                });
            }
        }
        self.writer
            .persist(vec![Write::Rule(Box::new(rule.clone()))])
            .await
            .map_err(|e| stored(&e))?;
        self.rules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rule.name.clone(), rule.clone());
        self.version.send_modify(|v| *v += 1);
        Ok(rule)
    }

    pub async fn delete(&self, name: &Name) -> Result<(), CommandError> {
        let _g = self.changing.lock().await;
        if self.get(name).is_none() {
            return Err(no_rule(name));
        }
        self.writer
            .persist(vec![Write::DeleteRule(name.to_string())])
            .await
            .map_err(|e| stored(&e))?;
        self.rules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Numbers a firing and queues it for the store (the oldest beyond
    /// [`FIRINGS_KEPT`] go in the same transaction); does not wait for the
    /// fsync: a firing is a record of what happened, not a promise.
    pub async fn record(&self, mut firing: RuleFiring) -> RuleFiring {
        let seq = self.firing_seq.fetch_add(1, Ordering::Relaxed) + 1;
        firing.seq = seq;
        let prune_to = seq.checked_sub(FIRINGS_KEPT).filter(|p| *p > 0);
        self.writer
            .record(vec![Write::RuleFiring {
                firing: Box::new(firing.clone()),
                prune_to,
            }])
            .await;
        firing
    }

    /// Firings, newest first.
    pub async fn firings(
        &self,
        rule: Option<Name>,
        device: Option<DeviceId>,
        limit: usize,
    ) -> Result<Vec<RuleFiring>, CommandError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            store.rule_firings(limit, |f| {
                rule.as_ref().is_none_or(|r| f.rule == *r)
                    && device.as_ref().is_none_or(|d| f.device.as_ref() == Some(d))
            })
        })
        .await
        .map_err(|_| CommandError::Internal("store task failed".into()))?
        .map_err(|e| {
            tracing::warn!(error = %e, "reading rule firings failed");
            CommandError::Internal("the firings could not be read from the store".into())
        })
    }
}

pub fn no_rule(name: &Name) -> CommandError {
    CommandError::not_found("name", format!("rule {name} does not exist"))
}

fn stored(e: &StoreError) -> CommandError {
    tracing::error!(error = %e, "store failure");
    CommandError::Internal("the change could not be stored; nothing was changed".into())
}

/// Shared by the command path and the rules task.
pub type SharedRuleDefs = Arc<RuleDefs>;
