//! The topic tree. Every topic Drover uses is built and parsed here.
//!
//! ```text
//! <root>/v1/dev/<device-id>/<kind>          device traffic, CBOR
//! <root>/v1/json/dev/<device-id>/<kind>     the JSON mirror for automation
//! <root>/v1/json/fleet/operations           operation outcomes (JSON)
//! <root>/v1/json/fleet/rollouts/<id>        rollout progress (JSON)
//! <root>/v1/json/req/<name>                 automation identity <name>'s requests
//! <root>/v1/json/res/<name>                 ... and the answers, for it alone
//! <discovery-prefix>/<component>/<node>/<object>/config   Home Assistant
//! ```
//!
//! `<root>` is configurable (default `drover`) so several fleets can share a
//! broker. The version segment lets a v2 protocol live beside v1.

use std::fmt;

use crate::ids::DeviceId;

pub const DEFAULT_ROOT: &str = "drover";
const VERSION_SEGMENT: &str = "v1";
const DEVICE_SEGMENT: &str = "dev";
const JSON_SEGMENT: &str = "json";

/// The kinds of per-device topic in the JSON tree (`<root>/v1/json/dev/<id>/<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JsonKind {
    /// Retained: online or not, and when last seen.
    Status,
    /// Retained: what the device is (its `hello`).
    Inventory,
    /// Retained: its apps by name, with their state and containers.
    State,
    /// Retained: the latest telemetry sample.
    Telemetry,
    /// Not retained: one device event.
    Event,
}

impl JsonKind {
    pub const ALL: [JsonKind; 5] = [
        JsonKind::Status,
        JsonKind::Inventory,
        JsonKind::State,
        JsonKind::Telemetry,
        JsonKind::Event,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JsonKind::Status => "status",
            JsonKind::Inventory => "inventory",
            JsonKind::State => "state",
            JsonKind::Telemetry => "telemetry",
            JsonKind::Event => "event",
        }
    }

    /// Whether the mirror publishes it retained: the latest value is what
    /// a newcomer wants; an event is news only once.
    pub fn retained(self) -> bool {
        self != JsonKind::Event
    }
}

/// The kinds of per-device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// orchestrator → device: one-shot commands with ids.
    Cmd,
    /// orchestrator → device, retained: the full desired state with generation.
    Desired,
    /// device → orchestrator: command progress and outcome.
    Ack,
    /// device → all, retained: online/offline; the Last Will sets offline.
    Status,
    /// device → all, retained: liveness with the applied generation.
    Heartbeat,
    /// device → all, retained: what actually runs.
    State,
    /// device → all: host and container resource usage.
    Telemetry,
    /// device → orchestrator: batches of container log lines.
    Logs,
    /// device → all, retained: inventory, sent on every connect.
    Hello,
    /// device → orchestrator: something happened that nobody asked for
    /// (drift repaired, image cleaned up, pull retried).
    Event,
    /// device → orchestrator: an enrollment token presented once, to get
    /// the device's own credential.
    Enroll,
    /// orchestrator → device: the answer to `enroll`, carrying the
    /// credential. Readable only by that device.
    Enrolled,
    /// orchestrator → device, retained: registry credentials for the images
    /// in this device's desired state, and nothing else.
    Secrets,
    /// device → orchestrator: progress and outcome of an edge job.
    Job,
    /// device → orchestrator: asks for one chunk of an agent binary.
    Fetch,
    /// orchestrator → device, not retained: the chunk asked for. Readable
    /// only by that device.
    Blob,
}

impl TopicKind {
    pub const ALL: [TopicKind; 16] = [
        TopicKind::Cmd,
        TopicKind::Desired,
        TopicKind::Ack,
        TopicKind::Status,
        TopicKind::Heartbeat,
        TopicKind::State,
        TopicKind::Telemetry,
        TopicKind::Logs,
        TopicKind::Hello,
        TopicKind::Event,
        TopicKind::Enroll,
        TopicKind::Enrolled,
        TopicKind::Secrets,
        TopicKind::Job,
        TopicKind::Fetch,
        TopicKind::Blob,
    ];

    /// Topics a device publishes and the orchestrator consumes.
    pub const FROM_DEVICE: [TopicKind; 11] = [
        TopicKind::Ack,
        TopicKind::Status,
        TopicKind::Heartbeat,
        TopicKind::State,
        TopicKind::Telemetry,
        TopicKind::Logs,
        TopicKind::Hello,
        TopicKind::Event,
        TopicKind::Enroll,
        TopicKind::Job,
        TopicKind::Fetch,
    ];

    /// Topics the orchestrator publishes and a device consumes.
    pub const TO_DEVICE: [TopicKind; 5] = [
        TopicKind::Cmd,
        TopicKind::Desired,
        TopicKind::Enrolled,
        TopicKind::Secrets,
        TopicKind::Blob,
    ];

