//! Counters the orchestrator exposes on `/metrics` in Prometheus text form.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub mqtt_received: AtomicU64,
    /// Publishes on our topics that failed to decode or parse.
    pub mqtt_rejected: AtomicU64,
    pub mqtt_published: AtomicU64,
    pub mqtt_publish_failed: AtomicU64,
    /// Publishes dropped before reaching the MQTT client because no
    /// receiver would take a packet that large.
    pub mqtt_publish_oversized: AtomicU64,
    /// Times the orchestrator's own MQTT link (re)connected to the broker.
    pub mqtt_link_connects: AtomicU64,
    pub store_write_failed: AtomicU64,
    /// Audit records dropped because the store failed for so long that
    /// more were waiting than the writer keeps.
    pub audit_dropped: AtomicU64,
    /// REST requests refused with 401 or 403.
    pub api_denied: AtomicU64,
    pub enrollments_accepted: AtomicU64,
    pub enrollments_refused: AtomicU64,
    /// Telemetry samples and log lines stored in the history.
    pub history_samples: AtomicU64,
    pub history_log_lines: AtomicU64,
    /// Telemetry messages and log batches the history did not store: its
    /// queue was full, or their commit failed.
    pub history_dropped: AtomicU64,
    /// Changes the history's subscriber missed because it fell behind the
    /// engine's change stream (of every kind, not only telemetry and logs).
    pub history_lagged: AtomicU64,
    /// Samples and lines outside retention (a device clock far off) or
    /// already stored.
    pub history_skipped: AtomicU64,
    pub history_write_failed: AtomicU64,
    /// The embedded broker's authorization counters; unset with an
    /// external broker.
    /// Rule firings by outcome, and webhook calls that failed for good.
    pub rule_fired_ok: AtomicU64,
    pub rule_fired_failed: AtomicU64,
    pub rule_fired_cut: AtomicU64,
    pub webhook_failed: AtomicU64,
    pub broker: std::sync::OnceLock<std::sync::Arc<drover_broker::GuardStats>>,
}

impl Metrics {
    /// A rule fired, with its outcome: "ok", "failed" or "cut".
    pub fn rule_fired(&self, outcome: &str) {
        let c = match outcome {
            "ok" => &self.rule_fired_ok,
            "cut" => &self.rule_fired_cut,
            _ => &self.rule_fired_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A webhook call failed after its retries.
    pub fn webhook_failed(&self) {
        self.webhook_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, devices_total: usize, devices_online: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            "drover_mqtt_received_total",
            "MQTT publishes received on device topics.",
            &self.mqtt_received,
        );
        counter("drover_mqtt_rejected_total", "Device publishes rejected as malformed, oversized, of another protocol version or on an unknown topic.", &self.mqtt_rejected);
        counter(
            "drover_mqtt_published_total",
            "MQTT publishes sent to devices.",
            &self.mqtt_published,
        );
        counter(
            "drover_mqtt_publish_failed_total",
            "MQTT publishes that could not be queued.",
            &self.mqtt_publish_failed,
        );
        counter(
            "drover_mqtt_publish_oversized_total",
            "MQTT publishes dropped because the packet is over the limit agents and the broker accept.",
            &self.mqtt_publish_oversized,
        );
        counter(
            "drover_mqtt_link_connects_total",
            "Connections (first and re-) of the orchestrator's MQTT link to the broker.",
            &self.mqtt_link_connects,
        );
        counter(
            "drover_store_write_failed_total",
            "redb write transactions that failed.",
            &self.store_write_failed,
        );
        counter(
            "drover_audit_records_dropped_total",
            "Audit records lost because the store could not be written for longer than the writer keeps them.",
            &self.audit_dropped,
        );
        counter(
            "drover_api_denied_total",
            "REST requests refused for a missing or invalid token (401) or a too-weak role (403).",
            &self.api_denied,
        );
        counter(
            "drover_enrollments_accepted_total",
            "Devices that enrolled with a token.",
            &self.enrollments_accepted,
        );
        counter(
            "drover_enrollments_refused_total",
            "Enrollment requests refused.",
            &self.enrollments_refused,
        );
        counter(
            "drover_history_samples_total",
            "Telemetry samples stored in the history.",
            &self.history_samples,
        );
        counter(
            "drover_history_log_lines_total",
            "Container log lines stored in the history.",
            &self.history_log_lines,
        );
        counter(
            "drover_history_dropped_total",
            "Telemetry messages and log batches the history dropped because its queue was full or their commit failed.",
            &self.history_dropped,
        );
        counter(
            "drover_history_lagged_total",
            "Changes the history missed because it fell behind the engine's change stream.",
            &self.history_lagged,
        );
        counter(
            "drover_history_skipped_total",
            "Telemetry samples and log lines not stored because their device timestamp is outside retention or the sample was already stored.",
            &self.history_skipped,
        );
        counter(
            "drover_history_write_failed_total",
            "History commits that failed.",
            &self.history_write_failed,
        );
        counter(
            "drover_webhook_failures_total",
            "Rule webhook calls that failed after their retries.",
            &self.webhook_failed,
        );
        if let Some(b) = self.broker.get() {
            counter(
                "drover_broker_acl_violations_total",
                "Broker clients disconnected for publishing outside their permissions (a publish, a Last Will, a second CONNECT).",
                &b.acl_violations,
            );
            counter(
                "drover_broker_subscriptions_refused_total",
                "Subscription filters outside the client's permissions, answered with SUBACK failure code 0x80.",
                &b.subscriptions_refused,
            );
            counter(
                "drover_broker_oversized_packets_total",
                "Broker connections closed for a packet over the size limit.",
                &b.oversized_packets,
            );
            counter(
                "drover_broker_auth_failures_total",
                "Broker CONNECTs refused for unknown, wrong or revoked credentials.",
                &b.auth_failures,
            );
        }
        let _ = writeln!(
            out,
            "# HELP drover_rule_firings_total Rule firings by outcome (ok, failed, cut).\n# TYPE drover_rule_firings_total counter"
        );
        for (outcome, v) in [
            ("ok", &self.rule_fired_ok),
            ("failed", &self.rule_fired_failed),
            ("cut", &self.rule_fired_cut),
        ] {
            let _ = writeln!(
                out,
                "drover_rule_firings_total{{outcome=\"{outcome}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP drover_devices Known devices.\n# TYPE drover_devices gauge\ndrover_devices {devices_total}");
        let _ = writeln!(out, "# HELP drover_devices_online Devices whose agent is connected.\n# TYPE drover_devices_online gauge\ndrover_devices_online {devices_online}");
        out
    }
}
