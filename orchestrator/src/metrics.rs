//! What the orchestrator exposes on `/metrics`, through prometheus-client.
//!
//! Two kinds of metric:
//!
//! - Counters and histograms the code updates as things happen (fields of
//!   [`Metrics`], registered once in its registry).
//! - Gauges computed at each scrape from a snapshot the `/metrics` handler
//!   asks the engine for ([`FleetGauges`]: one pass over the devices, no
//!   views built) and from the embedded broker's own counters
//!   ([`Scrape`], a collector in a registry made for that one scrape).
//!
//! Cardinality is bounded by what the operator defines: label values are
//! fixed lists (statuses, outcomes, operation kinds, rollout phases), app
//! names (apps are few), and, only with `--metrics-per-device` (default
//! on), one series per device and gauge: the fleet size.
//!
//! The label values that are known in advance are created at 0, so a
//! dashboard panel shows 0 rather than "no data".
//!
//! [`follow`] turns the engine's change stream into operation and rollout
//! outcomes and durations, so the engine itself has no metric code for
//! them.

use std::sync::{Arc, OnceLock};

use drover_broker::{Connections, GuardStats};
use drover_shared::payload::Op;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, text, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::contract::{Change, OpStatus, Rollout, RolloutPhase};
use crate::core::fleet::FleetGauges;

/// `Content-Type` of the OpenMetrics text format, what Prometheus asks for
/// first.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format 0.0.4 (curl, promtool).
pub const TEXT_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every operation kind, as its label value.
const OP_KINDS: [Op; 7] = [
    Op::Deploy,
    Op::Start,
    Op::Stop,
    Op::Remove,
    Op::Pause,
    Op::Unpause,
    Op::Restart,
];
/// The final statuses of an operation.
const OP_OUTCOMES: [OpStatus; 3] = [OpStatus::Succeeded, OpStatus::Failed, OpStatus::Superseded];
/// The final phases of a rollout.
const ROLLOUT_OUTCOMES: [RolloutPhase; 5] = [
    RolloutPhase::Succeeded,
    RolloutPhase::Failed,
    RolloutPhase::RolledBack,
    RolloutPhase::Aborted,
    RolloutPhase::Superseded,
];
/// The phases of a rollout that has not ended.
const ROLLOUT_ACTIVE: [RolloutPhase; 4] = [
    RolloutPhase::Running,
    RolloutPhase::WaitingApproval,
    RolloutPhase::Paused,
    RolloutPhase::RollingBack,
];
/// A rule firing's outcome: its actions ran, one failed, or a loop of
/// rules triggering each other was cut.
pub const RULE_OUTCOMES: [&str; 3] = ["ok", "failed", "cut"];
/// A JSON request over MQTT: answered, refused by role, not a valid
/// request, or failed while running.
pub const MQTT_REQUEST_OUTCOMES: [&str; 4] = ["ok", "refused", "invalid", "failed"];

type Labels = Vec<(&'static str, &'static str)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Seconds from 5 ms to ~5.5 min (doubling): an ack on a LAN is
/// milliseconds, a deploy that pulls an image minutes.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 17))
}