    /// Topics that carry secrets or what a device is told to run (which
    /// may hold app secrets in its environment): only the device itself
    /// and the orchestrator may ever read them, whatever permissions an
    /// automation identity is given.
    pub fn confidential(self) -> bool {
        TopicKind::TO_DEVICE.contains(&self) || self == TopicKind::Enroll
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Cmd => "cmd",
            TopicKind::Desired => "desired",
            TopicKind::Ack => "ack",
            TopicKind::Status => "status",
            TopicKind::Heartbeat => "heartbeat",
            TopicKind::State => "state",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Logs => "logs",
            TopicKind::Hello => "hello",
            TopicKind::Event => "event",
            TopicKind::Enroll => "enroll",
            TopicKind::Enrolled => "enrolled",
            TopicKind::Secrets => "secrets",
            TopicKind::Job => "job",
            TopicKind::Fetch => "fetch",
            TopicKind::Blob => "blob",
        }
    }

    fn from_segment(s: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether messages on this topic are published with the retain flag.
    pub fn retained(self) -> bool {
        matches!(
            self,
            TopicKind::Desired
                | TopicKind::Secrets
                | TopicKind::Status
                | TopicKind::Heartbeat
                | TopicKind::State
                | TopicKind::Hello
        )
    }

    /// The MQTT QoS used on this topic: 1 for anything that changes state,
    /// 0 for periodic samples that the next sample replaces.
    pub fn qos(self) -> u8 {
        match self {
            TopicKind::Telemetry => 0,
            _ => 1,
        }
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    #[error("topic root must not be empty")]
    Empty,
    #[error("topic root must not start or end with '/' or contain empty levels")]
    EmptyLevel,
    #[error("topic root must not contain MQTT wildcards '+' or '#', or NUL")]
    Wildcard,
    #[error("topic root must not start with '$' (reserved for broker topics)")]
    Dollar,
}

/// A validated topic root, e.g. `drover` or `site-a/drover`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            root: DEFAULT_ROOT.to_string(),
        }
    }
}

impl Topics {
    pub fn new(root: impl Into<String>) -> Result<Topics, RootError> {
        let root = root.into();
        if root.is_empty() {
            return Err(RootError::Empty);
        }
        if root.split('/').any(str::is_empty) {
            return Err(RootError::EmptyLevel);
        }
        if root.contains(['+', '#', '\0']) {
            return Err(RootError::Wildcard);
        }
        if root.starts_with('$') {
            return Err(RootError::Dollar);
        }
        Ok(Topics { root })
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// The topic of one kind for one device.
    pub fn device(&self, device: &DeviceId, kind: TopicKind) -> String {
        format!(
            "{}/{VERSION_SEGMENT}/{DEVICE_SEGMENT}/{device}/{kind}",
            self.root
        )
    }

    /// A filter matching one kind of topic for every device.
    pub fn all_devices(&self, kind: TopicKind) -> String {
        format!("{}/{VERSION_SEGMENT}/{DEVICE_SEGMENT}/+/{kind}", self.root)
    }

    /// Rule firings as JSON, fleet-wide (`<root>/v1/json/fleet/rules`).
    pub fn json_rule_firings(&self) -> String {
        format!("{}/{VERSION_SEGMENT}/json/fleet/rules", self.root)
    }

    /// A filter matching every topic under this root.
    pub fn everything(&self) -> String {
        format!("{}/#", self.root)
    }

    /// A device's topic in the JSON tree.
    pub fn json_device(&self, device: &DeviceId, kind: JsonKind) -> String {
        format!(
            "{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/{DEVICE_SEGMENT}/{device}/{}",
            self.root,
            kind.as_str()
        )
    }

    /// A filter matching every device's JSON topics.
    pub fn json_devices(&self) -> String {
        format!(
            "{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/{DEVICE_SEGMENT}/#",
            self.root
        )
    }

    /// A filter matching the fleet-wide JSON topics.
    pub fn json_fleet(&self) -> String {
        format!("{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/fleet/#", self.root)
    }

    /// Operation outcomes, fleet-wide (not retained).
    pub fn json_operations(&self) -> String {
        format!(
            "{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/fleet/operations",
            self.root
        )
    }

    /// One rollout's progress (retained). Rollout ids are the
    /// orchestrator's own (no `/`, `+`, `#`).
    pub fn json_rollout(&self, id: &str) -> String {
        format!(
            "{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/fleet/rollouts/{id}",
            self.root
        )
    }

    /// Where the automation identity `name` publishes its requests.
    pub fn json_request(&self, name: &str) -> String {
        format!("{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/req/{name}", self.root)
    }

    /// Where the answers to `name`'s requests go; only `name` reads it.
    pub fn json_response(&self, name: &str) -> String {
        format!("{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/res/{name}", self.root)
    }

    /// A filter matching every identity's request topic.
    pub fn json_requests(&self) -> String {
        self.json_request("+")
    }

    /// A filter matching every identity's response topic.
    pub fn json_responses(&self) -> String {
        self.json_response("+")
    }

    /// A filter matching the whole JSON tree: only the orchestrator
    /// publishes there, except each identity on its own request topic.
    pub fn json_space(&self) -> String {
        format!("{}/{VERSION_SEGMENT}/{JSON_SEGMENT}/#", self.root)
    }

    /// The identity name of a request topic (`<root>/v1/json/req/<name>`).
    pub fn parse_json_request<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(self.root.as_str())?.strip_prefix('/')?;
        let name = rest.strip_prefix("v1/json/req/")?;
        (!name.is_empty() && !name.contains(['/', '+', '#'])).then_some(name)
    }

