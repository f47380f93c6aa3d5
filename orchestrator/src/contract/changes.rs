use drover_shared::payload::{DeviceEvent, LogBatch, Telemetry};
use drover_shared::{DeviceId, Name};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Job, Operation, Rollout};

/// One change in the fleet, as the engine publishes it to its subscribers
/// (`GET /api/v1/changes`, the CLI's `--wait`, and in time the console and
/// rules). A subscriber that falls behind gets [`Change::Lagged`] and reads
/// a snapshot again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A device came online or went offline.
    Device {
        device: DeviceId,
        online: bool,
        at_ms: u64,
    },
    /// A device sent a new inventory (`hello`).
    Inventory { device: DeviceId, at_ms: u64 },
    /// A device reported what runs, and which generation it has applied.
    State {
        device: DeviceId,
        desired_generation: u64,
        applied_generation: u64,
        at_ms: u64,
    },
    /// An operation was created or moved on.
    // The large variants are boxed: the channel preallocates every slot
    // (`engine::CHANGES_CAPACITY` of them), each the size of the largest
    // variant, whether or not anyone subscribes.
    Operation { operation: Box<Operation> },
    /// A telemetry sample.
    Telemetry {
        device: DeviceId,
        telemetry: Box<Telemetry>,
    },
    /// Log lines from one of a device's containers, in the order the
    /// agent read them, with its timestamps.
    Logs {
        device: DeviceId,
        batch: Box<LogBatch>,
    },
    /// Something a device did on its own.
    Event {
        device: DeviceId,
        event: Box<DeviceEvent>,
    },
    /// An app was created, changed or deleted.
    App { name: Name, deleted: bool },
    /// A rollout was created or moved on: its phase and counts. Progress
    /// is coalesced (at most a few per second per rollout); a change of
    /// phase is sent at once.
    Rollout { rollout: Box<Rollout> },
    /// An edge job was created or moved on (its counts, without devices);
    /// device progress coalesced like a rollout's.
    Job { job: Box<Job> },
    /// A rule fired (or a loop of rules was cut).
    RuleFiring {
        firing: Box<super::rules::RuleFiring>,
    },
    /// This subscriber fell behind and `missed` changes were dropped for
    /// it: what it holds may be stale, read a snapshot again.
    Lagged { missed: u64 },
}

/// Which changes a subscriber of `GET /api/v1/changes` wants
/// (`?device=ID&operation=ID&rollout=ID`; all given must hold). A
/// [`Change::Lagged`] always passes: whatever the filter, the subscriber
/// must learn that it missed something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeFilter {
    /// Only this device's changes (its operations included).
    pub device: Option<DeviceId>,
    /// Only the progress and outcome of this operation.
    pub operation: Option<String>,
    /// Only the progress and outcome of this rollout.
    pub rollout: Option<String>,
    /// Only the progress and outcome of this job.
    pub job: Option<String>,
    /// Only changes of these kinds (`?kinds=logs,event`); `lagged` always.
    pub kinds: Option<std::collections::BTreeSet<&'static str>>,
}

impl Change {
    /// Every kind, as `kind` names it in JSON.
    pub const KINDS: [&'static str; 12] = [
        "device",
        "inventory",
        "state",
        "operation",
        "telemetry",
        "logs",
        "event",
        "app",
        "rollout",
        "job",
        "rule_firing",
        "lagged",
    ];

    /// Its `kind` in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Device { .. } => "device",
            Change::Inventory { .. } => "inventory",
            Change::State { .. } => "state",
            Change::Operation { .. } => "operation",
            Change::Telemetry { .. } => "telemetry",
            Change::Logs { .. } => "logs",
            Change::Event { .. } => "event",
            Change::App { .. } => "app",
            Change::Rollout { .. } => "rollout",
            Change::Job { .. } => "job",
            Change::RuleFiring { .. } => "rule_firing",
            Change::Lagged { .. } => "lagged",
        }
    }

    /// The kinds named in `?kinds=a,b`; an unknown one is an error naming it.
    pub fn parse_kinds(raw: &str) -> Result<std::collections::BTreeSet<&'static str>, String> {
        raw.split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                Change::KINDS
                    .iter()
                    .find(|known| **known == k)
                    .copied()
                    .ok_or_else(|| {
                        format!(
                            "{k:?} is not a kind of change: {}",
                            Change::KINDS.join(", ")
                        )
                    })
            })
            .collect()
    }
}