/// A redb commit: one fsync, sub-millisecond on tmpfs to ~1 s on a slow SD card.
fn commit_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 12))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    per_device: bool,
    pub mqtt_received: Counter,
    /// Publishes on our topics that failed to decode or parse.
    pub mqtt_rejected: Counter,
    pub mqtt_published: Counter,
    pub mqtt_publish_failed: Counter,
    /// Publishes dropped before reaching the MQTT client because no
    /// receiver would take a packet that large.
    pub mqtt_publish_oversized: Counter,
    /// Times the orchestrator's own MQTT link (re)connected to the broker.
    pub mqtt_link_connects: Counter,
    pub store_write_failed: Counter,
    /// Seconds each store commit (one redb transaction) took.
    pub store_commit_seconds: Histogram,
    /// Audit records dropped because the store failed for so long that
    /// more were waiting than the writer keeps.
    pub audit_dropped: Counter,
    /// REST requests refused with 401 or 403.
    pub api_denied: Counter,
    /// Deploys, assignments and rollouts refused because an image does
    /// not provide a device's platform.
    pub platform_refused: Counter,
    /// Image platform checks skipped (registry unreachable, image not in
    /// it, credentials refused): the request went ahead.
    pub platform_unchecked: Counter,
    /// HTTP requests the image platform check sent to registries, and
    /// lookups it answered from its cache instead.
    pub registry_requests: Counter,
    pub platform_cache_hits: Counter,
    pub enrollments_accepted: Counter,
    pub enrollments_refused: Counter,
    /// Telemetry samples and log lines stored in the history.
    pub history_samples: Counter,
    pub history_log_lines: Counter,
    /// Telemetry messages and log batches the history did not store: its
    /// queue was full, or their commit failed.
    pub history_dropped: Counter,
    /// Changes the history's subscriber missed because it fell behind the
    /// engine's change stream (of every kind, not only telemetry and logs).
    pub history_lagged: Counter,
    /// Samples and lines outside retention (a device clock far off) or
    /// already stored.
    pub history_skipped: Counter,
    pub history_write_failed: Counter,
    operations: Family<Labels, Counter>,
    operation_seconds: HistogramFamily,
    command_round_trip_seconds: Histogram,
    rollouts: Family<Labels, Counter>,
    /// Changes [`follow`] missed (so outcomes it did not count).
    changes_lagged: Counter,
    rule_firings: Family<Labels, Counter>,
    webhook_failures: Counter,
    mqtt_requests: Family<Labels, Counter>,
    /// JSON mirror publishes the outbox did not take (full).
    pub json_mirror_dropped: Counter,
    /// The embedded broker's counters and connections; unset with an
    /// external broker.
    broker: OnceLock<Broker>,
}

