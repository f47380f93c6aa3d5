//! The rules task: the I/O around `core::rules`. It follows the engine's
//! change stream (device status, events, state reports, telemetry), the
//! link's inbox (MQTT triggers) and the rule definitions, feeds them to
//! the pure [`RuleBook`], and carries out the firings it returns: app,
//! label and rollout actions as commands with the actor `rule:<name>`
//! through `engine::commands` (same roles and audit as REST), publishes
//! through the outbox, webhooks over HTTP. Every firing is stored
//! (`RuleDefs::record`), announced as `Change::RuleFiring`, published as
//! JSON on `<root>/v1/json/fleet/rules`, audited and counted.
//!
//! Bounded: firings run as tasks, at most [`MAX_FIRINGS_IN_FLIGHT`] at once
//! (more are dropped and counted as failed), webhooks at most
//! [`MAX_WEBHOOKS_IN_FLIGHT`]; the change stream is a bounded broadcast
//! (lagging re-reads labels, it never slows the engine).

mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use drover_shared::payload::Op;
use drover_shared::topic::Topics;
use drover_shared::{DeviceId, Name};
use rumqttc::QoS;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::contract::{
    ActionOutcome, AuditOutcome, Change, FiringOutcome, RolloutAction, RuleAction, RuleFiring,
};
use crate::core::command::{Actor, Command};
use crate::core::rules::{self, Firing, Input, RuleBook};
use crate::engine::commands::Origin;
use crate::engine::rule_defs::RuleDefs;
use crate::engine::{Commands, Outbox};
use crate::link::{Inbound, Subscriptions};

pub const MAX_FIRINGS_IN_FLIGHT: usize = 256;
pub const MAX_WEBHOOKS_IN_FLIGHT: usize = 32;
/// How often device labels are read again from the engine.
const LABELS_EVERY: Duration = Duration::from_secs(2);

/// What the rules task needs.
pub struct RulesDeps {
    pub commands: Commands,
    pub outbox: Outbox,
    pub subscriptions: Subscriptions,
    pub inbox: tokio::sync::broadcast::Sender<Arc<Inbound>>,
    pub topics: Topics,
}

struct Shared {
    commands: Commands,
    defs: Arc<RuleDefs>,
    outbox: Outbox,
    topics: Topics,
    firings: Arc<Semaphore>,
    webhooks: webhook::Webhooks,
}

/// Starts the rules task; it ends when `stop` resolves, after the firings
/// in flight have ended (their outbox clones dropped with them).
pub fn spawn(deps: RulesDeps, stop: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
    let shared = Arc::new(Shared {
        defs: deps.commands.rules.clone(),
        commands: deps.commands,
        outbox: deps.outbox,
        topics: deps.topics,
        firings: Arc::new(Semaphore::new(MAX_FIRINGS_IN_FLIGHT)),
        webhooks: webhook::Webhooks::new(MAX_WEBHOOKS_IN_FLIGHT),
    });
    let changes = shared.commands.engine.subscribe();
    let inbox = deps.inbox.subscribe();
    tokio::spawn(run(shared, deps.subscriptions, changes, inbox, stop))
}