impl ChangeFilter {
    pub fn matches(&self, change: &Change) -> bool {
        if let Change::Lagged { .. } = change {
            return true;
        }
        if self
            .kinds
            .as_ref()
            .is_some_and(|k| !k.contains(change.kind()))
        {
            return false;
        }
        let (device, operation, rollout) = match change {
            Change::Device { device, .. }
            | Change::Inventory { device, .. }
            | Change::State { device, .. }
            | Change::Telemetry { device, .. }
            | Change::Logs { device, .. }
            | Change::Event { device, .. } => (Some(device), None, None),
            Change::Operation { operation } => (Some(&operation.device), Some(&operation.id), None),
            Change::Rollout { rollout } => (None, None, Some(&rollout.id)),
            Change::Job { .. } => (None, None, None),
            Change::RuleFiring { firing } => (firing.device.as_ref(), None, None),
            Change::App { .. } | Change::Lagged { .. } => (None, None, None),
        };
        let job = match change {
            Change::Job { job } => Some(&job.id),
            _ => None,
        };
        fn wanted<T: PartialEq>(want: &Option<T>, got: Option<&T>) -> bool {
            want.as_ref().is_none_or(|w| got == Some(w))
        }
        wanted(&self.device, device)
            && wanted(&self.operation, operation)
            && wanted(&self.rollout, rollout)
            && wanted(&self.job, job)
    }
}

/// Merges a subscriber's device-level changes (`device`, `inventory`,
/// `state`, `telemetry`) per device and kind, keeping the latest, to be
/// sent together at an interval (`GET /api/v1/changes?coalesce=true`, the
/// console's feed): 10,000 chatty devices become at most one change per
/// device and kind per interval. Everything else (operations, rollouts,
/// events, logs, apps, `lagged`) passes at once, in order.
#[derive(Debug, Default)]
pub struct Coalescer {
    pending: std::collections::BTreeMap<(DeviceId, u8), std::sync::Arc<Change>>,
}

impl Coalescer {
    /// Keeps a device-level change for the next [`Coalescer::drain`], or
    /// hands any other change back to send now.
    pub fn offer(&mut self, change: std::sync::Arc<Change>) -> Option<std::sync::Arc<Change>> {
        let key = match &*change {
            Change::Device { device, .. } => (device.clone(), 0),
            Change::Inventory { device, .. } => (device.clone(), 1),
            Change::State { device, .. } => (device.clone(), 2),
            Change::Telemetry { device, .. } => (device.clone(), 3),
            _ => return Some(change),
        };
        self.pending.insert(key, change);
        None
    }

