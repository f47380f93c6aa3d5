//! The JSON automation surface over MQTT (issue 15): what Node-RED, Home
//! Assistant and scripts with mosquitto_pub/sub read and write.
//!
//! ```text
//! engine ──changes (Arc<Change>)──► mirror ──► outbox ──► <root>/v1/json/dev/<id>/…
//!                                     │                    <root>/v1/json/fleet/…
//!                                     └─ Home Assistant discovery configs (opt-in)
//! link ──inbox (non-device publishes)──► requests ──► commands (role, audit) ──► engine
//!          <root>/v1/json/req/<name>          └──► outbox ──► <root>/v1/json/res/<name>
//! ```
//!
//! - [`json`]: the documents of the JSON tree (field names are a contract).
//! - [`mirror`]: the change-stream subscriber publishing them.
//! - [`requests`]: commands over MQTT, one table of commands.
//! - [`homeassistant`]: discovery configs, pure.
//!
//! Like the history, the mirror never slows the engine: it is a bounded
//! subscriber of the change stream and re-publishes a snapshot when it
//! falls behind. Requests run only with the embedded broker, whose ACL
//! guarantees that only `<name>` publishes on `json/req/<name>`.

pub mod homeassistant;
pub mod json;
pub mod mirror;
pub mod requests;

use std::time::Duration;

use drover_shared::topic::{Discovery as DiscoveryTopics, Topics};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::engine::{Commands, Outbox};
use crate::link::{Inbox, Subscriptions};

/// Home Assistant discovery (`drover serve --homeassistant-user`).
#[derive(Debug, Clone)]
pub struct HomeAssistantConfig {
    /// The automation identity Home Assistant logs in with.
    pub user: String,
    pub discovery: DiscoveryTopics,
}

/// What of the automation surface runs.
#[derive(Debug, Clone)]
pub struct AutomationConfig {
    /// Publish the JSON tree (`--json-mirror`, default on).
    pub json_mirror: bool,
    /// Answer JSON requests: only with the embedded broker enforcing who
    /// publishes on each request topic.
    pub requests: bool,
    pub homeassistant: Option<HomeAssistantConfig>,
}

impl Default for AutomationConfig {
    fn default() -> Self {
        AutomationConfig {
            json_mirror: true,
            requests: true,
            homeassistant: None,
        }
    }
}

/// Resolves once `stopping` is true (or its sender is gone). The guard
/// `wait_for` returns is not `Send`, so it is dropped here.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// The running automation tasks.
pub struct Automation {
    tasks: Vec<JoinHandle<()>>,
}

/// Starts what `config` asks for. Each task ends when `stopping` flips,
/// dropping its outbox clone.
#[allow(clippy::too_many_arguments)] // each is a distinct collaborator
pub async fn start(
    config: AutomationConfig,
    topics: Topics,
    commands: Commands,
    outbox: Outbox,
    subscriptions: &Subscriptions,
    inbox: &Inbox,
    fast: Option<drover_broker::LocalPublisher>,
    stopping: watch::Receiver<bool>,
) -> Automation {
    let mut tasks = Vec::new();
    if config.requests {
        // Subscribed before the first request can be missed; the inbox
        // receiver exists before the subscription delivers anything.
        let rx = inbox.subscribe();
        subscriptions.add(&topics.json_requests()).await;
        let requests = requests::Requests {
            commands: commands.clone(),
            topics: topics.clone(),
            outbox: outbox.clone(),
        };
        tasks.push(tokio::spawn(requests.run(rx, stopping.clone())));
        info!(topic = %topics.json_requests(), "JSON requests over MQTT on");
    }
    if config.json_mirror {
        let ha = config
            .homeassistant
            .map(|h| homeassistant::Discovery::new(topics.clone(), h.discovery, h.user));
        let ha_inbox = match &ha {
            Some(ha) => {
                let rx = inbox.subscribe();
                subscriptions.add(&ha.status_topic()).await;
                Some(rx)
            }
            None => None,
        };
        let changes = commands.engine.subscribe();
        let mirror = mirror::Mirror::new(
            topics.clone(),
            outbox,
            commands.engine.clone(),
            commands.metrics.clone(),
            ha,
            fast,
        );
        tasks.push(tokio::spawn(mirror.run(changes, ha_inbox, stopping)));
        info!(tree = %topics.json_space(), "JSON mirror on");
    }
    Automation { tasks }
}

impl Automation {
    /// Waits for the tasks to end (after `stopping` flipped): requests in
    /// flight are answered first.
    pub async fn join(self) {
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                warn!("an automation task did not end within 10 s");
            }
        }
    }
}