#[derive(Clone)]
struct Broker {
    stats: Arc<GuardStats>,
    connections: Arc<Connections>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("stats", &self.stats)
            .field("connections", &self.connections.len())
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

impl Metrics {
    /// `per_device`: also one series per device and gauge (CPU, memory,
    /// disk, online): as many series as devices.
    pub fn new(per_device: bool) -> Metrics {
        let mut r = Registry::with_prefix("drover");
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let family = |r: &mut Registry,
                      name: &str,
                      help: &str,
                      label: &'static str,
                      values: &[&'static str]| {
            let f = Family::<Labels, Counter>::default();
            for v in values {
                let _ = f.get_or_create(&vec![(label, *v)]);
            }
            r.register(name, help, f.clone());
            f
        };
        let mqtt_received = counter(
            &mut r,
            "mqtt_received",
            "MQTT publishes received on device topics",
        );
        let mqtt_rejected = counter(&mut r, "mqtt_rejected", "Device publishes rejected as malformed, oversized, of another protocol version or on an unknown topic");
        let mqtt_published = counter(&mut r, "mqtt_published", "MQTT publishes sent to devices");
        let mqtt_publish_failed = counter(
            &mut r,
            "mqtt_publish_failed",
            "MQTT publishes that could not be queued",
        );
        let mqtt_publish_oversized = counter(&mut r, "mqtt_publish_oversized", "MQTT publishes dropped because the packet is over the limit agents and the broker accept");
        let mqtt_link_connects = counter(
            &mut r,
            "mqtt_link_connects",
            "Connections (first and re-) of the orchestrator's MQTT link to the broker",
        );
        let store_write_failed = counter(
            &mut r,
            "store_write_failed",
            "redb write transactions that failed",
        );
        let store_commit_seconds = commit_buckets();
        r.register("store_commit_duration_seconds", "Time one store commit took (one redb write transaction, one fsync), failed ones included", store_commit_seconds.clone());
        let audit_dropped = counter(&mut r, "audit_records_dropped", "Audit records lost because the store could not be written for longer than the writer keeps them");
        let api_denied = counter(
            &mut r,
            "api_denied",
            "REST requests refused for a missing or invalid token (401) or a too-weak role (403)",
        );
        let platform_refused = counter(
            &mut r,
            "image_platform_refused",
            "Deploys, assignments and rollouts refused because an image does not provide a device's platform",
        );
        let platform_unchecked = counter(
            &mut r,
            "image_platform_unchecked",
            "Image platform checks that could not ask the registry (unreachable, no such image, credentials refused); the request went ahead",
        );
        let registry_requests = counter(
            &mut r,
            "image_platform_registry_requests",
            "HTTP requests the image platform check sent to registries (manifests, config blobs, tokens)",
        );
        let platform_cache_hits = counter(
            &mut r,
            "image_platform_cache_hits",
            "Image platform lookups answered from the cache (per digest; tags and failures for 30 s)",
        );
        let enrollments_accepted = counter(
            &mut r,
            "enrollments_accepted",
            "Devices that enrolled with a token",
        );
        let enrollments_refused =
            counter(&mut r, "enrollments_refused", "Enrollment requests refused");
        let history_samples = counter(
            &mut r,
            "history_samples",
            "Telemetry samples stored in the history",
        );
        let history_log_lines = counter(
            &mut r,
            "history_log_lines",
            "Container log lines stored in the history",
        );
        let history_dropped = counter(&mut r, "history_dropped", "Telemetry messages and log batches the history dropped because its queue was full or their commit failed");
        let history_lagged = counter(
            &mut r,
            "history_lagged",
            "Changes the history missed because it fell behind the engine's change stream",
        );
        let history_skipped = counter(&mut r, "history_skipped", "Telemetry samples and log lines not stored because their device timestamp is outside retention or the sample was already stored");
        let history_write_failed = counter(
            &mut r,
            "history_write_failed",
            "History commits that failed",
        );

        let operations = Family::<Labels, Counter>::default();
        let operation_seconds = HistogramFamily::new_with_constructor(seconds_buckets);
        for kind in OP_KINDS {
            let _ = operation_seconds.get_or_create(&vec![("kind", kind.as_str())]);
            for outcome in OP_OUTCOMES {
                let _ = operations.get_or_create(&vec![
                    ("kind", kind.as_str()),
                    ("outcome", outcome.as_str()),
                ]);
            }
        }
        r.register(
            "operations",
            "Operations (deploy, start, stop, ...) that ended, by kind and outcome",
            operations.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Time from an operation's creation to its final status, by kind",
            operation_seconds.clone(),
        );
        let command_round_trip_seconds = seconds_buckets();
        r.register("command_round_trip_seconds", "Time from an operation's creation to the device's acknowledgement that it has the command", command_round_trip_seconds.clone());
        let rollout_outcomes: Vec<&'static str> =
            ROLLOUT_OUTCOMES.iter().map(|p| phase_name(*p)).collect();
        let rollouts = family(
            &mut r,
            "rollouts",
            "Rollouts that ended, by outcome",
            "outcome",
            &rollout_outcomes,
        );
        let changes_lagged = counter(&mut r, "metrics_changes_lagged", "Changes the metrics' follower of the engine's change stream missed, so operation and rollout outcomes it did not count");
        let rule_firings = family(&mut r, "rule_firings", "Rule firings, by outcome: ok, failed (an action failed), cut (a loop of rules stopped)", "outcome", &RULE_OUTCOMES);
        let webhook_failures = counter(
            &mut r,
            "webhook_failures",
            "Rule webhook calls that failed after their retries",
        );
        let mqtt_requests = family(
            &mut r,
            "mqtt_requests",
            "JSON requests over MQTT, by outcome: ok, refused (role), invalid, failed",
            "outcome",
            &MQTT_REQUEST_OUTCOMES,
        );
        let json_mirror_dropped = counter(
            &mut r,
            "json_mirror_dropped",
            "JSON mirror publishes dropped because the orchestrator's outbox was full",
        );
        Metrics {
            registry: r,
            per_device,
            mqtt_received,
            mqtt_rejected,
            mqtt_published,
            mqtt_publish_failed,
            mqtt_publish_oversized,
            mqtt_link_connects,
            store_write_failed,
            store_commit_seconds,
            audit_dropped,
            api_denied,
            platform_refused,
            platform_unchecked,
            registry_requests,
            platform_cache_hits,
            enrollments_accepted,
            enrollments_refused,
            history_samples,
            history_log_lines,
            history_dropped,
            history_lagged,
            history_skipped,
            history_write_failed,
            operations,
            operation_seconds,
            command_round_trip_seconds,
            rollouts,
            changes_lagged,
            rule_firings,
            webhook_failures,
            mqtt_requests,
            json_mirror_dropped,
            broker: OnceLock::new(),
        }
    }