    /// The kept changes, one per device and kind, by device.
    pub fn drain(&mut self) -> Vec<std::sync::Arc<Change>> {
        std::mem::take(&mut self.pending).into_values().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use drover_shared::payload::Op;

    use super::*;
    use crate::contract::OpStatus;

    fn op(id: &str, device: &str) -> Change {
        Change::Operation {
            operation: Box::new(Operation {
                id: id.into(),
                device: DeviceId::new(device).expect("valid id"),
                app: Name::new("web").expect("valid name"),
                op: Op::Deploy,
                generation: 1,
                status: OpStatus::Sent,
                detail: String::new(),
                progress: None,
                created_at_ms: 1,
                updated_at_ms: 1,
            }),
        }
    }

    fn online(device: &str) -> Change {
        Change::Device {
            device: DeviceId::new(device).expect("valid id"),
            online: true,
            at_ms: 1,
        }
    }

    fn logs(device: &str) -> Change {
        Change::Logs {
            device: DeviceId::new(device).expect("valid id"),
            batch: Box::new(LogBatch {
                app: Name::new("web").expect("valid name"),
                container: Name::new("main").expect("valid name"),
                lines: Vec::new(),
                dropped: 0,
            }),
        }
    }

    #[test]
    fn a_change_is_small() {
        // Every slot of the change channel is this big, subscribed or not.
        assert!(
            std::mem::size_of::<Change>() <= 64,
            "{}",
            std::mem::size_of::<Change>()
        );
    }

    #[test]
    fn no_filter_passes_everything() {
        let all = ChangeFilter::default();
        for c in [
            op("a", "d1"),
            online("d1"),
            Change::App {
                name: Name::new("web").expect("valid name"),
                deleted: false,
            },
            Change::Lagged { missed: 3 },
        ] {
            assert!(all.matches(&c), "{c:?}");
        }
    }

    #[test]
    fn operation_filter_passes_only_that_operation_and_lagged() {
        let f = ChangeFilter {
            operation: Some("a".into()),
            ..Default::default()
        };
        assert!(f.matches(&op("a", "d1")));
        assert!(!f.matches(&op("b", "d1")));
        assert!(
            !f.matches(&online("d1")),
            "device changes carry no operation"
        );
        assert!(f.matches(&Change::Lagged { missed: 1 }));
    }

    #[test]
    fn device_filter_passes_that_devices_changes_and_lagged() {
        let f = ChangeFilter {
            device: Some(DeviceId::new("d1").expect("valid id")),
            ..Default::default()
        };
        assert!(f.matches(&op("a", "d1")));
        assert!(f.matches(&online("d1")));
        assert!(f.matches(&logs("d1")));
        assert!(!f.matches(&logs("d2")));
        assert!(!f.matches(&op("a", "d2")));
        assert!(!f.matches(&online("d2")));
        assert!(!f.matches(&Change::App {
            name: Name::new("web").expect("valid name"),
            deleted: true,
        }));
        assert!(f.matches(&Change::Lagged { missed: 1 }));
    }

    #[test]
    fn the_coalescer_keeps_the_latest_per_device_and_kind_and_passes_the_rest() {
        use std::sync::Arc;
        let mut c = Coalescer::default();
        let state = |d: &str, applied: u64| {
            Arc::new(Change::State {
                device: DeviceId::new(d).expect("valid id"),
                desired_generation: 9,
                applied_generation: applied,
                at_ms: applied,
            })
        };
        for i in 0..100 {
            assert!(c.offer(state("d1", i)).is_none());
            assert!(c.offer(state("d2", i)).is_none());
        }
        assert!(c.offer(Arc::new(online("d1"))).is_none());
        // An operation is not held back.
        let passed = c.offer(Arc::new(op("a", "d1"))).expect("passes");
        assert!(matches!(&*passed, Change::Operation { .. }));
        let out = c.drain();
        assert_eq!(out.len(), 3, "{out:?}");
        let applied: Vec<u64> = out
            .iter()
            .filter_map(|c| match &**c {
                Change::State {
                    applied_generation, ..
                } => Some(*applied_generation),
                _ => None,
            })
            .collect();
        assert_eq!(applied, vec![99, 99], "the latest of each device");
        assert!(c.is_empty());
        assert!(c.drain().is_empty());
    }

    #[test]
    fn the_kinds_filter_passes_only_those_kinds_and_lagged() {
        let f = ChangeFilter {
            kinds: Some(Change::parse_kinds("operation, app").expect("valid")),
            ..Default::default()
        };
        assert!(f.matches(&op("a", "d1")));
        assert!(!f.matches(&online("d1")));
        assert!(f.matches(&Change::Lagged { missed: 1 }));
        let err = Change::parse_kinds("logs,nope").expect_err("unknown kind");
        assert!(err.contains("\"nope\""), "{err}");
        // Every kind's name is one the filter knows.
        for c in [op("a", "d1"), online("d1"), Change::Lagged { missed: 1 }] {
            assert!(Change::parse_kinds(c.kind()).is_ok());
            let json = serde_json::to_value(&c).expect("json");
            assert_eq!(json["kind"], serde_json::json!(c.kind()));
        }
    }

    #[test]
    fn both_filters_must_hold() {
        let f = ChangeFilter {
            device: Some(DeviceId::new("d1").expect("valid id")),
            operation: Some("a".into()),
            ..Default::default()
        };
        assert!(f.matches(&op("a", "d1")));
        assert!(!f.matches(&op("a", "d2")));
        assert!(!f.matches(&op("b", "d1")));
    }
}