    /// Splits a topic into device and kind; `None` for anything that is not
    /// a well-formed v1 device topic under this root.
    pub fn parse(&self, topic: &str) -> Option<(DeviceId, TopicKind)> {
        let rest = topic.strip_prefix(self.root.as_str())?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        if parts.next()? != VERSION_SEGMENT || parts.next()? != DEVICE_SEGMENT {
            return None;
        }
        let device = DeviceId::new(parts.next()?).ok()?;
        let kind = TopicKind::from_segment(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some((device, kind))
    }
}

/// Home Assistant's MQTT discovery topics under a discovery prefix
/// (default `homeassistant`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    prefix: String,
}

impl Discovery {
    pub const DEFAULT_PREFIX: &'static str = "homeassistant";

    /// A validated prefix: the same rules as a topic root.
    pub fn new(prefix: impl Into<String>) -> Result<Discovery, RootError> {
        let t = Topics::new(prefix)?;
        Ok(Discovery { prefix: t.root })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/<component>/<node>/<object>/config`. `node` and `object`
    /// are built from device ids and names, which hold no `/`, `+`, `#`.
    pub fn config(&self, component: &str, node: &str, object: &str) -> String {
        format!("{}/{component}/{node}/{object}/config", self.prefix)
    }

    /// Where Home Assistant announces itself (`online`/`offline`).
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// Every discovery topic (what Home Assistant subscribes to).
    pub fn everything(&self) -> String {
        format!("{}/#", self.prefix)
    }
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            prefix: Discovery::DEFAULT_PREFIX.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for root in ["drover", "site-a/fleet"] {
            let t = Topics::new(root).expect("valid root");
            let d = DeviceId::new("pi-01").expect("valid id");
            for k in TopicKind::ALL {
                let s = t.device(&d, k);
                assert_eq!(t.parse(&s), Some((d.clone(), k)), "{s}");
            }
        }
    }

    #[test]
    fn foreign_topics_do_not_parse() {
        let t = Topics::default();
        for s in [
            "drover/v1/dev/pi/unknown",
            "drover/v2/dev/pi/status",
            "other/v1/dev/pi/status",
            "drover/v1/dev/pi/status/extra",
            "drover/v1/dev/p+i/status",
            "drover/v1/dev//status",
            "droverx/v1/dev/pi/status",
        ] {
            assert_eq!(t.parse(s), None, "{s}");
        }
    }

    #[test]
    fn filters_use_single_level_wildcard() {
        let t = Topics::default();
        assert_eq!(t.all_devices(TopicKind::Status), "drover/v1/dev/+/status");
    }

    #[test]
    fn the_json_tree() {
        let t = Topics::new("site/drover").expect("root");
        let d = DeviceId::new("pi-01").expect("id");
        assert_eq!(
            t.json_device(&d, JsonKind::Telemetry),
            "site/drover/v1/json/dev/pi-01/telemetry"
        );
        assert_eq!(t.json_request("nr"), "site/drover/v1/json/req/nr");
        assert_eq!(t.json_response("nr"), "site/drover/v1/json/res/nr");
        assert_eq!(
            t.parse_json_request("site/drover/v1/json/req/nr"),
            Some("nr")
        );
        for s in [
            "site/drover/v1/json/req/",
            "site/drover/v1/json/req/a/b",
            "site/drover/v1/json/res/nr",
            "drover/v1/json/req/nr",
        ] {
            assert_eq!(t.parse_json_request(s), None, "{s}");
        }
        // Every JSON topic is in the JSON space, and none in the device tree.
        for k in JsonKind::ALL {
            let topic = t.json_device(&d, k);
            assert!(crate::filter::matches(&t.json_space(), &topic));
            assert!(crate::filter::matches(&t.json_devices(), &topic));
            assert_eq!(t.parse(&topic), None);
        }
        assert!(crate::filter::matches(
            &t.json_fleet(),
            &t.json_rollout("r1")
        ));
        assert!(crate::filter::matches(
            &t.json_fleet(),
            &t.json_operations()
        ));
    }

    #[test]
    fn discovery_topics() {
        let d = Discovery::default();
        assert_eq!(
            d.config("sensor", "drover_pi", "cpu"),
            "homeassistant/sensor/drover_pi/cpu/config"
        );
        assert_eq!(d.status(), "homeassistant/status");
        assert!(Discovery::new("a/#").is_err());
    }

    #[test]
    fn bad_roots_are_rejected() {
        assert_eq!(Topics::new(""), Err(RootError::Empty));
        assert_eq!(Topics::new("a//b"), Err(RootError::EmptyLevel));
        assert_eq!(Topics::new("/a"), Err(RootError::EmptyLevel));
        assert_eq!(Topics::new("a/#"), Err(RootError::Wildcard));
        assert_eq!(Topics::new("$SYS"), Err(RootError::Dollar));
    }
}
