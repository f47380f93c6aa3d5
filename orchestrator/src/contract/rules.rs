//! Rules: what an operator defines (`Rule`: a trigger, a device selector,
//! a CEL condition, actions, a cooldown) and what a rule did (`RuleFiring`).
//! Validation and evaluation are `core::rules`'.

use drover_shared::payload::EventKind;
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A rule: when its trigger happens on a device its selector matches and
/// its condition holds, its actions run, at most once per cooldown per
/// rule and device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique; the audit log names the rule's actions `rule:<name>`.
    #[schema(value_type = String)]
    pub name: Name,
    #[serde(default = "enabled")]
    pub enabled: bool,
    pub trigger: Trigger,
    /// A Kubernetes label selector over the device's labels; empty: every
    /// device. Must be empty for an `mqtt` trigger (no device).
    #[serde(default)]
    pub selector: String,
    /// A CEL expression giving a boolean; empty: always. The variables
    /// depend on the trigger (README, "Rules").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// What to do, in order (1 to 8).
    pub actions: Vec<RuleAction>,
    /// The least time between two firings for one device (or, for an
    /// `mqtt` trigger, of the rule).
    #[serde(default)]
    pub cooldown_secs: u64,
}

fn enabled() -> bool {
    true
}

/// What makes a rule look at its condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    /// The device comes online.
    DeviceOnline,
    /// The device goes offline; with `for_secs`, once it has stayed
    /// offline that long.
    DeviceOffline {
        #[serde(default)]
        for_secs: u64,
    },
    /// The device reports an event; `kinds` empty: any kind.
    DeviceEvent {
        #[serde(default)]
        kinds: Vec<EventKind>,
    },
    /// The app's phase or one of its containers' states changes in a
    /// state report.
    AppState {
        #[schema(value_type = String)]
        app: Name,
    },
    /// A telemetry sample meets the condition, and every sample has for
    /// `for_secs` (0: the first one).
    Telemetry {
        #[serde(default)]
        for_secs: u64,
    },
    /// A message on an MQTT topic filter outside the orchestrator's tree;
    /// the condition sees its JSON.
    Mqtt { filter: String },
}

impl Trigger {
    /// Its `type` in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::DeviceOnline => "device_online",
            Trigger::DeviceOffline { .. } => "device_offline",
            Trigger::DeviceEvent { .. } => "device_event",
            Trigger::AppState { .. } => "app_state",
            Trigger::Telemetry { .. } => "telemetry",
            Trigger::Mqtt { .. } => "mqtt",
        }
    }
}

/// One thing a rule does. App actions act on the triggering device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleAction {
    Start {
        #[schema(value_type = String)]
        app: Name,
    },
    Stop {
        #[schema(value_type = String)]
        app: Name,
    },
    /// Restarts a running app's containers (the same containers).
    Restart {
        #[schema(value_type = String)]
        app: Name,
    },
    Deploy {
        #[schema(value_type = String)]
        app: Name,
    },
    Remove {
        #[schema(value_type = String)]
        app: Name,
    },
    /// Pauses a rollout by id.
    PauseRollout { rollout: String },
    /// Sets an operator label on the triggering device.
    SetLabel { key: String, value: String },
    /// Publishes `payload` (a JSON object) with the firing under the key
    /// `firing`, on a topic outside the orchestrator's tree.
    Publish {
        topic: String,
        #[serde(default = "empty_object")]
        #[schema(value_type = Object)]
        payload: serde_json::Value,
        #[serde(default)]
        retain: bool,
    },
    /// POSTs the firing as JSON; retried with backoff on failure.
    Webhook { url: String },
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl RuleAction {
    /// Its `type` in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            RuleAction::Start { .. } => "start",
            RuleAction::Stop { .. } => "stop",
            RuleAction::Restart { .. } => "restart",
            RuleAction::Deploy { .. } => "deploy",
            RuleAction::Remove { .. } => "remove",
            RuleAction::PauseRollout { .. } => "pause_rollout",
            RuleAction::SetLabel { .. } => "set_label",
            RuleAction::Publish { .. } => "publish",
            RuleAction::Webhook { .. } => "webhook",
        }
    }
}

/// How a firing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FiringOutcome {
    /// Every action succeeded.
    Ok,
    /// At least one action failed.
    Failed,
    /// A loop of rules was cut here: no action ran.
    Cut,
}

impl FiringOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            FiringOutcome::Ok => "ok",
            FiringOutcome::Failed => "failed",
            FiringOutcome::Cut => "cut",
        }
    }
}

/// What one action of a firing did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionOutcome {
    /// The action's `type`.
    pub action: String,
    pub ok: bool,
    pub detail: String,
}

/// A rule's firing: when, on which device, what it saw, what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RuleFiring {
    /// Grows with every firing.
    pub seq: u64,
    pub at_ms: u64,
    #[schema(value_type = String)]
    pub rule: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub device: Option<DeviceId>,
    /// The trigger's `type`.
    pub trigger: String,
    /// The variables the condition saw.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    pub outcome: FiringOutcome,
    pub actions: Vec<ActionOutcome>,
    /// The rules whose actions led here, oldest first (empty: none).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub chain: Vec<Name>,
    /// Why it was cut, when it was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}