    /// Whether scrapes carry one series per device.
    pub fn per_device(&self) -> bool {
        self.per_device
    }

    /// The embedded broker to read at each scrape (once; later calls are
    /// ignored).
    pub fn set_broker(&self, stats: Arc<GuardStats>, connections: Arc<Connections>) {
        let _ = self.broker.set(Broker { stats, connections });
    }

    /// A rule fired: `outcome` is one of [`RULE_OUTCOMES`].
    pub fn rule_fired(&self, outcome: &'static str) {
        debug_assert!(
            RULE_OUTCOMES.contains(&outcome),
            "unknown rule outcome {outcome}"
        );
        self.rule_firings
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// A rule's webhook failed for good (its retries spent).
    pub fn webhook_failed(&self) {
        self.webhook_failures.inc();
    }

    /// A JSON request over MQTT was answered: `outcome` is one of
    /// [`MQTT_REQUEST_OUTCOMES`].
    pub fn mqtt_request(&self, outcome: &'static str) {
        debug_assert!(
            MQTT_REQUEST_OUTCOMES.contains(&outcome),
            "unknown request outcome {outcome}"
        );
        self.mqtt_requests
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Counts and times what one change says about operations and
    /// rollouts.
    pub fn observe(&self, change: &Change) {
        match change {
            Change::Operation { operation: op } => {
                let secs = op.updated_at_ms.saturating_sub(op.created_at_ms) as f64 / 1000.0;
                if op.status == OpStatus::Received {
                    self.command_round_trip_seconds.observe(secs);
                } else if op.status.is_final() {
                    let kind = op.op.as_str();
                    self.operations
                        .get_or_create(&vec![("kind", kind), ("outcome", op.status.as_str())])
                        .inc();
                    self.operation_seconds
                        .get_or_create(&vec![("kind", kind)])
                        .observe(secs);
                }
            }
            Change::Rollout { rollout } if ROLLOUT_OUTCOMES.contains(&rollout.phase) => {
                self.rollouts
                    .get_or_create(&vec![("outcome", phase_name(rollout.phase))])
                    .inc();
            }
            Change::Lagged { missed } => {
                self.changes_lagged.inc_by(*missed);
            }
            _ => {}
        }
    }

    /// The exposition: OpenMetrics text when `openmetrics`, else the
    /// Prometheus text format 0.0.4. `fleet` and `rollouts` are what the
    /// engine holds now.
    pub fn render(&self, fleet: FleetGauges, rollouts: &[Rollout], openmetrics: bool) -> String {
        let mut scrape = Registry::with_prefix("drover");
        scrape.register_collector(Box::new(Scrape {
            fleet,
            rollouts: ROLLOUT_ACTIVE
                .iter()
                .map(|p| {
                    (
                        phase_name(*p),
                        rollouts.iter().filter(|r| r.phase == *p).count(),
                    )
                })
                .collect(),
            broker: self.broker.get().cloned(),
        }));
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a
        // bug in a metric's encoding, and the scrape shows what it has.
        let _ = if openmetrics {
            text::encode_registry(&mut out, &self.registry)
                .and_then(|()| text::encode_registry(&mut out, &scrape))
                .and_then(|()| text::encode_eof(&mut out))
        } else {
            prometheus_text::encode(&mut out, &self.registry)
                .and_then(|()| prometheus_text::encode(&mut out, &scrape))
        };
        out
    }
}

/// Whether a scrape's `Accept` header asks for OpenMetrics (Prometheus's
/// own scrapes do); anything else gets the classic text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept
        .split(',')
        .any(|a| a.trim().starts_with("application/openmetrics-text"))
}

fn phase_name(p: RolloutPhase) -> &'static str {
    match p {
        RolloutPhase::Running => "running",
        RolloutPhase::WaitingApproval => "waiting_approval",
        RolloutPhase::Paused => "paused",
        RolloutPhase::RollingBack => "rolling_back",
        RolloutPhase::Succeeded => "succeeded",
        RolloutPhase::Failed => "failed",
        RolloutPhase::RolledBack => "rolled_back",
        RolloutPhase::Aborted => "aborted",
        RolloutPhase::Superseded => "superseded",
    }
}

/// Follows the engine's change stream until it closes, counting operation
/// and rollout outcomes ([`Metrics::observe`]). Falling behind loses
/// counts, never slows the engine; the loss is counted.
pub async fn follow(mut changes: broadcast::Receiver<Arc<Change>>, metrics: Arc<Metrics>) {
    loop {
        match changes.recv().await {
            Ok(c) => metrics.observe(&c),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                metrics.observe(&Change::Lagged { missed: n });
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// What one scrape reads at that moment.
#[derive(Debug)]
struct Scrape {
    fleet: FleetGauges,
    rollouts: Vec<(&'static str, usize)>,
    broker: Option<Broker>,
}

impl Scrape {
    fn gauge<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, V)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in rows {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn counter(
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: u64,
    ) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(v);
        c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = &self.fleet;
        Self::gauge(
            &mut enc,
            "devices",
            "Known devices, by status: online (its agent is connected) or offline.",
            [
                ([("status", "online")], f.online as i64),
                ([("status", "offline")], f.offline as i64),
            ],
        )?;
        Self::gauge(
            &mut enc,
            "app_desired_devices",
            "Devices whose desired state runs the app, by app.",
            f.apps
                .iter()
                .map(|(app, g)| ([("app", app.as_str())], g.desired as i64)),
        )?;
        Self::gauge(
            &mut enc,
            "app_running_devices",
            "Devices that report the app running, by app.",
            f.apps
                .iter()
                .map(|(app, g)| ([("app", app.as_str())], g.running as i64)),
        )?;
        Self::gauge(
            &mut enc,
            "rollouts_in_progress",
            "Rollouts that have not ended, by phase.",
            self.rollouts
                .iter()
                .map(|(phase, n)| ([("phase", *phase)], *n as i64)),
        )?;
        if !f.devices.is_empty() {
            // One series per device and gauge (the fleet's size):
            // `drover serve --metrics-per-device=false` leaves them out.
            let rows = |pick: fn(&drover_shared::payload::HostMetrics) -> f64| {
                f.devices.iter().filter_map(move |d| {
                    Some(([("device", d.id.as_str())], pick(d.host.as_ref()?)))
                })
            };
            Self::gauge(
                &mut enc,
                "device_online",
                "1 while the device's agent is connected, else 0. One series per device.",
                f.devices
                    .iter()
                    .map(|d| ([("device", d.id.as_str())], i64::from(d.online))),
            )?;
            Self::gauge(&mut enc, "device_cpu_ratio", "Host CPU in use, 0 to 1 of all cores, from the device's latest telemetry. One series per device.", rows(|h| f64::from(h.cpu_percent) / 100.0))?;
            Self::gauge(
                &mut enc,
                "device_memory_used_bytes",
                "Host memory in use, from the device's latest telemetry. One series per device.",
                rows(|h| h.memory_used_bytes as f64),
            )?;
            Self::gauge(
                &mut enc,
                "device_memory_total_bytes",
                "Host memory in all, from the device's latest telemetry. One series per device.",
                rows(|h| h.memory_total_bytes as f64),
            )?;
            Self::gauge(&mut enc, "device_disk_used_bytes", "Disk in use on the agent's data filesystem, from the device's latest telemetry. One series per device.", rows(|h| h.disk_used_bytes as f64))?;
            Self::gauge(&mut enc, "device_disk_total_bytes", "Disk size of the agent's data filesystem, from the device's latest telemetry. One series per device.", rows(|h| h.disk_total_bytes as f64))?;
        }
        if let Some(b) = &self.broker {
            let s = &b.stats;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let open = ConstGauge::new(b.connections.len() as i64);
            open.encode(enc.encode_descriptor(
                "broker_connections",
                "Authenticated client connections open on the embedded broker.",
                None,
                open.metric_type(),
            )?)?;
            Self::counter(
                &mut enc,
                "broker_messages_received",
                "PUBLISH packets the embedded broker accepted from its clients.",
                n(&s.publishes_received),
            )?;
            Self::counter(
                &mut enc,
                "broker_messages_sent",
                "PUBLISH packets the embedded broker wrote to its clients.",
                n(&s.publishes_sent),
            )?;
            Self::counter(&mut enc, "broker_acl_violations", "Broker clients disconnected for publishing outside their permissions (a publish, a Last Will, a second CONNECT).", n(&s.acl_violations))?;
            Self::counter(&mut enc, "broker_subscriptions_refused", "Subscription filters outside the client's permissions, answered with SUBACK failure code 0x80.", n(&s.subscriptions_refused))?;
            Self::counter(
                &mut enc,
                "broker_oversized_packets",
                "Broker connections closed for a packet over the size limit.",
                n(&s.oversized_packets),
            )?;
            Self::counter(
                &mut enc,
                "broker_auth_failures",
                "Broker CONNECTs refused for unknown, wrong or revoked credentials.",
                n(&s.auth_failures),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Operation;
    use crate::core::fleet::{AppGauge, DeviceGauge};
    use drover_shared::payload::HostMetrics;

    fn fleet(per_device: bool) -> FleetGauges {
        let mut f = FleetGauges {
            online: 2,
            offline: 1,
            ..Default::default()
        };
        f.apps.insert(
            "web".into(),
            AppGauge {
                desired: 3,
                running: 2,
            },
        );
        if per_device {
            f.devices.push(DeviceGauge {
                id: "pi-1".into(),
                online: true,
                host: Some(HostMetrics {
                    cpu_percent: 50.0,
                    memory_total_bytes: 1024,
                    ..Default::default()
                }),
            });
            // No telemetry yet: online, no resource gauges.
            f.devices.push(DeviceGauge {
                id: "pi-2".into(),
                online: false,
                host: None,
            });
        }
        f
    }

    fn op(status: OpStatus, created: u64, updated: u64) -> Change {
        Change::Operation {
            operation: Box::new(Operation {
                id: "o".into(),
                device: drover_shared::DeviceId::new("pi-1").expect("id"),
                app: drover_shared::Name::new("web").expect("name"),
                op: Op::Deploy,
                generation: 1,
                status,
                detail: String::new(),
                progress: None,
                created_at_ms: created,
                updated_at_ms: updated,
            }),
        }
    }

    /// The sample lines of a text exposition, `name{labels} value`.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn known_label_values_are_there_at_zero_before_anything_happens() {
        let m = Metrics::new(true);
        let text = m.render(FleetGauges::default(), &[], false);
        let s = samples(&text);
        for line in [
            "drover_operations_total{kind=\"unpause\",outcome=\"superseded\"} 0",
            "drover_rollouts_total{outcome=\"rolled_back\"} 0",
            "drover_rule_firings_total{outcome=\"cut\"} 0",
            "drover_mqtt_requests_total{outcome=\"invalid\"} 0",
            "drover_webhook_failures_total 0",
            "drover_devices{status=\"offline\"} 0",
            "drover_rollouts_in_progress{phase=\"waiting_approval\"} 0",
            "drover_operation_duration_seconds_count{kind=\"stop\"} 0",
        ] {
            assert!(s.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn fleet_gauges_per_device_only_when_asked() {
        let m = Metrics::new(true);
        let text = m.render(fleet(true), &[], false);
        let s = samples(&text);
        for line in [
            "drover_devices{status=\"online\"} 2",
            "drover_app_desired_devices{app=\"web\"} 3",
            "drover_app_running_devices{app=\"web\"} 2",
            "drover_device_online{device=\"pi-1\"} 1",
            "drover_device_online{device=\"pi-2\"} 0",
            "drover_device_cpu_ratio{device=\"pi-1\"} 0.5",
            "drover_device_memory_total_bytes{device=\"pi-1\"} 1024.0",
        ] {
            assert!(s.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(
            !text.contains("device_cpu_ratio{device=\"pi-2\"}"),
            "{text}"
        );
        let off = Metrics::new(false);
        assert!(!off.per_device());
        let text = off.render(fleet(false), &[], false);
        assert!(!text.contains("drover_device_"), "{text}");
        assert!(
            text.contains("drover_devices{status=\"online\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn operations_are_counted_and_timed_from_the_change_stream() {
        let m = Metrics::new(false);
        m.observe(&op(OpStatus::Sent, 1_000, 1_001));
        m.observe(&op(OpStatus::Received, 1_000, 1_250));
        m.observe(&op(OpStatus::InProgress, 1_000, 1_300));
        m.observe(&op(OpStatus::Succeeded, 1_000, 4_000));
        m.observe(&Change::Lagged { missed: 3 });
        let text = m.render(FleetGauges::default(), &[], false);
        let s = samples(&text);
        for line in [
            "drover_command_round_trip_seconds_count 1",
            "drover_command_round_trip_seconds_sum 0.25",
            "drover_operation_duration_seconds_count{kind=\"deploy\"} 1",
            "drover_operation_duration_seconds_sum{kind=\"deploy\"} 3.0",
            "drover_operation_duration_seconds_bucket{kind=\"deploy\",le=\"2.56\"} 0",
            "drover_operation_duration_seconds_bucket{kind=\"deploy\",le=\"5.12\"} 1",
        ] {
            assert!(s.contains(&line), "{line} missing from:\n{text}");
        }
        let ok = vec![("kind", "deploy"), ("outcome", "succeeded")];
        assert_eq!(m.operations.get_or_create_owned(&ok).get(), 1);
        assert_eq!(m.changes_lagged.get(), 3);
    }

    #[test]
    fn rule_webhook_and_request_counters_count() {
        let m = Metrics::new(false);
        m.rule_fired("cut");
        m.rule_fired("ok");
        m.rule_fired("ok");
        m.webhook_failed();
        m.mqtt_request("refused");
        let text = m.render(FleetGauges::default(), &[], false);
        let s = samples(&text);
        for line in [
            "drover_rule_firings_total{outcome=\"ok\"} 2",
            "drover_rule_firings_total{outcome=\"cut\"} 1",
            "drover_rule_firings_total{outcome=\"failed\"} 0",
            "drover_webhook_failures_total 1",
            "drover_mqtt_requests_total{outcome=\"refused\"} 1",
            "drover_mqtt_requests_total{outcome=\"ok\"} 0",
        ] {
            assert!(s.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn openmetrics_only_when_the_accept_header_asks() {
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics(" application/openmetrics-text"));
        for other in [
            "",
            "*/*",
            "text/plain",
            "garbage;;;,,",
            "text/plain; application/openmetrics-text",
        ] {
            assert!(!wants_openmetrics(other), "{other:?}");
        }
        let m = Metrics::new(false);
        let om = m.render(FleetGauges::default(), &[], true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        // OpenMetrics names a counter's family without `_total`.
        assert!(om.contains("# TYPE drover_mqtt_received counter"), "{om}");
        let text = m.render(FleetGauges::default(), &[], false);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE drover_mqtt_received_total counter"),
            "{text}"
        );
    }
}
