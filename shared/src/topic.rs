//! The topic tree. Every topic Drover uses is built and parsed here.
//!
//! ```text
//! <root>/v1/dev/<device-id>/<kind>
//! ```
//!
//! `<root>` is configurable (default `drover`) so several fleets can share a
//! broker. The version segment lets a v2 protocol live beside v1.

use std::fmt;

use crate::ids::DeviceId;

pub const DEFAULT_ROOT: &str = "drover";
const VERSION_SEGMENT: &str = "v1";
const DEVICE_SEGMENT: &str = "dev";

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
}

impl TopicKind {
    pub const ALL: [TopicKind; 13] = [
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
    ];

    /// Topics a device publishes and the orchestrator consumes.
    pub const FROM_DEVICE: [TopicKind; 9] = [
        TopicKind::Ack,
        TopicKind::Status,
        TopicKind::Heartbeat,
        TopicKind::State,
        TopicKind::Telemetry,
        TopicKind::Logs,
        TopicKind::Hello,
        TopicKind::Event,
        TopicKind::Enroll,
    ];

    /// Topics the orchestrator publishes and a device consumes.
    pub const TO_DEVICE: [TopicKind; 4] = [
        TopicKind::Cmd,
        TopicKind::Desired,
        TopicKind::Enrolled,
        TopicKind::Secrets,
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
    fn bad_roots_are_rejected() {
        assert_eq!(Topics::new(""), Err(RootError::Empty));
        assert_eq!(Topics::new("a//b"), Err(RootError::EmptyLevel));
        assert_eq!(Topics::new("/a"), Err(RootError::EmptyLevel));
        assert_eq!(Topics::new("a/#"), Err(RootError::Wildcard));
        assert_eq!(Topics::new("$SYS"), Err(RootError::Dollar));
    }
}