async fn run(
    shared: Arc<Shared>,
    subscriptions: Subscriptions,
    mut changes: tokio::sync::broadcast::Receiver<Arc<Change>>,
    mut inbox: tokio::sync::broadcast::Receiver<Arc<Inbound>>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(stop);
    let mut defs = shared.defs.watch();
    let mut book = RuleBook::default();
    let mut loaded: BTreeMap<Name, crate::contract::Rule> = BTreeMap::new();
    let mut filters = BTreeSet::new();
    sync(
        &shared,
        &mut book,
        &mut loaded,
        &subscriptions,
        &mut filters,
    )
    .await;
    let mut labels: HashMap<DeviceId, BTreeMap<String, String>> = HashMap::new();
    let mut relabel = tokio::time::interval(LABELS_EVERY);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let fired = tokio::select! {
            _ = &mut stop => break,
            Ok(()) = defs.changed() => {
                sync(&shared, &mut book, &mut loaded, &subscriptions, &mut filters).await;
                Vec::new()
            }
            _ = relabel.tick() => {
                labels = read_labels(&shared).await;
                Vec::new()
            }
            _ = tick.tick() => book.tick(now_ms()),
            change = changes.recv() => match change {
                Ok(change) => on_change(&shared, &mut book, &mut labels, &change).await,
                Err(RecvError::Lagged(missed)) => {
                    debug!(missed, "rules fell behind the change stream");
                    labels = read_labels(&shared).await;
                    Vec::new()
                }
                Err(RecvError::Closed) => break,
            },
            msg = inbox.recv() => match msg {
                Ok(msg) => book.observe(Input::Message { topic: &msg.topic, payload: &msg.payload }, now_ms()),
                Err(RecvError::Lagged(missed)) => {
                    warn!(missed, "rules missed MQTT messages");
                    Vec::new()
                }
                Err(RecvError::Closed) => Vec::new(),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => Vec::new(),
        };
        for firing in fired {
            match shared.firings.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        carry_out(&shared, firing).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    warn!(rule = %firing.rule, "too many rule firings in flight; one dropped");
                    shared.commands.metrics.rule_fired("failed");
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Brings the book in line with the stored definitions and the link's
/// subscriptions in line with the book's MQTT triggers.
async fn sync(
    shared: &Shared,
    book: &mut RuleBook,
    loaded: &mut BTreeMap<Name, crate::contract::Rule>,
    subscriptions: &Subscriptions,
    filters: &mut BTreeSet<String>,
) {
    let now: BTreeMap<Name, crate::contract::Rule> = shared
        .defs
        .list()
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    for name in loaded.keys() {
        if !now.contains_key(name) {
            book.remove(name);
        }
    }
    for (name, rule) in &now {
        if loaded.get(name) == Some(rule) {
            continue;
        }
        match rules::validate(rule, &shared.topics) {
            Ok(c) => book.put(c),
            Err(e) => {
                warn!(rule = %name, error = %e, "a stored rule is not valid; it is not used");
                book.remove(name);
            }
        }
    }
    *loaded = now;
    let wanted = book.filters();
    for f in filters.difference(&wanted) {
        subscriptions.remove(f).await;
    }
    for f in wanted.difference(filters) {
        subscriptions.add(f).await;
    }
    *filters = wanted;
}

async fn read_labels(shared: &Shared) -> HashMap<DeviceId, BTreeMap<String, String>> {
    shared
        .commands
        .engine
        .read(|f, _| {
            f.device_ids()
                .map(|id| (id.clone(), f.labels_of(id).unwrap_or_default()))
                .collect()
        })
        .await
        .unwrap_or_default()
}

async fn on_change(
    shared: &Shared,
    book: &mut RuleBook,
    labels: &mut HashMap<DeviceId, BTreeMap<String, String>>,
    change: &Change,
) -> Vec<Firing> {
    let device = match change {
        Change::Device { device, .. }
        | Change::Event { device, .. }
        | Change::State { device, .. }
        | Change::Telemetry { device, .. } => device,
        _ => return Vec::new(),
    };
    if !labels.contains_key(device) {
        let id = device.clone();
        let l = shared
            .commands
            .engine
            .read(move |f, _| f.labels_of(&id).unwrap_or_default())
            .await
            .unwrap_or_default();
        labels.insert(device.clone(), l);
    }
    let empty = BTreeMap::new();
    let l = labels.get(device).unwrap_or(&empty);
    let now = now_ms();
    match change {
        Change::Device { online, .. } => book.observe(
            Input::Status {
                device,
                labels: l,
                online: *online,
            },
            now,
        ),
        Change::Event { event, .. } => book.observe(
            Input::Event {
                device,
                labels: l,
                event,
            },
            now,
        ),
        Change::Telemetry { telemetry, .. } => book.observe(
            Input::Telemetry {
                device,
                labels: l,
                telemetry,
            },
            now,
        ),
        Change::State { .. } if book.watches_apps() => {
            let id = device.clone();
            let apps = shared
                .commands
                .engine
                .read(move |f, _| {
                    f.device_view(&id)
                        .and_then(|d| d.observed)
                        .map(|o| o.apps)
                        .unwrap_or_default()
                })
                .await
                .unwrap_or_default();
            book.observe(
                Input::Apps {
                    device,
                    labels: l,
                    apps: &apps,
                },
                now,
            )
        }
        _ => Vec::new(),
    }
}

/// Runs a firing's actions in order and records, announces, publishes,
/// audits and counts it.
async fn carry_out(shared: &Shared, firing: Firing) {
    let actor = Actor::Rule {
        name: firing.rule.to_string(),
    };
    let origin = Origin {
        action: format!("rule {}", firing.rule),
        ok_status: None,
        error_status: |_| None,
    };
    let at_ms = now_ms();
    let mut record = RuleFiring {
        seq: 0,
        at_ms,
        rule: firing.rule.clone(),
        device: firing.device.clone(),
        trigger: firing.trigger.to_string(),
        value: firing.value.clone(),
        outcome: FiringOutcome::Ok,
        actions: Vec::new(),
        chain: firing.chain.clone(),
        detail: firing.cut.clone().unwrap_or_default(),
    };
    if firing.cut.is_some() {
        record.outcome = FiringOutcome::Cut;
    }
    for action in &firing.actions {
        let (ok, detail) = act(shared, &actor, &origin, &firing, &record, action).await;
        if !ok {
            record.outcome = FiringOutcome::Failed;
        }
        record.actions.push(ActionOutcome {
            action: action.kind().to_string(),
            ok,
            detail,
        });
    }
    let record = shared.defs.record(record).await;
    let outcome = record.outcome.as_str();
    let summary = match record.outcome {
        FiringOutcome::Cut => format!("loop cut: {}", record.detail),
        _ => record
            .actions
            .iter()
            .map(|a| format!("{} {}", a.action, if a.ok { "ok" } else { "failed" }))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let device = record
        .device
        .as_ref()
        .map(|d| format!(" on device {d}"))
        .unwrap_or_default();
    shared
        .commands
        .access
        .audit(
            &actor,
            format!("rule {} fired", record.rule),
            None,
            if record.outcome == FiringOutcome::Ok {
                AuditOutcome::Ok
            } else {
                AuditOutcome::Failed
            },
            None,
            format!(
                "firing {}{device} ({} trigger): {summary}",
                record.seq, record.trigger
            ),
        )
        .await;
    shared.commands.metrics.rule_fired(outcome);
    if let Ok(json) = serde_json::to_vec(&record) {
        shared.outbox.publish_raw(
            shared.topics.json_rule_firings(),
            json,
            QoS::AtLeastOnce,
            false,
        );
    }
    shared.commands.engine.announce(Change::RuleFiring {
        firing: Box::new(record),
    });
}

/// One action; whether it worked and what happened.
async fn act(
    shared: &Shared,
    actor: &Actor,
    origin: &Origin,
    firing: &Firing,
    record: &RuleFiring,
    action: &RuleAction,
) -> (bool, String) {
    let op = |app: &Name, op: Op| {
        firing.device.clone().map(|device| Command::Apply {
            device,
            app: app.clone(),
            op,
        })
    };
    let command = match action {
        RuleAction::Start { app } => op(app, Op::Start),
        RuleAction::Stop { app } => op(app, Op::Stop),
        RuleAction::Restart { app } => op(app, Op::Restart),
        RuleAction::Deploy { app } => op(app, Op::Deploy),
        RuleAction::Remove { app } => op(app, Op::Remove),
        RuleAction::PauseRollout { rollout } => Some(Command::RolloutAction {
            id: rollout.clone(),
            action: RolloutAction::Pause,
        }),
        RuleAction::SetLabel { key, value } => {
            firing.device.clone().map(|device| Command::SetLabels {
                device,
                set: [(key.clone(), value.clone())].into(),
                remove: Vec::new(),
                replace: false,
            })
        }
        RuleAction::Publish {
            topic,
            payload,
            retain,
        } => {
            let mut body = payload.clone();
            body["firing"] = firing_json(record);
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let qos = QoS::AtLeastOnce;
            return if shared
                .outbox
                .publish_raw(topic.clone(), bytes, qos, *retain)
            {
                (true, format!("published on {topic}"))
            } else {
                (false, format!("not published on {topic}: too large"))
            };
        }
        RuleAction::Webhook { url } => {
            let (ok, detail) = shared.webhooks.post(url, &firing_json(record)).await;
            if !ok {
                shared.commands.metrics.webhook_failed();
            }
            return (ok, detail);
        }
    };
    let Some(command) = command else {
        return (false, "this action needs a device".into());
    };
    match shared.commands.execute(actor, origin, command).await {
        Ok(_) => (true, "done".into()),
        Err(e) => (false, e.to_string()),
    }
}

/// The firing as actions send it (no outcome yet).
fn firing_json(record: &RuleFiring) -> serde_json::Value {
    json!({
        "rule": record.rule,
        "device": record.device,
        "trigger": record.trigger,
        "at_ms": record.at_ms,
        "value": record.value,
        "chain": record.chain,
    })
}
